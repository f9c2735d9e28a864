//! Generation from Python: `generate` (whole completions) and `stream` (an iterator of text pieces), plus the
//! sampling maths on its own for tests.

use std::sync::Mutex;

use numpy::{PyArray1, PyReadonlyArray1};
use pyo3::exceptions::PyStopIteration;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};

use super::model::PyModel;
use super::PyResultExt;
use super::errors::detach;
use crate::constraint::Grammar;
use crate::error::Error;
use crate::generate::{Completion, GenParams, Generation};
use crate::sampling::{sampling_probs, History, Rng, LogitsParams};

fn arg_err(field: &str, e: PyErr, py: Python<'_>) -> PyErr {
    super::errors::to_py(Error::arg(format!("{field}: {}", e.value(py))))
}

fn get<'py, T: FromPyObjectOwned<'py>>(d: &Bound<'py, PyDict>, key: &str, default: T) -> PyResult<T> {
    match d.get_item(key)? {
        Some(v) if !v.is_none() => v.extract::<T>().map_err(|e| arg_err(key, e.into(), d.py())),
        _ => Ok(default),
    }
}

fn non_negative(d: &Bound<'_, PyDict>, key: &str, default: i64) -> PyResult<usize> {
    let v: i64 = get(d, key, default)?;
    if v < 0 {
        return Err(super::errors::to_py(Error::arg(format!("{key} must be >= 0, got {v}"))));
    }
    Ok(v as usize)
}

/// Sampling parameters from a dict (missing keys take the documented defaults).
pub(crate) fn sampling_from(d: &Bound<'_, PyDict>) -> PyResult<LogitsParams> {
    let mut bias = Vec::new();
    if let Some(b) = d.get_item("logit_bias")? {
        if !b.is_none() {
            let b = b.cast::<PyDict>().map_err(|e| arg_err("logit_bias", e.into(), d.py()))?;
            for (k, v) in b.iter() {
                // OpenAI's JSON gives ids as strings
                let id: i64 = match k.extract::<i64>() {
                    Ok(i) => i,
                    Err(_) => k
                        .extract::<String>()
                        .ok()
                        .and_then(|s| s.trim().parse().ok())
                        .ok_or_else(|| super::errors::to_py(Error::arg(format!("logit_bias: key {k} is not a token id"))))?,
                };
                if id < 0 || id > u32::MAX as i64 {
                    return Err(super::errors::to_py(Error::arg(format!("logit_bias: token id {id} is out of range"))));
                }
                let bias_v: f64 = v.extract().map_err(|e: PyErr| arg_err("logit_bias value", e, d.py()))?;
                bias.push((id as u32, bias_v));
            }
        }
    }
    Ok(LogitsParams {
        temperature: get(d, "temperature", 1.0)?,
        top_k: non_negative(d, "top_k", 0)?,
        top_p: get(d, "top_p", 1.0)?,
        min_p: get(d, "min_p", 0.0)?,
        repetition_penalty: get(d, "repetition_penalty", 1.0)?,
        presence_penalty: get(d, "presence_penalty", 0.0)?,
        frequency_penalty: get(d, "frequency_penalty", 0.0)?,
        logit_bias: bias,
    })
}

/// Choices per prompt, at most (OpenAI's limit for n).
const MAX_N: i64 = 128;
/// Top alternatives per token, at most (OpenAI's limit for top_logprobs).
const MAX_LOGPROBS: i64 = 20;

pub(crate) fn params_from(d: &Bound<'_, PyDict>) -> PyResult<GenParams> {
    let n: i64 = get(d, "n", 1)?;
    if !(1..=MAX_N).contains(&n) {
        return Err(super::errors::to_py(Error::arg(format!("n must be in 1..={MAX_N} (OpenAI's limit), got {n}"))));
    }
    let stop: Vec<String> = match d.get_item("stop")? {
        Some(s) if s.is_instance_of::<pyo3::types::PyString>() => vec![s.extract()?],
        Some(s) if !s.is_none() => s.extract().map_err(|e: PyErr| arg_err("stop", e, d.py()))?,
        _ => vec![],
    };
    let ids: Vec<i64> = get(d, "stop_token_ids", vec![])?;
    if let Some(bad) = crate::error::first_out_of_range(ids.iter().copied(), 1 << 32) {
        return Err(super::errors::to_py(Error::arg(format!("stop_token_ids: {bad} is out of range"))));
    }
    let seed: Option<i64> = get(d, "seed", None)?;
    let logprobs: Option<i64> = get(d, "logprobs", None)?;
    if let Some(l) = logprobs.filter(|l| !(0..=MAX_LOGPROBS).contains(l)) {
        return Err(super::errors::to_py(Error::arg(format!("logprobs must be in 0..={MAX_LOGPROBS} (OpenAI's limit), got {l}"))));
    }
    Ok(GenParams {
        max_new_tokens: non_negative(d, "max_new_tokens", 16)?,
        sampling: sampling_from(d)?,
        stop,
        stop_token_ids: ids.into_iter().map(|i| i as u32).collect(),
        ignore_eos: get(d, "ignore_eos", false)?,
        seed: seed.map(|s| s as u64),
        n: n as usize,
        logprobs: logprobs.map(|l| l as usize),
        grammar: grammar_from(d)?,
    })
}

/// `constraint`: (kind, text) as candlewick.structured.constraint_from gives it.
fn grammar_from(d: &Bound<'_, PyDict>) -> PyResult<Option<Grammar>> {
    let c: Option<(String, String)> = get(d, "constraint", None)?;
    Ok(match c {
        None => None,
        Some((kind, text)) => Some(match kind.as_str() {
            "json_schema" => Grammar::JsonSchema(text),
            "regex" => Grammar::Regex(text),
            "grammar" => Grammar::Lark(text),
            other => {
                return Err(super::errors::to_py(Error::arg(format!(
                    "constraint: unknown kind {other:?} (json_schema, regex or grammar)"
                ))))
            }
        }),
    })
}

fn completion_to_py<'py>(py: Python<'py>, c: &Completion) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("prompt_token_ids", &c.prompt_token_ids)?;
    let choices = PyList::empty(py);
    for ch in &c.choices {
        let cd = PyDict::new(py);
        cd.set_item("text", &ch.text)?;
        cd.set_item("token_ids", &ch.token_ids)?;
        cd.set_item("finish_reason", ch.finish_reason.as_str())?;
        match &ch.logprobs {
            Some(lps) => {
                let l = PyList::empty(py);
                for lp in lps {
                    l.append((lp.token, lp.logprob, lp.top.clone()))?;
                }
                cd.set_item("logprobs", l)?;
            }
            None => cd.set_item("logprobs", py.None())?,
        }
        choices.append(cd)?;
    }
    d.set_item("choices", choices)?;
    Ok(d)
}

impl PyModel {
    /// Generate for each prompt (token ids); returns one dict per prompt: prompt_token_ids and choices.
    /// `params`: a dict for every prompt, or a list of dicts, one per prompt.
    pub(crate) fn generate_impl<'py>(
        &self,
        py: Python<'py>,
        prompts: Vec<Vec<u32>>,
        params: &Bound<'py, PyAny>,
    ) -> PyResult<Vec<Bound<'py, PyDict>>> {
        let each: Vec<GenParams> = if let Ok(d) = params.cast::<PyDict>() {
            let p = params_from(d)?;
            vec![p; prompts.len()]
        } else {
            let list = params.cast::<PyList>().map_err(|e| arg_err("params", e.into(), py))?;
            if list.len() != prompts.len() {
                return Err(super::errors::to_py(Error::arg(format!(
                    "{} parameter sets for {} prompts: give one per prompt",
                    list.len(),
                    prompts.len()
                ))));
            }
            list.iter().map(|d| params_from(&d.cast_into::<PyDict>().map_err(|e| arg_err("params", e.into(), py))?)).collect::<PyResult<_>>()?
        };
        let model = self.inner.clone();
        let out = detach(py, "generate", || {
                let gen = Generation::new_each(model, prompts.into_iter().zip(each).collect())?;
                // Between steps, let Python run its signal handlers: Ctrl-C interrupts a long generation.
                gen.run(|| Python::attach(|py| py.check_signals()).map_err(|_| Error::Interrupted))
            })
            .py()?;
        out.iter().map(|c| completion_to_py(py, c)).collect()
    }

    /// An iterator of text pieces for one prompt (n must be 1).
    pub(crate) fn stream_impl(&self, py: Python<'_>, prompt: Vec<u32>, params: &Bound<'_, PyDict>) -> PyResult<PyStream> {
        let params = params_from(params)?;
        if params.n != 1 {
            return Err(super::errors::to_py(Error::arg(format!("stream() needs n == 1, got {}", params.n))));
        }
        let model = self.inner.clone();
        let gen = detach(py, "stream_impl", || Generation::new(model, vec![prompt], params)).py()?;
        Ok(PyStream { state: Mutex::new(Some(gen)), result: Mutex::new(None) })
    }
}

#[pyclass(name = "Stream", module = "candlewick._native", frozen)]
pub struct PyStream {
    state: Mutex<Option<Generation>>,
    result: Mutex<Option<Completion>>,
}

#[pymethods]
impl PyStream {
    fn __iter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __next__(&self, py: Python<'_>) -> PyResult<String> {
        // The state is only ever locked with the GIL released, so a step that briefly re-takes the GIL (to run
        // signal handlers) can never wait on a thread that holds the GIL while waiting for this lock.
        let piece = detach(py, "stream", || -> crate::Result<Option<String>> {
                let mut guard = self.state.lock().unwrap_or_else(|p| p.into_inner());
                loop {
                    let Some(gen) = guard.as_mut() else { return Ok(None) };
                    let piece = gen.take_stream_text(0);
                    if !piece.is_empty() {
                        return Ok(Some(piece));
                    }
                    if gen.row_finished(0) || gen.is_done() {
                        let done = guard.take().map(|g| g.into_completions().remove(0));
                        *self.result.lock().unwrap_or_else(|p| p.into_inner()) = done;
                        return Ok(None);
                    }
                    gen.step()?;
                    Python::attach(|py| py.check_signals()).map_err(|_| Error::Interrupted)?;
                }
            })
            .py()?;
        piece.ok_or_else(|| PyStopIteration::new_err(()))
    }

    /// Stop generating now (what closing the iterator does).
    fn close(&self, py: Python<'_>) {
        py.detach(|| self.state.lock().unwrap_or_else(|p| p.into_inner()).take());
    }

    /// The finished completion (after the stream is exhausted), as `generate` would return it.
    fn result<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyDict>>> {
        match &*self.result.lock().unwrap_or_else(|p| p.into_inner()) {
            Some(c) => Ok(Some(completion_to_py(py, c)?)),
            None => Ok(None),
        }
    }
}

/// The distribution the engine samples the next token from (float64 [V]), for given logits and history.
#[pyfunction(name = "sampling_probs")]
#[pyo3(signature = (logits, prompt_ids, generated_ids, params))]
fn sampling_probs_py<'py>(
    py: Python<'py>,
    logits: PyReadonlyArray1<'py, f32>,
    prompt_ids: Vec<u32>,
    generated_ids: Vec<u32>,
    params: &Bound<'py, PyDict>,
) -> PyResult<Bound<'py, PyArray1<f64>>> {
    let logits = logits.as_slice()?.to_vec();
    let p = sampling_from(params)?;
    p.validate(logits.len()).py()?;
    let mut hist = History::new(&prompt_ids);
    if let Some(g) = crate::error::first_out_of_range(generated_ids.iter().map(|&i| i64::from(i)), logits.len()) {
        return Err(super::errors::to_py(Error::arg(format!("generated id {g} is out of range"))));
    }
    for &g in &generated_ids {
        hist.push(g);
    }
    if let Some(bad) = crate::error::first_out_of_range(prompt_ids.iter().map(|&i| i64::from(i)), logits.len()) {
        return Err(super::errors::to_py(Error::arg(format!("prompt id {bad} is out of range"))));
    }
    Ok(PyArray1::from_vec(py, sampling_probs(&logits, &hist, &p)))
}

/// `draws` tokens sampled independently from the processed distribution of `logits` (no history), with the
/// engine's random stream for `seed`.
#[pyfunction]
#[pyo3(signature = (logits, seed, draws, params))]
fn sample_tokens<'py>(
    py: Python<'py>,
    logits: PyReadonlyArray1<'py, f32>,
    seed: u64,
    draws: usize,
    params: &Bound<'py, PyDict>,
) -> PyResult<Vec<u32>> {
    let logits = logits.as_slice()?.to_vec();
    let p = sampling_from(params)?;
    p.validate(logits.len()).py()?;
    let hist = History::default();
    let probs = sampling_probs(&logits, &hist, &p);
    let mut rng = Rng::new(seed, 0);
    Ok(py.detach(|| (0..draws).map(|_| crate::sampling::draw(&probs, rng.uniform()) as u32).collect()))
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyStream>()?;
    m.add_function(wrap_pyfunction!(sampling_probs_py, m)?)?;
    m.add_function(wrap_pyfunction!(sample_tokens, m)?)?;
    Ok(())
}
