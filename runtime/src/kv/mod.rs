//! The KV cache: keys and values of past tokens in caller memory, for prefill, chunked prefill
//! and decode through one forward entry ([`crate::Layer::forward_cached`]).
//!
//! Memory is a pool of fixed-size blocks (paged attention): block `b` holds, for each KV head
//! `g`, `block_size` tokens of `head_dim` values; token slot `i` starts at element
//! `((b * n_kv_head + g) * block_size + i) * head_dim` of the K pool (the same in the V pool). A sequence names its blocks in
//! logical order in a block table that the caller owns, so a server grows and frees sequences
//! without copying. A contiguous cache is the special case of one block per sequence.
//!
//! A sliding-window layer may use the cache as a rolling buffer ([`KvCache::rolling`]): logical
//! token `j` lives in slot `j mod S` of its sequence (`S` = blocks x block_size), so memory stays
//! at about W tokens per sequence however long the generation.
//!
//! Decode reads the pool at memory speed, so how it is allocated shows: start both pools on a
//! cache line (a row split over two lines costs two reads) and, where the OS has them, back them
//! with 2 MiB pages (on Linux, `madvise(MADV_HUGEPAGE)` before the first write; with the `std`
//! feature [`PoolMemory`] allocates so). In 4 KiB
//! pages every 4 KiB of one head's keys is a TLB miss; `attnrt bench decode` read the cache
//! 9-10% faster on one thread of a Zen 5 core in 2 MiB pages (BENCHMARKS.md).

mod forward;
#[cfg(feature = "std")]
mod memory;

use half::{bf16, f16};

use crate::error::{Error, Result};

pub use forward::cached_workspace_len;
#[cfg(feature = "std")]
pub use memory::PoolMemory;

/// f32/f16/bf16 elements of one pool (K or V) of `num_blocks` blocks.
pub const fn kv_pool_len(
    n_kv_head: usize,
    head_dim: usize,
    block_size: usize,
    num_blocks: usize,
) -> usize {
    n_kv_head
        .saturating_mul(head_dim)
        .saturating_mul(block_size)
        .saturating_mul(num_blocks)
}

/// The K and V pools, borrowed mutably for the life of the cache.
#[derive(Debug)]
pub enum KvPool<'a> {
    /// f32 storage.
    F32 {
        /// Keys.
        k: &'a mut [f32],
        /// Values.
        v: &'a mut [f32],
    },
    /// f16 storage.
    F16 {
        /// Keys.
        k: &'a mut [f16],
        /// Values.
        v: &'a mut [f16],
    },
    /// bf16 storage.
    Bf16 {
        /// Keys.
        k: &'a mut [bf16],
        /// Values.
        v: &'a mut [bf16],
    },
}

impl KvPool<'_> {
    fn lens(&self) -> (usize, usize) {
        match self {
            KvPool::F32 { k, v } => (k.len(), v.len()),
            KvPool::F16 { k, v } => (k.len(), v.len()),
            KvPool::Bf16 { k, v } => (k.len(), v.len()),
        }
    }
}

/// The shape of a KV cache, all that validating a call against it needs (a GPU cache has the
/// same shape as a [`KvCache`] without living in host memory).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvGeometry {
    /// Key/value heads stored.
    pub n_kv_head: usize,
    /// Values per head.
    pub head_dim: usize,
    /// Tokens per block.
    pub block_size: usize,
    /// Blocks in the pool.
    pub num_blocks: usize,
    /// Whether sequences are rolling buffers.
    pub rolling: bool,
}

impl KvGeometry {
    /// Checks that no dimension is zero.
    ///
    /// # Errors
    /// [`Error::Config`] naming the first zero dimension.
    pub fn validate(&self) -> Result<()> {
        for (field, v) in [
            ("n_kv_head", self.n_kv_head),
            ("head_dim", self.head_dim),
            ("block_size", self.block_size),
            ("num_blocks", self.num_blocks),
        ] {
            if v == 0 {
                return Err(Error::Config {
                    field,
                    value: 0,
                    rule: "a KV cache dimension must be > 0",
                });
            }
        }
        Ok(())
    }
}

/// A KV cache over caller memory.
#[derive(Debug)]
pub struct KvCache<'a> {
    pub(crate) pool: KvPool<'a>,
    pub(crate) n_kv_head: usize,
    pub(crate) head_dim: usize,
    pub(crate) block_size: usize,
    pub(crate) num_blocks: usize,
    pub(crate) rolling: bool,
}

impl<'a> KvCache<'a> {
    /// A cache of `num_blocks` blocks of `block_size` tokens for `n_kv_head` heads of
    /// `head_dim` values. With `rolling`, sequences keep only the most recent keys a
    /// sliding-window layer can still see (the layer must have a window).
    ///
    /// # Errors
    /// [`Error::Config`] for a zero size; [`Error::InputShape`] if a pool's length is not
    /// [`kv_pool_len`].
    pub fn new(
        pool: KvPool<'a>,
        n_kv_head: usize,
        head_dim: usize,
        block_size: usize,
        num_blocks: usize,
        rolling: bool,
    ) -> Result<KvCache<'a>> {
        KvGeometry {
            n_kv_head,
            head_dim,
            block_size,
            num_blocks,
            rolling,
        }
        .validate()?;
        let want = kv_pool_len(n_kv_head, head_dim, block_size, num_blocks);
        let (k, v) = pool.lens();
        for (name, len) in [("kv pool k", k), ("kv pool v", v)] {
            if len != want || want == usize::MAX {
                return Err(Error::InputShape {
                    name,
                    expected: want,
                    actual: len,
                });
            }
        }
        Ok(KvCache {
            pool,
            n_kv_head,
            head_dim,
            block_size,
            num_blocks,
            rolling,
        })
    }

    /// The cache's shape.
    pub fn geometry(&self) -> KvGeometry {
        KvGeometry {
            n_kv_head: self.n_kv_head,
            head_dim: self.head_dim,
            block_size: self.block_size,
            num_blocks: self.num_blocks,
            rolling: self.rolling,
        }
    }

    /// Tokens per block.
    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// Blocks in the pool.
    pub fn num_blocks(&self) -> usize {
        self.num_blocks
    }

    /// Whether sequences are rolling buffers.
    pub fn rolling(&self) -> bool {
        self.rolling
    }

    /// Element offset of token slot `slot` of KV head `g` in block `block`.
    pub(crate) fn offset(&self, block: usize, g: usize, slot: usize) -> usize {
        ((block * self.n_kv_head + g) * self.block_size + slot) * self.head_dim
    }
}

/// One sequence's part of a cached forward call.
#[derive(Clone, Copy, Debug)]
pub struct Sequence<'s> {
    /// Tokens of this sequence already in the cache: the new tokens take positions
    /// `cached .. cached + new_tokens` (RoPE and the mask use them).
    pub cached: usize,
    /// New tokens of this call (0 is allowed: the sequence is skipped).
    pub new_tokens: usize,
    /// The sequence's blocks in logical order (ids into the pool). Must hold
    /// `cached + new_tokens` tokens (`W + new_tokens - 1` for a rolling cache). No block may
    /// appear twice in one call, in one sequence or across sequences.
    pub blocks: &'s [u32],
}

impl Sequence<'_> {
    /// Slots the sequence's blocks hold.
    pub(crate) fn capacity(&self, block_size: usize) -> usize {
        self.blocks.len().saturating_mul(block_size)
    }
}
