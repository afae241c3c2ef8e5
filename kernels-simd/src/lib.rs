//! SIMD numeric primitives for attnrt.
//!
//! The crate knows nothing of layer configurations: it works on slices, and learns which keys a
//! query may see through the [`Visibility`] trait, which the runtime's mask descriptor implements.
#![cfg_attr(not(test), no_std)]
#![deny(missing_docs)]

mod visibility;

pub use visibility::{TileClass, Visibility};
