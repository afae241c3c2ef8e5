//! Memory for a KV pool or a layer's weights (feature `std`), for hosts that allocate on the
//! heap: the core itself takes caller memory and never allocates. Decode reads both at memory
//! speed, so this allocates them the way that reads fastest: 2 MiB or more start on a 2 MiB
//! boundary and are advised into 2 MiB pages before the first write (Linux transparent huge
//! pages), less starts on a cache line. In 4 KiB pages every 4 KiB block of one head's keys is
//! a TLB miss; in 2 MiB pages one thread of a Zen 5 core read the cache 9-10% faster
//! (`attnrt bench decode`, BENCHMARKS.md).

use core::ops::{Deref, DerefMut};
use std::collections::TryReserveError;
use std::vec::Vec;

/// Bytes of a huge page, and the least pool size given one.
const HUGE_PAGE: usize = 2 << 20;
/// A cache line.
const LINE: usize = 64;

/// `len` elements inside a vector that owns them, placed as the module says; derefs to the
/// elements (pass `&mut pool[..]` as a [`crate::KvPool`] slice).
pub struct PoolMemory<T> {
    buf: Vec<T>,
    at: usize,
    len: usize,
}

impl<T: Copy> PoolMemory<T> {
    /// `len` copies of `value`, placed as the module says.
    ///
    /// # Errors
    /// The allocator's, if it cannot reserve `len` elements (plus the alignment's slack).
    pub fn filled(len: usize, value: T) -> Result<Self, TryReserveError> {
        Self::place(len, value, |buf| buf.resize(buf.len() + len, value))
    }

    /// A copy of `values`, placed as the module says (an empty one allocates nothing): for
    /// weights that decode reads once per token (one-token projections read their weights in
    /// 2 MiB pages 6-10% faster on a Zen 5 core, BENCHMARKS.md).
    ///
    /// # Errors
    /// The allocator's, if it cannot reserve `values.len()` elements (plus the alignment's
    /// slack).
    pub fn copied(values: &[T]) -> Result<Self, TryReserveError> {
        match values.first() {
            Some(&first) => Self::place(values.len(), first, |buf| buf.extend_from_slice(values)),
            None => Ok(PoolMemory {
                buf: Vec::new(),
                at: 0,
                len: 0,
            }),
        }
    }

    /// Reserves `len` elements placed as the module says, fills the slack before them with
    /// `pad`, then lets `write` append exactly `len` elements.
    fn place(len: usize, pad: T, write: impl FnOnce(&mut Vec<T>)) -> Result<Self, TryReserveError> {
        let size = core::mem::size_of::<T>().max(1);
        let bytes = len.saturating_mul(size);
        let align = if bytes >= HUGE_PAGE { HUGE_PAGE } else { LINE };
        let slack = align / size;
        let mut buf: Vec<T> = Vec::new();
        buf.try_reserve_exact(len.saturating_add(slack))?;
        // Below `slack` elements: the allocation is at least `size`-aligned and `align` is a
        // multiple of `size`.
        let at = buf.as_ptr().align_offset(align).min(slack);
        if align == HUGE_PAGE {
            advise_huge_pages(
                buf.as_mut_ptr().wrapping_add(at).cast(),
                bytes / HUGE_PAGE * HUGE_PAGE,
            );
        }
        // The first write of the pages comes after the advice.
        buf.resize(at, pad);
        write(&mut buf);
        debug_assert_eq!(buf.len(), at + len);
        Ok(PoolMemory { buf, at, len })
    }
}

/// Asks the OS to back `[p, p + bytes)` with huge pages; a hint, ignored where unsupported (and
/// under Miri, which cannot call the OS).
fn advise_huge_pages(p: *mut core::ffi::c_void, bytes: usize) {
    #[cfg(all(target_os = "linux", not(miri)))]
    {
        extern "C" {
            fn madvise(addr: *mut core::ffi::c_void, len: usize, advice: i32) -> i32;
        }
        const MADV_HUGEPAGE: i32 = 14;
        // SAFETY: the range lies inside an allocation the caller owns (reserved, not yet
        // written); madvise changes only how the kernel backs it and may fail, which leaves
        // ordinary pages.
        unsafe {
            madvise(p, bytes, MADV_HUGEPAGE);
        }
    }
    #[cfg(any(not(target_os = "linux"), miri))]
    let _ = (p, bytes);
}

impl<T> core::fmt::Debug for PoolMemory<T> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("PoolMemory")
            .field("len", &self.len)
            .field("at", &self.at)
            .finish()
    }
}

impl<T> Deref for PoolMemory<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        &self.buf[self.at..self.at + self.len]
    }
}

impl<T> DerefMut for PoolMemory<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        &mut self.buf[self.at..self.at + self.len]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Not under Miri: it cannot call madvise (skipped there), and this test took 13 minutes in it.
    #[test]
    #[cfg_attr(miri, ignore)]
    fn pools_are_zeroed_and_placed() {
        for (len, align) in [
            (0usize, LINE),
            (3, LINE),
            (1000, LINE),
            (3 << 20, HUGE_PAGE),
        ] {
            let mut p = PoolMemory::filled(len, 0.0f32).unwrap();
            assert_eq!(p.len(), len);
            assert!(p.iter().all(|&x| x == 0.0));
            assert_eq!(p.as_ptr() as usize % align, 0, "len {len}");
            if len > 0 {
                p[len - 1] = 1.0;
                assert_eq!(p[len - 1], 1.0);
            }
            let values: Vec<f32> = (0..len).map(|i| i as f32 + 0.5).collect();
            let c = PoolMemory::copied(&values).unwrap();
            assert_eq!(&c[..], &values[..]);
            // An empty copy allocates nothing: no address to place.
            if len > 0 {
                assert_eq!(c.as_ptr() as usize % align, 0, "len {len}");
            }
        }
    }
}
