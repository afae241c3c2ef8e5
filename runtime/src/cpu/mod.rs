//! The CPU executor: the whole layer on the `attnrt-simd` kernels, threaded by the host's
//! parallel-for.
//!
//! Phases, each a set of independent work units (so results are bitwise the same for any
//! thread count):
//! 1. projections, one unit per (matrix, head): a GEMM over that head's output columns into a
//!    head-major buffer `[head][token][D]`, with per-head QK-norm and RoPE applied in place;
//! 2. (full QK-norm only) per-token statistics over all heads, then norm + RoPE per head;
//! 3. attention, one unit per (batch row, KV head, query block): the R query heads of the KV
//!    head are gathered into one `[token][R][D]` tile so each K/V tile is read once for all;
//! 4. output projection, one unit per block of output columns.

pub(crate) mod shared;

use core::sync::atomic::{AtomicBool, Ordering};

use attnrt_simd::{self as simd, AttnShape, Elem, GemmShape, KvView, Tier};

use crate::config::{Config, QkNorm, RopeConvention};
use crate::error::{Error, Result};
use crate::layer::{Call, Inputs, Layer};
use crate::norm::rms_norm;
use crate::parallel::ParallelFor;
use crate::tensor::Tensor;
use crate::Backend;
pub(crate) use shared::{run_units, Shared, MAX_LANES};

/// Query tokens per attention work unit; a multiple of the kernel's query tile, so the
/// kernel's tiles (and hence its bits) do not depend on how units are cut.
const ATTN_UNIT: usize = 4 * simd::ATTN_BQ;
/// Output columns per unit of the output projection.
const OUT_COLS: usize = 64;

/// f32 elements of workspace [`Layer::forward_cpu`] needs for `tokens = batch * seq_len` tokens
/// and up to `lanes` concurrent workers (`ParallelFor::width`, capped at 64).
pub const fn cpu_workspace_len(cfg: &Config, tokens: usize, lanes: usize) -> usize {
    let lanes = if lanes == 0 {
        1
    } else if lanes > MAX_LANES {
        MAX_LANES
    } else {
        lanes
    };
    let q = tokens.saturating_mul(cfg.q_dim());
    let kv = tokens.saturating_mul(cfg.kv_dim());
    // q, k, v (head-major), the attention output (token-major), two norm statistics per token.
    let buffers = q
        .saturating_mul(2)
        .saturating_add(kv.saturating_mul(2))
        .saturating_add(tokens.saturating_mul(2));
    lanes
        .saturating_mul(lane_len(cfg, tokens))
        .saturating_add(buffers)
}

/// Where the per-token norm statistics (`2 * tokens` f32) start in the CPU executor's
/// workspace: after q, k, v and the attention output.
pub(crate) const fn stats_offset(cfg: &Config, tokens: usize) -> usize {
    2 * tokens * (cfg.q_dim() + cfg.kv_dim())
}

/// Which phases of the CPU executor one call runs.
pub(crate) enum Phases<'r> {
    /// The whole layer; full QK-norm statistics pass through the callback.
    Whole(&'r mut dyn FnMut(&mut [f32])),
    /// Projections and, with full QK-norm, the local sums of squares (left in the workspace).
    Project,
    /// From the (reduced) sums in the workspace to the output.
    Finish,
}

/// Scratch of one lane: the largest need of any phase.
pub(crate) const fn lane_len(cfg: &Config, tokens: usize) -> usize {
    let k = if cfg.n_embd > cfg.q_dim() {
        cfg.n_embd
    } else {
        cfg.q_dim()
    };
    let gemm = simd::gemm_scratch_len(k);
    // The gathered query tile of one KV head: ATTN_UNIT tokens x R heads x D (= ATTN_UNIT *
    // q_dim / n_kv_head for a valid config), saturating like every size here.
    let tile = ATTN_UNIT
        .saturating_mul(cfg.group_size())
        .saturating_mul(cfg.head_dim);
    let attn = simd::attend_scratch_len(cfg.head_dim, cfg.group_size())
        .saturating_add(tile.saturating_mul(2));
    let out = simd::gemm_scratch_len(cfg.q_dim()).saturating_add(tokens.saturating_mul(OUT_COLS));
    let m = if gemm > attn { gemm } else { attn };
    if m > out {
        m
    } else {
        out
    }
}

/// The active SIMD tier this executor runs on.
pub fn cpu_tier() -> Tier {
    simd::active()
}

/// What every phase of one call shares: the host's parallel-for, the lanes' scratch, and a flag
/// raised when a kernel rejects its arguments (a bug here, since the call was validated).
pub(crate) struct Exec<'s> {
    pub par: &'s dyn ParallelFor,
    pub lanes: usize,
    pub scratch: Shared<'s>,
    pub lane: usize,
    pub failed: AtomicBool,
}

impl Exec<'_> {
    /// Runs `units` work units; false if the host ran none of them.
    pub fn units(&self, units: usize, work: &(dyn Fn(usize, &mut [f32]) + Sync)) -> bool {
        run_units(self.par, self.lanes, units, &self.scratch, self.lane, work)
    }

    /// Records a kernel's refusal.
    pub fn check(&self, r: core::result::Result<(), simd::ShapeError>) -> bool {
        if r.is_err() {
            self.failed.store(true, Ordering::Relaxed);
        }
        r.is_ok()
    }
}

/// `y = x W^T` over output columns `cols` of `w` (`[n, k]`), into `y` (`[m, cols.len()]`).
fn gemm_cols(
    x: &[f32],
    m: usize,
    k: usize,
    w: &Tensor<'_>,
    cols: core::ops::Range<usize>,
    y: &mut [f32],
    scratch: &mut [f32],
) -> core::result::Result<(), simd::ShapeError> {
    fn typed<E: Elem>(
        x: &[f32],
        m: usize,
        k: usize,
        w: &[E],
        cols: core::ops::Range<usize>,
        y: &mut [f32],
        scratch: &mut [f32],
    ) -> core::result::Result<(), simd::ShapeError> {
        let width = cols.len();
        simd::gemm_cols(
            GemmShape {
                m,
                n: w.len() / k.max(1),
                k,
            },
            cols,
            x,
            w,
            None,
            y,
            width,
            scratch,
        )
    }
    match w {
        Tensor::F32(w) => typed(x, m, k, w, cols, y, scratch),
        Tensor::F16(w) => typed(x, m, k, w, cols, y, scratch),
        Tensor::Bf16(w) => typed(x, m, k, w, cols, y, scratch),
    }
}

/// Adds `bias[offset + j]` to column `j` of every row of `y` (`[rows, width]`).
fn add_bias(y: &mut [f32], width: usize, bias: Option<&Tensor<'_>>, offset: usize) {
    if let Some(b) = bias {
        for row in y.chunks_exact_mut(width) {
            for (j, v) in row.iter_mut().enumerate() {
                *v += b.get(offset + j).unwrap_or(0.0);
            }
        }
    }
}

impl Layer<'_> {
    /// Runs the layer on the SIMD kernels of the active tier, with tasks on `par`.
    ///
    /// The workspace must hold [`cpu_workspace_len`]`(cfg, batch * seq_len, par.width())`
    /// elements. Results are bitwise identical for any `par` (any thread count).
    ///
    /// # Errors
    /// As [`Layer::forward_reference`]; also [`Error::Unsupported`] if `par` ran no task at all.
    /// A full-QK-norm shard's layer is refused ([`Error::Unsupported`]): run it through
    /// [`crate::ShardLayer::forward_cpu`].
    /// On error `out` is untouched.
    pub fn forward_cpu(
        &self,
        inputs: &Inputs<'_>,
        workspace: &mut [f32],
        out: &mut [f32],
        par: &dyn ParallelFor,
    ) -> Result<Backend> {
        self.whole()?;
        let call = self.check(inputs, out.len())?;
        self.run_cpu(&call, workspace, out, par, Phases::Whole(&mut |_| {}))
    }

    /// The phases `phases` of the CPU executor for a validated call. Every phase carves the
    /// workspace the same way, so [`Phases::Project`] then [`Phases::Finish`] over the same
    /// workspace (the statistics reduced in between) equal one [`Phases::Whole`].
    pub(crate) fn run_cpu(
        &self,
        call: &Call<'_>,
        workspace: &mut [f32],
        out: &mut [f32],
        par: &dyn ParallelFor,
        phases: Phases<'_>,
    ) -> Result<Backend> {
        let cfg = *self.config();
        let tokens = call.batch * call.seq_len;
        let lanes = par.width().clamp(1, MAX_LANES);
        let needed = cpu_workspace_len(&cfg, tokens, lanes);
        if workspace.len() < needed {
            return Err(Error::Workspace {
                needed,
                actual: workspace.len(),
            });
        }
        let workspace_ptr = workspace.as_ptr();
        let (q, rest) = workspace.split_at_mut(tokens * cfg.q_dim());
        let (k, rest) = rest.split_at_mut(tokens * cfg.kv_dim());
        let (v, rest) = rest.split_at_mut(tokens * cfg.kv_dim());
        let (o, rest) = rest.split_at_mut(tokens * cfg.q_dim());
        let (stats, rest) = rest.split_at_mut(tokens * 2);
        debug_assert_eq!(
            stats.as_ptr(),
            workspace_ptr.wrapping_add(stats_offset(&cfg, tokens))
        );
        let lane = lane_len(&cfg, tokens);
        let ex = Exec {
            par,
            lanes,
            scratch: Shared::new(&mut rest[..lanes * lane]),
            lane,
            failed: AtomicBool::new(false),
        };
        let ran = match phases {
            Phases::Whole(reduce) => {
                self.project_qkv(&ex, call, q, k, v, stats, reduce)
                    && self.attention(&ex, call, q, k, v, o)
                    && self.project_out(&ex, tokens, o, out)
            }
            Phases::Project => {
                let ok = self.project_heads(&ex, call, q, k, v);
                if ok && cfg.qk_norm == QkNorm::Full {
                    self.full_norm_sums(tokens, q, k, stats);
                }
                ok
            }
            Phases::Finish => {
                (cfg.qk_norm != QkNorm::Full || self.full_norm_apply(&ex, call, q, k, stats))
                    && self.attention(&ex, call, q, k, v, o)
                    && self.project_out(&ex, tokens, o, out)
            }
        };
        if !ran {
            return Err(Error::Unsupported {
                what: "the host's parallel_for ran no task",
            });
        }
        if ex.failed.load(Ordering::Relaxed) {
            return Err(Error::Unsupported {
                what: "internal: a SIMD kernel rejected its arguments",
            });
        }
        let backend = Backend::CpuSimd(cpu_tier());
        crate::fmt::info!("attnrt: forward by {}, workspace {} f32", backend, needed);
        Ok(backend)
    }

    /// Phases 1 and 2: q, k, v head-major, normalised and rotated. With full QK-norm the
    /// per-token sums of squares pass through `reduce` (a no-op on one device; the sum over
    /// devices for a shard) before they become 1/rms.
    #[allow(clippy::too_many_arguments)] // the buffers of the phase, each its own borrow
    pub(crate) fn project_qkv(
        &self,
        ex: &Exec<'_>,
        call: &Call<'_>,
        q: &mut [f32],
        k: &mut [f32],
        v: &mut [f32],
        stats: &mut [f32],
        reduce: &mut dyn FnMut(&mut [f32]),
    ) -> bool {
        if !self.project_heads(ex, call, q, k, v) {
            return false;
        }
        if self.config().qk_norm != QkNorm::Full {
            return true;
        }
        let tokens = call.batch * call.seq_len;
        self.full_norm_sums(tokens, q, k, stats);
        reduce(&mut stats[..2 * tokens]);
        self.full_norm_apply(ex, call, q, k, stats)
    }

    /// Phase 1: the projections, head-major, with per-head QK-norm and RoPE (all but full
    /// QK-norm, which [`Layer::full_norm_apply`] finishes).
    fn project_heads(
        &self,
        ex: &Exec<'_>,
        call: &Call<'_>,
        q: &mut [f32],
        k: &mut [f32],
        v: &mut [f32],
    ) -> bool {
        let cfg = self.config();
        let w = self.weights();
        let (c, d, h, kvh) = (cfg.n_embd, cfg.head_dim, cfg.n_head, cfg.n_kv_head);
        let tokens = call.batch * call.seq_len;
        let full = cfg.qk_norm == QkNorm::Full;
        let (qs, ks, vs) = (Shared::new(q), Shared::new(k), Shared::new(v));
        let x = call.x;
        // Unit u: matrix (q heads first, then k, then v) and head.
        let project = |u: usize, s: &mut [f32]| {
            let (buf, wt, bias, head, is_qk, norm_w) = if u < h {
                (&qs, &w.wq, w.bq.as_ref(), u, true, w.q_norm.as_ref())
            } else if u < h + kvh {
                (&ks, &w.wk, w.bk.as_ref(), u - h, true, w.k_norm.as_ref())
            } else {
                (&vs, &w.wv, w.bv.as_ref(), u - h - kvh, false, None)
            };
            // SAFETY: unit u is the only one writing head `head` of its matrix, a range disjoint
            // from every other unit's.
            let y = unsafe { buf.range_mut(head * tokens * d, tokens * d) };
            let cols = head * d..head * d + d;
            if !ex.check(gemm_cols(x, tokens, c, wt, cols.clone(), y, s)) {
                return;
            }
            add_bias(y, d, bias, cols.start);
            if is_qk && !full {
                self.norm_rope_head(call, y, norm_w, None, 0);
            }
        };
        ex.units(h + 2 * kvh, &project)
    }

    /// Full QK-norm, first half: each token's sum of squares over this layer's q heads into
    /// `stats[t]` and over its k heads into `stats[tokens + t]` (0 for the k heads of a shard
    /// that does not count them).
    fn full_norm_sums(&self, tokens: usize, q: &[f32], k: &[f32], stats: &mut [f32]) {
        let cfg = self.config();
        let (d, h, kvh) = (cfg.head_dim, cfg.n_head, cfg.n_kv_head);
        let count_k = self.part().is_none_or(|p| p.count_k);
        let sum = |buf: &[f32], heads: usize, t: usize| {
            let mut acc = 0.0f32;
            for hh in 0..heads {
                let z = &buf[(hh * tokens + t) * d..(hh * tokens + t + 1) * d];
                acc += z.iter().map(|v| v * v).sum::<f32>();
            }
            acc
        };
        for t in 0..tokens {
            stats[t] = sum(q, h, t);
            stats[tokens + t] = if count_k { sum(k, kvh, t) } else { 0.0 };
        }
    }

    /// Full QK-norm, second half: the (reduced) sums become 1/rms over the whole row's width,
    /// then every q and k head is scaled and rotated.
    fn full_norm_apply(
        &self,
        ex: &Exec<'_>,
        call: &Call<'_>,
        q: &mut [f32],
        k: &mut [f32],
        stats: &mut [f32],
    ) -> bool {
        let cfg = self.config();
        let w = self.weights();
        let (d, h, kvh) = (cfg.head_dim, cfg.n_head, cfg.n_kv_head);
        let tokens = call.batch * call.seq_len;
        let (q_width, k_width) = match self.part() {
            Some(p) => (p.q_width, p.k_width),
            None => (h * d, kvh * d),
        };
        let (qs, ks) = stats[..2 * tokens].split_at_mut(tokens);
        for (s, width) in [(qs, q_width), (ks, k_width)] {
            for v in s.iter_mut() {
                *v = 1.0 / libm::sqrtf(*v / width as f32 + cfg.rmsnorm_eps);
            }
        }
        let stats = &*stats;
        let (q, k) = (Shared::new(q), Shared::new(k));
        let rotate = |u: usize, _: &mut [f32]| {
            let (buf, head, norm_w, inv) = if u < h {
                (&q, u, w.q_norm.as_ref(), &stats[..tokens])
            } else {
                (&k, u - h, w.k_norm.as_ref(), &stats[tokens..2 * tokens])
            };
            // SAFETY: unit u alone owns head `head` of its matrix.
            let y = unsafe { buf.range_mut(head * tokens * d, tokens * d) };
            self.norm_rope_head(call, y, norm_w, Some(inv), head * d);
        };
        ex.units(h + kvh, &rotate)
    }

    /// QK-norm (per head, or full with precomputed 1/rms per token) and RoPE over one head's
    /// `[tokens][D]` block.
    fn norm_rope_head(
        &self,
        call: &Call<'_>,
        y: &mut [f32],
        norm_w: Option<&Tensor<'_>>,
        full_inv: Option<&[f32]>,
        norm_offset: usize,
    ) {
        let cfg = self.config();
        let d = cfg.head_dim;
        for (t, z) in y.chunks_exact_mut(d).enumerate() {
            match (norm_w, full_inv) {
                (Some(nw), Some(inv)) => {
                    for (i, v) in z.iter_mut().enumerate() {
                        *v = *v * inv[t] * nw.get(norm_offset + i).unwrap_or(0.0);
                    }
                }
                (Some(nw), None) if cfg.qk_norm == QkNorm::PerHead => {
                    rms_norm(z, nw, 0, cfg.rmsnorm_eps)
                }
                _ => {}
            }
            if let (Some(r), Some(table)) = (cfg.rope(), call.rope_table.as_ref()) {
                let (b, tt) = (t / call.seq_len, t % call.seq_len);
                if let Some(cs) = table.row(call.position(b, tt)) {
                    let style = match r.convention {
                        RopeConvention::Interleaved => simd::RopeStyle::Interleaved,
                        RopeConvention::HalfSplit => simd::RopeStyle::HalfSplit,
                    };
                    // The table row was validated to hold D/2 pairs; rope cannot refuse it.
                    let _ = simd::rope(z, d, cs, style);
                }
            }
        }
    }

    /// Phase 3: masked attention into `o` (`[token][H*D]`).
    fn attention(
        &self,
        ex: &Exec<'_>,
        call: &Call<'_>,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        o: &mut [f32],
    ) -> bool {
        let cfg = self.config();
        let (d, r, g_count, t_len) = (cfg.head_dim, cfg.group_size(), cfg.n_kv_head, call.seq_len);
        let tokens = call.batch * t_len;
        let blocks = t_len.div_ceil(ATTN_UNIT);
        let os = Shared::new(o);
        let qd = cfg.q_dim();
        let scale = 1.0 / libm::sqrtf(d as f32);
        let attend = |u: usize, s: &mut [f32]| {
            let (b, rest) = (u / (g_count * blocks), u % (g_count * blocks));
            let (g, blk) = (rest / blocks, rest % blocks);
            let t0 = blk * ATTN_UNIT;
            let nq = ATTN_UNIT.min(t_len - t0);
            let tile = nq * r * d;
            let (qt, s) = s.split_at_mut(tile);
            let (ot, s) = s.split_at_mut(tile);
            // Gather the R query heads of KV head g: [token][R][D].
            for t in 0..nq {
                for hr in 0..r {
                    let head = g * r + hr;
                    let src = (head * tokens + b * t_len + t0 + t) * d;
                    qt[(t * r + hr) * d..(t * r + hr + 1) * d].copy_from_slice(&q[src..src + d]);
                }
            }
            let base = (g * tokens + b * t_len) * d;
            let kv = KvView {
                k: &k[base..base + t_len * d],
                v: &v[base..base + t_len * d],
                stride: d,
                len: t_len,
            };
            let mask = call.mask.row(b);
            let shape = AttnShape {
                d,
                r,
                nq,
                q_start: t0,
            };
            if !ex.check(simd::attend(shape, qt, kv, &mask, scale, ot, s)) {
                return;
            }
            for t in 0..nq {
                let row = b * t_len + t0 + t;
                // SAFETY: unit (b, g, blk) alone writes tokens t0..t0+nq of row b at the columns
                // of KV head g's query heads.
                let dst = unsafe { os.range_mut(row * qd + g * r * d, r * d) };
                dst.copy_from_slice(&ot[t * r * d..(t + 1) * r * d]);
            }
        };
        ex.units(call.batch * g_count * blocks, &attend)
    }

    /// Phase 4: `y = o wo^T + bo`, by blocks of output columns.
    pub(crate) fn project_out(
        &self,
        ex: &Exec<'_>,
        tokens: usize,
        o: &[f32],
        y: &mut [f32],
    ) -> bool {
        let cfg = self.config();
        let w = self.weights();
        let (c, qd) = (cfg.n_embd, cfg.q_dim());
        let ys = Shared::new(y);
        let project = |u: usize, s: &mut [f32]| {
            let cols = u * OUT_COLS..((u + 1) * OUT_COLS).min(c);
            let width = cols.len();
            let (tmp, s) = s.split_at_mut(tokens * width);
            if !ex.check(gemm_cols(o, tokens, qd, &w.wo, cols.clone(), tmp, s)) {
                return;
            }
            add_bias(tmp, width, w.bo.as_ref(), cols.start);
            for (t, src) in tmp.chunks_exact(width).enumerate() {
                // SAFETY: unit u alone writes columns `cols` of every token row.
                let dst = unsafe { ys.range_mut(t * c + cols.start, width) };
                dst.copy_from_slice(src);
            }
        };
        ex.units(c.div_ceil(OUT_COLS), &project)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workspace_len_saturates_instead_of_overflowing() {
        let huge = Config::new(64, 4).with_head_dim(usize::MAX / 8);
        assert_eq!(cpu_workspace_len(&huge, 1, 1), usize::MAX);
        let cfg = Config::new(64, 4).with_kv_heads(2);
        // The tile term equals ATTN_UNIT * q_dim / n_kv_head for a valid config.
        assert!(lane_len(&cfg, 8) >= 2 * ATTN_UNIT * cfg.q_dim() / cfg.n_kv_head);
    }
}
