//! The prompt projections' GEMM on CUDA, through cuBLASLt: bf16 operands, f32 accumulation and
//! output, and optionally an f32 addend (the residual stream) summed in the GEMM's own epilogue
//! (`D = x·wᵀ + C` with `C` apart from `D`, which plain cuBLAS cannot do), so a residual add
//! costs no kernel of its own.

use std::collections::HashMap;
use std::sync::Mutex;

use candle_core::cuda_backend::cudarc::cublaslt::{result as lt, sys};
use candle_core::cuda_backend::cudarc::driver::sys::CUdevice_attribute;
use candle_core::cuda_backend::cudarc::driver::CudaSlice;
use candle_core::cuda_backend::{DeviceId, WrapErr};
use candle_core::{bail, CudaDevice, DType, Device, Result, Tensor};

use super::cuda::{kernel_int, slice_ptr, tensor_from_slice, tensor_ptr};

/// One cuBLASLt handle a device, with its workspace and the algorithm chosen for each shape.
struct Lt {
    handle: sys::cublasLtHandle_t,
    workspace: CudaSlice<u8>,
    /// By shape, addend or not, and the operands' common alignment in bytes.
    algos: HashMap<(i32, i32, i32, bool, u32), sys::cublasLtMatmulAlgo_t>,
}

// SAFETY: the handle is only used while the mutex below is held.
unsafe impl Send for Lt {}

/// Handles live as long as the process (a few devices at most).
static HANDLES: Mutex<Vec<(DeviceId, Lt)>> = Mutex::new(Vec::new());

fn lt_err(what: &str, e: lt::CublasError) -> candle_core::Error {
    candle_core::Error::Msg(format!("cuBLASLt {what}: {e:?}"))
}

/// A cuBLASLt descriptor destroyed when dropped.
struct Owned<T: Copy>(T, unsafe fn(T) -> std::result::Result<(), lt::CublasError>);

impl<T: Copy> Drop for Owned<T> {
    fn drop(&mut self) {
        // SAFETY: created by the matching create call and destroyed once, here.
        let _ = unsafe { (self.1)(self.0) };
    }
}

fn layout(dtype: sys::cudaDataType, rows: i32, cols: i32, ld: i32) -> Result<Owned<sys::cublasLtMatrixLayout_t>> {
    let l = lt::create_matrix_layout(dtype, rows as u64, cols as u64, ld as i64).map_err(|e| lt_err("layout", e))?;
    Ok(Owned(l, lt::destroy_matrix_layout))
}

/// `x · wᵀ (+ add)` for bf16 `x: [.., k]` and `w: [n, k]` on CUDA, `add` (f32, `x`'s leading
/// shape with `n` last) summed in the epilogue: the product is accumulated in f32 and written
/// in f32, never rounded to bf16. `None` unless both operands are bf16 tensors on one CUDA
/// device.
pub fn gemm_bf16_f32(x: &Tensor, w: &Tensor, add: Option<&Tensor>) -> Result<Option<Tensor>> {
    let (Device::Cuda(dev), true) = (x.device(), x.device().same_device(w.device())) else { return Ok(None) };
    if x.dtype() != DType::BF16 || w.dtype() != DType::BF16 {
        return Ok(None);
    }
    let (n, k) = w.dims2()?;
    let (m, dims) = super::matmul_dims(x, k, n)?;
    let what = "bf16 GEMM";
    let (mi, ni, ki) = (kernel_int(m, what)?, kernel_int(n, what)?, kernel_int(k, what)?);
    let (x, w) = (x.contiguous()?, w.contiguous()?);
    let add = match add {
        Some(a) if a.dims() != dims.as_slice() || a.dtype() != DType::F32 || !a.device().same_device(x.device()) => {
            bail!("bf16 GEMM: addend {:?} {:?} for an output {dims:?} f32", a.dims(), a.dtype())
        }
        Some(a) => Some(a.contiguous()?),
        None => None,
    };
    // SAFETY: the GEMM below writes every [m, n] element.
    let y = unsafe { dev.alloc::<f32>(m * n)? };
    if m > 0 && n > 0 {
        let c = add.as_ref().map(tensor_ptr).transpose()?.unwrap_or(slice_ptr(&y));
        run(dev, (mi, ni, ki), (tensor_ptr(&w)?, tensor_ptr(&x)?, c, slice_ptr(&y)), add.is_some())?;
    }
    Ok(Some(tensor_from_slice(y, dev, dims)))
}

/// Row-major `y[m, n] = x[m, k] · w[n, k]ᵀ (+ c)` is column-major `yᵀ = op(w)·xᵀ`: `w` stored
/// `[k, n]` (ld k) transposed, `x` stored `[k, m]` (ld k) as it is, `c` and `y` `[n, m]` (ld n).
fn run(dev: &CudaDevice, (m, n, k): (i32, i32, i32), (w, x, c, y): (u64, u64, u64, u64), add: bool) -> Result<()> {
    let mut handles = HANDLES.lock().map_err(|_| candle_core::Error::Msg("cuBLASLt handles poisoned by a panic".into()))?;
    let at = match handles.iter().position(|(id, _)| *id == dev.id()) {
        Some(at) => at,
        None => {
            handles.push((dev.id(), new_handle(dev)?));
            handles.len() - 1
        }
    };
    let lt_state = &mut handles[at].1;
    let bf16 = sys::cudaDataType_t::CUDA_R_16BF;
    let f32t = sys::cudaDataType_t::CUDA_R_32F;
    let (a_l, b_l, c_l) = (layout(bf16, k, n, k)?, layout(bf16, k, m, k)?, layout(f32t, n, m, n)?);
    let desc = Owned(lt::create_matmul_desc(sys::cublasComputeType_t::CUBLAS_COMPUTE_32F, f32t).map_err(|e| lt_err("descriptor", e))?, lt::destroy_matmul_desc);
    // cublasOperation_t: 1 is CUBLAS_OP_T.
    let trans = 1i32;
    // SAFETY: a live descriptor; the attribute is a 32-bit cublasOperation_t read from `trans`.
    unsafe { lt::set_matmul_desc_attribute(desc.0, sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSA, (&trans as *const i32).cast(), std::mem::size_of::<i32>()) }
        .map_err(|e| lt_err("transpose", e))?;
    // The heuristic assumes 256-byte aligned operands unless told otherwise (views into a
    // larger tensor can start anywhere on an element).
    let align = [w, x, c, y].iter().map(|p| 1u32 << p.trailing_zeros().min(8)).min().unwrap_or(256);
    let key = (m, n, k, add, align);
    let algo = match lt_state.algos.get(&key) {
        Some(a) => *a,
        None => {
            let pref = Owned(lt::create_matmul_pref().map_err(|e| lt_err("preference", e))?, lt::destroy_matmul_pref);
            let bytes = lt_state.workspace.len() as u64;
            // SAFETY: a live preference; the attribute is a u64 read from `bytes`.
            unsafe {
                lt::set_matmul_pref_attribute(
                    pref.0,
                    sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                    (&bytes as *const u64).cast(),
                    std::mem::size_of::<u64>(),
                )
            }
            .map_err(|e| lt_err("workspace preference", e))?;
            use sys::cublasLtMatmulPreferenceAttributes_t as P;
            for attr in [
                P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES,
                P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
                P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES,
                P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES,
            ] {
                // SAFETY: a live preference; the attribute is a u32 read from `align`.
                unsafe { lt::set_matmul_pref_attribute(pref.0, attr, (&align as *const u32).cast(), std::mem::size_of::<u32>()) }.map_err(|e| lt_err("alignment preference", e))?;
            }
            // SAFETY: live handle, descriptor, layouts and preference.
            let h = unsafe { lt::get_matmul_algo_heuristic(lt_state.handle, desc.0, a_l.0, b_l.0, c_l.0, c_l.0, pref.0) }
                .map_err(|e| lt_err(&format!("no algorithm for {m}x{n}x{k}"), e))?;
            lt_state.algos.insert(key, h.algo);
            h.algo
        }
    };
    let (alpha, beta) = (1f32, if add { 1f32 } else { 0f32 });
    let stream = dev.cuda_stream();
    // SAFETY: w, x, c and y are live device buffers of [n, k], [m, k], [m, n] and [m, n]
    // elements (c may be y when beta is 0); the workspace is this handle's own; the GEMM runs on
    // the device's stream, the one that wrote its inputs.
    unsafe {
        lt::matmul(
            lt_state.handle,
            desc.0,
            (&alpha as *const f32).cast(),
            (&beta as *const f32).cast(),
            w as *const std::ffi::c_void,
            a_l.0,
            x as *const std::ffi::c_void,
            b_l.0,
            c as *const std::ffi::c_void,
            c_l.0,
            y as *mut std::ffi::c_void,
            c_l.0,
            &algo,
            slice_ptr(&lt_state.workspace) as *mut std::ffi::c_void,
            lt_state.workspace.len(),
            stream.cu_stream() as sys::cudaStream_t,
        )
    }
    .map_err(|e| lt_err("matmul", e))
}

/// A handle and its workspace (32 MiB on Hopper and later, 4 MiB before, as NVIDIA advises).
fn new_handle(dev: &CudaDevice) -> Result<Lt> {
    let stream = dev.cuda_stream();
    let major = stream.context().attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR).w()?;
    let bytes = if major >= 9 { 32 << 20 } else { 4 << 20 };
    // SAFETY: scratch space for cuBLASLt; never read before it writes it.
    let workspace = unsafe { stream.alloc::<u8>(bytes) }.w()?;
    let handle = lt::create_handle().map_err(|e| lt_err("handle", e))?;
    Ok(Lt { handle, workspace, algos: HashMap::new() })
}
