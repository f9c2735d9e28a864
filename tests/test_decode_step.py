"""Decode steps on the thread team (rust/src/models/decode_step.rs) against the general path: the same tokens and
the same log-probabilities, bit for bit, solo and in batches, greedy and sampled, on every architecture the team
path takes; the others take the general path (and these tests say which is which)."""
from __future__ import annotations

import gguf
import pytest

import candlewick as cw
from candlewick import _native
from conftest import DATA
from gguf_util import write_llama_gguf

Q = gguf.GGMLQuantizationType
# the blocks the team path covers: RMSNorm, sequential residuals, a SiLU-gated MLP (Gemma 3's sandwich norms and
# GELU, GPT-NeoX's parallel residual and LayerNorm, GPT-2's learned positions take the general path)
TEAM = ["llama-tiny", "qwen2-tiny", "qwen3-tiny", "phi3-tiny", "llama3-rope-tiny", "mistral-sw-tiny", "smollm3-tiny"]
GENERAL = ["gemma3-tiny", "gptneox-tiny", "gpt2-tiny"]


def outputs(model, prompts):
    """Greedy runs one prompt at a time, then a seeded sampled batch of all of them (two choices each), with
    log-probabilities; long enough to pass mistral-sw-tiny's window of 5."""
    solo = [model.generate(p, max_new_tokens=20, temperature=0, ignore_eos=True, logprobs=3) for p in prompts]
    batch = model.generate(prompts, max_new_tokens=20, temperature=0.9, top_p=0.95, seed=7, n=2, ignore_eos=True,
                           logprobs=3)
    return [(ch.token_ids, [(t.token_id, t.logprob, t.top_logprobs) for t in ch.logprobs])
            for c in solo + batch for ch in c.choices]


def both_paths(model, prompts):
    """(outputs with the team path, outputs with the general path, steps the team took). The team runs twice,
    with its waiting threads warming the next weights (the default) and without: the same outputs."""
    before = _native._decode_steps()
    was = _native._set_decode_step("team")
    try:
        team = outputs(model, prompts)
        warmed = _native._set_warm(False)
        try:
            assert outputs(model, prompts) == team
        finally:
            _native._set_warm(warmed)
        steps = _native._decode_steps()
        taken = (steps - before) // 2
        _native._set_decode_step("general")
        general = outputs(model, prompts)
        assert _native._decode_steps() == steps   # switched off, it is not taken
    finally:
        _native._set_decode_step(was)
    return team, general, taken


PROMPTS = [[1, 5, 9], [3] * 12, list(range(40, 71))]


@pytest.mark.parametrize("dtype", ["q8_0", "q4_1"])
@pytest.mark.parametrize("name", TEAM + GENERAL)
def test_team_step_equals_general_step(name, dtype):
    model = cw.load(DATA / name, dtype=dtype)
    team, general, taken = both_paths(model, PROMPTS)
    assert team == general
    if name in TEAM:
        # every step, the prompts' included: 20 per solo run (a prompt step, 19 decoding), 20 for the batch
        assert taken >= 4 * 20
    else:
        assert taken == 0


def test_mixed_formats_and_interleaved_rope(tmp_path):
    """A llama GGUF (q/k permuted for llama.cpp's interleaved RoPE) whose projections mix formats as llama.cpp's
    Q4_K_M-style mixes do: q, k and v each their own (one projection in three parts), gate and up apart."""
    path = write_llama_gguf(DATA / "llama-tiny", tmp_path / "mixed.gguf", qtype=Q.Q8_0,
                            qtypes={"attn_q": Q.Q4_0, "attn_k": Q.Q5_1, "attn_v": Q.Q8_0, "ffn_gate": Q.Q4_1,
                                    "ffn_up": Q.Q5_0, "ffn_down": Q.Q4_0, "attn_output": Q.Q5_1})
    team, general, taken = both_paths(cw.load(path), PROMPTS)
    assert team == general and taken >= 4 * 20


def test_smollm2_team_step_equals_general_step():
    from candlewick.default_model import smollm2_path

    model = cw.load(smollm2_path())
    chats = [model.tokenizer.encode(model.tokenizer.apply_chat_template([{"role": "user", "content": q}]))
             for q in ("What is the capital of France?", "Write a haiku about rain.", "Count to five.")]
    team, general, taken = both_paths(model, chats)
    assert team == general and taken >= 4 * 20


def engine_run(model, budget):
    """12 requests through one engine: prompts cut into chunks of at most `budget` tokens, requests joining while
    others decode (so steps mix prompt chunks, some ending a prompt and some not, with decoding rows), a shared
    prefix found in the cache. Returns every choice's tokens and logprobs, and the engine's steps."""
    engine = _native.Engine(model._native, kv_cache_tokens=4096, max_batch_tokens=budget)
    system = list(range(3, 40))
    reqs = [((system if i % 2 else []) + [5 + (7 * i + j) % 90 for j in range(3 + 5 * i)],
             dict(max_new_tokens=6 + i % 5, seed=i, ignore_eos=True, temperature=0.0 if i % 3 == 0 else 1.0,
                  logprobs=2, n=1 + (i % 4 == 1))) for i in range(12)]
    got, ids, pending, steps = {}, {}, list(reqs), 0
    while pending or engine.has_work():
        if pending and steps % 2 == 0:   # one new request every other step
            p, params = pending.pop(0)
            rid, _ = engine.add(p, params)
            ids[rid] = len(ids)
        steps += 1
        assert steps < 10_000
        for rid, choice, text, toks, lps, finish, *_ in engine.step():
            c = got.setdefault((ids[rid], choice), [[], []])
            c[0] += toks
            c[1] += lps
    return got, engine.stats()["steps"]


@pytest.mark.parametrize("budget", [7, 512])
def test_prompt_chunks_mixed_with_decoding(budget):
    """Steps that mix prompt chunks with decoding rows take the team's path too (every step of the engine), and
    give what the general path gives, bit for bit."""
    model = cw.load(DATA / "qwen2-tiny", dtype="q4_1")
    before = _native._decode_steps()
    was = _native._set_decode_step("team")
    try:
        team, steps = engine_run(model, budget)
        assert _native._decode_steps() - before == steps
        _native._set_decode_step("general")
        general, _ = engine_run(model, budget)
    finally:
        _native._set_decode_step(was)
    assert len(team) == 15 and team == general
