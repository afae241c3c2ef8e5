//! The flash-attention tile loop, written once over [`Isa`].

use super::{AttnShape, KvView, ATTN_BK, ATTN_BQ};
use crate::elem::Elem;
use crate::exp::exp_v;
use crate::isa::{scalar::Scalar, Isa};
use crate::visibility::{TileClass, Visibility};

/// Validated arguments (see `attend_on`): slices hold what the shape needs, scratch holds
/// `attend_scratch_len(d, r)`, `dp` is `d` rounded up to the scratch padding.
pub(super) struct Args<'a, E, M: ?Sized> {
    pub shape: AttnShape,
    pub dp: usize,
    pub q: &'a [f32],
    pub kv: KvView<'a, E>,
    pub mask: &'a M,
    pub scale: f32,
    pub out: &'a mut [f32],
    pub scratch: &'a mut [f32],
}

/// Kernel `attend_f32_16q x 64k`: masked online-softmax attention for `r` heads over one KV head.
///
/// Formula per query row: `m = max_j s_j`, `l = sum_j exp(s_j - m)`,
/// `o = sum_j exp(s_j - m) v_j / l`, kept online over key tiles: a tile with new maximum `m'`
/// rescales `l` and `o` by `exp(m - m')` first.
///
/// Tile: 16 query tokens (x r heads = rows) x 64 keys. Per key tile K is widened and transposed
/// into `kt[d][64]` so scores are 4-register FMA blocks over keys with `q[c]` broadcast (no
/// horizontal sums); V is widened into `vt[64][dp]` (zero-padded to `dp`) so `o += p_j v_j` runs
/// over 4-register blocks of the head dimension held across all keys of the tile.
/// Tails: a short last key tile computes whole 4-register blocks from zero-padded `kt` and sets
/// scores past its end to -inf (exp gives 0); `dp` padding makes the head dimension a multiple of
/// every lane count; a short last query tile just has fewer rows.
#[inline(always)]
pub(super) fn attend_tiles<I: Isa, E: Elem, M: Visibility + ?Sized>(isa: I, a: Args<'_, E, M>) {
    let Args {
        shape,
        dp,
        q,
        kv,
        mask,
        scale,
        out,
        scratch,
    } = a;
    let AttnShape { d, r, nq, q_start } = shape;
    let bk = ATTN_BK;
    let (kt, rest) = scratch.split_at_mut(d * bk);
    let (vt, rest) = rest.split_at_mut(bk * dp);
    let (p, rest) = rest.split_at_mut(bk);
    let (o, rest) = rest.split_at_mut(ATTN_BQ * r * dp);
    let (mrow, rest) = rest.split_at_mut(ATTN_BQ * r);
    let lrow = &mut rest[..ATTN_BQ * r];

    let mut qt0 = 0;
    while qt0 < nq {
        let qt1 = (qt0 + ATTN_BQ).min(nq);
        let nt = qt1 - qt0;
        let rows = nt * r;
        let (i0, i1) = (q_start + qt0, q_start + qt1);
        o[..rows * dp].fill(0.0);
        mrow[..rows].fill(f32::NEG_INFINITY);
        lrow[..rows].fill(0.0);

        let (lo, hi) = mask.key_range(i0, i1);
        let hi = hi.min(kv.len);
        let mut k0 = lo;
        while k0 < hi {
            let k1 = (k0 + bk).min(hi);
            let len = k1 - k0;
            let class = mask.classify(i0, i1, k0, k1);
            k0 = k1;
            if class == TileClass::None {
                continue;
            }
            widen_kv_tile(kt, vt, &kv, k1 - len, len, d, dp);
            let all_bits = if len == 64 { !0u64 } else { (1u64 << len) - 1 };
            for t in 0..nt {
                let bits = match class {
                    TileClass::Partial => {
                        let mut b = 0u64;
                        for j in 0..len {
                            b |= (mask.visible(i0 + t, k1 - len + j) as u64) << j;
                        }
                        b
                    }
                    _ => all_bits,
                };
                if bits == 0 {
                    continue;
                }
                for h in 0..r {
                    let row = t * r + h;
                    let qrow = &q[((qt0 + t) * r + h) * d..][..d];
                    scores(isa, qrow, kt, len, scale, p);
                    if bits != all_bits {
                        for (j, s) in p[..len].iter_mut().enumerate() {
                            if bits >> j & 1 == 0 {
                                *s = f32::NEG_INFINITY;
                            }
                        }
                    }
                    let m_old = mrow[row];
                    let m_new = m_old.max(row_max(isa, p, len));
                    // Some key is visible and scores are finite, so m_new is finite; exp of
                    // m_old = -inf minus it is 0, which wipes nothing (o and l are still 0).
                    let alpha = exp_v(Scalar, m_old - m_new);
                    let sum = exp_row(isa, p, len, m_new);
                    lrow[row] = lrow[row] * alpha + sum;
                    mrow[row] = m_new;
                    accumulate_pv(isa, &mut o[row * dp..][..dp], vt, p, len, dp, alpha);
                }
            }
        }

        for row in 0..rows {
            let dst = &mut out[(qt0 * r + row) * d..][..d];
            let l = lrow[row];
            if l > 0.0 {
                let inv = 1.0 / l;
                for (y, &x) in dst.iter_mut().zip(&o[row * dp..][..d]) {
                    *y = x * inv;
                }
            } else {
                // No visible key: exactly zero, never 0/0.
                dst.fill(0.0);
            }
        }
        qt0 = qt1;
    }
}

/// Widens keys `j0..j0+len` transposed into `kt[c * 64 + j]` and values into `vt[j * dp + c]`,
/// zero-filling key columns `len..64` of `kt` and the `d..dp` padding of `vt`, so padded lanes
/// contribute exact zeros.
#[inline(always)]
fn widen_kv_tile<E: Elem>(
    kt: &mut [f32],
    vt: &mut [f32],
    kv: &KvView<'_, E>,
    j0: usize,
    len: usize,
    d: usize,
    dp: usize,
) {
    let bk = ATTN_BK;
    for j in 0..len {
        let off = (j0 + j) * kv.stride;
        let krow = &kv.k[off..][..d];
        for (dst, x) in kt.iter_mut().skip(j).step_by(bk).zip(krow) {
            *dst = x.to_f32();
        }
        let vrow = &mut vt[j * dp..][..dp];
        E::to_f32_slice(&kv.v[off..][..d], vrow);
        vrow[d..].fill(0.0);
    }
    if len < bk {
        for c in 0..d {
            kt[c * bk + len..][..bk - len].fill(0.0);
        }
    }
}

/// `p[j] = scale * (q . k_j)` for `j < len` (rounded up to whole 4-register blocks); entries from
/// `len` up to the next lane multiple are set to -inf.
#[inline(always)]
fn scores<I: Isa>(isa: I, q: &[f32], kt: &[f32], len: usize, scale: f32, p: &mut [f32]) {
    let l = I::LANES;
    let bk = ATTN_BK;
    let d = q.len();
    let kt = &kt[..d * bk];
    let kp = kt.as_ptr();
    let vscale = isa.splat(scale);
    let mut j0 = 0;
    while j0 < len {
        let mut acc = [isa.zero(); 4];
        for (c, &qc) in q.iter().enumerate() {
            let qc = isa.splat(qc);
            for (t, acc) in acc.iter_mut().enumerate() {
                // SAFETY: c < d and j0 + 4*l <= 64 (64 is a multiple of 4*LANES and j0 a
                // multiple of 4*l below 64), so the read stays inside kt[..d*64].
                let kv = unsafe { isa.load(kp.add(c * bk + j0 + t * l)) };
                *acc = isa.mul_add(qc, kv, *acc);
            }
        }
        for (t, &acc) in acc.iter().enumerate() {
            isa.store_s(&mut p[j0 + t * l..], isa.mul(acc, vscale));
        }
        j0 += 4 * l;
    }
    let padded = len.div_ceil(l) * l;
    p[len..padded].fill(f32::NEG_INFINITY);
}

/// Maximum of `p[..len]` (lanes up to the next multiple of LANES hold -inf).
#[inline(always)]
fn row_max<I: Isa>(isa: I, p: &[f32], len: usize) -> f32 {
    let l = I::LANES;
    let mut m = isa.splat(f32::NEG_INFINITY);
    let mut j = 0;
    while j < len {
        m = isa.max(m, isa.load_s(&p[j..]));
        j += l;
    }
    isa.reduce_max(m)
}

/// `p[j] = exp(p[j] - m)` in place over whole registers; returns `sum_j p[j]` (padding lanes
/// hold -inf and become 0).
#[inline(always)]
fn exp_row<I: Isa>(isa: I, p: &mut [f32], len: usize, m: f32) -> f32 {
    let l = I::LANES;
    let vm = isa.splat(m);
    let mut sum = isa.zero();
    let mut j = 0;
    while j < len {
        let e = exp_v(isa, isa.sub(isa.load_s(&p[j..]), vm));
        isa.store_s(&mut p[j..], e);
        sum = isa.add(sum, e);
        j += l;
    }
    isa.reduce_sum(sum)
}

/// `o = o * alpha + sum_{j < len} p[j] * vt[j]` over a `dp`-float row, four registers of the
/// row at a time kept in registers across all keys, then single registers.
#[inline(always)]
fn accumulate_pv<I: Isa>(
    isa: I,
    o: &mut [f32],
    vt: &[f32],
    p: &[f32],
    len: usize,
    dp: usize,
    alpha: f32,
) {
    let l = I::LANES;
    let va = isa.splat(alpha);
    let vt = &vt[..len * dp];
    let vp = vt.as_ptr();
    let p = &p[..len];
    let mut c0 = 0;
    while c0 + 4 * l <= dp {
        let mut acc: [I::V; 4] =
            core::array::from_fn(|t| isa.mul(isa.load_s(&o[c0 + t * l..]), va));
        for (j, &pj) in p.iter().enumerate() {
            let pj = isa.splat(pj);
            for (t, acc) in acc.iter_mut().enumerate() {
                // SAFETY: j < len and c0 + 4*l <= dp, so the read stays inside vt[..len*dp].
                let v = unsafe { isa.load(vp.add(j * dp + c0 + t * l)) };
                *acc = isa.mul_add(pj, v, *acc);
            }
        }
        for (t, &acc) in acc.iter().enumerate() {
            isa.store_s(&mut o[c0 + t * l..], acc);
        }
        c0 += 4 * l;
    }
    while c0 < dp {
        // dp is a multiple of 16, hence of LANES: whole registers only.
        let mut acc = isa.mul(isa.load_s(&o[c0..]), va);
        for (j, &pj) in p.iter().enumerate() {
            // SAFETY: j < len and c0 + l <= dp, so the read stays inside vt[..len*dp].
            let v = unsafe { isa.load(vp.add(j * dp + c0)) };
            acc = isa.mul_add(isa.splat(pj), v, acc);
        }
        isa.store_s(&mut o[c0..], acc);
        c0 += l;
    }
}
