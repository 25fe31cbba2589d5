//! The claim loop and one job's run: lease renewal, phases with timings and events, cancel
//! between phases, wake-on-failure, exactly-once publish, and graceful shutdown.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use claas_core::queue::{
    ClaimRequest, Claimed, FailOutcome, Lease, LeaseState, RetryPolicy, SharedStore,
};
use claas_core::types::{JobError, NewVersion, Phase, WorkerInfo, WorkerState};
use tokio::sync::watch;
use tracing::Instrument;

use crate::executor::{AdapterSource, Executor, JobContext, PhaseError};

/// Least time between two idle reconciles of the local vLLM's adapters.
const RECONCILE_MIN_INTERVAL: Duration = Duration::from_secs(1);

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
        }
    }
}

/// A worker bound to a store and an executor.
pub struct Worker {
    store: SharedStore,
    executor: Arc<dyn Executor>,
    opts: WorkerOptions,
}

/// How a job's run ended, for logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Succeeded,
    Failed,
    Retrying,
    Cancelled,
    LeaseLost,
    HandedBack,
}

/// Why the phase walk stopped early.
enum Stop {
    Failed(Phase, PhaseError),
    Cancelled,
    LeaseLost,
    Store(claas_core::Error),
}

impl From<claas_core::Error> for Stop {
    fn from(e: claas_core::Error) -> Self {
        Stop::Store(e)
    }
}

/// Lease state shared between the heartbeat task and the phase walk.
#[derive(Clone)]
struct LeaseWatch {
    rx: watch::Receiver<LeaseState>,
}

impl LeaseWatch {
    fn lost(&self) -> bool {
        *self.rx.borrow() == LeaseState::Lost
    }
    fn cancel_requested(&self) -> bool {
        matches!(
            *self.rx.borrow(),
            LeaseState::Held {
                cancel_requested: true
            }
        )
    }
    async fn until_lost(mut self) {
        let _ = self.rx.wait_for(|s| *s == LeaseState::Lost).await;
    }
}

impl Worker {
    pub fn new(store: SharedStore, executor: Arc<dyn Executor>, opts: WorkerOptions) -> Self {
        Worker {
            store,
            executor,
            opts,
        }
    }

    /// Runs until `shutdown` turns true: claims and runs jobs one at a time. Database
    /// outages are logged and waited out; the process keeps running.
    pub async fn run(&self, mut shutdown: watch::Receiver<bool>) -> claas_core::Result<()> {
        self.register_until_ok(&mut shutdown).await;
        if let Err(e) = self.executor.on_start().await {
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
            if let Err(why) = self.executor.ready().await {
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
                    if self.executor.controls_vllm()
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
        let served = match self.executor.served_adapters().await {
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
            match self.executor.serve_adapter(&name, &current).await {
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
            match self.executor.serve_adapter(&lora_id, &dir).await {
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
        let versions = self.store.lora_versions(lora_id).await?;
        let Some(current) = versions.iter().find(|v| v.version == lora.current_version) else {
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

    /// Runs one claimed job to an end, or hands it back when shutdown's grace runs out.
    async fn run_claimed(&self, claimed: Claimed, shutdown: &mut watch::Receiver<bool>) {
        let span = tracing::info_span!(
            "job",
            job_id = %claimed.job.id,
            lora_id = %claimed.job.lora_id,
            attempt = claimed.job.attempt
        );
        claas_core::telemetry::set_parent(&span, claimed.job.trace_context.as_ref());
        self.run_claimed_in_span(claimed, shutdown)
            .instrument(span)
            .await
    }

    async fn run_claimed_in_span(&self, claimed: Claimed, shutdown: &mut watch::Receiver<bool>) {
        let lease = claimed.lease();
        let ctx = JobContext {
            job_id: claimed.job.id,
            lora_id: claimed.job.lora_id.clone(),
            base_model: claimed.job.base_model.clone(),
            attempt: claimed.job.attempt,
            orchestration: claimed.job.orchestration.clone(),
        };
        tracing::info!(members = claimed.members.len(), "claimed");
        let (lease_tx, lease_rx) = watch::channel(LeaseState::Held {
            cancel_requested: claimed.job.cancel_requested,
        });
        let hb = tokio::spawn(lease_heartbeat_loop(
            self.store.clone(),
            lease.clone(),
            self.opts.lease,
            lease_tx,
        ));
        let _ = self
            .store
            .worker_heartbeat(&self.opts.id, WorkerState::Training, Some(ctx.job_id))
            .await;
        let slept = Arc::new(AtomicBool::new(false));
        let watch = LeaseWatch { rx: lease_rx };
        let mut run = Box::pin(self.walk(&claimed, &ctx, &lease, watch.clone(), slept.clone()));
        let outcome = tokio::select! {
            o = &mut run => o,
            _ = shutdown_deadline(shutdown.clone(), self.opts.shutdown_grace) => {
                tracing::warn!("shutdown grace ran out; handing the job back");
                match self.store.release(&lease).await {
                    Ok(true) => Outcome::HandedBack,
                    _ => Outcome::LeaseLost,
                }
            }
        };
        // Abandon the walk (if shutdown won) before waking vLLM below.
        drop(run);
        if slept.load(Ordering::SeqCst) && outcome != Outcome::Succeeded {
            // vLLM must not stay asleep because training stopped early.
            if let Err(e) = self.executor.wake(&ctx).await {
                tracing::error!(error = %e, "could not wake vLLM after the job stopped");
            }
        }
        hb.abort();
        let _ = self
            .store
            .worker_heartbeat(&self.opts.id, WorkerState::Idle, None)
            .await;
        tracing::info!(?outcome, "job finished");
    }

    /// The phase walk. Returns how the job ended; every store write is fenced by `lease`.
    async fn walk(
        &self,
        claimed: &Claimed,
        ctx: &JobContext,
        lease: &Lease,
        watch: LeaseWatch,
        slept: Arc<AtomicBool>,
    ) -> Outcome {
        let mut clock = PhaseClock::new(Phase::Claimed);
        let result = self
            .phases(claimed, ctx, lease, &watch, &slept, &mut clock)
            .await;
        let store = &self.store;
        match result {
            Ok(result) => match store.complete(lease, &result, clock.finish()).await {
                Ok(true) => Outcome::Succeeded,
                Ok(false) => Outcome::LeaseLost,
                Err(e) => {
                    tracing::error!(error = %e, "could not record completion; the lease will expire and the job resume after publish");
                    Outcome::LeaseLost
                }
            },
            Err(Stop::LeaseLost) => Outcome::LeaseLost,
            Err(Stop::Cancelled) => {
                self.wake_after_stop(ctx, &slept, true).await;
                match store.finish_cancelled(lease, "cancelled by request").await {
                    Ok(true) => Outcome::Cancelled,
                    _ => Outcome::LeaseLost,
                }
            }
            Err(Stop::Failed(phase, err)) => {
                tracing::warn!(phase = phase.as_str(), error = %err, "phase failed");
                let wake = ctx.orchestration.wake_on_failure || self.opts.wake_on_failure;
                let vllm = self.wake_after_stop(ctx, &slept, wake).await;
                // Asked to leave vLLM asleep after a failure (for inspection): the
                // fallback in run_claimed must not wake it either.
                slept.store(false, Ordering::SeqCst);
                let job_err = JobError {
                    code: err.code.clone(),
                    // The job says what became of vLLM, not just what failed.
                    message: match vllm {
                        Some(v) => format!("{} ({v})", err.message),
                        None => err.message.clone(),
                    },
                    phase: Some(phase),
                };
                match store
                    .fail(lease, &job_err, err.retryable, self.opts.retry)
                    .await
                {
                    Ok(FailOutcome::Retrying) => Outcome::Retrying,
                    Ok(FailOutcome::Failed) => Outcome::Failed,
                    Ok(FailOutcome::Cancelled) => Outcome::Cancelled,
                    Ok(FailOutcome::LeaseLost) => Outcome::LeaseLost,
                    Err(e) => {
                        tracing::error!(error = %e, "could not record failure; the lease will expire");
                        Outcome::LeaseLost
                    }
                }
            }
            Err(Stop::Store(e)) => {
                tracing::error!(error = %e, "store unavailable mid-job; leaving it to the lease");
                Outcome::LeaseLost
            }
        }
    }

    /// The LoRA's current version, which this job trains from.
    async fn adapter_source(&self, ctx: &JobContext) -> Result<AdapterSource, Stop> {
        let lora = self.store.get_lora(&ctx.lora_id).await?.ok_or_else(|| {
            Stop::Failed(
                Phase::Distill,
                PhaseError::fatal(
                    "lora_not_found",
                    format!("LoRA {} no longer exists", ctx.lora_id),
                ),
            )
        })?;
        let versions = self.store.lora_versions(&ctx.lora_id).await?;
        let (uri, sha256) = versions
            .iter()
            .find(|v| v.version == lora.current_version)
            .map(|v| (v.storage_uri.clone(), v.sha256.clone()))
            .unwrap_or_default();
        Ok(AdapterSource {
            version: lora.current_version,
            uri,
            sha256,
            base_model: lora.base_model,
            rank: lora.rank,
            alpha: lora.alpha,
            target_modules: lora.target_modules,
        })
    }

    /// Publish changed nothing: either the lease is gone, or the LoRA moved on while this
    /// job trained (re-initialised with `overwrite`), so the trained step no longer applies.
    /// The second is a retryable failure: the next attempt trains on the current version.
    async fn publish_refused(&self, lease: &Lease, version: i32) -> Stop {
        match self.store.heartbeat(lease, self.opts.lease).await {
            Ok(LeaseState::Held { .. }) => Stop::Failed(
                Phase::Publish,
                PhaseError::retryable(
                    "version_conflict",
                    format!(
                        "LoRA version {} is no longer current, so version {version} cannot follow it; \
                         retrying on the current version",
                        version - 1
                    ),
                ),
            ),
            Ok(LeaseState::Lost) => Stop::LeaseLost,
            Err(e) => Stop::Store(e),
        }
    }

    /// Retention after a publish: removes the files of versions beyond the newest
    /// `versions_keep` (never version 0, pinned ones, or files a kept version serves).
    /// Best effort: a failure leaves files behind, never removes a kept one.
    async fn prune_old_versions(&self, lora_id: &str) {
        let uris = match self
            .store
            .prune_versions(lora_id, self.opts.versions_keep)
            .await
        {
            Ok(u) => u,
            Err(e) => {
                tracing::warn!(error = %e, "retention skipped");
                return;
            }
        };
        for uri in uris {
            if let Some(store) = &self.opts.store {
                match store.remove(&uri).await {
                    Ok(()) => tracing::info!(%uri, "removed an old adapter version"),
                    Err(e) => tracing::warn!(%uri, error = %e, "could not remove an old version"),
                }
                continue;
            }
            let Some(dir) = claas_core::types::local_path(&uri) else {
                continue;
            };
            match tokio::fs::remove_dir_all(&dir).await {
                Ok(()) => tracing::info!(dir = %dir.display(), "removed an old adapter version"),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::warn!(dir = %dir.display(), error = %e, "could not remove an old version")
                }
            }
        }
    }

    /// Records what this worker's vLLM is doing, for the API's routing and the dashboard.
    async fn set_state(&self, state: WorkerState, ctx: &JobContext) {
        if let Err(e) = self
            .store
            .worker_heartbeat(&self.opts.id, state, Some(ctx.job_id))
            .await
        {
            tracing::warn!(error = %e, state = state.as_str(), "could not record the worker's state");
        }
    }

    /// Wakes vLLM if this job slept it and `wake` says so; returns what happened to vLLM,
    /// for the job's error (`None` when it was not slept).
    async fn wake_after_stop(
        &self,
        ctx: &JobContext,
        slept: &AtomicBool,
        wake: bool,
    ) -> Option<String> {
        if !slept.load(Ordering::SeqCst) {
            return None;
        }
        if !wake {
            return Some("vLLM was slept and is left asleep (wake_on_failure is off)".into());
        }
        slept.store(false, Ordering::SeqCst);
        Some(match self.executor.wake(ctx).await {
            Ok(()) => "vLLM was slept and woken again".into(),
            Err(e) => {
                tracing::error!(error = %e, "could not wake vLLM after stopping");
                format!("vLLM was slept and could not be woken: {e}")
            }
        })
    }

    /// Enters `phase` (fenced), then runs `step` unless the lease is lost meanwhile.
    async fn step<T>(
        &self,
        lease: &Lease,
        watch: &LeaseWatch,
        clock: &mut PhaseClock,
        phase: Phase,
        step: impl std::future::Future<Output = Result<T, PhaseError>>,
    ) -> Result<T, Stop> {
        if watch.lost() {
            return Err(Stop::LeaseLost);
        }
        if !self
            .store
            .enter_phase(lease, phase, clock.next(phase))
            .await?
        {
            return Err(Stop::LeaseLost);
        }
        self.guarded(watch, phase, step).await
    }

    /// Runs a phase's work, abandoning it as soon as the lease is lost.
    async fn guarded<T>(
        &self,
        watch: &LeaseWatch,
        phase: Phase,
        step: impl std::future::Future<Output = Result<T, PhaseError>>,
    ) -> Result<T, Stop> {
        // One span per phase, a child of the job's span (and so of the feedback request's
        // trace when the job carries one).
        let span = tracing::info_span!("phase", otel.name = phase.as_str(), phase = phase.as_str());
        async {
            tokio::select! {
                r = step => r.map_err(|e| Stop::Failed(phase, e)),
                _ = watch.clone().until_lost() => Err(Stop::LeaseLost),
            }
        }
        .instrument(span)
        .await
    }

    async fn phases(
        &self,
        claimed: &Claimed,
        ctx: &JobContext,
        lease: &Lease,
        watch: &LeaseWatch,
        slept: &AtomicBool,
        clock: &mut PhaseClock,
    ) -> Result<serde_json::Value, Stop> {
        let exec = &self.executor;
        let orch = &ctx.orchestration;
        let cancel_point = |w: &LeaseWatch| {
            if w.lost() {
                Err(Stop::LeaseLost)
            } else if w.cancel_requested() {
                Err(Stop::Cancelled)
            } else {
                Ok(())
            }
        };
        // `version` is what this job published; `serve` is what vLLM should load, which
        // differs only when a later job of the LoRA published while this one waited to resume.
        let (version, serve, metrics, batch_size) = match claimed.job.published_version {
            // A retry after publish: the version exists, only reload and wake remain.
            Some(v) => {
                let current = self.store.get_lora(&ctx.lora_id).await?;
                let serve = current.map_or(v, |l| l.current_version.max(v));
                tracing::info!(version = v, serve, "resuming after publish");
                let result = claimed.job.result.clone().unwrap_or_default();
                (
                    v,
                    serve,
                    result.get("metrics").cloned().unwrap_or_default(),
                    claimed.job.sample_count,
                )
            }
            None => {
                if orch.sleep_before {
                    cancel_point(watch)?;
                    // The API stops routing chat to this node's vLLM from here on.
                    self.set_state(WorkerState::Draining, ctx).await;
                    let grace = if exec.controls_vllm() {
                        self.opts.drain_grace
                    } else {
                        Duration::ZERO
                    };
                    let drain = async {
                        tokio::time::sleep(grace).await;
                        exec.drain(ctx).await
                    };
                    self.step(lease, watch, clock, Phase::Drain, drain).await?;
                    cancel_point(watch)?;
                    slept.store(true, Ordering::SeqCst);
                    self.set_state(WorkerState::Sleeping, ctx).await;
                    self.step(lease, watch, clock, Phase::Sleep, exec.sleep(ctx))
                        .await?;
                    cancel_point(watch)?;
                    self.step(lease, watch, clock, Phase::Vram, exec.wait_vram(ctx))
                        .await?;
                }
                cancel_point(watch)?;
                let attached = self
                    .store
                    .begin_training(lease, clock.next(Phase::Distill))
                    .await?
                    .ok_or(Stop::LeaseLost)?;
                let mut samples = claimed.payload.samples.clone();
                for (member, payload) in &claimed.members {
                    if attached.contains(&member.id) {
                        samples.extend(payload.samples.iter().cloned());
                    }
                }
                let training = &claimed.payload.training;
                let from = self.adapter_source(ctx).await?;
                let distilled = self
                    .guarded(
                        watch,
                        Phase::Distill,
                        exec.distill(ctx, &from, &samples, training),
                    )
                    .await?;
                cancel_point(watch)?;
                let metrics = distilled.metrics.clone();
                // Publishing checks that `from` is still current (else: version conflict).
                let version = from.version + 1;
                let stored = self
                    .step(
                        lease,
                        watch,
                        clock,
                        Phase::Publish,
                        exec.store_adapter(ctx, version, distilled),
                    )
                    .await?;
                let record = NewVersion {
                    version,
                    storage_uri: stored.uri,
                    sha256: stored.sha256,
                    metrics: metrics.clone(),
                };
                if !self.store.publish(lease, &record).await? {
                    return Err(self.publish_refused(lease, version).await);
                }
                self.prune_old_versions(&ctx.lora_id).await;
                let batch = i32::try_from(samples.len()).unwrap_or(i32::MAX);
                (version, version, metrics, batch)
            }
        };
        self.step(lease, watch, clock, Phase::Reload, exec.reload(ctx, serve))
            .await
            .map_err(|stop| match stop {
                Stop::Failed(phase, mut e) => {
                    e.code = "reload_failed".into();
                    e.message = format!(
                        "version {serve} is published but not loaded into vLLM: {}",
                        e.message
                    );
                    Stop::Failed(phase, e)
                }
                other => other,
            })?;
        let mut woke = false;
        if slept.load(Ordering::SeqCst) && orch.wake_after {
            self.step(lease, watch, clock, Phase::Wake, exec.wake(ctx))
                .await?;
            slept.store(false, Ordering::SeqCst);
            self.set_state(WorkerState::Training, ctx).await;
            woke = true;
        }
        Ok(serde_json::json!({
            "version": version,
            "metrics": metrics,
            "batch_size": batch_size,
            "vllm": {
                "slept": self.executor.controls_vllm()
                    && orch.sleep_before
                    && claimed.job.published_version.is_none(),
                "woke": self.executor.controls_vllm() && woke,
            },
        }))
    }
}

/// Tracks when the current phase started, to record its duration on the next transition.
struct PhaseClock {
    phase: Phase,
    since: Instant,
}

impl PhaseClock {
    fn new(phase: Phase) -> Self {
        PhaseClock {
            phase,
            since: Instant::now(),
        }
    }

    /// Moves to `phase`; returns the finished phase and its duration in ms.
    fn next(&mut self, phase: Phase) -> Option<(Phase, u64)> {
        let done = (self.phase, elapsed_ms(self.since));
        *self = PhaseClock::new(phase);
        Some(done)
    }

    fn finish(&mut self) -> Option<(Phase, u64)> {
        self.next(Phase::Done)
    }
}

fn elapsed_ms(since: Instant) -> u64 {
    u64::try_from(since.elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// Resolves `grace` after shutdown is requested (never, if it is not).
async fn shutdown_deadline(mut shutdown: watch::Receiver<bool>, grace: Duration) {
    if shutdown.wait_for(|s| *s).await.is_err() {
        std::future::pending::<()>().await;
    }
    tokio::time::sleep(grace).await;
}

/// Renews the lease every third of its length and publishes what the store says. A failed
/// renewal (database down) is retried; if the lease runs out meanwhile the next renewal
/// reports `Lost`.
async fn lease_heartbeat_loop(
    store: SharedStore,
    lease: Lease,
    length: Duration,
    tx: watch::Sender<LeaseState>,
) {
    let every = (length / 3).max(Duration::from_millis(50));
    loop {
        tokio::time::sleep(every).await;
        match store.heartbeat(&lease, length).await {
            Ok(LeaseState::Lost) => {
                tracing::warn!(job_id = %lease.job_id, "lease lost");
                let _ = tx.send(LeaseState::Lost);
                return;
            }
            Ok(state) => {
                let _ = tx.send(state);
            }
            Err(e) => tracing::warn!(error = %e, "heartbeat failed; retrying"),
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
