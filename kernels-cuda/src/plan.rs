//! Host-side logic of the CUDA executor, free of any driver call so that it is unit-tested on
//! machines without a GPU: which attention path a call gets, launch geometry and shared-memory
//! sizes, device buffer sizes, the merged group ids of the mask and their granule tables, and a
//! mirror of the kernels' tile classifier.

use core::fmt;

use attnrt::Config;

/// Storage and arithmetic precision of a GPU layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Precision {
    /// f32 weights and activations, attention on CUDA cores: matches the scalar reference to
    /// 1e-4 (SPEC.md, Precision).
    F32,
    /// bf16 weights, q/k/v and attention output; f32 accumulation everywhere; tensor cores.
    Bf16,
    /// f16 storage, otherwise as [`Precision::Bf16`].
    F16,
}

impl Precision {
    /// Bytes per stored element.
    pub const fn size(self) -> usize {
        match self {
            Precision::F32 => 4,
            Precision::Bf16 | Precision::F16 => 2,
        }
    }

    /// Short name used in kernel names and reports.
    pub const fn name(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16",
            Precision::F16 => "f16",
        }
    }
}

/// The attention kernel a call runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttnPath {
    /// `attn_f32`: CUDA cores, any head_dim up to [`MAX_HEAD_DIM`].
    CudaCoresF32,
    /// `attn_mma_<dtype>_p<padded>_m<m_tiles>`: tensor cores.
    TensorCore {
        /// bf16 or f16.
        dtype: Precision,
        /// head_dim rounded up to a multiple of 32 (the kernel's template size).
        padded_head_dim: usize,
        /// 16-row m-tiles per warp (the CTA has 4 warps, so 64 * m_tiles packed rows).
        m_tiles: usize,
        /// Whether head_dim is one of the tuned sizes (64, 128, 256), with no padding.
        tuned: bool,
        /// Keys per K/V tile.
        key_tile: usize,
    },
    /// `attn_wt_<dtype>_c2_n128_k3v2q2`: Hopper warpgroup MMA (sm_90a), head_dim 128, 128
    /// packed rows per CTA (two consumer warpgroups and a producer warpgroup loading Q/K/V by
    /// TMA), 128-key tiles in rings of three K and two V stages, two Q buffers; one CTA per SM
    /// taking work items until none is left.
    Wgmma {
        /// bf16 or f16.
        dtype: Precision,
    },
}

/// The largest head_dim any path supports.
pub const MAX_HEAD_DIM: usize = 256;
/// Tokens per granule of the merged-group min/max tables (`ATTNRT_GRANULE` in common.cuh).
pub const GROUP_GRANULE: usize = 32;
/// Key tile of the f32 kernel (`F32_BK`).
pub const F32_KEY_TILE: usize = 32;
/// Threads of a CTA of the f32 kernel.
pub const F32_THREADS: u32 = 256;
/// Threads of a CTA of the tensor-core kernels (4 warps).
pub const MMA_THREADS: u32 = 128;
/// Threads of a CTA of the q/k/v preparation kernel (one CTA per token).
pub const PREP_THREADS: u32 = 256;
/// The largest grid y / z the launches use (KV heads, batch rows).
pub const MAX_GRID_YZ: usize = 65535;

/// Which attention path `(precision, head_dim, group)` gets, or why none can run it.
///
/// # Errors
/// [`crate::Error::Unsupported`] for head_dim 0 or above 256, an odd head_dim on the
/// tensor-core path, or more than 128 query heads per KV head there.
pub fn capability(precision: Precision, head_dim: usize, group: usize) -> crate::Result<AttnPath> {
    if head_dim == 0 || head_dim > MAX_HEAD_DIM {
        return Err(crate::Error::Unsupported(format!(
            "head_dim {head_dim}: the CUDA kernels support 1..={MAX_HEAD_DIM}"
        )));
    }
    match precision {
        Precision::F32 => Ok(AttnPath::CudaCoresF32),
        Precision::Bf16 | Precision::F16 => {
            if !head_dim.is_multiple_of(2) {
                return Err(crate::Error::Unsupported(format!(
                    "head_dim {head_dim} is odd: the tensor-core path needs an even head_dim \
                     (use Precision::F32)"
                )));
            }
            let padded = head_dim.div_ceil(32) * 32;
            let m_tiles = if padded == 128 && group >= 2 && env_m_tiles() == 2 {
                2
            } else {
                1
            };
            let rows = 64 * m_tiles;
            if group > rows {
                return Err(crate::Error::Unsupported(format!(
                    "{group} query heads per KV head: the tensor-core path packs at most {rows}"
                )));
            }
            let key_tile = if padded == 128 && m_tiles == 1 && env_key_tile() == 32 {
                32
            } else {
                mma_key_tile(padded)
            };
            Ok(AttnPath::TensorCore {
                dtype: precision,
                padded_head_dim: padded,
                m_tiles,
                tuned: matches!(head_dim, 64 | 128 | 256),
                key_tile,
            })
        }
    }
}

/// Rows (queries x packed heads) of a CTA of the wgmma kernel.
pub const WGMMA_ROWS: usize = 128;
/// Threads of a CTA of the wgmma kernel (a producer and two consumer warpgroups).
pub const WGMMA_THREADS: u32 = 384;
/// Keys per K/V tile of the wgmma kernel.
pub const WGMMA_KEY_TILE: usize = 128;
/// K stages of the wgmma kernel's copy pipeline.
pub const WGMMA_K_STAGES: usize = 3;
/// V stages of the wgmma kernel's copy pipeline.
pub const WGMMA_V_STAGES: usize = 2;
/// Q buffers of the wgmma kernel (the next work item's Q lands during the current one).
pub const WGMMA_Q_BUFFERS: usize = 2;

/// The path `(precision, head_dim, group)` gets on a device of compute capability `arch`
/// (major, minor): [`capability`]'s, upgraded to [`AttnPath::Wgmma`] on sm_90 for head_dim 128
/// with at most [`WGMMA_ROWS`] query heads per KV head. `ATTNRT_CUDA_WGMMA=0` keeps the
/// portable path (a switch for side-by-side benchmarks).
///
/// # Errors
/// As [`capability`].
pub fn capability_on(
    precision: Precision,
    head_dim: usize,
    group: usize,
    arch: (u32, u32),
) -> crate::Result<AttnPath> {
    let portable = capability(precision, head_dim, group)?;
    let wgmma_off = std::env::var("ATTNRT_CUDA_WGMMA").is_ok_and(|v| v == "0");
    Ok(match portable {
        AttnPath::TensorCore { dtype, .. }
            if arch == (9, 0) && head_dim == 128 && group <= WGMMA_ROWS && !wgmma_off =>
        {
            AttnPath::Wgmma { dtype }
        }
        other => other,
    })
}

/// `ATTNRT_CUDA_M_TILES=2` selects the 128-row variant for head_dim 128 (a tuning switch for
/// the benchmark; 1 otherwise).
fn env_m_tiles() -> usize {
    match std::env::var("ATTNRT_CUDA_M_TILES").ok().as_deref() {
        Some("2") => 2,
        _ => 1,
    }
}

/// `ATTNRT_CUDA_KEY_TILE=32` selects 32-key tiles for head_dim 128 (less shared memory, more
/// CTAs per SM; a tuning switch for the benchmark).
fn env_key_tile() -> usize {
    match std::env::var("ATTNRT_CUDA_KEY_TILE").ok().as_deref() {
        Some("32") => 32,
        _ => 0,
    }
}

impl fmt::Display for AttnPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AttnPath::CudaCoresF32 => f.write_str("cuda-cores-f32"),
            AttnPath::TensorCore {
                dtype,
                padded_head_dim,
                m_tiles,
                tuned,
                key_tile,
            } => write!(
                f,
                "tensor-core-{}-p{padded_head_dim}-m{m_tiles}-n{key_tile}{}",
                dtype.name(),
                if *tuned { "" } else { "-generic" }
            ),
            AttnPath::Wgmma { dtype } => write!(
                f,
                "wgmma-{}-d128-c2-n{WGMMA_KEY_TILE}-k{WGMMA_K_STAGES}v{WGMMA_V_STAGES}q{WGMMA_Q_BUFFERS}",
                dtype.name()
            ),
        }
    }
}

/// What ran a forward call on the GPU (the CUDA counterpart of `attnrt::Backend`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GpuBackend {
    /// The attention kernel.
    pub path: AttnPath,
    /// The device's name.
    pub device: String,
}

impl fmt::Display for GpuBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "cuda-{} on {}", self.path, self.device)
    }
}

/// Set-up options of a GPU layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GpuOptions {
    /// Storage precision.
    pub precision: Precision,
    /// Most batch rows of a call (device buffers are sized for it up front).
    pub max_batch: usize,
    /// Most tokens per row of a call.
    pub max_seq_len: usize,
    /// CUDA device ordinal.
    pub device: u32,
}

impl GpuOptions {
    /// Options for device 0.
    pub const fn new(precision: Precision, max_batch: usize, max_seq_len: usize) -> GpuOptions {
        GpuOptions {
            precision,
            max_batch,
            max_seq_len,
            device: 0,
        }
    }
}

/// How a head split over several GPUs ([`crate::MultiGpuLayer`]) sums its partial outputs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReduceOptions {
    /// Sum in the layer's storage type (bf16 / f16) instead of f32: half the bytes through
    /// NCCL, as tensor-parallel PyTorch reduces its bf16 activations. Each device's partial
    /// output is rounded to the storage type before the sum and the sum is widened to f32
    /// with the output bias added once, so the result differs from one GPU's by the storage
    /// type's rounding (within the bf16 / f16 tolerances). No effect on f32 layers.
    pub storage_dtype: bool,
    /// Token chunks of the output projection (at least 1): chunk `i`'s all-reduce runs on a
    /// second stream while chunk `i + 1`'s projection runs. 1 reduces the whole output after
    /// one projection. Summing is element-wise, so the result does not depend on it.
    pub chunks: usize,
    /// Reduce-scatter instead of all-reduce: device `i` receives the sum of the `i`-th of N
    /// equal parts of each chunk's output elements, half the NCCL traffic of an all-reduce on
    /// 2 devices, and the host output is gathered from every device's part (the same values
    /// as with the all-reduce). Without it device 0 receives the whole sum. Ignored (all-reduce)
    /// when N does not divide `n_embd`.
    pub scatter: bool,
    /// Sequence-parallel output by an all-to-all of the attention outputs instead of a sum:
    /// device `i` sends the attention output of its query heads for rank `j`'s tokens
    /// ([`attnrt::ShardPlan::token_range`]) to device `j` (grouped NCCL send / receive, the
    /// layer's storage type), and device `j` runs the whole output projection (the full `wo`,
    /// uploaded once per device, and the bias) for its tokens. Device `j`'s `y` then holds the
    /// f32 output of its tokens; the host output is gathered from every device. Moves
    /// `(N - 1) / N * T * n_head * head_dim / N` elements per device instead of an
    /// all-reduce's `T * n_embd`, and involves no sum across devices, so the result is one
    /// GPU's output projection of the same attention output. With `chunks` > 1 each device's
    /// tokens are cut into that many parts whose exchanges run on a second stream of the
    /// highest priority while the previous part's projection runs (measured slower than one
    /// chunk at T = 16384 on 2 and 4 H200s: each exchange's fixed cost outweighs the
    /// overlap). `storage_dtype` and `scatter` are ignored. The fastest prefill variant
    /// measured (1.85-1.89x on 2 H200s, 3.48-3.58x on 4; BENCHMARKS.md).
    pub all_to_all: bool,
}

impl ReduceOptions {
    /// f32 all-reduce after one output projection: the split then equals one GPU up to the
    /// summation order of the output projection, and device 0 holds the whole output.
    pub const EXACT: ReduceOptions = ReduceOptions {
        storage_dtype: false,
        chunks: 1,
        scatter: false,
        all_to_all: false,
    };

    /// [`ReduceOptions::all_to_all`]: sequence-parallel output, one GPU's output projection.
    pub const ALL_TO_ALL: ReduceOptions = ReduceOptions {
        storage_dtype: false,
        chunks: 1,
        scatter: false,
        all_to_all: true,
    };
}

/// One block of the all-to-all of [`ReduceOptions::all_to_all`]: the attention output of
/// device `src`'s query heads (columns `cols` of the unsplit `[tokens, n_head * head_dim]`
/// attention output) for part `chunk` of device `dst`'s tokens (`rows`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AllToAllBlock {
    /// Token chunk (`0..chunks`): the exchange and output projection of chunk `c` run before
    /// those of chunk `c + 1`.
    pub chunk: usize,
    /// Sending device (owner of the query heads).
    pub src: usize,
    /// Receiving device (owner of the tokens).
    pub dst: usize,
    /// Tokens (flattened): part `chunk` of `dst`'s [`attnrt::ShardPlan::token_range`].
    pub rows: core::ops::Range<usize>,
    /// Columns of the unsplit attention output, `src`'s query heads times `head_dim`.
    pub cols: core::ops::Range<usize>,
    /// First element of the block in `src`'s attention output (`[tokens, cols.len()]`,
    /// row-major): the rows are contiguous there.
    pub src_offset: usize,
    /// First element of the block in `dst`'s receive buffer (blocks from other devices only,
    /// packed in (chunk, `src`) order, each `[rows.len(), cols.len()]`); unused when
    /// `src == dst`.
    pub stage_offset: usize,
}

impl AllToAllBlock {
    /// Elements in the block.
    pub fn len(&self) -> usize {
        self.rows.len() * self.cols.len()
    }

    /// Whether the block is empty (a device or chunk without tokens).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The non-empty blocks of the all-to-all of [`ReduceOptions::all_to_all`] for `tokens`
/// tokens under `plan`, each device's tokens cut into `chunks` contiguous parts (the first
/// ones one longer; at least 1), in (chunk, `dst`, `src`) order. Every query head has exactly
/// one owner, so a KV head replicated on several devices sends each of its query heads once.
/// A device's receive buffer needs `ceil(tokens / n) * (n_head - its heads) * head_dim`
/// elements.
///
/// # Errors
/// None for a valid plan (the plan's own range errors are passed on).
pub fn all_to_all_blocks(
    plan: &attnrt::ShardPlan,
    tokens: usize,
    chunks: usize,
) -> crate::Result<Vec<AllToAllBlock>> {
    let n = plan.n_devices();
    let d = plan.config().head_dim;
    let chunks = chunks.max(1);
    let mut stage = vec![0usize; n];
    let mut out = Vec::with_capacity(chunks * n * n);
    for chunk in 0..chunks {
        for (dst, packed) in stage.iter_mut().enumerate() {
            let all = plan.token_range(dst, tokens)?;
            let (base, extra) = (all.len() / chunks, all.len() % chunks);
            let start = all.start + chunk * base + chunk.min(extra);
            let rows = start..start + base + usize::from(chunk < extra);
            for src in 0..n {
                let cols = plan.shard(src)?.q_rows(d);
                let b = AllToAllBlock {
                    chunk,
                    src,
                    dst,
                    src_offset: rows.start * cols.len(),
                    stage_offset: *packed,
                    rows: rows.clone(),
                    cols,
                };
                if b.is_empty() {
                    continue;
                }
                if src != dst {
                    *packed += b.len();
                }
                out.push(b);
            }
        }
    }
    Ok(out)
}

impl Default for ReduceOptions {
    fn default() -> ReduceOptions {
        ReduceOptions::EXACT
    }
}

/// How a cached step over several devices is captured for replay.
#[doc(hidden)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StepGraphLayout {
    /// One graph over every device, launched on device 0's stream.
    Joint,
    /// A graph per device, launched device 0 first (the default, for steps whose only
    /// exchange between the devices is the peer-memory sum; others are captured jointly).
    PerDevice,
}

/// Test and benchmark overrides of the cached forward's attention kernel
/// ([`crate::GpuLayer::set_decode_tuning`]); the default plans everything.
#[doc(hidden)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DecodeTuning {
    /// Keys per split; 0 plans it from the call's size and the device.
    pub split: usize,
    /// The CUDA-core kernel even where the tensor-core kernel applies.
    pub cuda_cores: bool,
}

/// Keys per warp tile of the tensor-core decode kernel (`TC_KEYS` in decode.cu).
pub const DECODE_TC_KEYS: usize = 16;
/// Query heads per CTA of the tensor-core decode kernel (`TC_HEADS`).
pub const DECODE_TC_HEADS: usize = 8;
/// Warps per CTA of the tensor-core decode kernel (each streams its own tiles).
pub const DECODE_TC_WARPS: usize = 4;
/// cp.async stages per warp of the tensor-core decode kernel.
pub const DECODE_TC_STAGES: usize = 2;
/// Threads of a CTA of the CUDA-core decode kernel (`DEC_THREADS`).
pub const DECODE_THREADS: u32 = 128;

/// The attention kernel of a cached call (`kernels/decode.cu`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecodeKernel {
    /// `decode_tc_<t>_d<D>_w<warps>_s<stages>`: tensor cores, bf16 / f16 storage.
    TensorCore {
        /// bf16 or f16.
        dtype: Precision,
        /// 64, 96, 128 or 256.
        head_dim: usize,
        /// Warps per CTA, each streaming its own tiles.
        warps: usize,
        /// cp.async pipeline stages per warp.
        stages: usize,
    },
    /// `decode_<t>_l<lanes>_r<heads>`: CUDA cores, any precision and head_dim.
    CudaCores {
        /// Storage precision.
        dtype: Precision,
        /// Lanes per key row.
        lanes: usize,
        /// Query heads per CTA.
        heads: usize,
    },
}

impl DecodeKernel {
    /// The kernel for (precision, head_dim, group): tensor cores for bf16 / f16 at the head_dims
    /// it is compiled for, else CUDA cores.
    pub fn choose(
        precision: Precision,
        head_dim: usize,
        group: usize,
        tuning: &DecodeTuning,
    ) -> DecodeKernel {
        let tc_dims = matches!(head_dim, 64 | 96 | 128 | 256);
        if precision != Precision::F32 && tc_dims && !tuning.cuda_cores {
            return DecodeKernel::TensorCore {
                dtype: precision,
                head_dim,
                warps: DECODE_TC_WARPS,
                stages: DECODE_TC_STAGES,
            };
        }
        let lanes = if head_dim <= 64 {
            8
        } else if head_dim <= 128 {
            16
        } else {
            32
        };
        let heads = match group {
            1 => 1,
            2 => 2,
            3 | 4 => 4,
            _ => 8,
        };
        DecodeKernel::CudaCores {
            dtype: precision,
            lanes,
            heads,
        }
    }

    /// Entry point in the PTX.
    pub fn name(&self) -> String {
        match *self {
            DecodeKernel::TensorCore {
                dtype,
                head_dim,
                warps,
                stages,
            } => format!("decode_tc_{}_d{head_dim}_w{warps}_s{stages}", dtype.name()),
            DecodeKernel::CudaCores {
                dtype,
                lanes,
                heads,
            } => format!("decode_{}_l{lanes}_r{heads}", dtype.name()),
        }
    }

    /// Threads per CTA.
    pub fn threads(&self) -> u32 {
        match *self {
            DecodeKernel::TensorCore { warps, .. } => 32 * warps as u32,
            DecodeKernel::CudaCores { .. } => DECODE_THREADS,
        }
    }

    /// Dynamic shared memory per CTA: 128 bytes of alignment slack, then the stages (K and V
    /// tiles of 16 rows per warp; rows of a multiple of 8 16-byte chunks unpadded, others
    /// padded by one chunk: `TcTile` in decode.cu), or the warps' states of the epilogue if
    /// larger.
    pub fn smem_bytes(&self) -> usize {
        match *self {
            DecodeKernel::TensorCore {
                head_dim,
                warps,
                stages,
                ..
            } => {
                let chunks = head_dim / 8;
                let stride = if chunks % 8 == 0 { chunks } else { chunks + 1 };
                let stage = 2 * DECODE_TC_KEYS * stride * 16;
                let states = warps * DECODE_TC_HEADS * (head_dim * 4 + 8);
                128 + (warps * stages * stage).max(states)
            }
            DecodeKernel::CudaCores { .. } => 0,
        }
    }

    /// Query heads per CTA (the grid's z covers the group in chunks of this many).
    pub fn heads_per_cta(&self) -> usize {
        match *self {
            DecodeKernel::TensorCore { .. } => DECODE_TC_HEADS,
            DecodeKernel::CudaCores { heads, .. } => heads,
        }
    }

    /// Keys per split: `tuning.split` if set, else the call's `total_keys` (each read by
    /// `ctas_per_key` CTAs: KV heads x head chunks) spread over a target number of CTAs, in
    /// whole rounds of the CTA's tiles. Tensor cores: one CTA per SM (`sm_count`), so that a
    /// token of a large batch is one split (no merge) and a single long sequence is split
    /// until every SM streams (measured on an H200: 32 x 8192 keys fastest with one split
    /// per token, 1 x 32768 with 16; more, shorter CTAs were slower). CUDA cores: four waves
    /// of the resident CTAs (`sm_count * ctas_per_sm`), at least 256 keys.
    pub fn split_keys(
        &self,
        total_keys: usize,
        ctas_per_key: usize,
        sm_count: usize,
        ctas_per_sm: usize,
        tuning: &DecodeTuning,
    ) -> usize {
        if tuning.split > 0 {
            return tuning.split;
        }
        let round = self.key_round();
        let (min, target) = match *self {
            DecodeKernel::TensorCore { .. } => (round, sm_count),
            DecodeKernel::CudaCores { .. } => (256, sm_count * ctas_per_sm * 4),
        };
        let target = target.max(1);
        (total_keys * ctas_per_key)
            .div_ceil(target)
            .div_ceil(round)
            .max(min / round)
            * round
    }

    /// Keys one pass of a CTA over its tiles covers (all warps one tile each).
    pub fn key_round(&self) -> usize {
        match *self {
            DecodeKernel::TensorCore { warps, .. } => DECODE_TC_KEYS * warps,
            DecodeKernel::CudaCores { .. } => 64,
        }
    }

    /// Keys per work item of a token that sees `len` keys, for splits of about `split` keys:
    /// len / split items, rounded to the nearest count (at least one), get equal shares in
    /// whole rounds of the CTA's tiles, so that no item is a small remainder (a `tuning.split`
    /// override is kept exactly). Rounded, not ceiled: a token a little longer than the split
    /// stays one item. On 2 x H200, a head split's decode step of 32 x 8192 keys over 4 KV
    /// heads per device (8000-key splits on 132 SMs) was 2.5-3% faster with 128 CTAs of one
    /// whole token than with 256 of half a token each plus their merge.
    pub fn item_keys(&self, len: usize, split: usize, tuning: &DecodeTuning) -> usize {
        let split = split.max(1);
        if tuning.split > 0 || len == 0 {
            return split;
        }
        let round = self.key_round();
        let items = (len + split / 2) / split;
        len.div_ceil(items.max(1)).div_ceil(round) * round
    }
}

/// One kernel launch: name, grid, block, dynamic shared memory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Launch {
    /// Kernel entry point in the PTX.
    pub kernel: String,
    /// Grid (x, y, z).
    pub grid: (u32, u32, u32),
    /// Threads per CTA.
    pub block: u32,
    /// Dynamic shared memory in bytes.
    pub smem: u32,
    /// Queries per CTA (BQ).
    pub q_per_cta: usize,
}

/// The attention launch for a call of `batch` rows of `seq_len` tokens.
///
/// # Errors
/// [`crate::Error::Unsupported`] when the grid would exceed the device's limits.
pub fn attention_launch(
    path: AttnPath,
    cfg: &Config,
    batch: usize,
    seq_len: usize,
) -> crate::Result<Launch> {
    let r = cfg.group_size();
    let d = cfg.head_dim;
    if cfg.n_kv_head > MAX_GRID_YZ || batch > MAX_GRID_YZ {
        return Err(crate::Error::Unsupported(format!(
            "n_kv_head {} / batch {batch}: grid y and z are limited to {MAX_GRID_YZ}",
            cfg.n_kv_head
        )));
    }
    let (kernel, block, q_per_cta, smem) = match path {
        AttnPath::CudaCoresF32 => {
            let bq = (32 / r).max(1);
            (
                "attn_f32".to_string(),
                F32_THREADS,
                bq,
                f32_smem_bytes(bq * r, d),
            )
        }
        AttnPath::TensorCore {
            dtype,
            padded_head_dim: dp,
            m_tiles,
            key_tile,
            ..
        } => {
            let rows = 64 * m_tiles;
            (
                format!("attn_mma_{}_p{dp}_m{m_tiles}_n{key_tile}", dtype.name()),
                MMA_THREADS,
                rows / r,
                mma_smem_bytes(dp, m_tiles, key_tile),
            )
        }
        AttnPath::Wgmma { dtype } => (
            format!(
                "attn_wt_{}_c2_n{WGMMA_KEY_TILE}_k{WGMMA_K_STAGES}v{WGMMA_V_STAGES}q{WGMMA_Q_BUFFERS}",
                dtype.name()
            ),
            WGMMA_THREADS,
            WGMMA_ROWS / r,
            wgmma_smem_bytes(),
        ),
    };
    let tiles = seq_len.div_ceil(q_per_cta.max(1)).max(1);
    // The wgmma kernel numbers its work items (query tile, KV head, batch row) along x: the
    // caller may launch fewer CTAs than items (persistent), never more.
    let (x, grid_yz) = match path {
        AttnPath::Wgmma { .. } => (tiles * cfg.n_kv_head * batch, (1, 1)),
        _ => (tiles, (cfg.n_kv_head as u32, batch as u32)),
    };
    let grid_x = i32::try_from(x).map_err(|_| {
        crate::Error::Unsupported(format!("{x} work items exceed the grid's x limit"))
    })? as u32;
    Ok(Launch {
        kernel,
        grid: (grid_x, grid_yz.0, grid_yz.1),
        block,
        smem,
        q_per_cta,
    })
}

/// Dynamic shared memory of `attn_f32` for `rows` packed rows and head_dim `d`.
pub const fn f32_smem_bytes(rows: usize, d: usize) -> u32 {
    let floats =
        2 * rows * d + F32_KEY_TILE * (d + 1) + F32_KEY_TILE * d + rows * F32_KEY_TILE + 3 * rows;
    (floats * 4) as u32
}

/// Key tile of the tensor-core kernel for padded head_dim `dp`.
pub const fn mma_key_tile(dp: usize) -> usize {
    if dp <= 128 {
        64
    } else {
        32
    }
}

/// Dynamic shared memory of `attn_mma_*_p<dp>_m<m_tiles>`: the Q tile and two stages of K and V,
/// rows padded by 8 elements.
pub const fn mma_smem_bytes(dp: usize, m_tiles: usize, key_tile: usize) -> u32 {
    let ld = dp + 8;
    let rows = 64 * m_tiles;
    ((rows * ld + 4 * key_tile * ld) * 2) as u32
}

/// Dynamic shared memory of the wgmma kernel: 1024 bytes of alignment slack (the swizzle repeats
/// every 1024 bytes), [`WGMMA_Q_BUFFERS`] Q tiles, [`WGMMA_K_STAGES`] K and [`WGMMA_V_STAGES`]
/// V stages, 256 bytes a row, the pipeline's mbarriers (a full and an empty one per stage and
/// Q buffer, 8 bytes each), and two work-item slots of 11 ints.
pub const fn wgmma_smem_bytes() -> u32 {
    let stages = WGMMA_K_STAGES + WGMMA_V_STAGES;
    (1024
        + WGMMA_Q_BUFFERS * WGMMA_ROWS * 256
        + stages * WGMMA_KEY_TILE * 256
        + 2 * (stages + WGMMA_Q_BUFFERS) * 8
        + 2 * 11 * 4) as u32
}

/// Dynamic shared memory of the q/k/v preparation kernel.
pub const fn prep_smem_bytes(cfg: &Config) -> u32 {
    let n = if cfg.n_head > cfg.n_kv_head {
        cfg.n_head
    } else {
        cfg.n_kv_head
    };
    (n * cfg.head_dim * 4) as u32
}

/// Byte sizes of the device buffers of a GPU layer, all sized once at set-up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Workspace {
    /// `x` as f32 `[N, C]` (N = max_batch * max_seq_len tokens).
    pub x: usize,
    /// `x` in the storage type (only bf16 / f16).
    pub x_store: usize,
    /// The fused q/k/v projection, f32 `[N, q_dim + 2 kv_dim]`.
    pub qkv: usize,
    /// q, k, v after norm and RoPE, storage type.
    pub q: usize,
    /// k (and v, the same size).
    pub kv: usize,
    /// Attention output, storage type `[N, q_dim]`.
    pub o: usize,
    /// Output `y`, f32 `[N, C]`.
    pub y: usize,
    /// Rotary rows, f32 `[N, head_dim]`.
    pub rope: usize,
    /// Mask metadata: lengths, merged groups, granule tables, rotary row indices (i32).
    pub meta: usize,
    /// Weights: fused q/k/v, output, biases and norm weights.
    pub weights: usize,
}

impl Workspace {
    /// Sizes for `cfg` at `precision` and the given maxima.
    pub fn new(
        cfg: &Config,
        precision: Precision,
        max_batch: usize,
        max_seq_len: usize,
    ) -> Option<Workspace> {
        let n = max_batch.checked_mul(max_seq_len)?;
        let s = precision.size();
        let (c, q, kv) = (cfg.n_embd, cfg.q_dim(), cfg.kv_dim());
        let width = q.checked_add(kv.checked_mul(2)?)?;
        let granules = max_seq_len.div_ceil(GROUP_GRANULE);
        let meta_ints = max_batch + n + 2 * max_batch.checked_mul(granules)? + n;
        Some(Workspace {
            x: n.checked_mul(c)?.checked_mul(4)?,
            x_store: if precision == Precision::F32 {
                0
            } else {
                n.checked_mul(c)?.checked_mul(s)?
            },
            qkv: n.checked_mul(width)?.checked_mul(4)?,
            q: n.checked_mul(q)?.checked_mul(s)?,
            kv: n.checked_mul(kv)?.checked_mul(s)?,
            o: n.checked_mul(q)?.checked_mul(s)?,
            y: n.checked_mul(c)?.checked_mul(4)?,
            rope: n.checked_mul(cfg.head_dim)?.checked_mul(4)?,
            meta: meta_ints.checked_mul(4)?,
            weights: width
                .checked_mul(c)?
                .checked_add(c.checked_mul(q)?)?
                .checked_mul(s)?
                .checked_add((width + c + 2 * q.max(kv)) * 4)?,
        })
    }

    /// All device bytes together.
    pub fn total(&self) -> usize {
        self.x
            + self.x_store
            + self.qkv
            + self.q
            + 2 * self.kv
            + self.o
            + self.y
            + self.rope
            + self.meta
            + self.weights
    }
}

/// Merges document ids and varlen segments into one id per token, `out[b * T + t]`, such that
/// two tokens of a row share an id iff they share both the document and the segment. The id is
/// the index of the group's first token in the row, so ids of an earlier segment are below
/// those of a later one (sorted documents give sorted ids and the kernels' interval test skips
/// tiles of other documents), and no key before a query tile's smallest id can be visible to it:
/// the kernels start their key loop there. Returns false when neither is given (then `out` is
/// untouched). `scratch` holds at least T entries.
pub fn merge_groups(
    document_ids: Option<&[i32]>,
    cu_seqlens: Option<&[i32]>,
    batch: usize,
    seq_len: usize,
    out: &mut [i32],
    scratch: &mut [(i32, i32, u32)],
) -> bool {
    let n = batch * seq_len;
    let merged = match (document_ids, cu_seqlens) {
        (None, None) => false,
        (Some(d), None) => {
            out[..n].copy_from_slice(&d[..n]);
            true
        }
        (None, Some(cu)) => {
            for b in 0..batch {
                fill_segments(cu, &mut out[b * seq_len..(b + 1) * seq_len]);
            }
            true
        }
        (Some(d), Some(cu)) => {
            // Varlen needs B = 1 (validated), but stay general: rank (segment, doc) per row.
            for b in 0..batch {
                let row = &mut out[b * seq_len..(b + 1) * seq_len];
                fill_segments(cu, row);
                let sc = &mut scratch[..seq_len];
                for (t, e) in sc.iter_mut().enumerate() {
                    *e = (row[t], d[b * seq_len + t], t as u32);
                }
                sc.sort_unstable();
                let mut rank = -1i32;
                let mut prev: Option<(i32, i32)> = None;
                for &(seg, doc, t) in sc.iter() {
                    if prev != Some((seg, doc)) {
                        rank += 1;
                        prev = Some((seg, doc));
                    }
                    row[t as usize] = rank;
                }
            }
            true
        }
    };
    if merged {
        for row in out[..n].chunks_mut(seq_len) {
            first_token_ids(row, &mut scratch[..seq_len]);
        }
    }
    merged
}

/// Relabels each group of `row` by the index of its first token (`scratch` holds T entries).
fn first_token_ids(row: &mut [i32], scratch: &mut [(i32, i32, u32)]) {
    for (t, e) in scratch.iter_mut().enumerate() {
        *e = (row[t], 0, t as u32);
    }
    scratch.sort_unstable();
    let mut first = 0u32;
    for (k, &(id, _, t)) in scratch.iter().enumerate() {
        if k == 0 || scratch[k - 1].0 != id {
            first = t;
        }
        row[t as usize] = first as i32;
    }
}

/// `row[t]` = index of the varlen segment holding t (empty segments skipped naturally).
fn fill_segments(cu: &[i32], row: &mut [i32]) {
    let mut s = 0usize;
    for (t, v) in row.iter_mut().enumerate() {
        // cu ends at T > t, so the scan stops inside the table.
        while s + 1 < cu.len() && cu[s + 1] as usize <= t {
            s += 1;
        }
        *v = s as i32;
    }
}

/// Per granule of [`GROUP_GRANULE`] tokens of each row: the smallest and largest merged id.
pub fn granule_ranges(
    groups: &[i32],
    batch: usize,
    seq_len: usize,
    gmin: &mut [i32],
    gmax: &mut [i32],
) {
    let ng = seq_len.div_ceil(GROUP_GRANULE);
    for b in 0..batch {
        let row = &groups[b * seq_len..(b + 1) * seq_len];
        for (gi, chunk) in row.chunks(GROUP_GRANULE).enumerate() {
            let (mut lo, mut hi) = (i32::MAX, i32::MIN);
            for &v in chunk {
                lo = lo.min(v);
                hi = hi.max(v);
            }
            gmin[b * ng + gi] = lo;
            gmax[b * ng + gi] = hi;
        }
    }
}

/// Tile classes, as the kernels encode them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tile {
    /// No element visible: skipped.
    None,
    /// Some visible: per-element mask.
    Partial,
    /// All visible: no mask work.
    All,
}

fn both(a: Tile, b: Tile) -> Tile {
    match (a, b) {
        (Tile::None, _) | (_, Tile::None) => Tile::None,
        (Tile::All, Tile::All) => Tile::All,
        _ => Tile::Partial,
    }
}

/// The mask of one batch row as the kernels see it (host mirror of `MaskParams`).
#[derive(Clone, Copy, Debug)]
pub struct DeviceMaskRow<'a> {
    /// T.
    pub seq_len: usize,
    /// Window, or `usize::MAX`.
    pub window: usize,
    /// Valid length of the row.
    pub len: usize,
    /// Merged ids of the row, if any.
    pub groups: Option<&'a [i32]>,
    /// Granule minima of the row.
    pub gmin: &'a [i32],
    /// Granule maxima of the row.
    pub gmax: &'a [i32],
}

impl DeviceMaskRow<'_> {
    /// Element rule of the kernels (`visible` in common.cuh).
    pub fn visible(&self, i: usize, j: usize) -> bool {
        j <= i && i - j < self.window && i < self.len && self.groups.is_none_or(|g| g[i] == g[j])
    }

    /// Tile rule of the kernels (`classify_tile` in common.cuh): queries `[q0, q1)` (q1 <= T)
    /// against the key tile `[k0, k0 + kn)`.
    pub fn classify(&self, q0: usize, q1: usize, k0: usize, kn: usize) -> Tile {
        let k1 = k0 + kn;
        let causal = if k0 + 1 > q1 {
            Tile::None
        } else if k1 - 1 <= q0 {
            Tile::All
        } else {
            Tile::Partial
        };
        let padding = if q0 >= self.len {
            Tile::None
        } else if q1 <= self.len {
            Tile::All
        } else {
            Tile::Partial
        };
        let mut c = both(causal, padding);
        if self.window != usize::MAX {
            let w = if q0 >= k1 && q0 - (k1 - 1) >= self.window {
                Tile::None
            } else if (q1 - 1).saturating_sub(k0) < self.window {
                Tile::All
            } else {
                Tile::Partial
            };
            c = both(c, w);
        }
        let Some(g) = self.groups else { return c };
        if c == Tile::None {
            return c;
        }
        let kt1 = k1.min(self.seq_len);
        if kt1 <= k0 {
            return Tile::None;
        }
        let (qlo, qhi) = g[q0..q1]
            .iter()
            .fold((i32::MAX, i32::MIN), |(a, b), &v| (a.min(v), b.max(v)));
        let (g0, g1) = (k0 / GROUP_GRANULE, (kt1 - 1) / GROUP_GRANULE);
        let klo = self.gmin[g0..=g1].iter().copied().min().unwrap_or(i32::MAX);
        let khi = self.gmax[g0..=g1].iter().copied().max().unwrap_or(i32::MIN);
        let t = if qlo == qhi && klo == khi && qlo == klo {
            Tile::All
        } else if qhi < klo || khi < qlo {
            Tile::None
        } else {
            Tile::Partial
        };
        both(c, t)
    }
}

#[cfg(test)]
mod tests;
