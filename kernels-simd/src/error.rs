//! The one error type of the slice-level kernels.

use core::fmt;

/// Why a kernel refused its arguments. Kernels validate everything before writing, so on error
/// the output buffers are untouched.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ShapeError {
    /// A slice is shorter than the shape requires.
    TooShort {
        /// Which argument.
        what: &'static str,
        /// Elements the shape requires.
        needed: usize,
        /// Elements the slice has.
        got: usize,
    },
    /// A size or index argument is out of its allowed range (zero head dim, odd RoPE dim, ...).
    Invalid {
        /// Which argument, and the rule it breaks.
        what: &'static str,
        /// The offending value.
        value: usize,
    },
    /// The shape's element count does not fit in `usize`.
    Overflow {
        /// Which product overflowed.
        what: &'static str,
    },
}

impl fmt::Display for ShapeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::TooShort { what, needed, got } => {
                write!(f, "{what}: needs {needed} elements, slice has {got}")
            }
            Self::Invalid { what, value } => write!(f, "invalid {what}: {value}"),
            Self::Overflow { what } => write!(f, "{what}: size overflows usize"),
        }
    }
}

#[cfg(feature = "std")]
impl std::error::Error for ShapeError {}

/// `a * b`, or an overflow error naming `what`.
pub(crate) fn mul(a: usize, b: usize, what: &'static str) -> Result<usize, ShapeError> {
    a.checked_mul(b).ok_or(ShapeError::Overflow { what })
}

/// `a + b`, or an overflow error naming `what`.
pub(crate) fn add(a: usize, b: usize, what: &'static str) -> Result<usize, ShapeError> {
    a.checked_add(b).ok_or(ShapeError::Overflow { what })
}

/// Errors unless `got >= needed`.
pub(crate) fn need(what: &'static str, needed: usize, got: usize) -> Result<(), ShapeError> {
    if got < needed {
        Err(ShapeError::TooShort { what, needed, got })
    } else {
        Ok(())
    }
}
