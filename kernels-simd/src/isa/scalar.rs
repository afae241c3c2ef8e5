//! The portable tier: one-lane "vectors" of plain f32.

use super::Isa;

/// Token for the scalar tier; always available.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Scalar;

impl Isa for Scalar {
    type V = f32;
    const LANES: usize = 1;
    const GEMM_NR: usize = 4;
    // A register is one float.
    const BROADCAST_OPERAND: bool = true;

    #[inline(always)]
    fn splat(self, x: f32) -> f32 {
        x
    }
    #[inline(always)]
    unsafe fn load(self, p: *const f32) -> f32 {
        // SAFETY: the caller guarantees `p` is valid for one read.
        unsafe { p.read_unaligned() }
    }
    #[inline(always)]
    unsafe fn store(self, p: *mut f32, v: f32) {
        // SAFETY: the caller guarantees `p` is valid for one write.
        unsafe { p.write_unaligned(v) }
    }
    #[inline(always)]
    fn add(self, a: f32, b: f32) -> f32 {
        a + b
    }
    #[inline(always)]
    fn sub(self, a: f32, b: f32) -> f32 {
        a - b
    }
    #[inline(always)]
    fn mul(self, a: f32, b: f32) -> f32 {
        a * b
    }
    #[inline(always)]
    fn mul_add(self, a: f32, b: f32, c: f32) -> f32 {
        // Unfused: a software fma would be far slower, and bare-metal targets lack one.
        a * b + c
    }
    #[inline(always)]
    fn min(self, a: f32, b: f32) -> f32 {
        if a < b {
            a
        } else {
            b
        }
    }
    #[inline(always)]
    fn max(self, a: f32, b: f32) -> f32 {
        if a > b {
            a
        } else {
            b
        }
    }
    #[inline(always)]
    fn reduce_sum(self, v: f32) -> f32 {
        v
    }
    #[inline(always)]
    fn pow2i(self, n: f32) -> f32 {
        f32::from_bits(((n as i32 + 127) as u32) << 23)
    }

    #[inline(always)]
    fn gemm_panel(self, job: &mut crate::gemm::kernel::PanelJob<'_>) {
        // 4x4: sixteen scalar accumulators fit the 16 FP registers of Cortex-M / x86 SSE.
        crate::gemm::kernel::panel::<Self, 4, 4>(self, job)
    }

    #[inline(always)]
    fn attend_tiles<E: crate::Elem, M: crate::Visibility + ?Sized>(
        self,
        args: crate::attend::kernel::Args<'_, E, M>,
    ) {
        // 4 x 4: sixteen scalar accumulators.
        crate::attend::kernel::attend_tiles::<Self, E, M, 4, 4>(self, args)
    }
}
