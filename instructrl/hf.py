"""Import and export of Hugging Face checkpoints (GPT-2, Llama, Qwen2, Qwen3), without torch.

    model, params = from_pretrained("path/to/hf_dir", mesh=mesh)   # config.json + *.safetensors
    to_pretrained(model, params, "path/to/out")                     # transformers loads it back

Supported (import and export; GQA, tied or untied embeddings throughout):
  `GPT2LMHeadModel` (model_type "gpt2");
  `LlamaForCausalLM` ("llama"): plain RoPE or Llama 3.1+'s rope_type "llama3" scaling;
  `Qwen2ForCausalLM` ("qwen2", Qwen2/Qwen2.5): q/k/v biases (`qkv_bias`), no sliding window;
  `Qwen3ForCausalLM` ("qwen3"): per-head q/k RMSNorm (`qk_norm`), free head_dim;
  `MistralForCausalLM` ("mistral"), import only, with sliding_window null: it is a Llama and
  exports as one.
Anything else (sliding windows, other rope types, Gemma, ...) fails with one line naming
config.json and the key.

Safetensors files are read with our own small reader (the format is an 8-byte header length,
a JSON header, raw little-endian data): `safetensors.numpy` cannot represent bfloat16, and a
memory map lets every device read only its own slice of each tensor. Each parameter is an
HF tensor seen through numpy views (slice, transpose, reshape; never a copy), so the same
table maps weights in both directions: import reads `view[index]` per device shard, export
writes our params into views of freshly allocated HF tensors.

HF layouts: GPT-2 `Conv1D` weights are [in, out] with q/k/v fused in `c_attn`; Llama (and
torch `Linear`) weights are [out, in]. HF Llama's (and Qwen's) q/k projections use the
"rotate_half" RoPE layout that `apply_rope` implements, so no permutation is needed.

Tokenizers: a checkpoint's `tokenizer.model` (SentencePiece) or `tokenizer.json` with its
config files (Hugging Face tokenizers) loads through `tokenizer.load`.

Not here: the `python -m instructrl.convert` command (convert.py), the tokenizers themselves
(tokenizer.py, hf_tokenizer.py).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

from instructrl import sharding as sharding_lib
from instructrl import tokenizer as tokenizer_lib
from instructrl.errors import ConfigError, InputError
from instructrl.models.transformer import ModelConfig, Transformer

SUPPORTED = ("gpt2", "llama", "mistral", "qwen2", "qwen3")  # HF model_type values we import
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILE = "tokenizer.model"
TOKENIZER_FILES = (TOKENIZER_FILE, "tokenizer.json")  # either backend's (see tokenizer.load)

# safetensors dtype names -> numpy (bfloat16 and float8 via ml_dtypes, which jax uses too).
_ST_DTYPES = {
    name: np.dtype(t)
    for name, t in {
        **{"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16},
        **{"F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2},
        **{"I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8},
        "BOOL": np.bool_,
    }.items()
}


# ---- reading safetensors ------------------------------------------------------------------


def read_safetensors(path: str) -> dict[str, np.ndarray]:
    """Tensor name -> read-only numpy view of a memory-mapped .safetensors file.

    Nothing is read from disk until a view is indexed. bfloat16/float8 come back as
    ml_dtypes arrays.
    """
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        try:
            header = json.loads(f.read(n)) if n > 0 else None
        except (json.JSONDecodeError, UnicodeDecodeError):
            header = None
    if not isinstance(header, dict):
        raise InputError(f"{path}: not a safetensors file (bad header)")
    header.pop("__metadata__", None)
    data = np.memmap(path, dtype=np.uint8, mode="r") if os.path.getsize(path) > 8 + n else None
    out = {}
    for name, info in header.items():
        if info["dtype"] not in _ST_DTYPES:
            raise InputError(f"{path}: {name}: unsupported dtype {info['dtype']}")
        dtype, shape = _ST_DTYPES[info["dtype"]], tuple(info["shape"])
        start, end = (8 + n + o for o in info["data_offsets"])
        if end - start != math.prod(shape) * dtype.itemsize or (
            data is not None and end > data.size
        ):
            raise InputError(f"{path}: {name}: data offsets do not match shape {shape}")
        if start == end:
            out[name] = np.zeros(shape, dtype)
        else:
            out[name] = data[start:end].view(dtype).reshape(shape)
    return out


def read_checkpoint(hf_dir: str) -> dict[str, tuple[np.ndarray, str]]:
    """Tensor name -> (lazy view, file) for `model.safetensors` or a sharded index."""
    single, index = os.path.join(hf_dir, WEIGHTS_FILE), os.path.join(hf_dir, INDEX_FILE)
    if os.path.exists(single):
        return {k: (v, single) for k, v in read_safetensors(single).items()}
    if not os.path.exists(index):
        found = sorted(os.listdir(hf_dir)) if os.path.isdir(hf_dir) else []
        raise InputError(
            f"{hf_dir}: no {WEIGHTS_FILE} or {INDEX_FILE} (found {found}; only safetensors "
            "checkpoints are read)"
        )
    with open(index, encoding="utf-8") as f:
        weight_map = json.load(f).get("weight_map")
    if not isinstance(weight_map, dict):
        raise InputError(f"{index}: no 'weight_map'")
    files = {fn: os.path.join(hf_dir, fn) for fn in set(weight_map.values())}
    opened = {fn: read_safetensors(path) for fn, path in files.items()}
    out = {}
    for name, fn in weight_map.items():
        if name not in opened[fn]:
            raise InputError(f"{index}: {name}: listed in {fn} but not found there")
        out[name] = (opened[fn][name], files[fn])
    return out


# ---- configs ------------------------------------------------------------------------------


def _read_json(path: str) -> dict[str, Any]:
    if not os.path.exists(path):
        raise InputError(f"{path}: missing")
    with open(path, encoding="utf-8") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise InputError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None


# The llama3 rope_type's parameters: (ModelConfig field, key in rope_parameters/rope_scaling).
_LLAMA3_ROPE = (
    ("rope_factor", "factor"),
    ("rope_low_freq_factor", "low_freq_factor"),
    ("rope_high_freq_factor", "high_freq_factor"),
    ("rope_original_max_len", "original_max_position_embeddings"),
)


def _rope(hf: Mapping[str, Any], where: str) -> dict[str, Any]:
    """RoPE fields of ModelConfig from old (`rope_theta`, `rope_scaling`) or new
    (`rope_parameters`) keys; as in transformers 5, `rope_scaling` wins when both are set."""
    key = "rope_scaling" if hf.get("rope_scaling") else "rope_parameters"
    params = hf.get(key) or {}
    if not isinstance(params, Mapping):
        raise InputError(f"{where}: {key}={params!r} is not supported (expected an object)")
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in ("default", "llama3"):
        raise InputError(
            f"{where}: {key}.rope_type={kind!r} is not supported (only 'default', 'llama3')"
        )
    if params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)) != 1.0:
        raise InputError(f"{where}: {key}.partial_rotary_factor is not supported")
    out = {"rope_theta": float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))}
    if kind == "llama3":
        out["rope_scaling"] = "llama3"
        for ours, name in _LLAMA3_ROPE:
            if name not in params:
                raise InputError(f"{where}: missing key '{key}.{name}' (rope_type 'llama3')")
            out[ours] = params[name]
    return out


# (ModelConfig field, HF config.json key, HF's default when the key is absent). Dropout is a
# training choice, not part of a checkpoint: imports get none (set it in the stage config).
_LLAMA_KEYS = (
    ("vocab_size", "vocab_size", None),
    ("max_len", "max_position_embeddings", None),
    ("num_layers", "num_hidden_layers", None),
    ("d_model", "hidden_size", None),
    ("num_heads", "num_attention_heads", None),
    ("d_ff", "intermediate_size", None),
    ("num_kv_heads", "num_key_value_heads", None),
    ("head_dim", "head_dim", None),
    ("tie_embeddings", "tie_word_embeddings", False),
    ("norm_eps", "rms_norm_eps", 1e-6),
)
_KEYS = {
    "gpt2": (
        ("vocab_size", "vocab_size", None),
        ("max_len", "n_positions", None),
        ("num_layers", "n_layer", None),
        ("d_model", "n_embd", None),
        ("num_heads", "n_head", None),
        ("d_ff", "n_inner", None),  # None -> 4 * n_embd
        ("tie_embeddings", "tie_word_embeddings", True),
        ("norm_eps", "layer_norm_epsilon", 1e-5),
    ),
    "llama": (*_LLAMA_KEYS, ("use_bias", "attention_bias", False)),
    "mistral": _LLAMA_KEYS,
    "qwen2": _LLAMA_KEYS,  # no head_dim in Qwen2Config, but its attention reads one if set
    # Qwen3Config's head_dim defaults to 128, not hidden_size / heads.
    "qwen3": tuple(k if k[0] != "head_dim" else ("head_dim", "head_dim", 128) for k in _LLAMA_KEYS),
}
_OPTIONAL = ("d_ff", "num_kv_heads", "head_dim")  # HF derives these when absent or null
_LLAMA_FIXED = {"position": "rope", "norm": "rmsnorm", "mlp": "swiglu"}
_FIXED = {
    "gpt2": {"position": "learned", "norm": "layernorm", "mlp": "gelu", "use_bias": True},
    "llama": _LLAMA_FIXED,
    "mistral": dict(_LLAMA_FIXED, use_bias=False),
    "qwen2": dict(_LLAMA_FIXED, use_bias=False, qkv_bias=True),
    "qwen3": dict(_LLAMA_FIXED, use_bias=False, qk_norm=True),
}
# HF keys whose other values change the numerics: (key, HF default, values we implement).
_CHECKS = {
    "gpt2": (
        ("activation_function", "gelu_new", ("gelu_new", "gelu_pytorch_tanh")),
        ("scale_attn_weights", True, (True,)),
        ("scale_attn_by_inverse_layer_idx", False, (False,)),
        ("add_cross_attention", False, (False,)),
    ),
    "llama": (("hidden_act", "silu", ("silu",)),),
    # MistralConfig's sliding_window defaults to 4096: only an explicit null is plain attention.
    "mistral": (("hidden_act", "silu", ("silu",)), ("sliding_window", 4096, (None,))),
    "qwen2": (("hidden_act", "silu", ("silu",)), ("use_sliding_window", False, (False,))),
    "qwen3": (
        ("hidden_act", "silu", ("silu",)),
        ("use_sliding_window", False, (False,)),
        ("attention_bias", False, (False,)),  # Qwen3's bias is on q, k, v and o, not the MLP
    ),
}
_ARCHITECTURES = {
    "gpt2": "GPT2LMHeadModel",
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}


def config_from_hf(
    hf: Mapping[str, Any],
    *,
    dtype: str = "float32",
    compute_dtype: str | None = None,
    where: str = CONFIG_FILE,
) -> ModelConfig:
    """ModelConfig from a HF config.json dict; InputError naming `where` and the key if unsupported.

    dtype: param dtype; compute_dtype (default: dtype) the model's activation dtype.
    A Mistral config (sliding_window null) becomes the Llama config it is numerically.
    """
    kind = hf.get("model_type")
    if kind not in SUPPORTED:
        raise InputError(
            f"{where}: model_type={kind!r} is not supported (supported: {', '.join(SUPPORTED)})"
        )
    for key, default, allowed in _CHECKS[kind]:
        value = hf.get(key, default)
        if value not in allowed:
            raise InputError(f"{where}: {key}={value!r} is not supported (only {allowed})")
    fields = dict(_FIXED[kind], dtype=compute_dtype or dtype, param_dtype=dtype)
    for ours, key, default in _KEYS[kind]:
        if default is None and key not in hf and ours not in _OPTIONAL:
            raise InputError(f"{where}: missing key {key!r}")
        fields[ours] = hf.get(key, default)
    if kind == "gpt2":
        fields["d_ff"] = fields["d_ff"] or 4 * fields["d_model"]
    else:
        # Defaults spelled out by HF are stored as None, our spelling of "the default".
        if fields["num_kv_heads"] == fields["num_heads"]:
            fields["num_kv_heads"] = None
        if fields["head_dim"] == fields["d_model"] // fields["num_heads"]:
            fields["head_dim"] = None
        if kind == "llama" and hf.get("mlp_bias", False) != fields["use_bias"]:
            raise InputError(
                f"{where}: attention_bias={fields['use_bias']} with mlp_bias="
                f"{hf.get('mlp_bias')} is not supported (one use_bias for all projections)"
            )
        fields.update(_rope(hf, where))
    try:
        return ModelConfig(**fields)
    except ConfigError as e:  # a value of the file that our model rejects
        raise InputError(f"{where}: {e}") from None


def family(config: ModelConfig) -> str:
    """The HF model_type ("gpt2", "llama", "qwen2", "qwen3") with exactly this config's numerics."""
    c = config
    if (c.position, c.norm, c.mlp, c.use_bias) == ("learned", "layernorm", "gelu", True):
        if c.kv_heads != c.num_heads or c.dim_head * c.num_heads != c.d_model:
            raise ValueError("model.num_kv_heads/head_dim: GPT-2 has no GQA and no free head_dim")
        if c.qk_norm:
            raise ValueError("model.qk_norm: GPT-2 has no q/k norm")
        return "gpt2"
    if (c.position, c.norm, c.mlp) == ("rope", "rmsnorm", "swiglu"):
        if c.qk_norm:
            if c.use_bias or c.qkv_bias:
                raise ValueError("model.qk_norm: Qwen3 (q/k norm) has no projection biases here")
            return "qwen3"
        return "qwen2" if c.qkv_bias else "llama"
    raise ValueError(
        f"model: position={c.position}, norm={c.norm}, mlp={c.mlp}, use_bias={c.use_bias} is "
        "neither GPT-2 (learned, layernorm, gelu, bias) nor Llama/Qwen (rope, rmsnorm, swiglu)"
    )


def hf_config_from(config: ModelConfig, *, dtype: str | None = None) -> dict[str, Any]:
    """HF config.json dict for `config` (see `family`); dtype: the saved weights' dtype."""
    kind = family(config)
    hf = {key: getattr(config, ours) for ours, key, _ in _KEYS[kind]}
    hf.update(model_type=kind, dtype=dtype or config.param_dtype)
    hf.update({key: allowed[0] for key, _, allowed in _CHECKS[kind]})
    hf["architectures"] = [_ARCHITECTURES[kind]]
    if kind == "gpt2":
        hf.update(resid_pdrop=config.dropout, embd_pdrop=config.dropout)
        hf["attn_pdrop"] = config.attention_dropout
        return hf
    hf.update(num_key_value_heads=config.kv_heads, head_dim=config.dim_head)
    hf["attention_dropout"] = config.attention_dropout
    if kind == "llama":
        hf["mlp_bias"] = config.use_bias
    # transformers >= 5 reads rope_parameters, older versions rope_theta and rope_scaling.
    hf["rope_theta"] = config.rope_theta
    rope = {"rope_type": "default", "rope_theta": config.rope_theta}
    if config.rope_scaling == "llama3":
        rope["rope_type"] = "llama3"
        rope.update({key: getattr(config, ours) for ours, key in _LLAMA3_ROPE})
        hf["rope_scaling"] = dict(rope)
    hf["rope_parameters"] = rope
    return hf


# ---- the weight table ---------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Entry:
    """One of our params as a numpy view of one HF tensor."""

    path: tuple[str, ...]  # in our "params" tree, e.g. ("block_0", "attn", "q", "kernel")
    name: str  # HF tensor name
    shape: tuple[int, ...]  # HF tensor shape
    view: Callable[[np.ndarray], np.ndarray]  # HF tensor -> our param, without copying


def _reshape(x: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    # copy=False raises instead of silently reading a whole tensor per device shard.
    return np.reshape(x, shape, copy=False)


def _identity(x: np.ndarray) -> np.ndarray:
    return x


def _gpt2_entries(c: ModelConfig, prefix: str) -> list[Entry]:
    d, h, dh, f = c.d_model, c.num_heads, c.dim_head, c.d_ff
    out: list[Entry] = []
    add = lambda path, name, shape, view=_identity: out.append(  # noqa: E731
        Entry(tuple(path.split("/")), prefix + name, shape, view)
    )
    add("embed/token", "wte.weight", (c.vocab_size, d))
    add("embed/position", "wpe.weight", (c.max_len, d))
    for i in range(c.num_layers):
        hf, ours = f"h.{i}.", f"block_{i}/"
        for ln in ("ln_1", "ln_2"):
            add(f"{ours}{ln}/scale", f"{hf}{ln}.weight", (d,))
            add(f"{ours}{ln}/bias", f"{hf}{ln}.bias", (d,))
        for j, name in enumerate("qkv"):
            cols = slice(j * d, (j + 1) * d)  # c_attn's output columns are [q | k | v]
            w_view = lambda w, cols=cols: _reshape(w[:, cols], (d, h, dh))  # noqa: E731
            b_view = lambda b, cols=cols: _reshape(b[cols], (h, dh))  # noqa: E731
            add(f"{ours}attn/{name}/kernel", f"{hf}attn.c_attn.weight", (d, 3 * d), w_view)
            add(f"{ours}attn/{name}/bias", f"{hf}attn.c_attn.bias", (3 * d,), b_view)
        o_view = lambda w: _reshape(w, (h, dh, d))  # noqa: E731
        add(f"{ours}attn/o/kernel", f"{hf}attn.c_proj.weight", (d, d), o_view)
        add(f"{ours}attn/o/bias", f"{hf}attn.c_proj.bias", (d,))
        add(f"{ours}mlp/up/kernel", f"{hf}mlp.c_fc.weight", (d, f))
        add(f"{ours}mlp/up/bias", f"{hf}mlp.c_fc.bias", (f,))
        add(f"{ours}mlp/down/kernel", f"{hf}mlp.c_proj.weight", (f, d))
        add(f"{ours}mlp/down/bias", f"{hf}mlp.c_proj.bias", (d,))
    add("final_norm/scale", "ln_f.weight", (d,))
    add("final_norm/bias", "ln_f.bias", (d,))
    return out


def _llama_entries(c: ModelConfig) -> list[Entry]:
    d, h, k, dh, f = c.d_model, c.num_heads, c.kv_heads, c.dim_head, c.d_ff
    out: list[Entry] = []
    add = lambda path, name, shape, view=_identity: out.append(  # noqa: E731
        Entry(tuple(path.split("/")), name, shape, view)
    )
    add("embed/token", "model.embed_tokens.weight", (c.vocab_size, d))
    for i in range(c.num_layers):
        hf, ours = f"model.layers.{i}.", f"block_{i}/"
        add(f"{ours}ln_1/scale", f"{hf}input_layernorm.weight", (d,))
        add(f"{ours}ln_2/scale", f"{hf}post_attention_layernorm.weight", (d,))
        for name, n in (("q", h), ("k", k), ("v", k), ("o", h)):
            # torch Linear weights are [out, in]; ours [in, ...out] (o: [H, Dh, D]).
            shape = (d, n * dh) if name == "o" else (n * dh, d)
            view = (
                (lambda w: _reshape(w.T, (h, dh, d)))
                if name == "o"
                else (lambda w, n=n: _reshape(w.T, (d, n, dh)))
            )
            add(f"{ours}attn/{name}/kernel", f"{hf}self_attn.{name}_proj.weight", shape, view)
            if c.use_bias or (c.qkv_bias and name != "o"):
                b_view = _identity if name == "o" else (lambda b, n=n: _reshape(b, (n, dh)))
                add(f"{ours}attn/{name}/bias", f"{hf}self_attn.{name}_proj.bias", shape[:1], b_view)
        if c.qk_norm:
            for name in ("q_norm", "k_norm"):
                add(f"{ours}attn/{name}/scale", f"{hf}self_attn.{name}.weight", (dh,))
        for name, shape in (("gate", (f, d)), ("up", (f, d)), ("down", (d, f))):
            add(f"{ours}mlp/{name}/kernel", f"{hf}mlp.{name}_proj.weight", shape, np.transpose)
            if c.use_bias:
                add(f"{ours}mlp/{name}/bias", f"{hf}mlp.{name}_proj.bias", shape[:1])
    add("final_norm/scale", "model.norm.weight", (d,))
    return out


# HF tensors that carry no weights of ours: old GPT-2 causal-mask buffers, old Llama inv_freq.
_IGNORED = re.compile(r"(.*\.attn\.(bias|masked_bias)|.*\.rotary_emb\.inv_freq)$")


def weight_table(config: ModelConfig, *, gpt2_prefix: str = "transformer.") -> list[Entry]:
    """Every param of a head="lm" Transformer as a view of an HF tensor (see `Entry`).

    gpt2_prefix: "transformer." for GPT2LMHeadModel, "" for bare GPT2Model checkpoints.
    """
    kind = family(config)
    entries = _gpt2_entries(config, gpt2_prefix) if kind == "gpt2" else _llama_entries(config)
    if not config.tie_embeddings:
        entries.append(
            Entry(("unembed",), "lm_head.weight", (config.vocab_size, config.d_model), np.transpose)
        )
    return entries


def _tree_get(tree: Mapping, path: tuple[str, ...]) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def _paths(tree: Mapping) -> set[str]:
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(p, simple=True, separator="/") for p, _ in flat}


def _tree_set(tree: dict, path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


# ---- import -------------------------------------------------------------------------------


def load_tokenizer(hf_dir: str) -> tokenizer_lib.TokenizerBase | None:
    """The tokenizer in `hf_dir` (`tokenizer.model`, else `tokenizer.json`), or None if there
    is none."""
    if not any(os.path.exists(os.path.join(hf_dir, n)) for n in TOKENIZER_FILES):
        return None
    return tokenizer_lib.load(hf_dir)


def _abstract_and_shardings(model: Transformer, mesh, rules) -> tuple[Any, Any]:
    dummy = [np.zeros((1, 1), np.int32)] * 3
    if mesh is not None:
        rules = sharding_lib.DEFAULT_RULES if rules is None else rules
        return sharding_lib.abstract_params_and_shardings(model, dummy, mesh, rules)
    boxed = jax.eval_shape(lambda r: model.init(r, *dummy)["params"], jax.random.key(0))
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    abstract = nn.unbox(boxed)
    return abstract, jax.tree.map(lambda _: device, abstract)


def from_pretrained(
    hf_dir: str,
    *,
    mesh: jax.sharding.Mesh | None = None,
    rules: sharding_lib.Rules | None = None,
    dtype: str = "float32",
    compute_dtype: str | None = None,
) -> tuple[Transformer, dict]:
    """Loads an HF checkpoint directory (see SUPPORTED) -> (Transformer(head="lm"), params).

    hf_dir: config.json + model.safetensors (or model.safetensors.index.json and its shards).
    params: the unboxed "params" tree in `dtype` (weights are cast). With `mesh`, each param
    is built shard by shard on its NamedSharding (from `rules`, default DEFAULT_RULES); each
    device's shard is read from the memory-mapped file alone. Without, on the first device.
    A bf16 file loaded with dtype="bfloat16" is never widened: host memory holds one shard's
    bf16 copy at a time, not an f32 copy of the model.
    A tensor that is missing, unexpected or of the wrong shape raises InputError naming it.
    """
    where = os.path.join(hf_dir, CONFIG_FILE)
    hf = _read_json(where)
    config = config_from_hf(hf, dtype=dtype, compute_dtype=compute_dtype, where=where)
    model = Transformer(config)
    tensors = read_checkpoint(hf_dir)
    bare_gpt2 = "wte.weight" in tensors and "transformer.wte.weight" not in tensors
    entries = weight_table(config, gpt2_prefix="" if bare_gpt2 else "transformer.")

    used = {e.name for e in entries}
    for name, (_, path) in sorted(tensors.items()):
        tied_head = name == "lm_head.weight" and config.tie_embeddings
        if name not in used and not tied_head and not _IGNORED.fullmatch(name):
            raise InputError(
                f"{path}: {name}: unexpected tensor (not in a {hf['model_type']} model of "
                f"{config.num_layers} layers, tie_word_embeddings={config.tie_embeddings})"
            )
    for e in entries:
        if e.name not in tensors:
            raise InputError(f"{hf_dir}: {e.name}: missing tensor (expected shape {e.shape})")
        array, path = tensors[e.name]
        if tuple(array.shape) != e.shape:
            raise InputError(f"{path}: {e.name}: expected {e.shape}, got {tuple(array.shape)}")

    abstract, shardings = _abstract_and_shardings(model, mesh, rules)
    target = jnp.dtype(dtype)
    params: dict = {}
    for e in entries:
        view = e.view(tensors[e.name][0])
        want = _tree_get(abstract, e.path).shape
        if view.shape != want:  # our table is out of date with the model's param layout
            raise AssertionError(
                f"hf.weight_table: {'/'.join(e.path)} is {view.shape}, model has {want}"
            )

        def shard(index, view=view):
            return np.asarray(view[index]).astype(target)

        array = jax.make_array_from_callback(want, _tree_get(shardings, e.path), shard)
        _tree_set(params, e.path, array)
    unmapped = _paths(abstract) - _paths(params)
    if unmapped:
        raise AssertionError(f"hf.weight_table: no HF tensor for model params {sorted(unmapped)}")
    return model, params


# ---- export -------------------------------------------------------------------------------


def to_pretrained(
    model: Transformer,
    params: Mapping,
    out_dir: str,
    *,
    dtype: str | None = None,
    tokenizer_path: str | None = None,
) -> None:
    """Writes `out_dir/config.json` and `model.safetensors` that transformers loads.

    model: a head="lm" Transformer of GPT-2, Llama or Qwen numerics (see `family`); params: its
    "params" tree (host or sharded arrays; every process must call this, process 0 writes).
    dtype: of the saved weights (default: the params'). tokenizer_path: a `.model` file, a
    `tokenizer.json` or a folder holding either (see `tokenizer.load`), copied next to the
    weights (`tokenizer_files`); its bos/eos/pad ids go into config.json.
    """
    if model.head != "lm":
        raise ValueError(f"to_pretrained: head={model.head!r}; only LM models have an HF format")
    config = model.config
    entries = weight_table(config)
    host = sharding_lib.to_host(nn.unbox(params))
    sizes = {e.name: e.shape for e in entries}
    first = jax.tree.leaves(host)[0]
    out_dtype = np.dtype(jnp.dtype(dtype)) if dtype else first.dtype
    tensors = {name: np.empty(shape, out_dtype) for name, shape in sizes.items()}
    for e in entries:
        e.view(tensors[e.name])[...] = np.asarray(_tree_get(host, e.path)).astype(out_dtype)
    hf = hf_config_from(config, dtype=str(jnp.dtype(out_dtype)))
    if tokenizer_path is not None:
        tok = tokenizer_lib.load(tokenizer_path)
        ids = {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id}
        ids["pad_token_id"] = tok.pad_id if tok.has_pad else -1
        hf.update({k: v for k, v in ids.items() if v >= 0})
    if jax.process_index() != 0:
        return
    os.makedirs(out_dir, exist_ok=True)
    save_file(tensors, os.path.join(out_dir, WEIGHTS_FILE), metadata={"format": "pt"})
    with open(os.path.join(out_dir, CONFIG_FILE), "w", encoding="utf-8") as f:
        json.dump(hf, f, indent=2, sort_keys=True)
    if tokenizer_path is not None:
        for name, src in tokenizer_lib.tokenizer_files(tokenizer_path).items():
            shutil.copyfile(src, os.path.join(out_dir, name))
