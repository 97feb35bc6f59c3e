"""PPO rollout: sample responses, score them and build per-token rewards in one program.

docs/method.md §3. One call of `rollout` is one batch of bandit episodes:

  prompts [B,P] (left-padded) --sample(policy, KV cache, temperature)--> responses [B,N]
  (right-padded, mask 1 up to and including the first stop token), then ONE full forward each
  over prompt+response for the policy (log-probs at the sampling temperature, entropy, values
  when the value head sits on the policy trunk), the frozen reference (log-probs at the same
  temperature), the value network (if separate) and the reward model (score read at the last
  real token, i.e. the stop token). A response without a stop token gets a fixed penalty score
  instead (Ziegler et al.); every response token up to and including the stop token gets
  -beta * (logp - ref_logp) and the score is added at the last one.

Also here, because the update needs them too: `PPOModels` (the Flax modules in play; the
settings `PPOConfig` are in ppo_config.py and re-exported) and `policy_forward` / `value_forward`.

The score is pluggable: by default the reward model; any jittable
`score_fn(reward_params, prompt_tokens, prompt_mask, response_tokens, response_mask) -> [B]`
may replace it (programmatic rewards, tests). Its output goes through the same
normalisation `gain * score + bias` and the same no-stop penalty.

`make_rollout_fn` compiles `rollout` with explicit shardings.

Not here: the update and train state (ppo.py), data loading, the driver.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from instructrl import losses, sharding
from instructrl.errors import ConfigError
from instructrl.models import Transformer, positions_from_mask, sample
from instructrl.models.transformer import lm_logits
from instructrl.rl.ppo_config import ADVANTAGES, PPOConfig, default_ppo_config  # noqa: F401

PyTree = Any
ScoreFn = Callable[[PyTree, jax.Array, jax.Array, jax.Array, jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class PPOModels:
    """The Flax modules in play. The reference is `policy` with frozen params."""

    policy: Transformer  # head="lm"
    reward: Transformer | None = None  # head="scalar"; None when a score_fn replaces the RM
    value: Transformer | None = None  # head="scalar"; None when value_head_on_policy

    def check(self, cfg: PPOConfig) -> None:
        if self.policy.head != "lm":
            raise ConfigError(f"PPOModels.policy: head must be 'lm', got {self.policy.head!r}")
        for name in ("reward", "value"):
            model = getattr(self, name)
            if model is not None and model.head != "scalar":
                raise ConfigError(f"PPOModels.{name}: head must be 'scalar', got {model.head!r}")
        if cfg.critic_free:
            if self.value is not None:
                raise ConfigError(
                    f"config key 'ppo.advantage' = {cfg.advantage!r} is critic-free but "
                    "PPOModels.value is set (no value network)"
                )
        elif cfg.value_head_on_policy != (self.value is None):
            raise ConfigError(
                "config key 'ppo.value_head_on_policy' = "
                f"{cfg.value_head_on_policy} but PPOModels.value is "
                f"{'set' if self.value is not None else 'None'} (need exactly one value source)"
            )


@flax.struct.dataclass
class RolloutParams:
    """Params the rollout reads; none are differentiated.

    value: the separate value network's params, or the value head {"kernel" [D,1], "bias" [1]}
    on the policy trunk (value_head_on_policy). reward: the RM params, or whatever the custom
    score_fn takes (may be None). reward_gain/bias: f32 [] normalisation, score = g * r + b.
    """

    policy: PyTree
    reference: PyTree
    value: PyTree
    reward: PyTree
    reward_gain: jax.Array
    reward_bias: jax.Array


@flax.struct.dataclass
class Rollout:
    """One batch of episodes: everything the update needs, plus metrics (f32 scalars)."""

    prompt_tokens: jax.Array  # [B,P] int32, left-padded
    prompt_mask: jax.Array  # [B,P] int32
    response_tokens: jax.Array  # [B,N] int32; pad_id after the stop token
    response_mask: jax.Array  # [B,N] int32; 1 up to and including the stop token
    logprobs: jax.Array  # [B,N] f32 policy log-probs at the sampling temperature; 0 on pads
    ref_logprobs: jax.Array  # [B,N] f32 reference log-probs, same temperature; 0 on pads
    values: jax.Array  # [B,N] f32 V(s_t) before response token t; 0 on pads
    rewards: jax.Array  # [B,N] f32 -beta * log-ratio per token, + score at the last token
    scores: jax.Array  # [B] f32 score entering the rewards (normalised, or the penalty)
    raw_scores: jax.Array  # [B] f32 score_fn / RM output before gain, bias and penalty
    kl: jax.Array  # [B] f32 summed log-ratio logp - ref_logp over the response
    metrics: dict[str, jax.Array]


# ---------------------------------------------------------------------------- forward passes


def join_prompt_response(
    prompt_tokens: jax.Array, prompt_mask: jax.Array, response_tokens: jax.Array, response_mask
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(tokens, mask, positions) [B,P+N] of left-padded prompts followed by right-padded responses.

    Response tokens take the prompt's segment id (as the sampler does), so positions run on
    from the prompt's last real token; pads (mask 0) are never attended to.
    """
    prompt_mask = jnp.asarray(prompt_mask, jnp.int32)
    segment = jnp.where(prompt_mask[:, -1:] != 0, prompt_mask[:, -1:], 1)
    tokens = jnp.concatenate([prompt_tokens, response_tokens], axis=1).astype(jnp.int32)
    mask = jnp.concatenate([prompt_mask, (jnp.asarray(response_mask) != 0) * segment], axis=1)
    return tokens, mask, positions_from_mask(mask)


def _is_final_norm(module: nn.Module, method_name: str) -> bool:
    return module.name == "final_norm" and method_name == "__call__"


def policy_forward(
    model: Transformer,
    params: PyTree,
    prompt_tokens: jax.Array,
    prompt_mask: jax.Array,
    response_tokens: jax.Array,
    response_mask: jax.Array,
    temperature: float,
    *,
    value_head: PyTree | None = None,
    chunk: int = 0,
) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """One forward pass over prompt [B,P] + response [B,N] (the response's last token is not fed).

    Returns (logprobs [B,N] of the response tokens under log_softmax(logits / temperature),
    entropy f32 [] masked mean over response tokens of that distribution, values [B,N] or None).
    With `value_head` ({"kernel" [D,1], "bias" [1]}: the head on the policy trunk) the values
    are read from the same pass: the final-norm output (captured, so gradients reach the
    trunk) projected like the scalar head. All [B,N] outputs are 0 where response_mask == 0.
    chunk > 0: the logits of `chunk` response positions at a time (`chunked_logprobs`), the
    same numbers without [B,N,V] logits in memory.
    """
    p_len = prompt_tokens.shape[1]
    tokens, mask, positions = join_prompt_response(
        prompt_tokens, prompt_mask, response_tokens, response_mask
    )
    # Response token j is predicted at index P-1+j; the last index predicts nothing we need.
    args = (tokens[:, :-1], positions[:, :-1], mask[:, :-1])
    values = logits = None
    if chunk > 0:
        hidden = model.apply({"params": params}, *args, hidden_only=True)[:, p_len - 1 :]
    elif value_head is None:
        logits = model.apply({"params": params}, *args)
    else:
        logits, state = model.apply(
            {"params": params},
            *args,
            capture_intermediates=_is_final_norm,
            mutable=["intermediates"],
        )
        hidden = state["intermediates"]["final_norm"]["__call__"][0][:, p_len - 1 :]
    if value_head is not None:
        kernel = value_head["kernel"].astype(jnp.float32)[:, 0]
        values = jnp.einsum("btd,d->bt", hidden.astype(jnp.float32), kernel)
        values = values + value_head["bias"].astype(jnp.float32)[0]
    valid = jnp.asarray(response_mask) != 0
    if chunk > 0:
        logp, ent = chunked_logprobs(model, params, hidden, response_tokens, temperature, chunk)
        logp, entropy = jnp.where(valid, logp, 0.0), losses.masked_mean(ent, valid)
    else:
        logits = logits[:, p_len - 1 :] / temperature
        logp = jnp.where(valid, losses.token_logprobs(logits, response_tokens), 0.0)
        entropy = losses.entropy_from_logits(logits, valid)
    if values is not None:
        values = jnp.where(valid, values, 0.0)
    return logp, entropy, values


def chunked_logprobs(
    model: Transformer,
    params: PyTree,
    hidden: jax.Array,
    targets: jax.Array,
    temperature: float | jax.Array,
    chunk: int,
) -> tuple[jax.Array, jax.Array]:
    """(log p(targets) f32 [B,N], entropy f32 [B,N]) of softmax(logits / temperature), where
    logits = the LM head of `hidden` [B,N,D], computed `chunk` positions at a time in a
    lax.map whose steps are rematerialised: at most [B, chunk, V] logits live at once, in the
    forward and the backward pass."""
    b, n, d = hidden.shape
    pad = -n % chunk
    hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
    targets = jnp.pad(jnp.asarray(targets, jnp.int32), ((0, 0), (0, pad)))
    k = (n + pad) // chunk
    hs = hidden.reshape(b, k, chunk, d).swapaxes(0, 1)
    ts = targets.reshape(b, k, chunk).swapaxes(0, 1)

    @jax.checkpoint
    def one(h, t):
        logits = lm_logits(model.config, params, h) / temperature
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        picked = jnp.take_along_axis(logp, t[..., None], axis=-1)[..., 0]
        return picked, -jnp.sum(jnp.exp(logp) * logp, axis=-1)

    logp, ent = jax.lax.map(lambda x: one(*x), (hs, ts))
    unchunk = lambda x: x.swapaxes(0, 1).reshape(b, k * chunk)[:, :n]  # noqa: E731
    return unchunk(logp), unchunk(ent)


def value_forward(
    model: Transformer,
    params: PyTree,
    prompt_tokens: jax.Array,
    prompt_mask: jax.Array,
    response_tokens: jax.Array,
    response_mask: jax.Array,
) -> jax.Array:
    """Separate value network: V(s_t) [B,N] read where the policy predicts response token t."""
    p_len = prompt_tokens.shape[1]
    tokens, mask, positions = join_prompt_response(
        prompt_tokens, prompt_mask, response_tokens, response_mask
    )
    values = model.apply(
        {"params": params}, tokens[:, :-1], positions[:, :-1], mask[:, :-1], per_token=True
    )[:, p_len - 1 :]
    return jnp.where(jnp.asarray(response_mask) != 0, values, 0.0)


def rm_score_fn(model: Transformer) -> ScoreFn:
    """The default score: the reward model read at the last real token of prompt + response.

    With a left-padded prompt and right-padded response that token is the stop token (or the
    last response token when there is none).
    """

    def score(params, prompt_tokens, prompt_mask, response_tokens, response_mask):
        tokens, mask, positions = join_prompt_response(
            prompt_tokens, prompt_mask, response_tokens, response_mask
        )
        return model.apply({"params": params}, tokens, positions, mask).astype(jnp.float32)

    return score


# ---------------------------------------------------------------------------- rollout


def rollout(
    models: PPOModels,
    cfg: PPOConfig,
    params: RolloutParams,
    prompt_tokens: jax.Array,
    prompt_mask: jax.Array,
    rng: jax.Array,
    beta: jax.Array,
    *,
    score_fn: ScoreFn | None = None,
) -> Rollout:
    """One batch of episodes (pure; `make_rollout_fn` in ppo.py jits it with shardings).

    prompt_tokens/prompt_mask int32 [B,P], left-padded, >= 1 real token per row.
    rng: key for sampling. beta: f32 [] KL coefficient (the controller's current value).
    score_fn: replaces the reward model (see module docstring); None -> rm_score_fn.
    """
    if score_fn is None:
        if models.reward is None:
            raise ConfigError("ppo rollout: PPOModels.reward is None and no score_fn given")
        score_fn = rm_score_fn(models.reward)
    sg = jax.lax.stop_gradient
    params = sg(params)
    if cfg.group_size > 1:  # G samples of each prompt: rows n*G .. n*G + G-1 are prompt n's
        prompt_tokens = jnp.repeat(jnp.asarray(prompt_tokens), cfg.group_size, axis=0)
        prompt_mask = jnp.repeat(jnp.asarray(prompt_mask), cfg.group_size, axis=0)
    out = sample(
        models.policy,
        params.policy,
        prompt_tokens,
        prompt_mask,
        rng,
        max_new_tokens=cfg.max_new_tokens,
        temperature=cfg.temperature,
        top_k=cfg.top_k,
        top_p=cfg.top_p,
        stop_token=cfg.stop_token,
        pad_id=cfg.pad_id,
    )
    resp, resp_mask = out.tokens, out.mask
    seq = (prompt_tokens, prompt_mask, resp, resp_mask)
    head = params.value if cfg.value_head_on_policy and not cfg.critic_free else None
    logp, entropy, values = policy_forward(
        models.policy, params.policy, *seq, cfg.temperature, value_head=head,
        chunk=cfg.logprob_chunk,
    )  # fmt: skip
    if cfg.critic_free:
        values = jnp.zeros_like(logp)  # no value network
    elif values is None:
        values = value_forward(models.value, params.value, *seq)
    ref_logp, _, _ = policy_forward(
        models.policy, params.reference, *seq, cfg.temperature, chunk=cfg.logprob_chunk
    )

    valid = resp_mask != 0
    raw = sg(jnp.asarray(score_fn(params.reward, *seq), jnp.float32))
    normalised = params.reward_gain * raw + params.reward_bias
    has_stop = jnp.any(valid & (resp == cfg.stop_token), axis=1)
    scores = normalised
    if cfg.penalize_no_stop:
        scores = losses.score_no_stop_penalty(normalised, has_stop, cfg.no_stop_penalty)
    # kl_penalty="loss": the KL enters the update's loss (k3), not the rewards.
    beta_r = beta if cfg.kl_penalty == "reward" else jnp.zeros_like(beta)
    rewards = losses.kl_penalty_rewards(logp, ref_logp, resp_mask, scores, beta_r)
    kl = losses.sequence_kl(logp, ref_logp, resp_mask)

    length = jnp.sum(valid, axis=1).astype(jnp.float32)
    metrics = {
        "score_raw": jnp.mean(raw),
        "score": jnp.mean(normalised),
        "score_final": jnp.mean(scores),
        "kl": jnp.mean(kl),
        "kl_per_token": losses.masked_mean(logp - ref_logp, valid),
        "beta": jnp.asarray(beta, jnp.float32),
        "reward_sum": jnp.mean(jnp.sum(rewards, axis=1)),
        "response_length": jnp.mean(length),
        "no_stop_frac": 1.0 - jnp.mean(has_stop.astype(jnp.float32)),
        "entropy": entropy,
        "values_mean": losses.masked_mean(values, valid),
        # The KV-cache sampler and the full forward must agree (a classic RLHF bug).
        "logprob_mismatch": jnp.max(jnp.where(valid, jnp.abs(out.logprobs - logp), 0.0)),
    }
    return Rollout(
        prompt_tokens=jnp.asarray(prompt_tokens, jnp.int32),
        prompt_mask=jnp.asarray(prompt_mask, jnp.int32),
        response_tokens=resp,
        response_mask=resp_mask,
        logprobs=logp,
        ref_logprobs=ref_logp,
        values=values,
        rewards=rewards,
        scores=scores,
        raw_scores=raw,
        kl=kl,
        metrics={k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()},
    )


# ---------------------------------------------------------------------------- compiled program


def _dummy_args(model: Transformer):
    x = jax.ShapeDtypeStruct((1, min(8, model.config.max_len)), jnp.int32)
    return (x, x, x)


def model_param_shardings(
    model: Transformer, mesh: Mesh, rules=sharding.DEFAULT_RULES
) -> tuple[PyTree, PyTree]:
    """(abstract params, NamedShardings) of `model` on `mesh`: where to put frozen params."""
    return sharding.abstract_params_and_shardings(model, _dummy_args(model), mesh, rules)


def rollout_params(
    state, reference: PyTree, reward: PyTree, gain: float = 1.0, bias: float = 0.0
) -> RolloutParams:
    """The rollout's view of the state plus the frozen reference and reward params."""
    return RolloutParams(
        policy=state.params["policy"],
        reference=reference,
        value=state.params.get("value"),  # None when critic-free
        reward=reward,
        reward_gain=jnp.asarray(gain, jnp.float32),
        reward_bias=jnp.asarray(bias, jnp.float32),
    )


def rollout_params_shardings(
    models: PPOModels, cfg: PPOConfig, mesh: Mesh, rules=sharding.DEFAULT_RULES
) -> RolloutParams:
    """RolloutParams of NamedShardings (reward: None when models.reward is None)."""
    rep = NamedSharding(mesh, PartitionSpec())
    _, pol_sh = model_param_shardings(models.policy, mesh, rules)
    if cfg.critic_free:
        val_sh = None
    elif cfg.value_head_on_policy:
        val_sh = {"kernel": rep, "bias": rep}
    else:
        val_sh = model_param_shardings(models.value, mesh, rules)[1]
    rew_sh = None if models.reward is None else model_param_shardings(models.reward, mesh, rules)[1]
    return RolloutParams(pol_sh, pol_sh, val_sh, rew_sh, rep, rep)


def jit_in_mesh(jitted, mesh: Mesh | None, rules) -> Callable:
    """Calls `jitted` inside the mesh context (logical constraints are resolved at trace time)."""

    def call(*args):
        if mesh is None:
            return jitted(*args)
        with sharding.mesh_context(mesh, rules):
            return jitted(*args)

    call.jitted = jitted
    return call


def make_rollout_fn(
    models: PPOModels,
    cfg: PPOConfig,
    *,
    mesh: Mesh | None = None,
    rules=sharding.DEFAULT_RULES,
    params_shardings: RolloutParams | None = None,
    score_fn: ScoreFn | None = None,
) -> Callable[..., Rollout]:
    """`rollout_fn(params: RolloutParams, prompt_tokens [B,P], prompt_mask [B,P], rng, beta)`.

    Compiled once per input shapes (beta is traced). With a mesh: params in
    `params_shardings` (default rollout_params_shardings), prompts and every [B, ...] output
    over ("data", "fsdp"), rng/beta/metrics replicated. `.jitted` is the jax.jit object.
    """
    models.check(cfg)
    fn = functools.partial(rollout, models, cfg, score_fn=score_fn)
    if mesh is None:
        return jit_in_mesh(jax.jit(fn), None, rules)
    if params_shardings is None:
        params_shardings = rollout_params_shardings(models, cfg, mesh, rules)
    bs, rep = sharding.batch_sharding(mesh), NamedSharding(mesh, PartitionSpec())
    out = Rollout(*([bs] * 11), metrics=rep)
    jitted = jax.jit(fn, in_shardings=(params_shardings, bs, bs, rep, rep), out_shardings=out)
    return jit_in_mesh(jitted, mesh, rules)
