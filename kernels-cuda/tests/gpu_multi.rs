//! Multi-GPU head split ([`MultiGpuLayer`], NCCL): on 2 GPUs (and 4 when present).
//!
//! Forward (`forward_host`), every mask mode, KV heads fewer than / equal to / more than the
//! devices, rotary (both conventions), no / per-head / full QK-norm, bias:
//! * f32 path: the split result within 1e-4 (max abs) of `Layer::forward_reference`, with each
//!   reduction of `REDUCTIONS` (all-reduce / reduce-scatter, one chunk / chunks overlapped,
//!   all-to-all of the attention outputs; the last also with unequal head and token shares
//!   and ranks without tokens);
//! * bf16 path: the split result equals the single-GPU `GpuLayer` bf16 result within the bf16
//!   tolerance of `tests/gpu.rs` (relative L2 <= 2e-2, max abs <= 5e-2 * max|ref|), with each
//!   reduction (f32 or bf16 sums, all-reduce or reduce-scatter, chunked or not, all-to-all);
//! * the partials mode sums to the reduced result.
//!
//! Cached calls (`forward_cached` on a `MultiGpuKvCache`): three sequences, prefill (whole or
//! in chunks of 16, a rolling window cache included) then 4 decode steps of all sequences,
//! KV heads fewer than / equal to / more than the devices, no / per-head / full QK-norm, the
//! reductions in turn:
//! * f32: every call within 1e-4 of the scalar reference over each sequence's tokens and of the
//!   CPU `Layer::forward_cached`; every device's K and V pools equal the CPU cache's heads of
//!   that device (1e-4);
//! * bf16: every call equals the single-GPU `GpuLayer::forward_cached` within the bf16
//!   tolerance (and the reference within it too);
//! * both: the steps captured and replayed as CUDA graphs (the default) equal, bit for bit,
//!   the same split enqueueing every launch (`set_step_graphs(false)`), outputs and pools,
//!   and every step was captured (no capture error; the last one as one graph over every
//!   device); on two devices the second split also
//!   sums through NCCL only (`set_peer_sum(false)`), so the peer-memory sum of small calls
//!   is checked against NCCL's bits, and each of its devices stages its own step metadata
//!   (`set_shared_metadata(false)`), so device 0's metadata shared by the others is too.
//!
//! With fewer than 2 devices each test prints "skipped: ..." and returns. The benches (prefill
//! T = 16384 and decode 32 x 8192 on 1 and 2 GPUs) are `attnrt-cuda-bench --multi`.

use attnrt::{
    cached_workspace_len, kv_pool_len, rope, BiasFlags, Config, KvCache, KvPool, Layer, QkNorm,
    Rope, RopeTable, Sequence, Sequential,
};
#[cfg(feature = "cuda")]
use attnrt_cuda::CachedDeviceCall;
use attnrt_cuda::{
    Error, GpuKvCache, GpuLayer, GpuOptions, MultiGpuKvCache, MultiGpuLayer, Precision,
    ReduceOptions, StepGraphLayout,
};
use attnrt_tests::{max_abs_diff, OwnedWeights, Rng, F32_TOL};

mod common;
use common::{
    cached_plan, device_counts, devices, make_call, one_gpu, one_split_at_a_time, plan_call,
    reference, rel_l2, sequence_references, split_config, CachedPlan, MASK_NAMES,
};

/// The reductions the tests run: the exact all-reduce, the storage-type / chunked /
/// reduce-scatter variants (storage type has no effect on f32 layers), and the all-to-all of
/// the attention outputs (sequence-parallel output).
const REDUCTIONS: [ReduceOptions; 5] = [
    ReduceOptions::EXACT,
    ReduceOptions {
        storage_dtype: true,
        chunks: 3,
        scatter: false,
        all_to_all: false,
    },
    ReduceOptions {
        storage_dtype: false,
        chunks: 1,
        scatter: true,
        all_to_all: false,
    },
    ReduceOptions {
        storage_dtype: true,
        chunks: 2,
        scatter: true,
        all_to_all: false,
    },
    ReduceOptions::ALL_TO_ALL,
];

/// bf16 tolerance of tests/gpu.rs: (relative L2, max abs / max|want|) of `got` vs `want`,
/// asserted within (2e-2, 5e-2).
fn bf16_close(what: &str, got: &[f32], want: &[f32]) -> (f64, f32) {
    let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs())).max(1e-6);
    let rel = rel_l2(got, want);
    let max = max_abs_diff(got, want) / scale;
    assert!(
        rel <= 2e-2 && max <= 5e-2,
        "{what}: rel L2 {rel:.3e}, max abs / max|ref| {max:.3e}"
    );
    (rel, max)
}

// The explicit drops free each device's buffers before the next set-up; without the `cuda`
// feature the stub types have no `Drop`, hence the allow.
#[allow(clippy::drop_non_drop)]
/// One case on `n` devices; returns (f32 max abs err vs reference, worst bf16 rel L2 vs one
/// GPU).
fn check_case(
    n: usize,
    kv: usize,
    mode: usize,
    variant: usize,
    norm: QkNorm,
    t: usize,
) -> (f32, f64) {
    let cfg = split_config(kv, mode, variant, norm);
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

    // f32: split vs reference (every reduction), partials summing to the output.
    let opts = GpuOptions::new(Precision::F32, inputs.batch, t);
    let mut multi = MultiGpuLayer::new(layer, &devices(n), opts)
        .unwrap_or_else(|e| panic!("MultiGpuLayer::new f32 {name}: {e}"));
    let mut f32_err = 0.0f32;
    let mut got = Vec::new();
    for reduce in REDUCTIONS {
        multi.set_reduce(reduce).unwrap();
        let mut y = vec![f32::NAN; len];
        multi
            .forward_host(&inputs, &mut y)
            .unwrap_or_else(|e| panic!("forward_host f32 {reduce:?} {name}: {e}"));
        let err = max_abs_diff(&y, &want);
        assert!(
            err <= F32_TOL,
            "f32 {reduce:?} {name}: max abs err {err:.3e}"
        );
        f32_err = f32_err.max(err);
        if reduce == ReduceOptions::EXACT {
            got = y;
        }
    }
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

    // bf16: split vs one GPU, f32 sum and bf16 chunked sum.
    let opts = GpuOptions::new(Precision::Bf16, inputs.batch, t);
    let single = one_gpu(layer, Precision::Bf16, &inputs);
    let mut multi = MultiGpuLayer::new(layer, &devices(n), opts).unwrap();
    let mut worst = 0.0f64;
    for reduce in REDUCTIONS {
        multi.set_reduce(reduce).unwrap();
        let mut split = vec![f32::NAN; len];
        multi
            .forward_host(&inputs, &mut split)
            .unwrap_or_else(|e| panic!("forward_host bf16 {reduce:?} {name}: {e}"));
        let (rel, _) = bf16_close(
            &format!("bf16 {name} {reduce:?}: split vs one GPU"),
            &split,
            &single,
        );
        worst = worst.max(rel);
    }
    println!("{name}: f32 vs ref {f32_err:.2e}, bf16 vs 1 GPU relL2 {worst:.2e}");
    (f32_err, worst)
}

#[test]
fn split_equals_one_gpu_every_mask_mode() {
    let _serial = one_split_at_a_time();
    let Some(counts) = device_counts("the head split") else {
        return;
    };
    let norms = [QkNorm::None, QkNorm::PerHead, QkNorm::Full];
    for n in counts {
        // KV heads: fewer than the devices (replicated), equal, more.
        let kvs: &[usize] = if n == 2 { &[1, 2, 4] } else { &[2, 4, 8] };
        let mut worst = (0.0f32, 0.0f64);
        let mut cases = 0;
        for (mode, _) in MASK_NAMES.iter().enumerate() {
            for (i, &kv) in kvs.iter().enumerate() {
                let t = if (mode + i) % 2 == 0 { 65 } else { 200 };
                // Every (KV heads, norm) pair over three mask modes each.
                let norm = norms[(mode + i) % 3];
                let o = check_case(n, kv, mode, mode + i * 3, norm, t);
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

/// The all-to-all in one chunk and in 3 (exchanges overlapping the projections).
const A2A: [ReduceOptions; 2] = [
    ReduceOptions::ALL_TO_ALL,
    ReduceOptions {
        chunks: 3,
        ..ReduceOptions::ALL_TO_ALL
    },
];

/// The all-to-all (in one chunk and in 3) with head dims that are not multiples of 8, unequal
/// head shares (6 query heads, 3 KV heads: 4/2 on 2 devices,
/// 1/1/2/2 with a replicated KV head on 4), token counts below the device count (ranks
/// without tokens) and uneven token shares, a batch of 2, output bias and full QK-norm: f32
/// within 1e-4 of the reference, bf16 equal to one GPU within the bf16 tolerance.
#[test]
#[allow(clippy::drop_non_drop)]
fn all_to_all_uneven_heads_and_tokens() {
    let _serial = one_split_at_a_time();
    let Some(counts) = device_counts("the head split") else {
        return;
    };
    for n in counts {
        // head_dim 6 and 10 give rows of 12 / 20 bytes per bf16 head: the blocks are put in
        // place in units of 4 and 8 bytes instead of 16.
        for (t, norm, d) in [
            (1usize, QkNorm::None, 32usize),
            (3, QkNorm::Full, 32),
            (37, QkNorm::PerHead, 32),
            (37, QkNorm::None, 6),
            (5, QkNorm::Full, 10),
        ] {
            let cfg = Config::new(96, 6)
                .with_kv_heads(3)
                .with_head_dim(d)
                .with_qk_norm(norm)
                .with_rope(Rope::DEFAULT)
                .with_bias(BiasFlags::ALL);
            let mut rng = Rng(0xA2A0 ^ ((n * 1000 + t) as u64));
            let w = OwnedWeights::random(&cfg, &mut rng);
            let layer = Layer::new(cfg, w.view(&cfg)).unwrap();
            let call = make_call(&cfg, 2, t, &mut rng, true);
            let inputs = call.inputs(&cfg);
            let len = inputs.batch * t * cfg.n_embd;
            let name = format!(
                "all-to-all N={n} H=6 KV=3 D={d} T={t} batch {} {norm:?}",
                inputs.batch
            );
            let want = reference(&layer, &inputs);

            let opts = GpuOptions::new(Precision::F32, inputs.batch, t);
            let mut multi = MultiGpuLayer::new(layer, &devices(n), opts).unwrap();
            let mut err = 0.0f32;
            for reduce in A2A {
                multi.set_reduce(reduce).unwrap();
                assert_eq!(multi.reduce_options(), reduce);
                let mut y = vec![f32::NAN; len];
                multi
                    .forward_host(&inputs, &mut y)
                    .unwrap_or_else(|e| panic!("{name} f32 {reduce:?}: {e}"));
                let e = max_abs_diff(&y, &want);
                assert!(e <= F32_TOL, "{name} f32 {reduce:?}: max abs err {e:.3e}");
                err = err.max(e);
            }
            drop(multi);

            let opts = GpuOptions::new(Precision::Bf16, inputs.batch, t);
            let single = one_gpu(layer, Precision::Bf16, &inputs);
            let mut multi = MultiGpuLayer::new(layer, &devices(n), opts).unwrap();
            let (mut rel, mut same) = (0.0f64, 0.0f32);
            for reduce in A2A {
                multi.set_reduce(reduce).unwrap();
                let mut split = vec![f32::NAN; len];
                multi
                    .forward_host(&inputs, &mut split)
                    .unwrap_or_else(|e| panic!("{name} bf16 {reduce:?}: {e}"));
                let what = format!("{name} bf16 {reduce:?} vs one GPU");
                rel = rel.max(bf16_close(&what, &split, &single).0);
                same = same.max(max_abs_diff(&split, &single));
            }
            println!(
                "{name}: f32 vs ref {err:.2e}, bf16 vs 1 GPU relL2 {rel:.2e} (max abs {same:.2e})"
            );
        }
    }
}

#[test]
fn full_qk_norm_runs_and_bad_set_ups_are_refused() {
    let _serial = one_split_at_a_time();
    let Some(_) = device_counts("the head split") else {
        return;
    };
    let cfg = Config::new(128, 8)
        .with_kv_heads(2)
        .with_head_dim(64)
        .with_qk_norm(QkNorm::Full);
    let w = OwnedWeights::random(&cfg, &mut Rng(7));
    let layer = Layer::new(cfg, w.view(&cfg)).unwrap();
    let mut multi =
        MultiGpuLayer::new(layer, &[0, 1], GpuOptions::new(Precision::F32, 1, 8)).unwrap();
    // Zero chunks is refused, naming the field.
    let r = multi.set_reduce(ReduceOptions {
        chunks: 0,
        ..ReduceOptions::EXACT
    });
    assert!(
        matches!(&r, Err(Error::Unsupported(m)) if m.contains("chunks = 0")),
        "{r:?}"
    );
    assert_eq!(multi.reduce_options(), ReduceOptions::EXACT);
    // A repeated device is refused.
    let r = MultiGpuLayer::new(layer, &[1, 1], GpuOptions::new(Precision::F32, 1, 8));
    assert!(matches!(r, Err(Error::Unsupported(_))));
}

/// One cached case on `n` devices: prefill of three sequences (whole, or in chunks of
/// `chunk`), then 4 decode steps; see the module documentation for the checks. Returns (worst
/// max abs vs reference, worst max abs vs CPU) for f32, (worst rel L2 vs one GPU, 0) for bf16.
#[allow(clippy::too_many_arguments)]
fn cached_case(
    n: usize,
    reduce: ReduceOptions,
    kv: usize,
    norm: QkNorm,
    window: Option<usize>,
    rolling: bool,
    chunk: usize,
    block: usize,
    p: Precision,
    layout: StepGraphLayout,
) -> (f64, f64) {
    let (d, steps) = (64usize, 4usize);
    let prefill = [37usize, 1, 70];
    let mut cfg = Config::new(128, 8)
        .with_kv_heads(kv)
        .with_head_dim(d)
        .with_qk_norm(norm)
        .with_rope(Rope::DEFAULT);
    if norm != QkNorm::PerHead {
        cfg = cfg.with_bias(BiasFlags::ALL);
    }
    if let Some(w) = window {
        cfg = cfg.with_sliding_window(w);
    }
    let name = format!(
        "N={n} KV={kv} norm={norm:?} window={window:?} rolling={rolling} chunk={chunk} block={block} {p:?} {reduce:?}"
    );
    let mut rng = Rng(0xCAC4E ^ (n * 1000 + kv * 100 + block) as u64 ^ (chunk as u64) << 20);
    let w = OwnedWeights::random(&cfg, &mut rng);
    let layer = Layer::new(cfg, w.view(&cfg)).unwrap();
    let max_pos = 70 + steps + 1;
    let mut tb = vec![0.0; rope::table_len(max_pos, d)];
    rope::build_table(cfg.rope().unwrap(), d, &mut tb).unwrap();
    let table = RopeTable::new(&tb, d).unwrap();

    let xs: Vec<Vec<f32>> = prefill
        .iter()
        .map(|&t| rng.vec((t + steps) * cfg.n_embd, 1.0))
        .collect();
    let refs = sequence_references(&layer, table, &xs, &prefill, steps);

    // Calls: the prefill in chunks (all of it at once with chunk = usize::MAX), then the
    // decode steps of every sequence.
    let rolling_window = if rolling { window } else { None };
    let CachedPlan {
        calls,
        num_blocks,
        tables,
    } = cached_plan(&prefill, chunk, steps, rolling_window, block, &mut rng);

    let max_new = 128;
    let opts = GpuOptions::new(p, 1, max_new);
    let mut multi = MultiGpuLayer::new(layer, &devices(n), opts)
        .unwrap_or_else(|e| panic!("MultiGpuLayer::new {name}: {e}"));
    multi.set_reduce(reduce).unwrap();
    multi.set_step_graph_layout(layout);
    let mut cache: MultiGpuKvCache = multi.new_kv_cache(block, num_blocks, rolling).unwrap();
    assert_eq!(cache.n_devices(), n);
    // The same split with every step enqueued launch by launch: the captured and replayed
    // steps (the default) must give the same bits. On two devices it also sums through NCCL
    // only: the peer-memory sum of small steps (the default) gives NCCL's bits there (one
    // addition per element); on more devices both sum through peer memory (in rank order).
    // Its devices each plan and stage their own metadata, where the default shares device
    // 0's when the devices would plan the same.
    let mut launches = MultiGpuLayer::new(layer, &devices(n), opts).unwrap();
    launches.set_reduce(reduce).unwrap();
    launches.set_step_graphs(false);
    launches.set_peer_sum(n != 2);
    launches.set_shared_metadata(false);
    let mut launches_cache = launches.new_kv_cache(block, num_blocks, rolling).unwrap();
    // One GPU (bf16 comparison) and the CPU (f32 comparison) on the same calls.
    let mut one = (p != Precision::F32).then(|| {
        (
            GpuLayer::new(layer, opts).unwrap(),
            GpuKvCache::new(p, kv, d, block, num_blocks, rolling, 0).unwrap(),
        )
    });
    let pool_len = kv_pool_len(kv, d, block, num_blocks);
    let (mut cpu_k, mut cpu_v) = (vec![0.0f32; pool_len], vec![0.0f32; pool_len]);

    let mut worst = (0.0f64, 0.0f64);
    let mut last_tokens = 0;
    for (step, call) in calls.iter().enumerate() {
        let (seqs, x, rows) = plan_call(call, &tables, &xs, cfg.n_embd);
        last_tokens = seqs.iter().map(|s| s.new_tokens).sum::<usize>();
        let what = format!("{name} call {step}");
        // Progress on stderr, so that a hang is located under `timeout` (with --nocapture).
        eprintln!("{what}: {} sequences", seqs.len());
        let mut y = vec![f32::NAN; x.len()];
        multi
            .forward_cached(&x, &seqs, Some(table), &mut cache, &mut y)
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        let mut y_launches = vec![f32::NAN; x.len()];
        launches
            .forward_cached(&x, &seqs, Some(table), &mut launches_cache, &mut y_launches)
            .unwrap_or_else(|e| panic!("{what} (launches): {e}"));
        assert!(
            y.iter()
                .zip(&y_launches)
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "{what}: the replayed step differs from the launched one"
        );
        let want: Vec<f32> = rows
            .iter()
            .flat_map(|&(s, i)| refs[s][i * cfg.n_embd..(i + 1) * cfg.n_embd].to_vec())
            .collect();
        match &mut one {
            None => {
                let mut y_cpu = vec![f32::NAN; x.len()];
                let mut kc = KvCache::new(
                    KvPool::F32 {
                        k: &mut cpu_k,
                        v: &mut cpu_v,
                    },
                    kv,
                    d,
                    block,
                    num_blocks,
                    rolling,
                )
                .unwrap();
                let mut ws = vec![0.0; cached_workspace_len(&cfg, &seqs, 1, num_blocks)];
                layer
                    .forward_cached(
                        &x,
                        &seqs,
                        Some(table),
                        &mut kc,
                        &mut ws,
                        &mut y_cpu,
                        &Sequential,
                    )
                    .unwrap();
                let (a, b) = (max_abs_diff(&y, &want), max_abs_diff(&y, &y_cpu));
                assert!(a <= F32_TOL, "{what}: vs reference max abs err {a:.3e}");
                assert!(
                    b <= F32_TOL,
                    "{what}: vs CPU forward_cached max abs err {b:.3e}"
                );
                worst = (worst.0.max(a as f64), worst.1.max(b as f64));
            }
            Some((gpu, gcache)) => {
                let mut y1 = vec![f32::NAN; x.len()];
                gpu.forward_cached(&x, &seqs, Some(table), gcache, &mut y1)
                    .unwrap();
                let (rel, _) = bf16_close(&format!("{what}: split vs one GPU"), &y, &y1);
                bf16_close(&format!("{what}: split vs reference"), &y, &want);
                worst.0 = worst.0.max(rel);
            }
        }
    }
    assert_eq!(
        multi.step_graph_error(),
        None,
        "{name}: the cached steps were not captured"
    );
    // A graph per device only for steps whose devices exchange nothing but the peer-memory
    // sum: an exact, unchunked f32 all-reduce without full QK-norm statistics.
    let nccl = norm == QkNorm::Full
        || reduce.all_to_all
        || reduce.scatter
        || (reduce.storage_dtype && p != Precision::F32)
        || reduce.chunks.clamp(1, last_tokens) > 1;
    let (want, graphs) = match layout {
        StepGraphLayout::PerDevice if !nccl => (StepGraphLayout::PerDevice, n),
        _ => (StepGraphLayout::Joint, 1),
    };
    assert_eq!(multi.step_graph_layout(), want, "{name}: captured layout");
    assert_eq!(
        multi.step_graph_count(),
        graphs,
        "{name}: the last step was not captured as {want:?}"
    );
    for i in 0..n {
        let (k, v) = cache.device(i).unwrap().read_f32().unwrap();
        let (lk, lv) = launches_cache.device(i).unwrap().read_f32().unwrap();
        assert!(
            k == lk && v == lv,
            "{name}: device {i}'s pools differ between replayed and launched steps"
        );
    }
    if p == Precision::F32 {
        // Device i's pools hold the CPU cache's KV heads of shard i, block by block.
        let bs_elems = block * d;
        for i in 0..n {
            let s = multi.plan().shard(i).unwrap();
            let (k, v) = cache.device(i).unwrap().read_f32().unwrap();
            for (got, all, what) in [(&k, &cpu_k, "K"), (&v, &cpu_v, "V")] {
                let want: Vec<f32> = (0..num_blocks)
                    .flat_map(|b| {
                        let at = (b * kv + s.kv_start) * bs_elems;
                        all[at..at + s.n_kv_head() * bs_elems].to_vec()
                    })
                    .collect();
                let err = max_abs_diff(got, &want);
                assert!(
                    err <= F32_TOL,
                    "{name}: device {i} {what} pool differs from the CPU cache by {err:.3e}"
                );
            }
        }
    }
    println!(
        "{name}: {} calls, replayed steps equal launched ones bit for bit; {}",
        calls.len(),
        if p == Precision::F32 {
            format!(
                "f32 vs reference max {:.2e}, vs CPU forward_cached max {:.2e}, pools equal",
                worst.0, worst.1
            )
        } else {
            format!("bf16 vs one GPU worst relL2 {:.2e}", worst.0)
        }
    );
    worst
}

#[test]
fn split_prefill_and_decode_equal_one_gpu_and_reference() {
    let _serial = one_split_at_a_time();
    let Some(counts) = device_counts("the head split") else {
        return;
    };
    use Precision::{Bf16, F32};
    use QkNorm::{Full, None as NoNorm, PerHead};
    let (joint, per_device) = (StepGraphLayout::Joint, StepGraphLayout::PerDevice);
    for n in counts {
        // KV heads fewer than, equal to and more than the devices.
        let (few, eq, many) = if n == 2 { (1, 2, 4) } else { (2, 4, 8) };
        let whole = usize::MAX;
        let cases = [
            (few, Full, None, false, whole, 16, F32),
            (few, PerHead, Some(37), true, 16, 16, F32),
            (eq, Full, Some(37), false, 16, 8, F32),
            (many, NoNorm, None, false, 16, 24, F32),
            (many, Full, None, false, whole, 16, F32),
            (few, Full, None, false, 16, 16, Bf16),
            (eq, PerHead, None, false, whole, 16, Bf16),
            (few, NoNorm, Some(37), true, 16, 16, Bf16),
            (many, Full, None, false, whole, 32, Bf16),
        ];
        for (i, (kv, norm, window, rolling, chunk, block, p)) in cases.into_iter().enumerate() {
            let reduce = REDUCTIONS[i % REDUCTIONS.len()];
            cached_case(
                n, reduce, kv, norm, window, rolling, chunk, block, p, per_device,
            );
        }
        // Steps whose only exchange is the peer-memory sum: a graph per device (the default),
        // and one joint graph; the all-to-all on bf16 too (chunked prefill, decode steps with
        // fewer sequences than devices on 4: ranks without tokens).
        let exact = ReduceOptions::EXACT;
        #[rustfmt::skip]
        let more = [
            (exact, few, PerHead, Some(37), true, 16, 16, F32, per_device),
            (exact, many, NoNorm, None, false, whole, 16, Bf16, per_device),
            (exact, eq, NoNorm, None, false, 16, 16, F32, joint),
            (A2A[1], few, PerHead, None, false, 16, 16, Bf16, per_device),
            (A2A[1], many, NoNorm, Some(37), true, 16, 16, F32, per_device),
        ];
        for (reduce, kv, norm, window, rolling, chunk, block, p, layout) in more {
            cached_case(
                n, reduce, kv, norm, window, rolling, chunk, block, p, layout,
            );
        }
    }
}

#[test]
fn invalid_cached_calls_through_the_split_write_nothing() {
    let _serial = one_split_at_a_time();
    let Some(_) = device_counts("the head split") else {
        return;
    };
    let cfg = Config::new(128, 8)
        .with_kv_heads(1)
        .with_head_dim(64)
        .with_qk_norm(QkNorm::Full);
    let mut rng = Rng(11);
    let w = OwnedWeights::random(&cfg, &mut rng);
    let layer = Layer::new(cfg, w.view(&cfg)).unwrap();
    let opts = GpuOptions::new(Precision::F32, 1, 64);
    let mut multi = MultiGpuLayer::new(layer, &[0, 1], opts).unwrap();
    let mut cache = multi.new_kv_cache(16, 4, false).unwrap();
    let x = rng.vec(20 * 128, 1.0);
    let mut y = vec![7.0f32; x.len()];
    let untouched = |cache: &MultiGpuKvCache| {
        (0..cache.n_devices()).all(|i| {
            let (k, v) = cache.device(i).unwrap().read_f32().unwrap();
            k.iter().chain(&v).all(|&e| e == 0.0)
        })
    };
    // Block outside the pool: the runtime's error, nothing written.
    let blocks = [0u32, 9];
    let seqs = [Sequence {
        cached: 0,
        new_tokens: 20,
        blocks: &blocks,
    }];
    let err = multi
        .forward_cached(&x, &seqs, None, &mut cache, &mut y)
        .unwrap_err();
    println!("outside the pool: {err}");
    assert!(err.to_string().contains("outside the pool"), "{err}");
    assert!(y.iter().all(|&v| v == 7.0));
    assert!(untouched(&cache), "cache written on error");
    // A cache of another split (one device): refused, nothing written.
    let one = MultiGpuLayer::new(layer, &[0], opts).unwrap();
    let mut other = one.new_kv_cache(16, 4, false).unwrap();
    let blocks = [0u32, 1];
    let seqs = [Sequence {
        cached: 0,
        new_tokens: 20,
        blocks: &blocks,
    }];
    let err = multi
        .forward_cached(&x, &seqs, None, &mut other, &mut y)
        .unwrap_err();
    println!("cache of another split: {err}");
    assert!(err.to_string().contains("kv cache devices"), "{err}");
    assert!(y.iter().all(|&v| v == 7.0));
    assert!(untouched(&other), "cache written on error");
    // A rolling cache on a layer without a window: the runtime's error.
    let mut rolling = multi.new_kv_cache(16, 4, true).unwrap();
    let err = multi
        .forward_cached(&x, &seqs, None, &mut rolling, &mut y)
        .unwrap_err();
    println!("rolling without a window: {err}");
    assert!(y.iter().all(|&v| v == 7.0));
    // A valid call then works on the same cache.
    multi
        .forward_cached(&x, &seqs, None, &mut cache, &mut y)
        .unwrap();
    assert!(y.iter().all(|v| v.is_finite()) && y.iter().any(|&v| v != 7.0));
}

/// Device buffers of a device-resident cached call on device `i`: `x` (the call's rows, f32
/// or bf16 bytes) and room for the f32 output, filled with a marker.
#[cfg(feature = "cuda")]
struct DeviceIo {
    x: cust::memory::DeviceBuffer<u8>,
    out: cust::memory::DeviceBuffer<u8>,
    _ctx: cust::context::Context,
}

#[cfg(feature = "cuda")]
impl DeviceIo {
    fn new(device: u32, x: &[u8], out_len: usize) -> DeviceIo {
        let dev = cust::device::Device::get_device(device).unwrap();
        let ctx = cust::context::Context::new(dev).unwrap();
        cust::context::CurrentContext::set_current(&ctx).unwrap();
        let marker: Vec<u8> = (0..out_len).flat_map(|_| 7.0f32.to_le_bytes()).collect();
        DeviceIo {
            x: cust::memory::DeviceBuffer::from_slice(x).unwrap(),
            out: cust::memory::DeviceBuffer::from_slice(&marker).unwrap(),
            _ctx: ctx,
        }
    }

    fn read_out(&self) -> Vec<f32> {
        cust::context::CurrentContext::set_current(&self._ctx).unwrap();
        let mut host = vec![0u8; self.out.len()];
        cust::memory::CopyDestination::copy_to(&*self.out, &mut host[..]).unwrap();
        host.chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    }
}

/// `forward_cached_device` (x on every device, f32 or storage-type rows; the summed output
/// written on every device) equals `forward_cached` bit for bit on every call of a chunked
/// prefill and 4 decode steps, replayed as graphs and enqueued as launches; bad calls are
/// refused with nothing written.
#[cfg(feature = "cuda")]
#[test]
fn device_resident_cached_calls_equal_host_calls() {
    let _serial = one_split_at_a_time();
    let Some(counts) = device_counts("the head split") else {
        return;
    };
    let storage_all_reduce = ReduceOptions {
        storage_dtype: true,
        ..ReduceOptions::EXACT
    };
    for n in counts {
        for (p, reduce, x_storage, graphs) in [
            (Precision::Bf16, ReduceOptions::EXACT, true, true),
            (Precision::Bf16, storage_all_reduce, false, true),
            (Precision::Bf16, ReduceOptions::EXACT, false, false),
            (Precision::F32, ReduceOptions::EXACT, true, true),
        ] {
            let name = format!("N={n} {p:?} {reduce:?} x_storage={x_storage} graphs={graphs}");
            let (d, steps, kv) = (32usize, 4usize, 2usize);
            let prefill = [21usize, 1, 40];
            let cfg = Config::new(128, 8)
                .with_kv_heads(kv)
                .with_head_dim(d)
                .with_qk_norm(QkNorm::Full)
                .with_bias(BiasFlags::ALL)
                .with_rope(Rope::DEFAULT);
            let mut rng = Rng(0xDE71CE ^ n as u64);
            let w = OwnedWeights::random(&cfg, &mut rng);
            let layer = Layer::new(cfg, w.view(&cfg)).unwrap();
            let mut tb = vec![0.0; rope::table_len(64, d)];
            rope::build_table(cfg.rope().unwrap(), d, &mut tb).unwrap();
            let table = RopeTable::new(&tb, d).unwrap();
            let xs: Vec<Vec<f32>> = prefill
                .iter()
                .map(|&t| rng.vec((t + steps) * cfg.n_embd, 1.0))
                .collect();
            let CachedPlan {
                calls,
                num_blocks,
                tables,
            } = cached_plan(&prefill, 16, steps, None, 16, &mut rng);
            let opts = GpuOptions::new(p, 1, 64);
            let mut host = MultiGpuLayer::new(layer, &devices(n), opts).unwrap();
            let mut dev = MultiGpuLayer::new(layer, &devices(n), opts).unwrap();
            host.set_reduce(reduce).unwrap();
            dev.set_reduce(reduce).unwrap();
            dev.set_step_graphs(graphs);
            let mut host_cache = host.new_kv_cache(16, num_blocks, false).unwrap();
            let mut dev_cache = dev.new_kv_cache(16, num_blocks, false).unwrap();
            for (step, call) in calls.iter().enumerate() {
                let (seqs, x, _) = plan_call(call, &tables, &xs, cfg.n_embd);
                let mut y = vec![f32::NAN; x.len()];
                host.forward_cached(&x, &seqs, Some(table), &mut host_cache, &mut y)
                    .unwrap();
                // Storage-type rows as a bf16 model's previous layer leaves them (f32 on an
                // f32 layer): rounded to nearest even, as the GPU converts f32 rows.
                let bytes: Vec<u8> = if x_storage && p == Precision::Bf16 {
                    x.iter()
                        .flat_map(|&v| half::bf16::from_f32(v).to_bits().to_le_bytes())
                        .collect()
                } else {
                    bytemuck::cast_slice(&x).to_vec()
                };
                let io: Vec<DeviceIo> = (0..n)
                    .map(|i| DeviceIo::new(i as u32, &bytes, x.len()))
                    .collect();
                let xp: Vec<u64> = io.iter().map(|b| b.x.as_device_ptr().as_raw()).collect();
                let op: Vec<u64> = io.iter().map(|b| b.out.as_device_ptr().as_raw()).collect();
                let dcall = CachedDeviceCall {
                    x: &xp,
                    x_storage,
                    out: &op,
                    seqs: &seqs,
                    rope_table: Some(table),
                };
                // SAFETY: each buffer lives on its device with room for the call's rows and
                // output, and outlives the call.
                unsafe { dev.forward_cached_device(&dcall, &mut dev_cache) }
                    .unwrap_or_else(|e| panic!("{name} call {step}: {e}"));
                for (i, b) in io.iter().enumerate() {
                    let got = b.read_out();
                    assert!(
                        got.iter().zip(&y).all(|(a, b)| a.to_bits() == b.to_bits()),
                        "{name} call {step}: device {i}'s output differs from the host call's"
                    );
                }
            }
            assert_eq!(dev.step_graph_error(), None, "{name}");
            println!(
                "{name}: {} calls equal the host calls bit for bit",
                calls.len()
            );

            // Refused with nothing written: a reduce-scatter, a pointer per device missing, a
            // null pointer.
            let seqs = [Sequence {
                cached: prefill[0] + steps,
                new_tokens: 1,
                blocks: &tables[0],
            }];
            let io: Vec<DeviceIo> = (0..n)
                .map(|i| DeviceIo::new(i as u32, &vec![0u8; 4 * cfg.n_embd], cfg.n_embd))
                .collect();
            let xp: Vec<u64> = io.iter().map(|b| b.x.as_device_ptr().as_raw()).collect();
            let op: Vec<u64> = io.iter().map(|b| b.out.as_device_ptr().as_raw()).collect();
            let mut null = op.clone();
            null[n - 1] = 0;
            let scatter = ReduceOptions {
                scatter: true,
                ..ReduceOptions::EXACT
            };
            for (what, out, r) in [
                ("reduce-scatter", &op[..], scatter),
                ("one pointer short", &op[..n - 1], reduce),
                ("null pointer", &null[..], reduce),
            ] {
                if n == 1 && r.scatter {
                    // One device has nothing to scatter: the call is an all-reduce.
                    continue;
                }
                dev.set_reduce(r).unwrap();
                let bad = CachedDeviceCall {
                    x: &xp,
                    x_storage: false,
                    out,
                    seqs: &seqs,
                    rope_table: Some(table),
                };
                // SAFETY: as above (the call is refused before any use).
                let err =
                    unsafe { dev.forward_cached_device(&bad, &mut dev_cache) }.expect_err(what);
                println!("{name}: {what}: {err}");
                for b in &io {
                    assert!(b.read_out().iter().all(|&v| v == 7.0), "{what}: written");
                }
            }
        }
    }
}
