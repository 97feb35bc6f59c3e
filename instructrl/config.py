"""Config files, big_vision-style arguments and command-line overrides.

An experiment is a Python file exposing `get_config(arg: str | None) -> ConfigDict`.
`load_config("experiments/x.py:size=small,smoke")` imports it and calls
`get_config("size=small,smoke")`; `apply_overrides` then applies `--config.a.b=c`
flags. Unknown keys are errors that name the key, never silently added.

The root config holds `seed`, `stages` (a list of stage names, run in order; on the
command line `--config.stages=a,b,c`),
`mesh`, `model`, `data`, and one section per stage. A stage section names its driver
with `kind` (e.g. the stage `ppo_ptx` has `kind="ppo"`), so one driver can run under
several names, each writing its own `DIR/<name>/` folder.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
from collections.abc import Sequence
from typing import Any

import ml_collections

from instructrl.errors import ConfigError


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
    """Parses a big_vision-style argument string: "size=small,smoke" -> {size: "small", smoke: True}.

    Keys given without a value are True. Values are converted to the type of the
    default where one is given; a key not in `defaults` is an error.
    """
    result = ml_collections.ConfigDict(dict(defaults))
    for item in (arg or "").split(","):
        item = item.strip()
        if not item:
            continue
        key, sep, value = item.partition("=")
        key = key.strip()
        if key not in defaults:
            known = ", ".join(sorted(defaults)) or "none"
            raise ConfigError(f"config argument '{key}' is unknown (known: {known})")
        if not sep:
            result[key] = True
        else:
            result[key] = _convert(value.strip(), defaults[key], f"config argument '{key}'")
    return result


def load_config(spec: str) -> ml_collections.ConfigDict:
    """Imports `path.py[:arg]` and returns its `get_config(arg)`."""
    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
        raise ConfigError(f"{path}: config file not found")
    module_name = "instructrl_config_" + os.path.splitext(os.path.basename(path))[0]
    spec_obj = importlib.util.spec_from_file_location(module_name, path)
    if spec_obj is None or spec_obj.loader is None:
        raise ConfigError(f"{path}: not a Python config file")
    module = importlib.util.module_from_spec(spec_obj)
    spec_obj.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"{path}: has no get_config(arg) function")
    config = module.get_config(arg or None)
    if not isinstance(config, ml_collections.ConfigDict):
        raise ConfigError(f"{path}: get_config must return an ml_collections.ConfigDict")
    return config


def apply_overrides(config: ml_collections.ConfigDict, overrides: Sequence[str]) -> None:
    """Applies "a.b=value" overrides in place. The key must exist; the value takes its type."""
    for override in overrides:
        key, sep, value = override.partition("=")
        if not sep:
            raise ConfigError(f"override '--config.{override}' needs the form --config.KEY=VALUE")
        parent, leaf = _walk(config, key)
        old = parent[leaf]
        if isinstance(old, ml_collections.ConfigDict):
            raise ConfigError(f"config key '{key}' is a section; set one of its keys instead")
        with parent.ignore_type():
            parent[leaf] = _convert(value, old, f"config key '{key}'")


def get_path(config: ml_collections.ConfigDict, key: str) -> Any:
    parent, leaf = _walk(config, key)
    return parent[leaf]


def to_json(config: ml_collections.ConfigDict) -> str:
    return json.dumps(config.to_dict(), indent=2, sort_keys=True, default=str)


def stage_names(config: ml_collections.ConfigDict) -> list[str]:
    """The stages to run, in order; each must have a section with a `kind`."""
    stages = config.stages
    items = stages.split(",") if isinstance(stages, str) else [str(s) for s in stages]
    names = [s.strip() for s in items if s.strip()]
    for name in names:
        if name not in config:
            raise ConfigError(f"config key 'stages' names '{name}' but there is no config.{name}")
        if "kind" not in config[name]:
            raise ConfigError(f"config key '{name}.kind' is missing (which driver runs this stage)")
    if len(set(names)) != len(names):
        raise ConfigError(f"config key 'stages' repeats a stage: {config.stages}")
    return names


def _walk(config: ml_collections.ConfigDict, key: str) -> tuple[ml_collections.ConfigDict, str]:
    parts = key.split(".")
    node = config
    for i, part in enumerate(parts[:-1]):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            raise ConfigError(f"config key '{'.'.join(parts[: i + 1])}' does not exist")
        node = node[part]
    leaf = parts[-1]
    if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
        section = ".".join(parts[:-1])
        known = (
            ", ".join(sorted(node.keys())) if isinstance(node, ml_collections.ConfigDict) else ""
        )
        where = f" (keys under {section or 'the root'}: {known})" if known else ""
        raise ConfigError(f"config key '{key}' does not exist{where}")
    return node, leaf


def _convert(value: str, like: Any, what: str) -> Any:
    """Converts a command-line string to the type of `like` (the current value)."""
    try:
        if isinstance(like, bool):
            if value.lower() in ("true", "1", "yes"):
                return True
            if value.lower() in ("false", "0", "no"):
                return False
            raise ValueError(value)
        if isinstance(like, int):
            return int(value)
        if isinstance(like, float):
            return float(value)
        if isinstance(like, str) or like is None:
            return value
        if isinstance(like, (tuple, list)):
            parsed = ast.literal_eval(value) if value.strip()[:1] in "([" else value.split(",")
            return type(like)(parsed)
    except (ValueError, SyntaxError) as e:
        raise ConfigError(f"{what}: cannot read '{value}' as {type(like).__name__}") from e
    raise ConfigError(f"{what}: cannot override a value of type {type(like).__name__}")
