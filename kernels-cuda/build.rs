//! Compiles `kernels/*.cu` to PTX with a pinned nvcc 13.0 when the `cuda` feature is on, and
//! tells the linker where cuBLAS and NCCL are. Without the feature it does nothing.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    if env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let nvcc = find_nvcc();
    check_version(&nvcc);
    let out = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let dir = Path::new("kernels");
    for header in [
        "common.cuh",
        "attn_common.cuh",
        "wgmma.cuh",
        "decode_loads.cuh",
    ] {
        println!("cargo:rerun-if-changed=kernels/{header}");
    }
    println!("cargo:rerun-if-env-changed=ATTNRT_NVCC");
    println!("cargo:rerun-if-env-changed=ATTNRT_CUBLAS_LIB_DIR");
    // attention_sm90 uses wgmma, which exists only in the sm_90a ("architecture-specific")
    // PTX target; the driver loads that module on sm_90 devices only.
    for (name, arch) in [
        ("attention", "compute_90"),
        ("attention_sm90", "compute_90a"),
        ("rope_norm", "compute_90"),
        ("decode", "compute_90"),
        // Read-bandwidth probes of `bench --read-roofline` (the runtime does not load them).
        ("probe", "compute_90"),
    ] {
        let src = dir.join(format!("{name}.cu"));
        println!("cargo:rerun-if-changed={}", src.display());
        let ptx = out.join(format!("{name}.ptx"));
        let status = Command::new(&nvcc)
            .args([
                "-ptx",
                &format!("-arch={arch}"),
                "-O3",
                "-std=c++17",
                "-lineinfo",
            ])
            .arg(&src)
            .arg("-o")
            .arg(&ptx)
            .status()
            .unwrap_or_else(|e| panic!("attnrt-cuda: cannot run nvcc at {}: {e}", nvcc.display()));
        if !status.success() {
            panic!("attnrt-cuda: nvcc failed on {} ({status})", src.display());
        }
    }
    if let Some(dir) = env::var_os("ATTNRT_CUBLAS_LIB_DIR") {
        println!(
            "cargo:rustc-link-search=native={}",
            PathBuf::from(dir).display()
        );
    }
    for d in [
        "/usr/local/cuda/lib64",
        "/usr/local/cuda/targets/x86_64-linux/lib",
    ] {
        if Path::new(d).join("libcublas.so").exists() {
            println!("cargo:rustc-link-search=native={d}");
        }
    }
    println!("cargo:rustc-link-lib=dylib=cublas");
    // NCCL for the multi-GPU head split (libnccl.so next to libcublas.so in the link stub
    // directory; on the GPU machine libnccl.so.2 is in the loader's default path).
    println!("cargo:rustc-link-lib=dylib=nccl");
}

/// `$ATTNRT_NVCC`, else `nvcc` under `$CUDA_PATH/bin` or on `PATH`.
fn find_nvcc() -> PathBuf {
    if let Some(p) = env::var_os("ATTNRT_NVCC") {
        return PathBuf::from(p);
    }
    if let Some(root) = env::var_os("CUDA_PATH") {
        let p = PathBuf::from(root).join("bin/nvcc");
        if p.exists() {
            return p;
        }
    }
    if let Some(path) = env::var_os("PATH") {
        for d in env::split_paths(&path) {
            let p = d.join("nvcc");
            if p.exists() {
                return p;
            }
        }
    }
    panic!(
        "attnrt-cuda: feature `cuda` needs nvcc 13.0; none found (set ATTNRT_NVCC, or run \
         scripts/cuda-toolchain.sh and export what it prints)"
    );
}

/// The GPU machine's driver is CUDA 13.0: PTX from a newer nvcc carries an ISA it cannot load.
fn check_version(nvcc: &Path) {
    let out = Command::new(nvcc).arg("--version").output();
    let text = match out {
        Ok(o) => String::from_utf8_lossy(&o.stdout).into_owned(),
        Err(e) => panic!("attnrt-cuda: cannot run {}: {e}", nvcc.display()),
    };
    if !text.contains("release 13.0") {
        panic!(
            "attnrt-cuda: nvcc at {} is not release 13.0 (the pinned version):\n{text}",
            nvcc.display()
        );
    }
}
