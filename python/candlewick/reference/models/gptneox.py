"""GPT-NeoX (Pythia) in NumPy: LayerNorm with bias, one fused projection interleaved per head, partial RoPE,
and attention and MLP side by side.

    x = embed_in[ids]
    for each layer:
      parallel (use_parallel_residual, the default):  x = x + attn(ln_1(x)) + mlp(ln_2(x))
      sequential:                                      x = x + attn(ln_1(x));  x = x + mlp(ln_2(x))
      attn: [q_h | k_h | v_h] for each head h = x W_qkvᵀ + b  (query_key_value's rows: head 0's q, k, v, head 1's ...)
            q, k = rope on the first rotary_dim = int(D · partial_rotary_factor) dimensions; softmax(q kᵀ/√D) v
      mlp:  dense_4h_to_h(gelu(dense_h_to_4h(x)))           (exact GELU for hidden_act "gelu")
    logits = final_layer_norm(x) embed_outᵀ
Shape legend: B batch, T tokens, C channels (hidden_size), H heads, D head dim (C / H), F MLP width, V vocabulary.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..functional import attention, layer_norm, linear
from ._common import (DecoderConfig, Rope, Weights, activation, decoder_fields, merge_heads, partial_rotary_factor,
                      rope_settings)


@dataclass
class Config(DecoderConfig):
    rope: Rope = None  # type: ignore[assignment]  # from_dict always sets it
    use_parallel_residual: bool = True
    attention_bias: bool = True

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        """As GPTNeoXConfig: the rotary fraction from rope_parameters, partial_rotary_factor or the older rotary_pct
        (default 0.25); the base from rope_parameters, or the older rotary_emb_base (default 10000)."""
        fields = decoder_fields(d, architecture="GPTNeoXForCausalLM", eps_key="layer_norm_eps", eps=1e-5, act="gelu")
        fields["head_dim"] = d["hidden_size"] // d["num_attention_heads"]  # fixed: the fused layout needs it
        fields["num_key_value_heads"] = d["num_attention_heads"]
        rope_dict = dict(d.get("rope_scaling") or d.get("rope_parameters") or {})  # a top-level rope_theta is not read
        factor = partial_rotary_factor(d, rope_dict, "gpt_neox", default=0.25,
                                       names=("partial_rotary_factor", "rotary_pct"))
        theta = d.get("rotary_emb_base") or 10000.0
        rope = rope_settings(rope_dict, d, "gpt_neox", theta=theta, head_dim=fields["head_dim"],
                             partial_rotary_factor=factor)
        return cls(**fields, rope=rope, use_parallel_residual=bool(d.get("use_parallel_residual", True)),
                   attention_bias=d.get("attention_bias", True))


def load_params(tensors: dict[str, np.ndarray], cfg: Config) -> dict:
    """Checkpoint names -> a nested dict, checking every shape. Everything but embed_out sits under `gpt_neox.`
    (optional here); buffers old checkpoints carry (attention.bias, masked_bias, rotary_emb.inv_freq) are not
    used."""
    w = Weights(tensors, "gpt_neox", prefix="gpt_neox.")
    C, F, bias = cfg.hidden_size, cfg.intermediate_size, cfg.attention_bias

    def ln(name):
        return {"weight": w.take(name + ".weight", (C,)), "bias": w.take(name + ".bias", (C,))}

    def layer(i):
        n = f"layers.{i}."
        return {"input_layernorm": ln(n + "input_layernorm"),
                "query_key_value": w.linear(n + "attention.query_key_value", 3 * C, C, bias),
                "dense": w.linear(n + "attention.dense", C, C, bias),
                "post_attention_layernorm": ln(n + "post_attention_layernorm"),
                "dense_h_to_4h": w.linear(n + "mlp.dense_h_to_4h", F, C, True),
                "dense_4h_to_h": w.linear(n + "mlp.dense_4h_to_h", C, F, True)}

    embed = w.take("embed_in.weight", (cfg.vocab_size, C))
    return {"embed_in": embed, "layers": [layer(i) for i in range(cfg.num_hidden_layers)],
            "final_layer_norm": ln("final_layer_norm"),
            "lm_head": w.lm_head("embed_out.weight", embed, cfg.tie_word_embeddings)}


def self_attention(x, p, cfg: Config, positions):  # [B, T, C] -> [B, T, C]
    B, T, _ = x.shape
    H, D = cfg.num_attention_heads, cfg.head_dim
    qkv = linear(x, *p["query_key_value"]).reshape(B, T, H, 3 * D).transpose(0, 2, 1, 3)  # [B, H, T, 3D]
    q, k, v = np.split(qkv, 3, axis=-1)                                      # 3 x [B, H, T, D]
    q, k = cfg.rope(q, positions), cfg.rope(k, positions)                    # the first rotary_dim dims turn
    y = attention(q, k, v, causal=True)                                      # [B, H, T, D]
    return linear(merge_heads(y), *p["dense"])                               # [B, T, C]


def mlp(x, p, cfg: Config):  # [B, T, C] -> [B, T, C]
    return linear(activation(cfg.hidden_act, "gpt_neox")(linear(x, *p["dense_h_to_4h"])), *p["dense_4h_to_h"])


def decoder_layer(x, p, cfg: Config, positions):  # [B, T, C] -> [B, T, C]
    eps = cfg.norm_eps
    attn = self_attention(layer_norm(x, **p["input_layernorm"], eps=eps), p, cfg, positions)
    if cfg.use_parallel_residual:                      # both branches read the same x
        return x + attn + mlp(layer_norm(x, **p["post_attention_layernorm"], eps=eps), p, cfg)
    x = x + attn
    return x + mlp(layer_norm(x, **p["post_attention_layernorm"], eps=eps), p, cfg)


def hidden_states(params, cfg: Config, ids, *, all_layers=False):  # [B, T] -> [B, T, C], after final_layer_norm
    ids = np.asarray(ids)
    positions = np.arange(ids.shape[-1])                                     # [T]
    x = params["embed_in"][ids]                                              # [B, T, C]
    layers = []
    for p in params["layers"]:
        x = decoder_layer(x, p, cfg, positions)
        layers.append(x)
    x = layer_norm(x, **params["final_layer_norm"], eps=cfg.norm_eps)
    return layers + [x] if all_layers else x
