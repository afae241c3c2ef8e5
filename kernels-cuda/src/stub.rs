//! The API without the `cuda` feature: every constructor returns [`Error::NoCuda`].

use std::ffi::c_void;
use std::marker::PhantomData;

use attnrt::{Inputs, KvGeometry, Layer, MaskInputs, RopeTable, Sequence};

use crate::error::{Error, Result};
use crate::plan::{AttnPath, GpuBackend, GpuOptions, Precision, ReduceOptions};

/// Where the rotary rows of a device call come from.
#[derive(Clone, Copy, Debug)]
pub enum RopeSource<'a> {
    /// The caller's host table: the rows the call needs are uploaded with the call.
    Host(RopeTable<'a>),
    /// The table uploaded before with [`GpuLayer::upload_rope_table`].
    Uploaded,
}

/// A forward call whose activations live in device memory (for servers).
#[derive(Clone, Copy, Debug)]
pub struct DeviceCall<'a> {
    /// Device pointer to `x`, f32 `[batch, seq_len, n_embd]`.
    pub x: u64,
    /// Device pointer to the output `y`, f32 `[batch, seq_len, n_embd]`.
    pub y: u64,
    /// Batch rows.
    pub batch: usize,
    /// Tokens per row.
    pub seq_len: usize,
    /// Mask inputs (host memory).
    pub mask: MaskInputs<'a>,
    /// Rotary positions (host memory).
    pub position_ids: Option<&'a [i32]>,
    /// The rotary table, required when the layer is rotary.
    pub rope: Option<RopeSource<'a>>,
    /// The caller's `CUstream`, or null for the layer's own stream.
    pub stream: *mut c_void,
}

/// A layer on one GPU. This build has no CUDA: [`GpuLayer::new`] always fails.
pub struct GpuLayer<'a> {
    never: std::convert::Infallible,
    _layer: PhantomData<Layer<'a>>,
}

impl<'a> GpuLayer<'a> {
    /// Always [`Error::NoCuda`] in this build.
    ///
    /// # Errors
    /// Always.
    pub fn new(_layer: Layer<'a>, _opts: GpuOptions) -> Result<GpuLayer<'a>> {
        Err(Error::NoCuda)
    }

    /// The attention path (unreachable: no value of this type exists in this build).
    pub fn path(&self) -> AttnPath {
        match self.never {}
    }

    /// The layer this GPU layer was made from (unreachable in this build).
    pub fn layer(&self) -> &Layer<'a> {
        match self.never {}
    }

    /// Device memory allocated at set-up (unreachable in this build).
    pub fn device_bytes(&self) -> usize {
        match self.never {}
    }

    /// What ran (unreachable in this build).
    pub fn backend(&self) -> GpuBackend {
        match self.never {}
    }

    /// Uploads a rotary table (unreachable in this build).
    ///
    /// # Errors
    /// Never returns.
    pub fn upload_rope_table(&mut self, _table: &RopeTable<'_>) -> Result<()> {
        match self.never {}
    }

    /// Runs on host buffers (unreachable in this build).
    ///
    /// # Errors
    /// Never returns.
    pub fn forward_host(&mut self, _inputs: &Inputs<'_>, _out: &mut [f32]) -> Result<GpuBackend> {
        match self.never {}
    }

    /// Runs on device buffers (unreachable in this build).
    ///
    /// # Errors
    /// Never returns.
    ///
    /// # Safety
    /// As in the CUDA build: device pointers valid for the call.
    pub unsafe fn forward_device(&mut self, _call: &DeviceCall<'_>) -> Result<GpuBackend> {
        match self.never {}
    }

    /// Waits for the layer's stream (unreachable in this build).
    ///
    /// # Errors
    /// Never returns.
    pub fn synchronize(&self) -> Result<()> {
        match self.never {}
    }

    /// The layer's stream (unreachable in this build).
    pub fn stream(&self) -> *mut c_void {
        match self.never {}
    }
}

/// A KV cache in device memory. This build has no CUDA: [`GpuKvCache::new`] always fails.
pub struct GpuKvCache {
    never: std::convert::Infallible,
}

impl GpuKvCache {
    /// Always [`Error::NoCuda`] in this build.
    ///
    /// # Errors
    /// Always.
    pub fn new(
        _precision: Precision,
        _n_kv_head: usize,
        _head_dim: usize,
        _block_size: usize,
        _num_blocks: usize,
        _rolling: bool,
        _device: u32,
    ) -> Result<GpuKvCache> {
        Err(Error::NoCuda)
    }

    /// Storage precision (unreachable in this build).
    pub fn precision(&self) -> Precision {
        match self.never {}
    }

    /// Bytes of one pool (unreachable in this build).
    pub fn pool_bytes(&self) -> usize {
        match self.never {}
    }

    /// Copies the pools to the host (unreachable in this build).
    ///
    /// # Errors
    /// Never returns.
    pub fn read_f32(&self) -> Result<(Vec<f32>, Vec<f32>)> {
        match self.never {}
    }

    /// Overwrites the pools (unreachable in this build).
    ///
    /// # Errors
    /// Never returns.
    pub fn write_raw(&mut self, _k: &[u8], _v: &[u8]) -> Result<()> {
        match self.never {}
    }
}

impl GpuLayer<'_> {
    /// The cached forward (unreachable in this build).
    ///
    /// # Errors
    /// Never returns.
    pub fn forward_cached(
        &mut self,
        _x: &[f32],
        _seqs: &[Sequence<'_>],
        _rope_table: Option<RopeTable<'_>>,
        _cache: &mut GpuKvCache,
        _out: &mut [f32],
    ) -> Result<GpuBackend> {
        match self.never {}
    }

    /// The last cached call's shape (unreachable in this build).
    pub fn last_cached_shape(&self) -> Option<(usize, usize, usize)> {
        match self.never {}
    }

    /// Decode tuning hook (unreachable in this build).
    #[doc(hidden)]
    pub fn set_decode_tuning(&mut self, _tuning: crate::DecodeTuning) {
        match self.never {}
    }

    /// The last cached call's attention kernel (unreachable in this build).
    #[doc(hidden)]
    pub fn last_decode_kernel(&self) -> Option<String> {
        match self.never {}
    }
}

/// Per device, where a multi-GPU call's time went (benchmark diagnostics; never produced in
/// this build).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct DeviceTiming {
    /// Microseconds from the call's start on the host to the first enqueue on the device.
    pub enqueue_us: f64,
    /// Milliseconds from the device's first work to its output's collective.
    pub compute_ms: f32,
    /// Milliseconds of the device's collectives.
    pub nccl_ms: f32,
    /// Milliseconds of the all-to-all's copies into place.
    pub copy_ms: f32,
}

/// A KV cache split over several GPUs. This build has no CUDA: no value of it exists.
pub struct MultiGpuKvCache {
    never: std::convert::Infallible,
}

impl MultiGpuKvCache {
    /// Number of devices (unreachable).
    pub fn n_devices(&self) -> usize {
        match self.never {}
    }

    /// The unsplit cache's shape (unreachable).
    pub fn geometry(&self) -> KvGeometry {
        match self.never {}
    }

    /// Device `i`'s cache (unreachable).
    pub fn device(&self, _i: usize) -> Option<&GpuKvCache> {
        match self.never {}
    }

    /// Device `i`'s cache, mutable (unreachable).
    pub fn device_mut(&mut self, _i: usize) -> Option<&mut GpuKvCache> {
        match self.never {}
    }
}

/// A layer split by heads over several GPUs. This build has no CUDA: [`MultiGpuLayer::new`]
/// always fails.
pub struct MultiGpuLayer<'a> {
    never: std::convert::Infallible,
    _layer: PhantomData<Layer<'a>>,
}

impl<'a> MultiGpuLayer<'a> {
    /// Always [`Error::NoCuda`] in this build.
    ///
    /// # Errors
    /// Always.
    pub fn new(
        _layer: Layer<'a>,
        _devices: &[u32],
        _opts: GpuOptions,
    ) -> Result<MultiGpuLayer<'a>> {
        Err(Error::NoCuda)
    }

    /// The head split (unreachable: no value of this type exists in this build).
    pub fn plan(&self) -> &attnrt::ShardPlan {
        match self.never {}
    }

    /// The devices (unreachable).
    pub fn devices(&self) -> &[u32] {
        match self.never {}
    }

    /// The NCCL version (unreachable).
    pub fn nccl_version(&self) -> Option<i32> {
        match self.never {}
    }

    /// What ran (unreachable).
    pub fn backend(&self) -> GpuBackend {
        match self.never {}
    }

    /// Milliseconds in NCCL of the last call (unreachable).
    pub fn last_nccl_ms(&self) -> f32 {
        match self.never {}
    }

    /// Unreachable in this build.
    ///
    /// # Errors
    /// Never returns.
    pub fn forward_host(&mut self, _inputs: &Inputs<'_>, _out: &mut [f32]) -> Result<GpuBackend> {
        match self.never {}
    }

    /// Unreachable in this build.
    ///
    /// # Errors
    /// Never returns.
    pub fn forward_host_partials(
        &mut self,
        _inputs: &Inputs<'_>,
        _out: &mut [f32],
    ) -> Result<GpuBackend> {
        match self.never {}
    }

    /// Unreachable in this build.
    ///
    /// # Errors
    /// Never returns.
    #[doc(hidden)]
    pub fn stage_inputs(&mut self, _inputs: &Inputs<'_>) -> Result<()> {
        match self.never {}
    }

    /// Unreachable in this build.
    ///
    /// # Errors
    /// Never returns.
    #[doc(hidden)]
    pub fn forward_staged(&mut self, _inputs: &Inputs<'_>) -> Result<()> {
        match self.never {}
    }

    /// Unreachable in this build.
    #[doc(hidden)]
    pub fn last_call_timing(&self) -> &[DeviceTiming] {
        match self.never {}
    }

    /// Unreachable in this build.
    #[doc(hidden)]
    pub fn set_enqueue_by_stage(&mut self, _by_stage: bool) {
        match self.never {}
    }

    /// Unreachable in this build.
    ///
    /// # Errors
    /// Never returns.
    #[doc(hidden)]
    pub fn set_comm_priority(&mut self, _high: bool) -> Result<()> {
        match self.never {}
    }

    /// How the partial outputs are summed (unreachable).
    pub fn reduce_options(&self) -> ReduceOptions {
        match self.never {}
    }

    /// Unreachable in this build.
    ///
    /// # Errors
    /// Never returns.
    pub fn set_reduce(&mut self, _options: ReduceOptions) -> Result<()> {
        match self.never {}
    }

    /// Unreachable in this build.
    ///
    /// # Errors
    /// Never returns.
    pub fn new_kv_cache(
        &self,
        _block_size: usize,
        _num_blocks: usize,
        _rolling: bool,
    ) -> Result<MultiGpuKvCache> {
        match self.never {}
    }

    /// Unreachable in this build.
    ///
    /// # Errors
    /// Never returns.
    pub fn forward_cached(
        &mut self,
        _x: &[f32],
        _seqs: &[Sequence<'_>],
        _rope_table: Option<RopeTable<'_>>,
        _cache: &mut MultiGpuKvCache,
        _out: &mut [f32],
    ) -> Result<GpuBackend> {
        match self.never {}
    }

    /// Whether cached steps are captured as CUDA graphs (unreachable in this build).
    pub fn set_step_graphs(&mut self, _on: bool) {
        match self.never {}
    }

    /// Whether the metadata goes up by the copy engine (unreachable in this build).
    #[doc(hidden)]
    pub fn set_meta_upload_copy(&mut self, _copy: bool) {
        match self.never {}
    }

    /// Whether the devices after the first share device 0's staged step metadata
    /// (unreachable in this build).
    #[doc(hidden)]
    pub fn set_shared_metadata(&mut self, _on: bool) {
        match self.never {}
    }

    /// Whether small exact sums go through peer memory (unreachable in this build).
    pub fn set_peer_sum(&mut self, _on: bool) -> bool {
        match self.never {}
    }

    /// Whether replayed cached steps record their device span (unreachable in this build).
    #[doc(hidden)]
    pub fn set_step_timing(&mut self, _on: bool) {
        match self.never {}
    }

    /// The graphs of the captured cached step (unreachable in this build).
    #[doc(hidden)]
    pub fn step_graph_count(&self) -> usize {
        match self.never {}
    }

    /// How a step over several devices is captured (unreachable in this build).
    #[doc(hidden)]
    pub fn set_step_graph_layout(&mut self, _layout: crate::StepGraphLayout) {
        match self.never {}
    }

    /// How the replayed step was captured (unreachable in this build).
    #[doc(hidden)]
    pub fn step_graph_layout(&self) -> crate::StepGraphLayout {
        match self.never {}
    }

    /// Why the last capture of a cached step failed (unreachable in this build).
    pub fn step_graph_error(&self) -> Option<&str> {
        match self.never {}
    }

    /// Unreachable in this build.
    ///
    /// # Errors
    /// Never returns.
    ///
    /// # Safety
    /// Unreachable.
    pub unsafe fn forward_cached_device(
        &mut self,
        _call: &CachedDeviceCall<'_>,
        _cache: &mut MultiGpuKvCache,
    ) -> Result<GpuBackend> {
        match self.never {}
    }

    /// Unreachable in this build.
    ///
    /// # Errors
    /// Never returns.
    ///
    /// # Safety
    /// Never returns.
    #[doc(hidden)]
    pub unsafe fn time_decode_ms(&mut self, _device: usize, _iters: usize) -> Result<f32> {
        match self.never {}
    }
}

/// A device-resident cached call on several devices (see the CUDA build).
#[derive(Clone, Copy, Debug)]
pub struct CachedDeviceCall<'a> {
    /// Device `i`'s copy of the new tokens' rows.
    pub x: &'a [u64],
    /// `x` is in the layer's storage type instead of f32.
    pub x_storage: bool,
    /// Device `i`'s f32 buffer for the whole summed output.
    pub out: &'a [u64],
    /// The sequences and their block tables (host memory).
    pub seqs: &'a [Sequence<'a>],
    /// The rotary table (host memory).
    pub rope_table: Option<RopeTable<'a>>,
}

/// A sequence-parallel call on device buffers (see the CUDA build).
#[derive(Clone, Copy, Debug)]
pub struct SeqParallelCall<'a> {
    /// Per rank, a device pointer to its rows of `x`.
    pub x_parts: &'a [u64],
    /// Per rank, a device pointer to room for its rows of the output.
    pub y_parts: &'a [u64],
    /// Batch rows of the whole call.
    pub batch: usize,
    /// Tokens per row of the whole call.
    pub seq_len: usize,
    /// Mask inputs of the whole call (host memory).
    pub mask: MaskInputs<'a>,
    /// Rotary positions of the whole call (host memory).
    pub position_ids: Option<&'a [i32]>,
    /// The caller's cos/sin table.
    pub rope_table: Option<RopeTable<'a>>,
}

impl MultiGpuLayer<'_> {
    /// A rank's rows of a sequence-parallel call (unreachable in this build).
    ///
    /// # Errors
    /// Never returns.
    pub fn token_range(
        &self,
        _rank: usize,
        _batch: usize,
        _seq_len: usize,
    ) -> Result<std::ops::Range<usize>> {
        match self.never {}
    }

    /// Unreachable in this build.
    ///
    /// # Errors
    /// Never returns.
    pub fn forward_seq_host(
        &mut self,
        _inputs: &Inputs<'_>,
        _out: &mut [f32],
    ) -> Result<GpuBackend> {
        match self.never {}
    }

    /// Unreachable in this build.
    ///
    /// # Errors
    /// Never returns.
    ///
    /// # Safety
    /// As in the CUDA build: device pointers valid for the call.
    pub unsafe fn forward_seq_device(&mut self, _call: &SeqParallelCall<'_>) -> Result<GpuBackend> {
        match self.never {}
    }
}
