//! `attnrt-cuda-bench [OUT.json]`: attnrt's CUDA executor on the shapes of the issue (bf16,
//! Hq 32, Hkv 8, head_dim 128): causal prefill T = 2048 and 8192, sliding window 4096 at
//! T = 16384, 8 packed documents at T = 16384 (document ids and varlen), and the whole layer at
//! n_embd 4096, T = 4096. Prints TFLOP/s of useful (unmasked) work and writes JSON lines that
//! `bench/torch_side.py` merges with PyTorch's numbers measured in the same run.
//!
//! `attnrt-cuda-bench --multi [OUT.json]`: the head split over GPUs (`MultiGpuLayer`) on 1
//! and 2 GPUs (4 too when present): prefill T = 16384 (causal) with each `ReduceOptions`
//! variant (the all-to-all included; some also with the devices' work enqueued device by
//! device instead of stage by stage, with each device's enqueue start, compute and NCCL
//! time), and decode of 32 sequences x 8192 cached tokens (ms per step host to host, the
//! 2-GPU / 1-GPU latency ratio, ms in NCCL, attention-only time per device). n_embd 4096, 32/8
//! heads, head_dim 128, bf16.

#[cfg(not(feature = "cuda"))]
fn main() {
    println!("attnrt-cuda-bench: attnrt built without CUDA (feature `cuda` off); nothing to run");
}

#[cfg(feature = "cuda")]
fn main() {
    if let Err(e) = cuda_main::run() {
        eprintln!("attnrt-cuda-bench: {e}");
        std::process::exit(1);
    }
}

#[cfg(feature = "cuda")]
#[path = "bench/ladder.rs"]
mod ladder;

#[cfg(feature = "cuda")]
mod cuda_main {
    use attnrt::{
        rope, Config, Inputs, Layer, LayerWeights, MaskInputs, Rope, RopeTable, Sequence, Tensor,
    };
    use attnrt_cuda::{
        device_count, CachedDeviceCall, DecodeTuning, DeviceCall, Error, GpuKvCache, GpuLayer,
        GpuOptions, MultiGpuLayer, Precision, ReduceOptions, RopeSource, StepGraphLayout,
    };
    use cust::sys as cu;
    use std::fmt::Write as _;

    struct Rng(u64);
    impl Rng {
        fn uniform(&mut self) -> f32 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            let v = self.0.wrapping_mul(0x2545_F491_4F6C_DD1D);
            ((v >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        }
        fn vec(&mut self, n: usize, s: f32) -> Vec<f32> {
            (0..n).map(|_| self.uniform() * s).collect()
        }
    }

    /// Visible (query, key) pairs of one row.
    fn pairs(t: usize, window: Option<usize>, docs: usize) -> f64 {
        let len = t / docs;
        let mut n = 0f64;
        for d in 0..docs {
            let l = if d + 1 == docs { t - len * d } else { len };
            for i in 0..l {
                n += window.map_or(i + 1, |w| (i + 1).min(w)) as f64;
            }
        }
        n
    }

    pub(crate) fn cuerr(call: &'static str) -> impl Fn(cust::error::CudaError) -> Error {
        move |e| Error::Cuda {
            call,
            message: format!("{e:?}"),
        }
    }

    /// A driver call's result as the crate's error.
    fn drv(call: &'static str, r: cu::CUresult) -> Result<(), Error> {
        if r == cu::CUresult::CUDA_SUCCESS {
            Ok(())
        } else {
            Err(Error::Cuda {
                call,
                message: format!("{r:?}"),
            })
        }
    }

    /// Allows the probe kernel `f` (a live function of the current context) `smem` bytes of
    /// dynamic shared memory.
    pub(crate) fn allow_smem(f: cu::CUfunction, smem: usize) -> Result<(), Error> {
        // SAFETY: `f` is a live function of the current context (the caller's contract).
        drv("cuFuncSetAttribute", unsafe {
            cu::cuFuncSetAttribute(
                f,
                cu::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                smem as i32,
            )
        })
    }

    /// Launches the probe kernel `f` on `stream`: `ctas` CTAs of `threads` threads with `smem`
    /// bytes of dynamic shared memory.
    ///
    /// # Safety
    /// `f` is a live function of the current context that takes the parameters `params` point
    /// to, each alive until the launch completes; `smem` bytes were allowed ([`allow_smem`]).
    pub(crate) unsafe fn launch_probe(
        f: cu::CUfunction,
        ctas: u32,
        threads: u32,
        smem: usize,
        stream: cu::CUstream,
        params: &mut [*mut std::ffi::c_void],
    ) -> Result<(), Error> {
        // SAFETY: the caller's contract above.
        drv("cuLaunchKernel", unsafe {
            cu::cuLaunchKernel(
                f,
                ctas,
                1,
                1,
                threads,
                1,
                1,
                smem as u32,
                stream,
                params.as_mut_ptr(),
                std::ptr::null_mut(),
            )
        })
    }

    /// Device-to-device copy of `bytes` bytes: read + write GB/s (the measured HBM bandwidth).
    fn copy_bandwidth(gpu: &mut GpuLayer<'_>, bytes: usize) -> Result<f64, Error> {
        let a = cust::memory::DeviceBuffer::<u8>::zeroed(bytes).map_err(cuerr("alloc"))?;
        let b = cust::memory::DeviceBuffer::<u8>::zeroed(bytes).map_err(cuerr("alloc"))?;
        let (pa, pb) = (a.as_device_ptr().as_raw(), b.as_device_ptr().as_raw());
        let stream = gpu.stream() as cu::CUstream;
        let ms = gpu.time_ms(10, |_| {
            // SAFETY: a and b hold `bytes` bytes each and outlive the timed copies.
            drv("cuMemcpyDtoDAsync", unsafe {
                cu::cuMemcpyDtoDAsync_v2(pb, pa, bytes, stream)
            })
        })?;
        Ok(2.0 * bytes as f64 / (ms as f64 * 1e-3) / 1e9)
    }

    /// The read probes (`kernels/probe.cu`), loaded by this bench only.
    const PTX_PROBE: &str = include_str!(concat!(env!("OUT_DIR"), "/probe.ptx"));

    /// `--read-roofline [--probe-mib N]`: how fast this GPU reads `mib` MiB (2 GiB unless
    /// given) with each load method of `kernels/probe.cu` (no arithmetic), against the copy
    /// rate `copy_gbs` measured in the same run; one line per (kernel, CTAs, warps per region).
    fn read_roofline(
        gpu: &mut GpuLayer<'_>,
        copy_gbs: f64,
        mib: usize,
        lines: &mut Vec<String>,
    ) -> Result<(), Error> {
        const TILE: usize = 4096;
        let bytes = mib << 20;
        let module =
            cust::module::Module::from_ptx(PTX_PROBE, &[]).map_err(cuerr("load probe.ptx"))?;
        let src = cust::memory::DeviceBuffer::<u8>::zeroed(bytes).map_err(cuerr("alloc"))?;
        let sink = cust::memory::DeviceBuffer::<u32>::zeroed(1).map_err(cuerr("alloc"))?;
        let (mut sms, mut dev) = (0i32, 0);
        // SAFETY: valid out-pointers; the layer's context is current (it was just created).
        drv("cuCtxGetDevice", unsafe { cu::cuCtxGetDevice(&mut dev) })?;
        // SAFETY: as above; `dev` is the current context's device.
        drv("cuDeviceGetAttribute", unsafe {
            cu::cuDeviceGetAttribute(
                &mut sms,
                cu::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
                dev,
            )
        })?;
        let sms = sms.max(1) as u32;
        // (kernel, threads, dynamic shared memory, CTAs, region probes: (warps per region,
        // buffer halves read in pairs))
        let mut cases = vec![("probe_ldg".to_string(), 256u32, 0usize, 8 * sms, None)];
        for (stages, bulk) in [(2usize, false), (4, false), (2, true), (4, true)] {
            let name = if bulk {
                "probe_bulk_s"
            } else {
                "probe_cp_async_s"
            };
            let smem = 4 * stages * TILE + if bulk { 4 * stages * 8 } else { 0 };
            for per_sm in [1u32, 2, 3] {
                cases.push((format!("{name}{stages}"), 128, smem, per_sm * sms, None));
            }
        }
        // Decode's pattern: 256 CTAs (32 x 8 (sequence, KV head) pairs) and 2 per SM, one
        // region per CTA (4 warps) up to the whole buffer, with and without K/V pairs.
        for (name, halves) in [("probe_region_s2", 1usize), ("probe_region_kv_s2", 2)] {
            let smem = 4 * 2 * halves * TILE;
            for ctas in [256, 2 * sms] {
                for group in [4u32, 8, 16, 32, 4 * ctas] {
                    if (4 * ctas) % group == 0 {
                        cases.push((name.to_string(), 128, smem, ctas, Some((group, halves))));
                    }
                }
            }
        }
        let stream = gpu.stream() as cu::CUstream;
        for (name, threads, smem, ctas, region) in cases {
            let f = module
                .get_function(&name)
                .map_err(cuerr("probe function"))?;
            let raw = f.to_raw();
            if let Err(e) = allow_smem(raw, smem) {
                lines.push(format!(
                    "read probe {name}: {smem} bytes of shared memory refused ({e})"
                ));
                continue;
            }
            let (mut a, mut t, mut k) = (
                src.as_device_ptr().as_raw(),
                (bytes / TILE) as i64,
                sink.as_device_ptr().as_raw(),
            );
            let mut grp = region.map_or(0, |(g, _)| g as i32);
            let mut params = [
                (&mut a as *mut u64).cast::<std::ffi::c_void>(),
                (&mut t as *mut i64).cast(),
                (&mut k as *mut u64).cast(),
                (&mut grp as *mut i32).cast(),
            ];
            // The region probes read whole regions only.
            let read = match region {
                None => bytes,
                Some((g, halves)) => {
                    let regions = (4 * ctas as usize) / g as usize;
                    (bytes / TILE / halves / regions) * regions * halves * TILE
                }
            };
            let ms = gpu.time_ms(10, |_| {
                // SAFETY: the parameters are the kernel's (a buffer of `t` tiles, a sink word,
                // and for the region probes the warps per region; a kernel of three parameters
                // reads only the first three entries), alive for the timed launches; the shared
                // memory was allowed above.
                unsafe { launch_probe(raw, ctas, threads, smem, stream, &mut params) }
            })?;
            let gbs = read as f64 / (ms as f64 * 1e-3) / 1e9;
            let grp = region.map_or(String::new(), |(g, _)| format!(", {g} warps per region"));
            lines.push(format!(
                "read probe {name:18} {ctas} CTAs x {threads} threads{grp}: {ms:7.3} ms {gbs:6.0} GB/s = {:3.0}% of copy {copy_gbs:.0} GB/s",
                100.0 * gbs / copy_gbs
            ));
        }
        Ok(())
    }

    /// Decode of one new token per sequence over `cached` keys each (bf16 cache, blocks of
    /// `bs` tokens in shuffled order, or in pool order where the run says so): the attention launch
    /// (merge included) timed alone, once per run (the first is the reported one, returned as
    /// (bytes read, ms); the others print their output's largest difference from the first's);
    /// `ladder`: then the loads ladder of `ladder.rs` over the same cache.
    #[allow(clippy::too_many_arguments)]
    fn decode_case(
        json: &mut String,
        lines: &mut Vec<String>,
        seqs_n: usize,
        cached: usize,
        copy_gbs: f64,
        runs: &[(DecodeTuning, bool)],
        bs: usize,
        ladder: bool,
    ) -> Result<Option<(f64, f64)>, Error> {
        let (c, h, kv, d) = (4096usize, 32usize, 8usize, 128usize);
        let mut rng = Rng(7);
        let cfg = Config::new(c, h).with_kv_heads(kv).with_head_dim(d);
        let w = rng.vec(h * d * 64, 0.02);
        let wq: Vec<f32> = (0..h * d * c).map(|i| w[i % w.len()]).collect();
        let wk: Vec<f32> = (0..kv * d * c).map(|i| w[i % w.len()]).collect();
        let wo: Vec<f32> = (0..c * h * d).map(|i| w[i % w.len()]).collect();
        let weights = LayerWeights::projections(
            Tensor::F32(&wq),
            Tensor::F32(&wk),
            Tensor::F32(&wk),
            Tensor::F32(&wo),
        );
        let layer = Layer::new(cfg, weights)?;
        let mut gpu = GpuLayer::new(layer, GpuOptions::new(Precision::Bf16, 1, seqs_n))?;
        let per_seq = (cached + 1).div_ceil(bs);
        let num_blocks = per_seq * seqs_n;
        let mut cache = GpuKvCache::new(Precision::Bf16, kv, d, bs, num_blocks, false, 0)?;
        let chunk: Vec<u8> = (0..1 << 20)
            .flat_map(|_| half::bf16::from_f32(rng.uniform()).to_bits().to_le_bytes())
            .collect();
        let fill: Vec<u8> = chunk
            .iter()
            .copied()
            .cycle()
            .take(cache.pool_bytes())
            .collect();
        cache.write_raw(&fill, &fill)?;
        drop(fill);
        // Shuffled blocks.
        let mut ids: Vec<u32> = (0..num_blocks as u32).collect();
        for i in (1..ids.len()).rev() {
            let j = (((rng.uniform() + 1.0) * 0.5) * (i + 1) as f32) as usize % (i + 1);
            ids.swap(i, j);
        }
        let in_order: Vec<u32> = (0..num_blocks as u32).collect();
        fn seqs_of(ids: &[u32], n: usize, per_seq: usize, cached: usize) -> Vec<Sequence<'_>> {
            (0..n)
                .map(|s| Sequence {
                    cached,
                    new_tokens: 1,
                    blocks: &ids[s * per_seq..(s + 1) * per_seq],
                })
                .collect()
        }
        let seqs = seqs_of(&ids, seqs_n, per_seq, cached);
        let seqs_in_order = seqs_of(&in_order, seqs_n, per_seq, cached);
        let x = rng.vec(seqs_n * c, 1.0);
        let mut first: Option<Vec<f32>> = None;
        let mut reported = None;
        for (i, &(tuning, contiguous)) in runs.iter().enumerate() {
            let mut y = vec![0.0f32; x.len()];
            gpu.set_decode_tuning(tuning);
            let s = if contiguous { &seqs_in_order } else { &seqs };
            if let Err(e) = gpu.forward_cached(&x, s, None, &mut cache, &mut y) {
                lines.push(format!("decode {seqs_n} x {cached} {tuning:?}: {e}"));
                continue;
            }
            let shape = gpu.last_cached_shape();
            let kernel = gpu.last_decode_kernel().unwrap_or_default();
            // SAFETY: `cache` is alive for the timed relaunches.
            let ms = gpu.time_ms(20, |g| unsafe { g.relaunch_decode() })?;
            let bytes = (seqs_n * (cached + 1) * kv * d * 2 * 2) as f64;
            let gbs = bytes / (ms as f64 * 1e-3) / 1e9;
            let name = if bs == 64 {
                format!("decode {seqs_n} x {cached}")
            } else {
                format!("decode {seqs_n} x {cached} b{bs}")
            };
            let order = if contiguous { "in order" } else { "shuffled" };
            let diff = match &first {
                None => String::new(),
                Some(f) => {
                    let m = f
                        .iter()
                        .zip(&y)
                        .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
                    let s = f.iter().fold(0.0f32, |m, a| m.max(a.abs()));
                    format!(" max|dy| {m:.2e} of max|y| {s:.2e}")
                }
            };
            lines.push(format!(
                "{name:18} {kernel:27} {order:8} {ms:8.4} ms {gbs:6.0} GB/s = {:3.0}% of copy {copy_gbs:.0} GB/s (items, tokens, split) {shape:?}{diff}",
                100.0 * gbs / copy_gbs
            ));
            if i == 0 {
                writeln!(
                    json,
                    "{{\"case\": \"{name}\", \"ms\": {ms}, \"gbs\": {gbs}, \"copy_gbs\": {copy_gbs}, \"backend\": \"{}\", \"kernel\": \"{kernel}\"}}",
                    gpu.backend()
                )
                .ok();
                first = Some(y);
                reported = Some((bytes, ms as f64));
            }
        }
        if ladder && reported.is_some() {
            // The first run's call is the one `relaunch_decode` repeats.
            gpu.set_decode_tuning(runs[0].0);
            let s = if runs[0].1 { &seqs_in_order } else { &seqs };
            let mut y = vec![0.0f32; x.len()];
            gpu.forward_cached(&x, s, None, &mut cache, &mut y)?;
            let module =
                cust::module::Module::from_ptx(PTX_PROBE, &[]).map_err(cuerr("load probe.ptx"))?;
            let ids = if runs[0].1 { &in_order } else { &ids };
            let lc = crate::ladder::LadderCache {
                cache: &cache,
                ids,
                per_seq,
                seqs: seqs_n,
                cached,
                n_kv_head: kv,
            };
            crate::ladder::run(&mut gpu, &module, &lc, 3, lines)?;
        }
        Ok(reported)
    }

    /// `--decode-scaling`: the default decode of 32 sequences over 2047 to 32767 keys, and the
    /// least-squares line time = fixed + bytes / rate through them: the rate is what the kernel
    /// streams once running, the fixed part what a launch costs beyond that (start, tail,
    /// epilogue), to hold against the read probes' (`--read-roofline --probe-mib N`).
    fn decode_scaling(
        json: &mut String,
        lines: &mut Vec<String>,
        copy_gbs: f64,
    ) -> Result<(), Error> {
        let runs = [(DecodeTuning::default(), false)];
        let mut points = Vec::new();
        for cached in [2047, 4095, 8191, 16383, 32767] {
            if let Some(p) = decode_case(json, lines, 32, cached, copy_gbs, &runs, 64, false)? {
                points.push(p);
            }
        }
        if points.len() < 2 {
            lines.push("decode scaling: too few lengths ran for a fit".into());
            return Ok(());
        }
        let n = points.len() as f64;
        let (sx, sy) = points
            .iter()
            .fold((0.0, 0.0), |(a, b), &(x, y)| (a + x, b + y));
        let (mx, my) = (sx / n, sy / n);
        let sxy: f64 = points.iter().map(|&(x, y)| (x - mx) * (y - my)).sum();
        // Positive: the lengths, so the bytes, differ.
        let sxx: f64 = points.iter().map(|&(x, _)| (x - mx) * (x - mx)).sum();
        let slope = sxy / sxx; // ms per byte
        let fixed_us = (my - slope * mx) * 1e3;
        let rate = 1.0 / (slope * 1e-3) / 1e9;
        lines.push(format!(
            "decode scaling (32 sequences, {} lengths): {rate:.0} GB/s once running, {fixed_us:.1} us fixed per launch",
            points.len()
        ));
        writeln!(
            json,
            "{{\"case\": \"decode scaling\", \"rate_gbs\": {rate}, \"fixed_us\": {fixed_us}}}"
        )
        .ok();
        Ok(())
    }

    /// A variant of the head split's decode step in `--multi-decode-lean`.
    #[derive(Clone, Copy, PartialEq, Eq)]
    struct StepVariant {
        /// Metadata uploaded by the copy engine instead of a kernel.
        copy: bool,
        /// How a step over several devices is captured.
        layout: StepGraphLayout,
        /// Every device plans and stages its own metadata (the default shares device 0's).
        own_meta: bool,
    }

    impl StepVariant {
        /// How the variant differs from the default, for the table.
        fn describe(&self) -> String {
            let mut s = String::new();
            if self.copy {
                s += ", metadata by copy engine";
            }
            if self.layout == StepGraphLayout::Joint {
                s += ", one graph over both devices";
            }
            if self.own_meta {
                s += ", metadata staged per device";
            }
            s
        }
    }

    /// The runs of `--decode-sweep`: the planned default first, the same with the blocks in
    /// pool order (the cost of the shuffled block table), the CUDA-core kernel, then the
    /// default kernel at several split sizes.
    fn sweep_runs() -> Vec<(DecodeTuning, bool)> {
        let d = DecodeTuning::default();
        let mut v = vec![
            (d, false),
            (d, true),
            (
                DecodeTuning {
                    cuda_cores: true,
                    ..d
                },
                false,
            ),
        ];
        for split in [512, 1024, 2048, 2752, 4096, 8192] {
            v.push((DecodeTuning { split, ..d }, false));
        }
        v
    }

    pub fn run() -> Result<(), Error> {
        let args: Vec<String> = std::env::args().skip(1).collect();
        // `--only NAME` runs one attention case (for Nsight Compute), `--decode` only decode,
        // `--decode-sweep` only decode, over split sizes and against the CUDA-core kernel,
        // `--decode-scaling` only decode, over lengths (`decode_scaling`).
        let only = args
            .iter()
            .position(|a| a == "--only")
            .and_then(|i| args.get(i + 1).cloned());
        let sweep = args.iter().any(|a| a == "--decode-sweep");
        // `--read-roofline`: the copy rate and the read probes only (`--probe-mib N`: of N MiB).
        let roofline = args.iter().any(|a| a == "--read-roofline");
        let probe_mib = args
            .iter()
            .position(|a| a == "--probe-mib")
            .and_then(|i| args.get(i + 1))
            .map(|m| {
                m.parse::<usize>()
                    .map_err(|_| Error::Unsupported(format!("--probe-mib {m}: not a size")))
            })
            .transpose()?;
        let scaling = args.iter().any(|a| a == "--decode-scaling");
        // `--decode-ladder`: 32 x 8191 only, then the ladder of its loads (`ladder.rs`).
        let ladder = args.iter().any(|a| a == "--decode-ladder");
        let decode_only =
            sweep || roofline || scaling || ladder || args.iter().any(|a| a == "--decode");
        // `--multi` runs the head split's prefill and decode, `--multi-decode` only its decode,
        // `--multi-decode-lean` only its device-resident decode with the default reduction
        // (short enough to run under a profiler), `--lean-default` that without its variants
        // (for a timeline trace).
        let lean = match (
            args.iter().any(|a| a == "--multi-decode-lean"),
            args.iter().any(|a| a == "--lean-default"),
        ) {
            (false, _) => multi::Lean::Off,
            (true, false) => multi::Lean::Variants,
            (true, true) => multi::Lean::DefaultOnly,
        };
        let multi_decode = lean != multi::Lean::Off || args.iter().any(|a| a == "--multi-decode");
        let multi_only = multi_decode || args.iter().any(|a| a == "--multi");
        let out = args
            .iter()
            .enumerate()
            .find(|&(i, a)| {
                !a.starts_with("--")
                    && Some(a) != only.as_ref()
                    && (i == 0 || args[i - 1] != "--probe-mib")
            })
            .map(|(_, a)| a)
            .cloned();
        let (c, h, kv, d) = (4096usize, 32usize, 8usize, 128usize);
        let mut rng = Rng(42);
        let mut json = String::new();
        let mut lines = Vec::new();
        let iters = 20;
        if multi_only {
            multi::run(&mut json, !multi_decode, lean)?;
            if let Some(path) = out {
                std::fs::write(&path, json)
                    .map_err(|e| Error::Unsupported(format!("{path}: {e}")))?;
            }
            return Ok(());
        }

        // Attention-only cases: the layer computes q/k/v once, then the attention kernel alone
        // is timed on them.
        let cases: [(&str, usize, Option<usize>, usize, bool); 5] = [
            ("causal T=2048", 2048, None, 1, false),
            ("causal T=8192", 8192, None, 1, false),
            ("window 4096, T=16384", 16384, Some(4096), 1, false),
            ("8 documents (ids), T=16384", 16384, None, 8, false),
            ("8 documents (varlen), T=16384", 16384, None, 8, true),
        ];
        let wq = rng.vec(h * d * c, 0.02);
        let wk = rng.vec(kv * d * c, 0.02);
        let wv = rng.vec(kv * d * c, 0.02);
        let wo = rng.vec(c * h * d, 0.02);
        for (name, t, window, docs, varlen) in cases {
            if decode_only || only.as_ref().is_some_and(|o| o != name) {
                continue;
            }
            let mut cfg = Config::new(c, h).with_kv_heads(kv).with_head_dim(d);
            if let Some(w) = window {
                cfg = cfg.with_sliding_window(w);
            }
            let weights = LayerWeights::projections(
                Tensor::F32(&wq),
                Tensor::F32(&wk),
                Tensor::F32(&wv),
                Tensor::F32(&wo),
            );
            let layer = Layer::new(cfg, weights)?;
            let mut gpu = GpuLayer::new(layer, GpuOptions::new(Precision::Bf16, 1, t))?;
            let x = rng.vec(t * c, 1.0);
            let len = t / docs;
            let ids: Vec<i32> = (0..t).map(|i| (i / len).min(docs - 1) as i32).collect();
            let cu: Vec<i32> = (0..=docs)
                .map(|k| if k == docs { t } else { k * len } as i32)
                .collect();
            let mut inputs = Inputs::new(&x, 1, t);
            if docs > 1 {
                inputs.mask = MaskInputs {
                    document_ids: (!varlen).then_some(&ids[..]),
                    cu_seqlens: varlen.then_some(&cu[..]),
                    ..MaskInputs::default()
                };
            }
            let mut y = vec![0.0f32; t * c];
            let backend = gpu.forward_host(&inputs, &mut y)?;
            let ms = gpu.time_ms(iters, |g| g.relaunch_attention())?;
            let flops = pairs(t, window, docs) * h as f64 * 4.0 * d as f64;
            let tflops = flops / (ms as f64 * 1e-3) / 1e12;
            lines.push(format!(
                "{name:34} {ms:9.3} ms {tflops:8.1} TFLOP/s  [{backend}]"
            ));
            writeln!(
                json,
                "{{\"case\": \"{name}\", \"ms\": {ms}, \"tflops\": {tflops}, \"backend\": \"{backend}\"}}"
            )
            .ok();
        }

        if only.is_some() {
            return Ok(());
        }
        if !decode_only {
            whole_layer(&mut rng, &wq, &wk, &wv, &wo, iters, &mut json, &mut lines)?;
        }

        // Decode over the paged cache, with the measured copy bandwidth.
        {
            let cfg = Config::new(64, 1);
            let w = vec![0.0f32; 64 * 64];
            let weights = LayerWeights::projections(
                Tensor::F32(&w),
                Tensor::F32(&w),
                Tensor::F32(&w),
                Tensor::F32(&w),
            );
            let mut g = GpuLayer::new(
                Layer::new(cfg, weights)?,
                GpuOptions::new(Precision::F32, 1, 1),
            )?;
            let copy = copy_bandwidth(&mut g, 1 << 30)?;
            lines.push(format!(
                "device-to-device copy 1 GiB: {copy:.0} GB/s (read + write)"
            ));
            writeln!(json, "{{\"case\": \"copy\", \"gbs\": {copy}}}").ok();
            if roofline {
                read_roofline(&mut g, copy, probe_mib.unwrap_or(2048), &mut lines)?;
                for l in &lines {
                    println!("  {l}");
                }
                return Ok(());
            }
            let runs = if sweep {
                sweep_runs()
            } else {
                vec![(DecodeTuning::default(), false)]
            };
            if scaling {
                decode_scaling(&mut json, &mut lines, copy)?;
            } else if ladder {
                decode_case(&mut json, &mut lines, 32, 8191, copy, &runs, 64, true)?;
            } else {
                decode_case(&mut json, &mut lines, 32, 8191, copy, &runs, 64, false)?;
                decode_case(&mut json, &mut lines, 1, 32767, copy, &runs, 64, false)?;
            }
            if sweep {
                // Other block sizes: how much the runs of one head's keys between jumps in
                // the pool matter (64 tokens: 16 KB runs).
                let default = [(DecodeTuning::default(), false)];
                for bs in [16, 256, 2048] {
                    decode_case(&mut json, &mut lines, 32, 8191, copy, &default, bs, false)?;
                    decode_case(&mut json, &mut lines, 1, 32767, copy, &default, bs, false)?;
                }
            }
        }

        println!("attnrt-cuda (bf16, Hq 32, Hkv 8, D 128; mean of {iters} after warm-up):");
        for l in &lines {
            println!("  {l}");
        }
        if let Some(path) = out {
            std::fs::write(&path, json).map_err(|e| Error::Unsupported(format!("{path}: {e}")))?;
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn whole_layer(
        rng: &mut Rng,
        wq: &[f32],
        wk: &[f32],
        wv: &[f32],
        wo: &[f32],
        iters: usize,
        json: &mut String,
        lines: &mut Vec<String>,
    ) -> Result<(), Error> {
        let (c, h, kv, d) = (4096usize, 32usize, 8usize, 128usize);
        // Whole layer: rotary (table uploaded once), causal, T = 4096, device buffers.
        let t = 4096;
        let cfg = Config::new(c, h)
            .with_kv_heads(kv)
            .with_head_dim(d)
            .with_rope(Rope {
                theta: 500000.0,
                ..Rope::DEFAULT
            });
        let weights = LayerWeights::projections(
            Tensor::F32(wq),
            Tensor::F32(wk),
            Tensor::F32(wv),
            Tensor::F32(wo),
        );
        let layer = Layer::new(cfg, weights)?;
        let mut gpu = GpuLayer::new(layer, GpuOptions::new(Precision::Bf16, 1, t))?;
        let mut table = vec![0.0f32; rope::table_len(t, d)];
        rope::build_table(cfg.rope().expect("rotary"), d, &mut table)?;
        let table = RopeTable::new(&table, d)?;
        gpu.upload_rope_table(&table)?;
        let x = rng.vec(t * c, 1.0);
        let dx = cust::memory::DeviceBuffer::from_slice(&x).map_err(|e| Error::Cuda {
            call: "alloc x",
            message: format!("{e:?}"),
        })?;
        let dy = cust::memory::DeviceBuffer::from_slice(&vec![0.0f32; t * c]).map_err(|e| {
            Error::Cuda {
                call: "alloc y",
                message: format!("{e:?}"),
            }
        })?;
        let call = DeviceCall {
            x: dx.as_device_ptr().as_raw(),
            y: dy.as_device_ptr().as_raw(),
            batch: 1,
            seq_len: t,
            mask: MaskInputs::default(),
            position_ids: None,
            rope: Some(RopeSource::Uploaded),
            stream: std::ptr::null_mut(),
        };
        let mut backend = String::new();
        let ms = gpu.time_ms(iters, |g| {
            // SAFETY: dx / dy hold t * c f32 on the device and outlive the timed calls.
            let b = unsafe { g.forward_device(&call) }?;
            backend = b.to_string();
            Ok(())
        })?;
        let attn_ms = gpu.time_ms(iters, |g| g.relaunch_attention())?;
        let name = "whole layer C=4096 T=4096";
        lines.push(format!(
            "{name:34} {ms:9.3} ms (attention {attn_ms:.3} ms)  [{backend}]"
        ));
        writeln!(
            json,
            "{{\"case\": \"{name}\", \"ms\": {ms}, \"attn_ms\": {attn_ms}, \"backend\": \"{backend}\"}}"
        )
        .ok();

        Ok(())
    }

    /// The multi-GPU benches (`--multi`).
    mod multi {
        use super::*;
        use std::time::Instant;

        const C: usize = 4096;
        const H: usize = 32;
        const KV: usize = 8;
        const D: usize = 128;

        /// Device counts to run: 1, 2 (and 4) of those present.
        fn counts() -> Vec<usize> {
            let n = device_count();
            [1usize, 2, 4].into_iter().filter(|&k| k <= n).collect()
        }

        fn devices(n: usize) -> Vec<u32> {
            (0..n as u32).collect()
        }

        fn name(r: &ReduceOptions) -> String {
            if r.all_to_all {
                return format!("all-to-all (seq-parallel out) x{}", r.chunks);
            }
            format!(
                "{} {} x{}",
                if r.storage_dtype { "bf16" } else { "f32" },
                if r.scatter {
                    "reduce-scatter"
                } else {
                    "all-reduce"
                },
                r.chunks
            )
        }

        const fn opt(storage_dtype: bool, scatter: bool, chunks: usize) -> ReduceOptions {
            ReduceOptions {
                storage_dtype,
                chunks,
                scatter,
                all_to_all: false,
            }
        }

        const fn a2a(chunks: usize) -> ReduceOptions {
            ReduceOptions {
                chunks,
                ..ReduceOptions::ALL_TO_ALL
            }
        }

        /// How much of the head split's decode runs: all of it, or only the device-resident
        /// steps with graphs, with or without the step variants.
        #[derive(Clone, Copy, PartialEq, Eq)]
        pub enum Lean {
            /// `--multi` / `--multi-decode`: every mode and reduction.
            Off,
            /// `--multi-decode-lean`: the default step and its variants.
            Variants,
            /// `--multi-decode-lean --lean-default`: the default step only.
            DefaultOnly,
        }

        pub fn run(json: &mut String, with_prefill: bool, lean: Lean) -> Result<(), Error> {
            let mut rng = Rng(42);
            let wq = rng.vec(H * D * C, 0.02);
            let wk = rng.vec(KV * D * C, 0.02);
            let wv = rng.vec(KV * D * C, 0.02);
            let wo = rng.vec(C * H * D, 0.02);
            let weights = LayerWeights::projections(
                Tensor::F32(&wq),
                Tensor::F32(&wk),
                Tensor::F32(&wv),
                Tensor::F32(&wo),
            );
            let cfg = Config::new(C, H).with_kv_heads(KV).with_head_dim(D);
            let layer = Layer::new(cfg, weights)?;
            if with_prefill {
                prefill(&layer, &mut rng, json)?;
            }
            decode(&layer, &mut rng, json, lean)
        }

        /// Prefill T = 16384, causal, batch 1: x staged on every device once; per call every
        /// shard, the reduction, and a wait for every device (host wall clock, mean of 10 after
        /// 3 warm-ups).
        fn prefill(layer: &Layer<'_>, rng: &mut Rng, json: &mut String) -> Result<(), Error> {
            let t = 16384usize;
            let x = rng.vec(t * C, 1.0);
            let inputs = Inputs::new(&x, 1, t);
            let iters = 20;
            // (reduction, enqueue stage by stage across the devices, high-priority second
            // stream for overlapped collectives)
            // (The enqueue orders, chunk counts and stream priorities not listed here were
            // measured slower in earlier sessions: BENCHMARKS.md.)
            let variants = [
                (ReduceOptions::EXACT, true, true),
                (opt(false, true, 1), true, true),
                (opt(true, true, 1), true, true),
                (ReduceOptions::ALL_TO_ALL, true, true),
                (a2a(2), true, true),
            ];
            println!(
                "prefill T={t}, n_embd {C}, {H}/{KV} heads, head_dim {D}, bf16, causal, batch 1 \
                 (host wall clock per call, mean of {iters} after 3 warm-ups)"
            );
            println!(
                "| GPUs | x staged as | reduce (type, collective, chunks) | enqueue | ms | min ms | tokens/s | scaling vs 1 GPU (same x) | ms in NCCL (max / min over devices) | per device: enqueue start us / compute ms / NCCL ms (/ all-to-all copies ms) |"
            );
            println!("| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | --- |");
            // Baselines (1 GPU) with x staged in f32 and in bf16.
            let mut bases = [0.0f64; 2];
            let mut device = String::new();
            for n in counts() {
                let mut m = MultiGpuLayer::new(
                    *layer,
                    &devices(n),
                    GpuOptions::new(Precision::Bf16, 1, t),
                )?;
                device = m.backend().device;
                for (x_bf16, base) in [false, true].into_iter().zip(&mut bases) {
                    if x_bf16 {
                        m.stage_inputs_storage(&inputs)?;
                    } else {
                        m.stage_inputs(&inputs)?;
                    }
                    let x_type = if x_bf16 { "bf16" } else { "f32" };
                    // With x in bf16 only the baseline and the fastest reductions.
                    let vs = match (n, x_bf16) {
                        (1, _) => &variants[..1],
                        (_, false) => &variants[..],
                        (_, true) => &variants[3..],
                    };
                    for &(r, by_stage, high) in vs {
                        m.set_reduce(r)?;
                        m.set_enqueue_by_stage(by_stage);
                        m.set_comm_priority(high)?;
                        for _ in 0..3 {
                            m.forward_staged(&inputs)?;
                        }
                        let (mut nccl, mut nccl_min) = (0.0f64, 0.0f64);
                        let mut per = vec![(0.0f64, 0.0f64, 0.0f64, 0.0f64); n];
                        let mut best = f64::MAX;
                        let start = Instant::now();
                        for _ in 0..iters {
                            let one = Instant::now();
                            m.forward_staged(&inputs)?;
                            best = best.min(one.elapsed().as_secs_f64() * 1e3);
                            nccl += m.last_nccl_ms() as f64;
                            let tm = m.last_call_timing();
                            nccl_min +=
                                tm.iter().map(|d| d.nccl_ms as f64).fold(f64::MAX, f64::min);
                            for (p, d) in per.iter_mut().zip(tm) {
                                p.0 += d.enqueue_us;
                                p.1 += d.compute_ms as f64;
                                p.2 += d.nccl_ms as f64;
                                p.3 += d.copy_ms as f64;
                            }
                        }
                        let ms = start.elapsed().as_secs_f64() * 1e3 / iters as f64;
                        if n == 1 {
                            *base = ms;
                        }
                        let base = *base;
                        let k = iters as f64;
                        let nccl = nccl / k;
                        let nccl_min = if n == 1 { 0.0 } else { nccl_min / k };
                        let per: Vec<String> = per
                            .iter()
                            .map(|p| {
                                let copies = if r.all_to_all && r.chunks == 1 {
                                    format!(" / {:.3}", p.3 / k)
                                } else {
                                    String::new()
                                };
                                format!("{:.1} / {:.3} / {:.3}{copies}", p.0 / k, p.1 / k, p.2 / k)
                            })
                            .collect();
                        let order = match (by_stage, r.chunks > 1, high) {
                            (true, true, false) => "by stage, default-priority 2nd stream",
                            (true, _, _) => "by stage",
                            (false, _, _) => "by device",
                        };
                        println!(
                        "| {n} | {x_type} | {} | {order} | {ms:.3} | {best:.3} | {:.0} | {:.3}x | {nccl:.3} / {nccl_min:.3} | {} |",
                        name(&r),
                        t as f64 / (ms / 1e3),
                        base / ms,
                        per.join(", ")
                    );
                        writeln!(
                        json,
                        "{{\"case\": \"multi prefill T={t}\", \"gpus\": {n}, \"x\": \"{x_type}\", \"reduce\": \"{}\", \"enqueue\": \"{order}\", \"ms\": {ms}, \"min_ms\": {best}, \"scaling\": {}, \"nccl_ms\": {nccl}, \"nccl_min_ms\": {nccl_min}}}",
                        name(&r),
                        base / ms
                    )
                    .ok();
                    }
                }
            }
            println!("({device})");
            Ok(())
        }

        /// Decode: 32 sequences with 8191 cached tokens each, one new token per sequence per
        /// step (the step attends to 8192 keys), bf16 cache of 64-token blocks in shuffled
        /// order filled with random values. ms per step = host wall clock of
        /// `forward_cached` (x up, every shard, reduction, output down), mean of 50 after 5
        /// warm-ups.
        fn decode(
            layer: &Layer<'_>,
            rng: &mut Rng,
            json: &mut String,
            lean: Lean,
        ) -> Result<(), Error> {
            let lean_on = lean != Lean::Off;
            let (seqs_n, cached, bs) = (32usize, 8191usize, 64usize);
            let iters = 50;
            let per_seq = (cached + 1).div_ceil(bs);
            let num_blocks = per_seq * seqs_n;
            let mut ids: Vec<u32> = (0..num_blocks as u32).collect();
            for i in (1..ids.len()).rev() {
                let j = (((rng.uniform() + 1.0) * 0.5) * (i + 1) as f32) as usize % (i + 1);
                ids.swap(i, j);
            }
            let seqs: Vec<Sequence<'_>> = (0..seqs_n)
                .map(|s| Sequence {
                    cached,
                    new_tokens: 1,
                    blocks: &ids[s * per_seq..(s + 1) * per_seq],
                })
                .collect();
            let x = rng.vec(seqs_n * C, 1.0);
            let mut y = vec![0.0f32; x.len()];
            let chunk: Vec<u8> = (0..1 << 20)
                .flat_map(|_| half::bf16::from_f32(rng.uniform()).to_bits().to_le_bytes())
                .collect();
            let fill =
                |bytes: usize| -> Vec<u8> { chunk.iter().copied().cycle().take(bytes).collect() };
            let opts = GpuOptions::new(Precision::Bf16, 1, seqs_n);
            println!(
                "decode {seqs_n} x {} keys (cached {cached} + 1 new), n_embd {C}, {H}/{KV} heads, \
                 head_dim {D}, bf16 cache, blocks of {bs}; ms per step = host wall clock of \
                 forward_cached, mean of {iters} after 5 warm-ups",
                cached + 1
            );

            // One GPU through GpuLayer directly (the same work without the split's wrapper).
            {
                let mut g = GpuLayer::new(*layer, opts)?;
                let mut cache = GpuKvCache::new(Precision::Bf16, KV, D, bs, num_blocks, false, 0)?;
                let f = fill(cache.pool_bytes());
                cache.write_raw(&f, &f)?;
                drop(f);
                for _ in 0..5 {
                    g.forward_cached(&x, &seqs, None, &mut cache, &mut y)?;
                }
                let start = Instant::now();
                for _ in 0..iters {
                    g.forward_cached(&x, &seqs, None, &mut cache, &mut y)?;
                }
                let ms = start.elapsed().as_secs_f64() * 1e3 / iters as f64;
                // SAFETY: `cache` is alive for the timed relaunches.
                let attn = g.time_ms(20, |g| unsafe { g.relaunch_decode() })?;
                println!(
                    "GpuLayer::forward_cached on 1 GPU: {ms:.4} ms per step (attention + merge alone {attn:.4} ms)"
                );
                writeln!(
                    json,
                    "{{\"case\": \"decode 32 x 8192 GpuLayer\", \"ms\": {ms}, \"attn_ms\": {attn}}}"
                )
                .ok();
            }

            // Modes: (graphs, resident). Launches = every kernel and copy enqueued by the
            // call; graphs = the step captured once and replayed. Host = `forward_cached`,
            // x from and the output to host memory; resident = `forward_cached_device`, x in
            // bf16 on every device and the summed output written on every device (a
            // tensor-parallel server whose hidden state stays on the GPUs; all-reduces only).
            let modes = [(false, false), (true, false), (false, true), (true, true)];
            let mode_name = |(graphs, resident): (bool, bool)| {
                format!(
                    "{}, {}",
                    if graphs { "graphs" } else { "launches" },
                    if resident { "resident" } else { "host x/out" }
                )
            };
            let xb: Vec<u8> = x
                .iter()
                .flat_map(|&v| half::bf16::from_f32(v).to_bits().to_le_bytes())
                .collect();
            let mut splits = Vec::new();
            for n in counts() {
                let m = MultiGpuLayer::new(*layer, &devices(n), opts)?;
                let mut cache = m.new_kv_cache(bs, num_blocks, false)?;
                for i in 0..n {
                    let c = cache
                        .device_mut(i)
                        .ok_or_else(|| Error::Unsupported("missing device cache".into()))?;
                    let f = fill(c.pool_bytes());
                    c.write_raw(&f, &f)?;
                }
                let mut bufs = Vec::new();
                let mut ctxs = Vec::new();
                for i in 0..n {
                    let dev =
                        cust::device::Device::get_device(i as u32).map_err(cuerr("device"))?;
                    let ctx = cust::context::Context::new(dev).map_err(cuerr("context"))?;
                    cust::context::CurrentContext::set_current(&ctx).map_err(cuerr("context"))?;
                    let xd = cust::memory::DeviceBuffer::from_slice(&xb).map_err(cuerr("alloc"))?;
                    let od = cust::memory::DeviceBuffer::<u8>::zeroed(x.len() * 4)
                        .map_err(cuerr("alloc"))?;
                    bufs.push((xd, od));
                    ctxs.push(ctx);
                }
                splits.push((n, m, cache, bufs, ctxs));
            }
            // (reduction, small exact sums through peer memory instead of NCCL)
            let variants = |n: usize| -> Vec<(ReduceOptions, bool)> {
                if n == 1 {
                    vec![(ReduceOptions::EXACT, false)]
                } else if lean_on {
                    vec![(ReduceOptions::EXACT, true)]
                } else {
                    vec![
                        (ReduceOptions::EXACT, true),
                        (ReduceOptions::EXACT, false),
                        (opt(true, false, 1), false),
                        (opt(false, true, 1), false),
                        (opt(true, true, 1), false),
                        (ReduceOptions::ALL_TO_ALL, false),
                    ]
                }
            };
            // Variants of the step: the lean run compares them with the default, the full one
            // runs the default.
            const DEFAULT: StepVariant = StepVariant {
                copy: false,
                layout: StepGraphLayout::PerDevice,
                own_meta: false,
            };
            let layouts = |n: usize| -> Vec<StepVariant> {
                let copy = StepVariant {
                    copy: true,
                    ..DEFAULT
                };
                let joint = StepVariant {
                    layout: StepGraphLayout::Joint,
                    ..DEFAULT
                };
                let own_meta = StepVariant {
                    own_meta: true,
                    ..DEFAULT
                };
                match (lean, n) {
                    (Lean::Off | Lean::DefaultOnly, _) => vec![DEFAULT],
                    (Lean::Variants, 1) => vec![DEFAULT, copy],
                    (Lean::Variants, _) => vec![DEFAULT, copy, joint, own_meta],
                }
            };
            // (split index, reduction, peer sums, mode, layout); resident runs only with the
            // all-reduces, the lean run only resident graphs.
            let mut cases = Vec::new();
            for (si, (n, ..)) in splits.iter().enumerate() {
                for (r, peer) in variants(*n) {
                    for &mode in &modes {
                        let fits = !mode.1 || !(r.scatter || r.all_to_all);
                        if fits && (!lean_on || mode == (true, true)) {
                            for layout in layouts(*n) {
                                cases.push((si, r, peer, mode, layout));
                            }
                        }
                    }
                }
            }
            let rounds = 5;
            let iters = 30;
            println!(
                "{rounds} rounds; in each, every case runs 3 warm-up steps and {iters} timed ones \
                 (cases interleaved, so that a noisy stretch of the host hits every case alike); \
                 ms = median over the rounds of the mean step; device spans and host phases \
                 from one more round with step timing on"
            );
            let mut times = vec![Vec::new(); cases.len()];
            let mut last = vec![(0.0f64, Vec::new(), [0.0f64; 4]); cases.len()];
            // The last round is not timed: it records the device spans (step timing on, which
            // costs replayed steps a few microseconds of host work) and the host phases.
            for round in 0..=rounds {
                let diagnostics = round == rounds;
                for (ci, &(si, r, peer, (graphs, resident), v)) in cases.iter().enumerate() {
                    let (n, m, cache, bufs, _) = &mut splits[si];
                    m.set_meta_upload_copy(v.copy);
                    m.set_step_graph_layout(v.layout);
                    m.set_shared_metadata(!v.own_meta);
                    m.set_reduce(r)?;
                    m.set_peer_sum(peer);
                    m.set_step_graphs(graphs);
                    m.set_step_timing(diagnostics);
                    let xs: Vec<u64> = bufs.iter().map(|b| b.0.as_device_ptr().as_raw()).collect();
                    let outs: Vec<u64> =
                        bufs.iter().map(|b| b.1.as_device_ptr().as_raw()).collect();
                    let mut step = |m: &mut MultiGpuLayer<'_>| -> Result<(), Error> {
                        if resident {
                            let call = CachedDeviceCall {
                                x: &xs,
                                x_storage: true,
                                out: &outs,
                                seqs: &seqs,
                                rope_table: None,
                            };
                            // SAFETY: every buffer lives on its device with room for the
                            // call's rows (x in bf16, out in f32) and outlives the call.
                            unsafe { m.forward_cached_device(&call, cache)? };
                        } else {
                            m.forward_cached(&x, &seqs, None, cache, &mut y)?;
                        }
                        Ok(())
                    };
                    for _ in 0..3 {
                        step(m)?;
                    }
                    if let Some(e) = m.step_graph_error() {
                        println!("(graph capture failed, launches instead: {e})");
                    }
                    let (mut nccl, mut span, mut phases) = (0.0f64, vec![0.0f64; *n], [0.0f64; 4]);
                    let start = Instant::now();
                    for _ in 0..iters {
                        step(m)?;
                        for (p, v) in phases.iter_mut().zip(m.last_host_phases_us()) {
                            *p += v / iters as f64;
                        }
                        nccl += m.last_nccl_ms() as f64 / iters as f64;
                        for (s, v) in span.iter_mut().zip(m.last_step_device_ms()) {
                            *s += *v as f64 / iters as f64;
                        }
                    }
                    if diagnostics {
                        last[ci] = (nccl, span, phases);
                    } else {
                        times[ci].push(start.elapsed().as_secs_f64() * 1e3 / iters as f64);
                    }
                }
            }
            let median = |v: &[f64]| {
                let mut v = v.to_vec();
                v.sort_by(f64::total_cmp);
                v[v.len() / 2]
            };
            let ms: Vec<f64> = times.iter().map(|t| median(t)).collect();
            let mut attn: Vec<String> = Vec::new();
            for (n, m, ..) in splits.iter_mut() {
                let mut a = Vec::new();
                for i in 0..*n {
                    // SAFETY: the split's cache is alive for the timed relaunches.
                    a.push(format!("{:.4}", unsafe { m.time_decode_ms(i, 20)? }));
                }
                attn.push(a.join(" / "));
            }
            // One GPU's step in each mode, and the fastest one-GPU step of each I/O (host or
            // resident) whatever the mode: the conservative baseline.
            let one = |mode: (bool, bool)| -> f64 {
                cases
                    .iter()
                    .zip(&ms)
                    .find(|((si, _, _, md, l), _)| {
                        splits[*si].0 == 1 && *md == mode && *l == DEFAULT
                    })
                    .map_or(f64::NAN, |(_, &v)| v)
            };
            let best_one = |resident: bool| one((false, resident)).min(one((true, resident)));
            println!("| GPUs | reduce | mode | ms per step (median) | min / max of rounds | ratio vs 1 GPU, same mode | ratio vs fastest 1-GPU mode, same I/O | ms in NCCL | device span per device (ms) | attention + merge alone, per device (ms) | host us at: validated / planned / enqueued / done |");
            println!("| --- | --- | --- | ---: | --- | ---: | ---: | ---: | --- | --- | --- |");
            for (ci, &(si, r, peer, mode, v)) in cases.iter().enumerate() {
                let reduce = format!(
                    "{}{}{}",
                    name(&r),
                    if peer { ", peer sum" } else { "" },
                    v.describe()
                );
                let n = splits[si].0;
                let (nccl, span, phases) = &last[ci];
                let lo = times[ci].iter().copied().fold(f64::INFINITY, f64::min);
                let hi = times[ci].iter().copied().fold(0.0f64, f64::max);
                let span: Vec<String> = span.iter().map(|v| format!("{v:.4}")).collect();
                let phases: Vec<String> = phases.iter().map(|v| format!("{v:.0}")).collect();
                println!(
                    "| {n} | {} | {} | {:.4} | {lo:.4} / {hi:.4} | {:.3} | {:.3} | {} | {} | {} | {} |",
                    reduce,
                    mode_name(mode),
                    ms[ci],
                    ms[ci] / one(mode),
                    ms[ci] / best_one(mode.1),
                    if mode.0 { "-".to_string() } else { format!("{nccl:.4}") },
                    span.join(" / "),
                    attn[si],
                    phases.join(" / ")
                );
                writeln!(
                    json,
                    "{{\"case\": \"multi decode 32 x 8192\", \"gpus\": {n}, \"reduce\": \"{}\", \"graphs\": {}, \"resident\": {}, \"ms\": {}, \"ratio\": {}, \"ratio_vs_best\": {}, \"nccl_ms\": {nccl}}}",
                    reduce,
                    mode.0,
                    mode.1,
                    ms[ci],
                    ms[ci] / one(mode),
                    ms[ci] / best_one(mode.1)
                )
                .ok();
            }
            if let Some((_, m, ..)) = splits.last() {
                println!("({})", m.backend().device);
            }
            Ok(())
        }
    }
}
