//! Backends: the request enum, the capability query, and the one place where a forward call is
//! dispatched. Adding an executor means a variant of [`Plan`], an arm in [`select`] (when it
//! can serve a request) and an arm in [`dispatch`] (how to run it).

use core::ffi::c_char;

use attnrt::{Backend, Config, Inputs, Layer, ParallelFor};
use attnrt_simd::Tier;

use crate::config::attnrt_config;
use crate::error::{copy_message, FfiError, FfiResult};
use crate::panic::guard;
use crate::ptr::{as_ref, check_out, write_out};
use crate::status::attnrt_status;
use crate::table::table_elems;

/// A backend: requested in `attnrt_forward_args::backend` (as `uint32_t`), reported in
/// `attnrt_forward`'s `backend_ran`.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum attnrt_backend {
    /// The fastest backend available for the request (today: the SIMD CPU executor, which
    /// serves every valid request). Only a request; never reported as the backend that ran.
    ATTNRT_BACKEND_AUTO = 0,
    /// The scalar reference executor (the oracle; slow; runs on the calling thread).
    ATTNRT_BACKEND_REFERENCE = 1,
    /// The SIMD CPU executor, on the best instruction-set tier of this CPU (see
    /// `attnrt_cpu_tier`), threaded by the host's parallel-for or `num_threads`.
    ATTNRT_BACKEND_CPU_SIMD = 2,
    /// The CUDA executor. Reported by the `attnrt_cuda_*` forward calls; requesting it from
    /// `attnrt_forward` returns `ATTNRT_STATUS_BACKEND_UNAVAILABLE` (a GPU needs a per-device
    /// handle, `attnrt_cuda_layer_new`), and AUTO never selects it.
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

/// An instruction-set tier of the SIMD CPU executor, as reported by [`attnrt_cpu_tier`].
/// Values are stable; a newer library may report a value this header does not name (use
/// [`attnrt_simd_tier_name`] to print it).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum attnrt_simd_tier {
    /// Portable Rust, no SIMD intrinsics (every target).
    ATTNRT_SIMD_TIER_SCALAR = 0,
    /// x86-64 AVX2 + FMA.
    ATTNRT_SIMD_TIER_AVX2 = 1,
    /// x86-64 AVX-512F.
    ATTNRT_SIMD_TIER_AVX512 = 2,
    /// aarch64 Advanced SIMD (NEON).
    ATTNRT_SIMD_TIER_NEON = 3,
}

impl attnrt_simd_tier {
    fn of(t: Tier) -> attnrt_simd_tier {
        match t {
            Tier::Scalar => attnrt_simd_tier::ATTNRT_SIMD_TIER_SCALAR,
            Tier::Avx2 => attnrt_simd_tier::ATTNRT_SIMD_TIER_AVX2,
            Tier::Avx512 => attnrt_simd_tier::ATTNRT_SIMD_TIER_AVX512,
            Tier::Neon => attnrt_simd_tier::ATTNRT_SIMD_TIER_NEON,
        }
    }
}

/// Writes to `*tier` the instruction-set tier the SIMD CPU executor (`ATTNRT_BACKEND_CPU_SIMD`,
/// and so `ATTNRT_BACKEND_AUTO`) runs on in this process: the best one the CPU supports, unless
/// the environment variable `ATTNRT_SIMD_TIER` (`scalar`, `avx2`, `avx512`, `neon`) forced a
/// lower one. Detected once and cached; every forward call of the process uses this tier.
///
/// Errors: `ATTNRT_STATUS_NULL_POINTER` (`tier` NULL; then nothing is written).
/// Thread-safe.
///
/// # Safety
/// `tier` must be NULL or valid for one write.
#[no_mangle]
pub unsafe extern "C" fn attnrt_cpu_tier(tier: *mut attnrt_simd_tier) -> attnrt_status {
    guard(|| {
        check_out("tier", tier)?;
        let t = attnrt_simd_tier::of(attnrt::cpu_tier());
        // SAFETY: checked by `check_out`; valid by the contract.
        unsafe { write_out(tier, t) };
        Ok(())
    })
}

/// The lower-case name of a tier (`"avx2"`, the name `ATTNRT_SIMD_TIER` accepts), or NULL for
/// a value that is not an `attnrt_simd_tier`.
///
/// The string is static and NUL-terminated: never free it. Thread-safe; never fails.
#[no_mangle]
pub extern "C" fn attnrt_simd_tier_name(tier: u32) -> *const c_char {
    let name = match tier {
        0 => c"scalar",
        1 => c"avx2",
        2 => c"avx512",
        3 => c"neon",
        _ => return core::ptr::null(),
    };
    name.as_ptr()
}

/// The executor chosen for a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Plan {
    /// `Layer::forward_reference`.
    Reference,
    /// `Layer::forward_cpu`.
    CpuSimd,
}

/// Every plan a request may select; `attnrt_workspace_size` covers them all.
const PLANS: [Plan; 2] = [Plan::Reference, Plan::CpuSimd];

/// Chooses the executor for a request, or says precisely why the requested one cannot serve
/// it. `forward` and `capability` both ask this, so they always agree.
pub(crate) fn select(
    requested: attnrt_backend,
    cfg: &Config,
    batch: usize,
    seq_len: usize,
) -> FfiResult<Plan> {
    // Every valid request fits both CPU executors (the SIMD one has a portable scalar tier
    // on every target), so the choice depends on the request alone.
    let _ = (cfg, batch, seq_len);
    match requested {
        attnrt_backend::ATTNRT_BACKEND_AUTO | attnrt_backend::ATTNRT_BACKEND_CPU_SIMD => {
            Ok(Plan::CpuSimd)
        }
        attnrt_backend::ATTNRT_BACKEND_REFERENCE => Ok(Plan::Reference),
        // A GPU layer owns per-device state (weights uploaded in a precision, buffers sized
        // for a maximum shape, a stream) that this immutable, device-agnostic handle cannot
        // hold: the GPU is reached through an `attnrt_cuda_layer` handle instead.
        attnrt_backend::ATTNRT_BACKEND_CUDA => Err(unavailable(
            "attnrt_forward does not run on CUDA: a GPU needs a per-device handle; create one \
             with attnrt_cuda_layer_new and call attnrt_cuda_forward_host or \
             attnrt_cuda_forward_device",
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
        Plan::Reference => layer.forward_reference(inputs, workspace, out)?,
        Plan::CpuSimd => layer.forward_cpu(inputs, workspace, out, pool)?,
    };
    report(ran)
}

/// The ABI's name for the backend the runtime reports.
pub(crate) fn report(ran: Backend) -> FfiResult<attnrt_backend> {
    match ran {
        Backend::Reference => Ok(attnrt_backend::ATTNRT_BACKEND_REFERENCE),
        Backend::CpuSimd(_) => Ok(attnrt_backend::ATTNRT_BACKEND_CPU_SIMD),
        other => Err(FfiError::new(
            attnrt_status::ATTNRT_STATUS_INTERNAL,
            format!("the runtime ran backend {other}, unknown to this version of the C ABI"),
        )),
    }
}

/// Lanes (workers with their own scratch) of a call with `num_threads`: the width of every
/// pool the ABI builds (`Sequential` 1, `ScopedThreads` and the host's callback
/// `num_threads`), 0 counting as 1. The executor caps it at 64.
pub(crate) fn lanes(num_threads: usize) -> usize {
    num_threads.max(1)
}

/// f32 workspace elements of a call on `plan` with `lanes` lanes: the executor's part plus,
/// when the call builds its own cos/sin table (`with_table`), the table's part (first in the
/// workspace).
pub(crate) fn workspace_elems(
    plan: Plan,
    cfg: &Config,
    batch: usize,
    seq_len: usize,
    lanes: usize,
    with_table: bool,
) -> FfiResult<usize> {
    let exec = exec_elems(plan, cfg, batch, seq_len, lanes)?;
    let table = table_part(cfg, batch, seq_len, with_table)?;
    Ok(exec.checked_add(table).ok_or_else(|| overflow(seq_len))?)
}

/// The most f32 workspace elements any plan needs (what `attnrt_workspace_size` reports).
pub(crate) fn max_workspace_elems(
    cfg: &Config,
    batch: usize,
    seq_len: usize,
    lanes: usize,
    with_table: bool,
) -> FfiResult<usize> {
    let mut most = 0;
    for plan in PLANS {
        most = most.max(workspace_elems(
            plan, cfg, batch, seq_len, lanes, with_table,
        )?);
    }
    Ok(most)
}

/// The cos/sin table's part of the workspace (0 without rotary embedding or `with_table`).
pub(crate) fn table_part(
    cfg: &Config,
    batch: usize,
    seq_len: usize,
    with_table: bool,
) -> FfiResult<usize> {
    if !with_table || cfg.rope().is_none() {
        return Ok(0);
    }
    Ok(batch
        .checked_mul(seq_len)
        .and_then(|tokens| table_elems(tokens, cfg.head_dim))
        .ok_or_else(|| overflow(seq_len))?)
}

/// The executor's part of the workspace.
fn exec_elems(
    plan: Plan,
    cfg: &Config,
    batch: usize,
    seq_len: usize,
    lanes: usize,
) -> FfiResult<usize> {
    // The runtime's sizes saturate instead of overflowing: `usize::MAX` means "too big".
    let n = match plan {
        Plan::Reference => attnrt::reference_workspace_len(cfg, seq_len),
        Plan::CpuSimd => {
            let tokens = batch
                .checked_mul(seq_len)
                .ok_or_else(|| overflow(seq_len))?;
            attnrt::cpu_workspace_len(cfg, tokens, lanes)
        }
    };
    if n == usize::MAX {
        return Err(overflow(seq_len).into());
    }
    Ok(n)
}

fn overflow(seq_len: usize) -> attnrt::Error {
    attnrt::Error::InputValue {
        name: "seq_len",
        index: 0,
        value: seq_len as i64,
        rule: "the workspace size overflows a size_t",
    }
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
            let plan = select(requested, &cfg, batch, seq_len)?;
            // The size at one thread (a call with more lanes needs more).
            workspace_elems(plan, &cfg, batch, seq_len, 1, true).map(|_| ())
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tier_values_and_names_follow_the_runtime() {
        for t in Tier::ALL {
            let p = attnrt_simd_tier_name(attnrt_simd_tier::of(t) as u32);
            assert!(!p.is_null());
            // SAFETY: a static NUL-terminated string.
            let name = unsafe { core::ffi::CStr::from_ptr(p) };
            assert_eq!(name.to_str().unwrap(), t.name());
        }
        assert!(attnrt_simd_tier_name(4).is_null());
        assert!(attnrt_simd_tier_name(u32::MAX).is_null());
    }

    #[test]
    fn workspace_grows_with_lanes_up_to_64() {
        let cfg = attnrt::Config::new(64, 4);
        let at = |lanes| max_workspace_elems(&cfg, 2, 40, lanes, true).unwrap();
        assert!(at(1) < at(2) && at(2) < at(3));
        assert_eq!(at(64), at(65));
        assert_eq!(at(64), at(usize::MAX));
        assert_eq!(lanes(0), 1);
    }
}
