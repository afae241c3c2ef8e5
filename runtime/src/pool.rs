//! A persistent thread pool for [`ParallelFor`]: workers started once, waiting for work by
//! spinning for a while before they sleep.
//!
//! [`crate::ScopedThreads`] starts its threads on every call. On the Zen 5 pair the second
//! thread of a decode step's attention phase (4-7 ms) then began 0.9-1.9 ms after the first,
//! and at times ran on the same CPU (a virtual machine whose idle CPU sleeps and must be woken
//! by the host; fifteenth session). A server keeps its threads: between the phases of a step
//! (microseconds apart) the workers here are still spinning and start at once.

use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::boxed::Box;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use std::vec::Vec;

use crate::parallel::ParallelFor;

/// How long an idle worker spins (checking for a new job) before it sleeps, unless
/// [`ThreadPool::with_spin`] says otherwise: long enough to span the gaps between the phases of
/// one forward call and between the calls of a decode loop, short enough to give the CPU back
/// soon when the host stops calling.
pub const DEFAULT_SPIN: Duration = Duration::from_millis(5);

/// The task of one [`ParallelFor::run`] call, on the caller's stack.
struct Job<'a> {
    n: usize,
    next: AtomicUsize,
    task: &'a (dyn Fn(usize) + Sync),
}

impl Job<'_> {
    /// Takes task indices until none are left.
    fn work(&self) {
        loop {
            let i = self.next.fetch_add(1, Ordering::Relaxed);
            if i >= self.n {
                break;
            }
            (self.task)(i);
        }
    }
}

/// What the caller and the workers share.
struct Shared {
    /// Bumped once per job, after `job` is set: a worker that sees a new value works on `job`.
    generation: AtomicU64,
    /// The current job, valid while `pending > 0` (see `ThreadPool::run`).
    job: UnsafeCell<*const Job<'static>>,
    /// Workers that have not finished the current job.
    pending: AtomicUsize,
    /// The first panic of a worker's task in the current job, rethrown by the caller.
    panic: Mutex<Option<Box<dyn core::any::Any + Send>>>,
    stop: AtomicBool,
    /// Sleeping workers wait on `wake` (under `sleep`) for a new generation or `stop`.
    sleep: Mutex<()>,
    wake: Condvar,
    spin: Duration,
}

// SAFETY: `job` is written only by the caller holding `ThreadPool::running`, before the
// generation bump that publishes it (release), and read by workers only after seeing that bump
// (acquire) and before they decrement `pending`, which the caller waits for before the next
// write: no write overlaps a read. Every other field is Sync.
unsafe impl Sync for Shared {}
// SAFETY: the only field that is not Send is the job pointer, whose reads and writes are
// ordered as above whichever thread holds the `Shared`; the job it points to is Sync.
unsafe impl Send for Shared {}

/// A [`ParallelFor`] on `threads - 1` persistent worker threads plus the calling thread. Tasks
/// are handed out from a shared counter, so results depend on the work split alone (as with
/// every host). One `run` at a time (concurrent callers wait); a task must not call `run` on
/// the same pool. Dropping the pool stops and joins the workers.
pub struct ThreadPool {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
    running: Mutex<()>,
}

impl ThreadPool {
    /// A pool of `threads` (at least 1; the caller of `run` counts as one) whose idle workers
    /// spin for [`DEFAULT_SPIN`] before sleeping.
    ///
    /// # Panics
    /// If the OS cannot start a thread.
    pub fn new(threads: usize) -> Self {
        Self::with_spin(threads, DEFAULT_SPIN)
    }

    /// [`ThreadPool::new`] with idle workers spinning for `spin` before they sleep (zero: sleep
    /// at once, which costs a wake-up per call).
    ///
    /// # Panics
    /// If the OS cannot start a thread.
    pub fn with_spin(threads: usize, spin: Duration) -> Self {
        Self::try_with_spin(threads, spin).expect("the OS starts a pool thread")
    }

    /// [`ThreadPool::new`], or the OS's error if it cannot start a thread (the workers already
    /// started are stopped and joined).
    pub fn try_new(threads: usize) -> std::io::Result<Self> {
        Self::try_with_spin(threads, DEFAULT_SPIN)
    }

    /// [`ThreadPool::with_spin`], or the OS's error if it cannot start a thread (the workers
    /// already started are stopped and joined).
    pub fn try_with_spin(threads: usize, spin: Duration) -> std::io::Result<Self> {
        let shared = Arc::new(Shared {
            generation: AtomicU64::new(0),
            job: UnsafeCell::new(core::ptr::null()),
            pending: AtomicUsize::new(0),
            panic: Mutex::new(None),
            stop: AtomicBool::new(false),
            sleep: Mutex::new(()),
            wake: Condvar::new(),
            spin,
        });
        // Dropped on an error below: its Drop stops and joins the workers pushed so far.
        let mut pool = ThreadPool {
            shared,
            workers: Vec::new(),
            running: Mutex::new(()),
        };
        for i in 1..threads.max(1) {
            let shared = Arc::clone(&pool.shared);
            let worker = std::thread::Builder::new()
                .name(std::format!("attnrt-pool-{i}"))
                .spawn(move || worker(&shared))?;
            pool.workers.push(worker);
        }
        Ok(pool)
    }

    /// Threads that run tasks, the caller's included.
    pub fn threads(&self) -> usize {
        self.workers.len() + 1
    }
}

/// A worker: waits for each new generation, works on its job, reports done.
fn worker(shared: &Shared) {
    let mut seen = 0u64;
    loop {
        let start = Instant::now();
        let mut spins = 0u32;
        loop {
            if shared.stop.load(Ordering::Acquire) {
                return;
            }
            if shared.generation.load(Ordering::Acquire) != seen {
                break;
            }
            core::hint::spin_loop();
            spins = spins.wrapping_add(1);
            // The clock is read every 1024 spins only (it costs more than a spin).
            if spins.is_multiple_of(1024) && start.elapsed() >= shared.spin {
                let guard = shared.sleep.lock().unwrap_or_else(|e| e.into_inner());
                let _guard = shared
                    .wake
                    .wait_while(guard, |_| {
                        !shared.stop.load(Ordering::Acquire)
                            && shared.generation.load(Ordering::Acquire) == seen
                    })
                    .unwrap_or_else(|e| e.into_inner());
            }
        }
        seen = shared.generation.load(Ordering::Acquire);
        // SAFETY: the generation was bumped after `job` was set (release/acquire above), and
        // the job lives until every worker, this one included, has decremented `pending`.
        let job = unsafe { &**shared.job.get() };
        if let Err(panic) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| job.work())) {
            let mut first = shared.panic.lock().unwrap_or_else(|e| e.into_inner());
            first.get_or_insert(panic);
        }
        shared.pending.fetch_sub(1, Ordering::Release);
    }
}

impl ParallelFor for ThreadPool {
    fn run(&self, n: usize, task: &(dyn Fn(usize) + Sync)) {
        if self.workers.is_empty() || n <= 1 {
            (0..n).for_each(task);
            return;
        }
        let _running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        let job = Job {
            n,
            next: AtomicUsize::new(0),
            task,
        };
        let shared = &*self.shared;
        shared.pending.store(self.workers.len(), Ordering::Relaxed);
        // SAFETY: no worker reads `job` now (the previous job's `pending` reached zero before
        // its `run` returned, and `running` is held); the lifetime is erased because the job
        // outlives every read of it: this function does not return (nor unwind) before
        // `pending` is zero again.
        unsafe {
            *shared.job.get() = (&job as *const Job<'_>).cast::<Job<'static>>();
        }
        {
            // Under the sleep lock, so that a worker between its check and its wait cannot
            // miss the notification.
            let _guard = shared.sleep.lock().unwrap_or_else(|e| e.into_inner());
            shared.generation.fetch_add(1, Ordering::Release);
        }
        shared.wake.notify_all();
        let mine = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| job.work()));
        // Spin while the workers finish their last tasks; yield once that takes longer, so
        // that a worker sharing this CPU (more threads than cores) can run.
        let mut spins = 0u32;
        while shared.pending.load(Ordering::Acquire) != 0 {
            if spins < 1 << 12 {
                core::hint::spin_loop();
                spins += 1;
            } else {
                std::thread::yield_now();
            }
        }
        let theirs = shared
            .panic
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Err(panic) = mine {
            std::panic::resume_unwind(panic);
        }
        if let Some(panic) = theirs {
            std::panic::resume_unwind(panic);
        }
    }

    fn width(&self) -> usize {
        self.threads()
    }
}

impl Drop for ThreadPool {
    fn drop(&mut self) {
        {
            let _guard = self.shared.sleep.lock().unwrap_or_else(|e| e.into_inner());
            self.shared.stop.store(true, Ordering::Release);
        }
        self.shared.wake.notify_all();
        for w in self.workers.drain(..) {
            // A worker never panics outside a task (tasks' panics are caught), so a join error
            // cannot happen; nothing to report from a destructor anyway.
            let _ = w.join();
        }
    }
}

impl core::fmt::Debug for ThreadPool {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("ThreadPool")
            .field("threads", &self.threads())
            .field("spin", &self.shared.spin)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Idle workers' spin in the tests: none under Miri, whose interpreted spin loops would
    /// take minutes of its virtual clock's 5 ms.
    fn spin() -> Duration {
        if cfg!(miri) {
            Duration::ZERO
        } else {
            DEFAULT_SPIN
        }
    }

    #[test]
    fn every_task_runs_once_on_every_call() {
        let threads: &[usize] = if cfg!(miri) { &[1, 3] } else { &[1, 2, 3, 8] };
        for &threads in threads {
            for spin in [Duration::ZERO, spin()] {
                let pool = ThreadPool::with_spin(threads, spin);
                for n in [0usize, 1, 2, 7, 100] {
                    let hits: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
                    pool.run(n, &|i| {
                        hits[i].fetch_add(1, Ordering::Relaxed);
                    });
                    assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1));
                }
            }
        }
    }

    /// Runs two tasks that each wait (up to `wait`) for the other to start: true if they ran
    /// at the same time, which needs two threads.
    fn two_tasks_meet(pool: &ThreadPool, wait: Duration) -> bool {
        let arrived = AtomicUsize::new(0);
        let met = AtomicUsize::new(0);
        pool.run(2, &|_| {
            arrived.fetch_add(1, Ordering::SeqCst);
            let start = Instant::now();
            while start.elapsed() < wait {
                if arrived.load(Ordering::SeqCst) == 2 {
                    met.fetch_add(1, Ordering::SeqCst);
                    return;
                }
                std::thread::sleep(Duration::from_micros(100));
            }
        });
        met.load(Ordering::SeqCst) == 2
    }

    #[test]
    fn workers_share_the_tasks() {
        assert!(two_tasks_meet(
            &ThreadPool::with_spin(2, spin()),
            Duration::from_secs(10)
        ));
        // The check itself fails where there is no second thread.
        let alone = ThreadPool::with_spin(1, Duration::ZERO);
        assert!(!two_tasks_meet(&alone, Duration::from_millis(50)));
    }

    #[test]
    fn a_workers_panic_reaches_the_caller_and_the_pool_goes_on() {
        let pool = ThreadPool::with_spin(2, spin());
        let caller = std::thread::current().id();
        let arrived = AtomicUsize::new(0);
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            pool.run(2, &|_| {
                // Both tasks start before either ends, so one runs on the worker.
                arrived.fetch_add(1, Ordering::SeqCst);
                let start = Instant::now();
                while arrived.load(Ordering::SeqCst) < 2
                    && start.elapsed() < Duration::from_secs(10)
                {
                    std::thread::sleep(Duration::from_micros(100));
                }
                if std::thread::current().id() != caller {
                    panic!("task failed");
                }
            })
        }));
        assert!(result.is_err());
        let count = AtomicUsize::new(0);
        pool.run(10, &|_| {
            count.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(count.load(Ordering::Relaxed), 10);
    }

    #[test]
    fn sleeping_workers_wake_for_the_next_call() {
        let pool = ThreadPool::with_spin(2, Duration::ZERO);
        for _ in 0..3 {
            std::thread::sleep(Duration::from_millis(10));
            assert!(two_tasks_meet(&pool, Duration::from_secs(10)));
        }
    }
}
