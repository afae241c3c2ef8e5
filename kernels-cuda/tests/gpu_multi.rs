//! Multi-GPU head split ([`MultiGpuLayer`], NCCL): on 2 GPUs (and 4 when present), for every
//! mask mode, GQA with fewer KV heads than devices, per-head QK-norm, bias and rotary:
//! * f32 path: the split result within 1e-4 (max abs) of `Layer::forward_reference`;
//! * bf16 path: the split result equals the single-GPU `GpuLayer` bf16 result within the bf16
//!   tolerance of `tests/gpu.rs` (relative L2 <= 2e-2, max abs <= 5e-2 * max|ref|);
//! * the partials mode sums to the reduced result.
//!
//! With fewer than 2 devices each test prints "skipped: ..." and returns.
//! `ATTNRT_MULTI_BENCH=1` also runs the prefill bench (T = 16384, n_embd 4096, 32/8 heads,
//! head_dim 128, bf16, causal) on 1, 2 and 4 GPUs (those present).

use std::time::Instant;

use attnrt::{BiasFlags, Config, Inputs, Layer, QkNorm, Rope, RopeConvention};
use attnrt_cuda::{
    device_count, no_device_reason, Error, GpuLayer, GpuOptions, MultiGpuLayer, Precision,
};
use attnrt_tests::{max_abs_diff, OwnedWeights, Rng, F32_TOL};

mod common;
use common::{make_call, reference, rel_l2, MASK_NAMES};

/// The device counts to test (2, and 4 when present), or `None` after printing why not.
fn device_counts() -> Option<Vec<usize>> {
    if let Some(reason) = no_device_reason() {
        println!("skipped: no CUDA device ({reason})");
        return None;
    }
    let n = device_count();
    if n < 2 {
        println!("skipped: the head split needs at least 2 CUDA devices; {n} present");
        return None;
    }
    Some([2usize, 4].into_iter().filter(|&k| k <= n).collect())
}

/// 8 query heads, `kv` KV heads, head_dim 64; `variant` picks rotary / per-head QK-norm / bias.
fn config(kv: usize, mode: usize, variant: usize) -> Config {
    let mut cfg = Config::new(128, 8).with_kv_heads(kv).with_head_dim(64);
    if matches!(mode, 1 | 7 | 8) {
        cfg = cfg.with_sliding_window(17);
    }
    cfg = match variant % 3 {
        0 => cfg,
        1 => cfg.with_rope(Rope::DEFAULT),
        _ => cfg.with_rope(Rope {
            convention: RopeConvention::HalfSplit,
            theta: 500000.0,
            ..Rope::DEFAULT
        }),
    };
    if variant % 2 == 1 {
        cfg = cfg.with_qk_norm(QkNorm::PerHead);
    }
    if variant % 4 < 2 {
        cfg = cfg.with_bias(BiasFlags::ALL);
    }
    cfg
}

fn devices(n: usize) -> Vec<u32> {
    (0..n as u32).collect()
}

// The explicit drops free each device's buffers before the next set-up; without the `cuda`
// feature the stub types have no `Drop`, hence the allow.
#[allow(clippy::drop_non_drop)]
/// One case on `n` devices; returns (f32 max abs err vs reference, bf16 rel L2 vs one GPU,
/// bf16 max abs / max|ref| vs one GPU).
fn check_case(n: usize, kv: usize, mode: usize, variant: usize, t: usize) -> (f32, f64, f32) {
    let cfg = config(kv, mode, variant);
    let mut rng = Rng(0x5EED_0000 ^ ((n * 100 + kv * 10 + mode) as u64) ^ ((t as u64) << 32));
    let w = OwnedWeights::random(&cfg, &mut rng);
    let layer = Layer::new(cfg, w.view(&cfg)).unwrap();
    let call = make_call(&cfg, mode, t, &mut rng, true);
    let inputs = call.inputs(&cfg);
    let len = inputs.batch * t * cfg.n_embd;
    let name = format!(
        "N={n} H=8 KV={kv} T={t} mask={} rope={:?} norm={:?} bias={:?}",
        MASK_NAMES[mode],
        cfg.rope().map(|r| r.convention),
        cfg.qk_norm,
        cfg.bias
    );
    let want = reference(&layer, &inputs);

    // f32: split vs reference, and partials summing to the reduced output.
    let opts = GpuOptions::new(Precision::F32, inputs.batch, t);
    let mut multi = MultiGpuLayer::new(layer, &devices(n), opts)
        .unwrap_or_else(|e| panic!("MultiGpuLayer::new f32 {name}: {e}"));
    let mut got = vec![f32::NAN; len];
    multi
        .forward_host(&inputs, &mut got)
        .unwrap_or_else(|e| panic!("forward_host f32 {name}: {e}"));
    let f32_err = max_abs_diff(&got, &want);
    assert!(f32_err <= F32_TOL, "f32 {name}: max abs err {f32_err:.3e}");
    let mut parts = vec![f32::NAN; n * len];
    multi
        .forward_host_partials(&inputs, &mut parts)
        .unwrap_or_else(|e| panic!("partials {name}: {e}"));
    let mut sum = vec![0.0f32; len];
    for p in parts.chunks_exact(len) {
        for (s, v) in sum.iter_mut().zip(p) {
            *s += v;
        }
    }
    let perr = max_abs_diff(&sum, &got);
    assert!(perr <= 1e-5, "partials {name}: sum differs by {perr:.3e}");
    drop(multi);

    // bf16: split vs one GPU.
    let opts = GpuOptions::new(Precision::Bf16, inputs.batch, t);
    let mut one = GpuLayer::new(layer, opts).unwrap();
    let mut single = vec![f32::NAN; len];
    one.forward_host(&inputs, &mut single).unwrap();
    drop(one);
    let mut multi = MultiGpuLayer::new(layer, &devices(n), opts).unwrap();
    let mut split = vec![f32::NAN; len];
    multi
        .forward_host(&inputs, &mut split)
        .unwrap_or_else(|e| panic!("forward_host bf16 {name}: {e}"));
    let scale = single.iter().fold(0.0f32, |m, v| m.max(v.abs())).max(1e-6);
    let rel = rel_l2(&split, &single);
    let max = max_abs_diff(&split, &single) / scale;
    assert!(
        rel <= 2e-2 && max <= 5e-2,
        "bf16 {name}: split vs one GPU rel L2 {rel:.3e}, max abs / max|ref| {max:.3e}"
    );
    println!("{name}: f32 vs ref {f32_err:.2e}, bf16 vs 1 GPU relL2 {rel:.2e} max {max:.2e}");
    (f32_err, rel, max)
}

#[test]
fn split_equals_one_gpu_every_mask_mode() {
    let Some(counts) = device_counts() else {
        return;
    };
    for n in counts {
        // KV heads: fewer than the devices (replicated), equal, more.
        let kvs: &[usize] = if n == 2 { &[1, 2, 4] } else { &[2, 4, 8] };
        let mut worst = (0.0f32, 0.0f64);
        let mut cases = 0;
        for (mode, _) in MASK_NAMES.iter().enumerate() {
            for (i, &kv) in kvs.iter().enumerate() {
                let t = if (mode + i) % 2 == 0 { 65 } else { 200 };
                let o = check_case(n, kv, mode, mode + i * 3, t);
                worst.0 = worst.0.max(o.0);
                worst.1 = worst.1.max(o.1);
                cases += 1;
            }
        }
        println!(
            "N={n}: {cases} cases, worst f32 max abs err {:.2e}, worst bf16 rel L2 vs one GPU {:.2e}",
            worst.0, worst.1
        );
    }
}

#[test]
fn full_qk_norm_across_gpus_is_unsupported() {
    let Some(_) = device_counts() else {
        return;
    };
    let cfg = Config::new(128, 8)
        .with_kv_heads(2)
        .with_head_dim(64)
        .with_qk_norm(QkNorm::Full);
    let w = OwnedWeights::random(&cfg, &mut Rng(7));
    let layer = Layer::new(cfg, w.view(&cfg)).unwrap();
    let r = MultiGpuLayer::new(layer, &[0, 1], GpuOptions::new(Precision::F32, 1, 8));
    assert!(matches!(r, Err(Error::Unsupported(_))), "{:?}", r.err());
    // One device needs no reduction and works.
    assert!(MultiGpuLayer::new(layer, &[0], GpuOptions::new(Precision::F32, 1, 8)).is_ok());
    // A repeated device is refused.
    let cfg = Config::new(128, 8).with_kv_heads(2).with_head_dim(64);
    let w = OwnedWeights::random(&cfg, &mut Rng(8));
    let layer = Layer::new(cfg, w.view(&cfg)).unwrap();
    let r = MultiGpuLayer::new(layer, &[1, 1], GpuOptions::new(Precision::F32, 1, 8));
    assert!(matches!(r, Err(Error::Unsupported(_))));
}

#[test]
fn bench_prefill_16384() {
    if std::env::var_os("ATTNRT_MULTI_BENCH").is_none() {
        println!("skipped: set ATTNRT_MULTI_BENCH=1 to run the multi-GPU prefill bench");
        return;
    }
    let Some(_) = device_counts() else {
        return;
    };
    let avail = device_count();
    let t = 16384usize;
    let cfg = Config::new(4096, 32).with_kv_heads(8).with_head_dim(128);
    let mut rng = Rng(42);
    let w = OwnedWeights::random(&cfg, &mut rng);
    let layer = Layer::new(cfg, w.view(&cfg)).unwrap();
    let x = rng.vec(t * cfg.n_embd, 1.0);
    let inputs = Inputs::new(&x, 1, t);
    let iters = 10;
    let mut base = 0.0f64;
    println!("prefill T={t} n_embd 4096, 32/8 heads, head_dim 128, bf16, causal, batch 1");
    println!("| GPUs | ms | tokens/s | scaling | ms in NCCL |");
    for n in [1usize, 2, 4].into_iter().filter(|&k| k <= avail) {
        let mut m =
            MultiGpuLayer::new(layer, &devices(n), GpuOptions::new(Precision::Bf16, 1, t)).unwrap();
        m.stage_inputs(&inputs).unwrap();
        for _ in 0..3 {
            m.forward_staged(&inputs).unwrap();
        }
        let mut nccl = 0.0f64;
        let start = Instant::now();
        for _ in 0..iters {
            m.forward_staged(&inputs).unwrap();
            nccl += m.last_nccl_ms() as f64;
        }
        let ms = start.elapsed().as_secs_f64() * 1e3 / iters as f64;
        if n == 1 {
            base = ms;
        }
        println!(
            "| {n} | {ms:.3} | {:.0} | {:.2}x | {:.3} |  ({})",
            t as f64 / (ms / 1e3),
            base / ms,
            nccl / iters as f64,
            m.backend().device
        );
    }
}
