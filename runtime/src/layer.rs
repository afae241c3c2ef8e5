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
    /// Set only on one device's shard of a full-QK-norm layer (see [`crate::shard`]).
    part: Option<NormPart>,
}

/// What one device's shard of a full-QK-norm layer needs to normalise its rows: the norm's
/// statistics span every head of the unsplit layer, so each device computes per-token sums of
/// squares over its own heads, the sums are added across devices (an all-reduce of `2 * tokens`
/// floats: q sums then k sums), and the mean divides by the whole row's width.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NormPart {
    /// Width of the unsplit q row, `n_head * head_dim`: the divisor of the q mean.
    pub q_width: usize,
    /// Width of the unsplit k row, `n_kv_head * head_dim`: the divisor of the k mean.
    pub k_width: usize,
    /// Whether this device's k heads count in the k sums. A KV head replicated on several
    /// devices counts once, on the first of them; the others contribute 0 to the k sums.
    pub count_k: bool,
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
        Ok(Layer {
            cfg,
            weights,
            part: None,
        })
    }

    /// One device's shard of a validated layer: the weights are checked against the shard's
    /// configuration, whose head counts need not divide `n_embd` (the unsplit one was checked).
    pub(crate) fn shard(
        cfg: Config,
        weights: LayerWeights<'a>,
        part: Option<NormPart>,
    ) -> Result<Layer<'a>> {
        weights.validate(&cfg)?;
        Ok(Layer { cfg, weights, part })
    }

    /// The full-QK-norm share of a shard's layer, if it is one.
    pub(crate) fn part(&self) -> Option<NormPart> {
        self.part
    }

    /// Refuses a shard of a full-QK-norm layer in the single-device entry points: its norm
    /// needs the statistics of the other devices.
    pub(crate) fn whole(&self) -> Result<()> {
        match self.part {
            Some(_) => Err(Error::Unsupported {
                what: "a full-QK-norm shard needs the cross-device norm reduction: run it through ShardLayer",
            }),
            None => Ok(()),
        }
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
        tokens_of(b, t)?;
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
        let mask = self.check_metadata(
            b,
            t,
            &inputs.mask,
            inputs.position_ids,
            inputs.rope_table.map(|r| (r.half_dim(), r.max_pos())),
        )?;
        Ok(Call {
            x: inputs.x,
            batch: b,
            seq_len: t,
            mask,
            position_ids: inputs.position_ids,
            rope_table: inputs.rope_table,
        })
    }

    /// Checks every input of a call against the layer and the output length, exactly as every
    /// executor of this crate does before it runs: for executors outside the crate (GPU) that
    /// must reject the same calls.
    ///
    /// # Errors
    /// The first rule broken, with the same error any executor of this crate returns.
    pub fn validate_inputs(&self, inputs: &Inputs<'_>, out_len: usize) -> Result<()> {
        self.check(inputs, out_len).map(|_| ())
    }

    /// Checks a call whose activations `x` and `y` are not host slices (device memory, say):
    /// everything [`Inputs`] carries except the data of `x`, which the caller guarantees holds
    /// `batch * seq_len * n_embd` values, as `y` does. `rope_table` is the caller's table as
    /// `(half_dim, max_pos)`. The rules and the errors are those of [`Layer::validate_inputs`].
    ///
    /// # Errors
    /// The first rule broken.
    pub fn validate_metadata(
        &self,
        batch: usize,
        seq_len: usize,
        mask: &MaskInputs<'_>,
        position_ids: Option<&[i32]>,
        rope_table: Option<(usize, usize)>,
    ) -> Result<()> {
        tokens_of(batch, seq_len)?;
        self.output_len(batch, seq_len).ok_or(Error::InputValue {
            name: "seq_len",
            index: 0,
            value: seq_len as i64,
            rule: "batch * seq_len * n_embd overflows",
        })?;
        self.check_metadata(batch, seq_len, mask, position_ids, rope_table)
            .map(|_| ())
    }

    /// The checks after the activation lengths: mask, positions, rotary table.
    fn check_metadata<'m>(
        &self,
        b: usize,
        t: usize,
        mask: &MaskInputs<'m>,
        position_ids: Option<&[i32]>,
        rope_table: Option<(usize, usize)>,
    ) -> Result<MaskSpec<'m>> {
        let tokens = tokens_of(b, t)?;
        let mask = MaskSpec::new(self.cfg.sliding_window, b, t, mask)?;
        if let Some(p) = position_ids {
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
        match (self.cfg.rope(), rope_table) {
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
            (Some(_), Some((half_dim, max_pos))) => {
                if half_dim * 2 != self.cfg.head_dim {
                    return Err(Error::InputShape {
                        name: "freqs_cis row",
                        expected: self.cfg.head_dim,
                        actual: half_dim * 2,
                    });
                }
                check_positions(position_ids, tokens, t, max_pos)?;
            }
            (None, None) => {}
        }
        Ok(mask)
    }
}

fn tokens_of(b: usize, t: usize) -> Result<usize> {
    b.checked_mul(t).ok_or(Error::InputValue {
        name: "seq_len",
        index: 0,
        value: t as i64,
        rule: "batch * seq_len overflows",
    })
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
