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
        }
    }

    pub fn from_qtensor(q: QTensor, bias: Option<Tensor>) -> Result<Self> {
        if let Some(w) = QWeight::from_qtensor(&q)? {
            return Ok(Proj::Blocks(w, bias));
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
