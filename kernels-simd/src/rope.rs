//! Rotary position embedding applied to one token's heads.

use crate::error::{need, ShapeError};
use crate::isa::{dispatch, Isa, WithIsa};
use crate::tier::{active, Tier};

/// Which dimensions form the rotated pairs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RopeStyle {
    /// Pairs `(z[2i], z[2i+1])` (the reference module's convention).
    Interleaved,
    /// Pairs `(z[i], z[i + D/2])` ("rotate half", many published checkpoints).
    HalfSplit,
}

/// Rotates every head of `z` (consecutive heads of `head_dim` values) by the angles whose cosines
/// and sines `cos_sin` holds as `D/2` pairs `(cos_i, sin_i)` (one position's row of the
/// `[max_pos, D/2, 2]` table):
/// `(a, b) <- (a cos_i - b sin_i, a sin_i + b cos_i)` for the `i`-th pair `(a, b)` of `style`.
///
/// # Errors
/// `head_dim` zero, odd, or not dividing `z.len()`, or `cos_sin` shorter than `head_dim`;
/// `z` is then untouched.
pub fn rope(
    z: &mut [f32],
    head_dim: usize,
    cos_sin: &[f32],
    style: RopeStyle,
) -> Result<(), ShapeError> {
    rope_on(active(), z, head_dim, cos_sin, style)
}

pub(crate) fn rope_on(
    tier: Tier,
    z: &mut [f32],
    head_dim: usize,
    cos_sin: &[f32],
    style: RopeStyle,
) -> Result<(), ShapeError> {
    if head_dim == 0 || !head_dim.is_multiple_of(2) || !z.len().is_multiple_of(head_dim) {
        return Err(ShapeError::Invalid {
            what: "rope: head_dim (must be even, > 0 and divide the slice length)",
            value: head_dim,
        });
    }
    need("rope: cos_sin", head_dim, cos_sin.len())?;
    struct Job<'a>(&'a mut [f32], usize, &'a [f32], RopeStyle);
    impl WithIsa for Job<'_> {
        type Output = ();
        /// Kernel `rope_f32`: plain loops that LLVM vectorises under the entry point's target
        /// features (the half-split form is contiguous; the interleaved one needs shuffles,
        /// cheap next to attention). No FMA contraction, so every tier rounds identically.
        #[inline(always)]
        fn run<I: Isa>(self, _isa: I) {
            let Job(z, d, cs, style) = self;
            let h = d / 2;
            let cs = &cs[..d];
            for head in z.chunks_exact_mut(d) {
                match style {
                    RopeStyle::Interleaved => {
                        for (p, c) in head.chunks_exact_mut(2).zip(cs.chunks_exact(2)) {
                            let (a, b, cos, sin) = (p[0], p[1], c[0], c[1]);
                            p[0] = a * cos - b * sin;
                            p[1] = a * sin + b * cos;
                        }
                    }
                    RopeStyle::HalfSplit => {
                        let (lo, hi) = head.split_at_mut(h);
                        for ((a, b), c) in lo.iter_mut().zip(hi.iter_mut()).zip(cs.chunks_exact(2))
                        {
                            let (x, y, cos, sin) = (*a, *b, c[0], c[1]);
                            *a = x * cos - y * sin;
                            *b = x * sin + y * cos;
                        }
                    }
                }
            }
        }
    }
    dispatch(tier, Job(z, head_dim, cos_sin, style));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{close, rand_vec};
    use crate::tier::available;

    #[test]
    fn rope_matches_reference() {
        for tier in available() {
            for &d in &[2usize, 18, 32, 64, 80, 96, 128, 256] {
                for heads in [1usize, 3] {
                    let z0 = rand_vec(d * heads, d as u64);
                    let pos = 37.0f64;
                    let mut cs = std::vec![0.0f32; d];
                    for i in 0..d / 2 {
                        let ang = pos * 10000f64.powf(-2.0 * i as f64 / d as f64);
                        cs[2 * i] = ang.cos() as f32;
                        cs[2 * i + 1] = ang.sin() as f32;
                    }
                    for style in [RopeStyle::Interleaved, RopeStyle::HalfSplit] {
                        let mut z = z0.clone();
                        rope_on(tier, &mut z, d, &cs, style).unwrap();
                        for hd in 0..heads {
                            for i in 0..d / 2 {
                                let (ia, ib) = match style {
                                    RopeStyle::Interleaved => (2 * i, 2 * i + 1),
                                    RopeStyle::HalfSplit => (i, i + d / 2),
                                };
                                let (a, b) = (z0[hd * d + ia] as f64, z0[hd * d + ib] as f64);
                                let (c, s) = (cs[2 * i] as f64, cs[2 * i + 1] as f64);
                                close(z[hd * d + ia] as f64, a * c - b * s, 1e-6, "rope a");
                                close(z[hd * d + ib] as f64, a * s + b * c, 1e-6, "rope b");
                            }
                        }
                    }
                }
            }
            let mut z = [1.0f32; 6];
            assert!(rope_on(tier, &mut z, 3, &[0.0; 3], RopeStyle::Interleaved).is_err());
            assert!(rope_on(tier, &mut z, 4, &[0.0; 4], RopeStyle::Interleaved).is_err());
            assert!(rope_on(tier, &mut z, 6, &[0.0; 4], RopeStyle::HalfSplit).is_err());
            assert_eq!(z, [1.0; 6]);
        }
    }
}
