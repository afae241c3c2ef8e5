//! Backend choice for the command: one place that maps `--backend` to an executor.

use attnrt::{Backend, Inputs, Layer};

/// Executors the command can be asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Choice {
    /// The fastest available on this machine.
    Auto,
    /// The scalar reference.
    Reference,
}

impl Choice {
    /// Parses `--backend`.
    pub fn parse(s: &str) -> Option<Choice> {
        match s {
            "auto" => Some(Choice::Auto),
            "reference" => Some(Choice::Reference),
            _ => None,
        }
    }
}

/// f32 workspace elements the chosen executor needs for rows of `seq_len` tokens.
pub fn workspace_len(layer: &Layer<'_>, seq_len: usize, _choice: Choice) -> usize {
    attnrt::workspace_len(layer.config(), seq_len)
}

/// Runs the layer on the chosen executor.
pub fn forward(
    layer: &Layer<'_>,
    inputs: &Inputs<'_>,
    ws: &mut [f32],
    out: &mut [f32],
    _threads: usize,
    choice: Choice,
) -> attnrt::Result<Backend> {
    match choice {
        Choice::Auto | Choice::Reference => layer.forward_reference(inputs, ws, out),
    }
}
