//! Compiles the project's own CUDA kernels (`src/kernels/*.cu`) to PTX when the `cuda` feature
//! is on, with the nvcc that candle's own kernel build uses (`NVCC`, else `nvcc` on PATH). The
//! CPU build needs no CUDA toolkit: without the feature this script does nothing.

use std::path::PathBuf;
use std::process::Command;

const KERNELS: &[&str] = &["dropout", "quant", "decode", "train", "prompt"];

fn main() {
    println!("cargo::rerun-if-env-changed=NVCC");
    println!("cargo::rerun-if-env-changed=CUDA_COMPUTE_CAP");
    for k in KERNELS {
        println!("cargo::rerun-if-changed=src/kernels/{k}.cu");
    }
    println!("cargo::rerun-if-changed=src/kernels/common.cuh");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let nvcc = std::env::var("NVCC").unwrap_or_else(|_| "nvcc".into());
    // 90 = Hopper (H100/H200), 86 = RTX 30xx, 89 = RTX 40xx; PTX of a lower target also runs on
    // later cards through the driver's JIT.
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "90".into());
    // The fused decode step launches kernels to overlap (programmatic dependent launch) only
    // when they were compiled with the waits that make it safe (compute_90 and later).
    println!("cargo::rustc-env=FREESKI_KERNEL_CAP={cap}");
    for k in KERNELS {
        let ptx = out.join(format!("{k}.ptx"));
        let status = Command::new(&nvcc)
            .args(["--ptx", "-O3", &format!("--gpu-architecture=compute_{cap}"), "-o"])
            .arg(&ptx)
            .arg(format!("src/kernels/{k}.cu"))
            .status()
            .unwrap_or_else(|e| panic!("cannot run {nvcc} (set NVCC or put nvcc on PATH): {e}"));
        assert!(status.success(), "{nvcc} failed on src/kernels/{k}.cu");
    }
}
