//! With the `cuda` feature, compiles kernels/zimage.cu to PTX with nvcc (found like candle-kernels
//! finds it: $NVCC, then PATH, then $CUDA_HOME/bin). Without it, does nothing.
use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=kernels/zimage.cu");
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    println!("cargo:rerun-if-env-changed=NVCC");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let nvcc = std::env::var("NVCC").ok().map(PathBuf::from).unwrap_or_else(|| {
        let on_path = Command::new("nvcc").arg("--version").output().map(|o| o.status.success()).unwrap_or(false);
        if on_path {
            PathBuf::from("nvcc")
        } else {
            let home = std::env::var("CUDA_HOME").or_else(|_| std::env::var("CUDA_PATH")).unwrap_or("/usr/local/cuda".into());
            PathBuf::from(home).join("bin").join("nvcc")
        }
    });
    // PTX for the target card (the driver JIT-compiles it for newer ones); the FP8 conversions are
    // compiled only for sm_89+.
    let cap: u32 = std::env::var("CUDA_COMPUTE_CAP").ok().and_then(|c| c.parse().ok()).unwrap_or(90);
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR")).join("zimage.ptx");
    let status = Command::new(&nvcc)
        .args(["--ptx", "-O3", "-std=c++17", &format!("-arch=sm_{cap}"), "kernels/zimage.cu", "-o"])
        .arg(&out)
        .status()
        .unwrap_or_else(|e| panic!("running {}: {e} (set NVCC or CUDA_HOME)", nvcc.display()));
    if !status.success() {
        panic!("nvcc failed to compile kernels/zimage.cu ({status})");
    }
}
