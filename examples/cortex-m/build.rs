//! Writes the layer's weights and input (see `layer/gen.rs`) into `OUT_DIR/layer.bin`, which
//! `src/main.rs` keeps in flash with `include_bytes!`, and puts `memory.x` on the link path.

use std::{env, fs, path::PathBuf};

#[allow(dead_code)]
#[path = "layer/gen.rs"]
mod gen;

fn main() {
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let mut blob = vec![0u8; gen::BLOB_LEN];
    gen::write_blob(&mut blob);
    fs::write(out.join("layer.bin"), &blob).expect("write layer.bin");
    fs::copy("memory.x", out.join("memory.x")).expect("copy memory.x");
    println!("cargo:rustc-link-search={}", out.display());
    if env::var_os("CARGO_FEATURE_DEFMT").is_some() {
        println!("cargo:rustc-link-arg=-Tdefmt.x");
    }
    println!("cargo:rerun-if-changed=layer/gen.rs");
    println!("cargo:rerun-if-changed=memory.x");
    println!("cargo:rerun-if-changed=build.rs");
}
