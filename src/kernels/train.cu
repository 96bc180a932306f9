// Fused backward kernels for training (`train::ops`): each reads its half-precision inputs once,
// does the arithmetic in f32 registers and writes one rounded result, where the composed tensor
// ops they replace cast every operand to f32 in memory and pass over it once per operator.
// The composed formulas in src/train/ops.rs stay the CPU path and the reference `bench parity`
// checks these against.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include "common.cuh"

__device__ __forceinline__ float ld(const float v) { return v; }
__device__ __forceinline__ float ld(const __nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float ld(const __half v) { return __half2float(v); }
template <typename T> __device__ __forceinline__ T st(float v);
template <> __device__ __forceinline__ float st<float>(float v) { return v; }
template <> __device__ __forceinline__ __nv_bfloat16 st<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <> __device__ __forceinline__ __half st<__half>(float v) { return __float2half_rn(v); }

// m = silu(g) ∘ u:  du = dm · silu(g),  dg = dm · u · σ(g) · (1 + g · (1 − σ(g))).
template <typename T>
__device__ void silu_mul_bwd(const uint64_t n, const T *__restrict__ g, const T *__restrict__ u,
                             const T *__restrict__ dm, T *__restrict__ dg, T *__restrict__ du) {
    for (uint64_t i = blockIdx.x * (uint64_t)blockDim.x + threadIdx.x; i < n;
         i += (uint64_t)blockDim.x * gridDim.x) {
        const float gv = ld(g[i]), uv = ld(u[i]), d = ld(dm[i]);
        const float s = 1.0f / (1.0f + __expf(-gv));
        du[i] = st<T>(d * gv * s);
        dg[i] = st<T>(d * uv * s * (1.0f + gv * (1.0f - s)));
    }
}

// Sum over the block (blockDim.x a multiple of 32, at most 1024); every thread gets it.
__device__ __forceinline__ float block_sum(float v, float *scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    v = warp_sum(v);
    __syncthreads();  // scratch may still be read from a previous call
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < warps ? scratch[lane] : 0.0f;
    return warp_sum(v);
}

// y = x · r · w with r = (mean(x²) + eps)^-½ per row:
//   dx = r · (g∘w) − x · r³ · mean(g∘w∘x)  (+ resid, the gradient arriving around the norm).
// One block per row.
template <typename T>
__device__ void rms_norm_bwd(const int cols, const float eps, const T *__restrict__ x,
                             const T *__restrict__ w, const T *__restrict__ g,
                             const T *__restrict__ resid, T *__restrict__ dx) {
    __shared__ float scratch[32];
    const uint64_t off = (uint64_t)blockIdx.x * cols;
    float ss = 0.0f, dot = 0.0f;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        const float xv = ld(x[off + c]);
        ss += xv * xv;
        dot += ld(g[off + c]) * ld(w[c]) * xv;
    }
    ss = block_sum(ss, scratch);
    dot = block_sum(dot, scratch);
    const float r = rsqrtf(ss / cols + eps);
    const float k = r * r * r * dot / cols;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        float v = r * ld(g[off + c]) * ld(w[c]) - ld(x[off + c]) * k;
        if (resid) v += ld(resid[off + c]);
        dx[off + c] = st<T>(v);
    }
}

// y = softmax(x) over rows of `cols`:  dx = y ∘ (g − Σ g∘y). One warp per row.
template <typename T>
__device__ void softmax_bwd(const uint64_t rows, const int cols, const T *__restrict__ y,
                            const T *__restrict__ g, T *__restrict__ dx) {
    const uint64_t row = blockIdx.x * (uint64_t)(blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= rows) return;
    const int lane = threadIdx.x & 31;
    const uint64_t off = row * cols;
    float dot = 0.0f;
    for (int c = lane; c < cols; c += 32) dot += ld(g[off + c]) * ld(y[off + c]);
    dot = warp_sum(dot);
    for (int c = lane; c < cols; c += 32) dx[off + c] = st<T>(ld(y[off + c]) * (ld(g[off + c]) - dot));
}

#define TRAIN_KERNELS(SUFFIX, T)                                                                  \
    extern "C" __global__ void silu_mul_bwd_##SUFFIX(const uint64_t n, const T *g, const T *u,     \
                                                     const T *dm, T *dg, T *du) {                 \
        silu_mul_bwd<T>(n, g, u, dm, dg, du);                                                     \
    }                                                                                             \
    extern "C" __global__ void rms_norm_bwd_##SUFFIX(const int cols, const float eps, const T *x,  \
                                                     const T *w, const T *g, const T *resid,      \
                                                     T *dx) {                                     \
        rms_norm_bwd<T>(cols, eps, x, w, g, resid, dx);                                           \
    }                                                                                             \
    extern "C" __global__ void softmax_bwd_##SUFFIX(const uint64_t rows, const int cols,           \
                                                    const T *y, const T *g, T *dx) {              \
        softmax_bwd<T>(rows, cols, y, g, dx);                                                     \
    }

TRAIN_KERNELS(f32, float)
TRAIN_KERNELS(bf16, __nv_bfloat16)
TRAIN_KERNELS(f16, __half)

// One AdamW update (decoupled weight decay, as torch.optim.AdamW) of f32 parameters and bf16
// moments, in place, with the gradient times gscale (gradient clipping): the composed update in
// src/train/optim.rs is a dozen tensor ops and three fresh buffers a variable, and a LoRA
// adapter has hundreds of small variables. The moments are computed in f32 and rounded back to
// bf16 stochastically (unbiased), with the random bits of src/train/optim.rs (rounding_bits).
struct AdamWArgs {
    float lr, beta1, beta2, eps, decay, bc1, bc2, gscale;
    uint32_t seed_m, seed_v;
};

__device__ __forceinline__ uint32_t rounding_bits(uint32_t seed, uint64_t i) {
    return lowbias32((uint32_t)i ^ lowbias32(seed ^ (uint32_t)(i >> 32)));
}

// `bf16_stochastic` of src/train/optim.rs: x rounded to bf16 up or down, unbiased.
__device__ __forceinline__ uint16_t bf16_stochastic(float x, uint32_t bits) {
    const uint32_t b = __float_as_uint(x);
    if (!isfinite(x)) return (uint16_t)((b >> 16) | (isnan(x) ? 0x40u : 0u));
    return (uint16_t)((b + (bits & 0xffffu)) >> 16);
}

extern "C" __global__ void adamw_f32(const uint64_t n, const AdamWArgs a, float *__restrict__ p,
                                     const float *__restrict__ g, uint16_t *__restrict__ m,
                                     uint16_t *__restrict__ v) {
    for (uint64_t i = blockIdx.x * (uint64_t)blockDim.x + threadIdx.x; i < n;
         i += (uint64_t)blockDim.x * gridDim.x) {
        const float gi = g[i] * a.gscale;
        const float m0 = __uint_as_float((uint32_t)m[i] << 16), v0 = __uint_as_float((uint32_t)v[i] << 16);
        const float mi = a.beta1 * m0 + (1.0f - a.beta1) * gi;
        const float vi = a.beta2 * v0 + (1.0f - a.beta2) * (gi * gi);
        const float update = (mi / a.bc1) / (sqrtf(vi / a.bc2) + a.eps);
        p[i] = p[i] * a.decay - a.lr * update;
        m[i] = bf16_stochastic(mi, rounding_bits(a.seed_m, i));
        v[i] = bf16_stochastic(vi, rounding_bits(a.seed_v, i));
    }
}

// Rotary embedding of the training forward, reading the projection's layout: x is
// [b, t, heads·hd] with rows x_row apart (a q or k projection's output), y is [b, heads, t, hd]
// contiguous, each interleaved pair (2i, 2i+1) of token tt rotated by cos/sin[tt, i] ([t, hd/2])
// and scaled (the attention's 1/√hd folded into q), in f32, rounded once. One thread a pair, in
// y's order.
extern "C" __global__ void rope_heads_bf16(const __nv_bfloat16 *__restrict__ x, const __nv_bfloat16 *__restrict__ cos,
                                           const __nv_bfloat16 *__restrict__ sin, __nv_bfloat16 *__restrict__ y,
                                           const int b, const int t, const int heads, const int hd,
                                           const long long x_row, const float scale) {
    const int half = hd / 2;
    const uint64_t pairs = (uint64_t)b * heads * t * half;
    for (uint64_t p = blockIdx.x * (uint64_t)blockDim.x + threadIdx.x; p < pairs; p += (uint64_t)blockDim.x * gridDim.x) {
        const int i = (int)(p % half);
        uint64_t rest = p / half;
        const int tt = (int)(rest % t);
        rest /= t;
        const int h = (int)(rest % heads);
        const uint64_t bb = rest / heads;
        const float2 v = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162 *>(x + (bb * t + tt) * x_row + (uint64_t)h * hd + 2 * i));
        const float c = __bfloat162float(cos[(uint64_t)tt * half + i]), s = __bfloat162float(sin[(uint64_t)tt * half + i]);
        reinterpret_cast<__nv_bfloat162 *>(y)[p] = __floats2bfloat162_rn((v.x * c - v.y * s) * scale, (v.x * s + v.y * c) * scale);
    }
}
