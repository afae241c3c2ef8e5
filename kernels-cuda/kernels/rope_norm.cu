// The steps between the projections and attention (SPEC.md steps 1-5 after the GEMM), fused
// into one pass per token: bias, QK RMSNorm (full or per head), rotary embedding (interleaved
// or half-split, from a cos/sin table), and the store of q, k, v in the attention's storage
// type. Plus the small element-wise kernels of the executor (bias on the output, f32 ->
// storage conversion).
#include "common.cuh"

struct PrepParams {
    const float* qkv;       // [B*T, H*D + 2*KV*D]: the fused projection, f32
    const float* bias;      // [H*D + 2*KV*D] or null (absent biases are zeros)
    const float* q_norm;    // [D] or [H*D], or null
    const float* k_norm;    // [D] or [KV*D], or null
    const float* cs;        // rotary cos/sin rows [*, D] ((cos, sin) pairs), or null
    const int* cs_rows;     // [B*T] row of `cs` for each token, or null (row = token % cs_period)
    void* q;                // [B*T, H*D] storage type
    void* k;                // [B*T, KV*D]
    void* v;                // [B*T, KV*D]
    int cs_period;          // T when the rows are the positions 0..T, B*T when gathered per token
    int n_head;
    int n_kv_head;
    int head_dim;
    int full_norm;          // 1: RMSNorm over the whole projected row; 0: per head
    int half_split;         // rotary convention: 1 half-split, 0 interleaved
    float eps;
};

__device__ __forceinline__ float block_sum(float v, float* red) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) red[warp] = v;
    __syncthreads();
    float t = lane < nw ? red[lane] : 0.0f;
    return warp_sum(t);
}

// One part (q or k) of one token: n heads of D values at `src`, into `dst`.
template <typename T>
__device__ void prep_part(const PrepParams& p, float* buf, float* red, const float* src,
                          const float* bias, const float* norm, const float* cs, T* dst, int n) {
    const int D = p.head_dim, len = n * D;
    const int tid = threadIdx.x, nt = blockDim.x;
    const int lane = tid & 31, warp = tid >> 5, nw = nt >> 5;
    for (int i = tid; i < len; i += nt) buf[i] = src[i] + (bias ? bias[i] : 0.0f);
    __syncthreads();
    if (norm) {
        if (p.full_norm) {
            float ss = 0.0f;
            for (int i = tid; i < len; i += nt) ss += buf[i] * buf[i];
            ss = block_sum(ss, red);
            const float inv = 1.0f / sqrtf(ss / (float)len + p.eps);
            for (int i = tid; i < len; i += nt) buf[i] = buf[i] * inv * norm[i];
        } else {
            for (int h = warp; h < n; h += nw) {
                float* z = buf + h * D;
                float ss = 0.0f;
                for (int d = lane; d < D; d += 32) ss += z[d] * z[d];
                ss = warp_sum(ss);
                const float inv = 1.0f / sqrtf(ss / (float)D + p.eps);
                for (int d = lane; d < D; d += 32) z[d] = z[d] * inv * norm[d];
            }
        }
        __syncthreads();
    }
    if (cs) {
        const int half = D / 2;
        for (int pi = tid; pi < n * half; pi += nt) {
            const int h = pi / half, i = pi - h * half;
            const int a = p.half_split ? i : 2 * i;
            const int bb = p.half_split ? i + half : 2 * i + 1;
            const float c = cs[2 * i], s = cs[2 * i + 1];
            const float x = buf[h * D + a], y = buf[h * D + bb];
            dst[h * D + a] = from_f32<T>(x * c - y * s);
            dst[h * D + bb] = from_f32<T>(x * s + y * c);
        }
    } else {
        for (int i = tid; i < len; i += nt) dst[i] = from_f32<T>(buf[i]);
    }
    __syncthreads();
}

// Grid: one CTA per token (B*T); dynamic shared memory: max(H, KV) * D floats.
template <typename T>
__device__ void qkv_prep(const PrepParams& p) {
    extern __shared__ float prep_smem[];
    __shared__ float red[32];
    const int token = blockIdx.x;
    const int D = p.head_dim;
    const int qd = p.n_head * D, kvd = p.n_kv_head * D, width = qd + 2 * kvd;
    const float* row = p.qkv + (size_t)token * width;
    const float* cs = nullptr;
    if (p.cs) {
        const int r = p.cs_rows ? p.cs_rows[token] : token % p.cs_period;
        cs = p.cs + (size_t)r * D;
    }
    const float* bias = p.bias;
    prep_part<T>(p, prep_smem, red, row, bias, p.q_norm, cs, (T*)p.q + (size_t)token * qd, p.n_head);
    prep_part<T>(p, prep_smem, red, row + qd, bias ? bias + qd : nullptr, p.k_norm, cs,
                 (T*)p.k + (size_t)token * kvd, p.n_kv_head);
    T* v = (T*)p.v + (size_t)token * kvd;
    for (int i = threadIdx.x; i < kvd; i += blockDim.x)
        v[i] = from_f32<T>(row[qd + kvd + i] + (bias ? bias[qd + kvd + i] : 0.0f));
}

extern "C" __global__ void __launch_bounds__(256) qkv_prep_f32(PrepParams p) { qkv_prep<float>(p); }
extern "C" __global__ void __launch_bounds__(256) qkv_prep_bf16(PrepParams p) { qkv_prep<__nv_bfloat16>(p); }
extern "C" __global__ void __launch_bounds__(256) qkv_prep_f16(PrepParams p) { qkv_prep<__half>(p); }

// y[r, c] += bias[c] over rows x cols.
struct BiasParams {
    float* y;
    const float* bias;
    long long rows;
    int cols;
};
extern "C" __global__ void add_bias_f32(BiasParams p) {
    long long n = p.rows * (long long)p.cols;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x)
        p.y[i] += p.bias[i % p.cols];
}

// f32 -> storage type, n elements.
struct ConvertParams {
    const float* in;
    void* out;
    long long n;
};
template <typename T>
__device__ void convert(const ConvertParams& p) {
    T* out = (T*)p.out;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < p.n;
         i += (long long)gridDim.x * blockDim.x)
        out[i] = from_f32<T>(p.in[i]);
}
extern "C" __global__ void convert_f32_bf16(ConvertParams p) { convert<__nv_bfloat16>(p); }
extern "C" __global__ void convert_f32_f16(ConvertParams p) { convert<__half>(p); }
