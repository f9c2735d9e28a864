"""Absurd sizes and request limits are refused by name before anything is allocated or run."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

import candlewick as cw
from conftest import DATA, minilm_path
from gguf_util import write_llama_gguf

LLAMA = DATA / "llama-tiny"


def edited_config(tmp_path, **fields):
    out = tmp_path / "edited"
    shutil.copytree(LLAMA, out)
    cfg = json.loads((out / "config.json").read_text())
    cfg.update(fields)
    (out / "config.json").write_text(json.dumps(cfg))
    return out


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
    data = path.read_bytes()
    key = b"llama.block_count"
    at = data.index(key) + len(key) + 4  # then the value's type (u32) and the value
    bad = data[:at] + (4_000_000_000).to_bytes(4, "little") + data[at + 4:]
    (tmp_path / "bad.gguf").write_bytes(bad)
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
