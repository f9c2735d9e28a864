"""The engine's kernels (Rust, Candle) on NumPy arrays: the same functions as `candlewick.reference.functional`.

Every name here is also a name in candlewick.reference.functional, with the same parameters and the same meaning
(docs/ops.md has the table; tests/test_ops_names.py checks it); where the Rust function of that name differs
(crate::ops::causal_mask is additive, crate::ops::gelu takes a bool, crate::ops::rope takes cos/sin tables),
this module adapts.

The engine computes in float32: every input is cast to float32 (integer ids to int64) and every result is a
float32 array, or a Python float for a reduced loss. Runs on the CPU; the GIL is released while it computes.
Bad shapes or values raise `candlewick.InvalidArgument` naming the argument.
Shape legend: B batch, T tokens (Tq queries, Tk keys), C channels, H heads, Hkv key/value heads, D head dim,
V vocabulary, N rows.
"""
from __future__ import annotations

import operator
from typing import Any, Literal, Mapping

import numpy as np
from numpy.typing import ArrayLike, NDArray

from . import _native
from .errors import InvalidArgument

__all__ = [
    "softmax", "log_softmax", "causal_mask", "attention", "cross_entropy", "layer_norm", "rms_norm", "gelu", "silu",
    "rope",
]

F32 = NDArray[np.float32]


def _f32(name: str, x: ArrayLike) -> F32:
    """x as a float32 array (a view when it already is one)."""
    if np.iscomplexobj(x):
        raise InvalidArgument(f"{name} must be real, got a complex array")
    try:
        return np.asarray(x, dtype=np.float32)
    except (TypeError, ValueError) as e:
        raise InvalidArgument(f"{name} cannot be read as a float32 array: {e}") from None


def _i64(name: str, x: ArrayLike) -> NDArray[np.int64]:
    """x as an int64 array; floats and booleans are refused rather than truncated."""
    a = np.asarray(x)
    if a.size and not np.issubdtype(a.dtype, np.integer):
        raise InvalidArgument(f"{name} must hold integers, got dtype {a.dtype} (shape {a.shape})")
    return a.astype(np.int64, copy=False)


def _int(name: str, x: Any) -> int:
    try:
        return operator.index(x)
    except TypeError:
        raise InvalidArgument(f"{name} must be an integer, got {x!r}") from None


def softmax(x: ArrayLike, axis: int = -1) -> F32:
    """softmax(x)_i = exp(x_i - max x) / Σ_j exp(x_j - max x) along `axis`."""
    return _native.ops_softmax(_f32("x", x), _int("axis", axis))


def log_softmax(x: ArrayLike, axis: int = -1) -> F32:
    """log softmax(x)_i = x_i - logsumexp(x) along `axis`."""
    return _native.ops_log_softmax(_f32("x", x), _int("axis", axis))


def causal_mask(Tq: int, Tk: int) -> NDArray[np.bool_]:
    """Boolean [Tq, Tk], True = may attend: the queries are the last Tq of the Tk positions (decoding with a
    cache), so query i sees keys j <= Tk - Tq + i. Needs Tq <= Tk, as causal `attention` does.

    This is the mask the engine's attention applies when causal, read off its kernel (uniform scores, one-hot
    values: the output is the attention pattern itself). The Rust crate::ops::causal_mask is its additive form,
    0 where this is True and -inf where it is False."""
    tq, tk = _int("Tq", Tq), _int("Tk", Tk)
    if tq < 0 or tk < 0:
        raise InvalidArgument(f"causal_mask: Tq and Tk must be >= 0, got {tq} and {tk}")
    if tq > tk:
        raise InvalidArgument(f"causal_mask: more queries ({tq}) than keys ({tk})")
    if tq == 0 or tk == 0:
        return np.zeros((tq, tk), dtype=np.bool_)
    zeros_q = np.zeros((1, 1, tq, tk), dtype=np.float32)                 # q·kᵀ = 0: every allowed key weighs alike
    zeros_k = np.zeros((1, 1, tk, tk), dtype=np.float32)
    one_hot = np.eye(tk, dtype=np.float32)[None, None]                   # value j is e_j
    pattern = _native.ops_attention(zeros_q, zeros_k, one_hot, True, None, None)  # [1, 1, Tq, Tk]
    return pattern[0, 0] > 0


def attention(
    q: ArrayLike,
    k: ArrayLike,
    v: ArrayLike,
    *,
    causal: bool = True,
    mask: ArrayLike | None = None,
    scale: float | None = None,
) -> F32:
    """softmax(q kᵀ · scale + M) v, scale = 1/√D unless given.

    q [B, H, Tq, D]; k, v [B, Hkv, Tk, D] with H % Hkv == 0 (query head h reads key/value head h // (H/Hkv)).
    M joins the causal mask (aligned to the end when Tq < Tk: decoding with a cache) and `mask`, boolean
    (True = attend) or additive float, broadcastable to [B, H, Tq, Tk]. Returns [B, H, Tq, D]."""
    m: np.ndarray | None = None
    if mask is not None:
        m = np.asarray(mask)
        if m.dtype != np.bool_:
            m = _f32("mask", m)
    s = None if scale is None else float(scale)
    return _native.ops_attention(_f32("q", q), _f32("k", k), _f32("v", v), bool(causal), m, s)


def cross_entropy(
    logits: ArrayLike,
    targets: ArrayLike,
    *,
    ignore_index: int = -100,
    reduction: Literal["mean", "sum", "none"] = "mean",
) -> F32 | float:
    """-log softmax(logits)[target] per row; rows whose target is `ignore_index` count for nothing.

    logits [N, V] (or [..., V]), targets [N] (or [...]) integer ids. reduction "none" -> float32 array shaped like
    targets (0 on ignored rows); "sum" -> float; "mean" -> float, over the rows not ignored (nan if none)."""
    if not isinstance(reduction, str):
        raise InvalidArgument(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    out = _native.ops_cross_entropy(
        _f32("logits", logits), _i64("targets", targets), _int("ignore_index", ignore_index), reduction
    )
    return out if reduction == "none" else float(out)


def layer_norm(x: ArrayLike, weight: ArrayLike | None, bias: ArrayLike | None, eps: float = 1e-5) -> F32:
    """(x - mean(x)) / √(var(x) + eps) · weight + bias over the last axis; weight and bias are [C] or None."""
    w = None if weight is None else _f32("weight", weight)
    b = None if bias is None else _f32("bias", bias)
    return _native.ops_layer_norm(_f32("x", x), w, b, float(eps))


def rms_norm(x: ArrayLike, weight: ArrayLike | None, eps: float = 1e-6) -> F32:
    """x / √(mean(x²) + eps) · weight over the last axis; weight is [C] or None."""
    w = None if weight is None else _f32("weight", weight)
    return _native.ops_rms_norm(_f32("x", x), w, float(eps))


def gelu(x: ArrayLike, approximate: Literal["tanh", "none"] = "tanh") -> F32:
    """GELU: ½ x (1 + tanh(√(2/π)(x + 0.044715 x³))) with approximate="tanh" (GPT-2), x Φ(x) with "none" (BERT)."""
    if not isinstance(approximate, str):
        raise InvalidArgument(f"gelu: approximate must be 'tanh' or 'none', got {approximate!r}")
    return _native.ops_gelu(_f32("x", x), approximate)


def silu(x: ArrayLike) -> F32:
    """SiLU(x) = x σ(x)."""
    return _native.ops_silu(_f32("x", x))


def rope(
    x: ArrayLike,
    positions: ArrayLike,
    *,
    theta: float = 10000.0,
    scaling: Mapping[str, Any] | None = None,
) -> F32:
    """Rotary position embedding, half-split: each pair (x_i, x_{i+D/2}) turned by the angle p·ω_i.

    x [B, H, T, D] (or [..., T, D]); positions [T] or [B, T] integers; scaling a Hugging Face rope_scaling dict
    ("default", "linear" with factor, "llama3" with factor, low_freq_factor, high_freq_factor,
    original_max_position_embeddings). Returns the shape of x."""
    if scaling is not None and not isinstance(scaling, Mapping):
        raise InvalidArgument(f"rope: scaling must be a dict like a config's rope_scaling, got {scaling!r}")
    sc = None if scaling is None else {str(k): v for k, v in scaling.items()}
    return _native.ops_rope(_f32("x", x), _i64("positions", positions), float(theta), sc)
