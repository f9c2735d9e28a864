"""llama-bench-style speed of candlewick against Hugging Face transformers (PyTorch, CPU), measured in one run.

    python benches/bench_engine.py                       # both shapes, float32 and bfloat16, 2 threads
    python benches/bench_engine.py --models gpt2-124m --dtypes float32 --reps 5

Tests (as llama-bench names them):
  pp128, pp512  prefill: one forward pass over a 128- or 512-token prompt (logits of the last position only,
                as generation computes them), in prompt tokens per second;
  tg64          decode: 64 tokens generated one at a time with the KV cache after a 128-token prompt (the
                prompt is not timed), greedy, in generated tokens per second.

Each figure is the best (default) or the median (--stat median) of --reps timed runs after one untimed warm-up
run; the engines alternate run by run, in ABBA order, so background load and running first affect both alike. Best-of is the default because
on a shared machine other processes only ever slow a run down: the fastest run is the least disturbed one. Both engines run on the same random weights (normal, std 0.02;
norms 1, biases 0), written as safetensors into a temporary checkpoint from the configs in benches/configs/ (the
shapes of GPT-2 124M and SmolLM-135M); speed does not depend on the values, and the benches feed token ids, so no
tokenizer is needed. Timings belong here and in the README, never in tests.
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

CONFIGS = Path(__file__).resolve().parent / "configs"
MODELS = {"gpt2-124m": "GPT-2 124M", "smollm-135m": "SmolLM-135M"}


def param_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    """Hugging Face parameter names and shapes for the config (tied heads have no lm_head.weight)."""
    out: dict[str, tuple[int, ...]] = {}
    if cfg["model_type"] == "gpt2":
        c, v, p, n = cfg["n_embd"], cfg["vocab_size"], cfg["n_positions"], cfg["n_layer"]
        f = cfg.get("n_inner") or 4 * c
        out["transformer.wte.weight"] = (v, c)
        out["transformer.wpe.weight"] = (p, c)
        for i in range(n):
            h = f"transformer.h.{i}"
            for ln in ("ln_1", "ln_2"):
                out[f"{h}.{ln}.weight"] = (c,)
                out[f"{h}.{ln}.bias"] = (c,)
            # Conv1D: [in, out]
            for name, (a, b) in {"attn.c_attn": (c, 3 * c), "attn.c_proj": (c, c), "mlp.c_fc": (c, f),
                                 "mlp.c_proj": (f, c)}.items():
                out[f"{h}.{name}.weight"] = (a, b)
                out[f"{h}.{name}.bias"] = (b,)
        out["transformer.ln_f.weight"] = (c,)
        out["transformer.ln_f.bias"] = (c,)
        if not cfg.get("tie_word_embeddings", True):
            out["lm_head.weight"] = (v, c)
    elif cfg["model_type"] in ("llama", "mistral", "qwen2"):
        c, v, f = cfg["hidden_size"], cfg["vocab_size"], cfg["intermediate_size"]
        h, hkv = cfg["num_attention_heads"], cfg.get("num_key_value_heads", cfg["num_attention_heads"])
        d = cfg.get("head_dim") or c // h
        out["model.embed_tokens.weight"] = (v, c)
        for i in range(cfg["num_hidden_layers"]):
            p = f"model.layers.{i}"
            out[f"{p}.input_layernorm.weight"] = (c,)
            out[f"{p}.post_attention_layernorm.weight"] = (c,)
            out[f"{p}.self_attn.q_proj.weight"] = (h * d, c)
            out[f"{p}.self_attn.k_proj.weight"] = (hkv * d, c)
            out[f"{p}.self_attn.v_proj.weight"] = (hkv * d, c)
            out[f"{p}.self_attn.o_proj.weight"] = (c, h * d)
            if cfg["model_type"] == "qwen2":
                for x, o in (("q", h * d), ("k", hkv * d), ("v", hkv * d)):
                    out[f"{p}.self_attn.{x}_proj.bias"] = (o,)
            out[f"{p}.mlp.gate_proj.weight"] = (f, c)
            out[f"{p}.mlp.up_proj.weight"] = (f, c)
            out[f"{p}.mlp.down_proj.weight"] = (c, f)
        out["model.norm.weight"] = (c,)
        if not cfg.get("tie_word_embeddings", False):
            out["lm_head.weight"] = (v, c)
    else:
        raise SystemExit(f"no parameter list for model_type {cfg['model_type']!r}")
    return out


def write_checkpoint(cfg: dict, folder: Path, seed: int = 0) -> None:
    import numpy as np
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    tensors = {}
    for name, shape in param_shapes(cfg).items():
        if name.endswith("bias"):
            tensors[name] = np.zeros(shape, np.float32)
        elif len(shape) == 1:  # norm weights
            tensors[name] = np.ones(shape, np.float32)
        else:
            tensors[name] = (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float32)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(cfg))


class Candlewick:
    name = "candlewick"

    def __init__(self, folder: Path, dtype: str):
        from candlewick import _native

        self.native = _native
        self.model = _native.Model.load(str(folder), "cpu", dtype)

    def prefill(self, n: int) -> float:
        return self.native.bench_prefill(self.model, n)

    def decode(self, prompt: int, n: int) -> float:
        return self.native.bench_decode(self.model, prompt, n)


class Baseline(Candlewick):
    """Another build of candlewick's extension (`--baseline path/to/_native.abi3.so`), in the same process: the
    before and after of an engine change, measured in one run."""

    name = "baseline"
    path: Path

    def __init__(self, folder: Path, dtype: str):
        import importlib.util

        # the module name must end in _native (its init function is PyInit__native)
        spec = importlib.util.spec_from_file_location("candlewick_baseline._native", self.path)
        if spec is None or spec.loader is None:
            raise SystemExit(f"--baseline {self.path}: not a Python extension module")
        native = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(native)
        self.native = native
        self.model = native.Model.load(str(folder), "cpu", dtype)


class Transformers:
    name = "transformers"

    def __init__(self, folder: Path, dtype: str):
        import torch
        import transformers
        from transformers import AutoModelForCausalLM

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
        self.torch = torch
        td = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
        model, info = AutoModelForCausalLM.from_pretrained(str(folder), dtype=td, output_loading_info=True)
        missing = [k for k in info.get("missing_keys", []) if "lm_head" not in k]
        if missing or info.get("unexpected_keys"):
            raise SystemExit(f"checkpoint does not match transformers: missing {missing[:5]}, "
                             f"unexpected {list(info['unexpected_keys'])[:5]}")
        self.model = model.eval()
        self.vocab = model.config.vocab_size
        # the KV-cache argument and output field: `cache` in recent transformers, `past_key_values` before
        self.cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    def _ids(self, n: int, seed: int):
        g = self.torch.Generator().manual_seed(seed)
        return self.torch.randint(0, self.vocab, (1, n), generator=g)

    def prefill(self, n: int) -> float:
        ids = self._ids(n, 1)
        with self.torch.inference_mode():
            t0 = time.perf_counter()
            out = self.model(ids, use_cache=True, logits_to_keep=1)
            out.logits[:, -1].argmax(-1).item()
            return time.perf_counter() - t0

    def decode(self, prompt: int, n: int) -> float:
        ids = self._ids(prompt, 2)
        with self.torch.inference_mode():
            out = self.model(ids, use_cache=True, logits_to_keep=1)
            past, nxt = getattr(out, self.cache_arg), out.logits[:, -1].argmax(-1, keepdim=True)
            t0 = time.perf_counter()
            for _ in range(n):
                out = self.model(nxt, use_cache=True, **{self.cache_arg: past})
                past, nxt = getattr(out, self.cache_arg), out.logits[:, -1].argmax(-1, keepdim=True)
            nxt.item()
            return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16", "float16", "q8_0", "q4_1", "q4_0", "q4_k", "q6_k"],
                    help="weight dtypes; the quantized ones (quantized at load) have no transformers figure")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5, help="timed runs per figure, after one warm-up")
    ap.add_argument("--stat", choices=["best", "median"], default="best", help="which of the timed runs to report")
    ap.add_argument("--pp", type=int, nargs="+", default=[128, 512], help="prefill lengths")
    ap.add_argument("--tg", type=int, default=64, help="decoded tokens")
    ap.add_argument("--tg-prompt", type=int, default=128, help="prompt length before decoding")
    ap.add_argument("--no-peer", action="store_true", help="candlewick only (no torch needed)")
    ap.add_argument("--baseline", type=Path, metavar="SO",
                    help="another build of candlewick/_native.abi3.so to time beside this one (a before/after)")
    args = ap.parse_args()

    # Both engines on the same number of threads; rayon (and Candle) read RAYON_NUM_THREADS at first use.
    os.environ["RAYON_NUM_THREADS"] = str(args.threads)
    engine_classes: list[type] = [Candlewick]
    if args.baseline:
        Baseline.path = args.baseline
        engine_classes.append(Baseline)
    if not args.no_peer:
        import warnings

        import torch

        warnings.filterwarnings("ignore")

        torch.set_num_threads(args.threads)
        engine_classes.append(Transformers)

    import platform

    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {args.threads} threads, "
          f"{args.stat} of {args.reps} after a warm-up", file=sys.stderr)
    rows = []
    for key in args.models:
        cfg = json.loads((CONFIGS / f"{key}.json").read_text())
        with tempfile.TemporaryDirectory(prefix=f"candlewick-bench-{key}-") as tmp:
            write_checkpoint(cfg, Path(tmp))
            for dtype in args.dtypes:
                engines = []
                for E in engine_classes:
                    if E is Transformers and dtype.startswith("q"):
                        continue
                    try:
                        engines.append(E(Path(tmp), dtype))
                    except Exception as e:  # e.g. a baseline build that does not load this dtype
                        if E is Candlewick:
                            raise
                        print(f"  {MODELS[key]} {dtype}: {E.name} skipped ({e})", file=sys.stderr)
                tests = [(f"pp{n}", (lambda e, n=n: e.prefill(n)), n) for n in args.pp]
                tests.append((f"tg{args.tg}", lambda e: e.decode(args.tg_prompt, args.tg), args.tg))
                for test, run, n_tok in tests:
                    # one warm-up each, then the engines alternate run by run so that any background load
                    # falls on both alike
                    times: dict[str, list[float]] = {e.name: [] for e in engines}
                    for e in engines:
                        run(e)
                    for rep in range(args.reps):
                        # ABBA order: the engine that runs first in a round is measurably slower (seen on both
                        # builds of one engine), so the order turns round by round
                        for e in (engines if rep % 2 == 0 else engines[::-1]):
                            times[e.name].append(run(e))
                    pick = min if args.stat == "best" else statistics.median
                    tps = {name: n_tok / pick(t) for name, t in times.items()}
                    cw, pt, base = tps["candlewick"], tps.get("transformers"), tps.get("baseline")
                    rows.append((MODELS[key], dtype, test, cw, pt, base))
                    print(f"  {MODELS[key]} {dtype} {test}: candlewick {cw:.1f} tok/s"
                          + (f", transformers {pt:.1f} tok/s, ratio {cw / pt:.2f}x" if pt else "")
                          + (f", baseline {base:.1f} tok/s, ratio {cw / base:.2f}x" if base else ""), file=sys.stderr)
                del engines

    print()
    base_cols = " baseline tok/s | candlewick / baseline |" if args.baseline else ""
    print("| model | dtype | test | candlewick tok/s | transformers tok/s | ratio |" + base_cols)
    print("|---|---|---|---:|---:|---:|" + ("---:|---:|" if args.baseline else ""))
    for model, dtype, test, cw, pt, base in rows:
        peer = f"{pt:.1f}" if pt else "-"
        ratio = f"{cw / pt:.2f}x" if pt else "-"
        extra = f" {base:.1f} | {cw / base:.2f}x |" if base else ""
        print(f"| {model} | {dtype} | {test} | {cw:.1f} | {peer} | {ratio} |" + extra)


if __name__ == "__main__":
    main()
