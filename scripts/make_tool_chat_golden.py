"""Write tests/data/tool-chat/reference.json: a whole tool round trip (tools declared, assistant tool_calls, tool
results, the answer) rendered by transformers' apply_chat_template(messages, tools=...) with
tests/data/tool-chat/hermes_template.jinja on the qwen2-tiny tokenizer.

The conversation is stored twice: as transformers documents it (tool_calls with arguments as objects) and as an
OpenAI client sends it (arguments as JSON text, call ids, tool_call_id); tests/test_tools.py checks that the
server's conversion of the second renders exactly what transformers renders for the first.

Needs transformers (no torch): python scripts/make_tool_chat_golden.py
"""
import json
import pathlib

from transformers import PreTrainedTokenizerFast

ROOT = pathlib.Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "data" / "tool-chat"

TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "The current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                        "unit": {"enum": ["celsius", "fahrenheit"]}},
                       "required": ["city"]}}},
    {"type": "function", "function": {
        "name": "get_time", "description": "The local time in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}},
]
CALLS = [("call_1", "get_weather", {"city": "Paris"}), ("call_2", "get_weather", {"city": "Rome", "unit": "celsius"})]
RESULTS = [("call_1", "18 C, sunny"), ("call_2", "22 C, cloudy")]
HEAD = [{"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What's the weather in Paris and in Rome?"}]
TAIL = [{"role": "assistant", "content": "Paris: 18 C and sunny. Rome: 22 C and cloudy."},
        {"role": "user", "content": "Thanks! And the time in Paris?"}]

TRANSFORMERS = HEAD + [
    {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": n, "arguments": a}} for _, n, a in CALLS]},
    *({"role": "tool", "content": c} for _, c in RESULTS),
] + TAIL
OPENAI = HEAD + [
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": i, "type": "function", "function": {"name": n, "arguments": json.dumps(a)}} for i, n, a in CALLS]},
    *({"role": "tool", "tool_call_id": i, "content": c} for i, c in RESULTS),
] + TAIL


def main():
    template = (OUT / "hermes_template.jinja").read_text()
    tok = PreTrainedTokenizerFast(tokenizer_file=str(ROOT / "tests" / "data" / "qwen2-tiny" / "tokenizer.json"))
    cases = []
    for name, messages, tools in [("round_trip", TRANSFORMERS, TOOLS), ("first_turn", HEAD, TOOLS),
                                  ("no_tools", HEAD, None)]:
        rendered = tok.apply_chat_template(messages, tools=tools, chat_template=template, tokenize=False,
                                           add_generation_prompt=True)
        openai_messages = OPENAI if name == "round_trip" else HEAD
        cases.append({"name": name, "transformers_messages": messages, "openai_messages": openai_messages,
                      "tools": tools, "rendered": rendered})
    import transformers
    (OUT / "reference.json").write_text(json.dumps(
        {"made_by": f"transformers {transformers.__version__} apply_chat_template", "template": "hermes_template.jinja",
         "cases": cases}, indent=1, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
