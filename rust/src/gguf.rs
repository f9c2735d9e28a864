//! GGUF files (llama.cpp's format): metadata -> config and tokenizer, tensors -> quantized projections.

use std::collections::HashMap;
use std::io::BufReader;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::QTensor;
use candle_core::{DType, Device, Tensor};
use serde_json::json;

use crate::config::{Config, RopeScaling};
use crate::error::{first_line, Error, Result};
use crate::tokenizer::Tokenizer;

pub struct Gguf {
    pub path: PathBuf,
    content: Content,
    reader: std::sync::Mutex<BufReader<std::fs::File>>,
    pub arch: String,
}

const SUPPORTED_ARCHS: &str = "llama (also SmolLM, Mistral-style files), qwen2, qwen3, gemma3, phi3, gptneox, gpt2, smollm3";

impl Gguf {
    pub fn open(path: &Path) -> Result<Self> {
        let file = std::fs::File::open(path).map_err(|e| Error::load(path, e))?;
        let mut reader = BufReader::new(file);
        let content = Content::read(&mut reader)
            .map_err(|e| Error::load(path, format!("not a valid GGUF file ({})", first_line(&e))))?;
        let len = std::fs::metadata(path).map_err(|e| Error::load(path, e))?.len();
        for (name, info) in &content.tensor_infos {
            let bytes = info.shape.elem_count() / info.ggml_dtype.block_size() * info.ggml_dtype.type_size();
            if content.tensor_data_offset + info.offset + bytes as u64 > len {
                return Err(Error::load(
                    path,
                    format!("truncated: tensor {name:?} ends past the end of the file ({len} bytes)"),
                ));
            }
        }
        let mut g = Self { path: path.to_path_buf(), content, reader: std::sync::Mutex::new(reader), arch: String::new() };
        g.arch = g.str("general.architecture")?;
        Ok(g)
    }

    fn get(&self, key: &str) -> Result<&Value> {
        self.content
            .metadata
            .get(key)
            .ok_or_else(|| Error::load(&self.path, format!("missing metadata key {key:?}")))
    }

    fn str(&self, key: &str) -> Result<String> {
        self.get(key)?.to_string().cloned().map_err(|_| Error::load(&self.path, format!("metadata {key:?} is not a string")))
    }

    fn num(&self, key: &str) -> Result<f64> {
        let v = self.get(key)?;
        v.to_f64()
            .or_else(|_| v.to_f32().map(f64::from))
            .or_else(|_| v.to_u64().map(|x| x as f64))
            .or_else(|_| v.to_u32().map(f64::from))
            .or_else(|_| v.to_i32().map(f64::from))
            .or_else(|_| v.to_i64().map(|x| x as f64))
            .map_err(|_| Error::load(&self.path, format!("metadata {key:?} is not a number")))
    }

    fn usize(&self, key: &str) -> Result<usize> {
        Ok(self.num(key)? as usize)
    }

    fn opt_num(&self, key: &str) -> Option<f64> {
        self.content.metadata.get(key).and_then(|_| self.num(key).ok())
    }

    pub fn has_tensor(&self, name: &str) -> bool {
        self.content.tensor_infos.contains_key(name)
    }

    pub fn tensor_dtypes(&self) -> Vec<String> {
        let mut v: Vec<String> = self.content.tensor_infos.values().map(|i| format!("{:?}", i.ggml_dtype)).collect();
        v.sort();
        v.dedup();
        v
    }

    /// A tensor as stored (quantized or not), with its shape checked ([out, in] row-major).
    pub fn qtensor(&self, name: &str, shape: &[usize], device: &Device) -> Result<QTensor> {
        let info = self
            .content
            .tensor_infos
            .get(name)
            .ok_or_else(|| Error::load(&self.path, format!("no tensor named {name:?}")))?;
        if info.shape.dims() != shape {
            return Err(Error::load(
                &self.path,
                format!("tensor {name:?} has shape {:?}, but the metadata implies {shape:?}", info.shape.dims()),
            ));
        }
        let mut r = self.reader.lock().unwrap_or_else(|p| p.into_inner());
        self.content
            .tensor(&mut *r, name, device)
            .map_err(|e| Error::load(&self.path, format!("tensor {name:?} ({:?}): {}", info.ggml_dtype, first_line(&e))))
    }

    /// A tensor dequantized to a dense f32 tensor (norms, embeddings).
    pub fn dense(&self, name: &str, shape: &[usize], device: &Device) -> Result<Tensor> {
        Ok(self.qtensor(name, shape, device)?.dequantize(device)?.to_dtype(DType::F32)?)
    }

    /// The model's config from the `{arch}.*` metadata, as the equivalent config.json read by `Config::from_value`
    /// (one reading of the maths for both formats), with llama.cpp's conventions for what the file leaves out.
    /// A `{arch}.*` key the engine does not implement is refused by name.
    pub fn config(&self) -> Result<Config> {
        let a = self.arch.as_str();
        let model_type = match a {
            "llama" | "qwen2" | "qwen3" | "phi3" | "gpt2" | "smollm3" => a,
            "gemma3" => "gemma3_text",
            "gptneox" => "gpt_neox",
            other => {
                return Err(Error::load(
                    &self.path,
                    format!("unsupported GGUF architecture {other:?} (general.architecture); supported: {SUPPORTED_ARCHS}"),
                ))
            }
        };
        // every {arch}.* key: read below, or harmless
        const KNOWN: &[&str] = &[
            "context_length", "embedding_length", "block_count", "feed_forward_length", "attention.head_count",
            "attention.head_count_kv", "attention.key_length", "attention.value_length",
            "attention.layer_norm_rms_epsilon", "attention.layer_norm_epsilon", "rope.dimension_count", "rope.freq_base",
            "rope.scale_linear", "rope.scaling.type", "rope.scaling.factor", "rope.scaling.original_context_length",
            "rope.scaling.finetuned", "attention.sliding_window", "use_parallel_residual", "vocab_size",
            "tensor_data_layout", "final_logit_softcapping", "attn_logit_softcapping", "expert_count", "expert_used_count",
        ];
        let prefix = format!("{a}.");
        let mut keys: Vec<&String> = self.content.metadata.keys().filter(|k| k.starts_with(&prefix)).collect();
        keys.sort();
        if let Some(bad) = keys.iter().find(|k| !KNOWN.contains(&&k[prefix.len()..])) {
            return Err(Error::load(&self.path, format!("metadata key {bad:?} is not implemented")));
        }
        if self.opt_num(&format!("{a}.expert_count")).is_some_and(|n| n > 0.0) {
            return Err(Error::load(&self.path, format!("{a}.expert_count: mixture-of-experts models are not implemented")));
        }
        let k = |s: &str| format!("{a}.{s}");
        let hidden = self.usize(&k("embedding_length"))?;
        let heads = self.usize(&k("attention.head_count"))?;
        let layers = self.usize(&k("block_count"))?;
        if heads == 0 {
            return Err(Error::load(&self.path, format!("{}: must be positive", k("attention.head_count"))));
        }
        let kv = self.opt_num(&k("attention.head_count_kv")).map(|x| x as usize).unwrap_or(heads);
        let vocab = match self.content.metadata.get("tokenizer.ggml.tokens") {
            Some(Value::Array(t)) => t.len(),
            _ => self.usize(&k("vocab_size"))?,
        };
        let head_dim = self.opt_num(&k("attention.key_length")).map(|x| x as usize).unwrap_or(hidden / heads);
        if let Some(vl) = self.opt_num(&k("attention.value_length")) {
            if vl as usize != head_dim {
                return Err(Error::load(&self.path, format!("{} ({vl}) differs from the key length {head_dim}: not implemented", k("attention.value_length"))));
            }
        }
        let rope_dims = self.opt_num(&k("rope.dimension_count")).map(|x| x as usize).unwrap_or(head_dim);
        let mut rope = serde_json::Map::new();
        rope.insert("rope_theta".into(), json!(self.opt_num(&k("rope.freq_base")).unwrap_or(10000.0)));
        let scaling = self.content.metadata.get(&k("rope.scaling.type")).and_then(|v| v.to_string().ok()).cloned();
        let factor = self.opt_num(&k("rope.scaling.factor")).or_else(|| self.opt_num(&k("rope.scale_linear")));
        match (scaling.as_deref(), factor) {
            (None | Some("none"), None) => {}
            (None | Some("linear"), Some(f)) => {
                rope.insert("rope_type".into(), json!("linear"));
                rope.insert("factor".into(), json!(f));
            }
            (Some("none"), Some(1.0)) => {}
            (Some(t), _) => {
                return Err(Error::load(&self.path, format!("{} {t:?} is not implemented (implemented: none, linear)", k("rope.scaling.type"))))
            }
        }
        if rope_dims != head_dim {
            rope.insert("partial_rotary_factor".into(), json!(rope_dims as f64 / head_dim as f64));
        }
        let eps = self
            .opt_num(&k("attention.layer_norm_rms_epsilon"))
            .or_else(|| self.opt_num(&k("attention.layer_norm_epsilon")))
            .unwrap_or(1e-5);
        let mut c = json!({
            "model_type": model_type,
            "gguf": self.path.display().to_string(),
            "vocab_size": vocab,
            "hidden_size": hidden,
            "num_hidden_layers": layers,
            "num_attention_heads": heads,
            "num_key_value_heads": kv,
            "head_dim": head_dim,
            "intermediate_size": self.usize(&k("feed_forward_length"))?,
            "max_position_embeddings": self.usize(&k("context_length"))?,
            "rms_norm_eps": eps,
            "layer_norm_eps": eps,
            "layer_norm_epsilon": eps,
            "rope_parameters": rope,
            "tie_word_embeddings": !self.has_tensor("output.weight"),
            "bos_token_id": self.opt_num("tokenizer.ggml.bos_token_id").map(|x| x as u32),
        });
        if let Some(w) = self.opt_num(&k("attention.sliding_window")).filter(|&w| w > 0.0) {
            c["sliding_window"] = json!(w as usize);
        }
        match a {
            "llama" | "qwen3" => c["attention_bias"] = json!(self.has_tensor("blk.0.attn_q.bias")),
            "smollm3" => {
                // llama.cpp's fixed SmolLM3 conventions: every 4th layer without RoPE (n_no_rope_layer_step), no
                // sliding window
                c["attention_bias"] = json!(self.has_tensor("blk.0.attn_q.bias"));
                c["no_rope_layer_interval"] = json!(4);
                c["use_sliding_window"] = json!(false);
            }
            "gptneox" => c["use_parallel_residual"] = json!(self.opt_bool(&k("use_parallel_residual")).unwrap_or(true)),
            "gemma3" => {
                // llama.cpp's fixed Gemma 3 conventions: every 6th layer global, local RoPE base 10000, scores scaled
                // by 1/√head_dim (27B, 62 layers: 1/√(hidden/heads))
                c["sliding_window_pattern"] = json!(6);
                c["rope_local_base_freq"] = json!(10000.0);
                c["rope_theta"] = c["rope_parameters"]["rope_theta"].clone();
                c["query_pre_attn_scalar"] = json!(if layers == 62 { hidden / heads } else { head_dim });
                c["hidden_activation"] = json!("gelu_pytorch_tanh");
                for cap in ["final_logit_softcapping", "attn_logit_softcapping"] {
                    if let Some(x) = self.opt_num(&k(cap)) {
                        c[cap] = json!(x);
                    }
                }
                c.as_object_mut().expect("object").remove("rope_parameters");
            }
            _ => {}
        }
        let mut cfg = Config::from_value(c, &self.path.display().to_string())?;
        if model_type == "qwen2" {
            cfg.qkv_bias = self.has_tensor("blk.0.attn_q.bias");
        }
        if model_type == "gpt_neox" {
            cfg.qkv_bias = self.has_tensor("blk.0.attn_qkv.bias");
            cfg.o_bias = self.has_tensor("blk.0.attn_output.bias");
            cfg.mlp_bias = self.has_tensor("blk.0.ffn_up.bias");
        }
        // Llama 3.1's frequency scaling travels as a tensor of per-dimension divisors
        if self.has_tensor("rope_freqs.weight") {
            let f = self.dense("rope_freqs.weight", &[rope_dims / 2], &Device::Cpu)?.to_vec1::<f32>()?;
            for r in cfg.ropes.iter_mut() {
                r.scaling = RopeScaling::FreqFactors(f.iter().map(|&x| x as f64).collect());
            }
            cfg.rope_scaling = cfg.ropes[0].scaling.clone();
        }
        Ok(cfg)
    }

    fn opt_bool(&self, key: &str) -> Option<bool> {
        self.content.metadata.get(key).and_then(|v| v.to_bool().ok())
    }

    /// The tokenizer described by tokenizer.ggml.* (byte-level BPE, or SentencePiece BPE), as a Hugging Face
    /// tokenizer pipeline.
    pub fn tokenizer(&self) -> Result<Tokenizer> {
        let model = self.str("tokenizer.ggml.model")?;
        if model != "gpt2" && model != "llama" {
            return Err(Error::load(
                &self.path,
                format!(
                    "tokenizer.ggml.model {model:?} is not supported (supported: \"gpt2\", byte-level BPE; \"llama\", \
                     SentencePiece BPE)"
                ),
            ));
        }
        let strings = |key: &str| -> Result<Vec<String>> {
            match self.get(key)? {
                Value::Array(v) => v
                    .iter()
                    .map(|x| x.to_string().cloned().map_err(|_| Error::load(&self.path, format!("{key} holds a non-string"))))
                    .collect(),
                _ => Err(Error::load(&self.path, format!("metadata {key:?} is not an array"))),
            }
        };
        let tokens = strings("tokenizer.ggml.tokens")?;
        let types: Vec<i64> = match self.content.metadata.get("tokenizer.ggml.token_type") {
            Some(Value::Array(v)) => v.iter().map(|x| x.to_i32().map(i64::from).unwrap_or(1)).collect(),
            _ => vec![1; tokens.len()],
        };
        let vocab: serde_json::Map<String, serde_json::Value> =
            tokens.iter().enumerate().map(|(i, t)| (t.clone(), json!(i))).collect();
        let id = |key: &str| self.opt_num(key).map(|x| x as usize).filter(|&i| i < tokens.len());
        let (normalizer, pre_tokenizer, decoder, bpe) = if model == "llama" {
            let scores: Vec<f64> = match self.get("tokenizer.ggml.scores")? {
                Value::Array(v) => v.iter().map(|x| x.to_f32().map(f64::from).unwrap_or(0.0)).collect(),
                _ => return Err(Error::load(&self.path, "metadata \"tokenizer.ggml.scores\" is not an array")),
            };
            if scores.len() != tokens.len() {
                return Err(Error::load(&self.path, format!("{} token scores for {} tokens", scores.len(), tokens.len())));
            }
            // SentencePiece BPE as transformers' LlamaTokenizerFast has it: spaces as ▁ with one in front of
            // every piece of text, merges ranked by the score of the piece they make, unknown characters as
            // <0xXX> byte tokens
            let unk = id("tokenizer.ggml.unknown_token_id").map(|i| tokens[i].clone());
            (
                json!({"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": "\u{2581}"},
                       {"type": "Replace", "pattern": {"String": " "}, "content": "\u{2581}"}]}),
                serde_json::Value::Null,
                json!({"type": "Sequence", "decoders": [{"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "},
                       {"type": "ByteFallback"}, {"type": "Fuse"}, {"type": "Strip", "content": " ", "start": 1, "stop": 0}]}),
                json!({"type": "BPE", "dropout": null, "unk_token": unk, "continuing_subword_prefix": null,
                       "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": true, "ignore_merges": false,
                       "vocab": vocab, "merges": spm_merges(&tokens, &scores)}),
            )
        } else {
            let pre = self.content.metadata.get("tokenizer.ggml.pre").and_then(|v| v.to_string().ok()).cloned().unwrap_or_default();
            (serde_json::Value::Null, self.bpe_pre_tokenizer(&pre)?, json!({"type": "ByteLevel", "add_prefix_space": true,
                "trim_offsets": true, "use_regex": true}),
             json!({"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                    "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                    "vocab": vocab, "merges": strings("tokenizer.ggml.merges")?}))
        };
        // token types: 3 = control (special), 4 = user-defined (added, not special)
        let added: Vec<serde_json::Value> = types
            .iter()
            .enumerate()
            .filter(|(_, &t)| t == 3 || t == 4)
            .map(|(i, &t)| {
                json!({"id": i, "content": tokens[i], "single_word": false, "lstrip": false, "rstrip": false,
                       "normalized": false, "special": t == 3})
            })
            .collect();
        let add_bos = self.content.metadata.get("tokenizer.ggml.add_bos_token").and_then(|v| v.to_bool().ok()).unwrap_or(false);
        let post = match (add_bos, id("tokenizer.ggml.bos_token_id")) {
            (true, Some(b)) => json!({"type": "TemplateProcessing",
                "single": [{"SpecialToken": {"id": tokens[b], "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [{"SpecialToken": {"id": tokens[b], "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                         {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": {tokens[b].clone(): {"id": tokens[b], "ids": [b], "tokens": [tokens[b]]}}}),
            _ => serde_json::Value::Null,
        };
        let spec = json!({
            "version": "1.0",
            "truncation": null, "padding": null,
            "added_tokens": added,
            "normalizer": normalizer,
            "pre_tokenizer": pre_tokenizer,
            "post_processor": post,
            "decoder": decoder,
            "model": bpe,
        });
        let inner: tokenizers::Tokenizer = spec
            .to_string()
            .parse()
            .map_err(|e| Error::load(&self.path, format!("cannot build the tokenizer from its metadata: {e}")))?;
        let mut tok_config = serde_json::Map::new();
        for (name, key) in [
            ("bos_token", "tokenizer.ggml.bos_token_id"),
            ("eos_token", "tokenizer.ggml.eos_token_id"),
            ("unk_token", "tokenizer.ggml.unknown_token_id"),
            ("pad_token", "tokenizer.ggml.padding_token_id"),
        ] {
            if let Some(i) = id(key) {
                tok_config.insert(name.into(), json!(tokens[i]));
            }
        }
        let mut config = HashMap::new();
        if let Some(e) = id("tokenizer.ggml.eos_token_id") {
            config.insert("eos_token_id", json!(e));
        }
        if let Some(e) = id("tokenizer.ggml.eot_token_id") {
            config.insert("eot_token_id", json!(e));
        }
        let config = json!(config);
        let gen = self.content.metadata.get("tokenizer.ggml.eot_token_id").and_then(|_| id("tokenizer.ggml.eot_token_id"));
        let gen = gen.map(|e| json!({"eos_token_id": [e]}));
        let template = self.content.metadata.get("tokenizer.chat_template").and_then(|v| v.to_string().ok()).cloned();
        Tokenizer::new(inner, self.path.clone(), Some(&json!(tok_config)), Some(&config), gen.as_ref(), template)
    }

    /// llama.cpp's pre-tokenizer type (tokenizer.ggml.pre) as the equivalent tokenizers pipeline.
    fn bpe_pre_tokenizer(&self, pre: &str) -> Result<serde_json::Value> {
        let byte_level = |regex: bool| json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": regex});
        let split = |pattern: &str| json!({"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": false});
        Ok(match pre {
            "" | "default" | "gpt2" | "gpt-2" => byte_level(true),
            "smollm" => json!({"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": true}, byte_level(true)]}),
            "llama-bpe" | "llama3" | "llama-v3" => json!({"type": "Sequence", "pretokenizers": [split(LLAMA3_REGEX), byte_level(false)]}),
            "qwen2" => json!({"type": "Sequence", "pretokenizers": [split(QWEN2_REGEX), byte_level(false)]}),
            other => {
                return Err(Error::load(
                    &self.path,
                    format!("tokenizer.ggml.pre {other:?} is not supported (supported: gpt2, smollm, llama-bpe, qwen2)"),
                ))
            }
        })
    }
}

/// BPE merges for a SentencePiece vocabulary, as transformers derives them for Llama tokenizers: every split of a
/// piece into two pieces of the vocabulary is a merge, ranked by the score of the piece it makes (highest first;
/// splits of one piece in the order of their halves' ids).
fn spm_merges(tokens: &[String], scores: &[f64]) -> Vec<(String, String)> {
    let index: HashMap<&str, usize> = tokens.iter().enumerate().map(|(i, t)| (t.as_str(), i)).collect();
    let mut merges: Vec<(f64, usize, usize)> = Vec::new();
    for (t, &score) in tokens.iter().zip(scores) {
        let mut local: Vec<(usize, usize)> = t
            .char_indices()
            .skip(1)
            .filter_map(|(at, _)| Some((*index.get(&t[..at])?, *index.get(&t[at..])?)))
            .collect();
        local.sort();
        merges.extend(local.into_iter().map(|(l, r)| (score, l, r)));
    }
    // a stable sort, highest score first, as Python's sorted(..., reverse=True) leaves equal scores in order
    merges.sort_by(|a, b| b.0.total_cmp(&a.0));
    merges.into_iter().map(|(_, l, r)| (tokens[l].clone(), tokens[r].clone())).collect()
}

const LLAMA3_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
