//! A measurement of the machine, not a kernel: independent FMA chains, to give benchmarks the
//! fused multiply-add peak of the active tier to compare against.

use crate::isa::{dispatch, Isa, WithIsa};
use crate::tier::active;

/// Independent accumulators: enough to cover FMA latency x issue ports on current cores
/// (4 cycles x 2 ports needs 8; 12 leaves headroom).
const CHAINS: usize = 12;

struct Probe {
    iterations: usize,
    seed: f32,
}

impl WithIsa for Probe {
    type Output = (f32, u64);

    #[inline(always)]
    fn run<I: Isa>(self, isa: I) -> (f32, u64) {
        let a = isa.splat(0.999_999);
        let b = isa.splat(1e-7);
        let mut acc = [isa.splat(self.seed); CHAINS];
        for _ in 0..self.iterations {
            for v in acc.iter_mut() {
                *v = isa.mul_add(*v, a, b);
            }
        }
        let mut sum = isa.zero();
        for v in acc {
            sum = isa.add(sum, v);
        }
        let flops = 2 * (CHAINS * I::LANES) as u64 * self.iterations as u64;
        (isa.reduce_sum(sum), flops)
    }
}

/// Runs `iterations` rounds of independent FMA chains on the active tier and returns a value
/// that depends on all of them (so the work cannot be optimised away) and the number of
/// floating-point operations done (an FMA counts 2). Time it to get the FMA peak of one core.
pub fn fma_probe(iterations: usize, seed: f32) -> (f32, u64) {
    dispatch(active(), Probe { iterations, seed })
}
