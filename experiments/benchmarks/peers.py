"""The PyTorch + transformers side of the benchmark suite: the same model, shapes and dtype.

The model is the one instructrl.hf exports our ModelConfig as (hf_config_from: GPT-2, Llama,
Qwen2 or Qwen3), built by transformers from that config with random weights. Training runs
f32 params under torch.autocast(bfloat16) when the suite's dtype is bfloat16 (our models keep
f32 params and compute in bf16); sampling casts the weights to the compute dtype, as the
suite does for ours. Every returned `run()` blocks until the device is done.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import numpy as np

from instructrl.hf import hf_config_from
from instructrl.models import ModelConfig

PAD, EOS = 0, 3


def torch_device(platform: str):
    """The torch device matching jax's backend; an error when torch cannot reach it."""
    import torch

    if platform == "cpu":
        return torch.device("cpu")
    if platform in ("gpu", "cuda"):
        if not torch.cuda.is_available():
            raise RuntimeError("jax runs on a GPU but torch has no CUDA device: no fair peer")
        return torch.device("cuda")
    raise RuntimeError(f"no torch peer for jax platform {platform!r}")


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


def _autocast(device, dtype: str):
    import torch

    if dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=_torch_dtype(dtype))


def hf_model(mc: ModelConfig, head: str, device):
    """transformers' model of `mc` (f32 params): *ForCausalLM for head="lm"; for "scalar"
    the bare trunk plus a [D, 1] linear head on each row's last token (our RM's shape)."""
    import torch
    import transformers

    hf = hf_config_from(mc, dtype="float32")
    hf.update(pad_token_id=PAD, eos_token_id=EOS, bos_token_id=EOS)
    config = transformers.AutoConfig.for_model(**hf)
    torch.manual_seed(0)
    if head == "lm":
        return transformers.AutoModelForCausalLM.from_config(config).to(device)

    class Scalar(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.trunk = transformers.AutoModel.from_config(config)
            self.head = torch.nn.Linear(mc.d_model, 1)

        def forward(self, ids):
            hidden = self.trunk(input_ids=ids).last_hidden_state
            return self.head(hidden[:, -1]).squeeze(-1)

    return Scalar().to(device)


def train_step(
    mc: ModelConfig, head: str, tokens: np.ndarray, optimizer, *, device, dtype: str
) -> Callable[[], None]:
    """One AdamW step (the section's lr, betas, eps, weight decay and grad clipping).

    head="lm": tokens [B, T], next-token loss. head="scalar": tokens [B, K, T], the K-wise
    loss over all pairs (response i preferred to j for i < j)."""
    import torch

    model = hf_model(mc, head, device).train()
    opt = torch.optim.AdamW(
        model.parameters(),
        lr=optimizer.lr,
        betas=(optimizer.b1, optimizer.b2),
        eps=optimizer.eps,
        weight_decay=optimizer.weight_decay,
    )
    ids = torch.tensor(tokens, dtype=torch.long, device=device)

    def loss_fn():
        if head == "lm":
            return model(input_ids=ids, labels=ids).loss  # shifts the labels inside
        b, k, t = ids.shape
        r = model(ids.reshape(b * k, t)).float().reshape(b, k)
        diff = r[:, :, None] - r[:, None, :]
        upper = torch.triu(torch.ones(k, k, dtype=torch.bool, device=device), diagonal=1)
        return -torch.nn.functional.logsigmoid(diff[:, upper]).mean()

    def run():
        with _autocast(device, dtype):
            loss = loss_fn()
        loss.backward()
        if optimizer.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(model.parameters(), optimizer.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync(device)

    run()
    return run


def generate(
    mc: ModelConfig, prompts: np.ndarray, new_tokens: int, *, device, dtype: str
) -> Callable[[], None]:
    """`generate` with the KV cache, sampling at temperature 1 (no top-k/top-p), forced to
    the full `new_tokens`, weights in the compute dtype."""
    import torch

    model = hf_model(mc, "lm", device).to(_torch_dtype(dtype)).eval()
    ids = torch.tensor(prompts, dtype=torch.long, device=device)
    mask = torch.ones_like(ids)

    def run():
        with torch.inference_mode():
            out = model.generate(
                input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0,
                top_k=0, top_p=1.0, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                use_cache=True, pad_token_id=PAD, eos_token_id=EOS,
            )  # fmt: skip
        _sync(device)
        if out.shape[1] != ids.shape[1] + new_tokens:
            raise RuntimeError(
                f"generate: {out.shape[1] - ids.shape[1]} new tokens, not {new_tokens}"
            )

    run()
    return run


def matmul(n: int, dtype: str, device) -> Callable[[], None]:
    """A blocking [n, n] x [n, n] product (2 n^3 FLOPs)."""
    import torch

    g = torch.Generator(device="cpu").manual_seed(0)
    a, b = (torch.randn(n, n, generator=g).to(device, _torch_dtype(dtype)) for _ in range(2))

    def run():
        torch.matmul(a, b)
        _sync(device)

    run()
    return run


def copy(n_bytes: int, device) -> Callable[[], None]:
    """A blocking y = x + 1 over f32 arrays of `n_bytes` (reads and writes n_bytes each)."""
    import torch

    x = torch.zeros(n_bytes // 4, dtype=torch.float32, device=device)
    y = torch.empty_like(x)

    def run():
        torch.add(x, 1.0, out=y)
        _sync(device)

    run()
    return run


def memory(device) -> dict[str, int] | None:
    """torch's peak allocated bytes on a CUDA device (None on CPU: see the process RSS)."""
    import torch

    if device.type != "cuda":
        return None
    return {"peak_allocated_bytes": int(torch.cuda.max_memory_allocated(device))}
