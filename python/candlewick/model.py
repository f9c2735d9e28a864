"""`candlewick.load` and `Model`: the engine's Python surface (numpy in, numpy out)."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence, Union

import numpy as np

from . import _native
from .errors import InvalidArgument, ModelLoadError
from .structured import CONSTRAINT_PARAMS, constraint_from
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


@dataclass
class TokenLogprob:
    """The chosen token's log-probability under the model's raw distribution (log_softmax of the logits, before
    any sampling parameter), and the `logprobs` most likely alternatives as (token_id, logprob), best first."""

    token_id: int
    logprob: float
    top_logprobs: list[tuple[int, float]]


@dataclass
class Choice:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (EOS, a stop token or a stop string) or "length"
    logprobs: list[TokenLogprob] | None = None


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass
class Completion:
    prompt_token_ids: list[int]
    choices: list[Choice]
    usage: Usage = field(init=False)

    def __post_init__(self):
        self.usage = Usage(len(self.prompt_token_ids), sum(len(c.token_ids) for c in self.choices))

    @property
    def text(self) -> str:
        """The first choice's text."""
        return self.choices[0].text

    @classmethod
    def _from_native(cls, d: dict) -> "Completion":
        choices = []
        for i, c in enumerate(d["choices"]):
            lps = None
            if c["logprobs"] is not None:
                lps = [TokenLogprob(t, lp, [tuple(x) for x in top]) for t, lp, top in c["logprobs"]]
            choices.append(Choice(i, c["text"], c["token_ids"], c["finish_reason"], lps))
        return cls(d["prompt_token_ids"], choices)


def _is_batch(x: Any) -> bool:
    if isinstance(x, np.ndarray):
        return x.ndim == 2
    return isinstance(x, (list, tuple)) and len(x) > 0 and all(
        isinstance(s, (list, tuple, np.ndarray)) for s in x
    )


@dataclass
class SamplingParams:
    """The generation parameters of one request, as `Model.generate` takes them as keywords (see there)."""
    max_new_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: Mapping[int, float] | None = None
    stop: str | Sequence[str] | None = None
    stop_token_ids: Sequence[int] | None = None
    ignore_eos: bool = False
    seed: int | None = None
    n: int = 1
    logprobs: int | None = None
    json_schema: Any = None
    regex: str | None = None
    grammar: str | None = None
    response_format: Any = None

    def as_dict(self) -> dict[str, Any]:
        return dict(vars(self))


def _native_params(params: Mapping[str, Any]) -> dict[str, Any]:
    """The keyword parameters as the extension takes them: json_schema / regex / grammar / response_format
    become one ("constraint": (kind, text)), checked here (candlewick.structured)."""
    out = {k: v for k, v in params.items() if k not in CONSTRAINT_PARAMS}
    out["constraint"] = constraint_from(**{k: params.get(k) for k in CONSTRAINT_PARAMS})
    return out


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

    def _prompt_ids(self, prompt: str | Ids, what: str = "prompt") -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ModelLoadError("this checkpoint has no tokenizer.json; pass token ids instead of text")
            return self.tokenizer.encode(prompt)
        return as_ids(prompt, what) if len(prompt) else []

    def generate(
        self,
        prompt: str | Ids | Sequence[str | Ids],
        *,
        max_new_tokens: int = 16,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        min_p: float = 0.0,
        repetition_penalty: float = 1.0,
        presence_penalty: float = 0.0,
        frequency_penalty: float = 0.0,
        logit_bias: Mapping[int, float] | None = None,
        stop: str | Sequence[str] | None = None,
        stop_token_ids: Sequence[int] | None = None,
        ignore_eos: bool = False,
        seed: int | None = None,
        n: int = 1,
        logprobs: int | None = None,
        json_schema: Any = None,
        regex: str | None = None,
        grammar: str | None = None,
        response_format: Any = None,
        sampling_params: "SamplingParams | Sequence[SamplingParams] | None" = None,
    ) -> Completion | list[Completion]:
        """Continue `prompt` (text or token ids). A list of prompts runs as one batch and returns a list.

        `sampling_params` (as vLLM's LLM.generate takes them): one `SamplingParams` for every prompt, or a list with
        one per prompt; it replaces the keyword parameters. All prompts run on one scheduler: they decode together
        in one batch, each with its own parameters.

        temperature 0 is greedy; processors apply in the order penalties, logit_bias, temperature, top_k, top_p,
        min_p (see candlewick.reference.generate). The same seed gives the same tokens alone, batched or streamed.

        Structured output (at most one of these): `json_schema` (a dict, its JSON text, or a pydantic model class),
        `regex`, `grammar` (Lark, as llguidance reads it) or OpenAI's `response_format` ({"type": "json_object"}
        or {"type": "json_schema", "json_schema": {"name": ..., "schema": {...}}}). Each step, tokens that would
        leave the schema are masked out before sampling; a token the grammar forces is taken without sampling;
        the text ends when the grammar is complete (finish_reason "stop"), and "length" says it was cut short.
        An invalid schema or grammar is an InvalidArgument before any token is generated. docs/structured.md.

            model.generate("A user:", json_schema={"type": "object", "properties": {"age": {"type": "integer"}},
                                                   "required": ["age"]}, max_new_tokens=40)"""
        params = dict(
            max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
            repetition_penalty=repetition_penalty, presence_penalty=presence_penalty,
            frequency_penalty=frequency_penalty, logit_bias=logit_bias, stop=stop, stop_token_ids=stop_token_ids,
            ignore_eos=ignore_eos, seed=seed, n=n, logprobs=logprobs, json_schema=json_schema, regex=regex,
            grammar=grammar, response_format=response_format,
        )
        batch = isinstance(prompt, (list, tuple)) and len(prompt) > 0 and all(
            isinstance(p, (str, list, tuple, np.ndarray)) for p in prompt
        )
        prompts = list(prompt) if batch else [prompt]
        ids = [self._prompt_ids(p, f"prompt {i}" if batch else "prompt") for i, p in enumerate(prompts)]
        native_params: Any = _native_params(params)
        if sampling_params is not None:
            if isinstance(sampling_params, SamplingParams):
                native_params = _native_params(sampling_params.as_dict())
            else:
                native_params = [_native_params(sp.as_dict()) for sp in sampling_params]
                if len(native_params) != len(ids):
                    raise InvalidArgument(f"sampling_params: {len(native_params)} for {len(ids)} prompts; give one "
                                          "per prompt, or a single SamplingParams for all")
        out = [Completion._from_native(d) for d in self._native.generate(ids, native_params)]
        return out if batch else out[0]

    def stream(self, prompt: str | Ids, **params: Any) -> TextStream:
        """The generated text piece by piece (never half a character, never part of a stop string); the pieces
        join to `generate(prompt, **params).text` for the same seed. Closing the stream stops the work; once it is
        exhausted, its `completion` has the token ids, finish reason and usage. Takes the parameters of
        `generate`; n must be 1.

            s = model.stream("Once upon a time", max_new_tokens=20, seed=0)
            text = "".join(s)
            s.completion.choices[0].finish_reason   # "length" or "stop"
        """
        _check_params(params)
        return TextStream(self._native.stream(self._prompt_ids(prompt), _native_params(params)))

    def chat(self, messages: Sequence[Mapping[str, Any]], **params: Any) -> Completion:
        """Render `messages` with the checkpoint's chat template (with the assistant prompt), then `generate`."""
        return self.generate(self._chat_ids(messages), **params)

    def stream_chat(self, messages: Sequence[Mapping[str, Any]], **params: Any) -> TextStream:
        """`chat`, streamed."""
        return self.stream(self._chat_ids(messages), **params)

    def _chat_ids(self, messages) -> list[int]:
        if self.tokenizer is None:
            raise ModelLoadError("this checkpoint has no tokenizer.json, so it has no chat template")
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)

    def embed(self, texts: str | Sequence[str]) -> np.ndarray:
        """Sentence embeddings float32 [N, D], pooled and normalised as the checkpoint's sentence-transformers
        config says (encoder models)."""
        if isinstance(texts, str):
            texts = [texts]
        return self._native.embed_texts(list(texts))[1]

    def __repr__(self) -> str:
        c = self.config
        return f"Model({c['model_type']}, layers={c['num_layers']}, hidden={c['hidden_size']}, dtype={c['dtype']})"


class TextStream:
    """What `Model.stream` returns: an iterator of text pieces, and once they are all out, `completion` (the
    `Completion` that `generate` would have returned). `close()` (or leaving a `with` block) stops the
    generation; an abandoned stream is closed when it is garbage-collected."""

    def __init__(self, native: Any):
        self._native = native
        self._completion: Completion | None = None

    def __iter__(self) -> "TextStream":
        return self

    def __next__(self) -> str:
        try:
            return next(self._native)
        except StopIteration:
            if self._completion is None:
                result = self._native.result()
                if result is not None:
                    self._completion = Completion._from_native(result)
            raise

    @property
    def completion(self) -> Completion | None:
        """The finished completion (token ids, finish reason, usage); None until the last piece is out."""
        return self._completion

    def close(self) -> None:
        self._native.close()

    def __enter__(self) -> "TextStream":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self._native.close()
        except Exception:
            pass


_GENERATE_PARAMS = set(Model.generate.__kwdefaults__) - {"sampling_params"}


def _check_params(params: Mapping[str, Any]) -> None:
    unknown = sorted(set(params) - _GENERATE_PARAMS)
    if unknown:
        raise TypeError(f"unknown generation parameter(s) {unknown}; known: {sorted(_GENERATE_PARAMS)}")


def load(path: str | os.PathLike, device: str = "cpu", dtype: str | None = None,
         kv_cache_dtype: str = "f32") -> Model:
    """Load a Hugging Face-style checkpoint folder (config.json, *.safetensors, tokenizer.json), or a hub id
    ("org/name") through the huggingface_hub cache (see candlewick.hub.resolve).

    device: "cpu", "cuda" or "cuda:N". dtype: None (the checkpoint's; float32 on CPU), "float32", "bfloat16" or
    "float16". kv_cache_dtype: "f32" (the default: the activations' own on the CPU) or "f16", where generation
    keeps its keys and values (CPU only): half the memory, and half the bytes a decode step reads at long
    contexts, each key and value rounded to f16 as it is stored, as llama.cpp keeps its cache by default. The
    logits then differ from the f32 cache's by that rounding; the decode paths still agree bit for bit."""
    from . import hub

    return Model(_native.Model.load(hub.resolve(path), device, dtype, kv_cache_dtype))
