"""The gold-reward oracle's score function (instructrl/stages/ppo.py `gold_score_fn`).

Against a naive reference: world.score on the original prompt records and response strings,
for token batches built the way the PPO data pipeline builds them (left-padded [BOS] prompt,
right-padded response up to and including EOS, or cut off without one). Under jit on one
device and on 8 devices (batch sharded), and the one-line error for prompts without gold
scorers. tests/stages/test_ppo.py runs it inside the PPO stage.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from instructrl import world
from instructrl.data.builder import BuiltDataset
from instructrl.errors import ConfigError
from instructrl.tokenizer import Tokenizer
from tests.conftest import run_in_subprocess

N = 48  # episodes; a multiple of 8 for the sharded run


def prompt_source(records) -> BuiltDataset:
    """A prompts dataset as inputs.build_data returns it (records as JSON bytes)."""
    rows = [{"record": json.dumps(r).encode()} for r in records]
    return BuiltDataset(
        "prompts", "prompts.jsonl", {"train": rows[:-4], "validation": rows[-4:]}, None
    )


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """World prompts, a tokenizer trained on the world, responses of every kind, the batch."""
    root = tmp_path_factory.mktemp("gold")
    paths = world.write_world(
        str(root / "world"), seed=3, num_pretrain=300, num_pretrain_heldout=10,
        num_demonstrations=200, num_rm=10, num_ppo=N, num_eval=10, num_public=40,
    )  # fmt: skip
    tok = Tokenizer.load(
        Tokenizer.train([paths["pretrain"], paths["demonstrations"]], 384, str(root / "tok"))
    )
    with open(paths["prompts_ppo"]) as f:
        records = [json.loads(line) for line in f][:N]
    rng = np.random.default_rng(0)
    responses, stopped = [], []
    for i, r in enumerate(records):
        kind = i % 6
        answer = world.gold_answer(r, rng)
        if kind == 1:
            answer = world.families.slip(r, answer, rng)
        elif kind == 2:
            answer = ""
        elif kind == 3:
            answer = answer + "\nInstruction: more"  # kept talking
        elif kind == 4:
            answer = " ".join(rng.permutation(answer.split()).tolist())
        responses.append(" " + answer if answer else "")
        stopped.append(kind != 5)  # kind 5: a correct answer cut off before EOS
    prompt_ids = [[tok.bos_id, *tok.encode(r["prompt"])] for r in records]
    resp_ids = [
        tok.encode(t) + ([tok.eos_id] if s else []) for t, s in zip(responses, stopped, strict=True)
    ]
    p = max(map(len, prompt_ids))
    n = max(map(len, resp_ids)) + 2
    pt = np.full((N, p), tok.pad_id, np.int32)
    pm = np.zeros((N, p), np.int32)
    rt = np.full((N, n), tok.pad_id, np.int32)
    rm = np.zeros((N, n), np.int32)
    for b, (q, a) in enumerate(zip(prompt_ids, resp_ids, strict=True)):
        pt[b, p - len(q) :], pm[b, p - len(q) :] = q, 1
        rt[b, : len(a)], rm[b, : len(a)] = a, 1
    expected = np.array(
        [world.score(r, t, s) for r, t, s in zip(records, responses, stopped, strict=True)]
    )
    batch = dict(prompt_tokens=pt, prompt_mask=pm, response_tokens=rt, response_mask=rm)
    np.savez(root / "batch.npz", expected=expected, **batch)
    with open(root / "records.json", "w") as f:
        json.dump(records, f)
    return dict(root=str(root), tok=tok, records=records, batch=batch, expected=expected)


def test_scores_match_tasks_score_on_the_strings(case):
    import jax

    from instructrl.stages.ppo import gold_score_fn

    expected = case["expected"]
    # The cases span the scorer: perfect, partial, zero, talked on (x0.7), cut off (x0.5).
    assert (expected == 1.0).any() and (expected == 0.0).any()
    assert ((expected > 0) & (expected < 1)).sum() >= 10
    # Prompts from both splits are found (the last 4 records are the validation split).
    fn = gold_score_fn(prompt_source(case["records"]), case["tok"], "ppo")
    b = case["batch"]
    args = (b["prompt_tokens"], b["prompt_mask"], b["response_tokens"], b["response_mask"])
    got = np.asarray(jax.jit(fn)(None, *args))
    assert got.dtype == np.float32 and got.shape == (N,)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)


@pytest.mark.slow
def test_same_scores_with_the_batch_sharded_over_8_devices(case):
    out = run_in_subprocess(
        f"""
        import json
        import jax
        import numpy as np
        from jax.sharding import NamedSharding, PartitionSpec
        from instructrl.stages.ppo import gold_score_fn
        from instructrl.tokenizer import Tokenizer
        from tests.stages.test_ppo_gold_reward import prompt_source

        root = {case["root"]!r}
        assert jax.device_count() == 8
        batch = np.load(root + "/batch.npz")
        with open(root + "/records.json") as f:
            records = json.load(f)
        fn = gold_score_fn(prompt_source(records), Tokenizer.load(root + "/tok.model"), "ppo")
        mesh = jax.make_mesh((8,), ("data",))
        rows = NamedSharding(mesh, PartitionSpec("data"))
        args = [jax.device_put(batch[k], rows) for k in
                ("prompt_tokens", "prompt_mask", "response_tokens", "response_mask")]
        got = jax.jit(fn, out_shardings=rows)(None, *args)
        np.testing.assert_allclose(np.asarray(got), batch["expected"], rtol=0, atol=1e-6)
        print("ok", len(got.sharding.device_set))
        """,
        num_devices=8,
    )
    assert out.split() == ["ok", "8"]


def test_prompts_without_gold_scorers_are_a_config_error(case):
    from instructrl.stages.ppo import gold_score_fn

    records = [dict(r) for r in case["records"]]
    records[5] = {"prompt": records[5]["prompt"]}  # a user's prompt: no family/params
    with pytest.raises(ConfigError) as e:
        gold_score_fn(prompt_source(records), case["tok"], "ppo_gold")
    message = str(e.value)
    assert "\n" not in message
    assert "config key 'ppo_gold.gold_reward'" in message and "train prompt 5" in message


def test_unknown_prompt_text_fails_loudly(case):
    import jax

    from instructrl.stages.ppo import gold_score_fn

    fn = gold_score_fn(prompt_source(case["records"][1:]), case["tok"], "ppo")  # drop record 0
    b = case["batch"]
    args = (b["prompt_tokens"], b["prompt_mask"], b["response_tokens"], b["response_mask"])
    with pytest.raises(Exception, match="no prompt record for"):
        np.asarray(jax.jit(fn)(None, *args))


@pytest.mark.slow
def test_gold_reward_with_two_processes_is_a_config_error():
    """The gold scorer is a host callback that needs every episode in one process: with 2
    processes joined by jax.distributed it refuses, in one line naming the config key."""
    import ast

    from tests.conftest import run_multiprocess

    code = """
    from instructrl.errors import ConfigError
    from instructrl.stages.ppo import gold_score_fn
    try:
        gold_score_fn(None, None, "ppo_gold")
    except ConfigError as e:
        print("ERROR:", repr(str(e)))
    """
    for out in run_multiprocess(code, num_processes=2):
        line = next(x for x in out.splitlines() if x.startswith("ERROR:"))
        message = ast.literal_eval(line[len("ERROR: ") :])  # the repr of one str
        assert "\n" not in message
        assert message.startswith("config key 'ppo_gold.gold_reward'")
        assert "this run has 2 processes" in message
