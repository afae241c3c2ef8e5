//! Replays the fuzz corpus of the C ABI (`ffi/fuzz/corpus/abi/`) on stable, through the very
//! harness the libFuzzer target runs (`ffi/fuzz/src/exercise.rs`, compiled in here unchanged):
//! every input must run without a crash, a panic status, or an output written on error.

use std::collections::BTreeMap;
use std::path::Path;

#[path = "../../ffi/fuzz/src/exercise.rs"]
mod exercise;

#[test]
fn replay_the_fuzz_corpus() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../ffi/fuzz/corpus/abi");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    assert!(files.len() >= 10, "only {} corpus files", files.len());
    let start = std::time::Instant::now();
    let mut statuses: BTreeMap<String, usize> = BTreeMap::new();
    for f in &files {
        let data = std::fs::read(f).unwrap();
        let name = f.file_name().unwrap().to_string_lossy().into_owned();
        let st = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| exercise::run(&data)))
            .unwrap_or_else(|_| panic!("corpus input {name} failed (see the panic above)"));
        *statuses
            .entry(st.map_or("(no layer)".into(), |s| format!("{s:?}")))
            .or_default() += 1;
    }
    println!(
        "replayed {} corpus inputs in {:.2?}; forward statuses: {statuses:#?}",
        files.len(),
        start.elapsed()
    );
    // The corpus reaches successful calls, not only early refusals.
    assert!(statuses.get("ATTNRT_STATUS_OK").copied().unwrap_or(0) >= 5);
}

#[test]
fn edge_inputs() {
    exercise::run(&[]);
    exercise::run(&[0xff; 4096]);
    exercise::run(&[0x00; 4096]);
    let mut ok = 0;
    for seed in 0..300u32 {
        let mut s = seed.wrapping_mul(2_654_435_761) | 1;
        let data: Vec<u8> = (0..512)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                s as u8
            })
            .collect();
        ok += (exercise::run(&data) == Some(attnrt_ffi::attnrt_status::ATTNRT_STATUS_OK)) as usize;
    }
    println!("{ok} of 300 random inputs ran a forward call successfully");
}
