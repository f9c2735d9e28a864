"""`candlewick batch {embed,perplexity,generate} MODEL INPUT OUTPUT`: a model over every row of a JSONL or Parquet
file, in one process or, with `--ray [ADDRESS]`, on Ray Data (an actor pool of candlewick.ray's classes).

Rows keep their other columns; the task adds its own (embed: "embedding"; perplexity: "perplexity",
"num_tokens", with --token-nll "token_nll"; generate: "completion", "finish_reason", "prompt_tokens",
"completion_tokens"). OUTPUT's rows come in INPUT's order, and the output of a Ray run is the output of a run in
one process.

A run is resumable: rows already in OUTPUT are skipped, and the new ones are appended. A row's key is its `id`
column when INPUT has one (unique, never null), else its index among INPUT's rows; as rows are written in order, an
OUTPUT without ids holds the first rows of INPUT, so a resumed run skips as many rows as OUTPUT holds. JSONL output
is appended line by line (an interrupted last line is dropped on resuming); Parquet output is written as parts
into OUTPUT.parts/ as the run goes (each part complete, or absent) and joined into OUTPUT at the end.

JSONL needs nothing beyond the standard library; Parquet needs pyarrow; --ray needs `candlewick[ray]`.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from .errors import InvalidArgument

_ROW = "__candlewick_row"
_ERROR = "__candlewick_error"
_PART_ROWS = 4096      # a Parquet part is written when this many rows are waiting ...
_PART_SECONDS = 30.0   # ... or when the oldest has waited this long


@dataclasses.dataclass
class Task:
    """What a task reads and which candlewick.ray class does it."""

    column: str        # the input column, by default
    cls: str           # the candlewick.ray class
    outputs: tuple[str, ...]


TASKS = {
    "embed": Task("text", "Embedder", ("embedding",)),
    "perplexity": Task("text", "Scorer", ("perplexity", "num_tokens")),
    "generate": Task("prompt", "Generator", ("completion", "finish_reason", "prompt_tokens", "completion_tokens")),
}


@dataclasses.dataclass
class Job:
    task: str
    model: str                       # a local path or hub id, as candlewick.load takes it
    input: Path
    output: Path
    column: str | None = None        # default: the task's
    options: dict[str, Any] = dataclasses.field(default_factory=dict)  # the class's other constructor arguments
    batch_size: int | None = None    # default: 64 (embed), 16 (others)
    device: str = "cpu"
    dtype: str | None = None
    threads: int | None = None       # per actor with Ray (default 1); all cores in one process
    ray: bool = False
    address: str | None = None       # None or "local": a new local cluster; else ray.init(address=...)
    concurrency: int | None = None   # actors (default: the cluster's CPUs / threads)
    max_retries: int = 3             # restarts of a dead actor, and retries of its batches


@dataclasses.dataclass
class Summary:
    written: int      # rows written by this run
    skipped: int      # rows already in OUTPUT
    total: int        # rows of INPUT
    seconds: float
    actors: int | None = None


# -- files ----------------------------------------------------------------------------------------------------


def file_format(path: Path) -> str:
    """"jsonl" or "parquet", by the file's extension."""
    name = path.name.lower()
    if name.endswith((".jsonl", ".json", ".ndjson")):
        return "jsonl"
    if name.endswith((".parquet", ".pq")):
        return "parquet"
    raise InvalidArgument(f"{path}: the extension says neither JSONL (.jsonl, .json, .ndjson) nor Parquet "
                          "(.parquet, .pq)")


def _pyarrow():
    try:
        import pyarrow
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise InvalidArgument("Parquet files and --ray need pyarrow: pip install pyarrow "
                              "(or pip install \"candlewick[ray]\")") from None
    return pyarrow


class Rows:
    """INPUT's rows: parsed JSON objects (JSONL) or a pyarrow Table (Parquet)."""

    def __init__(self, path: Path):
        self.path = path
        self.format = file_format(path)
        self.dicts: list[dict] | None = None
        self._table = None
        if self.format == "jsonl":
            self.dicts = list(_read_jsonl(path, what="INPUT"))
            names: dict[str, None] = {}
            for d in self.dicts:
                names.update(dict.fromkeys(d))
            self.columns = list(names)
            self.n = len(self.dicts)
        else:
            pa = _pyarrow()
            try:
                self._table = pa.parquet.read_table(path)
            except (OSError, pa.ArrowException) as e:
                raise InvalidArgument(f"{path}: not a readable Parquet file: {e}") from None
            self.columns = list(self._table.column_names)
            self.n = self._table.num_rows

    def column(self, name: str, rows: Sequence[int] | None = None) -> list[Any]:
        """The values of a column (None where a row lacks it), of every row or of `rows`."""
        if self.dicts is not None:
            src = self.dicts if rows is None else [self.dicts[i] for i in rows]
            return [d.get(name) for d in src]
        col = self.table().column(name)
        return (col if rows is None else col.take(rows)).to_pylist()

    def dict_rows(self, rows: Sequence[int]) -> list[dict]:
        if self.dicts is not None:
            return [self.dicts[i] for i in rows]
        return self.table().take(rows).to_pylist()

    def table(self):
        """Every row as one pyarrow Table (a JSONL file's types inferred once, over all its rows)."""
        if self._table is None:
            pa = _pyarrow()
            self._table = pa.Table.from_pylist(self.dicts) if self.dicts else pa.table({})
        return self._table


def _read_jsonl(path: Path, what: str) -> Iterator[dict]:
    try:
        f = open(path, encoding="utf-8")
    except OSError as e:
        raise InvalidArgument(f"{what} {path}: {e.strerror or e}") from None
    with f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise InvalidArgument(f"{what} {path}, line {lineno}: not JSON ({e.msg})") from None
            except UnicodeDecodeError:
                raise InvalidArgument(f"{what} {path}: not UTF-8 text") from None
            if not isinstance(obj, dict):
                raise InvalidArgument(f"{what} {path}, line {lineno}: a row must be a JSON object, got "
                                      f"{type(obj).__name__}")
            yield obj


def row_keys(rows: Rows) -> list[Any] | None:
    """The `id` of every row (None when INPUT has no id column: rows are keyed by index)."""
    if "id" not in rows.columns:
        return None
    keys = rows.column("id")
    seen: dict[Any, int] = {}
    for i, k in enumerate(keys):
        if k is None:
            raise InvalidArgument(f"INPUT {rows.path}: row {i} has no id (an id column, if there is one, keys every "
                                  "row)")
        try:
            j = seen.setdefault(k, i)
        except TypeError:
            raise InvalidArgument(f"INPUT {rows.path}: row {i}'s id is a {type(k).__name__}; ids must be numbers "
                                  "or strings") from None
        if j != i:
            raise InvalidArgument(f"INPUT {rows.path}: rows {j} and {i} have the same id {k!r}")
    return keys


def _parts_dir(output: Path) -> Path:
    return output.with_name(output.name + ".parts")


def _drop_partial_line(path: Path) -> None:
    """Cut a JSONL file after its last newline (an interrupted run can leave half a row)."""
    with open(path, "rb+") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        if size == 0:
            return
        pos = size
        while pos > 0:
            step = min(1 << 16, pos)
            f.seek(pos - step)
            chunk = f.read(step)
            nl = chunk.rfind(b"\n")
            if nl >= 0:
                end = pos - step + nl + 1
                break
            pos -= step
        else:
            end = 0
        if end != size:
            f.truncate(end)


def done_keys(output: Path, keyed: bool) -> tuple[set, int]:
    """The keys of the rows already in OUTPUT (ids; with no ids, the set is empty) and how many rows it holds,
    its unfinished Parquet parts included."""
    fmt = file_format(output)
    keys: set = set()
    count = 0
    if fmt == "jsonl":
        if output.exists():
            _drop_partial_line(output)
            for row in _read_jsonl(output, what="OUTPUT"):
                count += 1
                if keyed:
                    keys.add(_hashable(row.get("id")))
        return keys, count
    pa = _pyarrow()
    files = [output] if output.exists() else []
    if _parts_dir(output).is_dir():
        files += sorted(_parts_dir(output).glob("part-*.parquet"))
    for f in files:
        try:
            if keyed:
                ids = pa.parquet.read_table(f, columns=["id"]).column("id").to_pylist()
                keys.update(_hashable(k) for k in ids)
                count += len(ids)
            else:
                count += pa.parquet.read_metadata(f).num_rows
        except (OSError, KeyError, pa.ArrowException) as e:
            raise InvalidArgument(f"OUTPUT {f}: cannot read its rows{' ids' if keyed else ''}: {e}") from None
    return keys, count


def _hashable(k: Any) -> Any:
    try:
        hash(k)
    except TypeError:
        return json.dumps(k, sort_keys=True)
    return k


# -- results --------------------------------------------------------------------------------------------------


def _json_value(v: Any) -> Any:
    if isinstance(v, np.ndarray):
        return [None if isinstance(x, float) and math.isnan(x) else x for x in v.tolist()]
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float) and math.isnan(v):
        return None
    return v


def _json_default(v: Any) -> Any:
    """What json cannot write as it is: bytes, datetimes, decimals (from Parquet input)."""
    if isinstance(v, bytes):
        return v.decode("utf-8", "backslashreplace")
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    return str(v)


class JsonlWriter:
    def __init__(self, output: Path, rows: Rows, columns: Sequence[str]):
        self.rows, self.columns = rows, list(columns)
        self.f = open(output, "a", encoding="utf-8")

    def write(self, indices: list[int], results: dict[str, list]) -> None:
        lines = []
        for j, row in enumerate(self.rows.dict_rows(indices)):
            row = dict(row)
            for c in self.columns:
                row[c] = _json_value(results[c][j])
            lines.append(json.dumps(row, ensure_ascii=False, allow_nan=False, default=_json_default) + "\n")
        self.f.write("".join(lines))
        self.f.flush()

    def close(self, finished: bool) -> None:
        self.f.close()


class ParquetWriter:
    """Parts in OUTPUT.parts/ (each written to a temporary name, then renamed) and, at the end, OUTPUT: the rows
    it held before, then the parts, in order."""

    def __init__(self, output: Path, rows: Rows, columns: Sequence[str]):
        self.pa = _pyarrow()
        self.output, self.rows, self.columns = output, rows, list(columns)
        self.dir = _parts_dir(output)
        self.dir.mkdir(exist_ok=True)
        done = sorted(self.dir.glob("part-*.parquet"))
        self.seq = int(done[-1].stem.split("-")[1]) + 1 if done else 0
        self.pending: list[tuple[list[int], dict[str, list]]] = []
        self.waiting = 0
        self.since = time.monotonic()

    def write(self, indices: list[int], results: dict[str, list]) -> None:
        if not self.pending:
            self.since = time.monotonic()
        self.pending.append((indices, results))
        self.waiting += len(indices)
        if self.waiting >= _PART_ROWS or time.monotonic() - self.since >= _PART_SECONDS:
            self.flush()

    def _array(self, name: str, values: list):
        pa = self.pa
        if name in ("embedding", "token_nll"):
            return pa.array([np.asarray(v, np.float32) for v in values], type=pa.list_(pa.float32()))
        if name == "perplexity":
            return pa.array([None if math.isnan(float(v)) else float(v) for v in values], type=pa.float64())
        if name in ("num_tokens", "prompt_tokens", "completion_tokens"):
            return pa.array([int(v) for v in values], type=pa.int64())
        return pa.array([str(v) for v in values], type=pa.string())

    def flush(self) -> None:
        if not self.pending:
            return
        pa = self.pa
        indices = [i for idx, _ in self.pending for i in idx]
        table = self.rows.table().take(pa.array(indices, type=pa.int64()))
        for c in self.columns:
            values = [v for _, res in self.pending for v in res[c]]
            table = table.append_column(c, self._array(c, values))
        name = self.dir / f"part-{self.seq:06d}.parquet"
        tmp = name.with_suffix(".tmp")
        pa.parquet.write_table(table, tmp)
        os.replace(tmp, name)
        self.seq += 1
        self.pending, self.waiting = [], 0

    def close(self, finished: bool) -> None:
        self.flush()
        if not finished:
            return
        pa = self.pa
        if self.output.exists() and not any(self.dir.glob("part-*.parquet")):  # nothing new
            shutil.rmtree(self.dir)
            return
        tables = [pa.parquet.read_table(self.output)] if self.output.exists() else []
        tables += [pa.parquet.read_table(p) for p in sorted(self.dir.glob("part-*.parquet"))]
        if not tables:  # an empty INPUT: an empty OUTPUT with the columns it would have
            base = self.rows.table()
            tables = [base.slice(0, 0)]
            for c in self.columns:
                tables[0] = tables[0].append_column(c, self._array(c, []))
        try:
            merged = pa.concat_tables(tables)
        except pa.ArrowInvalid as e:
            raise InvalidArgument(f"OUTPUT {self.output}: its rows have other columns than this run's ({e}); write "
                                  "to a new OUTPUT") from None
        tmp = self.output.with_name(self.output.name + ".tmp")
        pa.parquet.write_table(merged, tmp)
        os.replace(tmp, self.output)
        shutil.rmtree(self.dir)


# -- the run --------------------------------------------------------------------------------------------------


def _object_array(values: list) -> np.ndarray:
    """A 1-D object array of exactly these values (np.array would make lists of equal length a 2-D array)."""
    arr = np.empty(len(values), dtype=object)
    for i, v in enumerate(values):
        arr[i] = v
    return arr


def _outputs(job: Job) -> tuple[str, ...]:
    out = TASKS[job.task].outputs
    if job.task == "perplexity" and job.options.get("token_nll"):
        out += ("token_nll",)
    return out


def _class_kwargs(job: Job, column: str) -> dict[str, Any]:
    col_arg = "prompt_column" if job.task == "generate" else "text_column"
    return {"device": job.device, "dtype": job.dtype, "threads": job.threads, col_arg: column, **job.options}


def _input_columns(job: Job, rows: Rows, column: str) -> list[str]:
    """The columns the task reads: the text (or prompt) column, and for generate the per-row parameters."""
    cols = [column]
    if job.task == "generate":
        from .ray import _param_fields

        cols += [c for c in rows.columns if c in _param_fields() and c != column]
    return cols


def run(job: Job, progress: Callable[..., Any] | None = None) -> Summary:
    """Run `job`: read INPUT, skip the rows OUTPUT holds, process the rest and append them to OUTPUT.
    `progress(total=...)` makes the progress bar (a tqdm-like context manager); None shows none."""
    if job.task not in TASKS:
        raise InvalidArgument(f"unknown task {job.task!r}; one of {sorted(TASKS)}")
    column = job.column or TASKS[job.task].column
    batch_size = job.batch_size or (64 if job.task == "embed" else 16)
    if batch_size < 1 or (job.concurrency is not None and job.concurrency < 1) or (job.threads is not None and job.threads < 1):
        raise InvalidArgument("--batch-size, --concurrency and --threads must be >= 1")
    if job.max_retries < 0:
        raise InvalidArgument(f"--max-retries must be >= 0, got {job.max_retries}")
    if job.input.resolve() == job.output.resolve():
        raise InvalidArgument("OUTPUT must be another file than INPUT")
    out_fmt = file_format(job.output)
    if out_fmt == "parquet":
        _pyarrow()
    t0 = time.perf_counter()
    rows = Rows(job.input)
    keys = row_keys(rows)
    done, count = done_keys(job.output, keys is not None)
    if keys is None:
        if count > rows.n:
            raise InvalidArgument(f"OUTPUT {job.output} holds {count} rows, more than INPUT's {rows.n}: it is not "
                                  "this INPUT's output (rows without an id column are keyed by their index)")
        todo = list(range(count, rows.n))
    else:
        todo = [i for i, k in enumerate(keys) if _hashable(k) not in done]
    outputs = _outputs(job)
    if todo:
        if column not in rows.columns:
            raise InvalidArgument(f"INPUT {job.input} has no column {column!r} (its columns: {rows.columns}); "
                                  "--column names another")
        clash = [c for c in outputs if c in rows.columns]
        if clash:
            raise InvalidArgument(f"INPUT {job.input} has a column named as an output column: {clash}")
    writer = (JsonlWriter if out_fmt == "jsonl" else ParquetWriter)(job.output, rows, outputs)
    finished = False
    actors = None
    try:
        bar = progress(total=len(todo)) if progress is not None else None
        try:
            def write(indices: list[int], results: dict[str, list]) -> None:
                writer.write(indices, results)
                if bar is not None:
                    bar.update(len(indices))

            if not todo:
                pass
            elif job.ray:
                actors = _run_ray(job, rows, todo, column, batch_size, outputs, write)
            else:
                _run_local(job, rows, todo, column, batch_size, outputs, write)
        finally:
            if bar is not None:
                bar.close()
        finished = True
    finally:
        writer.close(finished)
    return Summary(len(todo), rows.n - len(todo), rows.n, time.perf_counter() - t0, actors)


def _results(batch: dict[str, Any], outputs: Sequence[str]) -> dict[str, list]:
    return {c: list(batch[c]) for c in outputs}


def _run_local(job: Job, rows: Rows, todo: list[int], column: str, batch_size: int, outputs: Sequence[str],
               write: Callable[[list[int], dict[str, list]], None]) -> None:
    from . import ray as cwray

    worker = getattr(cwray, TASKS[job.task].cls)(job.model, **_class_kwargs(job, column))
    columns = _input_columns(job, rows, column)
    for start in range(0, len(todo), batch_size):
        idx = todo[start:start + batch_size]
        batch = {c: _object_array(rows.column(c, idx)) for c in columns}
        write(idx, _results(worker(batch), outputs))


def _run_ray(job: Job, rows: Rows, todo: list[int], column: str, batch_size: int, outputs: Sequence[str],
             write: Callable[[list[int], dict[str, list]], None]) -> int:
    """The rows on a Ray Data actor pool; the results come back here and are written in INPUT's order. Returns
    the number of actors."""
    try:
        import ray
        import ray.data
    except ImportError:
        raise InvalidArgument("--ray needs Ray Data: pip install \"candlewick[ray]\"") from None
    import logging

    pa = _pyarrow()
    started = False
    if not ray.is_initialized():
        address = None if job.address in (None, "local") else job.address
        ray.init(address=address or "local", logging_level=logging.WARNING,
                 include_dashboard=False if address is None else None)
        started = True
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False  # this command shows its own (and Ray need not say that it shows none)
        logging.getLogger("ray.data").setLevel(logging.WARNING)
        logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
        threads = job.threads or 1
        actors = job.concurrency or max(1, int(ray.cluster_resources().get("CPU", 1) // threads))
        columns = _input_columns(job, rows, column)
        table = pa.table({_ROW: pa.array(todo, type=pa.int64()),
                          **{c: pa.array(rows.column(c, todo)) for c in columns}})
        # blocks of whole batches, enough of them to keep every actor busy
        per_block = batch_size * max(1, min(16, len(todo) // (batch_size * actors * 4)))
        blocks = [table.slice(i, per_block) for i in range(0, table.num_rows, per_block)]
        kwargs = _class_kwargs(job, column)
        kwargs["threads"] = threads
        gpus = {}
        if job.device.startswith("cuda"):  # one GPU per actor; Ray makes it the actor's only (and first) one
            kwargs["device"], gpus = "cuda", {"num_gpus": 1}
        ds = map_batches(ray.data.from_arrow(blocks), Guarded, job.max_retries,
                         fn_constructor_args=[TASKS[job.task].cls],
                         fn_constructor_kwargs={"model": job.model, **kwargs}, batch_size=batch_size,
                         compute=ray.data.ActorPoolStrategy(size=actors), num_cpus=threads, **gpus)
        # Ray may hand the batches back in any order: keep them until INPUT's order reaches them
        position = {r: i for i, r in enumerate(todo)}
        waiting: dict[int, tuple[list[int], dict[str, list]]] = {}
        next_pos = 0
        error: tuple[int, str] | None = None  # the first failed row's position, and the error
        for b in ds.iter_batches(batch_size=None, batch_format="numpy"):
            if _ERROR in b:
                at = min(position[int(r)] for r in b[_ROW])
                if error is None or at < error[0]:
                    error = (at, str(b[_ERROR][0]))
                if next_pos >= error[0]:
                    break
                continue
            got = [int(r) for r in b[_ROW]]
            res = _results(b, outputs)
            for j, r in enumerate(got):
                waiting[position[r]] = ([r], {c: [res[c][j]] for c in outputs})
            run_idx: list[int] = []
            run_res: dict[str, list] = {c: [] for c in outputs}
            while next_pos in waiting:
                idx, one = waiting.pop(next_pos)
                run_idx += idx
                for c in outputs:
                    run_res[c] += one[c]
                next_pos += 1
            if run_idx:
                write(run_idx, run_res)
            if error is not None and next_pos >= error[0]:
                break  # every row before the failed one is written
        if error is not None:
            _raise_worker_error(error[1])
        if next_pos != len(todo):
            raise RuntimeError(f"Ray returned {next_pos} of {len(todo)} rows")
        return actors
    finally:
        if started:
            ray.shutdown()


class Guarded:
    """A candlewick.ray class as `candlewick batch --ray` runs it: a candlewick error in the worker (a model that
    does not load, a prompt longer than the context) comes back as a batch that names it, so that the command
    can raise it as it is; Ray would wrap it in its own errors, its message the remote traceback."""

    def __init__(self, cls_name: str, **kwargs: Any):
        from . import ray as cwray
        from .errors import CandlewickError

        self.error: str | None = None
        try:
            self.inner = getattr(cwray, cls_name)(**kwargs)
        except CandlewickError as e:
            self.error = f"{type(e).__name__}\0{e}"

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from .errors import CandlewickError

        error = self.error
        if error is None:
            try:
                return self.inner(batch)
            except CandlewickError as e:
                error = f"{type(e).__name__}\0{e}"
        return {_ROW: batch[_ROW], _ERROR: _object_array([error] * len(batch[_ROW]))}


def _raise_worker_error(message: str) -> None:
    from . import errors

    name, _, text = message.partition("\0")
    cls = getattr(errors, name, None)
    raise (cls if isinstance(cls, type) and issubclass(cls, errors.CandlewickError) else errors.CandlewickError)(text)


def map_batches(ds: Any, cls: type, retries: int, **kwargs: Any) -> Any:
    """`ds.map_batches(cls, **kwargs)` on an actor pool whose actors are restarted at most `retries` times when
    they die, each lost batch retried as often (Ray Data's default is without end, so that a row which kills its
    worker every time would never fail the job). Ray 2.60 deprecates these two arguments, with nothing named in
    their place yet: past their removal, Ray's defaults apply."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*ray_remote_args.* is deprecated")
        try:
            return ds.map_batches(cls, max_restarts=retries, max_task_retries=retries, **kwargs)
        except TypeError as e:
            if "max_restarts" not in str(e) and "max_task_retries" not in str(e):
                raise
            return ds.map_batches(cls, **kwargs)


# -- the command line -----------------------------------------------------------------------------------------


def add_parser(sub: Any, load: argparse.ArgumentParser, sampling: argparse.ArgumentParser) -> None:
    """Register `candlewick batch` (sub: the top-level subparsers; load and sampling: the shared option groups)."""
    from .cli import MODEL_HELP

    fmt = argparse.RawDescriptionHelpFormatter
    desc = ("Run MODEL over every row of INPUT and write OUTPUT: JSONL (.jsonl) or Parquet (.parquet) either way, "
            "each row with its other columns kept, in INPUT's order. In one process, or on Ray Data with --ray "
            "(a new local cluster, or the one at ADDRESS). Resumable: rows already in OUTPUT are skipped (a row is "
            "keyed by its id column, else by its index).")
    examples = ("examples:\n"
                "  candlewick batch embed sentence-transformers/all-MiniLM-L6-v2 docs.jsonl embedded.parquet\n"
                "  candlewick batch perplexity tests/data/gpt2-tiny texts.jsonl scored.jsonl --token-nll\n"
                "  candlewick batch generate tests/data/llama-tiny prompts.jsonl out.jsonl --max-tokens 32 --seed 1 \\\n"
                "      --ray --concurrency 2 --threads 1")
    p = sub.add_parser("batch", help="embed, score or generate over a JSONL/Parquet file (one process or Ray)",
                       description=desc, epilog=examples, formatter_class=fmt)
    tasks = p.add_subparsers(dest="task", required=True, metavar="TASK")

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    common.add_argument("input", metavar="INPUT", type=Path, help="a .jsonl or .parquet file")
    common.add_argument("output", metavar="OUTPUT", type=Path,
                        help="a .jsonl or .parquet file; rows already there are skipped, new ones appended")
    g = common.add_argument_group("batching")
    g.add_argument("--column", default=None, help="the input column (default: text; prompt for generate)")
    g.add_argument("--batch-size", type=int, default=None, help="rows per batch (default: 64 for embed, else 16)")
    g.add_argument("--threads", type=int, default=None,
                   help="engine threads (per actor with --ray, default 1; else default all cores)")
    g = common.add_argument_group("Ray")
    g.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                   help="run on Ray Data: a new local cluster, or the cluster at ADDRESS (auto, ray://host:10001, "
                        "host:6379); put it after OUTPUT or write --ray=ADDRESS")
    g.add_argument("--concurrency", type=int, default=None,
                   help="actors, each holding the model once (default: the cluster's CPUs / --threads)")
    g.add_argument("--max-retries", type=int, default=3,
                   help="times a dead actor is restarted and its batch retried (default: 3)")

    t = tasks.add_parser("embed", parents=[load, common], help="sentence embeddings (encoder models)",
                         description=desc + ' Adds "embedding" (float32 list).', epilog=examples, formatter_class=fmt)
    t.set_defaults(func=cmd_batch)
    t = tasks.add_parser("perplexity", parents=[load, common], help="perplexity of each text",
                         description=desc + ' Adds "perplexity" (null under two tokens) and "num_tokens".',
                         epilog=examples, formatter_class=fmt)
    t.add_argument("--stride", type=int, default=None, help="window step past the context (default: half of it)")
    t.add_argument("--token-nll", action="store_true", help='also write "token_nll", every token\'s NLL')
    t.set_defaults(func=cmd_batch)
    t = tasks.add_parser("generate", parents=[load, sampling, common], help="a completion of each prompt",
                         description=desc + ' Adds "completion", "finish_reason", "prompt_tokens" and '
                                            '"completion_tokens". Columns named as a generation parameter (seed, '
                                            'max_new_tokens, temperature, stop, ...) set it per row.',
                         epilog=examples, formatter_class=fmt)
    t.set_defaults(func=cmd_batch)


def cmd_batch(args: argparse.Namespace) -> None:
    from .cli import _gen_params, _progress, _resolve_model

    options: dict[str, Any] = {}
    if args.task == "perplexity":
        options = {"stride": args.stride, "token_nll": args.token_nll}
    elif args.task == "generate":
        options = {"params": _gen_params(args, args.max_tokens)}
    if args.ray is not None:
        # resolved on the workers: a hub id as it is, a local path made absolute (they run elsewhere)
        model = os.path.abspath(args.model) if os.path.exists(args.model) else args.model
    else:
        model = _resolve_model(args.model)
    job = Job(task=args.task, model=model, input=args.input, output=args.output, column=args.column,
              options=options, batch_size=args.batch_size, device=args.device, dtype=args.dtype,
              threads=args.threads, ray=args.ray is not None, address=args.ray, concurrency=args.concurrency,
              max_retries=args.max_retries)
    s = run(job, progress=lambda total: _progress(total=total, unit="row", desc=f"batch {args.task}"))
    where = f" on Ray ({s.actors} actors)" if s.actors else ""
    rate = f", {s.written / s.seconds:.1f} rows/s" if s.written and s.seconds > 0 else ""
    print(f"candlewick batch {args.task}: {s.written} rows written to {args.output}{where}, {s.skipped} already "
          f"there, in {s.seconds:.1f} s{rate}", file=sys.stderr)


__all__ = ["Job", "Summary", "run", "TASKS", "add_parser", "cmd_batch", "file_format"]
