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

And what transformers does not do: a render is bounded (RENDER_SECONDS, RENDER_BYTES, and `*` / `**` that would
build huge values), since a template is code from a downloaded file; a template that passes the bounds renders
exactly as transformers renders it.
"""
from __future__ import annotations

import collections.abc
import json
import time
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


# A template is code from a file: it runs sandboxed (no attribute or function outside jinja's safe set) and
# bounded. A render that runs longer than this, or writes more than the larger of these, is a TemplateError.
RENDER_SECONDS = 10.0
RENDER_BYTES = 16 << 20
# `*` and `**` in a template (jinja's sandbox leaves them unbounded: 'x' * 10**10 would take the memory)
MAX_REPEAT = 1 << 20


class _Bounds:
    """The running render's deadline (one render per thread at a time)."""

    local = __import__("threading").local()

    @classmethod
    def check(cls) -> None:
        deadline = getattr(cls.local, "deadline", None)
        if deadline is not None and time.monotonic() > deadline:
            raise jinja2.exceptions.TemplateError(f"the chat template ran for more than {RENDER_SECONDS:.0f} s")


class _BoundedEnvironment(ImmutableSandboxedEnvironment):
    intercepted_binops = frozenset(["*", "**"])

    def call_binop(self, context, operator, left, right):
        if operator == "**" and isinstance(left, (int, float)) and isinstance(right, (int, float)) and \
                abs(right) > 64 and abs(left) > 1:
            raise jinja2.exceptions.SecurityError(f"{left!r} ** {right!r} is too large for a chat template")
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and len(seq) * n > MAX_REPEAT:
                    raise jinja2.exceptions.SecurityError(
                        f"a sequence repeated {n} times is too large for a chat template")
        return super().call_binop(context, operator, left, right)

    def call(self, __context, __obj, *args, **kwargs):
        _Bounds.check()  # every call a template makes (filters, methods, range ...) checks the clock
        return super().call(__context, __obj, *args, **kwargs)


class _BoundedRange(collections.abc.Sequence):
    """range, as the sandbox allows it (at most MAX_RANGE items), checking the clock as a loop goes over it; it
    prints, measures, indexes and slices as the range it wraps."""

    def __init__(self, r: range):
        self.r = r

    def __iter__(self):
        for i, x in enumerate(self.r):
            if i % 1024 == 0:
                _Bounds.check()
            yield x

    def __reversed__(self):
        return iter(_BoundedRange(self.r[::-1]))

    def __len__(self) -> int:
        return len(self.r)

    def __getitem__(self, i):
        x = self.r[i]
        return _BoundedRange(x) if isinstance(x, range) else x

    def __contains__(self, x) -> bool:
        return x in self.r

    def __eq__(self, other) -> bool:
        return self.r == (other.r if isinstance(other, _BoundedRange) else other)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return repr(self.r)


def _bounded_range(*args) -> _BoundedRange:
    return _BoundedRange(jinja2.sandbox.safe_range(*args))


@lru_cache(maxsize=16)
def compile_template(source: str) -> jinja2.Template:
    """The template compiled in transformers' environment (cached: a checkpoint renders many chats)."""
    env = _BoundedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_Generation, "jinja2.ext.loopcontrols"]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["range"] = _bounded_range
    try:
        return env.from_string(source)
    except (RecursionError, MemoryError):
        # jinja's parser and compiler recurse once per level of nesting: ((((... thousands deep overflows them
        raise jinja2.exceptions.TemplateSyntaxError("the chat template is nested too deeply", 1) from None


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
    compiled = compile_template(template)
    _Bounds.local.deadline = time.monotonic() + RENDER_SECONDS
    try:
        out, size = [], 0
        for chunk in compiled.generate(messages=list(messages), tools=tools, documents=documents,
                                       add_generation_prompt=add_generation_prompt, **context):
            size += len(chunk)
            if size > RENDER_BYTES:
                raise jinja2.exceptions.TemplateError(f"the chat template wrote more than {RENDER_BYTES >> 20} MiB")
            _Bounds.check()
            out.append(chunk)
        return "".join(out)
    except jinja2.exceptions.SecurityError as e:
        raise jinja2.exceptions.TemplateError(f"the chat template did something a template may not: {e}") from None
    except jinja2.exceptions.TemplateError:
        raise
    except (TypeError, ValueError, KeyError, IndexError, AttributeError, ArithmeticError, RecursionError) as e:
        # a template (or the messages it was given) that fails while it runs: an error of the template, named
        raise jinja2.exceptions.TemplateError(f"the chat template failed: {type(e).__name__}: {e}") from None
    finally:
        _Bounds.local.deadline = None


__all__ = ["render", "compile_template", "special_tokens_map", "SPECIAL_TOKEN_NAMES", "TemplateError",
           "RENDER_SECONDS", "RENDER_BYTES"]
