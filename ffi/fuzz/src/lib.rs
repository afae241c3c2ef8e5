//! The fuzz harness of the attnrt C ABI: [`exercise::run`] turns bytes into calls. The same
//! file is compiled into the stable replay test `tests/tests/ffi_fuzz_replay.rs`.
#![deny(unsafe_op_in_unsafe_fn)]

pub mod exercise;
