//! A layer (configuration + borrowed weights) and the validation of a forward call's inputs,
//! shared by every executor so that all of them reject exactly the same calls.

use crate::config::Config;
use crate::error::{Error, Result};
use crate::mask::{MaskInputs, MaskSpec};
use crate::rope::RopeTable;
use crate::tensor::LayerWeights;

/// The inputs of one forward call over a dense `[batch, seq_len, n_embd]` activation.
#[derive(Clone, Copy, Debug)]
pub struct Inputs<'a> {
    /// `[batch, seq_len, n_embd]`, row-major.
    pub x: &'a [f32],
    /// Batch rows B.
    pub batch: usize,
    /// Tokens per row T.
    pub seq_len: usize,
    /// Optional padding lengths, document ids and varlen segments.
    pub mask: MaskInputs<'a>,
    /// `[B, T]` rotary positions; without them token t has position t (also in packed modes).
    pub position_ids: Option<&'a [i32]>,
    /// The cos/sin table, required when the layer is rotary (see [`crate::rope::build_table`]).
    pub rope_table: Option<RopeTable<'a>>,
}

impl<'a> Inputs<'a> {
    /// Inputs with no mask beyond causal and no explicit positions.
    pub fn new(x: &'a [f32], batch: usize, seq_len: usize) -> Inputs<'a> {
        Inputs {
            x,
            batch,
            seq_len,
            mask: MaskInputs::default(),
            position_ids: None,
            rope_table: None,
        }
    }
}

/// One attention layer: a validated configuration and its borrowed weights.
#[derive(Clone, Copy, Debug)]
pub struct Layer<'a> {
    cfg: Config,
    weights: LayerWeights<'a>,
}

/// A forward call that passed validation: nothing about it can fail any more.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Call<'a> {
    pub x: &'a [f32],
    pub batch: usize,
    pub seq_len: usize,
    pub mask: MaskSpec<'a>,
    pub position_ids: Option<&'a [i32]>,
    pub rope_table: Option<RopeTable<'a>>,
}

impl Call<'_> {
    /// Rotary position of token `t` of row `b` (validated non-negative and inside the table).
    pub fn position(&self, b: usize, t: usize) -> usize {
        match self.position_ids {
            Some(p) => p[b * self.seq_len + t] as usize,
            None => t,
        }
    }
}

impl<'a> Layer<'a> {
    /// Validates the configuration and the weights against it.
    ///
    /// # Errors
    /// The first rule broken, from [`Config::validate`] or [`LayerWeights::validate`].
    pub fn new(cfg: Config, weights: LayerWeights<'a>) -> Result<Layer<'a>> {
        cfg.validate()?;
        weights.validate(&cfg)?;
        Ok(Layer { cfg, weights })
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// The weights.
    pub fn weights(&self) -> &LayerWeights<'a> {
        &self.weights
    }

    /// Elements of the output `y` for the shapes of `inputs`: `batch * seq_len * n_embd`.
    pub fn output_len(&self, batch: usize, seq_len: usize) -> Option<usize> {
        batch.checked_mul(seq_len)?.checked_mul(self.cfg.n_embd)
    }

    /// Checks every input of a call against the layer and the output length.
    pub(crate) fn check<'i>(&self, inputs: &Inputs<'i>, out_len: usize) -> Result<Call<'i>> {
        let (b, t) = (inputs.batch, inputs.seq_len);
        let tokens = b.checked_mul(t).ok_or(Error::InputValue {
            name: "seq_len",
            index: 0,
            value: t as i64,
            rule: "batch * seq_len overflows",
        })?;
        let y_len = self.output_len(b, t).ok_or(Error::InputValue {
            name: "seq_len",
            index: 0,
            value: t as i64,
            rule: "batch * seq_len * n_embd overflows",
        })?;
        if inputs.x.len() != y_len {
            return Err(Error::InputShape {
                name: "x",
                expected: y_len,
                actual: inputs.x.len(),
            });
        }
        if out_len != y_len {
            return Err(Error::InputShape {
                name: "out",
                expected: y_len,
                actual: out_len,
            });
        }
        let mask = MaskSpec::new(self.cfg.sliding_window, b, t, &inputs.mask)?;
        if let Some(p) = inputs.position_ids {
            if p.len() != tokens {
                return Err(Error::InputShape {
                    name: "position_ids",
                    expected: tokens,
                    actual: p.len(),
                });
            }
            if let Some(i) = p.iter().position(|&v| v < 0) {
                return Err(Error::InputValue {
                    name: "position_ids",
                    index: i,
                    value: p[i] as i64,
                    rule: "must be >= 0",
                });
            }
        }
        match (self.cfg.rope(), inputs.rope_table) {
            (None, Some(_)) => {
                return Err(Error::Unsupported {
                    what: "freqs_cis given but the layer has no rotary embedding",
                })
            }
            (Some(_), None) => {
                return Err(Error::InputShape {
                    name: "freqs_cis",
                    expected: self.cfg.head_dim,
                    actual: 0,
                })
            }
            (Some(_), Some(table)) => {
                if table.half_dim() * 2 != self.cfg.head_dim {
                    return Err(Error::InputShape {
                        name: "freqs_cis row",
                        expected: self.cfg.head_dim,
                        actual: table.half_dim() * 2,
                    });
                }
                check_positions(inputs.position_ids, tokens, t, table.max_pos())?;
            }
            (None, None) => {}
        }
        Ok(Call {
            x: inputs.x,
            batch: b,
            seq_len: t,
            mask,
            position_ids: inputs.position_ids,
            rope_table: inputs.rope_table,
        })
    }
}

fn check_positions(
    ids: Option<&[i32]>,
    tokens: usize,
    seq_len: usize,
    max_pos: usize,
) -> Result<()> {
    match ids {
        Some(p) => match p.iter().position(|&v| v as usize >= max_pos) {
            Some(i) => Err(Error::PositionOutOfTable {
                index: i,
                position: p[i] as i64,
                table_len: max_pos,
            }),
            None => Ok(()),
        },
        None if tokens > 0 && seq_len > max_pos => Err(Error::PositionOutOfTable {
            index: max_pos,
            position: max_pos as i64,
            table_len: max_pos,
        }),
        None => Ok(()),
    }
}
