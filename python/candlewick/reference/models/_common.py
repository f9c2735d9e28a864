"""What the reference models share: the config-field rule of architectures.json, the fields of a decoder config,
RoPE settings, activations, weight lookup with shape checks, heads, the sliding-window mask.

Shape legend: B batch, T tokens, C channels (hidden_size), H heads, Hkv key/value heads, D head dim, V vocabulary.
"""
from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..functional import ROPE_TYPES, gelu, gelu_backward, rope, rope_backward, rope_type, silu, silu_backward

ARCHITECTURES_JSON = Path(__file__).resolve().parents[2] / "architectures.json"


# --- the config-field rule (architectures.json, shared with the Rust engine) --------------------------------------

@functools.cache
def declarations() -> dict:
    return json.loads(ARCHITECTURES_JSON.read_text(encoding="utf-8"))


def is_neutral(value, neutral: list) -> bool:
    """A value is neutral when it is in the list; a list value when each of its elements is. JSON's true and
    false are not the numbers 1 and 0 here (Python's == would say they are)."""
    if isinstance(value, list):
        return all(is_neutral(v, neutral) for v in value)
    return any(value is n if isinstance(value, bool) or isinstance(n, bool) else value == n for n in neutral)


def check_fields(raw: dict, model_type: str, file="config.json") -> None:
    """architectures.json's rule: a math-changing field present with a non-neutral value must be one the
    architecture implements, or loading fails naming it. partial_rotary_factor counts inside the rope dicts too
    (transformers 5 moves it there)."""
    decl = declarations()
    implements = set(decl["architectures"].get(model_type, {}).get("implements", []))
    found = [(name, raw[name]) for name in decl["neutral"] if name in raw]
    found += [(f"{where}.partial_rotary_factor", rope["partial_rotary_factor"]) for where, rope in rope_dicts(raw)
              if "partial_rotary_factor" in rope]
    for name, value in found:
        base = name.rsplit(".", 1)[-1]
        if not is_neutral(value, decl["neutral"][base]) and base not in implements:
            raise NotImplementedError(f"{file}: {model_type} does not implement {name}={json.dumps(value)}")


def rope_dicts(raw: dict) -> list[tuple[str, dict]]:
    """Every rope dict of a config: rope_scaling, rope_parameters, or rope_parameters' per-layer-type dicts."""
    out: list[tuple[str, dict]] = []
    for key in ("rope_scaling", "rope_parameters"):
        d = raw.get(key)
        if isinstance(d, dict):
            nested = d and all(isinstance(v, dict) for v in d.values())
            out += [(f"{key}.{k}", v) for k, v in d.items()] if nested else [(key, d)]
    return out


# --- RoPE settings -----------------------------------------------------------------------------------------------

ROPE_KEYS = {"rope_type", "type", "rope_theta", "factor", "low_freq_factor", "high_freq_factor",
             "original_max_position_embeddings", "partial_rotary_factor", "beta_fast", "beta_slow", "mscale",
             "mscale_all_dim", "attention_factor", "truncate"}
ROPE_REQUIRED = {"linear": ("factor",), "llama3": ("factor", "low_freq_factor", "high_freq_factor"),
                 "yarn": ("factor",)}  # yarn's may be null: then max_position_embeddings / the original length


@dataclass
class Rope:
    """One RoPE: its base θ, the scaling dict for functional.rope (None: plain), and how many of a head's D
    dimensions it turns (the first rotary_dim; the rest pass through)."""
    theta: float
    scaling: dict | None
    rotary_dim: int

    def __call__(self, x, positions):  # [B, H, T, D] -> [B, H, T, D]
        r = self.rotary_dim
        turned = rope(x[..., :r], positions, theta=self.theta, scaling=self.scaling)
        return turned if r == x.shape[-1] else np.concatenate([turned, x[..., r:]], axis=-1)

    def backward(self, dy, positions):  # [B, H, T, D] -> [B, H, T, D]: the turned part turned back, the rest as is
        r = self.rotary_dim
        turned = rope_backward(dy[..., :r], positions, theta=self.theta, scaling=self.scaling)
        return turned if r == dy.shape[-1] else np.concatenate([turned, dy[..., r:]], axis=-1)


def rope_settings(d: dict, raw: dict, model_type: str, *, theta: float, head_dim: int,
                  partial_rotary_factor: float = 1.0) -> Rope:
    """One rope dict (rope_parameters, or the older rope_scaling) -> Rope. Unknown keys and rope types are refused
    by name. Like transformers' standardize_rope_params, llama3 and yarn take original_max_position_embeddings
    from the top level of the config when it is there, else from the dict, else max_position_embeddings; a yarn
    factor of null is max_position_embeddings / original_max_position_embeddings."""
    unknown = sorted(set(d) - ROPE_KEYS)
    if unknown:
        raise NotImplementedError(f"{model_type}: unknown rope key {unknown[0]!r} (rope_type {rope_type(d)!r})")
    kind = rope_type(d)
    if kind not in ROPE_TYPES:
        raise NotImplementedError(f"{model_type}: rope_type {kind!r} (the reference knows {', '.join(ROPE_TYPES)})")
    missing = [k for k in ROPE_REQUIRED.get(kind, ()) if k not in d]
    if missing:
        raise ValueError(f"{model_type}: rope_type {kind!r} needs {missing[0]!r}")
    theta = float(theta if d.get("rope_theta") is None else d["rope_theta"])
    scaling = None
    if kind != "default":
        scaling = {k: v for k, v in d.items() if k not in ("rope_theta", "partial_rotary_factor", "type")}
        scaling["rope_type"] = kind
        if kind in ("llama3", "yarn"):
            original = raw.get("original_max_position_embeddings") or d.get("original_max_position_embeddings")
            scaling["original_max_position_embeddings"] = original or raw["max_position_embeddings"]
        if kind == "yarn" and scaling.get("factor") is None:
            scaling["factor"] = raw["max_position_embeddings"] / scaling["original_max_position_embeddings"]
    return Rope(theta, scaling, int(head_dim * partial_rotary_factor))


def global_rope_dict(raw: dict) -> dict:
    """The one rope dict of a config: rope_scaling wins over rope_parameters (as in transformers), and a
    top-level rope_theta fills in when the dict has none."""
    d = dict(raw.get("rope_scaling") or raw.get("rope_parameters") or {})
    if "rope_theta" not in d and raw.get("rope_theta") is not None:
        d["rope_theta"] = raw["rope_theta"]
    return d


def partial_rotary_factor(raw: dict, rope: dict, model_type: str, *, default: float, names=("partial_rotary_factor",)):
    """The fraction of each head that RoPE turns, from the rope dict or the top level (`names`, e.g. GPT-NeoX's
    rotary_pct); two places that disagree are an error rather than a guess."""
    given = {"rope_parameters.partial_rotary_factor": rope.get("partial_rotary_factor")}
    given.update({name: raw.get(name) for name in names})
    values = {k: float(v) for k, v in given.items() if v is not None}
    if len(set(values.values())) > 1:
        raise ValueError(f"{model_type}: the partial rotary factors disagree: "
                         + ", ".join(f"{k}={v}" for k, v in values.items()))
    return next(iter(values.values()), default)


# --- the fields every decoder config has ------------------------------------------------------------------------

@dataclass
class DecoderConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    norm_eps: float
    hidden_act: str
    tie_word_embeddings: bool
    bos_token_id: int | None
    eos_token_id: int | list[int] | None
    architecture: str
    raw: dict = field(default_factory=dict, repr=False)

    @property
    def context_length(self) -> int:
        return self.max_position_embeddings


def decoder_fields(d: dict, *, architecture: str, eps_key="rms_norm_eps", eps=1e-6, act_key="hidden_act",
                   act="silu", tie=False, head_dim=None) -> dict:
    """DecoderConfig's fields from config.json, with the architecture's defaults where a field is absent."""
    heads = d["num_attention_heads"]
    model_type = d["model_type"]
    hidden_act = d.get(act_key) or act
    activation(hidden_act, model_type, act_key)  # refused now, by name, rather than at the first forward pass
    return dict(model_type=model_type, vocab_size=d["vocab_size"], hidden_size=d["hidden_size"],
                intermediate_size=d["intermediate_size"], num_hidden_layers=d["num_hidden_layers"],
                num_attention_heads=heads, num_key_value_heads=d.get("num_key_value_heads") or heads,
                head_dim=d.get("head_dim") or head_dim or d["hidden_size"] // heads,
                max_position_embeddings=d.get("max_position_embeddings", 2048), norm_eps=d.get(eps_key, eps),
                hidden_act=hidden_act, tie_word_embeddings=d.get("tie_word_embeddings", tie),
                bos_token_id=d.get("bos_token_id"), eos_token_id=d.get("eos_token_id"),
                architecture=(d.get("architectures") or [architecture])[0], raw=d)


# --- activations ---------------------------------------------------------------------------------------------------

ACTIVATIONS = {"silu": silu, "swish": silu,
               "gelu": lambda x: gelu(x, approximate="none"),                 # exact, erf
               "gelu_new": gelu, "gelu_pytorch_tanh": gelu, "gelu_fast": gelu}  # the tanh approximation


ACTIVATION_BACKWARDS = {"silu": silu_backward, "swish": silu_backward,
                        "gelu": lambda dy, x: gelu_backward(dy, x, approximate="none"),
                        "gelu_new": gelu_backward, "gelu_pytorch_tanh": gelu_backward, "gelu_fast": gelu_backward}


def activation(name: str, model_type: str, key="hidden_act"):
    if name not in ACTIVATIONS:
        raise NotImplementedError(f"{model_type}: {key} {name!r} (the reference knows {', '.join(ACTIVATIONS)})")
    return ACTIVATIONS[name]


def activation_backward(name: str, model_type: str, key="hidden_act"):  # (dy, x) -> dx for the activation `name`
    activation(name, model_type, key)
    return ACTIVATION_BACKWARDS[name]


# --- sliding windows -----------------------------------------------------------------------------------------------

def windows_from_layer_types(layer_types: list, window, model_type: str, n_layers: int) -> list:
    """Per layer: the window length for "sliding_attention", None for "full_attention"."""
    if len(layer_types) != n_layers:
        raise ValueError(f"{model_type}: {len(layer_types)} layer_types for {n_layers} layers")
    out = []
    for t in layer_types:
        if t not in ("full_attention", "sliding_attention"):
            raise NotImplementedError(f"{model_type}: layer_types entry {t!r}")
        if t == "sliding_attention" and window is None:
            raise ValueError(f"{model_type}: layer_types asks for sliding_attention but there is no sliding window "
                             "(sliding_window is null, or use_sliding_window is false)")
        out.append(window if t == "sliding_attention" else None)
    return out


def sliding_window_mask(T: int, window: int | None):  # -> bool [T, T] (True = may attend), or None
    """Query i sees keys j with i - window < j <= i: itself and the window - 1 tokens before it."""
    if window is None:
        return None
    i, j = np.arange(T)[:, None], np.arange(T)[None, :]
    return (j <= i) & (i - j < window)


# --- weights -------------------------------------------------------------------------------------------------------

class Weights:
    """A checkpoint's tensors by name (an optional prefix such as `model.` removed); `take` checks each shape, so
    a bad checkpoint fails with the weight's name."""

    def __init__(self, w: dict[str, np.ndarray], model_type: str, prefix: str = ""):
        self.w = {k.removeprefix(prefix): v for k, v in w.items()} if prefix else dict(w)
        self.model_type = model_type

    def __contains__(self, name) -> bool:
        return name in self.w

    def take(self, name: str, shape: tuple) -> np.ndarray:
        if name not in self.w:
            raise ValueError(f"{self.model_type}: weight {name!r} is missing from the checkpoint")
        if self.w[name].shape != tuple(shape):
            raise ValueError(f"{self.model_type}: weight {name!r} has shape {self.w[name].shape}, expected {shape}")
        return self.w[name]

    def linear(self, name: str, out_dim: int, in_dim: int, bias: bool):  # (weight [out, in], bias [out] or None)
        return self.take(name + ".weight", (out_dim, in_dim)), self.take(name + ".bias", (out_dim,)) if bias else None

    def lm_head(self, name: str, embed: np.ndarray, tied: bool) -> np.ndarray:  # [V, C]
        """The output matrix: `name` when the checkpoint has it, else the tied embedding."""
        if name in self.w:
            return self.take(name, embed.shape)
        if tied:
            return embed
        raise ValueError(f"{self.model_type}: {name} is missing and tie_word_embeddings is false")


# --- heads ---------------------------------------------------------------------------------------------------------

def split_heads(x, n_head: int):  # [B, T, n_head * D] -> [B, n_head, T, D]
    B, T, _ = x.shape
    return x.reshape(B, T, n_head, -1).transpose(0, 2, 1, 3)


def merge_heads(x):  # [B, H, T, D] -> [B, T, H * D]
    B, H, T, D = x.shape
    return x.transpose(0, 2, 1, 3).reshape(B, T, H * D)


# split_heads and merge_heads only move numbers around, so each one's backward is the other.


def softcap(x, cap):
    """cap · tanh(x / cap): squeezes x smoothly into (-cap, cap) (Gemma's logit soft-capping); None: x."""
    return x if cap is None else cap * np.tanh(np.asarray(x) / cap)

