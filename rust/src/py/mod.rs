//! The Python bindings: type conversion and error mapping only; the work happens in the plain-Rust core.

use pyo3::prelude::*;

mod errors;
mod model;
mod tokenizer;

pub(crate) use errors::PyResultExt;

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_class::<tokenizer::PyTokenizer>()?;
    m.add_class::<tokenizer::PyIncrementalDecoder>()?;
    m.add_class::<model::PyModel>()?;
    Ok(())
}
