//! Adapter directories on local storage: written whole or not at all, identified by the
//! sha256 of their weights, and version 0 created the same way wherever it is created.

use std::path::Path;

use sha2::{Digest, Sha256};

use crate::config::Qwen3Config;
use crate::error::Result;
use crate::lora::{AdapterConfig, LoraAdapter};

/// Writes a directory through `write` into a temporary sibling, then renames it into place,
/// replacing whatever a crashed, unrecorded attempt left there.
pub fn write_dir_atomically(dir: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let parent = dir.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent)?;
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let nonce: u64 = rand::random();
    let tmp = parent.join(format!(".{name}.{nonce:016x}.tmp"));
    if let Err(e) = write(&tmp) {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    if dir.exists() {
        std::fs::remove_dir_all(dir)?;
    }
    std::fs::rename(&tmp, dir)?;
    Ok(())
}

/// Removes what crashed writes left in `parent`: `.<name>.<nonce>.tmp` directories older
/// than `older_than` (a live write is never that old: one job per LoRA writes at a time).
/// Returns how many were removed.
pub fn remove_stale_temp_dirs(parent: &Path, older_than: std::time::Duration) -> Result<usize> {
    let entries = match std::fs::read_dir(parent) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e.into()),
    };
    let mut removed = 0;
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if !(name.starts_with('.') && name.ends_with(".tmp")) {
            continue;
        }
        let meta = entry.metadata()?;
        let age = meta
            .modified()
            .ok()
            .and_then(|m| m.elapsed().ok())
            .unwrap_or_default();
        if meta.is_dir() && age >= older_than {
            std::fs::remove_dir_all(entry.path())?;
            removed += 1;
        }
    }
    Ok(removed)
}

/// Hex sha256 of a file.
pub fn sha256_file(path: &Path) -> Result<String> {
    // Streamed: an 8B model's rank-64 weights are hundreds of MB.
    let mut hasher = Sha256::new();
    std::io::copy(&mut std::fs::File::open(path)?, &mut hasher)?;
    Ok(hex::encode(hasher.finalize()))
}

/// Hex sha256 of an adapter directory's weights (`adapter_model.safetensors`).
pub fn adapter_sha256(dir: &Path) -> Result<String> {
    sha256_file(&dir.join("adapter_model.safetensors"))
}

/// Version 0 of a LoRA: PEFT's initialisation (A Kaiming-uniform, B zero) with shapes from
/// the base model's config, seeded by the LoRA id so the API and a worker that create it
/// produce the same file.
pub fn initial_adapter(
    lora_id: &str,
    model: &Qwen3Config,
    config: AdapterConfig,
) -> Result<LoraAdapter> {
    let digest = Sha256::digest(lora_id.as_bytes());
    let mut seed = [0u8; 8];
    seed.copy_from_slice(&digest[..8]);
    LoraAdapter::init(model, config, u64::from_le_bytes(seed))
}

/// Creates version 0 in `dir` (atomically) and returns the sha256 of its weights.
pub fn write_initial_adapter(
    dir: &Path,
    lora_id: &str,
    model: &Qwen3Config,
    config: AdapterConfig,
) -> Result<String> {
    let adapter = initial_adapter(lora_id, model, config)?;
    write_dir_atomically(dir, |tmp| adapter.save(tmp))?;
    adapter_sha256(dir)
}
