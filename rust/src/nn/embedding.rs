//! Token and position lookups.

use std::sync::Arc;

use candle_core::{Device, Tensor};

use crate::error::Result;
use crate::kernels::dense::Panels;
use crate::kernels::quant::QWeight;

/// A token embedding table [V, C]: dense, or in a GGUF file's own block format, whose rows are dequantized as
/// they are looked up (so a 49152 x 576 Q8_0 table stays 30 MB instead of 113 MB of f32). A tied table shares
/// its blocks with the output projection. `scale` multiplies each row (Gemma's sqrt(C)).
pub enum Table {
    Dense(Tensor),
    Blocks { w: Arc<QWeight>, scale: Option<f64>, device: Device },
    /// a tied table read from the output projection's panels (their width is the checkpoint's own, or f32)
    Panels { p: Arc<Panels>, scale: Option<f64>, device: Device },
}

impl Table {
    pub fn device(&self) -> &Device {
        match self {
            Table::Dense(t) => t.device(),
            Table::Blocks { device, .. } | Table::Panels { device, .. } => device,
        }
    }

    /// ids [B, T] (u32) -> [B, T, C] (f32 for block tables)
    pub fn lookup(&self, ids: &Tensor) -> Result<Tensor> {
        match self {
            Table::Dense(t) => embed(t, ids),
            Table::Blocks { w, scale, device } => rows_lookup(ids, w.out(), w.inp(), *scale, device, |r| w.dequantize_rows(r)),
            Table::Panels { p, scale, device } => rows_lookup(ids, p.n(), p.k(), *scale, device, |r| p.rows_f32(r)),
        }
    }
}

/// ids [B, T] -> [B, T, C] f32 from `get` (rows -> [rows, C]), ids checked against `vocab`, rows times `scale`.
fn rows_lookup(
    ids: &Tensor,
    vocab: usize,
    c: usize,
    scale: Option<f64>,
    device: &Device,
    get: impl Fn(&[u32]) -> Vec<f32>,
) -> Result<Tensor> {
    let (b, t) = ids.dims2()?;
    let rows: Vec<u32> = ids.flatten_all()?.to_vec1()?;
    if let Some(bad) = rows.iter().find(|&&r| r as usize >= vocab) {
        return Err(crate::error::Error::arg(format!("token id {bad} is out of range for a vocabulary of {vocab}")));
    }
    let mut x = get(&rows);
    if let Some(s) = scale {
        // as the dense table's `table * s` computes it, in f32
        let s = s as f32;
        x.iter_mut().for_each(|v| *v *= s);
    }
    Ok(Tensor::from_vec(x, (b, t, c), device)?)
}

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

