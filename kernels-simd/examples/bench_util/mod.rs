//! What the single-thread micro-benchmarks of this folder share: a CPU-time clock and
//! reproducible inputs. Included by each with `#[path]` (not an example of its own).

use std::time::Instant;

/// Nanoseconds of CPU time of this thread (Linux `CLOCK_THREAD_CPUTIME_ID`), so other load on
/// the machine inflates the figure less than wall time; wall time elsewhere.
#[allow(dead_code)] // not used by the roofline bench, which times threads by the wall clock
pub fn cpu_ns(wall: Instant) -> u64 {
    #[cfg(target_os = "linux")]
    {
        #[repr(C)]
        struct Timespec {
            sec: i64,
            nsec: i64,
        }
        extern "C" {
            fn clock_gettime(clock: i32, ts: *mut Timespec) -> i32;
        }
        const CLOCK_THREAD_CPUTIME_ID: i32 = 3;
        let mut ts = Timespec { sec: 0, nsec: 0 };
        // SAFETY: `ts` is a valid, writable timespec (two 64-bit fields on 64-bit Linux) and the
        // clock id is a constant the C library accepts.
        if unsafe { clock_gettime(CLOCK_THREAD_CPUTIME_ID, &mut ts) } == 0 {
            return ts.sec as u64 * 1_000_000_000 + ts.nsec as u64;
        }
    }
    wall.elapsed().as_nanos() as u64
}

/// `n` values in [-1, 1) from an xorshift generator seeded with `seed` (the same on every run).
pub fn fill(seed: u64, n: usize) -> Vec<f32> {
    let mut s = seed | 1;
    (0..n)
        .map(|_| {
            s ^= s >> 12;
            s ^= s << 25;
            s ^= s >> 27;
            ((s.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// `values` (then `pad` to the end of the vector) in memory laid out as `attnrt::PoolMemory`
/// (which this crate cannot depend on) lays out a KV pool: from a 2 MiB boundary, on Linux
/// advised into 2 MiB pages before the first write. Returns the vector and the offset of the
/// first value.
#[allow(dead_code)] // used by the decode bench only
pub fn pool_memory<T: Copy>(values: impl ExactSizeIterator<Item = T>, pad: T) -> (Vec<T>, usize) {
    const PAGE: usize = 2 << 20;
    let len = values.len();
    let slack = PAGE / core::mem::size_of::<T>();
    let mut v: Vec<T> = Vec::with_capacity(len + slack);
    let at = v.as_ptr().align_offset(PAGE);
    #[cfg(target_os = "linux")]
    {
        extern "C" {
            fn madvise(addr: *mut core::ffi::c_void, len: usize, advice: i32) -> i32;
        }
        const MADV_HUGEPAGE: i32 = 14;
        let bytes = len * core::mem::size_of::<T>() / PAGE * PAGE;
        // SAFETY: the advised range starts `at < slack` elements into the allocation and spans
        // at most `len` elements of it; madvise only changes how the kernel backs that memory
        // and may fail, leaving ordinary pages.
        unsafe {
            madvise(v.as_mut_ptr().add(at).cast(), bytes, MADV_HUGEPAGE);
        }
    }
    v.resize(at, pad);
    v.extend(values);
    v.resize(len + slack, pad);
    (v, at)
}
