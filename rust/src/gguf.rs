//! GGUF files (llama.cpp's format): metadata -> config and tokenizer, tensors -> quantized projections.

use std::io::Cursor;
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
    /// the whole file, mapped: tensors are read from it (by any number of threads, no lock), and the pages of
    /// each are given back to the page cache once it is read, so a load does not keep the file resident
    map: memmap2::Mmap,
    pub arch: String,
}

const SUPPORTED_ARCHS: &str = "llama (also SmolLM, Mistral-style files), qwen2, qwen3, gemma3, phi3, gptneox, gpt2, smollm3";

impl Gguf {
    pub fn open(path: &Path) -> Result<Self> {
        let file = std::fs::File::open(path).map_err(|e| Error::load(path, e))?;
        // SAFETY: the map is read-only; a file changed underneath it while loading gives wrong weights or a
        // failed load (as with any reader), and checkpoints are not written while they are read.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::load(path, e))?;
        // the header's lengths and counts are checked against the bytes that remain (Candle's reader)
        let content = Content::read(&mut Cursor::new(&map[..]))
            .map_err(|e| Error::load(path, format!("not a valid GGUF file ({})", first_line(&e))))?;
        let len = map.len() as u64;
        // the metadata is parsed into `content`: its pages need not stay resident
        let header_end = (content.tensor_data_offset as usize).min(map.len());
        for (name, info) in &content.tensor_infos {
            let bytes = info.shape.elem_count() / info.ggml_dtype.block_size() * info.ggml_dtype.type_size();
            if content.tensor_data_offset + info.offset + bytes as u64 > len {
                return Err(Error::load(
                    path,
                    format!("truncated: tensor {name:?} ends past the end of the file ({len} bytes)"),
                ));
            }
        }
        let mut g = Self { path: path.to_path_buf(), content, map, arch: String::new() };
        g.done_with(&g.map[..header_end]);
        g.arch = g.str("general.architecture")?;
        Ok(g)
    }

    pub(crate) fn get(&self, key: &str) -> Result<&Value> {
        self.content
            .metadata
            .get(key)
            .ok_or_else(|| Error::load(&self.path, format!("missing metadata key {key:?}")))
    }

    pub(crate) fn str(&self, key: &str) -> Result<String> {
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

    pub(crate) fn opt_num(&self, key: &str) -> Option<f64> {
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
        let t = self
            .content
            .tensor(&mut Cursor::new(&self.map[..]), name, device)
            .map_err(|e| Error::load(&self.path, format!("tensor {name:?} ({:?}): {}", info.ggml_dtype, first_line(&e))))?;
        let (start, bytes) = self.extent(info);
        self.done_with(&self.map[start..start + bytes]);
        Ok(t)
    }

    /// A tensor's format and raw bytes, straight from the mapped file (its shape checked as `qtensor` does);
    /// `done_with` gives the pages back once they are copied.
    pub fn raw(&self, name: &str, shape: &[usize]) -> Result<(candle_core::quantized::GgmlDType, &[u8])> {
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
        let (start, bytes) = self.extent(info);
        // `open` checked that every tensor ends inside the file
        Ok((info.ggml_dtype, &self.map[start..start + bytes]))
    }

    fn extent(&self, info: &candle_core::quantized::gguf_file::TensorInfo) -> (usize, usize) {
        let start = (self.content.tensor_data_offset + info.offset) as usize;
        (start, info.shape.elem_count() / info.ggml_dtype.block_size() * info.ggml_dtype.type_size())
    }

    /// The pages of `bytes` (a slice `raw` gave) need not stay resident: they are copied.
    pub fn done_with(&self, bytes: &[u8]) {
        crate::weights::release_pages(bytes);
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

    /// The tokenizer described by tokenizer.ggml.* (rust/src/gguf_vocab.rs).
    pub fn tokenizer(&self) -> Result<Tokenizer> {
        crate::gguf_vocab::tokenizer(self)
    }

    /// A metadata value, if the file has the key.
    pub(crate) fn meta(&self, key: &str) -> Option<&Value> {
        self.content.metadata.get(key)
    }
}

