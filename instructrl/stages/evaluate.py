"""Stage `eval`: the paper's measurements (docs/method.md, "What the paper measures").

For each model of `models` (base, base prompted few-shot, SFT, PPO, PPO-ptx, at one or more
sizes) on held-out prompts:

  win rate       gold-judge preference against the `reference` stage (the larger SFT model),
                 ties 1/2, with the standard error over prompts; overall and per family
  constraints    rate of keeping the prompt's explicit constraint (`constraints_kept`), rate
                 of perfect answers (gold score 1), mean gold score, stop rate, length
  alignment tax  per-token NLL on held-out pretraining text and accuracy on the public cloze
                 task (greedy first word; and picking the likeliest of its 4 choices)

plus the RM's validation accuracy next to the simulated inter-labeler agreement, each
PPO stage's reward/KL curves, and the win rate of the reference's own samples with their
trailing filler words dropped (the visible slip of `world.demo_slips=filler`): what removing
that one flaw alone is worth, to read PPO's gain against. Writes `DIR/<name>/results.json`,
`results.md`, `samples.jsonl` and PNG plots (instructrl/eval/plots.py), and prints the main
table.

`models` is a list of `[SIZE: ]LABEL=STAGE[:fewshot]` entries; an entry without a size tag
belongs to the size of the one before it (`SIZE:` may be left out in a one-size run; the
column is then named by the parameter count). On the command line, or as one string, the
entries are separated by `,` (or `;` between sizes):

    ["small: GPT=pretrain", "GPT (prompted)=pretrain:fewshot", "SFT=sft", "PPO=ppo", ...,
     "large: GPT=pretrain_large", "GPT (prompted)=pretrain_large:fewshot", ...]
    --config.eval.models="small: SFT=sft, PPO=ppo; large: SFT=sft_large, PPO=ppo_large"

`:fewshot` samples the same model on `fewshot_prompts` (the eval prompts, in the same order,
with answered examples prepended). Labels are the x axis of the win-rate plot; they may hold
spaces and brackets, not `,;:=`.

Sampling: temperature 1 with `num_samples` responses per prompt, the distribution PPO
optimises and labelers compare; greedy decoding would hide how often a model fails to stop or
drifts, and makes the reference's win rate against itself trivially 1/2. Each prompt's
outcome is the mean of the gold comparisons over all num_samples x num_samples pairs of
model and reference responses (an unbiased estimate of P(model beats reference) on that
prompt); the standard error is over prompts, since samples of one prompt are correlated.
`greedy=True` takes one response per prompt.

With a chat template (data.chat_template) models sample from the rendered prompts until the
template's end-of-turn token, the gold judge reads replies without the template's framing,
and RMs and the KL term score the template's rows, as in training; the alignment tax stays
on raw text (pretraining text and the cloze task are not conversations).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import zlib
from collections.abc import Sequence

import jax
import ml_collections
import numpy as np

from instructrl import chat_format, world
from instructrl import tokenizer as tokenizer_lib
from instructrl.config import stage_names
from instructrl.data import read_pretrain, read_prompts
from instructrl.errors import ConfigError, InputError
from instructrl.eval import frontier
from instructrl.eval.alignment_tax import alignment_tax
from instructrl.eval.judge import best_of_n, fillers_dropped, gold_scores, response_metrics
from instructrl.eval.metrics import (
    batched_nll,
    ranking_accuracy,
    text_windows,
)
from instructrl.eval.model_list import ModelSpec, parse_models, stage_list
from instructrl.models.reward import RewardModel
from instructrl.sample import generate, load_stage_model
from instructrl.stages import inputs
from instructrl.train_lib import count_params
from instructrl.world import labelers


def default_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.kind = "eval"
    c.models = ["GPT=pretrain", "GPT (prompted)=pretrain:fewshot", "SFT=sft"]  # module doc
    c.reference = "sft"  # stage every model is compared with (the larger SFT model)
    c.tokenizer_from = "tokenizer"
    # Held-out prompts with gold-scorer fields: "@world/prompts_{split}.jsonl" ("" = that).
    # dev for every choice of a setting; test only for the final tables.
    c.split = "dev"
    c.prompts = ""
    c.fewshot_prompts = ""  # the same prompts with examples; "" = @world/prompts_{split}_fewshot
    c.num_prompts = 0  # 0 = all
    c.num_samples = 4  # responses per prompt and model (1 when greedy)
    c.temperature = 1.0
    c.greedy = False
    c.max_new_tokens = 0  # 0 = data.max_response_len + 1 (room for the stop token)
    c.batch_size = 64
    c.heldout = "@world/pretrain_heldout.jsonl"  # alignment tax: LM loss on held-out text
    c.heldout_num = 0  # documents; 0 = all
    c.public_task = "@world/public_task.jsonl"  # alignment tax: the public cloze task
    c.public_max_new_tokens = 4
    c.rm_from = "rm"  # comma list of RM stages ("" = none): their validation accuracy
    c.collect_from = "collect"  # comma list of collect stages: inter-labeler agreement
    # Best-of-n against each RM (0 = off): this many reference samples per prompt; reported
    # for n = 1, 2, 4, ... and itself (see best_of_n below).
    c.best_of_n = 16
    c.best_of_n_from = ""  # stage sampled for best-of-n ("" = reference); judged vs reference
    return c


# ---------------------------------------------------------------- config: models and stages
def check_input_stages(
    config: ml_collections.ConfigDict, name: str, workdir: str, named: Sequence[tuple[str, str]]
) -> None:
    """Each (config key, stage) of `named` must name a config section that runs before `name`
    in config.stages, or one that finished in `workdir` earlier. Config mistakes are reported
    before unfinished stages."""
    order = stage_names(config)
    for key, stage in named:
        where = f"config key '{name}.{key}'"
        if stage not in config or not isinstance(config[stage], ml_collections.ConfigDict):
            raise ConfigError(f"{where} names stage '{stage}', which has no config.{stage} section")
        if stage in order and name in order and order.index(stage) > order.index(name):
            raise ConfigError(f"{where}: stage '{stage}' runs after '{name}' in config.stages")
        if stage not in order and not inputs.is_done(workdir, stage):
            raise ConfigError(
                f"{where} names stage '{stage}', which is not in config.stages and has not "
                f"finished in {inputs.stage_dir(workdir, stage)}"
            )
    for key, stage in named:
        if not inputs.is_done(workdir, stage):
            raise InputError(
                f"config key '{name}.{key}': stage '{stage}' has not finished in "
                f"{inputs.stage_dir(workdir, stage)}"
            )


def sample_seed(seed: int, *parts: object) -> int:
    """A sampling seed from the config seed and what is sampled (stable across runs)."""
    return zlib.crc32("\x00".join(map(str, (seed, *parts))).encode()) % 2**31


# ---------------------------------------------------------------- evaluating one model
@dataclasses.dataclass
class EvalData:
    records: list[dict]  # held-out prompt records (family, params)
    fewshot: list[dict] | None  # the same prompts with examples prepended
    heldout_rows: list[list[int]]
    public: list[dict]


def sample_responses(
    model, params, chat, prompts: Sequence[str], c, *, seed: int, budget: int, key: str
) -> tuple[list[list[str]], list[list[bool]], int]:
    """k responses per prompt (`chat`: a chat_format.ChatFormat): texts [N][k], stopped
    [N][k], the new-token budget used, and the sampled token ids [N][k] (stop excluded)."""
    k = 1 if c.greedy else c.num_samples
    prompt_len = max(len(chat.prompt_ids(p)) for p in prompts)
    new_tokens = min(budget, model.config.max_len - prompt_len)
    if new_tokens < 1:
        raise ConfigError(f"config key '{key}': prompts of {prompt_len} tokens fill the context")
    if new_tokens < budget:  # cut responses score lower: this model is at a disadvantage
        logging.warning(
            "%s: prompts of %d tokens leave room for %d of %d new tokens",
            key,
            prompt_len,
            new_tokens,
            budget,
        )
    texts, stopped, _, ids = generate(
        model,
        params,
        chat.tokenizer,
        [p for p in prompts for _ in range(k)],
        max_new_tokens=new_tokens,
        max_prompt_len=prompt_len,
        seed=seed,
        temperature=c.temperature,
        greedy=c.greedy,
        batch_size=c.batch_size,
        with_ids=True,
        chat=chat,
    )
    per_prompt = [slice(i * k, (i + 1) * k) for i in range(len(prompts))]
    return (
        [texts[s] for s in per_prompt],
        [stopped[s] for s in per_prompt],
        new_tokens,
        [ids[s] for s in per_prompt],
    )


def reward_model_results(name, workdir, rm_stage, chat, prompts, ref, bon) -> tuple:
    """(gold accuracy dict, best-of-n raw scores [N, S] or None) of RM stage `rm_stage`,
    loaded once.

    Gold accuracy: the RM's ranking accuracy against the gold judge on the reference's
    held-out samples `ref` (pairs of one prompt with different gold scores): what PPO will
    optimise, measured where the labelers' noise plays no part. `bon`: best-of-n samples
    (best_of_n_samples) or None.
    """
    export = os.path.join(inputs.stage_dir(workdir, rm_stage), inputs.EXPORT_DIR)
    rm = RewardModel.load(export, chat.tokenizer, chat=chat)
    raw = rm_scores(rm, prompts, ref["texts"], ref["stopped"])
    accuracy, pairs = ranking_accuracy(raw, ref["scores"])
    logging.info("%s: RM %s orders %s of %d gold pairs", name, rm_stage, accuracy, pairs)
    bon_scores = None if bon is None else rm_scores(rm, prompts, bon["texts"], bon["stopped"])
    return {"gold_accuracy": accuracy, "gold_pairs": pairs}, bon_scores


def rm_scores(rm: RewardModel, prompts, texts, stopped) -> np.ndarray:
    """Raw scores f32 [N, k] of `rm` for texts/stopped [N][k]."""
    k = len(texts[0])
    flat_prompts = [p for p in prompts for _ in range(k)]
    flat_texts = [t for ts in texts for t in ts]
    flat_stopped = [s for ss in stopped for s in ss]
    raw = rm.score(flat_prompts, flat_texts, stopped=flat_stopped, raw=True)
    return np.asarray(raw).reshape(len(prompts), k)


def stage_model(workdir: str, stage: str, loaded: tuple | None) -> tuple:
    """(model, params) of `stage`: those of `loaded` = (stage, model, params) when it is that
    stage, else loaded from its export."""
    if loaded is not None and loaded[0] == stage:
        return loaded[1], loaded[2]
    return load_stage_model(workdir, stage)


def best_of_n_samples(config, name, workdir, tokenizer, data: EvalData, loaded) -> dict | None:
    """`best_of_n` fresh samples per prompt of stage `best_of_n_from` (default: the
    reference): {"policy", "texts", "stopped", "gold"}; None when off or without an RM.
    loaded: (stage, model, params) already in memory, used when it is that stage."""
    c = config[name]
    if c.best_of_n <= 0 or not stage_list(c.rm_from):
        return None
    sample_cfg = ml_collections.ConfigDict(c.to_dict())
    sample_cfg.update(num_samples=c.best_of_n, greedy=False)
    policy = c.best_of_n_from or c.reference
    model, params = stage_model(workdir, policy, loaded)
    texts, stopped, _, _ = sample_responses(
        model,
        params,
        chat_format.for_data(tokenizer, config.data),
        [r["prompt"] for r in data.records],
        sample_cfg,
        seed=sample_seed(config.seed, "best_of_n", policy),
        budget=c.max_new_tokens or config.data.max_response_len + 1,
        key=f"{name}.prompts",
    )
    gold = gold_scores(data.records, texts, stopped)
    return {"policy": policy, "texts": texts, "stopped": stopped, "gold": gold}


def response_rows(chat, prompts, ids, stopped) -> tuple[list[list[int]], list[int]]:
    """Token rows prompt response [stop if it stopped] of sampled ids [N][k] (`chat`'s
    layout: plain, [BOS] prompt response [EOS]), and the index of each row's first response
    token (where its NLL starts counting)."""
    rows, first = [], []
    for prompt, row_ids, row_stopped in zip(prompts, ids, stopped, strict=True):
        prefix = chat.prompt_ids(prompt)
        for x, stop in zip(row_ids, row_stopped, strict=True):
            rows.append(prefix + list(x) + ([chat.stop_id] if stop else []))
            first.append(len(prefix))
    return rows, first


def add_kl_to_reference(workdir, c, tokenizer, results: list[dict], samples: list[dict]) -> None:
    """results[i]["kl_to_reference"]: the mean over model i's own samples of
    log p_model(y|x) - log p_reference(y|x) (nats per response; the sampled-KL estimate of
    KL(model || reference) at temperature 1), for the evaluated model itself (for PPO, its
    EMA export). None for few-shot and greedy evaluations. The reference is loaded once,
    after the others, so one model is in memory at a time."""
    todo = [(r, s.pop("kl_rows")) for r, s in zip(results, samples, strict=True) if "kl_rows" in s]
    for r in results:
        r["kl_to_reference"] = None
    if not todo or c.temperature != 1.0:
        return
    model, params = load_stage_model(workdir, c.reference)
    for result, (rows, first, nll) in todo:
        ref_nll, _ = batched_nll(
            model, params, rows, first, pad_id=tokenizer.pad_id, batch_size=c.batch_size
        )
        result["kl_to_reference"] = float(np.mean(ref_nll - nll))


# ---------------------------------------------------------------- the stage
def evaluate_stage(
    config,
    name: str,
    workdir: str,
    stage: str,
    specs: Sequence[ModelSpec],
    data: EvalData,
    tokenizer,
    ref_scores: np.ndarray,
    loaded: tuple | None = None,
) -> tuple[list[dict], list[dict]]:
    """The results and samples of the specs that use `stage`'s model (alignment tax once).
    loaded: (stage, model, params) already in memory, used when it is `stage`."""
    c = config[name]
    chat = chat_format.for_data(tokenizer, config.data)
    model, params = stage_model(workdir, stage, loaded)
    tax = alignment_tax(model, params, tokenizer, data.heldout_rows, data.public, c)
    results, samples = [], []
    for s in specs:
        prompts = [r["prompt"] for r in (data.fewshot if s.fewshot else data.records)]
        texts, stopped, new_tokens, ids = sample_responses(
            model,
            params,
            chat,
            prompts,
            c,
            seed=sample_seed(config.seed, stage, s.fewshot),
            budget=c.max_new_tokens or config.data.max_response_len + 1,
            key=f"{name}.fewshot_prompts" if s.fewshot else f"{name}.prompts",
        )
        metrics, scores = response_metrics(data.records, texts, stopped, ref_scores, tokenizer)
        results.append(
            {
                **dataclasses.asdict(s),
                "params": count_params(params),
                "max_new_tokens": new_tokens,
                **metrics,
                **({k: None for k in tax} if s.fewshot else tax),
            }
        )
        sample = {**dataclasses.asdict(s), "texts": texts, "stopped": stopped, "scores": scores}
        if not s.fewshot and not c.greedy:  # KL to the reference: its samples, this model's NLL
            rows, first = response_rows(chat, prompts, ids, stopped)
            nll, _ = batched_nll(
                model, params, rows, first, pad_id=tokenizer.pad_id, batch_size=c.batch_size
            )
            sample["kl_rows"] = (rows, first, nll)
        samples.append(sample)
        logging.info(
            "%s: %s %s (%s): win rate %.3f +- %.3f",
            name,
            s.size,
            s.label,
            s.stage,
            metrics["win_rate"],
            metrics["stderr"] or 0.0,
        )
    return results, samples


SPLITS = ("dev", "test")


def prompt_files(c: ml_collections.ConfigDict, name: str) -> tuple[str, str]:
    """(prompts, few-shot prompts) of the eval section `c`: its own, else the world's
    files of `c.split`."""
    if c.split not in SPLITS:
        raise ConfigError(f"config key '{name}.split' must be one of {SPLITS}, got {c.split!r}")
    prompts = c.prompts or f"@world/prompts_{c.split}.jsonl"
    return prompts, c.fewshot_prompts or f"@world/prompts_{c.split}_fewshot.jsonl"


def load_data(config, name: str, workdir: str, tokenizer, need_fewshot: bool) -> EvalData:
    c = config[name]
    prompt_file, fewshot_file = prompt_files(c, name)
    path = inputs.resolve_path(prompt_file, workdir)
    recs = read_prompts(path)[0]
    recs = recs[: c.num_prompts] if c.num_prompts > 0 else recs
    for rec in recs:
        if rec.data.get("family") not in world.FAMILIES or "params" not in rec.data:
            raise InputError(f"{rec.where}: eval prompts need the world's 'family' and 'params'")
    fewshot = None
    if need_fewshot:
        fs = read_prompts(inputs.resolve_path(fewshot_file, workdir))[0][: len(recs)]
        if len(fs) < len(recs):
            raise InputError(f"config key '{name}.fewshot_prompts': fewer prompts than {path}")
        for a, b in zip(recs, fs, strict=True):
            if (
                not b.data["prompt"].endswith(a.data["prompt"])
                or b.data.get("params") != a.data["params"]
            ):
                raise InputError(f"{b.where}: few-shot prompt does not end with {a.where}'s prompt")
        fewshot = [b.data for b in fs]
    docs = read_pretrain(inputs.resolve_path(c.heldout, workdir))[0]
    docs = docs[: c.heldout_num] if c.heldout_num > 0 else docs
    window = config.data.seq_len
    rows = [
        w
        for d in docs
        for w in text_windows(tokenizer.encode(d.data["text"], add_bos=True, add_eos=True), window)
    ]
    public = [r.data for r in read_prompts(inputs.resolve_path(c.public_task, workdir))[0]]
    return EvalData([r.data for r in recs], fewshot, rows, public)


def run(config: ml_collections.ConfigDict, name: str, workdir: str) -> None:
    from instructrl.eval import plots as eval_plots

    c = config[name]
    out_dir = inputs.stage_dir(workdir, name)
    if c.num_samples < 1 or (not c.greedy and c.temperature <= 0):
        raise ConfigError(f"config keys '{name}.num_samples/temperature' need >= 1 and > 0")
    # ---- check every named stage and file before any work
    prompt_files(c, name)
    specs = parse_models(c.models, f"{name}.models")
    named = [("models", s.stage) for s in specs] + [("reference", c.reference)]
    named += [(key, s) for key in ("rm_from", "collect_from") for s in stage_list(c[key])]
    named += [("best_of_n_from", c.best_of_n_from)] if c.best_of_n_from else []
    check_input_stages(config, name, workdir, named)

    # ---- data
    tokenizer = tokenizer_lib.load(inputs.tokenizer_path(config, name, workdir))
    chat = chat_format.for_data(tokenizer, config.data)  # a bad template fails before work
    data = load_data(config, name, workdir, tokenizer, any(s.fewshot for s in specs))
    prompts = [r["prompt"] for r in data.records]
    logging.info(
        "%s: %d prompts, %d models, reference %s", name, len(prompts), len(specs), c.reference
    )

    # ---- reference samples
    model, params = load_stage_model(workdir, c.reference)
    ref_texts, ref_stopped, _, _ = sample_responses(
        model,
        params,
        chat,
        prompts,
        c,
        seed=sample_seed(config.seed, "reference", c.reference),
        budget=c.max_new_tokens or config.data.max_response_len + 1,
        key=f"{name}.prompts",
    )
    ref_metrics, ref_scores = response_metrics(
        data.records, ref_texts, ref_stopped, None, tokenizer
    )
    ref_metrics["fillers_dropped"] = fillers_dropped(
        data.records, ref_texts, ref_stopped, ref_scores
    )
    samples = [
        {
            "size": "",
            "label": "reference",
            "stage": c.reference,
            "texts": ref_texts,
            "stopped": ref_stopped,
            "scores": ref_scores,
        }
    ]
    reference = (c.reference, model, params)
    del model, params
    bon = best_of_n_samples(config, name, workdir, tokenizer, data, reference)

    # ---- each model: samples, gold comparisons, alignment tax (once per stage); the
    # reference's stage first, while it is loaded, then results in the order of `models`
    stages = list(dict.fromkeys(s.stage for s in specs))
    by_stage = {}
    for stage in sorted(stages, key=lambda st: st != c.reference):
        stage_specs = [s for s in specs if s.stage == stage]
        by_stage[stage] = evaluate_stage(
            config, name, workdir, stage, stage_specs, data, tokenizer, ref_scores, reference
        )
        reference = None  # one model in memory at a time
    results = [r for stage in stages for r in by_stage[stage][0]]
    samples += [x for stage in stages for x in by_stage[stage][1]]
    add_kl_to_reference(workdir, c, tokenizer, results, samples[1:])

    # ---- RM accuracy vs labeler agreement, PPO curves
    reward_models, rm_selectors = [], {}
    for s in stage_list(c.rm_from):
        accuracy, bon_scores = reward_model_results(
            name, workdir, s, chat, prompts, samples[0], bon
        )
        reward_models.append({"stage": s, **_read_json(workdir, s, "results.json"), **accuracy})
        rm_selectors[f"RM {s}"] = bon_scores
    labeler_stats = [
        {"stage": s, **_read_json(workdir, s, "labelers.json")} for s in stage_list(c.collect_from)
    ]
    ppo_runs = {
        s.stage: eval_plots.read_metrics(os.path.join(workdir, s.stage, "metrics.jsonl"))
        for s in specs
        if config[s.stage].get("kind") in ("ppo", "grpo")
    }

    summary = {
        "reference": {"stage": c.reference, **ref_metrics},
        "settings": {
            "num_prompts": len(prompts),
            "num_samples": 1 if c.greedy else c.num_samples,
            "temperature": c.temperature,
            "greedy": c.greedy,
            "split": c.split if not c.prompts else c.prompts,
            "seed": config.seed,
            "judge": "gold scores, ties 1/2",
            "families": list(world.FAMILY_NAMES),
        },
        "sizes": eval_plots.size_params(results),
        "models": results,
        "reward_models": reward_models,
        "labelers": labeler_stats,
        "paper": {"rm_accuracy": 0.72, "inter_labeler_agreement": labelers.PAPER_AGREEMENT},
        "ppo": eval_plots.ppo_summaries(ppo_runs),
        "best_of_n": best_of_n(config, name, bon, rm_selectors, ref_scores),
        # wall time and peak memory of each model's training stage (not of a model's numbers:
        # a re-run changes these, never the models' results)
        "training_costs": {
            r["stage"]: frontier.training_cost(workdir, r["stage"]) for r in results
        },
    }
    if jax.process_index() != 0:
        return
    os.makedirs(out_dir, exist_ok=True)
    summary["plots"] = eval_plots.write_plots(summary, ppo_runs, out_dir)
    if frontier.plot_frontier(summary, os.path.join(out_dir, "frontier.png")):
        summary["plots"].append("frontier.png")
    _write_samples(os.path.join(out_dir, "samples.jsonl"), data.records, samples)
    _write_text(
        os.path.join(out_dir, "results.json"),
        json.dumps(eval_plots.json_safe(summary), indent=1, allow_nan=False),
    )
    markdown = eval_plots.results_markdown(summary)
    markdown += "\n\n## Methods: win rate, KL and cost\n\n" + "\n".join(
        frontier.frontier_lines(summary)
    )
    _write_text(os.path.join(out_dir, "results.md"), markdown + "\n")
    print(eval_plots.main_table(summary), flush=True)
    for line in eval_plots.best_of_n_lines(summary.get("best_of_n")):
        print(line, flush=True)
    line = eval_plots.fillers_dropped_line(summary["reference"])
    if line:
        print(line, flush=True)


def _read_json(workdir: str, stage: str, filename: str) -> dict:
    path = os.path.join(workdir, stage, filename)
    if not os.path.exists(path):
        raise InputError(f"{path}: missing (stage '{stage}' writes it when it finishes)")
    with open(path) as f:
        return json.load(f)


def _write_text(path: str, text: str) -> None:
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.write(text if text.endswith("\n") else text + "\n")
    os.replace(path + ".tmp", path)


def _write_samples(path: str, records: list[dict], samples: list[dict]) -> None:
    lines = []
    for s in samples:
        for i, r in enumerate(records):
            lines.append(
                json.dumps(
                    {
                        "size": s["size"],
                        "label": s["label"],
                        "stage": s["stage"],
                        "fewshot": s.get("fewshot", False),
                        "prompt": r["prompt"],
                        "family": r["family"],
                        "responses": s["texts"][i],
                        "stopped": s["stopped"][i],
                        "gold_scores": [float(x) for x in s["scores"][i]],
                    },
                    ensure_ascii=False,
                )
            )
    _write_text(path, "\n".join(lines))
