//! `attnrt_kv_cache`: a paged KV cache whose pools the handle owns, and the cached forward call
//! (prefill, chunked prefill and decode through one entry).
//!
//! The pools are allocated (zeroed) by this ABI layer, not by the core, which only borrows
//! them for the duration of a call ([`attnrt::KvCache`]). Block tables stay with the caller:
//! a sequence is its `attnrt_sequence` (cached length + block ids), so "dropping a sequence"
//! is the caller returning its blocks to its own free list; [`attnrt_kv_cache_drop_blocks`]
//! additionally zeroes them.

use core::ffi::c_void;
use std::sync::{Mutex, MutexGuard, PoisonError};

use attnrt::{
    cached_workspace_len, kv_pool_len, Config, KvCache, KvGeometry, KvPool, PoolMemory, RopeTable,
    Sequence,
};
use half::{bf16, f16};

use crate::backend::{attnrt_backend, lanes};
use crate::error::{FfiError, FfiResult};
use crate::layer::{aliased, attnrt_layer, attnrt_parallel_for_fn};
use crate::panic::guard;
use crate::pool::Pool;
use crate::ptr::{
    as_ref, check, check_out, free_boxed, opt_slice, overlaps, slice, slice_mut, span, write_out,
};
use crate::status::attnrt_status;

/// The K and V pools of a cache, owned.
#[derive(Debug)]
enum Pools {
    F32(PoolMemory<f32>, PoolMemory<f32>),
    F16(PoolMemory<f16>, PoolMemory<f16>),
    Bf16(PoolMemory<bf16>, PoolMemory<bf16>),
}

/// `n` copies of `zero` as a pool that decode reads fast ([`PoolMemory`]: 2 MiB pages where
/// the OS gives them).
fn zeroed<T: Copy>(n: usize, zero: T) -> FfiResult<PoolMemory<T>> {
    PoolMemory::filled(n, zero).map_err(|_| {
        FfiError::new(
            attnrt_status::ATTNRT_STATUS_OUT_OF_MEMORY,
            format!("cannot allocate a KV pool of {n} elements"),
        )
    })
}

impl Pools {
    fn new(dtype: u32, n: usize) -> FfiResult<Pools> {
        Ok(match dtype {
            0 => Pools::F32(zeroed(n, 0.0)?, zeroed(n, 0.0)?),
            1 => Pools::F16(zeroed(n, f16::ZERO)?, zeroed(n, f16::ZERO)?),
            2 => Pools::Bf16(zeroed(n, bf16::ZERO)?, zeroed(n, bf16::ZERO)?),
            v => return Err(bad_dtype(v)),
        })
    }

    fn view(&mut self) -> KvPool<'_> {
        match self {
            Pools::F32(k, v) => KvPool::F32 { k, v },
            Pools::F16(k, v) => KvPool::F16 { k, v },
            Pools::Bf16(k, v) => KvPool::Bf16 { k, v },
        }
    }

    /// Zeroes elements `range` of both pools.
    fn zero(&mut self, range: core::ops::Range<usize>) {
        match self {
            Pools::F32(k, v) => {
                k[range.clone()].fill(0.0);
                v[range].fill(0.0);
            }
            Pools::F16(k, v) => {
                k[range.clone()].fill(f16::ZERO);
                v[range].fill(f16::ZERO);
            }
            Pools::Bf16(k, v) => {
                k[range.clone()].fill(bf16::ZERO);
                v[range].fill(bf16::ZERO);
            }
        }
    }
}

fn bad_dtype(v: u32) -> FfiError {
    FfiError::bad_enum("dtype", v, "an attnrt_dtype, 0..=2")
}

fn elem_size(dtype: u32) -> FfiResult<usize> {
    match dtype {
        0 => Ok(4),
        1 | 2 => Ok(2),
        v => Err(bad_dtype(v)),
    }
}

/// Elements of one pool, with every dimension > 0 and the byte size within `PTRDIFF_MAX`.
pub(crate) fn pool_elems(
    n_kv_head: usize,
    head_dim: usize,
    block_size: usize,
    num_blocks: usize,
    dtype: u32,
) -> FfiResult<usize> {
    let size = elem_size(dtype)?;
    for (field, v) in [
        ("n_kv_head", n_kv_head),
        ("head_dim", head_dim),
        ("block_size", block_size),
        ("num_blocks", num_blocks),
    ] {
        if v == 0 {
            return Err(attnrt::Error::Config {
                field,
                value: 0,
                rule: "a KV cache dimension must be > 0",
            }
            .into());
        }
    }
    let n = kv_pool_len(n_kv_head, head_dim, block_size, num_blocks);
    match n.checked_mul(size) {
        Some(bytes) if n != usize::MAX && bytes <= isize::MAX as usize => Ok(n),
        _ => Err(FfiError::new(
            attnrt_status::ATTNRT_STATUS_LENGTH_OVERFLOW,
            format!(
                "a KV pool of {n_kv_head} x {head_dim} x {block_size} x {num_blocks} elements \
                 of {size} bytes overflows the address space"
            ),
        )),
    }
}

/// A paged KV cache: a K pool and a V pool of `num_blocks` blocks of `block_size` tokens for
/// every KV head, owned by the handle (allocated and zeroed by [`attnrt_kv_cache_new`]).
///
/// Opaque. Block tables are the caller's (see [`attnrt_sequence`]). Calls that write the cache
/// ([`attnrt_forward_cached`], [`attnrt_kv_cache_reset`], [`attnrt_kv_cache_drop_blocks`]) are
/// serialized by a lock inside the handle, so concurrent use is memory-safe, but the caller
/// owns the order in which sequences grow: use one cache from one thread at a time, and
/// distinct caches freely in parallel.
#[derive(Debug)]
pub struct attnrt_kv_cache {
    pools: Mutex<Pools>,
    n_kv_head: usize,
    head_dim: usize,
    block_size: usize,
    num_blocks: usize,
    rolling: bool,
}

impl attnrt_kv_cache {
    /// The pools; a panic during an earlier call (`ATTNRT_STATUS_PANIC`, contents unspecified)
    /// does not make the cache unusable.
    fn lock(&self) -> MutexGuard<'_, Pools> {
        self.pools.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn block_elems(&self) -> usize {
        self.n_kv_head * self.head_dim * self.block_size
    }

    fn geometry(&self) -> KvGeometry {
        KvGeometry {
            n_kv_head: self.n_kv_head,
            head_dim: self.head_dim,
            block_size: self.block_size,
            num_blocks: self.num_blocks,
            rolling: self.rolling,
        }
    }
}

/// One sequence of a cached forward call. The block table is the caller's: it lists the
/// sequence's blocks (ids `0..num_blocks` of the cache's pool) in logical order, and must hold
/// `cached + new_tokens` tokens (`window + new_tokens - 1` for a rolling cache), else the call
/// fails with `ATTNRT_STATUS_KV_CACHE_FULL`. No block may appear twice in one call, within a
/// sequence or across sequences (`ATTNRT_STATUS_KV_BLOCK`).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct attnrt_sequence {
    /// Tokens of this sequence already in the cache: the new tokens take positions
    /// `cached .. cached + new_tokens` (rotary embedding and the mask use them).
    pub cached: usize,
    /// New tokens of this call, consecutive rows of `x` (0: the sequence is skipped).
    pub new_tokens: usize,
    /// The block table, `n_blocks` block ids (NULL only with `n_blocks` 0).
    pub blocks: *const u32,
    /// Entries of `blocks`.
    pub n_blocks: usize,
}

/// Writes to `*elems_per_pool` the elements of one pool (K or V; the cache has two) of a cache
/// of `num_blocks` blocks of `block_size` tokens for `n_kv_head` heads of `head_dim` values:
/// `n_kv_head * head_dim * block_size * num_blocks`. Bytes are that times 4 (f32) or 2
/// (f16, bf16).
///
/// Errors: `ATTNRT_STATUS_NULL_POINTER`, `ATTNRT_STATUS_BAD_ENUM` (dtype),
/// `ATTNRT_STATUS_CONFIG` (a dimension 0), `ATTNRT_STATUS_LENGTH_OVERFLOW` (more than
/// `PTRDIFF_MAX` bytes). Thread-safe.
///
/// # Safety
/// `elems_per_pool` must be NULL or valid for one write.
#[no_mangle]
pub unsafe extern "C" fn attnrt_kv_cache_size(
    n_kv_head: usize,
    head_dim: usize,
    block_size: usize,
    num_blocks: usize,
    dtype: u32,
    elems_per_pool: *mut usize,
) -> attnrt_status {
    guard(|| {
        check_out("elems_per_pool", elems_per_pool)?;
        let n = pool_elems(n_kv_head, head_dim, block_size, num_blocks, dtype)?;
        // SAFETY: checked by `check_out`; valid by the contract.
        unsafe { write_out(elems_per_pool, n) };
        Ok(())
    })
}

/// Creates a KV cache for `layer`'s KV heads (`n_kv_head` x `head_dim` of its configuration):
/// `num_blocks` blocks of `block_size` tokens, stored as `dtype` (an `attnrt_dtype`; values are
/// rounded to it when appended, attention computes in f32). The handle allocates and zeroes
/// both pools (see [`attnrt_kv_cache_size`]); it does not keep `layer`.
///
/// With `rolling` nonzero the cache is a rolling buffer for a sliding-window layer of window
/// W: logical token `j` of a sequence lives in slot `j mod S` (`S` = its blocks x
/// `block_size`), so a sequence needs only `W + new_tokens - 1` slots however long it grows.
///
/// On success `*out` receives the handle (free with [`attnrt_kv_cache_free`]); on error it is
/// untouched. Errors: `ATTNRT_STATUS_NULL_POINTER`, `ATTNRT_STATUS_BAD_ENUM`,
/// `ATTNRT_STATUS_CONFIG` (`block_size` or `num_blocks` 0), `ATTNRT_STATUS_UNSUPPORTED`
/// (`rolling` for a layer without a sliding window), `ATTNRT_STATUS_LENGTH_OVERFLOW`,
/// `ATTNRT_STATUS_OUT_OF_MEMORY`. Thread-safe (the layer is only read).
///
/// # Safety
/// `layer` must be NULL or a live layer handle; `out` NULL or valid for one write.
#[no_mangle]
pub unsafe extern "C" fn attnrt_kv_cache_new(
    layer: *const attnrt_layer,
    dtype: u32,
    block_size: usize,
    num_blocks: usize,
    rolling: u8,
    out: *mut *mut attnrt_kv_cache,
) -> attnrt_status {
    guard(|| {
        // SAFETY: the contract of this function.
        let layer = unsafe { as_ref("layer", layer) }?;
        check_out("out", out)?;
        let cfg = &layer.cfg;
        let n = pool_elems(cfg.n_kv_head, cfg.head_dim, block_size, num_blocks, dtype)?;
        if rolling != 0 && cfg.sliding_window.is_none() {
            return Err(no_window());
        }
        let cache = Box::new(attnrt_kv_cache {
            pools: Mutex::new(Pools::new(dtype, n)?),
            n_kv_head: cfg.n_kv_head,
            head_dim: cfg.head_dim,
            block_size,
            num_blocks,
            rolling: rolling != 0,
        });
        // SAFETY: checked by `check_out`; valid by the contract.
        unsafe { write_out(out, Box::into_raw(cache)) };
        Ok(())
    })
}

pub(crate) fn no_window() -> FfiError {
    attnrt::Error::Unsupported {
        what: "a rolling KV cache needs a sliding-window layer",
    }
    .into()
}

/// Frees a cache made by [`attnrt_kv_cache_new`] and its pools. NULL is a no-op.
///
/// Every call using `cache` must have returned, and none may start after; never twice.
///
/// # Safety
/// `cache` must be NULL or a handle from [`attnrt_kv_cache_new`] not yet freed.
#[no_mangle]
pub unsafe extern "C" fn attnrt_kv_cache_free(cache: *mut attnrt_kv_cache) {
    let _ = guard(|| {
        // SAFETY: NULL or a live handle made by `Box::into_raw`, whose every use the caller
        // gives up (this function's contract).
        unsafe { free_boxed(cache) };
        Ok(())
    });
}

/// Zeroes both pools: every sequence is forgotten (the caller resets its block tables and
/// cached lengths). Errors: `ATTNRT_STATUS_NULL_POINTER`. Serialized with the cache's other
/// calls by the handle's lock.
///
/// # Safety
/// `cache` must be NULL or a live handle.
#[no_mangle]
pub unsafe extern "C" fn attnrt_kv_cache_reset(cache: *mut attnrt_kv_cache) -> attnrt_status {
    guard(|| {
        // SAFETY: the contract of this function.
        let cache = unsafe { as_ref("cache", cache.cast_const()) }?;
        let mut pools = cache.lock();
        let n = cache.block_elems() * cache.num_blocks;
        pools.zero(0..n);
        Ok(())
    })
}

/// Zeroes blocks `blocks[0..n]` of both pools, for a caller that returns a finished
/// sequence's blocks to its free list and wants no stale keys left behind. (Dropping a
/// sequence needs no call: block tables are the caller's, and a block handed to a new sequence
/// is overwritten before it is read. This call is hygiene, not a requirement.) Repeated ids are
/// allowed.
///
/// Errors: `ATTNRT_STATUS_NULL_POINTER` (`cache`, or `blocks` with `n > 0`),
/// `ATTNRT_STATUS_MISALIGNED_POINTER`, `ATTNRT_STATUS_KV_BLOCK` (an id `>= num_blocks`; then
/// nothing is zeroed). Serialized with the cache's other calls.
///
/// # Safety
/// `cache` must be NULL or a live handle; `blocks` NULL or valid for `n` reads.
#[no_mangle]
pub unsafe extern "C" fn attnrt_kv_cache_drop_blocks(
    cache: *mut attnrt_kv_cache,
    blocks: *const u32,
    n: usize,
) -> attnrt_status {
    guard(|| {
        // SAFETY: the contract of this function.
        let cache = unsafe { as_ref("cache", cache.cast_const()) }?;
        // SAFETY: the contract of this function.
        let blocks = unsafe { opt_slice("blocks", blocks, n) }?.unwrap_or(&[]);
        if let Some(i) = blocks.iter().position(|&b| b as usize >= cache.num_blocks) {
            return Err(outside(i, blocks[i], cache.num_blocks));
        }
        let mut pools = cache.lock();
        let e = cache.block_elems();
        for &b in blocks {
            let b = b as usize;
            pools.zero(b * e..(b + 1) * e);
        }
        Ok(())
    })
}

/// Copies both pools, converted to f32, into `k_out` and `v_out` (each `len` =
/// `attnrt_kv_cache_size` elements, in the pool layout: block `b`, KV head `g`, slot `i` at
/// `((b * n_kv_head + g) * block_size + i) * head_dim`). For inspection, tests and saving a
/// cache; f16/bf16 values convert exactly.
///
/// Errors: `ATTNRT_STATUS_NULL_POINTER`, `ATTNRT_STATUS_MISALIGNED_POINTER`,
/// `ATTNRT_STATUS_LENGTH_OVERFLOW`, `ATTNRT_STATUS_INPUT_SHAPE` (`len`),
/// `ATTNRT_STATUS_ALIASED_BUFFERS` (`k_out` overlaps `v_out`); nothing is written on error.
/// Serialized with the cache's other calls.
///
/// # Safety
/// `cache` NULL or a live handle; `k_out`, `v_out` NULL or valid for `len` writes.
#[no_mangle]
pub unsafe extern "C" fn attnrt_kv_cache_read_f32(
    cache: *const attnrt_kv_cache,
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
        let want = cache.block_elems() * cache.num_blocks;
        if len != want {
            return Err(attnrt::Error::InputShape {
                name: "k_out / v_out",
                expected: want,
                actual: len,
            }
            .into());
        }
        // SAFETY: the contract of this function; checked above, disjoint.
        let k_out = unsafe { slice_mut("k_out", k_out, len) }?;
        // SAFETY: as above.
        let v_out = unsafe { slice_mut("v_out", v_out, len) }?;
        fn put<E: Copy + Into<f32>>(dst: &mut [f32], src: &[E]) {
            dst.iter_mut().zip(src).for_each(|(d, &s)| *d = s.into());
        }
        match &*cache.lock() {
            Pools::F32(k, v) => {
                k_out.copy_from_slice(k);
                v_out.copy_from_slice(v);
            }
            Pools::F16(k, v) => {
                put(k_out, k);
                put(v_out, v);
            }
            Pools::Bf16(k, v) => {
                put(k_out, k);
                put(v_out, v);
            }
        }
        Ok(())
    })
}

fn outside(i: usize, b: u32, num_blocks: usize) -> FfiError {
    FfiError::new(
        attnrt_status::ATTNRT_STATUS_KV_BLOCK,
        format!("block table entry {i}: block id {b} is outside the pool of {num_blocks} blocks"),
    )
}

/// The caller's sequences as the runtime's.
///
/// # Safety
/// `seqs` must be NULL or valid for `n` reads, and each sequence's `blocks` NULL or valid for
/// `n_blocks` reads, none written during `'a`.
pub(crate) unsafe fn sequences<'a>(
    seqs: *const attnrt_sequence,
    n: usize,
) -> FfiResult<(&'a [attnrt_sequence], Vec<Sequence<'a>>)> {
    // SAFETY: forwarded contract.
    let c = unsafe { opt_slice("seqs", seqs, n) }?.unwrap_or(&[]);
    let mut v = Vec::new();
    v.try_reserve_exact(c.len()).map_err(|_| {
        FfiError::new(
            attnrt_status::ATTNRT_STATUS_OUT_OF_MEMORY,
            "cannot allocate the sequence list",
        )
    })?;
    for (i, s) in c.iter().enumerate() {
        // SAFETY: forwarded contract.
        let blocks = unsafe { opt_slice(&format!("seqs[{i}].blocks"), s.blocks, s.n_blocks) }?;
        v.push(Sequence {
            cached: s.cached,
            new_tokens: s.new_tokens,
            blocks: blocks.unwrap_or(&[]),
        });
    }
    Ok((c, v))
}

/// One past the largest position a call writes (0 when no sequence has new tokens); an error
/// when a sequence's positions overflow the runtime's range.
pub(crate) fn max_end(seqs: &[Sequence<'_>]) -> FfiResult<usize> {
    let mut most = 0;
    for (i, s) in seqs.iter().enumerate() {
        let end = s
            .cached
            .checked_add(s.new_tokens)
            .filter(|&e| e <= i32::MAX as usize)
            .ok_or(attnrt::Error::InputValue {
                name: "sequence position",
                index: i,
                value: s.cached.min(i64::MAX as usize) as i64,
                rule: "cached + new_tokens overflows the position range",
            })?;
        if s.new_tokens > 0 {
            most = most.max(end);
        }
    }
    Ok(most)
}

/// Every check of the cache's use, before anything is written: heads, rolling, positions,
/// capacity ("cache full"), block ids (inside the pool, each once). Returns [`max_end`].
/// Shared by the CPU cache and the multi-GPU one, so both report the same statuses.
pub(crate) fn check_use(
    cfg: &Config,
    cache: &KvGeometry,
    seqs: &[Sequence<'_>],
) -> FfiResult<usize> {
    if cache.n_kv_head != cfg.n_kv_head || cache.head_dim != cfg.head_dim {
        return Err(FfiError::new(
            attnrt_status::ATTNRT_STATUS_INPUT_SHAPE,
            format!(
                "the KV cache holds {} heads of {} values, the layer has {} of {}",
                cache.n_kv_head, cache.head_dim, cfg.n_kv_head, cfg.head_dim
            ),
        ));
    }
    if cache.rolling && cfg.sliding_window.is_none() {
        return Err(no_window());
    }
    let end = max_end(seqs)?;
    let window = cfg.sliding_window.unwrap_or(usize::MAX);
    let mut ids = Vec::new();
    for (i, s) in seqs.iter().enumerate() {
        let need = if cache.rolling {
            window.saturating_add(s.new_tokens).saturating_sub(1)
        } else {
            s.cached + s.new_tokens
        };
        let cap = s.blocks.len().saturating_mul(cache.block_size);
        if s.new_tokens > 0 && cap < need {
            return Err(FfiError::new(
                attnrt_status::ATTNRT_STATUS_KV_CACHE_FULL,
                format!(
                    "KV cache full: sequence {i} needs {need} token slots, its {} blocks of {} \
                     hold {cap}",
                    s.blocks.len(),
                    cache.block_size
                ),
            ));
        }
        if let Some(j) = s
            .blocks
            .iter()
            .position(|&b| b as usize >= cache.num_blocks)
        {
            return Err(outside(j, s.blocks[j], cache.num_blocks));
        }
        ids.try_reserve(s.blocks.len()).map_err(|_| {
            FfiError::new(
                attnrt_status::ATTNRT_STATUS_OUT_OF_MEMORY,
                "cannot allocate the block check",
            )
        })?;
        ids.extend_from_slice(s.blocks);
    }
    ids.sort_unstable();
    if let Some(w) = ids.windows(2).find(|w| w[0] == w[1]) {
        return Err(FfiError::new(
            attnrt_status::ATTNRT_STATUS_KV_BLOCK,
            format!("block {} is used twice in one call", w[0]),
        ));
    }
    Ok(end)
}

/// f32 elements of the cos/sin rows a call builds when it has no caller table: positions
/// `0..end` of a rotary layer.
fn table_elems(cfg: &Config, end: usize) -> FfiResult<usize> {
    if cfg.rope().is_none() {
        return Ok(0);
    }
    Ok(end.checked_mul(cfg.head_dim).ok_or(overflow())?)
}

fn overflow() -> attnrt::Error {
    attnrt::Error::InputValue {
        name: "sequence position",
        index: 0,
        value: 0,
        rule: "the workspace size overflows a size_t",
    }
}

/// The workspace of a cached call: the runtime's part plus, with `with_table`, the table rows.
fn cached_elems(
    cfg: &Config,
    cache: &attnrt_kv_cache,
    seqs: &[Sequence<'_>],
    lanes: usize,
    with_table: bool,
) -> FfiResult<(usize, usize)> {
    let table = if with_table {
        table_elems(cfg, max_end(seqs)?)?
    } else {
        0
    };
    let exec = cached_workspace_len(cfg, seqs, lanes, cache.num_blocks);
    if exec == usize::MAX {
        return Err(overflow().into());
    }
    Ok((table, exec.checked_add(table).ok_or(overflow())?))
}

/// f32 elements of workspace [`attnrt_forward_cached`] needs for these sequences on `layer`
/// and `cache` with `num_threads` lanes (0 counts as 1), when the call passes no `freqs_cis`
/// (a rotary layer then builds the cos/sin rows of positions `0..max(cached + new_tokens)`
/// into the workspace; a call with a caller table needs that much less).
///
/// Writes `*out_elems` on success. Errors: `ATTNRT_STATUS_NULL_POINTER`,
/// `ATTNRT_STATUS_MISALIGNED_POINTER`, `ATTNRT_STATUS_INPUT_VALUE` (positions or the size
/// overflow). Thread-safe; reads no pool.
///
/// # Safety
/// `layer`, `cache` NULL or live handles; `seqs` NULL or valid for `n_seqs` reads, each
/// `blocks` valid for `n_blocks` reads; `out_elems` NULL or valid for one write.
#[no_mangle]
pub unsafe extern "C" fn attnrt_cached_workspace_size(
    layer: *const attnrt_layer,
    cache: *const attnrt_kv_cache,
    seqs: *const attnrt_sequence,
    n_seqs: usize,
    num_threads: usize,
    out_elems: *mut usize,
) -> attnrt_status {
    guard(|| {
        // SAFETY: the contract of this function.
        let layer = unsafe { as_ref("layer", layer) }?;
        // SAFETY: the contract of this function.
        let cache = unsafe { as_ref("cache", cache) }?;
        check_out("out_elems", out_elems)?;
        // SAFETY: the contract of this function.
        let (_, seqs) = unsafe { sequences(seqs, n_seqs) }?;
        let (_, n) = cached_elems(&layer.cfg, cache, &seqs, lanes(num_threads), true)?;
        // SAFETY: checked by `check_out`; valid by the contract.
        unsafe { write_out(out_elems, n) };
        Ok(())
    })
}

/// Writes the cos/sin table of `layer`'s rotary embedding for positions `0..max_pos` into
/// `out` (`[max_pos, head_dim / 2, 2]`, `out_len == max_pos * head_dim`), bitwise the rows
/// the library builds itself. A server builds it once for its longest context and passes it
/// as `freqs_cis` to every call, so that no call builds rows.
///
/// Errors: `ATTNRT_STATUS_NULL_POINTER`, `ATTNRT_STATUS_MISALIGNED_POINTER`,
/// `ATTNRT_STATUS_LENGTH_OVERFLOW`, `ATTNRT_STATUS_INPUT_SHAPE` (`out_len`),
/// `ATTNRT_STATUS_UNSUPPORTED` (a layer without rotary embedding); `out` is untouched on
/// error. Thread-safe.
///
/// # Safety
/// `layer` NULL or a live handle; `out` NULL or valid for `out_len` writes.
#[no_mangle]
pub unsafe extern "C" fn attnrt_rope_table(
    layer: *const attnrt_layer,
    max_pos: usize,
    out: *mut f32,
    out_len: usize,
) -> attnrt_status {
    guard(|| {
        // SAFETY: the contract of this function.
        let layer = unsafe { as_ref("layer", layer) }?;
        let cfg = &layer.cfg;
        let Some(rope) = cfg.rope() else {
            return Err(attnrt::Error::Unsupported {
                what: "the layer has no rotary embedding",
            }
            .into());
        };
        let want = max_pos.checked_mul(cfg.head_dim);
        if want != Some(out_len) {
            return Err(attnrt::Error::InputShape {
                name: "out (max_pos * head_dim)",
                expected: want.unwrap_or(usize::MAX),
                actual: out_len,
            }
            .into());
        }
        // SAFETY: the contract of this function.
        let out = unsafe { slice_mut("out", out, out_len) }?;
        attnrt::rope::build_table(rope, cfg.head_dim, out)?;
        Ok(())
    })
}

/// The arguments of a cached forward call. Initialise with [`attnrt_cached_args_init`], then
/// set what you use. `x` and `out` are `[sum of new_tokens, n_embd]`: the new tokens of
/// sequence 0, then those of sequence 1, and so on.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct attnrt_cached_args {
    /// New tokens' activations. Required (any non-null pointer when there are none).
    pub x: *const f32,
    /// Elements of `x`: `sum(new_tokens) * n_embd`.
    pub x_len: usize,
    /// The sequences of the call.
    pub seqs: *const attnrt_sequence,
    /// Entries of `seqs`.
    pub n_seqs: usize,
    /// Optional `[max_pos, head_dim / 2, 2]` cos/sin table indexed by position (see
    /// `attnrt_rope_table`). When NULL and the layer is rotary, the call builds the rows of
    /// positions `0..max(cached + new_tokens)` into the workspace: fine for short contexts; a
    /// long generation should pass a table built once.
    pub freqs_cis: *const f32,
    /// Elements of `freqs_cis`.
    pub freqs_cis_len: usize,
    /// Scratch, at least `attnrt_cached_workspace_size` elements. Must not overlap any other
    /// buffer of the call.
    pub workspace: *mut f32,
    /// Elements of `workspace`.
    pub workspace_len: usize,
    /// Output, written only on success. Must not overlap any other buffer of the call.
    pub out: *mut f32,
    /// Elements of `out`: `sum(new_tokens) * n_embd`.
    pub out_len: usize,
    /// An `attnrt_backend`: AUTO or CPU_SIMD (the SIMD executor has the cached path);
    /// REFERENCE returns `ATTNRT_STATUS_UNSUPPORTED`, CUDA `ATTNRT_STATUS_BACKEND_UNAVAILABLE`.
    pub backend: u32,
    /// The host's parallel-for, or NULL: as in `attnrt_forward_args`.
    pub parallel_for: attnrt_parallel_for_fn,
    /// The host's context for `parallel_for`.
    pub parallel_ctx: *mut c_void,
    /// Lanes, as in `attnrt_forward_args` (pass the same to `attnrt_cached_workspace_size`).
    pub num_threads: usize,
}

/// Fills `*out` with empty cached arguments: pointers NULL, lengths 0, backend AUTO, no
/// parallel-for, `num_threads` 0. Returns `ATTNRT_STATUS_NULL_POINTER` if `out` is NULL.
/// Thread-safe.
///
/// # Safety
/// `out` must be NULL or valid for one write.
#[no_mangle]
pub unsafe extern "C" fn attnrt_cached_args_init(out: *mut attnrt_cached_args) -> attnrt_status {
    guard(|| {
        check_out("out", out)?;
        let empty = attnrt_cached_args {
            x: core::ptr::null(),
            x_len: 0,
            seqs: core::ptr::null(),
            n_seqs: 0,
            freqs_cis: core::ptr::null(),
            freqs_cis_len: 0,
            workspace: core::ptr::null_mut(),
            workspace_len: 0,
            out: core::ptr::null_mut(),
            out_len: 0,
            backend: attnrt_backend::ATTNRT_BACKEND_AUTO as u32,
            parallel_for: None,
            parallel_ctx: core::ptr::null_mut(),
            num_threads: 0,
        };
        // SAFETY: checked by `check_out`; valid by the contract.
        unsafe { write_out(out, empty) };
        Ok(())
    })
}

/// Runs `layer` on the new tokens of one or more sequences against `cache`: prefill into an
/// empty sequence (`cached` 0), chunked prefill, or decode (one new token per sequence, a batch
/// of sequences of different lengths), appending the new keys and values to the cache. Token
/// `t` of a sequence has position `cached + t` and sees the keys at positions `<= cached + t`
/// (within the sliding window, if any). The results equal `attnrt_forward` over each whole
/// sequence (within 1e-4 for an f32 cache) and do not depend on the thread count, the block
/// size, the block ids or the other sequences of the call.
///
/// Every check runs before anything is written: on any error `out`, `*backend_ran` and the
/// cache are untouched (the workspace may have been written), except
/// `ATTNRT_STATUS_PARALLEL_FOR_CONTRACT` (a host that broke its contract): then `out` and the
/// new tokens' slots of the cache are unspecified, and those sequences must be recomputed.
/// After success the caller advances each sequence's `cached` by its `new_tokens`.
///
/// Errors: `ATTNRT_STATUS_NULL_POINTER`, `ATTNRT_STATUS_MISALIGNED_POINTER`,
/// `ATTNRT_STATUS_LENGTH_OVERFLOW`, `ATTNRT_STATUS_BAD_ENUM` (backend),
/// `ATTNRT_STATUS_ALIASED_BUFFERS`, `ATTNRT_STATUS_INPUT_SHAPE` (`x`/`out` length; cache heads
/// that differ from the layer's; a `freqs_cis` row of the wrong width),
/// `ATTNRT_STATUS_INPUT_VALUE` (`cached + new_tokens` past `INT32_MAX`),
/// `ATTNRT_STATUS_KV_CACHE_FULL`, `ATTNRT_STATUS_KV_BLOCK` (a block id outside the pool or
/// used twice), `ATTNRT_STATUS_POSITION_OUT_OF_TABLE` (past the caller's `freqs_cis`),
/// `ATTNRT_STATUS_WORKSPACE_TOO_SMALL`, `ATTNRT_STATUS_UNSUPPORTED` (REFERENCE backend; a
/// rolling cache on a layer without window; `freqs_cis` for a layer without rotary
/// embedding), `ATTNRT_STATUS_BACKEND_UNAVAILABLE` (CUDA: use the `attnrt_cuda_*` handles),
/// `ATTNRT_STATUS_PARALLEL_FOR_CONTRACT`.
///
/// Thread safety: `layer` may serve any number of calls at once; calls on one `cache` are
/// serialized by its lock (use distinct caches to run in parallel).
///
/// # Safety
/// `layer`, `cache` NULL or live handles; `args` NULL or valid; every buffer in `args` valid
/// for its length (writes for `workspace` and `out`), each sequence's `blocks` valid for
/// `n_blocks` reads, none written by anyone else during the call; `backend_ran` NULL or valid
/// for one write; `parallel_for` keeps the contract of `attnrt_parallel_for_fn`.
#[no_mangle]
pub unsafe extern "C" fn attnrt_forward_cached(
    layer: *const attnrt_layer,
    cache: *mut attnrt_kv_cache,
    args: *const attnrt_cached_args,
    backend_ran: *mut attnrt_backend,
) -> attnrt_status {
    guard(|| {
        // SAFETY: the contract of this function.
        let layer = unsafe { as_ref("layer", layer) }?;
        // SAFETY: the contract of this function (the pools are reached through the lock).
        let cache = unsafe { as_ref("cache", cache.cast_const()) }?;
        // SAFETY: the contract of this function.
        let a = unsafe { as_ref("args", args) }?;
        check_out("backend_ran", backend_ran)?;
        match attnrt_backend::from_u32(a.backend)? {
            attnrt_backend::ATTNRT_BACKEND_AUTO | attnrt_backend::ATTNRT_BACKEND_CPU_SIMD => {}
            attnrt_backend::ATTNRT_BACKEND_REFERENCE => {
                return Err(FfiError::new(
                    attnrt_status::ATTNRT_STATUS_UNSUPPORTED,
                    "the scalar reference has no KV-cache path; use AUTO or CPU_SIMD",
                ))
            }
            attnrt_backend::ATTNRT_BACKEND_CUDA => {
                return Err(FfiError::new(
                    attnrt_status::ATTNRT_STATUS_BACKEND_UNAVAILABLE,
                    "a CUDA KV cache lives on a device: use the attnrt_cuda_* handles",
                ))
            }
        }
        let cfg = &layer.cfg;
        // SAFETY: the contract of this function.
        let x = unsafe { slice("x", a.x, a.x_len) }?;
        // SAFETY: as above.
        let freqs_cis = unsafe { opt_slice("freqs_cis", a.freqs_cis, a.freqs_cis_len) }?;
        // SAFETY: as above.
        let (c_seqs, seqs) = unsafe { sequences(a.seqs, a.n_seqs) }?;

        check("workspace", a.workspace.cast_const(), a.workspace_len)?;
        check("out", a.out.cast_const(), a.out_len)?;
        let ws_span = span(a.workspace.cast_const(), a.workspace_len);
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
            if overlaps(ws_span, *s) {
                return Err(aliased("workspace", name));
            }
        }
        if overlaps(out_span, ws_span) {
            return Err(aliased("out", "workspace"));
        }
        // SAFETY: the contract of this function; no other buffer of the call overlaps it.
        let workspace = unsafe { slice_mut("workspace", a.workspace, a.workspace_len) }?;
        // SAFETY: as above. Written only by the runtime, after every check.
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
        check_use(cfg, &cache.geometry(), &seqs)?;
        let build = cfg.rope().is_some() && freqs_cis.is_none();
        let (table_len, needed) = cached_elems(cfg, cache, &seqs, lanes(a.num_threads), build)?;
        if workspace.len() < needed {
            return Err(attnrt::Error::Workspace {
                needed,
                actual: workspace.len(),
            }
            .into());
        }
        let (table_ws, exec_ws) = workspace.split_at_mut(table_len);
        let table = match (cfg.rope(), freqs_cis) {
            (Some(_), Some(f)) => Some(RopeTable::new(f, cfg.head_dim)?),
            (None, Some(_)) => {
                return Err(attnrt::Error::Unsupported {
                    what: "freqs_cis given but the layer has no rotary embedding",
                }
                .into())
            }
            (Some(rope), None) => {
                attnrt::rope::build_table(rope, cfg.head_dim, table_ws)?;
                let t: &[f32] = table_ws;
                Some(RopeTable::new(t, cfg.head_dim)?)
            }
            (None, None) => None,
        };

        let runtime = layer.runtime()?;
        let pool = Pool::new(a.parallel_for, a.parallel_ctx, a.num_threads, &layer.idle);
        let mut pools = cache.lock();
        let mut kv = KvCache::new(
            pools.view(),
            cache.n_kv_head,
            cache.head_dim,
            cache.block_size,
            cache.num_blocks,
            cache.rolling,
        )?;
        let ran = runtime.forward_cached(x, &seqs, table, &mut kv, exec_ws, out, pool.as_dyn());
        drop(pools);
        if let Pool::Callback(p) = &pool {
            if !p.kept_contract() {
                return Err(FfiError::new(
                    attnrt_status::ATTNRT_STATUS_PARALLEL_FOR_CONTRACT,
                    "the host's parallel_for did not run every task exactly once (or a task \
                     panicked); the output and the new tokens' cache slots are unspecified",
                ));
            }
        }
        let ran = crate::backend::report(ran?)?;
        // SAFETY: checked by `check_out`; valid by the contract.
        unsafe { write_out(backend_ran, ran) };
        Ok(())
    })
}
