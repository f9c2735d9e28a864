"""The second round of architectures through the engine, against the exact float64 fixtures (tests/data):
Qwen3, Gemma 3, Phi-3, Llama-3 RoPE, Mistral with a sliding window, SmolLM3 (NoPE) and GPT-NeoX.

For each: float32 logits within 1e-4, token NLL within 1e-4, greedy tokens identical through `generate` (cached
decoding, past the window where there is one), a ragged batch equal to one prompt at a time, and logits computed
chunk by chunk through the KV cache equal to one full pass."""
from __future__ import annotations

import json

import numpy as np
import pytest

import candlewick as cw
from conftest import DATA, copy_checkpoint, prompts

ARCHS = ["qwen3-tiny", "gemma3-tiny", "phi3-tiny", "llama3-rope-tiny", "mistral-sw-tiny", "smollm3-tiny",
         "gptneox-tiny"]
ATOL = 1e-4  # DESIGN.md: the float32 engine within 1e-4 of the exact figures


@pytest.fixture(scope="module", params=ARCHS)
def fixture(request):
    name = request.param
    return name, cw.load(DATA / name), np.load(DATA / name / "reference.npz")


def test_logits_match_fixture(fixture):
    name, model, z = fixture
    for i, ids in prompts(z):
        np.testing.assert_allclose(model.logits(ids), z[f"prompt{i}_logits"], rtol=0, atol=ATOL)


def test_token_nll_matches_fixture(fixture):
    name, model, z = fixture
    for i, ids in prompts(z):
        np.testing.assert_allclose(model.token_nll(ids), z[f"prompt{i}_token_nll"], rtol=0, atol=ATOL)


def test_greedy_tokens_match_fixture(fixture):
    name, model, z = fixture
    for i, ids in prompts(z):
        out = model.generate(ids, max_new_tokens=12, temperature=0, ignore_eos=True)
        assert out.choices[0].token_ids == [int(t) for t in z[f"prompt{i}_greedy"]], (name, i)


def test_ragged_batch_equals_one_at_a_time(fixture):
    """Prompts of different lengths decode together (left-padded caches, a padding mask) as they do alone."""
    name, model, z = fixture
    all_ids = [ids for _, ids in prompts(z)]
    assert len({len(ids) for ids in all_ids}) > 1
    together = model.generate(all_ids, max_new_tokens=12, temperature=0, ignore_eos=True)
    for i, ids in enumerate(all_ids):
        assert together[i].choices[0].token_ids == [int(t) for t in z[f"prompt{i}_greedy"]], (name, i)
    # and right-padded logits of a batch row by row
    batch = model.logits(all_ids)
    for i, ids in enumerate(all_ids):
        np.testing.assert_allclose(batch[i, :len(ids)], z[f"prompt{i}_logits"], rtol=0, atol=ATOL)


def test_cached_chunks_equal_full_pass(fixture):
    """Logits chunk by chunk through the KV cache (one token at a time past the first few: decoding past any
    window) equal one full pass."""
    name, model, z = fixture
    _, ids = max(prompts(z), key=lambda p: len(p[1]))
    chunks = [3] + [1] * (len(ids) - 3)
    inc = model._native.logits_incremental(ids, chunks)
    np.testing.assert_allclose(inc, z[f"prompt{max(range(4), key=lambda i: len(z[f'prompt{i}_ids']))}_logits"],
                               rtol=0, atol=ATOL)


def edited(tmp_path, name, **changes):
    """A copy of fixture `name` with config.json fields changed (None deletes a field)."""
    def edit(cfg):
        for k, v in changes.items():
            if v is None:
                cfg.pop(k, None)
            else:
                cfg[k] = v

    return copy_checkpoint(DATA / name, tmp_path / name, edit)


@pytest.mark.parametrize("name,changes", [
    ("mistral-sw-tiny", {"sliding_window": None}),
    ("gemma3-tiny", {"layer_types": ["full_attention"] * 3}),
    ("smollm3-tiny", {"no_rope_layers": [1, 1, 1, 1]}),
    ("phi3-tiny", {"partial_rotary_factor": 1.0, "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"}}),
    ("gptneox-tiny", {"use_parallel_residual": False}),
    ("llama3-rope-tiny", {"rope_parameters": {"rope_theta": 500000.0, "rope_type": "default"}}),
])
def test_each_feature_matters(tmp_path, name, changes):
    """Switching the feature off moves the logits far from the fixture: the tests above would catch an engine
    that ignored it."""
    z = np.load(DATA / name / "reference.npz")
    ids = [int(t) for t in z["prompt3_ids"]]
    off = cw.load(edited(tmp_path, name, **changes)).logits(ids)
    assert np.abs(off - z["prompt3_logits"]).max() > 1e-2


def test_sliding_window_in_decoding_keeps_to_the_window():
    """Mistral's window of 5: the next-token logits after a long prompt do not depend on tokens more than 4
    positions back (a token sees itself and the 4 before it), through the cache as in one pass."""
    model = cw.load(DATA / "mistral-sw-tiny")
    z = np.load(DATA / "mistral-sw-tiny" / "reference.npz")
    ids = [int(t) for t in z["prompt3_ids"]]
    other = list(ids)
    # two layers of window 5 reach 8 tokens back; change tokens further back than that
    for j in range(1, len(ids) - 9):
        other[j] = (ids[j] + 7) % 1000 + 3
    a, b = model.logits(ids)[-1], model.logits(other)[-1]
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)
    inc = model._native.logits_incremental(other, [2] + [1] * (len(ids) - 2))
    np.testing.assert_allclose(inc[-1], a, rtol=0, atol=1e-4)


def test_config_reports_the_layers(fixture):
    name, model, _ = fixture
    assert model.config["num_layers"] == json.loads((DATA / name / "config.json").read_text())["num_hidden_layers"]
