//! Every golden fixture through the C ABI only, at 1e-4 max abs error: rotary fixtures both
//! with the table the layer builds from theta (freqs_cis NULL) and with a caller table, which
//! must agree bitwise.

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
            attnrt_backend::ATTNRT_BACKEND_REFERENCE as u32,
            "{}",
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

#[test]
fn reference_and_auto_agree_bitwise() {
    for f in load_all() {
        let layer = LayerHandle::new(&c_config(&f.cfg), &c_weights(&f));
        let mut a = CallBuffers::of(&f, &layer);
        let mut b = CallBuffers::of(&f, &layer);
        let mut args_b = b.args();
        args_b.backend = attnrt_backend::ATTNRT_BACKEND_REFERENCE as u32;
        assert_eq!(
            forward(&layer, &a.args()).0,
            attnrt_status::ATTNRT_STATUS_OK
        );
        let (st, ran) = forward(&layer, &args_b);
        assert_eq!(st, attnrt_status::ATTNRT_STATUS_OK);
        assert_eq!(ran, attnrt_backend::ATTNRT_BACKEND_REFERENCE as u32);
        assert!(
            a.out
                .iter()
                .zip(&b.out)
                .all(|(x, y)| x.to_bits() == y.to_bits()),
            "{}",
            f.name
        );
    }
}
