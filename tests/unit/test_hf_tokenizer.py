"""The tokenizer.json backend and chat templates against transformers, on tokenizers trained
here (no Hub): GPT-2-style, Llama-3-style and Qwen-style byte-level BPEs."""

import json
import pickle
import re
import unicodedata
from pathlib import Path

import jinja2
import numpy as np
import pytest
from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as RawTokenizer

from instructrl import chat_template, tokenizer
from instructrl.data.records import tokenizer_fingerprint
from instructrl.errors import ConfigError, InputError
from instructrl.hf_tokenizer import HFTokenizer
from instructrl.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")

UNICODE_CASES = [
    "Hello, world!",
    " leading space",
    "   three leading spaces and trailing  ",
    "line one\nline two\n\n\nafter blank lines\r\nwindows",
    "\ttab\tseparated\t\tcolumns\t",
    "emoji 🤖🎉 and a family 👨‍👩‍👧 and flags 🇯🇵",
    "中文：你好，世界！日本語のテキスト、東京タワー。한국어 문장",
    "café naïve résumé e\u0301 Ωμέγα русский",
    "numbers 1234567890 3.14159 1e-9",
    "code: def f(x):\n    return x ** 2  # comment",
    "mixed 🤖東京\t \n 😀 end",
    "x",
    "",
]
CORPUS = UNICODE_CASES * 20 + [
    "the quick brown fox jumps over the lazy dog " * 3,
    "The assistant answers the user's question politely and helpfully.",
    "Instruction following with reinforcement learning from human feedback.",
]

LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN_REGEX = LLAMA3_REGEX.replace(r"\p{N}{1,3}", r"\p{N}")

# Qwen2.5's template without tools: a default system turn when there is none.
QWEN_TEMPLATE = """{%- if messages[0]['role'] == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
{%- else %}
    {{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if not (message.role == 'system' and loop.first) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""
# Llama-3-Instruct's template: bos_token first, content trimmed.
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] "
    "| trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}"
    "{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
# Block tags on their own, indented lines: correct only with trim_blocks and lstrip_blocks.
# Also raise_exception, loop controls and a {% generation %} block.
BLOCK_TEMPLATE = """{% for message in messages %}
  {% if message['role'] not in ['system', 'user', 'assistant'] %}
    {{ raise_exception('unknown role ' + message['role']) }}
  {% endif %}
  {% if message['role'] == 'assistant' %}
<|im_start|>assistant
{% generation %}{{ message['content'] }}<|im_end|>{% endgeneration %}

  {% else %}
<|im_start|>{{ message['role'] }}
{{ message['content'] }}<|im_end|>
  {% endif %}
  {% if loop.index > 50 %}{% break %}{% endif %}
{% endfor %}
{% if add_generation_prompt %}
<|im_start|>assistant
{% endif %}
"""


def _byte_level_bpe(pattern: str | None, specials: list[str], vocab_size: int = 600):
    tok = RawTokenizer(models.BPE(ignore_merges=pattern is not None))
    if pattern is None:  # GPT-2: ByteLevel's own regex
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    return tok


def _save(folder, tok, **files) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    for name, content in files.items():
        name = name.replace("__", ".")
        text = content if isinstance(content, str) else json.dumps(content)
        (folder / name).write_text(text, encoding="utf-8")
    return str(folder)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    gpt2 = _byte_level_bpe(None, ["<|endoftext|>"])
    gpt2.post_processor = processors.ByteLevel(trim_offsets=False)
    eot = "<|endoftext|>"
    llama3_specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>"]
    llama3_specials += ["<|end_header_id|>", "<|eot_id|>"]
    llama = _byte_level_bpe(LLAMA3_REGEX, llama3_specials)
    bos = llama.token_to_id("<|begin_of_text|>")
    llama.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A",
        pair="<|begin_of_text|> $A <|begin_of_text|> $B",
        special_tokens=[("<|begin_of_text|>", bos)],
    )
    qwen = _byte_level_bpe(QWEN_REGEX, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    qwen.normalizer = normalizers.NFC()
    fast = "PreTrainedTokenizerFast"
    return {
        "gpt2": _save(
            root / "gpt2",
            gpt2,
            tokenizer_config__json={"tokenizer_class": fast, "model_max_length": 1024},
            special_tokens_map__json={"bos_token": eot, "eos_token": eot, "unk_token": eot},
        ),
        "llama3": _save(
            root / "llama3",
            llama,
            tokenizer_config__json={
                "tokenizer_class": fast,
                "bos_token": "<|begin_of_text|>",
                "eos_token": {"__type": "AddedToken", "content": "<|eot_id|>", "special": True},
            },
            generation_config__json={
                "bos_token_id": bos,
                "eos_token_id": [
                    llama.token_to_id("<|end_of_text|>"),
                    llama.token_to_id("<|eot_id|>"),
                ],
            },
            chat_template__jinja=LLAMA3_TEMPLATE,
        ),
        "qwen": _save(
            root / "qwen",
            qwen,
            tokenizer_config__json={
                "tokenizer_class": fast,
                "bos_token": None,
                "eos_token": "<|im_end|>",
                "pad_token": "<|endoftext|>",
                "chat_template": QWEN_TEMPLATE,
            },
            generation_config__json={
                "eos_token_id": [qwen.token_to_id("<|im_end|>"), qwen.token_to_id("<|endoftext|>")]
            },
        ),
    }


@pytest.fixture(scope="module")
def reference(folders):
    return {k: transformers.AutoTokenizer.from_pretrained(v) for k, v in folders.items()}


KINDS = ["gpt2", "llama3", "qwen"]


@pytest.mark.parametrize("kind", KINDS)
def test_ids_match_transformers(folders, reference, kind):
    tok, ref = tokenizer.load(folders[kind]), reference[kind]
    assert isinstance(tok, HFTokenizer)
    texts = [*UNICODE_CASES, "".join(UNICODE_CASES), "<|endoftext|> special <|im_end|>\n"]
    for text in texts:
        assert tok.encode(text) == ref.encode(text, add_special_tokens=False), repr(text)
    assert tok.vocab_size == len(ref)
    for i in range(tok.vocab_size):
        assert tok.id_to_piece(i) == ref.convert_ids_to_tokens(i)


@pytest.mark.parametrize("kind", KINDS)
def test_round_trip_and_batches(folders, kind):
    tok = tokenizer.load(folders[kind])
    normal = (lambda s: unicodedata.normalize("NFC", s)) if kind == "qwen" else (lambda s: s)
    for text in UNICODE_CASES:
        assert tok.decode(tok.encode(text)) == normal(text), repr(text)
    a, b = "Question: 東京?\n", " Answer 🤖 ok"
    assert tok.decode(tok.encode(a) + tok.encode(b)) == a + b
    tokens, mask = tok.encode_batch(UNICODE_CASES, max_len=64, padding="left", add_eos=True)
    assert tokens.shape == (len(UNICODE_CASES), 64) and tokens.dtype == np.int32
    assert (tokens[mask == 0] == tok.pad_id).all()
    assert tok.decode_batch(tokens, mask) == [normal(t) for t in UNICODE_CASES]
    for row, m, text in zip(tokens, mask, UNICODE_CASES, strict=True):
        assert row[m > 0].tolist() == tok.encode(text, add_eos=True)


def test_special_token_ids(folders, reference):
    for kind in KINDS:
        tok, ref = tokenizer.load(folders[kind]), reference[kind]
        assert tok.bos_id == (ref.bos_token_id if ref.bos_token_id is not None else -1), kind
        assert tok.eos_id == ref.eos_token_id, kind
        assert tok.has_pad == (ref.pad_token_id is not None), kind
        if tok.has_pad:
            assert tok.pad_id == ref.pad_token_id
    piece = lambda tok, i: tok.id_to_piece(i)  # noqa: E731
    gpt2, llama, qwen = (tokenizer.load(folders[k]) for k in KINDS)
    assert piece(gpt2, gpt2.stop_id) == "<|endoftext|>" and gpt2.stop_ids == (gpt2.eos_id,)
    assert gpt2.pad_id == gpt2.unk_id == gpt2.eos_id  # GPT-2: one token for all of them

    # Llama-3: no pad token -> bos (decode drops it, a left-padded prompt does not end early).
    assert (piece(llama, llama.bos_id), piece(llama, llama.stop_id)) == (
        "<|begin_of_text|>",
        "<|eot_id|>",
    )
    assert not llama.has_pad and llama.pad_id == llama.bos_id and llama.unk_id == -1
    assert [piece(llama, i) for i in llama.stop_ids] == ["<|eot_id|>", "<|end_of_text|>"]
    assert llama.decode([llama.pad_id, *llama.encode("hi"), llama.eos_id, 7]) == "hi"
    with pytest.raises(ValueError, match="has no bos token"):
        qwen.encode("x", add_bos=True)

    # Qwen: the end-of-turn token ends an assistant message; pad is <|endoftext|>.
    assert piece(qwen, qwen.stop_id) == "<|im_end|>" == piece(qwen, qwen.eos_id)
    assert [piece(qwen, i) for i in qwen.stop_ids] == ["<|im_end|>", "<|endoftext|>"]
    assert piece(qwen, qwen.pad_id) == "<|endoftext|>" and qwen.bos_id == -1


def test_stop_id_from_the_chat_template(folders, tmp_path):
    """A base checkpoint whose eos is <|endoftext|> but whose template ends turns with
    <|im_end|>: the template decides."""
    config = json.loads(Path(folders["qwen"], "tokenizer_config.json").read_text())
    config.update(eos_token="<|endoftext|>", chat_template=BLOCK_TEMPLATE)
    raw = RawTokenizer.from_file(f"{folders['qwen']}/tokenizer.json")
    tok = tokenizer.load(_save(tmp_path / "base", raw, tokenizer_config__json=config))
    assert tok.id_to_piece(tok.eos_id) == "<|endoftext|>"
    assert tok.id_to_piece(tok.stop_id) == "<|im_end|>"
    assert tok.stop_ids == (tok.stop_id, tok.eos_id)


@pytest.mark.parametrize("kind", KINDS)
def test_pickle_and_fingerprint(folders, kind):
    tok = tokenizer.load(folders[kind])
    tok2 = pickle.loads(pickle.dumps(tok))
    assert repr(tok2) == repr(tok) and tok2.stop_ids == tok.stop_ids
    assert tok2.chat_template == tok.chat_template
    for text in UNICODE_CASES:
        assert tok2.encode(text) == tok.encode(text)
    assert tokenizer_fingerprint(tok2) == tokenizer_fingerprint(tok)
    others = {tokenizer_fingerprint(tokenizer.load(folders[k])) for k in KINDS if k != kind}
    assert tokenizer_fingerprint(tok) not in others


CONVERSATIONS = {
    "user only": [{"role": "user", "content": "What is 2 + 2?"}],
    "multi turn": [
        {"role": "user", "content": "Hi 🤖\n  indented"},
        {"role": "assistant", "content": " Hello! 你好 "},
        {"role": "user", "content": "Tabs\there"},
    ],
}


@pytest.mark.parametrize("generation_prompt", [False, True])
@pytest.mark.parametrize("system", [None, "You are terse.\nAnswer in one line."])
@pytest.mark.parametrize("which", ["qwen", "llama3", "block"])
def test_chat_template_matches_transformers(folders, reference, which, system, generation_prompt):
    kind = "qwen" if which == "block" else which
    tok, ref = tokenizer.load(folders[kind]), reference[kind]
    template = BLOCK_TEMPLATE if which == "block" else None
    for name, messages in CONVERSATIONS.items():
        full = ([{"role": "system", "content": system}] if system else []) + messages
        want = ref.apply_chat_template(
            full, tokenize=False, add_generation_prompt=generation_prompt, chat_template=template
        )
        got = tok.apply_chat_template(
            full, add_generation_prompt=generation_prompt, template=template
        )
        assert got == want, name
        variables = tok.special_tokens
        rendered = chat_template.render(
            template or tok.chat_template,
            messages,
            system=system,
            add_generation_prompt=generation_prompt,
            **variables,
        )
        assert rendered == want, name
        # The rendered text tokenises to the template's control tokens, as transformers does.
        assert tok.encode(got) == ref.apply_chat_template(
            full, tokenize=True, add_generation_prompt=generation_prompt, chat_template=template,
            return_dict=False,
        )  # fmt: skip


def test_chat_template_errors(folders, tmp_path):
    tok = tokenizer.load(folders["qwen"])
    bad = [{"role": "tool", "content": "x"}]
    with pytest.raises(jinja2.TemplateError, match="unknown role tool"):
        tok.apply_chat_template(bad, template=BLOCK_TEMPLATE)
    with pytest.raises(ValueError, match=r"messages\[0\]: 'content' must be a string"):
        chat_template.render(QWEN_TEMPLATE, [{"role": "user", "content": None}])
    # The sandbox: no attribute access to Python internals.
    with pytest.raises(jinja2.exceptions.SecurityError):
        chat_template.render("{{ messages.__class__.__mro__ }}", [])
    with pytest.raises(jinja2.exceptions.SecurityError):
        chat_template.render("{{ messages.append(1) }}", [])
    assert chat_template.render(
        "{{ messages | tojson }}", [{"role": "user", "content": "<é>"}]
    ) == ('[{"role": "user", "content": "<é>"}]')


def test_template_from_config_setting(folders, tmp_path):
    qwen = tokenizer.load(folders["qwen"])
    assert chat_template.template_from("none", qwen) is None
    assert chat_template.template_from("model", qwen) == QWEN_TEMPLATE
    path = tmp_path / "chat.jinja"
    path.write_text(BLOCK_TEMPLATE)
    assert chat_template.template_from(str(path), qwen) == BLOCK_TEMPLATE
    gpt2 = tokenizer.load(folders["gpt2"])
    with pytest.raises(ConfigError, match=r"'data\.chat_template' = 'model': .* no chat template"):
        chat_template.template_from("model", gpt2)
    with pytest.raises(ConfigError, match=r"expected 'none', 'model' or a \.jinja file"):
        chat_template.template_from("chatml", gpt2)
    with pytest.raises(ConfigError, match=r"missing\.jinja not found"):
        chat_template.template_from(str(tmp_path / "missing.jinja"), gpt2)
    broken = tmp_path / "broken.jinja"
    broken.write_text("line one\n{% for m in messages %}\n{{ m }\n")
    with pytest.raises(InputError, match=re.escape(f"{broken}:3: not a valid jinja2 template")):
        chat_template.template_from(str(broken), gpt2)


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("sp")
    text = root / "corpus.txt"
    text.write_text("\n".join(CORPUS[-3:] * 20))
    return Tokenizer.train([str(text)], 300, str(root / "tok"))


def test_loader_picks_the_backend(folders, sp_model, tmp_path):
    assert type(tokenizer.load(sp_model)) is Tokenizer
    assert tokenizer.load(sp_model).stop_id == tokenizer.load(sp_model).eos_id
    assert type(tokenizer.load(folders["llama3"])) is HFTokenizer
    by_file = tokenizer.load(f"{folders['llama3']}/tokenizer.json")
    assert (
        type(by_file) is HFTokenizer and by_file.eos_id == tokenizer.load(folders["llama3"]).eos_id
    )
    both = tmp_path / "both"
    both.mkdir()
    (both / "tokenizer.model").write_bytes(Path(sp_model).read_bytes())
    (both / "tokenizer.json").write_text(Path(folders["gpt2"], "tokenizer.json").read_text())
    assert type(tokenizer.load(both)) is Tokenizer  # tokenizer.model first, as before
    assert sorted(tokenizer.tokenizer_files(both)) == ["tokenizer.json", "tokenizer.model"]
    assert sorted(tokenizer.tokenizer_files(folders["llama3"])) == [
        "chat_template.jinja",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    assert tokenizer.tokenizer_files(sp_model) == {"tokenizer.model": sp_model}
    assert tokenizer.load(folders["qwen"], pad_id=5).pad_id == 5
    with pytest.raises(
        FileNotFoundError, match=re.escape(f"{tmp_path}: no tokenizer.model or tokenizer.json")
    ):
        tokenizer.load(tmp_path)


def test_missing_and_corrupt_tokenizer_json(folders, tmp_path):
    missing = tmp_path / "nope" / "tokenizer.json"
    with pytest.raises(FileNotFoundError, match=re.escape(f"{missing}: tokenizer file not found")):
        tokenizer.load(missing)
    cases = [
        ('{\n  "version": "1.0",\n  truncated', r":3: invalid JSON \(Expecting"),
        (
            '{"version": "1.0", "model": {"type": "BPE"}}',
            r": not a valid Hugging Face tokenizer \(",
        ),
        ("[1, 2]", r": expected a JSON object, got list"),
        ("", r":1: invalid JSON"),
    ]
    for i, (content, reason) in enumerate(cases):
        folder = tmp_path / f"bad{i}"
        folder.mkdir()
        (folder / "tokenizer.json").write_text(content)
        with pytest.raises(
            InputError, match=re.escape(str(folder / "tokenizer.json")) + reason
        ) as e:
            tokenizer.load(folder)
        assert "\n" not in str(e.value)
    # A special token that is not in the vocabulary, a broken config file.
    raw = RawTokenizer.from_file(f"{folders['gpt2']}/tokenizer.json")
    folder = _save(tmp_path / "badcfg", raw, tokenizer_config__json={"eos_token": "</s>"})
    with pytest.raises(
        InputError, match=r"badcfg/tokenizer_config.json: eos_token '</s>' is not in"
    ):
        tokenizer.load(folder)
    folder = _save(tmp_path / "badjson", raw, generation_config__json="{oops")
    with pytest.raises(InputError, match=r"badjson/generation_config.json:1: invalid JSON"):
        tokenizer.load(folder)


def test_a_chat_template_that_cannot_render_one_turn_is_an_error(folders, tmp_path):
    """No silent stop-token fallback: the end-of-turn token comes from the template, and a
    template that fails on one user/assistant turn is named with its file."""
    raw = RawTokenizer.from_file(f"{folders['gpt2']}/tokenizer.json")
    broken = "{{ raise_exception('no assistant turns here') }}"
    folder = _save(
        tmp_path / "badtpl",
        raw,
        tokenizer_config__json={"chat_template": broken, "eos_token": "<|endoftext|>"},
    )
    with pytest.raises(
        InputError, match=r"badtpl/tokenizer_config.json: chat_template fails on a one-turn"
    ) as e:
        tokenizer.load(folder)
    assert "\n" not in str(e.value)


def test_stages_accept_either_backend(folders, sp_model, tmp_path):
    """tokenizer_from: a stage, a .model, a tokenizer.json or a folder; the tokenizer stage
    copies a Hugging Face tokenizer (model_path) and later stages find its tokenizer.json."""
    import ml_collections

    from instructrl.stages import DONE_MARKER, inputs
    from instructrl.stages import tokenizer as tokenizer_stage

    workdir = str(tmp_path / "run")
    config = ml_collections.ConfigDict({"tok": tokenizer_stage.default_config(), "sft": {}})
    config.tok.model_path = folders["qwen"]
    tokenizer_stage.run(config, "tok", workdir)
    assert sorted(p.name for p in (tmp_path / "run" / "tok").iterdir()) == [
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    (tmp_path / "run" / "tok" / DONE_MARKER).write_text("")
    for source, backend in [
        ("tok", HFTokenizer),
        (folders["llama3"], HFTokenizer),
        (f"{folders['gpt2']}/tokenizer.json", HFTokenizer),
        (sp_model, Tokenizer),
    ]:
        config.sft.tokenizer_from = source
        tok = tokenizer.load(inputs.tokenizer_path(config, "sft", workdir))
        assert type(tok) is backend, source
    assert tokenizer.load(inputs.tokenizer_path(config, "sft", workdir)).encode("x") == (
        tokenizer.load(sp_model).encode("x")
    )
    config.sft.tokenizer_from = str(tmp_path / "missing" / "tokenizer.json")
    with pytest.raises(
        InputError, match=r"'sft\.tokenizer_from': .*missing/tokenizer\.json not found"
    ):
        inputs.tokenizer_path(config, "sft", workdir)
