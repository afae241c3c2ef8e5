//! The layer configuration of SPEC.md and the validation of every rule.
//!
//! Constructors are `const fn` so that an embedded user can write the configuration as a
//! `const` and size a static arena from it at compile time.

use crate::error::{Error, Result};

/// Which projections carry a bias. SPEC.md's `bias` is all four at once; each may be chosen on
/// its own (Qwen2-style checkpoints have q/k/v biases and no output bias).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BiasFlags {
    /// `bq` present.
    pub q: bool,
    /// `bk` present.
    pub k: bool,
    /// `bv` present.
    pub v: bool,
    /// `bo` present.
    pub o: bool,
}

impl BiasFlags {
    /// No bias anywhere (the default).
    pub const NONE: BiasFlags = BiasFlags {
        q: false,
        k: false,
        v: false,
        o: false,
    };
    /// Every projection biased (`bias = true` in the reference).
    pub const ALL: BiasFlags = BiasFlags {
        q: true,
        k: true,
        v: true,
        o: true,
    };
}

/// RMSNorm applied to the projected queries and keys before the rotary embedding.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum QkNorm {
    /// No normalisation (the default).
    #[default]
    None,
    /// Over each head's `head_dim` values, one `[head_dim]` weight shared by every head.
    PerHead,
    /// Over the whole projected row: weight `[n_head * head_dim]` for q, `[n_kv_head * head_dim]` for k.
    Full,
}

/// Which pairs of a head's values a rotary angle rotates.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum RopeConvention {
    /// Pairs `(z[2i], z[2i+1])`, as the reference does.
    #[default]
    Interleaved,
    /// Pairs `(z[i], z[i + D/2])` ("rotate half"), as many published checkpoints do.
    HalfSplit,
}

/// Scaling of the rotary frequencies for long contexts, as the reference's table builder offers.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub enum RopeScaling {
    /// Plain `theta^(-2i/D)`.
    #[default]
    None,
    /// Llama 3.1 scaling: long wavelengths divided by `factor`, a smooth blend in between.
    Llama3 {
        /// Division of the long-wavelength frequencies.
        factor: f64,
        /// `orig / low_freq_factor` is the wavelength above which frequencies are scaled.
        low_freq_factor: f64,
        /// `orig / high_freq_factor` is the wavelength below which they are kept.
        high_freq_factor: f64,
        /// Context length of the unscaled model.
        original_max_position_embeddings: u32,
    },
    /// YaRN: a ramp between interpolated and extrapolated frequencies, cos/sin scaled by
    /// `attention_factor`.
    Yarn {
        /// Interpolation factor.
        factor: f64,
        /// Context length of the unscaled model.
        original_max_position_embeddings: u32,
        /// Multiplier of cos and sin (commonly `0.1 ln(factor) + 1`).
        attention_factor: f64,
        /// Rotations at which the ramp starts (high-frequency side), commonly 32.
        beta_fast: f64,
        /// Rotations at which the ramp ends (low-frequency side), commonly 1.
        beta_slow: f64,
    },
}

/// Rotary position embedding settings.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Rope {
    /// Pairing of values.
    pub convention: RopeConvention,
    /// Base of the frequencies (default 10000); used when the runtime builds the table.
    pub theta: f64,
    /// Frequency scaling; used when the runtime builds the table.
    pub scaling: RopeScaling,
}

impl Rope {
    /// Interleaved pairs, theta 10000, no scaling: the reference's defaults.
    pub const DEFAULT: Rope = Rope {
        convention: RopeConvention::Interleaved,
        theta: 10000.0,
        scaling: RopeScaling::None,
    };
}

/// Positional encoding of the layer.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub enum Positional {
    /// None (the reference's GPT-2 style `CausalSelfAttention`).
    #[default]
    None,
    /// Rotary (`RotarySelfAttention`).
    Rotary(Rope),
}

/// The configuration of one attention layer (SPEC.md, "Configuration").
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Config {
    /// Model width C.
    pub n_embd: usize,
    /// Query heads H.
    pub n_head: usize,
    /// Key/value heads KV (H for MHA, 1 for MQA).
    pub n_kv_head: usize,
    /// Per-head width D; may differ from C / H.
    pub head_dim: usize,
    /// Which projections carry biases.
    pub bias: BiasFlags,
    /// QK RMSNorm mode.
    pub qk_norm: QkNorm,
    /// Epsilon inside RMSNorm.
    pub rmsnorm_eps: f32,
    /// Sliding window W: key j is visible to query i only if `i - j < W`.
    pub sliding_window: Option<usize>,
    /// Positional encoding.
    pub positional: Positional,
}

impl Config {
    /// MHA with the reference's defaults: `n_kv_head = n_head`, `head_dim = n_embd / n_head`,
    /// no bias, no QK-norm, eps 1e-5, no window, no positional encoding.
    pub const fn new(n_embd: usize, n_head: usize) -> Config {
        Config {
            n_embd,
            n_head,
            n_kv_head: n_head,
            head_dim: match n_embd.checked_div(n_head) {
                Some(d) => d,
                None => 0,
            },
            bias: BiasFlags::NONE,
            qk_norm: QkNorm::None,
            rmsnorm_eps: 1e-5,
            sliding_window: None,
            positional: Positional::None,
        }
    }

    /// Sets the number of key/value heads.
    pub const fn with_kv_heads(mut self, n_kv_head: usize) -> Config {
        self.n_kv_head = n_kv_head;
        self
    }

    /// Sets the per-head width.
    pub const fn with_head_dim(mut self, head_dim: usize) -> Config {
        self.head_dim = head_dim;
        self
    }

    /// Sets which projections carry biases.
    pub const fn with_bias(mut self, bias: BiasFlags) -> Config {
        self.bias = bias;
        self
    }

    /// Sets the QK-norm mode.
    pub const fn with_qk_norm(mut self, qk_norm: QkNorm) -> Config {
        self.qk_norm = qk_norm;
        self
    }

    /// Sets the RMSNorm epsilon.
    pub const fn with_rmsnorm_eps(mut self, eps: f32) -> Config {
        self.rmsnorm_eps = eps;
        self
    }

    /// Sets a sliding window of `window` keys (the query's own included).
    pub const fn with_sliding_window(mut self, window: usize) -> Config {
        self.sliding_window = Some(window);
        self
    }

    /// Turns on rotary embedding.
    pub const fn with_rope(mut self, rope: Rope) -> Config {
        self.positional = Positional::Rotary(rope);
        self
    }

    /// Width of the projected queries, `n_head * head_dim`.
    pub const fn q_dim(&self) -> usize {
        self.n_head.saturating_mul(self.head_dim)
    }

    /// Width of the projected keys and values, `n_kv_head * head_dim`.
    pub const fn kv_dim(&self) -> usize {
        self.n_kv_head.saturating_mul(self.head_dim)
    }

    /// Query heads per key/value head, `R = n_head / n_kv_head`.
    pub const fn group_size(&self) -> usize {
        match self.n_head.checked_div(self.n_kv_head) {
            Some(r) => r,
            None => 0,
        }
    }

    /// The key/value head that query head `h` reads (consecutive query heads share one).
    pub const fn kv_head_of(&self, h: usize) -> usize {
        match h.checked_div(self.group_size()) {
            Some(g) => g,
            None => 0,
        }
    }

    /// The rotary settings, if the layer is rotary.
    pub const fn rope(&self) -> Option<&Rope> {
        match &self.positional {
            Positional::Rotary(r) => Some(r),
            Positional::None => None,
        }
    }

    /// Checks every rule of SPEC.md's configuration table.
    ///
    /// # Errors
    /// [`Error::Config`], [`Error::ConfigFloat`] or [`Error::ConfigPair`] naming the first
    /// offending field.
    pub fn validate(&self) -> Result<()> {
        positive("n_embd", self.n_embd)?;
        positive("n_head", self.n_head)?;
        positive("n_kv_head", self.n_kv_head)?;
        positive("head_dim", self.head_dim)?;
        divisible("n_embd", self.n_embd, "n_head", self.n_head)?;
        divisible("n_head", self.n_head, "n_kv_head", self.n_kv_head)?;
        // Every buffer length below is a product of these; refuse what would overflow a usize
        // (a real risk on 32-bit targets) instead of wrapping.
        let q_dim = checked("n_head", self.n_head, "head_dim", self.head_dim)?;
        checked("n_embd", self.n_embd, "n_head * head_dim", q_dim)?;
        if !(self.rmsnorm_eps > 0.0 && self.rmsnorm_eps.is_finite()) {
            return Err(Error::ConfigFloat {
                field: "rmsnorm_eps",
                value: self.rmsnorm_eps as f64,
                rule: "must be finite and > 0",
            });
        }
        if self.sliding_window == Some(0) {
            return Err(Error::Config {
                field: "sliding_window",
                value: 0,
                rule: "must be >= 1",
            });
        }
        if let Positional::Rotary(rope) = &self.positional {
            if !self.head_dim.is_multiple_of(2) {
                return Err(Error::Config {
                    field: "head_dim",
                    value: self.head_dim as i64,
                    rule: "rotary embedding needs an even head_dim",
                });
            }
            rope.validate()?;
        }
        Ok(())
    }
}

impl Rope {
    fn validate(&self) -> Result<()> {
        finite_positive("rope.theta", self.theta)?;
        match self.scaling {
            RopeScaling::None => Ok(()),
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                finite_positive("rope.llama3.factor", factor)?;
                finite_positive("rope.llama3.low_freq_factor", low_freq_factor)?;
                finite_positive("rope.llama3.high_freq_factor", high_freq_factor)?;
                positive(
                    "rope.llama3.original_max_position_embeddings",
                    original_max_position_embeddings as usize,
                )?;
                if high_freq_factor <= low_freq_factor {
                    return Err(Error::ConfigFloat {
                        field: "rope.llama3.high_freq_factor",
                        value: high_freq_factor,
                        rule: "must be greater than low_freq_factor",
                    });
                }
                Ok(())
            }
            RopeScaling::Yarn {
                factor,
                original_max_position_embeddings,
                attention_factor,
                beta_fast,
                beta_slow,
            } => {
                // The correction range divides by ln(theta): theta = 1 makes every frequency
                // NaN.
                if self.theta == 1.0 {
                    return Err(Error::ConfigFloat {
                        field: "rope.theta",
                        value: self.theta,
                        rule: "must not be 1 with yarn scaling (its correction range divides by ln(theta))",
                    });
                }
                finite_positive("rope.yarn.factor", factor)?;
                finite_positive("rope.yarn.attention_factor", attention_factor)?;
                finite_positive("rope.yarn.beta_fast", beta_fast)?;
                finite_positive("rope.yarn.beta_slow", beta_slow)?;
                positive(
                    "rope.yarn.original_max_position_embeddings",
                    original_max_position_embeddings as usize,
                )?;
                Ok(())
            }
        }
    }
}

fn positive(field: &'static str, value: usize) -> Result<()> {
    if value == 0 {
        return Err(Error::Config {
            field,
            value: 0,
            rule: "must be > 0",
        });
    }
    Ok(())
}

fn finite_positive(field: &'static str, value: f64) -> Result<()> {
    if !(value > 0.0 && value.is_finite()) {
        return Err(Error::ConfigFloat {
            field,
            value,
            rule: "must be finite and > 0",
        });
    }
    Ok(())
}

fn divisible(field: &'static str, value: usize, other: &'static str, by: usize) -> Result<()> {
    if !value.is_multiple_of(by) {
        return Err(Error::ConfigPair {
            field,
            value: value as i64,
            other,
            other_value: by as i64,
            rule: "must be divisible",
        });
    }
    Ok(())
}

fn checked(field: &'static str, a: usize, other: &'static str, b: usize) -> Result<usize> {
    a.checked_mul(b).ok_or(Error::ConfigPair {
        field,
        value: a as i64,
        other,
        other_value: b as i64,
        rule: "product overflows the address space",
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_follow_the_reference() {
        let c = Config::new(64, 4);
        assert_eq!((c.n_kv_head, c.head_dim, c.group_size()), (4, 16, 1));
        assert!(c.validate().is_ok());
    }

    #[test]
    fn every_rule_is_checked() {
        let bad = [
            (Config::new(0, 4), "n_embd"),
            (Config::new(64, 0), "n_head"),
            (Config::new(64, 4).with_kv_heads(0), "n_kv_head"),
            (Config::new(64, 4).with_head_dim(0), "head_dim"),
            (Config::new(66, 4), "n_embd"),
            (Config::new(64, 4).with_kv_heads(3), "n_head"),
            (Config::new(64, 4).with_rmsnorm_eps(0.0), "rmsnorm_eps"),
            (Config::new(64, 4).with_rmsnorm_eps(f32::NAN), "rmsnorm_eps"),
            (Config::new(64, 4).with_sliding_window(0), "sliding_window"),
            (
                Config::new(64, 4)
                    .with_head_dim(15)
                    .with_rope(Rope::DEFAULT),
                "head_dim",
            ),
            (
                Config::new(64, 4).with_rope(Rope {
                    theta: -1.0,
                    ..Rope::DEFAULT
                }),
                "rope.theta",
            ),
            (
                Config::new(64, 4).with_rope(Rope {
                    theta: 1.0,
                    scaling: RopeScaling::Yarn {
                        factor: 4.0,
                        original_max_position_embeddings: 4096,
                        attention_factor: 1.0,
                        beta_fast: 32.0,
                        beta_slow: 1.0,
                    },
                    ..Rope::DEFAULT
                }),
                "rope.theta",
            ),
        ];
        for (cfg, field) in bad {
            let err = cfg.validate().unwrap_err();
            let named = match err {
                Error::Config { field, .. }
                | Error::ConfigFloat { field, .. }
                | Error::ConfigPair { field, .. } => field,
                other => panic!("unexpected {other:?}"),
            };
            assert_eq!(named, field, "{cfg:?}");
        }
    }

    #[test]
    fn llama3_needs_ordered_factors() {
        let rope = Rope {
            scaling: RopeScaling::Llama3 {
                factor: 8.0,
                low_freq_factor: 4.0,
                high_freq_factor: 1.0,
                original_max_position_embeddings: 8192,
            },
            ..Rope::DEFAULT
        };
        let err = Config::new(64, 4).with_rope(rope).validate().unwrap_err();
        assert!(matches!(
            err,
            Error::ConfigFloat {
                field: "rope.llama3.high_freq_factor",
                ..
            }
        ));
    }

    #[test]
    fn gqa_mapping_is_consecutive() {
        let c = Config::new(64, 8).with_kv_heads(2);
        let map: [usize; 8] = core::array::from_fn(|h| c.kv_head_of(h));
        assert_eq!(map, [0, 0, 0, 0, 1, 1, 1, 1]);
    }
}
