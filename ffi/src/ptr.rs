//! Turning the caller's (pointer, length) pairs into slices, with every check that makes it
//! sound: NULL, alignment, and a byte length within `isize::MAX`.

use core::mem::{align_of, size_of};

use crate::error::{FfiError, FfiResult};
use crate::status::attnrt_status;

/// Checks a buffer for NULL, alignment and a byte length within `isize::MAX`.
pub(crate) fn check<T>(name: &str, ptr: *const T, len: usize) -> FfiResult<()> {
    if ptr.is_null() {
        return Err(FfiError::null(name));
    }
    if !ptr.is_aligned() {
        return Err(FfiError::new(
            attnrt_status::ATTNRT_STATUS_MISALIGNED_POINTER,
            format!("{name} is not aligned to {} bytes", align_of::<T>()),
        ));
    }
    match len.checked_mul(size_of::<T>()) {
        Some(bytes) if bytes <= isize::MAX as usize => Ok(()),
        _ => Err(FfiError::new(
            attnrt_status::ATTNRT_STATUS_LENGTH_OVERFLOW,
            format!("{name}: length {len} overflows the address space"),
        )),
    }
}

/// A required input buffer.
///
/// # Safety
/// If `ptr` is non-null, it must be valid for reads of `len` elements of `T`, not written
/// during the returned lifetime.
pub(crate) unsafe fn slice<'a, T>(name: &str, ptr: *const T, len: usize) -> FfiResult<&'a [T]> {
    check(name, ptr, len)?;
    // SAFETY: non-null, aligned, byte length <= isize::MAX (checked above); validity for
    // `len` reads and no concurrent writes are the caller's contract.
    Ok(unsafe { core::slice::from_raw_parts(ptr, len) })
}

/// An optional input buffer: NULL means absent (then `len` must be 0).
///
/// # Safety
/// As [`slice`].
pub(crate) unsafe fn opt_slice<'a, T>(
    name: &str,
    ptr: *const T,
    len: usize,
) -> FfiResult<Option<&'a [T]>> {
    if ptr.is_null() {
        if len != 0 {
            return Err(FfiError::null(&format!("{name} (with length {len})")));
        }
        return Ok(None);
    }
    // SAFETY: forwarded contract.
    unsafe { slice(name, ptr, len) }.map(Some)
}

/// A required output buffer.
///
/// # Safety
/// If `ptr` is non-null, it must be valid for reads and writes of `len` elements of `T`, and
/// no other reference to that memory may be used during the returned lifetime (the caller
/// checks overlap with the call's other buffers with [`overlaps`]).
pub(crate) unsafe fn slice_mut<'a, T>(
    name: &str,
    ptr: *mut T,
    len: usize,
) -> FfiResult<&'a mut [T]> {
    check(name, ptr.cast_const(), len)?;
    // SAFETY: non-null, aligned, byte length <= isize::MAX (checked above); validity and
    // exclusivity are the caller's contract.
    Ok(unsafe { core::slice::from_raw_parts_mut(ptr, len) })
}

/// Byte range `[start, end)` of a buffer, for overlap checks before any slice is made.
pub(crate) fn span<T>(ptr: *const T, len: usize) -> (usize, usize) {
    let start = ptr as usize;
    (
        start,
        start.saturating_add(len.saturating_mul(size_of::<T>())),
    )
}

/// Whether two byte ranges share a byte (empty ranges share none).
pub(crate) fn overlaps(a: (usize, usize), b: (usize, usize)) -> bool {
    a.0 < a.1 && b.0 < b.1 && a.0 < b.1 && b.0 < a.1
}

/// A required pointer to one value, checked for NULL and alignment.
///
/// # Safety
/// If `ptr` is non-null and aligned, it must be valid for reads of one `T`, not written during
/// the returned lifetime.
pub(crate) unsafe fn as_ref<'a, T>(name: &str, ptr: *const T) -> FfiResult<&'a T> {
    check(name, ptr, 1)?;
    // SAFETY: non-null and aligned (checked above); validity is the caller's contract.
    Ok(unsafe { &*ptr })
}

/// Checks an out-pointer for NULL and alignment; write through it later with [`write_out`].
pub(crate) fn check_out<T>(name: &str, ptr: *mut T) -> FfiResult<()> {
    check(name, ptr.cast_const(), 1)
}

/// Writes `value` through an out-pointer that passed [`check_out`].
///
/// # Safety
/// `ptr` must have passed [`check_out`] and be valid for a write of one `T`.
pub(crate) unsafe fn write_out<T>(ptr: *mut T, value: T) {
    // SAFETY: non-null and aligned (checked by `check_out`), valid by the caller's contract;
    // `write` neither reads nor drops the old value.
    unsafe { ptr.write(value) }
}

/// Drops a handle made with `Box::into_raw`; NULL is a no-op (the `_free` calls of the ABI).
///
/// # Safety
/// `p` is NULL or came from `Box::into_raw` and has not been freed; no use of it follows.
pub(crate) unsafe fn free_boxed<T>(p: *mut T) {
    if !p.is_null() {
        // SAFETY: the contract of this function.
        drop(unsafe { Box::from_raw(p) });
    }
}
