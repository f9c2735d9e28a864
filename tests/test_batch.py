"""`candlewick batch` in one process: JSONL and Parquet in and out, other columns kept, the model's own results,
resuming (by id, by index, after an interrupted line or a failed run), and clear errors. The same on Ray is in
tests/test_ray.py."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

import candlewick as cw
from candlewick.batch import Job, run
from candlewick.cli import main
from candlewick.errors import InvalidArgument
from conftest import DATA, minilm_path

GPT2 = str(DATA / "gpt2-tiny")
LLAMA = str(DATA / "llama-tiny")


def texts(n: int) -> list[str]:
    return [f"Row {i}: the quick brown fox jumps over {'the lazy dog ' * (i % 4)}" for i in range(n)]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def rows_with_ids(n: int) -> list[dict]:
    return [{"id": 1000 - i, "text": t, "extra": {"i": i, "tags": ["a", "b"][: i % 3]}, "flag": i % 2 == 0}
            for i, t in enumerate(texts(n))]


def test_jsonl_rows_keep_their_columns_and_get_the_models_results(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", rows_with_ids(23))
    assert main(["batch", "perplexity", GPT2, str(src), str(tmp_path / "out.jsonl"), "--batch-size", "5",
                 "--token-nll"]) == 0
    out = read_jsonl(tmp_path / "out.jsonl")
    model = cw.load(GPT2)
    assert len(out) == 23
    for row, o in zip(rows_with_ids(23), out):
        assert {k: o[k] for k in row} == row
        assert o["perplexity"] == model.perplexity(row["text"])
        assert o["num_tokens"] == len(model.tokenizer.encode(row["text"]))
        assert o["token_nll"] == model.token_nll(row["text"]).tolist()


def test_embed_to_parquet_and_back(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    rows = rows_with_ids(30)
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    assert main(["batch", "embed", str(minilm_path()), str(src), str(tmp_path / "out.parquet"),
                 "--batch-size", "30"]) == 0
    t = pq.read_table(tmp_path / "out.parquet")
    assert t.column_names == ["id", "text", "extra", "flag", "embedding"]
    assert t.schema.field("embedding").type == pa.list_(pa.float32())
    got = np.array(t.column("embedding").to_pylist(), np.float32)
    # within a few ulps: candlewick.ray.Embedder embeds in sub-batches of similar length (docs/ray.md)
    np.testing.assert_allclose(got, cw.load(minilm_path()).embed([r["text"] for r in rows]), rtol=0, atol=1e-6)
    assert t.drop_columns(["embedding"]).to_pylist() == rows
    # Parquet in, JSONL out
    assert main(["batch", "embed", str(minilm_path()), str(tmp_path / "out.parquet"), str(tmp_path / "re.jsonl"),
                 "--column", "text", "--batch-size", "30"]) == 1  # "embedding" is there already
    pq.write_table(t.drop_columns(["embedding"]), tmp_path / "in.parquet")
    assert main(["batch", "embed", str(minilm_path()), str(tmp_path / "in.parquet"), str(tmp_path / "re.jsonl"),
                 "--batch-size", "30"]) == 0
    again = read_jsonl(tmp_path / "re.jsonl")
    assert [r["embedding"] for r in again] == got.tolist()
    assert [{k: v for k, v in r.items() if k != "embedding"} for r in again] == rows


def test_generate_per_row_parameters(tmp_path):
    rows = [{"prompt": f"Once upon a time {i}", "seed": i, "max_new_tokens": 3 + i % 4} for i in range(12)]
    rows[5]["seed"] = None
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    assert main(["batch", "generate", LLAMA, str(src), str(tmp_path / "out.jsonl"), "--seed", "42",
                 "--max-tokens", "9", "-t", "1.0", "--batch-size", "4"]) == 0
    model = cw.load(LLAMA)
    for row, o in zip(rows, read_jsonl(tmp_path / "out.jsonl")):
        c = model.generate(row["prompt"], seed=42 if row["seed"] is None else row["seed"],
                           max_new_tokens=row["max_new_tokens"], temperature=1.0, top_k=40, top_p=0.95, min_p=0.05)
        assert (o["completion"], o["finish_reason"], o["completion_tokens"]) == (
            c.text, c.choices[0].finish_reason, c.usage.completion_tokens)


def job(task, src, out, **kw) -> Job:
    model = {"embed": str(minilm_path()), "perplexity": GPT2, "generate": LLAMA}[task]
    if task == "generate":
        kw.setdefault("options", {"params": {"max_new_tokens": 5, "seed": 1}})
    return Job(task=task, model=model, input=src, output=out, batch_size=kw.pop("batch_size", 5), **kw)


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_resume_by_id_skips_rows_already_written(tmp_path, fmt):
    if fmt == "parquet":
        pytest.importorskip("pyarrow")
    rows = [{"id": f"r{i}", "prompt": t} for i, t in enumerate(texts(40))]
    full = tmp_path / f"full.{fmt}"
    assert run(job("generate", write_jsonl(tmp_path / "all.jsonl", rows), full)).written == 40
    out = tmp_path / f"out.{fmt}"
    # an earlier run had every third row, in another order
    first = run(job("generate", write_jsonl(tmp_path / "some.jsonl", rows[::3][::-1]), out))
    assert (first.written, first.skipped) == (14, 0)
    second = run(job("generate", tmp_path / "all.jsonl", out))
    assert (second.written, second.skipped, second.total) == (26, 14, 40)
    assert run(job("generate", tmp_path / "all.jsonl", out)).written == 0
    by_id = {r["id"]: r for r in load(full)}
    got = load(out)
    assert sorted(r["id"] for r in got) == sorted(by_id) and all(r == by_id[r["id"]] for r in got)


def load(path):
    if path.suffix == ".jsonl":
        return read_jsonl(path)
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pylist()


def test_resume_by_index_and_after_an_interrupted_line(tmp_path):
    rows = [{"text": t} for t in texts(30)]
    full, out = tmp_path / "full.jsonl", tmp_path / "out.jsonl"
    run(job("perplexity", write_jsonl(tmp_path / "all.jsonl", rows), full))
    run(job("perplexity", write_jsonl(tmp_path / "first.jsonl", rows[:12]), out))
    data = out.read_bytes()
    out.write_bytes(data[: len(data) - 9])  # the last row cut short, as a killed run leaves it
    s = run(job("perplexity", tmp_path / "all.jsonl", out))
    assert (s.written, s.skipped) == (19, 11)
    assert out.read_bytes() == full.read_bytes()
    with pytest.raises(InvalidArgument, match="more than INPUT's 12"):
        run(job("perplexity", tmp_path / "first.jsonl", out))


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_a_failed_run_resumes_where_it_stopped(tmp_path, fmt):
    """A row the model refuses (a prompt longer than the context) stops the run; what was done before it is kept
    (Parquet: in OUTPUT.parts/), and the run after the row is fixed does only the rest."""
    if fmt == "parquet":
        pytest.importorskip("pyarrow")
    rows = [{"id": i, "prompt": t} for i, t in enumerate(texts(30))]
    full, out = tmp_path / f"full.{fmt}", tmp_path / f"out.{fmt}"
    run(job("generate", write_jsonl(tmp_path / "good.jsonl", rows), full))
    bad = [dict(r) for r in rows]
    bad[17]["prompt"] = "word " * 400
    with pytest.raises(InvalidArgument, match="context"):
        run(job("generate", write_jsonl(tmp_path / "bad.jsonl", bad), out))
    if fmt == "parquet":
        assert not out.exists() and (tmp_path / "out.parquet.parts").is_dir()
    s = run(job("generate", tmp_path / "good.jsonl", out))
    assert (s.written, s.skipped) == (15, 15)  # batches of 5: rows 0-14 were written before row 17's batch
    assert load(out) == load(full)
    assert not (tmp_path / "out.parquet.parts").exists()


def test_progress_counts_every_row(tmp_path):
    seen = {}

    class Bar:
        def __init__(self, total):
            seen["total"], seen["done"] = total, 0

        def update(self, n):
            seen["done"] += n

        def close(self):
            seen["closed"] = True

    src = write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t in texts(13)])
    run(job("perplexity", src, tmp_path / "out.jsonl"), progress=Bar)
    assert seen == {"total": 13, "done": 13, "closed": True}


def test_empty_input(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text("\n")
    assert run(job("perplexity", src, tmp_path / "out.jsonl")).total == 0
    assert (tmp_path / "out.jsonl").read_text() == ""


@pytest.mark.parametrize("rows, out, message", [
    ([{"id": 1, "text": "a"}, {"id": 1, "text": "b"}], "out.jsonl", "rows 0 and 1 have the same id 1"),
    ([{"id": 1, "text": "a"}, {"text": "b"}], "out.jsonl", "row 1 has no id"),
    ([{"body": "a"}], "out.jsonl", "has no column 'text'"),
    ([{"text": "a", "perplexity": 3}], "out.jsonl", "named as an output column"),
    ([{"text": 5}], "out.jsonl", "expected text, got int"),
    ([{"text": "a"}], "out.csv", "neither JSONL"),
    ([{"text": "a"}], "in.jsonl", "another file than INPUT"),
])
def test_errors_name_the_problem(tmp_path, rows, out, message):
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    with pytest.raises(InvalidArgument, match=message):
        run(job("perplexity", src, tmp_path / out))


def test_bad_jsonl_names_the_line(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text('{"text": "a"}\n[1, 2]\n')
    with pytest.raises(InvalidArgument, match="line 2: a row must be a JSON object"):
        run(job("perplexity", src, tmp_path / "out.jsonl"))
    src.write_text('{"text": "a"}\n{"text": \n')
    with pytest.raises(InvalidArgument, match="line 2: not JSON"):
        run(job("perplexity", src, tmp_path / "out.jsonl"))


def test_command_line_reports_what_it_did(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t in texts(8)])
    cmd = [sys.executable, "-m", "candlewick.cli", "batch", "perplexity", GPT2, str(src), str(tmp_path / "o.jsonl")]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and "8 rows written" in p.stderr and "0 already there" in p.stderr, p.stderr
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert "0 rows written" in p.stderr and "8 already there" in p.stderr
    p = subprocess.run(cmd[:5] + ["--help"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and "--token-nll" in p.stdout and "--ray" in p.stdout
    p = subprocess.run(cmd[:-1] + [str(tmp_path / "x.csv")], capture_output=True, text=True, timeout=120)
    assert p.returncode == 1 and p.stderr.startswith("candlewick batch: error:")
