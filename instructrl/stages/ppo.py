"""Stages `ppo` and `grpo`: PPO / PPO-ptx against the reward model (docs/method.md §3), and
critic-free RL (GRPO, Dr.GRPO, RLOO; stages/grpo.py has its defaults) in the same programs.

Policy and frozen reference both start from the export of `init_from` (the PPO-init SFT
model); the reward model is the normalised RM of `reward_from`; the value function is a
separate network initialised from the RM (or, with `value_head_on_policy`, a zero head on
the policy trunk). Each iteration is two compiled programs (instructrl/rl/ppo.py): a rollout
(sampling with the KV cache, log-probs of policy and reference at the sampling
temperature, values, RM score, per-token KL rewards) and an update (GAE, whitening, all
epochs and minibatches, and γ_ptx × the LM loss on pretraining text when `ptx_coef` > 0).
Only metrics cross to the host, on logging iterations.

Writes `DIR/<name>/metrics.jsonl` (one line per logged iteration: score, KL, β, losses,
timings, and `gold_score` when the prompts come from the synthetic world), checkpoints
(state incl. EMA and KL controller, data position), and `export/` holding the EMA policy
(the evaluated model, as in the paper) or the last policy when `ema_decay` is 0.

`gold_reward=True` (not the paper's method: an oracle for the synthetic world) scores each
episode with the world's gold scorer, `gold_reward_scale` x score in [0, 1], instead of the
RM; the RM of `reward_from` still initialises the value network. Trained against the exact
preference the evaluation judges by, it is the upper bound of what a perfect reward model
would let PPO reach, so a run can tell a weak RM from weak RL (experiments/tiny_instructgpt.py
`ppo_gold`). Single-process only: the scorer is a host callback.
"""

from __future__ import annotations

import json
import os
import time

import jax
import ml_collections
import numpy as np
from absl import logging

from instructrl import chat_format, sharding, world
from instructrl import checkpoint as ckpt_lib
from instructrl import tokenizer as tokenizer_lib
from instructrl.data import ppo_pipeline, prompt_record
from instructrl.errors import ConfigError
from instructrl.models import ModelConfig, Transformer
from instructrl.models.reward import Normalization, RewardModel
from instructrl.rl import ppo
from instructrl.rl.stage_config import DRIVER_KEYS, default_config, ppo_config  # noqa: F401
from instructrl.sample import decode_response
from instructrl.stages import driver, inputs
from instructrl.tokenizer import TokenizerBase


def run(config: ml_collections.ConfigDict, name: str, workdir: str) -> None:
    c = config[name]
    stage_dir = inputs.stage_dir(workdir, name)
    tokenizer = tokenizer_lib.load(inputs.tokenizer_path(config, name, workdir))
    rm_dir = inputs.export_dir(config, name, "reward_from", workdir)
    norm = Normalization.load(rm_dir)
    penalty_unit = float(c.gold_reward_scale) if c.gold_reward else norm.score_std
    data_cfg = driver.data_config(config, workdir, name)
    stop_id = chat_format.for_data(tokenizer, data_cfg).stop_id  # EOS, or the end of turn
    cfg = ppo_config(c, name, stop_id, tokenizer.pad_id, penalty_unit)
    logging.info(
        "%s: no-stop penalty %g sd = %.3f score units; EMA decay %.4f",
        name, c.no_stop_penalty, cfg.no_stop_penalty, cfg.ema_decay,
    )  # fmt: skip

    # ---- models: policy/reference from init_from, RM (+ value init) from reward_from
    setup = driver.setup_model(config, name, workdir)
    mesh, rules = setup.mesh, setup.rules
    with open(os.path.join(rm_dir, ckpt_lib.MODEL_CONFIG_FILE)) as f:
        rm_config = ModelConfig.from_dict(json.load(f))
    reward_model = Transformer(rm_config, head="scalar")
    models = ppo.PPOModels(
        policy=setup.model,
        reward=reward_model,
        value=reward_model if cfg.separate_value_network else None,
    )
    # ptx rows per prompt (the pipeline's unit): ptx_ratio per episode x G episodes a prompt
    data_cfg.ptx_ratio = cfg.ptx_ratio * cfg.group_size if cfg.ptx_coef > 0 else 0.0
    total_len = data_cfg.max_prompt_len + cfg.max_new_tokens
    for who, mc in (("init_from", setup.model.config), ("reward_from", rm_config)):
        if total_len > mc.max_len:
            raise ConfigError(
                f"config key '{name}.max_new_tokens': data.max_prompt_len + max_new_tokens = "
                f"{total_len} exceeds the max_len {mc.max_len} of the '{who}' model"
            )

    # ---- data: left-padded prompts (+ the pretraining stream for ptx)
    shard_index, shard_count = sharding.data_shard_info(mesh)
    prompts = inputs.build_data("prompts", data_cfg, tokenizer)
    ptx_data = inputs.build_data("pretrain", data_cfg, tokenizer) if cfg.ptx_coef > 0 else None
    data_iter = ppo_pipeline(
        prompts,
        tokenizer,
        data_cfg,
        batch_size=cfg.batch_size,
        ptx_data=ptx_data,
        num_epochs=0,
        seed=config.seed,
        process_index=shard_index,
        process_count=shard_count,
    )

    # ---- state: fresh (policy = reference, value = RM) or resumed
    optimizer = ppo.make_ppo_optimizer(cfg, c, c.num_iterations, name=name)
    abstract, state_shardings = ppo.abstract_ppo_state(models, cfg, optimizer, mesh, rules)
    reference, _ = ckpt_lib.load_exported(setup.init_dir, setup.param_shardings)
    _, rm_shardings = ppo.model_param_shardings(reward_model, mesh, rules)
    rm = RewardModel.load(rm_dir, shardings=rm_shardings)
    checkpointer = ckpt_lib.Checkpointer(
        stage_dir, save_interval_steps=c.checkpoint_every, max_to_keep=c.max_to_keep
    )
    restored = checkpointer.restore_latest(abstract)
    if restored is not None:
        state = restored.state
        data_iter.set_state(restored.data_state)
        logging.info("%s: resumed from iteration %d", name, restored.step)
    else:
        # The value net predicts normalised scores from the start (the RM's normalisation
        # folded into its head; with gold_reward it still starts from the normalised RM).
        norm = rm.normalization
        value = ppo.init_value_params(models, cfg, rm.params, norm.gain, norm.bias)
        key = jax.random.key(config.seed + 2)
        state = ppo.create_ppo_state(cfg, optimizer, reference, value, key, state_shardings)

    # ---- the two compiled programs
    params_shardings = ppo.rollout_params_shardings(models, cfg, mesh, rules)
    score_fn = None
    gain, bias = rm.normalization.gain, rm.normalization.bias
    if c.gold_reward:
        score_fn = gold_score_fn(prompts, tokenizer, name)
        gain, bias = float(c.gold_reward_scale), 0.0
        logging.info("%s: episodes scored by the gold scorer x %g, not the RM", name, gain)
    rollout_fn = ppo.make_rollout_fn(
        models, cfg, mesh=mesh, rules=rules, params_shardings=params_shardings, score_fn=score_fn
    )
    update_fn = ppo.make_update_fn(
        models, cfg, optimizer, mesh=mesh, rules=rules, state_shardings=state_shardings
    )

    # ---- loop: one rollout and one update per iteration
    def step_fn(state, batch, step):
        ptx_batch = {k: batch[f"ptx_{k}"] for k in ppo.PTX_KEYS} if cfg.ptx_coef > 0 else None
        start = time.perf_counter()
        params = ppo.rollout_params(state, reference, rm.params, gain, bias)
        rollout = rollout_fn(
            params,
            batch["prompt_tokens"],
            batch["prompt_mask"],
            ppo.iteration_keys(state.rng, step)[0],  # the update draws from the other stream
            state.kl["beta"],
        )
        jax.block_until_ready(rollout.response_tokens)  # a sync for the time split; no copy
        mid = time.perf_counter()
        state, metrics = update_fn(state, rollout, ptx_batch, state.rng)
        jax.block_until_ready(state.step)
        end = time.perf_counter()
        return state, {**rollout.metrics, **metrics}, (rollout, start, mid, end)

    def on_log(state, step, batch, aux) -> dict[str, float]:
        rollout, start, mid, end = aux
        generated = float(jax.device_get(rollout.response_mask.sum()))
        out = dict(
            rollout_seconds=mid - start,
            update_seconds=end - mid,
            rollout_fraction=(mid - start) / (end - start),
            rollout_tokens_per_s=cfg.episodes * total_len / (mid - start),
            generated_tokens_per_s=generated / (mid - start),
            update_tokens_per_s=cfg.episodes * total_len / (end - mid),
            episodes=step * cfg.episodes,
        )
        if c.gold_every and (step % c.gold_every == 0 or step == c.num_iterations):
            index = np.repeat(sharding.to_host(batch["index"]), cfg.group_size)
            out.update(gold_metrics(rollout, index, prompts, tokenizer))
        return out

    run = driver.Run(state, data_iter, {}, restored.step if restored is not None else None)
    state = driver.train_loop(
        run,
        step_fn,
        name=name,
        stage_dir=stage_dir,
        mesh=mesh,
        checkpointer=checkpointer,
        total_steps=c.num_iterations,
        log_every=c.log_every,
        on_log=on_log,
        tokens_per_step=cfg.episodes * total_len,
        unit="iteration",
    )

    # ---- export: the EMA policy is the evaluated model (paper)
    export = state.ema if cfg.ema_decay > 0 else state.params["policy"]
    export = jax.tree.map(lambda e, r: e.astype(r.dtype), export, reference)
    ckpt_lib.export_params(export, setup.model_dict, os.path.join(stage_dir, inputs.EXPORT_DIR))
    logging.info("%s: exported the %s policy", name, "EMA" if cfg.ema_decay > 0 else "last")


def gold_metrics(rollout, index, prompts, tokenizer) -> dict[str, float]:
    """Mean gold score of a rollout's responses, for prompts of the synthetic world; {} when
    the prompt records carry no task family. index: host ints, the prompt of each row."""
    tokens, mask = sharding.to_host((rollout.response_tokens, rollout.response_mask))
    records = [prompt_record(prompts, int(i)) for i in index]
    if any("family" not in r for r in records):
        return {}
    return {"gold_score": float(np.mean(gold_scores(records, tokens, mask, tokenizer)))}


def gold_scores(records, response_tokens, response_mask, tokenizer) -> np.ndarray:
    """float64 [B]: world.score of each decoded response (sample.decode_response) for its
    prompt record."""
    rows = zip(records, response_tokens, response_mask, strict=True)
    return np.array([world.score(r, *decode_response(t, m, tokenizer)) for r, t, m in rows])


def gold_score_fn(prompts, tokenizer: TokenizerBase, name: str) -> ppo.ScoreFn:
    """A rollout `score_fn` (instructrl/rl/rollout.py) that scores episodes with the synthetic
    world's gold scorer: a host callback decodes each left-padded prompt, finds its record
    (family and params) by text among `prompts`, and decodes the response."""
    if jax.process_count() > 1:
        raise ConfigError(
            f"config key '{name}.gold_reward': the gold scorer is a host callback that needs "
            f"every episode in one process; this run has {jax.process_count()} processes"
        )
    by_text: dict[str, dict] = {}
    for split, source in prompts.sources.items():
        for i in range(len(source)):
            record = prompt_record(prompts, i, split)
            if "family" not in record or "params" not in record:
                raise ConfigError(
                    f"config key '{name}.gold_reward': {split} prompt {i} of {prompts.path} has "
                    "no 'family'/'params' (only the synthetic world's prompts have gold scorers)"
                )
            by_text[record["prompt"]] = record

    def host(prompt_tokens, prompt_mask, response_tokens, response_mask):
        records = []
        for row, m in zip(prompt_tokens, prompt_mask, strict=True):
            text = tokenizer.decode(row[m > 0])  # drops the BOS
            if text not in by_text:
                raise KeyError(f"{name}: gold reward: no prompt record for {text!r}")
            records.append(by_text[text])
        return gold_scores(records, response_tokens, response_mask, tokenizer).astype(np.float32)

    def score_fn(reward_params, prompt_tokens, prompt_mask, response_tokens, response_mask):
        del reward_params  # the RM is not consulted
        out = jax.ShapeDtypeStruct(prompt_tokens.shape[:1], np.float32)
        return jax.pure_callback(
            host, out, prompt_tokens, prompt_mask, response_tokens, response_mask,
            vmap_method="sequential",
        )  # fmt: skip

    return score_fn
