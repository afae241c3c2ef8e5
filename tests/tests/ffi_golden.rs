//! Every golden fixture through the C ABI only, at 1e-4 max abs error: AUTO (which runs the
//! SIMD CPU executor), and forced REFERENCE and CPU_SIMD, which agree within 1e-4; rotary
//! fixtures both with the table the layer builds from theta (freqs_cis NULL) and with a caller
//! table, which must agree bitwise.

use attnrt_ffi::{attnrt_backend, attnrt_status};
use attnrt_tests::ffi_harness::{
    c_config, c_weights, forward, last_error, CallBuffers, LayerHandle,
};
use attnrt_tests::{load_all, max_abs_diff, F32_TOL};

#[test]
fn every_golden_fixture_through_the_abi() {
    let fixtures = load_all();
    assert!(fixtures.len() >= 20, "only {} fixtures", fixtures.len());
    let (mut built, mut caller) = (0, 0);
    let mut worst = 0.0f32;
    for f in &fixtures {
        let layer = LayerHandle::new(&c_config(&f.cfg), &c_weights(f));
        let file_table = f.inputs.freqs_cis.clone();
        // Path 1: the fixture's own table when it has one, else the layer builds it.
        let mut call = CallBuffers::of(f, &layer);
        call.freqs_cis = file_table.clone();
        let (st, ran) = forward(&layer, &call.args());
        assert_eq!(
            st,
            attnrt_status::ATTNRT_STATUS_OK,
            "{}: {}",
            f.name,
            last_error()
        );
        assert_eq!(
            ran,
            attnrt_backend::ATTNRT_BACKEND_CPU_SIMD as u32,
            "{}: AUTO runs the SIMD executor",
            f.name
        );
        let err = max_abs_diff(&call.out, &f.expected);
        println!(
            "{:28} max abs err {err:.2e} ({})",
            f.name,
            match (f.cfg.rope(), &file_table) {
                (None, _) => "no rope",
                (Some(_), Some(_)) => "caller freqs_cis",
                (Some(_), None) => "table built from theta",
            }
        );
        assert!(err <= F32_TOL, "{}: max abs err {err}", f.name);
        worst = worst.max(err);
        match (f.cfg.rope(), &file_table) {
            (Some(_), Some(_)) => caller += 1,
            (Some(_), None) => {
                built += 1;
                // Path 2: the same call with a caller table built over the fixture's positions
                // (tests/src/lib.rs builds it with the runtime): bitwise the same output.
                let mut with_table = CallBuffers::of(f, &layer);
                with_table.freqs_cis = f.table.clone();
                let (st, _) = forward(&layer, &with_table.args());
                assert_eq!(
                    st,
                    attnrt_status::ATTNRT_STATUS_OK,
                    "{}: {}",
                    f.name,
                    last_error()
                );
                assert!(
                    call.out
                        .iter()
                        .zip(&with_table.out)
                        .all(|(a, b)| a.to_bits() == b.to_bits()),
                    "{}: built and caller tables differ",
                    f.name
                );
                caller += 1;
            }
            (None, _) => {}
        }
    }
    println!("worst {worst:.2e}; built-table runs {built}, caller-table runs {caller}");
    assert!(built > 0 && caller > 0);
}

/// Runs `f` through the ABI with `backend` forced; returns the output.
fn run_forced(f: &attnrt_tests::Fixture, layer: &LayerHandle, backend: attnrt_backend) -> Vec<f32> {
    let mut call = CallBuffers::of(f, layer);
    let mut args = call.args();
    args.backend = backend as u32;
    let (st, ran) = forward(layer, &args);
    assert_eq!(
        st,
        attnrt_status::ATTNRT_STATUS_OK,
        "{}: {}",
        f.name,
        last_error()
    );
    assert_eq!(ran, backend as u32, "{}", f.name);
    call.out
}

#[test]
fn forced_reference_and_cpu_simd_agree_and_auto_is_cpu_simd() {
    let mut worst = 0.0f32;
    for f in load_all() {
        let layer = LayerHandle::new(&c_config(&f.cfg), &c_weights(&f));
        let reference = run_forced(&f, &layer, attnrt_backend::ATTNRT_BACKEND_REFERENCE);
        let simd = run_forced(&f, &layer, attnrt_backend::ATTNRT_BACKEND_CPU_SIMD);
        assert!(
            max_abs_diff(&reference, &f.expected) <= F32_TOL,
            "{}",
            f.name
        );
        let err = max_abs_diff(&reference, &simd);
        assert!(err <= F32_TOL, "{}: reference vs cpu simd {err}", f.name);
        worst = worst.max(err);
        let mut auto = CallBuffers::of(&f, &layer);
        assert_eq!(
            forward(&layer, &auto.args()).0,
            attnrt_status::ATTNRT_STATUS_OK
        );
        assert!(
            auto.out
                .iter()
                .zip(&simd)
                .all(|(x, y)| x.to_bits() == y.to_bits()),
            "{}: AUTO differs from forced CPU_SIMD",
            f.name
        );
    }
    println!("reference vs cpu simd: worst max abs diff {worst:.2e}");
}

#[test]
fn the_cpu_tier_is_reported() {
    let mut tier = std::mem::MaybeUninit::<u32>::new(u32::MAX);
    // SAFETY: valid for one write; `attnrt_simd_tier` is a repr(u32) enum.
    let st = unsafe { attnrt_ffi::attnrt_cpu_tier(tier.as_mut_ptr().cast()) };
    assert_eq!(st, attnrt_status::ATTNRT_STATUS_OK);
    // SAFETY: initialised above.
    let tier = unsafe { tier.assume_init() };
    let name = attnrt_ffi::attnrt_simd_tier_name(tier);
    assert!(!name.is_null(), "tier {tier} has no name");
    // SAFETY: a static NUL-terminated string.
    let name = unsafe { std::ffi::CStr::from_ptr(name) }.to_str().unwrap();
    assert_eq!(name, attnrt::cpu_tier().name());
    println!("cpu tier {tier} ({name})");
}
