//! Borrowed views of weight data in f32, f16 or bf16, and the layer's set of weights.

use half::{bf16, f16};

use crate::config::{Config, QkNorm};
use crate::error::{Error, Result};

/// Storage type of a tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum DType {
    /// IEEE binary32.
    F32,
    /// IEEE binary16.
    F16,
    /// bfloat16.
    Bf16,
}

impl DType {
    /// Bytes per element.
    pub const fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::Bf16 => 2,
        }
    }
}

/// A borrowed, flat, row-major tensor. The runtime never copies or owns weight data.
#[derive(Clone, Copy, Debug)]
pub enum Tensor<'a> {
    /// f32 elements.
    F32(&'a [f32]),
    /// f16 elements.
    F16(&'a [f16]),
    /// bf16 elements.
    Bf16(&'a [bf16]),
}

impl<'a> Tensor<'a> {
    /// Views little-endian bytes (from a file or flash) as elements of `dtype`.
    ///
    /// # Errors
    /// [`Error::Bytes`] if the length is not a multiple of the element size or the start is not
    /// aligned to it.
    pub fn from_bytes(name: &'static str, dtype: DType, bytes: &'a [u8]) -> Result<Tensor<'a>> {
        let err = Error::Bytes {
            name,
            len: bytes.len(),
            elem_size: dtype.size(),
        };
        Ok(match dtype {
            DType::F32 => Tensor::F32(bytemuck::try_cast_slice(bytes).map_err(|_| err)?),
            DType::F16 => Tensor::F16(bytemuck::try_cast_slice(bytes).map_err(|_| err)?),
            DType::Bf16 => Tensor::Bf16(bytemuck::try_cast_slice(bytes).map_err(|_| err)?),
        })
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            Tensor::F32(s) => s.len(),
            Tensor::F16(s) => s.len(),
            Tensor::Bf16(s) => s.len(),
        }
    }

    /// Whether the tensor has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The storage type.
    pub fn dtype(&self) -> DType {
        match self {
            Tensor::F32(_) => DType::F32,
            Tensor::F16(_) => DType::F16,
            Tensor::Bf16(_) => DType::Bf16,
        }
    }

    /// Element `i` widened to f32, or `None` past the end.
    pub fn get(&self, i: usize) -> Option<f32> {
        match self {
            Tensor::F32(s) => s.get(i).copied(),
            Tensor::F16(s) => s.get(i).map(|v| v.to_f32()),
            Tensor::Bf16(s) => s.get(i).map(|v| v.to_f32()),
        }
    }
}

/// The weights of one layer, borrowed; they must outlive every forward call that uses them.
///
/// Linear weights are `[out_features, in_features]` row-major (SPEC.md, "Weights").
#[derive(Clone, Copy, Debug)]
pub struct LayerWeights<'a> {
    /// `[n_head * head_dim, n_embd]`.
    pub wq: Tensor<'a>,
    /// `[n_kv_head * head_dim, n_embd]`.
    pub wk: Tensor<'a>,
    /// `[n_kv_head * head_dim, n_embd]`.
    pub wv: Tensor<'a>,
    /// `[n_embd, n_head * head_dim]`.
    pub wo: Tensor<'a>,
    /// `[n_head * head_dim]`, present iff `bias.q`.
    pub bq: Option<Tensor<'a>>,
    /// `[n_kv_head * head_dim]`, present iff `bias.k`.
    pub bk: Option<Tensor<'a>>,
    /// `[n_kv_head * head_dim]`, present iff `bias.v`.
    pub bv: Option<Tensor<'a>>,
    /// `[n_embd]`, present iff `bias.o`.
    pub bo: Option<Tensor<'a>>,
    /// `[head_dim]` (per-head) or `[n_head * head_dim]` (full), present iff QK-norm is on.
    pub q_norm: Option<Tensor<'a>>,
    /// `[head_dim]` (per-head) or `[n_kv_head * head_dim]` (full), present iff QK-norm is on.
    pub k_norm: Option<Tensor<'a>>,
}

impl<'a> LayerWeights<'a> {
    /// The four projections alone: no biases, no QK-norm weights (a layer configured without
    /// either).
    pub const fn projections(
        wq: Tensor<'a>,
        wk: Tensor<'a>,
        wv: Tensor<'a>,
        wo: Tensor<'a>,
    ) -> LayerWeights<'a> {
        LayerWeights {
            wq,
            wk,
            wv,
            wo,
            bq: None,
            bk: None,
            bv: None,
            bo: None,
            q_norm: None,
            k_norm: None,
        }
    }

    /// Checks that every tensor the configuration needs is present with the right length, and
    /// that none it has no use for was given.
    ///
    /// # Errors
    /// [`Error::WeightShape`] or [`Error::WeightPresence`] naming the tensor.
    pub fn validate(&self, cfg: &Config) -> Result<()> {
        let (c, q, kv) = (cfg.n_embd, cfg.q_dim(), cfg.kv_dim());
        shape("wq", Some(&self.wq), true, q * c)?;
        shape("wk", Some(&self.wk), true, kv * c)?;
        shape("wv", Some(&self.wv), true, kv * c)?;
        shape("wo", Some(&self.wo), true, c * q)?;
        shape("bq", self.bq.as_ref(), cfg.bias.q, q)?;
        shape("bk", self.bk.as_ref(), cfg.bias.k, kv)?;
        shape("bv", self.bv.as_ref(), cfg.bias.v, kv)?;
        shape("bo", self.bo.as_ref(), cfg.bias.o, c)?;
        let (qn, kn) = match cfg.qk_norm {
            QkNorm::None => (0, 0),
            QkNorm::PerHead => (cfg.head_dim, cfg.head_dim),
            QkNorm::Full => (q, kv),
        };
        let norm = cfg.qk_norm != QkNorm::None;
        shape("q_norm", self.q_norm.as_ref(), norm, qn)?;
        shape("k_norm", self.k_norm.as_ref(), norm, kn)?;
        Ok(())
    }
}

fn shape(name: &'static str, t: Option<&Tensor<'_>>, required: bool, len: usize) -> Result<()> {
    match (t, required) {
        (Some(t), true) if t.len() != len => Err(Error::WeightShape {
            name,
            expected: len,
            actual: t.len(),
        }),
        (Some(_), true) | (None, false) => Ok(()),
        (None, true) => Err(Error::WeightPresence {
            name,
            required: true,
        }),
        (Some(_), false) => Err(Error::WeightPresence {
            name,
            required: false,
        }),
    }
}
