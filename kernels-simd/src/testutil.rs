//! Shared test helpers: deterministic random data, tolerance checks, a reference mask.

use crate::elem::Elem;
use crate::visibility::{TileClass, Visibility};
use std::vec::Vec;

/// Lengths around every tile size in the crate (1, 4, 8, 16, 32, 64 lanes/tiles) plus 63, 200.
pub const EDGE_LENS: &[usize] = &[
    0, 1, 2, 3, 4, 5, 7, 8, 9, 15, 16, 17, 31, 32, 33, 63, 64, 65, 127, 128, 129, 200,
];

/// xorshift64*: fast, deterministic, good enough for test data.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Uniform in [-1, 1).
    pub fn unit(&mut self) -> f32 {
        ((self.next_u64() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}

pub fn rand_vec(n: usize, seed: u64) -> Vec<f32> {
    let mut r = Rng::new(seed);
    (0..n).map(|_| r.unit()).collect()
}

pub fn rand_elem<E: Elem>(n: usize, seed: u64) -> Vec<E> {
    rand_vec(n, seed).into_iter().map(E::from_f32).collect()
}

/// Asserts `|got - want| <= tol * (1 + |want|)`.
pub fn close(got: f64, want: f64, tol: f64, what: &str) {
    assert!(
        (got - want).abs() <= tol * (1.0 + want.abs()),
        "{what}: got {got}, want {want}, tol {tol}"
    );
}

/// A mask built the obvious way from every rule of SPEC.md step 7, for checking kernels.
#[derive(Clone, Debug, Default)]
pub struct TestMask {
    pub window: Option<usize>,
    /// Padding: only tokens `< len` exist.
    pub len: Option<usize>,
    pub doc_ids: Option<Vec<u32>>,
    /// cu_seqlens-style segment starts and final end.
    pub cu_seqlens: Option<Vec<usize>>,
    /// If true, `classify` answers exactly; else always Partial (slower, equally correct).
    pub exact: bool,
    /// If true, `key_range` is the tightest range; else the trait's causal default.
    pub tight_range: bool,
}

impl TestMask {
    fn segment(&self, t: usize) -> Option<usize> {
        let cu = self.cu_seqlens.as_ref()?;
        Some(
            cu.windows(2)
                .position(|w| w[0] <= t && t < w[1])
                .unwrap_or(usize::MAX),
        )
    }
}

impl Visibility for TestMask {
    fn visible(&self, i: usize, j: usize) -> bool {
        if j > i {
            return false;
        }
        if let Some(w) = self.window {
            if i - j >= w {
                return false;
            }
        }
        if let Some(l) = self.len {
            if i >= l || j >= l {
                return false;
            }
        }
        if let Some(d) = &self.doc_ids {
            if d.get(i) != d.get(j) {
                return false;
            }
        }
        if self.cu_seqlens.is_some() && self.segment(i) != self.segment(j) {
            return false;
        }
        true
    }

    fn classify(&self, q0: usize, q1: usize, k0: usize, k1: usize) -> TileClass {
        assert!(
            q0 < q1 && k0 < k1,
            "classify called with an empty rectangle"
        );
        if !self.exact {
            return TileClass::Partial;
        }
        let mut any = false;
        let mut all = true;
        for i in q0..q1 {
            for j in k0..k1 {
                let v = self.visible(i, j);
                any |= v;
                all &= v;
            }
        }
        match (any, all) {
            (false, _) => TileClass::None,
            (true, true) => TileClass::All,
            _ => TileClass::Partial,
        }
    }

    fn key_range(&self, q0: usize, q1: usize) -> (usize, usize) {
        if !self.tight_range {
            return (0, q1);
        }
        let mut lo = usize::MAX;
        let mut hi = 0;
        for i in q0..q1 {
            for j in 0..=i {
                if self.visible(i, j) {
                    lo = lo.min(j);
                    hi = hi.max(j + 1);
                }
            }
        }
        if lo == usize::MAX {
            (0, 0)
        } else {
            (lo, hi)
        }
    }
}
