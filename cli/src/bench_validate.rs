//! `attnrt bench validate`: the host cost of checking a decode call's block tables, the one
//! check of a cached call that grows with the pool. A fresh check (`Layer::validate_cached`,
//! which the CPU executor runs on per-call scratch) clears one mark per pool block every call;
//! the marks kept across calls (`Layer::validate_cached_marked`, the GPU executors') touch only
//! the blocks the call names. Both run on the same calls in the same process, interleaved.

use std::time::Instant;

use attnrt::{Config, KvGeometry, Layer, LayerWeights, Sequence, Tensor};

use crate::CliError;

/// Sequences of the decode call and the blocks each names (8192 cached tokens in blocks of 64).
const SEQS: usize = 32;
const BLOCKS_PER_SEQ: usize = 129;

/// Microseconds per call of `calls` calls in a row.
fn us_per_call(calls: usize, mut call: impl FnMut()) -> f64 {
    let start = Instant::now();
    for _ in 0..calls {
        call();
    }
    start.elapsed().as_secs_f64() * 1e6 / calls as f64
}

/// Runs the bench and prints one table row per pool size; `quick` times a few calls only (a
/// smoke test).
pub fn run(quick: bool) -> Result<(), CliError> {
    let (rounds, calls) = if quick { (3, 20) } else { (15, 2000) };
    let cfg = Config::new(4096, 32).with_kv_heads(8).with_head_dim(128);
    let (c, q, kv) = (cfg.n_embd, cfg.q_dim(), cfg.kv_dim());
    // Weights are never read by the validation; zeros of the right shapes.
    let zeros = vec![0.0f32; q * c];
    let weights = LayerWeights::projections(
        Tensor::F32(&zeros),
        Tensor::F32(&zeros[..kv * c]),
        Tensor::F32(&zeros[..kv * c]),
        Tensor::F32(&zeros),
    );
    let layer = Layer::new(cfg, weights).map_err(|e| CliError::Other(e.to_string()))?;
    println!(
        "attnrt bench validate: a decode call of {SEQS} sequences x {BLOCKS_PER_SEQ} blocks \
         (blocks of 64 tokens); us per call, median of {rounds} rounds of {calls} calls, fresh \
         and kept marks interleaved"
    );
    println!("| pool blocks | fresh marks us | kept marks us | fresh / kept |");
    println!("| ---: | ---: | ---: | ---: |");
    for pool in [SEQS * BLOCKS_PER_SEQ, 1 << 16, 1 << 18, 1 << 20] {
        // The sequences' blocks spread over the pool, every id distinct.
        let stride = pool / (SEQS * BLOCKS_PER_SEQ);
        let tables: Vec<Vec<u32>> = (0..SEQS)
            .map(|s| {
                (0..BLOCKS_PER_SEQ)
                    .map(|b| ((b * SEQS + s) * stride) as u32)
                    .collect()
            })
            .collect();
        let seqs: Vec<Sequence<'_>> = tables
            .iter()
            .map(|t| Sequence {
                cached: 8191,
                new_tokens: 1,
                blocks: t,
            })
            .collect();
        let geometry = KvGeometry {
            n_kv_head: cfg.n_kv_head,
            head_dim: cfg.head_dim,
            block_size: 64,
            num_blocks: pool,
            rolling: false,
        };
        let len = SEQS * c;
        let mut fresh = Vec::new();
        let mut kept = vec![0u32; pool];
        let mut stamp = 0u32;
        let mut fresh_call = || {
            // As an executor with per-call scratch: marks cleared to the pool's size.
            fresh.clear();
            fresh.resize(pool, 0u32);
            let r = layer.validate_cached(len, len, &seqs, None, &geometry, &mut fresh);
            assert_eq!(r, Ok(SEQS));
        };
        let mut kept_call = || {
            let r = layer
                .validate_cached_marked(len, len, &seqs, None, &geometry, &mut kept, &mut stamp);
            assert_eq!(r, Ok(SEQS));
        };
        let (mut a, mut b) = (Vec::new(), Vec::new());
        for _ in 0..rounds {
            a.push(us_per_call(calls, &mut fresh_call));
            b.push(us_per_call(calls, &mut kept_call));
        }
        a.sort_by(f64::total_cmp);
        b.sort_by(f64::total_cmp);
        let (fa, fb) = (a[a.len() / 2], b[b.len() / 2]);
        println!("| {pool} | {fa:.2} | {fb:.2} | {:.1}x |", fa / fb);
    }
    Ok(())
}
