//! `--decode-ladder`: the decode kernel next to its own loads without arithmetic
//! (`probe_paged_*` in `kernels/probe.cu`), stepped from decode's access pattern towards the
//! region probe's, all over the decode bench's cache and in one process, alternated over rounds
//! (the machine's rate drifts between calls). It tells which step costs the decode its read rate.

use crate::cuda_main::{allow_smem, cuerr, launch_probe};
use attnrt_cuda::{Error, GpuKvCache, GpuLayer};
use cust::memory::DeviceBuffer;
use cust::sys as cu;

/// `kernels/probe.cu`'s `PagedProbe`, field for field.
#[repr(C)]
#[derive(Clone, Copy)]
struct PagedProbe {
    k: u64,
    v: u64,
    tables: u64,
    sink: u64,
    per_seq: i32,
    keys: i32,
    n_kv_head: i32,
    block_size: i32,
    base_chunks: i32,
}

/// What one rung launches.
enum Rung {
    /// The decode kernel of the layer's last cached call.
    Decode,
    /// `probe_paged_<name>` over (K, V) base pointers, with this much dynamic shared memory
    /// and the tiles this many 16-byte chunks into it.
    Paged(&'static str, u64, u64, usize, i32),
    /// `probe_region_kv_s2` over one buffer of `bytes` (two halves, 4 warps per region).
    Region(u64, usize),
}

/// The cache the decode bench filled and the block ids its sequences use (`per_seq` each).
pub struct LadderCache<'a> {
    /// The filled cache.
    pub cache: &'a GpuKvCache,
    /// Every sequence's block ids, `per_seq` each, concatenated.
    pub ids: &'a [u32],
    /// Blocks per sequence.
    pub per_seq: usize,
    /// Sequences.
    pub seqs: usize,
    /// Cached keys per sequence (the probes read the multiple of 16 below it).
    pub cached: usize,
    /// KV heads of the cache.
    pub n_kv_head: usize,
}

/// Runs the ladder (`rounds` alternated rounds) after the decode bench's first run of `lc`.
pub fn run(
    gpu: &mut GpuLayer<'_>,
    module: &cust::module::Module,
    lc: &LadderCache<'_>,
    rounds: usize,
    lines: &mut Vec<String>,
) -> Result<(), Error> {
    const PAD: usize = 4 * 2 * 2 * 16 * 17 * 16; // 4 warps x 2 stages x K, V x 16 rows of 17 chunks
    const UNPAD: usize = 4 * 2 * 2 * 4096;
    let pool = lc.cache.pool_bytes();
    let (kp, vp) = lc.cache.pool_ptrs();
    let keys = lc.cached / 16 * 16;
    let ctas = lc.seqs * lc.n_kv_head;
    if keys == 0 || ctas * keys * 256 > pool {
        lines.push("decode ladder: the cache is too small for its flat rungs".into());
        return Ok(());
    }
    let tables = DeviceBuffer::from_slice(lc.ids).map_err(cuerr("upload tables"))?;
    let sink = DeviceBuffer::<u32>::zeroed(1).map_err(cuerr("alloc"))?;
    let big = DeviceBuffer::<u8>::zeroed(2 * pool).map_err(cuerr("alloc"))?;
    let (b1, b2) = (
        DeviceBuffer::<u8>::zeroed(pool).map_err(cuerr("alloc"))?,
        DeviceBuffer::<u8>::zeroed(pool).map_err(cuerr("alloc"))?,
    );
    let bp = big.as_device_ptr().as_raw();
    let (one_k, one_v) = (bp, bp + pool as u64);
    let (sep_k, sep_v) = (b1.as_device_ptr().as_raw(), b2.as_device_ptr().as_raw());
    let rungs: Vec<(&str, Rung)> = vec![
        ("decode kernel (normal, arithmetic included)", Rung::Decode),
        (
            "loads: table, shuffles, padded (decode's)",
            Rung::Paged("tsp", kp, vp, PAD, 0),
        ),
        (
            "loads: table, rows per lane, padded",
            Rung::Paged("tlp", kp, vp, PAD, 0),
        ),
        (
            "loads: table, shuffles, unpadded",
            Rung::Paged("tsu", kp, vp, UNPAD, 0),
        ),
        (
            "loads: table, rows per lane, unpadded",
            Rung::Paged("tlu", kp, vp, UNPAD, 0),
        ),
        (
            "loads: one run per CTA, shuffles, padded",
            Rung::Paged("fsp", kp, vp, PAD, 0),
        ),
        (
            "loads: one run per CTA, per lane, padded",
            Rung::Paged("flp", kp, vp, PAD, 0),
        ),
        (
            "loads: one run per CTA, per lane, unpadded",
            Rung::Paged("flu", kp, vp, UNPAD, 0),
        ),
        (
            "  the same, padded kernel's shared size",
            Rung::Paged("flu", kp, vp, PAD, 0),
        ),
        (
            "  the same, K and V in two fresh buffers",
            Rung::Paged("flu", sep_k, sep_v, UNPAD, 0),
        ),
        (
            "  the same, K and V halves of one buffer",
            Rung::Paged("flu", one_k, one_v, UNPAD, 0),
        ),
        (
            "decode's loads, K and V halves of one buffer",
            Rung::Paged("tsp", one_k, one_v, PAD, 0),
        ),
        (
            "loads: table, shuffles, unpadded, tiles at +16 B",
            Rung::Paged("tsu", kp, vp, UNPAD + 16, 1),
        ),
        (
            "loads: table, shuffles, unpadded, tiles at +144 B",
            Rung::Paged("tsu", kp, vp, UNPAD + 144, 9),
        ),
        (
            "loads: table, shuffles, unpadded, tiles at +64 B",
            Rung::Paged("tsu", kp, vp, UNPAD + 64, 4),
        ),
        (
            "loads: table, shuffles, padded, tiles at +144 B",
            Rung::Paged("tsp", kp, vp, PAD + 144, 9),
        ),
        (
            "loads: table, shuffles, swizzled",
            Rung::Paged("tsx", kp, vp, UNPAD, 0),
        ),
        (
            "region probe (kv, 4 warps per region)",
            Rung::Region(bp, 2 * pool),
        ),
    ];
    let stream = gpu.stream() as cu::CUstream;
    let mut gbs = vec![Vec::new(); rungs.len()];
    for _ in 0..rounds {
        for (i, (_, rung)) in rungs.iter().enumerate() {
            let (ms, bytes) = match *rung {
                Rung::Decode => {
                    // SAFETY: the cache of the last cached call outlives the timed launches.
                    let ms = gpu.time_ms(20, |g| unsafe { g.relaunch_decode() })?;
                    (
                        ms,
                        (lc.seqs * (lc.cached + 1) * lc.n_kv_head * 256 * 2) as f64,
                    )
                }
                Rung::Paged(name, k, v, smem, base_chunks) => {
                    let f = module
                        .get_function(format!("probe_paged_{name}"))
                        .map_err(cuerr("probe function"))?
                        .to_raw();
                    allow_smem(f, smem)?;
                    let mut a = PagedProbe {
                        k,
                        v,
                        tables: tables.as_device_ptr().as_raw(),
                        sink: sink.as_device_ptr().as_raw(),
                        per_seq: lc.per_seq as i32,
                        keys: keys as i32,
                        n_kv_head: lc.n_kv_head as i32,
                        block_size: lc.cache.block_size() as i32,
                        base_chunks,
                    };
                    let mut params = [(&mut a as *mut PagedProbe).cast::<std::ffi::c_void>()];
                    let ms = gpu.time_ms(10, |_| {
                        // SAFETY: `params` points to the kernel's one argument (`a`, a
                        // `PagedProbe`), alive for the timed launches; the pools, tables and
                        // sink it names outlive them; the shared memory was allowed above.
                        unsafe { launch_probe(f, ctas as u32, 128, smem, stream, &mut params) }
                    })?;
                    (ms, (ctas * keys * 256 * 2) as f64)
                }
                Rung::Region(src, bytes) => {
                    let f = module
                        .get_function("probe_region_kv_s2")
                        .map_err(cuerr("probe function"))?
                        .to_raw();
                    let smem = UNPAD;
                    allow_smem(f, smem)?;
                    let (mut a, mut t, mut k, mut grp) = (
                        src,
                        (bytes / 4096) as i64,
                        sink.as_device_ptr().as_raw(),
                        4i32,
                    );
                    let mut params = [
                        (&mut a as *mut u64).cast::<std::ffi::c_void>(),
                        (&mut t as *mut i64).cast(),
                        (&mut k as *mut u64).cast(),
                        (&mut grp as *mut i32).cast(),
                    ];
                    let ms = gpu.time_ms(10, |_| {
                        // SAFETY: `params` points to the kernel's four arguments (a buffer of
                        // `t` tiles, the sink, the warps per region), alive for the timed
                        // launches; the shared memory was allowed above.
                        unsafe { launch_probe(f, ctas as u32, 128, smem, stream, &mut params) }
                    })?;
                    let regions = ctas;
                    let read = (bytes / 4096 / 2 / regions) * regions * 2 * 4096;
                    (ms, read as f64)
                }
            };
            gbs[i].push(bytes / (ms as f64 * 1e-3) / 1e9);
        }
    }
    let med = |v: &[f64]| {
        let mut s = v.to_vec();
        s.sort_by(f64::total_cmp);
        s[s.len() / 2]
    };
    let base = med(&gbs[0]);
    lines.push(format!(
        "decode ladder, {} x {} keys, {} CTAs, {rounds} alternated rounds (GB/s of each round; median against the decode kernel's):",
        lc.seqs, lc.cached, ctas
    ));
    for ((name, _), g) in rungs.iter().zip(&gbs) {
        let runs: Vec<String> = g.iter().map(|x| format!("{x:.0}")).collect();
        lines.push(format!(
            "  {name:50} {:>18} GB/s  {:.3}x",
            runs.join(" "),
            med(g) / base
        ));
    }
    Ok(())
}
