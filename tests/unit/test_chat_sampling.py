"""Chat templates where responses are sampled and judged: `sample.generate` (used by collect,
eval and `python -m instructrl.sample`), the collect stage, eval's rows and the RM's scoring
rows. The sampler is replaced by one that writes chosen replies (the template's framing,
the reply, the stop token), so what is checked is the rendering, stopping and decoding
around it, on the Qwen3-style tokenizer of test_chat_format."""

import json
from typing import NamedTuple

import ml_collections
import numpy as np
import pytest

from instructrl import chat_format, sample, tokenizer, world
from instructrl.data import default_data_config
from instructrl.data.examples import RMMap
from instructrl.data.records import LengthLimits, tokenizer_fingerprint
from instructrl.models.reward import encode_pairs
from instructrl.stages import collect, evaluate
from tests.unit.test_chat_format import qwen3_folder

FRAMING = "<think>\n\n</think>\n\n"  # what QWEN3_TEMPLATE writes before a reply


class _Out(NamedTuple):
    tokens: np.ndarray
    logprobs: np.ndarray
    mask: np.ndarray


class ScriptedSampler:
    """Stands in for sample_jit: row r of call c continues its (rendered) prompt with
    `reply(prompt_ids, c)`'s ids, cut to max_new_tokens; records the prompts it saw."""

    def __init__(self, reply):
        self.reply, self.calls, self.prompts = reply, 0, []

    def __call__(self, model, params, tokens, mask, key, *, max_new_tokens, stop_token, pad_id,
                 **kw):  # fmt: skip
        rows = [
            np.asarray(t)[np.asarray(m) > 0].tolist() for t, m in zip(tokens, mask, strict=True)
        ]
        self.prompts.append(rows)
        out = np.full((len(rows), max_new_tokens), pad_id, np.int32)
        out_mask = np.zeros_like(out)
        for i, row in enumerate(rows):
            ids = self.reply(row, self.calls)[:max_new_tokens]
            out[i, : len(ids)], out_mask[i, : len(ids)] = ids, 1
        self.calls += 1
        return _Out(out, np.zeros(out.shape, np.float32), out_mask)


@pytest.fixture(scope="module")
def chat(tmp_path_factory):
    folder = qwen3_folder(tmp_path_factory.mktemp("chat_sampling") / "qwen3")
    return chat_format.ChatFormat(tokenizer.load(folder), "model"), folder


def test_generate_renders_stops_and_drops_the_framing(chat, monkeypatch):
    chat, _ = chat
    tok = chat.tokenizer
    replies = {
        "Say hi.": "Hello there",
        "\n\nHuman: a?\n\nAssistant: b\n\nHuman: c?\n\nAssistant:": "",
    }
    by_ids = {tuple(chat.prompt_ids(p)): tok.encode(FRAMING + r) for p, r in replies.items()}
    cut = tok.encode(FRAMING + "it never ends, it goes on and on")  # the longest
    scripted = ScriptedSampler(lambda ids, c: [*by_ids.get(tuple(ids), cut), chat.stop_id])
    monkeypatch.setattr(sample, "sample_jit", scripted)
    prompts = [*replies, "Cut off."]
    plen = max(len(chat.prompt_ids(p)) for p in prompts)
    texts, stopped, _, ids = sample.generate(
        None, None, tok, prompts, max_new_tokens=len(cut), max_prompt_len=plen, batch_size=4,
        with_ids=True, chat=chat,
    )  # fmt: skip
    assert scripted.prompts[0][:3] == [chat.prompt_ids(p) for p in prompts]  # rendered, no BOS
    assert texts == ["Hello there", "", "it never ends, it goes on and on"] and stopped == [
        True,
        True,
        False,
    ]
    assert (
        ids[0]
        == chat.response_ids(prompts[0], texts[0])
        == by_ids[tuple(chat.prompt_ids(prompts[0]))]
    )
    assert ids[2] == cut  # a reply cut off keeps every id it sampled
    # eval: the NLL rows are the rendered prompt, the sampled ids and the template's stop
    rows, first = evaluate.response_rows(chat, prompts[:1], [ids[:1]], [stopped[:1]])
    assert rows == [chat.prompt_ids(prompts[0]) + ids[0] + [chat.stop_id]]
    assert first == [len(chat.prompt_ids(prompts[0]))]
    # the RM scores the rows it trained on: prompt, assistant turn, stop (none when cut off)
    tokens, mask = encode_pairs(tok, prompts[::2], texts[::2], 64, [True, False], chat)
    assert tokens[0][mask[0] > 0].tolist() == rows[0]
    assert tokens[1][mask[1] > 0].tolist() == chat.prompt_ids(prompts[2]) + cut


def test_collect_judges_replies_without_the_framing(chat, tmp_path, monkeypatch):
    """collect under a template: the gold labelers rank the exact answer first (its framing
    would cost it the extra-text factor), comparisons keep the sampled ids with a fingerprint
    of tokenizer and template, and the RM reuses those ids under the same template only."""
    chat, folder = chat
    tok = chat.tokenizer
    rng = np.random.default_rng(0)
    records = [world.make_prompt(rng, "reverse") for _ in range(4)]
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    answers = {tuple(chat.prompt_ids(r["prompt"])): world.gold_answer(r) for r in records}

    def reply(ids, call):  # call 0: the gold answer; call 1: its first word dropped
        words = answers[tuple(ids)].split()
        return [*tok.encode(FRAMING + " ".join(words if call == 0 else words[1:])), chat.stop_id]

    monkeypatch.setattr(sample, "sample_jit", ScriptedSampler(reply))
    monkeypatch.setattr(collect, "load_stage_model", lambda workdir, stage: (None, None))
    (tmp_path / "sft").mkdir()
    (tmp_path / "sft" / "DONE").write_text("{}")
    config = ml_collections.ConfigDict(
        {"data": default_data_config(), "collect": collect.default_config()}
    )
    config.data.chat_template = "model"
    config.model = ml_collections.ConfigDict({"max_len": 128})
    config.collect.update(policies="sft", prompts=str(tmp_path / "prompts.jsonl"), k_min=2, k_max=2,
                          labelers="gold", calibrate=False, tokenizer_from=folder)  # fmt: skip
    collect.run(config, "collect", str(tmp_path))
    rows = [
        json.loads(x) for x in (tmp_path / "collect" / "comparisons.jsonl").read_text().splitlines()
    ]
    assert len(rows) == 4
    assert {tuple(r["stopped"]) for r in rows} == {(True, True)}
    for r, rec in zip(rows, records, strict=True):
        best = r["responses"][r["ranking"][0]]
        assert best == world.gold_answer(rec) and world.score(rec, best) == 1.0
        assert r["response_ids"] == [chat.response_ids(r["prompt"], t) for t in r["responses"]]
        assert tok.decode(r["response_ids"][0]).startswith(FRAMING)
    assert rows[0]["tokenizer"] == tokenizer_fingerprint(tok, chat) != tokenizer_fingerprint(tok)
    summary = json.loads((tmp_path / "collect" / "labelers.json").read_text())
    assert summary["retokenized_fraction"] == 0.0 and summary["stopped_fraction"] == 1.0
    limits = LengthLimits(tok, max_prompt_len=96, max_response_len=31, seq_len=128, chat=chat)
    assert RMMap(tok, limits, k_max=2).fingerprint == rows[0]["tokenizer"]
    plain = LengthLimits(tok, max_prompt_len=96, max_response_len=31, seq_len=128)
    assert RMMap(tok, plain, k_max=2).fingerprint != rows[0]["tokenizer"]
