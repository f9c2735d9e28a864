"""candlewick on Ray: classes for Ray Data's `map_batches` (offline batch inference over a corpus) and a Ray Serve
deployment of the OpenAI-compatible server (replicas behind one HTTP endpoint). Install with
`pip install "candlewick[ray]"`; docs/ray.md has the examples.

Each class loads its model once, in its constructor, so with an actor pool every actor holds one copy and serves
every batch sent to it:

    import ray
    from candlewick.ray import Embedder

    ds = ray.data.read_parquet("corpus/")                       # a "text" column
    ds = ds.map_batches(Embedder, fn_constructor_kwargs={"model": "sentence-transformers/all-MiniLM-L6-v2"},
                        compute=ray.data.ActorPoolStrategy(size=4), num_cpus=2, batch_size=64)
    ds.write_parquet("embedded/")                               # every column kept, "embedding" added

- `Embedder`: "text" -> "embedding" (float32 [D], as `Model.embed`).
- `Scorer`: "text" -> "perplexity", "num_tokens" and, with `token_nll=True`, "token_nll" (as `Model.perplexity`
  and `Model.token_nll`).
- `Generator`: "prompt" -> "completion", "finish_reason", "prompt_tokens", "completion_tokens" (as
  `Model.generate`); columns named as a `SamplingParams` field ("seed", "max_new_tokens", "temperature", ...)
  give that row's parameter, and a missing (null) value falls back to the constructor's `params`.

A batch is whatever Ray hands over (a dict of NumPy arrays by default, a pandas DataFrame or a pyarrow Table with
`batch_format=`); the batch comes back in the same kind with its other columns untouched.

Threads: each instance runs the engine on `threads` threads; by default, inside a Ray actor, as many as the CPUs
Ray gave the actor (`num_cpus=` of `map_batches`, 1 unless set), and all cores elsewhere. The engine's thread pool
is sized once per process, by its first model, so `threads` is read in the constructor, before the model loads.
"""
from __future__ import annotations

import dataclasses
import math
import os
import sys
from typing import TYPE_CHECKING, Any, Mapping, Union

import numpy as np

from .errors import InvalidArgument

if TYPE_CHECKING:
    import pandas
    import pyarrow
    from ray.serve import Application

    from .model import Completion, Model, SamplingParams

    Batch = Union[dict[str, np.ndarray], "pandas.DataFrame", "pyarrow.Table"]
    ModelSpec = Union[str, "os.PathLike[str]", Model]


def _actor_cpus() -> int | None:
    """The CPUs Ray assigned to the actor this runs in; None outside a Ray actor."""
    if "ray" not in sys.modules:
        return None
    import ray

    if not ray.is_initialized():
        return None
    ctx = ray.get_runtime_context()
    if ctx.get_actor_id() is None:
        return None
    cpus = ctx.get_assigned_resources().get("CPU")
    return max(1, int(round(cpus))) if cpus else 1


def _load(model: ModelSpec, device: str, dtype: str | None, threads: int | None) -> Model:
    """The model (loaded, unless it is a `Model` already) with the engine's thread count set first."""
    from .model import Model, load

    if threads is None:
        threads = _actor_cpus()
    if threads is not None:
        if threads < 1:
            raise InvalidArgument(f"threads must be >= 1, got {threads}")
        # read by the engine's thread pool when it first runs, which is after this in a fresh actor
        os.environ["RAYON_NUM_THREADS"] = str(threads)
    if isinstance(model, Model):
        return model
    return load(model, device=device, dtype=dtype)


# -- batches in any of Ray's formats ------------------------------------------------------------------------------


def _names(batch: Batch) -> list[str]:
    if isinstance(batch, Mapping):
        return list(batch)
    if hasattr(batch, "column_names"):  # pyarrow.Table
        return list(batch.column_names)
    return list(batch.columns)  # pandas.DataFrame


def _values(batch: Batch, name: str) -> list[Any]:
    """A column of the batch as a list of Python values (None where null)."""
    if name not in _names(batch):
        raise InvalidArgument(f"the batch has no column {name!r} (it has {_names(batch)})")
    col = batch[name]
    if hasattr(col, "to_pylist"):  # pyarrow
        return col.to_pylist()
    if hasattr(col, "to_numpy") and not isinstance(col, np.ndarray):  # pandas
        col = col.to_numpy()
    return [_py(v) for v in col]


def _py(v: Any) -> Any:
    """A NumPy scalar or array as a Python value; NaN (how pandas and NumPy spell a missing number) as None."""
    if isinstance(v, np.ndarray):
        return [_py(x) for x in v.tolist()] if v.dtype == object else v.tolist()
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float) and math.isnan(v):
        return None
    return v


def _rows(batch: Batch) -> int:
    if isinstance(batch, Mapping):
        return len(next(iter(batch.values()))) if batch else 0
    return len(batch)


def _with_columns(batch: Batch, new: dict[str, np.ndarray]) -> Batch:
    """The batch, of the kind it came in, with the `new` columns added (or replaced)."""
    if isinstance(batch, Mapping):
        out = dict(batch)
        out.update(new)
        return out
    if hasattr(batch, "column_names"):  # pyarrow.Table
        for name, values in new.items():
            arr = _arrow(values)
            if name in batch.column_names:
                batch = batch.set_column(batch.column_names.index(name), name, arr)
            else:
                batch = batch.append_column(name, arr)
        return batch
    out = batch.copy(deep=False)  # pandas.DataFrame
    for name, values in new.items():
        out[name] = list(values) if isinstance(values, np.ndarray) and values.ndim > 1 else values
    return out


def _arrow(values: np.ndarray):
    """A result column as a pyarrow array: float32 vectors as list<float32>."""
    import pyarrow as pa

    if isinstance(values, np.ndarray) and values.ndim == 2:
        return pa.array(list(values), type=pa.list_(pa.float32()))
    if isinstance(values, np.ndarray) and values.dtype == object and len(values) and isinstance(values[0], np.ndarray):
        return pa.array([None if v is None else v for v in values], type=pa.list_(pa.float32()))
    return pa.array(values)


def _texts(batch: Batch, column: str) -> list[str]:
    texts = _values(batch, column)
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise InvalidArgument(f"column {column!r}, row {i} of the batch: expected text, got "
                                  f"{'null' if t is None else type(t).__name__}")
    return texts


# -- the map_batches classes ----------------------------------------------------------------------------------


class Embedder:
    """Ray Data `map_batches` class: the sentence embedding of each row's `text_column` (default "text") in
    `output_column` (default "embedding"), float32 [D], as `Model.embed` computes it (encoder models).

        ds.map_batches(Embedder, fn_constructor_kwargs={"model": "sentence-transformers/all-MiniLM-L6-v2"},
                       compute=ray.data.ActorPoolStrategy(size=2), batch_size=64)

    `model`: a checkpoint folder, .gguf file or hub id (resolved on each worker), or a loaded `Model` (in one
    process). `threads`: the engine's threads (see the module's docstring). A batch is embedded in sub-batches of
    `sub_batch_size` texts of similar length (sorted by token count, as sentence-transformers' encode sorts), so
    that short texts are not padded to the batch's longest; None embeds each batch in one call."""

    output_columns = ("embedding",)

    def __init__(self, model: ModelSpec, *, device: str = "cpu", dtype: str | None = None, threads: int | None = None,
                 text_column: str = "text", output_column: str = "embedding", sub_batch_size: int | None = 16):
        self.model = _load(model, device, dtype, threads)
        if sub_batch_size is not None and sub_batch_size < 1:
            raise InvalidArgument(f"sub_batch_size must be >= 1 or None, got {sub_batch_size}")
        self.text_column = text_column
        self.output_column = output_column
        self.output_columns = (output_column,)
        self.sub_batch_size = sub_batch_size

    def embed(self, texts: list[str]) -> np.ndarray:
        """float32 [len(texts), D], in sub-batches of similar length."""
        sub = self.sub_batch_size
        if sub is None or len(texts) <= sub or self.model.tokenizer is None:
            return self.model.embed(texts)
        lengths = [len(ids) for ids in self.model.tokenizer.encode_batch(texts)]
        order = np.argsort(lengths, kind="stable")
        out: np.ndarray | None = None
        for start in range(0, len(texts), sub):
            idx = order[start:start + sub]
            vectors = self.model.embed([texts[i] for i in idx])
            if out is None:
                out = np.empty((len(texts), vectors.shape[1]), np.float32)
            out[idx] = vectors
        assert out is not None
        return out

    def __call__(self, batch: Batch) -> Batch:
        texts = _texts(batch, self.text_column)
        if not texts:
            dim = self.model.config["hidden_size"]
            return _with_columns(batch, {self.output_column: np.zeros((0, dim), np.float32)})
        return _with_columns(batch, {self.output_column: self.embed(texts)})


class Scorer:
    """Ray Data `map_batches` class: the perplexity of each row's `text_column` (default "text") as
    `Model.perplexity` computes it (a sliding window moving by `stride` tokens past the context), with
    "num_tokens" (the text's tokens, special tokens included) and, with `token_nll=True`, "token_nll" (float32
    [num_tokens - 1], -log p of every token but the first, from the same windows as the command line's
    `candlewick perplexity`). A text of fewer than two tokens has no perplexity: null (NaN), and an empty
    token_nll."""

    def __init__(self, model: ModelSpec, *, device: str = "cpu", dtype: str | None = None, threads: int | None = None,
                 text_column: str = "text", stride: int | None = None, token_nll: bool = False):
        self.model = _load(model, device, dtype, threads)
        if self.model.tokenizer is None:
            raise InvalidArgument("Scorer needs a checkpoint with a tokenizer (it scores text)")
        self.text_column = text_column
        self.stride = stride
        self.token_nll = token_nll
        self.output_columns = ("perplexity", "num_tokens") + (("token_nll",) if token_nll else ())
        ctx = self.model.config["context_length"]
        if stride is not None and not 0 < stride <= ctx:
            raise InvalidArgument(f"stride must be between 1 and the context length {ctx}, got {stride}")

    def _nll(self, ids: list[int]) -> np.ndarray:
        from .windows import perplexity_windows

        ctx = self.model.config["context_length"]
        if len(ids) <= ctx:
            return np.asarray(self.model.token_nll(ids), np.float32)
        parts = []
        for begin, end, first in perplexity_windows(len(ids), ctx, self.stride):
            parts.append(self.model.token_nll(ids[begin:end])[first - begin - 1:])
        return np.concatenate(parts).astype(np.float32)

    def __call__(self, batch: Batch) -> Batch:
        texts = _texts(batch, self.text_column)
        tok = self.model.tokenizer
        assert tok is not None  # checked in the constructor
        ids = tok.encode_batch(texts) if texts else []
        ppl = np.full(len(texts), np.nan, np.float64)
        nll = np.empty(len(texts), dtype=object)
        for i, seq in enumerate(ids):
            if len(seq) >= 2:
                ppl[i] = self.model.perplexity(seq, stride=self.stride)
            if self.token_nll:
                nll[i] = self._nll(seq) if len(seq) >= 2 else np.zeros(0, np.float32)
        out = {"perplexity": ppl, "num_tokens": np.array([len(s) for s in ids], np.int64)}
        if self.token_nll:
            out["token_nll"] = nll
        return _with_columns(batch, out)


def _param_fields() -> dict[str, Any]:
    from .model import SamplingParams

    return {f.name: f for f in dataclasses.fields(SamplingParams)}


def _param_value(name: str, value: Any) -> Any:
    """A per-row parameter as `SamplingParams` takes it (ints for the int fields, a list of stop strings, the ids
    of logit_bias as ints)."""
    if name in ("max_new_tokens", "top_k", "seed", "n", "logprobs"):
        if isinstance(value, float) and not value.is_integer():
            raise InvalidArgument(f"{name} must be an integer, got {value}")
        return int(value)
    if name in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty"):
        return float(value)
    if name == "ignore_eos":
        return bool(value)
    if name == "logit_bias" and isinstance(value, Mapping):
        return {int(k): float(v) for k, v in value.items() if v is not None}
    if name == "logit_bias" and isinstance(value, list):  # a map column as pyarrow gives it: (key, value) pairs
        return {int(k): float(v) for k, v in value}
    return value


class Generator:
    """Ray Data `map_batches` class: a completion of each row's `prompt_column` (default "prompt": text, or token
    ids) by `Model.generate`, in "completion", "finish_reason" ("stop" or "length"), "prompt_tokens" and
    "completion_tokens". The batch runs as one batch on the engine's scheduler.

    `params` (a `SamplingParams` or a dict of its fields) are the parameters of every row; a column named as a
    field ("seed", "max_new_tokens", "temperature", "stop", ...) sets it per row, where it is not null. A seed
    gives the same text as `Model.generate` with that seed, whatever else is in the batch. One completion per
    row: n must be 1."""

    output_columns = ("completion", "finish_reason", "prompt_tokens", "completion_tokens")

    def __init__(self, model: ModelSpec, *, params: SamplingParams | Mapping[str, Any] | None = None,
                 device: str = "cpu", dtype: str | None = None, threads: int | None = None,
                 prompt_column: str = "prompt"):
        from .model import SamplingParams

        self.model = _load(model, device, dtype, threads)
        if params is None:
            params = SamplingParams()
        elif isinstance(params, Mapping):
            unknown = sorted(set(params) - set(_param_fields()))
            if unknown:
                raise InvalidArgument(f"unknown generation parameter(s) {unknown}; known: {sorted(_param_fields())}")
            params = SamplingParams(**params)
        if params.n != 1:
            raise InvalidArgument(f"Generator writes one completion per row: n must be 1, got {params.n}")
        self.params = params
        self.prompt_column = prompt_column

    def _row_params(self, batch: Batch, n: int) -> list[SamplingParams]:
        fields = _param_fields()
        columns = {name: _values(batch, name) for name in _names(batch) if name in fields and name != self.prompt_column}
        out = []
        for i in range(n):
            over = {k: _param_value(k, v[i]) for k, v in columns.items() if v[i] is not None}
            if over.get("n", 1) != 1:
                raise InvalidArgument(f"row {i} of the batch: n must be 1, got {over['n']}")
            out.append(dataclasses.replace(self.params, **over))
        return out

    def __call__(self, batch: Batch) -> Batch:
        prompts = _values(batch, self.prompt_column)
        for i, p in enumerate(prompts):
            if not isinstance(p, (str, list)):
                raise InvalidArgument(f"column {self.prompt_column!r}, row {i} of the batch: expected text or token "
                                      f"ids, got {'null' if p is None else type(p).__name__}")
        completions: list[Completion] = []
        if prompts:
            out = self.model.generate(prompts, sampling_params=self._row_params(batch, len(prompts)))
            completions = out if isinstance(out, list) else [out]
        return _with_columns(batch, {
            "completion": np.array([c.text for c in completions], dtype=object),
            "finish_reason": np.array([c.choices[0].finish_reason for c in completions], dtype=object),
            "prompt_tokens": np.array([c.usage.prompt_tokens for c in completions], np.int64),
            "completion_tokens": np.array([c.usage.completion_tokens for c in completions], np.int64),
        })


# -- Ray Serve ------------------------------------------------------------------------------------------------


def openai_app(model: str | os.PathLike[str], *, model_id: str | None = None, device: str = "cpu",
               dtype: str | None = None, threads: int | None = None, num_replicas: int = 1,
               max_ongoing_requests: int | None = None, name: str = "candlewick",
               ray_actor_options: Mapping[str, Any] | None = None, **server_options: Any) -> Application:
    """A Ray Serve application of the OpenAI-compatible server (`candlewick.server.create_app`): `num_replicas`
    replicas, each loading `model` once (on `threads` threads, and as many CPUs reserved; default 1) and serving
    the whole API (/v1/completions, /v1/chat/completions with streaming, /v1/embeddings, /v1/models, /health,
    /metrics per replica); Serve's proxy spreads the requests over them.

        from ray import serve
        serve.run(openai_app("HuggingFaceTB/SmolLM2-135M-Instruct", num_replicas=2, threads=2), route_prefix="/")

    `server_options` go to `create_app` (api_key, max_active, max_queue, kv_cache_tokens, max_batch_tokens,
    workers, max_body_bytes, allowed_origins). Each replica batches up to `max_active` (default 64) sequences, so
    `max_ongoing_requests` (the requests Serve sends one replica at a time) defaults to that; more wait in Serve's
    queue for the first free replica. `model` is resolved on each replica: a hub id, or a path every node sees."""
    from ray import serve

    from .cli import _model_name

    path = os.fspath(model)
    if os.path.exists(path):
        path = os.path.abspath(path)  # replicas do not run in this directory
    served_name = model_id or _model_name(os.fspath(model))
    threads = 1 if threads is None else threads
    if threads < 1 or num_replicas < 1:
        raise InvalidArgument(f"threads and num_replicas must be >= 1, got {threads} and {num_replicas}")
    options = dict(server_options)

    def build_app():
        from .server import create_app

        return create_app(_load(path, device, dtype, threads), served_name, **options)

    actor_options = {"num_cpus": threads, **(ray_actor_options or {})}
    deployment = serve.deployment(
        serve.ingress(build_app)(), name=name, num_replicas=num_replicas, ray_actor_options=actor_options,
        max_ongoing_requests=max_ongoing_requests or options.get("max_active", 64),
    )
    return deployment.bind()  # type: ignore[attr-defined]


def build_openai_app(args: Mapping[str, str]) -> Application:
    """`openai_app` for Serve's command line, which passes key=value arguments as strings:

        serve run candlewick.ray:build_openai_app model=HuggingFaceTB/SmolLM2-135M-Instruct num_replicas=2 threads=2
    """
    args = dict(args)
    if "model" not in args:
        raise InvalidArgument("build_openai_app needs model=PATH_OR_HUB_ID")
    ints = {"threads", "num_replicas", "max_ongoing_requests", "max_active", "max_queue", "kv_cache_tokens",
            "max_batch_tokens", "workers", "max_body_bytes"}
    kwargs: dict[str, Any] = {}
    for k, v in args.items():
        if k == "allowed_origins":
            kwargs[k] = [o for o in str(v).split(",") if o]
        elif k in ints:
            try:
                kwargs[k] = int(v)
            except ValueError:
                raise InvalidArgument(f"{k}={v!r}: expected an integer") from None
        else:
            kwargs[k] = v
    return openai_app(kwargs.pop("model"), **kwargs)


__all__ = ["Embedder", "Scorer", "Generator", "openai_app", "build_openai_app"]
