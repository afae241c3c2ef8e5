//! The flash-attention tile loop, written once over [`Isa`].

use super::{rows_padded, AttnShape, KvView, ATTN_BK, ATTN_BQ, DPAD};
use crate::elem::Elem;
use crate::exp::exp_nonpos_v;
use crate::isa::Isa;
use crate::visibility::{TileClass, Visibility};

/// Validated arguments (see `attend_on`): slices hold what the shape needs, scratch holds
/// `attend_scratch_len(d, r)`, `dp` is `d` rounded up to the scratch padding.
pub(crate) struct Args<'a, E, M: ?Sized> {
    pub shape: AttnShape,
    pub dp: usize,
    pub q: &'a [f32],
    pub kv: KvView<'a, E>,
    pub mask: &'a M,
    pub scale: f32,
    pub out: &'a mut [f32],
    pub scratch: &'a mut [f32],
}

/// Kernel `attend_f32_16q x 64k`: masked online-softmax attention for `r` heads over one KV head,
/// both products as register-blocked small GEMMs (`MR x NRV` registers, the ISA's choice).
///
/// Formula per query row: `m = max_j s_j` with `s_j = scale * q . k_j` over visible keys,
/// `l = sum_j exp(s_j - m)`, `o = sum_j exp(s_j - m) v_j / l`, kept online over key tiles: a
/// tile with new maximum `m'` rescales `l` and `o` by `exp(m - m')` first.
///
/// Tile: 16 query tokens x r heads = up to `16 r` rows, x 64 keys. Per query tile Q is
/// transposed into `qt[c][row]` (rows padded with zeros to whole registers), so a row register
/// holds the same head-dimension element of several rows. Scores: `st[j][row] = scale *
/// sum_c k[j][c] qt[c][row]`, `MR` keys (each `k[j][c]` broadcast straight from the K/V view
/// for f32, from a widened copy otherwise) x `NRV` row registers per block, one FMA chain per
/// accumulator in increasing `c`. Softmax runs down the key axis with rows in lanes: max,
/// `exp(s - m)`, row sums and the rescale factor are plain lane-wise vector code. `o[row][c]
/// = alpha[row] o[row][c] + sum_j st[j][row] v[j][c]`: `MR` rows (probability broadcast) x
/// `NRV` registers of the head dimension, one chain per accumulator in increasing `j`. Each
/// row's arithmetic is the same whichever block, row group or tile class it falls in, so the
/// bits depend only on the inputs, the query tile and the key tiles' bounds.
/// Tails: a short key tile runs the score blocks over exactly its keys (a smaller `MR` for the
/// last block) and the PV sums over exactly its keys; masked pairs get score -inf (weight 0),
/// and a row with no visible key yet keeps `m = -inf`, `l = 0`, `o = 0` (its subtraction uses
/// the finite `f32::MIN` so nothing becomes NaN). Row and head-dimension tails use smaller
/// `MR`/`NRV` instances; V is copied per tile (widened if needed) into zero-padded rows of
/// `dp + 16` floats, which also keeps its rows off a power-of-two stride. A key tile where no row sees any key is skipped,
/// and keys at the ends of a `Partial` tile that no row sees are dropped (they would only add
/// exact zeros).
#[inline(always)]
pub(crate) fn attend_tiles<
    I: Isa,
    E: Elem,
    M: Visibility + ?Sized,
    const MR: usize,
    const NRV: usize,
>(
    isa: I,
    a: Args<'_, E, M>,
) {
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
    let l = I::LANES;
    let bk = ATTN_BK;
    let rp = rows_padded(r);
    let (qt, rest) = scratch.split_at_mut(d * rp);
    let (st, rest) = rest.split_at_mut(bk * rp);
    let (o, rest) = rest.split_at_mut(ATTN_BQ * r * dp);
    let (mrow, rest) = rest.split_at_mut(rp);
    let (lrow, rest) = rest.split_at_mut(rp);
    let (alpha, rest) = rest.split_at_mut(rp);
    let (kw, rest) = rest.split_at_mut(bk * d);
    let vs_stride = dp + DPAD;
    let vw = &mut rest[..bk * vs_stride];

    let k_direct = E::as_f32(kv.k);
    // Head-dimension columns of the PV product: whole registers.
    let dv = d.div_ceil(l) * l;

    let mut qt0 = 0;
    while qt0 < nq {
        let qt1 = (qt0 + ATTN_BQ).min(nq);
        let nt = qt1 - qt0;
        let rows = nt * r;
        let rv = rows.div_ceil(l);
        let (i0, i1) = (q_start + qt0, q_start + qt1);
        let qtile = &q[qt0 * r * d..][..rows * d];
        isa.transpose(qtile, d, rows, d, qt, rp);
        if rows < rv * l {
            for c in 0..d {
                qt[c * rp + rows..][..rv * l - rows].fill(0.0);
            }
        }
        // `o` is not cleared: the first computed key tile overwrites it (see accumulate_pv).
        let mut first = true;
        mrow[..rv * l].fill(f32::NEG_INFINITY);
        lrow[..rv * l].fill(0.0);

        let (lo, hi) = mask.key_range(i0, i1);
        let hi = hi.min(kv.len);
        let mut k0 = lo;
        while k0 < hi {
            let k1 = (k0 + bk).min(hi);
            let len = k1 - k0;
            let class = mask.classify(i0, i1, k0, k1);
            let mut j0 = k0;
            k0 = k1;
            if class == TileClass::None {
                continue;
            }
            let mut len = len;
            let mut all_bits = if len == 64 { !0u64 } else { (1u64 << len) - 1 };
            let mut bits = [all_bits; ATTN_BQ];
            if class == TileClass::Partial {
                for (t, b) in bits[..nt].iter_mut().enumerate() {
                    *b = 0;
                    for j in 0..len {
                        *b |= (mask.visible(i0 + t, j0 + j) as u64) << j;
                    }
                }
                // Keys at either end that no row sees would only add exact zeros: drop them.
                let any = bits[..nt].iter().fold(0, |a, &b| a | b);
                if any == 0 {
                    continue;
                }
                let skip = any.trailing_zeros() as usize;
                len = 64 - any.leading_zeros() as usize - skip;
                j0 += skip;
                all_bits = if len == 64 { !0u64 } else { (1u64 << len) - 1 };
                for b in bits[..nt].iter_mut() {
                    *b >>= skip;
                }
            }

            let (ks, kstride): (&[f32], usize) = match k_direct {
                Some(k) => (&k[j0 * kv.stride..], kv.stride),
                None => {
                    for j in 0..len {
                        E::to_f32_slice(&kv.k[(j0 + j) * kv.stride..][..d], &mut kw[j * d..]);
                    }
                    (&kw[..], d)
                }
            };
            // V is always copied (widened) into rows `dp + DPAD` floats apart: read in place
            // with a power-of-two stride, the 64 rows of a PV panel fall into a few L1 sets
            // and evict each other.
            for j in 0..len {
                let row = &mut vw[j * vs_stride..][..dp];
                E::to_f32_slice(&kv.v[(j0 + j) * kv.stride..][..d], row);
                row[d..].fill(0.0);
            }

            scores::<I, MR, NRV>(isa, qt, rp, rv, d, ks, kstride, len, scale, st);
            for (t, &b) in bits[..nt].iter().enumerate() {
                if b == all_bits {
                    continue;
                }
                let mut hidden = !b & all_bits;
                while hidden != 0 {
                    let j = hidden.trailing_zeros() as usize;
                    hidden &= hidden - 1;
                    st[j * rp + t * r..][..r].fill(f32::NEG_INFINITY);
                }
            }
            softmax_tile(isa, st, rp, rv, len, mrow, lrow, alpha);
            let alpha = (!first).then_some(&alpha[..]);
            accumulate_pv::<I, MR, NRV>(isa, st, rp, rows, len, vw, vs_stride, dv, o, dp, alpha);
            first = false;
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

/// Register block `acc[i][v] += sum_{k < kn} a[i * ais + k * aks] * b[k * bks + v * LANES ..]`:
/// `MR` broadcast values times `NRV` loaded registers per step, one FMA chain per accumulator in
/// increasing `k`.
///
/// # Panics
/// If `a` or `b` is too short for the reads (checked once per block).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn block<I: Isa, const MR: usize, const NRV: usize>(
    isa: I,
    a: &[f32],
    ais: usize,
    aks: usize,
    b: &[f32],
    bks: usize,
    kn: usize,
    acc: &mut [[I::V; NRV]; MR],
) {
    let l = I::LANES;
    if kn == 0 {
        return;
    }
    assert!((MR - 1) * ais + (kn - 1) * aks < a.len());
    assert!((kn - 1) * bks + NRV * l <= b.len());
    let mut acc_r = *acc;
    let ap = a.as_ptr();
    let bp = b.as_ptr();
    for k in 0..kn {
        // No closures around intrinsics here: a closure is not compiled with the entry point's
        // target features, so its intrinsics would become out-of-line calls.
        let mut bv = [isa.zero(); NRV];
        for (v, bv) in bv.iter_mut().enumerate() {
            // SAFETY: k < kn and v < NRV, so the read ends at (kn-1)*bks + NRV*l <= b.len().
            *bv = unsafe { isa.load(bp.add(k * bks + v * l)) };
        }
        for (i, acc) in acc_r.iter_mut().enumerate() {
            // SAFETY: i < MR and k < kn, so the index is below (MR-1)*ais + (kn-1)*aks + 1
            // <= a.len().
            let x = isa.splat(unsafe { *ap.add(i * ais + k * aks) });
            for (acc, &bv) in acc.iter_mut().zip(&bv) {
                *acc = isa.mul_add(x, bv, *acc);
            }
        }
    }
    *acc = acc_r;
}

/// Calls `$f::<m>` for the remainder `m` in `1..8` of a blocked loop (`MR <= 8` everywhere).
macro_rules! tail {
    ($m:expr, $f:ident, $($arg:expr),*) => {
        match $m {
            1 => $f::<I, 1, NRV>($($arg),*),
            2 => $f::<I, 2, NRV>($($arg),*),
            3 => $f::<I, 3, NRV>($($arg),*),
            4 => $f::<I, 4, NRV>($($arg),*),
            5 => $f::<I, 5, NRV>($($arg),*),
            6 => $f::<I, 6, NRV>($($arg),*),
            7 => $f::<I, 7, NRV>($($arg),*),
            _ => {}
        }
    };
}

/// `st[j][row] = scale * sum_c ks[j * kstride + c] * qt[c][row]` for `j < len` and the `rv`
/// row registers: row registers in groups of `NRV` (then single ones), keys in blocks of `MR`
/// (then one shorter block).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn scores<I: Isa, const MR: usize, const NRV: usize>(
    isa: I,
    qt: &[f32],
    rp: usize,
    rv: usize,
    d: usize,
    ks: &[f32],
    kstride: usize,
    len: usize,
    scale: f32,
    st: &mut [f32],
) {
    let mut v0 = 0;
    while v0 + NRV <= rv {
        score_rows::<I, MR, NRV>(isa, qt, rp, v0, d, ks, kstride, len, scale, st);
        v0 += NRV;
    }
    while v0 < rv {
        score_rows::<I, MR, 1>(isa, qt, rp, v0, d, ks, kstride, len, scale, st);
        v0 += 1;
    }
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn score_rows<I: Isa, const MR: usize, const NRV: usize>(
    isa: I,
    qt: &[f32],
    rp: usize,
    v0: usize,
    d: usize,
    ks: &[f32],
    kstride: usize,
    len: usize,
    scale: f32,
    st: &mut [f32],
) {
    let mut j = 0;
    while j + MR <= len {
        score_block::<I, MR, NRV>(isa, qt, rp, v0, d, ks, kstride, j, scale, st);
        j += MR;
    }
    tail!(
        len - j,
        score_block,
        isa,
        qt,
        rp,
        v0,
        d,
        ks,
        kstride,
        j,
        scale,
        st
    );
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn score_block<I: Isa, const MR: usize, const NRV: usize>(
    isa: I,
    qt: &[f32],
    rp: usize,
    v0: usize,
    d: usize,
    ks: &[f32],
    kstride: usize,
    j: usize,
    scale: f32,
    st: &mut [f32],
) {
    let l = I::LANES;
    let mut acc = [[isa.zero(); NRV]; MR];
    block::<I, MR, NRV>(
        isa,
        &ks[j * kstride..],
        kstride,
        1,
        &qt[v0 * l..],
        rp,
        d,
        &mut acc,
    );
    let vs = isa.splat(scale);
    for (i, acc) in acc.iter().enumerate() {
        for (v, &x) in acc.iter().enumerate() {
            isa.store_s(&mut st[(j + i) * rp + (v0 + v) * l..], isa.mul(x, vs));
        }
    }
}

/// Online-softmax step over `st[..len][..rv * LANES]`, rows in lanes: new running max, rescale
/// factor `alpha = exp(m_old - m_new)` (0 while a row has seen nothing), `st <- exp(st - m_new)`,
/// `l <- l * alpha + sum_j st[j]` (sum in increasing `j`).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn softmax_tile<I: Isa>(
    isa: I,
    st: &mut [f32],
    rp: usize,
    rv: usize,
    len: usize,
    mrow: &mut [f32],
    lrow: &mut [f32],
    alpha: &mut [f32],
) {
    let l = I::LANES;
    for v in 0..rv {
        let c = v * l;
        let mut mt = isa.splat(f32::NEG_INFINITY);
        for j in 0..len {
            mt = isa.max(mt, isa.load_s(&st[j * rp + c..]));
        }
        let m_old = isa.load_s(&mrow[c..]);
        let m_new = isa.max(m_old, mt);
        // A row with nothing visible so far keeps m = -inf; subtract a finite value instead so
        // -inf - (-inf) never makes NaN (its exps are then exactly 0).
        let m_sub = isa.max(m_new, isa.splat(f32::MIN));
        let a = exp_nonpos_v(isa, isa.sub(m_old, m_sub));
        let mut sum = isa.zero();
        for j in 0..len {
            let s = &mut st[j * rp + c..];
            let e = exp_nonpos_v(isa, isa.sub(isa.load_s(s), m_sub));
            isa.store_s(s, e);
            sum = isa.add(sum, e);
        }
        let l_new = isa.mul_add(isa.load_s(&lrow[c..]), a, sum);
        isa.store_s(&mut lrow[c..], l_new);
        isa.store_s(&mut mrow[c..], m_new);
        isa.store_s(&mut alpha[c..], a);
    }
}

/// `o[row][c] = alpha[row] * o[row][c] + sum_{j < len} st[j][row] * vs[j * vstride + c]` for
/// `row < rows`, `c < dv`: registers of the head dimension in groups of `NRV` (then single),
/// rows in blocks of `MR` (then one shorter block). `alpha = None` on a query tile's first
/// computed key tile: `o` is then written from zero without being read (the same bits as
/// rescaling a zeroed `o` by the 0 or finite `alpha` of that tile).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn accumulate_pv<I: Isa, const MR: usize, const NRV: usize>(
    isa: I,
    st: &[f32],
    rp: usize,
    rows: usize,
    len: usize,
    vs: &[f32],
    vstride: usize,
    dv: usize,
    o: &mut [f32],
    dp: usize,
    alpha: Option<&[f32]>,
) {
    let l = I::LANES;
    let mut c0 = 0;
    while c0 + NRV * l <= dv {
        pv_cols::<I, MR, NRV>(isa, st, rp, rows, len, vs, vstride, c0, o, dp, alpha);
        c0 += NRV * l;
    }
    while c0 < dv {
        pv_cols::<I, MR, 1>(isa, st, rp, rows, len, vs, vstride, c0, o, dp, alpha);
        c0 += l;
    }
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn pv_cols<I: Isa, const MR: usize, const NRV: usize>(
    isa: I,
    st: &[f32],
    rp: usize,
    rows: usize,
    len: usize,
    vs: &[f32],
    vstride: usize,
    c0: usize,
    o: &mut [f32],
    dp: usize,
    alpha: Option<&[f32]>,
) {
    let mut row = 0;
    while row + MR <= rows {
        pv_block::<I, MR, NRV>(isa, st, rp, row, len, vs, vstride, c0, o, dp, alpha);
        row += MR;
    }
    tail!(
        rows - row,
        pv_block,
        isa,
        st,
        rp,
        row,
        len,
        vs,
        vstride,
        c0,
        o,
        dp,
        alpha
    );
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn pv_block<I: Isa, const MR: usize, const NRV: usize>(
    isa: I,
    st: &[f32],
    rp: usize,
    row: usize,
    len: usize,
    vs: &[f32],
    vstride: usize,
    c0: usize,
    o: &mut [f32],
    dp: usize,
    alpha: Option<&[f32]>,
) {
    let l = I::LANES;
    let mut acc = [[isa.zero(); NRV]; MR];
    if let Some(alpha) = alpha {
        for (i, acc) in acc.iter_mut().enumerate() {
            let a = isa.splat(alpha[row + i]);
            for (v, acc) in acc.iter_mut().enumerate() {
                *acc = isa.mul(isa.load_s(&o[(row + i) * dp + c0 + v * l..]), a);
            }
        }
    }
    block::<I, MR, NRV>(isa, &st[row..], 1, rp, &vs[c0..], vstride, len, &mut acc);
    for (i, acc) in acc.iter().enumerate() {
        for (v, &x) in acc.iter().enumerate() {
            isa.store_s(&mut o[(row + i) * dp + c0 + v * l..], x);
        }
    }
}
