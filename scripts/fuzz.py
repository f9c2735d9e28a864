"""Fuzz the loaders with atheris (coverage-guided, libFuzzer's mutations) for a given time.

    python scripts/fuzz.py gguf --seconds 300          # one target
    python scripts/fuzz.py all --seconds 120           # each target in turn, 120 s each
    python scripts/fuzz.py gguf --seconds 60 --jobs 2  # libFuzzer's own parallel workers

Targets (each input is one file, or one file's text, mutated from seeds made of the test fixtures):
  gguf            a whole GGUF file, through cw.load (header, metadata, tensor infos, tokenizer metadata, data)
  gguf_tokenizer  GGUF tokenizer metadata (tokens, types, merges, scores, ids) built from the input's bytes,
                  through the GGUF vocabulary loader
  safetensors     model.safetensors (header and data) beside llama-tiny's config.json, through cw.load
  config          config.json beside llama-tiny's weights, through cw.load
  tokenizer       tokenizer.json, through cw.Tokenizer.from_pretrained, then encode and decode
  chat_template   a chat template, rendered through Tokenizer.apply_chat_template

An input passes when it loads (or renders), or fails with a CandlewickError that is not an internal one (a
panic turned into an error is a finding too). Anything else (another exception, an internal error, a crash of
the interpreter, a hang past --timeout) is a finding: libFuzzer stops and writes the input to
tests/data/fuzz/TARGET/, where tests/test_fuzz_corpus.py loads it on every test run expecting a clean error.
Coverage: atheris instruments candlewick's Python modules, and the Rust extension is built once with LLVM's
coverage counters (`--build-native`: our crate only, its dependencies as they are; into target/fuzz/) and loaded
in place of the installed one; after each input the counters it hit are fed into atheris' own coverage map.
Without that build the search sees Python only, which barely changes from input to input.

    python scripts/fuzz.py --build-native   # ~1 min after a release build; rerun after changing rust/
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "tests" / "data"
FINDINGS = DATA / "fuzz"
sys.path.insert(0, str(ROOT / "tests"))

TARGETS = ["gguf", "gguf_tokenizer", "safetensors", "config", "tokenizer", "chat_template"]


def workdir() -> Path:
    base = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())
    return Path(tempfile.mkdtemp(prefix="candlewick-fuzz-", dir=base))


def seeds(target: str, out: Path) -> None:
    """Seed inputs for `target` in `out` (from the fixtures and earlier findings)."""
    out.mkdir(parents=True, exist_ok=True)
    tmp = workdir()
    if target == "gguf":
        import gguf
        from gguf_util import write_gpt2_gguf, write_llama_gguf

        spm = json.loads((DATA / "spm-llamacpp.json").read_text())
        write_llama_gguf(DATA / "llama-tiny", out / "llama-f32.gguf")
        write_llama_gguf(DATA / "llama-tiny", out / "llama-q8.gguf", qtype=gguf.GGMLQuantizationType.Q8_0)
        write_llama_gguf(DATA / "llama-tiny", out / "llama-spm.gguf", spm=spm)
        write_gpt2_gguf(DATA / "gpt2-tiny", out / "gpt2-q4.gguf", qtype=gguf.GGMLQuantizationType.Q4_0)
    elif target == "gguf_tokenizer":
        (out / "bytes").write_bytes(bytes(range(256)) * 4)
    elif target == "safetensors":
        shutil.copy(DATA / "llama-tiny" / "model.safetensors", out / "llama.safetensors")
    elif target == "config":
        for name in ("llama-tiny", "qwen3-tiny", "gemma3-tiny", "mistral-sw-tiny"):
            shutil.copy(DATA / name / "config.json", out / f"{name}.json")
    elif target == "tokenizer":
        for name in ("llama-tiny", "gpt2-tiny", "phi3-tiny"):
            shutil.copy(DATA / name / "tokenizer.json", out / f"{name}.json")
    elif target == "chat_template":
        for name in ("llama-tiny", "qwen2-tiny", "gemma3-tiny", "smollm3-tiny"):
            if not (DATA / name / "tokenizer_config.json").is_file():
                continue
            cfg = json.loads((DATA / name / "tokenizer_config.json").read_text())
            if isinstance(cfg.get("chat_template"), str):
                (out / f"{name}.jinja").write_text(cfg["chat_template"])
        (out / "hermes.jinja").write_text((DATA / "tool-chat" / "hermes_template.jinja").read_text())
    shutil.rmtree(tmp, ignore_errors=True)
    if (FINDINGS / target).is_dir():
        for f in (FINDINGS / target).iterdir():
            shutil.copy(f, out / f.name)


# -- running one input ---------------------------------------------------------------------------------------

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"},
            {"role": "assistant", "content": "Hi!"}, {"role": "user", "content": "Tell me more."}]


def _gguf_tokenizer_file(data: bytes, path: Path) -> None:
    """A GGUF whose tokenizer metadata is made of `data` (and llama-tiny's weights, so the file loads)."""
    import gguf
    import numpy as np

    rnd = list(data) or [0]

    def take(i: int) -> int:
        return rnd[i % len(rnd)]

    n = 8 + take(0) % 64
    kinds = ["gpt2", "llama", "bert", "t5", "bogus"]
    writer = gguf.GGUFWriter(str(path), "llama")
    cfg = json.loads((DATA / "llama-tiny" / "config.json").read_text())
    writer.add_block_count(1)
    writer.add_context_length(64)
    writer.add_embedding_length(8)
    writer.add_feed_forward_length(8)
    writer.add_head_count(2)
    writer.add_head_count_kv(2)
    writer.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    writer.add_tokenizer_model(kinds[take(1) % len(kinds)])
    pieces = []
    for i in range(n):
        length = 1 + take(2 + i) % 5
        raw = bytes(take(3 + i + j) for j in range(length))
        pieces.append(raw.decode("utf-8", "replace") if take(i) % 3 else f"<0x{take(i):02X}>")
    writer.add_token_list(pieces)
    writer.add_token_types([take(7 + i) % 7 for i in range(n + take(5) % 3 - 1)])
    if take(6) % 2:
        writer.add_token_scores([float(take(i) - 128) for i in range(n)])
    writer.add_token_merges([f"{pieces[take(i) % n]} {pieces[take(i + 1) % n]}" for i in range(take(8) % 16)])
    writer.add_bos_token_id(take(9) % (n + 2))
    writer.add_eos_token_id(take(10) % (n + 2))
    if take(11) % 2:
        writer.add_string("tokenizer.ggml.pre", ["default", "llama-bpe", "qwen2", "gpt-2", "bogus"][take(12) % 5])
    rng = np.random.default_rng(0)
    for name, shape in [("token_embd.weight", (n, 8)), ("output_norm.weight", (8,)), ("blk.0.attn_norm.weight", (8,)),
                        ("blk.0.ffn_norm.weight", (8,)), ("blk.0.attn_q.weight", (8, 8)), ("blk.0.attn_k.weight", (8, 8)),
                        ("blk.0.attn_v.weight", (8, 8)), ("blk.0.attn_output.weight", (8, 8)),
                        ("blk.0.ffn_gate.weight", (8, 8)), ("blk.0.ffn_up.weight", (8, 8)),
                        ("blk.0.ffn_down.weight", (8, 8))]:
        writer.add_tensor(name, rng.standard_normal(shape).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def run_one(target: str, data: bytes, work: Path) -> None:
    """Feed `data` to `target`; returns when the input passes, raises when it is a finding."""
    import candlewick as cw

    try:
        if target == "gguf":
            (work / "x.gguf").write_bytes(data)
            cw.load(work / "x.gguf")
        elif target == "gguf_tokenizer":
            _gguf_tokenizer_file(data, work / "t.gguf")
            m = cw.load(work / "t.gguf")
            if m.tokenizer is not None:
                ids = m.tokenizer.encode("Hello wörld <s> 123")
                m.tokenizer.decode(ids)
        elif target in ("safetensors", "config"):
            folder = work / "ckpt"
            if not folder.is_dir():
                shutil.copytree(DATA / "llama-tiny", folder)
            name = "model.safetensors" if target == "safetensors" else "config.json"
            (folder / name).write_bytes(data)
            m = cw.load(folder)
            m.logits([1, 2, 3])
        elif target == "tokenizer":
            folder = work / "tok"
            folder.mkdir(exist_ok=True)
            (folder / "tokenizer.json").write_bytes(data)
            t = cw.Tokenizer.from_pretrained(folder)
            t.decode(t.encode("Hello wörld, <s> 123 \n\t x"))
        elif target == "chat_template":
            t = cw.Tokenizer.from_pretrained(DATA / "qwen2-tiny")
            t.apply_chat_template(MESSAGES, chat_template=data.decode("utf-8", "replace"))
    except cw.CandlewickError as e:
        if "internal error" in str(e):  # a panic, caught at the boundary: a bug all the same
            raise AssertionError(f"a panic on a bad input: {e}") from None


NATIVE = ROOT / "target" / "fuzz" / "_native.abi3.so"
SANCOV = ["-C", "passes=sancov-module", "-C", "llvm-args=-sanitizer-coverage-level=3",
          "-C", "llvm-args=-sanitizer-coverage-inline-8bit-counters", "-C", "llvm-args=-sanitizer-coverage-pc-table",
          "-C", "llvm-args=-sanitizer-coverage-trace-compares"]


def build_native() -> None:
    """The extension with coverage counters, into target/fuzz/ (the normal build's own file is rebuilt by the
    next `maturin develop`)."""
    import subprocess

    subprocess.run(["cargo", "rustc", "--release", "--features", "fuzz,pyo3/extension-module", "--lib",
                    "--crate-type", "cdylib", "--", *SANCOV], cwd=ROOT / "rust", check=True)
    NATIVE.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(ROOT / "target" / "release" / "libcandlewick.so", NATIVE)
    print(f"wrote {NATIVE}; run `maturin develop --release` to restore the normal build in python/candlewick")


def use_instrumented_native(work: Path) -> bool:
    """Put a copy of the package whose extension is the instrumented one first on sys.path."""
    if not NATIVE.is_file():
        return False
    pkg = work / "pkg" / "candlewick"
    shutil.copytree(ROOT / "python" / "candlewick", pkg, ignore=shutil.ignore_patterns("_native*.so", "__pycache__"))
    shutil.copy(NATIVE, pkg / "_native.abi3.so")
    sys.path.insert(0, str(work / "pkg"))
    return True


def fuzz(target: str, seconds: int, jobs: int, timeout: int) -> None:
    import atheris

    work = workdir()
    native = use_instrumented_native(work)

    corpus = work / "corpus"
    seeds(target, corpus)
    findings = FINDINGS / target
    findings.mkdir(parents=True, exist_ok=True)

    # the Rust code's coverage counters, fed to atheris' map after each input: counter i of the extension is
    # atheris counter slots[i] (reserved as they are first hit)
    slots: dict[int, int] = {}

    def one(data: bytes) -> None:
        try:
            run_one(target, data, work)
        finally:
            if native:
                for i in candlewick._native._fuzz_coverage():
                    if i not in slots:
                        slots[i] = atheris._reserve_counter()
                    atheris._trace_branch(slots[i])

    with atheris.instrument_imports(include=["candlewick"]):
        import candlewick  # noqa: F401
        import candlewick._native  # noqa: F401
        import candlewick.chat_template  # noqa: F401
    print(f"# {target}: the extension {'with' if native else 'WITHOUT'} coverage counters "
          f"({candlewick._native.__file__})", file=sys.stderr)
    atheris.Setup([sys.argv[0], str(corpus), f"-max_total_time={seconds}", f"-timeout={timeout}",
                   f"-artifact_prefix={findings}/", "-print_final_stats=1", "-rss_limit_mb=8192",
                   *([f"-jobs={jobs}", f"-workers={jobs}"] if jobs > 1 else [])], one)
    atheris.Fuzz()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("target", nargs="?", choices=[*TARGETS, "all"])
    ap.add_argument("--build-native", action="store_true", help="build the instrumented extension, then stop")
    ap.add_argument("--seconds", type=int, default=60, help="fuzzing time per target (default: 60)")
    ap.add_argument("--jobs", type=int, default=1, help="libFuzzer workers (default: 1)")
    ap.add_argument("--timeout", type=int, default=20, help="seconds one input may take (default: 20)")
    args = ap.parse_args()
    if args.build_native:
        build_native()
        return
    if args.target is None:
        ap.error("name a target (or --build-native)")
    if args.target == "all":
        import subprocess

        for t in TARGETS:   # each in its own process: libFuzzer runs once per process
            subprocess.run([sys.executable, __file__, t, "--seconds", str(args.seconds), "--jobs", str(args.jobs),
                            "--timeout", str(args.timeout)], check=False)
        return
    fuzz(args.target, args.seconds, args.jobs, args.timeout)


if __name__ == "__main__":
    main()
