//! TMA tensor maps for the Hopper attention kernel's Q, K and V tiles.
//!
//! `cust_raw` 0.11 predates `cuTensorMapEncodeTiled`, so the driver's entry point is looked up
//! once through `cuGetProcAddress` (which the binding and the link stub have) instead of being
//! linked: a binary built here still links against the stub, and a driver without the call
//! (before CUDA 12) is a clear error rather than a load failure.

use std::ffi::{c_void, CStr};
use std::sync::OnceLock;

use attnrt::Config;
use cust::sys as cu;

use super::drv;
use crate::error::{Error, Result};
use crate::plan::Precision;

/// `CUtensorMap`: 128 opaque bytes, 64-byte aligned, passed to the kernel by value
/// (`__grid_constant__`).
#[repr(C, align(64))]
#[derive(Clone, Copy, Debug)]
pub(crate) struct TensorMap([u64; 16]);

/// `cuTensorMapEncodeTiled` (CUDA 12.0): map, data type, rank, global address, sizes,
/// strides (bytes, rank - 1 of them), box sizes, element strides, interleave, swizzle, L2
/// promotion, out-of-bounds fill.
type EncodeTiled = unsafe extern "C" fn(
    *mut TensorMap,
    u32,
    u32,
    *mut c_void,
    *const u64,
    *const u64,
    *const u32,
    *const u32,
    u32,
    u32,
    u32,
    u32,
) -> cu::CUresult;

// Values of the driver's enums (cuda.h, CUDA 12.0 and later).
const DATA_TYPE_FLOAT16: u32 = 6;
const DATA_TYPE_BFLOAT16: u32 = 9;
const INTERLEAVE_NONE: u32 = 0;
const SWIZZLE_128B: u32 = 3;
const L2_PROMOTION_256B: u32 = 3;
const OOB_FILL_ZEROS: u32 = 0;

fn encoder() -> Result<EncodeTiled> {
    static ENCODER: OnceLock<std::result::Result<usize, String>> = OnceLock::new();
    let found = ENCODER.get_or_init(|| {
        let name: &CStr = c"cuTensorMapEncodeTiled";
        let mut f: *mut c_void = std::ptr::null_mut();
        // SAFETY: `name` is NUL-terminated and `f` a valid out-pointer; version 12000 asks for
        // the CUDA 12.0 signature, which `EncodeTiled` spells out.
        drv("cuGetProcAddress", unsafe {
            cu::cuGetProcAddress(name.as_ptr(), &mut f, 12000, 0)
        })
        .map_err(|e| e.to_string())?;
        if f.is_null() {
            return Err("the driver has no cuTensorMapEncodeTiled (CUDA 12.0 or later)".into());
        }
        Ok(f as usize)
    });
    match found {
        // SAFETY: the driver returned this entry point for the CUDA 12.0 signature above.
        Ok(f) => Ok(unsafe { std::mem::transmute::<usize, EncodeTiled>(*f) }),
        Err(e) => Err(Error::Unsupported(e.clone())),
    }
}

/// The map of one K or V buffer, `[batch, seq_len, n_kv_head * 128]` in `precision`, as the
/// attention kernel reads it: 3-D (columns, tokens, batch rows), boxes of 64 columns (one
/// 128-byte swizzled plane) x `key_tile` tokens x 1 row, tokens past `seq_len` read as zeros.
pub(crate) fn kv_map(
    base: u64,
    precision: Precision,
    columns: usize,
    seq_len: usize,
    batch: usize,
    key_tile: usize,
) -> Result<TensorMap> {
    let row = columns as u64 * 2;
    encode(
        base,
        precision,
        &[columns as u64, seq_len as u64, batch as u64],
        &[row, row * seq_len as u64],
        &[64, key_tile as u32, 1],
    )
}

/// The map of the queries, `[batch, seq_len, n_head * head_dim]` for `cfg`: 4-D (columns of a
/// head, heads, tokens, batch rows), boxes of 64 columns x group heads x `q_per_cta` tokens x 1
/// row, so that a box lands as the CTA's packed (query, head) rows of one plane.
pub(crate) fn q_map(
    base: u64,
    precision: Precision,
    cfg: &Config,
    seq_len: usize,
    batch: usize,
    q_per_cta: usize,
) -> Result<TensorMap> {
    let head = cfg.head_dim as u64 * 2;
    let row = head * cfg.n_head as u64;
    encode(
        base,
        precision,
        &[
            cfg.head_dim as u64,
            cfg.n_head as u64,
            seq_len as u64,
            batch as u64,
        ],
        &[head, row, row * seq_len as u64],
        &[64, cfg.group_size() as u32, q_per_cta as u32, 1],
    )
}

/// A tiled map with the 128-byte swizzle and zero fill of a bf16 / f16 tensor: `sizes` from the
/// innermost dimension out, `strides` in bytes for every dimension but the innermost, `boxes`
/// the tile's extent per dimension.
fn encode(
    base: u64,
    precision: Precision,
    sizes: &[u64],
    strides: &[u64],
    boxes: &[u32],
) -> Result<TensorMap> {
    let dtype = match precision {
        Precision::Bf16 => DATA_TYPE_BFLOAT16,
        Precision::F16 => DATA_TYPE_FLOAT16,
        Precision::F32 => return Err(Error::Unsupported("TMA tiles are bf16 / f16 only".into())),
    };
    let rank = sizes.len();
    debug_assert!(strides.len() + 1 == rank && boxes.len() == rank);
    let elem = [1u32; 5];
    let mut map = TensorMap([0; 16]);
    let encode = encoder()?;
    // SAFETY: `sizes`, `boxes` and `elem` hold at least `rank` entries and `strides` rank - 1;
    // `base` is a live device allocation covering the sizes (the caller's buffer); the driver
    // checks alignment, strides and box limits and reports a violation as an error.
    drv("cuTensorMapEncodeTiled", unsafe {
        encode(
            &mut map,
            dtype,
            rank as u32,
            base as *mut c_void,
            sizes.as_ptr(),
            strides.as_ptr(),
            boxes.as_ptr(),
            elem.as_ptr(),
            INTERLEAVE_NONE,
            SWIZZLE_128B,
            L2_PROMOTION_256B,
            OOB_FILL_ZEROS,
        )
    })?;
    Ok(map)
}
