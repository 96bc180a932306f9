// Helpers shared by the project's kernel files (included, so each .cu stays one PTX module).
#pragma once

#include <stdint.h>

// Chris Wellons' lowbias32 integer hash (every input bit flips about half the output bits):
// dropout's masks and the optimizer's stochastic rounding; src/util/hash.rs is its Rust twin.
__device__ __forceinline__ uint32_t lowbias32(uint32_t x) {
    x ^= x >> 16;
    x *= 0x7feb352dU;
    x ^= x >> 15;
    x *= 0x846ca68bU;
    x ^= x >> 16;
    return x;
}

// Sum of v over the 32 lanes of a warp; every lane gets the result.
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// Largest v over the 32 lanes of a warp (fmaxf: a NaN lane is passed over); every lane gets it.
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Programmatic dependent launch (Hopper and later): the decode step launches its kernels so
// that each may start while the one before it is finishing. A kernel launched that way calls
// pdl_wait() before it reads anything an earlier kernel of the step writes, or writes anything
// at all; what it does before (addressing, weight loads) overlaps the previous kernel's tail.
// pdl_launch_dependents() lets the next kernel's blocks start. Both are no-ops when compiled
// for an earlier architecture, where the step never launches this way.
__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
__device__ __forceinline__ void pdl_launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" :::);
#endif
}
