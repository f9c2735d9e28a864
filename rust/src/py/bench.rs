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

/// The next state of a 64-bit linear congruential generator (Knuth's MMIX constants).
fn lcg(s: u64) -> u64 {
    s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407)
}

/// Deterministic pseudo-random ids in [0, vocab) (speed does not depend on them).
fn ids(n: usize, vocab: usize, seed: u64) -> Vec<u32> {
    let mut s = lcg(seed);
    (0..n)
        .map(|_| {
            s = lcg(s);
            ((s >> 33) % vocab as u64) as u32
        })
        .collect()
}

/// Seconds for `reps` runs of `f` on the pool's threads, after one run not timed.
fn timed<R>(reps: usize, mut f: impl FnMut() -> crate::Result<R> + Send) -> crate::Result<f64> {
    crate::device::on_workers(|| -> crate::Result<f64> {
        std::hint::black_box(f()?);
        let t0 = Instant::now();
        for _ in 0..reps {
            std::hint::black_box(f()?);
        }
        Ok(t0.elapsed().as_secs_f64())
    })
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

/// Seconds for `reps` matrix-vector products y = W·x with W [out, inp] in a GGUF block format ("Q4_1", "Q8_0",
/// ...) or dense ("F32", "BF16", "F16"), by the kernels decode uses (every thread of the pool, as in decode); the
/// weights are random. With a matrix the size of a model, this is the streaming rate decode can hope for.
/// `rows` > 1: a product of that many activation rows (a batch of decoding sequences, or a prompt chunk).
#[pyfunction]
#[pyo3(signature = (format, out, inp, reps, rows = 1))]
fn bench_matvec(py: Python<'_>, format: &str, out: usize, inp: usize, reps: usize, rows: usize) -> PyResult<f64> {
    use candle_core::quantized::{GgmlDType, QTensor};
    use candle_core::{DType, Device};
    let dense = match format {
        "F32" => Some(DType::F32),
        "BF16" => Some(DType::BF16),
        "F16" => Some(DType::F16),
        _ => None,
    };
    let quant = match format {
        "Q4_0" => Some(GgmlDType::Q4_0),
        "Q4_1" => Some(GgmlDType::Q4_1),
        "Q5_0" => Some(GgmlDType::Q5_0),
        "Q5_1" => Some(GgmlDType::Q5_1),
        "Q8_0" => Some(GgmlDType::Q8_0),
        "Q4_K" => Some(GgmlDType::Q4K),
        "Q5_K" => Some(GgmlDType::Q5K),
        "Q6_K" => Some(GgmlDType::Q6K),
        _ => None,
    };
    if dense.is_none() && quant.is_none() {
        return Err(crate::Error::arg(format!("bench_matvec: no kernel for format {format:?}"))).py();
    }
    detach(py, "bench_matvec", || -> crate::Result<f64> {
        let w = Tensor::randn(0f32, 1.0, (out, inp), &Device::Cpu)?;
        let lin = match (dense, quant) {
            (Some(dt), _) => crate::nn::Linear::dense(w.to_dtype(dt)?, None)?,
            (_, Some(q)) => crate::nn::Linear::from_qtensor(QTensor::quantize(&w, q)?, None)?,
            _ => unreachable!("one of the two is set"),
        };
        drop(w);
        let x = Tensor::randn(0f32, 1.0, (rows.max(1), inp), &Device::Cpu)?;
        timed(reps, || lin.forward(&x))
    })
    .py()
}

/// Seconds for `reps` reads of `mib` MiB of varied f32 values in huge pages (as the weights are), every thread of the
/// pool summing its share: the memory's own streaming rate, the bound under the products'. The values are a
/// pseudo-random pattern: on these VMs memory holding one repeated byte reads several times faster than any weights.
#[pyfunction]
fn bench_memread(py: Python<'_>, mib: usize, reps: usize) -> PyResult<f64> {
    use rayon::prelude::*;
    detach(py, "bench_memread", || -> crate::Result<f64> {
        let n = (mib << 18).max(16);
        let mut buf = crate::kernels::huge::Buf::<f32>::zeroed(n);
        let mut s = 0x9e37_79b9_7f4a_7c15u64;
        for v in buf.iter_mut() {
            s = lcg(s);
            *v = (s >> 40) as f32 * 1e-7;
        }
        let sum = |c: &[f32]| {
            let mut acc = [0f32; 16];
            for ch in c.chunks_exact(16) {
                for l in 0..16 {
                    acc[l] += ch[l];
                }
            }
            acc.iter().sum::<f32>()
        };
        let per = n.div_ceil(crate::kernels::cpu::threads());
        timed(reps, || Ok(buf.par_chunks(per).map(sum).sum::<f32>()))
    })
    .py()
}

/// Which path decode steps take: "team" (the default: the thread team wherever the model and the step allow) or
/// "general"; returns the mode before. For tests and benches that compare the paths in one process.
#[pyfunction]
fn _set_decode_step(mode: &str) -> PyResult<String> {
    use crate::models::decoder::step::{set_mode, Mode};
    let m = match mode {
        "team" => Mode::Team,
        "general" => Mode::General,
        _ => return Err(crate::Error::arg(format!("decode step mode {mode:?}: team or general"))).py(),
    };
    Ok(match set_mode(m) {
        Mode::Team => "team",
        Mode::General => "general",
    }
    .to_string())
}

/// Whether copies of the decode team waiting in a stage warm the next projection's weights (on by default);
/// returns the setting before. For benches that compare the two in one process.
#[pyfunction]
fn _set_warm(on: bool) -> bool {
    crate::models::decoder::step::set_warm(on)
}

/// Decode steps that took the team's path so far in this process.
#[pyfunction]
fn _decode_steps() -> u64 {
    crate::models::decoder::step::steps()
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(_set_decode_step, m)?)?;
    m.add_function(wrap_pyfunction!(_decode_steps, m)?)?;
    m.add_function(wrap_pyfunction!(_set_warm, m)?)?;
    m.add_function(wrap_pyfunction!(bench_matvec, m)?)?;
    m.add_function(wrap_pyfunction!(bench_memread, m)?)?;
    m.add_function(wrap_pyfunction!(bench_prefill, m)?)?;
    m.add_function(wrap_pyfunction!(bench_decode, m)?)?;
    Ok(())
}
