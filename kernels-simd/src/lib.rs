//! SIMD numeric primitives for attnrt.
//!
//! The crate knows nothing of layer configurations: it works on slices, and learns which keys a
//! query may see through the [`Visibility`] trait, which the runtime's mask descriptor implements.
//!
//! Every kernel is written once over a small vector trait (`isa::Isa`) and instantiated per
//! [`Tier`] inside a `#[target_feature]` entry point; [`active`] picks the tier at run time.
//! Results are deterministic per tier: the same inputs give bitwise the same outputs, however a
//! caller splits GEMM columns or rows across threads. Different tiers may differ in the last bits
//! (FMA vs separate multiply and add).
//!
//! Tiles: GEMM micro-kernels are scalar 4x4, AVX2 6x16, AVX-512 8x32 and NEON 8x8 (rows x output
//! columns); attention tiles are 16 query tokens x 64 keys on every tier, computed as small GEMMs
//! in register blocks of 6 (AVX2), 8 (AVX-512, NEON) or 4 (scalar) keys or rows x 2 (scalar 4)
//! registers.
#![cfg_attr(not(test), no_std)]
#![deny(missing_docs)]
#![deny(unsafe_op_in_unsafe_fn)]

#[cfg(all(feature = "std", not(test)))]
extern crate std;

mod attend;
mod elem;
mod error;
mod exp;
mod gemm;
mod isa;
mod norm;
mod partial;
mod probe;
mod rope;
mod tier;
mod vecops;
mod visibility;

#[cfg(test)]
mod testutil;

pub use attend::{attend, attend_scratch_len, AttnShape, KvView, ATTN_BK, ATTN_BQ};
pub use elem::Elem;
pub use error::ShapeError;
pub use exp::{exp_f32, exp_inplace};
pub use gemm::{gemm, gemm_cols, gemm_scratch_len, GemmShape, GEMM_NR_MAX};
pub use norm::rmsnorm;
pub use partial::{
    attend_partial, attend_partial_ahead, attend_partial_heads, merge_partial, partial_scratch_len,
    KvRun, PartialRows, CHUNK_MAX, PREFETCH_KEYS,
};
pub use probe::fma_probe;
pub use rope::{rope, RopeStyle};
pub use tier::{active, detected, force, supported, Tier, TierUnavailable};
#[cfg(feature = "std")]
pub use tier::{init_from_env, EnvTierError};
pub use vecops::{axpy, dot, scale};
pub use visibility::{TileClass, Visibility};
