//! A loaded checkpoint: config, tokenizer and one of the architectures, with the model-level computations
//! (logits, token NLL, perplexity, embeddings) that the Python API exposes.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device, Tensor};

use crate::config::{Arch, Config};
use crate::device::on_workers;
use crate::error::{first_out_of_range, Error, Result};
use crate::gguf::Gguf;
use crate::models::{bert::Bert, decoder::Decoder};
use crate::nn::{positions, Cache};
use crate::tokenizer::Tokenizer;
use crate::weights::{safetensors_files, Weights};

pub enum Net {
    /// GPT-2 and every rotary decoder (models/decoder.rs)
    Decoder(Decoder),
    /// the BERT encoder (embeddings only)
    Bert(Bert),
}

pub struct Model {
    pub cfg: Config,
    pub tokenizer: Option<Arc<Tokenizer>>,
    pub net: Net,
    pub device: Device,
    /// The weights' dtype (activations are f32 on CPU whatever this is).
    pub dtype: DType,
    pub path: PathBuf,
    /// The KV cache's dtype where it is not the activations' (`set_kv_cache_dtype`).
    pub kv_dtype: Option<DType>,
}

/// A batch of token sequences padded on the right: ids [B, T].
pub struct Batch {
    pub ids: Tensor,
    pub t: usize,
}

impl Model {
    /// Load a Hugging Face-style checkpoint folder, or a GGUF file. `quant` quantizes a folder's projections at
    /// load time with llama.cpp's block formats (e.g. Q8_0).
    pub fn load(path: &Path, device: &Device, dtype: Option<DType>, quant: Option<GgmlDType>) -> Result<Self> {
        // the kernels read CANDLEWICK_ISA once, later; a value naming no level is refused here, by name
        crate::kernels::cpu::requested()?;
        if !path.exists() {
            return Err(Error::load(path, "no such file or folder"));
        }
        if path.is_file() {
            if path.extension().is_some_and(|e| e.eq_ignore_ascii_case("gguf")) {
                return Self::load_gguf(path, device);
            }
            return Err(Error::load(
                path,
                "expected a checkpoint folder (config.json, model.safetensors, tokenizer.json) or a .gguf file",
            ));
        }
        let cfg_path = path.join("config.json");
        if !cfg_path.is_file() {
            return Err(Error::load(path, "no config.json in this folder"));
        }
        let cfg = Config::from_file(&cfg_path)?;
        let weights = Weights::open(&safetensors_files(path)?, device)?;
        // Default: the checkpoint's dtype, except that CPU computes bf16/f16 files in f32 unless asked.
        let dtype = dtype.unwrap_or(if device.is_cpu() { DType::F32 } else { weights.stored_dtype() });
        let net = match cfg.arch {
            Arch::Gpt2 | Arch::Llama => Net::Decoder(Decoder::load(&cfg, &weights, dtype, device, quant)?),
            Arch::Bert if quant.is_some() => {
                return Err(Error::arg("load-time quantization is supported for decoder checkpoints only, not BERT"))
            }
            Arch::Bert => Net::Bert(Bert::load(&cfg, &weights, dtype, device, path)?),
        };
        let tokenizer = if path.join("tokenizer.json").is_file() {
            Some(Arc::new(Tokenizer::from_pretrained(path)?))
        } else {
            None
        };
        Ok(Self { cfg, tokenizer, net, device: device.clone(), dtype, path: path.to_path_buf(), kv_dtype: None })
    }

    fn load_gguf(path: &Path, device: &Device) -> Result<Self> {
        let g = Gguf::open(path)?;
        let cfg = g.config()?;
        let tokenizer = Some(Arc::new(g.tokenizer()?));
        let net = Net::Decoder(Decoder::load_gguf(&cfg, &g, device)?);
        Ok(Self { cfg, tokenizer, net, device: device.clone(), dtype: DType::F32, path: path.to_path_buf(), kv_dtype: None })
    }

    pub fn is_decoder(&self) -> bool {
        !matches!(self.net, Net::Bert(_))
    }

    pub fn tokenizer(&self) -> Result<&Arc<Tokenizer>> {
        self.tokenizer
            .as_ref()
            .ok_or_else(|| Error::load(&self.path, "this checkpoint has no tokenizer.json; pass token ids instead of text"))
    }

    /// Check ids against the vocabulary and the context; an empty sequence is an error too.
    pub fn check_ids(&self, ids: &[u32], what: &str) -> Result<()> {
        if ids.is_empty() {
            return Err(Error::arg(format!("{what} is empty: at least one token is needed")));
        }
        if let Some(bad) = first_out_of_range(ids.iter().map(|&i| i64::from(i)), self.cfg.vocab_size) {
            return Err(Error::arg(format!(
                "{what}: token id {bad} is out of range for a vocabulary of {}",
                self.cfg.vocab_size
            )));
        }
        let ctx = self.cfg.context_length();
        if ids.len() > ctx {
            return Err(Error::arg(format!(
                "{what} has {} tokens, longer than the model's context of {ctx} (max_position_embeddings)",
                ids.len()
            )));
        }
        Ok(())
    }

    pub fn batch(&self, seqs: &[Vec<u32>]) -> Result<Batch> {
        if seqs.is_empty() {
            return Err(Error::arg("no sequences given"));
        }
        for (i, s) in seqs.iter().enumerate() {
            self.check_ids(s, &if seqs.len() == 1 { "input".to_string() } else { format!("sequence {i}") })?;
        }
        let t = seqs.iter().map(Vec::len).max().unwrap_or(0);
        let flat: Vec<u32> = seqs.iter().flat_map(|s| s.iter().copied().chain(std::iter::repeat_n(0, t - s.len()))).collect();
        Ok(Batch { ids: Tensor::from_vec(flat, (seqs.len(), t), &self.device)?, t })
    }

    /// Decoder forward: ids [B, T] at `positions` [B, T] -> hidden [B, T, C].
    pub fn forward(&self, ids: &Tensor, positions: &Tensor, mask: Option<&Tensor>, cache: &mut Cache) -> Result<Tensor> {
        self.forward_layers(ids, positions, mask, cache, None, false)
    }

    /// `forward` for when only the last position matters (a prompt before generation): hidden [B, 1, C], and the
    /// cache filled for every position. The last block skips the work the other positions would need.
    pub fn forward_last(&self, ids: &Tensor, positions: &Tensor, mask: Option<&Tensor>, cache: &mut Cache) -> Result<Tensor> {
        self.forward_layers(ids, positions, mask, cache, None, true)
    }

    /// `forward`, also pushing each block's output (the residual stream [B, T, C]) to `layers_out`; with
    /// `last_only`, see `forward_last`.
    pub fn forward_layers(
        &self,
        ids: &Tensor,
        positions: &Tensor,
        mask: Option<&Tensor>,
        cache: &mut Cache,
        layers_out: Option<&mut Vec<Tensor>>,
        last_only: bool,
    ) -> Result<Tensor> {
        on_workers(|| match &self.net {
            Net::Decoder(m) => m.forward(ids, positions, mask, cache, layers_out, last_only),
            Net::Bert(_) => Err(Error::arg("this is an encoder model (BERT): use embed(), not logits or generation")),
        })
    }

    /// One step of a flattened batch over a paged KV pool: the logits [M][V] of its `out_rows` (see
    /// Decoder::paged_logits), written into `buf`'s memory (the last step's, from `Logits::into_buf`).
    pub fn paged_logits(&self, step: &crate::nn::PagedStep, pool: &mut crate::nn::KvPool, buf: Vec<f32>) -> Result<crate::nn::Logits> {
        on_workers(|| match &self.net {
            Net::Decoder(m) => m.paged_logits(step, pool, buf),
            Net::Bert(_) => Err(Error::arg("this is an encoder model (BERT): use embed(), not logits or generation")),
        })
    }

    /// Values per position and layer in a KV cache (Hkv·D), and the cache's dtype.
    pub fn kv_width(&self) -> (usize, DType) {
        let act = match &self.net {
            Net::Decoder(m) => m.act_dtype(),
            Net::Bert(_) => DType::F32,
        };
        (self.cfg.num_kv_heads * self.cfg.head_dim, self.kv_dtype.unwrap_or(act))
    }

    /// Keep the KV cache of every engine made after this in `dtype`: "f32" (the default on the CPU: the
    /// activations' own), or "f16", half the memory and the bytes a decode step reads at long contexts, each key
    /// and value rounded to f16 as it is stored (as llama.cpp keeps its cache by default).
    pub fn set_kv_cache_dtype(&mut self, dtype: &str) -> Result<()> {
        self.kv_dtype = match dtype {
            "f32" | "float32" => None,
            "f16" | "float16" if self.device.is_cpu() => Some(DType::F16),
            "f16" | "float16" => return Err(Error::arg(format!("kv_cache_dtype {dtype:?}: only on the CPU for now (device {:?})", self.device))),
            other => return Err(Error::arg(format!("kv_cache_dtype {other:?}: expected \"f32\" or \"f16\""))),
        };
        Ok(())
    }

    pub fn lm_head(&self, hidden: &Tensor) -> Result<Tensor> {
        on_workers(|| match &self.net {
            Net::Decoder(m) => m.lm_head(hidden),
            Net::Bert(_) => Err(Error::arg("this is an encoder model (BERT): it has no language-model head")),
        })
    }

    pub fn new_cache(&self) -> Cache {
        Cache::new(self.cfg.num_layers)
    }

    /// Logits [B, T, V] (f32) for right-padded sequences; rows past a sequence's length are padding.
    /// With right padding a causal mask is all a real position needs: padding only ever comes after it.
    pub fn logits(&self, seqs: &[Vec<u32>]) -> Result<Tensor> {
        let batch = self.batch(seqs)?;
        let pos = positions(seqs.len(), batch.t, 0, &self.device)?;
        let hidden = self.forward(&batch.ids, &pos, None, &mut self.new_cache())?;
        self.lm_head(&hidden)
    }

    /// Logits [T, V] computed chunk by chunk through the KV cache (chunk sizes must add up to T): the same
    /// numbers as one full pass, which is what incremental decoding relies on.
    pub fn logits_incremental(&self, ids: &[u32], chunks: &[usize]) -> Result<Tensor> {
        self.check_ids(ids, "input")?;
        if chunks.iter().sum::<usize>() != ids.len() || chunks.contains(&0) {
            return Err(Error::arg(format!("chunk sizes {chunks:?} must be positive and add up to {}", ids.len())));
        }
        let mut cache = self.new_cache();
        let mut out = Vec::with_capacity(chunks.len());
        let mut start = 0;
        for &n in chunks {
            let part = Tensor::new(&ids[start..start + n], &self.device)?.unsqueeze(0)?;
            let hidden = self.forward(&part, &positions(1, n, start, &self.device)?, None, &mut cache)?;
            out.push(self.lm_head(&hidden)?.squeeze(0)?);
            start += n;
        }
        Ok(Tensor::cat(&out, 0)?)
    }

    /// For `candlewick check`: the embeddings-plus-blocks residual stream after each block [T, C] (f32), the
    /// final normed hidden state, and the logits [T, V].
    pub fn hidden_states(&self, ids: &[u32]) -> Result<(Vec<Tensor>, Tensor)> {
        self.check_ids(ids, "input")?;
        let t = Tensor::new(ids, &self.device)?.unsqueeze(0)?;
        let mut layers = Vec::new();
        let hidden = self.forward_layers(&t, &positions(1, ids.len(), 0, &self.device)?, None, &mut self.new_cache(), Some(&mut layers), false)?;
        let logits = self.lm_head(&hidden)?.squeeze(0)?;
        let mut out: Vec<Tensor> = layers.iter().map(|l| l.squeeze(0)?.to_dtype(DType::F32)).collect::<candle_core::Result<_>>()?;
        out.push(hidden.squeeze(0)?.to_dtype(DType::F32)?);
        Ok((out, logits))
    }

    /// -log p(x[t+1] | x[..=t]) for t < T-1, in f32.
    pub fn token_nll(&self, ids: &[u32]) -> Result<Vec<f32>> {
        if ids.len() < 2 {
            return Err(Error::arg("token_nll needs at least two tokens"));
        }
        let logits = self.logits(&[ids.to_vec()])?.squeeze(0)?; // [T, V]
        self.nll_of(&logits, ids, 0)
    }

    /// NLL of ids[from+1..] from logits rows [from..T-1].
    fn nll_of(&self, logits: &Tensor, ids: &[u32], from: usize) -> Result<Vec<f32>> {
        let t = ids.len();
        let rows = logits.narrow(0, from, t - 1 - from)?;
        let targets = Tensor::new(&ids[from + 1..], &self.device)?.to_dtype(DType::I64)?;
        let nll = crate::ops::cross_entropy(&rows, &targets, -100, crate::ops::Reduction::None)?;
        Ok(nll.to_vec1()?)
    }

    /// Perplexity exp(mean NLL). Texts longer than the context are scored with a sliding window that moves by
    /// `stride` tokens (default: half the context), each token predicted once with as much left context as the
    /// window allows, as in Hugging Face's perplexity guide.
    pub fn perplexity(&self, ids: &[u32], stride: Option<usize>) -> Result<(f64, usize)> {
        if ids.len() < 2 {
            return Err(Error::arg("perplexity needs at least two tokens"));
        }
        if let Some(bad) = first_out_of_range(ids.iter().map(|&i| i64::from(i)), self.cfg.vocab_size) {
            return Err(Error::arg(format!("token id {bad} is out of range for a vocabulary of {}", self.cfg.vocab_size)));
        }
        let ctx = self.cfg.context_length();
        let stride = stride.unwrap_or((ctx / 2).max(1));
        if stride == 0 || stride > ctx {
            return Err(Error::arg(format!("stride must be between 1 and the context length {ctx}, got {stride}")));
        }
        let (mut total, mut count) = (0f64, 0usize);
        let mut scored_to = 1; // tokens [0, scored_to) have been predicted (token 0 never is)
        let mut begin = 0;
        loop {
            let end = (begin + ctx).min(ids.len());
            let window = &ids[begin..end];
            let logits = self.logits(&[window.to_vec()])?.squeeze(0)?;
            // predict tokens scored_to..end from rows (scored_to - 1 - begin)..; when the window starts at
            // scored_to (stride == context), its first token has no context inside it and is not scored
            let from = scored_to.max(begin + 1) - 1 - begin;
            let nll = self.nll_of(&logits, window, from)?;
            total += nll.iter().map(|&x| x as f64).sum::<f64>();
            count += nll.len();
            scored_to = end;
            if end == ids.len() {
                break;
            }
            begin += stride;
        }
        Ok(((total / count as f64).exp(), count))
    }

    /// BERT: last_hidden_state [B, T, C] and pooled embeddings [B, C] for texts.
    pub fn embed_texts(&self, texts: &[String]) -> Result<(Tensor, Tensor)> {
        let Net::Bert(bert) = &self.net else {
            return Err(Error::arg("embed() needs an encoder model (BERT); this is a decoder"));
        };
        if texts.is_empty() {
            return Err(Error::arg("no texts given"));
        }
        let seqs = self.tokenizer()?.encode_batch(texts, true)?;
        let (ids, mask) = self.pad_with_mask(&seqs)?;
        on_workers(|| {
            let hidden = bert.forward(&ids, &mask)?;
            let emb = bert.pool(&hidden, &mask)?;
            Ok((hidden, emb))
        })
    }

    /// BERT on given ids and attention mask (both [B, T]) -> last_hidden_state [B, T, C].
    pub fn encoder_forward(&self, ids: &Tensor, mask: &Tensor) -> Result<(Tensor, Tensor)> {
        let Net::Bert(bert) = &self.net else {
            return Err(Error::arg("this is a decoder model; use logits()"));
        };
        on_workers(|| {
            let hidden = bert.forward(ids, mask)?;
            let emb = bert.pool(&hidden, mask)?;
            Ok((hidden, emb))
        })
    }

    fn pad_with_mask(&self, seqs: &[Vec<u32>]) -> Result<(Tensor, Tensor)> {
        for (i, s) in seqs.iter().enumerate() {
            self.check_ids(s, &format!("text {i}"))?;
        }
        let t = seqs.iter().map(Vec::len).max().unwrap_or(0);
        let pad = |s: &Vec<u32>, fill: u32, val: Option<u32>| -> Vec<u32> {
            s.iter().map(|&x| val.unwrap_or(x)).chain(std::iter::repeat_n(fill, t - s.len())).collect()
        };
        let ids: Vec<u32> = seqs.iter().flat_map(|s| pad(s, 0, None)).collect();
        let mask: Vec<u32> = seqs.iter().flat_map(|s| pad(s, 0, Some(1))).collect();
        Ok((Tensor::from_vec(ids, (seqs.len(), t), &self.device)?, Tensor::from_vec(mask, (seqs.len(), t), &self.device)?))
    }
}
