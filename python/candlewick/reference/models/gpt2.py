"""GPT-2 in NumPy (picoGPT style): learned positions, pre-LN blocks, tanh GELU, Conv1D weights stored [in, out].

    x = wte[ids] + wpe[0..T-1]
    for each block:  x = x + attn(ln_1(x));  x = x + mlp(ln_2(x))
      attn: softmax(q kᵀ · s + causal) v, s = 1/√D (1 with scale_attn_weights false), divided by layer + 1 more
            with scale_attn_by_inverse_layer_idx
    logits = ln_f(x) Wteᵀ          (the head is tied to the token embedding)
Training (`loss_and_grads`): the same forward, keeping the activations each backward step needs, then the steps
in reverse, each through its function's backward in reference.functional.
Shape legend: B batch, T tokens, C channels (n_embd), H heads, D head dim (C / H), V vocabulary.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..functional import (attention, attention_backward, cross_entropy, cross_entropy_backward, embedding,
                          embedding_backward, layer_norm, layer_norm_backward, linear_backward)
from ._common import Weights, activation, activation_backward, merge_heads, split_heads

PREFIX = "transformer."  # of every tensor name but lm_head.weight, in transformers' files


@dataclass
class Config:
    vocab_size: int
    n_positions: int
    n_embd: int
    n_layer: int
    n_head: int
    n_inner: int                       # MLP width, 4 * n_embd unless the config says
    layer_norm_epsilon: float = 1e-5
    activation_function: str = "gelu_new"
    scale_attn_weights: bool = True
    scale_attn_by_inverse_layer_idx: bool = False
    tie_word_embeddings: bool = True
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    architecture: str = "GPT2LMHeadModel"
    raw: dict = field(default_factory=dict, repr=False)

    @property
    def context_length(self) -> int:
        return self.n_positions

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        activation(d.get("activation_function", "gelu_new"), "gpt2", "activation_function")
        return cls(vocab_size=d["vocab_size"], n_positions=d.get("n_positions", d.get("n_ctx", 1024)),
                   n_embd=d["n_embd"], n_layer=d["n_layer"], n_head=d["n_head"],
                   n_inner=d.get("n_inner") or 4 * d["n_embd"],
                   layer_norm_epsilon=d.get("layer_norm_epsilon", 1e-5),
                   activation_function=d.get("activation_function", "gelu_new"),
                   scale_attn_weights=d.get("scale_attn_weights", True),
                   scale_attn_by_inverse_layer_idx=d.get("scale_attn_by_inverse_layer_idx", False),
                   tie_word_embeddings=d.get("tie_word_embeddings", True),
                   bos_token_id=d.get("bos_token_id"), eos_token_id=d.get("eos_token_id"),
                   architecture=(d.get("architectures") or ["GPT2LMHeadModel"])[0], raw=d)


def load_params(tensors: dict[str, np.ndarray], cfg: Config) -> dict:
    """Checkpoint names -> a nested dict, checking every shape. The `transformer.` prefix is optional; Conv1D
    weights stay [in, out] as stored, so a layer is x @ w + b. A missing lm_head.weight means a tied head."""
    w = Weights(tensors, "gpt2", prefix=PREFIX)
    take, C, V, F = w.take, cfg.n_embd, cfg.vocab_size, cfg.n_inner

    def block(i):
        h = f"h.{i}."
        return {"ln_1": {"weight": take(h + "ln_1.weight", (C,)), "bias": take(h + "ln_1.bias", (C,))},
                "c_attn": {"w": take(h + "attn.c_attn.weight", (C, 3 * C)),
                           "b": take(h + "attn.c_attn.bias", (3 * C,))},
                "attn_proj": {"w": take(h + "attn.c_proj.weight", (C, C)), "b": take(h + "attn.c_proj.bias", (C,))},
                "ln_2": {"weight": take(h + "ln_2.weight", (C,)), "bias": take(h + "ln_2.bias", (C,))},
                "c_fc": {"w": take(h + "mlp.c_fc.weight", (C, F)), "b": take(h + "mlp.c_fc.bias", (F,))},
                "mlp_proj": {"w": take(h + "mlp.c_proj.weight", (F, C)), "b": take(h + "mlp.c_proj.bias", (C,))}}

    wte = take("wte.weight", (V, C))
    lm_head = w.lm_head("lm_head.weight", wte, cfg.tie_word_embeddings)
    return {"wte": wte, "wpe": take("wpe.weight", (cfg.n_positions, C)),
            "blocks": [block(i) for i in range(cfg.n_layer)],
            "ln_f": {"weight": take("ln_f.weight", (C,)), "bias": take("ln_f.bias", (C,))}, "lm_head": lm_head}


def attn_scale(cfg: Config, layer: int) -> float:
    scale = 1.0 / np.sqrt(cfg.n_embd // cfg.n_head) if cfg.scale_attn_weights else 1.0
    return scale / (layer + 1) if cfg.scale_attn_by_inverse_layer_idx else scale


def mha(x, p, cfg: Config, layer: int):  # [B, T, C] -> [B, T, C]
    qkv = x @ p["c_attn"]["w"] + p["c_attn"]["b"]                           # [B, T, 3C]
    q, k, v = (split_heads(a, cfg.n_head) for a in np.split(qkv, 3, axis=-1))  # 3 x [B, H, T, D]
    y = attention(q, k, v, causal=True, scale=attn_scale(cfg, layer))         # [B, H, T, D]
    return merge_heads(y) @ p["attn_proj"]["w"] + p["attn_proj"]["b"]        # [B, T, C]


def mlp(x, p, cfg: Config):  # [B, T, C] -> [B, T, C]
    h = activation(cfg.activation_function, "gpt2")(x @ p["c_fc"]["w"] + p["c_fc"]["b"])  # [B, T, 4C]
    return h @ p["mlp_proj"]["w"] + p["mlp_proj"]["b"]                                    # [B, T, C]


def block(x, p, cfg: Config, layer: int):  # [B, T, C] -> [B, T, C]
    eps = cfg.layer_norm_epsilon
    x = x + mha(layer_norm(x, **p["ln_1"], eps=eps), p, cfg, layer)
    return x + mlp(layer_norm(x, **p["ln_2"], eps=eps), p, cfg)


def hidden_states(params, cfg: Config, ids, *, all_layers=False):  # [B, T] -> [B, T, C], after the final LayerNorm
    """With all_layers: a list of the residual stream after each block, then the final normed state."""
    ids = np.asarray(ids)
    x = params["wte"][ids] + params["wpe"][np.arange(ids.shape[-1])]       # [B, T, C]
    layers = []
    for i, p in enumerate(params["blocks"]):
        x = block(x, p, cfg, i)
        layers.append(x)
    x = layer_norm(x, **params["ln_f"], eps=cfg.layer_norm_epsilon)
    return layers + [x] if all_layers else x


# --- training ------------------------------------------------------------------------------------------------------

def conv1d_backward(dy, x, w):
    """y = x w + b with w [in, out] (GPT-2's Conv1D, nn.Linear's weight transposed): dx = dy wᵀ, dw = xᵀ dy,
    db = Σ dy. Returns (dx, dw [in, out], db)."""
    dy2, x2 = dy.reshape(-1, dy.shape[-1]), x.reshape(-1, x.shape[-1])      # [N, out], [N, in]
    return dy @ w.T, x2.T @ dy2, dy2.sum(axis=0)


def block_forward(x, p, cfg: Config, layer: int):  # [B, T, C] -> ([B, T, C], the activations block_backward needs)
    """block(), written out step by step, keeping what the backward pass reads."""
    eps, act = cfg.layer_norm_epsilon, activation(cfg.activation_function, "gpt2")
    h1 = layer_norm(x, **p["ln_1"], eps=eps)                                  # [B, T, C]
    qkv = h1 @ p["c_attn"]["w"] + p["c_attn"]["b"]                          # [B, T, 3C]
    q, k, v = (split_heads(a, cfg.n_head) for a in np.split(qkv, 3, axis=-1))  # 3 x [B, H, T, D]
    a = merge_heads(attention(q, k, v, causal=True, scale=attn_scale(cfg, layer)))  # [B, T, C]
    x1 = x + a @ p["attn_proj"]["w"] + p["attn_proj"]["b"]                   # [B, T, C]
    h2 = layer_norm(x1, **p["ln_2"], eps=eps)                                # [B, T, C]
    f = h2 @ p["c_fc"]["w"] + p["c_fc"]["b"]                                 # [B, T, 4C]
    g = act(f)
    x2 = x1 + g @ p["mlp_proj"]["w"] + p["mlp_proj"]["b"]                    # [B, T, C]
    return x2, dict(x=x, h1=h1, q=q, k=k, v=v, a=a, x1=x1, h2=h2, f=f, g=g)


def block_backward(dx2, c: dict, p, cfg: Config, layer: int, grads: dict):  # [B, T, C] -> [B, T, C]
    """The steps of block_forward in reverse. A residual x + F(x) passes its gradient on unchanged and adds
    F's: dx = dy + F_backward(dy). Parameter gradients go into `grads` under the checkpoint's names."""
    eps, h = cfg.layer_norm_epsilon, f"h.{layer}."
    act_backward = activation_backward(cfg.activation_function, "gpt2")
    dg, grads[h + "mlp.c_proj.weight"], grads[h + "mlp.c_proj.bias"] = conv1d_backward(dx2, c["g"], p["mlp_proj"]["w"])
    df = act_backward(dg, c["f"])
    dh2, grads[h + "mlp.c_fc.weight"], grads[h + "mlp.c_fc.bias"] = conv1d_backward(df, c["h2"], p["c_fc"]["w"])
    dln2, grads[h + "ln_2.weight"], grads[h + "ln_2.bias"] = layer_norm_backward(dh2, c["x1"], **p["ln_2"], eps=eps)
    dx1 = dx2 + dln2
    da, grads[h + "attn.c_proj.weight"], grads[h + "attn.c_proj.bias"] = conv1d_backward(dx1, c["a"],
                                                                                         p["attn_proj"]["w"])
    dq, dk, dv = attention_backward(split_heads(da, cfg.n_head), c["q"], c["k"], c["v"], causal=True,
                                    scale=attn_scale(cfg, layer))             # 3 x [B, H, T, D]
    dqkv = np.concatenate([merge_heads(dq), merge_heads(dk), merge_heads(dv)], axis=-1)  # [B, T, 3C]
    dh1, grads[h + "attn.c_attn.weight"], grads[h + "attn.c_attn.bias"] = conv1d_backward(dqkv, c["h1"],
                                                                                          p["c_attn"]["w"])
    dln1, grads[h + "ln_1.weight"], grads[h + "ln_1.bias"] = layer_norm_backward(dh1, c["x"], **p["ln_1"], eps=eps)
    return dx1 + dln1


def loss_and_grads(params, cfg: Config, ids, targets):  # [B, T], [B, T] -> (float, {name: gradient})
    """L = mean over the B·T positions of -log softmax(logits)[target], and ∂L/∂ every parameter, keyed by the
    checkpoint's names without the `transformer.` prefix. A tied head's gradient is added to wte's (one matrix
    used twice gets the sum of both uses)."""
    ids, eps, grads = np.asarray(ids), cfg.layer_norm_epsilon, {}
    T = ids.shape[-1]
    x = embedding(ids, params["wte"]) + params["wpe"][:T]                    # [B, T, C]
    caches = []
    for i, p in enumerate(params["blocks"]):
        x, cache = block_forward(x, p, cfg, i)
        caches.append(cache)
    hf = layer_norm(x, **params["ln_f"], eps=eps)                            # [B, T, C]
    logits = hf @ params["lm_head"].T                                        # [B, T, V]
    loss = cross_entropy(logits, targets)

    dlogits = cross_entropy_backward(1.0, logits, targets)                   # [B, T, V]
    dhf, dhead, _ = linear_backward(dlogits, hf, params["lm_head"])
    dx, grads["ln_f.weight"], grads["ln_f.bias"] = layer_norm_backward(dhf, x, **params["ln_f"], eps=eps)
    for i in reversed(range(len(params["blocks"]))):
        dx = block_backward(dx, caches[i], params["blocks"][i], cfg, i, grads)
    grads["wte.weight"] = embedding_backward(dx, ids, params["wte"])
    grads["wpe.weight"] = np.zeros_like(params["wpe"])
    grads["wpe.weight"][:T] = dx.reshape(-1, T, dx.shape[-1]).sum(axis=0)   # position t is used by every row
    if params["lm_head"] is params["wte"]:
        grads["wte.weight"] += dhead
    else:
        grads["lm_head.weight"] = dhead
    return loss, grads
