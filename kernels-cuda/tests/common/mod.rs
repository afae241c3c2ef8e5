//! Helpers shared by the GPU test binaries: the skip rule, the mask cases, the reference run and
//! the error measure. (Each binary uses a different subset.)
#![allow(dead_code)]

use attnrt::{
    reference_workspace_len, rope, BiasFlags, Config, Inputs, Layer, MaskInputs, QkNorm, Rope,
    RopeConvention, RopeTable, Sequence,
};
use attnrt_cuda::{device_count, no_device_reason, GpuLayer, GpuOptions, Precision};
use attnrt_tests::Rng;

/// Whether a CUDA device is usable; prints why not ("skipped: ...") when it is not.
pub fn device_or_skip() -> bool {
    match no_device_reason() {
        Some(reason) => {
            println!("skipped: no CUDA device ({reason})");
            false
        }
        None => true,
    }
}

/// The device counts a multi-GPU test runs (2, and 4 when present), or `None` after printing
/// why not (`what` needs at least 2 devices).
pub fn device_counts(what: &str) -> Option<Vec<usize>> {
    if !device_or_skip() {
        return None;
    }
    let n = device_count();
    if n < 2 {
        println!("skipped: {what} needs at least 2 CUDA devices; {n} present");
        return None;
    }
    Some([2usize, 4].into_iter().filter(|&k| k <= n).collect())
}

/// Held by each multi-GPU test for its whole run. The tests' layers hold NCCL communicators over
/// the same devices, and NCCL does not allow collectives of several communicators on one device
/// to run or be captured at once: under the test harness's default parallel threads, graph
/// captures failed with "ncclGroupEnd failed: unhandled cuda error" (2 x H200, twelfth session;
/// the same with `--test-threads 1` passed).
pub fn one_split_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    static SPLITS: std::sync::Mutex<()> = std::sync::Mutex::new(());
    // A test that failed while holding it leaves nothing the next one depends on.
    SPLITS.lock().unwrap_or_else(|e| e.into_inner())
}

/// CUDA ordinals 0..n.
pub fn devices(n: usize) -> Vec<u32> {
    (0..n as u32).collect()
}

/// `cfg` with the window of [`make_call`]'s windowed mask modes (1, 7 and 8: 17 tokens) and
/// the rotary embedding `variant` picks (`variant % 3`: none, interleaved, half-split with
/// theta 500000).
pub fn with_mode_window_and_rope(mut cfg: Config, mode: usize, variant: usize) -> Config {
    if matches!(mode, 1 | 7 | 8) {
        cfg = cfg.with_sliding_window(17);
    }
    match variant % 3 {
        0 => cfg,
        1 => cfg.with_rope(Rope::DEFAULT),
        _ => cfg.with_rope(Rope {
            convention: RopeConvention::HalfSplit,
            theta: 500000.0,
            ..Rope::DEFAULT
        }),
    }
}

/// One GPU's forward of `inputs` at precision `p`, host in and host out.
pub fn one_gpu(layer: Layer<'_>, p: Precision, inputs: &Inputs<'_>) -> Vec<f32> {
    let mut gpu = GpuLayer::new(layer, GpuOptions::new(p, inputs.batch, inputs.seq_len))
        .unwrap_or_else(|e| panic!("GpuLayer::new({p:?}): {e}"));
    let mut y = vec![f32::NAN; inputs.batch * inputs.seq_len * layer.config().n_embd];
    gpu.forward_host(inputs, &mut y)
        .unwrap_or_else(|e| panic!("forward_host({p:?}): {e}"));
    y
}

/// The multi-GPU tests' layer: 8 query heads, `kv` KV heads, head_dim 64, QK-norm `norm`; a
/// window with the windowed mask modes of [`make_call`]; `variant` picks rotary and bias.
pub fn split_config(kv: usize, mode: usize, variant: usize, norm: QkNorm) -> Config {
    let base = Config::new(128, 8)
        .with_kv_heads(kv)
        .with_head_dim(64)
        .with_qk_norm(norm);
    let mut cfg = with_mode_window_and_rope(base, mode, variant);
    if variant % 4 < 2 {
        cfg = cfg.with_bias(BiasFlags::ALL);
    }
    cfg
}

/// The reference output of each sequence over all its tokens (`xs[i]` holds `prefill[i] +
/// steps` tokens), positions from `table`: what prefill-then-decode must reproduce.
pub fn sequence_references(
    layer: &Layer<'_>,
    table: RopeTable<'_>,
    xs: &[Vec<f32>],
    prefill: &[usize],
    steps: usize,
) -> Vec<Vec<f32>> {
    let n_embd = layer.config().n_embd;
    xs.iter()
        .zip(prefill)
        .map(|(x, t)| {
            let n = t + steps;
            let mut inputs = Inputs::new(x, 1, n);
            inputs.rope_table = Some(table);
            let mut ws = vec![0.0; reference_workspace_len(layer.config(), n)];
            let mut y = vec![f32::NAN; n * n_embd];
            layer.forward_reference(&inputs, &mut ws, &mut y).unwrap();
            y
        })
        .collect()
}

/// The calls of a prefill-then-decode test and the block tables they use.
pub struct CachedPlan {
    /// Per call, per sequence: (cached tokens, new tokens).
    pub calls: Vec<Vec<(usize, usize)>>,
    /// Blocks of the pool (every table's blocks, and 3 spare).
    pub num_blocks: usize,
    /// Per sequence, its blocks: a share of a shuffled pool.
    pub tables: Vec<Vec<u32>>,
}

/// The prefill of sequences of `prefill` tokens in chunks of `chunk` (all at once with
/// `usize::MAX`), then `steps` single-token decode steps of every sequence; each sequence's
/// table holds its tokens (a rolling cache with `window`: the window plus one chunk) in blocks
/// of `block`, drawn from a pool shuffled with `rng`.
pub fn cached_plan(
    prefill: &[usize],
    chunk: usize,
    steps: usize,
    rolling_window: Option<usize>,
    block: usize,
    rng: &mut Rng,
) -> CachedPlan {
    let mut calls: Vec<Vec<(usize, usize)>> = Vec::new();
    let longest = prefill.iter().copied().max().unwrap_or(0);
    let mut c0 = 0;
    while c0 < longest {
        calls.push(
            prefill
                .iter()
                .map(|&t| (c0.min(t), t.saturating_sub(c0).min(chunk)))
                .collect(),
        );
        c0 = c0.saturating_add(chunk);
    }
    for step in 0..steps {
        calls.push(prefill.iter().map(|&t| (t + step, 1)).collect());
    }
    let counts: Vec<usize> = prefill
        .iter()
        .map(|&t| match rolling_window {
            Some(w) => (w + t.min(chunk) - 1).div_ceil(block),
            None => (t + steps).div_ceil(block),
        })
        .collect();
    let num_blocks: usize = counts.iter().sum::<usize>() + 3;
    let mut ids: Vec<u32> = (0..num_blocks as u32).collect();
    for i in (1..ids.len()).rev() {
        let j = ((rng.uniform() * 0.5 + 0.5) * (i + 1) as f32) as usize % (i + 1);
        ids.swap(i, j);
    }
    let mut tables = Vec::new();
    let mut at = 0;
    for &n in &counts {
        tables.push(ids[at..at + n].to_vec());
        at += n;
    }
    CachedPlan {
        calls,
        num_blocks,
        tables,
    }
}

/// One call of a [`CachedPlan`]: its sequences (over `tables`), the new tokens' rows of `x`
/// (taken from each sequence's rows `xs[s]`, `n_embd` wide) and, per new token, its
/// (sequence, position).
pub fn plan_call<'t>(
    call: &[(usize, usize)],
    tables: &'t [Vec<u32>],
    xs: &[Vec<f32>],
    n_embd: usize,
) -> (Vec<Sequence<'t>>, Vec<f32>, Vec<(usize, usize)>) {
    let (mut seqs, mut x, mut rows) = (Vec::new(), Vec::new(), Vec::new());
    for (s, &(cached, new)) in call.iter().enumerate() {
        seqs.push(Sequence {
            cached,
            new_tokens: new,
            blocks: &tables[s],
        });
        x.extend_from_slice(&xs[s][cached * n_embd..(cached + new) * n_embd]);
        rows.extend((cached..cached + new).map(|i| (s, i)));
    }
    (seqs, x, rows)
}

/// Names of the mask modes of [`make_call`], by mode number.
pub const MASK_NAMES: [&str; 9] = [
    "causal",
    "window",
    "padding",
    "docs-sorted",
    "docs-unsorted",
    "varlen",
    "docs+varlen",
    "window+padding+docs",
    "everything",
];

/// One call's owned inputs.
pub struct CallData {
    pub batch: usize,
    pub t: usize,
    pub x: Vec<f32>,
    pub seq_lens: Option<Vec<i32>>,
    pub docs: Option<Vec<i32>>,
    pub cu: Option<Vec<i32>>,
    pub positions: Option<Vec<i32>>,
    pub table: Option<Vec<f32>>,
}

impl CallData {
    pub fn inputs(&self, cfg: &Config) -> Inputs<'_> {
        Inputs {
            x: &self.x,
            batch: self.batch,
            seq_len: self.t,
            mask: MaskInputs {
                seq_lens: self.seq_lens.as_deref(),
                document_ids: self.docs.as_deref(),
                cu_seqlens: self.cu.as_deref(),
                max_seqlen: None,
            },
            position_ids: self.positions.as_deref(),
            rope_table: self
                .table
                .as_deref()
                .map(|t| RopeTable::new(t, cfg.head_dim).unwrap()),
        }
    }
}

pub fn sorted_docs(rng: &mut Rng, t: usize) -> Vec<i32> {
    let a = ((rng.uniform() * 0.5 + 0.5) * t as f32) as usize;
    let b = ((rng.uniform() * 0.5 + 0.5) * t as f32) as usize;
    let (a, b) = (a.min(b), a.max(b));
    (0..t).map(|i| (i >= a) as i32 + (i >= b) as i32).collect()
}

pub fn make_call(cfg: &Config, mode: usize, t: usize, rng: &mut Rng, positions: bool) -> CallData {
    let single = matches!(mode, 5 | 6 | 8);
    let batch = if single { 1 } else { 2 };
    let x = rng.vec(batch * t * cfg.n_embd, 1.0);
    let lens = |batch: usize| -> Vec<i32> {
        (0..batch)
            .map(|b| {
                if b == 0 {
                    (t - t / 3) as i32
                } else {
                    (t / 2) as i32
                }
            })
            .collect()
    };
    let docs_sorted =
        |rng: &mut Rng| -> Vec<i32> { (0..batch).flat_map(|_| sorted_docs(rng, t)).collect() };
    // Four segments, one of them empty: [0, a), [a, a), [a, b), [b, T).
    let cu = || -> Vec<i32> {
        let (a, b) = ((t / 3) as i32, (t - t / 4) as i32);
        vec![0, a, a, b, t as i32]
    };
    let (mut seq_lens, mut docs, mut cus) = (None, None, None);
    match mode {
        0 | 1 => {}
        2 => seq_lens = Some(lens(batch)),
        3 => docs = Some(docs_sorted(rng)),
        4 => {
            docs = Some(
                (0..batch * t)
                    .map(|_| ((rng.uniform() + 1.0) * 1.5) as i32)
                    .collect(),
            )
        }
        5 => cus = Some(cu()),
        6 => {
            cus = Some(cu());
            docs = Some(docs_sorted(rng));
        }
        7 => {
            seq_lens = Some(lens(batch));
            docs = Some(docs_sorted(rng));
        }
        _ => {
            seq_lens = Some(lens(batch));
            docs = Some(
                (0..batch * t)
                    .map(|_| ((rng.uniform() + 1.0) * 1.5) as i32)
                    .collect(),
            );
            cus = Some(cu());
        }
    }
    let max_pos = t + 9;
    let table = cfg.rope().map(|r| {
        let mut tb = vec![0.0; rope::table_len(max_pos, cfg.head_dim)];
        rope::build_table(r, cfg.head_dim, &mut tb).unwrap();
        tb
    });
    let positions = (positions && cfg.rope().is_some()).then(|| {
        (0..batch * t)
            .map(|_| ((rng.uniform() + 1.0) * 0.5 * (max_pos - 1) as f32) as i32)
            .collect()
    });
    CallData {
        batch,
        t,
        x,
        seq_lens,
        docs,
        cu: cus,
        positions,
        table,
    }
}

pub fn reference(layer: &Layer<'_>, inputs: &Inputs<'_>) -> Vec<f32> {
    let cfg = layer.config();
    let mut ws = vec![0.0; reference_workspace_len(cfg, inputs.seq_len)];
    let mut y = vec![f32::NAN; inputs.batch * inputs.seq_len * cfg.n_embd];
    layer.forward_reference(inputs, &mut ws, &mut y).unwrap();
    y
}

pub fn rel_l2(a: &[f32], b: &[f32]) -> f64 {
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (x, y) in a.iter().zip(b) {
        if x.is_nan() {
            return f64::INFINITY;
        }
        num += ((x - y) as f64).powi(2);
        den += (*y as f64).powi(2);
    }
    (num / den.max(1e-30)).sqrt()
}
