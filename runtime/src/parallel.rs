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
            for _ in 0..extra {
                s.spawn(work);
            }
            work();
        });
    }

    fn width(&self) -> usize {
        self.threads.max(1)
    }
}
