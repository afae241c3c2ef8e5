//! Projection-GEMM throughput on the executor's shapes: `m` tokens, `k = 4096`, units of 128
//! output columns of a `[4096, 4096]` weight (one unit per head, the weight in 2 MiB pages), on
//! 1 and 2 threads, for f32, bf16 and f16 weights.
//!
//! `cargo run --release -p attnrt-simd --example gemm_bench -- [m] [units] [reps]`
use attnrt_simd::{gemm_cols, gemm_scratch_len, Elem, GemmShape};
use half::{bf16, f16};
use std::time::Instant;

// Shared with the other benches; this one uses only `pool_memory`.
#[allow(dead_code)]
#[path = "bench_util/mod.rs"]
mod bench_util;
use bench_util::pool_memory;

const K: usize = 4096;
const N: usize = 4096;
const COLS: usize = 128;

fn lcg(seed: u64, n: usize) -> Vec<f32> {
    let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// Seconds for `units` column units split over `threads` threads (unit u on thread u % threads).
fn run<E: Elem>(x: &[f32], w: &[E], m: usize, units: usize, threads: usize) -> f64 {
    let shape = GemmShape { m, n: N, k: K };
    let start = Instant::now();
    std::thread::scope(|s| {
        for t in 0..threads {
            s.spawn(move || {
                let mut y = vec![0.0f32; m * COLS];
                let mut scratch = vec![0.0f32; gemm_scratch_len(K)];
                let mut u = t;
                while u < units {
                    let c0 = (u * COLS) % N;
                    gemm_cols(shape, c0..c0 + COLS, x, w, None, &mut y, COLS, &mut scratch)
                        .expect("shape");
                    std::hint::black_box(&y);
                    u += threads;
                }
            });
        }
    });
    start.elapsed().as_secs_f64()
}

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse().expect("number"))
        .collect();
    let m = args.first().copied().unwrap_or(512);
    let units = args.get(1).copied().unwrap_or(8);
    let reps = args.get(2).copied().unwrap_or(3);
    let x = lcg(1, m * K);
    // W in 2 MiB pages, as the C ABI's layer handle and `attnrt bench decode` hold weights
    // (one-token projections read it 6-10% faster so, sixteenth session).
    let (wf, wf_at) = pool_memory(lcg(2, N * K).into_iter(), 0.0f32);
    let wf = &wf[wf_at..wf_at + N * K];
    let (wb, wb_at) = pool_memory(wf.iter().map(|&v| bf16::from_f32(v)), bf16::ZERO);
    let wb = &wb[wb_at..wb_at + N * K];
    let (wh, wh_at) = pool_memory(wf.iter().map(|&v| f16::from_f32(v)), f16::ZERO);
    let wh = &wh[wh_at..wh_at + N * K];
    let flops = 2.0 * (m * K * COLS * units) as f64;
    for threads in [1, 2] {
        let mut best = [f64::MAX; 3];
        for _ in 0..reps {
            best[0] = best[0].min(run(&x, wf, m, units, threads));
            best[1] = best[1].min(run(&x, wb, m, units, threads));
            best[2] = best[2].min(run(&x, wh, m, units, threads));
        }
        let [f, b, h] = best.map(|t| flops / t / 1e9);
        println!(
            "m={m} threads={threads} f32 {f:.1} GFLOP/s  bf16 {b:.1} GFLOP/s  f16 {h:.1} GFLOP/s"
        );
    }
}
