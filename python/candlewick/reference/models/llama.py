"""Llama in NumPy, with grouped-query attention; Mistral (sliding window) and Qwen2 (q/k/v biases) are variants,
and so are Qwen3 (qwen3.py: q/k norms) and SmolLM3 (smollm3.py: layers without RoPE), which reuse this file.

    x = embed_tokens[ids]
    for each layer:  x = x + attn(rms_norm(x));  x = x + mlp(rms_norm(x))
      attn: q, k = rope(x Wqᵀ), rope(x Wkᵀ);  v = x Wvᵀ;  softmax(q kᵀ/√D + causal) v Woᵀ
            (k and v have Hkv <= H heads, each serving H / Hkv query heads)
      mlp:  down(silu(gate(x)) * up(x))
    logits = rms_norm(x) Wᵀ          (W = lm_head, or embed_tokens when tied)
Training (`loss_and_grads`): the same forward, keeping the activations each backward step needs, then the steps
in reverse, each through its function's backward in reference.functional.
Shape legend: B batch, T tokens, C channels (hidden_size), H heads, Hkv key/value heads, D head dim, V vocabulary.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..functional import (attention, attention_backward, cross_entropy, cross_entropy_backward, embedding,
                          embedding_backward, linear, linear_backward, rms_norm, rms_norm_backward)
from ._common import (DecoderConfig, Rope, Weights, activation, activation_backward, decoder_fields,
                      global_rope_dict, merge_heads, rope_settings, sliding_window_mask, split_heads,
                      windows_from_layer_types)

PREFIX = "model."  # of every tensor name but lm_head.weight, in transformers' files


@dataclass
class Config(DecoderConfig):
    ropes: list = field(default_factory=list)            # per layer: a Rope, or None for a layer without RoPE
    sliding_windows: list = field(default_factory=list)  # per layer: window length, or None for full attention
    qkv_bias: bool = False             # Qwen2; Llama's attention_bias adds o_proj's bias too
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False              # Qwen3: RMSNorm on each head's q and k before RoPE

    @property
    def rope_theta(self) -> float | None:  # of the layers with RoPE (all share one)
        return next((r.theta for r in self.ropes if r is not None), None)

    @property
    def rope_scaling(self) -> dict | None:  # {"rope_type": "linear" | "llama3" | "yarn", ...}; None = plain RoPE
        return next((r.scaling for r in self.ropes if r is not None), None)

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        """Both config styles: transformers 5 nests rope_theta / rope_type in `rope_parameters`, older files keep
        `rope_theta` and `rope_scaling` at the top level."""
        fields = decoder_fields(d, architecture="LlamaForCausalLM")
        rope = rope_settings(global_rope_dict(d), d, fields["model_type"], theta=10000.0, head_dim=fields["head_dim"])
        attention_bias = d.get("attention_bias", False)
        return cls(**fields, ropes=[rope] * fields["num_hidden_layers"], sliding_windows=sliding_windows(d),
                   qkv_bias=d["model_type"] == "qwen2" or attention_bias, o_bias=attention_bias,
                   mlp_bias=d.get("mlp_bias", False))


def sliding_windows(d: dict) -> list:
    """Which layers attend through a window, as transformers decides it:
    llama: none (a sliding_window is refused by check_fields);
    mistral: every layer when sliding_window (default 4096) is not null; layer_types is ignored, as there;
    qwen2, qwen3: the window is sliding_window (default 4096) only when use_sliding_window is true, for the layers
      whose layer_types entry is "sliding_attention"; without layer_types, layers i >= max_window_layers (default
      28) slide when there is a window."""
    n, model_type = d["num_hidden_layers"], d["model_type"]
    if model_type == "mistral":
        return [d.get("sliding_window", 4096)] * n
    if model_type in ("qwen2", "qwen3"):
        window = d.get("sliding_window", 4096) if d.get("use_sliding_window", False) else None
        first = d.get("max_window_layers", 28)
        types = d.get("layer_types") or ["sliding_attention" if window is not None and i >= first
                                         else "full_attention" for i in range(n)]
        return windows_from_layer_types(types, window, model_type, n)
    return [None] * n


def load_params(tensors: dict[str, np.ndarray], cfg: Config) -> dict:
    """Checkpoint names -> a nested dict, checking every shape. The `model.` prefix is optional; projections
    stay [out, in] as nn.Linear stores them. A missing lm_head.weight means a tied head."""
    w = Weights(tensors, cfg.model_type, prefix=PREFIX)
    C, F, D = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    qd, kvd = cfg.num_attention_heads * D, cfg.num_key_value_heads * D

    def layer(i):
        a, m = f"layers.{i}.self_attn.", f"layers.{i}.mlp."
        p = {"input_layernorm": w.take(f"layers.{i}.input_layernorm.weight", (C,)),
             "q_proj": w.linear(a + "q_proj", qd, C, cfg.qkv_bias),
             "k_proj": w.linear(a + "k_proj", kvd, C, cfg.qkv_bias),
             "v_proj": w.linear(a + "v_proj", kvd, C, cfg.qkv_bias),
             "o_proj": w.linear(a + "o_proj", C, qd, cfg.o_bias),
             "post_attention_layernorm": w.take(f"layers.{i}.post_attention_layernorm.weight", (C,)),
             "gate_proj": w.linear(m + "gate_proj", F, C, cfg.mlp_bias),
             "up_proj": w.linear(m + "up_proj", F, C, cfg.mlp_bias),
             "down_proj": w.linear(m + "down_proj", C, F, cfg.mlp_bias)}
        if cfg.qk_norm:  # one weight per head dimension, shared by all heads
            p["q_norm"], p["k_norm"] = w.take(a + "q_norm.weight", (D,)), w.take(a + "k_norm.weight", (D,))
        return p

    embed = w.take("embed_tokens.weight", (cfg.vocab_size, C))
    return {"embed_tokens": embed, "layers": [layer(i) for i in range(cfg.num_hidden_layers)],
            "norm": w.take("norm.weight", (C,)), "lm_head": w.lm_head("lm_head.weight", embed, cfg.tie_word_embeddings)}


def self_attention(x, p, cfg: Config, positions, layer: int):  # [B, T, C] -> [B, T, C]
    q = split_heads(linear(x, *p["q_proj"]), cfg.num_attention_heads)      # [B, H, T, D]
    k = split_heads(linear(x, *p["k_proj"]), cfg.num_key_value_heads)      # [B, Hkv, T, D]
    v = split_heads(linear(x, *p["v_proj"]), cfg.num_key_value_heads)      # [B, Hkv, T, D]
    if cfg.qk_norm:                                                          # Qwen3: each head's vector, over D
        q, k = rms_norm(q, p["q_norm"], cfg.norm_eps), rms_norm(k, p["k_norm"], cfg.norm_eps)
    rope: Rope | None = cfg.ropes[layer]
    if rope is not None:                                                     # SmolLM3's NoPE layers skip it
        q, k = rope(q, positions), rope(k, positions)
    mask = sliding_window_mask(len(positions), cfg.sliding_windows[layer])  # [T, T] or None (causal only)
    y = attention(q, k, v, causal=True, mask=mask)                           # [B, H, T, D]
    return linear(merge_heads(y), *p["o_proj"])                              # [B, T, C]


def mlp(x, p, cfg: Config):  # [B, T, C] -> [B, T, C]
    act = activation(cfg.hidden_act, cfg.model_type)
    return linear(act(linear(x, *p["gate_proj"])) * linear(x, *p["up_proj"]), *p["down_proj"])


def decoder_layer(x, p, cfg: Config, positions, layer: int):  # [B, T, C] -> [B, T, C]
    x = x + self_attention(rms_norm(x, p["input_layernorm"], cfg.norm_eps), p, cfg, positions, layer)
    return x + mlp(rms_norm(x, p["post_attention_layernorm"], cfg.norm_eps), p, cfg)


def hidden_states(params, cfg: Config, ids, *, all_layers=False):  # [B, T] -> [B, T, C], after the final RMSNorm
    """With all_layers: a list of the residual stream after each layer, then the final normed state."""
    ids = np.asarray(ids)
    positions = np.arange(ids.shape[-1])                                     # [T]
    x = params["embed_tokens"][ids]                                          # [B, T, C]
    layers = []
    for i, p in enumerate(params["layers"]):
        x = decoder_layer(x, p, cfg, positions, i)
        layers.append(x)
    x = rms_norm(x, params["norm"], cfg.norm_eps)
    return layers + [x] if all_layers else x


# --- training ------------------------------------------------------------------------------------------------------

def layer_forward(x, p, cfg: Config, positions, layer: int):  # [B, T, C] -> ([B, T, C], activations)
    """decoder_layer(), written out step by step, keeping what layer_backward reads."""
    eps, act = cfg.norm_eps, activation(cfg.hidden_act, cfg.model_type)
    h = rms_norm(x, p["input_layernorm"], eps)                               # [B, T, C]
    q = split_heads(linear(h, *p["q_proj"]), cfg.num_attention_heads)      # [B, H, T, D]
    k = split_heads(linear(h, *p["k_proj"]), cfg.num_key_value_heads)      # [B, Hkv, T, D]
    v = split_heads(linear(h, *p["v_proj"]), cfg.num_key_value_heads)      # [B, Hkv, T, D]
    c = dict(x=x, h=h, q_raw=q, k_raw=k)
    if cfg.qk_norm:
        q, k = rms_norm(q, p["q_norm"], eps), rms_norm(k, p["k_norm"], eps)
    rope: Rope | None = cfg.ropes[layer]
    if rope is not None:
        q, k = rope(q, positions), rope(k, positions)
    mask = sliding_window_mask(len(positions), cfg.sliding_windows[layer])
    a = merge_heads(attention(q, k, v, causal=True, mask=mask))              # [B, T, H * D]
    x1 = x + linear(a, *p["o_proj"])                                         # [B, T, C]
    h2 = rms_norm(x1, p["post_attention_layernorm"], eps)                    # [B, T, C]
    gate, up = linear(h2, *p["gate_proj"]), linear(h2, *p["up_proj"])        # [B, T, F]
    m = act(gate) * up                                                       # [B, T, F]
    x2 = x1 + linear(m, *p["down_proj"])                                     # [B, T, C]
    c.update(q=q, k=k, v=v, mask=mask, a=a, x1=x1, h2=h2, gate=gate, up=up, m=m)
    return x2, c


def _linear_grads(grads: dict, name: str, dy, x, weight_and_bias) -> np.ndarray:
    """linear_backward for the projection `name`: its weight's (and bias') gradient into grads, dx returned."""
    dx, grads[name + ".weight"], db = linear_backward(dy, x, *weight_and_bias)
    if db is not None:
        grads[name + ".bias"] = db
    return dx


def layer_backward(dx2, c: dict, p, cfg: Config, positions, layer: int, grads: dict):  # [B, T, C] -> [B, T, C]
    """The steps of layer_forward in reverse; a residual x + F(x) passes dy on unchanged and adds F's gradient.
    The gated MLP m = act(gate) · up sends dm · up back through act and dm · act(gate) to up."""
    eps, n = cfg.norm_eps, f"layers.{layer}."
    a_, m_ = n + "self_attn.", n + "mlp."
    dm = _linear_grads(grads, m_ + "down_proj", dx2, c["m"], p["down_proj"])            # [B, T, F]
    act, act_backward = activation(cfg.hidden_act, cfg.model_type), activation_backward(cfg.hidden_act,
                                                                                       cfg.model_type)
    dgate = act_backward(dm * c["up"], c["gate"])
    dup = dm * act(c["gate"])
    dh2 = (_linear_grads(grads, m_ + "gate_proj", dgate, c["h2"], p["gate_proj"])
           + _linear_grads(grads, m_ + "up_proj", dup, c["h2"], p["up_proj"]))
    dnorm2, grads[n + "post_attention_layernorm.weight"] = rms_norm_backward(dh2, c["x1"],
                                                                           p["post_attention_layernorm"], eps)
    dx1 = dx2 + dnorm2
    da = _linear_grads(grads, a_ + "o_proj", dx1, c["a"], p["o_proj"])                 # [B, T, H * D]
    dq, dk, dv = attention_backward(split_heads(da, cfg.num_attention_heads), c["q"], c["k"], c["v"],
                                    causal=True, mask=c["mask"])
    rope: Rope | None = cfg.ropes[layer]
    if rope is not None:
        dq, dk = rope.backward(dq, positions), rope.backward(dk, positions)
    if cfg.qk_norm:
        dq, grads[a_ + "q_norm.weight"] = rms_norm_backward(dq, c["q_raw"], p["q_norm"], eps)
        dk, grads[a_ + "k_norm.weight"] = rms_norm_backward(dk, c["k_raw"], p["k_norm"], eps)
    dh = (_linear_grads(grads, a_ + "q_proj", merge_heads(dq), c["h"], p["q_proj"])
          + _linear_grads(grads, a_ + "k_proj", merge_heads(dk), c["h"], p["k_proj"])
          + _linear_grads(grads, a_ + "v_proj", merge_heads(dv), c["h"], p["v_proj"]))
    dnorm1, grads[n + "input_layernorm.weight"] = rms_norm_backward(dh, c["x"], p["input_layernorm"], eps)
    return dx1 + dnorm1


def loss_and_grads(params, cfg: Config, ids, targets):  # [B, T], [B, T] -> (float, {name: gradient})
    """L = mean over the B·T positions of -log softmax(logits)[target], and ∂L/∂ every parameter, keyed by the
    checkpoint's names without the `model.` prefix. A tied head's gradient is added to embed_tokens'."""
    ids, grads = np.asarray(ids), {}
    positions = np.arange(ids.shape[-1])                                     # [T]
    x = embedding(ids, params["embed_tokens"])                               # [B, T, C]
    caches = []
    for i, p in enumerate(params["layers"]):
        x, cache = layer_forward(x, p, cfg, positions, i)
        caches.append(cache)
    hf = rms_norm(x, params["norm"], cfg.norm_eps)                           # [B, T, C]
    logits = linear(hf, params["lm_head"])                                   # [B, T, V]
    loss = cross_entropy(logits, targets)

    dlogits = cross_entropy_backward(1.0, logits, targets)                   # [B, T, V]
    dhf, dhead, _ = linear_backward(dlogits, hf, params["lm_head"])
    dx, grads["norm.weight"] = rms_norm_backward(dhf, x, params["norm"], cfg.norm_eps)
    for i in reversed(range(len(params["layers"]))):
        dx = layer_backward(dx, caches[i], params["layers"][i], cfg, positions, i, grads)
    grads["embed_tokens.weight"] = embedding_backward(dx, ids, params["embed_tokens"])
    if params["lm_head"] is params["embed_tokens"]:
        grads["embed_tokens.weight"] += dhead
    else:
        grads["lm_head.weight"] = dhead
    return loss, grads
