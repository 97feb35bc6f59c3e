r"""InstructGPT 175B (GPT-3 shape: 96 layers, d 12288, 96 heads) with the paper's SFT, RM, PPO-ptx.

    python -m instructrl.main --config=experiments/instructgpt_175b.py:data=DATA,base=BASE_175B,rm_base=BASE_6B --workdir=DIR

Arguments, data files, stages, hyperparameters and meshes are described in
experiments/paper.py; this file fixes `size=175b`. The reward model and the value network
are 6B for every policy size, as in the paper.
Mesh fsdp=8 x tensor=-1: v5p-256 (128 chips) for rm, sft, ppo_init; ppo_ptx needs
v5p-1024 with --config.mesh.fsdp=64 --config.mesh.tensor=8 (see experiments/paper.py).
Memory and step time per stage on a slice, without the slice:

    python -m instructrl.plan --config=experiments/instructgpt_175b.py --mesh=data:1,fsdp:8,tensor:16 --chip=v5p
"""

import ml_collections

from experiments import paper


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    return paper.instructgpt("175b", arg)
