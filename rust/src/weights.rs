//! Checkpoint weights: memory-mapped safetensors files (single or sharded), looked up by checkpoint name.
//!
//! Hub checkpoints name the same tensor with or without a wrapper prefix (`transformer.h.0...` vs `h.0...`,
//! `model.layers.0...`, `bert.encoder...`); `get` accepts both and checks each shape against the config.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};

const PREFIXES: [&str; 4] = ["", "model.", "transformer.", "bert."];

pub struct Weights {
    files: Vec<(PathBuf, MmapedSafetensors)>,
    /// tensor name -> index into `files`
    routing: HashMap<String, usize>,
    device: Device,
}

/// The safetensors files of a checkpoint folder: model.safetensors, or the shards an index file lists.
pub fn safetensors_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    let index = dir.join("model.safetensors.index.json");
    if index.is_file() {
        let text = std::fs::read_to_string(&index).map_err(|e| Error::load(&index, e))?;
        let v: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| Error::load(&index, format!("not valid JSON: {e}")))?;
        let map = v
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| Error::load(&index, "missing field \"weight_map\""))?;
        let mut files: Vec<PathBuf> = Vec::new();
        for f in map.values().filter_map(|f| f.as_str()) {
            let p = dir.join(f);
            if !files.contains(&p) {
                files.push(p);
            }
        }
        return Ok(files);
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| Error::load(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    found.sort();
    if found.is_empty() {
        let pickle = dir.join("pytorch_model.bin").is_file();
        return Err(Error::load(
            dir,
            if pickle {
                "no .safetensors weights; only pytorch_model.bin, and pickle files are never loaded (convert it to \
                 safetensors first)"
            } else {
                "no model.safetensors or model.safetensors.index.json"
            },
        ));
    }
    Ok(found)
}

impl Weights {
    pub fn open(files: &[PathBuf], device: &Device) -> Result<Self> {
        let mut opened = Vec::with_capacity(files.len());
        let mut routing = HashMap::new();
        for (i, path) in files.iter().enumerate() {
            if !path.is_file() {
                return Err(Error::load(path, "no such file"));
            }
            // SAFETY: the file is mapped read-only; like every mmap loader we rely on it not being changed
            // underneath us while the model is alive.
            let st = unsafe { MmapedSafetensors::new(path) }
                .map_err(|e| Error::load(path, format!("not a valid safetensors file ({})", root_cause(&e))))?;
            for (name, _) in st.tensors() {
                routing.insert(name, i);
            }
            opened.push((path.clone(), st));
        }
        Ok(Self { files: opened, routing, device: device.clone() })
    }

    fn describe_files(&self) -> String {
        let names: Vec<String> = self.files.iter().map(|(p, _)| p.display().to_string()).collect();
        names.join(", ")
    }

    /// The stored name of `name`, trying the usual wrapper prefixes both ways.
    fn resolve(&self, name: &str) -> Option<String> {
        let bare = PREFIXES.iter().skip(1).find_map(|p| name.strip_prefix(p)).unwrap_or(name);
        PREFIXES.iter().map(|p| format!("{p}{bare}")).find(|n| self.routing.contains_key(n))
    }

    pub fn contains(&self, name: &str) -> bool {
        self.resolve(name).is_some()
    }

    /// Load `name` with the expected shape (checked) and convert it to `dtype`.
    pub fn get(&self, name: &str, shape: &[usize], dtype: DType) -> Result<Tensor> {
        let stored = self.resolve(name).ok_or_else(|| {
            Error::ModelLoad(format!(
                "{}: no tensor named {name:?} (also tried with and without the model./transformer./bert. prefix)",
                self.describe_files()
            ))
        })?;
        let (path, st) = &self.files[self.routing[&stored]];
        let view = st.get(&stored).map_err(|e| Error::load(path, e))?;
        if view.shape() != shape {
            return Err(Error::load(
                path,
                format!("tensor {stored:?} has shape {:?}, but config.json implies {shape:?}", view.shape()),
            ));
        }
        let t = st
            .load(&stored, &self.device)
            .map_err(|e| Error::load(path, format!("tensor {stored:?}: {}", root_cause(&e))))?;
        release_pages(view.data());
        Ok(if t.dtype() == dtype { t } else { t.to_dtype(dtype)? })
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// A tensor's stored dtype and raw little-endian bytes, in place in the mapped file, its shape checked as
    /// `get` does; None for a dtype other than f32 / bf16 / f16. `release_pages` gives the pages back.
    pub fn raw(&self, name: &str, shape: &[usize]) -> Result<Option<(DType, &[u8])>> {
        let stored = self.resolve(name).ok_or_else(|| {
            Error::ModelLoad(format!(
                "{}: no tensor named {name:?} (also tried with and without the model./transformer./bert. prefix)",
                self.describe_files()
            ))
        })?;
        let (path, st) = &self.files[self.routing[&stored]];
        let view = st.get(&stored).map_err(|e| Error::load(path, e))?;
        if view.shape() != shape {
            return Err(Error::load(
                path,
                format!("tensor {stored:?} has shape {:?}, but config.json implies {shape:?}", view.shape()),
            ));
        }
        let dtype = match view.dtype() {
            safetensors::Dtype::F32 => DType::F32,
            safetensors::Dtype::BF16 => DType::BF16,
            safetensors::Dtype::F16 => DType::F16,
            _ => return Ok(None),
        };
        Ok(Some((dtype, view.data())))
    }

    /// The dtype the checkpoint stores its floating-point weights in (the first floating tensor's).
    pub fn stored_dtype(&self) -> DType {
        for (_, st) in &self.files {
            for (_, view) in st.tensors() {
                match view.dtype() {
                    safetensors::Dtype::BF16 => return DType::BF16,
                    safetensors::Dtype::F16 => return DType::F16,
                    safetensors::Dtype::F32 => return DType::F32,
                    _ => {}
                }
            }
        }
        DType::F32
    }
}

fn root_cause(e: &candle_core::Error) -> String {
    let s = e.to_string();
    s.lines().next().unwrap_or_default().to_string()
}

/// The whole pages of `bytes`, a slice of a read-only file mapping whose contents were copied out, need not stay
/// resident: a load then holds each tensor once (its copy), not twice (a hint; failure changes nothing).
pub(crate) fn release_pages(bytes: &[u8]) {
    const PAGE: usize = 4096;
    let start = bytes.as_ptr() as usize;
    let (from, to) = (start.div_ceil(PAGE) * PAGE, (start + bytes.len()) / PAGE * PAGE);
    if to > from {
        // SAFETY: [from, to) lies inside `bytes`, which is part of a read-only shared file mapping (safetensors
        // and GGUF files are mapped so); MADV_DONTNEED drops its clean pages and a later read faults the same bytes
        // back in from the file. No Rust reference sees different contents.
        unsafe { libc::madvise(from as *mut libc::c_void, to - from, libc::MADV_DONTNEED) };
    }
}
