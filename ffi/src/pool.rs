//! The host's thread pool: a C parallel-for callback, a thread count, or the calling thread,
//! seen by the runtime as one [`attnrt::ParallelFor`].

use core::ffi::c_void;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};

use attnrt::{ParallelFor, ScopedThreads, Sequential, ThreadPool};

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

/// Threads a kept pool starts at most: the executor runs at most 64 lanes however wide the
/// pool says it is, so more would only spin.
const KEPT_THREADS_MAX: usize = 64;
/// Idle pools a handle keeps (of the widths its callers asked for, or for callers running at
/// once); a pool given back beyond them is stopped.
const IDLE_MAX: usize = 4;

/// The persistent thread pools of one layer handle that no call is using. A call with
/// `num_threads` > 1 and no host callback takes one (or starts one) for its duration, so the
/// threads of one forward call's phases, and of the next call (a decode loop), are already
/// running: starting threads per phase cost 0.9-1.9 ms per decode step on the Zen 5 pair
/// (runtime `pool` module). Dropping the handle stops and joins them.
#[derive(Debug, Default)]
pub(crate) struct IdlePools(Mutex<Vec<ThreadPool>>);

impl IdlePools {
    /// An idle pool of `threads` threads (at most [`KEPT_THREADS_MAX`]), else a new one; `None`
    /// if the OS refuses to start its threads.
    fn take(&self, threads: usize) -> Option<ThreadPool> {
        let threads = threads.clamp(1, KEPT_THREADS_MAX);
        {
            let mut idle = self.0.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(i) = idle.iter().position(|p| p.threads() == threads) {
                return Some(idle.swap_remove(i));
            }
        }
        ThreadPool::try_new(threads).ok()
    }

    /// Keeps `pool` for a later call; the oldest idle pool is stopped (outside the lock) when
    /// more than [`IDLE_MAX`] would be kept.
    fn give_back(&self, pool: ThreadPool) {
        let evicted = {
            let mut idle = self.0.lock().unwrap_or_else(|e| e.into_inner());
            idle.push(pool);
            (idle.len() > IDLE_MAX).then(|| idle.remove(0))
        };
        drop(evicted);
    }

    /// Pools kept now.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

/// `num_threads` threads for one call: a pool from the handle's [`IdlePools`], taken at the
/// first `run` (a call that runs nothing starts nothing) and given back when the call ends.
/// Scoped threads stand in if the OS refuses to start the pool's threads.
pub(crate) struct KeptThreads<'a> {
    threads: usize,
    home: &'a IdlePools,
    pool: OnceLock<Option<ThreadPool>>,
}

impl ParallelFor for KeptThreads<'_> {
    fn run(&self, n: usize, task: &(dyn Fn(usize) + Sync)) {
        match self.pool.get_or_init(|| self.home.take(self.threads)) {
            Some(pool) => pool.run(n, task),
            None => ScopedThreads {
                threads: self.threads,
            }
            .run(n, task),
        }
    }

    fn width(&self) -> usize {
        crate::backend::lanes(self.threads)
    }
}

impl Drop for KeptThreads<'_> {
    fn drop(&mut self) {
        if let Some(Some(pool)) = self.pool.take() {
            self.home.give_back(pool);
        }
    }
}

/// The pool of one forward call.
pub(crate) enum Pool<'a> {
    /// The calling thread only.
    Sequential(Sequential),
    /// Persistent threads kept by the layer handle.
    Threads(KeptThreads<'a>),
    /// The host's callback.
    Callback(CallbackPool),
}

impl<'a> Pool<'a> {
    /// The pool of a call: the host's callback when given (of width `threads`), else
    /// `threads` threads kept by the handle (`idle`), else the calling thread. Its width is
    /// always [`crate::backend::lanes`]`(threads)`.
    pub fn new(
        callback: crate::layer::attnrt_parallel_for_fn,
        ctx: *mut c_void,
        threads: usize,
        idle: &'a IdlePools,
    ) -> Pool<'a> {
        match callback {
            Some(callback) => Pool::Callback(CallbackPool {
                callback,
                ctx,
                ran: AtomicUsize::new(0),
                requested: AtomicUsize::new(0),
                broken: AtomicBool::new(false),
                width: crate::backend::lanes(threads),
            }),
            None if threads > 1 => Pool::Threads(KeptThreads {
                threads,
                home: idle,
                pool: OnceLock::new(),
            }),
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
        let idle = IdlePools::default();
        let pool = Pool::new(Some(host), core::ptr::null_mut(), 0, &idle);
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

    // Starts threads that spin between calls: not under Miri (its scheduler makes that slow).
    #[test]
    #[cfg_attr(miri, ignore)]
    fn kept_threads_serve_every_run_of_a_call_then_wait_for_the_next() {
        let idle = IdlePools::default();
        let sum_of = |pool: &Pool<'_>, n: usize| {
            let sum = AtomicUsize::new(0);
            pool.as_dyn().run(n, &|i| {
                sum.fetch_add(i + 1, Ordering::Relaxed);
            });
            sum.load(Ordering::Relaxed)
        };
        for _ in 0..3 {
            let pool = Pool::new(None, core::ptr::null_mut(), 2, &idle);
            assert_eq!(sum_of(&pool, 100), 5050);
            assert_eq!(sum_of(&pool, 10), 55);
            assert_eq!(idle.len(), 0, "the call holds its pool");
            drop(pool);
            assert_eq!(
                idle.len(),
                1,
                "given back, and taken again by the next call"
            );
        }
        // Two calls at once each get a pool of their width; both are kept after.
        let a = Pool::new(None, core::ptr::null_mut(), 3, &idle);
        let b = Pool::new(None, core::ptr::null_mut(), 3, &idle);
        assert_eq!((sum_of(&a, 7), sum_of(&b, 7)), (28, 28));
        assert_eq!(idle.len(), 1);
        drop((a, b));
        assert_eq!(idle.len(), 3);
        // A call that runs nothing starts nothing.
        drop(Pool::new(None, core::ptr::null_mut(), 5, &idle));
        assert_eq!(idle.len(), 3);
        // At most IDLE_MAX are kept.
        for threads in 4..10 {
            let p = Pool::new(None, core::ptr::null_mut(), threads, &idle);
            assert_eq!(sum_of(&p, 3), 6);
        }
        assert_eq!(idle.len(), IDLE_MAX);
    }

    #[test]
    fn every_pool_is_as_wide_as_num_threads() {
        // Building a pool starts no thread (a kept pool starts at its first run).
        let idle = IdlePools::default();
        for threads in [0, 1, 2, 3, 64, 1000] {
            let want = crate::backend::lanes(threads);
            assert_eq!(
                Pool::new(None, core::ptr::null_mut(), threads, &idle)
                    .as_dyn()
                    .width(),
                want
            );
            let cb = Pool::new(Some(all), core::ptr::null_mut(), threads, &idle);
            assert_eq!(cb.as_dyn().width(), want);
        }
    }

    #[test]
    fn a_panicking_task_does_not_unwind_into_the_host() {
        let idle = IdlePools::default();
        let pool = Pool::new(Some(all), core::ptr::null_mut(), 0, &idle);
        pool.as_dyn().run(3, &|i| assert!(i != 1, "task 1 fails"));
        let Pool::Callback(p) = &pool else {
            unreachable!()
        };
        assert!(!p.kept_contract());
    }
}
