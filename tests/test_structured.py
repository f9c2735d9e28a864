"""Structured output: JSON schemas, regexes and Lark grammars constrain what the engine generates.

Every output that finishes must parse and validate (the jsonschema package) or match (re.fullmatch), at
temperature 1 over many seeds, for schemas and regexes Hypothesis draws; constrained greedy output is the same
token for token in the engine and in the float64 reference (candlewick.reference.constraints, llguidance's
Python package), which reads the vocabulary's bytes on its own."""
from __future__ import annotations

import json
import re

import jsonschema
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import candlewick as cw
import candlewick.reference as ref
from candlewick.model import SamplingParams
from candlewick.reference import constraints as rc
from candlewick.structured import constraint_from

from conftest import DATA

FIXTURES = ["llama-tiny", "qwen2-tiny", "gpt2-tiny", "gemma3-tiny", "phi3-tiny", "mistral-sw-tiny"]


@pytest.fixture(scope="module")
def llama():
    return cw.load(DATA / "llama-tiny")


@pytest.fixture(scope="module")
def models():
    return {name: (cw.load(DATA / name), ref.load(DATA / name)) for name in FIXTURES}


PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age"],
          "properties": {"name": {"type": "string", "maxLength": 8},
                         "age": {"type": "integer", "minimum": 0, "maximum": 150},
                         "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3}}}


# --- schemas drawn by Hypothesis: every one bounded, so that every sample can finish -------------------------------

def leaf_schemas():
    return st.one_of(
        st.builds(lambda lo, span: {"type": "integer", "minimum": lo, "maximum": lo + span},
                  st.integers(-1000, 1000), st.integers(0, 5000)),
        st.builds(lambda lo, span: {"type": "number", "minimum": lo, "maximum": lo + span},
                  st.integers(-100, 100), st.integers(1, 1000)),
        st.builds(lambda lo, extra: {"type": "string", "minLength": lo, "maxLength": lo + extra},
                  st.integers(0, 3), st.integers(0, 8)),
        st.lists(st.one_of(st.text("abcxyz", min_size=1, max_size=5), st.integers(-9, 99), st.booleans()),
                 min_size=1, max_size=4, unique=True).map(lambda v: {"enum": v}),
        st.just({"type": "boolean"}),
        st.just({"type": "null"}),
    )


def extend(children):
    objects = st.dictionaries(st.text("abcdefgh_", min_size=1, max_size=6), children, min_size=1, max_size=4).flatmap(
        lambda props: st.sets(st.sampled_from(sorted(props))).map(
            lambda req: {"type": "object", "properties": props, "required": sorted(req),
                         "additionalProperties": False}))
    arrays = st.builds(lambda items, lo, extra: {"type": "array", "items": items, "minItems": lo,
                                                 "maxItems": lo + extra},
                       children, st.integers(0, 2), st.integers(0, 2))
    return st.one_of(objects, arrays)


SCHEMAS = st.recursive(leaf_schemas(), extend, max_leaves=6)


def samples(model, prompt, count, max_new_tokens=300, **constraint):
    """`count` completions at temperature 1, seeds 0..count-1, run as one batch."""
    sp = [SamplingParams(max_new_tokens=max_new_tokens, temperature=1.0, seed=s, **constraint) for s in range(count)]
    return [c.choices[0] for c in model.generate([prompt] * count, sampling_params=sp)]


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(schema=SCHEMAS)
def test_sampled_json_validates_against_drawn_schemas(llama, schema):
    for c in samples(llama, "Data:", 6, json_schema=schema):
        assert c.finish_reason == "stop", (schema, c.text)
        jsonschema.validate(json.loads(c.text), schema)


REGEX_PARTS = st.one_of(
    st.sampled_from(["[0-9]", "[a-z]", "[A-F0-9]", "x", "ab", "-", r"\.", " ", "(cat|dog)", "[^\\n\"]"]),
)


def regexes():
    def quantified(part):
        return st.sampled_from(["", "?", "{1,3}", "{2}", "{0,4}"]).map(lambda q: f"(?:{part}){q}" if q else part)
    return st.lists(REGEX_PARTS.flatmap(quantified), min_size=1, max_size=6).map("".join)


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(pattern=regexes())
def test_sampled_text_matches_drawn_regexes(llama, pattern):
    for c in samples(llama, "Code:", 6, regex=pattern):
        assert c.finish_reason == "stop", (pattern, c.text)
        assert re.fullmatch(pattern, c.text), (pattern, c.text)


@pytest.mark.parametrize("name", FIXTURES)
def test_constrained_greedy_equals_the_reference(models, name):
    engine, reference = models[name]
    cases = [dict(json_schema=PERSON), dict(regex=r"(yes|no|maybe)(, [0-9]{1,3})?"),
             dict(grammar='start: "[" item ("," item)* "]"\nitem: /[a-z]{1,4}/ | NUMBER\n%import common.NUMBER'),
             dict(response_format={"type": "json_object"})]
    for kw in cases:
        for prompt in ["Hello", "The answer is"]:
            out = engine.generate(prompt, temperature=0, max_new_tokens=48, **kw).choices[0]
            want = reference.generate(prompt, temperature=0, max_new_tokens=48, **kw)
            assert out.token_ids == want, (name, kw, prompt, out.text)


def test_token_bytes_are_the_decoded_bytes(models):
    """Each ordinary token's bytes, as the reference reads them from tokenizer.json, are what the tokenizer
    decodes in context: appended to a prefix, the decoded text grows by exactly those bytes."""
    for name, (_, reference) in models.items():
        tok = reference.tokenizer
        tokens, special = rc.token_bytes(tok.spec, reference.config.vocab_size)
        assert len(tokens) == reference.config.vocab_size
        anchor = tok.encode("a", add_special_tokens=False)
        base = tok.decode(anchor, skip_special_tokens=False).encode()
        checked = 0
        for i in range(0, min(len(tok.id_to_token), 1024), 7):
            if i in special:
                continue
            try:
                whole = tok.decode(anchor + [i], skip_special_tokens=False).encode()
            except Exception:
                continue
            if b"\xef\xbf\xbd" in whole:  # a partial character decodes to U+FFFD: no text to compare with
                continue
            assert whole == base + tokens[i], (name, i, whole, tokens[i])
            checked += 1
        assert checked > 50, name


def test_every_parameter_composes(llama):
    """n, seeds, stop strings, logprobs, streaming and batching all work under a constraint."""
    p = dict(json_schema=PERSON, max_new_tokens=200, temperature=1.0)
    alone = llama.generate("Hi", seed=3, **p)
    batched = llama.generate(["Hi", "Other prompt"], seed=3, **p)[0]
    assert batched.choices[0].token_ids == alone.choices[0].token_ids
    streamed = llama.stream("Hi", seed=3, **p)
    assert "".join(streamed) == alone.text
    assert streamed.completion.choices[0].token_ids == alone.choices[0].token_ids
    many = llama.generate("Hi", seed=3, n=4, **p)
    assert many.choices[0].token_ids == alone.choices[0].token_ids
    assert len({c.text for c in many.choices}) > 1
    for c in many.choices:
        jsonschema.validate(json.loads(c.text), PERSON)
    # logprobs are the raw model distribution's, as without a constraint
    lp = llama.generate("Hi", seed=3, logprobs=2, **p).choices[0]
    assert lp.token_ids == alone.choices[0].token_ids
    raw = llama.logits(llama.tokenizer.encode("Hi") + lp.token_ids[:1])[-2].astype(np.float64)
    want = raw[lp.token_ids[0]] - np.log(np.exp(raw - raw.max()).sum()) - raw.max()
    assert abs(lp.logprobs[0].logprob - want) < 1e-4
    # a stop string ends the text early, inside the grammar
    cut = llama.generate("Hi", seed=3, stop=['"age"'], **p).choices[0]
    assert cut.finish_reason == "stop" and alone.text.startswith(cut.text) and '"age"' not in cut.text


def test_cut_short_says_length(llama):
    c = llama.generate("Hi", json_schema=PERSON, max_new_tokens=3, temperature=0).choices[0]
    assert c.finish_reason == "length" and len(c.token_ids) == 3
    with pytest.raises(json.JSONDecodeError):
        json.loads(c.text)


def test_forced_tokens_draw_no_random_number(llama):
    """A grammar that allows one text only takes it without sampling, whatever the seed."""
    texts = {llama.generate("Hi", regex="fixed text", seed=s, max_new_tokens=30).text for s in range(4)}
    assert texts == {"fixed text"}


@pytest.mark.parametrize("kw, message", [
    (dict(json_schema={"type": "bogus"}), "json_schema: .*bogus"),
    (dict(json_schema="{not json"), "json_schema is not valid JSON"),
    (dict(json_schema=False), "no output can satisfy it"),
    (dict(json_schema=42), "json_schema must be a JSON schema"),
    (dict(regex="(unclosed"), "regex: "),
    (dict(regex=""), "regex must not be empty"),
    (dict(grammar="start: undefined_rule"), "grammar: .*undefined_rule"),
    (dict(regex="a", grammar='start: "a"'), "at most one of"),
    (dict(response_format={"type": "xml"}), "response_format: type 'xml'"),
    (dict(response_format={"type": "json_schema"}), '"json_schema" object'),
    (dict(json_schema={"type": "string", "minLength": 5, "maxLength": 2}), "json_schema: "),
])
def test_bad_constraints_are_refused_before_generation(llama, kw, message):
    with pytest.raises(cw.InvalidArgument, match=message):
        llama.generate("Hi", max_new_tokens=4, **kw)
    with pytest.raises(cw.InvalidArgument, match=message):
        llama.stream("Hi", max_new_tokens=4, **kw)


def test_response_format_and_pydantic_models(llama):
    import pydantic

    class Point(pydantic.BaseModel):
        x: int
        y: int

    assert constraint_from(json_schema=Point)[1] == constraint_from(response_format=Point)[1]
    rf = {"type": "json_schema", "json_schema": {"name": "point", "schema": Point.model_json_schema(), "strict": True}}
    for seed in range(4):
        c = llama.generate("P:", response_format=rf, seed=seed, max_new_tokens=200).choices[0]
        if c.finish_reason == "stop":
            Point.model_validate_json(c.text)
    assert constraint_from(response_format={"type": "text"}) is None
    # any JSON object: a random-weight model may never close its first string, so only finished ones are parsed
    finished = [c for c in samples(llama, "P:", 16, response_format={"type": "json_object"})
                if c.finish_reason == "stop"]
    assert finished
    for c in finished:
        assert isinstance(json.loads(c.text), dict)


def test_lark_grammar_with_embedded_json(llama):
    g = 'start: "call " NAME " " args\nNAME: /[a-z]{1,6}/\nargs: %json {"type": "object", "properties": ' \
        '{"n": {"type": "integer", "minimum": 0, "maximum": 9}}, "required": ["n"], "additionalProperties": false}'
    for c in samples(llama, "Do:", 6, grammar=g):
        assert c.finish_reason == "stop", c.text
        m = re.fullmatch(r"call ([a-z]{1,6}) (.*)", c.text, re.S)
        assert m and 0 <= json.loads(m.group(2))["n"] <= 9


def test_sentencepiece_gguf_vocabulary(tmp_path):
    """A GGUF with a SentencePiece vocabulary (▁ for spaces, <0xXX> byte tokens; tokenizer.ggml.model "llama"):
    sampled text matches regexes with spaces and characters only byte fallback spells, and JSON validates."""
    from gguf_util import write_llama_gguf

    spm = json.loads((DATA / "spm-llamacpp.json").read_text())
    model = cw.load(write_llama_gguf(DATA / "llama-tiny", tmp_path / "spm.gguf", spm=spm))
    pattern = "[a-z]{1,6}( [a-z]{1,6}){1,3}( (é|ß|€|日本)){0,2}"
    for c in samples(model, "Words:", 12, regex=pattern, max_new_tokens=80):
        assert c.finish_reason == "stop" and re.fullmatch(pattern, c.text), c.text
    for c in samples(model, "Data:", 8, json_schema=PERSON, max_new_tokens=200):
        assert c.finish_reason == "stop", c.text
        jsonschema.validate(json.loads(c.text), PERSON)
    assert any("€" in c.text or "é" in c.text or "ß" in c.text or "日本" in c.text
               for c in samples(model, "Words:", 12, regex=pattern, max_new_tokens=80))


def test_a_wordpiece_vocabulary_is_refused_by_name():
    tok = json.loads((DATA / "minilm-reference" / "tokenizer.json").read_text()) \
        if (DATA / "minilm-reference" / "tokenizer.json").exists() else None
    spec = tok or {"decoder": {"type": "WordPiece"}, "model": {"vocab": {"a": 0}}}
    with pytest.raises(ValueError, match="needs a byte-level BPE or SentencePiece vocabulary; this tokenizer's "
                                         "decoder is WordPiece"):
        rc.token_bytes(spec, 10)


@pytest.fixture(scope="module")
def smol():
    from candlewick.default_model import smollm2_path

    return cw.load(smollm2_path())


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(schema=SCHEMAS)
def test_smollm2_json_validates_against_drawn_schemas(smol, schema):
    """The same on a real model (SmolLM2-135M-Instruct Q4_1, its GGUF vocabulary), in a chat."""
    ids = smol.tokenizer.apply_chat_template([{"role": "user", "content": "Answer in JSON."}], tokenize=True)
    for c in samples(smol, ids, 4, max_new_tokens=400, json_schema=schema):
        assert c.finish_reason == "stop", (schema, c.text)
        jsonschema.validate(json.loads(c.text), schema)
