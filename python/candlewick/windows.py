"""The sliding windows of a perplexity over a text longer than the context: one pure function, used by the command
line (candlewick.cli) and the reference models (candlewick.reference.models); rust/src/model.rs writes the same
schedule for Model.perplexity.

Windows of `context` tokens start every `stride` tokens (default half the context), and each scores only the
tokens no earlier window did, as in Hugging Face's perplexity guide. With stride < context every token but the
first is scored exactly once, with at least context - stride tokens before it in its window; with
stride = context (disjoint windows) a window's first token has no context inside it and is not scored.

    >>> perplexity_windows(10, context=4, stride=2)
    [(0, 4, 1), (2, 6, 4), (4, 8, 6), (6, 10, 8)]
    >>> perplexity_windows(10, context=4, stride=4)
    [(0, 4, 1), (4, 8, 5), (8, 10, 9)]
    >>> perplexity_windows(9, context=4, stride=4)   # the one-token window [8, 9) would score nothing
    [(0, 4, 1), (4, 8, 5)]

For a window (begin, end, first_scored), the model runs on ids[begin:end]; its token NLLs nll[j] score token
begin + j + 1, so the new ones are nll[first_scored - begin - 1:], the tokens first_scored .. end - 1.
"""
from __future__ import annotations

import operator


def default_stride(context: int) -> int:
    """Half the context (at least 1)."""
    return max(context // 2, 1)


def perplexity_windows(n_tokens: int, context: int, stride: int | None = None) -> list[tuple[int, int, int]]:
    """The windows (begin, end, first_scored) that score tokens 1 .. n_tokens - 1 of a text of n_tokens tokens.

    Raises ValueError for fewer than two tokens, a context < 2 or a stride outside 1 .. context."""
    n_tokens, context = operator.index(n_tokens), operator.index(context)
    stride = default_stride(context) if stride is None else operator.index(stride)
    if context < 2:
        raise ValueError(f"perplexity needs a context of at least two tokens, got {context}")
    if n_tokens < 2:
        raise ValueError(f"perplexity needs at least two tokens; the text has {n_tokens}")
    if not 0 < stride <= context:
        raise ValueError(f"stride must be between 1 and the context length {context}, got {stride}")
    windows, scored_to, begin = [], 1, 0  # tokens [0, scored_to) are scored (token 0 never is)
    while True:
        end = min(begin + context, n_tokens)
        first = max(scored_to, begin + 1)  # a window's first token has nothing before it inside the window
        if first < end:  # with disjoint windows a last window of one token would score nothing
            windows.append((begin, end, first))
        scored_to = end
        if end == n_tokens:
            return windows
        begin += stride


__all__ = ["perplexity_windows", "default_stride"]
