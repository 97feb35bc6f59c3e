"""Tests for instructrl/data/pipeline.py and examples.py: batch contents against naive
references, packing, RM pairs, sharding across (simulated) processes, iterator state."""

from __future__ import annotations

import itertools
import json
import os

import numpy as np
import pytest

from instructrl.data.builder import build_dataset, length_limits
from instructrl.data.config import default_data_config
from instructrl.data.pipeline import (
    ppo_pipeline,
    pretrain_pipeline,
    prompt_record,
    rm_pipeline,
    sft_pipeline,
    shard_records,
)
from instructrl.data.records import InvalidRecord
from instructrl.errors import ConfigError
from instructrl.tokenizer import Tokenizer
from instructrl.world import synthetic
from tests.conftest import run_multiprocess

SHORT = dict(prompt_words=(1, 4), response_words=(1, 6))


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipe")
    tok = synthetic.train_tokenizer(str(root / "tok"), lines=300)
    c = default_data_config()
    c.dir, c.tfds_dir = str(root / "data"), str(root / "tfds")
    c.seq_len, c.max_prompt_len, c.max_response_len = 48, 24, 16
    c.validation_fraction = 0.0
    c.num_threads = 2
    demos = synthetic.synthetic_records("demonstrations", 23, **SHORT)
    demos.append({"prompt": "long one", "completion": " " + " ".join(["kalu"] * 40)})  # truncated
    cmps = synthetic.synthetic_records("comparisons", 16, k_range=(2, 5), **SHORT)
    cmps[0]["ties"] = [[cmps[0]["ranking"][0], cmps[0]["ranking"][1]]]
    cmps[1] = {"prompt": "pairwise", "chosen": "yes", "rejected": "no"}
    cmps[3] = dict(cmps[3], responses=["", *cmps[3]["responses"][1:]])  # an immediate stop
    cmps[2] = dict(
        cmps[2], responses=["a", "b", "c", "d"], ranking=[3, 0, 1, 2], ties=[[3, 0], [1, 2]]
    )
    d = root / "data"
    synthetic.write_jsonl(str(d / "demonstrations.jsonl"), demos)
    synthetic.write_jsonl(str(d / "comparisons.jsonl"), cmps)
    synthetic.write_jsonl(
        str(d / "prompts.jsonl"), synthetic.synthetic_records("prompts", 12, **SHORT)
    )
    synthetic.write_jsonl(
        str(d / "pretrain.jsonl"), synthetic.synthetic_records("pretrain", 20, **SHORT)
    )
    built = {
        k: build_dataset(k, c, tok)
        for k in ("demonstrations", "comparisons", "prompts", "pretrain")
    }
    assert built["demonstrations"].stats.truncated_responses >= 1
    return tok, c, built


def _records(built):
    src = built.sources["train"]
    return [json.loads(src[i]["record"]) for i in range(len(src))]


def _all(it):
    return list(it)


def _segments(batch):
    """(tokens, targets, loss_mask, positions) of every packed document in a batch."""
    for row in range(batch["tokens"].shape[0]):
        m = batch["mask"][row]
        for s in sorted(set(m.tolist()) - {0}):
            sel = m == s
            idx = np.nonzero(sel)[0]
            assert np.all(np.diff(idx) == 1), "a segment must be contiguous"
            yield tuple(batch[k][row][sel] for k in ("tokens", "targets", "loss_mask", "positions"))


@pytest.mark.parametrize("pack", [False, True])
def test_sft_loss_mask_is_exactly_completion_plus_eos(env, pack):
    tok, c, built = env
    recs = _records(built["demonstrations"])
    limits = length_limits(c, tok)
    by_prompt = {tuple([tok.bos_id, *tok.encode(r["prompt"])]): r for r in recs}
    it = sft_pipeline(
        built["demonstrations"], tok, c, batch_size=4, num_epochs=1, pack=pack, drop_remainder=False
    )
    seen = []
    for batch in it:
        assert set(batch) == {"tokens", "targets", "loss_mask", "mask", "positions"}
        assert all(v.shape == (4, c.seq_len) and v.dtype == np.int32 for v in batch.values())
        if not pack:
            assert set(np.unique(batch["mask"])) <= {0, 1}
        assert np.all(batch["loss_mask"][batch["mask"] == 0] == 0)
        assert np.all(batch["tokens"][batch["mask"] == 0] == tok.pad_id)
        for tokens, targets, loss, positions in _segments(batch):
            np.testing.assert_array_equal(positions, np.arange(len(tokens)))
            seq = [*tokens.tolist(), int(targets[-1])]
            np.testing.assert_array_equal(targets[:-1], tokens[1:])
            prompt = next(p for p in by_prompt if tuple(seq[: len(p)]) == p)
            rec = by_prompt[prompt]
            completion = tok.encode(rec["completion"])
            room = limits.response_room(len(prompt))
            want = [*completion, tok.eos_id] if len(completion) <= room else completion[:room]
            # Naive reference: walk the targets; a target counts iff it is past the prompt.
            expect_mask = [1 if t >= len(prompt) - 1 else 0 for t in range(len(targets))]
            assert loss.tolist() == expect_mask
            assert targets[loss == 1].tolist() == want
            seen.append(rec["prompt"])
    assert sorted(seen) == sorted(r["prompt"] for r in recs)  # each record once per epoch
    assert any(r["prompt"] == "long one" for r in recs)


def test_packed_rows_hold_several_documents(env):
    tok, c, built = env
    batch = next(sft_pipeline(built["demonstrations"], tok, c, batch_size=4, pack=True))
    assert batch["mask"].max() >= 2
    for row in batch["mask"]:
        ids = row[row > 0]
        assert np.all(np.diff(ids) >= 0) and ids[0] == 1  # segments 1, 2, ... in order


@pytest.mark.parametrize("pack", [False, True])
def test_pretraining_batches(env, pack):
    tok, c, built = env
    docs = _records(built["pretrain"])
    total_targets = sum(len(tok.encode(d["text"])) + 1 for d in docs)
    batches = _all(
        pretrain_pipeline(
            built["pretrain"], tok, c, batch_size=2, num_epochs=1, pack=pack, drop_remainder=False
        )
    )
    assert sum(int(b["loss_mask"].sum()) for b in batches) == total_targets
    starts = 0
    for b in batches:
        np.testing.assert_array_equal(b["loss_mask"], (b["mask"] > 0).astype(np.int32))
        for tokens, targets, _, positions in _segments(b):
            np.testing.assert_array_equal(positions, np.arange(len(tokens)))
            np.testing.assert_array_equal(targets[:-1], tokens[1:])
            starts += int(tokens[0] == tok.bos_id)
    assert starts == len(docs)  # every document starts one segment with BOS


def test_padding_uses_the_tokenizers_pad_id(env):
    tok, c, built = env
    unk_pad = Tokenizer.load(
        os.path.join(os.path.dirname(c.dir), "tok", "tok.model"), pad_id=tok.unk_id
    )
    # The concat-then-split packer fills whole rows; its last row (one epoch) is the padded one.
    pre = list(
        pretrain_pipeline(built["pretrain"], unk_pad, c, batch_size=1, pack=True, num_epochs=1)
    )
    for batches in (
        pre[-1:],
        itertools.islice(sft_pipeline(built["demonstrations"], unk_pad, c, batch_size=4), 5),
        itertools.islice(
            sft_pipeline(built["demonstrations"], unk_pad, c, batch_size=4, pack=False), 5
        ),
    ):
        batches = list(batches)
        pads = np.concatenate([b["tokens"][b["mask"] == 0] for b in batches])
        assert pads.size and np.all(pads == tok.unk_id)
        assert all(np.all(b["loss_mask"][b["mask"] == 0] == 0) for b in batches)


def _naive_pairs(rec):
    """All ordered (winner, loser) pairs implied by the ranking, minus tied ones."""
    ranking = rec.get("ranking", [0, 1])
    tie_of = {i: g for g, grp in enumerate(rec.get("ties", [])) for i in grp}
    pairs = set()
    for a in range(len(ranking)):
        for b in range(a + 1, len(ranking)):
            win, lose = ranking[a], ranking[b]
            if win in tie_of and tie_of.get(lose) == tie_of[win]:
                continue
            pairs.add((win, lose))
    return pairs


def test_rm_rows_hold_all_pairs_of_their_ranking(env):
    tok, c, built = env
    recs = _records(built["comparisons"])
    k_max = built["comparisons"].stats.max_responses
    assert k_max == 5
    batches = _all(
        rm_pipeline(
            built["comparisons"],
            tok,
            c,
            batch_size=3,
            num_epochs=1,
            shuffle=False,
            drop_remainder=False,
        )
    )
    rows = [{k: v[i] for k, v in b.items()} for b in batches for i in range(3)]
    assert len(rows) == 18  # 16 records, last batch padded
    for row, rec in itertools.zip_longest(rows, recs):
        assert row["tokens"].shape == (k_max, c.seq_len) and row["pair_mask"].shape == (
            k_max,
            k_max,
        )
        if rec is None:  # padding row: nothing to learn from
            assert (
                row["pair_mask"].sum() == 0
                and row["response_mask"].sum() == 0
                and row["mask"].sum() == 0
            )
            continue
        k = len(rec["responses"])
        got = {(int(i), int(j)) for i, j in zip(*np.nonzero(row["pair_mask"]), strict=True)}
        assert got == _naive_pairs(rec)
        tied = sum(len(g) * (len(g) - 1) // 2 for g in rec["ties"])
        assert len(got) == k * (k - 1) // 2 - tied
        assert row["response_mask"].tolist() == [1] * k + [0] * (k_max - k)
        prompt = [tok.bos_id, *tok.encode(rec["prompt"])]
        for i in range(k_max):
            real = row["tokens"][i][row["mask"][i] > 0].tolist()
            if i >= k:
                assert real == []
                continue
            assert real[: len(prompt)] == prompt
            ids, room = (
                tok.encode(rec["responses"][i]),
                length_limits(c, tok).response_room(len(prompt)),
            )
            assert real[len(prompt) :] == ([*ids, tok.eos_id] if len(ids) <= room else ids[:room])
            np.testing.assert_array_equal(row["positions"][i][: len(real)], np.arange(len(real)))
    tie_rec = next(i for i, r in enumerate(recs) if len(r["ties"]) == 2)
    np.testing.assert_array_equal(
        rows[tie_rec]["pair_mask"][:4, :4],
        # ranking [3, 0, 1, 2], ties {3, 0} and {1, 2}: 3>1, 3>2, 0>1, 0>2 remain
        [[0, 1, 1, 0], [0, 0, 0, 0], [0, 0, 0, 0], [0, 1, 1, 0]],
    )


def test_ppo_prompts_left_padded_with_passthrough_and_ptx(env):
    tok, c, built = env
    c = c.copy_and_resolve_references()
    c.ptx_ratio = 1.5
    it = ppo_pipeline(built["prompts"], tok, c, batch_size=4, ptx_data=built["pretrain"])
    batch = next(it)
    assert batch["prompt_tokens"].shape == batch["prompt_mask"].shape == (4, c.max_prompt_len)
    assert batch["index"].dtype == np.int64
    assert {k for k in batch if k.startswith("ptx_")} == {
        "ptx_tokens", "ptx_targets", "ptx_loss_mask", "ptx_mask", "ptx_positions"
    }  # fmt: skip
    assert batch["ptx_tokens"].shape == (6, c.seq_len)
    for tokens, mask, index in zip(
        batch["prompt_tokens"], batch["prompt_mask"], batch["index"], strict=True
    ):
        n = int(mask.sum())
        assert mask.tolist() == [0] * (len(mask) - n) + [1] * n  # pads first
        assert np.all(tokens[: len(mask) - n] == tok.pad_id)
        rec = prompt_record(built["prompts"], index)
        assert tokens[-n:].tolist() == [tok.bos_id, *tok.encode(rec["prompt"])]
        assert rec["id"] == f"p{index}"  # extra fields pass through
    c.ptx_ratio = 1.0
    with pytest.raises(ConfigError, match=r"data.ptx_ratio"):
        ppo_pipeline(built["prompts"], tok, c, batch_size=4)
    c.ptx_ratio = 0.1
    with pytest.raises(ConfigError, match=r"gives 0 ptx rows for batch size 4"):
        ppo_pipeline(built["prompts"], tok, c, batch_size=4, ptx_data=built["pretrain"])


def test_two_processes_read_disjoint_shards_covering_each_epoch(env):
    tok, c, built = env
    n = len(built["prompts"].sources["train"])
    per_epoch = {}
    for pi in range(2):
        it = ppo_pipeline(
            built["prompts"], tok, c, batch_size=4, num_epochs=2, process_index=pi, process_count=2
        )
        idx = [int(i) for b in it for i in b["index"]]
        assert len(idx) == n  # 2 epochs of n / 2
        per_epoch[pi] = (idx[: n // 2], idx[n // 2 :])
    for epoch in range(2):
        a, b = per_epoch[0][epoch], per_epoch[1][epoch]
        assert not set(a) & set(b)
        assert sorted(a + b) == list(range(n))
    assert per_epoch[0][0] != per_epoch[0][1]  # reshuffled each epoch
    assert set(per_epoch[0][0]) == set(per_epoch[0][1])  # but the shard is fixed

    # Uneven counts are cut so that every process yields the same number of batches.
    shards = [
        len(shard_records(list(range(13)), seed=0, num_epochs=1, process_index=i, process_count=3))
        for i in range(3)
    ]
    assert shards == [4, 4, 4]
    with pytest.raises(ConfigError, match=r"batch size 5 is not divisible by 2 JAX processes"):
        sft_pipeline(
            built["demonstrations"], tok, c, batch_size=5, process_index=0, process_count=2
        )


@pytest.mark.parametrize("which", ["sft_packed", "pretrain_packed", "rm", "ppo_ptx"])
def test_restored_state_continues_with_the_next_batch(env, which):
    tok, c, built = env
    c = c.copy_and_resolve_references()
    c.num_epochs = 0  # forever, so the saved position crosses epoch boundaries too
    c.ptx_ratio = 1.0

    def make():
        if which == "sft_packed":
            return sft_pipeline(built["demonstrations"], tok, c, batch_size=4, pack=True)
        if which == "pretrain_packed":
            return pretrain_pipeline(built["pretrain"], tok, c, batch_size=2, pack=True)
        if which == "rm":
            return rm_pipeline(built["comparisons"], tok, c, batch_size=4)
        return ppo_pipeline(built["prompts"], tok, c, batch_size=4, ptx_data=built["pretrain"])

    it = make()
    for _ in range(7):
        next(it)
    state = it.get_state()
    assert isinstance(state, bytes)
    json.loads(state)
    want = [next(it) for _ in range(3)]
    fresh = make()
    fresh.set_state(state)
    got = [next(fresh) for _ in range(3)]
    for w, g in zip(want, got, strict=True):
        assert w.keys() == g.keys()
        for k in w:
            np.testing.assert_array_equal(w[k], g[k], err_msg=k)


def test_worker_processes_give_the_same_batches_and_resume(env):
    tok, c, built = env
    c = c.copy_and_resolve_references()
    c.num_epochs = 0
    want = sft_pipeline(built["demonstrations"], tok, c, batch_size=4)
    want = [next(want) for _ in range(5)]
    c.num_workers = 1
    it = sft_pipeline(built["demonstrations"], tok, c, batch_size=4)
    got = [next(it) for _ in range(3)]
    state = it.get_state()
    fresh = sft_pipeline(built["demonstrations"], tok, c, batch_size=4)
    fresh.set_state(state)
    got += [next(fresh) for _ in range(2)]
    for w, g in zip(want, got, strict=True):
        for k in w:
            np.testing.assert_array_equal(w[k], g[k], err_msg=k)


def test_two_real_jax_processes(env):
    _, c, built = env
    code = f"""
import json
from instructrl.data.builder import build_dataset
from instructrl.data.config import default_data_config
from instructrl.data.pipeline import ppo_pipeline
from instructrl.tokenizer import Tokenizer
c = default_data_config()
c.update(json.loads({json.dumps(c.to_dict())!r}))
tok = Tokenizer.load({os.path.join(os.path.dirname(c.dir), "tok", "tok.model")!r})
built = build_dataset("prompts", c, tok)  # prepared already: both processes only read
it = ppo_pipeline(built, tok, c, batch_size=4, num_epochs=1)
print("INDICES", json.dumps([int(i) for b in it for i in b["index"]]))
"""
    outs = run_multiprocess(code, num_processes=2, timeout=300)
    shards = [json.loads(o.split("INDICES", 1)[1]) for o in outs]
    n = len(built["prompts"].sources["train"])
    assert not set(shards[0]) & set(shards[1])
    assert sorted(shards[0] + shards[1]) == list(range(n))


def test_rm_rows_respect_stopped_and_use_the_sampled_ids(env):
    """A response that never stopped gets no EOS (it is read at its last token, as PPO reads
    a cut-off sample); responses that carry the ids they were sampled as, for this tokenizer,
    are trained on those ids, not on a re-encoding of their text; ids of another tokenizer
    are ignored."""
    from instructrl.data.examples import RMMap
    from instructrl.data.records import check_record, tokenizer_fingerprint

    tok, c, _ = env
    limits = length_limits(c, tok)
    texts = [" kalu mo", " mo kalu", " ra"]
    sampled = [[*tok.encode(t)[:-1], *tok.encode(" zz")] for t in texts]  # not encode(text)
    rec = {
        "prompt": "p q",
        "responses": texts,
        "ranking": [2, 0, 1],
        "stopped": [True, False, True],
    }
    rm_map = RMMap(tok, limits, k_max=4)

    def rows(record):
        ex = rm_map({"record": json.dumps(check_record("comparisons", record)).encode()})
        prompt = 1 + len(tok.encode(record["prompt"]))
        return [ex["tokens"][i][ex["mask"][i] > 0].tolist()[prompt:] for i in range(3)]

    plain = rows(rec)
    assert plain[0] == [*tok.encode(texts[0]), tok.eos_id]
    assert plain[1] == tok.encode(texts[1])  # cut off: no EOS
    assert plain[2] == [*tok.encode(texts[2]), tok.eos_id]
    with_ids = rows({**rec, "response_ids": sampled, "tokenizer": tokenizer_fingerprint(tok)})
    assert with_ids == [[*sampled[0], tok.eos_id], sampled[1], [*sampled[2], tok.eos_id]]
    assert rows({**rec, "response_ids": sampled, "tokenizer": "another"}) == plain
    # The same text cut off and stopped is two responses; a stopped list must match K.
    two = {"prompt": "p", "responses": ["a", "a"], "ranking": [0, 1], "stopped": [True, False]}
    assert check_record("comparisons", two)["stopped"] == [True, False]
    with pytest.raises(InvalidRecord, match="identical"):
        check_record("comparisons", {**two, "stopped": [True, True]})
    with pytest.raises(InvalidRecord, match="'stopped' must be a list of 2 booleans"):
        check_record("comparisons", {**two, "stopped": [True]})


@pytest.mark.parametrize("batch_size,num_epochs", [(2, 5), (8, 5)])
def test_lm_schedule_never_runs_out_of_packed_batches(env, batch_size, num_epochs):
    """Packing runs on across epoch boundaries, so E epochs give a few batches more or fewer
    than E x one epoch's (here 34 vs 35 at batch 2, 8 vs 5 at batch 8); the stage's stream
    must still hold every scheduled step (an SFT run at visible_flaws=0.5 once stopped with
    StopIteration a few steps before its end)."""
    from instructrl.stages import lm

    tok, c, built = env

    def train_iter(epochs):
        return sft_pipeline(
            built["demonstrations"], tok, c, batch_size=batch_size, num_epochs=epochs, pack=True
        )

    one = sum(1 for _ in train_iter(1))
    exact = sum(1 for _ in train_iter(num_epochs))
    per_epoch, total, it = lm.schedule(train_iter, num_epochs, 0)
    assert (per_epoch, total) == (one, one * num_epochs)
    batches = list(it)
    assert len(batches) >= total
    if batch_size == 2:
        assert exact < total  # the case that ran out before
    want = list(train_iter(num_epochs))  # the scheduled steps see the E-epoch stream's batches
    for got, ref in zip(batches[: min(exact, total) - 1], want, strict=False):
        np.testing.assert_array_equal(got["tokens"], ref["tokens"])
    assert lm.schedule(train_iter, num_epochs, 7)[:2] == (7, 7)
