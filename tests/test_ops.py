"""candlewick.ops (the engine's float32 kernels) against candlewick.reference.functional (float64), by Hypothesis.

Both sides get the same float32 inputs, so a difference is the engine's arithmetic alone. The bound is DESIGN's
1e-5 relative, with an absolute floor of 1e-6 for values that cancel to near 0 (rtol=1e-5, atol=1e-6).
"""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import array_shapes, arrays

import candlewick as cw
from candlewick import ops
from candlewick.reference import functional as F

RTOL, ATOL = 1e-5, 1e-6
SETTINGS = settings(max_examples=200, deadline=None)


def assert_close(got, want):
    assert isinstance(got, np.ndarray) and got.dtype == np.float32
    assert got.shape == np.shape(want)
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)


def values(shape, lo=-10.0, hi=10.0):
    """float32 arrays of `shape` with elements in [lo, hi] (no subnormals: their flush is not what is tested)."""
    return arrays(np.float32, shape, elements=st.floats(lo, hi, width=32, allow_subnormal=False))


def normal(draw, shape, scale=1.0):
    """A seeded normal float32 array: fast for the bigger tensors, still shrunk and replayed by Hypothesis."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    return (rng.standard_normal(shape) * scale).astype(np.float32)


# --- softmax, log_softmax ---------------------------------------------------------------------------------------

@st.composite
def x_and_axis(draw, lo=-30.0, hi=30.0):
    x = draw(values(array_shapes(min_dims=1, max_dims=4, min_side=1, max_side=6), lo, hi))
    return x, draw(st.integers(-x.ndim, x.ndim - 1))


@SETTINGS
@given(x_and_axis())
def test_softmax(xa):
    x, axis = xa
    assert_close(ops.softmax(x, axis), F.softmax(x, axis))
    assert_close(ops.softmax(x), F.softmax(x))


@SETTINGS
@given(x_and_axis(-80.0, 80.0))
def test_log_softmax(xa):
    x, axis = xa
    assert_close(ops.log_softmax(x, axis=axis), F.log_softmax(x, axis=axis))


def test_softmax_takes_float64_and_lists():
    x = [[1.0, 2.0, 3.0], [1e3, 1e3, -1e3]]
    assert_close(ops.softmax(np.array(x, dtype=np.float64)), F.softmax(np.float32(x)))
    assert_close(ops.log_softmax(x, 0), F.log_softmax(np.float32(x), 0))
    assert ops.softmax(np.zeros((0, 3))).shape == (0, 3)


# --- attention --------------------------------------------------------------------------------------------------

@st.composite
def attention_case(draw):
    """q [B, H, Tq, D], k, v [B, Hkv, Tk, D] with H = rep·Hkv, an optional mask that broadcasts to
    [B, H, Tq, Tk] (boolean or additive), causal or not, Tq <= Tk when causal."""
    B, Hkv, rep = draw(st.integers(1, 2)), draw(st.integers(1, 3)), draw(st.integers(1, 3))
    H, Tk, D = Hkv * rep, draw(st.integers(1, 7)), draw(st.sampled_from([1, 2, 3, 8, 16]))
    causal = draw(st.booleans())
    Tq = draw(st.integers(1, Tk)) if causal else draw(st.integers(1, 7))
    q, k, v = (normal(draw, s) for s in [(B, H, Tq, D), (B, Hkv, Tk, D), (B, Hkv, Tk, D)])
    kind = draw(st.sampled_from(["none", "bool", "additive"]))
    mask = None
    if kind != "none":
        full = (B, H, Tq, Tk)
        ndim = draw(st.integers(1, 4))
        shape = tuple(n if draw(st.booleans()) else 1 for n in full[4 - ndim:])
        rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
        if kind == "bool":
            mask = rng.random(shape) < 0.7
            mask[..., 0] = True  # key 0 is visible to every query, causal or not: no row is all masked
        else:
            mask = rng.uniform(-4, 4, shape).astype(np.float32)
            mask[..., 1:][rng.random(mask[..., 1:].shape) < 0.2] = -np.inf
    scale = draw(st.none() | st.floats(0.05, 2.0))
    return q, k, v, causal, mask, scale


def score_rounding(q, k, v, mask, scale):
    """How far float32 arithmetic alone can move an attention output: each score s = q·k·scale (+ mask) is a
    float32 number, rounded by up to a few ulp of |s|, and a softmax-weighted average of the values moves by up
    to |Δs|·max|v| when its scores move by Δs. Four ulp of the largest |s|, times the largest |v|. (A failing case
    Hypothesis found: two scores near -19.5 apart by 0.22, values near ±2 that cancel to 0.019; the engine was
    1.9e-6 off, 7.6e-5 relative, with every score within half an ulp of 19.5. Beside that, the 1e-6 floor would
    ask for more than float32 scores can hold.)"""
    rep = q.shape[1] // k.shape[1]
    s = np.einsum("bhqd,bhkd->bhqk", q.astype(np.float64), np.repeat(k, rep, axis=1).astype(np.float64))
    s *= scale if scale is not None else q.shape[-1] ** -0.5
    if mask is not None and mask.dtype != bool:
        s = s + mask
    biggest = np.max(np.abs(s[np.isfinite(s)]), initial=0.0)
    return 4 * np.finfo(np.float32).eps * biggest * np.max(np.abs(v), initial=0.0)


@settings(max_examples=400, deadline=None)
@given(attention_case())
def test_attention(case):
    q, k, v, causal, mask, scale = case
    got = ops.attention(q, k, v, causal=causal, mask=mask, scale=scale)
    want = F.attention(q, k, v, causal=causal, mask=mask, scale=scale)
    assert isinstance(got, np.ndarray) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL + score_rounding(q, k, v, mask, scale))


def test_attention_decoding_step_sees_every_key():
    # One query after a cache of 5: causal hides nothing, so it equals non-causal attention.
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal(s).astype(np.float32) for s in [(1, 4, 1, 8), (1, 2, 6, 8), (1, 2, 6, 8)])
    assert_close(ops.attention(q, k, v), F.attention(q, k, v, causal=False))


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")
def test_attention_fully_masked_row_is_nan_in_both():
    rng = np.random.default_rng(1)
    q, k, v = (rng.standard_normal((1, 1, 2, 4)).astype(np.float32) for _ in range(3))
    mask = np.array([[True, True], [False, False]])
    got, want = ops.attention(q, k, v, causal=False, mask=mask), F.attention(q, k, v, causal=False, mask=mask)
    assert np.isnan(got[0, 0, 1]).all() and np.isnan(want[0, 0, 1]).all()
    assert_close(got[0, 0, 0], want[0, 0, 0])


# --- cross_entropy ----------------------------------------------------------------------------------------------

@st.composite
def ce_case(draw):
    lead = draw(st.sampled_from([(), (1,), (5,), (9,), (2, 3)]))
    V = draw(st.integers(1, 12))
    logits = draw(values(lead + (V,), -20.0, 20.0))
    ignore = draw(st.sampled_from([-100, -1, 0]))
    ids = st.integers(0, V - 1) | st.just(ignore)
    targets = np.array(draw(st.lists(ids, min_size=int(np.prod(lead)), max_size=int(np.prod(lead)))), np.int64)
    return logits, targets.reshape(lead), ignore


@settings(max_examples=300, deadline=None)
@given(ce_case(), st.sampled_from(["mean", "sum", "none"]))
def test_cross_entropy(case, reduction):
    logits, targets, ignore = case
    got = ops.cross_entropy(logits, targets, ignore_index=ignore, reduction=reduction)
    want = F.cross_entropy(logits, targets, ignore_index=ignore, reduction=reduction)
    if reduction == "none":
        assert_close(got, want)
    else:
        assert isinstance(got, float)
        np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)  # nan == nan when every row is ignored


def test_cross_entropy_ignored_rows_count_for_nothing():
    logits = np.array([[1.0, 2.0, 3.0], [5.0, 0.0, 0.0], [0.0, 1.0, 0.0]], np.float32)
    t = np.array([2, -100, 1])
    none = ops.cross_entropy(logits, t, reduction="none")
    assert none[1] == 0.0
    assert ops.cross_entropy(logits, t) == pytest.approx((none[0] + none[2]) / 2, rel=1e-6)
    assert ops.cross_entropy(logits, t, reduction="sum") == pytest.approx(none[0] + none[2], rel=1e-6)
    assert np.isnan(ops.cross_entropy(logits, [-100, -100, -100]))


# --- norms, activations -----------------------------------------------------------------------------------------

@st.composite
def norm_case(draw):
    C = draw(st.integers(1, 64))
    lead = draw(st.sampled_from([(), (1,), (3,), (2, 3)]))
    x = normal(draw, lead + (C,), draw(st.sampled_from([1e-3, 1.0, 30.0])))
    x += np.float32(draw(st.sampled_from([0.0, 1.0, -50.0, 1000.0])))  # an offset: layer_norm must centre exactly
    w = None if draw(st.booleans()) else normal(draw, (C,))
    b = None if draw(st.booleans()) else normal(draw, (C,))
    return x, w, b


@SETTINGS
@given(norm_case(), st.sampled_from([1e-5, 1e-6, 1e-12]))
def test_layer_norm(case, eps):
    x, w, b = case
    assert_close(ops.layer_norm(x, w, b, eps), F.layer_norm(x, w, b, eps))
    assert_close(ops.layer_norm(x, w, b), F.layer_norm(x, w, b))


@SETTINGS
@given(norm_case(), st.sampled_from([1e-6, 1e-5, 1e-12]))
def test_rms_norm(case, eps):
    x, w, _ = case
    assert_close(ops.rms_norm(x, w, eps), F.rms_norm(x, w, eps))
    assert_close(ops.rms_norm(x, w), F.rms_norm(x, w))


any_shape = array_shapes(min_dims=0, max_dims=3, min_side=1, max_side=8)


@SETTINGS
@given(values(any_shape, -20.0, 20.0), st.sampled_from(["tanh", "none"]))
def test_gelu(x, approximate):
    assert_close(ops.gelu(x, approximate), F.gelu(x, approximate))
    assert_close(ops.gelu(x), F.gelu(x))


@SETTINGS
@given(values(any_shape, -40.0, 40.0))
def test_silu(x):
    assert_close(ops.silu(x), F.silu(x))


# --- rope -------------------------------------------------------------------------------------------------------

scalings = st.one_of(
    st.none(),
    st.just({"rope_type": "default"}),
    st.builds(lambda f: {"rope_type": "linear", "factor": f}, st.floats(1.0, 8.0)),
    st.builds(lambda f: {"type": "linear", "factor": f}, st.floats(1.0, 8.0)),  # the older key
    st.builds(
        lambda f, lo, hi, L: {
            "rope_type": "llama3", "factor": f, "low_freq_factor": lo, "high_freq_factor": hi,
            "original_max_position_embeddings": L,
        },
        st.floats(1.0, 32.0), st.sampled_from([0.5, 1.0, 2.0]), st.sampled_from([4.0, 8.0]),
        st.sampled_from([16, 64, 512, 8192]),
    ),
)


@st.composite
def rope_case(draw):
    B, H, T, D = draw(st.integers(1, 2)), draw(st.integers(1, 3)), draw(st.integers(1, 6)), draw(st.integers(1, 8)) * 2
    layout = draw(st.sampled_from(["BHTD", "TD", "HTD", "batched positions"]))
    shape = {"TD": (T, D), "HTD": (H, T, D)}.get(layout, (B, H, T, D))
    x = normal(draw, shape, 2.0)
    pos_shape = (B, T) if layout == "batched positions" else (T,)
    start = draw(st.integers(0, 10_000))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if draw(st.booleans()):
        positions = start + rng.integers(0, 64, pos_shape)  # any order, repeats allowed
    else:
        positions = np.broadcast_to(start + np.arange(T), pos_shape)  # a cache of `start` tokens, then T new ones
    return x, positions.astype(np.int64)


@settings(max_examples=300, deadline=None)
@given(rope_case(), st.sampled_from([10000.0, 500000.0, 100.0]), scalings)
def test_rope(case, theta, scaling):
    x, positions = case
    assert_close(ops.rope(x, positions, theta=theta, scaling=scaling), F.rope(x, positions, theta=theta, scaling=scaling))


def test_rope_defaults_and_position_zero_is_identity():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((1, 2, 4, 8)).astype(np.float32)
    assert_close(ops.rope(x, [3, 4, 5, 6]), F.rope(x, [3, 4, 5, 6]))
    np.testing.assert_array_equal(ops.rope(x, [0, 0, 0, 0]), x)


# --- bad input --------------------------------------------------------------------------------------------------

_q, _kv = np.zeros((1, 4, 3, 8), np.float32), np.zeros((1, 2, 5, 8), np.float32)
_x = np.zeros((2, 5), np.float32)
BAD = {
    "softmax 0-d": lambda: ops.softmax(np.float32(1.0)),
    "softmax axis": lambda: ops.softmax(_x, axis=2),
    "log_softmax axis": lambda: ops.log_softmax(_x, axis=-3),
    "softmax strings": lambda: ops.softmax(["a", "b"]),
    "attention q 3-D": lambda: ops.attention(_q[0], _kv, _kv),
    "attention k 5-D": lambda: ops.attention(_q, _kv[None], _kv[None]),
    "attention H % Hkv": lambda: ops.attention(_q, np.zeros((1, 3, 5, 8)), np.zeros((1, 3, 5, 8))),
    "attention D": lambda: ops.attention(_q, _kv[..., :4], _kv[..., :4]),
    "attention B": lambda: ops.attention(_q, np.zeros((2, 2, 5, 8)), np.zeros((2, 2, 5, 8))),
    "attention k != v": lambda: ops.attention(_q, _kv, _kv[:, :, :4]),
    "attention Tk = 0": lambda: ops.attention(_q, _kv[:, :, :0], _kv[:, :, :0], causal=False),
    "attention causal Tq > Tk": lambda: ops.attention(_q, _kv[:, :, :2], _kv[:, :, :2]),
    "attention mask shape": lambda: ops.attention(_q, _kv, _kv, mask=np.ones((3, 4), bool)),
    "attention mask 5-D": lambda: ops.attention(_q, _kv, _kv, mask=np.ones((1, 1, 1, 3, 5))),
    "cross_entropy reduction": lambda: ops.cross_entropy(_x, [0, 1], reduction="avg"),
    "cross_entropy shapes": lambda: ops.cross_entropy(_x, [0, 1, 2]),
    "cross_entropy target range": lambda: ops.cross_entropy(_x, [0, 5]),
    "cross_entropy negative target": lambda: ops.cross_entropy(_x, [0, -3]),
    "cross_entropy float targets": lambda: ops.cross_entropy(_x, [0.5, 1.0]),
    "cross_entropy V = 0": lambda: ops.cross_entropy(np.zeros((2, 0)), [-100, -100]),
    "layer_norm weight": lambda: ops.layer_norm(_x, np.ones(4), None),
    "layer_norm bias": lambda: ops.layer_norm(_x, None, np.ones((1, 5))),
    "layer_norm 0-d": lambda: ops.layer_norm(np.float32(1.0), None, None),
    "layer_norm eps": lambda: ops.layer_norm(_x, None, None, eps=-1.0),
    "rms_norm weight": lambda: ops.rms_norm(_x, np.ones(6)),
    "rms_norm C = 0": lambda: ops.rms_norm(np.zeros((2, 0)), None),
    "gelu approximate": lambda: ops.gelu(_x, "erf"),
    "gelu approximate type": lambda: ops.gelu(_x, True),
    "rope odd D": lambda: ops.rope(np.zeros((1, 1, 3, 7)), [0, 1, 2]),
    "rope T": lambda: ops.rope(np.zeros((1, 1, 3, 8)), [0, 1]),
    "rope 1-D x": lambda: ops.rope(np.zeros(8), [0]),
    "rope batch": lambda: ops.rope(np.zeros((2, 1, 3, 8)), np.zeros((3, 3), int)),
    "rope float positions": lambda: ops.rope(np.zeros((1, 1, 2, 8)), [0.5, 1.5]),
    "rope scaling type": lambda: ops.rope(np.zeros((1, 1, 2, 8)), [0, 1], scaling={"rope_type": "yarn", "factor": 2.0}),
    "rope scaling field": lambda: ops.rope(np.zeros((1, 1, 2, 8)), [0, 1], scaling={"rope_type": "llama3", "factor": 8.0}),
    "rope scaling factor": lambda: ops.rope(np.zeros((1, 1, 2, 8)), [0, 1], scaling={"rope_type": "linear", "factor": 0}),
    "rope theta": lambda: ops.rope(np.zeros((1, 1, 2, 8)), [0, 1], theta=-1.0),
    "rope scaling not a dict": lambda: ops.rope(np.zeros((1, 1, 2, 8)), [0, 1], scaling=2.0),
}


@pytest.mark.parametrize("call", BAD.values(), ids=BAD.keys())
def test_bad_input_raises_invalid_argument(call):
    with pytest.raises(cw.InvalidArgument):
        call()


def test_error_message_names_argument_and_shapes():
    with pytest.raises(cw.InvalidArgument, match=r"H = 4 .* Hkv = 3.*\[1, 4, 3, 8\].*\[1, 3, 5, 8\]"):
        ops.attention(_q, np.zeros((1, 3, 5, 8)), np.zeros((1, 3, 5, 8)))
    with pytest.raises(cw.InvalidArgument, match=r"weight.*\[4\].*\[2, 5\]"):
        ops.layer_norm(_x, np.ones(4), None)
    with pytest.raises(ValueError):  # InvalidArgument is a ValueError too
        ops.gelu(_x, "erf")
