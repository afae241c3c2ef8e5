//! Page-locked host memory, and the one upload per call of a cached step's small metadata.
//!
//! A cached (decode) step needs half a dozen small host arrays on the device: work items,
//! block tables, slots of the new tokens. Uploaded one by one from pageable memory, each is a
//! staged, host-blocking copy of a few microseconds, which on a decode step of a few hundred
//! microseconds is a visible share. Packed into one page-locked buffer they go up in one
//! asynchronous DMA.

use std::ffi::c_void;

use cust::memory::DeviceBuffer;
use cust::sys as cu;

use super::{alloc, drv, launch, ptr};
use crate::error::{Error, Result};

/// Page-locked host memory (portable to every context, mapped into the device address
/// space), `len` bytes.
pub(super) struct Pinned {
    ptr: *mut u8,
    len: usize,
}

impl Pinned {
    /// At least `bytes` bytes of page-locked memory (a context must be current).
    pub(super) fn new(bytes: usize) -> Result<Pinned> {
        let mut p: *mut c_void = std::ptr::null_mut();
        // SAFETY: valid out-pointer; CU_MEMHOSTALLOC_PORTABLE (1) | CU_MEMHOSTALLOC_DEVICEMAP
        // (2); freed once in Drop.
        drv("cuMemHostAlloc", unsafe {
            cu::cuMemHostAlloc(&mut p, bytes.max(16), 3)
        })?;
        Ok(Pinned {
            ptr: p.cast(),
            len: bytes.max(16),
        })
    }

    /// The buffer's address for kernels of the current context.
    fn device_ptr(&self) -> Result<u64> {
        let mut d: cu::CUdeviceptr = 0;
        // SAFETY: `ptr` was allocated with CU_MEMHOSTALLOC_DEVICEMAP; valid out-pointer.
        drv("cuMemHostGetDevicePointer", unsafe {
            cu::cuMemHostGetDevicePointer_v2(&mut d, self.ptr.cast(), 0)
        })?;
        Ok(d)
    }

    /// Size in bytes.
    pub(super) fn len(&self) -> usize {
        self.len
    }

    /// The first `n` f32 of the buffer (fewer if it is smaller).
    pub(super) fn f32_mut(&mut self, n: usize) -> &mut [f32] {
        let n = n.min(self.len / 4);
        // SAFETY: `ptr` holds `len` bytes owned by this value, borrowed mutably here, aligned
        // for f32 (cuMemHostAlloc returns page-aligned memory); any bit pattern is an f32.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.cast(), n) }
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: `ptr` holds `len` bytes owned by this value, borrowed mutably here.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl Drop for Pinned {
    fn drop(&mut self) {
        // SAFETY: allocated by cuMemHostAlloc, freed once; its owners wait for every copy
        // from it before dropping it.
        unsafe {
            cu::cuMemFreeHost(self.ptr.cast());
        }
    }
}

/// Each part starts on this alignment in the packed buffer (the widest element type the
/// kernels load from metadata is 16 bytes).
const ALIGN: usize = 16;

/// Where parts of these lengths go in the packed buffer (each on an [`ALIGN`] boundary, in
/// order, none overlapping the next), and the bytes the packed buffer needs.
fn pack(lens: impl Iterator<Item = usize>) -> (Vec<usize>, usize) {
    let mut offsets = Vec::new();
    let mut total = 0usize;
    for len in lens {
        offsets.push(total);
        total += len.next_multiple_of(ALIGN);
    }
    (offsets, total)
}

/// A page-locked host buffer and its device twin, rewritten by every call: the call's
/// metadata arrays are packed into the host buffer ([`MetaUpload::stage`]) and go up in one
/// copy ([`MetaUpload::enqueue`], possibly captured in a CUDA graph and replayed).
#[derive(Default)]
pub(super) struct MetaUpload {
    host: Option<Pinned>,
    device: Option<DeviceBuffer<u8>>,
    /// The host buffer's address for the device's kernels.
    host_on_device: u64,
    /// Where the next upload reads the staged bytes: the host address and the address for
    /// this device's kernels of this upload's own host buffer, or of another device's
    /// ([`MetaUpload::adopt`]).
    src: (usize, u64),
    /// The last adopted host buffer and its address for this device's kernels (the driver
    /// call that maps it is made once per buffer address; under unified addressing a
    /// page-locked buffer has the same address on every device, so a later buffer at the
    /// same host address maps the same).
    adopted: (usize, u64),
    /// Where each part of the last `stage` starts in the packed buffer.
    offsets: Vec<usize>,
    /// Bytes the last `stage` (or `adopt`) packed.
    staged: usize,
    /// Recorded after the last upload ([`MetaUpload::mark_done`]); the host buffer is
    /// rewritten only once it has passed.
    done: Option<Event>,
}

impl MetaUpload {
    /// Packs `parts` (byte images of plain arrays) into the host buffer and returns each
    /// part's device address once uploaded. The buffers grow when the parts need more room
    /// (new addresses); before the host buffer is rewritten, the previous upload from it is
    /// waited for (it normally finished long ago).
    ///
    /// The addresses stay valid until the next call (a layer's context must be current).
    pub(super) fn stage(&mut self, parts: &[&[u8]]) -> Result<Vec<u64>> {
        let (offsets, total) = pack(parts.iter().map(|p| p.len()));
        if let Some(e) = &self.done {
            e.wait()?;
        }
        if self.host.as_ref().is_none_or(|h| h.len() < total) {
            self.host = None;
            let host = Pinned::new(total.next_power_of_two())?;
            self.host_on_device = host.device_ptr()?;
            self.host = Some(host);
        }
        let base = self.device_of(total)?;
        let Some(host) = self.host.as_mut() else {
            unreachable!("the buffer was just made")
        };
        let bytes = host.bytes_mut();
        for (p, &o) in parts.iter().zip(&offsets) {
            bytes[o..o + p.len()].copy_from_slice(p);
        }
        self.src = (host.ptr as usize, self.host_on_device);
        self.staged = total;
        self.offsets = offsets;
        Ok(self.part_addresses(base))
    }

    /// The device buffer's address, the buffer grown first (new address) when it holds fewer
    /// than `bytes`.
    fn device_of(&mut self, bytes: usize) -> Result<u64> {
        if self.device.as_ref().is_none_or(|d| d.len() < bytes) {
            self.device = None;
            self.device = Some(alloc(bytes.next_power_of_two())?);
        }
        let Some(device) = self.device.as_ref() else {
            unreachable!("the buffer was just made")
        };
        Ok(ptr(device))
    }

    /// Each staged part's device address once uploaded to the buffer at `base`.
    fn part_addresses(&self, base: u64) -> Vec<u64> {
        self.offsets.iter().map(|&o| base + o as u64).collect()
    }

    /// Takes `lead`'s last [`MetaUpload::stage`] (another device's) as this upload's
    /// contents, without packing anything: the next [`MetaUpload::enqueue`] reads `lead`'s
    /// page-locked buffer (portable, so mapped into every context) into this device's
    /// buffer. Returns each part's device address once uploaded, as `stage` does. A head
    /// split whose devices plan the same metadata packs it once (the host's planning is on
    /// the step's critical path, once per device).
    ///
    /// The caller keeps `lead`'s buffer unstaged until the enqueued upload has run (a
    /// [`crate::MultiGpuLayer`] call ends with every device synchronised). This device's
    /// context must be current.
    pub(super) fn adopt(&mut self, lead: &MetaUpload) -> Result<Vec<u64>> {
        let Some(host) = lead.host.as_ref() else {
            return Err(Error::Unsupported("no staged metadata to share".into()));
        };
        let base = self.device_of(lead.staged)?;
        let at = host.ptr as usize;
        if self.adopted.0 != at {
            self.adopted = (at, host.device_ptr()?);
        }
        self.src = self.adopted;
        self.staged = lead.staged;
        self.offsets.clone_from(&lead.offsets);
        Ok(self.part_addresses(base))
    }

    /// The address the next upload reads from, for this device's kernels (part of a
    /// captured step's key: a replay reads the buffer captured).
    pub(super) fn source(&self) -> u64 {
        self.src.1
    }

    /// Bytes the last [`MetaUpload::stage`] packed (what [`MetaUpload::enqueue`] copies).
    pub(super) fn staged_bytes(&self) -> usize {
        self.staged
    }

    /// Enqueues the copy of the staged bytes to the device on `stream`: a copy-engine DMA, or
    /// with `kernel` (`upload_u4` of the layer's module) a kernel that reads the page-locked
    /// buffer through the device's mapping of it. In a replayed graph the kernel is the
    /// faster first node: the kernel after a copy node started about 10 us after the copy
    /// ended (H200, CUPTI timeline), after a kernel well under 1 us later.
    ///
    /// # Safety
    /// `stream` belongs to the context the buffers were made in; the host buffer is not
    /// restaged before the copy has run ([`MetaUpload::mark_done`] after it, on `stream`).
    pub(super) unsafe fn enqueue(
        &self,
        stream: cu::CUstream,
        kernel: Option<cu::CUfunction>,
    ) -> Result<()> {
        let Some(device) = self.device.as_ref() else {
            return Ok(());
        };
        if self.staged == 0 {
            return Ok(());
        }
        if let Some(f) = kernel {
            // `pack` puts every part on a 16-byte boundary, so the staged length is whole
            // 16-byte words.
            let words = self.staged / ALIGN;
            let mut p = UploadParams {
                src: self.src.1,
                dst: ptr(device),
                n: words as i64,
            };
            let blocks = words.div_ceil(256).clamp(1, 1024) as u32;
            // SAFETY: UploadParams matches the kernel's struct; `src` maps `staged` bytes of
            // the staged host buffer (own or adopted) into this context, `dst` holds as many;
            // neither is rewritten or freed before the kernel has run (this function's
            // contract, and `adopt`'s).
            return unsafe { launch(f, (blocks, 1, 1), 256, 0, stream, &mut p) };
        }
        // SAFETY: both buffers hold at least `staged` bytes; the host buffer (own or
        // adopted) is page-locked and, per this function's contract and `adopt`'s, not
        // rewritten before the copy has run.
        drv("cuMemcpyHtoDAsync", unsafe {
            cu::cuMemcpyHtoDAsync_v2(
                ptr(device),
                self.src.0 as *const c_void,
                self.staged,
                stream,
            )
        })
    }

    /// Records, on `stream`, that the enqueued copy (or the graph replaying it) is behind:
    /// the next [`MetaUpload::stage`] waits for this point.
    ///
    /// # Safety
    /// `stream` belongs to the layer's context, which is current.
    pub(super) unsafe fn mark_done(&mut self, stream: cu::CUstream) -> Result<()> {
        if self.done.is_none() {
            self.done = Some(Event::new()?);
        }
        match &self.done {
            // SAFETY: per this function's contract.
            Some(e) => unsafe { e.record(stream) },
            None => Ok(()),
        }
    }
}

/// `upload_u4`'s parameters (rope_norm.cu).
#[repr(C)]
struct UploadParams {
    src: u64,
    dst: u64,
    n: i64,
}

/// A CUDA event without timing, destroyed on drop.
struct Event(cu::CUevent);

impl Event {
    fn new() -> Result<Event> {
        let mut e: cu::CUevent = std::ptr::null_mut();
        // SAFETY: valid out-pointer; CU_EVENT_DISABLE_TIMING (2); destroyed once in Drop.
        drv("cuEventCreate", unsafe { cu::cuEventCreate(&mut e, 2) })?;
        Ok(Event(e))
    }

    /// # Safety
    /// `stream` belongs to the event's context.
    unsafe fn record(&self, stream: cu::CUstream) -> Result<()> {
        // SAFETY: a live event; the stream per this function's contract.
        drv("cuEventRecord", unsafe {
            cu::cuEventRecord(self.0, stream)
        })
    }

    fn wait(&self) -> Result<()> {
        // SAFETY: a live event (never recorded is fine: it then counts as passed).
        drv("cuEventSynchronize", unsafe {
            cu::cuEventSynchronize(self.0)
        })
    }
}

impl Drop for Event {
    fn drop(&mut self) {
        // SAFETY: created by cuEventCreate, destroyed once.
        unsafe {
            cu::cuEventDestroy_v2(self.0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{pack, ALIGN};

    #[test]
    fn packed_parts_are_aligned_in_order_and_disjoint() {
        let cases: [&[usize]; 5] = [
            &[],
            &[0],
            &[16, 4, 0, 33],
            &[1, 15, 16, 17],
            &[4096, 8, 12_345],
        ];
        for lens in cases {
            let (offsets, total) = pack(lens.iter().copied());
            assert_eq!(offsets.len(), lens.len());
            let mut end = 0;
            for (&o, &len) in offsets.iter().zip(lens) {
                assert_eq!(o % ALIGN, 0, "{lens:?}: offset {o}");
                assert!(o >= end, "{lens:?}: offset {o} overlaps the previous part");
                end = o + len;
            }
            assert!(
                end <= total,
                "{lens:?}: the parts end at {end}, past {total}"
            );
            // No more than the alignment's padding per part.
            let bytes: usize = lens.iter().sum();
            assert!(
                total < bytes + ALIGN * lens.len().max(1),
                "{lens:?}: {total}"
            );
        }
        // Exact for these: 16 + 16 + 0 + 48.
        assert_eq!(
            pack([16usize, 4, 0, 33].into_iter()),
            (vec![0, 16, 32, 32], 80)
        );
    }
}
