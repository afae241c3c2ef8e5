//! Errors inside the ABI and the calling thread's last error message.

use core::ffi::c_char;
use std::cell::RefCell;
use std::fmt;

use crate::status::attnrt_status;

/// A failure of an exported call: its status and a message naming the offending values.
#[derive(Debug)]
pub(crate) struct FfiError {
    pub status: attnrt_status,
    pub message: String,
}

impl FfiError {
    pub fn new(status: attnrt_status, message: impl Into<String>) -> FfiError {
        FfiError {
            status,
            message: message.into(),
        }
    }

    /// A required pointer argument was NULL.
    pub fn null(name: &str) -> FfiError {
        FfiError::new(
            attnrt_status::ATTNRT_STATUS_NULL_POINTER,
            format!("{name} is NULL"),
        )
    }

    /// An enumeration value out of range.
    pub fn bad_enum(name: &str, value: u32, allowed: &str) -> FfiError {
        FfiError::new(
            attnrt_status::ATTNRT_STATUS_BAD_ENUM,
            format!("{name} = {value} is not a valid value (expected {allowed})"),
        )
    }
}

impl From<attnrt::Error> for FfiError {
    fn from(e: attnrt::Error) -> FfiError {
        FfiError {
            status: attnrt_status::of(&e),
            message: e.to_string(),
        }
    }
}

impl fmt::Display for FfiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

pub(crate) type FfiResult<T> = Result<T, FfiError>;

thread_local! {
    /// The message of the last failed call on this thread; empty after a successful one.
    static LAST_ERROR: RefCell<String> = const { RefCell::new(String::new()) };
}

/// Records the outcome of a call on this thread.
pub(crate) fn set_last_error(message: Option<&str>) {
    // `try_with` fails only while the thread is being torn down; nothing to record then.
    let _ = LAST_ERROR.try_with(|slot| {
        if let Ok(mut s) = slot.try_borrow_mut() {
            s.clear();
            if let Some(m) = message {
                s.push_str(m);
            }
        }
    });
}

/// Copies `msg` into `buf[..len]`, truncated at a UTF-8 character boundary and NUL-terminated.
/// Returns the bytes written (without the NUL) and whether the whole message fit.
///
/// # Safety
/// `buf` must be NULL or valid for writes of `len` bytes.
pub(crate) unsafe fn copy_message(msg: &str, buf: *mut c_char, len: usize) -> (usize, bool) {
    if buf.is_null() || len == 0 {
        return (0, msg.is_empty());
    }
    let mut n = msg.len().min(len - 1);
    while !msg.is_char_boundary(n) {
        n -= 1;
    }
    // SAFETY: the caller guarantees `buf` is valid for `len` bytes; `n + 1 <= len`, and the
    // source is a distinct Rust string, so the ranges do not overlap.
    unsafe {
        core::ptr::copy_nonoverlapping(msg.as_ptr(), buf.cast::<u8>(), n);
        *buf.add(n) = 0;
    }
    (n, n == msg.len())
}

/// Copies the message of the calling thread's last failed call into `buf`.
///
/// The message is truncated to `len - 1` bytes (at a UTF-8 character boundary) and always
/// NUL-terminated when `len > 0`. `*written` receives the bytes written, without the NUL. The
/// message is empty when the last call on this thread succeeded. This call never changes the
/// recorded message, so it may be called repeatedly (for example with a larger buffer).
///
/// Returns `ATTNRT_STATUS_OK` when the whole message fit, `ATTNRT_STATUS_TRUNCATED` when it was
/// cut, `ATTNRT_STATUS_NULL_POINTER` when `buf` (with `len > 0`) or `written` is NULL.
///
/// Thread-safe: each thread has its own last error.
///
/// # Safety
/// `buf` must be valid for writes of `len` bytes (or NULL with `len == 0`); `written` must be
/// valid for a write of one `size_t`.
#[no_mangle]
pub unsafe extern "C" fn attnrt_error_message(
    buf: *mut c_char,
    len: usize,
    written: *mut usize,
) -> attnrt_status {
    let r = std::panic::catch_unwind(|| {
        if written.is_null() || (buf.is_null() && len > 0) {
            return attnrt_status::ATTNRT_STATUS_NULL_POINTER;
        }
        let (n, whole) = LAST_ERROR
            .try_with(|slot| match slot.try_borrow() {
                // SAFETY: `buf` is NULL only with `len == 0` (checked above), else valid for
                // `len` bytes by this function's contract.
                Ok(s) => unsafe { copy_message(&s, buf, len) },
                // SAFETY: as above.
                Err(_) => unsafe { copy_message("", buf, len) },
            })
            // SAFETY: as above.
            .unwrap_or_else(|_| unsafe { copy_message("", buf, len) });
        // SAFETY: `written` is non-null and valid for one write by the contract.
        unsafe { written.write(n) };
        if whole {
            attnrt_status::ATTNRT_STATUS_OK
        } else {
            attnrt_status::ATTNRT_STATUS_TRUNCATED
        }
    });
    // Not `panic::guard`: that records the outcome as the last error, which this call must not.
    r.unwrap_or(attnrt_status::ATTNRT_STATUS_PANIC)
}
