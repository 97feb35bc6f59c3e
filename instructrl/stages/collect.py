"""Stage `collect`: comparison data the way the paper gathered it.

For each prompt of `prompts`, K responses (K uniform in [k_min, k_max]; empty answers included) are sampled at
temperature 1 from the models exported by the stages in `policies` (e.g. "sft,pretrain":
the SFT and base models, alternating), and a simulated labeler from `LabelerPool` ranks
them (instructrl/world/labelers.py). With `calibrate`, the pool's noise is first fitted so that
two labelers agree on `target_agreement` of the pairs of these very samples (the paper's
72.6%), and the agreement reached is measured on held-out prompts and saved.

`labelers`: "pool" (the simulated labelers above) or "gold", an ablation that is not the
paper's: noise-free labelers without length preferences, who rank by the gold score itself
(responses with equal gold scores are written as tie groups; needs `calibrate=False`). An RM trained on those rankings
shows how much of its error is label noise and how much is its own generalisation.

Writes `DIR/<name>/comparisons.jsonl` (standard format: identical responses collapsed, ties
as "ties" groups, each response's "stopped" flag and its sampled "response_ids" with the
"tokenizer" fingerprint they belong to) and `labelers.json`.
Only the synthetic world has gold scorers, so this stage needs its prompt records
(`family`, `params` fields).

With a chat template (data.chat_template, a Hugging Face tokenizer) the policies sample from
the rendered prompt until the template's end-of-turn token, as PPO does; labelers judge the
reply's text without the template's framing, and the "response_ids" are the ids after the
generation prompt (framing included), tagged with a fingerprint of tokenizer and template so
the RM reuses them only under the same template.
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import ml_collections
import numpy as np
from absl import logging

from instructrl import chat_format, world
from instructrl import tokenizer as tokenizer_lib
from instructrl.data import read_prompts
from instructrl.data.records import tokenizer_fingerprint
from instructrl.errors import ConfigError, InputError
from instructrl.sample import generate, load_stage_model
from instructrl.stages import inputs
from instructrl.world import labelers

LABELERS = ("pool", "gold")


def default_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        dict(
            kind="collect",
            policies="sft,pretrain",
            prompts="@world/prompts_rm.jsonl",
            tokenizer_from="tokenizer",
            k_min=4,
            k_max=9,
            temperature=1.0,
            num_labelers=8,
            labelers="pool",  # "pool" | "gold" (noise-free; an ablation)
            calibrate=True,
            target_agreement=labelers.PAPER_AGREEMENT,
            seed=0,
        )
    )


def run(config: ml_collections.ConfigDict, name: str, workdir: str) -> None:
    c = config[name]
    if not 2 <= c.k_min <= c.k_max:
        raise ConfigError(f"config keys '{name}.k_min/k_max' need 2 <= k_min <= k_max")
    if c.labelers not in LABELERS:
        raise ConfigError(
            f"config key '{name}.labelers' must be one of {LABELERS}, got {c.labelers!r}"
        )
    if c.labelers == "gold" and c.calibrate:
        raise ConfigError(
            f"config key '{name}.calibrate' must be False with {name}.labelers='gold' "
            "(noise-free labelers have no noise to fit)"
        )
    out_dir = inputs.stage_dir(workdir, name)
    policies = [p.strip() for p in c.policies.split(",") if p.strip()]
    inputs.wait_for_done_markers(f"{name}.policies")
    for p in policies:
        if not inputs.is_done(workdir, p):
            raise InputError(f"config key '{name}.policies': stage '{p}' has not finished")
    tokenizer = tokenizer_lib.load(inputs.tokenizer_path(config, name, workdir))
    chat = chat_format.for_data(tokenizer, config.data)
    records = [r.data for r in read_prompts(inputs.resolve_path(c.prompts, workdir))[0]]
    rng = np.random.default_rng(c.seed)
    ks = rng.integers(c.k_min, c.k_max + 1, size=len(records))

    # ---- sample K responses per prompt, slot j from policy j % len(policies)
    prompt_len = max(len(chat.prompt_ids(r["prompt"])) for r in records)
    new_tokens = min(config.data.max_response_len + 1, config.model.max_len - prompt_len)
    responses = [[] for _ in records]
    stopped = [[] for _ in records]
    sampled_ids = [[] for _ in records]
    models = {p: load_stage_model(workdir, p) for p in policies}
    for j in range(c.k_max):
        policy = policies[j % len(policies)]
        rows = [i for i in range(len(records)) if ks[i] > j]
        model, params = models[policy]
        texts, stops, _, ids = generate(
            model, params, tokenizer, [records[i]["prompt"] for i in rows],
            max_new_tokens=new_tokens, max_prompt_len=prompt_len,
            seed=c.seed * 1000 + j, temperature=c.temperature, with_ids=True, chat=chat,
        )  # fmt: skip
        for i, t, s, x in zip(rows, texts, stops, ids, strict=True):
            # Empty answers (an immediate stop token) are kept and ranked: an RM that never
            # saw one scores it arbitrarily, and PPO then learns to say nothing.
            responses[i].append(t)
            stopped[i].append(s)
            sampled_ids[i].append(x)
    # The RM scores the policy's sampled ids in PPO; a text re-encoded need not give them
    # back, so the records keep the ids (with the tokenizer they belong to) for RM training.
    flat = [(r["prompt"], t, x) for r, ts, xs in zip(records, responses, sampled_ids, strict=True) for t, x in zip(ts, xs, strict=True)]  # fmt: skip
    retokenized = float(np.mean([chat.response_ids(p, t) != x for p, t, x in flat]))

    # ---- labelers: calibrate on half the prompts, measure agreement on the other half
    pool = labelers.LabelerPool(num_labelers=c.num_labelers, seed=c.seed)
    if c.labelers == "gold":
        pool = dataclasses.replace(pool, noise=0.0, length_bias=0.0)
    half = len(records) // 2
    ceiling = None
    if c.calibrate:
        # Pairs whose gold scores tie are coin flips for every labeler, so samples with many
        # ties cap the reachable agreement below the target; then the least noisy pool is used
        # and the cap is reported, rather than failing the run.
        quiet = dataclasses.replace(pool, noise=1e-4)
        ceiling = labelers.pairwise_agreement(
            quiet, records[:half], responses[:half], np.random.default_rng(c.seed), stopped[:half]
        )
        if ceiling > c.target_agreement:
            noise = labelers.calibrate_noise(
                pool, records[:half], responses[:half], stopped[:half],
                target=c.target_agreement, seed=c.seed,
            )  # fmt: skip
        else:
            noise = quiet.noise
            logging.warning(
                "collect: agreement %.3f is the most these samples allow (gold-score ties); "
                "target %.3f not reachable, using noise %g",
                ceiling, c.target_agreement, noise,
            )  # fmt: skip
        pool = dataclasses.replace(pool, noise=noise)
    agreement = labelers.pairwise_agreement(
        pool, records[half:], responses[half:], np.random.default_rng(c.seed + 1), stopped[half:]
    )
    comparisons = labelers.collect_comparisons(
        records, responses, stopped, pool, rng, response_ids=sampled_ids
    )
    fingerprint = tokenizer_fingerprint(tokenizer, chat)
    for rec in comparisons:
        rec["tokenizer"] = fingerprint
    gold = [
        np.mean([world.score(r, t, s) for t, s in zip(resp, st, strict=True)])
        for r, resp, st in zip(records, responses, stopped, strict=True)
    ]
    summary = {
        "labelers": c.labelers,
        "prompts": len(records),
        "comparisons": len(comparisons),
        "mean_k": float(np.mean([len(x["responses"]) for x in comparisons])),
        "noise": pool.noise,
        "inter_labeler_agreement": agreement,
        "agreement_ceiling": ceiling,
        "mean_gold_score_of_samples": float(np.mean(gold)),
        "stopped_fraction": float(np.mean([s for st in stopped for s in st])),
        # share of sampled responses whose text re-encodes to other ids than were sampled
        "retokenized_fraction": retokenized,
    }
    logging.info(
        "%s: %d comparisons of K = %d..%d from %s (mean K %.2f); labeler agreement %.3f, "
        "noise %.3g; mean gold score of the samples %.3f; %.1f%% re-encode to other ids",
        name, len(comparisons), c.k_min, c.k_max, c.policies, summary["mean_k"], agreement,
        pool.noise, summary["mean_gold_score_of_samples"], 100 * retokenized,
    )  # fmt: skip
    if jax.process_index() == 0:
        os.makedirs(out_dir, exist_ok=True)
        path = os.path.join(out_dir, "comparisons.jsonl")
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            for rec in comparisons:
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        os.replace(path + ".tmp", path)
        with open(os.path.join(out_dir, "labelers.json"), "w") as f:
            json.dump(summary, f, indent=2)
