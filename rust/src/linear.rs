//! y = x·Wᵀ + b with W stored [out, in] as in PyTorch checkpoints.

use candle_core::{DType, Tensor};

use crate::error::Result;

#[derive(Debug, Clone)]
pub struct Linear {
    /// [out, in]; f32, bf16 or f16 (on CPU, activations stay f32 whatever the weight dtype)
    weight: Tensor,
    /// [out]
    bias: Option<Tensor>,
}

impl Linear {
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Result<Self> {
        Ok(Self { weight: weight.contiguous()?, bias })
    }

    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    pub fn out_features(&self) -> usize {
        self.weight.dims()[0]
    }

    /// x [..., in] -> [..., out]
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let w = if self.weight.dtype() == x.dtype() { self.weight.clone() } else { self.weight.to_dtype(x.dtype())? };
        let y = x.broadcast_matmul(&w.t()?)?;
        Ok(match &self.bias {
            Some(b) => y.broadcast_add(&b.to_dtype(y.dtype())?)?,
            None => y,
        })
    }
}

/// The activation dtype for weights of `dtype` on `device`: CPU computes in f32 (its matmuls have no bf16).
pub fn compute_dtype(dtype: DType, device: &candle_core::Device) -> DType {
    if device.is_cpu() { DType::F32 } else { dtype }
}
