"""Qwen3 in NumPy: Llama with an RMSNorm on each head's q and k before RoPE, and no q/k/v biases.

    q = rope(rms_norm_D(split_heads(x Wqᵀ)) · w_q)     k likewise with w_k     (w_q, w_k [D], shared by all heads)
The forward pass is llama.py's (its self_attention applies the norms when cfg.qk_norm); this file reads the config.
Sliding windows as Qwen2: only with use_sliding_window, on the layers layer_types (or max_window_layers) marks.
Shape legend: B batch, T tokens, C channels (hidden_size), H heads, Hkv key/value heads, D head dim, V vocabulary.
"""
from __future__ import annotations

from dataclasses import dataclass

from ._common import decoder_fields, global_rope_dict, rope_settings
from .llama import Config as LlamaConfig
from .llama import PREFIX, hidden_states, load_params, loss_and_grads, sliding_windows

__all__ = ["Config", "load_params", "hidden_states", "loss_and_grads", "PREFIX"]


@dataclass
class Config(LlamaConfig):
    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        fields = decoder_fields(d, architecture="Qwen3ForCausalLM", head_dim=128)  # Qwen3Config's head_dim: 128
        rope = rope_settings(global_rope_dict(d), d, "qwen3", theta=10000.0, head_dim=fields["head_dim"])
        bias = d.get("attention_bias", False)                                     # on q, k, v and o alike
        return cls(**fields, ropes=[rope] * fields["num_hidden_layers"], sliding_windows=sliding_windows(d),
                   qkv_bias=bias, o_bias=bias, qk_norm=True)
