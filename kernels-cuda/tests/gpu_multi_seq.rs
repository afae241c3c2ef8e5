//! Sequence-parallel inputs and outputs of the multi-GPU head split
//! ([`MultiGpuLayer::forward_seq_host`], [`MultiGpuLayer::forward_seq_device`]): tokens cut
//! among 2 GPUs (and 4 when present), gathered with NCCL before the projections and
//! reduce-scattered after. For every mask mode, GQA with KV heads fewer than / equal to / more
//! than the devices, rotary, no / per-head / full QK-norm (statistics summed across the
//! devices) and bias, with equal and unequal token shares:
//! * f32: within 1e-4 (max abs) of the single-GPU `GpuLayer` result and of
//!   `Layer::forward_reference`;
//! * the device-buffer call (parts in `cust` allocations, one per device) equals the host call;
//! * bf16: within the bf16 tolerance of the single-GPU bf16 result (relative L2 <= 2e-2, max
//!   abs <= 5e-2 * max|ref|, as `tests/gpu.rs`).
//!
//! Invalid calls return their error and write nothing. With fewer than 2 devices the
//! multi-device tests print "skipped: ..." and return; the one-device test needs one.

use attnrt::{Inputs, Layer, MaskInputs, QkNorm};
#[cfg(feature = "cuda")]
use attnrt_cuda::SeqParallelCall;
use attnrt_cuda::{Error, GpuOptions, MultiGpuLayer, Precision};
use attnrt_tests::{max_abs_diff, OwnedWeights, Rng, F32_TOL};
#[cfg(feature = "cuda")]
use cust::{
    context::{Context, CurrentContext},
    device::Device,
    memory::{CopyDestination, DeviceBuffer},
};

mod common;
use common::{
    device_counts, device_or_skip, devices, make_call, one_gpu, one_split_at_a_time, reference,
    rel_l2, split_config, MASK_NAMES,
};

/// Each rank's rows of `x` in device memory of its device, and room for its output rows.
#[cfg(feature = "cuda")]
struct DeviceParts {
    // Dropped after the buffers (field order), so that each device's context outlives them.
    x: Vec<DeviceBuffer<f32>>,
    y: Vec<DeviceBuffer<f32>>,
    ctxs: Vec<Context>,
}

#[cfg(feature = "cuda")]
impl DeviceParts {
    fn new(multi: &MultiGpuLayer<'_>, x: &[f32], batch: usize, t: usize, c: usize) -> Self {
        let (mut xs, mut ys, mut ctxs) = (Vec::new(), Vec::new(), Vec::new());
        for (i, &d) in multi.devices().iter().enumerate() {
            let ctx = Context::new(Device::get_device(d).unwrap()).unwrap();
            CurrentContext::set_current(&ctx).unwrap();
            let r = multi.token_range(i, batch, t).unwrap();
            xs.push(DeviceBuffer::from_slice(&x[r.start * c..r.end * c]).unwrap());
            ys.push(DeviceBuffer::from_slice(&vec![f32::NAN; r.len() * c]).unwrap());
            ctxs.push(ctx);
        }
        DeviceParts { x: xs, y: ys, ctxs }
    }

    fn ptrs(b: &[DeviceBuffer<f32>]) -> Vec<u64> {
        b.iter().map(|b| b.as_device_ptr().as_raw()).collect()
    }

    /// The output rows of every rank, concatenated.
    fn read_y(&self) -> Vec<f32> {
        let mut all = Vec::new();
        for (b, ctx) in self.y.iter().zip(&self.ctxs) {
            CurrentContext::set_current(ctx).unwrap();
            let mut h = vec![0.0f32; b.len()];
            b.copy_to(&mut h[..]).unwrap();
            all.extend(h);
        }
        all
    }
}

#[cfg(feature = "cuda")]
fn seq_call<'a>(
    inputs: &Inputs<'a>,
    x_parts: &'a [u64],
    y_parts: &'a [u64],
) -> SeqParallelCall<'a> {
    SeqParallelCall {
        x_parts,
        y_parts,
        batch: inputs.batch,
        seq_len: inputs.seq_len,
        mask: inputs.mask,
        position_ids: inputs.position_ids,
        rope_table: inputs.rope_table,
    }
}

fn bf16_close(got: &[f32], want: &[f32]) -> (f64, f32) {
    let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs())).max(1e-6);
    (rel_l2(got, want), max_abs_diff(got, want) / scale)
}

// The explicit drops free each device's buffers before the next set-up; without the `cuda`
// feature the stub types have no `Drop`, hence the allow.
#[allow(clippy::drop_non_drop)]
/// One case on `n` devices; returns (f32 max abs err vs one GPU, bf16 rel L2 vs one GPU).
fn check_case(
    n: usize,
    kv: usize,
    mode: usize,
    variant: usize,
    norm: QkNorm,
    t: usize,
) -> (f32, f64) {
    let cfg = split_config(kv, mode, variant, norm);
    let mut rng = Rng(0x5E9_0000 ^ ((n * 100 + kv * 10 + mode) as u64) ^ ((t as u64) << 32));
    let w = OwnedWeights::random(&cfg, &mut rng);
    let layer = Layer::new(cfg, w.view(&cfg)).unwrap();
    let call = make_call(&cfg, mode, t, &mut rng, true);
    let inputs = call.inputs(&cfg);
    let (b, c) = (inputs.batch, cfg.n_embd);
    let tokens = b * t;
    let name = format!(
        "N={n} H=8 KV={kv} B={b} T={t} ({} tokens, {}) mask={} rope={:?} norm={:?} bias={:?}",
        tokens,
        if tokens.is_multiple_of(n) {
            "equal shares"
        } else {
            "unequal shares"
        },
        MASK_NAMES[mode],
        cfg.rope().map(|r| r.convention),
        cfg.qk_norm,
        cfg.bias
    );
    let want = reference(&layer, &inputs);

    let opts = GpuOptions::new(Precision::F32, b, t);
    let single = one_gpu(layer, Precision::F32, &inputs);
    let mut multi = MultiGpuLayer::new(layer, &devices(n), opts)
        .unwrap_or_else(|e| panic!("MultiGpuLayer::new f32 {name}: {e}"));
    let mut seq = vec![f32::NAN; tokens * c];
    multi
        .forward_seq_host(&inputs, &mut seq)
        .unwrap_or_else(|e| panic!("forward_seq_host f32 {name}: {e}"));
    let err = max_abs_diff(&seq, &single);
    let ref_err = max_abs_diff(&seq, &want);
    assert!(err <= F32_TOL, "f32 {name}: vs one GPU {err:.3e}");
    assert!(ref_err <= F32_TOL, "f32 {name}: vs reference {ref_err:.3e}");

    // The same call on device buffers.
    #[cfg(feature = "cuda")]
    let derr = {
        let parts = DeviceParts::new(&multi, inputs.x, b, t, c);
        let (xp, yp) = (DeviceParts::ptrs(&parts.x), DeviceParts::ptrs(&parts.y));
        // SAFETY: each part lives on its rank's device with room for its rows; the uploads
        // were synchronous; nothing else uses them during the call.
        unsafe { multi.forward_seq_device(&seq_call(&inputs, &xp, &yp)) }
            .unwrap_or_else(|e| panic!("forward_seq_device f32 {name}: {e}"));
        let derr = max_abs_diff(&parts.read_y(), &seq);
        assert!(
            derr <= 1e-6,
            "f32 {name}: device parts vs host call {derr:.3e}"
        );
        derr
    };
    #[cfg(not(feature = "cuda"))]
    let derr = f32::NAN;
    drop(multi);

    let opts = GpuOptions::new(Precision::Bf16, b, t);
    let single = one_gpu(layer, Precision::Bf16, &inputs);
    let mut multi = MultiGpuLayer::new(layer, &devices(n), opts).unwrap();
    let mut seq = vec![f32::NAN; tokens * c];
    multi
        .forward_seq_host(&inputs, &mut seq)
        .unwrap_or_else(|e| panic!("forward_seq_host bf16 {name}: {e}"));
    let (rel, max) = bf16_close(&seq, &single);
    assert!(
        rel <= 2e-2 && max <= 5e-2,
        "bf16 {name}: vs one GPU rel L2 {rel:.3e}, max abs / max|ref| {max:.3e}"
    );
    println!(
        "{name}: f32 vs 1 GPU {err:.2e} vs ref {ref_err:.2e}, device parts {derr:.1e}; \
         bf16 relL2 {rel:.2e} max {max:.2e}"
    );
    (err, rel)
}

#[test]
fn seq_parallel_equals_one_gpu_every_mask_mode() {
    let _serial = one_split_at_a_time();
    let Some(counts) = device_counts("sequence parallelism") else {
        return;
    };
    for n in counts {
        let kvs: &[usize] = if n == 2 { &[1, 2, 4] } else { &[2, 4, 8] };
        let (mut worst, mut cases, mut unequal) = ((0.0f32, 0.0f64), 0, 0);
        for (mode, _) in MASK_NAMES.iter().enumerate() {
            for (i, &kv) in kvs.iter().enumerate() {
                // 65 tokens of one row cut unequally; 2 x 65 = 130 equally on 2, not on 4.
                let t: usize = if (mode + i) % 2 == 0 { 65 } else { 200 };
                let single_row = matches!(mode, 5 | 6 | 8);
                if !(if single_row { t } else { 2 * t }).is_multiple_of(n) {
                    unequal += 1;
                }
                // Every (KV heads, QK-norm) pair over three mask modes each.
                let norm = [QkNorm::None, QkNorm::PerHead, QkNorm::Full][(mode + i) % 3];
                let o = check_case(n, kv, mode, mode + i * 3, norm, t);
                worst = (worst.0.max(o.0), worst.1.max(o.1));
                cases += 1;
            }
        }
        assert!(unequal > 0 && unequal < cases, "both share kinds must run");
        println!(
            "N={n}: {cases} cases ({unequal} with unequal shares), worst f32 vs one GPU {:.2e}, \
             worst bf16 rel L2 {:.2e}",
            worst.0, worst.1
        );
    }
}

#[test]
fn seq_parallel_on_one_device_equals_forward_host() {
    if !device_or_skip() {
        return;
    }
    let cfg = split_config(2, 0, 1, QkNorm::Full);
    let mut rng = Rng(11);
    let w = OwnedWeights::random(&cfg, &mut rng);
    let layer = Layer::new(cfg, w.view(&cfg)).unwrap();
    let call = make_call(&cfg, 2, 33, &mut rng, true);
    let inputs = call.inputs(&cfg);
    let len = inputs.x.len();
    let mut multi = MultiGpuLayer::new(
        layer,
        &[0],
        GpuOptions::new(Precision::F32, inputs.batch, 33),
    )
    .unwrap();
    let mut whole = vec![f32::NAN; len];
    multi.forward_host(&inputs, &mut whole).unwrap();
    let mut seq = vec![f32::NAN; len];
    multi.forward_seq_host(&inputs, &mut seq).unwrap();
    assert_eq!(max_abs_diff(&seq, &whole), 0.0);
    #[cfg(feature = "cuda")]
    {
        let parts = DeviceParts::new(&multi, inputs.x, inputs.batch, 33, cfg.n_embd);
        let (xp, yp) = (DeviceParts::ptrs(&parts.x), DeviceParts::ptrs(&parts.y));
        // SAFETY: the parts live on device 0 with room for every row.
        unsafe { multi.forward_seq_device(&seq_call(&inputs, &xp, &yp)) }.unwrap();
        assert_eq!(max_abs_diff(&parts.read_y(), &whole), 0.0);
    }
}

#[test]
fn invalid_seq_parallel_calls_write_nothing() {
    let _serial = one_split_at_a_time();
    let Some(_) = device_counts("sequence parallelism") else {
        return;
    };
    let cfg = split_config(2, 2, 0, QkNorm::None);
    let mut rng = Rng(12);
    let w = OwnedWeights::random(&cfg, &mut rng);
    let layer = Layer::new(cfg, w.view(&cfg)).unwrap();
    let call = make_call(&cfg, 2, 40, &mut rng, false);
    let inputs = call.inputs(&cfg);
    let (b, c) = (inputs.batch, cfg.n_embd);
    let mut multi =
        MultiGpuLayer::new(layer, &[0, 1], GpuOptions::new(Precision::F32, b, 40)).unwrap();
    assert_eq!(multi.token_range(0, b, 40).unwrap(), 0..b * 20);
    assert_eq!(multi.token_range(1, 1, 41).unwrap(), 21..41);
    assert!(multi.token_range(2, b, 40).is_err());

    let untouched = |v: &[f32]| v.iter().all(|x| x.is_nan());
    // An output one value short, and a padding length past T.
    let mut out = vec![f32::NAN; b * 40 * c - 1];
    assert!(matches!(
        multi.forward_seq_host(&inputs, &mut out),
        Err(Error::Runtime(attnrt::Error::InputShape { .. }))
    ));
    assert!(untouched(&out));
    let mut lens = call.seq_lens.clone().unwrap();
    lens[0] = 41;
    let bad = Inputs {
        mask: MaskInputs {
            seq_lens: Some(&lens),
            ..inputs.mask
        },
        ..inputs
    };
    let mut out = vec![f32::NAN; b * 40 * c];
    assert!(matches!(
        multi.forward_seq_host(&bad, &mut out),
        Err(Error::Runtime(attnrt::Error::InputValue { .. }))
    ));
    assert!(untouched(&out));

    // Device parts: too few, a null pointer, a call past the capacity.
    #[cfg(feature = "cuda")]
    device_part_errors(&mut multi, &inputs, c);
}

#[cfg(feature = "cuda")]
fn device_part_errors(multi: &mut MultiGpuLayer<'_>, inputs: &Inputs<'_>, c: usize) {
    let b = inputs.batch;
    let parts = DeviceParts::new(multi, inputs.x, b, 40, c);
    let (xp, yp) = (DeviceParts::ptrs(&parts.x), DeviceParts::ptrs(&parts.y));
    let cases: [(&[u64], &[u64]); 3] = [(&xp[..1], &yp), (&xp, &[yp[0], 0]), (&xp, &yp)];
    for (k, (x, y)) in cases.into_iter().enumerate() {
        let mut sc = seq_call(inputs, x, y);
        if k == 2 {
            sc.seq_len = 41;
            sc.mask.seq_lens = None;
        }
        // SAFETY: the call is refused before any pointer is used.
        let r = unsafe { multi.forward_seq_device(&sc) };
        match k {
            0 => assert!(matches!(
                r,
                Err(Error::Runtime(attnrt::Error::InputShape {
                    name: "x parts",
                    ..
                }))
            )),
            1 => assert!(matches!(
                r,
                Err(Error::Runtime(attnrt::Error::InputValue {
                    name: "y parts",
                    index: 1,
                    ..
                }))
            )),
            _ => assert!(
                matches!(
                    r,
                    Err(Error::Capacity {
                        what: "seq_len",
                        ..
                    })
                ),
                "{r:?}"
            ),
        }
    }
    assert!(parts.read_y().iter().all(|v| v.is_nan()));
}
