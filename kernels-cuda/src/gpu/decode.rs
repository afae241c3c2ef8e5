//! The KV cache on the GPU and the cached forward (prefill, chunked prefill, decode) over it:
//! the layout of `attnrt::KvCache` (paged blocks, per-sequence block tables, optional rolling
//! window) in device memory, and split-K attention (flash-decoding, `kernels/decode.cu`).

use std::sync::Arc;

use attnrt::{Config, Error as RtError, KvGeometry, Layer, RopeTable, Sequence};
use cust::memory::DeviceBuffer;
use cust::sys as cu;
use half::{bf16, f16};

use super::staging::MetaUpload;
use super::{
    alloc, drv, function, h2d, kernels, launch, ptr, DeviceX, GpuLayer, Kernels, PendingPrep,
    PoolAppend,
};
use crate::error::{Error, Result};
use crate::plan::{DecodeKernel, DecodeTuning, GpuBackend, Precision};

/// A KV cache in device memory, laid out as `attnrt::KvCache`: block `b` holds, for KV head
/// `g`, `block_size` token slots; slot `i` starts at element
/// `((b * n_kv_head + g) * block_size + i) * head_dim` of the K pool (likewise V). Sequences
/// name their blocks with host block tables ([`attnrt::Sequence`]); with `rolling`, logical
/// token `j` of a sequence lives in slot `j mod capacity` (sliding-window layers).
pub struct GpuKvCache {
    kernels: Arc<Kernels>,
    precision: Precision,
    n_kv_head: usize,
    head_dim: usize,
    block_size: usize,
    num_blocks: usize,
    rolling: bool,
    k: DeviceBuffer<u8>,
    v: DeviceBuffer<u8>,
}

impl GpuKvCache {
    /// The cache's shape, as the runtime's validation takes it.
    pub(crate) fn geometry(&self) -> KvGeometry {
        KvGeometry {
            n_kv_head: self.n_kv_head,
            head_dim: self.head_dim,
            block_size: self.block_size,
            num_blocks: self.num_blocks,
            rolling: self.rolling,
        }
    }

    /// Allocates (zeroed) K and V pools of `num_blocks` blocks on `device`.
    ///
    /// # Errors
    /// A zero dimension, sizes that overflow, 2^32 or more rows (tokens x KV heads), no
    /// device, or out of device memory.
    pub fn new(
        precision: Precision,
        n_kv_head: usize,
        head_dim: usize,
        block_size: usize,
        num_blocks: usize,
        rolling: bool,
        device: u32,
    ) -> Result<GpuKvCache> {
        KvGeometry {
            n_kv_head,
            head_dim,
            block_size,
            num_blocks,
            rolling,
        }
        .validate()?;
        // The kernels address pool rows (one token of one KV head) with 32-bit indices.
        let rows = n_kv_head
            .saturating_mul(block_size)
            .saturating_mul(num_blocks);
        if rows > u32::MAX as usize {
            return Err(Error::Capacity {
                what: "kv pool rows (blocks x KV heads x block size)",
                value: rows,
                max: u32::MAX as usize,
            });
        }
        let elems = attnrt::kv_pool_len(n_kv_head, head_dim, block_size, num_blocks);
        let bytes = elems
            .checked_mul(precision.size())
            .filter(|_| elems != usize::MAX)
            .ok_or(Error::Capacity {
                what: "kv pool elements",
                value: elems,
                max: isize::MAX as usize / 4,
            })?;
        let kernels = kernels(device)?;
        Ok(GpuKvCache {
            kernels,
            precision,
            n_kv_head,
            head_dim,
            block_size,
            num_blocks,
            rolling,
            k: alloc(bytes)?,
            v: alloc(bytes)?,
        })
    }

    /// Storage precision of the pools.
    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// Tokens per block.
    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// Blocks in the pool.
    pub fn num_blocks(&self) -> usize {
        self.num_blocks
    }

    /// Bytes of one pool (K or V).
    pub fn pool_bytes(&self) -> usize {
        self.n_kv_head * self.head_dim * self.block_size * self.num_blocks * self.precision.size()
    }

    /// Device pointers of the K and V pools.
    pub fn pool_ptrs(&self) -> (u64, u64) {
        (ptr(&self.k), ptr(&self.v))
    }

    /// Copies both pools to the host, widened to f32 (tests).
    ///
    /// # Errors
    /// A failed copy.
    pub fn read_f32(&self) -> Result<(Vec<f32>, Vec<f32>)> {
        cust::context::CurrentContext::set_current(&self.kernels.ctx)
            .map_err(|e| super::cust_err("cuCtxSetCurrent", e))?;
        let n = self.pool_bytes();
        let mut out = Vec::new();
        for buf in [&self.k, &self.v] {
            let mut raw = vec![0u8; n];
            // SAFETY: `buf` holds `n` bytes; `raw` is a live host buffer of `n` bytes.
            drv("cuMemcpyDtoH", unsafe {
                cu::cuMemcpyDtoH_v2(raw.as_mut_ptr().cast(), ptr(buf), n)
            })?;
            let v: Vec<f32> = match self.precision {
                Precision::F32 => raw
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect(),
                Precision::Bf16 => raw
                    .chunks_exact(2)
                    .map(|c| bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
                    .collect(),
                Precision::F16 => raw
                    .chunks_exact(2)
                    .map(|c| f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
                    .collect(),
            };
            out.push(v);
        }
        let v = out.pop().unwrap_or_default();
        let k = out.pop().unwrap_or_default();
        Ok((k, v))
    }

    /// Overwrites both pools with raw bytes in the storage type (benchmarks fill a cache
    /// without running the prefill).
    ///
    /// # Errors
    /// Slices of another length than [`GpuKvCache::pool_bytes`], or a failed copy.
    pub fn write_raw(&mut self, k: &[u8], v: &[u8]) -> Result<()> {
        let n = self.pool_bytes();
        for (name, len) in [("kv pool k", k.len()), ("kv pool v", v.len())] {
            if len != n {
                return Err(RtError::InputShape {
                    name,
                    expected: n,
                    actual: len,
                }
                .into());
            }
        }
        cust::context::CurrentContext::set_current(&self.kernels.ctx)
            .map_err(|e| super::cust_err("cuCtxSetCurrent", e))?;
        for (dst, src) in [(&self.k, k), (&self.v, v)] {
            // SAFETY: `dst` holds `n` bytes, `src` is a live host slice of `n` bytes.
            drv("cuMemcpyHtoD", unsafe {
                cu::cuMemcpyHtoD_v2(ptr(dst), src.as_ptr().cast(), n)
            })?;
        }
        Ok(())
    }
}

/// A cached call planned ([`GpuLayer::cached_plan`]) and enqueued up to the norm statistics
/// ([`GpuLayer::cached_enqueue_front`]): what the rest of it ([`GpuLayer::cached_back`])
/// needs.
pub(super) struct CachedFront {
    n: usize,
    items: usize,
    split: usize,
    hchunks: usize,
    dst: u64,
    work: u64,
    tables: u64,
    dseqs: u64,
    part: u64,
    ml: u64,
    tok_items: u64,
    counters: u64,
    /// The new tokens' rotary rows on the device (0 without rotary embedding).
    rope: u64,
    /// Bytes of the metadata upload.
    meta_bytes: usize,
    /// The page-locked buffer the upload reads (this device's, or the lead device's when the
    /// plan is shared, [`GpuLayer::cached_plan_shared`]), as this device's kernels see it.
    meta_src: u64,
    /// The attention kernel the back half launches.
    f_dec: cu::CUfunction,
    /// The cache it was planned for: pools, block size, rolling.
    cache_key: [u64; 4],
    /// The pending norm/RoPE pass ([`GpuLayer::cached_enqueue_front`] with a norm share).
    prep: Option<PendingPrep>,
}

impl CachedFront {
    /// The new keys' and values' destination: the planned cache's pools, at the rows the
    /// metadata upload puts in `dst`.
    fn pool_append(&self) -> PoolAppend {
        let [kpool, vpool, block_size, _] = self.cache_key;
        PoolAppend {
            kpool,
            vpool,
            dst: self.dst,
            block_size: block_size as usize,
        }
    }

    /// New tokens of the call.
    pub(super) fn tokens(&self) -> usize {
        self.n
    }

    /// Appends what the enqueued work of this front depends on besides the contents of its
    /// buffers: launch shapes, kernels and device addresses. Two fronts with the same values
    /// enqueue the same launches and copies (a captured step can be replayed).
    pub(super) fn key_into(&self, key: &mut Vec<u64>) {
        key.extend([
            self.n as u64,
            self.items as u64,
            self.split as u64,
            self.hchunks as u64,
            self.dst,
            self.work,
            self.tables,
            self.dseqs,
            self.part,
            self.ml,
            self.tok_items,
            self.counters,
            self.rope,
            self.meta_bytes as u64,
            self.meta_src,
            self.f_dec as u64,
        ]);
        key.extend(self.cache_key);
    }
}

/// Where the new tokens' rows `x` of a cached call are.
#[derive(Clone, Copy)]
pub(super) enum CachedX<'x> {
    /// f32 rows on the host, uploaded by the call.
    Host(&'x [f32]),
    /// Rows already on the device, and their number of values (tokens * n_embd).
    Device(DeviceX, usize),
}

/// The cached call the executor last ran (for [`GpuLayer::relaunch_decode`]).
struct CachedCall {
    items: usize,
    tokens: usize,
    split: usize,
    grid: (u32, u32, u32),
    params: DecodeParams,
}

impl CachedCall {
    /// Work items (token x split) and new tokens of the call, and the split size in keys.
    pub fn shape(&self) -> (usize, usize, usize) {
        (self.items, self.tokens, self.split)
    }
}

#[repr(C)]
#[derive(Clone, Copy)]
struct DecodeParams {
    q: u64,
    k: u64,
    v: u64,
    work: u64,
    tok_items: u64,
    tables: u64,
    seqs: u64,
    part: u64,
    ml: u64,
    o: u64,
    counters: u64,
    n_head: i32,
    n_kv_head: i32,
    head_dim: i32,
    group: i32,
    block_size: i32,
    bs_shift: i32,
    rolling: i32,
    scale_log2: f32,
}

/// Device and host scratch of cached calls, grown (never shrunk) when a call needs more than
/// any before; a steady decode loop allocates nothing.
#[derive(Default)]
pub(super) struct DecodeState {
    funcs: Option<DecodeFuncs>,
    tuning: DecodeTuning,
    part: Option<DeviceBuffer<u8>>,
    ml: Option<DeviceBuffer<u8>>,
    /// The call's work items, token item ranges, sequences, block tables and new-token slots,
    /// uploaded together.
    meta: MetaUpload,
    /// The metadata goes up by the copy engine instead of `upload_u4` (a benchmark switch,
    /// [`GpuLayer::set_meta_upload_copy`]).
    meta_by_copy: bool,
    counters: Option<DeviceBuffer<u8>>,
    h_work: Vec<[i32; 4]>,
    h_tok: Vec<i32>,
    h_seqs: Vec<[i32; 2]>,
    h_tables: Vec<u32>,
    h_dst: Vec<i64>,
    h_pos: Vec<i32>,
    h_rope: Vec<f32>,
    marks: BlockMarks,
    last: Option<CachedCall>,
}

/// The block marks and stamp an executor keeps from call to call for
/// [`Layer::validate_cached_marked`], grown (with zeros) to the pool of each call.
#[derive(Default)]
pub(super) struct BlockMarks {
    marks: Vec<u32>,
    stamp: u32,
}

impl BlockMarks {
    /// [`Layer::validate_cached_marked`] with these marks.
    pub(super) fn validate(
        &mut self,
        layer: &Layer<'_>,
        x_len: usize,
        out_len: usize,
        seqs: &[Sequence<'_>],
        rope_table: Option<&RopeTable<'_>>,
        cache: &KvGeometry,
    ) -> attnrt::Result<usize> {
        if self.marks.len() < cache.num_blocks {
            self.marks.resize(cache.num_blocks, 0);
        }
        layer.validate_cached_marked(
            x_len,
            out_len,
            seqs,
            rope_table,
            cache,
            &mut self.marks,
            &mut self.stamp,
        )
    }
}

/// What a planned cached call's front needs besides its metadata: new tokens, work items,
/// split size, head chunks, and whether rotary rows were staged.
struct FrontShape {
    n: usize,
    items: usize,
    split: usize,
    hchunks: usize,
    rope: bool,
}

/// The front of a planned call: this device's scratch for its work items (grown on demand),
/// the device addresses of the metadata parts once uploaded (`meta`: work items, token item
/// ranges, sequences, block tables, new-token slots, rotary rows), the attention kernel and
/// the cache the call appends to.
fn front(
    st: &mut DecodeState,
    cfg: &Config,
    shape: FrontShape,
    meta: &[u64],
    f_dec: cu::CUfunction,
    cache: &GpuKvCache,
) -> Result<CachedFront> {
    let &[work, tok_items, dseqs, tables, dst, rope] = meta else {
        return Err(Error::Unsupported("metadata of other parts".into()));
    };
    let FrontShape {
        n,
        items,
        split,
        hchunks,
        rope: has_rope,
    } = shape;
    let (h, d) = (cfg.n_head, cfg.head_dim);
    let part = ensure(&mut st.part, items * h * d * 4)?;
    let ml = ensure(&mut st.ml, items * h * 8)?;
    // Zeroed when allocated; every launch leaves them at zero (the merging CTA resets).
    let counters = ensure(&mut st.counters, n * cfg.n_kv_head * hchunks * 4)?;
    let (k, v) = cache.pool_ptrs();
    Ok(CachedFront {
        n,
        items,
        split,
        hchunks,
        dst,
        work,
        tables,
        dseqs,
        part,
        ml,
        tok_items,
        counters,
        rope: if has_rope { rope } else { 0 },
        meta_bytes: st.meta.staged_bytes(),
        meta_src: st.meta.source(),
        f_dec,
        cache_key: [k, v, cache.block_size as u64, u64::from(cache.rolling)],
        prep: None,
    })
}

/// A buffer of at least `bytes` bytes in `slot`, reallocated only when too small.
fn ensure(slot: &mut Option<DeviceBuffer<u8>>, bytes: usize) -> Result<u64> {
    if slot.as_ref().is_none_or(|b| b.len() < bytes) {
        *slot = Some(alloc(bytes.next_power_of_two())?);
    }
    Ok(slot.as_ref().map_or(0, ptr))
}

/// The loaded kernels of the layer's cached calls.
struct DecodeFuncs {
    kernel: DecodeKernel,
    dec: cu::CUfunction,
    /// Resident CTAs of `dec` per SM.
    ctas_per_sm: usize,
}

/// Loads the attention kernel `kernel`; lifts the dynamic
/// shared-memory limit of `kernel` to what it needs and asks the driver how many of its CTAs
/// an SM holds.
fn load_funcs(kernels: &Kernels, kernel: DecodeKernel) -> Result<DecodeFuncs> {
    let dec = function(&kernels.decode, &kernel.name())?;
    let smem = kernel.smem_bytes();
    if smem > kernels.smem_optin {
        return Err(Error::Unsupported(format!(
            "{}: {smem} bytes of shared memory, the device allows {}",
            kernel.name(),
            kernels.smem_optin
        )));
    }
    if smem > 48 * 1024 {
        // SAFETY: `dec` is a live function of the current context.
        drv("cuFuncSetAttribute", unsafe {
            cu::cuFuncSetAttribute(
                dec,
                cu::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                smem as i32,
            )
        })?;
    }
    let mut ctas = 0i32;
    // SAFETY: valid out-pointer; `dec` is a live function of the current context.
    drv("cuOccupancyMaxActiveBlocksPerMultiprocessor", unsafe {
        cu::cuOccupancyMaxActiveBlocksPerMultiprocessor(
            &mut ctas,
            dec,
            kernel.threads() as i32,
            smem,
        )
    })?;
    Ok(DecodeFuncs {
        kernel,
        dec,
        ctas_per_sm: ctas.max(1) as usize,
    })
}

impl GpuLayer<'_> {
    /// Validates a cached call and returns its new tokens. `validated` is the token count of
    /// a call a head split has already validated against the unsplit layer and cache: then
    /// only this device's part is checked (its shard's cache heads, device, precision,
    /// capacity), not the whole call again.
    fn check_cached(
        &mut self,
        x_len: usize,
        out_len: usize,
        seqs: &[Sequence<'_>],
        rope_table: &Option<RopeTable<'_>>,
        cache: &GpuKvCache,
        validated: Option<usize>,
    ) -> Result<usize> {
        // The runtime's own validation, so the GPU rejects exactly the calls the CPU rejects.
        let geometry = cache.geometry();
        let tokens = match validated {
            Some(tokens) => {
                self.layer.check_cache_heads(&geometry)?;
                tokens
            }
            None => self.dec.marks.validate(
                &self.layer,
                x_len,
                out_len,
                seqs,
                rope_table.as_ref(),
                &geometry,
            )?,
        };
        if !Arc::ptr_eq(&cache.kernels, &self.kernels) {
            return Err(Error::Unsupported(
                "the KV cache lives on another device than the layer".into(),
            ));
        }
        if cache.precision != self.opts.precision {
            return Err(Error::Unsupported(format!(
                "a {} KV cache with a {} layer: the GPU cache stores the layer's precision",
                cache.precision.name(),
                self.opts.precision.name()
            )));
        }
        let max = self.opts.max_batch * self.opts.max_seq_len;
        if tokens > max {
            return Err(Error::Capacity {
                what: "new tokens",
                value: tokens,
                max,
            });
        }
        Ok(tokens)
    }

    /// Runs the layer on new tokens of one or more sequences against a GPU KV cache, appending
    /// their keys and values: prefill (`cached = 0`), chunked prefill or decode, as
    /// `attnrt::Layer::forward_cached` (same arguments, same validation and errors; token t of
    /// a sequence has position `cached + t`). `x` and `out` are `[sum of new_tokens, n_embd]`
    /// on the host. At most `max_batch * max_seq_len` new tokens per call; the cache must have
    /// the layer's precision.
    ///
    /// Attention: every (new token, KV head) is split into ranges of keys that CTAs read
    /// once for the R query heads of the KV head (tensor cores for bf16 / f16 at head_dim 64,
    /// 96, 128 and 256); the last CTA of a token to finish combines its splits in order. The
    /// first calls allocate the decode scratch (grown when a call needs more).
    ///
    /// # Errors
    /// The runtime's errors for invalid calls (nothing written, cache untouched), a cache of
    /// another precision or device, more new tokens than the set-up maxima, a failed CUDA call.
    pub fn forward_cached(
        &mut self,
        x: &[f32],
        seqs: &[Sequence<'_>],
        rope_table: Option<RopeTable<'_>>,
        cache: &mut GpuKvCache,
        out: &mut [f32],
    ) -> Result<GpuBackend> {
        let Some(mut front) =
            self.cached_plan(x.len(), out.len(), seqs, rope_table, cache, None)?
        else {
            return Ok(self.backend());
        };
        // SAFETY: the front was just planned; host rows.
        unsafe { self.cached_enqueue_front(&mut front, CachedX::Host(x))? };
        self.mark_meta_uploaded()?;
        let stream = self.stream;
        let n = front.tokens();
        // SAFETY: `front` is this layer's last front, for `cache`, borrowed for the whole call.
        unsafe { self.cached_back(&front, cache)? };

        // Output projection and download.
        let y = ptr(&self.y);
        // SAFETY: y holds at least n * n_embd f32; o holds the attention output of n tokens.
        unsafe { self.project_out(y, n, stream)? };
        let bytes = std::mem::size_of_val(out);
        // SAFETY: `y` holds `bytes` bytes of output; `out` is a live exclusive host slice of
        // that size; the stream is synchronised before `out` is read.
        unsafe {
            drv(
                "cuMemcpyDtoHAsync",
                cu::cuMemcpyDtoHAsync_v2(out.as_mut_ptr().cast(), y, bytes, stream),
            )?;
            drv("cuStreamSynchronize", cu::cuStreamSynchronize(stream))?;
        }
        Ok(self.backend())
    }

    /// The host part of a cached call's first half: validation (only this device's part
    /// when the call was `validated` already, see `check_cached`), the call's work items,
    /// scratch, and its metadata and rotary rows staged for one upload. Enqueues nothing
    /// (so a captured step can be replayed after it); [`GpuLayer::cached_enqueue_front`]
    /// does. `None` for a call without new tokens.
    pub(super) fn cached_plan(
        &mut self,
        x_len: usize,
        out_len: usize,
        seqs: &[Sequence<'_>],
        rope_table: Option<RopeTable<'_>>,
        cache: &GpuKvCache,
        validated: Option<usize>,
    ) -> Result<Option<CachedFront>> {
        let n = self.check_cached(x_len, out_len, seqs, &rope_table, cache, validated)?;
        if n == 0 {
            return Ok(None);
        }
        self.set_current()?;
        let cfg = self.cfg;
        let (kvh, d, r) = (cfg.n_kv_head, cfg.head_dim, cfg.group_size());
        let window = cfg.sliding_window.unwrap_or(usize::MAX);

        let prec = self.opts.precision;

        // Host metadata: positions, slots of the new tokens, block tables, work items.
        let st = &mut self.dec;
        st.h_pos.clear();
        st.h_dst.clear();
        st.h_seqs.clear();
        st.h_tables.clear();
        let bs = cache.block_size;
        let mut total_keys = 0usize;
        for seq in seqs {
            if seq.new_tokens == 0 {
                continue;
            }
            let cap = seq.blocks.len() * bs;
            st.h_seqs.push([st.h_tables.len() as i32, cap as i32]);
            st.h_tables.extend_from_slice(seq.blocks);
            for t in 0..seq.new_tokens {
                let p = seq.cached + t;
                st.h_pos.push(p as i32);
                let s = if cache.rolling { p % cap } else { p };
                let blk = seq.blocks[s / bs] as usize;
                st.h_dst.push(((blk * kvh) * bs + s % bs) as i64);
                total_keys += p + 1 - (p + 1).saturating_sub(window);
            }
        }
        let kernel = DecodeKernel::choose(prec, d, r, &st.tuning);
        if st.funcs.as_ref().is_none_or(|f| f.kernel != kernel) {
            st.funcs = None;
            st.last = None;
            st.funcs = Some(load_funcs(&self.kernels, kernel)?);
        }
        let Some(funcs) = st.funcs.as_ref() else {
            return Err(Error::Unsupported("decode kernels missing".into()));
        };
        let f_dec = funcs.dec;
        let hchunks = r.div_ceil(kernel.heads_per_cta());
        let max_items = (2 * n).max(4096);
        let mut split = kernel.split_keys(
            total_keys,
            kvh * hchunks,
            self.kernels.sm_count,
            funcs.ctas_per_sm,
            &st.tuning,
        );
        let tuning = st.tuning;
        let items_for = |split: usize, seqs: &[Sequence<'_>]| -> usize {
            let mut items = 0;
            for seq in seqs {
                for t in 0..seq.new_tokens {
                    let p = seq.cached + t;
                    let len = p + 1 - (p + 1).saturating_sub(window);
                    items += len.div_ceil(kernel.item_keys(len, split, &tuning));
                }
            }
            items
        };
        while items_for(split, seqs) > max_items {
            split *= 2;
        }
        st.h_work.clear();
        st.h_tok.clear();
        let mut si = 0i32;
        for seq in seqs {
            if seq.new_tokens == 0 {
                continue;
            }
            for t in 0..seq.new_tokens {
                let p = seq.cached + t;
                let (lo, hi) = ((p + 1).saturating_sub(window), p + 1);
                st.h_tok.push(st.h_work.len() as i32);
                let tok = st.h_tok.len() as i32 - 1;
                let step = kernel.item_keys(hi - lo, split, &tuning);
                let mut k0 = lo;
                while k0 < hi {
                    let k1 = (k0 + step).min(hi);
                    st.h_work.push([tok, si, k0 as i32, k1 as i32]);
                    k0 = k1;
                }
            }
            si += 1;
        }
        st.h_tok.push(st.h_work.len() as i32);
        let items = st.h_work.len();

        // Rotary rows of the new tokens, staged with the metadata.
        st.h_rope.clear();
        if let (Some(_), Some(table)) = (cfg.rope(), rope_table) {
            st.h_rope.resize(n * d, 0.0);
            super::fill_rope_rows(&table, Some(&st.h_pos), &mut st.h_rope);
        }
        let meta = st.meta.stage(&[
            bytemuck::cast_slice(&st.h_work),
            bytemuck::cast_slice(&st.h_tok),
            bytemuck::cast_slice(&st.h_seqs),
            bytemuck::cast_slice(&st.h_tables),
            bytemuck::cast_slice(&st.h_dst),
            bytemuck::cast_slice(&st.h_rope),
        ])?;
        let shape = FrontShape {
            n,
            items,
            split,
            hchunks,
            rope: !st.h_rope.is_empty(),
        };
        front(st, &cfg, shape, &meta, f_dec, cache).map(Some)
    }

    /// [`GpuLayer::cached_plan`] for a device of a head split after the lead device planned
    /// `lead_front` for the same call: when both devices plan the same metadata (same shard
    /// configuration, precision, tuning and SM count, caches of the same block size and
    /// layout), this device takes the lead's work items and uploads the lead's staged
    /// metadata ([`MetaUpload::adopt`]) instead of building and staging its own copy; its
    /// own scratch, kernel and cache pools stay its own. Otherwise it plans on its own.
    /// `validated` is the call's token count (the call was validated against the unsplit
    /// layer).
    ///
    /// The lead's staged metadata must not be restaged before this device's upload has run.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn cached_plan_shared(
        &mut self,
        lead: &GpuLayer<'_>,
        lead_front: &CachedFront,
        x_len: usize,
        out_len: usize,
        seqs: &[Sequence<'_>],
        rope_table: Option<RopeTable<'_>>,
        cache: &GpuKvCache,
        validated: usize,
    ) -> Result<Option<CachedFront>> {
        let same = self.cfg == lead.cfg
            && self.opts.precision == lead.opts.precision
            && self.dec.tuning == lead.dec.tuning
            && self.kernels.sm_count == lead.kernels.sm_count
            && lead_front.cache_key[2..] == [cache.block_size as u64, u64::from(cache.rolling)]
            && lead.dec.funcs.as_ref().map(|f| (f.kernel, f.ctas_per_sm))
                == self.dec.funcs.as_ref().map(|f| (f.kernel, f.ctas_per_sm));
        if !same {
            return self.cached_plan(x_len, out_len, seqs, rope_table, cache, Some(validated));
        }
        let n = self.check_cached(x_len, out_len, seqs, &rope_table, cache, Some(validated))?;
        if n == 0 {
            return Ok(None);
        }
        if n != lead_front.n {
            return Err(Error::Unsupported(
                "devices planned different token counts".into(),
            ));
        }
        self.set_current()?;
        let cfg = self.cfg;
        let st = &mut self.dec;
        // The lead's kernel, loaded in this context by an earlier plan of this device
        // (compared above; until then this device plans on its own).
        let Some(funcs) = st.funcs.as_ref() else {
            return Err(Error::Unsupported("decode kernels missing".into()));
        };
        let f_dec = funcs.dec;
        let meta = st.meta.adopt(&lead.dec.meta)?;
        let shape = FrontShape {
            n,
            items: lead_front.items,
            split: lead_front.split,
            hchunks: lead_front.hchunks,
            rope: lead_front.rope != 0,
        };
        front(st, &cfg, shape, &meta, f_dec, cache).map(Some)
    }

    /// The device part of a cached call's first half, for the front `f` this layer planned
    /// last: the metadata upload, the upload of `x` (host rows), projections and the
    /// norm/RoPE pass, which appends the new keys and values to the planned cache (pending in
    /// `f` with a norm share). Writes no output. The caller marks the metadata upload done
    /// (`mark_meta_uploaded`) after it, or after the graph that replays it.
    ///
    /// # Safety
    /// `f` is this layer's last [`GpuLayer::cached_plan`]; rows of `x` already on the device
    /// ([`CachedX::Device`]) are on this layer's device and hold the call's new tokens; host
    /// rows are page-locked when this enqueue is captured.
    pub(super) unsafe fn cached_enqueue_front(
        &mut self,
        f: &mut CachedFront,
        x: CachedX<'_>,
    ) -> Result<()> {
        let stream = self.stream;
        let xd = ptr(&self.x);
        // SAFETY: the metadata was staged by this front's plan, in this layer's context, and
        // is restaged only after `mark_meta_uploaded`. `x` holds max_batch * max_seq_len *
        // n_embd f32 >= n * n_embd (checked); rows on the device hold n * n_embd values (the
        // caller's contract); the rotary rows were staged for the call's n tokens.
        unsafe {
            let by_kernel = (!self.dec.meta_by_copy).then_some(self.f_upload);
            self.dec.meta.enqueue(stream, by_kernel)?;
            let rows = match x {
                CachedX::Host(x) => {
                    h2d(xd, x, stream)?;
                    DeviceX::F32(xd)
                }
                CachedX::Device(rows, _) => rows,
            };
            let start = self.qkv_convert(rows, f.n, (f.rope, 0, f.n as i32), stream)?;
            f.prep = self.qkv_finish(start, Some(f.pool_append()), stream)?;
        }
        Ok(())
    }

    /// Records on the layer's stream that this call's metadata upload is behind (see
    /// [`GpuLayer::cached_enqueue_front`]).
    pub(super) fn mark_meta_uploaded(&mut self) -> Result<()> {
        self.set_current()?;
        // SAFETY: the layer's context is current and the stream is its own.
        unsafe { self.dec.meta.mark_done(self.stream) }
    }

    /// Second half of a cached call up to the attention output `o`: the pending norm/RoPE
    /// pass with its append (its statistics now summed across the devices), split-K attention
    /// and the merge.
    ///
    /// # Safety
    /// `f` is this layer's last [`GpuLayer::cached_plan`], made for `cache`, enqueued by
    /// [`GpuLayer::cached_enqueue_front`].
    pub(super) unsafe fn cached_back(&mut self, f: &CachedFront, cache: &GpuKvCache) -> Result<()> {
        let cfg = self.cfg;
        let (h, kvh, d, r) = (cfg.n_head, cfg.n_kv_head, cfg.head_dim, cfg.group_size());
        let stream = self.stream;
        let bs = cache.block_size;
        let (n, items, split, hchunks) = (f.n, f.items, f.split, f.hchunks);
        let (work, tables, dseqs, part, ml, tok_items, counters) = (
            f.work,
            f.tables,
            f.dseqs,
            f.part,
            f.ml,
            f.tok_items,
            f.counters,
        );
        if let Some(p) = f.prep {
            // SAFETY: per this function's contract (the pass also appends the new keys and
            // values to `cache`, whose pools the front was planned for).
            unsafe { self.finish_prep(p, stream)? };
        }
        let (kpool, vpool) = cache.pool_ptrs();

        // Split-K attention (with the merge of each token's splits).
        let p_dec = DecodeParams {
            q: ptr(&self.q),
            k: kpool,
            v: vpool,
            work,
            tok_items,
            tables,
            seqs: dseqs,
            part,
            ml,
            o: ptr(&self.o),
            counters,
            n_head: h as i32,
            n_kv_head: kvh as i32,
            head_dim: d as i32,
            group: r as i32,
            block_size: bs as i32,
            bs_shift: if bs.is_power_of_two() {
                bs.trailing_zeros() as i32
            } else {
                -1
            },
            rolling: cache.rolling as i32,
            scale_log2: std::f32::consts::LOG2_E / (d as f32).sqrt(),
        };
        // One dimension, a work item's KV heads and head chunks next to each other (decode.cu,
        // `cta_work`).
        let ctas = i32::try_from(items * kvh * hchunks).map_err(|_| {
            Error::Unsupported(format!(
                "{items} work items x {kvh} KV heads x {hchunks} head chunks exceed the grid"
            ))
        })? as u32;
        let call = CachedCall {
            items,
            tokens: n,
            split,
            grid: (ctas, 1, 1),
            params: p_dec,
        };
        self.dec.last = Some(call);
        // SAFETY: the cache is borrowed by the caller for this whole call.
        unsafe { self.relaunch_decode() }
    }

    /// Benchmark helper: launches the split-K attention (merge included) of the last cached
    /// call again on the layer's own stream (the cache already holds the call's keys).
    ///
    /// # Errors
    /// No earlier cached call, or a failed launch.
    ///
    /// # Safety
    /// The [`GpuKvCache`] of the last cached call is still alive.
    #[doc(hidden)]
    pub unsafe fn relaunch_decode(&mut self) -> Result<()> {
        let Some(call) = self.dec.last.as_ref() else {
            return Err(Error::Unsupported("no earlier cached call".into()));
        };
        let Some(funcs) = self.dec.funcs.as_ref() else {
            return Err(Error::Unsupported("no earlier cached call".into()));
        };
        let mut params = call.params;
        let k = funcs.kernel;
        // SAFETY: the parameters name this layer's buffers, sized for the last call, and that
        // call's cache, alive per this function's contract; the dynamic shared memory was
        // allowed when the function was loaded.
        unsafe {
            launch(
                funcs.dec,
                call.grid,
                k.threads(),
                k.smem_bytes() as u32,
                self.stream,
                &mut params,
            )
        }
    }

    /// Benchmark switch: upload a cached step's metadata with the copy engine (`true`) or
    /// with a kernel reading the page-locked staging buffer (`false`, the default).
    #[doc(hidden)]
    pub fn set_meta_upload_copy(&mut self, copy: bool) {
        self.dec.meta_by_copy = copy;
    }

    /// The last cached call's work items, new tokens and split size (keys).
    pub fn last_cached_shape(&self) -> Option<(usize, usize, usize)> {
        self.dec.last.as_ref().map(CachedCall::shape)
    }

    /// Test and benchmark hook: overrides the attention kernel and split size of the following
    /// cached calls ([`DecodeTuning::default`] restores the planned ones).
    #[doc(hidden)]
    pub fn set_decode_tuning(&mut self, tuning: DecodeTuning) {
        self.dec.tuning = tuning;
    }

    /// The attention kernel of the last cached call (its PTX entry point).
    #[doc(hidden)]
    pub fn last_decode_kernel(&self) -> Option<String> {
        self.dec.last.as_ref()?;
        self.dec.funcs.as_ref().map(|f| f.kernel.name())
    }
}
