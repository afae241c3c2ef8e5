//! Level-1 vector kernels: dot, axpy, scale.

use crate::error::{need, ShapeError};
use crate::isa::{dispatch, Isa, WithIsa};
use crate::tier::{active, Tier};

/// Kernel `dot_f32_4v`: `sum_i a[i] b[i]`.
///
/// Four independent vector accumulators (hides FMA latency) over `4*LANES`-element blocks, then
/// single vectors, combined in a fixed order, then a scalar tail; the order depends only on the
/// length, so results are reproducible.
#[inline(always)]
pub(crate) fn dot_v<I: Isa>(isa: I, a: &[f32], b: &[f32]) -> f32 {
    let l = I::LANES;
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [isa.zero(); 4];
    let mut i = 0;
    while i + 4 * l <= n {
        for (t, acc) in acc.iter_mut().enumerate() {
            let o = i + t * l;
            *acc = isa.mul_add(isa.load_s(&a[o..]), isa.load_s(&b[o..]), *acc);
        }
        i += 4 * l;
    }
    while i + l <= n {
        acc[0] = isa.mul_add(isa.load_s(&a[i..]), isa.load_s(&b[i..]), acc[0]);
        i += l;
    }
    let v = isa.add(isa.add(acc[0], acc[1]), isa.add(acc[2], acc[3]));
    let mut s = isa.reduce_sum(v);
    for j in i..n {
        s += a[j] * b[j];
    }
    s
}

/// `sum_i a[i] * b[i]` with f32 accumulation, on the [`active`] tier.
///
/// # Errors
/// [`ShapeError::TooShort`] if the lengths differ (naming the shorter slice).
pub fn dot(a: &[f32], b: &[f32]) -> Result<f32, ShapeError> {
    dot_on(active(), a, b)
}

pub(crate) fn dot_on(tier: Tier, a: &[f32], b: &[f32]) -> Result<f32, ShapeError> {
    need("dot: b", a.len(), b.len())?;
    need("dot: a", b.len(), a.len())?;
    struct Job<'a>(&'a [f32], &'a [f32]);
    impl WithIsa for Job<'_> {
        type Output = f32;
        #[inline(always)]
        fn run<I: Isa>(self, isa: I) -> f32 {
            dot_v(isa, self.0, self.1)
        }
    }
    Ok(dispatch(tier, Job(a, b)))
}

/// `y[i] += alpha * x[i]` (fused multiply-add on tiers that have it), on the [`active`] tier.
///
/// # Errors
/// [`ShapeError::TooShort`] if the lengths differ; `y` is then untouched.
pub fn axpy(alpha: f32, x: &[f32], y: &mut [f32]) -> Result<(), ShapeError> {
    axpy_on(active(), alpha, x, y)
}

pub(crate) fn axpy_on(tier: Tier, alpha: f32, x: &[f32], y: &mut [f32]) -> Result<(), ShapeError> {
    need("axpy: y", x.len(), y.len())?;
    need("axpy: x", y.len(), x.len())?;
    struct Job<'a>(f32, &'a [f32], &'a mut [f32]);
    impl WithIsa for Job<'_> {
        type Output = ();
        #[inline(always)]
        fn run<I: Isa>(self, isa: I) {
            let Job(alpha, x, y) = self;
            let a = isa.splat(alpha);
            let l = I::LANES;
            let mut i = 0;
            while i + l <= y.len() {
                let v = isa.mul_add(a, isa.load_s(&x[i..]), isa.load_s(&y[i..]));
                isa.store_s(&mut y[i..], v);
                i += l;
            }
            for j in i..y.len() {
                y[j] += alpha * x[j];
            }
        }
    }
    dispatch(tier, Job(alpha, x, y));
    Ok(())
}

/// `x[i] *= alpha`, on the [`active`] tier.
pub fn scale(x: &mut [f32], alpha: f32) {
    scale_on(active(), x, alpha)
}

pub(crate) fn scale_on(tier: Tier, x: &mut [f32], alpha: f32) {
    struct Job<'a>(&'a mut [f32], f32);
    impl WithIsa for Job<'_> {
        type Output = ();
        #[inline(always)]
        fn run<I: Isa>(self, isa: I) {
            let Job(x, alpha) = self;
            let a = isa.splat(alpha);
            let mut chunks = x.chunks_exact_mut(I::LANES);
            for c in &mut chunks {
                let v = isa.mul(isa.load_s(c), a);
                isa.store_s(c, v);
            }
            for v in chunks.into_remainder() {
                *v *= alpha;
            }
        }
    }
    dispatch(tier, Job(x, alpha))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{close, rand_vec, EDGE_LENS};
    use crate::tier::available;

    #[test]
    fn dot_axpy_scale_match_reference() {
        for tier in available() {
            for &n in EDGE_LENS {
                let a = rand_vec(n, 1);
                let b = rand_vec(n, 2);
                let want: f64 = a.iter().zip(&b).map(|(&x, &y)| x as f64 * y as f64).sum();
                let abs: f64 = a
                    .iter()
                    .zip(&b)
                    .map(|(&x, &y)| (x as f64 * y as f64).abs())
                    .sum();
                let got = dot_on(tier, &a, &b).unwrap() as f64;
                assert!(
                    (got - want).abs() <= 1e-6 * abs + 1e-7,
                    "{tier} dot n={n}: {got} vs {want}"
                );

                let mut y = b.clone();
                axpy_on(tier, 0.75, &a, &mut y).unwrap();
                for i in 0..n {
                    close(y[i] as f64, b[i] as f64 + 0.75 * a[i] as f64, 1e-6, "axpy");
                }
                let mut x = a.clone();
                scale_on(tier, &mut x, -1.5);
                for i in 0..n {
                    assert_eq!(x[i], a[i] * -1.5);
                }
            }
            assert!(dot_on(tier, &[1.0], &[]).is_err());
            let mut y = [1.0f32];
            assert!(axpy_on(tier, 1.0, &[1.0, 2.0], &mut y).is_err());
            assert_eq!(y, [1.0]);
        }
    }
}
