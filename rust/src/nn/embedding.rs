//! Token and position lookups.

use candle_core::{Device, Tensor};

use crate::error::Result;

/// Positions [B, T] (u32) for a batch whose rows all start at `start`.
pub fn positions(b: usize, t: usize, start: usize, device: &Device) -> Result<Tensor> {
    let p: Vec<u32> = (0..b).flat_map(|_| (start..start + t).map(|x| x as u32)).collect();
    Ok(Tensor::from_vec(p, (b, t), device)?)
}

/// Embedding lookup: table [V, C], ids [B, T] -> [B, T, C].
pub fn embed(table: &Tensor, ids: &Tensor) -> Result<Tensor> {
    let (b, t) = ids.dims2()?;
    let c = table.dims()[1];
    Ok(table.index_select(&ids.flatten_all()?, 0)?.reshape((b, t, c))?)
}

