"""Vocabulary-only GGUF files (what llama.cpp's llama-tokenize reads: tokenizer.ggml.* metadata, no tensors)."""
from __future__ import annotations

import json

import gguf
import pytest

import candlewick as cw
from conftest import DATA
from gguf_util import add_bpe_tokenizer


def vocab_only(folder, out, pre: str, arch: str = "gpt2"):
    tok = json.loads((folder / "tokenizer.json").read_text())
    writer = gguf.GGUFWriter(str(out), arch)
    add_bpe_tokenizer(writer, tok, pre)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def test_vocab_only_gguf_tokenizes_as_the_tokenizer_json(tmp_path, vectors):
    """GPT-2's vocabulary as a tensor-less GGUF gives transformers' ids on every tokenizer vector."""
    tok = cw.Tokenizer.from_pretrained(vocab_only(DATA / "gpt2-tiny", tmp_path / "gpt2-vocab.gguf", "gpt-2"))
    for row in vectors:
        assert tok.encode(row["text"], add_special_tokens=False) == row["gpt2"], row["text"]


def test_vocab_only_gguf_is_not_a_model(tmp_path):
    path = vocab_only(DATA / "gpt2-tiny", tmp_path / "v.gguf", "gpt-2")
    with pytest.raises(cw.ModelLoadError, match="v.gguf"):
        cw.load(path)


def test_unknown_pre_tokenizer_is_named(tmp_path):
    path = vocab_only(DATA / "gpt2-tiny", tmp_path / "v.gguf", "some-new-pre")
    with pytest.raises(cw.CandlewickError, match="some-new-pre"):
        cw.Tokenizer.from_pretrained(path)
