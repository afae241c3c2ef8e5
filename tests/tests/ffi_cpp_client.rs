//! Builds the C++ example client (ffi/examples/client.cpp) against the header and the static
//! library, plain and under AddressSanitizer + UndefinedBehaviorSanitizer, runs it, and checks
//! its checksum against the same call made here through the ABI. Skipped, with the reason
//! printed, when no C++ compiler or no static library is found.

use std::path::{Path, PathBuf};
use std::process::Command;

use attnrt_ffi::*;
use attnrt_tests::ffi_harness::{forward, last_error, CallBuffers, LayerHandle};

fn compiler() -> Option<String> {
    let candidates = [
        std::env::var("CXX").ok(),
        Some("g++".into()),
        Some("c++".into()),
    ];
    candidates.into_iter().flatten().find(|c| {
        Command::new(c)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    })
}

/// `libattnrt_ffi.a` built with this test (cargo builds every crate type of the dependency
/// into the `deps` folder next to the test binary).
fn staticlib() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let deps = exe.parent()?;
    [
        deps.join("libattnrt_ffi.a"),
        deps.parent()?.join("libattnrt_ffi.a"),
    ]
    .into_iter()
    .find(|p| p.exists())
}

fn build_and_run(cxx: &str, lib: &Path, sanitize: bool) -> String {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = std::env::temp_dir().join(format!(
        "attnrt_client_{}{}",
        std::process::id(),
        if sanitize { "_asan" } else { "" }
    ));
    let mut cmd = Command::new(cxx);
    cmd.args(["-std=c++17", "-Wall", "-Wextra", "-Werror", "-g"])
        .arg("-I")
        .arg(root.join("ffi/include"))
        .arg(root.join("ffi/examples/client.cpp"));
    if sanitize {
        cmd.args([
            "-fsanitize=address,undefined",
            "-fno-omit-frame-pointer",
            "-fno-sanitize-recover=all",
        ]);
    }
    cmd.arg(lib)
        .args(["-lpthread", "-ldl", "-lm"])
        .arg("-o")
        .arg(&out);
    let built = cmd.output().expect("run the compiler");
    assert!(
        built.status.success(),
        "compile failed:\n{}",
        String::from_utf8_lossy(&built.stderr)
    );
    let run = Command::new(&out)
        .env("ASAN_OPTIONS", "detect_leaks=1:abort_on_error=1")
        .env("UBSAN_OPTIONS", "print_stacktrace=1:halt_on_error=1")
        .output()
        .expect("run the client");
    let stdout = String::from_utf8_lossy(&run.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&run.stderr);
    let _ = std::fs::remove_file(&out);
    assert!(
        run.status.success(),
        "client failed ({}):\n{stdout}\n{stderr}",
        run.status
    );
    assert!(!stderr.contains("runtime error"), "UBSan: {stderr}");
    stdout
}

/// The client's layer and call, made here through the ABI: (sum, sum of |y|).
fn expected_checksum() -> (f64, f64) {
    let fill = |n: usize, k: usize| -> Vec<f32> {
        (0..n)
            .map(|i| ((i * 37 + k * 11) % 101) as f32 / 101.0 - 0.5)
            .collect()
    };
    let (c, h, kv, d, t) = (32, 4, 2, 8, 12);
    let mut cfg = std::mem::MaybeUninit::uninit();
    // SAFETY: valid for one write.
    assert_eq!(
        unsafe { attnrt_config_default(c, h, cfg.as_mut_ptr()) },
        attnrt_status::ATTNRT_STATUS_OK
    );
    // SAFETY: written above.
    let mut cfg: attnrt_config = unsafe { cfg.assume_init() };
    cfg.n_kv_head = kv;
    cfg.head_dim = d;
    cfg.rope = 1;
    cfg.rope_convention = attnrt_rope_convention::ATTNRT_ROPE_CONVENTION_HALF_SPLIT as u32;
    cfg.sliding_window = 6;
    let ws: Vec<Vec<f32>> = vec![
        fill(h * d * c, 1),
        fill(kv * d * c, 2),
        fill(kv * d * c, 3),
        fill(c * h * d, 4),
    ];
    let v = |i: usize| attnrt_tensor {
        data: ws[i].as_ptr().cast(),
        len: ws[i].len(),
        dtype: attnrt_dtype::ATTNRT_DTYPE_F32 as u32,
    };
    let none = attnrt_tests::ffi_harness::absent();
    let w = attnrt_weights {
        wq: v(0),
        wk: v(1),
        wv: v(2),
        wo: v(3),
        bq: none,
        bk: none,
        bv: none,
        bo: none,
        q_norm: none,
        k_norm: none,
    };
    let layer = LayerHandle::new(&cfg, &w);
    let mut call = CallBuffers {
        x: fill(t * c, 5),
        batch: 1,
        seq_len: t,
        seq_lens: None,
        document_ids: None,
        cu_seqlens: Some(vec![0, 5, 9, 12]),
        max_seqlen: 5,
        position_ids: None,
        freqs_cis: None,
        workspace: vec![0.0; layer.workspace_size(1, t, 1)],
        out: vec![0.0; t * c],
        num_threads: 1,
    };
    let (st, _) = forward(&layer, &call.args());
    assert_eq!(st, attnrt_status::ATTNRT_STATUS_OK, "{}", last_error());
    (
        call.out.iter().map(|&y| y as f64).sum(),
        call.out.iter().map(|&y| y.abs() as f64).sum(),
    )
}

fn checksum(stdout: &str) -> (f64, f64) {
    let line = stdout
        .lines()
        .find(|l| l.starts_with("checksum "))
        .expect("a checksum line");
    let v: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .map(|s| s.parse().unwrap())
        .collect();
    (v[0], v[1])
}

#[test]
fn cpp_client_plain_and_sanitized() {
    let Some(cxx) = compiler() else {
        println!("SKIPPED: no C++ compiler (g++, c++ or $CXX) found");
        return;
    };
    let Some(lib) = staticlib() else {
        println!("SKIPPED: libattnrt_ffi.a not found next to the test binary");
        return;
    };
    let want = expected_checksum();
    for sanitize in [false, true] {
        let stdout = build_and_run(&cxx, &lib, sanitize);
        print!(
            "--- {} ({})\n{stdout}",
            cxx,
            if sanitize { "ASan+UBSan" } else { "plain" }
        );
        assert!(stdout.contains("backend 2\n"), "{stdout}");
        assert!(
            stdout.contains("forced CUDA: ATTNRT_STATUS_BACKEND_UNAVAILABLE"),
            "{stdout}"
        );
        assert!(
            stdout.contains("bad cu_seqlens: ATTNRT_STATUS_INPUT_VALUE"),
            "{stdout}"
        );
        let got = checksum(&stdout);
        assert!(
            (got.0 - want.0).abs() < 1e-5 && (got.1 - want.1).abs() < 1e-5,
            "{got:?} vs {want:?}"
        );
    }
}
