//! Partial softmax attention over one chunk of keys, for attention over a KV cache whose keys
//! live in blocks (paged) or in one run (contiguous).
//!
//! The caller cuts the cached keys into chunks at fixed *logical* positions and merges the
//! chunks' states in a fixed order ([`merge_partial`]); inside a chunk every sum runs over the
//! keys in logical order. So the bits depend on neither the physical layout (how the chunk's
//! keys are split into runs) nor on the thread that ran the chunk.

use crate::elem::Elem;
use crate::error::{add, mul, need, ShapeError};
use crate::exp::exp_v;
use crate::isa::{dispatch, Isa, WithIsa};
use crate::tier::{active, Tier};
use crate::vecops::dot_v;

/// Most keys in one chunk.
pub const CHUNK_MAX: usize = 256;

/// A contiguous run of one KV head's keys and values: key `i < len` of the run is
/// `k[i * stride .. i * stride + d]`, value `i` likewise in `v`.
#[derive(Clone, Copy, Debug)]
pub struct KvRun<'a, E> {
    /// Keys.
    pub k: &'a [E],
    /// Values.
    pub v: &'a [E],
    /// Elements between consecutive keys; at least `d` when `len > 1`.
    pub stride: usize,
    /// Keys in the run.
    pub len: usize,
}

/// The softmax state of one query row over some keys: running max `m`, sum `l` of
/// `exp(s - m)`, and the unnormalised output `o = sum exp(s - m) v` (length d). A row that saw
/// no key has `m = -inf`, `l = 0`, `o = 0`.
#[derive(Debug)]
pub struct PartialRows<'a> {
    /// Per row.
    pub m: &'a mut [f32],
    /// Per row.
    pub l: &'a mut [f32],
    /// `[rows][d]`.
    pub o: &'a mut [f32],
}

/// Scratch floats [`attend_partial`] needs for head dimension `d`: the widened K and V of a
/// chunk and one row of scores.
pub const fn partial_scratch_len(d: usize) -> usize {
    CHUNK_MAX
        .saturating_mul(d)
        .saturating_mul(2)
        .saturating_add(CHUNK_MAX + 16)
}

/// Kernel `partial_f32`: for each query token `t < ranges.len()` and head `h < r` (row
/// `t * r + h`), over the chunk keys `j` in `ranges[t] = lo..hi` (indices into the chunk, the
/// concatenation of `runs`):
/// `s_j = scale * q[row] . k_j`, `m = max s_j`, `p_j = exp(s_j - m)`, `l = sum p_j`,
/// `o = sum p_j v_j`, sums in increasing `j`.
///
/// The chunk's K and V are widened to f32 once for all rows (the r heads of a KV head share
/// every load). `q` is `[tokens][r][d]`.
///
/// # Errors
/// A chunk longer than [`CHUNK_MAX`], a range outside the chunk, short slices or scratch;
/// nothing is written then.
#[allow(clippy::too_many_arguments)] // the shape of the problem; a struct would only rename them
pub fn attend_partial<E: Elem>(
    d: usize,
    r: usize,
    q: &[f32],
    runs: &[KvRun<'_, E>],
    ranges: &[(u32, u32)],
    scale: f32,
    out: PartialRows<'_>,
    scratch: &mut [f32],
) -> Result<(), ShapeError> {
    attend_partial_on(active(), d, r, q, runs, ranges, scale, out, scratch)
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn attend_partial_on<E: Elem>(
    tier: Tier,
    d: usize,
    r: usize,
    q: &[f32],
    runs: &[KvRun<'_, E>],
    ranges: &[(u32, u32)],
    scale: f32,
    out: PartialRows<'_>,
    scratch: &mut [f32],
) -> Result<(), ShapeError> {
    if d == 0 || r == 0 {
        return Err(ShapeError::Invalid {
            what: "attend_partial: d and r (must be > 0)",
            value: 0,
        });
    }
    let mut n = 0usize;
    for run in runs {
        if run.len > 0 {
            if run.len > 1 && run.stride < d {
                return Err(ShapeError::Invalid {
                    what: "attend_partial: run stride",
                    value: run.stride,
                });
            }
            let len = add(
                mul(run.len - 1, run.stride, "attend_partial: run")?,
                d,
                "attend_partial: run",
            )?;
            need("attend_partial: run k", len, run.k.len())?;
            need("attend_partial: run v", len, run.v.len())?;
        }
        n = add(n, run.len, "attend_partial: chunk")?;
    }
    if n > CHUNK_MAX {
        return Err(ShapeError::Invalid {
            what: "attend_partial: chunk length (max CHUNK_MAX)",
            value: n,
        });
    }
    if let Some(&(lo, hi)) = ranges.iter().find(|&&(lo, hi)| lo > hi || hi as usize > n) {
        return Err(ShapeError::Invalid {
            what: "attend_partial: key range",
            value: if lo > hi { lo as usize } else { hi as usize },
        });
    }
    let rows = mul(ranges.len(), r, "attend_partial: rows")?;
    need(
        "attend_partial: q",
        mul(rows, d, "attend_partial: q")?,
        q.len(),
    )?;
    need("attend_partial: m", rows, out.m.len())?;
    need("attend_partial: l", rows, out.l.len())?;
    need(
        "attend_partial: o",
        mul(rows, d, "attend_partial: o")?,
        out.o.len(),
    )?;
    need(
        "attend_partial: scratch",
        partial_scratch_len(d),
        scratch.len(),
    )?;

    let (kt, rest) = scratch.split_at_mut(CHUNK_MAX * d);
    let (vt, s) = rest.split_at_mut(CHUNK_MAX * d);
    let mut at = 0;
    for run in runs {
        for i in 0..run.len {
            E::to_f32_slice(
                &run.k[i * run.stride..i * run.stride + d],
                &mut kt[(at + i) * d..(at + i + 1) * d],
            );
            E::to_f32_slice(
                &run.v[i * run.stride..i * run.stride + d],
                &mut vt[(at + i) * d..(at + i + 1) * d],
            );
        }
        at += run.len;
    }
    dispatch(
        tier,
        Job {
            d,
            r,
            q,
            kt: &kt[..n * d],
            vt: &vt[..n * d],
            ranges,
            scale,
            out,
            s,
        },
    );
    Ok(())
}

struct Job<'a> {
    d: usize,
    r: usize,
    q: &'a [f32],
    kt: &'a [f32],
    vt: &'a [f32],
    ranges: &'a [(u32, u32)],
    scale: f32,
    out: PartialRows<'a>,
    s: &'a mut [f32],
}

impl WithIsa for Job<'_> {
    type Output = ();

    #[inline(always)]
    fn run<I: Isa>(self, isa: I) {
        let Job {
            d,
            r,
            q,
            kt,
            vt,
            ranges,
            scale,
            out,
            s,
        } = self;
        let l = I::LANES;
        for (t, &(lo, hi)) in ranges.iter().enumerate() {
            let (lo, hi) = (lo as usize, hi as usize);
            for h in 0..r {
                let row = t * r + h;
                let o = &mut out.o[row * d..(row + 1) * d];
                o.fill(0.0);
                if lo == hi {
                    out.m[row] = f32::NEG_INFINITY;
                    out.l[row] = 0.0;
                    continue;
                }
                let qr = &q[row * d..(row + 1) * d];
                let mut m = f32::NEG_INFINITY;
                for j in lo..hi {
                    let v = dot_v(isa, qr, &kt[j * d..(j + 1) * d]) * scale;
                    s[j - lo] = v;
                    m = m.max(v);
                }
                // exp(s - m) through padded registers, so no value depends on its position.
                let n = hi - lo;
                let padded = n.div_ceil(l) * l;
                s[n..padded].fill(f32::NEG_INFINITY);
                let mv = isa.splat(m);
                for c in s[..padded].chunks_exact_mut(l) {
                    let e = exp_v(isa, isa.sub(isa.load_s(c), mv));
                    isa.store_s(c, e);
                }
                let mut sum = 0.0f32;
                for (jj, &p) in s[..n].iter().enumerate() {
                    sum += p;
                    let vj = &vt[(lo + jj) * d..(lo + jj + 1) * d];
                    let pv = isa.splat(p);
                    let mut i = 0;
                    while i + l <= d {
                        let acc = isa.mul_add(pv, isa.load_s(&vj[i..]), isa.load_s(&o[i..]));
                        isa.store_s(&mut o[i..], acc);
                        i += l;
                    }
                    for k in i..d {
                        o[k] += p * vj[k];
                    }
                }
                out.m[row] = m;
                out.l[row] = sum;
            }
        }
    }
}

/// Folds the state `(m2, l2, o2)` of later keys into `(m, l, o)`: the fixed-order merge of
/// chunk states. Rows that saw no key leave the other side unchanged.
pub fn merge_partial(m: &mut f32, l: &mut f32, o: &mut [f32], m2: f32, l2: f32, o2: &[f32]) {
    if m2 == f32::NEG_INFINITY {
        return;
    }
    if *m == f32::NEG_INFINITY {
        *m = m2;
        *l = l2;
        o.copy_from_slice(&o2[..o.len()]);
        return;
    }
    let mx = m.max(m2);
    let (a, b) = (libm::expf(*m - mx), libm::expf(m2 - mx));
    *l = *l * a + l2 * b;
    for (x, &y) in o.iter_mut().zip(o2) {
        *x = *x * a + y * b;
    }
    *m = mx;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{rand_elem, rand_vec};
    use crate::tier::supported;

    /// Independent f64 attention over the whole key set, per row.
    fn reference(
        d: usize,
        r: usize,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        ranges: &[(u32, u32)],
        scale: f32,
    ) -> Vec<f64> {
        let mut out = vec![0.0f64; ranges.len() * r * d];
        for (t, &(lo, hi)) in ranges.iter().enumerate() {
            for h in 0..r {
                let row = t * r + h;
                let qr = &q[row * d..(row + 1) * d];
                let s: Vec<f64> = (lo..hi)
                    .map(|j| {
                        let kj = &k[j as usize * d..(j as usize + 1) * d];
                        qr.iter()
                            .zip(kj)
                            .map(|(a, b)| *a as f64 * *b as f64)
                            .sum::<f64>()
                            * scale as f64
                    })
                    .collect();
                let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let l: f64 = s.iter().map(|x| (x - m).exp()).sum();
                for (jj, j) in (lo..hi).enumerate() {
                    let p = (s[jj] - m).exp() / l;
                    for i in 0..d {
                        out[row * d + i] += p * v[j as usize * d + i] as f64;
                    }
                }
            }
        }
        out
    }

    #[test]
    fn chunks_and_runs_match_the_reference_and_each_other() {
        for tier in Tier::ALL.into_iter().filter(|&t| supported(t)) {
            for &(d, r, n) in &[
                (128usize, 4usize, 600usize),
                (18, 1, 257),
                (64, 8, 64),
                (32, 2, 1),
            ] {
                let q = rand_vec(3 * r * d, 1);
                let kh: Vec<half::f16> = rand_elem(n * d, 2);
                let vh: Vec<half::f16> = rand_elem(n * d, 3);
                let k: Vec<f32> = kh.iter().map(|x| x.to_f32()).collect();
                let v: Vec<f32> = vh.iter().map(|x| x.to_f32()).collect();
                let ranges = [
                    (0u32, n as u32),
                    (n as u32 / 3, n as u32 - n as u32 / 5),
                    (5.min(n) as u32, 5.min(n) as u32),
                ];
                let scale = 1.0 / (d as f32).sqrt();
                let want = reference(d, r, &q, &k, &v, &ranges, scale);
                // Two layouts: chunks of CHUNK_MAX keys as one run, and the same chunks split
                // into runs of 16 keys (paged blocks). Both must give the same bits.
                let mut results = vec![];
                for block in [CHUNK_MAX, 16] {
                    let rows = ranges.len() * r;
                    let (mut m, mut l, mut o) = (
                        vec![f32::NEG_INFINITY; rows],
                        vec![0.0; rows],
                        vec![0.0; rows * d],
                    );
                    let mut scratch = vec![0.0; partial_scratch_len(d)];
                    for c0 in (0..n).step_by(CHUNK_MAX) {
                        let c1 = (c0 + CHUNK_MAX).min(n);
                        let runs: Vec<KvRun<'_, half::f16>> = (c0..c1)
                            .step_by(block)
                            .map(|b0| {
                                let b1 = (b0 + block).min(c1);
                                KvRun {
                                    k: &kh[b0 * d..b1 * d],
                                    v: &vh[b0 * d..b1 * d],
                                    stride: d,
                                    len: b1 - b0,
                                }
                            })
                            .collect();
                        let cr: Vec<(u32, u32)> = ranges
                            .iter()
                            .map(|&(lo, hi)| {
                                let lo = (lo as usize).clamp(c0, c1) - c0;
                                let hi = (hi as usize).clamp(c0, c1) - c0;
                                (lo as u32, hi.max(lo) as u32)
                            })
                            .collect();
                        let (mut pm, mut pl, mut po) =
                            (vec![0.0; rows], vec![0.0; rows], vec![0.0; rows * d]);
                        attend_partial_on(
                            tier,
                            d,
                            r,
                            &q,
                            &runs,
                            &cr,
                            scale,
                            PartialRows {
                                m: &mut pm,
                                l: &mut pl,
                                o: &mut po,
                            },
                            &mut scratch,
                        )
                        .unwrap();
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
                    let got: Vec<f32> = (0..rows * d)
                        .map(|i| {
                            if l[i / d] > 0.0 {
                                o[i] / l[i / d]
                            } else {
                                o[i]
                            }
                        })
                        .collect();
                    for (i, (&g, &w)) in got.iter().zip(&want).enumerate() {
                        assert!(
                            (g as f64 - w).abs() <= 1e-5 * (1.0 + w.abs()),
                            "{tier:?} d {d} r {r} n {n} elem {i}: {g} vs {w}"
                        );
                    }
                    results.push(got);
                }
                assert!(
                    results[0]
                        .iter()
                        .zip(&results[1])
                        .all(|(a, b)| a.to_bits() == b.to_bits()),
                    "{tier:?}: layout changed the bits"
                );
            }
        }
    }

    #[test]
    fn rejects_bad_shapes() {
        let k = [0.0f32; 64];
        let run = [KvRun {
            k: &k[..],
            v: &k[..],
            stride: 4,
            len: 16,
        }];
        let (mut m, mut l, mut o) = ([0.0; 1], [0.0; 1], [0.0; 4]);
        let mut s = vec![0.0; partial_scratch_len(4)];
        let q = [0.0; 4];
        let bad_range = attend_partial(
            4,
            1,
            &q,
            &run,
            &[(0, 17)],
            1.0,
            PartialRows {
                m: &mut m,
                l: &mut l,
                o: &mut o,
            },
            &mut s,
        );
        assert!(bad_range.is_err());
        let long = [KvRun {
            k: &k[..],
            v: &k[..],
            stride: 4,
            len: 17,
        }];
        assert!(attend_partial(
            4,
            1,
            &q,
            &long,
            &[(0, 1)],
            1.0,
            PartialRows {
                m: &mut m,
                l: &mut l,
                o: &mut o
            },
            &mut s
        )
        .is_err());
    }
}
