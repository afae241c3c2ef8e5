//! Head split across devices (tensor parallel, SPEC.md "Multi-device head split"): which heads
//! and weight rows/columns each device owns, the per-device layers, and an executor that runs
//! every shard on the CPU ("devices" in one process) and sums their outputs.
//!
//! # The plan's rule
//!
//! For `H` query heads, `KV` key/value heads (group size `R = H / KV`) and `N` devices, any
//! `1 <= N <= H` is a valid plan; head counts may differ between devices by one unit:
//!
//! - `KV >= N`: the KV heads are cut into `N` contiguous ranges, the first `KV mod N` devices
//!   taking one more (8 KV heads on 3 devices: 3/3/2). A device owns all `R` query heads of
//!   its KV heads.
//! - `KV < N`: every device owns exactly one KV head, replicated on several devices: the
//!   devices are cut into `KV` contiguous ranges (the first `N mod KV` KV heads get one more
//!   device), and the `R` query heads of a KV head are cut into contiguous ranges among its
//!   devices, the first ones taking one more (2 KV heads, 8 query heads on 4 devices: devices
//!   0 and 1 share KV head 0 with query heads 0-1 and 2-3). `N <= H` guarantees every device at
//!   least one query head.
//!
//! So a KV head is never split, a query head lives on a device holding its KV head, devices own
//! contiguous ranges of heads in device order, and the q heads of device `i` come right after
//! those of device `i - 1`. [`ShardPlan::even`] refuses plans whose devices would not all own
//! the same numbers of heads, for callers that want equal shapes everywhere.
//!
//! # Weights
//!
//! `wq`, `wk`, `wv` (and `bq`, `bk`, `bv`) are cut by output rows along whole heads: contiguous
//! views of the caller's tensors. `wo` is cut by input columns, which are strided in its
//! `[C, H*D]` layout: the core does not allocate, so the caller passes each device's
//! `[C, h_i*D]` block, made once by [`ShardPlan::copy_wo`] into memory it owns. The output bias
//! `bo` belongs to device 0 alone, so the sum of the devices' outputs is the layer's output.
//! A per-head QK-norm weight (`[D]`) is shared by every device; a full QK-norm weight is cut
//! along the device's heads.
//!
//! # Full QK-norm
//!
//! Its statistics span every head: each device computes per-token sums of squares over its own
//! heads (a replicated KV head counts only on its first device), the `2 * tokens` sums are
//! added across devices (an all-reduce of a few floats per token, never the q/k rows), and each
//! device divides by the whole row's width. [`ShardLayer::forward_cpu`] takes that all-reduce
//! as a callback; [`ShardedLayer`] does it in process, in device order.

use core::ops::Range;

use crate::backend::Backend;
use crate::config::{BiasFlags, Config, QkNorm};
use crate::cpu::{cpu_workspace_len, stats_offset, Phases, MAX_LANES};
use crate::error::{Error, Result};
use crate::kv::{KvCache, Sequence};
use crate::layer::{Inputs, Layer, NormPart};
use crate::parallel::ParallelFor;
use crate::rope::RopeTable;
use crate::tensor::{LayerWeights, Tensor};

/// `n` items cut into `parts` contiguous ranges, the first `n mod parts` one longer: range `i`.
const fn split(n: usize, parts: usize, i: usize) -> (usize, usize) {
    let base = n / parts;
    let extra = n % parts;
    let start = i * base + if i < extra { i } else { extra };
    let len = base + if i < extra { 1 } else { 0 };
    (start, start + len)
}

/// The heads one device owns, as ranges of the unsplit layer's head indices.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceShard {
    /// The device index, `0..n_devices`.
    pub device: usize,
    /// First query head.
    pub q_start: usize,
    /// One past the last query head.
    pub q_end: usize,
    /// First KV head.
    pub kv_start: usize,
    /// One past the last KV head.
    pub kv_end: usize,
    /// Whether this device is the first holder of its KV heads: it alone counts them in the
    /// full-QK-norm k statistics (every device holds its KV heads' weights and cache).
    pub kv_first: bool,
}

impl DeviceShard {
    /// Query heads owned.
    pub fn q_heads(&self) -> Range<usize> {
        self.q_start..self.q_end
    }

    /// KV heads held.
    pub fn kv_heads(&self) -> Range<usize> {
        self.kv_start..self.kv_end
    }

    /// Number of query heads owned.
    pub fn n_head(&self) -> usize {
        self.q_end - self.q_start
    }

    /// Number of KV heads held.
    pub fn n_kv_head(&self) -> usize {
        self.kv_end - self.kv_start
    }

    /// Rows of `wq` (and elements of `bq`, columns of `wo`) owned, for head size `head_dim`.
    pub fn q_rows(&self, head_dim: usize) -> Range<usize> {
        self.q_start * head_dim..self.q_end * head_dim
    }

    /// Rows of `wk` and `wv` (and elements of `bk`, `bv`) held, for head size `head_dim`.
    pub fn kv_rows(&self, head_dim: usize) -> Range<usize> {
        self.kv_start * head_dim..self.kv_end * head_dim
    }
}

/// A head split of one layer over `n_devices` devices: see the module documentation for the
/// rule. Holds no per-device storage; every shard is computed on demand.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ShardPlan {
    cfg: Config,
    n_devices: usize,
}

impl ShardPlan {
    /// The plan of `cfg` over `n_devices` devices, uneven head counts allowed.
    ///
    /// # Errors
    /// An invalid `cfg` (as [`Config::validate`]); `n_devices` 0 ([`Error::Config`]) or larger
    /// than `n_head` ([`Error::ConfigPair`]: a device would own no query head).
    pub fn new(cfg: Config, n_devices: usize) -> Result<ShardPlan> {
        cfg.validate()?;
        if n_devices == 0 {
            return Err(Error::Config {
                field: "n_devices",
                value: 0,
                rule: "a shard plan needs at least one device",
            });
        }
        if n_devices > cfg.n_head {
            return Err(Error::ConfigPair {
                field: "n_devices",
                value: n_devices as i64,
                other: "n_head",
                other_value: cfg.n_head as i64,
                rule: "more devices than query heads: a device would own no head",
            });
        }
        Ok(ShardPlan { cfg, n_devices })
    }

    /// As [`ShardPlan::new`], but every device must own the same numbers of query and KV heads.
    ///
    /// # Errors
    /// Those of [`ShardPlan::new`], and [`Error::ConfigPair`] when `n_kv_head >= n_devices` and
    /// `n_devices` does not divide `n_kv_head`, or when `n_kv_head < n_devices` and either
    /// `n_kv_head` does not divide `n_devices` or the devices sharing a KV head would cut its
    /// query group unevenly.
    pub fn even(cfg: Config, n_devices: usize) -> Result<ShardPlan> {
        let plan = ShardPlan::new(cfg, n_devices)?;
        let (kv, n, r) = (cfg.n_kv_head, n_devices, cfg.group_size());
        let pair = |field, value: usize, other, other_value: usize, rule| Error::ConfigPair {
            field,
            value: value as i64,
            other,
            other_value: other_value as i64,
            rule,
        };
        if kv >= n && !kv.is_multiple_of(n) {
            return Err(pair(
                "n_kv_head",
                kv,
                "n_devices",
                n,
                "an even split needs n_devices to divide n_kv_head",
            ));
        }
        if kv < n && !n.is_multiple_of(kv) {
            return Err(pair(
                "n_devices",
                n,
                "n_kv_head",
                kv,
                "with fewer KV heads than devices, an even split needs n_kv_head to divide n_devices",
            ));
        }
        if kv < n && !r.is_multiple_of(n / kv) {
            return Err(pair(
                "n_head / n_kv_head",
                r,
                "n_devices / n_kv_head",
                n / kv,
                "the devices sharing a KV head would cut its query group unevenly",
            ));
        }
        Ok(plan)
    }

    /// The unsplit layer's configuration.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// Number of devices.
    pub fn n_devices(&self) -> usize {
        self.n_devices
    }

    /// Whether every device owns the same numbers of query and KV heads.
    pub fn is_even(&self) -> bool {
        let first = self.shard_of(0);
        (1..self.n_devices).all(|i| {
            let s = self.shard_of(i);
            (s.n_head(), s.n_kv_head()) == (first.n_head(), first.n_kv_head())
        })
    }

    /// Whether the layer's QK-norm statistics span heads of several devices (full QK-norm on
    /// more than one device): the executor must then all-reduce the per-token sums of squares.
    pub fn needs_norm_reduction(&self) -> bool {
        self.cfg.qk_norm == QkNorm::Full && self.n_devices > 1
    }

    fn device(&self, device: usize) -> Result<()> {
        if device >= self.n_devices {
            return Err(Error::InputValue {
                name: "device",
                index: 0,
                value: device as i64,
                rule: "must be < n_devices of the plan",
            });
        }
        Ok(())
    }

    /// The heads device `device` owns.
    ///
    /// # Errors
    /// [`Error::InputValue`] if `device >= n_devices`.
    pub fn shard(&self, device: usize) -> Result<DeviceShard> {
        self.device(device)?;
        Ok(self.shard_of(device))
    }

    fn shard_of(&self, i: usize) -> DeviceShard {
        let (kv, n, r) = (self.cfg.n_kv_head, self.n_devices, self.cfg.group_size());
        if kv >= n {
            let (g0, g1) = split(kv, n, i);
            return DeviceShard {
                device: i,
                q_start: g0 * r,
                q_end: g1 * r,
                kv_start: g0,
                kv_end: g1,
                kv_first: true,
            };
        }
        // Devices per KV head: the first `n % kv` KV heads get `base + 1` of them.
        let (base, extra) = (n / kv, n % kv);
        let big = extra * (base + 1);
        let (g, j, m) = if i < big {
            (i / (base + 1), i % (base + 1), base + 1)
        } else {
            (extra + (i - big) / base, (i - big) % base, base)
        };
        let (a, b) = split(r, m, j);
        DeviceShard {
            device: i,
            q_start: g * r + a,
            q_end: g * r + b,
            kv_start: g,
            kv_end: g + 1,
            kv_first: j == 0,
        }
    }

    /// The configuration device `device` runs as an ordinary layer: its head counts, the same
    /// `head_dim`, `n_embd`, norm, rotary and window settings, and the output bias only on
    /// device 0. (Its head count need not divide `n_embd`; the unsplit configuration was
    /// checked.)
    ///
    /// # Errors
    /// [`Error::InputValue`] if `device >= n_devices`.
    pub fn shard_config(&self, device: usize) -> Result<Config> {
        let s = self.shard(device)?;
        Ok(self.config_of(&s))
    }

    fn config_of(&self, s: &DeviceShard) -> Config {
        Config {
            n_head: s.n_head(),
            n_kv_head: s.n_kv_head(),
            bias: BiasFlags {
                o: self.cfg.bias.o && s.device == 0,
                ..self.cfg.bias
            },
            ..self.cfg
        }
    }

    /// The full-QK-norm share of device `device` (`None` without full QK-norm).
    ///
    /// # Errors
    /// [`Error::InputValue`] if `device >= n_devices`.
    pub fn norm_part(&self, device: usize) -> Result<Option<NormPart>> {
        let s = self.shard(device)?;
        Ok((self.cfg.qk_norm == QkNorm::Full).then_some(NormPart {
            q_width: self.cfg.q_dim(),
            k_width: self.cfg.kv_dim(),
            count_k: s.kv_first,
        }))
    }

    /// Elements of device `device`'s `wo` block, `n_embd * n_head_of_device * head_dim`.
    ///
    /// # Errors
    /// [`Error::InputValue`] if `device >= n_devices`.
    pub fn wo_block_len(&self, device: usize) -> Result<usize> {
        let s = self.shard(device)?;
        Ok(self.cfg.n_embd * s.n_head() * self.cfg.head_dim)
    }

    /// Copies device `device`'s columns of the unsplit `wo` (`[n_embd, n_head * head_dim]`)
    /// into `dst`, a `[n_embd, n_head_of_device * head_dim]` row-major block. Works for any
    /// element type (f32, f16, bf16 storage).
    ///
    /// # Errors
    /// [`Error::InputValue`] for a device outside the plan; [`Error::WeightShape`] if `wo` or
    /// `dst` has the wrong length (`dst` is untouched then).
    pub fn copy_wo<E: Copy>(&self, device: usize, wo: &[E], dst: &mut [E]) -> Result<()> {
        let s = self.shard(device)?;
        let (c, qd) = (self.cfg.n_embd, self.cfg.q_dim());
        let cols = s.q_rows(self.cfg.head_dim);
        for (name, len, want) in [
            ("wo", wo.len(), c * qd),
            ("wo block", dst.len(), c * cols.len()),
        ] {
            if len != want {
                return Err(Error::WeightShape {
                    name,
                    expected: want,
                    actual: len,
                });
            }
        }
        if cols.is_empty() {
            return Ok(());
        }
        for (row, out) in wo.chunks_exact(qd).zip(dst.chunks_exact_mut(cols.len())) {
            out.copy_from_slice(&row[cols.clone()]);
        }
        Ok(())
    }

    /// Device `device`'s weights: views of the rows of `wq`, `wk`, `wv`, the slices of `bq`,
    /// `bk`, `bv` and of full QK-norm weights, the shared per-head QK-norm weights, `bo` on
    /// device 0 only, and the caller's `wo_block` (see [`ShardPlan::copy_wo`]).
    ///
    /// # Errors
    /// [`Error::InputValue`] for a device outside the plan; the errors of
    /// [`LayerWeights::validate`] for `full` against the unsplit configuration, or for
    /// `wo_block` against the device's.
    pub fn shard_weights<'a>(
        &self,
        device: usize,
        full: &LayerWeights<'a>,
        wo_block: Tensor<'a>,
    ) -> Result<LayerWeights<'a>> {
        let s = self.shard(device)?;
        full.validate(&self.cfg)?;
        let d = self.cfg.head_dim;
        let c = self.cfg.n_embd;
        let (qr, kr) = (s.q_rows(d), s.kv_rows(d));
        let rows = |t: &Tensor<'a>, r: &Range<usize>| slice(t, r.start * c..r.end * c);
        let full_norm = self.cfg.qk_norm == QkNorm::Full;
        let w = LayerWeights {
            wq: rows(&full.wq, &qr),
            wk: rows(&full.wk, &kr),
            wv: rows(&full.wv, &kr),
            wo: wo_block,
            bq: full.bq.map(|t| slice(&t, qr.clone())),
            bk: full.bk.map(|t| slice(&t, kr.clone())),
            bv: full.bv.map(|t| slice(&t, kr.clone())),
            bo: if device == 0 { full.bo } else { None },
            q_norm: full
                .q_norm
                .map(|t| if full_norm { slice(&t, qr.clone()) } else { t }),
            k_norm: full
                .k_norm
                .map(|t| if full_norm { slice(&t, kr.clone()) } else { t }),
        };
        w.validate(&self.config_of(&s))?;
        Ok(w)
    }

    /// Device `device`'s share of `tokens` tokens in sequence-parallel mode: contiguous ranges
    /// in device order, the first `tokens mod n_devices` devices taking one more.
    ///
    /// # Errors
    /// [`Error::InputValue`] if `device >= n_devices`.
    pub fn token_range(&self, device: usize, tokens: usize) -> Result<Range<usize>> {
        self.device(device)?;
        let (a, b) = split(tokens, self.n_devices, device);
        Ok(a..b)
    }
}

/// A sub-slice of a tensor (the range lies inside it: the caller validated the lengths).
fn slice<'a>(t: &Tensor<'a>, r: Range<usize>) -> Tensor<'a> {
    match *t {
        Tensor::F32(s) => Tensor::F32(&s[r]),
        Tensor::F16(s) => Tensor::F16(&s[r]),
        Tensor::Bf16(s) => Tensor::Bf16(&s[r]),
    }
}

/// One device's part of a head-split layer: an ordinary [`Layer`] over the device's heads
/// (its [`ShardPlan::shard_config`] and [`ShardPlan::shard_weights`]) plus, with full
/// QK-norm, its share of the norm statistics.
#[derive(Clone, Copy, Debug)]
pub struct ShardLayer<'a> {
    plan: ShardPlan,
    shard: DeviceShard,
    layer: Layer<'a>,
}

impl<'a> ShardLayer<'a> {
    /// Device `device`'s layer from the unsplit weights and the device's `wo` block.
    ///
    /// # Errors
    /// Those of [`ShardPlan::shard_weights`].
    pub fn new(
        plan: &ShardPlan,
        device: usize,
        full: &LayerWeights<'a>,
        wo_block: Tensor<'a>,
    ) -> Result<ShardLayer<'a>> {
        let weights = plan.shard_weights(device, full, wo_block)?;
        let shard = plan.shard(device)?;
        let part = plan.norm_part(device)?;
        let layer = Layer::shard(plan.config_of(&shard), weights, part)?;
        Ok(ShardLayer {
            plan: *plan,
            shard,
            layer,
        })
    }

    /// The plan this shard belongs to.
    pub fn plan(&self) -> &ShardPlan {
        &self.plan
    }

    /// The heads this device owns.
    pub fn shard(&self) -> &DeviceShard {
        &self.shard
    }

    /// The device's layer. Without full QK-norm any executor runs it as is; with full QK-norm
    /// the single-device entry points refuse it ([`Error::Unsupported`]) and an executor must
    /// follow [`ShardLayer::norm_part`].
    pub fn layer(&self) -> &Layer<'a> {
        &self.layer
    }

    /// With full QK-norm: the divisors and the k-counting rule of this device's statistics.
    pub fn norm_part(&self) -> Option<NormPart> {
        self.layer.part()
    }

    /// f32 elements of workspace [`ShardLayer::forward_cpu`] needs (as
    /// [`cpu_workspace_len`] for the device's configuration).
    pub fn workspace_len(&self, tokens: usize, lanes: usize) -> usize {
        cpu_workspace_len(self.layer.config(), tokens, lanes)
    }

    /// Runs this device's whole pipeline on the CPU executor and writes its partial output
    /// (`[batch, seq_len, n_embd]`, `bo` included on device 0 only): the sum of every device's
    /// partial output is the layer's output.
    ///
    /// With full QK-norm, `reduce` receives this device's `2 * batch * seq_len` per-token sums
    /// of squares (q sums, then k sums) and must replace them with their sum over all devices
    /// of the plan (all in the same order for a deterministic result); without it, `reduce`
    /// is not called. This is the hook a host running each device on its own threads uses
    /// for its all-reduce.
    ///
    /// # Errors
    /// As [`Layer::forward_cpu`]. On error `out` is untouched and `reduce` was not called.
    pub fn forward_cpu(
        &self,
        inputs: &Inputs<'_>,
        workspace: &mut [f32],
        out: &mut [f32],
        par: &dyn ParallelFor,
        reduce: &mut dyn FnMut(&mut [f32]),
    ) -> Result<Backend> {
        let call = self.layer.check(inputs, out.len())?;
        self.layer
            .run_cpu(&call, workspace, out, par, Phases::Whole(reduce))
    }

    /// [`Layer::forward_cached`] for this device: `cache` holds this device's KV heads only
    /// (`n_kv_head` of [`ShardLayer::shard`]), `out` receives the partial output, and `reduce`
    /// is the all-reduce of the full-QK-norm sums as in [`ShardLayer::forward_cpu`]. The
    /// workspace is [`crate::cached_workspace_len`] of the device's configuration.
    ///
    /// # Errors
    /// As [`Layer::forward_cached`].
    #[allow(clippy::too_many_arguments)] // forward_cached's inputs and the reduction
    pub fn forward_cached(
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
        self.layer
            .cached_with(x, seqs, rope_table, cache, workspace, out, par, reduce)
    }
}

/// Every device of a plan run in one process on the CPU executor ("CPU devices"): the devices
/// run one after another, each on all of the host's parallel-for, and their partial outputs are
/// summed in device order (0 + 1 + ...), so results are deterministic and independent of the
/// thread count. Full QK-norm statistics are reduced in device order between the projections
/// and the rest of the pipeline.
#[derive(Clone, Copy, Debug)]
pub struct ShardedLayer<'s, 'a> {
    shards: &'s [ShardLayer<'a>],
}

impl<'s, 'a> ShardedLayer<'s, 'a> {
    /// The layer of `shards`, which must be devices `0..n` of one plan, in order.
    ///
    /// # Errors
    /// [`Error::ConfigPair`] if the count is not the plan's `n_devices`; [`Error::InputValue`]
    /// naming the first shard that is not device `i` of the first shard's plan.
    pub fn new(shards: &'s [ShardLayer<'a>]) -> Result<ShardedLayer<'s, 'a>> {
        let n = shards.first().map_or(0, |s| s.plan.n_devices);
        if shards.len() != n || n == 0 {
            return Err(Error::ConfigPair {
                field: "shards",
                value: shards.len() as i64,
                other: "n_devices",
                other_value: n as i64,
                rule: "one shard per device of the plan is needed",
            });
        }
        for (i, s) in shards.iter().enumerate() {
            if s.shard.device != i || s.plan != shards[0].plan {
                return Err(Error::InputValue {
                    name: "shards",
                    index: i,
                    value: s.shard.device as i64,
                    rule: "shard i must be device i of the same plan",
                });
            }
        }
        Ok(ShardedLayer { shards })
    }

    /// The plan.
    pub fn plan(&self) -> &ShardPlan {
        &self.shards[0].plan
    }

    /// The devices' layers.
    pub fn shards(&self) -> &'s [ShardLayer<'a>] {
        self.shards
    }

    /// f32 elements of workspace the forward calls need for `tokens = batch * seq_len` tokens
    /// and `lanes` workers: every device's workspace plus one partial output.
    pub fn workspace_len(&self, tokens: usize, lanes: usize) -> usize {
        let lanes = lanes.clamp(1, MAX_LANES);
        self.shards
            .iter()
            .map(|s| s.workspace_len(tokens, lanes))
            .fold(0usize, usize::saturating_add)
            .saturating_add(tokens.saturating_mul(self.plan().cfg.n_embd))
    }

    /// The layer's output: every device's partial output, summed in device order (`bo` once).
    ///
    /// # Errors
    /// As [`Layer::forward_cpu`]. On an invalid input or a short workspace `out` is untouched.
    pub fn forward_cpu(
        &self,
        inputs: &Inputs<'_>,
        workspace: &mut [f32],
        out: &mut [f32],
        par: &dyn ParallelFor,
    ) -> Result<Backend> {
        let y_len = out.len();
        let (ws, partial) = self.prepare(inputs, y_len, workspace, par)?;
        let partial = &mut partial[..y_len];
        let backend = self.run(inputs, ws, par, |i, ws, call, layer| {
            let dst: &mut [f32] = if i == 0 { &mut *out } else { &mut *partial };
            let b = layer.run_cpu(call, ws, dst, par, Phases::Finish)?;
            if i > 0 {
                out.iter_mut()
                    .zip(partial.iter())
                    .for_each(|(y, p)| *y += p);
            }
            Ok(b)
        })?;
        Ok(backend)
    }

    /// The "caller reduces" mode: device `i`'s partial output into
    /// `partials[i * len..(i + 1) * len]` with `len = batch * seq_len * n_embd`; their sum is
    /// the layer's output (`bo` is in device 0's part).
    ///
    /// # Errors
    /// As [`Layer::forward_cpu`]; [`Error::InputShape`] if `partials` is not `n_devices * len`.
    pub fn forward_cpu_partials(
        &self,
        inputs: &Inputs<'_>,
        workspace: &mut [f32],
        partials: &mut [f32],
        par: &dyn ParallelFor,
    ) -> Result<Backend> {
        let n = self.shards.len();
        let len = partials.len() / n;
        let y_len = self.shards[0]
            .layer
            .output_len(inputs.batch, inputs.seq_len)
            .unwrap_or(usize::MAX);
        if partials.len() != y_len.saturating_mul(n) {
            return Err(Error::InputShape {
                name: "partials",
                expected: y_len.saturating_mul(n),
                actual: partials.len(),
            });
        }
        let (ws, _) = self.prepare(inputs, len, workspace, par)?;
        self.run(inputs, ws, par, |i, ws, call, layer| {
            let dst = &mut partials[i * len..(i + 1) * len];
            layer.run_cpu(call, ws, dst, par, Phases::Finish)
        })
    }

    /// Sequence-parallel mode: the tokens of the call (`batch * seq_len`, flattened) are cut
    /// among the devices by [`ShardPlan::token_range`]; device `i` holds its rows of `x` in
    /// `x_parts[i]` and receives the layer's output for the same rows in `out_parts[i]`. The
    /// rows are gathered before the projections and the partial outputs reduce-scattered
    /// after (in device order). `inputs.x` is ignored (pass an empty slice); everything else
    /// of `inputs` (mask, positions, table) describes the whole call.
    ///
    /// # Errors
    /// As [`ShardedLayer::forward_cpu`]; [`Error::InputShape`] naming `x part` or `out part`
    /// when a part's length is not its token count times `n_embd`. The workspace must hold
    /// [`ShardedLayer::workspace_len`] plus `2 * batch * seq_len * n_embd` elements.
    pub fn forward_cpu_seq_parallel(
        &self,
        inputs: &Inputs<'_>,
        x_parts: &[&[f32]],
        out_parts: &mut [&mut [f32]],
        workspace: &mut [f32],
        par: &dyn ParallelFor,
    ) -> Result<Backend> {
        let plan = *self.plan();
        let c = plan.cfg.n_embd;
        let tokens = inputs.batch.saturating_mul(inputs.seq_len);
        let total = tokens.saturating_mul(c);
        for (name, count) in [("x parts", x_parts.len()), ("out parts", out_parts.len())] {
            if count != plan.n_devices {
                return Err(Error::InputShape {
                    name,
                    expected: plan.n_devices,
                    actual: count,
                });
            }
        }
        for i in 0..plan.n_devices {
            let want = plan.token_range(i, tokens)?.len().saturating_mul(c);
            for (name, len) in [
                ("x part", x_parts[i].len()),
                ("out part", out_parts[i].len()),
            ] {
                if len != want {
                    return Err(Error::InputShape {
                        name,
                        expected: want,
                        actual: len,
                    });
                }
            }
        }
        let needed = self
            .workspace_len(tokens, par.width())
            .saturating_add(total.saturating_mul(2));
        if workspace.len() < needed {
            return Err(Error::Workspace {
                needed,
                actual: workspace.len(),
            });
        }
        let (x, rest) = workspace.split_at_mut(total);
        let (y, rest) = rest.split_at_mut(total);
        // Gather.
        let mut at = 0;
        for part in x_parts {
            x[at..at + part.len()].copy_from_slice(part);
            at += part.len();
        }
        let whole = Inputs { x: &*x, ..*inputs };
        let backend = self.forward_cpu(&whole, rest, y, par)?;
        // Scatter (the in-process sum already reduced every row).
        let mut at = 0;
        for part in out_parts.iter_mut() {
            let n = part.len();
            part.copy_from_slice(&y[at..at + n]);
            at += n;
        }
        Ok(backend)
    }

    /// Validates the call and the workspace; returns the devices' workspace and the partial
    /// buffer.
    fn prepare<'w>(
        &self,
        inputs: &Inputs<'_>,
        out_len: usize,
        workspace: &'w mut [f32],
        par: &dyn ParallelFor,
    ) -> Result<(&'w mut [f32], &'w mut [f32])> {
        self.shards[0].layer.check(inputs, out_len)?;
        let tokens = inputs.batch * inputs.seq_len;
        let needed = self.workspace_len(tokens, par.width());
        if workspace.len() < needed {
            return Err(Error::Workspace {
                needed,
                actual: workspace.len(),
            });
        }
        let partial_len = tokens * self.plan().cfg.n_embd;
        Ok(workspace[..needed].split_at_mut(needed - partial_len))
    }

    /// Projections of every device, the norm reduction, then `finish(i, ws_i, call, layer_i)`
    /// for every device in order.
    fn run(
        &self,
        inputs: &Inputs<'_>,
        ws: &mut [f32],
        par: &dyn ParallelFor,
        mut finish: impl FnMut(
            usize,
            &mut [f32],
            &crate::layer::Call<'_>,
            &Layer<'a>,
        ) -> Result<Backend>,
    ) -> Result<Backend> {
        let tokens = inputs.batch * inputs.seq_len;
        let lanes = par.width().clamp(1, MAX_LANES);
        let out_len = tokens * self.plan().cfg.n_embd;
        let call = self.shards[0].layer.check(inputs, out_len)?;
        // Device i's workspace starts at offsets[i]; its sums of squares right after its q, k,
        // v and o buffers (the layout of the CPU executor).
        let lens = |s: &ShardLayer<'_>| s.workspace_len(tokens, lanes);
        let stats_at = |s: &ShardLayer<'_>| stats_offset(s.layer.config(), tokens);
        let mut at = 0;
        for s in self.shards {
            let ws_i = &mut ws[at..at + lens(s)];
            s.layer
                .run_cpu(&call, ws_i, &mut [], par, Phases::Project)?;
            at += lens(s);
        }
        if self.plan().cfg.qk_norm == QkNorm::Full {
            for j in 0..2 * tokens {
                let mut at = 0;
                let mut total = 0.0f32;
                for s in self.shards {
                    total += ws[at + stats_at(s) + j];
                    at += lens(s);
                }
                let mut at = 0;
                for s in self.shards {
                    ws[at + stats_at(s) + j] = total;
                    at += lens(s);
                }
            }
        }
        let mut at = 0;
        let mut backend = Backend::Reference;
        for (i, s) in self.shards.iter().enumerate() {
            backend = finish(i, &mut ws[at..at + lens(s)], &call, &s.layer)?;
            at += lens(s);
        }
        Ok(backend)
    }
}
