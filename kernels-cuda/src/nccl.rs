//! The handful of NCCL functions the multi-GPU head split needs, bound by hand (libnccl.so.2,
//! 2.28): communicators for the devices of one process, grouped in-place sum all-reduces and
//! reduce-scatters (f32, bf16, f16), for sequence parallelism f32 all-gather /
//! reduce-scatter of unequal shares (grouped broadcasts / reduces), and grouped send / receive
//! pairs (the all-to-all of the attention outputs).

use std::ffi::{c_char, c_int, c_void, CStr};

use crate::error::{Error, Result};

/// `ncclComm_t`.
pub type Comm = *mut c_void;

/// Element types of the collectives (`ncclDataType_t` values).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dtype {
    /// `ncclFloat32`.
    F32 = 7,
    /// `ncclFloat16`.
    F16 = 6,
    /// `ncclBfloat16`.
    Bf16 = 9,
}

impl Dtype {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Dtype::F32 => 4,
            Dtype::F16 | Dtype::Bf16 => 2,
        }
    }
}

/// A sum over the devices of a [`Comms`] set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Collective {
    /// Every device receives the whole sum (`ncclAllReduce`, `count` elements).
    AllReduce,
    /// Device `i` receives part `i` of `n` equal parts of the sum (`ncclReduceScatter`,
    /// `count` elements in all, `count / n` per device, in place at the part's offset).
    ReduceScatter,
}
/// `ncclSum`.
const SUM: c_int = 0;

#[link(name = "nccl")]
extern "C" {
    fn ncclGetVersion(version: *mut c_int) -> c_int;
    fn ncclCommInitAll(comms: *mut Comm, ndev: c_int, devlist: *const c_int) -> c_int;
    fn ncclCommDestroy(comm: Comm) -> c_int;
    fn ncclGroupStart() -> c_int;
    fn ncclGroupEnd() -> c_int;
    fn ncclAllReduce(
        sendbuff: *const c_void,
        recvbuff: *mut c_void,
        count: usize,
        datatype: c_int,
        op: c_int,
        comm: Comm,
        stream: *mut c_void,
    ) -> c_int;
    fn ncclAllGather(
        sendbuff: *const c_void,
        recvbuff: *mut c_void,
        sendcount: usize,
        datatype: c_int,
        comm: Comm,
        stream: *mut c_void,
    ) -> c_int;
    fn ncclReduceScatter(
        sendbuff: *const c_void,
        recvbuff: *mut c_void,
        recvcount: usize,
        datatype: c_int,
        op: c_int,
        comm: Comm,
        stream: *mut c_void,
    ) -> c_int;
    fn ncclBroadcast(
        sendbuff: *const c_void,
        recvbuff: *mut c_void,
        count: usize,
        datatype: c_int,
        root: c_int,
        comm: Comm,
        stream: *mut c_void,
    ) -> c_int;
    fn ncclReduce(
        sendbuff: *const c_void,
        recvbuff: *mut c_void,
        count: usize,
        datatype: c_int,
        op: c_int,
        root: c_int,
        comm: Comm,
        stream: *mut c_void,
    ) -> c_int;
    fn ncclSend(
        sendbuff: *const c_void,
        count: usize,
        datatype: c_int,
        peer: c_int,
        comm: Comm,
        stream: *mut c_void,
    ) -> c_int;
    fn ncclRecv(
        recvbuff: *mut c_void,
        count: usize,
        datatype: c_int,
        peer: c_int,
        comm: Comm,
        stream: *mut c_void,
    ) -> c_int;
    fn ncclGetErrorString(result: c_int) -> *const c_char;
}

/// One point-to-point transfer of [`Comms::exchange`]: `count` elements from `send` on rank
/// `src` to `recv` on rank `dst`.
#[derive(Clone, Copy, Debug)]
pub struct Transfer {
    /// Sending rank.
    pub src: usize,
    /// Receiving rank (not `src`).
    pub dst: usize,
    /// Device pointer of rank `src`.
    pub send: u64,
    /// Device pointer of rank `dst`.
    pub recv: u64,
    /// Elements.
    pub count: usize,
}

/// Runs `enqueue` inside one NCCL group. `enqueue` gets a sink for each call's status: every
/// call is made even after one fails, and the group is closed in any case, so that NCCL's
/// group state stays consistent; the first failure is returned.
fn grouped(enqueue: impl FnOnce(&mut dyn FnMut(Result<()>))) -> Result<()> {
    // SAFETY: no arguments.
    check("ncclGroupStart", unsafe { ncclGroupStart() })?;
    let mut first_err = Ok(());
    enqueue(&mut |r| {
        if first_err.is_ok() {
            first_err = r;
        }
    });
    // SAFETY: matches the ncclGroupStart above.
    let end = check("ncclGroupEnd", unsafe { ncclGroupEnd() });
    first_err.and(end)
}

/// The byte address of f32 element `elems` of device buffer `base`.
fn at(base: u64, elems: usize) -> u64 {
    base + (elems * std::mem::size_of::<f32>()) as u64
}

fn check(call: &'static str, status: c_int) -> Result<()> {
    if status == 0 {
        return Ok(());
    }
    // SAFETY: ncclGetErrorString returns a pointer to a static NUL-terminated string (any
    // code, unknown ones included).
    let text = unsafe { ncclGetErrorString(status) };
    let message = if text.is_null() {
        format!("ncclResult_t {status}")
    } else {
        // SAFETY: non-null, static and NUL-terminated (above).
        let s = unsafe { CStr::from_ptr(text) };
        format!("{} (ncclResult_t {status})", s.to_string_lossy())
    };
    Err(Error::Nccl { call, message })
}

/// The loaded library's version code (e.g. 22803 for 2.28.3).
pub fn version() -> Result<i32> {
    let mut v: c_int = 0;
    // SAFETY: valid out-pointer.
    check("ncclGetVersion", unsafe { ncclGetVersion(&mut v) })?;
    Ok(v)
}

/// One communicator per device of `devices` (rank `i` on `devices[i]`), all in this process.
pub struct Comms {
    comms: Vec<Comm>,
}

// SAFETY: NCCL communicators may be used from any thread; `MultiGpuLayer` uses them only
// through `&mut self`, never concurrently.
unsafe impl Send for Comms {}

impl Comms {
    /// `ncclCommInitAll` over `devices` (CUDA ordinals). Changes the calling thread's current
    /// device (NCCL calls `cudaSetDevice`): callers set their context again afterwards.
    pub fn new(devices: &[u32]) -> Result<Comms> {
        let list: Vec<c_int> = devices
            .iter()
            .map(|&d| c_int::try_from(d))
            .collect::<std::result::Result<_, _>>()
            .map_err(|_| Error::Unsupported("device ordinal exceeds i32".into()))?;
        let n = c_int::try_from(list.len())
            .map_err(|_| Error::Unsupported("too many devices".into()))?;
        let mut comms: Vec<Comm> = vec![std::ptr::null_mut(); list.len()];
        // SAFETY: `comms` has room for `n` handles and `list` holds `n` ordinals.
        check("ncclCommInitAll", unsafe {
            ncclCommInitAll(comms.as_mut_ptr(), n, list.as_ptr())
        })?;
        Ok(Comms { comms })
    }

    /// Enqueues an in-place sum of `count` elements of type `dtype` at `bufs[i]` on
    /// `streams[i]`, rank by rank, as one NCCL group: an all-reduce, or a reduce-scatter (rank
    /// `i` receives elements `i * count / n..(i + 1) * count / n` at that offset of `bufs[i]`;
    /// `count` must be a multiple of the number of devices).
    ///
    /// # Safety
    /// `bufs[i]` is a device pointer of device `i` of this communicator set with room for
    /// `count` elements of `dtype`, and `streams[i]` a live stream of that device's (primary)
    /// context; both stay valid until the streams have run the work.
    pub unsafe fn sum(
        &mut self,
        kind: Collective,
        bufs: &[u64],
        streams: &[*mut c_void],
        count: usize,
        dtype: Dtype,
    ) -> Result<()> {
        let n = self.comms.len();
        if bufs.len() != n || streams.len() != n {
            return Err(Error::Unsupported(
                "a collective needs one buffer and one stream per device".into(),
            ));
        }
        if kind == Collective::ReduceScatter && !count.is_multiple_of(n) {
            return Err(Error::Unsupported(format!(
                "reduce-scatter of {count} elements over {n} devices: not a multiple"
            )));
        }
        let part = count / n;
        // SAFETY: no arguments.
        check("ncclGroupStart", unsafe { ncclGroupStart() })?;
        let mut first_err = Ok(());
        for (rank, ((&comm, &buf), &stream)) in self.comms.iter().zip(bufs).zip(streams).enumerate()
        {
            let r = match kind {
                // SAFETY: live communicator; buffer and stream per the caller's contract.
                Collective::AllReduce => check("ncclAllReduce", unsafe {
                    ncclAllReduce(
                        buf as *const c_void,
                        buf as *mut c_void,
                        count,
                        dtype as c_int,
                        SUM,
                        comm,
                        stream,
                    )
                }),
                // SAFETY: as above; the receive part lies inside the buffer (rank < n), which
                // makes the call in place as NCCL defines it.
                Collective::ReduceScatter => check("ncclReduceScatter", unsafe {
                    ncclReduceScatter(
                        buf as *const c_void,
                        (buf + (rank * part * dtype.size()) as u64) as *mut c_void,
                        part,
                        dtype as c_int,
                        SUM,
                        comm,
                        stream,
                    )
                }),
            };
            if first_err.is_ok() {
                first_err = r;
            }
        }
        // The group is closed even after a failed enqueue, so NCCL's state stays consistent.
        // SAFETY: matches the ncclGroupStart above.
        let end = check("ncclGroupEnd", unsafe { ncclGroupEnd() });
        first_err.and(end)
    }
}

impl Comms {
    fn ranks(&self, what: &str, lists: &[usize]) -> Result<c_int> {
        if lists.iter().any(|&l| l != self.comms.len()) {
            return Err(Error::Unsupported(format!(
                "{what} needs one buffer and one stream per device"
            )));
        }
        c_int::try_from(self.comms.len()).map_err(|_| Error::Unsupported("too many devices".into()))
    }

    /// Checks that `shares` are contiguous in rank order from 0.
    fn contiguous(what: &str, shares: &[(usize, usize)]) -> Result<()> {
        let mut next = 0;
        for &(offset, count) in shares {
            if offset != next {
                return Err(Error::Unsupported(format!(
                    "{what}: the shares must be contiguous in rank order from 0"
                )));
            }
            next = offset + count;
        }
        Ok(())
    }

    /// Enqueues a gather of f32 rows: rank `r` contributes `shares[r] = (offset, count)`
    /// elements from `send[r]`, and every rank `i` receives them at element `offset` of
    /// `recv[i]`. The shares must be contiguous in rank order (`offset` of rank `r + 1` =
    /// `offset + count` of rank `r`, from 0). Equal shares run as one `ncclAllGather`; unequal
    /// ones as one `ncclBroadcast` per root, grouped. In place when `send[r]` is element
    /// `offset_r` of `recv[r]`.
    ///
    /// # Safety
    /// `send[r]` holds `count_r` f32 and `recv[i]` holds the sum of the counts, on device `i`
    /// of this communicator set; `streams[i]` is a live stream of that device's primary
    /// context; all stay valid until the streams have run the work. Apart from the in-place
    /// case, a `send` buffer does not overlap a `recv` buffer.
    pub unsafe fn gather(
        &mut self,
        send: &[u64],
        recv: &[u64],
        streams: &[*mut c_void],
        shares: &[(usize, usize)],
    ) -> Result<()> {
        let n = self.ranks(
            "gather",
            &[send.len(), recv.len(), streams.len(), shares.len()],
        )?;
        Comms::contiguous("gather", shares)?;
        let count = shares[0].1;
        if shares.iter().all(|s| s.1 == count) {
            return grouped(|sink| {
                for i in 0..self.comms.len() {
                    // SAFETY: live communicator; buffers and stream per the caller's contract
                    // (rank i's share lies at offset i * count of recv[i]).
                    sink(check("ncclAllGather", unsafe {
                        ncclAllGather(
                            send[i] as *const c_void,
                            recv[i] as *mut c_void,
                            count,
                            Dtype::F32 as c_int,
                            self.comms[i],
                            streams[i],
                        )
                    }));
                }
            });
        }
        grouped(|sink| {
            for root in 0..n {
                let (offset, count) = shares[root as usize];
                for i in 0..self.comms.len() {
                    // Non-root ranks ignore `sendbuff`; their own destination is passed.
                    let src = if i == root as usize {
                        send[i]
                    } else {
                        at(recv[i], offset)
                    };
                    // SAFETY: live communicator; buffers and stream per the caller's contract.
                    sink(check("ncclBroadcast", unsafe {
                        ncclBroadcast(
                            src as *const c_void,
                            at(recv[i], offset) as *mut c_void,
                            count,
                            Dtype::F32 as c_int,
                            root,
                            self.comms[i],
                            streams[i],
                        )
                    }));
                }
            }
        })
    }

    /// Enqueues a sum reduce-scatter of f32 rows: every rank holds a whole buffer `send[i]`,
    /// and rank `r` receives in `recv[r]` the sum over the ranks of elements
    /// `offset_r..offset_r + count_r` (`shares[r]`, contiguous in rank order from 0). Equal
    /// shares run as one `ncclReduceScatter`; unequal ones as one `ncclReduce` per root,
    /// grouped. In place when `recv[r]` is element `offset_r` of `send[r]`.
    ///
    /// # Safety
    /// `send[i]` holds the sum of the counts and `recv[r]` holds `count_r` f32, on device `i`
    /// (`r`) of this communicator set; streams and lifetimes as in [`Comms::gather`]. Apart
    /// from the in-place case, a `recv` buffer does not overlap a `send` buffer.
    pub unsafe fn reduce_scatter_sum(
        &mut self,
        send: &[u64],
        recv: &[u64],
        streams: &[*mut c_void],
        shares: &[(usize, usize)],
    ) -> Result<()> {
        let n = self.ranks(
            "reduce-scatter",
            &[send.len(), recv.len(), streams.len(), shares.len()],
        )?;
        Comms::contiguous("reduce-scatter", shares)?;
        let count = shares[0].1;
        if shares.iter().all(|s| s.1 == count) {
            return grouped(|sink| {
                for i in 0..self.comms.len() {
                    // SAFETY: live communicator; buffers and stream per the caller's contract.
                    sink(check("ncclReduceScatter", unsafe {
                        ncclReduceScatter(
                            send[i] as *const c_void,
                            recv[i] as *mut c_void,
                            count,
                            Dtype::F32 as c_int,
                            SUM,
                            self.comms[i],
                            streams[i],
                        )
                    }));
                }
            });
        }
        grouped(|sink| {
            for root in 0..n {
                let (offset, count) = shares[root as usize];
                for i in 0..self.comms.len() {
                    let src = at(send[i], offset);
                    // Non-root ranks ignore `recvbuff`; their own source is passed.
                    let dst = if i == root as usize { recv[i] } else { src };
                    // SAFETY: live communicator; buffers and stream per the caller's contract.
                    sink(check("ncclReduce", unsafe {
                        ncclReduce(
                            src as *const c_void,
                            dst as *mut c_void,
                            count,
                            Dtype::F32 as c_int,
                            SUM,
                            root,
                            self.comms[i],
                            streams[i],
                        )
                    }));
                }
            }
        })
    }

    /// Enqueues `transfers` as one NCCL group of `ncclSend` / `ncclRecv` pairs (an all-to-all
    /// when every pair of ranks has one), each on the streams of its two ranks.
    ///
    /// # Safety
    /// Each transfer's `send` holds `count` elements of `dtype` on device `src` and `recv` room
    /// for them on device `dst` of this communicator set, no `recv` range overlapping another
    /// transfer's `send` or `recv` range; `streams[i]` is a live stream of device `i`'s primary
    /// context; all stay valid until the streams have run the work.
    pub unsafe fn exchange(
        &mut self,
        transfers: &[Transfer],
        streams: &[*mut c_void],
        dtype: Dtype,
    ) -> Result<()> {
        let n = self.comms.len();
        self.ranks("exchange", &[streams.len()])?;
        if let Some(t) = transfers
            .iter()
            .find(|t| t.src >= n || t.dst >= n || t.src == t.dst)
        {
            return Err(Error::Unsupported(format!(
                "transfer from rank {} to rank {} among {n} ranks",
                t.src, t.dst
            )));
        }
        grouped(|sink| {
            for t in transfers {
                // Ranks are below n <= c_int::MAX (checked by `ranks`).
                let (src, dst) = (t.src as c_int, t.dst as c_int);
                // SAFETY: live communicators; buffers and streams per the caller's contract.
                sink(check("ncclSend", unsafe {
                    ncclSend(
                        t.send as *const c_void,
                        t.count,
                        dtype as c_int,
                        dst,
                        self.comms[t.src],
                        streams[t.src],
                    )
                }));
                // SAFETY: as above.
                sink(check("ncclRecv", unsafe {
                    ncclRecv(
                        t.recv as *mut c_void,
                        t.count,
                        dtype as c_int,
                        src,
                        self.comms[t.dst],
                        streams[t.dst],
                    )
                }));
            }
        })
    }
}

impl Drop for Comms {
    fn drop(&mut self) {
        for &c in &self.comms {
            if !c.is_null() {
                // SAFETY: each communicator was created by ncclCommInitAll and is destroyed
                // once.
                unsafe {
                    ncclCommDestroy(c);
                }
            }
        }
    }
}
