//! The interface between attention kernels and whatever decides which keys a query sees.

/// How much of a (query tile, key tile) rectangle is visible.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TileClass {
    /// No query of the tile sees any key of the tile: the kernel skips it without loading K/V.
    None,
    /// Some pairs are visible and some not: the kernel asks [`Visibility::visible`] per element.
    Partial,
    /// Every query of the tile sees every key of the tile: no per-element mask work.
    All,
}

/// Which key a query of one sequence (batch row) may attend to.
///
/// Indices are token indices inside the row. Implementations must be consistent: `classify`
/// returns `All` only if `visible` holds for every pair of the rectangle and `None` only if it
/// holds for none; `Partial` is always a correct (if slower) answer.
pub trait Visibility {
    /// Whether query `i` sees key `j`.
    fn visible(&self, i: usize, j: usize) -> bool;

    /// Classifies the rectangle of queries `q0..q1` and keys `k0..k1` (both non-empty).
    fn classify(&self, q0: usize, q1: usize, k0: usize, k1: usize) -> TileClass;

    /// A half-open range of keys outside which no query of `q0..q1` sees anything. Kernels
    /// iterate key tiles only inside it; the default is every key up to the last query (causal).
    fn key_range(&self, _q0: usize, q1: usize) -> (usize, usize) {
        (0, q1)
    }
}
