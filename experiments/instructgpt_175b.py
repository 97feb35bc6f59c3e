r"""InstructGPT 175B (GPT-3 shape: 96 layers, d 12288, 96 heads) with the paper's SFT, RM and PPO-ptx settings.

    python -m instructrl.main --config=experiments/instructgpt_175b.py:data=DATA,base=BASE_175B,rm_base=BASE_6B --workdir=DIR

Everything (arguments, data files, stages, hyperparameters, mesh) is described in
experiments/paper.py; this file fixes `size=175b`. The reward model and the value network
are 6B for every policy size, as in the paper. Plan memory and step time before renting a slice:

    python -m instructrl.plan --config=experiments/instructgpt_175b.py --mesh=... --chip=v5p

Arguments: data=DIR, base=DIR, rm_base=DIR, tokenizer=PATH.model, smoke, seed=N.
"""

from experiments import paper


def get_config(arg: str | None = None):
    return paper.instructgpt("175b", arg)
