//! The Cortex-M4F firmware of `examples/cortex-m` against the host: builds it, runs it under
//! QEMU (`mps2-an386`) and compares every printed output value with the same layer (same
//! definition, same generated weights and input) run here through `attnrt`.
//!
//! Needs the `thumbv7em-none-eabihf` target and `qemu-system-arm`; without them the test says
//! it is skipped and why, unless `ATTNRT_REQUIRE_QEMU=1`, where a missing tool fails it (CI).

use std::path::{Path, PathBuf};
use std::process::Command;

use attnrt::Layer;
use attnrt_tests::{max_abs_diff, F32_TOL};

#[allow(dead_code)]
#[path = "../../examples/cortex-m/layer/layer.rs"]
mod layer;

use layer::gen;

const TARGET: &str = "thumbv7em-none-eabihf";

fn firmware_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/cortex-m")
}

/// The layer on the host, from the blob the firmware's `build.rs` writes, rebuilt in memory.
fn host_output() -> Vec<f32> {
    assert_eq!(gen::BLOB_LEN % 4, 0);
    let mut words = vec![0u32; gen::BLOB_LEN / 4]; // u32 words: the 4-byte alignment of flash
    gen::write_blob(bytemuck::cast_slice_mut(&mut words));
    let blob: &[u8] = bytemuck::cast_slice(&words);
    let mut table = vec![0.0; layer::ROPE_TABLE_LEN];
    let table = layer::rope_table(&mut table).unwrap();
    let l = Layer::new(layer::CFG, layer::weights(blob).unwrap()).unwrap();
    let mut ws = vec![0.0; layer::WORKSPACE_LEN];
    let mut y = vec![f32::NAN; layer::OUT_LEN];
    l.forward_reference(
        &layer::inputs(layer::x(blob).unwrap(), table),
        &mut ws,
        &mut y,
    )
    .unwrap();
    y
}

/// Why the firmware cannot be built and run here, if it cannot.
fn missing_tool() -> Option<String> {
    let qemu = Command::new("qemu-system-arm").arg("--version").output();
    if !qemu.is_ok_and(|o| o.status.success()) {
        return Some("qemu-system-arm is not installed (apt-get install qemu-system-arm)".into());
    }
    let sysroot = Command::new("rustc")
        .args(["--print", "sysroot"])
        .output()
        .ok()?;
    let sysroot = String::from_utf8_lossy(&sysroot.stdout).trim().to_string();
    if !Path::new(&sysroot)
        .join("lib/rustlib")
        .join(TARGET)
        .join("lib")
        .is_dir()
    {
        return Some(format!(
            "the {TARGET} target is not installed (rustup target add {TARGET})"
        ));
    }
    None
}

/// Builds the firmware (release) into its own target folder and returns the ELF.
fn build_firmware() -> PathBuf {
    let target_dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("cortex-m");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(cargo)
        .current_dir(firmware_dir())
        .args(["build", "--release", "--target", TARGET, "--target-dir"])
        .arg(&target_dir)
        .env_remove("CARGO_TARGET_DIR")
        .status()
        .expect("cargo runs");
    assert!(status.success(), "firmware build failed: {status}");
    target_dir.join(TARGET).join("release/attnrt-cortex-m")
}

/// Runs the ELF under QEMU with a 60 s timeout and returns its standard output.
fn run_qemu(elf: &Path) -> String {
    let out = Command::new("timeout")
        .args([
            "60",
            "qemu-system-arm",
            "-cpu",
            "cortex-m4",
            "-machine",
            "mps2-an386",
        ])
        .args([
            "-nographic",
            "-semihosting-config",
            "enable=on,target=native",
            "-kernel",
        ])
        .arg(elf)
        .output()
        .expect("timeout and qemu-system-arm run");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "qemu exited with {} (124: timed out)\nstdout:\n{stdout}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// The values after `prefix` on the first line that starts with it.
fn line_values(stdout: &str, prefix: &str) -> Vec<f32> {
    let line = stdout
        .lines()
        .find(|l| l.starts_with(prefix))
        .unwrap_or_else(|| {
            panic!("no line starting with {prefix:?} in the firmware output:\n{stdout}")
        });
    line[prefix.len()..]
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect()
}

/// Every `y[i]: v v v ...` line, in order, checking that the indices follow on.
fn printed_output(stdout: &str) -> Vec<f32> {
    let mut y = Vec::new();
    for line in stdout.lines().filter(|l| l.starts_with("y[")) {
        let (index, values) = line[2..].split_once("]: ").expect("y[i]: values");
        assert_eq!(index.parse::<usize>().unwrap(), y.len(), "line {line:?}");
        y.extend(values.split_whitespace().map(|v| v.parse::<f32>().unwrap()));
    }
    y
}

#[test]
fn firmware_output_matches_the_host() {
    if let Some(why) = missing_tool() {
        if std::env::var_os("ATTNRT_REQUIRE_QEMU").is_some_and(|v| v == "1") {
            panic!("ATTNRT_REQUIRE_QEMU=1 but {why}");
        }
        println!("skipped: {why}");
        return;
    }
    let stdout = run_qemu(&build_firmware());
    println!(
        "{}",
        stdout
            .lines()
            .filter(|l| !l.starts_with("y["))
            .collect::<Vec<_>>()
            .join("\n")
    );

    assert!(
        stdout.lines().any(|l| l == "backend: scalar-reference"),
        "{stdout}"
    );
    assert!(stdout.lines().any(|l| l == "done"), "{stdout}");
    let arena = format!("arena: workspace {} f32", layer::WORKSPACE_LEN);
    assert!(stdout.contains(&arena), "{stdout}");

    let host = host_output();
    let device = printed_output(&stdout);
    assert_eq!(device.len(), host.len(), "values printed");
    let err = max_abs_diff(&device, &host);
    let identical = device
        .iter()
        .zip(&host)
        .all(|(a, b)| a.to_bits() == b.to_bits());
    println!(
        "device vs host: max abs diff {err:.2e} over {} values, bit-identical: {identical}",
        host.len()
    );
    assert!(err <= F32_TOL, "max abs diff {err}");

    let (sum, abs) = layer::checksum(&host);
    let printed = line_values(&stdout, "checksum: sum ");
    let (dsum, dabs) = (printed[0], *printed.last().unwrap());
    let tol = F32_TOL * host.len() as f32;
    assert!(
        (dsum - sum).abs() <= tol && (dabs - abs).abs() <= tol,
        "checksum {dsum} {dabs} vs {sum} {abs}"
    );
    let first4 = line_values(&stdout, "first4: ");
    assert!(
        first4.len() == 4 && max_abs_diff(&first4, &host[..4]) <= F32_TOL,
        "first4 {first4:?}"
    );
}
