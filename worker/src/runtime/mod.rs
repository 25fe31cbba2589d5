//! The worker's claim loop: registration, claiming, idle-time maintenance (reaping expired
//! leases, pruning, loading adapters other nodes published) and graceful shutdown. One
//! claimed job's run is in `job.rs`.

use std::path::Path;
use std::time::{Duration, Instant};

use claas_core::queue::{ClaimRequest, RetryPolicy, SharedStore};
use claas_core::types::{WorkerInfo, WorkerState};
use tokio::sync::watch;

use crate::executor::Executor;

mod job;

/// Least time between two idle reconciles of the local vLLM's adapters.
const RECONCILE_MIN_INTERVAL: Duration = Duration::from_secs(1);

/// The longest a worker on Postgres waits at start-up before it first opens a connection
/// (a random delay, so a fleet started together does not connect in the same instant).
const START_SPREAD_MAX: Duration = Duration::from_secs(1);

/// How a worker behaves; built from `claas_core::config::Config` by the binary.
#[derive(Debug, Clone)]
pub struct WorkerOptions {
    pub id: String,
    pub hostname: String,
    pub gpu: Option<String>,
    pub vllm_url: Option<String>,
    pub base_models: Vec<String>,
    /// Lease per claim; heartbeats renew it every third.
    pub lease: Duration,
    pub max_batch_samples: i32,
    pub poll_interval: Duration,
    pub retry: RetryPolicy,
    /// After SIGTERM, how long the running job may take before it is handed back.
    pub shutdown_grace: Duration,
    /// Finished jobs older than this are pruned by the maintenance tick.
    pub retention: Duration,
    /// `feedback_wake_on_failure`: wake vLLM after a failure even if the request said not to.
    pub wake_on_failure: bool,
    /// Pause between marking the worker draining and draining vLLM (API routing lag).
    pub drain_grace: Duration,
    /// Adapter versions whose files are kept per LoRA (`adapter_versions_keep`).
    pub versions_keep: i32,
    /// Where versions are stored, for retention to remove them (none: local files).
    pub store: Option<claas_core::adapter_store::AdapterStore>,
    /// Where each finished job's record is written (`telemetry.feedback_log_dir`); none:
    /// no log.
    pub feedback_log_dir: Option<std::path::PathBuf>,
}

impl WorkerOptions {
    /// Options with the fleet profile's defaults (lease 120 s, batches of 8 samples, poll
    /// 2 s, retries from 5 s to 10 min, 30 s shutdown grace, 30 days retention).
    pub fn new(id: impl Into<String>, base_models: Vec<String>) -> Self {
        WorkerOptions {
            id: id.into(),
            hostname: "localhost".into(),
            gpu: None,
            vllm_url: None,
            base_models,
            lease: Duration::from_secs(120),
            max_batch_samples: 8,
            poll_interval: Duration::from_secs(2),
            retry: RetryPolicy {
                base: Duration::from_secs(5),
                max: Duration::from_secs(600),
            },
            shutdown_grace: Duration::from_secs(30),
            retention: Duration::from_secs(30 * 86_400),
            wake_on_failure: true,
            drain_grace: Duration::from_millis(50),
            versions_keep: 10,
            store: None,
            feedback_log_dir: None,
        }
    }
}

/// A worker bound to a store and an executor.
pub struct Worker {
    store: SharedStore,
    executor: Executor,
    opts: WorkerOptions,
}

impl Worker {
    pub fn new(store: SharedStore, executor: impl Into<Executor>, opts: WorkerOptions) -> Self {
        Worker {
            store,
            executor: executor.into(),
            opts,
        }
    }

    /// Runs until `shutdown` turns true: claims and runs jobs one at a time. Database
    /// outages are logged and waited out; the process keeps running.
    // Long: the claim loop: readiness, claim, run, back off, shutdown, in one select.
    pub async fn run(&self, mut shutdown: watch::Receiver<bool>) -> claas_core::Result<()> {
        if self.store.backend() == "postgres" {
            // A fleet (re)started at once would otherwise open every worker's connections
            // in the same instant: spread the starts over one poll interval, at most
            // [`START_SPREAD_MAX`], so a lone worker with a slow poll still starts at once.
            let spread = self
                .opts
                .poll_interval
                .min(START_SPREAD_MAX)
                .as_millis()
                .max(1) as u64;
            let wait = Duration::from_millis(rand::random::<u64>() % spread);
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = shutdown.changed() => return Ok(()),
            }
        }
        self.register_until_ok(&mut shutdown).await;
        if let Err(e) = self.executor.serving.on_start().await {
            tracing::warn!(error = %e, "could not wake vLLM at start-up; the first job will");
        }
        let mut wake = self.store.wakeups().await?;
        let alive = tokio::spawn(worker_heartbeat_loop(
            self.store.clone(),
            self.opts.id.clone(),
            self.opts.poll_interval.max(Duration::from_secs(5)),
        ));
        let mut last_maintenance = Instant::now() - Duration::from_secs(3600);
        let mut last_reconcile = Instant::now() - Duration::from_secs(3600);
        let mut db_backoff = Duration::from_millis(100);
        let mut waiting_for_vllm = false;
        tracing::info!(worker = %self.opts.id, models = ?self.opts.base_models, "worker started");
        while !*shutdown.borrow() {
            if last_maintenance.elapsed() >= self.maintenance_interval() {
                self.maintenance().await;
                last_maintenance = Instant::now();
            }
            if let Err(why) = self.executor.serving.ready().await {
                if !waiting_for_vllm {
                    tracing::warn!(reason = %why, "not claiming jobs until vLLM is healthy");
                    waiting_for_vllm = true;
                }
                tokio::select! {
                    _ = tokio::time::sleep(self.opts.poll_interval) => {}
                    _ = shutdown.changed() => {}
                }
                continue;
            }
            if std::mem::take(&mut waiting_for_vllm) {
                tracing::info!("vLLM is healthy again; claiming jobs");
            }
            match self.store.claim(&self.claim_request()).await {
                Ok(Some(claimed)) => {
                    db_backoff = Duration::from_millis(100);
                    self.run_claimed(claimed, &mut shutdown).await;
                }
                Ok(None) => {
                    db_backoff = Duration::from_millis(100);
                    // Idle: bring the local vLLM's adapters up to date (a version another
                    // node published, or one this node's vLLM lost). Job changes wake this
                    // loop, so a publish elsewhere is picked up within about a second.
                    if self.executor.serving.controls_vllm()
                        && last_reconcile.elapsed() >= RECONCILE_MIN_INTERVAL
                    {
                        self.reconcile().await;
                        last_reconcile = Instant::now();
                    }
                    tokio::select! {
                        _ = wake.wait(self.opts.poll_interval) => {}
                        _ = shutdown.changed() => {}
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "claim failed; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(db_backoff) => {}
                        _ = shutdown.changed() => {}
                    }
                    db_backoff = (db_backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
        alive.abort();
        let _ = self
            .store
            .worker_heartbeat(&self.opts.id, WorkerState::Stopped, None)
            .await;
        tracing::info!(worker = %self.opts.id, "worker stopped");
        Ok(())
    }

    fn claim_request(&self) -> ClaimRequest {
        ClaimRequest {
            worker_id: self.opts.id.clone(),
            base_models: self.opts.base_models.clone(),
            lease: self.opts.lease,
            max_batch_samples: self.opts.max_batch_samples,
        }
    }

    /// Reaping expired leases is cheap and idempotent, so every worker does it; a third of
    /// the lease keeps a dead worker's job waiting at most ~1.3 leases.
    fn maintenance_interval(&self) -> Duration {
        (self.opts.lease / 3).max(Duration::from_millis(200))
    }

    async fn register_until_ok(&self, shutdown: &mut watch::Receiver<bool>) {
        let info = WorkerInfo {
            id: self.opts.id.clone(),
            hostname: self.opts.hostname.clone(),
            gpu: self.opts.gpu.clone(),
            vllm_url: self.opts.vllm_url.clone(),
            base_models: self.opts.base_models.clone(),
            version: env!("CARGO_PKG_VERSION").to_string(),
        };
        let mut delay = Duration::from_millis(200);
        while let Err(e) = self.store.register_worker(&info).await {
            tracing::warn!(error = %e, "cannot register worker yet; retrying");
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = shutdown.changed() => return,
            }
            delay = (delay * 2).min(Duration::from_secs(5));
        }
    }

    /// Swaps every adapter the local vLLM serves whose directory is not its LoRA's current
    /// version to that version (in place, so requests never meet a 404).
    async fn reconcile(&self) {
        self.load_requested().await;
        let served = match self.executor.serving.served_adapters().await {
            Ok(Some(s)) => s,
            Ok(None) => return,
            Err(e) => {
                tracing::debug!(error = %e, "reconcile skipped: vLLM did not list its adapters");
                return;
            }
        };
        for (name, dir) in served {
            let current = match self.current_dir(&name).await {
                Ok(Some(c)) => c,
                Ok(None) => continue,
                Err(e) => {
                    tracing::debug!(error = %e, "reconcile skipped: store unavailable");
                    return;
                }
            };
            if Path::new(&dir) == current.as_path() {
                continue;
            }
            let current = current.display().to_string();
            match self.executor.serving.serve_adapter(&name, &current).await {
                Ok(()) => {
                    tracing::info!(lora_id = %name, from = %dir, to = %current, "served the current version")
                }
                Err(e) => {
                    tracing::warn!(lora_id = %name, error = %e, "could not serve the current version")
                }
            }
        }
    }

    /// Loads the adapters an API replica asked this node's vLLM to serve (a LoRA whose
    /// versions live in an object store, which only this node can materialise for it).
    async fn load_requested(&self) {
        let Some(url) = &self.opts.vllm_url else {
            return;
        };
        let wanted = match self.store.take_adapter_requests(url).await {
            Ok(w) => w,
            Err(e) => {
                tracing::debug!(error = %e, "adapter requests skipped: store unavailable");
                return;
            }
        };
        for lora_id in wanted {
            let dir = match self.current_dir(&lora_id).await {
                Ok(Some(dir)) => dir.display().to_string(),
                Ok(None) => continue,
                Err(e) => {
                    tracing::warn!(%lora_id, error = %e, "could not fetch the requested adapter");
                    continue;
                }
            };
            match self.executor.serving.serve_adapter(&lora_id, &dir).await {
                Ok(()) => tracing::info!(%lora_id, %dir, "loaded the adapter an API asked for"),
                Err(e) => {
                    tracing::warn!(%lora_id, error = %e, "could not load the requested adapter")
                }
            }
        }
    }

    /// The directory of LoRA `lora_id`'s current version, when it is ours and local.
    async fn current_dir(&self, lora_id: &str) -> claas_core::Result<Option<std::path::PathBuf>> {
        let Some(lora) = self.store.get_lora(lora_id).await? else {
            return Ok(None);
        };
        let Some(current) = self.store.current_version(&lora).await? else {
            return Ok(None);
        };
        if let Some(dir) = claas_core::types::local_path(&current.storage_uri) {
            return Ok(Some(dir));
        }
        // In an object store: this node's vLLM reads it from the local cache.
        match &self.opts.store {
            // An initial version nobody wrote yet: nothing to serve.
            Some(_) if current.sha256.is_empty() => Ok(None),
            Some(store) => store.materialize(&current.storage_uri).await.map(Some),
            None => Ok(None),
        }
    }

    async fn maintenance(&self) {
        match self.store.reap_expired(self.opts.retry).await {
            Ok(r) if r.requeued + r.failed + r.settled > 0 => {
                tracing::warn!(
                    requeued = r.requeued,
                    failed = r.failed,
                    settled = r.settled,
                    "reaped expired leases"
                )
            }
            Ok(_) => {}
            Err(e) => tracing::debug!(error = %e, "reaper skipped"),
        }
        match self.store.prune(self.opts.retention, 1000).await {
            Ok(n) if n > 0 => tracing::info!(pruned = n, "pruned finished jobs"),
            Ok(_) => {}
            Err(e) => tracing::debug!(error = %e, "prune skipped"),
        }
    }
}

async fn worker_heartbeat_loop(store: SharedStore, id: String, every: Duration) {
    loop {
        tokio::time::sleep(every).await;
        // The state itself is written at job boundaries; this only marks liveness.
        if let Err(e) = store.touch_worker(&id).await {
            tracing::debug!(error = %e, "worker heartbeat failed");
        }
    }
}
