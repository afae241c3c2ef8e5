//! Which instruction-set tier the kernels run on: detected once, cached in atomics, overridable.

use core::fmt;
use core::sync::atomic::{AtomicU8, Ordering};

/// An instruction-set tier. Every kernel has an implementation per tier.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Tier {
    /// Portable Rust, no SIMD intrinsics; available everywhere (the only tier on bare metal).
    Scalar,
    /// x86-64 with AVX2, FMA and F16C, with the OS saving YMM state.
    Avx2,
    /// x86-64 with AVX-512F (and what [`Tier::Avx2`] needs), with the OS saving ZMM and opmask
    /// state.
    Avx512,
    /// aarch64 Advanced SIMD (always present on aarch64).
    Neon,
}

impl Tier {
    /// Every tier, in the order [`detected`] prefers them (best last).
    pub const ALL: [Tier; 4] = [Tier::Scalar, Tier::Neon, Tier::Avx2, Tier::Avx512];

    /// The lower-case name used by `ATTNRT_SIMD_TIER`.
    pub const fn name(self) -> &'static str {
        match self {
            Tier::Scalar => "scalar",
            Tier::Avx2 => "avx2",
            Tier::Avx512 => "avx512",
            Tier::Neon => "neon",
        }
    }

    /// Parses a name as written by [`Tier::name`] (ASCII case-insensitive).
    pub fn from_name(s: &str) -> Option<Tier> {
        Tier::ALL
            .into_iter()
            .find(|t| t.name().eq_ignore_ascii_case(s.trim()))
    }

    const fn bit(self) -> u8 {
        1 << (self as u8)
    }
}

impl fmt::Display for Tier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// [`force`] was asked for a tier this CPU (or this build's target) cannot run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TierUnavailable {
    /// The tier that was requested.
    pub requested: Tier,
    /// The best tier the CPU supports.
    pub detected: Tier,
}

impl fmt::Display for TierUnavailable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "SIMD tier {} is not available on this CPU (best available: {})",
            self.requested, self.detected
        )
    }
}

#[cfg(feature = "std")]
impl std::error::Error for TierUnavailable {}

/// Bit 7 marks "detection ran"; the low bits are `Tier::bit` of each supported tier.
static SUPPORTED: AtomicU8 = AtomicU8::new(0);
const INIT: u8 = 0x80;
/// 0 while no tier was forced; else `1 + tier as u8`.
static ACTIVE: AtomicU8 = AtomicU8::new(0);

/// Bitmask of supported tiers; detection runs at most a few times (racing threads compute the
/// same answer, so a plain store is enough).
fn supported_bits() -> u8 {
    let s = SUPPORTED.load(Ordering::Relaxed);
    if s & INIT != 0 {
        return s;
    }
    let s = INIT | detect_bits();
    SUPPORTED.store(s, Ordering::Relaxed);
    s
}

/// Whether the CPU can run `t`.
pub fn supported(t: Tier) -> bool {
    supported_bits() & t.bit() != 0
}

/// The best tier this CPU supports, detected once and cached.
pub fn detected() -> Tier {
    let s = supported_bits();
    let mut best = Tier::Scalar;
    for t in Tier::ALL {
        if s & t.bit() != 0 {
            best = t;
        }
    }
    best
}

/// The tier the public kernels use: the one last [`force`]d, else [`detected`].
pub fn active() -> Tier {
    match ACTIVE.load(Ordering::Relaxed) {
        1 => Tier::Scalar,
        2 => Tier::Avx2,
        3 => Tier::Avx512,
        4 => Tier::Neon,
        _ => detected(),
    }
}

/// Makes the public kernels use tier `t` from now on (process-wide).
///
/// # Errors
/// [`TierUnavailable`] if the CPU cannot run `t`; the active tier is then unchanged.
pub fn force(t: Tier) -> Result<(), TierUnavailable> {
    if !supported(t) {
        return Err(TierUnavailable {
            requested: t,
            detected: detected(),
        });
    }
    ACTIVE.store(1 + t as u8, Ordering::Relaxed);
    Ok(())
}

/// Why [`init_from_env`] rejected `ATTNRT_SIMD_TIER`.
#[cfg(feature = "std")]
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum EnvTierError {
    /// The variable holds no tier name (expected scalar, avx2, avx512 or neon).
    UnknownName(std::string::String),
    /// The named tier cannot run here.
    Unavailable(TierUnavailable),
}

#[cfg(feature = "std")]
impl fmt::Display for EnvTierError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::UnknownName(s) => write!(
                f,
                "ATTNRT_SIMD_TIER={s:?}: expected scalar, avx2, avx512 or neon"
            ),
            Self::Unavailable(e) => write!(f, "ATTNRT_SIMD_TIER: {e}"),
        }
    }
}

#[cfg(feature = "std")]
impl std::error::Error for EnvTierError {}

/// Forces the tier named by the environment variable `ATTNRT_SIMD_TIER`, if set and non-empty,
/// and returns the tier active afterwards. CI uses this to run every tier.
///
/// # Errors
/// An unknown name, or a tier this CPU lacks; the active tier is then unchanged.
#[cfg(feature = "std")]
pub fn init_from_env() -> Result<Tier, EnvTierError> {
    match std::env::var("ATTNRT_SIMD_TIER") {
        Ok(s) if !s.trim().is_empty() => {
            let t = Tier::from_name(&s).ok_or(EnvTierError::UnknownName(s))?;
            force(t).map_err(EnvTierError::Unavailable)?;
        }
        _ => {}
    }
    Ok(active())
}

#[cfg(target_arch = "x86_64")]
fn detect_bits() -> u8 {
    use core::arch::x86_64::{__cpuid_count, CpuidResult};

    /// XCR0 read; `xgetbv` faults unless CPUID reported OSXSAVE, which the caller checks.
    #[target_feature(enable = "xsave")]
    unsafe fn xcr0() -> u64 {
        // SAFETY: the caller checked OSXSAVE, so the OS enabled XGETBV.
        unsafe { core::arch::x86_64::_xgetbv(0) }
    }

    #[allow(unused_unsafe)] // `__cpuid_count` became a safe fn in recent toolchains
    fn cpuid(leaf: u32) -> CpuidResult {
        // SAFETY: every x86-64 CPU implements CPUID; leaves above the maximum just return
        // unspecified data, and callers check the maximum leaf first.
        unsafe { __cpuid_count(leaf, 0) }
    }

    let mut bits = Tier::Scalar.bit();
    let max_leaf = cpuid(0).eax;
    if max_leaf < 7 {
        return bits;
    }
    let l1 = cpuid(1);
    let l7 = cpuid(7);
    let fma = l1.ecx & (1 << 12) != 0;
    let f16c = l1.ecx & (1 << 29) != 0;
    let osxsave = l1.ecx & (1 << 27) != 0;
    let avx = l1.ecx & (1 << 28) != 0;
    let avx2 = l7.ebx & (1 << 5) != 0;
    let avx512f = l7.ebx & (1 << 16) != 0;
    if !(osxsave && avx) {
        return bits;
    }
    // SAFETY: OSXSAVE is set, so XGETBV is enabled by the OS and cannot fault.
    let xcr0 = unsafe { xcr0() };
    // The OS must save SSE and AVX (YMM) state, or using YMM registers corrupts them on
    // context switches; AVX-512 additionally needs opmask, ZMM_Hi256 and Hi16_ZMM state.
    let ymm_ok = xcr0 & 0x6 == 0x6;
    let zmm_ok = xcr0 & 0xe6 == 0xe6;
    // F16C (half-precision loads) comes with every AVX2 CPU, but is checked, not assumed.
    if ymm_ok && avx2 && fma && f16c {
        bits |= Tier::Avx2.bit();
        if zmm_ok && avx512f {
            bits |= Tier::Avx512.bit();
        }
    }
    bits
}

#[cfg(target_arch = "aarch64")]
fn detect_bits() -> u8 {
    // Advanced SIMD is part of the aarch64 base ISA for every target Rust supports with std,
    // and the target feature is on by default; a build without it simply stays scalar.
    if cfg!(target_feature = "neon") {
        Tier::Scalar.bit() | Tier::Neon.bit()
    } else {
        Tier::Scalar.bit()
    }
}

#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
fn detect_bits() -> u8 {
    Tier::Scalar.bit()
}

/// Every tier this machine can run, for tests that exercise all of them.
#[cfg(test)]
pub(crate) fn available() -> std::vec::Vec<Tier> {
    Tier::ALL.into_iter().filter(|&t| supported(t)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The best tier that the kernel's own view of the CPU (/proc/cpuinfo) allows.
    fn expected_from_cpuinfo() -> Tier {
        if cfg!(target_arch = "aarch64") {
            // qemu-user shows the host's /proc/cpuinfo; NEON is mandatory on aarch64 anyway.
            return Tier::Neon;
        }
        if !cfg!(target_arch = "x86_64") {
            return Tier::Scalar;
        }
        let info = std::fs::read_to_string("/proc/cpuinfo").expect("read /proc/cpuinfo");
        let flags: std::collections::HashSet<&str> = info
            .lines()
            .find(|l| l.starts_with("flags"))
            .expect("flags line")
            .split_whitespace()
            .collect();
        let avx2 = flags.contains("avx2") && flags.contains("fma") && flags.contains("f16c");
        if avx2 && flags.contains("avx512f") {
            Tier::Avx512
        } else if avx2 {
            Tier::Avx2
        } else {
            Tier::Scalar
        }
    }

    #[test]
    fn detected_matches_cpuinfo() {
        let want = expected_from_cpuinfo();
        assert_eq!(
            detected(),
            want,
            "CPUID/XGETBV detection disagrees with /proc/cpuinfo"
        );
        std::println!("detected SIMD tier: {}", detected());
        #[cfg(target_arch = "x86_64")]
        {
            assert_eq!(
                supported(Tier::Avx2),
                std::is_x86_feature_detected!("avx2")
                    && std::is_x86_feature_detected!("fma")
                    && std::is_x86_feature_detected!("f16c")
            );
            assert_eq!(
                supported(Tier::Avx512),
                supported(Tier::Avx2) && std::is_x86_feature_detected!("avx512f")
            );
        }
        assert!(supported(Tier::Scalar));
    }

    /// The only test that changes the process-wide tier; kernel tests pick tiers explicitly.
    #[test]
    fn force_and_names() {
        for t in Tier::ALL {
            assert_eq!(Tier::from_name(t.name()), Some(t));
            let r = force(t);
            assert_eq!(r.is_ok(), supported(t));
            match r {
                Ok(()) => assert_eq!(active(), t),
                Err(e) => assert!(e.to_string().contains(t.name())),
            }
        }
        assert_eq!(Tier::from_name(" AVX2 "), Some(Tier::Avx2));
        #[cfg(feature = "std")]
        {
            std::env::set_var("ATTNRT_SIMD_TIER", "bogus");
            assert!(matches!(init_from_env(), Err(EnvTierError::UnknownName(_))));
            std::env::set_var("ATTNRT_SIMD_TIER", "scalar");
            assert_eq!(init_from_env(), Ok(Tier::Scalar));
            assert_eq!(active(), Tier::Scalar);
            std::env::remove_var("ATTNRT_SIMD_TIER");
            assert_eq!(init_from_env(), Ok(Tier::Scalar));
        }
        assert_eq!(Tier::from_name("sse"), None);
        force(detected()).unwrap();
        assert_eq!(active(), detected());
    }
}
