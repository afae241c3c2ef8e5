//! Weights, inputs and outputs as safetensors files, under the tensor names of README.md.
//!
//! Tensors are copied out of the file into owned, aligned vectors (a safetensors payload need
//! not be aligned for f32), then lent to the runtime as borrowed views.

use std::collections::HashMap;
use std::path::Path;

use attnrt::{Config, LayerWeights, MaskInputs, QkNorm, Tensor};
use half::{bf16, f16};
use safetensors::{Dtype, SafeTensors};

/// Elements of one tensor, in its stored type.
#[derive(Clone, Debug)]
pub enum Data {
    /// f32.
    F32(Vec<f32>),
    /// f16.
    F16(Vec<f16>),
    /// bf16.
    Bf16(Vec<bf16>),
    /// i32 or i64 (narrowed; values outside i32 are rejected at load).
    I32(Vec<i32>),
}

/// One named tensor with its shape.
#[derive(Clone, Debug)]
pub struct Owned {
    /// Shape as stored.
    pub shape: Vec<usize>,
    /// Elements.
    pub data: Data,
}

impl Owned {
    fn as_tensor(&self) -> Option<Tensor<'_>> {
        match &self.data {
            Data::F32(v) => Some(Tensor::F32(v)),
            Data::F16(v) => Some(Tensor::F16(v)),
            Data::Bf16(v) => Some(Tensor::Bf16(v)),
            Data::I32(_) => None,
        }
    }

    /// The elements widened to f32 (integers rejected).
    pub fn to_f32(&self) -> Option<Vec<f32>> {
        Some(match &self.data {
            Data::F32(v) => v.clone(),
            Data::F16(v) => v.iter().map(|x| x.to_f32()).collect(),
            Data::Bf16(v) => v.iter().map(|x| x.to_f32()).collect(),
            Data::I32(_) => return None,
        })
    }
}

/// All tensors of a safetensors file plus its metadata.
#[derive(Debug, Default)]
pub struct TensorFile {
    /// Tensors by name.
    pub tensors: HashMap<String, Owned>,
    /// The `__metadata__` map.
    pub metadata: HashMap<String, String>,
}

fn read_le<T: bytemuck::Pod>(bytes: &[u8]) -> Vec<T> {
    let mut out = vec![T::zeroed(); bytes.len() / std::mem::size_of::<T>()];
    bytemuck::cast_slice_mut::<T, u8>(&mut out).copy_from_slice(bytes);
    out
}

impl TensorFile {
    /// Reads a safetensors file.
    ///
    /// # Errors
    /// A one-line message for an unreadable file, a malformed header or an unsupported dtype.
    pub fn load(path: &Path) -> Result<TensorFile, String> {
        let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
        Self::parse(&bytes).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// Parses safetensors bytes.
    ///
    /// # Errors
    /// As [`TensorFile::load`].
    pub fn parse(bytes: &[u8]) -> Result<TensorFile, String> {
        let (_, meta) = SafeTensors::read_metadata(bytes).map_err(|e| e.to_string())?;
        let st = SafeTensors::deserialize(bytes).map_err(|e| e.to_string())?;
        let mut tensors = HashMap::new();
        for (name, view) in st.tensors() {
            let b = view.data();
            let data = match view.dtype() {
                Dtype::F32 => Data::F32(read_le(b)),
                Dtype::F16 => Data::F16(read_le(b)),
                Dtype::BF16 => Data::Bf16(read_le(b)),
                Dtype::I32 => Data::I32(read_le(b)),
                Dtype::I64 => {
                    let wide: Vec<i64> = read_le(b);
                    let narrow: Result<Vec<i32>, _> =
                        wide.iter().map(|&v| i32::try_from(v)).collect();
                    Data::I32(narrow.map_err(|_| format!("tensor {name}: value outside i32"))?)
                }
                other => return Err(format!("tensor {name}: unsupported dtype {other:?}")),
            };
            tensors.insert(
                name,
                Owned {
                    shape: view.shape().to_vec(),
                    data,
                },
            );
        }
        Ok(TensorFile {
            tensors,
            metadata: meta.metadata().clone().unwrap_or_default(),
        })
    }

    fn get(&self, name: &str) -> Option<&Owned> {
        self.tensors.get(name)
    }

    /// A float tensor of exactly `shape`, or an error naming it.
    fn float(&self, name: &str, shape: &[usize]) -> Result<Option<Tensor<'_>>, String> {
        let Some(t) = self.get(name) else {
            return Ok(None);
        };
        if t.shape != shape {
            return Err(format!(
                "tensor {name}: shape {:?}, expected {:?}",
                t.shape, shape
            ));
        }
        t.as_tensor()
            .map(Some)
            .ok_or_else(|| format!("tensor {name}: integer dtype, expected f32, f16 or bf16"))
    }

    /// An integer tensor of exactly `shape` (int32 or int64 in the file).
    pub fn ints(&self, name: &str, shape: &[usize]) -> Result<Option<&[i32]>, String> {
        let Some(t) = self.get(name) else {
            return Ok(None);
        };
        if t.shape != shape {
            return Err(format!(
                "tensor {name}: shape {:?}, expected {:?}",
                t.shape, shape
            ));
        }
        match &t.data {
            Data::I32(v) => Ok(Some(v)),
            _ => Err(format!(
                "tensor {name}: float dtype, expected int32 or int64"
            )),
        }
    }

    /// The layer's weights for `cfg` (README.md names and shapes), checking that no tensor the
    /// configuration needs is missing.
    ///
    /// # Errors
    /// A one-line message naming a missing tensor, a wrong shape or dtype.
    pub fn weights(&self, cfg: &Config) -> Result<LayerWeights<'_>, String> {
        let (c, q, kv, d) = (cfg.n_embd, cfg.q_dim(), cfg.kv_dim(), cfg.head_dim);
        let need = |name: &str, shape: &[usize]| -> Result<Tensor<'_>, String> {
            self.float(name, shape)?
                .ok_or_else(|| format!("missing tensor {name} {shape:?}"))
        };
        let opt = |name: &str, on: bool, shape: &[usize]| -> Result<Option<Tensor<'_>>, String> {
            match (on, self.float(name, shape)?) {
                (true, None) => Err(format!("missing tensor {name} {shape:?}")),
                (true, t) => Ok(t),
                (false, Some(_)) => Err(format!(
                    "tensor {name} present but the config does not use it"
                )),
                (false, None) => Ok(None),
            }
        };
        let norm = cfg.qk_norm != QkNorm::None;
        let (qn, kn) = if cfg.qk_norm == QkNorm::Full {
            (q, kv)
        } else {
            (d, d)
        };
        Ok(LayerWeights {
            wq: need("wq", &[q, c])?,
            wk: need("wk", &[kv, c])?,
            wv: need("wv", &[kv, c])?,
            wo: need("wo", &[c, q])?,
            bq: opt("bq", cfg.bias.q, &[q])?,
            bk: opt("bk", cfg.bias.k, &[kv])?,
            bv: opt("bv", cfg.bias.v, &[kv])?,
            bo: opt("bo", cfg.bias.o, &[c])?,
            q_norm: opt("q_norm", norm, &[qn])?,
            k_norm: opt("k_norm", norm, &[kn])?,
        })
    }
}

/// The activations and optional mask inputs of a forward call, read from an input file.
#[derive(Debug)]
pub struct CallInputs {
    /// `[B, T, C]` as f32.
    pub x: Vec<f32>,
    /// Batch rows.
    pub batch: usize,
    /// Tokens per row.
    pub seq_len: usize,
    /// `freqs_cis` `[P, D/2, 2]` as f32, when the file has one.
    pub freqs_cis: Option<Vec<f32>>,
}

impl CallInputs {
    /// Reads `x` (`[B, T, C]`, any float type) and `freqs_cis` from `file`.
    ///
    /// # Errors
    /// A one-line message for a missing `x`, a wrong width or an integer dtype.
    pub fn read(file: &TensorFile, cfg: &Config) -> Result<CallInputs, String> {
        let x = file.get("x").ok_or("missing tensor x [B, T, n_embd]")?;
        let &[batch, seq_len, c] = x.shape.as_slice() else {
            return Err(format!(
                "tensor x: shape {:?}, expected [B, T, {}]",
                x.shape, cfg.n_embd
            ));
        };
        if c != cfg.n_embd {
            return Err(format!(
                "tensor x: shape {:?}, expected [B, T, {}]",
                x.shape, cfg.n_embd
            ));
        }
        let x = x
            .to_f32()
            .ok_or("tensor x: integer dtype, expected a float type")?;
        let freqs_cis = match file.get("freqs_cis") {
            None => None,
            Some(t) => {
                let half = cfg.head_dim / 2;
                if t.shape.len() != 3 || t.shape[1] != half || t.shape[2] != 2 {
                    return Err(format!(
                        "tensor freqs_cis: shape {:?}, expected [P, {half}, 2]",
                        t.shape
                    ));
                }
                Some(t.to_f32().ok_or("tensor freqs_cis: integer dtype")?)
            }
        };
        Ok(CallInputs {
            x,
            batch,
            seq_len,
            freqs_cis,
        })
    }

    /// The mask inputs and position ids of `file`, shape-checked against this call.
    ///
    /// # Errors
    /// A one-line message naming a tensor with the wrong shape or dtype.
    pub fn mask<'f>(
        &self,
        file: &'f TensorFile,
    ) -> Result<(MaskInputs<'f>, Option<&'f [i32]>), String> {
        let (b, t) = (self.batch, self.seq_len);
        let cu_len = file
            .get("cu_seqlens")
            .map_or(0, |c| c.shape.first().copied().unwrap_or(0));
        let max_seqlen = match file.get("max_seqlen") {
            None => None,
            Some(m) => {
                let shape = if m.shape.is_empty() { vec![] } else { vec![1] };
                file.ints("max_seqlen", &shape)?
                    .and_then(|v| v.first().copied())
            }
        };
        let mask = MaskInputs {
            seq_lens: file.ints("seq_lens", &[b])?,
            document_ids: file.ints("document_ids", &[b, t])?,
            cu_seqlens: file.ints("cu_seqlens", &[cu_len])?,
            max_seqlen,
        };
        Ok((mask, file.ints("position_ids", &[b, t])?))
    }
}

/// Writes `y` (`[B, T, C]`, f32) to a safetensors file.
///
/// # Errors
/// A one-line message if the file cannot be written.
pub fn write_output(path: &Path, y: &[f32], shape: [usize; 3]) -> Result<(), String> {
    let view =
        safetensors::tensor::TensorView::new(Dtype::F32, shape.to_vec(), bytemuck::cast_slice(y))
            .map_err(|e| e.to_string())?;
    safetensors::serialize_to_file([("y", view)], &None, path)
        .map_err(|e| format!("{}: {e}", path.display()))
}
