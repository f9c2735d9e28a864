//! The Python bindings: type conversion and error mapping only; the work happens in the plain-Rust core.

use pyo3::prelude::*;

mod bench;
mod engine;
mod errors;
#[cfg(feature = "fuzz")]
mod fuzz;
mod generate;
mod model;
mod ops;
mod tokenizer;

pub(crate) use errors::PyResultExt;

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_class::<tokenizer::PyTokenizer>()?;
    m.add_class::<tokenizer::PyIncrementalDecoder>()?;
    m.add_class::<model::PyModel>()?;
    m.add_class::<engine::PyEngine>()?;
    ops::register(m)?;
    generate::register(m)?;
    bench::register(m)?;
    m.add_function(wrap_pyfunction!(errors::_panic_for_test, m)?)?;
    #[cfg(feature = "fuzz")]
    m.add_function(wrap_pyfunction!(fuzz::_fuzz_coverage, m)?)?;
    Ok(())
}
