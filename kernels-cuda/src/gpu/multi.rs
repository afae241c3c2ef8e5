//! Head split across the GPUs of one host (tensor parallel): one [`GpuLayer`] per device for
//! its [`ShardPlan`] shard, partial outputs summed with an NCCL all-reduce (or the attention
//! outputs exchanged all-to-all, [`ReduceOptions::all_to_all`]), full-QK-norm
//! statistics summed the same way (two floats per token), and a KV cache per device
//! ([`MultiGpuKvCache`]) for prefill and decode through the split.

use std::ffi::c_void;
use std::ops::Range;
use std::time::Instant;

use attnrt::{Inputs, KvGeometry, Layer, RopeTable, Sequence, ShardLayer, ShardPlan, Tensor};
use cust::memory::DeviceBuffer;
use cust::sys as cu;
use half::{bf16, f16};

use super::decode::BlockMarks;
use super::graph::StepGraphs;
use super::staging::Pinned;
use super::WidenParams;
use super::{
    alloc, blas_type, drv, function, h2d, launch, ptr, stored, upload, DeviceX, Front, FrontStart,
    GpuKvCache, GpuLayer, RopeSource,
};
use crate::cublas;
use crate::error::{Error, Result};
use crate::nccl::{self, Collective, Comms, Dtype, Transfer};
use crate::plan::{
    all_to_all_blocks, AllToAllBlock, GpuBackend, GpuOptions, Precision, ReduceOptions,
    StepGraphLayout,
};
use peer::PeerSum;

mod cached;
mod peer;
mod seq;
pub use seq::SeqParallelCall;

/// How a call's output is summed across the devices ([`MultiGpuLayer::reduce_shape`]).
struct ReduceShape {
    /// In the storage type (bf16 / f16) instead of f32.
    storage: bool,
    kind: Collective,
    /// Chunks of tokens, each reduced while the next is projected.
    chunks: usize,
}

/// A device's `wo` column block, owned on the host (the shard layers borrow it).
enum WoBlock {
    F32(Box<[f32]>),
    F16(Box<[f16]>),
    Bf16(Box<[bf16]>),
}

/// A view of `b` with any lifetime.
///
/// # Safety
/// The caller keeps `b` alive and unchanged for as long as the view is used.
unsafe fn extend<'x, T>(b: &[T]) -> &'x [T] {
    // SAFETY: a live slice's pointer and length; lifetime per the caller's contract.
    unsafe { std::slice::from_raw_parts(b.as_ptr(), b.len()) }
}

/// A new event of the current context (`CU_EVENT_DISABLE_TIMING` unless `timed`).
fn event(timed: bool) -> Result<cu::CUevent> {
    let mut e: cu::CUevent = std::ptr::null_mut();
    let flags = if timed { 0 } else { 2 };
    // SAFETY: valid out-pointer; the caller made the device's context current; the event is
    // destroyed by its owner's Drop.
    drv("cuEventCreate", unsafe { cu::cuEventCreate(&mut e, flags) })?;
    Ok(e)
}

/// Records `e` on `s` (both of the current context).
fn record(e: cu::CUevent, s: cu::CUstream) -> Result<()> {
    // SAFETY: a live event and stream of the current context.
    drv("cuEventRecord", unsafe { cu::cuEventRecord(e, s) })
}

/// What a device needs for the reduction besides its shard's layer.
struct Lane {
    /// Second stream: the chunked all-reduce runs there while the next chunk's projection runs
    /// on the layer's stream (null on one device). Of the highest priority unless
    /// [`MultiGpuLayer::set_comm_priority`] swapped it with `comm_alt`.
    comm: cu::CUstream,
    /// The other second stream: of the default priority (null on one device).
    comm_alt: cu::CUstream,
    /// "Chunk projected" (layer stream -> comm stream) and "reduction done" (back).
    chunk_ev: cu::CUevent,
    done_ev: cu::CUevent,
    /// Start / end events around each all-reduce of a call, grown on demand.
    timing: Vec<(cu::CUevent, cu::CUevent)>,
    /// Partial outputs in the storage type (with [`ReduceOptions::storage_dtype`]).
    yb: Option<DeviceBuffer<u8>>,
    /// The output bias (f32) on this device, for widening a storage-type sum here.
    bo: Option<DeviceBuffer<u8>>,
    /// The widening kernel of this device's module (a function handle belongs to the context
    /// that loaded it), for bf16 / f16 layers.
    f_widen: Option<cu::CUfunction>,
    /// `place_blocks` of this device's module (the all-to-all's blocks into place).
    f_place: cu::CUfunction,
    /// Around a cached call's work on this device (benchmark diagnostics).
    step: (cu::CUevent, cu::CUevent),
    /// From the first work of a call on this device to the end of its output projection,
    /// before the output's collective (benchmark diagnostics).
    span: (cu::CUevent, cu::CUevent),
    /// Around the all-to-all's copies into place in one chunk (benchmark diagnostics).
    copies: (cu::CUevent, cu::CUevent),
    /// Buffers of [`ReduceOptions::all_to_all`] (allocated by `set_reduce`).
    a2a: Option<AllToAllBuffers>,
    /// `x` staged in the storage type by [`MultiGpuLayer::stage_inputs_storage`] (benchmark
    /// helper), read by [`MultiGpuLayer::forward_staged`] instead of the f32 `x`.
    staged: Option<DeviceBuffer<u8>>,
}

/// Where a cached step's rows `x` are.
#[derive(Clone, Copy)]
enum StepX<'a> {
    /// f32 rows in host memory (staged in page-locked memory, uploaded to every device).
    Host(&'a [f32]),
    /// The caller's rows on every device (one pointer per device), in the storage type
    /// (`true`) or f32.
    Device(&'a [u64], bool),
}

/// Where a cached step's output goes.
enum StepOut<'a> {
    /// Host memory (through page-locked staging).
    Host(&'a mut [f32]),
    /// The caller's f32 buffer on every device, each receiving the whole sum.
    Device(&'a [u64]),
}

/// A cached call ([`MultiGpuLayer::forward_cached_device`]) whose activations live on the
/// devices: a tensor-parallel server's hidden state, the same rows on every GPU.
#[derive(Clone, Copy, Debug)]
pub struct CachedDeviceCall<'a> {
    /// Device `i`'s copy of the new tokens' rows `[sum of new_tokens, n_embd]`, one device
    /// pointer per device.
    pub x: &'a [u64],
    /// `x` is in the layer's storage type (bf16 / f16 rows, as the previous layer of such a
    /// model leaves them) instead of f32.
    pub x_storage: bool,
    /// Device `i`'s f32 buffer `[sum of new_tokens, n_embd]` for the whole summed output.
    pub out: &'a [u64],
    /// The sequences and their block tables (host memory), as in
    /// [`MultiGpuLayer::forward_cached`].
    pub seqs: &'a [Sequence<'a>],
    /// The rotary table (host memory), required when the layer is rotary.
    pub rope_table: Option<RopeTable<'a>>,
}

/// Makes the layer stream `s` wait for everything enqueued so far on the lane's second
/// stream (the exchange of the current chunk).
fn wait_for_exchange(lane: &Lane, s: cu::CUstream) -> Result<()> {
    record(lane.done_ev, lane.comm)?;
    // SAFETY: live stream and event of the current context; the wait takes the record just
    // made (a later record does not affect it).
    drv("cuStreamWaitEvent", unsafe {
        cu::cuStreamWaitEvent(s, lane.done_ev, 0)
    })
}

/// One block of [`place_blocks`]: `width` bytes per row at `src` (rows contiguous), to byte
/// column `dst_col` of the destination rows.
struct PlacedBlock {
    src: u64,
    dst_col: usize,
    width: usize,
}

/// `PlaceParams` of rope_norm.cu.
#[repr(C)]
#[derive(Clone, Copy)]
struct PlaceParams {
    src: [u64; PLACE_MAX],
    dst_col: [i64; PLACE_MAX],
    width: [i64; PLACE_MAX],
    dst: u64,
    pitch: i64,
    rows: i64,
    blocks: i32,
    unit: i32,
}

/// Blocks per launch of `place_blocks` (`PLACE_MAX` in rope_norm.cu).
const PLACE_MAX: usize = 8;

/// Enqueues the copy of each block's `rows` rows into the rows of `pitch` bytes at `dst`, in
/// the widest unit (16 bytes down to 1) that every address, width, offset and the pitch allow.
///
/// # Safety
/// `f` is `place_blocks` of the current context; each block's source holds `rows * width`
/// bytes; `dst` holds `rows` rows of `pitch` bytes, each block's columns inside them; the
/// blocks' columns do not overlap and no source overlaps `dst`.
unsafe fn place_blocks(
    f: cu::CUfunction,
    blocks: &[PlacedBlock],
    dst: u64,
    pitch: usize,
    rows: usize,
    s: cu::CUstream,
) -> Result<()> {
    let mut fold = dst | pitch as u64;
    for b in blocks {
        fold |= b.src | b.dst_col as u64 | b.width as u64;
    }
    let unit = 1usize << fold.trailing_zeros().min(4);
    for group in blocks.chunks(PLACE_MAX) {
        let mut a = PlaceParams {
            src: [0; PLACE_MAX],
            dst_col: [0; PLACE_MAX],
            width: [0; PLACE_MAX],
            dst,
            pitch: (pitch / unit) as i64,
            rows: rows as i64,
            blocks: group.len() as i32,
            unit: unit as i32,
        };
        let mut widest = 0;
        for (i, b) in group.iter().enumerate() {
            a.src[i] = b.src;
            a.dst_col[i] = (b.dst_col / unit) as i64;
            a.width[i] = (b.width / unit) as i64;
            widest = widest.max(b.width / unit);
        }
        let grid = (rows * widest).div_ceil(256).clamp(1, 1024) as u32;
        // SAFETY: PlaceParams matches the kernel's struct; the blocks and destination per this
        // function's contract.
        unsafe { launch(f, (grid, group.len() as u32, 1), 256, 0, s, &mut a)? };
    }
    Ok(())
}

/// A device's buffers for [`ReduceOptions::all_to_all`].
struct AllToAllBuffers {
    /// The whole `wo` (`[n_embd, n_head * head_dim]`, storage type).
    wo: DeviceBuffer<u8>,
    /// Received blocks, packed in sender order (`AllToAllBlock::stage_offset`).
    stage: DeviceBuffer<u8>,
    /// Every head's attention output of this device's tokens, `[rows, n_head * head_dim]`.
    gathered: DeviceBuffer<u8>,
}

/// Per device, where a call's time went (benchmark diagnostics,
/// [`MultiGpuLayer::last_call_timing`]).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct DeviceTiming {
    /// Microseconds from the call's start on the host to the first enqueue on this device.
    pub enqueue_us: f64,
    /// Milliseconds (CUDA events) from this device's first work of the call to where its
    /// output's collective was enqueued: after the output projection when the partial outputs
    /// are summed, before it with [`ReduceOptions::all_to_all`], the whole call on one device.
    pub compute_ms: f32,
    /// Milliseconds (CUDA events) of this device's collectives in the call, waiting for the
    /// other devices included.
    pub nccl_ms: f32,
    /// Milliseconds (CUDA events) of the copies of [`ReduceOptions::all_to_all`] in one chunk
    /// that put every head's attention output of this device's tokens in place for the
    /// projection (0 otherwise).
    pub copy_ms: f32,
}

/// Where the summed output of a call lives.
enum Placement {
    /// Device 0's `y` holds every row (f32).
    Device0,
    /// Reduce-scattered: for each chunk `(r0, rows)`, the chunk's `rows * n_embd` output
    /// elements are cut into N equal parts and device `i`'s `y` holds part `i` (f32) at its
    /// offset.
    Scattered(Vec<(usize, usize)>),
    /// Sequence-parallel: device `i`'s `y` holds the output rows (tokens) of range `i` (f32)
    /// at their offset.
    Rows(Vec<Range<usize>>),
}

/// A KV cache split like its layer ([`MultiGpuLayer::new_kv_cache`]): one [`GpuKvCache`] per
/// device holding that device's KV heads (a replicated KV head on each of its devices), all
/// with the same blocks, so that one set of block tables ([`attnrt::Sequence`]) names a
/// sequence's blocks on every device.
pub struct MultiGpuKvCache {
    caches: Vec<GpuKvCache>,
    geometry: KvGeometry,
}

impl MultiGpuKvCache {
    /// Number of devices (one cache each).
    pub fn n_devices(&self) -> usize {
        self.caches.len()
    }

    /// The shape of the unsplit cache (every KV head of the layer), which calls are validated
    /// against.
    pub fn geometry(&self) -> KvGeometry {
        self.geometry
    }

    /// Device `i`'s cache (its KV heads, [`attnrt::DeviceShard::kv_heads`]).
    pub fn device(&self, i: usize) -> Option<&GpuKvCache> {
        self.caches.get(i)
    }

    /// Device `i`'s cache, mutable (benchmarks fill it with [`GpuKvCache::write_raw`]).
    pub fn device_mut(&mut self, i: usize) -> Option<&mut GpuKvCache> {
        self.caches.get_mut(i)
    }
}

/// A layer split by heads over several GPUs of this process ([`ShardPlan`]): device `i` runs
/// shard `i` on its own context and stream, and the partial outputs (each device's heads
/// through its `wo` columns; the output bias on device 0 only) are summed with an in-place
/// NCCL all-reduce, so device 0 then holds the layer's output (or, with
/// [`ReduceOptions::scatter`], a reduce-scatter leaves each device its part of it, and the
/// host output is gathered from all of them).
///
/// Full QK-norm, whose statistics span every device's heads, runs in two passes: each device
/// sums the squares of its q and k rows per token (a replicated KV head counts on its first
/// device only), an all-reduce adds those `2 * tokens` floats, and each device normalises
/// with the sums over the whole row. Cached calls (prefill, chunked prefill, decode) run on a
/// [`MultiGpuKvCache`]. [`ReduceOptions`] picks the type and the chunking of the output sum,
/// or instead an all-to-all of the attention outputs after which each device projects its
/// share of the tokens with the whole `wo` (sequence-parallel output).
///
/// A call's work is enqueued stage by stage across the devices (every device's conversion of
/// `x`, then every device's projections, ...), so that the last device starts within
/// microseconds of the first.
///
/// Several layers over the same devices each hold their own NCCL communicators; NCCL does not
/// allow collectives of several communicators on one device to run or be captured at the same
/// time, so calls of such layers from different threads must not overlap (a model's layers run
/// one after another anyway). Overlapping calls fail with an NCCL error (seen in step capture:
/// "ncclGroupEnd failed: unhandled cuda error").
pub struct MultiGpuLayer<'a> {
    layer: Layer<'a>,
    plan: ShardPlan,
    devices: Vec<u32>,
    precision: Precision,
    // Declared before `_wo` so that they are dropped first: their layers borrow `_wo`.
    gpus: Vec<GpuLayer<'a>>,
    lanes: Vec<Lane>,
    comms: Option<Comms>,
    reduce: ReduceOptions,
    /// All-reduces timed in the current call (pairs of `Lane::timing` in use).
    timed: usize,
    nccl_ms: f32,
    marks: BlockMarks,
    pinned: Option<Pinned>,
    pinned_out: Option<Pinned>,
    step_ms: Vec<f32>,
    /// Host microseconds of the last cached call's phases ([`MultiGpuLayer::last_host_phases_us`]).
    host_phases_us: [f64; 4],
    /// Whether cached steps are captured and replayed as CUDA graphs (on unless turned off
    /// or a capture failed).
    step_graphs_on: bool,
    /// The captured cached step, replayed while its key matches.
    step_graphs: Option<StepGraphs>,
    /// Why the last capture failed (cached steps then run as launches).
    step_graph_error: Option<String>,
    /// How several devices' steps are captured ([`MultiGpuLayer::set_step_graph_layout`]).
    graph_layout: StepGraphLayout,
    /// Devices after the first take device 0's staged step metadata when they would plan
    /// the same ([`MultiGpuLayer::set_shared_metadata`]).
    share_meta: bool,
    /// Set while a step is captured: no timing events are recorded (they would not be
    /// recorded at replay).
    untimed: bool,
    /// The peer-memory all-reduce of small exact sums (none without peer access).
    peer: Option<PeerSum>,
    /// Whether replayed cached steps record their device span ([`MultiGpuLayer::set_step_timing`]).
    step_timing: bool,
    /// Whether small exact sums use `peer` ([`MultiGpuLayer::set_peer_sum`]).
    peer_on: bool,
    /// Enqueue the devices' work stage by stage (every device's first kernel before any
    /// device's projections) rather than device by device.
    by_stage: bool,
    /// Whether `Lane::comm` is the high-priority stream.
    comm_high: bool,
    /// The host side of [`MultiGpuLayer::last_call_timing`] (enqueue offsets) and its result.
    enqueue_us: Vec<f64>,
    timing: Vec<DeviceTiming>,
    _wo: Vec<WoBlock>,
}

// SAFETY: the raw streams, events and function handles are only used through `&mut self` (or
// `&self` for reads of finished events); every other field is Send.
unsafe impl Send for MultiGpuLayer<'_> {}

impl Drop for MultiGpuLayer<'_> {
    fn drop(&mut self) {
        for (gpu, lane) in self.gpus.iter().zip(&self.lanes) {
            let _ = gpu.set_current();
            // SAFETY: the streams and events were created in this device's context and are
            // destroyed once; both streams are synchronised first so no pending work or record
            // uses them.
            unsafe {
                cu::cuStreamSynchronize(gpu.stream);
                for s in [lane.comm, lane.comm_alt] {
                    if !s.is_null() {
                        cu::cuStreamSynchronize(s);
                        cu::cuStreamDestroy_v2(s);
                    }
                }
                cu::cuEventDestroy_v2(lane.chunk_ev);
                cu::cuEventDestroy_v2(lane.done_ev);
                cu::cuEventDestroy_v2(lane.step.0);
                cu::cuEventDestroy_v2(lane.step.1);
                cu::cuEventDestroy_v2(lane.span.0);
                cu::cuEventDestroy_v2(lane.span.1);
                cu::cuEventDestroy_v2(lane.copies.0);
                cu::cuEventDestroy_v2(lane.copies.1);
                for &(a, b) in &lane.timing {
                    cu::cuEventDestroy_v2(a);
                    cu::cuEventDestroy_v2(b);
                }
            }
        }
        // The captured steps hold NCCL launches of the communicators, dropped after this.
        self.step_graphs = None;
    }
}

impl<'a> MultiGpuLayer<'a> {
    /// Splits `layer` over `devices` (CUDA ordinals, rank `i` on `devices[i]`, each at most
    /// once): plans the heads, copies each device's `wo` columns once on the host, sets up one
    /// [`GpuLayer`] per device with `opts` (its `device` field is ignored), the NCCL
    /// communicators (none for one device) and a second stream per device. The output is
    /// summed in f32 after one projection ([`ReduceOptions::EXACT`]) until
    /// [`MultiGpuLayer::set_reduce`] says otherwise.
    ///
    /// # Errors
    /// An invalid plan (more devices than query heads, no device), a repeated device, and any
    /// error of [`GpuLayer::new`] or of NCCL's set-up.
    pub fn new(layer: Layer<'a>, devices: &[u32], opts: GpuOptions) -> Result<MultiGpuLayer<'a>> {
        let cfg = *layer.config();
        for (i, d) in devices.iter().enumerate() {
            if devices[..i].contains(d) {
                return Err(Error::Unsupported(format!(
                    "device {d} appears twice in the device list"
                )));
            }
        }
        let plan = ShardPlan::new(cfg, devices.len())?;
        let full = *layer.weights();
        let mut wo = Vec::with_capacity(devices.len());
        for d in 0..devices.len() {
            let len = plan.wo_block_len(d)?;
            let block = match full.wo {
                Tensor::F32(s) => {
                    let mut b = vec![0.0f32; len];
                    plan.copy_wo(d, s, &mut b)?;
                    WoBlock::F32(b.into_boxed_slice())
                }
                Tensor::F16(s) => {
                    let mut b = vec![f16::ZERO; len];
                    plan.copy_wo(d, s, &mut b)?;
                    WoBlock::F16(b.into_boxed_slice())
                }
                Tensor::Bf16(s) => {
                    let mut b = vec![bf16::ZERO; len];
                    plan.copy_wo(d, s, &mut b)?;
                    WoBlock::Bf16(b.into_boxed_slice())
                }
            };
            wo.push(block);
        }
        let mut gpus = Vec::with_capacity(devices.len());
        for (d, &dev) in devices.iter().enumerate() {
            // SAFETY: the boxes in `wo` move into the returned value, are never mutated or
            // dropped before `gpus` (field order), and the shard layers borrowing them are
            // never handed out: the views stay valid for as long as they are used.
            let block = unsafe {
                match &wo[d] {
                    WoBlock::F32(b) => Tensor::F32(extend(b)),
                    WoBlock::F16(b) => Tensor::F16(extend(b)),
                    WoBlock::Bf16(b) => Tensor::Bf16(extend(b)),
                }
            };
            let shard = ShardLayer::new(&plan, d, &full, block)?;
            let mut gpu = GpuLayer::new(
                *shard.layer(),
                GpuOptions {
                    device: dev,
                    ..opts
                },
            )?;
            if plan.needs_norm_reduction() {
                if let Some(part) = shard.norm_part() {
                    gpu.set_norm_share(part)?;
                }
            }
            gpus.push(gpu);
        }
        let comms = if devices.len() > 1 {
            let c = Comms::new(devices)?;
            Some(c)
        } else {
            None
        };
        // Without peer access (or if enabling it fails) every sum goes through NCCL.
        let peer = if comms.is_some() {
            PeerSum::new(&gpus, opts.max_batch * opts.max_seq_len * cfg.n_embd).unwrap_or(None)
        } else {
            None
        };
        let mut lanes = Vec::with_capacity(gpus.len());
        for g in &gpus {
            g.set_current()?;
            let mut comm: cu::CUstream = std::ptr::null_mut();
            let mut comm_alt: cu::CUstream = std::ptr::null_mut();
            if comms.is_some() {
                let (mut least, mut greatest) = (0i32, 0i32);
                // SAFETY: valid out-pointers; the device's context is current.
                drv("cuCtxGetStreamPriorityRange", unsafe {
                    cu::cuCtxGetStreamPriorityRange(&mut least, &mut greatest)
                })?;
                // The highest priority, so that the block scheduler gives the collectives' CTAs
                // the SMs that compute CTAs free, before the next queued compute CTAs.
                // SAFETY: valid out-pointer; the device's context is current; destroyed in
                // Drop. Non-blocking (flag 1), as the layer's own stream.
                drv("cuStreamCreateWithPriority", unsafe {
                    cu::cuStreamCreateWithPriority(&mut comm, 1, greatest)
                })?;
                // SAFETY: as above (the default priority).
                drv("cuStreamCreate", unsafe {
                    cu::cuStreamCreate(&mut comm_alt, 1)
                })?;
            }
            let bo = match (&full.bo, comms.is_some()) {
                (Some(b), true) => Some(upload(&super::widen(b))?),
                _ => None,
            };
            let f_widen = match opts.precision {
                Precision::F32 => None,
                p => Some(function(
                    &g.kernels.rope_norm,
                    &format!("widen_bias_{}", p.name()),
                )?),
            };
            let f_place = function(&g.kernels.rope_norm, "place_blocks")?;
            lanes.push(Lane {
                comm,
                comm_alt,
                chunk_ev: event(false)?,
                done_ev: event(false)?,
                timing: Vec::new(),
                yb: None,
                bo,
                f_widen,
                f_place,
                step: (event(true)?, event(true)?),
                span: (event(true)?, event(true)?),
                copies: (event(true)?, event(true)?),
                a2a: None,
                staged: None,
            });
        }
        Ok(MultiGpuLayer {
            layer,
            plan,
            devices: devices.to_vec(),
            precision: opts.precision,
            gpus,
            lanes,
            comms,
            reduce: ReduceOptions::EXACT,
            timed: 0,
            nccl_ms: 0.0,
            marks: BlockMarks::default(),
            pinned: None,
            pinned_out: None,
            step_ms: Vec::new(),
            host_phases_us: [0.0; 4],
            step_graphs_on: true,
            step_graphs: None,
            step_graph_error: None,
            graph_layout: StepGraphLayout::PerDevice,
            share_meta: true,
            untimed: false,
            peer,
            peer_on: true,
            step_timing: false,
            by_stage: true,
            comm_high: true,
            enqueue_us: Vec::new(),
            timing: Vec::new(),
            _wo: wo,
        })
    }

    /// The head split.
    pub fn plan(&self) -> &ShardPlan {
        &self.plan
    }

    /// The devices, rank by rank.
    pub fn devices(&self) -> &[u32] {
        &self.devices
    }

    /// The NCCL version loaded (e.g. 22803), or `None` on one device (no NCCL use).
    pub fn nccl_version(&self) -> Option<i32> {
        self.comms.as_ref().and_then(|_| nccl::version().ok())
    }

    /// What ran on device 0 (path and name).
    pub fn backend(&self) -> GpuBackend {
        self.gpus[0].backend()
    }

    /// Milliseconds the last reduced call spent in NCCL all-reduces (the norm statistics, if
    /// any, and the partial outputs: CUDA events around each on its stream, summed; the largest
    /// sum over the devices), 0 on one device.
    pub fn last_nccl_ms(&self) -> f32 {
        self.nccl_ms
    }

    /// How the partial outputs are summed.
    pub fn reduce_options(&self) -> ReduceOptions {
        self.reduce
    }

    /// Sets how the partial outputs are summed from the next call on. Reducing in the storage
    /// type allocates a partial-output buffer of that type per device (once); the all-to-all
    /// uploads the whole `wo` to every device and allocates its receive buffers (once).
    ///
    /// # Errors
    /// `chunks` 0 ([`Error::Unsupported`] naming it), out of device memory.
    pub fn set_reduce(&mut self, options: ReduceOptions) -> Result<()> {
        if options.chunks == 0 {
            return Err(Error::Unsupported(
                "ReduceOptions::chunks = 0: the output needs at least one chunk".into(),
            ));
        }
        if options.all_to_all && self.comms.is_some() {
            let cfg = *self.layer.config();
            let n = self.gpus.len();
            let es = self.precision.size();
            for (g, lane) in self.gpus.iter().zip(&mut self.lanes) {
                if lane.a2a.is_none() {
                    g.set_current()?;
                    let rows = (g.opts.max_batch * g.opts.max_seq_len).div_ceil(n);
                    let w = self.layer.weights();
                    lane.a2a = Some(AllToAllBuffers {
                        wo: upload(&stored(&[&w.wo], self.precision))?,
                        stage: alloc(rows * (cfg.q_dim() - g.cfg.q_dim()) * es)?,
                        gathered: alloc(rows * cfg.q_dim() * es)?,
                    });
                }
            }
        }
        if options.storage_dtype && self.precision != Precision::F32 && self.comms.is_some() {
            for (g, lane) in self.gpus.iter().zip(&mut self.lanes) {
                if lane.yb.is_none() {
                    g.set_current()?;
                    let tokens = g.opts.max_batch * g.opts.max_seq_len;
                    lane.yb = Some(alloc(tokens * g.cfg.n_embd * self.precision.size())?);
                }
            }
        }
        self.reduce = options;
        Ok(())
    }

    /// A KV cache for this split: `num_blocks` blocks of `block_size` tokens on every device,
    /// each device's pools holding its KV heads in the layer's precision (`rolling` as
    /// [`GpuKvCache::new`]).
    ///
    /// # Errors
    /// A zero dimension ([`attnrt::Error::Config`] naming it), sizes that overflow, out of
    /// device memory.
    pub fn new_kv_cache(
        &self,
        block_size: usize,
        num_blocks: usize,
        rolling: bool,
    ) -> Result<MultiGpuKvCache> {
        let cfg = self.plan.config();
        let geometry = KvGeometry {
            n_kv_head: cfg.n_kv_head,
            head_dim: cfg.head_dim,
            block_size,
            num_blocks,
            rolling,
        };
        geometry.validate()?;
        let mut caches = Vec::with_capacity(self.devices.len());
        for (d, &dev) in self.devices.iter().enumerate() {
            let shard = self.plan.shard(d)?;
            caches.push(GpuKvCache::new(
                self.precision,
                shard.n_kv_head(),
                cfg.head_dim,
                block_size,
                num_blocks,
                rolling,
                dev,
            )?);
        }
        Ok(MultiGpuKvCache { caches, geometry })
    }

    /// Makes every device's layer stream wait for everything enqueued so far on its
    /// collective stream (the chunked collectives of a call).
    fn join_comm_lanes(&self) -> Result<()> {
        for (g, lane) in self.gpus.iter().zip(&self.lanes) {
            g.set_current()?;
            record(lane.done_ev, lane.comm)?;
            // SAFETY: live stream and event of the current context.
            drv("cuStreamWaitEvent", unsafe {
                cu::cuStreamWaitEvent(g.stream, lane.done_ev, 0)
            })?;
        }
        Ok(())
    }

    /// Enqueues an in-place sum of `count` elements at `bufs[i]` (device `i`) on each
    /// device's layer stream, or on its second stream with `on_comm`, between timing events.
    ///
    /// # Safety
    /// As [`Comms::sum`] for the chosen streams.
    unsafe fn collective(
        &mut self,
        kind: Collective,
        bufs: &[u64],
        count: usize,
        dtype: Dtype,
        on_comm: bool,
    ) -> Result<()> {
        // SAFETY: per this function's contract.
        self.timed_nccl(on_comm, |comms, streams| unsafe {
            comms.sum(kind, bufs, streams, count, dtype)
        })
    }

    /// Runs `enqueue` (NCCL work on the given streams, one per device: the layer streams, or
    /// the second streams with `on_comm`) between timing events on those streams.
    fn timed_nccl(
        &mut self,
        on_comm: bool,
        enqueue: impl FnOnce(&mut Comms, &[*mut c_void]) -> Result<()>,
    ) -> Result<()> {
        let Some(comms) = self.comms.as_mut() else {
            return Ok(());
        };
        let k = self.timed;
        let mut streams = Vec::with_capacity(self.gpus.len());
        for (g, lane) in self.gpus.iter().zip(&mut self.lanes) {
            g.set_current()?;
            if lane.timing.len() <= k {
                lane.timing.push((event(true)?, event(true)?));
            }
            let s = if on_comm { lane.comm } else { g.stream };
            if !self.untimed {
                record(lane.timing[k].0, s)?;
            }
            streams.push(s.cast::<c_void>());
        }
        enqueue(comms, &streams)?;
        for ((g, lane), &s) in self.gpus.iter().zip(&self.lanes).zip(&streams) {
            if !self.untimed {
                g.set_current()?;
                record(lane.timing[k].1, s.cast())?;
            }
        }
        self.timed = k + 1;
        Ok(())
    }

    /// Full QK-norm across devices: sums every device's per-token statistics of the call's
    /// `tokens` tokens (on the layer streams, after the projections, before the norm pass).
    fn reduce_norm(&mut self, tokens: usize) -> Result<()> {
        if !self.plan.needs_norm_reduction() || self.comms.is_none() {
            return Ok(());
        }
        let bufs: Vec<u64> = self
            .gpus
            .iter()
            .map(|g| g.stats.as_ref().map_or(0, ptr))
            .collect();
        if bufs.contains(&0) {
            return Err(Error::Unsupported(
                "full QK-norm statistics buffer missing".into(),
            ));
        }
        // SAFETY: each buffer is its device's statistics buffer of 2 * max tokens f32 >= 2 *
        // tokens (the call fits the layer), each stream that device's layer stream.
        unsafe { self.collective(Collective::AllReduce, &bufs, 2 * tokens, Dtype::F32, false) }
    }

    /// How the output of a `tokens`-token call (not all-to-all) is summed, per
    /// [`ReduceOptions`]: in the storage type or in f32, all-reduced or reduce-scattered, in
    /// how many chunks of tokens.
    fn reduce_shape(&self, tokens: usize) -> ReduceShape {
        let c = self.layer.config().n_embd;
        ReduceShape {
            storage: self.reduce.storage_dtype && self.precision != Precision::F32,
            kind: if self.reduce.scatter && c.is_multiple_of(self.gpus.len()) {
                Collective::ReduceScatter
            } else {
                Collective::AllReduce
            },
            chunks: self.reduce.chunks.clamp(1, tokens.max(1)),
        }
    }

    /// Whether the output sum of a `tokens`-token call (not all-to-all) goes through peer
    /// memory: an exact (f32, unchunked) all-reduce small enough for the peer buffers.
    fn peer_sums(&self, tokens: usize) -> bool {
        let shape = self.reduce_shape(tokens);
        self.peer_on
            && !shape.storage
            && shape.chunks == 1
            && shape.kind == Collective::AllReduce
            && (self.peer.as_ref()).is_some_and(|p| p.fits(tokens * self.layer.config().n_embd))
    }

    /// Whether the devices of a `tokens`-token call exchange nothing but the peer-memory sum
    /// of the output (no NCCL collective: no full QK-norm statistics, no all-to-all).
    fn peer_only(&self, tokens: usize) -> bool {
        self.comms.is_some()
            && !self.reduce.all_to_all
            && !self.plan.needs_norm_reduction()
            && self.peer_sums(tokens)
    }

    /// Where device `i`'s (partial, then summed) f32 output goes: `outs[i]`, the caller's
    /// buffer of a device-resident call, or with no `outs`, the layer's `y`.
    fn y_of(&self, i: usize, outs: &[u64]) -> u64 {
        outs.get(i).copied().unwrap_or_else(|| ptr(&self.gpus[i].y))
    }

    /// The output projection of every device's `tokens` attention rows and the sum of the
    /// partial outputs per [`ReduceOptions`], in f32: in device 0's `y`, or reduce-scattered.
    /// With `outs` (one buffer per device, an all-reduce), into those instead, the whole sum
    /// on every device.
    fn project_and_reduce(&mut self, tokens: usize, outs: &[u64]) -> Result<Placement> {
        if self.comms.is_none() {
            let y = self.y_of(0, outs);
            let g = &mut self.gpus[0];
            g.set_current()?;
            let s = g.stream;
            // SAFETY: y holds max tokens * n_embd f32; o holds this call's attention output.
            unsafe { g.project_out(y, tokens, s)? };
            self.mark_span_end()?;
            return Ok(Placement::Device0);
        }
        if self.reduce.all_to_all {
            return self.project_all_to_all(tokens);
        }
        let n = self.gpus.len();
        let c = self.layer.config().n_embd;
        let ReduceShape {
            storage,
            kind,
            chunks,
        } = self.reduce_shape(tokens);
        let dtype = match (storage, self.precision) {
            (true, Precision::Bf16) => Dtype::Bf16,
            (true, Precision::F16) => Dtype::F16,
            _ => Dtype::F32,
        };
        let es = dtype.size();
        let per = tokens.div_ceil(chunks);
        let overlap = chunks > 1;
        // A small exact sum (a decode step's) goes through peer memory: the projections
        // write partial buffers, summed into the outputs on every device.
        let peer_parts: Vec<u64> = match &self.peer {
            Some(p) if self.peer_sums(tokens) => (0..n).map(|i| p.part(i)).collect(),
            _ => Vec::new(),
        };
        let mut done = Vec::with_capacity(chunks);
        let mut r0 = 0;
        let ys: Vec<u64> = (0..n).map(|i| self.y_of(i, outs)).collect();
        while r0 < tokens {
            let rows = per.min(tokens - r0);
            let mut bufs = Vec::with_capacity(n);
            for (i, ((g, lane), &y_out)) in
                self.gpus.iter_mut().zip(&self.lanes).zip(&ys).enumerate()
            {
                g.set_current()?;
                let base = match (&lane.yb, storage) {
                    (Some(b), true) => ptr(b),
                    (None, true) => {
                        return Err(Error::Unsupported(
                            "storage-type reduction buffer missing".into(),
                        ))
                    }
                    _ => peer_parts.get(i).copied().unwrap_or(y_out),
                };
                let y = base + (r0 * c * es) as u64;
                let s = g.stream;
                // SAFETY: `y` points at row r0 of a buffer of max tokens * n_embd elements of
                // the output type; rows r0..r0 + rows are inside the call's attention output.
                unsafe { g.project_out_rows(y, r0, rows, storage, s)? };
                if overlap {
                    record(lane.chunk_ev, s)?;
                    // SAFETY: live stream and event of the current context.
                    drv("cuStreamWaitEvent", unsafe {
                        cu::cuStreamWaitEvent(lane.comm, lane.chunk_ev, 0)
                    })?;
                }
                bufs.push(y);
            }
            if r0 + rows >= tokens {
                self.mark_span_end()?;
            }
            match (&self.peer, peer_parts.is_empty()) {
                // SAFETY: every partial buffer holds the call's rows * c f32 (one chunk, all
                // rows), projected on its layer stream; the outputs are the layers' `y` or
                // the caller's buffers, none of them a partial buffer.
                (Some(p), false) => unsafe { p.sum(&self.gpus, &ys, rows * c)? },
                // SAFETY: each buffer holds `rows * c` elements of `dtype` on its device (a
                // multiple of n for a reduce-scatter); the streams are the devices' (ordered
                // after the chunk's projection).
                _ => unsafe { self.collective(kind, &bufs, rows * c, dtype, overlap)? },
            }
            done.push((r0, rows));
            r0 += rows;
        }
        if overlap {
            self.join_comm_lanes()?;
        }
        if storage {
            // (device, first element, elements) to widen: device 0's whole sum, or every
            // device's parts.
            let mut parts = Vec::with_capacity(n * done.len());
            match kind {
                // Every device's own output wants the whole sum.
                Collective::AllReduce if !outs.is_empty() => {
                    parts.extend((0..n).map(|i| (i, 0, tokens * c)));
                }
                Collective::AllReduce => parts.push((0, 0, tokens * c)),
                Collective::ReduceScatter => {
                    for i in 0..n {
                        for &(r0, rows) in &done {
                            let m = rows * c / n;
                            parts.push((i, r0 * c + i * m, m));
                        }
                    }
                }
            }
            for (i, at, m) in parts {
                let y_out = self.y_of(i, outs);
                let (g, lane) = (&self.gpus[i], &self.lanes[i]);
                let f = lane
                    .f_widen
                    .ok_or_else(|| Error::Unsupported("widening kernel missing".into()))?;
                g.set_current()?;
                let mut a = WidenParams {
                    input: lane.yb.as_ref().map_or(0, ptr) + (at * es) as u64,
                    output: y_out + (at * 4) as u64,
                    bias: lane.bo.as_ref().map_or(0, ptr),
                    n: m as i64,
                    cols: c as i32,
                    col0: (at % c) as i32,
                };
                let blocks = m.div_ceil(256).clamp(1, 65535 * 8) as u32;
                // SAFETY: WidenParams matches the kernel's struct; yb holds the summed
                // storage-type elements at..at + m, y room for them in f32, bo (if any) c f32.
                unsafe { launch(f, (blocks, 1, 1), 256, 0, g.stream, &mut a)? };
            }
        }
        Ok(match kind {
            Collective::AllReduce => Placement::Device0,
            Collective::ReduceScatter => Placement::Scattered(done),
        })
    }

    /// Records the end of each device's work before the output's collective
    /// ([`DeviceTiming::compute_ms`]) on its layer stream.
    fn mark_span_end(&self) -> Result<()> {
        if self.untimed {
            return Ok(());
        }
        for (g, lane) in self.gpus.iter().zip(&self.lanes) {
            g.set_current()?;
            record(lane.span.1, g.stream)?;
        }
        Ok(())
    }

    /// [`ReduceOptions::all_to_all`]: every device sends each other device the attention
    /// output of its query heads for that device's tokens, assembles every head's output of
    /// its own tokens, and runs the whole output projection and bias on them, into its `y` at
    /// their rows. With several chunks, the exchanges run on the second (high-priority)
    /// streams, chunk `c + 1`'s while chunk `c`'s projection runs on the layer streams.
    fn project_all_to_all(&mut self, tokens: usize) -> Result<Placement> {
        let cfg = *self.layer.config();
        let (c, qd) = (cfg.n_embd, cfg.q_dim());
        let n = self.gpus.len();
        let es = self.precision.size();
        let dtype = match self.precision {
            Precision::F32 => Dtype::F32,
            Precision::Bf16 => Dtype::Bf16,
            Precision::F16 => Dtype::F16,
        };
        let chunks = self.reduce.chunks.clamp(1, tokens.div_ceil(n).max(1));
        let overlap = chunks > 1;
        let blocks = all_to_all_blocks(&self.plan, tokens, chunks)?;
        let mut bufs = Vec::with_capacity(n);
        for lane in &self.lanes {
            let b = lane.a2a.as_ref().ok_or_else(|| {
                Error::Unsupported("all-to-all buffers missing (set_reduce not called)".into())
            })?;
            bufs.push((ptr(&b.wo), ptr(&b.stage), ptr(&b.gathered)));
        }
        let at = |base: u64, elems: usize| base + (elems * es) as u64;
        let mut ranges = Vec::with_capacity(n);
        for j in 0..n {
            ranges.push(self.plan.token_range(j, tokens)?);
        }
        self.mark_span_end()?;
        if overlap {
            // The exchanges read the attention output: the second streams wait for it.
            for (g, lane) in self.gpus.iter().zip(&self.lanes) {
                g.set_current()?;
                record(lane.chunk_ev, g.stream)?;
                // SAFETY: live stream and event of the current context.
                drv("cuStreamWaitEvent", unsafe {
                    cu::cuStreamWaitEvent(lane.comm, lane.chunk_ev, 0)
                })?;
            }
        }
        for chunk in 0..chunks {
            let part: Vec<&AllToAllBlock> = blocks.iter().filter(|b| b.chunk == chunk).collect();
            if part.is_empty() {
                continue;
            }
            let transfers: Vec<Transfer> = part
                .iter()
                .filter(|b| b.src != b.dst)
                .map(|b| Transfer {
                    src: b.src,
                    dst: b.dst,
                    send: at(ptr(&self.gpus[b.src].o), b.src_offset),
                    recv: at(bufs[b.dst].1, b.stage_offset),
                    count: b.len(),
                })
                .collect();
            self.timed_nccl(overlap, |comms, streams| {
                // SAFETY: each block lies inside its sender's attention output of this call
                // ([tokens, its q columns]) and inside its receiver's stage buffer (sized for
                // the largest token share times the other devices' columns); the blocks of
                // one receiver do not overlap (`all_to_all_blocks`); the streams are ordered
                // after the attention.
                unsafe { comms.exchange(&transfers, streams, dtype) }
            })?;
            for (j, (g, lane)) in self.gpus.iter_mut().zip(&self.lanes).enumerate() {
                let mine: Vec<&&AllToAllBlock> = part.iter().filter(|b| b.dst == j).collect();
                let Some(first) = mine.first() else {
                    if !overlap {
                        // No tokens here: an empty span, so that the timing reads 0.
                        g.set_current()?;
                        record(lane.copies.0, g.stream)?;
                        record(lane.copies.1, g.stream)?;
                    }
                    continue;
                };
                let rows = first.rows.clone();
                g.set_current()?;
                let s = g.stream;
                let (wo, stage, gathered) = bufs[j];
                let y = ptr(&g.y) + (rows.start * c * 4) as u64;
                if overlap {
                    wait_for_exchange(lane, s)?;
                } else {
                    record(lane.copies.0, s)?;
                }
                // The chunk's rows of every head, at their place among this device's rows.
                let dst_rows = at(gathered, (rows.start - ranges[j].start) * qd);
                let placed: Vec<PlacedBlock> = mine
                    .iter()
                    .map(|b| PlacedBlock {
                        src: if b.src == j {
                            at(ptr(&g.o), b.src_offset)
                        } else {
                            at(stage, b.stage_offset)
                        },
                        dst_col: b.cols.start * es,
                        width: b.cols.len() * es,
                    })
                    .collect();
                // SAFETY: each source block ([rows, cols.len()], contiguous) lies in this
                // device's attention output or stage buffer, written earlier on this stream
                // (or on the second stream it waited for); the destination columns of the
                // chunk's rows of `qd` lie in `gathered` (sized for the largest share); the
                // blocks' columns do not overlap.
                unsafe { place_blocks(lane.f_place, &placed, dst_rows, qd * es, rows.len(), s)? };
                if !overlap {
                    record(lane.copies.1, s)?;
                }
                // SAFETY: wo [c, qd], the chunk's gathered rows [rows, qd] (storage type), y
                // rows [rows, c] f32 inside this device's `y` (max tokens * n_embd f32).
                unsafe {
                    g.cublas.linear(
                        s.cast(),
                        rows.len(),
                        c,
                        qd,
                        wo,
                        dst_rows,
                        blas_type(self.precision),
                        y,
                        cublas::R_32F,
                    )?
                };
                // SAFETY: y rows [rows, c] f32 inside `y`; bo (if any) holds c f32.
                unsafe { g.add_bias_rows(lane.bo.as_ref(), y, rows.len(), s)? };
            }
        }
        if overlap {
            // Every exchange done before the layer stream goes on, also on a device whose
            // last chunks had no rows (its sends still read its attention output).
            self.join_comm_lanes()?;
        }
        Ok(Placement::Rows(ranges))
    }

    /// Validates the call against the unsplit layer, uploads `x` to every device, enqueues
    /// every shard's projections, the norm statistics' sum (full QK-norm), and every shard's
    /// attention (the attention outputs in each layer's `o`).
    fn launch(&mut self, inputs: &Inputs<'_>, out_len: usize, upload: bool) -> Result<()> {
        self.layer.validate_inputs(inputs, out_len)?;
        for (g, lane) in self.gpus.iter().zip(&self.lanes) {
            g.check_capacity(inputs.batch, inputs.seq_len)?;
            let staged = lane.staged.as_ref().map_or(usize::MAX, |b| b.len());
            if !upload && staged < inputs.x.len() * self.precision.size() {
                return Err(Error::Unsupported(
                    "the call is larger than the inputs staged in the storage type".into(),
                ));
            }
        }
        self.timed = 0;
        let t0 = Instant::now();
        self.enqueue_us.clear();
        let rope = inputs.rope_table.map(RopeSource::Host);
        let n = self.gpus.len();
        let mut starts: Vec<FrontStart> = Vec::with_capacity(n);
        let mut fronts: Vec<Front> = Vec::with_capacity(n);
        for (g, lane) in self.gpus.iter_mut().zip(&self.lanes) {
            g.set_current()?;
            let (x, stream) = (ptr(&g.x), g.stream);
            record(lane.span.0, stream)?;
            self.enqueue_us.push(t0.elapsed().as_secs_f64() * 1e6);
            let x = match (&lane.staged, upload) {
                (_, true) => {
                    // SAFETY: `x` holds max_batch * max_seq_len * n_embd f32 and the call fits
                    // (checked); `inputs.x` has batch * seq_len * n_embd values (validated).
                    unsafe { h2d(x, inputs.x, stream)? };
                    DeviceX::F32(x)
                }
                (Some(b), false) => DeviceX::Storage(ptr(b)),
                (None, false) => DeviceX::F32(x),
            };
            // SAFETY: x is this layer's buffer or the staged one, sized for the validated
            // call.
            let start = unsafe {
                g.front_start(
                    x,
                    inputs.batch,
                    inputs.seq_len,
                    &inputs.mask,
                    inputs.position_ids,
                    rope,
                    stream,
                )?
            };
            if self.by_stage {
                // Every device's first kernel before any device's projections: each launch
                // costs microseconds of host time, which would otherwise delay the last
                // device's start by the whole front of every device before it.
                starts.push(start);
            } else {
                // SAFETY: `start` was enqueued just above on this stream.
                fronts.push(unsafe { g.front_finish(&start, stream)? });
            }
        }
        for (g, start) in self.gpus.iter_mut().zip(&starts) {
            g.set_current()?;
            let stream = g.stream;
            // SAFETY: `start` is this layer's front start, enqueued above on its stream.
            fronts.push(unsafe { g.front_finish(start, stream)? });
        }
        self.reduce_norm(inputs.batch * inputs.seq_len)?;
        for (g, f) in self.gpus.iter_mut().zip(&fronts) {
            g.set_current()?;
            let s = g.stream;
            // SAFETY: `f` is this layer's front, enqueued above on the same stream.
            unsafe { g.run_attention(f, s)? };
        }
        Ok(())
    }

    /// Enqueues the copies of the summed output of `tokens` tokens (`placement`) into host
    /// memory at `dst`, on the streams of the devices holding it.
    ///
    /// # Safety
    /// `dst` points at `tokens * n_embd` writable f32 that stay valid and unread until
    /// `finish` has synchronised the streams.
    unsafe fn download(&self, dst: *mut f32, tokens: usize, placement: &Placement) -> Result<()> {
        let c = self.layer.config().n_embd;
        let n = self.gpus.len();
        let copy = |g: &GpuLayer<'_>, at: usize, m: usize| -> Result<()> {
            // SAFETY: `g.y` holds the summed elements at..at + m (f32); `dst` has room for
            // them at the same offset (this function's contract).
            drv("cuMemcpyDtoHAsync", unsafe {
                cu::cuMemcpyDtoHAsync_v2(
                    dst.add(at).cast(),
                    ptr(&g.y) + (at * 4) as u64,
                    m * 4,
                    g.stream,
                )
            })
        };
        match placement {
            Placement::Device0 => {
                self.gpus[0].set_current()?;
                copy(&self.gpus[0], 0, tokens * c)?;
            }
            Placement::Scattered(chunks) => {
                for (i, g) in self.gpus.iter().enumerate() {
                    g.set_current()?;
                    for &(r0, rows) in chunks {
                        let m = rows * c / n;
                        copy(g, r0 * c + i * m, m)?;
                    }
                }
            }
            Placement::Rows(ranges) => {
                for (g, r) in self.gpus.iter().zip(ranges) {
                    if r.is_empty() {
                        continue;
                    }
                    g.set_current()?;
                    copy(g, r.start * c, r.len() * c)?;
                }
            }
        }
        Ok(())
    }

    /// Waits for every device and reads the NCCL times of the call's all-reduces (and with
    /// `stepped`, the span of each device's work of a cached call).
    fn finish(&mut self, reduced: bool, stepped: bool) -> Result<()> {
        let mut worst = 0.0f32;
        self.step_ms.clear();
        self.timing.clear();
        for (i, (g, lane)) in self.gpus.iter().zip(&self.lanes).enumerate() {
            g.synchronize()?;
            if reduced && self.enqueue_us.len() == self.gpus.len() {
                let mut ms = 0.0f32;
                // SAFETY: both events were recorded in this call (`launch`, and before the
                // output's collective) on this finished stream.
                drv("cuEventElapsedTime", unsafe {
                    cu::cuEventElapsedTime(&mut ms, lane.span.0, lane.span.1)
                })?;
                let mut copy_ms = 0.0f32;
                if self.reduce.all_to_all && self.reduce.chunks == 1 && self.comms.is_some() {
                    // SAFETY: both events were recorded in this call around the copies (or back
                    // to back on a device without tokens) on this finished stream.
                    drv("cuEventElapsedTime", unsafe {
                        cu::cuEventElapsedTime(&mut copy_ms, lane.copies.0, lane.copies.1)
                    })?;
                }
                self.timing.push(DeviceTiming {
                    enqueue_us: self.enqueue_us[i],
                    compute_ms: ms,
                    nccl_ms: 0.0,
                    copy_ms,
                });
            }
            if stepped {
                let mut ms = 0.0f32;
                // SAFETY: both events were recorded in this call on this finished stream.
                drv("cuEventElapsedTime", unsafe {
                    cu::cuEventElapsedTime(&mut ms, lane.step.0, lane.step.1)
                })?;
                self.step_ms.push(ms);
            }
            if reduced && self.comms.is_some() {
                let mut sum = 0.0f32;
                for &(a, b) in &lane.timing[..self.timed] {
                    let mut ms = 0.0f32;
                    // SAFETY: both events were recorded in this call on streams this device's
                    // finished layer stream waited for.
                    drv("cuEventElapsedTime", unsafe {
                        cu::cuEventElapsedTime(&mut ms, a, b)
                    })?;
                    sum += ms;
                }
                worst = worst.max(sum);
                if let Some(t) = self.timing.get_mut(i) {
                    t.nccl_ms = sum;
                }
            }
        }
        if reduced {
            self.nccl_ms = worst;
        }
        self.enqueue_us.clear();
        Ok(())
    }

    /// Benchmark diagnostics of the last `forward_host` / `forward_staged` call on several
    /// devices, device by device: when its work was enqueued, how long it ran before the
    /// output's collective, and its time in NCCL (empty after other calls or on error).
    #[doc(hidden)]
    pub fn last_call_timing(&self) -> &[DeviceTiming] {
        &self.timing
    }

    /// Benchmark switch: enqueue a call's work stage by stage across the devices (the
    /// default: every device's first kernel, then every device's projections, ...) or device
    /// by device (`false`: each device's whole front before the next device's).
    #[doc(hidden)]
    pub fn set_enqueue_by_stage(&mut self, by_stage: bool) {
        self.by_stage = by_stage;
    }

    /// Benchmark switch: run the overlapped collectives (chunks > 1) on a second stream of
    /// the highest priority (the default) or of the default priority (`false`).
    ///
    /// # Errors
    /// A failed wait for the streams.
    #[doc(hidden)]
    pub fn set_comm_priority(&mut self, high: bool) -> Result<()> {
        if high != self.comm_high {
            for (g, lane) in self.gpus.iter().zip(&mut self.lanes) {
                g.synchronize()?;
                std::mem::swap(&mut lane.comm, &mut lane.comm_alt);
            }
            self.comm_high = high;
        }
        Ok(())
    }

    /// Runs the layer on host buffers: `x` to every device, each shard on its device, the
    /// partial outputs summed with NCCL ([`ReduceOptions`]), the sum copied into `out`.
    ///
    /// # Errors
    /// The runtime's validation errors ([`Error::Runtime`]), [`Error::Capacity`], or a failed
    /// CUDA / cuBLAS / NCCL call. `out` is untouched on error.
    pub fn forward_host(&mut self, inputs: &Inputs<'_>, out: &mut [f32]) -> Result<GpuBackend> {
        if out.is_empty() {
            self.layer.validate_inputs(inputs, 0)?;
            return Ok(self.backend());
        }
        let tokens = inputs.batch * inputs.seq_len;
        self.launch(inputs, out.len(), true)?;
        let placement = self.project_and_reduce(tokens, &[])?;
        // SAFETY: `out` holds tokens * n_embd f32 (validated), borrowed until `finish`.
        unsafe { self.download(out.as_mut_ptr(), tokens, &placement)? };
        self.finish(true, false)?;
        Ok(self.backend())
    }

    /// The "partials" mode, for callers that reduce themselves: runs every shard as
    /// [`MultiGpuLayer::forward_host`] does but without the all-reduce of the outputs (full
    /// QK-norm statistics are still summed across the devices: they are part of each shard's
    /// computation), and writes device `i`'s partial output (f32) to `out[i * len..(i + 1) *
    /// len]` (`len = batch * seq_len * n_embd`). Their sum is the layer's output (the output
    /// bias is in device 0's part).
    ///
    /// # Errors
    /// As [`MultiGpuLayer::forward_host`]; `out` must hold `n_devices * len` values.
    pub fn forward_host_partials(
        &mut self,
        inputs: &Inputs<'_>,
        out: &mut [f32],
    ) -> Result<GpuBackend> {
        let n = self.gpus.len();
        if !out.len().is_multiple_of(n) {
            return Err(attnrt::Error::InputShape {
                name: "partial outputs",
                expected: (out.len() / n + 1) * n,
                actual: out.len(),
            }
            .into());
        }
        let len = out.len() / n;
        if len == 0 {
            self.layer.validate_inputs(inputs, 0)?;
            return Ok(self.backend());
        }
        self.launch(inputs, len, true)?;
        let tokens = inputs.batch * inputs.seq_len;
        for (g, part) in self.gpus.iter_mut().zip(out.chunks_exact_mut(len)) {
            g.set_current()?;
            let (y, s) = (ptr(&g.y), g.stream);
            // SAFETY: y holds max tokens * n_embd f32; o holds this call's attention output.
            unsafe { g.project_out(y, tokens, s)? };
            let bytes = std::mem::size_of_val(part);
            // SAFETY: this device's `y` holds `bytes` bytes of the call; `part` is a live
            // exclusive host slice of that size, read only after `finish` synchronises.
            drv("cuMemcpyDtoHAsync", unsafe {
                cu::cuMemcpyDtoHAsync_v2(part.as_mut_ptr().cast(), y, bytes, s)
            })?;
        }
        self.finish(false, false)?;
        Ok(self.backend())
    }

    /// Benchmark helper: uploads `x` once to every device.
    ///
    /// # Errors
    /// As [`MultiGpuLayer::forward_host`].
    #[doc(hidden)]
    pub fn stage_inputs(&mut self, inputs: &Inputs<'_>) -> Result<()> {
        self.stage(inputs, false)
    }

    /// Benchmark helper: uploads `x` once to every device and converts it there to the
    /// layer's storage type, so that [`MultiGpuLayer::forward_staged`] starts from rows in
    /// the storage type, as a bf16 / f16 model's previous layer leaves them (no conversion
    /// in the call; on an f32 layer the same as [`MultiGpuLayer::stage_inputs`]).
    ///
    /// # Errors
    /// As [`MultiGpuLayer::forward_host`].
    #[doc(hidden)]
    pub fn stage_inputs_storage(&mut self, inputs: &Inputs<'_>) -> Result<()> {
        self.stage(inputs, true)
    }

    fn stage(&mut self, inputs: &Inputs<'_>, storage: bool) -> Result<()> {
        let len = inputs.x.len();
        self.layer.validate_inputs(inputs, len)?;
        for g in &self.gpus {
            g.check_capacity(inputs.batch, inputs.seq_len)?;
        }
        for (g, lane) in self.gpus.iter().zip(&mut self.lanes) {
            g.set_current()?;
            lane.staged = None;
            // SAFETY: as in `launch`.
            unsafe { h2d(ptr(&g.x), inputs.x, g.stream)? };
            if storage {
                let b = alloc(len * self.precision.size())?;
                // SAFETY: `x` holds the len f32 just uploaded, `b` room for len elements of
                // the storage type.
                if unsafe { g.convert_to_storage(ptr(&g.x), ptr(&b), len, g.stream)? } {
                    lane.staged = Some(b);
                }
            }
        }
        self.finish(false, false)
    }

    /// Benchmark helper: one reduced forward on the inputs already on the devices
    /// ([`MultiGpuLayer::stage_inputs`]; mask and positions from `inputs`), waiting for every
    /// device; the result stays on the devices (device 0, or each its part when
    /// reduce-scattered, or each its token rows with the all-to-all).
    ///
    /// # Errors
    /// As [`MultiGpuLayer::forward_host`].
    #[doc(hidden)]
    pub fn forward_staged(&mut self, inputs: &Inputs<'_>) -> Result<()> {
        let len = inputs.x.len();
        self.launch(inputs, len, false)?;
        self.project_and_reduce(inputs.batch * inputs.seq_len, &[])?;
        self.finish(true, false)
    }

    /// Benchmark helper: mean milliseconds (CUDA events) of device `device`'s split-K
    /// attention and merge of the last cached call, relaunched `iters` times alone.
    ///
    /// # Errors
    /// A device outside the split, no earlier cached call, a failed launch.
    ///
    /// # Safety
    /// The [`MultiGpuKvCache`] of the last cached call is still alive.
    #[doc(hidden)]
    pub unsafe fn time_decode_ms(&mut self, device: usize, iters: usize) -> Result<f32> {
        let g = self.gpus.get_mut(device).ok_or_else(|| {
            Error::Unsupported(format!("device index {device} outside the split"))
        })?;
        // SAFETY: per this function's contract.
        g.time_ms(iters, |g| unsafe { g.relaunch_decode() })
    }
}
