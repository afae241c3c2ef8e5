//! The KV cache through the C ABI only: prefill then decode equals `attnrt_forward` over all
//! tokens; every invalid use returns its status and leaves the output AND the cache unchanged;
//! many threads with their own caches share one layer handle.

use std::ptr;

use attnrt::{Config, QkNorm, Rope, RopeConvention};
use attnrt_ffi::*;
use attnrt_tests::ffi_harness::{c_seqs, last_error, plan_step, RandomLayer, Seq, SENTINEL};
use attnrt_tests::{max_abs_diff, Rng, F32_TOL};

use attnrt_status as S;

const F32: u32 = attnrt_dtype::ATTNRT_DTYPE_F32 as u32;
const SIMD: u32 = attnrt_backend::ATTNRT_BACKEND_CPU_SIMD as u32;

fn configs() -> Vec<Config> {
    let base = Config::new(32, 4).with_kv_heads(2).with_head_dim(8);
    vec![
        base.with_rope(Rope::DEFAULT)
            .with_qk_norm(QkNorm::PerHead)
            .with_bias(attnrt::BiasFlags {
                q: true,
                k: true,
                v: true,
                o: true,
            }),
        base.with_rope(Rope {
            convention: RopeConvention::HalfSplit,
            ..Rope::DEFAULT
        })
        .with_sliding_window(5),
        base.with_kv_heads(1).with_qk_norm(QkNorm::Full),
    ]
}

/// `attnrt_forward` over one row of `t` tokens (AUTO, one thread).
fn full_forward(m: &RandomLayer, x: &[f32], t: usize) -> Vec<f32> {
    let mut ws = vec![0.0; m.layer.workspace_size(1, t, 1)];
    let mut out = vec![SENTINEL; x.len()];
    let mut a = std::mem::MaybeUninit::uninit();
    // SAFETY: valid for one write.
    assert_eq!(
        unsafe { attnrt_forward_args_init(a.as_mut_ptr()) },
        S::ATTNRT_STATUS_OK
    );
    // SAFETY: written by the successful call.
    let mut a: attnrt_forward_args = unsafe { a.assume_init() };
    (a.x, a.x_len, a.batch, a.seq_len) = (x.as_ptr(), x.len(), 1, t);
    (a.workspace, a.workspace_len) = (ws.as_mut_ptr(), ws.len());
    (a.out, a.out_len) = (out.as_mut_ptr(), out.len());
    let mut ran = attnrt_backend::ATTNRT_BACKEND_AUTO;
    // SAFETY: live handle, buffers valid for their lengths.
    let st = unsafe { attnrt_forward(m.layer.0, &a, &mut ran) };
    assert_eq!(st, S::ATTNRT_STATUS_OK, "{}", last_error());
    out
}

/// An owned cache handle, freed on drop.
struct Cache(*mut attnrt_kv_cache);

// SAFETY: calls on one cache are serialized by its lock; the tests use each from one thread.
unsafe impl Send for Cache {}

impl Cache {
    fn try_new(
        m: &RandomLayer,
        dtype: u32,
        block_size: usize,
        num_blocks: usize,
        rolling: bool,
    ) -> Result<Cache, attnrt_status> {
        let mut out: *mut attnrt_kv_cache = ptr::null_mut();
        // SAFETY: live layer, valid out pointer.
        let st = unsafe {
            attnrt_kv_cache_new(
                m.layer.0,
                dtype,
                block_size,
                num_blocks,
                rolling as u8,
                &mut out,
            )
        };
        if st == S::ATTNRT_STATUS_OK {
            Ok(Cache(out))
        } else {
            assert!(out.is_null(), "out written on error");
            Err(st)
        }
    }

    fn new(
        m: &RandomLayer,
        dtype: u32,
        block_size: usize,
        num_blocks: usize,
        rolling: bool,
    ) -> Cache {
        Cache::try_new(m, dtype, block_size, num_blocks, rolling)
            .unwrap_or_else(|s| panic!("{s:?}: {}", last_error()))
    }

    /// Both pools as f32, through `attnrt_kv_cache_read_f32`.
    fn snapshot(&self, m: &RandomLayer, block_size: usize, num_blocks: usize) -> Vec<u32> {
        let mut n = 0;
        // SAFETY: valid out pointer.
        let st = unsafe {
            attnrt_kv_cache_size(
                m.cfg.n_kv_head,
                m.cfg.head_dim,
                block_size,
                num_blocks,
                F32,
                &mut n,
            )
        };
        assert_eq!(st, S::ATTNRT_STATUS_OK);
        let (mut k, mut v) = (vec![f32::NAN; n], vec![f32::NAN; n]);
        // SAFETY: live handle, buffers of n elements.
        let st = unsafe { attnrt_kv_cache_read_f32(self.0, k.as_mut_ptr(), v.as_mut_ptr(), n) };
        assert_eq!(st, S::ATTNRT_STATUS_OK, "{}", last_error());
        k.iter().chain(&v).map(|x| x.to_bits()).collect()
    }
}

impl Drop for Cache {
    fn drop(&mut self) {
        // SAFETY: a live handle, freed once.
        unsafe { attnrt_kv_cache_free(self.0) };
    }
}

type Edit = Box<dyn Fn(&mut attnrt_cached_args)>;
/// An invalid call: what, layer, x, sequences, caller table, argument edit, expected status.
type Case<'a> = (
    &'a str,
    &'a RandomLayer,
    &'a [f32],
    Vec<Seq>,
    Option<&'a [f32]>,
    Edit,
    attnrt_status,
);

/// The result of one cached call: status, backend written (`u32::MAX` if not), output.
struct Ran {
    st: attnrt_status,
    ran: u32,
    out: Vec<f32>,
}

/// `attnrt_forward_cached` on `seqs` with `x`, a workspace of `attnrt_cached_workspace_size`
/// and `edit` applied to the arguments last.
fn cached(
    m: &RandomLayer,
    cache: &Cache,
    x: &[f32],
    seqs: &[Seq],
    freqs: Option<&[f32]>,
    threads: usize,
    edit: impl FnOnce(&mut attnrt_cached_args),
) -> Ran {
    let cs = c_seqs(seqs);
    let mut n = 0;
    // SAFETY: live handles; seqs and their blocks valid for their lengths.
    let st = unsafe {
        attnrt_cached_workspace_size(m.layer.0, cache.0, cs.as_ptr(), cs.len(), threads, &mut n)
    };
    if st != S::ATTNRT_STATUS_OK {
        n = 1 << 16;
    }
    let mut ws = vec![0.0f32; n.max(1)];
    let tokens: usize = seqs.iter().map(|s| s.new).sum();
    let mut out = vec![SENTINEL; tokens * m.cfg.n_embd];
    let mut a = std::mem::MaybeUninit::uninit();
    // SAFETY: valid for one write.
    assert_eq!(
        unsafe { attnrt_cached_args_init(a.as_mut_ptr()) },
        S::ATTNRT_STATUS_OK
    );
    // SAFETY: written by the successful call.
    let mut a: attnrt_cached_args = unsafe { a.assume_init() };
    (a.x, a.x_len) = (x.as_ptr(), x.len());
    (a.seqs, a.n_seqs) = (cs.as_ptr(), cs.len());
    if let Some(f) = freqs {
        (a.freqs_cis, a.freqs_cis_len) = (f.as_ptr(), f.len());
    }
    (a.workspace, a.workspace_len) = (ws.as_mut_ptr(), ws.len());
    (a.out, a.out_len) = (out.as_mut_ptr(), out.len());
    a.num_threads = threads;
    edit(&mut a);
    let mut ran = std::mem::MaybeUninit::<u32>::new(u32::MAX);
    // SAFETY: live handles; buffers valid for their lengths (or deliberately wrong lengths that
    // the call rejects before touching memory); a u32 slot holds an `attnrt_backend`.
    let st = unsafe {
        attnrt_forward_cached(
            m.layer.0,
            cache.0,
            &a,
            ran.as_mut_ptr().cast::<attnrt_backend>(),
        )
    };
    // SAFETY: initialised above.
    let ran = unsafe { ran.assume_init() };
    Ran { st, ran, out }
}

/// Two sequences (11 and 7 tokens): a batched prefill of 6 and 3 tokens, then decode steps of
/// one token per unfinished sequence. Returns each sequence's outputs, `[T, C]`.
fn generate(
    m: &RandomLayer,
    dtype: u32,
    rolling: bool,
    threads: usize,
    freqs: Option<&[f32]>,
) -> [Vec<f32>; 2] {
    let c = m.cfg.n_embd;
    let lens = [11, 7];
    let prefill = [6, 3];
    let tables = [vec![5u32, 2, 9], vec![0u32, 7]];
    let xs = [Rng(7).vec(lens[0] * c, 1.0), Rng(8).vec(lens[1] * c, 1.0)];
    let cache = Cache::new(m, dtype, 4, 12, rolling);
    let mut outs = [vec![0.0; lens[0] * c], vec![0.0; lens[1] * c]];
    let mut done = [0usize; 2];
    let mut step = prefill;
    while done != lens {
        let (seqs, x) = plan_step(&tables, &xs, &done, &step, c);
        let r = cached(m, &cache, &x, &seqs, freqs, threads, |_| {});
        assert_eq!(r.st, S::ATTNRT_STATUS_OK, "{}", last_error());
        assert_eq!(r.ran, SIMD);
        let mut at = 0;
        for s in 0..2 {
            let n = step[s] * c;
            outs[s][done[s] * c..done[s] * c + n].copy_from_slice(&r.out[at..at + n]);
            at += n;
            done[s] += step[s];
            step[s] = usize::from(done[s] < lens[s]);
        }
    }
    let want = [
        full_forward(m, &xs[0], lens[0]),
        full_forward(m, &xs[1], lens[1]),
    ];
    if dtype == F32 {
        for s in 0..2 {
            let err = max_abs_diff(&outs[s], &want[s]);
            assert!(err <= F32_TOL, "sequence {s}: {err}");
        }
    } else {
        for s in 0..2 {
            let err = max_abs_diff(&outs[s], &want[s]);
            assert!(err <= 0.1, "16-bit cache, sequence {s}: {err}");
        }
    }
    outs
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

#[test]
fn prefill_then_decode_equals_forward_over_all_tokens() {
    for (i, cfg) in configs().into_iter().enumerate() {
        let m = RandomLayer::new(cfg, 40 + i as u64);
        let one = generate(&m, F32, false, 1, None);
        let three = generate(&m, F32, false, 3, None);
        for s in 0..2 {
            assert_eq!(bits(&one[s]), bits(&three[s]), "config {i}: thread count");
        }
        if cfg.sliding_window.is_some() {
            let rolled = generate(&m, F32, true, 2, None);
            for s in 0..2 {
                assert_eq!(bits(&one[s]), bits(&rolled[s]), "config {i}: rolling");
            }
        }
        if cfg.rope().is_some() {
            let mut table = vec![0.0f32; 16 * cfg.head_dim];
            // SAFETY: live handle, table of 16 rows.
            let st = unsafe { attnrt_rope_table(m.layer.0, 16, table.as_mut_ptr(), table.len()) };
            assert_eq!(st, S::ATTNRT_STATUS_OK, "{}", last_error());
            let with_table = generate(&m, F32, false, 1, Some(&table));
            for s in 0..2 {
                assert_eq!(bits(&one[s]), bits(&with_table[s]), "config {i}: table");
            }
        }
        for dtype in [
            attnrt_dtype::ATTNRT_DTYPE_F16,
            attnrt_dtype::ATTNRT_DTYPE_BF16,
        ] {
            generate(&m, dtype as u32, false, 2, None);
        }
    }
}

#[test]
fn every_invalid_use_returns_its_status_and_writes_nothing() {
    let m = RandomLayer::new(configs()[0], 3);
    let c = m.cfg.n_embd;
    let (bs, nb) = (4, 16);
    let cache = Cache::new(&m, F32, bs, nb, false);
    // A sequence with 6 tokens in the cache, so that "unchanged" means something.
    let x6 = Rng(1).vec(6 * c, 1.0);
    let a = Seq {
        cached: 0,
        new: 6,
        blocks: vec![5, 2],
    };
    let r = cached(&m, &cache, &x6, &[a], None, 1, |_| {});
    assert_eq!(r.st, S::ATTNRT_STATUS_OK, "{}", last_error());
    let before = cache.snapshot(&m, bs, nb);
    let x1 = Rng(2).vec(c, 1.0);
    let x3 = Rng(3).vec(3 * c, 1.0);
    let seq = |cached, new, blocks: &[u32]| Seq {
        cached,
        new,
        blocks: blocks.to_vec(),
    };
    let other = RandomLayer::new(Config::new(32, 4).with_kv_heads(1).with_head_dim(8), 4);
    let short_table = vec![0.0f32; 8 * m.cfg.head_dim];

    let none: fn() -> Edit = || Box::new(|_| {});
    let cases: Vec<Case<'_>> = vec![
        (
            "cache full",
            &m,
            &x3,
            vec![seq(6, 3, &[5, 2])],
            None,
            none(),
            S::ATTNRT_STATUS_KV_CACHE_FULL,
        ),
        (
            "block outside the pool",
            &m,
            &x3,
            vec![seq(6, 3, &[5, 2, 16])],
            None,
            none(),
            S::ATTNRT_STATUS_KV_BLOCK,
        ),
        (
            "block twice in a sequence",
            &m,
            &x3,
            vec![seq(6, 3, &[5, 2, 2])],
            None,
            none(),
            S::ATTNRT_STATUS_KV_BLOCK,
        ),
        (
            "block twice across sequences",
            &m,
            &x3,
            vec![seq(6, 2, &[5, 2, 9]), seq(0, 1, &[9])],
            None,
            none(),
            S::ATTNRT_STATUS_KV_BLOCK,
        ),
        (
            "position overflow",
            &m,
            &x1,
            vec![seq(i32::MAX as usize, 1, &[5, 2, 9])],
            None,
            none(),
            S::ATTNRT_STATUS_INPUT_VALUE,
        ),
        (
            "cached + new overflows size_t",
            &m,
            &x1,
            vec![seq(usize::MAX, 1, &[5, 2, 9])],
            None,
            none(),
            S::ATTNRT_STATUS_INPUT_VALUE,
        ),
        (
            "position past the caller's table",
            &m,
            &x3,
            vec![seq(6, 3, &[5, 2, 9])],
            Some(&short_table),
            none(),
            S::ATTNRT_STATUS_POSITION_OUT_OF_TABLE,
        ),
        (
            "heads mismatch",
            &other,
            &x1,
            vec![seq(6, 1, &[5, 2])],
            None,
            none(),
            S::ATTNRT_STATUS_INPUT_SHAPE,
        ),
        (
            "x too short",
            &m,
            &x1,
            vec![seq(6, 2, &[5, 2])],
            None,
            none(),
            S::ATTNRT_STATUS_INPUT_SHAPE,
        ),
        (
            "workspace too small",
            &m,
            &x1,
            vec![seq(6, 1, &[5, 2])],
            None,
            Box::new(|a| a.workspace_len -= 1),
            S::ATTNRT_STATUS_WORKSPACE_TOO_SMALL,
        ),
        (
            "more threads than the workspace was sized for",
            &m,
            &x1,
            vec![seq(6, 1, &[5, 2])],
            None,
            Box::new(|a| a.num_threads = 8),
            S::ATTNRT_STATUS_WORKSPACE_TOO_SMALL,
        ),
        (
            "reference backend",
            &m,
            &x1,
            vec![seq(6, 1, &[5, 2])],
            None,
            Box::new(|a| a.backend = attnrt_backend::ATTNRT_BACKEND_REFERENCE as u32),
            S::ATTNRT_STATUS_UNSUPPORTED,
        ),
        (
            "cuda backend",
            &m,
            &x1,
            vec![seq(6, 1, &[5, 2])],
            None,
            Box::new(|a| a.backend = attnrt_backend::ATTNRT_BACKEND_CUDA as u32),
            S::ATTNRT_STATUS_BACKEND_UNAVAILABLE,
        ),
        (
            "backend out of range",
            &m,
            &x1,
            vec![seq(6, 1, &[5, 2])],
            None,
            Box::new(|a| a.backend = 9),
            S::ATTNRT_STATUS_BAD_ENUM,
        ),
        (
            "block table NULL with entries",
            &m,
            &x1,
            vec![seq(6, 1, &[5, 2])],
            None,
            Box::new(|a| {
                // SAFETY: `seqs` points at the test's own Vec, alive for the call; a copy with
                // a NULL table replaces it through a leaked box (tiny, test only).
                let s = unsafe { *a.seqs };
                let bad = Box::leak(Box::new(attnrt_sequence {
                    blocks: ptr::null(),
                    ..s
                }));
                a.seqs = bad;
            }),
            S::ATTNRT_STATUS_NULL_POINTER,
        ),
        (
            "seqs NULL with a count",
            &m,
            &x1,
            vec![seq(6, 1, &[5, 2])],
            None,
            Box::new(|a| a.seqs = ptr::null()),
            S::ATTNRT_STATUS_NULL_POINTER,
        ),
        (
            "x NULL",
            &m,
            &x1,
            vec![seq(6, 1, &[5, 2])],
            None,
            Box::new(|a| a.x = ptr::null()),
            S::ATTNRT_STATUS_NULL_POINTER,
        ),
        (
            "out overlaps x",
            &m,
            &x1,
            vec![seq(6, 1, &[5, 2])],
            None,
            Box::new(|a| a.x = a.out),
            S::ATTNRT_STATUS_ALIASED_BUFFERS,
        ),
        (
            "workspace overlaps a block table",
            &m,
            &x1,
            vec![seq(6, 1, &[5, 2])],
            None,
            Box::new(|a| {
                // SAFETY: reads the test's own sequence.
                let s = unsafe { *a.seqs };
                let bad = Box::leak(Box::new(attnrt_sequence {
                    blocks: a.workspace.cast_const().cast(),
                    n_blocks: 2,
                    ..s
                }));
                a.seqs = bad;
            }),
            S::ATTNRT_STATUS_ALIASED_BUFFERS,
        ),
    ];
    for (what, mm, x, seqs, freqs, edit, want) in cases {
        let r = cached(mm, &cache, x, &seqs, freqs, 1, |a| edit(a));
        assert_eq!(r.st, want, "{what}: {}", last_error());
        assert!(!last_error().is_empty(), "{what}: no message");
        assert_eq!(r.ran, u32::MAX, "{what}: backend_ran written");
        assert!(
            r.out.iter().all(|v| v.to_bits() == SENTINEL.to_bits()),
            "{what}: out written"
        );
        assert_eq!(cache.snapshot(&m, bs, nb), before, "{what}: cache written");
    }

    // NULL handles and arguments.
    let mut ran = attnrt_backend::ATTNRT_BACKEND_AUTO;
    // SAFETY: NULL arguments are checked.
    let st = unsafe { attnrt_forward_cached(m.layer.0, ptr::null_mut(), ptr::null(), &mut ran) };
    assert_eq!(st, S::ATTNRT_STATUS_NULL_POINTER);
    // SAFETY: as above.
    let st = unsafe { attnrt_forward_cached(m.layer.0, cache.0, ptr::null(), &mut ran) };
    assert_eq!(st, S::ATTNRT_STATUS_NULL_POINTER);
    assert_eq!(ran, attnrt_backend::ATTNRT_BACKEND_AUTO);

    // Creation and sizing.
    for (dtype, bsz, n, rolling, want) in [
        (3, 4, 4, false, S::ATTNRT_STATUS_BAD_ENUM),
        (F32, 0, 4, false, S::ATTNRT_STATUS_CONFIG),
        (F32, 4, 0, false, S::ATTNRT_STATUS_CONFIG),
        (F32, 4, 4, true, S::ATTNRT_STATUS_UNSUPPORTED),
        (
            F32,
            usize::MAX / 2,
            4,
            false,
            S::ATTNRT_STATUS_LENGTH_OVERFLOW,
        ),
    ] {
        assert_eq!(
            Cache::try_new(&m, dtype, bsz, n, rolling).err(),
            Some(want),
            "new({dtype}, {bsz}, {n}, {rolling})"
        );
    }
    let mut n = 77;
    // SAFETY: valid out pointer.
    let st = unsafe { attnrt_kv_cache_size(2, 8, 4, 4, 7, &mut n) };
    assert_eq!((st, n), (S::ATTNRT_STATUS_BAD_ENUM, 77));
    // SAFETY: as above.
    let st = unsafe { attnrt_kv_cache_size(2, 8, 4, 4, F32, &mut n) };
    assert_eq!((st, n), (S::ATTNRT_STATUS_OK, 2 * 8 * 4 * 4));

    // drop_blocks: an id outside the pool zeroes nothing; a valid list zeroes those blocks.
    let ids = [2u32, 16];
    // SAFETY: live handle, ids valid for 2 reads.
    let st = unsafe { attnrt_kv_cache_drop_blocks(cache.0, ids.as_ptr(), 2) };
    assert_eq!(st, S::ATTNRT_STATUS_KV_BLOCK);
    assert_eq!(cache.snapshot(&m, bs, nb), before);

    // After all of that, decoding continues exactly as on a cache that saw none of it.
    let twin = Cache::new(&m, F32, bs, nb, false);
    let r = cached(&m, &twin, &x6, &[seq(0, 6, &[5, 2])], None, 1, |_| {});
    assert_eq!(r.st, S::ATTNRT_STATUS_OK);
    assert_eq!(twin.snapshot(&m, bs, nb), before);
    let go = |cache: &Cache| cached(&m, cache, &x1, &[seq(6, 1, &[5, 2])], None, 1, |_| {});
    let (r1, r2) = (go(&cache), go(&twin));
    assert_eq!(r1.st, S::ATTNRT_STATUS_OK);
    assert_eq!(bits(&r1.out), bits(&r2.out));

    // drop_blocks and reset zero what they name.
    let block = 4 * m.cfg.kv_dim();
    let ids = [5u32];
    // SAFETY: live handle, ids valid for 1 read.
    let st = unsafe { attnrt_kv_cache_drop_blocks(cache.0, ids.as_ptr(), 1) };
    assert_eq!(st, S::ATTNRT_STATUS_OK);
    let snap = cache.snapshot(&m, bs, nb);
    let half = snap.len() / 2;
    for pool in [&snap[..half], &snap[half..]] {
        assert!(pool[5 * block..6 * block].iter().all(|&b| b == 0));
        assert!(pool[2 * block..3 * block].iter().any(|&b| b != 0));
    }
    // SAFETY: live handle.
    assert_eq!(
        unsafe { attnrt_kv_cache_reset(cache.0) },
        S::ATTNRT_STATUS_OK
    );
    assert!(cache.snapshot(&m, bs, nb).iter().all(|&b| b == 0));
    // SAFETY: NULL is checked.
    assert_eq!(
        unsafe { attnrt_kv_cache_reset(ptr::null_mut()) },
        S::ATTNRT_STATUS_NULL_POINTER
    );
}

#[test]
fn many_threads_with_their_own_caches_share_one_layer() {
    let m = RandomLayer::new(configs()[1], 11);
    let want = generate(&m, F32, true, 1, None);
    std::thread::scope(|s| {
        for t in 0..6 {
            let (m, want) = (&m, &want);
            s.spawn(move || {
                for i in 0..4 {
                    let got = generate(m, F32, i % 2 == 0, 1 + (t + i) % 3, None);
                    for q in 0..2 {
                        assert_eq!(bits(&got[q]), bits(&want[q]), "thread {t} run {i}");
                    }
                }
            });
        }
    });
}
