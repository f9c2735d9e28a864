"""Write the GGUF vocabulary fixtures and llama.cpp's token ids for them (tests/test_gguf_vocab.py).

Three sources, each written as llama.cpp's convert_hf_to_gguf.py writes vocabularies (tokenizer.ggml.* metadata,
no tensors):
- llama.cpp's own vocabulary files (models/ggml-vocab-*.gguf in its source tree, which llama-cpp-python's sdist
  ships under vendor/llama.cpp): real deepseek, falcon, qwen2, ... vocabularies. Too large to commit whole (up to
  15 MB), so each is cut to its first CUT ids (plus its control tokens, the 256 byte tokens of byte-level BPE, the
  one-character pieces of WordPiece, and the merges among what is kept) into tests/data/vocab/NAME.gguf. Before
  cutting, candlewick is checked on the whole file against llama.cpp's own expected ids (the .inp/.out files
  beside it): the counts land in the golden file's "full_files".
- the project's fixtures, converted at test time (the GGUFs are not committed): llama-tiny's byte-level BPE
  written with every tokenizer.ggml.pre value llama.cpp implements (one per pre-tokenizer type), gpt2-tiny's
  vocabulary, and all-MiniLM-L6-v2's WordPiece (BertModel.set_vocab: "##x" -> "x", "x" -> "▁x").
- a Unigram vocabulary trained here with sentencepiece (T5's kind, with nmt_nfkc's precompiled charsmap), written
  as T5Model.set_vocab does, into tests/data/vocab/t5-unigram.gguf.

llama.cpp's ids (llama-cpp-python: Llama(path, vocab_only=True).tokenize(text, add_bos=False, special=True)) for
the tokenizer-vectors texts, the .inp texts and a few hard ones go to tests/data/vocab-llamacpp.json. Needs
llama-cpp-python (which compiles llama.cpp), gguf, sentencepiece and candlewick itself, so it is a script, run
once, and its output is committed.

usage: python scripts/make_vocab_golden.py LLAMA_CPP_DIR   (e.g. .../llama_cpp_python-0.3.36/vendor/llama.cpp)
"""
from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import gguf
import llama_cpp
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from gguf_util import bert_vocab_gguf, bpe_vocab_gguf, copy_vocab_gguf, read_vocab  # noqa: E402

CUT = 2000
REAL = ["gpt-2", "llama-bpe", "falcon", "mpt", "starcoder", "refact", "command-r", "deepseek-llm", "deepseek-coder",
        "qwen2", "qwen35", "gpt-neox", "aquila", "bert-bge", "llama-spm", "phi-3", "nomic-bert-moe"]
HARD = [
    "1 12 123 1234 12345 123456 1234567 3.14159 1,000,000 2024-01-31",
    "我想在apple工作1314151天～ 日本語のテキスト 한국어 텍스트",
    "🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ 🦙🦙 👩‍🚀",
    "I've been 'told he's there, 'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL",
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \nend   ",
    "def f(x):\n    return x**2  # square\n\tif x >= 10: print(f\"{x!r}\")\n",
    "нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? ------=======",
    "Ünïcödé àccents naïve café résumé ÀÉÎÕÜ",
    "<s>special</s> <|endoftext|> [CLS] [SEP] <pad> <unk>",
    "",
    " ",
    "  leading and trailing  ",
]


def texts() -> list[str]:
    rows = json.loads((ROOT / "tests/data/tokenizer-vectors.json").read_text())["rows"]
    return [r["text"] for r in rows] + HARD


def llama_ids(path: Path, items: list[str]) -> list[list[int]]:
    llm = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
    out = [llm.tokenize(t.encode("utf-8"), add_bos=False, special=True) if t else [] for t in items]
    del llm
    return out


def inp_out(models: Path, name: str) -> tuple[list[str], list[list[int]]] | None:
    inp, out = models / f"ggml-vocab-{name}.gguf.inp", models / f"ggml-vocab-{name}.gguf.out"
    if not inp.exists():
        return None
    sep = "\n__ggml_vocab_test__\n"
    ins = inp.read_text(encoding="utf-8").split(sep)
    if ins and ins[-1].endswith("\n__ggml_vocab_test__"):
        ins[-1] = ins[-1][: -len("\n__ggml_vocab_test__")]
    ins = [t for t in ins]
    outs = [[int(x) for x in line.split()] for line in out.read_text().splitlines()]
    return ins[: len(outs)], outs


def pre_names(llama_dir: Path) -> list[tuple[str, str]]:
    """The first tokenizer.ggml.pre name of each pre-tokenizer type in llama.cpp's llama_vocab::impl::load."""
    import re

    src = (llama_dir / "src/llama-vocab.cpp").read_text()
    start = src.index("if (tokenizer_pre.empty())")
    end = src.index("unknown pre-tokenizer type", start)
    seen, out = set(), []
    for m in re.finditer(r"if \((.*?)\) \{(.*?)\}", src[start:end], re.S):
        names = re.findall(r'tokenizer_pre == "([^"]+)"', m.group(1))
        t = re.search(r"pre_type = LLAMA_VOCAB_PRE_TYPE_(\w+)", m.group(2))
        if names and t and t.group(1) not in seen:
            seen.add(t.group(1))
            out.append((names[0], t.group(1)))
    return out


def cut_vocab(src: Path, dst: Path) -> None:
    """The first CUT ids of a vocabulary file (and what they need), written as a new vocab-only file."""
    v = read_vocab(src)
    n = len(v["tokens"])
    kind = v["model"]
    keep = set(range(min(CUT, n)))
    keep |= {i for i, t in enumerate(v["types"]) if t in (2, 3, 4)}
    keep |= {i for k, i in v["ids"].items() if i is not None and i < n}
    if kind == "gpt2":
        from gguf_util import byte_chars
        have = {t: i for i, t in enumerate(v["tokens"])}
        keep |= {have[c] for c in byte_chars() if c in have}
    if kind in ("bert", "llama", "t5"):
        # every one-character piece (WordPiece and SentencePiece vocabularies have them all; a cut without them
        # would tokenise as no real file does)
        keep |= {i for i, t in enumerate(v["tokens"]) if len(t) == 1 or len(t.removeprefix("\u2581")) == 1}
    order = sorted(keep)
    remap = {old: new for new, old in enumerate(order)}
    tokens = [v["tokens"][i] for i in order]
    kept = set(tokens)
    sub = {
        "tokens": tokens,
        "types": [v["types"][i] for i in order],
        "scores": [v["scores"][i] for i in order] if v["scores"] is not None else None,
        "merges": [m for m in v["merges"] if (lambda a, b: a in kept and b in kept and a + b in kept)(*m.split(" ", 1))]
        if v["merges"] is not None else None,
        "ids": {k: remap.get(i) for k, i in v["ids"].items() if i is not None},
    }
    copy_vocab_gguf(src, dst, sub)


def main() -> None:
    import candlewick as cw

    llama_dir = Path(sys.argv[1])
    models = llama_dir / "models"
    items = texts()
    golden: dict = {
        "generated_by": f"llama-cpp-python {llama_cpp.__version__} (Llama(path, vocab_only=True).tokenize(text, "
                        "add_bos=False, special=True))",
        "texts": [],
        "full_files": {},
        "files": {},
        "pre": {},
        "gpt2_tiny": None,
        "minilm": None,
    }
    out_dir = ROOT / "tests/data/vocab"
    out_dir.mkdir(exist_ok=True)
    # llama.cpp's own test texts (the .inp files), once
    for name in REAL:
        io = inp_out(models, name)
        items += [t for t in (io[0] if io else []) if t not in items]
    golden["texts"] = items
    for name in REAL:
        src = models / f"ggml-vocab-{name}.gguf"
        io = inp_out(models, name)
        if io is not None:
            ins, outs = io
            try:
                tok = cw.Tokenizer.from_pretrained(src)
                got = [tok.encode(t, add_special_tokens=False) for t in ins]
                diff = [{"text": t, "llama.cpp": o, "candlewick": g} for t, o, g in zip(ins, outs, got) if o != g]
                golden["full_files"][name] = {"texts": len(ins), "equal": len(ins) - len(diff), "differ": diff[:5]}
            except cw.CandlewickError as e:
                golden["full_files"][name] = {"texts": len(ins), "refused": str(e).replace(str(src), src.name)}
            print(name, "full file:", {k: v for k, v in golden["full_files"][name].items() if k != "differ"})
        dst = out_dir / f"{name}.gguf"
        cut_vocab(src, dst)
        golden["files"][name] = llama_ids(dst, items)
        print(name, dst.stat().st_size, "bytes")

    # every pre-tokenizer type llama.cpp implements, on llama-tiny's vocabulary
    tok_json = json.loads((ROOT / "tests/data/llama-tiny/tokenizer.json").read_text())
    golden["pre_refused"] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for pre, pre_type in pre_names(llama_dir):
            path = bpe_vocab_gguf(tok_json, Path(tmp) / f"{pre}.gguf", pre)
            try:
                cw.Tokenizer.from_pretrained(path)
            except cw.CandlewickError as e:
                golden["pre_refused"][pre] = {"type": pre_type, "error": str(e).replace(str(path), f"{pre}.gguf")}
                continue
            golden["pre"][pre] = {"type": pre_type, "ids": llama_ids(path, items)}
        # stored as the texts where each type's ids differ from GPT-2's
        base = golden["pre"]["gpt-2"]["ids"]
        for pre, case in golden["pre"].items():
            if pre != "gpt-2":
                case["ids"] = {str(i): ids for i, (ids, b) in enumerate(zip(case["ids"], base)) if ids != b}
        path = bpe_vocab_gguf(json.loads((ROOT / "tests/data/gpt2-tiny/tokenizer.json").read_text()),
                              Path(tmp) / "gpt2.gguf", "gpt-2")
        golden["gpt2_tiny"] = llama_ids(path, items)
        from conftest import minilm_path

        path = bert_vocab_gguf(json.loads((minilm_path() / "tokenizer.json").read_text()), Path(tmp) / "bert.gguf")
        golden["minilm"] = llama_ids(path, items)
        # T5's kind: a sentencepiece Unigram model with nmt_nfkc normalisation
        import sentencepiece as spm

        corpus = items + [p.read_text() for p in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]]
        (Path(tmp) / "corpus.txt").write_text("\n".join(l for d in corpus for l in d.splitlines() if l.strip()))
        spm.SentencePieceTrainer.train(
            input=str(Path(tmp) / "corpus.txt"), model_prefix=str(Path(tmp) / "u"), vocab_size=800,
            model_type="unigram", normalization_rule_name="nmt_nfkc", character_coverage=0.9995,
            pad_id=0, eos_id=1, unk_id=2, bos_id=-1, num_threads=1,
            minloglevel=2,
        )
        from gguf_util import t5_vocab_gguf

        dst = t5_vocab_gguf(Path(tmp) / "u.model", out_dir / "t5-unigram.gguf")
        golden["files"]["t5-unigram"] = llama_ids(dst, items)
        print("t5-unigram", dst.stat().st_size, "bytes")
    import re

    text = json.dumps(golden, ensure_ascii=False, indent=1)
    # one line per id list
    text = re.sub(r"\[\n\s*(-?[0-9][-0-9,\s]*?)\n\s*\]", lambda m: "[" + re.sub(r"\s+", "", m.group(1)) + "]", text)
    (ROOT / "tests/data/vocab-llamacpp.json").write_text(text + "\n")
    print("wrote tests/data/vocab-llamacpp.json")


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
