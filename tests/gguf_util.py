"""Write a Hugging Face Llama checkpoint folder as a GGUF file, the way llama.cpp's convert_hf_to_gguf.py does."""
from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
from safetensors.numpy import load_file


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp stores q/k rows reordered for its interleaved ("normal") RoPE."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def add_bpe_tokenizer(writer: gguf.GGUFWriter, tok: dict, pre: str) -> None:
    """tokenizer.json's byte-level BPE as tokenizer.ggml.* metadata (special added tokens become CONTROL, type 3)."""
    tokens = [t for t, _ in sorted(tok["model"]["vocab"].items(), key=lambda kv: kv[1])]
    for a in tok["added_tokens"]:
        if a["id"] >= len(tokens):
            tokens.append(a["content"])
        else:
            tokens[a["id"]] = a["content"]
    special = {a["id"] for a in tok["added_tokens"] if a["special"]}
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types([3 if i in special else 1 for i in range(len(tokens))])
    writer.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in tok["model"]["merges"]])


def add_spm_tokenizer(writer: gguf.GGUFWriter, spm: dict) -> None:
    """A SentencePiece vocabulary (pieces, scores, llama.cpp token types) as tokenizer.ggml.* metadata."""
    writer.add_tokenizer_model("llama")
    writer.add_token_list(spm["tokens"])
    writer.add_token_scores(spm["scores"])
    writer.add_token_types(spm["types"])
    writer.add_unk_token_id(spm["unk_token_id"])


def write_llama_gguf(
    folder: Path,
    out: Path,
    qtype: gguf.GGMLQuantizationType | None = None,
    arch: str = "llama",
    quantize_embeddings: bool = True,
    spm: dict | None = None,
    qtypes: dict[str, gguf.GGMLQuantizationType] | None = None,
) -> Path:
    """`spm`: a SentencePiece vocabulary (as in tests/data/spm-llamacpp.json) instead of the folder's tokenizer.
    `qtypes`: a format per tensor kind ("attn_k", "ffn_up", ...) in place of `qtype`, as llama.cpp's mixes
    (Q4_K_M and friends) store them."""
    cfg = json.loads((folder / "config.json").read_text())
    tok = json.loads((folder / "tokenizer.json").read_text())
    tcfg = json.loads((folder / "tokenizer_config.json").read_text())
    w = load_file(folder / "model.safetensors")
    h, hkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    writer = gguf.GGUFWriter(str(out), arch)
    writer.add_block_count(cfg["num_hidden_layers"])
    writer.add_context_length(cfg["max_position_embeddings"])
    writer.add_embedding_length(cfg["hidden_size"])
    writer.add_feed_forward_length(cfg["intermediate_size"])
    writer.add_head_count(h)
    writer.add_head_count_kv(hkv)
    writer.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    writer.add_rope_freq_base(cfg["rope_parameters"]["rope_theta"])
    writer.add_rope_dimension_count(cfg["head_dim"])
    if spm is None:
        add_bpe_tokenizer(writer, tok, "gpt2")
        writer.add_bos_token_id(tok["model"]["vocab"].get(tcfg["bos_token"], 0))
        writer.add_eos_token_id(cfg["eos_token_id"])
    else:
        add_spm_tokenizer(writer, spm)
        writer.add_bos_token_id(spm["bos_token_id"])
        writer.add_eos_token_id(spm["eos_token_id"])
    writer.add_pad_token_id(cfg["pad_token_id"])
    writer.add_add_bos_token(True)
    writer.add_chat_template(tcfg["chat_template"])

    def add(name: str, arr: np.ndarray, quantize: bool = True):
        arr = np.ascontiguousarray(arr.astype(np.float32))
        kind = name.split(".")[-2]
        qt = (qtypes or {}).get(kind, qtype)
        if qt is not None and quantize and arr.ndim == 2:
            data = arr.astype(np.float16) if qt == gguf.GGMLQuantizationType.F16 else gguf.quants.quantize(arr, qt)
            writer.add_tensor(name, data, raw_dtype=qt)
        else:
            writer.add_tensor(name, arr)

    add("token_embd.weight", w["model.embed_tokens.weight"], quantize=quantize_embeddings)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}"
        add(f"blk.{i}.attn_norm.weight", w[f"{p}.input_layernorm.weight"])
        add(f"blk.{i}.attn_q.weight", permute(w[f"{p}.self_attn.q_proj.weight"], h))
        add(f"blk.{i}.attn_k.weight", permute(w[f"{p}.self_attn.k_proj.weight"], hkv))
        add(f"blk.{i}.attn_v.weight", w[f"{p}.self_attn.v_proj.weight"])
        add(f"blk.{i}.attn_output.weight", w[f"{p}.self_attn.o_proj.weight"])
        add(f"blk.{i}.ffn_norm.weight", w[f"{p}.post_attention_layernorm.weight"])
        add(f"blk.{i}.ffn_gate.weight", w[f"{p}.mlp.gate_proj.weight"])
        add(f"blk.{i}.ffn_up.weight", w[f"{p}.mlp.up_proj.weight"])
        add(f"blk.{i}.ffn_down.weight", w[f"{p}.mlp.down_proj.weight"])
    add("output_norm.weight", w["model.norm.weight"])
    if "lm_head.weight" in w and not cfg.get("tie_word_embeddings"):
        add("output.weight", w["lm_head.weight"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def dequantized_checkpoint(folder: Path, out: Path, qtype: gguf.GGMLQuantizationType) -> Path:
    """A copy of `folder` whose matrices went through `qtype` and back: what a quantized file holds, as float32."""
    import shutil

    from safetensors.numpy import save_file

    shutil.copytree(folder, out)
    w = load_file(folder / "model.safetensors")
    roundtrip = lambda v: gguf.quants.dequantize(gguf.quants.quantize(v, qtype), qtype).reshape(v.shape)
    save_file({k: (roundtrip(v.astype(np.float32)).astype(np.float32) if v.ndim == 2 else v) for k, v in w.items()},
              out / "model.safetensors")
    return out


def write_gpt2_gguf(folder: Path, out: Path, qtype: gguf.GGMLQuantizationType | None = None) -> Path:
    """GPT-2 as llama.cpp's converter writes it: Conv1D weights transposed to [out, in], the tied head copied;
    with `qtype`, the projections and the head in that block format (the embeddings stay float32)."""
    cfg = json.loads((folder / "config.json").read_text())
    tok = json.loads((folder / "tokenizer.json").read_text())
    w = {k.removeprefix("transformer."): v for k, v in load_file(folder / "model.safetensors").items()}
    writer = gguf.GGUFWriter(str(out), "gpt2")
    writer.add_block_count(cfg["n_layer"])
    writer.add_context_length(cfg["n_positions"])
    writer.add_embedding_length(cfg["n_embd"])
    writer.add_feed_forward_length(4 * cfg["n_embd"])
    writer.add_head_count(cfg["n_head"])
    writer.add_layer_norm_eps(cfg["layer_norm_epsilon"])
    add_bpe_tokenizer(writer, tok, "gpt-2")
    writer.add_bos_token_id(cfg["bos_token_id"])
    writer.add_eos_token_id(cfg["eos_token_id"])
    f32 = lambda a: np.ascontiguousarray(a.astype(np.float32))
    writer.add_tensor("token_embd.weight", f32(w["wte.weight"]))
    writer.add_tensor("position_embd.weight", f32(w["wpe.weight"]))
    for i in range(cfg["n_layer"]):
        p = f"h.{i}"
        for ours, theirs, conv in [("attn_norm", "ln_1", False), ("attn_qkv", "attn.c_attn", True),
                                   ("attn_output", "attn.c_proj", True), ("ffn_norm", "ln_2", False),
                                   ("ffn_up", "mlp.c_fc", True), ("ffn_down", "mlp.c_proj", True)]:
            weight = f32(w[f"{p}.{theirs}.weight"].T if conv else w[f"{p}.{theirs}.weight"])
            if qtype is not None and conv:
                writer.add_tensor(f"blk.{i}.{ours}.weight", gguf.quants.quantize(weight, qtype), raw_dtype=qtype)
            else:
                writer.add_tensor(f"blk.{i}.{ours}.weight", weight)
            writer.add_tensor(f"blk.{i}.{ours}.bias", f32(w[f"{p}.{theirs}.bias"]))
    writer.add_tensor("output_norm.weight", f32(w["ln_f.weight"]))
    writer.add_tensor("output_norm.bias", f32(w["ln_f.bias"]))
    if qtype is not None:
        writer.add_tensor("output.weight", gguf.quants.quantize(f32(w["wte.weight"]), qtype), raw_dtype=qtype)
    else:
        writer.add_tensor("output.weight", f32(w["wte.weight"]))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def _writer_with_shape(cfg: dict, arch: str, out: Path, head_dim: int) -> gguf.GGUFWriter:
    """The hyperparameters every converted decoder carries (convert_hf_to_gguf.py's TextModel)."""
    writer = gguf.GGUFWriter(str(out), arch)
    writer.add_block_count(cfg["num_hidden_layers"])
    writer.add_context_length(cfg["max_position_embeddings"])
    writer.add_embedding_length(cfg["hidden_size"])
    writer.add_feed_forward_length(cfg["intermediate_size"])
    writer.add_head_count(cfg["num_attention_heads"])
    writer.add_head_count_kv(cfg.get("num_key_value_heads") or cfg["num_attention_heads"])
    if "head_dim" in cfg:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    return writer


def write_decoder_gguf(folder: Path, out: Path, qtype: gguf.GGMLQuantizationType | None = None) -> Path:
    """Qwen3, Gemma 3, Phi-3, GPT-NeoX, SmolLM3 and Llama 3 (rope_freqs) checkpoints as convert_hf_to_gguf.py
    writes them: llama.cpp's tensor names; Llama's and SmolLM3's q/k permuted for interleaved RoPE (the others keep rotate_half); Gemma's
    norm weights stored as 1 + w; GPT-NeoX's per-head query_key_value reordered to [q | k | v]; Phi-3's fused
    qkv_proj and gate_up_proj kept fused (attn_qkv, ffn_up); Llama 3.1 scaling as a rope_freqs tensor."""
    import math

    cfg = json.loads((folder / "config.json").read_text())
    tok = json.loads((folder / "tokenizer.json").read_text())
    w = load_file(folder / "model.safetensors")
    mt = cfg["model_type"]
    # MistralForCausalLM converts as LlamaModel: arch llama, and no sliding window is written
    arch = {"gemma3_text": "gemma3", "gpt_neox": "gptneox", "mistral": "llama"}.get(mt, mt)
    h = cfg["num_attention_heads"]
    hkv = cfg.get("num_key_value_heads") or h
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // h
    rope = cfg.get("rope_parameters") or {}
    writer = _writer_with_shape(cfg, arch, out, head_dim)
    if mt == "gpt_neox":
        writer.add_layer_norm_eps(cfg["layer_norm_eps"])
        writer.add_bool(gguf.Keys.LLM.USE_PARALLEL_RESIDUAL.format(arch=arch), cfg["use_parallel_residual"])
    else:
        writer.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    if mt == "gemma3_text":
        writer.add_rope_freq_base(rope["full_attention"]["rope_theta"])
        writer.add_sliding_window(cfg["sliding_window"])
    else:
        writer.add_rope_freq_base(rope.get("rope_theta", 10000.0))
    partial = rope.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))
    writer.add_rope_dimension_count(int(head_dim * partial))
    add_bpe_tokenizer(writer, tok, "gpt2")
    writer.add_bos_token_id(cfg["bos_token_id"])
    writer.add_eos_token_id(cfg["eos_token_id"])

    def add(name: str, arr: np.ndarray):
        arr = np.ascontiguousarray(arr.astype(np.float32))
        if qtype is not None and arr.ndim == 2:
            writer.add_tensor(name, gguf.quants.quantize(arr, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(name, arr)

    norm = (lambda a: a + 1.0) if mt == "gemma3_text" else (lambda a: a)
    if mt == "gpt_neox":
        c = cfg["hidden_size"]
        add("token_embd.weight", w["gpt_neox.embed_in.weight"])
        for i in range(cfg["num_hidden_layers"]):
            p = f"gpt_neox.layers.{i}"
            qkv_w = w[f"{p}.attention.query_key_value.weight"].reshape(h, 3, head_dim, c)
            qkv_b = w[f"{p}.attention.query_key_value.bias"].reshape(h, 3, head_dim)
            tensors = {"attn_norm": f"{p}.input_layernorm", "attn_output": f"{p}.attention.dense",
                       "ffn_norm": f"{p}.post_attention_layernorm", "ffn_up": f"{p}.mlp.dense_h_to_4h",
                       "ffn_down": f"{p}.mlp.dense_4h_to_h"}
            add(f"blk.{i}.attn_qkv.weight", np.concatenate([qkv_w[:, j].reshape(-1, c) for j in range(3)]))
            add(f"blk.{i}.attn_qkv.bias", np.concatenate([qkv_b[:, j].reshape(-1) for j in range(3)]))
            for ours, theirs in tensors.items():
                add(f"blk.{i}.{ours}.weight", w[f"{theirs}.weight"])
                add(f"blk.{i}.{ours}.bias", w[f"{theirs}.bias"])
        add("output_norm.weight", w["gpt_neox.final_layer_norm.weight"])
        add("output_norm.bias", w["gpt_neox.final_layer_norm.bias"])
        add("output.weight", w["embed_out.weight"])
    else:
        add("token_embd.weight", w["model.embed_tokens.weight"])
        for i in range(cfg["num_hidden_layers"]):
            p = f"model.layers.{i}"
            if mt == "phi3":
                add(f"blk.{i}.attn_qkv.weight", w[f"{p}.self_attn.qkv_proj.weight"])
                add(f"blk.{i}.ffn_up.weight", w[f"{p}.mlp.gate_up_proj.weight"])
            else:
                q, k = w[f"{p}.self_attn.q_proj.weight"], w[f"{p}.self_attn.k_proj.weight"]
                if arch in ("llama", "smollm3"):  # LlamaModel's undo_permute (SmolLM3Model inherits it)
                    q, k = permute(q, h), permute(k, hkv)
                add(f"blk.{i}.attn_q.weight", q)
                add(f"blk.{i}.attn_k.weight", k)
                add(f"blk.{i}.attn_v.weight", w[f"{p}.self_attn.v_proj.weight"])
                add(f"blk.{i}.ffn_gate.weight", w[f"{p}.mlp.gate_proj.weight"])
                add(f"blk.{i}.ffn_up.weight", w[f"{p}.mlp.up_proj.weight"])
            if f"{p}.self_attn.q_norm.weight" in w:
                add(f"blk.{i}.attn_q_norm.weight", norm(w[f"{p}.self_attn.q_norm.weight"]))
                add(f"blk.{i}.attn_k_norm.weight", norm(w[f"{p}.self_attn.k_norm.weight"]))
            add(f"blk.{i}.attn_output.weight", w[f"{p}.self_attn.o_proj.weight"])
            add(f"blk.{i}.attn_norm.weight", norm(w[f"{p}.input_layernorm.weight"]))
            if mt == "gemma3_text":
                add(f"blk.{i}.post_attention_norm.weight", norm(w[f"{p}.post_attention_layernorm.weight"]))
                add(f"blk.{i}.ffn_norm.weight", norm(w[f"{p}.pre_feedforward_layernorm.weight"]))
                add(f"blk.{i}.post_ffw_norm.weight", norm(w[f"{p}.post_feedforward_layernorm.weight"]))
            else:
                add(f"blk.{i}.ffn_norm.weight", w[f"{p}.post_attention_layernorm.weight"])
            add(f"blk.{i}.ffn_down.weight", w[f"{p}.mlp.down_proj.weight"])
        add("output_norm.weight", norm(w["model.norm.weight"]))
        if "lm_head.weight" in w and not cfg.get("tie_word_embeddings"):
            add("output.weight", w["lm_head.weight"])
    if rope.get("rope_type") == "llama3":
        # LlamaModel.generate_extra_tensors: the per-dimension divisors of the frequencies
        base, dim = rope["rope_theta"], head_dim
        factor, lo, hi = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
        old = rope["original_max_position_embeddings"]
        factors = []
        for f in 1.0 / base ** (np.arange(0, dim, 2, dtype=np.float64) / dim):
            wavelen = 2 * math.pi / f
            if wavelen < old / hi:
                factors.append(1.0)
            elif wavelen > old / lo:
                factors.append(factor)
            else:
                smooth = (old / wavelen - lo) / (hi - lo)
                factors.append(1 / ((1 - smooth) / factor + smooth))
        writer.add_tensor("rope_freqs.weight", np.asarray(factors, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


# --- vocabulary-only files (tokenizer.ggml.* metadata, no tensors), as convert_hf_to_gguf.py writes them ---------

def byte_chars() -> list[str]:
    """GPT-2's bytes_to_unicode: the character standing for each byte in byte-level BPE vocabularies."""
    bs = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for _, c in sorted(zip(bs, cs))]


def _looks_special(t: str) -> bool:
    """convert_hf_to_gguf.py's does_token_look_special."""
    return (t in ("<pad>", "<mask>", "<2mass>", "[@BOS@]") or (t.startswith("<|") and t.endswith("|>"))
            or (t.startswith("<｜") and t.endswith("｜>")) or (t.startswith("<unused") and t.endswith(">")))


def _finish(writer: gguf.GGUFWriter) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def bpe_vocab_gguf(tok: dict, out: Path, pre: str) -> Path:
    """A tokenizer.json byte-level BPE as _set_vocab_gpt2 writes it: added tokens CONTROL when special (or looking
    special), USER_DEFINED otherwise."""
    tokens = [t for t, _ in sorted(tok["model"]["vocab"].items(), key=lambda kv: kv[1])]
    types = [1] * len(tokens)
    for a in tok["added_tokens"]:
        if a["id"] >= len(tokens):
            tokens += [f"[PAD{i}]" for i in range(len(tokens), a["id"] + 1)]
            types += [5] * (a["id"] + 1 - len(types))
        tokens[a["id"]] = a["content"]
        types[a["id"]] = 3 if a["special"] or _looks_special(a["content"]) else 4
    w = gguf.GGUFWriter(str(out), "llama")
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in tok["model"]["merges"]])
    _finish(w)
    return out


def bert_vocab_gguf(tok: dict, out: Path) -> Path:
    """A WordPiece tokenizer.json as BertModel.set_vocab writes it: "##x" becomes "x", any other non-control
    token "x" becomes "▁x" (llama.cpp's phantom-space vocabulary)."""
    tokens = [t for t, _ in sorted(tok["model"]["vocab"].items(), key=lambda kv: kv[1])]
    control = {a["id"] for a in tok["added_tokens"] if a["special"]}
    types = [3 if i in control else 1 for i in range(len(tokens))]
    tokens = [t if i in control else t[2:] if t.startswith("##") else "\u2581" + t for i, t in enumerate(tokens)]
    ids = {a["content"]: a["id"] for a in tok["added_tokens"]}
    w = gguf.GGUFWriter(str(out), "bert")
    w.add_token_type_count(2)
    w.add_tokenizer_model("bert")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_unk_token_id(ids["[UNK]"])
    w.add_sep_token_id(ids["[SEP]"])
    w.add_pad_token_id(ids["[PAD]"])
    w.add_key_value("tokenizer.ggml.cls_token_id", ids["[CLS]"], gguf.GGUFValueType.UINT32)
    w.add_mask_token_id(ids["[MASK]"])
    _finish(w)
    return out


def t5_vocab_gguf(model_file: Path, out: Path) -> Path:
    """A sentencepiece Unigram model as T5Model.set_vocab writes it (plus one added <extra_id_0>, USER_DEFINED with
    score -1000, as T5's added_tokens.json gives)."""
    import os

    os.environ.setdefault("PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION", "python")
    from sentencepiece import SentencePieceProcessor
    from sentencepiece import sentencepiece_model_pb2 as model

    proto = model.ModelProto()
    proto.ParseFromString(model_file.read_bytes())
    sp = SentencePieceProcessor(model_file=str(model_file))
    tokens, scores, types = [], [], []
    for i in range(sp.vocab_size()):
        tokens.append(sp.IdToPiece(i))
        scores.append(sp.GetScore(i))
        types.append(2 if sp.IsUnknown(i) else 3 if sp.IsControl(i) else 5 if sp.IsUnused(i) else 6 if sp.IsByte(i) else 1)
    tokens.append("<extra_id_0>")
    scores.append(-1000.0)
    types.append(4)
    w = gguf.GGUFWriter(str(out), "t5")
    w.add_tokenizer_model("t5")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_add_space_prefix(proto.normalizer_spec.add_dummy_prefix)
    w.add_remove_extra_whitespaces(proto.normalizer_spec.remove_extra_whitespaces)
    w.add_precompiled_charsmap(proto.normalizer_spec.precompiled_charsmap)
    w.add_eos_token_id(sp.eos_id())
    w.add_unk_token_id(sp.unk_id())
    w.add_pad_token_id(sp.pad_id())
    w.add_add_bos_token(False)
    w.add_add_eos_token(True)
    _finish(w)
    return out


_ID_KEYS = {"bos": "tokenizer.ggml.bos_token_id", "eos": "tokenizer.ggml.eos_token_id",
            "unk": "tokenizer.ggml.unknown_token_id", "sep": "tokenizer.ggml.seperator_token_id",
            "pad": "tokenizer.ggml.padding_token_id", "cls": "tokenizer.ggml.cls_token_id",
            "mask": "tokenizer.ggml.mask_token_id", "eot": "tokenizer.ggml.eot_token_id"}
_LISTS = ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.scores", "tokenizer.ggml.merges")


def _field(f):
    t = f.types[0]
    if t == gguf.GGUFValueType.ARRAY:
        sub = f.types[1]
        if sub == gguf.GGUFValueType.STRING:
            return [bytes(f.parts[i]).decode("utf-8") for i in f.data]
        return [f.parts[i].tolist()[0] for i in f.data]
    if t == gguf.GGUFValueType.STRING:
        return bytes(f.parts[f.data[0]]).decode("utf-8")
    return f.parts[f.data[0]].tolist()[0]


def read_vocab(path: Path) -> dict:
    """The tokenizer.ggml.* metadata of a GGUF file."""
    r = gguf.GGUFReader(str(path))
    f = r.fields
    get = lambda k: _field(f[k]) if k in f else None  # noqa: E731
    return {"model": get("tokenizer.ggml.model"), "pre": get("tokenizer.ggml.pre"),
            "tokens": get("tokenizer.ggml.tokens"), "types": get("tokenizer.ggml.token_type"),
            "scores": get("tokenizer.ggml.scores"), "merges": get("tokenizer.ggml.merges"),
            "ids": {k: get(v) for k, v in _ID_KEYS.items()}}


def copy_vocab_gguf(src: Path, dst: Path, sub: dict | None = None, pre: str | None = None) -> Path:
    """A vocab-only copy of src's tokenizer.ggml.* metadata, with sub's tokens/types/scores/merges/ids (see
    read_vocab) and `pre` in place of the originals where given. Chat templates are left out."""
    r = gguf.GGUFReader(str(src))
    f = r.fields
    arch = _field(f["general.architecture"])
    w = gguf.GGUFWriter(str(dst), arch)
    sub = sub or {}
    lists = {"tokenizer.ggml.tokens": "tokens", "tokenizer.ggml.token_type": "types",
             "tokenizer.ggml.scores": "scores", "tokenizer.ggml.merges": "merges"}
    ids = {v: k for k, v in _ID_KEYS.items()}
    for key, field in f.items():
        if not key.startswith("tokenizer.") or key.startswith("tokenizer.chat_template"):
            continue
        value = _field(field)
        if key in lists and sub.get(lists[key]) is not None:
            value = sub[lists[key]]
        if key in ids and "ids" in sub:
            value = sub["ids"].get(ids[key])
            if value is None:
                continue
        if key == "tokenizer.ggml.pre" and pre is not None:
            value = pre
        t = field.types[0]
        if key == "tokenizer.ggml.precompiled_charsmap":
            w.add_precompiled_charsmap(bytes(np.asarray(value, dtype=np.uint8)))
        elif t == gguf.GGUFValueType.ARRAY:
            w.add_key_value(key, value, t, sub_type=field.types[1])
        else:
            w.add_key_value(key, value, t)
    if pre is not None and "tokenizer.ggml.pre" not in f:
        w.add_tokenizer_pre(pre)
    _finish(w)
    return dst
