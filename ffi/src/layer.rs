//! `attnrt_layer`: a configuration plus its own copy of the weights, and the forward call.

use core::ffi::c_void;

use attnrt::{Config, Inputs, Layer, LayerWeights, MaskInputs, PoolMemory, RopeTable, Tensor};
use half::{bf16, f16};

use crate::backend::{
    attnrt_backend, dispatch, lanes, max_workspace_elems, select, table_part, workspace_elems,
};
use crate::config::attnrt_config;
use crate::error::{FfiError, FfiResult};
use crate::panic::guard;
use crate::pool::{IdlePools, Pool};
use crate::ptr::{
    as_ref, check, check_out, free_boxed, opt_slice, overlaps, slice, slice_mut, span, write_out,
};
use crate::status::attnrt_status;

/// Storage type of a weight tensor (`attnrt_tensor::dtype`).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum attnrt_dtype {
    /// IEEE binary32 (`float`).
    ATTNRT_DTYPE_F32 = 0,
    /// IEEE binary16, as its 16 bits (`uint16_t`).
    ATTNRT_DTYPE_F16 = 1,
    /// bfloat16, as its 16 bits (`uint16_t`).
    ATTNRT_DTYPE_BF16 = 2,
}

/// A view of one weight tensor: `len` elements of `dtype` at `data`, flat and row-major.
/// `data == NULL` means the tensor is absent (then `len` and `dtype` are ignored). `data` must
/// be aligned to its element size (4 bytes for f32, 2 for f16/bf16).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct attnrt_tensor {
    /// First element, or NULL for an absent tensor.
    pub data: *const c_void,
    /// Number of elements (not bytes).
    pub len: usize,
    /// An `attnrt_dtype` value.
    pub dtype: u32,
}

/// The weights of one layer (SPEC.md, "Weights"), `[out_features, in_features]` row-major.
/// Each tensor is present iff the configuration uses it: `bq`..`bo` per the bias flags,
/// `q_norm`/`k_norm` iff QK-norm is on. Tensors may mix dtypes.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct attnrt_weights {
    /// `[n_head * head_dim, n_embd]`.
    pub wq: attnrt_tensor,
    /// `[n_kv_head * head_dim, n_embd]`.
    pub wk: attnrt_tensor,
    /// `[n_kv_head * head_dim, n_embd]`.
    pub wv: attnrt_tensor,
    /// `[n_embd, n_head * head_dim]`.
    pub wo: attnrt_tensor,
    /// `[n_head * head_dim]` or absent.
    pub bq: attnrt_tensor,
    /// `[n_kv_head * head_dim]` or absent.
    pub bk: attnrt_tensor,
    /// `[n_kv_head * head_dim]` or absent.
    pub bv: attnrt_tensor,
    /// `[n_embd]` or absent.
    pub bo: attnrt_tensor,
    /// `[head_dim]` (per-head) or `[n_head * head_dim]` (full) or absent.
    pub q_norm: attnrt_tensor,
    /// `[head_dim]` (per-head) or `[n_kv_head * head_dim]` (full) or absent.
    pub k_norm: attnrt_tensor,
}

/// One tensor owned by a layer handle, placed as a KV pool is ([`PoolMemory`]: 2 MiB pages
/// where the OS gives them), since one-token decode reads every weight once per token.
#[derive(Debug)]
pub(crate) enum Owned {
    F32(PoolMemory<f32>),
    F16(PoolMemory<f16>),
    Bf16(PoolMemory<bf16>),
}

fn copy<T: Copy>(s: &[T]) -> FfiResult<PoolMemory<T>> {
    PoolMemory::copied(s).map_err(|_| {
        FfiError::new(
            attnrt_status::ATTNRT_STATUS_OUT_OF_MEMORY,
            format!("cannot allocate {} elements for a weight copy", s.len()),
        )
    })
}

impl Owned {
    pub(crate) fn of(t: &Tensor<'_>) -> FfiResult<Owned> {
        Ok(match t {
            Tensor::F32(s) => Owned::F32(copy(s)?),
            Tensor::F16(s) => Owned::F16(copy(s)?),
            Tensor::Bf16(s) => Owned::Bf16(copy(s)?),
        })
    }

    pub(crate) fn view(&self) -> Tensor<'_> {
        match self {
            Owned::F32(v) => Tensor::F32(v),
            Owned::F16(v) => Tensor::F16(v),
            Owned::Bf16(v) => Tensor::Bf16(v),
        }
    }
}

/// An attention layer: a validated configuration and a private copy of its weights.
///
/// Opaque. Created by [`attnrt_layer_new`], freed by [`attnrt_layer_free`]. Its configuration
/// and weights are immutable after creation and its kept threads are handed out under a lock,
/// so any number of threads may run forward calls on one handle at once.
#[derive(Debug)]
pub struct attnrt_layer {
    pub(crate) cfg: Config,
    /// wq, wk, wv, wo, bq, bk, bv, bo, q_norm, k_norm.
    tensors: [Option<Owned>; 10],
    /// Threads of `num_threads` calls between calls (the only state that changes: a forward
    /// call takes a pool and gives it back, under a lock).
    pub(crate) idle: IdlePools,
}

impl attnrt_layer {
    /// The runtime's view of this layer (validation of a few lengths, no copies).
    pub(crate) fn runtime(&self) -> FfiResult<Layer<'_>> {
        Ok(Layer::new(self.cfg, self.weights()?)?)
    }

    /// Validates the caller's configuration and weights, then copies them.
    ///
    /// # Safety
    /// Each non-null tensor `data` of `w` must be valid for reads of `len` elements of its dtype.
    pub(crate) unsafe fn from_c(
        config: &attnrt_config,
        w: &attnrt_weights,
    ) -> FfiResult<attnrt_layer> {
        let cfg = config.validated()?;
        let named = [
            ("wq", &w.wq),
            ("wk", &w.wk),
            ("wv", &w.wv),
            ("wo", &w.wo),
            ("bq", &w.bq),
            ("bk", &w.bk),
            ("bv", &w.bv),
            ("bo", &w.bo),
            ("q_norm", &w.q_norm),
            ("k_norm", &w.k_norm),
        ];
        let mut views: [Option<Tensor<'_>>; 10] = [None; 10];
        for (slot, (name, t)) in views.iter_mut().zip(named) {
            // SAFETY: the contract of this function.
            *slot = unsafe { view(name, t) }?;
        }
        let missing = |name: &'static str| attnrt::Error::WeightPresence {
            name,
            required: true,
        };
        let borrowed = LayerWeights {
            wq: views[0].ok_or(missing("wq"))?,
            wk: views[1].ok_or(missing("wk"))?,
            wv: views[2].ok_or(missing("wv"))?,
            wo: views[3].ok_or(missing("wo"))?,
            bq: views[4],
            bk: views[5],
            bv: views[6],
            bo: views[7],
            q_norm: views[8],
            k_norm: views[9],
        };
        // Validate on the caller's buffers first, copy only what passed.
        Layer::new(cfg, borrowed)?;
        let mut tensors: [Option<Owned>; 10] = Default::default();
        for (slot, v) in tensors.iter_mut().zip(&views) {
            *slot = v.as_ref().map(Owned::of).transpose()?;
        }
        Ok(attnrt_layer {
            cfg,
            tensors,
            idle: IdlePools::default(),
        })
    }

    /// A deep copy (configuration and every weight tensor).
    pub(crate) fn try_clone(&self) -> FfiResult<attnrt_layer> {
        let mut tensors: [Option<Owned>; 10] = Default::default();
        for (slot, t) in tensors.iter_mut().zip(&self.tensors) {
            *slot = t.as_ref().map(|o| Owned::of(&o.view())).transpose()?;
        }
        Ok(attnrt_layer {
            cfg: self.cfg,
            tensors,
            idle: IdlePools::default(),
        })
    }

    /// Views of the handle's weights.
    pub(crate) fn weights(&self) -> FfiResult<LayerWeights<'_>> {
        let t = |i: usize| self.tensors[i].as_ref().map(Owned::view);
        let need = |i: usize| {
            t(i).ok_or_else(|| {
                FfiError::new(
                    attnrt_status::ATTNRT_STATUS_INTERNAL,
                    "layer handle lost a weight",
                )
            })
        };
        let weights = LayerWeights {
            wq: need(0)?,
            wk: need(1)?,
            wv: need(2)?,
            wo: need(3)?,
            bq: t(4),
            bk: t(5),
            bv: t(6),
            bo: t(7),
            q_norm: t(8),
            k_norm: t(9),
        };
        Ok(weights)
    }
}

/// The caller's tensor as a borrowed runtime view, or `None` when absent.
///
/// # Safety
/// A non-null `t.data` must be valid for reads of `t.len` elements of `t.dtype`.
unsafe fn view<'a>(name: &str, t: &attnrt_tensor) -> FfiResult<Option<Tensor<'a>>> {
    if t.data.is_null() {
        return Ok(None);
    }
    let (data, len) = (t.data, t.len);
    Ok(Some(match t.dtype {
        // SAFETY: forwarded contract (`len` f32 at `data`).
        0 => Tensor::F32(unsafe { slice(name, data.cast::<f32>(), len) }?),
        // SAFETY: forwarded contract; `f16` is `repr(transparent)` over `u16`.
        1 => Tensor::F16(unsafe { slice(name, data.cast::<f16>(), len) }?),
        // SAFETY: forwarded contract; `bf16` is `repr(transparent)` over `u16`.
        2 => Tensor::Bf16(unsafe { slice(name, data.cast::<bf16>(), len) }?),
        v => {
            return Err(FfiError::bad_enum(
                &format!("{name}.dtype"),
                v,
                "an attnrt_dtype, 0..=2",
            ))
        }
    }))
}

/// Creates a layer from a configuration and weights, validating both.
///
/// The configuration and every weight tensor are COPIED into the handle: the caller's
/// `config`, `weights` and tensor buffers may be freed or reused as soon as this returns.
/// On success `*out` receives a new handle, to be freed with [`attnrt_layer_free`]; on error
/// `*out` is untouched.
///
/// Errors: `ATTNRT_STATUS_NULL_POINTER` (`config`, `weights` or `out` NULL),
/// `ATTNRT_STATUS_MISALIGNED_POINTER`, `ATTNRT_STATUS_BAD_ENUM` (a dtype or configuration enum
/// out of range), `ATTNRT_STATUS_CONFIG*` (invalid configuration),
/// `ATTNRT_STATUS_WEIGHT_SHAPE` / `ATTNRT_STATUS_WEIGHT_PRESENCE` (weights that do not fit the
/// configuration), `ATTNRT_STATUS_OUT_OF_MEMORY`.
///
/// Thread-safe: may be called from any thread, concurrently.
///
/// # Safety
/// `config` and `weights` must each be NULL or point to a valid value; each non-null tensor
/// `data` must be valid for reads of `len` elements of its dtype; `out` must be NULL or valid
/// for a write of one pointer.
#[no_mangle]
pub unsafe extern "C" fn attnrt_layer_new(
    config: *const attnrt_config,
    weights: *const attnrt_weights,
    out: *mut *mut attnrt_layer,
) -> attnrt_status {
    guard(|| {
        // SAFETY: the contract of this function.
        let config = unsafe { as_ref("config", config) }?;
        // SAFETY: the contract of this function.
        let w = unsafe { as_ref("weights", weights) }?;
        check_out("out", out)?;
        // SAFETY: the contract of this function.
        let layer = Box::new(unsafe { attnrt_layer::from_c(config, w) }?);
        // SAFETY: `out` passed `check_out`; valid for one write by the contract.
        unsafe { write_out(out, Box::into_raw(layer)) };
        Ok(())
    })
}

/// Frees a layer made by [`attnrt_layer_new`], stopping and joining the threads it kept for
/// `num_threads` calls. NULL is a no-op.
///
/// Not thread-safe with respect to the handle: every call using `layer` must have returned,
/// and none may start after; the handle must not be freed twice.
///
/// # Safety
/// `layer` must be NULL or a handle from [`attnrt_layer_new`] not yet freed.
#[no_mangle]
pub unsafe extern "C" fn attnrt_layer_free(layer: *mut attnrt_layer) {
    let _ = guard(|| {
        // SAFETY: NULL or a live handle made by `Box::into_raw`, whose every use the caller
        // gives up (this function's contract).
        unsafe { free_boxed(layer) };
        Ok(())
    });
}

/// f32 elements of workspace a forward call on `layer` needs for `batch` rows of `seq_len`
/// tokens with `num_threads` lanes (the `num_threads` the call will pass in
/// `attnrt_forward_args`; 0 counts as 1), on any backend the call may select (the most of the
/// scalar reference and the SIMD executor) and with every option. A call may need less: for a
/// rotary layer the part for the built cos/sin table is needed only when `freqs_cis` is NULL,
/// and a forced REFERENCE call needs no per-lane scratch.
///
/// The SIMD executor keeps scratch per lane, so the size grows with `num_threads` (up to 64
/// lanes; more threads need no more). A forward call whose `num_threads` exceeds the one given
/// here may fail with `ATTNRT_STATUS_WORKSPACE_TOO_SMALL`.
///
/// Writes `*out_elems` on success. Errors: `ATTNRT_STATUS_NULL_POINTER`,
/// `ATTNRT_STATUS_INPUT_VALUE` when the size overflows a `size_t`.
///
/// Thread-safe: may be called concurrently on one handle.
///
/// # Safety
/// `layer` must be NULL or a live handle; `out_elems` NULL or valid for one write.
#[no_mangle]
pub unsafe extern "C" fn attnrt_workspace_size(
    layer: *const attnrt_layer,
    batch: usize,
    seq_len: usize,
    num_threads: usize,
    out_elems: *mut usize,
) -> attnrt_status {
    guard(|| {
        // SAFETY: the contract of this function.
        let layer = unsafe { as_ref("layer", layer) }?;
        check_out("out_elems", out_elems)?;
        let n = max_workspace_elems(&layer.cfg, batch, seq_len, lanes(num_threads), true)?;
        // SAFETY: checked by `check_out`; valid by the contract.
        unsafe { write_out(out_elems, n) };
        Ok(())
    })
}

/// The task the library hands to the host's parallel-for: `task(task_ctx, i)` runs task `i`.
pub type attnrt_task_fn = unsafe extern "C" fn(task_ctx: *mut c_void, i: usize);

/// The host's parallel-for, or NULL: must call `task(task_ctx, i)` exactly once for every `i`
/// in `0..n`, on any threads and in any order (up to `num_threads` at once is what the work
/// is split for), and return only when all calls have returned; `task` must not be called
/// after that. `ctx` is the host's own pointer from `attnrt_forward_args::parallel_ctx`.
///
/// A host that skips a task, repeats one or passes an index `>= n` cannot cause undefined
/// behaviour (work is handed out through atomics, not by index), but the call then fails with
/// `ATTNRT_STATUS_PARALLEL_FOR_CONTRACT` and the output's contents are unspecified.
pub type attnrt_parallel_for_fn = Option<
    unsafe extern "C" fn(ctx: *mut c_void, n: usize, task: attnrt_task_fn, task_ctx: *mut c_void),
>;

/// The arguments of one forward call. Initialise with [`attnrt_forward_args_init`] (all
/// pointers NULL, lengths 0, `max_seqlen` -1, backend AUTO), then set what you use. Every
/// buffer is a pointer followed by its length in elements; an optional buffer is absent when
/// its pointer is NULL (its length must then be 0).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct attnrt_forward_args {
    /// `[batch, seq_len, n_embd]` activations, row-major. Required.
    pub x: *const f32,
    /// Elements of `x`: `batch * seq_len * n_embd`.
    pub x_len: usize,
    /// Batch rows B.
    pub batch: usize,
    /// Tokens per row T.
    pub seq_len: usize,
    /// Optional `[B]` padding lengths, each in `0..=T`.
    pub seq_lens: *const i32,
    /// Elements of `seq_lens`.
    pub seq_lens_len: usize,
    /// Optional `[B, T]` document ids: a query sees only keys of its own document.
    pub document_ids: *const i32,
    /// Elements of `document_ids`.
    pub document_ids_len: usize,
    /// Optional `[S + 1]` varlen boundaries (B must be 1): from 0 to T, non-decreasing.
    pub cu_seqlens: *const i32,
    /// Elements of `cu_seqlens`.
    pub cu_seqlens_len: usize,
    /// The longest varlen segment, at least the true longest; negative = not given.
    pub max_seqlen: i32,
    /// Optional `[B, T]` rotary positions (>= 0); without them token t has position t.
    pub position_ids: *const i32,
    /// Elements of `position_ids`.
    pub position_ids_len: usize,
    /// Optional `[max_pos, head_dim / 2, 2]` cos/sin table (last axis cos, sin). When NULL and
    /// the layer is rotary, the call builds the rows it needs from the configuration's theta
    /// and scaling into the workspace (positions 0..T, or the distinct `position_ids`).
    pub freqs_cis: *const f32,
    /// Elements of `freqs_cis`.
    pub freqs_cis_len: usize,
    /// Scratch memory, at least `attnrt_workspace_size` elements; contents on return are
    /// unspecified. Must not overlap any other buffer of the call.
    pub workspace: *mut f32,
    /// Elements of `workspace`.
    pub workspace_len: usize,
    /// `[batch, seq_len, n_embd]` output; written only on success. Must not overlap any other
    /// buffer of the call.
    pub out: *mut f32,
    /// Elements of `out`: `batch * seq_len * n_embd`.
    pub out_len: usize,
    /// The backend to run, an `attnrt_backend` value. AUTO picks the best available one; any
    /// other value forces that backend and fails with `ATTNRT_STATUS_BACKEND_UNAVAILABLE` or
    /// `ATTNRT_STATUS_UNSUPPORTED` instead of falling back.
    pub backend: u32,
    /// The host's parallel-for, or NULL to use `num_threads`. Called only from the thread
    /// that called `attnrt_forward`, and only during that call (not at all by the REFERENCE
    /// backend, which runs on the calling thread).
    pub parallel_for: attnrt_parallel_for_fn,
    /// The host's context for `parallel_for`, passed back unchanged.
    pub parallel_ctx: *mut c_void,
    /// The number of tasks the host can run at once: the lane count of the SIMD executor
    /// (0 counts as 1; lanes are capped at 64), which sizes its workspace, so pass the same
    /// value to `attnrt_workspace_size`. With `parallel_for` it is that pool's width (the
    /// library calls `parallel_for` with at most this many tasks); without it, 0 or 1 runs on
    /// the calling thread and more runs on that many threads (the calling thread is one of
    /// them; at most 64 are started) that the layer handle keeps between calls: started by the
    /// first call that needs them, spinning 5 ms after each call and then asleep, one set per
    /// call running at once, joined by `attnrt_layer_free`. A host that owns its threads
    /// passes `parallel_for` instead (e.g. [`crate::attnrt_thread_pool_parallel_for`]).
    pub num_threads: usize,
}

impl attnrt_forward_args {
    fn empty() -> attnrt_forward_args {
        attnrt_forward_args {
            x: core::ptr::null(),
            x_len: 0,
            batch: 0,
            seq_len: 0,
            seq_lens: core::ptr::null(),
            seq_lens_len: 0,
            document_ids: core::ptr::null(),
            document_ids_len: 0,
            cu_seqlens: core::ptr::null(),
            cu_seqlens_len: 0,
            max_seqlen: -1,
            position_ids: core::ptr::null(),
            position_ids_len: 0,
            freqs_cis: core::ptr::null(),
            freqs_cis_len: 0,
            workspace: core::ptr::null_mut(),
            workspace_len: 0,
            out: core::ptr::null_mut(),
            out_len: 0,
            backend: attnrt_backend::ATTNRT_BACKEND_AUTO as u32,
            parallel_for: None,
            parallel_ctx: core::ptr::null_mut(),
            num_threads: 0,
        }
    }
}

/// Fills `*out` with empty forward arguments: every pointer NULL, every length 0,
/// `max_seqlen` -1 (not given), backend AUTO, no parallel-for, `num_threads` 0.
///
/// Returns `ATTNRT_STATUS_NULL_POINTER` if `out` is NULL. Thread-safe.
///
/// # Safety
/// `out` must be NULL or valid for a write of one `attnrt_forward_args`.
#[no_mangle]
pub unsafe extern "C" fn attnrt_forward_args_init(out: *mut attnrt_forward_args) -> attnrt_status {
    guard(|| {
        check_out("out", out)?;
        // SAFETY: checked by `check_out`; valid by the contract.
        unsafe { write_out(out, attnrt_forward_args::empty()) };
        Ok(())
    })
}

/// Runs the layer on one batch: `out = attention(x)` under the optional masks.
///
/// Every pointer is null-checked and every length checked against `batch`, `seq_len` and the
/// configuration before anything is computed; on any error `out` and `*backend_ran` are
/// untouched (the workspace may have been written). On success `*backend_ran` receives the
/// backend that ran (never AUTO).
///
/// Errors: `ATTNRT_STATUS_NULL_POINTER` (`layer`, `args`, `backend_ran`, `x`, `workspace`,
/// `out`; or an optional buffer NULL with a nonzero length), `ATTNRT_STATUS_MISALIGNED_POINTER`,
/// `ATTNRT_STATUS_BAD_ENUM` (backend), `ATTNRT_STATUS_ALIASED_BUFFERS`,
/// `ATTNRT_STATUS_INPUT_SHAPE`, `ATTNRT_STATUS_INPUT_VALUE`,
/// `ATTNRT_STATUS_POSITION_OUT_OF_TABLE`, `ATTNRT_STATUS_WORKSPACE_TOO_SMALL`,
/// `ATTNRT_STATUS_CONFIG` / `ATTNRT_STATUS_UNSUPPORTED` / `ATTNRT_STATUS_BACKEND_UNAVAILABLE`
/// (the requested backend cannot run this call), `ATTNRT_STATUS_PARALLEL_FOR_CONTRACT` (the
/// host's parallel-for broke its contract; `out` is then unspecified).
///
/// Thread-safe: any number of threads may call this at once on the same `layer`, each with its
/// own workspace and output.
///
/// # Safety
/// `layer` must be NULL or a live handle; `args` NULL or valid; each non-null buffer in `args`
/// valid for its length (reads; writes for `workspace` and `out`) and not written by anyone
/// else during the call; `backend_ran` NULL or valid for one write; `parallel_for`, when set,
/// must keep the contract of `attnrt_parallel_for_fn`.
#[no_mangle]
pub unsafe extern "C" fn attnrt_forward(
    layer: *const attnrt_layer,
    args: *const attnrt_forward_args,
    backend_ran: *mut attnrt_backend,
) -> attnrt_status {
    guard(|| {
        // SAFETY: the contract of this function.
        let layer = unsafe { as_ref("layer", layer) }?;
        // SAFETY: the contract of this function.
        let a = unsafe { as_ref("args", args) }?;
        check_out("backend_ran", backend_ran)?;
        let requested = attnrt_backend::from_u32(a.backend)?;
        let cfg = &layer.cfg;
        let plan = select(requested, cfg, a.batch, a.seq_len)?;
        let lanes = lanes(a.num_threads);
        // SAFETY: the contract of this function.
        let call = unsafe {
            prepare(cfg, a, false, |with_table| {
                workspace_elems(plan, cfg, a.batch, a.seq_len, lanes, with_table)
            })
        }?;
        let pool = Pool::new(a.parallel_for, a.parallel_ctx, a.num_threads, &layer.idle);
        let ran = dispatch(
            plan,
            &layer.runtime()?,
            &call.inputs,
            call.exec_ws,
            call.out,
            pool.as_dyn(),
        );
        let ran = kept_contract(&pool).and(ran)?;
        // SAFETY: checked by `check_out`; valid by the contract.
        unsafe { write_out(backend_ran, ran) };
        Ok(())
    })
}

/// `ATTNRT_STATUS_PARALLEL_FOR_CONTRACT` when the host's callback broke its contract: this wins
/// over whatever the executor made of it (a host that ran no task makes the executor fail too).
pub(crate) fn kept_contract(pool: &Pool) -> FfiResult<()> {
    if let Pool::Callback(p) = pool {
        if !p.kept_contract() {
            return Err(FfiError::new(
                attnrt_status::ATTNRT_STATUS_PARALLEL_FOR_CONTRACT,
                "the host's parallel_for did not run every task exactly once (or a task \
                 panicked); the output is unspecified",
            ));
        }
    }
    Ok(())
}

/// A forward call's checked buffers: the runtime inputs (with the rotary table, built in the
/// workspace when the caller gave none), the executor's part of the workspace, and the output.
pub(crate) struct Prepared<'a> {
    pub inputs: Inputs<'a>,
    pub exec_ws: &'a mut [f32],
    pub out: &'a mut [f32],
}

/// Checks every buffer of `a` (NULL, alignment, length overflow, overlap of `out` and
/// `workspace` with everything else), checks the workspace against `exec_elems(with_table)`
/// (the executor's part plus, when the call builds its table, the table's), builds the table
/// when the layer is rotary and `freqs_cis` is NULL, and returns the runtime's view. Nothing
/// but the workspace is written. With `workspace_optional`, a NULL workspace of length 0 is
/// accepted (for executors that need none).
///
/// # Safety
/// Every non-null buffer of `a` valid for its length (writes for `workspace`, `out`) and not
/// written by anyone else during `'a`.
pub(crate) unsafe fn prepare<'a>(
    cfg: &Config,
    a: &'a attnrt_forward_args,
    workspace_optional: bool,
    exec_elems: impl FnOnce(bool) -> FfiResult<usize>,
) -> FfiResult<Prepared<'a>> {
    // Read-only inputs first; their byte ranges are checked against the writable buffers
    // below, before any `&mut` is made.
    // SAFETY: the contract of this function (each input valid for its length).
    let x = unsafe { slice("x", a.x, a.x_len) }?;
    // SAFETY: as above.
    let seq_lens = unsafe { opt_slice("seq_lens", a.seq_lens, a.seq_lens_len) }?;
    // SAFETY: as above.
    let document_ids = unsafe { opt_slice("document_ids", a.document_ids, a.document_ids_len) }?;
    // SAFETY: as above.
    let cu_seqlens = unsafe { opt_slice("cu_seqlens", a.cu_seqlens, a.cu_seqlens_len) }?;
    // SAFETY: as above.
    let position_ids = unsafe { opt_slice("position_ids", a.position_ids, a.position_ids_len) }?;
    // SAFETY: as above.
    let freqs_cis = unsafe { opt_slice("freqs_cis", a.freqs_cis, a.freqs_cis_len) }?;

    let no_workspace = workspace_optional && a.workspace.is_null() && a.workspace_len == 0;
    if !no_workspace {
        check("workspace", a.workspace.cast_const(), a.workspace_len)?;
    }
    check("out", a.out.cast_const(), a.out_len)?;
    let ws_span = span(a.workspace.cast_const(), a.workspace_len);
    let out_span = span(a.out.cast_const(), a.out_len);
    let inputs_spans = [
        ("x", span(a.x, a.x_len)),
        ("seq_lens", span(a.seq_lens, a.seq_lens_len)),
        ("document_ids", span(a.document_ids, a.document_ids_len)),
        ("cu_seqlens", span(a.cu_seqlens, a.cu_seqlens_len)),
        ("position_ids", span(a.position_ids, a.position_ids_len)),
        ("freqs_cis", span(a.freqs_cis, a.freqs_cis_len)),
        ("workspace", ws_span),
    ];
    for (name, s) in inputs_spans {
        if overlaps(out_span, s) {
            return Err(aliased("out", name));
        }
        if name != "workspace" && overlaps(ws_span, s) {
            return Err(aliased("workspace", name));
        }
    }
    let workspace: &'a mut [f32] = if no_workspace {
        &mut []
    } else {
        // SAFETY: the contract of this function; no other buffer of the call overlaps it.
        unsafe { slice_mut("workspace", a.workspace, a.workspace_len) }?
    };
    // SAFETY: as above. Written only by the executor, after every check.
    let out = unsafe { slice_mut("out", a.out, a.out_len) }?;

    let mut inputs = Inputs::new(x, a.batch, a.seq_len);
    inputs.mask = MaskInputs {
        seq_lens,
        document_ids,
        cu_seqlens,
        max_seqlen: (a.max_seqlen >= 0).then_some(a.max_seqlen),
    };
    inputs.position_ids = position_ids;

    let build_table = cfg.rope().is_some() && freqs_cis.is_none();
    let needed = exec_elems(build_table)?;
    if workspace.len() < needed {
        return Err(attnrt::Error::Workspace {
            needed,
            actual: workspace.len(),
        }
        .into());
    }
    let table_len = table_part(cfg, a.batch, a.seq_len, build_table)?;
    let (table_ws, exec_ws) = workspace.split_at_mut(table_len);
    let remapped: Option<&[i32]>;
    match (cfg.rope(), freqs_cis) {
        (Some(_), Some(f)) => {
            remapped = None;
            inputs.rope_table = Some(RopeTable::new(f, cfg.head_dim)?);
        }
        (None, Some(_)) => {
            return Err(attnrt::Error::Unsupported {
                what: "freqs_cis given but the layer has no rotary embedding",
            }
            .into())
        }
        (Some(rope), None) => {
            let (table, ids) = crate::table::build(rope, cfg.head_dim, &inputs, table_ws)?;
            remapped = ids;
            inputs.rope_table = Some(table);
        }
        (None, None) => remapped = None,
    }
    if remapped.is_some() {
        inputs.position_ids = remapped;
    }
    Ok(Prepared {
        inputs,
        exec_ws,
        out,
    })
}

pub(crate) fn aliased(a: &str, b: &str) -> FfiError {
    FfiError::new(
        attnrt_status::ATTNRT_STATUS_ALIASED_BUFFERS,
        format!("{a} overlaps {b}; writable buffers must not share memory with any other"),
    )
}

#[cfg(test)]
mod tests {
    //! One tiny layer end to end through the exported functions: small enough for Miri, which
    //! then checks every pointer-to-slice conversion, the workspace split, the executor's shared
    //! buffers and the host-callback trampoline (with threads) of a real forward call.
    use super::*;
    use crate::config::attnrt_config_default;

    /// A host that runs the tasks on two threads.
    unsafe extern "C" fn two_threads(
        _: *mut c_void,
        n: usize,
        task: crate::layer::attnrt_task_fn,
        task_ctx: *mut c_void,
    ) {
        /// The task context, sent to the second thread with its provenance.
        #[derive(Clone, Copy)]
        struct Ctx(*mut c_void);
        // SAFETY: the library documents `task_ctx` as usable from any thread during the call.
        unsafe impl Send for Ctx {}
        let ctx = Ctx(task_ctx);
        let run = move |i: usize| {
            let ctx = ctx;
            // SAFETY: the library's task and context, each index once, during this call.
            unsafe { task(ctx.0, i) }
        };
        std::thread::scope(|s| {
            let h = s.spawn(move || (0..n).step_by(2).for_each(run));
            (1..n).step_by(2).for_each(run);
            h.join().unwrap();
        });
    }

    fn run(layer: *const attnrt_layer, backend: u32, threads: usize, host: bool) -> Vec<f32> {
        let (b, t, c) = (1, 5, 8);
        let x: Vec<f32> = (0..b * t * c).map(|i| (i % 7) as f32 / 7.0 - 0.5).collect();
        let pos: Vec<i32> = vec![3, 0, 9, 9, 1];
        let mut ws_len = 0;
        // SAFETY: live handle, valid out pointer.
        let st = unsafe { attnrt_workspace_size(layer, b, t, threads, &mut ws_len) };
        assert_eq!(st, attnrt_status::ATTNRT_STATUS_OK);
        let mut ws = vec![0.0f32; ws_len];
        let mut out = vec![0.0f32; b * t * c];
        let mut a = attnrt_forward_args::empty();
        (a.x, a.x_len, a.batch, a.seq_len) = (x.as_ptr(), x.len(), b, t);
        (a.position_ids, a.position_ids_len) = (pos.as_ptr(), pos.len());
        (a.workspace, a.workspace_len) = (ws.as_mut_ptr(), ws.len());
        (a.out, a.out_len) = (out.as_mut_ptr(), out.len());
        (a.backend, a.num_threads) = (backend, threads);
        if host {
            a.parallel_for = Some(two_threads);
        }
        let mut ran = attnrt_backend::ATTNRT_BACKEND_AUTO;
        // SAFETY: live handle; every buffer valid for its length and disjoint.
        let st = unsafe { attnrt_forward(layer, &a, &mut ran) };
        assert_eq!(st, attnrt_status::ATTNRT_STATUS_OK);
        assert_eq!(ran as u32, if backend == 1 { 1 } else { 2 });
        out
    }

    #[test]
    fn a_tiny_layer_through_every_pool() {
        let mut cfg = core::mem::MaybeUninit::uninit();
        // SAFETY: valid for one write.
        let st = unsafe { attnrt_config_default(8, 2, cfg.as_mut_ptr()) };
        assert_eq!(st, attnrt_status::ATTNRT_STATUS_OK);
        // SAFETY: written by the successful call.
        let mut cfg: attnrt_config = unsafe { cfg.assume_init() };
        (cfg.n_kv_head, cfg.rope, cfg.qk_norm) = (1, 1, 1);
        let w: Vec<Vec<f32>> = [64, 32, 32, 64, 4, 4]
            .iter()
            .enumerate()
            .map(|(k, &n)| {
                (0..n)
                    .map(|i| ((i * 5 + k) % 11) as f32 / 11.0 - 0.4)
                    .collect()
            })
            .collect();
        let t = |i: usize| attnrt_tensor {
            data: w[i].as_ptr().cast(),
            len: w[i].len(),
            dtype: attnrt_dtype::ATTNRT_DTYPE_F32 as u32,
        };
        let none = attnrt_tensor {
            data: core::ptr::null(),
            len: 0,
            dtype: 0,
        };
        let weights = attnrt_weights {
            wq: t(0),
            wk: t(1),
            wv: t(2),
            wo: t(3),
            bq: none,
            bk: none,
            bv: none,
            bo: none,
            q_norm: t(4),
            k_norm: t(5),
        };
        let mut layer = core::ptr::null_mut();
        // SAFETY: valid config, weights and out pointer.
        let st = unsafe { attnrt_layer_new(&cfg, &weights, &mut layer) };
        assert_eq!(st, attnrt_status::ATTNRT_STATUS_OK);
        let reference = run(layer, 1, 1, false);
        let simd = run(layer, 0, 1, false);
        let err = reference
            .iter()
            .zip(&simd)
            .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(err <= 1e-4, "{err}");
        assert_eq!(simd, run(layer, 2, 2, false));
        assert_eq!(simd, run(layer, 2, 3, true));
        // SAFETY: a live handle, freed once.
        unsafe { attnrt_layer_free(layer) };
    }
}
