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
        Error::Interrupted | Error::Candle(_) => "CandlewickError",
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
