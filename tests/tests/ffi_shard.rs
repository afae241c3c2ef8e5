//! The multi-device handle through the C ABI only: every golden fixture split over N = 2, 3
//! and 4 CPU devices (where N <= n_head) equals `attnrt_forward` within 1e-4, summed by the
//! library or as partial outputs the caller sums; invalid uses return their status and write
//! nothing.

use std::ptr;

use attnrt_ffi::*;
use attnrt_tests::ffi_harness::{
    c_config, c_weights, last_error, CallBuffers, LayerHandle, SENTINEL,
};
use attnrt_tests::{load_all, max_abs_diff, F32_TOL};

use attnrt_status as S;

struct Sharded(*mut attnrt_sharded_layer);

impl Drop for Sharded {
    fn drop(&mut self) {
        // SAFETY: a live handle, freed once.
        unsafe { attnrt_sharded_layer_free(self.0) };
    }
}

fn new_sharded(
    cfg: &attnrt_config,
    w: &attnrt_weights,
    n: usize,
) -> Result<Sharded, attnrt_status> {
    let mut out: *mut attnrt_sharded_layer = ptr::null_mut();
    // SAFETY: valid config, weights (views of the fixture) and out pointer.
    let st = unsafe { attnrt_sharded_layer_new(cfg, w, n, &mut out) };
    if st == S::ATTNRT_STATUS_OK {
        Ok(Sharded(out))
    } else {
        assert!(out.is_null(), "out written on error");
        Err(st)
    }
}

/// `attnrt_sharded_forward` on `bufs` (whose workspace is resized for the sharded layer and
/// whose output for the mode), returning the status and the backend written.
fn run(s: &Sharded, bufs: &mut CallBuffers, mode: u32, n: usize, threads: usize) -> (S, u32) {
    let mut ws = 0;
    // SAFETY: live handle, valid out pointer.
    let st =
        unsafe { attnrt_sharded_workspace_size(s.0, bufs.batch, bufs.seq_len, threads, &mut ws) };
    assert_eq!(st, S::ATTNRT_STATUS_OK, "{}", last_error());
    bufs.workspace = vec![0.0; ws];
    bufs.num_threads = threads;
    let y = bufs.x.len();
    bufs.out = vec![SENTINEL; if mode == 1 { n * y } else { y }];
    let args = bufs.args();
    let mut ran = std::mem::MaybeUninit::<u32>::new(u32::MAX);
    // SAFETY: live handle; buffers valid for their lengths; a u32 slot holds the enum.
    let st = unsafe {
        attnrt_sharded_forward(s.0, &args, mode, ran.as_mut_ptr().cast::<attnrt_backend>())
    };
    // SAFETY: initialised above.
    (st, unsafe { ran.assume_init() })
}

const SUMMED: u32 = attnrt_shard_mode::ATTNRT_SHARD_MODE_SUMMED as u32;
const PARTIALS: u32 = attnrt_shard_mode::ATTNRT_SHARD_MODE_PARTIALS as u32;
const SIMD: u32 = attnrt_backend::ATTNRT_BACKEND_CPU_SIMD as u32;

#[test]
fn every_fixture_on_2_3_4_cpu_devices_equals_one() {
    let mut covered = 0;
    for f in load_all() {
        let (cfg, w) = (c_config(&f.cfg), c_weights(&f));
        let layer = LayerHandle::new(&cfg, &w);
        let mut one = CallBuffers::of(&f, &layer);
        let mut ran = attnrt_backend::ATTNRT_BACKEND_AUTO;
        // SAFETY: live handle; buffers valid for their lengths.
        let st = unsafe { attnrt_forward(layer.0, &one.args(), &mut ran) };
        assert_eq!(st, S::ATTNRT_STATUS_OK, "{}: {}", f.name, last_error());
        for n in [2, 3, 4] {
            if n > f.cfg.n_head {
                assert_eq!(
                    new_sharded(&cfg, &w, n).err(),
                    Some(S::ATTNRT_STATUS_CONFIG_PAIR)
                );
                continue;
            }
            let s = new_sharded(&cfg, &w, n)
                .unwrap_or_else(|st| panic!("{} on {n}: {st:?}: {}", f.name, last_error()));
            let mut b = CallBuffers::of(&f, &layer);
            let (st, ran) = run(&s, &mut b, SUMMED, n, 1 + n % 3);
            assert_eq!((st, ran), (S::ATTNRT_STATUS_OK, SIMD), "{}", last_error());
            let err = max_abs_diff(&b.out, &one.out);
            assert!(err <= F32_TOL, "{} on {n} devices: {err}", f.name);

            let (st, ran) = run(&s, &mut b, PARTIALS, n, 2);
            assert_eq!((st, ran), (S::ATTNRT_STATUS_OK, SIMD), "{}", last_error());
            let y = one.out.len();
            let mut sum = vec![0.0f32; y];
            for part in b.out.chunks_exact(y) {
                sum.iter_mut().zip(part).for_each(|(a, p)| *a += p);
            }
            let err = max_abs_diff(&sum, &one.out);
            assert!(err <= F32_TOL, "{} partials on {n} devices: {err}", f.name);
            covered += 1;
        }
    }
    assert!(covered >= 30, "only {covered} (fixture, N) pairs");
}

#[test]
fn invalid_uses_write_nothing() {
    let f = load_all().into_iter().next().unwrap();
    let (cfg, w) = (c_config(&f.cfg), c_weights(&f));
    let layer = LayerHandle::new(&cfg, &w);
    assert_eq!(
        new_sharded(&cfg, &w, 0).err(),
        Some(S::ATTNRT_STATUS_CONFIG)
    );
    let mut bad = w;
    bad.wo.len -= 1;
    assert_eq!(
        new_sharded(&cfg, &bad, 2).err(),
        Some(S::ATTNRT_STATUS_WEIGHT_SHAPE)
    );
    let s = new_sharded(&cfg, &w, 2).unwrap();
    let untouched = |b: &CallBuffers| b.out.iter().all(|v| v.to_bits() == SENTINEL.to_bits());

    let mut b = CallBuffers::of(&f, &layer);
    assert_eq!(
        run(&s, &mut b, 2, 2, 1),
        (S::ATTNRT_STATUS_BAD_ENUM, u32::MAX)
    );
    assert!(untouched(&b));

    // PARTIALS with an output sized for SUMMED.
    let mut b = CallBuffers::of(&f, &layer);
    let mut ws = 0;
    // SAFETY: live handle, valid out pointer.
    let st = unsafe { attnrt_sharded_workspace_size(s.0, b.batch, b.seq_len, 1, &mut ws) };
    assert_eq!(st, S::ATTNRT_STATUS_OK);
    b.workspace = vec![0.0; ws];
    let args = b.args();
    let mut ran = attnrt_backend::ATTNRT_BACKEND_AUTO;
    // SAFETY: live handle; buffers valid for their lengths.
    let st = unsafe { attnrt_sharded_forward(s.0, &args, PARTIALS, &mut ran) };
    assert_eq!(st, S::ATTNRT_STATUS_INPUT_SHAPE, "{}", last_error());
    assert_eq!(ran, attnrt_backend::ATTNRT_BACKEND_AUTO);
    assert!(untouched(&b));

    // A workspace one element short, and the forced backends that cannot run it.
    let mut short = args;
    short.workspace_len -= 1;
    for (a, want) in [
        (short, S::ATTNRT_STATUS_WORKSPACE_TOO_SMALL),
        (
            attnrt_forward_args {
                backend: attnrt_backend::ATTNRT_BACKEND_REFERENCE as u32,
                ..args
            },
            S::ATTNRT_STATUS_UNSUPPORTED,
        ),
        (
            attnrt_forward_args {
                backend: attnrt_backend::ATTNRT_BACKEND_CUDA as u32,
                ..args
            },
            S::ATTNRT_STATUS_BACKEND_UNAVAILABLE,
        ),
    ] {
        // SAFETY: as above.
        let st = unsafe { attnrt_sharded_forward(s.0, &a, SUMMED, &mut ran) };
        assert_eq!(st, want, "{}", last_error());
        assert_eq!(ran, attnrt_backend::ATTNRT_BACKEND_AUTO);
        assert!(untouched(&b));
    }
    // SAFETY: NULL handle and arguments are checked.
    unsafe {
        assert_eq!(
            attnrt_sharded_forward(ptr::null(), &args, SUMMED, &mut ran),
            S::ATTNRT_STATUS_NULL_POINTER
        );
        assert_eq!(
            attnrt_sharded_forward(s.0, ptr::null(), SUMMED, &mut ran),
            S::ATTNRT_STATUS_NULL_POINTER
        );
        attnrt_sharded_layer_free(ptr::null_mut());
    }
}
