"""Llama in NumPy, with grouped-query attention; Mistral (sliding window) and Qwen2 (q/k/v biases) are variants.

    x = embed_tokens[ids]
    for each layer:  x = x + attn(rms_norm(x));  x = x + mlp(rms_norm(x))
      attn: q, k = rope(x Wqᵀ), rope(x Wkᵀ);  v = x Wvᵀ;  softmax(q kᵀ/√D + causal) v Woᵀ  (Hkv <= H kv heads)
      mlp:  down(silu(gate(x)) * up(x))
    logits = rms_norm(x) Wᵀ          (W = lm_head, or embed_tokens when tied)
Shape legend: B batch, T tokens, C channels (hidden_size), H heads, Hkv key/value heads, D head dim, V vocabulary.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..functional import attention, causal_mask, gelu, linear, rms_norm, rope, silu

ACTIVATIONS = {"silu": silu, "swish": silu, "gelu": lambda x: gelu(x, approximate="none"),
               "gelu_pytorch_tanh": gelu, "gelu_new": gelu}


@dataclass
class Config:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None   # {"rope_type": "linear" | "llama3", "factor": ...}; None = plain RoPE
    hidden_act: str = "silu"
    qkv_bias: bool = False             # Qwen2; Llama's attention_bias adds o_proj's bias too
    o_bias: bool = False
    mlp_bias: bool = False
    sliding_windows: list = field(default_factory=list)  # per layer: window length, or None for full attention
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    architecture: str = "LlamaForCausalLM"
    raw: dict = field(default_factory=dict, repr=False)

    @property
    def context_length(self) -> int:
        return self.max_position_embeddings

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        """Both config styles: transformers 5 nests rope_theta / rope_type in `rope_parameters`, older files keep
        `rope_theta` and `rope_scaling` at the top level."""
        model_type = d.get("model_type", "llama")
        rope = dict(d.get("rope_parameters") or {})
        theta = rope.pop("rope_theta", d.get("rope_theta", 10000.0))
        scaling = rope or d.get("rope_scaling") or None
        if scaling and scaling.get("rope_type", scaling.get("type", "default")) == "default":
            scaling = None
        if d.get("partial_rotary_factor", 1.0) != 1.0:
            raise NotImplementedError("llama: partial_rotary_factor")
        n_layers, heads = d["num_hidden_layers"], d["num_attention_heads"]
        window = d.get("sliding_window")
        if "layer_types" in d:
            windows = [window if t == "sliding_attention" else None for t in d["layer_types"]]
        elif model_type == "mistral":
            windows = [window] * n_layers
        elif model_type == "qwen2" and d.get("use_sliding_window"):
            windows = [window if i >= d.get("max_window_layers", 0) else None for i in range(n_layers)]
        else:
            windows = [None] * n_layers
        attention_bias = d.get("attention_bias", False)
        return cls(model_type=model_type, vocab_size=d["vocab_size"], hidden_size=d["hidden_size"],
                   intermediate_size=d["intermediate_size"], num_hidden_layers=n_layers, num_attention_heads=heads,
                   num_key_value_heads=d.get("num_key_value_heads") or heads,
                   head_dim=d.get("head_dim") or d["hidden_size"] // heads,
                   max_position_embeddings=d.get("max_position_embeddings", 2048),
                   rms_norm_eps=d.get("rms_norm_eps", 1e-6), rope_theta=float(theta), rope_scaling=scaling,
                   hidden_act=d.get("hidden_act", "silu"), qkv_bias=model_type == "qwen2" or attention_bias,
                   o_bias=attention_bias, mlp_bias=d.get("mlp_bias", False), sliding_windows=windows,
                   tie_word_embeddings=d.get("tie_word_embeddings", False), bos_token_id=d.get("bos_token_id"),
                   eos_token_id=d.get("eos_token_id"),
                   architecture=(d.get("architectures") or ["LlamaForCausalLM"])[0], raw=d)


def load_params(w: dict[str, np.ndarray], cfg: Config) -> dict:
    """Checkpoint names -> a nested dict, checking every shape. The `model.` prefix is optional; projections
    stay [out, in] as nn.Linear stores them. A missing lm_head.weight means a tied head."""
    w = {k.removeprefix("model."): v for k, v in w.items()}
    C, F, V = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    qd, kvd = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim

    def take(name, shape):
        if name not in w:
            raise ValueError(f"{cfg.model_type}: weight {name!r} is missing from the checkpoint")
        if w[name].shape != shape:
            raise ValueError(f"{cfg.model_type}: weight {name!r} has shape {w[name].shape}, expected {shape}")
        return w[name]

    def proj(name, out_dim, in_dim, bias):  # (weight [out, in], bias [out] or None)
        return take(name + ".weight", (out_dim, in_dim)), take(name + ".bias", (out_dim,)) if bias else None

    def layer(i):
        a, m = f"layers.{i}.self_attn.", f"layers.{i}.mlp."
        return {"input_layernorm": take(f"layers.{i}.input_layernorm.weight", (C,)),
                "q_proj": proj(a + "q_proj", qd, C, cfg.qkv_bias), "k_proj": proj(a + "k_proj", kvd, C, cfg.qkv_bias),
                "v_proj": proj(a + "v_proj", kvd, C, cfg.qkv_bias), "o_proj": proj(a + "o_proj", C, qd, cfg.o_bias),
                "post_attention_layernorm": take(f"layers.{i}.post_attention_layernorm.weight", (C,)),
                "gate_proj": proj(m + "gate_proj", F, C, cfg.mlp_bias),
                "up_proj": proj(m + "up_proj", F, C, cfg.mlp_bias),
                "down_proj": proj(m + "down_proj", C, F, cfg.mlp_bias)}

    embed = take("embed_tokens.weight", (V, C))
    if "lm_head.weight" in w:
        lm_head = take("lm_head.weight", (V, C))
    elif cfg.tie_word_embeddings:
        lm_head = embed
    else:
        raise ValueError(f"{cfg.model_type}: lm_head.weight is missing and tie_word_embeddings is false")
    return {"embed_tokens": embed, "layers": [layer(i) for i in range(cfg.num_hidden_layers)],
            "norm": take("norm.weight", (C,)), "lm_head": lm_head}


def split_heads(x, n_head):  # [B, T, n_head * D] -> [B, n_head, T, D]
    B, T, _ = x.shape
    return x.reshape(B, T, n_head, -1).transpose(0, 2, 1, 3)


def merge_heads(x):  # [B, H, T, D] -> [B, T, H * D]
    B, H, T, D = x.shape
    return x.transpose(0, 2, 1, 3).reshape(B, T, H * D)


def self_attention(x, p, cfg: Config, positions, window):  # [B, T, C] -> [B, T, C]
    q = split_heads(linear(x, *p["q_proj"]), cfg.num_attention_heads)      # [B, H, T, D]
    k = split_heads(linear(x, *p["k_proj"]), cfg.num_key_value_heads)      # [B, Hkv, T, D]
    v = split_heads(linear(x, *p["v_proj"]), cfg.num_key_value_heads)      # [B, Hkv, T, D]
    q = rope(q, positions, theta=cfg.rope_theta, scaling=cfg.rope_scaling)
    k = rope(k, positions, theta=cfg.rope_theta, scaling=cfg.rope_scaling)
    mask = None
    if window is not None:  # sliding window: query i sees keys j with i - j < window (and j <= i)
        T = len(positions)
        mask = causal_mask(T, T) & (np.arange(T)[:, None] - np.arange(T)[None, :] < window)  # [T, T]
    y = attention(q, k, v, causal=True, mask=mask)                           # [B, H, T, D]
    return linear(merge_heads(y), *p["o_proj"])                              # [B, T, C]


def mlp(x, p, cfg: Config):  # [B, T, C] -> [B, T, C]
    act = ACTIVATIONS[cfg.hidden_act]
    return linear(act(linear(x, *p["gate_proj"])) * linear(x, *p["up_proj"]), *p["down_proj"])


def decoder_layer(x, p, cfg: Config, positions, window):  # [B, T, C] -> [B, T, C]
    x = x + self_attention(rms_norm(x, p["input_layernorm"], cfg.rms_norm_eps), p, cfg, positions, window)
    return x + mlp(rms_norm(x, p["post_attention_layernorm"], cfg.rms_norm_eps), p, cfg)


def hidden_states(params, cfg: Config, ids, *, all_layers=False):  # [B, T] -> [B, T, C], after the final RMSNorm
    """With all_layers: a list of the residual stream after each layer, then the final normed state."""
    ids = np.asarray(ids)
    positions = np.arange(ids.shape[-1])                                     # [T]
    x = params["embed_tokens"][ids]                                          # [B, T, C]
    layers = []
    for p, window in zip(params["layers"], cfg.sliding_windows):
        x = decoder_layer(x, p, cfg, positions, window)
        layers.append(x)
    x = rms_norm(x, params["norm"], cfg.rms_norm_eps)
    return layers + [x] if all_layers else x
