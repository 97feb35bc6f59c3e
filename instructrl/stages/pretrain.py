"""Stage `pretrain`: next-token loss on pretraining text (see instructrl/stages/lm.py)."""

from __future__ import annotations

import ml_collections

from instructrl.stages import lm


def default_config() -> ml_collections.ConfigDict:
    c = lm.default_config("pretrain")
    c.optimizer.lr = 1e-3
    c.optimizer.warmup_steps = 50
    return c


def run(config: ml_collections.ConfigDict, name: str, workdir: str) -> None:
    lm.run_lm_stage(config, name, workdir)
