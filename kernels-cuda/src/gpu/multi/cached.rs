//! The cached calls of a head split (prefill, chunked prefill and decode against a
//! [`MultiGpuKvCache`]): validation against the unsplit layer, every device's plan (device
//! 0's staged metadata shared when the plans agree), and the step captured as CUDA graphs and
//! replayed: a graph per device ending in the peer-memory sum, or one graph over every device
//! for steps with NCCL collectives.

use std::time::Instant;

use attnrt::{RopeTable, Sequence};
use cust::sys as cu;

use super::super::decode::{CachedFront, CachedX};
use super::super::graph::{self, Exec, StepGraphs};
use super::super::staging::Pinned;
use super::super::{drv, DeviceX};
use super::{extend, record, CachedDeviceCall, MultiGpuKvCache, MultiGpuLayer, StepOut, StepX};
use crate::error::{Error, Result};
use crate::plan::{GpuBackend, StepGraphLayout};

impl<'a> MultiGpuLayer<'a> {
    /// Runs the layer on new tokens of one or more sequences against `cache`, appending their
    /// keys and values on every device: prefill (`cached = 0`), chunked prefill or decode, as
    /// [`GpuLayer::forward_cached`](crate::GpuLayer::forward_cached) on one GPU (same
    /// arguments, validated against the unsplit layer and the unsplit cache shape, same
    /// errors). Each device runs its shard on its cache; the partial outputs are summed as in
    /// [`MultiGpuLayer::forward_host`] and copied into `out` (through a page-locked staging
    /// buffer, as is `x`).
    ///
    /// # Errors
    /// The runtime's errors for invalid calls, a cache made for another split (device count,
    /// heads, devices or precision), more new tokens than the set-up maxima, a failed CUDA /
    /// cuBLAS / NCCL call. On error `out` and the cache are untouched.
    pub fn forward_cached(
        &mut self,
        x: &[f32],
        seqs: &[Sequence<'_>],
        rope_table: Option<RopeTable<'_>>,
        cache: &mut MultiGpuKvCache,
        out: &mut [f32],
    ) -> Result<GpuBackend> {
        self.cached_step(StepX::Host(x), seqs, rope_table, cache, StepOut::Host(out))
    }

    /// [`MultiGpuLayer::forward_cached`] on activations that live on the devices, for a
    /// tensor-parallel server that keeps the hidden state on every GPU between layers: every
    /// device reads the new tokens' rows from `call.x[i]` and receives the whole summed
    /// output in `call.out[i]`. Nothing crosses the host but the call's metadata, and the
    /// step is replayed as a CUDA graph while its shape and buffers stay
    /// ([`MultiGpuLayer::set_step_graphs`]). Returns when every device has finished.
    ///
    /// The reduction must be an all-reduce (f32,
    /// [`ReduceOptions::EXACT`](crate::ReduceOptions::EXACT), or in the storage type): the
    /// reduce-scatter and the all-to-all leave each device only a part.
    ///
    /// # Errors
    /// As [`MultiGpuLayer::forward_cached`]; a pointer count other than the device count, a
    /// null pointer, or a reduce-scatter / all-to-all reduction. On error nothing is written.
    ///
    /// # Safety
    /// `call.x[i]` and `call.out[i]` are device allocations valid on device `i` (its primary
    /// context) with room for `tokens * n_embd` elements (of the storage type for `x` with
    /// `x_storage`, f32 otherwise); `x` fully written by work that finished before the call;
    /// `out` not overlapping `x` nor used by other work until the call returns.
    pub unsafe fn forward_cached_device(
        &mut self,
        call: &CachedDeviceCall<'_>,
        cache: &mut MultiGpuKvCache,
    ) -> Result<GpuBackend> {
        let n = self.gpus.len();
        for (name, ptrs) in [("x", call.x), ("out", call.out)] {
            if ptrs.len() != n {
                return Err(attnrt::Error::InputShape {
                    name,
                    expected: n,
                    actual: ptrs.len(),
                }
                .into());
            }
            if let Some(i) = ptrs.iter().position(|&p| p == 0) {
                return Err(Error::Unsupported(format!(
                    "{name}[{i}] is a null device pointer"
                )));
            }
        }
        if n > 1 && (self.reduce.scatter || self.reduce.all_to_all) {
            return Err(Error::Unsupported(
                "a device-resident cached call needs an all-reduce (every device receives the \
                 whole output); set_reduce(ReduceOptions::EXACT) or a storage-type all-reduce"
                    .into(),
            ));
        }
        self.cached_step(
            StepX::Device(call.x, call.x_storage),
            call.seqs,
            call.rope_table,
            cache,
            StepOut::Device(call.out),
        )
    }

    /// A cached call, from `x` to `out` (host or device memory).
    fn cached_step(
        &mut self,
        x: StepX<'_>,
        seqs: &[Sequence<'_>],
        rope_table: Option<RopeTable<'_>>,
        cache: &mut MultiGpuKvCache,
        out: StepOut<'_>,
    ) -> Result<GpuBackend> {
        let t0 = Instant::now();
        let mut phases = [0.0f64; 4];
        let mut lap = |i: usize| phases[i] = t0.elapsed().as_secs_f64() * 1e6;
        let geometry = cache.geometry;
        let c = self.layer.config().n_embd;
        // Device buffers count as an `x` (and an `out`) of exactly the call's size.
        let call_len = seqs
            .iter()
            .try_fold(0usize, |a, s| a.checked_add(s.new_tokens))
            .and_then(|t| t.checked_mul(c))
            .unwrap_or(usize::MAX);
        let x_len = match x {
            StepX::Host(x) => x.len(),
            StepX::Device(..) => call_len,
        };
        let out_len = match &out {
            StepOut::Host(o) => o.len(),
            StepOut::Device(_) => call_len,
        };
        let tokens = self.marks.validate(
            &self.layer,
            x_len,
            out_len,
            seqs,
            rope_table.as_ref(),
            &geometry,
        )?;
        if cache.caches.len() != self.gpus.len() {
            return Err(attnrt::Error::InputShape {
                name: "kv cache devices",
                expected: self.gpus.len(),
                actual: cache.caches.len(),
            }
            .into());
        }
        if tokens == 0 {
            return Ok(self.backend());
        }
        self.timed = 0;
        let host_x = match x {
            StepX::Host(x) => Some(x),
            StepX::Device(..) => None,
        };
        let (host_out, device_out) = match out {
            StepOut::Host(o) => (Some(o), None),
            StepOut::Device(o) => (None, Some(o)),
        };
        for (slot, len) in [
            (&mut self.pinned, host_x.map_or(0, <[f32]>::len)),
            (
                &mut self.pinned_out,
                host_out.as_ref().map_or(0, |o| o.len()),
            ),
        ] {
            if len > 0 && slot.as_ref().is_none_or(|p| p.len() < len * 4) {
                self.gpus[0].set_current()?;
                *slot = None;
                *slot = Some(Pinned::new(len.next_power_of_two() * 4)?);
            }
        }
        let staged: Option<&[f32]> = match (host_x, self.pinned.as_mut()) {
            (Some(x), Some(p)) => {
                let staged = p.f32_mut(x.len());
                staged.copy_from_slice(x);
                // SAFETY: the staging buffer is neither freed nor rewritten during the call
                // (only a later call, after this one synchronised, rewrites or regrows it).
                Some(unsafe { extend(staged) })
            }
            (Some(_), None) => return Err(Error::Unsupported("no staging buffer".into())),
            (None, _) => None,
        };
        let rows: Vec<CachedX<'_>> = (0..self.gpus.len())
            .map(|i| match (staged, x) {
                (Some(x), _) => CachedX::Host(x),
                (None, StepX::Device(ptrs, true)) => {
                    CachedX::Device(DeviceX::Storage(ptrs[i]), x_len)
                }
                (None, StepX::Device(ptrs, false)) => CachedX::Device(DeviceX::F32(ptrs[i]), x_len),
                (None, StepX::Host(_)) => unreachable!("host rows are staged"),
            })
            .collect();
        let download = match (host_out.is_some(), self.pinned_out.as_mut()) {
            (true, Some(p)) => Some(p.f32_mut(out_len).as_mut_ptr()),
            (true, None) => return Err(Error::Unsupported("no staging buffer".into())),
            (false, _) => None,
        };
        lap(0);
        // Every device's plan before anything is enqueued: a device that refuses the call (a
        // cache of another split) leaves every cache and `out` untouched.
        let mut fronts: Vec<CachedFront> = Vec::with_capacity(self.gpus.len());
        let (lead, others) = self.gpus.split_at_mut(1);
        let lead = &mut lead[0];
        let planned = lead.cached_plan(
            x_len,
            out_len,
            seqs,
            rope_table,
            &cache.caches[0],
            Some(tokens),
        );
        fronts.extend(planned?);
        for (g, c) in others.iter_mut().zip(&cache.caches[1..]) {
            let planned = match (fronts.first(), self.share_meta) {
                // The devices of an even split plan the same metadata: it is packed once.
                (Some(f0), true) => {
                    g.cached_plan_shared(lead, f0, x_len, out_len, seqs, rope_table, c, tokens)
                }
                _ => g.cached_plan(x_len, out_len, seqs, rope_table, c, Some(tokens)),
            };
            fronts.extend(planned?);
        }
        if fronts.len() != self.gpus.len() {
            return Err(Error::Unsupported("a device saw no new tokens".into()));
        }
        lap(1);
        let graphed = if self.step_graphs_on {
            let output = (download, device_out.unwrap_or(&[]));
            let key = self.step_key(&fronts, &rows, output);
            if self.step_graphs.as_ref().is_none_or(|g| g.key != key) {
                self.step_graphs = None;
                // Several devices: a graph per device, launched one after the other, when the
                // devices exchange nothing but the peer-memory sum, which ends each graph
                // (uploaded before its first launch, `capture_per_device`). On 2 x H100 the
                // decode step took 0.581-0.600 of one GPU's against 0.604-0.619 with one joint
                // graph in the same calls: the second device starts ~7 us after the first
                // instead of ~14. Steps with NCCL collectives are one graph over every device:
                // NCCL's kernels wait for their peers inside the graph, and the sixth session
                // saw such steps hang with graphs per device (not uploaded first then).
                let layout = if self.gpus.len() > 1
                    && (self.graph_layout == StepGraphLayout::Joint || !self.peer_only(tokens))
                {
                    StepGraphLayout::Joint
                } else {
                    StepGraphLayout::PerDevice
                };
                let captured = match layout {
                    StepGraphLayout::Joint => {
                        self.capture_joint(&mut fronts, &rows, tokens, output, cache)
                    }
                    StepGraphLayout::PerDevice => {
                        self.capture_per_device(&mut fronts, &rows, tokens, output, cache)
                    }
                };
                match captured {
                    Ok(execs) => {
                        self.step_graphs = Some(StepGraphs { key, execs });
                    }
                    Err(e) => {
                        // Replays are an optimisation: a step that cannot be captured runs
                        // as launches, and so do the later ones.
                        self.step_graphs_on = false;
                        self.step_graph_error = Some(e.to_string());
                    }
                }
            }
            self.step_graphs.is_some()
        } else {
            false
        };
        if graphed {
            // The collectives run inside the graphs, untimed.
            self.nccl_ms = 0.0;
            let launched = self.launch_step_graphs();
            lap(2);
            if let Err(e) = launched {
                // A graph already launched may still read the staged metadata and x.
                let _ = self.finish(false, false);
                return Err(e);
            }
            if self.step_timing {
                self.finish(false, true)?;
            } else {
                self.step_ms.clear();
                self.finish_graphs()?;
            }
        } else {
            for (g, lane) in self.gpus.iter().zip(&self.lanes) {
                g.set_current()?;
                record(lane.step.0, g.stream)?;
            }
            let output = (download, device_out.unwrap_or(&[]));
            // SAFETY: the fronts were just planned for `cache`, which outlives the call (it
            // is synchronised below); `download` has room for the output, read after
            // `finish`; the device outputs per `forward_cached_device`'s contract.
            let enqueued = unsafe { self.enqueue_step(&mut fronts, &rows, tokens, output, cache) };
            for g in self.gpus.iter_mut() {
                g.mark_meta_uploaded()?;
            }
            if let Err(e) = enqueued {
                let _ = self.finish(false, false);
                return Err(e);
            }
            for (g, lane) in self.gpus.iter().zip(&self.lanes) {
                g.set_current()?;
                record(lane.step.1, g.stream)?;
            }
            lap(2);
            self.finish(true, true)?;
        }
        if let (Some(out), Some(p)) = (host_out, self.pinned_out.as_mut()) {
            out.copy_from_slice(p.f32_mut(out_len));
        }
        lap(3);
        self.host_phases_us = phases;
        Ok(self.backend())
    }

    /// Launches the captured step: one graph over every device, or one per device. Without
    /// step timing ([`MultiGpuLayer::set_step_timing`]) that is all the host enqueues: the
    /// staged metadata needs no release event, since the call waits for the graphs before
    /// it returns (and before a later call restages it).
    fn launch_step_graphs(&mut self) -> Result<()> {
        let Some(graphs) = self.step_graphs.as_ref() else {
            return Err(Error::Unsupported("no captured step".into()));
        };
        let timed = self.step_timing;
        for ((g, lane), exec) in self.gpus.iter().zip(&self.lanes).zip(&graphs.execs) {
            g.set_current()?;
            if timed {
                record(lane.step.0, g.stream)?;
            }
            // SAFETY: captured in this context (device 0's, for a graph over every device)
            // for a step of the same key: the same launches over the same buffers, whose
            // contents this call has staged. Every stream of the layer is idle (each call
            // ends synchronised), so a joint graph's nodes on the other devices follow all
            // earlier work there too.
            unsafe { exec.launch(g.stream)? };
        }
        if !timed {
            return Ok(());
        }
        if graphs.execs.len() == 1 && self.gpus.len() > 1 {
            // The other devices' streams wait for the joint graph, so that the step's end
            // recorded on them comes after it.
            let g0 = &self.gpus[0];
            g0.set_current()?;
            record(self.lanes[0].chunk_ev, g0.stream)?;
            for (g, lane) in self.gpus.iter().zip(&self.lanes).skip(1) {
                g.set_current()?;
                record(lane.step.0, g.stream)?;
                // SAFETY: live stream; the event was just recorded on device 0's stream.
                drv("cuStreamWaitEvent", unsafe {
                    cu::cuStreamWaitEvent(g.stream, self.lanes[0].chunk_ev, 0)
                })?;
            }
        }
        for (g, lane) in self.gpus.iter().zip(&self.lanes) {
            g.set_current()?;
            record(lane.step.1, g.stream)?;
        }
        Ok(())
    }

    /// Waits for the launched step graphs: device 0's stream for one graph over every
    /// device, every device's stream otherwise.
    fn finish_graphs(&mut self) -> Result<()> {
        let joint = self
            .step_graphs
            .as_ref()
            .is_some_and(|g| g.execs.len() == 1);
        let n = if joint { 1 } else { self.gpus.len() };
        for g in &self.gpus[..n] {
            g.synchronize()?;
        }
        Ok(())
    }

    /// Enqueues a planned cached step on every device: fronts, the norm statistics' sum,
    /// attention, output projection and reduction, and with `download`, the copy of the
    /// output into it (host, page-locked) after the reduction.
    ///
    /// # Safety
    /// `fronts` are the devices' last plans, made for `cache`'s device caches, which stay
    /// alive until the enqueued work has run; `rows` as in
    /// [`GpuLayer::cached_enqueue_front`](super::super::GpuLayer::cached_enqueue_front);
    /// `download` has room for `tokens * n_embd` f32 that nothing reads before the streams are
    /// synchronised.
    unsafe fn enqueue_step(
        &mut self,
        fronts: &mut [CachedFront],
        rows: &[CachedX<'_>],
        tokens: usize,
        (download, outs): (Option<*mut f32>, &[u64]),
        cache: &MultiGpuKvCache,
    ) -> Result<()> {
        for ((g, f), &x) in self.gpus.iter_mut().zip(fronts.iter_mut()).zip(rows) {
            g.set_current()?;
            // SAFETY: per this function's contract.
            unsafe { g.cached_enqueue_front(f, x)? };
        }
        self.reduce_norm(tokens)?;
        for ((g, c), f) in self.gpus.iter_mut().zip(&cache.caches).zip(fronts.iter()) {
            g.set_current()?;
            // SAFETY: `f` is this layer's last front, made for `c` (this function's contract).
            unsafe { g.cached_back(f, c)? };
        }
        let placement = self.project_and_reduce(tokens, outs)?;
        if let Some(dst) = download {
            // SAFETY: per this function's contract.
            unsafe { self.download(dst, tokens, &placement)? };
        }
        Ok(())
    }

    /// [`MultiGpuLayer::enqueue_step`] on streams that are capturing, without timing
    /// events (a replay would not record them).
    ///
    /// # Safety
    /// As [`MultiGpuLayer::enqueue_step`]; every stream it enqueues on is capturing.
    unsafe fn enqueue_captured(
        &mut self,
        fronts: &mut [CachedFront],
        rows: &[CachedX<'_>],
        tokens: usize,
        output: (Option<*mut f32>, &[u64]),
        cache: &MultiGpuKvCache,
    ) -> Result<()> {
        self.untimed = true;
        // SAFETY: per this function's contract; nothing runs before the graph is launched.
        let enqueued = unsafe { self.enqueue_step(fronts, rows, tokens, output, cache) };
        self.untimed = false;
        enqueued
    }

    /// Captures a planned cached step ([`MultiGpuLayer::enqueue_step`]) on every device's
    /// stream into a graph per device. Nothing runs: the caller launches the graphs. On
    /// error every capture is ended and discarded.
    fn capture_per_device(
        &mut self,
        fronts: &mut [CachedFront],
        rows: &[CachedX<'_>],
        tokens: usize,
        output: (Option<*mut f32>, &[u64]),
        cache: &MultiGpuKvCache,
    ) -> Result<Vec<Exec>> {
        let mut begun = 0;
        let mut result = Ok(());
        for g in &self.gpus {
            // SAFETY: the layer's stream, in its context (made current), not capturing.
            result = g
                .set_current()
                .and_then(|()| unsafe { graph::begin_capture(g.stream) });
            if result.is_err() {
                break;
            }
            begun += 1;
        }
        if result.is_ok() {
            // SAFETY: as in `cached_step`; every device's stream is capturing.
            result = unsafe { self.enqueue_captured(fronts, rows, tokens, output, cache) };
        }
        let mut execs = Vec::with_capacity(begun);
        for g in &self.gpus[..begun] {
            let _ = g.set_current();
            if result.is_ok() {
                // SAFETY: the stream is capturing in its (current) context.
                match unsafe { Exec::end_capture(g.stream) } {
                    Ok(e) => execs.push(e),
                    Err(e) => result = Err(e),
                }
            } else {
                // SAFETY: the layer's stream, in its (current) context.
                unsafe { graph::abandon_capture(g.stream) };
            }
        }
        if result.is_ok() {
            result = self.upload_graphs(&execs);
        }
        result.map(|()| execs)
    }

    /// Uploads every device's new graph, then waits for it, before the graphs' first launch.
    ///
    /// Each graph ends in the peer sum, whose kernel waits for the other devices. The first
    /// launch of a graph that was not uploaded uploads it. In one run of the tests on 2 x H100
    /// (seventh session, graphs not uploaded first), the launch of a case's first graphs
    /// returned the error of a sum that had waited 10 s for its peer and trapped; the likely
    /// cause is that upload waiting for the device already spinning in its sum. Uploaded
    /// here, while every device is idle, the launches of a step only enqueue.
    fn upload_graphs(&self, execs: &[Exec]) -> Result<()> {
        for (g, e) in self.gpus.iter().zip(execs) {
            g.set_current()?;
            // SAFETY: the graph was captured on this device's layer stream, in its context.
            unsafe { e.upload(g.stream)? };
        }
        for g in &self.gpus {
            g.synchronize()?;
        }
        Ok(())
    }

    /// [`MultiGpuLayer::capture_per_device`], but into one graph over every device: the
    /// other devices' streams join device 0's capture (they wait for an event recorded in it)
    /// and rejoin it at the end, so that one launch on device 0's stream runs the whole step.
    fn capture_joint(
        &mut self,
        fronts: &mut [CachedFront],
        rows: &[CachedX<'_>],
        tokens: usize,
        output: (Option<*mut f32>, &[u64]),
        cache: &MultiGpuKvCache,
    ) -> Result<Vec<Exec>> {
        let (s0, fork) = (self.gpus[0].stream, self.lanes[0].done_ev);
        self.gpus[0].set_current()?;
        // SAFETY: device 0's stream, in its (current) context, not capturing.
        unsafe { graph::begin_capture(s0)? };
        let mut result = (|| -> Result<()> {
            record(fork, s0)?;
            for g in &self.gpus[1..] {
                g.set_current()?;
                // SAFETY: live stream; the event was recorded in the capture just begun.
                drv("cuStreamWaitEvent", unsafe {
                    cu::cuStreamWaitEvent(g.stream, fork, 0)
                })?;
            }
            // SAFETY: as in `cached_step`; every device's stream has joined the capture.
            unsafe { self.enqueue_captured(fronts, rows, tokens, output, cache)? };
            for (g, lane) in self.gpus.iter().zip(&self.lanes).skip(1) {
                g.set_current()?;
                record(lane.done_ev, g.stream)?;
                self.gpus[0].set_current()?;
                // SAFETY: live stream; the event was recorded in the same capture.
                drv("cuStreamWaitEvent", unsafe {
                    cu::cuStreamWaitEvent(s0, lane.done_ev, 0)
                })?;
            }
            Ok(())
        })();
        let mut execs = Vec::with_capacity(1);
        let _ = self.gpus[0].set_current();
        if result.is_ok() {
            // SAFETY: device 0's stream is capturing in its (current) context.
            match unsafe { Exec::end_capture(s0) } {
                Ok(e) => execs.push(e),
                Err(e) => result = Err(e),
            }
        }
        if result.is_err() {
            for g in &self.gpus {
                let _ = g.set_current();
                // SAFETY: the layer's stream, in its (current) context.
                unsafe { graph::abandon_capture(g.stream) };
            }
        }
        result.map(|()| execs)
    }

    /// What a captured cached step depends on besides buffer contents: every device's front
    /// (launch shapes, kernels, addresses, its cache), the source of `x`, the output targets,
    /// and the reduction.
    fn step_key(
        &self,
        fronts: &[CachedFront],
        rows: &[CachedX<'_>],
        (download, outs): (Option<*mut f32>, &[u64]),
    ) -> Vec<u64> {
        let r = self.reduce;
        let mut key = vec![
            download.map_or(0, |p| p as u64),
            outs.len() as u64,
            u64::from(self.peer_on),
            r.chunks as u64,
            u64::from(r.storage_dtype),
            u64::from(r.scatter),
            u64::from(r.all_to_all),
        ];
        key.extend(outs);
        for (f, x) in fronts.iter().zip(rows) {
            f.key_into(&mut key);
            key.extend(match *x {
                CachedX::Host(h) => [0, h.as_ptr() as u64, h.len() as u64],
                CachedX::Device(DeviceX::F32(p), len) => [1, p, len as u64],
                CachedX::Device(DeviceX::Storage(p), len) => [2, p, len as u64],
            });
        }
        key
    }

    /// Test and benchmark switch: whether the devices after the first upload device 0's
    /// staged metadata of a cached step when they would plan the same (the default), or
    /// plan and stage their own copy.
    #[doc(hidden)]
    pub fn set_shared_metadata(&mut self, on: bool) {
        self.share_meta = on;
    }

    /// Test and benchmark switch: how a step over several devices is captured (the next
    /// capture; the current one is dropped).
    #[doc(hidden)]
    pub fn set_step_graph_layout(&mut self, layout: StepGraphLayout) {
        if self.graph_layout != layout {
            self.graph_layout = layout;
            self.step_graphs = None;
        }
    }

    /// How the replayed step was captured (a step with NCCL collectives is captured jointly
    /// whatever [`MultiGpuLayer::set_step_graph_layout`] says; `Joint` while none is held).
    #[doc(hidden)]
    pub fn step_graph_layout(&self) -> StepGraphLayout {
        match &self.step_graphs {
            Some(g) if g.execs.len() > 1 || self.gpus.len() == 1 => StepGraphLayout::PerDevice,
            _ => StepGraphLayout::Joint,
        }
    }

    /// Benchmark diagnostics: host microseconds from the start of the last successful cached
    /// call to the end of (0) validation and staging of `x`, (1) every device's plan, (2) the
    /// enqueue of the step (its graph launch, or every launch and copy), (3) the wait for
    /// every device and the copy out.
    #[doc(hidden)]
    pub fn last_host_phases_us(&self) -> [f64; 4] {
        self.host_phases_us
    }

    /// Benchmark switch: every device uploads a cached step's metadata with the copy engine
    /// (`true`) or with a kernel (`false`, the default); see
    /// [`GpuLayer::set_meta_upload_copy`].
    #[doc(hidden)]
    pub fn set_meta_upload_copy(&mut self, copy: bool) {
        for g in &mut self.gpus {
            g.set_meta_upload_copy(copy);
        }
        self.step_graphs = None;
    }

    /// Captures cached steps ([`MultiGpuLayer::forward_cached`]) as CUDA graphs (one per
    /// device, or one over every device for steps with NCCL collectives) and replays them
    /// while a step has the same shape (new tokens, work split, buffers) as the captured one:
    /// on (the default), the host enqueues a decode step with a launch or two per device
    /// instead of a dozen; a step of a new shape is captured first (about the
    /// cost of enqueueing it). Off, every kernel and copy is enqueued by each call; only then
    /// does [`MultiGpuLayer::last_nccl_ms`] time the collectives of cached calls. A capture
    /// that fails turns this off (the step runs as launches;
    /// [`MultiGpuLayer::step_graph_error`] says why).
    pub fn set_step_graphs(&mut self, on: bool) {
        self.step_graphs_on = on;
        if !on {
            self.step_graphs = None;
        } else {
            self.step_graph_error = None;
        }
    }

    /// Sums small exact (f32 all-reduce) outputs, such as a decode step's, through peer
    /// memory instead of NCCL (on by default where every pair of devices has peer access):
    /// every device reads every device's partial output over NVLink and adds them in rank
    /// order, so that every device holds the same bits (on two devices, the bits of NCCL's
    /// sum). Sums of more than 2 MiB per device, storage-type and chunked reductions always
    /// go through NCCL. Returns whether peer sums are available.
    ///
    /// [`MultiGpuLayer::new`] enables peer access between the devices' primary contexts for
    /// it (a caller enabling it again gets CUDA's "already enabled"). As with NCCL, every
    /// device must run its part: a step whose launch failed on one device after another
    /// device's launch leaves that device waiting; its sum kernel traps after 10 s (the
    /// device's context is then unusable) instead of hanging.
    pub fn set_peer_sum(&mut self, on: bool) -> bool {
        self.peer_on = on;
        self.peer.is_some()
    }

    /// Benchmark diagnostics: whether cached steps replayed as graphs also record each
    /// device's span ([`MultiGpuLayer::last_step_device_ms`]; off by default: the events and
    /// the cross-device waits they need cost the host a few microseconds per device).
    /// Steps enqueued as launches always record it.
    #[doc(hidden)]
    pub fn set_step_timing(&mut self, on: bool) {
        self.step_timing = on;
    }

    /// Benchmark diagnostics: the graphs of the captured cached step (1 over every device, or
    /// one per device; 0 before a capture or with graphs off).
    #[doc(hidden)]
    pub fn step_graph_count(&self) -> usize {
        self.step_graphs.as_ref().map_or(0, |g| g.execs.len())
    }

    /// Why the last capture of a cached step failed, if one did since graphs were turned on.
    pub fn step_graph_error(&self) -> Option<&str> {
        self.step_graph_error.as_deref()
    }

    /// Benchmark diagnostics: milliseconds from the start to the end of each device's work
    /// of the last cached call (its own stream, CUDA events: first upload to the summed
    /// output, before the download), device by device.
    #[doc(hidden)]
    pub fn last_step_device_ms(&self) -> &[f32] {
        &self.step_ms
    }
}
