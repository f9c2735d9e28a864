"""`candlewick.Tokenizer`: Hugging Face tokenizers (in Rust) plus the checkpoint's chat template (jinja2)."""
from __future__ import annotations

import json
import os
import re
from functools import cache, cached_property
from typing import Any, Iterable, Mapping, Sequence

from . import _native
from .chat_template import TemplateError, render, special_tokens_map
from .errors import InvalidArgument, TokenizerError


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


_BYTE_FALLBACK = re.compile(r"<0x[0-9A-Fa-f]{2}>")


@cache
def _byte_level_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, character -> byte: the printable Latin-1 bytes stand for themselves, the other
    68 bytes for U+0100 onwards, in byte order (so 'Ġ' is the space byte)."""
    keep = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    moved = [b for b in range(256) if b not in keep]
    return {**{chr(b): b for b in keep}, **{chr(0x100 + n): b for n, b in enumerate(moved)}}


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
        try:
            text = render(
                template, _check_messages(messages), add_generation_prompt=add_generation_prompt,
                special_tokens=self._template_special_tokens, **kwargs,
            )
        except TemplateError as e:
            raise InvalidArgument(f"chat template: {e}") from None
        return self.encode(text, add_special_tokens=False) if tokenize else text

    @cached_property
    def _template_special_tokens(self) -> dict[str, Any]:
        """The special tokens a chat template sees, as transformers passes them: the named ones, and the
        additional_special_tokens list of tokenizer_config.json (read here; the native tokenizer keeps names only)."""
        return special_tokens_map(self.special_tokens, self._additional_special_tokens())

    def _additional_special_tokens(self) -> list[Any]:
        source = self._native.source
        if source.endswith(".gguf"):
            return []
        path = os.path.join(os.path.dirname(source), "tokenizer_config.json")
        try:
            with open(path, encoding="utf-8") as f:
                config = json.load(f)
        except (OSError, ValueError):  # absent (GPT-2); a malformed file was refused when the tokenizer loaded
            return []
        extra = config.get("additional_special_tokens") if isinstance(config, dict) else None
        return list(extra) if isinstance(extra, list) else []

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes token `token_id` stands for. Mostly the UTF-8 of its text, but a byte-level BPE token (GPT-2,
        Llama 3, Qwen) or a byte-fallback token (<0xE2>, SentencePiece) may hold part of a UTF-8 character,
        which its decoded text shows only as U+FFFD."""
        text = self.decode([token_id], skip_special_tokens=False)
        if "\ufffd" not in text:
            return text.encode("utf-8")
        token = self.id_to_token(token_id)
        if _BYTE_FALLBACK.fullmatch(token):
            return bytes([int(token[3:5], 16)])
        alphabet = _byte_level_decoder()
        if all(c in alphabet for c in token):
            return bytes(alphabet[c] for c in token)
        return text.encode("utf-8")

    def __repr__(self) -> str:
        return f"Tokenizer({self._native.source!r}, vocab_size={self.vocab_size})"
