//! bf16 GEMMs on CUDA through cuBLASLt, accumulated in f32, with an addend summed in the GEMM's
//! own epilogue (`D = alpha·A·B + C`, `C` apart from `D`, which plain cuBLAS cannot do), so a
//! residual add, a LoRA term or a gradient sum costs no kernel of its own:
//! * the prompt projections (`gemm_bf16_f32`: f32 output, the residual stream as the addend);
//! * the training step's projections and gradients (`matmul_add`: bf16 or f32 output, either
//!   operand read transposed in place; `matmul_accumulate`: summed into a buffer in place).

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
    algos: HashMap<AlgoKey, sys::cublasLtMatmulAlgo_t>,
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
    let (Device::Cuda(_), true) = (x.device(), x.device().same_device(w.device())) else { return Ok(None) };
    if x.dtype() != DType::BF16 || w.dtype() != DType::BF16 {
        return Ok(None);
    }
    let (n, k) = w.dims2()?;
    let (m, dims) = super::matmul_dims(x, k, n)?;
    if let Some(a) = add.filter(|a| a.dims() != dims.as_slice()) {
        bail!("bf16 GEMM: addend {:?} for an output {dims:?}", a.dims())
    }
    let y = matmul_add(&x.reshape((m, k))?, &w.t()?, add.map(|a| a.reshape((m, n))).transpose()?.as_ref(), 1.0, DType::F32)?;
    y.map(|y| y.reshape(dims)).transpose()
}

/// `alpha · a · b + add` for bf16 `a: [m, k]` and `b: [k, n]` on CUDA, accumulated in f32 and
/// written as `out` (bf16 or f32; `add`, when given, is `[m, n]` of that dtype and summed in
/// the GEMM's epilogue). Each operand may be row-major with any row stride (a column slice) or
/// the transpose of one (`.t()` of a contiguous tensor): no copy is made for either. `None`
/// unless both are bf16 on one CUDA device.
pub fn matmul_add(a: &Tensor, b: &Tensor, add: Option<&Tensor>, alpha: f32, out: DType) -> Result<Option<Tensor>> {
    let Device::Cuda(dev) = a.device() else { return Ok(None) };
    if !a.device().same_device(b.device()) || a.dtype() != DType::BF16 || b.dtype() != DType::BF16 || !matches!(out, DType::BF16 | DType::F32) {
        return Ok(None);
    }
    let ((m, k), (kb, n)) = (a.dims2()?, b.dims2()?);
    if k != kb {
        bail!("GEMM: [{m}, {k}] · [{kb}, {n}]")
    }
    let add = match add {
        Some(c) if c.dims() != [m, n] || c.dtype() != out || !c.device().same_device(a.device()) => {
            bail!("GEMM: addend {:?} {:?} for an output [{m}, {n}] {out:?}", c.dims(), c.dtype())
        }
        Some(c) => Some(c.contiguous()?),
        None => None,
    };
    // SAFETY (both arms): the GEMM below writes every [m, n] element (m·n = 0 writes none and
    // reads none).
    let y = match out {
        DType::BF16 => tensor_from_slice(unsafe { dev.alloc::<half::bf16>(m * n)? }, dev, (m, n)),
        _ => tensor_from_slice(unsafe { dev.alloc::<f32>(m * n)? }, dev, (m, n)),
    };
    let beta = if add.is_some() { 1.0 } else { 0.0 };
    let c = add.as_ref().unwrap_or(&y);
    Ok(gemm_or_copied(dev, a, b, c, &y, alpha, beta)?.then_some(y))
}

/// `acc += alpha · a · b` in place, for bf16 `a: [m, k]`, `b: [k, n]` (laid out as
/// [`matmul_add`] takes them) and a contiguous f32 or bf16 `acc: [m, n]` on CUDA (a view into a
/// larger buffer is fine: the gradient accumulator's slices). `false` (nothing done) unless
/// all three are on one CUDA device with those dtypes. The caller must own `acc`'s storage: every
/// tensor sharing it sees the change.
pub fn matmul_accumulate(a: &Tensor, b: &Tensor, alpha: f32, acc: &Tensor) -> Result<bool> {
    let Device::Cuda(dev) = a.device() else { return Ok(false) };
    let same = a.device().same_device(b.device()) && a.device().same_device(acc.device());
    if !same || a.dtype() != DType::BF16 || b.dtype() != DType::BF16 || !matches!(acc.dtype(), DType::BF16 | DType::F32) {
        return Ok(false);
    }
    let ((m, k), (kb, n)) = (a.dims2()?, b.dims2()?);
    if k != kb || acc.dims() != [m, n] || !acc.is_contiguous() {
        bail!("GEMM accumulate: [{m}, {k}] · [{kb}, {n}] into {:?} (contiguous: {})", acc.dims(), acc.is_contiguous())
    }
    gemm_or_copied(dev, a, b, acc, acc, alpha, 1.0)
}

/// [`gemm`], and where cuBLASLt has no algorithm for the operands as they lie (an odd offset or
/// row stride), again on fresh row-major copies of them.
fn gemm_or_copied(dev: &CudaDevice, a: &Tensor, b: &Tensor, c: &Tensor, d: &Tensor, alpha: f32, beta: f32) -> Result<bool> {
    if gemm(dev, a, b, c, d, alpha, beta)? {
        return Ok(true);
    }
    gemm(dev, &a.force_contiguous()?, &b.force_contiguous()?, c, d, alpha, beta)
}

/// How cuBLASLt reads a row-major 2-D operand: its address, whether it is stored transposed,
/// and its leading dimension.
struct Operand {
    ptr: u64,
    transposed: bool,
    ld: i32,
}

/// `t: [rows, cols]` row-major with a row stride ≥ cols, or the transpose of such a tensor;
/// otherwise a contiguous copy (kept alive in `keep`).
fn operand(t: &Tensor, keep: &mut Vec<Tensor>) -> Result<Operand> {
    let (rows, cols) = t.dims2()?;
    let what = "GEMM operand";
    let stride = t.stride();
    let (s0, s1) = (stride[0], stride[1]);
    if s1 == 1 && (s0 >= cols || rows == 1) {
        return Ok(Operand { ptr: super::cuda::first_element_ptr(t)?, transposed: false, ld: kernel_int(s0.max(cols), what)? });
    }
    if s0 == 1 && (s1 >= rows || cols == 1) {
        return Ok(Operand { ptr: super::cuda::first_element_ptr(t)?, transposed: true, ld: kernel_int(s1.max(rows), what)? });
    }
    let c = t.contiguous()?;
    let op = Operand { ptr: tensor_ptr(&c)?, transposed: false, ld: kernel_int(cols, what)? };
    keep.push(c);
    Ok(op)
}

fn cuda_type(dtype: DType) -> Result<sys::cudaDataType> {
    Ok(match dtype {
        DType::BF16 => sys::cudaDataType_t::CUDA_R_16BF,
        DType::F32 => sys::cudaDataType_t::CUDA_R_32F,
        other => bail!("GEMM: no {other:?} operands"),
    })
}

/// Row-major `d[m, n] = alpha · a[m, k] · b[k, n] + beta · c[m, n]` (`c` and `d` contiguous,
/// one dtype; `c` may be `d`). cuBLASLt is column-major, so it computes `dᵀ = bᵀ · aᵀ`: a
/// row-major `b` is `bᵀ` column-major as it is stored, a transposed one is read with op T, and
/// likewise `a`. `false` (nothing written) where cuBLASLt has no algorithm for the layouts.
fn gemm(dev: &CudaDevice, a: &Tensor, b: &Tensor, c: &Tensor, d: &Tensor, alpha: f32, beta: f32) -> Result<bool> {
    let ((m, k), (_, n)) = (a.dims2()?, b.dims2()?);
    if m == 0 || n == 0 {
        return Ok(true);
    }
    let what = "GEMM";
    let (mi, ni, ki) = (kernel_int(m, what)?, kernel_int(n, what)?, kernel_int(k, what)?);
    let mut keep = Vec::new();
    let (ao, bo) = (operand(a, &mut keep)?, operand(b, &mut keep)?);
    let (cp, dp) = (tensor_ptr(c)?, tensor_ptr(d)?);
    let mut handles = HANDLES.lock().map_err(|_| candle_core::Error::Msg("cuBLASLt handles poisoned by a panic".into()))?;
    let at = match handles.iter().position(|(id, _)| *id == dev.id()) {
        Some(at) => at,
        None => {
            handles.push((dev.id(), new_handle(dev)?));
            handles.len() - 1
        }
    };
    let lt_state = &mut handles[at].1;
    let (in_t, out_t) = (cuda_type(a.dtype())?, cuda_type(d.dtype())?);
    // The first operand is b: stored [k, n] row-major it is [n, k] column-major (op N); stored
    // transposed ([n, k] row-major) it is [k, n] column-major (op T). The second is a, likewise.
    let (b_rows, b_cols) = if bo.transposed { (ki, ni) } else { (ni, ki) };
    let (a_rows, a_cols) = if ao.transposed { (mi, ki) } else { (ki, mi) };
    let (a_l, b_l, c_l) = (layout(in_t, b_rows, b_cols, bo.ld)?, layout(in_t, a_rows, a_cols, ao.ld)?, layout(out_t, ni, mi, ni)?);
    let desc =
        Owned(lt::create_matmul_desc(sys::cublasComputeType_t::CUBLAS_COMPUTE_32F, sys::cudaDataType_t::CUDA_R_32F).map_err(|e| lt_err("descriptor", e))?, lt::destroy_matmul_desc);
    use sys::cublasLtMatmulDescAttributes_t as Attr;
    for (attr, transposed) in [(Attr::CUBLASLT_MATMUL_DESC_TRANSA, bo.transposed), (Attr::CUBLASLT_MATMUL_DESC_TRANSB, ao.transposed)] {
        // cublasOperation_t: 0 is CUBLAS_OP_N, 1 is CUBLAS_OP_T.
        let op = i32::from(transposed);
        // SAFETY: a live descriptor; the attribute is a 32-bit cublasOperation_t read from `op`.
        unsafe { lt::set_matmul_desc_attribute(desc.0, attr, (&op as *const i32).cast(), std::mem::size_of::<i32>()) }.map_err(|e| lt_err("transpose", e))?;
    }
    // The heuristic assumes 256-byte aligned operands unless told otherwise (views into a
    // larger tensor can start anywhere on an element).
    let align = [bo.ptr, ao.ptr, cp, dp].iter().map(|p| 1u32 << p.trailing_zeros().min(8)).min().unwrap_or(256);
    let key = AlgoKey { m: mi, n: ni, k: ki, lds: (ao.ld, bo.ld), trans: (ao.transposed, bo.transposed), out: d.dtype(), add: beta != 0.0, align };
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
            match unsafe { lt::get_matmul_algo_heuristic(lt_state.handle, desc.0, a_l.0, b_l.0, c_l.0, c_l.0, pref.0) } {
                Ok(h) => {
                    lt_state.algos.insert(key, h.algo);
                    h.algo
                }
                Err(e) => {
                    tracing::debug!("cuBLASLt has no algorithm for {m}x{n}x{k} {key:?}: {e:?}");
                    return Ok(false);
                }
            }
        }
    };
    let stream = dev.cuda_stream();
    // SAFETY: a, b, c and d are live device buffers holding the [m, k], [k, n], [m, n] and
    // [m, n] elements their layouts describe (c may be d); the workspace is this handle's own;
    // the GEMM runs on the device's stream, the one that wrote its inputs.
    unsafe {
        lt::matmul(
            lt_state.handle,
            desc.0,
            (&alpha as *const f32).cast(),
            (&beta as *const f32).cast(),
            bo.ptr as *const std::ffi::c_void,
            a_l.0,
            ao.ptr as *const std::ffi::c_void,
            b_l.0,
            cp as *const std::ffi::c_void,
            c_l.0,
            dp as *mut std::ffi::c_void,
            c_l.0,
            &algo,
            slice_ptr(&lt_state.workspace) as *mut std::ffi::c_void,
            lt_state.workspace.len(),
            stream.cu_stream() as sys::cudaStream_t,
        )
    }
    .map_err(|e| lt_err("matmul", e))?;
    Ok(true)
}

/// What an algorithm choice depends on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct AlgoKey {
    m: i32,
    n: i32,
    k: i32,
    lds: (i32, i32),
    trans: (bool, bool),
    out: DType,
    add: bool,
    align: u32,
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
