"""SmolLM3 in NumPy: Llama where some layers use no position encoding at all (NoPE).

    layer i turns q and k by RoPE only when no_rope_layers[i] == 1; the others see positions only through the
    causal mask. Without no_rope_layers: every no_rope_layer_interval-th layer (i + 1 divisible by it, default 4)
    is NoPE, as transformers derives it.
The forward pass is llama.py's (a layer whose Rope is None skips it); this file reads the config.
Shape legend: B batch, T tokens, C channels (hidden_size), H heads, Hkv key/value heads, D head dim, V vocabulary.
"""
from __future__ import annotations

from dataclasses import dataclass

from ._common import decoder_fields, global_rope_dict, rope_settings, windows_from_layer_types
from .llama import Config as LlamaConfig
from .llama import PREFIX, hidden_states, load_params, loss_and_grads

__all__ = ["Config", "load_params", "hidden_states", "loss_and_grads", "PREFIX", "rope_layers"]


def rope_layers(d: dict) -> list[bool]:
    """Per layer: does it use RoPE?"""
    n = d["num_hidden_layers"]
    if d.get("no_rope_layers") is not None:
        flags = d["no_rope_layers"]
        if len(flags) < n:
            raise ValueError(f"smollm3: no_rope_layers has {len(flags)} entries for {n} layers")
        return [bool(f) for f in flags[:n]]
    interval = d.get("no_rope_layer_interval", 4)
    if not interval:
        raise ValueError(f"smollm3: no_rope_layers is absent and no_rope_layer_interval is {interval!r}")
    return [(i + 1) % interval != 0 for i in range(n)]


@dataclass
class Config(LlamaConfig):
    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        """Sliding windows: the window is sliding_window when use_sliding_window is true; layer_types says which
        layers use it (without layer_types: the NoPE layers, when there is a window)."""
        fields = decoder_fields(d, architecture="SmolLM3ForCausalLM", tie=True)
        rope = rope_settings(global_rope_dict(d), d, "smollm3", theta=2_000_000.0, head_dim=fields["head_dim"])
        uses_rope = rope_layers(d)
        window = d.get("sliding_window") if d.get("use_sliding_window", False) else None
        types = d.get("layer_types") or ["sliding_attention" if window is not None and not r else "full_attention"
                                         for r in uses_rope]
        bias = d.get("attention_bias", False)
        return cls(**fields, ropes=[rope if r else None for r in uses_rope],
                   sliding_windows=windows_from_layer_types(types, window, "smollm3", len(uses_rope)),
                   qkv_bias=bias, o_bias=bias, mlp_bias=d.get("mlp_bias", False))
