"""Stage `rm`: the reward model, trained on K-wise ranked comparisons (docs/method.md §2).

The SFT trunk (`init_from`) with a fresh scalar head; each batch element is one prompt with
its K responses (padded to K_max), so all C(K,2) pairs of a ranking share one element and
cost K forward passes. Loss: per prompt, −mean over its pairs of log σ(r_w − r_l); 1 epoch,
cosine to 10%. Validation: pairwise accuracy and loss. With `pack_responses` a batch holds
only its real responses, padded to whole rows and cut to its longest row
(data.examples.pack_responses): the same rewards without the padding's work (single-process
runs; shapes vary by batch, so a few more compiles). After training, a `Normalization`
(`normalize`: "demonstrations", the paper; "policy", Ziegler et al.; or "none") is fitted and
saved next to the exported params (`DIR/<name>/export/reward_normalization.json`).
"""

from __future__ import annotations

import json
import math
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from instructrl import chat_format, losses, sharding, train_lib
from instructrl import checkpoint as ckpt_lib
from instructrl import tokenizer as tokenizer_lib
from instructrl.data import rm_pipeline
from instructrl.data.examples import pack_responses
from instructrl.data.pipeline import per_process_batch
from instructrl.errors import ConfigError
from instructrl.models import positions_from_mask
from instructrl.models.reward import (
    NORMALIZATION_FILE,
    NORMALIZE_MODES,
    Normalization,
    rewards_of,
)
from instructrl.models.sampling import sample_jit
from instructrl.stages import driver, inputs


def default_config() -> ml_collections.ConfigDict:
    """Paper settings: 1 epoch, LR 9e-6 cosine to 10%, batch of 64 prompts."""
    c = ml_collections.ConfigDict()
    c.kind = "rm"
    c.init_from = "sft"
    c.tokenizer_from = "tokenizer"
    c.batch_size = 64  # prompts (each with its K responses)
    c.accum_steps = 1
    c.num_epochs = 1
    c.num_steps = 0  # > 0 overrides num_epochs
    c.dropout = 0.0
    c.eval_every = 0  # steps; 0 = at the end only
    c.eval_batches = 0  # 0 = the whole validation split
    c.log_every = 10
    c.checkpoint_every = 500
    c.max_to_keep = 2
    c.normalize = "demonstrations"  # "demonstrations" | "policy" | "none"
    c.normalize_policy_from = ""  # stage whose samples define mean 0 / std 1 ("policy")
    c.normalize_num = 512  # demonstrations or policy samples used for the fit
    c.pack_responses = False  # batches of the real responses only (module docstring)
    c.optimizer = train_lib.default_optimizer_config()
    c.optimizer.lr = 9e-6
    return c


def run(config: ml_collections.ConfigDict, name: str, workdir: str) -> None:
    c = config[name]
    if c.normalize not in NORMALIZE_MODES:
        raise ConfigError(f"config key '{name}.normalize' must be one of {NORMALIZE_MODES}")
    stage_dir = inputs.stage_dir(workdir, name)

    # ---- model and mesh
    setup = driver.setup_model(config, name, workdir, head="scalar")
    model, mesh, rules = setup.model, setup.mesh, setup.rules

    # ---- data
    tokenizer = tokenizer_lib.load(inputs.tokenizer_path(config, name, workdir))
    data_cfg = driver.data_config(config, workdir, name)
    shard_index, shard_count = sharding.data_shard_info(mesh)
    if c.pack_responses and jax.process_count() > 1:
        raise ConfigError(
            f"config key '{name}.pack_responses' needs one process: packed batches differ in "
            f"shape between processes ({jax.process_count()} here)"
        )
    # packed rows are split over the mesh's batch shards like any batch
    row_multiple = math.lcm(PACK_ROWS, mesh.shape["data"] * mesh.shape["fsdp"])
    built = inputs.build_data("comparisons", data_cfg, tokenizer)
    if data_cfg.max_responses == 0:  # one K_max for train and validation batches
        data_cfg.max_responses = built.stats.max_responses

    def batches(split: str, num_epochs: int, *, train: bool = True):
        it = rm_pipeline(
            built,
            tokenizer,
            data_cfg,
            batch_size=c.batch_size,
            split=split,
            num_epochs=num_epochs,
            seed=config.seed,
            shuffle=train,
            drop_remainder=train,
            process_index=shard_index,
            process_count=shard_count,
        )
        return PackedBatches(it, row_multiple) if c.pack_responses else it

    if c.num_steps > 0:
        total_steps = c.num_steps
        data_iter = batches("train", 0)
    else:
        data_iter = batches("train", c.num_epochs)  # first: it names a missing train split
        # each process's equal share of the records, in whole batches (pipeline.shard_records)
        rows = per_process_batch(c.batch_size, shard_count)
        per_epoch = len(built.sources["train"]) // shard_count // rows
        if per_epoch == 0:
            raise ConfigError(
                f"config key '{name}.batch_size' ({c.batch_size}) is larger than the "
                "comparisons training split"
            )
        total_steps = per_epoch * c.num_epochs
    logging.info("%s: %d steps of %d prompts (K_max=%d)", name, total_steps, c.batch_size,
                 data_cfg.max_responses)  # fmt: skip

    # ---- train state (fresh from the SFT trunk, or resumed)
    optimizer = train_lib.make_optimizer(c.optimizer, total_steps)
    checkpointer = ckpt_lib.Checkpointer(
        stage_dir, save_interval_steps=c.checkpoint_every, max_to_keep=c.max_to_keep
    )
    run_state, state_shardings = driver.start_run(
        setup, stage_dir, checkpointer, optimizer, data_iter, seed=config.seed, from_lm=True
    )

    # ---- step
    def loss_fn(params, batch, rng):
        r = rewards_of(model, params, batch, deterministic=False, rng=rng)
        total, count = losses.reward_loss_sum(r, batch["pair_mask"])
        correct, pairs = losses.reward_accuracy(r, batch["pair_mask"])
        metrics = {"accuracy": correct / jnp.maximum(pairs, 1.0), "weight": count}
        return total / jnp.maximum(count, 1.0), metrics

    def eval_fn(params, batch):
        r = rewards_of(model, params, batch)
        total, count = losses.reward_loss_sum(r, batch["pair_mask"])
        correct, pairs = losses.reward_accuracy(r, batch["pair_mask"])
        return jnp.stack([total, count, correct, pairs])

    train_step, eval_step = driver.compile_steps(
        setup, c, optimizer, total_steps, state_shardings, loss_fn, eval_fn
    )

    def evaluate(state, step: int) -> dict[str, float]:
        del step
        if "validation" not in built.sources:
            return {}
        sums = np.zeros(4)
        it = batches("validation", 1, train=False)
        with sharding.mesh_context(mesh, rules):
            for b in driver.take(it, c.eval_batches):
                sums += np.asarray(jax.device_get(eval_step(state.params, sharding.shard_batch(b, mesh))))  # fmt: skip
        total, count, correct, pairs = sums
        return {"val_loss": total / max(count, 1.0), "val_accuracy": correct / max(pairs, 1.0)}

    # ---- loop
    state = driver.train_loop(
        run_state,
        train_step,
        name=name,
        stage_dir=stage_dir,
        mesh=setup.mesh,
        checkpointer=checkpointer,
        total_steps=total_steps,
        log_every=c.log_every,
        eval_every=c.eval_every or total_steps,
        evaluate=evaluate,
        tokens_per_step=c.batch_size * data_cfg.max_responses * data_cfg.seq_len,
    )

    # ---- normalisation and export
    raw = normalization_scores(config, name, workdir, setup, state.params, tokenizer, data_cfg)
    norm = Normalization.fit(raw, c.normalize)
    logging.info("%s: normalisation %s", name, norm)
    export_dir = os.path.join(stage_dir, inputs.EXPORT_DIR)
    ckpt_lib.export_params(state.params, setup.model_dict, export_dir)
    if jax.process_index() == 0:
        with open(os.path.join(export_dir, NORMALIZATION_FILE), "w") as f:
            json.dump(norm.__dict__, f, indent=2)
        final = evaluate(state, total_steps)
        with open(os.path.join(stage_dir, "results.json"), "w") as f:
            json.dump({**final, "normalization": norm.__dict__}, f, indent=2)


PACK_ROWS, PACK_LENGTH = 32, 8  # packed batches: rows and lengths rounded up to these


class PackedBatches:
    """An RM batch iterator whose batches are packed (pack_responses); same saved state."""

    def __init__(self, it, row_multiple: int):
        self.it, self.row_multiple = it, row_multiple

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        return pack_responses(next(self.it), self.row_multiple, PACK_LENGTH)

    def get_state(self) -> bytes:
        return self.it.get_state()

    def set_state(self, state: bytes | str) -> None:
        self.it.set_state(state)


def normalization_scores(config, name, workdir, setup, params, tokenizer, data_cfg) -> np.ndarray:
    """Raw RM scores to fit the normalisation on: demonstrations (prompt + completion) or
    samples of the policy named by `normalize_policy_from` on training prompts."""
    c = config[name]
    if c.normalize == "none":
        return np.zeros((0,), np.float32)
    score_fn = jax.jit(
        lambda p, t, m: setup.model.apply({"params": p}, t, positions_from_mask(m), m)
    )
    if c.normalize == "demonstrations":
        built = inputs.build_data("demonstrations", data_cfg, tokenizer)
        chat = chat_format.for_data(tokenizer, data_cfg)
        rows = _demonstration_rows(built, chat, data_cfg.seq_len, c.normalize_num)
        return _batched_scores(score_fn, params, *rows, batch_size=c.batch_size)
    policy_dir = inputs.export_dir(config, name, "normalize_policy_from", workdir)
    return policy_sample_scores(
        config, policy_dir, setup, params, tokenizer, data_cfg, c.normalize_num
    )


def _demonstration_rows(built, chat: chat_format.ChatFormat, seq_len: int, limit: int):
    """[BOS] prompt completion [EOS] rows of the first `limit` demonstrations, in the data's
    chat format (a template's rendered turn and stop token), right-padded to seq_len."""
    source = built.sources["train"]  # the labeler demonstrations the policy imitates
    n = min(limit, len(source))
    tokens = np.full((n, seq_len), chat.tokenizer.pad_id, np.int32)
    mask = np.zeros((n, seq_len), np.int32)
    for i in range(n):
        rec = json.loads(source[i]["record"])
        prompt = chat.prompt_ids(rec["prompt"])
        seq = [*prompt, *chat.response_ids(rec["prompt"], rec["completion"]), chat.stop_id]
        seq = seq[:seq_len]
        tokens[i, : len(seq)] = seq
        mask[i, : len(seq)] = 1
    return tokens, mask


def _batched_scores(fn, params, tokens, mask, *, batch_size: int) -> np.ndarray:
    out = []
    for s in range(0, len(tokens), batch_size):
        out.append(np.asarray(fn(params, tokens[s : s + batch_size], mask[s : s + batch_size])))
    return np.concatenate(out) if out else np.zeros((0,), np.float32)


def policy_sample_scores(config, policy_dir, setup, params, tokenizer, data_cfg, n) -> np.ndarray:
    """Raw RM scores of one sample (temperature 1) per prompt from the policy export."""
    from instructrl.data import ppo_pipeline

    lm = setup.lm_model()
    policy_params, _ = ckpt_lib.load_exported(policy_dir, setup.lm_param_shardings())
    built = inputs.build_data("prompts", data_cfg, tokenizer)
    prompt_cfg = ml_collections.ConfigDict(data_cfg.to_dict())
    prompt_cfg.ptx_ratio = 0.0
    it = ppo_pipeline(built, tokenizer, prompt_cfg, batch_size=64, num_epochs=1, shuffle=False,
                      drop_remainder=False, process_index=0, process_count=1)  # fmt: skip
    new_tokens = data_cfg.seq_len - data_cfg.max_prompt_len
    score_fn = jax.jit(
        lambda p, t, m: setup.model.apply({"params": p}, t, positions_from_mask(m), m)
    )
    stop_id = chat_format.for_data(tokenizer, data_cfg).stop_id
    return sampled_scores(
        lm, policy_params, lambda t, m: score_fn(params, t, m), it, stop_id, tokenizer.pad_id, n=n,
        new_tokens=new_tokens, rng=jax.random.key(config.seed), greedy=False,
    )  # fmt: skip


def mean_greedy_score(config, name, workdir, setup, params) -> float:
    """Mean normalised score, by the RM named in `<name>.select_reward_from`, of greedy
    samples of an LM on validation prompts (SFT checkpoint selection, docs/method.md §1)."""
    from instructrl.data import ppo_pipeline
    from instructrl.models.reward import RewardModel

    c = config[name]
    rm_dir = inputs.export_dir(config, name, "select_reward_from", workdir)
    tokenizer = tokenizer_lib.load(inputs.tokenizer_path(config, name, workdir))
    rm = RewardModel.load(rm_dir, tokenizer)
    data_cfg = driver.data_config(config, workdir, name)
    data_cfg.ptx_ratio = 0.0
    built = inputs.build_data("prompts", data_cfg, tokenizer)
    split = "validation" if "validation" in built.sources else "train"
    it = ppo_pipeline(built, tokenizer, data_cfg, batch_size=min(64, c.select_num_prompts),
                      split=split, num_epochs=1, shuffle=False, drop_remainder=False,
                      process_index=0, process_count=1)  # fmt: skip
    new_tokens = data_cfg.seq_len - data_cfg.max_prompt_len
    scores = sampled_scores(
        setup.model, params, lambda t, m: rm.normalization.apply(rm.raw_tokens(t, m)), it,
        chat_format.for_data(tokenizer, data_cfg).stop_id, tokenizer.pad_id,
        n=c.select_num_prompts, new_tokens=new_tokens, rng=jax.random.key(0),
        greedy=True,
    )  # fmt: skip
    return float(scores.mean())


def sampled_scores(lm, lm_params, score, batches, stop_id, pad_id, *, n, new_tokens, rng, greedy):
    """score(tokens, mask) [B] of one sample per prompt by `lm`, for the first n real prompts
    of `batches` (ppo_pipeline batches: left-padded prompt_tokens/prompt_mask; all-pad rows
    dropped), each sample ending at `stop_id`. Batch i samples with fold_in(rng, i); greedy
    ignores rng."""
    scores = []
    for i, batch in enumerate(batches):
        keep = batch["prompt_mask"].any(axis=1)
        out = sample_jit(lm, lm_params, jnp.asarray(batch["prompt_tokens"]),
                         jnp.asarray(batch["prompt_mask"]), jax.random.fold_in(rng, i),
                         max_new_tokens=new_tokens, greedy=greedy, stop_token=stop_id,
                         pad_id=pad_id)  # fmt: skip
        tokens = np.concatenate([batch["prompt_tokens"], np.asarray(out.tokens)], axis=1)
        mask = np.concatenate([batch["prompt_mask"], np.asarray(out.mask)], axis=1)
        scores.append(np.asarray(score(tokens, mask))[keep])
        if sum(len(x) for x in scores) >= n:
            break
    if not scores:
        raise ValueError("sampled_scores: no prompt batches to sample from")
    return np.concatenate(scores)[:n]
