//! The handful of cuBLAS functions the executor needs, bound by hand (libcublas.so.13).

use std::ffi::c_void;

use crate::error::{Error, Result};

/// `cublasHandle_t`.
pub type Handle = *mut c_void;

/// `CUBLAS_OP_N`.
pub const OP_N: i32 = 0;
/// `CUBLAS_OP_T`.
pub const OP_T: i32 = 1;
/// `CUDA_R_32F`.
pub const R_32F: i32 = 0;
/// `CUDA_R_16F`.
pub const R_16F: i32 = 2;
/// `CUDA_R_16BF`.
pub const R_16BF: i32 = 14;
/// `CUBLAS_COMPUTE_32F`: plain f32 arithmetic (no TF32).
pub const COMPUTE_32F: i32 = 68;
/// `CUBLAS_GEMM_DEFAULT`.
pub const GEMM_DEFAULT: i32 = -1;
/// `CUBLAS_DEFAULT_MATH`.
pub const DEFAULT_MATH: i32 = 0;

#[link(name = "cublas")]
extern "C" {
    fn cublasCreate_v2(handle: *mut Handle) -> i32;
    fn cublasDestroy_v2(handle: Handle) -> i32;
    fn cublasSetStream_v2(handle: Handle, stream: *mut c_void) -> i32;
    fn cublasSetMathMode(handle: Handle, mode: i32) -> i32;
    fn cublasGemmEx(
        handle: Handle,
        transa: i32,
        transb: i32,
        m: i32,
        n: i32,
        k: i32,
        alpha: *const c_void,
        a: *const c_void,
        a_type: i32,
        lda: i32,
        b: *const c_void,
        b_type: i32,
        ldb: i32,
        beta: *const c_void,
        c: *mut c_void,
        c_type: i32,
        ldc: i32,
        compute: i32,
        algo: i32,
    ) -> i32;
}

fn check(call: &'static str, status: i32) -> Result<()> {
    if status == 0 {
        Ok(())
    } else {
        Err(Error::Cublas { call, status })
    }
}

/// An owned cuBLAS handle (created in the current context).
pub struct Cublas {
    handle: Handle,
}

// SAFETY: a cuBLAS handle may be used from any thread as long as calls on it are not concurrent;
// `GpuLayer` only uses it through `&mut self`.
unsafe impl Send for Cublas {}

impl Cublas {
    /// Creates a handle with plain f32 math (no TF32 for f32 GEMMs).
    pub fn new() -> Result<Cublas> {
        let mut handle: Handle = std::ptr::null_mut();
        // SAFETY: `handle` is a valid out-pointer; a context is current (set by the caller).
        check("cublasCreate_v2", unsafe { cublasCreate_v2(&mut handle) })?;
        let me = Cublas { handle };
        // SAFETY: the handle was just created.
        check("cublasSetMathMode", unsafe {
            cublasSetMathMode(me.handle, DEFAULT_MATH)
        })?;
        Ok(me)
    }

    /// `y[m, n] = x[m, k] W[n, k]^T` (row-major, f32 accumulation) on `stream`.
    ///
    /// # Safety
    /// `w`, `x` and `y` are device pointers to at least `n*k`, `m*k` and `m*n` elements of the
    /// given types, and `stream` is a valid stream of the current context.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn linear(
        &mut self,
        stream: *mut c_void,
        m: usize,
        n: usize,
        k: usize,
        w: u64,
        x: u64,
        in_type: i32,
        y: u64,
        out_type: i32,
    ) -> Result<()> {
        let dims = |v: usize| {
            i32::try_from(v)
                .map_err(|_| Error::Unsupported(format!("GEMM dimension {v} exceeds i32")))
        };
        let (mi, ni, ki) = (dims(m)?, dims(n)?, dims(k)?);
        let (alpha, beta) = (1.0f32, 0.0f32);
        // SAFETY: the handle is live; the stream is valid per the caller's contract.
        check("cublasSetStream_v2", unsafe {
            cublasSetStream_v2(self.handle, stream)
        })?;
        // Column-major view: y^T[n, m] = W[n, k] (stored k-major, op T) * x^T[k, m].
        // SAFETY: pointers and sizes per the caller's contract; alpha/beta are host f32 scalars
        // as the default pointer mode expects.
        check("cublasGemmEx", unsafe {
            cublasGemmEx(
                self.handle,
                OP_T,
                OP_N,
                ni,
                mi,
                ki,
                (&alpha as *const f32).cast(),
                w as *const c_void,
                in_type,
                ki,
                x as *const c_void,
                in_type,
                ki,
                (&beta as *const f32).cast(),
                y as *mut c_void,
                out_type,
                ni,
                COMPUTE_32F,
                GEMM_DEFAULT,
            )
        })
    }
}

impl Drop for Cublas {
    fn drop(&mut self) {
        // SAFETY: the handle is live and dropped once.
        unsafe {
            cublasDestroy_v2(self.handle);
        }
    }
}
