//! One layer handle shared by many threads, and the host thread-pool hooks (a parallel-for
//! callback, a thread count), all through the C ABI only.
//!
//! The SIMD executor (AUTO) splits every phase into work units handed out through atomics, so
//! its output is bitwise the same for any thread count and for the host's callback. A host
//! callback that breaks its contract (skips, repeats or invents a task index) gets
//! `ATTNRT_STATUS_PARALLEL_FOR_CONTRACT`, never undefined behaviour, and the layer stays usable.

use std::ffi::c_void;
use std::sync::atomic::{AtomicUsize, Ordering};

use attnrt_ffi::*;
use attnrt_tests::ffi_harness::{
    c_config, c_weights, forward, last_error, CallBuffers, LayerHandle,
};
use attnrt_tests::{fixtures_dir, load, load_all, max_abs_diff, F32_TOL};

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

const SIMD: u32 = attnrt_backend::ATTNRT_BACKEND_CPU_SIMD as u32;

#[test]
fn eight_threads_share_one_layer_handle() {
    let f = load(&fixtures_dir().join("everything.safetensors"));
    let layer = LayerHandle::new(&c_config(&f.cfg), &c_weights(&f));
    let mut base = CallBuffers::of(&f, &layer);
    let (st, ran) = forward(&layer, &base.args());
    assert_eq!((st, ran), (attnrt_status::ATTNRT_STATUS_OK, SIMD));
    assert!(max_abs_diff(&base.out, &f.expected) <= F32_TOL);
    let expected = bits(&base.out);
    std::thread::scope(|s| {
        for t in 0..8 {
            let (layer, f, expected) = (&layer, &f, &expected);
            s.spawn(move || {
                for i in 0..25 {
                    // Every other call on its own thread uses the runtime's scoped threads.
                    let threads = if i % 2 == 0 { 1 } else { 3 };
                    let mut call = CallBuffers::with_threads(f, layer, threads);
                    let (st, ran) = forward(layer, &call.args());
                    assert_eq!(
                        st,
                        attnrt_status::ATTNRT_STATUS_OK,
                        "thread {t}: {}",
                        last_error()
                    );
                    assert_eq!(ran, SIMD);
                    assert_eq!(&bits(&call.out), expected, "thread {t} call {i} differs");
                }
            });
        }
    });
}

/// How a test host misbehaves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Sloppy {
    /// Keeps the contract.
    No,
    /// Never runs the last task of a call.
    SkipsLast,
    /// Runs every task twice.
    RunsTwice,
    /// Also runs index `n`.
    StrayIndex,
    /// Runs nothing.
    RunsNone,
}

/// The host's pool: its worker count, its manners, and what it was asked and ran.
struct HostPool {
    workers: usize,
    sloppy: Sloppy,
    calls: AtomicUsize,
    requested: AtomicUsize,
    tasks: AtomicUsize,
    widest: AtomicUsize,
}

impl HostPool {
    fn new(workers: usize, sloppy: Sloppy) -> HostPool {
        HostPool {
            workers,
            sloppy,
            calls: AtomicUsize::new(0),
            requested: AtomicUsize::new(0),
            tasks: AtomicUsize::new(0),
            widest: AtomicUsize::new(0),
        }
    }

    /// Sets the callback and its context in `args`; `num_threads` is the host's width.
    fn attach(&self, args: &mut attnrt_forward_args) {
        args.parallel_for = Some(host_parallel_for);
        args.parallel_ctx = self as *const HostPool as *mut c_void;
    }
}

/// A host parallel-for in the shape of the C callback: runs the tasks on `workers` scoped
/// threads taking indices from a counter (with the pool's sloppiness).
unsafe extern "C" fn host_parallel_for(
    ctx: *mut c_void,
    n: usize,
    task: attnrt_task_fn,
    task_ctx: *mut c_void,
) {
    // SAFETY: ctx is the `HostPool` the test passed as `parallel_ctx`.
    let pool = unsafe { &*(ctx as *const HostPool) };
    pool.calls.fetch_add(1, Ordering::Relaxed);
    pool.requested.fetch_add(n, Ordering::Relaxed);
    pool.widest.fetch_max(n, Ordering::Relaxed);
    let indices: Vec<usize> = match pool.sloppy {
        Sloppy::No => (0..n).collect(),
        Sloppy::SkipsLast => (0..n.saturating_sub(1)).collect(),
        Sloppy::RunsTwice => (0..n).chain(0..n).collect(),
        Sloppy::StrayIndex => (0..=n).collect(),
        Sloppy::RunsNone => Vec::new(),
    };
    let next = AtomicUsize::new(0);
    let task_ctx = task_ctx as usize; // sent to the workers as an address
    std::thread::scope(|s| {
        for _ in 0..pool.workers {
            s.spawn(|| loop {
                let k = next.fetch_add(1, Ordering::Relaxed);
                let Some(&i) = indices.get(k) else { break };
                // SAFETY: the library's task with its context, before this callback returns
                // (the sloppy variants break only the "exactly once, i < n" part, which the
                // library documents as detected, not undefined).
                unsafe { task(task_ctx as *mut c_void, i) };
                pool.tasks.fetch_add(1, Ordering::Relaxed);
            });
        }
    });
}

#[test]
fn cpu_simd_is_bitwise_identical_for_1_2_3_threads_and_the_host_callback() {
    let mut callback_tasks = 0;
    for f in load_all() {
        let layer = LayerHandle::new(&c_config(&f.cfg), &c_weights(&f));
        let mut base = CallBuffers::with_threads(&f, &layer, 1);
        let (st, ran) = forward(&layer, &base.args());
        assert_eq!(
            (st, ran),
            (attnrt_status::ATTNRT_STATUS_OK, SIMD),
            "{}",
            f.name
        );
        assert!(
            max_abs_diff(&base.out, &f.expected) <= F32_TOL,
            "{}",
            f.name
        );
        for threads in [0, 2, 3] {
            let mut th = CallBuffers::with_threads(&f, &layer, threads);
            let (st, ran) = forward(&layer, &th.args());
            assert_eq!(
                (st, ran),
                (attnrt_status::ATTNRT_STATUS_OK, SIMD),
                "{}",
                f.name
            );
            assert_eq!(
                bits(&th.out),
                bits(&base.out),
                "{}: {threads} threads",
                f.name
            );
        }
        // The host's callback, as wide as it says (num_threads), with more or fewer workers.
        for (width, workers) in [(1, 1), (4, 4), (3, 2)] {
            let host = HostPool::new(workers, Sloppy::No);
            let mut cb = CallBuffers::with_threads(&f, &layer, width);
            let mut args = cb.args();
            host.attach(&mut args);
            let (st, ran) = forward(&layer, &args);
            assert_eq!(
                (st, ran),
                (attnrt_status::ATTNRT_STATUS_OK, SIMD),
                "{}: {}",
                f.name,
                last_error()
            );
            assert_eq!(
                bits(&cb.out),
                bits(&base.out),
                "{}: callback {width}",
                f.name
            );
            let (calls, tasks) = (host.calls.into_inner(), host.tasks.into_inner());
            assert!(
                calls > 0 && tasks > 0,
                "{}: the callback was not used",
                f.name
            );
            assert_eq!(tasks, host.requested.into_inner());
            assert!(
                host.widest.into_inner() <= width,
                "{}: wider than num_threads",
                f.name
            );
            callback_tasks += tasks;
        }
    }
    println!("host callback ran {callback_tasks} tasks over every fixture");
}

#[test]
fn the_reference_backend_never_calls_the_host() {
    let f = load(&fixtures_dir().join("varlen.safetensors"));
    let layer = LayerHandle::new(&c_config(&f.cfg), &c_weights(&f));
    let host = HostPool::new(2, Sloppy::No);
    let mut cb = CallBuffers::with_threads(&f, &layer, 2);
    let mut args = cb.args();
    host.attach(&mut args);
    args.backend = attnrt_backend::ATTNRT_BACKEND_REFERENCE as u32;
    let (st, ran) = forward(&layer, &args);
    assert_eq!(st, attnrt_status::ATTNRT_STATUS_OK, "{}", last_error());
    assert_eq!(ran, attnrt_backend::ATTNRT_BACKEND_REFERENCE as u32);
    assert_eq!(host.calls.into_inner(), 0);
    assert!(max_abs_diff(&cb.out, &f.expected) <= F32_TOL);
}

/// The contract: a host that skips, repeats or invents a task gets PARALLEL_FOR_CONTRACT
/// (whatever the executor made of it), `backend_ran` is not written, nothing crashes, and the
/// next well-behaved call on the same handle is bitwise the expected output.
#[test]
fn a_sloppy_host_gets_parallel_for_contract() {
    let f = load(&fixtures_dir().join("everything.safetensors"));
    let layer = LayerHandle::new(&c_config(&f.cfg), &c_weights(&f));
    let mut base = CallBuffers::of(&f, &layer);
    assert_eq!(
        forward(&layer, &base.args()).0,
        attnrt_status::ATTNRT_STATUS_OK
    );
    for sloppy in [
        Sloppy::SkipsLast,
        Sloppy::RunsTwice,
        Sloppy::StrayIndex,
        Sloppy::RunsNone,
    ] {
        for width in [1, 3] {
            let host = HostPool::new(2, sloppy);
            let mut cb = CallBuffers::with_threads(&f, &layer, width);
            let mut args = cb.args();
            host.attach(&mut args);
            let (st, ran) = forward(&layer, &args);
            let msg = last_error();
            println!("{sloppy:?} width {width}: {st:?}: {msg}");
            assert_eq!(
                st,
                attnrt_status::ATTNRT_STATUS_PARALLEL_FOR_CONTRACT,
                "{sloppy:?} width {width}: {msg}"
            );
            assert_eq!(ran, u32::MAX, "backend_ran written on error");
            assert!(msg.contains("parallel_for"), "{msg}");
            assert!(host.calls.into_inner() > 0);

            let good = HostPool::new(2, Sloppy::No);
            let mut again = CallBuffers::with_threads(&f, &layer, width);
            let mut args = again.args();
            good.attach(&mut args);
            assert_eq!(forward(&layer, &args).0, attnrt_status::ATTNRT_STATUS_OK);
            assert_eq!(bits(&again.out), bits(&base.out));
        }
    }
}

/// `num_threads` sizes the SIMD executor's per-lane scratch: a workspace sized for fewer
/// threads than the call uses is refused up front (output untouched), one sized for the call
/// works, and sizes stop growing at 64 lanes.
#[test]
fn workspace_size_follows_num_threads() {
    let f = load(&fixtures_dir().join("gqa_rope.safetensors"));
    let layer = LayerHandle::new(&c_config(&f.cfg), &c_weights(&f));
    let (b, t) = (f.inputs.batch, f.inputs.seq_len);
    let size = |n| layer.workspace_size(b, t, n);
    assert_eq!(size(0), size(1));
    assert!(size(1) < size(2) && size(2) < size(4));
    assert_eq!(size(64), size(65));
    assert_eq!(size(64), size(usize::MAX));

    let mut short = CallBuffers::with_threads(&f, &layer, 1);
    short.num_threads = 4;
    let (st, ran) = forward(&layer, &short.args());
    assert_eq!(
        st,
        attnrt_status::ATTNRT_STATUS_WORKSPACE_TOO_SMALL,
        "{}",
        last_error()
    );
    assert_eq!(ran, u32::MAX);
    assert!(short
        .out
        .iter()
        .all(|v| v.to_bits() == attnrt_tests::ffi_harness::SENTINEL.to_bits()));
    // The same buffers on one thread, or forced onto the reference, are enough.
    let mut args = short.args();
    args.backend = attnrt_backend::ATTNRT_BACKEND_REFERENCE as u32;
    assert_eq!(forward(&layer, &args).0, attnrt_status::ATTNRT_STATUS_OK);
    short.num_threads = 1;
    assert_eq!(
        forward(&layer, &short.args()).0,
        attnrt_status::ATTNRT_STATUS_OK
    );

    // A huge thread count works with the workspace it asked for (64 lanes, few threads).
    let mut many = CallBuffers::with_threads(&f, &layer, 1000);
    let (st, ran) = forward(&layer, &many.args());
    assert_eq!(
        (st, ran),
        (attnrt_status::ATTNRT_STATUS_OK, SIMD),
        "{}",
        last_error()
    );
    assert!(max_abs_diff(&many.out, &f.expected) <= F32_TOL);
}

/// A pool handle made through the ABI, freed on drop.
struct PoolHandle(*mut attnrt_thread_pool);

impl PoolHandle {
    fn new(threads: usize) -> PoolHandle {
        let mut p = std::ptr::null_mut();
        // SAFETY: `p` is valid for one write.
        let st = unsafe { attnrt_thread_pool_new(threads, &mut p) };
        assert_eq!(st, attnrt_status::ATTNRT_STATUS_OK, "{}", last_error());
        assert!(!p.is_null());
        PoolHandle(p)
    }

    /// Makes `args` run on this pool, `threads` wide.
    fn attach(&self, args: &mut attnrt_forward_args) {
        args.parallel_for = Some(attnrt_thread_pool_parallel_for);
        args.parallel_ctx = self.0.cast();
    }
}

impl Drop for PoolHandle {
    fn drop(&mut self) {
        // SAFETY: a live handle from attnrt_thread_pool_new, freed once, no call running.
        unsafe { attnrt_thread_pool_free(self.0) };
    }
}

#[test]
fn the_librarys_thread_pool_gives_the_same_bits_over_many_calls() {
    for f in load_all() {
        let layer = LayerHandle::new(&c_config(&f.cfg), &c_weights(&f));
        let mut base = CallBuffers::with_threads(&f, &layer, 1);
        let (st, _) = forward(&layer, &base.args());
        assert_eq!(st, attnrt_status::ATTNRT_STATUS_OK, "{}", f.name);
        for threads in [0usize, 1, 2, 3] {
            let pool = PoolHandle::new(threads);
            // The same pool for several calls: its workers outlive each one.
            for call in 0..3 {
                let mut c = CallBuffers::with_threads(&f, &layer, threads);
                let mut args = c.args();
                pool.attach(&mut args);
                let (st, ran) = forward(&layer, &args);
                assert_eq!(
                    (st, ran),
                    (attnrt_status::ATTNRT_STATUS_OK, SIMD),
                    "{}: {threads} threads, call {call}: {}",
                    f.name,
                    last_error()
                );
                assert_eq!(
                    bits(&c.out),
                    bits(&base.out),
                    "{}: pool of {threads}, call {call}",
                    f.name
                );
            }
        }
    }
}

#[test]
fn the_thread_pool_runs_every_task_once_and_refuses_bad_arguments() {
    unsafe extern "C" fn count(task_ctx: *mut c_void, i: usize) {
        // SAFETY: task_ctx is the test's counter array, which outlives the parallel-for.
        let hits = unsafe { &*(task_ctx as *const Vec<AtomicUsize>) };
        hits[i].fetch_add(1, Ordering::Relaxed);
    }
    let pool = PoolHandle::new(4);
    for ctx in [pool.0.cast::<c_void>(), std::ptr::null_mut()] {
        for n in [0usize, 1, 5, 100] {
            let hits: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
            // SAFETY: a live pool (or NULL), the counter task with its context.
            unsafe {
                attnrt_thread_pool_parallel_for(ctx, n, count, &hits as *const _ as *mut c_void)
            };
            assert!(
                hits.iter().all(|h| h.load(Ordering::Relaxed) == 1),
                "n = {n}"
            );
        }
    }
    let mut p = std::ptr::null_mut();
    // SAFETY: `p` is valid for one write; NULL `out` is refused before any write.
    unsafe {
        assert_eq!(
            attnrt_thread_pool_new(2, std::ptr::null_mut()),
            attnrt_status::ATTNRT_STATUS_NULL_POINTER
        );
        assert_eq!(
            attnrt_thread_pool_new(1025, &mut p),
            attnrt_status::ATTNRT_STATUS_CONFIG
        );
        assert!(p.is_null());
        attnrt_thread_pool_free(std::ptr::null_mut());
    }
}

/// Benchmark, not a check (`cargo test --release -p attnrt-tests --test ffi_threads --
/// --ignored --nocapture`): median time of a one-token forward (a decode step's projections
/// and attention over one token) through the C ABI on one thread, with `num_threads = 2`
/// (threads the layer handle keeps between calls), and with a host callback that starts two
/// threads per parallel phase (what `num_threads` did before). Ratios are against one thread
/// in the same run.
#[test]
#[ignore]
fn one_token_calls_timing() {
    let cfg = attnrt::Config::new(1024, 16)
        .with_kv_heads(4)
        .with_head_dim(64);
    let m = attnrt_tests::ffi_harness::RandomLayer::new(cfg, 1);
    let x = vec![0.1f32; cfg.n_embd];
    let host = HostPool::new(2, Sloppy::No);
    let mut medians = Vec::new();
    for (name, threads, callback) in [
        ("1 thread", 1, false),
        ("num_threads = 2 (kept threads)", 2, false),
        ("host callback, 2 threads started per phase", 2, true),
    ] {
        let mut ws = vec![0.0; m.layer.workspace_size(1, 1, threads)];
        let mut out = vec![0.0; x.len()];
        let mut a = std::mem::MaybeUninit::uninit();
        // SAFETY: valid for one write.
        let st = unsafe { attnrt_forward_args_init(a.as_mut_ptr()) };
        assert_eq!(st, attnrt_status::ATTNRT_STATUS_OK);
        // SAFETY: written by the successful call.
        let mut a: attnrt_forward_args = unsafe { a.assume_init() };
        (a.x, a.x_len, a.batch, a.seq_len) = (x.as_ptr(), x.len(), 1, 1);
        (a.workspace, a.workspace_len) = (ws.as_mut_ptr(), ws.len());
        (a.out, a.out_len) = (out.as_mut_ptr(), out.len());
        (a.num_threads, a.backend) = (threads, SIMD);
        if callback {
            host.attach(&mut a);
        }
        let mut us: Vec<f64> = (0..201)
            .map(|_| {
                let start = std::time::Instant::now();
                let (st, _) = forward(&m.layer, &a);
                assert_eq!(st, attnrt_status::ATTNRT_STATUS_OK, "{}", last_error());
                start.elapsed().as_secs_f64() * 1e6
            })
            .collect();
        us.sort_by(f64::total_cmp);
        medians.push(us[100]);
        println!(
            "{name}: median {:.0} us per call ({:.2}x one thread)",
            us[100],
            medians[0] / us[100]
        );
    }
}
