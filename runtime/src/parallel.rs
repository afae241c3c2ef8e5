//! The parallel-for the host supplies: the runtime never starts threads of its own.

/// Runs `n` independent tasks, each exactly once, in any order and on any threads, and returns
/// when all are done. Executors split work so that results do not depend on the order.
pub trait ParallelFor: Sync {
    /// Calls `task(i)` for every `i in 0..n`.
    fn run(&self, n: usize, task: &(dyn Fn(usize) + Sync));

    /// How many tasks may usefully run at once (a hint for splitting work).
    fn width(&self) -> usize {
        1
    }
}

/// Runs every task on the calling thread, in order.
#[derive(Clone, Copy, Debug, Default)]
pub struct Sequential;

impl ParallelFor for Sequential {
    fn run(&self, n: usize, task: &(dyn Fn(usize) + Sync)) {
        (0..n).for_each(task);
    }
}

/// A ready parallel-for on `std::thread::scope`: `threads` workers take task indices from a
/// shared counter.
#[cfg(feature = "std")]
#[derive(Clone, Copy, Debug)]
pub struct ScopedThreads {
    /// Number of threads, at least 1 (the caller's thread counts as one).
    pub threads: usize,
}

#[cfg(feature = "std")]
impl ParallelFor for ScopedThreads {
    fn run(&self, n: usize, task: &(dyn Fn(usize) + Sync)) {
        use core::sync::atomic::{AtomicUsize, Ordering};
        let next = AtomicUsize::new(0);
        let work = || loop {
            let i = next.fetch_add(1, Ordering::Relaxed);
            if i >= n {
                break;
            }
            task(i);
        };
        let extra = self.threads.max(1).min(n.max(1)) - 1;
        std::thread::scope(|s| {
            let workers: std::vec::Vec<_> = (0..extra).map(|_| s.spawn(work)).collect();
            work();
            // Join each worker: the scope's implicit end waits only for the closures, so the
            // OS threads (still running thread-local destructors) could outlive `run`.
            for w in workers {
                if let Err(panic) = w.join() {
                    std::panic::resume_unwind(panic);
                }
            }
        });
    }

    fn width(&self) -> usize {
        self.threads.max(1)
    }
}

#[cfg(all(test, feature = "std"))]
mod tests {
    use super::*;
    use core::sync::atomic::{AtomicUsize, Ordering};

    static STARTED: AtomicUsize = AtomicUsize::new(0);
    static EXITED: AtomicUsize = AtomicUsize::new(0);

    struct CountsExit;
    impl Drop for CountsExit {
        fn drop(&mut self) {
            EXITED.fetch_add(1, Ordering::SeqCst);
        }
    }
    std::thread_local!(static MARK: CountsExit = {
        STARTED.fetch_add(1, Ordering::SeqCst);
        CountsExit
    });

    #[test]
    fn scoped_threads_are_gone_when_run_returns() {
        let main = std::thread::current().id();
        for _ in 0..20 {
            ScopedThreads { threads: 4 }.run(8, &|_| {
                if std::thread::current().id() != main {
                    MARK.with(|_| {}); // a thread-local destructor on every worker
                }
                std::thread::sleep(std::time::Duration::from_millis(1));
            });
            // Every worker has run its thread-local destructors: none outlives `run`.
            assert_eq!(
                EXITED.load(Ordering::SeqCst),
                STARTED.load(Ordering::SeqCst)
            );
        }
        assert!(STARTED.load(Ordering::SeqCst) > 0);
    }
}
