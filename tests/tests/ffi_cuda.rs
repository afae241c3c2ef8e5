//! The `attnrt_cuda_*` entry points through the C ABI. They exist in every build; without the
//! `cuda` feature each returns `ATTNRT_STATUS_BACKEND_UNAVAILABLE` ("attnrt built without
//! CUDA") and writes nothing. In a CUDA build without a usable GPU, `attnrt_cuda_layer_new`
//! fails with a device status (5xx) and writes nothing; with a GPU, an f32 layer matches
//! `attnrt_forward` within 1e-4.

use std::ffi::{c_char, CStr};
use std::ptr;

use attnrt_ffi::*;
use attnrt_tests::ffi_harness::{c_config, c_weights, last_error, CallBuffers, LayerHandle};
use attnrt_tests::{fixtures_dir, load, max_abs_diff, F32_TOL};

use attnrt_status as S;

const F32: u32 = attnrt_cuda_precision::ATTNRT_CUDA_PRECISION_F32 as u32;
const BF16: u32 = attnrt_cuda_precision::ATTNRT_CUDA_PRECISION_BF16 as u32;

fn capability(precision: u32, head_dim: usize, group: usize) -> (attnrt_status, String) {
    let mut buf = [0 as c_char; 256];
    let mut written = usize::MAX;
    // SAFETY: buf valid for its length, written for one write.
    let st = unsafe {
        attnrt_cuda_capability(
            precision,
            head_dim,
            group,
            buf.as_mut_ptr(),
            buf.len(),
            &mut written,
        )
    };
    // SAFETY: NUL-terminated by the call.
    let s = unsafe { CStr::from_ptr(buf.as_ptr()) }
        .to_str()
        .unwrap()
        .to_owned();
    assert_eq!(s.len(), written);
    (st, s)
}

/// Whether this build has the CUDA executor (the capability query says so).
fn built_with_cuda() -> bool {
    let (st, msg) = capability(F32, 64, 1);
    if st == S::ATTNRT_STATUS_BACKEND_UNAVAILABLE {
        assert!(msg.contains("attnrt built without CUDA"), "{msg}");
        false
    } else {
        assert_eq!(st, S::ATTNRT_STATUS_OK, "{msg}");
        true
    }
}

/// The path a device of compute capability `arch` would run, through the ABI.
fn capability_on_arch(
    precision: u32,
    head_dim: usize,
    group: usize,
    arch: (u32, u32),
) -> (attnrt_status, String) {
    let mut buf = [0 as c_char; 256];
    let mut written = usize::MAX;
    // SAFETY: buf valid for its length, written for one write.
    let st = unsafe {
        attnrt_cuda_capability_on_arch(
            precision,
            head_dim,
            group,
            arch.0,
            arch.1,
            buf.as_mut_ptr(),
            buf.len(),
            &mut written,
        )
    };
    // SAFETY: NUL-terminated by the call.
    let s = unsafe { CStr::from_ptr(buf.as_ptr()) }
        .to_str()
        .unwrap()
        .to_owned();
    assert_eq!(s.len(), written);
    (st, s)
}

#[test]
fn capability_on_arch_names_the_hopper_kernel() {
    if !built_with_cuda() {
        let (st, msg) = capability_on_arch(BF16, 128, 4, (9, 0));
        assert_eq!(st, S::ATTNRT_STATUS_BACKEND_UNAVAILABLE, "{msg}");
        return;
    }
    if std::env::var("ATTNRT_CUDA_WGMMA").is_ok_and(|v| v == "0") {
        println!("skipped: ATTNRT_CUDA_WGMMA=0 keeps the portable path");
        return;
    }
    let (st, msg) = capability_on_arch(BF16, 128, 4, (9, 0));
    assert_eq!(st, S::ATTNRT_STATUS_OK, "{msg}");
    assert!(msg.starts_with("wgmma-bf16-d128"), "{msg}");
    // Another architecture or head_dim: the portable answer, word for word.
    for (p, d, g, arch) in [
        (BF16, 128, 4, (8, 0)),
        (BF16, 64, 4, (9, 0)),
        (F32, 128, 4, (9, 0)),
    ] {
        assert_eq!(
            capability_on_arch(p, d, g, arch),
            capability(p, d, g),
            "{d} {arch:?}"
        );
    }
    // Errors as the portable query's.
    let (st, msg) = capability_on_arch(BF16, 33, 1, (9, 0));
    assert_eq!(st, S::ATTNRT_STATUS_UNSUPPORTED, "{msg}");
    assert_eq!(
        capability_on_arch(7, 128, 4, (9, 0)).0,
        S::ATTNRT_STATUS_BAD_ENUM
    );
}

#[test]
fn capability_says_why() {
    let cuda = built_with_cuda();
    for (p, d, g) in [(F32, 64, 1), (BF16, 128, 4), (BF16, 33, 1), (F32, 0, 1)] {
        let (st, msg) = capability(p, d, g);
        if !cuda {
            assert_eq!(st, S::ATTNRT_STATUS_BACKEND_UNAVAILABLE);
            assert!(msg.contains("attnrt built without CUDA"), "{msg}");
        } else if d == 0 || d % 2 == 1 {
            assert_eq!(st, S::ATTNRT_STATUS_UNSUPPORTED, "{msg}");
            assert!(msg.contains("head_dim"), "{msg}");
        } else {
            assert_eq!(st, S::ATTNRT_STATUS_OK, "{msg}");
            assert!(!msg.is_empty());
        }
        assert_eq!(last_error().is_empty(), st == S::ATTNRT_STATUS_OK);
    }
    assert_eq!(capability(7, 64, 1).0, S::ATTNRT_STATUS_BAD_ENUM);
    // NULL buffers are allowed with length 0; a NULL buffer with a length is not.
    // SAFETY: NULL pointers are checked.
    let st = unsafe { attnrt_cuda_capability(F32, 64, 1, ptr::null_mut(), 0, ptr::null_mut()) };
    assert_eq!(st == S::ATTNRT_STATUS_OK, cuda);
    // SAFETY: as above.
    let st = unsafe { attnrt_cuda_capability(F32, 64, 1, ptr::null_mut(), 4, ptr::null_mut()) };
    assert_eq!(st, S::ATTNRT_STATUS_NULL_POINTER);
}

#[test]
fn entry_points_exist_and_write_nothing_without_a_device() {
    let f = load(&fixtures_dir().join("everything.safetensors"));
    let layer = LayerHandle::new(&c_config(&f.cfg), &c_weights(&f));
    let (b, t) = (f.inputs.batch, f.inputs.seq_len);

    let sentinel = 0x5a5a_usize as *mut attnrt_cuda_layer;
    let mut out = sentinel;
    // SAFETY: live layer, valid out pointer.
    let st = unsafe { attnrt_cuda_layer_new(layer.0, F32, b, t, 0, &mut out) };
    let cuda = built_with_cuda();
    if st == S::ATTNRT_STATUS_OK {
        // A CUDA build on a machine with a GPU: the host call matches attnrt_forward.
        assert!(cuda);
        let mut want = CallBuffers::of(&f, &layer);
        let mut ran = attnrt_backend::ATTNRT_BACKEND_AUTO;
        // SAFETY: live handle; buffers valid for their lengths.
        let st = unsafe { attnrt_forward(layer.0, &want.args(), &mut ran) };
        assert_eq!(st, S::ATTNRT_STATUS_OK);
        let mut got = CallBuffers::of(&f, &layer);
        // SAFETY: live CUDA handle; buffers valid for their lengths.
        let st = unsafe { attnrt_cuda_forward_host(out, &got.args(), &mut ran) };
        assert_eq!(st, S::ATTNRT_STATUS_OK, "{}", last_error());
        assert_eq!(ran, attnrt_backend::ATTNRT_BACKEND_CUDA);
        assert!(max_abs_diff(&got.out, &want.out) <= F32_TOL);
        // The kernel that ran and the device, as text (f32: the CUDA-core path).
        let mut buf = [0 as c_char; 128];
        let mut written = 0usize;
        // SAFETY: live handle; buffer valid for its length; one write.
        let st =
            unsafe { attnrt_cuda_layer_backend(out, buf.as_mut_ptr(), buf.len(), &mut written) };
        assert_eq!(st, S::ATTNRT_STATUS_OK, "{}", last_error());
        // SAFETY: NUL-terminated by the call.
        let text = unsafe { CStr::from_ptr(buf.as_ptr()) }.to_str().unwrap();
        assert!(text.starts_with("cuda-cuda-cores-f32 on "), "{text}");
        assert_eq!(text.len(), written);
        // SAFETY: a live handle, freed once.
        unsafe { attnrt_cuda_layer_free(out) };
        return;
    }
    assert_eq!(out, sentinel, "out written on error");
    let msg = last_error();
    if cuda {
        assert_eq!(st as u32 / 100, 5, "{st:?}: {msg}");
    } else {
        assert_eq!(st, S::ATTNRT_STATUS_BACKEND_UNAVAILABLE);
        assert!(msg.contains("attnrt built without CUDA"), "{msg}");
    }

    // Argument checks come first in every build.
    let mut written = 7usize;
    // SAFETY: NULL handle; `written` valid for one write.
    let st = unsafe { attnrt_cuda_layer_backend(ptr::null(), ptr::null_mut(), 0, &mut written) };
    assert_eq!(st, S::ATTNRT_STATUS_NULL_POINTER);
    assert_eq!(written, 7, "written on error");
    // SAFETY: NULL and out-of-range arguments are checked.
    unsafe {
        assert_eq!(
            attnrt_cuda_layer_new(ptr::null(), F32, b, t, 0, &mut out),
            S::ATTNRT_STATUS_NULL_POINTER
        );
        assert_eq!(
            attnrt_cuda_layer_new(layer.0, 9, b, t, 0, &mut out),
            S::ATTNRT_STATUS_BAD_ENUM
        );
        assert_eq!(
            attnrt_cuda_layer_new(layer.0, F32, b, t, 0, ptr::null_mut()),
            S::ATTNRT_STATUS_NULL_POINTER
        );
    }
    assert_eq!(out, sentinel);

    // The forward calls without a handle: NULL is refused, nothing is written.
    let mut bufs = CallBuffers::of(&f, &layer);
    let args = bufs.args();
    let mut ran = std::mem::MaybeUninit::<u32>::new(u32::MAX);
    // SAFETY: a NULL handle is checked before anything is read.
    let st = unsafe {
        attnrt_cuda_forward_host(
            ptr::null(),
            &args,
            ran.as_mut_ptr().cast::<attnrt_backend>(),
        )
    };
    assert_eq!(st, S::ATTNRT_STATUS_NULL_POINTER);
    let mut dev = std::mem::MaybeUninit::uninit();
    // SAFETY: valid for one write.
    assert_eq!(
        unsafe { attnrt_cuda_device_args_init(dev.as_mut_ptr()) },
        S::ATTNRT_STATUS_OK
    );
    // SAFETY: written by the successful call.
    let dev: attnrt_cuda_device_args = unsafe { dev.assume_init() };
    assert_eq!((dev.x, dev.y, dev.max_seqlen), (0, 0, -1));
    assert!(dev.stream.is_null());
    // SAFETY: as above.
    let st = unsafe {
        attnrt_cuda_forward_device(ptr::null(), &dev, ran.as_mut_ptr().cast::<attnrt_backend>())
    };
    assert_eq!(st, S::ATTNRT_STATUS_NULL_POINTER);
    // SAFETY: initialised above and never written by the failing calls.
    assert_eq!(unsafe { ran.assume_init() }, u32::MAX);
    assert!(bufs
        .out
        .iter()
        .all(|v| v.to_bits() == attnrt_tests::ffi_harness::SENTINEL.to_bits()));
    // SAFETY: NULL is a no-op.
    unsafe { attnrt_cuda_layer_free(ptr::null_mut()) };
}

#[test]
fn forced_cuda_through_attnrt_forward_points_to_the_handle_api() {
    let f = load(&fixtures_dir().join("everything.safetensors"));
    let layer = LayerHandle::new(&c_config(&f.cfg), &c_weights(&f));
    let mut bufs = CallBuffers::of(&f, &layer);
    let mut a = bufs.args();
    a.backend = attnrt_backend::ATTNRT_BACKEND_CUDA as u32;
    let mut ran = attnrt_backend::ATTNRT_BACKEND_AUTO;
    // SAFETY: live handle; buffers valid for their lengths.
    let st = unsafe { attnrt_forward(layer.0, &a, &mut ran) };
    assert_eq!(st, S::ATTNRT_STATUS_BACKEND_UNAVAILABLE);
    assert!(
        last_error().contains("attnrt_cuda_layer_new"),
        "{}",
        last_error()
    );
    assert_eq!(ran, attnrt_backend::ATTNRT_BACKEND_AUTO);
}
