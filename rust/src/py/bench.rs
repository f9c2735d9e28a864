//! Bench-only hooks (`_native.bench_prefill`, `_native.bench_decode`) for benches/bench_engine.py: they time the
//! engine's own forward passes on synthetic token ids, with the GIL released, so the Python loop adds nothing.

use std::time::Instant;

use candle_core::Tensor;
use pyo3::prelude::*;

use super::model::PyModel;
use super::PyResultExt;
use super::errors::detach;
use crate::model::Model;
use crate::nn::positions;

/// Deterministic pseudo-random ids in [0, vocab) (speed does not depend on them).
fn ids(n: usize, vocab: usize, seed: u64) -> Vec<u32> {
    let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 33) % vocab as u64) as u32
        })
        .collect()
}

/// Prefill `ids` into a fresh cache; returns the cache and the logits of the last position [1, V].
fn prefill(m: &Model, ids: &[u32]) -> crate::Result<(crate::nn::Cache, Tensor)> {
    let mut cache = m.new_cache();
    let t = ids.len();
    let x = Tensor::from_vec(ids.to_vec(), (1, t), &m.device)?;
    let pos = positions(1, t, 0, &m.device)?;
    let hidden = m.forward_last(&x, &pos, None, &mut cache)?; // [1, 1, C]
    let logits = m.lm_head(&hidden)?.squeeze(1)?; // [1, V]
    Ok((cache, logits))
}

/// Seconds to prefill `n_tokens` tokens (one sequence, logits of the last position only, as generation does).
#[pyfunction]
fn bench_prefill(py: Python<'_>, model: PyRef<'_, PyModel>, n_tokens: usize) -> PyResult<f64> {
    let m = &model.inner;
    detach(py, "bench_prefill", || -> crate::Result<f64> {
        let ids = ids(n_tokens, m.cfg.vocab_size, 1);
        let t0 = Instant::now();
        let (_, logits) = prefill(m, &ids)?;
        let _ = logits.argmax(1)?.to_vec1::<u32>()?;
        Ok(t0.elapsed().as_secs_f64())
    })
    .py()
}

/// Seconds to decode `n_tokens` tokens greedily, one at a time with the KV cache, after a `prompt_len`-token
/// prefill (which is not timed).
#[pyfunction]
fn bench_decode(py: Python<'_>, model: PyRef<'_, PyModel>, prompt_len: usize, n_tokens: usize) -> PyResult<f64> {
    let m = &model.inner;
    detach(py, "bench_decode", || -> crate::Result<f64> {
        let prompt = ids(prompt_len, m.cfg.vocab_size, 2);
        let (mut cache, logits) = prefill(m, &prompt)?;
        let mut next = logits.argmax(1)?.to_vec1::<u32>()?[0];
        let t0 = Instant::now();
        for i in 0..n_tokens {
            let x = Tensor::from_vec(vec![next], (1, 1), &m.device)?;
            let pos = positions(1, 1, prompt_len + i, &m.device)?;
            let hidden = m.forward(&x, &pos, None, &mut cache)?; // [1, 1, C]
            let logits = m.lm_head(&hidden)?.squeeze(1)?; // [1, V]
            next = logits.argmax(1)?.to_vec1::<u32>()?[0];
        }
        Ok(t0.elapsed().as_secs_f64())
    })
    .py()
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(bench_prefill, m)?)?;
    m.add_function(wrap_pyfunction!(bench_decode, m)?)?;
    Ok(())
}
