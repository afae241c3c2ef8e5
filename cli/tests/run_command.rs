//! `attnrt run` end to end: a golden fixture through the command, and every bad input is a
//! one-line error with exit code 2 and no output file.

use std::path::{Path, PathBuf};
use std::process::Command;

use attnrt_cli::checkpoint::TensorFile;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures")
        .join(format!("{name}.safetensors"))
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("attnrt-cli-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn attnrt(args: &[&Path]) -> std::process::Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_attnrt"));
    cmd.arg("run");
    for pair in args.chunks(2) {
        cmd.arg(pair[0]).arg(pair[1]);
    }
    cmd.output().unwrap()
}

/// Runs `attnrt run` with the fixture as both weights and input file.
fn run_case(
    dir: &Path,
    config: &str,
    weights: &Path,
    input: &Path,
) -> (std::process::Output, PathBuf) {
    let cfg = dir.join("layer.json");
    std::fs::write(&cfg, config).unwrap();
    let out = dir.join("out.safetensors");
    let _ = std::fs::remove_file(&out);
    let o = attnrt(&[
        Path::new("--config"),
        &cfg,
        Path::new("--weights"),
        weights,
        Path::new("--input"),
        input,
        Path::new("--output"),
        &out,
    ]);
    (o, out)
}

#[test]
fn golden_fixture_through_the_command() {
    for name in ["everything", "rope_caller_table", "varlen", "weights_bf16"] {
        let path = fixture(name);
        let file = TensorFile::load(&path).unwrap();
        let dir = scratch(name);
        let (o, out) = run_case(&dir, &file.metadata["config"], &path, &path);
        assert!(
            o.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let y = TensorFile::load(&out).unwrap().tensors["y"]
            .to_f32()
            .unwrap();
        let want = file.tensors["y"].to_f32().unwrap();
        let err = y
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(err <= 1e-4, "{name}: {err}");
    }
}

fn expect_input_error(dir: &Path, config: &str, weights: &Path, input: &Path, needle: &str) {
    let (o, out) = run_case(dir, config, weights, input);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{needle}: {stderr}");
    assert_eq!(stderr.lines().count(), 1, "not one line: {stderr}");
    assert!(stderr.contains(needle), "{stderr:?} lacks {needle:?}");
    assert!(!out.exists(), "{needle}: output written");
}

/// Writes a copy of a fixture without one tensor, or with one replaced.
fn edited(
    dir: &Path,
    src: &Path,
    drop: &str,
    replace: Option<(&str, safetensors::Dtype, Vec<usize>, Vec<u8>)>,
) -> PathBuf {
    let bytes = std::fs::read(src).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut views: Vec<(String, safetensors::tensor::TensorView<'_>)> = st
        .tensors()
        .into_iter()
        .filter(|(n, _)| n != drop)
        .collect();
    let owned;
    if let Some((name, dtype, shape, data)) = replace {
        owned = data;
        views.retain(|(n, _)| n != name);
        views.push((
            name.to_string(),
            safetensors::tensor::TensorView::new(dtype, shape, &owned).unwrap(),
        ));
    }
    let path = dir.join(format!("edited-{drop}.safetensors"));
    safetensors::serialize_to_file(views, &None, &path).unwrap();
    path
}

#[test]
fn bad_inputs_exit_2_without_output() {
    let path = fixture("everything");
    let file = TensorFile::load(&path).unwrap();
    let cfg = file.metadata["config"].clone();
    let dir = scratch("bad");
    let no_wq = edited(&dir, &path, "wq", None);
    expect_input_error(&dir, &cfg, &no_wq, &path, "missing tensor wq");
    let bad_shape = edited(
        &dir,
        &path,
        "_",
        Some(("bo", safetensors::Dtype::F32, vec![3], vec![0; 12])),
    );
    expect_input_error(&dir, &cfg, &bad_shape, &path, "tensor bo: shape [3]");
    let bad_dtype = edited(
        &dir,
        &path,
        "-",
        Some((
            "wk",
            safetensors::Dtype::I32,
            vec![32, 64],
            vec![0; 32 * 64 * 4],
        )),
    );
    expect_input_error(&dir, &cfg, &bad_dtype, &path, "tensor wk: integer dtype");
    let bad_ids = edited(
        &dir,
        &path,
        "~",
        Some((
            "seq_lens",
            safetensors::Dtype::I32,
            vec![2],
            [99i32, 1].iter().flat_map(|v| v.to_le_bytes()).collect(),
        )),
    );
    expect_input_error(&dir, &cfg, &path, &bad_ids, "seq_lens[0] = 99");
    expect_input_error(
        &dir,
        r#"{"n_embd": 64, "n_head": 3}"#,
        &path,
        &path,
        "n_embd = 64 with n_head = 3",
    );
    expect_input_error(&dir, "{not json", &path, &path, "config JSON");
    expect_input_error(
        &dir,
        &cfg,
        Path::new("/nonexistent.safetensors"),
        &path,
        "/nonexistent.safetensors",
    );
}

#[test]
fn bench_quick_prints_a_table_and_json() {
    let dir = scratch("bench");
    let json = dir.join("bench.json");
    let o = Command::new(env!("CARGO_BIN_EXE_attnrt"))
        .args(["bench", "--quick", "--json"])
        .arg(&json)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let table = String::from_utf8_lossy(&o.stdout);
    assert_eq!(
        table
            .lines()
            .filter(|l| l.starts_with("| T=4096 window 512"))
            .count(),
        4,
        "{table}"
    );
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let rows = v["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 20);
    assert!(rows
        .iter()
        .all(|r| r["proj_vs_scalar"].as_f64().unwrap() > 0.0));
}

#[test]
fn bench_decode_quick_prints_a_table() {
    let o = Command::new(env!("CARGO_BIN_EXE_attnrt"))
        .args(["bench", "decode", "--quick"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let table = String::from_utf8_lossy(&o.stdout);
    assert_eq!(
        table.lines().filter(|l| l.contains(" cached | ")).count(),
        4,
        "{table}"
    );
}

#[test]
fn bench_validate_quick_prints_a_table() {
    let o = Command::new(env!("CARGO_BIN_EXE_attnrt"))
        .args(["bench", "validate", "--quick"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let table = String::from_utf8_lossy(&o.stdout);
    // One row per pool size, each with both timings and their ratio.
    let rows: Vec<&str> = table.lines().filter(|l| l.ends_with("x |")).collect();
    assert_eq!(rows.len(), 4, "{table}");
    let bad = Command::new(env!("CARGO_BIN_EXE_attnrt"))
        .args(["bench", "validate", "--slow"])
        .output()
        .unwrap();
    assert_eq!(
        bad.status.code(),
        Some(2),
        "an unknown flag is an input error"
    );
}
