//! `_native.Engine`: the scheduler for a server or any caller with many requests. `add` and `abort` may come
//! from any thread at any time (they wait in the scheduler's inbox); `step` runs one step with the GIL released
//! and is meant to be called from one loop thread.

use std::sync::{Arc, Mutex};

use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};

use super::generate::params_from;
use super::model::PyModel;
use super::PyResultExt;
use super::errors::detach;
use crate::scheduler::{Handle, Scheduler, SchedulerConfig};

/// A token's logprob as Python gets it: (token, logprob, [(alternative, logprob), ...]).
type LogprobRow = (u32, f64, Vec<(u32, f64)>);

#[pyclass(name = "Engine", module = "candlewick._native", frozen)]
pub struct PyEngine {
    handle: Arc<Handle>,
    sched: Mutex<Scheduler>,
}

impl PyEngine {
    fn lock(&self) -> std::sync::MutexGuard<'_, Scheduler> {
        self.sched.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[pymethods]
impl PyEngine {
    #[new]
    #[pyo3(signature = (model, kv_cache_tokens = None, max_batch_tokens = 512, max_seqs = 256))]
    fn new(py: Python<'_>, model: PyRef<'_, PyModel>, kv_cache_tokens: Option<usize>, max_batch_tokens: usize, max_seqs: usize) -> PyResult<Self> {
        let m = model.inner.clone();
        let sched = py
            .detach(|| {
                let cfg = SchedulerConfig::new(&m, kv_cache_tokens, max_batch_tokens, max_seqs)?;
                Scheduler::new(m, cfg)
            })
            .py()?;
        Ok(Self { handle: sched.handle(), sched: Mutex::new(sched) })
    }

    /// Queue a request (token ids, generation parameters as `generate` takes them); returns (request id, the
    /// prompt ids as they run). Bad parameters raise InvalidArgument here, before anything is queued.
    #[pyo3(signature = (prompt, params, what = "prompt"))]
    fn add(&self, prompt: Vec<u32>, params: &Bound<'_, PyDict>, what: &str) -> PyResult<(u64, Vec<u32>)> {
        let params = params_from(params)?;
        self.handle.add(prompt, params, what).py()
    }

    /// Stop a request at the next step (its blocks go back to the pool).
    fn abort(&self, request: u64) {
        self.handle.abort(request);
    }

    /// One step; returns a list of (request, choice, text, token_ids, logprobs, finish_reason, prompt_tokens,
    /// cached_tokens, error), logprobs as (token, logprob, [(token, logprob), ...]) per new token; error (None, or
    /// why that sequence failed while the others went on) comes with its last delta.
    fn step<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let deltas = detach(py, "step", || self.lock().step()).py()?;
        let out = PyList::empty(py);
        for d in deltas {
            let lps: Vec<LogprobRow> = d.logprobs.into_iter().map(|l| (l.token, l.logprob, l.top)).collect();
            out.append((d.request, d.choice, d.text, d.tokens, lps, d.finish.map(|f| f.as_str()), d.prompt_tokens, d.cached_tokens, d.error))?;
        }
        Ok(out)
    }

    /// Whether any request is running, waiting or queued.
    fn has_work(&self, py: Python<'_>) -> bool {
        py.detach(|| self.lock().has_work())
    }

    /// Sequences running and waiting, KV blocks (size, total, used, cached) and the counters since start.
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let s = py.detach(|| self.lock().stats());
        let d = PyDict::new(py);
        d.set_item("running", s.running)?;
        d.set_item("waiting", s.waiting)?;
        d.set_item("block_size", s.block_size)?;
        d.set_item("kv_blocks", s.kv_blocks)?;
        d.set_item("kv_blocks_used", s.kv_blocks_used)?;
        d.set_item("kv_blocks_cached", s.kv_blocks_cached)?;
        let c = s.counters;
        d.set_item("steps", c.steps)?;
        d.set_item("prompt_tokens", c.prompt_tokens)?;
        d.set_item("cached_prompt_tokens", c.cached_prompt_tokens)?;
        d.set_item("computed_tokens", c.computed_tokens)?;
        d.set_item("generated_tokens", c.generated_tokens)?;
        d.set_item("preemptions", c.preemptions)?;
        d.set_item("aborted", c.aborted)?;
        Ok(d)
    }

    /// kv_cache_tokens, max_batch_tokens, max_seqs and block_size as this engine runs.
    #[getter]
    fn config<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let s = self.lock();
        let c = s.config();
        let d = PyDict::new(py);
        d.set_item("kv_cache_tokens", c.kv_tokens.div_ceil(c.block_size) * c.block_size)?;
        d.set_item("max_batch_tokens", c.max_batch_tokens)?;
        d.set_item("max_seqs", c.max_seqs)?;
        d.set_item("block_size", c.block_size)?;
        Ok(d)
    }
}
