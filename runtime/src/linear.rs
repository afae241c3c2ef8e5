//! Scalar `y = x W^T + b` over borrowed weights of any storage type: the reference's projections.

use half::{bf16, f16};

use crate::tensor::Tensor;

/// Widening of one stored weight to f32.
trait Widen: Copy {
    fn widen(self) -> f32;
}

impl Widen for f32 {
    fn widen(self) -> f32 {
        self
    }
}

impl Widen for f16 {
    fn widen(self) -> f32 {
        self.to_f32()
    }
}

impl Widen for bf16 {
    fn widen(self) -> f32 {
        self.to_f32()
    }
}

fn linear_typed<W: Widen>(x: &[f32], w: &[W], out: &mut [f32]) {
    let k = x.len();
    for (o, row) in out.iter_mut().zip(w.chunks_exact(k)) {
        *o = x
            .iter()
            .zip(row)
            .fold(0.0f32, |acc, (&a, &b)| acc + a * b.widen());
    }
}

/// `out[o] = sum_c x[c] * w[o, c] + bias[o]` for one row `x` of `in_features` values and
/// `out.len()` output features. The caller has checked `w` against both.
pub fn linear_row(x: &[f32], w: &Tensor<'_>, bias: Option<&Tensor<'_>>, out: &mut [f32]) {
    match w {
        Tensor::F32(w) => linear_typed(x, w, out),
        Tensor::F16(w) => linear_typed(x, w, out),
        Tensor::Bf16(w) => linear_typed(x, w, out),
    }
    if let Some(b) = bias {
        for (i, o) in out.iter_mut().enumerate() {
            *o += b.get(i).unwrap_or(0.0);
        }
    }
}
