//! The GPU executor: modules loaded through `cust` and cached per device, device buffers sized
//! at set-up, one forward call = uploads of the call's metadata, one fused q/k/v GEMM, the
//! norm/RoPE pass, masked attention, the output GEMM and its bias, all on one stream.

use std::collections::HashMap;
use std::ffi::{c_void, CStr};
use std::sync::{Arc, Mutex, OnceLock};

use attnrt::{
    Config, Inputs, Layer, MaskInputs, NormPart, QkNorm, RopeConvention, RopeTable, Tensor,
};
use cust::memory::DeviceBuffer;
use cust::sys as cu;
use half::{bf16, f16};

use crate::cublas::{self, Cublas};
use crate::error::{Error, Result};
use crate::plan::{
    self, attention_launch, capability, capability_on, AttnPath, GpuBackend, GpuOptions, Precision,
    Workspace, GROUP_GRANULE, PREP_THREADS,
};

const PTX_ATTENTION: &str = include_str!(concat!(env!("OUT_DIR"), "/attention.ptx"));
const PTX_ATTENTION_SM90: &str = include_str!(concat!(env!("OUT_DIR"), "/attention_sm90.ptx"));
const PTX_ROPE_NORM: &str = include_str!(concat!(env!("OUT_DIR"), "/rope_norm.ptx"));
const PTX_DECODE: &str = include_str!(concat!(env!("OUT_DIR"), "/decode.ptx"));

mod decode;
mod graph;
mod multi;
mod staging;
mod tma;
pub use decode::GpuKvCache;
pub use multi::{CachedDeviceCall, DeviceTiming, MultiGpuKvCache, MultiGpuLayer, SeqParallelCall};

fn drv(call: &'static str, r: cu::CUresult) -> Result<()> {
    if r == cu::CUresult::CUDA_SUCCESS {
        return Ok(());
    }
    let mut msg: *const std::os::raw::c_char = std::ptr::null();
    // SAFETY: cuGetErrorString writes a pointer to a static string (or leaves it null).
    unsafe { cu::cuGetErrorString(r, &mut msg) };
    let message = if msg.is_null() {
        format!("{r:?}")
    } else {
        // SAFETY: non-null results of cuGetErrorString are static NUL-terminated strings.
        let text = unsafe { CStr::from_ptr(msg) };
        format!("{} ({r:?})", text.to_string_lossy())
    };
    Err(Error::Cuda { call, message })
}

fn cust_err(call: &'static str, e: cust::error::CudaError) -> Error {
    Error::Cuda {
        call,
        message: format!("{e:?}"),
    }
}

/// The modules of one device, loaded once into its primary context.
struct Kernels {
    ctx: cust::context::Context,
    attention: cust::module::Module,
    /// The wgmma kernels (sm_90a PTX): loaded on sm_90 devices only, the one architecture
    /// whose driver accepts that target.
    attention_sm90: Option<cust::module::Module>,
    /// Compute capability (major, minor).
    arch: (u32, u32),
    rope_norm: cust::module::Module,
    decode: cust::module::Module,
    name: String,
    smem_optin: usize,
    sm_count: usize,
}

fn cache() -> &'static Mutex<HashMap<u32, Arc<Kernels>>> {
    static CACHE: OnceLock<Mutex<HashMap<u32, Arc<Kernels>>>> = OnceLock::new();
    CACHE.get_or_init(|| Mutex::new(HashMap::new()))
}

fn init_driver() -> Result<()> {
    static INIT: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    INIT.get_or_init(|| cust::init(cust::CudaFlags::empty()).map_err(|e| format!("{e:?}")))
        .clone()
        .map_err(|message| Error::Cuda {
            call: "cuInit",
            message,
        })
}

fn kernels(device: u32) -> Result<Arc<Kernels>> {
    init_driver()?;
    let mut map = cache().lock().map_err(|_| Error::Cuda {
        call: "module cache",
        message: "poisoned lock".into(),
    })?;
    if let Some(k) = map.get(&device) {
        cust::context::CurrentContext::set_current(&k.ctx)
            .map_err(|e| cust_err("cuCtxSetCurrent", e))?;
        return Ok(k.clone());
    }
    let dev = cust::device::Device::get_device(device).map_err(|e| cust_err("cuDeviceGet", e))?;
    let ctx =
        cust::context::Context::new(dev).map_err(|e| cust_err("cuDevicePrimaryCtxRetain", e))?;
    let attention = cust::module::Module::from_ptx(PTX_ATTENTION, &[])
        .map_err(|e| cust_err("cuModuleLoadData(attention.ptx)", e))?;
    let rope_norm = cust::module::Module::from_ptx(PTX_ROPE_NORM, &[])
        .map_err(|e| cust_err("cuModuleLoadData(rope_norm.ptx)", e))?;
    let decode = cust::module::Module::from_ptx(PTX_DECODE, &[])
        .map_err(|e| cust_err("cuModuleLoadData(decode.ptx)", e))?;
    let name = dev.name().map_err(|e| cust_err("cuDeviceGetName", e))?;
    let mut arch = (0i32, 0i32);
    // SAFETY: valid out-pointers and device handle.
    drv("cuDeviceGetAttribute", unsafe {
        cu::cuDeviceGetAttribute(
            &mut arch.0,
            cu::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR,
            dev.as_raw(),
        )
    })?;
    // SAFETY: as above.
    drv("cuDeviceGetAttribute", unsafe {
        cu::cuDeviceGetAttribute(
            &mut arch.1,
            cu::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR,
            dev.as_raw(),
        )
    })?;
    let arch = (arch.0.max(0) as u32, arch.1.max(0) as u32);
    let attention_sm90 = if arch == (9, 0) {
        Some(
            cust::module::Module::from_ptx(PTX_ATTENTION_SM90, &[])
                .map_err(|e| cust_err("cuModuleLoadData(attention_sm90.ptx)", e))?,
        )
    } else {
        None
    };
    let mut smem_optin = 0i32;
    // SAFETY: valid out-pointer and device handle.
    drv("cuDeviceGetAttribute", unsafe {
        cu::cuDeviceGetAttribute(
            &mut smem_optin,
            cu::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN,
            dev.as_raw(),
        )
    })?;
    let smem_optin = smem_optin.max(0) as usize;
    let mut sm_count = 0i32;
    // SAFETY: valid out-pointer and device handle.
    drv("cuDeviceGetAttribute", unsafe {
        cu::cuDeviceGetAttribute(
            &mut sm_count,
            cu::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
            dev.as_raw(),
        )
    })?;
    let k = Arc::new(Kernels {
        ctx,
        attention,
        attention_sm90,
        arch,
        rope_norm,
        decode,
        name,
        smem_optin,
        sm_count: sm_count.max(1) as usize,
    });
    map.insert(device, k.clone());
    Ok(k)
}

/// See [`crate::device_count`].
pub fn device_count() -> usize {
    if init_driver().is_err() {
        return 0;
    }
    cust::device::Device::num_devices().map_or(0, |n| n as usize)
}

/// See [`crate::no_device_reason`].
pub fn no_device_reason() -> Option<String> {
    if let Err(e) = init_driver() {
        return Some(format!("no CUDA driver: {e}"));
    }
    match cust::device::Device::num_devices() {
        Ok(0) => Some("the CUDA driver reports no device".into()),
        Ok(_) => None,
        Err(e) => Some(format!("cannot count CUDA devices: {e:?}")),
    }
}

fn function(module: &cust::module::Module, name: &str) -> Result<cu::CUfunction> {
    let f = module.get_function(name).map_err(|e| Error::Cuda {
        call: "cuModuleGetFunction",
        message: format!("{name}: {e}"),
    })?;
    Ok(f.to_raw())
}

fn alloc(bytes: usize) -> Result<DeviceBuffer<u8>> {
    DeviceBuffer::zeroed(bytes.max(16)).map_err(|e| cust_err("cuMemAlloc", e))
}

fn ptr(b: &DeviceBuffer<u8>) -> u64 {
    b.as_device_ptr().as_raw()
}

/// Uploads `data` (any plain element type) into a new device buffer.
fn upload<T: Copy>(data: &[T]) -> Result<DeviceBuffer<u8>> {
    let bytes = std::mem::size_of_val(data);
    let buf = alloc(bytes)?;
    // SAFETY: `buf` holds at least `bytes` bytes; `data` is a live host slice of that size.
    drv("cuMemcpyHtoD", unsafe {
        cu::cuMemcpyHtoD_v2(ptr(&buf), data.as_ptr().cast(), bytes)
    })?;
    Ok(buf)
}

/// Asynchronous host-to-device copy of a slice (pageable memory: the driver stages it before
/// returning, so the host slice may be reused at once).
///
/// # Safety
/// `dst` is a device pointer with room for the slice; `stream` is valid.
unsafe fn h2d<T: Copy>(dst: u64, src: &[T], stream: cu::CUstream) -> Result<()> {
    let bytes = std::mem::size_of_val(src);
    if bytes == 0 {
        return Ok(());
    }
    // SAFETY: per the function's contract.
    drv("cuMemcpyHtoDAsync", unsafe {
        cu::cuMemcpyHtoDAsync_v2(dst, src.as_ptr().cast(), bytes, stream)
    })
}

#[repr(C)]
#[derive(Clone, Copy)]
struct MaskParams {
    seq_len: i32,
    window: i32,
    seq_lens: u64,
    groups: u64,
    gmin: u64,
    gmax: u64,
    granules: i32,
}

/// One attention launch: its shape, its parameters and, for the TMA kernel, the tensor maps of
/// Q, K and V (its other parameters).
#[derive(Clone)]
struct AttnLaunch {
    l: plan::Launch,
    params: AttnParams,
    maps: Option<[tma::TensorMap; 3]>,
}

impl AttnLaunch {
    /// Enqueues the launch on `stream`.
    ///
    /// # Safety
    /// `f` is the attention kernel `self.l` names, in the current context; the buffers and mask
    /// tables of `self.params` and the maps are live and sized for the call.
    unsafe fn enqueue(&mut self, f: cu::CUfunction, stream: cu::CUstream) -> Result<()> {
        let l = &self.l;
        let mut args = [(&mut self.params as *mut AttnParams).cast::<c_void>(); 4];
        let n = match &mut self.maps {
            None => 1,
            Some(maps) => {
                for (a, m) in args[1..].iter_mut().zip(maps.iter_mut()) {
                    *a = (m as *mut tma::TensorMap).cast();
                }
                // SAFETY: `sched` is this layer's live 4-byte counter; the memset is ordered
                // before the launch on the same stream.
                drv("cuMemsetD32Async", unsafe {
                    cu::cuMemsetD32Async(self.params.sched, 0, 1, stream)
                })?;
                4
            }
        };
        // SAFETY: per this function's contract; the TMA kernel takes (AttnParams, CUtensorMap
        // x 3), the others AttnParams alone.
        unsafe { launch_args(f, l.grid, l.block, l.smem, stream, &mut args[..n]) }
    }
}

#[repr(C)]
#[derive(Clone, Copy)]
struct AttnParams {
    q: u64,
    k: u64,
    v: u64,
    o: u64,
    seq_len: i32,
    n_head: i32,
    n_kv_head: i32,
    head_dim: i32,
    group: i32,
    q_per_cta: i32,
    scale: f32,
    scale_log2: f32,
    mask: MaskParams,
    batch: i32,
    sched: u64,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct ConvertParams {
    input: u64,
    output: u64,
    n: i64,
}

/// Where a call's input rows `x` are on the device.
#[derive(Clone, Copy, Debug)]
pub(super) enum DeviceX {
    /// f32 rows, converted into the storage type first on a bf16 / f16 layer.
    F32(u64),
    /// Rows already in the layer's storage type (f32 on an f32 layer): used as they are.
    Storage(u64),
}

#[repr(C)]
#[derive(Clone, Copy)]
struct BiasParams {
    y: u64,
    bias: u64,
    rows: i64,
    cols: i32,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct PrepParams {
    qkv: u64,
    bias: u64,
    q_norm: u64,
    k_norm: u64,
    cs: u64,
    cs_rows: u64,
    q: u64,
    k: u64,
    v: u64,
    stats: u64,
    cs_period: i32,
    n_head: i32,
    n_kv_head: i32,
    head_dim: i32,
    full_norm: i32,
    half_split: i32,
    eps: f32,
    tokens: i32,
    q_width: i32,
    k_width: i32,
    kpool: u64,
    vpool: u64,
    dst: u64,
    block_size: i32,
}

/// Where a cached call's new keys and values go: `qkv_prep` writes them into the KV cache's
/// pools itself (the append fused into the norm/RoPE pass), at the pool rows `dst` holds.
#[derive(Clone, Copy)]
pub(super) struct PoolAppend {
    pub(super) kpool: u64,
    pub(super) vpool: u64,
    /// `[tokens]` i64 on the device: pool row of (block, head 0, slot) of each new token.
    pub(super) dst: u64,
    pub(super) block_size: usize,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct SumsqParams {
    qkv: u64,
    bias: u64,
    stats: u64,
    tokens: i32,
    q_dim: i32,
    kv_dim: i32,
    count_k: i32,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct WidenParams {
    input: u64,
    output: u64,
    bias: u64,
    n: i64,
    cols: i32,
    col0: i32,
}

/// The norm/RoPE pass of a call whose full-QK-norm statistics are being summed across the
/// devices of a head split: enqueued by [`GpuLayer::finish_prep`] once they are.
#[derive(Clone, Copy)]
pub(super) struct PendingPrep {
    pp: PrepParams,
    n: usize,
}

/// The projections of a call enqueued up to the conversion of `x` ([`GpuLayer::qkv_start`]).
#[derive(Clone, Copy)]
struct QkvStart {
    /// `x` in the storage type (or the f32 `x` itself).
    x_in: u64,
    cs: u64,
    cs_rows: u64,
    cs_period: i32,
    n: usize,
}

/// A forward call enqueued up to the conversion of `x` ([`GpuLayer::front_start`]).
#[derive(Clone, Copy)]
pub(super) struct FrontStart {
    mask: MaskParams,
    batch: usize,
    seq_len: usize,
    qkv: QkvStart,
}

/// A forward call enqueued up to the norm statistics ([`GpuLayer::run_front`]).
#[derive(Clone, Copy)]
pub(super) struct Front {
    mask: MaskParams,
    batch: usize,
    seq_len: usize,
    prep: Option<PendingPrep>,
}

impl Front {
    /// Tokens of the call.
    pub(super) fn tokens(&self) -> usize {
        self.batch * self.seq_len
    }
}

/// Launches `f` with one by-value struct parameter.
///
/// # Safety
/// `f` is a kernel of the current context whose single parameter has `P`'s C layout, and every
/// device pointer inside `params` is valid for what the kernel does with it.
unsafe fn launch<P>(
    f: cu::CUfunction,
    grid: (u32, u32, u32),
    block: u32,
    smem: u32,
    stream: cu::CUstream,
    params: &mut P,
) -> Result<()> {
    let mut args = [(params as *mut P).cast::<c_void>()];
    // SAFETY: per this function's contract.
    unsafe { launch_args(f, grid, block, smem, stream, &mut args) }
}

/// Launches `f` with the parameters `args` points to (one pointer per kernel parameter).
///
/// # Safety
/// `f` is a kernel of the current context whose parameters have the C layouts of what `args`
/// points to, in order, and every device pointer inside them is valid for the kernel's use.
unsafe fn launch_args(
    f: cu::CUfunction,
    grid: (u32, u32, u32),
    block: u32,
    smem: u32,
    stream: cu::CUstream,
    args: &mut [*mut c_void],
) -> Result<()> {
    // SAFETY: per the function's contract; `args` outlives the call (the driver copies the
    // parameter values at launch).
    drv("cuLaunchKernel", unsafe {
        cu::cuLaunchKernel(
            f,
            grid.0,
            grid.1,
            grid.2,
            block,
            1,
            1,
            smem,
            stream,
            args.as_mut_ptr(),
            std::ptr::null_mut(),
        )
    })
}

/// Copies the rotary row of each position into `dst` (rows of the table's width): position
/// `r` for row `r` without `positions`. Every position was validated against the table.
fn fill_rope_rows(table: &RopeTable<'_>, positions: Option<&[i32]>, dst: &mut [f32]) {
    let width = table.half_dim() * 2;
    for (r, out) in dst.chunks_exact_mut(width).enumerate() {
        let pos = positions.map_or(r, |p| p[r] as usize);
        if let Some(row) = table.row(pos) {
            out.copy_from_slice(row);
        }
    }
}

/// Where the rotary rows of a device call come from.
#[derive(Clone, Copy, Debug)]
pub enum RopeSource<'a> {
    /// The caller's host table: the rows the call needs are uploaded with the call.
    Host(RopeTable<'a>),
    /// The table uploaded before with [`GpuLayer::upload_rope_table`].
    Uploaded,
}

/// A forward call whose activations live in device memory (for servers).
#[derive(Clone, Copy, Debug)]
pub struct DeviceCall<'a> {
    /// Device pointer to `x`, f32 `[batch, seq_len, n_embd]`.
    pub x: u64,
    /// Device pointer to the output `y`, f32 `[batch, seq_len, n_embd]`.
    pub y: u64,
    /// Batch rows.
    pub batch: usize,
    /// Tokens per row.
    pub seq_len: usize,
    /// Mask inputs (host memory; validated and uploaded with the call).
    pub mask: MaskInputs<'a>,
    /// Rotary positions (host memory), as in [`Inputs::position_ids`].
    pub position_ids: Option<&'a [i32]>,
    /// The rotary table, required when the layer is rotary.
    pub rope: Option<RopeSource<'a>>,
    /// The caller's `CUstream` (as a raw pointer), or null for the layer's own stream.
    pub stream: *mut c_void,
}

/// A layer on one GPU: weights uploaded once, every buffer sized at set-up for calls of up to
/// `max_batch` rows of `max_seq_len` tokens; forward calls allocate nothing.
pub struct GpuLayer<'a> {
    layer: Layer<'a>,
    cfg: Config,
    opts: GpuOptions,
    path: AttnPath,
    kernels: Arc<Kernels>,
    f_attn: cu::CUfunction,
    f_prep: cu::CUfunction,
    f_convert: Option<cu::CUfunction>,
    f_bias: cu::CUfunction,
    f_sumsq: cu::CUfunction,
    /// `upload_u4`: a cached step's metadata upload as a kernel (see `MetaUpload::enqueue`).
    f_upload: cu::CUfunction,
    stream: cu::CUstream,
    cublas: Cublas,
    // Device buffers.
    x: DeviceBuffer<u8>,
    xs: DeviceBuffer<u8>,
    qkv: DeviceBuffer<u8>,
    q: DeviceBuffer<u8>,
    k: DeviceBuffer<u8>,
    v: DeviceBuffer<u8>,
    o: DeviceBuffer<u8>,
    y: DeviceBuffer<u8>,
    rope: DeviceBuffer<u8>,
    rope_table: Option<(DeviceBuffer<u8>, usize)>,
    seq_lens: DeviceBuffer<u8>,
    groups: DeviceBuffer<u8>,
    gmin: DeviceBuffer<u8>,
    gmax: DeviceBuffer<u8>,
    positions: DeviceBuffer<u8>,
    /// The wgmma kernel's work counter (one u32, zeroed before each launch).
    sched: DeviceBuffer<u8>,
    wqkv: DeviceBuffer<u8>,
    wo: DeviceBuffer<u8>,
    bqkv: Option<DeviceBuffer<u8>>,
    bo: Option<DeviceBuffer<u8>>,
    q_norm: Option<DeviceBuffer<u8>>,
    k_norm: Option<DeviceBuffer<u8>>,
    // A device's share of a full QK-norm split across devices, and its per-token sums of
    // squares ([2, max tokens] f32), set by `MultiGpuLayer` only.
    norm_share: Option<NormPart>,
    stats: Option<DeviceBuffer<u8>>,
    // Host scratch, sized at set-up.
    h_groups: Vec<i32>,
    h_gmin: Vec<i32>,
    h_gmax: Vec<i32>,
    h_scratch: Vec<(i32, i32, u32)>,
    h_rope: Vec<f32>,
    last_attn: Option<AttnLaunch>,
    dec: decode::DecodeState,
}

impl Drop for GpuLayer<'_> {
    fn drop(&mut self) {
        // SAFETY: the stream was created by this layer and is destroyed once; pending work on it
        // is finished first.
        unsafe {
            cu::cuStreamSynchronize(self.stream);
            cu::cuStreamDestroy_v2(self.stream);
        }
    }
}

fn widen(t: &Tensor<'_>) -> Vec<f32> {
    (0..t.len()).map(|i| t.get(i).unwrap_or(0.0)).collect()
}

/// Host bytes of `parts` concatenated, stored as `precision`.
fn stored(parts: &[&Tensor<'_>], precision: Precision) -> Vec<u8> {
    let mut all = Vec::new();
    for p in parts {
        all.extend(widen(p));
    }
    match precision {
        Precision::F32 => all.iter().flat_map(|v| v.to_le_bytes()).collect(),
        Precision::Bf16 => all
            .iter()
            .flat_map(|&v| bf16::from_f32(v).to_bits().to_le_bytes())
            .collect(),
        Precision::F16 => all
            .iter()
            .flat_map(|&v| f16::from_f32(v).to_bits().to_le_bytes())
            .collect(),
    }
}

fn blas_type(p: Precision) -> i32 {
    match p {
        Precision::F32 => cublas::R_32F,
        Precision::Bf16 => cublas::R_16BF,
        Precision::F16 => cublas::R_16F,
    }
}

impl<'a> GpuLayer<'a> {
    /// Sets the layer up on `opts.device`: loads (or reuses) the device's modules, uploads the
    /// weights in `opts.precision`, sizes every buffer for `opts.max_batch` x
    /// `opts.max_seq_len`.
    ///
    /// # Errors
    /// No driver or device, an unsupported head_dim / group for the precision
    /// ([`capability`]), out of device memory, or maxima whose buffers overflow.
    pub fn new(layer: Layer<'a>, opts: GpuOptions) -> Result<GpuLayer<'a>> {
        let cfg = *layer.config();
        // Unsupported shapes fail before any driver call.
        capability(opts.precision, cfg.head_dim, cfg.group_size())?;
        let ws = Workspace::new(&cfg, opts.precision, opts.max_batch, opts.max_seq_len)
            .ok_or_else(|| Error::Unsupported("buffer sizes overflow the address space".into()))?;
        let kernels = kernels(opts.device)?;
        let path = capability_on(opts.precision, cfg.head_dim, cfg.group_size(), kernels.arch)?;
        let probe = attention_launch(path, &cfg, 1, 1)?;
        let prep_smem = plan::prep_smem_bytes(&cfg);
        for (what, need) in [("attention", probe.smem), ("q/k/v preparation", prep_smem)] {
            if need as usize > kernels.smem_optin {
                return Err(Error::Unsupported(format!(
                    "{what} needs {need} bytes of shared memory; {} allows {}",
                    kernels.name, kernels.smem_optin
                )));
            }
        }
        let attn_module = match (path, &kernels.attention_sm90) {
            (AttnPath::Wgmma { .. }, Some(m)) => m,
            _ => &kernels.attention,
        };
        let f_attn = function(attn_module, &probe.kernel)?;
        let f_prep = function(
            &kernels.rope_norm,
            &format!("qkv_prep_{}", opts.precision.name()),
        )?;
        let f_convert = match opts.precision {
            Precision::F32 => None,
            p => Some(function(
                &kernels.rope_norm,
                &format!("convert_f32_{}", p.name()),
            )?),
        };
        let f_bias = function(&kernels.rope_norm, "add_bias_f32")?;
        let f_upload = function(&kernels.rope_norm, "upload_u4")?;
        let f_sumsq = function(&kernels.rope_norm, "qkv_sumsq")?;
        // The limit is a property of the function, shared by every layer of the process: set it
        // to the device's maximum (the same value from every thread), never to one layer's need,
        // so that concurrent set-ups cannot lower it under another layer's launch.
        // (The maximum less the function's static shared memory.)
        for f in [f_attn, f_prep] {
            let mut static_bytes = 0i32;
            // SAFETY: `f` is a live function of the current context; valid out-pointer.
            drv("cuFuncGetAttribute", unsafe {
                cu::cuFuncGetAttribute(
                    &mut static_bytes,
                    cu::CUfunction_attribute::CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES,
                    f,
                )
            })?;
            let bytes = kernels.smem_optin as i32 - static_bytes;
            // SAFETY: `f` is a live function of the current context.
            drv("cuFuncSetAttribute", unsafe {
                cu::cuFuncSetAttribute(
                    f,
                    cu::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    bytes,
                )
            })?;
        }
        let mut stream: cu::CUstream = std::ptr::null_mut();
        // SAFETY: `stream` is a valid out-pointer; the device's context is current.
        drv("cuStreamCreate", unsafe {
            cu::cuStreamCreate(&mut stream, 1)
        })?;
        let cublas = Cublas::new()?;

        let w = layer.weights();
        let wqkv = upload(&stored(&[&w.wq, &w.wk, &w.wv], opts.precision))?;
        let wo = upload(&stored(&[&w.wo], opts.precision))?;
        let bqkv = if w.bq.is_some() || w.bk.is_some() || w.bv.is_some() {
            let mut b = Vec::with_capacity(cfg.q_dim() + 2 * cfg.kv_dim());
            for (t, n) in [
                (&w.bq, cfg.q_dim()),
                (&w.bk, cfg.kv_dim()),
                (&w.bv, cfg.kv_dim()),
            ] {
                match t {
                    Some(t) => b.extend(widen(t)),
                    None => b.extend(std::iter::repeat_n(0.0f32, n)),
                }
            }
            Some(upload(&b)?)
        } else {
            None
        };
        let bo = w.bo.as_ref().map(|t| upload(&widen(t))).transpose()?;
        let q_norm = w.q_norm.as_ref().map(|t| upload(&widen(t))).transpose()?;
        let k_norm = w.k_norm.as_ref().map(|t| upload(&widen(t))).transpose()?;

        let n = opts.max_batch * opts.max_seq_len;
        let granules = opts.max_batch * opts.max_seq_len.div_ceil(GROUP_GRANULE);
        Ok(GpuLayer {
            layer,
            cfg,
            opts,
            path,
            f_attn,
            f_prep,
            f_convert,
            f_bias,
            f_upload,
            f_sumsq,
            stream,
            cublas,
            x: alloc(ws.x)?,
            xs: alloc(ws.x_store)?,
            qkv: alloc(ws.qkv)?,
            q: alloc(ws.q)?,
            k: alloc(ws.kv)?,
            v: alloc(ws.kv)?,
            o: alloc(ws.o)?,
            y: alloc(ws.y)?,
            rope: alloc(ws.rope)?,
            rope_table: None,
            seq_lens: alloc(opts.max_batch * 4)?,
            groups: alloc(n * 4)?,
            gmin: alloc(granules * 4)?,
            gmax: alloc(granules * 4)?,
            positions: alloc(n * 4)?,
            sched: alloc(4)?,
            wqkv,
            wo,
            bqkv,
            bo,
            q_norm,
            k_norm,
            norm_share: None,
            stats: None,
            h_groups: vec![0; n],
            h_gmin: vec![0; granules],
            h_gmax: vec![0; granules],
            h_scratch: vec![(0, 0, 0); opts.max_seq_len],
            h_rope: if cfg.rope().is_some() {
                vec![0.0; n * cfg.head_dim]
            } else {
                Vec::new()
            },
            kernels,
            last_attn: None,
            dec: decode::DecodeState::default(),
        })
    }

    /// The attention path every call of this layer runs.
    pub fn path(&self) -> AttnPath {
        self.path
    }

    /// The layer (configuration and host weights) this GPU layer was made from.
    pub fn layer(&self) -> &Layer<'a> {
        &self.layer
    }

    /// What ran: the path and the device's name.
    pub fn backend(&self) -> GpuBackend {
        GpuBackend {
            path: self.path,
            device: self.kernels.name.clone(),
        }
    }

    /// Uploads a whole cos/sin table once, for device calls that name
    /// [`RopeSource::Uploaded`] (so that no rows travel with each call). Allocates.
    ///
    /// # Errors
    /// A table whose rows do not match head_dim, or a failed upload.
    pub fn upload_rope_table(&mut self, table: &RopeTable<'_>) -> Result<()> {
        if table.half_dim() * 2 != self.cfg.head_dim {
            return Err(attnrt::Error::InputShape {
                name: "freqs_cis row",
                expected: self.cfg.head_dim,
                actual: table.half_dim() * 2,
            }
            .into());
        }
        let rows = table.max_pos();
        let mut data = Vec::with_capacity(rows * self.cfg.head_dim);
        for p in 0..rows {
            data.extend_from_slice(table.row(p).unwrap_or(&[]));
        }
        self.set_current()?;
        self.rope_table = Some((upload(&data)?, rows));
        Ok(())
    }

    /// Makes this layer one device's shard of a full QK-norm split across devices: its
    /// projections then stop before the norm ([`PendingPrep`]) until the caller has summed the
    /// per-token statistics across the devices. Allocates the statistics buffer.
    fn set_norm_share(&mut self, part: NormPart) -> Result<()> {
        self.set_current()?;
        let tokens = self.opts.max_batch * self.opts.max_seq_len;
        self.stats = Some(alloc(2 * tokens * 4)?);
        self.norm_share = Some(part);
        Ok(())
    }

    fn set_current(&self) -> Result<()> {
        cust::context::CurrentContext::set_current(&self.kernels.ctx)
            .map_err(|e| cust_err("cuCtxSetCurrent", e))
    }

    fn check_capacity(&self, batch: usize, seq_len: usize) -> Result<()> {
        if batch > self.opts.max_batch {
            return Err(Error::Capacity {
                what: "batch",
                value: batch,
                max: self.opts.max_batch,
            });
        }
        if seq_len > self.opts.max_seq_len {
            return Err(Error::Capacity {
                what: "seq_len",
                value: seq_len,
                max: self.opts.max_seq_len,
            });
        }
        Ok(())
    }

    /// Runs the layer on host buffers: uploads `x` and the call's metadata, runs on the layer's
    /// stream, downloads `y` into `out` and waits.
    ///
    /// # Errors
    /// Exactly the runtime's validation errors for invalid inputs ([`Error::Runtime`]), a call
    /// larger than the set-up maxima ([`Error::Capacity`]), or a failed CUDA / cuBLAS call. On
    /// error `out` is untouched, except after a failure of the device itself mid-copy.
    pub fn forward_host(&mut self, inputs: &Inputs<'_>, out: &mut [f32]) -> Result<GpuBackend> {
        self.layer.validate_inputs(inputs, out.len())?;
        self.check_capacity(inputs.batch, inputs.seq_len)?;
        if out.is_empty() {
            return Ok(self.backend());
        }
        self.set_current()?;
        let stream = self.stream;
        let (x, y) = (ptr(&self.x), ptr(&self.y));
        // SAFETY: `x` holds max_batch * max_seq_len * n_embd f32 and the call is within it
        // (checked above); `inputs.x` has exactly batch * seq_len * n_embd values (validated).
        unsafe { h2d(x, inputs.x, stream)? };
        let rope = inputs.rope_table.map(RopeSource::Host);
        // SAFETY: x and y are this layer's buffers, sized for the call.
        unsafe {
            self.run(
                x,
                y,
                inputs.batch,
                inputs.seq_len,
                &inputs.mask,
                inputs.position_ids,
                rope,
                stream,
            )?
        };
        let bytes = std::mem::size_of_val(out);
        // SAFETY: `y` holds the call's output of `bytes` bytes; `out` is a live exclusive host
        // slice of that size; the stream is synchronised before `out` is read again.
        unsafe {
            drv(
                "cuMemcpyDtoHAsync",
                cu::cuMemcpyDtoHAsync_v2(out.as_mut_ptr().cast(), y, bytes, stream),
            )?;
            drv("cuStreamSynchronize", cu::cuStreamSynchronize(stream))?;
        }
        Ok(self.backend())
    }

    /// Runs the layer on device buffers, enqueued on `call.stream` (or the layer's own stream
    /// when null). Returns once the work is enqueued: synchronise the stream before reading
    /// `y`. The call's metadata (mask, positions, rotary rows) is copied from host memory
    /// during this call.
    ///
    /// # Errors
    /// As [`GpuLayer::forward_host`]; [`RopeSource::Uploaded`] without an uploaded table is an
    /// error naming `freqs_cis`.
    ///
    /// # Safety
    /// `call.x` and `call.y` are device pointers of this layer's context with room for
    /// `batch * seq_len * n_embd` f32 each, `y` not overlapping anything else in use, and
    /// `call.stream` is null or a live stream of that context. They stay valid until the
    /// stream has run the work.
    pub unsafe fn forward_device(&mut self, call: &DeviceCall<'_>) -> Result<GpuBackend> {
        let rope_shape = match call.rope {
            Some(RopeSource::Host(t)) => Some((t.half_dim(), t.max_pos())),
            Some(RopeSource::Uploaded) => match &self.rope_table {
                Some((_, rows)) => Some((self.cfg.head_dim / 2, *rows)),
                None => {
                    return Err(attnrt::Error::InputShape {
                        name: "freqs_cis",
                        expected: self.cfg.head_dim,
                        actual: 0,
                    }
                    .into())
                }
            },
            None => None,
        };
        self.layer.validate_metadata(
            call.batch,
            call.seq_len,
            &call.mask,
            call.position_ids,
            rope_shape,
        )?;
        self.check_capacity(call.batch, call.seq_len)?;
        if call.batch * call.seq_len == 0 {
            return Ok(self.backend());
        }
        self.set_current()?;
        let stream = if call.stream.is_null() {
            self.stream
        } else {
            call.stream as cu::CUstream
        };
        // SAFETY: per this function's contract.
        unsafe {
            self.run(
                call.x,
                call.y,
                call.batch,
                call.seq_len,
                &call.mask,
                call.position_ids,
                call.rope,
                stream,
            )?
        };
        Ok(self.backend())
    }

    /// Enqueues a validated call.
    ///
    /// # Safety
    /// `x` / `y` hold `batch * seq_len * n_embd` f32 on the device; the call fits the buffers.
    #[allow(clippy::too_many_arguments)]
    unsafe fn run(
        &mut self,
        x: u64,
        y: u64,
        batch: usize,
        seq_len: usize,
        mask: &MaskInputs<'_>,
        position_ids: Option<&[i32]>,
        rope: Option<RopeSource<'_>>,
        stream: cu::CUstream,
    ) -> Result<()> {
        // SAFETY: per this function's contract (a single layer has no norm share, so nothing
        // is pending between the two halves).
        unsafe {
            let front = self.run_front(x, batch, seq_len, mask, position_ids, rope, stream)?;
            self.run_attention(&front, stream)?;
            self.project_out(y, front.tokens(), stream)
        }
    }

    /// First half of a call: mask metadata, projections, and the norm/RoPE pass, or with a
    /// norm share only the sums of squares (the pass is then pending in the result).
    ///
    /// # Safety
    /// As [`GpuLayer::run`].
    #[allow(clippy::too_many_arguments)]
    unsafe fn run_front(
        &mut self,
        x: u64,
        batch: usize,
        seq_len: usize,
        mask: &MaskInputs<'_>,
        position_ids: Option<&[i32]>,
        rope: Option<RopeSource<'_>>,
        stream: cu::CUstream,
    ) -> Result<Front> {
        // SAFETY: per this function's contract.
        unsafe {
            let start = self.front_start(
                DeviceX::F32(x),
                batch,
                seq_len,
                mask,
                position_ids,
                rope,
                stream,
            )?;
            self.front_finish(&start, stream)
        }
    }

    /// The part of [`GpuLayer::run_front`] up to the conversion of `x` (mask metadata, rotary
    /// rows, the conversion kernel), so that a head split can start every device's first
    /// kernel before any device's projections are enqueued.
    ///
    /// # Safety
    /// As [`GpuLayer::run`].
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn front_start(
        &mut self,
        x: DeviceX,
        batch: usize,
        seq_len: usize,
        mask: &MaskInputs<'_>,
        position_ids: Option<&[i32]>,
        rope: Option<RopeSource<'_>>,
        stream: cu::CUstream,
    ) -> Result<FrontStart> {
        let cfg = self.cfg;
        let n = batch * seq_len;

        // Mask metadata.
        let mut mp = MaskParams {
            seq_len: seq_len as i32,
            window: cfg
                .sliding_window
                .map_or(i32::MAX, |w| w.min(i32::MAX as usize) as i32),
            seq_lens: 0,
            groups: 0,
            gmin: 0,
            gmax: 0,
            granules: seq_len.div_ceil(GROUP_GRANULE) as i32,
        };
        if let Some(l) = mask.seq_lens {
            // SAFETY: `seq_lens` holds max_batch i32 >= batch (validated length).
            unsafe { h2d(ptr(&self.seq_lens), l, stream)? };
            mp.seq_lens = ptr(&self.seq_lens);
        }
        if plan::merge_groups(
            mask.document_ids,
            mask.cu_seqlens,
            batch,
            seq_len,
            &mut self.h_groups,
            &mut self.h_scratch,
        ) {
            let ng = batch * seq_len.div_ceil(GROUP_GRANULE);
            plan::granule_ranges(
                &self.h_groups[..n],
                batch,
                seq_len,
                &mut self.h_gmin[..ng],
                &mut self.h_gmax[..ng],
            );
            // SAFETY: the buffers were sized for max_batch x max_seq_len.
            unsafe {
                h2d(ptr(&self.groups), &self.h_groups[..n], stream)?;
                h2d(ptr(&self.gmin), &self.h_gmin[..ng], stream)?;
                h2d(ptr(&self.gmax), &self.h_gmax[..ng], stream)?;
            }
            mp.groups = ptr(&self.groups);
            mp.gmin = ptr(&self.gmin);
            mp.gmax = ptr(&self.gmax);
        }

        // SAFETY: per this function's contract.
        let qkv = unsafe { self.qkv_start(x, batch, seq_len, position_ids, rope, stream)? };
        Ok(FrontStart {
            mask: mp,
            batch,
            seq_len,
            qkv,
        })
    }

    /// The rest of [`GpuLayer::run_front`]: projections and the norm/RoPE pass (or the
    /// statistics).
    ///
    /// # Safety
    /// `start` is this layer's last [`GpuLayer::front_start`], on the same stream.
    pub(super) unsafe fn front_finish(
        &mut self,
        start: &FrontStart,
        stream: cu::CUstream,
    ) -> Result<Front> {
        // SAFETY: per this function's contract.
        let prep = unsafe { self.qkv_finish(start.qkv, None, stream)? };
        Ok(Front {
            mask: start.mask,
            batch: start.batch,
            seq_len: start.seq_len,
            prep,
        })
    }

    /// Second half of a call up to the attention output `o`: the pending norm/RoPE pass (its
    /// statistics now summed across the devices), then attention.
    ///
    /// # Safety
    /// `front` is this layer's last [`GpuLayer::run_front`], on the same stream.
    unsafe fn run_attention(&mut self, front: &Front, stream: cu::CUstream) -> Result<()> {
        let cfg = self.cfg;
        let d = cfg.head_dim;
        if let Some(p) = front.prep {
            // SAFETY: per this function's contract.
            unsafe { self.finish_prep(p, stream)? };
        }
        let mut l = attention_launch(self.path, &cfg, front.batch, front.seq_len)?;
        let ap = AttnParams {
            q: ptr(&self.q),
            k: ptr(&self.k),
            v: ptr(&self.v),
            o: ptr(&self.o),
            seq_len: front.seq_len as i32,
            n_head: cfg.n_head as i32,
            n_kv_head: cfg.n_kv_head as i32,
            head_dim: d as i32,
            group: cfg.group_size() as i32,
            q_per_cta: l.q_per_cta as i32,
            scale: 1.0 / (d as f32).sqrt(),
            scale_log2: std::f32::consts::LOG2_E / (d as f32).sqrt(),
            mask: front.mask,
            batch: front.batch as i32,
            sched: ptr(&self.sched),
        };
        let maps = match self.path {
            AttnPath::Wgmma { .. } => {
                // Persistent: one CTA per SM takes work items (plan::attention_launch numbers
                // them along grid x) until none is left.
                l.grid.0 = l.grid.0.min(self.kernels.sm_count as u32);
                let prec = self.opts.precision;
                let (t, b) = (front.seq_len, front.batch);
                let columns = cfg.n_kv_head * d;
                let kv = |buf| tma::kv_map(ptr(buf), prec, columns, t, b, plan::WGMMA_KEY_TILE);
                let q = tma::q_map(ptr(&self.q), prec, &cfg, t, b, l.q_per_cta)?;
                Some([q, kv(&self.k)?, kv(&self.v)?])
            }
            _ => None,
        };
        let mut call = AttnLaunch {
            l,
            params: ap,
            maps,
        };
        // SAFETY: q/k/v/o and the mask buffers are live and sized for the call; the maps
        // describe k and v as the call fills them.
        unsafe { call.enqueue(self.f_attn, stream)? };
        self.last_attn = Some(call);
        Ok(())
    }

    /// Projections of `batch * seq_len` tokens of `x` into the q/k/v buffers in the storage
    /// type, first part: the rotary rows' upload and the conversion of f32 rows into the
    /// storage type. [`GpuLayer::qkv_finish`] enqueues the rest.
    ///
    /// # Safety
    /// `x` holds `batch * seq_len * n_embd` values on the device (f32 or the storage type, as
    /// it says); the call fits the buffers; the positions (if any) and the rotary source were
    /// validated against each other.
    unsafe fn qkv_start(
        &mut self,
        x: DeviceX,
        batch: usize,
        seq_len: usize,
        position_ids: Option<&[i32]>,
        rope: Option<RopeSource<'_>>,
        stream: cu::CUstream,
    ) -> Result<QkvStart> {
        let cfg = self.cfg;
        let n = batch * seq_len;
        let d = cfg.head_dim;

        // Rotary rows.
        let (mut cs, mut cs_rows, mut cs_period) = (0u64, 0u64, seq_len as i32);
        if let (Some(_), Some(src)) = (cfg.rope(), rope) {
            match src {
                RopeSource::Uploaded => {
                    let (table, _) = self
                        .rope_table
                        .as_ref()
                        .ok_or(Error::Unsupported("no uploaded rotary table".into()))?;
                    cs = ptr(table);
                    if let Some(p) = position_ids {
                        // SAFETY: `positions` holds max_batch * max_seq_len i32.
                        unsafe { h2d(ptr(&self.positions), p, stream)? };
                        cs_rows = ptr(&self.positions);
                    }
                }
                RopeSource::Host(table) => {
                    let rows = match position_ids {
                        Some(_) => n,
                        None => seq_len,
                    };
                    fill_rope_rows(&table, position_ids, &mut self.h_rope[..rows * d]);
                    // SAFETY: `rope` holds max_batch * max_seq_len * head_dim f32.
                    unsafe { h2d(ptr(&self.rope), &self.h_rope[..rows * d], stream)? };
                    cs = ptr(&self.rope);
                    cs_period = rows as i32;
                }
            }
        }
        // SAFETY: per this function's contract.
        unsafe { self.qkv_convert(x, n, (cs, cs_rows, cs_period), stream) }
    }

    /// The conversion part of [`GpuLayer::qkv_start`], with the rotary rows already on the
    /// device: `rope` is (table or rows, position ids or 0, rows before they repeat).
    ///
    /// # Safety
    /// As [`GpuLayer::qkv_start`]; the rotary rows cover the call's tokens.
    unsafe fn qkv_convert(
        &mut self,
        x: DeviceX,
        n: usize,
        rope: (u64, u64, i32),
        stream: cu::CUstream,
    ) -> Result<QkvStart> {
        let c = self.cfg.n_embd;
        let (cs, cs_rows, cs_period) = rope;
        // Projections: qkv[n, width] = x wqkv^T (f32 out).
        let x_in = match x {
            DeviceX::Storage(x) => x,
            DeviceX::F32(x) => {
                // SAFETY: x holds n*c f32 and xs room for n*c storage-type elements.
                if unsafe { self.convert_to_storage(x, ptr(&self.xs), n * c, stream)? } {
                    ptr(&self.xs)
                } else {
                    x
                }
            }
        };
        Ok(QkvStart {
            x_in,
            cs,
            cs_rows,
            cs_period,
            n,
        })
    }

    /// The rest of the projections begun by [`GpuLayer::qkv_start`]: the fused q/k/v GEMM
    /// and the bias / QK-norm / RoPE pass, which with `append` stores k and v into a KV
    /// cache's pools instead of the k/v buffers. With a norm share the pass is not launched: the
    /// sums of squares of this device's heads go to the statistics buffer and the pass is
    /// returned, for [`GpuLayer::finish_prep`] once the caller has summed the statistics
    /// across the devices.
    ///
    /// # Safety
    /// `start` is this layer's last [`GpuLayer::qkv_start`], on the same stream; `append`'s
    /// pools and rows hold the call's tokens until the pass has run.
    unsafe fn qkv_finish(
        &mut self,
        start: QkvStart,
        append: Option<PoolAppend>,
        stream: cu::CUstream,
    ) -> Result<Option<PendingPrep>> {
        let cfg = self.cfg;
        let QkvStart {
            x_in,
            cs,
            cs_rows,
            cs_period,
            n,
        } = start;
        let (c, qd, kvd, d) = (cfg.n_embd, cfg.q_dim(), cfg.kv_dim(), cfg.head_dim);
        let width = qd + 2 * kvd;
        let prec = self.opts.precision;
        // SAFETY: wqkv [width, c], x_in [n, c], qkv [n, width] on the device.
        unsafe {
            self.cublas.linear(
                stream.cast(),
                n,
                width,
                c,
                ptr(&self.wqkv),
                x_in,
                blas_type(prec),
                ptr(&self.qkv),
                cublas::R_32F,
            )?
        };

        // Bias, QK-norm, RoPE, store.
        let pp = PrepParams {
            qkv: ptr(&self.qkv),
            bias: self.bqkv.as_ref().map_or(0, ptr),
            q_norm: self.q_norm.as_ref().map_or(0, ptr),
            k_norm: self.k_norm.as_ref().map_or(0, ptr),
            cs,
            cs_rows,
            q: ptr(&self.q),
            k: ptr(&self.k),
            v: ptr(&self.v),
            stats: 0,
            cs_period,
            n_head: cfg.n_head as i32,
            n_kv_head: cfg.n_kv_head as i32,
            head_dim: d as i32,
            full_norm: (cfg.qk_norm == QkNorm::Full) as i32,
            half_split: matches!(cfg.rope(), Some(r) if r.convention == RopeConvention::HalfSplit)
                as i32,
            eps: cfg.rmsnorm_eps,
            tokens: n as i32,
            q_width: 0,
            k_width: 0,
            kpool: append.map_or(0, |a| a.kpool),
            vpool: append.map_or(0, |a| a.vpool),
            dst: append.map_or(0, |a| a.dst),
            block_size: append.map_or(0, |a| a.block_size as i32),
        };
        let pending = PendingPrep { pp, n };
        let (Some(part), Some(stats)) = (self.norm_share, &self.stats) else {
            // SAFETY: per this function's contract.
            unsafe { self.finish_prep(pending, stream)? };
            return Ok(None);
        };
        let mut sp = SumsqParams {
            qkv: pp.qkv,
            bias: pp.bias,
            stats: ptr(stats),
            tokens: n as i32,
            q_dim: qd as i32,
            kv_dim: kvd as i32,
            count_k: part.count_k as i32,
        };
        // SAFETY: SumsqParams matches the kernel's struct; qkv holds n rows of q_dim + 2 kv_dim
        // f32, the bias (if any) one row, stats 2 * max tokens f32 >= 2 * n.
        unsafe { launch(self.f_sumsq, (n as u32, 1, 1), 256, 0, stream, &mut sp)? };
        let mut pending = pending;
        pending.pp.stats = sp.stats;
        pending.pp.q_width = part.q_width as i32;
        pending.pp.k_width = part.k_width as i32;
        Ok(Some(pending))
    }

    /// The bias / QK-norm / RoPE pass of [`GpuLayer::qkv_finish`].
    ///
    /// # Safety
    /// `p` comes from this layer's last `qkv_finish` on the same stream; with statistics, they
    /// hold the sums over every device by the time the stream runs the pass.
    unsafe fn finish_prep(&mut self, p: PendingPrep, stream: cu::CUstream) -> Result<()> {
        let mut pp = p.pp;
        let prep_smem = plan::prep_smem_bytes(&self.cfg);
        // SAFETY: every pointer of `pp` is a live buffer sized for the call (or null where the
        // kernel checks for null).
        unsafe {
            launch(
                self.f_prep,
                (p.n as u32, 3, 1),
                PREP_THREADS,
                prep_smem,
                stream,
                &mut pp,
            )
        }
    }

    /// Output projection of the attention output (`o`, `n` tokens) into `y` (f32), and its
    /// bias.
    ///
    /// # Safety
    /// `y` holds `n * n_embd` f32 on the device; `o` holds the attention output of `n` tokens.
    unsafe fn project_out(&mut self, y: u64, n: usize, stream: cu::CUstream) -> Result<()> {
        // SAFETY: per this function's contract.
        unsafe { self.project_out_rows(y, 0, n, false, stream) }
    }

    /// Enqueues the conversion of `len` f32 at `input` into the storage type at `output`;
    /// `false` (nothing enqueued) on an f32 layer, whose input is used as it is.
    ///
    /// # Safety
    /// `input` holds `len` f32 and `output` room for `len` storage-type elements on this
    /// layer's device.
    pub(super) unsafe fn convert_to_storage(
        &self,
        input: u64,
        output: u64,
        len: usize,
        stream: cu::CUstream,
    ) -> Result<bool> {
        let f = match (self.opts.precision, self.f_convert) {
            (Precision::F32, _) | (_, None) => return Ok(false),
            (_, Some(f)) => f,
        };
        let mut a = ConvertParams {
            input,
            output,
            n: len as i64,
        };
        // Eight elements per thread (the kernel's vector steps).
        let blocks = len.div_ceil(256 * 8).clamp(1, 65535 * 8) as u32;
        // SAFETY: ConvertParams matches the kernel's struct; `len` elements at both ends (this
        // function's contract).
        unsafe { launch(f, (blocks, 1, 1), 256, 0, stream, &mut a)? };
        Ok(true)
    }

    /// Output projection of rows `row0..row0 + rows` of the attention output into `y` (the
    /// first of those rows' outputs): f32 with the output bias, or with `storage` the storage
    /// type without the bias (a head split reduced in the storage type adds it once, after).
    ///
    /// # Safety
    /// `y` holds `rows * n_embd` elements of the output type on the device; `o` holds the
    /// attention output of at least `row0 + rows` tokens.
    unsafe fn project_out_rows(
        &mut self,
        y: u64,
        row0: usize,
        rows: usize,
        storage: bool,
        stream: cu::CUstream,
    ) -> Result<()> {
        let cfg = self.cfg;
        let (c, qd) = (cfg.n_embd, cfg.q_dim());
        let prec = self.opts.precision;
        let o = ptr(&self.o) + (row0 * qd * prec.size()) as u64;
        let out_type = if storage {
            blas_type(prec)
        } else {
            cublas::R_32F
        };
        // SAFETY: wo [c, qd], o rows [rows, qd], y [rows, c] on the device.
        unsafe {
            self.cublas.linear(
                stream.cast(),
                rows,
                c,
                qd,
                ptr(&self.wo),
                o,
                blas_type(prec),
                y,
                out_type,
            )?
        };
        if storage {
            return Ok(());
        }
        // SAFETY: y holds rows * c f32 (this function's contract), bo (if any) c f32.
        unsafe { self.add_bias_rows(self.bo.as_ref(), y, rows, stream) }
    }

    /// Adds the output bias `bias` (`[n_embd]` f32; nothing without one) to `rows` f32 rows
    /// of `y` on `stream`.
    ///
    /// # Safety
    /// `y` holds `rows * n_embd` f32 on this layer's device, `bias` (if any) `n_embd` f32.
    pub(super) unsafe fn add_bias_rows(
        &self,
        bias: Option<&DeviceBuffer<u8>>,
        y: u64,
        rows: usize,
        stream: cu::CUstream,
    ) -> Result<()> {
        let Some(bo) = bias else {
            return Ok(());
        };
        let c = self.cfg.n_embd;
        let mut a = BiasParams {
            y,
            bias: ptr(bo),
            rows: rows as i64,
            cols: c as i32,
        };
        let blocks = ((rows * c).div_ceil(256)).min(65535 * 8) as u32;
        // SAFETY: BiasParams matches the kernel's struct; y is [rows, c], bias [c] (this
        // function's contract).
        unsafe { launch(self.f_bias, (blocks, 1, 1), 256, 0, stream, &mut a) }
    }

    /// Benchmark helper: mean milliseconds of `f` over `iters` runs on the layer's own stream,
    /// timed with CUDA events after one warm-up run.
    ///
    /// # Errors
    /// Any error of `f` or of the event calls.
    #[doc(hidden)]
    pub fn time_ms(
        &mut self,
        iters: usize,
        mut f: impl FnMut(&mut Self) -> Result<()>,
    ) -> Result<f32> {
        self.set_current()?;
        f(self)?;
        let (mut start, mut stop): (cu::CUevent, cu::CUevent) =
            (std::ptr::null_mut(), std::ptr::null_mut());
        // SAFETY: valid out-pointers; the context is current; the events are destroyed below.
        unsafe {
            drv("cuEventCreate", cu::cuEventCreate(&mut start, 0))?;
            drv("cuEventCreate", cu::cuEventCreate(&mut stop, 0))?;
        }
        let mut ms = 0.0f32;
        let result = (|| {
            // SAFETY: live events and stream.
            drv("cuEventRecord", unsafe {
                cu::cuEventRecord(start, self.stream)
            })?;
            for _ in 0..iters {
                f(self)?;
            }
            // SAFETY: as above.
            unsafe {
                drv("cuEventRecord", cu::cuEventRecord(stop, self.stream))?;
                drv("cuEventSynchronize", cu::cuEventSynchronize(stop))?;
                drv(
                    "cuEventElapsedTime",
                    cu::cuEventElapsedTime(&mut ms, start, stop),
                )
            }
        })();
        // SAFETY: the events were created above and are not used after this.
        unsafe {
            cu::cuEventDestroy_v2(start);
            cu::cuEventDestroy_v2(stop);
        }
        result.map(|()| ms / iters.max(1) as f32)
    }

    /// Benchmark helper: launches the attention kernel of the last call again (on the layer's
    /// own stream, same inputs and mask), without the projections.
    ///
    /// # Errors
    /// No earlier call, or a failed launch.
    #[doc(hidden)]
    pub fn relaunch_attention(&mut self) -> Result<()> {
        let mut call = self
            .last_attn
            .clone()
            .ok_or_else(|| Error::Unsupported("no earlier call to relaunch".into()))?;
        // SAFETY: the buffers of the last call are still this layer's and unchanged in size;
        // its mask buffers still hold that call's metadata unless a later call replaced it,
        // in which case `last_attn` was replaced too.
        unsafe { call.enqueue(self.f_attn, self.stream) }
    }

    /// Waits for the layer's own stream.
    ///
    /// # Errors
    /// An asynchronous failure of earlier work.
    pub fn synchronize(&self) -> Result<()> {
        self.set_current()?;
        // SAFETY: the stream is live.
        drv("cuStreamSynchronize", unsafe {
            cu::cuStreamSynchronize(self.stream)
        })
    }

    /// The layer's own stream (a `CUstream`), for callers that time or order work on it.
    pub fn stream(&self) -> *mut c_void {
        self.stream.cast()
    }

    /// Device memory the layer allocated at set-up, in bytes.
    pub fn device_bytes(&self) -> usize {
        Workspace::new(
            &self.cfg,
            self.opts.precision,
            self.opts.max_batch,
            self.opts.max_seq_len,
        )
        .map_or(0, |w| w.total())
    }
}
