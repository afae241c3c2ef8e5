//! The multi-GPU layer handle (`attnrt_cuda_multi_*`) through the C ABI only.
//!
//! * Invalid uses run in every build: NULL pointers, a bad precision, an empty or repeated
//!   device list and more devices than query heads are refused before any GPU is touched, with
//!   their status and nothing written; an ordinal the driver does not report is
//!   `ATTNRT_STATUS_DEVICE` in a CUDA build, and a build without CUDA says so.
//! * With at least 2 GPUs (else each GPU test prints "skipped: ..." and returns): every golden
//!   fixture (full QK-norm included) on devices [0, 1] (and [1, 0]) in f32 equals the scalar reference through
//!   `attnrt_forward` (backend REFERENCE) within 1e-4, summed by NCCL or as partials the test
//!   sums; a bf16 split equals the single-GPU bf16 handle within the bf16 tolerance; the plan
//!   and backend queries describe the split; call errors write nothing.
//! * Sequence parallelism on the same fixtures: `attnrt_cuda_multi_forward_seq_host` within
//!   1e-4 of the reference (equal and unequal token shares, a rank with no token), and with the
//!   `cuda` feature of this crate (which brings `cust` for device allocations)
//!   `attnrt_cuda_multi_forward_seq_device` on per-device parts equals the host call.

use std::ffi::{c_char, CStr};
use std::ptr;

use attnrt_ffi::*;
use attnrt_tests::ffi_harness::{
    c_config, c_weights, last_error, CallBuffers, LayerHandle, SENTINEL,
};
use attnrt_tests::{fixtures_dir, load, load_all, max_abs_diff, Fixture, F32_TOL};

use attnrt_status as S;

const F32: u32 = attnrt_cuda_precision::ATTNRT_CUDA_PRECISION_F32 as u32;
const BF16: u32 = attnrt_cuda_precision::ATTNRT_CUDA_PRECISION_BF16 as u32;
const SUMMED: u32 = attnrt_shard_mode::ATTNRT_SHARD_MODE_SUMMED as u32;
const PARTIALS: u32 = attnrt_shard_mode::ATTNRT_SHARD_MODE_PARTIALS as u32;
const REFERENCE: u32 = attnrt_backend::ATTNRT_BACKEND_REFERENCE as u32;
const CUDA: u32 = attnrt_backend::ATTNRT_BACKEND_CUDA as u32;

/// An owned multi-GPU handle, freed on drop.
struct Multi(*mut attnrt_cuda_multi_layer);

impl Drop for Multi {
    fn drop(&mut self) {
        // SAFETY: a live handle, freed once.
        unsafe { attnrt_cuda_multi_layer_free(self.0) };
    }
}

/// `attnrt_cuda_multi_layer_new`; on error checks that `out` was left untouched.
fn new_multi(
    layer: &LayerHandle,
    precision: u32,
    batch: usize,
    seq_len: usize,
    devices: &[u32],
) -> Result<Multi, attnrt_status> {
    let sentinel = 0x5a5a_usize as *mut attnrt_cuda_multi_layer;
    let mut out = sentinel;
    // SAFETY: live layer; `devices` valid for its length; valid out pointer.
    let st = unsafe {
        attnrt_cuda_multi_layer_new(
            layer.0,
            precision,
            batch,
            seq_len,
            devices.as_ptr(),
            devices.len(),
            &mut out,
        )
    };
    if st == S::ATTNRT_STATUS_OK {
        assert!(!out.is_null() && out != sentinel);
        Ok(Multi(out))
    } else {
        assert_eq!(out, sentinel, "out written on error {st:?}");
        Err(st)
    }
}

/// Whether this build has CUDA (the device count query says so), and the count when a
/// device is usable.
fn device_count() -> (bool, Result<usize, String>) {
    let mut n = usize::MAX;
    // SAFETY: valid out pointer.
    let st = unsafe { attnrt_cuda_device_count(&mut n) };
    match st {
        S::ATTNRT_STATUS_OK => {
            assert!(n >= 1);
            (true, Ok(n))
        }
        S::ATTNRT_STATUS_BACKEND_UNAVAILABLE => {
            assert_eq!(n, usize::MAX);
            let msg = last_error();
            assert!(msg.contains("attnrt built without CUDA"), "{msg}");
            (false, Err(msg))
        }
        S::ATTNRT_STATUS_DEVICE => {
            assert_eq!(n, usize::MAX);
            (true, Err(last_error()))
        }
        other => panic!("attnrt_cuda_device_count: {other:?}: {}", last_error()),
    }
}

/// The number of GPUs when there are at least 2, else `None` after printing why the test
/// skips.
fn two_gpus_or_skip() -> Option<usize> {
    match device_count() {
        (_, Err(why)) => {
            println!("skipped: no usable CUDA device ({why})");
            None
        }
        (_, Ok(n)) if n < 2 => {
            println!("skipped: the multi-GPU handle needs at least 2 CUDA devices; {n} present");
            None
        }
        (_, Ok(n)) => Some(n),
    }
}

/// A multi-GPU forward on `bufs` (output resized for `mode`), returning the status and the
/// backend written (`u32::MAX` when not).
fn forward(m: &Multi, bufs: &mut CallBuffers, mode: u32, n: usize) -> (attnrt_status, u32) {
    let y = bufs.x.len();
    bufs.out = vec![SENTINEL; if mode == PARTIALS { n * y } else { y }];
    let args = bufs.args();
    let mut ran = std::mem::MaybeUninit::<u32>::new(u32::MAX);
    // SAFETY: live handle; buffers valid for their lengths; a u32 slot holds the enum.
    let st = unsafe {
        attnrt_cuda_multi_forward_host(m.0, &args, mode, ran.as_mut_ptr().cast::<attnrt_backend>())
    };
    // SAFETY: initialised above.
    (st, unsafe { ran.assume_init() })
}

fn seq_args_init() -> attnrt_cuda_multi_seq_args {
    let mut a = std::mem::MaybeUninit::uninit();
    // SAFETY: valid for one write.
    assert_eq!(
        unsafe { attnrt_cuda_multi_seq_args_init(a.as_mut_ptr()) },
        S::ATTNRT_STATUS_OK
    );
    // SAFETY: written by the successful call.
    unsafe { a.assume_init() }
}

/// Rank `i`'s token range through the ABI.
fn token_range(m: &Multi, i: usize, batch: usize, seq_len: usize) -> std::ops::Range<usize> {
    let (mut start, mut end) = (0, 0);
    // SAFETY: live handle, valid out pointers.
    let st = unsafe { attnrt_cuda_multi_token_range(m.0, i, batch, seq_len, &mut start, &mut end) };
    assert_eq!(st, S::ATTNRT_STATUS_OK, "{}", last_error());
    start..end
}

/// A sequence-parallel forward on host buffers.
fn forward_seq(m: &Multi, bufs: &mut CallBuffers) -> (attnrt_status, u32) {
    bufs.out = vec![SENTINEL; bufs.x.len()];
    let args = bufs.args();
    let mut ran = std::mem::MaybeUninit::<u32>::new(u32::MAX);
    // SAFETY: live handle; buffers valid for their lengths; a u32 slot holds the enum.
    let st = unsafe {
        attnrt_cuda_multi_forward_seq_host(m.0, &args, ran.as_mut_ptr().cast::<attnrt_backend>())
    };
    // SAFETY: initialised above.
    (st, unsafe { ran.assume_init() })
}

/// Each rank's rows of `x` in device memory of its device and room for its output rows
/// (at least one row each, so that no pointer is null), through `cust`.
#[cfg(feature = "cuda")]
struct DeviceParts {
    // Dropped before the contexts (field order).
    x: Vec<cust::memory::DeviceBuffer<f32>>,
    y: Vec<cust::memory::DeviceBuffer<f32>>,
    rows: Vec<std::ops::Range<usize>>,
    ctxs: Vec<cust::context::Context>,
}

#[cfg(feature = "cuda")]
impl DeviceParts {
    fn new(m: &Multi, devices: &[u32], x: &[f32], batch: usize, t: usize, c: usize) -> Self {
        use cust::memory::DeviceBuffer;
        let mut p = DeviceParts {
            x: Vec::new(),
            y: Vec::new(),
            rows: Vec::new(),
            ctxs: Vec::new(),
        };
        for (i, &d) in devices.iter().enumerate() {
            let dev = cust::device::Device::get_device(d).unwrap();
            let ctx = cust::context::Context::new(dev).unwrap();
            let r = token_range(m, i, batch, t);
            let mut rows = x[r.start * c..r.end * c].to_vec();
            rows.resize(rows.len().max(c), 0.0);
            p.x.push(DeviceBuffer::from_slice(&rows).unwrap());
            p.y.push(DeviceBuffer::from_slice(&vec![f32::NAN; r.len().max(1) * c]).unwrap());
            p.rows.push(r);
            p.ctxs.push(ctx);
        }
        p
    }

    fn ptrs(b: &[cust::memory::DeviceBuffer<f32>]) -> Vec<u64> {
        b.iter().map(|b| b.as_device_ptr().as_raw()).collect()
    }

    /// Every rank's output rows, concatenated.
    fn read_y(&self, c: usize) -> Vec<f32> {
        use cust::memory::CopyDestination;
        let mut all = Vec::new();
        for ((b, ctx), r) in self.y.iter().zip(&self.ctxs).zip(&self.rows) {
            cust::context::CurrentContext::set_current(ctx).unwrap();
            let mut h = vec![0.0f32; b.len()];
            b.copy_to(&mut h[..]).unwrap();
            all.extend_from_slice(&h[..r.len() * c]);
        }
        all
    }
}

/// `attnrt_cuda_multi_seq_args` of a fixture's call over device parts.
#[cfg(feature = "cuda")]
fn seq_args(bufs: &CallBuffers, x: &[u64], y: &[u64]) -> attnrt_cuda_multi_seq_args {
    fn opt<T>(v: &Option<Vec<T>>) -> (*const T, usize) {
        v.as_ref()
            .map_or((ptr::null(), 0), |v| (v.as_ptr(), v.len()))
    }
    let mut a = seq_args_init();
    a.x_parts = x.as_ptr();
    a.y_parts = y.as_ptr();
    a.n_parts = x.len().min(y.len());
    a.batch = bufs.batch;
    a.seq_len = bufs.seq_len;
    (a.seq_lens, a.seq_lens_len) = opt(&bufs.seq_lens);
    (a.document_ids, a.document_ids_len) = opt(&bufs.document_ids);
    (a.cu_seqlens, a.cu_seqlens_len) = opt(&bufs.cu_seqlens);
    a.max_seqlen = bufs.max_seqlen;
    (a.position_ids, a.position_ids_len) = opt(&bufs.position_ids);
    (a.freqs_cis, a.freqs_cis_len) = opt(&bufs.freqs_cis);
    a
}

#[cfg(feature = "cuda")]
fn forward_seq_device(m: &Multi, a: &attnrt_cuda_multi_seq_args) -> (attnrt_status, u32) {
    let mut ran = std::mem::MaybeUninit::<u32>::new(u32::MAX);
    // SAFETY: live handle; the parts are device allocations of the ranks' devices with room for
    // their rows; host arrays valid for their lengths.
    let st = unsafe {
        attnrt_cuda_multi_forward_seq_device(m.0, a, ran.as_mut_ptr().cast::<attnrt_backend>())
    };
    // SAFETY: initialised above.
    (st, unsafe { ran.assume_init() })
}

fn untouched(out: &[f32]) -> bool {
    out.iter().all(|v| v.to_bits() == SENTINEL.to_bits())
}

/// The reference output of a fixture through `attnrt_forward` with backend REFERENCE.
fn reference(f: &Fixture, layer: &LayerHandle) -> Vec<f32> {
    let mut b = CallBuffers::of(f, layer);
    let mut a = b.args();
    a.backend = REFERENCE;
    let mut ran = attnrt_backend::ATTNRT_BACKEND_AUTO;
    // SAFETY: live handle; buffers valid for their lengths.
    let st = unsafe { attnrt_forward(layer.0, &a, &mut ran) };
    assert_eq!(st, S::ATTNRT_STATUS_OK, "{}: {}", f.name, last_error());
    assert_eq!(ran as u32, REFERENCE);
    // The reference itself is within the f32 bound of the float64 golden output.
    let err = max_abs_diff(&b.out, &f.expected);
    assert!(err <= F32_TOL, "{}: reference vs golden {err}", f.name);
    b.out
}

fn capability(precision: u32, head_dim: usize, group: usize) -> attnrt_status {
    // SAFETY: NULL buffers with length 0 are allowed.
    unsafe {
        attnrt_cuda_capability(
            precision,
            head_dim,
            group,
            ptr::null_mut(),
            0,
            ptr::null_mut(),
        )
    }
}

#[test]
fn invalid_uses_write_nothing_in_every_build() {
    let f = load(&fixtures_dir().join("gqa_rope.safetensors"));
    let layer = LayerHandle::new(&c_config(&f.cfg), &c_weights(&f));
    let (b, t) = (f.inputs.batch, f.inputs.seq_len);
    let (cuda, count) = device_count();
    let mut out = 0x5a5a_usize as *mut attnrt_cuda_multi_layer;

    // SAFETY: NULL arguments are checked before anything is read.
    unsafe {
        let d = [0u32, 1];
        assert_eq!(
            attnrt_cuda_multi_layer_new(ptr::null(), F32, b, t, d.as_ptr(), 2, &mut out),
            S::ATTNRT_STATUS_NULL_POINTER
        );
        assert_eq!(
            attnrt_cuda_multi_layer_new(layer.0, F32, b, t, d.as_ptr(), 2, ptr::null_mut()),
            S::ATTNRT_STATUS_NULL_POINTER
        );
        assert_eq!(
            attnrt_cuda_multi_layer_new(layer.0, F32, b, t, ptr::null(), 2, &mut out),
            S::ATTNRT_STATUS_NULL_POINTER
        );
        assert!(last_error().contains("devices"), "{}", last_error());
        assert_eq!(
            attnrt_cuda_multi_layer_new(layer.0, 3, b, t, d.as_ptr(), 2, &mut out),
            S::ATTNRT_STATUS_BAD_ENUM
        );
        // An empty list, with or without a pointer.
        assert_eq!(
            attnrt_cuda_multi_layer_new(layer.0, F32, b, t, ptr::null(), 0, &mut out),
            S::ATTNRT_STATUS_CONFIG
        );
        assert!(last_error().contains("n_devices"), "{}", last_error());
        assert_eq!(
            attnrt_cuda_multi_layer_new(layer.0, F32, b, t, d.as_ptr(), 0, &mut out),
            S::ATTNRT_STATUS_CONFIG
        );
    }
    assert_eq!(out, 0x5a5a_usize as *mut _);

    // A repeated ordinal, wherever it is.
    for list in [&[0u32, 0][..], &[1, 2, 1], &[3, 0, 1, 0]] {
        assert_eq!(
            new_multi(&layer, F32, b, t, list).err(),
            Some(S::ATTNRT_STATUS_CONFIG)
        );
        let msg = last_error();
        assert!(msg.contains("repeats") && msg.contains("devices["), "{msg}");
    }
    // More devices than the 8 query heads of gqa_rope.
    assert_eq!(f.cfg.n_head, 8);
    let nine: Vec<u32> = (0..9).collect();
    assert_eq!(
        new_multi(&layer, F32, b, t, &nine).err(),
        Some(S::ATTNRT_STATUS_CONFIG_PAIR)
    );
    assert!(last_error().contains("n_head"), "{}", last_error());

    // An ordinal the driver does not report (or, without CUDA, the build's reason).
    let beyond = count.as_ref().map_or(0, |&n| n as u32);
    let st = new_multi(&layer, F32, b, t, &[beyond + 7, beyond]).err();
    let msg = last_error();
    if cuda {
        assert_eq!(st, Some(S::ATTNRT_STATUS_DEVICE), "{msg}");
        assert!(
            msg.contains(&format!("devices[0] = {}", beyond + 7)),
            "{msg}"
        );
    } else {
        assert_eq!(st, Some(S::ATTNRT_STATUS_BACKEND_UNAVAILABLE));
        assert!(msg.contains("attnrt built without CUDA"), "{msg}");
        // Every valid list then fails the same way, writing nothing.
        assert_eq!(
            new_multi(&layer, F32, b, t, &[0, 1]).err(),
            Some(S::ATTNRT_STATUS_BACKEND_UNAVAILABLE)
        );
    }

    // Calls and queries without a handle.
    let mut bufs = CallBuffers::of(&f, &layer);
    let args = bufs.args();
    let mut ran = std::mem::MaybeUninit::<u32>::new(u32::MAX);
    let mut n = usize::MAX;
    let mut shard = std::mem::MaybeUninit::<attnrt_device_shard>::uninit();
    let mut ms = f32::NAN;
    let mut text = [0 as c_char; 8];
    let mut written = usize::MAX;
    // SAFETY: NULL handles are checked before anything is read.
    unsafe {
        for mode in [SUMMED, PARTIALS] {
            assert_eq!(
                attnrt_cuda_multi_forward_host(
                    ptr::null(),
                    &args,
                    mode,
                    ran.as_mut_ptr().cast::<attnrt_backend>()
                ),
                S::ATTNRT_STATUS_NULL_POINTER
            );
        }
        assert_eq!(
            attnrt_cuda_multi_layer_n_devices(ptr::null(), &mut n),
            S::ATTNRT_STATUS_NULL_POINTER
        );
        assert_eq!(
            attnrt_cuda_multi_layer_shard(ptr::null(), 0, shard.as_mut_ptr()),
            S::ATTNRT_STATUS_NULL_POINTER
        );
        assert_eq!(
            attnrt_cuda_multi_last_nccl_ms(ptr::null(), &mut ms),
            S::ATTNRT_STATUS_NULL_POINTER
        );
        assert_eq!(
            attnrt_cuda_multi_layer_backend(
                ptr::null(),
                text.as_mut_ptr(),
                text.len(),
                &mut written
            ),
            S::ATTNRT_STATUS_NULL_POINTER
        );
        assert_eq!(
            attnrt_cuda_device_count(ptr::null_mut()),
            S::ATTNRT_STATUS_NULL_POINTER
        );
        assert_eq!(
            attnrt_cuda_multi_forward_seq_host(
                ptr::null(),
                &args,
                ran.as_mut_ptr().cast::<attnrt_backend>()
            ),
            S::ATTNRT_STATUS_NULL_POINTER
        );
        let seq = seq_args_init();
        assert!(seq.x_parts.is_null() && seq.y_parts.is_null() && seq.freqs_cis.is_null());
        assert_eq!((seq.n_parts, seq.batch, seq.max_seqlen), (0, 0, -1));
        assert_eq!(
            attnrt_cuda_multi_forward_seq_device(
                ptr::null(),
                &seq,
                ran.as_mut_ptr().cast::<attnrt_backend>()
            ),
            S::ATTNRT_STATUS_NULL_POINTER
        );
        assert_eq!(
            attnrt_cuda_multi_seq_args_init(ptr::null_mut()),
            S::ATTNRT_STATUS_NULL_POINTER
        );
        let (mut start, mut end) = (usize::MAX, usize::MAX);
        assert_eq!(
            attnrt_cuda_multi_token_range(ptr::null(), 0, 1, 4, &mut start, &mut end),
            S::ATTNRT_STATUS_NULL_POINTER
        );
        assert_eq!((start, end), (usize::MAX, usize::MAX));
        attnrt_cuda_multi_layer_free(ptr::null_mut());
    }
    // SAFETY: initialised above, never written by the failing calls.
    assert_eq!(unsafe { ran.assume_init() }, u32::MAX);
    assert_eq!((n, written), (usize::MAX, usize::MAX));
    assert!(ms.is_nan());
    assert!(text.iter().all(|&c| c == 0));
    assert!(untouched(&bufs.out));
}

/// The plan and backend queries of a live handle on `devices` for a layer of `n_head` query
/// and `n_kv_head` KV heads.
fn check_queries(m: &Multi, devices: &[u32], n_head: usize, n_kv_head: usize) {
    let mut n = 0;
    // SAFETY: live handle, valid out pointer.
    assert_eq!(
        unsafe { attnrt_cuda_multi_layer_n_devices(m.0, &mut n) },
        S::ATTNRT_STATUS_OK
    );
    assert_eq!(n, devices.len());
    let mut next_q = 0;
    for (i, &d) in devices.iter().enumerate() {
        let mut s = std::mem::MaybeUninit::<attnrt_device_shard>::uninit();
        // SAFETY: live handle, valid out pointer.
        let st = unsafe { attnrt_cuda_multi_layer_shard(m.0, i, s.as_mut_ptr()) };
        assert_eq!(st, S::ATTNRT_STATUS_OK, "{}", last_error());
        // SAFETY: written by the successful call.
        let s = unsafe { s.assume_init() };
        assert_eq!(s.device, d);
        // Query heads tile 0..n_head in rank order; each device's KV heads serve its queries.
        assert_eq!(s.q_head_start, next_q);
        assert!(s.q_head_end > s.q_head_start);
        next_q = s.q_head_end;
        let r = n_head / n_kv_head;
        assert!(s.kv_head_start <= s.q_head_start / r);
        assert!(s.kv_head_end > (s.q_head_end - 1) / r && s.kv_head_end <= n_kv_head);
    }
    assert_eq!(next_q, n_head);
    let sentinel = attnrt_device_shard {
        device: 77,
        q_head_start: 1,
        q_head_end: 2,
        kv_head_start: 3,
        kv_head_end: 4,
    };
    let mut s = sentinel;
    // SAFETY: live handle, valid out pointer.
    let st = unsafe { attnrt_cuda_multi_layer_shard(m.0, devices.len(), &mut s) };
    assert_eq!(st, S::ATTNRT_STATUS_INPUT_VALUE);
    assert_eq!(s, sentinel);

    let mut buf = [0 as c_char; 256];
    let mut written = 0;
    // SAFETY: buf valid for its length.
    let st =
        unsafe { attnrt_cuda_multi_layer_backend(m.0, buf.as_mut_ptr(), buf.len(), &mut written) };
    assert_eq!(st, S::ATTNRT_STATUS_OK);
    // SAFETY: NUL-terminated by the call.
    let text = unsafe { CStr::from_ptr(buf.as_ptr()) }.to_str().unwrap();
    assert_eq!(text.len(), written);
    assert!(text.starts_with("cuda-"), "{text}");
    assert!(text.contains(&format!("{devices:?}")), "{text}");
    assert!(text.contains("NCCL 2"), "{text}");
}

#[test]
fn every_fixture_on_two_gpus_equals_the_reference() {
    let Some(count) = two_gpus_or_skip() else {
        return;
    };
    let mut covered = 0;
    for f in load_all() {
        let (cfg, w) = (c_config(&f.cfg), c_weights(&f));
        let layer = LayerHandle::new(&cfg, &w);
        let (b, t) = (f.inputs.batch, f.inputs.seq_len);
        let want = reference(&f, &layer);
        let group = f.cfg.n_head / f.cfg.n_kv_head;
        if capability(F32, f.cfg.head_dim, group) != S::ATTNRT_STATUS_OK {
            assert_eq!(
                new_multi(&layer, F32, b, t, &[0, 1]).err(),
                Some(S::ATTNRT_STATUS_UNSUPPORTED),
                "{}",
                f.name
            );
            println!(
                "{}: the f32 CUDA path cannot run it (as on one GPU)",
                f.name
            );
            continue;
        }
        for devices in [[0u32, 1], [1, 0]] {
            let m = new_multi(&layer, F32, b, t, &devices)
                .unwrap_or_else(|st| panic!("{} on {devices:?}: {st:?}: {}", f.name, last_error()));
            check_queries(&m, &devices, f.cfg.n_head, f.cfg.n_kv_head);
            let mut bufs = CallBuffers::of(&f, &layer);
            let got = forward(&m, &mut bufs, SUMMED, 2);
            assert_eq!(
                got,
                (S::ATTNRT_STATUS_OK, CUDA),
                "{}: {}",
                f.name,
                last_error()
            );
            let err = max_abs_diff(&bufs.out, &want);
            assert!(
                err <= F32_TOL,
                "{} on {devices:?}: max abs err {err:.3e}",
                f.name
            );
            let mut ms = f32::NAN;
            // SAFETY: live handle, valid out pointer.
            let st = unsafe { attnrt_cuda_multi_last_nccl_ms(m.0, &mut ms) };
            assert_eq!(st, S::ATTNRT_STATUS_OK);
            assert!(ms.is_finite() && ms >= 0.0, "{ms}");

            let got = forward(&m, &mut bufs, PARTIALS, 2);
            assert_eq!(
                got,
                (S::ATTNRT_STATUS_OK, CUDA),
                "{}: {}",
                f.name,
                last_error()
            );
            let y = want.len();
            let mut sum = vec![0.0f32; y];
            for part in bufs.out.chunks_exact(y) {
                sum.iter_mut().zip(part).for_each(|(s, p)| *s += p);
            }
            let perr = max_abs_diff(&sum, &want);
            assert!(
                perr <= F32_TOL,
                "{} partials: max abs err {perr:.3e}",
                f.name
            );

            // Sequence parallel: the ranks' rows tile the tokens; the result is the layer's.
            let tokens = b * t;
            let ranges: Vec<_> = (0..2).map(|i| token_range(&m, i, b, t)).collect();
            assert_eq!((ranges[0].start, ranges[0].end), (0, ranges[1].start));
            assert_eq!(ranges[1].end, tokens);
            assert_eq!(ranges[0].len(), tokens.div_ceil(2));
            let got = forward_seq(&m, &mut bufs);
            assert_eq!(
                got,
                (S::ATTNRT_STATUS_OK, CUDA),
                "{}: {}",
                f.name,
                last_error()
            );
            let serr = max_abs_diff(&bufs.out, &want);
            assert!(
                serr <= F32_TOL,
                "{} seq-parallel: max abs err {serr:.3e}",
                f.name
            );
            #[cfg(feature = "cuda")]
            let derr = {
                let c = f.cfg.n_embd;
                let parts = DeviceParts::new(&m, &devices, &bufs.x, b, t, c);
                let (xp, yp) = (DeviceParts::ptrs(&parts.x), DeviceParts::ptrs(&parts.y));
                let a = seq_args(&bufs, &xp, &yp);
                let got = forward_seq_device(&m, &a);
                assert_eq!(
                    got,
                    (S::ATTNRT_STATUS_OK, CUDA),
                    "{}: {}",
                    f.name,
                    last_error()
                );
                let derr = max_abs_diff(&parts.read_y(c), &bufs.out);
                assert!(
                    derr <= 1e-6,
                    "{} device parts vs host call: {derr:.3e}",
                    f.name
                );
                derr
            };
            #[cfg(not(feature = "cuda"))]
            let derr = f32::NAN;
            println!(
                "{} on {devices:?}: summed {err:.2e}, partials {perr:.2e}, NCCL {ms:.3} ms; \
                 seq-parallel {tokens} tokens {serr:.2e}, device parts {derr:.1e}",
                f.name
            );
        }
        covered += 1;
    }
    // Every fixture but those the f32 kernels cannot run on one GPU either.
    assert!(covered >= 20, "only {covered} fixtures ran on 2 GPUs");
    println!("{covered} fixtures on 2 of {count} GPUs");
}

#[test]
fn bf16_split_equals_one_gpu() {
    if two_gpus_or_skip().is_none() {
        return;
    }
    for name in [
        "gqa_rope",
        "window_varlen_gqa_qknorm",
        "long_tiles",
        "mqa_rope",
    ] {
        let f = load(&fixtures_dir().join(format!("{name}.safetensors")));
        let layer = LayerHandle::new(&c_config(&f.cfg), &c_weights(&f));
        let (b, t) = (f.inputs.batch, f.inputs.seq_len);
        let mut one: *mut attnrt_cuda_layer = ptr::null_mut();
        // SAFETY: live layer, valid out pointer.
        let st = unsafe { attnrt_cuda_layer_new(layer.0, BF16, b, t, 0, &mut one) };
        assert_eq!(st, S::ATTNRT_STATUS_OK, "{}", last_error());
        let mut single = CallBuffers::of(&f, &layer);
        let mut ran = attnrt_backend::ATTNRT_BACKEND_AUTO;
        // SAFETY: live handle; buffers valid for their lengths.
        let st = unsafe { attnrt_cuda_forward_host(one, &single.args(), &mut ran) };
        assert_eq!(st, S::ATTNRT_STATUS_OK, "{}", last_error());
        // SAFETY: a live handle, freed once.
        unsafe { attnrt_cuda_layer_free(one) };

        let m = new_multi(&layer, BF16, b, t, &[0, 1]).unwrap();
        let mut split = CallBuffers::of(&f, &layer);
        assert_eq!(
            forward(&m, &mut split, SUMMED, 2),
            (S::ATTNRT_STATUS_OK, CUDA)
        );
        // The bf16 tolerance of kernels-cuda/tests/gpu.rs: relative L2 <= 2e-2 and max abs
        // <= 5e-2 of the largest magnitude.
        let scale = single
            .out
            .iter()
            .fold(0.0f32, |m, v| m.max(v.abs()))
            .max(1e-6);
        let (mut num, mut den) = (0.0f64, 0.0f64);
        for (a, r) in split.out.iter().zip(&single.out) {
            num += f64::from(a - r).powi(2);
            den += f64::from(*r).powi(2);
        }
        let rel = (num / den.max(1e-30)).sqrt();
        let max = max_abs_diff(&split.out, &single.out) / scale;
        assert!(
            rel <= 2e-2 && max <= 5e-2,
            "{name}: rel L2 {rel:.3e}, max {max:.3e}"
        );
        println!("{name} bf16: split vs one GPU rel L2 {rel:.2e}, max/scale {max:.2e}");
    }
}

#[test]
fn call_errors_on_a_live_handle_write_nothing() {
    let Some(count) = two_gpus_or_skip() else {
        return;
    };
    let f = load(&fixtures_dir().join("padding.safetensors"));
    let layer = LayerHandle::new(&c_config(&f.cfg), &c_weights(&f));
    let (b, t) = (f.inputs.batch, f.inputs.seq_len);
    // An ordinal past the driver's count, after a valid one.
    assert_eq!(
        new_multi(&layer, F32, b, t, &[0, count as u32]).err(),
        Some(S::ATTNRT_STATUS_DEVICE)
    );
    assert!(
        last_error().contains(&format!("devices[1] = {count}")),
        "{}",
        last_error()
    );
    // A handle one row short of the call.
    let m = new_multi(&layer, F32, b - 1, t, &[0, 1]).unwrap();
    let mut bufs = CallBuffers::of(&f, &layer);
    for mode in [SUMMED, PARTIALS] {
        assert_eq!(
            forward(&m, &mut bufs, mode, 2),
            (S::ATTNRT_STATUS_DEVICE_CAPACITY, u32::MAX)
        );
        assert!(untouched(&bufs.out));
    }
    let m = new_multi(&layer, F32, b, t, &[0, 1]).unwrap();
    assert_eq!(
        forward(&m, &mut bufs, 2, 2),
        (S::ATTNRT_STATUS_BAD_ENUM, u32::MAX)
    );
    assert!(untouched(&bufs.out));
    // Outputs of the other mode's length.
    for (mode, len) in [(SUMMED, 2 * bufs.x.len()), (PARTIALS, bufs.x.len())] {
        let mut a = bufs.args();
        let mut out = vec![SENTINEL; len];
        a.out = out.as_mut_ptr();
        a.out_len = len;
        let mut ran = std::mem::MaybeUninit::<u32>::new(u32::MAX);
        // SAFETY: live handle; buffers valid for their lengths.
        let st = unsafe {
            attnrt_cuda_multi_forward_host(m.0, &a, mode, ran.as_mut_ptr().cast::<attnrt_backend>())
        };
        assert_eq!(st, S::ATTNRT_STATUS_INPUT_SHAPE, "{}", last_error());
        // SAFETY: initialised above.
        assert_eq!(unsafe { ran.assume_init() }, u32::MAX);
        assert!(untouched(&out));
    }
    // A padding length past T.
    let mut bad = CallBuffers::of(&f, &layer);
    bad.seq_lens.as_mut().unwrap()[0] = t as i32 + 1;
    assert_eq!(
        forward(&m, &mut bad, SUMMED, 2),
        (S::ATTNRT_STATUS_INPUT_VALUE, u32::MAX)
    );
    assert!(untouched(&bad.out));
    assert_eq!(
        forward_seq(&m, &mut bad),
        (S::ATTNRT_STATUS_INPUT_VALUE, u32::MAX)
    );
    assert!(untouched(&bad.out));
    let (mut start, mut end) = (usize::MAX, usize::MAX);
    // SAFETY: live handle, valid out pointers.
    let st = unsafe { attnrt_cuda_multi_token_range(m.0, 2, b, t, &mut start, &mut end) };
    assert_eq!(st, S::ATTNRT_STATUS_INPUT_VALUE);
    assert_eq!((start, end), (usize::MAX, usize::MAX));
    #[cfg(feature = "cuda")]
    {
        let c = f.cfg.n_embd;
        let parts = DeviceParts::new(&m, &[0, 1], &bufs.x, b, t, c);
        let (xp, yp) = (DeviceParts::ptrs(&parts.x), DeviceParts::ptrs(&parts.y));
        let good = seq_args(&bufs, &xp, &yp);
        let mut one_part = good;
        one_part.n_parts = 1;
        let null_y = [yp[0], 0];
        let mut null_part = good;
        null_part.y_parts = null_y.as_ptr();
        let mut long = good;
        long.seq_len = t + 1;
        long.seq_lens = ptr::null();
        long.seq_lens_len = 0;
        let mut bad_lens = good;
        let lens = vec![t as i32 + 1; b];
        bad_lens.seq_lens = lens.as_ptr();
        for (a, want) in [
            (one_part, S::ATTNRT_STATUS_INPUT_SHAPE),
            (null_part, S::ATTNRT_STATUS_NULL_POINTER),
            (long, S::ATTNRT_STATUS_DEVICE_CAPACITY),
            (bad_lens, S::ATTNRT_STATUS_INPUT_VALUE),
        ] {
            assert_eq!(
                forward_seq_device(&m, &a),
                (want, u32::MAX),
                "{}",
                last_error()
            );
        }
        assert!(last_error().contains("seq_lens"), "{}", last_error());
        assert!(parts.read_y(c).iter().all(|v| v.is_nan()));
    }
}
