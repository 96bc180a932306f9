// Kernels of the prompt (prefill) path on CUDA (src/llm/model.rs): the attention softmax with
// its scale and causal / sliding-window mask in one pass over the scores, and SwiGLU's
// silu(gate) · up in one pass.
#include <stdint.h>

#include "common.cuh"

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// probs = softmax(scale · scores + mask) over the last axis, for scores [rows, tq, keys] f32
// (rows = batch × heads): query qi is position keys - tq + qi of the row and sees keys k with
// k <= q and q - k < window (the diagonal always). Masked probabilities are written as 0, the
// value exp(-inf) gives. One warp a query row: the largest visible score, the sum of the
// exponentials, then the quotients (the operations of scale, mask add and softmax composed:
// x·scale rounded once, expf(v - max), divided by the sum).
extern "C" __global__ void causal_softmax_f32(const float* __restrict__ s, float* __restrict__ p, int64_t lines, int tq,
                                              int keys, int window, float scale) {
    const int lane = threadIdx.x & 31;
    const int64_t line = (int64_t)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (line >= lines) return;
    const int q = keys - tq + (int)(line % tq);
    const int lo = q - window + 1 > 0 ? q - window + 1 : 0;
    const float* src = s + line * keys;
    float* dst = p + line * keys;
    float m = -INFINITY;
    for (int k = lo + lane; k <= q; k += 32) m = fmaxf(m, __fmul_rn(src[k], scale));
    m = warp_max(m);
    float sum = 0.f;
    for (int k = lo + lane; k <= q; k += 32) sum += expf(__fmul_rn(src[k], scale) - m);
    sum = warp_sum(sum);
    for (int k = lane; k < keys; k += 32) dst[k] = (k >= lo && k <= q) ? expf(__fmul_rn(src[k], scale) - m) / sum : 0.f;
}

// y = silu(g) · u elementwise (SwiGLU over the gate and up projections): candle's silu,
// g / (1 + exp(-g)), then its product, in one pass instead of two.
extern "C" __global__ void silu_mul_f32(const float* __restrict__ g, const float* __restrict__ u, float* __restrict__ y,
                                        int64_t n) {
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
        const float x = g[i];
        y[i] = __fmul_rn(x / (1.f + expf(-x)), u[i]);
    }
}
