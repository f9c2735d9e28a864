"""Token generation: the logits processors, in the exact order the engine applies them, and the sampling loop.

Each step starts from the model's float64 logits for the next token (a vector over the vocabulary) and applies,
in this ORDER (each step is a pure function below; a step whose parameter has its neutral value does nothing):

  1. repetition_penalty  (transformers): over the distinct tokens of prompt + generated, a positive logit is
                         divided by the penalty, a negative one multiplied by it.              neutral 1.0
  2. presence_penalty,   (OpenAI): over the generated tokens only, with c the count of a token so far,
     frequency_penalty   logit -= frequency_penalty * c + presence_penalty * (c > 0).           neutral 0.0
  3. logit_bias          add bias[id] to logit[id].                                             neutral None
  4. temperature         divide by it. temperature 0 means greedy: the token is the argmax of the logits
                         after steps 1-3 (the lowest id on a tie); steps 5-7 are skipped and no random number
                         is drawn.                                                              neutral 1.0
  5. top_k               keep the k largest logits; on a tie at the boundary keep every logit >= the k-th
                         largest.                                                               neutral 0
  6. top_p               nucleus: sort by probability, descending (ties: lower id first); keep the shortest
                         prefix whose cumulative probability is >= top_p (at least one token). neutral 1.0
  7. min_p               keep the tokens whose probability is >= min_p * the largest probability, the
                         probabilities being those after steps 4-6 (renormalised over the kept tokens;
                         a ratio, so the renormalisation changes nothing).                      neutral 0.0
Removed tokens get the logit -inf; the sampling distribution is softmax of what is left.

Drawing a token (inverse CDF, one uniform number per token): u = rng.random() from the passed-in
numpy Generator; the token is the first id i with cumsum(probs)[i] > u * cumsum(probs)[-1].
Generation stops after max_new_tokens, or when it produces a token of stop_token_ids, or an EOS token (unless
ignore_eos); that last token is kept in the returned ids.

A grammar constraint (candlewick.reference.constraints) comes before all of this: the logits of tokens its mask
excludes become -inf before step 1; when the mask holds a single token, that token is taken without sampling
(and no random number is drawn); generation also stops once the grammar can take no more.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, fields
from typing import Callable

import numpy as np

from .functional import softmax


@dataclass
class SamplingParams:
    max_new_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict | None = None
    stop_token_ids: list | None = None
    ignore_eos: bool = False

    def __post_init__(self):
        checks = [(self.max_new_tokens >= 0, "max_new_tokens must be >= 0"),
                  (self.temperature >= 0, "temperature must be >= 0"),
                  (self.top_k >= 0, "top_k must be >= 0 (0 turns it off)"),
                  (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
                  (0 <= self.min_p <= 1, "min_p must be in [0, 1]"),
                  (self.repetition_penalty > 0, "repetition_penalty must be > 0")]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"{message}, got {self!r}")


PROCESSING = [f.name for f in fields(SamplingParams)  # the parameters of steps 1-7
              if f.name not in ("max_new_tokens", "stop_token_ids", "ignore_eos")]


# --- the processors: logits [V] -> logits [V] ---------------------------------------------------------------------

def apply_repetition_penalty(logits, seen_ids, penalty: float):
    """Step 1: for each distinct id seen (prompt + generated): x > 0 -> x / penalty, else x * penalty."""
    x = np.array(logits, dtype=np.float64)
    if penalty == 1.0 or len(seen_ids) == 0:
        return x
    ids = np.unique(np.asarray(seen_ids, dtype=np.int64))
    x[ids] = np.where(x[ids] > 0, x[ids] / penalty, x[ids] * penalty)
    return x


def apply_presence_frequency_penalty(logits, generated_ids, presence_penalty: float, frequency_penalty: float):
    """Step 2: x[i] -= frequency_penalty * count_i + presence_penalty * (count_i > 0), counts over generated."""
    x = np.array(logits, dtype=np.float64)
    if presence_penalty == 0 and frequency_penalty == 0:
        return x
    for i, count in Counter(int(t) for t in generated_ids).items():
        x[i] -= frequency_penalty * count + presence_penalty
    return x


def apply_logit_bias(logits, logit_bias: dict | None):
    """Step 3: x[id] += bias (keys may be strings, as in OpenAI's JSON)."""
    x = np.array(logits, dtype=np.float64)
    for i, bias in (logit_bias or {}).items():
        if not 0 <= int(i) < len(x):
            raise ValueError(f"logit_bias: token id {i} is outside the vocabulary of {len(x)}")
        x[int(i)] += bias
    return x


def apply_temperature(logits, temperature: float):
    """Step 4: x / T. With T = 0 only the argmax stays (greedy)."""
    x = np.array(logits, dtype=np.float64)
    if temperature == 0:
        keep = np.zeros(len(x), dtype=bool)
        keep[np.argmax(x)] = True
        return np.where(keep, x, -np.inf)
    return x / temperature


def apply_top_k(logits, k: int):
    """Step 5: keep x_i >= the k-th largest value (so ties at the boundary all stay)."""
    x = np.array(logits, dtype=np.float64)
    if k <= 0 or k >= len(x):
        return x
    kth = np.sort(x)[-k]
    return np.where(x >= kth, x, -np.inf)


def apply_top_p(logits, p: float):
    """Step 6: keep the shortest run of most probable tokens whose probabilities sum to >= p."""
    x = np.array(logits, dtype=np.float64)
    if p >= 1.0:
        return x
    probs = softmax(x)
    order = np.argsort(-probs, kind="stable")              # descending; equal probabilities: lower id first
    cumulative = np.cumsum(probs[order])
    n_keep = min(int(np.searchsorted(cumulative, p, side="left")) + 1, len(x))
    x[order[n_keep:]] = -np.inf
    return x


def apply_min_p(logits, min_p: float):
    """Step 7: keep p_i >= min_p * max_j p_j, with p = softmax of the logits left by the earlier steps."""
    x = np.array(logits, dtype=np.float64)
    if min_p <= 0:
        return x
    probs = softmax(x)
    return np.where(probs >= min_p * probs.max(), x, -np.inf)


def process_logits(logits, *, prompt_ids=(), generated_ids=(), temperature=1.0, top_k=0, top_p=1.0, min_p=0.0,
                   repetition_penalty=1.0, presence_penalty=0.0, frequency_penalty=0.0, logit_bias=None):
    """Steps 1-7 on one logits vector [V]: the processed logits, -inf where a token was removed."""
    x = apply_repetition_penalty(logits, [*prompt_ids, *generated_ids], repetition_penalty)
    x = apply_presence_frequency_penalty(x, generated_ids, presence_penalty, frequency_penalty)
    x = apply_logit_bias(x, logit_bias)
    x = apply_temperature(x, temperature)
    if temperature == 0:
        return x
    x = apply_top_k(x, top_k)
    x = apply_top_p(x, top_p)
    return apply_min_p(x, min_p)


def sampling_probs(logits, *, prompt_ids=(), generated_ids=(), **params):
    """The distribution the next token is drawn from [V]: softmax(process_logits(...)); one-hot when greedy."""
    return softmax(process_logits(logits, prompt_ids=prompt_ids, generated_ids=generated_ids, **params))


def sample(probs, rng: np.random.Generator) -> int:
    """Inverse CDF: u = rng.random(); the first id whose cumulative probability exceeds u (times the total)."""
    cdf = np.cumsum(probs)
    u = rng.random()
    return int(min(np.searchsorted(cdf, u * cdf[-1], side="right"), len(cdf) - 1))


def generate(next_logits: Callable[[list[int]], np.ndarray], prompt_ids, *, eos_token_ids=(), rng=None,
             max_context: int | None = None, constraint=None, **params) -> list[int]:
    """Extend `prompt_ids` one token at a time; `next_logits(ids)` gives the logits [V] after ids.
    Returns the generated ids (a final stop / EOS token included). Stops early at max_context tokens in all.
    constraint: a GrammarConstraint (mask / consume / is_stopped) the output must follow."""
    sp = SamplingParams(**params)
    processing = {name: getattr(sp, name) for name in PROCESSING}
    if sp.temperature > 0 and rng is None:
        raise ValueError("generate: sampling (temperature > 0) needs rng=np.random.default_rng(seed)")
    stops = set(sp.stop_token_ids or ()) | (set() if sp.ignore_eos else set(eos_token_ids))
    prompt, generated = [int(t) for t in prompt_ids], []
    for _ in range(sp.max_new_tokens):
        if max_context is not None and len(prompt) + len(generated) >= max_context:
            break
        logits = next_logits(prompt + generated)
        if constraint is not None:
            allowed = constraint.mask()
            if allowed.sum() == 1:                      # the grammar forces this token: nothing to sample
                token = int(np.flatnonzero(allowed)[0])
                generated.append(token)
                constraint.consume(token)
                if token in stops or constraint.is_stopped():
                    break
                continue
            logits = np.where(allowed, np.asarray(logits, dtype=np.float64), -np.inf)
        if sp.temperature == 0:
            token = int(np.argmax(process_logits(logits, prompt_ids=prompt, generated_ids=generated, **processing)))
        else:
            token = sample(sampling_probs(logits, prompt_ids=prompt, generated_ids=generated, **processing), rng)
        generated.append(token)
        if constraint is not None:
            constraint.consume(token)
            if constraint.is_stopped():
                break
        if token in stops:
            break
    return generated
