//! Errors of the CUDA executor: values with messages, never panics.

use core::fmt;

/// Any failure of the CUDA executor.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum Error {
    /// The inputs or the configuration break a rule of the runtime (the same error every
    /// executor of `attnrt` returns for the same call).
    Runtime(attnrt::Error),
    /// The crate was built without the `cuda` feature.
    NoCuda,
    /// A CUDA driver call failed.
    Cuda {
        /// The operation.
        call: &'static str,
        /// The driver's message.
        message: String,
    },
    /// A cuBLAS call failed.
    Cublas {
        /// The function.
        call: &'static str,
        /// Its `cublasStatus_t`.
        status: i32,
    },
    /// An NCCL call failed (multi-GPU head split).
    Nccl {
        /// The function.
        call: &'static str,
        /// NCCL's message and `ncclResult_t`.
        message: String,
    },
    /// This executor cannot serve the request; the message says why.
    Unsupported(String),
    /// A call larger than the buffers sized at set-up.
    Capacity {
        /// What is too large.
        what: &'static str,
        /// The call's value.
        value: usize,
        /// The most the layer was set up for.
        max: usize,
    },
}

/// `Result` with [`Error`].
pub type Result<T> = core::result::Result<T, Error>;

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Runtime(e) => write!(f, "{e}"),
            Error::NoCuda => f.write_str("attnrt built without CUDA (feature `cuda` off)"),
            Error::Cuda { call, message } => write!(f, "CUDA {call} failed: {message}"),
            Error::Cublas { call, status } => {
                write!(f, "cuBLAS {call} failed with status {status}")
            }
            Error::Nccl { call, message } => write!(f, "NCCL {call} failed: {message}"),
            Error::Unsupported(why) => write!(f, "unsupported on the CUDA executor: {why}"),
            Error::Capacity { what, value, max } => {
                write!(
                    f,
                    "{what} = {value} exceeds the {max} this GPU layer was set up for"
                )
            }
        }
    }
}

impl std::error::Error for Error {}

impl From<attnrt::Error> for Error {
    fn from(e: attnrt::Error) -> Error {
        Error::Runtime(e)
    }
}
