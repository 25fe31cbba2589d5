//! Start-up for `mode: tinker`: the client from `tinker.*` (no key stops start-up), the base
//! model's tokenizer (only its tokenizer files are fetched from the Hub, never weights), the
//! worker's executor and the API's sampler.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{anyhow, Context, Result};
use claas_core::config::Config;
use claas_core::queue::SharedStore;
use claas_tinker::TinkerClient;
use claas_trainer::ChatTokenizer;
use claas_worker::{Executor, TinkerTrainer};

/// The Tinker client `tinker.api_key` and `tinker.base_url` describe.
pub fn client(cfg: &Config) -> Result<TinkerClient> {
    let key = cfg.tinker.api_key.clone().ok_or_else(|| {
        anyhow!(
            "mode: tinker needs a Tinker API key: set TINKER_API_KEY (or CLAAS_TINKER_API_KEY, \
             or tinker.api_key in the config file)"
        )
    })?;
    let url =
        (cfg.tinker.base_url.clone()).unwrap_or_else(|| claas_tinker::DEFAULT_BASE_URL.into());
    TinkerClient::new(claas_tinker::Config::new(url, key))
        .context("the Tinker client (tinker.base_url, TINKER_BASE_URL)")
}

/// The directory holding `tinker.base_model`'s tokenizer: a checkpoint directory or preset
/// as the trainer finds it, else its tokenizer files from the Hub cache (fetched if
/// missing).
async fn tokenizer_dir(cfg: &Config) -> Result<PathBuf> {
    let (id, data_dir) = (cfg.tinker.base_model.clone(), cfg.data_dir.clone());
    let on_disk = claas_trainer::resolve::existing_model_dir(&id, &data_dir);
    if let (None, true, Some(hub)) = (
        &on_disk,
        claas_trainer::resolve::is_hub_id(&id),
        claas_worker::hub::HubSettings::from_env(),
    ) {
        return Ok(claas_worker::hub::fetch_tokenizer(&id, &hub).await?);
    }
    let dir =
        tokio::task::spawn_blocking(move || claas_trainer::resolve::model_dir(&id, &data_dir))
            .await??;
    Ok(dir)
}

/// The chat tokenizer of `tinker.base_model`.
pub async fn tokenizer(cfg: &Config) -> Result<Arc<ChatTokenizer>> {
    let dir = tokenizer_dir(cfg).await?;
    let tok = tokio::task::spawn_blocking(move || ChatTokenizer::from_dir(&dir))
        .await?
        .with_context(|| {
            format!(
                "the tokenizer of tinker.base_model {}",
                cfg.tinker.base_model
            )
        })?;
    Ok(Arc::new(tok))
}

/// The worker's executor: Tinker trains, and its sampler checkpoints are what is served.
pub async fn executor(cfg: &Config) -> Result<Executor> {
    let trainer = TinkerTrainer::new(client(cfg)?, &cfg.tinker.base_model, tokenizer(cfg).await?);
    tracing::info!(base_model = %cfg.tinker.base_model, "mode tinker: jobs train on Tinker");
    Ok(Arc::new(trainer).into())
}

/// The API's inference backend: Tinker's sampler.
pub async fn sampler(cfg: &Config, store: SharedStore) -> Result<claas_engine::TinkerSampler> {
    Ok(claas_engine::TinkerSampler::new(
        client(cfg)?,
        &cfg.tinker.base_model,
        tokenizer(cfg).await?,
        store,
    ))
}

/// One LoRA in CLaaS's `tinker_state.json` (`claas/training/engine/tinker/state.py`).
#[derive(Debug, serde::Deserialize)]
struct ClaasEntry {
    tinker_path: String,
    base_model: String,
    rank: i32,
    #[serde(default)]
    step: i64,
    sampler_weights_path: Option<String>,
}

/// The file `claas tinker import` reads: the one given, else `tinker.state_path`
/// (`CLAAS_TINKER_STATE_PATH`), else CLaaS's default `~/.claas/tinker_state.json`.
fn state_file(cfg: &Config, file: Option<PathBuf>) -> Result<PathBuf> {
    file.or_else(|| cfg.tinker.state_path.clone())
        .or_else(|| {
            std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".claas/tinker_state.json"))
        })
        .ok_or_else(|| {
            anyhow!("name the file: claas tinker import FILE (or set CLAAS_TINKER_STATE_PATH)")
        })
}

/// `claas tinker import [FILE]`: each LoRA of a CLaaS `tinker_state.json` becomes a LoRA
/// here whose version 0 is its current Tinker checkpoint, so the next step trains from it
/// and chat samples its sampler weights. Idempotent: a LoRA already imported is reported
/// and left alone. Fails (after importing the rest) when any entry could not be imported.
pub async fn import(cfg: &Config, store: SharedStore, file: Option<PathBuf>) -> Result<()> {
    let path = state_file(cfg, file)?;
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("reading CLaaS's Tinker state {}", path.display()))?;
    let entries: std::collections::BTreeMap<String, serde_json::Value> =
        serde_json::from_str(&text).with_context(|| {
            format!(
                "{} is not CLaaS's tinker_state.json (a JSON object)",
                path.display()
            )
        })?;
    let mut refused = 0;
    for (lora_id, raw) in &entries {
        match import_one(cfg, &store, lora_id, raw).await {
            Ok(done) => println!("{lora_id}: {done}"),
            Err(why) => {
                refused += 1;
                println!("{lora_id}: not imported: {why}");
            }
        }
    }
    if refused > 0 {
        anyhow::bail!(
            "{refused} of {} LoRAs were not imported (see above)",
            entries.len()
        );
    }
    Ok(())
}

/// Imports one entry; says what it did, or why not.
async fn import_one(
    cfg: &Config,
    store: &SharedStore,
    lora_id: &str,
    raw: &serde_json::Value,
) -> Result<&'static str, String> {
    claas_core::types::validate_lora_id(lora_id).map_err(|e| e.to_string())?;
    let entry: ClaasEntry =
        serde_json::from_value(raw.clone()).map_err(|e| format!("not a CLaaS entry: {e}"))?;
    if entry.base_model != cfg.tinker.base_model {
        return Err(format!(
            "its base model {} is not tinker.base_model ({}), the one this deployment trains",
            entry.base_model, cfg.tinker.base_model
        ));
    }
    if entry.rank <= 0 {
        return Err(format!("rank {} is not positive", entry.rank));
    }
    let state: claas_tinker::TinkerPath = entry
        .tinker_path
        .parse()
        .map_err(|e| format!("tinker_path: {e}"))?;
    let twin = state
        .sampler_twin()
        .ok_or("tinker_path is not a training state (tinker://…/weights/…)")?;
    let (uri, sha256) = match entry.sampler_weights_path.as_deref() {
        Some(p) if p == twin.to_string() => {
            use sha2::Digest;
            let uri = state.to_string();
            let sha = hex::encode(sha2::Sha256::digest(uri.as_bytes()));
            (uri, sha)
        }
        Some(p) => {
            return Err(format!(
                "its sampler weights {p} are not saved beside {state} ({twin})"
            ))
        }
        // CLaaS's `init`: a state with no sampler weights, an untrained LoRA that answers
        // as the base model; it starts here as a new LoRA of the same rank.
        None if entry.step == 0 => (String::new(), String::new()),
        None => {
            return Err(format!(
                "step {} has no sampler_weights_path to serve",
                entry.step
            ))
        }
    };
    if let Some(existing) = store.get_lora(lora_id).await.map_err(|e| e.to_string())? {
        let current = store
            .current_version(&existing)
            .await
            .map_err(|e| e.to_string())?;
        if current.is_some_and(|v| v.storage_uri == uri && existing.rank == entry.rank) {
            return Ok("already imported");
        }
        return Err(format!(
            "a LoRA with this id exists here (version {})",
            existing.current_version
        ));
    }
    let lora = claas_core::types::NewLora {
        lora_id: lora_id.to_owned(),
        base_model: entry.base_model,
        rank: entry.rank,
        alpha: f64::from(entry.rank) * 2.0,
        target_modules: claas_api::routes::lora::DEFAULT_TARGETS
            .iter()
            .map(|t| t.to_string())
            .collect(),
        initial_uri: uri,
        initial_sha256: sha256,
    };
    store.create_lora(&lora).await.map_err(|e| e.to_string())?;
    Ok(if entry.step == 0 {
        "imported (untrained)"
    } else {
        "imported"
    })
}
