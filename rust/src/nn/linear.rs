//! The one linear layer every model uses: y = x·Wᵀ + b, with W [out, in] dense (f32 / bf16 / f16, in the panels of
//! `kernels::dense`), in llama.cpp's blocks (`kernels::quant`), in a block format only Candle has (`QMatMul`), or
//! split into parts of different formats whose outputs sit side by side. Off the CPU, or for dtypes the kernels do
//! not take, every kind falls back to Candle's own matmul.

use std::sync::{Arc, OnceLock};

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, Module, Storage, Tensor, WithDType};
use half::{bf16, f16};

use crate::error::{Error, Result};
use crate::kernels::dense::{PanelData, Panels};
use crate::kernels::quant::QWeight;

pub enum Linear {
    Dense(Dense),
    /// llama.cpp's block formats on the CPU: our kernels (kernels/quant); shared with a tied embedding table
    Blocks(Arc<QWeight>, Option<Tensor>),
    /// quantized weight [out, in] (llama.cpp's kernels: Q4_0 ... Q8_0, K-quants), optional f32 bias
    Quant(QMatMul, Option<Tensor>),
    /// projections of the same input whose weights could not be stored as one matrix (different formats):
    /// their outputs side by side
    Split(Vec<Linear>),
}

impl Linear {
    /// x [..., in] (f32) -> [..., out]
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Linear::Dense(l) => l.forward(x),
            Linear::Blocks(w, bias) => {
                let y = blocks_forward(w, &x.to_dtype(DType::F32)?)?;
                Ok(match bias {
                    Some(b) => y.broadcast_add(b)?,
                    None => y,
                })
            }
            Linear::Quant(q, bias) => {
                let y = q.forward(&x.to_dtype(DType::F32)?)?;
                Ok(match bias {
                    Some(b) => y.broadcast_add(b)?,
                    None => y,
                })
            }
            Linear::Split(parts) => {
                let ys = parts.iter().map(|p| p.forward(x)).collect::<Result<Vec<_>>>()?;
                Ok(Tensor::cat(&ys, x.rank() - 1)?)
            }
        }
    }

    pub fn out_features(&self) -> usize {
        match self {
            Linear::Dense(l) => l.out_features(),
            Linear::Blocks(w, _) => w.out(),
            Linear::Quant(q, _) => match q {
                QMatMul::QTensor(t) => t.shape().dims()[0],
                QMatMul::Tensor(t) | QMatMul::TensorF16(t) => t.dims()[0],
            },
            Linear::Split(parts) => parts.iter().map(Linear::out_features).sum(),
        }
    }

    /// Projections of the same input as one, outputs side by side along the last dimension (q/k/v, gate/up):
    /// one pass over the input and one parallel region instead of several. Blocks of one format are stored as one
    /// matrix; anything else runs part by part.
    pub fn fuse(parts: Vec<Linear>) -> Result<Linear> {
        if parts.len() == 1 {
            return Ok(parts.into_iter().next().unwrap());
        }
        let blocks: Vec<(&Arc<QWeight>, &Option<Tensor>)> = parts
            .iter()
            .filter_map(|p| match p {
                Linear::Blocks(w, b) => Some((w, b)),
                _ => None,
            })
            .collect();
        if blocks.len() == parts.len() {
            if let Some(w) = QWeight::concat(&blocks.iter().map(|(w, _)| &***w).collect::<Vec<_>>()) {
                let bias = if blocks.iter().any(|(_, b)| b.is_some()) {
                    let bs = blocks
                        .iter()
                        .map(|(w, b)| match b {
                            Some(b) => Ok(b.to_dtype(DType::F32)?),
                            None => Ok(Tensor::zeros(w.out(), DType::F32, &candle_core::Device::Cpu)?),
                        })
                        .collect::<Result<Vec<_>>>()?;
                    Some(Tensor::cat(&bs, 0)?)
                } else {
                    None
                };
                return Ok(Linear::Blocks(Arc::new(w), bias));
            }
        }
        let dense: Vec<&Dense> = parts
            .iter()
            .filter_map(|p| match p {
                Linear::Dense(l) => Some(l),
                _ => None,
            })
            .collect();
        if dense.len() == parts.len() && dense.iter().all(|l| l.weight().dtype() == dense[0].weight().dtype()) {
            let w = Tensor::cat(&dense.iter().map(|l| l.weight()).collect::<Vec<_>>(), 0)?;
            let bias = if dense.iter().any(|l| l.bias().is_some()) {
                let bs = dense
                    .iter()
                    .map(|l| match l.bias() {
                        Some(b) => Ok(b.to_dtype(DType::F32)?),
                        None => Ok(Tensor::zeros(l.out_features(), DType::F32, w.device())?),
                    })
                    .collect::<Result<Vec<_>>>()?;
                Some(Tensor::cat(&bs, 0)?)
            } else {
                None
            };
            return Ok(Linear::Dense(Dense::new(w, bias)?));
        }
        Ok(Linear::Split(parts))
    }

    /// A dense weight [out, in] at its dtype (the CPU kernels keep it at that width).
    pub fn dense(weight: Tensor, bias: Option<Tensor>) -> Result<Self> {
        Ok(Linear::Dense(Dense::new(weight, bias)?))
    }

    /// A dense weight, or quantized at load to `quant` when given.
    pub fn new(weight: Tensor, bias: Option<Tensor>, quant: Option<GgmlDType>) -> Result<Self> {
        match quant {
            Some(q) => Self::quantize(&weight, bias, q),
            None => Self::dense(weight, bias),
        }
    }

    /// A GGUF tensor: our block kernels where they take its format, the dense kernels for F32/F16/BF16, else
    /// Candle's `QMatMul`.
    pub fn from_qtensor(q: QTensor, bias: Option<Tensor>) -> Result<Self> {
        if let Some(w) = QWeight::from_qtensor(&q)? {
            return Ok(Linear::Blocks(Arc::new(w), bias));
        }
        // unquantized F32/F16/BF16 tensors on the CPU: the dense kernels (threaded matrix-vector products, GEMM
        // for prefill, the weight kept at its width); Candle's matmul would run one thread at batch 1
        let dense = match q.dtype() {
            GgmlDType::F32 => Some(DType::F32),
            GgmlDType::F16 => Some(DType::F16),
            GgmlDType::BF16 => Some(DType::BF16),
            _ => None,
        };
        if let (Some(dt), true) = (dense, q.device().is_cpu()) {
            // exact: widening to f32 and back to the file's width
            let w = q.dequantize(&candle_core::Device::Cpu)?.to_dtype(dt)?;
            return Ok(Linear::Dense(Dense::new(w, bias)?));
        }
        Ok(Linear::Quant(QMatMul::from_qtensor(q)?, bias))
    }

    /// Quantize a dense [out, in] weight at load time (dtype="q8_0" and friends).
    pub fn quantize(weight: &Tensor, bias: Option<Tensor>, q: GgmlDType) -> Result<Self> {
        let inp = weight.dims()[1];
        if !inp.is_multiple_of(q.block_size()) {
            return Err(Error::arg(format!(
                "cannot quantize a weight with {inp} input features to {q:?}: not a multiple of its block of {}",
                q.block_size()
            )));
        }
        Self::from_qtensor(QTensor::quantize(&weight.to_dtype(DType::F32)?, q)?, bias)
    }
}

/// Quantized dtypes accepted by `load(..., dtype=...)`.
pub fn parse_qdtype(name: &str) -> Option<GgmlDType> {
    Some(match name.to_ascii_lowercase().as_str() {
        "q4_0" => GgmlDType::Q4_0,
        "q4_1" => GgmlDType::Q4_1,
        "q5_0" => GgmlDType::Q5_0,
        "q5_1" => GgmlDType::Q5_1,
        "q8_0" => GgmlDType::Q8_0,
        "q2_k" => GgmlDType::Q2K,
        "q3_k" => GgmlDType::Q3K,
        "q4_k" => GgmlDType::Q4K,
        "q5_k" => GgmlDType::Q5K,
        "q6_k" => GgmlDType::Q6K,
        _ => return None,
    })
}

/// x [..., in] (f32, CPU) -> [..., out] through the block kernels.
fn blocks_forward(w: &QWeight, x: &Tensor) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let m: usize = dims[..dims.len() - 1].iter().product();
    let mut out_dims = dims.clone();
    *out_dims.last_mut().unwrap() = w.out();
    let xs: Vec<f32> = x.flatten_all()?.to_vec1()?;
    let y = w.matmul(crate::kernels::cpu::isa(), &xs, m);
    Ok(Tensor::from_vec(y, out_dims, &Device::Cpu)?)
}

/// A dense weight: on CPU (f32 / bf16 / f16) held only as panels (`kernels::dense`), which the fast kernels read
/// front to back; elsewhere the [out, in] tensor and Candle's matmul. `forward_naive` is the plain Candle version
/// of the same product, on the [out, in] weight (rebuilt from the panels, once, if asked for on CPU).
#[derive(Debug, Clone)]
pub struct Dense {
    /// [out, in]. On CPU (f32/bf16/f16) this is only filled in when `weight()` or `forward_naive` needs it.
    weight: OnceLock<Tensor>,
    /// The weight in panels, on CPU.
    panels: Option<Arc<Panels>>,
    /// [out]
    bias: Option<Tensor>,
    out_features: usize,
}

impl Dense {
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Result<Self> {
        let (n, k) = weight.dims2()?;
        let weight = weight.contiguous()?;
        let panels = if weight.device().is_cpu() && n > 0 && k > 0 {
            let (storage, layout) = weight.storage_and_layout();
            let p = match weight.dtype() {
                DType::F32 => Some(Panels::new(cpu_slice::<f32>(&storage, layout)?, n, k)),
                DType::BF16 => Some(Panels::new(cpu_slice::<bf16>(&storage, layout)?, n, k)),
                DType::F16 => Some(Panels::new(cpu_slice::<f16>(&storage, layout)?, n, k)),
                _ => None,
            };
            p.map(Arc::new)
        } else {
            None
        };
        let cell = OnceLock::new();
        if panels.is_none() {
            let _ = cell.set(weight);
        }
        Ok(Self { weight: cell, panels, bias, out_features: n })
    }

    /// From [n_i, in] row-major weights stacked along the rows (one, or q/k/v that `Panels::stacks`), given as
    /// raw little-endian bytes of `dtype` (f32 / bf16 / f16) in a mapped checkpoint, on CPU: packed into panels
    /// straight from them, the mapped pages given back slab by slab (so the weight is held once, not twice,
    /// while it loads, and never as a stacked copy).
    pub fn from_bytes(dtype: DType, parts: &[&[u8]], k: usize, bias: Option<Tensor>) -> Result<Self> {
        fn panels<T: crate::kernels::dense::Elem + bytemuck::Pod>(parts: &[&[u8]], k: usize) -> Panels {
            match parts.iter().map(|b| bytemuck::try_cast_slice::<u8, T>(b)).collect::<std::result::Result<Vec<_>, _>>() {
                Ok(ws) => Panels::from_parts_releasing(&ws, k, &|part: &[T]| {
                    crate::weights::release_pages(bytemuck::cast_slice(part))
                }),
                // a tensor at an offset its width does not divide: aligned copies first
                Err(_) => {
                    let owned: Vec<Vec<T>> = parts
                        .iter()
                        .map(|b| {
                            let mut w = vec![T::zeroed(); b.len() / std::mem::size_of::<T>()];
                            bytemuck::cast_slice_mut::<T, u8>(&mut w).copy_from_slice(b);
                            w
                        })
                        .collect();
                    Panels::from_parts_releasing(&owned.iter().map(Vec::as_slice).collect::<Vec<_>>(), k, &|_| {})
                }
            }
        }
        let width = dtype.size_in_bytes();
        let rows: Vec<usize> = parts.iter().map(|b| b.len() / (k * width).max(1)).collect();
        if k == 0 || parts.iter().zip(&rows).any(|(b, &n)| n == 0 || b.len() != n * k * width) || !Panels::stacks(&rows) {
            let sizes: Vec<usize> = parts.iter().map(|b| b.len()).collect();
            return Err(Error::arg(format!("linear: parts of {sizes:?} bytes for {dtype:?} weights of {k} inputs stacked in panels")));
        }
        let p = match dtype {
            DType::F32 => panels::<f32>(parts, k),
            DType::BF16 => panels::<bf16>(parts, k),
            DType::F16 => panels::<f16>(parts, k),
            other => return Err(Error::arg(format!("linear: panels of {other:?}"))),
        };
        Ok(Self { weight: OnceLock::new(), out_features: p.n(), panels: Some(Arc::new(p)), bias })
    }

    /// The weight, [out, in].
    pub fn weight(&self) -> &Tensor {
        self.weight.get_or_init(|| {
            let p = self.panels.as_ref().expect("a Dense layer holds its weight or its panels");
            let (n, k, dev) = (p.n(), p.k(), &Device::Cpu);
            let t = match p.unpack() {
                PanelData::F32(d) => Tensor::from_vec(d.into_vec(), (n, k), dev),
                PanelData::BF16(d) => Tensor::from_vec(d.into_vec(), (n, k), dev),
                PanelData::F16(d) => Tensor::from_vec(d.into_vec(), (n, k), dev),
            };
            t.expect("a CPU tensor of the weight's own size")
        })
    }

    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// The panels, on CPU.
    pub fn panels(&self) -> Option<&Arc<Panels>> {
        self.panels.as_ref()
    }

    pub fn out_features(&self) -> usize {
        self.out_features
    }

    /// x [..., in] -> [..., out]
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if let Some(y) = self.forward_cpu(x)? {
            return Ok(y);
        }
        self.forward_naive(x)
    }

    /// The plain Candle version: `x · Wᵀ + b`, converting a bf16/f16 weight to x's dtype first (and, for a bf16
    /// weight, rounding x to bf16 first, as the fast kernels do).
    pub fn forward_naive(&self, x: &Tensor) -> Result<Tensor> {
        let weight = self.weight();
        let rounded;
        let x = if weight.dtype() == DType::BF16 && x.dtype() != DType::BF16 {
            rounded = x.to_dtype(DType::BF16)?.to_dtype(x.dtype())?;
            &rounded
        } else {
            x
        };
        let w = if weight.dtype() == x.dtype() { weight.clone() } else { weight.to_dtype(x.dtype())? };
        let y = x.broadcast_matmul(&w.t()?)?;
        Ok(match &self.bias {
            Some(b) => y.broadcast_add(&b.to_dtype(y.dtype())?)?,
            None => y,
        })
    }

    /// The CPU kernels, or None where they do not apply (the caller then takes the Candle path).
    fn forward_cpu(&self, x: &Tensor) -> Result<Option<Tensor>> {
        let Some(p) = &self.panels else { return Ok(None) };
        let (n, k) = (p.n(), p.k());
        if !x.device().is_cpu() || x.dtype() != DType::F32 || x.rank() == 0 {
            return Ok(None);
        }
        if x.dims()[x.rank() - 1] != k || x.elem_count() == 0 {
            return Ok(None); // let Candle report the shape error (or handle the empty case)
        }
        let m = x.elem_count() / k;
        let x = x.contiguous()?;
        let bias = match &self.bias {
            Some(b) if b.dims1()? != n => return Ok(None),
            Some(b) => Some(b.to_dtype(DType::F32)?.contiguous()?),
            None => None,
        };
        let (xg, xl) = x.storage_and_layout();
        let xs = cpu_slice::<f32>(&xg, xl)?;
        let bg = bias.as_ref().map(|b| b.storage_and_layout());
        let bs = match &bg {
            Some((g, l)) => Some(cpu_slice::<f32>(g, l)?),
            None => None,
        };
        if xs.len() != m * k || bs.is_some_and(|b| b.len() != n) {
            return Err(Error::arg(format!("linear: unexpected sizes for x [{m}, {k}] and weight [{n}, {k}]")));
        }
        let out = p.matmul(xs, m, bs);
        drop((xg, bg));
        let mut dims = x.dims().to_vec();
        *dims.last_mut().unwrap() = n;
        Ok(Some(Tensor::from_vec(out, dims, x.device())?))
    }
}

/// The activation dtype for weights of `dtype` on `device`: CPU computes in f32 (its matmuls have no bf16).
pub fn compute_dtype(dtype: DType, device: &Device) -> DType {
    if device.is_cpu() { DType::F32 } else { dtype }
}

/// The contiguous data of a CPU tensor.
fn cpu_slice<'a, T: WithDType>(storage: &'a Storage, layout: &candle_core::Layout) -> Result<&'a [T]> {
    let Storage::Cpu(cpu) = storage else { return Err(Error::arg("linear: expected a CPU tensor")) };
    let (start, end) = layout.contiguous_offsets().ok_or_else(|| Error::arg("linear: expected a contiguous tensor"))?;
    Ok(&cpu.as_slice::<T>()?[start..end])
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use crate::kernels::dense::round_bf16;
    use crate::kernels::testing::{reference_matmul as reference, vals};

    /// Compare `forward` (the fast kernels) and `forward_naive` with the f64 reference, for x of shape `lead` + [k].
    fn check(lead: &[usize], k: usize, n: usize, dtype: DType, with_bias: bool) {
        let dev = Device::Cpu;
        let m: usize = lead.iter().product();
        let (xv, wv, bv) = (vals(m * k, 1 + k as u64), vals(n * k, 2 + n as u64), vals(n, 3));
        let w = Tensor::from_vec(wv, (n, k), &dev).unwrap().to_dtype(dtype).unwrap();
        // the reference sees the weight as rounded to its dtype
        let w32: Vec<f32> = w.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        let bias = with_bias.then(|| Tensor::from_vec(bv.clone(), n, &dev).unwrap());
        let lin = Dense::new(w, bias).unwrap();
        let mut shape = lead.to_vec();
        shape.push(k);
        let x = Tensor::from_vec(xv.clone(), shape.clone(), &dev).unwrap();
        // and, for a bf16 weight, the activations rounded to bf16 as well
        let xr: Vec<f32> = if dtype == DType::BF16 { xv.iter().map(|&v| round_bf16(v)).collect() } else { xv.clone() };
        let want = reference(&xr, m, k, &w32, n, with_bias.then_some(&bv[..]));
        let fast = lin.forward(&x).unwrap();
        let naive = lin.forward_naive(&x).unwrap();
        let mut out_shape = lead.to_vec();
        out_shape.push(n);
        assert_eq!(fast.dims(), &out_shape[..]);
        assert_eq!(naive.dims(), &out_shape[..]);
        let fast: Vec<f32> = fast.flatten_all().unwrap().to_vec1().unwrap();
        let naive: Vec<f32> = naive.flatten_all().unwrap().to_vec1().unwrap();
        // |x|, |w| < 1: sums of k products; f32 accumulation error grows ~ k·eps at worst
        let tol = 1e-5 * (k as f64).sqrt().max(1.0) + 1e-6;
        for (idx, want) in want.iter().enumerate() {
            let scale = 1.0f64.max(want.abs());
            let (f, nv) = (fast[idx] as f64, naive[idx] as f64);
            assert!((f - want).abs() <= tol * scale, "{lead:?}x{k}->{n} {dtype:?} bias={with_bias} [{idx}]: fast {f} vs {want}");
            assert!((nv - want).abs() <= tol * scale, "naive {nv} vs {want}");
            assert!((f - nv).abs() <= tol * scale, "fast {f} vs naive {nv}");
        }
    }

    #[test]
    fn fast_matches_naive() {
        let shapes: &[(&[usize], usize, usize)] = &[
            (&[1], 7, 13),
            (&[1, 1], 1, 1),
            (&[1, 1], 8, 3),
            (&[1, 1], 33, 70),
            (&[3], 257, 100),
            (&[2, 3], 100, 257),
            (&[1, 5], 768, 1000),
            (&[7], 64, 31),
            (&[8], 129, 65),
            (&[9], 257, 100),
            (&[2, 17], 100, 300),
            (&[1, 40], 96, 257),
            (&[200], 64, 30),
            (&[1, 300], 70, 130),
        ];
        for &(lead, k, n) in shapes {
            for dtype in [DType::F32, DType::BF16, DType::F16] {
                for bias in [false, true] {
                    check(lead, k, n, dtype, bias);
                }
            }
        }
    }

    #[test]
    fn weight_round_trips_through_panels() {
        let dev = Device::Cpu;
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            for &(n, k) in &[(1usize, 1usize), (13, 7), (64, 3), (130, 33)] {
                let w = Tensor::from_vec(vals(n * k, 4), (n, k), &dev).unwrap().to_dtype(dtype).unwrap();
                let lin = Dense::new(w.clone(), None).unwrap();
                assert_eq!(lin.out_features(), n);
                assert_eq!(lin.weight().dtype(), dtype);
                let a: Vec<f32> = lin.weight().to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1().unwrap();
                let b: Vec<f32> = w.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1().unwrap();
                assert_eq!(a, b);
            }
        }
    }

    #[test]
    fn non_contiguous_input() {
        let dev = Device::Cpu;
        let (k, n) = (40, 23);
        let w = Tensor::from_vec(vals(n * k, 9), (n, k), &dev).unwrap();
        let lin = Dense::new(w, None).unwrap();
        let x = Tensor::from_vec(vals(k * 3, 10), (k, 3), &dev).unwrap().t().unwrap(); // [3, k], strided
        let a: Vec<f32> = lin.forward(&x).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        let b: Vec<f32> = lin.forward_naive(&x).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        for (a, b) in a.iter().zip(&b) {
            assert!((a - b).abs() < 1e-5);
        }
    }
}
