"""`candlewick.load` and `Model`: the engine's Python surface (numpy in, numpy out)."""
from __future__ import annotations

import os
from typing import Any, Sequence, Union

import numpy as np

from . import _native
from .errors import InvalidArgument, ModelLoadError
from .tokenizer import Tokenizer

Ids = Union[Sequence[int], np.ndarray]


def as_ids(x: Any, what: str = "ids") -> list[int]:
    """A 1-D sequence of token ids as a list of Python ints, with a clear error for anything else."""
    arr = np.asarray(x)
    if arr.ndim != 1:
        raise InvalidArgument(f"{what} must be a 1-D sequence of token ids, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise InvalidArgument(f"{what} must hold integers, got {arr.dtype}")
    if arr.size and (arr.min() < 0 or arr.max() >= 2**32):
        bad = int(arr.min()) if arr.min() < 0 else int(arr.max())
        raise InvalidArgument(f"{what}: token id {bad} is out of range")
    return [int(i) for i in arr]


def _is_batch(x: Any) -> bool:
    if isinstance(x, np.ndarray):
        return x.ndim == 2
    return isinstance(x, (list, tuple)) and len(x) > 0 and all(
        isinstance(s, (list, tuple, np.ndarray)) for s in x
    )


class Model:
    """A loaded checkpoint. Create one with `candlewick.load`."""

    def __init__(self, native: _native.Model):
        self._native = native
        tok = native.tokenizer
        self.tokenizer: Tokenizer | None = Tokenizer(tok) if tok is not None else None

    @property
    def config(self) -> dict:
        """The parsed config: architecture, sizes, context_length, dtype, device."""
        return self._native.config

    def _ids(self, x: str | Ids, what: str = "input") -> list[int]:
        if isinstance(x, str):
            if self.tokenizer is None:
                raise ModelLoadError("this checkpoint has no tokenizer.json; pass token ids instead of text")
            return self.tokenizer.encode(x)
        return as_ids(x, what)

    def logits(self, ids: Ids | Sequence[Ids]) -> np.ndarray:
        """float32 logits [T, V] for one sequence, or [B, T, V] for a list of sequences (right-padded: row b
        holds sequence b's positions 0..len_b-1, the rest is padding)."""
        if _is_batch(ids):
            return self._native.logits([as_ids(s, f"sequence {i}") for i, s in enumerate(ids)])
        return self._native.logits([as_ids(ids)])[0]

    def token_nll(self, text_or_ids: str | Ids) -> np.ndarray:
        """float32 [T-1]: -log p(x[t+1] | x[..t])."""
        return self._native.token_nll(self._ids(text_or_ids))

    def perplexity(self, text_or_ids: str | Ids, *, stride: int | None = None) -> float:
        """exp(mean token NLL); texts longer than the context use a sliding window moving by `stride` tokens
        (default half the context)."""
        return self._native.perplexity(self._ids(text_or_ids), stride)[0]

    def embed(self, texts: str | Sequence[str]) -> np.ndarray:
        """Sentence embeddings float32 [N, D], pooled and normalised as the checkpoint's sentence-transformers
        config says (encoder models)."""
        if isinstance(texts, str):
            texts = [texts]
        return self._native.encode(list(texts))[1]

    def __repr__(self) -> str:
        c = self.config
        return f"Model({c['model_type']}, layers={c['num_layers']}, hidden={c['hidden_size']}, dtype={c['dtype']})"


def load(path: str | os.PathLike, device: str = "cpu", dtype: str | None = None) -> Model:
    """Load a Hugging Face-style checkpoint folder (config.json, *.safetensors, tokenizer.json).

    device: "cpu", "cuda" or "cuda:N". dtype: None (the checkpoint's; float32 on CPU), "float32", "bfloat16" or
    "float16"."""
    return Model(_native.Model.load(os.fspath(path), device, dtype))
