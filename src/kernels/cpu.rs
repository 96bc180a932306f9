//! The CPU matmul for GGML's 32-wide block types (Q4_0, Q4_1, Q8_0): `y = x · Wᵀ` with `W`
//! read in its packed bytes and `x` quantized to int8 blocks of 32 once per call, on x86-64
//! with AVX2, FMA and F16C (every x86 CPU since 2013), AVX-VNNI where present, and AVX-512 VNNI
//! on 512-bit vectors (two blocks an instruction) where present. Elsewhere `available` is false
//! and the caller keeps candle's path.
//!
//! candle's CPU kernels have SIMD for Q4_0 and Q8_0 but compute Q4_1 (the type of the small
//! embedded model) one scalar at a time; this one is vectorised for all three and tiles rows and
//! tokens (4 × 2 on 256-bit vectors, 4 × 4 with AVX-512's 32 registers) so a weight block is
//! unpacked once for several tokens and an activation block loaded once for several rows.
//!
//! **Batch invariance.** Every output `(token, row)` is computed by the same instructions in the
//! same order whatever the tile it falls in and however many tokens the call has: per block (or
//! pair of blocks on AVX-512), the exact integer dot of the pairs, converted to f32 and
//! fused-multiply-added with the two scales into the lanes; the block offsets (`m·Σa`, Q4_1's
//! minimum and Q4_0's −8) summed apart in block order; then one fixed reduction. So a token's
//! output is bit-identical alone, in a prompt, or beside other sequences in a batch, for a given
//! instruction set ([`Isa`]; the fastest the CPU has is used).

use anyhow::{ensure, Result};
use candle_core::quantized::GgmlDType;

/// Elements per block, for weights and quantized activations alike.
pub const BLOCK: usize = 32;

/// The weight layouts this kernel reads (GGML's byte layout, little-endian f16 scales).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// `d: f16, qs: [u8; 16]`; `w = d·(q − 8)`, low nibbles are elements 0–15, high 16–31.
    Q4_0,
    /// `d: f16, m: f16, qs: [u8; 16]`; `w = d·q + m`, same nibble order.
    Q4_1,
    /// `d: f16, qs: [i8; 32]`; `w = d·q`.
    Q8_0,
}

impl Kind {
    fn of(dtype: GgmlDType) -> Option<Kind> {
        match dtype {
            GgmlDType::Q4_0 => Some(Kind::Q4_0),
            GgmlDType::Q4_1 => Some(Kind::Q4_1),
            GgmlDType::Q8_0 => Some(Kind::Q8_0),
            _ => None,
        }
    }

    const fn block_bytes(self) -> usize {
        match self {
            Kind::Q4_0 => 18,
            Kind::Q4_1 => 20,
            Kind::Q8_0 => 34,
        }
    }
}

/// Whether `matmul` runs for weights of `dtype` on this CPU.
pub fn available(dtype: GgmlDType) -> bool {
    Kind::of(dtype).is_some() && simd_ok()
}

#[cfg(target_arch = "x86_64")]
fn simd_ok() -> bool {
    static OK: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *OK.get_or_init(|| std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") && std::is_x86_feature_detected!("f16c"))
}

#[cfg(not(target_arch = "x86_64"))]
fn simd_ok() -> bool {
    false
}

/// The instruction sets the kernel has a path for. Each computes every output in its own fixed
/// order (so each is batch-invariant); they differ from each other in the last bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    /// AVX2 + FMA + F16C: byte products summed by `vpmaddubsw` + `vpmaddwd`, one block a vector.
    Avx2,
    /// AVX-VNNI: one `vpdpbusd` a block (the same integer sums as AVX2, so the same bits).
    AvxVnni,
    /// AVX-512 (F, BW, VL, VNNI): two blocks a 512-bit `vpdpbusd`, half the instructions.
    Avx512,
}

impl Isa {
    /// The fastest path this CPU runs, or `None` where the kernel does not run at all.
    pub fn best() -> Option<Isa> {
        Isa::supported().last().copied()
    }

    /// Every path this CPU runs, slowest first (empty off x86-64 or without AVX2/FMA/F16C).
    pub fn supported() -> Vec<Isa> {
        #[cfg(target_arch = "x86_64")]
        if simd_ok() {
            return x86::supported();
        }
        Vec::new()
    }

    pub fn name(self) -> &'static str {
        match self {
            Isa::Avx2 => "AVX2",
            Isa::AvxVnni => "AVX2 + AVX-VNNI",
            Isa::Avx512 => "AVX-512 VNNI",
        }
    }
}

/// The instructions the kernel uses on this CPU (for reports), or `None` where it does not run.
pub fn describe() -> Option<&'static str> {
    Isa::best().map(Isa::name)
}

/// Activations quantized per block of 32: `qs[i] = round(x[i] / d)` with `d = max|x| / 127`,
/// and per block `d` and `d·Σqs` (what the weight's offset term multiplies).
pub struct QuantizedRows {
    k: usize,
    qs: Vec<i8>,
    d: Vec<f32>,
    s: Vec<f32>,
}

impl QuantizedRows {
    /// `x: [m, k]` row-major, `k` a multiple of 32; rows are shared among candle's CPU workers
    /// from 16 on.
    pub fn new(x: &[f32], k: usize) -> Result<Self> {
        ensure!(k > 0 && k.is_multiple_of(BLOCK), "the inner dimension {k} is not a multiple of {BLOCK}");
        ensure!(x.len().is_multiple_of(k), "{} activations are not whole rows of {k}", x.len());
        let blocks = x.len() / BLOCK;
        let mut q = QuantizedRows { k, qs: vec![0; x.len()], d: vec![0.0; blocks], s: vec![0.0; blocks] };
        let m = x.len() / k;
        let per_row = k / BLOCK;
        let (qs, d, s) = (SharedOut(q.qs.as_mut_ptr()), SharedOut(q.d.as_mut_ptr()), SharedOut(q.s.as_mut_ptr()));
        let rows = |range: std::ops::Range<usize>| {
            let (qs, d, s) = (&qs, &d, &s);
            for b in range.start * per_row..range.end * per_row {
                // SAFETY: `qs`, `d` and `s` hold every block of the m rows (sized above); each
                // block is written by one item.
                unsafe {
                    let out = std::slice::from_raw_parts_mut(qs.0.add(b * BLOCK), BLOCK);
                    (*d.0.add(b), *s.0.add(b)) = quantize_block(&x[b * BLOCK..(b + 1) * BLOCK], out);
                }
            }
        };
        for_rows(m, rows);
        Ok(q)
    }

    fn rows(&self) -> usize {
        self.qs.len() / self.k
    }
}

/// One block of 32 activations to int8: `q = round(x / d)` (halves away from zero, as GGML) with
/// `d = max|x| / 127`; returns `(d, d·Σq)`. A NaN or infinite activation makes the block's scale
/// NaN, so it reaches the output instead of vanishing.
fn quantize_block(xs: &[f32], qs: &mut [i8]) -> (f32, f32) {
    #[cfg(target_arch = "x86_64")]
    if simd_ok() {
        // SAFETY: the CPU has AVX2, FMA and F16C.
        return unsafe { x86::quantize_block(xs, qs) };
    }
    quantize_block_portable(xs, qs)
}

#[inline(always)]
fn quantize_block_portable(xs: &[f32], qs: &mut [i8]) -> (f32, f32) {
    let amax = xs.iter().fold(0f32, |a, v| a.max(v.abs()));
    let amax = if xs.iter().all(|v| v.is_finite()) { amax } else { f32::NAN };
    let d = amax / 127.0;
    let id = if d > 0.0 { 1.0 / d } else { 0.0 };
    let mut sum = 0i32;
    for (o, v) in qs.iter_mut().zip(xs) {
        let r = (v * id).round().clamp(-127.0, 127.0) as i8;
        *o = r;
        sum += r as i32;
    }
    (d, d * sum as f32)
}

/// A packed weight `[rows, k]` for [`matmul_many`].
#[derive(Debug, Clone, Copy)]
pub struct Weight<'a> {
    pub dtype: GgmlDType,
    pub bytes: &'a [u8],
    pub rows: usize,
}

/// `out[t, r] = Σ_i x[t, i] · W[r, i]` for `x: [m, k]` and `W: [n, k]` in `dtype`'s packed bytes,
/// on candle's CPU worker pool, with the best instructions of this CPU. `available(dtype)`
/// must hold.
pub fn matmul(dtype: GgmlDType, w: &[u8], n: usize, x: &[f32], k: usize, out: &mut [f32]) -> Result<()> {
    let isa = Isa::best().ok_or_else(|| anyhow::anyhow!("no CPU kernel for {dtype:?} weights on this CPU"))?;
    matmul_on(isa, dtype, w, n, x, k, out)
}

/// [`matmul`] with the instructions `isa` (one of [`Isa::supported`]).
pub fn matmul_on(isa: Isa, dtype: GgmlDType, w: &[u8], n: usize, x: &[f32], k: usize, out: &mut [f32]) -> Result<()> {
    matmul_many_on(isa, &[Weight { dtype, bytes: w, rows: n }], x, k, &mut [out])
}

/// [`matmul`] for several weights that read the same `x` (q|k|v, gate|up): one quantization
/// of `x` and one pass of the workers for all of them.
pub fn matmul_many(ws: &[Weight], x: &[f32], k: usize, outs: &mut [&mut [f32]]) -> Result<()> {
    let isa = Isa::best().ok_or_else(|| anyhow::anyhow!("no CPU kernel on this CPU"))?;
    matmul_many_on(isa, ws, x, k, outs)
}

fn matmul_many_on(isa: Isa, ws: &[Weight], x: &[f32], k: usize, outs: &mut [&mut [f32]]) -> Result<()> {
    ensure!(ws.len() == outs.len(), "{} weights but {} outputs", ws.len(), outs.len());
    ensure!(Isa::supported().contains(&isa), "this CPU has no {} instructions", isa.name());
    let a = QuantizedRows::new(x, k)?;
    let m = a.rows();
    // Per weight: its kind, bytes per row, output pointer and first work item.
    let mut parts = Vec::with_capacity(ws.len());
    let mut items = 0;
    for (w, out) in ws.iter().zip(outs.iter_mut()) {
        let kind = Kind::of(w.dtype).filter(|_| simd_ok()).ok_or_else(|| anyhow::anyhow!("no CPU kernel for {:?} weights on this CPU", w.dtype))?;
        let (n, row_bytes) = (w.rows, k / BLOCK * kind.block_bytes());
        ensure!(w.bytes.len() == n * row_bytes, "weight holds {} bytes, [{n}, {k}] {:?} needs {}", w.bytes.len(), w.dtype, n * row_bytes);
        ensure!(out.len() == m * n, "output holds {} values, [{m}, {n}] needs {}", out.len(), m * n);
        parts.push((kind, row_bytes, SharedOut(out.as_mut_ptr()), items));
        // Work items are groups of weight rows: each worker streams its rows' bytes once and
        // meets every token while they sit in L1.
        items += n.div_ceil(ROWS_PER_ITEM);
    }
    let run = |item: usize| {
        let p = parts.partition_point(|part| part.3 <= item) - 1;
        let (kind, row_bytes, dst, first) = &parts[p];
        let (w, g) = (&ws[p], item - first);
        let rows = g * ROWS_PER_ITEM..w.rows.min((g + 1) * ROWS_PER_ITEM);
        // SAFETY: the CPU features were checked (`simd_ok`); each (token, row) of an output is
        // written by exactly one item; the weight and activation sizes were checked above.
        unsafe { x86::rows(isa, *kind, w.bytes, *row_bytes, rows, &a, w.rows, dst.0) };
    };
    let pool = candle_core::utils::barrier_pool();
    if m <= STATIC_SPLIT_TOKENS {
        // Decoding: each worker takes one contiguous run of items, long sequential reads of the
        // weights that the hardware prefetchers keep ahead of (the work per item is uniform).
        let share = items.div_ceil(pool.n_workers() + 1);
        pool.execute(|tid| ((tid * share).min(items)..((tid + 1) * share).min(items)).for_each(run));
    } else {
        // Prompts: compute-bound, so a shared cursor evens out the workers instead.
        pool.execute_chunked(items, |range| range.for_each(run));
    }
    Ok(())
}

/// `out[t] = Bᵀs · (A · x[t])` for every row `t` of `x: [m, k]`, with `A: [r, k]` and
/// `Bᵀs: [r, n]` (the LoRA up-projection, transposed and scaled), all f32 row-major: the LoRA
/// path of a projection. Each row is computed alone, in one fixed order (eight running sums
/// per dot, then the rank's terms in order), so it is the same bits in any batch; rows are
/// shared among candle's CPU workers from 16 on.
pub fn low_rank(x: &[f32], k: usize, a: &[f32], r: usize, bt: &[f32], n: usize, out: &mut [f32]) -> Result<()> {
    ensure!(k > 0 && x.len().is_multiple_of(k), "{} inputs are not whole rows of {k}", x.len());
    ensure!(a.len() == r * k && bt.len() == r * n, "LoRA factors of {} and {} values do not fit rank {r}, {k} in, {n} out", a.len(), bt.len());
    let m = x.len() / k;
    ensure!(out.len() == m * n, "output holds {} values, [{m}, {n}] needs {}", out.len(), m * n);
    let row = |xs: &[f32], ys: &mut [f32]| {
        ys.fill(0.0);
        for (aj, bj) in a.chunks_exact(k).zip(bt.chunks_exact(n)) {
            let u = dot(aj, xs);
            for (y, b) in ys.iter_mut().zip(bj) {
                *y += u * b;
            }
        }
    };
    let dst = SharedOut(out.as_mut_ptr());
    for_rows(m, |rows| {
        let dst = &dst;
        for t in rows {
            // SAFETY: each row of `out` (checked above to hold m·n values) is written by one item.
            let ys = unsafe { std::slice::from_raw_parts_mut(dst.0.add(t * n), n) };
            row(&x[t * k..(t + 1) * k], ys);
        }
    });
    Ok(())
}

/// `Σ a·b` as eight interleaved running sums added in one fixed order (vectorises, and is the
/// same bits on every call).
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    for (i, (x, y)) in ra.iter().zip(rb).enumerate() {
        acc[i] += x * y;
    }
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]))
}

/// `f` over the row ranges of `0..m`: on the calling thread below [`PARALLEL_ROWS`] rows (a
/// decode step's few rows are not worth waking the workers), else shared among candle's CPU
/// workers.
fn for_rows(m: usize, f: impl Fn(std::ops::Range<usize>) + Sync) {
    if m < PARALLEL_ROWS {
        f(0..m);
    } else {
        candle_core::utils::barrier_pool().execute_chunked(m, f);
    }
}

/// Rows from which activation quantization and the LoRA product use every worker.
const PARALLEL_ROWS: usize = 16;

/// Up to this many tokens a call is memory-bound (decode steps): workers take fixed contiguous
/// shares of the weight rows; above it, chunks from a shared cursor.
const STATIC_SPLIT_TOKENS: usize = 8;

/// Weight rows a work item computes for every token.
const ROWS_PER_ITEM: usize = 16;

/// An output the workers write into, each its own elements.
struct SharedOut<T>(*mut T);
// SAFETY: workers write disjoint elements (see the callers).
unsafe impl<T> Sync for SharedOut<T> {}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{Isa, Kind, QuantizedRows, BLOCK};
    use std::arch::x86_64::*;

    // `Kind` as a const parameter, so each type's inner loop has no branches.
    const Q4_0: u8 = 0;
    const Q4_1: u8 = 1;
    const Q8_0: u8 = 2;

    // How a block's 32 byte products are summed on 256-bit vectors: `vpmaddubsw` + `vpmaddwd`
    // (AVX2) or one `vpdpbusd` (AVX-VNNI). The sums are exact integers either way (no pair of
    // products reaches i16's limit), so both give the same bits.
    const AVX2: u8 = 0;
    const AVX_VNNI: u8 = 1;

    pub(super) fn supported() -> Vec<Isa> {
        let mut isas = vec![Isa::Avx2];
        if is_x86_feature_detected!("avxvnni") {
            isas.push(Isa::AvxVnni);
        }
        if is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bw") && is_x86_feature_detected!("avx512vl") && is_x86_feature_detected!("avx512vnni") {
            isas.push(Isa::Avx512);
        }
        isas
    }

    /// Rows `rows` of the output for every token of `a`, with the instructions `isa` (which the
    /// caller checked this CPU has).
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn rows(isa: Isa, kind: Kind, w: &[u8], row_bytes: usize, rows: std::ops::Range<usize>, a: &QuantizedRows, n: usize, out: *mut f32) {
        match isa {
            Isa::Avx2 => rows_avx2(kind, w, row_bytes, rows, a, n, out),
            Isa::AvxVnni => rows_avx_vnni(kind, w, row_bytes, rows, a, n, out),
            Isa::Avx512 => rows_avx512(kind, w, row_bytes, rows, a, n, out),
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn rows_avx2(kind: Kind, w: &[u8], row_bytes: usize, rows: std::ops::Range<usize>, a: &QuantizedRows, n: usize, out: *mut f32) {
        rows_by::<AVX2>(kind, w, row_bytes, rows, a, n, out)
    }

    #[target_feature(enable = "avx2,fma,f16c,avxvnni")]
    unsafe fn rows_avx_vnni(kind: Kind, w: &[u8], row_bytes: usize, rows: std::ops::Range<usize>, a: &QuantizedRows, n: usize, out: *mut f32) {
        rows_by::<AVX_VNNI>(kind, w, row_bytes, rows, a, n, out)
    }

    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    unsafe fn rows_avx512(kind: Kind, w: &[u8], row_bytes: usize, rows: std::ops::Range<usize>, a: &QuantizedRows, n: usize, out: *mut f32) {
        match kind {
            Kind::Q4_0 => wide::rows_of::<Q4_0>(w, row_bytes, rows, a, n, out),
            Kind::Q4_1 => wide::rows_of::<Q4_1>(w, row_bytes, rows, a, n, out),
            Kind::Q8_0 => wide::rows_of::<Q8_0>(w, row_bytes, rows, a, n, out),
        }
    }

    #[inline(always)]
    unsafe fn rows_by<const V: u8>(kind: Kind, w: &[u8], row_bytes: usize, rows: std::ops::Range<usize>, a: &QuantizedRows, n: usize, out: *mut f32) {
        match kind {
            Kind::Q4_0 => rows_of::<Q4_0, V>(w, row_bytes, rows, a, n, out),
            Kind::Q4_1 => rows_of::<Q4_1, V>(w, row_bytes, rows, a, n, out),
            Kind::Q8_0 => rows_of::<Q8_0, V>(w, row_bytes, rows, a, n, out),
        }
    }

    /// `Σ` of the 32 products `u·s` (unsigned × signed bytes), as eight i32 partial sums.
    #[inline(always)]
    unsafe fn dot32<const V: u8>(u: __m256i, s: __m256i) -> __m256i {
        match V {
            AVX_VNNI => _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), u, s),
            _ => _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)),
        }
    }

    /// [`super::quantize_block_portable`] compiled with AVX2 (vectorised rounding).
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn quantize_block(xs: &[f32], qs: &mut [i8]) -> (f32, f32) {
        super::quantize_block_portable(xs, qs)
    }

    /// Tiles of 4 rows × 2 tokens, then what is left one row or one token at a time.
    #[inline(always)]
    unsafe fn rows_of<const K: u8, const V: u8>(w: &[u8], row_bytes: usize, rows: std::ops::Range<usize>, a: &QuantizedRows, n: usize, out: *mut f32) {
        let m = a.rows();
        let mut r = rows.start;
        while r < rows.end {
            let mut t = 0;
            if rows.end - r >= 4 {
                while t + 2 <= m {
                    tile::<K, V, 4, 2>(w, row_bytes, r, a, t, n, out);
                    t += 2;
                }
                if t < m {
                    tile::<K, V, 4, 1>(w, row_bytes, r, a, t, n, out);
                }
                r += 4;
            } else {
                while t < m {
                    tile::<K, V, 1, 1>(w, row_bytes, r, a, t, n, out);
                    t += 1;
                }
                r += 1;
            }
        }
    }

    /// The layout a const parameter names.
    const fn kind(k: u8) -> Kind {
        match k {
            Q4_0 => Kind::Q4_0,
            Q4_1 => Kind::Q4_1,
            _ => Kind::Q8_0,
        }
    }

    /// One weight block as 32 unsigned bytes (4-bit: `q`; 8-bit: `q` itself, made unsigned in
    /// `tile` with its signs moved onto the activations), its scale and its offset per unit of
    /// `d·Σa` (Q4_1: the minimum; Q4_0: −8·scale; Q8_0: none).
    #[inline(always)]
    unsafe fn load_block<const K: u8>(p: *const u8) -> (__m256i, f32, f32) {
        // The block's f16 scale (and Q4_1's f16 minimum after it) to f32 with F16C.
        let scales = _mm_cvtph_ps(_mm_cvtsi32_si128((p as *const i32).read_unaligned()));
        let d = _mm_cvtss_f32(scales);
        if K == Q8_0 {
            return (_mm256_loadu_si256(p.add(2) as *const __m256i), d, 0.0);
        }
        let (qs, m) = if K == Q4_1 { (p.add(4), _mm_cvtss_f32(_mm_movehdup_ps(scales))) } else { (p.add(2), -8.0 * d) };
        let v = _mm_loadu_si128(qs as *const __m128i);
        let mask = _mm_set1_epi8(0x0f);
        let lo = _mm_and_si128(v, mask);
        let hi = _mm_and_si128(_mm_srli_epi16(v, 4), mask);
        (_mm256_set_m128i(hi, lo), d, m)
    }

    /// `R` rows from `r0` × `T` tokens from `t0` (`R` is 1 or 4). Per (token, row) and block:
    /// `acc = fma(f32(Σ w·a), d_w·d_a, acc)` in eight lanes and `off = fma(m_w, d_a·Σa, off)`,
    /// whatever `R` and `T` are.
    #[inline(always)]
    unsafe fn tile<const K: u8, const V: u8, const R: usize, const T: usize>(w: &[u8], row_bytes: usize, r0: usize, a: &QuantizedRows, t0: usize, n: usize, out: *mut f32) {
        let blocks = a.k / BLOCK;
        let bb = kind(K).block_bytes();
        let mut acc = [[_mm256_setzero_ps(); T]; R];
        let mut offsets = Offsets::<R, T>::new();
        let wbase = w.as_ptr().add(r0 * row_bytes);
        for b in 0..blocks {
            let mut act = [_mm256_setzero_si256(); T];
            let mut da = [0f32; T];
            let mut sa = [0f32; T];
            for j in 0..T {
                let blk = (t0 + j) * blocks + b;
                act[j] = _mm256_loadu_si256(a.qs.as_ptr().add(blk * BLOCK) as *const __m256i);
                da[j] = *a.d.get_unchecked(blk);
                sa[j] = *a.s.get_unchecked(blk);
            }
            let mut mw = [0f32; R];
            for i in 0..R {
                if T == 1 {
                    // One token: the weights are read once, so ask for the next tile's bytes now
                    // (the same block of the next R rows; the pointer may run past the weight,
                    // which a prefetch ignores).
                    _mm_prefetch::<_MM_HINT_T0>(wbase.wrapping_add((R + i) * row_bytes + b * bb) as *const i8);
                }
                let (wq, dw, m) = load_block::<K>(wbase.add(i * row_bytes + b * bb));
                mw[i] = m;
                let wu = if K == Q8_0 { _mm256_sign_epi8(wq, wq) } else { wq };
                for j in 0..T {
                    let aj = if K == Q8_0 { _mm256_sign_epi8(act[j], wq) } else { act[j] };
                    let dot = dot32::<V>(wu, aj);
                    acc[i][j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_set1_ps(dw * da[j]), acc[i][j]);
                }
            }
            if K != Q8_0 {
                offsets.add(&mw, &sa);
            }
        }
        let offs = offsets.by_token();
        for (i, row) in acc.iter().enumerate() {
            for (j, &v) in row.iter().enumerate() {
                *out.add((t0 + j) * n + r0 + i) = hsum(v) + offs[j][i];
            }
        }
    }

    /// The block offsets (`m_w · d_a·Σa`) of an `R`×`T` tile, summed block by block in block
    /// order: four rows in the lanes of one vector per token (`R` = 4), or one scalar (`R` = 1).
    /// Both tile widths use it, so a `(token, row)` gets the same offset in any tile.
    struct Offsets<const R: usize, const T: usize> {
        four: [__m128; T],
        one: [f32; T],
    }

    impl<const R: usize, const T: usize> Offsets<R, T> {
        #[inline(always)]
        unsafe fn new() -> Self {
            Self { four: [_mm_setzero_ps(); T], one: [0.0; T] }
        }

        /// One block: `mw` its offset per unit for each row, `sa` its `d·Σa` for each token.
        #[inline(always)]
        unsafe fn add(&mut self, mw: &[f32; R], sa: &[f32; T]) {
            if R == 4 {
                let m4 = _mm_loadu_ps(mw.as_ptr());
                for (o, &s) in self.four.iter_mut().zip(sa) {
                    *o = _mm_fmadd_ps(m4, _mm_set1_ps(s), *o);
                }
            } else {
                for (o, &s) in self.one.iter_mut().zip(sa) {
                    *o = mw[0].mul_add(s, *o);
                }
            }
        }

        /// Each token's offsets, one per row.
        #[inline(always)]
        unsafe fn by_token(&self) -> [[f32; R]; T] {
            let mut offs = [[0f32; R]; T];
            for (o, (&four, &one)) in offs.iter_mut().zip(self.four.iter().zip(&self.one)) {
                if R == 4 {
                    _mm_storeu_ps(o.as_mut_ptr(), four);
                } else {
                    o[0] = one;
                }
            }
            offs
        }
    }

    /// The eight lanes' sum, in one fixed order.
    #[inline(always)]
    unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    }

    /// The AVX-512 path: two blocks a 512-bit vector, half the instructions of the 256-bit
    /// tiles. A 4-bit pair is laid out `[low nibbles of b | of b+1 | high nibbles of b | of b+1]`
    /// (16 bytes each) and its activations are permuted the same way, so i32 lanes 0-3 and 8-11
    /// sum block `b`, lanes 4-7 and 12-15 block `b+1`; a Q8_0 pair is `[b | b+1]`. An odd last
    /// block runs on the low half with the high half zero. As on 256 bits, every `(token, row)`
    /// takes the same instructions in the same order whatever its tile.
    mod wide {
        use super::{hsum, kind, load_block, Offsets, QuantizedRows, BLOCK, Q8_0};
        use std::arch::x86_64::*;

        /// Tiles of 4 rows × 4 tokens (then 2, then 1), then what is left one row at a time.
        #[inline(always)]
        pub(super) unsafe fn rows_of<const K: u8>(w: &[u8], row_bytes: usize, rows: std::ops::Range<usize>, a: &QuantizedRows, n: usize, out: *mut f32) {
            let m = a.rows();
            let mut r = rows.start;
            while r < rows.end {
                let mut t = 0;
                if rows.end - r >= 4 {
                    while t + 4 <= m {
                        tile::<K, 4, 4>(w, row_bytes, r, a, t, n, out);
                        t += 4;
                    }
                    if t + 2 <= m {
                        tile::<K, 4, 2>(w, row_bytes, r, a, t, n, out);
                        t += 2;
                    }
                    if t < m {
                        tile::<K, 4, 1>(w, row_bytes, r, a, t, n, out);
                    }
                    r += 4;
                } else {
                    while t < m {
                        tile::<K, 1, 1>(w, row_bytes, r, a, t, n, out);
                        t += 1;
                    }
                    r += 1;
                }
            }
        }

        /// `[v0 ×4, v1 ×4, v0 ×4, v1 ×4]` (4-bit pairs) or `[v0 ×8, v1 ×8]` (Q8_0) from lanes 0
        /// and 1 of `v`: a pair's per-block scale spread over the i32 lanes that sum its block.
        #[inline(always)]
        unsafe fn spread<const K: u8>(v: __m128) -> __m512 {
            let idx = if K == Q8_0 { _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1) } else { _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1) };
            _mm512_permutexvar_ps(idx, _mm512_castps128_ps512(v))
        }

        /// Blocks at `p` and `p + bb` of one row: the unsigned quants in the pair layout (Q8_0:
        /// the signed quants), the scales spread over their lanes, and each block's offset per
        /// unit of `d·Σa` (Q4_1: the minimum; Q4_0: −8·scale; Q8_0: none).
        #[inline(always)]
        unsafe fn load_pair<const K: u8>(p: *const u8, bb: usize) -> (__m512i, __m512, [f32; 2]) {
            // Both blocks' first four bytes (f16 d, and Q4_1's f16 m) to f32: [d0, m0, d1, m1].
            let heads = _mm_setr_epi32((p as *const i32).read_unaligned(), (p.add(bb) as *const i32).read_unaligned(), 0, 0);
            let h = _mm_cvtph_ps(heads);
            let (d0, d1) = (_mm_cvtss_f32(h), _mm_cvtss_f32(_mm_movehl_ps(h, h)));
            let dw = spread::<K>(_mm_shuffle_ps::<0b10_00_10_00>(h, h));
            if K == Q8_0 {
                let q = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(_mm256_loadu_si256(p.add(2) as *const __m256i)), _mm256_loadu_si256(p.add(bb + 2) as *const __m256i));
                return (q, dw, [0.0; 2]);
            }
            let (qo, m) =
                if K == super::Q4_1 { (4, [_mm_cvtss_f32(_mm_movehdup_ps(h)), _mm_cvtss_f32(_mm_shuffle_ps::<0b11_11_11_11>(h, h))]) } else { (2, [-8.0 * d0, -8.0 * d1]) };
            let v = _mm256_set_m128i(_mm_loadu_si128(p.add(bb + qo) as *const __m128i), _mm_loadu_si128(p.add(qo) as *const __m128i));
            let mask = _mm256_set1_epi8(0x0f);
            let lo = _mm256_and_si256(v, mask);
            let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(v), mask);
            (_mm512_inserti64x4::<1>(_mm512_castsi256_si512(lo), hi), dw, m)
        }

        /// `R` rows from `r0` × `T` tokens from `t0` (`R` is 1 or 4): per (token, row) and block
        /// pair `acc = fma(f32(Σ w·a), d_w·d_a, acc)` in sixteen lanes, the offsets
        /// `off = fma(m_w, d_a·Σa, off)` block by block, then one fixed reduction.
        #[inline(always)]
        unsafe fn tile<const K: u8, const R: usize, const T: usize>(w: &[u8], row_bytes: usize, r0: usize, a: &QuantizedRows, t0: usize, n: usize, out: *mut f32) {
            let blocks = a.k / BLOCK;
            let bb = kind(K).block_bytes();
            let mut acc = [[_mm512_setzero_ps(); T]; R];
            let mut offsets = Offsets::<R, T>::new();
            let wbase = w.as_ptr().add(r0 * row_bytes);
            // The offsets of one block (Q8_0 has none).
            let mut add_offsets = |mw: &[f32; R], sa: &[f32; T]| {
                if K != Q8_0 {
                    offsets.add(mw, sa);
                }
            };
            let mut b = 0;
            while b + 2 <= blocks {
                let mut act = [_mm512_setzero_si512(); T];
                let mut da = [_mm512_setzero_ps(); T];
                let mut sa = [[0f32; T]; 2];
                for j in 0..T {
                    let blk = (t0 + j) * blocks + b;
                    let x = _mm512_loadu_si512(a.qs.as_ptr().add(blk * BLOCK) as *const __m512i);
                    act[j] = if K == Q8_0 { x } else { _mm512_shuffle_i64x2::<0b11_01_10_00>(x, x) };
                    da[j] = spread::<K>(_mm_castpd_ps(_mm_load_sd(a.d.as_ptr().add(blk) as *const f64)));
                    sa[0][j] = *a.s.get_unchecked(blk);
                    sa[1][j] = *a.s.get_unchecked(blk + 1);
                }
                let mut mw = [[0f32; R]; 2];
                for i in 0..R {
                    let p = wbase.add(i * row_bytes + b * bb);
                    if T == 1 {
                        // One token: the weights are read once, so ask for the next tile's
                        // bytes now (the pointer may run past the weight; a prefetch ignores it).
                        let next = wbase.wrapping_add((R + i) * row_bytes + b * bb);
                        _mm_prefetch::<_MM_HINT_T0>(next as *const i8);
                        _mm_prefetch::<_MM_HINT_T0>(next.wrapping_add(2 * bb - 1) as *const i8);
                    }
                    let (wq, dw, m) = load_pair::<K>(p, bb);
                    (mw[0][i], mw[1][i]) = (m[0], m[1]);
                    // Q8_0: unsigned |w| against the activations with w's signs.
                    let (wu, neg) = if K == Q8_0 { (_mm512_abs_epi8(wq), _mm512_movepi8_mask(wq)) } else { (wq, 0) };
                    for j in 0..T {
                        let aj = if K == Q8_0 { _mm512_mask_sub_epi8(act[j], neg, _mm512_setzero_si512(), act[j]) } else { act[j] };
                        let dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), wu, aj);
                        acc[i][j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(dw, da[j]), acc[i][j]);
                    }
                }
                add_offsets(&mw[0], &sa[0]);
                add_offsets(&mw[1], &sa[1]);
                b += 2;
            }
            if b < blocks {
                let mut mw = [0f32; R];
                let mut sa = [0f32; T];
                for i in 0..R {
                    let (wq, dw, m) = load_block::<K>(wbase.add(i * row_bytes + b * bb));
                    mw[i] = m;
                    let wu = if K == Q8_0 { _mm256_sign_epi8(wq, wq) } else { wq };
                    for j in 0..T {
                        let blk = (t0 + j) * blocks + b;
                        let act = _mm256_loadu_si256(a.qs.as_ptr().add(blk * BLOCK) as *const __m256i);
                        let aj = if K == Q8_0 { _mm256_sign_epi8(act, wq) } else { act };
                        let dot = _mm512_zextsi256_si512(_mm256_dpbusd_epi32(_mm256_setzero_si256(), wu, aj));
                        acc[i][j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_set1_ps(dw * *a.d.get_unchecked(blk)), acc[i][j]);
                        sa[j] = *a.s.get_unchecked(blk);
                    }
                }
                add_offsets(&mw, &sa);
            }
            let offs = offsets.by_token();
            for (i, row) in acc.iter().enumerate() {
                for (j, &v) in row.iter().enumerate() {
                    let halves = _mm256_add_ps(_mm512_castps512_ps256(v), _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(v))));
                    *out.add((t0 + j) * n + r0 + i) = hsum(halves) + offs[j][i];
                }
            }
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
mod x86 {
    use super::{Isa, Kind, QuantizedRows};

    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn rows(_: Isa, _: Kind, _: &[u8], _: usize, _: std::ops::Range<usize>, _: &QuantizedRows, _: usize, _: *mut f32) {
        unreachable!("`available` is false off x86-64")
    }
}
