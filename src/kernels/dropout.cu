// Keyed dropout: y = x * mask(key, i) / keep, with the mask a pure function of the key and the
// element index (no generator state), so a recomputed or resumed forward drops the same inputs.
// The same hash runs on the CPU in src/train/dropout.rs; `bench parity` checks both agree bit
// for bit.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

// Chris Wellons' lowbias32 integer hash.
__device__ __forceinline__ uint32_t lowbias32(uint32_t x) {
    x ^= x >> 16;
    x *= 0x7feb352dU;
    x ^= x >> 15;
    x *= 0x846ca68bU;
    x ^= x >> 16;
    return x;
}

// Keep element i when the top 24 bits of its hash fall below `threshold` = keep · 2^24.
__device__ __forceinline__ bool kept(uint64_t i, uint32_t k0, uint32_t k1, uint32_t threshold) {
    uint32_t h = lowbias32((uint32_t)i ^ k0);
    h = lowbias32(h ^ k1 ^ ((uint32_t)(i >> 32) * 0x9e3779b9U));
    return (h >> 8) < threshold;
}

#define KEYED_DROPOUT(NAME, T, LOAD, STORE)                                                     \
    extern "C" __global__ void NAME(const uint64_t n, const uint32_t k0, const uint32_t k1,       \
                                    const uint32_t threshold, const float scale,                 \
                                    const T *__restrict__ x, T *__restrict__ y) {                \
        for (uint64_t i = blockIdx.x * (uint64_t)blockDim.x + threadIdx.x; i < n;                \
             i += (uint64_t)blockDim.x * gridDim.x) {                                            \
            const float v = kept(i, k0, k1, threshold) ? LOAD(x[i]) * scale : 0.0f;              \
            y[i] = STORE(v);                                                                     \
        }                                                                                        \
    }

#define ID(v) (v)
KEYED_DROPOUT(keyed_dropout_f32, float, ID, ID)
KEYED_DROPOUT(keyed_dropout_bf16, __nv_bfloat16, __bfloat162float, __float2bfloat16_rn)
KEYED_DROPOUT(keyed_dropout_f16, __half, __half2float, __float2half_rn)

// y = add + x * mask(key, i) / keep, rounded once: a dropped-out term summed into a running
// total (the LoRA input gradients of the training backward) without a separate add.
#define KEYED_DROPOUT_ADD(NAME, T, LOAD, STORE)                                                 \
    extern "C" __global__ void NAME(const uint64_t n, const uint32_t k0, const uint32_t k1,       \
                                    const uint32_t threshold, const float scale,                 \
                                    const T *__restrict__ x, const T *__restrict__ add,          \
                                    T *__restrict__ y) {                                         \
        for (uint64_t i = blockIdx.x * (uint64_t)blockDim.x + threadIdx.x; i < n;                \
             i += (uint64_t)blockDim.x * gridDim.x) {                                            \
            const float v = kept(i, k0, k1, threshold) ? LOAD(x[i]) * scale : 0.0f;              \
            y[i] = STORE(LOAD(add[i]) + v);                                                      \
        }                                                                                        \
    }

KEYED_DROPOUT_ADD(keyed_dropout_add_f32, float, ID, ID)
KEYED_DROPOUT_ADD(keyed_dropout_add_bf16, __nv_bfloat16, __bfloat162float, __float2bfloat16_rn)
KEYED_DROPOUT_ADD(keyed_dropout_add_f16, __half, __half2float, __float2half_rn)
