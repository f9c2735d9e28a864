"""candlewick.Tokenizer against transformers' tokenizer vectors, chat renderings and bad input."""
from __future__ import annotations

import json
import shutil

import pytest
from hypothesis import given, settings, strategies as st

import candlewick as cw
from conftest import DATA, minilm_path


@pytest.fixture(scope="module")
def gpt2():
    return cw.Tokenizer.from_pretrained(DATA / "gpt2-tiny")


@pytest.fixture(scope="module")
def minilm():
    return cw.Tokenizer.from_pretrained(minilm_path())


@pytest.fixture(scope="module")
def llama():
    return cw.Tokenizer.from_pretrained(DATA / "llama-tiny")


def test_gpt2_vectors_encode_exactly_and_round_trip(gpt2, vectors):
    assert len(vectors) == 230
    for row in vectors:
        assert gpt2.encode(row["text"]) == row["gpt2"], row["text"]
        # byte-level BPE is lossless (special tokens kept, as the text spelled them)
        assert gpt2.decode(row["gpt2"], skip_special_tokens=False) == row["text"]


def test_minilm_vectors_encode_exactly(minilm, vectors):
    for row in vectors:
        assert minilm.encode(row["text"]) == row["minilm"], row["text"]
    # the MiniLM tokenizer.json pads to 128; like transformers, encode() must not
    assert minilm.encode("hi") == [101, 7632, 102]
    # WordPiece lowercases and strips accents, so only normalised text round-trips
    assert minilm.decode(minilm.encode("the quick brown fox.")) == "the quick brown fox."


def test_encode_batch_equals_encode(gpt2, minilm, vectors):
    texts = [r["text"] for r in vectors]
    assert gpt2.encode_batch(texts) == [r["gpt2"] for r in vectors]
    assert minilm.encode_batch(texts) == [r["minilm"] for r in vectors]


def test_special_tokens_and_stop_ids(gpt2, llama, minilm):
    assert (gpt2.bos_token_id, gpt2.eos_token_ids) == (50256, [50256])
    assert (llama.bos_token_id, llama.eos_token_ids, llama.pad_token_id) == (0, [1], 2)
    assert llama.encode("hello")[0] == 0 and llama.encode("hello", add_special_tokens=False)[0] != 0
    assert llama.decode(llama.encode("hello"), skip_special_tokens=False).startswith("<s>")
    assert minilm.pad_token_id == 0 and minilm.special_tokens["cls_token"] == "[CLS]"


def test_stop_ids_gather_config_and_generation_config(tmp_path):
    shutil.copytree(DATA / "llama-tiny", tmp_path / "m")
    (tmp_path / "m" / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 7, 9]}))
    tok = cw.Tokenizer.from_pretrained(tmp_path / "m")
    assert tok.eos_token_ids == [1, 7, 9]


def test_loads_from_tokenizer_json_file(gpt2):
    tok = cw.Tokenizer.from_pretrained(DATA / "gpt2-tiny" / "tokenizer.json")
    assert tok.encode("makes it unnecessary.") == [49123, 340, 13114, 13]


@pytest.mark.parametrize("name", ["llama-tiny", "qwen2-tiny"])
def test_chat_template_renders_like_transformers(name):
    tok = cw.Tokenizer.from_pretrained(DATA / name)
    cases = json.loads((DATA / name / "chat_reference.json").read_text())
    assert len(cases) >= 4
    for case in cases:
        got = tok.apply_chat_template(case["messages"], add_generation_prompt=case["add_generation_prompt"])
        assert got == case["rendered"]
        ids = tok.apply_chat_template(case["messages"], case["add_generation_prompt"], tokenize=True)
        assert ids == tok.encode(case["rendered"], add_special_tokens=False)


def _stream(tok, ids):
    dec = tok.decoder()
    pieces = [dec.step(i) for i in ids]
    pieces.append(dec.finish())
    return pieces


@settings(max_examples=150, deadline=None)
@given(text=st.text(max_size=60))
def test_stream_pieces_join_to_decode(gpt2, llama, text):
    for tok in (gpt2, llama):
        ids = tok.encode(text)
        pieces = _stream(tok, ids)
        assert "".join(pieces) == tok.decode(ids)
        for p in pieces:
            p.encode("utf-8")  # a str with lone surrogates would fail here
            # a piece never ends in half a character (U+FFFD) unless the full decode has one there
            assert "\ufffd" not in p or "\ufffd" in tok.decode(ids)


def test_stream_holds_back_partial_characters(gpt2):
    ids = gpt2.encode("👋")
    assert len(ids) == 2  # the emoji's four bytes span two tokens
    dec = gpt2.decoder()
    assert dec.step(ids[0]) == ""
    assert dec.step(ids[1]) == "👋"
    assert dec.finish() == ""


# ---- bad input ---------------------------------------------------------------------------------------------------


def test_missing_tokenizer_names_the_path(tmp_path):
    with pytest.raises(cw.TokenizerError, match="tokenizer.json"):
        cw.Tokenizer.from_pretrained(tmp_path)
    with pytest.raises(cw.TokenizerError, match="nowhere"):
        cw.Tokenizer.from_pretrained(tmp_path / "nowhere")


def test_malformed_tokenizer_json(tmp_path):
    (tmp_path / "tokenizer.json").write_text('{"model": {"type": "BPE"')
    with pytest.raises(cw.TokenizerError, match="tokenizer.json"):
        cw.Tokenizer.from_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "Nonsense"}}')
    with pytest.raises(cw.TokenizerError, match="tokenizer.json"):
        cw.Tokenizer.from_pretrained(tmp_path)


def test_malformed_tokenizer_config(tmp_path):
    shutil.copytree(DATA / "llama-tiny", tmp_path / "m")
    (tmp_path / "m" / "tokenizer_config.json").write_text("{ nope")
    with pytest.raises(cw.TokenizerError, match="tokenizer_config.json"):
        cw.Tokenizer.from_pretrained(tmp_path / "m")


def test_unknown_special_token(tmp_path):
    shutil.copytree(DATA / "llama-tiny", tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "tokenizer_config.json").read_text())
    cfg["eos_token"] = "<|no-such-token|>"
    (tmp_path / "m" / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(cw.TokenizerError, match=r"eos_token.*<\|no-such-token\|>"):
        cw.Tokenizer.from_pretrained(tmp_path / "m")


@pytest.mark.parametrize("bad", [50257, 10**12, -1])
def test_token_id_out_of_range(gpt2, bad):
    with pytest.raises(cw.TokenizerError, match=str(bad)):
        gpt2.decode([15496, bad])
    with pytest.raises(cw.TokenizerError, match=str(bad)):
        gpt2.decoder().step(bad)
    assert issubclass(cw.TokenizerError, ValueError) and issubclass(cw.TokenizerError, cw.CandlewickError)


@pytest.mark.parametrize(
    "messages, match",
    [
        ([{"content": "hi"}], r"messages\[0\] has no 'role'"),
        ([{"role": "user", "content": "a"}, {"role": "user"}], r"messages\[1\] has no 'content'"),
        (["hello"], r"messages\[0\] must be a dict"),
        ("hello", "list"),
        ([], "empty"),
    ],
)
def test_bad_chat_messages(llama, messages, match):
    with pytest.raises(cw.InvalidArgument, match=match):
        llama.apply_chat_template(messages)


def test_no_chat_template(gpt2):
    with pytest.raises(cw.TokenizerError, match="no chat template"):
        gpt2.apply_chat_template([{"role": "user", "content": "hi"}])


def test_template_raise_exception_is_invalid_argument(llama):
    tpl = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('first message must be user') }}{% endif %}"
    with pytest.raises(cw.InvalidArgument, match="first message must be user"):
        llama.apply_chat_template([{"role": "system", "content": "x"}], chat_template=tpl)


def test_token_bytes(gpt2, llama):
    """A token's bytes: byte-level BPE tokens that hold part of a character give their raw bytes, which join to
    the text's UTF-8; whole-character tokens give the UTF-8 of their text."""
    for tok, text in [(gpt2, "👋 héllo, 世界"), (llama, "héllo 👋")]:
        ids = tok.encode(text, add_special_tokens=False)
        assert b"".join(tok.token_bytes(i) for i in ids) == text.encode("utf-8")
    first, second = gpt2.encode("👋")
    assert gpt2.token_bytes(first) == "👋".encode("utf-8")[:len(gpt2.token_bytes(first))]
    assert gpt2.token_bytes(first) + gpt2.token_bytes(second) == "👋".encode("utf-8")
    assert gpt2.token_bytes(50256) == b"<|endoftext|>"


def test_token_bytes_of_a_byte_fallback_token():
    """SentencePiece's <0xE2>-style tokens stand for one byte (their decoded text alone is U+FFFD)."""
    class Native:  # the two calls token_bytes makes, as a SentencePiece tokenizer answers them
        def decode(self, ids, skip_special_tokens):
            return "\ufffd"

        def id_to_token(self, token_id):
            return "<0xE2>"

    assert cw.Tokenizer(Native()).token_bytes(7) == b"\xe2"


def test_chat_template_sees_additional_special_tokens(tmp_path):
    """As transformers passes them: the list of tokenizer_config.json's additional_special_tokens."""
    shutil.copytree(DATA / "llama-tiny", tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "tokenizer_config.json").read_text())
    cfg["additional_special_tokens"] = ["<s>", {"content": "</s>"}]
    (tmp_path / "m" / "tokenizer_config.json").write_text(json.dumps(cfg))
    tpl = "{{ additional_special_tokens | join(',') }}|{{ tools is none }}|{{ bos_token }}"
    msgs = [{"role": "user", "content": "x"}]
    assert cw.Tokenizer.from_pretrained(tmp_path / "m").apply_chat_template(msgs, chat_template=tpl) == \
        "<s>,</s>|True|<s>"
    from candlewick.reference.tokenizer import Tokenizer as Reference

    ref = Reference.from_pretrained(tmp_path / "m")
    ref.chat_template = tpl
    assert ref.apply_chat_template(msgs) == "<s>,</s>|True|<s>"
