"""candlewick.reference.generate: each logits processor, their order, sampling and the generation loop."""
import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from candlewick.reference import load
from candlewick.reference.functional import softmax
from candlewick.reference.generate import (apply_logit_bias, apply_min_p, apply_presence_frequency_penalty,
                                           apply_repetition_penalty, apply_temperature, apply_top_k, apply_top_p,
                                           generate, process_logits, sample, sampling_probs)

DATA = Path(__file__).parent / "data"
NEG = -np.inf


def test_repetition_penalty_divides_positive_and_multiplies_negative():
    x = np.array([2.0, -2.0, 3.0, -1.0])
    np.testing.assert_array_equal(apply_repetition_penalty(x, [0, 1, 1, 0], 2.0), [1.0, -4.0, 3.0, -1.0])
    np.testing.assert_array_equal(apply_repetition_penalty(x, [0, 1], 1.0), x)


def test_presence_and_frequency_penalties_count_generated_tokens():
    x = np.zeros(4)
    got = apply_presence_frequency_penalty(x, [1, 1, 1, 3], presence_penalty=0.5, frequency_penalty=0.25)
    np.testing.assert_allclose(got, [0.0, -(0.25 * 3 + 0.5), 0.0, -(0.25 + 0.5)])


def test_logit_bias_adds_and_accepts_string_keys():
    np.testing.assert_array_equal(apply_logit_bias(np.zeros(3), {"2": 5.0, 0: -1.0}), [-1.0, 0.0, 5.0])
    with pytest.raises(ValueError, match="outside"):
        apply_logit_bias(np.zeros(3), {3: 1.0})


def test_temperature_divides_and_zero_is_argmax():
    np.testing.assert_array_equal(apply_temperature([1.0, 4.0], 2.0), [0.5, 2.0])
    np.testing.assert_array_equal(apply_temperature([1.0, 4.0, 4.0], 0.0), [NEG, 4.0, NEG])  # first max wins


def test_top_k_keeps_ties_at_the_boundary():
    x = np.array([1.0, 3.0, 2.0, 3.0, 2.0])
    np.testing.assert_array_equal(apply_top_k(x, 1), [NEG, 3.0, NEG, 3.0, NEG])
    np.testing.assert_array_equal(apply_top_k(x, 3), [NEG, 3.0, 2.0, 3.0, 2.0])
    np.testing.assert_array_equal(apply_top_k(x, 0), x)
    np.testing.assert_array_equal(apply_top_k(x, 9), x)


def test_top_p_keeps_the_shortest_prefix_reaching_p():
    x = np.log([0.5, 0.1, 0.3, 0.1])
    np.testing.assert_array_equal(np.isfinite(apply_top_p(x, 0.5)), [1, 0, 0, 0])   # 0.5 >= 0.5
    np.testing.assert_array_equal(np.isfinite(apply_top_p(x, 0.6)), [1, 0, 1, 0])   # 0.8
    np.testing.assert_array_equal(np.isfinite(apply_top_p(x, 0.85)), [1, 1, 1, 0])  # 0.9: the lower id of the tie
    np.testing.assert_array_equal(np.isfinite(apply_top_p(x, 1e-9)), [1, 0, 0, 0])  # always one token
    np.testing.assert_array_equal(apply_top_p(x, 1.0), x)


def test_min_p_is_relative_to_the_top_probability():
    x = np.log([0.5, 0.2, 0.05, 0.25])
    np.testing.assert_array_equal(np.isfinite(apply_min_p(x, 0.4)), [1, 1, 0, 1])   # keep p >= 0.2
    np.testing.assert_array_equal(np.isfinite(apply_min_p(x, 0.5)), [1, 0, 0, 1])


def test_min_p_after_top_k_keeps_the_intersection():
    """min_p compares with the largest probability, a ratio, so renormalising after top-k changes nothing: the
    kept set is what both filters keep, and the probabilities are renormalised over it."""
    x = np.log([0.4, 0.3, 0.2, 0.1])
    np.testing.assert_allclose(sampling_probs(x, top_k=2, min_p=0.8), [1.0, 0.0, 0.0, 0.0])  # 0.3 < 0.8 * 0.4
    np.testing.assert_allclose(sampling_probs(x, top_k=2, min_p=0.7), [4 / 7, 3 / 7, 0.0, 0.0], rtol=1e-14)
    np.testing.assert_allclose(sampling_probs(x, top_k=3, min_p=0.4), [4 / 9, 3 / 9, 2 / 9, 0.0], rtol=1e-14)


def test_processors_apply_in_the_documented_order():
    """Penalty before bias, bias before temperature, temperature before the filters."""
    x = np.array([4.0, 3.0, 0.0, -1.0])
    got = process_logits(x, prompt_ids=[0], generated_ids=[1, 1], repetition_penalty=2.0, frequency_penalty=0.5,
                         presence_penalty=0.25, logit_bias={3: 10.0}, temperature=2.0, top_k=2)
    # 1: [2, 1.5, 0, -1]; 2: token 1 -= 0.5*2 + 0.25 -> 0.25; 3: token 3 += 10 -> 9; 4: / 2; 5: top 2 -> ids 3, 0
    np.testing.assert_allclose(got, [1.0, NEG, NEG, 4.5])
    greedy = process_logits(x, prompt_ids=[0], generated_ids=[], repetition_penalty=4.0, temperature=0.0, top_k=1)
    np.testing.assert_array_equal(greedy, [NEG, 3.0, NEG, NEG])  # 4 / 4 = 1 < 3: the penalty came first


@settings(max_examples=50, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(0, 8), st.floats(0.05, 1.0), st.floats(0.0, 1.0), st.floats(0.1, 3.0))
def test_sampling_probs_is_a_distribution_over_kept_tokens(seed, top_k, top_p, min_p, temperature):
    x = np.random.default_rng(seed).normal(size=12) * 3
    probs = sampling_probs(x, top_k=top_k, top_p=top_p, min_p=min_p, temperature=temperature)
    assert probs.sum() == pytest.approx(1.0, rel=1e-12)
    assert probs[np.argmax(x)] > 0  # the best token survives every filter
    kept = np.isfinite(process_logits(x, top_k=top_k, top_p=top_p, min_p=min_p, temperature=temperature))
    np.testing.assert_array_equal(probs > 0, kept)
    np.testing.assert_allclose(probs[kept], softmax(x[kept] / temperature), rtol=1e-12)  # renormalised over the kept


def test_sample_is_the_inverse_cdf_of_one_uniform_draw():
    probs = np.array([0.2, 0.0, 0.5, 0.3])
    u = np.random.default_rng(7).random()
    expected = int(np.argmax(np.cumsum(probs) > u))
    assert sample(probs, np.random.default_rng(7)) == expected
    counts = np.bincount([sample(probs, np.random.default_rng(s)) for s in range(4000)], minlength=4)
    assert counts[1] == 0
    np.testing.assert_allclose(counts / 4000, probs, atol=0.03)


def toy_model(V=6):
    """next_logits for a fake model: favours (last token + 1) mod V."""
    def next_logits(ids):
        x = np.zeros(V)
        x[(ids[-1] + 1) % V] = 5.0
        return x
    return next_logits


def test_generate_greedy_stops_at_eos_unless_ignored():
    assert generate(toy_model(), [0], temperature=0, max_new_tokens=10, eos_token_ids=[3]) == [1, 2, 3]
    assert generate(toy_model(), [0], temperature=0, max_new_tokens=5, eos_token_ids=[3],
                    ignore_eos=True) == [1, 2, 3, 4, 5]
    assert generate(toy_model(), [0], temperature=0, max_new_tokens=5, eos_token_ids=[3], ignore_eos=True,
                    stop_token_ids=[4]) == [1, 2, 3, 4]
    assert generate(toy_model(), [0], temperature=0, max_new_tokens=5, max_context=3) == [1, 2]


def test_generate_sampling_is_reproducible_from_the_seed():
    def run(seed):
        return generate(toy_model(), [0], temperature=1.5, max_new_tokens=20, rng=np.random.default_rng(seed))
    assert run(1) == run(1)
    assert run(1) != run(2)
    with pytest.raises(ValueError, match="rng"):
        generate(toy_model(), [0], temperature=1.0)


def test_generate_draws_exactly_one_uniform_per_token():
    """The engine can replay a run from the same uniforms: token t = inverse CDF of the t-th rng.random()."""
    us = np.random.default_rng(5).random(8)
    got = generate(toy_model(), [0], temperature=2.0, top_p=0.9, max_new_tokens=8, rng=np.random.default_rng(5))
    seq = [0]
    for u in us:
        p = sampling_probs(toy_model()(seq), generated_ids=seq[1:], temperature=2.0, top_p=0.9)
        seq.append(int(np.searchsorted(np.cumsum(p), u * np.cumsum(p)[-1], side="right")))
    assert got == seq[1:]


def test_invalid_parameters():
    for bad in [dict(temperature=-1), dict(top_p=0.0), dict(top_k=-1), dict(min_p=1.5), dict(repetition_penalty=0)]:
        with pytest.raises(ValueError):
            generate(toy_model(), [0], temperature=bad.pop("temperature", 0), **bad)


def test_model_generate_with_sampling_and_penalties():
    model = load(DATA / "qwen2-tiny")
    prompt = "Hello, my name is"
    a = model.generate(prompt, max_new_tokens=10, temperature=0.8, top_k=50, top_p=0.95, rng=np.random.default_rng(0))
    b = model.generate(prompt, max_new_tokens=10, temperature=0.8, top_k=50, top_p=0.95, rng=np.random.default_rng(0))
    assert a == b and 1 <= len(a) <= 10
    greedy = model.generate(prompt, max_new_tokens=10, temperature=0, ignore_eos=True)
    banned = model.generate(prompt, max_new_tokens=10, temperature=0, ignore_eos=True,
                            logit_bias={greedy[0]: -math.inf})
    assert banned[0] != greedy[0]
    penalised = model.generate(prompt, max_new_tokens=10, temperature=0, ignore_eos=True, frequency_penalty=100.0)
    assert len(set(penalised)) == len(penalised)  # a huge frequency penalty forbids repeats
    assert model.tokenizer.eos_token_ids == [1]
