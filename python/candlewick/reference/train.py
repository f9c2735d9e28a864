"""Training a language model in NumPy: AdamW, warm-up and cosine decay, gradient clipping, batches of token windows,
a seeded loop, and a fresh model's config and weights. Everything the loop does is deterministic given its seed.

    model = reference.load(folder)                               # or new_config + init_weights + save_checkpoint
    history = train(model, train_ids, val_ids, TrainConfig(steps=200), seed=0)
    save_checkpoint(model, folder)

The loss is the one of pretraining and fine-tuning alike, L = -1/N Σ_t log P(x[t+1] | x[..t]), over windows of
block_size + 1 tokens cut at random places from the training text; model.loss_and_grads gives L and ∂L/∂θ.
Shape legend: B batch, T tokens (block_size), C channels, V vocabulary.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from .functional import cross_entropy


# --- the optimizer -------------------------------------------------------------------------------------------------

class AdamW:
    """Adam with decoupled weight decay (Loshchilov & Hutter), as torch.optim.AdamW. For each tensor θ with
    gradient g, at step t = 1, 2, ...:

        m ← β1 m + (1 - β1) g                 v ← β2 v + (1 - β2) g²          (running mean and mean square)
        m̂ = m / (1 - β1ᵗ)                     v̂ = v / (1 - β2ᵗ)               (the zero start corrected)
        θ ← θ - lr · λ · θ                    (weight decay, on matrices only: not on biases and norm weights)
        θ ← θ - lr · m̂ / (√v̂ + ε)

    Each tensor moves by about lr per step whatever its gradient's scale. The tensors are updated in place."""

    def __init__(self, params: dict[str, np.ndarray], *, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1):
        self.params, self.betas, self.eps, self.weight_decay = params, betas, eps, weight_decay
        self.m = {k: np.zeros_like(v) for k, v in params.items()}
        self.v = {k: np.zeros_like(v) for k, v in params.items()}
        self.t = 0

    def decays(self, name: str) -> bool:
        """Weight decay pulls matrices (embeddings, projections) towards 0; vectors (biases, norms) keep theirs."""
        return self.params[name].ndim >= 2

    def step(self, grads: dict[str, np.ndarray], lr: float) -> None:
        self.t += 1
        b1, b2 = self.betas
        for name, g in grads.items():
            theta, m, v = self.params[name], self.m[name], self.v[name]
            m *= b1
            m += (1 - b1) * g
            v *= b2
            v += (1 - b2) * g * g
            m_hat, v_hat = m / (1 - b1**self.t), v / (1 - b2**self.t)
            if self.decays(name):
                theta *= 1 - lr * self.weight_decay
            theta -= lr * m_hat / (np.sqrt(v_hat) + self.eps)


def lr_at(step: int, *, lr: float, min_lr: float, warmup: int, steps: int) -> float:
    """The learning rate of update `step` (0-based): a linear warm-up over the first `warmup` updates,
    lr (step + 1) / warmup, then a half cosine from lr down to min_lr at the last update:
    min_lr + ½ (lr - min_lr) (1 + cos(π p)), p = (step - warmup) / (steps - warmup - 1) from 0 to 1."""
    if step < warmup:
        return lr * (step + 1) / warmup
    span = max(steps - warmup - 1, 1)
    p = min((step - warmup) / span, 1.0)
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * p))


def clip_grad_norm(grads: dict[str, np.ndarray], max_norm: float) -> float:
    """Scale all gradients together so that their global norm ‖g‖ = √(Σ g²) is at most max_norm (by
    max_norm / (‖g‖ + 1e-6), as torch.nn.utils.clip_grad_norm_), in place; one bad batch cannot throw the
    weights far. Returns ‖g‖ before clipping."""
    norm = math.sqrt(sum(float(np.sum(g * g)) for g in grads.values()))
    if norm > max_norm:
        scale = max_norm / (norm + 1e-6)
        for g in grads.values():
            g *= scale
    return norm


# --- data ----------------------------------------------------------------------------------------------------------

def split_train_val(ids, val_fraction: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """The first (1 - val_fraction) of the tokens train, the held-out tail validates (never seen in training)."""
    ids = np.asarray(ids, dtype=np.int64)
    n_val = max(int(len(ids) * val_fraction), 2)
    return ids[:-n_val], ids[-n_val:]


def sample_batch(ids: np.ndarray, batch_size: int, block_size: int, rng: np.random.Generator) -> np.ndarray:
    """B windows of block_size + 1 consecutive tokens starting at random places: [B, T + 1]. Position t of a row
    predicts t + 1, so one row holds T predictions, each with up to T tokens of context."""
    if len(ids) < block_size + 1:
        raise ValueError(f"{len(ids)} training tokens is fewer than one window of {block_size + 1}")
    starts = rng.integers(0, len(ids) - block_size, size=batch_size)     # [B]
    return np.stack([ids[s:s + block_size + 1] for s in starts])         # [B, T + 1]


def eval_windows(ids: np.ndarray, block_size: int, max_windows: int = 64) -> np.ndarray:
    """The validation text cut into consecutive windows of block_size + 1 tokens (overlapping by one, so that every
    token but the first is predicted once): the same windows at every evaluation. [N, T + 1]"""
    n = min((len(ids) - 1) // block_size, max_windows)
    if n < 1:
        raise ValueError(f"{len(ids)} validation tokens is fewer than one window of {block_size + 1}")
    return np.stack([ids[i * block_size:i * block_size + block_size + 1] for i in range(n)])


def mean_loss(model, windows: np.ndarray, batch_size: int = 16) -> float:
    """The mean next-token cross-entropy over the windows [N, T + 1], by the model's forward pass."""
    total, count = 0.0, 0
    for i in range(0, len(windows), batch_size):
        rows = windows[i:i + batch_size]
        hidden = model.module.hidden_states(model.params, model.config, rows[:, :-1])   # [B, T, C]
        nll = cross_entropy(model.head(hidden), rows[:, 1:], reduction="none")          # [B, T]
        total, count = total + float(nll.sum()), count + nll.size
    return total / count


# --- the loop ------------------------------------------------------------------------------------------------------

@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 16
    block_size: int = 64         # T: tokens of context per window
    lr: float = 3e-3
    min_lr: float = 3e-4         # where the cosine ends
    warmup: int = 50
    weight_decay: float = 0.1
    betas: tuple = (0.9, 0.95)
    grad_clip: float = 1.0
    eval_every: int = 50         # updates between validation losses (and after the last one)
    eval_windows: int = 32


@dataclass
class Step:
    """One row of the history: update `step` (1-based; step 0 is the model before training, with only a
    validation loss), the training loss of its batch before the update, its learning rate, the gradient norm
    before clipping, the validation loss after it (None between evaluations) and the tokens per second."""
    step: int
    train_loss: float | None
    val_loss: float | None
    lr: float = 0.0
    grad_norm: float = 0.0
    tokens_per_s: float = 0.0


def train(model, train_ids, val_ids, config: TrainConfig, *, seed: int = 0,
          on_step: Callable[[Step], None] | None = None, threads: int | None = 1) -> list[Step]:
    """Train `model` (a reference CausalLM with loss_and_grads) in place with AdamW over random windows of
    train_ids. Batches come from np.random.default_rng(seed) alone, so the same seed gives the same run.
    Returns the history; on_step sees each row as it is made (a progress bar).

    threads: how many threads NumPy's BLAS may use meanwhile (through threadpoolctl, when it is installed). One by
    default: a small model's matrices are too small to share, and on a busy machine two BLAS threads waiting for
    each other made a step of the demo model 10x slower (0.67 s against 6.5 s). None leaves NumPy's setting."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        threads = None
    if threads is None:
        return _train(model, train_ids, val_ids, config, seed, on_step)
    with threadpool_limits(limits=threads, user_api="blas"):
        return _train(model, train_ids, val_ids, config, seed, on_step)


def _train(model, train_ids, val_ids, config: TrainConfig, seed: int, on_step) -> list[Step]:
    rng = np.random.default_rng(seed)
    train_ids = np.asarray(train_ids, dtype=np.int64)
    windows = eval_windows(np.asarray(val_ids, dtype=np.int64), config.block_size, config.eval_windows)
    opt = AdamW(model.tensors, betas=config.betas, weight_decay=config.weight_decay)
    history = [Step(0, None, mean_loss(model, windows))]
    if on_step:
        on_step(history[0])
    for step in range(config.steps):
        start = time.perf_counter()
        batch = sample_batch(train_ids, config.batch_size, config.block_size, rng)      # [B, T + 1]
        loss, grads = model.loss_and_grads(batch)
        norm = clip_grad_norm(grads, config.grad_clip)
        lr = lr_at(step, lr=config.lr, min_lr=config.min_lr, warmup=config.warmup, steps=config.steps)
        opt.step(grads, lr)
        last = step + 1 == config.steps
        val = mean_loss(model, windows) if last or (step + 1) % config.eval_every == 0 else None
        row = Step(step + 1, loss, val, lr, norm, batch[:, 1:].size / (time.perf_counter() - start))
        history.append(row)
        if on_step:
            on_step(row)
    return history


# --- a new model ---------------------------------------------------------------------------------------------------

def new_config(arch: str, vocab_size: int, *, n_layer: int = 4, n_embd: int = 128, n_head: int = 4,
               n_kv_head: int | None = None, context: int = 256, bos_token_id: int = 0,
               eos_token_id: int = 0) -> dict:
    """config.json of a fresh model in transformers' format, so that candlewick.load, reference.load and
    transformers all read it: "gpt2" (learned positions, LayerNorm, GELU, tied head) or "llama" (RoPE, RMSNorm,
    SwiGLU MLP, grouped-query attention with n_kv_head key/value heads, tied head)."""
    if n_embd % n_head:
        raise ValueError(f"n_embd {n_embd} is not a multiple of n_head {n_head}")
    common = {"vocab_size": vocab_size, "bos_token_id": bos_token_id, "eos_token_id": eos_token_id,
              "tie_word_embeddings": True, "dtype": "float32"}
    if arch == "gpt2":
        return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "n_layer": n_layer, "n_embd": n_embd,
                "n_head": n_head, "n_inner": None, "n_positions": context, "n_ctx": context,
                "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5, "initializer_range": 0.02,
                "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, "scale_attn_weights": True,
                **common}
    if arch == "llama":
        kv = n_kv_head or n_head
        if n_head % kv:
            raise ValueError(f"n_head {n_head} is not a multiple of n_kv_head {kv}")
        return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "num_hidden_layers": n_layer,
                "hidden_size": n_embd, "intermediate_size": 8 * n_embd // 3 // 16 * 16 or 16,
                "num_attention_heads": n_head, "num_key_value_heads": kv, "head_dim": n_embd // n_head,
                "max_position_embeddings": context, "hidden_act": "silu", "rms_norm_eps": 1e-5,
                "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}, "attention_bias": False,
                "mlp_bias": False, "initializer_range": 0.02, **common}
    raise ValueError(f"arch must be 'gpt2' or 'llama', not {arch!r}")


def init_weights(config: dict, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Fresh weights named as transformers names them, GPT-2's way: every matrix N(0, 0.02²), the projections
    that write into the residual stream (attention output, MLP output) N(0, (0.02 / √(2L))²) so that the
    stream's variance does not grow with depth L, biases 0, norm weights 1. float32, as saved."""
    std, L = config["initializer_range"], config.get("n_layer") or config["num_hidden_layers"]
    out_std = std / math.sqrt(2 * L)
    w: dict[str, np.ndarray] = {}

    def normal(name: str, shape, s=std):
        w[name] = (rng.standard_normal(shape) * s).astype(np.float32)

    if config["model_type"] == "gpt2":
        C, V, P = config["n_embd"], config["vocab_size"], config["n_positions"]
        normal("transformer.wte.weight", (V, C))
        normal("transformer.wpe.weight", (P, C))
        for i in range(L):
            h = f"transformer.h.{i}."
            for ln in ("ln_1", "ln_2"):
                w[h + ln + ".weight"], w[h + ln + ".bias"] = np.ones(C, np.float32), np.zeros(C, np.float32)
            for name, shape, s in (("attn.c_attn", (C, 3 * C), std), ("attn.c_proj", (C, C), out_std),
                                   ("mlp.c_fc", (C, 4 * C), std), ("mlp.c_proj", (4 * C, C), out_std)):
                normal(h + name + ".weight", shape, s)                     # Conv1D: [in, out]
                w[h + name + ".bias"] = np.zeros(shape[1], np.float32)
        w["transformer.ln_f.weight"], w["transformer.ln_f.bias"] = np.ones(C, np.float32), np.zeros(C, np.float32)
        return w
    C, V, F = config["hidden_size"], config["vocab_size"], config["intermediate_size"]
    D, H, Hkv = config["head_dim"], config["num_attention_heads"], config["num_key_value_heads"]
    normal("model.embed_tokens.weight", (V, C))
    for i in range(L):
        n = f"model.layers.{i}."
        w[n + "input_layernorm.weight"] = np.ones(C, np.float32)
        w[n + "post_attention_layernorm.weight"] = np.ones(C, np.float32)
        for name, shape, s in (("self_attn.q_proj", (H * D, C), std), ("self_attn.k_proj", (Hkv * D, C), std),
                               ("self_attn.v_proj", (Hkv * D, C), std), ("self_attn.o_proj", (C, H * D), out_std),
                               ("mlp.gate_proj", (F, C), std), ("mlp.up_proj", (F, C), std),
                               ("mlp.down_proj", (C, F), out_std)):
            normal(n + name + ".weight", shape, s)                         # nn.Linear: [out, in]
    w["model.norm.weight"] = np.ones(C, np.float32)
    return w


def save_weights(tensors: dict[str, np.ndarray], folder, dtype=np.float32) -> Path:
    """The tensors, under their checkpoint names, into FOLDER/model.safetensors as `dtype` (float32: what
    candlewick.load and transformers read fastest). Integer buffers are written as they are."""
    from safetensors.numpy import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {k: np.ascontiguousarray(v.astype(dtype) if np.issubdtype(v.dtype, np.floating) else v)
              for k, v in tensors.items()}
    save_file(arrays, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder / "model.safetensors"


def save_checkpoint(model, folder, dtype=np.float32) -> Path:
    """A trained reference model's weights into FOLDER/model.safetensors (its config and tokenizer are already
    there, or copied by the caller)."""
    return save_weights(model.tensors, folder, dtype)


def new_checkpoint(folder, config: dict, tokenizer_json, *, seed: int = 0) -> Path:
    """A fresh model in FOLDER: config.json, a copy of tokenizer_json, and init_weights(config,
    np.random.default_rng(seed)) in model.safetensors. Returns the folder, for reference.load."""
    import json
    import shutil

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    if Path(tokenizer_json).resolve() != (folder / "tokenizer.json").resolve():
        shutil.copyfile(tokenizer_json, folder / "tokenizer.json")
    save_weights(init_weights(config, np.random.default_rng(seed)), folder)
    return folder
