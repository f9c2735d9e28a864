"""The maths of a Transformer in NumPy, float64 inside: the oracle that `candlewick.ops` is checked against.

Each function is named after the formula in its docstring; shapes sit in the comments. Beside each one the trainable
ones have their backward pass, `NAME_backward(dy, *inputs)`: given dy = ∂L/∂y for the forward's output y, it
returns ∂L/∂ of each input (in the forward's order), from the derivation written in its docstring. It takes the
forward's own arguments and recomputes what it needs from them, so the two can be read side by side.
Shape legend: B batch, T tokens (Tq queries, Tk keys), C channels (hidden), H heads, Hkv key/value heads,
D head dim, V vocabulary, N rows.
"""
from __future__ import annotations

import math

import numpy as np


def _f64(x) -> np.ndarray:
    return np.asarray(x, dtype=np.float64)


# --- normalised exponentials ------------------------------------------------------------------------------------

def logsumexp(x, axis=-1, keepdims=False) -> np.ndarray:
    """log Σ_j exp(x_j), computed as m + log Σ_j exp(x_j - m) with m = max_j x_j so that nothing overflows."""
    x = _f64(x)
    m = np.max(x, axis=axis, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)  # a row of -inf stays -inf instead of becoming nan
    with np.errstate(divide="ignore"):
        out = m + np.log(np.sum(np.exp(x - m), axis=axis, keepdims=True))
    return out if keepdims else np.squeeze(out, axis=axis)


def softmax(x, axis=-1) -> np.ndarray:
    """softmax(x)_i = exp(x_i - m) / Σ_j exp(x_j - m), m = max_j x_j (the shift changes nothing but overflow).

    A row that is all -inf has no distribution: it comes out as nan, as in PyTorch."""
    x = _f64(x)
    e = np.exp(x - np.max(x, axis=axis, keepdims=True))
    return e / np.sum(e, axis=axis, keepdims=True)


def softmax_backward(dy, x, axis=-1) -> np.ndarray:
    """y = softmax(x): ∂y_i/∂x_j = y_i (δ_ij - y_j), so dx_j = Σ_i dy_i y_i (δ_ij - y_j) = y_j (dy_j - Σ_i dy_i y_i)."""
    y, dy = softmax(x, axis=axis), _f64(dy)
    return y * (dy - np.sum(dy * y, axis=axis, keepdims=True))


def log_softmax(x, axis=-1) -> np.ndarray:
    """log softmax(x)_i = x_i - logsumexp(x)."""
    x = _f64(x)
    return x - logsumexp(x, axis=axis, keepdims=True)


def log_softmax_backward(dy, x, axis=-1) -> np.ndarray:
    """y_i = x_i - logsumexp(x), ∂logsumexp/∂x_j = softmax(x)_j: dx_j = dy_j - softmax(x)_j Σ_i dy_i."""
    dy = _f64(dy)
    return dy - softmax(x, axis=axis) * np.sum(dy, axis=axis, keepdims=True)


# --- attention --------------------------------------------------------------------------------------------------

def causal_mask(Tq: int, Tk: int) -> np.ndarray:
    """Boolean [Tq, Tk], True = may attend. Queries are the last Tq of the Tk positions (decoding with a cache),
    so query i sits at position Tk - Tq + i and sees keys j <= Tk - Tq + i."""
    return np.arange(Tk)[None, :] <= np.arange(Tq)[:, None] + (Tk - Tq)


def repeat_kv(x, n_rep: int) -> np.ndarray:
    """Grouped-query attention: each of the Hkv key/value heads serves n_rep = H / Hkv query heads
    (query head h reads kv head h // n_rep).  [B, Hkv, T, D] -> [B, Hkv * n_rep, T, D]"""
    return np.repeat(x, n_rep, axis=1)


def attention_weights(q, k, *, causal=True, mask=None, scale=None) -> np.ndarray:
    """P = softmax(q kᵀ · scale + M), scale = 1/√D unless given; each row of P sums to 1.

    q [B, H, Tq, D], k [B, Hkv, Tk, D] with H % Hkv == 0. M joins the causal mask (when causal) and `mask`:
    additive float (added to the scores) or boolean (True = keep), broadcastable to [B, H, Tq, Tk].
    Returns P [B, H, Tq, Tk]."""
    q, k = _f64(q), _f64(k)
    B, H, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    if H % Hkv != 0:
        raise ValueError(f"attention: {H} query heads is not a multiple of {Hkv} key/value heads")
    if causal and Tq > Tk:
        raise ValueError(f"attention: causal with more queries ({Tq}) than keys ({Tk})")
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    k = repeat_kv(k, H // Hkv)                              # [B, H, Tk, D]
    scores = (q @ np.swapaxes(k, -1, -2)) * scale           # [B, H, Tq, Tk]
    if mask is not None:
        mask = np.asarray(mask)
        if mask.dtype == np.bool_:
            scores = np.where(mask, scores, -np.inf)
        else:
            scores = scores + _f64(mask)
    if causal:
        scores = np.where(causal_mask(Tq, Tk), scores, -np.inf)
    return softmax(scores, axis=-1)


def attention(q, k, v, *, causal=True, mask=None, scale=None) -> np.ndarray:
    """Attention(q, k, v) = softmax(q kᵀ/√D + M) v.

    q [B, H, Tq, D]; k, v [B, Hkv, Tk, D]; see `attention_weights` for M, grouped-query heads and Tq < Tk.
    Returns [B, H, Tq, D]."""
    v = _f64(v)
    p = attention_weights(q, k, causal=causal, mask=mask, scale=scale)  # [B, H, Tq, Tk]
    return p @ repeat_kv(v, p.shape[1] // v.shape[1])                    # [B, H, Tq, D]


def repeat_kv_backward(dy, n_rep: int) -> np.ndarray:
    """Each kv head was copied to n_rep query heads, so its gradient is the sum over them.
    [B, Hkv * n_rep, T, D] -> [B, Hkv, T, D]"""
    B, H, T, D = dy.shape
    return dy.reshape(B, H // n_rep, n_rep, T, D).sum(axis=2)


def attention_backward(dy, q, k, v, *, causal=True, mask=None, scale=None):
    """y = P v with P = softmax(S), S = q kᵀ · scale + M. Going back through each product:
    dv = Pᵀ dy;  dP = dy vᵀ;  dS = softmax_backward(dP) (masked entries have P = 0, so dS = 0 there);
    dq = dS k · scale;  dk = dSᵀ q · scale;  a kv head shared by a group of query heads sums their dk, dv.

    dy [B, H, Tq, D], the forward's q, k, v and options. Returns (dq [B, H, Tq, D], dk, dv [B, Hkv, Tk, D])."""
    q, k, v, dy = _f64(q), _f64(k), _f64(v), _f64(dy)
    D, n_rep = q.shape[-1], q.shape[1] // k.shape[1]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    p = attention_weights(q, k, causal=causal, mask=mask, scale=scale)  # [B, H, Tq, Tk]
    kr, vr = repeat_kv(k, n_rep), repeat_kv(v, n_rep)                    # [B, H, Tk, D]
    dv = np.swapaxes(p, -1, -2) @ dy                                     # [B, H, Tk, D]
    dp = dy @ np.swapaxes(vr, -1, -2)                                    # [B, H, Tq, Tk]
    ds = p * (dp - np.sum(dp * p, axis=-1, keepdims=True))               # softmax backward, [B, H, Tq, Tk]
    dq = (ds @ kr) * scale                                               # [B, H, Tq, D]
    dk = (np.swapaxes(ds, -1, -2) @ q) * scale                           # [B, H, Tk, D]
    return dq, repeat_kv_backward(dk, n_rep), repeat_kv_backward(dv, n_rep)


# --- losses -----------------------------------------------------------------------------------------------------

def cross_entropy(logits, targets, *, ignore_index=-100, reduction="mean"):
    """CE = -log softmax(x)[y] = logsumexp(x) - x[y], per row; rows whose target is ignore_index count for nothing.

    logits [N, V] (or [..., V]), targets [N] (or [...]) integer ids.
    reduction: "none" -> [N] (0 on ignored rows), "sum" -> Σ, "mean" -> Σ / (rows not ignored), nan if none."""
    x = _f64(logits)
    y = np.asarray(targets, dtype=np.int64)
    x, y = x.reshape(-1, x.shape[-1]), y.reshape(-1)             # [N, V], [N]
    keep = y != ignore_index                                      # [N]
    safe = np.where(keep, y, 0)
    if np.any((safe < 0) | (safe >= x.shape[-1])):
        raise ValueError(f"cross_entropy: a target is outside the vocabulary of {x.shape[-1]}")
    nll = logsumexp(x, axis=-1) - x[np.arange(len(y)), safe]     # [N]
    nll = np.where(keep, nll, 0.0)
    if reduction == "none":
        return nll.reshape(np.shape(targets))
    if reduction == "sum":
        return float(nll.sum())
    if reduction == "mean":
        n = int(keep.sum())
        return float(nll.sum() / n) if n else float("nan")
    raise ValueError(f"cross_entropy: reduction must be 'mean', 'sum' or 'none', not {reduction!r}")


def cross_entropy_backward(dy, logits, targets, *, ignore_index=-100, reduction="mean") -> np.ndarray:
    """CE_n = logsumexp(x_n) - x_n[y_n], so ∂CE_n/∂x_n = softmax(x_n) - onehot(y_n): the predicted distribution
    minus the true one. Each row is weighted by what the reduction gave it: dy / (rows kept) for "mean", dy for
    "sum", dy[n] for "none"; ignored rows get 0.

    dy: a number ("mean", "sum") or [N] ("none"). Returns dlogits, the shape of logits."""
    x = _f64(logits)
    y = np.asarray(targets, dtype=np.int64).reshape(-1)                   # [N]
    p = softmax(x.reshape(-1, x.shape[-1]))                               # [N, V]
    keep = y != ignore_index
    p[np.arange(len(y))[keep], y[keep]] -= 1.0                            # softmax - onehot
    if reduction == "none":
        w = _f64(dy).reshape(-1)
    elif reduction in ("sum", "mean"):
        w = np.full(len(y), float(dy) / (max(int(keep.sum()), 1) if reduction == "mean" else 1.0))
    else:
        raise ValueError(f"cross_entropy: reduction must be 'mean', 'sum' or 'none', not {reduction!r}")
    return (p * np.where(keep, w, 0.0)[:, None]).reshape(x.shape)


def kl_divergence(p_logits, q_logits) -> np.ndarray:
    """KL(p ‖ q) = Σ_i p_i (log p_i - log q_i), per row, with p = softmax(p_logits) and q = softmax(q_logits).

    The first argument is the reference distribution (what PyTorch calls the target of F.kl_div).
    Terms with p_i = 0 count 0. [..., V], [..., V] -> [...], every value >= 0."""
    log_p, log_q = log_softmax(p_logits), log_softmax(q_logits)  # [..., V]
    p = np.exp(log_p)
    terms = np.where(p > 0, p * (log_p - log_q), 0.0)
    return np.maximum(terms.sum(axis=-1), 0.0)  # rounding can leave -1e-17 for equal rows


# --- layers -----------------------------------------------------------------------------------------------------

def linear(x, weight, bias=None) -> np.ndarray:
    """y = x Wᵀ + b with W stored [out, in] as in PyTorch's nn.Linear.  [..., in] -> [..., out]"""
    y = _f64(x) @ _f64(weight).T
    return y if bias is None else y + bias


def linear_backward(dy, x, weight, bias=None):
    """y = x Wᵀ + b: dx = dy W, dW = dyᵀ x and db = Σ dy, both summed over every row (all leading axes).
    Returns (dx [..., in], dW [out, in], db [out] or None)."""
    dy, x = _f64(dy), _f64(x)
    dy2, x2 = dy.reshape(-1, dy.shape[-1]), x.reshape(-1, x.shape[-1])  # [N, out], [N, in]
    return dy @ _f64(weight), dy2.T @ x2, None if bias is None else dy2.sum(axis=0)


def embedding(ids, weight) -> np.ndarray:
    """E[ids]: row i of W [V, C] is token i's vector.  [...] integer ids -> [..., C]"""
    return _f64(weight)[np.asarray(ids)]


def embedding_backward(dy, ids, weight) -> np.ndarray:
    """y_t = W[ids_t]: each row of W gets the sum of dy at the positions where its token stands (np.add.at adds
    repeated ids up; plain indexing would keep only one). Returns dW, the shape of W."""
    dw = np.zeros(np.shape(weight))
    np.add.at(dw, np.asarray(ids).reshape(-1), _f64(dy).reshape(-1, dw.shape[-1]))
    return dw


def layer_norm(x, weight, bias, eps=1e-5) -> np.ndarray:
    """LayerNorm(x) = (x - mean(x)) / √(var(x) + eps) · w + b over the last axis (biased variance)."""
    x = _f64(x)
    mean = x.mean(axis=-1, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
    y = (x - mean) / np.sqrt(var + eps)
    y = y if weight is None else y * weight
    return y if bias is None else y + bias


def layer_norm_backward(dy, x, weight, bias, eps=1e-5):
    """y = x̂ w + b with x̂ = (x - μ) / σ, σ = √(var + eps), over the C channels of each row. Then dw = Σ dy x̂,
    db = Σ dy (over the rows), and with g = dy w, since μ and σ depend on every x_j:
    dx = (g - mean(g) - x̂ mean(g x̂)) / σ.  Returns (dx, dw or None, db or None)."""
    x, dy = _f64(x), _f64(dy)
    mean = x.mean(axis=-1, keepdims=True)
    sigma = np.sqrt(((x - mean) ** 2).mean(axis=-1, keepdims=True) + eps)
    xhat = (x - mean) / sigma
    g = dy if weight is None else dy * weight
    dx = (g - g.mean(axis=-1, keepdims=True) - xhat * (g * xhat).mean(axis=-1, keepdims=True)) / sigma
    rows = tuple(range(x.ndim - 1))
    dw = None if weight is None else (dy * xhat).sum(axis=rows)
    db = None if bias is None else dy.sum(axis=rows)
    return dx, dw, db


def rms_norm(x, weight, eps=1e-6) -> np.ndarray:
    """RMSNorm(x) = x / √(mean(x²) + eps) · w over the last axis (no centring, no bias)."""
    x = _f64(x)
    y = x * (1.0 / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps))
    return y if weight is None else weight * y


def rms_norm_backward(dy, x, weight, eps=1e-6):
    """y = x̂ w with x̂ = x r, r = 1/√(mean(x²) + eps). Then dw = Σ dy x̂ over the rows, and with g = dy w,
    since ∂r/∂x_j = -r³ x_j / C:  dx = r (g - x̂ mean(g x̂)).  Returns (dx, dw or None)."""
    x, dy = _f64(x), _f64(dy)
    r = 1.0 / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)
    xhat = x * r
    g = dy if weight is None else dy * weight
    dx = r * (g - xhat * (g * xhat).mean(axis=-1, keepdims=True))
    dw = None if weight is None else (dy * xhat).sum(axis=tuple(range(x.ndim - 1)))
    return dx, dw


_erf = np.frompyfunc(math.erf, 1, 1)


def gelu(x, approximate="tanh") -> np.ndarray:
    """GELU(x) = x Φ(x) = ½ x (1 + erf(x/√2))                        approximate="none" (BERT's "gelu")
               ≈ ½ x (1 + tanh(√(2/π) (x + 0.044715 x³)))          approximate="tanh" (GPT-2's "gelu_new")"""
    x = _f64(x)
    if approximate == "tanh":
        return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x * x * x)))
    if approximate == "none":
        return 0.5 * x * (1.0 + np.asarray(_erf(x / math.sqrt(2.0)), dtype=np.float64))
    raise ValueError(f"gelu: approximate must be 'tanh' or 'none', not {approximate!r}")


def gelu_backward(dy, x, approximate="tanh") -> np.ndarray:
    """d/dx x Φ(x) = Φ(x) + x φ(x), φ(x) = e^(-x²/2) / √(2π)                       approximate="none"
    d/dx ½ x (1 + tanh u), u = √(2/π) (x + 0.044715 x³):
         ½ (1 + tanh u) + ½ x (1 - tanh² u) √(2/π) (1 + 3 · 0.044715 x²)             approximate="tanh" """
    x, dy = _f64(x), _f64(dy)
    if approximate == "tanh":
        c = math.sqrt(2.0 / math.pi)
        t = np.tanh(c * (x + 0.044715 * x * x * x))
        return dy * (0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * c * (1.0 + 3 * 0.044715 * x * x))
    if approximate == "none":
        cdf = 0.5 * (1.0 + np.asarray(_erf(x / math.sqrt(2.0)), dtype=np.float64))
        return dy * (cdf + x * np.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi))
    raise ValueError(f"gelu: approximate must be 'tanh' or 'none', not {approximate!r}")


def sigmoid(x) -> np.ndarray:
    """σ(x) = 1 / (1 + e^-x), written with e^-|x| so that it never overflows."""
    x = _f64(x)
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


def silu(x) -> np.ndarray:
    """SiLU(x) = x σ(x) (also called swish)."""
    x = _f64(x)
    return x * sigmoid(x)


def silu_backward(dy, x) -> np.ndarray:
    """d/dx x σ(x) = σ(x) + x σ(x)(1 - σ(x)) = σ(x) (1 + x (1 - σ(x)))."""
    s = sigmoid(x)
    return _f64(dy) * s * (1.0 + _f64(x) * (1.0 - s))


# --- rotary position embedding ----------------------------------------------------------------------------------

ROPE_TYPES = ("default", "linear", "llama3", "yarn")  # what rope_inv_freq computes; others are refused by name


def rope_inv_freq(head_dim: int, theta=10000.0, scaling=None) -> np.ndarray:
    """Inverse frequencies of RoPE: ω_i = θ^(-2i/D), i = 0 .. D/2-1, then rescaled as `scaling` says.

    scaling is a Hugging Face rope dict (`rope_type`, or the older `type`):
      None / "default": ω unchanged
      "linear" (factor f): ω / f, i.e. positions squeezed by f
      "llama3" (factor f, low_freq_factor l, high_freq_factor h, original_max_position_embeddings L):
        wavelength λ = 2π/ω; λ < L/h: unchanged; λ > L/l: ω/f; in between: (1-s) ω/f + s ω
        with s = (L/λ - l) / (h - l).
      "yarn" (factor f, original_max_position_embeddings L, beta_fast 32, beta_slow 1, truncate true):
        dimension pair i keeps ω_i while it turns more than beta_fast times within L, takes ω_i / f while it
        turns fewer than beta_slow times, and in between blends them along a linear ramp r_i from 0 to 1:
        ω_i (1 - r_i) + (ω_i / f) r_i.  The pair that turns n times within L is d(n) = D ln(L / 2πn) / (2 ln θ);
        the ramp runs from floor(d(beta_fast)) to ceil(d(beta_slow)) (no rounding when truncate is false),
        clipped to [0, D-1]. The cos and sin are then scaled by `rope_attention_factor` (`rope` does it).
    Returns [D/2]."""
    inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))  # [D/2]
    kind = rope_type(scaling)
    if kind == "default":
        return inv_freq
    if kind == "linear":
        return inv_freq / scaling["factor"]
    if kind == "llama3":
        f, lo, hi = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > old_len / lo, inv_freq / f, inv_freq)
        s = (old_len / wavelen - lo) / (hi - lo)
        smoothed = (1 - s) * scaled / f + s * scaled
        medium = (wavelen >= old_len / hi) & (wavelen <= old_len / lo)
        return np.where(medium, smoothed, scaled)
    if kind == "yarn":
        f, old_len = scaling["factor"], scaling["original_max_position_embeddings"]
        fast, slow = scaling.get("beta_fast") or 32, scaling.get("beta_slow") or 1

        def pair_turning(n):  # the dimension pair whose wavelength fits n times into old_len
            return head_dim * math.log(old_len / (n * 2 * math.pi)) / (2 * math.log(theta))

        low, high = pair_turning(fast), pair_turning(slow)
        if scaling.get("truncate", True):
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, head_dim - 1)
        if low == high:
            high += 0.001  # as transformers: no division by zero
        ramp = np.clip((np.arange(head_dim // 2) - low) / (high - low), 0.0, 1.0)  # [D/2]: 0 keep ω, 1 take ω/f
        return inv_freq * (1 - ramp) + inv_freq / f * ramp
    raise NotImplementedError(f"rope: rope_type {kind!r} (supported: {', '.join(ROPE_TYPES)})")


def rope_type(scaling) -> str:
    """The rope dict's `rope_type` (or the older `type`); "default" for no dict."""
    return "default" if not scaling else scaling.get("rope_type", scaling.get("type", "default"))


def rope_attention_factor(scaling) -> float:
    """The factor YaRN multiplies cos and sin by (so q·k by its square): `attention_factor` when given, else
    0.1 ln f + 1 (1 when f <= 1), or with `mscale` m and `mscale_all_dim` a (DeepSeek):
    (0.1 m ln f + 1) / (0.1 a ln f + 1). Every other rope type: 1."""
    if rope_type(scaling) != "yarn":
        return 1.0
    if scaling.get("attention_factor") is not None:
        return float(scaling["attention_factor"])
    f = scaling["factor"]

    def mscale(m=1.0):
        return 1.0 if f <= 1 else 0.1 * m * math.log(f) + 1.0

    m, m_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
    return mscale(m) / mscale(m_all) if m and m_all else mscale()


def rotate_half(x) -> np.ndarray:
    """[x1, x2] -> [-x2, x1] on the two halves of the last axis: the 90° turn of each pair (x1_i, x2_i)."""
    x1, x2 = np.split(x, 2, axis=-1)
    return np.concatenate([-x2, x1], axis=-1)


def rope(x, positions, *, theta=10000.0, scaling=None) -> np.ndarray:
    """RoPE: turn each pair (x_i, x_{i+D/2}) by the angle p·ω_i, p the token's position:
    x' = x cos(pω) + rotate_half(x) sin(pω), so q·k depends only on the distance between positions.
    (YaRN also scales cos and sin by its `rope_attention_factor`.)

    x [B, H, T, D] (or [..., T, D]); positions [T] or [B, T] integers. Returns the same shape as x."""
    x = _f64(x)
    cos, sin = rope_cos_sin(x.shape[-1], positions, theta, scaling)
    return x * cos + rotate_half(x) * sin


def rope_cos_sin(head_dim: int, positions, theta=10000.0, scaling=None):
    """cos(pω) and sin(pω) for each position p, each frequency written twice (for x_i and x_{i+D/2}), times
    rope_attention_factor. positions [T] -> two [T, D]; [B, T] -> two [B, 1, T, D] (broadcast over heads)."""
    inv_freq = rope_inv_freq(head_dim, theta, scaling)                       # [D/2]
    pos = np.asarray(positions, dtype=np.float64)
    angles = pos[..., None] * inv_freq                                       # [(B,) T, D/2]
    angles = np.concatenate([angles, angles], axis=-1)                       # [(B,) T, D]
    if pos.ndim == 2:
        angles = angles[:, None]                                             # [B, 1, T, D]
    m = rope_attention_factor(scaling)
    return np.cos(angles) * m, np.sin(angles) * m


def rope_backward(dy, positions, *, theta=10000.0, scaling=None) -> np.ndarray:
    """RoPE is linear in x, y = x c + R(x) s with R = rotate_half, and R's transpose is -R (a 90° turn back):
    dx = dy c + Rᵀ(dy s) = dy c - R(dy s), the rotation by the opposite angle. x itself is not needed.
    Returns dx, the shape of dy."""
    dy = _f64(dy)
    cos, sin = rope_cos_sin(dy.shape[-1], positions, theta, scaling)
    return dy * cos - rotate_half(dy * sin)
