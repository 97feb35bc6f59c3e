r"""InstructGPT at the paper's sizes: the shapes and hyperparameters every paper-scale config shares.

    python -m instructrl.main --config=experiments/paper.py:size=6b,data=DATA,base=BASE_6B,rm_base=BASE_6B --workdir=DIR

`experiments/instructgpt_{1p3b,6b,175b}.py` are this file with `size` fixed; gpt2_124m.py and
llama_1b.py reuse `pipeline()` with Hugging Face checkpoints. Run from the repository root
(the thin configs import `experiments.paper`). Arguments (big_vision style, after ':'):

  size=1p3b|6b|175b  GPT-3 shapes (Brown et al. 2020, table 2.1): 1.3B 24 layers d 2048 16 heads,
                     6.7B ("6B") 32 layers d 4096 32 heads, 175B 96 layers d 12288 96 heads;
                     head dim 128, d_ff 4 d, context 2048, learned positions, LayerNorm,
                     GELU, tied embeddings. The vocabulary (GPT-2/3 BPE, 50257) is padded to
                     50304 = 393 x 128 so that a `tensor` mesh axis divides it; the extra
                     rows are never produced by the tokenizer.
  data=DIR           JSONL files (docs/design.md formats): DIR/demonstrations.jsonl,
                     DIR/comparisons.jsonl, DIR/prompts.jsonl, DIR/pretrain.jsonl (or
                     DIR/pretrain/*.txt|jsonl). Public sources: Anthropic HH-RLHF
                     (`python -m instructrl.data.convert --format=hh_rlhf
                     --input=hh-rlhf/*/train.jsonl.gz --out=DIR/comparisons.jsonl`), Alpaca for
                     demonstrations (`--format=alpaca`), prompts = the comparisons' prompts
                     (`jq -c '{prompt}' DIR/comparisons.jsonl > DIR/prompts.jsonl`, or
                     `--config.data.prompts=DIR/comparisons.jsonl`: extra fields are kept),
                     pretraining text from any public corpus as {"text"} lines.
  base=DIR           the pretrained policy: an instructrl export (params + model_config.json),
                     e.g. written by `python -m instructrl.convert --hf_dir=HF --out=DIR`, or
                     the export of your own `pretrain` stage. Its model_config.json must
                     match `config.model` (the padded vocabulary too, when tensor > 1).
  rm_base=DIR        the model the reward model starts from. The paper uses a 6B RM for every
                     policy size (and the value function starts from it), so this is a 6B
                     export for all sizes (default: `base` for size=6b, else
                     checkpoints/gpt3_6b); `config.reward_model` holds its shape.
  tokenizer=PATH     a SentencePiece .model, a Hugging Face tokenizer.json or a folder holding
                     either; default BASE (convert copies the checkpoint's tokenizer.model
                     or tokenizer.json there). It must be the tokenizer the base model was
                     trained with.
  smoke              a tiny model, short sequences and a few steps (config tests, plan tests).
  seed=N

Stages, in order (each writes DIR/<stage>/):
  rm        reward model from `rm_base`: 1 epoch, LR 9e-6 cosine to 10%, 64 prompts per batch
            with all C(K,2) pairs of a prompt in one element; normalised so demonstrations
            score 0. It runs first because SFT is selected by RM score (docs/method.md §1).
            Deviation: the paper starts the RM (and so the value network) from the 6B SFT
            model; here from `rm_base` (see `pipeline`), a 6B SFT export if you pass one.
  sft       16 epochs from `base`, residual dropout 0.2, cosine to 10%, no warm-up, Adam
            b2 0.95, LR 9.65e-6 / batch 32 (1.3B, 6B) or 5.03e-6 / batch 8 (175B); the
            exported epoch is the one whose greedy samples the RM scores highest.
  ppo_init  the PPO-init model: SFT for 2 epochs with pretraining text mixed in at the paper's
            10% of the loss (1 row in 8 of each batch, see the note in `pipeline`).
  ppo_ptx   PPO-ptx: 256k episodes = 500 iterations of 512 prompts, minibatch 64, 1 epoch,
            beta 0.02, gamma_ptx 27.8 with 8 pretraining sequences per episode, EMA 0.992,
            temperature 1, prompts up to 1024 tokens and responses up to 1024; value network
            initialised from the RM, value LR 9e-6 (5e-6 for 175B). The policy LR is not in
            docs/method.md: 1e-5 (ppo.default_config) is a placeholder to tune.
Plain PPO (the paper's "PPO") is the same stage with `--config.ppo_ptx.ptx_coef=0`.

Mesh (config.mesh, axes data/fsdp/tensor; see instructrl/sharding.py). One mesh serves every
stage, so its batch shards (data x fsdp) must divide each stage's batch (SFT 32 or 8, RM 64,
PPO minibatch 64); the tensor axis takes the rest of the slice:
  1.3B  fsdp=32 x tensor=-1: v5p-64 (32 chips) runs every stage.
  6B    fsdp=32 x tensor=-1: v5p-128 (64 chips, tensor 2) runs every stage.
  175B  fsdp=8 x tensor=-1: v5p-256 (128 chips, tensor 16) runs rm, sft and ppo_init.
        ppo_ptx (512 pretraining rows per minibatch) needs more batch shards than the SFT
        batch of 8 allows: run it on v5p-1024 with --config.mesh.fsdp=64 --config.mesh.tensor=8
        (stages reshard the exports they load).
These slices come from `python -m instructrl.plan --config=... --mesh=... --chip=v5p`
(estimates; RM batches with K = 9 responses, the paper's maximum).
Compute in bfloat16 with float32 params and optimizer state; every block is rematerialised.
At run time a stage takes dtype and remat from its `init_from` export's model_config.json
(`instructrl.convert` writes float32 compute without remat): set them there for exports.
"""

from __future__ import annotations

import ml_collections

from instructrl import config as config_lib
from instructrl.data import default_data_config
from instructrl.errors import ConfigError
from instructrl.stages import ppo, reward, sft

GPT3_VOCAB = 50257  # GPT-2/GPT-3 BPE
PADDED_VOCAB = (
    50304  # next multiple of 128: any tensor axis up to 128 that is a power of 2 divides it
)

# GPT-3 shapes; SFT LR / batch (docs/method.md §1); value LR (docs/method.md §3); the default mesh.
SIZES = {
    "1p3b": dict(layers=24, d_model=2048, heads=16, sft_lr=9.65e-6, sft_batch=32,
                 value_lr=9e-6, mesh=dict(data=1, fsdp=32, tensor=-1)),
    "6b": dict(layers=32, d_model=4096, heads=32, sft_lr=9.65e-6, sft_batch=32,
               value_lr=9e-6, mesh=dict(data=1, fsdp=32, tensor=-1)),
    "175b": dict(layers=96, d_model=12288, heads=96, sft_lr=5.03e-6, sft_batch=8,
                 value_lr=5e-6, mesh=dict(data=1, fsdp=8, tensor=-1)),
}  # fmt: skip


def gpt3_model(size: str, *, smoke: bool = False) -> ml_collections.ConfigDict:
    """ModelConfig fields of a GPT-3 size; `smoke`: 2 layers, d 64, vocab 512, context 128."""
    layers, d, heads = (SIZES[size][k] for k in ("layers", "d_model", "heads"))
    if smoke:
        layers, d, heads = 2, 64, 4
    return ml_collections.ConfigDict(
        dict(
            vocab_size=512 if smoke else PADDED_VOCAB,
            max_len=128 if smoke else 2048,
            num_layers=layers,
            d_model=d,
            num_heads=heads,
            d_ff=4 * d,
            position="learned",
            norm="layernorm",
            mlp="gelu",
            use_bias=True,
            tie_embeddings=True,
            dropout=0.0,
            attention_dropout=0.0,
            dtype="bfloat16",
            param_dtype="float32",
            remat=True,
        )
    )


def pipeline(
    *,
    model: ml_collections.ConfigDict,
    reward_model: ml_collections.ConfigDict,
    mesh: dict[str, int],
    data: str,
    base: str,
    rm_base: str,
    tokenizer: str,
    sft_lr: float = 9.65e-6,
    sft_batch: int = 32,
    value_lr: float = 9e-6,
    max_prompt_len: int = 1024,
    seq_len: int = 2048,
    smoke: bool = False,
    seed: int = 0,
) -> ml_collections.ConfigDict:
    """The rm -> sft -> ppo_init -> ppo_ptx pipeline with the paper's settings (module doc).

    `model` is the policy's shape, `reward_model` the RM's and value network's; the stages
    read the shapes of their `init_from` exports at run time, `instructrl.plan` reads these.
    """
    s = smoke
    config = ml_collections.ConfigDict()
    config.seed = seed
    config.stages = ["rm", "sft", "ppo_init", "ppo_ptx"]
    config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1) if s else mesh)
    config.model = model
    config.reward_model = reward_model  # not read by the stages (see docstring); plan reads it

    config.data = default_data_config()
    config.data.dir = data
    config.data.seq_len = 128 if s else seq_len
    config.data.max_prompt_len = 96 if s else max_prompt_len
    config.data.max_response_len = 32 if s else seq_len - max_prompt_len
    config.data.seed = seed
    tokenizer = tokenizer or base  # tokenizer.load: its tokenizer.model, else tokenizer.json

    config.rm = reward.default_config()  # 1 epoch, LR 9e-6 cosine to 10%, 64 prompts
    # Deviation (paper: the RM starts from the 6B SFT model, docs/method.md §2): it starts
    # from `rm_base`, a pretrained model, because SFT's checkpoint is chosen by this RM's
    # score (so the RM runs first) and at sizes other than 6B no 6B SFT model is trained
    # here. To follow the paper, pass the export of a 6B SFT run as rm_base=DIR.
    config.rm.init_from = rm_base
    config.rm.tokenizer_from = tokenizer
    config.rm.batch_size = 8 if s else 64
    config.rm.normalize = "demonstrations"
    config.rm.normalize_num = 16 if s else 512

    config.sft = sft.default_config()  # 16 epochs, dropout 0.2, cosine to 10%, b2 0.95
    config.sft.init_from = base
    config.sft.tokenizer_from = tokenizer
    config.sft.batch_size = 8 if s else sft_batch
    config.sft.num_epochs = 1 if s else 16
    config.sft.optimizer.lr = sft_lr
    config.sft.select_by = "rm_score"
    config.sft.select_reward_from = "rm"
    config.sft.select_num_prompts = 8 if s else 256

    config.ppo_init = sft.default_config()
    config.ppo_init.update(config.sft.to_dict())
    config.ppo_init.num_epochs = 1 if s else 2
    # The paper's 10% pretraining mix, as a weight on the two sources' token means (the loss
    # share is exact whatever the rows hold). Each host loads whole rows of both streams, so
    # 1 row in 8 is pretraining text: both row counts then split over up to 4 hosts at batch
    # 32; on more hosts raise ppo_init.batch_size so both divide by the host count.
    config.ppo_init.ptx_fraction = 0.1
    config.ppo_init.ptx_rows = config.ppo_init.batch_size // 8
    config.ppo_init.select_by = "last"
    config.ppo_init.select_reward_from = ""

    config.ppo_ptx = ppo.default_config()  # PPOConfig defaults are the paper's PPO-ptx
    config.ppo_ptx.init_from = "ppo_init"
    config.ppo_ptx.reward_from = "rm"
    config.ppo_ptx.tokenizer_from = tokenizer
    config.ppo_ptx.batch_size = 8 if s else 512
    config.ppo_ptx.num_minibatches = 2 if s else 8
    config.ppo_ptx.num_epochs = 1
    config.ppo_ptx.max_new_tokens = 32 if s else seq_len - max_prompt_len
    config.ppo_ptx.num_iterations = 2 if s else 500  # 256k episodes / 512
    config.ppo_ptx.kl_coef = 0.02
    config.ppo_ptx.ptx_coef = 27.8
    config.ppo_ptx.ptx_ratio = 1.0 if s else 8.0
    config.ppo_ptx.ema_decay = 0.992
    config.ppo_ptx.temperature = 1.0
    config.ppo_ptx.warmup_iterations = 1 if s else 10
    config.ppo_ptx.value_optimizer.lr = value_lr
    config.ppo_ptx.checkpoint_every = 1 if s else 20
    return config


def instructgpt(size: str, arg: str | None) -> ml_collections.ConfigDict:
    """The paper pipeline at one GPT-3 size; `arg` as in the module docstring (without size)."""
    a = config_lib.parse_arg(
        arg, smoke=False, seed=0, data="data/instructgpt", base=f"checkpoints/gpt3_{size}",
        rm_base="", tokenizer="",
    )  # fmt: skip
    rm_base = a.rm_base or (a.base if size == "6b" else "checkpoints/gpt3_6b")
    shape = SIZES[size]
    return pipeline(
        model=gpt3_model(size, smoke=a.smoke),
        reward_model=gpt3_model("6b", smoke=a.smoke),  # the paper's 6B RM for every size
        mesh=shape["mesh"],
        data=a.data,
        base=a.base,
        rm_base=rm_base,
        tokenizer=a.tokenizer,
        sft_lr=shape["sft_lr"],
        sft_batch=shape["sft_batch"],
        value_lr=shape["value_lr"],
        smoke=a.smoke,
        seed=a.seed,
    )


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    size, rest = "6b", []
    for item in (arg or "").split(","):
        key, _, value = item.partition("=")
        if key.strip() == "size":
            size = value.strip()
        elif item.strip():
            rest.append(item)
    if size not in SIZES:
        raise ConfigError(f"config argument 'size': {size!r} not in {sorted(SIZES)}")
    return instructgpt(size, ",".join(rest))
