//! `attnrt bench`: the CPU executor on Llama-3-8B-shaped layers, every figure a ratio to a
//! baseline measured in the same run (the machine is shared and noisy):
//! - the scalar tier of the same executor, 1 thread, on a sample of the case's first tokens
//!   (the full scalar run would take minutes), compared as useful GFLOP/s per phase;
//! - the FMA peak of this machine, measured by an FMA loop on the active tier with the same
//!   thread count.
//!
//! Phases are timed through a `ParallelFor` wrapper: the executor calls it once per phase
//! (q/k/v projections, attention, output projection), so no timing code sits in the core.

use std::sync::Mutex;
use std::time::Instant;

use attnrt::{
    cpu_workspace_len, rope, Config, Inputs, Layer, LayerWeights, MaskInputs, ParallelFor,
    PoolMemory, Rope, RopeTable, ScopedThreads, Tensor,
};
use attnrt_simd::{Tier, Visibility};
use half::bf16;

use attnrt_cli::synth::uniform;

use crate::CliError;

/// One benchmark case.
struct Case {
    name: &'static str,
    t: usize,
    window: Option<usize>,
    documents: usize,
}

const CASES: [Case; 5] = [
    Case {
        name: "prefill T=512 causal",
        t: 512,
        window: None,
        documents: 1,
    },
    Case {
        name: "prefill T=2048 causal",
        t: 2048,
        window: None,
        documents: 1,
    },
    Case {
        name: "prefill T=4096 causal",
        t: 4096,
        window: None,
        documents: 1,
    },
    Case {
        name: "T=4096 window 512",
        t: 4096,
        window: Some(512),
        documents: 1,
    },
    Case {
        name: "T=4096 8 packed documents",
        t: 4096,
        window: None,
        documents: 8,
    },
];

/// Tokens of the scalar baseline sample.
const SCALAR_SAMPLE: usize = 128;

/// A `ParallelFor` that records how long each `run` (one executor phase) takes.
pub(crate) struct Timed<P> {
    pub(crate) inner: P,
    pub(crate) phases: Mutex<Vec<f64>>,
}

impl<P: ParallelFor> ParallelFor for Timed<P> {
    fn run(&self, n: usize, task: &(dyn Fn(usize) + Sync)) {
        let start = Instant::now();
        self.inner.run(n, task);
        self.phases
            .lock()
            .expect("unpoisoned")
            .push(start.elapsed().as_secs_f64());
    }

    fn width(&self) -> usize {
        self.inner.width()
    }
}

/// Seconds of (projections, attention) of one forward call.
fn timed_forward(
    layer: &Layer<'_>,
    inputs: &Inputs<'_>,
    threads: usize,
) -> Result<(f64, f64), CliError> {
    let par = Timed {
        inner: ScopedThreads { threads },
        phases: Mutex::new(vec![]),
    };
    let tokens = inputs.batch * inputs.seq_len;
    let mut ws = vec![0.0; cpu_workspace_len(layer.config(), tokens, threads)];
    let mut y = vec![0.0; inputs.x.len()];
    layer
        .forward_cpu(inputs, &mut ws, &mut y, &par)
        .map_err(|e| CliError::Other(e.to_string()))?;
    let p = par.phases.into_inner().expect("unpoisoned");
    // Without QK-norm the executor runs exactly three phases.
    match p.as_slice() {
        [qkv, attn, out] => Ok((qkv + out, *attn)),
        other => Err(CliError::Other(format!(
            "expected 3 phases, timed {}",
            other.len()
        ))),
    }
}

/// FMA GFLOP/s of `threads` cores running the probe at once.
fn fma_peak(threads: usize) -> f64 {
    // Best of three: a shared machine only ever makes a run slower.
    (0..3).map(|_| fma_peak_once(threads)).fold(0.0, f64::max)
}

fn fma_peak_once(threads: usize) -> f64 {
    let iters = 20_000_000;
    let start = Instant::now();
    let flops: u64 = std::thread::scope(|s| {
        let hs: Vec<_> = (0..threads)
            .map(|i| s.spawn(move || attnrt_simd::fma_probe(iters, i as f32)))
            .collect();
        hs.into_iter()
            .map(|h| {
                let (v, f) = h.join().expect("probe thread");
                std::hint::black_box(v);
                f
            })
            .sum()
    });
    flops as f64 / start.elapsed().as_secs_f64() / 1e9
}

/// The four projection weights in 2 MiB pages ([`PoolMemory`]), as a server holds them.
pub(crate) fn placed<T: Copy>(w: [Vec<T>; 4]) -> Result<[PoolMemory<T>; 4], CliError> {
    let [a, b, c, d] = w;
    let p =
        |v: Vec<T>| PoolMemory::copied(&v).map_err(|e| CliError::Other(format!("weights: {e}")));
    Ok([p(a)?, p(b)?, p(c)?, p(d)?])
}

/// Owned weights in f32 or bf16, in 2 MiB pages as a server holds them ([`PoolMemory`]).
enum Weights {
    F32([PoolMemory<f32>; 4]),
    Bf16([PoolMemory<bf16>; 4]),
}

impl Weights {
    fn new(cfg: &Config, bf: bool) -> Result<Weights, CliError> {
        let (c, q, kv) = (cfg.n_embd, cfg.q_dim(), cfg.kv_dim());
        let a = |n: usize| (3.0 / n as f32).sqrt();
        let w = [
            uniform(1, q * c, a(c)),
            uniform(2, kv * c, a(c)),
            uniform(3, kv * c, a(c)),
            uniform(4, c * q, a(q)),
        ];
        Ok(if bf {
            Weights::Bf16(placed(
                w.map(|v| v.into_iter().map(bf16::from_f32).collect()),
            )?)
        } else {
            Weights::F32(placed(w)?)
        })
    }

    fn view(&self) -> LayerWeights<'_> {
        let t: [Tensor<'_>; 4] = match self {
            Weights::F32(w) => [
                Tensor::F32(&w[0]),
                Tensor::F32(&w[1]),
                Tensor::F32(&w[2]),
                Tensor::F32(&w[3]),
            ],
            Weights::Bf16(w) => [
                Tensor::Bf16(&w[0]),
                Tensor::Bf16(&w[1]),
                Tensor::Bf16(&w[2]),
                Tensor::Bf16(&w[3]),
            ],
        };
        LayerWeights::projections(t[0], t[1], t[2], t[3])
    }
}

/// Useful FLOPs (projections, attention) of a call over the first `t` tokens.
fn useful_flops(cfg: &Config, t: usize, inputs: &Inputs<'_>) -> Result<(f64, f64), CliError> {
    let (c, q, kv) = (cfg.n_embd as f64, cfg.q_dim() as f64, cfg.kv_dim() as f64);
    let proj = 2.0 * t as f64 * c * (2.0 * q + 2.0 * kv);
    let mask = attnrt::mask::MaskSpec::new(cfg.sliding_window, 1, t, &inputs.mask)
        .map_err(|e| CliError::Other(e.to_string()))?
        .row(0);
    let pairs: usize = (0..t)
        .map(|i| {
            let (lo, hi) = mask.key_range(i, i + 1);
            (lo..hi).filter(|&j| mask.visible(i, j)).count()
        })
        .sum();
    Ok((proj, 4.0 * pairs as f64 * q))
}

/// One measured row of the table.
struct Row {
    case: &'static str,
    dtype: &'static str,
    threads: usize,
    ms: f64,
    tokens_per_s: f64,
    proj_gflops: f64,
    attn_gflops: f64,
    proj_vs_scalar: f64,
    attn_vs_scalar: f64,
    peak_fraction: f64,
    attn_ms: f64,
}

/// The one flag a sub-bench takes after its name (`args[0]`): `--quick` or nothing.
fn quick_flag(sub: &str, args: &[String]) -> Result<bool, CliError> {
    match args.get(1).map(String::as_str) {
        None => Ok(false),
        Some("--quick") => Ok(true),
        Some(other) => Err(CliError::Input(format!(
            "bench {sub}: unknown flag {other:?}"
        ))),
    }
}

/// Runs the bench; `quick` shrinks every case to 256 tokens (a smoke test).
pub fn run(args: &[String]) -> Result<(), CliError> {
    match args.first().map(String::as_str) {
        Some("decode") => return crate::bench_decode::run(quick_flag("decode", args)?),
        Some("validate") => return crate::bench_validate::run(quick_flag("validate", args)?),
        _ => {}
    }
    let mut quick = false;
    let mut json_path = None;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--quick" => quick = true,
            "--json" => {
                json_path = Some(
                    it.next()
                        .ok_or_else(|| CliError::Input("--json needs a path".into()))?
                        .clone(),
                )
            }
            other => return Err(CliError::Input(format!("bench: unknown flag {other:?}"))),
        }
    }
    let tier = attnrt_simd::active();
    let cfg_base = Config::new(4096, 32)
        .with_kv_heads(8)
        .with_head_dim(128)
        .with_rope(Rope {
            theta: 500000.0,
            ..Rope::DEFAULT
        });
    let peaks = [fma_peak(1), fma_peak(2)];
    eprintln!(
        "bench: tier {}, FMA peak {:.1} GFLOP/s (1 thread), {:.1} (2 threads)",
        tier.name(),
        peaks[0],
        peaks[1]
    );
    let mut rows = vec![];
    for bf in [false, true] {
        let dtype = if bf { "bf16" } else { "f32" };
        let weights = Weights::new(&cfg_base, bf)?;
        for case in &CASES {
            let t = if quick { 256.min(case.t) } else { case.t };
            let cfg = Config {
                sliding_window: case.window,
                ..cfg_base
            };
            let layer =
                Layer::new(cfg, weights.view()).map_err(|e| CliError::Other(e.to_string()))?;
            let x = uniform(9, t * cfg.n_embd, 1.0);
            let docs: Vec<i32> = (0..t).map(|i| (i * case.documents / t) as i32).collect();
            let mut table = vec![0.0; rope::table_len(t, cfg.head_dim)];
            rope::build_table(cfg.rope().expect("rotary"), cfg.head_dim, &mut table)
                .map_err(|e| CliError::Other(e.to_string()))?;
            let rt =
                RopeTable::new(&table, cfg.head_dim).map_err(|e| CliError::Other(e.to_string()))?;
            let inputs_for = |n: usize| Inputs {
                x: &x[..n * cfg.n_embd],
                batch: 1,
                seq_len: n,
                mask: MaskInputs {
                    document_ids: (case.documents > 1).then(|| &docs[..n]),
                    ..MaskInputs::default()
                },
                position_ids: None,
                rope_table: Some(rt),
            };
            // Scalar baseline on the first tokens of the same case.
            let sample = SCALAR_SAMPLE.min(t);
            attnrt_simd::force(Tier::Scalar).map_err(|e| CliError::Other(e.to_string()))?;
            let scalar = timed_forward(&layer, &inputs_for(sample), 1);
            attnrt_simd::force(tier).map_err(|e| CliError::Other(e.to_string()))?;
            let (sp, sa) = scalar?;
            let (s_proj, s_attn) = useful_flops(&cfg, sample, &inputs_for(sample))?;
            let (proj, attn) = useful_flops(&cfg, t, &inputs_for(t))?;
            for threads in [1, 2] {
                eprintln!("bench: {} {dtype} {threads} thread(s)...", case.name);
                let first = timed_forward(&layer, &inputs_for(t), threads)?;
                let again = timed_forward(&layer, &inputs_for(t), threads)?;
                let (tp, ta) = if again.0 + again.1 < first.0 + first.1 {
                    again
                } else {
                    first
                };
                let total = tp + ta;
                let row = Row {
                    case: case.name,
                    dtype,
                    threads,
                    ms: total * 1e3,
                    tokens_per_s: t as f64 / total,
                    proj_gflops: proj / tp / 1e9,
                    attn_gflops: attn / ta / 1e9,
                    proj_vs_scalar: (proj / tp) / (s_proj / sp),
                    attn_vs_scalar: (attn / ta) / (s_attn / sa),
                    peak_fraction: (proj + attn) / total / 1e9 / peaks[threads - 1],
                    attn_ms: ta * 1e3,
                };
                rows.push(row);
            }
        }
    }
    print_table(tier, &peaks, &rows, quick);
    print_targets(&peaks, &rows);
    if let Some(path) = json_path {
        std::fs::write(&path, to_json(tier, &peaks, &rows))
            .map_err(|e| CliError::Other(format!("{path}: {e}")))?;
    }
    Ok(())
}

fn print_table(tier: Tier, peaks: &[f64; 2], rows: &[Row], quick: bool) {
    println!(
        "attnrt bench: tier {}, FMA peak {:.1} / {:.1} GFLOP/s (1 / 2 threads){}",
        tier.name(),
        peaks[0],
        peaks[1],
        if quick { ", QUICK (256 tokens)" } else { "" }
    );
    println!("Llama-3-8B layer shape: n_embd 4096, 32/8 heads, head_dim 128, rope; scalar baseline: scalar tier, 1 thread, first {SCALAR_SAMPLE} tokens");
    println!("| case | weights | threads | ms | tokens/s | proj GFLOP/s | attn GFLOP/s | proj x scalar | attn x scalar | of FMA peak |");
    println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    for r in rows {
        println!(
            "| {} | {} | {} | {:.1} | {:.0} | {:.1} | {:.1} | {:.1}x | {:.1}x | {:.0}% |",
            r.case,
            r.dtype,
            r.threads,
            r.ms,
            r.tokens_per_s,
            r.proj_gflops,
            r.attn_gflops,
            r.proj_vs_scalar,
            r.attn_vs_scalar,
            r.peak_fraction * 100.0
        );
    }
}

/// The CPU targets, computed from the rows of this run.
fn print_targets(peaks: &[f64; 2], rows: &[Row]) {
    let find = |case: &str, dtype: &str, threads: usize| {
        rows.iter()
            .find(|r| r.case == case && r.dtype == dtype && r.threads == threads)
    };
    for dtype in ["f32", "bf16"] {
        println!("targets ({dtype} weights):");
        if let Some(r) = find("prefill T=2048 causal", dtype, 1) {
            println!(
                "  attention, causal T=2048, 1 thread: {:.0}% of FMA peak (target >= 50%)",
                r.attn_gflops / peaks[0] * 100.0
            );
            println!(
                "  projections, causal T=2048, 1 thread: {:.0}% of FMA peak (target >= 75%)",
                r.proj_gflops / peaks[0] * 100.0
            );
        }
        if let (Some(c), Some(w)) = (
            find("prefill T=4096 causal", dtype, 1),
            find("T=4096 window 512", dtype, 1),
        ) {
            println!("  window 512 vs full causal at T=4096, attention time: {:.1}x faster (target >= 5x)", c.attn_ms / w.attn_ms);
        }
        if let (Some(a), Some(b)) = (
            find("prefill T=2048 causal", dtype, 1),
            find("prefill T=2048 causal", dtype, 2),
        ) {
            println!(
                "  2 threads vs 1 at T=2048, whole layer: {:.2}x (target >= 1.8x)",
                a.ms / b.ms
            );
        }
    }
}

fn to_json(tier: Tier, peaks: &[f64; 2], rows: &[Row]) -> String {
    let rows: Vec<serde_json::Value> = rows
        .iter()
        .map(|r| {
            serde_json::json!({
                "case": r.case, "weights": r.dtype, "threads": r.threads, "ms": r.ms,
                "tokens_per_s": r.tokens_per_s, "proj_gflops": r.proj_gflops, "attn_gflops": r.attn_gflops,
                "proj_vs_scalar": r.proj_vs_scalar, "attn_vs_scalar": r.attn_vs_scalar, "fma_peak_fraction": r.peak_fraction,
            })
        })
        .collect();
    serde_json::to_string_pretty(&serde_json::json!({
        "tier": tier.name(), "fma_peak_gflops": { "1": peaks[0], "2": peaks[1] }, "scalar_sample_tokens": SCALAR_SAMPLE, "rows": rows,
    }))
    .unwrap_or_default()
}
