"""Runs the stages of an experiment config, in order, resuming unfinished ones.

    python -m instructrl.main --config=experiments/tiny_instructgpt.py[:ARGS] --workdir=DIR \
        [--config.KEY=VALUE ...]

Each stage writes `DIR/<stage>/`; a stage whose folder holds a `DONE` marker is skipped,
so re-running the same command resumes where the last run stopped. Bad input, a bad config
value, an unreadable artifact or an OS error on the workdir ends with one line naming the
file and line, config key or path and exit status 2; a NaN with 3; SIGTERM, at any moment,
with 143 once the running stage has saved its state (instructrl/cli.py). `--verbose` adds
the traceback.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Callable, Sequence

import ml_collections

from instructrl import cli, ranges
from instructrl import config as config_lib
from instructrl.errors import ConfigError, InputError, Preempted
from instructrl.stages import DONE_MARKER

# Stage kind -> module holding `run(config, name, workdir)`. Imported lazily so that a
# config that uses only some stages does not pay for the others' imports.
STAGE_MODULES = {
    "smoke": "instructrl.stages.smoke",
    "world": "instructrl.stages.world",
    "tokenizer": "instructrl.stages.tokenizer",
    "pretrain": "instructrl.stages.pretrain",
    "sft": "instructrl.stages.sft",
    "collect": "instructrl.stages.collect",
    "rm": "instructrl.stages.reward",
    "ppo": "instructrl.stages.ppo",
    "grpo": "instructrl.stages.grpo",
    "dpo": "instructrl.stages.dpo",
    "eval": "instructrl.stages.evaluate",
    "import_hf": "instructrl.stages.hf_io",
    "convert_data": "instructrl.stages.hf_io",
    "export_hf": "instructrl.stages.hf_io",
}


class UsageError(ConfigError):
    """A bad command line; the message says which flag."""


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(prog="python -m instructrl.main", description=__doc__)
    parser.add_argument("--config", required=True, help="experiments/x.py[:ARGS]")
    parser.add_argument("--workdir", required=True, help="output folder (local or gs://)")
    parser.add_argument("--coordinator_address", default=None, help="jax.distributed coordinator")
    parser.add_argument("--num_processes", type=int, default=None)
    parser.add_argument("--process_id", type=int, default=None)
    parser.add_argument(
        "--distributed",
        action="store_true",
        help="call jax.distributed.initialize() (auto-detected settings on TPU pods)",
    )
    parser.add_argument(
        "--verbose", action="store_true", help="print the traceback of an expected failure too"
    )
    args, rest = parser.parse_known_args(argv)
    overrides = []
    for item in rest:
        if not item.startswith("--config."):
            raise UsageError(f"unknown flag '{item}' (overrides look like --config.KEY=VALUE)")
        overrides.append(item[len("--config.") :])
    return args, overrides


def build_config(spec: str, overrides: Sequence[str]) -> ml_collections.ConfigDict:
    config = config_lib.load_config(spec)
    config_lib.apply_overrides(config, overrides)
    ranges.check(config, config_lib.stage_names(config))
    return config


def stage_runner(kind: str) -> Callable[[ml_collections.ConfigDict, str, str], None]:
    if kind not in STAGE_MODULES:
        raise ConfigError(
            f"stage kind '{kind}' is unknown (known: {', '.join(sorted(STAGE_MODULES))})"
        )
    module = importlib.import_module(STAGE_MODULES[kind])
    return module.run


def run(config: ml_collections.ConfigDict, workdir: str) -> None:
    """Runs every stage of `config.stages` not yet finished in `workdir`.

    SIGTERM is recorded, not fatal: a training loop saves a checkpoint at its next step
    and raises Preempted; a stage without checkpoints (or one past its last step) finishes,
    and Preempted is raised before the next stage starts. DIR/config.json is written once a
    stage has finished, so a run that fails at once leaves every earlier file as it was.
    """
    import jax

    from instructrl.stages import common

    if "://" not in workdir:  # orbax (tensorstore) writes only to absolute local paths
        workdir = os.path.abspath(workdir)
        if os.path.exists(workdir) and not os.path.isdir(workdir):
            raise InputError(f"{workdir}: --workdir is a file, not a folder")
    names = config_lib.stage_names(config)
    ranges.check(config, names)
    runners = {name: stage_runner(config[name].kind) for name in names}
    with common.TerminationSignal() as term:
        if jax.process_index() == 0:
            os.makedirs(workdir, exist_ok=True)
        for i, name in enumerate(names):
            if term.should_stop(0):
                after = f"stage {names[i - 1]} finished; " if i else ""
                raise Preempted(f"{after}stopped by SIGTERM before stage {name} started")
            _run_stage(config, name, workdir, runners[name])
        if term.should_stop(0):
            raise Preempted(f"stage {names[-1]} finished; stopped by SIGTERM (no stage is left)")


def _run_stage(config, name: str, workdir: str, runner) -> None:
    import jax

    stage_dir = os.path.join(workdir, name)
    if os.path.exists(os.path.join(stage_dir, DONE_MARKER)):
        logging.info("stage %s: finished earlier, skipped", name)
        return
    logging.info("stage %s (%s): starting", name, config[name].kind)
    new_dir = not os.path.exists(stage_dir)
    if jax.process_index() == 0:  # the config this stage ran with (docs/design.md)
        os.makedirs(stage_dir, exist_ok=True)
        _write_config(config, stage_dir)
    start = time.time()
    try:
        runner(config, name, workdir)
    except BaseException as e:
        if isinstance(e, OSError) and not e.filename and e.errno is not None:
            e.filename = stage_dir  # a write to an open file names no file: name the stage
        _forget_empty(stage_dir, new_dir)
        raise
    if jax.process_index() == 0:
        done = {"seconds": round(time.time() - start, 1), **_peak_memory()}
        with open(os.path.join(stage_dir, DONE_MARKER), "w") as f:
            f.write(json.dumps(done) + "\n")
        _write_config(config, workdir)
    logging.info("stage %s: done in %.1f s", name, time.time() - start)


def _peak_memory() -> dict[str, float]:
    """{"peak_rss_mb": the process's peak resident memory so far, "device_peak_mb": the first
    device's peak bytes in use, where the platform reports it (not on CPU)}."""
    import resource

    import jax

    out = {"peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    stats = jax.local_devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        out["device_peak_mb"] = round(stats["peak_bytes_in_use"] / 2**20, 1)
    return out


def _forget_empty(stage_dir: str, new_dir: bool) -> None:
    """A stage that fails before writing anything (e.g. an input stage has not run) leaves
    no folder behind: the next run starts it afresh either way."""
    import jax

    if jax.process_index() == 0 and new_dir and os.listdir(stage_dir) == ["config.json"]:
        shutil.rmtree(stage_dir)


def _write_config(config: ml_collections.ConfigDict, directory: str) -> None:
    """Writes `directory/config.json`, keeping a different earlier one beside it."""
    path = os.path.join(directory, "config.json")
    text = config_lib.to_json(config) + "\n"
    if os.path.exists(path):
        with open(path) as f:
            old = f.read()
        if old != text:
            # Keep the earlier config next to the new one: what ran before ran with it.
            stamp = time.strftime("%Y%m%d-%H%M%S")
            os.replace(path, os.path.join(directory, f"config.{stamp}.json"))
            logging.warning("config differs from the one in %s; the old one was kept", path)
        else:
            return
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def main(argv: Sequence[str] | None = None) -> int:
    cli.setup_logging(cli.wants_verbose(argv))
    return cli.run(lambda: _main(sys.argv[1:] if argv is None else argv), argv)


def _main(argv: Sequence[str]) -> int:
    args, overrides = parse_args(argv)
    config = build_config(args.config, overrides)
    import jax

    if args.coordinator_address or args.distributed:
        jax.distributed.initialize(
            coordinator_address=args.coordinator_address,
            num_processes=args.num_processes,
            process_id=args.process_id,
        )
    run(config, args.workdir)
    return 0


if __name__ == "__main__":
    cli.command(main)
