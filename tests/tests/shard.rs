//! Head split over CPU "devices": the plan's invariants and rules, invalid plans, and the split
//! result against the single-device CPU executor and the scalar reference for N = 2, 3, 4
//! devices, every mask mode, MHA/GQA/MQA (KV heads fewer than devices too), per-head and full
//! QK-norm, biases; the caller-reduces and sequence-parallel modes; devices on their own
//! threads with an all-reduce hook; prefill and decode with a per-device KV cache.

use std::sync::{Barrier, Mutex};

use attnrt::{
    cached_workspace_len, cpu_workspace_len, kv_pool_len, reference_workspace_len, rope, BiasFlags,
    Config, Error, Inputs, KvCache, KvPool, Layer, MaskInputs, QkNorm, Rope, RopeTable,
    ScopedThreads, Sequence, Sequential, ShardLayer, ShardPlan, ShardedLayer, Tensor,
};
use attnrt_tests::{max_abs_diff, OwnedWeights, Rng, F32_TOL};

fn plans_to_check() -> Vec<(usize, usize)> {
    // (n_head, n_kv_head)
    vec![
        (1, 1),
        (4, 4),
        (8, 8),
        (8, 2),
        (8, 1),
        (12, 3),
        (12, 4),
        (16, 8),
        (6, 2),
        (32, 8),
        (7, 7),
        (9, 3),
    ]
}

#[test]
fn every_plan_owns_each_head_once_with_its_kv_head() {
    let d = 4;
    for (h, kv) in plans_to_check() {
        let cfg = Config::new(h * d, h).with_kv_heads(kv);
        let r = h / kv;
        for n in 1..=h {
            let plan = ShardPlan::new(cfg, n).unwrap();
            let shards: Vec<_> = (0..n).map(|i| plan.shard(i).unwrap()).collect();
            let mut q_owner = vec![usize::MAX; h];
            let mut kv_first = vec![0usize; kv];
            let mut kv_held = vec![0usize; kv];
            for (i, s) in shards.iter().enumerate() {
                assert_eq!(s.device, i);
                assert!(
                    s.n_head() >= 1 && s.n_kv_head() >= 1,
                    "{h}/{kv} on {n}: {s:?}"
                );
                for q in s.q_heads() {
                    assert_eq!(q_owner[q], usize::MAX, "query head {q} owned twice");
                    q_owner[q] = i;
                    assert!(s.kv_heads().contains(&cfg.kv_head_of(q)), "{h}/{kv} on {n}");
                }
                for g in s.kv_heads() {
                    kv_held[g] += 1;
                    kv_first[g] += s.kv_first as usize;
                }
                if kv >= n {
                    assert_eq!(s.q_heads(), s.kv_start * r..s.kv_end * r);
                } else {
                    assert_eq!(s.n_kv_head(), 1);
                }
                // Weight slices: rows of wq / wk / wv and columns of wo follow the heads.
                assert_eq!(s.q_rows(d), s.q_start * d..s.q_end * d);
                assert_eq!(s.kv_rows(d), s.kv_start * d..s.kv_end * d);
                // Per-device configuration.
                let c = plan.shard_config(i).unwrap();
                assert_eq!((c.n_head, c.n_kv_head), (s.n_head(), s.n_kv_head()));
                assert_eq!((c.head_dim, c.n_embd), (cfg.head_dim, cfg.n_embd));
            }
            // Every query head exactly once, contiguous in device order (so wq rows and wo
            // columns are covered exactly, in order).
            assert!(q_owner.iter().all(|&o| o < n));
            assert!(q_owner.windows(2).all(|w| w[0] <= w[1]));
            let rows: Vec<_> = shards.iter().flat_map(|s| s.q_rows(d)).collect();
            assert_eq!(rows, (0..h * d).collect::<Vec<_>>());
            // Every KV head held, counted once in the norm statistics.
            assert!(kv_held.iter().all(|&c| c >= 1));
            assert!(kv_first.iter().all(|&c| c == 1));
            if kv >= n {
                assert!(kv_held.iter().all(|&c| c == 1), "no replication needed");
            }
            // Balance: KV head counts differ by at most one; with replication, the devices
            // sharing a KV head differ by at most one query head and the KV heads' device
            // counts by at most one.
            let counts: Vec<_> = shards.iter().map(|s| s.n_head()).collect();
            let (lo, hi) = (counts.iter().min().unwrap(), counts.iter().max().unwrap());
            if kv >= n {
                let kvc: Vec<_> = shards.iter().map(|s| s.n_kv_head()).collect();
                assert!(kvc.iter().max().unwrap() - kvc.iter().min().unwrap() <= 1);
            } else {
                for g in 0..kv {
                    let c: Vec<_> = shards
                        .iter()
                        .filter(|s| s.kv_start == g)
                        .map(|s| s.n_head())
                        .collect();
                    assert!(c.iter().max().unwrap() - c.iter().min().unwrap() <= 1);
                }
                let (a, b) = (kv_held.iter().min().unwrap(), kv_held.iter().max().unwrap());
                assert!(b - a <= 1, "{h}/{kv} on {n}: {kv_held:?}");
            }
            assert_eq!(plan.is_even(), lo == hi);
        }
    }
}

#[test]
fn documented_examples() {
    // 8 KV heads on 3 devices: 3/3/2.
    let plan = ShardPlan::new(Config::new(64, 8), 3).unwrap();
    let kv: Vec<_> = (0..3).map(|i| plan.shard(i).unwrap().kv_heads()).collect();
    assert_eq!(kv, vec![0..3, 3..6, 6..8]);
    assert!(!plan.is_even());
    // 2 KV heads, 8 query heads on 4 devices: devices 0, 1 share KV head 0.
    let plan = ShardPlan::even(Config::new(64, 8).with_kv_heads(2), 4).unwrap();
    let s: Vec<_> = (0..4).map(|i| plan.shard(i).unwrap()).collect();
    assert_eq!(
        s.iter()
            .map(|s| (s.q_heads(), s.kv_heads(), s.kv_first))
            .collect::<Vec<_>>(),
        vec![
            (0..2, 0..1, true),
            (2..4, 0..1, false),
            (4..6, 1..2, true),
            (6..8, 1..2, false)
        ]
    );
    // Uneven replication: 2 KV heads (R = 4) on 3 devices: KV head 0 on devices 0, 1.
    let plan = ShardPlan::new(Config::new(64, 8).with_kv_heads(2), 3).unwrap();
    let q: Vec<_> = (0..3).map(|i| plan.shard(i).unwrap().q_heads()).collect();
    assert_eq!(q, vec![0..2, 2..4, 4..8]);
    // MQA on 3 devices: 3/3/2 query heads, all on KV head 0.
    let plan = ShardPlan::new(Config::new(64, 8).with_kv_heads(1), 3).unwrap();
    let q: Vec<_> = (0..3).map(|i| plan.shard(i).unwrap().q_heads()).collect();
    assert_eq!(q, vec![0..3, 3..6, 6..8]);
    // Output bias on device 0 only.
    let cfg = Config::new(64, 8).with_bias(BiasFlags::ALL);
    let plan = ShardPlan::new(cfg, 2).unwrap();
    assert!(plan.shard_config(0).unwrap().bias.o && !plan.shard_config(1).unwrap().bias.o);
    assert!(plan.shard_config(1).unwrap().bias.q);
    // Full QK-norm needs the reduction on more than one device only.
    let full = Config::new(64, 8).with_qk_norm(QkNorm::Full);
    assert!(ShardPlan::new(full, 2).unwrap().needs_norm_reduction());
    assert!(!ShardPlan::new(full, 1).unwrap().needs_norm_reduction());
    assert!(!ShardPlan::new(cfg, 2).unwrap().needs_norm_reduction());
}

fn pair_field(e: Error) -> (&'static str, &'static str) {
    match e {
        Error::ConfigPair { field, other, .. } => (field, other),
        Error::Config { field, .. } => (field, ""),
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn invalid_plans_say_why() {
    let gqa = Config::new(64, 8).with_kv_heads(2);
    let e = ShardPlan::new(gqa, 0).unwrap_err();
    assert_eq!(pair_field(e), ("n_devices", ""));
    assert!(e.to_string().contains("at least one device"), "{e}");
    let e = ShardPlan::new(gqa, 9).unwrap_err();
    assert_eq!(pair_field(e), ("n_devices", "n_head"));
    assert!(
        e.to_string().contains("more devices than query heads"),
        "{e}"
    );
    // An invalid configuration is reported as such.
    let e = ShardPlan::new(Config::new(64, 8).with_kv_heads(3), 2).unwrap_err();
    assert_eq!(pair_field(e), ("n_head", "n_kv_head"));
    // Even plans.
    let e = ShardPlan::even(Config::new(64, 8), 3).unwrap_err();
    assert_eq!(pair_field(e), ("n_kv_head", "n_devices"));
    let e = ShardPlan::even(gqa, 3).unwrap_err();
    assert_eq!(pair_field(e), ("n_devices", "n_kv_head"));
    let e = ShardPlan::even(Config::new(48, 6).with_kv_heads(2), 4).unwrap_err();
    assert_eq!(
        pair_field(e),
        ("n_head / n_kv_head", "n_devices / n_kv_head")
    );
    assert!(
        e.to_string().contains("cut its query group unevenly"),
        "{e}"
    );
    for (h, kv, n) in [(8, 8, 4), (8, 2, 4), (8, 2, 8), (8, 1, 8), (12, 4, 2)] {
        let plan = ShardPlan::even(Config::new(h * 4, h).with_kv_heads(kv), n).unwrap();
        assert!(plan.is_even());
    }
    // Devices outside the plan, wrong wo blocks, wrong shard sets.
    let plan = ShardPlan::new(gqa, 2).unwrap();
    assert!(matches!(
        plan.shard(2),
        Err(Error::InputValue { name: "device", .. })
    ));
    let w = OwnedWeights::random(&gqa, &mut Rng(1));
    let mut block = vec![0.0; plan.wo_block_len(0).unwrap() + 1];
    assert!(matches!(
        plan.copy_wo(0, &w.wo, &mut block),
        Err(Error::WeightShape {
            name: "wo block",
            ..
        })
    ));
    let short = vec![0.0; 3];
    assert!(matches!(
        ShardLayer::new(&plan, 0, &w.view(&gqa), Tensor::F32(&short)),
        Err(Error::WeightShape { name: "wo", .. })
    ));
    let blocks = wo_blocks(&plan, &w.wo);
    let shards = shard_layers(&plan, &w.view(&gqa), &blocks);
    assert!(ShardedLayer::new(&shards[..1]).is_err());
    let swapped = [shards[1], shards[0]];
    assert!(matches!(
        ShardedLayer::new(&swapped),
        Err(Error::InputValue {
            name: "shards",
            index: 0,
            ..
        })
    ));
    assert!(ShardedLayer::new(&[]).is_err());
}

#[test]
fn a_full_norm_shard_refuses_the_single_device_entry_points() {
    let cfg = Config::new(64, 8)
        .with_kv_heads(2)
        .with_qk_norm(QkNorm::Full);
    let w = OwnedWeights::random(&cfg, &mut Rng(3));
    let plan = ShardPlan::new(cfg, 2).unwrap();
    let blocks = wo_blocks(&plan, &w.wo);
    let shards = shard_layers(&plan, &w.view(&cfg), &blocks);
    let layer = shards[0].layer();
    let x = vec![0.1; 3 * 64];
    let mut y = vec![5.0; 3 * 64];
    let mut ws = vec![0.0; cpu_workspace_len(layer.config(), 3, 1)];
    let e = layer
        .forward_cpu(&Inputs::new(&x, 1, 3), &mut ws, &mut y, &Sequential)
        .unwrap_err();
    assert!(matches!(e, Error::Unsupported { .. }), "{e}");
    let mut ws = vec![0.0; reference_workspace_len(layer.config(), 3)];
    assert!(layer
        .forward_reference(&Inputs::new(&x, 1, 3), &mut ws, &mut y)
        .is_err());
    assert!(y.iter().all(|&v| v == 5.0));
    assert_eq!(shards[0].norm_part().unwrap().q_width, 8 * 8);
    // Per-head norm: the shard is an ordinary layer.
    let cfg = cfg.with_qk_norm(QkNorm::PerHead);
    let w = OwnedWeights::random(&cfg, &mut Rng(3));
    let plan = ShardPlan::new(cfg, 2).unwrap();
    let shards = shard_layers(&plan, &w.view(&cfg), &blocks);
    assert!(shards[1].norm_part().is_none());
    let mut ws = vec![0.0; cpu_workspace_len(shards[1].layer().config(), 3, 1)];
    shards[1]
        .layer()
        .forward_cpu(&Inputs::new(&x, 1, 3), &mut ws, &mut y, &Sequential)
        .unwrap();
}

fn wo_blocks(plan: &ShardPlan, wo: &[f32]) -> Vec<Vec<f32>> {
    (0..plan.n_devices())
        .map(|i| {
            let mut b = vec![0.0; plan.wo_block_len(i).unwrap()];
            plan.copy_wo(i, wo, &mut b).unwrap();
            b
        })
        .collect()
}

fn shard_layers<'a>(
    plan: &ShardPlan,
    full: &attnrt::LayerWeights<'a>,
    blocks: &'a [Vec<f32>],
) -> Vec<ShardLayer<'a>> {
    (0..plan.n_devices())
        .map(|i| ShardLayer::new(plan, i, full, Tensor::F32(&blocks[i])).unwrap())
        .collect()
}

/// The mask modes of SPEC.md step 7.
#[derive(Clone, Copy, Debug)]
enum Mask {
    Causal,
    Window,
    Padding,
    Documents,
    Varlen,
}

struct Call {
    batch: usize,
    t: usize,
    x: Vec<f32>,
    seq_lens: Option<Vec<i32>>,
    docs: Option<Vec<i32>>,
    cu: Option<Vec<i32>>,
    table: Vec<f32>,
}

impl Call {
    fn new(cfg: &Config, mask: Mask, rng: &mut Rng) -> Call {
        let t = 37;
        let batch = if matches!(mask, Mask::Padding) { 2 } else { 1 };
        let mut table = vec![0.0; rope::table_len(t, cfg.head_dim)];
        if let Some(r) = cfg.rope() {
            rope::build_table(r, cfg.head_dim, &mut table).unwrap();
        }
        Call {
            batch,
            t,
            x: rng.vec(batch * t * cfg.n_embd, 1.0),
            seq_lens: matches!(mask, Mask::Padding).then(|| vec![30, 11]),
            docs: matches!(mask, Mask::Documents)
                .then(|| (0..t).map(|i| (i * 3 / t) as i32).collect()),
            cu: matches!(mask, Mask::Varlen).then(|| vec![0, 9, 9, 25, t as i32]),
            table,
        }
    }

    fn inputs(&self, cfg: &Config) -> Inputs<'_> {
        Inputs {
            mask: MaskInputs {
                seq_lens: self.seq_lens.as_deref(),
                document_ids: self.docs.as_deref(),
                cu_seqlens: self.cu.as_deref(),
                max_seqlen: None,
            },
            rope_table: cfg
                .rope()
                .map(|_| RopeTable::new(&self.table, cfg.head_dim).unwrap()),
            ..Inputs::new(&self.x, self.batch, self.t)
        }
    }
}

fn layer_configs() -> Vec<(&'static str, Config)> {
    let d = 16;
    let base = |h: usize, kv: usize| {
        Config::new(96, h)
            .with_kv_heads(kv)
            .with_head_dim(d)
            .with_rope(Rope::DEFAULT)
    };
    vec![
        ("mha", base(4, 4)),
        (
            "mha-bias-perhead",
            base(6, 6)
                .with_bias(BiasFlags::ALL)
                .with_qk_norm(QkNorm::PerHead),
        ),
        ("gqa-8/2", base(8, 2)),
        ("gqa-8/2-full-norm", base(8, 2).with_qk_norm(QkNorm::Full)),
        (
            "gqa-8/4-full-norm-bias",
            base(8, 4)
                .with_qk_norm(QkNorm::Full)
                .with_bias(BiasFlags::ALL),
        ),
        (
            "gqa-12/3-perhead",
            base(12, 3).with_qk_norm(QkNorm::PerHead),
        ),
        ("mqa", base(8, 1)),
        (
            "mqa-full-norm-nope",
            Config::new(64, 4)
                .with_kv_heads(1)
                .with_qk_norm(QkNorm::Full),
        ),
        (
            "qwen-bias-full-norm",
            base(8, 2).with_qk_norm(QkNorm::Full).with_bias(BiasFlags {
                o: false,
                ..BiasFlags::ALL
            }),
        ),
    ]
}

#[test]
fn split_equals_one_device_for_every_mask_and_head_layout() {
    let masks = [
        Mask::Causal,
        Mask::Window,
        Mask::Padding,
        Mask::Documents,
        Mask::Varlen,
    ];
    let mut rng = Rng(2024);
    let (mut worst_ref, mut worst_cpu, mut cases) = (0.0f32, 0.0f32, 0);
    for (name, cfg0) in layer_configs() {
        for mask in masks {
            let cfg = match mask {
                Mask::Window => cfg0.with_sliding_window(6),
                _ => cfg0,
            };
            let w = OwnedWeights::random(&cfg, &mut rng);
            let full = w.view(&cfg);
            let layer = Layer::new(cfg, full).unwrap();
            let call = Call::new(&cfg, mask, &mut rng);
            let inputs = call.inputs(&cfg);
            let tokens = call.batch * call.t;
            let mut ws = vec![0.0; reference_workspace_len(&cfg, call.t)];
            let mut want = vec![0.0; call.x.len()];
            layer
                .forward_reference(&inputs, &mut ws, &mut want)
                .unwrap();
            let mut ws = vec![0.0; cpu_workspace_len(&cfg, tokens, 2)];
            let mut one = vec![0.0; call.x.len()];
            let par = ScopedThreads { threads: 2 };
            layer.forward_cpu(&inputs, &mut ws, &mut one, &par).unwrap();
            for n in [2, 3, 4] {
                if n > cfg.n_head {
                    continue;
                }
                let plan = ShardPlan::new(cfg, n).unwrap();
                let blocks = wo_blocks(&plan, &w.wo);
                let shards = shard_layers(&plan, &full, &blocks);
                let sharded = ShardedLayer::new(&shards).unwrap();
                let mut ws = vec![0.0; sharded.workspace_len(tokens, 2)];
                let mut y = vec![f32::NAN; call.x.len()];
                sharded.forward_cpu(&inputs, &mut ws, &mut y, &par).unwrap();
                let (er, ec) = (max_abs_diff(&y, &want), max_abs_diff(&y, &one));
                assert!(
                    er <= F32_TOL && ec <= F32_TOL,
                    "{name} {mask:?} N={n}: vs reference {er}, vs cpu {ec}"
                );
                worst_ref = worst_ref.max(er);
                worst_cpu = worst_cpu.max(ec);
                cases += 1;

                // Deterministic: same bits on another thread count.
                let mut y1 = vec![0.0; call.x.len()];
                let mut ws1 = vec![0.0; sharded.workspace_len(tokens, 1)];
                sharded
                    .forward_cpu(&inputs, &mut ws1, &mut y1, &Sequential)
                    .unwrap();
                assert!(y.iter().zip(&y1).all(|(a, b)| a.to_bits() == b.to_bits()));

                // Caller reduces: the partials sum (in device order) to the same bits.
                let mut parts = vec![0.0; n * call.x.len()];
                sharded
                    .forward_cpu_partials(&inputs, &mut ws, &mut parts, &par)
                    .unwrap();
                let mut sum = parts[..call.x.len()].to_vec();
                for p in parts.chunks_exact(call.x.len()).skip(1) {
                    sum.iter_mut().zip(p).for_each(|(s, v)| *s += v);
                }
                assert!(sum.iter().zip(&y).all(|(a, b)| a.to_bits() == b.to_bits()));
            }
        }
    }
    println!(
        "{cases} split cases: worst error vs reference {worst_ref:.2e}, vs one-device cpu {worst_cpu:.2e}"
    );
}

#[test]
fn sequence_parallel_gathers_and_scatters() {
    let cfg = Config::new(64, 8)
        .with_kv_heads(2)
        .with_head_dim(16)
        .with_qk_norm(QkNorm::Full)
        .with_rope(Rope::DEFAULT)
        .with_bias(BiasFlags::ALL);
    let w = OwnedWeights::random(&cfg, &mut Rng(77));
    let call = Call::new(&cfg, Mask::Padding, &mut Rng(78));
    let inputs = call.inputs(&cfg);
    let tokens = call.batch * call.t;
    let layer = Layer::new(cfg, w.view(&cfg)).unwrap();
    let mut ws = vec![0.0; cpu_workspace_len(&cfg, tokens, 1)];
    let mut want = vec![0.0; call.x.len()];
    layer
        .forward_cpu(&inputs, &mut ws, &mut want, &Sequential)
        .unwrap();
    for n in [2, 3, 4] {
        let plan = ShardPlan::new(cfg, n).unwrap();
        let blocks = wo_blocks(&plan, &w.wo);
        let shards = shard_layers(&plan, &w.view(&cfg), &blocks);
        let sharded = ShardedLayer::new(&shards).unwrap();
        let c = cfg.n_embd;
        let ranges: Vec<_> = (0..n)
            .map(|i| plan.token_range(i, tokens).unwrap())
            .collect();
        let x_parts: Vec<&[f32]> = ranges
            .iter()
            .map(|r| &call.x[r.start * c..r.end * c])
            .collect();
        let mut outs: Vec<Vec<f32>> = ranges.iter().map(|r| vec![0.0; r.len() * c]).collect();
        let mut out_parts: Vec<&mut [f32]> = outs.iter_mut().map(|o| o.as_mut_slice()).collect();
        let mut ws = vec![0.0; sharded.workspace_len(tokens, 1) + 2 * tokens * c];
        let empty = Inputs { x: &[], ..inputs };
        sharded
            .forward_cpu_seq_parallel(&empty, &x_parts, &mut out_parts, &mut ws, &Sequential)
            .unwrap();
        let got: Vec<f32> = outs.concat();
        let err = max_abs_diff(&got, &want);
        assert!(err <= F32_TOL, "N={n}: {err}");
        // A part of the wrong length is refused.
        let mut bad: Vec<&mut [f32]> = outs.iter_mut().map(|o| o.as_mut_slice()).collect();
        bad.pop();
        assert!(sharded
            .forward_cpu_seq_parallel(&empty, &x_parts, &mut bad, &mut ws, &Sequential)
            .is_err());
    }
}

/// An in-process all-reduce for devices on their own threads: every device deposits its sums,
/// then every device adds all of them in device order.
struct AllReduce {
    slots: Mutex<Vec<Vec<f32>>>,
    barrier: Barrier,
}

impl AllReduce {
    fn new(n: usize) -> AllReduce {
        AllReduce {
            slots: Mutex::new(vec![vec![]; n]),
            barrier: Barrier::new(n),
        }
    }

    fn reduce(&self, device: usize, sums: &mut [f32]) {
        self.slots.lock().unwrap()[device] = sums.to_vec();
        self.barrier.wait();
        {
            let slots = self.slots.lock().unwrap();
            for (j, s) in sums.iter_mut().enumerate() {
                *s = slots.iter().map(|d| d[j]).fold(0.0, |a, b| a + b);
            }
        }
        self.barrier.wait();
    }
}

#[test]
fn devices_on_their_own_threads_with_the_reduce_hook() {
    for (name, cfg) in layer_configs() {
        let w = OwnedWeights::random(&cfg, &mut Rng(5));
        let call = Call::new(&cfg, Mask::Documents, &mut Rng(6));
        let inputs = call.inputs(&cfg);
        let tokens = call.batch * call.t;
        let layer = Layer::new(cfg, w.view(&cfg)).unwrap();
        let mut ws = vec![0.0; cpu_workspace_len(&cfg, tokens, 1)];
        let mut want = vec![0.0; call.x.len()];
        layer
            .forward_cpu(&inputs, &mut ws, &mut want, &Sequential)
            .unwrap();
        for n in [2, 3, 4].into_iter().filter(|&n| n <= cfg.n_head) {
            let plan = ShardPlan::new(cfg, n).unwrap();
            let blocks = wo_blocks(&plan, &w.wo);
            let shards = shard_layers(&plan, &w.view(&cfg), &blocks);
            let ar = AllReduce::new(n);
            let parts: Vec<Vec<f32>> = std::thread::scope(|s| {
                let handles: Vec<_> = shards
                    .iter()
                    .enumerate()
                    .map(|(i, sh)| {
                        let (ar, inputs) = (&ar, &inputs);
                        s.spawn(move || {
                            let mut ws = vec![0.0; sh.workspace_len(tokens, 2)];
                            let mut y = vec![0.0; inputs.x.len()];
                            let par = ScopedThreads { threads: 2 };
                            sh.forward_cpu(inputs, &mut ws, &mut y, &par, &mut |s| ar.reduce(i, s))
                                .unwrap();
                            y
                        })
                    })
                    .collect();
                handles.into_iter().map(|h| h.join().unwrap()).collect()
            });
            let mut got = parts[0].clone();
            for p in &parts[1..] {
                got.iter_mut().zip(p).for_each(|(a, b)| *a += b);
            }
            let err = max_abs_diff(&got, &want);
            assert!(err <= F32_TOL, "{name} N={n}: {err}");
        }
    }
}

#[test]
fn prefill_and_decode_with_a_cache_per_device() {
    const BLOCK: usize = 8;
    for (name, cfg0) in layer_configs() {
        for window in [None, Some(5)] {
            let cfg = match window {
                Some(wd) => cfg0.with_sliding_window(wd),
                None => cfg0,
            };
            let w = OwnedWeights::random(&cfg, &mut Rng(40));
            let (prefill, decode) = (13usize, 6usize);
            let total = prefill + decode;
            let c = cfg.n_embd;
            let x = Rng(41).vec(total * c, 1.0);
            let mut table = vec![0.0; rope::table_len(total, cfg.head_dim)];
            if let Some(r) = cfg.rope() {
                rope::build_table(r, cfg.head_dim, &mut table).unwrap();
            }
            let tab = cfg
                .rope()
                .map(|_| RopeTable::new(&table, cfg.head_dim).unwrap());
            // One device over the whole sequence.
            let layer = Layer::new(cfg, w.view(&cfg)).unwrap();
            let mut ws = vec![0.0; reference_workspace_len(&cfg, total)];
            let mut want = vec![0.0; total * c];
            let inputs = Inputs {
                rope_table: tab,
                ..Inputs::new(&x, 1, total)
            };
            layer
                .forward_reference(&inputs, &mut ws, &mut want)
                .unwrap();
            for n in [2, 3, 4].into_iter().filter(|&n| n <= cfg.n_head) {
                let plan = ShardPlan::new(cfg, n).unwrap();
                let blocks = wo_blocks(&plan, &w.wo);
                let shards = shard_layers(&plan, &w.view(&cfg), &blocks);
                let nb = total.div_ceil(BLOCK);
                let ar = AllReduce::new(n);
                let parts: Vec<Vec<f32>> = std::thread::scope(|s| {
                    let handles: Vec<_> = shards
                        .iter()
                        .enumerate()
                        .map(|(i, sh)| {
                            let (ar, x) = (&ar, &x);
                            s.spawn(move || {
                                let sc = sh.layer().config();
                                let len = kv_pool_len(sc.n_kv_head, sc.head_dim, BLOCK, nb);
                                let (mut k, mut v) = (vec![0.0f32; len], vec![0.0f32; len]);
                                let mut cache = KvCache::new(
                                    KvPool::F32 {
                                        k: &mut k,
                                        v: &mut v,
                                    },
                                    sc.n_kv_head,
                                    sc.head_dim,
                                    BLOCK,
                                    nb,
                                    false,
                                )
                                .unwrap();
                                // Reversed block ids: the layout must not matter.
                                let ids: Vec<u32> = (0..nb as u32).rev().collect();
                                let mut y = vec![0.0; total * c];
                                let mut at = 0;
                                let steps =
                                    std::iter::once(prefill).chain(std::iter::repeat_n(1, decode));
                                for new in steps {
                                    let seq = [Sequence {
                                        cached: at,
                                        new_tokens: new,
                                        blocks: &ids,
                                    }];
                                    let mut ws = vec![0.0; cached_workspace_len(sc, &seq, 1, nb)];
                                    sh.forward_cached(
                                        &x[at * c..(at + new) * c],
                                        &seq,
                                        tab,
                                        &mut cache,
                                        &mut ws,
                                        &mut y[at * c..(at + new) * c],
                                        &Sequential,
                                        &mut |s| ar.reduce(i, s),
                                    )
                                    .unwrap();
                                    at += new;
                                }
                                y
                            })
                        })
                        .collect();
                    handles.into_iter().map(|h| h.join().unwrap()).collect()
                });
                let mut got = parts[0].clone();
                for p in &parts[1..] {
                    got.iter_mut().zip(p).for_each(|(a, b)| *a += b);
                }
                let err = max_abs_diff(&got, &want);
                assert!(err <= F32_TOL, "{name} window {window:?} N={n}: {err}");
            }
        }
    }
}
