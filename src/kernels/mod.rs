//! The project's own kernels. CUDA: `.cu` files next to this module, compiled to PTX by
//! `build.rs` with the `cuda` feature and loaded per device (candle's module cache, or
//! `Kernels` for callers that keep their functions; CUDA builds only).
//!
//! * `dropout.cu`: keyed dropout for training; its Rust twin is `train::dropout`.
//! * `quant.cu`: kernels that read GGML-packed weights in place: dequantization to bf16/f16
//!   (`dequantize`), embedding rows and the decode matvec (used by `llm::fused_decode`).
//! * `train.cu`: fused backwards of SwiGLU, RMSNorm and softmax for `train::ops`, and the
//!   AdamW update for `train::optim`.
//! * `prompt.cu`: the prompt path's attention straight from the KV cache (`prompt_attention`),
//!   the attention softmax with its scale and causal mask in one pass (`causal_softmax`) and
//!   SwiGLU's `silu(gate) · up` (`silu_mul`); `gemm.rs` beside them holds the cuBLASLt GEMMs
//!   that sum an addend in their epilogue: the prompt projections' (`gemm_bf16_f32`, f32
//!   output, the residual added) and the training step's (`matmul_add`, `matmul_accumulate`).
//! * `decode.cu`: the matvec input (RMSNorm, int8 quantization and LoRA down-projection in one
//!   kernel), rotary + KV append and decode attention for `llm::fused_decode`.
//!
//! The candle path is the reference each CUDA kernel is checked against (`tests/cuda_parity.rs`
//! on the GPU machine, BENCHMARKS.md).
//!
//! * `cpu.rs` (every build): the CPU matmul for Q4_0/Q4_1/Q8_0 weights with AVX2, checked
//!   against f64 sums of the dequantized weights (`tests/cpu_matmul.rs`).

pub mod cpu;

use candle_core::quantized::GgmlDType;
use candle_core::Tensor;

/// What the prompt attention kernel's tensor-core products take as inputs (`prompt_attention`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttnPrecision {
    /// f32 values split into two tf32 halves, three MMAs a product: about f32's precision
    /// (`prompt_attn_f32`).
    F32,
    /// 16-bit inputs, one MMA a product, f32 accumulation and softmax: q (scaled) and k in
    /// f16, whose significand keeps the exponentiated scores close; the probabilities and v in
    /// bf16, which keeps v's range (`prompt_attn_half`).
    Half,
}

/// A GGML block type the kernels in `quant.cu` read, named by its kernel-name suffix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuantKind {
    pub suffix: &'static str,
}

pub fn quant_kind(dtype: GgmlDType) -> Option<QuantKind> {
    let suffix = match dtype {
        GgmlDType::Q4K => "q4k",
        GgmlDType::Q6K => "q6k",
        GgmlDType::Q8_0 => "q8_0",
        GgmlDType::Q4_0 => "q4_0",
        _ => return None,
    };
    Some(QuantKind { suffix })
}

/// For `x · wᵀ` with `x: [.., k]` and `w: [n, k]`, on any device and path: the rows of `x` and
/// the output's shape (`x`'s with its last axis `n`); an error when `x` does not end in `k`.
pub fn matmul_dims(x: &Tensor, k: usize, n: usize) -> candle_core::Result<(usize, Vec<usize>)> {
    let mut dims = x.dims().to_vec();
    match dims.last_mut() {
        Some(last) if *last == k => *last = n,
        _ => candle_core::bail!("input {:?} does not end in the weight's {k} inputs", x.dims()),
    }
    Ok((x.elem_count() / k, dims))
}

/// Warps per block of the decode matvec and weight rows per warp (`MV_WARPS`, `MV_SLOTS` in
/// quant.cu).
pub const MV_WARPS: usize = 4;
pub const MV_SLOTS: usize = 2;

/// Blocks of the decode matvec for `rows` outputs: a warp makes one output per slot, or one in
/// GLU mode, where its two slots are a gate row and the up row of the same output.
pub fn matvec_blocks(rows: usize, glu: bool) -> usize {
    let per_warp = if glu { MV_SLOTS / 2 } else { MV_SLOTS };
    rows.div_ceil(MV_WARPS * per_warp).max(1)
}

/// Warps per block of the tensor-core matvec (`MQ_WARPS` in quant.cu); they split k.
pub const MQ_WARPS: usize = 8;

/// Slots of a warp's weight ring in the Q4_K tensor-core matvec (`MQ_STAGES` in quant.cu).
const MQ_STAGES: usize = 3;

/// Stages of the block's weight ring in the Q6_K tensor-core matvec (`MQ6_STAGES` in quant.cu).
const MQ6_STAGES: usize = 3;

/// Dynamic shared memory of a tensor-core matvec block (`mvq_*`) for a weight of `dtype` whose
/// rows are `k` long, in builds for compute capability 9.0 and later (`MQ_RING` in quant.cu):
/// Q4_K's ring of `MQ_STAGES` slots of 16 rows × one block for each warp; Q6_K's ring of
/// `MQ6_STAGES` stages of 16 rows × 8 blocks for the whole block, where a row holds a multiple
/// of 8 blocks (runs of 8 then start 16-byte aligned). None otherwise: the kernel reads its
/// blocks straight from global memory.
pub fn mq_ring_bytes(dtype: GgmlDType, k: usize) -> u32 {
    if kernel_cap() < 90 {
        return 0;
    }
    let blocks = k / dtype.block_size();
    match dtype {
        GgmlDType::Q4K => (MQ_WARPS * MQ_STAGES * 16 * dtype.type_size()) as u32,
        GgmlDType::Q6K if blocks.is_multiple_of(8) => (MQ6_STAGES * 16 * 8 * dtype.type_size()) as u32,
        _ => 0,
    }
}

/// The compute capability this build's kernels were compiled for (`CUDA_COMPUTE_CAP`, as 90
/// for 9.0; 0 without CUDA kernels).
pub fn kernel_cap() -> u32 {
    option_env!("FREESKI_KERNEL_CAP").and_then(|c| c.parse().ok()).unwrap_or(0)
}

/// Blocks of the tensor-core matvec for `rows` outputs: a block takes a tile of 16 weight rows,
/// 16 outputs, or 8 in GLU mode (MMA rows 0-7 the gate rows, 8-15 the up rows of the same 8).
pub fn mma_matvec_blocks(rows: usize, glu: bool) -> usize {
    rows.div_ceil(if glu { 8 } else { 16 }).max(1)
}

#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::backend::BackendStorage;
    use std::sync::Arc;

    use super::AttnPrecision;
    use candle_core::cuda_backend::cudarc::driver::{CudaFunction, CudaModule, CudaSlice, CudaStream, DevicePtr, DeviceRepr, LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::cudarc::nvrtc::Ptx;
    use candle_core::cuda_backend::WrapErr;
    use candle_core::op::BackpropOp;
    use candle_core::quantized::QTensor;
    use candle_core::{bail, CudaDevice, CudaStorage, DType, Device, Layout, Result, Storage, Tensor};

    const DROPOUT_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/dropout.ptx"));
    const QUANT_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/quant.ptx"));
    const DECODE_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/decode.ptx"));
    const TRAIN_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/train.ptx"));
    const PROMPT_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/prompt.ptx"));

    /// The modules of `quant.cu` and `decode.cu`, loaded for one device's stream. Loaded
    /// through cudarc (candle's own module cache hands out a type it does not export), for
    /// callers that keep their kernels, like the fused decode step.
    pub struct Kernels {
        pub stream: Arc<CudaStream>,
        quant: Arc<CudaModule>,
        decode: Arc<CudaModule>,
    }

    impl Kernels {
        pub fn load(dev: &CudaDevice) -> Result<Self> {
            let stream = dev.cuda_stream();
            let ctx = stream.context();
            let quant = ctx.load_module(Ptx::from_src(QUANT_PTX)).w()?;
            let decode = ctx.load_module(Ptx::from_src(DECODE_PTX)).w()?;
            Ok(Self { stream, quant, decode })
        }

        /// A kernel of `quant.cu`.
        pub fn quant(&self, name: &str) -> Result<CudaFunction> {
            self.quant.load_function(name).w()
        }

        /// A kernel of `decode.cu`.
        pub fn decode(&self, name: &str) -> Result<CudaFunction> {
            self.decode.load_function(name).w()
        }

        /// Launch `func` with its parameters (a pointer to each argument, in the kernel's
        /// order). With `overlap` it may start before the kernel ahead of it on the stream has
        /// finished (programmatic dependent launch, compute capability 9.0 and later).
        ///
        /// # Safety
        /// `params` must match the kernel's parameter list; with `overlap`, the kernel must call
        /// `pdl_wait` (common.cuh) before it touches memory that earlier kernels use.
        pub unsafe fn launch_params(&self, func: &CudaFunction, cfg: LaunchConfig, params: &mut [*mut std::ffi::c_void], overlap: bool) -> Result<()> {
            use candle_core::cuda_backend::cudarc::driver::sys;
            self.stream.context().bind_to_thread().w()?;
            let mut attr = sys::CUlaunchAttribute {
                id: sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION,
                pad: [0; 4],
                value: sys::CUlaunchAttributeValue { programmaticStreamSerializationAllowed: 1 },
            };
            let config = sys::CUlaunchConfig {
                gridDimX: cfg.grid_dim.0,
                gridDimY: cfg.grid_dim.1,
                gridDimZ: cfg.grid_dim.2,
                blockDimX: cfg.block_dim.0,
                blockDimY: cfg.block_dim.1,
                blockDimZ: cfg.block_dim.2,
                sharedMemBytes: cfg.shared_mem_bytes,
                hStream: self.stream.cu_stream(),
                attrs: if overlap { &mut attr } else { std::ptr::null_mut() },
                numAttrs: overlap as u32,
            };
            // SAFETY: the configuration lives across the call; the caller vouches for params.
            unsafe { sys::cuLaunchKernelEx(&config, func.cu_function(), params.as_mut_ptr(), std::ptr::null_mut()) }.result().w()
        }

        /// Launch `func` with one argument struct (the kernels of `decode.cu` and the matvec
        /// take their arguments as one `#[repr(C)]` struct mirroring the C one); `overlap` as in
        /// [`Self::launch_params`].
        pub fn launch_with<A: DeviceRepr>(&self, func: &CudaFunction, cfg: LaunchConfig, args: &A, overlap: bool) -> Result<()> {
            let mut params = [std::ptr::from_ref(args).cast_mut().cast::<std::ffi::c_void>()];
            // SAFETY: each caller passes the struct whose layout the kernel declares, and with
            // `overlap` only kernels that wait (decode.cu, the matvecs of quant.cu).
            unsafe { self.launch_params(func, cfg, &mut params, overlap) }
        }

        /// Whether this build's kernels may be launched to overlap on this device: compiled for
        /// compute capability 9.0 or later (so they carry the waits) and running on such a card.
        pub fn overlap_supported(&self) -> Result<bool> {
            use candle_core::cuda_backend::cudarc::driver::sys::CUdevice_attribute;
            let compiled = super::kernel_cap();
            let major = self.stream.context().attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR).w()?;
            Ok(compiled >= 90 && major >= 9)
        }
    }

    /// Raw device address of a contiguous CUDA tensor's first element. The address stays valid
    /// while the tensor (or a clone sharing its storage) lives; kernels that get it run on the
    /// tensor's own stream, so no event bookkeeping is needed past this call.
    pub fn tensor_ptr(t: &Tensor) -> Result<u64> {
        if !t.is_contiguous() {
            bail!("expected a contiguous tensor, got {:?}", t.layout())
        }
        first_element_ptr(t)
    }

    /// Raw device address of a CUDA tensor's first element, for any layout (the caller reads
    /// it with the tensor's strides).
    pub fn first_element_ptr(t: &Tensor) -> Result<u64> {
        let (storage, layout) = t.storage_and_layout();
        let Storage::Cuda(cs) = &*storage else { bail!("expected a CUDA tensor, got one on {:?}", t.device().location()) };
        let stream = cs.device().cuda_stream();
        let (base, size) = match t.dtype() {
            DType::F32 => (cs.as_cuda_slice::<f32>()?.device_ptr(&stream).0, 4),
            DType::U32 => (cs.as_cuda_slice::<u32>()?.device_ptr(&stream).0, 4),
            DType::BF16 => (cs.as_cuda_slice::<half::bf16>()?.device_ptr(&stream).0, 2),
            DType::F16 => (cs.as_cuda_slice::<half::f16>()?.device_ptr(&stream).0, 2),
            other => bail!("device addresses of {other:?} tensors are not supported"),
        };
        Ok(base + (layout.start_offset() * size) as u64)
    }

    /// `t: [.., w]` as the kernels that take a row stride read it: `t` itself when its rows are
    /// contiguous and evenly spaced (a column slice of a wider GEMM output, or a contiguous
    /// tensor), else a contiguous copy; with the distance between rows in elements.
    fn strided_rows(t: &Tensor) -> Result<(Tensor, i64)> {
        let (dims, stride) = (t.dims(), t.stride());
        let rank = dims.len();
        let w = dims.last().copied().unwrap_or(1);
        let rows_even = rank >= 2 && stride[rank - 1] == 1 && (0..rank - 2).all(|i| dims[i] == 1 || stride[i] == stride[i + 1] * dims[i + 1]);
        if rows_even {
            return Ok((t.clone(), stride[rank - 2] as i64));
        }
        Ok((t.contiguous()?, w as i64))
    }

    /// The 16-bit copy a prompt-path kernel writes beside its f32 result for the next
    /// projection's input: bf16 (the dense GEMM's) or f16 (the f16 tensor-core kernel's).
    enum HalfCopy {
        Bf16(CudaSlice<half::bf16>),
        F16(CudaSlice<half::f16>),
    }

    impl HalfCopy {
        /// `n` uninitialized elements of `dtype`, which must be bf16 or f16.
        fn alloc(dev: &CudaDevice, dtype: DType, n: usize) -> Result<Self> {
            // SAFETY (both arms): the kernel the copy is made for writes every element.
            Ok(match dtype {
                DType::BF16 => Self::Bf16(unsafe { dev.alloc::<half::bf16>(n)? }),
                DType::F16 => Self::F16(unsafe { dev.alloc::<half::f16>(n)? }),
                other => bail!("a 16-bit copy is bf16 or f16, not {other:?}"),
            })
        }
        fn ptr(&self) -> u64 {
            match self {
                Self::Bf16(s) => slice_ptr(s),
                Self::F16(s) => slice_ptr(s),
            }
        }
        /// The kernels' `half` argument: 1 for f16, 0 for bf16.
        fn half_flag(&self) -> i32 {
            i32::from(matches!(self, Self::F16(_)))
        }
        fn into_tensor(self, dev: &CudaDevice, shape: impl Into<candle_core::Shape>) -> Tensor {
            match self {
                Self::Bf16(s) => tensor_from_slice(s, dev, shape),
                Self::F16(s) => tensor_from_slice(s, dev, shape),
            }
        }
    }

    /// Raw device address of a device buffer (see [`tensor_ptr`]).
    pub fn slice_ptr<T>(s: &CudaSlice<T>) -> u64 {
        s.device_ptr(s.stream()).0
    }

    /// A tensor over a freshly filled device buffer.
    pub fn tensor_from_slice<T: candle_core::cuda_backend::CudaDType + DeviceRepr>(s: CudaSlice<T>, dev: &CudaDevice, shape: impl Into<candle_core::Shape>) -> Tensor {
        let storage = CudaStorage::wrap_cuda_slice(s, dev.clone());
        Tensor::from_storage(Storage::Cuda(storage), shape, BackpropOp::none(), false)
    }

    /// `w: [rows, k]` in a block type of `quant.cu`, dequantized on its device to `dtype` (bf16 or
    /// f16) in one pass over the packed bytes. `None` when the type or dtype has no kernel.
    pub fn dequantize(w: &QTensor, dtype: DType) -> Result<Option<Tensor>> {
        dequantize_many(&[w], dtype)
    }

    /// Weights `[rows_i, k]` of one device dequantized to `dtype` (bf16 or f16) one under the
    /// other, `[Σ rows_i, k]` (so weights reading the same input make one GEMM). `None` when a
    /// type or the dtype has no kernel, or their widths or devices differ.
    pub fn dequantize_many(ws: &[&QTensor], dtype: DType) -> Result<Option<Tensor>> {
        let Some(first) = ws.first() else { return Ok(None) };
        let Device::Cuda(dev) = first.device() else { return Ok(None) };
        let prefix = match dtype {
            DType::BF16 => "dequant_bf16",
            DType::F16 => "dequant_f16",
            _ => return Ok(None),
        };
        let k = first.shape().dims2()?.1;
        let mut parts = Vec::with_capacity(ws.len());
        for w in ws {
            let (rows, wk) = w.shape().dims2()?;
            match (super::quant_kind(w.dtype()), w.device()) {
                (Some(kind), Device::Cuda(d)) if wk == k && d.id() == dev.id() => parts.push((format!("{prefix}_{}", kind.suffix), w.device_ptr()? as u64, rows)),
                _ => return Ok(None),
            }
        }
        fn run<T: candle_core::cuda_backend::CudaDType + DeviceRepr>(dev: &CudaDevice, parts: &[(String, u64, usize)], k: usize) -> Result<Tensor> {
            let total: usize = parts.iter().map(|p| p.2).sum();
            // SAFETY: the kernels below write every element (k is a whole number of blocks and
            // the weights' rows add up to `total`).
            let out = unsafe { dev.alloc::<T>(total * k)? };
            let mut at = slice_ptr(&out);
            for (name, wp, rows) in parts {
                let func = dev.get_or_load_custom_func(name, "freeski_quant", QUANT_PTX)?;
                let n = rows * k;
                // A thread takes 4 to 16 weights a pass (by type: 16 for the K-quants); a grid of
                // one thread per 16 weights, the kernel looping over what it misses.
                let items = (n / 16).max(1) as u32;
                let cfg = LaunchConfig { grid_dim: (items.div_ceil(256).clamp(1, 65_535 * 4), 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
                let (rows64, k32) = (*rows as i64, k as i32);
                let mut b = func.builder();
                b.arg(wp).arg(&at).arg(&rows64).arg(&k32);
                // SAFETY: (const uint8_t*, T*, int64_t, int) as declared by DEQUANT in quant.cu;
                // `at` has rows·k elements of `out` left.
                unsafe { b.launch(cfg) }.w()?;
                at += (n * std::mem::size_of::<T>()) as u64;
            }
            Ok(tensor_from_slice(out, dev, (total, k)))
        }
        Ok(Some(match dtype {
            DType::BF16 => run::<half::bf16>(&dev, &parts, k)?,
            _ => run::<half::f16>(&dev, &parts, k)?,
        }))
    }

    /// `v` as a kernel's 32-bit `int` argument; an error naming `what` when it does not fit.
    pub(super) fn kernel_int(v: usize, what: &str) -> Result<i32> {
        i32::try_from(v).map_err(|_| candle_core::Error::Msg(format!("{what}: {v} exceeds the kernel's 32-bit int")))
    }

    /// `blocks` as a grid's x dimension (at most 2³¹ − 1); an error naming `what` past that.
    fn grid_x(blocks: usize, what: &str) -> Result<u32> {
        u32::try_from(kernel_int(blocks, what)?).map_err(|_| candle_core::Error::Msg(format!("{what}: {blocks} blocks")))
    }

    /// A sliding window as the kernels take it: no window (`usize::MAX`) or one wider than an
    /// `int` is `i32::MAX`, every query sees at least itself.
    fn kernel_window(window: usize) -> i32 {
        i32::try_from(window).unwrap_or(i32::MAX).max(1)
    }

    /// Token rows and weight rows one block of the prompt matmuls covers (`mmq_q4k`: `MM_TOKENS`,
    /// 16 × `MM_WARPS`; `mmf_*`: `MF_TOKENS`, 16 × `MF_WARPS` in quant.cu), and its threads.
    const MMQ_TOKENS: usize = 64;
    const MMQ_ROWS: usize = 128;
    const MMQ_THREADS: u32 = 256;

    /// `MmqArgs` of quant.cu.
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct MmqArgs {
        w: u64,
        xq: u64,
        xds: u64,
        y: u64,
        k: i32,
        n: i32,
        m: i32,
        ldx: i32,
    }
    // SAFETY: plain data with the layout of the C struct.
    unsafe impl DeviceRepr for MmqArgs {}

    /// How many ranges of k `mmq_q4k` splits a product into: as many as keep every SM busy
    /// with two blocks (as many as fit an SM), each range at least two Q4_K blocks long. A
    /// (token, row) is summed in the same order by every call with the same shape.
    fn mmq_splits(sms: usize, tiles: usize, nblk: usize) -> usize {
        (2 * sms / tiles.max(1)).min(nblk / 2).max(1)
    }

    /// The grid of a prompt matmul block kernel (`mmq_q4k`, `mmf_*`) for `[m, k] · [n, k]ᵀ` on
    /// `dev`: token tiles, weight-row tiles and k ranges.
    fn prompt_matmul_grid(dev: &CudaDevice, m: usize, n: usize, k: usize) -> Result<(usize, usize, usize)> {
        use candle_core::cuda_backend::cudarc::driver::sys::CUdevice_attribute;
        let sms = dev.cuda_stream().context().attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT).w()?;
        let (tiles_m, tiles_n) = (m.div_ceil(MMQ_TOKENS), n.div_ceil(MMQ_ROWS));
        Ok((tiles_m, tiles_n, mmq_splits(usize::try_from(sms).unwrap_or(1), tiles_m * tiles_n, k / 256)))
    }

    /// `x · wᵀ` for `w: [n, k]` in Q4_K and `x: [.., k]` f32, on int8 tensor cores with the
    /// weights read in place: `quantize_q8_rows` turns `x` into int8 blocks of 32, then
    /// `mmq_q4k` computes 128 weight rows × 64 tokens a block, the tokens' activations staged in
    /// shared memory once for all its rows (and `mmq_sum` adds the partial sums where k is
    /// split to fill the card). `None` for other weight types, input types or devices (the
    /// caller takes another path).
    pub fn int8_mma_matmul(w: &QTensor, x: &Tensor) -> Result<Option<Tensor>> {
        let Device::Cuda(dev) = w.device() else { return Ok(None) };
        if w.dtype() != candle_core::quantized::GgmlDType::Q4K || x.dtype() != DType::F32 || !x.device().is_cuda() {
            return Ok(None);
        }
        let (n, k) = w.shape().dims2()?;
        let (m, dims) = super::matmul_dims(x, k, n)?;
        let what = "int8 MMA matmul";
        let ldx = m.next_multiple_of(2);
        let (mi, ni, ki, ldxi) = (kernel_int(m, what)?, kernel_int(n, what)?, kernel_int(k, what)?, kernel_int(ldx, what)?);
        let x = x.contiguous()?;
        let blocks = m * k / 32;
        // SAFETY: quantize_q8_rows writes every element of xq and the first m of each ldx-long
        // row of xds, the only ones mmq_q4k reads.
        let (xq, xds) = unsafe { (dev.alloc::<i8>(m * k)?, dev.alloc::<f32>(2 * ldx * (k / 32))?) };
        let (xp, xqp, xdsp) = (tensor_ptr(&x)?, slice_ptr(&xq), slice_ptr(&xds));
        let quantize = dev.get_or_load_custom_func("quantize_q8_rows", "freeski_quant", QUANT_PTX)?;
        // One warp a block of 32, eight warps a thread block.
        let cfg = LaunchConfig { grid_dim: (grid_x(blocks.div_ceil(8), what)?, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        let (blocks64, kb) = (blocks as i64, ki / 32);
        let mut b = quantize.builder();
        b.arg(&xp).arg(&xqp).arg(&xdsp).arg(&blocks64).arg(&kb).arg(&ldxi);
        // SAFETY: (const float*, int8_t*, float2*, int64_t, int, int) as quantize_q8_rows
        // declares; x holds blocks·32 floats and the outputs were sized for them.
        unsafe { b.launch(cfg) }.w()?;
        let w = w.device_ptr()? as u64;
        let y = run_prompt_matmul(&dev, "mmq_q4k", (m, n, k), None, |y| MmqArgs { w, xq: xqp, xds: xdsp, y, k: ki, n: ni, m: mi, ldx: ldxi })?;
        Ok(Some(tensor_from_slice(y, &dev, dims)))
    }

    /// A prompt matmul block kernel (`mmq_q4k`, `mmf_*`) for `[m, k] · [n, k]ᵀ` on its grid
    /// ([`prompt_matmul_grid`]), with the arguments `args(out)` for its output address: the
    /// `[m, n]` f32 result itself, or, where k is split, a buffer of the ranges' partial sums that
    /// `mmq_sum` then adds (with `add`, which the kernel adds itself otherwise). Returns the result.
    fn run_prompt_matmul<A: DeviceRepr>(dev: &CudaDevice, kernel: &str, (m, n, k): (usize, usize, usize), add: Option<u64>, args: impl FnOnce(u64) -> A) -> Result<CudaSlice<f32>> {
        let (tiles_m, tiles_n, splits) = prompt_matmul_grid(dev, m, n, k)?;
        // SAFETY: every [m, n] element is written: by the kernel (one split) or by mmq_sum.
        let y = unsafe { dev.alloc::<f32>(m * n)? };
        let part = if splits > 1 {
            // SAFETY: each split's blocks write every [m, n] element of their slice.
            Some(unsafe { dev.alloc::<f32>(splits * m * n)? })
        } else {
            None
        };
        let a = args(part.as_ref().map_or(slice_ptr(&y), slice_ptr));
        let f = dev.get_or_load_custom_func(kernel, "freeski_quant", QUANT_PTX)?;
        let cfg = LaunchConfig { grid_dim: (grid_x(tiles_m, kernel)?, grid_x(tiles_n, kernel)?, grid_x(splits, kernel)?), block_dim: (MMQ_THREADS, 1, 1), shared_mem_bytes: 0 };
        let mut b = f.builder();
        b.arg(&a);
        // SAFETY: `args` builds the kernel's argument struct (#[repr(C)], as quant.cu declares
        // it), whose pointers are live buffers of the sizes it names, the output sized above.
        unsafe { b.launch(cfg) }.w()?;
        if let Some(part) = &part {
            sum_splits(dev, part, add, &y, m * n, splits)?;
        }
        Ok(y)
    }

    /// `y = Σ_s part[s] (+ add)` over the `splits` partial products of a prompt matmul whose k
    /// was split (`mmq_sum`), each `count` long.
    fn sum_splits(dev: &CudaDevice, part: &CudaSlice<f32>, add: Option<u64>, y: &CudaSlice<f32>, count: usize, splits: usize) -> Result<()> {
        let what = "prompt matmul sum";
        let sum = dev.get_or_load_custom_func("mmq_sum", "freeski_quant", QUANT_PTX)?;
        let (partp, addp, yp, count64, splits) = (slice_ptr(part), add.unwrap_or(0), slice_ptr(y), count as i64, kernel_int(splits, what)?);
        let cfg = LaunchConfig { grid_dim: (grid_x(count.div_ceil(256).min(4096), what)?, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        let mut b = sum.builder();
        b.arg(&partp).arg(&addp).arg(&yp).arg(&count64).arg(&splits);
        // SAFETY: (const float*, const float*, float*, int64_t, int) as mmq_sum declares; part
        // holds splits·count floats, add (when not null) and y count.
        unsafe { b.launch(cfg) }.w()?;
        Ok(())
    }

    /// `MmfArgs` of quant.cu.
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct MmfArgs {
        w: [u64; 3],
        seg_end: [i32; 3],
        x: u64,
        add: u64,
        y: u64,
        k: i32,
        n: i32,
        m: i32,
    }
    // SAFETY: plain data with the layout of the C struct.
    unsafe impl DeviceRepr for MmfArgs {}

    /// `x · wᵀ (+ add)` for `w`, one to three weights `[n_i, k]` of one type, Q4_K or Q6_K, read
    /// as one stacked `[Σ n_i, k]` (q|k|v, gate|up: one launch, the output's columns in order),
    /// and `x: [.., k]` f32, or f16 where the kernel before it wrote an f16 copy (`add` f32
    /// shaped like the output), on f16 tensor cores with the weights dequantized in registers
    /// (`mmf_q4k`, `mmf_q6k`): `x` is rounded to f16 once, each block of 128 weight rows × 64
    /// tokens turns its weights into f16 operands once for all its tokens, and the product is
    /// accumulated and written in f32. `None` for other weight types, mixed types or widths,
    /// input types or devices (the caller takes another path).
    pub fn f16_mma_matmul(ws: &[&QTensor], x: &Tensor, add: Option<&Tensor>) -> Result<Option<Tensor>> {
        use candle_core::quantized::GgmlDType;
        let Some(first) = ws.first() else { return Ok(None) };
        let Device::Cuda(dev) = first.device() else { return Ok(None) };
        let kernel = match first.dtype() {
            GgmlDType::Q4K => "mmf_q4k",
            GgmlDType::Q6K => "mmf_q6k",
            _ => return Ok(None),
        };
        if ws.len() > 3 || !matches!(x.dtype(), DType::F32 | DType::F16) || !x.device().is_cuda() {
            return Ok(None);
        }
        let k = first.shape().dims2()?.1;
        let what = "f16 MMA matmul";
        let (mut w, mut seg_end, mut n) = ([0u64; 3], [0i32; 3], 0usize);
        for (i, wi) in ws.iter().enumerate() {
            let (ni, ki) = wi.shape().dims2()?;
            if wi.dtype() != first.dtype() || ki != k || !wi.device().same_device(&first.device()) {
                return Ok(None);
            }
            n += ni;
            w[i] = wi.device_ptr()? as u64;
            seg_end[i] = kernel_int(n, what)?;
        }
        // Unused segments end where the last one does (never chosen).
        let last = seg_end[ws.len() - 1];
        seg_end[ws.len()..].fill(last);
        let (m, dims) = super::matmul_dims(x, k, n)?;
        let add = match add {
            Some(a) if a.dims() != dims.as_slice() || a.dtype() != DType::F32 => bail!("f16 MMA matmul: addend {:?} {:?} for an output {dims:?}", a.dims(), a.dtype()),
            Some(a) => Some(a.contiguous()?),
            None => None,
        };
        let (mi, ni, ki) = (kernel_int(m, what)?, kernel_int(n, what)?, kernel_int(k, what)?);
        let xh = x.to_dtype(DType::F16)?.contiguous()?;
        let addp = add.as_ref().map(tensor_ptr).transpose()?;
        let x = tensor_ptr(&xh)?;
        let y = run_prompt_matmul(&dev, kernel, (m, n, k), addp, |y| MmfArgs { w, seg_end, x, add: addp.unwrap_or(0), y, k: ki, n: ni, m: mi })?;
        drop(xh);
        Ok(Some(tensor_from_slice(y, &dev, dims)))
    }

    /// `softmax(scale · scores + causal mask)` over the last axis of f32 `scores: [.., lines,
    /// keys]` in one kernel (`causal_softmax_f32` in prompt.cu), for the last `tq` of `keys`
    /// positions: line `i` is query `i mod tq` (so query heads folded into the line axis share
    /// one call), at position `keys - tq + i mod tq`, and sees the keys at or before it, the
    /// last `window` of them with a sliding window; masked probabilities are 0. `None` unless
    /// `scores` is f32 or bf16 (probabilities rounded once) on CUDA.
    pub fn causal_softmax(scores: &Tensor, tq: usize, scale: f32, window: usize) -> Result<Option<Tensor>> {
        let Device::Cuda(dev) = scores.device() else { return Ok(None) };
        let bf16 = match scores.dtype() {
            DType::F32 => false,
            DType::BF16 => true,
            _ => return Ok(None),
        };
        let dims = scores.dims().to_vec();
        let keys = match dims.as_slice() {
            [.., lines, keys] if tq >= 1 && tq <= *keys && lines % tq == 0 => *keys,
            _ => bail!("causal softmax: scores {dims:?} are not [.., lines, keys] with lines a multiple of the {tq} queries and 1 <= queries <= keys"),
        };
        let (tq, keys_i, window) = (kernel_int(tq, "causal softmax")?, kernel_int(keys, "causal softmax")?, kernel_window(window));
        let s = scores.contiguous()?;
        let lines = s.elem_count() / keys;
        let out = empty(dev, scores.dtype(), s.shape())?;
        let name = if bf16 { "causal_softmax_bf16" } else { "causal_softmax_f32" };
        let func = dev.get_or_load_custom_func(name, "freeski_prompt", PROMPT_PTX)?;
        // One warp a line, eight a block.
        let cfg = LaunchConfig { grid_dim: (grid_x(lines.div_ceil(8), "causal softmax")?, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        let (sp, op, lines64) = (tensor_ptr(&s)?, tensor_ptr(&out)?, lines as i64);
        let mut b = func.builder();
        b.arg(&sp).arg(&op).arg(&lines64).arg(&tq).arg(&keys_i).arg(&window).arg(&scale);
        // SAFETY: (const T*, T*, int64_t, int, int, int, float) as causal_softmax_<T> declares
        // (T the scores' dtype); both buffers hold lines · keys values; the kernel writes every
        // one of them.
        unsafe { b.launch(cfg) }.w()?;
        Ok(Some(out))
    }

    /// `PromptAttnArgs` of prompt.cu.
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct PromptAttnArgs {
        q: u64,
        k: u64,
        v: u64,
        out: u64,
        out_copy: u64,
        kv_head_stride: i64,
        q_head_stride: i64,
        q_row_stride: i64,
        nh: i32,
        nkv: i32,
        tq: i32,
        keys: i32,
        hd: i32,
        window: i32,
        copy_half: i32,
        scale: f32,
    }
    // SAFETY: plain data with the layout of the C struct.
    unsafe impl DeviceRepr for PromptAttnArgs {}

    /// Warps and queries of a `prompt_attn_f32` or `prompt_attn_half` block (16 a warp), and the
    /// largest head size they serve (`PA_WARPS`, `PA_QUERIES`, `PA_HD` in prompt.cu).
    const PA_WARPS: u32 = 4;
    const PA_QUERIES: usize = 16 * PA_WARPS as usize;
    const PA_HD: usize = 128;
    /// Its dynamic shared memory (`PA_SMEM_FLOATS` in prompt.cu): two tiles of 32 keys of K (rows
    /// padded to 132 floats) and V (136), and 16 × 36 probabilities a warp.
    const PA_SMEM_BYTES: u32 = ((2 * 32 * (132 + 136) + PA_QUERIES * 36) * 4) as u32;

    /// Causal attention of one row's prompt (flash attention: an online softmax over tiles of
    /// keys, both products on the tensor cores, no score matrix; `precision` says in what):
    /// `q: [1, nh, tq, hd]` (any strides with each query's values contiguous, e.g. the
    /// transposed view of `rope_prompt`'s output), `k`, `v`: `[1, nkv, keys, hd]` views of the
    /// row's KV cache (each key a contiguous run of hd values; read in place), query `i` at
    /// position `keys - tq + i` seeing the keys at or before it, the last `window` of them with a
    /// sliding window. Returns `[1, tq, nh, hd]`. `None` unless all are f32 on CUDA with `hd` a
    /// multiple of 8 up to 128 (of 16 for [`AttnPrecision::Half`]) and whole groups of query
    /// heads per KV head.
    pub fn prompt_attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f32, window: usize, precision: AttnPrecision) -> Result<Option<Tensor>> {
        Ok(prompt_attention_launch(q, k, v, scale, window, precision, None)?.map(|(out, _)| out))
    }

    /// [`prompt_attention`] with its output also rounded to `copy` (bf16 or f16) in the same
    /// kernel (the o projection's input on the prompt path): `(f32, copy)`, both `[1, tq, nh,
    /// hd]`.
    pub fn prompt_attention_pair(q: &Tensor, k: &Tensor, v: &Tensor, scale: f32, window: usize, precision: AttnPrecision, copy: DType) -> Result<Option<(Tensor, Tensor)>> {
        Ok(prompt_attention_launch(q, k, v, scale, window, precision, Some(copy))?.and_then(|(out, ob)| Some((out, ob?))))
    }

    #[allow(clippy::too_many_arguments)]
    fn prompt_attention_launch(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        scale: f32,
        window: usize,
        precision: AttnPrecision,
        copy: Option<DType>,
    ) -> Result<Option<(Tensor, Option<Tensor>)>> {
        let Device::Cuda(dev) = q.device() else { return Ok(None) };
        let (_, nh, tq, hd) = q.dims4()?;
        let (_, nkv, keys, _) = k.dims4()?;
        let step = match precision {
            AttnPrecision::F32 => 8,
            AttnPrecision::Half => 16,
        };
        if [q, k, v].iter().any(|t| t.dtype() != DType::F32 || !t.device().same_device(q.device())) || hd > PA_HD || hd % step != 0 || nkv == 0 || nh % nkv != 0 {
            return Ok(None);
        }
        if q.dims()[0] != 1 || k.dims() != v.dims() || k.dims()[0] != 1 || k.dims()[3] != hd || tq == 0 || tq > keys {
            bail!("prompt attention: q {:?}, k {:?}, v {:?} do not fit one row's prompt", q.dims(), k.dims(), v.dims())
        }
        let q = if q.stride()[3] == 1 { q.clone() } else { q.contiguous()? };
        // Read in place when each key is a run of hd values and K and V share a head stride (views
        // of the cache buffers); copied otherwise.
        let rows = |t: &Tensor| t.stride()[3] == 1 && t.stride()[2] == hd;
        let (k, v) = if rows(k) && rows(v) && k.stride()[1] == v.stride()[1] { (k.clone(), v.clone()) } else { (k.contiguous()?, v.contiguous()?) };
        let (kp, vp, ks) = (first_element_ptr(&k)?, first_element_ptr(&v)?, k.stride()[1]);
        // The kernel reads K and V rows as float4: 16-byte aligned starts and head strides.
        if kp % 16 != 0 || vp % 16 != 0 || ks % 4 != 0 {
            return Ok(None);
        }
        let int = |v: usize| kernel_int(v, "prompt attention");
        // SAFETY: the kernel writes every [tq, nh, hd] element of both.
        let out = unsafe { dev.alloc::<f32>(tq * nh * hd)? };
        let out_b = copy.map(|c| HalfCopy::alloc(dev, c, tq * nh * hd)).transpose()?;
        let args = PromptAttnArgs {
            q: first_element_ptr(&q)?,
            k: kp,
            v: vp,
            out: slice_ptr(&out),
            out_copy: out_b.as_ref().map_or(0, HalfCopy::ptr),
            kv_head_stride: ks as i64,
            q_head_stride: q.stride()[1] as i64,
            q_row_stride: q.stride()[2] as i64,
            nh: int(nh)?,
            nkv: int(nkv)?,
            tq: int(tq)?,
            keys: int(keys)?,
            hd: int(hd)?,
            window: kernel_window(window),
            copy_half: out_b.as_ref().map_or(0, HalfCopy::half_flag),
            scale,
        };
        let (name, smem) = match precision {
            AttnPrecision::F32 => ("prompt_attn_f32", PA_SMEM_BYTES),
            // Its tiles are static shared memory.
            AttnPrecision::Half => ("prompt_attn_half", 0),
        };
        let func = dev.get_or_load_custom_func(name, "freeski_prompt", PROMPT_PTX)?.into_cuda_function();
        if smem > 0 {
            // More than the 48 KB a launch gets without asking.
            func.set_attribute(candle_core::cuda_backend::cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, smem as i32).w()?;
        }
        let cfg = LaunchConfig { grid_dim: (grid_x(tq.div_ceil(PA_QUERIES), "prompt attention")?, nh as u32, 1), block_dim: (PA_WARPS * 32, 1, 1), shared_mem_bytes: smem };
        let stream = dev.cuda_stream();
        let mut b = stream.launch_builder(&func);
        b.arg(&args);
        // SAFETY: the struct mirrors PromptAttnArgs; q holds nh·tq·hd floats, K and V hold nkv heads
        // of `keys` rows of hd at the head stride given, out (and out_copy unless null) tq·nh·hd.
        unsafe { b.launch(cfg) }.w()?;
        Ok(Some((tensor_from_slice(out, dev, (1, tq, nh, hd)), out_b.map(|ob| ob.into_tensor(dev, (1, tq, nh, hd))))))
    }

    /// `RopePromptArgs` of prompt.cu.
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct RopePromptArgs {
        q: u64,
        k: u64,
        v: u64,
        cos: u64,
        sin: u64,
        q_out: u64,
        k_cache: u64,
        v_cache: u64,
        q_row: i64,
        k_row: i64,
        v_row: i64,
        nh: i32,
        nkv: i32,
        hd: i32,
        cap: i32,
        pos0: i32,
        at: i32,
    }
    // SAFETY: plain data with the layout of the C struct.
    unsafe impl DeviceRepr for RopePromptArgs {}

    /// A one-row prompt's rotary embedding and cache append in one kernel (`rope_prompt_f32` in
    /// prompt.cu): `q: [1, t, nh·hd]`, `k`, `v`: `[1, t, nkv·hd]` (the projections' outputs), token
    /// `i` at rotary position `pos0 + i` of the tables `cos`, `sin`: `[positions, hd/2]`; its
    /// rotated key and its value go into `k_cache`, `v_cache` (`[1, nkv, cap, hd]`) at index
    /// `at + i`. Returns the rotated queries `[1, t, nh, hd]`. `None` unless all are f32 on CUDA
    /// with contiguous caches and tables.
    pub fn rope_prompt(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        (cos, sin): (&Tensor, &Tensor),
        (k_cache, v_cache): (&Tensor, &Tensor),
        pos0: usize,
        at: usize,
    ) -> Result<Option<Tensor>> {
        let Device::Cuda(dev) = q.device() else { return Ok(None) };
        let all = [q, k, v, cos, sin, k_cache, v_cache];
        if all.iter().any(|t| t.dtype() != DType::F32 || !t.device().same_device(q.device()))
            || !k_cache.is_contiguous()
            || !v_cache.is_contiguous()
            || !cos.is_contiguous()
            || !sin.is_contiguous()
        {
            return Ok(None);
        }
        let (_, nkv, cap, hd) = k_cache.dims4()?;
        let (b, t, qw) = q.dims3()?;
        let (positions, half) = cos.dims2()?;
        if b != 1
            || k_cache.dims()[0] != 1
            || v_cache.dims() != k_cache.dims()
            || hd % 2 != 0
            || half * 2 != hd
            || qw % hd != 0
            || k.dims() != [1, t, nkv * hd]
            || v.dims() != k.dims()
            || sin.dims() != cos.dims()
        {
            bail!("rope_prompt: q {:?}, k {:?}, v {:?}, cache {:?}, tables {:?} do not fit one row's prompt", q.dims(), k.dims(), v.dims(), k_cache.dims(), cos.dims())
        }
        if at + t > cap || pos0 + t > positions {
            bail!("rope_prompt: {t} tokens at cache index {at} / position {pos0} exceed the cache's {cap} or the tables' {positions} positions")
        }
        let nh = qw / hd;
        let ((q, q_row), (k, k_row), (v, v_row)) = (strided_rows(q)?, strided_rows(k)?, strided_rows(v)?);
        let int = |v: usize| kernel_int(v, "rope_prompt");
        // SAFETY: the kernel writes every element of q_out.
        let q_out = unsafe { dev.alloc::<f32>(t * nh * hd)? };
        let args = RopePromptArgs {
            q: first_element_ptr(&q)?,
            k: first_element_ptr(&k)?,
            v: first_element_ptr(&v)?,
            cos: tensor_ptr(cos)?,
            sin: tensor_ptr(sin)?,
            q_out: slice_ptr(&q_out),
            k_cache: tensor_ptr(k_cache)?,
            v_cache: tensor_ptr(v_cache)?,
            q_row,
            k_row,
            v_row,
            nh: int(nh)?,
            nkv: int(nkv)?,
            hd: int(hd)?,
            cap: int(cap)?,
            pos0: int(pos0)?,
            at: int(at)?,
        };
        // One block a token.
        let cfg = LaunchConfig { grid_dim: (int(t)? as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        let func = dev.get_or_load_custom_func("rope_prompt_f32", "freeski_prompt", PROMPT_PTX)?;
        let mut bld = func.builder();
        bld.arg(&args);
        // SAFETY: the struct mirrors RopePromptArgs; q holds t rows of nh·hd floats, k and v t rows
        // of nkv·hd, each at its row stride, the
        // tables `positions` rows of hd/2 with pos0 + t <= positions, the caches nkv·cap·hd with
        // at + t <= cap, q_out t·nh·hd.
        unsafe { bld.launch(cfg) }.w()?;
        Ok(Some(tensor_from_slice(q_out, dev, (1, t, nh, hd))))
    }

    /// `silu(g) · u` elementwise for f32 or bf16 `g` and `u` of one shape on CUDA
    /// (`silu_mul_f32` / `silu_mul_bf16` in prompt.cu: candle's silu and product in one pass,
    /// rounded once). `None` for other dtypes or devices.
    pub fn silu_mul(g: &Tensor, u: &Tensor) -> Result<Option<Tensor>> {
        if g.dtype() == DType::BF16 {
            return silu_mul_bf16(g, u);
        }
        Ok(silu_mul_launch(g, u, None)?.map(|(y, _)| y))
    }

    /// The gate and up of one SwiGLU launch, each as rows at its own stride.
    struct SiluRows {
        dev: CudaDevice,
        g: Tensor,
        g_row: i64,
        u: Tensor,
        u_row: i64,
        n: usize,
        rows: usize,
        cols: usize,
    }

    /// `g` and `u` for a SwiGLU kernel when both are `dtype` on one CUDA device; `None` where
    /// the kernels do not apply, an error where their shapes differ.
    fn silu_rows(g: &Tensor, u: &Tensor, dtype: DType) -> Result<Option<SiluRows>> {
        let Device::Cuda(dev) = g.device() else { return Ok(None) };
        if g.dtype() != dtype || u.dtype() != dtype || !g.device().same_device(u.device()) {
            return Ok(None);
        }
        if g.dims() != u.dims() {
            bail!("silu_mul: gate {:?} and up {:?} differ in shape", g.dims(), u.dims())
        }
        let ((g, g_row), (u, u_row)) = (strided_rows(g)?, strided_rows(u)?);
        let n = g.elem_count();
        let cols = g.dims().last().copied().unwrap_or(1).max(1);
        Ok(Some(SiluRows { dev: dev.clone(), g, g_row, u, u_row, n, rows: n / cols, cols }))
    }

    fn silu_mul_bf16(g: &Tensor, u: &Tensor) -> Result<Option<Tensor>> {
        let Some(SiluRows { dev, g, g_row, u, u_row, n, rows, cols }) = silu_rows(g, u, DType::BF16)? else { return Ok(None) };
        let dev = &dev;
        // SAFETY: the kernel writes every element.
        let y = unsafe { dev.alloc::<half::bf16>(n)? };
        let func = dev.get_or_load_custom_func("silu_mul_bf16", "freeski_prompt", PROMPT_PTX)?;
        let (gp, up, yp) = (first_element_ptr(&g)?, first_element_ptr(&u)?, slice_ptr(&y));
        let vec2 = i32::from(cols % 2 == 0 && g_row % 2 == 0 && u_row % 2 == 0 && [gp, up, yp].iter().all(|p| p % 4 == 0));
        let what = "silu_mul";
        let (rows32, cols32) = (kernel_int(rows, what)?, kernel_int(cols, what)?);
        let per_thread = if vec2 == 1 { 2 } else { 1 };
        let cfg = LaunchConfig { grid_dim: (grid_x(cols.div_ceil(256 * per_thread), what)?, rows.min(65_535) as u32, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        let mut b = func.builder();
        b.arg(&gp).arg(&up).arg(&yp).arg(&rows32).arg(&cols32).arg(&g_row).arg(&u_row).arg(&vec2);
        if n > 0 {
            // SAFETY: (const bf16*, const bf16*, bf16*, int, int, long long, long long, int) as
            // silu_mul_bf16 declares; g and u hold `rows` rows of `cols` at their row strides, y
            // rows · cols elements; vec2 only with the alignment it needs.
            unsafe { b.launch(cfg) }.w()?;
        }
        Ok(Some(tensor_from_slice(y, dev, g.dims())))
    }

    /// [`silu_mul`] with its result also rounded to `copy` (bf16 or f16) in the same pass (the
    /// down projection's input on the prompt path): `(f32, copy)`.
    pub fn silu_mul_pair(g: &Tensor, u: &Tensor, copy: DType) -> Result<Option<(Tensor, Tensor)>> {
        Ok(silu_mul_launch(g, u, Some(copy))?.and_then(|(y, yb)| Some((y, yb?))))
    }

    fn silu_mul_launch(g: &Tensor, u: &Tensor, copy: Option<DType>) -> Result<Option<(Tensor, Option<Tensor>)>> {
        let Some(SiluRows { dev, g, g_row, u, u_row, n, rows, cols }) = silu_rows(g, u, DType::F32)? else { return Ok(None) };
        let dev = &dev;
        // SAFETY: the kernel writes every element of both.
        let y = unsafe { dev.alloc::<f32>(n)? };
        let yb = copy.map(|c| HalfCopy::alloc(dev, c, n)).transpose()?;
        let func = dev.get_or_load_custom_func("silu_mul_f32", "freeski_prompt", PROMPT_PTX)?;
        let (gp, up, yp, ybp, half) =
            (first_element_ptr(&g)?, first_element_ptr(&u)?, slice_ptr(&y), yb.as_ref().map_or(0, HalfCopy::ptr), yb.as_ref().map_or(0, HalfCopy::half_flag));
        let vec4 = i32::from(cols % 4 == 0 && g_row % 4 == 0 && u_row % 4 == 0 && [gp, up, yp].iter().all(|p| p % 16 == 0) && ybp % 8 == 0);
        let what = "silu_mul";
        let (rows32, cols32) = (kernel_int(rows, what)?, kernel_int(cols, what)?);
        let per_thread = if vec4 == 1 { 4 } else { 1 };
        let cfg = LaunchConfig { grid_dim: (grid_x(cols.div_ceil(256 * per_thread), what)?, rows.min(65_535) as u32, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        let mut b = func.builder();
        b.arg(&gp).arg(&up).arg(&yp).arg(&ybp).arg(&half).arg(&rows32).arg(&cols32).arg(&g_row).arg(&u_row).arg(&vec4);
        if n > 0 {
            // SAFETY: (const float*, const float*, float*, void* or null, int, int, int, long
            // long, long long, int) as silu_mul_f32 declares; g and u hold `rows` rows of `cols`
            // at their row strides, y and yb rows · cols elements of their types (half says
            // which 16-bit type yb is); vec4 only with the alignment it needs.
            unsafe { b.launch(cfg) }.w()?;
        }
        Ok(Some((tensor_from_slice(y, dev, g.dims()), yb.map(|yb| yb.into_tensor(dev, g.dims())))))
    }

    /// RMSNorm of the rows of f32 `x: [.., n]` with weight `w: [n]` (`x · w / sqrt(mean(x²) +
    /// eps)`), as f32 and rounded to `copy` (bf16 or f16) in one pass (`rms_norm_pair_f32` in
    /// prompt.cu; the copy is the projections' input on the prompt path). `None` unless both
    /// are f32 on CUDA.
    pub fn rms_norm_pair(x: &Tensor, w: &Tensor, eps: f32, copy: DType) -> Result<Option<(Tensor, Tensor)>> {
        let Device::Cuda(dev) = x.device() else { return Ok(None) };
        if x.dtype() != DType::F32 || w.dtype() != DType::F32 || !x.device().same_device(w.device()) {
            return Ok(None);
        }
        let n = w.elem_count();
        if x.dims().last() != Some(&n) || w.rank() != 1 {
            bail!("rms_norm_pair: x {:?} does not end in the weight's {:?}", x.dims(), w.dims())
        }
        let (x, w) = (x.contiguous()?, w.contiguous()?);
        let rows = x.elem_count() / n.max(1);
        // SAFETY: the kernel writes every element of both.
        let (y, yb) = unsafe { (dev.alloc::<f32>(rows * n)?, HalfCopy::alloc(dev, copy, rows * n)?) };
        let func = dev.get_or_load_custom_func("rms_norm_pair_f32", "freeski_prompt", PROMPT_PTX)?;
        let (xp, wp, yp, ybp, half, n32) = (tensor_ptr(&x)?, tensor_ptr(&w)?, slice_ptr(&y), yb.ptr(), yb.half_flag(), kernel_int(n, "rms_norm_pair")?);
        let cfg = LaunchConfig { grid_dim: (grid_x(rows, "rms_norm_pair")?, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        let mut b = func.builder();
        b.arg(&xp).arg(&wp).arg(&yp).arg(&ybp).arg(&half).arg(&n32).arg(&eps);
        if rows > 0 {
            // SAFETY: (const float*, const float*, float*, void*, int, int, float) as
            // rms_norm_pair_f32 declares; x, y and yb hold rows · n elements of their types
            // (half says which 16-bit type yb is), w n.
            unsafe { b.launch(cfg) }.w()?;
        }
        Ok(Some((tensor_from_slice(y, dev, x.dims()), yb.into_tensor(dev, x.dims()))))
    }

    /// Launch shape of the grid-stride elementwise kernels (dropout, SwiGLU backward, AdamW):
    /// 256 threads a block, one element a thread up to 65,535 × 8 blocks, looping past that.
    fn elementwise_launch(n: u64) -> LaunchConfig {
        let blocks = n.div_ceil(256).min(65_535 * 8) as u32;
        LaunchConfig { grid_dim: (blocks.max(1), 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 }
    }

    /// The dropout kernels' `vec` flag (16 bytes a thread: `n` a multiple of the vector width and
    /// every buffer 16-byte aligned) and a grid for it.
    fn dropout_launch(n: u64, elem_bytes: usize, ptrs: &[u64]) -> (i32, LaunchConfig) {
        let width = (16 / elem_bytes.max(1)) as u64;
        let vec = n.is_multiple_of(width) && ptrs.iter().all(|p| p.is_multiple_of(16));
        (i32::from(vec), elementwise_launch(if vec { n / width } else { n }))
    }

    /// Launches `keyed_dropout_<dtype>` over the contiguous elements of `x`.
    pub fn keyed_dropout(x: &CudaStorage, layout: &Layout, k0: u32, k1: u32, threshold: u32, scale: f32) -> Result<CudaStorage> {
        let Some((start, end)) = layout.contiguous_offsets() else { bail!("keyed dropout: input must be contiguous, got {layout:?}") };
        let dev = x.device().clone();
        let n = (end - start) as u64;
        fn launch<T: DeviceRepr>(dev: &CudaDevice, name: &str, src: &CudaSlice<T>, start: usize, n: u64, k: (u32, u32, u32, f32)) -> Result<CudaSlice<T>> {
            let func = dev.get_or_load_custom_func(name, "freeski_dropout", DROPOUT_PTX)?;
            // SAFETY: every element is written by the kernel below.
            let out = unsafe { dev.alloc::<T>(n as usize)? };
            let src = src.slice(start..start + n as usize);
            let (k0, k1, threshold, scale) = k;
            let stream = dev.cuda_stream();
            let (sp, op) = (src.device_ptr(&stream).0, slice_ptr(&out));
            let (vec, cfg) = dropout_launch(n, std::mem::size_of::<T>(), &[sp, op]);
            let mut b = func.builder();
            b.arg(&n).arg(&k0).arg(&k1).arg(&threshold).arg(&scale).arg(&sp).arg(&op).arg(&vec);
            // SAFETY: (uint64_t, uint32_t ×3, float, const T*, T*, int) as declared in
            // dropout.cu; both buffers hold n elements, and vec only with the alignment it needs.
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

    /// `add + dropout(x)` (`keyed_dropout_add_<dtype>`: the mask of [`keyed_dropout`] with the
    /// same key, the sum rounded once) for contiguous `x` and `add` of one shape and dtype on
    /// CUDA. `None` for other devices or dtypes.
    pub fn keyed_dropout_add(x: &Tensor, add: &Tensor, k0: u32, k1: u32, threshold: u32, scale: f32) -> Result<Option<Tensor>> {
        let Device::Cuda(dev) = x.device() else { return Ok(None) };
        if !matches!(x.dtype(), DType::F32 | DType::BF16 | DType::F16) || add.dtype() != x.dtype() || !add.device().same_device(x.device()) {
            return Ok(None);
        }
        if x.shape() != add.shape() {
            bail!("keyed dropout-add: {:?} plus {:?}", add.shape(), x.shape())
        }
        let (x, add) = (x.contiguous()?, add.contiguous()?);
        let (_, suffix) = train_target(&x)?;
        let y = empty(dev, x.dtype(), x.shape())?;
        let n = x.elem_count() as u64;
        let func = dev.get_or_load_custom_func(&format!("keyed_dropout_add_{suffix}"), "freeski_dropout", DROPOUT_PTX)?;
        let ptrs = [tensor_ptr(&x)?, tensor_ptr(&add)?, tensor_ptr(&y)?];
        let (vec, cfg) = dropout_launch(n, x.dtype().size_in_bytes(), &ptrs);
        let mut b = func.builder();
        b.arg(&n).arg(&k0).arg(&k1).arg(&threshold).arg(&scale);
        for ptr in &ptrs {
            b.arg(ptr);
        }
        b.arg(&vec);
        // SAFETY: (uint64_t, uint32_t ×3, float, const T* ×2, T*, int) as declared in
        // dropout.cu; the three buffers hold n elements each (shapes checked above), and vec
        // only with the alignment it needs.
        unsafe { b.launch(cfg) }.w()?;
        Ok(Some(y))
    }

    // ---------------------------------------------------------------------------------------
    // Fused training backwards (`train.cu`).

    /// The CUDA device of `t`, and the kernel-name suffix of its dtype.
    fn train_target(t: &Tensor) -> Result<(CudaDevice, &'static str)> {
        let Device::Cuda(dev) = t.device() else { bail!("expected a CUDA tensor, got one on {:?}", t.device().location()) };
        let suffix = match t.dtype() {
            DType::F32 => "f32",
            DType::BF16 => "bf16",
            DType::F16 => "f16",
            other => bail!("training kernels take f32, bf16 or f16, not {other:?}"),
        };
        Ok((dev.clone(), suffix))
    }

    /// An uninitialised tensor for a kernel that writes every element.
    fn empty(dev: &CudaDevice, dtype: DType, shape: &candle_core::Shape) -> Result<Tensor> {
        let n = shape.elem_count();
        // SAFETY (each arm): the caller's kernel writes all `n` elements before any is read.
        Ok(match dtype {
            DType::F32 => tensor_from_slice(unsafe { dev.alloc::<f32>(n)? }, dev, shape.clone()),
            DType::BF16 => tensor_from_slice(unsafe { dev.alloc::<half::bf16>(n)? }, dev, shape.clone()),
            DType::F16 => tensor_from_slice(unsafe { dev.alloc::<half::f16>(n)? }, dev, shape.clone()),
            other => bail!("training kernels take f32, bf16 or f16, not {other:?}"),
        })
    }

    /// Contiguous copies (or the tensors themselves) of `ts`, all of `like`'s dtype and shape.
    fn operands(like: &Tensor, ts: &[&Tensor]) -> Result<Vec<Tensor>> {
        ts.iter()
            .map(|t| {
                if t.dims() != like.dims() || t.dtype() != like.dtype() {
                    bail!("training kernel operands differ: {:?} {:?} vs {:?} {:?}", t.shape(), t.dtype(), like.shape(), like.dtype())
                }
                t.contiguous()
            })
            .collect()
    }

    /// `x: [b, t, heads·hd]` (rows at any stride, as a projection's output) rotated pair by pair
    /// with `cos`/`sin: [t, hd/2]` and scaled, as `[b, heads, t, hd]` (`rope_heads_bf16` in
    /// train.cu: the transpose, the rotation and the scale in one pass). `None` unless all three
    /// are bf16 on one CUDA device and every pair starts 4-byte aligned.
    pub fn rope_heads(x: &Tensor, heads: usize, cos: &Tensor, sin: &Tensor, scale: f32) -> Result<Option<Tensor>> {
        let Device::Cuda(dev) = x.device() else { return Ok(None) };
        let same = x.device().same_device(cos.device()) && x.device().same_device(sin.device());
        if !same || [x.dtype(), cos.dtype(), sin.dtype()] != [DType::BF16; 3] {
            return Ok(None);
        }
        let (b, t, width) = x.dims3()?;
        let hd = width / heads.max(1);
        if heads == 0 || hd * heads != width || !hd.is_multiple_of(2) || cos.dims() != [t, hd / 2] || sin.dims() != [t, hd / 2] {
            bail!("rope_heads: x {:?} as {heads} heads, cos {:?}, sin {:?}", x.dims(), cos.dims(), sin.dims())
        }
        let (x, x_row) = strided_rows(x)?;
        let xp = first_element_ptr(&x)?;
        if !xp.is_multiple_of(4) || x_row % 2 != 0 {
            return Ok(None);
        }
        let (cos, sin) = (cos.contiguous()?, sin.contiguous()?);
        let y = empty(dev, DType::BF16, &candle_core::Shape::from((b, heads, t, hd)))?;
        let what = "rope_heads";
        let (bi, ti, hi, hdi) = (kernel_int(b, what)?, kernel_int(t, what)?, kernel_int(heads, what)?, kernel_int(hd, what)?);
        let pairs = (y.elem_count() / 2) as u64;
        let func = dev.get_or_load_custom_func("rope_heads_bf16", "freeski_train", TRAIN_PTX)?;
        let p = [xp, tensor_ptr(&cos)?, tensor_ptr(&sin)?, tensor_ptr(&y)?];
        let mut bld = func.builder();
        for ptr in &p {
            bld.arg(ptr);
        }
        bld.arg(&bi).arg(&ti).arg(&hi).arg(&hdi).arg(&x_row).arg(&scale);
        if pairs > 0 {
            // SAFETY: (const bf16* ×3, bf16*, int ×4, long long, float) as declared in train.cu;
            // x holds b·t rows of heads·hd at stride x_row, cos/sin t·hd/2 values, y every
            // pair the kernel writes; pairs start 4-byte aligned (checked above).
            unsafe { bld.launch(elementwise_launch(pairs)) }.w()?;
        }
        Ok(Some(y))
    }

    /// `(dg, du)` of `m = silu(g) ∘ u` from `dm`.
    pub fn silu_mul_backward(g: &Tensor, u: &Tensor, dm: &Tensor) -> Result<(Tensor, Tensor)> {
        let (dev, sfx) = train_target(g)?;
        let ops = operands(g, &[g, u, dm])?;
        let (dg, du) = (empty(&dev, g.dtype(), g.shape())?, empty(&dev, g.dtype(), g.shape())?);
        let n = g.elem_count() as u64;
        let p = [tensor_ptr(&ops[0])?, tensor_ptr(&ops[1])?, tensor_ptr(&ops[2])?, tensor_ptr(&dg)?, tensor_ptr(&du)?];
        let func = dev.get_or_load_custom_func(&format!("silu_mul_bwd_{sfx}"), "freeski_train", TRAIN_PTX)?;
        let mut b = func.builder();
        b.arg(&n);
        for ptr in &p {
            b.arg(ptr);
        }
        let cfg = elementwise_launch(n);
        // SAFETY: (uint64_t, const T* ×3, T* ×2) as declared in train.cu; the buffers hold n elements.
        unsafe { b.launch(cfg) }.w()?;
        Ok((dg, du))
    }

    /// `dx` of `y = rms_norm(x, w, eps)` over the last dim from `g`, plus `resid` if given.
    pub fn rms_norm_backward(x: &Tensor, w: &Tensor, eps: f32, g: &Tensor, resid: Option<&Tensor>) -> Result<Tensor> {
        let (dev, sfx) = train_target(x)?;
        let cols = x.dim(candle_core::D::Minus1)?;
        if w.dims() != [cols] || w.dtype() != x.dtype() {
            bail!("rms_norm_backward: weight {:?} {:?} for rows of {cols} {:?}", w.shape(), w.dtype(), x.dtype())
        }
        let mut list = vec![x, g];
        list.extend(resid);
        let ops = operands(x, &list)?;
        let w = w.contiguous()?;
        let dx = empty(&dev, x.dtype(), x.shape())?;
        let rows = (x.elem_count() / cols.max(1)) as u32;
        let resid_ptr = if resid.is_some() { tensor_ptr(&ops[2])? } else { 0u64 };
        let (cols32, xp, wp, gp, dxp) = (cols as i32, tensor_ptr(&ops[0])?, tensor_ptr(&w)?, tensor_ptr(&ops[1])?, tensor_ptr(&dx)?);
        let func = dev.get_or_load_custom_func(&format!("rms_norm_bwd_{sfx}"), "freeski_train", TRAIN_PTX)?;
        let mut b = func.builder();
        b.arg(&cols32).arg(&eps).arg(&xp).arg(&wp).arg(&gp).arg(&resid_ptr).arg(&dxp);
        let cfg = LaunchConfig { grid_dim: (rows.max(1), 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        // SAFETY: (int, float, const T* ×4 (resid may be null), T*) as declared in train.cu.
        unsafe { b.launch(cfg) }.w()?;
        Ok(dx)
    }

    /// `dx` of `y = softmax(x)` over the last dim, from `y` and `g`.
    pub fn softmax_backward(y: &Tensor, g: &Tensor) -> Result<Tensor> {
        let (dev, sfx) = train_target(y)?;
        let ops = operands(y, &[y, g])?;
        let cols = y.dim(candle_core::D::Minus1)?;
        let rows = (y.elem_count() / cols.max(1)) as u64;
        let dx = empty(&dev, y.dtype(), y.shape())?;
        let (cols32, yp, gp, dxp) = (cols as i32, tensor_ptr(&ops[0])?, tensor_ptr(&ops[1])?, tensor_ptr(&dx)?);
        let func = dev.get_or_load_custom_func(&format!("softmax_bwd_{sfx}"), "freeski_train", TRAIN_PTX)?;
        let mut b = func.builder();
        b.arg(&rows).arg(&cols32).arg(&yp).arg(&gp).arg(&dxp);
        // 8 rows (one a warp) a block.
        let cfg = LaunchConfig { grid_dim: (rows.div_ceil(8).max(1) as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        // SAFETY: (uint64_t, int, const T* ×2, T*) as declared in train.cu.
        unsafe { b.launch(cfg) }.w()?;
        Ok(dx)
    }

    /// `AdamWArgs` of `train.cu`.
    #[repr(C)]
    #[derive(Debug, Clone, Copy)]
    pub struct AdamWArgs {
        pub lr: f32,
        pub beta1: f32,
        pub beta2: f32,
        pub eps: f32,
        /// `1 − lr · weight_decay`.
        pub decay: f32,
        /// Bias corrections `1 − β₁ᵗ`, `1 − β₂ᵗ`.
        pub bc1: f32,
        pub bc2: f32,
        /// Factor on the gradient (clipping).
        pub gscale: f32,
        /// Seeds of the moments' stochastic rounding to bf16.
        pub seed_m: u32,
        pub seed_v: u32,
    }
    // SAFETY: plain 4-byte fields, the C struct's layout.
    unsafe impl DeviceRepr for AdamWArgs {}

    /// One AdamW update of f32 `p` and its bf16 moments `m`, `v` in place, with gradient `g`
    /// (f32, any layout) times `args.gscale`. `p`, `m` and `v` must be contiguous; every tensor
    /// sharing their storage sees the new values (as with `Var::set`).
    pub fn adamw_in_place(p: &Tensor, g: &Tensor, m: &Tensor, v: &Tensor, args: AdamWArgs) -> Result<()> {
        let (dev, sfx) = train_target(p)?;
        if sfx != "f32" || g.dtype() != DType::F32 || [m, v].iter().any(|t| t.dtype() != DType::BF16) {
            bail!("adamw kernel: f32 parameters and gradients with bf16 moments, got {:?}, {:?}, {:?}", p.dtype(), g.dtype(), m.dtype())
        }
        if [g, m, v].iter().any(|t| t.shape() != p.shape()) {
            bail!("adamw kernel: gradient or moments of another shape than the parameters {:?}", p.shape())
        }
        let g = g.contiguous()?;
        let n = p.elem_count() as u64;
        let ptrs = [tensor_ptr(p)?, tensor_ptr(&g)?, tensor_ptr(m)?, tensor_ptr(v)?];
        let func = dev.get_or_load_custom_func("adamw_f32", "freeski_train", TRAIN_PTX)?;
        let mut b = func.builder();
        b.arg(&n).arg(&args);
        for ptr in &ptrs {
            b.arg(ptr);
        }
        let cfg = elementwise_launch(n);
        // SAFETY: (uint64_t, AdamWArgs, float*, const float*, uint16_t* ×2) as declared in
        // train.cu; the four buffers hold n values each (shapes checked above).
        unsafe { b.launch(cfg) }.w()?;
        Ok(())
    }
}

#[cfg(feature = "cuda")]
pub use cuda::*;
#[cfg(feature = "cuda")]
mod gemm;
#[cfg(feature = "cuda")]
pub use gemm::{gemm_bf16_f32, matmul_accumulate, matmul_add};

/// The kernels that answer "where one applies" (`Ok(None)`: take another path), for a build
/// without CUDA: none applies, so callers need no `cfg` of their own.
#[cfg(not(feature = "cuda"))]
mod without_cuda {
    use candle_core::quantized::QTensor;
    use candle_core::{DType, Result, Tensor};

    pub fn dequantize(_: &QTensor, _: DType) -> Result<Option<Tensor>> {
        Ok(None)
    }
    pub fn dequantize_many(_: &[&QTensor], _: DType) -> Result<Option<Tensor>> {
        Ok(None)
    }
    pub fn int8_mma_matmul(_: &QTensor, _: &Tensor) -> Result<Option<Tensor>> {
        Ok(None)
    }
    pub fn f16_mma_matmul(_: &[&QTensor], _: &Tensor, _: Option<&Tensor>) -> Result<Option<Tensor>> {
        Ok(None)
    }
    pub fn gemm_bf16_f32(_: &Tensor, _: &Tensor, _: Option<&Tensor>) -> Result<Option<Tensor>> {
        Ok(None)
    }
    pub fn keyed_dropout_add(_: &Tensor, _: &Tensor, _: u32, _: u32, _: u32, _: f32) -> Result<Option<Tensor>> {
        Ok(None)
    }
    pub fn matmul_add(_: &Tensor, _: &Tensor, _: Option<&Tensor>, _: f32, _: DType) -> Result<Option<Tensor>> {
        Ok(None)
    }
    pub fn matmul_accumulate(_: &Tensor, _: &Tensor, _: f32, _: &Tensor) -> Result<bool> {
        Ok(false)
    }
    pub fn causal_softmax(_: &Tensor, _: usize, _: f32, _: usize) -> Result<Option<Tensor>> {
        Ok(None)
    }
    pub fn silu_mul(_: &Tensor, _: &Tensor) -> Result<Option<Tensor>> {
        Ok(None)
    }
    pub fn rope_heads(_: &Tensor, _: usize, _: &Tensor, _: &Tensor, _: f32) -> Result<Option<Tensor>> {
        Ok(None)
    }
    pub fn silu_mul_pair(_: &Tensor, _: &Tensor, _: DType) -> Result<Option<(Tensor, Tensor)>> {
        Ok(None)
    }
    pub fn rms_norm_pair(_: &Tensor, _: &Tensor, _: f32, _: DType) -> Result<Option<(Tensor, Tensor)>> {
        Ok(None)
    }
    pub fn rope_prompt(_: &Tensor, _: &Tensor, _: &Tensor, _: (&Tensor, &Tensor), _: (&Tensor, &Tensor), _: usize, _: usize) -> Result<Option<Tensor>> {
        Ok(None)
    }
    pub fn prompt_attention(_: &Tensor, _: &Tensor, _: &Tensor, _: f32, _: usize, _: super::AttnPrecision) -> Result<Option<Tensor>> {
        Ok(None)
    }
    pub fn prompt_attention_pair(_: &Tensor, _: &Tensor, _: &Tensor, _: f32, _: usize, _: super::AttnPrecision, _: DType) -> Result<Option<(Tensor, Tensor)>> {
        Ok(None)
    }
}
#[cfg(not(feature = "cuda"))]
pub use without_cuda::*;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matmul_dims_keep_leading_axes_and_refuse_a_wrong_width() -> candle_core::Result<()> {
        let x = Tensor::zeros((2, 3, 8), candle_core::DType::F32, &candle_core::Device::Cpu)?;
        assert_eq!(matmul_dims(&x, 8, 5)?, (6, vec![2, 3, 5]));
        let err = matmul_dims(&x, 7, 5).expect_err("a width of 8 against 7 inputs");
        assert!(err.to_string().contains("[2, 3, 8] does not end in the weight's 7 inputs"), "{err}");
        Ok(())
    }

    #[test]
    fn matvec_blocks_cover_every_output() {
        // 4 warps × 2 rows a block.
        assert_eq!(matvec_blocks(4096, false), 512);
        assert_eq!(matvec_blocks(9, false), 2);
        // GLU: a warp's two slots are one output's gate and up rows.
        assert_eq!(matvec_blocks(14336, true), 3584);
        assert_eq!(matvec_blocks(1, true), 1);
        // Tensor-core tiles: 16 weight rows, 8 outputs of gate and up in GLU mode.
        assert_eq!(mma_matvec_blocks(4096, false), 256);
        assert_eq!(mma_matvec_blocks(17, false), 2);
        assert_eq!(mma_matvec_blocks(14336, true), 1792);
        assert!(quant_kind(GgmlDType::Q4_1).is_none());
        assert_eq!(quant_kind(GgmlDType::Q4K).map(|k| k.suffix), Some("q4k"));
    }
}
