"""Tool calling: OpenAI's `tools` and `tool_choice` for chat templates, constrained calls, and parsing calls back.

How a request with tools runs (the server's /v1/chat/completions, and `tool_plan` for any caller):

- The tools reach the model through the checkpoint's chat template, as transformers passes them
  (`apply_chat_template(messages, tools=[{"type": "function", "function": {...}}])`); assistant messages keep their
  `tool_calls` (arguments as a dict, which is what templates print with `tojson`) and `tool` messages their
  content. A template that never reads `tools` gets the FALLBACK instead: the tools are described in a system
  message, earlier calls are written back as <tool_call> blocks, and tool results go in as user messages
  wrapped in <tool_response>.
- A call is written as `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>` (the Hermes format, which
  Qwen2.5, Hermes and SmolLM3 templates teach their models). A bare JSON object {"name": ..., "arguments" or
  "parameters": ...} naming a declared tool is read as a call too (Llama 3.1's format).
- tool_choice "auto": the model writes what it likes; calls are parsed out of its text.
  "required": the output is constrained (a grammar) to one or more calls of the declared tools with their
  parameter schemas (one only with parallel_tool_calls false); a named function: exactly one call of it.
  "none": the tools are not rendered and nothing is parsed.
- Calls come back as OpenAI tool_calls (ids "call_<hex>", arguments as JSON text) with finish_reason "tool_calls".
"""
from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Mapping, Sequence

import jinja2
from jinja2 import meta

from .errors import InvalidArgument
from .structured import with_layout

OPEN, CLOSE = "<tool_call>", "</tool_call>"


@lru_cache(maxsize=16)
def template_takes_tools(template: str) -> bool:
    """Whether a chat template reads the `tools` variable at all."""
    try:
        return "tools" in meta.find_undeclared_variables(jinja2.Environment(extensions=["jinja2.ext.loopcontrols"])
                                                         .parse(template))
    except jinja2.TemplateSyntaxError:
        return "tools" in template


def check_tools(tools: Sequence[Any]) -> list[dict]:
    """OpenAI's tools list, checked: each {"type": "function", "function": {"name", "description"?, "parameters"?}}."""
    out = []
    for i, t in enumerate(tools):
        if not isinstance(t, Mapping) or t.get("type") != "function" or not isinstance(t.get("function"), Mapping):
            raise InvalidArgument(f'tools[{i}] must be {{"type": "function", "function": {{"name": ...}}}}')
        f = t["function"]
        name = f.get("name")
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.\-]{1,64}", name):
            raise InvalidArgument(f"tools[{i}].function.name must be 1-64 letters, digits, _ . or -; got {name!r}")
        params = f.get("parameters")
        if params is not None and not isinstance(params, Mapping):
            raise InvalidArgument(f"tools[{i}].function.parameters must be a JSON schema object")
        out.append({"type": "function", "function": dict(f)})
    names = [t["function"]["name"] for t in out]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup:
        raise InvalidArgument(f"tools: the function {dup!r} is declared twice")
    return out


@dataclass
class ToolPlan:
    """What a chat request with tools becomes: the messages and `tools` to render, the grammar (Lark) that
    constrains the reply, if any, and whether calls are parsed out of the reply."""
    messages: list[dict]
    template_tools: list[dict] | None
    grammar: str | None
    parse: bool
    names: list[str]


def _arguments(raw: Any) -> Any:
    """OpenAI sends arguments as JSON text; templates print them with tojson, so they get the object."""
    if isinstance(raw, str):
        try:
            return json.loads(raw)
        except json.JSONDecodeError:
            return raw
    return raw


def _call_text(name: str, arguments: Any) -> str:
    return f"{OPEN}\n{json.dumps({'name': name, 'arguments': arguments}, ensure_ascii=False)}\n{CLOSE}"


def fallback_system_prompt(tools: list[dict]) -> str:
    """The system text that describes tools to a template without tool support."""
    lines = ["You may call one or more functions to help with the user's request. The functions are listed",
             "in <tools></tools>:", "<tools>"]
    lines += [json.dumps(t, ensure_ascii=False) for t in tools]
    lines += ["</tools>", "To call a function, reply with one block per call, each holding a JSON object with the",
              "function's name and arguments:", f'{OPEN}\n{{"name": <function-name>, "arguments": <args-json-object>}}\n{CLOSE}']
    return "\n".join(lines)


def template_messages(messages: Sequence[Mapping[str, Any]], native: bool) -> list[dict]:
    """OpenAI chat messages as a template reads them: natively (tool_calls kept, arguments as objects), or the
    FALLBACK (calls as <tool_call> text in the assistant's content, tool results as user messages)."""
    out: list[dict] = []
    for m in messages:
        m = dict(m)
        calls = m.pop("tool_calls", None) or []
        if m.get("role") == "assistant" and calls:
            fixed = []
            for c in calls:
                f = c.get("function") or {}
                fixed.append({**c, "type": c.get("type", "function"),
                              "function": {"name": f.get("name"), "arguments": _arguments(f.get("arguments"))}})
            if native:
                m["tool_calls"] = fixed
                m["content"] = m.get("content") or ""
            else:
                text = "\n".join(_call_text(c["function"]["name"], c["function"]["arguments"]) for c in fixed)
                m["content"] = (m.get("content") + "\n" if m.get("content") else "") + text
        elif m.get("role") == "tool" and not native:
            m = {"role": "user", "content": f"<tool_response>\n{m.get('content') or ''}\n</tool_response>"}
        out.append(m)
    return out


def call_grammar(tools: list[dict], only: str | None = None, parallel: bool = True) -> str:
    """A Lark grammar (llguidance's dialect) for one call, or one or more calls, of the declared functions, each
    with the arguments its parameter schema allows."""
    options = []
    for t in tools:
        f = t["function"]
        if only is not None and f["name"] != only:
            continue
        params = f.get("parameters") or {"type": "object"}
        options.append({"type": "object", "additionalProperties": False, "required": ["name", "arguments"],
                        "properties": {"name": {"const": f["name"]}, "arguments": params}})
    schema = with_layout(options[0] if len(options) == 1 else {"anyOf": options})
    repeat = ' ("\\n" call)*' if parallel and only is None else ""
    return "\n".join([f"start: call{repeat}", f'call: "{OPEN}\\n" body "\\n{CLOSE}"',
                      f"body: %json {json.dumps(schema)}"])


def tool_plan(messages: Sequence[Mapping[str, Any]], tools: Sequence[Any] | None, tool_choice: Any,
              parallel_tool_calls: bool, template: str) -> ToolPlan:
    """How to run a chat request with `tools` and `tool_choice` (OpenAI's meaning) on a checkpoint's template."""
    checked = check_tools(tools or [])
    if tool_choice is None:
        tool_choice = "auto" if checked else "none"
    only = None
    if isinstance(tool_choice, Mapping):
        only = (tool_choice.get("function") or {}).get("name")
        if tool_choice.get("type") != "function" or not isinstance(only, str):
            raise InvalidArgument('tool_choice must be "none", "auto", "required" or {"type": "function", '
                                  '"function": {"name": ...}}')
        if only not in [t["function"]["name"] for t in checked]:
            raise InvalidArgument(f"tool_choice names the function {only!r}, which tools does not declare")
    elif tool_choice not in ("none", "auto", "required"):
        raise InvalidArgument(f'tool_choice must be "none", "auto", "required" or a named function; got {tool_choice!r}')
    if tool_choice != "none" and not checked:
        raise InvalidArgument(f"tool_choice {tool_choice!r} needs tools")
    native = template_takes_tools(template)
    msgs = template_messages(messages, native)
    names = [t["function"]["name"] for t in checked]
    if tool_choice == "none" or not checked:
        return ToolPlan(msgs, None, None, False, names)
    if not native:
        prompt = fallback_system_prompt(checked)
        if msgs and msgs[0].get("role") in ("system", "developer"):
            msgs[0] = {**msgs[0], "content": f"{msgs[0].get('content') or ''}\n\n{prompt}".lstrip()}
        else:
            msgs.insert(0, {"role": "system", "content": prompt})
    grammar = None
    if tool_choice == "required" or only is not None:
        grammar = call_grammar(checked, only, parallel_tool_calls)
    return ToolPlan(msgs, checked if native else None, grammar, True, names)


# -- reading calls back --------------------------------------------------------------------------------------------

def _as_call(obj: Any, names: Sequence[str]) -> dict | None:
    if not isinstance(obj, Mapping) or obj.get("name") not in names:
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return None
    if not isinstance(args, Mapping):
        return None
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": obj["name"], "arguments": json.dumps(args, ensure_ascii=False)}}


class CallParser:
    """Reads tool calls out of a reply as it streams: `feed(text)` and `finish()` return events, ("content",
    text) for text shown to the user and ("call", tool_call) for each complete call. Text that may be the start
    of a <tool_call> block is held back until it is known."""

    def __init__(self, names: Sequence[str]):
        self.names = list(names)
        self.buf = ""
        self.calls = 0
        self.seen_content = False

    def feed(self, text: str) -> list[tuple[str, Any]]:
        self.buf += text
        events: list[tuple[str, Any]] = []
        if not self.calls and not self.seen_content and self.buf.lstrip().startswith("{"):
            return events   # the reply may be one bare JSON call: known at the end
        while True:
            start = self.buf.find(OPEN)
            if start < 0:
                keep = _partial_suffix(self.buf, OPEN)
                self._content(self.buf[:len(self.buf) - keep], events)
                self.buf = self.buf[len(self.buf) - keep:]
                return events
            end = self.buf.find(CLOSE, start)
            if end < 0:
                self._content(self.buf[:start], events)
                self.buf = self.buf[start:]
                return events
            body = self.buf[start + len(OPEN):end]
            call = self._parse(body)
            if call is None:   # not a call after all: it is text
                self._content(self.buf[:end + len(CLOSE)], events)
            else:
                self._content(self.buf[:start], events)
                events.append(("call", call))
            self.buf = self.buf[end + len(CLOSE):]

    def finish(self) -> list[tuple[str, Any]]:
        events: list[tuple[str, Any]] = []
        rest, self.buf = self.buf, ""
        if rest.startswith(OPEN):   # an unclosed last block (the grammar ends at the close; a cut reply may not)
            call = self._parse(rest[len(OPEN):])
            if call is not None:
                events.append(("call", call))
                return events
        if not self.calls and not self.seen_content:
            # the whole reply may be one bare JSON call (Llama 3.1's format)
            try:
                call = _as_call(json.loads(rest), self.names)
            except json.JSONDecodeError:
                call = None
            if call is not None:
                self.calls += 1
                return [("call", call)]
        self._content(rest, events)
        return events

    def _parse(self, body: str) -> dict | None:
        try:
            call = _as_call(json.loads(body), self.names)
        except json.JSONDecodeError:
            return None
        if call is not None:
            self.calls += 1
        return call

    def _content(self, text: str, events: list) -> None:
        if text:
            # leading whitespace between calls is not content
            if self.calls and not text.strip():
                return
            self.seen_content = True
            events.append(("content", text))


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `marker`."""
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:k]):
            return k
    return 0


def parse_reply(text: str, names: Sequence[str]) -> tuple[str | None, list[dict]]:
    """A whole reply as (content, tool_calls): the text outside the calls (None when there is none) and the calls."""
    p = CallParser(names)
    events = p.feed(text) + p.finish()
    content = "".join(v for k, v in events if k == "content").strip()
    calls = [v for k, v in events if k == "call"]
    return (content or None), calls


__all__ = ["tool_plan", "ToolPlan", "check_tools", "call_grammar", "template_messages", "template_takes_tools",
           "fallback_system_prompt", "CallParser", "parse_reply", "OPEN", "CLOSE"]
