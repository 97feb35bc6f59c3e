"""Stage `world`: writes the built-in synthetic instruction world as standard JSONL files.

`DIR/<name>/` receives pretrain.jsonl, demonstrations.jsonl, prompts_*.jsonl, ... (see
`instructrl.world.write_world`). Data configs refer to them as `@<name>/<file>`. With your
own data, leave this stage out and point `config.data.*` at your files.
"""

from __future__ import annotations

import logging
import os

import jax
import ml_collections

from instructrl import world
from instructrl.errors import ConfigError
from instructrl.world.vocab import SLIP_KINDS


def default_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        dict(
            kind="world",
            seed=0,
            num_pretrain=20000,
            num_pretrain_heldout=1000,
            num_demonstrations=3000,
            num_rm=1500,
            num_ppo=3000,
            num_eval=450,
            num_public=200,
            demo_error_rate=0.1,  # share of demonstrations with a labeler's slip
            demo_slips="random",  # its kind: "random" word-level mistakes or "filler" (visible)
            fewshot_k=1,
            fewshot_max_chars=200,
        )
    )


def run(config: ml_collections.ConfigDict, name: str, workdir: str) -> None:
    c = config[name]
    # write_world checks these too, but only process 0 calls it: every process fails here.
    if not 0.0 <= c.demo_error_rate <= 1.0:
        raise ConfigError(
            f"config key '{name}.demo_error_rate' ({c.demo_error_rate}) is not in [0, 1]"
        )
    if c.demo_slips not in SLIP_KINDS:
        raise ConfigError(
            f"config key '{name}.demo_slips' ({c.demo_slips!r}) must be one of {SLIP_KINDS}"
        )
    out_dir = os.path.join(workdir, name)
    if jax.process_index() == 0:
        kwargs = {k: v for k, v in c.items() if k not in ("kind", "seed")}
        paths = world.write_world(out_dir, seed=c.seed, **kwargs)
        logging.info("%s: %d files in %s (%s)", name, len(paths), out_dir, ", ".join(sorted(paths)))
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"instructrl_stage_{name}")
