//! The ceiling of one-token decode on this machine's cores, measured rather than assumed
//! (x86-64 with AVX-512 only). Per thread, a paged f16 cache as `decode_bench` lays it out (8 KV
//! heads, blocks of 16 keys, head_dim 128, `[block][head][slot][d]`, K and V apart, 2 MiB pages),
//! read unit by unit (16 keys of one head: 4 KiB of K, 4 KiB of V) in three ways:
//! - `read`: every line loaded and nothing else: how fast a core reads this layout;
//! - `fma`: only the multiply-adds decode needs with 4 query rows per KV head (scores
//!   `q . k` and the `p v` sums, f16 widened in registers), with the decode kernel's
//!   prefetching (K lines 4 units ahead, V lines 2), but no softmax, no folds, no bookkeeping;
//! - `fma resident`: the same with every unit at block 0 (L1/L2): the arithmetic alone.
//!
//! `fma` from memory bounds what a decode kernel doing these FMAs reads on this core; set
//! against `read` it shows how much of the read rate is left to reach.
//!
//! `cargo run --release -p attnrt-simd --example decode_roofline [N keys] [threads] [reps]`

#[cfg(target_arch = "x86_64")]
#[path = "bench_util/mod.rs"]
mod bench_util;

fn main() {
    let arg = |i: usize, default: usize| {
        std::env::args()
            .nth(i)
            .and_then(|a| a.parse().ok())
            .unwrap_or(default)
    };
    let (n, threads, reps) = (arg(1, 32768), arg(2, 1).max(1), arg(3, 20).max(1));
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f")
        && std::arch::is_x86_feature_detected!("f16c")
        && std::arch::is_x86_feature_detected!("fma")
    {
        return roofline::run(n, threads, reps);
    }
    let _ = (n, threads, reps);
    println!("decode_roofline needs x86-64 with AVX-512");
}

#[cfg(target_arch = "x86_64")]
mod roofline {
    use super::bench_util::{fill, pool_memory};
    use std::arch::x86_64::*;
    use std::sync::Barrier;
    use std::time::Instant;

    const D: usize = 128;
    const HEADS: usize = 8;
    const ROWS: usize = 4;
    /// Bytes of one unit's K (or V): 16 keys x head_dim 128 x f16.
    const UNIT: usize = 16 * D * 2;
    const K_AHEAD: usize = 4;
    const V_AHEAD: usize = 2;

    #[derive(Clone, Copy, PartialEq)]
    enum Mode {
        Read,
        Fma,
        FmaResident,
    }

    /// One thread's cache: K and V of `units` units, each stream in unit order.
    struct Cache {
        k: Vec<u16>,
        v: Vec<u16>,
        at: (usize, usize),
        units: usize,
    }

    pub fn run(n: usize, threads: usize, reps: usize) {
        let units = n.div_ceil(16) * HEADS;
        let len = units * UNIT / 2;
        let caches: Vec<Cache> = (0..threads)
            .map(|t| {
                let bits = |seed| fill(seed, len).into_iter().map(|x| half_bits(x * 0.5));
                let (k, ka) = pool_memory(bits(2 + 2 * t as u64), 0);
                let (v, va) = pool_memory(bits(3 + 2 * t as u64), 0);
                Cache {
                    k,
                    v,
                    at: (ka, va),
                    units,
                }
            })
            .collect();
        let bytes = (threads * units * 2 * UNIT) as f64;
        println!(
            "decode_roofline: {threads} thread(s), each {n} keys x {HEADS} KV heads (f16, {} MiB), best of {reps}",
            (units * 2 * UNIT) >> 20
        );
        let mut rates = vec![];
        for (mode, name) in [
            (Mode::Read, "read"),
            (Mode::Fma, "fma"),
            (Mode::FmaResident, "fma resident"),
        ] {
            let secs = best_secs(&caches, mode, reps);
            let gbs = bytes / secs / 1e9;
            rates.push(gbs);
            println!("{name:>13}: {:8.3} ms {gbs:6.1} GB/s", secs * 1e3);
        }
        println!(
            "fma from memory / read: {:.0}%",
            rates[1] / rates[0] * 100.0
        );
    }

    /// The f16 bits nearest `x`.
    fn half_bits(x: f32) -> u16 {
        half::f16::from_f32(x).to_bits()
    }

    /// The best over `reps` of the slowest thread's time for one pass over its cache.
    fn best_secs(caches: &[Cache], mode: Mode, reps: usize) -> f64 {
        let barrier = Barrier::new(caches.len());
        let times: Vec<f64> = std::thread::scope(|s| {
            let handles: Vec<_> = caches
                .iter()
                .map(|c| {
                    let barrier = &barrier;
                    s.spawn(move || {
                        let mut state = State::new();
                        (0..reps)
                            .map(|_| {
                                barrier.wait();
                                let start = Instant::now();
                                // SAFETY: `main` checked AVX-512F, F16C and FMA; `pass` stays
                                // inside the cache's `units` units of each stream.
                                unsafe { pass(c, mode, &mut state) };
                                start.elapsed().as_secs_f64()
                            })
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            let per: Vec<Vec<f64>> = handles
                .into_iter()
                .map(|h| h.join().expect("bench thread"))
                .collect();
            (0..reps)
                .map(|i| per.iter().map(|t| t[i]).fold(0.0, f64::max))
                .collect()
        });
        times.into_iter().fold(f64::INFINITY, f64::min)
    }

    /// What the FMA passes read and write besides the cache: queries, probabilities, outputs.
    struct State {
        q: Vec<f32>,
        p: Vec<f32>,
        o: Vec<f32>,
        sink: f32,
    }

    impl State {
        fn new() -> Self {
            State {
                q: fill(1, HEADS * ROWS * D),
                p: fill(4, ROWS * 16).iter().map(|x| x.abs() * 1e-3).collect(),
                o: vec![0.0; HEADS * ROWS * D],
                sink: 0.0,
            }
        }
    }

    /// One pass over the cache, unit by unit (head by head, then the next block).
    ///
    /// # Safety
    /// AVX-512F, F16C and FMA; `c.k` and `c.v` hold `c.units` units from `c.at`.
    #[target_feature(enable = "avx512f,f16c,fma")]
    unsafe fn pass(c: &Cache, mode: Mode, st: &mut State) {
        let k = c.k[c.at.0..].as_ptr().cast::<u8>();
        let v = c.v[c.at.1..].as_ptr().cast::<u8>();
        let mut x = _mm512_setzero_si512();
        let mut score_sum = _mm512_setzero_ps();
        for u in 0..c.units {
            let (ku, vu) = match mode {
                Mode::FmaResident => (u % HEADS, u % HEADS),
                _ => (u, u),
            };
            // SAFETY (this block and the calls): unit `ku`/`vu` < units; prefetch addresses
            // past the end are hints only (never dereferenced).
            let (kp, vp) = (k.add(ku * UNIT), v.add(vu * UNIT));
            if mode == Mode::Read {
                for line in 0..UNIT / 64 {
                    x = _mm512_or_si512(x, _mm512_loadu_si512(kp.add(64 * line).cast()));
                    x = _mm512_or_si512(x, _mm512_loadu_si512(vp.add(64 * line).cast()));
                }
                continue;
            }
            let g = u % HEADS;
            let q = st.q[g * ROWS * D..].as_ptr();
            let o = st.o[g * ROWS * D..].as_mut_ptr();
            let pf = |base: *const u8, ahead: usize| match mode {
                Mode::Fma => base.wrapping_add(ahead * UNIT),
                _ => base,
            };
            score_sum = _mm512_add_ps(score_sum, scores(kp.cast(), q, pf(kp, K_AHEAD)));
            values(vp.cast(), st.p.as_ptr(), o, pf(vp, V_AHEAD));
        }
        // A register of 16 u32 lanes is 64 bytes of plain integers either way.
        let lanes: [u32; 16] = core::mem::transmute(x);
        let bits = lanes.iter().fold(0u32, |a, &b| a.wrapping_add(b));
        st.sink += bits as f32 + _mm512_reduce_add_ps(score_sum);
        std::hint::black_box(st.sink);
    }

    /// Widens 16 f16 at `p`.
    ///
    /// # Safety
    /// AVX-512F and F16C; 32 readable bytes at `p`.
    #[inline(always)]
    unsafe fn widen(p: *const u16) -> __m512 {
        _mm512_cvtph_ps(_mm256_loadu_si256(p.cast()))
    }

    /// The score FMAs of 16 keys x 4 rows (keys 4 at a time, 16 accumulators over d), summed
    /// into one register so that they stay live; prefetches the 16 K rows at `pf`.
    ///
    /// # Safety
    /// That of [`pass`]; 16 rows of `D` f16 at `k`, 4 of `D` floats at `q`.
    #[inline(always)]
    unsafe fn scores(k: *const u16, q: *const f32, pf: *const u8) -> __m512 {
        let mut sum = _mm512_setzero_ps();
        for group in 0..4 {
            for line in 0..16 {
                _mm_prefetch::<_MM_HINT_T0>(pf.wrapping_add(group * 1024 + 64 * line).cast());
            }
            let mut acc = [_mm512_setzero_ps(); 16];
            for c in (0..D).step_by(16) {
                // Not `array::map`: a closure does not inherit the target features, and the
                // intrinsics in it would be called rather than inlined.
                let row = |j: usize| k.add((4 * group + j) * D + c);
                let keys = [widen(row(0)), widen(row(1)), widen(row(2)), widen(row(3))];
                for i in 0..ROWS {
                    let qv = _mm512_loadu_ps(q.add(i * D + c));
                    for (j, &kv) in keys.iter().enumerate() {
                        acc[j * ROWS + i] = _mm512_fmadd_ps(qv, kv, acc[j * ROWS + i]);
                    }
                }
            }
            for a in acc {
                sum = _mm512_add_ps(sum, a);
            }
        }
        sum
    }

    /// The PV FMAs of 16 keys x 4 rows into `o` (`[4][d]`, 16 accumulators per 64 columns),
    /// probabilities broadcast from `p` (`[4][16]`); prefetches the 16 V rows at `pf`.
    ///
    /// # Safety
    /// That of [`pass`]; 16 rows of `D` f16 at `v`, 64 floats at `p`, 4 rows of `D` at `o`.
    #[inline(always)]
    unsafe fn values(v: *const u16, p: *const f32, o: *mut f32, pf: *const u8) {
        for c0 in (0..D).step_by(64) {
            let mut acc = [_mm512_setzero_ps(); 16];
            for (a, acc) in acc.iter_mut().enumerate() {
                *acc = _mm512_loadu_ps(o.add(a / 4 * D + c0 + a % 4 * 16));
            }
            for j in 0..16 {
                if c0 == 0 {
                    for line in 0..4 {
                        _mm_prefetch::<_MM_HINT_T0>(pf.wrapping_add(j * 256 + 64 * line).cast());
                    }
                }
                let at = |r: usize| v.add(j * D + c0 + 16 * r);
                let vv = [widen(at(0)), widen(at(1)), widen(at(2)), widen(at(3))];
                for i in 0..ROWS {
                    let pj = _mm512_set1_ps(*p.add(i * 16 + j));
                    for (r, &vr) in vv.iter().enumerate() {
                        acc[i * 4 + r] = _mm512_fmadd_ps(pj, vr, acc[i * 4 + r]);
                    }
                }
            }
            for (a, acc) in acc.iter().enumerate() {
                _mm512_storeu_ps(o.add(a / 4 * D + c0 + a % 4 * 16), *acc);
            }
        }
    }
}
