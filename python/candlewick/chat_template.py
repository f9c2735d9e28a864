"""Chat templates: a checkpoint's jinja `chat_template` rendered exactly as transformers' `apply_chat_template`.

The one place the template environment is defined; both `candlewick.Tokenizer` (the engine) and
`candlewick.reference.tokenizer.Tokenizer` (the oracle) render through `render` below. Pure Python (jinja2 only),
so the reference may import it without the native extension.

What transformers provides, and so what is here (transformers/utils/chat_template_utils.py):
- an ImmutableSandboxedEnvironment with trim_blocks and lstrip_blocks, and the loopcontrols extension
  ({% break %}, {% continue %});
- `{% generation %}...{% endgeneration %}`, which marks the assistant's text; it renders its body (a CallBlock,
  as transformers writes it, so scoping inside the block is the same);
- `raise_exception(message)` (a TemplateError), `strftime_now(format)`, and a `tojson` filter that keeps
  non-ASCII characters and takes indent / separators / sort_keys;
- the variables `messages`, `tools` and `documents` (None unless given), `add_generation_prompt`, the special
  tokens by name (bos_token, eos_token, ..., additional_special_tokens), then the caller's keyword arguments,
  which win over a special token of the same name.
"""
from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from typing import Any, Mapping, Sequence

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment

TemplateError = jinja2.TemplateError

# The named special tokens transformers passes to a template (its SPECIAL_TOKENS_ATTRIBUTES), in its order.
SPECIAL_TOKEN_NAMES = (
    "bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token",
    "additional_special_tokens",
)


class _Generation(Extension):
    """`{% generation %}...{% endgeneration %}`: rendered as its body."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller):
        return caller()


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # jinja's own tojson escapes HTML characters and forces ASCII; transformers replaces it with plain json.dumps
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=16)
def compile_template(source: str) -> jinja2.Template:
    """The template compiled in transformers' environment (cached: a checkpoint renders many chats)."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_Generation, "jinja2.ext.loopcontrols"]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(source)


def special_tokens_map(named: Mapping[str, Any], additional: Sequence[Any] | None = None) -> dict[str, Any]:
    """The special tokens a template sees, as transformers' `special_tokens_map`: each of SPECIAL_TOKEN_NAMES that
    is set (not None, not empty), in that order. A token may be given as text or as tokenizer_config.json's
    {"content": ...}."""
    def content(t: Any) -> Any:
        return t.get("content") if isinstance(t, Mapping) else t

    out: dict[str, Any] = {}
    for name in SPECIAL_TOKEN_NAMES[:-1]:
        value = content(named.get(name))
        if value:
            out[name] = value
    extra = [content(t) for t in (additional if additional is not None else named.get(SPECIAL_TOKEN_NAMES[-1]) or [])]
    if extra:
        out[SPECIAL_TOKEN_NAMES[-1]] = extra
    return out


def render(
    template: str,
    messages: Sequence[Mapping[str, Any]],
    *,
    add_generation_prompt: bool = False,
    special_tokens: Mapping[str, Any] | None = None,
    tools: Sequence[Any] | None = None,
    documents: Sequence[Any] | None = None,
    **kwargs: Any,
) -> str:
    """`template` rendered for `messages` as transformers' apply_chat_template(tokenize=False) renders it.

    special_tokens: what `special_tokens_map` returns; kwargs: further template variables (they override a
    special token of the same name, as in transformers). Raises jinja2.TemplateError (raise_exception, syntax)."""
    context = {**(special_tokens or {}), **kwargs}
    return compile_template(template).render(
        messages=list(messages), tools=tools, documents=documents, add_generation_prompt=add_generation_prompt,
        **context,
    )


__all__ = ["render", "compile_template", "special_tokens_map", "SPECIAL_TOKEN_NAMES", "TemplateError"]
