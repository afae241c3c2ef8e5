//! The file formats of the `attnrt` command, shared with the integration tests: the layer
//! configuration JSON and the safetensors layout of weights, inputs and outputs (README.md,
//! "File formats").
#![deny(missing_docs)]

pub mod checkpoint;
pub mod config_json;
pub mod synth;
