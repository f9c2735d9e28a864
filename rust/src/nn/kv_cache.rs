//! The KV cache: keys and values of every layer for the tokens seen so far.

use candle_core::Tensor;

use crate::error::Result;

/// Keys and values of every layer for the tokens seen so far: [B, Hkv, T, D] each.
///
/// After the first step a layer's keys and values live in buffers with room to spare (twice what is needed,
/// grown by doubling), and `layers` holds views of their first T positions: a decoding step writes its one new
/// position in place instead of copying the whole cache. Only the cache that made a buffer writes into it, and only
/// past its own length, so views held elsewhere (a clone, a returned tensor) never change; a clone starts without
/// spare room and makes its own buffers when it grows.
#[derive(Debug)]
pub struct Cache {
    pub layers: Vec<Option<(Tensor, Tensor)>>,
    /// per layer: the buffers [B, Hkv, capacity, D] that `layers` views, when this cache owns them
    spare: Vec<Option<(Tensor, Tensor)>>,
}

impl Clone for Cache {
    fn clone(&self) -> Self {
        Self { layers: self.layers.clone(), spare: vec![None; self.layers.len()] }
    }
}

impl Cache {
    pub fn new(num_layers: usize) -> Self {
        Self { layers: vec![None; num_layers], spare: vec![None; num_layers] }
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
        let Some((pk, pv)) = self.layers[i].take() else {
            // a first step (a prefill) keeps its tensors as they are: most are never extended
            self.layers[i] = Some((k.clone(), v.clone()));
            return Ok((k, v));
        };
        let (len, t) = (pk.dims()[2], k.dims()[2]);
        let fits = match &self.spare[i] {
            Some((bk, _)) => bk.dims()[2] >= len + t && bk.dims()[..2] == k.dims()[..2] && bk.dtype() == k.dtype(),
            None => false,
        };
        if !fits {
            let cap = (2 * (len + t)).next_multiple_of(64);
            let grow = |p: &Tensor| -> Result<Tensor> {
                let mut dims = p.dims().to_vec();
                dims[2] = cap;
                let buf = Tensor::zeros(dims, p.dtype(), p.device())?;
                buf.slice_set(&p.contiguous()?, 2, 0)?;
                Ok(buf)
            };
            self.spare[i] = Some((grow(&pk)?, grow(&pv)?));
        }
        let (bk, bv) = self.spare[i].as_ref().expect("made above");
        bk.slice_set(&k.contiguous()?, 2, len)?;
        bv.slice_set(&v.contiguous()?, 2, len)?;
        let kv = (bk.narrow(2, 0, len + t)?, bv.narrow(2, 0, len + t)?);
        self.layers[i] = Some(kv.clone());
        Ok(kv)
    }

    /// Keep only batch rows `rows` (in that order), e.g. to fan one prefilled prompt out to n choices.
    pub fn select_rows(&self, rows: &[u32]) -> Result<Self> {
        let mut out = Self::new(self.layers.len());
        for (i, l) in self.layers.iter().enumerate() {
            if let Some((k, v)) = l {
                let idx = Tensor::new(rows, k.device())?;
                // (k and v may be views into buffers with room to spare: index_select wants contiguous data)
                out.layers[i] = Some((k.contiguous()?.index_select(&idx, 0)?, v.contiguous()?.index_select(&idx, 0)?));
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn same(a: &Tensor, b: &Tensor) -> bool {
        a.dims() == b.dims() && a.flatten_all().unwrap().to_vec1::<f32>().unwrap() == b.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    }

    /// Appending in place gives what concatenation gives, through several growths of the buffers, and a clone
    /// taken midway (as n choices of one prompt are) keeps its own contents while both go on growing.
    #[test]
    fn cache_appends_in_place_and_clones_stay_apart() {
        let dev = Device::Cpu;
        let step = |t: usize, seed: f64| Tensor::arange(0f32, (2 * 3 * t * 4) as f32, &dev).unwrap().affine(1.0, seed).unwrap().reshape((2, 3, t, 4)).unwrap();
        let mut a = Cache::new(1);
        let mut want = step(5, 0.0);
        a.append(0, want.clone(), want.clone()).unwrap();
        let mut b = None;
        let mut want_b = None;
        for s in 1..200 {
            let x = step(1 + s % 3, s as f64);
            want = Tensor::cat(&[&want, &x], 2).unwrap();
            let (k, v) = a.append(0, x.clone(), x.clone()).unwrap();
            assert!(same(&k, &want) && same(&v, &want), "step {s}");
            if s == 20 {
                b = Some(a.clone());
                want_b = Some(want.clone());
            }
            if let (Some(b), Some(wb)) = (b.as_mut(), want_b.as_mut()) {
                let y = (x * -1.0).unwrap();
                *wb = Tensor::cat(&[&*wb, &y], 2).unwrap();
                let (k, _) = b.append(0, y.clone(), y).unwrap();
                assert!(same(&k, wb), "clone, step {s}");
            }
        }
        assert_eq!(a.len(), want.dims()[2]);
        let (k, _) = a.layers[0].as_ref().unwrap();
        assert!(same(k, &want));
        // rows leave the batch (as finished generations do) from views into the buffers
        let kept = a.select_rows(&[1]).unwrap();
        let (k, _) = kept.layers[0].as_ref().unwrap();
        assert!(same(k, &want.narrow(0, 1, 1).unwrap()));
    }
}
