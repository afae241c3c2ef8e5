//! The vector abstraction every kernel is written against, and the one place that turns a
//! [`Tier`] into a call of `#[target_feature]` code.
//!
//! Each ISA module defines a zero-sized token type that can only be constructed after
//! [`crate::tier`] detection found the ISA, implements [`Isa`] for it with intrinsics, and
//! provides an `entry` function: a `#[target_feature]` function that runs a [`WithIsa`] job with
//! the token. Kernels are generic `#[inline(always)]` functions over `I: Isa`, so they are
//! compiled (and inlined) with the ISA's features enabled inside that entry point.

use crate::tier::Tier;

pub(crate) mod scalar;

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2;
#[cfg(target_arch = "x86_64")]
pub(crate) mod avx512;
#[cfg(target_arch = "aarch64")]
pub(crate) mod neon;

/// A SIMD instruction set seen as "a vector of `LANES` f32", plus its per-ISA kernel tiles.
///
/// A value of a type implementing `Isa` proves the CPU supports it, which is what makes the safe
/// methods sound.
pub(crate) trait Isa: Copy {
    /// One register of f32 lanes.
    type V: Copy;
    /// Lanes per register.
    const LANES: usize;
    /// Output columns of the GEMM micro-kernel tile (a multiple of `LANES`, at most
    /// [`crate::GEMM_NR_MAX`]).
    const GEMM_NR: usize;
    /// Whether an FMA takes a scalar broadcast from memory as an operand without a register
    /// of its own (AVX-512's embedded broadcast; trivially the scalar tier): the decode's PV
    /// loop then broadcasts each probability straight from the scores instead of from a
    /// scratch of filled registers (`partial.rs`).
    const BROADCAST_OPERAND: bool;

    /// Every lane set to `x`.
    fn splat(self, x: f32) -> Self::V;
    /// Loads `LANES` floats.
    ///
    /// # Safety
    /// `p` must be valid for reading `LANES` f32 (no alignment needed).
    unsafe fn load(self, p: *const f32) -> Self::V;
    /// Stores `LANES` floats.
    ///
    /// # Safety
    /// `p` must be valid for writing `LANES` f32 (no alignment needed).
    unsafe fn store(self, p: *mut f32, v: Self::V);
    /// Lane-wise `a + b`.
    fn add(self, a: Self::V, b: Self::V) -> Self::V;
    /// Lane-wise `a - b`.
    fn sub(self, a: Self::V, b: Self::V) -> Self::V;
    /// Lane-wise `a * b`.
    fn mul(self, a: Self::V, b: Self::V) -> Self::V;
    /// Lane-wise `a * b + c`, fused where the ISA has FMA.
    fn mul_add(self, a: Self::V, b: Self::V, c: Self::V) -> Self::V;
    /// Lane-wise minimum (inputs are never NaN in our kernels).
    fn min(self, a: Self::V, b: Self::V) -> Self::V;
    /// Lane-wise maximum (inputs are never NaN in our kernels).
    fn max(self, a: Self::V, b: Self::V) -> Self::V;
    /// Sum of the lanes, in a fixed order.
    fn reduce_sum(self, v: Self::V) -> f32;
    /// Largest lane (no lane is NaN in our kernels, so the order does not matter). ISAs with
    /// a shuffle tree or a horizontal max override the default, a chain of scalar maxima.
    #[inline(always)]
    fn reduce_max(self, v: Self::V) -> f32 {
        let mut t = [f32::NEG_INFINITY; 16];
        self.store_s(&mut t, v);
        t[..Self::LANES]
            .iter()
            .fold(f32::NEG_INFINITY, |a, &b| a.max(b))
    }
    /// `2^n` per lane, for integer-valued lanes `n` in `[-126, 127]`.
    fn pow2i(self, n: Self::V) -> Self::V;

    /// Runs the GEMM panel job with this ISA's register tile (see `gemm::kernel`).
    fn gemm_panel(self, job: &mut crate::gemm::kernel::PanelJob<'_>);

    /// Runs the attention tile loop with this ISA's register blocks (see `attend::kernel`).
    fn attend_tiles<E: crate::Elem, M: crate::Visibility + ?Sized>(
        self,
        args: crate::attend::kernel::Args<'_, E, M>,
    );

    /// Side of the square blocks [`Isa::transpose_block`] moves in registers; 0 where the ISA
    /// has none (then [`Isa::transpose`] copies element by element).
    const TRANSPOSE_BLOCK: usize = 0;

    /// Transposes one `TRANSPOSE_BLOCK`-square block: `dst[c * dst_stride + i] =
    /// src[i * src_stride + c]` for `i, c < TRANSPOSE_BLOCK`. Only called when
    /// [`Isa::TRANSPOSE_BLOCK`] is not 0; the default is never used.
    ///
    /// # Safety
    /// Every element of the block must be readable at `src` and writable at `dst`.
    #[inline(always)]
    unsafe fn transpose_block(
        self,
        src: *const f32,
        src_stride: usize,
        dst: *mut f32,
        dst_stride: usize,
    ) {
        let _ = (src, src_stride, dst, dst_stride);
        unreachable!("transpose_block without TRANSPOSE_BLOCK")
    }

    /// Rows (and pairs of reduction steps) of the bf16 tile [`Isa::bf16_pairs`] loads; 0 where
    /// the ISA has none (the one-token GEMM then packs panels as for more tokens).
    const BF16_PAIRS: usize = 0;

    /// Loads 32 bf16 of each of 16 rows (row `i` at `p + i * stride`) and transposes their
    /// 32-bit pairs: lane `i` of register `c` holds elements `2c` (low half) and `2c + 1` (high
    /// half) of row `i`, as bits, which [`Isa::bf16_even`] and [`Isa::bf16_odd`] widen. Only
    /// called when [`Isa::BF16_PAIRS`] is 16; the default is never used.
    ///
    /// # Safety
    /// Each row's 32 elements must be readable.
    #[inline(always)]
    unsafe fn bf16_pairs(self, p: *const u16, stride: usize) -> [Self::V; 16] {
        let _ = (p, stride);
        unreachable!("bf16_pairs without BF16_PAIRS")
    }

    /// The first element of each lane's pair of [`Isa::bf16_pairs`], widened (exact).
    #[inline(always)]
    fn bf16_even(self, v: Self::V) -> Self::V {
        let _ = v;
        unreachable!("bf16_even without BF16_PAIRS")
    }

    /// The second element of each lane's pair of [`Isa::bf16_pairs`], widened (exact).
    #[inline(always)]
    fn bf16_odd(self, v: Self::V) -> Self::V {
        let _ = v;
        unreachable!("bf16_odd without BF16_PAIRS")
    }

    /// [`Isa::bf16_even`] for pairs of f16 bits (the tile moves bits, whatever their type).
    #[inline(always)]
    fn f16_even(self, v: Self::V) -> Self::V {
        let _ = v;
        unreachable!("f16_even without BF16_PAIRS")
    }

    /// [`Isa::bf16_odd`] for pairs of f16 bits.
    #[inline(always)]
    fn f16_odd(self, v: Self::V) -> Self::V {
        let _ = v;
        unreachable!("f16_odd without BF16_PAIRS")
    }

    /// `dst[c * dst_stride + i] = src[i * src_stride + c]` for `i < rows`, `c < cols` (a plain
    /// copy, so exact): whole blocks through [`Isa::transpose_block`] where the ISA has one, the
    /// ragged edges (and everything on other ISAs) element by element.
    ///
    /// # Panics
    /// If `src` or `dst` is too short for the shape (an internal bug).
    #[inline(always)]
    fn transpose(
        self,
        src: &[f32],
        src_stride: usize,
        rows: usize,
        cols: usize,
        dst: &mut [f32],
        dst_stride: usize,
    ) {
        if rows == 0 || cols == 0 {
            return;
        }
        assert!((rows - 1) * src_stride + cols <= src.len());
        assert!((cols - 1) * dst_stride + rows <= dst.len());
        let b = Self::TRANSPOSE_BLOCK;
        let mut i0 = 0;
        if b > 0 {
            let (sp, dp) = (src.as_ptr(), dst.as_mut_ptr());
            while i0 + b <= rows {
                let mut c0 = 0;
                while c0 + b <= cols {
                    // SAFETY: rows i0..i0 + b <= rows and columns c0..c0 + b <= cols, so every
                    // read is inside src and every write inside dst (asserted above).
                    unsafe {
                        self.transpose_block(
                            sp.add(i0 * src_stride + c0),
                            src_stride,
                            dp.add(c0 * dst_stride + i0),
                            dst_stride,
                        )
                    };
                    c0 += b;
                }
                for c in c0..cols {
                    for i in i0..i0 + b {
                        dst[c * dst_stride + i] = src[i * src_stride + c];
                    }
                }
                i0 += b;
            }
        }
        for i in i0..rows {
            let row = &src[i * src_stride..][..cols];
            for (d, &x) in dst[i..].iter_mut().step_by(dst_stride).zip(row) {
                *d = x;
            }
        }
    }

    /// Loads `LANES` IEEE binary16 values (given as bits) widened to f32 (exact). The default
    /// converts lane by lane with the branch-free bit code of [`crate::elem`].
    ///
    /// # Safety
    /// `p` must be valid for reading `LANES` u16 (no alignment needed).
    #[inline(always)]
    unsafe fn load_f16(self, p: *const u16) -> Self::V {
        let mut t = [0.0f32; 16];
        for (i, t) in t[..Self::LANES].iter_mut().enumerate() {
            // SAFETY: i < LANES, and `p` is valid for LANES reads by the caller's contract.
            *t = crate::elem::f16_bits_to_f32(unsafe { p.add(i).read_unaligned() });
        }
        self.load_s(&t)
    }

    /// Loads `LANES` bfloat16 values (given as bits) widened to f32 (exact: a shift).
    ///
    /// # Safety
    /// `p` must be valid for reading `LANES` u16 (no alignment needed).
    #[inline(always)]
    unsafe fn load_bf16(self, p: *const u16) -> Self::V {
        let mut t = [0.0f32; 16];
        for (i, t) in t[..Self::LANES].iter_mut().enumerate() {
            // SAFETY: i < LANES, and `p` is valid for LANES reads by the caller's contract.
            *t = f32::from_bits((unsafe { p.add(i).read_unaligned() } as u32) << 16);
        }
        self.load_s(&t)
    }

    /// Hints that the cache line holding `p` will be read soon. Never faults, whatever `p`
    /// points to (so it is safe); the default does nothing.
    #[inline(always)]
    fn prefetch(self, p: *const u8) {
        let _ = p;
    }

    /// The lane sums of four registers, `[reduce(v[0]), .., reduce(v[3])]`, each in one fixed
    /// order per ISA (which may differ from [`Isa::reduce_sum`]'s); a lane's result depends only
    /// on its own register. ISAs with horizontal adds override the per-register default.
    #[inline(always)]
    fn reduce_sum4(self, v: [Self::V; 4]) -> [f32; 4] {
        v.map(|x| self.reduce_sum(x))
    }

    /// [`Isa::reduce_sum4`] of `a`, then of `b`, as one array: each of the eight sums has
    /// exactly the bits `reduce_sum4` gives it. ISAs that can fold two groups' last step into
    /// one instruction override the default (two calls).
    #[inline(always)]
    fn reduce_sum4x2(self, a: [Self::V; 4], b: [Self::V; 4]) -> [f32; 8] {
        let (x, y) = (self.reduce_sum4(a), self.reduce_sum4(b));
        [x[0], x[1], x[2], x[3], y[0], y[1], y[2], y[3]]
    }

    /// Whether [`Isa::fold_keys4`] and [`Isa::finish_keys16`] are implemented (AVX-512 only):
    /// the decode then reduces the scores of a sub-block of 16 keys as one transposed tree,
    /// with each key's sum in `reduce_sum4`'s order, instead of one `reduce_sum4` per key.
    const KEY_FOLD: bool = false;

    /// The first two levels of [`Isa::reduce_sum4`]'s tree for four registers (one key's lane
    /// products each), all in one register: its quarter `k` holds the four partial sums
    /// `reduce_sum4` keeps of `v[k]` before its in-lane steps. Only called when
    /// [`Isa::KEY_FOLD`] is true; the default is never used.
    #[inline(always)]
    fn fold_keys4(self, v: [Self::V; 4]) -> Self::V {
        let _ = v;
        unreachable!("fold_keys4 without KEY_FOLD")
    }

    /// The next level for two [`Isa::fold_keys4`] results (keys `0..4` in `a`, `4..8` in `b`):
    /// one register of the two partial sums per key that `reduce_sum4` keeps before its last
    /// addition. Only called when [`Isa::KEY_FOLD`] is true; the default is never used.
    #[inline(always)]
    fn fold_keys8(self, a: Self::V, b: Self::V) -> Self::V {
        let _ = (a, b);
        unreachable!("fold_keys8 without KEY_FOLD")
    }

    /// Finishes two [`Isa::fold_keys8`] results (keys `0..8` in `a`, `8..16` in `b`): lane `k`
    /// of the result is the sum of key `k`, with the bits `reduce_sum4` gives it. Only called
    /// when [`Isa::KEY_FOLD`] is true; the default is never used.
    #[inline(always)]
    fn finish_keys16(self, a: Self::V, b: Self::V) -> Self::V {
        let _ = (a, b);
        unreachable!("finish_keys16 without KEY_FOLD")
    }

    /// Zero in every lane.
    #[inline(always)]
    fn zero(self) -> Self::V {
        self.splat(0.0)
    }

    /// Loads `LANES` floats from the start of `s`.
    ///
    /// # Panics
    /// If `s` is shorter than `LANES` (an internal bug: kernels validate lengths first).
    #[inline(always)]
    fn load_s(self, s: &[f32]) -> Self::V {
        let s = &s[..Self::LANES];
        // SAFETY: the slice above holds exactly LANES readable floats.
        unsafe { self.load(s.as_ptr()) }
    }

    /// Stores `LANES` floats at the start of `s`.
    ///
    /// # Panics
    /// If `s` is shorter than `LANES` (an internal bug: kernels validate lengths first).
    #[inline(always)]
    fn store_s(self, s: &mut [f32], v: Self::V) {
        let s = &mut s[..Self::LANES];
        // SAFETY: the slice above holds exactly LANES writable floats.
        unsafe { self.store(s.as_mut_ptr(), v) }
    }
}

/// A job that can run on any [`Isa`]; [`dispatch`] picks which.
pub(crate) trait WithIsa {
    /// What the job returns.
    type Output;
    /// Runs the job; implementations are `#[inline(always)]` so they compile with the
    /// features of the entry point that calls them.
    fn run<I: Isa>(self, isa: I) -> Self::Output;
}

/// Runs `op` on tier `tier`, or on the scalar tier if this CPU cannot run `tier` (callers pass
/// [`crate::active`] or a tier from [`crate::tier::available`]).
#[inline]
pub(crate) fn dispatch<Op: WithIsa>(tier: Tier, op: Op) -> Op::Output {
    match tier {
        #[cfg(target_arch = "x86_64")]
        Tier::Avx512 => {
            if let Some(t) = avx512::Avx512::new() {
                return avx512::entry(t, op);
            }
        }
        #[cfg(target_arch = "x86_64")]
        Tier::Avx2 => {
            if let Some(t) = avx2::Avx2::new() {
                return avx2::entry(t, op);
            }
        }
        #[cfg(target_arch = "aarch64")]
        Tier::Neon => {
            if let Some(t) = neon::Neon::new() {
                return neon::entry(t, op);
            }
        }
        _ => {}
    }
    op.run(scalar::Scalar)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::rand_vec;
    use crate::tier::available;
    use std::vec::Vec;

    /// Widens every f16 and (a sample of) bf16 bit pattern through the tier's loads.
    struct Widen<'a> {
        bits: &'a [u16],
        f16: bool,
    }

    impl WithIsa for Widen<'_> {
        type Output = Vec<f32>;
        #[inline(always)]
        fn run<I: Isa>(self, isa: I) -> Vec<f32> {
            let l = I::LANES;
            let mut out = std::vec![0.0f32; self.bits.len()];
            for (src, dst) in self.bits.chunks_exact(l).zip(out.chunks_exact_mut(l)) {
                // SAFETY: `src` holds exactly LANES u16.
                let v = unsafe {
                    if self.f16 {
                        isa.load_f16(src.as_ptr())
                    } else {
                        isa.load_bf16(src.as_ptr())
                    }
                };
                isa.store_s(dst, v);
            }
            out
        }
    }

    #[test]
    fn half_loads_are_exact_for_every_value() {
        let bits: Vec<u16> = (0..=u16::MAX).collect();
        for tier in available() {
            let got = dispatch(
                tier,
                Widen {
                    bits: &bits,
                    f16: true,
                },
            );
            for (&b, &g) in bits.iter().zip(&got) {
                let want = half::f16::from_bits(b).to_f32();
                if want.is_nan() {
                    assert!(g.is_nan(), "{tier:?} f16 {b:#06x}");
                    assert_eq!(g.to_bits() >> 31, want.to_bits() >> 31);
                } else {
                    assert_eq!(g.to_bits(), want.to_bits(), "{tier:?} f16 {b:#06x}");
                }
            }
            let got = dispatch(
                tier,
                Widen {
                    bits: &bits,
                    f16: false,
                },
            );
            for (&b, &g) in bits.iter().zip(&got) {
                assert_eq!(g.to_bits(), (b as u32) << 16, "{tier:?} bf16 {b:#06x}");
            }
        }
    }

    /// `reduce_sum4` of four registers loaded from `x`, and of the first alone (others zero).
    struct Reduce4<'a>(&'a [f32]);

    impl WithIsa for Reduce4<'_> {
        type Output = ([f32; 4], f32);
        #[inline(always)]
        fn run<I: Isa>(self, isa: I) -> ([f32; 4], f32) {
            let l = I::LANES;
            let v = [0, 1, 2, 3].map(|i| isa.load_s(&self.0[i * l..]));
            let z = isa.zero();
            (isa.reduce_sum4(v), isa.reduce_sum4([v[0], z, z, z])[0])
        }
    }

    #[test]
    fn reduce_sum4_sums_each_register_alone() {
        let x = rand_vec(64, 7);
        for tier in available() {
            let l = match tier {
                Tier::Avx512 => 16,
                Tier::Avx2 => 8,
                Tier::Neon => 4,
                Tier::Scalar => 1,
            };
            let (sums, first) = dispatch(tier, Reduce4(&x));
            for (i, &s) in sums.iter().enumerate() {
                let want: f64 = x[i * l..(i + 1) * l].iter().map(|&v| v as f64).sum();
                assert!(
                    (s as f64 - want).abs() < 1e-5,
                    "{tier:?} {i}: {s} vs {want}"
                );
            }
            assert_eq!(sums[0].to_bits(), first.to_bits(), "{tier:?}");
        }
    }

    /// `reduce_sum4x2` of eight registers loaded from `x`, and `reduce_sum4` of each half.
    struct Reduce4x2<'a>(&'a [f32]);

    impl WithIsa for Reduce4x2<'_> {
        type Output = ([f32; 8], [f32; 4], [f32; 4]);
        #[inline(always)]
        fn run<I: Isa>(self, isa: I) -> Self::Output {
            let l = I::LANES;
            let a = [0, 1, 2, 3].map(|i| isa.load_s(&self.0[i * l..]));
            let b = [4, 5, 6, 7].map(|i| isa.load_s(&self.0[i * l..]));
            (
                isa.reduce_sum4x2(a, b),
                isa.reduce_sum4(a),
                isa.reduce_sum4(b),
            )
        }
    }

    #[test]
    fn reduce_sum4x2_has_the_bits_of_two_reduce_sum4() {
        // Values of mixed magnitude, so a different addition order would show in the bits.
        let x: Vec<f32> = rand_vec(128, 9)
            .iter()
            .enumerate()
            .map(|(i, &v)| v * [1.0, 1e4, 1e-3, 3e2][i % 4])
            .collect();
        for tier in available() {
            let (both, a, b) = dispatch(tier, Reduce4x2(&x));
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&both[..4]), bits(&a), "{tier:?} first group");
            assert_eq!(bits(&both[4..]), bits(&b), "{tier:?} second group");
        }
    }

    /// For ISAs with [`Isa::KEY_FOLD`]: the fold tree (`fold_keys4`, `fold_keys8`,
    /// `finish_keys16`) over 16 registers loaded from `x` (one key each), and `reduce_sum4` of
    /// each group of four.
    struct Fold16<'a>(&'a [f32]);

    impl WithIsa for Fold16<'_> {
        type Output = Option<([f32; 16], [f32; 16])>;
        #[inline(always)]
        fn run<I: Isa>(self, isa: I) -> Self::Output {
            if !I::KEY_FOLD {
                return None;
            }
            let l = I::LANES;
            let key = |k: usize| isa.load_s(&self.0[k * l..]);
            let w = [0, 1, 2, 3].map(|p| isa.fold_keys4([0, 1, 2, 3].map(|k| key(4 * p + k))));
            let (lo, hi) = (isa.fold_keys8(w[0], w[1]), isa.fold_keys8(w[2], w[3]));
            let mut folded = [0.0f32; 16];
            isa.store_s(&mut folded, isa.finish_keys16(lo, hi));
            let mut each = [0.0f32; 16];
            for p in 0..4 {
                let sums = isa.reduce_sum4([0, 1, 2, 3].map(|k| key(4 * p + k)));
                each[4 * p..4 * p + 4].copy_from_slice(&sums);
            }
            Some((folded, each))
        }
    }

    #[test]
    fn finish_keys16_has_the_bits_of_reduce_sum4() {
        // Mixed magnitudes per lane, so any other addition order would show in the bits.
        let x: Vec<f32> = rand_vec(256, 11)
            .iter()
            .enumerate()
            .map(|(i, &v)| v * [1.0, 1e4, 1e-3, 3e2, 7.0, 1e-5][i % 6])
            .collect();
        let mut checked = 0;
        for tier in available() {
            if let Some((folded, each)) = dispatch(tier, Fold16(&x)) {
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&folded), bits(&each), "{tier:?}");
                checked += 1;
            }
        }
        // AVX-512 is the one ISA with KEY_FOLD; a machine without it has nothing to check.
        assert_eq!(checked > 0, crate::tier::supported(Tier::Avx512));
    }

    /// `transpose` of `src` (`rows x cols`, row stride `cols + 3`) into a buffer prefilled
    /// with NaN (row stride `rows + 5`), so any element written wrongly or not at all shows.
    struct Transpose<'a> {
        src: &'a [f32],
        rows: usize,
        cols: usize,
    }

    impl WithIsa for Transpose<'_> {
        type Output = Vec<f32>;
        #[inline(always)]
        fn run<I: Isa>(self, isa: I) -> Vec<f32> {
            let (rows, cols) = (self.rows, self.cols);
            let mut dst = vec![f32::NAN; cols * (rows + 5)];
            isa.transpose(self.src, cols + 3, rows, cols, &mut dst, rows + 5);
            dst
        }
    }

    #[test]
    fn transpose_moves_every_element_on_every_tier() {
        for &(rows, cols) in &[
            (1, 1),
            (16, 16),
            (32, 16),
            (17, 33),
            (15, 16),
            (16, 15),
            (40, 7),
        ] {
            let src = rand_vec(rows * (cols + 3), 13);
            for tier in available() {
                let dst = dispatch(
                    tier,
                    Transpose {
                        src: &src,
                        rows,
                        cols,
                    },
                );
                for c in 0..cols {
                    for i in 0..rows {
                        let (got, want) = (dst[c * (rows + 5) + i], src[i * (cols + 3) + c]);
                        assert_eq!(
                            got.to_bits(),
                            want.to_bits(),
                            "{tier:?} {rows}x{cols} ({i}, {c})"
                        );
                    }
                    for pad in rows..rows + 5 {
                        let untouched = dst[c * (rows + 5) + pad];
                        assert!(
                            untouched.is_nan(),
                            "{tier:?} {rows}x{cols}: wrote past a row"
                        );
                    }
                }
            }
        }
    }
}
