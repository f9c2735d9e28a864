//! `_native.ops_*`: the kernels of `crate::ops` on numpy arrays, float32 in and out, on the CPU.
//!
//! `candlewick.ops` (python/candlewick/ops.py) casts its inputs to float32 and calls these. Shapes are checked
//! here, before Candle sees them, so a bad shape is an `InvalidArgument` naming the argument, never a panic.
//! Inputs are copied into Candle tensors while the GIL is held; the compute runs with the GIL released.
//! Shape legend: B batch, T tokens, C channels, H heads, Hkv key/value heads, D head dim, V vocabulary.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use numpy::{PyArray1, PyArrayDyn, PyArrayMethods, PyReadonlyArrayDyn, PyUntypedArrayMethods};
use pyo3::prelude::*;

use super::PyResultExt;
use crate::config::RopeScaling;
use crate::error::{Error, Result};
use crate::ops;

type Out<'py> = Bound<'py, PyArrayDyn<f32>>;

/// A numpy array as a CPU tensor of the same shape (a copy, made while the GIL is held).
fn tensor<T: numpy::Element + candle_core::WithDType>(a: &PyReadonlyArrayDyn<'_, T>) -> Result<Tensor> {
    let v = a.as_array();
    let data: Vec<T> = match v.as_slice() {
        Some(s) => s.to_vec(),
        None => v.iter().copied().collect(),
    };
    Ok(Tensor::from_vec(data, v.shape(), &Device::Cpu)?)
}

/// Run `f` without the GIL and hand its tensor back as a float32 numpy array.
fn run<'py>(py: Python<'py>, f: impl FnOnce() -> Result<Tensor> + Send) -> PyResult<Out<'py>> {
    let (data, dims) = super::errors::detach(py, "op", || -> Result<(Vec<f32>, Vec<usize>)> {
            let t = f()?;
            Ok((t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?, t.dims().to_vec()))
        })
        .py()?;
    PyArray1::from_vec(py, data).reshape(dims)
}

/// An empty float32 array of the given shape (the answer for every op on an input with no elements).
fn empty<'py>(py: Python<'py>, shape: &[usize]) -> PyResult<Out<'py>> {
    PyArray1::<f32>::from_vec(py, Vec::new()).reshape(shape.to_vec())
}

/// A numpy-style axis (negative counts from the end) as an index into `shape`.
fn axis_index(op: &str, axis: isize, shape: &[usize]) -> Result<usize> {
    let n = shape.len() as isize;
    let a = if axis < 0 { axis + n } else { axis };
    if a < 0 || a >= n {
        return Err(Error::arg(format!("{op}: axis {axis} is out of range for x of shape {shape:?}")));
    }
    Ok(a as usize)
}

fn softmax_like<'py>(
    py: Python<'py>,
    op: &'static str,
    x: PyReadonlyArrayDyn<'py, f32>,
    axis: isize,
    f: fn(&Tensor, usize) -> Result<Tensor>,
) -> PyResult<Out<'py>> {
    let shape = x.shape().to_vec();
    let dim = axis_index(op, axis, &shape).py()?;
    if x.len() == 0 {
        return empty(py, &shape);
    }
    let x = tensor(&x).py()?;
    run(py, move || f(&x, dim))
}

/// softmax(x) along `axis`.
#[pyfunction]
#[pyo3(signature = (x, axis = -1), text_signature = "(x, axis=-1)")]
pub fn ops_softmax<'py>(py: Python<'py>, x: PyReadonlyArrayDyn<'py, f32>, axis: isize) -> PyResult<Out<'py>> {
    softmax_like(py, "softmax", x, axis, ops::softmax)
}

/// log softmax(x) along `axis`.
#[pyfunction]
#[pyo3(signature = (x, axis = -1), text_signature = "(x, axis=-1)")]
pub fn ops_log_softmax<'py>(py: Python<'py>, x: PyReadonlyArrayDyn<'py, f32>, axis: isize) -> PyResult<Out<'py>> {
    softmax_like(py, "log_softmax", x, axis, ops::log_softmax)
}

/// An attention mask: boolean (true = attend) or additive float.
#[derive(FromPyObject)]
pub enum Mask<'py> {
    Bool(PyReadonlyArrayDyn<'py, bool>),
    Float(PyReadonlyArrayDyn<'py, f32>),
}

/// softmax(q·kᵀ·scale + mask)·v with q [B, H, Tq, D], k and v [B, Hkv, Tk, D].
#[pyfunction]
#[pyo3(signature = (q, k, v, causal = true, mask = None, scale = None))]
pub fn ops_attention<'py>(
    py: Python<'py>,
    q: PyReadonlyArrayDyn<'py, f32>,
    k: PyReadonlyArrayDyn<'py, f32>,
    v: PyReadonlyArrayDyn<'py, f32>,
    causal: bool,
    mask: Option<Mask<'py>>,
    scale: Option<f64>,
) -> PyResult<Out<'py>> {
    let (qs, ks, vs) = (q.shape().to_vec(), k.shape().to_vec(), v.shape().to_vec());
    let bad = |why: &str| {
        Err(Error::arg(format!(
            "attention: {why}: q {qs:?}, k {ks:?}, v {vs:?} (want q [B, H, Tq, D], k and v [B, Hkv, Tk, D], \
             H % Hkv == 0)"
        )))
    };
    let check = || -> Result<()> {
        if qs.len() != 4 || ks.len() != 4 || vs.len() != 4 {
            return bad("q, k and v must be 4-D");
        }
        let (b, h, tq, d) = (qs[0], qs[1], qs[2], qs[3]);
        let (hkv, tk) = (ks[1], ks[2]);
        if ks[0] != b || ks[3] != d || vs != ks {
            return bad("k and v must be [B, Hkv, Tk, D] with q's B and D");
        }
        if hkv == 0 || h % hkv != 0 {
            return bad(&format!("H = {h} query heads is not a multiple of Hkv = {hkv} key/value heads"));
        }
        if tk == 0 || d == 0 {
            return bad("there must be at least one key and D > 0");
        }
        if causal && tq > tk {
            return bad(&format!("causal attention needs Tq <= Tk, got Tq = {tq} queries and Tk = {tk} keys"));
        }
        if let Some(s) = scale {
            if !s.is_finite() {
                return Err(Error::arg(format!("attention: scale must be finite, got {s}")));
            }
        }
        Ok(())
    };
    check().py()?;
    let target = [qs[0], qs[1], qs[2], ks[2]]; // [B, H, Tq, Tk]
    let mask = match mask {
        None => None,
        Some(m) => {
            let ms = match &m {
                Mask::Bool(a) => a.shape().to_vec(),
                Mask::Float(a) => a.shape().to_vec(),
            };
            let fits = ms.len() <= 4 && ms.iter().rev().zip(target.iter().rev()).all(|(&m, &t)| m == 1 || m == t);
            if !fits {
                return Err(Error::arg(format!(
                    "attention: mask {ms:?} does not broadcast to [B, H, Tq, Tk] = {target:?}"
                )))
                .py();
            }
            let t = match &m {
                // u8 with nonzero = attend, which is what crate::ops::additive_mask expects of a non-float mask.
                Mask::Bool(a) => {
                    let data: Vec<u8> = a.as_array().iter().map(|&b| b as u8).collect();
                    Tensor::from_vec(data, ms.as_slice(), &Device::Cpu).map_err(Error::from)
                }
                Mask::Float(a) => tensor(a),
            }
            .py()?;
            let four: Vec<usize> = std::iter::repeat_n(1, 4 - ms.len()).chain(ms.iter().copied()).collect();
            Some(t.reshape(four).map_err(Error::from).py()?)
        }
    };
    if qs.iter().product::<usize>() == 0 {
        return empty(py, &qs);
    }
    let (q, k, v) = (tensor(&q).py()?, tensor(&k).py()?, tensor(&v).py()?);
    run(py, move || ops::attention(&q, &k, &v, causal, mask.as_ref(), scale))
}

/// -log softmax(logits)[target] per row; logits [..., V], targets [...] (int64). With `reduction` "none" the
/// result has the targets' shape; with "sum" or "mean" it is 0-d.
#[pyfunction]
#[pyo3(
    signature = (logits, targets, ignore_index = -100, reduction = "mean"),
    text_signature = "(logits, targets, ignore_index=-100, reduction='mean')"
)]
pub fn ops_cross_entropy<'py>(
    py: Python<'py>,
    logits: PyReadonlyArrayDyn<'py, f32>,
    targets: PyReadonlyArrayDyn<'py, i64>,
    ignore_index: i64,
    reduction: &str,
) -> PyResult<Out<'py>> {
    let red: ops::Reduction = reduction.parse().py()?;
    let (ls, ts) = (logits.shape().to_vec(), targets.shape().to_vec());
    if ls.is_empty() || ls[..ls.len() - 1] != ts[..] {
        return Err(Error::arg(format!(
            "cross_entropy: logits {ls:?} and targets {ts:?} do not fit [..., V] and [...]"
        )))
        .py();
    }
    let v = ls[ls.len() - 1];
    let n: usize = ts.iter().product();
    if v == 0 {
        return Err(Error::arg(format!("cross_entropy: logits {ls:?} have no classes (V = 0)"))).py();
    }
    let logits = tensor(&logits).and_then(|t| Ok(t.reshape((n, v))?)).py()?;
    let targets = tensor(&targets).and_then(|t| Ok(t.reshape(n)?)).py()?;
    let out_shape = if red == ops::Reduction::None { ts } else { vec![] };
    if n == 0 {
        // Nothing to average: the mean of no rows is nan, the sum 0, as in the reference.
        let v = if red == ops::Reduction::Mean { vec![f32::NAN] } else { vec![0.0] };
        return if red == ops::Reduction::None {
            empty(py, &out_shape)
        } else {
            PyArray1::from_vec(py, v).reshape(out_shape)
        };
    }
    run(py, move || Ok(ops::cross_entropy(&logits, &targets, ignore_index, red)?.reshape(out_shape)?))
}

/// A [C] parameter of a norm, or `fill` when it is None.
fn norm_param(op: &str, name: &str, p: Option<PyReadonlyArrayDyn<'_, f32>>, xs: &[usize], fill: f32) -> Result<Tensor> {
    let c = xs[xs.len() - 1];
    match p {
        None => Ok(Tensor::full(fill, c, &Device::Cpu)?),
        Some(p) if p.shape() == [c] => tensor(&p),
        Some(p) => Err(Error::arg(format!(
            "{op}: {name} has shape {:?} but x {xs:?} has C = {c} channels; {name} must be [C]",
            p.shape()
        ))),
    }
}

fn norm_input(op: &str, xs: &[usize], eps: f64) -> Result<()> {
    if xs.is_empty() || xs[xs.len() - 1] == 0 {
        return Err(Error::arg(format!("{op}: x must have a last (channel) axis of size C > 0, got shape {xs:?}")));
    }
    if !(eps >= 0.0 && eps.is_finite()) {
        return Err(Error::arg(format!("{op}: eps must be a finite number >= 0, got {eps}")));
    }
    Ok(())
}

/// (x - mean) / sqrt(var + eps) · weight + bias over the last axis; weight / bias None mean 1 / 0.
#[pyfunction]
#[pyo3(signature = (x, weight, bias, eps = 1e-5))]
pub fn ops_layer_norm<'py>(
    py: Python<'py>,
    x: PyReadonlyArrayDyn<'py, f32>,
    weight: Option<PyReadonlyArrayDyn<'py, f32>>,
    bias: Option<PyReadonlyArrayDyn<'py, f32>>,
    eps: f64,
) -> PyResult<Out<'py>> {
    let xs = x.shape().to_vec();
    norm_input("layer_norm", &xs, eps).py()?;
    let w = norm_param("layer_norm", "weight", weight, &xs, 1.0).py()?;
    let b = norm_param("layer_norm", "bias", bias, &xs, 0.0).py()?;
    if x.len() == 0 {
        return empty(py, &xs);
    }
    let x = tensor(&x).py()?;
    run(py, move || ops::layer_norm(&x, &w, &b, eps))
}

/// x / sqrt(mean(x²) + eps) · weight over the last axis; weight None means 1.
#[pyfunction]
#[pyo3(signature = (x, weight, eps = 1e-6))]
pub fn ops_rms_norm<'py>(
    py: Python<'py>,
    x: PyReadonlyArrayDyn<'py, f32>,
    weight: Option<PyReadonlyArrayDyn<'py, f32>>,
    eps: f64,
) -> PyResult<Out<'py>> {
    let xs = x.shape().to_vec();
    norm_input("rms_norm", &xs, eps).py()?;
    let w = norm_param("rms_norm", "weight", weight, &xs, 1.0).py()?;
    if x.len() == 0 {
        return empty(py, &xs);
    }
    let x = tensor(&x).py()?;
    run(py, move || ops::rms_norm(&x, &w, eps))
}

/// GELU, `approximate` "tanh" (GPT-2's gelu_new) or "none" (exact, x·Φ(x)).
#[pyfunction]
#[pyo3(signature = (x, approximate = "tanh"))]
pub fn ops_gelu<'py>(py: Python<'py>, x: PyReadonlyArrayDyn<'py, f32>, approximate: &str) -> PyResult<Out<'py>> {
    let kind = match approximate {
        "tanh" => ops::Gelu::Tanh,
        "none" => ops::Gelu::Erf,
        other => return Err(Error::arg(format!("gelu: approximate must be \"tanh\" or \"none\", got {other:?}"))).py(),
    };
    if x.len() == 0 {
        return empty(py, x.shape());
    }
    let x = tensor(&x).py()?;
    run(py, move || ops::gelu(&x, kind))
}

/// SiLU: x·σ(x).
#[pyfunction]
pub fn ops_silu<'py>(py: Python<'py>, x: PyReadonlyArrayDyn<'py, f32>) -> PyResult<Out<'py>> {
    if x.len() == 0 {
        return empty(py, x.shape());
    }
    let x = tensor(&x).py()?;
    run(py, move || ops::silu(&x))
}

/// A Hugging Face `rope_scaling` dict as a `RopeScaling`; every field the type needs must be there.
fn rope_scaling(s: Option<HashMap<String, Bound<'_, PyAny>>>) -> Result<RopeScaling> {
    let Some(s) = s.filter(|s| !s.is_empty()) else { return Ok(RopeScaling::None) };
    let kind: String = match s.get("rope_type").or_else(|| s.get("type")) {
        None => "default".into(),
        Some(k) => {
            k.extract().map_err(|_| Error::arg(format!("rope: scaling[\"rope_type\"] must be a string, got {k}")))?
        }
    };
    let num = |key: &str| -> Result<f64> {
        let v = s.get(key).ok_or_else(|| Error::arg(format!("rope: {kind:?} scaling needs {key:?}")))?;
        let x: f64 =
            v.extract().map_err(|_| Error::arg(format!("rope: scaling[{key:?}] must be a number, got {v}")))?;
        if !(x.is_finite() && x > 0.0) {
            return Err(Error::arg(format!("rope: scaling[{key:?}] must be a finite number > 0, got {x}")));
        }
        Ok(x)
    };
    Ok(match kind.as_str() {
        "default" => RopeScaling::None,
        "linear" => RopeScaling::Linear { factor: num("factor")? },
        "llama3" => {
            let (lo, hi) = (num("low_freq_factor")?, num("high_freq_factor")?);
            if hi <= lo {
                return Err(Error::arg(format!(
                    "rope: llama3 scaling needs high_freq_factor > low_freq_factor, got {hi} and {lo}"
                )));
            }
            RopeScaling::Llama3 {
                factor: num("factor")?,
                low_freq_factor: lo,
                high_freq_factor: hi,
                original_max_position_embeddings: num("original_max_position_embeddings")?,
            }
        }
        other => {
            return Err(Error::arg(format!("rope: scaling type {other:?} is not supported (default, linear, llama3)")))
        }
    })
}

/// Rotary position embedding (half-split): x [B, H, T, D] (or [..., T, D]), positions [T] or [B, T].
#[pyfunction]
#[pyo3(signature = (x, positions, theta = 10000.0, scaling = None))]
pub fn ops_rope<'py>(
    py: Python<'py>,
    x: PyReadonlyArrayDyn<'py, f32>,
    positions: PyReadonlyArrayDyn<'py, i64>,
    theta: f64,
    scaling: Option<HashMap<String, Bound<'py, PyAny>>>,
) -> PyResult<Out<'py>> {
    let (xs, ps) = (x.shape().to_vec(), positions.shape().to_vec());
    let bad = |why: &str| {
        Err(Error::arg(format!(
            "rope: {why}: x {xs:?}, positions {ps:?} (want x [B, H, T, D] or [..., T, D], positions [T] or [B, T])"
        )))
    };
    let check = || -> Result<(usize, usize, usize, usize)> {
        if !(theta.is_finite() && theta > 0.0) {
            return Err(Error::arg(format!("rope: theta must be a finite number > 0, got {theta}")));
        }
        if xs.len() < 2 {
            return bad("x needs at least a T and a D axis");
        }
        let (t, d) = (xs[xs.len() - 2], xs[xs.len() - 1]);
        if d % 2 != 0 {
            return bad(&format!("the head dim D = {d} must be even"));
        }
        match ps.as_slice() {
            [pt] if *pt == t => Ok((1, xs[..xs.len() - 2].iter().product(), t, d)),
            [pb, pt] if *pt == t && xs.len() == 4 && (*pb == xs[0] || *pb == 1) => Ok((xs[0], xs[1], t, d)),
            _ => bad("positions do not fit x's T (and B)"),
        }
    };
    let (b, h, t, d) = check().py()?;
    let scaling = rope_scaling(scaling).py()?;
    if x.len() == 0 {
        return empty(py, &xs);
    }
    let pos: Vec<i64> = positions.as_array().iter().copied().collect();
    let batched = ps.len() == 2 && ps[0] != 1;
    let x = tensor(&x).py()?;
    run(py, move || {
        let inv_freq = ops::rope_inv_freq(d, theta, &scaling);
        let (cos, sin) = ops::rope_tables_at(&inv_freq, &pos, DType::F32, &Device::Cpu)?; // [P, D/2]
        let (cos, sin) = if batched { (cos.reshape((b, t, d / 2))?, sin.reshape((b, t, d / 2))?) } else { (cos, sin) };
        Ok(ops::rope_apply(&x.reshape((b, h, t, d))?, &cos, &sin)?.reshape(xs)?)
    })
}

/// Adds the `ops_*` functions to `_native`.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(ops_softmax, m)?)?;
    m.add_function(wrap_pyfunction!(ops_log_softmax, m)?)?;
    m.add_function(wrap_pyfunction!(ops_attention, m)?)?;
    m.add_function(wrap_pyfunction!(ops_cross_entropy, m)?)?;
    m.add_function(wrap_pyfunction!(ops_layer_norm, m)?)?;
    m.add_function(wrap_pyfunction!(ops_rms_norm, m)?)?;
    m.add_function(wrap_pyfunction!(ops_gelu, m)?)?;
    m.add_function(wrap_pyfunction!(ops_silu, m)?)?;
    m.add_function(wrap_pyfunction!(ops_rope, m)?)?;
    Ok(())
}
