//! Head split across the GPUs of one host (tensor parallel): one [`GpuLayer`] per device for
//! its [`ShardPlan`] shard, partial outputs summed with an NCCL all-reduce.

use std::ffi::c_void;

use attnrt::{Inputs, Layer, ShardLayer, ShardPlan, Tensor};
use cust::sys as cu;
use half::{bf16, f16};

use super::{drv, h2d, ptr, GpuLayer, RopeSource};
use crate::error::{Error, Result};
use crate::nccl::{self, Comms};
use crate::plan::{GpuBackend, GpuOptions};

mod seq;
pub use seq::SeqParallelCall;

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

/// A layer split by heads over several GPUs of this process ([`ShardPlan`]): device `i` runs
/// shard `i` on its own context and stream, and the partial outputs (each device's heads
/// through its `wo` columns; the output bias on device 0 only) are summed with an in-place
/// NCCL all-reduce, so device 0 then holds the layer's output.
///
/// Full QK-norm with more than one device (its statistics span every device's heads) is not
/// supported yet: [`MultiGpuLayer::new`] returns [`Error::Unsupported`] for it.
pub struct MultiGpuLayer<'a> {
    layer: Layer<'a>,
    plan: ShardPlan,
    devices: Vec<u32>,
    // Declared before `_wo` so that they are dropped first: their layers borrow `_wo`.
    gpus: Vec<GpuLayer<'a>>,
    comms: Option<Comms>,
    events: Vec<(cu::CUevent, cu::CUevent)>,
    nccl_ms: f32,
    _wo: Vec<WoBlock>,
}

// SAFETY: the raw events are only used through `&mut self` (or `&self` for reads of finished
// events); every other field is Send.
unsafe impl Send for MultiGpuLayer<'_> {}

impl Drop for MultiGpuLayer<'_> {
    fn drop(&mut self) {
        for (gpu, &(a, b)) in self.gpus.iter().zip(&self.events) {
            let _ = gpu.set_current();
            // SAFETY: the events were created in this device's context and are destroyed once;
            // the stream is synchronised first so no pending record uses them.
            unsafe {
                cu::cuStreamSynchronize(gpu.stream);
                cu::cuEventDestroy_v2(a);
                cu::cuEventDestroy_v2(b);
            }
        }
    }
}

impl<'a> MultiGpuLayer<'a> {
    /// Splits `layer` over `devices` (CUDA ordinals, rank `i` on `devices[i]`, each at most
    /// once): plans the heads, copies each device's `wo` columns once on the host, sets up one
    /// [`GpuLayer`] per device with `opts` (its `device` field is ignored) and the NCCL
    /// communicators (none for one device).
    ///
    /// # Errors
    /// An invalid plan (more devices than query heads, no device), a repeated device, full
    /// QK-norm on more than one device ([`Error::Unsupported`]), and any error of
    /// [`GpuLayer::new`] or of NCCL's set-up.
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
        if plan.needs_norm_reduction() {
            return Err(Error::Unsupported(
                "full QK-norm across several GPUs (all-reduce of the norm statistics) is not \
                 implemented yet; use per-head QK-norm or one GPU"
                    .into(),
            ));
        }
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
            gpus.push(GpuLayer::new(
                *shard.layer(),
                GpuOptions {
                    device: dev,
                    ..opts
                },
            )?);
        }
        let comms = if devices.len() > 1 {
            let c = Comms::new(devices)?;
            Some(c)
        } else {
            None
        };
        let mut events = Vec::with_capacity(gpus.len());
        for g in &gpus {
            g.set_current()?;
            let (mut a, mut b): (cu::CUevent, cu::CUevent) =
                (std::ptr::null_mut(), std::ptr::null_mut());
            // SAFETY: valid out-pointers; the device's context is current; destroyed in Drop.
            unsafe {
                drv("cuEventCreate", cu::cuEventCreate(&mut a, 0))?;
                drv("cuEventCreate", cu::cuEventCreate(&mut b, 0))?;
            }
            events.push((a, b));
        }
        Ok(MultiGpuLayer {
            layer,
            plan,
            devices: devices.to_vec(),
            gpus,
            comms,
            events,
            nccl_ms: 0.0,
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

    /// Milliseconds the last reduced call spent in the NCCL all-reduce (CUDA events around it
    /// on each device's stream; the largest over the devices), 0 on one device.
    pub fn last_nccl_ms(&self) -> f32 {
        self.nccl_ms
    }

    /// Validates the call against the unsplit layer, uploads `x` to every device and enqueues
    /// every shard on its stream (partial outputs in each layer's `y`).
    fn launch(&mut self, inputs: &Inputs<'_>, out_len: usize, upload: bool) -> Result<()> {
        self.layer.validate_inputs(inputs, out_len)?;
        for g in &self.gpus {
            g.check_capacity(inputs.batch, inputs.seq_len)?;
        }
        let rope = inputs.rope_table.map(RopeSource::Host);
        for g in &mut self.gpus {
            g.set_current()?;
            let (x, y, stream) = (ptr(&g.x), ptr(&g.y), g.stream);
            if upload {
                // SAFETY: `x` holds max_batch * max_seq_len * n_embd f32 and the call fits
                // (checked); `inputs.x` has batch * seq_len * n_embd values (validated).
                unsafe { h2d(x, inputs.x, stream)? };
            }
            // SAFETY: x and y are this layer's buffers, sized for the validated call.
            unsafe {
                g.run(
                    x,
                    y,
                    inputs.batch,
                    inputs.seq_len,
                    &inputs.mask,
                    inputs.position_ids,
                    rope,
                    stream,
                )?
            };
        }
        Ok(())
    }

    /// Sums the partial outputs on every device (in place, NCCL), timing it with events.
    fn reduce(&mut self, count: usize) -> Result<()> {
        let Some(comms) = self.comms.as_mut() else {
            self.nccl_ms = 0.0;
            return Ok(());
        };
        let bufs: Vec<u64> = self.gpus.iter().map(|g| ptr(&g.y)).collect();
        let streams: Vec<*mut c_void> = self.gpus.iter().map(|g| g.stream.cast()).collect();
        for (g, &(a, _)) in self.gpus.iter().zip(&self.events) {
            g.set_current()?;
            // SAFETY: event and stream of the current context.
            drv("cuEventRecord", unsafe { cu::cuEventRecord(a, g.stream) })?;
        }
        // SAFETY: each buffer is its device's `y` with room for `count` f32 (the validated
        // call), each stream is that device's live stream.
        unsafe { comms.all_reduce_sum(&bufs, &streams, count)? };
        for (g, &(_, b)) in self.gpus.iter().zip(&self.events) {
            g.set_current()?;
            // SAFETY: event and stream of the current context.
            drv("cuEventRecord", unsafe { cu::cuEventRecord(b, g.stream) })?;
        }
        Ok(())
    }

    /// Waits for every device and reads the NCCL times of the last reduction.
    fn finish(&mut self, reduced: bool) -> Result<()> {
        let mut worst = 0.0f32;
        for (g, &(a, b)) in self.gpus.iter().zip(&self.events) {
            g.synchronize()?;
            if reduced && self.comms.is_some() {
                let mut ms = 0.0f32;
                // SAFETY: both events were recorded on this finished stream.
                drv("cuEventElapsedTime", unsafe {
                    cu::cuEventElapsedTime(&mut ms, a, b)
                })?;
                worst = worst.max(ms);
            }
        }
        if reduced {
            self.nccl_ms = worst;
        }
        Ok(())
    }

    /// Runs the layer on host buffers: `x` to every device, each shard on its device, the
    /// partial outputs summed with NCCL, device 0's sum into `out`.
    ///
    /// # Errors
    /// The runtime's validation errors ([`Error::Runtime`]), [`Error::Capacity`], or a failed
    /// CUDA / cuBLAS / NCCL call. `out` is untouched on error.
    pub fn forward_host(&mut self, inputs: &Inputs<'_>, out: &mut [f32]) -> Result<GpuBackend> {
        if out.is_empty() {
            self.layer.validate_inputs(inputs, 0)?;
            return Ok(self.backend());
        }
        self.launch(inputs, out.len(), true)?;
        self.reduce(out.len())?;
        let g = &self.gpus[0];
        g.set_current()?;
        let bytes = std::mem::size_of_val(out);
        // SAFETY: device 0's `y` holds the call's `bytes` bytes; `out` is a live exclusive host
        // slice of that size; the stream is synchronised (in `finish`) before `out` is read.
        drv("cuMemcpyDtoHAsync", unsafe {
            cu::cuMemcpyDtoHAsync_v2(out.as_mut_ptr().cast(), ptr(&g.y), bytes, g.stream)
        })?;
        self.finish(true)?;
        Ok(self.backend())
    }

    /// The "partials" mode, for callers that reduce themselves: runs every shard as
    /// [`MultiGpuLayer::forward_host`] does but without the all-reduce, and writes device
    /// `i`'s partial output to `out[i * len..(i + 1) * len]` (`len = batch * seq_len *
    /// n_embd`). Their sum is the layer's output (the output bias is in device 0's part).
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
        for (g, part) in self.gpus.iter().zip(out.chunks_exact_mut(len)) {
            g.set_current()?;
            let bytes = std::mem::size_of_val(part);
            // SAFETY: this device's `y` holds `bytes` bytes of the call; `part` is a live
            // exclusive host slice of that size, read only after `finish` synchronises.
            drv("cuMemcpyDtoHAsync", unsafe {
                cu::cuMemcpyDtoHAsync_v2(part.as_mut_ptr().cast(), ptr(&g.y), bytes, g.stream)
            })?;
        }
        self.finish(false)?;
        Ok(self.backend())
    }

    /// Benchmark helper: uploads `x` once to every device.
    ///
    /// # Errors
    /// As [`MultiGpuLayer::forward_host`].
    #[doc(hidden)]
    pub fn stage_inputs(&mut self, inputs: &Inputs<'_>) -> Result<()> {
        let len = inputs.x.len();
        self.layer.validate_inputs(inputs, len)?;
        for g in &self.gpus {
            g.check_capacity(inputs.batch, inputs.seq_len)?;
            g.set_current()?;
            // SAFETY: as in `launch`.
            unsafe { h2d(ptr(&g.x), inputs.x, g.stream)? };
        }
        self.finish(false)
    }

    /// Benchmark helper: one reduced forward on the inputs already on the devices
    /// ([`MultiGpuLayer::stage_inputs`]; mask and positions from `inputs`), waiting for every
    /// device; the result stays on device 0.
    ///
    /// # Errors
    /// As [`MultiGpuLayer::forward_host`].
    #[doc(hidden)]
    pub fn forward_staged(&mut self, inputs: &Inputs<'_>) -> Result<()> {
        let len = inputs.x.len();
        self.launch(inputs, len, false)?;
        self.reduce(len)?;
        self.finish(true)
    }
}
