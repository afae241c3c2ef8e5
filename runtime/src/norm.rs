//! RMSNorm of SPEC.md step 4: `z * 1/sqrt(mean(z^2) + eps) * weight`, in f32.

use crate::tensor::Tensor;

/// Normalises `z` in place with `weight[offset..offset + z.len()]`.
///
/// The caller has checked the weight's length against the configuration.
pub fn rms_norm(z: &mut [f32], weight: &Tensor<'_>, offset: usize, eps: f32) {
    if z.is_empty() {
        return;
    }
    let mean_sq = z.iter().map(|v| v * v).sum::<f32>() / z.len() as f32;
    let inv = 1.0 / libm::sqrtf(mean_sq + eps);
    for (i, v) in z.iter_mut().enumerate() {
        *v = *v * inv * weight.get(offset + i).unwrap_or(0.0);
    }
}
