//! The f32 all-reduce of small outputs (decode steps) through peer memory instead of NCCL:
//! `peer_sum_f32` in `kernels/rope_norm.cu`. Each device's output projection writes its
//! partial sum into a buffer of its own; every device then reads every partial over NVLink
//! and adds them in rank order. A decode step's collective moves a few hundred KiB, where
//! NCCL's protocol latency (about 20 us) is most of its cost.

use cust::memory::DeviceBuffer;
use cust::sys as cu;

use super::super::{alloc, drv, function, launch, ptr, GpuLayer};
use crate::error::Result;

/// Ranks `peer_sum_f32` takes (`PEER_MAX` in rope_norm.cu).
const PEER_MAX: usize = 8;

/// Largest all-reduce (bytes per device) summed through peer memory; larger ones (prefill)
/// are bandwidth-bound and go through NCCL.
pub(super) const PEER_SUM_MAX_BYTES: usize = 2 << 20;

/// `PeerSumParams` of rope_norm.cu.
#[repr(C)]
#[derive(Clone, Copy)]
struct PeerSumParams {
    src: [u64; PEER_MAX],
    flags: [u64; PEER_MAX],
    dst: u64,
    counter: u64,
    n: i64,
    ranks: i32,
    rank: i32,
    vec4: i32,
}

/// One device's part: its partial-output buffer, its flags and step counter, the kernel.
struct PeerLane {
    part: DeviceBuffer<u8>,
    /// `PEER_MAX` arrival flags, then the step counter and the count of finished CTAs.
    flags: DeviceBuffer<u8>,
    func: cu::CUfunction,
}

/// The peer-memory all-reduce of a head split: one lane per device.
pub(super) struct PeerSum {
    lanes: Vec<PeerLane>,
}

impl PeerSum {
    /// Enables peer access between every pair of `gpus` and allocates each device's partial
    /// buffer (room for `max_elems` f32, at most [`PEER_SUM_MAX_BYTES`]). `None` (NCCL then
    /// sums everything) for one device, more than `PEER_MAX`, or a pair of devices without
    /// peer access.
    pub(super) fn new(gpus: &[GpuLayer<'_>], max_elems: usize) -> Result<Option<PeerSum>> {
        let n = gpus.len();
        if !(2..=PEER_MAX).contains(&n) {
            return Ok(None);
        }
        let mut devs = Vec::with_capacity(n);
        for g in gpus {
            let mut d: cu::CUdevice = 0;
            // SAFETY: valid out-pointer.
            drv("cuDeviceGet", unsafe {
                cu::cuDeviceGet(&mut d, g.opts.device as i32)
            })?;
            devs.push(d);
        }
        for (i, &a) in devs.iter().enumerate() {
            for (j, &b) in devs.iter().enumerate() {
                let mut can = 0;
                // SAFETY: valid out-pointer, devices from cuDeviceGet.
                drv("cuDeviceCanAccessPeer", unsafe {
                    cu::cuDeviceCanAccessPeer(&mut can, a, b)
                })?;
                if i != j && can == 0 {
                    return Ok(None);
                }
            }
        }
        let bytes = (max_elems * 4).min(PEER_SUM_MAX_BYTES);
        let mut lanes = Vec::with_capacity(n);
        for (i, g) in gpus.iter().enumerate() {
            g.set_current()?;
            for (j, peer) in gpus.iter().enumerate() {
                if i == j {
                    continue;
                }
                // SAFETY: this device's context is current; the peer's context is live.
                let r = unsafe { cu::cuCtxEnablePeerAccess(peer.kernels.ctx.as_raw(), 0) };
                if r != cu::CUresult::CUDA_ERROR_PEER_ACCESS_ALREADY_ENABLED {
                    drv("cuCtxEnablePeerAccess", r)?;
                }
            }
            let lane = PeerLane {
                part: alloc(bytes)?,
                flags: alloc((PEER_MAX + 2) * 4)?,
                func: function(&g.kernels.rope_norm, "peer_sum_f32")?,
            };
            // One launch without peers and elements, so that the kernel is loaded on this
            // device before a step depends on it (with lazy module loading the first launch
            // loads it, and a peer's sum already spinning would wait for that). It moves
            // every device's step counter to the same epoch, 1.
            let mut p = PeerSumParams {
                src: [ptr(&lane.part); PEER_MAX],
                flags: [ptr(&lane.flags); PEER_MAX],
                dst: ptr(&lane.part),
                counter: ptr(&lane.flags) + (PEER_MAX * 4) as u64,
                n: 0,
                ranks: 1,
                rank: 0,
                vec4: 0,
            };
            // SAFETY: PeerSumParams matches the kernel's struct; with one rank and no
            // elements it touches only the lane's own counter; the stream is the device's.
            unsafe { launch(lane.func, (1, 1, 1), 256, 0, g.stream, &mut p)? };
            g.synchronize()?;
            lanes.push(lane);
        }
        Ok(Some(PeerSum { lanes }))
    }

    /// Whether a sum of `elems` f32 per device goes through peer memory.
    pub(super) fn fits(&self, elems: usize) -> bool {
        self.lanes
            .iter()
            .all(|l| elems * 4 <= l.part.len() && elems * 4 <= PEER_SUM_MAX_BYTES)
    }

    /// Device `i`'s partial-output buffer.
    pub(super) fn part(&self, i: usize) -> u64 {
        ptr(&self.lanes[i].part)
    }

    /// Enqueues, on every device's layer stream, the sum of every device's partial buffer
    /// (`elems` f32) into its `dst[i]`.
    ///
    /// # Safety
    /// Every partial buffer holds `elems` f32 written by work enqueued before on its layer
    /// stream ([`PeerSum::fits`]); each `dst[i]` holds room for `elems` f32 on device `i` and
    /// is none of the partial buffers; every device's kernel is enqueued (this function), or
    /// the launched ones wait for the missing peers until they trap.
    pub(super) unsafe fn sum(
        &self,
        gpus: &[GpuLayer<'_>],
        dst: &[u64],
        elems: usize,
    ) -> Result<()> {
        let n = gpus.len();
        let mut src = [0u64; PEER_MAX];
        let mut flags = [0u64; PEER_MAX];
        for (r, l) in self.lanes.iter().enumerate() {
            src[r] = ptr(&l.part);
            flags[r] = ptr(&l.flags);
        }
        let aligned = src[..n].iter().chain(dst).all(|&a| a % 16 == 0);
        let vec4 = aligned && elems.is_multiple_of(4);
        let work = if vec4 { elems / 4 } else { elems };
        // At most one CTA per SM: every CTA is resident while it waits for the peers.
        let blocks = work.div_ceil(256).clamp(1, 132) as u32;
        for (r, (g, l)) in gpus.iter().zip(&self.lanes).enumerate() {
            g.set_current()?;
            let mut p = PeerSumParams {
                src,
                flags,
                dst: dst[r],
                counter: ptr(&l.flags) + (PEER_MAX * 4) as u64,
                n: elems as i64,
                ranks: n as i32,
                rank: r as i32,
                vec4: vec4 as i32,
            };
            // SAFETY: PeerSumParams matches the kernel's struct; the buffers per this
            // function's contract; peer access is enabled between every pair (`new`).
            unsafe { launch(l.func, (blocks, 1, 1), 256, 0, g.stream, &mut p)? };
        }
        Ok(())
    }
}
