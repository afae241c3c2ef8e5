//! attnrt-cuda: the CUDA executor of the attnrt attention layer (SPEC.md) on one GPU.
//!
//! * Projections through cuBLAS (one fused q/k/v GEMM, one output GEMM), with bias.
//! * One fused pass per token for bias, QK RMSNorm (full or per head) and rotary embedding
//!   (interleaved or half-split, rows of the caller's cos/sin table).
//! * Masked flash attention: one CTA per (batch row, KV head, query tile) with the R query heads
//!   of the KV head packed together, online softmax in f32, every mask rule (causal, window,
//!   padding, document ids, varlen segments) with per-tile skipping. bf16 / f16 storage runs on
//!   tensor cores (`mma.sync` m16n8k16, f32 accumulation; on sm_90 with head_dim 128, Hopper's
//!   warpgroup MMA with a pipelined copy of K/V); f32 storage runs on CUDA cores for exactness.
//!   [`capability`] says which path a (precision, head_dim, group) gets, [`capability_on`] which
//!   one a given architecture gets.
//! * [`MultiGpuLayer`]: the layer split by heads over several GPUs of one host (the runtime's
//!   `ShardPlan`), partial outputs summed with an NCCL all-reduce (or returned per device);
//!   sequence-parallel inputs and outputs (tokens sharded across the devices, NCCL all-gather
//!   before the projections and reduce-scatter after).
//!
//! Built without the `cuda` feature, the same API compiles and every constructor returns
//! [`Error::NoCuda`] ("attnrt built without CUDA"), so the workspace builds and tests on machines
//! without the toolchain.
//!
//! ```no_run
//! # fn main() -> Result<(), attnrt_cuda::Error> {
//! use attnrt::{Config, Inputs, Layer, LayerWeights, Tensor};
//! use attnrt_cuda::{GpuLayer, GpuOptions, Precision};
//! let cfg = Config::new(64, 4);
//! let w = vec![0.01f32; 64 * 64];
//! let weights = LayerWeights {
//!     wq: Tensor::F32(&w), wk: Tensor::F32(&w), wv: Tensor::F32(&w), wo: Tensor::F32(&w),
//!     bq: None, bk: None, bv: None, bo: None, q_norm: None, k_norm: None,
//! };
//! let layer = Layer::new(cfg, weights)?;
//! let mut gpu = GpuLayer::new(layer, GpuOptions::new(Precision::Bf16, 1, 128))?;
//! let x = vec![0.5f32; 128 * 64];
//! let mut y = vec![0.0f32; 128 * 64];
//! let run = gpu.forward_host(&Inputs::new(&x, 1, 128), &mut y)?;
//! println!("ran on {run}");
//! # Ok(()) }
//! ```
#![deny(missing_docs)]
#![deny(unsafe_op_in_unsafe_fn)]
#![warn(clippy::undocumented_unsafe_blocks)]

mod error;
pub mod plan;

#[cfg(feature = "cuda")]
mod cublas;
#[cfg(feature = "cuda")]
mod gpu;
#[cfg(feature = "cuda")]
mod nccl;
#[cfg(not(feature = "cuda"))]
mod stub;

pub use error::{Error, Result};
#[cfg(feature = "cuda")]
pub use gpu::{
    CachedDeviceCall, DeviceCall, DeviceTiming, GpuKvCache, GpuLayer, MultiGpuKvCache,
    MultiGpuLayer, RopeSource, SeqParallelCall,
};
pub use plan::{
    capability, capability_on, AttnPath, DecodeTuning, GpuBackend, GpuOptions, Precision,
    ReduceOptions, StepGraphLayout,
};
#[cfg(not(feature = "cuda"))]
pub use stub::{
    CachedDeviceCall, DeviceCall, DeviceTiming, GpuKvCache, GpuLayer, MultiGpuKvCache,
    MultiGpuLayer, RopeSource, SeqParallelCall,
};

/// Whether this build has the CUDA executor (the `cuda` feature).
pub const fn built_with_cuda() -> bool {
    cfg!(feature = "cuda")
}

/// How many CUDA devices the driver reports (0 without CUDA, driver or device).
pub fn device_count() -> usize {
    #[cfg(feature = "cuda")]
    {
        gpu::device_count()
    }
    #[cfg(not(feature = "cuda"))]
    {
        0
    }
}

/// Why no CUDA device can be used right now, or `None` when one can: the crate was built
/// without CUDA, the driver is missing or fails to initialise, or it reports no device. GPU
/// tests print this reason when they skip.
pub fn no_device_reason() -> Option<String> {
    #[cfg(feature = "cuda")]
    {
        gpu::no_device_reason()
    }
    #[cfg(not(feature = "cuda"))]
    {
        Some("attnrt built without CUDA (feature `cuda` off)".to_string())
    }
}
