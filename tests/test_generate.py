"""Generation in the engine: fixtures, the exact sampling distribution, seeds, stop strings, streaming, bad input."""
from __future__ import annotations

import _thread
import json
import shutil
import signal
import threading
import time

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import candlewick as cw
from candlewick import _native
from candlewick.reference.functional import log_softmax
from candlewick.reference.generate import sampling_probs as ref_sampling_probs
from conftest import DATA

DECODERS = ["gpt2-tiny", "llama-tiny", "qwen2-tiny"]


@pytest.fixture(scope="module")
def models():
    return {name: cw.load(DATA / name) for name in DECODERS}


@pytest.mark.parametrize("name", DECODERS)
def test_greedy_reproduces_fixture_tokens(models, name):
    r = np.load(DATA / name / "reference.npz")
    prompts = [r[f"prompt{i}_ids"] for i in range(4)]
    batch = models[name].generate(prompts, max_new_tokens=12, temperature=0, ignore_eos=True)
    for i in range(4):
        alone = models[name].generate(prompts[i], max_new_tokens=12, temperature=0, ignore_eos=True)
        assert alone.choices[0].token_ids == list(r[f"prompt{i}_greedy"])
        assert batch[i].choices[0].token_ids == list(r[f"prompt{i}_greedy"])
        assert alone.choices[0].finish_reason == "length"
        assert alone.usage.prompt_tokens == len(prompts[i]) and alone.usage.completion_tokens == 12


# ---- the sampling distribution ----------------------------------------------------------------------------------

params_strategy = st.fixed_dictionaries(
    {},
    optional={
        "temperature": st.sampled_from([0.0, 0.3, 0.7, 1.0, 1.5]),
        "top_k": st.integers(0, 12),
        "top_p": st.floats(0.05, 1.0),
        "min_p": st.floats(0.0, 0.5),
        "repetition_penalty": st.floats(0.5, 2.0),
        "presence_penalty": st.floats(-1.0, 1.0),
        "frequency_penalty": st.floats(-1.0, 1.0),
        "logit_bias": st.dictionaries(st.integers(0, 9), st.floats(-5, 5), max_size=3),
    },
)


@settings(max_examples=300, deadline=None)
@given(
    logits=st.lists(st.floats(-20, 20, width=32), min_size=10, max_size=10),
    prompt=st.lists(st.integers(0, 9), max_size=6),
    generated=st.lists(st.integers(0, 9), max_size=6),
    params=params_strategy,
)
def test_processed_distribution_equals_reference(logits, prompt, generated, params):
    x = np.array(logits, dtype=np.float32)
    got = _native.sampling_probs(x, prompt, generated, params)
    want = ref_sampling_probs(x.astype(np.float64), prompt_ids=prompt, generated_ids=generated, **params)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


# chi-square critical value for 9 degrees of freedom at p = 0.001
CHI2_9_999 = 27.877


@pytest.mark.parametrize("params", [{}, {"temperature": 0.7}, {"top_k": 6, "top_p": 0.9}, {"min_p": 0.05}])
def test_draws_follow_the_distribution(params):
    x = np.log(np.array([0.02, 0.2, 0.05, 0.13, 0.1, 0.01, 0.25, 0.04, 0.15, 0.05], dtype=np.float32))
    probs = ref_sampling_probs(x.astype(np.float64), **params)
    draws = np.array(_native.sample_tokens(x, 1234, 20_000, params))
    counts = np.bincount(draws, minlength=10)
    assert counts[probs == 0].sum() == 0  # removed tokens are never drawn
    kept = probs > 0
    expected = 20_000 * probs[kept]
    chi2 = ((counts[kept] - expected) ** 2 / expected).sum()
    assert chi2 < CHI2_9_999, (chi2, counts, expected)
    # a distribution it is not: shifting the mass is detected
    wrong = np.roll(probs[kept], 1)
    assert ((counts[kept] - 20_000 * wrong) ** 2 / (20_000 * wrong)).sum() > CHI2_9_999


# ---- seeds, batches, streams, choices ----------------------------------------------------------------------------

SAMPLE = dict(max_new_tokens=24, temperature=0.9, top_p=0.95, ignore_eos=True)


@pytest.mark.parametrize("name", ["gpt2-tiny", "llama-tiny"])
def test_same_seed_same_tokens_everywhere(models, name):
    m = models[name]
    alone = m.generate("Hello there", seed=7, **SAMPLE).choices[0]
    again = m.generate("Hello there", seed=7, **SAMPLE).choices[0]
    batched = m.generate(["A much longer prompt than the other one", "Hello there", "x"], seed=7, **SAMPLE)[1]
    choices = m.generate("Hello there", seed=7, n=3, **SAMPLE).choices
    streamed = "".join(m.stream("Hello there", seed=7, **SAMPLE))
    assert again.token_ids == alone.token_ids
    assert batched.choices[0].token_ids == alone.token_ids
    assert choices[0].token_ids == alone.token_ids
    assert streamed == alone.text
    assert len({tuple(c.token_ids) for c in choices}) == 3  # n choices are independent
    assert m.generate("Hello there", seed=8, **SAMPLE).choices[0].token_ids != alone.token_ids


@settings(max_examples=10, deadline=None)
@given(data=st.data())
def test_ragged_batch_equals_each_alone(models, data):
    m = models[data.draw(st.sampled_from(DECODERS))]
    vocab = m.config["vocab_size"]
    prompts = data.draw(st.lists(st.lists(st.integers(3, vocab - 1), min_size=1, max_size=20), min_size=2, max_size=4))
    params = dict(max_new_tokens=8, seed=data.draw(st.integers(0, 2**32)), temperature=data.draw(st.sampled_from([0.0, 1.0])))
    batch = m.generate(prompts, **params)
    for p, c in zip(prompts, batch):
        alone = m.generate(p, **params)
        assert c.choices[0].token_ids == alone.choices[0].token_ids
        assert c.choices[0].text == alone.choices[0].text


# ---- stopping -------------------------------------------------------------------------------------------------------


def test_stop_strings_across_token_boundaries(models):
    m = models["gpt2-tiny"]
    tok = m.tokenizer
    base = m.generate("The license", seed=3, **SAMPLE).choices[0]
    # a stop string that starts inside one token's text and ends inside a later one
    pieces = [tok.decode([t]) for t in base.token_ids]
    lengths = np.cumsum([len(p) for p in pieces])
    k = next(i for i in range(2, len(pieces)) if len(pieces[i - 1]) >= 2 and len(pieces[i]) >= 1 and "\ufffd" not in pieces[i - 1] + pieces[i])
    start = lengths[k - 1] - 2
    stop = base.text[start : lengths[k - 1] + 1]
    assert len(stop) == 3 and base.text.find(stop) == start
    got = m.generate("The license", seed=3, stop=[stop, "never-appears"], **SAMPLE).choices[0]
    assert got.finish_reason == "stop"
    assert got.text == base.text[:start]
    streamed = list(m.stream("The license", seed=3, stop=stop, **SAMPLE))
    assert "".join(streamed) == got.text
    assert all(stop not in p for p in streamed)
    # not even a partial stop string leaks at the end of the stream
    assert not any(got.text.endswith(stop[:i]) and not base.text[:start].endswith(stop[:i]) for i in range(1, 3))


@pytest.mark.parametrize("name", DECODERS)
def test_every_declared_eos_stops(models, name, tmp_path):
    r = np.load(DATA / name / "reference.npz")
    greedy = [int(t) for t in r["prompt1_greedy"]]
    d = tmp_path / name
    shutil.copytree(DATA / name, d)
    # declare the 5th greedy token an extra EOS (generation_config.json may list several)
    cfg = json.loads((d / "config.json").read_text())
    eos = cfg["eos_token_id"] if isinstance(cfg["eos_token_id"], list) else [cfg["eos_token_id"]]
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": eos + [greedy[4]]}))
    m = cw.load(d)
    assert greedy[4] in m.tokenizer.eos_token_ids
    out = m.generate(r["prompt1_ids"], max_new_tokens=12, temperature=0).choices[0]
    stop_at = greedy.index(greedy[4])
    assert out.token_ids == greedy[: stop_at + 1] and out.finish_reason == "stop"
    assert "".join(m.stream(r["prompt1_ids"], max_new_tokens=12, temperature=0)) == out.text
    # stop_token_ids does the same without a config, and ignore_eos turns EOS off
    m0 = models[name]
    assert m0.generate(r["prompt1_ids"], max_new_tokens=12, temperature=0, stop_token_ids=[greedy[4]]).choices[0].token_ids == out.token_ids
    assert len(m.generate(r["prompt1_ids"], max_new_tokens=12, temperature=0, ignore_eos=True).choices[0].token_ids) == 12


def test_max_new_tokens_is_capped_by_the_context(models):
    m = models["gpt2-tiny"]  # context 128
    out = m.generate(list(range(100, 220)), max_new_tokens=50, temperature=0, ignore_eos=True).choices[0]
    assert len(out.token_ids) == 8 and out.finish_reason == "length"
    with pytest.raises(cw.InvalidArgument, match="no room.*128"):
        m.generate(list(range(128)), max_new_tokens=5)


def test_logprobs_are_raw_log_softmax(models):
    m = models["llama-tiny"]
    prompt = m.tokenizer.encode("Hello")
    c = m.generate(prompt, max_new_tokens=6, seed=11, temperature=0.8, top_k=5, logprobs=3).choices[0]
    assert len(c.logprobs) == 6
    for i, lp in enumerate(c.logprobs):
        want = log_softmax(m.logits(prompt + c.token_ids[:i])[-1].astype(np.float64))
        assert lp.token_id == c.token_ids[i]
        assert lp.logprob == pytest.approx(want[lp.token_id], abs=1e-4)
        top_ids = [t for t, _ in lp.top_logprobs]
        assert top_ids == list(np.argsort(-want, kind="stable")[:3])
        np.testing.assert_allclose([v for _, v in lp.top_logprobs], want[top_ids], atol=1e-4)


def test_stream_can_be_closed_early(models):
    m = models["llama-tiny"]
    it = m.stream("Hello", max_new_tokens=200, seed=1, ignore_eos=True)
    first = next(it)
    it.close()
    assert first == m.generate("Hello", max_new_tokens=200, seed=1, ignore_eos=True).text[: len(first)]
    with pytest.raises(StopIteration):
        next(it)


def test_chat_applies_the_template(models):
    m = models["qwen2-tiny"]
    msgs = [{"role": "user", "content": "Hi!"}]
    c = m.chat(msgs, max_new_tokens=5, seed=2)
    ids = m.tokenizer.encode(m.tokenizer.apply_chat_template(msgs), add_special_tokens=False)
    assert c.prompt_token_ids == ids
    assert c.choices[0].token_ids == m.generate(ids, max_new_tokens=5, seed=2).choices[0].token_ids


def test_ctrl_c_interrupts_generation(models):
    m = models["llama-tiny"]
    # Ctrl-C every 0.3 s until one lands: a single one can arrive inside a finalizer (a TextStream's __del__ run
    # by the garbage collector), where Python reports and drops exceptions, as it would for a real Ctrl-C.
    # Python's own SIGINT handler for the duration: a process started in the background (`cmd &`) inherits SIGINT
    # ignored, and then interrupt_main() does nothing at all
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    stop = threading.Event()

    def press():
        while not stop.wait(0.3):
            _thread.interrupt_main()

    presser = threading.Thread(target=press, daemon=True)
    presser.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            for _ in range(1000):  # each call is short; the interrupt must land inside one of them
                m.generate("Hello", max_new_tokens=250, n=16, seed=1, ignore_eos=True)
    finally:
        stop.set()
        presser.join()
        try:
            time.sleep(0.05)  # a Ctrl-C pressed just before the stop lands here, not in the next test
        except KeyboardInterrupt:
            pass
        signal.signal(signal.SIGINT, previous)


# ---- bad input ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "params, match",
    [
        ({"n": 0}, "n must be in 1..=128"),
        ({"temperature": -0.5}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"min_p": 2.0}, "min_p"),
        ({"logit_bias": {5000: 1.0}}, "5000"),
        ({"logit_bias": {-1: 1.0}}, "-1"),
        ({"max_new_tokens": -1}, "max_new_tokens"),
        ({"temperature": "hot"}, "temperature"),
        ({"stop_token_ids": [99999]}, "99999"),
    ],
)
def test_bad_generation_parameters(models, params, match):
    with pytest.raises(cw.InvalidArgument, match=match):
        models["llama-tiny"].generate("Hello", **params)


def test_bad_prompts(models, tmp_path):
    with pytest.raises(cw.InvalidArgument, match="1024"):
        models["llama-tiny"].generate([5, 1024])
    with pytest.raises(cw.InvalidArgument, match="n == 1"):
        next(models["llama-tiny"].stream("Hello", n=2))
    with pytest.raises(TypeError, match="temprature"):
        next(models["llama-tiny"].stream("Hello", temprature=2))
    # an empty prompt starts from BOS where the model has one...
    assert models["llama-tiny"].generate([], max_new_tokens=2, seed=0).prompt_token_ids == [0]
    # ...and is an error where it has none
    d = tmp_path / "nobos"
    shutil.copytree(DATA / "gpt2-tiny", d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["bos_token_id"] = None
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(cw.InvalidArgument, match="empty.*BOS"):
        cw.load(d).generate("")


def test_stream_reports_its_completion(models):
    """A finished stream holds what generate returns: token ids, finish reason, usage."""
    m = models["gpt2-tiny"]
    params = dict(max_new_tokens=12, seed=5, temperature=0.9)
    want = m.generate("Hello there", **params)
    with m.stream("Hello there", **params) as s:
        assert s.completion is None
        text = "".join(s)
    c = s.completion
    assert text == want.text == c.text
    assert c.choices[0].token_ids == want.choices[0].token_ids
    assert c.choices[0].finish_reason == want.choices[0].finish_reason
    assert (c.usage.prompt_tokens, c.usage.completion_tokens) == (want.usage.prompt_tokens, want.usage.completion_tokens)
