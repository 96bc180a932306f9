//! A device-memory cap for benchmarks: "does this fit on an 8 GB card?" on a larger one.

use anyhow::{bail, Result};
use candle_core::Device;

use crate::llm::device::describe;

/// Device memory held by an allocation outside candle's pool, so that a run on a large card
/// sees only what a smaller card would leave it (benchmarks: "does this fit in 8 GB?").
/// Freed on drop.
pub struct Ballast {
    #[cfg(feature = "cuda")]
    ptr: u64,
    #[cfg(feature = "cuda")]
    ctx: std::sync::Arc<candle_core::cuda_backend::cudarc::driver::CudaContext>,
    pub bytes: u64,
}

impl Ballast {
    /// Allocate all free device memory but `leave_free` bytes. Errors off CUDA, or when less
    /// than `leave_free` is free already.
    pub fn leave_free(device: &Device, leave_free: u64) -> Result<Self> {
        #[cfg(feature = "cuda")]
        if let Device::Cuda(dev) = device {
            use anyhow::Context;
            use candle_core::cuda_backend::cudarc::driver::sys;
            let ctx = dev.cuda_stream().context().clone();
            ctx.bind_to_thread().context("binding the CUDA context")?;
            let (free, _) = ctx.mem_get_info().context("reading free device memory")?;
            let free = free as u64;
            anyhow::ensure!(free > leave_free, "only {:.2} GB free, cannot leave {:.2} GB", free as f64 / 1e9, leave_free as f64 / 1e9);
            let bytes = free - leave_free;
            let mut ptr: sys::CUdeviceptr = 0;
            // SAFETY: plain driver allocation into a local; freed exactly once in `drop`.
            let r = unsafe { sys::cuMemAlloc_v2(&mut ptr, bytes as usize) };
            anyhow::ensure!(r == sys::CUresult::CUDA_SUCCESS, "holding back {:.2} GB of device memory failed: {r:?}", bytes as f64 / 1e9);
            return Ok(Self { ptr, ctx, bytes });
        }
        let _ = leave_free;
        bail!("a memory cap needs a CUDA device, not {}", describe(device))
    }
}

impl Drop for Ballast {
    fn drop(&mut self) {
        #[cfg(feature = "cuda")]
        {
            let _ = self.ctx.bind_to_thread();
            // SAFETY: `ptr` came from cuMemAlloc_v2 and is freed once.
            unsafe { candle_core::cuda_backend::cudarc::driver::sys::cuMemFree_v2(self.ptr) };
        }
    }
}
