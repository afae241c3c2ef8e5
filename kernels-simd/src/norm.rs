//! RMSNorm.

use crate::elem::Elem;
use crate::error::{need, ShapeError};
use crate::isa::{dispatch, Isa, WithIsa};
use crate::tier::{active, Tier};
use crate::vecops::dot_v;

/// RMSNorm in place over consecutive groups of `group` values, each with the same weight:
/// `z <- z * (1 / sqrt(mean(z^2) + eps)) * w`, in f32 whatever `E` is.
///
/// `group = z.len()` normalises the whole slice (full QK-norm over `H*D`); `group = D` normalises
/// each head of a row with one `[D]` weight (per-head QK-norm).
///
/// # Errors
/// `group == 0`, `z.len()` not a multiple of `group`, or `w` shorter than `group`; `z` is then
/// untouched.
pub fn rmsnorm<E: Elem>(z: &mut [f32], group: usize, w: &[E], eps: f32) -> Result<(), ShapeError> {
    rmsnorm_on(active(), z, group, w, eps)
}

pub(crate) fn rmsnorm_on<E: Elem>(
    tier: Tier,
    z: &mut [f32],
    group: usize,
    w: &[E],
    eps: f32,
) -> Result<(), ShapeError> {
    if group == 0 || !z.len().is_multiple_of(group) {
        return Err(ShapeError::Invalid {
            what: "rmsnorm: group (must be > 0 and divide the slice length)",
            value: group,
        });
    }
    need("rmsnorm: weight", group, w.len())?;
    dispatch(tier, Job { z, group, w, eps });
    Ok(())
}

struct Job<'a, E> {
    z: &'a mut [f32],
    group: usize,
    w: &'a [E],
    eps: f32,
}

impl<E: Elem> WithIsa for Job<'_, E> {
    type Output = ();

    /// Kernel `rmsnorm_f32_vec`: sum of squares by the 4-accumulator dot kernel, then
    /// `(z * inv) * w` per register, the weight widened through a 64-float stack buffer;
    /// scalar tail for the last `len % LANES` values.
    #[inline(always)]
    fn run<I: Isa>(self, isa: I) {
        let Job { z, group, w, eps } = self;
        let w = &w[..group];
        let l = I::LANES;
        for g in z.chunks_exact_mut(group) {
            let ss = dot_v(isa, g, g);
            let inv = 1.0 / libm::sqrtf(ss / group as f32 + eps);
            let vinv = isa.splat(inv);
            let mut wbuf = [0.0f32; 64];
            for (zc, wc) in g.chunks_mut(64).zip(w.chunks(64)) {
                E::to_f32_slice(wc, &mut wbuf);
                let mut i = 0;
                while i + l <= zc.len() {
                    let v = isa.mul(isa.mul(isa.load_s(&zc[i..]), vinv), isa.load_s(&wbuf[i..]));
                    isa.store_s(&mut zc[i..], v);
                    i += l;
                }
                for j in i..zc.len() {
                    zc[j] = zc[j] * inv * wbuf[j];
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{close, rand_elem, rand_vec};
    use crate::tier::available;
    use half::{bf16, f16};

    fn check<E: Elem>() {
        for tier in available() {
            for &(len, group) in &[(0, 5), (1, 1), (18, 18), (64, 32), (200, 200), (6 * 80, 80)] {
                let z0 = rand_vec(len, 3);
                let w = rand_elem::<E>(group, 4);
                let mut z = z0.clone();
                rmsnorm_on(tier, &mut z, group, &w, 1e-5).unwrap();
                for (gi, g) in z0.chunks(group).enumerate() {
                    let ms: f64 =
                        g.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / group as f64;
                    let inv = 1.0 / (ms + 1e-5f32 as f64).sqrt();
                    for (i, &v) in g.iter().enumerate() {
                        let want = v as f64 * inv * w[i].to_f32() as f64;
                        close(z[gi * group + i] as f64, want, 2e-6, E::NAME);
                    }
                }
            }
            let mut z = [1.0f32; 6];
            assert!(rmsnorm_on(tier, &mut z, 4, &rand_elem::<E>(4, 1), 1e-5).is_err());
            assert!(rmsnorm_on(tier, &mut z, 3, &rand_elem::<E>(2, 1), 1e-5).is_err());
            assert!(rmsnorm_on(tier, &mut z, 0, &rand_elem::<E>(2, 1), 1e-5).is_err());
            assert_eq!(z, [1.0; 6]);
        }
    }

    #[test]
    fn rmsnorm_matches_reference() {
        check::<f32>();
        check::<f16>();
        check::<bf16>();
    }
}
