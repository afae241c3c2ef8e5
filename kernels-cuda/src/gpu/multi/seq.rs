//! Sequence-parallel inputs and outputs of the head split: the call's tokens (`batch *
//! seq_len`, flattened in row-major order) are cut among the devices by
//! [`ShardPlan::token_range`](attnrt::ShardPlan::token_range) (contiguous ranges in rank order, the first `tokens mod N` ranks
//! taking one more), the rule of the runtime's CPU executor
//! (`ShardedLayer::forward_cpu_seq_parallel`). Device `i` holds only its rows of `x` and ends
//! with only its rows of `y`:
//!
//! 1. gather: every device receives every rank's rows into its `x` buffer (NCCL all-gather;
//!    grouped broadcasts when the shares are unequal);
//! 2. each device runs its heads over the whole call, as in [`MultiGpuLayer::forward_host`]
//!    (with full QK-norm, the per-token statistics are all-reduced between the projections
//!    and the norm pass, as there);
//! 3. reduce-scatter: the partial outputs are summed and each device keeps the sum of its own
//!    rows (NCCL reduce-scatter; grouped reduces when the shares are unequal).
//!
//! The attention of a token needs the keys of every earlier token, so the whole sequence is
//! gathered before the projections: the saving is in what each device holds between layers
//! (`T / N` rows of activations instead of `T`) and in the reduce-scatter moving `1/N` of an
//! all-reduce's output to each device.

use std::ffi::c_void;
use std::ops::Range;

use attnrt::{Inputs, MaskInputs, RopeTable};
use cust::sys as cu;

use super::super::{drv, h2d, ptr, Front, RopeSource};
use super::MultiGpuLayer;
use crate::error::Result;
use crate::plan::GpuBackend;

/// A sequence-parallel call whose activations live in device memory: rank `i`'s rows of `x`
/// and `y` on its device (`devices()[i]`), mask inputs and positions on the host describing the
/// whole call.
#[derive(Clone, Copy, Debug)]
pub struct SeqParallelCall<'a> {
    /// Per rank, a device pointer (of that rank's device) to its rows of `x`: f32
    /// `[rows_i, n_embd]`, `rows_i` = the length of [`MultiGpuLayer::token_range`].
    pub x_parts: &'a [u64],
    /// Per rank, a device pointer to room for its rows of the output, f32 `[rows_i, n_embd]`.
    pub y_parts: &'a [u64],
    /// Batch rows of the whole call.
    pub batch: usize,
    /// Tokens per row of the whole call.
    pub seq_len: usize,
    /// Mask inputs of the whole call (host memory).
    pub mask: MaskInputs<'a>,
    /// Rotary positions of the whole call (host memory), as in [`Inputs::position_ids`].
    pub position_ids: Option<&'a [i32]>,
    /// The caller's cos/sin table, required when the layer is rotary.
    pub rope_table: Option<RopeTable<'a>>,
}

/// Where the rows of each rank come from and go to.
enum Parts<'p> {
    /// `x` rows are uploaded into each device's own `x` buffer at their offset, and the
    /// output rows are downloaded from each device's `y` buffer at their offset.
    Host(&'p [f32], &'p mut [f32]),
    /// The caller's device buffers, per rank.
    Device(&'p [u64], &'p [u64]),
}

impl MultiGpuLayer<'_> {
    /// Rank `rank`'s rows (flattened token indices) of a sequence-parallel call of `batch`
    /// rows of `seq_len` tokens.
    ///
    /// # Errors
    /// [`Error::Runtime`](crate::Error::Runtime) when `rank` is not below the number of devices, or the token count
    /// overflows.
    pub fn token_range(&self, rank: usize, batch: usize, seq_len: usize) -> Result<Range<usize>> {
        let tokens = batch
            .checked_mul(seq_len)
            .ok_or(attnrt::Error::InputValue {
                name: "seq_len",
                index: 0,
                value: seq_len as i64,
                rule: "batch * seq_len overflows",
            })?;
        Ok(self.plan.token_range(rank, tokens)?)
    }

    /// Sequence-parallel forward on host buffers: device `i` receives only its rows of
    /// `inputs.x` ([`MultiGpuLayer::token_range`]), the rows are gathered across the devices,
    /// every device runs its heads, the partial outputs are reduce-scattered, and device `i`'s
    /// rows of the layer's output are copied into the same rows of `out` (`batch * seq_len *
    /// n_embd` values). The result is the layer's output, as [`MultiGpuLayer::forward_host`]
    /// gives (the sums may round differently).
    ///
    /// # Errors
    /// As [`MultiGpuLayer::forward_host`]. `out` is untouched on error, except after a failure
    /// of a device or of NCCL mid-call.
    pub fn forward_seq_host(&mut self, inputs: &Inputs<'_>, out: &mut [f32]) -> Result<GpuBackend> {
        self.layer.validate_inputs(inputs, out.len())?;
        let rope = inputs.rope_table;
        self.seq_parallel(
            inputs.batch,
            inputs.seq_len,
            &inputs.mask,
            inputs.position_ids,
            rope,
            Parts::Host(inputs.x, out),
        )
    }

    /// Sequence-parallel forward on device buffers ([`SeqParallelCall`]): gather, every
    /// device's heads, reduce-scatter, as [`MultiGpuLayer::forward_seq_host`], on the layer's
    /// own streams. Returns once every device has finished: the `y` parts are then written.
    ///
    /// # Errors
    /// The runtime's validation errors for the call's shapes and metadata;
    /// [`attnrt::Error::InputShape`] naming `x parts` / `y parts` when there is not one
    /// pointer per device; [`attnrt::Error::InputValue`] naming `x parts` / `y parts` for a
    /// null pointer; [`Error::Capacity`](crate::Error::Capacity); a failed CUDA, cuBLAS or NCCL call. Nothing is
    /// enqueued on an argument error.
    ///
    /// # Safety
    /// `x_parts[i]` and `y_parts[i]` are device pointers valid on `devices()[i]` with room for
    /// that rank's rows (`rows_i * n_embd` f32), the `x` parts fully written by work that has
    /// finished, no `y` part overlapping an `x` part or another `y` part, and none of them used
    /// by other work until this call returns.
    pub unsafe fn forward_seq_device(&mut self, call: &SeqParallelCall<'_>) -> Result<GpuBackend> {
        let n = self.gpus.len();
        for (name, parts) in [("x parts", call.x_parts), ("y parts", call.y_parts)] {
            if parts.len() != n {
                return Err(attnrt::Error::InputShape {
                    name,
                    expected: n,
                    actual: parts.len(),
                }
                .into());
            }
            if let Some(i) = parts.iter().position(|&p| p == 0) {
                return Err(attnrt::Error::InputValue {
                    name,
                    index: i,
                    value: 0,
                    rule: "a device pointer must not be null",
                }
                .into());
            }
        }
        let table = call.rope_table.map(|t| (t.half_dim(), t.max_pos()));
        self.layer.validate_metadata(
            call.batch,
            call.seq_len,
            &call.mask,
            call.position_ids,
            table,
        )?;
        self.seq_parallel(
            call.batch,
            call.seq_len,
            &call.mask,
            call.position_ids,
            call.rope_table,
            Parts::Device(call.x_parts, call.y_parts),
        )
    }

    /// The validated call: capacity, uploads (host parts), gather, every shard, reduce-scatter,
    /// downloads (host parts), and a wait for every device.
    fn seq_parallel(
        &mut self,
        batch: usize,
        seq_len: usize,
        mask: &MaskInputs<'_>,
        position_ids: Option<&[i32]>,
        rope_table: Option<RopeTable<'_>>,
        parts: Parts<'_>,
    ) -> Result<GpuBackend> {
        for g in &self.gpus {
            g.check_capacity(batch, seq_len)?;
        }
        let tokens = batch * seq_len;
        if tokens == 0 {
            return Ok(self.backend());
        }
        let c = self.layer.config().n_embd;
        let shares: Vec<(usize, usize)> = (0..self.gpus.len())
            .map(|i| {
                let r = self.plan.token_range(i, tokens)?;
                Ok((r.start * c, r.len() * c))
            })
            .collect::<Result<_>>()?;
        let streams: Vec<*mut c_void> = self.gpus.iter().map(|g| g.stream.cast()).collect();
        let xs: Vec<u64> = self.gpus.iter().map(|g| ptr(&g.x)).collect();
        let ys: Vec<u64> = self.gpus.iter().map(|g| ptr(&g.y)).collect();
        let at = |base: u64, elems: usize| base + (elems * std::mem::size_of::<f32>()) as u64;

        // Where each rank's x rows start and where its y rows go.
        let (x_send, y_recv): (Vec<u64>, Vec<u64>) = match &parts {
            Parts::Host(x, _) => {
                for ((g, &(off, len)), &xb) in self.gpus.iter().zip(&shares).zip(&xs) {
                    g.set_current()?;
                    // SAFETY: `x` holds max_batch * max_seq_len * n_embd f32 and the call fits
                    // (checked); the source rows lie inside the validated `x`.
                    unsafe { h2d(at(xb, off), &x[off..off + len], g.stream)? };
                }
                // In place: each rank's rows already sit at their offset in its buffers.
                (
                    xs.iter().zip(&shares).map(|(&b, s)| at(b, s.0)).collect(),
                    ys.iter().zip(&shares).map(|(&b, s)| at(b, s.0)).collect(),
                )
            }
            Parts::Device(x_parts, y_parts) => (x_parts.to_vec(), y_parts.to_vec()),
        };

        match self.comms.as_mut() {
            // SAFETY: each `x_send[i]` holds rank i's rows on device i (uploaded above, or the
            // caller's part by `forward_seq_device`'s contract) and each `xs[i]` the whole call
            // (capacity checked); the streams are the devices' live streams.
            Some(comms) => unsafe { comms.gather(&x_send, &xs, &streams, &shares)? },
            None => {
                if x_send[0] != xs[0] {
                    let g = &self.gpus[0];
                    g.set_current()?;
                    // SAFETY: as above, one device: the caller's rows into the layer's `x`.
                    drv("cuMemcpyDtoDAsync", unsafe {
                        cu::cuMemcpyDtoDAsync_v2(
                            xs[0],
                            x_send[0],
                            shares[0].1 * std::mem::size_of::<f32>(),
                            g.stream,
                        )
                    })?;
                }
            }
        }

        // Every shard over the whole call, as `launch` + the output projection do for the
        // head split: projections, the full-QK-norm statistics' sum (if any), attention, and
        // each device's partial output in its `y`.
        self.timed = 0;
        let rope = rope_table.map(RopeSource::Host);
        let mut fronts: Vec<Front> = Vec::with_capacity(self.gpus.len());
        for g in &mut self.gpus {
            g.set_current()?;
            let (x, stream) = (ptr(&g.x), g.stream);
            // SAFETY: `x` is this layer's buffer, sized for the validated call, holding the
            // gathered rows once the stream reaches this work.
            fronts
                .push(unsafe { g.run_front(x, batch, seq_len, mask, position_ids, rope, stream)? });
        }
        self.reduce_norm(tokens)?;
        for (g, f) in self.gpus.iter_mut().zip(&fronts) {
            g.set_current()?;
            let (y, s) = (ptr(&g.y), g.stream);
            // SAFETY: `f` is this layer's front, enqueued above on the same stream; `y` holds
            // max tokens * n_embd f32.
            unsafe {
                g.run_attention(f, s)?;
                g.project_out(y, tokens, s)?;
            }
        }

        match self.comms.as_mut() {
            // SAFETY: each `ys[i]` holds device i's partial output of the whole call, each
            // `y_recv[i]` room for rank i's rows (its offset in `ys[i]`, or the caller's part).
            Some(comms) => unsafe { comms.reduce_scatter_sum(&ys, &y_recv, &streams, &shares)? },
            None => {
                if y_recv[0] != ys[0] {
                    let g = &self.gpus[0];
                    g.set_current()?;
                    // SAFETY: one device: the layer's output into the caller's part.
                    drv("cuMemcpyDtoDAsync", unsafe {
                        cu::cuMemcpyDtoDAsync_v2(
                            y_recv[0],
                            ys[0],
                            shares[0].1 * std::mem::size_of::<f32>(),
                            g.stream,
                        )
                    })?;
                }
            }
        }

        if let Parts::Host(_, out) = parts {
            for ((g, &(off, len)), &src) in self.gpus.iter().zip(&shares).zip(&y_recv) {
                if len == 0 {
                    continue;
                }
                g.set_current()?;
                let dst = &mut out[off..off + len];
                // SAFETY: `src` holds this rank's `len` reduced values once the stream reaches
                // the copy; `dst` is a live exclusive host slice of that size, read only after
                // `finish` synchronises every stream.
                drv("cuMemcpyDtoHAsync", unsafe {
                    cu::cuMemcpyDtoHAsync_v2(
                        dst.as_mut_ptr().cast(),
                        src,
                        len * std::mem::size_of::<f32>(),
                        g.stream,
                    )
                })?;
            }
        }
        self.finish(false, false)?;
        Ok(self.backend())
    }
}
