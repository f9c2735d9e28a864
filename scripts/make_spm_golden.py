"""Write tests/data/spm-llamacpp.json: a SentencePiece BPE vocabulary (the kind Llama 2, Mistral and TinyLlama ship,
with byte fallback) and llama.cpp's tokenisation, with it, of the tokenizer-vectors texts, for the GGUF
`tokenizer.ggml.model = "llama"` tests.

The vocabulary is trained here with the sentencepiece package on the test texts and this project's docs (1024 pieces,
the llama-tiny fixture's vocabulary size, so the tests can pair it with that fixture's weights); llama.cpp reads it
from a vocab-only GGUF file. Needs sentencepiece, gguf and llama-cpp-python (which compiles llama.cpp), so it is a
script, run once, and its output is committed.   usage: python scripts/make_spm_golden.py"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import gguf
import llama_cpp
import sentencepiece as spm

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 1024


def main() -> None:
    rows = json.loads((ROOT / "tests/data/tokenizer-vectors.json").read_text())["rows"]
    texts = [r["text"] for r in rows]
    corpus = texts + [p.read_text() for p in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "corpus.txt").write_text("\n".join(line for doc in corpus for line in doc.splitlines() if line.strip()))
        spm.SentencePieceTrainer.train(
            input=str(tmp / "corpus.txt"), model_prefix=str(tmp / "sp"), vocab_size=VOCAB, model_type="bpe",
            byte_fallback=True, character_coverage=0.9995, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
            num_threads=1, minloglevel=2,
        )
        sp = spm.SentencePieceProcessor(model_file=str(tmp / "sp.model"))
        tokens = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
        scores = [sp.get_score(i) for i in range(sp.get_piece_size())]
        # llama.cpp's token types: 1 normal, 2 unknown, 3 control, 6 byte
        types = [2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else 1
                 for i in range(sp.get_piece_size())]
        path = tmp / "vocab.gguf"
        w = gguf.GGUFWriter(str(path), "llama")
        w.add_tokenizer_model("llama")
        w.add_token_list(tokens)
        w.add_token_scores(scores)
        w.add_token_types(types)
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
        w.add_unk_token_id(0)
        w.add_add_bos_token(True)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        llm = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
        cases = []
        for t in texts + ["<s>Hello</s> world", "  two leading spaces", "tabs\tand\nnewlines", "emoji 🦙 and é"]:
            ids = llm.tokenize(t.encode("utf-8"), add_bos=False, special=True)
            cases.append({"text": t, "ids": ids, "detokenized": llm.detokenize(ids).decode("utf-8", "replace")})
        with_bos = llm.tokenize(b"Hello world", add_bos=True, special=True)
    out = {
        "generated_by": f"sentencepiece {spm.__version__} (BPE, byte fallback), llama-cpp-python {llama_cpp.__version__}",
        "tokens": tokens, "scores": scores, "types": types, "bos_token_id": 1, "eos_token_id": 2, "unk_token_id": 0,
        "with_bos": {"text": "Hello world", "ids": with_bos},
        "tokenize": cases,
    }
    dst = ROOT / "tests/data/spm-llamacpp.json"
    dst.write_text(json.dumps(out, ensure_ascii=False, indent=0))
    print(f"wrote {dst}: {len(tokens)} pieces, {len(cases)} texts")


if __name__ == "__main__":
    main()
