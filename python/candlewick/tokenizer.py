"""`candlewick.Tokenizer`: Hugging Face tokenizers (in Rust) plus the checkpoint's chat template (jinja2)."""
from __future__ import annotations

import json
import os
from datetime import datetime
from functools import lru_cache
from typing import Any, Iterable, Mapping, Sequence

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment

from . import _native
from .errors import InvalidArgument, TokenizerError


class _GenerationTag(Extension):
    """`{% generation %}...{% endgeneration %}`: transformers marks assistant text with it; it renders its body."""

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
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    # The environment transformers' apply_chat_template uses, so that templates render byte for byte the same.
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, "jinja2.ext.loopcontrols"]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(template)


def _check_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict]:
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Iterable):
        raise InvalidArgument("messages must be a list of {'role': ..., 'content': ...} dicts")
    checked = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise InvalidArgument(f"messages[{i}] must be a dict with 'role' and 'content', got {type(m).__name__}")
        for field in ("role", "content"):
            if field not in m:
                raise InvalidArgument(f"messages[{i}] has no {field!r}")
        if not isinstance(m["role"], str):
            raise InvalidArgument(f"messages[{i}]['role'] must be a string, got {m['role']!r}")
        checked.append(dict(m))
    if not checked:
        raise InvalidArgument("messages is empty")
    return checked


class Tokenizer:
    """A checkpoint's tokenizer: encode/decode with HF `tokenizers`, its stop ids and its chat template.

    >>> tok = Tokenizer.from_pretrained("tests/data/gpt2-tiny")
    >>> tok.encode("Hello world")
    [15496, 995]
    >>> tok.decode([15496, 995])
    'Hello world'
    """

    def __init__(self, native: _native.Tokenizer):
        self._native = native

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> "Tokenizer":
        """Load from a checkpoint folder, a tokenizer.json (its folder is read for tokenizer_config.json,
        config.json and generation_config.json) or a hub id ("org/name", through the huggingface_hub cache)."""
        from . import hub

        name = os.fspath(path)
        if not os.path.exists(name):
            if not hub.is_hub_id(name):
                raise TokenizerError(f"{name}: no such file or folder")
            name = hub.resolve(name, allow_patterns=hub.TOKENIZER_FILES)
        return cls(_native.Tokenizer.from_pretrained(name))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; `add_special_tokens` adds what the checkpoint's post-processor adds (BOS, [CLS]...)."""
        return self._native.encode(text, add_special_tokens)

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = True) -> list[list[int]]:
        """Encode many texts in parallel, with the GIL released."""
        return self._native.encode_batch(list(texts), add_special_tokens)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._native.decode([int(i) for i in ids], skip_special_tokens)

    def decoder(self, skip_special_tokens: bool = True) -> _native.IncrementalDecoder:
        """A streaming decoder: `step(id)` returns the text that token completes (never half a character),
        `finish()` the rest; the pieces join to exactly `decode(ids)`."""
        return self._native.decoder(skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._native.token_to_id(token)

    def id_to_token(self, id: int) -> str:
        return self._native.id_to_token(id)

    @property
    def vocab_size(self) -> int:
        return self._native.vocab_size

    def __len__(self) -> int:
        return self._native.vocab_size

    @property
    def bos_token_id(self) -> int | None:
        return self._native.bos_token_id

    @property
    def pad_token_id(self) -> int | None:
        return self._native.pad_token_id

    @property
    def eos_token_ids(self) -> list[int]:
        """Every id that ends generation: config.json, generation_config.json and the tokenizer's eos token."""
        return self._native.eos_token_ids

    @property
    def eos_token_id(self) -> int | None:
        ids = self._native.eos_token_ids
        return ids[0] if ids else None

    @property
    def special_tokens(self) -> dict[str, str]:
        """bos_token, eos_token, pad_token, ... by name, as the chat template sees them."""
        return self._native.special_tokens

    @property
    def chat_template(self) -> str | None:
        return self._native.chat_template

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        *,
        tokenize: bool = False,
        chat_template: str | None = None,
        **kwargs: Any,
    ) -> str | list[int]:
        """Render `messages` with the checkpoint's jinja chat template, exactly as transformers does.

        Extra keyword arguments (tools, documents, ...) are passed to the template. With `tokenize=True` the
        rendering is encoded without adding special tokens again (the template already holds them)."""
        template = chat_template or self.chat_template
        if template is None:
            raise TokenizerError(f"{self._native.source}: the checkpoint has no chat template")
        context = {**self.special_tokens, **kwargs}
        try:
            text = _compile(template).render(
                messages=_check_messages(messages), add_generation_prompt=add_generation_prompt, **context
            )
        except jinja2.TemplateError as e:
            raise InvalidArgument(f"chat template: {e}") from None
        return self.encode(text, add_special_tokens=False) if tokenize else text

    def __repr__(self) -> str:
        return f"Tokenizer({self._native.source!r}, vocab_size={self.vocab_size})"
