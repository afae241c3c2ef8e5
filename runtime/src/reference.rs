//! The scalar reference forward pass of the whole SPEC: the oracle every other executor is
//! tested against. Straightforward loops in SPEC.md's order, f32 arithmetic, no tiling.

use attnrt_simd::Visibility;

use crate::config::{Config, QkNorm};
use crate::error::{Error, Result};
use crate::layer::{Call, Inputs, Layer};
use crate::linear::linear_row;
use crate::norm::rms_norm;
use crate::rope;
use crate::Backend;

/// f32 elements of workspace the reference needs for rows of up to `max_seq_len` tokens:
/// q, k, v and the attention output of one row, plus one row of scores.
pub const fn reference_workspace_len(cfg: &Config, max_seq_len: usize) -> usize {
    let per_token = cfg
        .q_dim()
        .saturating_mul(2)
        .saturating_add(cfg.kv_dim().saturating_mul(2));
    max_seq_len
        .saturating_mul(per_token)
        .saturating_add(max_seq_len)
}

impl Layer<'_> {
    /// Runs the layer with the scalar reference over the caller's workspace.
    ///
    /// Rows are processed one after another, so the workspace depends on `seq_len`, not on the
    /// batch size: see [`reference_workspace_len`].
    ///
    /// # Errors
    /// Any invalid input ([`Error::InputShape`], [`Error::InputValue`],
    /// [`Error::PositionOutOfTable`], ...) or a short workspace ([`Error::Workspace`]); a
    /// full-QK-norm shard's layer ([`Error::Unsupported`], it needs the other devices' norm
    /// statistics). On error `out` is untouched.
    pub fn forward_reference(
        &self,
        inputs: &Inputs<'_>,
        workspace: &mut [f32],
        out: &mut [f32],
    ) -> Result<Backend> {
        self.whole()?;
        let call = self.check(inputs, out.len())?;
        let needed = reference_workspace_len(self.config(), call.seq_len);
        if workspace.len() < needed {
            return Err(Error::Workspace {
                needed,
                actual: workspace.len(),
            });
        }
        let row_len = call.seq_len * self.config().n_embd;
        if row_len > 0 {
            for (b, y) in out.chunks_exact_mut(row_len).enumerate() {
                self.reference_row(&call, b, workspace, y);
            }
        }
        crate::fmt::info!(
            "attnrt: forward by {}, workspace {} f32",
            Backend::Reference,
            needed
        );
        Ok(Backend::Reference)
    }

    fn reference_row(&self, call: &Call<'_>, b: usize, ws: &mut [f32], y: &mut [f32]) {
        let cfg = self.config();
        let w = self.weights();
        let (t_len, c, d) = (call.seq_len, cfg.n_embd, cfg.head_dim);
        let (qd, kvd) = (cfg.q_dim(), cfg.kv_dim());
        let (q, rest) = ws.split_at_mut(t_len * qd);
        let (k, rest) = rest.split_at_mut(t_len * kvd);
        let (v, rest) = rest.split_at_mut(t_len * kvd);
        let (o, rest) = rest.split_at_mut(t_len * qd);
        let scores = &mut rest[..t_len];
        let x = &call.x[b * t_len * c..(b + 1) * t_len * c];

        for t in 0..t_len {
            let xt = &x[t * c..(t + 1) * c];
            let (qt, kt) = (&mut q[t * qd..(t + 1) * qd], &mut k[t * kvd..(t + 1) * kvd]);
            linear_row(xt, &w.wq, w.bq.as_ref(), qt);
            linear_row(xt, &w.wk, w.bk.as_ref(), kt);
            linear_row(xt, &w.wv, w.bv.as_ref(), &mut v[t * kvd..(t + 1) * kvd]);
            self.normalise_and_rotate(call, b, t, qt, kt);
        }

        let mask = call.mask.row(b);
        let scale = 1.0 / libm::sqrtf(d as f32);
        for i in 0..t_len {
            let (lo, hi) = mask.key_range(i, i + 1);
            for h in 0..cfg.n_head {
                let g = cfg.kv_head_of(h);
                let qi = &q[i * qd + h * d..i * qd + h * d + d];
                let mut max = f32::NEG_INFINITY;
                for j in lo..hi {
                    scores[j] = if mask.visible(i, j) {
                        let kj = &k[j * kvd + g * d..j * kvd + g * d + d];
                        qi.iter().zip(kj).map(|(a, b)| a * b).sum::<f32>() * scale
                    } else {
                        f32::NEG_INFINITY
                    };
                    max = max.max(scores[j]);
                }
                let oi = &mut o[i * qd + h * d..i * qd + h * d + d];
                oi.fill(0.0);
                if max == f32::NEG_INFINITY {
                    // No visible key: the output is exactly zero (SPEC.md step 8).
                    continue;
                }
                let mut sum = 0.0f32;
                for j in lo..hi {
                    if scores[j] == f32::NEG_INFINITY {
                        continue;
                    }
                    let p = libm::expf(scores[j] - max);
                    sum += p;
                    let vj = &v[j * kvd + g * d..j * kvd + g * d + d];
                    oi.iter_mut().zip(vj).for_each(|(acc, &vv)| *acc += p * vv);
                }
                oi.iter_mut().for_each(|acc| *acc /= sum);
            }
        }

        for t in 0..t_len {
            linear_row(
                &o[t * qd..(t + 1) * qd],
                &w.wo,
                w.bo.as_ref(),
                &mut y[t * c..(t + 1) * c],
            );
        }
    }

    /// Steps 2, 4 and 5 of SPEC.md for one token's projected q and k rows.
    pub(crate) fn normalise_and_rotate(
        &self,
        call: &Call<'_>,
        b: usize,
        t: usize,
        q: &mut [f32],
        k: &mut [f32],
    ) {
        let cfg = self.config();
        let w = self.weights();
        let d = cfg.head_dim;
        if let (Some(qn), Some(kn)) = (w.q_norm.as_ref(), w.k_norm.as_ref()) {
            match cfg.qk_norm {
                QkNorm::Full => {
                    rms_norm(q, qn, 0, cfg.rmsnorm_eps);
                    rms_norm(k, kn, 0, cfg.rmsnorm_eps);
                }
                QkNorm::PerHead => {
                    q.chunks_exact_mut(d)
                        .for_each(|z| rms_norm(z, qn, 0, cfg.rmsnorm_eps));
                    k.chunks_exact_mut(d)
                        .for_each(|z| rms_norm(z, kn, 0, cfg.rmsnorm_eps));
                }
                QkNorm::None => {}
            }
        }
        if let (Some(r), Some(table)) = (cfg.rope(), call.rope_table.as_ref()) {
            if let Some(cs) = table.row(call.position(b, t)) {
                q.chunks_exact_mut(d)
                    .for_each(|z| rope::apply(r.convention, z, cs));
                k.chunks_exact_mut(d)
                    .for_each(|z| rope::apply(r.convention, z, cs));
            }
        }
    }
}
