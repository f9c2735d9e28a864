"""Generation speed of candlewick's `generate` against transformers' `generate`, in one run (GPT-2 124M shape).

    python benches/bench_generate.py [--reps 3] [--new 64]

Two cases, greedy, EOS ignored, 2 threads: one 128-token prompt, and a batch of 8 prompts of ragged lengths
(96..128 tokens) run as one call. The figure is generated tokens per second of the whole call (prefill included),
the median of --reps runs after a warm-up; the engines alternate run by run. Random weights (speed does not depend
on values), written by bench_engine.write_checkpoint from benches/configs/gpt2-124m.json."""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_engine import CONFIGS, write_checkpoint  # noqa: E402

THREADS = 2


def prompts(batch: int, vocab: int) -> list[list[int]]:
    rng = np.random.default_rng(3)
    lens = [128] if batch == 1 else list(np.linspace(96, 128, batch).astype(int))
    return [rng.integers(0, vocab, n).tolist() for n in lens]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--new", type=int, default=64)
    args = ap.parse_args()
    import torch
    from transformers import AutoModelForCausalLM

    import candlewick as cw

    torch.set_num_threads(THREADS)
    cfg = json.loads((CONFIGS / "gpt2-124m.json").read_text())
    with tempfile.TemporaryDirectory() as tmp:
        write_checkpoint(cfg, Path(tmp))
        ours = cw.load(tmp)
        peer = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()

        def run_ours(ps):
            t = time.perf_counter()
            out = ours.generate(ps if len(ps) > 1 else ps[0], max_new_tokens=args.new, temperature=0, ignore_eos=True)
            dt = time.perf_counter() - t
            outs = out if isinstance(out, list) else [out]
            assert all(len(o.choices[0].token_ids) == args.new for o in outs)
            return dt

        def run_peer(ps):
            width = max(map(len, ps))
            ids = torch.tensor([[0] * (width - len(p)) + p for p in ps])  # left padding, as generate expects
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in ps])
            with torch.inference_mode():
                t = time.perf_counter()
                out = peer.generate(ids, attention_mask=mask, max_new_tokens=args.new, min_new_tokens=args.new,
                                    do_sample=False, pad_token_id=0)
                dt = time.perf_counter() - t
            assert out.shape[1] == width + args.new
            return dt

        print("| case | candlewick tok/s | transformers tok/s | ratio |\n|---|---|---|---|")
        for batch in (1, 8):
            ps = prompts(batch, cfg["vocab_size"])
            run_ours(ps), run_peer(ps)
            a, b = [], []
            for _ in range(args.reps):
                a.append(run_ours(ps))
                b.append(run_peer(ps))
            ta, tb = batch * args.new / statistics.median(a), batch * args.new / statistics.median(b)
            print(f"| GPT-2 124M, {'1 prompt' if batch == 1 else f'batch of {batch}'}, {args.new} new tokens "
                  f"| {ta:.1f} | {tb:.1f} | {ta / tb:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
