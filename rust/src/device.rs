//! Device and dtype names as users write them: "cpu", "cuda", "cuda:1"; "float32", "bfloat16", "float16".

use candle_core::{DType, Device};

use crate::error::{Error, Result};

pub fn parse_device(name: &str) -> Result<Device> {
    let name = name.trim().to_ascii_lowercase();
    if name == "cpu" {
        return Ok(Device::Cpu);
    }
    let ordinal = match name.as_str() {
        "cuda" | "gpu" => 0,
        n if n.starts_with("cuda:") => n[5..]
            .parse::<usize>()
            .map_err(|_| Error::Device(format!("device {name:?}: expected \"cuda:N\" with N a GPU number")))?,
        _ => return Err(Error::Device(format!("unknown device {name:?}; use \"cpu\", \"cuda\" or \"cuda:N\""))),
    };
    cuda_device(ordinal)
}

#[cfg(feature = "cuda")]
fn cuda_device(ordinal: usize) -> Result<Device> {
    // The CUDA wheel has cudarc open libcuda.so, cuBLAS, cuRAND and NVRTC when the first device is made, and cudarc
    // panics where one of them is missing (a machine without a GPU driver): that is a DeviceError naming the library.
    let made = std::panic::catch_unwind(|| Device::new_cuda(ordinal)).map_err(|p| {
        let msg = p
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| p.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a CUDA library could not be loaded".into());
        Error::Device(format!(
            "cuda:{ordinal} is not available: {msg} (an NVIDIA GPU and its driver are needed; the CUDA wheel also \
             loads cuBLAS, cuRAND and NVRTC for CUDA 13, which pip install candlewick-cu13 brings)"
        ))
    })?;
    made.map_err(|e| Error::Device(format!("cuda:{ordinal} is not available: {e}")))
}

#[cfg(not(feature = "cuda"))]
fn cuda_device(ordinal: usize) -> Result<Device> {
    Err(Error::Device(format!(
        "cuda:{ordinal} requested, but this build of candlewick has no CUDA support; build one with the CUDA \
         toolkit installed: pip install . --config-settings=build-args=\"--features cuda\""
    )))
}

pub fn parse_dtype(name: &str) -> Result<DType> {
    Ok(match name.trim().to_ascii_lowercase().as_str() {
        "float32" | "f32" | "fp32" => DType::F32,
        "bfloat16" | "bf16" => DType::BF16,
        "float16" | "f16" | "fp16" | "half" => DType::F16,
        other => {
            return Err(Error::arg(format!(
                "unknown dtype {other:?}; use \"float32\", \"bfloat16\" or \"float16\""
            )))
        }
    })
}

pub fn dtype_name(d: DType) -> &'static str {
    match d {
        DType::F32 => "float32",
        DType::BF16 => "bfloat16",
        DType::F16 => "float16",
        DType::F64 => "float64",
        _ => "other",
    }
}

/// Run `f` on one of rayon's worker threads. A parallel loop started from outside the pool parks the caller and
/// wakes a worker for every call, and a forward pass makes hundreds of them (several per layer); started from a
/// worker, each loop only pushes onto that worker's own queue. So a whole forward pass hops into the pool once.
pub fn on_workers<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    if rayon::current_thread_index().is_some() {
        f()
    } else {
        rayon::scope(|_| f())
    }
}
