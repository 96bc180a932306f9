// Keyed dropout: y = x * mask(key, i) / keep, with the mask a pure function of the key and the
// element index (no generator state), so a recomputed or resumed forward drops the same inputs.
// The same hash runs on the CPU in src/train/dropout.rs; `bench parity` checks both agree bit
// for bit.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include "common.cuh"

// Keep element i when the top 24 bits of its hash fall below `threshold` = keep · 2^24.
__device__ __forceinline__ bool kept(uint64_t i, uint32_t k0, uint32_t k1, uint32_t threshold) {
    uint32_t h = lowbias32((uint32_t)i ^ k0);
    h = lowbias32(h ^ k1 ^ ((uint32_t)(i >> 32) * 0x9e3779b9U));
    return (h >> 8) < threshold;
}

// One element: x[i] scaled where kept, else 0; with `add`, summed into add[i] (rounded once).
#define DROPOUT_ONE(T, LOAD, STORE, xv, i, addv) \
    STORE((addv) + (kept((i), k0, k1, threshold) ? LOAD(xv) * scale : 0.0f))

// Grid-stride over the elements; with `vec` (n a multiple of the vector width and every buffer
// 16-byte aligned), 16 bytes of each buffer a thread at a time (8 bf16/f16, 4 f32), element i
// still masked by its own index.
#define KEYED_DROPOUT_BODY(T, LOAD, STORE, ADD_LOAD)                                             \
    constexpr int V = 16 / sizeof(T);                                                            \
    const uint64_t stride = (uint64_t)blockDim.x * gridDim.x;                                    \
    const uint64_t tid = blockIdx.x * (uint64_t)blockDim.x + threadIdx.x;                        \
    uint64_t done = 0;                                                                           \
    if (vec) {                                                                                   \
        const uint64_t chunks = n / V;                                                           \
        for (uint64_t c = tid; c < chunks; c += stride) {                                        \
            const uint4 xr = reinterpret_cast<const uint4 *>(x)[c];                              \
            uint4 ar = make_uint4(0, 0, 0, 0);                                                   \
            if (add != nullptr) ar = reinterpret_cast<const uint4 *>(add)[c];                    \
            const T *xs = reinterpret_cast<const T *>(&xr);                                      \
            const T *as = reinterpret_cast<const T *>(&ar);                                      \
            uint4 yr;                                                                            \
            T *ys = reinterpret_cast<T *>(&yr);                                                  \
            _Pragma("unroll") for (int j = 0; j < V; ++j)                                        \
                ys[j] = DROPOUT_ONE(T, LOAD, STORE, xs[j], c * V + j, ADD_LOAD(as[j]));          \
            reinterpret_cast<uint4 *>(y)[c] = yr;                                                \
        }                                                                                        \
        done = chunks * V;                                                                       \
    }                                                                                            \
    for (uint64_t i = done + tid; i < n; i += stride)                                            \
        y[i] = DROPOUT_ONE(T, LOAD, STORE, x[i], i, ADD_LOAD(add[i]));

#define KEYED_DROPOUT(NAME, T, LOAD, STORE)                                                     \
    extern "C" __global__ void NAME(const uint64_t n, const uint32_t k0, const uint32_t k1,       \
                                    const uint32_t threshold, const float scale,                 \
                                    const T *__restrict__ x, T *__restrict__ y, const int vec) { \
        const T *add = nullptr;                                                                  \
        KEYED_DROPOUT_BODY(T, LOAD, STORE, ZERO)                                                 \
    }

// y = add + x * mask(key, i) / keep, rounded once: a dropped-out term summed into a running
// total (the LoRA input gradients of the training backward) without a separate add.
#define KEYED_DROPOUT_ADD(NAME, T, LOAD, STORE)                                                 \
    extern "C" __global__ void NAME(const uint64_t n, const uint32_t k0, const uint32_t k1,       \
                                    const uint32_t threshold, const float scale,                 \
                                    const T *__restrict__ x, const T *__restrict__ add,          \
                                    T *__restrict__ y, const int vec) {                          \
        KEYED_DROPOUT_BODY(T, LOAD, STORE, LOAD)                                                 \
    }

#define ID(v) (v)
#define ZERO(v) (-0.0f)
KEYED_DROPOUT(keyed_dropout_f32, float, ID, ID)
KEYED_DROPOUT(keyed_dropout_bf16, __nv_bfloat16, __bfloat162float, __float2bfloat16_rn)
KEYED_DROPOUT(keyed_dropout_f16, __half, __half2float, __float2half_rn)
KEYED_DROPOUT_ADD(keyed_dropout_add_f32, float, ID, ID)
KEYED_DROPOUT_ADD(keyed_dropout_add_bf16, __nv_bfloat16, __bfloat162float, __float2bfloat16_rn)
KEYED_DROPOUT_ADD(keyed_dropout_add_f16, __half, __half2float, __float2half_rn)
