// The non-matmul kernels of the fused decode step (src/llm/fast_decode.rs): RMSNorm and int8
// quantization of the matvec inputs, LoRA's down-projection u = A·x for the projections that
// share an input, rotary embedding with the KV-cache append, and single-query attention.
// Activations are f32, laid out [rows, features] with rows <= 8; the KV cache is
// [rows, kv_heads, capacity, head_dim] f32.
#include <stdint.h>

#include "common.cuh"

// Sum over the block (blockDim.x a multiple of 32, at most 1024); every thread gets the result.
__device__ float block_sum(float v) {
    __shared__ float part[32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) part[warp] = v;
    __syncthreads();
    v = lane < nw ? part[lane] : 0.f;
    return warp_sum(v);
}

// Quantize the 4 values v (elements 4t..4t+3 of a row, t = this thread's index in the row) to
// int8 in blocks of 32: a block spans 8 neighbouring lanes, scale = max|x| / 127 (llama.cpp's
// q8_1 rounding, the same as candle's decode kernels). Every lane of the warp must call it.
__device__ __forceinline__ void quantize4(float4 v, int t, bool active, int8_t *xq, float *xd) {
    float amax = fmaxf(fmaxf(fabsf(v.x), fabsf(v.y)), fmaxf(fabsf(v.z), fabsf(v.w)));
#pragma unroll
    for (int o = 1; o < 8; o <<= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
    if (!active) return;
    const float d = amax / 127.f, inv = d > 0.f ? 1.f / d : 0.f;
    char4 q;
    q.x = (signed char)__float2int_rn(v.x * inv);
    q.y = (signed char)__float2int_rn(v.y * inv);
    q.z = (signed char)__float2int_rn(v.z * inv);
    q.w = (signed char)__float2int_rn(v.w * inv);
    reinterpret_cast<char4 *>(xq)[t] = q;
    if ((t & 7) == 0) xd[t >> 3] = d;
}

// y[b, :] = x[b, :] / sqrt(mean(x[b, :]^2) + eps) * w in f32 (LoRA's A reads it) and as int8
// blocks (the matvec reads those); one block per row, n a multiple of 32.
extern "C" __global__ void rmsnorm_q8(const float *x, const float *w, float *y, int8_t *xq, float *xd, int n, float eps) {
    const int row = blockIdx.x;
    const float4 *xr = reinterpret_cast<const float4 *>(x + (int64_t)row * n);
    const float4 *wr = reinterpret_cast<const float4 *>(w);
    float4 *yr = reinterpret_cast<float4 *>(y + (int64_t)row * n);
    const int n4 = n / 4;
    float ss = 0.f;
    for (int i = threadIdx.x; i < n4; i += blockDim.x) {
        const float4 v = xr[i];
        ss += v.x * v.x + v.y * v.y + v.z * v.z + v.w * v.w;
    }
    const float inv = 1.f / sqrtf(block_sum(ss) / n + eps);
    for (int base = 0; base < n4; base += blockDim.x) {
        const int i = base + threadIdx.x;
        const bool active = i < n4;
        float4 v = make_float4(0.f, 0.f, 0.f, 0.f);
        if (active) {
            const float4 a = xr[i], g = wr[i];
            v = make_float4(a.x * inv * g.x, a.y * inv * g.y, a.z * inv * g.z, a.w * inv * g.w);
            yr[i] = v;
        }
        quantize4(v, i, active, xq + (int64_t)row * n, xd + (int64_t)row * (n / 32));
    }
}

// x[b, :] as int8 blocks of 32 (the attention and SwiGLU outputs, before their matvecs).
extern "C" __global__ void quantize_q8(const float *x, int8_t *xq, float *xd, int n) {
    const int row = blockIdx.x;
    const float4 *xr = reinterpret_cast<const float4 *>(x + (int64_t)row * n);
    const int n4 = n / 4;
    for (int base = 0; base < n4; base += blockDim.x) {
        const int i = base + threadIdx.x;
        const bool active = i < n4;
        const float4 v = active ? xr[i] : make_float4(0.f, 0.f, 0.f, 0.f);
        quantize4(v, i, active, xq + (int64_t)row * n, xd + (int64_t)row * (n / 32));
    }
}

// u[b, s*r + j] = A_s[j, :] · x[b, :] for up to three segments s (null A_s: skipped).
// One block per (segment, j); rows b < nb <= 8. k is a multiple of 4.
struct LoraAArgs {
    const float *a[3];  // [r, k] row-major
    const float *x;     // [nb, k]
    float *u;           // [nb, ldu]
    int k, r, nb, ldu;
};

extern "C" __global__ void lora_a_f32(const LoraAArgs p) {
    const int seg = blockIdx.x / p.r, j = blockIdx.x % p.r;
    const float *a = p.a[seg];
    if (a == nullptr) return;
    const float4 *arow = reinterpret_cast<const float4 *>(a + (int64_t)j * p.k);
    float acc[8];
#pragma unroll
    for (int b = 0; b < 8; b++) acc[b] = 0.f;
    for (int i = threadIdx.x; i < p.k / 4; i += blockDim.x) {
        const float4 av = arow[i];
#pragma unroll
        for (int b = 0; b < 8; b++) {
            if (b < p.nb) {
                const float4 xv = reinterpret_cast<const float4 *>(p.x + (int64_t)b * p.k)[i];
                acc[b] += av.x * xv.x + av.y * xv.y + av.z * xv.z + av.w * xv.w;
            }
        }
    }
#pragma unroll
    for (int b = 0; b < 8; b++) {
        if (b < p.nb) {
            const float s = block_sum(acc[b]);
            if (threadIdx.x == 0) p.u[(int64_t)b * p.ldu + seg * p.r + j] = s;
        }
    }
}

// Interleaved rotary embedding (pairs 2i, 2i+1; GGUF layout) on the q and k heads of
// qkv[b] = [q heads | k heads | v heads], then k and v appended to the cache at index `at`.
// One block per (row, head), head_dim/2 threads. pos[b] = rotary position of row b's token.
struct RopeArgs {
    float *qkv;              // [nb, ldq]
    const float *cos, *sin;  // [max_position, hd/2]
    const int *pos;          // [nb]
    float *k_cache, *v_cache;
    int ldq, nh, nkv, hd, cap, at;
};

extern "C" __global__ void rope_append_f32(const RopeArgs p) {
    const int b = blockIdx.y, head = blockIdx.x, i = threadIdx.x, half = p.hd / 2;
    if (i >= half) return;
    float *src = p.qkv + (int64_t)b * p.ldq + (int64_t)head * p.hd;
    const int64_t cache_row = (((int64_t)b * p.nkv + (head - p.nh) % p.nkv) * p.cap + p.at) * p.hd;
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
// [max(start[b], len-window), len). One block of ATT_WARPS warps per (head, row); each warp
// runs an online softmax over every ATT_WARPS-th key, then the warps' partial results merge.
// head_dim <= 256: lane l holds dims l, l+32, ...
#define ATT_WARPS 8
struct AttnArgs {
    const float *q;  // [nb, ldq], head h at h*hd
    const float *k_cache, *v_cache;
    const int *start;  // [nb] first key index of each row (its left padding)
    float *out;        // [nb, nh*hd]
    int ldq, nh, nkv, hd, cap, len, window;
    float scale;
};

extern "C" __global__ void __launch_bounds__(ATT_WARPS * 32) attn_decode_f32(const AttnArgs p) {
    const int h = blockIdx.x, b = blockIdx.y;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int kvh = h / (p.nh / p.nkv);
    const int64_t base = ((int64_t)b * p.nkv + kvh) * p.cap * p.hd;
    const float *kc = p.k_cache + base, *vc = p.v_cache + base;
    const float *q = p.q + (int64_t)b * p.ldq + (int64_t)h * p.hd;
    const int lo = max(p.start[b], p.len - p.window);
    float qv[8], acc[8];
#pragma unroll
    for (int i = 0; i < 8; i++) {
        const int d = lane + 32 * i;
        qv[i] = d < p.hd ? q[d] * p.scale : 0.f;
        acc[i] = 0.f;
    }
    float m = -INFINITY, l = 0.f;
    for (int key = lo + warp; key < p.len; key += ATT_WARPS) {
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
    float *o = p.out + (int64_t)b * p.nh * p.hd + (int64_t)h * p.hd;
    for (int d = threadIdx.x; d < p.hd; d += blockDim.x) {
        float v = 0.f;
#pragma unroll
        for (int w = 0; w < ATT_WARPS; w++) v += sacc[w][d] * f[w];
        o[d] = v / total;
    }
}
