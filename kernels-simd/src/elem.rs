//! Storage element types for weights and K/V: f32, f16, bf16. Arithmetic is always f32.

use crate::isa::Isa;
use core::any::TypeId;
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

/// Widens binary16 bits to binary32 without branches, so that loops over slices vectorise.
///
/// The exponent and mantissa move to their f32 places (`<< 13`) and the exponent bias is raised
/// by 127 - 15. Two cases differ: an all-ones exponent (infinity, NaN) must become all-ones
/// again (add the bias once more), and a zero exponent (zero, subnormal) is renormalised by
/// computing `m * 2^-24` in f32 arithmetic: give it exponent 1 (i.e. 2^-14 as a float with the
/// mantissa bits) and subtract 2^-14. Both are exact.
#[inline(always)]
pub(crate) fn f16_bits_to_f32(h: u16) -> f32 {
    let h = h as u32;
    let sign = (h & 0x8000) << 16;
    let body = (h & 0x7fff) << 13;
    let exp = body & 0x0f80_0000;
    let normal = body + 0x3800_0000;
    let inf_nan = normal + 0x3800_0000;
    // Subnormal: exponent field forced to 2^-14's, then minus 2^-14.
    let sub = f32::from_bits(body + 0x3880_0000) - f32::from_bits(0x3880_0000);
    let bits = if exp == 0x0f80_0000 {
        inf_nan
    } else if exp == 0 {
        sub.to_bits()
    } else {
        normal
    };
    f32::from_bits(bits | sign)
}

impl Elem for f16 {
    const NAME: &'static str = "f16";
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f16_bits_to_f32(self.to_bits())
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

/// Loads `LANES` elements at `p` widened to f32 (exact).
///
/// # Safety
/// `p` must be valid for reading `LANES` elements.
#[inline(always)]
pub(crate) unsafe fn load_widened<I: Isa, E: Elem>(isa: I, p: *const E) -> I::V {
    let id = TypeId::of::<E>();
    // SAFETY (all branches): the type test makes the pointer cast an identity (f32) or a
    // reinterpretation of 16-bit floats as their bits (f16 and bf16 are `repr(transparent)`
    // over u16); `p` is valid for LANES elements by the caller's contract.
    unsafe {
        if id == TypeId::of::<f16>() {
            isa.load_f16(p.cast())
        } else if id == TypeId::of::<bf16>() {
            isa.load_bf16(p.cast())
        } else if id == TypeId::of::<f32>() {
            isa.load(p.cast())
        } else {
            let mut t = [0.0f32; 16];
            for (i, t) in t[..I::LANES].iter_mut().enumerate() {
                *t = p.add(i).read_unaligned().to_f32();
            }
            isa.load_s(&t)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f16_widening_is_exact_for_every_value() {
        for bits in 0..=u16::MAX {
            let h = f16::from_bits(bits);
            let (got, want) = (<f16 as Elem>::to_f32(h), h.to_f32());
            if want.is_nan() {
                assert!(got.is_nan(), "{bits:#06x}");
                assert_eq!(got.to_bits() & 0x8000_0000, want.to_bits() & 0x8000_0000);
            } else {
                assert_eq!(got.to_bits(), want.to_bits(), "{bits:#06x}");
            }
        }
    }

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
