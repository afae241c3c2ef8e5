//! Storage element types for weights and K/V: f32, f16, bf16. Arithmetic is always f32.

use half::{bf16, f16};

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for half::f16 {}
    impl Sealed for half::bf16 {}
}

/// A storage type the kernels read and widen to f32. Sealed: the kernels' packing code relies on
/// the widening being exact, which holds for exactly these three types.
pub trait Elem: sealed::Sealed + Copy + Send + Sync + 'static {
    /// Short name, e.g. for error messages and test output.
    const NAME: &'static str;

    /// Widens one value (exact).
    fn to_f32(self) -> f32;

    /// Rounds an f32 to this type (nearest-even); the identity for f32.
    fn from_f32(x: f32) -> Self;

    /// Widens `src[..n]` into `dst[..n]` with `n = min(src.len(), dst.len())`; returns `n`.
    #[inline]
    fn to_f32_slice(src: &[Self], dst: &mut [f32]) -> usize {
        let n = src.len().min(dst.len());
        for (d, s) in dst[..n].iter_mut().zip(&src[..n]) {
            *d = s.to_f32();
        }
        n
    }

    /// `s` itself if this type is f32 (kernels then read it in place instead of widening).
    #[inline(always)]
    fn as_f32(s: &[Self]) -> Option<&[f32]> {
        let _ = s;
        None
    }
}

impl Elem for f32 {
    const NAME: &'static str = "f32";
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        x
    }
    #[inline]
    fn to_f32_slice(src: &[Self], dst: &mut [f32]) -> usize {
        let n = src.len().min(dst.len());
        dst[..n].copy_from_slice(&src[..n]);
        n
    }
    #[inline(always)]
    fn as_f32(s: &[Self]) -> Option<&[f32]> {
        Some(s)
    }
}

impl Elem for f16 {
    const NAME: &'static str = "f16";
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        f16::from_f32(x)
    }
}

impl Elem for bf16 {
    const NAME: &'static str = "bf16";
    #[inline(always)]
    fn to_f32(self) -> f32 {
        // bf16 is the top half of an f32: a shift is exact and cheaper than the library call.
        f32::from_bits((self.to_bits() as u32) << 16)
    }
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        bf16::from_f32(x)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn widening_is_exact_and_bulk_matches_single() {
        let xs = [
            0.0f32,
            -0.0,
            1.0,
            -2.5,
            65504.0,
            1e-7,
            1.2345678,
            f32::INFINITY,
        ];
        for &x in &xs {
            assert_eq!(bf16::from_f32(x).to_f32(), half::bf16::from_f32(x).to_f32());
            assert_eq!(
                <bf16 as Elem>::to_f32(bf16::from_f32(x)),
                bf16::from_f32(x).to_f32()
            );
            assert_eq!(
                <f16 as Elem>::to_f32(f16::from_f32(x)),
                f16::from_f32(x).to_f32()
            );
        }
        let src: std::vec::Vec<f16> = xs.iter().map(|&x| f16::from_f32(x)).collect();
        let mut dst = [9.0f32; 5];
        assert_eq!(f16::to_f32_slice(&src, &mut dst), 5);
        for i in 0..5 {
            assert_eq!(dst[i], src[i].to_f32());
        }
    }
}
