//! x86-64 AVX-512F: 16 f32 lanes in a ZMM register.

use super::{Isa, WithIsa};
use crate::tier::{supported, Tier};
use core::arch::x86_64::*;

/// Proof that the CPU and OS support AVX-512F; constructible only through [`Avx512::new`].
#[derive(Clone, Copy, Debug)]
pub(crate) struct Avx512(());

impl Avx512 {
    /// The token, if detection found AVX-512F with OS support for ZMM state.
    #[inline]
    pub(crate) fn new() -> Option<Self> {
        supported(Tier::Avx512).then_some(Avx512(()))
    }

    /// The 16 x 16 transpose of 32-bit lanes: lane `c` of register `i` goes to lane `i` of
    /// register `c` (bits moved unchanged).
    #[inline(always)]
    fn transpose16(self, r: [__m512; 16]) -> [__m512; 16] {
        // SAFETY: `self` proves AVX-512F, all these intrinsics need.
        unsafe {
            // Within each 128-bit lane: 4 x 4 blocks transposed (rows 4g..4g+4 of
            // column 4L + m in lane L of u[4g + m]).
            let mut t = [_mm512_setzero_ps(); 16];
            for p in 0..8 {
                t[2 * p] = _mm512_unpacklo_ps(r[2 * p], r[2 * p + 1]);
                t[2 * p + 1] = _mm512_unpackhi_ps(r[2 * p], r[2 * p + 1]);
            }
            let mut u = [_mm512_setzero_ps(); 16];
            for g in 0..4 {
                let (a, b, c, d) = (t[4 * g], t[4 * g + 1], t[4 * g + 2], t[4 * g + 3]);
                u[4 * g] = _mm512_shuffle_ps::<0x44>(a, c);
                u[4 * g + 1] = _mm512_shuffle_ps::<0xEE>(a, c);
                u[4 * g + 2] = _mm512_shuffle_ps::<0x44>(b, d);
                u[4 * g + 3] = _mm512_shuffle_ps::<0xEE>(b, d);
            }
            // Across lanes: column 4L + m gathers lane L of u[m], u[4 + m], u[8 + m],
            // u[12 + m].
            let mut out = [_mm512_setzero_ps(); 16];
            for m in 0..4 {
                let v0 = _mm512_shuffle_f32x4::<0x88>(u[m], u[4 + m]);
                let v1 = _mm512_shuffle_f32x4::<0xDD>(u[m], u[4 + m]);
                let w0 = _mm512_shuffle_f32x4::<0x88>(u[8 + m], u[12 + m]);
                let w1 = _mm512_shuffle_f32x4::<0xDD>(u[8 + m], u[12 + m]);
                out[m] = _mm512_shuffle_f32x4::<0x88>(v0, w0);
                out[4 + m] = _mm512_shuffle_f32x4::<0x88>(v1, w1);
                out[8 + m] = _mm512_shuffle_f32x4::<0xDD>(v0, w0);
                out[12 + m] = _mm512_shuffle_f32x4::<0xDD>(v1, w1);
            }
            out
        }
    }
}

/// Runs `op` compiled with AVX-512F (and F16C, which detection also requires) enabled.
#[inline]
pub(crate) fn entry<Op: WithIsa>(t: Avx512, op: Op) -> Op::Output {
    #[target_feature(enable = "avx512f,f16c")]
    fn inner<Op: WithIsa>(t: Avx512, op: Op) -> Op::Output {
        op.run(t)
    }
    // SAFETY: an `Avx512` token exists only after detection found AVX-512F (with AVX2, FMA and
    // F16C) and OS ZMM support.
    unsafe { inner(t, op) }
}

// SAFETY (for every `unsafe` block in this impl): `self` is an `Avx512` token, which exists only
// when the CPU supports AVX-512F, the only features these intrinsics need; pointer
// validity for loads and stores is the caller's contract, stated on the trait.
impl Isa for Avx512 {
    type V = __m512;
    const LANES: usize = 16;
    const GEMM_NR: usize = 32;
    // The embedded broadcast: `vfmadd231ps zmm, zmm, m32{1to16}`.
    const BROADCAST_OPERAND: bool = true;

    #[inline(always)]
    fn splat(self, x: f32) -> __m512 {
        // SAFETY: see the impl comment.
        unsafe { _mm512_set1_ps(x) }
    }
    #[inline(always)]
    unsafe fn load(self, p: *const f32) -> __m512 {
        // SAFETY: see the impl comment; `p` is valid for 16 reads by the caller's contract.
        unsafe { _mm512_loadu_ps(p) }
    }
    #[inline(always)]
    unsafe fn store(self, p: *mut f32, v: __m512) {
        // SAFETY: see the impl comment; `p` is valid for 16 writes by the caller's contract.
        unsafe { _mm512_storeu_ps(p, v) }
    }
    #[inline(always)]
    fn add(self, a: __m512, b: __m512) -> __m512 {
        // SAFETY: see the impl comment.
        unsafe { _mm512_add_ps(a, b) }
    }
    #[inline(always)]
    fn sub(self, a: __m512, b: __m512) -> __m512 {
        // SAFETY: see the impl comment.
        unsafe { _mm512_sub_ps(a, b) }
    }
    #[inline(always)]
    fn mul(self, a: __m512, b: __m512) -> __m512 {
        // SAFETY: see the impl comment.
        unsafe { _mm512_mul_ps(a, b) }
    }
    #[inline(always)]
    fn mul_add(self, a: __m512, b: __m512, c: __m512) -> __m512 {
        // SAFETY: see the impl comment.
        unsafe { _mm512_fmadd_ps(a, b, c) }
    }
    #[inline(always)]
    fn min(self, a: __m512, b: __m512) -> __m512 {
        // SAFETY: see the impl comment.
        unsafe { _mm512_min_ps(a, b) }
    }
    #[inline(always)]
    fn max(self, a: __m512, b: __m512) -> __m512 {
        // SAFETY: see the impl comment.
        unsafe { _mm512_max_ps(a, b) }
    }
    #[inline(always)]
    fn reduce_sum(self, v: __m512) -> f32 {
        // The order of `reduce_sum4` (one register's share of it): the 256-bit halves, then the
        // 128-bit halves, then lanes (0 + 2) + (1 + 3).
        // SAFETY: see the impl comment.
        unsafe {
            let lo = _mm512_castps512_ps256(v);
            let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(v)));
            let s = _mm256_add_ps(lo, hi);
            let s = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps::<1>(s));
            let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
            let s = _mm_add_ss(s, _mm_shuffle_ps::<0b01>(s, s));
            _mm_cvtss_f32(s)
        }
    }
    #[inline(always)]
    fn reduce_sum4(self, v: [__m512; 4]) -> [f32; 4] {
        // Four registers' sums in one shuffle tree, each with the additions of `reduce_sum`:
        // a register's 128-bit quarters q0..q3 become (q0 + q2) + (q1 + q3), then its lanes
        // (0 + 2) + (1 + 3). Per register that was 8 shuffles and adds of its own; here 12
        // instructions serve all four (the decode's scores reduce 4 rows per key).
        // One 128-bit quarter per register: (q0 + q2) + (q1 + q3) of v[0] .. v[3].
        let w = self.fold_keys4(v);
        // SAFETY: see the impl comment.
        unsafe {
            // Lanes (0 + 2, 1 + 3), then their sum, in lane 0 of each quarter.
            let w = _mm512_add_ps(w, _mm512_permute_ps::<0b01_00_11_10>(w));
            let w = _mm512_add_ps(w, _mm512_permute_ps::<0b10_11_00_01>(w));
            let mut t = [0.0f32; 16];
            _mm512_storeu_ps(t.as_mut_ptr(), w);
            [t[0], t[4], t[8], t[12]]
        }
    }
    const KEY_FOLD: bool = true;

    #[inline(always)]
    fn fold_keys4(self, v: [__m512; 4]) -> __m512 {
        // `reduce_sum4`'s first two levels: quarter k becomes (q0 + q2) + (q1 + q3) of v[k].
        // SAFETY: see the impl comment.
        unsafe {
            // (a.q0 + a.q2, a.q1 + a.q3, b.q0 + b.q2, b.q1 + b.q3), and the same of c, d.
            let ab = _mm512_add_ps(
                _mm512_shuffle_f32x4::<0b01_00_01_00>(v[0], v[1]),
                _mm512_shuffle_f32x4::<0b11_10_11_10>(v[0], v[1]),
            );
            let cd = _mm512_add_ps(
                _mm512_shuffle_f32x4::<0b01_00_01_00>(v[2], v[3]),
                _mm512_shuffle_f32x4::<0b11_10_11_10>(v[2], v[3]),
            );
            _mm512_add_ps(
                _mm512_shuffle_f32x4::<0b10_00_10_00>(ab, cd),
                _mm512_shuffle_f32x4::<0b11_01_11_01>(ab, cd),
            )
        }
    }
    #[inline(always)]
    fn fold_keys8(self, a: __m512, b: __m512) -> __m512 {
        // `reduce_sum4`'s next step for two registers side by side: per quarter, lanes
        // (0 + 2, 1 + 3) of `a`, then of `b`.
        // SAFETY: see the impl comment.
        unsafe {
            let (a, b) = (_mm512_castps_pd(a), _mm512_castps_pd(b));
            _mm512_add_ps(
                _mm512_castpd_ps(_mm512_unpacklo_pd(a, b)),
                _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)),
            )
        }
    }
    #[inline(always)]
    fn finish_keys16(self, a: __m512, b: __m512) -> __m512 {
        // `reduce_sum4`'s last step, (0 + 2) + (1 + 3) per key: quarter q of the sum then holds
        // keys q, 4 + q, 8 + q, 12 + q; one permutation puts key k in lane k.
        // SAFETY: see the impl comment.
        unsafe {
            let y = _mm512_add_ps(
                _mm512_shuffle_ps::<0b10_00_10_00>(a, b),
                _mm512_shuffle_ps::<0b11_01_11_01>(a, b),
            );
            let key_order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
            _mm512_permutexvar_ps(key_order, y)
        }
    }
    #[inline(always)]
    fn reduce_max(self, v: __m512) -> f32 {
        // SAFETY: see the impl comment.
        unsafe { _mm512_reduce_max_ps(v) }
    }
    #[inline(always)]
    unsafe fn load_f16(self, p: *const u16) -> __m512 {
        // Not `_mm512_cvtph_ps`: that emits the {sae} form, which LLVM (Rust 1.95) gives only
        // registers zmm0-15, so a loop of 16 accumulators and 4 converted keys spilled every
        // step. The conversion raises no exception either way (it is exact).
        // SAFETY: see the impl comment (VCVTPH2PS on ZMM is AVX-512F); `p` is valid for 16 u16
        // reads by the caller's contract.
        unsafe { _mm512_cvt_roundph_ps::<_MM_FROUND_CUR_DIRECTION>(_mm256_loadu_si256(p.cast())) }
    }
    #[inline(always)]
    unsafe fn load_bf16(self, p: *const u16) -> __m512 {
        // SAFETY: see the impl comment; `p` is valid for 16 u16 reads by the caller's contract.
        unsafe {
            let w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(p.cast()));
            _mm512_castsi512_ps(_mm512_slli_epi32::<16>(w))
        }
    }
    #[inline(always)]
    fn prefetch(self, p: *const u8) {
        // SAFETY: see the impl comment; a prefetch is a hint that never faults, whatever the
        // address.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(p.cast()) }
    }
    #[inline(always)]
    fn pow2i(self, n: __m512) -> __m512 {
        // SAFETY: see the impl comment.
        unsafe {
            let e = _mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127));
            _mm512_castsi512_ps(_mm512_slli_epi32::<23>(e))
        }
    }

    const TRANSPOSE_BLOCK: usize = 16;

    #[inline(always)]
    unsafe fn transpose_block(
        self,
        src: *const f32,
        src_stride: usize,
        dst: *mut f32,
        dst_stride: usize,
    ) {
        // SAFETY: see the impl comment; the 16 x 16 block is readable at `src` and writable at
        // `dst` by the caller's contract.
        unsafe {
            let mut r = [_mm512_setzero_ps(); 16];
            for (k, r) in r.iter_mut().enumerate() {
                *r = _mm512_loadu_ps(src.add(k * src_stride));
            }
            for (c, v) in self.transpose16(r).into_iter().enumerate() {
                _mm512_storeu_ps(dst.add(c * dst_stride), v);
            }
        }
    }

    const BF16_PAIRS: usize = 16;

    #[inline(always)]
    unsafe fn bf16_pairs(self, p: *const u16, stride: usize) -> [__m512; 16] {
        // SAFETY: see the impl comment; each row's 32 u16 (64 bytes) are readable by the
        // caller's contract.
        unsafe {
            let mut r = [_mm512_setzero_ps(); 16];
            for (i, r) in r.iter_mut().enumerate() {
                *r = _mm512_loadu_ps(p.add(i * stride).cast());
            }
            // Shuffles move bits unchanged, so pairs of bf16 travel as one f32 lane.
            self.transpose16(r)
        }
    }

    #[inline(always)]
    fn bf16_even(self, v: __m512) -> __m512 {
        // SAFETY: see the impl comment.
        unsafe { _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_castps_si512(v))) }
    }

    #[inline(always)]
    fn bf16_odd(self, v: __m512) -> __m512 {
        // SAFETY: see the impl comment.
        unsafe {
            let high = _mm512_set1_epi32(0xffff_0000_u32 as i32);
            _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(v), high))
        }
    }

    #[inline(always)]
    fn f16_even(self, v: __m512) -> __m512 {
        // The low halves narrowed to 16 f16 (VPMOVDW), then widened exactly; the rounding
        // form of the conversion for the reason `load_f16` gives.
        // SAFETY: see the impl comment (VPMOVDW and VCVTPH2PS on ZMM are AVX-512F).
        unsafe {
            let low = _mm512_cvtepi32_epi16(_mm512_castps_si512(v));
            _mm512_cvt_roundph_ps::<_MM_FROUND_CUR_DIRECTION>(low)
        }
    }

    #[inline(always)]
    fn f16_odd(self, v: __m512) -> __m512 {
        // SAFETY: as in `f16_even`; the shift moves the high halves down first.
        unsafe {
            let high = _mm512_srli_epi32::<16>(_mm512_castps_si512(v));
            _mm512_cvt_roundph_ps::<_MM_FROUND_CUR_DIRECTION>(_mm512_cvtepi32_epi16(high))
        }
    }

    #[inline(always)]
    fn gemm_panel(self, job: &mut crate::gemm::kernel::PanelJob<'_>) {
        // 8x32: 16 accumulators + 2 B vectors + 1 broadcast, half of the 32 ZMM registers; a
        // taller tile would waste more work on the short M of decode steps.
        crate::gemm::kernel::panel::<Self, 8, 2>(self, job)
    }

    #[inline(always)]
    fn attend_tiles<E: crate::Elem, M: crate::Visibility + ?Sized>(
        self,
        args: crate::attend::kernel::Args<'_, E, M>,
    ) {
        // 8 x 2 registers: 16 accumulators + 2 loaded + 1 broadcast of 32 ZMM.
        crate::attend::kernel::attend_tiles::<Self, E, M, 8, 2>(self, args)
    }
}
