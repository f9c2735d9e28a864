"""Loading holds each weight once: the peak memory of a load is at most 1.2x the weight file.

Each load runs in a fresh interpreter, which reports the growth of its peak resident set (VmHWM) from just
before `cw.load` (the extension imported) to just after. Checkpoints: a llama-style model with random weights
whose tied embedding is a third of the file (the largest tensor a load must pack), in safetensors float32 and
bfloat16, and the same weights as a Q8_0 GGUF with the tokenizer of llama-tiny (1024 tokens, so the
tokenizer's own memory does not count)."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import save_file

from conftest import DATA

MEASURE = """
import sys
import candlewick as cw
import candlewick._native

def kib(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1])

dtype = sys.argv[3] or None
cw.load(sys.argv[2], dtype=dtype)   # a tiny checkpoint of the same format first: the code is paged in
before = kib("VmRSS")
cw.load(sys.argv[1], dtype=dtype)
print(kib("VmHWM") - before)
"""


def peak_growth(path, warm_up, dtype: str = "") -> int:
    """Bytes the peak resident set grows by while `cw.load(path)` runs in a fresh interpreter (after loading
    `warm_up`, a tiny checkpoint of the same format, so that the extension's code pages are not counted)."""
    p = subprocess.run([sys.executable, "-c", MEASURE, str(path), str(warm_up), dtype], capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    return int(p.stdout.strip()) * 1024


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """~100 MB of float32: vocabulary 1024 (llama-tiny's tokenizer), hidden 1024, 4 layers, tied embeddings."""
    folder = tmp_path_factory.mktemp("memory") / "llama-wide"
    folder.mkdir()
    cfg = json.loads((DATA / "llama-tiny" / "config.json").read_text())
    cfg.update(hidden_size=1024, intermediate_size=4096, num_hidden_layers=4, num_attention_heads=16,
               num_key_value_heads=16, head_dim=64, vocab_size=1024, tie_word_embeddings=True)
    (folder / "config.json").write_text(json.dumps(cfg))
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(DATA / "llama-tiny" / f, folder / f)
    rng = np.random.default_rng(0)
    c, f_, v = 1024, 4096, 1024
    w = {"model.embed_tokens.weight": rng.standard_normal((v, c), dtype=np.float32) * 0.02,
         "model.norm.weight": np.ones(c, np.float32)}
    for i in range(4):
        p = f"model.layers.{i}"
        for name, shape in [("self_attn.q_proj", (c, c)), ("self_attn.k_proj", (c, c)), ("self_attn.v_proj", (c, c)),
                            ("self_attn.o_proj", (c, c)), ("mlp.gate_proj", (f_, c)), ("mlp.up_proj", (f_, c)),
                            ("mlp.down_proj", (c, f_))]:
            w[f"{p}.{name}.weight"] = rng.standard_normal(shape, dtype=np.float32) * 0.02
        w[f"{p}.input_layernorm.weight"] = np.ones(c, np.float32)
        w[f"{p}.post_attention_layernorm.weight"] = np.ones(c, np.float32)
    save_file(w, str(folder / "model.safetensors"))
    return folder


def test_safetensors_float32_load_holds_each_weight_once(checkpoint):
    size = (checkpoint / "model.safetensors").stat().st_size
    assert peak_growth(checkpoint, DATA / "llama-tiny") <= 1.2 * size


def test_safetensors_bfloat16_load_holds_each_weight_once(checkpoint, tmp_path):
    from safetensors.numpy import load_file

    folder = tmp_path / "bf16"
    shutil.copytree(checkpoint, folder)
    # bfloat16 as numpy has no such dtype: the top 16 bits of each float32, written through torch-free bytes
    tensors = load_file(str(checkpoint / "model.safetensors"))
    header, blobs, offset = {}, [], 0
    for name, t in tensors.items():
        b = (t.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16).tobytes()
        header[name] = {"dtype": "BF16", "shape": list(t.shape), "data_offsets": [offset, offset + len(b)]}
        blobs.append(b)
        offset += len(b)
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    (folder / "model.safetensors").write_bytes(len(head).to_bytes(8, "little") + head + b"".join(blobs))
    size = (folder / "model.safetensors").stat().st_size
    # kept at its width (the default on CPU widens a bf16 checkpoint to float32, twice the size by design)
    assert peak_growth(folder, DATA / "llama-tiny", "bfloat16") <= 1.2 * size


def test_gguf_load_holds_each_weight_once(checkpoint, tmp_path):
    import gguf
    from gguf_util import write_llama_gguf

    q8 = gguf.GGMLQuantizationType.Q8_0
    path = write_llama_gguf(checkpoint, tmp_path / "wide-q8.gguf", qtype=q8)
    tiny = write_llama_gguf(DATA / "llama-tiny", tmp_path / "tiny-q8.gguf", qtype=q8)
    assert peak_growth(path, tiny) <= 1.2 * path.stat().st_size


TOKENIZER_ONLY = """
import sys
import candlewick as cw
import candlewick._native

def kib(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1])

cw.Tokenizer.from_pretrained(sys.argv[2])
before = kib("VmRSS")
cw.Tokenizer.from_pretrained(sys.argv[1])
print(kib("VmHWM") - before)
"""


def test_smollm2_load_holds_each_weight_once(tmp_path):
    """The real file: SmolLM2-135M-Instruct Q4_1 (94 MiB). Its 49k-token vocabulary is a tokenizer of ~25 MiB
    in memory whatever the weights, so that is measured alone (a fresh interpreter again) and taken off."""
    import gguf
    from gguf_util import write_llama_gguf

    from candlewick.default_model import smollm2_path

    path = smollm2_path()
    tiny = write_llama_gguf(DATA / "llama-tiny", tmp_path / "tiny-q4_1.gguf", qtype=gguf.GGMLQuantizationType.Q4_1)
    load = peak_growth(path, tiny)
    p = subprocess.run([sys.executable, "-c", TOKENIZER_ONLY, str(path), str(tiny)], capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr
    tokenizer = int(p.stdout.strip()) * 1024
    assert tokenizer < 0.4 * load, (tokenizer, load)   # the tokenizer is the smaller part, measured apart
    assert load - tokenizer <= 1.2 * path.stat().st_size, (load, tokenizer)
