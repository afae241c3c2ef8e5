//! Every invalid input to the Rust API is an error naming the offending value, and the output
//! buffer keeps its previous contents bit for bit.

use attnrt::{
    reference_workspace_len, rope, Config, Error, Inputs, Layer, MaskInputs, QkNorm, Rope,
    RopeTable, Tensor,
};
use attnrt_tests::{OwnedWeights, Rng};

const SENTINEL: f32 = -1234.5;

fn cfg() -> Config {
    Config::new(16, 4)
        .with_kv_heads(2)
        .with_rope(Rope::DEFAULT)
        .with_qk_norm(QkNorm::PerHead)
}

/// Runs a call that must fail, and checks the output is untouched.
fn expect_err(layer: &Layer<'_>, inputs: Inputs<'_>, ws_len: usize, out_len: usize) -> Error {
    let mut ws = vec![0.0; ws_len];
    let mut out = vec![SENTINEL; out_len];
    let err = layer
        .forward_reference(&inputs, &mut ws, &mut out)
        .unwrap_err();
    assert!(
        out.iter().all(|v| v.to_bits() == SENTINEL.to_bits()),
        "{err}: output written"
    );
    assert!(!err.to_string().is_empty());
    err
}

#[test]
fn every_invalid_call_is_rejected_with_output_untouched() {
    let cfg = cfg();
    let w = OwnedWeights::random(&cfg, &mut Rng(7));
    let layer = Layer::new(cfg, w.view(&cfg)).unwrap();
    let (b, t, c) = (2usize, 5usize, cfg.n_embd);
    let x = vec![0.1f32; b * t * c];
    let mut tab = vec![0.0; rope::table_len(8, cfg.head_dim)];
    rope::build_table(cfg.rope().unwrap(), cfg.head_dim, &mut tab).unwrap();
    let table = RopeTable::new(&tab, cfg.head_dim).unwrap();
    let short_tab = RopeTable::new(&tab[..4 * cfg.head_dim], cfg.head_dim).unwrap();
    let ok = Inputs {
        rope_table: Some(table),
        ..Inputs::new(&x, b, t)
    };
    let ws = reference_workspace_len(&cfg, t);
    let n = b * t * c;
    let no_mask = MaskInputs::default();
    let pos_big = [0, 1, 2, 3, 8, 0, 1, 2, 3, 4];
    let pos_neg = [0, 1, 2, 3, -1, 0, 1, 2, 3, 4];
    let cases: Vec<(&str, Inputs<'_>, usize, usize, &str)> = vec![
        ("short x", Inputs { x: &x[1..], ..ok }, ws, n, "x"),
        ("short out", ok, ws, n - 1, "out"),
        ("long out", ok, ws, n + 1, "out"),
        ("short workspace", ok, ws - 1, n, "workspace"),
        (
            "seq_lens > T",
            Inputs {
                mask: MaskInputs {
                    seq_lens: Some(&[5, 6]),
                    ..no_mask
                },
                ..ok
            },
            ws,
            n,
            "seq_lens",
        ),
        (
            "negative seq_lens",
            Inputs {
                mask: MaskInputs {
                    seq_lens: Some(&[-1, 2]),
                    ..no_mask
                },
                ..ok
            },
            ws,
            n,
            "seq_lens",
        ),
        (
            "seq_lens length",
            Inputs {
                mask: MaskInputs {
                    seq_lens: Some(&[5]),
                    ..no_mask
                },
                ..ok
            },
            ws,
            n,
            "seq_lens",
        ),
        (
            "document_ids length",
            Inputs {
                mask: MaskInputs {
                    document_ids: Some(&[0; 9]),
                    ..no_mask
                },
                ..ok
            },
            ws,
            n,
            "document_ids",
        ),
        (
            "varlen with batch 2",
            Inputs {
                mask: MaskInputs {
                    cu_seqlens: Some(&[0, 5]),
                    ..no_mask
                },
                ..ok
            },
            ws,
            n,
            "cu_seqlens",
        ),
        (
            "position_ids length",
            Inputs {
                position_ids: Some(&[0; 9]),
                ..ok
            },
            ws,
            n,
            "position_ids",
        ),
        (
            "negative position",
            Inputs {
                position_ids: Some(&pos_neg),
                ..ok
            },
            ws,
            n,
            "position_ids",
        ),
        (
            "position past table",
            Inputs {
                position_ids: Some(&pos_big),
                ..ok
            },
            ws,
            n,
            "freqs_cis",
        ),
        (
            "T past table",
            Inputs {
                rope_table: Some(short_tab),
                ..ok
            },
            ws,
            n,
            "freqs_cis",
        ),
        (
            "missing table",
            Inputs {
                rope_table: None,
                ..ok
            },
            ws,
            n,
            "freqs_cis",
        ),
    ];
    for (what, inputs, ws_len, out_len, name) in cases {
        let err = expect_err(&layer, inputs, ws_len, out_len);
        let named = match err {
            Error::InputShape { name, .. } | Error::InputValue { name, .. } => name,
            Error::PositionOutOfTable { .. } => "freqs_cis",
            Error::Workspace { .. } => "workspace",
            other => panic!("{what}: unexpected {other:?}"),
        };
        assert!(
            named.starts_with(name),
            "{what}: error names {named}, expected {name}"
        );
    }
}

#[test]
fn varlen_inputs_are_checked() {
    let cfg = cfg();
    let w = OwnedWeights::random(&cfg, &mut Rng(7));
    let layer = Layer::new(cfg, w.view(&cfg)).unwrap();
    let (t, c) = (6usize, cfg.n_embd);
    let x = vec![0.1f32; t * c];
    let mut tab = vec![0.0; rope::table_len(8, cfg.head_dim)];
    rope::build_table(cfg.rope().unwrap(), cfg.head_dim, &mut tab).unwrap();
    let table = RopeTable::new(&tab, cfg.head_dim).unwrap();
    let ok = Inputs {
        rope_table: Some(table),
        ..Inputs::new(&x, 1, t)
    };
    let ws = reference_workspace_len(&cfg, t);
    for (cu, max, rule) in [
        (&[1, 6][..], None, "must start at 0"),
        (&[0, 5][..], None, "must end at T"),
        (&[0, 4, 3, 6][..], None, "must be non-decreasing"),
        (
            &[0, 2, 6][..],
            Some(3),
            "is below the longest cu_seqlens segment",
        ),
        (&[][..], None, ""),
    ] {
        let inputs = Inputs {
            mask: MaskInputs {
                cu_seqlens: Some(cu),
                max_seqlen: max,
                ..MaskInputs::default()
            },
            ..ok
        };
        match expect_err(&layer, inputs, ws, t * c) {
            Error::InputValue { rule: r, .. } => assert_eq!(r, rule, "{cu:?}"),
            Error::InputShape {
                name: "cu_seqlens", ..
            } => assert!(cu.is_empty()),
            other => panic!("{cu:?}: {other:?}"),
        }
    }
}

#[test]
fn freqs_for_a_layer_without_rope_is_rejected() {
    let cfg = Config::new(16, 4);
    let w = OwnedWeights::random(&cfg, &mut Rng(3));
    let layer = Layer::new(cfg, w.view(&cfg)).unwrap();
    let x = vec![0.0f32; 2 * 16];
    let tab = vec![0.0f32; 4 * 4];
    let inputs = Inputs {
        rope_table: Some(RopeTable::new(&tab, 4).unwrap()),
        ..Inputs::new(&x, 1, 2)
    };
    assert!(matches!(
        expect_err(&layer, inputs, reference_workspace_len(&cfg, 2), 32),
        Error::Unsupported { .. }
    ));
}

#[test]
fn weights_are_checked_against_the_config() {
    let cfg = cfg();
    let w = OwnedWeights::random(&cfg, &mut Rng(5));
    let good = w.view(&cfg);
    let short = &w.wq[1..];
    let bad = [
        (
            attnrt::LayerWeights {
                wq: Tensor::F32(short),
                ..good
            },
            "wq",
        ),
        (
            attnrt::LayerWeights {
                q_norm: None,
                ..good
            },
            "q_norm",
        ),
        (
            attnrt::LayerWeights {
                bo: Some(Tensor::F32(&w.b[3])),
                ..good
            },
            "bo",
        ),
        (
            attnrt::LayerWeights {
                k_norm: Some(Tensor::F32(&w.wq)),
                ..good
            },
            "k_norm",
        ),
    ];
    for (weights, name) in bad {
        let err = Layer::new(cfg, weights).unwrap_err();
        let named = match err {
            Error::WeightShape { name, .. } | Error::WeightPresence { name, .. } => name,
            other => panic!("{other:?}"),
        };
        assert_eq!(named, name);
    }
    let bytes = [0u8; 7];
    assert!(matches!(
        Tensor::from_bytes("wq", attnrt::DType::F32, &bytes),
        Err(Error::Bytes {
            name: "wq",
            len: 7,
            elem_size: 4
        })
    ));
}

#[test]
fn empty_sequences_are_valid() {
    let cfg = cfg();
    let w = OwnedWeights::random(&cfg, &mut Rng(5));
    let layer = Layer::new(cfg, w.view(&cfg)).unwrap();
    let tab = vec![0.0f32; cfg.head_dim];
    let inputs = Inputs {
        rope_table: Some(RopeTable::new(&tab, cfg.head_dim).unwrap()),
        ..Inputs::new(&[], 3, 0)
    };
    let mut out: [f32; 0] = [];
    assert!(layer.forward_reference(&inputs, &mut [], &mut out).is_ok());
}
