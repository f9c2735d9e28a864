"""Gemma 3 (the text model, model_type gemma3_text) in NumPy: sandwich norms, q/k norms, local and global layers.

    x = embed_tokens[ids] · √C
    for each layer:
      x = x + post_attention_norm(attn(input_norm(x)))
      x = x + post_feedforward_norm(mlp(pre_feedforward_norm(x)))
      attn: q, k = rope(norm(q)), rope(norm(k)) per head;  softmax(softcap(q kᵀ · s) + mask) v,
            s = query_pre_attn_scalar^-½; local ("sliding_attention") layers see a window and use their own
            RoPE base, global ("full_attention") layers see everything
      mlp:  down(gelu_tanh(gate(x)) * up(x))
    logits = softcap(norm(x) Wᵀ, final_logit_softcapping)        (W tied to embed_tokens)
Every norm is Gemma's RMSNorm, x / √(mean(x²) + eps) · (1 + w); softcap(x, c) = c · tanh(x / c), skipped when c is
null.
Shape legend: B batch, T tokens, C channels (hidden_size), H heads, Hkv key/value heads, D head dim, V vocabulary.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from ..functional import causal_mask, linear, repeat_kv, rms_norm, softmax
from ._common import (DecoderConfig, Weights, activation, decoder_fields, merge_heads, rope_settings, softcap,
                      sliding_window_mask, split_heads, windows_from_layer_types)

LAYER_TYPES = ("full_attention", "sliding_attention")


@dataclass
class Config(DecoderConfig):
    layer_types: list = field(default_factory=list)      # per layer: "sliding_attention" or "full_attention"
    sliding_windows: list = field(default_factory=list)  # per layer: window length, or None
    ropes: list = field(default_factory=list)            # per layer: the Rope of its layer type
    query_pre_attn_scalar: float = 256.0
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        """As Gemma3TextConfig: without layer_types, every sliding_window_pattern-th layer (default 6) is global
        (the saved `_sliding_window_pattern` is not read back, there either); RoPE per layer type from
        rope_parameters {"full_attention": {...}, "sliding_attention": {...}}, or from the older rope_theta
        (global, default 1e6), rope_local_base_freq (local, default 1e4) and rope_scaling (global layers only)."""
        fields = decoder_fields(d, architecture="Gemma3ForCausalLM", act_key="hidden_activation",
                                act="gelu_pytorch_tanh", tie=True, head_dim=256)
        n = fields["num_hidden_layers"]
        pattern = d.get("sliding_window_pattern") or 6
        types = d.get("layer_types") or ["sliding_attention" if (i + 1) % pattern else "full_attention"
                                         for i in range(n)]
        ropes = {t: rope_settings(r, d, "gemma3_text", theta=r["rope_theta"], head_dim=fields["head_dim"])
                 for t, r in rope_dicts(d).items()}
        if d.get("query_pre_attn_scalar", 256) is None:
            raise ValueError("gemma3_text: query_pre_attn_scalar is null")
        return cls(**fields, layer_types=types,
                   sliding_windows=windows_from_layer_types(types, d.get("sliding_window", 4096), "gemma3_text", n),
                   ropes=[ropes[t] for t in types], query_pre_attn_scalar=float(d.get("query_pre_attn_scalar", 256)),
                   attn_logit_softcapping=d.get("attn_logit_softcapping"),
                   final_logit_softcapping=d.get("final_logit_softcapping"))


def rope_dicts(d: dict) -> dict[str, dict]:
    """{layer type: rope dict}, as Gemma3TextConfig.convert_rope_params_to_dict builds it."""
    given = d.get("rope_parameters")
    if given and not set(given) <= set(LAYER_TYPES):
        raise ValueError("gemma3_text: rope_parameters must be keyed by layer type (full_attention, sliding_attention)")
    out = {t: dict((given or {}).get(t) or {"rope_type": "default"}) for t in LAYER_TYPES}
    out["full_attention"].update(d.get("rope_scaling") or {})
    out["full_attention"].setdefault("rope_theta", d.get("rope_theta") or 1_000_000.0)
    out["sliding_attention"].setdefault("rope_theta", d.get("rope_local_base_freq") or 10_000.0)
    return out


def load_params(tensors: dict[str, np.ndarray], cfg: Config) -> dict:
    """Checkpoint names -> a nested dict, checking every shape. The `model.` prefix is optional; norms hold w of
    (1 + w). A missing lm_head.weight means the head is the embedding (Gemma ties them)."""
    w = Weights(tensors, "gemma3_text", prefix="model.")
    C, F, D = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    qd, kvd, bias = cfg.num_attention_heads * D, cfg.num_key_value_heads * D, cfg.raw.get("attention_bias", False)

    def layer(i):
        a, m, n = f"layers.{i}.self_attn.", f"layers.{i}.mlp.", f"layers.{i}."
        return {"input_layernorm": w.take(n + "input_layernorm.weight", (C,)),
                "q_proj": w.linear(a + "q_proj", qd, C, bias), "k_proj": w.linear(a + "k_proj", kvd, C, bias),
                "v_proj": w.linear(a + "v_proj", kvd, C, bias), "o_proj": w.linear(a + "o_proj", C, qd, bias),
                "q_norm": w.take(a + "q_norm.weight", (D,)), "k_norm": w.take(a + "k_norm.weight", (D,)),
                "post_attention_layernorm": w.take(n + "post_attention_layernorm.weight", (C,)),
                "pre_feedforward_layernorm": w.take(n + "pre_feedforward_layernorm.weight", (C,)),
                "post_feedforward_layernorm": w.take(n + "post_feedforward_layernorm.weight", (C,)),
                "gate_proj": w.linear(m + "gate_proj", F, C, False), "up_proj": w.linear(m + "up_proj", F, C, False),
                "down_proj": w.linear(m + "down_proj", C, F, False)}

    embed = w.take("embed_tokens.weight", (cfg.vocab_size, C))
    return {"embed_tokens": embed, "layers": [layer(i) for i in range(cfg.num_hidden_layers)],
            "norm": w.take("norm.weight", (C,)), "lm_head": w.lm_head("lm_head.weight", embed, cfg.tie_word_embeddings)}


def norm(x, w, cfg: Config):  # Gemma's RMSNorm: the weight is stored as an offset from 1
    return rms_norm(x, 1.0 + w, cfg.norm_eps)


def self_attention(x, p, cfg: Config, positions, layer: int):  # [B, T, C] -> [B, T, C]
    H, Hkv, T = cfg.num_attention_heads, cfg.num_key_value_heads, len(positions)
    q = norm(split_heads(linear(x, *p["q_proj"]), H), p["q_norm"], cfg)      # [B, H, T, D], normed over D
    k = norm(split_heads(linear(x, *p["k_proj"]), Hkv), p["k_norm"], cfg)    # [B, Hkv, T, D]
    v = split_heads(linear(x, *p["v_proj"]), Hkv)                            # [B, Hkv, T, D]
    rope = cfg.ropes[layer]                                                  # local or global base
    q, k = rope(q, positions), rope(k, positions)
    k, v = repeat_kv(k, H // Hkv), repeat_kv(v, H // Hkv)                   # [B, H, T, D]
    scores = (q @ np.swapaxes(k, -1, -2)) * cfg.query_pre_attn_scalar ** -0.5  # [B, H, T, T]
    scores = softcap(scores, cfg.attn_logit_softcapping)                     # before the mask, as transformers
    window = cfg.sliding_windows[layer]
    keep = causal_mask(T, T) if window is None else sliding_window_mask(T, window)  # [T, T]
    y = softmax(np.where(keep, scores, -np.inf), axis=-1) @ v                # [B, H, T, D]
    return linear(merge_heads(y), *p["o_proj"])                              # [B, T, C]


def mlp(x, p, cfg: Config):  # [B, T, C] -> [B, T, C]
    act = activation(cfg.hidden_act, "gemma3_text", "hidden_activation")
    return linear(act(linear(x, *p["gate_proj"])) * linear(x, *p["up_proj"]), *p["down_proj"])


def decoder_layer(x, p, cfg: Config, positions, layer: int):  # [B, T, C] -> [B, T, C]
    h = self_attention(norm(x, p["input_layernorm"], cfg), p, cfg, positions, layer)
    x = x + norm(h, p["post_attention_layernorm"], cfg)
    h = mlp(norm(x, p["pre_feedforward_layernorm"], cfg), p, cfg)
    return x + norm(h, p["post_feedforward_layernorm"], cfg)


def hidden_states(params, cfg: Config, ids, *, all_layers=False):  # [B, T] -> [B, T, C], after the final norm
    ids = np.asarray(ids)
    positions = np.arange(ids.shape[-1])                                     # [T]
    x = params["embed_tokens"][ids] * math.sqrt(cfg.hidden_size)            # [B, T, C]; float64, not rounded
    layers = []
    for i, p in enumerate(params["layers"]):
        x = decoder_layer(x, p, cfg, positions, i)
        layers.append(x)
    x = norm(x, params["norm"], cfg)
    return layers + [x] if all_layers else x


def final_logits(params, cfg: Config, hidden):  # [..., C] -> [..., V]
    return softcap(hidden @ params["lm_head"].T, cfg.final_logit_softcapping)
