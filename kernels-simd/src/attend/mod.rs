//! Masked flash attention over one KV head and the group of query heads sharing it.

pub(crate) mod kernel;

use crate::elem::Elem;
use crate::error::{add, mul, need, ShapeError};
use crate::isa::{dispatch, Isa, WithIsa};
use crate::tier::{active, Tier};
use crate::visibility::Visibility;

/// Query tokens per tile: the unit of [`Visibility::classify`] on the query side, and how many
/// tokens (times `r` heads) share each K/V load of the score and PV register blocks.
pub const ATTN_BQ: usize = 16;
/// Keys per tile: the unit of [`Visibility::classify`] on the key side and of K/V widening
/// (the per-row visibility of a `Partial` tile is one `u64`).
pub const ATTN_BK: usize = 64;
/// Head dimension padding inside scratch, the widest tier's lane count, so scratch size does not
/// depend on the tier.
pub(crate) const DPAD: usize = 16;

/// Where the queries sit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttnShape {
    /// Head dimension D (any value >= 1; odd sizes take padded registers).
    pub d: usize,
    /// Query heads sharing this KV head (`H / KV`), stored consecutively per token.
    pub r: usize,
    /// Query tokens.
    pub nq: usize,
    /// Token index (inside the sequence, as [`Visibility`] sees it) of the first query.
    pub q_start: usize,
}

/// One KV head's keys and values: key `j < len` is `k[j * stride .. j * stride + d]`, value `j`
/// likewise in `v`. The stride lets callers pass a head of a `[T, KV, D]` cache without copying.
#[derive(Clone, Copy, Debug)]
pub struct KvView<'a, E> {
    /// Keys.
    pub k: &'a [E],
    /// Values.
    pub v: &'a [E],
    /// Elements between consecutive keys (and values); at least `d` when `len > 1`.
    pub stride: usize,
    /// Number of keys; token index `j` of the sequence is key `j`.
    pub len: usize,
}

/// Row stride of the transposed-query and score buffers: the rows of a query tile
/// (`ATTN_BQ * r`) rounded up to whole registers of the widest tier, plus one such register so
/// the stride is not a power of two (which would map a panel's rows to few L1 sets).
pub(crate) const fn rows_padded(r: usize) -> usize {
    (r.saturating_mul(ATTN_BQ).saturating_add(DPAD - 1) / DPAD * DPAD).saturating_add(DPAD)
}

/// Scratch floats for head dimension `d` and group size `r`, `None` on overflow: transposed
/// queries `d x rp`, scores `64 x rp`, outputs `16 r x dp`, three row vectors (max, sum,
/// rescale) of `rp`, widened K `64 x d` (f16/bf16 only) and V `64 x (dp + 16)`.
const fn scratch_len(d: usize, r: usize) -> Option<usize> {
    let Some(dp) = d.checked_add(DPAD - 1) else {
        return None;
    };
    let dp = dp / DPAD * DPAD;
    let Some(rows) = r.checked_mul(ATTN_BQ) else {
        return None;
    };
    let Some(rp) = rows.checked_add(DPAD - 1) else {
        return None;
    };
    let Some(rp) = (rp / DPAD * DPAD).checked_add(DPAD) else {
        return None;
    };
    let Some(qt) = d.checked_mul(rp) else {
        return None;
    };
    let Some(o) = rows.checked_mul(dp) else {
        return None;
    };
    let Some(vs) = dp.checked_add(DPAD) else {
        return None;
    };
    let Some(kv) = d.checked_add(vs) else {
        return None;
    };
    let Some(kv) = kv.checked_mul(ATTN_BK) else {
        return None;
    };
    let Some(per_row) = ATTN_BK.checked_add(3) else {
        return None;
    };
    let Some(st) = rp.checked_mul(per_row) else {
        return None;
    };
    let Some(n) = qt.checked_add(o) else {
        return None;
    };
    let Some(n) = n.checked_add(kv) else {
        return None;
    };
    n.checked_add(st)
}

/// Scratch floats [`attend`] needs for head dimension `d` and group size `r` (`usize::MAX` if
/// the size overflows).
pub const fn attend_scratch_len(d: usize, r: usize) -> usize {
    match scratch_len(d, r) {
        Some(n) => n,
        None => usize::MAX,
    }
}

/// `out[t][h] = sum_j softmax_j(scale * q[t][h] . k[j]) v[j]` over the keys `j` that
/// `mask.visible(q_start + t, j)` allows, for `t < nq`, `h < r`; on the [`active`] tier.
///
/// Layout: `q` and `out` are `[nq][r][d]` contiguous (`q` not pre-scaled; pass
/// `scale = 1/sqrt(d)`); K/V as [`KvView`].
///
/// Flash style: query tiles of [`ATTN_BQ`] tokens x key tiles of [`ATTN_BK`] keys inside
/// `mask.key_range`; each tile is classified once: `None` tiles are skipped without reading K/V,
/// `All` tiles do no per-element mask work, `Partial` tiles ask `mask.visible` once per
/// (token, key) and share the answer across the `r` heads. f32 K/V are read in place; f16/bf16
/// K/V tiles are widened to f32 once per query tile for all `r` heads. Both products are
/// register-blocked small GEMMs over all rows of the tile. Softmax is online in f32 with running-max rescaling. A
/// query that sees no key gets exactly 0. Deterministic: the same inputs give the same bits.
///
/// # Errors
/// `d` or `r` zero, slices shorter than the shape, a key stride below `d`, `scratch` shorter
/// than [`attend_scratch_len`], or sizes overflowing `usize`; `out` is then untouched.
pub fn attend<E: Elem, M: Visibility + ?Sized>(
    shape: AttnShape,
    q: &[f32],
    kv: KvView<'_, E>,
    mask: &M,
    scale: f32,
    out: &mut [f32],
    scratch: &mut [f32],
) -> Result<(), ShapeError> {
    attend_on(active(), shape, q, kv, mask, scale, out, scratch)
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn attend_on<E: Elem, M: Visibility + ?Sized>(
    tier: Tier,
    shape: AttnShape,
    q: &[f32],
    kv: KvView<'_, E>,
    mask: &M,
    scale: f32,
    out: &mut [f32],
    scratch: &mut [f32],
) -> Result<(), ShapeError> {
    let AttnShape { d, r, nq, q_start } = shape;
    if d == 0 {
        return Err(ShapeError::Invalid {
            what: "attend: head dim d (must be > 0)",
            value: d,
        });
    }
    if r == 0 {
        return Err(ShapeError::Invalid {
            what: "attend: group size r (must be > 0)",
            value: r,
        });
    }
    add(q_start, nq, "attend: q_start + nq")?;
    let qn = mul(mul(nq, r, "attend: nq*r")?, d, "attend: nq*r*d")?;
    need("attend: q", qn, q.len())?;
    need("attend: out", qn, out.len())?;
    if kv.len > 0 {
        if kv.len > 1 && kv.stride < d {
            return Err(ShapeError::Invalid {
                what: "attend: kv stride (must be >= d)",
                value: kv.stride,
            });
        }
        let kn = add(mul(kv.len - 1, kv.stride, "attend: kv")?, d, "attend: kv")?;
        need("attend: k", kn, kv.k.len())?;
        need("attend: v", kn, kv.v.len())?;
    }
    let dp = add(d, DPAD - 1, "attend: d")? / DPAD * DPAD;
    let Some(sn) = scratch_len(d, r) else {
        return Err(ShapeError::Invalid {
            what: "attend: scratch size overflows usize",
            value: d,
        });
    };
    need("attend: scratch", sn, scratch.len())?;
    if nq == 0 {
        return Ok(());
    }
    dispatch(
        tier,
        Job(kernel::Args {
            shape,
            dp,
            q,
            kv,
            mask,
            scale,
            out,
            scratch,
        }),
    );
    Ok(())
}

struct Job<'a, E, M: ?Sized>(kernel::Args<'a, E, M>);

impl<E: Elem, M: Visibility + ?Sized> WithIsa for Job<'_, E, M> {
    type Output = ();
    #[inline(always)]
    fn run<I: Isa>(self, isa: I) {
        isa.attend_tiles(self.0)
    }
}

#[cfg(test)]
mod tests;
