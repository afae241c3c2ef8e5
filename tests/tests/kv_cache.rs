//! The KV cache: prefill, chunked prefill and decode against the scalar reference over the
//! whole sequence; layouts, rolling windows, batching and thread counts bitwise; invalid use
//! rejected with nothing written.

use attnrt::{
    cached_workspace_len, kv_pool_len, reference_workspace_len, rope, Config, Inputs, KvCache,
    KvPool, Layer, QkNorm, Rope, RopeConvention, RopeTable, ScopedThreads, Sequence, Sequential,
};
use attnrt::{Error, ParallelFor};
use attnrt_tests::{max_abs_diff, OwnedWeights, Rng, F32_TOL};
use half::{bf16, f16};

const MAX_POS: usize = 700;

fn configs() -> Vec<Config> {
    let base = Config::new(64, 8).with_kv_heads(2).with_head_dim(16);
    vec![
        base.with_rope(Rope::DEFAULT),
        base.with_rope(Rope {
            convention: RopeConvention::HalfSplit,
            ..Rope::DEFAULT
        })
        .with_sliding_window(37),
        base.with_kv_heads(1)
            .with_qk_norm(QkNorm::PerHead)
            .with_rope(Rope::DEFAULT)
            .with_sliding_window(300),
        base.with_kv_heads(8)
            .with_qk_norm(QkNorm::Full)
            .with_rope(Rope::DEFAULT),
        Config::new(48, 4)
            .with_kv_heads(2)
            .with_head_dim(18)
            .with_sliding_window(5),
    ]
}

struct Setup {
    cfg: Config,
    w: OwnedWeights,
    table: Vec<f32>,
}

impl Setup {
    fn new(cfg: Config, seed: u64) -> Setup {
        let w = OwnedWeights::random(&cfg, &mut Rng(seed));
        let mut table = vec![0.0; rope::table_len(MAX_POS, cfg.head_dim)];
        if let Some(r) = cfg.rope() {
            rope::build_table(r, cfg.head_dim, &mut table).unwrap();
        }
        Setup { cfg, w, table }
    }

    fn layer(&self) -> Layer<'_> {
        Layer::new(self.cfg, self.w.view(&self.cfg)).unwrap()
    }

    fn table(&self) -> Option<RopeTable<'_>> {
        self.cfg
            .rope()
            .map(|_| RopeTable::new(&self.table, self.cfg.head_dim).unwrap())
    }

    /// The reference over the whole sequence `x` (`[t, C]`).
    fn reference(&self, x: &[f32]) -> Vec<f32> {
        let t = x.len() / self.cfg.n_embd;
        let inputs = Inputs {
            rope_table: self.table(),
            ..Inputs::new(x, 1, t)
        };
        let mut ws = vec![0.0; reference_workspace_len(&self.cfg, t)];
        let mut y = vec![0.0; x.len()];
        self.layer()
            .forward_reference(&inputs, &mut ws, &mut y)
            .unwrap();
        y
    }
}

/// A cache of `E` elements and one sequence's block table, and the calls to feed it.
struct Cache<E> {
    k: Vec<E>,
    v: Vec<E>,
    block_size: usize,
    num_blocks: usize,
    rolling: bool,
}

trait Store: Sized + Copy + Default {
    fn pool<'a>(k: &'a mut [Self], v: &'a mut [Self]) -> KvPool<'a>;
}
impl Store for f32 {
    fn pool<'a>(k: &'a mut [f32], v: &'a mut [f32]) -> KvPool<'a> {
        KvPool::F32 { k, v }
    }
}
impl Store for f16 {
    fn pool<'a>(k: &'a mut [f16], v: &'a mut [f16]) -> KvPool<'a> {
        KvPool::F16 { k, v }
    }
}
impl Store for bf16 {
    fn pool<'a>(k: &'a mut [bf16], v: &'a mut [bf16]) -> KvPool<'a> {
        KvPool::Bf16 { k, v }
    }
}

impl<E: Store> Cache<E> {
    fn new(cfg: &Config, block_size: usize, num_blocks: usize, rolling: bool) -> Cache<E> {
        let n = kv_pool_len(cfg.n_kv_head, cfg.head_dim, block_size, num_blocks);
        Cache {
            k: vec![E::default(); n],
            v: vec![E::default(); n],
            block_size,
            num_blocks,
            rolling,
        }
    }

    /// Runs one call over `seqs` (each with its block table) on `x`.
    fn step(
        &mut self,
        s: &Setup,
        x: &[f32],
        seqs: &[Sequence<'_>],
        par: &dyn ParallelFor,
    ) -> Result<Vec<f32>, Error> {
        let layer = s.layer();
        let mut cache = KvCache::new(
            E::pool(&mut self.k, &mut self.v),
            s.cfg.n_kv_head,
            s.cfg.head_dim,
            self.block_size,
            self.num_blocks,
            self.rolling,
        )?;
        let mut ws = vec![0.0; cached_workspace_len(&s.cfg, seqs, par.width(), self.num_blocks)];
        let mut y = vec![f32::NAN; x.len()];
        layer.forward_cached(x, seqs, s.table(), &mut cache, &mut ws, &mut y, par)?;
        Ok(y)
    }
}

/// Where a sequence's keys live: blocks of `block_size` tokens, its block table, the pool size.
struct Layout<'a> {
    block_size: usize,
    blocks: &'a [u32],
    num_blocks: usize,
    rolling: bool,
}

/// Feeds `x` to a fresh cache in the given chunk sizes; returns all outputs in order.
fn feed<E: Store>(
    s: &Setup,
    x: &[f32],
    chunks: &[usize],
    at: Layout<'_>,
    par: &dyn ParallelFor,
) -> Vec<f32> {
    let c = s.cfg.n_embd;
    let mut cache = Cache::<E>::new(&s.cfg, at.block_size, at.num_blocks, at.rolling);
    let (mut done, mut out) = (0, vec![]);
    for &n in chunks {
        let seq = Sequence {
            cached: done,
            new_tokens: n,
            blocks: at.blocks,
        };
        out.extend(
            cache
                .step(s, &x[done * c..(done + n) * c], &[seq], par)
                .unwrap(),
        );
        done += n;
    }
    out
}

/// Blocks `blocks` of size `block_size` in a pool of `num_blocks`, not rolling.
fn paged(block_size: usize, blocks: &[u32], num_blocks: usize) -> Layout<'_> {
    Layout {
        block_size,
        blocks,
        num_blocks,
        rolling: false,
    }
}

fn shuffled_blocks(n: usize, seed: u64) -> Vec<u32> {
    let mut ids: Vec<u32> = (0..n as u32).collect();
    let mut rng = Rng(seed);
    for i in (1..n).rev() {
        let j = ((rng.uniform() + 1.0) * 0.5 * (i + 1) as f32) as usize % (i + 1);
        ids.swap(i, j);
    }
    ids
}

#[test]
fn prefill_chunked_prefill_and_decode_match_the_reference() {
    for (n, cfg) in configs().into_iter().enumerate() {
        let s = Setup::new(cfg, 40 + n as u64);
        let t = 300;
        let x = Rng(7 + n as u64).vec(t * cfg.n_embd, 1.0);
        let want = s.reference(&x);
        let blocks = shuffled_blocks(40, n as u64);
        let schedules: [&[usize]; 3] = [&[300], &[297, 1, 1, 1], &[5, 17, 64, 1, 200, 13]];
        for chunks in schedules {
            let got = feed::<f32>(&s, &x, chunks, paged(16, &blocks[..19], 40), &Sequential);
            let err = max_abs_diff(&got, &want);
            assert!(err <= F32_TOL, "config {n} chunks {chunks:?}: {err}");
        }
    }
}

#[test]
fn layouts_rolling_and_threads_are_bitwise_equal() {
    for (n, cfg) in configs().into_iter().enumerate() {
        let s = Setup::new(cfg, 50 + n as u64);
        let t = 600;
        let x = Rng(9 + n as u64).vec(t * cfg.n_embd, 1.0);
        let chunks = [100, 1, 1, 250, 1, 247];
        let contiguous = feed::<f32>(&s, &x, &chunks, paged(640, &[0], 1), &Sequential);
        let ids = shuffled_blocks(64, 3);
        let paged = feed::<f32>(
            &s,
            &x,
            &chunks,
            paged(16, &ids[..40], 64),
            &ScopedThreads { threads: 3 },
        );
        assert!(
            contiguous
                .iter()
                .zip(&paged)
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "config {n}: paged differs"
        );
        if let Some(w) = cfg.sliding_window {
            // Just enough slots for the window plus the largest chunk, in blocks of 8.
            let slots = (w + 250 - 1).div_ceil(8);
            let ids = shuffled_blocks(slots, 5);
            let layout = Layout {
                block_size: 8,
                blocks: &ids,
                num_blocks: slots,
                rolling: true,
            };
            let rolling = feed::<f32>(&s, &x, &chunks, layout, &ScopedThreads { threads: 2 });
            assert!(
                contiguous
                    .iter()
                    .zip(&rolling)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "config {n}: rolling differs"
            );
        }
    }
}

#[test]
fn a_batch_of_sequences_equals_each_alone() {
    let s = Setup::new(configs()[2], 60);
    let c = s.cfg.n_embd;
    let lens = [1usize, 40, 17, 300];
    let xs: Vec<Vec<f32>> = lens
        .iter()
        .enumerate()
        .map(|(i, &l)| Rng(70 + i as u64).vec(l * c, 1.0))
        .collect();
    // Prefill each alone into disjoint blocks of one pool, then decode all at once.
    let mut cache = Cache::<f32>::new(&s.cfg, 16, 128, false);
    let tables: Vec<Vec<u32>> = (0..lens.len())
        .map(|i| (i as u32 * 32..i as u32 * 32 + 32).collect())
        .collect();
    for (i, x) in xs.iter().enumerate() {
        let seq = Sequence {
            cached: 0,
            new_tokens: lens[i],
            blocks: &tables[i],
        };
        cache.step(&s, x, &[seq], &Sequential).unwrap();
    }
    let next: Vec<f32> = Rng(80).vec(lens.len() * c, 1.0);
    let seqs: Vec<Sequence<'_>> = lens
        .iter()
        .zip(&tables)
        .map(|(&l, b)| Sequence {
            cached: l,
            new_tokens: 1,
            blocks: b,
        })
        .collect();
    let mut batch_cache = Cache::<f32> {
        k: cache.k.clone(),
        v: cache.v.clone(),
        ..cache
    };
    let batched = batch_cache
        .step(&s, &next, &seqs, &ScopedThreads { threads: 2 })
        .unwrap();
    for (i, seq) in seqs.iter().enumerate() {
        let mut alone = Cache::<f32> {
            k: cache.k.clone(),
            v: cache.v.clone(),
            block_size: 16,
            num_blocks: 128,
            rolling: false,
        };
        let y = alone
            .step(&s, &next[i * c..(i + 1) * c], &[*seq], &Sequential)
            .unwrap();
        assert!(
            y.iter()
                .zip(&batched[i * c..(i + 1) * c])
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "sequence {i}"
        );
    }
}

#[test]
fn reduced_precision_caches_stay_close() {
    let s = Setup::new(configs()[0], 90);
    let t = 200;
    let x = Rng(91).vec(t * s.cfg.n_embd, 1.0);
    let chunks = [150, 1, 1, 48];
    let blocks: Vec<u32> = (0..13).collect();
    let exact = feed::<f32>(&s, &x, &chunks, paged(16, &blocks, 13), &Sequential);
    // K/V rounded to 11 (f16) or 8 (bf16) significant bits: relative errors of 2^-11 and 2^-8
    // per element, which the layer (unit-scale outputs) carries to at most a few times that.
    let f16s = feed::<f16>(&s, &x, &chunks, paged(16, &blocks, 13), &Sequential);
    let bf16s = feed::<bf16>(&s, &x, &chunks, paged(16, &blocks, 13), &Sequential);
    let (e16, eb16) = (max_abs_diff(&f16s, &exact), max_abs_diff(&bf16s, &exact));
    println!("f16 cache max abs err {e16:.2e}, bf16 {eb16:.2e}");
    assert!(e16 <= 4.0 * 2f32.powi(-11), "f16: {e16}");
    assert!(eb16 <= 4.0 * 2f32.powi(-8), "bf16: {eb16}");
}

#[test]
fn invalid_use_writes_nothing() {
    let cfg = configs()[1];
    let s = Setup::new(cfg, 99);
    let c = cfg.n_embd;
    let x = Rng(100).vec(20 * c, 1.0);
    let mut cache = Cache::<f32>::new(&cfg, 4, 8, false);
    let blocks: [u32; 5] = [0, 1, 2, 3, 4];
    cache
        .step(
            &s,
            &x[..10 * c],
            &[Sequence {
                cached: 0,
                new_tokens: 10,
                blocks: &blocks[..3],
            }],
            &Sequential,
        )
        .unwrap();
    let before = (cache.k.clone(), cache.v.clone());
    let seq = |cached, new_tokens, blocks| Sequence {
        cached,
        new_tokens,
        blocks,
    };
    let cases: Vec<(Vec<Sequence<'_>>, usize, &str)> = vec![
        (vec![seq(10, 3, &blocks[..3])], 3, "kv cache full"),
        (vec![seq(10, 1, &[0, 1, 9])], 1, "block table entry"),
        (vec![seq(10, 1, &[0, 1, 1])], 1, "block table entry"),
        (
            vec![seq(10, 1, &blocks[..3]), seq(0, 1, &blocks[2..4])],
            2,
            "block table entry",
        ),
    ];
    for (seqs, n, what) in cases {
        let layer = s.layer();
        let mut kv = KvCache::new(
            KvPool::F32 {
                k: &mut cache.k,
                v: &mut cache.v,
            },
            cfg.n_kv_head,
            cfg.head_dim,
            4,
            8,
            false,
        )
        .unwrap();
        let mut ws = vec![0.0; cached_workspace_len(&cfg, &seqs, 1, 8)];
        let mut y = vec![7.0f32; n * c];
        let err = layer
            .forward_cached(
                &x[..n * c],
                &seqs,
                s.table(),
                &mut kv,
                &mut ws,
                &mut y,
                &Sequential,
            )
            .unwrap_err();
        let named = match err {
            Error::InputValue { name, .. } => name,
            Error::PositionOutOfTable { .. } => "freqs_cis",
            other => panic!("{what}: {other:?}"),
        };
        assert!(named.starts_with(what), "{what}: got {named} ({err})");
        assert!(y.iter().all(|&v| v == 7.0), "{what}: output written");
        assert!(
            cache.k == before.0 && cache.v == before.1,
            "{what}: cache written"
        );
    }
    // A position past the rope table, in a rolling cache that has room for it.
    let mut k = vec![0.0f32; kv_pool_len(2, 16, 4, 16)];
    let mut v = k.clone();
    let all: Vec<u32> = (0..16).collect();
    let mut kv = KvCache::new(
        KvPool::F32 {
            k: &mut k,
            v: &mut v,
        },
        2,
        16,
        4,
        16,
        true,
    )
    .unwrap();
    let seqs = [seq(MAX_POS, 1, &all[..])];
    let mut ws = vec![0.0; cached_workspace_len(&cfg, &seqs, 1, 16)];
    let mut y = vec![7.0f32; c];
    let err = s
        .layer()
        .forward_cached(
            &x[..c],
            &seqs,
            s.table(),
            &mut kv,
            &mut ws,
            &mut y,
            &Sequential,
        )
        .unwrap_err();
    assert!(
        matches!(err, Error::PositionOutOfTable { position, .. } if position == MAX_POS as i64),
        "{err}"
    );
    assert!(y.iter().all(|&v| v == 7.0) && k.iter().all(|&v| v == 0.0));

    // A huge token count with a short x is a length error, found before any work per token.
    let mut kv = KvCache::new(
        KvPool::F32 {
            k: &mut cache.k,
            v: &mut cache.v,
        },
        cfg.n_kv_head,
        cfg.head_dim,
        4,
        8,
        false,
    )
    .unwrap();
    let huge = [
        seq(0, usize::MAX / 2, &blocks[..1]),
        seq(0, usize::MAX / 2, &blocks[1..2]),
    ];
    let mut y = vec![7.0f32; c];
    let err = s
        .layer()
        .forward_cached(
            &x[..c],
            &huge,
            s.table(),
            &mut kv,
            &mut [],
            &mut y,
            &Sequential,
        )
        .unwrap_err();
    assert!(matches!(err, Error::InputShape { name: "x", .. }), "{err}");

    // A rolling cache needs a windowed layer.
    let plain = Setup::new(configs()[0], 1);
    let mut k = vec![0.0f32; kv_pool_len(2, 16, 4, 8)];
    let mut v = k.clone();
    let mut kv = KvCache::new(
        KvPool::F32 {
            k: &mut k,
            v: &mut v,
        },
        2,
        16,
        4,
        8,
        true,
    )
    .unwrap();
    let seqs = [seq(0, 1, &blocks[..1])];
    let mut ws = vec![0.0; cached_workspace_len(&plain.cfg, &seqs, 1, 8)];
    let mut y = vec![0.0; c];
    assert!(matches!(
        plain.layer().forward_cached(
            &x[..c],
            &seqs,
            plain.table(),
            &mut kv,
            &mut ws,
            &mut y,
            &Sequential
        ),
        Err(Error::Unsupported { .. })
    ));
}

/// The block check with marks kept across calls (`validate_cached_marked`, what the GPU
/// executors call step after step) rejects exactly the calls a fresh check
/// (`validate_cached`) rejects, with the same errors: blocks named again by a later call are
/// fine, a block named twice in one call or outside the pool is not, also when the pool
/// shrinks and grows between calls and when the stamp wraps around.
#[test]
fn marks_kept_across_calls_check_blocks_like_fresh_ones() {
    let cfg = configs()[1];
    let s = Setup::new(cfg, 7);
    let layer = s.layer();
    let table = s.table();
    let c = cfg.n_embd;
    let geometry = |num_blocks| attnrt::KvGeometry {
        n_kv_head: cfg.n_kv_head,
        head_dim: cfg.head_dim,
        block_size: 4,
        num_blocks,
        rolling: false,
    };
    let seq = |cached, blocks| Sequence {
        cached,
        new_tokens: 1,
        blocks,
    };
    let (a, b, dup, far): (&[u32], &[u32], &[u32], &[u32]) =
        (&[0, 1, 2], &[3, 4, 5], &[6, 7, 6], &[8, 9, 30]);
    // (sequences, pool blocks): the same blocks call after call, a duplicate within one
    // sequence and across two, an id past a shrunk pool, then the pool grown back.
    // Each with the rule it breaks, if any.
    let (twice, outside) = ("block used twice in one call", "block id outside the pool");
    let calls: Vec<(Vec<Sequence<'_>>, usize, Option<&str>)> = vec![
        (vec![seq(8, a), seq(4, b)], 32, None),
        (vec![seq(8, a), seq(4, b)], 32, None),
        (vec![seq(8, dup)], 32, Some(twice)),
        (vec![seq(8, a), seq(9, a)], 32, Some(twice)),
        (vec![seq(8, b), seq(8, a)], 32, None),
        (vec![seq(8, far)], 16, Some(outside)),
        (vec![seq(8, far), seq(4, a)], 32, None),
        (vec![seq(8, a), seq(4, b)], 16, None),
    ];
    let starts = [
        (0u32, 0u32),
        (u32::MAX - 2, u32::MAX - 2),
        (u32::MAX, u32::MAX),
    ];
    for (fill, start) in starts {
        let mut marks = vec![fill; 32];
        let mut stamp = start;
        for (i, (seqs, num_blocks, broken)) in calls.iter().enumerate() {
            let g = geometry(*num_blocks);
            let (x, out) = (seqs.len() * c, seqs.len() * c);
            let mut fresh = vec![0u32; *num_blocks];
            let want = layer.validate_cached(x, out, seqs, table.as_ref(), &g, &mut fresh);
            let got = layer.validate_cached_marked(
                x,
                out,
                seqs,
                table.as_ref(),
                &g,
                &mut marks,
                &mut stamp,
            );
            assert_eq!(got, want, "start {start}, call {i}");
            match (got, broken) {
                (Ok(tokens), None) => assert_eq!(tokens, seqs.len()),
                (Err(Error::InputValue { rule, .. }), Some(b)) => assert_eq!(rule, *b),
                (other, b) => panic!("start {start}, call {i}: {other:?}, expected {b:?}"),
            }
            assert!(
                marks.iter().all(|&m| m <= stamp),
                "start {start}, call {i}: a mark past the stamp {stamp}"
            );
        }
        // Every call took a stamp; from the top of the range they wrapped past zero.
        assert_eq!(
            stamp,
            start.wrapping_add(calls.len() as u32) + u32::from(start > 0)
        );
    }
    // Marks shorter than the pool are refused like fresh ones.
    let seqs = [seq(8, a)];
    let g = geometry(32);
    let mut short = vec![0u32; 31];
    let want = layer.validate_cached(c, c, &seqs, table.as_ref(), &g, &mut short.clone());
    let got = layer.validate_cached_marked(c, c, &seqs, table.as_ref(), &g, &mut short, &mut 0);
    assert!(
        matches!(
            got,
            Err(Error::InputShape {
                name: "block marks",
                ..
            })
        ),
        "{got:?}"
    );
    assert_eq!(got, want);
}
