//! `attnrt`: run the attention layer on a built-in default or a checkpoint's weights.
//!
//! Exit codes: 0 success, 2 bad input (a one-line message on stderr, no output file written),
//! 1 any other failure.

mod bench;
mod bench_decode;
mod bench_validate;
mod default_job;
mod forward;
mod run_cmd;

use std::process::ExitCode;

const USAGE: &str = "usage:
  attnrt                       run the built-in default job (Llama-3-8B-shaped layer, packed batch)
  attnrt run --config layer.json --weights w.safetensors --input in.safetensors --output out.safetensors
             [--threads N] [--backend auto|reference]
  attnrt bench [--quick] [--json out.json]
                               CPU benchmark (ratios to a scalar baseline and the FMA peak, same run)
  attnrt bench decode [--quick]
                               KV-cache decode benchmark (cache read GB/s vs measured stream read)
  attnrt bench validate [--quick]
                               host cost of a decode call's block-table check (fresh vs kept marks)
  attnrt help";

/// A failure of the command: user errors exit with 2, others with 1.
pub enum CliError {
    /// Bad arguments, files, shapes or configuration.
    Input(String),
    /// Anything else.
    Other(String),
}

fn main() -> ExitCode {
    if let Err(e) = attnrt_simd::init_from_env() {
        eprintln!("attnrt: error: {e}");
        return ExitCode::from(2);
    }
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        None => default_job::run(),
        Some("run") => run_cmd::run(&args[1..]),
        Some("bench") => bench::run(&args[1..]),
        Some("help" | "--help" | "-h") => {
            println!("{USAGE}");
            Ok(())
        }
        Some(other) => Err(CliError::Input(format!(
            "unknown command {other:?}\n{USAGE}"
        ))),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(CliError::Input(msg)) => {
            eprintln!("attnrt: error: {msg}");
            ExitCode::from(2)
        }
        Err(CliError::Other(msg)) => {
            eprintln!("attnrt: error: {msg}");
            ExitCode::from(1)
        }
    }
}
