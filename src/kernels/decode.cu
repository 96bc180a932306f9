// The non-matmul kernels of the fused decode step (src/llm/fused_decode.rs): preparing a matvec's
// input (RMSNorm, int8 quantization and LoRA's down-projection u = A·x for the projections that
// share the input, in one launch), rotary embedding with the KV-cache append, and single-query
// attention. Activations are f32, laid out [rows, features] with rows <= 8; the KV cache is
// [rows, kv_heads, capacity, head_dim] f32. Every kernel here may be launched to overlap the one
// before it (pdl_wait in common.cuh) and waits for it before touching memory.
#include <stdint.h>

#include "common.cuh"

// Sums of v[0..count) (count <= N) over the block (blockDim.x a multiple of 32, at most 1024)
// with one barrier pair for all of them; every thread gets the results in v.
template <int N>
__device__ void block_sums(float (&v)[N], int count) {
    __shared__ float part[N][32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
#pragma unroll
    for (int i = 0; i < N; i++)
        if (i < count) v[i] = warp_sum(v[i]);
    __syncthreads();  // part may still be read by an earlier call
    if (lane == 0)
#pragma unroll
        for (int i = 0; i < N; i++)
            if (i < count) part[i][warp] = v[i];
    __syncthreads();
#pragma unroll
    for (int i = 0; i < N; i++)
        if (i < count) v[i] = warp_sum(lane < nw ? part[i][lane] : 0.f);
}

__device__ float block_sum(float v) {
    float a[1] = {v};
    block_sums<1>(a, 1);
    return a[0];
}

// x as an int8 multiple of the block scale d: round(x / d), halves away from zero (llama.cpp's
// and candle's q8_1): rounding halves to even biases blocks whose values sit on a grid
// (dequantized embeddings), which made the CPU kernel's logits measurably worse.
__device__ __forceinline__ signed char q8_round(float x, float d) { return d > 0.f ? (signed char)roundf(x / d) : (signed char)0; }

// Quantize the 4 values v (elements 4t..4t+3 of a row, t = this thread's index in the row) to
// int8 in groups of `group` (32 or 128) values sharing one scale, max|x| / 127 (llama.cpp's q8_1
// rounding, the same as candle's decode kernels): a group spans group/4 neighbouring lanes, 8 or
// the whole warp. The scale is stored once for every 32 values (xd[t/8]), so a kernel reading
// blocks of 32 finds its scale either way. Every lane of the warp must call it.
__device__ __forceinline__ void quantize4(float4 v, int t, bool active, int8_t *xq, float *xd, int group) {
    float amax = fmaxf(fmaxf(fabsf(v.x), fabsf(v.y)), fmaxf(fabsf(v.z), fabsf(v.w)));
    const int lanes = group / 4;
    for (int o = 1; o < lanes; o <<= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
    if (!active) return;
    const float d = amax / 127.f;
    char4 q;
    q.x = q8_round(v.x, d);
    q.y = q8_round(v.y, d);
    q.z = q8_round(v.z, d);
    q.w = q8_round(v.w, d);
    reinterpret_cast<char4 *>(xq)[t] = q;
    if ((t & 7) == 0) xd[t >> 3] = d;
}

// Prepares a matvec's input in one launch: blocks 0..nb-1 each take one row of x, RMS-normalise
// it when norm_w is given (x / sqrt(mean(x^2) + eps) * norm_w) and quantize it to int8 groups of
// `group` values (xq, xd; 128 for the K-quant matvecs, 32 for the others); the other nseg*rmax
// blocks each compute one LoRA down-projection entry u[b, s*rmax + j] = A_{b,s}[j, :] · input[b, :]
// for every row b (each row with its own adapter's A, or none: then 0), normalising on the fly
// (A·(x·inv·g) = inv · (A∘g)·x), so they run beside the quantization instead of after it.
#define PREP_MAX_ROWS 8
struct PrepArgs {
    const float *x;                     // [nb, n]
    const float *norm_w;                // [n], or null: x is quantized as it is
    int8_t *xq;                         // [nb, n]
    float *xd;                          // [nb, n/32]
    const float *a[PREP_MAX_ROWS][3];   // per row: LoRA A_s [r_b, n], or null
    float *u;                           // [nb, ldu]
    int n, nb, rmax, ldu;
    int r[PREP_MAX_ROWS];               // rank of each row's adapter
    float eps;
    int group;                          // values sharing a scale: 32 or 128 (n a multiple)
};

// Elements a thread of a row block keeps in registers between the sum of squares and the
// quantization (4 float4 of 1024 threads: rows up to 16384 wide; wider rows are read twice).
#define PREP_KEEP 4

extern "C" __global__ void __launch_bounds__(1024) prep_q8(const PrepArgs p) {
    pdl_launch_dependents();
    pdl_wait();
    const int n4 = p.n / 4;
    const bool norm = p.norm_w != nullptr;
    const float4 *g4 = reinterpret_cast<const float4 *>(p.norm_w);
    if (blockIdx.x < p.nb) {
        const int row = blockIdx.x;
        const float4 *xr = reinterpret_cast<const float4 *>(p.x + (int64_t)row * p.n);
        float4 keep[PREP_KEEP], gk[PREP_KEEP];
        float inv = 1.f;
        if (norm) {
            // x and the norm weights in one pass, the sum of squares on the way.
            float ss = 0.f;
#pragma unroll
            for (int c = 0; c < PREP_KEEP; c++) {
                const int i = c * blockDim.x + threadIdx.x;
                if (i < n4) {
                    keep[c] = xr[i];
                    gk[c] = g4[i];
                }
            }
#pragma unroll
            for (int c = 0; c < PREP_KEEP; c++) {
                const int i = c * blockDim.x + threadIdx.x;
                if (i < n4) ss += keep[c].x * keep[c].x + keep[c].y * keep[c].y + keep[c].z * keep[c].z + keep[c].w * keep[c].w;
            }
            for (int i = PREP_KEEP * blockDim.x + threadIdx.x; i < n4; i += blockDim.x) {
                const float4 v = xr[i];
                ss += v.x * v.x + v.y * v.y + v.z * v.z + v.w * v.w;
            }
            inv = 1.f / sqrtf(block_sum(ss) / p.n + p.eps);
        }
        int8_t *xq = p.xq + (int64_t)row * p.n;
        float *xd = p.xd + (int64_t)row * (p.n / 32);
        auto scaled = [&](float4 x, float4 g) { return make_float4(x.x * inv * g.x, x.y * inv * g.y, x.z * inv * g.z, x.w * inv * g.w); };
        // Chunks are whole-block strides, so every lane of a warp takes the same branches
        // (quantize4 shuffles within the warp).
#pragma unroll
        for (int c = 0; c < PREP_KEEP; c++) {
            const int i = c * blockDim.x + threadIdx.x;
            if (c * (int)blockDim.x >= n4) break;
            const bool active = i < n4;
            float4 v = make_float4(0.f, 0.f, 0.f, 0.f);
            if (active) v = norm ? scaled(keep[c], gk[c]) : xr[i];
            quantize4(v, i, active, xq, xd, p.group);
        }
        for (int base = PREP_KEEP * blockDim.x; base < n4; base += blockDim.x) {
            const int i = base + threadIdx.x;
            const bool active = i < n4;
            float4 v = make_float4(0.f, 0.f, 0.f, 0.f);
            if (active) v = norm ? scaled(xr[i], g4[i]) : xr[i];
            quantize4(v, i, active, xq, xd, p.group);
        }
        return;
    }
    const int e = blockIdx.x - p.nb, seg = e / p.rmax, j = e % p.rmax;
    // Row b's A row j for this segment, or null (no adapter, no pair, or rank <= j). Picked by
    // comparisons with constant indices (indexing the parameter arrays would copy them to
    // local memory).
    const float4 *arow[PREP_MAX_ROWS];
    bool any = false;
#pragma unroll
    for (int b = 0; b < PREP_MAX_ROWS; b++) {
        const float *a = seg == 0 ? p.a[b][0] : (seg == 1 ? p.a[b][1] : p.a[b][2]);
        arow[b] = b < p.nb && a != nullptr && j < p.r[b] ? reinterpret_cast<const float4 *>(a + (int64_t)j * p.n) : nullptr;
        any |= arow[b] != nullptr;
    }
    if (!any) return;
    // One pass over x: the dot products and (for the norm) the sums of squares together, then
    // one block reduction for the 2·nb of them in use (acc[2b] = dot, acc[2b+1] = sum of squares).
    float acc[16];
#pragma unroll
    for (int b = 0; b < 16; b++) acc[b] = 0.f;
    for (int i = threadIdx.x; i < n4; i += blockDim.x) {
        const float4 g = norm ? g4[i] : make_float4(1.f, 1.f, 1.f, 1.f);
#pragma unroll
        for (int b = 0; b < PREP_MAX_ROWS; b++) {
            if (arow[b] != nullptr) {
                float4 av = arow[b][i];
                if (norm) av = make_float4(av.x * g.x, av.y * g.y, av.z * g.z, av.w * g.w);
                const float4 xv = reinterpret_cast<const float4 *>(p.x + (int64_t)b * p.n)[i];
                acc[2 * b] += av.x * xv.x + av.y * xv.y + av.z * xv.z + av.w * xv.w;
                if (norm) acc[2 * b + 1] += xv.x * xv.x + xv.y * xv.y + xv.z * xv.z + xv.w * xv.w;
            }
        }
    }
    block_sums<16>(acc, 2 * p.nb);
    if (threadIdx.x < p.nb) {
        const int b = threadIdx.x;
        float dot = 0.f, ss = 0.f;
#pragma unroll
        for (int i = 0; i < 8; i++)
            if (i == b) {
                dot = acc[2 * i];
                ss = acc[2 * i + 1];
            }
        const float inv = norm ? 1.f / sqrtf(ss / p.n + p.eps) : 1.f;
        // A row without this entry gets 0; its matvec reads no B for it either.
        p.u[(int64_t)b * p.ldu + seg * p.rmax + j] = dot * inv;
    }
}

// Interleaved rotary embedding (pairs 2i, 2i+1; GGUF layout) on the q and k heads of
// qkv[b] = [q heads | k heads | v heads], then k and v appended to the cache at index *at.
// One block per (row, head), head_dim/2 threads. pos[b] = rotary position of row b's token.
// Per-step values (pos, at) are read from device memory, so a captured step graph replays.
struct RopeArgs {
    float *qkv;              // [nb, ldq]
    const float *cos, *sin;  // [max_position, hd/2]
    const int *pos;          // [nb]
    const int *at;           // [1] cache index of the new token
    float *k_cache, *v_cache;
    int ldq, nh, nkv, hd, cap;
};

extern "C" __global__ void rope_append_f32(const RopeArgs p) {
    pdl_launch_dependents();
    pdl_wait();
    const int b = blockIdx.y, head = blockIdx.x, i = threadIdx.x, half = p.hd / 2;
    if (i >= half) return;
    float *src = p.qkv + (int64_t)b * p.ldq + (int64_t)head * p.hd;
    const int64_t cache_row = (((int64_t)b * p.nkv + (head - p.nh) % p.nkv) * p.cap + *p.at) * p.hd;
    if (head >= p.nh + p.nkv) {  // v head: copy
        float *dst = p.v_cache + cache_row;
        dst[2 * i] = src[2 * i];
        dst[2 * i + 1] = src[2 * i + 1];
        return;
    }
    const int64_t t = (int64_t)p.pos[b] * half + i;
    const float c = p.cos[t], s = p.sin[t];
    const float x0 = src[2 * i], x1 = src[2 * i + 1];
    const float y0 = x0 * c - x1 * s, y1 = x0 * s + x1 * c;
    if (head < p.nh) {  // q head: in place
        src[2 * i] = y0;
        src[2 * i + 1] = y1;
    } else {  // k head: into the cache
        float *dst = p.k_cache + cache_row;
        dst[2 * i] = y0;
        dst[2 * i + 1] = y1;
    }
}

// out[b, h*hd ..] = softmax(q·Kᵀ * scale) · V over the keys row b may see: indices
// [max(start[b], len-window), len) with len = *at + 1 (the new token included). One block of ATT_WARPS warps per (head, row); each warp
// runs an online softmax over every ATT_WARPS-th key, then the warps' partial results merge.
// head_dim <= 256: lane l holds dims l, l+32, ...
#define ATT_WARPS 8
struct AttnArgs {
    const float *q;  // [nb, ldq], head h at h*hd
    const float *k_cache, *v_cache;
    const int *start;  // [nb] first key index of each row (its left padding)
    const int *at;     // [1] cache index of the new token
    float *out;        // [nb, nh*hd]
    // Or null: the output also quantized as the o projection reads it (the prepare kernel's
    // int8 groups, bit for bit), when that projection needs nothing else prepared.
    int8_t *xq;        // [nb, nh*hd]
    float *xd;         // [nb, nh*hd/32]
    int ldq, nh, nkv, hd, cap, window;
    float scale;
    int group;         // values sharing a scale in xq: 32, or 128 (then hd is a multiple)
};

extern "C" __global__ void __launch_bounds__(ATT_WARPS * 32) attn_decode_f32(const AttnArgs p) {
    pdl_launch_dependents();
    pdl_wait();
    const int h = blockIdx.x, b = blockIdx.y;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int kvh = h / (p.nh / p.nkv);
    const int64_t base = ((int64_t)b * p.nkv + kvh) * p.cap * p.hd;
    const float *kc = p.k_cache + base, *vc = p.v_cache + base;
    const float *q = p.q + (int64_t)b * p.ldq + (int64_t)h * p.hd;
    const int len = *p.at + 1;
    const int lo = max(p.start[b], len - p.window);
    float qv[8], acc[8];
#pragma unroll
    for (int i = 0; i < 8; i++) {
        const int d = lane + 32 * i;
        qv[i] = d < p.hd ? q[d] * p.scale : 0.f;
        acc[i] = 0.f;
    }
    float m = -INFINITY, l = 0.f;
    for (int key = lo + warp; key < len; key += ATT_WARPS) {
        const float *kr = kc + (int64_t)key * p.hd;
        float s = 0.f;
#pragma unroll
        for (int i = 0; i < 8; i++) {
            const int d = lane + 32 * i;
            if (d < p.hd) s += qv[i] * kr[d];
        }
        s = warp_sum(s);
        const float m2 = fmaxf(m, s);
        const float corr = __expf(m - m2), e = __expf(s - m2);
        l = l * corr + e;
        const float *vr = vc + (int64_t)key * p.hd;
#pragma unroll
        for (int i = 0; i < 8; i++) {
            const int d = lane + 32 * i;
            if (d < p.hd) acc[i] = acc[i] * corr + e * vr[d];
        }
        m = m2;
    }
    __shared__ float sm[ATT_WARPS], sl[ATT_WARPS], sacc[ATT_WARPS][256];
    if (lane == 0) {
        sm[warp] = m;
        sl[warp] = l;
    }
#pragma unroll
    for (int i = 0; i < 8; i++) {
        const int d = lane + 32 * i;
        if (d < p.hd) sacc[warp][d] = acc[i];
    }
    __syncthreads();
    float mx = -INFINITY;
#pragma unroll
    for (int w = 0; w < ATT_WARPS; w++) mx = fmaxf(mx, sm[w]);
    float total = 0.f, f[ATT_WARPS];
#pragma unroll
    for (int w = 0; w < ATT_WARPS; w++) {
        f[w] = sl[w] > 0.f ? __expf(sm[w] - mx) : 0.f;
        total += sl[w] * f[w];
    }
    const int64_t first = (int64_t)b * p.nh * p.hd + (int64_t)h * p.hd;
    // hd <= 256 = blockDim.x: one output a thread. With xq, hd is a multiple of the group, so
    // each group of outputs is one quantization group of the row: one warp's (32), or four
    // warps' (128), met in shared memory.
    const int d = threadIdx.x;
    float v = 0.f;
    if (d < p.hd) {
#pragma unroll
        for (int w = 0; w < ATT_WARPS; w++) v += sacc[w][d] * f[w];
        v = v / total;
        p.out[first + d] = v;
    }
    if (p.xq == nullptr) return;
    float amax = warp_max(fabsf(v));
    if (p.group > 32) {
        __shared__ float wmax[ATT_WARPS];
        if (lane == 0) wmax[warp] = amax;
        __syncthreads();
        const int per = p.group / 32, from = warp / per * per;
        for (int w = from; w < from + per; w++) amax = fmaxf(amax, wmax[w]);
    }
    if (d >= p.hd) return;
    const float scale = amax / 127.f;
    p.xq[first + d] = q8_round(v, scale);
    if (lane == 0) p.xd[(first + d) >> 5] = scale;
}
