"""The scheduler (candlewick._native.Engine): many requests in one running batch, chunked prompts, the paged KV
cache with prefix caching and preemption. Every output is compared with the same request run alone."""
from __future__ import annotations

import random

import pytest

import candlewick as cw
from candlewick import _native
from conftest import DATA

SYSTEM = list(range(3, 40))  # a shared prefix (a system prompt) of 37 tokens: two whole blocks and a part


@pytest.fixture(scope="module")
def llama():
    return cw.load(DATA / "llama-tiny")


def requests(n: int, seed: int = 0) -> list[tuple[list[int], dict]]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        prompt = (SYSTEM if i % 2 == 0 else []) + [rng.randrange(3, 200) for _ in range(rng.randrange(1, 30))]
        params = dict(max_new_tokens=rng.randrange(1, 20), seed=i, ignore_eos=True,
                      temperature=0.0 if i % 3 == 0 else 1.0, top_k=[0, 5][i % 2], n=1 + (i % 4 == 1))
        out.append((prompt, params))
    return out


def run(engine, reqs, abort: set[int] = frozenset()):
    """Add every request, step to the end (aborting those in `abort` after a few steps); returns per request the
    token ids and finish reason of each choice."""
    ids = {}
    for i, (p, params) in enumerate(reqs):
        rid, _ = engine.add(p, params)
        ids[rid] = i
    got: dict[int, dict[int, list]] = {i: {} for i in range(len(reqs))}
    steps = 0
    while engine.has_work():
        steps += 1
        assert steps < 10_000
        if steps == 3:
            for rid, i in ids.items():
                if i in abort:
                    engine.abort(rid)
        for rid, choice, text, toks, lps, finish, *_ in engine.step():
            c = got[ids[rid]].setdefault(choice, [[], None])
            c[0] += toks
            c[1] = finish
    return got


def solo(model, prompt, params):
    return [(ch.token_ids, ch.finish_reason) for ch in model.generate(prompt, **params).choices]


@pytest.mark.parametrize("kv, budget", [(4096, 512), (4096, 7), (160, 16)])
def test_batch_equals_solo(llama, kv, budget):
    """16 requests (a shared system prompt, greedy and seeded, n = 2 for some) through one engine, with room to
    spare, with prompts cut into chunks of at most 7 tokens, and with a KV cache so small (160 positions) that
    sequences are preempted and recomputed: each gives what it gives alone."""
    reqs = requests(16)
    engine = _native.Engine(llama._native, kv_cache_tokens=kv, max_batch_tokens=budget)
    got = run(engine, reqs)
    for i, (p, params) in enumerate(reqs):
        want = solo(llama, p, params)
        assert [(got[i][c][0], got[i][c][1]) for c in range(len(want))] == want, f"request {i}"
    s = engine.stats()
    assert (s["running"], s["waiting"], s["kv_blocks_used"]) == (0, 0, 0), s
    assert s["cached_prompt_tokens"] > 0  # the shared prefix was found in the cache
    assert s["generated_tokens"] == sum(len(c[0]) for g in got.values() for c in g.values())
    if kv == 160:
        assert s["preemptions"] > 0
    if budget == 7:
        assert s["steps"] > max(len(p) for p, _ in reqs) // 7


def test_aborted_requests_free_everything(llama):
    reqs = requests(12, seed=1)
    engine = _native.Engine(llama._native, kv_cache_tokens=1024, max_batch_tokens=32)
    got = run(engine, reqs, abort={0, 3, 5, 8})
    for i, (p, params) in enumerate(reqs):
        if i not in {0, 3, 5, 8}:
            want = solo(llama, p, params)
            assert [(got[i][c][0], got[i][c][1]) for c in range(len(want))] == want
    s = engine.stats()
    assert (s["running"], s["waiting"], s["kv_blocks_used"], s["aborted"]) == (0, 0, 0, 4)


def test_prefix_cache_hits_count_whole_blocks(llama):
    engine = _native.Engine(llama._native, kv_cache_tokens=1024)
    prompt = SYSTEM + [50, 51]
    run(engine, [(prompt, dict(max_new_tokens=2, temperature=0.0))])
    assert engine.stats()["cached_prompt_tokens"] == 0
    run(engine, [(prompt, dict(max_new_tokens=2, temperature=0.0))])
    bs = engine.config["block_size"]
    # every whole block of the prompt but the one holding the last token (computed again for its logits)
    assert engine.stats()["cached_prompt_tokens"] == (len(prompt) - 1) // bs * bs


def test_per_prompt_sampling_params(llama):
    sp = [cw.SamplingParams(max_new_tokens=5, temperature=0.0), cw.SamplingParams(max_new_tokens=3, seed=7, n=2)]
    got = llama.generate([[5, 6, 7], [8, 9]], sampling_params=sp)
    assert [c.token_ids for c in got[0].choices] == [c.token_ids for c in llama.generate([5, 6, 7], max_new_tokens=5, temperature=0.0).choices]
    assert [c.token_ids for c in got[1].choices] == [c.token_ids for c in llama.generate([8, 9], max_new_tokens=3, seed=7, n=2).choices]
    with pytest.raises(cw.InvalidArgument, match="2 for 3 prompts"):
        llama.generate([[1], [2], [3]], sampling_params=sp)


def test_bad_requests_are_refused_by_name(llama):
    engine = _native.Engine(llama._native, kv_cache_tokens=64)
    with pytest.raises(cw.InvalidArgument, match="KV cache holds"):
        engine.add(list(range(3, 100)), dict(max_new_tokens=1))
    with pytest.raises(cw.InvalidArgument, match="out of range"):
        engine.add([10**6], dict(max_new_tokens=1))
    with pytest.raises(cw.InvalidArgument, match="max_batch_tokens"):
        _native.Engine(llama._native, max_batch_tokens=0)
    assert not engine.has_work()


def test_a_failing_sequence_fails_alone(tmp_path):
    """A sequence whose text cannot be made (here: an id past the tokenizer, in an embedding padded by 8 rows,
    pushed by logit_bias) ends with an error on its own delta; the rest of the batch goes on and gets its solo
    result. Generate, which returns one result, raises it naming the prompt."""
    import numpy as np
    from conftest import copy_checkpoint

    def pad(w):
        for k in ("model.embed_tokens.weight", "lm_head.weight"):
            if k in w:
                w[k] = np.concatenate([w[k], np.zeros((8, w[k].shape[1]), w[k].dtype)])
        return w

    folder = copy_checkpoint(DATA / "llama-tiny", tmp_path / "padded",
                             config_edit=lambda c: c.update(vocab_size=c["vocab_size"] + 8), weight_edit=pad)
    model = cw.load(folder)
    bad = model.config["vocab_size"] - 1
    engine = _native.Engine(model._native, kv_cache_tokens=4096, max_batch_tokens=512, max_seqs=8)
    good = dict(max_new_tokens=12, temperature=0.0, ignore_eos=True)
    a, _ = engine.add([5, 6, 7], {**good, "logit_bias": {bad: 100.0}})
    b, _ = engine.add([5, 6, 7, 8], good)
    errors, tokens = {}, {a: [], b: []}
    while engine.has_work():
        for rid, choice, text, toks, lps, finish, prompt_tokens, cached, error in engine.step():
            tokens[rid] += toks
            if error is not None:
                errors[rid] = error
    assert set(errors) == {a} and f"token id {bad}" in errors[a]
    assert tokens[b] == model.generate([5, 6, 7, 8], **good).choices[0].token_ids
    with pytest.raises(cw.CandlewickError, match=f"prompt 0: .*token id {bad}"):
        model.generate([[5, 6, 7], [5, 6, 7, 8]], max_new_tokens=4, logit_bias={bad: 100.0})

    # the server: the failing request gets a 500 (or an error event), the one beside it its result
    import openai
    from concurrent.futures import ThreadPoolExecutor

    from candlewick.server import create_app
    from test_server import KEY, Server

    server = Server(create_app(model, "padded", api_key=KEY))
    try:
        client = server.client()

        def ask(bias):
            return client.completions.create(model="padded", prompt=[5, 6, 7], max_tokens=40, temperature=0,
                                             logit_bias=bias, extra_body={"ignore_eos": True})
        with ThreadPoolExecutor(2) as pool:
            failing, fine = pool.submit(ask, {str(bad): 100}), pool.submit(ask, None)
            with pytest.raises(openai.InternalServerError, match=f"token id {bad}"):
                failing.result()
            assert fine.result().choices[0].text == model.generate([5, 6, 7], max_new_tokens=40, temperature=0,
                                                                   ignore_eos=True).text
        stream = client.completions.create(model="padded", prompt=[5, 6, 7], max_tokens=4, stream=True,
                                           logit_bias={str(bad): 100})
        with pytest.raises(openai.APIError, match=f"token id {bad}"):
            list(stream)
    finally:
        server.stop()
