//! Installs the C ABI into a temporary prefix with `ffi/install.sh` (header, the static and
//! shared libraries this test was built with, pkg-config file, CMake package config), builds the
//! C++ example client (`ffi/examples/`) against that INSTALLED copy with CMake
//! (`find_package(attnrt)`), or with make + pkg-config when cmake is missing, plain and under
//! AddressSanitizer + UndefinedBehaviorSanitizer, and runs it on the golden fixture
//! `varlen.safetensors` (a packed varlen batch): the client checks its output against the
//! fixture's at 1e-4, on the library's threads and on its own std::thread pool (bitwise equal).
//!
//! Skipped, with the reason printed, when no C++ compiler or no static library is found; with
//! `ATTNRT_REQUIRE_CMAKE=1` (CI) a missing cmake is a failure, not a fallback.

use std::path::{Path, PathBuf};
use std::process::Command;

fn compiler() -> Option<String> {
    let candidates = [
        std::env::var("CXX").ok(),
        Some("g++".into()),
        Some("c++".into()),
    ];
    candidates.into_iter().flatten().find(|c| works(c))
}

fn works(tool: &str) -> bool {
    Command::new(tool)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// The folder holding `libattnrt_ffi.a` built with this test (cargo builds every crate type of
/// the dependency into the `deps` folder next to the test binary).
fn lib_dir() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let deps = exe.parent()?;
    [deps.to_path_buf(), deps.parent()?.to_path_buf()]
        .into_iter()
        .find(|d| d.join("libattnrt_ffi.a").exists())
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn run_checked(cmd: &mut Command, what: &str) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot start: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{text}",
        out.status
    );
    text
}

/// Installs into `prefix` with ffi/install.sh, from the libraries in `libs`.
fn install(prefix: &Path, libs: &Path) {
    run_checked(
        Command::new("bash")
            .arg(root().join("ffi/install.sh"))
            .arg(prefix)
            .env("ATTNRT_LIB_DIR", libs),
        "ffi/install.sh",
    );
    for f in [
        "include/attnrt.h",
        "lib/libattnrt_ffi.a",
        "lib/pkgconfig/attnrt.pc",
        "lib/cmake/attnrt/attnrtConfig.cmake",
        "lib/cmake/attnrt/attnrtConfigVersion.cmake",
    ] {
        assert!(prefix.join(f).exists(), "install.sh did not install {f}");
    }
}

/// Builds the client against the installed prefix; returns the executable.
fn build(cxx: &str, prefix: &Path, work: &Path, sanitize: bool, cmake: bool) -> PathBuf {
    let examples = root().join("ffi/examples");
    let dir = work.join(if sanitize { "build-san" } else { "build" });
    if cmake {
        run_checked(
            Command::new("cmake")
                .arg("-S")
                .arg(&examples)
                .arg("-B")
                .arg(&dir)
                .arg(format!("-DCMAKE_PREFIX_PATH={}", prefix.display()))
                .arg(format!("-DCMAKE_CXX_COMPILER={cxx}"))
                .arg(format!(
                    "-DATTNRT_SANITIZE={}",
                    if sanitize { "ON" } else { "OFF" }
                )),
            "cmake configure",
        );
        run_checked(
            Command::new("cmake").arg("--build").arg(&dir),
            "cmake --build",
        );
        dir.join("client")
    } else {
        std::fs::create_dir_all(&dir).unwrap();
        let exe = dir.join("client");
        run_checked(
            Command::new("make")
                .arg("-C")
                .arg(&examples)
                .arg("-B")
                .arg(format!("PREFIX={}", prefix.display()))
                .arg(format!("CXX={cxx}"))
                .arg(format!("SANITIZE={}", sanitize as u8))
                .arg(format!("OUT={}", exe.display())),
            "make",
        );
        exe
    }
}

fn run_client(exe: &Path, threads: usize) -> String {
    let fixture = root().join("tests/fixtures/varlen.safetensors");
    let out = Command::new(exe)
        .arg(&fixture)
        .arg(threads.to_string())
        .env("ASAN_OPTIONS", "detect_leaks=1:abort_on_error=1")
        .env("UBSAN_OPTIONS", "print_stacktrace=1:halt_on_error=1")
        .output()
        .expect("run the client");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "client failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    assert!(!stderr.contains("runtime error"), "UBSan: {stderr}");
    stdout
}

#[test]
fn cpp_client_against_the_installed_library_plain_and_sanitized() {
    let Some(cxx) = compiler() else {
        println!("SKIPPED: no C++ compiler (g++, c++ or $CXX) found");
        return;
    };
    let Some(libs) = lib_dir() else {
        println!("SKIPPED: libattnrt_ffi.a not found next to the test binary");
        return;
    };
    let cmake = works("cmake");
    if !cmake {
        assert!(
            std::env::var("ATTNRT_REQUIRE_CMAKE").map_or(true, |v| v != "1"),
            "ATTNRT_REQUIRE_CMAKE=1 but cmake is not installed"
        );
        println!("cmake not found: building with make + pkg-config instead");
    }
    let work = std::env::temp_dir().join(format!("attnrt_cpp_client_{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    let prefix = work.join("prefix");
    install(&prefix, &libs);
    for sanitize in [false, true] {
        let exe = build(&cxx, &prefix, &work, sanitize, cmake);
        for threads in [1, 3] {
            let stdout = run_client(&exe, threads);
            print!(
                "--- {cxx} via {} ({}, {threads} threads)\n{stdout}",
                if cmake { "cmake" } else { "make" },
                if sanitize { "ASan+UBSan" } else { "plain" }
            );
            for needle in [
                "backend 2\n",
                "bitwise identical",
                "forced CUDA: ATTNRT_STATUS_BACKEND_UNAVAILABLE",
                "bad cu_seqlens: ATTNRT_STATUS_INPUT_VALUE",
                "\nOK\n",
            ] {
                assert!(stdout.contains(needle), "no {needle:?} in:\n{stdout}");
            }
            let err: f64 = stdout
                .lines()
                .find_map(|l| l.strip_prefix("max abs err vs fixture "))
                .expect("an error line")
                .trim()
                .parse()
                .unwrap();
            assert!(err <= 1e-4, "client max abs err {err}");
        }
    }
    let _ = std::fs::remove_dir_all(&work);
}
