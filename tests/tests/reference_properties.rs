//! Equivalences a user relies on, as property tests of the scalar reference (the reference
//! module's own tests check the same ones).

use attnrt::{
    reference_workspace_len, rope, Config, Inputs, Layer, MaskInputs, QkNorm, Rope, RopeTable,
};
use attnrt_tests::{max_abs_diff, OwnedWeights, Rng};
use proptest::prelude::*;

/// Runs the reference; the table covers positions `0..max_pos`.
fn run(layer: &Layer<'_>, inputs: Inputs<'_>) -> Vec<f32> {
    let cfg = layer.config();
    let mut ws = vec![0.0; reference_workspace_len(cfg, inputs.seq_len)];
    let mut y = vec![f32::NAN; inputs.x.len()];
    layer.forward_reference(&inputs, &mut ws, &mut y).unwrap();
    y
}

fn config_strategy() -> impl Strategy<Value = Config> {
    (
        1usize..=4,
        1usize..=3,
        prop::sample::select(vec![2usize, 4, 6, 8]),
        0usize..3,
        any::<bool>(),
    )
        .prop_map(|(kv, r, d, norm, half)| {
            let h = kv * r;
            let rope = Rope {
                convention: if half {
                    attnrt::RopeConvention::HalfSplit
                } else {
                    attnrt::RopeConvention::Interleaved
                },
                ..Rope::DEFAULT
            };
            Config::new(h * 4, h)
                .with_kv_heads(kv)
                .with_head_dim(d)
                .with_qk_norm([QkNorm::None, QkNorm::PerHead, QkNorm::Full][norm])
                .with_bias(attnrt::BiasFlags::ALL)
                .with_rope(rope)
        })
}

fn table(cfg: &Config, max_pos: usize) -> Vec<f32> {
    let mut t = vec![0.0; rope::table_len(max_pos, cfg.head_dim)];
    rope::build_table(cfg.rope().unwrap(), cfg.head_dim, &mut t).unwrap();
    t
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// varlen with restarting positions == document ids with restarting positions == each
    /// document alone in a padded batch row.
    #[test]
    fn varlen_equals_documents_equals_padded_batch(
        cfg in config_strategy(),
        lens in prop::collection::vec(0usize..6, 1..5),
        window in prop::option::of(1usize..5),
        seed in any::<u64>(),
    ) {
        let cfg = Config { sliding_window: window, ..cfg };
        let mut rng = Rng(seed | 1);
        let w = OwnedWeights::random(&cfg, &mut rng);
        let layer = Layer::new(cfg, w.view(&cfg)).unwrap();
        let (c, t) = (cfg.n_embd, lens.iter().sum::<usize>());
        let x = rng.vec(t * c, 1.0);
        let mut cu = vec![0i32];
        let (mut docs, mut pos) = (vec![], vec![]);
        for (d, &l) in lens.iter().enumerate() {
            cu.push(cu.last().unwrap() + l as i32);
            docs.extend(std::iter::repeat_n(d as i32, l));
            pos.extend(0..l as i32);
        }
        let longest = *lens.iter().max().unwrap();
        let tab = table(&cfg, longest.max(1));
        let rt = Some(RopeTable::new(&tab, cfg.head_dim).unwrap());
        let packed = |mask: MaskInputs<'_>| run(&layer, Inputs {
            x: &x, batch: 1, seq_len: t, mask, position_ids: Some(&pos), rope_table: rt,
        });
        let varlen = packed(MaskInputs { cu_seqlens: Some(&cu), ..MaskInputs::default() });
        let by_docs = packed(MaskInputs { document_ids: Some(&docs), ..MaskInputs::default() });
        prop_assert!(max_abs_diff(&varlen, &by_docs) <= 1e-6);

        // One document per row, padded to the longest.
        let b = lens.len();
        let mut xp = vec![0.5f32; b * longest * c];
        for (d, &l) in lens.iter().enumerate() {
            let src = &x[cu[d] as usize * c..(cu[d] as usize + l) * c];
            xp[d * longest * c..d * longest * c + l * c].copy_from_slice(src);
        }
        let seq_lens: Vec<i32> = lens.iter().map(|&l| l as i32).collect();
        let padded = run(&layer, Inputs {
            x: &xp, batch: b, seq_len: longest,
            mask: MaskInputs { seq_lens: Some(&seq_lens), ..MaskInputs::default() },
            position_ids: None, rope_table: rt,
        });
        for (d, &l) in lens.iter().enumerate() {
            let got = &padded[d * longest * c..d * longest * c + l * c];
            let want = &varlen[cu[d] as usize * c..(cu[d] as usize + l) * c];
            prop_assert!(max_abs_diff(got, want) <= 1e-6, "document {}", d);
        }
    }

    /// GQA equals MHA whose key/value heads are the GQA heads repeated for each query head.
    #[test]
    fn gqa_equals_mha_with_repeated_kv_heads(cfg in config_strategy(), t in 0usize..9, seed in any::<u64>()) {
        let mut rng = Rng(seed | 1);
        let w = OwnedWeights::random(&cfg, &mut rng);
        let (d, r, c) = (cfg.head_dim, cfg.group_size(), cfg.n_embd);
        let mha_cfg = Config { n_kv_head: cfg.n_head, ..cfg };
        // Per-head norm weights are shared by all heads; full-row k norm weights repeat too.
        let repeat = |m: &[f32], rows_per_head: usize| -> Vec<f32> {
            m.chunks(rows_per_head).flat_map(|h| std::iter::repeat_n(h, r).flatten().copied()).collect()
        };
        let mut mw = OwnedWeights::random(&mha_cfg, &mut Rng(1));
        mw.wq.clone_from(&w.wq);
        mw.wk = repeat(&w.wk, d * c);
        mw.wv = repeat(&w.wv, d * c);
        mw.wo.clone_from(&w.wo);
        mw.b = [w.b[0].clone(), repeat(&w.b[1], d), repeat(&w.b[2], d), w.b[3].clone()];
        mw.norm = [w.norm[0].clone(), if cfg.qk_norm == QkNorm::Full { repeat(&w.norm[1], d) } else { w.norm[1].clone() }];
        if cfg.qk_norm == QkNorm::Full && r > 1 {
            // Full k-norm takes the mean over the whole k row, which repetition does not keep.
            return Ok(());
        }
        let x = rng.vec(t * c, 1.0);
        let tab = table(&cfg, t.max(1));
        let inputs = Inputs { rope_table: Some(RopeTable::new(&tab, d).unwrap()), ..Inputs::new(&x, 1, t) };
        let gqa = run(&Layer::new(cfg, w.view(&cfg)).unwrap(), inputs);
        let mha = run(&Layer::new(mha_cfg, mw.view(&mha_cfg)).unwrap(), inputs);
        prop_assert!(max_abs_diff(&gqa, &mha) <= 1e-5);
    }

    /// A window at least as long as the sequence changes nothing.
    #[test]
    fn window_at_least_t_changes_nothing(cfg in config_strategy(), t in 0usize..10, extra in 0usize..3, seed in any::<u64>()) {
        let mut rng = Rng(seed | 1);
        let w = OwnedWeights::random(&cfg, &mut rng);
        let x = rng.vec(t * cfg.n_embd, 1.0);
        let tab = table(&cfg, t.max(1));
        let inputs = Inputs { rope_table: Some(RopeTable::new(&tab, cfg.head_dim).unwrap()), ..Inputs::new(&x, 1, t) };
        let plain = run(&Layer::new(cfg, w.view(&cfg)).unwrap(), inputs);
        let wcfg = cfg.with_sliding_window(t.max(1) + extra);
        let windowed = run(&Layer::new(wcfg, w.view(&wcfg)).unwrap(), inputs);
        prop_assert_eq!(plain, windowed);
    }

    /// A padded row's output equals `bo` (0 without an output bias), exactly.
    #[test]
    fn padded_rows_hold_bo(cfg in config_strategy(), t in 1usize..8, len in 0usize..8, with_bo in any::<bool>(), seed in any::<u64>()) {
        let len = len.min(t);
        let cfg = Config { bias: attnrt::BiasFlags { o: with_bo, ..cfg.bias }, ..cfg };
        let mut rng = Rng(seed | 1);
        let w = OwnedWeights::random(&cfg, &mut rng);
        let c = cfg.n_embd;
        let x = rng.vec(t * c, 1.0);
        let tab = table(&cfg, t);
        let lens = [len as i32];
        let inputs = Inputs {
            mask: MaskInputs { seq_lens: Some(&lens), ..MaskInputs::default() },
            rope_table: Some(RopeTable::new(&tab, cfg.head_dim).unwrap()),
            ..Inputs::new(&x, 1, t)
        };
        let y = run(&Layer::new(cfg, w.view(&cfg)).unwrap(), inputs);
        for row in y[len * c..].chunks(c) {
            if with_bo {
                prop_assert_eq!(row, &w.b[3][..]);
            } else {
                prop_assert!(row.iter().all(|&v| v == 0.0));
            }
        }
    }
}
