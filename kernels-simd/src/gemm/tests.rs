use super::*;
use crate::testutil::{rand_elem, rand_vec, Rng, EDGE_LENS};
use crate::tier::available;
use half::{bf16, f16};
use proptest::prelude::*;
use std::vec;
use std::vec::Vec;

/// f64 reference and the per-element error bound `(k + 2) * 2^-23 * sum|x w| + tiny` (a
/// forward-error bound for a length-k f32 dot product plus the bias add).
fn reference<E: Elem>(s: GemmShape, x: &[f32], w: &[E], b: Option<&[E]>) -> Vec<(f64, f64)> {
    let mut out = Vec::with_capacity(s.m * s.n);
    for i in 0..s.m {
        for j in 0..s.n {
            let mut acc = 0.0f64;
            let mut abs = 0.0f64;
            for kk in 0..s.k {
                let p = x[i * s.k + kk] as f64 * w[j * s.k + kk].to_f32() as f64;
                acc += p;
                abs += p.abs();
            }
            if let Some(b) = b {
                acc += b[j].to_f32() as f64;
                abs += b[j].to_f32().abs() as f64;
            }
            out.push((acc, (s.k as f64 + 2.0) * 1.2e-7 * abs + 1e-30));
        }
    }
    out
}

fn check<E: Elem>(tier: Tier, s: GemmShape, with_bias: bool, seed: u64) {
    let x = rand_vec(s.m * s.k, seed);
    let w = rand_elem::<E>(s.n * s.k, seed + 1);
    let bias = rand_elem::<E>(s.n, seed + 2);
    let b = with_bias.then_some(&bias[..]);
    let want = reference(s, &x, &w, b);
    // A wider stride with sentinel padding checks that nothing outside the block is written.
    let stride = s.n + 3;
    let mut y = vec![f32::NAN; s.m * stride];
    let mut scratch = vec![f32::NAN; gemm_scratch_len(s.k)];
    gemm_on(tier, s, 0..s.n, &x, &w, b, &mut y, stride, &mut scratch).unwrap();
    for i in 0..s.m {
        for j in 0..stride {
            let got = y[i * stride + j];
            if j >= s.n {
                assert!(got.is_nan(), "{tier}: wrote outside the block at ({i},{j})");
                continue;
            }
            let (r, tol) = want[i * s.n + j];
            assert!(
                (got as f64 - r).abs() <= tol,
                "{tier} {} {s:?} bias={with_bias} y[{i}][{j}] = {got}, want {r} (tol {tol:e})",
                E::NAME
            );
        }
    }
    // Column ranges and row blocks must reproduce the same bits.
    if s.n > 0 && s.m > 0 {
        let mut rng = Rng::new(seed + 7);
        let mut cuts = vec![0, s.n];
        for _ in 0..3 {
            cuts.push(rng.below(s.n + 1));
        }
        cuts.sort_unstable();
        for c in cuts.windows(2) {
            let width = c[1] - c[0];
            let mut blk = vec![0.0f32; s.m * width];
            gemm_on(
                tier,
                s,
                c[0]..c[1],
                &x,
                &w,
                b,
                &mut blk,
                width,
                &mut scratch,
            )
            .unwrap();
            for i in 0..s.m {
                for j in 0..width {
                    assert_eq!(
                        blk[i * width + j].to_bits(),
                        y[i * stride + c[0] + j].to_bits(),
                        "{tier}: column split {c:?} changed bits at ({i},{j})"
                    );
                }
            }
        }
        let m1 = rng.below(s.m + 1);
        let sub = GemmShape { m: s.m - m1, ..s };
        let mut rows = vec![0.0f32; sub.m * s.n];
        gemm_on(
            tier,
            sub,
            0..s.n,
            &x[m1 * s.k..],
            &w,
            b,
            &mut rows,
            s.n,
            &mut scratch,
        )
        .unwrap();
        for i in 0..sub.m {
            for j in 0..s.n {
                assert_eq!(
                    rows[i * s.n + j].to_bits(),
                    y[(m1 + i) * stride + j].to_bits()
                );
            }
        }
    }
}

#[test]
fn gemm_edge_shapes_all_tiers_and_types() {
    for tier in available() {
        for &m in &[0usize, 1, 2, 5, 6, 7, 8, 9, 13, 17] {
            for &n in EDGE_LENS {
                let k = [0usize, 1, 7, 64, 200][(m + n) % 5];
                let s = GemmShape { m, n, k };
                check::<f32>(tier, s, n % 2 == 0, (m * 1000 + n) as u64);
                check::<f16>(tier, s, n % 3 == 0, (m * 1000 + n) as u64);
                check::<bf16>(tier, s, n % 2 == 1, (m * 1000 + n) as u64);
            }
        }
        for &k in EDGE_LENS {
            check::<f32>(tier, GemmShape { m: 3, n: 33, k }, true, k as u64);
        }
    }
}

/// On tiers with FMA every element is exactly one fused multiply-add chain in increasing k from
/// zero, then the bias: the bits of `f32::mul_add` done in that order. Up to 16 rows take
/// the panel-free path for bf16 and f16 weights on AVX-512 (n = 37: two groups of 16 columns and
/// 5 through a panel; k = 300: 9 tiles of 32 steps and 12 more), 13-16 rows of it in two parts,
/// 17 rows the panels; one row takes groups in pairs (n = 53: a pair, a group alone and 5
/// through a panel; k = 40: one tile, fewer than the blocks a pair's second group trails by).
#[test]
fn gemm_is_one_fma_chain_per_element() {
    one_fma_chain_per_element::<bf16>();
    one_fma_chain_per_element::<f16>();
    one_fma_chain_per_element::<f32>();
}

fn one_fma_chain_per_element<E: Elem>() {
    for (tier, m, (n, k)) in available()
        .into_iter()
        .filter(|&t| t != Tier::Scalar)
        .flat_map(|t| [1, 2, 3, 4, 12, 13, 16, 17].map(|m| (t, m)))
        .flat_map(|(t, m)| [(37, 300), (53, 40), (53, 300)].map(|nk| (t, m, nk)))
    {
        let s = GemmShape { m, n, k };
        let x = rand_vec(s.m * s.k, 5);
        let w = rand_elem::<E>(s.n * s.k, 6);
        let b = rand_elem::<E>(s.n, 7);
        let mut y = vec![0.0f32; s.m * s.n];
        let mut scratch = vec![0.0f32; gemm_scratch_len(s.k)];
        gemm_on(tier, s, 0..s.n, &x, &w, Some(&b), &mut y, s.n, &mut scratch).unwrap();
        for i in 0..s.m {
            for j in 0..s.n {
                let mut acc = 0.0f32;
                for kk in 0..s.k {
                    acc = x[i * s.k + kk].mul_add(w[j * s.k + kk].to_f32(), acc);
                }
                acc += b[j].to_f32();
                let at = format!("{} {tier} {s:?} ({i},{j})", E::NAME);
                assert_eq!(y[i * s.n + j].to_bits(), acc.to_bits(), "{at}");
            }
        }
    }
}

#[test]
fn gemm_rejects_bad_shapes_without_writing() {
    let s = GemmShape { m: 2, n: 3, k: 4 };
    let x = vec![1.0f32; 8];
    let w = vec![1.0f32; 12];
    let mut scratch = vec![0.0f32; gemm_scratch_len(4)];
    let mut y = vec![7.0f32; 6];
    let bad: [Result<(), ShapeError>; 6] = [
        gemm(s, &x[..7], &w, None, &mut y, 3, &mut scratch),
        gemm(s, &x, &w[..11], None, &mut y, 3, &mut scratch),
        gemm(s, &x, &w, Some(&w[..2]), &mut y, 3, &mut scratch),
        gemm(s, &x, &w, None, &mut y, 2, &mut scratch),
        gemm(s, &x, &w, None, &mut y[..5], 3, &mut scratch),
        gemm_cols(s, 2..4, &x, &w, None, &mut y, 3, &mut scratch),
    ];
    for r in bad {
        let e = r.unwrap_err();
        assert!(!e.to_string().is_empty());
    }
    assert!(gemm(s, &x, &w, None, &mut y, 3, &mut scratch[..10]).is_err());
    assert!(gemm(
        GemmShape {
            m: usize::MAX,
            n: 2,
            k: 2
        },
        &x,
        &w,
        None,
        &mut y,
        3,
        &mut scratch
    )
    .is_err());
    assert!(y.iter().all(|&v| v == 7.0));
    gemm(s, &x, &w, None, &mut y, 3, &mut scratch).unwrap();
    assert_eq!(y, vec![4.0; 6]);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]
    #[test]
    fn gemm_random_shapes(m in 0usize..20, n in 0usize..80, k in 0usize..150, bias: bool,
                          ty in 0u8..3, seed in 0u64..1000) {
        for tier in available() {
            let s = GemmShape { m, n, k };
            match ty {
                0 => check::<f32>(tier, s, bias, seed),
                1 => check::<f16>(tier, s, bias, seed),
                _ => check::<bf16>(tier, s, bias, seed),
            }
        }
    }
}
