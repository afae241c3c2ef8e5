//! The main job: a Llama-3-8B-shaped layer over a packed batch of documents, with deterministic
//! random weights; prints the backend, shapes, time and throughput.

use std::time::Instant;

use attnrt::{
    rope, Config, Inputs, Layer, LayerWeights, MaskInputs, QkNorm, Rope, RopeTable, Tensor,
};
use attnrt_simd::Visibility;
use half::bf16;

use crate::forward::{self, Choice};
use attnrt_cli::synth::uniform;

use crate::CliError;

/// n_embd 4096, 32 heads, 8 KV heads, head_dim 128, rope theta 500000, per-head QK-norm,
/// window 4096.
pub const CONFIG: Config = Config::new(4096, 32)
    .with_kv_heads(8)
    .with_head_dim(128)
    .with_qk_norm(QkNorm::PerHead)
    .with_sliding_window(4096)
    .with_rope(Rope {
        theta: 500000.0,
        ..Rope::DEFAULT
    });

/// Document lengths of the packed batch (512 tokens, a single-token document among them).
pub const DOCUMENTS: [usize; 6] = [37, 150, 8, 211, 1, 105];

fn bf16s(seed: u64, n: usize, scale: f32) -> Vec<bf16> {
    uniform(seed, n, scale)
        .into_iter()
        .map(bf16::from_f32)
        .collect()
}

/// Runs the job.
pub fn run() -> Result<(), CliError> {
    let cfg = CONFIG;
    let (c, q, kv, d) = (cfg.n_embd, cfg.q_dim(), cfg.kv_dim(), cfg.head_dim);
    let t: usize = DOCUMENTS.iter().sum();
    eprintln!("[1/3] generating deterministic bf16 weights for n_embd {c}, {} heads / {} KV heads, head_dim {d}", cfg.n_head, cfg.n_kv_head);
    // Uniform in [-a, a) has variance a^2/3: a = sqrt(3 / fan_in) keeps activations unit-scale.
    let a = |fan_in: usize| (3.0 / fan_in as f32).sqrt();
    let (wq, wk, wv, wo) = (
        bf16s(1, q * c, a(c)),
        bf16s(2, kv * c, a(c)),
        bf16s(3, kv * c, a(c)),
        bf16s(4, c * q, a(q)),
    );
    let norm: Vec<bf16> = uniform(5, 2 * d, 0.1)
        .into_iter()
        .map(|v| bf16::from_f32(1.0 + v))
        .collect();
    let weights = LayerWeights {
        wq: Tensor::Bf16(&wq),
        wk: Tensor::Bf16(&wk),
        wv: Tensor::Bf16(&wv),
        wo: Tensor::Bf16(&wo),
        bq: None,
        bk: None,
        bv: None,
        bo: None,
        q_norm: Some(Tensor::Bf16(&norm[..d])),
        k_norm: Some(Tensor::Bf16(&norm[d..])),
    };
    let layer = Layer::new(cfg, weights).map_err(|e| CliError::Other(e.to_string()))?;

    let x = uniform(6, t * c, 1.0);
    let mut docs = Vec::with_capacity(t);
    let mut pos = Vec::with_capacity(t);
    for (i, &len) in DOCUMENTS.iter().enumerate() {
        docs.extend(std::iter::repeat_n(i as i32, len));
        pos.extend(0..len as i32);
    }
    let longest = DOCUMENTS.iter().copied().max().unwrap_or(1);
    let mut table = vec![0.0; rope::table_len(longest, d)];
    rope::build_table(cfg.rope().expect("rotary config"), d, &mut table)
        .map_err(|e| CliError::Other(e.to_string()))?;
    let inputs = Inputs {
        x: &x,
        batch: 1,
        seq_len: t,
        mask: MaskInputs {
            document_ids: Some(&docs),
            ..MaskInputs::default()
        },
        position_ids: Some(&pos),
        rope_table: Some(RopeTable::new(&table, d).map_err(|e| CliError::Other(e.to_string()))?),
    };

    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let choice = Choice::Auto;
    let mut ws = vec![0.0; forward::workspace_len(&layer, 1, t, threads, choice)];
    let mut y = vec![0.0; t * c];
    eprintln!(
        "[2/3] forward over {t} tokens in {} packed documents, {threads} thread(s)...",
        DOCUMENTS.len()
    );
    let start = Instant::now();
    let backend = forward::forward(&layer, &inputs, &mut ws, &mut y, threads, choice)
        .map_err(|e| CliError::Other(e.to_string()))?;
    let secs = start.elapsed().as_secs_f64();

    // Useful work: the four projections, and QK^T + PV over visible pairs only.
    let proj = 2.0 * t as f64 * c as f64 * (2 * q + 2 * kv) as f64;
    let mask = attnrt::mask::MaskSpec::new(cfg.sliding_window, 1, t, &inputs.mask)
        .map_err(|e| CliError::Other(e.to_string()))?
        .row(0);
    let pairs = (0..t)
        .map(|i| (0..=i).filter(|&j| mask.visible(i, j)).count())
        .sum::<usize>();
    let attn = 4.0 * pairs as f64 * (cfg.n_head * d) as f64;
    let verify_err = verify_one_document(&layer, &x, &y, &table)?;
    let checksum: f64 = y.iter().map(|&v| v as f64).sum();
    let abs_sum: f64 = y.iter().map(|&v| v.abs() as f64).sum();
    eprintln!("[3/3] done");
    println!("attnrt default job");
    println!("  backend      {backend}");
    println!(
        "  layer        n_embd {c}, heads {}/{} (GQA {}), head_dim {d}, rope theta 500000, per-head QK-norm, window 4096, bf16 weights",
        cfg.n_head,
        cfg.n_kv_head,
        cfg.group_size()
    );
    println!(
        "  input        x [1, {t}, {c}], documents {DOCUMENTS:?}, positions restart per document"
    );
    println!("  time         {:.1} ms", secs * 1e3);
    println!("  tokens/s     {:.0}", t as f64 / secs);
    println!(
        "  GFLOP/s      {:.2} (useful: projections {:.2} GFLOP, attention {:.3} GFLOP over {pairs} visible pairs)",
        (proj + attn) / secs / 1e9,
        proj / 1e9,
        attn / 1e9
    );
    println!(
        "  verified     document {VERIFY_DOC} ({} tokens) recomputed alone by the scalar reference: max abs diff {verify_err:.2e} (tolerance 1e-4)",
        DOCUMENTS[VERIFY_DOC]
    );
    println!("  checksum     sum {checksum:.6e}, sum|y| {abs_sum:.6e}");
    Ok(())
}

/// The document recomputed by the reference (a short one: the reference is slow).
const VERIFY_DOC: usize = 2;

/// Documents attend only to themselves and their positions restart, so one document run alone
/// through the scalar reference must give the same rows as inside the packed batch.
fn verify_one_document(
    layer: &Layer<'_>,
    x: &[f32],
    y: &[f32],
    table: &[f32],
) -> Result<f32, CliError> {
    let c = layer.config().n_embd;
    let start: usize = DOCUMENTS[..VERIFY_DOC].iter().sum();
    let len = DOCUMENTS[VERIFY_DOC];
    let rows = start * c..(start + len) * c;
    let inputs = Inputs {
        rope_table: Some(
            RopeTable::new(table, layer.config().head_dim)
                .map_err(|e| CliError::Other(e.to_string()))?,
        ),
        ..Inputs::new(&x[rows.clone()], 1, len)
    };
    let mut ws = vec![0.0; attnrt::reference_workspace_len(layer.config(), len)];
    let mut want = vec![0.0; len * c];
    layer
        .forward_reference(&inputs, &mut ws, &mut want)
        .map_err(|e| CliError::Other(e.to_string()))?;
    let err = y[rows]
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    if err > 1e-4 {
        return Err(CliError::Other(format!(
            "verification failed: max abs diff {err:.2e} > 1e-4"
        )));
    }
    Ok(err)
}
