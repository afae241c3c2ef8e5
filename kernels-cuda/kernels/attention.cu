// Masked flash-attention forward (SPEC.md steps 6-8) for grouped-query attention.
//
// One CTA per (batch row b, KV head g, query tile). The R = H / KV query heads of g are packed
// into the CTA's rows (row r = query q0 + r / R, head g * R + r % R), so each K/V tile is loaded
// into shared memory once for all of them. Key tiles are classified with the mask descriptor of
// common.cuh: "none" tiles are skipped, "all" tiles run without per-element mask work, "partial"
// tiles evaluate every rule per element. Softmax is online, in f32; a query that sees no key
// gets exactly 0.
//
// Two families:
//   attn_f32            f32 storage on CUDA cores, any head_dim <= 256 (exactness path);
//   attn_mma_<t>_p<DP>  bf16 / f16 storage on tensor cores (mma.sync m16n8k16, f32 accumulate),
//                       head_dim padded to DP (a multiple of 32, <= 256); DP = head_dim for the
//                       tuned sizes 64, 128, 256.
#include "attn_common.cuh"

// ------------------------------------------------------------------------------------------
// f32 path (CUDA cores). Dynamic shared memory (floats): Q and O [rows, D], K [32, D + 1],
// V [32, D], S [rows, 32], and three per-row values (max, sum, rescale).
// ------------------------------------------------------------------------------------------
#define F32_BK 32

extern "C" __global__ void __launch_bounds__(256) attn_f32(AttnParams p) {
    extern __shared__ float smem[];
    const int R = p.group, BQ = p.q_per_cta, rows = BQ * R, D = p.head_dim, DK = D + 1;
    const int T = p.seq_len;
    float* sQ = smem;
    float* sO = sQ + rows * D;
    float* sK = sO + rows * D;
    float* sV = sK + F32_BK * DK;
    float* sS = sV + F32_BK * D;
    float* sM = sS + rows * F32_BK;
    float* sL = sM + rows;
    float* sA = sL + rows;

    const int b = blockIdx.z, g = blockIdx.y;
    const int q0 = (gridDim.x - 1 - blockIdx.x) * BQ;
    const int q1 = min(q0 + BQ, T);
    const int len = row_len(p.mask, b);
    const int tid = threadIdx.x, nthreads = blockDim.x;
    const int warp = tid >> 5, lane = tid & 31, nwarps = nthreads >> 5;
    const size_t qs = (size_t)p.n_head * D, ks = (size_t)p.n_kv_head * D;
    const float* Q = (const float*)p.q;
    const float* K = (const float*)p.k;
    const float* V = (const float*)p.v;
    float* O = (float*)p.o;

    for (int idx = tid; idx < rows * D; idx += nthreads) {
        int r = idx / D, d = idx - r * D;
        int qi = q0 + r / R, h = g * R + r % R;
        sQ[idx] = qi < T ? Q[((size_t)b * T + qi) * qs + (size_t)h * D + d] : 0.0f;
        sO[idx] = 0.0f;
    }
    for (int r = tid; r < rows; r += nthreads) {
        sM[r] = ATTNRT_NEG_INF;
        sL[r] = 0.0f;
    }

    if (q0 < len) {
        int qg_lo = 0, qg_hi = 0;
        if (p.mask.groups) query_group_range(p.mask, b, q0, q1, qg_lo, qg_hi);
        const int kend = min(q1, len);
        for (int k0 = key_lo(p.mask, q0, qg_lo) / F32_BK * F32_BK; k0 < kend; k0 += F32_BK) {
            const int cls = classify_tile(p.mask, b, len, q0, q1, qg_lo, qg_hi, k0, F32_BK);
            if (cls == TILE_NONE) continue;
            __syncthreads();
            for (int idx = tid; idx < F32_BK * D; idx += nthreads) {
                int c = idx / D, d = idx - c * D;
                int j = k0 + c;
                bool ok = j < T;
                size_t src = ((size_t)b * T + j) * ks + (size_t)g * D + d;
                sK[c * DK + d] = ok ? K[src] : 0.0f;
                sV[c * D + d] = ok ? V[src] : 0.0f;
            }
            __syncthreads();
            for (int idx = tid; idx < rows * F32_BK; idx += nthreads) {
                int r = idx / F32_BK, c = idx - r * F32_BK;
                int i = q0 + r / R, j = k0 + c;
                bool vis = i < q1 && (cls == TILE_ALL || visible(p.mask, b, len, i, j));
                float s = ATTNRT_NEG_INF;
                if (vis) {
                    const float* qr = sQ + r * D;
                    const float* kr = sK + c * DK;
                    float acc = 0.0f;
                    for (int d = 0; d < D; ++d) acc = fmaf(qr[d], kr[d], acc);
                    s = acc * p.scale;
                }
                sS[idx] = s;
            }
            __syncthreads();
            for (int r = warp; r < rows; r += nwarps) {
                float s = sS[r * F32_BK + lane];
                float mx = warp_max(s);
                float m_old = sM[r];
                float m_new = fmaxf(m_old, mx);
                float pv = 0.0f, alpha = 1.0f;
                if (m_new != ATTNRT_NEG_INF) {
                    pv = s == ATTNRT_NEG_INF ? 0.0f : expf(s - m_new);
                    alpha = m_old == ATTNRT_NEG_INF ? 0.0f : expf(m_old - m_new);
                }
                float sum = warp_sum(pv);
                sS[r * F32_BK + lane] = pv;
                if (lane == 0) {
                    sM[r] = m_new;
                    sL[r] = sL[r] * alpha + sum;
                    sA[r] = alpha;
                }
            }
            __syncthreads();
            for (int idx = tid; idx < rows * D; idx += nthreads) {
                int r = idx / D, d = idx - r * D;
                const float* pr = sS + r * F32_BK;
                float acc = sO[idx] * sA[r];
#pragma unroll 8
                for (int c = 0; c < F32_BK; ++c) acc = fmaf(pr[c], sV[c * D + d], acc);
                sO[idx] = acc;
            }
        }
    }
    __syncthreads();
    for (int idx = tid; idx < rows * D; idx += nthreads) {
        int r = idx / D, d = idx - r * D;
        int qi = q0 + r / R, h = g * R + r % R;
        if (qi < q1) {
            float l = sL[r];
            O[((size_t)b * T + qi) * qs + (size_t)h * D + d] = l > 0.0f ? sO[idx] / l : 0.0f;
        } else if (qi < T) {
            // Rows past q1 cannot exist (q1 = min(q0 + BQ, T)); kept for clarity.
        }
    }
}

// ------------------------------------------------------------------------------------------
// Tensor-core path.
// ------------------------------------------------------------------------------------------
// Elements [c, c + 8) of a row with D valid elements into shared memory; zero past D.
template <typename T>
__device__ __forceinline__ void load_chunk(T* dst, const T* row, int c, int D, bool valid) {
    if (valid && (D & 7) == 0 && c + 8 <= D) {
        cp_async16(dst, row + c);
    } else if (!valid || c >= D) {
        *reinterpret_cast<uint4*>(dst) = make_uint4(0, 0, 0, 0);
    } else {
#pragma unroll
        for (int e = 0; e < 8; ++e) dst[e] = (c + e < D) ? row[c + e] : from_f32<T>(0.0f);
    }
}

template <typename T, int DP, int BN, int MT, int NW>
__device__ __forceinline__ void attn_mma(const AttnParams& p) {
    constexpr int BM = 16 * MT * NW;
    constexpr int LD = DP + 8;  // padded row: ldmatrix rows land in distinct banks
    constexpr int NT = BN / 8;
    constexpr int KC = DP / 16;
    constexpr int DT = DP / 8;
    constexpr int CH = DP / 8;  // 16-byte chunks per row
    constexpr bool Q_IN_REGS = DP * MT <= 128;
    constexpr int NTHREADS = NW * 32;

    extern __shared__ __align__(16) unsigned char smem_raw[];
    T* sQ = reinterpret_cast<T*>(smem_raw);
    T* sK = sQ + BM * LD;
    T* sV = sK + 2 * BN * LD;

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int grp = lane >> 2, tq = lane & 3;
    const int R = p.group, BQ = p.q_per_cta, rows_used = BQ * R;
    const int D = p.head_dim, T_ = p.seq_len;
    const int b = blockIdx.z, g = blockIdx.y;
    const int q0 = (gridDim.x - 1 - blockIdx.x) * BQ;
    const int q1 = min(q0 + BQ, T_);
    const int len = row_len(p.mask, b);
    const size_t qs = (size_t)p.n_head * D, ks = (size_t)p.n_kv_head * D;
    const T* Q = reinterpret_cast<const T*>(p.q);
    const T* K = reinterpret_cast<const T*>(p.k);
    const T* V = reinterpret_cast<const T*>(p.v);
    T* O = reinterpret_cast<T*>(p.o);

    // This thread's rows: (mt, half) -> query index and head, or invalid.
    int row_q[MT][2], row_h[MT][2], row_g[MT][2];
    bool row_ok[MT][2];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
            int r = (warp * MT + mt) * 16 + grp + hf * 8;
            row_q[mt][hf] = q0 + r / R;
            row_h[mt][hf] = g * R + r % R;
            row_ok[mt][hf] = r < rows_used && row_q[mt][hf] < q1;
            row_g[mt][hf] = row_ok[mt][hf] ? group_of(p.mask, b, row_q[mt][hf]) : 0;
        }

    float o[MT][DT][4];
    float m_row[MT][2], l_row[MT][2];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
        for (int dt = 0; dt < DT; ++dt)
#pragma unroll
            for (int e = 0; e < 4; ++e) o[mt][dt][e] = 0.0f;
        m_row[mt][0] = m_row[mt][1] = ATTNRT_NEG_INF;
        l_row[mt][0] = l_row[mt][1] = 0.0f;
    }

    if (q0 < len) {
        // Q tile.
        for (int idx = tid; idx < BM * CH; idx += NTHREADS) {
            int r = idx / CH, c = (idx - r * CH) * 8;
            int qi = q0 + r / R, h = g * R + r % R;
            bool valid = r < rows_used && qi < T_;
            const T* src = Q + ((size_t)b * T_ + (valid ? qi : 0)) * qs + (size_t)h * D;
            load_chunk(sQ + r * LD + c, src, c, D, valid);
        }
        cp_async_commit();

        int qg_lo = 0, qg_hi = 0;
        if (p.mask.groups) query_group_range(p.mask, b, q0, q1, qg_lo, qg_hi);
        const int kend = min(q1, len);
        auto next_tile = [&](int k, int& cls) {
            for (; k < kend; k += BN) {
                cls = classify_tile(p.mask, b, len, q0, q1, qg_lo, qg_hi, k, BN);
                if (cls != TILE_NONE) return k;
            }
            return kend;
        };
        auto load_kv = [&](int k0, int buf) {
            T* dk = sK + buf * BN * LD;
            T* dv = sV + buf * BN * LD;
            for (int idx = tid; idx < BN * CH; idx += NTHREADS) {
                int c = idx / CH, e = (idx - c * CH) * 8;
                int j = k0 + c;
                bool valid = j < T_;
                size_t off = ((size_t)b * T_ + (valid ? j : 0)) * ks + (size_t)g * D;
                load_chunk(dk + c * LD + e, K + off, e, D, valid);
                load_chunk(dv + c * LD + e, V + off, e, D, valid);
            }
        };

        int cls = TILE_NONE;
        int cur = next_tile(key_lo(p.mask, q0, qg_lo) / BN * BN, cls);
        if (cur < kend) load_kv(cur, 0);
        cp_async_commit();
        cp_async_wait<1>();
        __syncthreads();

        uint32_t qf[Q_IN_REGS ? MT : 1][Q_IN_REGS ? KC : 1][4];
        if constexpr (Q_IN_REGS) {
#pragma unroll
            for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                for (int kc = 0; kc < KC; ++kc) {
                    int mi = lane >> 3;
                    int r = (warp * MT + mt) * 16 + (mi & 1) * 8 + (lane & 7);
                    int c = kc * 16 + (mi >> 1) * 8;
                    ldmatrix_x4(qf[mt][kc], sQ + r * LD + c);
                }
        }

        int buf = 0;
        while (cur < kend) {
            int ncls = TILE_NONE;
            int nxt = next_tile(cur + BN, ncls);
            if (nxt < kend) {
                load_kv(nxt, buf ^ 1);
                cp_async_commit();
                cp_async_wait<1>();
            } else {
                cp_async_wait<0>();
            }
            __syncthreads();
            const T* tK = sK + buf * BN * LD;
            const T* tV = sV + buf * BN * LD;

            float s[MT][NT][4];
#pragma unroll
            for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                for (int nt = 0; nt < NT; ++nt)
#pragma unroll
                    for (int e = 0; e < 4; ++e) s[mt][nt][e] = 0.0f;

#pragma unroll
            for (int kc = 0; kc < KC; ++kc) {
                uint32_t a[MT][4];
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    if constexpr (Q_IN_REGS) {
#pragma unroll
                        for (int e = 0; e < 4; ++e) a[mt][e] = qf[mt][kc][e];
                    } else {
                        int mi = lane >> 3;
                        int r = (warp * MT + mt) * 16 + (mi & 1) * 8 + (lane & 7);
                        ldmatrix_x4(a[mt], sQ + r * LD + kc * 16 + (mi >> 1) * 8);
                    }
                }
#pragma unroll
                for (int nt = 0; nt < NT; nt += 2) {
                    uint32_t bf[4];
                    int mi = lane >> 3;
                    int key = (nt + (mi >> 1)) * 8 + (lane & 7);
                    ldmatrix_x4(bf, tK + key * LD + kc * 16 + (mi & 1) * 8);
#pragma unroll
                    for (int mt = 0; mt < MT; ++mt) {
                        Mma<T>::run(s[mt][nt], a[mt], bf[0], bf[1]);
                        Mma<T>::run(s[mt][nt + 1], a[mt], bf[2], bf[3]);
                    }
                }
            }

            // Mask, online softmax (log2 domain), rescale the accumulators.
#pragma unroll
            for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                for (int hf = 0; hf < 2; ++hf) {
                    const int i = row_q[mt][hf];
                    const bool ok = row_ok[mt][hf];
                    float mx = ATTNRT_NEG_INF;
#pragma unroll
                    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
                        for (int e = 0; e < 2; ++e) {
                            float v = s[mt][nt][hf * 2 + e] * p.scale_log2;
                            if (cls != TILE_ALL || !ok) {
                                const int j = cur + nt * 8 + tq * 2 + e;
                                const int gj = group_of(p.mask, b, min(j, T_ - 1));
                                if (!(ok && visible_ids(p.mask, len, i, j, row_g[mt][hf], gj)))
                                    v = ATTNRT_NEG_INF;
                            }
                            s[mt][nt][hf * 2 + e] = v;
                            mx = fmaxf(mx, v);
                        }
                    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
                    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
                    const float m_new = fmaxf(m_row[mt][hf], mx);
                    const float m_use = m_new == ATTNRT_NEG_INF ? 0.0f : m_new;
                    const float alpha = exp2f(m_row[mt][hf] - m_use);
                    m_row[mt][hf] = m_new;
                    float sum = 0.0f;
#pragma unroll
                    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
                        for (int e = 0; e < 2; ++e) {
                            float pv = exp2f(s[mt][nt][hf * 2 + e] - m_use);
                            s[mt][nt][hf * 2 + e] = pv;
                            sum += pv;
                        }
                    l_row[mt][hf] = l_row[mt][hf] * alpha + sum;
#pragma unroll
                    for (int dt = 0; dt < DT; ++dt) {
                        o[mt][dt][hf * 2] *= alpha;
                        o[mt][dt][hf * 2 + 1] *= alpha;
                    }
                }

            // O += P V.
#pragma unroll
            for (int kc = 0; kc < BN / 16; ++kc) {
                uint32_t a[MT][4];
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    a[mt][0] = Mma<T>::pack(s[mt][2 * kc][0], s[mt][2 * kc][1]);
                    a[mt][1] = Mma<T>::pack(s[mt][2 * kc][2], s[mt][2 * kc][3]);
                    a[mt][2] = Mma<T>::pack(s[mt][2 * kc + 1][0], s[mt][2 * kc + 1][1]);
                    a[mt][3] = Mma<T>::pack(s[mt][2 * kc + 1][2], s[mt][2 * kc + 1][3]);
                }
#pragma unroll
                for (int dt = 0; dt < DT; dt += 2) {
                    uint32_t bf[4];
                    int mi = lane >> 3;
                    int key = kc * 16 + (mi & 1) * 8 + (lane & 7);
                    ldmatrix_x4_trans(bf, tV + key * LD + (dt + (mi >> 1)) * 8);
#pragma unroll
                    for (int mt = 0; mt < MT; ++mt) {
                        Mma<T>::run(o[mt][dt], a[mt], bf[0], bf[1]);
                        Mma<T>::run(o[mt][dt + 1], a[mt], bf[2], bf[3]);
                    }
                }
            }
            __syncthreads();
            buf ^= 1;
            cur = nxt;
            cls = ncls;
        }
    }

    // Epilogue: finish the row sums across the quad, normalise, store pairs.
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
            float l = l_row[mt][hf];
            l += __shfl_xor_sync(0xffffffffu, l, 1);
            l += __shfl_xor_sync(0xffffffffu, l, 2);
            if (!row_ok[mt][hf]) continue;
            const float inv = l > 0.0f ? 1.0f / l : 0.0f;
            T* dst = O + ((size_t)b * T_ + row_q[mt][hf]) * qs + (size_t)row_h[mt][hf] * D;
#pragma unroll
            for (int dt = 0; dt < DT; ++dt) {
                int c = dt * 8 + tq * 2;
                if (c < D) {
                    T pair[2] = {from_f32<T>(o[mt][dt][hf * 2] * inv),
                                 from_f32<T>(o[mt][dt][hf * 2 + 1] * inv)};
                    *reinterpret_cast<uint32_t*>(dst + c) = *reinterpret_cast<uint32_t*>(pair);
                }
            }
        }
}

// Entry points: attn_mma_<dtype>_p<DP>_m<MT>_n<BN>. BN = 64 up to DP 128, 32 above (and a
// 32-key variant of DP 128); 4 warps.
#define ATTNRT_MMA(TY, NAME, DP, BN, MT)                                                         \
    extern "C" __global__ void __launch_bounds__(128) attn_mma_##NAME##_p##DP##_m##MT##_n##BN( \
        AttnParams p) {                                                                          \
        attn_mma<TY, DP, BN, MT, 4>(p);                                                          \
    }
#define ATTNRT_MMA_ALL(TY, NAME)     \
    ATTNRT_MMA(TY, NAME, 32, 64, 1)  \
    ATTNRT_MMA(TY, NAME, 64, 64, 1)  \
    ATTNRT_MMA(TY, NAME, 96, 64, 1)  \
    ATTNRT_MMA(TY, NAME, 128, 64, 1) \
    ATTNRT_MMA(TY, NAME, 128, 64, 2) \
    ATTNRT_MMA(TY, NAME, 128, 32, 1) \
    ATTNRT_MMA(TY, NAME, 160, 32, 1) \
    ATTNRT_MMA(TY, NAME, 192, 32, 1) \
    ATTNRT_MMA(TY, NAME, 224, 32, 1) \
    ATTNRT_MMA(TY, NAME, 256, 32, 1)

ATTNRT_MMA_ALL(__nv_bfloat16, bf16)
ATTNRT_MMA_ALL(__half, f16)
