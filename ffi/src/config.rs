//! `attnrt_config`: the layer configuration as a plain struct the caller fills.

use attnrt::{BiasFlags, Config, QkNorm, Rope, RopeConvention, RopeScaling};

use crate::error::{FfiError, FfiResult};
use crate::panic::guard;
use crate::ptr::{check_out, write_out};
use crate::status::attnrt_status;

/// QK RMSNorm mode (`attnrt_config::qk_norm`).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum attnrt_qk_norm {
    /// No normalisation.
    ATTNRT_QK_NORM_NONE = 0,
    /// Over each head's `head_dim` values; `q_norm` and `k_norm` are `[head_dim]`.
    ATTNRT_QK_NORM_PER_HEAD = 1,
    /// Over the whole projected row; `q_norm` is `[n_head * head_dim]`, `k_norm`
    /// `[n_kv_head * head_dim]`.
    ATTNRT_QK_NORM_FULL = 2,
}

/// Rotary pairing convention (`attnrt_config::rope_convention`).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum attnrt_rope_convention {
    /// Pairs `(z[2i], z[2i+1])`.
    ATTNRT_ROPE_CONVENTION_INTERLEAVED = 0,
    /// Pairs `(z[i], z[i + D/2])` ("rotate half").
    ATTNRT_ROPE_CONVENTION_HALF_SPLIT = 1,
}

/// Rotary frequency scaling (`attnrt_config::rope_scaling`).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum attnrt_rope_scaling {
    /// Plain `theta^(-2i/D)`.
    ATTNRT_ROPE_SCALING_NONE = 0,
    /// Llama 3.1: uses `rope_factor`, `rope_low_freq_factor`, `rope_high_freq_factor`,
    /// `rope_original_max_position_embeddings`.
    ATTNRT_ROPE_SCALING_LLAMA3 = 1,
    /// YaRN: uses `rope_factor`, `rope_original_max_position_embeddings`,
    /// `rope_attention_factor`, `rope_beta_fast`, `rope_beta_slow`.
    ATTNRT_ROPE_SCALING_YARN = 2,
}

/// The configuration of one attention layer (SPEC.md, "Configuration"). A plain struct: fill it
/// with [`attnrt_config_default`], then change the fields you need. Enumerations are stored as
/// `uint32_t`; booleans as `uint8_t` (0 = false, anything else = true).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct attnrt_config {
    /// Model width C; > 0 and divisible by `n_head`.
    pub n_embd: usize,
    /// Query heads H; > 0.
    pub n_head: usize,
    /// Key/value heads; divides `n_head` (default `n_head`).
    pub n_kv_head: usize,
    /// Per-head width D (default `n_embd / n_head`).
    pub head_dim: usize,
    /// `bq` present.
    pub bias_q: u8,
    /// `bk` present.
    pub bias_k: u8,
    /// `bv` present.
    pub bias_v: u8,
    /// `bo` present.
    pub bias_o: u8,
    /// An `attnrt_qk_norm` value.
    pub qk_norm: u32,
    /// Epsilon inside RMSNorm; finite and > 0 (default 1e-5).
    pub rmsnorm_eps: f32,
    /// Sliding window W: negative = no window (the default); 0 is invalid
    /// (`ATTNRT_STATUS_CONFIG`); W >= 1 masks keys further back than W - 1 positions.
    pub sliding_window: i64,
    /// Rotary embedding on (nonzero) or off (0, the default).
    pub rope: u8,
    /// An `attnrt_rope_convention` value.
    pub rope_convention: u32,
    /// Base of the rotary frequencies (default 10000).
    pub rope_theta: f64,
    /// An `attnrt_rope_scaling` value.
    pub rope_scaling: u32,
    /// llama3 / yarn: the scaling factor.
    pub rope_factor: f64,
    /// llama3: low-frequency factor.
    pub rope_low_freq_factor: f64,
    /// llama3: high-frequency factor (> `rope_low_freq_factor`).
    pub rope_high_freq_factor: f64,
    /// llama3 / yarn: context length of the unscaled model.
    pub rope_original_max_position_embeddings: u32,
    /// yarn: multiplier of cos and sin; 0 means `0.1 * ln(rope_factor) + 1`.
    pub rope_attention_factor: f64,
    /// yarn: rotations where the ramp starts (default 32).
    pub rope_beta_fast: f64,
    /// yarn: rotations where the ramp ends (default 1).
    pub rope_beta_slow: f64,
}

impl attnrt_config {
    /// The defaults of the reference module for a width and a head count.
    pub(crate) fn defaults(n_embd: usize, n_head: usize) -> attnrt_config {
        attnrt_config {
            n_embd,
            n_head,
            n_kv_head: n_head,
            head_dim: n_embd.checked_div(n_head).unwrap_or(0),
            bias_q: 0,
            bias_k: 0,
            bias_v: 0,
            bias_o: 0,
            qk_norm: attnrt_qk_norm::ATTNRT_QK_NORM_NONE as u32,
            rmsnorm_eps: 1e-5,
            sliding_window: -1,
            rope: 0,
            rope_convention: attnrt_rope_convention::ATTNRT_ROPE_CONVENTION_INTERLEAVED as u32,
            rope_theta: 10000.0,
            rope_scaling: attnrt_rope_scaling::ATTNRT_ROPE_SCALING_NONE as u32,
            rope_factor: 8.0,
            rope_low_freq_factor: 1.0,
            rope_high_freq_factor: 4.0,
            rope_original_max_position_embeddings: 8192,
            rope_attention_factor: 0.0,
            rope_beta_fast: 32.0,
            rope_beta_slow: 1.0,
        }
    }

    /// The runtime configuration, validated.
    pub(crate) fn validated(&self) -> FfiResult<Config> {
        let qk_norm = match self.qk_norm {
            0 => QkNorm::None,
            1 => QkNorm::PerHead,
            2 => QkNorm::Full,
            v => return Err(FfiError::bad_enum("qk_norm", v, "an attnrt_qk_norm, 0..=2")),
        };
        let convention = match self.rope_convention {
            0 => RopeConvention::Interleaved,
            1 => RopeConvention::HalfSplit,
            v => {
                return Err(FfiError::bad_enum(
                    "rope_convention",
                    v,
                    "an attnrt_rope_convention, 0..=1",
                ))
            }
        };
        let scaling = match self.rope_scaling {
            0 => RopeScaling::None,
            1 => RopeScaling::Llama3 {
                factor: self.rope_factor,
                low_freq_factor: self.rope_low_freq_factor,
                high_freq_factor: self.rope_high_freq_factor,
                original_max_position_embeddings: self.rope_original_max_position_embeddings,
            },
            2 => RopeScaling::Yarn {
                factor: self.rope_factor,
                original_max_position_embeddings: self.rope_original_max_position_embeddings,
                attention_factor: if self.rope_attention_factor == 0.0 {
                    0.1 * self.rope_factor.ln() + 1.0
                } else {
                    self.rope_attention_factor
                },
                beta_fast: self.rope_beta_fast,
                beta_slow: self.rope_beta_slow,
            },
            v => {
                return Err(FfiError::bad_enum(
                    "rope_scaling",
                    v,
                    "an attnrt_rope_scaling, 0..=2",
                ))
            }
        };
        let mut cfg = Config::new(self.n_embd, self.n_head)
            .with_kv_heads(self.n_kv_head)
            .with_head_dim(self.head_dim)
            .with_bias(BiasFlags {
                q: self.bias_q != 0,
                k: self.bias_k != 0,
                v: self.bias_v != 0,
                o: self.bias_o != 0,
            })
            .with_qk_norm(qk_norm)
            .with_rmsnorm_eps(self.rmsnorm_eps);
        if self.sliding_window >= 0 {
            let w = usize::try_from(self.sliding_window).map_err(|_| {
                FfiError::new(
                    attnrt_status::ATTNRT_STATUS_CONFIG,
                    format!(
                        "invalid config: sliding_window = {}: does not fit a size_t",
                        self.sliding_window
                    ),
                )
            })?;
            cfg = cfg.with_sliding_window(w);
        }
        if self.rope != 0 {
            cfg = cfg.with_rope(Rope {
                convention,
                theta: self.rope_theta,
                scaling,
            });
        }
        cfg.validate()?;
        Ok(cfg)
    }
}

/// Fills `*out` with the reference module's defaults for width `n_embd` and `n_head` heads:
/// `n_kv_head = n_head`, `head_dim = n_embd / n_head` (0 when `n_head` is 0), no bias, no
/// QK-norm, eps 1e-5, no sliding window, no rotary embedding (rotary fields preset to theta
/// 10000, interleaved, no scaling, and common llama3/yarn parameters).
///
/// The values are not validated here; [`crate::attnrt_layer_new`] and
/// [`crate::attnrt_capability`] do that.
///
/// Returns `ATTNRT_STATUS_NULL_POINTER` if `out` is NULL. Thread-safe.
///
/// # Safety
/// `out` must be valid for a write of one `attnrt_config`.
#[no_mangle]
pub unsafe extern "C" fn attnrt_config_default(
    n_embd: usize,
    n_head: usize,
    out: *mut attnrt_config,
) -> attnrt_status {
    guard(|| {
        check_out("out", out)?;
        // SAFETY: checked above; valid for one write by this function's contract.
        unsafe { write_out(out, attnrt_config::defaults(n_embd, n_head)) };
        Ok(())
    })
}
