//! Projections whose weights are either dense (`Linear`) or quantized (GGUF blocks, Candle's `QMatMul`).

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Module, Tensor};

use crate::error::{Error, Result};
use crate::linear::Linear;
use crate::qkernels::QWeight;

pub enum Proj {
    Dense(Linear),
    /// Q4_0 / Q4_1 / Q8_0 on the CPU: our kernels (qkernels.rs)
    Blocks(QWeight, Option<Tensor>),
    /// quantized weight [out, in] (llama.cpp's kernels: Q4_0 ... Q8_0, K-quants), optional f32 bias
    Quant(QMatMul, Option<Tensor>),
    /// projections of the same input whose weights could not be stored as one matrix (different formats):
    /// their outputs side by side
    Split(Vec<Proj>),
}

impl Proj {
    /// x [..., in] (f32) -> [..., out]
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Proj::Dense(l) => l.forward(x),
            Proj::Blocks(w, bias) => {
                let y = w.forward(&x.to_dtype(DType::F32)?)?;
                Ok(match bias {
                    Some(b) => y.broadcast_add(b)?,
                    None => y,
                })
            }
            Proj::Quant(q, bias) => {
                let y = q.forward(&x.to_dtype(DType::F32)?)?;
                Ok(match bias {
                    Some(b) => y.broadcast_add(b)?,
                    None => y,
                })
            }
            Proj::Split(parts) => {
                let ys = parts.iter().map(|p| p.forward(x)).collect::<Result<Vec<_>>>()?;
                Ok(Tensor::cat(&ys, x.rank() - 1)?)
            }
        }
    }

    pub fn out_features(&self) -> usize {
        match self {
            Proj::Dense(l) => l.out_features(),
            Proj::Blocks(w, _) => w.out(),
            Proj::Quant(q, _) => match q {
                QMatMul::QTensor(t) => t.shape().dims()[0],
                QMatMul::Tensor(t) | QMatMul::TensorF16(t) => t.dims()[0],
            },
            Proj::Split(parts) => parts.iter().map(Proj::out_features).sum(),
        }
    }

    /// Projections of the same input as one, outputs side by side along the last dimension (q/k/v, gate/up):
    /// one pass over the input and one parallel region instead of several. Blocks of one format are stored as one
    /// matrix; anything else runs part by part.
    pub fn fuse(parts: Vec<Proj>) -> Result<Proj> {
        if parts.len() == 1 {
            return Ok(parts.into_iter().next().unwrap());
        }
        let blocks: Vec<(&QWeight, &Option<Tensor>)> = parts
            .iter()
            .filter_map(|p| match p {
                Proj::Blocks(w, b) => Some((w, b)),
                _ => None,
            })
            .collect();
        if blocks.len() == parts.len() {
            if let Some(w) = QWeight::concat(&blocks.iter().map(|(w, _)| *w).collect::<Vec<_>>()) {
                let bias = if blocks.iter().any(|(_, b)| b.is_some()) {
                    let bs = blocks
                        .iter()
                        .map(|(w, b)| match b {
                            Some(b) => Ok(b.to_dtype(DType::F32)?),
                            None => Ok(Tensor::zeros(w.out(), DType::F32, &candle_core::Device::Cpu)?),
                        })
                        .collect::<Result<Vec<_>>>()?;
                    Some(Tensor::cat(&bs, 0)?)
                } else {
                    None
                };
                return Ok(Proj::Blocks(w, bias));
            }
        }
        let dense: Vec<&Linear> = parts
            .iter()
            .filter_map(|p| match p {
                Proj::Dense(l) => Some(l),
                _ => None,
            })
            .collect();
        if dense.len() == parts.len() && dense.iter().all(|l| l.weight().dtype() == dense[0].weight().dtype()) {
            let w = Tensor::cat(&dense.iter().map(|l| l.weight()).collect::<Vec<_>>(), 0)?;
            let bias = if dense.iter().any(|l| l.bias().is_some()) {
                let bs = dense
                    .iter()
                    .map(|l| match l.bias() {
                        Some(b) => Ok(b.to_dtype(DType::F32)?),
                        None => Ok(Tensor::zeros(l.out_features(), DType::F32, w.device())?),
                    })
                    .collect::<Result<Vec<_>>>()?;
                Some(Tensor::cat(&bs, 0)?)
            } else {
                None
            };
            return Ok(Proj::Dense(Linear::new(w, bias)?));
        }
        Ok(Proj::Split(parts))
    }

    pub fn from_qtensor(q: QTensor, bias: Option<Tensor>) -> Result<Self> {
        if let Some(w) = QWeight::from_qtensor(&q)? {
            return Ok(Proj::Blocks(w, bias));
        }
        // unquantized F32/F16/BF16 tensors on the CPU: the dense kernels (threaded matrix-vector products, GEMM
        // for prefill, the weight kept at its width); Candle's matmul would run one thread at batch 1
        let dense = match q.dtype() {
            GgmlDType::F32 => Some(DType::F32),
            GgmlDType::F16 => Some(DType::F16),
            GgmlDType::BF16 => Some(DType::BF16),
            _ => None,
        };
        if let (Some(dt), true) = (dense, q.device().is_cpu()) {
            // exact: widening to f32 and back to the file's width
            let w = q.dequantize(&candle_core::Device::Cpu)?.to_dtype(dt)?;
            return Ok(Proj::Dense(Linear::new(w, bias)?));
        }
        Ok(Proj::Quant(QMatMul::from_qtensor(q)?, bias))
    }

    /// Quantize a dense [out, in] weight at load time (dtype="q8_0" and friends).
    pub fn quantize(weight: &Tensor, bias: Option<Tensor>, q: GgmlDType) -> Result<Self> {
        let inp = weight.dims()[1];
        if inp % q.block_size() != 0 {
            return Err(Error::arg(format!(
                "cannot quantize a weight with {inp} input features to {q:?}: not a multiple of its block of {}",
                q.block_size()
            )));
        }
        Self::from_qtensor(QTensor::quantize(&weight.to_dtype(DType::F32)?, q)?, bias)
    }
}

/// Quantized dtypes accepted by `load(..., dtype=...)`.
pub fn parse_qdtype(name: &str) -> Option<GgmlDType> {
    Some(match name.to_ascii_lowercase().as_str() {
        "q4_0" => GgmlDType::Q4_0,
        "q4_1" => GgmlDType::Q4_1,
        "q5_0" => GgmlDType::Q5_0,
        "q5_1" => GgmlDType::Q5_1,
        "q8_0" => GgmlDType::Q8_0,
        "q2_k" => GgmlDType::Q2K,
        "q3_k" => GgmlDType::Q3K,
        "q4_k" => GgmlDType::Q4K,
        "q5_k" => GgmlDType::Q5K,
        "q6_k" => GgmlDType::Q6K,
        _ => return None,
    })
}
