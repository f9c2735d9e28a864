//! GPT-2: learned positions, pre-LayerNorm blocks, fused qkv projection, GELU (tanh) MLP, tied head.
//! Its checkpoints store linear weights "Conv1D"-style as [in, out]; they are transposed once at load.

use candle_core::{DType, Device, Tensor};

use super::{embed, last_rows, merge_heads, split_heads, Cache};
use crate::config::Config;
use crate::error::Result;
use crate::gguf::Gguf;
use crate::linear::Linear;
use crate::quantized::Proj;
use crate::ops;
use crate::weights::Weights;

struct Norm {
    weight: Tensor,
    bias: Tensor,
}

struct Block {
    ln_1: Norm,
    c_attn: Proj, // [3C, C]
    attn_c_proj: Proj,
    ln_2: Norm,
    c_fc: Proj,
    mlp_c_proj: Proj,
}

pub struct Gpt2 {
    pub cfg: Config,
    wte: Tensor, // [V, C]
    wpe: Tensor, // [P, C]
    blocks: Vec<Block>,
    ln_f: Norm,
    lm_head: Proj,
    act: DType,
    approximate_gelu: bool,
}

impl Gpt2 {
    pub fn load(cfg: &Config, w: &Weights, dtype: DType, device: &Device) -> Result<Self> {
        let act = crate::linear::compute_dtype(dtype, device);
        let (c, f) = (cfg.hidden_size, cfg.intermediate_size);
        let norm = |n: &str| -> Result<Norm> {
            Ok(Norm { weight: w.get(&format!("{n}.weight"), &[c], act)?, bias: w.get(&format!("{n}.bias"), &[c], act)? })
        };
        // Conv1D: weight [in, out] in the file, stored here as [out, in].
        let conv1d = |n: &str, inp: usize, out: usize| -> Result<Proj> {
            let wt = w.get(&format!("{n}.weight"), &[inp, out], dtype)?.t()?.contiguous()?;
            Ok(Proj::Dense(Linear::new(wt, Some(w.get(&format!("{n}.bias"), &[out], act)?))?))
        };
        let mut blocks = Vec::with_capacity(cfg.num_layers);
        for i in 0..cfg.num_layers {
            let p = format!("h.{i}");
            blocks.push(Block {
                ln_1: norm(&format!("{p}.ln_1"))?,
                c_attn: conv1d(&format!("{p}.attn.c_attn"), c, 3 * c)?,
                attn_c_proj: conv1d(&format!("{p}.attn.c_proj"), c, c)?,
                ln_2: norm(&format!("{p}.ln_2"))?,
                c_fc: conv1d(&format!("{p}.mlp.c_fc"), c, f)?,
                mlp_c_proj: conv1d(&format!("{p}.mlp.c_proj"), f, c)?,
            });
        }
        let head = if w.contains("lm_head.weight") && !cfg.tie_word_embeddings { "lm_head.weight" } else { "wte.weight" };
        let lm_head = Proj::Dense(Linear::new(w.get(head, &[cfg.vocab_size, c], dtype)?, None)?);
        let approximate_gelu = match crate::config::activation(&cfg.hidden_act, "config.json")? {
            crate::config::Act::Gelu => false,
            crate::config::Act::GeluTanh => true,
            crate::config::Act::Silu => {
                return Err(crate::error::Error::ModelLoad("gpt2: activation_function silu is not implemented".into()))
            }
        };
        Ok(Self {
            cfg: cfg.clone(),
            wte: w.get("wte.weight", &[cfg.vocab_size, c], act)?,
            wpe: w.get("wpe.weight", &[cfg.max_position_embeddings, c], act)?,
            blocks,
            ln_f: norm("ln_f")?,
            lm_head,
            act,
            approximate_gelu,
        })
    }

    /// From a GGUF file (llama.cpp names: token_embd, position_embd, blk.N.attn_qkv, ...; weights [out, in]).
    pub fn load_gguf(cfg: &Config, g: &Gguf, device: &Device) -> Result<Self> {
        let (c, f) = (cfg.hidden_size, cfg.intermediate_size);
        let norm = |n: &str| -> Result<Norm> {
            Ok(Norm { weight: g.dense(&format!("{n}.weight"), &[c], device)?, bias: g.dense(&format!("{n}.bias"), &[c], device)? })
        };
        let proj = |n: &str, out: usize, inp: usize| -> Result<Proj> {
            let bias = g.dense(&format!("{n}.bias"), &[out], device)?;
            Proj::from_qtensor(g.qtensor(&format!("{n}.weight"), &[out, inp], device)?, Some(bias))
        };
        let mut blocks = Vec::with_capacity(cfg.num_layers);
        for i in 0..cfg.num_layers {
            let p = format!("blk.{i}");
            blocks.push(Block {
                ln_1: norm(&format!("{p}.attn_norm"))?,
                c_attn: proj(&format!("{p}.attn_qkv"), 3 * c, c)?,
                attn_c_proj: proj(&format!("{p}.attn_output"), c, c)?,
                ln_2: norm(&format!("{p}.ffn_norm"))?,
                c_fc: proj(&format!("{p}.ffn_up"), f, c)?,
                mlp_c_proj: proj(&format!("{p}.ffn_down"), c, f)?,
            });
        }
        let head = if g.has_tensor("output.weight") { "output.weight" } else { "token_embd.weight" };
        Ok(Self {
            cfg: cfg.clone(),
            wte: g.dense("token_embd.weight", &[cfg.vocab_size, c], device)?,
            wpe: g.dense("position_embd.weight", &[cfg.max_position_embeddings, c], device)?,
            blocks,
            ln_f: norm("output_norm")?,
            lm_head: Proj::from_qtensor(g.qtensor(head, &[cfg.vocab_size, c], device)?, None)?,
            act: DType::F32,
            approximate_gelu: true,
        })
    }

    /// ids [B, T], positions [B, T] -> final hidden states [B, T, C] (see `Llama::forward`).
    pub fn forward(
        &self,
        ids: &Tensor,
        positions: &Tensor,
        mask: Option<&Tensor>,
        cache: &mut Cache,
        mut layers_out: Option<&mut Vec<Tensor>>,
        last_only: bool,
    ) -> Result<Tensor> {
        let (h, c) = (self.cfg.num_heads, self.cfg.hidden_size);
        let t = ids.dims2()?.1;
        let d = c / h;
        let mut x = (embed(&self.wte, ids)? + embed(&self.wpe, positions)?)?; // [B, T, C]
        for (i, blk) in self.blocks.iter().enumerate() {
            let last = last_only && i + 1 == self.blocks.len();
            let hn = ops::layer_norm(&x, &blk.ln_1.weight, &blk.ln_1.bias, self.cfg.norm_eps)?;
            let qkv = blk.c_attn.forward(&hn)?; // [B, T, 3C]
            let q = split_heads(&qkv.narrow(2, 0, c)?, h, d)?;
            let k = split_heads(&qkv.narrow(2, c, c)?, h, d)?;
            let v = split_heads(&qkv.narrow(2, 2 * c, c)?, h, d)?;
            let (k, v) = cache.append(i, k, v)?;
            let (q, mask_q) = last_rows(last, t, q, mask)?;
            // scores · 1/√D (scale_attn_weights), and / (i + 1) with scale_attn_by_inverse_layer_idx
            let scale = self.cfg.attn_scale / if self.cfg.attn_scale_by_layer { (i + 1) as f64 } else { 1.0 };
            let y = ops::attention(&q, &k, &v, mask.is_none(), mask_q.as_ref(), Some(scale))?;
            if last {
                x = x.narrow(1, t - 1, 1)?;
            }
            x = (x + blk.attn_c_proj.forward(&merge_heads(&y)?)?)?;
            let hn = ops::layer_norm(&x, &blk.ln_2.weight, &blk.ln_2.bias, self.cfg.norm_eps)?;
            let m = ops::gelu(&blk.c_fc.forward(&hn)?, self.approximate_gelu)?;
            x = (x + blk.mlp_c_proj.forward(&m)?)?;
            if let Some(out) = layers_out.as_deref_mut() {
                out.push(x.clone());
            }
        }
        ops::layer_norm(&x, &self.ln_f.weight, &self.ln_f.bias, self.cfg.norm_eps)
    }

    pub fn lm_head(&self, hidden: &Tensor) -> Result<Tensor> {
        Ok(self.lm_head.forward(hidden)?.to_dtype(DType::F32)?)
    }

    pub fn act_dtype(&self) -> DType {
        self.act
    }
}
