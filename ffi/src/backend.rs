//! Backends: the request enum, the capability query, and the one place where a forward call is
//! dispatched. Adding an executor means a variant of [`Plan`], an arm in [`select`] (when it
//! can serve a request) and an arm in [`dispatch`] (how to run it).

use core::ffi::c_char;

use attnrt::{Backend, Config, Inputs, Layer, ParallelFor};

use crate::config::attnrt_config;
use crate::error::{copy_message, FfiError, FfiResult};
use crate::panic::guard;
use crate::ptr::as_ref;
use crate::status::attnrt_status;
use crate::table::table_elems;

/// A backend: requested in `attnrt_forward_args::backend` (as `uint32_t`), reported in
/// `attnrt_forward`'s `backend_ran`.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum attnrt_backend {
    /// The best backend available for the request (today: the scalar reference). Only a
    /// request; never reported as the backend that ran.
    ATTNRT_BACKEND_AUTO = 0,
    /// The scalar reference executor (the oracle; slow).
    ATTNRT_BACKEND_REFERENCE = 1,
    /// The SIMD CPU executor (not in this build yet).
    ATTNRT_BACKEND_CPU_SIMD = 2,
    /// The CUDA executor (not in this build yet).
    ATTNRT_BACKEND_CUDA = 3,
}

impl attnrt_backend {
    pub(crate) fn from_u32(v: u32) -> FfiResult<attnrt_backend> {
        Ok(match v {
            0 => attnrt_backend::ATTNRT_BACKEND_AUTO,
            1 => attnrt_backend::ATTNRT_BACKEND_REFERENCE,
            2 => attnrt_backend::ATTNRT_BACKEND_CPU_SIMD,
            3 => attnrt_backend::ATTNRT_BACKEND_CUDA,
            v => return Err(FfiError::bad_enum("backend", v, "an attnrt_backend, 0..=3")),
        })
    }
}

/// The executor chosen for a request.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Plan {
    Reference,
}

/// Chooses the executor for a request, or says precisely why the requested one cannot serve
/// it. `forward` and `capability` both ask this, so they always agree.
pub(crate) fn select(
    requested: attnrt_backend,
    cfg: &Config,
    batch: usize,
    seq_len: usize,
) -> FfiResult<Plan> {
    let _ = (cfg, batch, seq_len); // every valid request fits the reference
    match requested {
        attnrt_backend::ATTNRT_BACKEND_AUTO | attnrt_backend::ATTNRT_BACKEND_REFERENCE => {
            Ok(Plan::Reference)
        }
        attnrt_backend::ATTNRT_BACKEND_CPU_SIMD => Err(unavailable(
            "the CPU SIMD executor is not available in this build of attnrt",
        )),
        attnrt_backend::ATTNRT_BACKEND_CUDA => Err(unavailable(
            "the CUDA executor is not available in this build of attnrt (built without CUDA)",
        )),
    }
}

fn unavailable(msg: &str) -> FfiError {
    FfiError::new(attnrt_status::ATTNRT_STATUS_BACKEND_UNAVAILABLE, msg)
}

/// Runs a forward call on the chosen executor: the only place that calls one.
pub(crate) fn dispatch(
    plan: Plan,
    layer: &Layer<'_>,
    inputs: &Inputs<'_>,
    workspace: &mut [f32],
    out: &mut [f32],
    pool: &dyn ParallelFor,
) -> FfiResult<attnrt_backend> {
    let ran = match plan {
        // The reference is sequential by design; it does not take the pool.
        Plan::Reference => {
            let _ = pool;
            layer.forward_reference(inputs, workspace, out)?
        }
    };
    match ran {
        Backend::Reference => Ok(attnrt_backend::ATTNRT_BACKEND_REFERENCE),
        other => Err(FfiError::new(
            attnrt_status::ATTNRT_STATUS_INTERNAL,
            format!("the runtime ran backend {other}, unknown to this version of the C ABI"),
        )),
    }
}

/// f32 workspace elements of a call: the executors' part plus, when the call builds its own
/// cos/sin table (`with_table`), the table's part.
pub(crate) fn workspace_elems(
    cfg: &Config,
    batch: usize,
    seq_len: usize,
    with_table: bool,
) -> FfiResult<usize> {
    let overflow = || attnrt::Error::InputValue {
        name: "seq_len",
        index: 0,
        value: seq_len as i64,
        rule: "the workspace size overflows a size_t",
    };
    // `workspace_len` saturates instead of overflowing.
    let exec = attnrt::workspace_len(cfg, seq_len);
    if exec == usize::MAX {
        return Err(overflow().into());
    }
    let table = if with_table && cfg.rope().is_some() {
        batch
            .checked_mul(seq_len)
            .and_then(|tokens| table_elems(tokens, cfg.head_dim))
            .ok_or_else(overflow)?
    } else {
        0
    };
    Ok(exec.checked_add(table).ok_or_else(overflow)?)
}

/// Whether `backend` can run a layer of configuration `config` on `batch` rows of `seq_len`
/// tokens: `ATTNRT_STATUS_OK`, or the status that `attnrt_forward` would return (a
/// configuration error, `ATTNRT_STATUS_BAD_ENUM`, `ATTNRT_STATUS_BACKEND_UNAVAILABLE`,
/// `ATTNRT_STATUS_UNSUPPORTED`, `ATTNRT_STATUS_INPUT_VALUE` for sizes that overflow).
///
/// The precise reason is copied into `reason_buf` (truncated to `len - 1` bytes and
/// NUL-terminated; an empty string on success) and `*written` receives its length without the
/// NUL; both may be NULL (`len` must then be 0 for `reason_buf`). The reason is also the
/// thread's last error, for [`crate::attnrt_error_message`].
///
/// Thread-safe.
///
/// # Safety
/// `config` must be NULL or valid; `reason_buf` NULL or valid for `len` bytes; `written` NULL
/// or valid for one write.
#[no_mangle]
pub unsafe extern "C" fn attnrt_capability(
    config: *const attnrt_config,
    batch: usize,
    seq_len: usize,
    backend: u32,
    reason_buf: *mut c_char,
    len: usize,
    written: *mut usize,
) -> attnrt_status {
    guard(|| {
        if reason_buf.is_null() && len > 0 {
            return Err(FfiError::null("reason_buf (with a nonzero length)"));
        }
        if !reason_buf.is_null() {
            crate::ptr::check("reason_buf", reason_buf.cast_const(), len)?;
        }
        if !written.is_null() {
            crate::ptr::check_out("written", written)?;
        }
        let answer = (|| {
            // SAFETY: the contract of this function.
            let config = unsafe { as_ref("config", config) }?;
            let requested = attnrt_backend::from_u32(backend)?;
            let cfg = config.validated()?;
            batch
                .checked_mul(seq_len)
                .and_then(|n| n.checked_mul(cfg.n_embd))
                .ok_or(attnrt::Error::InputValue {
                    name: "seq_len",
                    index: 0,
                    value: seq_len as i64,
                    rule: "batch * seq_len * n_embd overflows",
                })?;
            workspace_elems(&cfg, batch, seq_len, true)?;
            select(requested, &cfg, batch, seq_len).map(|_| ())
        })();
        let msg = answer.as_ref().err().map_or("", |e| e.message.as_str());
        // SAFETY: `reason_buf` is NULL only with `len == 0`, else valid for `len` bytes.
        let (n, _) = unsafe { copy_message(msg, reason_buf, len) };
        if !written.is_null() {
            // SAFETY: checked by `check_out`; valid by the contract.
            unsafe { crate::ptr::write_out(written, n) };
        }
        answer
    })
}
