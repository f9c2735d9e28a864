//! The one error type of the engine; the Python bindings map each variant to a `candlewick` exception class.

use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A checkpoint, config or weight file that cannot be used (missing, truncated, malformed, mismatched).
    #[error("{0}")]
    ModelLoad(String),
    /// tokenizer.json / tokenizer_config.json problems, and ids the vocabulary does not have.
    #[error("{0}")]
    Tokenizer(String),
    /// A caller-supplied value that is out of range or of the wrong shape.
    #[error("{0}")]
    InvalidArgument(String),
    /// A device that this build or this machine cannot provide.
    #[error("{0}")]
    Device(String),
    /// The user interrupted a long computation (Ctrl-C).
    #[error("interrupted")]
    Interrupted,
    /// A bug: a panic inside the engine, caught at the Python boundary (see py::errors::detach).
    #[error("{0}")]
    Internal(String),
    /// Anything Candle reports that is not one of the above.
    #[error("candle: {}", first_line(.0))]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, Error>;

/// Candle appends a backtrace to its messages when RUST_BACKTRACE is set; users get the message itself.
pub(crate) fn first_line(e: &candle_core::Error) -> String {
    e.to_string().lines().next().unwrap_or_default().to_string()
}

/// The first token id that is not in 0..limit (ids arrive from Python as i64, possibly negative or huge).
pub fn first_out_of_range(ids: impl IntoIterator<Item = i64>, limit: usize) -> Option<i64> {
    ids.into_iter().find(|&i| i < 0 || i as u64 >= limit as u64)
}

impl Error {
    pub fn load(path: impl AsRef<Path>, msg: impl std::fmt::Display) -> Self {
        Error::ModelLoad(format!("{}: {msg}", path.as_ref().display()))
    }
    pub fn tok(msg: impl Into<String>) -> Self {
        Error::Tokenizer(msg.into())
    }
    pub fn arg(msg: impl Into<String>) -> Self {
        Error::InvalidArgument(msg.into())
    }
}

/// `bail!(InvalidArgument, "...")`-style early return.
#[macro_export]
macro_rules! bail {
    ($kind:ident, $($fmt:tt)*) => {
        return Err($crate::error::Error::$kind(format!($($fmt)*)))
    };
}
