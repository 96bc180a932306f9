//! The project's own CUDA kernels: `.cu` files next to this module, compiled to PTX by
//! `build.rs` with the `cuda` feature and loaded once per device through candle's module cache.
//! Each has a CPU twin in Rust that computes the same result; `bench parity` checks the pair on
//! the GPU machine.

#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{CudaSlice, DeviceRepr, LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::WrapErr;
    use candle_core::{bail, CudaStorage, DType, Layout, Result};

    const DROPOUT_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/dropout.ptx"));

    /// Launches `keyed_dropout_<dtype>` over the contiguous elements of `x`.
    pub fn keyed_dropout(x: &CudaStorage, layout: &Layout, k0: u32, k1: u32, threshold: u32, scale: f32) -> Result<CudaStorage> {
        let Some((start, end)) = layout.contiguous_offsets() else {
            bail!("keyed dropout: input must be contiguous, got {layout:?}")
        };
        let dev = x.device().clone();
        let n = (end - start) as u64;
        fn launch<T: DeviceRepr>(dev: &candle_core::CudaDevice, name: &str, src: &CudaSlice<T>, start: usize, n: u64, k: (u32, u32, u32, f32)) -> Result<CudaSlice<T>> {
            let func = dev.get_or_load_custom_func(name, "freeski_dropout", DROPOUT_PTX)?;
            // SAFETY: every element is written by the kernel below.
            let out = unsafe { dev.alloc::<T>(n as usize)? };
            let src = src.slice(start..start + n as usize);
            let (k0, k1, threshold, scale) = k;
            let mut b = func.builder();
            b.arg(&n).arg(&k0).arg(&k1).arg(&threshold).arg(&scale).arg(&src).arg(&out);
            let blocks = n.div_ceil(256).min(65_535 * 8) as u32;
            let cfg = LaunchConfig { grid_dim: (blocks.max(1), 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
            // SAFETY: argument list matches the kernel's signature in dropout.cu.
            unsafe { b.launch(cfg) }.w()?;
            Ok(out)
        }
        let k = (k0, k1, threshold, scale);
        let slice = match x.dtype() {
            DType::F32 => candle_core::cuda_backend::CudaStorageSlice::F32(launch(&dev, "keyed_dropout_f32", x.as_cuda_slice::<f32>()?, start, n, k)?),
            DType::BF16 => candle_core::cuda_backend::CudaStorageSlice::BF16(launch(&dev, "keyed_dropout_bf16", x.as_cuda_slice::<half::bf16>()?, start, n, k)?),
            DType::F16 => candle_core::cuda_backend::CudaStorageSlice::F16(launch(&dev, "keyed_dropout_f16", x.as_cuda_slice::<half::f16>()?, start, n, k)?),
            other => bail!("keyed dropout on CUDA: {other:?} is not supported (f32, bf16, f16)"),
        };
        Ok(CudaStorage { slice, device: dev })
    }
}

#[cfg(feature = "cuda")]
pub use cuda::keyed_dropout;
