//! BERT encoder: word + position + token-type embeddings, post-LayerNorm blocks, exact GELU; then
//! sentence-transformers pooling (1_Pooling/config.json) and L2 normalisation (modules.json).

use std::path::Path;

use candle_core::{DType, Device, Tensor};

use super::{merge_heads, split_heads};
use crate::nn::{embed, positions, Linear, Norm};
use crate::config::Config;
use crate::error::{Error, Result};
use crate::ops;
use crate::weights::Weights;

struct Layer {
    query: Linear,
    key: Linear,
    value: Linear,
    attn_out: Linear,
    attn_norm: Norm,
    intermediate: Linear,
    output: Linear,
    out_norm: Norm,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pooling {
    Mean,
    Cls,
    Max,
}

pub struct Bert {
    pub cfg: Config,
    word: Tensor,
    position: Tensor,
    token_type: Tensor,
    emb_norm: Norm,
    layers: Vec<Layer>,
    pub pooling: Pooling,
    pub normalize: bool,
    act: DType,
}

/// Pooling mode and normalisation from a sentence-transformers folder (mean pooling + normalise by default).
fn pooling_of(dir: &Path) -> Result<(Pooling, bool)> {
    let mut pooling = Pooling::Mean;
    let pcfg = dir.join("1_Pooling").join("config.json");
    if pcfg.is_file() {
        let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&pcfg).map_err(|e| Error::load(&pcfg, e))?)
            .map_err(|e| Error::load(&pcfg, format!("not valid JSON: {e}")))?;
        let on = |k: &str| v.get(k).and_then(|x| x.as_bool()).unwrap_or(false);
        pooling = if on("pooling_mode_cls_token") {
            Pooling::Cls
        } else if on("pooling_mode_max_tokens") {
            Pooling::Max
        } else if on("pooling_mode_mean_tokens") {
            Pooling::Mean
        } else {
            return Err(Error::load(&pcfg, "no supported pooling mode (mean, cls or max tokens) is enabled"));
        };
    }
    let modules = dir.join("modules.json");
    let normalize = if modules.is_file() {
        std::fs::read_to_string(&modules).map_err(|e| Error::load(&modules, e))?.contains("sentence_transformers.models.Normalize")
    } else {
        true
    };
    Ok((pooling, normalize))
}

impl Bert {
    pub fn load(cfg: &Config, w: &Weights, dtype: DType, device: &Device, dir: &Path) -> Result<Self> {
        let act = crate::nn::compute_dtype(dtype, device);
        let (c, f) = (cfg.hidden_size, cfg.intermediate_size);
        let norm = |n: &str| -> Result<Norm> {
            Ok(Norm::layer(w.get(&format!("{n}.weight"), &[c], act)?, w.get(&format!("{n}.bias"), &[c], act)?, cfg.norm_eps))
        };
        let lin = |n: &str, out: usize, inp: usize| -> Result<Linear> {
            Linear::dense(w.get(&format!("{n}.weight"), &[out, inp], dtype)?, Some(w.get(&format!("{n}.bias"), &[out], act)?))
        };
        let mut layers = Vec::with_capacity(cfg.num_layers);
        for i in 0..cfg.num_layers {
            let p = format!("encoder.layer.{i}");
            layers.push(Layer {
                query: lin(&format!("{p}.attention.self.query"), c, c)?,
                key: lin(&format!("{p}.attention.self.key"), c, c)?,
                value: lin(&format!("{p}.attention.self.value"), c, c)?,
                attn_out: lin(&format!("{p}.attention.output.dense"), c, c)?,
                attn_norm: norm(&format!("{p}.attention.output.LayerNorm"))?,
                intermediate: lin(&format!("{p}.intermediate.dense"), f, c)?,
                output: lin(&format!("{p}.output.dense"), c, f)?,
                out_norm: norm(&format!("{p}.output.LayerNorm"))?,
            });
        }
        let (pooling, normalize) = pooling_of(dir)?;
        Ok(Self {
            cfg: cfg.clone(),
            word: w.get("embeddings.word_embeddings.weight", &[cfg.vocab_size, c], act)?,
            position: w.get("embeddings.position_embeddings.weight", &[cfg.max_position_embeddings, c], act)?,
            token_type: w.get("embeddings.token_type_embeddings.weight", &[cfg.type_vocab_size, c], act)?,
            emb_norm: norm("embeddings.LayerNorm")?,
            layers,
            pooling,
            normalize,
            act,
        })
    }

    /// ids [B, T], attention_mask [B, T] (1 = token, 0 = padding) -> last_hidden_state [B, T, C].
    pub fn forward(&self, ids: &Tensor, attention_mask: &Tensor) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let (h, c) = (self.cfg.num_heads, self.cfg.hidden_size);
        let d = c / h;
        let pos = positions(b, t, 0, ids.device())?;
        let types = Tensor::zeros((b, t), DType::U32, ids.device())?;
        let x = ((embed(&self.word, ids)? + embed(&self.position, &pos)?)? + embed(&self.token_type, &types)?)?;
        let mut x = self.emb_norm.forward(&x)?;
        let mask = attention_mask.reshape((b, 1, 1, t))?; // keys that are padding get -inf
        for l in &self.layers {
            let q = split_heads(&l.query.forward(&x)?, h, d)?;
            let k = split_heads(&l.key.forward(&x)?, h, d)?;
            let v = split_heads(&l.value.forward(&x)?, h, d)?;
            let y = ops::attention(&q, &k, &v, false, Some(&mask), None)?;
            x = l.attn_norm.forward(&(x + l.attn_out.forward(&merge_heads(&y)?)?)?)?;
            let m = ops::gelu(&l.intermediate.forward(&x)?, ops::Gelu::Erf)?;
            x = l.out_norm.forward(&(x + l.output.forward(&m)?)?)?;
        }
        Ok(x.to_dtype(DType::F32)?)
    }

    /// Sentence embeddings [B, C] from last_hidden_state [B, T, C] and the attention mask [B, T].
    pub fn pool(&self, hidden: &Tensor, attention_mask: &Tensor) -> Result<Tensor> {
        let m = attention_mask.to_dtype(DType::F32)?.unsqueeze(2)?; // [B, T, 1]
        let pooled = match self.pooling {
            Pooling::Cls => hidden.narrow(1, 0, 1)?.squeeze(1)?,
            Pooling::Mean => hidden.broadcast_mul(&m)?.sum(1)?.broadcast_div(&m.sum(1)?.clamp(1e-9, f64::INFINITY)?)?,
            Pooling::Max => {
                let neg = ((m.ones_like()? - &m)? * -1e9)?;
                hidden.broadcast_add(&neg)?.max(1)?
            }
        };
        Ok(if self.normalize {
            let norm = pooled.sqr()?.sum_keepdim(1)?.sqrt()?.clamp(1e-12, f64::INFINITY)?;
            pooled.broadcast_div(&norm)?
        } else {
            pooled
        })
    }

    pub fn act_dtype(&self) -> DType {
        self.act
    }
}
