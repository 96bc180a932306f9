//! Chris Wellons' lowbias32 integer hash: every input bit flips about half the output bits. The
//! keyed dropout masks (`train::dropout`) and the optimizer's stochastic rounding
//! (`train::optim`) draw their bits from it; `kernels/common.cuh` has the same function for
//! their CUDA kernels, which must agree with these bit for bit.

pub fn lowbias32(mut x: u32) -> u32 {
    x ^= x >> 16;
    x = x.wrapping_mul(0x7feb_352d);
    x ^= x >> 15;
    x = x.wrapping_mul(0x846c_a68b);
    x ^= x >> 16;
    x
}
