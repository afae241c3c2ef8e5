//! Bytes to C ABI calls: one configuration (every field, enums out of range too), weights of
//! random presence, dtype and length, a layer, a capability query, a workspace size and a
//! forward call with random shapes (batch <= 3, seq_len <= 40, n_embd <= 64), mask inputs,
//! positions, tables, buffer lengths (sometimes wrong), NULL or misaligned pointers, aliased
//! buffers, backend, thread count and host callback (sometimes breaking its contract).
//!
//! Checked on every call: no crash, no panic status (`ATTNRT_STATUS_PANIC`) and no internal
//! error; every status is a known one; on any error `out` and `*backend_ran` are untouched
//! (except `ATTNRT_STATUS_PARALLEL_FOR_CONTRACT`, whose output is documented as unspecified);
//! a successful call reports a real backend, the requested one when forced, writes finite
//! values, agrees with the scalar reference, and its capability query says OK.
//!
//! Shared, unchanged, by the libFuzzer target (`ffi/fuzz`, nightly) and the stable corpus
//! replay test (`tests/tests/ffi_fuzz_replay.rs`), so CI replays the corpus without nightly.

use core::ffi::{c_char, c_void};
use core::ptr;
use std::sync::atomic::{AtomicUsize, Ordering};

use attnrt_ffi::*;

/// Output sentinel: a call that fails must leave it.
const SENTINEL: f32 = -7777.25;
/// The most f32 elements any buffer of one input gets.
const MAX_ELEMS: usize = 1 << 22;
/// The most elements a weight tensor gets (the largest valid one has 64 * 16 * 32).
const MAX_WEIGHT: usize = 1 << 16;

/// Reads the fuzz input front to back; zeros once it runs out.
struct Bytes<'a>(&'a [u8]);

impl Bytes<'_> {
    fn u8(&mut self) -> u8 {
        match self.0.split_first() {
            Some((&b, rest)) => {
                self.0 = rest;
                b
            }
            None => 0,
        }
    }
    fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes([self.u8(), self.u8(), self.u8(), self.u8()])
    }
    fn bool(&mut self) -> bool {
        self.u8() & 1 == 1
    }
    /// True with probability about 1/n.
    fn one_in(&mut self, n: u8) -> bool {
        self.u8().is_multiple_of(n)
    }
    /// 0..=max.
    fn upto(&mut self, max: usize) -> usize {
        self.u16() as usize % (max + 1)
    }
    fn pick<T: Copy>(&mut self, xs: &[T]) -> T {
        xs[self.u8() as usize % xs.len()]
    }
    /// Mostly one of `good`, sometimes (1 in 16) one of `bad`.
    fn mostly<T: Copy>(&mut self, good: &[T], bad: &[T]) -> T {
        if self.one_in(16) {
            self.pick(bad)
        } else {
            self.pick(good)
        }
    }
    /// A length near `want` (mostly exact), or any small one.
    fn len_near(&mut self, want: usize) -> usize {
        match self.u8() % 32 {
            0 => want.saturating_sub(1),
            1 => want.saturating_add(1),
            2 => self.upto(200),
            _ => want,
        }
    }
}

/// Deterministic values in [-1, 1).
fn values(n: usize, seed: u32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(2_654_435_761).wrapping_add(0x9e37_79b9) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            (s % 20_000) as f32 / 10_000.0 - 1.0
        })
        .collect()
}

/// One weight tensor as the C caller gives it. Its storage, pushed to `store`, is u32 words (so
/// 4-byte aligned for every dtype) with one spare word for a misaligned view.
fn tensor(
    b: &mut Bytes<'_>,
    want: usize,
    required: bool,
    store: &mut Vec<Vec<u32>>,
) -> attnrt_tensor {
    let absent = attnrt_tensor {
        data: ptr::null(),
        len: b.pick(&[0, 0, 1, 100]), // ignored when data is NULL
        dtype: b.u8() as u32 % 4,
    };
    let present = required != b.one_in(24);
    if !present {
        return absent;
    }
    let dtype = if b.one_in(32) {
        b.u32()
    } else {
        b.u8() as u32 % 3
    };
    let len = b.len_near(want.min(MAX_WEIGHT)).min(MAX_WEIGHT);
    let elem = if dtype == 0 { 4 } else { 2 };
    let vals = values(len, b.u32());
    // One spare word so that a view one byte in stays inside the allocation.
    let mut words = vec![0u32; (len * elem).div_ceil(4) + 1];
    {
        let bytes: &mut [u8] = bytemuck_bytes(&mut words);
        for (i, v) in vals.iter().enumerate() {
            match dtype {
                0 => bytes[4 * i..4 * i + 4].copy_from_slice(&v.to_le_bytes()),
                // f16 and bf16 bits of small values: both finite and modest.
                1 => bytes[2 * i..2 * i + 2].copy_from_slice(&f16_bits(*v).to_le_bytes()),
                _ => bytes[2 * i..2 * i + 2]
                    .copy_from_slice(&((v.to_bits() >> 16) as u16).to_le_bytes()),
            }
        }
    }
    let misaligned = b.one_in(40);
    let base = words.as_ptr().cast::<u8>();
    // SAFETY: the allocation holds one spare word, so one byte in stays inside it (and the
    // library refuses the misaligned pointer before reading).
    let data = if misaligned {
        unsafe { base.add(1) }
    } else {
        base
    };
    let t = attnrt_tensor {
        data: data.cast(),
        len,
        dtype,
    };
    store.push(words);
    t
}

/// The bytes of a u32 buffer (no crate dependency for this one cast).
fn bytemuck_bytes(words: &mut [u32]) -> &mut [u8] {
    let n = words.len() * 4;
    // SAFETY: u8 has no alignment or validity requirement; the byte length is the same
    // allocation's, borrowed mutably for the returned lifetime.
    unsafe { core::slice::from_raw_parts_mut(words.as_mut_ptr().cast::<u8>(), n) }
}

/// IEEE binary16 bits of a value in [-1, 1) (round toward zero; subnormals flushed).
fn f16_bits(v: f32) -> u16 {
    let x = v.to_bits();
    let sign = ((x >> 16) & 0x8000) as u16;
    let exp = ((x >> 23) & 0xff) as i32 - 127 + 15;
    if exp <= 0 {
        return sign;
    }
    sign | ((exp as u16) << 10) | ((x >> 13) & 0x3ff) as u16
}

fn config(b: &mut Bytes<'_>) -> attnrt_config {
    let n_embd = b.mostly(&[8, 16, 32, 48, 64, 24], &[0, 1, 7, 12]);
    let n_head = b.mostly(&[1, 2, 4, 8], &[0, 3, 16]);
    let mut c = std::mem::MaybeUninit::<attnrt_config>::uninit();
    // SAFETY: valid for one write.
    let st = unsafe { attnrt_config_default(n_embd, n_head, c.as_mut_ptr()) };
    check_status(st);
    let mut c = if st == attnrt_status::ATTNRT_STATUS_OK {
        // SAFETY: written by the successful call.
        unsafe { c.assume_init() }
    } else {
        // SAFETY: as above, with a valid configuration.
        let st = unsafe { attnrt_config_default(16, 2, c.as_mut_ptr()) };
        assert_eq!(st, attnrt_status::ATTNRT_STATUS_OK);
        // SAFETY: written by the successful call.
        let mut c = unsafe { c.assume_init() };
        (c.n_embd, c.n_head) = (n_embd, n_head);
        c
    };
    let wild = b.one_in(24);
    if b.bool() {
        c.n_kv_head = if wild {
            b.u32() as usize
        } else {
            b.mostly(&[1, 2, 4], &[8, 0, 3])
        };
    }
    if b.one_in(3) {
        c.head_dim = if wild {
            let any = b.u32() as usize;
            b.pick(&[usize::MAX, 1 << 40, any])
        } else {
            b.mostly(&[2, 4, 6, 8, 16, 32], &[5, 0, 1])
        };
    }
    let flags = b.u8();
    c.bias_q = if flags & 1 != 0 { b.u8() | 1 } else { 0 };
    c.bias_k = flags & 2;
    c.bias_v = flags & 4;
    c.bias_o = flags & 8;
    c.qk_norm = if b.one_in(16) {
        b.u32()
    } else {
        b.u8() as u32 % 3
    };
    c.rmsnorm_eps = b.mostly(
        &[1e-6, 1e-5, 1.0, f32::MIN_POSITIVE],
        &[0.0, -1.0, f32::NAN, f32::INFINITY, 1e30],
    );
    c.sliding_window = match b.u8() % 6 {
        0 => b.upto(45) as i64,
        1 => b.pick(&[0, -2, i64::MIN, i64::MAX, 1]),
        _ => -1,
    };
    c.rope = b.mostly(&[0, 1], &[2, 255]);
    c.rope_convention = if b.one_in(16) {
        b.u32()
    } else {
        b.u8() as u32 % 2
    };
    c.rope_theta = b.mostly(
        &[10000.0, 500000.0, 2.0, 1e300],
        &[1.0, 0.0, -1.0, f64::NAN, f64::INFINITY],
    );
    c.rope_scaling = if b.one_in(16) {
        b.u32()
    } else {
        b.u8() as u32 % 3
    };
    let (good, bad) = ([1.0, 2.0, 4.0, 8.0, 32.0, 0.5, 1e6], [0.0, -1.0, f64::NAN]);
    c.rope_factor = b.mostly(&good, &bad);
    c.rope_low_freq_factor = b.mostly(&good, &bad);
    c.rope_high_freq_factor = b.mostly(&good, &bad);
    c.rope_original_max_position_embeddings = b.mostly(&[8192, 4096, 16, 1], &[0, u32::MAX]);
    c.rope_attention_factor = b.mostly(&good, &bad);
    c.rope_beta_fast = b.mostly(&[32.0, 1.0], &[0.0, -1.0, f64::NAN]);
    c.rope_beta_slow = b.mostly(&[1.0, 32.0], &[0.0, f64::INFINITY, 1e308]);
    c
}

/// The element counts of the ten tensors a configuration expects (best effort; saturating).
fn expected_lens(c: &attnrt_config) -> [usize; 10] {
    let q = c.n_head.saturating_mul(c.head_dim);
    let kv = c.n_kv_head.saturating_mul(c.head_dim);
    let full = c.qk_norm == 2;
    [
        q.saturating_mul(c.n_embd),
        kv.saturating_mul(c.n_embd),
        kv.saturating_mul(c.n_embd),
        c.n_embd.saturating_mul(q),
        q,
        kv,
        kv,
        c.n_embd,
        if full { q } else { c.head_dim },
        if full { kv } else { c.head_dim },
    ]
}

/// Every status the harness must never see.
fn check_status(st: attnrt_status) {
    assert!(
        !attnrt_status_name(st as u32).is_null(),
        "unknown status {}",
        st as u32
    );
    assert_ne!(st, attnrt_status::ATTNRT_STATUS_PANIC, "{}", message());
    assert_ne!(st, attnrt_status::ATTNRT_STATUS_INTERNAL, "{}", message());
}

/// The thread's last error, through a buffer of random-ish size.
fn message() -> String {
    let mut buf = vec![0 as c_char; 1024];
    let mut written = 0usize;
    // SAFETY: buf valid for its length, written for one write.
    let st = unsafe { attnrt_error_message(buf.as_mut_ptr(), buf.len(), &mut written) };
    assert!(matches!(
        st,
        attnrt_status::ATTNRT_STATUS_OK | attnrt_status::ATTNRT_STATUS_TRUNCATED
    ));
    let bytes: Vec<u8> = buf[..written].iter().map(|&c| c as u8).collect();
    String::from_utf8(bytes).expect("UTF-8 message")
}

/// How the test host's parallel-for behaves.
struct Host {
    mode: u8,
    calls: AtomicUsize,
}

/// A host parallel-for on the calling thread: mode 0 keeps the contract; 1 skips the last
/// task, 2 runs each twice, 3 adds index n, 4 runs none.
unsafe extern "C" fn host(ctx: *mut c_void, n: usize, task: attnrt_task_fn, task_ctx: *mut c_void) {
    // SAFETY: ctx is the `Host` this harness passed as `parallel_ctx`, alive for the call.
    let h = unsafe { &*(ctx as *const Host) };
    h.calls.fetch_add(1, Ordering::Relaxed);
    let run = |i: usize| {
        // SAFETY: the library's task and context, during this callback (out-of-contract
        // indices and repeats are documented as detected, not undefined).
        unsafe { task(task_ctx, i) }
    };
    match h.mode {
        1 => (0..n.saturating_sub(1)).for_each(run),
        2 => (0..n).chain(0..n).for_each(run),
        3 => (0..=n).for_each(run),
        4 => {}
        _ => (0..n).for_each(run),
    }
}

/// An optional i32 input: `None`, or values with a length.
type Ints = Option<Vec<i32>>;

fn opt_ptr<T>(v: &Option<Vec<T>>) -> (*const T, usize) {
    v.as_ref()
        .map_or((ptr::null(), 0), |v| (v.as_ptr(), v.len()))
}

/// Runs one fuzz input. Panics (an assertion) on any finding. Returns the forward call's
/// status, or `None` when no layer was made (so no forward call).
pub fn run(data: &[u8]) -> Option<attnrt_status> {
    let mut b = Bytes(data);
    let cfg = config(&mut b);
    let mut store = Vec::new();
    let want = expected_lens(&cfg);
    let needs = [
        true,
        true,
        true,
        true,
        cfg.bias_q != 0,
        cfg.bias_k != 0,
        cfg.bias_v != 0,
        cfg.bias_o != 0,
        cfg.qk_norm == 1 || cfg.qk_norm == 2,
        cfg.qk_norm == 1 || cfg.qk_norm == 2,
    ];
    let mut ts = [attnrt_tensor {
        data: ptr::null(),
        len: 0,
        dtype: 0,
    }; 10];
    for i in 0..10 {
        ts[i] = tensor(&mut b, want[i], needs[i], &mut store);
    }
    let w = attnrt_weights {
        wq: ts[0],
        wk: ts[1],
        wv: ts[2],
        wo: ts[3],
        bq: ts[4],
        bk: ts[5],
        bv: ts[6],
        bo: ts[7],
        q_norm: ts[8],
        k_norm: ts[9],
    };

    let mut layer: *mut attnrt_layer = ptr::null_mut();
    let null_arg = b.u8() % 32;
    let st = {
        let c: *const attnrt_config = if null_arg == 1 { ptr::null() } else { &cfg };
        let wp: *const attnrt_weights = if null_arg == 2 { ptr::null() } else { &w };
        let out: *mut *mut attnrt_layer = if null_arg == 3 {
            ptr::null_mut()
        } else {
            &mut layer
        };
        // SAFETY: each pointer NULL or valid; every tensor valid for its length and dtype.
        unsafe { attnrt_layer_new(c, wp, out) }
    };
    check_status(st);
    assert_eq!(st == attnrt_status::ATTNRT_STATUS_OK, !layer.is_null());
    if st != attnrt_status::ATTNRT_STATUS_OK {
        assert!(!message().is_empty());
    }
    drop(store); // the layer holds its own copy

    // Shapes and the requested backend.
    let batch = b.upto(3);
    let seq_len = b.upto(40);
    let backend = if b.one_in(16) {
        b.u32()
    } else {
        b.u8() as u32 % 4
    };
    let threads = match b.u8() % 16 {
        0 => 65,
        1 => b.pick(&[usize::MAX, 1000]),
        k => (k % 5) as usize,
    };

    // The capability query, with a reason buffer of random size (sometimes NULL).
    {
        let mut reason = vec![0x55 as c_char; b.pick(&[0, 1, 7, 300])];
        let mut written = usize::MAX;
        let rp = if reason.is_empty() {
            ptr::null_mut()
        } else {
            reason.as_mut_ptr()
        };
        let wp: *mut usize = if b.one_in(8) {
            ptr::null_mut()
        } else {
            &mut written
        };
        // SAFETY: valid config; reason NULL with length 0 or valid; written NULL or valid.
        let st = unsafe { attnrt_capability(&cfg, batch, seq_len, backend, rp, reason.len(), wp) };
        check_status(st);
        if !reason.is_empty() && !wp.is_null() {
            assert!(written < reason.len());
            assert_eq!(reason[written], 0);
        }
    }

    if layer.is_null() {
        return None;
    }
    let c = cfg.n_embd;
    let tokens = batch * seq_len;
    let mut ws_len = 0usize;
    // SAFETY: live handle; valid out pointer.
    let st = unsafe { attnrt_workspace_size(layer, batch, seq_len, threads, &mut ws_len) };
    check_status(st);
    if st != attnrt_status::ATTNRT_STATUS_OK {
        ws_len = b.upto(5000);
    }

    // Inputs.
    let x = values(b.len_near(tokens * c).min(MAX_ELEMS), b.u32());
    let seq_lens: Ints = b.bool().then(|| {
        let n = b.len_near(batch);
        (0..n).map(|_| b.upto(seq_len + 2) as i32 - 1).collect()
    });
    let document_ids: Ints = b.one_in(3).then(|| {
        let n = b.len_near(tokens);
        let mut doc = 0i32;
        (0..n)
            .map(|_| {
                match b.u8() % 8 {
                    0 => doc += 1,
                    1 => doc = b.u8() as i32 - 10,
                    _ => {}
                }
                doc
            })
            .collect()
    });
    let cu_seqlens: Ints = b.one_in(3).then(|| {
        let n = b.upto(6);
        let mut v = Vec::with_capacity(n);
        let mut at = 0i32;
        for i in 0..n {
            if i + 1 == n {
                at = seq_len as i32;
            } else if i > 0 {
                at += b.upto(seq_len / 2 + 1) as i32;
            }
            if b.one_in(12) {
                at = b.u16() as i16 as i32; // non-monotone, negative or past T
            }
            v.push(at);
        }
        v
    });
    let max_seqlen = if b.bool() { -1 } else { b.upto(45) as i32 - 2 };
    let position_ids: Ints = b.one_in(3).then(|| {
        let n = b.len_near(tokens);
        let far = b.one_in(6);
        (0..n)
            .map(|i| match b.u8() % 16 {
                0 => -1 - b.upto(3) as i32,
                1 => i32::MAX - b.upto(3) as i32,
                _ if far => 1_000_000 + i as i32,
                _ => b.upto(60) as i32,
            })
            .collect()
    });
    let freqs: Option<Vec<f32>> = b.one_in(4).then(|| {
        let rows = b.upto(64);
        let n = b.len_near(rows * cfg.head_dim.min(64)).min(MAX_ELEMS);
        values(n, 7)
    });
    let ws_n = b.len_near(ws_len.min(MAX_ELEMS)).min(MAX_ELEMS);
    let mut workspace = vec![0.0f32; ws_n + 1];
    let out_n = b.len_near(tokens * c).min(MAX_ELEMS);
    let mut out = vec![SENTINEL; out_n + 1];

    let host_state = Host {
        mode: if b.one_in(4) { b.u8() % 5 } else { 0 },
        calls: AtomicUsize::new(0),
    };
    let use_host = b.one_in(3);

    let mut a = std::mem::MaybeUninit::<attnrt_forward_args>::uninit();
    // SAFETY: valid for one write.
    assert_eq!(
        unsafe { attnrt_forward_args_init(a.as_mut_ptr()) },
        attnrt_status::ATTNRT_STATUS_OK
    );
    // SAFETY: written by the successful call.
    let mut a = unsafe { a.assume_init() };
    a.x = x.as_ptr();
    a.x_len = x.len();
    a.batch = batch;
    a.seq_len = seq_len;
    (a.seq_lens, a.seq_lens_len) = opt_ptr(&seq_lens);
    (a.document_ids, a.document_ids_len) = opt_ptr(&document_ids);
    (a.cu_seqlens, a.cu_seqlens_len) = opt_ptr(&cu_seqlens);
    a.max_seqlen = max_seqlen;
    (a.position_ids, a.position_ids_len) = opt_ptr(&position_ids);
    (a.freqs_cis, a.freqs_cis_len) = opt_ptr(&freqs);
    a.workspace = workspace.as_mut_ptr();
    a.workspace_len = ws_n;
    a.out = out.as_mut_ptr();
    a.out_len = out_n;
    a.backend = backend;
    a.num_threads = threads;
    if use_host {
        a.parallel_for = Some(host);
        a.parallel_ctx = &host_state as *const Host as *mut c_void;
    }
    // Argument-level breakage: NULLs, a stray length, misalignment, aliasing.
    let mut aliased = false;
    let mut null_layer = false;
    let mut null_args = false;
    let mut null_ran = false;
    match b.u8() % 40 {
        0 => a.x = ptr::null(),
        1 => a.out = ptr::null_mut(),
        2 => a.workspace = ptr::null_mut(),
        3 => a.seq_lens_len = a.seq_lens_len.max(1) * (a.seq_lens.is_null() as usize),
        4 => null_layer = true,
        5 => null_args = true,
        6 => null_ran = true,
        7 => {
            // Misaligned x: one byte in (the spare element keeps the range inside x's
            // allocation; the library refuses it before reading).
            // `wrapping_add`: x may be empty (a dangling pointer), and the pointer is never read.
            a.x = x.as_ptr().cast::<u8>().wrapping_add(1).cast();
            a.x_len = x.len().saturating_sub(1);
        }
        8 if ws_n.min(out_n) > 0 => {
            // out inside the workspace.
            a.out = a.workspace;
            a.out_len = ws_n.min(out_n);
            aliased = true;
        }
        9 => a.x_len = usize::MAX / 2, // overflowing byte length: refused before any read
        _ => {}
    }

    let mut ran = u32::MAX;
    let lp = if null_layer {
        ptr::null()
    } else {
        layer.cast_const()
    };
    let ap: *const attnrt_forward_args = if null_args { ptr::null() } else { &a };
    let rp: *mut attnrt_backend = if null_ran {
        ptr::null_mut()
    } else {
        (&mut ran as *mut u32).cast()
    };
    // SAFETY: live handle (or NULL); every buffer valid for its stated length or refused by
    // the library before use (NULL, misaligned, overflowing, aliased); `backend_ran` a u32
    // slot (attnrt_backend is repr(u32)) or NULL; the host keeps or knowingly breaks the
    // parallel-for contract only in the ways the library documents as detected.
    let st = unsafe { attnrt_forward(lp, ap, rp) };
    check_status(st);
    let ok = st == attnrt_status::ATTNRT_STATUS_OK;
    if aliased {
        assert!(!ok, "aliased out and workspace accepted");
    }
    if !ok {
        assert!(!message().is_empty());
        assert_eq!(ran, u32::MAX, "backend_ran written on error {st:?}");
        if st != attnrt_status::ATTNRT_STATUS_PARALLEL_FOR_CONTRACT && !aliased {
            assert!(
                out.iter().all(|v| v.to_bits() == SENTINEL.to_bits()),
                "output written on error {st:?}: {}",
                message()
            );
        }
    } else {
        assert_eq!(message(), "");
        assert!(
            out[out_n].to_bits() == SENTINEL.to_bits(),
            "wrote past out_len"
        );
        let forced = backend == 1 || backend == 2;
        assert!(ran == 1 || ran == 2, "backend_ran {ran}");
        assert!(!forced || ran == backend, "forced {backend}, ran {ran}");
        assert!(backend != 0 || ran == 2, "AUTO ran {ran}");
        assert!(host_state.mode == 0 || host_state.calls.load(Ordering::Relaxed) == 0);
        assert!(
            out[..out_n].iter().all(|v| v.is_finite()),
            "non-finite output: {cfg:?}, batch {batch}, seq_len {seq_len}, backend {backend}"
        );
        // Capability agrees with a successful call.
        // SAFETY: valid config; no reason buffer.
        let cap = unsafe {
            attnrt_capability(
                &cfg,
                batch,
                seq_len,
                backend,
                ptr::null_mut(),
                0,
                ptr::null_mut(),
            )
        };
        assert_eq!(cap, attnrt_status::ATTNRT_STATUS_OK, "capability disagrees");
        if ran == 2 {
            differential(layer, &a, &out[..out_n]);
        }
    }

    // SAFETY: a live handle from attnrt_layer_new, freed once, no call in flight.
    unsafe { attnrt_layer_free(layer) };
    Some(st)
}

/// The same call on the scalar reference (a workspace of its own): within 1e-3 relative.
fn differential(layer: *mut attnrt_layer, a: &attnrt_forward_args, simd: &[f32]) {
    let mut ws_len = 0usize;
    // SAFETY: live handle; valid out pointer.
    let st = unsafe { attnrt_workspace_size(layer, a.batch, a.seq_len, 1, &mut ws_len) };
    assert_eq!(st, attnrt_status::ATTNRT_STATUS_OK);
    let mut ws = vec![0.0f32; ws_len];
    let mut out = vec![SENTINEL; simd.len()];
    let mut r = *a;
    r.backend = 1;
    r.workspace = ws.as_mut_ptr();
    r.workspace_len = ws.len();
    r.out = out.as_mut_ptr();
    r.out_len = out.len();
    r.parallel_for = None;
    r.num_threads = 1;
    let mut ran = u32::MAX;
    // SAFETY: as the call this repeats, with fresh workspace and output of their lengths.
    let st = unsafe { attnrt_forward(layer, &r, (&mut ran as *mut u32).cast()) };
    assert_eq!(
        st,
        attnrt_status::ATTNRT_STATUS_OK,
        "reference refused: {}",
        message()
    );
    let scale = out.iter().fold(1.0f32, |m, v| m.max(v.abs()));
    let err = out
        .iter()
        .zip(simd)
        .fold(0.0f32, |m, (x, y)| m.max((x - y).abs()));
    assert!(
        err <= 1e-3 * scale,
        "cpu simd vs reference: {err} (scale {scale})"
    );
}
