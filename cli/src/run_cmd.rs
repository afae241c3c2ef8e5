//! `attnrt run`: apply a checkpoint's layer to an input file.

use std::path::PathBuf;
use std::time::Instant;

use attnrt::{rope, Inputs, Layer, RopeTable};
use attnrt_cli::checkpoint::{write_output, CallInputs, TensorFile};
use attnrt_cli::config_json::parse_config;

use crate::forward::{self, Choice};
use crate::CliError;

struct Args {
    config: PathBuf,
    weights: PathBuf,
    input: PathBuf,
    output: PathBuf,
    threads: usize,
    backend: Choice,
}

fn parse_args(args: &[String]) -> Result<Args, CliError> {
    let (mut config, mut weights, mut input, mut output) = (None, None, None, None);
    let (mut threads, mut backend) = (1usize, Choice::Auto);
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let value = it
            .next()
            .ok_or_else(|| CliError::Input(format!("{flag} needs a value")))?;
        match flag.as_str() {
            "--config" => config = Some(PathBuf::from(value)),
            "--weights" => weights = Some(PathBuf::from(value)),
            "--input" => input = Some(PathBuf::from(value)),
            "--output" => output = Some(PathBuf::from(value)),
            "--threads" => {
                threads = value.parse().ok().filter(|&n| n > 0).ok_or_else(|| {
                    CliError::Input(format!("--threads {value:?}: expected a positive integer"))
                })?
            }
            "--backend" => {
                backend = Choice::parse(value).ok_or_else(|| {
                    CliError::Input(format!("--backend {value:?}: expected auto or reference"))
                })?
            }
            other => return Err(CliError::Input(format!("unknown flag {other:?}"))),
        }
    }
    let need =
        |v: Option<PathBuf>, f: &str| v.ok_or_else(|| CliError::Input(format!("missing {f}")));
    Ok(Args {
        config: need(config, "--config")?,
        weights: need(weights, "--weights")?,
        input: need(input, "--input")?,
        output: need(output, "--output")?,
        threads,
        backend,
    })
}

/// Runs the command.
pub fn run(raw: &[String]) -> Result<(), CliError> {
    let args = parse_args(raw)?;
    let text = std::fs::read_to_string(&args.config)
        .map_err(|e| CliError::Input(format!("{}: {e}", args.config.display())))?;
    let cfg = parse_config(&text).map_err(CliError::Input)?;
    let wfile = TensorFile::load(&args.weights).map_err(CliError::Input)?;
    let ifile = TensorFile::load(&args.input).map_err(CliError::Input)?;
    let weights = wfile.weights(&cfg).map_err(CliError::Input)?;
    let layer = Layer::new(cfg, weights).map_err(|e| CliError::Input(e.to_string()))?;
    let call = CallInputs::read(&ifile, &cfg).map_err(CliError::Input)?;
    let (mask, position_ids) = call.mask(&ifile).map_err(CliError::Input)?;

    // Without a caller table, build one from theta that covers every position of the call.
    let built;
    let table = match (cfg.rope(), &call.freqs_cis) {
        (None, Some(_)) => {
            return Err(CliError::Input(
                "freqs_cis given but the config has no rope".into(),
            ))
        }
        (None, None) => None,
        (Some(_), Some(t)) => Some(t.as_slice()),
        (Some(r), None) => {
            let max_pos = match position_ids {
                Some(p) => p.iter().map(|&v| v.max(0) as usize + 1).max().unwrap_or(1),
                None => call.seq_len.max(1),
            };
            let mut t = vec![0.0; rope::table_len(max_pos, cfg.head_dim)];
            rope::build_table(r, cfg.head_dim, &mut t)
                .map_err(|e| CliError::Input(e.to_string()))?;
            built = t;
            Some(built.as_slice())
        }
    };
    let rope_table = table
        .map(|t| RopeTable::new(t, cfg.head_dim))
        .transpose()
        .map_err(|e| CliError::Input(e.to_string()))?;
    let inputs = Inputs {
        x: &call.x,
        batch: call.batch,
        seq_len: call.seq_len,
        mask,
        position_ids,
        rope_table,
    };
    let mut ws =
        vec![
            0.0;
            forward::workspace_len(&layer, call.batch, call.seq_len, args.threads, args.backend)
        ];
    let mut y = vec![0.0; call.x.len()];
    let start = Instant::now();
    let backend = forward::forward(&layer, &inputs, &mut ws, &mut y, args.threads, args.backend)
        .map_err(|e| CliError::Input(e.to_string()))?;
    let secs = start.elapsed().as_secs_f64();
    write_output(&args.output, &y, [call.batch, call.seq_len, cfg.n_embd])
        .map_err(CliError::Other)?;
    println!(
        "backend {backend}; x [{}, {}, {}] -> {}; {:.3} ms",
        call.batch,
        call.seq_len,
        cfg.n_embd,
        args.output.display(),
        secs * 1e3
    );
    Ok(())
}
