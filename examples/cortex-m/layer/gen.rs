//! The demo layer's shapes and its deterministic data, free of any dependency.
//!
//! Included with `#[path]` by three programs that must agree bit for bit: the firmware's
//! `build.rs` (which writes the blob that the firmware keeps in flash), the firmware itself (for
//! the shapes) and the host test `tests/tests/embedded_firmware.rs` (which rebuilds the same blob
//! in memory and runs the same layer on the host). Change a number here and all three follow.

/// Model width C.
pub const N_EMBD: usize = 64;
/// Query heads H.
pub const N_HEAD: usize = 4;
/// Key/value heads (grouped-query attention, 2 query heads per KV head).
pub const N_KV_HEAD: usize = 2;
/// Per-head width D.
pub const HEAD_DIM: usize = 16;
/// Sliding window W.
pub const WINDOW: usize = 8;
/// Tokens T of the one batch row.
pub const T: usize = 16;
/// Rotary base.
pub const ROPE_THETA: f64 = 10000.0;

/// Two packed documents, of 7 and 9 tokens: a query sees only keys of its own document.
pub static DOCUMENT_IDS: [i32; T] = [0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1];
/// Rotary positions, restarting at 0 where the second document starts.
pub static POSITION_IDS: [i32; T] = [0, 1, 2, 3, 4, 5, 6, 0, 1, 2, 3, 4, 5, 6, 7, 8];
/// Positions the rotary table covers (one more than the largest position id).
pub const MAX_POS: usize = 9;

const Q_DIM: usize = N_HEAD * HEAD_DIM;
const KV_DIM: usize = N_KV_HEAD * HEAD_DIM;

/// Elements of each tensor of the blob, in blob order: wq, wk, wv, wo, q_norm, k_norm (bf16),
/// then x (f32).
pub const LENS: [usize; 7] = [
    Q_DIM * N_EMBD,
    KV_DIM * N_EMBD,
    KV_DIM * N_EMBD,
    N_EMBD * Q_DIM,
    HEAD_DIM,
    HEAD_DIM,
    T * N_EMBD,
];
/// Bytes per element of each tensor of the blob.
pub const ELEM_SIZE: [usize; 7] = [2, 2, 2, 2, 2, 2, 4];

/// Byte offset of tensor `i` of the blob.
pub const fn offset(i: usize) -> usize {
    let mut off = 0;
    let mut k = 0;
    while k < i {
        off += LENS[k] * ELEM_SIZE[k];
        k += 1;
    }
    off
}

/// Bytes of the whole blob.
pub const BLOB_LEN: usize = offset(LENS.len());

// x is read as f32: its offset must keep the 4-byte alignment of the blob's start.
const _: () = assert!(offset(6) & 3 == 0);

/// A xorshift32 generator: tiny, deterministic, the same on every target.
struct XorShift(u32);

impl XorShift {
    fn next(&mut self) -> u32 {
        let mut s = self.0;
        s ^= s << 13;
        s ^= s >> 17;
        s ^= s << 5;
        self.0 = s;
        s
    }

    /// Uniform in `[-1, 1)`, exactly representable in f32 (24 random bits).
    fn symmetric(&mut self) -> f32 {
        (self.next() >> 8) as f32 / (1u32 << 23) as f32 - 1.0
    }
}

/// f32 to bf16 bits, rounding to nearest even (the values here are finite).
fn bf16_bits(v: f32) -> u16 {
    let bits = v.to_bits();
    let round = 0x7FFF + ((bits >> 16) & 1);
    (bits.wrapping_add(round) >> 16) as u16
}

/// Writes the blob, little-endian: the weights as bf16, `x` as f32.
///
/// Linear weights are uniform in `±1/sqrt(fan_in)`, norm weights in `1 ± 0.1`, `x` in `±1`.
///
/// # Panics
/// If `out` is not [`BLOB_LEN`] bytes long.
pub fn write_blob(out: &mut [u8]) {
    assert_eq!(out.len(), BLOB_LEN, "blob length");
    let scale = [0.125, 0.125, 0.125, 0.125, 0.1, 0.1, 1.0];
    let centre = [0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0];
    for i in 0..LENS.len() {
        let mut rng = XorShift(0x9E37_79B9 ^ (i as u32 + 1).wrapping_mul(0x85EB_CA6B));
        let bytes = &mut out[offset(i)..offset(i + 1)];
        for chunk in bytes.chunks_exact_mut(ELEM_SIZE[i]) {
            let v = centre[i] + scale[i] * rng.symmetric();
            if ELEM_SIZE[i] == 2 {
                chunk.copy_from_slice(&bf16_bits(v).to_le_bytes());
            } else {
                chunk.copy_from_slice(&v.to_le_bytes());
            }
        }
    }
}
