//! aarch64 Advanced SIMD: 4 f32 lanes in a Q register.

use super::{Isa, WithIsa};
use crate::tier::{supported, Tier};
use core::arch::aarch64::*;

/// Proof that the CPU supports Advanced SIMD; constructible only through [`Neon::new`].
#[derive(Clone, Copy, Debug)]
pub(crate) struct Neon(());

impl Neon {
    /// The token, if detection found Advanced SIMD (always, on aarch64 targets with it enabled).
    #[inline]
    pub(crate) fn new() -> Option<Self> {
        supported(Tier::Neon).then_some(Neon(()))
    }
}

/// Runs `op` compiled with NEON enabled.
#[inline]
pub(crate) fn entry<Op: WithIsa>(t: Neon, op: Op) -> Op::Output {
    #[target_feature(enable = "neon")]
    fn inner<Op: WithIsa>(t: Neon, op: Op) -> Op::Output {
        op.run(t)
    }
    // SAFETY: a `Neon` token exists only after detection found Advanced SIMD.
    unsafe { inner(t, op) }
}

// SAFETY (for every `unsafe` block in this impl): `self` is a `Neon` token, which exists only
// when the CPU supports Advanced SIMD, the only feature these intrinsics need; pointer validity
// for loads and stores is the caller's contract, stated on the trait.
impl Isa for Neon {
    type V = float32x4_t;
    const LANES: usize = 4;
    const GEMM_NR: usize = 8;
    // The scratch, as the tier was measured (a broadcast operand is untried on NEON).
    const BROADCAST_OPERAND: bool = false;

    #[inline(always)]
    fn splat(self, x: f32) -> float32x4_t {
        // SAFETY: see the impl comment.
        unsafe { vdupq_n_f32(x) }
    }
    #[inline(always)]
    unsafe fn load(self, p: *const f32) -> float32x4_t {
        // SAFETY: see the impl comment; `p` is valid for 4 reads by the caller's contract.
        unsafe { vld1q_f32(p) }
    }
    #[inline(always)]
    unsafe fn store(self, p: *mut f32, v: float32x4_t) {
        // SAFETY: see the impl comment; `p` is valid for 4 writes by the caller's contract.
        unsafe { vst1q_f32(p, v) }
    }
    #[inline(always)]
    fn add(self, a: float32x4_t, b: float32x4_t) -> float32x4_t {
        // SAFETY: see the impl comment.
        unsafe { vaddq_f32(a, b) }
    }
    #[inline(always)]
    fn sub(self, a: float32x4_t, b: float32x4_t) -> float32x4_t {
        // SAFETY: see the impl comment.
        unsafe { vsubq_f32(a, b) }
    }
    #[inline(always)]
    fn mul(self, a: float32x4_t, b: float32x4_t) -> float32x4_t {
        // SAFETY: see the impl comment.
        unsafe { vmulq_f32(a, b) }
    }
    #[inline(always)]
    fn mul_add(self, a: float32x4_t, b: float32x4_t, c: float32x4_t) -> float32x4_t {
        // SAFETY: see the impl comment.
        unsafe { vfmaq_f32(c, a, b) }
    }
    #[inline(always)]
    fn min(self, a: float32x4_t, b: float32x4_t) -> float32x4_t {
        // SAFETY: see the impl comment.
        unsafe { vminq_f32(a, b) }
    }
    #[inline(always)]
    fn max(self, a: float32x4_t, b: float32x4_t) -> float32x4_t {
        // SAFETY: see the impl comment.
        unsafe { vmaxq_f32(a, b) }
    }
    #[inline(always)]
    fn reduce_sum(self, v: float32x4_t) -> f32 {
        // SAFETY: see the impl comment.
        unsafe { vaddvq_f32(v) }
    }
    #[inline(always)]
    fn reduce_max(self, v: float32x4_t) -> f32 {
        // SAFETY: see the impl comment.
        unsafe { vmaxvq_f32(v) }
    }
    #[inline(always)]
    fn pow2i(self, n: float32x4_t) -> float32x4_t {
        // SAFETY: see the impl comment.
        unsafe {
            let e = vaddq_s32(vcvtnq_s32_f32(n), vdupq_n_s32(127));
            vreinterpretq_f32_s32(vshlq_n_s32::<23>(e))
        }
    }

    #[inline(always)]
    fn gemm_panel(self, job: &mut crate::gemm::kernel::PanelJob<'_>) {
        // 8x8: 16 accumulators + 2 B vectors + 1 broadcast of the 32 V registers.
        crate::gemm::kernel::panel::<Self, 8, 2>(self, job)
    }

    #[inline(always)]
    fn attend_tiles<E: crate::Elem, M: crate::Visibility + ?Sized>(
        self,
        args: crate::attend::kernel::Args<'_, E, M>,
    ) {
        // 8 x 2 registers: 16 accumulators + 2 loaded + 1 broadcast of 32 V registers.
        crate::attend::kernel::attend_tiles::<Self, E, M, 8, 2>(self, args)
    }
}
