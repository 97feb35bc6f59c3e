"""Where stages find their inputs: other stages' folders, named in the config.

A stage names each input by the name of the stage that produced it (`init_from="sft"`,
`reward_from="rm"`, `tokenizer_from="tokenizer"`); nothing is found by convention alone.
`tokenizer_from` may also name a tokenizer file or folder (`tokenizer.load` reads either backend).
A missing or unfinished input stage is an `InputError` naming the config key.
"""

from __future__ import annotations

import os

import jax
import ml_collections

from instructrl.data import BuiltDataset, build_dataset
from instructrl.errors import InputError
from instructrl.stages import DONE_MARKER

EXPORT_DIR = "export"
TOKENIZER_FILE = "tokenizer.model"
HF_TOKENIZER_FILE = "tokenizer.json"  # a tokenizer stage that copied a Hugging Face tokenizer


def stage_dir(workdir: str, name: str) -> str:
    return os.path.join(workdir, name)


def is_done(workdir: str, name: str) -> bool:
    return os.path.exists(os.path.join(stage_dir(workdir, name), DONE_MARKER))


def wait_for_done_markers(what: str) -> None:
    """With several processes, waits until all reach this point. Process 0 alone writes a
    stage's DONE marker (main.run), after the stage returns; without this barrier a faster
    process could look for it before it exists and fail the next stage."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"instructrl_inputs_{what}")


def input_stage(
    config: ml_collections.ConfigDict, name: str, key: str, workdir: str, default: str = ""
) -> str:
    """The folder of the stage named by `config.<name>.<key>`; it must have finished."""
    wait_for_done_markers(f"{name}.{key}")
    source = config[name].get(key, default)
    where = f"config key '{name}.{key}'"
    if not source:
        raise InputError(f"{where} is empty: stage '{name}' needs an input stage")
    if source not in config:
        raise InputError(f"{where} names stage '{source}', which is not in the config")
    if not is_done(workdir, source):
        raise InputError(
            f"{where}: input stage '{source}' has not finished in {stage_dir(workdir, source)} "
            f"(add it to config.stages before '{name}')"
        )
    return stage_dir(workdir, source)


def tokenizer_path(config: ml_collections.ConfigDict, name: str, workdir: str) -> str:
    """The tokenizer for stage `name` (for `tokenizer.load`): `tokenizer_from` names a stage, a
    SentencePiece `.model` file, a Hugging Face `tokenizer.json` or a folder holding either
    (one that is not a stage name and has a "/" or exists, e.g. a `convert` export). A stage's
    tokenizer is in its folder, or in its export (an `import_hf` stage)."""
    source = config[name].get("tokenizer_from", "tokenizer")
    is_path = source.endswith((".model", ".json")) or (
        source not in config and (os.sep in source or os.path.isdir(source))
    )
    if is_path:
        if not os.path.exists(source):
            raise InputError(f"config key '{name}.tokenizer_from': {source} not found")
        return source
    folder = input_stage(config, name, "tokenizer_from", workdir, default="tokenizer")
    for where in (folder, os.path.join(folder, EXPORT_DIR)):  # an import_hf stage: its export
        for file in (TOKENIZER_FILE, HF_TOKENIZER_FILE):
            if os.path.exists(os.path.join(where, file)):
                return os.path.join(where, file)
    return os.path.join(folder, TOKENIZER_FILE)


def export_dir(config: ml_collections.ConfigDict, name: str, key: str, workdir: str) -> str:
    """The params export (params + model_config.json) named by `config.<name>.<key>`: a stage
    of this experiment, or a folder written by `python -m instructrl.convert`."""
    source = config[name].get(key, "")
    if source and os.path.exists(os.path.join(source, "model_config.json")):
        return source
    path = os.path.join(input_stage(config, name, key, workdir), EXPORT_DIR)
    if not os.path.isdir(path):
        raise InputError(f"config key '{name}.{key}': {path} has no exported params")
    return path


def resolve_path(path: str, workdir: str) -> str:
    """`@stage/rel/path` -> `<workdir>/stage/rel/path` (a file another stage wrote); other
    paths are returned unchanged. Comma-separated lists are resolved item by item."""
    if "," in path:
        return ",".join(resolve_path(p.strip(), workdir) for p in path.split(",") if p.strip())
    if path.startswith("@"):
        return os.path.join(workdir, path[1:])
    return path


def resolve_data_paths(data: ml_collections.ConfigDict, workdir: str) -> ml_collections.ConfigDict:
    """A copy of the data config with every `@stage/...` string resolved under `workdir`."""
    resolved = ml_collections.ConfigDict(data.to_dict())
    for key, value in data.items():
        if isinstance(value, str) and "@" in value:
            resolved[key] = resolve_path(value, workdir)
    return resolved


def build_data(kind: str, data_config: ml_collections.ConfigDict, tokenizer) -> BuiltDataset:
    """Builds (or reuses) the array_record dataset of `kind`: process 0 first, then the others
    find it prepared (they share the tfds folder)."""
    if jax.process_count() == 1:
        return build_dataset(kind, data_config, tokenizer)
    from jax.experimental import multihost_utils

    if jax.process_index() == 0:
        built = build_dataset(kind, data_config, tokenizer)
    multihost_utils.sync_global_devices(f"instructrl_build_{kind}")
    if jax.process_index() != 0:
        built = build_dataset(kind, data_config, tokenizer)
    return built
