//! candlewick: Transformer inference on Candle. The core is plain Rust; `py/` holds the only Python bindings.

pub mod error;
pub mod tokenizer;

#[cfg(feature = "python")]
mod py;

pub use error::{Error, Result};
