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
    // `vfmadd231ps zmm, zmm, m32{1to16}`.
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
        // SAFETY: see the impl comment.
        unsafe { _mm512_reduce_add_ps(v) }
    }
    #[inline(always)]
    unsafe fn load_f16(self, p: *const u16) -> __m512 {
        // SAFETY: see the impl comment (VCVTPH2PS on ZMM is AVX-512F); `p` is valid for 16 u16
        // reads by the caller's contract. The conversion is exact.
        unsafe { _mm512_cvtph_ps(_mm256_loadu_si256(p.cast())) }
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
