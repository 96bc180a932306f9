// Kernels that read GGML-packed weights in place (the bytes candle's QTensor holds on the GPU):
// dequantization to bf16/f16 (prompt GEMMs and training) and embedding rows, both exact in f32,
// and the decode matvec for 1-8 token rows on int8-quantized activations (dp4a, and for Q4_K and
// Q6_K int8 tensor cores), with LoRA, residual and SwiGLU folded into its epilogue. Every kernel
// computes a token row the same way whatever the number of rows beside it, so batching never
// changes an output. Different kernels sum in different orders, so a weight uses one order for
// every row count: Q4_K's and Q6_K's tensor-core order (their 1-2 row dp4a kernels `mvd` follow
// it; Q6_K where a row holds an even number of blocks), the others `mv`.
//
// Block layouts follow ggml (k_quants.h / ggml-common.h).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include "common.cuh"

__device__ __forceinline__ float ld_half(const uint8_t *p) {
    return __half2float(*reinterpret_cast<const __half *>(p));
}

// Four bytes at a 2-byte aligned address (GGML blocks of 18, 34 or 210 bytes), as two halves.
__device__ __forceinline__ uint32_t ld_u16x2(const uint8_t *p) {
    const uint16_t *q = reinterpret_cast<const uint16_t *>(p);
    return (uint32_t)q[0] | ((uint32_t)q[1] << 16);
}

// Small integers to float without the (quarter-rate) I2F instruction: 0x4B000000 is 2^23, so
// OR-ing an integer below 2^23 into its mantissa and subtracting 2^23 gives it exactly.
__device__ __forceinline__ float small_uint(uint32_t v) { return __uint_as_float(0x4B000000u | v) - 8388608.f; }

// Each type decodes the weights one lane owns inside a block: RUNS runs of VEC consecutive
// weights at offsets(sub) (sub = lane's index among the LPB lanes sharing a block). Lanes with
// consecutive `sub` own neighbouring bytes and neighbouring weights, so both the weight bytes and
// the activations they meet are read coalesced.

// Q4_K: 256 weights in 144 bytes: half d, half dmin, 12 bytes of 6-bit scales/mins, 128 bytes of
// nibbles; byte 32g+i holds weight 64g+i (low nibble) and 64g+32+i (high). Lane sub (0..15) owns
// the 8 bytes at 32g+8a (g = sub/4, a = sub%4): weights 64g+8a.. and 64g+32+8a.., two runs of 8
// (16-byte bf16 stores).
struct Q4K {
    static constexpr int BYTES = 144, ELEMS = 256, LPB = 16, RUNS = 2, VEC = 8;
    static __device__ __forceinline__ void offsets(int sub, int off[RUNS]) {
        const int g = sub >> 2, a = sub & 3;
        off[0] = 64 * g + 8 * a;
        off[1] = off[0] + 32;
    }
    static __device__ __forceinline__ void scale_min(int j, const uint8_t *s, uint32_t &sc, uint32_t &m) {
        if (j < 4) {
            sc = s[j] & 63;
            m = s[j + 4] & 63;
        } else {
            sc = (s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4);
            m = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
        }
    }
    static __device__ __forceinline__ void lane(const uint8_t *__restrict__ blk, int sub, float w[16]) {
        const int g = sub >> 2, a = sub & 3;
        const __half2 dm = *reinterpret_cast<const __half2 *>(blk);
        const float d = __low2float(dm), dmin = __high2float(dm);
        uint32_t s1, m1, s2, m2;
        scale_min(2 * g, blk + 4, s1, m1);
        scale_min(2 * g + 1, blk + 4, s2, m2);
        const float d1 = d * small_uint(s1), o1 = dmin * small_uint(m1);
        const float d2 = d * small_uint(s2), o2 = dmin * small_uint(m2);
        const uint2 q = *reinterpret_cast<const uint2 *>(blk + 16 + 32 * g + 8 * a);
#pragma unroll
        for (int i = 0; i < 8; i++) {
            const uint32_t b = ((i < 4 ? q.x : q.y) >> (8 * (i & 3))) & 0xFF;
            w[i] = d1 * small_uint(b & 0xF) - o1;
            w[8 + i] = d2 * small_uint(b >> 4) - o2;
        }
    }
};

// Q6_K: 256 weights in 210 bytes: ql[128] low nibbles, qh[64] high 2 bits, int8 scales[16],
// half d. Half h (128 weights) uses ql[64h..], qh[32h..], scales[8h..]; byte l of it feeds
// weights l, l+32, l+64, l+96. Lane sub = 8h + a owns l = 4a..4a+3 of half h: four runs of four
// weights (8-byte bf16 stores). Blocks are only 2-byte aligned, so bytes are read in pairs.
struct Q6K {
    static constexpr int BYTES = 210, ELEMS = 256, LPB = 16, RUNS = 4, VEC = 4;
    static __device__ __forceinline__ void offsets(int sub, int off[RUNS]) {
#pragma unroll
        for (int r = 0; r < RUNS; r++) off[r] = 128 * (sub >> 3) + 32 * r + 4 * (sub & 7);
    }
    static __device__ __forceinline__ void lane(const uint8_t *__restrict__ blk, int sub, float w[16]) {
        const int h = sub >> 3, a = sub & 7;
        const float d = ld_half(blk + 208);
        const uint32_t lo = ld_u16x2(blk + 64 * h + 4 * a), hi = ld_u16x2(blk + 64 * h + 32 + 4 * a), hb = ld_u16x2(blk + 128 + 32 * h + 4 * a);
        // The four l share a group of 16, so one scale per run.
        const int8_t *sc = reinterpret_cast<const int8_t *>(blk + 192 + 8 * h + (a >> 2));
#pragma unroll
        for (int i = 0; i < 4; i++) {
            const uint32_t x = (lo >> (8 * i)) & 0xFF, y = (hi >> (8 * i)) & 0xFF, q = (hb >> (8 * i)) & 0xFF;
            // q - 32 as (q | 2^23-float) - (2^23 + 32).
            w[0 + i] = d * sc[0] * (__uint_as_float(0x4B000000u | (x & 0xF) | ((q & 3) << 4)) - 8388640.f);
            w[4 + i] = d * sc[2] * (__uint_as_float(0x4B000000u | (y & 0xF) | (((q >> 2) & 3) << 4)) - 8388640.f);
            w[8 + i] = d * sc[4] * (__uint_as_float(0x4B000000u | (x >> 4) | (((q >> 4) & 3) << 4)) - 8388640.f);
            w[12 + i] = d * sc[6] * (__uint_as_float(0x4B000000u | (y >> 4) | (((q >> 6) & 3) << 4)) - 8388640.f);
        }
    }
};

// Q8_0: 32 weights in 34 bytes: half d, int8 qs[32]. Eight lanes a block, four weights a lane.
struct Q8_0 {
    static constexpr int BYTES = 34, ELEMS = 32, LPB = 8, RUNS = 1, VEC = 4;
    static __device__ __forceinline__ void offsets(int sub, int off[RUNS]) { off[0] = 4 * sub; }
    static __device__ __forceinline__ void lane(const uint8_t *__restrict__ blk, int sub, float w[4]) {
        const float d = ld_half(blk);
        // Two 16-bit loads (blocks are 2-byte aligned); x ^ 0x80 is the byte + 128 as unsigned.
        const uint32_t v = ld_u16x2(blk + 2 + 4 * sub) ^ 0x80808080u;
#pragma unroll
        for (int i = 0; i < 4; i++) w[i] = d * (__uint_as_float(0x4B000000u | ((v >> (8 * i)) & 0xFF)) - 8388736.f);
    }
};

// Q4_0: 32 weights in 18 bytes: half d, 16 bytes of nibbles (low = weights 0..15, high 16..31).
// Eight lanes a block; lane a owns bytes 2a, 2a+1: weights 2a, 2a+1, 16+2a, 17+2a.
struct Q4_0 {
    static constexpr int BYTES = 18, ELEMS = 32, LPB = 8, RUNS = 2, VEC = 2;
    static __device__ __forceinline__ void offsets(int sub, int off[RUNS]) {
        off[0] = 2 * sub;
        off[1] = 16 + 2 * sub;
    }
    static __device__ __forceinline__ void lane(const uint8_t *__restrict__ blk, int sub, float w[4]) {
        const float d = ld_half(blk);
        const uint32_t q = *reinterpret_cast<const uint16_t *>(blk + 2 + 2 * sub);
        w[0] = d * (small_uint(q & 0xF) - 8.f);
        w[1] = d * (small_uint((q >> 8) & 0xF) - 8.f);
        w[2] = d * (small_uint((q >> 4) & 0xF) - 8.f);
        w[3] = d * (small_uint((q >> 12) & 0xF) - 8.f);
    }
};

// Work item `i` of a [rows, k] matrix: (row, block, lane-in-block) → the lane's weights and the
// column where its first run starts.
template <typename Q>
__device__ __forceinline__ void item_weights(const uint8_t *w, int k, int64_t row, int64_t i_in_row, float v[Q::RUNS * Q::VEC], int off[Q::RUNS], int &base) {
    const int bi = (int)(i_in_row / Q::LPB), sub = (int)(i_in_row % Q::LPB);
    Q::lane(w + (row * (k / Q::ELEMS) + bi) * Q::BYTES, sub, v);
    Q::offsets(sub, off);
    base = bi * Q::ELEMS;
}

// ---- dequantize [rows, k] to bf16 / f16: one thread per lane item --------------------------------

// The grid-stride loop in index type I: 32-bit where the item count fits, since its division by
// the row length is a few instructions against dozens for 64 bits, which this memory-bound
// loop would otherwise spend per 8 weights.
template <typename Q, typename I, typename CVT>
__device__ __forceinline__ void dequant_items(const uint8_t *w, uint16_t *y, I total, I per_row, int k, CVT cvt) {
    constexpr int NW = Q::RUNS * Q::VEC;
    for (I i = blockIdx.x * (I)blockDim.x + threadIdx.x; i < total; i += (I)blockDim.x * gridDim.x) {
        const I row = i / per_row;
        float v[NW];
        int off[Q::RUNS], base;
        item_weights<Q>(w, k, (int64_t)row, (int64_t)(i - row * per_row), v, off, base);
        uint16_t *dst = y + (int64_t)row * k + base;
#pragma unroll
        for (int r = 0; r < Q::RUNS; r++) {
            const float *vr = v + r * Q::VEC;
            // One store per run (16, 8, 4 or 2 bytes): runs start at multiples of their width.
            if constexpr (Q::VEC == 8) {
                const uint4 p = make_uint4(cvt(vr[0]) | ((uint32_t)cvt(vr[1]) << 16), cvt(vr[2]) | ((uint32_t)cvt(vr[3]) << 16),
                                           cvt(vr[4]) | ((uint32_t)cvt(vr[5]) << 16), cvt(vr[6]) | ((uint32_t)cvt(vr[7]) << 16));
                *reinterpret_cast<uint4 *>(dst + off[r]) = p;
            } else if constexpr (Q::VEC == 4) {
                const uint2 p = make_uint2(cvt(vr[0]) | ((uint32_t)cvt(vr[1]) << 16), cvt(vr[2]) | ((uint32_t)cvt(vr[3]) << 16));
                *reinterpret_cast<uint2 *>(dst + off[r]) = p;
            } else if constexpr (Q::VEC == 2) {
                *reinterpret_cast<uint32_t *>(dst + off[r]) = cvt(vr[0]) | ((uint32_t)cvt(vr[1]) << 16);
            } else {
                dst[off[r]] = cvt(vr[0]);
            }
        }
    }
}

template <typename Q, typename CVT>
__device__ void dequant_body(const uint8_t *w, uint16_t *y, int64_t rows, int k, CVT cvt) {
    const int64_t per_row = (int64_t)(k / Q::ELEMS) * Q::LPB;
    const int64_t total = rows * per_row;
    // The 32-bit loop also needs room for its last stride past the end.
    if (total + (int64_t)blockDim.x * gridDim.x <= 0xFFFFFFFFll) dequant_items<Q, uint32_t>(w, y, (uint32_t)total, (uint32_t)per_row, k, cvt);
    else dequant_items<Q, int64_t>(w, y, total, per_row, k, cvt);
}

// Converters return the 16-bit pattern of the rounded value.
struct ToBf16 { __device__ uint32_t operator()(float x) const { return __bfloat16_as_ushort(__float2bfloat16_rn(x)); } };
struct ToF16 { __device__ uint32_t operator()(float x) const { return __half_as_ushort(__float2half_rn(x)); } };

#define DEQUANT(QN, Q)                                                                                  \
    extern "C" __global__ void dequant_bf16_##QN(const uint8_t *w, uint16_t *y, int64_t rows, int k) { \
        dequant_body<Q>(w, y, rows, k, ToBf16());                                                       \
    }                                                                                                   \
    extern "C" __global__ void dequant_f16_##QN(const uint8_t *w, uint16_t *y, int64_t rows, int k) {    \
        dequant_body<Q>(w, y, rows, k, ToF16());                                                        \
    }

// ---- embedding rows: y[b, :] = dequant(table[ids[b], :]) in f32 ---------------------------------

template <typename Q>
__device__ void embed_body(const uint8_t *table, const uint32_t *ids, float *y, int nb, int k) {
    pdl_launch_dependents();
    pdl_wait();  // the first kernel of a decode step: the ids were copied before it
    constexpr int NW = Q::RUNS * Q::VEC;
    const int per_row = (k / Q::ELEMS) * Q::LPB;
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < nb * per_row; i += blockDim.x * gridDim.x) {
        const int b = i / per_row;
        float v[NW];
        int off[Q::RUNS], base;
        item_weights<Q>(table, k, ids[b], i % per_row, v, off, base);
        float *dst = y + (int64_t)b * k + base;
#pragma unroll
        for (int r = 0; r < Q::RUNS; r++)
#pragma unroll
            for (int j = 0; j < Q::VEC; j++) dst[off[r] + j] = v[r * Q::VEC + j];
    }
}

#define EMBED(QN, Q)                                                                                   \
    extern "C" __global__ void embed_f32_##QN(const uint8_t *table, const uint32_t *ids, float *y, int nb, int k) { \
        embed_body<Q>(table, ids, y, nb, k);                                                           \
    }

// ---- decode matvec: y[b, n] = W[n, :] · x[b, :] (+ LoRA) (+ residual), b < NB <= 8 ---------------
//
// The activations come quantized to int8 (`xq`, with one f32 scale per block of 32 in `xd`:
// x ≈ xd * xq, as llama.cpp's q8_1 and candle's own decode kernels do), so a weight costs one
// share of a dp4a instead of a float conversion and an FMA: the f32 version of this kernel ran
// ~19 instructions a weight and reached 13% of DRAM bandwidth (ncu, BENCHMARKS.md). For Q4_K and
// Q6_K the blocks of 32 come in groups of 4 that share their scale (the prepare kernel's
// `group`), so their kernels sum a 128-weight half in integers and scale it once.
//
// Integer sums become floats through the 1.5·2^23 magic constant (exact below 2^22), avoiding
// the quarter-rate I2F instruction where the sum is bounded under that (the half sums are not).
__device__ __forceinline__ float small_int(int v) { return __int_as_float(0x4B400000 + v) - 12582912.f; }


// Weight bytes, read once per token: through the read-only path without a place in L1, which
// is left to the activations every warp of a block reads.
__device__ __forceinline__ uint4 ld_stream16(const uint8_t *p) {
    uint4 v;
    asm("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
    return v;
}

// Asynchronous copies from global to shared memory (compute 8.0 and later): the bytes land in
// shared memory without passing through registers, so a warp can keep several iterations of
// weights in flight at no register cost. Groups of copies are committed and waited for in order.
__device__ __forceinline__ void cp_async16(void *smem, const void *gmem) {
    const uint32_t s = (uint32_t)__cvta_generic_to_shared(smem);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(s), "l"(gmem) : "memory");
}
__device__ __forceinline__ void cp_async4(void *smem, const void *gmem) {
    const uint32_t s = (uint32_t)__cvta_generic_to_shared(smem);
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4;" ::"r"(s), "l"(gmem) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
// Wait until at most N of this thread's committed groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
}
// The warp copies `bytes` (a multiple of 4) from src to dst, both 16-byte aligned when `wide`,
// else 4-byte aligned: 16-byte pieces, then the 4-byte tail.
__device__ __forceinline__ void warp_copy_async(uint8_t *dst, const uint8_t *src, int bytes, bool wide, int lane) {
    int done = 0;
    if (wide) {
        done = bytes & ~15;
        for (int c = 16 * lane; c < done; c += 16 * 32) cp_async16(dst + c, src + c);
    }
    for (int c = done + 4 * lane; c < bytes; c += 4 * 32) cp_async4(dst + c, src + c);
}
__device__ __forceinline__ uint32_t ld_stream4(const uint8_t *p) {
    uint32_t v;
    asm("ld.global.nc.L1::no_allocate.u32 %0, [%1];" : "=r"(v) : "l"(p));
    return v;
}

// The 6-bit scales and mins of Q4_K sub-blocks 4h..4h+3 (hi = h == 1), one a byte of sc and m,
// branch-free from the header's 12 packed bytes as words s0, s1, s2 (ggml get_scale_min_k4).
__device__ __forceinline__ void q4k_scale_words(uint32_t s0, uint32_t s1, uint32_t s2, bool hi, uint32_t &sc, uint32_t &m) {
    const uint32_t sc_lo = s0 & 0x3F3F3F3Fu, m_lo = s1 & 0x3F3F3F3Fu;
    const uint32_t sc_hi = (s2 & 0x0F0F0F0Fu) | ((s0 >> 2) & 0x30303030u);
    const uint32_t m_hi = ((s2 >> 4) & 0x0F0F0F0Fu) | ((s1 >> 2) & 0x30303030u);
    sc = hi ? sc_hi : sc_lo;
    m = hi ? m_hi : m_lo;
}

// Per type: DLPB lanes share a block. load_w() requests a lane's weight bytes W; expand() turns
// them into E, what dot() needs, once for every activation row; X holds what a lane needs of
// one activation row for one block (loaded once, shared by the output slots); dot() adds that
// block's share of W·x.
struct Q4KDot {
    static constexpr bool STAGED = false;  // each lane reads its bytes itself
    static constexpr int ONE_ROW_BLOCKS = 5;  // 93 registers
    // Lane a (0..7) owns qs bytes 16a..16a+15: group g = a/2, half h = a%2, i.e. weights
    // 64g+16h+[0,16) (sub-block 2g, low nibbles) and 64g+32+16h+[0,16) (sub-block 2g+1).
    static constexpr int DLPB = 8;
    struct X { uint4 lo, hi; float dlo, dhi; int slo, shi; };
    static __device__ __forceinline__ void load_x(const int8_t *xq, const float *xd, int bi, int a, X &x) {
        const int g = a >> 1, h = a & 1, base = bi * 256 + 64 * g + 16 * h;
        x.lo = *reinterpret_cast<const uint4 *>(xq + base);
        x.hi = *reinterpret_cast<const uint4 *>(xq + base + 32);
        x.dlo = xd[bi * 8 + 2 * g];
        x.dhi = xd[bi * 8 + 2 * g + 1];
        const int one = 0x01010101;
        x.slo = __dp4a(one, (int)x.lo.x, __dp4a(one, (int)x.lo.y, __dp4a(one, (int)x.lo.z, __dp4a(one, (int)x.lo.w, 0))));
        x.shi = __dp4a(one, (int)x.hi.x, __dp4a(one, (int)x.hi.y, __dp4a(one, (int)x.hi.z, __dp4a(one, (int)x.hi.w, 0))));
    }
    // Blocks are 144 bytes, so 16-byte aligned: a lane's 16 quant bytes are one vector load.
    // The 16-byte header (d, dmin, 12 scale bytes) is the same for the block's 8 lanes, so each
    // loads one word of it (lanes a and a+4 the same) and expand() gathers the four by shuffle:
    // 5 registers a weight load in flight instead of 8.
    struct W { uint4 q; uint32_t h; };
    static __device__ __forceinline__ void load_w(const uint8_t *__restrict__ blk, int a, W &w) {
        w.h = ld_stream4(blk + 4 * (a & 3));
        w.q = ld_stream16(blk + 16 + 16 * a);
    }
    // The lane's weights decoded once for every activation row: nibbles, scales and mins.
    struct E { int l[4], h[4]; float d, dmin; int sc0, sc1, m0, m1; };
    // Called by every lane of the warp (it shuffles); lane a's block group starts at lane & ~7.
    static __device__ __forceinline__ E expand(const W &w, int a, int lane) {
        const int base = lane & ~7;
        const uint32_t h0 = __shfl_sync(0xffffffffu, w.h, base), s0 = __shfl_sync(0xffffffffu, w.h, base + 1);
        const uint32_t s1 = __shfl_sync(0xffffffffu, w.h, base + 2), s2 = __shfl_sync(0xffffffffu, w.h, base + 3);
        E e;
        const float2 dm = __half22float2(*reinterpret_cast<const __half2 *>(&h0));
        e.d = dm.x;
        e.dmin = dm.y;
        const int g = a >> 1;
        uint32_t scw, mw;
        q4k_scale_words(s0, s1, s2, g >= 2, scw, mw);
        const int sh = 16 * (g & 1);
        e.sc0 = (scw >> sh) & 0xFF;
        e.sc1 = (scw >> (sh + 8)) & 0xFF;
        e.m0 = (mw >> sh) & 0xFF;
        e.m1 = (mw >> (sh + 8)) & 0xFF;
        const uint32_t q[4] = {w.q.x, w.q.y, w.q.z, w.q.w};
#pragma unroll
        for (int i = 0; i < 4; i++) {
            e.l[i] = q[i] & 0x0F0F0F0F;
            e.h[i] = (q[i] >> 4) & 0x0F0F0F0F;
        }
        return e;
    }
    static __device__ __forceinline__ void dot(const E &e, const X &v, float &acc) {
        const int dl = __dp4a(e.l[0], (int)v.lo.x, __dp4a(e.l[1], (int)v.lo.y, __dp4a(e.l[2], (int)v.lo.z, __dp4a(e.l[3], (int)v.lo.w, 0))));
        const int dh = __dp4a(e.h[0], (int)v.hi.x, __dp4a(e.h[1], (int)v.hi.y, __dp4a(e.h[2], (int)v.hi.z, __dp4a(e.h[3], (int)v.hi.w, 0))));
        // |sc * dot| <= 63 * 16*15*128 < 2^21; |m * sum| <= 63 * 16*128.
        acc += v.dlo * (e.d * small_int(e.sc0 * dl) - e.dmin * small_int(e.m0 * v.slo)) +
               v.dhi * (e.d * small_int(e.sc1 * dh) - e.dmin * small_int(e.m1 * v.shi));
    }
};

struct Q6KDot {
    static constexpr int ONE_ROW_BLOCKS = 4;  // 122 registers, 40 KB of weight ring a block
    // Blocks are 210 bytes: a lane's bytes come from the warp's ring in shared memory.
    static constexpr bool STAGED = true;
    // Lane a (0..15): half h = a/8, l0 = 4*(a%8); it owns weights 128h + 32j + l0 + [0,4) for
    // j = 0..3 (4-weight runs, each in its own 16-weight scale group).
    static constexpr int DLPB = 16;
    struct X { int v[4]; float d[4]; int s[4]; };
    static __device__ __forceinline__ void load_x(const int8_t *xq, const float *xd, int bi, int a, X &x) {
        const int h = a >> 3, l0 = 4 * (a & 7);
#pragma unroll
        for (int j = 0; j < 4; j++) {
            x.v[j] = *reinterpret_cast<const int *>(xq + bi * 256 + 128 * h + 32 * j + l0);
            x.d[j] = xd[bi * 8 + 4 * h + j];
            x.s[j] = __dp4a(0x01010101, x.v[j], 0);
        }
    }
    struct W { uint32_t qa, qb, qh; int sc[4]; float d; };
    static __device__ __forceinline__ void load_w(const uint8_t *__restrict__ blk, int a, W &w) {
        const int h = a >> 3, l0 = 4 * (a & 7);
        // Blocks are 2-byte aligned: 32-bit words are read as two halves.
        w.qa = ld_u16x2(blk + 64 * h + l0);
        w.qb = ld_u16x2(blk + 64 * h + 32 + l0);
        w.qh = ld_u16x2(blk + 128 + 32 * h + l0);
        const int8_t *sc = reinterpret_cast<const int8_t *>(blk + 192 + 8 * h + (l0 >> 4));
#pragma unroll
        for (int j = 0; j < 4; j++) w.sc[j] = sc[2 * j];
        w.d = ld_half(blk + 208);
    }
    // Nothing to decode once per block: the dot works on the loaded words.
    using E = W;
    static __device__ __forceinline__ E expand(const W &w, int, int) { return w; }
    static __device__ __forceinline__ void dot(const W &w, const X &x, float &acc) {
        int q[4];
        q[0] = (w.qa & 0x0F0F0F0Fu) | ((w.qh << 4) & 0x30303030u);
        q[1] = (w.qb & 0x0F0F0F0Fu) | ((w.qh << 2) & 0x30303030u);
        q[2] = ((w.qa >> 4) & 0x0F0F0F0Fu) | (w.qh & 0x30303030u);
        q[3] = ((w.qb >> 4) & 0x0F0F0F0Fu) | ((w.qh >> 2) & 0x30303030u);
        float sum = 0.f;
#pragma unroll
        for (int j = 0; j < 4; j++) {
            // Quants are stored + 32: sum((q - 32) * x) = dot(q, x) - 32 * sum(x); |.| <= 4*32*128.
            const int dq = __dp4a(q[j], x.v[j], 0) - 32 * x.s[j];
            sum += x.d[j] * small_int(w.sc[j] * dq);
        }
        acc += w.d * sum;
    }
};

struct Q8_0Dot {
    static constexpr bool STAGED = false;  // each lane reads its bytes itself
    static constexpr int ONE_ROW_BLOCKS = 5;
    // Lane a (0..3) owns weights 8a..8a+7 of the 32.
    static constexpr int DLPB = 4;
    struct X { int v0, v1; float d; };
    static __device__ __forceinline__ void load_x(const int8_t *xq, const float *xd, int bi, int a, X &x) {
        const int2 v = *reinterpret_cast<const int2 *>(xq + bi * 32 + 8 * a);
        x.v0 = v.x;
        x.v1 = v.y;
        x.d = xd[bi];
    }
    struct W { int w0, w1; float d; };
    static __device__ __forceinline__ void load_w(const uint8_t *__restrict__ blk, int a, W &w) {
        w.w0 = (int)ld_u16x2(blk + 2 + 8 * a);
        w.w1 = (int)ld_u16x2(blk + 6 + 8 * a);
        w.d = ld_half(blk);
    }
    // Nothing to decode once per block: the dot works on the loaded words.
    using E = W;
    static __device__ __forceinline__ E expand(const W &w, int, int) { return w; }
    static __device__ __forceinline__ void dot(const W &w, const X &x, float &acc) {
        acc += w.d * x.d * small_int(__dp4a(w.w0, x.v0, __dp4a(w.w1, x.v1, 0)));
    }
};

struct Q4_0Dot {
    static constexpr bool STAGED = false;  // each lane reads its bytes itself
    static constexpr int ONE_ROW_BLOCKS = 5;
    // Lane a (0..3) owns bytes 4a..4a+3: weights 4a..4a+3 (low nibbles) and 16+4a.. (high).
    static constexpr int DLPB = 4;
    struct X { int lo, hi, s; float d; };
    static __device__ __forceinline__ void load_x(const int8_t *xq, const float *xd, int bi, int a, X &x) {
        x.lo = *reinterpret_cast<const int *>(xq + bi * 32 + 4 * a);
        x.hi = *reinterpret_cast<const int *>(xq + bi * 32 + 16 + 4 * a);
        x.s = __dp4a(0x01010101, x.lo, __dp4a(0x01010101, x.hi, 0));
        x.d = xd[bi];
    }
    struct W { uint32_t w; float d; };
    static __device__ __forceinline__ void load_w(const uint8_t *__restrict__ blk, int a, W &w) {
        w.w = ld_u16x2(blk + 2 + 4 * a);
        w.d = ld_half(blk);
    }
    // Nothing to decode once per block: the dot works on the loaded words.
    using E = W;
    static __device__ __forceinline__ E expand(const W &w, int, int) { return w; }
    static __device__ __forceinline__ void dot(const W &w, const X &x, float &acc) {
        const int lo = w.w & 0x0F0F0F0F, hi = (w.w >> 4) & 0x0F0F0F0F;
        const int dq = __dp4a(lo, x.lo, __dp4a(hi, x.hi, 0)) - 8 * x.s;
        acc += w.d * x.d * small_int(dq);
    }
};

// Each warp owns MV_SLOTS weight rows and walks their whole length itself: no split of k
// between warps, so no block barrier, and warps run independently. Per step a warp covers
// 32/DLPB consecutive blocks of each row (neighbouring lanes, neighbouring bytes). The matvec
// is bound by how many bytes are in flight, not by arithmetic: the weights of U steps (4, or 2
// above 2 rows) are requested before any is used, so a lane keeps MV_SLOTS × U weight loads in
// flight; a staged type (blocks that are not 4-byte aligned) goes through the warp's own shared
// memory instead, at 1-2 rows as a ring of asynchronous copies whose first groups are issued
// before it waits on the kernel before (mv_body below). The LoRA B entries, LoRA u and residual a
// warp needs are requested before the loop, so nothing waits on memory after it. Slots are rows;
// in GLU mode the slot pair is (gate row n, up row n) and the output is silu(gate) * up. Up to
// three weight segments are stacked as one output (q|k|v share an input and write one buffer).
// Each batch row b has its own adapter (or none): the LoRA term scale_b * B_b[n, :] ·
// u[b, seg*rmax ..] (rank r_b) is added by lanes j < r_b before the warp sum, so a row's sum
// depends only on its own adapter, never on the others' in the step.
#define MV_WARPS 4
#define MV_SLOTS 2
#define MV_MAX_ROWS 8
#define MV_STAGES 3  // groups of weight steps a warp of a staged type has in flight
struct MvArgs {
    const uint8_t *w[3];
    const float *lora_b[MV_MAX_ROWS][3];  // per batch row: B [rows_of_segment, r_b] row-major, or null
    const int8_t *xq;                     // [NB, k] activations quantized in blocks of 32 (or 128)
    const float *xd;                      // [NB, k/32] their scales, one for each 32
    const float *lora_u;                  // [NB, ldu]; row b's segment s starts at s * rmax
    const float *residual;                // [NB, ldy] or null (may equal y)
    float *y;                             // [NB, ldy]
    int seg_end[3];                       // cumulative row counts
    int k, n, ldy, ldu, rmax, glu;
    int r[MV_MAX_ROWS];                   // rank of each row's adapter
    float lora_scale[MV_MAX_ROWS];
};

// Row b's B for segment seg, its rank and scale. `b` may be a run-time value: the fields are
// picked by comparisons, not by indexing the parameter arrays (which would copy the whole
// argument struct to local memory).
struct MvLora {
    const float *b;
    int r;
    float scale;
};
__device__ __forceinline__ MvLora mv_lora(const MvArgs &a, int b, int seg) {
    MvLora l{nullptr, 0, 0.f};
#pragma unroll
    for (int i = 0; i < MV_MAX_ROWS; i++)
        if (i == b) {
            l.b = seg == 0 ? a.lora_b[i][0] : (seg == 1 ? a.lora_b[i][1] : a.lora_b[i][2]);
            l.r = a.r[i];
            l.scale = a.lora_scale[i];
        }
    return l;
}

template <typename Q, typename D, int NB>
__device__ void mv_body(const MvArgs &a) {
    constexpr int BPS = 32 / D::DLPB;                  // blocks of a row per warp step
    constexpr int U = NB <= 2 ? 4 : 2;                 // steps in flight (registers bound it)
    // Staged types (blocks that are not 4-byte aligned): a step's BPS blocks of a row are one run
    // of whole 4-byte words (an even number of blocks a step, 4-byte aligned rows), decoded from
    // shared memory. At 1-2 rows a group of UG steps is copied asynchronously into the warp's
    // ring, MV_STAGES - 1 groups ahead; at 3-8 rows, where the kernel is busier with arithmetic,
    // each lane reads its words of U steps and stores them (the ring measured slower there).
    constexpr bool RING = D::STAGED && NB <= 2;
    constexpr int UG = RING ? 4 : U;
    constexpr int GB = UG * BPS * Q::BYTES;            // one row's bytes of a group
    __shared__ __align__(16) uint8_t ring_all[RING ? MV_WARPS : 1][RING ? MV_STAGES : 1][MV_SLOTS][RING ? GB : 16];
    pdl_launch_dependents();
    const int lane = threadIdx.x & 31, sub = lane % D::DLPB, lb = lane / D::DLPB;
    const int nblk = a.k / Q::ELEMS;
    const int outs = a.glu ? MV_SLOTS / 2 : MV_SLOTS;  // output rows of this warp
    const int first = (blockIdx.x * MV_WARPS + (threadIdx.x >> 5)) * outs;
    if (first >= a.n) return;
    // Segment pointers picked by comparisons, not by indexing the parameter arrays (which would
    // copy the whole argument struct to local memory).
    const uint8_t *wrow[MV_SLOTS];
    int seg[MV_SLOTS], lrow[MV_SLOTS];
#pragma unroll
    for (int s = 0; s < MV_SLOTS; s++) {
        const int row = first + (a.glu ? s / 2 : s);
        wrow[s] = nullptr;
        seg[s] = s & 1;
        lrow[s] = row;
        if (row < a.n) {
            if (!a.glu) {
                seg[s] = row < a.seg_end[0] ? 0 : (row < a.seg_end[1] ? 1 : 2);
                lrow[s] = seg[s] == 0 ? row : (seg[s] == 1 ? row - a.seg_end[0] : row - a.seg_end[1]);
            }
            const uint8_t *w = seg[s] == 0 ? a.w[0] : (seg[s] == 1 ? a.w[1] : a.w[2]);
            wrow[s] = w + (int64_t)lrow[s] * nblk * Q::BYTES;
        }
    }
    const int nsteps = (nblk + BPS - 1) / BPS, ngroups = (nsteps + UG - 1) / UG;
    bool staged = D::STAGED && nblk % BPS == 0, wide = GB % 16 == 0;
#pragma unroll
    for (int s = 0; s < MV_SLOTS; s++) {
        staged &= (reinterpret_cast<uintptr_t>(wrow[s]) & 3) == 0;
        wide &= (reinterpret_cast<uintptr_t>(wrow[s]) & 15) == 0;
    }
    uint8_t(*ring)[MV_SLOTS][RING ? GB : 16] = ring_all[RING ? threadIdx.x >> 5 : 0];
    // Group gi of every row into its ring slot; one commit group per group, empty past the end.
    auto fetch = [&](int gi) {
        if (gi < ngroups) {
            const int bytes = min(UG, nsteps - gi * UG) * BPS * Q::BYTES;
#pragma unroll
            for (int s = 0; s < MV_SLOTS; s++)
                if (wrow[s] != nullptr) warp_copy_async(ring[gi % MV_STAGES][s], wrow[s] + (int64_t)gi * GB, bytes, wide, lane);
        }
        cp_async_commit();
    };
    // The weights depend on no earlier kernel: they start coming while it finishes.
    if (RING && staged)
#pragma unroll
        for (int gi = 0; gi < MV_STAGES - 1; gi++) fetch(gi);
    pdl_wait();
    float bv[MV_SLOTS][NB], uv[MV_SLOTS][NB], acc[MV_SLOTS][NB];
#pragma unroll
    for (int s = 0; s < MV_SLOTS; s++)
#pragma unroll
        for (int b = 0; b < NB; b++) {
            bv[s][b] = uv[s][b] = acc[s][b] = 0.f;
            if (wrow[s] == nullptr) continue;
            const MvLora l = mv_lora(a, b, seg[s]);
            if (l.b == nullptr) continue;
            const float *brow = l.b + (int64_t)lrow[s] * l.r;
            const float *u = a.lora_u + (int64_t)b * a.ldu + seg[s] * a.rmax;
            if (lane < l.r) {
                bv[s][b] = brow[lane] * l.scale;
                uv[s][b] = u[lane];
            }
            // Ranks above 32 (rare) start the accumulator with the other entries.
            for (int j = lane + 32; j < l.r; j += 32) acc[s][b] = fmaf(brow[j] * l.scale, u[j], acc[s][b]);
        }
    // Lane o*NB + b writes output row first+o of batch row b; its residual is read now.
    const int oo = lane / NB, ob = lane % NB;
    const bool writes = lane < outs * NB && first + oo < a.n;
    const int64_t at = (int64_t)ob * a.ldy + first + oo;
    const float res = writes && a.residual != nullptr ? a.residual[at] : 0.f;

    // Block bi's share of every slot's dot products, its weights already loaded.
    auto consume = [&](const typename D::W (&wv)[MV_SLOTS], int bi) {
        // Decoded once for all activation rows, by every lane (expand may shuffle).
        typename D::E e[MV_SLOTS];
#pragma unroll
        for (int s = 0; s < MV_SLOTS; s++) e[s] = D::expand(wv[s], sub, lane);
        if (bi >= nblk) return;
        // One activation row at a time (X is up to 12 registers a row).
#pragma unroll
        for (int b = 0; b < NB; b++) {
            typename D::X xv;
            D::load_x(a.xq + (int64_t)b * a.k, a.xd + (int64_t)b * (a.k / 32), bi, sub, xv);
#pragma unroll
            for (int s = 0; s < MV_SLOTS; s++)
                if (wrow[s] != nullptr) D::dot(e[s], xv, acc[s][b]);
        }
    };
    if (RING && staged) {
        for (int gi = 0; gi < ngroups; gi++) {
            // This group's copies are done (later ones may still fly), and every lane has
            // finished reading the slot the next fetch overwrites.
            cp_async_wait<MV_STAGES - 2>();
            __syncwarp();
            fetch(gi + MV_STAGES - 1);
#pragma unroll
            for (int u = 0; u < UG; u++) {
                const int bi = (gi * UG + u) * BPS + lb;
                typename D::W wv[MV_SLOTS];
#pragma unroll
                for (int s = 0; s < MV_SLOTS; s++) {
                    wv[s] = {};
                    if (wrow[s] != nullptr && bi < nblk) D::load_w(ring[gi % MV_STAGES][s] + (u * BPS + lb) * Q::BYTES, sub, wv[s]);
                }
                consume(wv, bi);
            }
        }
    } else {
        constexpr bool WORDS = D::STAGED && !RING;
        constexpr int SW = WORDS ? BPS * Q::BYTES / 4 : 1;  // words of a step's run
        constexpr int SK = (SW + 31) / 32;                   // of them a lane reads
        __shared__ uint32_t stage[WORDS ? MV_WARPS : 1][U][MV_SLOTS][SW];
        for (int st = 0; st < nsteps; st += U) {
            typename D::W wv[U][MV_SLOTS];
            if (WORDS && staged) {
                uint32_t raw[U][MV_SLOTS][SK];
#pragma unroll
                for (int u = 0; u < U; u++)
#pragma unroll
                    for (int s = 0; s < MV_SLOTS; s++) {
                        const bool in = wrow[s] != nullptr && (st + u) < nsteps;
                        const uint8_t *run = in ? wrow[s] + (int64_t)(st + u) * BPS * Q::BYTES : nullptr;
#pragma unroll
                        for (int c = 0; c < SK; c++) raw[u][s][c] = in && lane + 32 * c < SW ? ld_stream4(run + 4 * (lane + 32 * c)) : 0u;
                    }
                __syncwarp();  // the previous steps' words are decoded
                uint32_t(*mine)[MV_SLOTS][SW] = stage[WORDS ? threadIdx.x >> 5 : 0];
#pragma unroll
                for (int u = 0; u < U; u++)
#pragma unroll
                    for (int s = 0; s < MV_SLOTS; s++)
#pragma unroll
                        for (int c = 0; c < SK; c++)
                            if (lane + 32 * c < SW) mine[u][s][lane + 32 * c] = raw[u][s][c];
                __syncwarp();
#pragma unroll
                for (int u = 0; u < U; u++)
#pragma unroll
                    for (int s = 0; s < MV_SLOTS; s++) {
                        wv[u][s] = {};
                        const int bi = (st + u) * BPS + lb;
                        if (wrow[s] != nullptr && bi < nblk) D::load_w(reinterpret_cast<const uint8_t *>(mine[u][s]) + lb * Q::BYTES, sub, wv[u][s]);
                    }
            } else {
#pragma unroll
                for (int u = 0; u < U; u++) {
                    const int bi = (st + u) * BPS + lb;
#pragma unroll
                    for (int s = 0; s < MV_SLOTS; s++) {
                        wv[u][s] = {};
                        if (wrow[s] != nullptr && bi < nblk) D::load_w(wrow[s] + (int64_t)bi * Q::BYTES, sub, wv[u][s]);
                    }
                }
            }
#pragma unroll
            for (int u = 0; u < U; u++) consume(wv[u], (st + u) * BPS + lb);
        }
    }
    float out = 0.f, gate = 0.f;
#pragma unroll
    for (int s = 0; s < MV_SLOTS; s++)
#pragma unroll
        for (int b = 0; b < NB; b++) {
            // Lanes without a LoRA entry hold bv = uv = 0: fmaf(0, 0, acc) is acc exactly.
            const float v = warp_sum(fmaf(bv[s][b], uv[s][b], acc[s][b]));
            // Every lane holds every total; each keeps the one (or the gate/up pair) it writes.
            if (b == ob && (a.glu ? s / 2 : s) == oo) {
                if (a.glu && (s & 1) == 0) gate = v;
                else out = v;
            }
        }
    if (!writes) return;
    if (a.glu) out = gate / (1.f + __expf(-gate)) * out;
    a.y[at] = out + res;
}

// Register bounds (checked with ptxas -v for spills): the one-row kernel is held to
// ONE_ROW_BLOCKS blocks an SM, more rows to 4 (128 registers; unbounded, ptxas takes up to 217
// for 8 rows and fits only 2 blocks).
#define MV_NB(QN, Q, NB) \
    extern "C" __global__ void __launch_bounds__(MV_WARPS * 32, NB == 1 ? Q##Dot::ONE_ROW_BLOCKS : 4) mv_##QN##_b##NB(const MvArgs a) { mv_body<Q, Q##Dot, NB>(a); }
#define MV(QN, Q) MV_NB(QN, Q, 1) MV_NB(QN, Q, 2) MV_NB(QN, Q, 3) MV_NB(QN, Q, 4) \
                  MV_NB(QN, Q, 5) MV_NB(QN, Q, 6) MV_NB(QN, Q, 7) MV_NB(QN, Q, 8)

#define ALL(QN, Q) DEQUANT(QN, Q) EMBED(QN, Q) MV(QN, Q)
ALL(q4k, Q4K)
ALL(q6k, Q6K)
ALL(q8_0, Q8_0)
ALL(q4_0, Q4_0)

// ---- decode matvec on tensor cores: Q4_K, 1-8 token rows -----------------------------------------
//
// The dp4a matvec above does its integer work once per activation row, so at 8 rows it is
// issue-bound at a fifth of the memory bandwidth (ncu: issue slots 59% busy, DRAM 19%). Here a warp computes a 16-row × 8-batch
// tile with int8 mma.sync (m16n8k32: one Q4_K sub-block of 32 weights per MMA), so the integer
// dot products cost 8 MMAs per 256 weights of 16 rows. The k order inside an MMA is permuted the
// same way for weights and activations (MMA column 4t+i is weight 8t+i, column 16+4t+i is weight
// 8t+4+i, t = lane % 4), so every lane reads 8 contiguous quant bytes of a row. The warps of a
// block split k (and LoRA B·u's rank) and meet in shared memory; scales are applied per
// 128-weight half, the residual and SwiGLU in the epilogue as in mv_body. Tiles are 16 weight rows: 16 outputs,
// or in GLU mode 8 outputs whose gate rows are MMA rows 0-7 and up rows 8-15.
#define MQ_WARPS 8
#define MQ_STAGES 3  // blocks a warp of mvq_q4k has in flight: 8 × 3 × 2,304 bytes of ring a block
#define MQ6_STAGES 3  // stages of mvq_q6k's ring, each 8 blocks × 16 rows: 80,640 bytes a block
// Those rings are for Hopper (228 KB of shared memory an SM: three Q4_K blocks fit, as many as
// the registers allow, or two Q6_K ones). The consumer cards' 100 KB would hold one, so compiled
// for an earlier architecture the kernels read their blocks straight from global memory.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define MQ_RING true
#else
#define MQ_RING false
#endif

__device__ __forceinline__ uint2 ld_stream8(const uint8_t *p) {
    uint2 v;
    asm("ld.global.nc.L1::no_allocate.v2.u32 {%0, %1}, [%2];" : "=r"(v.x), "=r"(v.y) : "l"(p));
    return v;
}

__device__ __forceinline__ void mma_s8(int (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
    asm("mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
        : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// One weight row of a tile: where it is (null past the end), its segment and its row in it.
struct MqRow {
    const uint8_t *w;
    int seg, lrow;
};

__device__ __forceinline__ MqRow mq_row(const MvArgs &a, int row, int seg_glu, int nblk, int block_bytes) {
    MqRow r{nullptr, 0, 0};
    if (row >= (a.glu ? a.n : a.seg_end[2])) return r;
    int seg = seg_glu, lrow = row;
    if (!a.glu) {
        seg = row < a.seg_end[0] ? 0 : (row < a.seg_end[1] ? 1 : 2);
        lrow = seg == 0 ? row : (seg == 1 ? row - a.seg_end[0] : row - a.seg_end[1]);
    }
    const uint8_t *w = seg == 0 ? a.w[0] : (seg == 1 ? a.w[1] : a.w[2]);
    r.w = w + (int64_t)lrow * nblk * block_bytes;
    r.seg = seg;
    r.lrow = lrow;
    return r;
}

// Iteration it of nit (blocks 8·it.., up to 8, of BYTES each) of each of the SLOTS rows into
// slot[s], copied asynchronously by the warp (16 bytes a copy where `wide`, else 4), then one
// commit group (empty for an iteration past the end or a null row), so a ring's waits count the
// same in every warp. The 1-2 row kernels' ring fill.
template <int BYTES, int SLOTS>
__device__ __forceinline__ void fetch_iteration(uint8_t (*slot)[8 * BYTES], const MqRow (&rows)[SLOTS], int it, int nit, int nblk, bool wide, int lane) {
    if (it < nit) {
        const int bytes = min(8, nblk - 8 * it) * BYTES;
#pragma unroll
        for (int s = 0; s < SLOTS; s++)
            if (rows[s].w != nullptr) warp_copy_async(slot[s], rows[s].w + (int64_t)it * 8 * BYTES, bytes, wide, lane);
    }
    cp_async_commit();
}

// One Q4_K block of a 16-row tile as lane (grp, t) holds it for the MMA: the headers of its two
// rows (grp and grp + 8) and, of each row, the 8 quant bytes 8t.. of every 32-byte group (zeros
// for a row past the end). Both tensor-core kernels (decode and prompt) read blocks this way.
struct MqBlock {
    uint4 ha, hb;
    uint2 qa[4], qb[4];

    // Block bi of the rows at wa and wb (either may be null).
    __device__ __forceinline__ void load(const uint8_t *wa, const uint8_t *wb, int bi, int t) {
        ha = hb = make_uint4(0, 0, 0, 0);
#pragma unroll
        for (int g = 0; g < 4; g++) qa[g] = qb[g] = make_uint2(0, 0);
        if (wa != nullptr) {
            const uint8_t *p = wa + (int64_t)bi * Q4K::BYTES;
            ha = ld_stream16(p);
#pragma unroll
            for (int g = 0; g < 4; g++) qa[g] = ld_stream8(p + 16 + 32 * g + 8 * t);
        }
        if (wb != nullptr) {
            const uint8_t *p = wb + (int64_t)bi * Q4K::BYTES;
            hb = ld_stream16(p);
#pragma unroll
            for (int g = 0; g < 4; g++) qb[g] = ld_stream8(p + 16 + 32 * g + 8 * t);
        }
    }

    // The same block from a ring slot holding the tile's 16 rows one after another (mvq's Q4_K
    // ring); a_in, b_in: whether rows grp and grp + 8 exist (else zeros).
    __device__ __forceinline__ void load_slot(const uint8_t *slot, bool a_in, bool b_in, int grp, int t) {
        ha = hb = make_uint4(0, 0, 0, 0);
#pragma unroll
        for (int g = 0; g < 4; g++) qa[g] = qb[g] = make_uint2(0, 0);
        if (a_in) {
            const uint8_t *p = slot + grp * Q4K::BYTES;
            ha = *reinterpret_cast<const uint4 *>(p);
#pragma unroll
            for (int g = 0; g < 4; g++) qa[g] = *reinterpret_cast<const uint2 *>(p + 16 + 32 * g + 8 * t);
        }
        if (b_in) {
            const uint8_t *p = slot + (grp + 8) * Q4K::BYTES;
            hb = *reinterpret_cast<const uint4 *>(p);
#pragma unroll
            for (int g = 0; g < 4; g++) qb[g] = *reinterpret_cast<const uint2 *>(p + 16 + 32 * g + 8 * t);
        }
    }

    // The MMA's A operand for sub-block j: the low nibbles of group j/2 for even j, the high for odd.
    __device__ __forceinline__ void frag(int j, uint32_t (&am)[4]) const {
        const int g = j >> 1, sh = 4 * (j & 1);
        am[0] = (qa[g].x >> sh) & 0x0F0F0F0Fu;
        am[1] = (qb[g].x >> sh) & 0x0F0F0F0Fu;
        am[2] = (qa[g].y >> sh) & 0x0F0F0F0Fu;
        am[3] = (qb[g].y >> sh) & 0x0F0F0F0Fu;
    }

    // d and dmin of each row.
    __device__ __forceinline__ float2 dm_a() const { return __half22float2(*reinterpret_cast<const __half2 *>(&ha.x)); }
    __device__ __forceinline__ float2 dm_b() const { return __half22float2(*reinterpret_cast<const __half2 *>(&hb.x)); }
};

// One Q6_K block of a 16-row tile as lane (grp, t) holds it for the MMA (both tensor-core kernels
// that read Q6_K: decode and prompt). Half n of a block (weights 128n..) keeps its low 4 bits in
// ql[64n..64n + 63] (weights 128n + r and 128n + 64 + r in the low and high nibbles of byte
// r < 64) and its top 2 bits in qh[32n..32n + 31] (weight 128n + 32i + r in bits 2i, 2i + 1 of
// byte r < 32); group g (0..7) of a half covers weights 128n + 16g + [0, 16), with scale
// scales[8n + g]. Of each of its two rows (grp and grp + 8; zeros past the end) a lane holds
// the 4 consecutive ql and qh bytes of weights 4t..4t + 3 of every group, the scales and d.
// Blocks are 210 bytes, so only every other block of a row starts 4-byte aligned; the others'
// words are read as two halves.
struct MqBlockQ6K {
    struct Row {
        uint32_t ql[2][2][2], qh[2][2], sc[2][2];  // [half][c][u], [half][u], [half][word]
        float d;
        // The quants (0..63, stored + 32) of weights 4t..4t + 3 of group g of half n.
        __device__ __forceinline__ uint32_t quants(int n, int g) const {
            const int qd = g / 2, u = g % 2;  // ql and qh bytes of weights 128n + 32·qd + 16·u + ..
            return ((ql[n][qd & 1][u] >> (4 * (qd >> 1))) & 0x0F0F0F0Fu) | (((qh[n][u] >> (2 * qd)) & 0x03030303u) << 4);
        }
        __device__ __forceinline__ int scale(int n, int g) const { return (int)(int8_t)((sc[n][g >> 2] >> (8 * (g & 3))) & 0xFF); }
    };
    Row a, b;
    // The words of a block at p: one aligned read each where p is 4-byte aligned (every other
    // block of a row that starts aligned), else two 2-byte reads.
    template <bool ALIGNED>
    static __device__ __forceinline__ void row_words(Row &r, const uint8_t *p, int t) {
        const auto word = [p](int off) { return ALIGNED ? *reinterpret_cast<const uint32_t *>(p + off) : ld_u16x2(p + off); };
#pragma unroll
        for (int n = 0; n < 2; n++) {
#pragma unroll
            for (int u = 0; u < 2; u++) {
                r.ql[n][0][u] = word(64 * n + 16 * u + 4 * t);
                r.ql[n][1][u] = word(64 * n + 32 + 16 * u + 4 * t);
                r.qh[n][u] = word(128 + 32 * n + 16 * u + 4 * t);
            }
            r.sc[n][0] = word(192 + 8 * n);
            r.sc[n][1] = word(196 + 8 * n);
        }
        r.d = ld_half(p + 208);
    }
    static __device__ __forceinline__ void row(Row &r, const uint8_t *p, int t) {
        if ((reinterpret_cast<uintptr_t>(p) & 3) == 0) row_words<true>(r, p, t);
        else row_words<false>(r, p, t);
    }
    // Block bi of the rows at wa and wb (either may be null).
    __device__ __forceinline__ void load(const uint8_t *wa, const uint8_t *wb, int bi, int t) {
        a = Row{};
        b = Row{};
        if (wa != nullptr) row(a, wa + (int64_t)bi * Q6K::BYTES, t);
        if (wb != nullptr) row(b, wb + (int64_t)bi * Q6K::BYTES, t);
    }
    // The same block from mvq's block ring, the tile's 16 rows `stride` bytes apart from `at`
    // (row 0's copy of it); a_in, b_in: whether rows grp and grp + 8 exist (else zeros).
    __device__ __forceinline__ void load_staged(const uint8_t *at, int stride, bool a_in, bool b_in, int grp, int t) {
        a = Row{};
        b = Row{};
        if (a_in) row(a, at + grp * stride, t);
        if (b_in) row(b, at + (grp + 8) * stride, t);
    }
};

// Σ of 16 int8 values (4 words), and the dot product of 16 weight bytes with them.
__device__ __forceinline__ int dp4a_sum(const uint4 &v) {
    return __dp4a(0x01010101, (int)v.x, __dp4a(0x01010101, (int)v.y, __dp4a(0x01010101, (int)v.z, __dp4a(0x01010101, (int)v.w, 0))));
}
__device__ __forceinline__ int dp4a_dot(const uint32_t (&w)[4], const uint4 &v) {
    return __dp4a((int)w[0], (int)v.x, __dp4a((int)w[1], (int)v.y, __dp4a((int)w[2], (int)v.z, __dp4a((int)w[3], (int)v.w, 0))));
}

// The tensor-core order's float arithmetic, shared by the tensor-core matvecs and the dp4a
// kernels below that reproduce them. The activations come in int8 groups of 128 (one scale xd
// for each half of a K-quant block), so a half's sub-blocks are summed exactly in integers,
// each integer dot product times its 6- or 8-bit scale, and only the half's total is scaled in
// floats:
//   Q4_K: acc = fma(xd_h, d·Σ sc_j·dot_j − dmin·Σ m_j·Σx_j, acc)   (sub-blocks j of half h)
//   Q6_K: acc = fma(xd_h, d·Σ sc_g·dot_g, acc)                      (16-weight groups g of it)
// with every rounding spelled out, so every kernel and the compiler's FMA contraction compute
// the same bits. The integer sums are exact: |Σ sc·dot| <= 4·63·32·15·127 and
// |Σ m·Σx| <= 4·63·32·127 for Q4_K, |Σ sc·dot| <= 8·128·16·32·127 for Q6_K.
__device__ __forceinline__ float q4k_term(float d, float dmin, int isc, int imn) { return __fsub_rn(__fmul_rn(d, __int2float_rn(isc)), __fmul_rn(dmin, __int2float_rn(imn))); }
__device__ __forceinline__ float q4k_half(float acc, float xd, float d, float dmin, int isc, int imn) { return __fmaf_rn(xd, q4k_term(d, dmin, isc, imn), acc); }
__device__ __forceinline__ float q6k_term(float d, int isc) { return __fmul_rn(d, __int2float_rn(isc)); }
__device__ __forceinline__ float q6k_half(float acc, float xd, float d, int isc) { return __fmaf_rn(xd, q6k_term(d, isc), acc); }

// The scale (or min) byte i of a packed word, as an int, and copied into all four bytes (an MMA
// operand whose every weight is that byte).
__device__ __forceinline__ int byte_of(uint32_t w, int i) { return (int)((w >> (8 * i)) & 0xFF); }
__device__ __forceinline__ uint32_t byte_spread(uint32_t w, int i) { return __byte_perm(w, 0, 0x1111u * i); }

// The epilogue both Q4_K kernels share: silu(gate) * up, and the residual, rounded explicitly.
__device__ __forceinline__ float mq_silu_mul(float gate, float up) {
    return __fmul_rn(__fdiv_rn(gate, __fadd_rn(1.f, __expf(-gate))), up);
}
__device__ __forceinline__ void mq_store(const MvArgs &a, int row, int b, float v) {
    const int64_t at = (int64_t)b * a.ldy + row;
    a.y[at] = a.residual != nullptr ? __fadd_rn(v, a.residual[at]) : v;
}

// The type parts of the tensor-core matvec mvq_body: Block (a 16-row tile's block as the MMA
// lanes hold it) and tile(), which adds one block's share to a lane's four accumulators (rows
// grp and grp + 8 × batch rows 2t, 2t + 1), one 128-weight half at a time in the order above
// (q4k_half, q6k_half), which the type's 1-2 row dp4a kernel (mvd_<type>) reproduces.

// Q4_K: per sub-block j one m16n8k32 MMA gives the integer dot products, which the lane scales
// by its rows' 6-bit sc_j; a second MMA, against weights that are all the row's min m_j, adds
// m_j·Σx_j for the whole half in its accumulator.
struct MqQ4K {
    static constexpr int BYTES = Q4K::BYTES;
    static constexpr bool RING = MQ_RING;  // mvq_body stages its blocks through a warp's ring
    static constexpr bool BLOCK_RING = false;
    using Block = MqBlock;
    template <int NB>
    static __device__ __forceinline__ void tile(const Block &blk, const MvArgs &a, int bi, int grp, int t, float (&acc)[4]) {
        const int b0 = 2 * t, b1 = 2 * t + 1;
        // Activations: batch row grp, bytes 8t..8t+7 of each sub-block (the MMA's B operand).
        uint2 xv[8];
#pragma unroll
        for (int j = 0; j < 8; j++) {
            xv[j] = make_uint2(0, 0);
            if (grp < NB) xv[j] = *reinterpret_cast<const uint2 *>(a.xq + (int64_t)grp * a.k + bi * 256 + 32 * j + 8 * t);
        }
        // The scales of the block's two activation groups for this lane's two batch columns.
        float xd0[2], xd1[2];
#pragma unroll
        for (int h = 0; h < 2; h++) {
            xd0[h] = b0 < NB ? a.xd[(int64_t)b0 * (a.k / 32) + bi * 8 + 4 * h] : 0.f;
            xd1[h] = b1 < NB ? a.xd[(int64_t)b1 * (a.k / 32) + bi * 8 + 4 * h] : 0.f;
        }
        const float2 dma = blk.dm_a(), dmb = blk.dm_b();
#pragma unroll
        for (int h = 0; h < 2; h++) {
            uint32_t sca, mna, scb, mnb;  // sub-blocks 4h..4h + 3, a byte each
            q4k_scale_words(blk.ha.y, blk.ha.z, blk.ha.w, h == 1, sca, mna);
            q4k_scale_words(blk.hb.y, blk.hb.z, blk.hb.w, h == 1, scb, mnb);
            int isc[4] = {0, 0, 0, 0}, imn[4] = {0, 0, 0, 0};
#pragma unroll
            for (int i = 0; i < 4; i++) {
                const int j = 4 * h + i;
                uint32_t am[4];
                blk.frag(j, am);
                const uint32_t bm[2] = {xv[j].x, xv[j].y};
                int d[4] = {0, 0, 0, 0};
                mma_s8(d, am, bm);
                const uint32_t ma = byte_spread(mna, i), mb = byte_spread(mnb, i);
                const uint32_t mins[4] = {ma, mb, ma, mb};
                mma_s8(imn, mins, bm);
                const int sa = byte_of(sca, i), sb = byte_of(scb, i);
                isc[0] += sa * d[0];
                isc[1] += sa * d[1];
                isc[2] += sb * d[2];
                isc[3] += sb * d[3];
            }
            acc[0] = q4k_half(acc[0], xd0[h], dma.x, dma.y, isc[0], imn[0]);
            acc[1] = q4k_half(acc[1], xd1[h], dma.x, dma.y, isc[1], imn[1]);
            acc[2] = q4k_half(acc[2], xd0[h], dmb.x, dmb.y, isc[2], imn[2]);
            acc[3] = q4k_half(acc[3], xd1[h], dmb.x, dmb.y, isc[3], imn[3]);
        }
    }
};

// Q6_K: one m16n8k16 MMA a 16-weight group g on the quants as signed bytes (q − 32), its
// integer dot products times the rows' 8-bit scales summed over the half.
__device__ __forceinline__ void mma_s8_k16(int (&d)[4], uint32_t a0, uint32_t a1, uint32_t b0) {
    asm("mma.sync.aligned.m16n8k16.row.col.s32.s8.s8.s32 {%0, %1, %2, %3}, {%4, %5}, {%6}, {%0, %1, %2, %3};"
        : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
        : "r"(a0), "r"(a1), "r"(b0));
}
// Four quants 0..63 as the signed bytes q − 32 (per byte: setting bit 7 keeps the subtraction
// from borrowing across bytes; flipping it back gives the two's-complement byte).
__device__ __forceinline__ uint32_t q6_signed(uint32_t q) { return ((q | 0x80808080u) - 0x20202020u) ^ 0x80808080u; }

struct MqQ6K {
    static constexpr int BYTES = Q6K::BYTES;
    // 2-byte aligned blocks: no warp ring, but the block's ring of 8-block runs (1,680 bytes,
    // 16-byte aligned in rows of a multiple of 8 blocks).
    static constexpr bool RING = false;
    static constexpr bool BLOCK_RING = MQ_RING;
    using Block = MqBlockQ6K;
    // One m16n8k16 MMA a group: lane t's k positions 4t..4t + 3 are weights 4t..4t + 3 of the
    // group for both operands, so its activations are 4 contiguous bytes.
    template <int NB>
    static __device__ __forceinline__ void tile(const Block &blk, const MvArgs &a, int bi, int grp, int t, float (&acc)[4]) {
        const int b0 = 2 * t, b1 = 2 * t + 1;
        const int8_t *x = a.xq + (int64_t)grp * a.k + bi * 256 + 4 * t;
        const float *xd0 = a.xd + (int64_t)b0 * (a.k / 32) + bi * 8, *xd1 = a.xd + (int64_t)b1 * (a.k / 32) + bi * 8;
#pragma unroll
        for (int n = 0; n < 2; n++) {
            int isc[4] = {0, 0, 0, 0};
#pragma unroll
            for (int g = 0; g < 8; g++) {  // weights 128n + 16g..
                const uint32_t xv = grp < NB ? *reinterpret_cast<const uint32_t *>(x + 128 * n + 16 * g) : 0u;
                int d[4] = {0, 0, 0, 0};
                mma_s8_k16(d, q6_signed(blk.a.quants(n, g)), q6_signed(blk.b.quants(n, g)), xv);
                const int sa = blk.a.scale(n, g), sb = blk.b.scale(n, g);
                isc[0] += sa * d[0];
                isc[1] += sa * d[1];
                isc[2] += sb * d[2];
                isc[3] += sb * d[3];
            }
            const float x0 = b0 < NB ? xd0[4 * n] : 0.f, x1 = b1 < NB ? xd1[4 * n] : 0.f;
            acc[0] = q6k_half(acc[0], x0, blk.a.d, isc[0]);
            acc[1] = q6k_half(acc[1], x1, blk.a.d, isc[1]);
            acc[2] = q6k_half(acc[2], x0, blk.b.d, isc[2]);
            acc[3] = q6k_half(acc[3], x1, blk.b.d, isc[3]);
        }
    }
};

// The pipeline of mvq's weight rings: fetch(i) issues the copies of iteration i into slot
// i % STAGES and commits them (an empty group past the end); STAGES - 1 iterations are issued
// before the wait for the kernel before (the weights depend on none), then each iteration waits
// for its own copies, `sync`s the threads sharing the ring (so the slot about to be refilled has
// been read by all of them), issues the fetch STAGES - 1 ahead and runs use(i).
template <int STAGES, typename Fetch, typename Sync, typename Use>
__device__ __forceinline__ void ring_pipeline(int nit, Fetch fetch, Sync sync, Use use) {
#pragma unroll
    for (int i = 0; i < STAGES - 1; i++) fetch(i);
    pdl_wait();
    for (int i = 0; i < nit; i++) {
        cp_async_wait<STAGES - 2>();
        sync();
        fetch(i + STAGES - 1);
        use(i);
    }
}

template <typename P, int NB>
__device__ void mvq_body(const MvArgs &a) {
    pdl_launch_dependents();
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int grp = lane >> 2, t = lane & 3;
    const int nblk = a.k / 256;
    // MMA rows grp (A) and grp + 8 (B) of this lane; its accumulator columns are batches 2t, 2t+1.
    const int out_a = a.glu ? blockIdx.x * 8 + grp : blockIdx.x * 16 + grp;
    const int out_b = a.glu ? out_a : out_a + 8;
    const MqRow ra = mq_row(a, out_a, 0, nblk, P::BYTES), rb = mq_row(a, out_b, 1, nblk, P::BYTES);
    const int b0 = 2 * t, b1 = 2 * t + 1;
    // acc[0], acc[1]: row A at batches b0, b1; acc[2], acc[3]: row B.
    float acc[4] = {0.f, 0.f, 0.f, 0.f};
    if constexpr (P::RING) {
        // The warp's blocks bi = warp + 8i come through its ring of MQ_STAGES slots (each the
        // tile's 16 rows of one block), copied asynchronously: MQ_STAGES - 1 blocks stay in
        // flight while it works on one, and none holds registers. Lane l copies MMA row l % 16
        // (lane 4r's row A for r < 8, lane 4(r − 8)'s row B above).
        extern __shared__ __align__(16) uint8_t mq_ring[];
        constexpr int SLOT = 16 * P::BYTES;
        uint8_t *ring = mq_ring + warp * MQ_STAGES * SLOT;
        const int r = lane & 15;
        const uint64_t from_a = __shfl_sync(0xffffffffu, reinterpret_cast<uint64_t>(ra.w), 4 * (r & 7));
        const uint64_t from_b = __shfl_sync(0xffffffffu, reinterpret_cast<uint64_t>(rb.w), 4 * (r & 7));
        const uint8_t *copy_row = reinterpret_cast<const uint8_t *>(r < 8 ? from_a : from_b);
        const int nit = warp < nblk ? (nblk - warp + MQ_WARPS - 1) / MQ_WARPS : 0;
        const auto fetch = [&](int i) {
            if (i < nit && copy_row != nullptr) {
                const uint8_t *src = copy_row + (int64_t)(warp + MQ_WARPS * i) * P::BYTES;
                uint8_t *dst = ring + (i % MQ_STAGES) * SLOT + r * P::BYTES;
                for (int c = lane >> 4; c < P::BYTES / 16; c += 2) cp_async16(dst + 16 * c, src + 16 * c);
            }
            cp_async_commit();
        };
        ring_pipeline<MQ_STAGES>(nit, fetch, [] { __syncwarp(); }, [&](int i) {
            typename P::Block blk;
            blk.load_slot(ring + (i % MQ_STAGES) * SLOT, ra.w != nullptr, rb.w != nullptr, grp, t);
            P::template tile<NB>(blk, a, warp + MQ_WARPS * i, grp, t, acc);
        });
    } else {
        // The block's ring (Q6_K): stage i holds blocks 8i..8i + 7 of the tile's 16 rows, 8
        // blocks of a row one 16-byte aligned run (rows of a multiple of 8 blocks from 16-byte
        // aligned weights; otherwise the loop below reads global memory). Warp w reads block
        // 8i + w of it, as it would from global memory; every thread of the block copies a share
        // of each stage, MQ6_STAGES - 1 stages in flight.
        constexpr int RUN = 8 * P::BYTES;
        bool staged = false;
        if constexpr (P::BLOCK_RING) {
            const uintptr_t bases = reinterpret_cast<uintptr_t>(a.w[0]) | reinterpret_cast<uintptr_t>(a.w[1]) | reinterpret_cast<uintptr_t>(a.w[2]);
            staged = nblk % 8 == 0 && (bases & 15) == 0;
            if (staged) {
                static_assert(RUN % 16 == 0, "a run of 8 blocks is copied 16 bytes at a time");
                extern __shared__ __align__(16) uint8_t mq_ring[];
                __shared__ const uint8_t *row_at[16];
                if (threadIdx.x < 16) {
                    // MMA row r: lane 4r's row A below 8, lane 4(r − 8)'s row B from 8.
                    const int r = threadIdx.x;
                    row_at[r] = (r < 8 ? mq_row(a, out_a - grp + r, 0, nblk, P::BYTES) : mq_row(a, out_b - grp + r - 8, 1, nblk, P::BYTES)).w;
                }
                __syncthreads();
                const int nit = nblk / 8;
                const auto fetch = [&](int i) {
                    if (i < nit) {
                        uint8_t *stage = mq_ring + (i % MQ6_STAGES) * 16 * RUN;
                        for (int c = threadIdx.x; c < 16 * (RUN / 16); c += MQ_WARPS * 32) {
                            const int r = c / (RUN / 16), part = c - r * (RUN / 16);
                            if (row_at[r] != nullptr) cp_async16(stage + r * RUN + 16 * part, row_at[r] + (int64_t)i * RUN + 16 * part);
                        }
                    }
                    cp_async_commit();
                };
                ring_pipeline<MQ6_STAGES>(nit, fetch, [] { __syncthreads(); }, [&](int i) {
                    typename P::Block blk;
                    blk.load_staged(mq_ring + (i % MQ6_STAGES) * 16 * RUN + warp * P::BYTES, RUN, ra.w != nullptr, rb.w != nullptr, grp, t);
                    P::template tile<NB>(blk, a, warp + MQ_WARPS * i, grp, t, acc);
                });
            }
        }
        if (!staged) {
            pdl_wait();
            for (int bi = warp; bi < nblk; bi += MQ_WARPS) {
                typename P::Block blk;
                blk.load(ra.w, rb.w, bi, t);
                P::template tile<NB>(blk, a, bi, grp, t, acc);
            }
        }
    }
    // LoRA: scale_b * B_b[row, :] · u[b, seg*rmax ..] for each of the four outputs (batch row
    // b's own adapter), the rank split over the warps (entries j ≡ warp mod MQ_WARPS) so it joins
    // the reduction below.
    auto lora = [&](const MqRow &row, int b) {
        if (row.w == nullptr || b >= NB) return 0.f;
        const MvLora l = mv_lora(a, b, row.seg);
        if (l.b == nullptr) return 0.f;
        const float *brow = l.b + (int64_t)row.lrow * l.r;
        const float *u = a.lora_u + (int64_t)b * a.ldu + row.seg * a.rmax;
        float v = 0.f;
        for (int j = warp; j < l.r; j += MQ_WARPS) v = __fmaf_rn(brow[j], u[j], v);
        return __fmul_rn(v, l.scale);
    };
    acc[0] = __fadd_rn(acc[0], lora(ra, b0));
    acc[1] = __fadd_rn(acc[1], lora(ra, b1));
    acc[2] = __fadd_rn(acc[2], lora(rb, b0));
    acc[3] = __fadd_rn(acc[3], lora(rb, b1));
    __shared__ float red[MQ_WARPS][32][4];
#pragma unroll
    for (int i = 0; i < 4; i++) red[warp][lane][i] = acc[i];
    __syncthreads();
    if (warp != 0) return;
#pragma unroll
    for (int i = 0; i < 4; i++) {
        float v = 0.f;
#pragma unroll
        for (int w = 0; w < MQ_WARPS; w++) v = __fadd_rn(v, red[w][lane][i]);
        acc[i] = v;
    }
    auto store = [&](int row, int b, float v) {
        if (b < NB && row < a.n) mq_store(a, row, b, v);
    };
    if (a.glu) {
        if (ra.w == nullptr) return;
        store(out_a, b0, mq_silu_mul(acc[0], acc[2]));
        store(out_a, b1, mq_silu_mul(acc[1], acc[3]));
    } else {
        store(out_a, b0, acc[0]);
        store(out_a, b1, acc[1]);
        store(out_b, b0, acc[2]);
        store(out_b, b1, acc[3]);
    }
}

// At 8 rows ptxas fits the kernel in 80 registers without spilling, 3 blocks an SM (24 warps
// streaming weights instead of 16); fewer rows spill at that bound and keep 2.
#define MVQ_NB(QN, P, NB) \
    extern "C" __global__ void __launch_bounds__(MQ_WARPS * 32, NB == 8 ? 3 : 2) mvq_##QN##_b##NB(const MvArgs a) { mvq_body<P, NB>(a); }
#define MVQ(QN, P) MVQ_NB(QN, P, 1) MVQ_NB(QN, P, 2) MVQ_NB(QN, P, 3) MVQ_NB(QN, P, 4) \
                   MVQ_NB(QN, P, 5) MVQ_NB(QN, P, 6) MVQ_NB(QN, P, 7) MVQ_NB(QN, P, 8)
MVQ(q4k, MqQ4K)
MVQ(q6k, MqQ6K)

// ---- the same Q4_K matvec on dp4a for 1-2 rows, in the tensor-core kernel's float order ---------
//
// At one or two rows the MMA tile wastes most of its work: the generic dp4a kernel mv_body decodes
// a Q4_K_M file 17% faster there, but sums in its own order. A row's output must be the same bits
// as in a batch of 3-8 (which takes the tensor-core kernel above), so this kernel computes exactly
// the tensor-core kernel's float operations in the same order; only the integer dot products
// (exact in any order) are done another way (`RowKernels::ExactDp4a` selects it):
//   - eight partial sums per output, partial w taking blocks bi ≡ w (mod 8) in increasing order
//     (the tensor-core kernel's warp w), each adding its block's two halves with q4k_half;
//   - partial w then adds its share of the LoRA term (rank entries j ≡ w mod 8, scaled);
//   - the eight partials are summed from partial 0 up, then the shared epilogue.
// Layout: a warp owns MV_SLOTS = 2 weight rows (GLU: the gate and up rows of one output), as in
// mv_body (same grid), and walks their whole length, 8 blocks an iteration. Lane = 8q + 2g + h covers block
// 8·it + 4u + q (u = 0, 1) and, in it, the 16 quant bytes 32g + 16h..: weights 64g + 16h.. (low
// nibbles, sub-block 2g) and 64g + 32 + 16h.. (high, sub-block 2g + 1). The four lanes of a half
// (g / 2) add their integer sums; the 8 lanes of group q take the two halves' terms and each runs
// its block's chain into partial w = q + 4u.
#define MVD_STAGES 4  // iterations of weights a warp has in flight
#define MVD_RUN (8 * Q4K::BYTES)  // one row's bytes for one iteration
template <int NB>
__device__ void mvd_q4k_body(const MvArgs &a) {
    // Each warp's weights go through its own ring of MVD_STAGES iterations in shared memory,
    // filled by asynchronous copies (no registers held while they are in flight).
    __shared__ __align__(16) uint8_t ring_all[MV_WARPS][MVD_STAGES][MV_SLOTS][MVD_RUN];
    pdl_launch_dependents();
    const int lane = threadIdx.x & 31, q = lane >> 3, g = (lane >> 1) & 3, h = lane & 1;
    const int base = lane & ~7;
    const int nblk = a.k / Q4K::ELEMS, nit = (nblk + 7) / 8;
    const int outs = a.glu ? 1 : MV_SLOTS;
    const int first = (blockIdx.x * MV_WARPS + (threadIdx.x >> 5)) * outs;
    if (first >= a.n) return;
    MqRow rows[MV_SLOTS];
#pragma unroll
    for (int s = 0; s < MV_SLOTS; s++) rows[s] = mq_row(a, a.glu ? first : first + s, s, nblk, Q4K::BYTES);
    uint8_t(*ring)[MV_SLOTS][MVD_RUN] = ring_all[threadIdx.x >> 5];
    auto fetch = [&](int it) { fetch_iteration<Q4K::BYTES>(ring[it % MVD_STAGES], rows, it, nit, nblk, true, lane); };
    // The weights depend on no earlier kernel: they start coming while the kernel before
    // finishes, and the activations are read after the wait.
#pragma unroll
    for (int it = 0; it < MVD_STAGES - 1; it++) fetch(it);
    pdl_wait();
    // Partial w = q + 4u of row s, batch row b.
    float acc[MV_SLOTS][NB][2];
    // LoRA entries j = w and w + 8 of each partial, requested before the weights (ranks up to 16
    // need nothing after the loop).
    float lb[MV_SLOTS][NB][2][2], lu[MV_SLOTS][NB][2][2];
#pragma unroll
    for (int s = 0; s < MV_SLOTS; s++)
#pragma unroll
        for (int b = 0; b < NB; b++)
#pragma unroll
            for (int u = 0; u < 2; u++) {
                acc[s][b][u] = 0.f;
#pragma unroll
                for (int e = 0; e < 2; e++) {
                    lb[s][b][u][e] = lu[s][b][u][e] = 0.f;
                    if (rows[s].w == nullptr) continue;
                    const MvLora l = mv_lora(a, b, rows[s].seg);
                    const int j = q + 4 * u + 8 * e;
                    if (l.b != nullptr && j < l.r) {
                        lb[s][b][u][e] = l.b[(int64_t)rows[s].lrow * l.r + j];
                        lu[s][b][u][e] = a.lora_u[(int64_t)b * a.ldu + rows[s].seg * a.rmax + j];
                    }
                }
            }
    // Lane o*NB + b writes output first+o of batch row b.
    const int oo = lane / NB, ob = lane % NB;
    const bool writes = lane < outs * NB && first + oo < a.n;
    const float res = writes && a.residual != nullptr ? a.residual[(int64_t)ob * a.ldy + first + oo] : 0.f;

    for (int it = 0; it < nit; it++) {
        // This iteration's copies are done (later ones may still fly), and every lane has
        // finished reading the slot the next fetch overwrites.
        cp_async_wait<MVD_STAGES - 2>();
        __syncwarp();
        fetch(it + MVD_STAGES - 1);
        const uint8_t(*cur)[MVD_RUN] = ring[it % MVD_STAGES];
#pragma unroll
        for (int u = 0; u < 2; u++) {
            const int bi = 8 * it + 4 * u + q;
            const bool in = bi < nblk;
            uint4 hd[MV_SLOTS], qv[MV_SLOTS], xlo[NB], xhi[NB];
            float xd[NB][2];  // the scales of the block's two activation groups
#pragma unroll
            for (int s = 0; s < MV_SLOTS; s++) {
                hd[s] = qv[s] = make_uint4(0, 0, 0, 0);
                if (in && rows[s].w != nullptr) {
                    const uint8_t *p = cur[s] + (4 * u + q) * Q4K::BYTES;
                    hd[s] = *reinterpret_cast<const uint4 *>(p);
                    qv[s] = *reinterpret_cast<const uint4 *>(p + 16 + 32 * g + 16 * h);
                }
            }
#pragma unroll
            for (int b = 0; b < NB; b++) {
                xlo[b] = xhi[b] = make_uint4(0, 0, 0, 0);
                xd[b][0] = xd[b][1] = 0.f;
                if (in) {
                    const int8_t *x = a.xq + (int64_t)b * a.k + bi * 256 + 64 * g + 16 * h;
                    xlo[b] = *reinterpret_cast<const uint4 *>(x);
                    xhi[b] = *reinterpret_cast<const uint4 *>(x + 32);
                    const float *d = a.xd + (int64_t)b * (a.k / 32) + bi * 8;
                    xd[b][0] = d[0];
                    xd[b][1] = d[4];
                }
            }
            // Activation sums of sub-blocks 2g (lo) and 2g + 1 (hi), per batch row.
            int slo[NB], shi[NB];
#pragma unroll
            for (int b = 0; b < NB; b++) {
                slo[b] = dp4a_sum(xlo[b]);
                shi[b] = dp4a_sum(xhi[b]);
                slo[b] += __shfl_xor_sync(0xffffffffu, slo[b], 1);
                shi[b] += __shfl_xor_sync(0xffffffffu, shi[b], 1);
            }
#pragma unroll
            for (int s = 0; s < MV_SLOTS; s++) {
                const uint4 hv = hd[s], w = qv[s];
                // Sub-blocks 2g and 2g + 1 are bytes 2(g & 1) and 2(g & 1) + 1 of half g / 2's words.
                uint32_t sc_w, m_w;
                q4k_scale_words(hv.y, hv.z, hv.w, g >= 2, sc_w, m_w);
                const int i = 2 * (g & 1);
                const int sc_lo = byte_of(sc_w, i), sc_hi = byte_of(sc_w, i + 1), m_lo = byte_of(m_w, i), m_hi = byte_of(m_w, i + 1);
                const float2 dm = __half22float2(*reinterpret_cast<const __half2 *>(&hv.x));
                const uint32_t wl[4] = {w.x & 0x0F0F0F0Fu, w.y & 0x0F0F0F0Fu, w.z & 0x0F0F0F0Fu, w.w & 0x0F0F0F0Fu};
                const uint32_t wh[4] = {(w.x >> 4) & 0x0F0F0F0Fu, (w.y >> 4) & 0x0F0F0F0Fu, (w.z >> 4) & 0x0F0F0F0Fu, (w.w >> 4) & 0x0F0F0F0Fu};
#pragma unroll
                for (int b = 0; b < NB; b++) {
                    // This lane's share of its half's integer sums: the dot products over its
                    // 16 bytes (the pairs h = 0, 1 and g, g ^ 1 add theirs), the mins over the
                    // pair sums above (only g, g ^ 1 add).
                    int isc = sc_lo * dp4a_dot(wl, xlo[b]) + sc_hi * dp4a_dot(wh, xhi[b]);
                    int imn = m_lo * slo[b] + m_hi * shi[b];
                    isc += __shfl_xor_sync(0xffffffffu, isc, 1);
                    isc += __shfl_xor_sync(0xffffffffu, isc, 2);
                    imn += __shfl_xor_sync(0xffffffffu, imn, 2);
                    // Half 0's term from the group's lane g = 0, half 1's from g = 2.
                    const float term = q4k_term(dm.x, dm.y, isc, imn);
                    const float t0 = __shfl_sync(0xffffffffu, term, base), t1 = __shfl_sync(0xffffffffu, term, base + 4);
                    const float c = __fmaf_rn(xd[b][1], t1, __fmaf_rn(xd[b][0], t0, acc[s][b][u]));
                    if (in) acc[s][b][u] = c;
                }
            }
        }
    }
    float out = 0.f, gate = 0.f;
#pragma unroll
    for (int s = 0; s < MV_SLOTS; s++)
#pragma unroll
        for (int b = 0; b < NB; b++) {
#pragma unroll
            for (int u = 0; u < 2; u++) {
                float v = 0.f;
                if (rows[s].w != nullptr) {
                    const MvLora l = mv_lora(a, b, rows[s].seg);
                    if (l.b != nullptr) {
                        v = __fmaf_rn(lb[s][b][u][1], lu[s][b][u][1], __fmaf_rn(lb[s][b][u][0], lu[s][b][u][0], 0.f));
                        const float *brow = l.b + (int64_t)rows[s].lrow * l.r;
                        const float *uv = a.lora_u + (int64_t)b * a.ldu + rows[s].seg * a.rmax;
                        for (int j = q + 4 * u + 16; j < l.r; j += 8) v = __fmaf_rn(brow[j], uv[j], v);
                        v = __fmul_rn(v, l.scale);
                    }
                }
                acc[s][b][u] = __fadd_rn(acc[s][b][u], v);
            }
            float v = 0.f;
#pragma unroll
            for (int w = 0; w < 8; w++) v = __fadd_rn(v, __shfl_sync(0xffffffffu, acc[s][b][w >> 2], 8 * (w & 3)));
            if (b == ob && (a.glu ? 0 : s) == oo) {
                if (a.glu && s == 0) gate = v;
                else out = v;
            }
        }
    if (!writes) return;
    if (a.glu) out = mq_silu_mul(gate, out);
    a.y[(int64_t)ob * a.ldy + first + oo] = a.residual != nullptr ? __fadd_rn(out, res) : out;
}

#define MVD_NB(NB) \
    extern "C" __global__ void __launch_bounds__(MV_WARPS * 32, NB == 1 ? 5 : 4) mvd_q4k_b##NB(const MvArgs a) { mvd_q4k_body<NB>(a); }
MVD_NB(1) MVD_NB(2)

// ---- the Q6_K matvec on dp4a for 1-2 rows, in the tensor-core kernel's float order ------------
//
// The same contract as mvd_q4k (the tensor-core kernel's float operations in its order: eight
// partial sums per output by block index mod 8, each block's halves h = 0, 1 as
// acc = fma(xd_h, term_h, acc), then the partial's LoRA share, then the partials summed from 0
// up), laid out so that no lane shares a dot product: Q6_K's 210-byte blocks are only 2-byte
// aligned, and splitting a 32-weight run over lanes cost shuffles and 16-bit shared-memory reads
// per few weights. A warp owns MV_SLOTS = 2 weight rows (mv_body's grid) and walks them 8 blocks
// an iteration through its ring (asynchronous copies, as mvd_q4k; rows must start 4-byte aligned:
// an even number of blocks a row, which the caller checks). Lane = 16s + 2w + h takes row s,
// block 8·it + w (partial w) and half h of it: 128 weights, the half's whole term in the lane.
// The h = 1 lane hands its term to the h = 0 lane, which runs the block's chain.
#define MVD6_STAGES 3  // iterations of weights a warp has in flight: 40 KB of ring a block

// N words from a 2-byte aligned shared-memory address: N + 1 aligned reads and a funnel shift.
// The word after the run is read too, so it must lie in the buffer.
template <int N>
__device__ __forceinline__ void lds_words(const uint8_t *p, uint32_t (&w)[N]) {
    const int odd = (int)(reinterpret_cast<uintptr_t>(p) & 2);
    const uint32_t *base = reinterpret_cast<const uint32_t *>(p - odd);
    uint32_t prev = base[0];
#pragma unroll
    for (int i = 0; i < N; i++) {
        const uint32_t next = base[i + 1];
        w[i] = __funnelshift_r(prev, next, 8 * odd);
        prev = next;
    }
}

template <int NB>
__device__ void mvd_q6k_body(const MvArgs &a) {
    constexpr int RUN = 8 * Q6K::BYTES;  // one row's bytes for one iteration
    __shared__ __align__(16) uint8_t ring_all[MV_WARPS][MVD6_STAGES][MV_SLOTS][RUN];
    pdl_launch_dependents();
    const int lane = threadIdx.x & 31, s = lane >> 4, w = (lane >> 1) & 7, h = lane & 1;
    const int nblk = a.k / Q6K::ELEMS, nit = (nblk + 7) / 8;
    const int outs = a.glu ? 1 : MV_SLOTS;
    const int first = (blockIdx.x * MV_WARPS + (threadIdx.x >> 5)) * outs;
    if (first >= a.n) return;
    MqRow rows[MV_SLOTS];
    bool wide = true;  // 16-byte copies where every row is 16-byte aligned
#pragma unroll
    for (int r = 0; r < MV_SLOTS; r++) {
        rows[r] = mq_row(a, a.glu ? first : first + r, r, nblk, Q6K::BYTES);
        wide &= (reinterpret_cast<uintptr_t>(rows[r].w) & 15) == 0;
    }
    uint8_t(*ring)[MV_SLOTS][RUN] = ring_all[threadIdx.x >> 5];
    auto fetch = [&](int it) { fetch_iteration<Q6K::BYTES>(ring[it % MVD6_STAGES], rows, it, nit, nblk, wide, lane); };
    // The weights depend on no earlier kernel: they start coming while the kernel before
    // finishes, and the activations are read after the wait.
#pragma unroll
    for (int it = 0; it < MVD6_STAGES - 1; it++) fetch(it);
    pdl_wait();
    const MqRow row = s == 0 ? rows[0] : rows[1];
    // The lane's LoRA entries j = w and w + 8 for each batch row (h = 0 lanes; ranks up to 16
    // need nothing after the loop).
    float lb[NB][2], lu[NB][2];
#pragma unroll
    for (int b = 0; b < NB; b++) {
        const MvLora l = row.w != nullptr ? mv_lora(a, b, row.seg) : MvLora{nullptr, 0, 0.f};
#pragma unroll
        for (int e = 0; e < 2; e++) {
            const int j = w + 8 * e;
            const bool here = h == 0 && l.b != nullptr && j < l.r;
            lb[b][e] = here ? l.b[(int64_t)row.lrow * l.r + j] : 0.f;
            lu[b][e] = here ? a.lora_u[(int64_t)b * a.ldu + row.seg * a.rmax + j] : 0.f;
        }
    }
    // Lane 16s writes output first + s (GLU: lane 0 writes silu(gate) · up); its residuals now.
    const bool writes = h == 0 && w == 0 && (a.glu ? s == 0 : first + s < a.n);
    float res[NB];
#pragma unroll
    for (int b = 0; b < NB; b++) res[b] = writes && a.residual != nullptr ? a.residual[(int64_t)b * a.ldy + first + s] : 0.f;

    float acc[NB];
#pragma unroll
    for (int b = 0; b < NB; b++) acc[b] = 0.f;
    for (int it = 0; it < nit; it++) {
        // This iteration's copies are done (later ones may still fly), and every lane has
        // finished reading the slot the next fetch overwrites.
        cp_async_wait<MVD6_STAGES - 2>();
        __syncwarp();
        fetch(it + MVD6_STAGES - 1);
        const int bi = 8 * it + w;
        const bool in = bi < nblk && row.w != nullptr;
        // Half h of the block: ql bytes 64h.. (runs 4h, 4h + 1 in the low nibbles, 4h + 2, 4h + 3
        // in the high), qh bytes 128 + 32h.. (2 bits a run), scales 192 + 8h.. (2 a run), d.
        // A lane past the end decodes stale ring bytes; its terms are never used.
        const uint8_t *blk = ring[it % MVD6_STAGES][s] + w * Q6K::BYTES;
        uint32_t ql[2][8], qh[8], sc[2];
        lds_words(blk + 64 * h, ql[0]);
        lds_words(blk + 64 * h + 32, ql[1]);
        lds_words(blk + 128 + 32 * h, qh);
        lds_words(blk + 192 + 8 * h, sc);
        const float d = ld_half(blk + 208);
        // The half's integer sum Σ sc·dot over its 8 groups of 16, per batch row.
        int isc[NB];
#pragma unroll
        for (int b = 0; b < NB; b++) isc[b] = 0;
#pragma unroll
        for (int r = 0; r < 4; r++) {
            // Groups 2r, 2r + 1 of half h: weights 128h + 32r + 16u.. (u = 0, 1).
            uint32_t q[2][4];
#pragma unroll
            for (int i = 0; i < 8; i++) q[i >> 2][i & 3] = ((ql[r & 1][i] >> (4 * (r >> 1))) & 0x0F0F0F0Fu) | (((qh[i] >> (2 * r)) & 0x03030303u) << 4);
            int scale[2];
#pragma unroll
            for (int u = 0; u < 2; u++) scale[u] = (int)(int8_t)((sc[r >> 1] >> (8 * (2 * (r & 1) + u))) & 0xFF);
#pragma unroll
            for (int b = 0; b < NB; b++) {
                const uint4 *x = reinterpret_cast<const uint4 *>(a.xq + (int64_t)b * a.k + (int64_t)min(bi, nblk - 1) * 256 + 128 * h + 32 * r);
                const uint4 x0 = x[0], x1 = x[1];
                // Quants are stored + 32: dot(q − 32, x) = dot(q, x) − 32·Σx.
                isc[b] += scale[0] * (dp4a_dot(q[0], x0) - 32 * dp4a_sum(x0)) + scale[1] * (dp4a_dot(q[1], x1) - 32 * dp4a_sum(x1));
            }
        }
#pragma unroll
        for (int b = 0; b < NB; b++) {
            const float term = q6k_term(d, isc[b]), other = __shfl_xor_sync(0xffffffffu, term, 1);
            const float *xd = a.xd + (int64_t)b * (a.k / 32) + (int64_t)min(bi, nblk - 1) * 8;
            const float x0 = xd[0], x1 = xd[4];
            if (in && h == 0) acc[b] = __fmaf_rn(x1, other, __fmaf_rn(x0, term, acc[b]));
        }
    }
    // Partial w's LoRA share (rank entries j ≡ w mod 8), then the partials summed from 0 up.
    float out[NB];
#pragma unroll
    for (int b = 0; b < NB; b++) {
        float v = 0.f;
        const MvLora l = row.w != nullptr ? mv_lora(a, b, row.seg) : MvLora{nullptr, 0, 0.f};
        if (h == 0 && l.b != nullptr) {
            v = __fmaf_rn(lb[b][1], lu[b][1], __fmaf_rn(lb[b][0], lu[b][0], 0.f));
            const float *brow = l.b + (int64_t)row.lrow * l.r;
            const float *uv = a.lora_u + (int64_t)b * a.ldu + row.seg * a.rmax;
            for (int j = w + 16; j < l.r; j += 8) v = __fmaf_rn(brow[j], uv[j], v);
            v = __fmul_rn(v, l.scale);
        }
        const float mine = __fadd_rn(acc[b], v);
        float total = 0.f;
#pragma unroll
        for (int p = 0; p < 8; p++) total = __fadd_rn(total, __shfl_sync(0xffffffffu, mine, 16 * s + 2 * p));
        out[b] = total;
    }
    // GLU: row 1 (up) is summed in lanes 16..; lane 0 takes it.
    float up[NB];
#pragma unroll
    for (int b = 0; b < NB; b++) up[b] = __shfl_sync(0xffffffffu, out[b], 16);
    if (!writes) return;
#pragma unroll
    for (int b = 0; b < NB; b++) {
        const float v = a.glu ? mq_silu_mul(out[b], up[b]) : out[b];
        a.y[(int64_t)b * a.ldy + first + s] = a.residual != nullptr ? __fadd_rn(v, res[b]) : v;
    }
}

#define MVD6_NB(NB) \
    extern "C" __global__ void __launch_bounds__(MV_WARPS * 32, 4) mvd_q6k_b##NB(const MvArgs a) { mvd_q6k_body<NB>(a); }
MVD6_NB(1) MVD6_NB(2)

// ---- prompt matmul on int8 tensor cores: Q4_K weights in place, many token rows -----------------
//
// y[t, n] = W[n, :] · x[t, :] for prompts, without dequantizing W. A block computes 128 weight
// rows (8 warps × 16, each warp one MMA row tile) × up to 64 tokens (8 MMA column tiles of 8,
// those past the last token skipped), over a range of k (the grid's z splits k for outputs too
// narrow to fill the card; the splits' partial sums are added by mmq_sum in a fixed order). The
// tokens' int8 activations of one Q4_K block of k (256 values), with their per-32 scales, are
// staged in shared memory once for the whole block (cp.async, two stages), so each activation
// byte is read from L2 once per 128 weight rows, and each weight byte once per 64 tokens. A warp
// holds its 16 rows' Q4_K block in registers (the tensor-core matvec's operand layout: one
// m16n8k32 MMA per sub-block of 32, k order permuted alike for weights and activations), the
// next block's loads in flight while it works on this one. The activations come quantized by
// quantize_q8_rows with each block's xd·Σq, so the min term costs one FMA:
//   acc += d·sc_j · (xd_j · dot) − dmin·m_j · (xd_j·Σq_j)
// For a given split of k, every (token, row) is summed in the same order whatever tile or call
// it falls in.
// A prompt matmul block's accumulators (mmq_q4k, mmf_*; MMA layout: tile tt, rows grp and
// grp + 8 of the warp's 16-row tile × tokens tok0 + 8tt + 2t, + 1, the first mt of them real)
// into y [m, n], or into split blockIdx.z's slice of [splits, m, n] partial sums; add [m, n] (or
// null) is summed in here only when k is not split (else by mmq_sum).
template <int TILES, int WARPS>
__device__ __forceinline__ void store_prompt_tile(const float (&acc)[TILES][4], int tok0, int mt, float *y, const float *add, int n, int m) {
    const int t = threadIdx.x & 3, row_a = (blockIdx.y * WARPS + (threadIdx.x >> 5)) * 16 + ((threadIdx.x & 31) >> 2);
    const bool plus = add != nullptr && gridDim.z == 1;
    y += (int64_t)blockIdx.z * m * n;
#pragma unroll
    for (int tt = 0; tt < TILES; tt++) {
        const int c0 = 8 * tt + 2 * t;
#pragma unroll
        for (int i = 0; i < 4; i++) {
            const int row = i < 2 ? row_a : row_a + 8, c = c0 + (i & 1);
            if (row < n && c < mt) {
                const int64_t at = (int64_t)(tok0 + c) * n + row;
                y[at] = plus ? acc[tt][i] + add[at] : acc[tt][i];
            }
        }
    }
}

// Where a prompt matmul block works (mmq_q4k, mmf_*): its tokens tok0.. (mt of them real), its
// k range [b0, b1) of blocks (the grid's z splits k) and this lane's two weight rows (MMA rows
// grp and grp + 8 of its warp's 16-row tile; null past the last row), found by row(r, nblk):
// the start of output row r < n's weights, nblk blocks long.
template <int TOKENS, int WARPS>
struct PromptTile {
    int tok0, mt, b0, b1;
    const uint8_t *wa, *wb;
    template <typename Row>
    __device__ __forceinline__ PromptTile(Row row, int k, int n, int m) {
        const int nblk = k / 256, row_a = (blockIdx.y * WARPS + (threadIdx.x >> 5)) * 16 + ((threadIdx.x & 31) >> 2), row_b = row_a + 8;
        tok0 = blockIdx.x * TOKENS;
        mt = min(TOKENS, m - tok0);
        const int per = (nblk + gridDim.z - 1) / gridDim.z;
        b0 = blockIdx.z * per;
        b1 = min(nblk, b0 + per);
        wa = row_a < n ? row(row_a, nblk) : nullptr;
        wb = row_b < n ? row(row_b, nblk) : nullptr;
    }
};

#define MM_WARPS 8
#define MM_TOKENS 64
// Bytes between two tokens' staged activations: a half-warp's 8-byte B-operand reads (4 tokens
// × 4 lanes) then fall in 32 different banks.
#define MM_XS (256 + 32)
struct MmqArgs {
    const uint8_t *w;   // [n, k] Q4_K blocks
    const int8_t *xq;   // [m, k] activations as int8 blocks of 32
    const float2 *xds;  // [k/32, ldx] each block's (scale, scale × sum of its int8 values)
    float *y;           // [m, n], or [splits, m, n] partial sums when the grid splits k
    int k, n, m;
    int ldx;            // m rounded up to even: every row of xds starts 16-byte aligned
};

__device__ __forceinline__ void cp_async16_fill(void *smem, const void *gmem, int bytes) {
    const uint32_t s = (uint32_t)__cvta_generic_to_shared(smem);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(s), "l"(gmem), "r"(bytes) : "memory");
}

extern "C" __global__ void __launch_bounds__(MM_WARPS * 32, 2) mmq_q4k(const MmqArgs a) {
    __shared__ __align__(16) int8_t sq[2][MM_TOKENS * MM_XS];
    // Per stage, sub-block j's (scale, scaled sum) of token c at [j][c]: the accumulator's two
    // tokens 2t, 2t + 1 of a tile are one 16-byte read.
    __shared__ __align__(16) float2 sx[2][8 * MM_TOKENS];
    const int lane = threadIdx.x & 31;
    const int grp = lane >> 2, t = lane & 3;
    const PromptTile<MM_TOKENS, MM_WARPS> tile([&](int r, int nblk) { return a.w + (int64_t)r * nblk * Q4K::BYTES; }, a.k, a.n, a.m);
    const int tok0 = tile.tok0, mt = tile.mt, b0 = tile.b0, b1 = tile.b1;
    const uint8_t *wa = tile.wa, *wb = tile.wb;
    // Stage s gets block bi of the tile's tokens (zeros past the last one): 16 copies of 16
    // bytes a token for the values, 4 tokens a copy for each sub-block's scales.
    const auto stage = [&](int bi, int s) {
        for (int c = threadIdx.x; c < MM_TOKENS * 16 + 8 * MM_TOKENS / 2; c += blockDim.x) {
            if (c < MM_TOKENS * 16) {
                const int tok = c >> 4, part = c & 15;
                const bool in = tok < mt;
                cp_async16_fill(&sq[s][tok * MM_XS + 16 * part], a.xq + (int64_t)(tok0 + (in ? tok : 0)) * a.k + bi * 256 + 16 * part, in ? 16 : 0);
            } else {
                const int e = c - MM_TOKENS * 16, j = e / (MM_TOKENS / 2), tok = 2 * (e % (MM_TOKENS / 2));
                const int bytes = tok < mt ? min(2, mt - tok) * 8 : 0;
                cp_async16_fill(&sx[s][j * MM_TOKENS + tok], a.xds + (int64_t)(bi * 8 + j) * a.ldx + tok0 + (bytes ? tok : 0), bytes);
            }
        }
        cp_async_commit();
    };
    float acc[MM_TOKENS / 8][4];
#pragma unroll
    for (int tt = 0; tt < MM_TOKENS / 8; tt++)
#pragma unroll
        for (int i = 0; i < 4; i++) acc[tt][i] = 0.f;
    MqBlock blk, next;
    if (b0 < b1) {
        blk.load(wa, wb, b0, t);
        stage(b0, 0);
    }
    for (int bi = b0; bi < b1; bi++) {
        const int s = (bi - b0) & 1;
        // The next block's activations and weights start on their way before this one is used.
        if (bi + 1 < b1) {
            stage(bi + 1, s ^ 1);
            next.load(wa, wb, bi + 1, t);
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();
        uint32_t sa[2], ma_w[2], sb[2], mb_w[2];
        q4k_scale_words(blk.ha.y, blk.ha.z, blk.ha.w, false, sa[0], ma_w[0]);
        q4k_scale_words(blk.ha.y, blk.ha.z, blk.ha.w, true, sa[1], ma_w[1]);
        q4k_scale_words(blk.hb.y, blk.hb.z, blk.hb.w, false, sb[0], mb_w[0]);
        q4k_scale_words(blk.hb.y, blk.hb.z, blk.hb.w, true, sb[1], mb_w[1]);
        const float2 dma = blk.dm_a(), dmb = blk.dm_b();
        const int8_t *xq = sq[s];
        const float2 *xs = sx[s];
#pragma unroll
        for (int j = 0; j < 8; j++) {
            uint32_t am[4];
            blk.frag(j, am);
            const int h = j >> 2, by = 8 * (j & 3);
            const float da = dma.x * small_uint((sa[h] >> by) & 0xFF), ma = dma.y * small_uint((ma_w[h] >> by) & 0xFF);
            const float db = dmb.x * small_uint((sb[h] >> by) & 0xFF), mb = dmb.y * small_uint((mb_w[h] >> by) & 0xFF);
#pragma unroll
            for (int tt = 0; tt < MM_TOKENS / 8; tt++) {
                if (8 * tt >= mt) break;  // the same for the whole block
                // B operand: token 8tt + grp, the 8 bytes at 32j + 8t; accumulator columns are
                // tokens 8tt + 2t and + 1, whose (xd, xd·Σq) come in one read.
                const uint2 xv = *reinterpret_cast<const uint2 *>(xq + (8 * tt + grp) * MM_XS + 32 * j + 8 * t);
                const float4 sc = *reinterpret_cast<const float4 *>(&xs[j * MM_TOKENS + 8 * tt + 2 * t]);
                const uint32_t bm[2] = {xv.x, xv.y};
                int d[4] = {0, 0, 0, 0};
                mma_s8(d, am, bm);
                // |d| <= 32*15*127: exact through small_int.
                acc[tt][0] = fmaf(da, sc.x * small_int(d[0]), fmaf(-ma, sc.y, acc[tt][0]));
                acc[tt][1] = fmaf(da, sc.z * small_int(d[1]), fmaf(-ma, sc.w, acc[tt][1]));
                acc[tt][2] = fmaf(db, sc.x * small_int(d[2]), fmaf(-mb, sc.y, acc[tt][2]));
                acc[tt][3] = fmaf(db, sc.z * small_int(d[3]), fmaf(-mb, sc.w, acc[tt][3]));
            }
        }
        blk = next;
        __syncthreads();  // stage s is refilled by the next iteration's copies
    }
    store_prompt_tile<MM_TOKENS / 8, MM_WARPS>(acc, tok0, mt, a.y, nullptr, a.n, a.m);
}

// y[i] = Σ_s part[s][i] (+ add[i] when given) over the splits of a prompt matmul's k, from
// split 0 up.
extern "C" __global__ void mmq_sum(const float *part, const float *add, float *y, int64_t count, int splits) {
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < count; i += (int64_t)gridDim.x * blockDim.x) {
        float v = part[i];
        for (int s = 1; s < splits; s++) v += part[s * count + i];
        y[i] = add != nullptr ? v + add[i] : v;
    }
}

// ---- prompt matmul on f16 tensor cores: K-quant weights dequantized in registers -------------
//
// y[t, n] = W[n, :] · x[t, :] (+ add[t, n]) for prompts of up to a few hundred tokens (W: up to
// three weights of one type read as one, e.g. gate|up), where dequantizing every weight to
// memory first costs more than the product. A block computes 128 weight rows (8 warps × 16) ×
// up to 64 tokens (8 MMA column tiles of 8, those past the last token skipped) over a range of
// k (the grid's z splits k where the output is too narrow to fill the card; mmq_sum adds the
// splits in a fixed order). The tokens' f16 activations are staged in
// shared memory 128 of k at a time (cp.async, two buffers) for all the block's rows; each warp
// turns its 16 rows' weights into f16 MMA operands in registers, once for all the block's
// tokens: values become f16 as 1024 + q (a byte permute, exact), the offset is subtracted
// exactly, and one half2 FMA or multiply applies the group's scale (one rounding). An m16n8k16
// MMA then takes 16 rows × 8 tokens × 16 of k, accumulating in f32, with no per-product
// scaling. Both operands order k alike inside an MMA: lane t's positions 2t, 2t + 1, 2t + 8,
// 2t + 9 (t = lane % 4) hold 4 contiguous weights (Q6_K: 4t.. of a 16-weight group; Q4_K:
// 8t + 4h.. of a 32-weight sub-block for its MMA h), so a lane decodes contiguous weights of a
// row and reads contiguous activations of a token.
#define MF_WARPS 8
#define MF_TOKENS 64
#define MF_KSTEP 128  // k of one stage: half a K-quant block
struct MmfArgs {
    // Up to three weights of one type and k, stacked: output rows [0, seg_end[0]) are w[0]'s,
    // [seg_end[0], seg_end[1]) w[1]'s, then w[2]'s; n = the last segment's end.
    const uint8_t *w[3];  // [rows, k] Q4_K or Q6_K blocks each
    int seg_end[3];
    const __half *x;      // [m, k]
    const float *add;     // [m, n] or null; used only when the grid does not split k
    float *y;             // [m, n], or [splits, m, n] partial sums when the grid splits k
    int k, n, m;
};

__device__ __forceinline__ void mma_f16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Bytes 0, 1 (sel 0x5140) or 2, 3 (sel 0x7362) of v, each below 1024, as the f16 pair of
// (byte − off), exactly.
__device__ __forceinline__ __half2 f16_pair(uint32_t v, uint32_t sel, __half2 off) {
    const uint32_t biased = __byte_perm(v, 0x64646464u, sel);  // 1024 + byte
    return __hsub2(*reinterpret_cast<const __half2 *>(&biased), off);
}
__device__ __forceinline__ uint32_t h2_bits(__half2 h) { return *reinterpret_cast<const uint32_t *>(&h); }

// Q4_K: a block's 8 sub-blocks of 32 share a d·sc and dmin·m; each is two MMAs. A lane holds
// the block as the tensor-core matvec does (MqBlock: 8 quant bytes of each 32-byte group of
// its two rows), i.e. weights 8t..8t + 7 of every sub-block, and reads 16 bytes of a token's
// activations for both MMAs of a sub-block.
struct MfQ4K {
    static constexpr int BYTES = Q4K::BYTES;
    // Bytes between two tokens' staged activations: a quarter-warp's 16-byte reads (2 tokens ×
    // 4 lanes) fall in 32 different banks.
    static constexpr int XS = MF_KSTEP * 2 + 64;
    using Block = MqBlock;
    struct Scales { uint32_t sa[2], ma[2], sb[2], mb[2]; float2 dma, dmb; };
    static __device__ __forceinline__ Scales scales(const Block &b) {
        Scales s;
        q4k_scale_words(b.ha.y, b.ha.z, b.ha.w, false, s.sa[0], s.ma[0]);
        q4k_scale_words(b.ha.y, b.ha.z, b.ha.w, true, s.sa[1], s.ma[1]);
        q4k_scale_words(b.hb.y, b.hb.z, b.hb.w, false, s.sb[0], s.mb[0]);
        q4k_scale_words(b.hb.y, b.hb.z, b.hb.w, true, s.sb[1], s.mb[1]);
        s.dma = b.dm_a();
        s.dmb = b.dm_b();
        return s;
    }
    // Half hs of the block (sub-blocks 4hs..4hs + 3) against the staged activations xs.
    template <int HS>
    static __device__ __forceinline__ void step(const Block &b, const Scales &s, const uint8_t *xs, int grp, int t, int mt, float (&acc)[MF_TOKENS / 8][4]) {
        const __half2 off = __half2half2(__ushort_as_half(0x6400));  // 1024
#pragma unroll
        for (int jj = 0; jj < 4; jj++) {
            const int j = 4 * HS + jj, g = j >> 1, sh = 4 * (j & 1), h = j >> 2, by = 8 * (j & 3);
            const __half2 s_a = __float2half2_rn(s.dma.x * small_uint((s.sa[h] >> by) & 0xFF));
            const __half2 m_a = __float2half2_rn(-s.dma.y * small_uint((s.ma[h] >> by) & 0xFF));
            const __half2 s_b = __float2half2_rn(s.dmb.x * small_uint((s.sb[h] >> by) & 0xFF));
            const __half2 m_b = __float2half2_rn(-s.dmb.y * small_uint((s.mb[h] >> by) & 0xFF));
            const uint32_t ax = (b.qa[g].x >> sh) & 0x0F0F0F0Fu, ay = (b.qa[g].y >> sh) & 0x0F0F0F0Fu;
            const uint32_t bx = (b.qb[g].x >> sh) & 0x0F0F0F0Fu, byv = (b.qb[g].y >> sh) & 0x0F0F0F0Fu;
            const auto w = [&](uint32_t v, uint32_t sel, __half2 sc, __half2 mn) { return h2_bits(__hfma2(f16_pair(v, sel, off), sc, mn)); };
            // MMA 0 takes weights 8t + 0..3 of the sub-block, MMA 1 8t + 4..7.
            const uint32_t a0[4] = {w(ax, 0x5140, s_a, m_a), w(bx, 0x5140, s_b, m_b), w(ax, 0x7362, s_a, m_a), w(bx, 0x7362, s_b, m_b)};
            const uint32_t a1[4] = {w(ay, 0x5140, s_a, m_a), w(byv, 0x5140, s_b, m_b), w(ay, 0x7362, s_a, m_a), w(byv, 0x7362, s_b, m_b)};
            // Four column tiles at a time (32 tokens; those past the last token multiply the
            // staged zeros and are never stored), MMA 0 of all four before MMA 1, so no MMA waits
            // on the one just before it for its accumulator.
#pragma unroll
            for (int q = 0; q < MF_TOKENS / 32; q++) {
                if (32 * q >= mt) break;  // the same for the whole block
                uint4 xv[4];
#pragma unroll
                for (int u = 0; u < 4; u++) xv[u] = *reinterpret_cast<const uint4 *>(xs + (32 * q + 8 * u + grp) * XS + 64 * jj + 16 * t);
#pragma unroll
                for (int u = 0; u < 4; u++) mma_f16(acc[4 * q + u], a0, xv[u].x, xv[u].y);
#pragma unroll
                for (int u = 0; u < 4; u++) mma_f16(acc[4 * q + u], a1, xv[u].z, xv[u].w);
            }
        }
    }
};

// Q6_K: 16 groups of 16 weights, each with its own int8 scale, one MMA each (the block as
// MqBlockQ6K holds it).
struct MfQ6K {
    static constexpr int BYTES = Q6K::BYTES;
    // A half-warp's 8-byte reads (4 tokens × 4 lanes) fall in 32 different banks.
    static constexpr int XS = MF_KSTEP * 2 + 32;
    using Block = MqBlockQ6K;
    struct Scales {};
    static __device__ __forceinline__ Scales scales(const Block &) { return {}; }
    // Weights 16g + 4t..+3 of half n of a row: bytes q − 32 scaled by the group's d·sc, as the
    // MMA's two A registers of that row (weights 0, 1 and 2, 3). n and g are constants once the
    // loops calling it are unrolled, so the arrays stay in registers.
    static __device__ __forceinline__ void group(const MqBlockQ6K::Row &r, int n, int g, uint32_t &lo, uint32_t &hi) {
        const uint32_t q = r.quants(n, g);
        const __half2 s = __float2half2_rn(r.d * (float)r.scale(n, g));
        const __half2 off = __half2half2(__ushort_as_half(0x6420));  // 1024 + 32
        lo = h2_bits(__hmul2(f16_pair(q, 0x5140, off), s));
        hi = h2_bits(__hmul2(f16_pair(q, 0x7362, off), s));
    }
    template <int HS>
    static __device__ __forceinline__ void step(const Block &b, const Scales &, const uint8_t *xs, int grp, int t, int mt, float (&acc)[MF_TOKENS / 8][4]) {
#pragma unroll
        for (int g = 0; g < 8; g++) {
            // MMA positions 2t, 2t + 1 are weights 4t, 4t + 1; 2t + 8, 2t + 9 are 4t + 2, 4t + 3.
            uint32_t am[4];
            group(b.a, HS, g, am[0], am[2]);
            group(b.b, HS, g, am[1], am[3]);
#pragma unroll
            for (int tt = 0; tt < MF_TOKENS / 8; tt++) {
                if (8 * tt >= mt) break;  // the same for the whole block
                const uint2 xv = *reinterpret_cast<const uint2 *>(xs + (8 * tt + grp) * XS + 32 * g + 8 * t);
                mma_f16(acc[tt], am, xv.x, xv.y);
            }
        }
    }
};

template <typename P>
__device__ __forceinline__ void mmf_body(const MmfArgs &a) {
    __shared__ __align__(16) uint8_t sx[2][MF_TOKENS * P::XS];
    const int lane = threadIdx.x & 31;
    const int grp = lane >> 2, t = lane & 3;
    const PromptTile<MF_TOKENS, MF_WARPS> tile(
        [&](int r, int nblk) {
            const int seg = r < a.seg_end[0] ? 0 : (r < a.seg_end[1] ? 1 : 2);
            const int first = seg == 0 ? 0 : (seg == 1 ? a.seg_end[0] : a.seg_end[1]);
            return (seg == 0 ? a.w[0] : (seg == 1 ? a.w[1] : a.w[2])) + (int64_t)(r - first) * nblk * P::BYTES;
        },
        a.k, a.n, a.m);
    const int tok0 = tile.tok0, mt = tile.mt, b0 = tile.b0, b1 = tile.b1;
    const uint8_t *wa = tile.wa, *wb = tile.wb;
    // Buffer buf gets k range [MF_KSTEP·step, +MF_KSTEP) of the tile's tokens (zeros past the
    // last one), 16 bytes a copy.
    const auto stage = [&](int step, int buf) {
        constexpr int PARTS = MF_KSTEP * 2 / 16;
        for (int c = threadIdx.x; c < MF_TOKENS * PARTS; c += blockDim.x) {
            const int tok = c / PARTS, part = c % PARTS;
            const bool in = tok < mt;
            cp_async16_fill(&sx[buf][tok * P::XS + 16 * part], a.x + (int64_t)(tok0 + (in ? tok : 0)) * a.k + step * MF_KSTEP + 8 * part, in ? 16 : 0);
        }
        cp_async_commit();
    };
    float acc[MF_TOKENS / 8][4];
#pragma unroll
    for (int tt = 0; tt < MF_TOKENS / 8; tt++)
#pragma unroll
        for (int i = 0; i < 4; i++) acc[tt][i] = 0.f;
    typename P::Block blk, next;
    if (b0 < b1) {
        blk.load(wa, wb, b0, t);
        stage(2 * b0, 0);
    }
    for (int bi = b0; bi < b1; bi++) {
        const typename P::Scales sc = P::scales(blk);
        // Each half block: the next stage (and, once a block, the next block's weights) start on
        // their way before this one is used. A block's two halves are buffers 0 and 1.
        const bool last = bi + 1 == b1;
        stage(2 * bi + 1, 1);
        if (!last) next.load(wa, wb, bi + 1, t);
        cp_async_wait<1>();
        __syncthreads();
        P::template step<0>(blk, sc, sx[0], grp, t, mt, acc);
        __syncthreads();  // buffer 0 is refilled next
        if (!last) {
            stage(2 * bi + 2, 0);
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();
        P::template step<1>(blk, sc, sx[1], grp, t, mt, acc);
        __syncthreads();  // buffer 1 is refilled next
        if (!last) blk = next;
    }
    store_prompt_tile<MF_TOKENS / 8, MF_WARPS>(acc, tok0, mt, a.y, a.add, a.n, a.m);
}

extern "C" __global__ void __launch_bounds__(MF_WARPS * 32, 2) mmf_q4k(const MmfArgs a) { mmf_body<MfQ4K>(a); }
extern "C" __global__ void __launch_bounds__(MF_WARPS * 32, 2) mmf_q6k(const MmfArgs a) { mmf_body<MfQ6K>(a); }

// x [m, k] f32 → int8 blocks of 32 for mmq_q4k: q = round(x / d) (halves away from zero) with
// d = max|x| / 127, and per block (d, d·Σq) at xds[block of the row][row] (rows ldx apart).
// One warp a block, one lane an element. A NaN or infinite value makes the block's scale NaN, so
// it reaches the output instead of vanishing.
extern "C" __global__ void quantize_q8_rows(const float *x, int8_t *xq, float2 *xds, int64_t blocks, int kb, int ldx) {
    const int lane = threadIdx.x & 31;
    const int64_t b = (int64_t)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (b >= blocks) return;
    const float v = x[b * 32 + lane];
    const float amax = warp_max(fabsf(v));
    const bool bad = __any_sync(0xffffffffu, !isfinite(v));
    const float d = bad ? __int_as_float(0x7fc00000) : amax / 127.f;
    const int q = d > 0.f ? (int)roundf(v / d) : 0;
    xq[b * 32 + lane] = (int8_t)q;
    int s = q;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
    if (lane == 0) xds[(b % kb) * ldx + b / kb] = make_float2(d, d * (float)s);
}
