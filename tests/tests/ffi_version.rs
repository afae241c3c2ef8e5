//! The header's version macros, the library's version string and Cargo.toml agree.

use std::ffi::CStr;
use std::path::Path;

fn workspace_version() -> String {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let ffi = std::fs::read_to_string(root.join("ffi/Cargo.toml")).unwrap();
    let text = if ffi.contains("version.workspace = true") {
        std::fs::read_to_string(root.join("Cargo.toml")).unwrap()
    } else {
        ffi
    };
    let line = text
        .lines()
        .find(|l| l.trim_start().starts_with("version =") && l.contains('"'))
        .expect("a version line");
    line.split('"').nth(1).unwrap().to_owned()
}

fn header_macro(header: &str, name: &str) -> u32 {
    let prefix = format!("#define {name} ");
    let line = header
        .lines()
        .find(|l| l.starts_with(&prefix))
        .unwrap_or_else(|| panic!("{name}"));
    line[prefix.len()..].trim().parse().unwrap()
}

#[test]
fn version_macros_match_cargo_toml() {
    let v = workspace_version();
    let parts: Vec<u32> = v.split('.').map(|p| p.parse().unwrap()).collect();
    let header = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../ffi/include/attnrt.h"),
    )
    .unwrap();
    assert_eq!(header_macro(&header, "ATTNRT_VERSION_MAJOR"), parts[0]);
    assert_eq!(header_macro(&header, "ATTNRT_VERSION_MINOR"), parts[1]);
    assert_eq!(header_macro(&header, "ATTNRT_VERSION_PATCH"), parts[2]);
    assert_eq!(
        [
            attnrt_ffi::ATTNRT_VERSION_MAJOR,
            attnrt_ffi::ATTNRT_VERSION_MINOR,
            attnrt_ffi::ATTNRT_VERSION_PATCH
        ],
        [parts[0], parts[1], parts[2]]
    );
    // SAFETY: a static NUL-terminated string.
    let s = unsafe { CStr::from_ptr(attnrt_ffi::attnrt_version()) };
    assert_eq!(s.to_str().unwrap(), v);
}

#[test]
fn header_declares_every_export() {
    let header = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../ffi/include/attnrt.h"),
    )
    .unwrap();
    for f in [
        "attnrt_version(",
        "attnrt_status_name(",
        "attnrt_error_message(",
        "attnrt_config_default(",
        "attnrt_layer_new(",
        "attnrt_layer_free(",
        "attnrt_workspace_size(",
        "attnrt_forward_args_init(",
        "attnrt_forward(",
        "attnrt_capability(",
        "attnrt_cpu_tier(",
        "attnrt_simd_tier_name(",
    ] {
        assert!(header.contains(f), "header lacks {f}");
    }
}
