//! attnrt's bf16 path against PyTorch on the same inputs. For each case (every mask mode, GQA
//! ratios 1/2/4/8, head_dim 64/128/256, interleaved RoPE) this test runs the layer through
//! `GpuLayer` in bf16 and writes inputs, weights, the rotary table, the mask metadata and
//! attnrt's output to `$ATTNRT_TORCH_CASES/<case>.safetensors` (default
//! /tmp/attnrt-torch-cases). `tests/torch_compare.py` then evaluates the same layer with PyTorch
//! in bf16 (SDPA with the explicit mask) and in float64, prints attnrt-bf16 vs float64 and
//! torch-bf16 vs float64 errors, and fails when attnrt's error exceeds the stated multiple of
//! torch's (derivation in the script). One device command:
//!
//!     ./gpu_torch --nocapture && python3 torch_compare.py /tmp/attnrt-torch-cases
//!
//! Without a usable device the test prints "skipped: no CUDA device (reason)".

use std::io::Write;

use attnrt::{rope, Config, Inputs, Layer, MaskInputs, Rope, RopeTable};
use attnrt_cuda::{no_device_reason, GpuLayer, GpuOptions, Precision};
use attnrt_tests::{OwnedWeights, Rng};

/// A minimal safetensors writer: f32 and i32 tensors.
fn write_safetensors(path: &std::path::Path, tensors: &[(&str, Vec<usize>, Vec<u8>, &str)]) {
    let mut header = String::from("{");
    let mut off = 0usize;
    for (i, (name, shape, data, dtype)) in tensors.iter().enumerate() {
        let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
        header.push_str(&format!(
            "{}\"{name}\":{{\"dtype\":\"{dtype}\",\"shape\":[{}],\"data_offsets\":[{off},{}]}}",
            if i > 0 { "," } else { "" },
            dims.join(","),
            off + data.len()
        ));
        off += data.len();
    }
    header.push('}');
    while header.len() % 8 != 0 {
        header.push(' ');
    }
    let mut f = std::fs::File::create(path).unwrap();
    f.write_all(&(header.len() as u64).to_le_bytes()).unwrap();
    f.write_all(header.as_bytes()).unwrap();
    for (_, _, data, _) in tensors {
        f.write_all(data).unwrap();
    }
}

fn f32s(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}
fn i32s(v: &[i32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

#[test]
fn bf16_cases_for_pytorch() {
    if let Some(reason) = no_device_reason() {
        println!("skipped: no CUDA device ({reason})");
        return;
    }
    let dir = std::env::var("ATTNRT_TORCH_CASES").unwrap_or("/tmp/attnrt-torch-cases".into());
    std::fs::create_dir_all(&dir).unwrap();
    // (mask mode, R, D, T)
    let modes = [
        "causal",
        "window",
        "padding",
        "docs",
        "varlen",
        "docs+padding+window",
    ];
    let mut n = 0;
    for (mi, mode) in modes.iter().enumerate() {
        for (ri, r) in [1usize, 2, 4, 8].into_iter().enumerate() {
            let d = [64usize, 128, 256][(mi + ri) % 3];
            let t = 256;
            let h = 8;
            let mut cfg = Config::new(256, h)
                .with_kv_heads(h / r)
                .with_head_dim(d)
                .with_rope(Rope::DEFAULT);
            let window = mode.contains("window").then_some(61usize);
            if let Some(w) = window {
                cfg = cfg.with_sliding_window(w);
            }
            let mut rng = Rng(0x7041 ^ (mi * 100 + r) as u64);
            let w = OwnedWeights::random(&cfg, &mut rng);
            let layer = Layer::new(cfg, w.view(&cfg)).unwrap();
            let batch = if *mode == "varlen" { 1 } else { 2 };
            let x = rng.vec(batch * t * cfg.n_embd, 1.0);
            let lens: Vec<i32> = vec![200, 131];
            let docs: Vec<i32> = (0..batch * t)
                .map(|i| ((i % t) / 50) as i32 + (i / t) as i32)
                .collect();
            let cu: Vec<i32> = vec![0, 40, 40, 170, t as i32];
            let mut tb = vec![0.0; rope::table_len(t, d)];
            rope::build_table(cfg.rope().unwrap(), d, &mut tb).unwrap();
            let mut inputs = Inputs::new(&x, batch, t);
            inputs.rope_table = Some(RopeTable::new(&tb, d).unwrap());
            inputs.mask = MaskInputs {
                seq_lens: mode.contains("padding").then_some(&lens[..batch]),
                document_ids: mode.contains("docs").then_some(&docs[..]),
                cu_seqlens: (*mode == "varlen").then_some(&cu[..]),
                max_seqlen: None,
            };
            let mut gpu = GpuLayer::new(layer, GpuOptions::new(Precision::Bf16, batch, t)).unwrap();
            let mut y = vec![f32::NAN; x.len()];
            gpu.forward_host(&inputs, &mut y).unwrap();
            let (c, qd, kvd) = (cfg.n_embd, cfg.q_dim(), cfg.kv_dim());
            let mut tensors = vec![
                ("x", vec![batch, t, c], f32s(&x), "F32"),
                ("wq", vec![qd, c], f32s(&w.wq), "F32"),
                ("wk", vec![kvd, c], f32s(&w.wk), "F32"),
                ("wv", vec![kvd, c], f32s(&w.wv), "F32"),
                ("wo", vec![c, qd], f32s(&w.wo), "F32"),
                ("rope", vec![t, d / 2, 2], f32s(&tb), "F32"),
                ("y_attnrt", vec![batch, t, c], f32s(&y), "F32"),
                (
                    "dims",
                    vec![4],
                    i32s(&[
                        h as i32,
                        (h / r) as i32,
                        d as i32,
                        window.map_or(-1, |w| w as i32),
                    ]),
                    "I32",
                ),
            ];
            if let Some(l) = inputs.mask.seq_lens {
                tensors.push(("seq_lens", vec![batch], i32s(l), "I32"));
            }
            if let Some(dd) = inputs.mask.document_ids {
                tensors.push(("document_ids", vec![batch, t], i32s(dd), "I32"));
            }
            if let Some(cc) = inputs.mask.cu_seqlens {
                tensors.push(("cu_seqlens", vec![cc.len()], i32s(cc), "I32"));
            }
            let name = format!("{mode}_R{r}_D{d}");
            write_safetensors(
                &std::path::Path::new(&dir).join(format!("{name}.safetensors")),
                &tensors,
            );
            n += 1;
        }
    }
    println!("wrote {n} cases to {dir} (backend bf16 tensor cores)");
}
