"""Properties of reference cross-entropy, KL divergence and perplexity."""
import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from candlewick.reference import functional as F
from candlewick.reference import load

SETTINGS = settings(max_examples=80, deadline=None)
DATA = Path(__file__).parent / "data"


@st.composite
def logits_targets(draw, magnitude=20.0):
    N, V = draw(st.integers(1, 6)), draw(st.integers(2, 12))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    return rng.normal(size=(N, V)) * magnitude, rng.integers(0, V, size=N)


def naive_lse(row):
    m = max(row)
    return m + math.log(sum(math.exp(x - m) for x in row))


@SETTINGS
@given(logits_targets())
def test_equals_logsumexp_minus_target_logit(xy):
    x, y = xy
    expected = [naive_lse(row) - row[t] for row, t in zip(x, y)]
    np.testing.assert_allclose(F.cross_entropy(x, y, reduction="none"), expected, rtol=1e-12, atol=1e-12)
    assert F.cross_entropy(x, y) == pytest.approx(np.mean(expected), rel=1e-12, abs=1e-12)
    assert F.cross_entropy(x, y, reduction="sum") == pytest.approx(np.sum(expected), rel=1e-12, abs=1e-12)


@SETTINGS
@given(logits_targets())
def test_non_negative_and_equals_minus_log_softmax(xy):
    x, y = xy
    ce = F.cross_entropy(x, y, reduction="none")
    assert np.all(ce >= 0)
    np.testing.assert_allclose(ce, -F.log_softmax(x)[np.arange(len(y)), y], rtol=1e-12, atol=1e-13)
    p = F.softmax(x)[np.arange(len(y)), y]
    np.testing.assert_allclose(np.exp(-ce), p, rtol=1e-9, atol=1e-300)


@SETTINGS
@given(logits_targets(), st.data())
def test_ignored_rows_contribute_nothing(xy, data):
    x, y = xy
    ignored = np.array(data.draw(st.lists(st.booleans(), min_size=len(y), max_size=len(y))))
    y_masked = np.where(ignored, -100, y)
    ce = F.cross_entropy(x, y_masked, reduction="none")
    assert np.all(ce[ignored] == 0)
    np.testing.assert_array_equal(ce[~ignored], F.cross_entropy(x[~ignored], y[~ignored], reduction="none"))
    if ignored.all():
        assert math.isnan(F.cross_entropy(x, y_masked))
    else:
        assert F.cross_entropy(x, y_masked) == pytest.approx(ce[~ignored].mean(), rel=1e-14)
        assert F.cross_entropy(x, y_masked, reduction="sum") == pytest.approx(ce.sum(), rel=1e-14)
    V = x.shape[1]  # any ignore_index works, here one past the vocabulary
    np.testing.assert_array_equal(F.cross_entropy(x, np.where(ignored, V, y), ignore_index=V, reduction="none"), ce)


@SETTINGS
@given(logits_targets(), st.floats(-1e6, 1e6))
def test_shift_invariant(xy, c):
    x, y = xy
    np.testing.assert_allclose(F.cross_entropy(x + c, y, reduction="none"), F.cross_entropy(x, y, reduction="none"),
                               atol=1e-8 + 1e-15 * abs(c))


@SETTINGS
@given(logits_targets(magnitude=1e300))
def test_finite_for_huge_logits(xy):
    x, y = xy
    ce = F.cross_entropy(x, y, reduction="none")
    assert np.all(np.isfinite(ce)) and np.all(ce >= 0)
    top = x.argmax(-1)
    assert np.all(ce[y == top] == 0)


@st.composite
def two_logits(draw):
    N, V = draw(st.integers(1, 6)), draw(st.integers(2, 12))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    p = rng.normal(size=(N, V)) * 5
    q = np.where(rng.random((N, 1)) < 0.3, p, rng.normal(size=(N, V)) * 5)  # some rows equal
    return p, q


@SETTINGS
@given(two_logits())
def test_kl_non_negative_and_zero_only_for_equal_distributions(pq):
    p, q = pq
    kl = F.kl_divergence(p, q)
    assert kl.shape == (len(p),) and np.all(kl >= 0)
    same = np.all(p == q, axis=-1)
    assert np.all(kl[same] == 0)
    np.testing.assert_allclose(F.kl_divergence(p, p + 3.0), 0.0, atol=1e-14)  # same distribution, shifted logits
    differs = np.abs(F.softmax(p) - F.softmax(q)).max(-1) > 1e-6
    assert np.all(kl[differs] > 0)
    expected = (F.softmax(p) * (F.log_softmax(p) - F.log_softmax(q))).sum(-1)
    np.testing.assert_allclose(kl, np.maximum(expected, 0), atol=1e-12)


def test_kl_convention_is_kl_p_given_q():
    p, q = np.log([[0.5, 0.5]]), np.log([[0.9, 0.1]])
    assert F.kl_divergence(p, q)[0] == pytest.approx(0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1))
    assert F.kl_divergence(q, p)[0] == pytest.approx(0.9 * math.log(0.9 / 0.5) + 0.1 * math.log(0.1 / 0.5))


def test_reduction_and_target_errors():
    with pytest.raises(ValueError, match="reduction"):
        F.cross_entropy(np.zeros((1, 3)), [0], reduction="avg")
    with pytest.raises(ValueError, match="outside"):
        F.cross_entropy(np.zeros((1, 3)), [3])
    assert F.cross_entropy(np.zeros((2, 4)), [1, 2]) == pytest.approx(math.log(4), rel=1e-15)


# --- perplexity = exp(mean NLL) on a real model --------------------------------------------------------------------

@pytest.fixture(scope="module")
def llama():
    return load(DATA / "llama-tiny")


@settings(max_examples=10, deadline=None)
@given(st.lists(st.integers(3, 1023), min_size=2, max_size=40))
def test_perplexity_is_exp_mean_nll(llama, ids):
    nll = llama.token_nll(ids)
    assert llama.perplexity(ids) == pytest.approx(math.exp(nll.mean()), rel=1e-12)
    assert llama.perplexity(ids, stride=1) == pytest.approx(math.exp(nll.mean()), rel=1e-12)  # fits one window


def hf_guide_perplexity(model, ids, L, stride):
    """The loop of Hugging Face's perplexity guide, with reference.functional.cross_entropy as the loss."""
    total, count, prev_end = 0.0, 0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + L, len(ids))
        window = ids[begin:end]
        labels = np.array(window)
        labels[: len(window) - (end - prev_end)] = -100  # the guide's target_ids[:, :-trg_len] = -100
        targets = labels[1:]                              # the model shifts: logits t predict label t + 1
        n = int((targets != -100).sum())
        total += F.cross_entropy(model.logits(window)[:-1], targets) * n
        count, prev_end = count + n, end
        if end == len(ids):
            break
    return math.exp(total / count), count


@pytest.mark.parametrize("stride", [64, 128, 256])
def test_perplexity_slides_a_window_past_the_context(llama, stride):
    """Windows of L tokens every `stride`; each scores the tokens the previous one did not."""
    L = llama.config.context_length
    assert L == 256
    ids = [int(i) for i in np.random.default_rng(0).integers(3, 1024, size=L + 100)]
    expected, count = hf_guide_perplexity(llama, ids, L, stride)
    assert count == len(ids) - 1 if stride < L else len(ids) - 2  # disjoint windows skip each window's first
    assert llama.perplexity(ids, stride=stride) == pytest.approx(expected, rel=1e-12)


def test_perplexity_default_stride_is_half_the_context(llama):
    ids = [int(i) for i in np.random.default_rng(1).integers(3, 1024, size=300)]
    assert llama.perplexity(ids) == llama.perplexity(ids, stride=128)
    assert llama.perplexity(ids, stride=256) != pytest.approx(llama.perplexity(ids), rel=1e-9)
    with pytest.raises(ValueError, match="stride"):
        llama.perplexity(ids, stride=257)
