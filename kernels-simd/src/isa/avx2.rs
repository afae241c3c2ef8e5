//! x86-64 AVX2 + FMA + F16C: 8 f32 lanes in a YMM register.

use super::{Isa, WithIsa};
use crate::tier::{supported, Tier};
use core::arch::x86_64::*;

/// Proof that the CPU and OS support AVX2, FMA and F16C; constructible only through
/// [`Avx2::new`].
#[derive(Clone, Copy, Debug)]
pub(crate) struct Avx2(());

impl Avx2 {
    /// The token, if detection found AVX2 + FMA + F16C with OS support for YMM state.
    #[inline]
    pub(crate) fn new() -> Option<Self> {
        supported(Tier::Avx2).then_some(Avx2(()))
    }
}

/// Runs `op` compiled with AVX2, FMA and F16C enabled.
#[inline]
pub(crate) fn entry<Op: WithIsa>(t: Avx2, op: Op) -> Op::Output {
    #[target_feature(enable = "avx2,fma,f16c")]
    fn inner<Op: WithIsa>(t: Avx2, op: Op) -> Op::Output {
        op.run(t)
    }
    // SAFETY: an `Avx2` token exists only after detection found AVX2 + FMA + F16C and OS YMM
    // support.
    unsafe { inner(t, op) }
}

// SAFETY (for every `unsafe` block in this impl): `self` is an `Avx2` token, which exists only
// when the CPU supports AVX2, FMA and F16C, the only features these intrinsics need; pointer
// validity for loads and stores is the caller's contract, stated on the trait.
impl Isa for Avx2 {
    type V = __m256;
    const LANES: usize = 8;
    const GEMM_NR: usize = 16;
    // A broadcast takes a register of its own: with the PV block's 12 accumulators and 3
    // values it spilled an accumulator (BENCHMARKS.md, third session).
    const BROADCAST_OPERAND: bool = false;

    #[inline(always)]
    fn splat(self, x: f32) -> __m256 {
        // SAFETY: see the impl comment.
        unsafe { _mm256_set1_ps(x) }
    }
    #[inline(always)]
    unsafe fn load(self, p: *const f32) -> __m256 {
        // SAFETY: see the impl comment; `p` is valid for 8 reads by the caller's contract.
        unsafe { _mm256_loadu_ps(p) }
    }
    #[inline(always)]
    unsafe fn store(self, p: *mut f32, v: __m256) {
        // SAFETY: see the impl comment; `p` is valid for 8 writes by the caller's contract.
        unsafe { _mm256_storeu_ps(p, v) }
    }
    #[inline(always)]
    fn add(self, a: __m256, b: __m256) -> __m256 {
        // SAFETY: see the impl comment.
        unsafe { _mm256_add_ps(a, b) }
    }
    #[inline(always)]
    fn sub(self, a: __m256, b: __m256) -> __m256 {
        // SAFETY: see the impl comment.
        unsafe { _mm256_sub_ps(a, b) }
    }
    #[inline(always)]
    fn mul(self, a: __m256, b: __m256) -> __m256 {
        // SAFETY: see the impl comment.
        unsafe { _mm256_mul_ps(a, b) }
    }
    #[inline(always)]
    fn mul_add(self, a: __m256, b: __m256, c: __m256) -> __m256 {
        // SAFETY: see the impl comment.
        unsafe { _mm256_fmadd_ps(a, b, c) }
    }
    #[inline(always)]
    fn min(self, a: __m256, b: __m256) -> __m256 {
        // SAFETY: see the impl comment.
        unsafe { _mm256_min_ps(a, b) }
    }
    #[inline(always)]
    fn max(self, a: __m256, b: __m256) -> __m256 {
        // SAFETY: see the impl comment.
        unsafe { _mm256_max_ps(a, b) }
    }
    #[inline(always)]
    fn reduce_sum(self, v: __m256) -> f32 {
        // SAFETY: see the impl comment.
        unsafe {
            let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
            let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
            let s = _mm_add_ss(s, _mm_shuffle_ps::<0b01>(s, s));
            _mm_cvtss_f32(s)
        }
    }
    #[inline(always)]
    fn reduce_max(self, v: __m256) -> f32 {
        // SAFETY: see the impl comment.
        unsafe {
            let s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
            let s = _mm_max_ps(s, _mm_movehl_ps(s, s));
            let s = _mm_max_ss(s, _mm_shuffle_ps::<0b01>(s, s));
            _mm_cvtss_f32(s)
        }
    }
    #[inline(always)]
    unsafe fn load_f16(self, p: *const u16) -> __m256 {
        // SAFETY: see the impl comment (F16C); `p` is valid for 8 u16 reads by the caller's
        // contract. The conversion is exact.
        unsafe { _mm256_cvtph_ps(_mm_loadu_si128(p.cast())) }
    }
    #[inline(always)]
    unsafe fn load_bf16(self, p: *const u16) -> __m256 {
        // SAFETY: see the impl comment; `p` is valid for 8 u16 reads by the caller's contract.
        unsafe {
            let w = _mm256_cvtepu16_epi32(_mm_loadu_si128(p.cast()));
            _mm256_castsi256_ps(_mm256_slli_epi32::<16>(w))
        }
    }
    #[inline(always)]
    fn prefetch(self, p: *const u8) {
        // SAFETY: see the impl comment; a prefetch is a hint that never faults, whatever the
        // address.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(p.cast()) }
    }
    #[inline(always)]
    fn reduce_sum4(self, v: [__m256; 4]) -> [f32; 4] {
        // Lane i of the result: ((x0 + x1) + (x2 + x3)) + ((x4 + x5) + (x6 + x7)) of v[i].
        // SAFETY: see the impl comment.
        unsafe {
            let a = _mm256_hadd_ps(v[0], v[1]);
            let b = _mm256_hadd_ps(v[2], v[3]);
            let c = _mm256_hadd_ps(a, b);
            let s = _mm_add_ps(_mm256_castps256_ps128(c), _mm256_extractf128_ps::<1>(c));
            let mut out = [0.0f32; 4];
            _mm_storeu_ps(out.as_mut_ptr(), s);
            out
        }
    }
    #[inline(always)]
    fn reduce_sum4x2(self, a: [__m256; 4], b: [__m256; 4]) -> [f32; 8] {
        // The hadd tree of reduce_sum4 on each group; then one add of the 128-bit halves
        // serves both groups (lanes 0-3: a's low half plus its high half, lanes 4-7: b's),
        // the same additions in the same order as reduce_sum4's extract and add.
        // SAFETY: see the impl comment.
        unsafe {
            let ca = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
            let cb = _mm256_hadd_ps(_mm256_hadd_ps(b[0], b[1]), _mm256_hadd_ps(b[2], b[3]));
            let lo = _mm256_permute2f128_ps::<0x20>(ca, cb);
            let hi = _mm256_permute2f128_ps::<0x31>(ca, cb);
            let mut out = [0.0f32; 8];
            _mm256_storeu_ps(out.as_mut_ptr(), _mm256_add_ps(lo, hi));
            out
        }
    }
    #[inline(always)]
    fn pow2i(self, n: __m256) -> __m256 {
        // SAFETY: see the impl comment.
        unsafe {
            let e = _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127));
            _mm256_castsi256_ps(_mm256_slli_epi32::<23>(e))
        }
    }

    const TRANSPOSE_BLOCK: usize = 8;

    #[inline(always)]
    unsafe fn transpose_block(
        self,
        src: *const f32,
        src_stride: usize,
        dst: *mut f32,
        dst_stride: usize,
    ) {
        // SAFETY: see the impl comment; the 8 x 8 block is readable at `src` and writable at
        // `dst` by the caller's contract.
        unsafe {
            let mut r = [_mm256_setzero_ps(); 8];
            for (k, r) in r.iter_mut().enumerate() {
                *r = _mm256_loadu_ps(src.add(k * src_stride));
            }
            let t0 = _mm256_unpacklo_ps(r[0], r[1]);
            let t1 = _mm256_unpackhi_ps(r[0], r[1]);
            let t2 = _mm256_unpacklo_ps(r[2], r[3]);
            let t3 = _mm256_unpackhi_ps(r[2], r[3]);
            let t4 = _mm256_unpacklo_ps(r[4], r[5]);
            let t5 = _mm256_unpackhi_ps(r[4], r[5]);
            let t6 = _mm256_unpacklo_ps(r[6], r[7]);
            let t7 = _mm256_unpackhi_ps(r[6], r[7]);
            let s0 = _mm256_shuffle_ps::<0x44>(t0, t2);
            let s1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
            let s2 = _mm256_shuffle_ps::<0x44>(t1, t3);
            let s3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
            let s4 = _mm256_shuffle_ps::<0x44>(t4, t6);
            let s5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
            let s6 = _mm256_shuffle_ps::<0x44>(t5, t7);
            let s7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
            let cols8 = [
                _mm256_permute2f128_ps::<0x20>(s0, s4),
                _mm256_permute2f128_ps::<0x20>(s1, s5),
                _mm256_permute2f128_ps::<0x20>(s2, s6),
                _mm256_permute2f128_ps::<0x20>(s3, s7),
                _mm256_permute2f128_ps::<0x31>(s0, s4),
                _mm256_permute2f128_ps::<0x31>(s1, s5),
                _mm256_permute2f128_ps::<0x31>(s2, s6),
                _mm256_permute2f128_ps::<0x31>(s3, s7),
            ];
            for (k, &v) in cols8.iter().enumerate() {
                _mm256_storeu_ps(dst.add(k * dst_stride), v);
            }
        }
    }

    #[inline(always)]
    fn gemm_panel(self, job: &mut crate::gemm::kernel::PanelJob<'_>) {
        // 6x16: 12 accumulators + 2 B vectors + 1 broadcast = 15 of the 16 YMM registers.
        crate::gemm::kernel::panel::<Self, 6, 2>(self, job)
    }

    #[inline(always)]
    fn attend_tiles<E: crate::Elem, M: crate::Visibility + ?Sized>(
        self,
        args: crate::attend::kernel::Args<'_, E, M>,
    ) {
        // 6 keys or rows x 2 registers: 12 accumulators + 2 loaded + 1 broadcast = 15 of 16 YMM.
        crate::attend::kernel::attend_tiles::<Self, E, M, 6, 2>(self, args)
    }
}
