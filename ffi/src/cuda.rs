//! `attnrt_cuda_layer`: a layer set up on one GPU, through `attnrt-cuda`.
//!
//! The functions exist in every build, so the header is the same with or without the `cuda`
//! feature; without it they call `attnrt-cuda`'s stub, whose constructor fails, and return
//! `ATTNRT_STATUS_BACKEND_UNAVAILABLE` with the message "attnrt built without CUDA".
//!
//! Why a handle and not `ATTNRT_BACKEND_CUDA` in `attnrt_forward`: a GPU layer owns per-device
//! state set up once (weights uploaded in the chosen precision, buffers sized for
//! `max_batch` x `max_seq_len`, a stream, cuBLAS), which an immutable, device-agnostic
//! `attnrt_layer` cannot hold; so the GPU is reached through `attnrt_cuda_layer_new`.

use core::ffi::{c_char, c_void};
use core::mem::ManuallyDrop;
use std::sync::{Mutex, MutexGuard, PoisonError};

use attnrt::{Config, Inputs, MaskInputs, RopeTable};
use attnrt_cuda::{DeviceCall, GpuLayer, GpuOptions, Precision, RopeSource};

use crate::backend::{attnrt_backend, table_part};
use crate::error::{copy_message, FfiError, FfiResult};
use crate::layer::{attnrt_forward_args, attnrt_layer, prepare};
use crate::panic::guard;
use crate::ptr::{as_ref, check, check_out, free_boxed, opt_slice, write_out};
use crate::status::attnrt_status;

/// Storage precision of a CUDA layer (`attnrt_cuda_layer_new`, `attnrt_cuda_capability`).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum attnrt_cuda_precision {
    /// f32 storage, attention on CUDA cores: matches the reference within 1e-4.
    ATTNRT_CUDA_PRECISION_F32 = 0,
    /// bf16 storage, f32 accumulation, tensor cores.
    ATTNRT_CUDA_PRECISION_BF16 = 1,
    /// f16 storage, f32 accumulation, tensor cores.
    ATTNRT_CUDA_PRECISION_F16 = 2,
}

pub(crate) fn precision(v: u32) -> FfiResult<Precision> {
    match v {
        0 => Ok(Precision::F32),
        1 => Ok(Precision::Bf16),
        2 => Ok(Precision::F16),
        v => Err(FfiError::bad_enum(
            "precision",
            v,
            "an attnrt_cuda_precision, 0..=2",
        )),
    }
}

impl From<attnrt_cuda::Error> for FfiError {
    fn from(e: attnrt_cuda::Error) -> FfiError {
        use attnrt_cuda::Error as E;
        use attnrt_status as S;
        let status = match &e {
            E::Runtime(r) => return (*r).into(),
            E::NoCuda => S::ATTNRT_STATUS_BACKEND_UNAVAILABLE,
            E::Cuda { .. } => S::ATTNRT_STATUS_DEVICE,
            E::Cublas { .. } => S::ATTNRT_STATUS_DEVICE_BLAS,
            E::Unsupported(_) => S::ATTNRT_STATUS_UNSUPPORTED,
            E::Capacity { .. } => S::ATTNRT_STATUS_DEVICE_CAPACITY,
            E::Nccl { .. } => S::ATTNRT_STATUS_DEVICE_COLLECTIVE,
            _ => S::ATTNRT_STATUS_INTERNAL,
        };
        FfiError::new(status, e.to_string())
    }
}

/// A layer on one GPU: a private copy of the layer's configuration and weights, uploaded in
/// the chosen precision, and device buffers sized for calls of up to `max_batch` rows of
/// `max_seq_len` tokens.
///
/// Opaque. Calls on one handle are serialized by a lock inside it (the device buffers are
/// reused by every call); use one handle per device and per concurrent stream of work.
pub struct attnrt_cuda_layer {
    /// Declared first, dropped first (by hand): it borrows `host`.
    gpu: ManuallyDrop<Mutex<GpuLayer<'static>>>,
    /// The copy of the layer that `gpu` borrows; owned (from `Box::into_raw`), freed last.
    host: *mut attnrt_layer,
}

impl attnrt_cuda_layer {
    fn lock(&self) -> MutexGuard<'_, GpuLayer<'static>> {
        self.gpu.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Drop for attnrt_cuda_layer {
    fn drop(&mut self) {
        // SAFETY: dropped exactly once, here, before `host`, which it borrows.
        unsafe { ManuallyDrop::drop(&mut self.gpu) };
        // SAFETY: `host` came from `Box::into_raw` in `attnrt_cuda_layer_new` and nothing
        // borrows it any more.
        drop(unsafe { Box::from_raw(self.host) });
    }
}

/// Sets `layer` up on CUDA device `device`: copies its configuration and weights (the
/// caller's `layer` may be freed afterwards), uploads the weights in `precision` (an
/// `attnrt_cuda_precision`) and sizes every device buffer for calls of up to `max_batch` rows
/// of `max_seq_len` tokens; forward calls then allocate nothing on the device.
///
/// On success `*out` receives the handle (free with [`attnrt_cuda_layer_free`]); on error it
/// is untouched. Errors: `ATTNRT_STATUS_NULL_POINTER`, `ATTNRT_STATUS_BAD_ENUM`,
/// `ATTNRT_STATUS_BACKEND_UNAVAILABLE` (built without CUDA: "attnrt built without CUDA"),
/// `ATTNRT_STATUS_UNSUPPORTED` (head_dim / group the kernels cannot run, see
/// [`attnrt_cuda_capability`]; sizes that overflow), `ATTNRT_STATUS_DEVICE` (no driver, no such
/// device, out of device memory, any driver failure), `ATTNRT_STATUS_DEVICE_BLAS`,
/// `ATTNRT_STATUS_OUT_OF_MEMORY`. Thread-safe.
///
/// # Safety
/// `layer` NULL or a live layer handle; `out` NULL or valid for one write.
#[no_mangle]
pub unsafe extern "C" fn attnrt_cuda_layer_new(
    layer: *const attnrt_layer,
    precision: u32,
    max_batch: usize,
    max_seq_len: usize,
    device: u32,
    out: *mut *mut attnrt_cuda_layer,
) -> attnrt_status {
    guard(|| {
        // SAFETY: the contract of this function.
        let layer = unsafe { as_ref("layer", layer) }?;
        check_out("out", out)?;
        let opts = GpuOptions {
            precision: self::precision(precision)?,
            max_batch,
            max_seq_len,
            device,
        };
        let host = Box::into_raw(Box::new(layer.try_clone()?));
        // SAFETY: `host` is a live allocation that this function frees on error below, or
        // that the handle owns and frees only after dropping the `GpuLayer` borrowing it.
        let host_ref: &'static attnrt_layer = unsafe { &*host };
        let gpu = host_ref
            .runtime()
            .and_then(|l| GpuLayer::new(l, opts).map_err(FfiError::from));
        let gpu = match gpu {
            Ok(g) => g,
            Err(e) => {
                // SAFETY: from `Box::into_raw` above; nothing borrows it any more.
                drop(unsafe { Box::from_raw(host) });
                return Err(e);
            }
        };
        let handle = Box::new(attnrt_cuda_layer {
            gpu: ManuallyDrop::new(Mutex::new(gpu)),
            host,
        });
        // SAFETY: checked by `check_out`; valid by the contract.
        unsafe { write_out(out, Box::into_raw(handle)) };
        Ok(())
    })
}

/// Frees a CUDA layer and its device memory. NULL is a no-op. Every call on the handle must
/// have returned (and every stream the caller passed must be done with its buffers); never
/// twice.
///
/// # Safety
/// `layer` NULL or a handle from [`attnrt_cuda_layer_new`] not yet freed.
#[no_mangle]
pub unsafe extern "C" fn attnrt_cuda_layer_free(layer: *mut attnrt_cuda_layer) {
    let _ = guard(|| {
        // SAFETY: NULL or a live handle made by `Box::into_raw`, whose every use the caller
        // gives up (this function's contract).
        unsafe { free_boxed(layer) };
        Ok(())
    });
}

/// Which portable CUDA attention path `(precision, head_dim, group)` gets (`group` = query
/// heads per KV head), or why none can run it: the path of every architecture from sm_80 on.
/// A device may run a faster architecture-specific kernel instead (the wgmma kernel for
/// head_dim 128 on sm_90): [`attnrt_cuda_capability_on_arch`] says which. On
/// `ATTNRT_STATUS_OK` `reason_buf` receives the kernel path (for example
/// `tensor-core-bf16-p128-m1-n64`); otherwise the reason. Truncated to `len - 1` bytes,
/// NUL-terminated; `*written` receives its length. `reason_buf` and `written` may be NULL
/// (`len` 0).
///
/// Returns `ATTNRT_STATUS_OK`, `ATTNRT_STATUS_BACKEND_UNAVAILABLE` (built without CUDA),
/// `ATTNRT_STATUS_UNSUPPORTED` (head_dim 0 or above 256, odd head_dim on tensor cores, too
/// many heads per group), `ATTNRT_STATUS_BAD_ENUM`. This does not look for a device
/// (`attnrt_cuda_layer_new` does). Thread-safe.
///
/// # Safety
/// `reason_buf` NULL or valid for `len` bytes; `written` NULL or valid for one write.
#[no_mangle]
pub unsafe extern "C" fn attnrt_cuda_capability(
    precision: u32,
    head_dim: usize,
    group: usize,
    reason_buf: *mut c_char,
    len: usize,
    written: *mut usize,
) -> attnrt_status {
    // SAFETY: the contract of this function.
    unsafe { capability_answer(precision, head_dim, group, None, reason_buf, len, written) }
}

/// As [`attnrt_cuda_capability`], for a device of compute capability `major.minor` (CUDA's
/// `CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR` / `_MINOR`): the path a layer set up on such
/// a device runs, for example `wgmma-bf16-d128-c2-n128-k3v2q2` for bf16, head_dim 128 on 9.0.
/// `ATTNRT_CUDA_WGMMA=0` in the environment keeps the portable path. Thread-safe.
///
/// # Safety
/// As [`attnrt_cuda_capability`].
#[no_mangle]
pub unsafe extern "C" fn attnrt_cuda_capability_on_arch(
    precision: u32,
    head_dim: usize,
    group: usize,
    major: u32,
    minor: u32,
    reason_buf: *mut c_char,
    len: usize,
    written: *mut usize,
) -> attnrt_status {
    // SAFETY: the contract of this function.
    unsafe {
        capability_answer(
            precision,
            head_dim,
            group,
            Some((major, minor)),
            reason_buf,
            len,
            written,
        )
    }
}

/// Checks a caller's text buffer named `name`: `buf` NULL only with `len` 0, else writable for
/// `len` bytes; `written` NULL or writable.
pub(crate) fn check_text_out(
    name: &'static str,
    buf: *mut c_char,
    len: usize,
    written: *mut usize,
) -> FfiResult<()> {
    if buf.is_null() && len > 0 {
        return Err(FfiError::null(if name == "reason_buf" {
            "reason_buf (with a nonzero length)"
        } else {
            "buf (with a nonzero length)"
        }));
    }
    if !buf.is_null() {
        check(name, buf.cast_const(), len)?;
    }
    if !written.is_null() {
        check_out("written", written)?;
    }
    Ok(())
}

/// Copies `text` into a buffer that passed [`check_text_out`] (truncated, NUL-terminated) and
/// the bytes copied into `*written` when it is not NULL.
///
/// # Safety
/// `buf`, `len` and `written` passed [`check_text_out`] and are valid by the caller's contract.
pub(crate) unsafe fn write_text(text: &str, buf: *mut c_char, len: usize, written: *mut usize) {
    // SAFETY: `buf` is NULL only with `len == 0`, else valid for `len` bytes.
    let (n, _) = unsafe { copy_message(text, buf, len) };
    if !written.is_null() {
        // SAFETY: checked by `check_out`; valid by the contract.
        unsafe { write_out(written, n) };
    }
}

/// What runs on a CUDA layer, as text: the attention kernel path and the device's name (for
/// example `cuda-wgmma-bf16-d128-c2-n128-k3v2q2 on NVIDIA H200`). Copied into `buf` truncated to
/// `len - 1` bytes and NUL-terminated; `*written` receives the bytes copied. `buf` and
/// `written` may be NULL (`len` 0). Errors: `ATTNRT_STATUS_NULL_POINTER` (`layer`; `buf` NULL
/// with `len` > 0). Takes the handle's lock.
///
/// # Safety
/// `layer` NULL or a live handle; `buf` NULL or valid for `len` bytes; `written` NULL or valid
/// for one write.
#[no_mangle]
pub unsafe extern "C" fn attnrt_cuda_layer_backend(
    layer: *const attnrt_cuda_layer,
    buf: *mut c_char,
    len: usize,
    written: *mut usize,
) -> attnrt_status {
    guard(|| {
        // SAFETY: the contract of this function.
        let layer = unsafe { as_ref("layer", layer) }?;
        check_text_out("buf", buf, len, written)?;
        let text = layer.lock().backend().to_string();
        // SAFETY: checked above; valid by the contract.
        unsafe { write_text(&text, buf, len, written) };
        Ok(())
    })
}

/// The two capability queries: the path (or why none) for an architecture, or the portable one.
///
/// # Safety
/// As [`attnrt_cuda_capability`].
unsafe fn capability_answer(
    precision: u32,
    head_dim: usize,
    group: usize,
    arch: Option<(u32, u32)>,
    reason_buf: *mut c_char,
    len: usize,
    written: *mut usize,
) -> attnrt_status {
    guard(|| {
        check_text_out("reason_buf", reason_buf, len, written)?;
        let answer = (|| {
            let p = self::precision(precision)?;
            if !attnrt_cuda::built_with_cuda() {
                return Err(FfiError::from(attnrt_cuda::Error::NoCuda));
            }
            let path = match arch {
                Some(arch) => attnrt_cuda::capability_on(p, head_dim, group, arch)?,
                None => attnrt_cuda::capability(p, head_dim, group)?,
            };
            Ok(path.to_string())
        })();
        let msg = match &answer {
            Ok(path) => path.as_str(),
            Err(e) => e.message.as_str(),
        };
        // SAFETY: checked above; valid by the contract.
        unsafe { write_text(msg, reason_buf, len, written) };
        answer.map(|_| ())
    })
}

/// Runs the CUDA layer on host buffers: `args` as for `attnrt_forward` (x, mask inputs,
/// positions, `freqs_cis`, `out`); the copies to and from the device are done inside, and the
/// call returns when `out` is written. `backend`, `parallel_for` and `num_threads` are
/// ignored. The workspace is needed only for the cos/sin rows a rotary layer builds when
/// `freqs_cis` is NULL (`attnrt_workspace_size` covers it); otherwise it may be NULL with
/// length 0. On success `*backend_ran` receives `ATTNRT_BACKEND_CUDA`.
///
/// Errors: those of `attnrt_forward` for the arguments, `ATTNRT_STATUS_DEVICE_CAPACITY`
/// (batch or seq_len above the handle's maxima), `ATTNRT_STATUS_DEVICE`,
/// `ATTNRT_STATUS_DEVICE_BLAS`, `ATTNRT_STATUS_UNSUPPORTED`. On any error `out` and
/// `*backend_ran` are untouched, except a device failure during the call (5xx), after which
/// `out` is unspecified.
///
/// Calls on one handle are serialized by its lock; distinct handles run in parallel.
///
/// # Safety
/// As `attnrt_forward`, with `layer` a live CUDA layer handle.
#[no_mangle]
pub unsafe extern "C" fn attnrt_cuda_forward_host(
    layer: *const attnrt_cuda_layer,
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
                layer.lock().forward_host(inputs, out)?;
                Ok(())
            })
        }
    })
}

/// The part every host-buffer forward of a CUDA handle shares once its handle and `a` are
/// checked: `attnrt_forward`'s checks of the buffers (no workspace needed: the devices have
/// their own), the rotary table built into a given workspace when `freqs_cis` is NULL, `run`
/// on the runtime's view, then `*backend_ran = CUDA`.
///
/// # Safety
/// `a`'s buffers as in `attnrt_forward`; `backend_ran` passed `check_out` and is valid for one
/// write.
pub(crate) unsafe fn forward_host_with(
    cfg: &Config,
    a: &attnrt_forward_args,
    backend_ran: *mut attnrt_backend,
    run: impl FnOnce(&Inputs<'_>, &mut [f32]) -> FfiResult<()>,
) -> FfiResult<()> {
    // SAFETY: the contract of this function.
    let call = unsafe {
        prepare(cfg, a, true, |with_table| {
            table_part(cfg, a.batch, a.seq_len, with_table)
        })
    }?;
    run(&call.inputs, call.out)?;
    // SAFETY: the contract of this function.
    unsafe { write_out(backend_ran, attnrt_backend::ATTNRT_BACKEND_CUDA) };
    Ok(())
}

/// The arguments of [`attnrt_cuda_forward_device`]: activations in device memory, mask
/// inputs and positions in host memory. Initialise with [`attnrt_cuda_device_args_init`].
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct attnrt_cuda_device_args {
    /// Device pointer (`CUdeviceptr`) to f32 `x [batch, seq_len, n_embd]`. Required.
    pub x: u64,
    /// Device pointer to the f32 output `[batch, seq_len, n_embd]`. Required; must not overlap
    /// `x`.
    pub y: u64,
    /// Batch rows.
    pub batch: usize,
    /// Tokens per row.
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
    /// The caller's `CUstream`, or NULL for the handle's own stream.
    pub stream: *mut c_void,
}

/// Fills `*out` with empty device arguments (0 pointers, NULL buffers, `max_seqlen` -1, NULL
/// stream). Returns `ATTNRT_STATUS_NULL_POINTER` if `out` is NULL. Thread-safe.
///
/// # Safety
/// `out` NULL or valid for one write.
#[no_mangle]
pub unsafe extern "C" fn attnrt_cuda_device_args_init(
    out: *mut attnrt_cuda_device_args,
) -> attnrt_status {
    guard(|| {
        check_out("out", out)?;
        let empty = attnrt_cuda_device_args {
            x: 0,
            y: 0,
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
            stream: core::ptr::null_mut(),
        };
        // SAFETY: checked by `check_out`; valid by the contract.
        unsafe { write_out(out, empty) };
        Ok(())
    })
}

/// Runs the CUDA layer on device buffers (for servers that keep activations on the GPU):
/// enqueued on `stream` (or the handle's own), asynchronous with respect to the host as the
/// executor allows; `y` is ready when the stream reaches the end of the call's work. Host mask
/// inputs are validated and uploaded with the call. On success `*backend_ran` receives
/// `ATTNRT_BACKEND_CUDA`.
///
/// Errors: `ATTNRT_STATUS_NULL_POINTER` (a handle, `args`, `backend_ran`, `x` or `y` 0),
/// the argument errors of `attnrt_forward`, `ATTNRT_STATUS_DEVICE_CAPACITY`,
/// `ATTNRT_STATUS_DEVICE`, `ATTNRT_STATUS_DEVICE_BLAS`, `ATTNRT_STATUS_BACKEND_UNAVAILABLE`.
/// On an argument error nothing is enqueued. Calls on one handle are serialized by its lock.
///
/// # Safety
/// `layer` NULL or a live CUDA layer handle; `args` NULL or valid, its host buffers valid for
/// their lengths; `x` and `y` device allocations of the handle's device of at least
/// `batch * seq_len * n_embd` f32 each, not used by other work until the call's work is
/// done; `stream` NULL or a live stream of that device's context; `backend_ran` NULL or valid.
#[no_mangle]
pub unsafe extern "C" fn attnrt_cuda_forward_device(
    layer: *const attnrt_cuda_layer,
    args: *const attnrt_cuda_device_args,
    backend_ran: *mut attnrt_backend,
) -> attnrt_status {
    guard(|| {
        // SAFETY: the contract of this function.
        let layer = unsafe { as_ref("layer", layer) }?;
        // SAFETY: the contract of this function.
        let a = unsafe { as_ref("args", args) }?;
        check_out("backend_ran", backend_ran)?;
        if a.x == 0 {
            return Err(FfiError::null("x (device pointer)"));
        }
        if a.y == 0 {
            return Err(FfiError::null("y (device pointer)"));
        }
        // SAFETY: `host` lives as long as the handle.
        let cfg = unsafe { &(*layer.host).cfg };
        // SAFETY: the contract of this function (host buffers valid for their lengths).
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
        let mask = MaskInputs {
            seq_lens,
            document_ids,
            cu_seqlens,
            max_seqlen: (a.max_seqlen >= 0).then_some(a.max_seqlen),
        };
        let mut built = Vec::new();
        let (rope, positions) =
            host_rope(cfg, a.batch, a.seq_len, position_ids, freqs_cis, &mut built)?;
        let rope = rope.map(RopeSource::Host);
        let call = DeviceCall {
            x: a.x,
            y: a.y,
            batch: a.batch,
            seq_len: a.seq_len,
            mask,
            position_ids: positions,
            rope,
            stream: a.stream,
        };
        // SAFETY: device pointers and stream valid by this function's contract.
        unsafe { layer.lock().forward_device(&call) }?;
        // SAFETY: checked by `check_out`; valid by the contract.
        unsafe { write_out(backend_ran, attnrt_backend::ATTNRT_BACKEND_CUDA) };
        Ok(())
    })
}

/// Grows `built` to `n` zeroed f32 for the cos/sin rows a call builds on the host.
///
/// # Errors
/// `ATTNRT_STATUS_OUT_OF_MEMORY` when they cannot be allocated.
pub(crate) fn alloc_rows(built: &mut Vec<f32>, n: usize) -> FfiResult<()> {
    built.try_reserve_exact(n).map_err(|_| {
        FfiError::new(
            attnrt_status::ATTNRT_STATUS_OUT_OF_MEMORY,
            "cannot allocate the cos/sin rows",
        )
    })?;
    built.resize(n, 0.0f32);
    Ok(())
}

/// The rotary table and positions of a call whose activations live on a device: the
/// caller's `freqs_cis`, or, for a rotary layer without one, the rows the call needs built on
/// the host into `built` (allocated here), with the positions remapped to those rows.
pub(crate) fn host_rope<'a>(
    cfg: &Config,
    batch: usize,
    seq_len: usize,
    position_ids: Option<&'a [i32]>,
    freqs_cis: Option<&'a [f32]>,
    built: &'a mut Vec<f32>,
) -> FfiResult<(Option<RopeTable<'a>>, Option<&'a [i32]>)> {
    Ok(match (cfg.rope(), freqs_cis) {
        (Some(_), Some(f)) => (Some(RopeTable::new(f, cfg.head_dim)?), position_ids),
        (None, Some(_)) => {
            return Err(attnrt::Error::Unsupported {
                what: "freqs_cis given but the layer has no rotary embedding",
            }
            .into())
        }
        (Some(r), None) => {
            let n = table_part(cfg, batch, seq_len, true)?;
            alloc_rows(built, n)?;
            // `x` is not read by the table builder; only the shapes and positions are.
            let mut shape = Inputs::new(&[], batch, seq_len);
            shape.position_ids = position_ids;
            let (table, ids) = crate::table::build(r, cfg.head_dim, &shape, built)?;
            (Some(table), ids.or(position_ids))
        }
        (None, None) => (None, position_ids),
    })
}
