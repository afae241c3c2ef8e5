//! `attnrt_cuda_multi_layer`: one layer split by heads over several GPUs of this process
//! (SPEC.md, "Multi-device head split"), through `attnrt-cuda`'s `MultiGpuLayer`: each device
//! runs its shard on its own stream, and the partial outputs are summed with NCCL (or returned
//! per device, for servers that reduce them themselves).
//!
//! The functions exist in every build, like those of `cuda.rs`; without the `cuda` feature the
//! constructor fails with `ATTNRT_STATUS_BACKEND_UNAVAILABLE` ("attnrt built without CUDA")
//! once its arguments have passed the checks that need no GPU (NULL pointers, precision, an
//! empty or repeated device list, more devices than query heads).
//!
//! Besides the head split on whole activations (every device sees every token), the handle
//! runs sequence-parallel calls: the tokens are cut among the devices, gathered before the
//! projections and reduce-scattered after, so that each device holds only its rows of `x` and
//! of `y` (`attnrt_cuda_multi_forward_seq_host` / `_device`).

use core::ffi::c_char;
use core::mem::ManuallyDrop;
use std::sync::{Mutex, MutexGuard, PoisonError};

use attnrt::{MaskInputs, ShardPlan};
use attnrt_cuda::{GpuOptions, MultiGpuLayer, Precision, SeqParallelCall};

use crate::backend::attnrt_backend;
use crate::cuda::{check_text_out, forward_host_with, host_rope, precision, write_text};
use crate::error::{FfiError, FfiResult};
use crate::layer::{attnrt_forward_args, attnrt_layer};
use crate::panic::guard;
use crate::ptr::{as_ref, check_out, free_boxed, opt_slice, slice, write_out};
use crate::shard::attnrt_shard_mode;
use crate::status::attnrt_status;

/// A layer split by heads over the GPUs of a device list: a private copy of the layer, the
/// plan (which heads each device owns), and on each device its shard's weights uploaded in the
/// chosen precision and buffers sized for calls of up to `max_batch` rows of `max_seq_len`
/// tokens; NCCL communicators link the devices.
///
/// Opaque. Calls on one handle are serialized by a lock inside it (the device buffers are
/// reused by every call); the queries that only read the plan take no lock.
pub struct attnrt_cuda_multi_layer {
    /// Declared first, dropped first (by hand): it borrows `host`.
    multi: ManuallyDrop<Mutex<MultiGpuLayer<'static>>>,
    /// The copy of the layer that `multi` borrows; owned (from `Box::into_raw`), freed last.
    host: *mut attnrt_layer,
    /// The head split, for lock-free queries.
    pub(crate) plan: ShardPlan,
    /// The CUDA ordinals, rank by rank.
    pub(crate) devices: Vec<u32>,
    /// The storage precision of the shards (and of their KV caches).
    pub(crate) precision: Precision,
}

impl attnrt_cuda_multi_layer {
    /// The layer; a panic during an earlier call does not make the handle unusable.
    pub(crate) fn lock(&self) -> MutexGuard<'_, MultiGpuLayer<'static>> {
        self.multi.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The unsplit layer's configuration.
    pub(crate) fn config(&self) -> &attnrt::Config {
        // SAFETY: `host` lives as long as the handle and is never written.
        unsafe { &(*self.host).cfg }
    }
}

impl Drop for attnrt_cuda_multi_layer {
    fn drop(&mut self) {
        // SAFETY: dropped exactly once, here, before `host`, which it borrows.
        unsafe { ManuallyDrop::drop(&mut self.multi) };
        // SAFETY: `host` came from `Box::into_raw` in `attnrt_cuda_multi_layer_new` and
        // nothing borrows it any more.
        drop(unsafe { Box::from_raw(self.host) });
    }
}

/// One device's part of the head split (`attnrt_cuda_multi_layer_shard`): the query heads
/// `q_head_start..q_head_end` and the KV heads `kv_head_start..kv_head_end` of the unsplit
/// layer (half-open ranges). A KV head held by several devices (fewer KV heads than devices)
/// appears in each of their ranges.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct attnrt_device_shard {
    /// The CUDA device ordinal (the `devices[index]` given at creation).
    pub device: u32,
    /// First query head owned.
    pub q_head_start: usize,
    /// One past the last query head owned.
    pub q_head_end: usize,
    /// First KV head held.
    pub kv_head_start: usize,
    /// One past the last KV head held.
    pub kv_head_end: usize,
}

/// The device list's checks that need no GPU: NULL, empty, repeated ordinals, and the plan
/// (more devices than query heads).
///
/// # Safety
/// `devices` NULL or valid for `n_devices` reads.
unsafe fn device_list<'a>(
    cfg: &attnrt::Config,
    devices: *const u32,
    n_devices: usize,
) -> FfiResult<(&'a [u32], ShardPlan)> {
    let list: &[u32] = if n_devices == 0 {
        &[]
    } else {
        // SAFETY: the contract of this function.
        unsafe { slice("devices", devices, n_devices) }?
    };
    for (j, d) in list.iter().enumerate() {
        if let Some(i) = list[..j].iter().position(|e| e == d) {
            return Err(FfiError::new(
                attnrt_status::ATTNRT_STATUS_CONFIG,
                format!(
                    "devices[{j}] = {d} repeats devices[{i}]: each device may appear once in \
                     the device list"
                ),
            ));
        }
    }
    Ok((list, ShardPlan::new(*cfg, list.len())?))
}

/// An ordinal the driver does not report, as `ATTNRT_STATUS_DEVICE` before any set-up (CUDA
/// builds only: without CUDA the constructor reports that instead).
fn known_devices(list: &[u32]) -> FfiResult<()> {
    if !attnrt_cuda::built_with_cuda() {
        return Ok(());
    }
    let count = attnrt_cuda::device_count();
    if let Some((i, d)) = list
        .iter()
        .enumerate()
        .find(|(_, &d)| usize::try_from(d).map_or(true, |d| d >= count))
    {
        let why = attnrt_cuda::no_device_reason()
            .map(|r| format!(" ({r})"))
            .unwrap_or_default();
        return Err(FfiError::new(
            attnrt_status::ATTNRT_STATUS_DEVICE,
            format!(
                "devices[{i}] = {d}: no such CUDA device; the driver reports {count} \
                 device(s){why}"
            ),
        ));
    }
    Ok(())
}

/// The number of CUDA devices the driver reports, into `*out` (at least 1 on success), for
/// building a device list. Errors: `ATTNRT_STATUS_NULL_POINTER`,
/// `ATTNRT_STATUS_BACKEND_UNAVAILABLE` (built without CUDA), `ATTNRT_STATUS_DEVICE` (no
/// driver, a driver that fails to initialise, or no device; the message says which); `*out`
/// untouched on error. Thread-safe.
///
/// # Safety
/// `out` NULL or valid for one write.
#[no_mangle]
pub unsafe extern "C" fn attnrt_cuda_device_count(out: *mut usize) -> attnrt_status {
    guard(|| {
        check_out("out", out)?;
        if !attnrt_cuda::built_with_cuda() {
            return Err(attnrt_cuda::Error::NoCuda.into());
        }
        if let Some(why) = attnrt_cuda::no_device_reason() {
            return Err(FfiError::new(attnrt_status::ATTNRT_STATUS_DEVICE, why));
        }
        // SAFETY: checked by `check_out`; valid by the contract.
        unsafe { write_out(out, attnrt_cuda::device_count()) };
        Ok(())
    })
}

/// Splits `layer` by heads over the CUDA devices `devices[0..n_devices]` (ordinals; rank `i`
/// on `devices[i]`): copies the layer's configuration and weights (the caller's `layer` may be
/// freed afterwards), plans the head split as `attnrt_sharded_layer_new` does (GQA-aware, KV
/// heads replicated when fewer than devices, uneven head counts allowed), uploads each
/// device's shard in `precision` (an `attnrt_cuda_precision`) with buffers for calls of up to
/// `max_batch` rows of `max_seq_len` tokens, and sets up the NCCL communicators (none for one
/// device). Full QK-norm runs across the devices: its per-token statistics are summed with an
/// all-reduce of two floats per token.
///
/// On success `*out` receives the handle (free with [`attnrt_cuda_multi_layer_free`]); on error
/// it is untouched and nothing stays allocated. Errors, in the order checked:
/// `ATTNRT_STATUS_NULL_POINTER` (`layer`, `out`, or `devices` with `n_devices` > 0),
/// `ATTNRT_STATUS_MISALIGNED_POINTER`, `ATTNRT_STATUS_BAD_ENUM` (precision),
/// `ATTNRT_STATUS_CONFIG` (an ordinal repeated in the list; `n_devices` 0),
/// `ATTNRT_STATUS_CONFIG_PAIR` (`n_devices` > `n_head`: a device would own no query head),
/// `ATTNRT_STATUS_BACKEND_UNAVAILABLE` (built without CUDA), `ATTNRT_STATUS_DEVICE` (an ordinal
/// the driver does not report, no driver, out of device memory, any driver failure),
/// `ATTNRT_STATUS_UNSUPPORTED` (a head_dim / group the kernels cannot run, sizes that
/// overflow), `ATTNRT_STATUS_DEVICE_BLAS`,
/// `ATTNRT_STATUS_DEVICE_COLLECTIVE` (NCCL set-up), `ATTNRT_STATUS_OUT_OF_MEMORY`.
/// Thread-safe.
///
/// # Safety
/// `layer` NULL or a live layer handle; `devices` NULL or valid for `n_devices` reads; `out`
/// NULL or valid for one write.
#[no_mangle]
pub unsafe extern "C" fn attnrt_cuda_multi_layer_new(
    layer: *const attnrt_layer,
    precision: u32,
    max_batch: usize,
    max_seq_len: usize,
    devices: *const u32,
    n_devices: usize,
    out: *mut *mut attnrt_cuda_multi_layer,
) -> attnrt_status {
    guard(|| {
        // SAFETY: the contract of this function.
        let layer = unsafe { as_ref("layer", layer) }?;
        check_out("out", out)?;
        let opts = GpuOptions {
            precision: self::precision(precision)?,
            max_batch,
            max_seq_len,
            device: 0,
        };
        // SAFETY: the contract of this function.
        let (list, plan) = unsafe { device_list(&layer.cfg, devices, n_devices) }?;
        known_devices(list)?;
        let host = Box::into_raw(Box::new(layer.try_clone()?));
        // SAFETY: `host` is a live allocation that this function frees on error below, or
        // that the handle owns and frees only after dropping the `MultiGpuLayer` borrowing it.
        let host_ref: &'static attnrt_layer = unsafe { &*host };
        let multi = host_ref
            .runtime()
            .and_then(|l| MultiGpuLayer::new(l, list, opts).map_err(FfiError::from));
        let multi = match multi {
            Ok(m) => m,
            Err(e) => {
                // SAFETY: from `Box::into_raw` above; nothing borrows it any more.
                drop(unsafe { Box::from_raw(host) });
                return Err(e);
            }
        };
        let handle = Box::new(attnrt_cuda_multi_layer {
            multi: ManuallyDrop::new(Mutex::new(multi)),
            host,
            plan,
            devices: list.to_vec(),
            precision: opts.precision,
        });
        // SAFETY: checked by `check_out`; valid by the contract.
        unsafe { write_out(out, Box::into_raw(handle)) };
        Ok(())
    })
}

/// Frees a multi-GPU layer, its device memory on every device and its NCCL communicators.
/// NULL is a no-op. Every call on the handle must have returned; never twice.
///
/// # Safety
/// `layer` NULL or a handle from [`attnrt_cuda_multi_layer_new`] not yet freed.
#[no_mangle]
pub unsafe extern "C" fn attnrt_cuda_multi_layer_free(layer: *mut attnrt_cuda_multi_layer) {
    let _ = guard(|| {
        // SAFETY: NULL or a live handle made by `Box::into_raw`, whose every use the caller
        // gives up (this function's contract).
        unsafe { free_boxed(layer) };
        Ok(())
    });
}

/// The number of devices of the handle, into `*out`. Errors: `ATTNRT_STATUS_NULL_POINTER`.
/// Thread-safe (no lock).
///
/// # Safety
/// `layer` NULL or a live handle; `out` NULL or valid for one write.
#[no_mangle]
pub unsafe extern "C" fn attnrt_cuda_multi_layer_n_devices(
    layer: *const attnrt_cuda_multi_layer,
    out: *mut usize,
) -> attnrt_status {
    guard(|| {
        // SAFETY: the contract of this function.
        let layer = unsafe { as_ref("layer", layer) }?;
        check_out("out", out)?;
        // SAFETY: checked by `check_out`; valid by the contract.
        unsafe { write_out(out, layer.devices.len()) };
        Ok(())
    })
}

/// The heads device `index` (its rank, `0..n_devices`; not its CUDA ordinal) owns, into
/// `*out`. Errors: `ATTNRT_STATUS_NULL_POINTER`, `ATTNRT_STATUS_INPUT_VALUE` (`index` >=
/// `n_devices`); `*out` untouched on error. Thread-safe (no lock).
///
/// # Safety
/// `layer` NULL or a live handle; `out` NULL or valid for one write.
#[no_mangle]
pub unsafe extern "C" fn attnrt_cuda_multi_layer_shard(
    layer: *const attnrt_cuda_multi_layer,
    index: usize,
    out: *mut attnrt_device_shard,
) -> attnrt_status {
    guard(|| {
        // SAFETY: the contract of this function.
        let layer = unsafe { as_ref("layer", layer) }?;
        check_out("out", out)?;
        let s = layer.plan.shard(index)?;
        let shard = attnrt_device_shard {
            device: layer.devices[index],
            q_head_start: s.q_start,
            q_head_end: s.q_end,
            kv_head_start: s.kv_start,
            kv_head_end: s.kv_end,
        };
        // SAFETY: checked by `check_out`; valid by the contract.
        unsafe { write_out(out, shard) };
        Ok(())
    })
}

/// What runs on the handle, as text: the attention kernel path and device 0's name, the
/// device list and the NCCL version (for example `cuda-tensor-core-bf16-p128-m1-n64 on NVIDIA
/// H200; 2 devices [0, 1]; NCCL 22803`). Copied into `buf` truncated to `len - 1` bytes and
/// NUL-terminated; `*written` receives the bytes copied. `buf` and `written` may be NULL
/// (`len` 0). Errors: `ATTNRT_STATUS_NULL_POINTER` (`layer`; `buf` NULL with `len` > 0).
/// Takes the handle's lock.
///
/// # Safety
/// `layer` NULL or a live handle; `buf` NULL or valid for `len` bytes; `written` NULL or valid
/// for one write.
#[no_mangle]
pub unsafe extern "C" fn attnrt_cuda_multi_layer_backend(
    layer: *const attnrt_cuda_multi_layer,
    buf: *mut c_char,
    len: usize,
    written: *mut usize,
) -> attnrt_status {
    guard(|| {
        // SAFETY: the contract of this function.
        let layer = unsafe { as_ref("layer", layer) }?;
        check_text_out("buf", buf, len, written)?;
        let text = {
            let m = layer.lock();
            let nccl = m.nccl_version().map_or_else(
                || "no NCCL (one device)".to_string(),
                |v| format!("NCCL {v}"),
            );
            format!(
                "{}; {} device(s) {:?}; {nccl}",
                m.backend(),
                layer.devices.len(),
                layer.devices
            )
        };
        // SAFETY: checked above; valid by the contract.
        unsafe { write_text(&text, buf, len, written) };
        Ok(())
    })
}

/// Milliseconds the last summed call (`ATTNRT_SHARD_MODE_SUMMED`) spent in the NCCL
/// all-reduce (CUDA events around it on each device's stream; the largest over the devices;
/// 0 with one device or before any summed call), into `*out_ms`. Errors:
/// `ATTNRT_STATUS_NULL_POINTER`. Takes the handle's lock.
///
/// # Safety
/// `layer` NULL or a live handle; `out_ms` NULL or valid for one write.
#[no_mangle]
pub unsafe extern "C" fn attnrt_cuda_multi_last_nccl_ms(
    layer: *const attnrt_cuda_multi_layer,
    out_ms: *mut f32,
) -> attnrt_status {
    guard(|| {
        // SAFETY: the contract of this function.
        let layer = unsafe { as_ref("layer", layer) }?;
        check_out("out_ms", out_ms)?;
        let ms = layer.lock().last_nccl_ms();
        // SAFETY: checked by `check_out`; valid by the contract.
        unsafe { write_out(out_ms, ms) };
        Ok(())
    })
}

/// Runs the split layer on host buffers: `args` as for `attnrt_forward` (x, mask inputs,
/// positions, `freqs_cis`, `out`); `x` goes to every device, each device runs its heads, and
/// with `mode` (an `attnrt_shard_mode`):
/// - `ATTNRT_SHARD_MODE_SUMMED`: the partial outputs are summed with an NCCL all-reduce and
///   `out` (`B * T * C` elements) receives the layer's output;
/// - `ATTNRT_SHARD_MODE_PARTIALS`: no reduction; `out` (`n_devices * B * T * C`) receives
///   device `i`'s partial output at `i * B * T * C` (rank order). Their sum is the layer's
///   output; `bo` is in device 0's part.
///
/// The call returns when `out` is written. `backend`, `parallel_for` and `num_threads` are
/// ignored. The workspace is needed only for the cos/sin rows a rotary layer builds when
/// `freqs_cis` is NULL (`attnrt_workspace_size` covers it); otherwise it may be NULL with
/// length 0. On success `*backend_ran` receives `ATTNRT_BACKEND_CUDA`.
///
/// Errors: those of `attnrt_forward` for the arguments, `ATTNRT_STATUS_BAD_ENUM` (`mode`),
/// `ATTNRT_STATUS_DEVICE_CAPACITY` (batch or seq_len above the handle's maxima),
/// `ATTNRT_STATUS_DEVICE`, `ATTNRT_STATUS_DEVICE_BLAS`, `ATTNRT_STATUS_DEVICE_COLLECTIVE`,
/// `ATTNRT_STATUS_UNSUPPORTED`. On any error `out` and `*backend_ran` are untouched, except a
/// device failure during the call (5xx), after which `out` is unspecified.
///
/// Calls on one handle are serialized by its lock.
///
/// # Safety
/// As `attnrt_forward`, with `layer` a live multi-GPU layer handle.
#[no_mangle]
pub unsafe extern "C" fn attnrt_cuda_multi_forward_host(
    layer: *const attnrt_cuda_multi_layer,
    args: *const attnrt_forward_args,
    mode: u32,
    backend_ran: *mut attnrt_backend,
) -> attnrt_status {
    guard(|| {
        // SAFETY: the contract of this function.
        let layer = unsafe { as_ref("layer", layer) }?;
        // SAFETY: the contract of this function.
        let a = unsafe { as_ref("args", args) }?;
        check_out("backend_ran", backend_ran)?;
        let mode = attnrt_shard_mode::from_u32(mode)?;
        // SAFETY: `host` lives as long as the handle.
        let cfg = unsafe { &(*layer.host).cfg };
        // SAFETY: the contract of this function; `backend_ran` passed `check_out`.
        unsafe {
            forward_host_with(cfg, a, backend_ran, |inputs, out| {
                let mut m = layer.lock();
                match mode {
                    attnrt_shard_mode::ATTNRT_SHARD_MODE_SUMMED => m.forward_host(inputs, out)?,
                    attnrt_shard_mode::ATTNRT_SHARD_MODE_PARTIALS => {
                        m.forward_host_partials(inputs, out)?
                    }
                };
                Ok(())
            })
        }
    })
}

/// Rank `index`'s rows in sequence-parallel calls of `batch` rows of `seq_len` tokens: the
/// flattened tokens `*out_start..*out_end` (row-major `[batch, seq_len]`), contiguous ranges in
/// rank order, the first `batch * seq_len mod n_devices` ranks taking one more. Errors:
/// `ATTNRT_STATUS_NULL_POINTER`, `ATTNRT_STATUS_INPUT_VALUE` (`index` >= `n_devices`, or
/// `batch * seq_len` overflows); nothing written on error. Thread-safe (no lock).
///
/// # Safety
/// `layer` NULL or a live handle; `out_start` and `out_end` NULL or valid for one write each.
#[no_mangle]
pub unsafe extern "C" fn attnrt_cuda_multi_token_range(
    layer: *const attnrt_cuda_multi_layer,
    index: usize,
    batch: usize,
    seq_len: usize,
    out_start: *mut usize,
    out_end: *mut usize,
) -> attnrt_status {
    guard(|| {
        // SAFETY: the contract of this function.
        let layer = unsafe { as_ref("layer", layer) }?;
        check_out("out_start", out_start)?;
        check_out("out_end", out_end)?;
        let tokens = batch
            .checked_mul(seq_len)
            .ok_or(attnrt::Error::InputValue {
                name: "seq_len",
                index: 0,
                value: seq_len as i64,
                rule: "batch * seq_len overflows",
            })?;
        let r = layer.plan.token_range(index, tokens)?;
        // SAFETY: checked by `check_out`; valid by the contract.
        unsafe {
            write_out(out_start, r.start);
            write_out(out_end, r.end);
        }
        Ok(())
    })
}

/// Sequence-parallel forward on host buffers: `args` as for `attnrt_forward` with `x` and
/// `out` the whole call (`B * T * C` each); rank `i` receives only its rows of `x`
/// (`attnrt_cuda_multi_token_range`), the rows are gathered across the devices with NCCL
/// (all-gather; grouped broadcasts when the shares are unequal), every device runs its heads,
/// the partial outputs are reduce-scattered, and rank `i`'s rows of the layer's output are
/// copied into the same rows of `out`. The result is the layer's output (as
/// `attnrt_cuda_multi_forward_host` with SUMMED gives; the sums may round differently).
/// Everything else as `attnrt_cuda_multi_forward_host`: errors, workspace, `*backend_ran`,
/// nothing written on an argument error, calls serialized by the handle's lock.
///
/// # Safety
/// As `attnrt_forward`, with `layer` a live multi-GPU layer handle.
#[no_mangle]
pub unsafe extern "C" fn attnrt_cuda_multi_forward_seq_host(
    layer: *const attnrt_cuda_multi_layer,
    args: *const attnrt_forward_args,
    backend_ran: *mut attnrt_backend,
) -> attnrt_status {
    guard(|| {
        // SAFETY: the contract of this function.
        let layer = unsafe { as_ref("layer", layer) }?;
        // SAFETY: the contract of this function.
        let a = unsafe { as_ref("args", args) }?;
        check_out("backend_ran", backend_ran)?;
        // SAFETY: `host` lives as long as the handle.
        let cfg = unsafe { &(*layer.host).cfg };
        // SAFETY: the contract of this function; `backend_ran` passed `check_out`.
        unsafe {
            forward_host_with(cfg, a, backend_ran, |inputs, out| {
                layer.lock().forward_seq_host(inputs, out)?;
                Ok(())
            })
        }
    })
}

/// The arguments of [`attnrt_cuda_multi_forward_seq_device`]: each rank's rows of the
/// activations in device memory of its device, the mask inputs and positions of the whole call
/// in host memory. Initialise with [`attnrt_cuda_multi_seq_args_init`].
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct attnrt_cuda_multi_seq_args {
    /// Host array of `n_parts` device pointers (`CUdeviceptr`): rank `i`'s rows of f32 `x`,
    /// `[rows_i, n_embd]` on `devices[i]` (`rows_i` from `attnrt_cuda_multi_token_range`).
    /// Required.
    pub x_parts: *const u64,
    /// Host array of `n_parts` device pointers: room for rank `i`'s rows of the output, f32
    /// `[rows_i, n_embd]` on `devices[i]`. Required; no part may overlap another part.
    pub y_parts: *const u64,
    /// Elements of `x_parts` and of `y_parts`: the handle's number of devices.
    pub n_parts: usize,
    /// Batch rows of the whole call.
    pub batch: usize,
    /// Tokens per row of the whole call.
    pub seq_len: usize,
    /// Optional host `[B]` padding lengths.
    pub seq_lens: *const i32,
    /// Elements of `seq_lens`.
    pub seq_lens_len: usize,
    /// Optional host `[B, T]` document ids.
    pub document_ids: *const i32,
    /// Elements of `document_ids`.
    pub document_ids_len: usize,
    /// Optional host `[S + 1]` varlen boundaries.
    pub cu_seqlens: *const i32,
    /// Elements of `cu_seqlens`.
    pub cu_seqlens_len: usize,
    /// Longest varlen segment; negative = not given.
    pub max_seqlen: i32,
    /// Optional host `[B, T]` positions.
    pub position_ids: *const i32,
    /// Elements of `position_ids`.
    pub position_ids_len: usize,
    /// Optional host cos/sin table; when NULL a rotary layer builds the rows it needs on the
    /// host (allocated for the call).
    pub freqs_cis: *const f32,
    /// Elements of `freqs_cis`.
    pub freqs_cis_len: usize,
}

/// Fills `*out` with empty sequence-parallel arguments (NULL arrays and buffers, lengths 0,
/// `max_seqlen` -1). Returns `ATTNRT_STATUS_NULL_POINTER` if `out` is NULL. Thread-safe.
///
/// # Safety
/// `out` NULL or valid for one write.
#[no_mangle]
pub unsafe extern "C" fn attnrt_cuda_multi_seq_args_init(
    out: *mut attnrt_cuda_multi_seq_args,
) -> attnrt_status {
    guard(|| {
        check_out("out", out)?;
        let empty = attnrt_cuda_multi_seq_args {
            x_parts: core::ptr::null(),
            y_parts: core::ptr::null(),
            n_parts: 0,
            batch: 0,
            seq_len: 0,
            seq_lens: core::ptr::null(),
            seq_lens_len: 0,
            document_ids: core::ptr::null(),
            document_ids_len: 0,
            cu_seqlens: core::ptr::null(),
            cu_seqlens_len: 0,
            max_seqlen: -1,
            position_ids: core::ptr::null(),
            position_ids_len: 0,
            freqs_cis: core::ptr::null(),
            freqs_cis_len: 0,
        };
        // SAFETY: checked by `check_out`; valid by the contract.
        unsafe { write_out(out, empty) };
        Ok(())
    })
}

/// Sequence-parallel forward on device buffers, for servers that keep each rank's rows of the
/// activations on its GPU between layers: the rows are gathered across the devices (NCCL),
/// every device runs its heads over the whole call, and the partial outputs are
/// reduce-scattered so that `y_parts[i]` receives rank `i`'s rows of the layer's output. Runs
/// on the handle's own streams and returns when every device has finished (the `y` parts are
/// then written). On success `*backend_ran` receives `ATTNRT_BACKEND_CUDA`.
///
/// Errors: `ATTNRT_STATUS_NULL_POINTER` (the handle, `args`, `backend_ran`, `x_parts`,
/// `y_parts`, or one of their device pointers 0, named by index), `ATTNRT_STATUS_INPUT_SHAPE`
/// (`n_parts` not the number of devices), the argument errors of `attnrt_forward` for the mask
/// inputs and positions, `ATTNRT_STATUS_DEVICE_CAPACITY`, `ATTNRT_STATUS_DEVICE`,
/// `ATTNRT_STATUS_DEVICE_BLAS`, `ATTNRT_STATUS_DEVICE_COLLECTIVE`. On an argument error
/// nothing is enqueued and nothing written. Calls on one handle are serialized by its lock.
///
/// # Safety
/// `layer` NULL or a live handle; `args` NULL or valid, its host arrays and buffers valid for
/// their lengths; each `x_parts[i]` / `y_parts[i]` a device allocation valid on `devices[i]`
/// with room for rank `i`'s rows (`rows_i * n_embd` f32), the `x` parts fully written by work
/// that has finished before the call, and none of them used by other work until it returns;
/// `backend_ran` NULL or valid.
#[no_mangle]
pub unsafe extern "C" fn attnrt_cuda_multi_forward_seq_device(
    layer: *const attnrt_cuda_multi_layer,
    args: *const attnrt_cuda_multi_seq_args,
    backend_ran: *mut attnrt_backend,
) -> attnrt_status {
    guard(|| {
        // SAFETY: the contract of this function.
        let layer = unsafe { as_ref("layer", layer) }?;
        // SAFETY: the contract of this function.
        let a = unsafe { as_ref("args", args) }?;
        check_out("backend_ran", backend_ran)?;
        // SAFETY: the contract of this function (host arrays valid for their lengths).
        let x_parts = unsafe { slice("x_parts", a.x_parts, a.n_parts) }?;
        // SAFETY: as above.
        let y_parts = unsafe { slice("y_parts", a.y_parts, a.n_parts) }?;
        if a.n_parts != layer.devices.len() {
            return Err(attnrt::Error::InputShape {
                name: "n_parts",
                expected: layer.devices.len(),
                actual: a.n_parts,
            }
            .into());
        }
        for (name, parts) in [("x_parts", x_parts), ("y_parts", y_parts)] {
            if let Some(i) = parts.iter().position(|&p| p == 0) {
                return Err(FfiError::null(&format!("{name}[{i}] (device pointer)")));
            }
        }
        // SAFETY: `host` lives as long as the handle.
        let cfg = unsafe { &(*layer.host).cfg };
        // SAFETY: as above.
        let seq_lens = unsafe { opt_slice("seq_lens", a.seq_lens, a.seq_lens_len) }?;
        // SAFETY: as above.
        let document_ids =
            unsafe { opt_slice("document_ids", a.document_ids, a.document_ids_len) }?;
        // SAFETY: as above.
        let cu_seqlens = unsafe { opt_slice("cu_seqlens", a.cu_seqlens, a.cu_seqlens_len) }?;
        // SAFETY: as above.
        let position_ids =
            unsafe { opt_slice("position_ids", a.position_ids, a.position_ids_len) }?;
        // SAFETY: as above.
        let freqs_cis = unsafe { opt_slice("freqs_cis", a.freqs_cis, a.freqs_cis_len) }?;
        let mut built = Vec::new();
        let (rope_table, position_ids) =
            host_rope(cfg, a.batch, a.seq_len, position_ids, freqs_cis, &mut built)?;
        let call = SeqParallelCall {
            x_parts,
            y_parts,
            batch: a.batch,
            seq_len: a.seq_len,
            mask: MaskInputs {
                seq_lens,
                document_ids,
                cu_seqlens,
                max_seqlen: (a.max_seqlen >= 0).then_some(a.max_seqlen),
            },
            position_ids,
            rope_table,
        };
        // SAFETY: device pointers valid by this function's contract.
        unsafe { layer.lock().forward_seq_device(&call) }?;
        // SAFETY: checked by `check_out`; valid by the contract.
        unsafe { write_out(backend_ran, attnrt_backend::ATTNRT_BACKEND_CUDA) };
        Ok(())
    })
}
