//! Map `crate::Error` onto the exception classes defined in python/candlewick/errors.py.

use pyo3::exceptions::PyKeyboardInterrupt;
use pyo3::prelude::*;

use crate::error::Error;

fn class_name(e: &Error) -> &'static str {
    match e {
        Error::ModelLoad(_) => "ModelLoadError",
        Error::Tokenizer(_) => "TokenizerError",
        Error::InvalidArgument(_) => "InvalidArgument",
        Error::Device(_) => "DeviceError",
        Error::Interrupted | Error::Candle(_) | Error::Internal(_) => "CandlewickError",
    }
}

pub(crate) fn to_py(e: Error) -> PyErr {
    if let Error::Interrupted = e {
        return PyKeyboardInterrupt::new_err("generation interrupted");
    }
    Python::attach(|py| {
        let msg = e.to_string();
        match py.import("candlewick.errors").and_then(|m| m.getattr(class_name(&e))) {
            Ok(cls) => match cls.call1((msg.clone(),)) {
                Ok(inst) => PyErr::from_value(inst),
                Err(err) => err,
            },
            Err(err) => err,
        }
    })
}

pub(crate) trait PyResultExt<T> {
    fn py(self) -> PyResult<T>;
}

impl<T> PyResultExt<T> for crate::Result<T> {
    fn py(self) -> PyResult<T> {
        self.map_err(to_py)
    }
}

/// Run `f` without the GIL, and turn a panic inside it (on this thread or a rayon worker's) into a
/// CandlewickError naming `op`, rather than PyO3's PanicException (a BaseException that `except Exception` does
/// not catch, and that a server would not survive).
pub(crate) fn detach<T: Send>(py: Python<'_>, op: &str, f: impl FnOnce() -> crate::Result<T> + Send) -> crate::Result<T> {
    py.detach(|| {
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|p| {
            let msg = p
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            Err(Error::Internal(format!("internal error in {op}: {msg} (a bug in candlewick: please report it)")))
        })
    })
}

/// A panic inside `detach`, for the test that checks it arrives as a CandlewickError.
#[pyfunction]
pub(crate) fn _panic_for_test(py: Python<'_>, message: String) -> PyResult<()> {
    detach(py, "_panic_for_test", || -> crate::Result<()> { panic!("{message}") }).py()
}
