//! Every invalid input through the C ABI returns its own status, a message naming the
//! offending value, and leaves the output (and the reported backend) untouched.

use std::ffi::{c_char, CStr};
use std::ptr;

use attnrt_ffi::*;
use attnrt_tests::ffi_harness::{
    absent, forward, last_error, status_name, CallBuffers, LayerHandle, SENTINEL,
};

use attnrt_status as S;

const C: usize = 16;
const H: usize = 4;
const KV: usize = 2;
const D: usize = 4;
const B: usize = 2;
const T: usize = 5;

/// A deterministic pseudo-random f32 vector in [-0.5, 0.5).
fn data(n: usize, seed: u32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(2654435761).wrapping_add(12345);
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            (s % 10_000) as f32 / 10_000.0 - 0.5
        })
        .collect()
}

fn cfg() -> attnrt_config {
    let mut c = std::mem::MaybeUninit::uninit();
    // SAFETY: valid for one write.
    assert_eq!(
        unsafe { attnrt_config_default(C, H, c.as_mut_ptr()) },
        S::ATTNRT_STATUS_OK
    );
    // SAFETY: written by the successful call.
    let mut c: attnrt_config = unsafe { c.assume_init() };
    c.n_kv_head = KV;
    c.head_dim = D;
    c.bias_q = 1;
    c.bias_k = 1;
    c.bias_v = 1;
    c.bias_o = 1;
    c.qk_norm = attnrt_qk_norm::ATTNRT_QK_NORM_PER_HEAD as u32;
    c.sliding_window = 3;
    c.rope = 1;
    c
}

/// The weights of [`cfg`], owned.
struct Weights {
    w: Vec<Vec<f32>>,
}

impl Weights {
    fn new() -> Weights {
        let lens = [
            H * D * C,
            KV * D * C,
            KV * D * C,
            C * H * D,
            H * D,
            KV * D,
            KV * D,
            C,
            D,
            D,
        ];
        Weights {
            w: lens
                .iter()
                .enumerate()
                .map(|(i, &n)| data(n, i as u32 + 1))
                .collect(),
        }
    }

    fn c(&self) -> attnrt_weights {
        let t = |i: usize| attnrt_tensor {
            data: self.w[i].as_ptr().cast(),
            len: self.w[i].len(),
            dtype: attnrt_dtype::ATTNRT_DTYPE_F32 as u32,
        };
        attnrt_weights {
            wq: t(0),
            wk: t(1),
            wv: t(2),
            wo: t(3),
            bq: t(4),
            bk: t(5),
            bv: t(6),
            bo: t(7),
            q_norm: t(8),
            k_norm: t(9),
        }
    }
}

fn layer() -> LayerHandle {
    LayerHandle::new(&cfg(), &Weights::new().c())
}

fn bufs(layer: &LayerHandle) -> CallBuffers {
    CallBuffers {
        x: data(B * T * C, 99),
        batch: B,
        seq_len: T,
        seq_lens: None,
        document_ids: None,
        cu_seqlens: None,
        max_seqlen: -1,
        position_ids: None,
        freqs_cis: None,
        workspace: vec![0.0; layer.workspace_size(B, T, 1)],
        out: vec![SENTINEL; B * T * C],
        num_threads: 1,
    }
}

fn untouched(out: &[f32]) -> bool {
    out.iter().all(|v| v.to_bits() == SENTINEL.to_bits())
}

/// Runs `forward` after `edit` changes the buffers and then the arguments; checks the status,
/// the message and that nothing was written.
fn expect(
    layer: &LayerHandle,
    what: &str,
    status: attnrt_status,
    needle: &str,
    edit: impl FnOnce(&mut CallBuffers),
    edit_args: impl FnOnce(&mut attnrt_forward_args),
) {
    let mut b = bufs(layer);
    edit(&mut b);
    let mut a = b.args();
    edit_args(&mut a);
    let (st, ran) = forward(layer, &a);
    let msg = last_error();
    assert_eq!(st, status, "{what}: {msg}");
    assert_eq!(ran, u32::MAX, "{what}: backend_ran written on error");
    assert!(untouched(&b.out), "{what}: output written on error");
    assert!(
        msg.contains(needle),
        "{what}: message {msg:?} does not name {needle:?}"
    );
    println!("{what:40} {:36} {msg}", status_name(st as u32).unwrap());
}

fn no_args(_: &mut attnrt_forward_args) {}
fn no_bufs(_: &mut CallBuffers) {}

#[test]
fn a_valid_call_succeeds_and_clears_the_last_error() {
    let l = layer();
    // Leave an error behind first.
    let mut b = bufs(&l);
    let mut a = b.args();
    a.x = ptr::null();
    assert_eq!(forward(&l, &a).0, S::ATTNRT_STATUS_NULL_POINTER);
    assert!(!last_error().is_empty());
    let mut b = bufs(&l);
    let (st, ran) = forward(&l, &b.args());
    assert_eq!(st, S::ATTNRT_STATUS_OK, "{}", last_error());
    assert_eq!(ran, attnrt_backend::ATTNRT_BACKEND_CPU_SIMD as u32);
    assert!(!untouched(&b.out) && b.out.iter().all(|v| v.is_finite()));
    assert_eq!(last_error(), "");
}

#[test]
fn null_pointers_each() {
    let l = layer();
    let nul = S::ATTNRT_STATUS_NULL_POINTER;
    expect(&l, "x NULL", nul, "x", no_bufs, |a| a.x = ptr::null());
    expect(&l, "workspace NULL", nul, "workspace", no_bufs, |a| {
        a.workspace = ptr::null_mut()
    });
    expect(&l, "out NULL", nul, "out", no_bufs, |a| {
        a.out = ptr::null_mut()
    });
    expect(&l, "seq_lens NULL, len 2", nul, "seq_lens", no_bufs, |a| {
        a.seq_lens_len = 2
    });
    expect(
        &l,
        "document_ids NULL, len 10",
        nul,
        "document_ids",
        no_bufs,
        |a| a.document_ids_len = 10,
    );
    expect(
        &l,
        "cu_seqlens NULL, len 2",
        nul,
        "cu_seqlens",
        no_bufs,
        |a| a.cu_seqlens_len = 2,
    );
    expect(
        &l,
        "position_ids NULL, len 10",
        nul,
        "position_ids",
        no_bufs,
        |a| a.position_ids_len = 10,
    );
    expect(
        &l,
        "freqs_cis NULL, len 8",
        nul,
        "freqs_cis",
        no_bufs,
        |a| a.freqs_cis_len = 8,
    );

    let mut b = bufs(&l);
    let a = b.args();
    let mut ran = attnrt_backend::ATTNRT_BACKEND_CUDA;
    // SAFETY: each call passes NULL for one pointer and valid values for the rest.
    unsafe {
        assert_eq!(attnrt_forward(ptr::null(), &a, &mut ran), nul);
        assert!(last_error().contains("layer"));
        assert_eq!(attnrt_forward(l.0, ptr::null(), &mut ran), nul);
        assert!(last_error().contains("args"));
        assert_eq!(attnrt_forward(l.0, &a, ptr::null_mut()), nul);
        assert!(last_error().contains("backend_ran"));
    }
    assert_eq!(ran, attnrt_backend::ATTNRT_BACKEND_CUDA);
    assert!(untouched(&b.out));

    let (c, w) = (cfg(), Weights::new());
    let cw = w.c();
    let mut out: *mut attnrt_layer = ptr::null_mut();
    let mut n = 7usize;
    // SAFETY: as above.
    unsafe {
        assert_eq!(attnrt_layer_new(ptr::null(), &cw, &mut out), nul);
        assert_eq!(attnrt_layer_new(&c, ptr::null(), &mut out), nul);
        assert_eq!(attnrt_layer_new(&c, &cw, ptr::null_mut()), nul);
        assert!(out.is_null());
        assert_eq!(attnrt_workspace_size(ptr::null(), 1, 1, 1, &mut n), nul);
        assert_eq!(attnrt_workspace_size(l.0, 1, 1, 1, ptr::null_mut()), nul);
        assert_eq!(attnrt_cpu_tier(ptr::null_mut()), nul);
        assert_eq!(n, 7);
        assert_eq!(attnrt_config_default(8, 2, ptr::null_mut()), nul);
        assert_eq!(attnrt_forward_args_init(ptr::null_mut()), nul);
        assert_eq!(
            attnrt_capability(ptr::null(), 1, 1, 0, ptr::null_mut(), 0, ptr::null_mut()),
            nul
        );
        assert_eq!(
            attnrt_error_message(ptr::null_mut(), 0, ptr::null_mut()),
            nul
        );
        attnrt_layer_free(ptr::null_mut()); // a no-op
    }
}

#[test]
fn wrong_lengths_each_buffer() {
    let l = layer();
    let shape = S::ATTNRT_STATUS_INPUT_SHAPE;
    expect(
        &l,
        "x one short",
        shape,
        "x",
        |b| {
            b.x.pop();
        },
        no_args,
    );
    expect(&l, "x one long", shape, "x", |b| b.x.push(0.0), no_args);
    expect(
        &l,
        "out one short",
        shape,
        "out",
        |b| {
            b.out.pop();
        },
        no_args,
    );
    expect(
        &l,
        "out one long",
        shape,
        "out",
        |b| b.out.push(SENTINEL),
        no_args,
    );
    expect(
        &l,
        "seq_lens [3] for B = 2",
        shape,
        "seq_lens",
        |b| b.seq_lens = Some(vec![5; 3]),
        no_args,
    );
    expect(
        &l,
        "document_ids [9]",
        shape,
        "document_ids",
        |b| b.document_ids = Some(vec![0; 9]),
        no_args,
    );
    expect(
        &l,
        "cu_seqlens empty",
        shape,
        "cu_seqlens",
        |b| {
            (b.batch, b.x, b.out) = (1, data(T * C, 1), vec![SENTINEL; T * C]);
            b.cu_seqlens = Some(vec![]);
        },
        no_args,
    );
    expect(
        &l,
        "position_ids [9]",
        shape,
        "position_ids",
        |b| b.position_ids = Some(vec![0; 9]),
        no_args,
    );
    expect(
        &l,
        "freqs_cis not whole rows",
        shape,
        "freqs_cis",
        |b| b.freqs_cis = Some(vec![1.0; 4 * D + 1]),
        no_args,
    );
    expect(
        &l,
        "workspace one short",
        S::ATTNRT_STATUS_WORKSPACE_TOO_SMALL,
        "workspace",
        |b| {
            b.workspace.pop();
        },
        no_args,
    );
    expect(
        &l,
        "workspace empty",
        S::ATTNRT_STATUS_WORKSPACE_TOO_SMALL,
        "workspace",
        |b| b.workspace.clear(),
        no_args,
    );
}

#[test]
fn a_caller_table_needs_less_workspace() {
    let l = layer();
    let mut b = bufs(&l);
    let mut table = vec![0.0f32; 16 * D];
    for (p, row) in table.chunks_exact_mut(D).enumerate() {
        for i in 0..D / 2 {
            let a = p as f64 * 10000f64.powf(-(2.0 * i as f64) / D as f64);
            (row[2 * i], row[2 * i + 1]) = (a.cos() as f32, a.sin() as f32);
        }
    }
    b.freqs_cis = Some(table);
    b.workspace.truncate(b.workspace.len() - B * T * (D + 1));
    let (st, _) = forward(&l, &b.args());
    assert_eq!(st, S::ATTNRT_STATUS_OK, "{}", last_error());
    let mut built = bufs(&l);
    assert_eq!(forward(&l, &built.args()).0, S::ATTNRT_STATUS_OK);
    assert!(attnrt_tests::max_abs_diff(&b.out, &built.out) < 1e-6);
}

#[test]
fn mask_and_position_values() {
    let l = layer();
    let val = S::ATTNRT_STATUS_INPUT_VALUE;
    let varlen = |b: &mut CallBuffers, cu: Vec<i32>, max: i32| {
        (b.batch, b.x, b.out) = (1, data(T * C, 1), vec![SENTINEL; T * C]);
        b.cu_seqlens = Some(cu);
        b.max_seqlen = max;
    };
    expect(
        &l,
        "cu_seqlens decreasing",
        val,
        "cu_seqlens",
        |b| varlen(b, vec![0, 3, 2, 5], -1),
        no_args,
    );
    expect(
        &l,
        "cu_seqlens not ending at T",
        val,
        "cu_seqlens",
        |b| varlen(b, vec![0, 2, 4], -1),
        no_args,
    );
    expect(
        &l,
        "cu_seqlens not starting at 0",
        val,
        "cu_seqlens",
        |b| varlen(b, vec![1, 2, 5], -1),
        no_args,
    );
    expect(
        &l,
        "max_seqlen too small",
        val,
        "max_seqlen",
        |b| varlen(b, vec![0, 2, 5], 2),
        no_args,
    );
    expect(
        &l,
        "varlen with batch 2",
        val,
        "cu_seqlens",
        |b| b.cu_seqlens = Some(vec![0, 5]),
        no_args,
    );
    expect(
        &l,
        "seq_lens > T",
        val,
        "seq_lens",
        |b| b.seq_lens = Some(vec![5, 6]),
        no_args,
    );
    expect(
        &l,
        "seq_lens negative",
        val,
        "seq_lens",
        |b| b.seq_lens = Some(vec![-1, 5]),
        no_args,
    );
    let mut pos: Vec<i32> = (0..(B * T) as i32).collect();
    pos[7] = -3;
    expect(
        &l,
        "negative position (built table)",
        val,
        "position_ids",
        |b| b.position_ids = Some(pos.clone()),
        no_args,
    );
    expect(
        &l,
        "negative position (caller table)",
        val,
        "position_ids",
        |b| {
            b.position_ids = Some(pos.clone());
            b.freqs_cis = Some(vec![1.0; 64 * D]);
        },
        no_args,
    );
    expect(
        &l,
        "position past the caller table",
        S::ATTNRT_STATUS_POSITION_OUT_OF_TABLE,
        "position 64",
        |b| {
            b.position_ids = Some((0..(B * T) as i32).map(|p| p * 16).collect());
            b.freqs_cis = Some(vec![1.0; 64 * D]);
        },
        no_args,
    );
    expect(
        &l,
        "T past the caller table",
        S::ATTNRT_STATUS_POSITION_OUT_OF_TABLE,
        "rotary table",
        |b| {
            b.freqs_cis = Some(vec![1.0; 4 * D]);
        },
        no_args,
    );
}

#[test]
fn large_positions_need_only_their_rows() {
    // Positions up to i32::MAX - 1 with the built table: one row per distinct position.
    let l = layer();
    let mut b = bufs(&l);
    b.position_ids = Some((0..(B * T) as i32).map(|p| i32::MAX - 1 - p % 3).collect());
    let (st, _) = forward(&l, &b.args());
    assert_eq!(st, S::ATTNRT_STATUS_OK, "{}", last_error());
    assert!(b.out.iter().all(|v| v.is_finite()));
}

#[test]
fn backends_and_enums() {
    let l = layer();
    let unavailable = S::ATTNRT_STATUS_BACKEND_UNAVAILABLE;
    expect(&l, "forced CUDA", unavailable, "CUDA", no_bufs, |a| {
        a.backend = attnrt_backend::ATTNRT_BACKEND_CUDA as u32
    });
    expect(
        &l,
        "backend 4",
        S::ATTNRT_STATUS_BAD_ENUM,
        "backend = 4",
        no_bufs,
        |a| a.backend = 4,
    );
    expect(
        &l,
        "backend u32::MAX",
        S::ATTNRT_STATUS_BAD_ENUM,
        "backend",
        no_bufs,
        |a| a.backend = u32::MAX,
    );

    // A freqs table for a layer without rotary embedding.
    let mut c = cfg();
    c.rope = 0;
    let nope = LayerHandle::new(&c, &Weights::new().c());
    expect(
        &nope,
        "freqs_cis without rope",
        S::ATTNRT_STATUS_UNSUPPORTED,
        "freqs_cis",
        |b| b.freqs_cis = Some(vec![1.0; 8 * D]),
        no_args,
    );
}

#[test]
fn aliasing_and_alignment() {
    let l = layer();
    expect(
        &l,
        "out aliases x",
        S::ATTNRT_STATUS_ALIASED_BUFFERS,
        "out overlaps x",
        no_bufs,
        |a| a.out = a.x.cast_mut(),
    );
    expect(
        &l,
        "workspace overlaps x",
        S::ATTNRT_STATUS_ALIASED_BUFFERS,
        "workspace overlaps x",
        |b| {
            b.x.resize(b.workspace.len().max(b.x.len()), 0.0);
        },
        |a| {
            a.workspace = a.x.cast_mut();
            a.x_len = B * T * C;
        },
    );
    expect(
        &l,
        "out overlaps workspace",
        S::ATTNRT_STATUS_ALIASED_BUFFERS,
        "workspace",
        no_bufs,
        |a| {
            a.out = a.workspace;
        },
    );
    // Misaligned x: one byte into a float buffer.
    expect(
        &l,
        "x misaligned",
        S::ATTNRT_STATUS_MISALIGNED_POINTER,
        "x is not aligned",
        no_bufs,
        |a| {
            a.x = a.x.cast::<u8>().wrapping_add(1).cast();
            a.x_len -= 1;
        },
    );
    expect(
        &l,
        "x length overflows",
        S::ATTNRT_STATUS_LENGTH_OVERFLOW,
        "x",
        no_bufs,
        |a| a.x_len = usize::MAX / 2,
    );
}

fn expect_new(
    what: &str,
    status: attnrt_status,
    needle: &str,
    c: attnrt_config,
    w: attnrt_weights,
) {
    let r = LayerHandle::try_new(&c, &w);
    let msg = last_error();
    assert_eq!(r.as_ref().err(), Some(&status), "{what}: {msg}");
    assert!(
        msg.contains(needle),
        "{what}: message {msg:?} does not name {needle:?}"
    );
    println!("{what:40} {:36} {msg}", status_name(status as u32).unwrap());
}

#[test]
fn invalid_configurations() {
    let w = Weights::new();
    let cw = w.c();
    let with = |f: &dyn Fn(&mut attnrt_config)| {
        let mut c = cfg();
        f(&mut c);
        c
    };
    expect_new(
        "zero heads",
        S::ATTNRT_STATUS_CONFIG,
        "n_head",
        with(&|c| c.n_head = 0),
        cw,
    );
    expect_new(
        "zero kv heads",
        S::ATTNRT_STATUS_CONFIG,
        "n_kv_head",
        with(&|c| c.n_kv_head = 0),
        cw,
    );
    expect_new(
        "n_embd not divisible",
        S::ATTNRT_STATUS_CONFIG_PAIR,
        "n_embd",
        with(&|c| c.n_embd = 18),
        cw,
    );
    expect_new(
        "n_head not divisible by kv",
        S::ATTNRT_STATUS_CONFIG_PAIR,
        "n_head",
        with(&|c| c.n_kv_head = 3),
        cw,
    );
    expect_new(
        "odd head_dim with rope",
        S::ATTNRT_STATUS_CONFIG,
        "head_dim",
        with(&|c| c.head_dim = 3),
        cw,
    );
    expect_new(
        "window 0",
        S::ATTNRT_STATUS_CONFIG,
        "sliding_window",
        with(&|c| c.sliding_window = 0),
        cw,
    );
    expect_new(
        "eps 0",
        S::ATTNRT_STATUS_CONFIG_FLOAT,
        "rmsnorm_eps",
        with(&|c| c.rmsnorm_eps = 0.0),
        cw,
    );
    expect_new(
        "theta NaN",
        S::ATTNRT_STATUS_CONFIG_FLOAT,
        "rope.theta",
        with(&|c| c.rope_theta = f64::NAN),
        cw,
    );
    expect_new(
        "llama3 high <= low",
        S::ATTNRT_STATUS_CONFIG_FLOAT,
        "high_freq_factor",
        with(&|c| {
            c.rope_scaling = attnrt_rope_scaling::ATTNRT_ROPE_SCALING_LLAMA3 as u32;
            c.rope_high_freq_factor = 0.5;
        }),
        cw,
    );
    expect_new(
        "qk_norm 3",
        S::ATTNRT_STATUS_BAD_ENUM,
        "qk_norm = 3",
        with(&|c| c.qk_norm = 3),
        cw,
    );
    expect_new(
        "rope_convention 2",
        S::ATTNRT_STATUS_BAD_ENUM,
        "rope_convention",
        with(&|c| c.rope_convention = 2),
        cw,
    );
    expect_new(
        "rope_scaling 9",
        S::ATTNRT_STATUS_BAD_ENUM,
        "rope_scaling",
        with(&|c| c.rope_scaling = 9),
        cw,
    );
}

#[test]
fn invalid_weights() {
    let w = Weights::new();
    let c = cfg();
    let with = |f: &dyn Fn(&mut attnrt_weights)| {
        let mut cw = w.c();
        f(&mut cw);
        cw
    };
    expect_new(
        "dtype 3",
        S::ATTNRT_STATUS_BAD_ENUM,
        "wq.dtype = 3",
        c,
        with(&|w| w.wq.dtype = 3),
    );
    expect_new(
        "dtype u32::MAX",
        S::ATTNRT_STATUS_BAD_ENUM,
        "bo.dtype",
        c,
        with(&|w| w.bo.dtype = u32::MAX),
    );
    expect_new(
        "wk one short",
        S::ATTNRT_STATUS_WEIGHT_SHAPE,
        "wk",
        c,
        with(&|w| w.wk.len -= 1),
    );
    expect_new(
        "wo as f16 (half the bytes)",
        S::ATTNRT_STATUS_WEIGHT_SHAPE,
        "wo",
        c,
        with(&|w| {
            w.wo.dtype = attnrt_dtype::ATTNRT_DTYPE_F16 as u32;
            w.wo.len = 2 * w.wo.len + 2;
        }),
    );
    expect_new(
        "wq absent",
        S::ATTNRT_STATUS_WEIGHT_PRESENCE,
        "wq",
        c,
        with(&|w| w.wq = absent()),
    );
    expect_new(
        "bq absent",
        S::ATTNRT_STATUS_WEIGHT_PRESENCE,
        "bq",
        c,
        with(&|w| w.bq = absent()),
    );
    let mut no_bias = c;
    no_bias.bias_o = 0;
    expect_new(
        "bo unused",
        S::ATTNRT_STATUS_WEIGHT_PRESENCE,
        "bo",
        no_bias,
        w.c(),
    );
    expect_new(
        "wv misaligned",
        S::ATTNRT_STATUS_MISALIGNED_POINTER,
        "wv",
        c,
        with(&|w| {
            w.wv.data = w.wv.data.cast::<u8>().wrapping_add(2).cast();
            w.wv.len -= 1;
        }),
    );
}

#[test]
fn weights_are_copied() {
    // The caller's buffers may be freed right after attnrt_layer_new.
    let c = cfg();
    let l = {
        let w = Weights::new();
        LayerHandle::new(&c, &w.c())
    };
    let reference = layer();
    let mut a = bufs(&l);
    let mut b = bufs(&reference);
    assert_eq!(forward(&l, &a.args()).0, S::ATTNRT_STATUS_OK);
    assert_eq!(forward(&reference, &b.args()).0, S::ATTNRT_STATUS_OK);
    assert!(a
        .out
        .iter()
        .zip(&b.out)
        .all(|(x, y)| x.to_bits() == y.to_bits()));
}

#[test]
fn error_message_truncation() {
    let l = layer();
    let mut b = bufs(&l);
    let mut a = b.args();
    a.backend = attnrt_backend::ATTNRT_BACKEND_CUDA as u32;
    assert_eq!(forward(&l, &a).0, S::ATTNRT_STATUS_BACKEND_UNAVAILABLE);
    let full = last_error();
    assert!(full.len() > 10);

    let mut buf = [0x55 as c_char; 8];
    let mut written = 0usize;
    // SAFETY: buf valid for 5 of its 8 bytes, written valid.
    let st = unsafe { attnrt_error_message(buf.as_mut_ptr(), 5, &mut written) };
    assert_eq!(st, S::ATTNRT_STATUS_TRUNCATED);
    assert_eq!(written, 4);
    // SAFETY: NUL-terminated by the call.
    assert_eq!(
        unsafe { CStr::from_ptr(buf.as_ptr()) }.to_str().unwrap(),
        &full[..4]
    );
    assert_eq!(buf[5], 0x55, "wrote past len");

    // Length 1: only the NUL. Length 0 (buffer may be NULL): nothing.
    // SAFETY: as above.
    unsafe {
        assert_eq!(
            attnrt_error_message(buf.as_mut_ptr(), 1, &mut written),
            S::ATTNRT_STATUS_TRUNCATED
        );
        assert_eq!((written, buf[0]), (0, 0));
        assert_eq!(
            attnrt_error_message(ptr::null_mut(), 0, &mut written),
            S::ATTNRT_STATUS_TRUNCATED
        );
        assert_eq!(written, 0);
        assert_eq!(
            attnrt_error_message(ptr::null_mut(), 4, &mut written),
            S::ATTNRT_STATUS_NULL_POINTER
        );
    }
    // Reading the message does not clear it.
    assert_eq!(last_error(), full);

    // Exactly fitting: len = message + NUL.
    let mut exact = vec![0 as c_char; full.len() + 1];
    // SAFETY: as above.
    let st = unsafe { attnrt_error_message(exact.as_mut_ptr(), exact.len(), &mut written) };
    assert_eq!((st, written), (S::ATTNRT_STATUS_OK, full.len()));

    // Each thread has its own last error.
    std::thread::spawn(|| assert_eq!(last_error(), ""))
        .join()
        .unwrap();
}

#[test]
fn capability_query() {
    let c = cfg();
    let mut buf = [0 as c_char; 256];
    let mut written = 0usize;
    let query = |c: &attnrt_config, backend: u32, buf: &mut [c_char], written: &mut usize| {
        // SAFETY: valid config, buffer and out pointer.
        unsafe { attnrt_capability(c, 2, 64, backend, buf.as_mut_ptr(), buf.len(), written) }
    };
    let text = |buf: &[c_char]| {
        // SAFETY: NUL-terminated by the call.
        unsafe { CStr::from_ptr(buf.as_ptr()) }
            .to_str()
            .unwrap()
            .to_owned()
    };
    for ok in [
        attnrt_backend::ATTNRT_BACKEND_AUTO,
        attnrt_backend::ATTNRT_BACKEND_REFERENCE,
        attnrt_backend::ATTNRT_BACKEND_CPU_SIMD,
    ] {
        assert_eq!(
            query(&c, ok as u32, &mut buf, &mut written),
            S::ATTNRT_STATUS_OK
        );
        assert_eq!((written, text(&buf)), (0, String::new()));
    }
    {
        let st = query(
            &c,
            attnrt_backend::ATTNRT_BACKEND_CUDA as u32,
            &mut buf,
            &mut written,
        );
        assert_eq!(st, S::ATTNRT_STATUS_BACKEND_UNAVAILABLE);
        assert!(
            text(&buf).contains("attnrt_cuda_layer_new"),
            "{}",
            text(&buf)
        );
        assert_eq!(written, text(&buf).len());
        assert_eq!(last_error(), text(&buf));
    }
    assert_eq!(
        query(&c, 9, &mut buf, &mut written),
        S::ATTNRT_STATUS_BAD_ENUM
    );
    let mut odd = c;
    odd.head_dim = 5;
    assert_eq!(
        query(&odd, 0, &mut buf, &mut written),
        S::ATTNRT_STATUS_CONFIG
    );
    assert!(text(&buf).contains("head_dim = 5"), "{}", text(&buf));
    // A short reason buffer: truncated, NUL-terminated; the status is still the answer.
    let mut small = [0 as c_char; 6];
    assert_eq!(
        query(&odd, 0, &mut small, &mut written),
        S::ATTNRT_STATUS_CONFIG
    );
    assert_eq!((written, text(&small).len()), (5, 5));
    // Reason not wanted.
    // SAFETY: NULL buffer with length 0 and NULL written are allowed.
    let st = unsafe { attnrt_capability(&odd, 1, 1, 0, ptr::null_mut(), 0, ptr::null_mut()) };
    assert_eq!(st, S::ATTNRT_STATUS_CONFIG);
    // Shapes that overflow.
    assert_eq!(
        // SAFETY: as above.
        unsafe { attnrt_capability(&c, usize::MAX, 2, 0, ptr::null_mut(), 0, ptr::null_mut()) },
        S::ATTNRT_STATUS_INPUT_VALUE
    );
}

#[test]
fn status_values_are_stable() {
    let table = [
        (S::ATTNRT_STATUS_OK, 0),
        (S::ATTNRT_STATUS_NULL_POINTER, 100),
        (S::ATTNRT_STATUS_MISALIGNED_POINTER, 101),
        (S::ATTNRT_STATUS_BAD_ENUM, 102),
        (S::ATTNRT_STATUS_LENGTH_OVERFLOW, 103),
        (S::ATTNRT_STATUS_ALIASED_BUFFERS, 104),
        (S::ATTNRT_STATUS_BAD_BYTES, 105),
        (S::ATTNRT_STATUS_PARALLEL_FOR_CONTRACT, 106),
        (S::ATTNRT_STATUS_TRUNCATED, 107),
        (S::ATTNRT_STATUS_INPUT_SHAPE, 200),
        (S::ATTNRT_STATUS_INPUT_VALUE, 201),
        (S::ATTNRT_STATUS_POSITION_OUT_OF_TABLE, 202),
        (S::ATTNRT_STATUS_WORKSPACE_TOO_SMALL, 203),
        (S::ATTNRT_STATUS_WEIGHT_SHAPE, 204),
        (S::ATTNRT_STATUS_WEIGHT_PRESENCE, 205),
        (S::ATTNRT_STATUS_KV_CACHE_FULL, 206),
        (S::ATTNRT_STATUS_KV_BLOCK, 207),
        (S::ATTNRT_STATUS_CONFIG, 300),
        (S::ATTNRT_STATUS_CONFIG_FLOAT, 301),
        (S::ATTNRT_STATUS_CONFIG_PAIR, 302),
        (S::ATTNRT_STATUS_UNSUPPORTED, 400),
        (S::ATTNRT_STATUS_BACKEND_UNAVAILABLE, 401),
        (S::ATTNRT_STATUS_DEVICE, 500),
        (S::ATTNRT_STATUS_DEVICE_BLAS, 501),
        (S::ATTNRT_STATUS_DEVICE_CAPACITY, 502),
        (S::ATTNRT_STATUS_DEVICE_COLLECTIVE, 503),
        (S::ATTNRT_STATUS_PANIC, 900),
        (S::ATTNRT_STATUS_INTERNAL, 901),
        (S::ATTNRT_STATUS_OUT_OF_MEMORY, 902),
    ];
    for (s, v) in table {
        assert_eq!(s as u32, v);
        let name = status_name(v).unwrap();
        assert_eq!(name, format!("{s:?}"));
    }
    assert_eq!(status_name(1), None);
    assert_eq!(status_name(u32::MAX), None);
    assert_eq!(std::mem::size_of::<attnrt_status>(), 4);
}
