"""Chat templates: a conversation -> the text a chat checkpoint was trained on.

    text = render(template, [{"role": "user", "content": "Hi"}], add_generation_prompt=True,
                  bos_token="<|begin_of_text|>")

Rendered as transformers' `apply_chat_template(..., tokenize=False)` renders: jinja2's
immutable sandbox with trim_blocks and lstrip_blocks, the loopcontrols extension, a
`{% generation %}` block tag (rendered as its body), `raise_exception(msg)`, `strftime_now`,
a `tojson` filter that does not escape HTML, and the variables `messages`,
`add_generation_prompt` and the tokenizer's special tokens (`bos_token`, `eos_token`, ...).
Chat templates of checkpoints are untrusted code: the sandbox is why jinja2 >= 3.1.6.

`template_from(setting, tokenizer)` resolves the config knob `data.chat_template`:
"none", "model" (the checkpoint's template) or a path to a `.jinja` file.

Not here: where a checkpoint keeps its template (hf_tokenizer.py), the data pipelines.
"""

from __future__ import annotations

import datetime
import functools
import json
from collections.abc import Mapping, Sequence
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from etils import epath
from jinja2.sandbox import ImmutableSandboxedEnvironment

from instructrl.errors import ConfigError, InputError

SETTINGS = ("none", "model")  # or a path to a .jinja file


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (marks assistant text for transformers'
    assistant masks): rendered as its body."""

    tags = {"generation"}  # noqa: RUF012 (jinja2's API is a class attribute)

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller: Any) -> str:
        return caller()


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    x: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    return json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.datetime.now().strftime(fmt)


@functools.lru_cache(maxsize=16)
def compile_template(template: str) -> jinja2.Template:
    """The compiled template (cached); a syntax error is a TemplateSyntaxError with its line."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(template)


def render(
    template: str,
    messages: Sequence[Mapping[str, str]],
    *,
    add_generation_prompt: bool = False,
    system: str | None = None,
    **variables: Any,
) -> str:
    """Renders a conversation through a chat template.

    messages: [{"role": "user" | "assistant" | "system", "content": str}, ...].
    system: prepended as a {"role": "system"} turn when given.
    add_generation_prompt: end with the header of an assistant turn (for sampling).
    variables: more template variables, e.g. bos_token="<s>", eos_token="</s>".
    A template's own `raise_exception` is a jinja2 TemplateError with the template's words.
    """
    turns = [{"role": "system", "content": system}] if system is not None else []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or not isinstance(m.get("role"), str):
            raise ValueError(f"messages[{i}]: expected {{'role': str, 'content': str}}, got {m!r}")
        if not isinstance(m.get("content"), str):
            raise ValueError(f"messages[{i}]: 'content' must be a string, got {m.get('content')!r}")
        turns.append(dict(m))
    return compile_template(template).render(
        messages=turns, add_generation_prompt=add_generation_prompt, **variables
    )


def template_from(setting: str, tokenizer: Any, *, key: str = "data.chat_template") -> str | None:
    """The template named by a config value: None for "none", the tokenizer's
    `chat_template` for "model", else the text of a `.jinja` file (checked to compile)."""
    if setting == "none":
        return None
    if setting == "model":
        template = getattr(tokenizer, "chat_template", None)
        if template is None:
            raise ConfigError(
                f"config key '{key}' = 'model': {tokenizer!r} has no chat template "
                "(give a .jinja file; SentencePiece models never have one)"
            )
        return template
    if not setting.endswith(".jinja"):
        raise ConfigError(
            f"config key '{key}' = {setting!r}: expected 'none', 'model' or a .jinja file"
        )
    path = epath.Path(setting)
    if not path.exists():
        raise ConfigError(f"config key '{key}': {setting} not found")
    template = path.read_text(encoding="utf-8")
    try:
        compile_template(template)
    except jinja2.TemplateSyntaxError as e:
        raise InputError(
            f"{setting}:{e.lineno}: not a valid jinja2 template ({e.message})"
        ) from None
    return template
