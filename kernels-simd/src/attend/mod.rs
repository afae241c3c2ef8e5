//! Masked flash attention over one KV head and the group of query heads sharing it.

mod kernel;

use crate::elem::Elem;
use crate::error::{add, mul, need, ShapeError};
use crate::isa::{dispatch, Isa, WithIsa};
use crate::tier::{active, Tier};
use crate::visibility::Visibility;

/// Query tokens per tile: the unit of [`Visibility::classify`] on the query side, and how many
/// tokens (times `r` heads) reuse one widened K/V tile.
pub const ATTN_BQ: usize = 16;
/// Keys per tile: the unit of [`Visibility::classify`] on the key side and of K/V widening.
/// A multiple of `4 * LANES` for every tier (the score loop's register block).
pub const ATTN_BK: usize = 64;
/// Head dimension padding inside scratch, the widest tier's lane count, so scratch size does not
/// depend on the tier.
const DPAD: usize = 16;

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

/// Scratch floats [`attend`] needs for head dimension `d` and group size `r`.
pub const fn attend_scratch_len(d: usize, r: usize) -> usize {
    let dp = d.saturating_add(DPAD - 1) / DPAD * DPAD;
    let kt = d.saturating_mul(ATTN_BK);
    let vt = dp.saturating_mul(ATTN_BK);
    let rows = r.saturating_mul(ATTN_BQ);
    let o = rows.saturating_mul(dp);
    kt.saturating_add(vt)
        .saturating_add(ATTN_BK)
        .saturating_add(o)
        .saturating_add(rows.saturating_mul(2))
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
/// (token, key) and share the answer across the `r` heads. K/V tiles are widened to f32 once
/// per query tile for all `r` heads. Softmax is online in f32 with running-max rescaling. A
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
    // Recompute without saturation so an overflowing size is an error, not a short buffer.
    let dp = add(d, DPAD - 1, "attend: d")? / DPAD * DPAD;
    let rows = mul(r, ATTN_BQ, "attend: r")?;
    let mut sn = add(
        mul(d, ATTN_BK, "attend: scratch")?,
        mul(dp, ATTN_BK, "attend: scratch")?,
        "attend: scratch",
    )?;
    sn = add(sn, ATTN_BK, "attend: scratch")?;
    sn = add(
        sn,
        mul(rows, add(dp, 2, "attend: scratch")?, "attend: scratch")?,
        "attend: scratch",
    )?;
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
        kernel::attend_tiles(isa, self.0)
    }
}

#[cfg(test)]
mod tests;
