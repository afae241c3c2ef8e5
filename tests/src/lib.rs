//! Shared helpers for the integration tests: loading the golden fixtures of `tests/fixtures`
//! (made by `tests/golden/make_golden.py`, see there how) and comparing outputs.

use std::path::{Path, PathBuf};

pub mod ffi_harness;

use attnrt::{rope, Config};
use attnrt_cli::checkpoint::{CallInputs, TensorFile};
use attnrt_cli::config_json::parse_config;

/// Max absolute error allowed against float64 golden data for f32 paths (SPEC.md, Precision).
pub const F32_TOL: f32 = 1e-4;

/// One golden case: its file, configuration, inputs and expected output.
pub struct Fixture {
    /// Case name (file stem).
    pub name: String,
    /// All tensors of the file.
    pub file: TensorFile,
    /// The layer configuration from the metadata.
    pub cfg: Config,
    /// `x`, shapes and the caller table, if any.
    pub inputs: CallInputs,
    /// The cos/sin table to pass: the file's `freqs_cis`, or one built from theta over
    /// `rope_max_pos` positions.
    pub table: Option<Vec<f32>>,
    /// Expected `y`.
    pub expected: Vec<f32>,
}

/// The folder of the golden fixtures.
pub fn fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

/// Every fixture, sorted by name.
pub fn load_all() -> Vec<Fixture> {
    let mut paths: Vec<_> = std::fs::read_dir(fixtures_dir())
        .expect("tests/fixtures exists")
        .map(|e| e.expect("readable dir entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    paths.sort();
    paths.iter().map(|p| load(p)).collect()
}

/// Loads one fixture.
pub fn load(path: &Path) -> Fixture {
    let file = TensorFile::load(path).unwrap();
    let cfg = parse_config(&file.metadata["config"]).unwrap();
    let inputs = CallInputs::read(&file, &cfg).unwrap();
    let table = match (cfg.rope(), &inputs.freqs_cis) {
        (None, _) => None,
        (Some(_), Some(t)) => Some(t.clone()),
        (Some(r), None) => {
            let max_pos: usize = file.metadata["rope_max_pos"].parse().unwrap();
            let mut t = vec![0.0; rope::table_len(max_pos, cfg.head_dim)];
            rope::build_table(r, cfg.head_dim, &mut t).unwrap();
            Some(t)
        }
    };
    let expected = file.tensors["y"].to_f32().unwrap();
    Fixture {
        name: path.file_stem().unwrap().to_string_lossy().into_owned(),
        file,
        cfg,
        inputs,
        table,
        expected,
    }
}

impl Fixture {
    /// The layer of this fixture, over the weights in its file.
    pub fn layer(&self) -> attnrt::Layer<'_> {
        attnrt::Layer::new(self.cfg, self.file.weights(&self.cfg).unwrap()).unwrap()
    }

    /// The forward call's inputs: `x`, mask, positions and the rope table.
    pub fn call_inputs(&self) -> attnrt::Inputs<'_> {
        let (mask, position_ids) = self.inputs.mask(&self.file).unwrap();
        attnrt::Inputs {
            x: &self.inputs.x,
            batch: self.inputs.batch,
            seq_len: self.inputs.seq_len,
            mask,
            position_ids,
            rope_table: self
                .table
                .as_deref()
                .map(|t| attnrt::RopeTable::new(t, self.cfg.head_dim).unwrap()),
        }
    }
}

/// Max absolute difference of two equally long slices (NaN counts as infinite).
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| {
            if x.is_nan() || y.is_nan() {
                f32::INFINITY
            } else {
                (x - y).abs()
            }
        })
        .fold(0.0, f32::max)
}

/// A small deterministic generator for test data (xorshift64*), so that failures replay.
pub struct Rng(pub u64);

impl Rng {
    /// Next value uniform in [-1, 1).
    pub fn uniform(&mut self) -> f32 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let v = self.0.wrapping_mul(0x2545_F491_4F6C_DD1D);
        ((v >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    /// `n` values uniform in `[-scale, scale)`.
    pub fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.uniform() * scale).collect()
    }
}

/// Owned f32 weights of every tensor a configuration can use, all present; pick with
/// [`OwnedWeights::view`].
pub struct OwnedWeights {
    /// `[q_dim, C]`.
    pub wq: Vec<f32>,
    /// `[kv_dim, C]`.
    pub wk: Vec<f32>,
    /// `[kv_dim, C]`.
    pub wv: Vec<f32>,
    /// `[C, q_dim]`.
    pub wo: Vec<f32>,
    /// Biases q, k, v, o.
    pub b: [Vec<f32>; 4],
    /// QK-norm weights for q and k.
    pub norm: [Vec<f32>; 2],
}

impl OwnedWeights {
    /// Random unit-scale weights for `cfg`.
    pub fn random(cfg: &Config, rng: &mut Rng) -> OwnedWeights {
        let (c, q, kv) = (cfg.n_embd, cfg.q_dim(), cfg.kv_dim());
        let (qn, kn) = match cfg.qk_norm {
            attnrt::QkNorm::Full => (q, kv),
            _ => (cfg.head_dim, cfg.head_dim),
        };
        let s_in = 1.0 / (c as f32).sqrt();
        OwnedWeights {
            wq: rng.vec(q * c, s_in * 1.7),
            wk: rng.vec(kv * c, s_in * 1.7),
            wv: rng.vec(kv * c, s_in * 1.7),
            wo: rng.vec(c * q, 1.7 / (q as f32).sqrt()),
            b: [
                rng.vec(q, 0.5),
                rng.vec(kv, 0.5),
                rng.vec(kv, 0.5),
                rng.vec(c, 0.5),
            ],
            norm: [
                rng.vec(qn, 0.2).into_iter().map(|v| v + 1.0).collect(),
                rng.vec(kn, 0.2).into_iter().map(|v| v + 1.0).collect(),
            ],
        }
    }

    /// The views `cfg` needs.
    pub fn view(&self, cfg: &Config) -> attnrt::LayerWeights<'_> {
        use attnrt::Tensor::F32;
        let norm = cfg.qk_norm != attnrt::QkNorm::None;
        fn pick(on: bool, v: &[f32]) -> Option<attnrt::Tensor<'_>> {
            on.then_some(attnrt::Tensor::F32(v))
        }
        let b = &self.b;
        attnrt::LayerWeights {
            wq: F32(&self.wq),
            wk: F32(&self.wk),
            wv: F32(&self.wv),
            wo: F32(&self.wo),
            bq: pick(cfg.bias.q, &b[0]),
            bk: pick(cfg.bias.k, &b[1]),
            bv: pick(cfg.bias.v, &b[2]),
            bo: pick(cfg.bias.o, &b[3]),
            q_norm: pick(norm, &self.norm[0]),
            k_norm: pick(norm, &self.norm[1]),
        }
    }
}
