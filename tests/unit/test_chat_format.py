"""data.chat_template wired into the pipelines (instructrl/chat_format.py): SFT rows and their
loss mask, RM rows and PPO prompts against transformers' apply_chat_template, token by token,
on a Qwen3-style tokenizer trained here; the dataset cache key; the errors."""

import json

import pytest
from tokenizers import Tokenizer as RawTokenizer

from instructrl import chat_format, tokenizer
from instructrl.data import (
    build_dataset,
    default_data_config,
    ppo_pipeline,
    rm_pipeline,
    sft_pipeline,
)
from instructrl.errors import ConfigError
from tests.unit.test_hf_tokenizer import QWEN_REGEX, _byte_level_bpe, _save

transformers = pytest.importorskip("transformers")

# Qwen3's layout without tools: every assistant turn opens with an empty think block, which
# the generation prompt does not hold (the model writes it). {% generation %} marks what
# transformers' assistant mask covers: the assistant's text and its <|im_end|>.
QWEN3_TEMPLATE = """{%- for message in messages %}
{%- if message.role == 'assistant' %}
{{- '<|im_start|>assistant\\n' }}{% generation %}{{- '<think>\\n\\n</think>\\n\\n' + message.content + '<|im_end|>' }}{% endgeneration %}{{- '\\n' }}
{%- else %}
{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}
"""
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
HH = "\n\nHuman: hi there\n\nAssistant: Hello! 🤖\n\nHuman: name a colour\n\nAssistant:"
DEMOS = [
    {"prompt": "What is 2 + 2?", "completion": "4, of course."},
    {"prompt": HH, "completion": " Blue, like the sky."},
    {"prompt": "\n\nHuman: Translate\n\nbonjour\n\nAssistant:", "completion": " hello"},
]
COMPARISONS = [
    {"prompt": "What is 2 + 2?", "chosen": " 4", "rejected": " five"},
    {"prompt": HH, "responses": ["Blue.", "", "I cannot say."], "ranking": [0, 2, 1]},
]


def qwen3_folder(root, template: str = QWEN3_TEMPLATE) -> str:
    """A Qwen3-style tokenizer folder: byte-level BPE, <|im_end|> ends turns, no BOS."""
    raw = _byte_level_bpe(QWEN_REGEX, SPECIALS)
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "chat_template": template,
    }
    return _save(root, raw, tokenizer_config__json=config)


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    folder = qwen3_folder(root / "qwen3")
    files = {"demonstrations": DEMOS, "comparisons": COMPARISONS, "prompts": DEMOS}
    for kind, rows in files.items():
        (root / f"{kind}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = default_data_config()
    data.update(
        dir=str(root), tfds_dir=str(root / "tfds"), chat_template="model", seq_len=128,
        max_prompt_len=96, max_response_len=31, validation_fraction=0.0, pack=False,
    )  # fmt: skip
    ref = transformers.AutoTokenizer.from_pretrained(folder)
    return tokenizer.load(folder), ref, data, root


def _reference(ref, prompt: str, response: str) -> tuple[list[int], list[int]]:
    """transformers' ids and assistant mask of the conversation prompt + response."""
    messages = [*chat_format.turns(prompt), {"role": "assistant", "content": response.strip()}]
    out = ref.apply_chat_template(
        messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    return list(out["input_ids"]), list(out["assistant_masks"])


def _reference_prompt(ref, prompt: str) -> list[int]:
    return ref.apply_chat_template(
        chat_format.turns(prompt), add_generation_prompt=True, return_dict=False
    )


def test_turns_of_the_hh_layout():
    assert chat_format.turns(" Plain prompt\n") == [{"role": "user", "content": "Plain prompt"}]
    assert chat_format.turns(HH) == [
        {"role": "user", "content": "hi there"},
        {"role": "assistant", "content": "Hello! 🤖"},
        {"role": "user", "content": "name a colour"},
    ]


def test_sft_rows_and_loss_mask_match_transformers(qwen3):
    """Each SFT row is transformers' conversation ids up to the final <|im_end|>, and the loss
    mask is 1 exactly on the final assistant turn's tokens and its <|im_end|>."""
    tok, ref, data, _ = qwen3
    chat = chat_format.for_data(tok, data)
    assert tok.id_to_piece(chat.stop_id) == "<|im_end|>"
    built = build_dataset("demonstrations", data, tok)
    batch = next(sft_pipeline(built, tok, data, batch_size=len(DEMOS), shuffle=False))
    for i, rec in enumerate(DEMOS):
        n = int(batch["mask"][i].sum())
        seq = [*batch["tokens"][i, :n].tolist(), int(batch["targets"][i, n - 1])]
        ids, assistant = _reference(ref, rec["prompt"], rec["completion"])
        assert ids[: len(seq)] == seq
        assert ref.decode(ids[len(seq) :]) == "\n"  # after the stop token: no turn's text
        prompt_len = len(_reference_prompt(ref, rec["prompt"]))
        # Per position of seq: is it a target the loss counts? Earlier assistant turns (HH
        # history) are prompt, not completion.
        ours = [0, *batch["loss_mask"][i, :n].tolist()]
        want = [m if j >= prompt_len else 0 for j, m in enumerate(assistant[: len(seq)])]
        assert ours == want, rec
        assert sum(ours) == len(seq) - prompt_len and seq[-1] == chat.stop_id


def test_rm_rows_end_at_the_stop_token_and_prompts_are_rendered(qwen3):
    tok, ref, data, _ = qwen3
    chat = chat_format.for_data(tok, data)
    built = build_dataset("comparisons", data, tok)
    batch = next(rm_pipeline(built, tok, data, batch_size=2, shuffle=False))
    for b, rec in enumerate(COMPARISONS):
        responses = rec.get("responses") or [rec["chosen"], rec["rejected"]]
        for k, response in enumerate(responses):
            n = int(batch["mask"][b, k].sum())
            row = batch["tokens"][b, k, :n].tolist()
            ids, _ = _reference(ref, rec["prompt"], response)
            assert row == ids[:n] and row[-1] == chat.stop_id  # the RM reads <|im_end|>
    prompts = build_dataset("prompts", data, tok)
    batch = next(ppo_pipeline(prompts, tok, data, batch_size=3, shuffle=False, num_epochs=1))
    for i, rec in enumerate(DEMOS):
        want = _reference_prompt(ref, rec["prompt"])
        mask = batch["prompt_mask"][i]
        assert batch["prompt_tokens"][i][mask > 0].tolist() == want
        assert mask[: len(mask) - len(want)].sum() == 0  # left-padded


def test_cache_key_follows_the_template(qwen3, tmp_path):
    """A changed template (or setting) builds new records; the same one reuses them; plain
    records keep their name."""
    tok, _, data, _ = qwen3
    path = tmp_path / "chat.jinja"
    path.write_text(QWEN3_TEMPLATE)
    paths = {}
    for setting in ("none", "model", str(path)):
        data.chat_template = setting
        paths[setting] = build_dataset("demonstrations", data, tok).path
    assert paths["none"] != paths["model"] == paths[str(path)]  # same text, same stop token
    path.write_text(QWEN3_TEMPLATE.replace("<think>", "<reasoning>"))
    changed = build_dataset("demonstrations", data, tok)
    assert changed.path not in paths.values()
    assert changed.stats.records == len(DEMOS)
    data.chat_template = "model"


def test_errors(qwen3, tmp_path):
    tok, _, _, root = qwen3
    path = tmp_path / "chat.jinja"
    path.write_text(QWEN3_TEMPLATE)
    sentencepiece = tokenizer.Tokenizer.__new__(tokenizer.Tokenizer)  # any other backend
    with pytest.raises(ConfigError, match=r"'data\.chat_template' = '.*chat\.jinja': chat tem"):
        chat_format.ChatFormat(sentencepiece, str(path))
    # A generation prompt the rendered assistant turn does not start with.
    bot = "{{- '<|im_start|>bot\\n' }}{%- endif"
    path.write_text(QWEN3_TEMPLATE.replace("{{- '<|im_start|>assistant\\n' }}{%- endif", bot))
    chat = chat_format.ChatFormat(tok, str(path))
    with pytest.raises(ConfigError, match=r"generation prompt is not the start of the assistant"):
        chat.response_ids("hi", "hello")
    # No special token after an assistant message: the stop is EOS; the rendered turn lacks it.
    raw = RawTokenizer.from_file(f"{root}/qwen3/tokenizer.json")
    plain_end = QWEN3_TEMPLATE.replace("'<|im_end|>' }}{% endgeneration", "'.' }}{% endgeneration")
    folder = _save(tmp_path / "t", raw, tokenizer_config__json={
        "eos_token": "<|endoftext|>", "chat_template": plain_end})  # fmt: skip
    chat = chat_format.ChatFormat(tokenizer.load(folder), "model")
    assert chat.tokenizer.id_to_piece(chat.stop_id) == "<|endoftext|>"
    with pytest.raises(ConfigError, match=r"rendered assistant turn has no stop token"):
        chat.response_ids("hi", "hello")
