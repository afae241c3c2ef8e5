//! The one error type of the runtime: every rejection names the offending field and values.

use core::fmt;

/// Why a configuration, a set of weights or a forward call was rejected.
///
/// Nothing is written to the caller's output when any of these is returned.
#[derive(Clone, Copy, Debug, PartialEq)]
#[non_exhaustive]
pub enum Error {
    /// A configuration field breaks its own rule (`n_head` 0, `rmsnorm_eps` not > 0, ...).
    Config {
        /// The field, as named in SPEC.md.
        field: &'static str,
        /// Its value.
        value: i64,
        /// The rule it breaks.
        rule: &'static str,
    },
    /// A floating-point configuration field breaks its rule (`rmsnorm_eps` <= 0, NaN theta, ...).
    ConfigFloat {
        /// The field, as named in SPEC.md.
        field: &'static str,
        /// Its value.
        value: f64,
        /// The rule it breaks.
        rule: &'static str,
    },
    /// Two configuration fields do not fit together (`n_embd` not divisible by `n_head`, ...).
    ConfigPair {
        /// The first field.
        field: &'static str,
        /// Its value.
        value: i64,
        /// The second field.
        other: &'static str,
        /// Its value.
        other_value: i64,
        /// The rule the pair breaks.
        rule: &'static str,
    },
    /// A weight tensor has the wrong number of elements for the configuration.
    WeightShape {
        /// The tensor (`wq`, `bo`, `q_norm`, ...).
        name: &'static str,
        /// Elements the configuration requires.
        expected: usize,
        /// Elements given.
        actual: usize,
    },
    /// A tensor was given that the configuration has no use for (a `q_norm` weight without
    /// QK-norm), or one it needs is missing.
    WeightPresence {
        /// The tensor.
        name: &'static str,
        /// Whether the configuration requires it.
        required: bool,
    },
    /// Bytes could not be viewed as the element type (length not a multiple of the element
    /// size, or misaligned start).
    Bytes {
        /// The tensor being viewed.
        name: &'static str,
        /// Byte length given.
        len: usize,
        /// The element size in bytes.
        elem_size: usize,
    },
    /// An input or output buffer has the wrong length for the shapes of the call.
    InputShape {
        /// The buffer (`x`, `out`, `seq_lens`, `document_ids`, `cu_seqlens`, ...).
        name: &'static str,
        /// Elements required.
        expected: usize,
        /// Elements given.
        actual: usize,
    },
    /// A value inside an input is out of its allowed range.
    InputValue {
        /// The input (`seq_lens`, `cu_seqlens`, `position_ids`, `max_seqlen`, ...).
        name: &'static str,
        /// Flat index of the offending element.
        index: usize,
        /// The value found.
        value: i64,
        /// The rule it breaks.
        rule: &'static str,
    },
    /// A rotary position at or past the end of the cos/sin table.
    PositionOutOfTable {
        /// Flat index into the tokens of the call.
        index: usize,
        /// The position.
        position: i64,
        /// Positions the table holds.
        table_len: usize,
    },
    /// The caller's workspace is too small.
    Workspace {
        /// f32 elements required.
        needed: usize,
        /// f32 elements given.
        actual: usize,
    },
    /// The request is valid but the chosen backend cannot serve it.
    Unsupported {
        /// What is missing.
        what: &'static str,
    },
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Error::Config { field, value, rule } => {
                write!(f, "invalid config: {field} = {value}: {rule}")
            }
            Error::ConfigFloat { field, value, rule } => {
                write!(f, "invalid config: {field} = {value}: {rule}")
            }
            Error::ConfigPair { field, value, other, other_value, rule } => write!(
                f,
                "invalid config: {field} = {value} with {other} = {other_value}: {rule}"
            ),
            Error::WeightShape { name, expected, actual } => write!(
                f,
                "weight {name} has {actual} elements, the config requires {expected}"
            ),
            Error::WeightPresence { name, required: true } => {
                write!(f, "weight {name} is required by the config but missing")
            }
            Error::WeightPresence { name, required: false } => {
                write!(f, "weight {name} was given but the config has no use for it")
            }
            Error::Bytes { name, len, elem_size } => write!(
                f,
                "{name}: {len} bytes cannot be viewed as {elem_size}-byte elements (length or alignment)"
            ),
            Error::InputShape { name, expected, actual } => write!(
                f,
                "input {name} has {actual} elements, the call's shapes require {expected}"
            ),
            Error::InputValue { name, index, value, rule } => {
                write!(f, "input {name}[{index}] = {value}: {rule}")
            }
            Error::PositionOutOfTable { index, position, table_len } => write!(
                f,
                "position {position} of token {index} is outside the rotary table of {table_len} positions"
            ),
            Error::Workspace { needed, actual } => write!(
                f,
                "workspace holds {actual} f32 elements, this call needs {needed}"
            ),
            Error::Unsupported { what } => write!(f, "unsupported: {what}"),
        }
    }
}

/// Shorthand for results of this crate.
pub type Result<T> = core::result::Result<T, Error>;
