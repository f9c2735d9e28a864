"""GPT-2 in NumPy (picoGPT style): learned positions, pre-LN blocks, tanh GELU, Conv1D weights stored [in, out].

    x = wte[ids] + wpe[0..T-1]
    for each block:  x = x + attn(ln_1(x));  x = x + mlp(ln_2(x))
      attn: softmax(q kᵀ · s + causal) v, s = 1/√D (1 with scale_attn_weights false), divided by layer + 1 more
            with scale_attn_by_inverse_layer_idx
    logits = ln_f(x) Wteᵀ          (the head is tied to the token embedding)
Shape legend: B batch, T tokens, C channels (n_embd), H heads, D head dim (C / H), V vocabulary.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..functional import attention, layer_norm
from ._common import Weights, activation, merge_heads, split_heads


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
    w = Weights(tensors, "gpt2", prefix="transformer.")
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


def mha(x, p, cfg: Config, layer: int):  # [B, T, C] -> [B, T, C]
    qkv = x @ p["c_attn"]["w"] + p["c_attn"]["b"]                           # [B, T, 3C]
    q, k, v = (split_heads(a, cfg.n_head) for a in np.split(qkv, 3, axis=-1))  # 3 x [B, H, T, D]
    scale = 1.0 / np.sqrt(q.shape[-1]) if cfg.scale_attn_weights else 1.0
    if cfg.scale_attn_by_inverse_layer_idx:
        scale /= layer + 1
    y = attention(q, k, v, causal=True, scale=scale)                          # [B, H, T, D]
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
