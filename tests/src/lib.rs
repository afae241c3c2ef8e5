//! Shared helpers for the integration tests: loading the golden fixtures of `tests/fixtures`
//! (made by `tests/golden/make_golden.py`, see there how) and comparing outputs.

use std::path::{Path, PathBuf};

pub mod ffi_harness;

use attnrt::{rope, Config};
use attnrt_cli::checkpoint::{CallInputs, TensorFile};
use attnrt_cli::config_json::parse_config;

/// Max absolute error allowed against float64 golden data for f32 paths (SPEC.md, Precision).
pub const F32_TOL: f32 = 1e-4;

/// One golden case: its file, configuration, inputs and expected output.
pub struct Fixture {
    /// Case name (file stem).
    pub name: String,
    /// All tensors of the file.
    pub file: TensorFile,
    /// The layer configuration from the metadata.
    pub cfg: Config,
    /// `x`, shapes and the caller table, if any.
    pub inputs: CallInputs,
    /// The cos/sin table to pass: the file's `freqs_cis`, or one built from theta over
    /// `rope_max_pos` positions.
    pub table: Option<Vec<f32>>,
    /// Expected `y`.
    pub expected: Vec<f32>,
}

/// The folder of the golden fixtures.
pub fn fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

/// Every fixture, sorted by name.
pub fn load_all() -> Vec<Fixture> {
    let mut paths: Vec<_> = std::fs::read_dir(fixtures_dir())
        .expect("tests/fixtures exists")
        .map(|e| e.expect("readable dir entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    paths.sort();
    paths.iter().map(|p| load(p)).collect()
}

/// Loads one fixture.
pub fn load(path: &Path) -> Fixture {
    let file = TensorFile::load(path).unwrap();
    let cfg = parse_config(&file.metadata["config"]).unwrap();
    let inputs = CallInputs::read(&file, &cfg).unwrap();
    let table = match (cfg.rope(), &inputs.freqs_cis) {
        (None, _) => None,
        (Some(_), Some(t)) => Some(t.clone()),
        (Some(r), None) => {
            let max_pos: usize = file.metadata["rope_max_pos"].parse().unwrap();
            let mut t = vec![0.0; rope::table_len(max_pos, cfg.head_dim)];
            rope::build_table(r, cfg.head_dim, &mut t).unwrap();
            Some(t)
        }
    };
    let expected = file.tensors["y"].to_f32().unwrap();
    Fixture {
        name: path.file_stem().unwrap().to_string_lossy().into_owned(),
        file,
        cfg,
        inputs,
        table,
        expected,
    }
}

/// Max absolute difference of two equally long slices (NaN counts as infinite).
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| if x.is_nan() || y.is_nan() { f32::INFINITY } else { (x - y).abs() })
        .fold(0.0, f32::max)
}
