"""Tool calling and response_format through the server, with the official openai client and LangChain.

tests/data/tool-chat/reference.json holds a whole tool round trip rendered by transformers'
apply_chat_template(messages, tools=...) (scripts/make_tool_chat_golden.py); the server's conversion of the same
conversation in OpenAI's wire format must render exactly that. SmolLM2's template has no tool support, so it
exercises the documented fallback; constrained calls must validate against the declared parameter schemas."""
from __future__ import annotations

import json

import jsonschema
import pydantic
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import candlewick as cw
from candlewick.default_model import smollm2_path
from candlewick.server import create_app
from candlewick.server.schemas import ChatMessage
from candlewick.tools import CallParser, call_grammar, parse_reply, template_takes_tools, tool_plan

from conftest import DATA, copy_checkpoint
from test_server import KEY, Server, serving

GOLDEN = json.loads((DATA / "tool-chat" / "reference.json").read_text())
TEMPLATE = (DATA / "tool-chat" / GOLDEN["template"]).read_text()
TOOLS = GOLDEN["cases"][0]["tools"]
WEATHER = TOOLS[0]["function"]["parameters"]
ASK = [{"role": "user", "content": "What's the weather in Paris?"}]


def wire(messages):
    """Messages as the server reads them off the wire (pydantic, then for_template)."""
    return [ChatMessage.model_validate(m).for_template() for m in messages]


@pytest.mark.parametrize("case", GOLDEN["cases"], ids=lambda c: c["name"])
def test_tool_round_trip_renders_as_transformers(case):
    tok = cw.Tokenizer.from_pretrained(DATA / "qwen2-tiny")
    assert template_takes_tools(TEMPLATE)
    plan = tool_plan(wire(case["openai_messages"]), case["tools"], None, True, TEMPLATE)
    kwargs = {"tools": plan.template_tools} if plan.template_tools else {}
    assert tok.apply_chat_template(plan.messages, chat_template=TEMPLATE, **kwargs) == case["rendered"]
    # and transformers' own message format renders the same here as there
    kwargs = {"tools": case["tools"]} if case["tools"] else {}
    assert tok.apply_chat_template(case["transformers_messages"], chat_template=TEMPLATE, **kwargs) == case["rendered"]


def test_fallback_for_templates_without_tools():
    tok = cw.Tokenizer.from_pretrained(DATA / "qwen2-tiny")
    assert not template_takes_tools(tok.chat_template)
    case = GOLDEN["cases"][0]
    plan = tool_plan(wire(case["openai_messages"]), TOOLS, "auto", True, tok.chat_template)
    text = tok.apply_chat_template(plan.messages)
    assert plan.template_tools is None and plan.parse
    assert text.count('"name": "get_weather"') == 3          # once in <tools>, once per earlier call
    assert "<tool_response>\n18 C, sunny\n</tool_response>" in text
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.\n\nYou may call one or more functions")
    assert all(m["role"] in ("system", "user", "assistant") for m in plan.messages)


CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


@settings(max_examples=60, deadline=None)
@given(before=st.sampled_from(["", "Sure. ", "<tool", "a < b "]), cuts=st.lists(st.integers(0, 200), max_size=8),
       calls=st.integers(0, 2))
def test_streamed_calls_equal_the_whole_parse(before, cuts, calls):
    text = before + "\n".join([CALL] * calls)
    whole = parse_reply(text, ["get_weather"])
    p, events, last = CallParser(["get_weather"]), [], 0
    for c in sorted(set(min(c, len(text)) for c in cuts)) + [len(text)]:
        events += p.feed(text[last:c])
        last = c
    events += p.finish()
    content = "".join(v for k, v in events if k == "content").strip() or None
    got = [v["function"] for k, v in events if k == "call"]
    assert (content, got) == (whole[0], [c["function"] for c in whole[1]])
    assert len(got) == calls and content == (before.strip() or None)


def test_parser_edge_cases():
    names = ["get_weather"]
    assert parse_reply('{"name": "get_weather", "parameters": {"city": "Rome"}}', names)[1][0]["function"] == \
        {"name": "get_weather", "arguments": '{"city": "Rome"}'}
    assert parse_reply('<tool_call>\n{"name": "other", "arguments": {}}\n</tool_call>', names)[1] == []
    assert parse_reply("<tool_call>not json</tool_call>", names) == ("<tool_call>not json</tool_call>", [])
    assert parse_reply('{"city": "Rome"}', names) == ('{"city": "Rome"}', [])
    assert parse_reply("plain text", names) == ("plain text", [])


@pytest.mark.parametrize("choice, message", [
    ({"type": "function", "function": {"name": "nope"}}, "does not declare"),
    ("sometimes", "tool_choice must be"),
    ("required", "needs tools"),
])
def test_bad_tool_choice(choice, message):
    with pytest.raises(cw.InvalidArgument, match=message):
        tool_plan(ASK, TOOLS if message != "needs tools" else None, choice, True, TEMPLATE)


@pytest.mark.parametrize("tools, message", [
    ([{"type": "function"}], r"tools\[0\] must be"),
    ([{"type": "function", "function": {"name": "has space"}}], "function.name must be"),
    ([TOOLS[0], TOOLS[0]], "declared twice"),
])
def test_bad_tools(tools, message):
    with pytest.raises(cw.InvalidArgument, match=message):
        tool_plan(ASK, tools, "auto", True, TEMPLATE)


# -- the server, with the openai client --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def smol():
    return cw.load(smollm2_path())


@pytest.fixture(scope="module")
def server(smol):
    yield from serving(smol, "smollm2")


@pytest.fixture(scope="module")
def client(server):
    return server.client()


def test_required_calls_validate_against_their_schemas(client):
    for seed in range(8):
        parallel = seed % 2 == 1   # parallel calls may go on until max_tokens: then the reason is "length"
        r = client.chat.completions.create(model="smollm2", messages=ASK, tools=TOOLS, tool_choice="required",
                                           temperature=1.0, seed=seed, max_tokens=200, parallel_tool_calls=parallel)
        ch = r.choices[0]
        assert ch.finish_reason == "tool_calls" or (parallel and ch.finish_reason == "length"), ch
        assert ch.message.tool_calls and (parallel or len(ch.message.tool_calls) == 1)
        for call in ch.message.tool_calls:
            assert call.type == "function" and call.id.startswith("call_")
            schema = next(t["function"]["parameters"] for t in TOOLS if t["function"]["name"] == call.function.name)
            jsonschema.validate(json.loads(call.function.arguments), schema)


def test_named_function_streamed_equals_whole(client):
    choice = {"type": "function", "function": {"name": "get_time"}}
    whole = client.chat.completions.create(model="smollm2", messages=ASK, tools=TOOLS, tool_choice=choice,
                                           temperature=0, max_tokens=100)
    calls = whole.choices[0].message.tool_calls
    assert [c.function.name for c in calls] == ["get_time"]
    stream = client.chat.completions.create(model="smollm2", messages=ASK, tools=TOOLS, tool_choice=choice,
                                            temperature=0, max_tokens=100, stream=True)
    deltas, finish = [], None
    for chunk in stream:
        d = chunk.choices[0].delta
        deltas += d.tool_calls or []
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls"
    assert [(d.index, d.function.name, d.function.arguments) for d in deltas] == \
        [(0, c.function.name, c.function.arguments) for c in calls]


def test_tool_round_trip_and_none(client, smol):
    r = client.chat.completions.create(model="smollm2", messages=ASK, tools=TOOLS, tool_choice="required",
                                       parallel_tool_calls=False, temperature=0, max_tokens=100)
    msg = r.choices[0].message
    assert len(msg.tool_calls) == 1
    follow = ASK + [msg.model_dump(exclude_none=True),
                    {"role": "tool", "tool_call_id": msg.tool_calls[0].id, "content": "18 C, sunny"}]
    r2 = client.chat.completions.create(model="smollm2", messages=follow, tools=TOOLS, temperature=0,
                                        max_tokens=30)
    plan = tool_plan(wire(follow), TOOLS, "auto", True, smol.tokenizer.chat_template)
    assert r2.usage.prompt_tokens == len(smol.tokenizer.apply_chat_template(plan.messages, tokenize=True))
    assert r2.choices[0].finish_reason in ("stop", "length", "tool_calls")
    # "none": the tools are not rendered, the reply is the plain chat's
    r3 = client.chat.completions.create(model="smollm2", messages=ASK, tools=TOOLS, tool_choice="none",
                                        temperature=0, max_tokens=20)
    assert r3.choices[0].message.content == smol.chat(ASK, temperature=0, max_new_tokens=20).text
    assert r3.choices[0].message.tool_calls is None


def test_auto_parses_what_the_model_writes(client, smol):
    """With "auto" the reply is the model's own text, parsed: content and calls as parse_reply reads the same
    text from the Python API (the logit bias makes SmolLM2 open a <tool_call> block, which a 135M model rarely
    does by itself)."""
    first = smol.tokenizer.encode("<tool_call>")[0]
    r = client.chat.completions.create(model="smollm2", messages=ASK, tools=TOOLS, temperature=0, max_tokens=60,
                                       logit_bias={str(first): 100})
    plan = tool_plan(wire(ASK), TOOLS, "auto", True, smol.tokenizer.chat_template)
    ids = smol.tokenizer.apply_chat_template(plan.messages, tokenize=True)
    text = smol.generate(ids, temperature=0, max_new_tokens=60, logit_bias={first: 100}).text
    content, calls = parse_reply(text, ["get_weather", "get_time"])
    msg = r.choices[0].message
    assert msg.content == (content if calls else text)
    assert [(c.function.name, c.function.arguments) for c in msg.tool_calls or []] == \
        [(c["function"]["name"], c["function"]["arguments"]) for c in calls]


def test_response_format_and_parse(client, smol):
    class City(pydantic.BaseModel):
        name: str
        country: str
        population: int

    r = client.chat.completions.parse(model="smollm2", messages=[{"role": "user", "content": "Paris as JSON"}],
                                      response_format=City, temperature=0, max_tokens=200)
    city = r.choices[0].message.parsed
    assert isinstance(city, City) and r.choices[0].finish_reason == "stop"
    # the same text as the Python API with the schema the client sent
    from openai.lib._pydantic import to_strict_json_schema
    same = smol.chat([{"role": "user", "content": "Paris as JSON"}], json_schema=to_strict_json_schema(City),
                     temperature=0, max_new_tokens=200)
    assert r.choices[0].message.content == same.text
    for seed in range(4):
        r = client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "A cat, as JSON"}],
                                           response_format={"type": "json_object"}, temperature=1, seed=seed,
                                           max_tokens=300)
        if r.choices[0].finish_reason == "stop":
            assert isinstance(json.loads(r.choices[0].message.content), dict)
    c = client.completions.create(model="smollm2", prompt="Numbers:", max_tokens=40, temperature=0,
                                  extra_body={"response_format": {"type": "json_schema", "json_schema": {
                                      "name": "n", "schema": {"type": "array", "items": {"type": "integer"},
                                                              "maxItems": 3}}}})
    assert all(isinstance(x, int) for x in json.loads(c.choices[0].text))


def test_bad_requests_are_400s(client):
    cases = [
        dict(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "nope"}}),
        dict(tools=[{"type": "nope"}]),
        dict(tools=TOOLS, response_format={"type": "json_object"}),
        dict(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "bogus"}}}),
        dict(response_format={"type": "yaml"}),
    ]
    import openai
    for kw in cases:
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="smollm2", messages=ASK, max_tokens=5, **kw)
        assert e.value.status_code == 400 and e.value.body["message"], kw


def test_constrained_grammar_is_compact():
    g = call_grammar(TOOLS, None, True)
    assert g.startswith('start: call ("\\n" call)*')
    assert '"x-guidance"' in g


def test_template_with_tools_through_the_server(tmp_path):
    """A checkpoint whose template takes tools: the server renders them natively (prompt tokens as transformers'
    rendering), and constrained calls still come back whole."""
    # (a longer context than the fixture's 256 positions, for the tools' system text; logits do not matter here)
    folder = copy_checkpoint(DATA / "qwen2-tiny", tmp_path / "qwen2-tools",
                             config_edit=lambda c: c.update(max_position_embeddings=2048))
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    cfg["chat_template"] = TEMPLATE
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    model = cw.load(folder)
    s = Server(create_app(model, "q", api_key=KEY))
    try:
        c = s.client()
        case = GOLDEN["cases"][1]
        r = c.chat.completions.create(model="q", messages=case["openai_messages"], tools=TOOLS, max_tokens=1,
                                      tool_choice="required", temperature=0)
        assert r.usage.prompt_tokens == len(model.tokenizer.encode(case["rendered"], add_special_tokens=False))
        # random weights write strings without end: a tool whose arguments are bounded finishes
        pick = [{"type": "function", "function": {"name": "pick", "parameters": {
            "type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}},
            "required": ["n"], "additionalProperties": False}}}]
        for seed in range(4):
            r = c.chat.completions.create(model="q", messages=case["openai_messages"], tools=pick, max_tokens=60,
                                          tool_choice="required", temperature=1, seed=seed,
                                          parallel_tool_calls=False)
            assert r.choices[0].finish_reason == "tool_calls"
            (call,) = r.choices[0].message.tool_calls
            assert call.function.name == "pick" and 0 <= json.loads(call.function.arguments)["n"] <= 9
    finally:
        s.stop()


def test_langchain(server):
    import langchain_openai as lc

    class Weather(pydantic.BaseModel):
        """The weather in a city."""
        city: str
        celsius: int

    llm = lc.ChatOpenAI(model="smollm2", base_url=server.url + "/v1", api_key=KEY, temperature=0, max_tokens=120,
                        max_retries=0)
    out = llm.with_structured_output(Weather, method="json_schema").invoke("The weather in Paris, please.")
    assert isinstance(out, Weather)
    bound = llm.bind_tools([Weather], tool_choice="Weather")
    msg = bound.invoke("The weather in Paris, please.")
    assert msg.tool_calls and msg.tool_calls[0]["name"] == "Weather"
    Weather.model_validate(msg.tool_calls[0]["args"])
    fc = llm.with_structured_output(Weather, method="function_calling").invoke("Weather in Rome?")
    assert isinstance(fc, Weather)
