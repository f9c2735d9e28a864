//! `_native.Tokenizer` and its streaming decoder.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use pyo3::prelude::*;

use super::PyResultExt;
use super::errors::detach;
use crate::error::Error;
use crate::tokenizer::{IncrementalDecoder, Tokenizer};

#[pyclass(name = "Tokenizer", module = "candlewick._native", frozen)]
pub struct PyTokenizer {
    pub(crate) inner: Arc<Tokenizer>,
}

/// Token ids arrive as Python ints (possibly negative or huge); range-check them before they become u32.
pub(crate) fn to_ids(ids: Vec<i64>, vocab: usize) -> crate::Result<Vec<u32>> {
    match crate::error::first_out_of_range(ids.iter().copied(), vocab) {
        Some(bad) => Err(Error::tok(format!("token id {bad} is out of range for a vocabulary of {vocab}"))),
        None => Ok(ids.into_iter().map(|i| i as u32).collect()),
    }
}

#[pymethods]
impl PyTokenizer {
    #[staticmethod]
    fn from_pretrained(py: Python<'_>, path: std::path::PathBuf) -> PyResult<Self> {
        let tok = detach(py, "from_pretrained", || Tokenizer::from_pretrained(&path)).py()?;
        Ok(Self { inner: Arc::new(tok) })
    }

    #[pyo3(signature = (text, add_special_tokens = true))]
    fn encode(&self, py: Python<'_>, text: &str, add_special_tokens: bool) -> PyResult<Vec<u32>> {
        let text = text.to_owned();
        detach(py, "encode", || self.inner.encode(&text, add_special_tokens)).py()
    }

    #[pyo3(signature = (texts, add_special_tokens = true))]
    fn encode_batch(&self, py: Python<'_>, texts: Vec<String>, add_special_tokens: bool) -> PyResult<Vec<Vec<u32>>> {
        detach(py, "encode_batch", || self.inner.encode_batch(&texts, add_special_tokens)).py()
    }

    #[pyo3(signature = (ids, skip_special_tokens = true))]
    fn decode(&self, py: Python<'_>, ids: Vec<i64>, skip_special_tokens: bool) -> PyResult<String> {
        let ids = to_ids(ids, self.inner.vocab_size()).py()?;
        detach(py, "decode", || self.inner.decode(&ids, skip_special_tokens)).py()
    }

    fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    fn id_to_token(&self, id: i64) -> PyResult<String> {
        let id = to_ids(vec![id], self.inner.vocab_size()).py()?[0];
        self.inner.id_to_token(id).ok_or_else(|| super::errors::to_py(Error::tok(format!("no token has id {id}"))))
    }

    #[getter]
    fn vocab_size(&self) -> usize {
        self.inner.vocab_size()
    }
    #[getter]
    fn bos_token_id(&self) -> Option<u32> {
        self.inner.bos_token_id
    }
    #[getter]
    fn pad_token_id(&self) -> Option<u32> {
        self.inner.pad_token_id
    }
    #[getter]
    fn eos_token_ids(&self) -> Vec<u32> {
        self.inner.eos_token_ids.clone()
    }
    #[getter]
    fn chat_template(&self) -> Option<String> {
        self.inner.chat_template.clone()
    }
    #[getter]
    fn special_tokens(&self) -> BTreeMap<String, String> {
        self.inner.special_tokens.clone()
    }
    #[getter]
    fn source(&self) -> String {
        self.inner.source.display().to_string()
    }

    #[pyo3(signature = (skip_special_tokens = true))]
    fn decoder(&self, skip_special_tokens: bool) -> PyIncrementalDecoder {
        PyIncrementalDecoder {
            tok: self.inner.clone(),
            state: Mutex::new(IncrementalDecoder::new(skip_special_tokens)),
        }
    }
}

/// Feed ids one at a time with `step`; call `finish` at the end. Pieces join to `decode(all ids)`.
#[pyclass(name = "IncrementalDecoder", module = "candlewick._native", frozen)]
pub struct PyIncrementalDecoder {
    tok: Arc<Tokenizer>,
    state: Mutex<IncrementalDecoder>,
}

#[pymethods]
impl PyIncrementalDecoder {
    /// The text this token completes ("" while a character or word is still incomplete).
    fn step(&self, id: i64) -> PyResult<String> {
        let id = to_ids(vec![id], self.tok.vocab_size()).py()?[0];
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        Ok(st.step(&self.tok, id).py()?.unwrap_or_default())
    }

    /// Everything not yet emitted, once no more tokens will come.
    fn finish(&self) -> PyResult<String> {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        st.finish(&self.tok).py()
    }

    #[getter]
    fn ids(&self) -> Vec<u32> {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).ids().to_vec()
    }
}
