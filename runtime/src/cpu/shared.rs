//! Handing disjoint parts of one buffer to the tasks of a host-supplied parallel-for.
//!
//! The host's `ParallelFor` only promises to run each task index; it could (by mistake) run one
//! twice or concurrently. Soundness therefore never rests on the host: lane indices are claimed
//! once through an atomic bitmap, and work units come from an atomic counter, so each unit's
//! region is handed out exactly once.

use core::marker::PhantomData;
use core::sync::atomic::{AtomicU32, AtomicUsize, Ordering};

use crate::parallel::ParallelFor;

/// Most lanes (concurrent workers with their own scratch) one call uses.
pub const MAX_LANES: usize = 64;

/// A buffer whose disjoint ranges are written by different tasks at once.
pub struct Shared<'a> {
    ptr: *mut f32,
    len: usize,
    _borrow: PhantomData<&'a mut [f32]>,
}

// SAFETY: `Shared` only hands out ranges through `range_mut`, whose contract makes concurrent
// ranges disjoint; f32 is Send, so writes from several threads to disjoint elements are sound.
unsafe impl Sync for Shared<'_> {}

impl<'a> Shared<'a> {
    /// Takes the buffer for the duration of the borrow.
    pub fn new(buf: &'a mut [f32]) -> Shared<'a> {
        Shared {
            ptr: buf.as_mut_ptr(),
            len: buf.len(),
            _borrow: PhantomData,
        }
    }

    /// The elements `start..start + len`.
    ///
    /// # Safety
    /// No other live reference obtained from this `Shared` may overlap the range while the
    /// returned slice lives. Bounds are checked here (a panic, never an out-of-bounds access).
    #[allow(clippy::mut_from_ref)] // the point of the type; disjointness is the caller's contract
    pub unsafe fn range_mut(&self, start: usize, len: usize) -> &mut [f32] {
        assert!(
            start.checked_add(len).is_some_and(|e| e <= self.len),
            "range outside buffer"
        );
        // SAFETY: in bounds (checked above) of a buffer mutably borrowed for 'a; exclusivity of
        // the range is the caller's contract.
        unsafe { core::slice::from_raw_parts_mut(self.ptr.add(start), len) }
    }
}

/// Runs `units` work units on up to `lanes` workers of `par`; worker `l` gets scratch
/// `scratch[l * lane_len..][..lane_len]`. Each unit runs exactly once, on whichever lane takes
/// it; results must not depend on the lane (units write only their own regions).
///
/// Returns false if the host ran no task at all, so some units never ran.
pub fn run_units(
    par: &dyn ParallelFor,
    lanes: usize,
    units: usize,
    scratch: &Shared<'_>,
    lane_len: usize,
    work: &(dyn Fn(usize, &mut [f32]) + Sync),
) -> bool {
    if units == 0 {
        return true;
    }
    let lanes = lanes.clamp(1, MAX_LANES).min(units);
    // One bit per lane, in 32-bit words: 32-bit targets (Cortex-M) have no 64-bit atomics.
    let claimed: [AtomicU32; MAX_LANES.div_ceil(32)] = core::array::from_fn(|_| AtomicU32::new(0));
    let next = AtomicUsize::new(0);
    par.run(lanes, &|lane| {
        let bit = 1u32 << (lane % 32);
        if lane >= lanes || claimed[lane / 32].fetch_or(bit, Ordering::AcqRel) & bit != 0 {
            return; // out of range, or the host ran this lane twice: its scratch is taken
        }
        // SAFETY: lane `lane` was claimed exactly once above, and lanes own disjoint ranges.
        let s = unsafe { scratch.range_mut(lane * lane_len, lane_len) };
        loop {
            let u = next.fetch_add(1, Ordering::Relaxed);
            if u >= units {
                break;
            }
            work(u, s);
        }
    });
    next.load(Ordering::Relaxed) >= units
}

#[cfg(test)]
mod tests {
    //! `run_units` on the runtime's pools and on hosts that break the contract; small enough
    //! for Miri, which checks the disjointness of the ranges and (with threads) data races.
    use std::vec;
    use std::vec::Vec;

    use super::*;
    use crate::parallel::Sequential;

    /// Each unit copies its lane-scratch (filled with the unit index) into its own output
    /// pair; every unit must run exactly once whatever the host does.
    fn check(par: &dyn ParallelFor, lanes: usize) {
        let (units, lane_len) = (10, 3);
        let mut scratch = vec![0.0f32; lanes.clamp(1, MAX_LANES) * lane_len];
        let mut out = vec![-1.0f32; units * 2];
        let runs = AtomicUsize::new(0);
        let ran = {
            let (s, o) = (Shared::new(&mut scratch), Shared::new(&mut out));
            run_units(par, lanes, units, &s, lane_len, &|u, lane| {
                runs.fetch_add(1, Ordering::Relaxed);
                lane.fill(u as f32);
                // SAFETY: unit u alone writes out[2u..2u + 2].
                let dst = unsafe { o.range_mut(2 * u, 2) };
                dst.copy_from_slice(&lane[..2]);
            })
        };
        assert!(ran);
        assert_eq!(runs.into_inner(), units);
        let want: Vec<f32> = (0..units).flat_map(|u| [u as f32; 2]).collect();
        assert_eq!(out, want);
    }

    /// A host that runs every task twice, skips task 0, or adds an index out of range.
    struct Sloppy(u8);

    impl ParallelFor for Sloppy {
        fn run(&self, n: usize, task: &(dyn Fn(usize) + Sync)) {
            match self.0 {
                0 => (0..n).chain(0..n).for_each(task),
                1 => (1..n.max(2)).for_each(task),
                _ => (0..=n).for_each(task),
            }
        }
    }

    #[test]
    fn every_unit_once_on_sequential_and_sloppy_hosts() {
        for lanes in [0, 1, 3, 64, 1000] {
            check(&Sequential, lanes);
            for mode in 0..3 {
                check(&Sloppy(mode), lanes.max(2));
            }
        }
    }

    #[cfg(feature = "std")]
    #[test]
    fn every_unit_once_on_scoped_threads() {
        for threads in [1, 2, 3] {
            check(&crate::ScopedThreads { threads }, threads);
        }
    }

    #[test]
    fn a_host_that_runs_nothing_is_reported() {
        struct Idle;
        impl ParallelFor for Idle {
            fn run(&self, _: usize, _: &(dyn Fn(usize) + Sync)) {}
        }
        let mut scratch = vec![0.0f32; 4];
        let s = Shared::new(&mut scratch);
        assert!(!run_units(&Idle, 2, 5, &s, 2, &|_, _| {}));
        assert!(run_units(&Idle, 2, 0, &s, 2, &|_, _| {}));
    }
}
