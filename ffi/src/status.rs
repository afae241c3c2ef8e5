//! The one status enum of the ABI and the mapping of runtime errors onto it.

use core::ffi::c_char;

/// The result of every call. Values are stable: a code is never renumbered or reused, and a
/// retired code stays reserved.
///
/// Ranges: 0 success; 1xx a bad argument at the C level (pointer, enum value, buffer
/// overlap); 2xx a shape or value of the call that does not fit the layer; 3xx an invalid
/// configuration; 4xx a backend that cannot serve the request; 5xx a device (CUDA) error;
/// 9xx internal errors and caught panics.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum attnrt_status {
    /// Success.
    ATTNRT_STATUS_OK = 0,

    /// A required pointer argument or buffer is NULL.
    ATTNRT_STATUS_NULL_POINTER = 100,
    /// A buffer's start is not aligned for its element type.
    ATTNRT_STATUS_MISALIGNED_POINTER = 101,
    /// An enumeration value (dtype, backend, qk_norm, rope convention or scaling) is out of range.
    ATTNRT_STATUS_BAD_ENUM = 102,
    /// A buffer length overflows the address space (`len * element size > PTRDIFF_MAX`), or an
    /// integer argument does not fit its type on this platform.
    ATTNRT_STATUS_LENGTH_OVERFLOW = 103,
    /// The output or workspace buffer overlaps another buffer of the call.
    ATTNRT_STATUS_ALIASED_BUFFERS = 104,
    /// Bytes could not be viewed as elements (length not a multiple of the element size).
    ATTNRT_STATUS_BAD_BYTES = 105,
    /// The host's parallel-for did not run every task exactly once.
    ATTNRT_STATUS_PARALLEL_FOR_CONTRACT = 106,
    /// The message did not fit the caller's buffer and was truncated (returned only by
    /// `attnrt_error_message`).
    ATTNRT_STATUS_TRUNCATED = 107,

    /// An input or output buffer has the wrong length for the call's shapes (`x`, `out`,
    /// `seq_lens`, `document_ids`, `cu_seqlens`, `position_ids`, `freqs_cis`).
    ATTNRT_STATUS_INPUT_SHAPE = 200,
    /// A value inside an input is out of range (a length outside `0..=T`, a `cu_seqlens` that
    /// does not start at 0, end at T or decreases, `max_seqlen` too small, a negative position,
    /// shapes whose product overflows).
    ATTNRT_STATUS_INPUT_VALUE = 201,
    /// A rotary position at or past the end of the caller's `freqs_cis` table.
    ATTNRT_STATUS_POSITION_OUT_OF_TABLE = 202,
    /// The workspace is shorter than the call needs (see `attnrt_workspace_size`).
    ATTNRT_STATUS_WORKSPACE_TOO_SMALL = 203,
    /// A weight tensor has the wrong number of elements for the configuration.
    ATTNRT_STATUS_WEIGHT_SHAPE = 204,
    /// A weight the configuration needs is missing, or one it has no use for was given.
    ATTNRT_STATUS_WEIGHT_PRESENCE = 205,
    /// KV cache full: a sequence's blocks cannot hold the tokens the call needs (`cached +
    /// new_tokens`, or `window + new_tokens - 1` for a rolling cache). Give it more blocks.
    ATTNRT_STATUS_KV_CACHE_FULL = 206,
    /// A block table names a block outside the cache's pool, or one block twice in one call.
    ATTNRT_STATUS_KV_BLOCK = 207,

    /// A configuration field breaks its rule (zero heads, `sliding_window` 0, odd `head_dim`
    /// with rotary embedding, ...).
    ATTNRT_STATUS_CONFIG = 300,
    /// A floating-point configuration field breaks its rule (`rmsnorm_eps`, `rope_theta`, a
    /// scaling parameter not finite and > 0, ...).
    ATTNRT_STATUS_CONFIG_FLOAT = 301,
    /// Two configuration fields do not fit together (`n_embd` not divisible by `n_head`, ...).
    ATTNRT_STATUS_CONFIG_PAIR = 302,

    /// The request is valid, but the backend that would run it cannot serve it (for example a
    /// `freqs_cis` table given to a layer without rotary embedding).
    ATTNRT_STATUS_UNSUPPORTED = 400,
    /// The requested backend is not available in this build or on this machine. A forced
    /// backend never falls back to another one.
    ATTNRT_STATUS_BACKEND_UNAVAILABLE = 401,

    /// A CUDA driver call failed (no driver or device, out of device memory, a launch or copy
    /// that failed); the message names the call and the driver's error.
    ATTNRT_STATUS_DEVICE = 500,
    /// A cuBLAS call failed; the message names the function and its status.
    ATTNRT_STATUS_DEVICE_BLAS = 501,
    /// A call larger than the device buffers the CUDA layer was set up for (`max_batch`,
    /// `max_seq_len`).
    ATTNRT_STATUS_DEVICE_CAPACITY = 502,
    /// An NCCL call of a multi-GPU layer failed (communicator set-up, a collective); the
    /// message names the function and NCCL's error.
    ATTNRT_STATUS_DEVICE_COLLECTIVE = 503,

    /// A panic inside the library was caught at the boundary. The library stays usable; the
    /// contents of the call's output buffer are unspecified.
    ATTNRT_STATUS_PANIC = 900,
    /// An error of the runtime this version of the ABI does not know (a newer runtime).
    ATTNRT_STATUS_INTERNAL = 901,
    /// Memory for a handle (a layer's copy of the weights, a KV cache's pools, a CUDA or
    /// sharded layer's copies) could not be allocated.
    ATTNRT_STATUS_OUT_OF_MEMORY = 902,
}

impl attnrt_status {
    /// The status of a runtime error: one status per [`attnrt::Error`] variant.
    pub(crate) fn of(err: &attnrt::Error) -> attnrt_status {
        use attnrt::Error as E;
        use attnrt_status as S;
        match err {
            E::Config { .. } => S::ATTNRT_STATUS_CONFIG,
            E::ConfigFloat { .. } => S::ATTNRT_STATUS_CONFIG_FLOAT,
            E::ConfigPair { .. } => S::ATTNRT_STATUS_CONFIG_PAIR,
            E::WeightShape { .. } => S::ATTNRT_STATUS_WEIGHT_SHAPE,
            E::WeightPresence { .. } => S::ATTNRT_STATUS_WEIGHT_PRESENCE,
            E::Bytes { .. } => S::ATTNRT_STATUS_BAD_BYTES,
            E::InputShape { .. } => S::ATTNRT_STATUS_INPUT_SHAPE,
            E::InputValue { .. } => S::ATTNRT_STATUS_INPUT_VALUE,
            E::PositionOutOfTable { .. } => S::ATTNRT_STATUS_POSITION_OUT_OF_TABLE,
            E::Workspace { .. } => S::ATTNRT_STATUS_WORKSPACE_TOO_SMALL,
            E::Unsupported { .. } => S::ATTNRT_STATUS_UNSUPPORTED,
            _ => S::ATTNRT_STATUS_INTERNAL,
        }
    }

    /// The name of the constant, NUL-terminated.
    fn name(self) -> &'static str {
        use attnrt_status as S;
        match self {
            S::ATTNRT_STATUS_OK => "ATTNRT_STATUS_OK\0",
            S::ATTNRT_STATUS_NULL_POINTER => "ATTNRT_STATUS_NULL_POINTER\0",
            S::ATTNRT_STATUS_MISALIGNED_POINTER => "ATTNRT_STATUS_MISALIGNED_POINTER\0",
            S::ATTNRT_STATUS_BAD_ENUM => "ATTNRT_STATUS_BAD_ENUM\0",
            S::ATTNRT_STATUS_LENGTH_OVERFLOW => "ATTNRT_STATUS_LENGTH_OVERFLOW\0",
            S::ATTNRT_STATUS_ALIASED_BUFFERS => "ATTNRT_STATUS_ALIASED_BUFFERS\0",
            S::ATTNRT_STATUS_BAD_BYTES => "ATTNRT_STATUS_BAD_BYTES\0",
            S::ATTNRT_STATUS_PARALLEL_FOR_CONTRACT => "ATTNRT_STATUS_PARALLEL_FOR_CONTRACT\0",
            S::ATTNRT_STATUS_TRUNCATED => "ATTNRT_STATUS_TRUNCATED\0",
            S::ATTNRT_STATUS_INPUT_SHAPE => "ATTNRT_STATUS_INPUT_SHAPE\0",
            S::ATTNRT_STATUS_INPUT_VALUE => "ATTNRT_STATUS_INPUT_VALUE\0",
            S::ATTNRT_STATUS_POSITION_OUT_OF_TABLE => "ATTNRT_STATUS_POSITION_OUT_OF_TABLE\0",
            S::ATTNRT_STATUS_WORKSPACE_TOO_SMALL => "ATTNRT_STATUS_WORKSPACE_TOO_SMALL\0",
            S::ATTNRT_STATUS_WEIGHT_SHAPE => "ATTNRT_STATUS_WEIGHT_SHAPE\0",
            S::ATTNRT_STATUS_WEIGHT_PRESENCE => "ATTNRT_STATUS_WEIGHT_PRESENCE\0",
            S::ATTNRT_STATUS_KV_CACHE_FULL => "ATTNRT_STATUS_KV_CACHE_FULL\0",
            S::ATTNRT_STATUS_KV_BLOCK => "ATTNRT_STATUS_KV_BLOCK\0",
            S::ATTNRT_STATUS_CONFIG => "ATTNRT_STATUS_CONFIG\0",
            S::ATTNRT_STATUS_CONFIG_FLOAT => "ATTNRT_STATUS_CONFIG_FLOAT\0",
            S::ATTNRT_STATUS_CONFIG_PAIR => "ATTNRT_STATUS_CONFIG_PAIR\0",
            S::ATTNRT_STATUS_UNSUPPORTED => "ATTNRT_STATUS_UNSUPPORTED\0",
            S::ATTNRT_STATUS_BACKEND_UNAVAILABLE => "ATTNRT_STATUS_BACKEND_UNAVAILABLE\0",
            S::ATTNRT_STATUS_DEVICE => "ATTNRT_STATUS_DEVICE\0",
            S::ATTNRT_STATUS_DEVICE_BLAS => "ATTNRT_STATUS_DEVICE_BLAS\0",
            S::ATTNRT_STATUS_DEVICE_CAPACITY => "ATTNRT_STATUS_DEVICE_CAPACITY\0",
            S::ATTNRT_STATUS_DEVICE_COLLECTIVE => "ATTNRT_STATUS_DEVICE_COLLECTIVE\0",
            S::ATTNRT_STATUS_PANIC => "ATTNRT_STATUS_PANIC\0",
            S::ATTNRT_STATUS_INTERNAL => "ATTNRT_STATUS_INTERNAL\0",
            S::ATTNRT_STATUS_OUT_OF_MEMORY => "ATTNRT_STATUS_OUT_OF_MEMORY\0",
        }
    }

    /// Every status, in declaration order.
    const ALL: [attnrt_status; 29] = {
        use attnrt_status as S;
        [
            S::ATTNRT_STATUS_OK,
            S::ATTNRT_STATUS_NULL_POINTER,
            S::ATTNRT_STATUS_MISALIGNED_POINTER,
            S::ATTNRT_STATUS_BAD_ENUM,
            S::ATTNRT_STATUS_LENGTH_OVERFLOW,
            S::ATTNRT_STATUS_ALIASED_BUFFERS,
            S::ATTNRT_STATUS_BAD_BYTES,
            S::ATTNRT_STATUS_PARALLEL_FOR_CONTRACT,
            S::ATTNRT_STATUS_TRUNCATED,
            S::ATTNRT_STATUS_INPUT_SHAPE,
            S::ATTNRT_STATUS_INPUT_VALUE,
            S::ATTNRT_STATUS_POSITION_OUT_OF_TABLE,
            S::ATTNRT_STATUS_WORKSPACE_TOO_SMALL,
            S::ATTNRT_STATUS_WEIGHT_SHAPE,
            S::ATTNRT_STATUS_WEIGHT_PRESENCE,
            S::ATTNRT_STATUS_KV_CACHE_FULL,
            S::ATTNRT_STATUS_KV_BLOCK,
            S::ATTNRT_STATUS_CONFIG,
            S::ATTNRT_STATUS_CONFIG_FLOAT,
            S::ATTNRT_STATUS_CONFIG_PAIR,
            S::ATTNRT_STATUS_UNSUPPORTED,
            S::ATTNRT_STATUS_BACKEND_UNAVAILABLE,
            S::ATTNRT_STATUS_DEVICE,
            S::ATTNRT_STATUS_DEVICE_BLAS,
            S::ATTNRT_STATUS_DEVICE_CAPACITY,
            S::ATTNRT_STATUS_DEVICE_COLLECTIVE,
            S::ATTNRT_STATUS_PANIC,
            S::ATTNRT_STATUS_INTERNAL,
            S::ATTNRT_STATUS_OUT_OF_MEMORY,
        ]
    };
}

/// The name of a status constant (`"ATTNRT_STATUS_WEIGHT_SHAPE"`), or NULL for a value that is
/// not a status.
///
/// The string is static and NUL-terminated: never free it. Thread-safe; never fails.
#[no_mangle]
pub extern "C" fn attnrt_status_name(status: u32) -> *const c_char {
    attnrt_status::ALL
        .iter()
        .find(|s| **s as u32 == status)
        .map_or(core::ptr::null(), |s| s.name().as_ptr().cast())
}
