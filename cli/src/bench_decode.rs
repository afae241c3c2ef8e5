//! `attnrt bench decode`: one new token per sequence against a long f16 KV cache, as a server
//! decodes. The figure of merit is the cache read bandwidth of the attention phases, as a
//! fraction of this machine's read bandwidth measured by a streaming read in the same run.

use std::sync::Mutex;
use std::time::Instant;

use attnrt::{
    cached_workspace_len, kv_pool_len, rope, Config, KvCache, KvPool, Layer, LayerWeights,
    ParallelFor, PoolMemory, Rope, RopeTable, Sequence, Tensor, ThreadPool,
};
use attnrt_cli::synth::uniform;
use half::{bf16, f16};

use crate::bench::{placed, Timed};
use crate::CliError;

/// Block size of the paged cache.
const BLOCK: usize = 16;
/// Bytes of the stream read's buffer, far larger than the caches.
const STREAM_BYTES: usize = 512 << 20;

/// Rounds of each case: the stream read and the decode step alternate, and each keeps its best
/// time, so both see the same moments of a shared machine (whose read bandwidth moved between 31
/// and 72 GB/s on two threads within minutes, fifteenth session).
const ROUNDS: usize = 10;

/// Seconds `threads` threads take to read `words` (split evenly): the better of two ways to
/// read, a sum of the u64 words (the code the compiler makes for the baseline target) and the
/// active SIMD tier's dot product of the same bytes as floats with themselves (the widest
/// loads the kernels use), over memory laid out as the pool is ([`PoolMemory`]). Misaligned by
/// 16 bytes (where the allocator puts a large vector) one thread read 33 instead of 39 GB/s,
/// the u64 sum alone read 33-35 where the SIMD read reached 39-41, and 2 MiB pages added a few
/// more (Zen 5 pair, fifteenth session): a fraction of a weaker read flattered the kernels.
fn stream_read_secs(words: &[u64], pool: &ThreadPool) -> f64 {
    let threads = pool.threads();
    let part = words.len().div_ceil(threads);
    let time = |read: &(dyn Fn(&[u64]) -> f64 + Sync)| {
        let start = Instant::now();
        pool.run(threads, &|t| {
            let c = &words[(t * part).min(words.len())..((t + 1) * part).min(words.len())];
            std::hint::black_box(read(c));
        });
        start.elapsed().as_secs_f64()
    };
    let fold = time(&|c| c.iter().fold(0u64, |a, &w| a.wrapping_add(w)) as f64);
    let wide = time(&|c| {
        let f: &[f32] = bytemuck::cast_slice(c);
        f64::from(attnrt_simd::dot(f, f).expect("equal lengths"))
    });
    fold.min(wide)
}

/// Runs the decode bench.
pub fn run(quick: bool) -> Result<(), CliError> {
    let err = |e: attnrt::Error| CliError::Other(e.to_string());
    let cfg = Config::new(4096, 32)
        .with_kv_heads(8)
        .with_head_dim(128)
        .with_rope(Rope {
            theta: 500000.0,
            ..Rope::DEFAULT
        });
    let (c, q, kv, d) = (cfg.n_embd, cfg.q_dim(), cfg.kv_dim(), cfg.head_dim);
    let a = |n: usize| (3.0 / n as f32).sqrt();
    let w = placed(
        [
            uniform(1, q * c, a(c)),
            uniform(2, kv * c, a(c)),
            uniform(3, kv * c, a(c)),
            uniform(4, c * q, a(q)),
        ]
        .map(|v| v.into_iter().map(bf16::from_f32).collect::<Vec<_>>()),
    )?;
    let weights = LayerWeights::projections(
        Tensor::Bf16(&w[0]),
        Tensor::Bf16(&w[1]),
        Tensor::Bf16(&w[2]),
        Tensor::Bf16(&w[3]),
    );
    let layer = Layer::new(cfg, weights).map_err(err)?;
    let scale = if quick { 8 } else { 1 };
    let cases: [(&str, usize, usize); 2] = [
        ("1 x 32768 cached", 1, 32768 / scale),
        ("16 x 4096 cached", 16, 4096 / scale),
    ];
    // 1.0f32 in both halves of every word: the SIMD read sums normal floats.
    let words = PoolMemory::filled(STREAM_BYTES / 8, 0x3f80_0000_3f80_0000u64)
        .map_err(|e| CliError::Other(format!("stream buffer: {e}")))?;
    let words = &words[..];
    println!(
        "attnrt bench decode: f16 paged cache (blocks of {BLOCK}) and stream buffer in 2 MiB pages where the OS gives them, 8 KV heads, head_dim 128, 32 query heads; best of {ROUNDS} rounds, each a stream read then a decode step{}",
        if quick { ", QUICK (cache / 8)" } else { "" }
    );
    println!(
        "| case | threads | attention ms | cache read GB/s | stream read GB/s | of stream read | whole step ms |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- |");
    for (name, seqs, cached) in cases {
        let blocks_per_seq = (cached + 1).div_ceil(BLOCK);
        let num_blocks = seqs * blocks_per_seq;
        let n = kv_pool_len(cfg.n_kv_head, d, BLOCK, num_blocks);
        // The cache is caller memory: fill it directly instead of running a long prefill.
        // As a server allocates a pool: 2 MiB pages where the OS gives them (PoolMemory).
        let pool = |len| {
            PoolMemory::filled(len, f16::ZERO).map_err(|e| CliError::Other(format!("pool: {e}")))
        };
        let (mut k_pool, mut v_pool) = (pool(n)?, pool(n)?);
        let (k, v) = (&mut k_pool[..], &mut v_pool[..]);
        for (d, s) in k.iter_mut().zip(uniform(7, n, 1.0)) {
            *d = f16::from_f32(s);
        }
        for (d, s) in v.iter_mut().zip(uniform(8, n, 1.0)) {
            *d = f16::from_f32(s);
        }
        let tables: Vec<Vec<u32>> = (0..seqs)
            .map(|s| ((s * blocks_per_seq) as u32..((s + 1) * blocks_per_seq) as u32).collect())
            .collect();
        let sequences: Vec<Sequence<'_>> = tables
            .iter()
            .map(|b| Sequence {
                cached,
                new_tokens: 1,
                blocks: b,
            })
            .collect();
        let mut table = vec![0.0; rope::table_len(cached + 1, d)];
        rope::build_table(cfg.rope().expect("rotary"), d, &mut table).map_err(err)?;
        let x = uniform(9, seqs * c, 1.0);
        let read_bytes = (seqs * cached * kv * 2 * 2) as f64;
        for threads in [1, 2] {
            let par = Timed {
                inner: ThreadPool::new(threads),
                phases: Mutex::new(vec![]),
            };
            let mut ws = vec![0.0; cached_workspace_len(&cfg, &sequences, threads, num_blocks)];
            let mut y = vec![0.0; seqs * c];
            let mut best = (f64::MAX, f64::MAX, f64::MAX);
            for _ in 0..ROUNDS {
                best.2 = best.2.min(stream_read_secs(words, &par.inner));
                // The step writes the new token's keys; the next repetition overwrites them.
                let mut cache = KvCache::new(
                    KvPool::F16 {
                        k: &mut *k,
                        v: &mut *v,
                    },
                    8,
                    d,
                    BLOCK,
                    num_blocks,
                    false,
                )
                .map_err(err)?;
                let rt = RopeTable::new(&table, d).map_err(err)?;
                par.phases.lock().expect("unpoisoned").clear();
                let start = Instant::now();
                layer
                    .forward_cached(&x, &sequences, Some(rt), &mut cache, &mut ws, &mut y, &par)
                    .map_err(err)?;
                let step = start.elapsed().as_secs_f64();
                let p = par.phases.lock().expect("unpoisoned").clone();
                // Phases: q/k/v projections, partial states, merge, output projection.
                let attn =
                    p.get(1).copied().unwrap_or(f64::NAN) + p.get(2).copied().unwrap_or(f64::NAN);
                best = (best.0.min(attn), best.1.min(step), best.2);
            }
            let gbs = read_bytes / best.0 / 1e9;
            let stream = STREAM_BYTES as f64 / best.2 / 1e9;
            println!(
                "| {name} | {threads} | {:.2} | {:.1} | {stream:.1} | {:.0}% | {:.1} |",
                best.0 * 1e3,
                gbs,
                gbs / stream * 100.0,
                best.1 * 1e3
            );
        }
    }
    Ok(())
}
