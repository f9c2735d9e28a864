"""A pure-Python tokenizer that reads tokenizer.json: byte-level BPE (GPT-2, Llama-3, Qwen2) and WordPiece (BERT).

Text goes through the same stages as in Hugging Face `tokenizers`, each a small function below:
  1. split off the added tokens (`<|endoftext|>`, `[CLS]`, ...): they map straight to their ids
  2. normalizer     (BertNormalizer: clean, CJK spacing, lowercase, strip accents; NFC; ...)
  3. pre-tokenizer  (ByteLevel: GPT-2 regex + bytes as printable characters; Split(regex); BertPreTokenizer)
  4. model          (BPE: apply the merges by rank; WordPiece: greedy longest match with '##' pieces)
  5. post-processor (TemplateProcessing / BertProcessing: add <s>, [CLS] ... [SEP])
Decoding runs the decoder (ByteLevel bytes back to UTF-8; WordPiece joins '##' pieces). Slow, but clear.
"""
from __future__ import annotations

import functools
import json
import re
import unicodedata
from pathlib import Path

import regex

from .. import chat_template

# --- regular expressions ----------------------------------------------------------------------------------------

GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


# \w in a tokenizer.json pattern means what it means to Oniguruma, which `tokenizers` compiles those with: Unicode's
# Alphabetic, marks, Nd and Pc, but not Join_Control; and outside [...] also the six Latin-1 numbers ² ³ ¹ ¼ ½ ¾
# (its Latin-1 table calls them word characters). Measured against `tokenizers` over every code point. The
# `regex` package's \w adds Join_Control, as the Rust regex crate's does, which is what the Whitespace
# pre-tokenizer runs on; so that one uses plain \w.
ONIG_WORD_IN_CLASS = r"\p{Alphabetic}\p{M}\p{Nd}\p{Pc}"
ONIG_WORD = ONIG_WORD_IN_CLASS + r"\xb2\xb3\xb9\xbc-\xbe"


@functools.cache
def compile_regex(pattern: str) -> regex.Pattern:
    """Compile a tokenizer.json (Oniguruma) pattern with the `regex` package, which reads the same syntax and
    classes: \\p{L} / \\P{N} / \\p{Letter}, \\s as the White_Space property, \\d as Nd (Python's `re` has no
    \\p{..}, and its \\s also takes U+001C..U+001F). Only \\w and \\W are rewritten, to Oniguruma's class."""
    if "\\w" not in pattern and "\\W" not in pattern:
        return regex.compile(pattern)
    out, i, in_class = [], 0, False
    while i < len(pattern):
        c = pattern[i]
        if c == "\\" and i + 1 < len(pattern):
            pair = pattern[i:i + 2]
            if pair == "\\w":
                out.append(ONIG_WORD_IN_CLASS if in_class else f"[{ONIG_WORD}]")
            elif pair == "\\W":
                if in_class:
                    raise NotImplementedError(f"tokenizer regex: \\W inside [...] in {pattern!r}")
                out.append(f"[^{ONIG_WORD}]")
            else:
                out.append(pair)
            i += 2
            continue
        if c == "[" and not in_class:
            in_class = True
            out.append(c)
            i += 1
            if pattern[i:i + 1] == "^":
                out.append("^")
                i += 1
            if pattern[i:i + 1] == "]":  # a ']' right after '[' or '[^' is a literal
                out.append("\\]")
                i += 1
            continue
        if c == "]" and in_class:
            in_class = False
        out.append(c)
        i += 1
    return regex.compile("".join(out))


def split_by_regex(text: str, regex: re.Pattern, behavior: str = "Isolated", invert: bool = False) -> list[str]:
    """Split `text` on the matches of `regex` as tokenizers' Split does: behavior Isolated (matches become
    pieces), Removed (matches dropped), MergedWithPrevious / MergedWithNext (matches glued to a neighbour),
    Contiguous (runs of matches merged). With invert, the non-matches play the role of the matches."""
    spans, pos = [], 0  # (start, end, is_match)
    for m in regex.finditer(text):
        if m.start() == m.end():
            continue
        if m.start() > pos:
            spans.append((pos, m.start(), invert))
        spans.append((m.start(), m.end(), not invert))
        pos = m.end()
    if pos < len(text):
        spans.append((pos, len(text), invert))
    pieces: list[str] = []
    prev_match = False
    for start, end, is_match in spans:
        piece = text[start:end]
        if behavior == "Removed":
            if not is_match:
                pieces.append(piece)
        elif behavior == "Isolated":
            pieces.append(piece)
        elif behavior == "MergedWithPrevious":
            if is_match and pieces and not prev_match:
                pieces[-1] += piece
            else:
                pieces.append(piece)
        elif behavior == "MergedWithNext":
            if not is_match and pieces and prev_match:
                pieces[-1] += piece
            else:
                pieces.append(piece)
        elif behavior == "Contiguous":
            if is_match and pieces and prev_match:
                pieces[-1] += piece
            else:
                pieces.append(piece)
        else:
            raise NotImplementedError(f"tokenizer: Split behavior {behavior!r}")
        prev_match = is_match
    return pieces


# --- byte-level alphabet ----------------------------------------------------------------------------------------

@functools.cache
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map from the 256 bytes to printable characters: printable Latin-1 bytes stand for themselves, the
    others (controls, space, ...) are moved to U+0100 and up, so 'Ġ' is the space byte 0x20."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in keep]
    return {**{b: chr(b) for b in keep}, **{b: chr(256 + n) for n, b in enumerate(extra)}}


def to_byte_chars(text: str) -> str:
    """UTF-8 bytes of `text`, each written as its byte-level character."""
    table = bytes_to_unicode()
    return "".join(table[b] for b in text.encode("utf-8"))


def from_byte_chars(chars: str) -> bytes:
    """The inverse of to_byte_chars; a character outside the alphabet stands for its own UTF-8 bytes."""
    inverse = {c: b for b, c in bytes_to_unicode().items()}
    return b"".join(bytes([inverse[c]]) if c in inverse else c.encode("utf-8") for c in chars)


# --- BERT's character classes (as transformers' BasicTokenizer defines them) ------------------------------------

def is_bert_whitespace(c: str) -> bool:
    return c in " \t\n\r" or unicodedata.category(c) == "Zs"


def is_bert_control(c: str) -> bool:
    return c not in "\t\n\r" and unicodedata.category(c).startswith("C")


def is_bert_punctuation(c: str) -> bool:
    """ASCII non-alphanumerics (so $, +, ^ count too) and every Unicode P* character."""
    cp = ord(c)
    ascii_punctuation = 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126
    return ascii_punctuation or unicodedata.category(c).startswith("P")


def is_cjk(c: str) -> bool:
    """The CJK Unified Ideographs blocks, which BERT splits into one token per character."""
    cp = ord(c)
    blocks = [(0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F), (0x2B740, 0x2B81F),
              (0x2B820, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F)]
    return any(a <= cp <= b for a, b in blocks)


def strip_accents(text: str) -> str:
    """Decompose (NFD) and drop the combining marks (category Mn): 'é' -> 'e'."""
    return "".join(c for c in unicodedata.normalize("NFD", text) if unicodedata.category(c) != "Mn")


# --- 2. normalizers: str -> str ---------------------------------------------------------------------------------

def normalize(spec: dict | None, text: str) -> str:
    if spec is None:
        return text
    kind = spec["type"]
    if kind == "Sequence":
        for s in spec["normalizers"]:
            text = normalize(s, text)
        return text
    if kind == "BertNormalizer":
        if spec.get("clean_text", True):
            text = "".join(" " if is_bert_whitespace(c) else c for c in text
                           if not (c == "\x00" or c == "\ufffd" or is_bert_control(c)))
        if spec.get("handle_chinese_chars", True):
            text = "".join(f" {c} " if is_cjk(c) else c for c in text)
        lowercase = spec.get("lowercase", True)
        if lowercase:
            text = text.lower()
        if spec.get("strip_accents") is None and lowercase or spec.get("strip_accents"):
            text = strip_accents(text)
        return text
    if kind in ("NFC", "NFD", "NFKC", "NFKD"):
        return unicodedata.normalize(kind, text)
    if kind == "Lowercase":
        return text.lower()
    if kind == "StripAccents":
        return strip_accents(text)
    if kind == "Strip":
        text = text.lstrip() if spec.get("strip_left", True) else text
        return text.rstrip() if spec.get("strip_right", True) else text
    if kind == "Prepend":
        return spec["prepend"] + text if text else text
    if kind == "Replace":
        return _replace(spec, text)
    raise NotImplementedError(f"tokenizer: normalizer {kind!r}")


def _replace(spec: dict, text: str) -> str:
    pattern = spec["pattern"]
    if "String" in pattern:
        return text.replace(pattern["String"], spec["content"])
    return compile_regex(pattern["Regex"]).sub(spec["content"].replace("\\", "\\\\"), text)


# --- 3. pre-tokenizers: list of pieces -> list of pieces --------------------------------------------------------

def pre_tokenize(spec: dict | None, pieces: list[str]) -> list[str]:
    if spec is None:
        return pieces
    kind = spec["type"]
    if kind == "Sequence":
        for s in spec["pretokenizers"]:
            pieces = pre_tokenize(s, pieces)
        return pieces
    out: list[str] = []
    for piece in pieces:
        out.extend(_pre_tokenize_one(spec, piece))
    return [p for p in out if p]


def _pre_tokenize_one(spec: dict, piece: str) -> list[str]:
    kind = spec["type"]
    if kind == "ByteLevel":
        if spec.get("add_prefix_space", False) and not piece.startswith(" "):
            piece = " " + piece
        words = split_by_regex(piece, compile_regex(GPT2_PATTERN)) if spec.get("use_regex", True) else [piece]
        return [to_byte_chars(w) for w in words]
    if kind == "Split":
        pattern = spec["pattern"]
        regex = compile_regex(pattern["Regex"]) if "Regex" in pattern else re.compile(re.escape(pattern["String"]))
        return split_by_regex(piece, regex, spec.get("behavior", "Isolated"), spec.get("invert", False))
    if kind == "BertPreTokenizer":
        # whitespace is removed, each punctuation character becomes a word of its own
        return [w for word in piece.split() for w in _split_punctuation(word)]
    if kind == "Whitespace":  # a Rust-regex pattern in tokenizers, not Oniguruma: \w is Unicode's word property
        return _WHITESPACE_WORDS.findall(piece)
    if kind == "WhitespaceSplit":
        return piece.split()
    if kind == "Digits":  # tokenizers splits on char::is_numeric: every \p{N}, not only decimal digits
        return split_by_regex(piece, compile_regex(r"\p{N}" if spec.get("individual_digits") else r"\p{N}+"))
    if kind == "Punctuation":
        return _split_punctuation(piece)
    if kind == "Metaspace":  # SentencePiece: spaces become '▁', and a '▁' is put in front of the text
        mark = spec.get("replacement", "\u2581")
        scheme = spec.get("prepend_scheme", "always" if spec.get("add_prefix_space", True) else "never")
        piece = piece.replace(" ", mark)
        if scheme != "never" and not piece.startswith(mark):
            piece = mark + piece
        if not spec.get("split", True):
            return [piece]
        return split_by_regex(piece, re.compile(re.escape(mark)), "MergedWithNext")  # '▁' starts each word
    raise NotImplementedError(f"tokenizer: pre_tokenizer {kind!r}")


_WHITESPACE_WORDS = regex.compile(r"\w+|[^\w\s]+")


def _split_punctuation(word: str) -> list[str]:
    pieces, current = [], ""
    for c in word:
        if is_bert_punctuation(c):
            pieces += [current, c] if current else [c]
            current = ""
        else:
            current += c
    return pieces + [current] if current else pieces


# --- 4. models: one pre-tokenized word -> token strings ---------------------------------------------------------

class BPE:
    """Byte-pair encoding: start from single characters and keep merging the adjacent pair that comes first in
    the merge list (the leftmost one on a tie) until no listed pair is left."""

    def __init__(self, spec: dict):
        self.vocab: dict[str, int] = spec["vocab"]
        merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in spec.get("merges", [])]
        self.ranks = {pair: rank for rank, pair in enumerate(merges)}
        self.unk_token = spec.get("unk_token")
        self.byte_fallback = spec.get("byte_fallback", False)
        self.ignore_merges = spec.get("ignore_merges", False)
        if spec.get("continuing_subword_prefix") or spec.get("end_of_word_suffix"):
            raise NotImplementedError("tokenizer: BPE with continuing_subword_prefix / end_of_word_suffix")
        self._cache: dict[str, list[str]] = {}

    def merge(self, word: str) -> list[str]:
        if self.ignore_merges and word in self.vocab:  # Llama-3: a whole word in the vocabulary is one token
            return [word]
        parts = list(word)
        while len(parts) > 1:
            rank, i = min((self.ranks.get(pair, float("inf")), i) for i, pair in enumerate(zip(parts, parts[1:])))
            if rank == float("inf"):
                break
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        return parts

    def tokenize(self, word: str) -> list[str]:
        if word not in self._cache:
            tokens = []
            for part in self.merge(word):
                if part in self.vocab:
                    tokens.append(part)
                elif self.byte_fallback:
                    tokens.extend(f"<0x{b:02X}>" for b in part.encode("utf-8"))
                elif self.unk_token is not None:
                    tokens.append(self.unk_token)
                else:
                    raise ValueError(f"tokenizer: {part!r} is not in the vocabulary and there is no unk_token")
            self._cache[word] = tokens
        return self._cache[word]


class WordPiece:
    """WordPiece: greedily take the longest vocabulary entry from the left; pieces after the first carry the
    '##' prefix. A word that cannot be covered (or is too long) becomes [UNK] as a whole."""

    def __init__(self, spec: dict):
        self.vocab: dict[str, int] = spec["vocab"]
        self.unk_token = spec.get("unk_token", "[UNK]")
        self.prefix = spec.get("continuing_subword_prefix", "##")
        self.max_chars = spec.get("max_input_chars_per_word", 100)

    def tokenize(self, word: str) -> list[str]:
        if len(word) > self.max_chars:
            return [self.unk_token]
        pieces, start = [], 0
        while start < len(word):
            for end in range(len(word), start, -1):
                piece = (self.prefix if start > 0 else "") + word[start:end]
                if piece in self.vocab:
                    break
            else:
                return [self.unk_token]
            pieces.append(piece)
            start = end
        return pieces


MODELS = {"BPE": BPE, "WordPiece": WordPiece}


# --- 5. post-processors: ids -> ids with the special tokens -----------------------------------------------------

def post_process(spec: dict | None, ids: list[int]) -> list[int]:
    if spec is None:
        return ids
    kind = spec["type"]
    if kind == "Sequence":
        for s in spec["processors"]:
            ids = post_process(s, ids)
        return ids
    if kind == "TemplateProcessing":
        out = []
        for item in spec["single"]:
            if "Sequence" in item:
                out.extend(ids)
            else:
                out.extend(spec["special_tokens"][item["SpecialToken"]["id"]]["ids"])
        return out
    if kind in ("BertProcessing", "RobertaProcessing"):
        return [spec["cls"][1], *ids, spec["sep"][1]]
    if kind == "ByteLevel":
        return ids
    raise NotImplementedError(f"tokenizer: post_processor {kind!r}")


# --- decoders: token strings -> text ----------------------------------------------------------------------------

def decode_tokens(spec: dict | None, tokens: list[str]) -> list[str]:
    if spec is None:
        return tokens
    kind = spec["type"]
    if kind == "Sequence":
        for s in spec["decoders"]:
            tokens = decode_tokens(s, tokens)
        return tokens
    if kind == "ByteLevel":
        return [from_byte_chars("".join(tokens)).decode("utf-8", errors="replace")]
    if kind == "WordPiece":
        prefix = spec.get("prefix", "##")
        out = [t[len(prefix):] if t.startswith(prefix) else (" " + t if i else t) for i, t in enumerate(tokens)]
        return [_cleanup(t) for t in out] if spec.get("cleanup", True) else out
    if kind == "Replace":
        return [_replace(spec, t) for t in tokens]
    if kind == "ByteFallback":
        return _byte_fallback(tokens)
    if kind == "Fuse":
        return ["".join(tokens)]
    if kind == "Metaspace":
        mark = spec.get("replacement", "\u2581")
        out = [t.replace(mark, " ") for t in tokens]
        if out and spec.get("prepend_scheme", "always") != "never" and out[0].startswith(" "):
            out[0] = out[0][1:]
        return out
    if kind == "Strip":
        n_left, n_right, c = spec.get("start", 0), spec.get("stop", 0), spec.get("content", " ")
        out = []
        for t in tokens:
            for _ in range(n_left):
                t = t[1:] if t.startswith(c) else t
            for _ in range(n_right):
                t = t[:-1] if t.endswith(c) else t
            out.append(t)
        return out
    raise NotImplementedError(f"tokenizer: decoder {kind!r}")


def _cleanup(text: str) -> str:
    """WordPiece's cleanup of spaces before punctuation and English contractions."""
    for a, b in [(" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
                 (" do not", " don't"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")]:
        text = text.replace(a, b)
    return text


def _byte_fallback(tokens: list[str]) -> list[str]:
    """Runs of <0xXX> tokens become the text their bytes spell (U+FFFD for each invalid byte)."""
    out, pending = [], b""
    for t in tokens:
        if re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", t):
            pending += bytes([int(t[3:5], 16)])
            continue
        if pending:
            out.append(pending.decode("utf-8", errors="replace"))
            pending = b""
        out.append(t)
    if pending:
        out.append(pending.decode("utf-8", errors="replace"))
    return out


# --- the tokenizer ----------------------------------------------------------------------------------------------

def _token_content(value) -> str | None:
    """tokenizer_config.json writes special tokens as a string or as {"content": ...}."""
    return value.get("content") if isinstance(value, dict) else value


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


class Tokenizer:
    """encode / decode as tokenizer.json says; chat templates as tokenizer_config.json says."""

    def __init__(self, spec: dict, tokenizer_config: dict | None = None, model_config: dict | None = None,
                 generation_config: dict | None = None, chat_template: str | None = None):
        self.spec = spec
        model = spec["model"]
        kind = model.get("type") or ("WordPiece" if "continuing_subword_prefix" in model else "BPE")
        if kind not in MODELS:
            raise NotImplementedError(f"tokenizer: model type {kind!r} (supported: {', '.join(MODELS)})")
        self.model = MODELS[kind](model)
        self.vocab: dict[str, int] = dict(self.model.vocab)
        self.added_tokens = spec.get("added_tokens", [])
        for t in self.added_tokens:
            self.vocab[t["content"]] = t["id"]
        self.id_to_token = {i: t for t, i in self.vocab.items()}
        self.special_ids = {t["id"] for t in self.added_tokens if t.get("special")}
        contents = sorted((t["content"] for t in self.added_tokens), key=len, reverse=True)
        self._added_regex = re.compile("|".join(map(re.escape, contents))) if contents else None
        self._added = {t["content"]: t for t in self.added_tokens}
        self.config = tokenizer_config or {}
        self.model_config = model_config or {}
        self.generation_config = generation_config or {}
        template = chat_template or self.config.get("chat_template")
        if isinstance(template, list):  # older files: [{"name": "default", "template": ...}, ...]
            template = {t["name"]: t["template"] for t in template}.get("default")
        self.chat_template = template

    @classmethod
    def from_file(cls, path) -> "Tokenizer":
        return cls(_read_json(Path(path)))

    @classmethod
    def from_pretrained(cls, folder) -> "Tokenizer":
        """Read tokenizer.json plus, where present, tokenizer_config.json, chat_template.jinja, config.json and
        generation_config.json (the last two for the BOS/EOS ids)."""
        folder = Path(folder)
        if folder.is_file():
            return cls.from_file(folder)
        if not (folder / "tokenizer.json").is_file():
            raise FileNotFoundError(f"tokenizer: no tokenizer.json in {folder}")
        jinja = folder / "chat_template.jinja"
        return cls(_read_json(folder / "tokenizer.json"), _read_json(folder / "tokenizer_config.json"),
                   _read_json(folder / "config.json"), _read_json(folder / "generation_config.json"),
                   jinja.read_text(encoding="utf-8") if jinja.is_file() else None)

    # -- encode ----------------------------------------------------------------------------------------------

    def split_added_tokens(self, text: str) -> list[tuple[str, int | None]]:
        """Cut `text` around the added tokens (leftmost, longest first): [(piece, None) | (token, id), ...].
        A token with lstrip / rstrip also swallows the whitespace on that side."""
        if self._added_regex is None or not text:
            return [(text, None)] if text else []
        out, pos = [], 0
        for m in self._added_regex.finditer(text):
            token = self._added[m.group()]
            start, end = m.start(), m.end()
            if token.get("single_word") and (start > 0 and not text[start - 1].isspace()
                                             or end < len(text) and not text[end].isspace()):
                continue
            if token.get("lstrip"):
                while start > pos and text[start - 1].isspace():
                    start -= 1
            if token.get("rstrip"):
                while end < len(text) and text[end].isspace():
                    end += 1
            if start > pos:
                out.append((text[pos:start], None))
            out.append((m.group(), token["id"]))
            pos = end
        if pos < len(text):
            out.append((text[pos:], None))
        return out

    def tokenize(self, text: str) -> list[str]:
        """Token strings for `text`, without the special tokens of the post-processor."""
        tokens: list[str] = []
        for piece, added_id in self.split_added_tokens(text):
            if added_id is not None:
                tokens.append(piece)
                continue
            words = pre_tokenize(self.spec.get("pre_tokenizer"), [normalize(self.spec.get("normalizer"), piece)])
            for word in words:
                tokens.extend(self.model.tokenize(word))
        return tokens

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = [self.vocab[t] for t in self.tokenize(text)]
        return self.post_process(ids) if add_special_tokens else ids

    def post_process(self, ids: list[int]) -> list[int]:
        """Add the special tokens the post-processor adds around one sequence (<s>, [CLS] ... [SEP])."""
        return post_process(self.spec.get("post_processor"), list(ids))

    @property
    def num_special_tokens_to_add(self) -> int:
        return len(self.post_process([]))

    # -- decode ----------------------------------------------------------------------------------------------

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        ids = [int(i) for i in ids]
        bad = [i for i in ids if i not in self.id_to_token]
        if bad:
            raise ValueError(f"tokenizer: token id {bad[0]} is outside the vocabulary of {len(self.id_to_token)}")
        tokens = [self.id_to_token[i] for i in ids if not (skip_special_tokens and i in self.special_ids)]
        return "".join(decode_tokens(self.spec.get("decoder"), tokens))

    def token_to_id(self, token: str) -> int | None:
        return self.vocab.get(token)

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    # -- special tokens --------------------------------------------------------------------------------------

    def special_token(self, name: str) -> str | None:
        """The text of a named special token ("bos_token", "eos_token", ...) from tokenizer_config.json, else
        from config.json's <name>_id."""
        value = _token_content(self.config.get(name))
        if value is None:
            ident = self.model_config.get(f"{name}_id")
            ident = ident[0] if isinstance(ident, list) and ident else ident
            value = self.id_to_token.get(ident) if isinstance(ident, int) else None
        return value

    @property
    def bos_token_id(self) -> int | None:
        token = self.special_token("bos_token")
        return self.vocab.get(token) if token is not None else None

    @property
    def eos_token_ids(self) -> list[int]:
        """Every id that ends generation: generation_config.json, config.json, then tokenizer_config.json."""
        ids: list[int] = []
        for source in (self.generation_config.get("eos_token_id"), self.model_config.get("eos_token_id")):
            for i in source if isinstance(source, list) else [source]:
                if isinstance(i, int) and i not in ids:
                    ids.append(i)
        token = _token_content(self.config.get("eos_token"))
        if token in self.vocab and self.vocab[token] not in ids:
            ids.append(self.vocab[token])
        return ids

    # -- chat ------------------------------------------------------------------------------------------------

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> str:
        """Render the checkpoint's jinja chat template exactly as transformers does (candlewick.chat_template: a
        sandboxed environment with trim_blocks and lstrip_blocks, loop controls, `raise_exception`,
        `strftime_now`, a `tojson` that keeps non-ASCII characters), with the special tokens by name
        (bos_token, eos_token, ..., additional_special_tokens) and `kwargs` as further variables."""
        if not self.chat_template:
            raise ValueError("tokenizer: this checkpoint has no chat_template (tokenizer_config.json)")
        names = {n: self.special_token(n) for n in chat_template.SPECIAL_TOKEN_NAMES[:-1]}
        special = chat_template.special_tokens_map(names, self.config.get("additional_special_tokens"))
        return chat_template.render(self.chat_template, messages, add_generation_prompt=add_generation_prompt,
                                    special_tokens=special, **kwargs)
