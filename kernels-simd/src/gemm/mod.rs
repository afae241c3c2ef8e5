//! `y = x W^T (+ bias)`: the projection GEMM, with W in the `[out, in]` layout of a linear layer.

pub(crate) mod kernel;

use crate::elem::Elem;
use crate::error::{add, mul, need, ShapeError};
use crate::isa::{dispatch, Isa, WithIsa};
use crate::tier::{active, Tier};
use core::ops::Range;
use kernel::{gemv_pairs, pack_panel, GemvJob, PanelJob, GEMV_M_MAX};

/// The widest GEMM panel of any tier (AVX-512's 32 columns); sizes the scratch.
pub const GEMM_NR_MAX: usize = 32;

/// Scratch floats [`gemm`] and [`gemm_cols`] need for reduction length `k`: one packed panel of
/// `GEMM_NR_MAX` columns of W plus its bias.
pub const fn gemm_scratch_len(k: usize) -> usize {
    GEMM_NR_MAX.saturating_mul(k.saturating_add(1))
}

/// The problem size: `x` is `[m, k]`, W is `[n, k]`, y is `[m, n]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GemmShape {
    /// Rows of x and y (tokens).
    pub m: usize,
    /// Output features: rows of W, columns of y.
    pub n: usize,
    /// Input features: the reduction length.
    pub k: usize,
}

/// `y[i][j] = sum_k x[i][k] * w[j][k] (+ bias[j])` for all `i < m`, `j < n`, on the [`active`]
/// tier. `x` is row-major `[m, k]`, `w` row-major `[n, k]`, `y[i][j]` is written at
/// `y[i * y_stride + j]` (other elements of `y` are untouched).
///
/// W is widened to f32 once per packed panel; accumulation is f32, one fused multiply-add chain
/// per output element in increasing `k`, then the bias. So each element's bits are independent of
/// `m`, `n`, the position of its row or column, and of any split into [`gemm_cols`] ranges or row
/// blocks: parallel callers get the same bits as a single call.
///
/// # Errors
/// A slice shorter than the shape needs, `y_stride < n`, or `scratch` shorter than
/// [`gemm_scratch_len`]`(k)`; `y` is then untouched.
pub fn gemm<E: Elem>(
    shape: GemmShape,
    x: &[f32],
    w: &[E],
    bias: Option<&[E]>,
    y: &mut [f32],
    y_stride: usize,
    scratch: &mut [f32],
) -> Result<(), ShapeError> {
    gemm_on(
        active(),
        shape,
        0..shape.n,
        x,
        w,
        bias,
        y,
        y_stride,
        scratch,
    )
}

/// Like [`gemm`] but computes only output columns `cols = n0..n1`, writing `y[i][j]` at
/// `y[i * y_stride + (j - n0)]`: a thread can own the block `[m, n1 - n0]` of its column range.
/// Bitwise equal to the same columns of a full [`gemm`].
///
/// # Errors
/// As [`gemm`], plus a column range that is reversed or reaches past `n`; the stride is checked
/// against the range width `n1 - n0`.
#[allow(clippy::too_many_arguments)] // mirrors gemm's arguments plus the column range
pub fn gemm_cols<E: Elem>(
    shape: GemmShape,
    cols: Range<usize>,
    x: &[f32],
    w: &[E],
    bias: Option<&[E]>,
    y: &mut [f32],
    y_stride: usize,
    scratch: &mut [f32],
) -> Result<(), ShapeError> {
    gemm_on(active(), shape, cols, x, w, bias, y, y_stride, scratch)
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm_on<E: Elem>(
    tier: Tier,
    shape: GemmShape,
    cols: Range<usize>,
    x: &[f32],
    w: &[E],
    bias: Option<&[E]>,
    y: &mut [f32],
    y_stride: usize,
    scratch: &mut [f32],
) -> Result<(), ShapeError> {
    let GemmShape { m, n, k } = shape;
    if cols.start > cols.end || cols.end > n {
        return Err(ShapeError::Invalid {
            what: "gemm: column range end (must be >= start and <= n)",
            value: cols.end,
        });
    }
    let width = cols.end - cols.start;
    need("gemm: x", mul(m, k, "gemm: m*k")?, x.len())?;
    need("gemm: w", mul(n, k, "gemm: n*k")?, w.len())?;
    if let Some(b) = bias {
        need("gemm: bias", n, b.len())?;
    }
    if m > 0 && width > 0 {
        if y_stride < width {
            return Err(ShapeError::Invalid {
                what: "gemm: y_stride (must be >= the number of columns written)",
                value: y_stride,
            });
        }
        let needed = add(mul(m - 1, y_stride, "gemm: y")?, width, "gemm: y")?;
        need("gemm: y", needed, y.len())?;
    } else {
        return Ok(());
    }
    need(
        "gemm: scratch",
        add(mul(GEMM_NR_MAX, k, "gemm: scratch")?, GEMM_NR_MAX, "gemm")?,
        scratch.len(),
    )?;
    dispatch(
        tier,
        Job {
            shape,
            cols,
            x,
            w,
            bias,
            y,
            y_stride,
            scratch,
        },
    );
    Ok(())
}

struct Job<'a, E> {
    shape: GemmShape,
    cols: Range<usize>,
    x: &'a [f32],
    w: &'a [E],
    bias: Option<&'a [E]>,
    y: &'a mut [f32],
    y_stride: usize,
    scratch: &'a mut [f32],
}

impl<E: Elem> WithIsa for Job<'_, E> {
    type Output = ();

    /// Panel loop: for each block of `GEMM_NR` columns of the range, pack (widen) those rows of
    /// W once, then sweep all `m` rows with the ISA's micro-kernel. The last, narrower block is
    /// zero-padded to a full panel so it runs the same instruction sequence per element. For a
    /// few rows of x and bf16 or f16 weights, whole groups of 16 columns skip the panel
    /// (`kernel::gemv_pairs`, same bits) where the ISA has its register tile.
    #[inline(always)]
    fn run<I: Isa>(self, isa: I) {
        let Job {
            shape,
            cols,
            x,
            w,
            bias,
            y,
            y_stride,
            scratch,
        } = self;
        let nr = I::GEMM_NR;
        let k = shape.k;
        let mut j0 = cols.start;
        if shape.m <= GEMV_M_MAX {
            // Whole groups of 16 columns without a panel where the weights and the ISA allow
            // it; the rest below.
            let whole = cols.start..cols.start + (cols.end - cols.start) / 16 * 16;
            let mut job = GemvJob {
                m: shape.m,
                k,
                x,
                w,
                bias,
                cols: whole.clone(),
                y: &mut *y,
                y_stride,
                col0: 0,
            };
            if gemv_pairs(isa, &mut job) {
                j0 = whole.end;
            }
        }
        while j0 < cols.end {
            let nc = nr.min(cols.end - j0);
            let panel = &mut scratch[..nr * (k + 1)];
            pack_panel(isa, panel, k, w, bias, j0, nc);
            let mut job = PanelJob {
                m: shape.m,
                k,
                x,
                panel,
                has_bias: bias.is_some(),
                y,
                y_stride,
                col0: j0 - cols.start,
                nc,
            };
            isa.gemm_panel(&mut job);
            j0 += nc;
        }
    }
}

#[cfg(test)]
mod tests;
