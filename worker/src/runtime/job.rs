//! One claimed job's run: lease renewal beside it, the phases with their timings and
//! events, cancel between phases, wake-on-failure, exactly-once publish, and handing the
//! job back when shutdown's grace runs out.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use claas_core::queue::{Claimed, FailOutcome, Lease, LeaseState, SharedStore};
use claas_core::types::{JobError, Phase, Sample, WorkerState};
use tokio::sync::watch;
use tracing::Instrument;
use uuid::Uuid;

use super::Worker;
use crate::executor::{AdapterSource, Distilled, JobContext, PhaseError, ServedVersion};

mod phases;
use phases::Walk;

/// How old unpublished files must be before retention removes them (at least twice the
/// lease, too: a live attempt publishes within its lease of writing).
const ORPHAN_GRACE: Duration = Duration::from_secs(600);

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

/// What recording a walk's end needs: the job, its lease, and what it trained and when.
struct Ending<'a> {
    claimed: &'a Claimed,
    ctx: &'a JobContext,
    lease: &'a Lease,
    trained: &'a [Sample],
    clock: &'a mut PhaseClock,
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
    /// Runs one claimed job to an end, or hands it back when shutdown's grace runs out.
    pub(super) async fn run_claimed(&self, claimed: Claimed, shutdown: &mut watch::Receiver<bool>) {
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
            write_tag: lease.token.simple().to_string()[..16].to_owned(),
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
            if let Err(e) = self.executor.serving.wake(&ctx).await {
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
        let mut trained = Vec::new();
        let result = self
            .phases(&mut Walk {
                claimed,
                ctx,
                lease,
                watch: &watch,
                slept: &slept,
                clock: &mut clock,
                trained: &mut trained,
            })
            .await;
        // Resumed after publish (or stopped before training): the claimed samples.
        let trained = if trained.is_empty() {
            &claimed.payload.samples
        } else {
            &trained
        };
        let mut end = Ending {
            claimed,
            ctx,
            lease,
            trained,
            clock: &mut clock,
        };
        match result {
            Ok(result) => self.record_success(&mut end, result).await,
            Err(Stop::LeaseLost) => Outcome::LeaseLost,
            Err(Stop::Cancelled) => {
                self.wake_after_stop(ctx, &slept, true).await;
                match self
                    .store
                    .finish_cancelled(lease, "cancelled by request")
                    .await
                {
                    Ok(true) => Outcome::Cancelled,
                    _ => Outcome::LeaseLost,
                }
            }
            Err(Stop::Failed(phase, err)) => self.record_failure(&end, &slept, phase, err).await,
            Err(Stop::Store(e)) => {
                tracing::error!(error = %e, "store unavailable mid-job; leaving it to the lease");
                Outcome::LeaseLost
            }
        }
    }

    /// A finished walk: the feedback log written, then the completion recorded (the log
    /// removed again when the completion is not, since the step resumes elsewhere).
    async fn record_success(&self, end: &mut Ending<'_>, mut result: serde_json::Value) -> Outcome {
        let last = end.clock.phase;
        let done = end.clock.finish();
        let log = self
            .feedback_log(
                end.ctx,
                end.claimed,
                end.trained,
                end.clock,
                last,
                None,
                Some(&result),
            )
            .await;
        if let (Some(path), Some(r)) = (&log, result.as_object_mut()) {
            r.insert(
                "feedback_log_path".into(),
                path.display().to_string().into(),
            );
        }
        let recorded = self.store.complete(end.lease, &result, done).await;
        if !matches!(recorded, Ok(true)) {
            if let Some(path) = log {
                let _ = tokio::fs::remove_file(path).await;
            }
        }
        match recorded {
            Ok(true) => Outcome::Succeeded,
            Ok(false) => Outcome::LeaseLost,
            Err(e) => {
                tracing::error!(error = %e, "could not record completion; the lease will expire and the job resume after publish");
                Outcome::LeaseLost
            }
        }
    }

    /// A failed phase: vLLM woken (unless the job asked to leave it asleep), the failure
    /// recorded as a retry or a final failure (then with its feedback log).
    async fn record_failure(
        &self,
        end: &Ending<'_>,
        slept: &AtomicBool,
        phase: Phase,
        err: PhaseError,
    ) -> Outcome {
        tracing::warn!(phase = phase.as_str(), error = %err, "phase failed");
        let wake = end.ctx.orchestration.wake_on_failure || self.opts.wake_on_failure;
        let vllm = self.wake_after_stop(end.ctx, slept, wake).await;
        // Asked to leave vLLM asleep after a failure (for inspection): the fallback in
        // run_claimed must not wake it either.
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
        let failed = self
            .store
            .fail(end.lease, &job_err, err.retryable, self.opts.retry);
        match failed.await {
            Ok(FailOutcome::Retrying) => Outcome::Retrying,
            Ok(FailOutcome::Failed) => {
                let error = Some((phase, job_err.message.as_str()));
                self.feedback_log(
                    end.ctx,
                    end.claimed,
                    end.trained,
                    end.clock,
                    phase,
                    error,
                    None,
                )
                .await;
                Outcome::Failed
            }
            Ok(FailOutcome::Cancelled) => Outcome::Cancelled,
            Ok(FailOutcome::LeaseLost) => Outcome::LeaseLost,
            Err(e) => {
                tracing::error!(error = %e, "could not record failure; the lease will expire");
                Outcome::LeaseLost
            }
        }
    }

    /// The distill phase on the lead's samples and its `attached` members'. A sample the
    /// trainer refuses as bad input fails only its own job: a member's leaves the batch
    /// failed and the rest trains without it; the lead's own sends its members back to the
    /// queue before the lead fails. Returns the result and how many samples it trained on.
    async fn distill_batch(
        &self,
        claimed: &Claimed,
        attached: &[Uuid],
        ctx: &JobContext,
        lease: &Lease,
        watch: &LeaseWatch,
        from: &AdapterSource,
    ) -> Result<(Distilled, Vec<Sample>), Stop> {
        let mut batch: Vec<(Uuid, Sample)> = std::iter::once((claimed.job.id, &claimed.payload))
            .chain(
                (claimed.members.iter())
                    .filter(|(m, _)| attached.contains(&m.id))
                    .map(|(m, p)| (m.id, p)),
            )
            .flat_map(|(id, p)| p.samples.iter().map(move |s| (id, s.clone())))
            .collect();
        let training = &claimed.payload.training;
        loop {
            let samples: Vec<Sample> = batch.iter().map(|(_, s)| s.clone()).collect();
            let step = self.executor.trainer.distill(ctx, from, &samples, training);
            let (phase, err) = match self.guarded(watch, Phase::Distill, step).await {
                Ok(distilled) => return Ok((distilled, samples)),
                Err(Stop::Failed(phase, e)) => (phase, e),
                Err(other) => return Err(other),
            };
            let Some(owner) = err.sample.and_then(|i| batch.get(i)).map(|(id, _)| *id) else {
                return Err(Stop::Failed(phase, err));
            };
            if owner == claimed.job.id {
                let mut members: Vec<Uuid> = batch.iter().map(|(id, _)| *id).collect();
                members.dedup();
                for m in members.into_iter().filter(|m| *m != owner) {
                    if !self.store.leave_batch(lease, m, None).await? {
                        return Err(Stop::LeaseLost);
                    }
                }
                return Err(Stop::Failed(phase, err));
            }
            let job_err = JobError {
                code: err.code.clone(),
                message: err.message.clone(),
                phase: Some(phase),
            };
            if !self.store.leave_batch(lease, owner, Some(&job_err)).await? {
                return Err(Stop::LeaseLost);
            }
            tracing::warn!(job = %owner, error = %err.message,
                "a member's sample is bad input: it fails alone, the batch trains without it");
            batch.retain(|(id, _)| *id != owner);
        }
    }

    /// Writes the job's record into the feedback log, when one is configured; returns its
    /// path. A log that cannot be written costs a warning, never the job.
    #[allow(clippy::too_many_arguments)]
    async fn feedback_log(
        &self,
        ctx: &JobContext,
        claimed: &Claimed,
        samples: &[Sample],
        clock: &PhaseClock,
        phase: Phase,
        error: Option<(Phase, &str)>,
        result: Option<&serde_json::Value>,
    ) -> Option<std::path::PathBuf> {
        let dir = self.opts.feedback_log_dir.clone()?;
        let record = crate::feedback_log::Record {
            job_id: ctx.job_id,
            lora_id: &ctx.lora_id,
            finished_at: chrono::Utc::now(),
            error,
            phase,
            samples,
            training: &claimed.payload.training,
            orchestration: &ctx.orchestration,
            result,
            phase_ms: &clock.spent,
        };
        crate::feedback_log::write(dir, &record).await
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
        let (uri, sha256) = (self.store.current_version(&lora).await?)
            .map(|v| (v.storage_uri, v.sha256))
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

    /// The published `version` of the LoRA as recorded, with the one before it.
    async fn recorded(&self, lora_id: &str, version: i32) -> Result<ServedVersion, Stop> {
        let versions = self.store.lora_versions(lora_id).await?;
        let uri_of = |n: i32| {
            versions
                .iter()
                .find(|v| v.version == n)
                .map(|v| v.storage_uri.clone())
        };
        let uri = uri_of(version).ok_or_else(|| {
            Stop::Failed(
                Phase::Reload,
                PhaseError::fatal(
                    "version_not_found",
                    format!("LoRA {lora_id} has no version {version} any more"),
                ),
            )
        })?;
        Ok(ServedVersion {
            version,
            uri,
            previous_uri: uri_of(version - 1),
        })
    }

    /// Removes one version's files, wherever they are stored.
    async fn remove_version(&self, uri: &str) -> claas_core::Result<()> {
        match self.executor.trainer.remove_stored(uri).await {
            Ok(true) => return Ok(()),
            Ok(false) => {}
            Err(e) => return Err(claas_core::Error::Storage(e.to_string())),
        }
        match (&self.opts.store, claas_core::types::local_path(uri)) {
            (Some(store), _) => store.remove(uri).await,
            (None, Some(path)) => claas_core::adapter_store::remove_local(&path).await,
            (None, None) => Ok(()),
        }
    }

    /// Publish changed nothing: the lease is gone, the LoRA is being deleted (and this job
    /// was asked to stop), or the LoRA moved on while this job trained (re-initialised with
    /// `overwrite`), so the trained step no longer applies. The last is a retryable
    /// failure: the next attempt trains on the current version.
    async fn publish_refused(&self, lease: &Lease, version: i32) -> Stop {
        match self.store.heartbeat(lease, self.opts.lease).await {
            // Deleted meanwhile: the delete asked this job to stop.
            Ok(LeaseState::Held {
                cancel_requested: true,
            }) => Stop::Cancelled,
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
            match self.remove_version(&uri).await {
                Ok(()) => tracing::info!(%uri, "removed an old adapter version"),
                Err(e) => tracing::warn!(%uri, error = %e, "could not remove an old version"),
            }
        }
        self.remove_orphans(lora_id).await;
    }

    /// Removes what attempts of the LoRA wrote and never published (a crash, or a stalled
    /// writer whose lease was lost), once older than any lease could be.
    async fn remove_orphans(&self, lora_id: &str) {
        let Some(store) = &self.opts.store else {
            return;
        };
        let recorded: Vec<String> = match self.store.lora_versions(lora_id).await {
            Ok(v) => v.into_iter().map(|v| v.storage_uri).collect(),
            Err(e) => {
                tracing::warn!(error = %e, "orphan sweep skipped");
                return;
            }
        };
        let grace = ORPHAN_GRACE.max(self.opts.lease * 2);
        let orphans = match store.orphans(lora_id, &recorded, grace).await {
            Ok(o) => o,
            Err(e) => {
                tracing::warn!(error = %e, "orphan sweep skipped");
                return;
            }
        };
        for uri in orphans {
            match store.remove(&uri).await {
                Ok(()) => tracing::info!(%uri, "removed an unpublished adapter version"),
                Err(e) => {
                    tracing::warn!(%uri, error = %e, "could not remove an unpublished version")
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
        Some(match self.executor.serving.wake(ctx).await {
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
}

/// Tracks when the current phase started, to record its duration on the next transition,
/// and keeps every finished phase's duration (for the feedback log).
struct PhaseClock {
    phase: Phase,
    since: Instant,
    spent: Vec<(Phase, u64)>,
}

impl PhaseClock {
    fn new(phase: Phase) -> Self {
        PhaseClock {
            phase,
            since: Instant::now(),
            spent: Vec::new(),
        }
    }

    /// Moves to `phase`; returns the finished phase and its duration in ms.
    fn next(&mut self, phase: Phase) -> Option<(Phase, u64)> {
        let done = (self.phase, elapsed_ms(self.since));
        self.spent.push(done);
        self.phase = phase;
        self.since = Instant::now();
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
