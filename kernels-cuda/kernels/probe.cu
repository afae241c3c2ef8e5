// Read-bandwidth probes for `bench --read-roofline` (issue 7): how fast the GPU streams a large
// buffer with each way the decode kernel could load its K/V tiles, with no arithmetic. The
// runtime never loads this module.
//
// Decode reads its cache once, so its ceiling is the device's read rate, which can exceed the
// device-to-device copy rate the bench measures (a copy also writes). These kernels measure
// that ceiling for:
//   probe_ldg         plain 16-byte loads, U in flight per thread, grid-stride (each warp
//                     instruction reads 512 contiguous bytes);
//   probe_cp_async_s<S>  the decode kernel's pattern without its arithmetic: each warp streams
//                     its own 4 KiB tiles into shared memory with decode's 16-byte cp.async
//                     and L2 hints (decode_loads.cuh), S stages;
//   probe_bulk_s<S>   each warp's tiles as one 4 KiB cp.async.bulk each (one lane issues it,
//                     completion on an mbarrier per stage), S stages;
//   probe_region_s2, probe_region_kv_s2  decode's access pattern: regions swept by groups of
//                     warps (one CTA per region as decode's one CTA per (sequence, KV head)),
//                     the _kv one reading tiles in K/V pairs from the buffer's two halves.
// Every kernel takes the buffer as `tiles` tiles of 4 KiB.
#include "common.cuh"
#include "decode_loads.cuh"

#define PROBE_TILE 4096

// The xor of what was read reaches memory only if it equals a constant no input produces in
// practice: the loads stay (the compiler cannot drop them), the store practically never runs.
__device__ __forceinline__ void probe_sink(unsigned* sink, unsigned v) {
    if (v == 0x9e3779b9u) atomicAdd(sink, 1u);
}

extern "C" __global__ void __launch_bounds__(256) probe_ldg(const uint4* src, long long tiles,
                                                           unsigned* sink) {
    constexpr int U = 4;
    const long long n = tiles * (PROBE_TILE / 16);
    const long long stride = (long long)gridDim.x * blockDim.x;
    long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x;
    unsigned acc = 0;
    for (; i + (U - 1) * stride < n; i += U * stride) {
        uint4 v[U];
#pragma unroll
        for (int u = 0; u < U; ++u) v[u] = __ldcs(src + i + u * stride);
#pragma unroll
        for (int u = 0; u < U; ++u) acc ^= v[u].x ^ v[u].y ^ v[u].z ^ v[u].w;
    }
    for (; i < n; i += stride) {
        const uint4 v = __ldcs(src + i);
        acc ^= v.x ^ v.y ^ v.z ^ v.w;
    }
    probe_sink(sink, acc);
}

__device__ __forceinline__ void probe_bar_init(uint64_t* bar) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;\n" ::"r"(smem_addr(bar)) : "memory");
}
__device__ __forceinline__ void probe_bar_wait(uint64_t* bar, unsigned parity) {
    asm volatile(
        "{\n"
        ".reg .pred P1;\n"
        "WAIT_%=:\n"
        "mbarrier.try_wait.parity.shared::cta.b64 P1, [%0], %1;\n"
        "@!P1 bra WAIT_%=;\n"
        "}\n" ::"r"(smem_addr(bar)),
        "r"(parity)
        : "memory");
}
// One 4 KiB tile into `dst` by the bulk-copy engine, completing on `bar` (one arrival that
// also expects the tile's bytes).
__device__ __forceinline__ void probe_bulk(void* dst, const void* src, uint64_t* bar,
                                           uint64_t pol) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_addr(bar)),
                 "r"(PROBE_TILE)
                 : "memory");
    asm volatile(
        "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes.L2::cache_hint "
        "[%0], [%1], %2, [%3], %4;\n" ::"r"(smem_addr(dst)),
        "l"(src), "r"(PROBE_TILE), "r"(smem_addr(bar)), "l"(pol)
        : "memory");
}

template <int S>
__device__ __forceinline__ void probe_bulk_copy(const char* src, long long tiles, unsigned* sink) {
    extern __shared__ uint4 smem[];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    const long long gw = blockIdx.x * (long long)warps + warp;
    const long long nw = (long long)gridDim.x * warps;
    uint4* const mine = smem + warp * S * (PROBE_TILE / 16);
    // The warps' mbarriers after every warp's stages.
    uint64_t* const bars =
        reinterpret_cast<uint64_t*>(smem + warps * S * (PROBE_TILE / 16)) + warp * S;
    uint64_t pol;
    asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;\n" : "=l"(pol));
    if (lane == 0)
        for (int s = 0; s < S; ++s) probe_bar_init(bars + s);
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    __syncwarp();
    const long long count = gw < tiles ? (tiles - gw + nw - 1) / nw : 0;
    auto tile = [&](long long t) { return src + (gw + t * nw) * PROBE_TILE; };
    if (lane == 0)
        for (int s = 0; s < S && s < count; ++s)
            probe_bulk(mine + s * (PROBE_TILE / 16), tile(s), bars + s, pol);
    unsigned acc = 0;
    for (long long t = 0; t < count; ++t) {
        const int s = (int)(t % S);
        probe_bar_wait(bars + s, (unsigned)((t / S) & 1));
        acc ^= reinterpret_cast<const unsigned*>(mine + s * (PROBE_TILE / 16))[lane];
        __syncwarp();
        if (lane == 0 && t + S < count) {
            // The warp's reads of the stage (generic proxy) before the copy engine's writes.
            asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
            probe_bulk(mine + s * (PROBE_TILE / 16), tile(t + S), bars + s, pol);
        }
    }
    probe_sink(sink, acc);
}

// Decode's access pattern without its arithmetic: the buffer is `regions` equal regions (or,
// with KV, two halves of `regions` regions each, read in pairs like K and V tiles), each swept
// by `group` consecutive warps together (warp i of the group takes tiles i, i + group, ...):
// group 4 is one CTA per region, as decode's one CTA per (sequence, KV head); a group of every
// warp is the whole-buffer sweep of probe_cp_async_s<S>. S stages of 16-byte cp.async, decode's
// hints.
template <bool KV, int S>
__device__ __forceinline__ void probe_region(const char* src, long long tiles, unsigned* sink,
                                             long long group) {
    extern __shared__ uint4 smem[];
    constexpr int T16 = PROBE_TILE / 16, PER = KV ? 2 : 1;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const long long gw = blockIdx.x * (long long)(blockDim.x >> 5) + warp;
    const long long nw = (long long)gridDim.x * (blockDim.x >> 5);
    const long long regions = nw / group;
    const long long half = KV ? tiles / 2 : tiles;
    const long long rt = half / regions;  // tiles per region
    const long long r = gw / group, i = gw % group;
    uint4* const mine = smem + warp * S * PER * T16;
    const uint64_t pol = decode_policy();
    const long long count = r < regions && i < rt ? (rt - i + group - 1) / group : 0;
    auto issue = [&](long long t) {
        const long long tile = r * rt + i + t * group;
#pragma unroll
        for (int k = 0; k < PER; ++k) {
            const char* p = src + (tile + k * half) * PROBE_TILE;
            uint4* d = mine + ((t % S) * PER + k) * T16;
#pragma unroll
            for (int c = 0; c < T16 / 32; ++c)
                cp_async16_stream(d + lane + 32 * c, p + 16 * (lane + 32 * c), true, pol);
        }
    };
    for (int s = 0; s < S - 1; ++s) {
        if (s < count) issue(s);
        cp_async_commit();
    }
    unsigned acc = 0;
    for (long long t = 0; t < count; ++t) {
        if (t + S - 1 < count) issue(t + S - 1);
        cp_async_commit();
        cp_async_wait<S - 1>();
        __syncwarp();
        // One word per lane of the landed tiles, so the copies are consumed.
        acc ^= reinterpret_cast<const unsigned*>(mine + (t % S) * PER * T16)[lane];
        __syncwarp();
    }
    cp_async_wait<0>();
    probe_sink(sink, acc);
}

#define PROBE_STAGES(S)                                                                        \
    extern "C" __global__ void __launch_bounds__(128)                                          \
        probe_cp_async_s##S(const char* src, long long tiles, unsigned* sink) {                \
        probe_region<false, S>(src, tiles, sink, (long long)gridDim.x * (blockDim.x >> 5));    \
    }                                                                                          \
    extern "C" __global__ void __launch_bounds__(128)                                          \
        probe_bulk_s##S(const char* src, long long tiles, unsigned* sink) {                    \
        probe_bulk_copy<S>(src, tiles, sink);                                                  \
    }
PROBE_STAGES(2)
PROBE_STAGES(4)

extern "C" __global__ void __launch_bounds__(128)
    probe_region_s2(const char* src, long long tiles, unsigned* sink, int group) {
    probe_region<false, 2>(src, tiles, sink, group);
}
extern "C" __global__ void __launch_bounds__(128)
    probe_region_kv_s2(const char* src, long long tiles, unsigned* sink, int group) {
    probe_region<true, 2>(src, tiles, sink, group);
}

// Decode's loads without its arithmetic over a paged cache as the decode bench lays it out
// (`bench --decode-ladder`), in steps from decode's exact pattern towards the region probe's, to
// find which difference costs the decode kernel its read rate: one CTA of 4 warps per
// (sequence, KV head) in decode's one-dimensional order, 16-key warp tiles of head_dim 128 in 2
// stages of decode's `cp.async`. Flags: TABLE rows through the block table (else each CTA's
// keys are one run of `keys` rows from row cta * keys), SHFL the rows found by one lane each and
// handed out by shuffles (decode's way; else each copying lane computes its own), PAD shared
// rows padded to 17 chunks (decode's; else unpadded 4 KiB tiles as the region probe's); the
// tiles' start in shared memory is a parameter (decode's static shared variables come first).
struct PagedProbe {
    const char* k;           // K rows of 256 bytes
    const char* v;           // V rows
    const unsigned* tables;  // [sequences * per_seq] block ids
    unsigned* sink;
    int per_seq;             // blocks per sequence in `tables`
    int keys;                // keys read per (sequence, KV head), a multiple of 16
    int n_kv_head;
    int block_size;          // a power of two
    int base_chunks;         // the tiles start this many 16-byte chunks into shared memory
};

template <bool TABLE, bool SHFL, bool PAD, bool SWZ = false>
__device__ __forceinline__ void probe_paged(const PagedProbe& a) {
    extern __shared__ uint4 smem[];
    constexpr int W = 4, S = 2, CPR = 16, LDS = PAD ? CPR + 1 : CPR, CH = 16 * LDS;
    constexpr int PER = 16 * CPR / 32;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int cta = blockIdx.x, seq = cta / a.n_kv_head, g = cta % a.n_kv_head;
    const unsigned* table = a.tables + (size_t)seq * a.per_seq;
    const int shift = __ffs(a.block_size) - 1;
    const int ntiles = a.keys / 16;
    const int mine = ntiles > warp ? (ntiles - warp + W - 1) / W : 0;
    uint4* const sw = smem + a.base_chunks + warp * (S * 2 * CH);
    const uint64_t pol = decode_policy();
    auto row = [&](int t, int r) -> unsigned {
        const int j = (warp + t * W) * 16 + r;
        if (!TABLE) return (unsigned)cta * (unsigned)a.keys + j;
        const unsigned b = table[j >> shift];
        return (b * a.n_kv_head + g) * a.block_size + (j & (a.block_size - 1));
    };
    auto issue = [&](int t, unsigned rows, int stage) {
        uint4* dk = sw + stage * 2 * CH;
        uint4* dv = dk + CH;
#pragma unroll
        for (int c = 0; c < PER; ++c) {
            const int f = lane + 32 * c, r = f / CPR, ch = f - r * CPR;
            const unsigned ro = SHFL ? __shfl_sync(0xffffffffu, rows, r) : row(t, r);
            const size_t e = (size_t)ro * 256 + ch * 16;
            const int at = r * LDS + (SWZ ? ch ^ (r & 7) : ch);
            cp_async16_stream(dk + at, a.k + e, true, pol);
            cp_async16_stream(dv + at, a.v + e, true, pol);
        }
    };
    unsigned next = mine > 0 && SHFL ? row(0, lane & 15) : 0u;
    if (0 < mine) {
        issue(0, next, 0);
        if (SHFL && 1 < mine) next = row(1, lane & 15);
    }
    cp_async_commit();
    unsigned acc = 0;
    for (int t = 0; t < mine; ++t) {
        const int tn = t + 1;
        if (tn < mine) {
            issue(tn, next, tn & 1);
            if (SHFL && tn + 1 < mine) next = row(tn + 1, lane & 15);
        }
        cp_async_commit();
        cp_async_wait<1>();
        __syncwarp();
        const uint4* ks = sw + (t & 1) * 2 * CH;
        acc ^= reinterpret_cast<const unsigned*>(ks)[lane] ^
               reinterpret_cast<const unsigned*>(ks + CH)[lane];
        __syncwarp();
    }
    cp_async_wait<0>();
    probe_sink(a.sink, acc);
}

#define PROBE_PAGED(NAME, ...)                                                          \
    extern "C" __global__ void __launch_bounds__(128) probe_paged_##NAME(PagedProbe a) { \
        probe_paged<__VA_ARGS__>(a);                                                    \
    }
PROBE_PAGED(tsp, true, true, true)     // decode's loads: table, shuffles, padded rows
PROBE_PAGED(tlp, true, false, true)    // rows per lane
PROBE_PAGED(tsu, true, true, false)    // unpadded rows
PROBE_PAGED(tlu, true, false, false)
PROBE_PAGED(fsp, false, true, true)    // one run of rows per CTA
PROBE_PAGED(flp, false, false, true)
PROBE_PAGED(flu, false, false, false)  // the region probe's pattern over the pools
PROBE_PAGED(tsx, true, true, false, true)  // decode's loads into swizzled unpadded rows
