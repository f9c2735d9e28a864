//! RMSNorm and LayerNorm with their weights.

use candle_core::Tensor;

use crate::error::Result;
use crate::ops;

/// RMSNorm (a weight) or LayerNorm (a weight and a bias) over the last dimension.
#[derive(Debug, Clone)]
pub struct Norm {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    pub eps: f64,
}

impl Norm {
    pub fn rms(weight: Tensor, eps: f64) -> Self {
        Self { weight, bias: None, eps }
    }

    pub fn layer(weight: Tensor, bias: Tensor, eps: f64) -> Self {
        Self { weight, bias: Some(bias), eps }
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match &self.bias {
            Some(b) => ops::layer_norm(x, &self.weight, b, self.eps),
            None => ops::rms_norm(x, &self.weight, self.eps),
        }
    }
}
