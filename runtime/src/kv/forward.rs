//! The cached forward pass: project the new tokens, append their keys and values to the cache,
//! attend over everything each new token may see, project out.
//!
//! Attention over the cache runs on chunks of [`CHUNK`] keys cut at fixed logical positions,
//! merged in a fixed order ([`attnrt_simd::merge_partial`]): the bits do not depend on the
//! block size, the block ids, rolling or not, the thread count, or which other sequences share
//! the call. Work units: (block of up to [`QB`] new tokens of one sequence, split of [`SPLIT`]
//! chunks) for the partial states, all KV heads at once so that the cache is read block by
//! block (a paged block holds every KV head's keys contiguously), then (KV head, token block)
//! for the merge; a long decode is thereby split across threads.

use attnrt_simd::{self as simd, Elem, KvRun, PartialRows};

use super::{KvCache, KvGeometry, KvPool, Sequence};
use crate::config::Config;
use crate::cpu::{cpu_workspace_len, Exec, Shared, MAX_LANES};
use crate::error::{Error, Result};
use crate::layer::{Call, Layer};
use crate::mask::{MaskInputs, MaskSpec};
use crate::parallel::ParallelFor;
use crate::rope::RopeTable;
use crate::Backend;

/// New tokens per attention unit.
pub const QB: usize = 16;
/// Keys per chunk: the unit of the softmax partial states.
pub const CHUNK: usize = simd::CHUNK_MAX;
/// Chunks per split: how much of a long cache one task reads.
pub const SPLIT: usize = 8;

/// One block of new tokens of one sequence.
#[derive(Clone, Copy, Debug)]
struct Item {
    seq: usize,
    /// Index of the block's first token among all new tokens of the call.
    token0: usize,
    /// Position of the block's first token.
    pos0: usize,
    /// Tokens in the block.
    n: usize,
    /// First logical key any token of the block sees, and one past the last.
    keys: (usize, usize),
}

impl Item {
    fn chunks(&self) -> (usize, usize) {
        (self.keys.0 / CHUNK, self.keys.1.div_ceil(CHUNK))
    }

    fn splits(&self) -> usize {
        let (c0, c1) = self.chunks();
        (c1 - c0).div_ceil(SPLIT).max(1)
    }
}

/// Every block of new tokens of the call, in order; `f` returns false to stop early.
fn for_each_item(seqs: &[Sequence<'_>], window: usize, mut f: impl FnMut(Item) -> bool) {
    let mut token0 = 0;
    for (s, seq) in seqs.iter().enumerate() {
        for b0 in (0..seq.new_tokens).step_by(QB) {
            let n = QB.min(seq.new_tokens - b0);
            let pos0 = seq.cached + b0;
            let first = (pos0 + 1).saturating_sub(window);
            let item = Item {
                seq: s,
                token0: token0 + b0,
                pos0,
                n,
                keys: (first, pos0 + n),
            };
            if !f(item) {
                return;
            }
        }
        token0 += seq.new_tokens;
    }
}

/// Counts of the call: new tokens, token blocks, and split units per KV head.
fn counts(seqs: &[Sequence<'_>], window: usize) -> (usize, usize, usize) {
    let tokens = seqs.iter().map(|s| s.new_tokens).sum();
    let (mut items, mut splits) = (0, 0);
    for_each_item(seqs, window, |it| {
        items += 1;
        splits += it.splits();
        true
    });
    (tokens, items, splits)
}

/// f32 elements of workspace [`Layer::forward_cached`] needs for this call on `lanes` workers
/// (capped at 64) with a pool of `num_blocks` blocks.
pub fn cached_workspace_len(
    cfg: &Config,
    seqs: &[Sequence<'_>],
    lanes: usize,
    num_blocks: usize,
) -> usize {
    let lanes = lanes.clamp(1, MAX_LANES);
    let window = cfg.sliding_window.unwrap_or(usize::MAX);
    let (tokens, _, splits) = counts(seqs, window);
    let d = cfg.head_dim;
    let rows = QB * cfg.group_size();
    let states = cfg
        .n_kv_head
        .saturating_mul(splits)
        .saturating_mul(rows * (d + 2));
    let lane = unit_scratch_len(cfg);
    cpu_workspace_len(cfg, tokens, lanes)
        .saturating_add(tokens) // positions
        .saturating_add(num_blocks) // block ownership marks
        .saturating_add(states)
        .saturating_add(lanes.saturating_mul(lane))
}

/// One lane's scratch for a partial-state unit: the queries and the chunk state of all KV
/// heads, and the kernel's scratch.
fn unit_scratch_len(cfg: &Config) -> usize {
    let rows = cfg.n_kv_head * QB * cfg.group_size();
    rows * cfg.head_dim + rows * (cfg.head_dim + 2) + simd::partial_scratch_len(cfg.head_dim)
}

impl Layer<'_> {
    /// Runs the layer on new tokens of one or more sequences against a KV cache: prefill into an
    /// empty cache (`cached = 0`), chunked prefill, or decode (one new token per sequence),
    /// appending the new keys and values. `x` is `[sum of new_tokens, n_embd]`, the sequences'
    /// tokens one after another; `out` likewise. Token t of a sequence has position
    /// `cached + t` and sees the keys at positions `<= cached + t` (and within the window).
    ///
    /// The workspace must hold [`cached_workspace_len`] elements. Results are bitwise
    /// independent of the thread count and the cache layout.
    ///
    /// # Errors
    /// A wrong length of `x`/`out`/workspace, a block id outside the pool or used twice, a
    /// sequence whose blocks cannot hold its tokens ("cache full"), a position past the rope
    /// table, a cache whose heads differ from the layer's, or a rolling cache for a layer
    /// without window; a full-QK-norm shard's layer (run it through
    /// [`crate::ShardLayer::forward_cached`]). Nothing is written (the output nor the cache) on
    /// error.
    #[allow(clippy::too_many_arguments)] // each argument is one of the call's independent inputs
    pub fn forward_cached(
        &self,
        x: &[f32],
        seqs: &[Sequence<'_>],
        rope_table: Option<RopeTable<'_>>,
        cache: &mut KvCache<'_>,
        workspace: &mut [f32],
        out: &mut [f32],
        par: &dyn ParallelFor,
    ) -> Result<Backend> {
        self.whole()?;
        self.cached_with(x, seqs, rope_table, cache, workspace, out, par, &mut |_| {})
    }

    /// [`Layer::forward_cached`] with the full-QK-norm statistics passed through `reduce`
    /// (a no-op on one device, the sum across devices for a shard).
    #[allow(clippy::too_many_arguments)] // forward_cached's inputs and the reduction
    pub(crate) fn cached_with(
        &self,
        x: &[f32],
        seqs: &[Sequence<'_>],
        rope_table: Option<RopeTable<'_>>,
        cache: &mut KvCache<'_>,
        workspace: &mut [f32],
        out: &mut [f32],
        par: &dyn ParallelFor,
        reduce: &mut dyn FnMut(&mut [f32]),
    ) -> Result<Backend> {
        let cfg = *self.config();
        let window = cfg.sliding_window.unwrap_or(usize::MAX);
        // Lengths and the cache first: everything below iterates over the new tokens.
        self.validate_cached_shape(
            x.len(),
            out.len(),
            seqs,
            rope_table.as_ref(),
            &cache.geometry(),
        )?;
        let (tokens, items, splits) = counts(seqs, window);
        let lanes = par.width().clamp(1, MAX_LANES);
        let needed = cached_workspace_len(&cfg, seqs, lanes, cache.num_blocks);
        if workspace.len() < needed {
            return Err(Error::Workspace {
                needed,
                actual: workspace.len(),
            });
        }
        let (exec_ws, rest) = workspace.split_at_mut(cpu_workspace_len(&cfg, tokens, lanes));
        let (pos_ws, rest) = rest.split_at_mut(tokens);
        let (marks, rest) = rest.split_at_mut(cache.num_blocks);
        check_blocks(seqs, cache.num_blocks, bytemuck::cast_slice_mut(marks))?;

        // From here on nothing can fail for a validated call.
        let positions: &mut [i32] = bytemuck::cast_slice_mut(pos_ws);
        let mut m = 0;
        for seq in seqs {
            for t in 0..seq.new_tokens {
                positions[m] = (seq.cached + t) as i32;
                m += 1;
            }
        }
        let positions: &[i32] = positions;
        let call = Call {
            x,
            batch: 1,
            seq_len: tokens,
            mask: MaskSpec::new(None, 1, tokens, &MaskInputs::default())?,
            position_ids: Some(positions),
            rope_table,
        };
        let (q, r0) = exec_ws.split_at_mut(tokens * cfg.q_dim());
        let (k, r0) = r0.split_at_mut(tokens * cfg.kv_dim());
        let (v, r0) = r0.split_at_mut(tokens * cfg.kv_dim());
        let (o, r0) = r0.split_at_mut(tokens * cfg.q_dim());
        let (stats, r0) = r0.split_at_mut(tokens * 2);
        let lane = crate::cpu::lane_len(&cfg, tokens);
        let rows = QB * cfg.group_size();
        let (states, unit_ws) =
            rest.split_at_mut(cfg.n_kv_head * splits * rows * (cfg.head_dim + 2));
        let ex = Exec {
            par,
            lanes,
            scratch: Shared::new(&mut r0[..lanes * lane]),
            lane,
            failed: Default::default(),
        };
        let ex_attn = Exec {
            par,
            lanes,
            scratch: Shared::new(&mut unit_ws[..lanes * unit_scratch_len(&cfg)]),
            lane: unit_scratch_len(&cfg),
            failed: Default::default(),
        };
        let ran = self.project_qkv(&ex, &call, q, k, v, stats, reduce)
            && {
                append(cache, seqs, k, v, tokens);
                let cache = &*cache;
                self.cached_partials(&ex_attn, seqs, cache, q, states, window, splits)
                    && self.cached_merge(&ex_attn, seqs, states, o, window, items, splits)
            }
            && self.project_out(&ex, tokens, o, out);
        if !ran {
            return Err(Error::Unsupported {
                what: "the host's parallel_for ran no task",
            });
        }
        if ex.failed.load(core::sync::atomic::Ordering::Relaxed)
            || ex_attn.failed.load(core::sync::atomic::Ordering::Relaxed)
        {
            return Err(Error::Unsupported {
                what: "internal: a SIMD kernel rejected its arguments",
            });
        }
        let backend = Backend::CpuSimd(simd::active());
        crate::fmt::info!(
            "attnrt: cached forward by {}, workspace {} f32",
            backend,
            needed
        );
        Ok(backend)
    }

    /// Checks a cached forward call without running it, exactly as [`Layer::forward_cached`]
    /// does: the lengths of `x` and `out`, the cache's heads against the layer, rolling only
    /// for a windowed layer, each sequence's capacity ("cache full") and positions (overflow,
    /// past the rope table), and the block ids (inside the pool, none used twice). `marks` is
    /// scratch of at least `cache.num_blocks` words. Returns the number of new tokens.
    ///
    /// Executors outside this crate (the GPU's) call it so that every executor rejects exactly
    /// the same calls.
    ///
    /// # Errors
    /// The first rule broken, as [`Layer::forward_cached`] reports it.
    pub fn validate_cached(
        &self,
        x_len: usize,
        out_len: usize,
        seqs: &[Sequence<'_>],
        rope_table: Option<&RopeTable<'_>>,
        cache: &KvGeometry,
        marks: &mut [u32],
    ) -> Result<usize> {
        let tokens = self.validate_cached_shape(x_len, out_len, seqs, rope_table, cache)?;
        check_blocks(seqs, cache.num_blocks, marks)?;
        Ok(tokens)
    }

    /// The one rule of [`Layer::validate_cached`] about the cache's own shape: its KV heads
    /// and head_dim are the layer's. A head split's device checks its shard's cache with it
    /// after the whole call was validated against the unsplit layer.
    ///
    /// # Errors
    /// [`Error::InputShape`] "kv cache heads * head_dim" when they differ.
    pub fn check_cache_heads(&self, cache: &KvGeometry) -> Result<()> {
        let cfg = self.config();
        if cache.n_kv_head != cfg.n_kv_head || cache.head_dim != cfg.head_dim {
            return Err(Error::InputShape {
                name: "kv cache heads * head_dim",
                expected: cfg.kv_dim(),
                actual: cache.n_kv_head * cache.head_dim,
            });
        }
        Ok(())
    }

    /// [`Layer::validate_cached`] for an executor that calls it step after step: `marks` (at
    /// least `cache.num_blocks` words) and `stamp` are kept from one call to the next (start
    /// both at zero; words added when `marks` grows must be zero), so that the block check
    /// costs the blocks the call names instead of a pass over the whole pool, which a server's
    /// pool of hundreds of thousands of blocks would make the larger part of a decode step's
    /// host work. Rejects exactly the calls `validate_cached` rejects, with the same errors.
    ///
    /// # Errors
    /// As [`Layer::validate_cached`].
    #[allow(clippy::too_many_arguments)]
    pub fn validate_cached_marked(
        &self,
        x_len: usize,
        out_len: usize,
        seqs: &[Sequence<'_>],
        rope_table: Option<&RopeTable<'_>>,
        cache: &KvGeometry,
        marks: &mut [u32],
        stamp: &mut u32,
    ) -> Result<usize> {
        let tokens = self.validate_cached_shape(x_len, out_len, seqs, rope_table, cache)?;
        check_blocks_marked(seqs, cache.num_blocks, marks, stamp)?;
        Ok(tokens)
    }

    /// Everything [`Layer::validate_cached`] checks but the block ids.
    fn validate_cached_shape(
        &self,
        x_len: usize,
        out_len: usize,
        seqs: &[Sequence<'_>],
        rope_table: Option<&RopeTable<'_>>,
        cache: &KvGeometry,
    ) -> Result<usize> {
        let cfg = self.config();
        let window = cfg.sliding_window.unwrap_or(usize::MAX);
        let tokens = seqs
            .iter()
            .try_fold(0usize, |a, s| a.checked_add(s.new_tokens));
        let y_len = tokens.and_then(|t| t.checked_mul(cfg.n_embd));
        for (name, len) in [("x", x_len), ("out", out_len)] {
            if Some(len) != y_len {
                return Err(Error::InputShape {
                    name,
                    expected: y_len.unwrap_or(usize::MAX),
                    actual: len,
                });
            }
        }
        self.check_cache_heads(cache)?;
        if cache.rolling && cfg.sliding_window.is_none() {
            return Err(Error::Unsupported {
                what: "a rolling KV cache needs a sliding-window layer",
            });
        }
        match (cfg.rope(), rope_table) {
            (None, Some(_)) => {
                return Err(Error::Unsupported {
                    what: "freqs_cis given but the layer has no rotary embedding",
                })
            }
            (Some(_), None) => {
                return Err(Error::InputShape {
                    name: "freqs_cis",
                    expected: cfg.head_dim,
                    actual: 0,
                })
            }
            (Some(_), Some(t)) if t.half_dim() * 2 != cfg.head_dim => {
                return Err(Error::InputShape {
                    name: "freqs_cis row",
                    expected: cfg.head_dim,
                    actual: t.half_dim() * 2,
                })
            }
            _ => {}
        }
        for (i, seq) in seqs.iter().enumerate() {
            let end = seq
                .cached
                .checked_add(seq.new_tokens)
                .filter(|&e| e <= i32::MAX as usize)
                .ok_or(Error::InputValue {
                    name: "sequence position",
                    index: i,
                    value: seq.cached as i64,
                    rule: "cached + new_tokens overflows the position range",
                })?;
            let need = if cache.rolling {
                window.saturating_add(seq.new_tokens).saturating_sub(1)
            } else {
                end
            };
            let cap = seq.capacity(cache.block_size);
            if seq.new_tokens > 0 && cap < need {
                return Err(Error::InputValue {
                    name: "kv cache full: sequence",
                    index: i,
                    value: need as i64,
                    rule: "its blocks hold fewer tokens than the call needs",
                });
            }
            if let Some(t) = rope_table {
                if seq.new_tokens > 0 && end > t.max_pos() {
                    return Err(Error::PositionOutOfTable {
                        index: i,
                        position: end as i64 - 1,
                        table_len: t.max_pos(),
                    });
                }
            }
        }
        Ok(tokens.unwrap_or(0))
    }

    /// Partial softmax states of every (KV head, token block, split); one unit per (token block,
    /// split) covers all KV heads.
    #[allow(clippy::too_many_arguments)]
    fn cached_partials(
        &self,
        ex: &Exec<'_>,
        seqs: &[Sequence<'_>],
        cache: &KvCache<'_>,
        q: &[f32],
        states: &mut [f32],
        window: usize,
        splits: usize,
    ) -> bool {
        let cfg = self.config();
        let (d, r, kvh) = (cfg.head_dim, cfg.group_size(), cfg.n_kv_head);
        let tokens: usize = seqs.iter().map(|s| s.new_tokens).sum();
        let rows = QB * r;
        let stride = rows * (d + 2);
        let st = Shared::new(states);
        let scale = 1.0 / libm::sqrtf(d as f32);
        let work = |local: usize, s: &mut [f32]| {
            let Some((item, split)) = find_split(seqs, window, local) else {
                return;
            };
            let seq = &seqs[item.seq];
            let nrows = item.n * r;
            // Queries and chunk states are `[KV head][nrows]`, as the kernel takes them.
            let (qt, s) = s.split_at_mut(kvh * rows * d);
            let (chunk_state, kscratch) = s.split_at_mut(kvh * rows * (d + 2));
            for g in 0..kvh {
                for t in 0..item.n {
                    for h in 0..r {
                        let src = ((g * r + h) * tokens + item.token0 + t) * d;
                        let dst = (g * nrows + t * r + h) * d;
                        qt[dst..dst + d].copy_from_slice(&q[src..src + d]);
                    }
                }
                // SAFETY: unit `local` alone writes the state of (g, item, split), at index
                // g * splits + local.
                let state = unsafe { st.range_mut((g * splits + local) * stride, stride) };
                // Only the item's rows: a decode step uses r of the QB * r.
                let (m, rest) = state.split_at_mut(rows);
                let (l, o) = rest.split_at_mut(rows);
                m[..nrows].fill(f32::NEG_INFINITY);
                l[..nrows].fill(0.0);
                o[..nrows * d].fill(0.0);
            }
            let (c0, c1) = item.chunks();
            let first = c0 + split * SPLIT;
            let last = (first + SPLIT).min(c1);
            for c in first..last {
                let (k0, k1) = (c * CHUNK, (c + 1) * CHUNK);
                let mut ranges = [(0u32, 0u32); QB];
                for (t, rg) in ranges.iter_mut().enumerate().take(item.n) {
                    let p = item.pos0 + t;
                    let lo = (p + 1).saturating_sub(window).clamp(k0, k1);
                    let hi = (p + 1).clamp(k0, k1);
                    *rg = ((lo - k0) as u32, (hi.max(lo) - k0) as u32);
                }
                let span = ranges[..item.n].iter().fold((CHUNK, 0), |a, &(lo, hi)| {
                    if lo < hi {
                        (a.0.min(lo as usize), a.1.max(hi as usize))
                    } else {
                        a
                    }
                });
                if span.0 >= span.1 {
                    continue;
                }
                let keys = k0..(k0 + span.1);
                // The start of this unit's next chunk, prefetched while this one computes.
                let next = if c + 1 < last {
                    k1..(k1 + simd::PREFETCH_KEYS).min(item.keys.1)
                } else {
                    k1..k1
                };
                let (pm, rest) = chunk_state.split_at_mut(kvh * nrows);
                let (pl, rest) = rest.split_at_mut(kvh * nrows);
                let po = &mut rest[..kvh * nrows * d];
                let ok = chunk_partial(
                    cache,
                    seq,
                    keys,
                    next,
                    d,
                    r,
                    &qt[..kvh * nrows * d],
                    &ranges[..item.n],
                    scale,
                    PartialRows {
                        m: &mut *pm,
                        l: &mut *pl,
                        o: &mut *po,
                    },
                    kscratch,
                );
                if !ex.check(ok) {
                    return;
                }
                for g in 0..kvh {
                    // SAFETY: as above; no other reference to this state is live.
                    let state = unsafe { st.range_mut((g * splits + local) * stride, stride) };
                    let (m, rest) = state.split_at_mut(rows);
                    let (l, o) = rest.split_at_mut(rows);
                    for row in 0..nrows {
                        let pr = g * nrows + row;
                        simd::merge_partial(
                            &mut m[row],
                            &mut l[row],
                            &mut o[row * d..(row + 1) * d],
                            pm[pr],
                            pl[pr],
                            &po[pr * d..(pr + 1) * d],
                        );
                    }
                }
            }
        };
        ex.units(splits, &work)
    }

    /// Merges the splits of each (KV head, token block) in order and writes normalised outputs.
    #[allow(clippy::too_many_arguments)]
    fn cached_merge(
        &self,
        ex: &Exec<'_>,
        seqs: &[Sequence<'_>],
        states: &[f32],
        o: &mut [f32],
        window: usize,
        items: usize,
        splits: usize,
    ) -> bool {
        let cfg = self.config();
        let (d, r) = (cfg.head_dim, cfg.group_size());
        let rows = QB * r;
        let stride = rows * (d + 2);
        let qd = cfg.q_dim();
        let os = Shared::new(o);
        let work = |u: usize, s: &mut [f32]| {
            let (g, index) = (u / items, u % items);
            let Some((item, split0)) = find_item(seqs, window, index) else {
                return;
            };
            // Only the item's rows were written (and are read).
            let nrows = item.n * r;
            let first = &states[(g * splits + split0) * stride..][..stride];
            let acc = &mut s[..stride];
            let (m, rest) = acc.split_at_mut(rows);
            let (l, acc_o) = rest.split_at_mut(rows);
            m[..nrows].copy_from_slice(&first[..nrows]);
            l[..nrows].copy_from_slice(&first[rows..rows + nrows]);
            acc_o[..nrows * d].copy_from_slice(&first[2 * rows..2 * rows + nrows * d]);
            for sp in 1..item.splits() {
                let other = &states[(g * splits + split0 + sp) * stride..][..stride];
                let (om, rest) = other.split_at(rows);
                let (ol, oo) = rest.split_at(rows);
                for row in 0..item.n * r {
                    simd::merge_partial(
                        &mut m[row],
                        &mut l[row],
                        &mut acc_o[row * d..(row + 1) * d],
                        om[row],
                        ol[row],
                        &oo[row * d..(row + 1) * d],
                    );
                }
            }
            for t in 0..item.n {
                // SAFETY: unit (g, item) alone writes these tokens' columns of KV head g.
                let dst = unsafe { os.range_mut((item.token0 + t) * qd + g * r * d, r * d) };
                for h in 0..r {
                    let row = t * r + h;
                    let inv = if l[row] > 0.0 { 1.0 / l[row] } else { 0.0 };
                    for i in 0..d {
                        dst[h * d + i] = acc_o[row * d + i] * inv;
                    }
                }
            }
        };
        ex.units(cfg.n_kv_head * items, &work)
    }
}

/// The item holding split unit `local` (counted over all items of one KV head) and the split
/// index inside it.
fn find_split(seqs: &[Sequence<'_>], window: usize, local: usize) -> Option<(Item, usize)> {
    let (mut at, mut found) = (0, None);
    for_each_item(seqs, window, |it| {
        let n = it.splits();
        if local < at + n {
            found = Some((it, local - at));
            return false;
        }
        at += n;
        true
    });
    found
}

/// Item number `index` and the index of its first split unit.
fn find_item(seqs: &[Sequence<'_>], window: usize, index: usize) -> Option<(Item, usize)> {
    let (mut i, mut split0, mut found) = (0, 0, None);
    for_each_item(seqs, window, |it| {
        if i == index {
            found = Some((it, split0));
            return false;
        }
        i += 1;
        split0 += it.splits();
        true
    });
    found
}

/// Checks block ids: inside the pool, and each used by at most one sequence of the call (the
/// parallel writers of new keys rely on it). `marks` is scratch of one word per pool block.
fn check_blocks(seqs: &[Sequence<'_>], num_blocks: usize, marks: &mut [u32]) -> Result<()> {
    if let Some(m) = marks.get_mut(..num_blocks) {
        m.fill(0);
    }
    check_blocks_marked(seqs, num_blocks, marks, &mut 0)
}

/// [`check_blocks`] with marks kept from call to call: every word of `marks` is at most
/// `*stamp`; the call takes the next stamp and marks each block it names with it, so a block
/// already marked with it is named twice. No pass over the pool but when the stamp wraps
/// (then every mark is zeroed first).
fn check_blocks_marked(
    seqs: &[Sequence<'_>],
    num_blocks: usize,
    marks: &mut [u32],
    stamp: &mut u32,
) -> Result<()> {
    let have = marks.len();
    if have < num_blocks {
        return Err(Error::InputShape {
            name: "block marks",
            expected: num_blocks,
            actual: have,
        });
    }
    *stamp = stamp.wrapping_add(1);
    if *stamp == 0 {
        marks.fill(0);
        *stamp = 1;
    }
    let now = *stamp;
    let marks = &mut marks[..num_blocks];
    for seq in seqs {
        for (i, &b) in seq.blocks.iter().enumerate() {
            let Some(mark) = marks.get_mut(b as usize) else {
                return Err(Error::InputValue {
                    name: "block table entry",
                    index: i,
                    value: b as i64,
                    rule: "block id outside the pool",
                });
            };
            if *mark == now {
                return Err(Error::InputValue {
                    name: "block table entry",
                    index: i,
                    value: b as i64,
                    rule: "block used twice in one call",
                });
            }
            *mark = now;
        }
    }
    Ok(())
}

/// Physical slot of logical token `j` of a sequence.
fn slot(cache: &KvCache<'_>, seq: &Sequence<'_>, j: usize) -> (usize, usize) {
    let s = if cache.rolling {
        j % seq.capacity(cache.block_size)
    } else {
        j
    };
    (
        seq.blocks[s / cache.block_size] as usize,
        s % cache.block_size,
    )
}

/// Writes the new keys and values (head-major `[KV][tokens][D]`, RoPE applied) into the cache.
fn append(cache: &mut KvCache<'_>, seqs: &[Sequence<'_>], k: &[f32], v: &[f32], tokens: usize) {
    fn store<E: Elem>(dst: &mut [E], src: &[f32]) {
        for (d, &s) in dst.iter_mut().zip(src) {
            *d = E::from_f32(s);
        }
    }
    let (kvh, d) = (cache.n_kv_head, cache.head_dim);
    let mut token0 = 0;
    for seq in seqs {
        for t in 0..seq.new_tokens {
            let (block, sl) = slot(cache, seq, seq.cached + t);
            for g in 0..kvh {
                let dst = cache.offset(block, g, sl);
                let src = (g * tokens + token0 + t) * d;
                let (ks, vs) = (&k[src..src + d], &v[src..src + d]);
                match &mut cache.pool {
                    KvPool::F32 { k: ck, v: cv } => {
                        store(&mut ck[dst..dst + d], ks);
                        store(&mut cv[dst..dst + d], vs);
                    }
                    KvPool::F16 { k: ck, v: cv } => {
                        store(&mut ck[dst..dst + d], ks);
                        store(&mut cv[dst..dst + d], vs);
                    }
                    KvPool::Bf16 { k: ck, v: cv } => {
                        store(&mut ck[dst..dst + d], ks);
                        store(&mut cv[dst..dst + d], vs);
                    }
                }
            }
        }
        token0 += seq.new_tokens;
    }
}

/// The partial states over the logical keys `keys` of sequence `seq`, all KV heads, gathering
/// the chunk's runs from the sequence's blocks; the keys `next` are prefetched meanwhile.
#[allow(clippy::too_many_arguments)]
fn chunk_partial(
    cache: &KvCache<'_>,
    seq: &Sequence<'_>,
    keys: core::ops::Range<usize>,
    next: core::ops::Range<usize>,
    d: usize,
    r: usize,
    q: &[f32],
    ranges: &[(u32, u32)],
    scale: f32,
    out: PartialRows<'_>,
    scratch: &mut [f32],
) -> core::result::Result<(), simd::ShapeError> {
    #[allow(clippy::too_many_arguments)]
    fn typed<E: Elem>(
        cache: &KvCache<'_>,
        pk: &[E],
        pv: &[E],
        seq: &Sequence<'_>,
        keys: core::ops::Range<usize>,
        next: core::ops::Range<usize>,
        d: usize,
        r: usize,
        q: &[f32],
        ranges: &[(u32, u32)],
        scale: f32,
        out: PartialRows<'_>,
        scratch: &mut [f32],
    ) -> core::result::Result<(), simd::ShapeError> {
        /// Appends the runs of the logical keys `keys`, each spanning every KV head of its
        /// block (head 0's keys first); `N` bounds the run count (one run per key at worst).
        fn gather<'c, E, const N: usize>(
            cache: &KvCache<'_>,
            pk: &'c [E],
            pv: &'c [E],
            seq: &Sequence<'_>,
            keys: core::ops::Range<usize>,
            d: usize,
            runs: &mut heapless::Vec<KvRun<'c, E>, N>,
        ) {
            let mut j = keys.start;
            while j < keys.end {
                let (block, sl) = slot(cache, seq, j);
                let len = (cache.block_size - sl).min(keys.end - j);
                let at = cache.offset(block, 0, sl);
                let end = cache.offset(block, cache.n_kv_head - 1, sl + len - 1) + d;
                let _ = runs.push(KvRun {
                    k: &pk[at..end],
                    v: &pv[at..end],
                    stride: d,
                    len,
                });
                j += len;
            }
        }
        let mut runs = heapless::Vec::<KvRun<'_, E>, CHUNK>::new();
        gather(cache, pk, pv, seq, keys, d, &mut runs);
        let mut ahead = heapless::Vec::<KvRun<'_, E>, { simd::PREFETCH_KEYS }>::new();
        gather(cache, pk, pv, seq, next, d, &mut ahead);
        let head_stride = cache.block_size * d;
        simd::attend_partial_heads(
            d,
            r,
            cache.n_kv_head,
            head_stride,
            q,
            &runs,
            &ahead,
            ranges,
            scale,
            out,
            scratch,
        )
    }
    match &cache.pool {
        KvPool::F32 { k, v } => typed(
            cache, k, v, seq, keys, next, d, r, q, ranges, scale, out, scratch,
        ),
        KvPool::F16 { k, v } => typed(
            cache, k, v, seq, keys, next, d, r, q, ranges, scale, out, scratch,
        ),
        KvPool::Bf16 { k, v } => typed(
            cache, k, v, seq, keys, next, d, r, q, ranges, scale, out, scratch,
        ),
    }
}
