//! Host-side tests of the plan, no GPU needed.

use attnrt::mask::MaskSpec;
use attnrt::{Config, MaskInputs};
use attnrt_simd::{TileClass, Visibility};

use super::*;

fn rng(seed: &mut u64) -> u64 {
    *seed ^= *seed << 13;
    *seed ^= *seed >> 7;
    *seed ^= *seed << 17;
    *seed
}

#[test]
fn capability_says_which_path() {
    assert_eq!(
        capability(Precision::F32, 80, 4).unwrap(),
        AttnPath::CudaCoresF32
    );
    assert_eq!(
        capability(Precision::F32, 3, 1).unwrap(),
        AttnPath::CudaCoresF32
    );
    let tc = capability(Precision::Bf16, 128, 4).unwrap();
    assert!(matches!(
        tc,
        AttnPath::TensorCore {
            padded_head_dim: 128,
            tuned: true,
            ..
        }
    ));
    let generic = capability(Precision::F16, 80, 4).unwrap();
    assert!(matches!(
        generic,
        AttnPath::TensorCore {
            padded_head_dim: 96,
            tuned: false,
            ..
        }
    ));
    assert!(capability(Precision::Bf16, 81, 1).is_err());
    assert!(capability(Precision::Bf16, 258, 1).is_err());
    assert!(capability(Precision::F32, 0, 1).is_err());
    assert!(capability(Precision::Bf16, 64, 65).is_err());
}

#[test]
fn launch_geometry() {
    let cfg = Config::new(4096, 32).with_kv_heads(8).with_head_dim(128);
    let path = capability(Precision::Bf16, 128, 4).unwrap();
    let l = attention_launch(path, &cfg, 2, 1000).unwrap();
    assert_eq!(l.q_per_cta, 16); // 64 rows / 4 heads per KV head
    assert_eq!(l.grid, (1000usize.div_ceil(16) as u32, 8, 2));
    assert_eq!(l.block, MMA_THREADS);
    assert!(l.kernel.starts_with("attn_mma_bf16_p128_m1_n"));
    assert!(l.smem as usize <= 227 * 1024);
    let f = attention_launch(AttnPath::CudaCoresF32, &cfg, 1, 7).unwrap();
    assert_eq!(
        (f.q_per_cta, f.grid, f.kernel.as_str()),
        (8, (1, 8, 1), "attn_f32")
    );
    assert_eq!(f.smem, f32_smem_bytes(32, 128));
    // Every supported tensor-core size fits the H100/H200 opt-in shared memory (227 KiB).
    for dp in (32..=256).step_by(32) {
        assert!(
            mma_smem_bytes(dp, 1, mma_key_tile(dp)) as usize <= 227 * 1024,
            "{dp}"
        );
    }
    assert!(f32_smem_bytes(64, 256) as usize <= 227 * 1024);
    let too_many = Config::new(70000, 70000);
    assert!(attention_launch(AttnPath::CudaCoresF32, &too_many, 1, 1).is_err());
}

#[test]
fn workspace_sizes() {
    let cfg = Config::new(4096, 32).with_kv_heads(8);
    let w = Workspace::new(&cfg, Precision::Bf16, 1, 4096).unwrap();
    assert_eq!(w.x, 4096 * 4096 * 4);
    assert_eq!(w.qkv, 4096 * (4096 + 2 * 1024) * 4);
    assert_eq!(w.q, 4096 * 4096 * 2);
    assert_eq!(w.kv, 4096 * 1024 * 2);
    assert!(w.total() > w.qkv);
    let f = Workspace::new(&cfg, Precision::F32, 1, 4096).unwrap();
    assert_eq!(f.x_store, 0);
    assert!(Workspace::new(&cfg, Precision::F32, usize::MAX, 2).is_none());
}

#[test]
fn merged_groups_equal_iff_same_document_and_segment() {
    let mut seed = 0x1234_5678u64;
    for _ in 0..200 {
        let t = 1 + (rng(&mut seed) % 90) as usize;
        let docs: Vec<i32> = (0..t).map(|_| (rng(&mut seed) % 4) as i32 - 1).collect();
        let mut cu: Vec<i32> = (0..(rng(&mut seed) % 4))
            .map(|_| (rng(&mut seed) % (t as u64 + 1)) as i32)
            .collect();
        cu.push(0);
        cu.push(t as i32);
        cu.sort();
        let seg = |i: usize| cu[1..].partition_point(|&b| b as usize <= i);
        let mut out = vec![0; t];
        let mut scratch = vec![(0, 0, 0); t];
        for (d, c) in [(true, false), (false, true), (true, true)] {
            assert!(merge_groups(
                d.then_some(&docs[..]),
                c.then_some(&cu[..]),
                1,
                t,
                &mut out,
                &mut scratch
            ));
            for i in 0..t {
                for j in 0..t {
                    let same = (!d || docs[i] == docs[j]) && (!c || seg(i) == seg(j));
                    assert_eq!(out[i] == out[j], same, "t={t} i={i} j={j} docs={d} cu={c}");
                    if c && seg(i) < seg(j) {
                        assert!(out[i] < out[j], "segment order kept");
                    }
                    // The kernels start a query's key loop at its id: nothing earlier matches.
                    if j < out[i] as usize {
                        assert_ne!(out[i], out[j], "t={t} i={i} j={j}: key before the id");
                    }
                }
            }
        }
        assert!(!merge_groups(None, None, 1, t, &mut out, &mut scratch));
    }
}

/// The kernels' classifier (mirrored here) is sound against the runtime's element rule, and
/// at least as tight as the runtime's own classifier (never partial where it says all/none).
#[test]
fn tile_classification_agrees_with_the_runtime_mask() {
    let mut seed = 0xdead_beefu64;
    for case in 0..300 {
        let t = 1 + (rng(&mut seed) % 130) as usize;
        let window = (case % 3 == 0).then(|| 1 + (rng(&mut seed) % 40) as usize);
        let len = if case % 2 == 0 {
            t
        } else {
            (rng(&mut seed) % (t as u64 + 1)) as usize
        };
        let mut docs: Vec<i32> = (0..t).map(|_| (rng(&mut seed) % 3) as i32).collect();
        if case % 4 < 2 {
            docs.sort();
        }
        let use_docs = case % 5 != 0;
        let mut cu: Vec<i32> = vec![0, (t / 3) as i32, (t / 3) as i32, t as i32];
        cu.sort();
        let use_cu = case % 7 == 0;
        let lens = [len as i32];
        let inputs = MaskInputs {
            seq_lens: Some(&lens),
            document_ids: use_docs.then_some(&docs[..]),
            cu_seqlens: use_cu.then_some(&cu[..]),
            max_seqlen: None,
        };
        let spec = MaskSpec::new(window, 1, t, &inputs).unwrap();
        let row = spec.row(0);
        let mut groups = vec![0; t];
        let mut scratch = vec![(0, 0, 0); t];
        let has = merge_groups(
            inputs.document_ids,
            inputs.cu_seqlens,
            1,
            t,
            &mut groups,
            &mut scratch,
        );
        let ng = t.div_ceil(GROUP_GRANULE);
        let (mut gmin, mut gmax) = (vec![0; ng], vec![0; ng]);
        if has {
            granule_ranges(&groups, 1, t, &mut gmin, &mut gmax);
        }
        let dev = DeviceMaskRow {
            seq_len: t,
            window: window.unwrap_or(usize::MAX),
            len,
            groups: has.then_some(&groups[..]),
            gmin: &gmin,
            gmax: &gmax,
        };
        for i in 0..t {
            for j in 0..t {
                assert_eq!(
                    dev.visible(i, j),
                    row.visible(i, j),
                    "case {case} ({i},{j})"
                );
            }
        }
        for (bq, bn) in [(16usize, 64usize), (8, 32), (64, 64), (5, 32)] {
            for q0 in (0..t).step_by(bq) {
                let q1 = (q0 + bq).min(t);
                for k0 in (0..t).step_by(bn) {
                    let c = dev.classify(q0, q1, k0, bn);
                    let vis: Vec<bool> = (q0..q1)
                        .flat_map(|i| (k0..(k0 + bn).min(t)).map(move |j| (i, j)))
                        .map(|(i, j)| row.visible(i, j))
                        .collect();
                    match c {
                        Tile::All => assert!(
                            vis.iter().all(|&v| v) && k0 + bn <= t,
                            "case {case}: all wrong at q{q0} k{k0}"
                        ),
                        Tile::None => assert!(!vis.iter().any(|&v| v), "case {case}: none wrong"),
                        Tile::Partial => {}
                    }
                    let k1 = (k0 + bn).min(t);
                    if k0 + bn <= t {
                        match row.classify(q0, q1, k0, k1) {
                            TileClass::All => assert_eq!(c, Tile::All, "case {case} q{q0} k{k0}"),
                            TileClass::None => assert_eq!(c, Tile::None, "case {case} q{q0} k{k0}"),
                            TileClass::Partial => {}
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn wgmma_only_on_sm90_for_head_dim_128() {
    let hopper = (9, 0);
    assert_eq!(
        capability_on(Precision::Bf16, 128, 4, hopper).unwrap(),
        AttnPath::Wgmma {
            dtype: Precision::Bf16
        }
    );
    // Other architectures, head dims, precisions and oversized groups keep the portable path.
    for (p, d, g, arch) in [
        (Precision::Bf16, 128, 4, (8, 0)),
        (Precision::Bf16, 128, 4, (10, 0)),
        (Precision::F16, 64, 4, hopper),
        (Precision::F32, 128, 4, hopper),
        (Precision::Bf16, 128, 129, hopper),
    ] {
        assert_eq!(
            capability_on(p, d, g, arch).ok(),
            capability(p, d, g).ok(),
            "{p:?} d={d} g={g} {arch:?}"
        );
    }
    assert!(capability_on(Precision::Bf16, 81, 1, hopper).is_err());
}

#[test]
fn wgmma_launch_packs_128_rows() {
    let cfg = Config::new(4096, 32).with_kv_heads(8).with_head_dim(128);
    let path = AttnPath::Wgmma {
        dtype: Precision::F16,
    };
    let l = attention_launch(path, &cfg, 2, 1000).unwrap();
    assert_eq!(l.kernel, "attn_wt_f16_c2_n128_k3v2q2");
    assert_eq!((l.block, l.q_per_cta), (384, 32));
    // Work items (query tile, KV head, batch row) along x.
    assert_eq!(l.grid, (1000usize.div_ceil(32) as u32 * 8 * 2, 1, 1));
    // 2 x Q (128 rows) + (3 K + 2 V stages) x 128 keys, 256 bytes a row, + 1024 alignment
    // slack + 14 mbarriers + 2 work-item slots of 11 ints.
    assert_eq!(
        l.smem,
        1024 + 2 * 128 * 256 + 5 * 128 * 256 + 14 * 8 + 2 * 44
    );
    assert!(l.smem <= 227 * 1024, "fits an H100/H200 CTA");
}

#[test]
fn decode_kernel_choice_names_and_shared_memory() {
    let t = DecodeTuning::default();
    let k = DecodeKernel::choose(Precision::Bf16, 128, 4, &t);
    assert_eq!(k.name(), "decode_tc_bf16_d128_w4_s2");
    assert_eq!(k.threads(), 128);
    assert_eq!(k.heads_per_cta(), 8);
    // 128 bytes of alignment slack, 4 warps x 2 stages x (K and V: 16 unpadded rows of 16
    // chunks of 16 bytes).
    assert_eq!(k.smem_bytes(), 128 + 4 * 2 * 2 * 16 * 16 * 16);
    // head_dim 96: rows of 12 chunks, padded to 13.
    let k96 = DecodeKernel::choose(Precision::Bf16, 96, 4, &t);
    assert_eq!(k96.smem_bytes(), 128 + 4 * 2 * 2 * 16 * 13 * 16);
    assert_eq!(
        DecodeKernel::choose(Precision::F16, 256, 2, &t).name(),
        "decode_tc_f16_d256_w4_s2"
    );
    // f32, head_dims without a tensor-core variant, and the override: CUDA cores.
    for (p, d, g, name) in [
        (Precision::F32, 128, 4, "decode_f32_l16_r4"),
        (Precision::Bf16, 80, 8, "decode_bf16_l16_r8"),
        (Precision::F16, 32, 1, "decode_f16_l8_r1"),
    ] {
        let k = DecodeKernel::choose(p, d, g, &t);
        assert_eq!(k.name(), name);
        assert_eq!(k.smem_bytes(), 0);
    }
    let cc = DecodeTuning {
        cuda_cores: true,
        ..t
    };
    assert_eq!(
        DecodeKernel::choose(Precision::Bf16, 128, 4, &cc).name(),
        "decode_bf16_l16_r4"
    );
    // Two stages always hold the epilogue's warp states (8 heads x head_dim f32 + max/sum);
    // rows are unpadded where their chunks are a multiple of 8, else one chunk longer.
    for (head_dim, stride) in [(64, 8), (96, 13), (128, 16), (256, 32)] {
        for warps in [2, 4, 8] {
            let k = DecodeKernel::TensorCore {
                dtype: Precision::Bf16,
                head_dim,
                warps,
                stages: 2,
            };
            assert!(k.smem_bytes() >= warps * 8 * (head_dim * 4 + 8));
            assert_eq!(k.smem_bytes(), 128 + warps * 2 * 2 * 16 * stride * 16);
        }
    }
}

#[test]
fn decode_splits_cover_the_waves_in_whole_tile_rounds() {
    let t = DecodeTuning::default();
    let k = DecodeKernel::choose(Precision::Bf16, 128, 4, &t);
    // One CTA per SM: 32 x 8192 keys, 8 KV heads, 132 SMs -> 15888 keys -> 15936: every
    // token is one split of 8192 keys.
    let s = k.split_keys(32 * 8192, 8, 132, 3, &t);
    assert_eq!(s, 15936);
    assert_eq!(k.item_keys(8192, s, &t), 8192);
    // A head split's shard: 4 KV heads -> 7944 -> 8000 keys: a token of 8192 keys stays one
    // item (rounded, not two of 4096).
    let s = k.split_keys(32 * 8192, 4, 132, 3, &t);
    assert_eq!(s, 8000);
    assert_eq!(k.item_keys(8192, s, &t), 8192);
    // 1 x 32768: 1986 -> 2048, sixteen splits per KV head.
    let s = k.split_keys(32768, 8, 132, 3, &t);
    assert_eq!(s, 2048);
    assert_eq!(32768usize.div_ceil(k.item_keys(32768, s, &t)), 16);
    // Small calls: one round of the CTA's tiles at least.
    assert_eq!(k.split_keys(100, 8, 132, 3, &t), 64);
    // The override wins.
    let o = DecodeTuning { split: 48, ..t };
    assert_eq!(k.split_keys(32 * 8192, 8, 132, 3, &o), 48);
    // CUDA cores: four waves of the resident CTAs, at least 256 keys, multiples of 64.
    let c = DecodeKernel::choose(Precision::F32, 128, 4, &t);
    assert_eq!(c.split_keys(100, 8, 132, 3, &t), 256);
    assert_eq!(c.split_keys(32 * 8192, 8, 132, 3, &t), 1344);
}

#[test]
fn decode_items_share_a_token_evenly() {
    let t = DecodeTuning::default();
    let k = DecodeKernel::choose(Precision::Bf16, 128, 4, &t);
    // 8192 keys at splits of about 3000: 2.7 -> three items of 2752, 2752 and 2688 keys.
    assert_eq!(k.item_keys(8192, 3000, &t), 2752);
    assert_eq!(8192usize.div_ceil(2752), 3);
    // At splits of about 4032: 2.03 -> two items of 4096.
    assert_eq!(k.item_keys(8192, 4032, &t), 4096);
    // Shorter than half a split: one item.
    assert_eq!(k.item_keys(1000, 4096, &t), 1024);
    // Never more items than ceil(len / split), each a whole round of 64 keys but the last.
    for len in [1usize, 63, 64, 65, 1000, 8192, 32768] {
        for split in [64usize, 256, 1000, 2048] {
            let step = k.item_keys(len, split, &t);
            assert_eq!(step % 64, 0, "len {len} split {split}");
            assert!(
                len.div_ceil(step) <= len.div_ceil(split),
                "len {len} split {split}"
            );
        }
    }
    // An override is exact.
    let o = DecodeTuning { split: 16, ..t };
    assert_eq!(k.item_keys(150, 16, &o), 16);
}

/// Simulates the all-to-all of `all_to_all_blocks` in host memory: every device's attention
/// output holds its columns of a known matrix for every token; after the moves (local blocks
/// copied straight, remote ones through the receive buffer) each device's assembled rows must
/// equal that matrix's rows of its tokens, every element written exactly once.
#[test]
fn all_to_all_blocks_move_every_head_of_every_token_once() {
    let value = |t: usize, col: usize| (t * 100_003 + col) as u64;
    let mut cases = 0;
    for (heads, kv) in [(32, 8), (8, 2), (6, 3), (12, 4), (5, 5), (7, 1), (8, 8)] {
        for n in 1..=heads.min(6) {
            for (tokens, chunks) in [0usize, 1, 2, 3, 5, 16, 17, 33]
                .into_iter()
                .flat_map(|t| [(t, 1usize), (t, 2), (t, 3)])
            {
                let d = 2;
                let cfg = Config::new(heads * d * 2, heads)
                    .with_kv_heads(kv)
                    .with_head_dim(d);
                let plan = attnrt::ShardPlan::new(cfg, n).unwrap();
                let blocks = all_to_all_blocks(&plan, tokens, chunks).unwrap();
                let qd = heads * d;
                // Each device's attention output: [tokens, its columns].
                let outs: Vec<Vec<u64>> = (0..n)
                    .map(|i| {
                        let cols = plan.shard(i).unwrap().q_rows(d);
                        (0..tokens)
                            .flat_map(|t| cols.clone().map(move |c| value(t, c)))
                            .collect()
                    })
                    .collect();
                let max_rows = tokens.div_ceil(n);
                for dst in 0..n {
                    let rows = plan.token_range(dst, tokens).unwrap();
                    let mine = plan.shard(dst).unwrap().q_rows(d).len();
                    // The receive buffer as the device allocates it.
                    let mut stage = vec![u64::MAX; max_rows * (qd - mine)];
                    let mut assembled = vec![u64::MAX; rows.len() * qd];
                    let mut written = vec![0u32; rows.len() * qd];
                    let mut last_chunk = 0;
                    for b in blocks.iter().filter(|b| b.dst == dst) {
                        assert!(!b.is_empty());
                        assert!(b.chunk < chunks && b.chunk >= last_chunk);
                        last_chunk = b.chunk;
                        assert!(rows.start <= b.rows.start && b.rows.end <= rows.end);
                        // Chunks of one device differ in length by at most one.
                        let per = rows.len() / chunks;
                        assert!(b.rows.len() == per || b.rows.len() == per + 1);
                        assert_eq!(b.cols, plan.shard(b.src).unwrap().q_rows(d));
                        let src = &outs[b.src][b.src_offset..b.src_offset + b.len()];
                        let block: &[u64] = if b.src == dst {
                            src
                        } else {
                            // The receive: a contiguous copy into the stage buffer.
                            let at = b.stage_offset..b.stage_offset + b.len();
                            assert!(stage[at.clone()].iter().all(|&v| v == u64::MAX));
                            stage[at.clone()].copy_from_slice(src);
                            &stage[at]
                        };
                        // The 2D copy into the block's columns.
                        let w = b.cols.len();
                        let r0 = b.rows.start - rows.start;
                        for (r, row) in block.chunks_exact(w).enumerate() {
                            for (j, &v) in row.iter().enumerate() {
                                assembled[(r0 + r) * qd + b.cols.start + j] = v;
                                written[(r0 + r) * qd + b.cols.start + j] += 1;
                            }
                        }
                    }
                    assert!(
                        written.iter().all(|&c| c == 1),
                        "{heads}/{kv} on {n}, T {tokens}"
                    );
                    for (r, t) in rows.clone().enumerate() {
                        for col in 0..qd {
                            assert_eq!(assembled[r * qd + col], value(t, col));
                        }
                    }
                    cases += 1;
                }
                // Local blocks never use the stage; nothing is sent from a device to itself.
                let remote: usize = blocks
                    .iter()
                    .filter(|b| b.src != b.dst)
                    .map(|b| b.len())
                    .sum();
                assert_eq!(
                    remote,
                    tokens * qd
                        - (0..n)
                            .map(|i| {
                                plan.token_range(i, tokens).unwrap().len()
                                    * plan.shard(i).unwrap().q_rows(d).len()
                            })
                            .sum::<usize>()
                );
            }
        }
    }
    assert!(cases > 1500);
}
