//! GEMM packing and the register-blocked micro-kernel shared by every tier.

use super::GEMM_NR_MAX;
use crate::elem::{load_widened, Elem};
use crate::isa::Isa;
use core::any::TypeId;
use half::{bf16, f16};

/// One packed panel of W and where its results go.
pub(crate) struct PanelJob<'a> {
    /// Rows of x and y.
    pub m: usize,
    /// Reduction length.
    pub k: usize,
    /// `[m, k]` row-major, length validated `>= m * k`.
    pub x: &'a [f32],
    /// `k` groups of `NR` widened weights (column `c` of group `kk` is `w[j0 + c][kk]`), then
    /// `NR` biases; length `>= NR * (k + 1)`.
    pub panel: &'a [f32],
    /// Whether to add the packed biases.
    pub has_bias: bool,
    /// Output; row `i` of the panel's columns starts at `i * y_stride + col0`; validated to hold
    /// `(m - 1) * y_stride + col0 + nc` elements.
    pub y: &'a mut [f32],
    /// Distance between output rows.
    pub y_stride: usize,
    /// Offset of the panel's first column inside a row of `y`.
    pub col0: usize,
    /// Valid columns of the panel (`1..=NR`); the rest are zero padding.
    pub nc: usize,
}

/// Reduction steps packed per pass over the rows of a panel.
const PACK_CH: usize = 64;
/// How many chunks ahead of the one being packed each row of W is prefetched (x86-64 only,
/// the one target with a prefetch hint here).
#[cfg(target_arch = "x86_64")]
const PACK_AHEAD: usize = 4;

/// Hints the cache lines of `row`'s elements `PACK_AHEAD * PACK_CH` further on (within the same
/// row of W or just past it; a prefetch never faults, so the end of `w` needs no care).
#[inline(always)]
fn prefetch_ahead<E>(row: &[E]) {
    #[cfg(target_arch = "x86_64")]
    {
        let bytes = PACK_CH * core::mem::size_of::<E>();
        let p = row.as_ptr().cast::<i8>().wrapping_add(PACK_AHEAD * bytes);
        let mut off = 0;
        while off < bytes {
            // SAFETY: PREFETCHT0 is an SSE instruction (baseline on x86-64) and only a hint: it
            // never faults and has no architectural effect, whatever the address.
            unsafe {
                core::arch::x86_64::_mm_prefetch::<{ core::arch::x86_64::_MM_HINT_T0 }>(
                    p.wrapping_add(off),
                )
            };
            off += 64;
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = row;
}

/// Packs W rows `j0 .. j0 + nc` (and their biases) into `panel` as `k` groups of
/// `I::GEMM_NR` floats, so the micro-kernel reads one contiguous group per reduction step;
/// columns `nc..` are zeros. Widening happens here, once per panel, not once per output row.
///
/// Rows go `LANES` at a time, each group swept over the whole reduction: blocks of `LANES`
/// steps are loaded row by row (contiguous, widened in registers) into a `[LANES][LANES]` tile
/// whose padding rows stay zero, and the ISA's transpose stores the tile into `LANES` groups;
/// the last `k % LANES` steps go element by element. At one token this pack is most of a
/// projection's time (the micro-kernel then does 2 FMAs per group), so it is the ISA's
/// shuffles rather than a scalar scatter of every weight, and it reads `LANES` rows of W side
/// by side rather than the panel's `GEMM_NR` (on a Zen 5 core, m = 1: bf16 8.6 -> 12 GFLOP/s).
#[inline(always)]
pub(crate) fn pack_panel<I: Isa, E: Elem>(
    isa: I,
    panel: &mut [f32],
    k: usize,
    w: &[E],
    bias: Option<&[E]>,
    j0: usize,
    nc: usize,
) {
    let (nr, l) = (I::GEMM_NR, I::LANES);
    let panel = &mut panel[..nr * (k + 1)];
    let rows: [&[E]; GEMM_NR_MAX] =
        core::array::from_fn(|c| if c < nc { &w[(j0 + c) * k..][..k] } else { &[] });
    let rows = &rows[..nc];
    let mut tile = [0.0f32; TILE_LANES_MAX * TILE_LANES_MAX];
    let tile = &mut tile[..l * l];
    let full = k - k % l;
    let pairs = has_pair_tile::<I, E>();
    for g0 in (0..nr).step_by(l) {
        let group = &rows[g0.min(rows.len())..(g0 + l).min(rows.len())];
        tile.fill(0.0);
        let mut kb = 0;
        if pairs && group.len() == 16 {
            // bf16 on an ISA with the pair tile: 32 steps of 16 rows per transpose, widened in
            // registers and stored straight into the panel (same values: widening is exact).
            // At m = 16 the pack was most of the GEMM's time.
            // bf16 is a u16 underneath (`repr(transparent)`, checked above).
            let bits = group[0].as_ptr().cast::<u16>();
            while kb + 32 <= k {
                if kb.is_multiple_of(PACK_CH) {
                    for row in group {
                        prefetch_ahead(&row[kb..]);
                    }
                }
                // SAFETY: the group's 16 rows are consecutive rows of W, `k` apart, each
                // holding k >= kb + 32 elements.
                let t = unsafe { isa.bf16_pairs(bits.add(kb), k) };
                for (c, &t) in t.iter().enumerate() {
                    let at = (kb + 2 * c) * nr + g0;
                    isa.store_s(&mut panel[at..at + 16], isa.bf16_even(t));
                    isa.store_s(&mut panel[at + nr..at + nr + 16], isa.bf16_odd(t));
                }
                kb += 32;
            }
        }
        while kb < full {
            if kb.is_multiple_of(PACK_CH) {
                for row in group {
                    prefetch_ahead(&row[kb..]);
                }
            }
            for (c, row) in group.iter().enumerate() {
                let src = &row[kb..kb + l];
                // SAFETY: `src` holds the LANES elements the load reads.
                let v = unsafe { load_widened(isa, src.as_ptr()) };
                isa.store_s(&mut tile[c * l..], v);
            }
            isa.transpose(tile, l, l, l, &mut panel[kb * nr + g0..], nr);
            kb += l;
        }
    }
    for (kk, group) in panel[nr * full..nr * k].chunks_exact_mut(nr).enumerate() {
        for (c, g) in group.iter_mut().enumerate() {
            *g = rows.get(c).map_or(0.0, |row| row[full + kk].to_f32());
        }
    }
    let b = &mut panel[nr * k..];
    if let Some(bias) = bias {
        for (dst, v) in b.iter_mut().zip(&bias[j0..j0 + nc]) {
            *dst = v.to_f32();
        }
    }
}

/// The most lanes of any tier (AVX-512's 16): the width of the pack's tile.
const TILE_LANES_MAX: usize = 16;

/// Runs the `MR x (NRV * LANES)` micro-kernel over all rows of the panel: full `MR`-row blocks,
/// then the remaining `< MR` rows with a shorter instance of the same kernel (so a row's bits
/// do not depend on which block it falls in).
#[inline(always)]
pub(crate) fn panel<I: Isa, const MR: usize, const NRV: usize>(isa: I, job: &mut PanelJob<'_>) {
    debug_assert_eq!(I::GEMM_NR, NRV * I::LANES);
    debug_assert!(MR <= 8 && I::GEMM_NR <= GEMM_NR_MAX);
    let mut i = 0;
    while i + MR <= job.m {
        tile::<I, MR, NRV>(isa, job, i);
        i += MR;
    }
    match job.m - i {
        1 => tile::<I, 1, NRV>(isa, job, i),
        2 => tile::<I, 2, NRV>(isa, job, i),
        3 => tile::<I, 3, NRV>(isa, job, i),
        4 => tile::<I, 4, NRV>(isa, job, i),
        5 => tile::<I, 5, NRV>(isa, job, i),
        6 => tile::<I, 6, NRV>(isa, job, i),
        7 => tile::<I, 7, NRV>(isa, job, i),
        _ => {}
    }
}

/// Kernel `gemm_f32_R x (NRV*LANES)` micro-tile: `y[i0 + r][c] = sum_kk x[i0 + r][kk] *
/// panel[kk][c] (+ bias[c])` for `r < R`, `c < nc`.
///
/// Tile: R rows x NRV registers of accumulators, held in registers across the whole reduction
/// (per tier: scalar 4x4, AVX2 6x16, AVX-512 8x32, NEON 8x8). Each step loads NRV panel registers
/// and broadcasts one x value per row; each accumulator is one FMA chain in increasing `kk`.
/// Column tail: the panel is zero-padded, results go through a stack buffer and only `nc` columns
/// are stored. Row tail: handled by the caller with a smaller R. No alignment assumed.
#[inline(always)]
fn tile<I: Isa, const R: usize, const NRV: usize>(isa: I, job: &mut PanelJob<'_>, i0: usize) {
    let k = job.k;
    let l = I::LANES;
    let nr = NRV * l;
    // Slicing checks what the hot loop then relies on: rows i0..i0+R < m each hold k floats of
    // x (x.len() >= m*k was validated), and the panel holds nr*(k+1) floats.
    let xr: [&[f32]; R] = core::array::from_fn(|r| &job.x[(i0 + r) * k..][..k]);
    let xp: [*const f32; R] = core::array::from_fn(|r| xr[r].as_ptr());
    let panel = &job.panel[..nr * (k + 1)];
    let bp = panel.as_ptr();
    let mut acc = [[isa.zero(); NRV]; R];
    for kk in 0..k {
        let mut b = [isa.zero(); NRV];
        for (v, b) in b.iter_mut().enumerate() {
            // SAFETY: kk < k and v*l + l <= nr, so the read stays inside panel[..nr*k].
            *b = unsafe { isa.load(bp.add(kk * nr + v * l)) };
        }
        for r in 0..R {
            // SAFETY: kk < k and row r's slice xr[r] holds k floats.
            let a = isa.splat(unsafe { *xp[r].add(kk) });
            for v in 0..NRV {
                acc[r][v] = isa.mul_add(a, b[v], acc[r][v]);
            }
        }
    }
    if job.has_bias {
        for v in 0..NRV {
            let bias = isa.load_s(&panel[nr * k + v * l..]);
            for row in acc.iter_mut() {
                row[v] = isa.add(row[v], bias);
            }
        }
    }
    let nc = job.nc;
    for (r, row) in acc.iter().enumerate() {
        let start = (i0 + r) * job.y_stride + job.col0;
        let out = &mut job.y[start..start + nc];
        if nc == nr {
            for (v, &a) in row.iter().enumerate() {
                isa.store_s(&mut out[v * l..], a);
            }
        } else {
            let mut buf = [0.0f32; GEMM_NR_MAX];
            for (v, &a) in row.iter().enumerate() {
                isa.store_s(&mut buf[v * l..], a);
            }
            out.copy_from_slice(&buf[..nc]);
        }
    }
}

/// Whether weights of type `E` can go through the ISA's bf16 pair tile ([`Isa::bf16_pairs`]):
/// bf16 on an ISA that has it. The pack reads W as u16 bits only then ([`gemv_pairs`] also for
/// f16).
#[inline(always)]
fn has_pair_tile<I: Isa, E: Elem>() -> bool {
    I::BF16_PAIRS == 16 && TypeId::of::<E>() == TypeId::of::<bf16>()
}

/// Rows of x up to which bf16 (and f16) weights go through [`gemv_pairs`] where the ISA has
/// [`Isa::bf16_pairs`]: on a Zen 5 core (`gemm_bench`, one thread, bf16 GFLOP/s, panels against
/// this path) m = 1 12 -> 23, 4 54 -> 87, 8 84-96 -> 131, 12 118 -> 140 (fifteenth session); with
/// accumulators in registers 16 rows spilled (132-140 -> 113), in two parts (`GEMV_REG_ROWS`)
/// 13 rows 123 -> 146 and 16 133-140 -> 146-158 (sixteenth session).
pub(crate) const GEMV_M_MAX: usize = 16;
/// Rows of x whose accumulators stay in registers for a whole group of columns; more rows take
/// the block in two parts, the first this many rows: 16 accumulators beside the 16 transposed
/// registers spill, and two parts were slower than one up to 12 rows (m = 10 137-150 -> 113-137).
const GEMV_REG_ROWS: usize = 12;
/// Elements of each row of W that [`gemv_pairs`] prefetches ahead of the ones it reads (512
/// bytes): on a Zen 5 core 128-256 read 26.5 GB/s in a throwaway bench, 512 24.5, 1024 22.5,
/// none 22.6 (fifteenth session).
const GEMV_AHEAD: usize = 256;
/// Rows of x up to which [`gemv_rows`] takes two groups of 16 columns at once
/// ([`gemv_pair`]): with one row each group is one FMA chain, whose latency (32 dependent FMAs
/// per block of W) bounds the loop. On a Zen 5 core (`gemm_bench`, one thread, bf16, seventeenth
/// session) m = 1 went 23-25 -> 28-34 GFLOP/s (a 96 MiB weight, from memory: 24.5 -> 29-31);
/// m = 2 42-50 against 52-54 without, m = 3 and 4 within the noise.
const GEMV_PAIR_ROWS: usize = 1;
/// Blocks of 32 steps by which the second group of a pair trails the first: the 32 rows of W
/// lie 2k bytes apart, so lines at the same step share an L1 set, and 32 of them overflow it.
const GEMV_PAIR_LAG: usize = 2;
/// [`GEMV_AHEAD`] for the pairs: twice the rows in flight, half the distance.
const GEMV_PAIR_AHEAD: usize = 128;

/// A few rows of x against whole groups of 16 rows of a bf16 or f16 W, read in place.
pub(crate) struct GemvJob<'a, E> {
    /// Rows of x and y, `1..=GEMV_M_MAX`.
    pub m: usize,
    /// Reduction length.
    pub k: usize,
    /// `[m, k]` row-major, validated.
    pub x: &'a [f32],
    /// W, `[n, k]`, validated.
    pub w: &'a [E],
    /// All `n` biases, validated.
    pub bias: Option<&'a [E]>,
    /// Rows of W (columns of y) to compute, a multiple of 16 long.
    pub cols: core::ops::Range<usize>,
    /// As [`PanelJob::y`], column `cols.start` at offset `col0`.
    pub y: &'a mut [f32],
    /// As [`PanelJob::y_stride`].
    pub y_stride: usize,
    /// Offset in a row of `y` of column `cols.start`.
    pub col0: usize,
}

/// Whether [`gemv_pairs`] takes weights of type `E`: bf16 or f16 (16-bit pairs the tile
/// moves as bits, widened by type) on an ISA with the tile.
#[inline(always)]
fn gemv_takes<I: Isa, E: Elem>() -> bool {
    has_pair_tile::<I, E>() || (I::BF16_PAIRS == 16 && is_f16::<E>())
}

#[inline(always)]
fn is_f16<E: Elem>() -> bool {
    TypeId::of::<E>() == TypeId::of::<f16>()
}

/// The GEMM for a few rows of x and bf16 or f16 weights, with the same bits as the panel path
/// (one FMA chain per element in increasing `k`, then the bias) and no panel: 16 rows of W are
/// read 32 steps at a time, their 16-bit pairs transposed in registers ([`Isa::bf16_pairs`])
/// and widened (bf16 by a shift or a mask, f16 by a narrowing and a conversion), each register
/// feeding its step's FMAs at once. At one token the panel path spends most of its time
/// packing (bf16 m = 1: 13 GFLOP/s on a Zen 5 core). Returns false, computing nothing, unless
/// `E` is bf16 or f16 and the ISA has the tile.
#[inline(always)]
pub(crate) fn gemv_pairs<I: Isa, E: Elem>(isa: I, job: &mut GemvJob<'_, E>) -> bool {
    if !gemv_takes::<I, E>() {
        return false;
    }
    match job.m {
        1 => gemv_rows::<I, E, 1>(isa, job),
        2 => gemv_rows::<I, E, 2>(isa, job),
        3 => gemv_rows::<I, E, 3>(isa, job),
        4 => gemv_rows::<I, E, 4>(isa, job),
        5 => gemv_rows::<I, E, 5>(isa, job),
        6 => gemv_rows::<I, E, 6>(isa, job),
        7 => gemv_rows::<I, E, 7>(isa, job),
        8 => gemv_rows::<I, E, 8>(isa, job),
        9 => gemv_rows::<I, E, 9>(isa, job),
        10 => gemv_rows::<I, E, 10>(isa, job),
        11 => gemv_rows::<I, E, 11>(isa, job),
        12 => gemv_rows::<I, E, GEMV_REG_ROWS>(isa, job),
        13 => gemv_rows_in_parts::<I, E, 13, 5>(isa, job),
        14 => gemv_rows_in_parts::<I, E, 14, 6>(isa, job),
        15 => gemv_rows_in_parts::<I, E, 15, 7>(isa, job),
        _ => gemv_rows_in_parts::<I, E, GEMV_M_MAX, 8>(isa, job),
    }
    true
}

/// [`gemv_pairs`] for `R <= GEMV_REG_ROWS` rows of x, their accumulators in registers.
#[inline(always)]
fn gemv_rows<I: Isa, E: Elem, const R: usize>(isa: I, job: &mut GemvJob<'_, E>) {
    debug_assert_eq!(job.m, R);
    debug_assert!(job.cols.len().is_multiple_of(16));
    let k = job.k;
    let full = k - k % 32;
    let xr: [&[f32]; R] = core::array::from_fn(|r| &job.x[r * k..][..k]);
    let mut j = job.cols.start;
    if R <= GEMV_PAIR_ROWS {
        while j + 32 <= job.cols.end {
            gemv_pair(isa, job, j, &xr);
            j += 32;
        }
    }
    while j < job.cols.end {
        let mut acc = [isa.zero(); R];
        let mut kb = 0;
        while kb < full {
            let t = gemv_tile::<I, E, GEMV_AHEAD>(isa, job, j, kb);
            gemv_steps::<I, E, R>(isa, &t, &xr, kb, &mut acc);
            kb += 32;
        }
        gemv_finish(isa, job, j, &xr, acc);
        j += 16;
    }
}

/// The two groups of 16 columns from `j` for `R` rows of x, their FMAs interleaved step by
/// step so that the two groups' chains overlap, the second group [`GEMV_PAIR_LAG`] blocks
/// behind the first. Each element keeps its one chain in increasing `k`. Each block's
/// transposed registers go through memory (volatile, so that the compiler cannot keep both
/// groups' 32 registers live and spill in the FMA loop): the stores and loads take no FMA slot.
#[inline(always)]
fn gemv_pair<I: Isa, E: Elem, const R: usize>(
    isa: I,
    job: &mut GemvJob<'_, E>,
    j: usize,
    xr: &[&[f32]; R],
) {
    let blocks = job.k / 32;
    let mut acc = [[isa.zero(); R]; 2];
    let mut tiles = [[isa.zero(); 16]; 2];
    for t in 0..blocks + GEMV_PAIR_LAG {
        // The block each group is at, if it is inside W.
        let at = [
            Some(t).filter(|&b| b < blocks),
            t.checked_sub(GEMV_PAIR_LAG).filter(|&b| b < blocks),
        ];
        for (g, tile) in tiles.iter_mut().enumerate() {
            if let Some(b) = at[g] {
                let loaded = gemv_tile::<I, E, GEMV_PAIR_AHEAD>(isa, job, j + 16 * g, 32 * b);
                for (dst, v) in tile.iter_mut().zip(loaded) {
                    // SAFETY: `dst` is a place of a local array: valid and aligned.
                    unsafe { core::ptr::write_volatile(dst, v) };
                }
            }
        }
        // The cases apart, so that the step loop tests nothing.
        let [first, second] = &mut acc;
        match at {
            [Some(b0), Some(b1)] => {
                for (c, (t0, t1)) in tiles[0].iter().zip(&tiles[1]).enumerate() {
                    gemv_held_step::<I, E, R>(isa, t0, xr, 32 * b0, c, first);
                    gemv_held_step::<I, E, R>(isa, t1, xr, 32 * b1, c, second);
                }
            }
            [Some(b), None] => {
                for (c, t) in tiles[0].iter().enumerate() {
                    gemv_held_step::<I, E, R>(isa, t, xr, 32 * b, c, first);
                }
            }
            [None, Some(b)] => {
                for (c, t) in tiles[1].iter().enumerate() {
                    gemv_held_step::<I, E, R>(isa, t, xr, 32 * b, c, second);
                }
            }
            [None, None] => {}
        }
    }
    for (g, acc) in acc.into_iter().enumerate() {
        gemv_finish(isa, job, j + 16 * g, xr, acc);
    }
}

/// [`gemv_pairs`] for `R = 8 + S` rows of x (`GEMV_REG_ROWS < R <= GEMV_M_MAX`): each block's
/// transposed registers serve rows 0..8, then the other `S`, each part's accumulators loaded
/// from memory before it and stored after (loads and stores take no FMA slot). Every element
/// keeps its one FMA chain in increasing `k`.
#[inline(always)]
fn gemv_rows_in_parts<I: Isa, E: Elem, const R: usize, const S: usize>(
    isa: I,
    job: &mut GemvJob<'_, E>,
) {
    const { assert!(R == 8 + S && R > GEMV_REG_ROWS && R <= GEMV_M_MAX) };
    debug_assert_eq!(job.m, R);
    debug_assert!(job.cols.len().is_multiple_of(16));
    let k = job.k;
    let full = k - k % 32;
    let xr: [&[f32]; R] = core::array::from_fn(|r| &job.x[r * k..][..k]);
    let mut j = job.cols.start;
    while j < job.cols.end {
        let mut held = [[0.0f32; 16]; R];
        let mut kb = 0;
        while kb < full {
            let t = gemv_tile::<I, E, GEMV_AHEAD>(isa, job, j, kb);
            let (first, second) = held.split_at_mut(8);
            gemv_part::<I, E, 8>(isa, &t, &xr[..8], kb, first);
            gemv_part::<I, E, S>(isa, &t, &xr[8..], kb, second);
            kb += 32;
        }
        let mut acc = [isa.zero(); R];
        for (a, h) in acc.iter_mut().zip(&held) {
            *a = isa.load_s(h);
        }
        gemv_finish(isa, job, j, &xr, acc);
        j += 16;
    }
}

/// The 16 rows of W from column `j` at steps `kb..kb + 32` as 16-bit pairs transposed
/// ([`Isa::bf16_pairs`]), after prefetching the same rows `AHEAD` steps on.
#[inline(always)]
fn gemv_tile<I: Isa, E: Elem, const AHEAD: usize>(
    isa: I,
    job: &GemvJob<'_, E>,
    j: usize,
    kb: usize,
) -> [I::V; 16] {
    let k = job.k;
    let rows = &job.w[j * k..(j + 16) * k];
    // bf16 and f16 are u16 underneath (`repr(transparent)`; the caller checked E is one).
    let bits = rows.as_ptr().cast::<u16>();
    for i in 0..16 {
        isa.prefetch(bits.wrapping_add(i * k + kb + AHEAD).cast());
    }
    assert!(kb + 32 <= k, "a whole block of 32 steps");
    // SAFETY: rows i < 16 of `rows` hold k >= kb + 32 elements each, `k` apart.
    unsafe { isa.bf16_pairs(bits.add(kb), k) }
}

/// [`gemv_step`] on a transposed register [`gemv_pair`] keeps in memory.
#[inline(always)]
fn gemv_held_step<I: Isa, E: Elem, const N: usize>(
    isa: I,
    held: &I::V,
    x: &[&[f32]],
    kb: usize,
    c: usize,
    acc: &mut [I::V; N],
) {
    // SAFETY: `held` is a reference: valid and aligned; volatile only keeps the load.
    let t = unsafe { core::ptr::read_volatile(held) };
    gemv_step::<I, E, N>(isa, t, x, kb, c, acc);
}

/// The 32 steps of one transposed block `t` for rows `x` of x into `acc`, step pair by step
/// pair ([`gemv_step`]).
#[inline(always)]
fn gemv_steps<I: Isa, E: Elem, const N: usize>(
    isa: I,
    t: &[I::V; 16],
    x: &[&[f32]],
    kb: usize,
    acc: &mut [I::V; N],
) {
    for (c, &t) in t.iter().enumerate() {
        gemv_step::<I, E, N>(isa, t, x, kb, c, acc);
    }
}

/// Step pair `c` of a block (transposed register `t`) for rows `x` of x into `acc`: the even,
/// then the odd step, one FMA per row each.
#[inline(always)]
fn gemv_step<I: Isa, E: Elem, const N: usize>(
    isa: I,
    t: I::V,
    x: &[&[f32]],
    kb: usize,
    c: usize,
    acc: &mut [I::V; N],
) {
    let (even, odd) = if is_f16::<E>() {
        (isa.f16_even(t), isa.f16_odd(t))
    } else {
        (isa.bf16_even(t), isa.bf16_odd(t))
    };
    for r in 0..N {
        acc[r] = isa.mul_add(isa.splat(x[r][kb + 2 * c]), even, acc[r]);
    }
    for r in 0..N {
        acc[r] = isa.mul_add(isa.splat(x[r][kb + 2 * c + 1]), odd, acc[r]);
    }
}

/// [`gemv_steps`] for `N` rows whose accumulators wait in `held` between blocks.
#[inline(always)]
fn gemv_part<I: Isa, E: Elem, const N: usize>(
    isa: I,
    t: &[I::V; 16],
    x: &[&[f32]],
    kb: usize,
    held: &mut [[f32; 16]],
) {
    let mut acc = [isa.zero(); N];
    for (a, h) in acc.iter_mut().zip(&*held) {
        *a = isa.load_s(h);
    }
    gemv_steps::<I, E, N>(isa, t, x, kb, &mut acc);
    for (a, h) in acc.iter().zip(held) {
        isa.store_s(h, *a);
    }
}

/// The steps past the last whole block, the bias, and the store of the `R` rows' 16 columns
/// from `j`.
#[inline(always)]
fn gemv_finish<I: Isa, E: Elem, const R: usize>(
    isa: I,
    job: &mut GemvJob<'_, E>,
    j: usize,
    xr: &[&[f32]; R],
    mut acc: [I::V; R],
) {
    let k = job.k;
    let rows = &job.w[j * k..(j + 16) * k];
    for kk in k - k % 32..k {
        let mut col = [0.0f32; 16];
        for (i, c) in col.iter_mut().enumerate() {
            *c = rows[i * k + kk].to_f32();
        }
        let wv = isa.load_s(&col);
        for r in 0..R {
            acc[r] = isa.mul_add(isa.splat(xr[r][kk]), wv, acc[r]);
        }
    }
    if let Some(b) = job.bias {
        let mut bias = [0.0f32; 16];
        for (dst, v) in bias.iter_mut().zip(&b[j..j + 16]) {
            *dst = v.to_f32();
        }
        let bias = isa.load_s(&bias);
        for a in acc.iter_mut() {
            *a = isa.add(*a, bias);
        }
    }
    let col = job.col0 + (j - job.cols.start);
    for (r, &a) in acc.iter().enumerate() {
        isa.store_s(&mut job.y[r * job.y_stride + col..][..16], a);
    }
}
