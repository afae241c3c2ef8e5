//! attnrt: the causal self-attention layer of modern LLMs, `no_std` and heap-free.
//!
//! The contract is `SPEC.md`: grouped-query attention, optional biases, QK RMSNorm (per head or
//! over all heads), rotary embedding (interleaved or half-split, caller tables or built from
//! theta with llama3/yarn scaling, explicit positions) and every mask: causal, sliding window,
//! padding lengths, document ids and varlen segments, in any combination.
//!
//! The crate owns no memory: weights are borrowed ([`Tensor`], [`LayerWeights`]), scratch comes
//! from a caller workspace sized by a `const fn` ([`workspace_len`]), and every failure is an
//! [`Error`] value with the output left untouched.
//!
//! ```
//! use attnrt::{Config, Inputs, Layer, LayerWeights, Tensor, workspace_len};
//! const CFG: Config = Config::new(8, 2);
//! const WS: usize = workspace_len(&CFG, 4);
//! let w = [0.01f32; 64];
//! let weights = LayerWeights {
//!     wq: Tensor::F32(&w), wk: Tensor::F32(&w), wv: Tensor::F32(&w), wo: Tensor::F32(&w),
//!     bq: None, bk: None, bv: None, bo: None, q_norm: None, k_norm: None,
//! };
//! let layer = Layer::new(CFG, weights)?;
//! let x = [1.0f32; 4 * 8];
//! let (mut ws, mut y) = ([0.0f32; WS], [0.0f32; 4 * 8]);
//! let backend = layer.forward_reference(&Inputs::new(&x, 1, 4), &mut ws, &mut y)?;
//! assert_eq!(backend, attnrt::Backend::Reference);
//! # Ok::<(), attnrt::Error>(())
//! ```
#![no_std]
#![deny(missing_docs)]
#![deny(unsafe_op_in_unsafe_fn)]
#![warn(clippy::undocumented_unsafe_blocks)]

#[cfg(any(test, feature = "std"))]
extern crate std;

mod fmt;

mod backend;
mod config;
mod cpu;
mod error;
pub mod kv;
mod layer;
mod linear;
pub mod mask;
mod norm;
mod parallel;
#[cfg(feature = "std")]
mod pool;
mod reference;
pub mod rope;
pub mod shard;
mod tensor;

pub use backend::Backend;
pub use config::{BiasFlags, Config, Positional, QkNorm, Rope, RopeConvention, RopeScaling};
pub use cpu::{cpu_tier, cpu_workspace_len};
pub use error::{Error, Result};
#[cfg(feature = "std")]
pub use kv::PoolMemory;
pub use kv::{cached_workspace_len, kv_pool_len, KvCache, KvGeometry, KvPool, Sequence};
pub use layer::{Inputs, Layer, NormPart};
pub use mask::MaskInputs;
#[cfg(feature = "std")]
pub use parallel::ScopedThreads;
pub use parallel::{ParallelFor, Sequential};
#[cfg(feature = "std")]
pub use pool::{ThreadPool, DEFAULT_SPIN};
pub use reference::reference_workspace_len;
pub use rope::RopeTable;
pub use shard::{DeviceShard, ShardLayer, ShardPlan, ShardedLayer};
pub use tensor::{DType, LayerWeights, Tensor};

/// f32 elements of workspace that any CPU executor of this crate needs for a forward call over
/// rows of up to `max_seq_len` tokens with `cfg`. `const`, so a static arena can be sized from it.
pub const fn workspace_len(cfg: &Config, max_seq_len: usize) -> usize {
    reference_workspace_len(cfg, max_seq_len)
}
