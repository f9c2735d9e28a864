"""Absurd sizes and request limits are refused by name before anything is allocated or run."""
from __future__ import annotations


import time

import numpy as np
import pytest

import candlewick as cw
from conftest import DATA, copy_checkpoint, minilm_path
from gguf_util import write_llama_gguf

LLAMA = DATA / "llama-tiny"


def with_u32(data: bytes, key: str, value: int) -> bytes:
    """A GGUF file's bytes with the u32 metadata value of `key` replaced (the key found with its length prefix,
    so no longer key that starts with it matches; then its type, then the value)."""
    k = len(key).to_bytes(8, "little") + key.encode()
    at = data.index(k) + len(k)
    assert data[at:at + 4] == (4).to_bytes(4, "little"), "a u32 value"  # GGUF type 4 = uint32
    return data[:at + 4] + value.to_bytes(4, "little") + data[at + 8:]


def edited_config(tmp_path, **fields):
    return copy_checkpoint(LLAMA, tmp_path / "edited", lambda cfg: cfg.update(fields))


@pytest.mark.parametrize("field, value", [("num_hidden_layers", 10**9), ("hidden_size", 10**12),
                                          ("num_attention_heads", 2**40), ("num_hidden_layers", 0)])
def test_absurd_config_sizes_are_refused_by_name(tmp_path, field, value):
    kv = {"num_key_value_heads": value} if field == "num_attention_heads" else {}
    with pytest.raises(cw.ModelLoadError, match=f"{field} = {value} is out of range"):
        cw.load(edited_config(tmp_path, **{field: value, **kv}))


def test_more_layers_than_the_checkpoint_has_is_a_clean_error(tmp_path):
    with pytest.raises(cw.ModelLoadError, match="layers.2"):
        cw.load(edited_config(tmp_path, num_hidden_layers=3))  # the checkpoint has 2


def test_absurd_gguf_block_count_is_refused_by_name(tmp_path):
    path = write_llama_gguf(LLAMA, tmp_path / "m.gguf")
    (tmp_path / "bad.gguf").write_bytes(with_u32(path.read_bytes(), "llama.block_count", 4_000_000_000))
    with pytest.raises(cw.ModelLoadError, match="num_hidden_layers = 4000000000 is out of range"):
        cw.load(tmp_path / "bad.gguf")


@pytest.fixture(scope="module")
def model():
    return cw.load(LLAMA)


@pytest.mark.parametrize("kw, name", [({"n": 10**7}, "n must be in 1..=128"), ({"n": 0}, "n must be in 1..=128"),
                                      ({"logprobs": 10**6}, "logprobs must be in 0..=20"),
                                      ({"logprobs": -1}, "logprobs must be in 0..=20")])
def test_request_limits(model, kw, name):
    with pytest.raises(cw.InvalidArgument, match=name):
        model.generate("Hello", max_new_tokens=2, **kw)


@pytest.mark.parametrize("kw, name", [
    ({"stop": [f"s{i}" for i in range(65)]}, "stop: 65 strings, at most 64"),
    ({"stop": ["x" * 1025]}, "stop: a string of 1025 bytes, at most 1024"),
    ({"stop_token_ids": list(range(3)) * 342}, "stop_token_ids: 1026 ids, at most 1024"),
    # counted before the ids are looked at
    ({"logit_bias": {i: 0.0 for i in range(2049)}}, "logit_bias: 2049 entries, at most 2048"),
])
def test_stop_and_bias_limits(model, kw, name):
    with pytest.raises(cw.InvalidArgument, match=name):
        model.generate("Hello", max_new_tokens=2, **kw)


def test_stop_and_bias_limits_themselves_are_accepted(model):
    out = model.generate("Hello", max_new_tokens=2, stop=["x" * 1024] + [f"s{i}" for i in range(63)],
                         stop_token_ids=[5] * 1024, logit_bias={i: 0.0 for i in range(1024)}, seed=0)
    assert len(out.choices[0].token_ids) >= 1


def test_limits_themselves_are_accepted(model):
    out = model.generate("Hello", max_new_tokens=2, n=128, logprobs=20, seed=0)
    assert len(out.choices) == 128 and len(out.choices[0].logprobs[0].top_logprobs) == 20


@pytest.mark.parametrize("ids, mask, name", [
    (np.zeros((1, 0), np.int64), np.zeros((1, 0), np.int64), r"\[1, 0\] has no tokens"),  # was a panic
    (np.array([[101, -1, 102]]), np.ones((1, 3), np.int64), "token id -1 is out of range"),
    (np.array([[101, 10**6, 102]]), np.ones((1, 3), np.int64), "token id 1000000 is out of range"),
    (np.array([[101, 7592, 102]]), np.array([[1, 2, 1]]), "attention_mask holds 2"),
])
def test_encoder_inputs_are_checked(ids, mask, name):
    m = cw.load(minilm_path())
    with pytest.raises(cw.InvalidArgument, match=name):
        m._native.embed_ids(ids.astype(np.int64), mask.astype(np.int64))


@pytest.mark.parametrize("key, value, name", [("llama.attention.head_count", 0, "head_count: must be positive"),
                                              ("llama.embedding_length", 0, "hidden_size = 0 is out of range")])
def test_zero_sizes_in_gguf_are_refused_by_name(tmp_path, key, value, name):
    """(head_count 0 was a division by zero, raised as a bare PanicException)"""
    path = write_llama_gguf(LLAMA, tmp_path / "m.gguf")
    (tmp_path / "bad.gguf").write_bytes(with_u32(path.read_bytes(), key, value))
    with pytest.raises(cw.ModelLoadError, match=name):
        cw.load(tmp_path / "bad.gguf")


def test_a_panic_arrives_as_candlewick_error():
    """A panic inside the engine (a bug) reaches Python as a CandlewickError naming the operation, which
    `except Exception` catches, not as PyO3's PanicException (a BaseException); the interpreter goes on."""
    from candlewick import _native

    with pytest.raises(cw.CandlewickError, match="internal error in _panic_for_test: boom"):
        _native._panic_for_test("boom")
    assert cw.load(LLAMA).generate("Hello", max_new_tokens=1, seed=0).choices[0].token_ids


@pytest.mark.parametrize("template, message", [
    ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", "ran for more than"),
    ("{% for i in range(100000) %}{% for j in range(1000) %}{{ 'abcdefghij' }}{% endfor %}{% endfor %}",
     "wrote more than"),
    ("{{ 'x' * 10**10 }}", "too large"),
    ("{{ [1] * 10**9 }}", "too large"),
    ("{{ 2 ** 100000 }}", "too large"),
    ("{{ ''.__class__.__mro__ }}", "may not|unsafe|is undefined|has no attribute"),
])
def test_chat_templates_are_bounded(monkeypatch, template, message):
    """A chat template is code from a file: it runs sandboxed and bounded in time and output (an
    InvalidArgument, which the server answers with a 400), and ordinary ones render exactly as before."""
    from candlewick import chat_template

    # the time bound short for the template that only loops; the others must hit their own bound first, whatever
    # the machine's speed (16 MiB of output takes a loaded machine well over half a second)
    seconds = 0.5 if message == "ran for more than" else 20.0
    monkeypatch.setattr(chat_template, "RENDER_SECONDS", seconds)
    tok = cw.Tokenizer.from_pretrained(DATA / "qwen2-tiny")
    t0 = time.monotonic()
    with pytest.raises(cw.InvalidArgument, match=message):
        tok.apply_chat_template([{"role": "user", "content": "hi"}], chat_template=template)
    assert time.monotonic() - t0 < seconds + 4.5


def test_bounded_range_behaves_as_range():
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    from candlewick import chat_template

    t = "{{ range(3) }} {{ range(5)|length }} {{ range(5)[1:3]|list }} {{ range(4)|reverse|list }} " \
        "{{ 2 in range(3) }} {{ range(10)[-1] }} {{ range(2, 9, 3)|list }} {% for i in range(3) %}{{ i }}{% endfor %}"
    want = ImmutableSandboxedEnvironment().from_string(t).render()
    assert chat_template.render(t, []) == want == "range(0, 3) 5 [1, 2] [3, 2, 1, 0] True 9 [2, 5, 8] 012"
