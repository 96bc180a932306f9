//! Device selection (`cpu`, `cuda:N`) and memory readings for reports and benchmarks.

use anyhow::{bail, Context, Result};
use candle_core::Device;

/// Parse `cpu` or `cuda:N` (`cuda` alone means `cuda:0`).
pub fn parse_device(spec: &str) -> Result<Device> {
    let spec = spec.trim();
    if spec == "cpu" {
        return Ok(Device::Cpu);
    }
    let ordinal = match spec.strip_prefix("cuda") {
        Some("") => 0,
        Some(rest) => rest.strip_prefix(':').and_then(|n| n.parse::<usize>().ok()).with_context(|| format!("bad device `{spec}`: expected cpu or cuda:N"))?,
        None => bail!("bad device `{spec}`: expected cpu or cuda:N"),
    };
    if !candle_core::utils::cuda_is_available() {
        bail!("device `{spec}` asked for, but this binary was built without CUDA (rebuild with `--features cuda`)");
    }
    Device::new_cuda(ordinal).with_context(|| format!("opening CUDA device {ordinal}"))
}

/// `cpu (N threads)`, or `cuda:N (card name)`.
pub fn describe(device: &Device) -> String {
    match device {
        Device::Cpu => format!("cpu ({} threads)", candle_core::utils::get_num_threads()),
        Device::Cuda(_) => match card_name(device) {
            Some(name) => format!("cuda:{} ({name})", device_ordinal(device)),
            None => format!("cuda:{}", device_ordinal(device)),
        },
        Device::Metal(_) => "metal".into(),
    }
}

fn card_name(device: &Device) -> Option<String> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(dev) = device {
        return dev.cuda_stream().context().name().ok();
    }
    let _ = device;
    None
}

/// The card's peak memory bandwidth in bytes/s, from its memory clock and bus width as the
/// driver reports them (CUDA only). The ceiling a batch-1 decode, which reads every weight
/// once a token, is judged against.
pub fn memory_bandwidth(device: &Device) -> Option<f64> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(dev) = device {
        use candle_core::cuda_backend::cudarc::driver::sys::CUdevice_attribute as A;
        let stream = dev.cuda_stream();
        let ctx = stream.context();
        let khz = ctx.attribute(A::CU_DEVICE_ATTRIBUTE_MEMORY_CLOCK_RATE).ok()?;
        let bits = ctx.attribute(A::CU_DEVICE_ATTRIBUTE_GLOBAL_MEMORY_BUS_WIDTH).ok()?;
        return (khz > 0 && bits > 0).then(|| double_data_rate_bandwidth(khz as f64, bits as f64));
    }
    let _ = device;
    None
}

/// Bytes/s of a memory interface moving data on both clock edges: `clock_khz` as the driver
/// reports it, `bus_bits` wide.
pub fn double_data_rate_bandwidth(clock_khz: f64, bus_bits: f64) -> f64 {
    2.0 * clock_khz * 1e3 * bus_bits / 8.0
}

fn device_ordinal(device: &Device) -> usize {
    match device.location() {
        candle_core::DeviceLocation::Cuda { gpu_id } => gpu_id,
        _ => 0,
    }
}

/// Fix the CPU worker count for the rest of the process; call first thing in `main`, before
/// any thread starts. Unless `RAYON_NUM_THREADS` is set, candle counts the cores anew on every
/// CPU matmul (reading /proc/cpuinfo and the cgroup files: ~0.1 ms a call, 60 calls a decoded
/// token on SmolLM2, more than the 4-bit matmuls themselves); setting it once to the count it
/// would find makes that an environment lookup.
pub fn settle_cpu_threads() {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let n = candle_core::utils::get_num_threads();
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
}

/// Peak resident set size of this process in bytes (Linux `VmHWM`), if readable.
pub fn peak_rss_bytes() -> Option<u64> {
    proc_status_kib("VmHWM:").map(|k| k * 1024)
}

/// Current resident set size in bytes (Linux `VmRSS`).
pub fn rss_bytes() -> Option<u64> {
    proc_status_kib("VmRSS:").map(|k| k * 1024)
}

fn proc_status_kib(key: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status.lines().find(|l| l.starts_with(key))?.split_whitespace().nth(1)?.parse().ok()
}

/// Used and total device memory in bytes (whole device, as the driver reports it).
pub fn device_memory(device: &Device) -> Option<(u64, u64)> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(dev) = device {
        let (free, total) = dev.cuda_stream().context().mem_get_info().ok()?;
        return Some(((total - free) as u64, total as u64));
    }
    let _ = device;
    None
}

/// Peaks of the CUDA stream-ordered memory pool candle allocates from: `used_high` is the most
/// bytes live tensors held at once (what PyTorch calls `max_memory_allocated`), `reserved_high`
/// the most the pool held from the driver (freed blocks it kept included).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolPeaks {
    pub used_high: u64,
    pub reserved_high: u64,
}

#[cfg(feature = "cuda")]
mod pool {
    use candle_core::cuda_backend::cudarc::driver::sys;

    /// The device's default memory pool (cudarc's `malloc_async` allocates from it).
    pub fn default_pool(dev: &candle_core::CudaDevice) -> Option<sys::CUmemoryPool> {
        let ctx = dev.cuda_stream().context().clone();
        ctx.bind_to_thread().ok()?;
        let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
        // SAFETY: out-pointer to a local; the device handle comes from a live context.
        let r = unsafe { sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device()) };
        (r == sys::CUresult::CUDA_SUCCESS).then_some(pool)
    }

    pub fn get(pool: sys::CUmemoryPool, attr: sys::CUmemPool_attribute) -> Option<u64> {
        let mut v: u64 = 0;
        // SAFETY: these attributes are cuuint64_t, written to a local.
        let r = unsafe { sys::cuMemPoolGetAttribute(pool, attr, &mut v as *mut u64 as *mut std::ffi::c_void) };
        (r == sys::CUresult::CUDA_SUCCESS).then_some(v)
    }

    pub fn reset(pool: sys::CUmemoryPool, attr: sys::CUmemPool_attribute) {
        let mut zero: u64 = 0;
        // SAFETY: the high-watermark attributes may only be set to zero, which this does.
        unsafe { sys::cuMemPoolSetAttribute(pool, attr, &mut zero as *mut u64 as *mut std::ffi::c_void) };
    }
}

/// Pool peaks since the last [`reset_pool_peaks`]; `None` off CUDA.
pub fn pool_peaks(device: &Device) -> Option<PoolPeaks> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(dev) = device {
        use candle_core::cuda_backend::cudarc::driver::sys::CUmemPool_attribute as A;
        let p = pool::default_pool(dev)?;
        return Some(PoolPeaks { used_high: pool::get(p, A::CU_MEMPOOL_ATTR_USED_MEM_HIGH)?, reserved_high: pool::get(p, A::CU_MEMPOOL_ATTR_RESERVED_MEM_HIGH)? });
    }
    let _ = device;
    None
}

pub fn reset_pool_peaks(device: &Device) {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(dev) = device {
        use candle_core::cuda_backend::cudarc::driver::sys::CUmemPool_attribute as A;
        if let Some(p) = pool::default_pool(dev) {
            pool::reset(p, A::CU_MEMPOOL_ATTR_USED_MEM_HIGH);
            pool::reset(p, A::CU_MEMPOOL_ATTR_RESERVED_MEM_HIGH);
        }
    }
    let _ = device;
}

/// Hand the pool's unused blocks back to the driver, so memory freed by one stage (a layer's
/// recomputed activations) is not held while the next stage allocates differently sized ones.
pub fn trim_pool(device: &Device) {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(dev) = device {
        if let Some(p) = pool::default_pool(dev) {
            // SAFETY: trimming only releases memory no allocation uses.
            unsafe { candle_core::cuda_backend::cudarc::driver::sys::cuMemPoolTrimTo(p, 0) };
        }
    }
    let _ = device;
}

/// Start (`true`) or stop the CUDA profiler's capture, for `nsys`/`ncu --profile-from-start off`
/// runs that should see one benchmarked stretch only. No-op off CUDA.
pub fn profiler_capture(device: &Device, on: bool) {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(_) = device {
        use candle_core::cuda_backend::cudarc::driver::sys;
        // SAFETY: both calls only toggle the profiler's capture for the current context.
        let r = unsafe {
            if on {
                sys::cuProfilerStart()
            } else {
                sys::cuProfilerStop()
            }
        };
        if r != sys::CUresult::CUDA_SUCCESS {
            tracing::warn!("cuProfiler{}: {r:?}", if on { "Start" } else { "Stop" });
        }
    }
    let _ = (device, on);
}

/// Samples device memory on a background thread, so short peaks between the caller's own
/// readings (an activation freed a millisecond later) are still seen.
pub struct MemoryPoller {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    peak: std::sync::Arc<std::sync::atomic::AtomicU64>,
    handle: Option<std::thread::JoinHandle<()>>,
    /// Used bytes when polling started (CUDA context, other processes, earlier allocations).
    pub baseline: u64,
    pub total: u64,
}

impl MemoryPoller {
    /// `None` where the device reports no memory figures (the CPU).
    pub fn start(device: &Device) -> Option<Self> {
        use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
        let (baseline, total) = device_memory(device)?;
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let peak = std::sync::Arc::new(AtomicU64::new(baseline));
        let (s, p, dev) = (stop.clone(), peak.clone(), device.clone());
        let handle = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                if let Some((used, _)) = device_memory(&dev) {
                    p.fetch_max(used, Ordering::Relaxed);
                }
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
        });
        Some(Self { stop, peak, handle: Some(handle), baseline, total })
    }

    /// Highest used-bytes reading so far (whole device).
    pub fn peak(&self) -> u64 {
        self.peak.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl Drop for MemoryPoller {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

pub fn gib(bytes: u64) -> f64 {
    bytes as f64 / (1u64 << 30) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_devices() {
        assert!(parse_device("cpu").unwrap().is_cpu());
        let err = parse_device("tpu:0").unwrap_err().to_string();
        assert!(err.contains("tpu:0"), "{err}");
        let err = parse_device("cuda:x").unwrap_err().to_string();
        assert!(err.contains("cuda:x"), "{err}");
    }

    #[test]
    fn bandwidth_of_known_cards() {
        // H100 SXM (HBM3): 2,619 MHz on a 5,120-bit bus; RTX 3070 (GDDR6): 7,001 MHz, 256 bits.
        let h100 = double_data_rate_bandwidth(2_619_000.0, 5120.0);
        assert!((h100 / 1e12 - 3.352).abs() < 1e-3, "{h100}");
        let rtx3070 = double_data_rate_bandwidth(7_001_000.0, 256.0);
        assert!((rtx3070 / 1e9 - 448.1).abs() < 0.1, "{rtx3070}");
    }

    #[test]
    fn cpu_has_no_card_figures() {
        assert_eq!(memory_bandwidth(&Device::Cpu), None);
        assert!(describe(&Device::Cpu).starts_with("cpu ("));
    }
}
