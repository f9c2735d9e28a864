"""Evaluating language models and their output: corpus BLEU (the same number as sacrebleu) and n-gram language
models (add-k and interpolated Kneser-Ney), the baselines a neural model's perplexity is read against.

    bleu(["The dog bit the man."], [["The dog bit the man."]])      # 100.0
    lm = NGramLM(3, smoothing="kneser-ney").fit(ids)
    lm.perplexity(held_out_ids)

Pure Python and NumPy (and `regex` for sacrebleu's international tokenizer).
"""
from __future__ import annotations

import math
import re
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

__all__ = ["bleu", "corpus_bleu", "sentence_bleu", "BleuScore", "tokenize_13a", "tokenize_intl", "NGramLM"]


# --- BLEU --------------------------------------------------------------------------------------------------------

_13A = [(re.compile(r"([\{-\~\[-\` -\&\(-\+\:-\@\/])"), r" \1 "),  # punctuation and symbols of ASCII
        (re.compile(r"([^0-9])([\.,])"), r"\1 \2 "),                # period and comma, unless after a digit
        (re.compile(r"([\.,])([^0-9])"), r" \1 \2"),                # ... or unless before one
        (re.compile(r"([0-9])(-)"), r"\1 \2 ")]                     # a dash after a digit


def tokenize_13a(line: str) -> str:
    """mteval-v13a's tokenization, the WMT standard and sacrebleu's default: unescape a few XML entities, split off
    punctuation (but not the point or comma inside a number), one space between tokens."""
    line = line.replace("<skipped>", "").replace("-\n", "").replace("\n", " ")
    if "&" in line:
        line = line.replace("&quot;", '"').replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">")
    line = f" {line} "
    for pattern, repl in _13A:
        line = pattern.sub(repl, line)
    return " ".join(line.split())


_INTL = None


def tokenize_intl(line: str) -> str:
    """mteval-v14's international tokenization: split off every Unicode punctuation mark not between digits,
    and every symbol."""
    global _INTL
    if _INTL is None:
        import regex

        _INTL = [(regex.compile(r"(\P{N})(\p{P})"), r"\1 \2 "), (regex.compile(r"(\p{P})(\P{N})"), r" \1 \2"),
                 (regex.compile(r"(\p{S})"), r" \1 ")]
    for pattern, repl in _INTL:
        line = pattern.sub(repl, line)
    return " ".join(line.split())


TOKENIZERS = {"13a": tokenize_13a, "intl": tokenize_intl, "none": lambda s: s, "char": lambda s: " ".join(s)}
SMOOTH_DEFAULTS = {"none": None, "floor": 0.1, "add-k": 1.0, "exp": None}


@dataclass
class BleuScore:
    """score = BP · exp(Σ_n log p_n / N) in percent, p_n the clipped n-gram precisions (in percent) and
    BP = exp(1 - r/c) when the hypotheses are shorter than the references (c < r), else 1."""
    score: float
    counts: list[int]        # matched n-grams, n = 1 .. N (each clipped to its count in a reference)
    totals: list[int]        # n-grams in the hypotheses
    precisions: list[float]  # 100 · counts / totals, after smoothing
    bp: float
    sys_len: int             # c: hypothesis tokens
    ref_len: int             # r: the reference lengths closest to each hypothesis' length, summed


def _ngrams(tokens: list[str], max_order: int) -> Counter:
    return Counter(tuple(tokens[i:i + n]) for n in range(1, max_order + 1) for i in range(len(tokens) - n + 1))


def _closest_length(hyp_len: int, ref_lens: list[int]) -> int:
    """The reference length nearest the hypothesis' (the shorter one on a tie), as mteval and sacrebleu pick it."""
    return min(ref_lens, key=lambda r: (abs(r - hyp_len), r)) if ref_lens else 0


def corpus_bleu(hypotheses: Sequence[str], references: Sequence[Sequence[str | None]], *,
                smooth_method: str = "exp", smooth_value: float | None = None, tokenize: str = "13a",
                lowercase: bool = False, max_ngram_order: int = 4, effective_order: bool = False) -> BleuScore:
    """Corpus BLEU (Papineni et al. 2002) exactly as sacrebleu computes it (sacrebleu.corpus_bleu's arguments and
    defaults). `references` is a list of reference streams, each as long as `hypotheses`: references[j][i] is the
    j-th reference of sentence i (None where a sentence has fewer references).

    Sentence by sentence: n-grams of the hypothesis count as matched up to the most times they occur in any one
    reference; the counts are summed over the corpus before dividing, so BLEU is not a mean of sentence scores.
    Smoothing of a precision with no match (Chen & Cherry 2014): "exp" (mteval's: 1/2, 1/4, ... of a match),
    "floor" (smooth_value matches), "add-k" (k added to matches and totals from n = 2), "none" (BLEU is then 0).
    effective_order leaves out the orders with no n-gram at all (for sentence-level BLEU)."""
    if smooth_method not in SMOOTH_DEFAULTS:
        raise ValueError(f"bleu: smooth_method must be one of {', '.join(SMOOTH_DEFAULTS)}, not {smooth_method!r}")
    if tokenize not in TOKENIZERS:
        raise ValueError(f"bleu: tokenize must be one of {', '.join(TOKENIZERS)}, not {tokenize!r}")
    if isinstance(hypotheses, str) or not references or any(isinstance(s, str) for s in references):
        raise ValueError("bleu: hypotheses is a list of strings and references a list of reference streams "
                         "(lists of strings), e.g. bleu(['a b c'], [['a b c']])")
    if any(len(stream) != len(hypotheses) for stream in references):
        raise ValueError(f"bleu: {len(hypotheses)} hypotheses but reference streams of "
                         f"{sorted({len(s) for s in references})} sentences")
    tok = TOKENIZERS[tokenize]

    def prepare(s: str) -> list[str]:
        return tok((s.lower() if lowercase else s).rstrip()).split()

    N = max_ngram_order
    sys_len = ref_len = 0
    counts, totals = [0] * N, [0] * N
    for i, hyp in enumerate(hypotheses):
        refs = [prepare(r) for r in (stream[i] for stream in references) if r is not None]
        best: Counter = Counter()
        for r in refs:
            best |= _ngrams(r, N)                                  # max count of each n-gram over the references
        h = prepare(hyp)
        sys_len += len(h)
        ref_len += _closest_length(len(h), [len(r) for r in refs])
        for gram, c in _ngrams(h, N).items():
            totals[len(gram) - 1] += c
            counts[len(gram) - 1] += min(c, best[gram])
    return bleu_from_counts(counts, totals, sys_len, ref_len, smooth_method=smooth_method,
                            smooth_value=smooth_value, effective_order=effective_order)


def bleu_from_counts(counts: list[int], totals: list[int], sys_len: int, ref_len: int, *,
                     smooth_method: str = "none", smooth_value: float | None = None,
                     effective_order: bool = False) -> BleuScore:
    """BLEU from its sufficient statistics (sacrebleu's BLEU.compute_bleu)."""
    N = len(counts)
    value = float(SMOOTH_DEFAULTS[smooth_method] or 0.0) if smooth_value is None else float(smooth_value)
    bp = 1.0 if sys_len >= ref_len else (math.exp(1 - ref_len / sys_len) if sys_len > 0 else 0.0)
    precisions = [0.0] * N
    if not any(counts):
        return BleuScore(0.0, list(counts), list(totals), precisions, bp, sys_len, ref_len)
    correct, total = [float(c) for c in counts], [float(t) for t in totals]
    halving, orders = 1.0, N
    for n in range(N):
        if smooth_method == "add-k" and n > 0:
            correct[n] += value
            total[n] += value
        if total[n] == 0:
            break
        if effective_order:
            orders = n + 1
        if correct[n] == 0:
            if smooth_method == "exp":
                halving *= 2
                precisions[n] = 100.0 / (halving * total[n])
            elif smooth_method == "floor":
                precisions[n] = 100.0 * value / total[n]
        else:
            precisions[n] = 100.0 * correct[n] / total[n]
    # log 0 is floored to -9999999999, as in sacrebleu, which makes the score 0
    log_mean = sum(math.log(p) if p > 0 else -9999999999 for p in precisions[:orders]) / orders
    return BleuScore(bp * math.exp(log_mean), list(counts), list(totals), precisions, bp, sys_len, ref_len)


def bleu(hypotheses: Sequence[str], references: Sequence[Sequence[str | None]], **options) -> float:
    """Corpus BLEU in percent (0 .. 100), equal to sacrebleu.corpus_bleu(hypotheses, references, **options).score;
    the options are corpus_bleu's."""
    return corpus_bleu(hypotheses, references, **options).score


def sentence_bleu(hypothesis: str, references: Sequence[str], **options) -> float:
    """BLEU of one sentence against its references (sacrebleu.sentence_bleu: effective order on by default)."""
    options.setdefault("effective_order", True)
    return corpus_bleu([hypothesis], [[r] for r in references], **options).score


# --- n-gram language models --------------------------------------------------------------------------------------

class NGramLM:
    """An n-gram language model over integer tokens: P(w | the previous order - 1 tokens), from counts.

    smoothing="add-k" (Laplace for k = 1): P(w | h) = (c(h w) + k) / (c(h) + k V). Every token of the vocabulary
      gets some probability, unseen ones k / (c(h) + k V).
    smoothing="kneser-ney", interpolated (Kneser & Ney 1995; Chen & Goodman 1998), with a discount D:
      P(w | h) = max(c(h w) - D, 0) / c(h) + D N₁₊(h •) / c(h) · P(w | h'),   h' = h without its first token,
      N₁₊(h •) the number of different tokens seen after h. The lower orders count not how often h' w occurs but
      in how many different contexts (the continuation count N₁₊(• h' w)): "Francisco" is frequent but follows
      only "San", so it should be unlikely after a new word. Below the unigrams: the uniform 1 / V.
    A context never seen gives all its mass to the next order down. A context shorter than order - 1 (the first
    tokens of a text) uses the longest order it has. Either way, each P(· | h) sums to 1 over the V tokens."""

    def __init__(self, order: int = 3, *, smoothing: str = "kneser-ney", k: float = 1.0, discount: float = 0.75,
                 vocab_size: int | None = None):
        if order < 1:
            raise ValueError(f"NGramLM: order must be at least 1, not {order}")
        if smoothing not in ("kneser-ney", "add-k"):
            raise ValueError(f"NGramLM: smoothing must be 'kneser-ney' or 'add-k', not {smoothing!r}")
        if smoothing == "add-k" and not k > 0:
            raise ValueError(f"NGramLM: add-k needs k > 0, not {k}")
        if not 0 <= discount <= 1:
            raise ValueError(f"NGramLM: the discount must be in [0, 1], not {discount}")
        self.order, self.smoothing, self.k, self.discount, self.vocab_size = order, smoothing, k, discount, vocab_size
        # counts[j][h][w]: how often w followed the j tokens h; continuation[j][h][w]: after how many different
        # tokens the j + 1 tokens h w occurred (j < order - 1)
        self.counts: list[dict[tuple, Counter]] = []
        self.continuation: list[dict[tuple, Counter]] = []

    def fit(self, sequences: Iterable[int] | Iterable[Iterable[int]]) -> "NGramLM":
        """Count the n-grams of one sequence of token ids or of several (no n-gram crosses from one to the next).
        Returns self."""
        given = list(sequences)
        parts = given if given and isinstance(given[0], (list, tuple, np.ndarray)) else [given]
        seqs: list[list[int]] = [[int(t) for t in s] for s in parts]  # type: ignore[attr-defined]
        top = max((max(s) for s in seqs if s), default=-1)
        if self.vocab_size is None:
            self.vocab_size = top + 1
        if top >= self.vocab_size or any(t < 0 for s in seqs for t in s):
            raise ValueError(f"NGramLM: token ids must lie in [0, {self.vocab_size})")
        self.counts = [defaultdict(Counter) for _ in range(self.order)]
        for s in seqs:
            for i, w in enumerate(s):
                for j in range(min(i, self.order - 1) + 1):
                    self.counts[j][tuple(s[i - j:i])][w] += 1
        self.continuation = [defaultdict(Counter) for _ in range(self.order - 1)]
        for j in range(1, self.order):  # each distinct (j+1)-gram u h w adds one to continuation[j-1][h][w]
            for h, nexts in self.counts[j].items():
                for w in nexts:
                    self.continuation[j - 1][h[1:]][w] += 1
        return self

    def _check(self) -> int:
        if not self.counts:
            raise ValueError("NGramLM: fit it on some tokens first")
        assert self.vocab_size is not None
        return self.vocab_size

    def _context(self, context) -> tuple:
        context = tuple(int(t) for t in context)
        return context[len(context) - self.order + 1:] if self.order > 1 else ()

    def prob(self, token: int, context: Sequence[int] = ()) -> float:
        """P(token | the last order - 1 tokens of context)."""
        V, h = self._check(), self._context(context)
        if not 0 <= int(token) < V:
            raise ValueError(f"NGramLM: token {token} is outside the vocabulary of {V}")
        if self.smoothing == "add-k":
            row = self.counts[len(h)].get(h, Counter())
            return (row[token] + self.k) / (sum(row.values()) + self.k * V)
        return self._kn(int(token), h, top=True)

    def _kn(self, w: int, h: tuple, top: bool) -> float:
        lower = self._kn(w, h[1:], top=False) if h else 1.0 / self._check()
        table = self.counts[len(h)] if top else self.continuation[len(h)]
        row = table.get(h)
        if not row:
            return lower
        total, D = sum(row.values()), self.discount
        return max(row[w] - D, 0.0) / total + D * len(row) / total * lower

    def distribution(self, context: Sequence[int] = ()) -> np.ndarray:
        """P(· | context) over the whole vocabulary: float64 [V], summing to 1."""
        V, h = self._check(), self._context(context)
        if self.smoothing == "add-k":
            row = self.counts[len(h)].get(h, Counter())
            p = np.full(V, self.k)
            p[list(row)] += list(row.values())
            return p / (sum(row.values()) + self.k * V)
        p = np.full(V, 1.0 / V)
        for j in range(len(h) + 1):  # from the unigrams up to the full context
            sub = h[len(h) - j:]
            found = (self.counts[j] if j == len(h) else self.continuation[j]).get(sub)
            if found:
                row = found
                total, D = sum(row.values()), self.discount
                p = p * (D * len(row) / total)
                ids = np.fromiter(row.keys(), dtype=np.int64, count=len(row))
                p[ids] += np.maximum(np.fromiter(row.values(), dtype=np.float64, count=len(row)) - D, 0) / total
        return p

    def token_nll(self, ids: Sequence[int]) -> np.ndarray:
        """-log P(ids[t+1] | ids[..t]) for t = 0 .. T-2, the positions a neural model's token_nll scores."""
        ids = [int(t) for t in ids]
        return np.array([-math.log(self.prob(ids[t], ids[max(0, t - self.order + 1):t]))
                         for t in range(1, len(ids))])

    def perplexity(self, ids: Sequence[int]) -> float:
        """exp(mean token_nll): comparable with a neural model's perplexity on the same tokens."""
        if len(ids) < 2:
            raise ValueError("perplexity needs at least two tokens")
        return math.exp(float(self.token_nll(ids).mean()))

    def generate(self, context: Sequence[int], max_new_tokens: int, rng: np.random.Generator) -> list[int]:
        """Sample max_new_tokens tokens, each from P(· | what came before)."""
        out = [int(t) for t in context]
        for _ in range(max_new_tokens):
            out.append(int(rng.choice(self._check(), p=self.distribution(out))))
        return out[len(context):]
