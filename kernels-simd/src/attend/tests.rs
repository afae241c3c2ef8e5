//! Attention against an f64 reference built from the explicit mask.
//!
//! Tolerance: `|got - want| <= 1e-5 * (1 + |want|)` for every storage type (K/V are widened
//! exactly, so only f32 arithmetic differs from the reference).

use super::*;
use crate::testutil::{rand_elem, rand_vec, Rng, TestMask};
use crate::tier::available;
use half::{bf16, f16};
use proptest::prelude::*;
use std::vec;
use std::vec::Vec;

const TOL: f64 = 1e-5;

struct Case<E> {
    shape: AttnShape,
    q: Vec<f32>,
    k: Vec<E>,
    v: Vec<E>,
    stride: usize,
    nk: usize,
}

impl<E: Elem> Case<E> {
    /// K/V stored as head 1 of a 3-head `[T, 3, D]` cache, to exercise the stride.
    fn new(d: usize, r: usize, nq: usize, q_start: usize, nk: usize, seed: u64) -> Self {
        let stride = 3 * d;
        let total = nk * stride;
        Case {
            shape: AttnShape { d, r, nq, q_start },
            q: rand_vec(nq * r * d, seed),
            k: rand_elem(total + d, seed + 1),
            v: rand_elem(total + d, seed + 2),
            stride,
            nk,
        }
    }

    fn kv(&self) -> KvView<'_, E> {
        let d = self.shape.d;
        KvView {
            k: &self.k[d..],
            v: &self.v[d..],
            stride: self.stride,
            len: self.nk,
        }
    }

    fn run(&self, tier: Tier, mask: &TestMask) -> Vec<f32> {
        let AttnShape { d, r, nq, .. } = self.shape;
        let mut out = vec![f32::NAN; nq * r * d];
        let mut scratch = vec![f32::NAN; attend_scratch_len(d, r)];
        let scale = 1.0 / (d as f32).sqrt();
        attend_on(
            tier,
            self.shape,
            &self.q,
            self.kv(),
            mask,
            scale,
            &mut out,
            &mut scratch,
        )
        .unwrap();
        out
    }

    fn reference(&self, mask: &TestMask) -> Vec<f64> {
        let AttnShape { d, r, nq, q_start } = self.shape;
        let kv = self.kv();
        let scale = (1.0 / (d as f32).sqrt()) as f64;
        let mut out = vec![0.0f64; nq * r * d];
        for t in 0..nq {
            let i = q_start + t;
            for h in 0..r {
                let qrow = &self.q[(t * r + h) * d..][..d];
                let vis: Vec<usize> = (0..self.nk).filter(|&j| mask.visible(i, j)).collect();
                let s: Vec<f64> = vis
                    .iter()
                    .map(|&j| {
                        let krow = &kv.k[j * kv.stride..][..d];
                        qrow.iter()
                            .zip(krow)
                            .map(|(&a, b)| a as f64 * b.to_f32() as f64)
                            .sum::<f64>()
                            * scale
                    })
                    .collect();
                let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let w: Vec<f64> = s.iter().map(|&x| (x - m).exp()).collect();
                let l: f64 = w.iter().sum();
                let o = &mut out[(t * r + h) * d..][..d];
                for (&j, &wj) in vis.iter().zip(&w) {
                    let vrow = &kv.v[j * kv.stride..][..d];
                    for c in 0..d {
                        o[c] += wj / l * vrow[c].to_f32() as f64;
                    }
                }
            }
        }
        out
    }

    fn check(&self, tier: Tier, mask: &TestMask, what: &str) -> Vec<f32> {
        let got = self.run(tier, mask);
        let want = self.reference(mask);
        for (idx, (&g, &w)) in got.iter().zip(&want).enumerate() {
            assert!(
                (g as f64 - w).abs() <= TOL * (1.0 + w.abs()),
                "{tier} {} {:?} {what} {mask:?}: out[{idx}] = {g}, want {w}",
                E::NAME,
                self.shape
            );
        }
        // A query that sees nothing must get exact zeros.
        let AttnShape { d, r, nq, q_start } = self.shape;
        for t in 0..nq {
            if !(0..self.nk).any(|j| mask.visible(q_start + t, j)) {
                assert!(got[t * r * d..][..r * d]
                    .iter()
                    .all(|&x| x == 0.0 && x.is_sign_positive()));
            }
        }
        got
    }
}

fn causal() -> TestMask {
    TestMask {
        exact: true,
        tight_range: true,
        ..TestMask::default()
    }
}

/// Every kind of mask rule and some combinations, for `t` tokens.
fn masks(t: usize, rng: &mut Rng) -> Vec<TestMask> {
    let docs: Vec<u32> = {
        let mut id = 0;
        (0..t)
            .map(|_| {
                if rng.below(23) == 0 {
                    id += 1;
                }
                id
            })
            .collect()
    };
    let mut cu = vec![0usize];
    while *cu.last().unwrap() < t {
        let next = (*cu.last().unwrap() + rng.below(90)).min(t);
        cu.push(next);
    }
    let base = [
        causal(),
        TestMask {
            window: Some(1),
            ..causal()
        },
        TestMask {
            window: Some(17),
            ..causal()
        },
        TestMask {
            window: Some(70),
            ..causal()
        },
        TestMask {
            len: Some(t * 2 / 3),
            ..causal()
        },
        TestMask {
            len: Some(0),
            ..causal()
        },
        TestMask {
            doc_ids: Some(docs.clone()),
            ..causal()
        },
        TestMask {
            cu_seqlens: Some(cu.clone()),
            ..causal()
        },
        TestMask {
            window: Some(30),
            len: Some(t.saturating_sub(5)),
            doc_ids: Some(docs),
            cu_seqlens: Some(cu),
            ..causal()
        },
    ];
    base.into_iter().collect()
}

#[allow(clippy::too_many_arguments)] // one test case's full description
fn for_types(
    tier: Tier,
    d: usize,
    r: usize,
    nq: usize,
    q_start: usize,
    nk: usize,
    seed: u64,
    mask: &TestMask,
) {
    match seed % 3 {
        0 => {
            Case::<f32>::new(d, r, nq, q_start, nk, seed).check(tier, mask, "f32");
        }
        1 => {
            Case::<f16>::new(d, r, nq, q_start, nk, seed).check(tier, mask, "f16");
        }
        _ => {
            Case::<bf16>::new(d, r, nq, q_start, nk, seed).check(tier, mask, "bf16");
        }
    }
}

#[test]
fn attend_edge_lengths_dims_groups() {
    let dims = [18usize, 32, 50, 64, 80, 96, 128, 256];
    let lens = [0usize, 1, 15, 16, 17, 63, 64, 65, 200];
    let mut seed = 0;
    for tier in available() {
        for (li, &n) in lens.iter().enumerate() {
            for (di, &d) in dims.iter().enumerate() {
                let r = [1usize, 2, 4, 8][(li + di) % 4];
                seed += 1;
                for_types(tier, d, r, n, 0, n, seed, &causal());
            }
        }
    }
}

#[test]
fn attend_every_type_and_group() {
    for tier in available() {
        for r in [1usize, 2, 4, 8] {
            for ty in 0..3u64 {
                for_types(tier, 64, r, 70, 0, 70, ty + 3 * r as u64, &causal());
            }
        }
    }
}

#[test]
fn attend_masks_exact_vs_partial_classify() {
    let mut rng = Rng::new(5);
    for tier in available() {
        for (n, d, r) in [(130usize, 32usize, 2usize), (200, 18, 1), (97, 80, 4)] {
            let case = Case::<f32>::new(d, r, n, 0, n, n as u64);
            for m in masks(n, &mut rng) {
                let exact = case.check(tier, &m, "exact");
                // Same key range, classify always Partial: must be bitwise identical, since
                // skipped tiles and fully masked ones both leave the state untouched.
                let partial_same_range = TestMask {
                    exact: false,
                    ..m.clone()
                };
                let p = case.check(tier, &partial_same_range, "partial");
                assert!(
                    exact
                        .iter()
                        .zip(&p)
                        .all(|(a, b)| a.to_bits() == b.to_bits()),
                    "{tier} {m:?}"
                );
                // Default key range too (tiles then start at 0): within tolerance.
                case.check(
                    tier,
                    &TestMask {
                        exact: false,
                        tight_range: false,
                        ..m.clone()
                    },
                    "default range",
                );
                case.check(
                    tier,
                    &TestMask {
                        tight_range: false,
                        ..m
                    },
                    "exact, default range",
                );
            }
        }
    }
}

#[test]
fn attend_decode_and_chunked_prefill() {
    let mut rng = Rng::new(9);
    for tier in available() {
        for (nq, q_start, nk) in [
            (1usize, 199usize, 200usize),
            (1, 0, 1),
            (1, 64, 65),
            (17, 100, 117),
            (40, 60, 100),
        ] {
            for m in masks(nk, &mut rng) {
                for r in [1usize, 8] {
                    for_types(tier, 64, r, nq, q_start, nk, (nq + q_start + r) as u64, &m);
                }
            }
        }
    }
}

/// `None` tiles must not be computed: poison keys/values there with NaN, which any use (even
/// with probability 0) would spread into the output.
#[test]
fn attend_skips_none_tiles() {
    for tier in available() {
        let mut case = Case::<f32>::new(64, 2, 40, 160, 200, 11);
        let stride = case.stride;
        for j in 0..128 {
            for c in 0..64 {
                case.k[64 + j * stride + c] = f32::NAN;
                case.v[64 + j * stride + c] = f32::NAN;
            }
        }
        // Window 20 from query 160 on: keys < 128 are never visible; the default key range
        // still starts at 0, so only classify keeps those tiles out.
        let mask = TestMask {
            window: Some(20),
            exact: true,
            ..TestMask::default()
        };
        let got = case.check(tier, &mask, "poisoned");
        assert!(got.iter().all(|x| x.is_finite()));
    }
}

#[test]
fn attend_is_deterministic_and_validates() {
    for tier in available() {
        let case = Case::<bf16>::new(96, 4, 77, 0, 77, 3);
        let a = case.run(tier, &causal());
        let b = case.run(tier, &causal());
        assert!(a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()));
    }
    let case = Case::<f32>::new(32, 2, 5, 0, 5, 1);
    let mut out = vec![3.0f32; 5 * 2 * 32];
    let mut scratch = vec![0.0f32; attend_scratch_len(32, 2)];
    let m = causal();
    let s = case.shape;
    let kv = case.kv();
    let errs = [
        attend(
            AttnShape { d: 0, ..s },
            &case.q,
            kv,
            &m,
            1.0,
            &mut out,
            &mut scratch,
        ),
        attend(
            AttnShape { r: 0, ..s },
            &case.q,
            kv,
            &m,
            1.0,
            &mut out,
            &mut scratch,
        ),
        attend(
            AttnShape { nq: 6, ..s },
            &case.q,
            kv,
            &m,
            1.0,
            &mut out,
            &mut scratch,
        ),
        attend(
            s,
            &case.q,
            KvView { len: 6, ..kv },
            &m,
            1.0,
            &mut out,
            &mut scratch,
        ),
        attend(
            s,
            &case.q,
            KvView { stride: 31, ..kv },
            &m,
            1.0,
            &mut out,
            &mut scratch,
        ),
        attend(s, &case.q, kv, &m, 1.0, &mut out[1..], &mut scratch),
        attend(s, &case.q, kv, &m, 1.0, &mut out, &mut scratch[1..]),
        attend(
            AttnShape {
                q_start: usize::MAX,
                ..s
            },
            &case.q,
            kv,
            &m,
            1.0,
            &mut out,
            &mut scratch,
        ),
        attend(
            AttnShape {
                d: usize::MAX / 2,
                ..s
            },
            &case.q,
            kv,
            &m,
            1.0,
            &mut out,
            &mut scratch,
        ),
    ];
    for e in errs {
        assert!(!e.unwrap_err().to_string().is_empty());
    }
    assert!(out.iter().all(|&x| x == 3.0));
    attend(s, &case.q, kv, &m, 1.0, &mut out, &mut scratch).unwrap();
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 40, ..ProptestConfig::default() })]
    #[test]
    fn attend_random(d in 1usize..140, r_log in 0u32..4, nq in 0usize..90, extra in 0usize..80,
                     window in proptest::option::of(1usize..100), pad in proptest::option::of(0usize..200),
                     exact: bool, seed in 0u64..10_000) {
        let r = 1usize << r_log;
        let nk = nq + extra;
        let mask = TestMask { window, len: pad, exact, tight_range: exact, ..TestMask::default() };
        for tier in available() {
            for_types(tier, d, r, nq, extra, nk, seed, &mask);
        }
    }
}
