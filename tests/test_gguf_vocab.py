"""Vocabulary-only GGUF files (what llama.cpp's llama-tokenize reads: tokenizer.ggml.* metadata, no tensors)."""
from __future__ import annotations

import json

import gguf
import pytest

import candlewick as cw
from conftest import DATA
from gguf_util import add_bpe_tokenizer, bert_vocab_gguf, bpe_vocab_gguf, byte_chars, read_vocab


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


# --- llama.cpp's own token ids (tests/data/vocab-llamacpp.json, written by scripts/make_vocab_golden.py) ---------

GOLDEN = json.loads((DATA / "vocab-llamacpp.json").read_text())
TEXTS = GOLDEN["texts"]


def mismatches(tok, texts, expected):
    return [(t, ids, got) for t, ids in zip(texts, expected)
            if (got := tok.encode(t, add_special_tokens=False)) != ids]


@pytest.mark.parametrize("name", sorted(GOLDEN["files"]))
def test_vocab_files_tokenize_as_llama_cpp(name):
    """Cut-down copies of llama.cpp's own vocabulary files (models/ggml-vocab-*.gguf: BPE with the deepseek,
    falcon, qwen2, starcoder, ... pre-tokenizers, SentencePiece, WordPiece, XLM-R's Unigram) and a trained T5
    Unigram: llama.cpp's ids on every text (the tokenizer vectors, llama.cpp's own test texts, hard cases)."""
    tok = cw.Tokenizer.from_pretrained(DATA / "vocab" / f"{name}.gguf")
    assert len(GOLDEN["files"][name]) == len(TEXTS) > 250
    assert mismatches(tok, TEXTS, GOLDEN["files"][name]) == []


@pytest.mark.parametrize("pre", sorted(GOLDEN["pre"]))
def test_every_pre_tokenizer_type_splits_as_llama_cpp(tmp_path, pre):
    """llama-tiny's byte-level BPE written with each tokenizer.ggml.pre type llama.cpp implements as regexes."""
    path = bpe_vocab_gguf(json.loads((DATA / "llama-tiny/tokenizer.json").read_text()), tmp_path / "v.gguf", pre)
    tok = cw.Tokenizer.from_pretrained(path)
    expected = list(GOLDEN["pre"]["gpt-2"]["ids"])  # each type's ids are stored where they differ from GPT-2's
    if pre != "gpt-2":
        for i, ids in GOLDEN["pre"][pre]["ids"].items():
            expected[int(i)] = ids
    assert mismatches(tok, TEXTS, expected) == []


def test_pre_tokenizer_types_covered():
    """Every pre-tokenizer type of llama.cpp's table is either checked above or refused by name."""
    types = {c["type"] for c in GOLDEN["pre"].values()} | {c["type"] for c in GOLDEN["pre_refused"].values()}
    assert len(GOLDEN["pre"]) >= 50 and len(types) == len(GOLDEN["pre"]) + len(GOLDEN["pre_refused"])


@pytest.mark.parametrize("pre", sorted(GOLDEN["pre_refused"]))
def test_pre_tokenizers_without_regexes_are_refused_by_name(tmp_path, pre):
    path = bpe_vocab_gguf(json.loads((DATA / "llama-tiny/tokenizer.json").read_text()), tmp_path / "v.gguf", pre)
    with pytest.raises(cw.CandlewickError, match=f"tokenizer.ggml.pre \"{pre}\" is not supported"):
        cw.Tokenizer.from_pretrained(path)


def test_gpt2_vocabulary_as_llama_cpp(tmp_path):
    path = bpe_vocab_gguf(json.loads((DATA / "gpt2-tiny/tokenizer.json").read_text()), tmp_path / "g.gguf", "gpt-2")
    assert mismatches(cw.Tokenizer.from_pretrained(path), TEXTS, GOLDEN["gpt2_tiny"]) == []


def test_bert_wordpiece_as_llama_cpp(tmp_path):
    """all-MiniLM-L6-v2's WordPiece as convert_hf_to_gguf.py writes it (▁ word starts, no ##)."""
    from conftest import minilm_path

    path = bert_vocab_gguf(json.loads((minilm_path() / "tokenizer.json").read_text()), tmp_path / "b.gguf")
    tok = cw.Tokenizer.from_pretrained(path)
    assert mismatches(tok, TEXTS, GOLDEN["minilm"]) == []
    # [CLS] ... [SEP] with the special tokens, as llama.cpp's add_special does for WPM
    ids = tok.encode("Hello, world!", add_special_tokens=True)
    assert ids[0] == 101 and ids[-1] == 102
    assert tok.decode(ids, skip_special_tokens=True) == "hello , world !"


def test_byte_level_vocabularies_decode_back(tmp_path):
    for name in GOLDEN["files"]:
        path = DATA / "vocab" / f"{name}.gguf"
        if read_vocab(path)["model"] != "gpt2":
            continue
        tok = cw.Tokenizer.from_pretrained(path)
        have = set(read_vocab(path)["tokens"])
        bytes_ = byte_chars()
        checked = 0
        for t in TEXTS:
            # a byte without a token of its own is dropped, by llama.cpp too (the ids above are its ids)
            if all(bytes_[b] in have for b in t.encode("utf-8")):
                assert tok.decode(tok.encode(t, add_special_tokens=False), skip_special_tokens=False) == t, (name, t)
                checked += 1
        assert checked >= 200, name


def test_t5_unigram_decodes_back_and_adds_eos():
    tok = cw.Tokenizer.from_pretrained(DATA / "vocab" / "t5-unigram.gguf")
    ids = tok.encode("the tokenizer reads the file", add_special_tokens=True)
    assert ids[-1] == 1  # </s>: llama.cpp's add_eos for UGM
    assert tok.decode(ids, skip_special_tokens=True) == "the tokenizer reads the file"
    # nmt_nfkc: runs of spaces fold to one, full-width letters to ASCII
    assert tok.encode("the  file", add_special_tokens=False) == tok.encode("the file", add_special_tokens=False)
    assert tok.encode("ｆｉｌｅ", add_special_tokens=False) == tok.encode("file", add_special_tokens=False)


def test_unknown_tokenizer_model_is_named(tmp_path):
    w = gguf.GGUFWriter(str(tmp_path / "r.gguf"), "rwkv6")
    w.add_tokenizer_model("rwkv")
    w.add_token_list(["a", "b"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(cw.CandlewickError, match='tokenizer.ggml.model "rwkv" is not supported.*"bert".*"t5"'):
        cw.Tokenizer.from_pretrained(tmp_path / "r.gguf")


def test_unknown_pre_lists_what_is_supported(tmp_path):
    path = vocab_only(DATA / "gpt2-tiny", tmp_path / "v.gguf", "some-new-pre")
    with pytest.raises(cw.CandlewickError, match="supported, as llama.cpp: .*deepseek-llm.*qwen2.*tekken"):
        cw.Tokenizer.from_pretrained(path)


def test_long_inputs_encode_as_the_tokenizer_json(tmp_path):
    """A 26,000-character word (no spaces) and ~300 kB of prose: the GGUF encoder gives the tokenizer.json's ids."""
    hf = cw.Tokenizer.from_pretrained(DATA / "gpt2-tiny")
    path = bpe_vocab_gguf(json.loads((DATA / "gpt2-tiny/tokenizer.json").read_text()), tmp_path / "g.gguf", "gpt-2")
    tok = cw.Tokenizer.from_pretrained(path)
    root = DATA.parent.parent
    for text in ["我想在apple工作" * 2000, ((root / "README.md").read_text() + (root / "docs/decisions.md").read_text()) * 10]:
        ids = tok.encode(text, add_special_tokens=False)
        assert ids == hf.encode(text, add_special_tokens=False)
        # (the docs name special tokens such as <|endoftext|>, which encode as themselves)
        assert tok.decode(ids, skip_special_tokens=False) == text
