"""Stage `sft`: supervised fine-tuning on demonstrations (see instructrl/stages/lm.py).

Completion-only loss, residual dropout 0.2, cosine to 10% without warm-up, β2 = 0.95,
16 epochs, final model chosen by the RM score of greedy samples on validation prompts
(docs/method.md §1). The PPO-init model is a second SFT stage with `ptx_fraction=0.1` and
2 epochs.
"""

from __future__ import annotations

import ml_collections

from instructrl.stages import lm


def default_config() -> ml_collections.ConfigDict:
    return lm.default_config("sft")


def run(config: ml_collections.ConfigDict, name: str, workdir: str) -> None:
    lm.run_lm_stage(config, name, workdir)
