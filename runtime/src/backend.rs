//! Which executor ran a forward call: reported on every call, never guessed.

use core::fmt;

/// The executor that produced an output.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[non_exhaustive]
pub enum Backend {
    /// The scalar reference of [`crate::Layer::forward_reference`].
    Reference,
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Backend::Reference => f.write_str("scalar-reference"),
        }
    }
}
