"""Phi-3 in NumPy: Llama with fused projections and RoPE on part of each head.

    q | k | v = x W_qkvᵀ              (qkv_proj: rows [0, H·D) are q, then Hkv·D of k, then Hkv·D of v)
    q, k = rope on the first rotary_dim = int(D · partial_rotary_factor) dimensions of each head; the rest as is
    gate | up = x W_gate_upᵀ          (gate_up_proj: the first F rows are the gate, the next F the up projection)
    mlp = down(silu(gate) * up)
A sliding window, when sliding_window is set, applies to every layer.
Shape legend: B batch, T tokens, C channels (hidden_size), H heads, Hkv key/value heads, D head dim, F MLP width.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..functional import attention, linear, rms_norm
from ._common import (DecoderConfig, Rope, Weights, activation, decoder_fields, global_rope_dict, merge_heads,
                      partial_rotary_factor, rope_settings, sliding_window_mask, split_heads)


@dataclass
class Config(DecoderConfig):
    rope: Rope = None  # type: ignore[assignment]  # from_dict always sets it
    sliding_window: int | None = None

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        fields = decoder_fields(d, architecture="Phi3ForCausalLM", eps=1e-5)
        rope_dict = global_rope_dict(d)
        factor = partial_rotary_factor(d, rope_dict, "phi3", default=1.0)
        rope = rope_settings(rope_dict, d, "phi3", theta=10000.0, head_dim=fields["head_dim"],
                             partial_rotary_factor=factor)
        return cls(**fields, rope=rope, sliding_window=d.get("sliding_window"))


def load_params(tensors: dict[str, np.ndarray], cfg: Config) -> dict:
    """Checkpoint names -> a nested dict, checking every shape; the fused matrices stay fused."""
    w = Weights(tensors, "phi3", prefix="model.")
    C, F, D = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    qd, kvd = cfg.num_attention_heads * D, cfg.num_key_value_heads * D

    def layer(i):
        a, m = f"layers.{i}.self_attn.", f"layers.{i}.mlp."
        return {"input_layernorm": w.take(f"layers.{i}.input_layernorm.weight", (C,)),
                "qkv_proj": w.linear(a + "qkv_proj", qd + 2 * kvd, C, False),
                "o_proj": w.linear(a + "o_proj", C, qd, False),
                "post_attention_layernorm": w.take(f"layers.{i}.post_attention_layernorm.weight", (C,)),
                "gate_up_proj": w.linear(m + "gate_up_proj", 2 * F, C, False),
                "down_proj": w.linear(m + "down_proj", C, F, False)}

    embed = w.take("embed_tokens.weight", (cfg.vocab_size, C))
    return {"embed_tokens": embed, "layers": [layer(i) for i in range(cfg.num_hidden_layers)],
            "norm": w.take("norm.weight", (C,)), "lm_head": w.lm_head("lm_head.weight", embed, cfg.tie_word_embeddings)}


def self_attention(x, p, cfg: Config, positions):  # [B, T, C] -> [B, T, C]
    qd, kvd = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    q, k, v = np.split(linear(x, *p["qkv_proj"]), [qd, qd + kvd], axis=-1)  # [B, T, H·D], 2 x [B, T, Hkv·D]
    q, k = split_heads(q, cfg.num_attention_heads), split_heads(k, cfg.num_key_value_heads)  # [B, H|Hkv, T, D]
    v = split_heads(v, cfg.num_key_value_heads)                              # [B, Hkv, T, D]
    q, k = cfg.rope(q, positions), cfg.rope(k, positions)                    # the first rotary_dim dims turn
    y = attention(q, k, v, causal=True, mask=sliding_window_mask(len(positions), cfg.sliding_window))
    return linear(merge_heads(y), *p["o_proj"])                              # [B, T, C]


def mlp(x, p, cfg: Config):  # [B, T, C] -> [B, T, C]
    gate, up = np.split(linear(x, *p["gate_up_proj"]), 2, axis=-1)          # 2 x [B, T, F]
    return linear(activation(cfg.hidden_act, "phi3")(gate) * up, *p["down_proj"])


def decoder_layer(x, p, cfg: Config, positions):  # [B, T, C] -> [B, T, C]
    x = x + self_attention(rms_norm(x, p["input_layernorm"], cfg.norm_eps), p, cfg, positions)
    return x + mlp(rms_norm(x, p["post_attention_layernorm"], cfg.norm_eps), p, cfg)


def hidden_states(params, cfg: Config, ids, *, all_layers=False):  # [B, T] -> [B, T, C], after the final RMSNorm
    ids = np.asarray(ids)
    positions = np.arange(ids.shape[-1])                                     # [T]
    x = params["embed_tokens"][ids]                                          # [B, T, C]
    layers = []
    for p in params["layers"]:
        x = decoder_layer(x, p, cfg, positions)
        layers.append(x)
    x = rms_norm(x, params["norm"], cfg.norm_eps)
    return layers + [x] if all_layers else x
