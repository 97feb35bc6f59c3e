"""How a record's prompt and responses become token ids: plain, or through a chat template.

    fmt = ChatFormat(tokenizer, config.data.chat_template)    # "none" | "model" | path.jinja
    fmt.prompt_ids(prompt)               # what the policy samples from
    fmt.response_ids(prompt, response)   # the assistant turn's tokens, stop token excluded
    fmt.stop_id                          # the token that ends a response
    fmt.response_text(prompt, ids)       # sampled ids (stop excluded) -> the reply's text

Plain ("none"): prompt_ids = [BOS] prompt (no BOS when the tokenizer has none), response_ids
= the response's tokens, stop_id = EOS: the `[BOS] prompt response [EOS]` layout.

Chat template ("model": the checkpoint's; or a `.jinja` file; a tokenizer.json tokenizer is
needed, the special tokens a template writes being added tokens there):
  turns         a prompt in the HH turn layout ("\\n\\nHuman: a\\n\\nAssistant: b\\n\\nHuman:
                c\\n\\nAssistant:", what `instructrl.data.convert` writes for HH-RLHF and
                Alpaca) becomes alternating user/assistant turns [a, b, c]; any other prompt
                one user turn. Turn texts and responses are stripped of surrounding
                whitespace (HH responses start with a space that belongs to the layout).
  prompt_ids    the turns rendered with the generation prompt (the template writes BOS when
                the model has one), tokenised.
  response_ids  what the template writes after that generation prompt for one more
                assistant message holding the response (e.g. Qwen3's empty think block, then
                the response), tokenised, up to its end-of-turn token: stop_id, the special
                token the template writes right after an assistant message's content
                (<|im_end|>, <|eot_id|>). What follows the stop token (Qwen's "\\n") belongs
                to no turn.
So SFT's loss covers exactly the assistant completion + stop_id, the RM reads every row at
its stop token, and PPO samples from the generation prompt until stop_id. Prompt and
response are tokenised apart, as sampling sees them (the policy continues the prompt's ids);
for the templates of supported checkpoints the ids equal transformers' apply_chat_template
of the whole conversation, the turn markers being special tokens.

Not here: rendering (chat_template.py), where a checkpoint keeps its template
(hf_tokenizer.py).
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

from instructrl import chat_template
from instructrl.errors import ConfigError

_HH_TURN = re.compile(r"\n\n(Human|Assistant):")
_ROLES = {"Human": "user", "Assistant": "assistant"}


def turns(prompt: str) -> list[dict[str, str]]:
    """The conversation a prompt holds (module docstring): HH turn layout -> its turns,
    else one user turn. The HH layout's final empty "Assistant:" slot is the one to fill."""
    if not prompt.startswith("\n\nHuman:"):
        return [{"role": "user", "content": prompt.strip()}]
    parts = _HH_TURN.split(prompt)[1:]  # [role, text, role, text, ...]
    messages = [
        {"role": _ROLES[role], "content": text.strip()}
        for role, text in zip(parts[::2], parts[1::2], strict=True)
    ]
    if messages[-1]["role"] == "assistant" and not messages[-1]["content"]:
        messages.pop()
    return messages


class ChatFormat:
    """Token ids of prompts and responses under `setting` (module docstring). Picklable (the
    grain maps carry it into worker processes)."""

    def __init__(self, tokenizer: Any, setting: str = "none", *, key: str = "data.chat_template"):
        self.tokenizer = tokenizer
        self.setting = setting
        self._key = key
        self.template = chat_template.template_from(setting, tokenizer, key=key)
        if self.template is None:
            self.stop_id: int = tokenizer.eos_id
            return
        from instructrl.hf_tokenizer import HFTokenizer

        if not isinstance(tokenizer, HFTokenizer):
            raise ConfigError(
                f"config key '{key}' = {setting!r}: chat templates need a Hugging Face "
                f"tokenizer.json tokenizer, not a {type(tokenizer).__name__}"
            )
        where = "the checkpoint's chat template" if setting == "model" else setting
        self.stop_id = tokenizer.turn_end(self.template, where)
        if self.stop_id < 0:
            raise ConfigError(
                f"config key '{key}' = {setting!r}: the template writes no special token after "
                f"an assistant message and {tokenizer!r} has no EOS to stop on"
            )

    @property
    def plain(self) -> bool:
        return self.template is None

    def fingerprint(self) -> dict[str, Any] | None:
        """What the built records depend on (None for plain): the template text's hash and
        the stop token, so a changed template never reuses stale records."""
        if self.template is None:
            return None
        digest = hashlib.sha256(self.template.encode("utf-8")).hexdigest()
        return {"template_sha256": digest, "stop_id": self.stop_id}

    def _render(self, messages: list[dict[str, str]], generation_prompt: bool) -> str:
        return chat_template.render(
            self.template,
            messages,
            add_generation_prompt=generation_prompt,
            **self.tokenizer.special_tokens,
        )

    def prompt_text(self, prompt: str) -> str:
        """The rendered prompt (plain: the prompt itself, without BOS)."""
        if self.template is None:
            return prompt
        return self._render(turns(prompt), True)

    def prompt_ids(self, prompt: str) -> list[int]:
        tok = self.tokenizer
        if self.template is None:
            return [tok.bos_id, *tok.encode(prompt)] if tok.bos_id >= 0 else tok.encode(prompt)
        return tok.encode(self.prompt_text(prompt))

    def response_ids(self, prompt: str, response: str) -> list[int]:
        """The response's ids as the policy emits them after prompt_ids, stop token excluded."""
        tok = self.tokenizer
        if self.template is None:
            return tok.encode(response)
        messages = turns(prompt)
        head = self._render(messages, True)
        full = self._render([*messages, {"role": "assistant", "content": response.strip()}], False)
        if not full.startswith(head):
            raise ConfigError(
                f"config key '{self._key}' = {self.setting!r}: the template's generation prompt "
                "is not the start of the assistant turn it renders, so a sampled response "
                "cannot continue it"
            )
        ids = tok.encode(full[len(head) :])
        ends = [i for i, t in enumerate(ids) if t == self.stop_id]
        if not ends:
            raise ConfigError(
                f"config key '{self._key}' = {self.setting!r}: the rendered assistant turn has "
                f"no stop token {tok.id_to_piece(self.stop_id)!r}"
            )
        return ids[: ends[-1]]

    def response_text(self, prompt: str, ids: list[int]) -> str:
        """The text of a sampled response's ids (stop token excluded): plain, their decoding;
        with a template, without the framing the template writes before an assistant
        message's content (Qwen3's empty think block) when the response starts with it, so
        judges and readers see the reply alone and `response_ids(prompt, text)` gives the
        ids back."""
        text = self.tokenizer.decode(list(ids))
        if self.template is None:
            return text
        prefix = self._response_prefix(prompt)
        return text[len(prefix) :] if prefix and text.startswith(prefix) else text

    def _response_prefix(self, prompt: str) -> str:
        messages = turns(prompt)
        head = self._render(messages, True)
        reply = [*messages, {"role": "assistant", "content": _SENTINEL}]
        full = self._render(reply, False)
        return full[len(head) :].split(_SENTINEL)[0] if full.startswith(head) else ""


_SENTINEL = "INSTRUCTRL_REPLY_CONTENT"


def for_data(tokenizer: Any, data_config: Any) -> ChatFormat:
    """The ChatFormat of a `config.data` section."""
    return ChatFormat(tokenizer, data_config.get("chat_template", "none"))
