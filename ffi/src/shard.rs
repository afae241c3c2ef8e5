//! `attnrt_sharded_layer`: one layer split by heads over N devices (SPEC.md, "Multi-device
//! head split"), executed on CPU devices: every device's pipeline runs in this process on the
//! host's threads, and the partial outputs are summed in device order (or returned, for a
//! caller that reduces them itself).

use attnrt::{PoolMemory, ShardLayer, ShardPlan, ShardedLayer, Tensor};

use crate::backend::{attnrt_backend, lanes, report, table_part};
use crate::config::attnrt_config;
use crate::error::{FfiError, FfiResult};
use crate::layer::{
    attnrt_forward_args, attnrt_layer, attnrt_weights, kept_contract, prepare, Owned,
};
use crate::panic::guard;
use crate::pool::Pool;
use crate::ptr::{as_ref, check_out, free_boxed, write_out};
use crate::status::attnrt_status;

/// What [`attnrt_sharded_forward`] writes to `out`.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum attnrt_shard_mode {
    /// The layer's output `[B, T, C]`: every device's partial output summed in device order.
    ATTNRT_SHARD_MODE_SUMMED = 0,
    /// Every device's partial output, `[n_devices, B, T, C]`; their sum is the layer's output
    /// (`bo` is in device 0's part). For servers that run their own all-reduce.
    ATTNRT_SHARD_MODE_PARTIALS = 1,
}

impl attnrt_shard_mode {
    /// The mode of a caller's value, or `ATTNRT_STATUS_BAD_ENUM` naming `mode`.
    pub(crate) fn from_u32(v: u32) -> FfiResult<attnrt_shard_mode> {
        match v {
            0 => Ok(attnrt_shard_mode::ATTNRT_SHARD_MODE_SUMMED),
            1 => Ok(attnrt_shard_mode::ATTNRT_SHARD_MODE_PARTIALS),
            v => Err(FfiError::bad_enum("mode", v, "an attnrt_shard_mode, 0..=1")),
        }
    }
}

/// A layer split by heads over `n_devices` CPU devices: a private copy of the configuration
/// and weights, the plan (which query heads, KV heads and weight rows/columns each device
/// owns; GQA-aware, uneven head counts allowed), and each device's `wo` column block.
///
/// Opaque. Immutable after creation but for the threads it keeps for `num_threads` calls
/// (handed out under a lock, as by `attnrt_layer`): any number of threads may run forward
/// calls on one handle at once.
#[derive(Debug)]
pub struct attnrt_sharded_layer {
    host: attnrt_layer,
    plan: ShardPlan,
    /// Device `i`'s `[n_embd, n_head_i * head_dim]` block of `wo`.
    wo: Vec<Owned>,
}

impl attnrt_sharded_layer {
    /// Every device's layer, borrowing this handle.
    fn shards(&self) -> FfiResult<Vec<ShardLayer<'_>>> {
        let full = self.host.weights()?;
        (0..self.plan.n_devices())
            .map(|i| Ok(ShardLayer::new(&self.plan, i, &full, self.wo[i].view())?))
            .collect()
    }
}

fn block<E: Copy + Default>(plan: &ShardPlan, device: usize, wo: &[E]) -> FfiResult<PoolMemory<E>> {
    let n = plan.wo_block_len(device)?;
    let mut v = PoolMemory::filled(n, E::default()).map_err(|_| {
        FfiError::new(
            attnrt_status::ATTNRT_STATUS_OUT_OF_MEMORY,
            format!("cannot allocate device {device}'s wo block of {n} elements"),
        )
    })?;
    plan.copy_wo(device, wo, &mut v)?;
    Ok(v)
}

/// Creates a layer split by heads over `n_devices` CPU devices. The configuration and
/// weights are validated and COPIED as by `attnrt_layer_new` (the caller's buffers may be
/// freed on return), and each device's `wo` column block is copied out once.
///
/// On success `*out` receives the handle (free with [`attnrt_sharded_layer_free`]); on error
/// it is untouched. Errors: those of `attnrt_layer_new`, `ATTNRT_STATUS_CONFIG`
/// (`n_devices` 0), `ATTNRT_STATUS_CONFIG_PAIR` (`n_devices` > `n_head`: a device would own
/// no query head). Thread-safe.
///
/// # Safety
/// As `attnrt_layer_new`.
#[no_mangle]
pub unsafe extern "C" fn attnrt_sharded_layer_new(
    config: *const attnrt_config,
    weights: *const attnrt_weights,
    n_devices: usize,
    out: *mut *mut attnrt_sharded_layer,
) -> attnrt_status {
    guard(|| {
        // SAFETY: the contract of this function.
        let config = unsafe { as_ref("config", config) }?;
        // SAFETY: the contract of this function.
        let w = unsafe { as_ref("weights", weights) }?;
        check_out("out", out)?;
        // SAFETY: the contract of this function.
        let host = unsafe { attnrt_layer::from_c(config, w) }?;
        let plan = ShardPlan::new(host.cfg, n_devices)?;
        let full = host.weights()?;
        let mut wo = Vec::new();
        for i in 0..n_devices {
            wo.push(match full.wo {
                Tensor::F32(s) => Owned::F32(block(&plan, i, s)?),
                Tensor::F16(s) => Owned::F16(block(&plan, i, s)?),
                Tensor::Bf16(s) => Owned::Bf16(block(&plan, i, s)?),
            });
        }
        let handle = Box::new(attnrt_sharded_layer { host, plan, wo });
        // Every shard must build (the core validates each device's weights).
        handle.shards()?;
        // SAFETY: checked by `check_out`; valid by the contract.
        unsafe { write_out(out, Box::into_raw(handle)) };
        Ok(())
    })
}

/// Frees a sharded layer. NULL is a no-op. Every call on the handle must have returned;
/// never twice.
///
/// # Safety
/// `layer` NULL or a handle from [`attnrt_sharded_layer_new`] not yet freed.
#[no_mangle]
pub unsafe extern "C" fn attnrt_sharded_layer_free(layer: *mut attnrt_sharded_layer) {
    let _ = guard(|| {
        // SAFETY: NULL or a live handle made by `Box::into_raw`, whose every use the caller
        // gives up (this function's contract).
        unsafe { free_boxed(layer) };
        Ok(())
    });
}

fn exec_elems(
    sharded: &ShardedLayer<'_, '_>,
    cfg: &attnrt::Config,
    batch: usize,
    seq_len: usize,
    lanes: usize,
    with_table: bool,
) -> FfiResult<usize> {
    let overflow = || attnrt::Error::InputValue {
        name: "seq_len",
        index: 0,
        value: seq_len as i64,
        rule: "the workspace size overflows a size_t",
    };
    let tokens = batch.checked_mul(seq_len).ok_or_else(overflow)?;
    let exec = sharded.workspace_len(tokens, lanes);
    if exec == usize::MAX {
        return Err(overflow().into());
    }
    let table = table_part(cfg, batch, seq_len, with_table)?;
    Ok(exec.checked_add(table).ok_or_else(overflow)?)
}

/// f32 elements of workspace [`attnrt_sharded_forward`] needs for `batch` rows of `seq_len`
/// tokens with `num_threads` lanes (every device's scratch, one partial output, and the
/// cos/sin rows a rotary layer builds when `freqs_cis` is NULL). The same for both modes.
///
/// Errors: `ATTNRT_STATUS_NULL_POINTER`, `ATTNRT_STATUS_INPUT_VALUE` (overflow). Thread-safe.
///
/// # Safety
/// `layer` NULL or a live handle; `out_elems` NULL or valid for one write.
#[no_mangle]
pub unsafe extern "C" fn attnrt_sharded_workspace_size(
    layer: *const attnrt_sharded_layer,
    batch: usize,
    seq_len: usize,
    num_threads: usize,
    out_elems: *mut usize,
) -> attnrt_status {
    guard(|| {
        // SAFETY: the contract of this function.
        let layer = unsafe { as_ref("layer", layer) }?;
        check_out("out_elems", out_elems)?;
        let shards = layer.shards()?;
        let sharded = ShardedLayer::new(&shards)?;
        let n = exec_elems(
            &sharded,
            &layer.host.cfg,
            batch,
            seq_len,
            lanes(num_threads),
            true,
        )?;
        // SAFETY: checked by `check_out`; valid by the contract.
        unsafe { write_out(out_elems, n) };
        Ok(())
    })
}

/// Runs the sharded layer on one batch on CPU devices: `args` as for `attnrt_forward`, with
/// `out` of `B * T * C` elements (SUMMED) or `n_devices * B * T * C` (PARTIALS, device `i`'s
/// part at `i * B * T * C`); `mode` is an `attnrt_shard_mode`. The devices run one after
/// another, each on the whole of the host's parallel-for / `num_threads`; the result is
/// deterministic and equals `attnrt_forward` within 1e-4. `backend` must be AUTO or CPU_SIMD
/// (REFERENCE: `ATTNRT_STATUS_UNSUPPORTED`; CUDA: `ATTNRT_STATUS_BACKEND_UNAVAILABLE`, GPU
/// devices are not in this ABI yet). On success `*backend_ran` receives CPU_SIMD.
///
/// Errors: those of `attnrt_forward`, and `ATTNRT_STATUS_BAD_ENUM` (`mode`). On any error
/// `out` and `*backend_ran` are untouched (except `ATTNRT_STATUS_PARALLEL_FOR_CONTRACT`).
///
/// Thread-safe: any number of threads at once on one handle, each with its own buffers.
///
/// # Safety
/// As `attnrt_forward`, with `layer` a live sharded layer handle.
#[no_mangle]
pub unsafe extern "C" fn attnrt_sharded_forward(
    layer: *const attnrt_sharded_layer,
    args: *const attnrt_forward_args,
    mode: u32,
    backend_ran: *mut attnrt_backend,
) -> attnrt_status {
    guard(|| {
        // SAFETY: the contract of this function.
        let layer = unsafe { as_ref("layer", layer) }?;
        // SAFETY: the contract of this function.
        let a = unsafe { as_ref("args", args) }?;
        check_out("backend_ran", backend_ran)?;
        let partials =
            attnrt_shard_mode::from_u32(mode)? == attnrt_shard_mode::ATTNRT_SHARD_MODE_PARTIALS;
        match attnrt_backend::from_u32(a.backend)? {
            attnrt_backend::ATTNRT_BACKEND_AUTO | attnrt_backend::ATTNRT_BACKEND_CPU_SIMD => {}
            attnrt_backend::ATTNRT_BACKEND_REFERENCE => {
                return Err(FfiError::new(
                    attnrt_status::ATTNRT_STATUS_UNSUPPORTED,
                    "a sharded layer runs on the SIMD CPU executor; use AUTO or CPU_SIMD",
                ))
            }
            attnrt_backend::ATTNRT_BACKEND_CUDA => {
                return Err(FfiError::new(
                    attnrt_status::ATTNRT_STATUS_BACKEND_UNAVAILABLE,
                    "sharded layers run on CPU devices only in this version of the ABI",
                ))
            }
        }
        let cfg = &layer.host.cfg;
        let shards = layer.shards()?;
        let sharded = ShardedLayer::new(&shards)?;
        let lanes = lanes(a.num_threads);
        // SAFETY: the contract of this function.
        let call = unsafe {
            prepare(cfg, a, false, |with_table| {
                exec_elems(&sharded, cfg, a.batch, a.seq_len, lanes, with_table)
            })
        }?;
        let exec_ws = call.exec_ws;
        let pool = Pool::new(
            a.parallel_for,
            a.parallel_ctx,
            a.num_threads,
            &layer.host.idle,
        );
        let ran = if partials {
            sharded.forward_cpu_partials(&call.inputs, exec_ws, call.out, pool.as_dyn())
        } else {
            sharded.forward_cpu(&call.inputs, exec_ws, call.out, pool.as_dyn())
        };
        kept_contract(&pool)?;
        let ran = report(ran?)?;
        // SAFETY: checked by `check_out`; valid by the contract.
        unsafe { write_out(backend_ran, ran) };
        Ok(())
    })
}
