//! The architectures: plain structs whose `forward` reads top to bottom, built from the layers in `crate::nn`;
//! what is here is what differs per architecture (the block's wiring and the tensor names of each format).

pub mod bert;
pub mod decoder;

use candle_core::Tensor;

use crate::error::Result;

/// Split [B, T, n·D] into heads [B, n, T, D].
pub fn split_heads(x: &Tensor, n: usize, d: usize) -> Result<Tensor> {
    let (b, t, _) = x.dims3()?;
    Ok(x.reshape((b, t, n, d))?.transpose(1, 2)?.contiguous()?)
}

/// The queries [B, H, T, D] (and the rows of an additive mask [B, 1, T, Tk]) a block needs: all of them, or with
/// `last`, those of the last position only.
pub fn last_rows(last: bool, t: usize, q: Tensor, mask: Option<&Tensor>) -> Result<(Tensor, Option<Tensor>)> {
    if !last || t == 1 {
        return Ok((q, mask.cloned()));
    }
    Ok((q.narrow(2, t - 1, 1)?, mask.map(|m| m.narrow(2, t - 1, 1)).transpose()?))
}

/// Merge heads [B, H, T, D] back into [B, T, H·D].
pub fn merge_heads(x: &Tensor) -> Result<Tensor> {
    let (b, h, t, d) = x.dims4()?;
    Ok(x.transpose(1, 2)?.reshape((b, t, h * d))?)
}
