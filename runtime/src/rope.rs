//! Rotary position embedding: the cos/sin table (caller-given or built from theta with the
//! llama3 or yarn scalings) and its application in both pairing conventions (SPEC.md step 5).

use core::f64::consts::PI;

use crate::config::{Rope, RopeConvention, RopeScaling};
use crate::error::{Error, Result};

/// A borrowed cos/sin table of shape `[max_pos, head_dim / 2, 2]`, last axis (cos, sin), as the
/// reference's `freqs_cis` in its real view.
#[derive(Clone, Copy, Debug)]
pub struct RopeTable<'a> {
    data: &'a [f32],
    half_dim: usize,
}

impl<'a> RopeTable<'a> {
    /// Wraps a caller's table for heads of width `head_dim`.
    ///
    /// # Errors
    /// [`Error::InputShape`] if `data` is not a whole number of `[head_dim / 2, 2]` rows, or
    /// `head_dim` is odd or 0.
    pub fn new(data: &'a [f32], head_dim: usize) -> Result<RopeTable<'a>> {
        let row = head_dim;
        if head_dim == 0 || !head_dim.is_multiple_of(2) || !data.len().is_multiple_of(row) {
            return Err(Error::InputShape {
                name: "freqs_cis",
                expected: (data.len() / row.max(1)) * row,
                actual: data.len(),
            });
        }
        Ok(RopeTable {
            data,
            half_dim: head_dim / 2,
        })
    }

    /// Positions the table covers.
    pub fn max_pos(&self) -> usize {
        self.data.len() / (2 * self.half_dim)
    }

    /// Pairs per position (`head_dim / 2`).
    pub fn half_dim(&self) -> usize {
        self.half_dim
    }

    /// The `[head_dim / 2, 2]` row of `pos`, or `None` at or past the end.
    pub fn row(&self, pos: usize) -> Option<&'a [f32]> {
        let w = 2 * self.half_dim;
        self.data
            .get(pos.checked_mul(w)?..pos.checked_mul(w)?.checked_add(w)?)
    }
}

/// f32 elements of a table of `max_pos` positions for heads of width `head_dim`.
pub const fn table_len(max_pos: usize, head_dim: usize) -> usize {
    max_pos.saturating_mul(head_dim)
}

/// The inverse frequency of pair `i` of `half_dim`, scaled as the configuration says.
///
/// Evaluated in f64 so that the table carries f32 rounding only once, at the store.
pub fn inv_freq(rope: &Rope, head_dim: usize, i: usize) -> f64 {
    let d = head_dim as f64;
    let base = libm::pow(rope.theta, -(2.0 * i as f64) / d);
    match rope.scaling {
        RopeScaling::None => base,
        RopeScaling::Llama3 {
            factor,
            low_freq_factor: low,
            high_freq_factor: high,
            original_max_position_embeddings: orig,
        } => {
            let orig = orig as f64;
            let wavelen = 2.0 * PI / base;
            if wavelen > orig / low {
                base / factor
            } else if wavelen < orig / high {
                base
            } else {
                // Blend between the scaled and the kept frequency, continuous at both ends:
                // s = 0 at wavelength orig/low (fully scaled), s = 1 at orig/high (kept).
                let s = (orig / wavelen - low) / (high - low);
                (1.0 - s) * base / factor + s * base
            }
        }
        RopeScaling::Yarn {
            factor,
            original_max_position_embeddings,
            beta_fast,
            beta_slow,
            ..
        } => {
            let (lo, hi) = yarn_correction_range(
                rope.theta,
                d,
                original_max_position_embeddings,
                beta_fast,
                beta_slow,
            );
            let ramp = {
                let hi = if lo == hi { hi + 0.001 } else { hi };
                ((i as f64 - lo) / (hi - lo)).clamp(0.0, 1.0)
            };
            // Below the ramp (high frequencies) keep `base`; above it interpolate by `factor`.
            let extrapolation = 1.0 - ramp;
            base / factor * (1.0 - extrapolation) + base * extrapolation
        }
    }
}

/// The yarn correction dims of `beta_fast` and `beta_slow`: floor and ceil, clamped to
/// `[0, D - 1]`.
fn yarn_correction_range(
    theta: f64,
    d: f64,
    orig: u32,
    beta_fast: f64,
    beta_slow: f64,
) -> (f64, f64) {
    let dim = |rot: f64| d * libm::log(orig as f64 / (rot * 2.0 * PI)) / (2.0 * libm::log(theta));
    let lo = libm::floor(dim(beta_fast)).max(0.0);
    let hi = libm::ceil(dim(beta_slow)).min(d - 1.0);
    (lo, hi)
}

/// The factor multiplying cos and sin (yarn's `attention_factor`, else 1).
fn amplitude(rope: &Rope) -> f64 {
    match rope.scaling {
        RopeScaling::Yarn {
            attention_factor, ..
        } => attention_factor,
        _ => 1.0,
    }
}

/// Fills `out` (`[max_pos, head_dim / 2, 2]`, `max_pos = out.len() / head_dim`) with the cos/sin
/// table of `rope`; view it with [`RopeTable::new`].
///
/// # Errors
/// As [`RopeTable::new`].
pub fn build_table(rope: &Rope, head_dim: usize, out: &mut [f32]) -> Result<()> {
    RopeTable::new(out, head_dim)?;
    for (pos, row) in out.chunks_exact_mut(head_dim).enumerate() {
        fill_row(rope, head_dim, pos as u64, row);
    }
    Ok(())
}

/// Fills one `[head_dim / 2, 2]` row of the table: `(cos, sin)` of `pos * inv_freq(i)`, scaled
/// by yarn's attention factor, evaluated in f64 and rounded to f32 once. Every table the
/// runtime builds comes from here, so tables built whole or row by row agree bitwise.
pub fn fill_row(rope: &Rope, head_dim: usize, pos: u64, row: &mut [f32]) {
    let amp = amplitude(rope);
    for (i, pair) in row.chunks_exact_mut(2).take(head_dim / 2).enumerate() {
        let angle = pos as f64 * inv_freq(rope, head_dim, i);
        pair[0] = (libm::cos(angle) * amp) as f32;
        pair[1] = (libm::sin(angle) * amp) as f32;
    }
}

/// Rotates one head's values `z` (length `2 * cs.len() / 2`) by the `(cos, sin)` pairs of `cs`.
pub fn apply(convention: RopeConvention, z: &mut [f32], cs: &[f32]) {
    let half = cs.len() / 2;
    for i in 0..half {
        let (c, s) = (cs[2 * i], cs[2 * i + 1]);
        let (a, b) = match convention {
            RopeConvention::Interleaved => (2 * i, 2 * i + 1),
            RopeConvention::HalfSplit => (i, i + half),
        };
        let (x, y) = (z[a], z[b]);
        z[a] = x * c - y * s;
        z[b] = x * s + y * c;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_frequencies_follow_theta() {
        let rope = Rope::DEFAULT;
        assert_eq!(inv_freq(&rope, 8, 0), 1.0);
        assert!((inv_freq(&rope, 8, 2) - 10000f64.powf(-0.5)).abs() < 1e-15);
    }

    #[test]
    fn llama3_is_continuous_and_scales_long_wavelengths() {
        let rope = Rope {
            theta: 500000.0,
            scaling: RopeScaling::Llama3 {
                factor: 8.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 8192,
            },
            ..Rope::DEFAULT
        };
        let plain = Rope {
            scaling: RopeScaling::None,
            ..rope
        };
        // Highest frequency kept, lowest divided by the factor.
        assert_eq!(inv_freq(&rope, 128, 0), inv_freq(&plain, 128, 0));
        let last = 63;
        assert!((inv_freq(&rope, 128, last) * 8.0 - inv_freq(&plain, 128, last)).abs() < 1e-18);
        // The ratio to the plain frequency never increases along the pairs.
        let mut prev = 1.0;
        for i in 0..64 {
            let r = inv_freq(&rope, 128, i) / inv_freq(&plain, 128, i);
            assert!(r <= prev + 1e-12 && r >= 1.0 / 8.0 - 1e-12, "pair {i}: {r}");
            prev = r;
        }
    }

    #[test]
    fn table_rejects_odd_head_dim() {
        let mut buf = [0.0f32; 12];
        assert!(build_table(&Rope::DEFAULT, 3, &mut buf).is_err());
        build_table(&Rope::DEFAULT, 4, &mut buf).unwrap();
        let t = RopeTable::new(&buf, 4).unwrap();
        assert_eq!(t.max_pos(), 3);
        assert!(t.row(3).is_none());
        assert_eq!(t.row(0).unwrap(), &[1.0, 0.0, 1.0, 0.0]);
    }

    #[test]
    fn conventions_pair_differently() {
        let cs = [0.0, 1.0, 1.0, 0.0]; // pair 0 by +90 degrees, pair 1 unchanged
        let mut a = [1.0, 2.0, 3.0, 4.0];
        apply(RopeConvention::Interleaved, &mut a, &cs);
        assert_eq!(a, [-2.0, 1.0, 3.0, 4.0]);
        let mut b = [1.0, 2.0, 3.0, 4.0];
        apply(RopeConvention::HalfSplit, &mut b, &cs);
        assert_eq!(b, [-3.0, 2.0, 1.0, 4.0]);
    }
}
