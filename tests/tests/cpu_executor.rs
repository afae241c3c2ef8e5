//! The SIMD CPU executor against the scalar reference and the golden fixtures, on every tier
//! this machine has, over edge shapes, every GQA ratio and every mask; and bitwise equality
//! across thread counts.

use std::sync::Mutex;

use attnrt::{
    cpu_workspace_len, reference_workspace_len, rope, Backend, BiasFlags, Config, Inputs, Layer,
    MaskInputs, ParallelFor, QkNorm, Rope, RopeConvention, RopeTable, ScopedThreads, Sequential,
};
use attnrt_simd::Tier;
use attnrt_tests::{load_all, max_abs_diff, OwnedWeights, Rng, F32_TOL};

/// The tier is process-global: tests that force one take this lock.
static TIER: Mutex<()> = Mutex::new(());

fn tiers() -> Vec<Tier> {
    Tier::ALL
        .into_iter()
        .filter(|&t| attnrt_simd::supported(t))
        .collect()
}

fn run_cpu(layer: &Layer<'_>, inputs: &Inputs<'_>, par: &dyn ParallelFor) -> (Vec<f32>, Backend) {
    let mut ws =
        vec![0.0; cpu_workspace_len(layer.config(), inputs.batch * inputs.seq_len, par.width())];
    let mut y = vec![f32::NAN; inputs.x.len()];
    let b = layer.forward_cpu(inputs, &mut ws, &mut y, par).unwrap();
    (y, b)
}

fn run_ref(layer: &Layer<'_>, inputs: &Inputs<'_>) -> Vec<f32> {
    let mut ws = vec![0.0; reference_workspace_len(layer.config(), inputs.seq_len)];
    let mut y = vec![f32::NAN; inputs.x.len()];
    layer.forward_reference(inputs, &mut ws, &mut y).unwrap();
    y
}

#[test]
fn golden_fixtures_on_every_tier() {
    let _g = TIER.lock().unwrap();
    let fixtures = load_all();
    for tier in tiers() {
        attnrt_simd::force(tier).unwrap();
        let mut worst = 0.0f32;
        for f in &fixtures {
            let layer = f.layer();
            let inputs = f.call_inputs();
            let (y, backend) = run_cpu(&layer, &inputs, &ScopedThreads { threads: 2 });
            assert_eq!(backend, Backend::CpuSimd(tier));
            let err = max_abs_diff(&y, &f.expected);
            assert!(err <= F32_TOL, "{tier:?} {}: {err}", f.name);
            worst = worst.max(err);
        }
        println!("{tier:?}: worst golden error {worst:.2e}");
    }
    attnrt_simd::force(attnrt_simd::detected()).unwrap();
}

/// A random layer + mask over the shapes the kernels find hardest.
struct Case {
    cfg: Config,
    batch: usize,
    t: usize,
    seq_lens: Option<Vec<i32>>,
    docs: Option<Vec<i32>>,
    cu: Option<Vec<i32>>,
}

fn cases() -> Vec<Case> {
    let bq = attnrt_simd::ATTN_BQ;
    let bk = attnrt_simd::ATTN_BK;
    let mut out = vec![];
    let lengths = [0, 1, bq - 1, bq + 1, bk - 1, bk + 1, 2 * bk + 3];
    let dims = [32, 64, 80, 96, 128, 256, 18];
    for (i, &t) in lengths.iter().enumerate() {
        for (j, &d) in dims.iter().enumerate() {
            let (kv, r) = [(2, 1), (2, 2), (1, 4), (1, 8), (3, 2)][(i + j) % 5];
            let h = kv * r;
            let mut cfg = Config::new(h * 8, h).with_kv_heads(kv).with_head_dim(d);
            cfg = cfg.with_qk_norm([QkNorm::None, QkNorm::PerHead, QkNorm::Full][(i * 3 + j) % 3]);
            if (i + j) % 2 == 0 {
                let conv = if j % 2 == 0 {
                    RopeConvention::Interleaved
                } else {
                    RopeConvention::HalfSplit
                };
                cfg = cfg.with_rope(Rope {
                    convention: conv,
                    ..Rope::DEFAULT
                });
            }
            if (i + 2 * j) % 3 == 0 {
                cfg = cfg.with_bias(BiasFlags::ALL);
            }
            let mask_mode = (i * 7 + j) % 6;
            if mask_mode == 1 || mask_mode == 5 {
                cfg = cfg.with_sliding_window(1 + (t / 3).max(1));
            }
            let batch = if mask_mode == 2 { 2 } else { 1 };
            let seq_lens = (mask_mode == 2).then(|| vec![t as i32, (t / 2) as i32]);
            let docs = (mask_mode == 3 || mask_mode == 5).then(|| {
                (0..t)
                    .map(|x| {
                        (x * 3 / t.max(1)) as i32
                            * if x % 7 == 0 && mask_mode == 5 { -1 } else { 1 }
                    })
                    .collect()
            });
            let cu = (mask_mode == 4 && t > 0)
                .then(|| vec![0, (t / 3) as i32, (t / 3) as i32, t as i32]);
            out.push(Case {
                cfg,
                batch,
                t,
                seq_lens,
                docs,
                cu,
            });
        }
    }
    out
}

#[test]
fn edge_shapes_match_the_reference_on_every_tier_and_thread_count() {
    let _g = TIER.lock().unwrap();
    let mut rng = Rng(99);
    let cases = cases();
    for tier in tiers() {
        attnrt_simd::force(tier).unwrap();
        let mut worst = 0.0f32;
        for (n, c) in cases.iter().enumerate() {
            let w = OwnedWeights::random(&c.cfg, &mut rng);
            let layer = Layer::new(c.cfg, w.view(&c.cfg)).unwrap();
            let x = rng.vec(c.batch * c.t * c.cfg.n_embd, 1.0);
            let mut tab = vec![0.0; rope::table_len(c.t.max(1), c.cfg.head_dim)];
            if let Some(r) = c.cfg.rope() {
                rope::build_table(r, c.cfg.head_dim, &mut tab).unwrap();
            }
            let inputs = Inputs {
                mask: MaskInputs {
                    seq_lens: c.seq_lens.as_deref(),
                    document_ids: c.docs.as_deref(),
                    cu_seqlens: c.cu.as_deref(),
                    max_seqlen: None,
                },
                rope_table: c
                    .cfg
                    .rope()
                    .map(|_| RopeTable::new(&tab, c.cfg.head_dim).unwrap()),
                ..Inputs::new(&x, c.batch, c.t)
            };
            let want = run_ref(&layer, &inputs);
            let (one, _) = run_cpu(&layer, &inputs, &Sequential);
            let err = max_abs_diff(&one, &want);
            assert!(
                err <= F32_TOL,
                "{tier:?} case {n} (T {}, D {}, cfg {:?}): {err}",
                c.t,
                c.cfg.head_dim,
                c.cfg
            );
            worst = worst.max(err);
            for threads in [2, 3, 5] {
                let (many, _) = run_cpu(&layer, &inputs, &ScopedThreads { threads });
                let same = many
                    .iter()
                    .zip(&one)
                    .all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(same, "{tier:?} case {n}: {threads} threads differ from 1");
            }
        }
        println!(
            "{tier:?}: {} cases, worst error vs reference {worst:.2e}",
            cases.len()
        );
    }
    attnrt_simd::force(attnrt_simd::detected()).unwrap();
}

#[test]
fn invalid_calls_leave_the_output_untouched() {
    let cfg = Config::new(32, 4).with_kv_heads(2).with_rope(Rope::DEFAULT);
    let w = OwnedWeights::random(&cfg, &mut Rng(5));
    let layer = Layer::new(cfg, w.view(&cfg)).unwrap();
    let x = vec![0.5; 4 * 32];
    let tab = vec![0.0; rope::table_len(3, cfg.head_dim)];
    let inputs = Inputs {
        rope_table: Some(RopeTable::new(&tab, cfg.head_dim).unwrap()),
        ..Inputs::new(&x, 1, 4)
    };
    let mut ws = vec![0.0; cpu_workspace_len(&cfg, 4, 1)];
    let mut y = vec![7.0f32; 4 * 32];
    assert!(layer
        .forward_cpu(&inputs, &mut ws, &mut y, &Sequential)
        .is_err()); // T past the table
    let mut short = vec![0.0; cpu_workspace_len(&cfg, 4, 1) - 1];
    let tab = vec![0.0; rope::table_len(4, cfg.head_dim)];
    let inputs = Inputs {
        rope_table: Some(RopeTable::new(&tab, cfg.head_dim).unwrap()),
        ..inputs
    };
    assert!(layer
        .forward_cpu(&inputs, &mut short, &mut y, &Sequential)
        .is_err());
    assert!(y.iter().all(|&v| v == 7.0));
}

/// A host whose parallel-for runs lane 0 twice and never runs the others: still sound, still
/// complete (units are claimed, not assigned).
struct Sloppy;
impl ParallelFor for Sloppy {
    fn run(&self, _n: usize, task: &(dyn Fn(usize) + Sync)) {
        std::thread::scope(|s| {
            s.spawn(|| task(0));
            task(0);
        });
    }
    fn width(&self) -> usize {
        4
    }
}

#[test]
fn a_sloppy_host_cannot_break_the_result() {
    let _g = TIER.lock().unwrap();
    let cfg = Config::new(64, 8).with_kv_heads(2).with_sliding_window(5);
    let w = OwnedWeights::random(&cfg, &mut Rng(8));
    let layer = Layer::new(cfg, w.view(&cfg)).unwrap();
    let x = Rng(9).vec(40 * 64, 1.0);
    let inputs = Inputs::new(&x, 1, 40);
    let (got, _) = run_cpu(&layer, &inputs, &Sloppy);
    let (want, _) = run_cpu(&layer, &inputs, &Sequential);
    assert!(got
        .iter()
        .zip(&want)
        .all(|(a, b)| a.to_bits() == b.to_bits()));
}
