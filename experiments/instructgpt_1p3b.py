r"""InstructGPT 1.3B (GPT-3 XL shape: 24 layers, d 2048, 16 heads) with the paper's SFT, RM, PPO-ptx.

    python -m instructrl.main --config=experiments/instructgpt_1p3b.py:data=DATA,base=BASE_1P3B,rm_base=BASE_6B --workdir=DIR

Arguments, data files, stages, hyperparameters and meshes are described in
experiments/paper.py; this file fixes `size=1p3b`. The reward model and the value network
are 6B for every policy size, as in the paper.
Mesh fsdp=32 x tensor=-1: v5p-64 (32 chips) runs every stage.
Memory and step time per stage on a slice, without the slice:

    python -m instructrl.plan --config=experiments/instructgpt_1p3b.py --mesh=data:1,fsdp:32,tensor:1 --chip=v5p
"""

import ml_collections

from experiments import paper


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    return paper.instructgpt("1p3b", arg)
