"""The eval stage's model list: `eval.models` entries `[SIZE: ]LABEL=STAGE[:fewshot]` parsed
into `ModelSpec`s (the format is described in instructrl/stages/evaluate.py)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from instructrl.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    size: str  # size group tag ("" in a one-size run without one)
    label: str  # model type, e.g. "PPO-ptx"
    stage: str
    fewshot: bool = False


def parse_models(models: str | Sequence[str], key: str) -> list[ModelSpec]:
    """A list of `[SIZE: ]LABEL=STAGE[:fewshot]` entries, or the same as one string with
    `,` or `;` between entries, -> specs in order (see the module doc). An entry without a
    size tag belongs to the size of the entry before it ("" at the start)."""
    text = models if isinstance(models, str) else ",".join(models)
    specs: list[ModelSpec] = []
    size = ""
    for item in (i.strip() for i in text.replace(";", ",").split(",")):
        if not item:
            continue
        head, sep, rest = item.partition(":")
        if sep and "=" not in head:
            size, item = head.strip(), rest.strip()
            if not size:
                raise ConfigError(f"config key '{key}': empty size tag in '{head}:{rest}'")
        label, sep, target = (s.strip() for s in item.partition("="))
        stage, _, variant = (s.strip() for s in target.partition(":"))
        if not sep or not label or not stage:
            raise ConfigError(f"config key '{key}': '{item}' is not LABEL=STAGE[:fewshot]")
        if variant not in ("", "fewshot"):
            raise ConfigError(f"config key '{key}': '{item}': unknown variant ':{variant}'")
        specs.append(ModelSpec(size, label, stage, variant == "fewshot"))
    if not specs:
        raise ConfigError(f"config key '{key}' lists no models")
    seen = set()
    for s in specs:
        if (s.size, s.label) in seen:
            raise ConfigError(f"config key '{key}': model '{s.label}' twice in size '{s.size}'")
        seen.add((s.size, s.label))
    return specs


def stage_list(text: str) -> list[str]:
    return [s.strip() for s in text.split(",") if s.strip()]
