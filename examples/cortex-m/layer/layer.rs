//! The demo layer, defined once for the firmware and for the host test that checks it.
//!
//! Included with `#[path]` by `src/main.rs` and by `tests/tests/embedded_firmware.rs`; it needs
//! only `attnrt` (no `std`, no `alloc`). The data comes from [`gen`].

use attnrt::{
    rope, Config, DType, Error, Inputs, LayerWeights, MaskInputs, QkNorm, Rope, RopeConvention,
    RopeScaling, RopeTable, Tensor,
};

#[path = "gen.rs"]
pub mod gen;

/// GQA (4 query heads, 2 KV heads), per-head QK-norm, interleaved rope (theta 10000),
/// sliding window 8.
pub const CFG: Config = Config::new(gen::N_EMBD, gen::N_HEAD)
    .with_kv_heads(gen::N_KV_HEAD)
    .with_head_dim(gen::HEAD_DIM)
    .with_qk_norm(QkNorm::PerHead)
    .with_sliding_window(gen::WINDOW)
    .with_rope(ROPE);

/// Interleaved pairs, theta 10000, no scaling.
pub const ROPE: Rope = Rope {
    convention: RopeConvention::Interleaved,
    theta: gen::ROPE_THETA,
    scaling: RopeScaling::None,
};

/// f32 elements of the workspace arena, from the runtime's `const fn`.
pub const WORKSPACE_LEN: usize = attnrt::workspace_len(&CFG, gen::T);
// The budget of the embedded proof for this layer's workspace: under 16 KiB.
const _: () = assert!(WORKSPACE_LEN * 4 < 16 * 1024, "workspace over 16 KiB");

/// f32 elements of the rotary table.
pub const ROPE_TABLE_LEN: usize = rope::table_len(gen::MAX_POS, gen::HEAD_DIM);
/// f32 elements of the output `y`.
pub const OUT_LEN: usize = gen::T * gen::N_EMBD;

fn tensor<'a>(
    blob: &'a [u8],
    i: usize,
    name: &'static str,
    dtype: DType,
) -> Result<Tensor<'a>, Error> {
    Tensor::from_bytes(name, dtype, &blob[gen::offset(i)..gen::offset(i + 1)])
}

/// Views the blob's weights (bf16) in place.
///
/// # Errors
/// [`Error::Bytes`] if the blob is misaligned.
pub fn weights(blob: &[u8]) -> Result<LayerWeights<'_>, Error> {
    Ok(LayerWeights {
        wq: tensor(blob, 0, "wq", DType::Bf16)?,
        wk: tensor(blob, 1, "wk", DType::Bf16)?,
        wv: tensor(blob, 2, "wv", DType::Bf16)?,
        wo: tensor(blob, 3, "wo", DType::Bf16)?,
        bq: None,
        bk: None,
        bv: None,
        bo: None,
        q_norm: Some(tensor(blob, 4, "q_norm", DType::Bf16)?),
        k_norm: Some(tensor(blob, 5, "k_norm", DType::Bf16)?),
    })
}

/// Views the blob's input `x` (f32) in place.
///
/// # Errors
/// [`Error::Bytes`] if the blob is not 4-byte aligned.
pub fn x(blob: &[u8]) -> Result<&[f32], Error> {
    match tensor(blob, 6, "x", DType::F32)? {
        Tensor::F32(x) => Ok(x),
        _ => unreachable!("viewed as f32"),
    }
}

/// Builds the rotary cos/sin table into `buf` (of [`ROPE_TABLE_LEN`]) and views it.
///
/// # Errors
/// As [`rope::build_table`].
pub fn rope_table(buf: &mut [f32]) -> Result<RopeTable<'_>, Error> {
    rope::build_table(&ROPE, gen::HEAD_DIM, buf)?;
    RopeTable::new(buf, gen::HEAD_DIM)
}

/// The call: one row of T tokens, two packed documents, explicit positions.
pub fn inputs<'a>(x: &'a [f32], table: RopeTable<'a>) -> Inputs<'a> {
    Inputs {
        x,
        batch: 1,
        seq_len: gen::T,
        mask: MaskInputs {
            document_ids: Some(&gen::DOCUMENT_IDS),
            ..MaskInputs::default()
        },
        position_ids: Some(&gen::POSITION_IDS),
        rope_table: Some(table),
    }
}

/// Sum and sum of absolute values of `y`, in order, in f32.
pub fn checksum(y: &[f32]) -> (f32, f32) {
    y.iter().fold((0.0, 0.0), |(s, a), v| (s + v, a + v.abs()))
}
