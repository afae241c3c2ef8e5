//! The core never allocates: a forward call (the scalar reference, and the head-split
//! CPU-device executor) runs under a global allocator that records any
//! allocation made while it is armed. (One test in this binary, so no other test thread
//! allocates while the allocator is armed.)

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use attnrt::{
    reference_workspace_len, rope, Config, Inputs, Layer, MaskInputs, QkNorm, Rope, RopeTable,
    Sequential, ShardLayer, ShardPlan, ShardedLayer, Tensor,
};
use attnrt_tests::{OwnedWeights, Rng};

struct Recording;

static ARMED: AtomicBool = AtomicBool::new(false);
static CAUGHT: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call is forwarded unchanged to the system allocator; the recording only reads
// and writes atomics, which neither allocates nor touches the memory handed out.
unsafe impl GlobalAlloc for Recording {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if ARMED.load(Ordering::SeqCst) {
            CAUGHT.fetch_add(1, Ordering::SeqCst);
        }
        // SAFETY: same contract as our caller's, passed through.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if ARMED.load(Ordering::SeqCst) {
            CAUGHT.fetch_add(1, Ordering::SeqCst);
        }
        // SAFETY: `ptr` came from `System.alloc` with this layout, via `alloc` above.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Recording = Recording;

#[test]
fn forward_and_table_building_never_allocate() {
    let cfg = Config::new(32, 4)
        .with_kv_heads(2)
        .with_qk_norm(QkNorm::Full)
        .with_sliding_window(3)
        .with_rope(Rope::DEFAULT);
    let w = OwnedWeights::random(&cfg, &mut Rng(11));
    let (t, c) = (9usize, cfg.n_embd);
    let x = Rng(12).vec(t * c, 1.0);
    let docs = [0, 0, 0, 1, 1, 1, 1, 2, 2];
    let lens = [7];
    let mut tab = vec![0.0; rope::table_len(t, cfg.head_dim)];
    let mut ws = vec![0.0; reference_workspace_len(&cfg, t)];
    let mut y = vec![0.0; t * c];
    let layer = Layer::new(cfg, w.view(&cfg)).unwrap();

    ARMED.store(true, Ordering::SeqCst);
    rope::build_table(cfg.rope().unwrap(), cfg.head_dim, &mut tab).unwrap();
    let inputs = Inputs {
        mask: MaskInputs {
            seq_lens: Some(&lens),
            document_ids: Some(&docs),
            ..Default::default()
        },
        rope_table: Some(RopeTable::new(&tab, cfg.head_dim).unwrap()),
        ..Inputs::new(&x, 1, t)
    };
    let ran = layer.forward_reference(&inputs, &mut ws, &mut y);
    ARMED.store(false, Ordering::SeqCst);
    assert!(ran.is_ok());

    // The head-split CPU-device executor (full QK-norm: the in-process norm reduction too).
    let plan = ShardPlan::new(cfg, 3).unwrap();
    let blocks: Vec<Vec<f32>> = (0..3)
        .map(|i| {
            let mut b = vec![0.0; plan.wo_block_len(i).unwrap()];
            plan.copy_wo(i, &w.wo, &mut b).unwrap();
            b
        })
        .collect();
    let full = w.view(&cfg);
    let shards: Vec<ShardLayer<'_>> = (0..3)
        .map(|i| ShardLayer::new(&plan, i, &full, Tensor::F32(&blocks[i])).unwrap())
        .collect();
    let mut sws = vec![0.0; ShardedLayer::new(&shards).unwrap().workspace_len(t, 1)];
    ARMED.store(true, Ordering::SeqCst);
    let ran = ShardedLayer::new(&shards)
        .and_then(|s| s.forward_cpu(&inputs, &mut sws, &mut y, &Sequential));
    ARMED.store(false, Ordering::SeqCst);

    assert!(ran.is_ok());
    assert_eq!(CAUGHT.load(Ordering::SeqCst), 0, "the core allocated");
    // The recorder itself works: an allocation while armed is caught.
    ARMED.store(true, Ordering::SeqCst);
    let v = std::hint::black_box(vec![1u8; 16]);
    ARMED.store(false, Ordering::SeqCst);
    drop(v);
    assert!(CAUGHT.load(Ordering::SeqCst) >= 1);
}
