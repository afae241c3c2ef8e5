//! Single-thread micro-benchmark of `attend_partial` the way a decode step calls it: one new
//! token, r = 4 query heads per KV head, head_dim 128, 8 KV heads, a paged cache (blocks of 16
//! keys, `[block][head][slot][d]`) of `N` keys, chunks of 256 keys merged in order. Prints the
//! best of `reps` runs of thread CPU time and the cache read rate.
//!
//! `cargo run --release -p attnrt-simd --example decode_bench [N] [reps] [f16|bf16|f32]
//! [ahead|noahead] [heads|one] [spread|resident]` (whether the next chunk is passed to
//! `attend_partial_ahead` for prefetching; whether all KV heads go through one
//! `attend_partial_heads` call per chunk, the way the runtime reads a paged cache block by
//! block, or one head after another; `resident`, with `heads`: every block of the table is block
//! 0, so the same instructions read 64 KiB that stay in L1 and L2: the kernel's rate with memory
//! out of the way)

use attnrt_simd::{
    attend_partial_ahead, attend_partial_heads, merge_partial, partial_scratch_len, Elem, KvRun,
    PartialRows, CHUNK_MAX,
};
use std::time::Instant;

#[path = "bench_util/mod.rs"]
mod bench_util;
use bench_util::{cpu_ns, fill, pool_memory};

fn run<E: Elem>(n: usize, reps: usize, ahead: bool, at_once: bool, resident: bool) {
    if at_once {
        return run_heads::<E>(n, reps, ahead, resident);
    }
    let (d, r, heads, block) = (128usize, 4usize, 8usize, 16usize);
    let blocks = n.div_ceil(block);
    let len = blocks * heads * block * d;
    let k: Vec<E> = fill(2, len).into_iter().map(E::from_f32).collect();
    let v: Vec<E> = fill(3, len).into_iter().map(E::from_f32).collect();
    let q = fill(1, heads * r * d);
    let scale = 1.0 / (d as f32).sqrt();
    let mut scratch = vec![0.0f32; partial_scratch_len(d)];
    let (mut pm, mut pl, mut po) = (vec![0.0; r], vec![0.0; r], vec![0.0; r * d]);
    let (mut m, mut l, mut o) = (vec![0.0; r], vec![0.0; r], vec![0.0; r * d]);
    let mut best = f64::INFINITY;
    let mut check = 0.0f64;
    for _ in 0..reps {
        let wall = Instant::now();
        let start = cpu_ns(wall);
        for g in 0..heads {
            m.fill(f32::NEG_INFINITY);
            l.fill(0.0);
            o.fill(0.0);
            let runs_of = |c0: usize| -> Vec<KvRun<'_, E>> {
                let c1 = (c0 + CHUNK_MAX).min(n);
                (c0..c1)
                    .step_by(block)
                    .map(|j| {
                        let at = ((j / block * heads + g) * block) * d;
                        let len = block.min(c1 - j);
                        KvRun {
                            k: &k[at..at + len * d],
                            v: &v[at..at + len * d],
                            stride: d,
                            len,
                        }
                    })
                    .collect()
            };
            for c0 in (0..n).step_by(CHUNK_MAX) {
                let c1 = (c0 + CHUNK_MAX).min(n);
                let runs = runs_of(c0);
                let next = if ahead { runs_of(c1) } else { vec![] };
                let out = PartialRows {
                    m: &mut pm,
                    l: &mut pl,
                    o: &mut po,
                };
                let ranges = [(0u32, (c1 - c0) as u32)];
                attend_partial_ahead(
                    d,
                    r,
                    &q[g * r * d..][..r * d],
                    &runs,
                    &next,
                    &ranges,
                    scale,
                    out,
                    &mut scratch,
                )
                .expect("attend_partial");
                for row in 0..r {
                    merge_partial(
                        &mut m[row],
                        &mut l[row],
                        &mut o[row * d..(row + 1) * d],
                        pm[row],
                        pl[row],
                        &po[row * d..(row + 1) * d],
                    );
                }
            }
            check += (o[0] / l[0]) as f64;
        }
        best = best.min((cpu_ns(wall) - start) as f64 * 1e-9);
    }
    let bytes = (2 * heads * n * d * core::mem::size_of::<E>()) as f64;
    println!(
        "{}{} N={n}: {:.2} ms, {:.2} GB/s (check {check:.6})",
        E::NAME,
        if ahead { " ahead" } else { "" },
        best * 1e3,
        bytes / best / 1e9
    );
}

/// All KV heads per chunk through [`attend_partial_heads`]; `resident`: every block is block 0.
fn run_heads<E: Elem>(n: usize, reps: usize, ahead: bool, resident: bool) {
    let (d, r, heads, block) = (128usize, 4usize, 8usize, 16usize);
    let blocks = n.div_ceil(block);
    let len = blocks * heads * block * d;
    // The pool in 2 MiB pages, as `attnrt bench decode` (and a server) has it.
    let (kk, ko) = pool_memory(fill(2, len).into_iter().map(E::from_f32), E::from_f32(0.0));
    let (vv, vo) = pool_memory(fill(3, len).into_iter().map(E::from_f32), E::from_f32(0.0));
    let (k, v) = (&kk[ko..ko + len], &vv[vo..vo + len]);
    let q = fill(1, heads * r * d);
    let scale = 1.0 / (d as f32).sqrt();
    let mut scratch = vec![0.0f32; partial_scratch_len(d)];
    let rows = heads * r;
    let (mut pm, mut pl, mut po) = (vec![0.0; rows], vec![0.0; rows], vec![0.0; rows * d]);
    let (mut m, mut l, mut o) = (vec![0.0; rows], vec![0.0; rows], vec![0.0; rows * d]);
    let mut best = f64::INFINITY;
    let mut check = 0.0f64;
    let runs_of = |c0: usize| -> Vec<KvRun<'_, E>> {
        let c1 = (c0 + CHUNK_MAX).min(n);
        (c0..c1)
            .step_by(block)
            .map(|j| {
                let at = if resident {
                    0
                } else {
                    (j / block * heads * block) * d
                };
                let len = block.min(c1 - j);
                let end = at + ((heads - 1) * block + len) * d;
                KvRun {
                    k: &k[at..end],
                    v: &v[at..end],
                    stride: d,
                    len,
                }
            })
            .collect()
    };
    for _ in 0..reps {
        let wall = Instant::now();
        let start = cpu_ns(wall);
        m.fill(f32::NEG_INFINITY);
        l.fill(0.0);
        o.fill(0.0);
        for c0 in (0..n).step_by(CHUNK_MAX) {
            let c1 = (c0 + CHUNK_MAX).min(n);
            let runs = runs_of(c0);
            let next = if ahead { runs_of(c1) } else { vec![] };
            let out = PartialRows {
                m: &mut pm,
                l: &mut pl,
                o: &mut po,
            };
            let ranges = [(0u32, (c1 - c0) as u32)];
            attend_partial_heads(
                d,
                r,
                heads,
                block * d,
                &q,
                &runs,
                &next,
                &ranges,
                scale,
                out,
                &mut scratch,
            )
            .expect("attend_partial_heads");
            for row in 0..rows {
                merge_partial(
                    &mut m[row],
                    &mut l[row],
                    &mut o[row * d..(row + 1) * d],
                    pm[row],
                    pl[row],
                    &po[row * d..(row + 1) * d],
                );
            }
        }
        for g in 0..heads {
            check += (o[g * r * d] / l[g * r]) as f64;
        }
        best = best.min((cpu_ns(wall) - start) as f64 * 1e-9);
    }
    let bytes = (2 * heads * n * d * core::mem::size_of::<E>()) as f64;
    println!(
        "{} heads{}{} N={n}: {:.2} ms, {:.2} GB/s (check {check:.6})",
        E::NAME,
        if ahead { " ahead" } else { "" },
        if resident { " resident" } else { "" },
        best * 1e3,
        bytes / best / 1e9
    );
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let n: usize = args.get(1).map_or(32768, |s| s.parse().expect("N"));
    let reps: usize = args.get(2).map_or(5, |s| s.parse().expect("reps"));
    let ahead = args.get(4).is_none_or(|s| s != "noahead");
    let at_once = args.get(5).is_none_or(|s| s != "one");
    let resident = args.get(6).is_some_and(|s| s == "resident");
    match args.get(3).map_or("f16", |s| s.as_str()) {
        "f32" => run::<f32>(n, reps, ahead, at_once, resident),
        "bf16" => run::<half::bf16>(n, reps, ahead, at_once, resident),
        _ => run::<half::f16>(n, reps, ahead, at_once, resident),
    }
}
