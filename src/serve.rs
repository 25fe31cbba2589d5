//! Starting the long-running roles: store, API, worker, signals and graceful shutdown.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use claas_api::AppState;
use claas_core::adapter_store::AdapterStore;
use claas_core::config::{Config, ExecutorKind, Mode};
use claas_core::queue::{self, PoolSettings, RetryPolicy, SharedStore};
use claas_worker::{
    CandleExecutor, CandleOptions, Executor, SimulatedExecutor, VllmOptions, Worker, WorkerOptions,
};
use tokio::sync::watch;

/// Opens the configured store, creating the SQLite file's directory if needed.
pub async fn open_store(cfg: &Config) -> Result<SharedStore> {
    open_store_with(cfg, PoolSettings::tool(cfg.database.max_connections)).await
}

/// An API's store: its whole pool is opened at start and kept (README "Connections").
async fn open_api_store(cfg: &Config) -> Result<SharedStore> {
    open_store_with(cfg, PoolSettings::api(cfg.database.max_connections)).await
}

/// A worker's store: a small pool whose connections close between bursts, and a listener
/// only while one of `database.max_listeners` slots is free (README "Connections").
async fn open_worker_store(cfg: &Config) -> Result<SharedStore> {
    let db = &cfg.database;
    open_store_with(
        cfg,
        PoolSettings::worker(db.worker_max_connections, db.max_listeners),
    )
    .await
}

async fn open_store_with(cfg: &Config, settings: PoolSettings) -> Result<SharedStore> {
    let url = &cfg.database.url;
    if let Some(path) = url.strip_prefix("sqlite:") {
        let path = path.trim_start_matches("//");
        let file = path.split('?').next().unwrap_or(path);
        if let Some(dir) = std::path::Path::new(file).parent() {
            if !dir.as_os_str().is_empty() {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("creating {}", dir.display()))?;
            }
        }
    }
    Ok(queue::connect_with(url, settings).await?)
}

/// Runs migrations, waiting for the database to come up (it may start after us).
async fn migrate_when_up(store: &SharedStore) -> Result<()> {
    let mut delay = Duration::from_millis(200);
    loop {
        match store.migrate().await {
            Ok(()) => return Ok(()),
            Err(e) if e.is_transient() => {
                tracing::warn!(error = %e, "database not reachable yet; retrying migrations");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// A channel that turns true on SIGTERM or Ctrl-C.
fn shutdown_signal() -> watch::Receiver<bool> {
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        {
            let mut term =
                match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::error!(error = %e, "cannot listen for SIGTERM");
                        let _ = ctrl_c.await;
                        let _ = tx.send(true);
                        return;
                    }
                };
            tokio::select! {
                _ = ctrl_c => {}
                _ = term.recv() => {}
            }
        }
        #[cfg(not(unix))]
        let _ = ctrl_c.await;
        tracing::info!("shutdown requested");
        let _ = tx.send(true);
    });
    rx
}

async fn until_true(mut rx: watch::Receiver<bool>) {
    let _ = rx.wait_for(|v| *v).await;
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .or_else(|_| std::env::var("HOSTNAME"))
        .unwrap_or_else(|_| "localhost".into())
}

/// The process's one adapter store. A storage setting that names no usable object store
/// stops start-up here, not a silent fallback to local files no other node sees.
fn adapter_store(cfg: &Config) -> Result<AdapterStore> {
    AdapterStore::from_config(&cfg.storage).context("storage (storage.backend, storage.url)")
}

/// The worker's options.
fn worker_options(cfg: &Config, store: AdapterStore) -> Result<WorkerOptions> {
    let host = hostname();
    Ok(WorkerOptions {
        id: cfg
            .worker
            .id
            .clone()
            .unwrap_or_else(|| format!("{host}-{}", std::process::id())),
        hostname: host,
        gpu: None,
        // With Tinker, no vLLM runs beside the worker.
        vllm_url: cfg
            .vllm
            .base_url
            .clone()
            .filter(|_| cfg.mode == Mode::Local),
        base_models: cfg.worker.base_models.clone(),
        lease: Duration::from_secs_f64(cfg.queue.lock_timeout_s),
        max_batch_samples: cfg.queue.feedback_max_batch_size,
        poll_interval: Duration::from_millis(cfg.queue.poll_interval_ms),
        retry: RetryPolicy {
            base: Duration::from_secs_f64(cfg.queue.retry_base_s),
            max: Duration::from_secs_f64(cfg.queue.retry_max_s),
        },
        shutdown_grace: Duration::from_secs_f64(cfg.worker.shutdown_grace_s),
        retention: Duration::from_secs_f64(cfg.queue.job_retention_days * 86_400.0),
        wake_on_failure: cfg.worker.feedback_wake_on_failure,
        drain_grace: Duration::from_millis(cfg.worker.drain_grace_ms),
        versions_keep: cfg.storage.adapter_versions_keep,
        store: Some(store),
        // An empty setting turns the log off.
        feedback_log_dir: cfg
            .telemetry
            .feedback_log_dir
            .clone()
            .filter(|d| !d.as_os_str().is_empty()),
    })
}

/// The configured executor. The candle one resolves the base model (creating the tiny
/// random preset under the data directory on first use) and loads it once, here.
async fn executor(cfg: &Config, adapters: &AdapterStore) -> Result<Executor> {
    if cfg.mode == Mode::Tinker {
        return crate::tinker::executor(cfg).await;
    }
    Ok(match cfg.worker.executor {
        ExecutorKind::Simulated => Arc::new(SimulatedExecutor {
            step: Duration::from_millis(cfg.worker.simulated_step_ms),
            root: cfg.storage.lora_root.clone(),
        })
        .into(),
        ExecutorKind::Candle => candle_executor(cfg, adapters.clone()).await?.into(),
    })
}

/// What embedded inference can share with the trainer: its resident model and tokenizer.
type InferenceParts = (
    Option<Arc<claas_trainer::Qwen3>>,
    Arc<claas_trainer::ChatTokenizer>,
);

/// The embedded inference engine for `claas dev` without a vLLM: it serves the model the
/// trainer holds (one copy of the weights), or loads one when the trainer keeps none.
async fn inference_engine(
    cfg: &Config,
    store: SharedStore,
    parts: Option<InferenceParts>,
) -> Result<claas_engine::Engine> {
    let (model, tokenizer) = match parts {
        Some((Some(m), t)) => (m, t),
        other => {
            fetch_base_model(cfg).await?;
            let model_id = cfg.model.base_model_id.clone();
            let data_dir = cfg.data_dir.clone();
            let tok = other.map(|(_, t)| t);
            tokio::task::spawn_blocking(move || {
                let dir = claas_trainer::resolve::model_dir(&model_id, &data_dir)?;
                let model = claas_trainer::Qwen3::load(
                    &dir,
                    &candle_core::Device::Cpu,
                    candle_core::DType::F32,
                )?;
                let tok = match tok {
                    Some(t) => t,
                    None => Arc::new(claas_trainer::ChatTokenizer::from_dir(&dir)?),
                };
                Ok::<_, anyhow::Error>((Arc::new(model), tok))
            })
            .await??
        }
    };
    Ok(claas_engine::Engine::new(
        model,
        tokenizer,
        cfg.model.base_model_id.clone(),
        store,
    ))
}

/// Downloads `model.base_model_id` into the Hugging Face cache when it is a Hub id that is
/// not there yet (`HF_ENDPOINT`, `HF_TOKEN`, `HF_HUB_OFFLINE` as `huggingface_hub` reads them).
async fn fetch_base_model(cfg: &Config) -> Result<()> {
    if let Some(hub) = claas_worker::hub::HubSettings::from_env() {
        claas_worker::hub::fetch_if_missing(&cfg.model.base_model_id, &cfg.data_dir, &hub).await?;
    }
    Ok(())
}

async fn candle_executor(cfg: &Config, store: AdapterStore) -> Result<CandleExecutor> {
    {
        {
            let model_id = cfg.model.base_model_id.clone();
            if cfg.worker.base_models != [model_id.clone()] {
                anyhow::bail!(
                    "worker.base_models ({}) must be exactly model.base_model_id ({model_id}) \
                     with the candle executor: it trains that one model",
                    cfg.worker.base_models.join(", ")
                );
            }
            fetch_base_model(cfg).await?;
            let data_dir = cfg.data_dir.clone();
            let opts = cfg.clone();
            let exec = tokio::task::spawn_blocking(move || {
                let model_dir = claas_trainer::resolve::model_dir(&model_id, &data_dir)?;
                CandleExecutor::new(CandleOptions {
                    base_model_id: model_id,
                    model_dir,
                    lora_root: opts.storage.lora_root.clone(),
                    store: Some(store),
                    device: opts.trainer.device,
                    residency: opts.trainer.residency,
                    max_seq_len: opts.trainer.max_seq_len,
                    vllm: opts.vllm.base_url.clone().map(|url| VllmOptions {
                        url,
                        api_key: opts.vllm.api_key.clone(),
                        drain_timeout: Duration::from_secs_f64(
                            opts.worker.feedback_drain_timeout_s,
                        ),
                        drain_poll: Duration::from_millis(250),
                        min_free_vram_gb: opts.worker.feedback_min_free_vram_gb,
                        vram_timeout: Duration::from_secs_f64(
                            opts.worker.feedback_sleep_verify_timeout_s,
                        ),
                        pause_instead_of_sleep: opts.vllm.sleep_mode
                            == claas_core::config::VllmSleepMode::Pause,
                        reload_attempts: 3,
                        reload_backoff: Duration::from_secs(1),
                    }),
                })
            })
            .await??;
            Ok(exec)
        }
    }
}

async fn listen(cfg: &Config) -> Result<tokio::net::TcpListener> {
    let addr = format!("{}:{}", cfg.server.host, cfg.server.port);
    let listener = tokio::net::TcpListener::bind(&addr)
        .await
        .with_context(|| format!("binding {addr} (server.host/server.port, CLAAS_API_PORT)"))?;
    tracing::info!("API listening on http://{}", listener.local_addr()?);
    Ok(listener)
}

async fn app_state(cfg: &Config, store: SharedStore, adapters: AdapterStore) -> Result<AppState> {
    let keys = store.any_api_key_created().await.unwrap_or(false);
    if cfg.server.auth == claas_core::config::AuthMode::Open {
        tracing::warn!(
            "server.auth is open (CLAAS_API_AUTH=open): the API asks for no key, and anyone who \
             can reach it may act on every LoRA and mint admin keys"
        );
    } else if keys
        || cfg
            .server
            .admin_key
            .as_deref()
            .is_some_and(|k| !k.is_empty())
    {
        tracing::info!("API keys are required (Authorization: Bearer); /v1/health stays open");
    } else {
        tracing::warn!(
            "no API key is configured: the API is open to anyone who can reach it \
             (create one with `claas keys create`, or set CLAAS_ADMIN_KEY)"
        );
    }
    let state = AppState::from_config(cfg, store.clone(), adapters)
        .await
        .context("connecting the completion cache (cache.redis_url, REDIS_URL)")?;
    if cfg.mode == Mode::Tinker {
        // Tinker samples and holds every version, version 0 included: no vLLM, no local
        // base-model files.
        let sampler = crate::tinker::sampler(cfg, store).await?;
        tracing::info!(base_model = %cfg.tinker.base_model, "mode tinker: chat is served by Tinker's sampler");
        return Ok(state
            .with_backends(None)
            .with_base_models(None)
            .with_engine(Some(Arc::new(sampler))));
    }
    let models = Arc::new(claas_engine::TrainerModels::new(cfg.data_dir.clone()));
    Ok(state.with_base_models(Some(models)))
}

pub async fn api(cfg: Config, migrate: bool) -> Result<()> {
    let store = open_api_store(&cfg).await?;
    if migrate {
        migrate_when_up(&store).await?;
    }
    let adapters = adapter_store(&cfg)?;
    let listener = listen(&cfg).await?;
    let shutdown = shutdown_signal();
    claas_api::serve(
        listener,
        app_state(&cfg, store, adapters).await?,
        until_true(shutdown),
    )
    .await?;
    Ok(())
}

pub async fn worker(cfg: Config, migrate: bool) -> Result<()> {
    let store = open_worker_store(&cfg).await?;
    if migrate {
        migrate_when_up(&store).await?;
    }
    let adapters = adapter_store(&cfg)?;
    let options = worker_options(&cfg, adapters.clone())?;
    let worker = Worker::new(store, executor(&cfg, &adapters).await?, options);
    worker.run(shutdown_signal()).await?;
    Ok(())
}

pub async fn dev(cfg: Config) -> Result<()> {
    std::fs::create_dir_all(&cfg.data_dir)
        .with_context(|| format!("creating data_dir {}", cfg.data_dir.display()))?;
    let store = open_store(&cfg).await?;
    store.migrate().await?;
    tracing::info!(
        database = %queue::redact(&cfg.database.url),
        adapters = %cfg.storage.lora_root.display(),
        "embedded default: API and worker in one process"
    );
    let adapters = adapter_store(&cfg)?;
    let shutdown = shutdown_signal();
    let (exec, parts): (Executor, _) = match cfg.worker.executor {
        _ if cfg.mode == Mode::Tinker => (executor(&cfg, &adapters).await?, None),
        ExecutorKind::Candle => {
            let exec = candle_executor(&cfg, adapters.clone()).await?;
            let parts = exec.inference_parts();
            (exec.into(), Some(parts))
        }
        ExecutorKind::Simulated => (executor(&cfg, &adapters).await?, None),
    };
    let mut state = app_state(&cfg, store.clone(), adapters.clone()).await?;
    if cfg.mode == Mode::Local && cfg.vllm.base_url.is_none() && cfg.vllm.backends.is_empty() {
        let engine = inference_engine(&cfg, store.clone(), parts).await?;
        tracing::info!(
            model = %cfg.model.base_model_id,
            "no vLLM configured: chat is served in process (candle)"
        );
        state = state.with_engine(Some(Arc::new(engine)));
    }
    let worker = Worker::new(store.clone(), exec, worker_options(&cfg, adapters)?);
    let worker_shutdown = shutdown.clone();
    let worker_task = tokio::spawn(async move { worker.run(worker_shutdown).await });
    let listener = listen(&cfg).await?;
    claas_api::serve(listener, state, until_true(shutdown)).await?;
    worker_task.await??;
    Ok(())
}
