// Kernels of the prompt (prefill) path on CUDA (src/llm/model.rs): RMSNorm and SwiGLU's
// silu(gate) · up in one pass each, writing the 16-bit copy the next projection reads beside the
// f32 result; the rotary embedding with the cache append; flash attention straight from the cache;
// and, for the composed attention it is tested against, the softmax with its scale and causal /
// sliding-window mask in one pass over the scores.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include "common.cuh"

// probs = softmax(scale · scores + mask) over the last axis, for scores [lines, keys] (f32 or bf16) whose
// line i is query qi = i mod tq (heads, and the query heads folded into the line axis, follow
// one another): query qi is position q = keys - tq + qi of the row and sees keys k with k <= q
// and q - k < window (the diagonal always). Masked probabilities are written as 0, the
// value exp(-inf) gives. One warp a query row: the largest visible score, the sum of the
// exponentials, then the quotients (the operations of scale, mask add and softmax composed:
// x·scale rounded once, expf(v - max), divided by the sum).
template <typename T, float (*LOAD)(T), T (*STORE)(float)>
__device__ __forceinline__ void causal_softmax(const T* __restrict__ s, T* __restrict__ p, int64_t lines, int tq, int keys,
                                               int window, float scale) {
    const int lane = threadIdx.x & 31;
    const int64_t line = (int64_t)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (line >= lines) return;
    const int q = keys - tq + (int)(line % tq);
    const int lo = q - window + 1 > 0 ? q - window + 1 : 0;
    const T* src = s + line * keys;
    T* dst = p + line * keys;
    float m = -INFINITY;
    for (int k = lo + lane; k <= q; k += 32) m = fmaxf(m, __fmul_rn(LOAD(src[k]), scale));
    m = warp_max(m);
    float sum = 0.f;
    for (int k = lo + lane; k <= q; k += 32) sum += expf(__fmul_rn(LOAD(src[k]), scale) - m);
    sum = warp_sum(sum);
    for (int k = lane; k < keys; k += 32) dst[k] = STORE((k >= lo && k <= q) ? expf(__fmul_rn(LOAD(src[k]), scale) - m) / sum : 0.f);
}

__device__ __forceinline__ float load_f32(float v) { return v; }
__device__ __forceinline__ float store_f32(float v) { return v; }
__device__ __forceinline__ float load_bf16(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ __nv_bfloat16 store_bf16(float v) { return __float2bfloat16_rn(v); }

// The 16-bit copy of a prompt-path result that the next projection reads as its input: bf16 for
// the dense GEMM, f16 (`half`) for the f16 tensor-core kernel. Element i, and the pair i, i + 1.
__device__ __forceinline__ void store_copy(void *p, long long i, float v, bool half) {
    if (half) reinterpret_cast<__half *>(p)[i] = __float2half_rn(v);
    else reinterpret_cast<__nv_bfloat16 *>(p)[i] = __float2bfloat16_rn(v);
}
__device__ __forceinline__ void store_copy2(void *p, long long i, float a, float b, bool half) {
    if (half) *reinterpret_cast<__half2 *>(reinterpret_cast<__half *>(p) + i) = __floats2half2_rn(a, b);
    else *reinterpret_cast<__nv_bfloat162 *>(reinterpret_cast<__nv_bfloat16 *>(p) + i) = __floats2bfloat162_rn(a, b);
}

extern "C" __global__ void causal_softmax_f32(const float* __restrict__ s, float* __restrict__ p, int64_t lines, int tq,
                                              int keys, int window, float scale) {
    causal_softmax<float, load_f32, store_f32>(s, p, lines, tq, keys, window, scale);
}

// The same over bf16 scores (the training forward's), the probabilities rounded to bf16 once.
extern "C" __global__ void causal_softmax_bf16(const __nv_bfloat16* __restrict__ s, __nv_bfloat16* __restrict__ p,
                                               int64_t lines, int tq, int keys, int window, float scale) {
    causal_softmax<__nv_bfloat16, load_bf16, store_bf16>(s, p, lines, tq, keys, window, scale);
}

// y = silu(g) · u elementwise (SwiGLU over the gate and up projections): candle's silu,
// g / (1 + exp(-g)), then its product, in one pass instead of two; with yc, also y rounded to
// bf16, or f16 with `half` (the down projection's input, so it needs no cast of its own). g and u are `rows`
// rows of `cols` values, g_row and u_row apart (column slices of one wider GEMM output, or
// contiguous); y and yc are contiguous. Rows along grid y, columns along x; with vec4 (cols, the
// row strides and the addresses multiples of 4 floats) four values a thread at a time.
__device__ __forceinline__ float silu_times(float x, float u) { return __fmul_rn(x / (1.f + expf(-x)), u); }

extern "C" __global__ void silu_mul_f32(const float* __restrict__ g, const float* __restrict__ u, float* __restrict__ y,
                                        void* __restrict__ yc, int half, int rows, int cols, long long g_row, long long u_row, int vec4) {
    for (int r = blockIdx.y; r < rows; r += gridDim.y) {
        const float *gr = g + r * g_row, *ur = u + r * u_row;
        float *yr = y + (long long)r * cols;
        const long long row0 = (long long)r * cols;
        if (vec4) {
            for (int c = 4 * (blockIdx.x * blockDim.x + threadIdx.x); c < cols; c += 4 * gridDim.x * blockDim.x) {
                const float4 a = *reinterpret_cast<const float4 *>(gr + c), b = *reinterpret_cast<const float4 *>(ur + c);
                const float4 v = make_float4(silu_times(a.x, b.x), silu_times(a.y, b.y), silu_times(a.z, b.z), silu_times(a.w, b.w));
                *reinterpret_cast<float4 *>(yr + c) = v;
                if (yc != nullptr) {
                    store_copy2(yc, row0 + c, v.x, v.y, half);
                    store_copy2(yc, row0 + c + 2, v.z, v.w, half);
                }
            }
        } else {
            for (int c = blockIdx.x * blockDim.x + threadIdx.x; c < cols; c += gridDim.x * blockDim.x) {
                const float v = silu_times(gr[c], ur[c]);
                yr[c] = v;
                if (yc != nullptr) store_copy(yc, row0 + c, v, half);
            }
        }
    }
}

// silu_mul_f32 for bf16 g, u and y (the training forward's activations): each value computed in
// f32 and rounded once; with vec2 (cols, the row strides and the addresses even) two values a
// thread at a time.
extern "C" __global__ void silu_mul_bf16(const __nv_bfloat16* __restrict__ g, const __nv_bfloat16* __restrict__ u,
                                         __nv_bfloat16* __restrict__ y, int rows, int cols, long long g_row, long long u_row, int vec2) {
    for (int r = blockIdx.y; r < rows; r += gridDim.y) {
        const __nv_bfloat16 *gr = g + r * g_row, *ur = u + r * u_row;
        __nv_bfloat16 *yr = y + (long long)r * cols;
        if (vec2) {
            for (int c = 2 * (blockIdx.x * blockDim.x + threadIdx.x); c < cols; c += 2 * gridDim.x * blockDim.x) {
                const float2 a = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162 *>(gr + c));
                const float2 b = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162 *>(ur + c));
                *reinterpret_cast<__nv_bfloat162 *>(yr + c) = __floats2bfloat162_rn(silu_times(a.x, b.x), silu_times(a.y, b.y));
            }
        } else {
            for (int c = blockIdx.x * blockDim.x + threadIdx.x; c < cols; c += gridDim.x * blockDim.x) {
                yr[c] = __float2bfloat16_rn(silu_times(__bfloat162float(gr[c]), __bfloat162float(ur[c])));
            }
        }
    }
}

// RMSNorm of each row of x: [rows, n] f32, y = x · w / sqrt(mean(x²) + eps), written as f32 (y)
// and rounded to bf16, or f16 with `half` (yc: the projections' input, so it needs no cast of
// its own). One block a row.
extern "C" __global__ void rms_norm_pair_f32(const float* __restrict__ x, const float* __restrict__ w, float* __restrict__ y,
                                             void* __restrict__ yc, int half, int n, float eps) {
    __shared__ float part[32];
    const int64_t row = blockIdx.x;
    const float* xr = x + row * n;
    // Four values a thread at a time where n is a multiple of 4 and the buffers start 16-byte
    // aligned (8 for the copy), so every row does.
    const auto at = [](const void *p, uintptr_t a) { return (reinterpret_cast<uintptr_t>(p) & (a - 1)) == 0; };
    const bool vec = (n & 3) == 0 && at(x, 16) && at(w, 16) && at(y, 16) && at(yc, 8);
    const float4 *x4 = reinterpret_cast<const float4 *>(xr), *w4 = reinterpret_cast<const float4 *>(w);
    float ss = 0.f;
    if (vec) {
        for (int i = threadIdx.x; i < n / 4; i += blockDim.x) {
            const float4 v = x4[i];
            ss += v.x * v.x + v.y * v.y + v.z * v.z + v.w * v.w;
        }
    } else {
        for (int i = threadIdx.x; i < n; i += blockDim.x) ss += xr[i] * xr[i];
    }
    ss = warp_sum(ss);
    if ((threadIdx.x & 31) == 0) part[threadIdx.x >> 5] = ss;
    __syncthreads();
    // Every warp sums the warps' partial sums itself.
    const int lane = threadIdx.x & 31;
    ss = warp_sum(lane < (int)(blockDim.x >> 5) ? part[lane] : 0.f);
    const float scale = rsqrtf(ss / n + eps);
    if (vec) {
        for (int i = threadIdx.x; i < n / 4; i += blockDim.x) {
            const float4 v = x4[i], g = w4[i];
            const float4 o = make_float4(scale * v.x * g.x, scale * v.y * g.y, scale * v.z * g.z, scale * v.w * g.w);
            reinterpret_cast<float4 *>(y + row * n)[i] = o;
            store_copy2(yc, row * n + 4 * i, o.x, o.y, half);
            store_copy2(yc, row * n + 4 * i + 2, o.z, o.w, half);
        }
    } else {
        for (int i = threadIdx.x; i < n; i += blockDim.x) {
            const float v = scale * xr[i] * w[i];
            y[row * n + i] = v;
            store_copy(yc, row * n + i, v, half);
        }
    }
}

// Rotary embedding of a prompt's queries and keys (interleaved pairs, as rope_append_f32 in
// decode.cu), with the keys and values written into the row's cache: q, k, v: [t, nh·hd] and
// [t, nkv·hd] (the projections' outputs); token i at rotary position pos0 + i (cos, sin: [positions,
// hd/2]) and cache index at + i. q_out: [t, nh·hd]; k_cache, v_cache: [nkv, cap, hd] (the row's
// buffers). Token i's row of q, k and v starts i * q_row, k_row, v_row floats in (column slices
// of one wider GEMM output, or contiguous). One block per token, a thread per pair of every head
// in turn.
struct RopePromptArgs {
    const float *q, *k, *v, *cos, *sin;
    float *q_out, *k_cache, *v_cache;
    long long q_row, k_row, v_row;
    int nh, nkv, hd, cap, pos0, at;
};

extern "C" __global__ void rope_prompt_f32(const RopePromptArgs p) {
    const int i = blockIdx.x, half = p.hd / 2;
    for (int e = threadIdx.x; e < (p.nh + 2 * p.nkv) * half; e += blockDim.x) {
        const int head = e / half, j = e % half;
        const float2 *src;
        float2 *dst;
        if (head < p.nh) {
            src = reinterpret_cast<const float2 *>(p.q + i * p.q_row + (long long)head * p.hd);
            dst = reinterpret_cast<float2 *>(p.q_out + ((long long)i * p.nh + head) * p.hd);
        } else {
            const bool is_k = head < p.nh + p.nkv;
            const int kh = head - p.nh - (is_k ? 0 : p.nkv);
            src = reinterpret_cast<const float2 *>(is_k ? p.k + i * p.k_row + (long long)kh * p.hd : p.v + i * p.v_row + (long long)kh * p.hd);
            dst = reinterpret_cast<float2 *>((is_k ? p.k_cache : p.v_cache) + ((long long)kh * p.cap + p.at + i) * p.hd);
            if (!is_k) {
                dst[j] = src[j];
                continue;
            }
        }
        const long long at = (long long)(p.pos0 + i) * half + j;
        const float c = p.cos[at], s = p.sin[at];
        const float2 x = src[j];
        dst[j] = make_float2(x.x * c - x.y * s, x.x * s + x.y * c);
    }
}

// Causal attention of one row's prompt queries over that row's keys, without the score matrix
// (flash attention): each warp keeps 16 queries' running maximum, sum and weighted values
// (online softmax) over tiles of 32 keys staged in shared memory, both products on the tensor
// cores. q: query i of head h at q + h * q_head_stride + i * q_row_stride (after rotary: [nh, tq,
// hd], or the [tq, nh, hd] rope_prompt_f32 writes); k, v: the row's cached keys and values, head h's key j
// at k + (h / (nh / nkv)) * kv_head_stride + j * hd (the cache buffer read in place,
// grouped-query heads sharing theirs); out: [tq, nh, hd], the o projection's input layout. Query
// i is position keys - tq + i and sees key j when j <= position and position - j < window. A
// block takes PA_QUERIES consecutive queries of one head, 16 a warp; hd is a multiple of 8 up to
// PA_HD, every row 16-byte aligned. The next tile of K and V is copied in (cp.async) while the
// warps work on the current one; dynamic shared memory of PA_SMEM_FLOATS floats.
//
// The products run as tf32 MMAs (m16n8k8) on operands split in two, x = hi + lo with hi = x
// rounded to tf32 and lo = the rest rounded to tf32, summing lo·hi + hi·lo + hi·hi in f32: about
// f32's precision (the lo·lo term is below its rounding), so the result stays within rounding of
// the f32 composition it replaces.
#define PA_WARPS 4
#define PA_QUERIES (16 * PA_WARPS)
#define PA_KEYS 32
#define PA_HD 128
#define PA_KS (PA_HD + 4)    // row stride of the K tile: B-fragment loads hit 32 banks
#define PA_VS (PA_HD + 8)    // and of the V tile (its fragments walk keys, not dims)
#define PA_PS (PA_KEYS + 4)  // and of a warp's probabilities
#define PA_SMEM_FLOATS (2 * PA_KEYS * (PA_KS + PA_VS) + PA_QUERIES * PA_PS)
struct PromptAttnArgs {
    const float *q;
    const float *k;
    const float *v;
    float *out;
    void *out_copy;  // or null: out rounded to bf16, or f16 with copy_half (the o projection's input)
    long long kv_head_stride, q_head_stride, q_row_stride;
    int nh, nkv, tq, keys, hd, window, copy_half;
    float scale;
};

// x = hi + lo as two tf32 values. Volatile so the compiler does not hoist the query's splits out
// of the key-tile loop: kept for every tile they need 128 more registers and spill.
__device__ __forceinline__ void split_tf32(float x, uint32_t &hi, uint32_t &lo) {
    asm volatile("cvt.rna.tf32.f32 %0, %1;" : "=r"(hi) : "f"(x));
    asm volatile("cvt.rna.tf32.f32 %0, %1;" : "=r"(lo) : "f"(x - __uint_as_float(hi)));
}

__device__ __forceinline__ void mma_tf32(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
    asm("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// c[n] += a · b[n] for N 8-wide column blocks, the A fragment and the B fragments given as tf32
// halves: each term over all N accumulators before the next (independent MMAs back to back), the
// small terms first.
template <int N>
__device__ __forceinline__ void mma_tf32x3(float (&c)[N][4], const uint32_t (&ah)[4], const uint32_t (&al)[4], const uint32_t (&bh)[N][2],
                                           const uint32_t (&bl)[N][2]) {
#pragma unroll
    for (int n = 0; n < N; n++) mma_tf32(c[n], al, bh[n]);
#pragma unroll
    for (int n = 0; n < N; n++) mma_tf32(c[n], ah, bl[n]);
#pragma unroll
    for (int n = 0; n < N; n++) mma_tf32(c[n], ah, bh[n]);
}

// 16 bytes global → shared without passing through registers; zeros when !in.
__device__ __forceinline__ void cp_async16(float *dst, const float *src, bool in) {
    const unsigned d = (unsigned)__cvta_generic_to_shared(dst);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(d), "l"(src), "r"(in ? 16 : 0));
}

// One key tile's online-softmax step for a warp's 16 queries, in the MMA accumulator layout:
// s[j] holds the scores of keys t0 + 8j + 2t (+1) for query rows r0 (e < 2) and r1 (e >= 2), at
// positions pos0 and pos1 (live when inside the prompt). Masked scores become −∞ and, with
// SCALED, visible ones are multiplied by `scale` (as the composition rounds them: the product,
// then times the scale); then the running maxima m and sums l move on, s turns into the
// probabilities, and the output accumulators o are rescaled. The scores are natural-log units
// (expf), or base-2 units with BASE2 (exp2f). A NaN score is skipped by the maximum but reaches
// the sum; a row that has seen nothing yet keeps its zeros (exp(-inf - -inf) is never taken).
template <int J, int C, bool SCALED, bool BASE2>
__device__ __forceinline__ void online_softmax_tile(float (&s)[J][4], float (&o)[C][4], float &m0, float &m1, float &l0, float &l1, int t0, int t,
                                                    int pos0, int pos1, bool live0, bool live1, int keys, int window, float scale) {
    constexpr unsigned FULL = 0xffffffffu;
    const auto ex = [](float x) { return BASE2 ? exp2f(x) : expf(x); };
    float mx0 = -INFINITY, mx1 = -INFINITY;
#pragma unroll
    for (int j = 0; j < J; j++)
#pragma unroll
        for (int e = 0; e < 4; e++) {
            const int key = t0 + 8 * j + 2 * t + (e & 1), pos = e < 2 ? pos0 : pos1;
            const bool vis = (e < 2 ? live0 : live1) && key < keys && key <= pos && pos - key < window;
            s[j][e] = vis ? (SCALED ? __fmul_rn(s[j][e], scale) : s[j][e]) : -INFINITY;
            if (e < 2) mx0 = fmaxf(mx0, s[j][e]);
            else mx1 = fmaxf(mx1, s[j][e]);
        }
    mx0 = fmaxf(mx0, __shfl_xor_sync(FULL, mx0, 1));
    mx0 = fmaxf(mx0, __shfl_xor_sync(FULL, mx0, 2));
    mx1 = fmaxf(mx1, __shfl_xor_sync(FULL, mx1, 1));
    mx1 = fmaxf(mx1, __shfl_xor_sync(FULL, mx1, 2));
    const float n0 = fmaxf(m0, mx0), n1 = fmaxf(m1, mx1);
    const float c0 = n0 == -INFINITY ? 1.f : ex(m0 - n0), c1 = n1 == -INFINITY ? 1.f : ex(m1 - n1);
    float sum0 = 0.f, sum1 = 0.f;
#pragma unroll
    for (int j = 0; j < J; j++)
#pragma unroll
        for (int e = 0; e < 4; e++) {
            const float nm = e < 2 ? n0 : n1;
            const float p = nm == -INFINITY ? 0.f : ex(s[j][e] - nm);
            s[j][e] = p;
            if (e < 2) sum0 += p;
            else sum1 += p;
        }
    sum0 += __shfl_xor_sync(FULL, sum0, 1);
    sum0 += __shfl_xor_sync(FULL, sum0, 2);
    sum1 += __shfl_xor_sync(FULL, sum1, 1);
    sum1 += __shfl_xor_sync(FULL, sum1, 2);
    l0 = l0 * c0 + sum0;
    l1 = l1 * c1 + sum1;
    m0 = n0;
    m1 = n1;
#pragma unroll
    for (int c = 0; c < C; c++) {
        o[c][0] *= c0;
        o[c][1] *= c0;
        o[c][2] *= c1;
        o[c][3] *= c1;
    }
}

// A warp's attention output divided by its sums, into out[tq, nh, hd] (and out_copy unless null):
// o[c] holds columns 8c + 2t (+1) of query rows r0 (0, 1) and r1 (2, 3) of head h, the
// accumulator layout; rows past the prompt are not written.
template <int C>
__device__ __forceinline__ void store_attention_rows(const PromptAttnArgs &a, const float (&o)[C][4], float l0, float l1, bool live0, bool live1, int r0,
                                                     int r1, int h, int t) {
#pragma unroll
    for (int c = 0; c < C; c++) {
        if (8 * c >= a.hd) break;
#pragma unroll
        for (int half = 0; half < 2; half++) {
            if (!(half ? live1 : live0)) continue;
            const float l = half ? l1 : l0;
            const float2 v = make_float2(o[c][2 * half] / l, o[c][2 * half + 1] / l);
            const long long at = ((long long)(half ? r1 : r0) * a.nh + h) * a.hd + 8 * c + 2 * t;
            *reinterpret_cast<float2 *>(a.out + at) = v;
            if (a.out_copy != nullptr) store_copy2(a.out_copy, at, v.x, v.y, a.copy_half);
        }
    }
}

// Which queries and keys a warp of a prompt attention kernel (prompt_attn_f32, prompt_attn_half)
// works on: its block's queries from qb (the blocks of the last queries see the most keys, so
// they start first), the warp's wn of them from wq (none past the prompt), this thread's two rows
// r0, r1 = r0 + 8 (g and g + 8 in the MMA fragments) at positions pos0, pos1, live when inside
// the prompt; the head's K and V; and the keys any query of the block sees, lo..p_hi.
struct AttnWarp {
    int qb, first, wq, wn, r0, r1, pos0, pos1, lo, p_hi;
    bool live0, live1;
    const float *kh, *vh;

    __device__ __forceinline__ AttnWarp(const PromptAttnArgs &a, int warp, int g) {
        qb = (gridDim.x - 1 - blockIdx.x) * PA_QUERIES;
        first = a.keys - a.tq;
        const long long kv = (long long)(blockIdx.y / (a.nh / a.nkv)) * a.kv_head_stride;
        kh = a.k + kv;
        vh = a.v + kv;
        wq = qb + warp * 16;
        wn = min(16, a.tq - wq);
        r0 = wq + g;
        r1 = r0 + 8;
        pos0 = first + r0;
        pos1 = first + r1;
        live0 = r0 < a.tq;
        live1 = r1 < a.tq;
        p_hi = first + min(qb + PA_QUERIES, a.tq) - 1;
        lo = max(0, first + qb - a.window + 1);
    }
    // Whether any of the warp's queries sees a key of the tile t0..t0 + keys - 1.
    __device__ __forceinline__ bool sees(const PromptAttnArgs &a, int t0, int keys) const {
        return wn > 0 && t0 <= first + wq + wn - 1 && t0 + keys - 1 >= first + wq - a.window + 1;
    }
};

extern "C" __global__ void __launch_bounds__(PA_WARPS * 32, 2) prompt_attn_f32(const PromptAttnArgs a) {
    extern __shared__ __align__(16) float smem[];
    float *const ksb = smem, *const vsb = smem + 2 * PA_KEYS * PA_KS, *const ps = vsb + 2 * PA_KEYS * PA_VS;
    constexpr int C = PA_HD / 8;  // 8-wide column blocks of a head
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3, hd = a.hd, h = blockIdx.y;
    const AttnWarp w(a, warp, g);
    const int r0 = w.r0, r1 = w.r1;
    const float *kh = w.kh, *vh = w.vh;
    // Q as A fragments, kept in registers: [c][e] is row (e & 1 ? r1 : r0), column 8c + t + (e & 2 ? 4 : 0).
    float qf[C][4];
#pragma unroll
    for (int c = 0; c < C; c++)
#pragma unroll
        for (int e = 0; e < 4; e++) {
            const int r = e & 1 ? r1 : r0, col = 8 * c + t + (e & 2 ? 4 : 0);
            qf[c][e] = r < a.tq && col < hd ? a.q[h * a.q_head_stride + r * a.q_row_stride + col] : 0.f;
        }
    float o[C][4], m0 = -INFINITY, m1 = -INFINITY, l0 = 0.f, l1 = 0.f;
#pragma unroll
    for (int c = 0; c < C; c++) o[c][0] = o[c][1] = o[c][2] = o[c][3] = 0.f;
    const int p_hi = w.p_hi, lo = w.lo, hd4 = hd >> 2;
    // Tile n (keys t0..t0 + PA_KEYS - 1) into buffer n & 1, zeros past the last key.
    const auto load_tile = [&](int t0, int buf) {
        float *ks = ksb + buf * PA_KEYS * PA_KS, *vs = vsb + buf * PA_KEYS * PA_VS;
        for (int i = threadIdx.x; i < PA_KEYS * hd4; i += blockDim.x) {
            const int j = i / hd4, col = (i % hd4) * 4;
            const bool in = t0 + j < a.keys;
            const long long at = in ? (long long)(t0 + j) * hd + col : 0;
            cp_async16(ks + j * PA_KS + col, kh + at, in);
            cp_async16(vs + j * PA_VS + col, vh + at, in);
        }
        asm volatile("cp.async.commit_group;");
    };
    float *pw = ps + warp * 16 * PA_PS;
    load_tile(lo, 0);
    for (int t0 = lo, n = 0; t0 <= p_hi; t0 += PA_KEYS, n++) {
        // Start the next tile's copy, then wait for this one's (each thread for its own copies,
        // the barrier for everyone's).
        if (t0 + PA_KEYS <= p_hi) load_tile(t0 + PA_KEYS, (n + 1) & 1);
        else asm volatile("cp.async.commit_group;");
        asm volatile("cp.async.wait_group 1;" ::: "memory");
        __syncthreads();
        const float *ks = ksb + (n & 1) * PA_KEYS * PA_KS, *vs = vsb + (n & 1) * PA_KEYS * PA_VS;
        // Warp-uniform: some key of this tile is visible to some query of the warp.
        if (w.sees(a, t0, PA_KEYS)) {
            // Scores of the tile: s[j] holds keys t0 + 8j + 2t (+1), rows r0 (e < 2) and r1.
            float s[4][4];
#pragma unroll
            for (int j = 0; j < 4; j++) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
#pragma unroll
            for (int c = 0; c < C; c++) {
                if (8 * c >= hd) break;
                uint32_t ah[4], al[4], bh[4][2], bl[4][2];
                // A fragment order: (r0, t), (r1, t), (r0, t + 4), (r1, t + 4).
#pragma unroll
                for (int e = 0; e < 4; e++) split_tf32(qf[c][e], ah[e], al[e]);
#pragma unroll
                for (int j = 0; j < 4; j++) {
                    const float *kr = ks + (8 * j + g) * PA_KS + 8 * c + t;
                    split_tf32(kr[0], bh[j][0], bl[j][0]);
                    split_tf32(kr[4], bh[j][1], bl[j][1]);
                }
                mma_tf32x3<4>(s, ah, al, bh, bl);
            }
            online_softmax_tile<4, C, true, false>(s, o, m0, m1, l0, l1, t0, t, w.pos0, w.pos1, w.live0, w.live1, a.keys, a.window, a.scale);
            // The probabilities go through shared memory from the accumulator layout to A
            // fragments.
#pragma unroll
            for (int j = 0; j < 4; j++) {
                *reinterpret_cast<float2 *>(pw + g * PA_PS + 8 * j + 2 * t) = make_float2(s[j][0], s[j][1]);
                *reinterpret_cast<float2 *>(pw + (g + 8) * PA_PS + 8 * j + 2 * t) = make_float2(s[j][2], s[j][3]);
            }
            __syncwarp();
#pragma unroll
            for (int kk = 0; kk < PA_KEYS; kk += 8) {
                uint32_t ah[4], al[4];
                split_tf32(pw[g * PA_PS + kk + t], ah[0], al[0]);
                split_tf32(pw[(g + 8) * PA_PS + kk + t], ah[1], al[1]);
                split_tf32(pw[g * PA_PS + kk + t + 4], ah[2], al[2]);
                split_tf32(pw[(g + 8) * PA_PS + kk + t + 4], ah[3], al[3]);
                // Four 8-wide column blocks at a time.
#pragma unroll
                for (int c4 = 0; c4 < C; c4 += 4) {
                    if (8 * c4 >= hd) break;
                    uint32_t bh[4][2], bl[4][2];
#pragma unroll
                    for (int c = 0; c < 4; c++) {
                        // Columns past hd read zeros' neighbours in the padded row: harmless, never written.
                        const float *vr = vs + (kk + t) * PA_VS + 8 * (c4 + c) + g;
                        split_tf32(vr[0], bh[c][0], bl[c][0]);
                        split_tf32(vr[4 * PA_VS], bh[c][1], bl[c][1]);
                    }
                    mma_tf32x3<4>(*reinterpret_cast<float(*)[4][4]>(&o[c4]), ah, al, bh, bl);
                }
            }
            __syncwarp();  // the probabilities are read before the next tile writes them
        }
        __syncthreads();  // this tile's buffer is refilled two tiles on
    }
    store_attention_rows<C>(a, o, l0, l1, w.live0, w.live1, r0, r1, h, t);
}

// The same attention on 16-bit tensor cores (m16n8k16, f32 accumulation), one MMA where the f32
// kernel above runs three on split operands, twice the k a step. q (times the score scale) and k
// go in as f16, whose 11-bit significand keeps the scores, which the softmax exponentiates, 8×
// closer than bf16 would (a key value past f16's 65504 becomes infinite: its score turns +∞ or
// NaN, which makes the row's output NaN, or −∞, which drops that key); the probabilities and v
// go in as bf16, which keeps v's range. The scores, the online softmax and the output stay f32. The probabilities pass from the
// score accumulators to the next product's A fragments in registers, V's fragments are read
// transposed by ldmatrix, and K and V tiles of PB_KEYS keys are converted as they are staged in
// shared memory (static, 2 × PB_KEYS × PB_S values). Same arguments, grid and block as the f32
// kernel (PA_WARPS warps, 16 queries each); hd a multiple of 16 up to PA_HD.
#define PB_KEYS 64
#define PB_S (PA_HD + 8)  // row stride (bf16) of the K and V tiles: conflict-free fragment reads

__device__ __forceinline__ uint32_t pack_bf16x2(float lo, float hi) {
    const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<const uint32_t *>(&v);
}

__device__ __forceinline__ uint32_t pack_f16x2(float lo, float hi) {
    const __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<const uint32_t *>(&v);
}

__device__ __forceinline__ void mma_bf16_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ void mma_f16_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Four 8×8 bf16 matrices from shared memory, transposed: lane L gives the address of row L % 8
// of matrix L / 8 and receives, of matrix i, rows 2(L % 4) and 2(L % 4) + 1 of column L / 4.
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const __nv_bfloat16 *p) {
    const unsigned a = (unsigned)__cvta_generic_to_shared(p);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];" : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(a));
}

extern "C" __global__ void __launch_bounds__(PA_WARPS * 32, 2) prompt_attn_half(const PromptAttnArgs a) {
    __shared__ __align__(16) __half ks[PB_KEYS * PB_S];
    __shared__ __align__(16) __nv_bfloat16 vs[PB_KEYS * PB_S];
    constexpr int C = PA_HD / 8, KC = PA_HD / 16, J = PB_KEYS / 8;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3, hd = a.hd, h = blockIdx.y;
    const AttnWarp w(a, warp, g);
    const int r0 = w.r0, r1 = w.r1;
    const float *kh = w.kh, *vh = w.vh;
    // Scores are kept in base-2 units (exp2 of them is the exponential of the scaled score): q
    // is scaled by that before it is rounded.
    const float sl = a.scale * 1.4426950408889634f;
    // Q as f16 A fragments: [kc] holds rows r0 / r1, columns 16kc + 2t (+1) and 16kc + 8 + 2t (+1).
    uint32_t qf[KC][4];
#pragma unroll
    for (int kc = 0; kc < KC; kc++)
#pragma unroll
        for (int e = 0; e < 4; e++) {
            const int r = e & 1 ? r1 : r0, col = 16 * kc + 2 * t + (e & 2 ? 8 : 0);
            const float *src = a.q + h * a.q_head_stride + (long long)r * a.q_row_stride + col;
            qf[kc][e] = r < a.tq && col < hd ? pack_f16x2(src[0] * sl, src[1] * sl) : 0u;
        }
    float o[C][4], m0 = -INFINITY, m1 = -INFINITY, l0 = 0.f, l1 = 0.f;
#pragma unroll
    for (int c = 0; c < C; c++) o[c][0] = o[c][1] = o[c][2] = o[c][3] = 0.f;
    const int p_hi = w.p_hi, lo = w.lo, hd4 = hd >> 2;
    for (int t0 = lo; t0 <= p_hi; t0 += PB_KEYS) {
        __syncthreads();  // every warp is done with the previous tile
#pragma unroll 4
        for (int i = threadIdx.x; i < PB_KEYS * hd4; i += blockDim.x) {
            const int j = i / hd4, col = (i % hd4) * 4;
            const bool in = t0 + j < a.keys;
            const float4 kx = in ? *reinterpret_cast<const float4 *>(kh + (long long)(t0 + j) * hd + col) : make_float4(0.f, 0.f, 0.f, 0.f);
            const float4 vx = in ? *reinterpret_cast<const float4 *>(vh + (long long)(t0 + j) * hd + col) : make_float4(0.f, 0.f, 0.f, 0.f);
            *reinterpret_cast<uint2 *>(ks + j * PB_S + col) = make_uint2(pack_f16x2(kx.x, kx.y), pack_f16x2(kx.z, kx.w));
            *reinterpret_cast<uint2 *>(vs + j * PB_S + col) = make_uint2(pack_bf16x2(vx.x, vx.y), pack_bf16x2(vx.z, vx.w));
        }
        __syncthreads();
        // Warp-uniform: some key of this tile is visible to some query of the warp.
        if (!w.sees(a, t0, PB_KEYS)) continue;
        // Scores: s[j] holds keys t0 + 8j + 2t (+1) of rows r0 (e < 2) and r1.
        float s[J][4];
#pragma unroll
        for (int j = 0; j < J; j++) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
#pragma unroll
        for (int kc = 0; kc < KC; kc++) {
            if (16 * kc >= hd) break;
#pragma unroll
            for (int j = 0; j < J; j++) {
                const __half *kr = ks + (8 * j + g) * PB_S + 16 * kc + 2 * t;
                mma_f16_16816(s[j], qf[kc], *reinterpret_cast<const uint32_t *>(kr), *reinterpret_cast<const uint32_t *>(kr + 8));
            }
        }
        // q carried the scale: the scores are base-2 units already.
        online_softmax_tile<J, C, false, true>(s, o, m0, m1, l0, l1, t0, t, w.pos0, w.pos1, w.live0, w.live1, a.keys, a.window, 1.f);
        // o += P · V, 16 keys a step: the score accumulators of key blocks 2kk and 2kk + 1 are
        // the A fragment as they lie; ldmatrix gives V's B fragments for two 8-wide column
        // blocks at a time (matrices: keys +0..7 and +8..15 of columns 16c2.., then of 16c2 + 8..).
#pragma unroll
        for (int kk = 0; kk < J / 2; kk++) {
            const uint32_t pa[4] = {pack_bf16x2(s[2 * kk][0], s[2 * kk][1]), pack_bf16x2(s[2 * kk][2], s[2 * kk][3]),
                                    pack_bf16x2(s[2 * kk + 1][0], s[2 * kk + 1][1]), pack_bf16x2(s[2 * kk + 1][2], s[2 * kk + 1][3])};
            const int mi = lane >> 3, key = 16 * kk + (lane & 7) + (mi & 1) * 8;
#pragma unroll
            for (int c2 = 0; c2 < KC; c2++) {
                if (16 * c2 >= hd) break;
                uint32_t b[4];
                ldmatrix_x4_trans(b, vs + key * PB_S + 16 * c2 + (mi >> 1) * 8);
                mma_bf16_16816(o[2 * c2], pa, b[0], b[1]);
                mma_bf16_16816(o[2 * c2 + 1], pa, b[2], b[3]);
            }
        }
    }
    store_attention_rows<C>(a, o, l0, l1, w.live0, w.live1, r0, r1, h, t);
}
