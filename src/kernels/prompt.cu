// Kernels of the prompt (prefill) path on CUDA (src/llm/model.rs): the attention softmax with
// its scale and causal / sliding-window mask in one pass over the scores, and SwiGLU's
// silu(gate) · up in one pass.
#include <stdint.h>

#include "common.cuh"

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

// Causal attention of one row's prompt queries over that row's keys, without the score matrix:
// each warp keeps a query's running maximum, sum and weighted values (online softmax) over tiles
// of 32 keys staged in shared memory. q: [nh, tq, hd] (after rotary); k, v: the row's cached keys
// and values, head h's key j at k + (h / (nh / nkv)) * kv_head_stride + j * hd (the cache buffer
// read in place, grouped-query heads sharing theirs); out: [tq, nh, hd], the o projection's
// input layout. Query i is position keys - tq + i and sees key j when j <= position and
// position - j < window. A block takes PA_QUERIES consecutive queries of one head, each warp
// PA_QUERIES / PA_WARPS of them; lane c owns output dims c, c + 32, ... (hd <= PA_HD).
#define PA_WARPS 4
#define PA_QUERIES 16
#define PA_KEYS 32
#define PA_HD 128
struct PromptAttnArgs {
    const float *q;
    const float *k;
    const float *v;
    float *out;
    long long kv_head_stride;
    int nh, nkv, tq, keys, hd, window;
    float scale;
};

extern "C" __global__ void __launch_bounds__(PA_WARPS * 32) prompt_attn_f32(const PromptAttnArgs a) {
    __shared__ float ks[PA_KEYS][PA_HD + 1];  // padded: lane j reads row j without bank conflicts
    __shared__ float vs[PA_KEYS][PA_HD];
    __shared__ float qs[PA_QUERIES][PA_HD];
    constexpr int QW = PA_QUERIES / PA_WARPS, C = PA_HD / 32;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, h = blockIdx.y, hd = a.hd;
    const int q0 = blockIdx.x * PA_QUERIES, first = a.keys - a.tq;
    const float *kh = a.k + (long long)(h / (a.nh / a.nkv)) * a.kv_head_stride;
    const float *vh = a.v + (long long)(h / (a.nh / a.nkv)) * a.kv_head_stride;
    for (int i = threadIdx.x; i < PA_QUERIES * hd; i += blockDim.x) {
        const int qi = q0 + i / hd;
        qs[i / hd][i % hd] = qi < a.tq ? a.q[((long long)h * a.tq + qi) * hd + i % hd] : 0.f;
    }
    // Keys any query of the block sees.
    const int p_lo = first + q0, p_hi = min(first + q0 + PA_QUERIES, a.keys) - 1;
    const int lo = max(0, p_lo - a.window + 1);
    float m[QW], l[QW], acc[QW][C];
#pragma unroll
    for (int i = 0; i < QW; i++) {
        m[i] = -INFINITY;
        l[i] = 0.f;
#pragma unroll
        for (int c = 0; c < C; c++) acc[i][c] = 0.f;
    }
    for (int t0 = lo; t0 <= p_hi; t0 += PA_KEYS) {
        __syncthreads();  // the previous tile (and, the first time, qs) is no longer read
        for (int i = threadIdx.x; i < PA_KEYS * hd; i += blockDim.x) {
            const int j = t0 + i / hd;
            const bool in = j < a.keys;
            ks[i / hd][i % hd] = in ? kh[(long long)j * hd + i % hd] : 0.f;
            vs[i / hd][i % hd] = in ? vh[(long long)j * hd + i % hd] : 0.f;
        }
        __syncthreads();
#pragma unroll
        for (int i = 0; i < QW; i++) {
            const int qr = warp * QW + i, qi = q0 + qr, pos = first + qi;
            if (qi >= a.tq) break;  // warp-uniform
            const int j = t0 + lane;
            const bool visible = j < a.keys && j <= pos && pos - j < a.window;
            float s = -INFINITY;
            if (visible) {
                float dot = 0.f;
#pragma unroll 8
                for (int d = 0; d < hd; d++) dot = fmaf(qs[qr][d], ks[lane][d], dot);
                s = __fmul_rn(dot, a.scale);
            }
            if (!__any_sync(0xffffffffu, visible)) continue;  // no key of this tile is visible to it
            // A NaN score is skipped by the maximum but reaches p, so the output turns NaN.
            const float m_new = fmaxf(m[i], warp_max(s));
            const float p = visible ? expf(s - m_new) : 0.f;
            const float corr = expf(m[i] - m_new);  // 0 while nothing was seen (m = -inf)
            l[i] = l[i] * corr + warp_sum(p);
#pragma unroll
            for (int c = 0; c < C; c++) acc[i][c] *= corr;
            for (int jj = 0; jj < PA_KEYS; jj++) {
                const float pj = __shfl_sync(0xffffffffu, p, jj);
                if (pj == 0.f) continue;  // warp-uniform: masked or underflowed
#pragma unroll
                for (int c = 0; c < C; c++)
                    if (lane + 32 * c < hd) acc[i][c] = fmaf(pj, vs[jj][lane + 32 * c], acc[i][c]);
            }
            m[i] = m_new;
        }
    }
#pragma unroll
    for (int i = 0; i < QW; i++) {
        const int qi = q0 + warp * QW + i;
        if (qi >= a.tq) break;
#pragma unroll
        for (int c = 0; c < C; c++)
            if (lane + 32 * c < hd) a.out[((long long)qi * a.nh + h) * hd + lane + 32 * c] = acc[i][c] / l[i];
    }
}
