//! The scalar reference against the PyTorch float64 golden fixtures, at 1e-4 max abs error.

use attnrt::reference_workspace_len;
use attnrt_tests::{load_all, max_abs_diff, F32_TOL};

#[test]
fn reference_matches_every_golden_fixture() {
    let fixtures = load_all();
    assert!(fixtures.len() >= 20, "only {} fixtures", fixtures.len());
    let mut worst = (0.0f32, String::new());
    for f in &fixtures {
        let layer = f.layer();
        let inputs = f.call_inputs();
        let mut ws = vec![0.0; reference_workspace_len(&f.cfg, f.inputs.seq_len)];
        let mut y = vec![f32::NAN; f.expected.len()];
        layer.forward_reference(&inputs, &mut ws, &mut y).unwrap();
        let err = max_abs_diff(&y, &f.expected);
        println!("{:28} max abs err {err:.2e}", f.name);
        assert!(err <= F32_TOL, "{}: max abs err {err}", f.name);
        if err > worst.0 {
            worst = (err, f.name.clone());
        }
    }
    println!(
        "worst: {} at {:.2e} over {} fixtures",
        worst.1,
        worst.0,
        fixtures.len()
    );
}
