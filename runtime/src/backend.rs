//! Which executor ran a forward call: reported on every call, never guessed.

use core::fmt;

/// The executor that produced an output.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Backend {
    /// The scalar reference of [`crate::Layer::forward_reference`].
    Reference,
    /// The SIMD CPU executor of [`crate::Layer::forward_cpu`], on this kernel tier.
    CpuSimd(attnrt_simd::Tier),
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Backend::Reference => f.write_str("scalar-reference"),
            Backend::CpuSimd(tier) => write!(f, "cpu-simd-{}", tier.name()),
        }
    }
}

#[cfg(feature = "defmt")]
impl defmt::Format for Backend {
    fn format(&self, f: defmt::Formatter<'_>) {
        match self {
            Backend::Reference => defmt::write!(f, "scalar-reference"),
            Backend::CpuSimd(tier) => defmt::write!(f, "cpu-simd-{=str}", tier.name()),
        }
    }
}
