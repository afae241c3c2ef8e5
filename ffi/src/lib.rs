//! The C ABI of attnrt.
//!
//! The header `ffi/include/attnrt.h` is generated from this crate by a pinned cbindgen
//! (`ffi/regen-header.sh`) and committed. Every exported function:
//!
//! - returns an [`attnrt_status`] (or nothing, for `_free`), never panics across the boundary
//!   (a panic becomes [`attnrt_status::ATTNRT_STATUS_PANIC`]);
//! - null-checks every pointer and checks every length against the shapes of the call;
//! - writes its outputs only on success: on any error the caller's output buffers are untouched;
//! - records a message for a failure in a thread-local slot that
//!   [`attnrt_error_message`] copies out (a successful call clears it).
//!
//! Enumerations that the caller passes in (`dtype`, `backend`, `qk_norm`, ...) are taken as
//! `uint32_t` and converted here, so an out-of-range value is a status
//! ([`attnrt_status::ATTNRT_STATUS_BAD_ENUM`]), never undefined behaviour.
//!
//! Ownership: a layer handle ([`attnrt_layer`]) owns a copy of the configuration and of every
//! weight tensor, so the caller's weight buffers may be freed as soon as [`attnrt_layer_new`]
//! returns. The handle is immutable after creation and may be used by many threads at once for
//! forward calls; it must be freed exactly once, with [`attnrt_layer_free`], after every call
//! using it has returned.
#![deny(missing_docs)]
#![deny(unsafe_op_in_unsafe_fn)]
#![warn(clippy::undocumented_unsafe_blocks)]
#![allow(non_camel_case_types)]

mod backend;
mod config;
mod cuda;
mod cuda_multi;
mod cuda_multi_kv;
mod error;
mod kv;
mod layer;
mod panic;
mod pool;
mod ptr;
mod shard;
mod status;
mod table;
mod thread_pool;

pub use backend::{
    attnrt_backend, attnrt_capability, attnrt_cpu_tier, attnrt_simd_tier, attnrt_simd_tier_name,
};
pub use config::{
    attnrt_config, attnrt_config_default, attnrt_qk_norm, attnrt_rope_convention,
    attnrt_rope_scaling,
};
pub use cuda::{
    attnrt_cuda_capability, attnrt_cuda_capability_on_arch, attnrt_cuda_device_args,
    attnrt_cuda_device_args_init, attnrt_cuda_forward_device, attnrt_cuda_forward_host,
    attnrt_cuda_layer, attnrt_cuda_layer_backend, attnrt_cuda_layer_free, attnrt_cuda_layer_new,
    attnrt_cuda_precision,
};
pub use cuda_multi::{
    attnrt_cuda_device_count, attnrt_cuda_multi_forward_host, attnrt_cuda_multi_forward_seq_device,
    attnrt_cuda_multi_forward_seq_host, attnrt_cuda_multi_last_nccl_ms, attnrt_cuda_multi_layer,
    attnrt_cuda_multi_layer_backend, attnrt_cuda_multi_layer_free,
    attnrt_cuda_multi_layer_n_devices, attnrt_cuda_multi_layer_new, attnrt_cuda_multi_layer_shard,
    attnrt_cuda_multi_seq_args, attnrt_cuda_multi_seq_args_init, attnrt_cuda_multi_token_range,
    attnrt_device_shard,
};
pub use cuda_multi_kv::{
    attnrt_cuda_multi_cached_device_args, attnrt_cuda_multi_cached_device_args_init,
    attnrt_cuda_multi_forward_cached, attnrt_cuda_multi_forward_cached_device,
    attnrt_cuda_multi_kv_cache, attnrt_cuda_multi_kv_cache_free, attnrt_cuda_multi_kv_cache_new,
    attnrt_cuda_multi_kv_cache_read_f32, attnrt_cuda_multi_kv_cache_size,
};
pub use error::attnrt_error_message;
pub use kv::{
    attnrt_cached_args, attnrt_cached_args_init, attnrt_cached_workspace_size,
    attnrt_forward_cached, attnrt_kv_cache, attnrt_kv_cache_drop_blocks, attnrt_kv_cache_free,
    attnrt_kv_cache_new, attnrt_kv_cache_read_f32, attnrt_kv_cache_reset, attnrt_kv_cache_size,
    attnrt_rope_table, attnrt_sequence,
};
pub use layer::{
    attnrt_dtype, attnrt_forward, attnrt_forward_args, attnrt_forward_args_init, attnrt_layer,
    attnrt_layer_free, attnrt_layer_new, attnrt_parallel_for_fn, attnrt_task_fn, attnrt_tensor,
    attnrt_weights, attnrt_workspace_size,
};
pub use shard::{
    attnrt_shard_mode, attnrt_sharded_forward, attnrt_sharded_layer, attnrt_sharded_layer_free,
    attnrt_sharded_layer_new, attnrt_sharded_workspace_size,
};
pub use status::{attnrt_status, attnrt_status_name};
pub use thread_pool::{
    attnrt_thread_pool, attnrt_thread_pool_free, attnrt_thread_pool_new,
    attnrt_thread_pool_parallel_for,
};

/// Major version of the library; equal to the crate's (checked at compile time).
pub const ATTNRT_VERSION_MAJOR: u32 = 0;
/// Minor version of the library; equal to the crate's (checked at compile time).
pub const ATTNRT_VERSION_MINOR: u32 = 1;
/// Patch version of the library; equal to the crate's (checked at compile time).
pub const ATTNRT_VERSION_PATCH: u32 = 0;

/// Parses a decimal version component at compile time.
const fn parse_u32(s: &str) -> u32 {
    let b = s.as_bytes();
    let mut i = 0;
    let mut v = 0u32;
    while i < b.len() {
        assert!(b[i].is_ascii_digit(), "version component is not a number");
        v = v * 10 + (b[i] - b'0') as u32;
        i += 1;
    }
    v
}

// The header's macros are these constants; a release that bumps Cargo.toml without them fails
// to build.
const _: () = assert!(parse_u32(env!("CARGO_PKG_VERSION_MAJOR")) == ATTNRT_VERSION_MAJOR);
const _: () = assert!(parse_u32(env!("CARGO_PKG_VERSION_MINOR")) == ATTNRT_VERSION_MINOR);
const _: () = assert!(parse_u32(env!("CARGO_PKG_VERSION_PATCH")) == ATTNRT_VERSION_PATCH);

/// The library's version as a NUL-terminated string `"MAJOR.MINOR.PATCH"`, from Cargo.toml.
///
/// The returned pointer is static: never free it. Thread-safe.
#[no_mangle]
pub extern "C" fn attnrt_version() -> *const core::ffi::c_char {
    concat!(env!("CARGO_PKG_VERSION"), "\0").as_ptr().cast()
}
