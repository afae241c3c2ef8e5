//! Vectorised `exp` for f32.
//!
//! Measured accuracy (test `exp_accuracy`, 400k points over [-88, 0] plus edges): at most 1 ulp
//! from the correctly rounded result and from `libm::expf`, maximum relative error 9.8e-8
//! (scalar tier, unfused) and 7.8e-8 (AVX2, AVX-512 and NEON tiers, fused) where the result is a
//! normal float (AVX-512 measured on a Xeon host, NEON under qemu-user). The test asserts <= 2 ulp and < 2.5e-7.

use crate::isa::{dispatch, scalar::Scalar, Isa, WithIsa};
use crate::tier::{active, Tier};

const LOG2E: f32 = core::f32::consts::LOG2_E;
/// 1.5 * 2^23: adding it rounds to an integer in the current (nearest-even) mode.
const ROUND_MAGIC: f32 = 12_582_912.0;
/// ln 2 split so that `n * LN2_HI` is exact for |n| < 2^15 (Cody-Waite).
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
/// Above this, exp overflows f32; clamping keeps the result finite (the largest float range).
const X_MAX: f32 = 88.722_83;
/// Below this, exp rounds to 0 even as a subnormal.
const X_MIN: f32 = -104.0;

/// Kernel `exp_f32_vec`: `exp(x)` per lane.
///
/// Formula: `n = round(x log2 e)`, `r = x - n ln2` (two-part Cody-Waite), `exp(r)` by its degree-7
/// Taylor polynomial on |r| <= ln2/2 (truncation < 0.05 ulp) in Horner form, then times
/// `2^n1 * 2^n2` with `n1 = round(n/2)`, `n2 = n - n1`, so both factors stay normal and results
/// down to the subnormal range round once. Inputs are clamped to [-104, 88.72]: below, the
/// result is 0; above, the largest finite value near `f32::MAX` rather than infinity. No tails:
/// it works on one register.
#[inline(always)]
pub(crate) fn exp_v<I: Isa>(isa: I, x: I::V) -> I::V {
    let x = isa.max(isa.min(x, isa.splat(X_MAX)), isa.splat(X_MIN));
    let magic = isa.splat(ROUND_MAGIC);
    let n = isa.sub(isa.mul_add(x, isa.splat(LOG2E), magic), magic);
    let r = isa.mul_add(n, isa.splat(-LN2_HI), x);
    let r = isa.mul_add(n, isa.splat(-LN2_LO), r);
    let mut p = isa.splat(1.0 / 5040.0);
    for c in [
        1.0 / 720.0,
        1.0 / 120.0,
        1.0 / 24.0,
        1.0 / 6.0,
        0.5,
        1.0,
        1.0,
    ] {
        p = isa.mul_add(p, r, isa.splat(c));
    }
    let n1 = isa.sub(isa.mul_add(n, isa.splat(0.5), magic), magic);
    let n2 = isa.sub(n, n1);
    isa.mul(isa.mul(p, isa.pow2i(n1)), isa.pow2i(n2))
}

/// Kernel `exp_f32_vec_nonpos`: `exp(x)` per lane for `x <= 0` (or -inf), as softmax needs.
///
/// Formula: that of [`exp_v`] with the scaling done by one `2^n` factor: inputs are clamped
/// below at -88 (no upper clamp: `x <= 0`), so `n = round(x log2 e) >= -127`, and `2^-127`
/// built from the exponent bits is exactly 0. Results equal [`exp_v`]'s bit for bit wherever
/// `n >= -126` (multiplying by normal powers of two is exact until the one final rounding);
/// below `exp(-87.3)`, about `1.2e-38`, they are 0 instead of subnormal. `exp(-inf) = 0`
/// exactly. No tails: it works on one register.
#[inline(always)]
pub(crate) fn exp_nonpos_v<I: Isa>(isa: I, x: I::V) -> I::V {
    let x = isa.max(x, isa.splat(-88.0));
    let magic = isa.splat(ROUND_MAGIC);
    let n = isa.sub(isa.mul_add(x, isa.splat(LOG2E), magic), magic);
    let r = isa.mul_add(n, isa.splat(-LN2_HI), x);
    let r = isa.mul_add(n, isa.splat(-LN2_LO), r);
    let mut p = isa.splat(1.0 / 5040.0);
    for c in [
        1.0 / 720.0,
        1.0 / 120.0,
        1.0 / 24.0,
        1.0 / 6.0,
        0.5,
        1.0,
        1.0,
    ] {
        p = isa.mul_add(p, r, isa.splat(c));
    }
    isa.mul(p, isa.pow2i(n))
}

/// `exp(x)` for one value with the scalar tier's arithmetic (the same algorithm as the vector
/// kernels, without fused multiply-add).
pub fn exp_f32(x: f32) -> f32 {
    exp_v(Scalar, x)
}

/// Replaces every `x` in `xs` by `exp(x)`, on the [`active`] tier.
pub fn exp_inplace(xs: &mut [f32]) {
    exp_inplace_on(active(), xs)
}

pub(crate) fn exp_inplace_on(tier: Tier, xs: &mut [f32]) {
    struct Job<'a>(&'a mut [f32]);
    impl WithIsa for Job<'_> {
        type Output = ();
        #[inline(always)]
        fn run<I: Isa>(self, isa: I) {
            let l = I::LANES;
            let mut chunks = self.0.chunks_exact_mut(l);
            for c in &mut chunks {
                let v = exp_v(isa, isa.load_s(c));
                isa.store_s(c, v);
            }
            let rest = chunks.into_remainder();
            if !rest.is_empty() {
                // Through a padded register, so a value's result never depends on its position.
                let mut buf = [0.0f32; 16];
                buf[..rest.len()].copy_from_slice(rest);
                let v = exp_v(isa, isa.load_s(&buf));
                isa.store_s(&mut buf, v);
                rest.copy_from_slice(&buf[..rest.len()]);
            }
        }
    }
    dispatch(tier, Job(xs))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tier::available;

    fn ulp_diff(a: f32, b: f32) -> u32 {
        // Both are non-negative here, so bit patterns are ordered like the values.
        (a.to_bits() as i64 - b.to_bits() as i64).unsigned_abs() as u32
    }

    #[test]
    fn exp_accuracy() {
        // Dense grid over [-88, 0] plus the edges.
        let n = 400_000;
        let mut xs: std::vec::Vec<f32> = (0..=n).map(|i| -88.0 * i as f32 / n as f32).collect();
        xs.extend([0.0, -0.0, -1e-30, -87.3, -87.34, -87.35, -88.0]);
        for tier in available() {
            let mut ys = xs.clone();
            exp_inplace_on(tier, &mut ys);
            let (mut max_ulp, mut max_ulp_libm, mut max_rel) = (0u32, 0u32, 0.0f64);
            for (&x, &y) in xs.iter().zip(&ys) {
                let truth = (x as f64).exp();
                let rounded = truth as f32;
                max_ulp = max_ulp.max(ulp_diff(y, rounded));
                max_ulp_libm = max_ulp_libm.max(ulp_diff(y, libm::expf(x)));
                if rounded.is_normal() {
                    max_rel = max_rel.max(((y as f64 - truth) / truth).abs());
                }
            }
            std::println!(
                "exp {tier}: max {max_ulp} ulp vs correctly rounded, {max_ulp_libm} ulp vs \
                 libm::expf, max rel err {max_rel:.3e} (normal range)"
            );
            assert!(max_ulp <= 2, "{tier}: {max_ulp} ulp");
            assert!(max_ulp_libm <= 3, "{tier}: {max_ulp_libm} ulp vs libm");
            assert!(max_rel < 2.5e-7, "{tier}: rel {max_rel}");
        }
    }

    #[test]
    fn exp_nonpos_matches_exp_down_to_the_normal_range() {
        for tier in available() {
            struct Job<'a>(&'a mut [f32], bool);
            impl WithIsa for Job<'_> {
                type Output = ();
                #[inline(always)]
                fn run<I: Isa>(self, isa: I) {
                    for c in self.0.chunks_exact_mut(I::LANES) {
                        let x = isa.load_s(c);
                        let y = if self.1 {
                            exp_nonpos_v(isa, x)
                        } else {
                            exp_v(isa, x)
                        };
                        isa.store_s(c, y);
                    }
                }
            }
            let n = 1 << 16;
            let xs: std::vec::Vec<f32> = (0..n).map(|i| -87.3 * i as f32 / n as f32).collect();
            let (mut a, mut b) = (xs.clone(), xs);
            dispatch(tier, Job(&mut a, true));
            dispatch(tier, Job(&mut b, false));
            assert!(
                a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()),
                "{tier}"
            );
            // 16 values: a whole register on every tier (the job skips a partial one).
            let mut edges = [
                f32::NEG_INFINITY,
                -1e30,
                -200.0,
                -88.0,
                -0.0,
                0.0,
                -1.0,
                -2.0,
                -0.5,
                -0.125,
                -3.5,
                -5.25,
                -10.0,
                -20.0,
                -40.0,
                -80.0,
            ];
            let want = edges.map(libm::expf);
            dispatch(tier, Job(&mut edges, true));
            assert_eq!(&edges[..6], &[0.0, 0.0, 0.0, 0.0, 1.0, 1.0], "{tier}");
            for (g, w) in edges[6..].iter().zip(&want[6..]) {
                assert!(
                    (g - w).abs() <= 2.0 * f32::EPSILON * w,
                    "{tier}: {g} vs {w}"
                );
            }
        }
    }

    #[test]
    fn exp_edges() {
        for tier in available() {
            let mut v = [
                f32::NEG_INFINITY,
                -200.0,
                -104.0,
                0.0,
                100.0,
                f32::INFINITY,
                1.0,
            ];
            exp_inplace_on(tier, &mut v);
            assert_eq!(&v[..4], &[0.0, 0.0, 0.0, 1.0], "{tier}");
            assert!(v[4].is_finite() && v[4] > 3.0e38, "{tier}: {}", v[4]);
            assert!(v[5].is_finite() && v[5] > 3.0e38, "{tier}");
            assert!((v[6] - core::f32::consts::E).abs() <= 2.0 * f32::EPSILON * 3.0);
        }
        assert_eq!(exp_f32(0.0), 1.0);
        let mut empty: [f32; 0] = [];
        exp_inplace(&mut empty);
    }
}
