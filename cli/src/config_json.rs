//! The layer configuration as JSON (README.md documents every field).

use attnrt::{BiasFlags, Config, QkNorm, Rope, RopeConvention, RopeScaling};
use serde::Deserialize;

/// `bias`: one flag for all four projections, or one per projection.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum BiasJson {
    All(bool),
    Each {
        #[serde(default)]
        q: bool,
        #[serde(default)]
        k: bool,
        #[serde(default)]
        v: bool,
        #[serde(default)]
        o: bool,
    },
}

#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase", deny_unknown_fields)]
enum ScalingJson {
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: u32,
    },
    Yarn {
        factor: f64,
        original_max_position_embeddings: u32,
        attention_factor: Option<f64>,
        #[serde(default = "default_beta_fast")]
        beta_fast: f64,
        #[serde(default = "default_beta_slow")]
        beta_slow: f64,
    },
}

fn default_beta_fast() -> f64 {
    32.0
}

fn default_beta_slow() -> f64 {
    1.0
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RopeJson {
    #[serde(default)]
    convention: Option<String>,
    #[serde(default)]
    theta: Option<f64>,
    #[serde(default)]
    scaling: Option<ScalingJson>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LayerJson {
    n_embd: usize,
    n_head: usize,
    n_kv_head: Option<usize>,
    head_dim: Option<usize>,
    #[serde(default)]
    bias: Option<BiasJson>,
    #[serde(default)]
    qk_norm: Option<String>,
    rmsnorm_eps: Option<f32>,
    sliding_window: Option<usize>,
    #[serde(default)]
    rope: Option<RopeJson>,
    /// Training only; accepted and ignored, as inference in the reference ignores it.
    #[serde(default)]
    #[allow(dead_code)]
    dropout: Option<f64>,
}

/// Parses and validates a layer configuration.
///
/// # Errors
/// A one-line message naming the JSON problem or the configuration rule broken.
pub fn parse_config(text: &str) -> Result<Config, String> {
    let j: LayerJson = serde_json::from_str(text).map_err(|e| format!("config JSON: {e}"))?;
    let mut cfg = Config::new(j.n_embd, j.n_head);
    if let Some(kv) = j.n_kv_head {
        cfg = cfg.with_kv_heads(kv);
    }
    if let Some(d) = j.head_dim {
        cfg = cfg.with_head_dim(d);
    }
    cfg.bias = match j.bias {
        None | Some(BiasJson::All(false)) => BiasFlags::NONE,
        Some(BiasJson::All(true)) => BiasFlags::ALL,
        Some(BiasJson::Each { q, k, v, o }) => BiasFlags { q, k, v, o },
    };
    cfg.qk_norm = match j.qk_norm.as_deref() {
        None | Some("none") => QkNorm::None,
        Some("per_head") => QkNorm::PerHead,
        Some("full") => QkNorm::Full,
        Some(other) => {
            return Err(format!(
                "config: qk_norm = {other:?}: expected none, per_head or full"
            ))
        }
    };
    if let Some(eps) = j.rmsnorm_eps {
        cfg.rmsnorm_eps = eps;
    }
    cfg.sliding_window = j.sliding_window;
    if let Some(r) = j.rope {
        cfg = cfg.with_rope(parse_rope(r)?);
    }
    cfg.validate().map_err(|e| e.to_string())?;
    Ok(cfg)
}

fn parse_rope(r: RopeJson) -> Result<Rope, String> {
    let convention = match r.convention.as_deref() {
        None | Some("interleaved") => RopeConvention::Interleaved,
        Some("half_split") => RopeConvention::HalfSplit,
        Some(other) => {
            return Err(format!(
                "config: rope.convention = {other:?}: expected interleaved or half_split"
            ))
        }
    };
    let scaling = match r.scaling {
        None => RopeScaling::None,
        Some(ScalingJson::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        }) => RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        },
        Some(ScalingJson::Yarn {
            factor,
            original_max_position_embeddings,
            attention_factor,
            beta_fast,
            beta_slow,
        }) => RopeScaling::Yarn {
            factor,
            original_max_position_embeddings,
            // The common default of yarn implementations when the checkpoint states none.
            attention_factor: attention_factor.unwrap_or(0.1 * factor.ln() + 1.0),
            beta_fast,
            beta_slow,
        },
    };
    Ok(Rope {
        convention,
        theta: r.theta.unwrap_or(10000.0),
        scaling,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minimal_config_takes_reference_defaults() {
        let c = parse_config(r#"{"n_embd": 64, "n_head": 4}"#).unwrap();
        assert_eq!(c, Config::new(64, 4));
    }

    #[test]
    fn full_config_parses() {
        let c = parse_config(
            r#"{"n_embd": 64, "n_head": 8, "n_kv_head": 2, "head_dim": 16,
                "bias": {"q": true, "k": true, "v": true}, "qk_norm": "full",
                "rmsnorm_eps": 1e-6, "sliding_window": 4,
                "rope": {"convention": "half_split", "theta": 500000,
                         "scaling": {"type": "yarn", "factor": 4,
                                     "original_max_position_embeddings": 4096}}}"#,
        )
        .unwrap();
        assert_eq!(
            c.bias,
            BiasFlags {
                q: true,
                k: true,
                v: true,
                o: false
            }
        );
        assert_eq!(c.sliding_window, Some(4));
        let rope = c.rope().unwrap();
        assert_eq!(rope.convention, RopeConvention::HalfSplit);
        assert!(matches!(rope.scaling, RopeScaling::Yarn { beta_fast, .. } if beta_fast == 32.0));
    }

    #[test]
    fn bad_configs_are_one_line_errors() {
        for bad in [
            r#"{"n_embd": 64}"#,
            r#"{"n_embd": 64, "n_head": 3}"#,
            r#"{"n_embd": 64, "n_head": 4, "qk_norm": "sometimes"}"#,
            r#"{"n_embd": 64, "n_head": 4, "unknown": 1}"#,
            r#"{"n_embd": 64, "n_head": 4, "sliding_window": 0}"#,
        ] {
            let e = parse_config(bad).unwrap_err();
            assert!(!e.contains('\n'), "{e}");
        }
    }
}
