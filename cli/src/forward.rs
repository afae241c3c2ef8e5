//! Backend choice for the command: one place that maps `--backend` to an executor.

use attnrt::{Backend, Inputs, Layer, ScopedThreads};

/// Executors the command can be asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Choice {
    /// The fastest available on this machine: the SIMD CPU executor on the detected tier.
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

/// f32 workspace elements the chosen executor needs for `batch` rows of `seq_len` tokens.
pub fn workspace_len(
    layer: &Layer<'_>,
    batch: usize,
    seq_len: usize,
    threads: usize,
    choice: Choice,
) -> usize {
    match choice {
        Choice::Auto => attnrt::cpu_workspace_len(layer.config(), batch * seq_len, threads),
        Choice::Reference => attnrt::reference_workspace_len(layer.config(), seq_len),
    }
}

/// Runs the layer on the chosen executor.
pub fn forward(
    layer: &Layer<'_>,
    inputs: &Inputs<'_>,
    ws: &mut [f32],
    out: &mut [f32],
    threads: usize,
    choice: Choice,
) -> attnrt::Result<Backend> {
    match choice {
        Choice::Auto => layer.forward_cpu(inputs, ws, out, &ScopedThreads { threads }),
        Choice::Reference => layer.forward_reference(inputs, ws, out),
    }
}
