//! Helpers for the tests that drive the C ABI: they only build the C structs from fixtures and
//! call the `extern "C"` functions of `attnrt-ffi`, exactly as a C caller would.

use std::ffi::{c_char, CStr};
use std::ptr;

use attnrt::{Config, LayerWeights, QkNorm, RopeConvention, RopeScaling, Tensor};
use attnrt_ffi::*;

use crate::{Fixture, OwnedWeights, Rng};

/// The message of this thread's last error, through `attnrt_error_message`.
pub fn last_error() -> String {
    let mut buf = vec![0 as c_char; 1024];
    let mut written = usize::MAX;
    // SAFETY: buf is valid for its length, written for one write.
    let st = unsafe { attnrt_error_message(buf.as_mut_ptr(), buf.len(), &mut written) };
    assert_eq!(
        st,
        attnrt_status::ATTNRT_STATUS_OK,
        "message longer than 1 KiB"
    );
    // SAFETY: NUL-terminated by the call.
    let s = unsafe { CStr::from_ptr(buf.as_ptr()) }
        .to_str()
        .unwrap()
        .to_owned();
    assert_eq!(s.len(), written);
    s
}

/// The C configuration of a runtime configuration, filled as a C caller would: defaults first,
/// then every field.
pub fn c_config(cfg: &Config) -> attnrt_config {
    let mut c = std::mem::MaybeUninit::<attnrt_config>::uninit();
    // SAFETY: c is valid for one write.
    let st = unsafe { attnrt_config_default(cfg.n_embd, cfg.n_head, c.as_mut_ptr()) };
    assert_eq!(st, attnrt_status::ATTNRT_STATUS_OK);
    // SAFETY: initialised by the successful call.
    let mut c = unsafe { c.assume_init() };
    c.n_kv_head = cfg.n_kv_head;
    c.head_dim = cfg.head_dim;
    c.bias_q = cfg.bias.q as u8;
    c.bias_k = cfg.bias.k as u8;
    c.bias_v = cfg.bias.v as u8;
    c.bias_o = cfg.bias.o as u8;
    c.qk_norm = match cfg.qk_norm {
        QkNorm::None => attnrt_qk_norm::ATTNRT_QK_NORM_NONE,
        QkNorm::PerHead => attnrt_qk_norm::ATTNRT_QK_NORM_PER_HEAD,
        QkNorm::Full => attnrt_qk_norm::ATTNRT_QK_NORM_FULL,
    } as u32;
    c.rmsnorm_eps = cfg.rmsnorm_eps;
    c.sliding_window = cfg.sliding_window.map_or(-1, |w| w as i64);
    if let Some(r) = cfg.rope() {
        c.rope = 1;
        c.rope_theta = r.theta;
        c.rope_convention = match r.convention {
            RopeConvention::Interleaved => {
                attnrt_rope_convention::ATTNRT_ROPE_CONVENTION_INTERLEAVED
            }
            RopeConvention::HalfSplit => attnrt_rope_convention::ATTNRT_ROPE_CONVENTION_HALF_SPLIT,
        } as u32;
        match r.scaling {
            RopeScaling::None => {
                c.rope_scaling = attnrt_rope_scaling::ATTNRT_ROPE_SCALING_NONE as u32
            }
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                c.rope_scaling = attnrt_rope_scaling::ATTNRT_ROPE_SCALING_LLAMA3 as u32;
                c.rope_factor = factor;
                c.rope_low_freq_factor = low_freq_factor;
                c.rope_high_freq_factor = high_freq_factor;
                c.rope_original_max_position_embeddings = original_max_position_embeddings;
            }
            RopeScaling::Yarn {
                factor,
                original_max_position_embeddings,
                attention_factor,
                beta_fast,
                beta_slow,
            } => {
                c.rope_scaling = attnrt_rope_scaling::ATTNRT_ROPE_SCALING_YARN as u32;
                c.rope_factor = factor;
                c.rope_original_max_position_embeddings = original_max_position_embeddings;
                c.rope_attention_factor = attention_factor;
                c.rope_beta_fast = beta_fast;
                c.rope_beta_slow = beta_slow;
            }
        }
    }
    c
}

/// An absent tensor.
pub fn absent() -> attnrt_tensor {
    attnrt_tensor {
        data: ptr::null(),
        len: 0,
        dtype: 0,
    }
}

/// A C view of a runtime tensor (borrowed from the fixture).
pub fn c_tensor(t: Option<&Tensor<'_>>) -> attnrt_tensor {
    match t {
        None => absent(),
        Some(Tensor::F32(s)) => attnrt_tensor {
            data: s.as_ptr().cast(),
            len: s.len(),
            dtype: attnrt_dtype::ATTNRT_DTYPE_F32 as u32,
        },
        Some(Tensor::F16(s)) => attnrt_tensor {
            data: s.as_ptr().cast(),
            len: s.len(),
            dtype: attnrt_dtype::ATTNRT_DTYPE_F16 as u32,
        },
        Some(Tensor::Bf16(s)) => attnrt_tensor {
            data: s.as_ptr().cast(),
            len: s.len(),
            dtype: attnrt_dtype::ATTNRT_DTYPE_BF16 as u32,
        },
    }
}

/// The C weights of a fixture (views into the fixture's tensors).
pub fn c_weights(f: &Fixture) -> attnrt_weights {
    c_layer_weights(&f.file.weights(&f.cfg).unwrap())
}

/// The C view of borrowed layer weights (the tensors stay owned by whoever owns `w`'s data).
pub fn c_layer_weights(w: &LayerWeights<'_>) -> attnrt_weights {
    attnrt_weights {
        wq: c_tensor(Some(&w.wq)),
        wk: c_tensor(Some(&w.wk)),
        wv: c_tensor(Some(&w.wv)),
        wo: c_tensor(Some(&w.wo)),
        bq: c_tensor(w.bq.as_ref()),
        bk: c_tensor(w.bk.as_ref()),
        bv: c_tensor(w.bv.as_ref()),
        bo: c_tensor(w.bo.as_ref()),
        q_norm: c_tensor(w.q_norm.as_ref()),
        k_norm: c_tensor(w.k_norm.as_ref()),
    }
}

/// A layer handle over random weights (kept alive beside it) for `cfg`.
pub struct RandomLayer {
    /// The configuration the handle was made with.
    pub cfg: Config,
    _w: OwnedWeights,
    /// The handle.
    pub layer: LayerHandle,
}

impl RandomLayer {
    /// Random weights from `seed` and the handle over them.
    pub fn new(cfg: Config, seed: u64) -> RandomLayer {
        let w = OwnedWeights::random(&cfg, &mut Rng(seed));
        let layer = LayerHandle::new(&c_config(&cfg), &c_layer_weights(&w.view(&cfg)));
        RandomLayer { cfg, _w: w, layer }
    }
}

/// An owned layer handle, freed on drop.
pub struct LayerHandle(pub *mut attnrt_layer);

// SAFETY: the ABI documents the handle as immutable and usable from many threads at once.
unsafe impl Send for LayerHandle {}
// SAFETY: as above.
unsafe impl Sync for LayerHandle {}

impl LayerHandle {
    /// `attnrt_layer_new`, asserting success.
    pub fn new(cfg: &attnrt_config, w: &attnrt_weights) -> LayerHandle {
        LayerHandle::try_new(cfg, w).unwrap_or_else(|s| panic!("{s:?}: {}", last_error()))
    }

    /// `attnrt_layer_new`.
    pub fn try_new(cfg: &attnrt_config, w: &attnrt_weights) -> Result<LayerHandle, attnrt_status> {
        let mut out: *mut attnrt_layer = ptr::null_mut();
        // SAFETY: valid pointers; the tensors are valid for their lengths.
        let st = unsafe { attnrt_layer_new(cfg, w, &mut out) };
        if st == attnrt_status::ATTNRT_STATUS_OK {
            assert!(!out.is_null());
            Ok(LayerHandle(out))
        } else {
            assert!(out.is_null(), "out written on error");
            Err(st)
        }
    }

    /// `attnrt_workspace_size` for calls with `num_threads`.
    pub fn workspace_size(&self, batch: usize, seq_len: usize, num_threads: usize) -> usize {
        let mut n = 0;
        // SAFETY: live handle, valid out pointer.
        let st = unsafe { attnrt_workspace_size(self.0, batch, seq_len, num_threads, &mut n) };
        assert_eq!(st, attnrt_status::ATTNRT_STATUS_OK, "{}", last_error());
        n
    }
}

impl Drop for LayerHandle {
    fn drop(&mut self) {
        // SAFETY: a live handle, freed once.
        unsafe { attnrt_layer_free(self.0) };
    }
}

/// The owned buffers of one forward call of a fixture.
pub struct CallBuffers {
    /// Activations.
    pub x: Vec<f32>,
    /// Batch rows.
    pub batch: usize,
    /// Tokens per row.
    pub seq_len: usize,
    /// Padding lengths.
    pub seq_lens: Option<Vec<i32>>,
    /// Document ids.
    pub document_ids: Option<Vec<i32>>,
    /// Varlen boundaries.
    pub cu_seqlens: Option<Vec<i32>>,
    /// Longest segment, -1 when absent.
    pub max_seqlen: i32,
    /// Positions.
    pub position_ids: Option<Vec<i32>>,
    /// Caller cos/sin table.
    pub freqs_cis: Option<Vec<f32>>,
    /// Workspace.
    pub workspace: Vec<f32>,
    /// Output.
    pub out: Vec<f32>,
    /// `attnrt_forward_args::num_threads` (the workspace is sized for it).
    pub num_threads: usize,
}

/// The sentinel the output is filled with before a call that must fail.
pub const SENTINEL: f32 = -1234.5678;

impl CallBuffers {
    /// The buffers of a fixture's call, with no caller table (the layer builds it), one
    /// thread, a workspace of `attnrt_workspace_size` and an output filled with [`SENTINEL`].
    pub fn of(f: &Fixture, layer: &LayerHandle) -> CallBuffers {
        CallBuffers::with_threads(f, layer, 1)
    }

    /// As [`CallBuffers::of`], for a call with `num_threads` (workspace sized for it).
    pub fn with_threads(f: &Fixture, layer: &LayerHandle, num_threads: usize) -> CallBuffers {
        let (mask, pos) = f.inputs.mask(&f.file).unwrap();
        let (b, t) = (f.inputs.batch, f.inputs.seq_len);
        CallBuffers {
            x: f.inputs.x.clone(),
            batch: b,
            seq_len: t,
            seq_lens: mask.seq_lens.map(<[i32]>::to_vec),
            document_ids: mask.document_ids.map(<[i32]>::to_vec),
            cu_seqlens: mask.cu_seqlens.map(<[i32]>::to_vec),
            max_seqlen: mask.max_seqlen.unwrap_or(-1),
            position_ids: pos.map(<[i32]>::to_vec),
            freqs_cis: None,
            workspace: vec![0.0; layer.workspace_size(b, t, num_threads)],
            out: vec![SENTINEL; f.expected.len()],
            num_threads,
        }
    }

    /// The C arguments pointing at these buffers.
    pub fn args(&mut self) -> attnrt_forward_args {
        let mut a = std::mem::MaybeUninit::<attnrt_forward_args>::uninit();
        // SAFETY: valid for one write.
        assert_eq!(
            unsafe { attnrt_forward_args_init(a.as_mut_ptr()) },
            attnrt_status::ATTNRT_STATUS_OK
        );
        // SAFETY: initialised by the successful call.
        let mut a = unsafe { a.assume_init() };
        fn opt<T>(v: &Option<Vec<T>>) -> (*const T, usize) {
            v.as_ref()
                .map_or((ptr::null(), 0), |v| (v.as_ptr(), v.len()))
        }
        a.x = self.x.as_ptr();
        a.x_len = self.x.len();
        a.batch = self.batch;
        a.seq_len = self.seq_len;
        (a.seq_lens, a.seq_lens_len) = opt(&self.seq_lens);
        (a.document_ids, a.document_ids_len) = opt(&self.document_ids);
        (a.cu_seqlens, a.cu_seqlens_len) = opt(&self.cu_seqlens);
        a.max_seqlen = self.max_seqlen;
        (a.position_ids, a.position_ids_len) = opt(&self.position_ids);
        (a.freqs_cis, a.freqs_cis_len) = opt(&self.freqs_cis);
        a.workspace = self.workspace.as_mut_ptr();
        a.workspace_len = self.workspace.len();
        a.out = self.out.as_mut_ptr();
        a.out_len = self.out.len();
        a.num_threads = self.num_threads;
        a
    }
}

/// `attnrt_forward` with `args`, returning the status and the backend reported (as u32;
/// `u32::MAX` when not written).
pub fn forward(layer: &LayerHandle, args: &attnrt_forward_args) -> (attnrt_status, u32) {
    let mut ran = std::mem::MaybeUninit::<u32>::new(u32::MAX);
    // SAFETY: live handle; every buffer in args is valid for its length; `attnrt_backend` is a
    // `repr(u32)` enum, so a u32 slot holds it.
    let st = unsafe { attnrt_forward(layer.0, args, ran.as_mut_ptr().cast::<attnrt_backend>()) };
    // SAFETY: initialised above, possibly overwritten with a valid enum value.
    (st, unsafe { ran.assume_init() })
}

/// The name of a status, through `attnrt_status_name`.
pub fn status_name(s: u32) -> Option<String> {
    let p = attnrt_status_name(s);
    // SAFETY: NULL or a static NUL-terminated string.
    (!p.is_null()).then(|| unsafe { CStr::from_ptr(p) }.to_str().unwrap().to_owned())
}

/// One sequence of a cached call: cached length, new tokens, block table.
#[derive(Clone)]
pub struct Seq {
    /// Tokens already in the cache.
    pub cached: usize,
    /// New tokens of the call.
    pub new: usize,
    /// Block table.
    pub blocks: Vec<u32>,
}

/// The C view of `seqs` (borrowing their block tables).
pub fn c_seqs(seqs: &[Seq]) -> Vec<attnrt_sequence> {
    seqs.iter()
        .map(|s| attnrt_sequence {
            cached: s.cached,
            new_tokens: s.new,
            blocks: if s.blocks.is_empty() {
                ptr::null()
            } else {
                s.blocks.as_ptr()
            },
            n_blocks: s.blocks.len(),
        })
        .collect()
}

/// One call of a two-sequence plan: sequence `s` has `done[s]` tokens cached and `step[s]`
/// new ones (rows of `xs[s]`, `c` wide), in the blocks of `tables[s]`. Returns the call's
/// sequences and its rows of x.
pub fn plan_step(
    tables: &[Vec<u32>; 2],
    xs: &[Vec<f32>; 2],
    done: &[usize; 2],
    step: &[usize; 2],
    c: usize,
) -> (Vec<Seq>, Vec<f32>) {
    let seqs = (0..2)
        .map(|s| Seq {
            cached: done[s],
            new: step[s],
            blocks: tables[s].clone(),
        })
        .collect();
    let mut x = Vec::new();
    for s in 0..2 {
        x.extend_from_slice(&xs[s][done[s] * c..(done[s] + step[s]) * c]);
    }
    (seqs, x)
}
