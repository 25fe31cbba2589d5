//! Finding a base model's checkpoint directory from its id: a directory path, a random
//! preset the embedded default creates on first use, or a Hub id in the local Hugging Face
//! cache (no download).

use std::path::{Path, PathBuf};

use crate::error::{checkpoint, Result};
use crate::random::{write_checkpoint, Preset};

/// Where `base_model_id` lives on this machine; `data_dir` holds generated presets
/// (`<data_dir>/models/<preset>`), created here when missing.
pub fn model_dir(base_model_id: &str, data_dir: &Path) -> Result<PathBuf> {
    let as_path = Path::new(base_model_id);
    if as_path.join("config.json").is_file() {
        return Ok(as_path.to_path_buf());
    }
    if let Ok(preset) = base_model_id.parse::<Preset>() {
        let dir = data_dir.join("models").join(base_model_id);
        if !dir.join("config.json").is_file() {
            // Write beside, then rename: a crash never leaves a half-written model.
            let tmp = data_dir
                .join("models")
                .join(format!(".{base_model_id}.{}.tmp", std::process::id()));
            let _ = std::fs::remove_dir_all(&tmp);
            write_checkpoint(preset, &tmp, 0)?;
            std::fs::rename(&tmp, &dir)?;
            tracing::info!(
                "created the random-weight {base_model_id} model in {}",
                dir.display()
            );
        }
        return Ok(dir);
    }
    if let Some(dir) = hf_cache_snapshot(base_model_id) {
        return Ok(dir);
    }
    Err(checkpoint(format!(
        "base model {base_model_id:?} not found: not a checkpoint directory (with config.json), \
         not a preset (tiny, qwen3-0.6b, qwen3-8b), and not in the Hugging Face cache \
         ($HF_HOME/hub or ~/.cache/huggingface/hub), which a worker fills at start unless \
         HF_HUB_OFFLINE is set"
    )))
}

/// Like [`model_dir`] but never creates anything: for the API, which records LoRAs but must
/// not write a multi-gigabyte random checkpoint because a request named a preset.
pub fn existing_model_dir(base_model_id: &str, data_dir: &Path) -> Option<PathBuf> {
    let as_path = Path::new(base_model_id);
    if as_path.join("config.json").is_file() {
        return Some(as_path.to_path_buf());
    }
    if base_model_id.parse::<Preset>().is_ok() {
        let dir = data_dir.join("models").join(base_model_id);
        return dir.join("config.json").is_file().then_some(dir);
    }
    hf_cache_snapshot(base_model_id)
}

/// The Hugging Face hub cache as `huggingface_hub` finds it: `$HF_HUB_CACHE`, else
/// `$HF_HOME/hub`, else `~/.cache/huggingface/hub`.
pub fn hf_hub_cache() -> Option<PathBuf> {
    match std::env::var_os("HF_HUB_CACHE") {
        Some(h) => Some(PathBuf::from(h)),
        None => match std::env::var_os("HF_HOME") {
            Some(h) => Some(PathBuf::from(h).join("hub")),
            None => Some(PathBuf::from(std::env::var_os("HOME")?).join(".cache/huggingface/hub")),
        },
    }
}

/// Whether `id` has the shape of a Hub model id (`org/name`) rather than a path or preset.
pub fn is_hub_id(id: &str) -> bool {
    let mut parts = id.split('/');
    let ok = |p: Option<&str>| {
        p.is_some_and(|p| {
            !p.is_empty()
                && p != "."
                && p != ".."
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        })
    };
    ok(parts.next()) && ok(parts.next()) && parts.next().is_none()
}

fn hf_cache_snapshot(id: &str) -> Option<PathBuf> {
    hf_cache_snapshot_in(&hf_hub_cache()?, id)
}

/// `<hub>/models--<org>--<name>/snapshots/<rev>` for the revision `refs/main` names, or the
/// only snapshot there is; only a snapshot holding `config.json` counts (the downloader
/// fetches it last, so a cut-off download is not taken for a checkpoint).
pub fn hf_cache_snapshot_in(hub: &Path, id: &str) -> Option<PathBuf> {
    if !is_hub_id(id) {
        return None;
    }
    let repo = hub.join(format!("models--{}", id.replace('/', "--")));
    let snapshots = repo.join("snapshots");
    if let Ok(rev) = std::fs::read_to_string(repo.join("refs/main")) {
        let dir = snapshots.join(rev.trim());
        if dir.join("config.json").is_file() {
            return Some(dir);
        }
    }
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(&snapshots)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join("config.json").is_file())
        .collect();
    dirs.sort();
    dirs.pop()
}
