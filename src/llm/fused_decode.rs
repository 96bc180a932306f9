//! The fused decode step on CUDA: one new token for each of 1 to [`MAX_ROWS`] rows through the
//! whole decoder with the project's own kernels (`src/kernels/quant.cu`, `decode.cu`).
//!
//! Why: a decode step through candle's ops launches ~40 small kernels a layer (and ~6 more per
//! LoRA projection), each with its own allocation and host-side bookkeeping, so at batch 1 the
//! GPU mostly waits for the CPU. Here a layer is 10 launches on preallocated buffers, with or
//! without LoRA: prepare (RMSNorm, int8 quantization and LoRA `u = A·x` for the projections
//! sharing the input, one kernel), one matvec for q|k|v, rotary + KV append, attention, prepare,
//! the o matvec with the residual added, prepare, one matvec for gate and up that writes
//! `silu(gate)·up`, prepare, the down matvec with the residual. The matvecs read the 4-bit
//! weights where candle keeps them, take their input as int8 blocks of 32 (as candle's own
//! decode kernels and llama.cpp do: a weight then costs a share of one `dp4a`; Q4_K and Q6_K
//! take groups of 128 sharing a scale, so a half block is summed in integers and scaled once),
//! and add `scale·B·u` in their epilogue. `bench parity` checks this path and candle's against the
//! exact f32 computation.
//!
//! The candle path in `Model::forward` stays the reference and the fallback: prompts, more than
//! [`MAX_ROWS`] rows, weight types without a kernel, and CPU devices all take it.

pub const MAX_ROWS: usize = 8;

#[cfg(feature = "cuda")]
pub use imp::FusedDecoder;

/// Which matvec a weight with a tensor-core kernel (Q4_K, and Q6_K with an even number of blocks
/// a row) takes for 1 and 2 rows.
///
/// A row's output must not depend on how many rows share the step (the same question gives the
/// same answer alone or on a busy bot), so 3-8 rows always take the tensor-core kernel `mvq`.
/// By default (`ExactDp4a`) 1-2 rows take `mvd`: dp4a computing the tensor-core kernel's float
/// operations in its order, so the same bits, with the work laid out for one or two rows (an
/// MMA tile of 8 rows is mostly idle there). `TensorCores` runs `mvq` at 1-2 rows too (the
/// reference the GPU tests hold `mvd` to). `Fastest` takes the generic dp4a kernel `mv`, which
/// sums in its own order (not batch-invariant). `bench generate --row-kernels` compares them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum RowKernels {
    #[default]
    ExactDp4a,
    TensorCores,
    Fastest,
}

/// Without CUDA there is no fused step: the type has no values and `new` never builds one.
#[cfg(not(feature = "cuda"))]
pub enum FusedDecoder {}

#[cfg(not(feature = "cuda"))]
impl FusedDecoder {
    pub fn new(_model: &super::Model) -> anyhow::Result<Option<Self>> {
        Ok(None)
    }

    pub fn launches(&self) -> usize {
        match *self {}
    }

    pub fn set_graphs(&self, _: bool) {
        match *self {}
    }

    pub fn set_row_kernels(&self, _: RowKernels) {
        match *self {}
    }

    pub fn set_overlap(&self, _: bool) -> bool {
        match *self {}
    }

    pub fn step(&self, _: &super::Model, _: &candle_core::Tensor, _: &mut super::KvCache, _: &[Option<&super::lora::LoraAdapter>]) -> anyhow::Result<Option<candle_core::Tensor>> {
        match *self {}
    }
}

#[cfg(feature = "cuda")]
mod imp {
    use std::cell::Cell;
    use std::collections::HashMap;
    use std::ffi::c_void;
    use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU8, AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};

    use anyhow::{ensure, Result};
    use candle_core::cuda_backend::cudarc::driver::{result as cu, sys, CudaFunction, CudaGraph, CudaSlice, DeviceRepr, LaunchConfig};
    use candle_core::cuda_backend::WrapErr;
    use candle_core::{CudaDevice, DType, Device, Tensor};

    use super::{RowKernels, MAX_ROWS};
    use crate::kernels::{matvec_blocks, mma_matvec_blocks, quant_kind, slice_ptr, tensor_from_slice, tensor_ptr, Kernels, QuantKind, MQ_WARPS};
    use crate::llm::lora::{LoraAdapter, LoraPtrs};
    use crate::llm::model::{KvCache, Model, Proj};
    use crate::llm::qlinear::BaseLinear;

    // Argument structs of the kernels, field for field as declared in the .cu files.
    #[repr(C)]
    #[derive(Clone, Copy, Default)]
    struct MvArgs {
        w: [u64; 3],
        /// Per batch row, per segment: the row's adapter's B (0: none).
        lora_b: [[u64; 3]; MAX_ROWS],
        xq: u64,
        xd: u64,
        lora_u: u64,
        residual: u64,
        y: u64,
        seg_end: [i32; 3],
        k: i32,
        n: i32,
        ldy: i32,
        ldu: i32,
        rmax: i32,
        glu: i32,
        r: [i32; MAX_ROWS],
        lora_scale: [f32; MAX_ROWS],
    }
    #[repr(C)]
    struct PrepArgs {
        x: u64,
        norm_w: u64,
        xq: u64,
        xd: u64,
        /// Per batch row, per segment: the row's adapter's A (0: none).
        a: [[u64; 3]; MAX_ROWS],
        u: u64,
        n: i32,
        nb: i32,
        rmax: i32,
        ldu: i32,
        r: [i32; MAX_ROWS],
        eps: f32,
        /// Values sharing an int8 scale: 32, or [`KQUANT_GROUP`] when a K-quant matvec reads it.
        group: i32,
    }
    #[repr(C)]
    struct RopeArgs {
        qkv: u64,
        cos: u64,
        sin: u64,
        pos: u64,
        at: u64,
        k_cache: u64,
        v_cache: u64,
        ldq: i32,
        nh: i32,
        nkv: i32,
        hd: i32,
        cap: i32,
    }
    #[repr(C)]
    struct AttnArgs {
        q: u64,
        k_cache: u64,
        v_cache: u64,
        start: u64,
        at: u64,
        out: u64,
        /// Where the output also goes quantized for the o projection, or 0.
        xq: u64,
        xd: u64,
        ldq: i32,
        nh: i32,
        nkv: i32,
        hd: i32,
        cap: i32,
        window: i32,
        scale: f32,
        group: i32,
    }
    // SAFETY: plain #[repr(C)] structs of integers, passed by value as the kernels declare them.
    unsafe impl DeviceRepr for MvArgs {}
    unsafe impl DeviceRepr for PrepArgs {}
    unsafe impl DeviceRepr for RopeArgs {}
    unsafe impl DeviceRepr for AttnArgs {}

    /// The kernels of one block type, shared by every weight of that type.
    struct TypeKernels {
        /// `mv_<type>_b<n>` for n = 1..=8.
        mv: Vec<CudaFunction>,
        /// The tensor-core matvec `mvq_<type>_b<n>` for n = 1..=8, where the type has one (Q4_K,
        /// Q6_K).
        mma: Vec<CudaFunction>,
        /// `mvd_<type>_b<n>` for n below [`MMA_MIN_ROWS`]: dp4a in the tensor-core kernel's
        /// float order (the same bits), where the type has one.
        mma_order: Vec<CudaFunction>,
        embed: CudaFunction,
        /// The dynamic shared memory `mma` may take, set on its functions the first time a
        /// weight of the type needs a ring (0 until then).
        mma_ring: AtomicU32,
    }

    /// Values sharing one int8 scale in the input of a matvec in the tensor-core order (Q4_K,
    /// Q6_K): a half of their 256-weight blocks, summed in integers and scaled once
    /// (`q4k_half` in quant.cu). Other types take llama.cpp's blocks of 32.
    const KQUANT_GROUP: usize = 128;

    /// The quantization group of the input that `weights` read: [`KQUANT_GROUP`] when any of
    /// them takes the tensor-core order (the others read a scale for each 32 either way).
    fn input_group<'a>(weights: impl IntoIterator<Item = &'a Packed>) -> usize {
        if weights.into_iter().any(|w| w.tensor_core_order) {
            KQUANT_GROUP
        } else {
            32
        }
    }

    /// From this many rows every [`RowKernels`] choice runs the matvec on tensor cores: the dp4a
    /// kernels' instructions grow with the rows (at 8 rows `mv` is issue-bound at a fifth of the
    /// memory bandwidth), the MMA's barely do.
    const MMA_MIN_ROWS: usize = 3;

    /// A packed weight read in place: its address and the kernels for its block type.
    struct Packed {
        ptr: u64,
        rows: usize,
        cols: usize,
        kind: QuantKind,
        f: Arc<TypeKernels>,
        /// Whether its matvecs take the tensor-core order (`mvq`, `mvd`) rather than `mv`'s:
        /// where the type has those kernels and, for Q6_K, its rows hold an even number of
        /// 210-byte blocks (the 1-2 row kernel copies them with 4-byte aligned copies).
        tensor_core_order: bool,
        /// Dynamic shared memory of its tensor-core matvec (`kernels::mq_ring_bytes`).
        ring: u32,
    }

    impl Packed {
        /// `w` as the fused step reads it; `by_type` holds the kernels already loaded per type.
        fn new(k: &Kernels, by_type: &mut HashMap<&'static str, Arc<TypeKernels>>, w: &BaseLinear) -> Result<Option<Self>> {
            let Some(kind) = quant_kind(w.dtype()) else { return Ok(None) };
            let suffix = kind.suffix;
            if !w.in_features().is_multiple_of(32) {
                return Ok(None);
            }
            let f = match by_type.get(suffix) {
                Some(f) => f.clone(),
                None => {
                    let mv = (1..=MAX_ROWS).map(|n| k.quant(&format!("mv_{suffix}_b{n}"))).collect::<candle_core::Result<Vec<_>>>()?;
                    let (mma, mma_order) = match kind.suffix {
                        "q4k" | "q6k" => (
                            (1..=MAX_ROWS).map(|n| k.quant(&format!("mvq_{suffix}_b{n}"))).collect::<candle_core::Result<Vec<_>>>()?,
                            (1..MMA_MIN_ROWS).map(|n| k.quant(&format!("mvd_{suffix}_b{n}"))).collect::<candle_core::Result<Vec<_>>>()?,
                        ),
                        _ => (Vec::new(), Vec::new()),
                    };
                    let f = Arc::new(TypeKernels { mv, mma, mma_order, embed: k.quant(&format!("embed_f32_{suffix}"))?, mma_ring: AtomicU32::new(0) });
                    by_type.insert(suffix, f.clone());
                    f
                }
            };
            let cols = w.in_features();
            let tensor_core_order = !f.mma.is_empty() && (suffix != "q6k" || (cols / 256).is_multiple_of(2));
            let ring = if tensor_core_order { crate::kernels::mq_ring_bytes(w.dtype(), cols) } else { 0 };
            if ring > f.mma_ring.load(Ordering::Relaxed) {
                for mma in &f.mma {
                    // More than the 48 KB a launch gets without asking.
                    mma.set_attribute(sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, ring as i32).w()?;
                }
                f.mma_ring.store(ring, Ordering::Relaxed);
            }
            Ok(Some(Self { ptr: w.qtensor().device_ptr()? as u64, rows: w.out_features(), cols, kind, f, tensor_core_order, ring }))
        }

        fn same_type(&self, other: &Packed) -> bool {
            self.kind == other.kind && self.tensor_core_order == other.tensor_core_order
        }
    }

    struct Layer {
        attn_norm: u64,
        ffn_norm: u64,
        w: Vec<Packed>,
    }

    /// Activation buffers for [`MAX_ROWS`] rows, reused by every step.
    struct Scratch {
        x: CudaSlice<f32>,
        qkv: CudaSlice<f32>,
        att: CudaSlice<f32>,
        act: CudaSlice<f32>,
        /// The next matvec's input as int8 blocks and their scales (one for each 32 values).
        xq: CudaSlice<i8>,
        xd: CudaSlice<f32>,
        /// LoRA `u = A·x`, `[rows, 3·r]`; regrown for a larger rank.
        u: Option<(CudaSlice<f32>, usize)>,
        /// The step's per-token values, written before each step (or its graph) runs:
        /// `[positions (8) | first visible key (8) | cache index of the new token]`.
        ints: CudaSlice<i32>,
        /// The step's input ids and output logits, at fixed addresses for the graph.
        ids: CudaSlice<u32>,
        logits: CudaSlice<f32>,
        /// The last captured step and what it was captured for.
        graph: Option<(Vec<u64>, StepGraph)>,
    }

    /// A captured decode step. CUDA graphs are not thread-safe objects; this one is only
    /// touched under the scratch mutex, which serialises every use.
    struct StepGraph {
        graph: CudaGraph,
        launches: usize,
    }
    // SAFETY: see above; the graph is created, launched and dropped only while the mutex is held.
    unsafe impl Send for StepGraph {}

    pub struct FusedDecoder {
        dev: CudaDevice,
        k: Kernels,
        layers: Vec<Layer>,
        embed: Packed,
        head: Packed,
        final_norm: u64,
        cos: u64,
        sin: u64,
        prep: CudaFunction,
        rope: CudaFunction,
        attn: CudaFunction,
        scratch: Mutex<Scratch>,
        /// Kernel launches of the last step (reported by `bench generate`).
        launches: AtomicUsize,
        /// Replay the step as a CUDA graph (one launch instead of ~320; captured again when the
        /// cache grows, the batch changes or another adapter is active).
        graphs: AtomicBool,
        /// The [`RowKernels`] choice, as its index.
        row_kernels: AtomicU8,
        /// Launch each kernel to start while the one before it finishes (programmatic dependent
        /// launch; on by default where [`Kernels::overlap_supported`]).
        overlap: AtomicBool,
        overlap_supported: bool,
    }

    /// Launches on the decoder's stream, counted for `bench generate`.
    struct Launcher<'a> {
        k: &'a Kernels,
        n: Cell<usize>,
        rows: RowKernels,
        overlap: bool,
    }

    impl Launcher<'_> {
        fn with<A: DeviceRepr>(&self, f: &CudaFunction, cfg: LaunchConfig, args: &A) -> Result<()> {
            self.n.set(self.n.get() + 1);
            Ok(self.k.launch_with(f, cfg, args, self.overlap)?)
        }

        /// The matvec for `w`'s type and `nb` rows: `mvq_body` (tensor cores, tiles of 16
        /// weight rows, 8 warps splitting k), `mvd_body` (dp4a in its order) or `mv_body` in
        /// quant.cu. The last two share a geometry: a warp owns two weight rows.
        fn mv(&self, w: &Packed, nb: usize, a: &MvArgs) -> Result<()> {
            let (glu, n) = (a.glu != 0, a.n as usize);
            let threads = (crate::kernels::MV_WARPS * 32) as u32;
            if w.tensor_core_order {
                match self.rows {
                    RowKernels::ExactDp4a if nb < MMA_MIN_ROWS => return self.with(&w.f.mma_order[nb - 1], grid(matvec_blocks(n, glu), threads), a),
                    RowKernels::Fastest if nb < MMA_MIN_ROWS => {}
                    _ => {
                        let cfg = LaunchConfig { shared_mem_bytes: w.ring, ..grid(mma_matvec_blocks(n, glu), (MQ_WARPS * 32) as u32) };
                        return self.with(&w.f.mma[nb - 1], cfg, a);
                    }
                }
            }
            self.with(&w.f.mv[nb - 1], grid(matvec_blocks(n, glu), threads), a)
        }

        /// Launch with the kernel's parameters one by one (a pointer to each, in order).
        ///
        /// # Safety
        /// `params` must match the kernel's parameter list.
        unsafe fn with_params(&self, f: &CudaFunction, cfg: LaunchConfig, params: &mut [*mut c_void]) -> Result<()> {
            self.n.set(self.n.get() + 1);
            // SAFETY: passed on from the caller; every kernel the step launches waits (pdl_wait).
            Ok(unsafe { self.k.launch_params(f, cfg, params, self.overlap) }?)
        }
    }

    fn grid(blocks: usize, threads: u32) -> LaunchConfig {
        LaunchConfig { grid_dim: (blocks.max(1) as u32, 1, 1), block_dim: (threads, 1, 1), shared_mem_bytes: 0 }
    }

    impl FusedDecoder {
        /// The fused step for `model`, or `None` when it does not apply (not on CUDA, a weight
        /// type without a kernel, a head size over 256).
        pub fn new(model: &Model) -> Result<Option<Self>> {
            let Device::Cuda(dev) = model.device() else { return Ok(None) };
            let cfg = model.config();
            if cfg.head_dim > 256 || !cfg.hidden_size.is_multiple_of(32) || !cfg.intermediate_size.is_multiple_of(32) {
                return Ok(None);
            }
            let k = Kernels::load(dev)?;
            let overlap_supported = k.overlap_supported()?;
            let mut by_type = HashMap::new();
            let mut packed = |w: &BaseLinear| Packed::new(&k, &mut by_type, w);
            let mut layers = Vec::with_capacity(cfg.num_layers);
            for l in model.layers() {
                let mut w = Vec::with_capacity(7);
                for p in Proj::ALL {
                    match packed(l.proj(p))? {
                        Some(pw) => w.push(pw),
                        None => {
                            tracing::debug!("fused decode off: {} has type {:?}", p.hf_name(), l.proj(p).dtype());
                            return Ok(None);
                        }
                    }
                }
                // gate and up are read by one kernel, so they must share a type.
                if !w[Proj::Gate.index()].same_type(&w[Proj::Up.index()]) {
                    return Ok(None);
                }
                let (an, fnorm) = l.norms();
                layers.push(Layer { attn_norm: tensor_ptr(an)?, ffn_norm: tensor_ptr(fnorm)?, w });
            }
            let (Some(embed), Some(head)) = (packed(model.embedding())?, packed(model.head())?) else { return Ok(None) };
            let (cos, sin) = model.rope_tables();
            let f32s = |n: usize| -> Result<CudaSlice<f32>> { Ok(dev.alloc_zeros::<f32>(MAX_ROWS * n)?) };
            let (q, kv) = (cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim);
            if !q.is_multiple_of(32) {
                return Ok(None);
            }
            let widest = cfg.hidden_size.max(cfg.intermediate_size).max(q);
            let scratch = Scratch {
                x: f32s(cfg.hidden_size)?,
                qkv: f32s(q + 2 * kv)?,
                att: f32s(q)?,
                act: f32s(cfg.intermediate_size)?,
                xq: dev.alloc_zeros::<i8>(MAX_ROWS * widest)?,
                xd: f32s(widest / 32)?,
                u: None,
                ints: dev.alloc_zeros::<i32>(2 * MAX_ROWS + 1)?,
                ids: dev.alloc_zeros::<u32>(MAX_ROWS)?,
                logits: dev.alloc_zeros::<f32>(MAX_ROWS * head.rows)?,
                graph: None,
            };
            Ok(Some(Self {
                dev: dev.clone(),
                layers,
                embed,
                head,
                final_norm: tensor_ptr(model.final_norm())?,
                cos: tensor_ptr(cos)?,
                sin: tensor_ptr(sin)?,
                prep: k.decode("prep_q8")?,
                rope: k.decode("rope_append_f32")?,
                attn: k.decode("attn_decode_f32")?,
                k,
                scratch: Mutex::new(scratch),
                launches: AtomicUsize::new(0),
                graphs: AtomicBool::new(true),
                row_kernels: AtomicU8::new(RowKernels::default() as u8),
                overlap: AtomicBool::new(overlap_supported),
                overlap_supported,
            }))
        }

        /// Kernel launches of the last step (inside its graph, when it replays one).
        pub fn launches(&self) -> usize {
            self.launches.load(Ordering::Relaxed)
        }

        /// Replay steps as CUDA graphs (on by default) or launch every kernel each step.
        pub fn set_graphs(&self, on: bool) {
            self.graphs.store(on, Ordering::Relaxed);
        }

        /// Which matvec kernels serve 1 and 2 rows (see [`RowKernels`]); `ExactDp4a` by default.
        pub fn set_row_kernels(&self, rows: RowKernels) {
            self.row_kernels.store(rows as u8, Ordering::Relaxed);
        }

        /// Launch the step's kernels to overlap where the device and build allow it (on by
        /// default there); `false` launches each after the one before has finished. Returns
        /// whether they overlap now.
        pub fn set_overlap(&self, on: bool) -> bool {
            let on = on && self.overlap_supported;
            self.overlap.store(on, Ordering::Relaxed);
            on
        }

        fn row_kernels(&self) -> RowKernels {
            match self.row_kernels.load(Ordering::Relaxed) {
                x if x == RowKernels::TensorCores as u8 => RowKernels::TensorCores,
                x if x == RowKernels::Fastest as u8 => RowKernels::Fastest,
                _ => RowKernels::ExactDp4a,
            }
        }

        /// Feed `ids: [rows, 1]` after what `cache` holds (its buffers already have room for
        /// one more position), row `i` with `adapters[i]` (`None`: the bare base), and return
        /// the logits `[rows, 1, vocab]`. `None`: this call is not for the fused step (too many
        /// rows, an adapter that is not on this device).
        pub fn step(&self, model: &Model, ids: &Tensor, cache: &mut KvCache, adapters: &[Option<&LoraAdapter>]) -> Result<Option<Tensor>> {
            let nb = ids.dim(0)?;
            if nb > MAX_ROWS || adapters.len() != nb || ids.dtype() != DType::U32 || !ids.device().same_device(model.device()) {
                return Ok(None);
            }
            let mut lora: Vec<Option<RowLora>> = Vec::with_capacity(nb);
            for a in adapters {
                lora.push(match a {
                    Some(a) => match a.device_ptrs()? {
                        Some(p) => Some((p, a.config.r, a.config.scale() as f32)),
                        None => return Ok(None),
                    },
                    None => None,
                });
            }
            let rmax = lora.iter().flatten().map(|l| l.1).max().unwrap_or(0);
            let cfg = model.config();
            let len = cache.len();
            let max = cfg.max_position;
            let mut ints = vec![0i32; 2 * MAX_ROWS + 1];
            for (b, &pad) in cache.padding().iter().enumerate() {
                let pos = cache.next_position(b);
                ensure!(pos < max, "sequence of {} tokens exceeds the model's {max} positions", pos + 1);
                ints[b] = pos as i32;
                ints[MAX_ROWS + b] = pad as i32;
            }
            ints[2 * MAX_ROWS] = len as i32;
            if cache.raw.len() != cache.buffers().len() {
                cache.raw = cache.buffers().iter().map(|(k, v)| Ok((tensor_ptr(k)?, tensor_ptr(v)?))).collect::<Result<_>>()?;
            }
            let mut guard = self.scratch.lock().map_err(|_| anyhow::anyhow!("fused decode scratch poisoned by an earlier panic"))?;
            let s = &mut *guard;
            if rmax > 0 && s.u.as_ref().is_none_or(|(_, have)| *have < rmax) {
                s.u = Some((self.dev.alloc_zeros::<f32>(MAX_ROWS * 3 * rmax)?, rmax));
            }
            let stream = &self.k.stream;
            // The per-token inputs go to the scratch's fixed addresses; every kernel reads them
            // from there, so a captured graph of the step replays as it is.
            stream.memcpy_htod(&ints, &mut s.ints).w()?;
            // Kept alive to the end: a temporary's free would be ordered before the copy.
            let ids = ids.contiguous()?;
            // SAFETY: both buffers hold at least nb u32 and the copy is ordered on the stream.
            unsafe { cu::memcpy_dtod_async(slice_ptr(&s.ids), tensor_ptr(&ids)?, nb * 4, stream.cu_stream()) }.w()?;
            let plan = StepPlan {
                nb,
                rows: self.row_kernels(),
                overlap: self.overlap.load(Ordering::Relaxed),
                cap: cache.capacity(),
                u: match &s.u {
                    Some((buf, _)) if rmax > 0 => (slice_ptr(buf), rmax),
                    _ => (0, 0),
                },
                lora,
                raw: &cache.raw,
            };
            let vocab = self.head.rows;
            let key = plan.key();
            if self.graphs.load(Ordering::Relaxed) && s.graph.as_ref().is_none_or(|(k, _)| *k != key) {
                s.graph = None;
                match self.capture(model, s, &plan) {
                    Ok(g) => s.graph = Some((key.clone(), g)),
                    Err(e) => {
                        // A capture that fails recorded (and ran) nothing: launch eagerly from now on.
                        tracing::warn!("decode step graphs off, capture failed: {e:#}");
                        self.graphs.store(false, Ordering::Relaxed);
                    }
                }
            }
            match &s.graph {
                Some((k, g)) if self.graphs.load(Ordering::Relaxed) && *k == key => {
                    g.graph.launch().w()?;
                    self.launches.store(g.launches, Ordering::Relaxed);
                }
                _ => {
                    s.graph = None;
                    let n = self.launch_step(model, s, &plan)?;
                    self.launches.store(n, Ordering::Relaxed);
                }
            }
            // SAFETY: the copy fills every element.
            let logits = unsafe { self.dev.alloc::<f32>(nb * vocab)? };
            // SAFETY: both buffers hold nb·vocab f32; ordered on the stream after the step.
            unsafe { cu::memcpy_dtod_async(slice_ptr(&logits), slice_ptr(&s.logits), nb * vocab * 4, stream.cu_stream()) }.w()?;
            drop(ids);
            drop(guard);
            Ok(Some(tensor_from_slice(logits, &self.dev, (nb, 1, vocab))))
        }

        /// Record the step's launches into a graph on this thread's stream. Thread-local
        /// capture: other threads (a training run on the same device) keep launching on their
        /// own streams meanwhile and are not captured.
        fn capture(&self, model: &Model, s: &Scratch, plan: &StepPlan) -> Result<StepGraph> {
            let stream = &self.k.stream;
            stream.begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL).w()?;
            let launched = self.launch_step(model, s, plan);
            // End the capture whatever happened, or the stream stays unusable.
            let graph = stream.end_capture(sys::CUgraphInstantiate_flags(0)).w();
            let launches = launched?;
            let graph = graph?.ok_or_else(|| anyhow::anyhow!("stream capture of the decode step recorded nothing"))?;
            Ok(StepGraph { graph, launches })
        }

        /// Launch every kernel of one step (or record them, while capturing) and return how
        /// many: reads `s.ids` and `s.ints`, leaves the logits in `s.logits`.
        fn launch_step(&self, model: &Model, s: &Scratch, plan: &StepPlan) -> Result<usize> {
            let cfg = model.config();
            let nb = plan.nb;
            let (hd, nh, nkv) = (cfg.head_dim, cfg.num_heads, cfg.num_kv_heads);
            let (hidden, inter) = (cfg.hidden_size, cfg.intermediate_size);
            let (qdim, kvdim) = (nh * hd, nkv * hd);
            let ldq = qdim + 2 * kvdim;
            let cap = plan.cap;
            let p = |b: &CudaSlice<f32>| slice_ptr(b);
            let (x, qkv, att, act) = (p(&s.x), p(&s.qkv), p(&s.att), p(&s.act));
            let (xq, xd) = (slice_ptr(&s.xq), p(&s.xd));
            let (u, rmax) = plan.u;
            let ldu = 3 * rmax;
            let go = Launcher { k: &self.k, n: Cell::new(0), rows: plan.rows, overlap: plan.overlap };
            let pos = slice_ptr(&s.ints);
            let start = pos + (MAX_ROWS * 4) as u64;
            let at = pos + (2 * MAX_ROWS * 4) as u64;
            // Each row's rank and scale (0 where it has no adapter).
            let mut ranks = [0i32; MAX_ROWS];
            let mut scales = [0f32; MAX_ROWS];
            for (b, l) in plan.lora.iter().enumerate() {
                if let Some((_, r, scale)) = l {
                    (ranks[b], scales[b]) = (*r as i32, *scale);
                }
            }

            // Embedding rows straight from the packed table.
            {
                let (mut table, mut ids, mut out, mut nb32, mut k32) = (self.embed.ptr, slice_ptr(&s.ids), x, nb as i32, hidden as i32);
                let mut params = [
                    std::ptr::from_mut(&mut table).cast::<c_void>(),
                    std::ptr::from_mut(&mut ids).cast(),
                    std::ptr::from_mut(&mut out).cast(),
                    std::ptr::from_mut(&mut nb32).cast(),
                    std::ptr::from_mut(&mut k32).cast(),
                ];
                // SAFETY: (const uint8_t*, const uint32_t*, float*, int, int) as in EMBED.
                unsafe { go.with_params(&self.embed.f.embed, grid((nb * hidden / 32).div_ceil(256), 256), &mut params) }?;
            }
            // One matvec launch over up to three stacked weight segments of one block type, each
            // with every row's LoRA pair (GLU: gate and up, output silu(gate)·up). The input is
            // (xq, xd), written by the kernel before it.
            let mv = |segs: &[(&Packed, RowPairs)], y: u64, ldy: usize, residual: u64, u: u64, glu: bool| -> Result<()> {
                let first = segs[0].0;
                let mut a = MvArgs {
                    xq,
                    xd,
                    y,
                    residual,
                    lora_u: u,
                    k: first.cols as i32,
                    ldy: ldy as i32,
                    ldu: ldu as i32,
                    rmax: rmax as i32,
                    glu: glu as i32,
                    r: ranks,
                    lora_scale: scales,
                    ..Default::default()
                };
                let mut end = 0;
                for i in 0..3 {
                    if let Some((w, pairs)) = segs.get(i) {
                        a.w[i] = w.ptr;
                        for (b, pair) in pairs.iter().enumerate() {
                            a.lora_b[b][i] = pair.map_or(0, |(_, bm)| bm);
                        }
                        end += w.rows;
                    }
                    a.seg_end[i] = end as i32;
                }
                a.n = if glu { first.rows } else { end } as i32;
                go.mv(first, nb, &a)
            };
            // The next matvec's input from x: RMSNorm with `norm_w` (or x as it is), int8
            // quantization into (xq, xd) in the groups `readers` take, and LoRA `u = A·input`
            // for every row's pairs of the (up to three) projections reading it.
            let prep = |x: u64, norm_w: Option<u64>, n: usize, readers: &[&Packed], segs: [RowPairs; 3]| -> Result<()> {
                let nseg = segs.iter().rposition(|pairs| pairs.iter().any(Option::is_some)).map_or(0, |i| i + 1);
                let mut a_ptrs = [[0u64; 3]; MAX_ROWS];
                for (i, pairs) in segs.iter().enumerate() {
                    for (b, pair) in pairs.iter().enumerate() {
                        a_ptrs[b][i] = pair.map_or(0, |(am, _)| am);
                    }
                }
                let a = PrepArgs {
                    x,
                    norm_w: norm_w.unwrap_or(0),
                    xq,
                    xd,
                    a: a_ptrs,
                    u,
                    n: n as i32,
                    nb: nb as i32,
                    rmax: rmax as i32,
                    ldu: ldu as i32,
                    r: ranks,
                    eps: cfg.rms_norm_eps as f32,
                    group: input_group(readers.iter().copied()) as i32,
                };
                go.with(&self.prep, grid(nb + nseg * rmax, 1024), &a)
            };
            let window = cfg.sliding_window.unwrap_or(usize::MAX).min(i32::MAX as usize) as i32;
            let f = 4u64; // bytes per f32
            for (li, layer) in self.layers.iter().enumerate() {
                // Every row's (A, B) for a projection of this layer.
                let pair = |proj: Proj| -> RowPairs {
                    let mut out = [None; MAX_ROWS];
                    for (b, l) in plan.lora.iter().enumerate() {
                        out[b] = l.and_then(|(t, _, _)| t[li][proj.index()]);
                    }
                    out
                };
                let none: RowPairs = [None; MAX_ROWS];
                let (kc, vc) = plan.raw[li];
                let w = |proj: Proj| &layer.w[proj.index()];
                // Attention block.
                let qkv_pairs = [pair(Proj::Q), pair(Proj::K), pair(Proj::V)];
                prep(x, Some(layer.attn_norm), hidden, &[w(Proj::Q), w(Proj::K), w(Proj::V)], qkv_pairs)?;
                // q|k|v in one launch per run of weights of one type (Q4_K_M keeps some v at 6
                // bits: then q|k and v), each into its place in qkv.
                let segs = [(w(Proj::Q), qkv_pairs[0]), (w(Proj::K), qkv_pairs[1]), (w(Proj::V), qkv_pairs[2])];
                let offsets = [0, qdim, qdim + kvdim];
                let mut i = 0;
                while i < segs.len() {
                    let run = segs[i..].iter().take_while(|(wp, _)| wp.same_type(segs[i].0)).count();
                    mv(&segs[i..i + run], qkv + offsets[i] as u64 * f, ldq, 0, u + (i * rmax) as u64 * f, false)?;
                    i += run;
                }
                let ra = RopeArgs {
                    qkv,
                    cos: self.cos,
                    sin: self.sin,
                    pos,
                    at,
                    k_cache: kc,
                    v_cache: vc,
                    ldq: ldq as i32,
                    nh: nh as i32,
                    nkv: nkv as i32,
                    hd: hd as i32,
                    cap: cap as i32,
                };
                let cfg_rope = LaunchConfig { grid_dim: ((nh + 2 * nkv) as u32, nb as u32, 1), block_dim: ((hd / 2).div_ceil(32) as u32 * 32, 1, 1), shared_mem_bytes: 0 };
                go.with(&self.rope, cfg_rope, &ra)?;
                // The attention kernel quantizes its output for the o projection itself
                // (same bits), unless a LoRA A must read it too or a quantization group would
                // span two heads.
                let o_pairs = [pair(Proj::O), none, none];
                let o_group = input_group([w(Proj::O)]);
                let quantize_att = hd.is_multiple_of(o_group) && o_pairs[0].iter().all(Option::is_none);
                let aa = AttnArgs {
                    q: qkv,
                    k_cache: kc,
                    v_cache: vc,
                    start,
                    at,
                    out: att,
                    xq: if quantize_att { xq } else { 0 },
                    xd: if quantize_att { xd } else { 0 },
                    ldq: ldq as i32,
                    nh: nh as i32,
                    nkv: nkv as i32,
                    hd: hd as i32,
                    cap: cap as i32,
                    window,
                    scale: 1.0 / (hd as f32).sqrt(),
                    group: o_group as i32,
                };
                go.with(&self.attn, LaunchConfig { grid_dim: (nh as u32, nb as u32, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 }, &aa)?;
                if !quantize_att {
                    prep(att, None, qdim, &[w(Proj::O)], o_pairs)?;
                }
                mv(&[(w(Proj::O), o_pairs[0])], x, hidden, x, u, false)?;
                // MLP block.
                let gu_pairs = [pair(Proj::Gate), pair(Proj::Up), none];
                prep(x, Some(layer.ffn_norm), hidden, &[w(Proj::Gate), w(Proj::Up)], gu_pairs)?;
                mv(&[(w(Proj::Gate), gu_pairs[0]), (w(Proj::Up), gu_pairs[1])], act, inter, 0, u, true)?;
                prep(act, None, inter, &[w(Proj::Down)], [pair(Proj::Down), none, none])?;
                mv(&[(w(Proj::Down), pair(Proj::Down))], x, hidden, x, u, false)?;
            }
            let none: RowPairs = [None; MAX_ROWS];
            prep(x, Some(self.final_norm), hidden, &[&self.head], [none; 3])?;
            mv(&[(&self.head, none)], slice_ptr(&s.logits), self.head.rows, 0, 0, false)?;
            Ok(go.n.get())
        }
    }

    /// A row's adapter as the step reads it: its device addresses, rank and scale.
    type RowLora<'a> = (&'a LoraPtrs, usize, f32);

    /// One projection's `(A, B)` device addresses for each batch row (`None`: no LoRA term).
    type RowPairs = [Option<(u64, u64)>; MAX_ROWS];

    /// What one step's launches depend on besides the scratch buffers (fixed for the decoder's
    /// life) and the per-token values in `Scratch::ints`.
    struct StepPlan<'a> {
        nb: usize,
        rows: RowKernels,
        /// Kernels launched to overlap (see [`FusedDecoder::set_overlap`]).
        overlap: bool,
        cap: usize,
        /// Each row's adapter (device addresses, rank, scale), or `None`.
        lora: Vec<Option<RowLora<'a>>>,
        /// LoRA `u` buffer and the largest rank of the rows (its segment stride).
        u: (u64, usize),
        /// Each layer's K and V cache addresses.
        raw: &'a [(u64, u64)],
    }

    impl StepPlan<'_> {
        /// Every value a captured graph bakes in: a step replays a graph only when all match.
        /// The adapter enters by its device addresses, so a new adapter allocated where an old
        /// one was freed, with the same addresses, is the same computation.
        fn key(&self) -> Vec<u64> {
            let mut k = vec![self.nb as u64, self.cap as u64, self.u.0, self.u.1 as u64, self.rows as u64, self.overlap as u64];
            k.extend(self.raw.iter().flat_map(|&(a, b)| [a, b]));
            // Each row's adapter by its table's address, rank and scale, then each distinct
            // table's contents once.
            let mut tables: Vec<&LoraPtrs> = Vec::new();
            for l in &self.lora {
                match l {
                    Some((table, r, scale)) => {
                        k.extend([std::ptr::from_ref(*table) as u64, *r as u64, scale.to_bits() as u64]);
                        if !tables.iter().any(|t| std::ptr::eq(*t, *table)) {
                            tables.push(table);
                        }
                    }
                    None => k.extend([0, 0, 0]),
                }
            }
            for table in tables {
                k.extend(table.iter().flatten().flat_map(|p| p.map_or([0, 0], |(a, b)| [a, b])));
            }
            k
        }
    }
}
