"""Each backward function of reference.functional against central finite differences, in float64.

For a forward y = f(x, ...) and a fixed random r, L = Σ y ⊙ r has ∂L/∂y = r, so `f_backward(r, x, ...)` must
give ∂L/∂x. The check perturbs every element of every input by ±h, takes (L(x + h) - L(x - h)) / 2h, and holds
the relative error ‖numeric - analytic‖∞ / ‖analytic‖∞ to 1e-6 (five-point differences at h = 1e-4: the
truncation error is O(h⁴), the rounding error O(ε/h), about 1e-11 together). Inputs of softmax, cross-entropy
and the activations are kept within ±4, where gradients do not vanish: in a saturated softmax or the far tail of
GELU the true gradient (1e-9 and below) is smaller than the rounding error of any finite difference. Shapes,
values (through a seed and a scale) and options are drawn by Hypothesis."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from candlewick.reference import functional as F

TOL = 1e-6
H = 1e-4
EXAMPLES = settings(max_examples=25, deadline=None)


def numeric_grad(loss, x: np.ndarray, h: float = H) -> np.ndarray:
    """Central differences of the scalar loss() with respect to each element of x (changed in place, restored),
    on the five-point stencil (8 (L(x+h) - L(x-h)) - (L(x+2h) - L(x-2h))) / 12h, whose error is O(h⁴)."""
    g = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        keep, at = x[i], {}
        for step in (-2, -1, 1, 2):
            x[i] = keep + step * h
            at[step] = loss()
        x[i] = keep
        g[i] = (8 * (at[1] - at[-1]) - (at[2] - at[-2])) / (12 * h)
    return g


def rel_error(numeric: np.ndarray, analytic: np.ndarray) -> float:
    scale = max(np.abs(analytic).max(), np.abs(numeric).max(), 1e-12)
    return float(np.abs(numeric - analytic).max() / scale)


def check(forward, backward_grads, inputs: list[np.ndarray], seed: int):
    """forward(*inputs) -> y; backward_grads(r, *inputs) -> one gradient per input (None to skip one)."""
    y = forward(*inputs)
    r = np.random.default_rng(seed + 1).normal(size=np.shape(y))
    analytic = backward_grads(r, *inputs)
    for n, (x, g) in enumerate(zip(inputs, analytic)):
        if g is None:
            continue
        assert g.shape == x.shape, (n, g.shape, x.shape)
        numeric = numeric_grad(lambda: float(np.sum(forward(*inputs) * r)), x)
        err = rel_error(numeric, g)
        assert err <= TOL, f"input {n}: relative error {err:.2e}"


seeds = st.integers(0, 2**32 - 1)
scales = st.floats(0.2, 3.0)


def normal(seed: int, *shape: int, scale: float = 1.0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=shape) * scale


def bounded(seed: int, *shape: int, scale: float = 1.0) -> np.ndarray:
    return np.clip(normal(seed, *shape, scale=scale), -4.0, 4.0)


@EXAMPLES
@given(seeds, st.integers(1, 4), st.integers(1, 5), st.integers(1, 4), st.booleans(), scales)
def test_linear(seed, n, d_in, d_out, bias, scale):
    x, w = normal(seed, 2, n, d_in, scale=scale), normal(seed + 2, d_out, d_in)
    inputs = [x, w] + ([normal(seed + 3, d_out)] if bias else [])
    check(F.linear, F.linear_backward, inputs, seed)


@EXAMPLES
@given(seeds, st.integers(2, 6), st.integers(1, 4), st.lists(st.integers(0, 5), min_size=1, max_size=8))
def test_embedding_with_repeated_ids(seed, vocab, dim, ids):
    ids = np.asarray(ids) % vocab
    w = normal(seed, vocab, dim)
    check(lambda w: F.embedding(ids, w), lambda r, w: [F.embedding_backward(r, ids, w)], [w], seed)


@EXAMPLES
@given(seeds, st.integers(1, 3), st.integers(3, 8), scales, st.booleans(), st.sampled_from([1e-5, 1e-3]))
def test_layer_norm(seed, rows, dim, scale, affine, eps):
    # from 3 channels: with two, x̂ = ±1 whatever x is, and the gradient is of the order of eps
    x = normal(seed, rows, dim, scale=scale) + normal(seed + 5, rows, 1)
    if affine:
        inputs = [x, normal(seed + 2, dim), normal(seed + 3, dim)]
        check(lambda x, w, b: F.layer_norm(x, w, b, eps), lambda r, x, w, b: F.layer_norm_backward(r, x, w, b, eps),
              inputs, seed)
    else:
        check(lambda x: F.layer_norm(x, None, None, eps),
              lambda r, x: F.layer_norm_backward(r, x, None, None, eps)[:1], [x], seed)


@EXAMPLES
@given(seeds, st.integers(1, 3), st.integers(2, 8), scales, st.booleans())
def test_rms_norm(seed, rows, dim, scale, affine):
    # from 2 channels: with one, x / √(x² + eps) is ±1 up to eps, and its gradient (of the order of eps) is lost
    # in the rounding of the differences
    x = normal(seed, 2, rows, dim, scale=scale)
    if affine:
        check(lambda x, w: F.rms_norm(x, w, 1e-6), lambda r, x, w: F.rms_norm_backward(r, x, w, 1e-6),
              [x, normal(seed + 2, dim)], seed)
    else:
        check(lambda x: F.rms_norm(x, None), lambda r, x: F.rms_norm_backward(r, x, None)[:1], [x], seed)


@EXAMPLES
@given(seeds, st.integers(1, 20), scales, st.sampled_from(["tanh", "none"]))
def test_gelu(seed, n, scale, approximate):
    check(lambda x: F.gelu(x, approximate), lambda r, x: [F.gelu_backward(r, x, approximate)],
          [bounded(seed, n, scale=scale * 2)], seed)


@EXAMPLES
@given(seeds, st.integers(1, 20), scales)
def test_silu(seed, n, scale):
    check(F.silu, lambda r, x: [F.silu_backward(r, x)], [bounded(seed, n, scale=scale * 2)], seed)


@EXAMPLES
@given(seeds, st.integers(1, 3), st.integers(1, 6), scales, st.sampled_from([-1, 0]))
def test_softmax_and_log_softmax(seed, rows, n, scale, axis):
    x = bounded(seed, rows, n, scale=scale * 2)
    check(lambda x: F.softmax(x, axis), lambda r, x: [F.softmax_backward(r, x, axis)], [x], seed)
    check(lambda x: F.log_softmax(x, axis), lambda r, x: [F.log_softmax_backward(r, x, axis)], [x], seed)


@EXAMPLES
@given(seeds, st.integers(1, 2), st.sampled_from([(1, 1), (2, 1), (2, 2), (4, 2), (3, 1)]), st.integers(1, 4),
       st.integers(0, 2), st.sampled_from([2, 4]), st.sampled_from(["causal", "grouped mask", "additive", "none"]),
       st.sampled_from([None, 0.7]))
def test_attention(seed, B, heads, Tq, extra_keys, D, masking, scale):
    """Causal (also with fewer queries than keys, as when decoding with a cache), a boolean mask per batch row
    (padding), an additive mask, and grouped-query heads (H query heads over Hkv key/value heads)."""
    H, Hkv = heads
    Tk = Tq + extra_keys
    q, k, v = normal(seed, B, H, Tq, D), normal(seed + 2, B, Hkv, Tk, D), normal(seed + 3, B, Hkv, Tk, D)
    causal, mask = masking == "causal", None
    if masking == "grouped mask":  # keep the first 1 .. Tk keys of each batch row, never an empty row
        lengths = np.random.default_rng(seed).integers(1, Tk + 1, size=B)
        mask = np.arange(Tk)[None, None, None, :] < lengths[:, None, None, None]
    elif masking == "additive":
        mask = normal(seed + 4, 1, H, Tq, Tk)
    opts = dict(causal=causal, mask=mask, scale=scale)
    check(lambda q, k, v: F.attention(q, k, v, **opts), lambda r, q, k, v: F.attention_backward(r, q, k, v, **opts),
          [q, k, v], seed)


@EXAMPLES
@given(seeds, st.integers(1, 2), st.integers(1, 5), st.sampled_from([2, 4, 8]), st.sampled_from([10.0, 500.0]),
       st.sampled_from([None, {"rope_type": "linear", "factor": 2.0},
                        {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8}]),
       st.booleans())
def test_rope(seed, H, T, D, theta, scaling, batched_positions):
    x = normal(seed, 2, H, T, D)
    start = np.random.default_rng(seed).integers(0, 50, size=(2, 1))
    positions = start + np.arange(T) if batched_positions else np.arange(T) + 3
    check(lambda x: F.rope(x, positions, theta=theta, scaling=scaling),
          lambda r, x: [F.rope_backward(r, positions, theta=theta, scaling=scaling)], [x], seed)


@EXAMPLES
@given(seeds, st.integers(1, 6), st.integers(2, 7), scales, st.sampled_from(["mean", "sum", "none"]),
       st.booleans())
def test_cross_entropy(seed, n, vocab, scale, reduction, ignore_some):
    rng = np.random.default_rng(seed)
    x, y = bounded(seed, n, vocab, scale=scale * 3), rng.integers(0, vocab, size=n)
    if ignore_some:
        y[rng.random(n) < 0.3] = -100
        y[0] = 1 % vocab  # at least one row counts, so the mean is defined
    forward = lambda x: np.asarray(F.cross_entropy(x, y, reduction=reduction))  # noqa: E731
    check(forward, lambda r, x: [F.cross_entropy_backward(r if reduction == "none" else float(r), x, y,
                                                         reduction=reduction)], [x], seed)


def test_cross_entropy_backward_is_softmax_minus_onehot():
    x, y = np.array([[1.0, 2.0, 0.5], [0.0, 0.0, 0.0]]), np.array([1, -100])
    g = F.cross_entropy_backward(1.0, x, y)
    np.testing.assert_allclose(g[0], F.softmax(x[0]) - [0, 1, 0], rtol=0, atol=1e-15)
    assert np.all(g[1] == 0)                       # the ignored row; the mean is over the one row kept
    np.testing.assert_allclose(g.sum(-1), 0, atol=1e-15)  # probabilities and one-hot both sum to 1


def test_attention_backward_rows_that_see_one_key():
    """The first causal query sees only key 0: its output is v_0 exactly, so dv_0 gets its dy whole and dq_0 is 0
    (moving q_0 cannot change a softmax over one entry)."""
    rng = np.random.default_rng(0)
    q, k, v = rng.normal(size=(1, 1, 3, 4)), rng.normal(size=(1, 1, 3, 4)), rng.normal(size=(1, 1, 3, 4))
    dy = np.zeros((1, 1, 3, 4))
    dy[0, 0, 0] = [1.0, 2.0, 3.0, 4.0]
    dq, dk, dv = F.attention_backward(dy, q, k, v)
    assert np.all(dq[0, 0, 0] == 0) and np.all(dk == 0)
    np.testing.assert_array_equal(dv[0, 0, 0], dy[0, 0, 0])


@pytest.mark.parametrize("name", ["linear", "embedding", "layer_norm", "rms_norm", "gelu", "silu", "softmax",
                                  "log_softmax", "attention", "rope", "cross_entropy"])
def test_every_trainable_function_has_a_backward(name):
    assert callable(getattr(F, name)) and callable(getattr(F, name + "_backward"))
