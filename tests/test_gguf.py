"""GGUF files: a fixture written as GGUF matches the safetensors path; quantized kernels; bad files."""
from __future__ import annotations

import json

import gguf
import numpy as np
import pytest

import candlewick as cw
from conftest import DATA
from gguf_util import dequantized_checkpoint, write_gpt2_gguf, write_llama_gguf

LLAMA = DATA / "llama-tiny"


@pytest.fixture(scope="module")
def dense_gguf(tmp_path_factory):
    return write_llama_gguf(LLAMA, tmp_path_factory.mktemp("gguf") / "llama-tiny-f32.gguf")


@pytest.fixture(scope="module")
def st_model():
    return cw.load(LLAMA)


def test_f32_gguf_matches_safetensors(dense_gguf, st_model):
    m = cw.load(dense_gguf)
    r = np.load(LLAMA / "reference.npz")
    for i in range(4):
        ids = r[f"prompt{i}_ids"]
        np.testing.assert_allclose(m.logits(ids), st_model.logits(ids), rtol=0, atol=1e-4)
        np.testing.assert_allclose(m.logits(ids), r[f"prompt{i}_logits"], rtol=0, atol=1e-4)
        out = m.generate(ids, max_new_tokens=12, temperature=0, ignore_eos=True)
        assert out.choices[0].token_ids == list(r[f"prompt{i}_greedy"])


def test_gpt2_gguf_matches_safetensors(tmp_path):
    m = cw.load(write_gpt2_gguf(DATA / "gpt2-tiny", tmp_path / "gpt2-tiny.gguf"))
    st = cw.load(DATA / "gpt2-tiny")
    r = np.load(DATA / "gpt2-tiny" / "reference.npz")
    assert m.config["architecture"] == "gpt2" and m.tokenizer.eos_token_ids == [50256]
    for i in range(4):
        ids = r[f"prompt{i}_ids"]
        np.testing.assert_allclose(m.logits(ids), st.logits(ids), rtol=0, atol=1e-4)
        np.testing.assert_allclose(m.logits(ids)[-1], r[f"prompt{i}_logits_last"], rtol=0, atol=1e-4)
        assert m.tokenizer.encode(m.tokenizer.decode(ids)) == list(ids)


def test_gguf_tokenizer_and_template_from_metadata(dense_gguf, st_model, vectors):
    tok, ref = cw.load(dense_gguf).tokenizer, st_model.tokenizer
    assert (tok.bos_token_id, tok.eos_token_ids) == (ref.bos_token_id, ref.eos_token_ids)
    for row in vectors:
        ids = ref.encode(row["text"])
        assert tok.encode(row["text"]) == ids
        assert tok.decode(ids) == ref.decode(ids)
    for case in json.loads((LLAMA / "chat_reference.json").read_text()):
        assert tok.apply_chat_template(case["messages"], case["add_generation_prompt"]) == case["rendered"]


@pytest.mark.parametrize("qtype", ["F16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"])
def test_quantized_kernels_match_their_dequantized_weights(tmp_path, qtype):
    """The quantized matmuls compute with the file's weights: run dense on the same weights dequantized, they
    differ only by the activations' rounding to 8 bits inside the kernels (none for F16)."""
    qt = gguf.GGMLQuantizationType[qtype]
    quant = cw.load(write_llama_gguf(LLAMA, tmp_path / "q.gguf", qtype=qt))
    dense = cw.load(dequantized_checkpoint(LLAMA, tmp_path / "deq", qt))
    r = np.load(LLAMA / "reference.npz")
    bound = 1e-3 if qtype == "F16" else 0.08
    for i in range(4):
        ids = r[f"prompt{i}_ids"]
        a, b = quant.logits(ids), dense.logits(ids)
        assert np.linalg.norm(a - b) <= bound * np.linalg.norm(b)
        assert np.mean(a.argmax(-1) == b.argmax(-1)) >= (1.0 if qtype == "F16" else 0.8)


def test_load_time_q8_0_matches_q8_0_gguf(tmp_path, st_model):
    qt = gguf.GGMLQuantizationType.Q8_0
    from_file = cw.load(write_llama_gguf(LLAMA, tmp_path / "q8.gguf", qtype=qt, quantize_embeddings=False))
    at_load = cw.load(LLAMA, dtype="q8_0")
    assert at_load.config["dtype"] == "float32"  # the activations; the projections are Q8_0
    for i in range(4):
        ids = np.load(LLAMA / "reference.npz")[f"prompt{i}_ids"]
        # the same block format and kernels: each block of 32 weights rounds to int8 with scale max|x| / 127
        np.testing.assert_allclose(at_load.logits(ids), from_file.logits(ids), rtol=0, atol=1e-3)
    with pytest.raises(cw.InvalidArgument, match="q4_k|Q4K|block"):
        cw.load(LLAMA, dtype="q4_k")  # 64 input features: not a multiple of the K-quant block of 256


def test_gpt2_load_time_q8_0_matches_q8_0_gguf(tmp_path):
    """GPT-2 is one of the decoders: quantized at load it computes what llama.cpp's Q8_0 file of it computes."""
    qt = gguf.GGMLQuantizationType.Q8_0
    from_file = cw.load(write_gpt2_gguf(DATA / "gpt2-tiny", tmp_path / "gpt2-q8.gguf", qtype=qt))
    at_load, dense = cw.load(DATA / "gpt2-tiny", dtype="q8_0"), cw.load(DATA / "gpt2-tiny")
    r = np.load(DATA / "gpt2-tiny" / "reference.npz")
    for i in range(4):
        ids = r[f"prompt{i}_ids"]
        np.testing.assert_allclose(at_load.logits(ids), from_file.logits(ids), rtol=0, atol=1e-3)
        a, b = at_load.logits(ids), dense.logits(ids)
        assert 0 < np.linalg.norm(a - b) <= 0.05 * np.linalg.norm(b)  # quantized, and close


@pytest.mark.parametrize("cut", [3, 20, 1000, -100])
def test_truncated_gguf(dense_gguf, tmp_path, cut):
    data = dense_gguf.read_bytes()
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(data[:cut])
    with pytest.raises(cw.ModelLoadError, match="cut.gguf"):
        cw.load(bad)


def test_unsupported_architecture_is_named(tmp_path):
    path = write_llama_gguf(LLAMA, tmp_path / "m.gguf", arch="mamba")
    with pytest.raises(cw.ModelLoadError, match="mamba.*supported: llama.*gpt2"):
        cw.load(path)


def test_not_a_gguf(tmp_path):
    p = tmp_path / "x.gguf"
    p.write_bytes(b"GGML" + b"\0" * 100)
    with pytest.raises(cw.ModelLoadError, match="x.gguf"):
        cw.load(p)


SPM = json.loads((DATA / "spm-llamacpp.json").read_text())


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory):
    """llama-tiny's weights with a SentencePiece vocabulary (tokenizer.ggml.model "llama", as Llama 2, Mistral and
    TinyLlama files have) of the same size."""
    return cw.load(write_llama_gguf(DATA / "llama-tiny", tmp_path_factory.mktemp("spm") / "spm.gguf", spm=SPM))


def test_sentencepiece_tokenizer_matches_llama_cpp(spm_model):
    """tests/data/spm-llamacpp.json (scripts/make_spm_golden.py): llama.cpp's tokens for 234 texts, including special
    tokens in the text, runs of spaces, tabs, newlines and characters only byte fallback can spell."""
    tok = spm_model.tokenizer
    assert len(SPM["tokenize"]) == 234
    for case in SPM["tokenize"]:
        assert tok.encode(case["text"], add_special_tokens=False) == case["ids"], case["text"]
    assert tok.encode(SPM["with_bos"]["text"]) == SPM["with_bos"]["ids"]
    assert tok.bos_token_id == 1 and tok.eos_token_ids == [2]


def test_sentencepiece_decoding(spm_model):
    """Decoding gives the text back: llama.cpp's own detokenisation keeps the space SentencePiece puts in front,
    transformers' Llama tokenizers (and ours) drop it."""
    tok = spm_model.tokenizer
    for case in SPM["tokenize"]:
        text = tok.decode(case["ids"], skip_special_tokens=False)
        assert " " + text == case["detokenized"] or "<s>" in case["text"] or not case["ids"], case["text"]
        if "<s>" not in case["text"]:
            assert text == case["text"]


def test_isa_env_names_an_unknown_level(monkeypatch):
    monkeypatch.setenv("CANDLEWICK_ISA", "sse9")
    with pytest.raises(cw.InvalidArgument, match='CANDLEWICK_ISA="sse9"'):
        cw.load(LLAMA)


@pytest.mark.parametrize("isa", ["scalar", "avx2"])
def test_every_isa_level_computes_the_same_logits(tmp_path, isa):
    """CANDLEWICK_ISA caps every kernel (dense panels, block formats, activations): a lesser level gives the
    same logits, for f32, bf16 and Q4_1 weights."""
    import subprocess
    import sys

    q4 = write_llama_gguf(LLAMA, tmp_path / "q4_1.gguf", qtype=gguf.GGMLQuantizationType.Q4_1)
    ids = [int(i) for i in np.load(LLAMA / "reference.npz")["prompt0_ids"]]
    code = (
        "import sys, numpy as np, candlewick as cw\n"
        f"ids = {ids}\n"
        f"np.save(sys.argv[1], np.stack([cw.load({str(LLAMA)!r}).logits(ids), "
        f"cw.load({str(LLAMA)!r}, dtype='bfloat16').logits(ids), cw.load({str(q4)!r}).logits(ids)]))\n"
    )
    out = tmp_path / "logits.npy"
    env = {**__import__("os").environ, "CANDLEWICK_ISA": isa}
    subprocess.run([sys.executable, "-c", code, str(out)], env=env, check=True, timeout=300)
    got = np.load(out)
    for a, m in zip(got, [cw.load(LLAMA), cw.load(LLAMA, dtype="bfloat16"), cw.load(q4)]):
        np.testing.assert_allclose(a, m.logits(ids), rtol=0, atol=1e-4)
