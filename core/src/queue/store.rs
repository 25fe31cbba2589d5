//! The store's contract, one trait per area; [`Store`] is all of them plus the lifecycle.
//! A `dyn Store` reaches every area's methods; code holding a concrete store brings the
//! area traits into scope with `use claas_core::queue::prelude::*`.

use super::*;

/// The store traits, for callers: `use claas_core::queue::prelude::*;`.
pub mod prelude {
    pub use super::{JobStore, KeyStore, LeaseStore, LoraStore, OpsStore, Store, WorkerStore};
}

/// The queue store: one backend behind every area's trait. Implementations: [`PgStore`],
/// [`SqliteStore`].
#[async_trait]
pub trait Store:
    LoraStore + KeyStore + JobStore + WorkerStore + LeaseStore + OpsStore + Send + Sync + 'static
{
    /// `postgres` or `sqlite`.
    fn backend(&self) -> &'static str;

    /// Runs pending migrations. Fails on a database newer than this binary.
    async fn migrate(&self) -> Result<()>;

    /// Cheap round trip for health checks; `Unavailable` when the database is down.
    async fn ping(&self) -> Result<()>;

    /// Wake-ups for idle claimers.
    async fn wakeups(&self) -> Result<Wakeups>;
}

/// LoRAs, their versions, and the adapters a node is asked to load.
#[async_trait]
pub trait LoraStore: Send + Sync {
    /// Creates a LoRA with version 0. `Conflict` if a live LoRA has the id, or a deleted one
    /// still has a running job; a deleted one's remaining versions are dropped and the id
    /// starts afresh (its jobs stay in the history).
    async fn create_lora(&self, lora: &NewLora) -> Result<Lora>;

    /// Starts a live LoRA afresh (`overwrite`): records `lora`'s initial adapter as version
    /// `expected + 1` with its parameters, if `expected` is still the current version;
    /// `Conflict` if a job published meanwhile, `NotFound` if there is no such LoRA. Earlier
    /// versions stay in the history.
    /// `note` is recorded as the new version's metrics (`{"reinitialized": true}`,
    /// `{"rollback_of": N}`).
    async fn reinit_lora(
        &self,
        lora: &NewLora,
        expected: i32,
        note: &serde_json::Value,
    ) -> Result<Lora>;

    /// Pins or unpins a version (retention never removes a pinned version's files); false
    /// when there is no such version.
    async fn pin_version(&self, lora_id: &str, version: i32, pinned: bool) -> Result<bool>;

    /// Retention: marks the versions beyond the newest `keep` as pruned (never version 0,
    /// a pinned one, or files a kept version still points at) and returns their storage
    /// URIs, whose files the caller removes.
    async fn prune_versions(&self, lora_id: &str, keep: i32) -> Result<Vec<String>>;

    /// Marks a live LoRA deleted, so nothing new is enqueued for it; returns the deletion's
    /// time, which [`Store::purge_lora`] takes as its token, or `None` when no live LoRA has
    /// the id. Its jobs are cancelled by the caller.
    async fn delete_lora(&self, lora_id: &str) -> Result<Option<DateTime<Utc>>>;

    /// Drops the version rows of a LoRA deleted at `deleted_at` (the token), unless it was
    /// created again since. Returns the dropped versions' `storage_uri`s, whose files the
    /// caller removes, or `None` when it was created again.
    async fn purge_lora(
        &self,
        lora_id: &str,
        deleted_at: DateTime<Utc>,
    ) -> Result<Option<Vec<String>>>;

    /// A live (not deleted) LoRA, or `None`.
    async fn get_lora(&self, lora_id: &str) -> Result<Option<Lora>>;

    /// The live LoRA whose [`crate::types::adapter_name`] is `name` (its id with `/` as
    /// `-`), or `None`; the first by id if several share it (init refuses new ones that would).
    async fn lora_by_adapter_name(&self, name: &str) -> Result<Option<Lora>>;

    /// Live LoRAs whose id starts with `prefix` (literally: `%` and `_` are not wildcards),
    /// by id.
    async fn list_loras(&self, prefix: &str) -> Result<Vec<Lora>>;

    /// Versions of a LoRA, oldest first.
    async fn lora_versions(&self, lora_id: &str) -> Result<Vec<LoraVersion>>;

    /// The version `lora` serves now (its `current_version`); `None` if that row is gone
    /// (the LoRA was deleted meanwhile).
    async fn current_version(&self, lora: &Lora) -> Result<Option<LoraVersion>> {
        Ok(self
            .lora_versions(&lora.lora_id)
            .await?
            .into_iter()
            .find(|v| v.version == lora.current_version))
    }

    /// Asks the worker next to the vLLM at `vllm_url` to load LoRA `lora_id`'s current
    /// version into it (once per pair until taken), and wakes idle workers.
    async fn request_adapter(&self, vllm_url: &str, lora_id: &str) -> Result<()>;

    /// Takes (removes and returns) the LoRA ids requested for the vLLM at `vllm_url`,
    /// oldest first.
    async fn take_adapter_requests(&self, vllm_url: &str) -> Result<Vec<String>>;
}

/// API keys (hashed secrets).
#[async_trait]
pub trait KeyStore: Send + Sync {
    /// Stores a key (its secret's SHA-256 only).
    async fn create_api_key(&self, key: &ApiKey, secret_hash: &str) -> Result<()>;

    /// Every key, newest first, revoked ones included.
    async fn list_api_keys(&self) -> Result<Vec<ApiKey>>;

    /// Revokes a key; false when there is no such live key. Refuses (`Conflict`) to revoke
    /// the last live admin key, in the same statement, so no race leaves none.
    async fn revoke_api_key(&self, id: &str) -> Result<bool>;

    /// The live key whose secret hashes to `secret_hash`.
    async fn find_api_key(&self, secret_hash: &str) -> Result<Option<ApiKey>>;

    /// The live key `id` and its secret's hash (a dashboard session names its key by id and
    /// is signed over the hash).
    async fn find_api_key_by_id(&self, id: &str) -> Result<Option<(ApiKey, String)>>;

    /// Whether a key was ever created, revoked ones included: from then on the API
    /// requires one (revoking keys never opens it again).
    async fn any_api_key_created(&self) -> Result<bool>;
}

/// Intake and reads: enqueue, look up, list, cancel, count.
#[async_trait]
pub trait JobStore: Send + Sync {
    /// Jobs still queued that `caller` enqueued (per-key backpressure).
    async fn queued_jobs_of(&self, caller: &str) -> Result<i64>;

    /// Numbers for `/metrics`; `window` bounds the finished jobs looked at.
    async fn metrics_snapshot(&self, window: Duration) -> Result<MetricsSnapshot>;

    /// Stores a job and its first event in one transaction and wakes idle workers.
    /// With an idempotency key: a replay with the same request hash returns the existing
    /// job (`created = false`); a different hash is `Conflict`. `NotFound` for an unknown
    /// or deleted LoRA.
    async fn enqueue(&self, job: &NewJob) -> Result<Enqueued>;

    /// One job, or `None`.
    async fn get_job(&self, id: Uuid) -> Result<Option<Job>>;

    /// Of `ids`, those whose jobs have not finished (queued, joined or running); the
    /// others are finished or gone. One statement for all of them: an API process asks it
    /// for every feedback request it holds open.
    async fn unfinished_jobs(&self, ids: &[Uuid]) -> Result<Vec<Uuid>>;

    /// Jobs matching the filter, newest first.
    async fn list_jobs(&self, filter: &JobFilter) -> Result<Vec<Job>>;

    /// A job's timeline, oldest first.
    async fn job_events(&self, id: Uuid) -> Result<Vec<JobEvent>>;

    /// Cancels a queued job at once (or detaches a joined job before its batch trains);
    /// flags a running job. `NotFound` if absent; `Conflict` if finished or already training.
    async fn cancel(&self, id: Uuid) -> Result<CancelOutcome>;

    /// Cancels every queued, joined and running job of a LoRA (a running one is asked to
    /// stop at its next phase boundary); returns how many were cancelled. Each goes through
    /// [`JobStore::cancel`], so its rules (a job already published or finished is refused)
    /// and events are the same as for one job.
    async fn cancel_jobs_of_lora(&self, lora_id: &str) -> Result<usize> {
        const PAGE: i64 = 500;
        let mut n = 0;
        for status in [JobStatus::Queued, JobStatus::Coalesced, JobStatus::Running] {
            let mut before = None;
            loop {
                let page = self
                    .list_jobs(&JobFilter {
                        lora_id: Some(lora_id.to_owned()),
                        status: Some(status),
                        before,
                        limit: PAGE,
                        ..JobFilter::default()
                    })
                    .await?;
                for j in &page {
                    if self.cancel(j.id).await.is_ok() {
                        n += 1;
                    }
                }
                match page.last() {
                    Some(last) if page.len() as i64 == PAGE => before = Some(last.id),
                    _ => break,
                }
            }
        }
        Ok(n)
    }

    /// Number of jobs per status (dashboard and metrics).
    async fn status_counts(&self) -> Result<Vec<(JobStatus, i64)>>;

    /// The feedback samples of a job, or `None` when there is no such job.
    async fn job_payload(&self, id: Uuid) -> Result<Option<JobPayload>>;
}

/// The worker registry (who is alive, doing what).
#[async_trait]
pub trait WorkerStore: Send + Sync {
    /// Inserts or refreshes the worker's row.
    async fn register_worker(&self, worker: &WorkerInfo) -> Result<()>;

    /// Records the worker's liveness and state.
    async fn worker_heartbeat(
        &self,
        worker_id: &str,
        state: WorkerState,
        current_job: Option<Uuid>,
    ) -> Result<()>;

    /// Marks the worker alive without changing its state.
    async fn touch_worker(&self, worker_id: &str) -> Result<()>;

    /// Registered workers, most recently seen first.
    async fn list_workers(&self) -> Result<Vec<WorkerRow>>;
}

/// The worker's path through a job: claim, then every write fenced by the lease.
#[async_trait]
pub trait LeaseStore: Send + Sync {
    /// Claims the highest-priority, oldest runnable job whose LoRA has no running job and
    /// coalesces same-config queued jobs of that LoRA into its batch. `None` when nothing
    /// is runnable; a lost race on a LoRA is retried, never surfaced.
    async fn claim(&self, req: &ClaimRequest) -> Result<Option<Claimed>>;

    /// Extends the lease by `extend`. `Lost` if the lease expired or the job was reclaimed.
    async fn heartbeat(&self, lease: &Lease, extend: Duration) -> Result<LeaseState>;

    /// Enters `phase`, adding the previous phase's duration to `timings_ms` and an event.
    /// `false` if the lease was lost.
    async fn enter_phase(
        &self,
        lease: &Lease,
        phase: Phase,
        finished: Option<(Phase, u64)>,
    ) -> Result<bool>;

    /// Enters `distill`: from here on the batch's members can no longer be cancelled.
    /// Returns the ids of members still attached (a member cancelled before this is not
    /// trained), or `None` if the lease was lost.
    async fn begin_training(
        &self,
        lease: &Lease,
        finished: Option<(Phase, u64)>,
    ) -> Result<Option<Vec<Uuid>>>;

    /// Takes `member` out of the running batch before it trains, fenced by the lead's lease:
    /// with `error` the member fails alone (its own sample cannot train); with `None` it goes
    /// back to the queue (the lead is about to fail for its own sample). One statement;
    /// `false` when the lease is lost or `member` is not a waiting member of this batch.
    async fn leave_batch(
        &self,
        lease: &Lease,
        member: Uuid,
        error: Option<&JobError>,
    ) -> Result<bool>;

    /// Records the new adapter version, moves the LoRA's current version and marks the job
    /// and its members as trained, in one transaction. `false` if the lease was lost or the
    /// LoRA's current version is not `version - 1`.
    async fn publish(&self, lease: &Lease, version: &NewVersion) -> Result<bool>;

    /// Marks the job and its members `succeeded` with `result`. `false` if the lease was lost.
    async fn complete(
        &self,
        lease: &Lease,
        result: &serde_json::Value,
        finished: Option<(Phase, u64)>,
    ) -> Result<bool>;

    /// Reports a failure. Retryable failures go back to `queued` after a backoff while
    /// attempts remain (members are detached unless already published); fatal ones, and
    /// the last attempt, end `failed` with the members.
    async fn fail(
        &self,
        lease: &Lease,
        error: &JobError,
        retryable: bool,
        retry: RetryPolicy,
    ) -> Result<FailOutcome>;

    /// Ends a running job whose cancel was requested as `cancelled`; members are detached
    /// back to `queued`. `false` if the lease was lost.
    async fn finish_cancelled(&self, lease: &Lease, message: &str) -> Result<bool>;

    /// Hands a running job back on shutdown: `queued` at once, without spending an attempt.
    async fn release(&self, lease: &Lease) -> Result<bool>;

    /// Puts jobs whose lease expired back (or fails them after `max_attempts`).
    async fn reap_expired(&self, retry: RetryPolicy) -> Result<Reaped>;
}

/// Maintenance and operators' actions (prune, retry, delete, audit).
#[async_trait]
pub trait OpsStore: Send + Sync {
    /// Deletes up to `batch` finished jobs (and their events) older than `older_than`.
    async fn prune(&self, older_than: Duration, batch: i64) -> Result<u64>;

    /// Puts a `failed` job back in the queue with fresh attempts (its error is kept in the
    /// timeline), recording `message` as an event. `NotFound` if absent, `Conflict` if the job
    /// is not failed or its LoRA was deleted.
    async fn retry_job(&self, id: Uuid, message: &str) -> Result<Job>;

    /// Deletes a finished job and its timeline; `NotFound` if absent, `Conflict` if the job
    /// has not finished.
    async fn delete_job(&self, id: Uuid) -> Result<Job>;

    /// Appends an event to a job's timeline (nothing if the job is gone).
    async fn add_job_event(&self, id: Uuid, phase: &str, message: &str) -> Result<()>;

    /// Records what an operator did.
    async fn record_audit(&self, entry: &AuditEntry) -> Result<()>;

    /// The newest audit entries, newest first.
    async fn recent_audit(&self, limit: i64) -> Result<Vec<AuditEntry>>;
}
