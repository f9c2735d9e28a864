//! `_native.Model`: a loaded checkpoint, numpy in and out, the GIL released while it computes.

use std::path::PathBuf;

use numpy::{PyArray1, PyArrayDyn, PyArrayMethods, PyReadonlyArray2};
use pyo3::prelude::*;
use pyo3::types::PyDict;

use super::tokenizer::PyTokenizer;
use super::PyResultExt;
use super::errors::detach;
use crate::device::{dtype_name, parse_device, parse_dtype};
use crate::model::Model;

/// An f32 NumPy array of any rank.
type Array<'py> = Bound<'py, PyArrayDyn<f32>>;

#[pyclass(name = "Model", module = "candlewick._native", frozen)]
pub struct PyModel {
    pub(crate) inner: std::sync::Arc<Model>,
}

pub(crate) fn to_numpy<'py>(py: Python<'py>, t: &candle_core::Tensor) -> PyResult<Bound<'py, PyArrayDyn<f32>>> {
    let dims = t.dims().to_vec();
    let flat: Vec<f32> = py
        .detach(|| -> crate::Result<Vec<f32>> {
            Ok(t.to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1()?)
        })
        .py()?;
    PyArray1::from_vec(py, flat).reshape(dims)
}

#[pymethods]
impl PyModel {
    #[staticmethod]
    #[pyo3(signature = (path, device = "cpu", dtype = None, kv_cache_dtype = "f32"))]
    fn load(py: Python<'_>, path: PathBuf, device: &str, dtype: Option<&str>, kv_cache_dtype: &str) -> PyResult<Self> {
        let dev = parse_device(device).py()?;
        // a quantized dtype ("q8_0", ...) quantizes the projections at load time; the rest stays float32
        let quant = dtype.and_then(crate::nn::linear::parse_qdtype);
        let dtype = if quant.is_some() { None } else { dtype.map(parse_dtype).transpose().py()? };
        let mut inner = detach(py, "load", || Model::load(&path, &dev, dtype, quant)).py()?;
        inner.set_kv_cache_dtype(kv_cache_dtype).py()?;
        Ok(Self { inner: std::sync::Arc::new(inner) })
    }

    #[getter]
    fn config<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let c = &self.inner.cfg;
        let d = PyDict::new(py);
        d.set_item("architecture", format!("{:?}", c.arch).to_lowercase())?;
        d.set_item("model_type", &c.model_type)?;
        d.set_item("vocab_size", c.vocab_size)?;
        d.set_item("hidden_size", c.hidden_size)?;
        d.set_item("num_layers", c.num_layers)?;
        d.set_item("num_heads", c.num_heads)?;
        d.set_item("num_kv_heads", c.num_kv_heads)?;
        d.set_item("head_dim", c.head_dim)?;
        d.set_item("intermediate_size", c.intermediate_size)?;
        d.set_item("context_length", c.context_length())?;
        d.set_item("norm_eps", c.norm_eps)?;
        d.set_item("rope_theta", c.rope_theta)?;
        d.set_item("tie_word_embeddings", c.tie_word_embeddings)?;
        d.set_item("dtype", dtype_name(self.inner.dtype))?;
        d.set_item("kv_cache_dtype", dtype_name(self.inner.kv_width().1))?;
        d.set_item("device", format!("{:?}", self.inner.device).to_lowercase())?;
        Ok(d)
    }

    #[getter]
    fn tokenizer(&self) -> Option<PyTokenizer> {
        self.inner.tokenizer.as_ref().map(|t| PyTokenizer { inner: t.clone() })
    }

    /// Generate for each prompt (token ids): one dict per prompt with prompt_token_ids and choices. `params`:
    /// one dict for all prompts, or a list of one per prompt.
    fn generate<'py>(
        &self,
        py: Python<'py>,
        prompts: Vec<Vec<u32>>,
        params: &Bound<'py, PyAny>,
    ) -> PyResult<Vec<Bound<'py, PyDict>>> {
        self.generate_impl(py, prompts, params)
    }

    /// An iterator of text pieces for one prompt (n must be 1).
    fn stream(&self, py: Python<'_>, prompt: Vec<u32>, params: &Bound<'_, PyDict>) -> PyResult<super::generate::PyStream> {
        self.stream_impl(py, prompt, params)
    }

    #[getter]
    fn is_decoder(&self) -> bool {
        self.inner.is_decoder()
    }

    /// logits [B, T, V] for right-padded sequences.
    fn logits<'py>(&self, py: Python<'py>, seqs: Vec<Vec<u32>>) -> PyResult<Bound<'py, PyArrayDyn<f32>>> {
        let t = detach(py, "logits", || self.inner.logits(&seqs)).py()?;
        to_numpy(py, &t)
    }

    /// logits [T, V] fed through the KV cache in chunks of the given sizes.
    fn logits_incremental<'py>(
        &self,
        py: Python<'py>,
        ids: Vec<u32>,
        chunks: Vec<usize>,
    ) -> PyResult<Bound<'py, PyArrayDyn<f32>>> {
        let t = detach(py, "logits_incremental", || self.inner.logits_incremental(&ids, &chunks)).py()?;
        to_numpy(py, &t)
    }

    /// (hidden states after each block and after the final norm, each [T, C]; logits [T, V]).
    fn hidden_states<'py>(
        &self,
        py: Python<'py>,
        ids: Vec<u32>,
    ) -> PyResult<(Vec<Array<'py>>, Array<'py>)> {
        let (layers, logits) = detach(py, "hidden_states", || self.inner.hidden_states(&ids)).py()?;
        let layers = layers.iter().map(|t| to_numpy(py, t)).collect::<PyResult<Vec<_>>>()?;
        Ok((layers, to_numpy(py, &logits)?))
    }

    fn token_nll<'py>(&self, py: Python<'py>, ids: Vec<u32>) -> PyResult<Bound<'py, PyArray1<f32>>> {
        let v = detach(py, "token_nll", || self.inner.token_nll(&ids)).py()?;
        Ok(PyArray1::from_vec(py, v))
    }

    #[pyo3(signature = (ids, stride = None))]
    fn perplexity(&self, py: Python<'_>, ids: Vec<u32>, stride: Option<usize>) -> PyResult<(f64, usize)> {
        detach(py, "perplexity", || self.inner.perplexity(&ids, stride)).py()
    }

    /// (last_hidden_state [B, T, C], embeddings [B, C]) for texts (encoder models).
    fn embed_texts<'py>(
        &self,
        py: Python<'py>,
        texts: Vec<String>,
    ) -> PyResult<(Array<'py>, Array<'py>)> {
        let (h, e) = detach(py, "embed_texts", || self.inner.embed_texts(&texts)).py()?;
        Ok((to_numpy(py, &h)?, to_numpy(py, &e)?))
    }

    /// (last_hidden_state, embeddings) for given input_ids and attention_mask [B, T] (encoder models).
    fn embed_ids<'py>(
        &self,
        py: Python<'py>,
        ids: PyReadonlyArray2<'py, i64>,
        mask: PyReadonlyArray2<'py, i64>,
    ) -> PyResult<(Array<'py>, Array<'py>)> {
        let shape = ids.as_array().shape().to_vec();
        if mask.as_array().shape() != shape.as_slice() {
            return Err(super::errors::to_py(crate::Error::arg(format!(
                "input_ids {:?} and attention_mask {:?} differ in shape",
                shape,
                mask.as_array().shape()
            ))));
        }
        if shape[1] == 0 && shape[0] > 0 {
            return Err(super::errors::to_py(crate::Error::arg(format!("input_ids {shape:?} has no tokens"))));
        }
        let vocab = self.inner.cfg.vocab_size;
        if let Some(bad) = crate::error::first_out_of_range(ids.as_array().iter().copied(), vocab) {
            return Err(super::errors::to_py(crate::Error::arg(format!(
                "input_ids: token id {bad} is out of range for a vocabulary of {vocab}"
            ))));
        }
        if let Some(bad) = mask.as_array().iter().find(|&&m| m != 0 && m != 1) {
            return Err(super::errors::to_py(crate::Error::arg(format!("attention_mask holds {bad}: only 0 and 1"))));
        }
        let ids: Vec<u32> = ids.as_array().iter().map(|&x| x as u32).collect();
        let mask: Vec<u32> = mask.as_array().iter().map(|&x| x as u32).collect();
        let (h, e) = py
            .detach(|| -> crate::Result<_> {
                let dev = &self.inner.device;
                for row in ids.chunks(shape[1].max(1)) {
                    self.inner.check_ids(row, "input_ids")?;
                }
                let ids = candle_core::Tensor::from_vec(ids, (shape[0], shape[1]), dev)?;
                let mask = candle_core::Tensor::from_vec(mask, (shape[0], shape[1]), dev)?;
                self.inner.encoder_forward(&ids, &mask)
            })
            .py()?;
        Ok((to_numpy(py, &h)?, to_numpy(py, &e)?))
    }
}
