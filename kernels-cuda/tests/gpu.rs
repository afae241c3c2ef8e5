//! GPU tests: the CUDA executor against the scalar reference (`Layer::forward_reference`) over
//! every mask mode and combination, GQA ratios 1/2/4/8, head_dim 64/128/256 and 80, lengths 1,
//! 63, 64, 65, 200; and every golden fixture on the f32 path.
//!
//! Without a usable device each test prints "skipped: no CUDA device (reason)" and returns.
//!
//! Tolerances:
//! * f32 path: max abs error 1e-4 (SPEC.md, Precision).
//! * bf16 / f16 paths: x, weights, q, k, v, the softmax weights P and the attention output are
//!   rounded to 8 (bf16) or 11 (f16) significant bits, each rounding a relative error of at most
//!   2^-9 (bf16) or 2^-12 (f16); with f32 accumulation these add up over the ~6 roundings of the
//!   pipeline to a few 2^-9 ~ 1e-2 relative at worst, typically far less since roundings
//!   average out. Stated bound: relative L2 error `|y - ref| / |ref|` <= 2e-2 for bf16 and 5e-3
//!   for f16, and max abs error <= 5e-2 * max|ref| (bf16) / 1.5e-2 * max|ref| (f16).

#[cfg(feature = "cuda")]
use attnrt::Rope;
use attnrt::{BiasFlags, Config, Inputs, Layer, QkNorm, RopeTable};
#[cfg(feature = "cuda")]
use attnrt_cuda::{DeviceCall, RopeSource};
use attnrt_cuda::{GpuLayer, GpuOptions, Precision};
use attnrt_tests::{load_all, max_abs_diff, OwnedWeights, Rng, F32_TOL};

mod common;
use common::{
    device_or_skip, make_call, one_gpu, reference, rel_l2, with_mode_window_and_rope, MASK_NAMES,
};

fn config(r: usize, d: usize, mode: usize, variant: usize) -> Config {
    let h = 8;
    let base = Config::new(128, h).with_kv_heads(h / r).with_head_dim(d);
    let mut cfg = with_mode_window_and_rope(base, mode, variant);
    cfg = match variant % 4 {
        1 => cfg.with_qk_norm(QkNorm::PerHead),
        3 => cfg.with_qk_norm(QkNorm::Full),
        _ => cfg,
    };
    match variant % 5 {
        1 => cfg.with_bias(BiasFlags::ALL),
        3 => cfg.with_bias(BiasFlags {
            q: true,
            k: true,
            v: true,
            o: false,
        }),
        _ => cfg,
    }
}

struct Outcome {
    f32_err: f32,
    bf16_rel: f64,
    bf16_max: f32,
}

fn check_case(
    r: usize,
    d: usize,
    t: usize,
    mode: usize,
    variant: usize,
    lowp: &[Precision],
) -> Outcome {
    let cfg = config(r, d, mode, variant);
    let mut rng =
        Rng(0x9E37_79B9_7F4A_7C15 ^ ((r * 1000 + d * 10 + t) as u64) ^ ((mode as u64) << 40));
    let w = OwnedWeights::random(&cfg, &mut rng);
    let layer = Layer::new(cfg, w.view(&cfg)).unwrap();
    let call = make_call(&cfg, mode, t, &mut rng, variant % 2 == 1);
    let inputs = call.inputs(&cfg);
    let want = reference(&layer, &inputs);
    let name = format!(
        "R={r} D={d} T={t} mask={} rope={:?} norm={:?} bias={:?}",
        MASK_NAMES[mode],
        cfg.rope().map(|r| r.convention),
        cfg.qk_norm,
        cfg.bias
    );
    let got = one_gpu(layer, Precision::F32, &inputs);
    let f32_err = max_abs_diff(&got, &want);
    assert!(f32_err <= F32_TOL, "f32 {name}: max abs err {f32_err:.3e}");
    let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs())).max(1e-6);
    let mut out = Outcome {
        f32_err,
        bf16_rel: 0.0,
        bf16_max: 0.0,
    };
    for &p in lowp {
        let got = one_gpu(layer, p, &inputs);
        let rel = rel_l2(&got, &want);
        let max = max_abs_diff(&got, &want) / scale;
        let (rel_tol, max_tol) = match p {
            Precision::F16 => (5e-3, 1.5e-2),
            _ => (2e-2, 5e-2),
        };
        assert!(
            rel <= rel_tol && max <= max_tol,
            "{p:?} {name}: rel L2 {rel:.3e}, max abs / max|ref| {max:.3e}"
        );
        if p == Precision::Bf16 {
            out.bf16_rel = rel;
            out.bf16_max = max;
        }
    }
    out
}

#[test]
fn every_gqa_ratio_head_dim_and_length() {
    if !device_or_skip() {
        return;
    }
    let mut worst = (0.0f32, 0.0f64);
    let mut n = 0;
    for (ri, r) in [1usize, 2, 4, 8].into_iter().enumerate() {
        for (di, d) in [64usize, 128, 256, 80].into_iter().enumerate() {
            for (ti, t) in [1usize, 63, 64, 65, 200].into_iter().enumerate() {
                let mode = (ri + di * 3 + ti) % MASK_NAMES.len();
                let variant = ri * 7 + di * 5 + ti;
                let lowp: &[Precision] = if ti % 2 == 0 {
                    &[Precision::Bf16, Precision::F16]
                } else {
                    &[Precision::Bf16]
                };
                let o = check_case(r, d, t, mode, variant, lowp);
                println!(
                    "R={r} D={d:3} T={t:3} {:20} f32 {:.2e}  bf16 relL2 {:.2e} max {:.2e}",
                    MASK_NAMES[mode], o.f32_err, o.bf16_rel, o.bf16_max
                );
                worst.0 = worst.0.max(o.f32_err);
                worst.1 = worst.1.max(o.bf16_rel);
                n += 1;
            }
        }
    }
    println!(
        "{n} cases: worst f32 max abs err {:.2e}, worst bf16 rel L2 {:.2e}",
        worst.0, worst.1
    );
}

#[test]
fn every_mask_mode_and_combination() {
    if !device_or_skip() {
        return;
    }
    for (r, d) in [(2usize, 64usize), (4, 128), (8, 96)] {
        // head_dim 128 runs the wgmma kernel on sm_90: its 128-key tiles at length tile - 1,
        // tile + 1 and two tiles + 1 (32 queries a CTA at R = 4).
        let lengths: &[usize] = if d == 128 {
            &[65, 127, 129, 200, 257]
        } else {
            &[65, 200]
        };
        for (mode, mask) in MASK_NAMES.iter().enumerate() {
            for &t in lengths {
                let o = check_case(r, d, t, mode, mode * 3 + t, &[Precision::Bf16]);
                println!(
                    "R={r} D={d:3} T={t:3} {mask:20} f32 {:.2e}  bf16 relL2 {:.2e} max {:.2e}",
                    o.f32_err, o.bf16_rel, o.bf16_max
                );
            }
        }
    }
}

#[test]
fn golden_fixtures_on_the_f32_path() {
    if !device_or_skip() {
        return;
    }
    let fixtures = load_all();
    assert!(fixtures.len() >= 20);
    let mut worst = 0.0f32;
    for f in &fixtures {
        let weights = f.file.weights(&f.cfg).unwrap();
        let layer = Layer::new(f.cfg, weights).unwrap();
        let (mask, position_ids) = f.inputs.mask(&f.file).unwrap();
        let inputs = Inputs {
            x: &f.inputs.x,
            batch: f.inputs.batch,
            seq_len: f.inputs.seq_len,
            mask,
            position_ids,
            rope_table: f
                .table
                .as_deref()
                .map(|t| RopeTable::new(t, f.cfg.head_dim).unwrap()),
        };
        let y = one_gpu(layer, Precision::F32, &inputs);
        let err = max_abs_diff(&y, &f.expected);
        println!("{:28} max abs err {err:.2e}", f.name);
        assert!(err <= F32_TOL, "{}: max abs err {err}", f.name);
        worst = worst.max(err);
    }
    println!("golden: worst {worst:.2e} over {} fixtures", fixtures.len());
}

#[test]
fn invalid_inputs_get_the_runtime_errors() {
    if !device_or_skip() {
        return;
    }
    let cfg = Config::new(128, 8).with_kv_heads(2).with_head_dim(64);
    let mut rng = Rng(7);
    let w = OwnedWeights::random(&cfg, &mut rng);
    let layer = Layer::new(cfg, w.view(&cfg)).unwrap();
    let mut gpu = GpuLayer::new(layer, GpuOptions::new(Precision::Bf16, 2, 32)).unwrap();
    let x = rng.vec(2 * 32 * 128, 1.0);
    let bad_lens = [40, 3];
    let mut inputs = Inputs::new(&x, 2, 32);
    inputs.mask.seq_lens = Some(&bad_lens);
    let mut y = vec![7.0f32; x.len()];
    let err = gpu.forward_host(&inputs, &mut y).unwrap_err();
    let want = layer.validate_inputs(&inputs, y.len()).unwrap_err();
    assert_eq!(err, attnrt_cuda::Error::Runtime(want));
    assert!(y.iter().all(|&v| v == 7.0), "output touched on error");
    // Larger than the set-up maxima.
    let x3 = rng.vec(3 * 32 * 128, 1.0);
    let mut y3 = vec![0.0f32; x3.len()];
    let err = gpu
        .forward_host(&Inputs::new(&x3, 3, 32), &mut y3)
        .unwrap_err();
    assert!(
        matches!(err, attnrt_cuda::Error::Capacity { what: "batch", .. }),
        "{err}"
    );
    println!("errors: {err}");
}

#[cfg(feature = "cuda")]
#[test]
fn device_entry_matches_host_entry() {
    if !device_or_skip() {
        return;
    }
    use cust::memory::{CopyDestination, DeviceBuffer};
    let cfg = Config::new(256, 8)
        .with_kv_heads(2)
        .with_head_dim(64)
        .with_rope(Rope::DEFAULT);
    let mut rng = Rng(11);
    let w = OwnedWeights::random(&cfg, &mut rng);
    let layer = Layer::new(cfg, w.view(&cfg)).unwrap();
    let call = make_call(&cfg, 3, 100, &mut rng, true);
    let inputs = call.inputs(&cfg);
    let mut gpu = GpuLayer::new(layer, GpuOptions::new(Precision::Bf16, 2, 128)).unwrap();
    let mut host_y = vec![f32::NAN; call.x.len()];
    gpu.forward_host(&inputs, &mut host_y).unwrap();
    gpu.upload_rope_table(&inputs.rope_table.unwrap()).unwrap();
    let dx = DeviceBuffer::from_slice(&call.x).unwrap();
    let dy = DeviceBuffer::from_slice(&vec![f32::NAN; call.x.len()]).unwrap();
    let dc = DeviceCall {
        x: dx.as_device_ptr().as_raw(),
        y: dy.as_device_ptr().as_raw(),
        batch: call.batch,
        seq_len: call.t,
        mask: inputs.mask,
        position_ids: inputs.position_ids,
        rope: Some(RopeSource::Uploaded),
        stream: std::ptr::null_mut(),
    };
    // SAFETY: dx / dy hold batch * seq_len * n_embd f32 in the device's primary context.
    unsafe { gpu.forward_device(&dc) }.unwrap();
    gpu.synchronize().unwrap();
    let mut dev_y = vec![0.0f32; call.x.len()];
    dy.copy_to(&mut dev_y[..]).unwrap();
    let err = max_abs_diff(&dev_y, &host_y);
    println!("device entry vs host entry: max abs diff {err:.2e}");
    assert!(err == 0.0, "device and host entries differ by {err}");
}
