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
