//! `attnrt_cuda_multi_kv_cache`: the paged KV cache of a multi-GPU layer (one cache per
//! device, holding that device's KV heads, all with the same blocks), and the cached forward
//! call through the head split (prefill, chunked prefill and decode through one entry).
//!
//! The conventions are those of the CPU cache (`kv.rs`): block tables are the caller's
//! (`attnrt_sequence`; one table names a sequence's blocks on every device), token `t` of a
//! sequence has position `cached + t`, the caller advances `cached` after a successful call,
//! and every check runs before anything is written, with the same statuses (cache full, a
//! block outside the pool or used twice, ...). "Dropping a sequence" is the caller returning
//! its blocks to its own free list: a block handed to a new sequence is overwritten before it
//! is read.

use std::sync::{Mutex, MutexGuard, PoisonError};

use attnrt::{KvGeometry, RopeTable};
use attnrt_cuda::{MultiGpuKvCache, Precision};

use crate::backend::attnrt_backend;
use crate::cuda_multi::attnrt_cuda_multi_layer;
use crate::error::{FfiError, FfiResult};
use crate::kv::{attnrt_cached_args, check_use, no_window, pool_elems, sequences};
use crate::layer::aliased;
use crate::panic::guard;
use crate::ptr::{
    as_ref, check, check_out, free_boxed, opt_slice, overlaps, slice, slice_mut, span, write_out,
};
use crate::status::attnrt_status;

/// The KV cache of a multi-GPU layer: on each device of the layer, K and V pools of
/// `num_blocks` blocks of `block_size` tokens for that device's KV heads
/// (`attnrt_cuda_multi_layer_shard`), stored in the layer's precision.
///
/// Opaque. Calls that write the cache ([`attnrt_cuda_multi_forward_cached`]) are serialized by
/// a lock inside it; the caller owns the order in which sequences grow.
pub struct attnrt_cuda_multi_kv_cache {
    cache: Mutex<MultiGpuKvCache>,
    geometry: KvGeometry,
    /// Per device: its KV heads (elements of one pool = heads x head_dim x block_size x
    /// num_blocks).
    heads: Vec<usize>,
}

impl attnrt_cuda_multi_kv_cache {
    fn lock(&self) -> MutexGuard<'_, MultiGpuKvCache> {
        self.cache.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn device_elems(&self, index: usize) -> FfiResult<usize> {
        let heads = *self.heads.get(index).ok_or(attnrt::Error::InputValue {
            name: "device index",
            index: 0,
            value: index as i64,
            rule: "must be < the layer's number of devices",
        })?;
        let g = &self.geometry;
        Ok(heads * g.head_dim * g.block_size * g.num_blocks)
    }
}

/// The `attnrt_dtype` of a precision, for the pool size checks.
fn dtype(p: Precision) -> u32 {
    match p {
        Precision::F32 => 0,
        Precision::F16 => 1,
        Precision::Bf16 => 2,
    }
}

/// Creates the KV cache of `layer`'s split: on each of its devices, pools of `num_blocks`
/// blocks of `block_size` tokens for that device's KV heads (a KV head held by several
/// devices is stored on each), in the layer's precision, allocated and zeroed in device
/// memory. With `rolling` nonzero the cache is a rolling buffer for a sliding-window layer
/// (as `attnrt_kv_cache_new`).
///
/// On success `*out` receives the handle (free with [`attnrt_cuda_multi_kv_cache_free`]); on
/// error it is untouched and nothing stays allocated. Errors: `ATTNRT_STATUS_NULL_POINTER`,
/// `ATTNRT_STATUS_CONFIG` (`block_size` or `num_blocks` 0), `ATTNRT_STATUS_UNSUPPORTED`
/// (`rolling` for a layer without a sliding window), `ATTNRT_STATUS_LENGTH_OVERFLOW` (pools
/// larger than `PTRDIFF_MAX` bytes), `ATTNRT_STATUS_DEVICE` (out of device memory, a driver
/// failure). Takes the layer's lock (the handle does not keep the layer).
///
/// # Safety
/// `layer` NULL or a live multi-GPU layer handle; `out` NULL or valid for one write.
#[no_mangle]
pub unsafe extern "C" fn attnrt_cuda_multi_kv_cache_new(
    layer: *const attnrt_cuda_multi_layer,
    block_size: usize,
    num_blocks: usize,
    rolling: u8,
    out: *mut *mut attnrt_cuda_multi_kv_cache,
) -> attnrt_status {
    guard(|| {
        // SAFETY: the contract of this function.
        let layer = unsafe { as_ref("layer", layer) }?;
        check_out("out", out)?;
        let cfg = *layer.config();
        pool_elems(
            cfg.n_kv_head,
            cfg.head_dim,
            block_size,
            num_blocks,
            dtype(layer.precision),
        )?;
        if rolling != 0 && cfg.sliding_window.is_none() {
            return Err(no_window());
        }
        let heads = (0..layer.devices.len())
            .map(|i| Ok(layer.plan.shard(i)?.n_kv_head()))
            .collect::<FfiResult<Vec<usize>>>()?;
        let cache = layer
            .lock()
            .new_kv_cache(block_size, num_blocks, rolling != 0)?;
        let handle = Box::new(attnrt_cuda_multi_kv_cache {
            geometry: cache.geometry(),
            cache: Mutex::new(cache),
            heads,
        });
        // SAFETY: checked by `check_out`; valid by the contract.
        unsafe { write_out(out, Box::into_raw(handle)) };
        Ok(())
    })
}

/// Frees a multi-GPU KV cache and its device memory. NULL is a no-op. Every call using the
/// cache must have returned; never twice.
///
/// # Safety
/// `cache` NULL or a handle from [`attnrt_cuda_multi_kv_cache_new`] not yet freed.
#[no_mangle]
pub unsafe extern "C" fn attnrt_cuda_multi_kv_cache_free(cache: *mut attnrt_cuda_multi_kv_cache) {
    let _ = guard(|| {
        // SAFETY: NULL or a live handle made by `Box::into_raw`, whose every use the caller
        // gives up (this function's contract).
        unsafe { free_boxed(cache) };
        Ok(())
    });
}

/// Elements of one pool (K or V) of device `index`'s cache (`index` is the rank, as in
/// `attnrt_cuda_multi_layer_shard`): its KV heads x `head_dim` x `block_size` x `num_blocks`,
/// into `*elems`. Errors: `ATTNRT_STATUS_NULL_POINTER`, `ATTNRT_STATUS_INPUT_VALUE` (`index`
/// >= the number of devices). Thread-safe (no lock).
///
/// # Safety
/// `cache` NULL or a live handle; `elems` NULL or valid for one write.
#[no_mangle]
pub unsafe extern "C" fn attnrt_cuda_multi_kv_cache_size(
    cache: *const attnrt_cuda_multi_kv_cache,
    index: usize,
    elems: *mut usize,
) -> attnrt_status {
    guard(|| {
        // SAFETY: the contract of this function.
        let cache = unsafe { as_ref("cache", cache) }?;
        check_out("elems", elems)?;
        let n = cache.device_elems(index)?;
        // SAFETY: checked by `check_out`; valid by the contract.
        unsafe { write_out(elems, n) };
        Ok(())
    })
}

/// Copies device `index`'s pools, widened to f32, into `k_out` and `v_out` (each `len` =
/// `attnrt_cuda_multi_kv_cache_size` elements) in the pool layout of `attnrt_kv_cache_read_f32`
/// over that device's KV heads: block `b`, local KV head `g` (global head `kv_head_start + g`),
/// slot `i` at `((b * n_kv_head_i + g) * block_size + i) * head_dim`. For inspection, tests and
/// saving a cache.
///
/// Errors: `ATTNRT_STATUS_NULL_POINTER`, `ATTNRT_STATUS_MISALIGNED_POINTER`,
/// `ATTNRT_STATUS_LENGTH_OVERFLOW`, `ATTNRT_STATUS_INPUT_VALUE` (`index`),
/// `ATTNRT_STATUS_INPUT_SHAPE` (`len`), `ATTNRT_STATUS_ALIASED_BUFFERS` (`k_out` overlaps
/// `v_out`), `ATTNRT_STATUS_DEVICE` (a failed copy); nothing is written on error. Serialized
/// with the cache's other calls.
///
/// # Safety
/// `cache` NULL or a live handle; `k_out`, `v_out` NULL or valid for `len` writes.
#[no_mangle]
pub unsafe extern "C" fn attnrt_cuda_multi_kv_cache_read_f32(
    cache: *const attnrt_cuda_multi_kv_cache,
    index: usize,
    k_out: *mut f32,
    v_out: *mut f32,
    len: usize,
) -> attnrt_status {
    guard(|| {
        // SAFETY: the contract of this function.
        let cache = unsafe { as_ref("cache", cache) }?;
        check("k_out", k_out.cast_const(), len)?;
        check("v_out", v_out.cast_const(), len)?;
        if overlaps(span(k_out.cast_const(), len), span(v_out.cast_const(), len)) {
            return Err(aliased("k_out", "v_out"));
        }
        let want = cache.device_elems(index)?;
        if len != want {
            return Err(attnrt::Error::InputShape {
                name: "k_out / v_out",
                expected: want,
                actual: len,
            }
            .into());
        }
        let (k, v) = {
            let c = cache.lock();
            let dev = c.device(index).ok_or_else(|| {
                FfiError::new(attnrt_status::ATTNRT_STATUS_INTERNAL, "cache lost a device")
            })?;
            dev.read_f32()?
        };
        if k.len() != len || v.len() != len {
            return Err(FfiError::new(
                attnrt_status::ATTNRT_STATUS_INTERNAL,
                "device pool of an unexpected size",
            ));
        }
        // SAFETY: the contract of this function; checked above, disjoint.
        let k_out = unsafe { slice_mut("k_out", k_out, len) }?;
        // SAFETY: as above.
        let v_out = unsafe { slice_mut("v_out", v_out, len) }?;
        k_out.copy_from_slice(&k);
        v_out.copy_from_slice(&v);
        Ok(())
    })
}

/// Runs the multi-GPU `layer` on the new tokens of one or more sequences against `cache`, as
/// `attnrt_forward_cached` does on the CPU: prefill into an empty sequence (`cached` 0),
/// chunked prefill, or decode (one new token per sequence, a batch of sequences of different
/// lengths). Each device appends the new keys and values of its KV heads to its cache and
/// attends with its query heads; the partial outputs are summed with NCCL and `out` receives
/// the layer's output. `args` as for `attnrt_forward_cached`: `x` and `out` are `[sum of
/// new_tokens, n_embd]`; `seqs` the sequences with their block tables; `freqs_cis` the caller's
/// cos/sin table (when NULL, a rotary layer builds the rows of positions
/// `0..max(cached + new_tokens)` on the host for the call: pass a table built once with
/// `attnrt_rope_table` for long generations). `workspace`, `backend`, `parallel_for` and
/// `num_threads` are ignored (the workspace may be NULL). At most `max_batch * max_seq_len`
/// new tokens per call. On success `*backend_ran` receives `ATTNRT_BACKEND_CUDA`.
///
/// Every check runs before anything is written: on any error `out`, `*backend_ran` and the
/// cache are untouched, except a device failure during the call (5xx), after which `out` and
/// the new tokens' slots are unspecified.
///
/// Errors: `ATTNRT_STATUS_NULL_POINTER`, `ATTNRT_STATUS_MISALIGNED_POINTER`,
/// `ATTNRT_STATUS_LENGTH_OVERFLOW`, `ATTNRT_STATUS_ALIASED_BUFFERS`,
/// `ATTNRT_STATUS_INPUT_SHAPE` (`x`/`out` length; a cache made for a layer of other heads),
/// `ATTNRT_STATUS_INPUT_VALUE` (`cached + new_tokens` past `INT32_MAX`),
/// `ATTNRT_STATUS_KV_CACHE_FULL` (a sequence's blocks cannot hold the tokens of the call),
/// `ATTNRT_STATUS_KV_BLOCK` (a block id outside the pool, or used twice in the call),
/// `ATTNRT_STATUS_POSITION_OUT_OF_TABLE`, `ATTNRT_STATUS_UNSUPPORTED` (a rolling cache on a
/// layer without window; `freqs_cis` for a layer without rotary embedding; a cache made for
/// another split: other devices or precision), `ATTNRT_STATUS_DEVICE_CAPACITY` (more new
/// tokens than the layer's maxima), `ATTNRT_STATUS_DEVICE`, `ATTNRT_STATUS_DEVICE_BLAS`,
/// `ATTNRT_STATUS_DEVICE_COLLECTIVE`, `ATTNRT_STATUS_OUT_OF_MEMORY`.
///
/// Thread safety: serialized per layer and per cache by their locks (the layer's device
/// buffers are reused by every call).
///
/// # Safety
/// `layer`, `cache` NULL or live handles; `args` NULL or valid; every buffer in `args` valid
/// for its length (writes for `out`), each sequence's `blocks` valid for `n_blocks` reads,
/// none written by anyone else during the call; `backend_ran` NULL or valid for one write.
#[no_mangle]
pub unsafe extern "C" fn attnrt_cuda_multi_forward_cached(
    layer: *const attnrt_cuda_multi_layer,
    cache: *mut attnrt_cuda_multi_kv_cache,
    args: *const attnrt_cached_args,
    backend_ran: *mut attnrt_backend,
) -> attnrt_status {
    guard(|| {
        // SAFETY: the contract of this function.
        let layer = unsafe { as_ref("layer", layer) }?;
        // SAFETY: the contract of this function (the caches are reached through the lock).
        let cache = unsafe { as_ref("cache", cache.cast_const()) }?;
        // SAFETY: the contract of this function.
        let a = unsafe { as_ref("args", args) }?;
        check_out("backend_ran", backend_ran)?;
        let cfg = *layer.config();
        // SAFETY: the contract of this function.
        let x = unsafe { slice("x", a.x, a.x_len) }?;
        // SAFETY: as above.
        let freqs_cis = unsafe { opt_slice("freqs_cis", a.freqs_cis, a.freqs_cis_len) }?;
        // SAFETY: as above.
        let (c_seqs, seqs) = unsafe { sequences(a.seqs, a.n_seqs) }?;
        check("out", a.out.cast_const(), a.out_len)?;
        let out_span = span(a.out.cast_const(), a.out_len);
        let mut inputs = vec![
            ("x".to_string(), span(a.x, a.x_len)),
            ("freqs_cis".to_string(), span(a.freqs_cis, a.freqs_cis_len)),
            ("seqs".to_string(), span(a.seqs, a.n_seqs)),
        ];
        for (i, s) in c_seqs.iter().enumerate() {
            inputs.push((format!("seqs[{i}].blocks"), span(s.blocks, s.n_blocks)));
        }
        for (name, s) in &inputs {
            if overlaps(out_span, *s) {
                return Err(aliased("out", name));
            }
        }
        // SAFETY: the contract of this function; no other buffer of the call overlaps it.
        // Written only by the executor, after every check.
        let out = unsafe { slice_mut("out", a.out, a.out_len) }?;

        let y_len = seqs
            .iter()
            .try_fold(0usize, |t, s| t.checked_add(s.new_tokens))
            .and_then(|t| t.checked_mul(cfg.n_embd));
        for (name, len) in [("x", x.len()), ("out", out.len())] {
            if Some(len) != y_len {
                return Err(attnrt::Error::InputShape {
                    name,
                    expected: y_len.unwrap_or(usize::MAX),
                    actual: len,
                }
                .into());
            }
        }
        let end = check_use(&cfg, &cache.geometry, &seqs)?;
        let mut built = Vec::new();
        let table = cached_rope(&cfg, end, freqs_cis, &mut built)?;
        let mut m = layer.lock();
        let mut c = cache.lock();
        m.forward_cached(x, &seqs, table, &mut c, out)?;
        // SAFETY: checked by `check_out`; valid by the contract.
        unsafe { write_out(backend_ran, attnrt_backend::ATTNRT_BACKEND_CUDA) };
        Ok(())
    })
}

/// The rotary table of a cached call: the caller's `freqs_cis`, or, for a rotary layer
/// without one, the rows of positions `0..end` built on the host into `built` (allocated
/// here).
fn cached_rope<'a>(
    cfg: &attnrt::Config,
    end: usize,
    freqs_cis: Option<&'a [f32]>,
    built: &'a mut Vec<f32>,
) -> FfiResult<Option<RopeTable<'a>>> {
    Ok(match (cfg.rope(), freqs_cis) {
        (Some(_), Some(f)) => Some(RopeTable::new(f, cfg.head_dim)?),
        (None, Some(_)) => {
            return Err(attnrt::Error::Unsupported {
                what: "freqs_cis given but the layer has no rotary embedding",
            }
            .into())
        }
        (Some(rope), None) => {
            let n = end
                .checked_mul(cfg.head_dim)
                .ok_or(attnrt::Error::InputValue {
                    name: "sequence position",
                    index: 0,
                    value: end as i64,
                    rule: "the cos/sin rows overflow a size_t",
                })?;
            crate::cuda::alloc_rows(built, n)?;
            attnrt::rope::build_table(rope, cfg.head_dim, built)?;
            Some(RopeTable::new(built, cfg.head_dim)?)
        }
        (None, None) => None,
    })
}

/// The arguments of [`attnrt_cuda_multi_forward_cached_device`]: the new tokens' rows on
/// every device and room for the output on every device (device pointers), and the call's
/// sequences and rotary table (host memory).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct attnrt_cuda_multi_cached_device_args {
    /// Per device (`n_parts` entries, in the layer's device order): a device pointer, on that
    /// device, to its copy of the new tokens' rows `[sum of new_tokens, n_embd]`.
    pub x_parts: *const u64,
    /// Nonzero: the rows of `x_parts` are in the layer's storage type (bf16 / f16 rows as the
    /// previous layer of such a model leaves them); 0: f32.
    pub x_storage: i32,
    /// Per device: a device pointer, on that device, to room for the whole output
    /// `[sum of new_tokens, n_embd]`, f32 (every device receives the same summed output).
    pub out_parts: *const u64,
    /// Entries of `x_parts` and `out_parts`: the layer's number of devices.
    pub n_parts: usize,
    /// The sequences of the call (host memory), as in `attnrt_cached_args`.
    pub seqs: *const crate::kv::attnrt_sequence,
    /// Entries of `seqs`.
    pub n_seqs: usize,
    /// Optional host cos/sin table, as in `attnrt_cached_args`.
    pub freqs_cis: *const f32,
    /// Elements of `freqs_cis`.
    pub freqs_cis_len: usize,
}

/// Fills `*out` with empty device-resident cached arguments (NULL arrays, counts 0,
/// `x_storage` 0). Returns `ATTNRT_STATUS_NULL_POINTER` if `out` is NULL. Thread-safe.
///
/// # Safety
/// `out` NULL or valid for one write.
#[no_mangle]
pub unsafe extern "C" fn attnrt_cuda_multi_cached_device_args_init(
    out: *mut attnrt_cuda_multi_cached_device_args,
) -> attnrt_status {
    guard(|| {
        check_out("out", out)?;
        let empty = attnrt_cuda_multi_cached_device_args {
            x_parts: core::ptr::null(),
            x_storage: 0,
            out_parts: core::ptr::null(),
            n_parts: 0,
            seqs: core::ptr::null(),
            n_seqs: 0,
            freqs_cis: core::ptr::null(),
            freqs_cis_len: 0,
        };
        // SAFETY: checked by `check_out`; valid by the contract.
        unsafe { write_out(out, empty) };
        Ok(())
    })
}

/// [`attnrt_cuda_multi_forward_cached`] on activations that stay on the GPUs, for a
/// tensor-parallel server that keeps the hidden state on every device between layers: each
/// device reads the new tokens' rows from `x_parts[i]` and receives the whole summed output in
/// `out_parts[i]`; only the call's metadata crosses the host. The step is captured as CUDA
/// graphs and replayed while its shape and buffers stay the same (the same
/// pointers and token counts from step to step keep it replaying). Returns when every device
/// has finished. The layer's reduction must be an all-reduce (the default, or
/// `storage_dtype` without `scatter` / `all_to_all`). On success `*backend_ran` receives
/// `ATTNRT_BACKEND_CUDA`.
///
/// Errors: those of [`attnrt_cuda_multi_forward_cached`] (every check runs before anything is
/// written), and `ATTNRT_STATUS_NULL_POINTER` (`x_parts`, `out_parts`, or one of their device
/// pointers 0, named by index), `ATTNRT_STATUS_INPUT_SHAPE` (`n_parts` not the number of
/// devices), `ATTNRT_STATUS_UNSUPPORTED` (a reduce-scatter or all-to-all reduction).
///
/// # Safety
/// `layer`, `cache` NULL or live handles; `args` NULL or valid, its host arrays valid for
/// their lengths; each `x_parts[i]` / `out_parts[i]` a device allocation valid on the layer's
/// device `i` (its primary context) with room for the call's rows (`x` in the storage type
/// with `x_storage`, else f32; `out` f32), `x` fully written by work finished before the call,
/// `out` overlapping no `x` and unused by other work until the call returns; `backend_ran`
/// NULL or valid for one write.
#[no_mangle]
pub unsafe extern "C" fn attnrt_cuda_multi_forward_cached_device(
    layer: *const attnrt_cuda_multi_layer,
    cache: *mut attnrt_cuda_multi_kv_cache,
    args: *const attnrt_cuda_multi_cached_device_args,
    backend_ran: *mut attnrt_backend,
) -> attnrt_status {
    guard(|| {
        // SAFETY: the contract of this function.
        let layer = unsafe { as_ref("layer", layer) }?;
        // SAFETY: the contract of this function (the caches are reached through the lock).
        let cache = unsafe { as_ref("cache", cache.cast_const()) }?;
        // SAFETY: the contract of this function.
        let a = unsafe { as_ref("args", args) }?;
        check_out("backend_ran", backend_ran)?;
        let cfg = *layer.config();
        // SAFETY: the contract of this function (host arrays valid for their lengths).
        let x_parts = unsafe { slice("x_parts", a.x_parts, a.n_parts) }?;
        // SAFETY: as above.
        let out_parts = unsafe { slice("out_parts", a.out_parts, a.n_parts) }?;
        let devices = layer.devices.len();
        if a.n_parts != devices {
            return Err(attnrt::Error::InputShape {
                name: "n_parts",
                expected: devices,
                actual: a.n_parts,
            }
            .into());
        }
        for (name, parts) in [("x_parts", x_parts), ("out_parts", out_parts)] {
            if let Some(i) = parts.iter().position(|&p| p == 0) {
                return Err(FfiError::null(&format!("{name}[{i}] (device pointer)")));
            }
        }
        // SAFETY: as above.
        let freqs_cis = unsafe { opt_slice("freqs_cis", a.freqs_cis, a.freqs_cis_len) }?;
        // SAFETY: as above.
        let (_, seqs) = unsafe { sequences(a.seqs, a.n_seqs) }?;
        let end = check_use(&cfg, &cache.geometry, &seqs)?;
        let mut built = Vec::new();
        let table = cached_rope(&cfg, end, freqs_cis, &mut built)?;
        let call = attnrt_cuda::CachedDeviceCall {
            x: x_parts,
            x_storage: a.x_storage != 0,
            out: out_parts,
            seqs: &seqs,
            rope_table: table,
        };
        let mut m = layer.lock();
        let mut c = cache.lock();
        // SAFETY: device pointers valid by this function's contract.
        unsafe { m.forward_cached_device(&call, &mut c) }?;
        // SAFETY: checked by `check_out`; valid by the contract.
        unsafe { write_out(backend_ran, attnrt_backend::ATTNRT_BACKEND_CUDA) };
        Ok(())
    })
}
