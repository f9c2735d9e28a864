//! The layers every model is built from, on tensors: each holds its weights and calls the CPU kernels
//! (`crate::kernels`) where they apply, Candle elsewhere.
//!
//! - `linear`: the one `Linear` (dense, llama.cpp blocks, Candle's quantized matmul, or split parts);
//! - `norm`: RMSNorm and LayerNorm;
//! - `embedding`: token and position lookups;
//! - `kv_cache`: the keys and values of every layer, grown in place;
//! - `paged`: the block pool that a server's many sequences share, with the prefix cache, and attention over it.

pub mod embedding;
pub mod kv_cache;
pub mod linear;
pub mod norm;
pub mod paged;

pub use embedding::{embed, positions, Table};
pub use kv_cache::Cache;
pub use linear::{compute_dtype, Linear};
pub use norm::Norm;
pub use paged::{KvPool, Logits, PagedSeq, PagedStep};
