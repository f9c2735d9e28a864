"""Properties of reference attention: softmax(q kᵀ/√d + mask) v, checked against a plain loop and its invariants."""
import math

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from candlewick.reference.functional import attention, attention_weights, causal_mask

SETTINGS = settings(max_examples=60, deadline=None)


@st.composite
def qkv(draw, max_t=6, equal_t=False, scale=3.0):
    """q [B, H, Tq, D] and k, v [B, Hkv, Tk, D] with H a multiple of Hkv and Tq <= Tk."""
    B, Hkv, rep = draw(st.integers(1, 2)), draw(st.integers(1, 3)), draw(st.integers(1, 3))
    Tk = draw(st.integers(1, max_t))
    Tq = Tk if equal_t else draw(st.integers(1, Tk))
    D = draw(st.sampled_from([1, 2, 4, 8]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    q = rng.normal(size=(B, Hkv * rep, Tq, D)) * scale
    k = rng.normal(size=(B, Hkv, Tk, D)) * scale
    v = rng.normal(size=(B, Hkv, Tk, D)) * scale
    return q, k, v


def naive_attention(q, k, v, causal, mask=None):
    """One query at a time: w_j = exp(s_j) / Σ exp(s), s_j = q·k_j/√D + mask_j, out = Σ_j w_j v_j."""
    B, H, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    out = np.zeros_like(q)
    for b in range(B):
        for h in range(H):
            g = h // (H // Hkv)
            for i in range(Tq):
                s = [q[b, h, i] @ k[b, g, j] / math.sqrt(D) for j in range(Tk)]
                s = [sj + (0.0 if mask is None else mask[b, h, i, j]) for j, sj in enumerate(s)]
                if causal:
                    s = [sj if j <= i + Tk - Tq else -math.inf for j, sj in enumerate(s)]
                m = max(s)
                e = [math.exp(sj - m) for sj in s]
                out[b, h, i] = sum(e[j] * v[b, g, j] for j in range(Tk)) / sum(e)
    return out


@SETTINGS
@given(qkv(), st.booleans())
def test_matches_naive_loop(x, causal):
    q, k, v = x
    expected = naive_attention(q, k, v, causal)
    np.testing.assert_allclose(attention(q, k, v, causal=causal), expected, rtol=1e-10, atol=1e-10)


@SETTINGS
@given(qkv(), st.integers(0, 2**32 - 1))
def test_matches_naive_loop_with_additive_and_boolean_masks(x, seed):
    q, k, v = x
    B, H, Tq, _ = q.shape
    Tk = k.shape[2]
    rng = np.random.default_rng(seed)
    additive = rng.normal(size=(B, H, Tq, Tk)) * 2
    np.testing.assert_allclose(attention(q, k, v, causal=False, mask=additive),
                               naive_attention(q, k, v, False, additive), rtol=1e-10, atol=1e-10)
    keep = rng.random((B, 1, 1, Tk)) < 0.7
    keep[..., 0] = True  # every query keeps at least one key
    as_additive = np.where(np.broadcast_to(keep, (B, H, Tq, Tk)), 0.0, -np.inf)
    np.testing.assert_allclose(attention(q, k, v, causal=False, mask=keep),
                               naive_attention(q, k, v, False, as_additive), rtol=1e-10, atol=1e-10)


@SETTINGS
@given(qkv(), st.booleans())
def test_weight_rows_sum_to_one(x, causal):
    q, k, _ = x
    p = attention_weights(q, k, causal=causal)
    np.testing.assert_allclose(p.sum(-1), 1.0, rtol=1e-12)
    assert np.all(p >= 0)
    if causal:
        assert np.all(p[..., ~causal_mask(q.shape[2], k.shape[2])] == 0)


@SETTINGS
@given(qkv(equal_t=True), st.integers(0, 2**32 - 1), st.data())
def test_causal_outputs_ignore_later_tokens(x, seed, data):
    q, k, v = x
    T = q.shape[2]
    t = data.draw(st.integers(0, T - 1))  # tokens after t change
    rng = np.random.default_rng(seed)
    q2, k2, v2 = q.copy(), k.copy(), v.copy()
    q2[:, :, t + 1:] = rng.normal(size=q2[:, :, t + 1:].shape) * 10
    k2[:, :, t + 1:] = rng.normal(size=k2[:, :, t + 1:].shape) * 10
    v2[:, :, t + 1:] = rng.normal(size=v2[:, :, t + 1:].shape) * 10
    a, b = attention(q, k, v, causal=True), attention(q2, k2, v2, causal=True)
    np.testing.assert_array_equal(a[:, :, :t + 1], b[:, :, :t + 1])


@SETTINGS
@given(qkv(), st.booleans())
def test_grouped_query_equals_multi_head_with_repeated_kv(x, causal):
    q, k, v = x
    rep = q.shape[1] // k.shape[1]
    mha = attention(q, np.repeat(k, rep, axis=1), np.repeat(v, rep, axis=1), causal=causal)
    np.testing.assert_allclose(attention(q, k, v, causal=causal), mha, rtol=1e-13, atol=1e-13)


@SETTINGS
@given(qkv(), st.randoms(use_true_random=False))
def test_permuting_keys_and_values_together_changes_nothing(x, random):
    q, k, v = x
    perm = list(range(k.shape[2]))
    random.shuffle(perm)
    np.testing.assert_allclose(attention(q, k[:, :, perm], v[:, :, perm], causal=False),
                               attention(q, k, v, causal=False), rtol=1e-10, atol=1e-12)


@SETTINGS
@given(qkv(scale=100.0), st.booleans())
def test_finite_for_logits_of_magnitude_1e4(x, causal):
    q, k, v = x  # entries ~100, so the scores q·k/√D are ~1e4: exp of them would overflow without the max shift
    rep = q.shape[1] // k.shape[1]
    scores = q @ np.swapaxes(np.repeat(k, rep, axis=1), -1, -2) / math.sqrt(q.shape[-1])
    assume(np.abs(scores).max() > 1e3)
    p = attention_weights(q, k, causal=causal)
    assert np.all(np.isfinite(p)) and np.all(np.isfinite(attention(q, k, v, causal=causal)))
    np.testing.assert_allclose(p.sum(-1), 1.0, rtol=1e-12)
    expected = naive_attention(q, k, v, causal)
    np.testing.assert_allclose(attention(q, k, v, causal=causal), expected, rtol=1e-9, atol=1e-9)


def test_short_query_is_aligned_to_the_end():
    """Decoding with a cache: 2 queries over 5 keys are positions 3 and 4."""
    rng = np.random.default_rng(0)
    q, k, v = rng.normal(size=(1, 2, 5, 4)), rng.normal(size=(1, 1, 5, 4)), rng.normal(size=(1, 1, 5, 4))
    full = attention(q, k, v, causal=True)
    np.testing.assert_allclose(attention(q[:, :, 3:], k, v, causal=True), full[:, :, 3:], rtol=1e-14)
    np.testing.assert_array_equal(causal_mask(2, 5), [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])


def test_shape_errors():
    q, k = np.zeros((1, 3, 2, 4)), np.zeros((1, 2, 2, 4))
    with pytest.raises(ValueError, match="multiple"):
        attention(q, k, k)
    with pytest.raises(ValueError, match="more queries"):
        attention(np.zeros((1, 2, 3, 4)), k, k, causal=True)
