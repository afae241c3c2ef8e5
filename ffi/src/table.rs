//! The cos/sin rows a rotary forward call needs when the caller gives no `freqs_cis`, built
//! into the caller's workspace (no allocation).
//!
//! Without `position_ids` the table covers positions `0..T`. With them, only the distinct
//! positions are built, one row each, and the call's positions are replaced by row indices:
//! a call at position 1 000 000 costs one row, not a million. Rows are computed exactly as
//! `attnrt::rope::build_table` computes them (same f64 angle, same `libm` functions, one f32
//! rounding), so both paths give bitwise the same output.

use attnrt::rope::{build_table, fill_row};
use attnrt::{Inputs, Rope, RopeTable};

use crate::error::FfiResult;

/// f32 workspace elements [`build`] needs for `tokens = batch * seq_len` tokens of heads of
/// width `head_dim`: a row per token and a remapped position per token.
pub(crate) fn table_elems(tokens: usize, head_dim: usize) -> Option<usize> {
    tokens.checked_mul(head_dim.checked_add(1)?)
}

/// Builds the table of the call into `ws` (at least [`table_elems`] long) and returns it with
/// the positions to use in place of the caller's (`None`: keep the default `t`).
pub(crate) fn build<'w>(
    rope: &Rope,
    head_dim: usize,
    inputs: &Inputs<'_>,
    ws: &'w mut [f32],
) -> FfiResult<(RopeTable<'w>, Option<&'w [i32]>)> {
    let tokens = inputs
        .batch
        .checked_mul(inputs.seq_len)
        .ok_or(attnrt::Error::InputValue {
            name: "seq_len",
            index: 0,
            value: inputs.seq_len as i64,
            rule: "batch * seq_len overflows",
        })?;
    let Some(pos) = inputs.position_ids else {
        let rows = if tokens == 0 { 0 } else { inputs.seq_len };
        build_table(rope, head_dim, &mut ws[..rows * head_dim])?;
        let ws: &'w [f32] = ws;
        return Ok((RopeTable::new(&ws[..rows * head_dim], head_dim)?, None));
    };
    // The runtime checks these too, but on the remapped ids, which hide both mistakes.
    if pos.len() != tokens {
        return Err(attnrt::Error::InputShape {
            name: "position_ids",
            expected: tokens,
            actual: pos.len(),
        }
        .into());
    }
    if let Some(i) = pos.iter().position(|&p| p < 0) {
        return Err(attnrt::Error::InputValue {
            name: "position_ids",
            index: i,
            value: pos[i] as i64,
            rule: "must be >= 0",
        }
        .into());
    }
    if tokens > i32::MAX as usize {
        return Err(attnrt::Error::InputValue {
            name: "position_ids",
            index: 0,
            value: tokens as i64,
            rule: "more than 2^31 - 1 tokens need a caller freqs_cis table",
        }
        .into());
    }
    let (rows, ids) = ws.split_at_mut(tokens * head_dim);
    let ids: &mut [i32] = bytemuck::cast_slice_mut(&mut ids[..tokens]);
    // The distinct positions, sorted, kept at the start of the row area while the ids are made.
    let uniq: &mut [i32] = bytemuck::cast_slice_mut(&mut rows[..tokens]);
    uniq.copy_from_slice(pos);
    uniq.sort_unstable();
    let mut n = 0;
    for i in 0..uniq.len() {
        if n == 0 || uniq[i] != uniq[n - 1] {
            uniq[n] = uniq[i];
            n += 1;
        }
    }
    for (id, &p) in ids.iter_mut().zip(pos) {
        // Every position is in `uniq`, so the search succeeds; either arm is the row index.
        *id = uniq[..n].binary_search(&p).unwrap_or_else(|i| i) as i32;
    }
    // Rows from the last: row k overwrites elements from k * head_dim >= k on, so the
    // positions of rows < k, still to be read, survive (head_dim >= 2 for rotary layers).
    for k in (0..n).rev() {
        let p = rows[k].to_bits() as i32 as u64;
        fill_row(
            rope,
            head_dim,
            p,
            &mut rows[k * head_dim..(k + 1) * head_dim],
        );
    }
    let rows: &'w [f32] = rows;
    let ids: &'w [i32] = ids;
    Ok((RopeTable::new(&rows[..n * head_dim], head_dim)?, Some(ids)))
}
