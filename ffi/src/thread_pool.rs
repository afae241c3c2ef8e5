//! A persistent thread pool the host can hand to any forward call as its parallel-for.
//!
//! Without a callback, `num_threads > 1` starts scoped threads for every call (and every phase
//! of it). A decode step is a few milliseconds, and on a virtual machine the second thread of a
//! phase started up to 1.9 ms late (BENCHMARKS.md, fifteenth session). This pool's workers live
//! until it is freed and spin briefly between calls, so a server's decode loop starts every
//! phase on all its threads at once.

use core::ffi::c_void;

use attnrt::{ParallelFor, ThreadPool};

use crate::error::FfiError;
use crate::layer::attnrt_task_fn;
use crate::panic::guard;
use crate::ptr::{as_ref, check_out, free_boxed, write_out};
use crate::status::attnrt_status;

/// The most threads [`attnrt_thread_pool_new`] starts.
const MAX_THREADS: usize = 1024;

/// A pool of worker threads (opaque). Made by [`attnrt_thread_pool_new`], freed by
/// [`attnrt_thread_pool_free`]; pass [`attnrt_thread_pool_parallel_for`] as a call's
/// `parallel_for` with the handle as its `parallel_ctx` and the pool's thread count as
/// `num_threads`. One call runs on a pool at a time: concurrent calls given the same pool wait
/// for each other (give each calling thread its own pool to run them side by side).
pub struct attnrt_thread_pool {
    pool: ThreadPool,
}

/// Creates a pool of `threads` threads, the calling thread of each forward call counting as
/// one (`threads - 1` workers are started; 0 counts as 1). Idle workers spin for 5 ms after a
/// call, then sleep until the next one.
///
/// On success `*out` receives the handle; on error it is untouched. Errors:
/// `ATTNRT_STATUS_NULL_POINTER`, `ATTNRT_STATUS_CONFIG` (more than 1024 threads),
/// `ATTNRT_STATUS_OUT_OF_MEMORY` (the OS would not start a thread).
///
/// # Safety
/// `out` must be NULL or valid for one write.
#[no_mangle]
pub unsafe extern "C" fn attnrt_thread_pool_new(
    threads: usize,
    out: *mut *mut attnrt_thread_pool,
) -> attnrt_status {
    guard(|| {
        check_out("out", out)?;
        if threads > MAX_THREADS {
            return Err(FfiError::new(
                attnrt_status::ATTNRT_STATUS_CONFIG,
                format!("threads = {threads}: a pool has at most {MAX_THREADS}"),
            ));
        }
        let pool = ThreadPool::try_new(threads.max(1)).map_err(|e| {
            FfiError::new(
                attnrt_status::ATTNRT_STATUS_OUT_OF_MEMORY,
                format!("cannot start a pool thread: {e}"),
            )
        })?;
        let handle = Box::new(attnrt_thread_pool { pool });
        // SAFETY: checked by `check_out`; valid by the contract.
        unsafe { write_out(out, Box::into_raw(handle)) };
        Ok(())
    })
}

/// Stops and joins the workers of a pool made by [`attnrt_thread_pool_new`]. NULL is a no-op.
///
/// Every call using `pool` must have returned, and none may start after; never twice.
///
/// # Safety
/// `pool` must be NULL or a handle from [`attnrt_thread_pool_new`] not yet freed.
#[no_mangle]
pub unsafe extern "C" fn attnrt_thread_pool_free(pool: *mut attnrt_thread_pool) {
    let _ = guard(|| {
        // SAFETY: NULL or a live handle made by `Box::into_raw`, whose every use the caller
        // gives up (this function's contract).
        unsafe { free_boxed(pool) };
        Ok(())
    });
}

/// The task context sent to the workers: the library's `task_ctx`, which its contract lets
/// any thread use during the parallel-for.
struct TaskCtx(*mut c_void);
// SAFETY: `attnrt_task_fn` may be called from any thread with its `task_ctx` while the
// parallel-for runs (the contract of `attnrt_parallel_for_fn`), which is when the workers use it.
unsafe impl Sync for TaskCtx {}

impl TaskCtx {
    /// The context (a method, so that closures capture the whole `Sync` wrapper).
    fn get(&self) -> *mut c_void {
        self.0
    }
}

/// An `attnrt_parallel_for_fn` that runs the tasks on the pool `ctx` (an `attnrt_thread_pool`
/// handle) and the calling thread. Set it as a call's `parallel_for` with the handle as
/// `parallel_ctx`. A NULL `ctx` runs every task on the calling thread.
///
/// # Safety
/// `ctx` must be NULL or a live pool handle, not freed before this returns; `task` and
/// `task_ctx` are the library's (the contract of `attnrt_parallel_for_fn`).
#[no_mangle]
pub unsafe extern "C" fn attnrt_thread_pool_parallel_for(
    ctx: *mut c_void,
    n: usize,
    task: attnrt_task_fn,
    task_ctx: *mut c_void,
) {
    let t = TaskCtx(task_ctx);
    let run = |i: usize| {
        // SAFETY: the library's task with its own context, called once per index during
        // this parallel-for (the pool runs each index exactly once and returns after all).
        unsafe { task(t.get(), i) }
    };
    // The library's tasks catch their own panics; should the pool panic regardless, every
    // task has returned by then (`ThreadPool::run` waits for its workers before unwinding),
    // and the library detects unrun tasks: nothing may unwind into the host's C frames.
    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        // SAFETY: NULL or a live handle (this function's contract).
        match unsafe { as_ref("ctx", ctx.cast_const().cast::<attnrt_thread_pool>()) } {
            Ok(handle) => handle.pool.run(n, &run),
            Err(_) => (0..n).for_each(run),
        }
    }));
}
