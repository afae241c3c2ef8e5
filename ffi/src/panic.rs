//! The panic boundary every exported call runs inside.

use std::panic::{catch_unwind, AssertUnwindSafe};

use crate::error::{set_last_error, FfiResult};
use crate::status::attnrt_status;

/// Runs `f`, turns its error or a panic into a status, and records the outcome as the calling
/// thread's last error (cleared on success).
///
/// `AssertUnwindSafe` is sound here: after a panic nothing `f` touched is observed again by this
/// library, except the caller's output buffers, which a caller must treat as unspecified after
/// `ATTNRT_STATUS_PANIC` (documented on the status).
pub(crate) fn guard(f: impl FnOnce() -> FfiResult<()>) -> attnrt_status {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(())) => {
            set_last_error(None);
            attnrt_status::ATTNRT_STATUS_OK
        }
        Ok(Err(e)) => {
            set_last_error(Some(&e.message));
            e.status
        }
        Err(payload) => {
            let what = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown payload".to_string());
            set_last_error(Some(&format!(
                "internal panic caught at the C boundary: {what}"
            )));
            attnrt_status::ATTNRT_STATUS_PANIC
        }
    }
}
