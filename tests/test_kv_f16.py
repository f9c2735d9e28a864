"""The f16 KV cache (load(..., kv_cache_dtype="f16")): keys and values rounded to f16 as they are stored, as
llama.cpp keeps its cache by default. The decode paths and batching still give the same numbers bit for bit; the
logits move by the rounding alone; on SmolLM2 the engine still agrees with llama.cpp's greedy continuations."""
from __future__ import annotations

import json

import numpy as np
import pytest

import candlewick as cw
from candlewick.default_model import smollm2_path
from candlewick.errors import InvalidArgument
from conftest import DATA
from test_decode_step import PROMPTS, both_paths

GOLDEN = json.loads((DATA / "smollm2-llamacpp.json").read_text())


@pytest.mark.parametrize("name", ["llama-tiny", "mistral-sw-tiny", "qwen3-tiny"])
def test_team_and_general_paths_agree_bit_for_bit(name):
    model = cw.load(DATA / name, dtype="q8_0", kv_cache_dtype="f16")
    team, general, taken = both_paths(model, PROMPTS)
    assert team == general
    assert taken >= 4 * 19


def test_rounding_moves_logprobs_only_a_little():
    """Float32 weights: the f16 cache's greedy tokens are the f32 cache's, and its log-probabilities differ by
    the rounding of the keys and values (f16 keeps 11 significant bits)."""
    f32 = cw.load(DATA / "llama-tiny")
    f16 = cw.load(DATA / "llama-tiny", kv_cache_dtype="f16")
    for p in PROMPTS:
        a = f32.generate(p, max_new_tokens=20, temperature=0, ignore_eos=True, logprobs=1).choices[0]
        b = f16.generate(p, max_new_tokens=20, temperature=0, ignore_eos=True, logprobs=1).choices[0]
        assert a.token_ids == b.token_ids
        d = np.abs(np.array([t.logprob for t in a.logprobs]) - np.array([t.logprob for t in b.logprobs]))
        assert 0 < d.max() < 1e-2, d.max()


def test_batched_equals_solo_bit_for_bit():
    model = cw.load(smollm2_path(), kv_cache_dtype="f16")
    prompts = [p["prompt_ids"] for p in GOLDEN["prompts"]]
    batch = model.generate(prompts, max_new_tokens=16, temperature=0, ignore_eos=True, logprobs=1)
    for p, b in zip(prompts, batch):
        s = model.generate(p, max_new_tokens=16, temperature=0, ignore_eos=True, logprobs=1)
        assert b.choices[0].token_ids == s.choices[0].token_ids
        assert [x.logprob for x in b.choices[0].logprobs] == [x.logprob for x in s.choices[0].logprobs]


@pytest.mark.parametrize("i", range(len(GOLDEN["prompts"])))
def test_next_token_agrees_with_llama_cpp(i):
    """Fed llama.cpp's own greedy continuation, the next token the engine picks through its cache agrees at >= 90%
    of positions, the bar the f32 cache meets (tests/test_smollm2.py)."""
    model = cw.load(smollm2_path(), kv_cache_dtype="f16")
    p = GOLDEN["prompts"][i]
    ids, new = p["prompt_ids"], p["greedy"]
    picked = [model.generate(ids + new[:k], max_new_tokens=1, temperature=0, ignore_eos=True).choices[0].token_ids[0]
              for k in range(len(new))]
    agree = np.mean(np.array(picked) == np.array(new))
    assert agree >= 0.9, agree


def test_unknown_dtype_is_refused_by_name():
    with pytest.raises(InvalidArgument, match="bf16"):
        cw.load(DATA / "llama-tiny", kv_cache_dtype="bf16")


def test_kv_cache_size_counts_f16_positions():
    """`--kv-cache 1MiB` buys twice the positions in f16: llama-tiny's position is 2 layers × 2 KV heads × 16 × 2
    (keys and values) values."""
    from candlewick.cli import _kv_tokens

    f32 = cw.load(DATA / "llama-tiny")
    f16 = cw.load(DATA / "llama-tiny", kv_cache_dtype="f16")
    assert (f32.config["kv_cache_dtype"], f16.config["kv_cache_dtype"]) == ("float32", "float16")
    c = f32.config
    per = c["num_layers"] * c["num_kv_heads"] * c["head_dim"] * 2
    assert _kv_tokens("1MiB", f32) == 2**20 // (4 * per)
    assert _kv_tokens("1MiB", f16) == 2**20 // (2 * per)
