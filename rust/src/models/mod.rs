//! The architectures: plain structs whose `forward` reads top to bottom.

pub mod bert;
pub mod gpt2;
pub mod llama;

use candle_core::{Device, Tensor};

use crate::error::Result;

/// Keys and values of every layer for the tokens seen so far: [B, Hkv, T, D] each.
#[derive(Debug, Clone, Default)]
pub struct Cache {
    pub layers: Vec<Option<(Tensor, Tensor)>>,
}

impl Cache {
    pub fn new(num_layers: usize) -> Self {
        Self { layers: vec![None; num_layers] }
    }

    /// Tokens already cached.
    pub fn len(&self) -> usize {
        match self.layers.first() {
            Some(Some((k, _))) => k.dims()[2],
            _ => 0,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Append this step's k, v [B, Hkv, T, D] to layer `i`; returns all keys and values so far.
    pub fn append(&mut self, i: usize, k: Tensor, v: Tensor) -> Result<(Tensor, Tensor)> {
        let kv = match self.layers[i].take() {
            None => (k, v),
            Some((pk, pv)) => (Tensor::cat(&[&pk, &k], 2)?, Tensor::cat(&[&pv, &v], 2)?),
        };
        self.layers[i] = Some(kv.clone());
        Ok(kv)
    }

    /// Keep only batch rows `rows` (in that order), e.g. to fan one prefilled prompt out to n choices.
    pub fn select_rows(&self, rows: &[u32]) -> Result<Self> {
        let mut out = Self::new(self.layers.len());
        for (i, l) in self.layers.iter().enumerate() {
            if let Some((k, v)) = l {
                let idx = Tensor::new(rows, k.device())?;
                out.layers[i] = Some((k.index_select(&idx, 0)?, v.index_select(&idx, 0)?));
            }
        }
        Ok(out)
    }
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

/// Split [B, T, n·D] into heads [B, n, T, D].
pub fn split_heads(x: &Tensor, n: usize, d: usize) -> Result<Tensor> {
    let (b, t, _) = x.dims3()?;
    Ok(x.reshape((b, t, n, d))?.transpose(1, 2)?.contiguous()?)
}

/// Merge heads [B, H, T, D] back into [B, T, H·D].
pub fn merge_heads(x: &Tensor) -> Result<Tensor> {
    let (b, h, t, d) = x.dims4()?;
    Ok(x.transpose(1, 2)?.reshape((b, t, h * d))?)
}
