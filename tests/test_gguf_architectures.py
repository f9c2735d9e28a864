"""GGUF copies of the new fixtures, written as llama.cpp's converter writes them, against the safetensors path."""
from __future__ import annotations


import gguf
import numpy as np
import pytest

import candlewick as cw
from conftest import DATA, copy_checkpoint
from gguf_util import dequantized_checkpoint, write_decoder_gguf

# Gemma 3 in GGUF follows llama.cpp: every 6th layer global (the 3-layer fixture's layer 2 is global in its
# config, sliding in a GGUF file), local RoPE base 10000; so it is compared with a copy whose layer_types say so.
# Mistral converts as a llama file, without its sliding window, and llama.cpp's llama graph attends to every key: so
# it is compared with a copy without the window (the file cannot say it, and the engine computes what llama.cpp
# computes on it).
# SmolLM3 in GGUF follows llama.cpp too: every 4th layer without RoPE, which is what the fixture's no_rope_layers say.
ARCHS = ["qwen3-tiny", "phi3-tiny", "gptneox-tiny", "llama3-rope-tiny", "gemma3-tiny", "smollm3-tiny", "mistral-sw-tiny"]
TWINS = {"gemma3-tiny": {"layer_types": ["sliding_attention"] * 3}, "mistral-sw-tiny": {"sliding_window": None}}


def safetensors_twin(tmp_path, name):
    if name not in TWINS:
        return DATA / name
    return copy_checkpoint(DATA / name, tmp_path / f"{name}-as-gguf", lambda cfg: cfg.update(TWINS[name]))


@pytest.mark.parametrize("name", ARCHS)
def test_f32_gguf_matches_safetensors(tmp_path, name):
    m = cw.load(write_decoder_gguf(DATA / name, tmp_path / f"{name}.gguf"))
    st = cw.load(safetensors_twin(tmp_path, name))
    z = np.load(DATA / name / "reference.npz")
    for i in range(4):
        ids = [int(t) for t in z[f"prompt{i}_ids"]]
        np.testing.assert_allclose(m.logits(ids), st.logits(ids), rtol=0, atol=1e-4)
        if name not in TWINS:
            np.testing.assert_allclose(m.logits(ids), z[f"prompt{i}_logits"], rtol=0, atol=1e-4)
            out = m.generate(ids, max_new_tokens=12, temperature=0, ignore_eos=True)
            assert out.choices[0].token_ids == [int(t) for t in z[f"prompt{i}_greedy"]]


# SmolLM3's tensors are Llama's (their Q8_0 path is test_gguf.py's); its fixture (initializer_range 0.3, logits of
# norm ~400) amplifies the activations' 8-bit rounding to 8.6% relative L2, past the bound below, so the
# F32 test above is its GGUF check.
@pytest.mark.parametrize("name", [a for a in ARCHS if a != "smollm3-tiny"])
def test_q8_0_gguf_matches_its_dequantized_weights(tmp_path, name):
    qt = gguf.GGMLQuantizationType.Q8_0
    quant = cw.load(write_decoder_gguf(DATA / name, tmp_path / f"{name}-q8.gguf", qtype=qt))
    dense = cw.load(dequantized_checkpoint(safetensors_twin(tmp_path, name), tmp_path / "deq", qt))
    z = np.load(DATA / name / "reference.npz")
    for i in range(4):
        ids = [int(t) for t in z[f"prompt{i}_ids"]]
        a, b = quant.logits(ids), dense.logits(ids)
        # only the activations' rounding to 8 bits inside the kernels differs (the bound test_gguf.py holds
        # llama-tiny's Q8_0 to)
        assert np.linalg.norm(a - b) <= 0.08 * np.linalg.norm(b), name
        assert np.mean(a.argmax(-1) == b.argmax(-1)) >= 0.8


def test_unknown_gguf_key_is_refused_by_name(tmp_path):
    path = write_decoder_gguf(DATA / "qwen3-tiny", tmp_path / "q.gguf")
    data = path.read_bytes()
    # rename a harmless key into one the engine does not implement, keeping its length
    bad = data.replace(b"qwen3.rope.freq_base", b"qwen3.rope.freq_bass")
    (tmp_path / "bad.gguf").write_bytes(bad)
    with pytest.raises(cw.ModelLoadError, match="qwen3.rope.freq_bass"):
        cw.load(tmp_path / "bad.gguf")
