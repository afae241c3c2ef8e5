//! One layer handle shared by many threads, and the host thread-pool hooks (a parallel-for
//! callback, a thread count), all through the C ABI only.

use std::ffi::c_void;
use std::sync::atomic::{AtomicUsize, Ordering};

use attnrt_ffi::*;
use attnrt_tests::ffi_harness::{
    c_config, c_weights, forward, last_error, CallBuffers, LayerHandle,
};
use attnrt_tests::{fixtures_dir, load, max_abs_diff, F32_TOL};

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

#[test]
fn eight_threads_share_one_layer_handle() {
    let f = load(&fixtures_dir().join("everything.safetensors"));
    let layer = LayerHandle::new(&c_config(&f.cfg), &c_weights(&f));
    let mut base = CallBuffers::of(&f, &layer);
    assert_eq!(
        forward(&layer, &base.args()).0,
        attnrt_status::ATTNRT_STATUS_OK
    );
    assert!(max_abs_diff(&base.out, &f.expected) <= F32_TOL);
    let expected = bits(&base.out);
    std::thread::scope(|s| {
        for t in 0..8 {
            let (layer, f, expected) = (&layer, &f, &expected);
            s.spawn(move || {
                for i in 0..25 {
                    let mut call = CallBuffers::of(f, layer);
                    // Every other call on its own thread uses the runtime's scoped threads.
                    let mut args = call.args();
                    args.num_threads = if i % 2 == 0 { 1 } else { 3 };
                    let (st, ran) = forward(layer, &args);
                    assert_eq!(
                        st,
                        attnrt_status::ATTNRT_STATUS_OK,
                        "thread {t}: {}",
                        last_error()
                    );
                    assert_eq!(ran, attnrt_backend::ATTNRT_BACKEND_REFERENCE as u32);
                    assert_eq!(&bits(&call.out), expected, "thread {t} call {i} differs");
                }
            });
        }
    });
}

/// The host's pool state: how many parallel-for calls and tasks it ran.
#[derive(Default)]
struct HostPool {
    calls: AtomicUsize,
    tasks: AtomicUsize,
}

/// A host parallel-for in the shape of the C callback: runs the tasks on 4 scoped threads.
unsafe extern "C" fn host_parallel_for(
    ctx: *mut c_void,
    n: usize,
    task: attnrt_task_fn,
    task_ctx: *mut c_void,
) {
    // SAFETY: ctx is the `HostPool` the test passed as `parallel_ctx`.
    let pool = unsafe { &*(ctx as *const HostPool) };
    pool.calls.fetch_add(1, Ordering::Relaxed);
    let next = AtomicUsize::new(0);
    let task_ctx = task_ctx as usize; // sent to the workers as an address
    std::thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    break;
                }
                // SAFETY: the library's task with its context, each i exactly once, before
                // this callback returns.
                unsafe { task(task_ctx as *mut c_void, i) };
                pool.tasks.fetch_add(1, Ordering::Relaxed);
            });
        }
    });
}

#[test]
fn parallel_for_callback_and_thread_count_give_the_same_output() {
    for name in ["everything", "varlen", "padding", "gqa_rope"] {
        let f = load(&fixtures_dir().join(format!("{name}.safetensors")));
        let layer = LayerHandle::new(&c_config(&f.cfg), &c_weights(&f));
        let mut base = CallBuffers::of(&f, &layer);
        assert_eq!(
            forward(&layer, &base.args()).0,
            attnrt_status::ATTNRT_STATUS_OK
        );

        let host = HostPool::default();
        let mut cb = CallBuffers::of(&f, &layer);
        let mut args = cb.args();
        args.parallel_for = Some(host_parallel_for);
        args.parallel_ctx = &host as *const HostPool as *mut c_void;
        args.num_threads = 16; // ignored when a callback is given
        let (st, ran) = forward(&layer, &args);
        assert_eq!(
            st,
            attnrt_status::ATTNRT_STATUS_OK,
            "{name}: {}",
            last_error()
        );
        assert_eq!(ran, attnrt_backend::ATTNRT_BACKEND_REFERENCE as u32);
        assert_eq!(
            bits(&cb.out),
            bits(&base.out),
            "{name}: callback path differs"
        );
        // Whatever the executor split, each parallel-for call ran all its tasks (the scalar
        // reference runs on the calling thread and may not call the hook at all).
        println!(
            "{name}: host parallel_for called {} times, {} tasks",
            host.calls.load(Ordering::Relaxed),
            host.tasks.load(Ordering::Relaxed)
        );

        let mut th = CallBuffers::of(&f, &layer);
        let mut args = th.args();
        args.num_threads = 4;
        assert_eq!(forward(&layer, &args).0, attnrt_status::ATTNRT_STATUS_OK);
        assert_eq!(
            bits(&th.out),
            bits(&base.out),
            "{name}: num_threads path differs"
        );
    }
}
