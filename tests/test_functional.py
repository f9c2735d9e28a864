"""candlewick.reference.functional: each op against its formula, known values and transformers' numbers."""
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from candlewick.reference import functional as F

floats = st.floats(-30, 30, allow_nan=False)


def test_softmax_known_values():
    p = F.softmax([1.0, 2.0, 3.0])
    e = np.exp([1.0, 2.0, 3.0])
    np.testing.assert_allclose(p, e / e.sum(), rtol=1e-15)
    assert p.dtype == np.float64
    np.testing.assert_allclose(F.softmax([[0.0, 0.0], [1000.0, 1000.0]], axis=-1), [[0.5, 0.5], [0.5, 0.5]])
    np.testing.assert_allclose(F.softmax([[1.0, 3.0], [1.0, 3.0]], axis=0), [[0.5, 0.5], [0.5, 0.5]])


@settings(max_examples=60, deadline=None)
@given(arrays(np.float64, (3, 7), elements=floats))
def test_log_softmax_is_log_of_softmax(x):
    np.testing.assert_allclose(F.log_softmax(x), np.log(F.softmax(x)), atol=1e-12)
    np.testing.assert_allclose(np.exp(F.logsumexp(x)), np.exp(x).sum(-1), rtol=1e-12)


def test_logsumexp_huge_and_minus_inf():
    assert F.logsumexp([1e308, 1e308]) == pytest.approx(1e308 + math.log(2))
    assert F.logsumexp([-np.inf, -np.inf]) == -np.inf
    assert F.logsumexp([-np.inf, 0.0]) == 0.0


def test_layer_norm_against_formula():
    rng = np.random.default_rng(0)
    x, w, b = rng.normal(size=(2, 5, 8)) * 3 + 1, rng.normal(size=8), rng.normal(size=8)
    y = F.layer_norm(x, w, b, eps=1e-5)
    mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    np.testing.assert_allclose(y, (x - mu) / np.sqrt(var + 1e-5) * w + b, rtol=1e-13)
    z = F.layer_norm(x, None, None, eps=0.0)
    np.testing.assert_allclose(z.mean(-1), 0, atol=1e-14)
    np.testing.assert_allclose(z.std(-1), 1, rtol=1e-12)


def test_rms_norm_against_formula():
    rng = np.random.default_rng(1)
    x, w = rng.normal(size=(3, 16)), rng.normal(size=16)
    y = F.rms_norm(x, w, eps=1e-6)
    np.testing.assert_allclose(y, w * x / np.sqrt((x**2).mean(-1, keepdims=True) + 1e-6), rtol=1e-13)
    np.testing.assert_allclose(np.sqrt((F.rms_norm(x, None, eps=0.0) ** 2).mean(-1)), 1.0, rtol=1e-13)


def test_gelu_known_values():
    # Φ(1) = 0.841344746068543; the tanh form at 1 is 0.841191990607...; gelu(0) = 0, gelu(-x) = gelu(x) - x
    assert F.gelu(1.0, approximate="none") == pytest.approx(0.8413447460685429, abs=1e-15)
    assert F.gelu(1.0, approximate="tanh") == pytest.approx(0.8411919906082768, abs=1e-15)
    x = np.linspace(-6, 6, 41)
    for mode in ("none", "tanh"):
        np.testing.assert_allclose(F.gelu(-x, approximate=mode), F.gelu(x, approximate=mode) - x, atol=1e-14)
    assert np.abs(F.gelu(x, "none") - F.gelu(x, "tanh")).max() < 1e-3  # the approximation is close, not equal
    with pytest.raises(ValueError):
        F.gelu(x, approximate="fast")


def test_silu_and_sigmoid():
    x = np.array([-1000.0, -2.0, 0.0, 2.0, 1000.0])
    np.testing.assert_allclose(F.sigmoid(x), [0.0, 1 / (1 + math.e**2), 0.5, 1 / (1 + math.e**-2), 1.0], rtol=1e-15)
    np.testing.assert_allclose(F.silu(x), x * F.sigmoid(x), rtol=1e-15)
    assert np.all(np.isfinite(F.silu(x)))


def test_linear_uses_pytorch_layout():
    x, w, b = np.arange(6.0).reshape(2, 3), np.arange(12.0).reshape(4, 3), np.ones(4)
    np.testing.assert_array_equal(F.linear(x, w, b), x @ w.T + 1)


# --- RoPE ---------------------------------------------------------------------------------------------------------

def test_rope_inv_freq_default():
    np.testing.assert_allclose(F.rope_inv_freq(8, 10000.0), [1.0, 0.1, 0.01, 0.001], rtol=1e-15)


# transformers' _compute_llama3_parameters / _compute_linear_scaling_rope_parameters for head_dim 64; transformers
# computes them from float32 exponents, hence the 1e-6 relative tolerance (a wrong formula is off by > 1e-2).
HF_LLAMA3 = [1.0, 0.663601279, 0.440366626, 0.292227834, 0.193922758, 0.128687382, 0.0853971019, 0.0566696189,
             0.0376060307, 0.0249554086, 0.0165604409, 0.0109895291, 0.00729266508, 0.00483942125, 0.00321144611,
             0.00137189368, 0.000524846022, 0.000178507791, 7.78465546e-05, 5.16590699e-05, 3.42810235e-05,
             2.2748929e-05, 1.50962178e-05, 1.00178686e-05, 6.64786967e-06, 4.41153452e-06, 2.92749974e-06,
             1.94269251e-06, 1.28917316e-06, 8.55496921e-07, 5.6770881e-07, 3.7673226e-07]
HF_LINEAR4 = [0.25, 0.18747355, 0.140585333, 0.105424128, 0.079056941, 0.0592843406, 0.0444569848, 0.0333380364,
              0.0250000004, 0.0187473539, 0.0140585322, 0.0105424123, 0.00790569466, 0.00592843397, 0.00444569858,
              0.00333380373, 0.00249999994, 0.00187473558, 0.00140585331, 0.00105424121, 0.000790569466,
              0.000592843455, 0.000444569858, 0.000333380362, 0.000250000012, 0.000187473546, 0.000140585325,
              0.000105424122, 7.90569466e-05, 5.92843462e-05, 4.44569851e-05, 3.33380376e-05]


def test_rope_inv_freq_llama3_matches_transformers():
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    got = F.rope_inv_freq(64, 500000.0, scaling)
    np.testing.assert_allclose(got, HF_LLAMA3, rtol=1e-6)
    plain = F.rope_inv_freq(64, 500000.0)
    wavelen = 2 * np.pi / plain
    np.testing.assert_array_equal(got[wavelen < 8192 / 4], plain[wavelen < 8192 / 4])     # high frequencies kept
    np.testing.assert_allclose(got[wavelen > 8192], plain[wavelen > 8192] / 8, rtol=1e-15)  # low ones / factor


def test_rope_inv_freq_linear_matches_transformers():
    np.testing.assert_allclose(F.rope_inv_freq(64, 10000.0, {"rope_type": "linear", "factor": 4.0}), HF_LINEAR4,
                               rtol=1e-6)
    np.testing.assert_allclose(F.rope_inv_freq(64, 10000.0, {"type": "linear", "factor": 4.0}), HF_LINEAR4, rtol=1e-6)
    with pytest.raises(NotImplementedError, match="dynamic"):  # yarn is implemented now; dynamic is refused
        F.rope_inv_freq(64, 10000.0, {"rope_type": "dynamic", "factor": 4.0})


def test_rope_rotates_pairs_by_position_times_frequency():
    D = 8
    x = np.random.default_rng(2).normal(size=(1, 1, 3, D))
    y = F.rope(x, [0, 1, 5], theta=100.0)
    np.testing.assert_array_equal(y[..., 0, :], x[..., 0, :])  # position 0 is not turned
    angle = 5 * F.rope_inv_freq(D, 100.0)[1]
    x1, x2 = x[0, 0, 2, 1], x[0, 0, 2, 1 + D // 2]  # pair (i, i + D/2), i = 1
    assert y[0, 0, 2, 1] == pytest.approx(x1 * math.cos(angle) - x2 * math.sin(angle), abs=1e-15)
    assert y[0, 0, 2, 1 + D // 2] == pytest.approx(x2 * math.cos(angle) + x1 * math.sin(angle), abs=1e-15)
    np.testing.assert_allclose(np.linalg.norm(y, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-14)


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 500), st.integers(0, 500), st.integers(0, 500))
def test_rope_scores_depend_only_on_relative_position(i, j, shift):
    rng = np.random.default_rng(i * 1000 + j)
    q, k = rng.normal(size=(1, 1, 1, 16)), rng.normal(size=(1, 1, 1, 16))
    a = (F.rope(q, [i]) * F.rope(k, [j])).sum()
    b = (F.rope(q, [i + shift]) * F.rope(k, [j + shift])).sum()
    assert a == pytest.approx(b, abs=1e-9)


def test_rope_linear_scaling_is_squeezed_positions():
    x = np.random.default_rng(3).normal(size=(2, 2, 4, 8))
    np.testing.assert_allclose(F.rope(x, [0, 4, 8, 12], scaling={"rope_type": "linear", "factor": 4.0}),
                               F.rope(x, [0, 1, 2, 3]), atol=1e-14)
    batch_positions = np.array([[0, 1, 2, 3], [4, 8, 12, 16]])  # [B, T]
    y = F.rope(x, batch_positions)
    np.testing.assert_allclose(y[1], F.rope(x[1:], [4, 8, 12, 16])[0], atol=1e-15)
