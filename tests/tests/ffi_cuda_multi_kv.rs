//! The multi-GPU KV cache (`attnrt_cuda_multi_kv_cache_*`, `attnrt_cuda_multi_forward_cached`,
//! `attnrt_cuda_multi_forward_cached_device`) through the C ABI only.
//!
//! * Every build: NULL handles and pointers are refused with `ATTNRT_STATUS_NULL_POINTER`,
//!   nothing written.
//! * With at least 2 GPUs (else each GPU test prints "skipped: ..." and returns): two
//!   sequences through a chunked, batched prefill and decode steps on devices [0, 1] (f32)
//!   equal the scalar reference (`attnrt_forward`, backend REFERENCE, over each whole
//!   sequence) within 1e-4, for GQA with per-head QK-norm and rotary, full QK-norm with KV
//!   heads split unevenly, MQA (the KV head replicated on both devices) and a sliding window
//!   with a rolling cache that wraps; each device's pools equal the CPU cache's pools of its KV
//!   heads (`attnrt_forward_cached` on the same calls) within 1e-4. Every invalid use returns
//!   its status and leaves the output and both devices' caches unchanged.
//! * With the `cuda` feature and 2 GPUs: `attnrt_cuda_multi_forward_cached_device` (rows and
//!   outputs in both devices' memory, f32 and storage-type rows) equals the host entry bit for
//!   bit on every call and on both devices' outputs, and the pools match; a null device
//!   pointer or a wrong part count is refused with the outputs untouched.

use std::ptr;

use attnrt::{BiasFlags, Config, QkNorm, Rope, RopeConvention};
use attnrt_ffi::*;
use attnrt_tests::ffi_harness::{c_seqs, last_error, plan_step, RandomLayer, Seq, SENTINEL};
use attnrt_tests::{max_abs_diff, Rng, F32_TOL};

use attnrt_status as S;

const F32: u32 = attnrt_cuda_precision::ATTNRT_CUDA_PRECISION_F32 as u32;
const CUDA: u32 = attnrt_backend::ATTNRT_BACKEND_CUDA as u32;
const REFERENCE: u32 = attnrt_backend::ATTNRT_BACKEND_REFERENCE as u32;

/// The number of GPUs when there are at least 2, else `None` after printing why not.
fn two_gpus_or_skip() -> Option<usize> {
    let mut n = 0;
    // SAFETY: valid out pointer.
    let st = unsafe { attnrt_cuda_device_count(&mut n) };
    if st != S::ATTNRT_STATUS_OK {
        println!("skipped: no usable CUDA device ({st:?}: {})", last_error());
        return None;
    }
    if n < 2 {
        println!("skipped: the multi-GPU KV cache needs at least 2 CUDA devices; {n} present");
        return None;
    }
    Some(n)
}

struct Multi(*mut attnrt_cuda_multi_layer);

impl Drop for Multi {
    fn drop(&mut self) {
        // SAFETY: a live handle, freed once.
        unsafe { attnrt_cuda_multi_layer_free(self.0) };
    }
}

fn multi(m: &RandomLayer, max_tokens: usize) -> Multi {
    let devices = [0u32, 1];
    let mut out = ptr::null_mut();
    // SAFETY: live layer, device list valid for its length, valid out pointer.
    let st = unsafe {
        attnrt_cuda_multi_layer_new(m.layer.0, F32, 1, max_tokens, devices.as_ptr(), 2, &mut out)
    };
    assert_eq!(st, S::ATTNRT_STATUS_OK, "{}", last_error());
    Multi(out)
}

struct GpuCache(*mut attnrt_cuda_multi_kv_cache);

impl Drop for GpuCache {
    fn drop(&mut self) {
        // SAFETY: a live handle, freed once.
        unsafe { attnrt_cuda_multi_kv_cache_free(self.0) };
    }
}

fn gpu_cache(
    l: &Multi,
    block_size: usize,
    num_blocks: usize,
    rolling: bool,
) -> Result<GpuCache, attnrt_status> {
    let sentinel = 0x77_usize as *mut attnrt_cuda_multi_kv_cache;
    let mut out = sentinel;
    // SAFETY: live layer, valid out pointer.
    let st = unsafe {
        attnrt_cuda_multi_kv_cache_new(l.0, block_size, num_blocks, rolling as u8, &mut out)
    };
    if st == S::ATTNRT_STATUS_OK {
        Ok(GpuCache(out))
    } else {
        assert_eq!(out, sentinel, "out written on error");
        Err(st)
    }
}

/// Device `i`'s pools (K then V) as f32.
fn gpu_pools(c: &GpuCache, i: usize) -> Vec<f32> {
    let mut n = 0;
    // SAFETY: live handle, valid out pointer.
    let st = unsafe { attnrt_cuda_multi_kv_cache_size(c.0, i, &mut n) };
    assert_eq!(st, S::ATTNRT_STATUS_OK, "{}", last_error());
    let (mut k, mut v) = (vec![f32::NAN; n], vec![f32::NAN; n]);
    // SAFETY: live handle, buffers of n elements.
    let st =
        unsafe { attnrt_cuda_multi_kv_cache_read_f32(c.0, i, k.as_mut_ptr(), v.as_mut_ptr(), n) };
    assert_eq!(st, S::ATTNRT_STATUS_OK, "{}", last_error());
    k.extend(v);
    k
}

struct CpuCache(*mut attnrt_kv_cache);

impl Drop for CpuCache {
    fn drop(&mut self) {
        // SAFETY: a live handle, freed once.
        unsafe { attnrt_kv_cache_free(self.0) };
    }
}

fn cached_args(x: &[f32], cs: &[attnrt_sequence], out: &mut [f32]) -> attnrt_cached_args {
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
    (a.out, a.out_len) = (out.as_mut_ptr(), out.len());
    a
}

/// `attnrt_cuda_multi_forward_cached` with `edit` applied to the arguments last: status,
/// backend written (`u32::MAX` if not), output (filled with [`SENTINEL`] before).
fn gpu_step(
    l: &Multi,
    c: &GpuCache,
    x: &[f32],
    seqs: &[Seq],
    n_embd: usize,
    edit: impl FnOnce(&mut attnrt_cached_args),
) -> (attnrt_status, u32, Vec<f32>) {
    let cs = c_seqs(seqs);
    let tokens: usize = seqs.iter().map(|s| s.new).sum();
    let mut out = vec![SENTINEL; tokens * n_embd];
    let mut a = cached_args(x, &cs, &mut out);
    edit(&mut a);
    let mut ran = std::mem::MaybeUninit::<u32>::new(u32::MAX);
    // SAFETY: live handles; buffers valid for their lengths (or deliberately wrong lengths the
    // call rejects first); a u32 slot holds an `attnrt_backend`.
    let st = unsafe {
        attnrt_cuda_multi_forward_cached(l.0, c.0, &a, ran.as_mut_ptr().cast::<attnrt_backend>())
    };
    // SAFETY: initialised above.
    (st, unsafe { ran.assume_init() }, out)
}

/// The same call through the CPU cache (`attnrt_forward_cached`, AUTO).
fn cpu_step(m: &RandomLayer, c: &CpuCache, x: &[f32], seqs: &[Seq]) -> Vec<f32> {
    let cs = c_seqs(seqs);
    let mut n = 0;
    // SAFETY: live handles; seqs and their blocks valid for their lengths.
    let st =
        unsafe { attnrt_cached_workspace_size(m.layer.0, c.0, cs.as_ptr(), cs.len(), 1, &mut n) };
    assert_eq!(st, S::ATTNRT_STATUS_OK, "{}", last_error());
    let mut ws = vec![0.0f32; n.max(1)];
    let tokens: usize = seqs.iter().map(|s| s.new).sum();
    let mut out = vec![SENTINEL; tokens * m.cfg.n_embd];
    let mut a = cached_args(x, &cs, &mut out);
    (a.workspace, a.workspace_len) = (ws.as_mut_ptr(), ws.len());
    let mut ran = attnrt_backend::ATTNRT_BACKEND_AUTO;
    // SAFETY: live handles; buffers valid for their lengths.
    let st = unsafe { attnrt_forward_cached(m.layer.0, c.0, &a, &mut ran) };
    assert_eq!(st, S::ATTNRT_STATUS_OK, "{}", last_error());
    out
}

/// `attnrt_forward` with backend REFERENCE over one row of `t` tokens.
fn reference(m: &RandomLayer, x: &[f32], t: usize) -> Vec<f32> {
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
    a.backend = REFERENCE;
    let mut ran = attnrt_backend::ATTNRT_BACKEND_AUTO;
    // SAFETY: live handle, buffers valid for their lengths.
    let st = unsafe { attnrt_forward(m.layer.0, &a, &mut ran) };
    assert_eq!(st, S::ATTNRT_STATUS_OK, "{}", last_error());
    out
}

/// The CPU cache's pools (K then V) restricted to the KV heads `kv` of each block, in the
/// layout of a device cache holding those heads.
fn cpu_pools_of(
    m: &RandomLayer,
    c: &CpuCache,
    bs: usize,
    nb: usize,
    kv: (usize, usize),
) -> Vec<f32> {
    let (h, d) = (m.cfg.n_kv_head, m.cfg.head_dim);
    let n = h * d * bs * nb;
    let (mut k, mut v) = (vec![f32::NAN; n], vec![f32::NAN; n]);
    // SAFETY: live handle, buffers of n elements.
    let st = unsafe { attnrt_kv_cache_read_f32(c.0, k.as_mut_ptr(), v.as_mut_ptr(), n) };
    assert_eq!(st, S::ATTNRT_STATUS_OK, "{}", last_error());
    let block = |p: &[f32]| -> Vec<f32> {
        let mut sel = Vec::new();
        for b in 0..nb {
            for g in kv.0..kv.1 {
                let at = (b * h + g) * bs * d;
                sel.extend_from_slice(&p[at..at + bs * d]);
            }
        }
        sel
    };
    let mut all = block(&k);
    all.extend(block(&v));
    all
}

fn shard(l: &Multi, i: usize) -> attnrt_device_shard {
    let mut s = std::mem::MaybeUninit::uninit();
    // SAFETY: live handle, valid out pointer.
    let st = unsafe { attnrt_cuda_multi_layer_shard(l.0, i, s.as_mut_ptr()) };
    assert_eq!(st, S::ATTNRT_STATUS_OK);
    // SAFETY: written by the successful call.
    unsafe { s.assume_init() }
}

fn configs() -> Vec<(&'static str, Config)> {
    vec![
        (
            "GQA 8/2, rotary, per-head QK-norm, bias",
            Config::new(64, 8)
                .with_kv_heads(2)
                .with_head_dim(16)
                .with_rope(Rope::DEFAULT)
                .with_qk_norm(QkNorm::PerHead)
                .with_bias(BiasFlags::ALL),
        ),
        (
            "GQA 6/3 (KV heads 2/1 over the devices), full QK-norm, rotary",
            Config::new(48, 6)
                .with_kv_heads(3)
                .with_head_dim(8)
                .with_rope(Rope::DEFAULT)
                .with_qk_norm(QkNorm::Full),
        ),
        (
            "MQA 4/1 (KV head replicated), no rotary",
            Config::new(32, 4).with_kv_heads(1).with_head_dim(8),
        ),
        (
            "GQA 4/2, half-split rotary, window 5 (rolling cache)",
            Config::new(32, 4)
                .with_kv_heads(2)
                .with_head_dim(8)
                .with_rope(Rope {
                    convention: RopeConvention::HalfSplit,
                    ..Rope::DEFAULT
                })
                .with_sliding_window(5),
        ),
    ]
}

#[test]
fn entry_points_refuse_null_in_every_build() {
    let mut cache = 0x77_usize as *mut attnrt_cuda_multi_kv_cache;
    let mut n = usize::MAX;
    let mut k = [f32::NAN; 4];
    let mut v = [f32::NAN; 4];
    let x = [0.0f32; 4];
    let mut out = [SENTINEL; 4];
    let a = cached_args(&x, &[], &mut out);
    let mut ran = std::mem::MaybeUninit::<u32>::new(u32::MAX);
    // SAFETY: NULL handles and pointers are checked before anything is read.
    unsafe {
        assert_eq!(
            attnrt_cuda_multi_kv_cache_new(ptr::null(), 4, 4, 0, &mut cache),
            S::ATTNRT_STATUS_NULL_POINTER
        );
        assert_eq!(
            attnrt_cuda_multi_kv_cache_size(ptr::null(), 0, &mut n),
            S::ATTNRT_STATUS_NULL_POINTER
        );
        assert_eq!(
            attnrt_cuda_multi_kv_cache_read_f32(ptr::null(), 0, k.as_mut_ptr(), v.as_mut_ptr(), 4),
            S::ATTNRT_STATUS_NULL_POINTER
        );
        assert_eq!(
            attnrt_cuda_multi_forward_cached(
                ptr::null(),
                ptr::null_mut(),
                &a,
                ran.as_mut_ptr().cast::<attnrt_backend>()
            ),
            S::ATTNRT_STATUS_NULL_POINTER
        );
        let mut d = std::mem::MaybeUninit::<attnrt_cuda_multi_cached_device_args>::uninit();
        assert_eq!(
            attnrt_cuda_multi_cached_device_args_init(d.as_mut_ptr()),
            S::ATTNRT_STATUS_OK
        );
        let d = d.assume_init();
        assert!(d.x_parts.is_null() && d.out_parts.is_null() && d.seqs.is_null());
        assert_eq!((d.n_parts, d.n_seqs, d.x_storage), (0, 0, 0));
        assert_eq!(
            attnrt_cuda_multi_forward_cached_device(
                ptr::null(),
                ptr::null_mut(),
                &d,
                ran.as_mut_ptr().cast::<attnrt_backend>()
            ),
            S::ATTNRT_STATUS_NULL_POINTER
        );
        assert_eq!(
            attnrt_cuda_multi_cached_device_args_init(ptr::null_mut()),
            S::ATTNRT_STATUS_NULL_POINTER
        );
        attnrt_cuda_multi_kv_cache_free(ptr::null_mut());
    }
    assert_eq!(cache, 0x77_usize as *mut _);
    assert_eq!(n, usize::MAX);
    assert!(k.iter().chain(&v).all(|x| x.is_nan()));
    assert!(out.iter().all(|x| x.to_bits() == SENTINEL.to_bits()));
    // SAFETY: initialised above, never written by the failing calls.
    assert_eq!(unsafe { ran.assume_init() }, u32::MAX);
}

#[test]
fn prefill_and_decode_on_two_gpus_equal_the_reference() {
    if two_gpus_or_skip().is_none() {
        return;
    }
    for (i, (name, cfg)) in configs().into_iter().enumerate() {
        let m = RandomLayer::new(cfg, 90 + i as u64);
        let c = cfg.n_embd;
        let rolling = cfg.sliding_window.is_some();
        let (bs, nb) = (4, 16);
        // The first sequence's rolling table is shorter than the sequence: its slots wrap.
        let tables: [Vec<u32>; 2] = if rolling {
            [vec![3, 0, 7], vec![1, 12, 5]]
        } else {
            [vec![3, 0, 7, 9], vec![1, 12, 5]]
        };
        let lens = [14usize, 9];
        // A chunked prefill of the first sequence with a whole prompt of the second, the
        // second chunk alone, then decode steps of one token per unfinished sequence.
        let mut plan: Vec<[usize; 2]> = vec![[7, 6], [4, 0]];
        plan.extend(std::iter::repeat_n([1, 1], 3));
        let xs = [
            Rng(7 + i as u64).vec(lens[0] * c, 1.0),
            Rng(70 + i as u64).vec(lens[1] * c, 1.0),
        ];

        let l = multi(&m, 16);
        let g = gpu_cache(&l, bs, nb, rolling)
            .unwrap_or_else(|st| panic!("{name}: {st:?}: {}", last_error()));
        let mut cpu = CpuCache(ptr::null_mut());
        // SAFETY: live layer, valid out pointer.
        let st = unsafe { attnrt_kv_cache_new(m.layer.0, 0, bs, nb, rolling as u8, &mut cpu.0) };
        assert_eq!(st, S::ATTNRT_STATUS_OK, "{}", last_error());

        let mut outs = [vec![f32::NAN; lens[0] * c], vec![f32::NAN; lens[1] * c]];
        let mut done = [0usize; 2];
        let mut worst_cpu = 0.0f32;
        for step in &plan {
            let (seqs, x) = plan_step(&tables, &xs, &done, step, c);
            let (st, ran, out) = gpu_step(&l, &g, &x, &seqs, c, |_| {});
            assert_eq!(
                (st, ran),
                (S::ATTNRT_STATUS_OK, CUDA),
                "{name}: {}",
                last_error()
            );
            let on_cpu = cpu_step(&m, &cpu, &x, &seqs);
            worst_cpu = worst_cpu.max(max_abs_diff(&out, &on_cpu));
            let mut at = 0;
            for s in 0..2 {
                let n = step[s] * c;
                outs[s][done[s] * c..done[s] * c + n].copy_from_slice(&out[at..at + n]);
                at += n;
                done[s] += step[s];
            }
        }
        assert_eq!(done, lens);
        assert!(
            worst_cpu <= F32_TOL,
            "{name}: vs the CPU cache {worst_cpu:.3e}"
        );
        let mut worst = 0.0f32;
        for s in 0..2 {
            let want = reference(&m, &xs[s], lens[s]);
            let err = max_abs_diff(&outs[s], &want);
            assert!(
                err <= F32_TOL,
                "{name}: sequence {s} vs reference {err:.3e}"
            );
            worst = worst.max(err);
        }
        let mut worst_pool = 0.0f32;
        for d in 0..2 {
            let sh = shard(&l, d);
            let want = cpu_pools_of(&m, &cpu, bs, nb, (sh.kv_head_start, sh.kv_head_end));
            let got = gpu_pools(&g, d);
            let err = max_abs_diff(&got, &want);
            assert!(
                err <= F32_TOL,
                "{name}: device {d}'s pools vs the CPU cache {err:.3e}"
            );
            worst_pool = worst_pool.max(err);
        }
        println!(
            "{name}: outputs vs reference {worst:.2e}, vs CPU cache {worst_cpu:.2e}; \
             pools vs CPU cache {worst_pool:.2e}"
        );
    }
}

#[test]
fn invalid_uses_write_nothing() {
    if two_gpus_or_skip().is_none() {
        return;
    }
    let (name, cfg) = configs().remove(0);
    let m = RandomLayer::new(cfg, 5);
    let c = cfg.n_embd;
    let l = multi(&m, 8);
    assert_eq!(
        gpu_cache(&l, 0, 8, false).err(),
        Some(S::ATTNRT_STATUS_CONFIG)
    );
    assert_eq!(
        gpu_cache(&l, 4, 0, false).err(),
        Some(S::ATTNRT_STATUS_CONFIG)
    );
    assert_eq!(
        gpu_cache(&l, 4, 8, true).err(),
        Some(S::ATTNRT_STATUS_UNSUPPORTED),
        "rolling without a window"
    );
    assert_eq!(
        gpu_cache(&l, usize::MAX / 2, 8, false).err(),
        Some(S::ATTNRT_STATUS_LENGTH_OVERFLOW)
    );
    let g = gpu_cache(&l, 4, 8, false).unwrap();
    // A first prompt, so that the caches hold something to keep.
    let x = Rng(3).vec(5 * c, 1.0);
    let first = [Seq {
        cached: 0,
        new: 5,
        blocks: vec![2, 6],
    }];
    let (st, _, _) = gpu_step(&l, &g, &x, &first, c, |_| {});
    assert_eq!(st, S::ATTNRT_STATUS_OK, "{name}: {}", last_error());
    let before = [gpu_pools(&g, 0), gpu_pools(&g, 1)];
    assert!(before[0].iter().any(|&v| v != 0.0));

    let x1 = Rng(4).vec(c, 1.0);
    let next = |blocks: Vec<u32>| Seq {
        cached: 5,
        new: 1,
        blocks,
    };
    let (x2, x9) = (Rng(5).vec(2 * c, 1.0), Rng(6).vec(9 * c, 1.0));
    let short_table = vec![0.0f32; 4 * cfg.head_dim];
    let other = RandomLayer::new(Config::new(64, 8).with_kv_heads(4).with_head_dim(16), 6);
    let lo = multi(&other, 8);
    let other_cache = gpu_cache(&lo, 4, 8, false).unwrap();
    type Edit = Box<dyn Fn(&mut attnrt_cached_args)>;
    /// What, sequences, x, argument edit, whether the other layer's cache, expected status.
    type Case<'a> = (&'a str, Vec<Seq>, &'a [f32], Edit, bool, attnrt_status);
    let none: fn() -> Edit = || Box::new(|_| {});
    let cases: Vec<Case<'_>> = vec![
        (
            "cache full",
            vec![next(vec![2])],
            &x1,
            none(),
            false,
            S::ATTNRT_STATUS_KV_CACHE_FULL,
        ),
        (
            "block outside the pool",
            vec![next(vec![2, 8])],
            &x1,
            none(),
            false,
            S::ATTNRT_STATUS_KV_BLOCK,
        ),
        (
            "a block twice",
            vec![
                next(vec![2, 6]),
                Seq {
                    cached: 0,
                    new: 1,
                    blocks: vec![6],
                },
            ],
            &x2,
            none(),
            false,
            S::ATTNRT_STATUS_KV_BLOCK,
        ),
        (
            "x one value short",
            vec![next(vec![2, 6])],
            &x1[1..],
            none(),
            false,
            S::ATTNRT_STATUS_INPUT_SHAPE,
        ),
        (
            "position past the caller's table",
            vec![next(vec![2, 6])],
            &x1,
            Box::new(move |a: &mut attnrt_cached_args| {
                a.freqs_cis = short_table.as_ptr();
                a.freqs_cis_len = short_table.len();
            }),
            false,
            S::ATTNRT_STATUS_POSITION_OUT_OF_TABLE,
        ),
        (
            "out overlapping x",
            vec![next(vec![2, 6])],
            &x1,
            Box::new(|a: &mut attnrt_cached_args| a.out = a.x.cast_mut()),
            false,
            S::ATTNRT_STATUS_ALIASED_BUFFERS,
        ),
        (
            "more new tokens than the layer's maxima",
            vec![Seq {
                cached: 5,
                new: 9,
                blocks: vec![2, 6, 0, 1],
            }],
            &x9,
            none(),
            false,
            S::ATTNRT_STATUS_DEVICE_CAPACITY,
        ),
        (
            "a cache of another layer's heads",
            vec![next(vec![2, 6])],
            &x1,
            none(),
            true,
            S::ATTNRT_STATUS_INPUT_SHAPE,
        ),
    ];
    for (what, seqs, x, edit, other, want) in cases {
        let cache = if other { &other_cache } else { &g };
        let (st, ran, out) = gpu_step(&l, cache, x, &seqs, c, edit);
        assert_eq!(st, want, "{what}: {}", last_error());
        assert_eq!(ran, u32::MAX, "{what}: backend written");
        assert!(
            out.iter().all(|v| v.to_bits() == SENTINEL.to_bits()),
            "{what}: out written"
        );
        for (d, b) in before.iter().enumerate() {
            assert!(gpu_pools(&g, d) == *b, "{what}: device {d}'s cache changed");
        }
    }
    // Queries out of range.
    let mut n = usize::MAX;
    // SAFETY: live handle, valid out pointer.
    let st = unsafe { attnrt_cuda_multi_kv_cache_size(g.0, 2, &mut n) };
    assert_eq!((st, n), (S::ATTNRT_STATUS_INPUT_VALUE, usize::MAX));
    let mut k = vec![f32::NAN; 3];
    let mut v = vec![f32::NAN; 3];
    // SAFETY: buffers valid for 3 elements; the call refuses the length first.
    let st =
        unsafe { attnrt_cuda_multi_kv_cache_read_f32(g.0, 0, k.as_mut_ptr(), v.as_mut_ptr(), 3) };
    assert_eq!(st, S::ATTNRT_STATUS_INPUT_SHAPE);
    assert!(k.iter().chain(&v).all(|x| x.is_nan()));
    // The cache still serves the next token.
    let (st, ran, out) = gpu_step(&l, &g, &x1, &[next(vec![2, 6])], c, |_| {});
    assert_eq!((st, ran), (S::ATTNRT_STATUS_OK, CUDA), "{}", last_error());
    assert!(out.iter().all(|v| v.is_finite()));
}

/// `attnrt_cuda_multi_forward_cached_device` (rows and outputs in device memory of both
/// devices, put there with `cust`) equals `attnrt_cuda_multi_forward_cached` bit for bit on
/// every call of a chunked, batched prefill and decode steps, on both devices' outputs; a
/// null device pointer or a wrong part count is refused with the outputs untouched.
#[cfg(feature = "cuda")]
#[test]
fn device_resident_calls_equal_host_calls() {
    use cust::memory::{CopyDestination, DeviceBuffer};
    if two_gpus_or_skip().is_none() {
        return;
    }
    for (i, (name, cfg)) in configs().into_iter().enumerate().take(2) {
        let m = RandomLayer::new(cfg, 190 + i as u64);
        let c = cfg.n_embd;
        let (bs, nb) = (4, 16);
        let tables: [Vec<u32>; 2] = [vec![3, 0, 7, 9], vec![1, 12, 5]];
        let lens = [14usize, 9];
        let mut plan: Vec<[usize; 2]> = vec![[7, 6], [4, 0]];
        plan.extend(std::iter::repeat_n([1, 1], 3));
        let xs = [
            Rng(17 + i as u64).vec(lens[0] * c, 1.0),
            Rng(170 + i as u64).vec(lens[1] * c, 1.0),
        ];
        let (host, dev) = (multi(&m, 16), multi(&m, 16));
        let (gh, gd) = (
            gpu_cache(&host, bs, nb, false).unwrap(),
            gpu_cache(&dev, bs, nb, false).unwrap(),
        );
        let ctxs: Vec<cust::context::Context> = (0..2)
            .map(|d| {
                cust::context::Context::new(cust::device::Device::get_device(d).unwrap()).unwrap()
            })
            .collect();
        let mut done = [0usize; 2];
        for (k, step) in plan.iter().enumerate() {
            let (seqs, x) = plan_step(&tables, &xs, &done, step, c);
            for s in 0..2 {
                done[s] += step[s];
            }
            let (st, _, want) = gpu_step(&host, &gh, &x, &seqs, c, |_| {});
            assert_eq!(st, S::ATTNRT_STATUS_OK, "{name}: {}", last_error());
            // Each device's rows and output buffer (f32: the layer's storage type too).
            let mut bufs = Vec::new();
            for ctx in &ctxs {
                cust::context::CurrentContext::set_current(ctx).unwrap();
                bufs.push((
                    DeviceBuffer::from_slice(&x).unwrap(),
                    DeviceBuffer::from_slice(&vec![SENTINEL; x.len()]).unwrap(),
                ));
            }
            let xp: Vec<u64> = bufs.iter().map(|b| b.0.as_device_ptr().as_raw()).collect();
            let mut op: Vec<u64> = bufs.iter().map(|b| b.1.as_device_ptr().as_raw()).collect();
            let cs = c_seqs(&seqs);
            let mut a = std::mem::MaybeUninit::uninit();
            // SAFETY: valid for one write.
            let st = unsafe { attnrt_cuda_multi_cached_device_args_init(a.as_mut_ptr()) };
            assert_eq!(st, S::ATTNRT_STATUS_OK);
            // SAFETY: written by the successful call.
            let mut a: attnrt_cuda_multi_cached_device_args = unsafe { a.assume_init() };
            (a.x_parts, a.out_parts, a.n_parts) = (xp.as_ptr(), op.as_ptr(), 2);
            (a.seqs, a.n_seqs) = (cs.as_ptr(), cs.len());
            a.x_storage = (k % 2) as i32;
            let read = |bufs: &[(DeviceBuffer<f32>, DeviceBuffer<f32>)]| -> Vec<Vec<f32>> {
                bufs.iter()
                    .zip(&ctxs)
                    .map(|(b, ctx)| {
                        cust::context::CurrentContext::set_current(ctx).unwrap();
                        let mut h = vec![0.0f32; b.1.len()];
                        b.1.copy_to(&mut h[..]).unwrap();
                        h
                    })
                    .collect()
            };
            let call = |a: &attnrt_cuda_multi_cached_device_args| -> attnrt_status {
                let mut ran = std::mem::MaybeUninit::<u32>::new(u32::MAX);
                // SAFETY: live handles; the parts are device allocations of the layer's
                // devices with room for the call's rows; host arrays valid for their lengths.
                unsafe {
                    attnrt_cuda_multi_forward_cached_device(
                        dev.0,
                        gd.0,
                        a,
                        ran.as_mut_ptr().cast::<attnrt_backend>(),
                    )
                }
            };
            if k == 0 {
                // Refused, outputs untouched: one part short, a null device pointer.
                let mut short = a;
                short.n_parts = 1;
                assert_eq!(call(&short), S::ATTNRT_STATUS_INPUT_SHAPE, "{name}");
                op[1] = 0;
                let mut null = a;
                null.out_parts = op.as_ptr();
                assert_eq!(call(&null), S::ATTNRT_STATUS_NULL_POINTER, "{name}");
                println!("{name}: null device pointer: {}", last_error());
                op[1] = bufs[1].1.as_device_ptr().as_raw();
                for o in read(&bufs) {
                    assert!(
                        o.iter().all(|v| v.to_bits() == SENTINEL.to_bits()),
                        "{name}: written"
                    );
                }
            }
            assert_eq!(call(&a), S::ATTNRT_STATUS_OK, "{name}: {}", last_error());
            for (d, got) in read(&bufs).iter().enumerate() {
                assert!(
                    got.iter()
                        .zip(&want)
                        .all(|(p, q)| p.to_bits() == q.to_bits()),
                    "{name} call {k}: device {d}'s output differs from the host call's"
                );
            }
        }
        for d in 0..2 {
            assert!(
                gpu_pools(&gh, d) == gpu_pools(&gd, d),
                "{name}: device {d}'s pools differ"
            );
        }
        println!(
            "{name}: {} device-resident calls equal the host calls bit for bit",
            plan.len()
        );
    }
}
