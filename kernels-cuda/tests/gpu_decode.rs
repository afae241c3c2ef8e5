//! GPU KV cache and split-K decode (`GpuLayer::forward_cached` over a `GpuKvCache`): prefill of
//! T tokens of several sequences into a paged cache (shuffled block tables, power-of-two and
//! other block sizes, rolling window), then k single-token decode steps of all sequences at
//! once, against
//! * the scalar reference over the T + k tokens of each sequence (f32 path: max abs error 1e-4;
//!   bf16 / f16: the tolerances of tests/gpu.rs, derived there: relative L2 <= 2e-2 / 5e-3 and
//!   max abs <= 5e-2 / 1.5e-2 x max|ref|);
//! * the CPU `attnrt::Layer::forward_cached` on the same calls with a CPU cache of the same
//!   precision and layout (same tolerances), and its cache contents (f32: 1e-4).
//!
//! Without a usable device each test prints "skipped: no CUDA device (reason)" and returns.

use attnrt::{
    cached_workspace_len, kv_pool_len, rope, Config, KvCache, KvPool, Layer, Rope, RopeTable,
    Sequence, Sequential,
};
use attnrt_cuda::{DecodeTuning, GpuKvCache, GpuLayer, GpuOptions, Precision};
use attnrt_tests::{max_abs_diff, OwnedWeights, Rng, F32_TOL};
use half::{bf16, f16};

mod common;
use common::{cached_plan, device_or_skip, plan_call, rel_l2, sequence_references, CachedPlan};

/// Checks `got` against `want` at the precision's tolerance; returns (max abs, rel L2).
fn check(p: Precision, what: &str, got: &[f32], want: &[f32]) -> (f32, f64) {
    let max = max_abs_diff(got, want);
    let rel = rel_l2(got, want);
    let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs())).max(1e-6);
    match p {
        Precision::F32 => assert!(max <= F32_TOL, "{what}: max abs err {max:.3e}"),
        _ => {
            let (rt, mt) = if p == Precision::F16 {
                (5e-3, 1.5e-2)
            } else {
                (2e-2, 5e-2)
            };
            assert!(
                rel <= rt && max / scale <= mt,
                "{what}: rel L2 {rel:.3e}, max abs / max|ref| {:.3e}",
                max / scale
            );
        }
    }
    (max, rel)
}

/// CPU pools of one precision.
enum Pools {
    F32(Vec<f32>, Vec<f32>),
    F16(Vec<f16>, Vec<f16>),
    Bf16(Vec<bf16>, Vec<bf16>),
}

impl Pools {
    fn new(p: Precision, n: usize) -> Pools {
        match p {
            Precision::F32 => Pools::F32(vec![0.0; n], vec![0.0; n]),
            Precision::F16 => Pools::F16(vec![f16::ZERO; n], vec![f16::ZERO; n]),
            Precision::Bf16 => Pools::Bf16(vec![bf16::ZERO; n], vec![bf16::ZERO; n]),
        }
    }
    fn pool(&mut self) -> KvPool<'_> {
        match self {
            Pools::F32(k, v) => KvPool::F32 { k, v },
            Pools::F16(k, v) => KvPool::F16 { k, v },
            Pools::Bf16(k, v) => KvPool::Bf16 { k, v },
        }
    }
    fn k_f32(&self) -> Vec<f32> {
        match self {
            Pools::F32(k, _) => k.clone(),
            Pools::F16(k, _) => k.iter().map(|v| v.to_f32()).collect(),
            Pools::Bf16(k, _) => k.iter().map(|v| v.to_f32()).collect(),
        }
    }
}

struct Case {
    r: usize,
    d: usize,
    window: Option<usize>,
    rolling: bool,
    block: usize,
    p: Precision,
    /// Query heads.
    heads: usize,
    /// Keys per split (0: planned); small splits make every token several splits, merged by
    /// the last CTA to finish.
    split: usize,
}

fn run_case(c: &Case) {
    let (h, steps) = (c.heads, 5usize);
    let prefill = [70usize, 1, 150];
    let mut cfg = Config::new(128, h)
        .with_kv_heads(h / c.r)
        .with_head_dim(c.d)
        .with_rope(Rope::DEFAULT);
    if let Some(w) = c.window {
        cfg = cfg.with_sliding_window(w);
    }
    let mut rng = Rng(0xD1CE ^ (c.r * 1000 + c.d * 7 + c.block) as u64);
    let w = OwnedWeights::random(&cfg, &mut rng);
    let layer = Layer::new(cfg, w.view(&cfg)).unwrap();
    let max_pos = 160 + steps;
    let mut tb = vec![0.0; rope::table_len(max_pos, c.d)];
    rope::build_table(cfg.rope().unwrap(), c.d, &mut tb).unwrap();
    let table = RopeTable::new(&tb, c.d).unwrap();

    // Per sequence: all its tokens, and the reference over all of them.
    let xs: Vec<Vec<f32>> = prefill
        .iter()
        .map(|&t| rng.vec((t + steps) * cfg.n_embd, 1.0))
        .collect();
    let refs = sequence_references(&layer, table, &xs, &prefill, steps);

    // Calls: the prefill (whole, or in chunks of 16 for a rolling cache so that it wraps
    // around), then `steps` single-token decode steps of every sequence.
    let chunk = if c.rolling { 16 } else { usize::MAX };
    let rolling_window = if c.rolling { c.window } else { None };
    let CachedPlan {
        calls,
        num_blocks,
        tables,
    } = cached_plan(&prefill, chunk, steps, rolling_window, c.block, &mut rng);

    let kvh = cfg.n_kv_head;
    eprintln!(
        "R={} D={} window={:?} rolling={} block={} {:?}: references done, {} calls",
        c.r,
        c.d,
        c.window,
        c.rolling,
        c.block,
        c.p,
        calls.len()
    );
    let pool_len = kv_pool_len(kvh, c.d, c.block, num_blocks);
    let mut cpu_pools = Pools::new(c.p, pool_len);
    let mut gpu_cache = GpuKvCache::new(c.p, kvh, c.d, c.block, num_blocks, c.rolling, 0).unwrap();
    let mut gpu = GpuLayer::new(layer, GpuOptions::new(c.p, 1, 256)).unwrap();
    gpu.set_decode_tuning(DecodeTuning {
        split: c.split,
        ..DecodeTuning::default()
    });

    let name = format!(
        "R={} D={} window={:?} rolling={} block={} {:?} split={}",
        c.r, c.d, c.window, c.rolling, c.block, c.p, c.split
    );
    let (mut worst_ref, mut worst_cpu) = ((0.0f32, 0.0f64), (0.0f32, 0.0f64));
    for (step, call) in calls.iter().enumerate() {
        let (seqs, x, rows): (Vec<Sequence<'_>>, Vec<f32>, Vec<(usize, usize)>) = {
            let (seqs, x, rows) = plan_call(call, &tables, &xs, cfg.n_embd);
            (seqs, x, rows)
        };
        let mut y_gpu = vec![f32::NAN; x.len()];
        // Progress on stderr before and after each GPU call, so that a hang (a kernel that never
        // finishes, seen as a spinning cuStreamSynchronize) is located under `timeout`.
        let calls_desc: Vec<String> = seqs
            .iter()
            .map(|s| format!("{}+{}", s.cached, s.new_tokens))
            .collect();
        eprintln!("{name} step {step}: gpu call (cached+new {calls_desc:?}) ...");
        let t0 = std::time::Instant::now();
        gpu.forward_cached(&x, &seqs, Some(table), &mut gpu_cache, &mut y_gpu)
            .unwrap_or_else(|e| panic!("{name} step {step}: {e}"));
        eprintln!(
            "{name} step {step}: gpu call done in {:.1} ms, shape (items, tokens, split) {:?}",
            t0.elapsed().as_secs_f64() * 1e3,
            gpu.last_cached_shape()
        );
        // bf16 / f16 at the tensor-core head_dims take the tensor-core kernel, the rest the
        // CUDA-core one: the case covers the kernel it names.
        let kernel = gpu.last_decode_kernel().unwrap_or_default();
        let tc = c.p != Precision::F32 && matches!(c.d, 64 | 96 | 128 | 256);
        assert_eq!(
            kernel.starts_with("decode_tc_"),
            tc,
            "{name}: kernel {kernel}"
        );
        let mut y_cpu = vec![f32::NAN; x.len()];
        {
            let mut cache =
                KvCache::new(cpu_pools.pool(), kvh, c.d, c.block, num_blocks, c.rolling).unwrap();
            let mut ws = vec![0.0; cached_workspace_len(&cfg, &seqs, 1, num_blocks)];
            layer
                .forward_cached(
                    &x,
                    &seqs,
                    Some(table),
                    &mut cache,
                    &mut ws,
                    &mut y_cpu,
                    &Sequential,
                )
                .unwrap();
        }
        let want: Vec<f32> = rows
            .iter()
            .flat_map(|&(s, i)| refs[s][i * cfg.n_embd..(i + 1) * cfg.n_embd].to_vec())
            .collect();
        let a = check(
            c.p,
            &format!("{name} step {step} vs reference"),
            &y_gpu,
            &want,
        );
        let b = check(
            c.p,
            &format!("{name} step {step} vs CPU forward_cached"),
            &y_gpu,
            &y_cpu,
        );
        worst_ref = (worst_ref.0.max(a.0), worst_ref.1.max(a.1));
        worst_cpu = (worst_cpu.0.max(b.0), worst_cpu.1.max(b.1));
    }
    if c.p == Precision::F32 {
        let (k_gpu, _) = gpu_cache.read_f32().unwrap();
        let err = max_abs_diff(&k_gpu, &cpu_pools.k_f32());
        assert!(
            err <= F32_TOL,
            "{name}: K pool differs from the CPU cache by {err:.3e}"
        );
    }
    let shape = gpu.last_cached_shape();
    println!(
        "{name}: {}: vs reference max {:.2e} relL2 {:.2e}; vs CPU max {:.2e} relL2 {:.2e}; last call (items, tokens, split) {shape:?}",
        gpu.last_decode_kernel().unwrap_or_default(),
        worst_ref.0, worst_ref.1, worst_cpu.0, worst_cpu.1
    );
}

#[test]
fn prefill_then_decode_matches_reference_and_cpu() {
    if !device_or_skip() {
        return;
    }
    // (R, head_dim, window, rolling, block size, precision, query heads, split)
    let cases = [
        (4, 128, None, false, 16, Precision::F32, 8, 0),
        (2, 64, None, false, 24, Precision::F32, 8, 0),
        (1, 256, None, false, 16, Precision::F32, 8, 0),
        (8, 80, Some(37), true, 16, Precision::F32, 8, 0),
        (8, 64, Some(37), false, 8, Precision::F32, 8, 0),
        (4, 128, None, false, 16, Precision::Bf16, 8, 0),
        (8, 64, Some(37), true, 16, Precision::Bf16, 8, 0),
        (2, 256, None, false, 32, Precision::Bf16, 8, 0),
        (4, 96, None, false, 16, Precision::F16, 8, 0),
        // Several splits per token, merged in the kernel: tensor cores with splits crossing
        // 24-slot blocks, with a rolling window (f16), and the CUDA-core kernel.
        (4, 128, None, false, 24, Precision::Bf16, 8, 16),
        (2, 64, Some(37), true, 16, Precision::F16, 8, 32),
        (4, 128, None, false, 16, Precision::F32, 8, 48),
        // 16 query heads per KV head: two head chunks of the tensor-core kernel.
        (16, 64, None, false, 16, Precision::Bf16, 16, 0),
        (16, 64, None, false, 16, Precision::Bf16, 16, 32),
        // The CUDA-core kernel in bf16 (head_dim 80 has no tensor-core variant).
        (4, 80, None, false, 16, Precision::Bf16, 8, 0),
    ];
    // ATTNRT_DECODE_CASES=0,3 runs only those cases (debugging, compute-sanitizer).
    let only: Option<Vec<usize>> = std::env::var("ATTNRT_DECODE_CASES")
        .ok()
        .map(|v| v.split(',').filter_map(|i| i.trim().parse().ok()).collect());
    for (i, (r, d, window, rolling, block, p, heads, split)) in cases.into_iter().enumerate() {
        if only.as_ref().is_some_and(|o| !o.contains(&i)) {
            continue;
        }
        run_case(&Case {
            r,
            d,
            window,
            rolling,
            block,
            p,
            heads,
            split,
        });
    }
}

#[test]
fn invalid_cached_calls_get_the_runtime_errors() {
    if !device_or_skip() {
        return;
    }
    let cfg = Config::new(128, 8).with_kv_heads(2).with_head_dim(64);
    let mut rng = Rng(3);
    let w = OwnedWeights::random(&cfg, &mut rng);
    let layer = Layer::new(cfg, w.view(&cfg)).unwrap();
    let mut gpu = GpuLayer::new(layer, GpuOptions::new(Precision::Bf16, 1, 64)).unwrap();
    let mut cache = GpuKvCache::new(Precision::Bf16, 2, 64, 16, 4, false, 0).unwrap();
    let x = rng.vec(20 * 128, 1.0);
    let mut y = vec![7.0f32; x.len()];
    // Cache full: 20 tokens in one block of 16.
    let blocks = [1u32];
    let seqs = [Sequence {
        cached: 0,
        new_tokens: 20,
        blocks: &blocks,
    }];
    let err = gpu
        .forward_cached(&x, &seqs, None, &mut cache, &mut y)
        .unwrap_err();
    println!("cache full: {err}");
    assert!(y.iter().all(|&v| v == 7.0));
    // Block outside the pool.
    let blocks = [0u32, 9];
    let seqs = [Sequence {
        cached: 0,
        new_tokens: 20,
        blocks: &blocks,
    }];
    let err = gpu
        .forward_cached(&x, &seqs, None, &mut cache, &mut y)
        .unwrap_err();
    println!("outside the pool: {err}");
    assert!(err.to_string().contains("outside the pool"), "{err}");
    assert!(y.iter().all(|&v| v == 7.0));
    let (k, _) = cache.read_f32().unwrap();
    assert!(k.iter().all(|&v| v == 0.0), "cache written on error");
}
