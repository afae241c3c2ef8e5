//! Single-thread micro-benchmark of `attend` on Llama-3-8B attention shapes (head_dim 128,
//! r = 4 query heads per KV head), f32 K/V, the way the runtime calls it: units of 64 query
//! tokens over one KV head. Prints useful GFLOP/s (4 * d * visible pairs * r) per case, from the
//! best of `reps` runs of thread CPU time.
//!
//! `cargo run --release -p attnrt-simd --example attn_bench [T] [reps]`

use attnrt_simd::{attend, attend_scratch_len, AttnShape, KvView, TileClass, Visibility};
use std::time::Instant;

#[path = "bench_util/mod.rs"]
mod bench_util;
use bench_util::{cpu_ns, fill};

/// Causal, optional sliding window, optional sorted document ids.
struct Mask {
    window: usize,
    docs: Option<Vec<i32>>,
}

impl Visibility for Mask {
    fn visible(&self, i: usize, j: usize) -> bool {
        j <= i && i - j < self.window && self.docs.as_ref().is_none_or(|d| d[i] == d[j])
    }

    fn classify(&self, q0: usize, q1: usize, k0: usize, k1: usize) -> TileClass {
        let same = |a: usize, b: usize| self.docs.as_ref().is_none_or(|d| d[a] == d[b]);
        let disjoint = self
            .docs
            .as_ref()
            .is_some_and(|d| d[q1 - 1] < d[k0] || d[k1 - 1] < d[q0]);
        if k0 > q1 - 1 || (q0 >= k1 && q0 - (k1 - 1) >= self.window) || disjoint {
            TileClass::None
        } else if k1 - 1 <= q0
            && q1 - 1 - k0 < self.window
            && same(q0, q1 - 1)
            && same(q0, k0)
            && same(q0, k1 - 1)
        {
            TileClass::All
        } else {
            TileClass::Partial
        }
    }

    fn key_range(&self, q0: usize, q1: usize) -> (usize, usize) {
        let lo = if self.window == usize::MAX {
            0
        } else {
            (q0 + 1).saturating_sub(self.window)
        };
        (lo, q1)
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let t: usize = args.get(1).map_or(2048, |s| s.parse().expect("T"));
    let reps: usize = args.get(2).map_or(3, |s| s.parse().expect("reps"));
    let (d, r, unit) = (128usize, 4usize, 64usize);
    let q = fill(1, t * r * d);
    let k = fill(2, t * d);
    let v = fill(3, t * d);
    let mut out = vec![0.0f32; unit * r * d];
    let mut scratch = vec![0.0f32; attend_scratch_len(d, r)];
    let scale = 1.0 / (d as f32).sqrt();
    let docs: Vec<i32> = (0..t).map(|i| (i * 8 / t) as i32).collect();
    let cases = [
        ("causal", usize::MAX, None),
        ("window 512", 512, None),
        ("8 documents", usize::MAX, Some(docs)),
    ];
    for (name, window, docs) in cases {
        let mask = Mask { window, docs };
        let pairs: usize = (0..t)
            .map(|i| (0..=i).filter(|&j| mask.visible(i, j)).count())
            .sum();
        let flops = 4.0 * d as f64 * pairs as f64 * r as f64;
        let mut best = f64::INFINITY;
        let mut check = 0.0f64;
        for _ in 0..reps {
            let wall = Instant::now();
            let start = cpu_ns(wall);
            for t0 in (0..t).step_by(unit) {
                let nq = unit.min(t - t0);
                let shape = AttnShape {
                    d,
                    r,
                    nq,
                    q_start: t0,
                };
                let kv = KvView {
                    k: &k,
                    v: &v,
                    stride: d,
                    len: t,
                };
                let qs = &q[t0 * r * d..][..nq * r * d];
                attend(shape, qs, kv, &mask, scale, &mut out, &mut scratch).expect("attend");
                check += out[0] as f64;
            }
            best = best.min((cpu_ns(wall) - start) as f64 * 1e-9);
        }
        println!(
            "T={t} {name}: {:.2} ms, {:.1} GFLOP/s (check {check:.4})",
            best * 1e3,
            flops / best / 1e9
        );
    }
}
