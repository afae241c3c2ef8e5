//! The host's thread pool: a C parallel-for callback, a thread count, or the calling thread,
//! seen by the runtime as one [`attnrt::ParallelFor`].

use core::ffi::c_void;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use attnrt::{ParallelFor, ScopedThreads, Sequential};

use crate::layer::attnrt_task_fn;

/// The runtime's view of the C callback. Counts the tasks run so that a host that skips or
/// repeats one is detected, and catches a panic inside a task so that it never unwinds through
/// the host's C frames.
pub(crate) struct CallbackPool {
    pub callback: unsafe extern "C" fn(*mut c_void, usize, attnrt_task_fn, *mut c_void),
    pub ctx: *mut c_void,
    /// Tasks run, over every `run` of one forward call.
    pub ran: AtomicUsize,
    /// Tasks requested, over every `run` of one forward call.
    pub requested: AtomicUsize,
    /// A task panicked or an index out of range was run.
    pub broken: AtomicBool,
    /// Tasks the host can run at once (`num_threads`, at least 1): the executor's lane count.
    pub width: usize,
}

// SAFETY: the pool only forwards `ctx` to the host's callback, which the host documents as
// callable from the thread that calls `attnrt_forward` (the only thread that calls `run`); the
// counters are atomics.
unsafe impl Sync for CallbackPool {}

/// What the trampoline receives as `task_ctx`.
struct TaskCtx<'a> {
    task: &'a (dyn Fn(usize) + Sync),
    n: usize,
    pool: &'a CallbackPool,
}

/// The `task` function handed to the host: runs task `i` of the current `run`.
///
/// # Safety
/// `task_ctx` must be the pointer the pool passed along with this function, during the
/// callback that received it.
unsafe extern "C" fn trampoline(task_ctx: *mut c_void, i: usize) {
    // SAFETY: the host passes back the `task_ctx` it received, which points to a `TaskCtx`
    // alive until the callback returns (the host must not call `task` after that).
    let t = unsafe { &*(task_ctx as *const TaskCtx<'_>) };
    if i >= t.n {
        // Out of range: not run, and counted as a broken contract below.
        t.pool.broken.store(true, Ordering::Relaxed);
        return;
    }
    if catch_unwind(AssertUnwindSafe(|| (t.task)(i))).is_err() {
        t.pool.broken.store(true, Ordering::Relaxed);
    }
    t.pool.ran.fetch_add(1, Ordering::Relaxed);
}

impl ParallelFor for CallbackPool {
    fn run(&self, n: usize, task: &(dyn Fn(usize) + Sync)) {
        let t = TaskCtx {
            task,
            n,
            pool: self,
        };
        self.requested.fetch_add(n, Ordering::Relaxed);
        // SAFETY: the callback is the host's parallel-for, called with its own context, our
        // trampoline and a pointer to `t`, which outlives the call.
        unsafe {
            (self.callback)(
                self.ctx,
                n,
                trampoline,
                &t as *const TaskCtx<'_> as *mut c_void,
            )
        };
    }

    fn width(&self) -> usize {
        // The host's `num_threads`: the executor sizes per-lane scratch by it, so it must be
        // the value `attnrt_workspace_size` was given, never "unbounded".
        self.width
    }
}

impl CallbackPool {
    /// Whether every requested task ran exactly once and none broken.
    pub fn kept_contract(&self) -> bool {
        !self.broken.load(Ordering::Relaxed)
            && self.ran.load(Ordering::Relaxed) == self.requested.load(Ordering::Relaxed)
    }
}

/// The pool of one forward call.
pub(crate) enum Pool {
    /// The calling thread only.
    Sequential(Sequential),
    /// The runtime's scoped threads.
    Threads(ScopedThreads),
    /// The host's callback.
    Callback(CallbackPool),
}

impl Pool {
    /// The pool of a call: the host's callback when given (of width `threads`), else
    /// `threads` scoped threads, else the calling thread. Its width is always
    /// [`crate::backend::lanes`]`(threads)`.
    pub fn new(
        callback: crate::layer::attnrt_parallel_for_fn,
        ctx: *mut c_void,
        threads: usize,
    ) -> Pool {
        match callback {
            Some(callback) => Pool::Callback(CallbackPool {
                callback,
                ctx,
                ran: AtomicUsize::new(0),
                requested: AtomicUsize::new(0),
                broken: AtomicBool::new(false),
                width: crate::backend::lanes(threads),
            }),
            None if threads > 1 => Pool::Threads(ScopedThreads { threads }),
            None => Pool::Sequential(Sequential),
        }
    }

    pub fn as_dyn(&self) -> &dyn ParallelFor {
        match self {
            Pool::Sequential(p) => p,
            Pool::Threads(p) => p,
            Pool::Callback(p) => p,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A host that runs every task on the calling thread.
    unsafe extern "C" fn all(
        _: *mut c_void,
        n: usize,
        task: attnrt_task_fn,
        task_ctx: *mut c_void,
    ) {
        // SAFETY: the library's task and context, each index once, during this call.
        (0..n).for_each(|i| unsafe { task(task_ctx, i) });
    }

    /// A host that forgets the last task.
    unsafe extern "C" fn skips(_: *mut c_void, n: usize, task: attnrt_task_fn, ctx: *mut c_void) {
        // SAFETY: as above.
        (0..n.saturating_sub(1)).for_each(|i| unsafe { task(ctx, i) });
    }

    /// A host that runs an index out of range.
    unsafe extern "C" fn strays(_: *mut c_void, n: usize, task: attnrt_task_fn, ctx: *mut c_void) {
        // SAFETY: as above (the out-of-range index is refused by the trampoline).
        (0..=n).for_each(|i| unsafe { task(ctx, i) });
    }

    fn run(host: attnrt_task_host) -> (bool, usize) {
        let pool = Pool::new(Some(host), core::ptr::null_mut(), 0);
        let sum = AtomicUsize::new(0);
        pool.as_dyn().run(10, &|i| {
            sum.fetch_add(i + 1, Ordering::Relaxed);
        });
        let Pool::Callback(p) = &pool else {
            unreachable!()
        };
        (p.kept_contract(), sum.load(Ordering::Relaxed))
    }

    type attnrt_task_host = unsafe extern "C" fn(*mut c_void, usize, attnrt_task_fn, *mut c_void);

    #[test]
    fn callback_runs_every_task_and_checks_the_contract() {
        assert_eq!(run(all), (true, 55));
        assert_eq!(run(skips), (false, 45));
        assert_eq!(run(strays), (false, 55));
    }

    #[test]
    fn every_pool_is_as_wide_as_num_threads() {
        for threads in [0, 1, 2, 3, 64, 1000] {
            let want = crate::backend::lanes(threads);
            assert_eq!(
                Pool::new(None, core::ptr::null_mut(), threads)
                    .as_dyn()
                    .width(),
                want
            );
            let cb = Pool::new(Some(all), core::ptr::null_mut(), threads);
            assert_eq!(cb.as_dyn().width(), want);
        }
    }

    #[test]
    fn a_panicking_task_does_not_unwind_into_the_host() {
        let pool = Pool::new(Some(all), core::ptr::null_mut(), 0);
        pool.as_dyn().run(3, &|i| assert!(i != 1, "task 1 fails"));
        let Pool::Callback(p) = &pool else {
            unreachable!()
        };
        assert!(!p.kept_contract());
    }
}
