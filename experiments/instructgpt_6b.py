r"""InstructGPT 6B (GPT-3 6.7B shape: 32 layers, d 4096, 32 heads) with the paper's SFT, RM, PPO-ptx.

    python -m instructrl.main --config=experiments/instructgpt_6b.py:data=DATA,base=BASE_6B --workdir=DIR

Arguments, data files, stages, hyperparameters and meshes are described in
experiments/paper.py; this file fixes `size=6b`. The reward model and the value network
are 6B for every policy size, as in the paper.
Mesh fsdp=32 x tensor=-1: v5p-128 (64 chips, tensor 2) runs every stage.
Memory and step time per stage on a slice, without the slice:

    python -m instructrl.plan --config=experiments/instructgpt_6b.py --mesh=data:1,fsdp:32,tensor:2 --chip=v5p
"""

import ml_collections

from experiments import paper


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    return paper.instructgpt("6b", arg)
