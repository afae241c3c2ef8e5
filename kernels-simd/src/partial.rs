//! Partial softmax attention over one chunk of keys, for attention over a KV cache whose keys
//! live in blocks (paged) or in one run (contiguous).
//!
//! The caller cuts the cached keys into chunks at fixed *logical* positions and merges the
//! chunks' states in a fixed order ([`merge_partial`]); inside a chunk every sum runs over the
//! keys in logical order. So the bits depend on neither the physical layout (how the chunk's
//! keys are split into runs) nor on the thread that ran the chunk.

use crate::elem::{load_widened, Elem};
use crate::error::{add, mul, need, ShapeError};
use crate::exp::exp_nonpos_v;
use crate::isa::{dispatch, Isa, WithIsa};
use crate::tier::{active, Tier};

/// Most keys in one chunk.
pub const CHUNK_MAX: usize = 256;

/// A contiguous run of one KV head's keys and values: key `i < len` of the run is
/// `k[i * stride .. i * stride + d]`, value `i` likewise in `v`.
#[derive(Clone, Copy, Debug)]
pub struct KvRun<'a, E> {
    /// Keys.
    pub k: &'a [E],
    /// Values.
    pub v: &'a [E],
    /// Elements between consecutive keys; at least `d` when `len > 1`.
    pub stride: usize,
    /// Keys in the run.
    pub len: usize,
}

/// The softmax state of one query row over some keys: running max `m`, sum `l` of
/// `exp(s - m)`, and the unnormalised output `o = sum exp(s - m) v` (length d). A row that saw
/// no key has `m = -inf`, `l = 0`, `o = 0`.
#[derive(Debug)]
pub struct PartialRows<'a> {
    /// Per row.
    pub m: &'a mut [f32],
    /// Per row.
    pub l: &'a mut [f32],
    /// `[rows][d]`.
    pub o: &'a mut [f32],
}

impl PartialRows<'_> {
    /// Rows `row..row + n` (head dimension `d`).
    #[inline(always)]
    fn rows(&mut self, row: usize, n: usize, d: usize) -> PartialRows<'_> {
        PartialRows {
            m: &mut self.m[row..row + n],
            l: &mut self.l[row..row + n],
            o: &mut self.o[row * d..(row + n) * d],
        }
    }
}

/// Rows of one register block of [`attend_partial`] (one token's heads, four at a time).
const MR: usize = 4;
/// Floats per row of the score scratch: a sub-block padded to whole registers (<= 16 lanes).
const SROW: usize = SUB + 16;
const _: () = assert!(PREFETCH_KEYS >= K_AHEAD * SUB && PREFETCH_KEYS >= V_AHEAD * SUB);
/// Keys per online-softmax step: K and V of a sub-block are read together, so the cache is
/// streamed in small pieces (a paged block of 16 keys per head: one 4 KiB page of K and one
/// of V for head_dim 128 in f16) rather than as a chunk of K, then of V. On a Zen 5 core
/// (BENCHMARKS.md, twelfth session) 16 keys read a cache from memory 4-8% faster than 32 in
/// `attnrt bench decode` (20-23% in the one-thread microbench) and 10% slower from the caches,
/// where decode is short anyway; 64 keys sat between.
const SUB: usize = 16;
/// Keys of the next chunk [`attend_partial_ahead`] uses for prefetching: with one KV head,
/// K lines are prefetched 4 sub-blocks ahead.
pub const PREFETCH_KEYS: usize = 64;
/// Heads (in the order units run: head by head, then the next sub-block) from the one whose
/// keys are scored to the one whose K lines are prefetched meanwhile. From memory on a Zen 5
/// core (BENCHMARKS.md, seventeenth session) 4 read the cache 5-7% faster than 1 once the
/// scores stayed in registers; 2-3 sat between, 6 was slower.
const K_AHEAD: usize = 4;
/// The same for the V lines, from the head whose PV pass runs (one unit after its scores).
const V_AHEAD: usize = 2;

/// Floats of one register on the widest ISA.
const LANES_MAX: usize = 16;

/// Scratch floats [`attend_partial`] needs: the scores of one sub-block of keys for one block
/// of rows, and the same probabilities each filling a register. The same for every head
/// dimension `d` (K and V are read in place).
pub const fn partial_scratch_len(d: usize) -> usize {
    let _ = d;
    2 * MR * SROW + SUB * MR * LANES_MAX + LANES_MAX
}

/// Kernel `partial_f32`: for each query token `t < ranges.len()` and head `h < r` (row
/// `t * r + h`), over the chunk keys `j` in `ranges[t] = lo..hi` (indices into the chunk, the
/// concatenation of `runs`):
/// `s_j = scale * q[row] . k_j`, `m = max s_j`, `p_j = exp(s_j - m)`, `l = sum p_j`,
/// `o = sum p_j v_j`.
///
/// K and V are read in place from the runs (f16 and bf16 widened in registers, exactly), through
/// a table of one pointer per chunk key, so nothing below depends on where runs start. Keys are
/// taken in sub-blocks of 16 (`lo + 16 b ..`) with an online softmax, so the K and V of a
/// sub-block are read together and the next sub-block (or the next chunk's first, given by
/// [`attend_partial_ahead`]) is prefetched meanwhile: per sub-block, `m' = max(m, max s_j)`,
/// `a = exp(m - m')`, `p_j = exp(s_j - m')`, `l = a l + sum p_j`, `o = a o + sum p_j v_j`.
/// Tile: up to 4 rows of one token at a time (the r heads sharing a KV head), so every K and V load
/// serves all of them. Scores: 3 keys x 4 rows in 12 register accumulators (the q register loaded
/// once serves 3 keys), one FMA chain per (key, row) over the head dimension in registers of
/// increasing `c`, then the 4 rows of a key reduced together in one fixed lane order
/// (`reduce_sum4`; two keys at once share its last step, `reduce_sum4x2`, with the same bits). On
/// AVX-512 a whole sub-block with `d` a multiple of 16 is scored 4 keys x 4 rows at a time and its
/// 16 keys reduced as one transposed tree (`Isa::fold_keys4` .. `finish_keys16`), again with
/// `reduce_sum4`'s bits; its 16 scores per row then stay in one register through the softmax.
/// Softmax per row: max and exps over the sub-block's scores in registers (`exp(-inf) = 0` for
/// padding), the sub-block sum as one lane-wise register sum then one reduction. PV: 4 rows x 3
/// registers of the head dimension in 12 accumulators (4 registers in 16 on AVX-512), started
/// from `a o` (from nothing on the first sub-block), one FMA chain per
/// accumulator in increasing `j`, V loaded once per key and register, each probability taken as the
/// FMA's memory operand: broadcast from the scores where the ISA's FMA does that for free
/// (AVX-512), else from a scratch register it fills once per sub-block. A (sub-block, KV head, row
/// block) unit's scores and softmax run before the previous unit's PV (software pipelining), so
/// that the softmax's dependent chain overlaps independent FMAs. The K lines prefetched while a
/// head's keys are scored are those of the head 4 on in unit order (head by head, then the next
/// sub-block); the V lines prefetched during a unit's first PV pass are those of the head
/// after next, so both phases issue prefetches (from memory 8-10% faster than all of them during
/// the scores, BENCHMARKS.md, thirteenth session). The bits of a row depend only on its inputs,
/// `lo..hi`, and the tier (not on the order units run in). Tails: a short last sub-block runs over
/// exactly its keys; 1 or 2 last keys are scored with the same chains; 1-3 leftover rows use a
/// smaller block (the same per-row arithmetic); head-dimension elements past the last whole
/// register are added per key in scalar code after the register part (scores) or as their own
/// scalar chains (PV); `lo == hi` gives `m = -inf`, `l = 0`, `o = 0` without reading anything.
///
/// # Errors
/// A chunk longer than [`CHUNK_MAX`], a range outside the chunk, short slices or scratch;
/// nothing is written then.
#[allow(clippy::too_many_arguments)] // the shape of the problem; a struct would only rename them
pub fn attend_partial<E: Elem>(
    d: usize,
    r: usize,
    q: &[f32],
    runs: &[KvRun<'_, E>],
    ranges: &[(u32, u32)],
    scale: f32,
    out: PartialRows<'_>,
    scratch: &mut [f32],
) -> Result<(), ShapeError> {
    attend_partial_heads(d, r, 1, 0, q, runs, &[], ranges, scale, out, scratch)
}

/// [`attend_partial`], also prefetching the keys of `next` (the start of the chunk the caller
/// attends to next; its first [`PREFETCH_KEYS`] keys are used) while it computes, so that
/// reading the cache from memory overlaps the arithmetic across chunks too. `next` is only a hint: it is never read and
/// does not change the result.
///
/// # Errors
/// Those of [`attend_partial`]; `next` is not checked.
#[allow(clippy::too_many_arguments)] // attend_partial's arguments and the hint
pub fn attend_partial_ahead<E: Elem>(
    d: usize,
    r: usize,
    q: &[f32],
    runs: &[KvRun<'_, E>],
    next: &[KvRun<'_, E>],
    ranges: &[(u32, u32)],
    scale: f32,
    out: PartialRows<'_>,
    scratch: &mut [f32],
) -> Result<(), ShapeError> {
    attend_partial_heads(d, r, 1, 0, q, runs, next, ranges, scale, out, scratch)
}

/// [`attend_partial_ahead`] for `heads` KV heads at once whose keys lie `head_stride` elements
/// apart: key `i` of a run for KV head `g` is `run.k[g * head_stride + i * run.stride..][..d]`
/// (V likewise), as in a paged cache block that holds all KV heads. `q` and `out` are
/// `[heads][rows]` (`rows = ranges.len() * r`, `q` and `o` with `d` floats per row), and
/// `ranges` applies to every head.
///
/// Each row's arithmetic is exactly that of [`attend_partial_ahead`] on its own head (the same
/// bits); only the order of memory reads changes: keys are taken sub-block by sub-block, and
/// inside a sub-block head by head, so a paged cache is read in runs of whole blocks (all
/// heads' keys, then their values) instead of one head's short run per block.
///
/// # Errors
/// Those of [`attend_partial`], with the runs checked for `heads` heads; `heads == 0`.
#[allow(clippy::too_many_arguments)] // attend_partial_ahead's arguments and the head layout
pub fn attend_partial_heads<E: Elem>(
    d: usize,
    r: usize,
    heads: usize,
    head_stride: usize,
    q: &[f32],
    runs: &[KvRun<'_, E>],
    next: &[KvRun<'_, E>],
    ranges: &[(u32, u32)],
    scale: f32,
    out: PartialRows<'_>,
    scratch: &mut [f32],
) -> Result<(), ShapeError> {
    attend_partial_on(
        active(),
        d,
        r,
        heads,
        head_stride,
        q,
        runs,
        next,
        ranges,
        scale,
        out,
        scratch,
    )
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn attend_partial_on<E: Elem>(
    tier: Tier,
    d: usize,
    r: usize,
    heads: usize,
    head_stride: usize,
    q: &[f32],
    runs: &[KvRun<'_, E>],
    next: &[KvRun<'_, E>],
    ranges: &[(u32, u32)],
    scale: f32,
    out: PartialRows<'_>,
    scratch: &mut [f32],
) -> Result<(), ShapeError> {
    if d == 0 || r == 0 || heads == 0 {
        return Err(ShapeError::Invalid {
            what: "attend_partial: d, r and heads (must be > 0)",
            value: 0,
        });
    }
    // Elements from a key of head 0 to the same key of the last head.
    let span = mul(heads - 1, head_stride, "attend_partial: heads")?;
    let mut n = 0usize;
    for run in runs {
        if run.len > 0 {
            if run.len > 1 && run.stride < d {
                return Err(ShapeError::Invalid {
                    what: "attend_partial: run stride",
                    value: run.stride,
                });
            }
            let len = add(
                add(
                    mul(run.len - 1, run.stride, "attend_partial: run")?,
                    d,
                    "attend_partial: run",
                )?,
                span,
                "attend_partial: run",
            )?;
            need("attend_partial: run k", len, run.k.len())?;
            need("attend_partial: run v", len, run.v.len())?;
        }
        n = add(n, run.len, "attend_partial: chunk")?;
    }
    if n > CHUNK_MAX {
        return Err(ShapeError::Invalid {
            what: "attend_partial: chunk length (max CHUNK_MAX)",
            value: n,
        });
    }
    if let Some(&(lo, hi)) = ranges.iter().find(|&&(lo, hi)| lo > hi || hi as usize > n) {
        return Err(ShapeError::Invalid {
            what: "attend_partial: key range",
            value: if lo > hi { lo as usize } else { hi as usize },
        });
    }
    let rows = mul(ranges.len(), r, "attend_partial: rows")?;
    let all_rows = mul(rows, heads, "attend_partial: rows")?;
    need(
        "attend_partial: q",
        mul(all_rows, d, "attend_partial: q")?,
        q.len(),
    )?;
    need("attend_partial: m", all_rows, out.m.len())?;
    need("attend_partial: l", all_rows, out.l.len())?;
    need(
        "attend_partial: o",
        mul(all_rows, d, "attend_partial: o")?,
        out.o.len(),
    )?;
    need(
        "attend_partial: scratch",
        partial_scratch_len(d),
        scratch.len(),
    )?;

    // One pointer per chunk key of head 0: key `at + i` of head `g` is `d` elements from
    // `kp[at + i] + g * head_stride` (`vp` likewise).
    let mut kp = [core::ptr::null::<E>(); CHUNK_MAX];
    let mut vp = [core::ptr::null::<E>(); CHUNK_MAX];
    let mut at = 0;
    for run in runs {
        for i in 0..run.len {
            kp[at + i] = run.k[i * run.stride..][..d + span].as_ptr();
            vp[at + i] = run.v[i * run.stride..][..d + span].as_ptr();
        }
        at += run.len;
    }
    // The next chunk's keys, for prefetching only: any address is fine, none is read.
    let mut nk = [core::ptr::null::<E>(); PREFETCH_KEYS];
    let mut nv = [core::ptr::null::<E>(); PREFETCH_KEYS];
    let mut nn = 0;
    for run in next {
        for i in 0..run.len.min(PREFETCH_KEYS - nn) {
            nk[nn] = run.k.as_ptr().wrapping_add(i * run.stride);
            nv[nn] = run.v.as_ptr().wrapping_add(i * run.stride);
            nn += 1;
        }
    }
    dispatch(
        tier,
        Job {
            d,
            r,
            heads,
            head_stride,
            q,
            kp: &kp[..n],
            vp: &vp[..n],
            nk: &nk[..nn],
            nv: &nv[..nn],
            ranges,
            scale,
            out,
            s: &mut scratch[..partial_scratch_len(d)],
        },
    );
    Ok(())
}

/// Validated arguments: every pointer of `kp` and `vp`, plus `g * head_stride` for
/// `g < heads`, is valid for reading `d` elements.
struct Job<'a, E> {
    d: usize,
    r: usize,
    heads: usize,
    head_stride: usize,
    q: &'a [f32],
    kp: &'a [*const E],
    vp: &'a [*const E],
    nk: &'a [*const E],
    nv: &'a [*const E],
    ranges: &'a [(u32, u32)],
    scale: f32,
    out: PartialRows<'a>,
    s: &'a mut [f32],
}

impl<E: Elem> WithIsa for Job<'_, E> {
    type Output = ();

    #[inline(always)]
    fn run<I: Isa>(self, isa: I) {
        let Job {
            d,
            r,
            heads,
            head_stride,
            q,
            kp,
            vp,
            nk,
            nv,
            ranges,
            scale,
            mut out,
            s,
        } = self;
        let rows = ranges.len() * r;
        let (sa, rest) = s.split_at_mut(MR * SROW);
        let (sb, pb) = rest.split_at_mut(MR * SROW);
        let bufs = [sa, sb];
        for (t, &(lo, hi)) in ranges.iter().enumerate() {
            let (lo, hi) = (lo as usize, hi as usize);
            let block = |g: usize, row: usize| RowBlock {
                d,
                off: g * head_stride,
                pf_off: (g + K_AHEAD) % heads * head_stride,
                pf_ahead: (g + K_AHEAD) / heads * SUB,
                pv_pf_off: (g + V_AHEAD) % heads * head_stride,
                pv_pf_ahead: (g + V_AHEAD) / heads * SUB,
                q: &q[row * d..],
                kp,
                vp,
                nk,
                nv,
                lo,
                hi,
                scale,
            };
            // Units: sub-block by sub-block, and inside one all heads, each head's rows four at
            // a time: the K (then V) lines of a sub-block of every head are read back to back,
            // which a paged cache stores contiguously. A unit's scores and softmax run before
            // the previous unit's PV pass (software pipelining): the softmax's dependent chain
            // (maxima, exps, sums) then overlaps independent FMAs instead of stalling the PV
            // that needs its probabilities. Each row's own sequence of operations is that of
            // one head alone, so the bits do not change. With one unit per sub-block the next
            // unit is the same rows' next sub-block, which needs this one's state: no overlap.
            let units = heads * r.div_ceil(MR);
            let overlap = units > 1;
            let mut pending: Option<(usize, usize, usize, Soft)> = None;
            let mut cur = 0;
            let mut b0 = 0;
            loop {
                for g in 0..heads {
                    let mut h = 0;
                    while h < r {
                        let row = g * rows + t * r + h;
                        let m = (r - h).min(MR);
                        let rows_now = out.rows(row, m, d);
                        let soft = block(g, row).soft_dyn(isa, m, &mut bufs[cur][..], b0, rows_now);
                        if let Some((pg, prow, pm, ps)) = pending.take() {
                            let rows_then = out.rows(prow, pm, d);
                            block(pg, prow).values_dyn(isa, pm, bufs[1 - cur], pb, &ps, rows_then);
                        }
                        if overlap {
                            pending = Some((g, row, m, soft));
                            cur = 1 - cur;
                        } else {
                            let rows_now = out.rows(row, m, d);
                            block(g, row).values_dyn(isa, m, bufs[cur], pb, &soft, rows_now);
                        }
                        h += m;
                    }
                }
                b0 += SUB;
                if b0 >= hi - lo {
                    break;
                }
            }
            if let Some((pg, prow, pm, ps)) = pending.take() {
                let rows_then = out.rows(prow, pm, d);
                block(pg, prow).values_dyn(isa, pm, bufs[1 - cur], pb, &ps, rows_then);
            }
        }
    }
}

/// A unit's softmax state after its scores, waiting for its PV pass: the sub-block's first key
/// `b0` and length, the new running maxima and sums, the rescale factors of the old output.
/// `empty`: the rows see no key (their state is already written).
#[derive(Clone, Copy)]
struct Soft {
    b0: usize,
    len: usize,
    mrow: [f32; 16],
    lrow: [f32; MR],
    alpha: [f32; 16],
    empty: bool,
}

impl Soft {
    /// This state with the sub-block's length, new maxima and sums, and rescale factors.
    #[inline(always)]
    fn finished(mut self, len: usize, mrow: [f32; 16], lrow: &[f32], alpha: [f32; 16]) -> Soft {
        self.len = len;
        self.mrow = mrow;
        self.lrow[..lrow.len()].copy_from_slice(lrow);
        self.alpha = alpha;
        self
    }
}

/// `alpha = exp(m_old - m_new)` for the first `M` rows (lanes past them unused): 0 on the first
/// sub-block (`m_old = -inf`).
#[inline(always)]
fn rescale<I: Isa, const M: usize>(isa: I, mold: &[f32; 16], mnew: &[f32; 16]) -> [f32; 16] {
    let mut alpha = [0.0f32; 16];
    let mut i = 0;
    while i < M {
        let e = exp_nonpos_v(isa, isa.sub(isa.load_s(&mold[i..]), isa.load_s(&mnew[i..])));
        isa.store_s(&mut alpha[i..], e);
        i += I::LANES;
    }
    alpha
}

/// Rows to prefetch, one per key of a sub-block ([`RowBlock::prefetch_rows`]).
#[derive(Clone, Copy)]
enum Prefetch {
    /// Nothing.
    None,
    /// `count` rows `row` bytes apart from `first`.
    Span {
        first: *const u8,
        row: usize,
        count: usize,
    },
    /// The first `n` of `rows`.
    Rows { rows: [*const u8; SUB], n: usize },
}

impl Prefetch {
    /// The first byte of row `j`, if there is one.
    #[inline(always)]
    fn row(&self, j: usize) -> Option<*const u8> {
        match *self {
            Prefetch::None => None,
            Prefetch::Span { first, row, count } => {
                (j < count).then(|| first.wrapping_add(j * row))
            }
            Prefetch::Rows { ref rows, n } => rows[..n].get(j).copied(),
        }
    }
}

/// Up to [`MR`] consecutive rows of one token (queries at `q`, `d` apart) over the keys
/// `lo..hi` of the chunk.
struct RowBlock<'a, E> {
    d: usize,
    /// Elements from head 0's keys (`kp`, `vp`, `nk`, `nv`) to this block's head.
    off: usize,
    /// Elements from head 0's keys to the head whose K lines are prefetched, [`K_AHEAD`]
    /// heads on in unit order (past the last head, wrapping into the next sub-block).
    pf_off: usize,
    /// Keys from the one scored to the one prefetched: [`SUB`] for each wrap past the last
    /// head.
    pf_ahead: usize,
    /// The same for the V lines, which the PV pass prefetches [`V_AHEAD`] heads ahead (a
    /// head's PV runs one unit late, next to the next head's scores).
    pv_pf_off: usize,
    /// Keys from the one read to the one whose V lines are prefetched.
    pv_pf_ahead: usize,
    q: &'a [f32],
    kp: &'a [*const E],
    vp: &'a [*const E],
    nk: &'a [*const E],
    nv: &'a [*const E],
    lo: usize,
    hi: usize,
    scale: f32,
}

impl<E: Elem> RowBlock<'_, E> {
    /// [`RowBlock::soft`] for `m` rows.
    #[inline(always)]
    fn soft_dyn<I: Isa>(
        &self,
        isa: I,
        m: usize,
        s: &mut [f32],
        b0: usize,
        rows: PartialRows<'_>,
    ) -> Soft {
        match m {
            1 => self.soft::<I, 1>(isa, s, b0, rows),
            2 => self.soft::<I, 2>(isa, s, b0, rows),
            3 => self.soft::<I, 3>(isa, s, b0, rows),
            _ => self.soft::<I, MR>(isa, s, b0, rows),
        }
    }

    /// [`RowBlock::values`] for `m` rows.
    #[inline(always)]
    fn values_dyn<I: Isa>(
        &self,
        isa: I,
        m: usize,
        s: &[f32],
        pb: &mut [f32],
        soft: &Soft,
        rows: PartialRows<'_>,
    ) {
        match m {
            1 => self.values::<I, 1>(isa, s, pb, soft, rows),
            2 => self.values::<I, 2>(isa, s, pb, soft, rows),
            3 => self.values::<I, 3>(isa, s, pb, soft, rows),
            _ => self.values::<I, MR>(isa, s, pb, soft, rows),
        }
    }

    /// The first half of folding the sub-block of keys `lo + b0 ..` (at most [`SUB`]) into
    /// the state of `M` rows in `m`, `l` and `o` (`[M][d]`), which `b0 == 0` starts: the
    /// scores into `s` (`[M][SROW]`), turned into probabilities, and the new maxima and sums.
    /// [`RowBlock::values`] finishes it. Rows that see no key get their empty state here.
    #[inline(always)]
    fn soft<I: Isa, const M: usize>(
        &self,
        isa: I,
        s: &mut [f32],
        b0: usize,
        rows: PartialRows<'_>,
    ) -> Soft {
        let PartialRows { m, l, o } = rows;
        let (d, lo, hi) = (self.d, self.lo, self.hi);
        let n = hi - lo;
        let soft = Soft {
            b0,
            len: 0,
            mrow: [f32::NEG_INFINITY; 16],
            lrow: [0.0; MR],
            alpha: [0.0; 16],
            empty: n == 0,
        };
        if n == 0 {
            m.fill(f32::NEG_INFINITY);
            l.fill(0.0);
            o.fill(0.0);
            return soft;
        }
        let lanes = I::LANES;
        let q = &self.q[..M * d];
        let s = &mut s[..M * SROW];
        // Running max and sum per row (lanes past M unused).
        let mut mrow = [f32::NEG_INFINITY; 16];
        let mut lrow = [0.0f32; M];
        if b0 > 0 {
            mrow[..M].copy_from_slice(m);
            lrow.copy_from_slice(l);
        }

        let b1 = (b0 + SUB).min(n);
        let len = b1 - b0;
        if I::KEY_FOLD && len == SUB && d % lanes == 0 {
            // The same steps as below on one register per row, which the scores never leave
            // (no store and reload on the softmax's dependent chain).
            let scores = self.score_sub16::<I, M>(isa, q, lo + b0);
            let mut mnew = mrow;
            for (mn, &row) in mnew[..M].iter_mut().zip(&scores) {
                *mn = mn.max(isa.reduce_max(isa.max(isa.splat(f32::NEG_INFINITY), row)));
            }
            let alpha = rescale::<I, M>(isa, &mrow, &mnew);
            for (i, &row) in scores.iter().enumerate() {
                let e = exp_nonpos_v(isa, isa.sub(row, isa.splat(mnew[i])));
                isa.store_s(&mut s[i * SROW..], e);
                lrow[i] = lrow[i] * alpha[i] + isa.reduce_sum(isa.add(isa.zero(), e));
            }
            return soft.finished(len, mnew, &lrow, alpha);
        } else {
            let mut j = 0;
            while j + 3 <= len {
                self.score_keys::<I, M, 3>(isa, q, lo + b0 + j, s, j);
                j += 3;
            }
            match len - j {
                2 => self.score_keys::<I, M, 2>(isa, q, lo + b0 + j, s, j),
                1 => self.score_keys::<I, M, 1>(isa, q, lo + b0 + j, s, j),
                _ => {}
            }
        }

        // New maxima first (all rows at once below), then exps and sums per row.
        let padded = len.div_ceil(lanes) * lanes;
        let mut mnew = mrow;
        for (i, mn) in mnew[..M].iter_mut().enumerate() {
            let row = &mut s[i * SROW..][..padded];
            row[len..].fill(f32::NEG_INFINITY);
            let mut mv = isa.splat(f32::NEG_INFINITY);
            for c in row.chunks_exact(lanes) {
                mv = isa.max(mv, isa.load_s(c));
            }
            *mn = mn.max(isa.reduce_max(mv));
        }
        let alpha = rescale::<I, M>(isa, &mrow, &mnew);
        for i in 0..M {
            let row = &mut s[i * SROW..][..padded];
            let ms = isa.splat(mnew[i]);
            let mut sum = isa.zero();
            for c in row.chunks_exact_mut(lanes) {
                let e = exp_nonpos_v(isa, isa.sub(isa.load_s(c), ms));
                isa.store_s(c, e);
                sum = isa.add(sum, e);
            }
            lrow[i] = lrow[i] * alpha[i] + isa.reduce_sum(sum);
        }
        soft.finished(len, mnew, &lrow, alpha)
    }

    /// The second half ([`RowBlock::soft`] ran first): `o = alpha o + P V` over the
    /// sub-block's probabilities in `s`, then the rows' new state into `m`, `l` and `o`.
    #[inline(always)]
    fn values<I: Isa, const M: usize>(
        &self,
        isa: I,
        s: &[f32],
        pb: &mut [f32],
        soft: &Soft,
        rows: PartialRows<'_>,
    ) {
        if soft.empty {
            return;
        }
        let PartialRows { m, l, o } = rows;
        let (d, lanes, b0, len) = (self.d, I::LANES, soft.b0, soft.len);
        let s = &s[..M * SROW];
        // The probability registers start on a 64-byte boundary (the scratch has a register's
        // worth of slack for it): a register split over two cache lines costs two reads.
        let skip = pb.as_ptr().align_offset(64).min(LANES_MAX);
        let pb = &mut pb[skip..];
        let dv = d / lanes * lanes;
        let a: Option<&[f32]> = if b0 == 0 {
            None
        } else {
            Some(&soft.alpha[..M])
        };
        // Where an FMA cannot take a broadcast scalar as its operand for free, each
        // probability fills a register (`pb[j][i]`), once per sub-block: the PV blocks then
        // take it as a memory operand of the FMA instead of a broadcast per register block,
        // which also leaves one more register to the accumulators. Else they broadcast
        // from the scores (AVX-512 on a Zen 5 core: 1 x 32768 keys 20.5-21.3 GB/s
        // against 19.3-19.6 through the scratch, BENCHMARKS.md, twelfth session).
        let pb: &[f32] = if I::BROADCAST_OPERAND {
            s
        } else {
            let pb = &mut pb[..len * M * lanes];
            if dv > 0 {
                for (j, pj) in pb.chunks_exact_mut(M * lanes).enumerate() {
                    for (i, p) in pj.chunks_exact_mut(lanes).enumerate() {
                        isa.store_s(p, isa.splat(s[i * SROW + j]));
                    }
                }
            }
            pb
        };
        // The V rows the first pass prefetches, one per key (`Self::pv_pf_off`).
        let mut pf = self.prefetch_rows(self.lo + b0 + self.pv_pf_ahead, len, true, self.pv_pf_off);
        let mut c0 = 0;
        // Four registers of columns where the ISA has 32 registers (16 accumulators).
        if I::LANES == 16 {
            while c0 + 4 * lanes <= dv {
                self.pv_cols::<I, M, 4>(isa, pb, b0, len, c0, o, a, pf);
                (c0, pf) = (c0 + 4 * lanes, Prefetch::None);
            }
        }
        while c0 + 3 * lanes <= dv {
            self.pv_cols::<I, M, 3>(isa, pb, b0, len, c0, o, a, pf);
            (c0, pf) = (c0 + 3 * lanes, Prefetch::None);
        }
        if c0 + 2 * lanes <= dv {
            self.pv_cols::<I, M, 2>(isa, pb, b0, len, c0, o, a, pf);
            (c0, pf) = (c0 + 2 * lanes, Prefetch::None);
        }
        while c0 < dv {
            self.pv_cols::<I, M, 1>(isa, pb, b0, len, c0, o, a, pf);
            (c0, pf) = (c0 + lanes, Prefetch::None);
        }
        let lo = self.lo;
        for c in dv..d {
            for i in 0..M {
                let mut acc = match a {
                    Some(a) => o[i * d + c] * a[i],
                    None => 0.0,
                };
                for jj in 0..len {
                    // SAFETY: c < d and every key pointer plus `off` is valid for d
                    // elements.
                    let v = unsafe { self.vp[lo + b0 + jj].add(self.off + c).read_unaligned() };
                    acc += s[i * SROW + jj] * v.to_f32();
                }
                o[i * d + c] = acc;
            }
        }
        m.copy_from_slice(&soft.mrow[..M]);
        l.copy_from_slice(&soft.lrow[..M]);
    }

    /// The first byte of the K (`values == false`) or V row of chunk key `t`, or of key
    /// `t - chunk` of the next chunk, `off` elements on; `None` past the next chunk's keys.
    #[inline(always)]
    fn row_at(&self, t: usize, values: bool, off: usize) -> Option<*const u8> {
        let n = self.kp.len();
        let (table, next) = if values {
            (self.vp, self.nv)
        } else {
            (self.kp, self.nk)
        };
        let p = if t < n { table[t] } else { *next.get(t - n)? };
        Some(p.wrapping_add(off).cast::<u8>())
    }

    /// Prefetches the lines of one K or V row starting at `p` (any address: a hint), four
    /// lines per step (one step for head_dim 128 in f16).
    #[inline(always)]
    fn prefetch_row<I: Isa>(&self, isa: I, p: *const u8) {
        let bytes = self.d * core::mem::size_of::<E>();
        let mut at = 0;
        while at + 256 <= bytes {
            for line in 0..4 {
                isa.prefetch(p.wrapping_add(at + 64 * line));
            }
            at += 256;
        }
        while at < bytes {
            isa.prefetch(p.wrapping_add(at));
            at += 64;
        }
    }

    /// The K (`values == false`) or V rows of chunk keys `t .. t + count`, `off` elements on
    /// (see [`Self::row_at`]), to prefetch one by one: where the first and last lie `count - 1`
    /// rows apart (a paged block, or a contiguous cache) as the addresses of a span, else as a
    /// table. A span whose middle rows lie elsewhere only prefetches the wrong lines.
    #[inline(always)]
    fn prefetch_rows(&self, t: usize, count: usize, values: bool, off: usize) -> Prefetch {
        let row = self.d * core::mem::size_of::<E>();
        let ends = match count {
            0 => None,
            _ => self
                .row_at(t, values, off)
                .zip(self.row_at(t + count - 1, values, off)),
        };
        if let Some((first, last)) = ends {
            if last as usize == (first as usize).wrapping_add((count - 1) * row) {
                return Prefetch::Span { first, row, count };
            }
        }
        let mut rows = [core::ptr::null::<u8>(); SUB];
        let mut n = 0;
        for (j, p) in rows[..count.min(SUB)].iter_mut().enumerate() {
            match self.row_at(t + j, values, off) {
                Some(row) => *p = row,
                None => break,
            }
            n = j + 1;
        }
        Prefetch::Rows { rows, n }
    }

    /// Lane-wise partial dot products of the `M` rows of `q` (`d` floats each) with the `KB`
    /// keys at `kp`, over the first `dv` elements (a multiple of `LANES`): one FMA chain per
    /// (key, row) in registers of increasing column, each q register loaded once for all keys.
    #[inline(always)]
    fn key_dots<I: Isa, const M: usize, const KB: usize>(
        isa: I,
        q: &[f32],
        d: usize,
        kp: &[*const E; KB],
        dv: usize,
    ) -> [[I::V; M]; KB] {
        debug_assert!(dv <= d && dv.is_multiple_of(I::LANES));
        let qp = q[..M * d].as_ptr();
        let mut acc = [[isa.zero(); M]; KB];
        let mut c = 0;
        while c < dv {
            let mut kv = [isa.zero(); KB];
            for (kv, &p) in kv.iter_mut().zip(kp) {
                // SAFETY: c + LANES <= dv <= d, and every key pointer is valid for d elements
                // (the Job's contract, `off` included by the caller).
                *kv = unsafe { load_widened(isa, p.add(c)) };
            }
            for i in 0..M {
                // SAFETY: i < M and c + LANES <= d, inside `q` (`M * d` floats).
                let qv = unsafe { isa.load(qp.add(i * d + c)) };
                for (acc, &kv) in acc.iter_mut().zip(&kv) {
                    acc[i] = isa.mul_add(qv, kv, acc[i]);
                }
            }
            c += I::LANES;
        }
        acc
    }

    /// Scores of the `KB` keys `key..key + KB` (chunk indices) for the `M` rows, times `scale`,
    /// into `s[i * SROW + at + k]`; prefetches the K lines of the same keys of the next head,
    /// or after the last head, of head 0 a sub-block ahead.
    #[inline(always)]
    fn score_keys<I: Isa, const M: usize, const KB: usize>(
        &self,
        isa: I,
        q: &[f32],
        key: usize,
        s: &mut [f32],
        at: usize,
    ) {
        let (d, lanes) = (self.d, I::LANES);
        let dv = d / lanes * lanes;
        let kp: [*const E; KB] = core::array::from_fn(|k| self.kp[key + k].wrapping_add(self.off));
        let pf = self.prefetch_rows(key + self.pf_ahead, KB, false, self.pf_off);
        for k in 0..KB {
            if let Some(p) = pf.row(k) {
                self.prefetch_row(isa, p);
            }
        }
        let acc = Self::key_dots::<I, M, KB>(isa, q, d, &kp, dv);
        // Lane sums of key k's rows in `sums[k]`, two keys per reduction where there are
        // two: the bits of reduce_sum4 on each key's rows either way.
        let pad = |acc: &[I::V; M]| {
            let mut a4 = [isa.zero(); 4];
            a4[..M].copy_from_slice(acc);
            a4
        };
        let mut sums = [[0.0f32; 4]; KB];
        let mut k = 0;
        while k + 2 <= KB {
            let two = isa.reduce_sum4x2(pad(&acc[k]), pad(&acc[k + 1]));
            sums[k].copy_from_slice(&two[..4]);
            sums[k + 1].copy_from_slice(&two[4..]);
            k += 2;
        }
        if k < KB {
            sums[k] = isa.reduce_sum4(pad(&acc[k]));
        }
        for (k, sums) in sums.iter().enumerate() {
            for i in 0..M {
                let mut x = sums[i];
                for c in dv..d {
                    // SAFETY: c < d and every key pointer (plus `off`) is valid for d elements.
                    x += q[i * d + c] * unsafe { kp[k].add(c).read_unaligned() }.to_f32();
                }
                s[i * SROW + at + k] = x * self.scale;
            }
        }
    }

    /// [`Self::score_keys`] for a whole sub-block of 16 keys on an ISA with [`Isa::KEY_FOLD`]
    /// (16 lanes) and `d` a multiple of 16, with the same bits, returned as one register of 16
    /// scores per row: keys four at a time (16 accumulators, each q load serving four keys),
    /// each group folded to one register per row, and the four groups finished together:
    /// fewer cross-lane shuffles per key than one `reduce_sum4` per key, and no scalar
    /// extraction of the scores.
    #[inline(always)]
    fn score_sub16<I: Isa, const M: usize>(&self, isa: I, q: &[f32], key: usize) -> [I::V; M] {
        const { assert!(SUB == 16) };
        let d = self.d;
        let pf = self.prefetch_rows(key + self.pf_ahead, SUB, false, self.pf_off);
        // Groups 0 and 2 wait in `third` for the next group; `held` keeps the first half.
        let mut held = [isa.zero(); M];
        let mut third = [isa.zero(); M];
        for g in 0..4 {
            let kp: [*const E; 4] =
                core::array::from_fn(|k| self.kp[key + 4 * g + k].wrapping_add(self.off));
            for k in 4 * g..4 * g + 4 {
                if let Some(p) = pf.row(k) {
                    self.prefetch_row(isa, p);
                }
            }
            let acc = Self::key_dots::<I, M, 4>(isa, q, d, &kp, d);
            for i in 0..M {
                let w = isa.fold_keys4([acc[0][i], acc[1][i], acc[2][i], acc[3][i]]);
                match g {
                    0 | 2 => third[i] = w,
                    1 => held[i] = isa.fold_keys8(third[i], w),
                    _ => held[i] = isa.finish_keys16(held[i], isa.fold_keys8(third[i], w)),
                }
            }
        }
        let scale = isa.splat(self.scale);
        for h in held.iter_mut() {
            *h = isa.mul(*h, scale);
        }
        held
    }

    /// `o[i][c] = alpha[i] o[i][c] + sum_{jj < len} p[i][jj] v[lo + b0 + jj][c]` for the `M`
    /// rows and the `NC` registers of `c` from `c0`, `p[i][jj]` at `pb[i * SROW + jj]` (the
    /// scores, where `I::BROADCAST_OPERAND`) or filling the register at
    /// `pb[(jj * M + i) * LANES ..]`; `alpha = None` writes `o` without reading it (the first
    /// sub-block).
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    fn pv_cols<I: Isa, const M: usize, const NC: usize>(
        &self,
        isa: I,
        pb: &[f32],
        b0: usize,
        len: usize,
        c0: usize,
        o: &mut [f32],
        alpha: Option<&[f32]>,
        pf: Prefetch,
    ) {
        let (d, lanes) = (self.d, I::LANES);
        let vp = &self.vp[self.lo + b0..][..len];
        let used = if I::BROADCAST_OPERAND {
            (M - 1) * SROW + len
        } else {
            len * M * lanes
        };
        let pp = pb[..used].as_ptr();
        let mut acc = [[isa.zero(); NC]; M];
        if let Some(alpha) = alpha {
            for (i, acc) in acc.iter_mut().enumerate() {
                let a = isa.splat(alpha[i]);
                for (v, acc) in acc.iter_mut().enumerate() {
                    *acc = isa.mul(isa.load_s(&o[i * d + c0 + v * lanes..]), a);
                }
            }
        }
        for (j, &p) in vp.iter().enumerate() {
            if let Some(p) = pf.row(j) {
                self.prefetch_row(isa, p);
            }
            let mut vv = [isa.zero(); NC];
            for (v, vv) in vv.iter_mut().enumerate() {
                // SAFETY: c0 + NC * LANES <= d, and every key pointer plus `off` is valid for
                // d elements.
                *vv = unsafe { load_widened(isa, p.add(self.off + c0 + v * lanes)) };
            }
            for (i, acc) in acc.iter_mut().enumerate() {
                // SAFETY: i < M and j < len: the float at i * SROW + j (the register at
                // (j * M + i) * LANES) lies inside the `used` floats `pp` was taken from.
                let pj = unsafe {
                    if I::BROADCAST_OPERAND {
                        isa.splat(*pp.add(i * SROW + j))
                    } else {
                        isa.load(pp.add((j * M + i) * lanes))
                    }
                };
                for (acc, &vv) in acc.iter_mut().zip(&vv) {
                    *acc = isa.mul_add(pj, vv, *acc);
                }
            }
        }
        for (i, acc) in acc.iter().enumerate() {
            for (v, &x) in acc.iter().enumerate() {
                isa.store_s(&mut o[i * d + c0 + v * lanes..], x);
            }
        }
    }
}

/// Folds the state `(m2, l2, o2)` of later keys into `(m, l, o)`: the fixed-order merge of
/// chunk states. Rows that saw no key leave the other side unchanged.
pub fn merge_partial(m: &mut f32, l: &mut f32, o: &mut [f32], m2: f32, l2: f32, o2: &[f32]) {
    if m2 == f32::NEG_INFINITY {
        return;
    }
    if *m == f32::NEG_INFINITY {
        *m = m2;
        *l = l2;
        o.copy_from_slice(&o2[..o.len()]);
        return;
    }
    let mx = m.max(m2);
    let (a, b) = (libm::expf(*m - mx), libm::expf(m2 - mx));
    *l = *l * a + l2 * b;
    for (x, &y) in o.iter_mut().zip(o2) {
        *x = *x * a + y * b;
    }
    *m = mx;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{rand_elem, rand_vec};
    use crate::tier::supported;

    /// Independent f64 attention over the whole key set, per row.
    fn reference(
        d: usize,
        r: usize,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        ranges: &[(u32, u32)],
        scale: f32,
    ) -> Vec<f64> {
        let mut out = vec![0.0f64; ranges.len() * r * d];
        for (t, &(lo, hi)) in ranges.iter().enumerate() {
            for h in 0..r {
                let row = t * r + h;
                let qr = &q[row * d..(row + 1) * d];
                let s: Vec<f64> = (lo..hi)
                    .map(|j| {
                        let kj = &k[j as usize * d..(j as usize + 1) * d];
                        qr.iter()
                            .zip(kj)
                            .map(|(a, b)| *a as f64 * *b as f64)
                            .sum::<f64>()
                            * scale as f64
                    })
                    .collect();
                let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let l: f64 = s.iter().map(|x| (x - m).exp()).sum();
                for (jj, j) in (lo..hi).enumerate() {
                    let p = (s[jj] - m).exp() / l;
                    for i in 0..d {
                        out[row * d + i] += p * v[j as usize * d + i] as f64;
                    }
                }
            }
        }
        out
    }

    #[test]
    fn chunks_and_runs_match_the_reference_and_each_other() {
        chunks_and_runs::<half::f16>();
        chunks_and_runs::<half::bf16>();
        chunks_and_runs::<f32>();
    }

    fn chunks_and_runs<E: Elem>() {
        for tier in Tier::ALL.into_iter().filter(|&t| supported(t)) {
            for &(d, r, n) in &[
                (128usize, 4usize, 600usize),
                (18, 1, 257),
                (64, 8, 64),
                (32, 2, 1),
                (40, 3, 300),
                (8, 5, 33),
                // Whole sub-blocks of 16 keys on AVX-512 (d a multiple of 16) with 3 rows,
                // and with a block of 4 rows then 2.
                (48, 3, 290),
                (16, 6, 50),
            ] {
                let q = rand_vec(3 * r * d, 1);
                let kh: Vec<E> = rand_elem(n * d, 2);
                let vh: Vec<E> = rand_elem(n * d, 3);
                let k: Vec<f32> = kh.iter().map(|x| x.to_f32()).collect();
                let v: Vec<f32> = vh.iter().map(|x| x.to_f32()).collect();
                let ranges = [
                    (0u32, n as u32),
                    (n as u32 / 3, n as u32 - n as u32 / 5),
                    (5.min(n) as u32, 5.min(n) as u32),
                ];
                let scale = 1.0 / (d as f32).sqrt();
                let want = reference(d, r, &q, &k, &v, &ranges, scale);
                // Three layouts: chunks of CHUNK_MAX keys as one run, the same chunks split
                // into runs of 16 keys (paged blocks), and runs of 7 keys with the next chunk
                // passed as a prefetch hint. All must give the same bits.
                let mut results = vec![];
                for block in [CHUNK_MAX, 16, 7] {
                    let rows = ranges.len() * r;
                    let (mut m, mut l, mut o) = (
                        vec![f32::NEG_INFINITY; rows],
                        vec![0.0; rows],
                        vec![0.0; rows * d],
                    );
                    let mut scratch = vec![0.0; partial_scratch_len(d)];
                    for c0 in (0..n).step_by(CHUNK_MAX) {
                        let c1 = (c0 + CHUNK_MAX).min(n);
                        let runs_of = |c0: usize, c1: usize| -> Vec<KvRun<'_, E>> {
                            (c0..c1)
                                .step_by(block)
                                .map(|b0| {
                                    let b1 = (b0 + block).min(c1);
                                    KvRun {
                                        k: &kh[b0 * d..b1 * d],
                                        v: &vh[b0 * d..b1 * d],
                                        stride: d,
                                        len: b1 - b0,
                                    }
                                })
                                .collect()
                        };
                        let runs = runs_of(c0, c1);
                        let next = if block == 7 {
                            runs_of(c1, (c1 + CHUNK_MAX).min(n))
                        } else {
                            vec![]
                        };
                        let cr: Vec<(u32, u32)> = ranges
                            .iter()
                            .map(|&(lo, hi)| {
                                let lo = (lo as usize).clamp(c0, c1) - c0;
                                let hi = (hi as usize).clamp(c0, c1) - c0;
                                (lo as u32, hi.max(lo) as u32)
                            })
                            .collect();
                        let (mut pm, mut pl, mut po) =
                            (vec![0.0; rows], vec![0.0; rows], vec![0.0; rows * d]);
                        attend_partial_on(
                            tier,
                            d,
                            r,
                            1,
                            0,
                            &q,
                            &runs,
                            &next,
                            &cr,
                            scale,
                            PartialRows {
                                m: &mut pm,
                                l: &mut pl,
                                o: &mut po,
                            },
                            &mut scratch,
                        )
                        .unwrap();
                        for row in 0..rows {
                            merge_partial(
                                &mut m[row],
                                &mut l[row],
                                &mut o[row * d..(row + 1) * d],
                                pm[row],
                                pl[row],
                                &po[row * d..(row + 1) * d],
                            );
                        }
                    }
                    let got: Vec<f32> = (0..rows * d)
                        .map(|i| {
                            if l[i / d] > 0.0 {
                                o[i] / l[i / d]
                            } else {
                                o[i]
                            }
                        })
                        .collect();
                    for (i, (&g, &w)) in got.iter().zip(&want).enumerate() {
                        assert!(
                            (g as f64 - w).abs() <= 1e-5 * (1.0 + w.abs()),
                            "{tier:?} {} d {d} r {r} n {n} elem {i}: {g} vs {w}",
                            E::NAME
                        );
                    }
                    results.push(got);
                }
                for other in &results[1..] {
                    assert!(
                        results[0]
                            .iter()
                            .zip(other)
                            .all(|(a, b)| a.to_bits() == b.to_bits()),
                        "{tier:?} {} d {d} r {r} n {n}: layout changed the bits",
                        E::NAME
                    );
                }
            }
        }
    }

    /// Several KV heads at once (a paged block holding every head) give each head's bits of
    /// the single-head kernel, on every tier, with and without a prefetch hint.
    #[test]
    fn heads_at_once_match_one_head_at_a_time() {
        heads_at_once::<half::f16>();
        heads_at_once::<half::bf16>();
        heads_at_once::<f32>();
    }

    fn heads_at_once<E: Elem>() {
        for tier in Tier::ALL.into_iter().filter(|&t| supported(t)) {
            let cases = [
                (8usize, 1usize, 2usize, 7usize, 33usize),
                (18, 3, 3, 5, 77),
                (40, 5, 1, 16, 100),
                (128, 4, 8, 16, 256),
            ];
            // Miri (no SIMD tier there) checks the pointer arithmetic on the smallest shape.
            for &(d, r, heads, block, n) in &cases[..if cfg!(miri) { 1 } else { 4 }] {
                let nb = n.div_ceil(block);
                // Pool `[block][head][slot][d]`: head g's key i of block b.
                let at = |b: usize, g: usize, i: usize| ((b * heads + g) * block + i) * d;
                let kh: Vec<E> = rand_elem(nb * heads * block * d, 5);
                let vh: Vec<E> = rand_elem(nb * heads * block * d, 6);
                let ranges = [(0u32, n as u32), (3u32.min(n as u32), (n - n / 4) as u32)];
                let rows = ranges.len() * r;
                let q = rand_vec(heads * rows * d, 7);
                let scale = 0.3;
                let runs = |g: Option<usize>| -> Vec<KvRun<'_, E>> {
                    (0..nb)
                        .map(|b| {
                            let len = block.min(n - b * block);
                            let (s, e) = match g {
                                Some(g) => (at(b, g, 0), at(b, g, len - 1) + d),
                                None => (at(b, 0, 0), at(b, heads - 1, len - 1) + d),
                            };
                            KvRun {
                                k: &kh[s..e],
                                v: &vh[s..e],
                                stride: d,
                                len,
                            }
                        })
                        .collect()
                };
                let mut scratch = vec![0.0; partial_scratch_len(d)];
                let all = runs(None);
                for next in [&all[..0], &all[..1]] {
                    let (mut m, mut l, mut o) = (
                        vec![0.0; heads * rows],
                        vec![0.0; heads * rows],
                        vec![0.0; heads * rows * d],
                    );
                    attend_partial_on(
                        tier,
                        d,
                        r,
                        heads,
                        block * d,
                        &q,
                        &all,
                        next,
                        &ranges,
                        scale,
                        PartialRows {
                            m: &mut m,
                            l: &mut l,
                            o: &mut o,
                        },
                        &mut scratch,
                    )
                    .unwrap();
                    for g in 0..heads {
                        let (mut m1, mut l1, mut o1) =
                            (vec![0.0; rows], vec![0.0; rows], vec![0.0; rows * d]);
                        attend_partial_on(
                            tier,
                            d,
                            r,
                            1,
                            0,
                            &q[g * rows * d..(g + 1) * rows * d],
                            &runs(Some(g)),
                            &[],
                            &ranges,
                            scale,
                            PartialRows {
                                m: &mut m1,
                                l: &mut l1,
                                o: &mut o1,
                            },
                            &mut scratch,
                        )
                        .unwrap();
                        let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
                        let what = format!("{tier:?} {} d {d} r {r} head {g}", E::NAME);
                        assert_eq!(bits(&m[g * rows..][..rows]), bits(&m1), "m {what}");
                        assert_eq!(bits(&l[g * rows..][..rows]), bits(&l1), "l {what}");
                        assert_eq!(bits(&o[g * rows * d..][..rows * d]), bits(&o1), "o {what}");
                        assert!(l1[0] > 0.0, "{what}: the range saw keys");
                    }
                }
                // A run one element short of the last head is refused.
                let mut short = all.clone();
                let last = short.len() - 1;
                let len = short[last].k.len();
                short[last].k = &short[last].k[..len - 1];
                let (mut m, mut l, mut o) = (
                    vec![0.0; heads * rows],
                    vec![0.0; heads * rows],
                    vec![0.0; heads * rows * d],
                );
                assert!(attend_partial_on(
                    tier,
                    d,
                    r,
                    heads,
                    block * d,
                    &q,
                    &short,
                    &[],
                    &ranges,
                    scale,
                    PartialRows {
                        m: &mut m,
                        l: &mut l,
                        o: &mut o,
                    },
                    &mut scratch,
                )
                .is_err());
            }
        }
    }

    /// Every remainder of the 3-key score blocks and of the 32-key sub-blocks (ranges of 0 to
    /// 70 keys starting anywhere in the first sub-block), every split of the head dimension into
    /// 3-, 2- and 1-register PV blocks plus a scalar tail, and 1 to 8 rows per KV head (whole
    /// and partial 4-row blocks), against the f64 reference, on every tier.
    #[test]
    fn every_key_count_and_register_split_matches_the_reference() {
        for tier in Tier::ALL.into_iter().filter(|&t| supported(t)) {
            for &d in &[8usize, 16, 24, 40, 56, 18, 136] {
                for r in [1usize, 2, 3, 4, 5, 8] {
                    let n = 72;
                    let kh: Vec<half::f16> = rand_elem(n * d, 11 + d as u64);
                    let vh: Vec<half::f16> = rand_elem(n * d, 12 + r as u64);
                    let k: Vec<f32> = kh.iter().map(|x| x.to_f32()).collect();
                    let v: Vec<f32> = vh.iter().map(|x| x.to_f32()).collect();
                    // Lengths 0..=70 in steps that cover every residue mod 3 and mod 32 across
                    // the d and r loops; starts off the sub-block grid too.
                    let ranges: Vec<(u32, u32)> = (0..24u32)
                        .map(|i| {
                            let len = (i * 3 + (d as u32 + r as u32) % 3) % 71;
                            let lo = (i * 5) % (n as u32 - len).max(1);
                            (lo, lo + len)
                        })
                        .collect();
                    let rows = ranges.len() * r;
                    let q = rand_vec(rows * d, 13);
                    let scale = 0.25;
                    let runs: Vec<KvRun<'_, half::f16>> = (0..n)
                        .step_by(16)
                        .map(|b0| {
                            let b1 = (b0 + 16).min(n);
                            KvRun {
                                k: &kh[b0 * d..b1 * d],
                                v: &vh[b0 * d..b1 * d],
                                stride: d,
                                len: b1 - b0,
                            }
                        })
                        .collect();
                    let (mut m, mut l, mut o) =
                        (vec![0.0; rows], vec![0.0; rows], vec![0.0; rows * d]);
                    let mut scratch = vec![0.0; partial_scratch_len(d)];
                    attend_partial_on(
                        tier,
                        d,
                        r,
                        1,
                        0,
                        &q,
                        &runs,
                        &[],
                        &ranges,
                        scale,
                        PartialRows {
                            m: &mut m,
                            l: &mut l,
                            o: &mut o,
                        },
                        &mut scratch,
                    )
                    .unwrap();
                    let want = reference(d, r, &q, &k, &v, &ranges, scale);
                    for row in 0..rows {
                        let (lo, hi) = ranges[row / r];
                        if lo == hi {
                            assert_eq!(m[row], f32::NEG_INFINITY, "{tier:?} d {d} r {r}");
                            assert_eq!(l[row], 0.0, "{tier:?} d {d} r {r}");
                            assert!(o[row * d..][..d].iter().all(|&x| x == 0.0));
                            continue;
                        }
                        for i in 0..d {
                            let (g, w) = (o[row * d + i] / l[row], want[row * d + i]);
                            assert!(
                                (g as f64 - w).abs() <= 1e-5 * (1.0 + w.abs()),
                                "{tier:?} d {d} r {r} keys {lo}..{hi} row {row} elem {i}: {g} vs {w}"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn rejects_bad_shapes() {
        let k = [0.0f32; 64];
        let run = [KvRun {
            k: &k[..],
            v: &k[..],
            stride: 4,
            len: 16,
        }];
        let (mut m, mut l, mut o) = ([0.0; 1], [0.0; 1], [0.0; 4]);
        let mut s = vec![0.0; partial_scratch_len(4)];
        let q = [0.0; 4];
        let bad_range = attend_partial(
            4,
            1,
            &q,
            &run,
            &[(0, 17)],
            1.0,
            PartialRows {
                m: &mut m,
                l: &mut l,
                o: &mut o,
            },
            &mut s,
        );
        assert!(bad_range.is_err());
        let long = [KvRun {
            k: &k[..],
            v: &k[..],
            stride: 4,
            len: 17,
        }];
        assert!(attend_partial(
            4,
            1,
            &q,
            &long,
            &[(0, 1)],
            1.0,
            PartialRows {
                m: &mut m,
                l: &mut l,
                o: &mut o
            },
            &mut s
        )
        .is_err());
    }
}
