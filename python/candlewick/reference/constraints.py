"""Constrained decoding: a grammar's token mask as a logits processor (the engine does the same in Rust).

A JSON schema, a regex or a Lark grammar says which texts are allowed. At each step, llguidance walks the
vocabulary's token trie against the grammar and returns the mask of tokens that keep the text inside it.
What the generation loop does with the mask (candlewick.reference.generate, and the engine's rust/src/constraint.rs):

  1. M = the grammar's mask of tokens that may come next (EOS is in it once the grammar may end);
  2. if M holds exactly one token, that token is taken: nothing is sampled, no random number is drawn;
  3. otherwise the logits outside M become -inf, then the usual processors (penalties ... min_p) pick the token;
  4. the grammar takes the token; once it can take nothing more, generation ends.

The grammar sees bytes, so every token needs its bytes: `token_bytes` reads them from tokenizer.json the way
each decoder would write them. llguidance (its Python package) does the grammar walking itself.
"""
from __future__ import annotations

import json

import numpy as np

from .tokenizer import bytes_to_unicode


def _decoding(decoder: dict | None, out: dict) -> dict:
    """Which decoders tokenizer.json chains: byte-level BPE, SentencePiece's byte fallback, the space character."""
    kind = (decoder or {}).get("type")
    if kind == "ByteLevel":
        out["byte_level"] = True
    elif kind == "ByteFallback":
        out["byte_fallback"] = True
    elif kind == "Metaspace":
        out["space"] = (decoder.get("replacement") or "\u2581")[0]
    elif kind == "Replace" and decoder.get("content") == " ":
        pattern = decoder.get("pattern", {}).get("String")
        if isinstance(pattern, str) and len(pattern) == 1:
            out["space"] = pattern
    elif kind == "Sequence":
        for d in decoder.get("decoders", []):
            _decoding(d, out)
    return out


def token_bytes(spec: dict, n_vocab: int) -> tuple[list[bytes], set[int]]:
    """The bytes of every token id below n_vocab, and the ids that are special (grammar text never matches
    them; ids the tokenizer lacks, a padded embedding, are special too)."""
    how = _decoding(spec.get("decoder"), {"byte_level": False, "byte_fallback": False, "space": None})
    if not (how["byte_level"] or how["byte_fallback"] or how["space"]):
        raise ValueError("constrained decoding needs a byte-level BPE or SentencePiece vocabulary; this "
                         f"tokenizer's decoder is {(spec.get('decoder') or {}).get('type', 'missing')}")
    byte_of = {c: b for b, c in bytes_to_unicode().items()}

    def piece_bytes(piece: str) -> bytes:
        if how["byte_level"]:   # every character stands for one byte; an unknown one leaves the token unusable
            return bytes(byte_of[c] for c in piece) if all(c in byte_of for c in piece) else b""
        if how["byte_fallback"] and len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            try:
                return bytes([int(piece[3:5], 16)])
            except ValueError:
                pass
        return (piece.replace(how["space"], " ") if how["space"] else piece).encode()

    out: list[bytes | None] = [None] * n_vocab
    vocab = spec["model"].get("vocab")
    entries = vocab.items() if isinstance(vocab, dict) else ((e[0], i) for i, e in enumerate(vocab or []))
    for piece, i in entries:
        if 0 <= i < n_vocab:
            out[i] = piece_bytes(piece)
    special = set()
    for t in spec.get("added_tokens", []):
        if 0 <= t["id"] < n_vocab:
            out[t["id"]] = t["content"].encode()
            if t.get("special"):
                special.add(t["id"])
    for i, b in enumerate(out):
        if b is None:
            out[i] = f"<[{i}]>".encode()
            special.add(i)
    return out, special  # type: ignore[return-value]


class Vocabulary:
    """llguidance's tokenizer for one vocabulary (built once per model: the trie of every token's bytes)."""

    def __init__(self, tokenizer, n_vocab: int):
        import llguidance

        tokens, special = token_bytes(tokenizer.spec, n_vocab)
        eos = list(tokenizer.eos_token_ids)
        if not eos:
            raise ValueError("constrained decoding needs an EOS token, and this tokenizer names none")

        class _Wrapped:  # what llguidance.TokenizerWrapper reads
            eos_token_id = eos[0]
            bos_token_id = None
            special_token_ids = sorted(special)

            def __init__(self):
                self.tokens = tokens

            def __call__(self, text):
                """Tokens that spell exactly `text`: the tokenizer's where they do, else the longest-match
                tokens (a SentencePiece encoder puts a ▁ in front of the text, a space nobody asked for)."""
                raw = text if isinstance(text, bytes) else text.encode()
                ids = tokenizer.encode(raw.decode("utf-8", "replace"), add_special_tokens=False)
                if b"".join(tokens[i] for i in ids) == raw:
                    return ids
                return _longest_match(raw, tokens, special)

        self.llg = llguidance.LLTokenizer(llguidance.TokenizerWrapper(_Wrapped()), eos_token=eos)
        self.n_vocab = n_vocab


def _longest_match(raw: bytes, tokens: list[bytes], special: set[int]) -> list[int]:
    """`raw` cut greedily into the longest ordinary tokens (every byte has one in these vocabularies)."""
    by_bytes = {}
    for i, b in enumerate(tokens):
        if b and i not in special:
            by_bytes.setdefault(b, i)
    longest = max(map(len, by_bytes))
    out, pos = [], 0
    while pos < len(raw):
        for n in range(min(longest, len(raw) - pos), 0, -1):
            if raw[pos:pos + n] in by_bytes:
                out.append(by_bytes[raw[pos:pos + n]])
                pos += n
                break
        else:
            raise ValueError(f"grammar: no token spells byte {raw[pos]:#04x}")
    return out


def grammar_text(kind: str, text: str) -> str:
    """llguidance's grammar for a (kind, text) constraint as candlewick.structured.constraint_from gives it."""
    from llguidance import LLMatcher

    if kind == "json_schema":
        return LLMatcher.grammar_from_json_schema(json.loads(text))
    if kind == "regex":
        return LLMatcher.grammar_from_regex(text)
    if kind == "grammar":
        return LLMatcher.grammar_from_lark(text)
    raise ValueError(f"constraint: unknown kind {kind!r} (json_schema, regex or grammar)")


class GrammarConstraint:
    """One sequence's grammar state: `mask()` the tokens that may come next, `consume(token)`, `is_stopped()`."""

    def __init__(self, vocabulary: Vocabulary, kind: str, text: str):
        from llguidance import LLMatcher

        grammar = grammar_text(kind, text)
        problem = LLMatcher.validate_grammar(grammar, vocabulary.llg)
        if problem:
            raise ValueError(f"{kind}: {problem}")
        self.vocabulary = vocabulary
        self.matcher = LLMatcher(vocabulary.llg, grammar, log_level=0)

    def mask(self) -> np.ndarray:
        """bool [n_vocab]: True where a token may come next."""
        from llguidance.numpy import allocate_token_bitmask, fill_next_token_bitmask

        bits = allocate_token_bitmask(1, self.vocabulary.llg.vocab_size)
        fill_next_token_bitmask(self.matcher, bits)
        if self.matcher.is_error():
            raise RuntimeError(f"grammar: {self.matcher.get_error()}")
        allowed = ((bits[0][:, None].astype(np.int64) >> np.arange(32)) & 1).reshape(-1).astype(bool)
        out = np.zeros(self.vocabulary.n_vocab, dtype=bool)
        n = min(len(out), len(allowed))
        out[:n] = allowed[:n]
        return out

    def consume(self, token: int) -> None:
        if not self.matcher.consume_token(int(token)):
            raise RuntimeError(f"grammar: token {token} is not allowed here ({self.matcher.get_error()})")

    def is_stopped(self) -> bool:
        return self.matcher.is_stopped()
