"""candlewick.ray on a local Ray cluster (two CPUs, started here): the map_batches classes give what the model gives
in one process, a worker killed mid-job costs no row and duplicates none, `candlewick batch --ray` writes what the
run in one process writes, and the Serve deployment answers the OpenAI client."""
from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

ray = pytest.importorskip("ray")
pytest.importorskip("ray.data")
pa = pytest.importorskip("pyarrow")
import pyarrow.parquet as pq  # noqa: E402

import candlewick as cw  # noqa: E402
from candlewick.cli import main  # noqa: E402
from candlewick.ray import Embedder, Generator, Scorer  # noqa: E402
from conftest import DATA, minilm_path  # noqa: E402

WORDS = ("the a cat dog sat on mat quickly ran over lazy fox jumps brown blue sky river mountain "
         "über naïve 東京 🙂").split()


def sentences(n: int, seed: int = 0, longest: int = 30) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, rng.integers(1, longest))) for _ in range(n)]


@pytest.fixture(scope="module")
def cluster():
    """A local cluster of two CPUs for this module's tests, shut down after them."""
    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING,
             runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1"}})
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def pool(size: int = 2):
    return ray.data.ActorPoolStrategy(size=size)


@pytest.fixture(scope="module")
def minilm():
    return cw.load(minilm_path())


def test_embedder_equals_model_embed(cluster, minilm):
    texts = sentences(300, longest=16)
    ds = ray.data.from_items([{"id": i, "text": t} for i, t in enumerate(texts)], override_num_blocks=6)
    rows = ds.map_batches(Embedder, fn_constructor_kwargs={"model": str(minilm_path())}, compute=pool(2),
                          batch_size=32).take_all()
    rows.sort(key=lambda r: r["id"])
    assert [r["text"] for r in rows] == texts
    got = np.stack([r["embedding"] for r in rows])
    want = minilm.embed(texts)
    assert got.dtype == np.float32 and got.shape == want.shape == (300, 384)
    # The matmul kernels sum in an order that depends on the number of rows for very small inputs (a batch of
    # fewer than ~5 short texts), so a small last batch may differ from the one 300-row batch by a few float32
    # ulps; batches of 32 come out bit for bit the same.
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


def test_scorer_equals_model_perplexity(cluster):
    model = cw.load(DATA / "gpt2-tiny")
    texts = sentences(40, seed=1) + [" ".join(sentences(60, seed=2)), "a"]  # one past the 128-token context
    ds = ray.data.from_items([{"id": i, "text": t} for i, t in enumerate(texts)])
    rows = sorted(ds.map_batches(Scorer, fn_constructor_kwargs={"model": str(DATA / "gpt2-tiny"), "token_nll": True},
                                 compute=pool(2), batch_size=8).take_all(), key=lambda r: r["id"])
    assert len(rows) == len(texts)
    for r, t in zip(rows, texts):
        ids = model.tokenizer.encode(t)
        assert r["num_tokens"] == len(ids)
        if len(ids) < 2:
            assert np.isnan(r["perplexity"]) and len(r["token_nll"]) == 0
            continue
        assert r["perplexity"] == model.perplexity(t)
        nll = np.asarray(r["token_nll"])
        assert nll.dtype == np.float32 and len(nll) == len(ids) - 1
        if len(ids) <= 128:
            np.testing.assert_array_equal(nll, model.token_nll(t))
    assert max(r["num_tokens"] for r in rows) > 128
    long = rows[-2]
    assert long["perplexity"] == pytest.approx(float(np.exp(np.mean(long["token_nll"], dtype=np.float64))), rel=1e-5)


def test_generator_seeded_equals_local(cluster):
    model = cw.load(DATA / "llama-tiny")
    prompts = [f"Once upon a time {i}" for i in range(24)]
    rows = [{"id": i, "prompt": p, "seed": 100 + i, "max_new_tokens": 4 + i % 5} for i, p in enumerate(prompts)]
    rows[3]["seed"] = None                      # this row takes the constructor's seed
    params = {"temperature": 0.9, "top_p": 0.9, "max_new_tokens": 6, "seed": 7, "stop": ["\n\n"]}
    ds = ray.data.from_items(rows)
    got = sorted(ds.map_batches(Generator, fn_constructor_kwargs={"model": str(DATA / "llama-tiny"), "params": params},
                                compute=pool(2), batch_size=5).take_all(), key=lambda r: r["id"])
    assert [r["id"] for r in got] == list(range(24))
    for r, row in zip(got, rows):
        c = model.generate(row["prompt"], **{**params, "seed": row["seed"] if row["seed"] is not None else 7,
                                            "max_new_tokens": row["max_new_tokens"]})
        assert (r["completion"], r["finish_reason"]) == (c.text, c.choices[0].finish_reason), row
        assert (r["prompt_tokens"], r["completion_tokens"]) == (c.usage.prompt_tokens, c.usage.completion_tokens)


@pytest.mark.filterwarnings("ignore:.*ray_remote_args.* is deprecated")  # max_restarts, max_task_retries (Ray 2.60)
def test_killed_actor_costs_no_row_and_duplicates_none(cluster, minilm, tmp_path):
    marker = tmp_path / "killed"

    class DiesOnce(Embedder):  # defined here, so Ray ships it by value
        def __init__(self, model: str, marker: str):
            super().__init__(model)
            self.marker = marker

        def __call__(self, batch):
            if not os.path.exists(self.marker):  # the first batch anywhere: its actor dies mid-job
                open(self.marker, "w").close()
                os._exit(1)
            return super().__call__(batch)

    texts = sentences(120, seed=3, longest=12)
    ds = ray.data.from_items([{"id": i, "text": t} for i, t in enumerate(texts)], override_num_blocks=6)
    ds = ds.map_batches(DiesOnce, fn_constructor_kwargs={"model": str(minilm_path()), "marker": str(marker)},
                        compute=pool(2), batch_size=20, max_restarts=2, max_task_retries=2)
    rows = ds.take_all()
    assert marker.exists()
    assert sorted(r["id"] for r in rows) == list(range(120))  # every row, exactly once
    rows.sort(key=lambda r: r["id"])
    np.testing.assert_allclose(np.stack([r["embedding"] for r in rows]), minilm.embed(texts), rtol=0, atol=1e-6)


# -- candlewick batch --ray -------------------------------------------------------------------------------------


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def test_batch_cli_on_ray_equals_one_process(cluster, tmp_path):
    """Each task in this process on the module's cluster (--ray finds Ray started), JSONL to JSONL: byte for byte
    the files of a run without Ray."""
    texts = sentences(30, seed=4, longest=16)
    src = write_jsonl(tmp_path / "in.jsonl", [{"id": f"doc-{i}", "text": t, "prompt": t[:20], "seed": i,
                                               "meta": {"n": i, "tags": ["x"] * (i % 3)}} for i, t in enumerate(texts)])
    runs = [("embed", str(minilm_path()), []),
            ("perplexity", str(DATA / "gpt2-tiny"), ["--token-nll"]),
            ("generate", str(DATA / "llama-tiny"), ["--max-tokens", "6", "-t", "0.8"])]
    for task, model, extra in runs:
        local, on_ray = tmp_path / f"{task}-local.jsonl", tmp_path / f"{task}-ray.jsonl"
        # the same batches: an embedding's last bits can depend on the batch it was in (see above)
        assert main(["batch", task, model, str(src), str(local), *extra, "--batch-size", "7"]) == 0
        assert main(["batch", task, model, str(src), str(on_ray), *extra, "--batch-size", "7",
                     "--concurrency", "2", "--ray"]) == 0
        assert on_ray.read_bytes() == local.read_bytes(), task
        assert len(local.read_text().splitlines()) == 30


def test_batch_cli_on_ray_stops_at_a_bad_row_with_its_error(cluster, tmp_path):
    """A row the model refuses fails a Ray run with the engine's own error (not Ray's wrapping of it); the rows
    before it are written, and the run after the row is fixed does the rest."""
    from candlewick.batch import Job, run
    from candlewick.errors import InvalidArgument

    rows = [{"prompt": f"Once upon a time {i}"} for i in range(20)]
    good = write_jsonl(tmp_path / "good.jsonl", rows)
    rows[13] = {"prompt": "word " * 400}
    bad = write_jsonl(tmp_path / "bad.jsonl", rows)
    out, want = tmp_path / "out.jsonl", tmp_path / "want.jsonl"
    job = dict(task="generate", model=str(DATA / "llama-tiny"), batch_size=3, concurrency=2,
               options={"params": {"max_new_tokens": 4, "seed": 1}})
    with pytest.raises(InvalidArgument, match="context of 256"):
        run(Job(input=bad, output=out, ray=True, **job))
    assert len(out.read_text().splitlines()) == 12  # the batches before row 13's
    s = run(Job(input=good, output=out, ray=True, **job))
    assert (s.written, s.skipped) == (8, 12)
    run(Job(input=good, output=want, **job))
    assert out.read_bytes() == want.read_bytes()


def test_batch_cli_subprocess_connects_to_a_cluster(cluster, tmp_path):
    """`--ray ADDRESS` from another process (a driver joining the cluster), JSONL to Parquet."""
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": t, "n": i} for i, t in enumerate(sentences(50, seed=5))])
    local, on_ray = tmp_path / "local.parquet", tmp_path / "ray.parquet"
    assert main(["batch", "embed", str(minilm_path()), str(src), str(local), "--batch-size", "16"]) == 0
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("RAY_ADDRESS", None)
    p = subprocess.run([sys.executable, "-m", "candlewick.cli", "batch", "embed", str(minilm_path()), str(src),
                        str(on_ray), f"--ray={cluster}", "--batch-size", "16"],
                       capture_output=True, text=True, timeout=120, env=env)
    assert p.returncode == 0, p.stderr
    assert "50 rows written" in p.stderr and "on Ray (2 actors)" in p.stderr
    a, b = pq.read_table(local), pq.read_table(on_ray)
    assert a.schema == b.schema and a.equals(b)
    assert b.schema.field("embedding").type == pa.list_(pa.float32())


# -- Ray Serve ------------------------------------------------------------------------------------------------


def test_serve_deployment_answers_the_openai_client(cluster):
    openai = pytest.importorskip("openai")
    from ray import serve

    from candlewick.ray import openai_app

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(openai_app(DATA / "llama-tiny", max_active=8, api_key="sk-test"), name="candlewick",
                  route_prefix="/")
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="sk-test", timeout=60, max_retries=0)
        assert [m.id for m in client.models.list()] == ["llama-tiny"]
        model = cw.load(DATA / "llama-tiny")
        r = client.completions.create(model="llama-tiny", prompt="Once upon a time", max_tokens=8, temperature=0)
        assert r.choices[0].text == model.generate("Once upon a time", max_new_tokens=8, temperature=0).text
        messages = [{"role": "user", "content": "Hi"}]
        stream = client.chat.completions.create(model="llama-tiny", messages=messages, max_tokens=8, seed=3,
                                                stream=True)
        text = "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices)
        assert text == model.chat(messages, max_new_tokens=8, seed=3).text
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="wrong", max_retries=0).models.list()
    finally:
        serve.shutdown()


def test_ray_page_examples_run(cluster, monkeypatch, capsys):
    """docs/ray.md's python blocks, on this module's cluster (the page's ```py blocks need Serve's default port)."""
    from test_docs import run_page

    run_page("ray.md", monkeypatch, 2)
    out = capsys.readouterr().out.splitlines()
    assert out[0].endswith("(384,)") and out[1].split()[0].isdigit() and out[1].endswith(("length", "stop"))
    assert float(out[3]) > 1
