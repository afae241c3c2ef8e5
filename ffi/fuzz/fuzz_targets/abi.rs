//! Random configurations, shapes, mask inputs, lengths, NULL pointers, backends, thread counts
//! and host callbacks through the extern "C" functions of attnrt-ffi (see src/exercise.rs).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = attnrt_ffi_fuzz::exercise::run(data);
});
