//! The durable job queue: one interface, two stores (Postgres for fleets, SQLite for the
//! embedded default). Every state change is one named method; each documents its failure
//! policy. Fenced writes take a [`Lease`] and report whether they changed anything: `false`
//! means the lease was lost and the caller must stop touching the job.

mod postgres;
mod sqlite;
mod store;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::Serialize;
use tokio::sync::watch;
use uuid::Uuid;

pub use postgres::{PgStore, PoolSettings};
pub use sqlite::SqliteStore;
pub use store::{prelude, JobStore, KeyStore, LeaseStore, LoraStore, OpsStore, Store, WorkerStore};

use crate::error::Result;
use crate::types::{
    ApiKey, Job, JobError, JobEvent, JobPayload, JobStatus, Lora, LoraVersion, NewJob, NewLora,
    NewVersion, Phase, WorkerInfo, WorkerRow, WorkerState,
};

/// What a worker asks for when it claims.
#[derive(Debug, Clone)]
pub struct ClaimRequest {
    pub worker_id: String,
    /// Only jobs whose LoRA uses one of these base models are claimed.
    pub base_models: Vec<String>,
    /// How long the lease lasts before a heartbeat must renew it.
    pub lease: Duration,
    /// Upper bound on samples in one batch (`feedback_max_batch_size`).
    pub max_batch_samples: i32,
}

/// The fencing token of a claimed job: every write for the job names it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Lease {
    pub job_id: Uuid,
    pub attempt: i32,
    pub worker_id: String,
    /// Drawn at random by each claim and written with it; the fence compares it, so two
    /// claims of one attempt by one worker id (a claim a database crash undid, made again
    /// by another process configured with the same id) never share a lease.
    #[serde(skip)]
    pub token: Uuid,
}

/// A claimed job with the jobs coalesced into its batch.
#[derive(Debug, Clone)]
pub struct Claimed {
    pub job: Job,
    pub payload: JobPayload,
    /// Jobs that joined this batch (status `coalesced`, `trained_by` = `job.id`).
    pub members: Vec<(Job, JobPayload)>,
    /// This claim's fencing token (see [`Lease::token`]).
    pub token: Uuid,
}

impl Claimed {
    pub fn lease(&self) -> Lease {
        Lease {
            job_id: self.job.id,
            attempt: self.job.attempt,
            worker_id: self.job.worker_id.clone().unwrap_or_default(),
            token: self.token,
        }
    }

    /// All samples of the batch: the claimed job's first, then each member's.
    pub fn samples(&self) -> impl Iterator<Item = &crate::types::Sample> {
        std::iter::once(&self.payload)
            .chain(self.members.iter().map(|(_, p)| p))
            .flat_map(|p| p.samples.iter())
    }
}

/// The answer to a heartbeat.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseState {
    /// The lease was renewed; `cancel_requested` says whether someone asked to stop.
    Held { cancel_requested: bool },
    /// The job is no longer ours: stop without writing anything for it.
    Lost,
}

/// The result of enqueueing.
#[derive(Debug, Clone)]
pub struct Enqueued {
    pub job: Job,
    /// `false` when an idempotent replay returned an existing job.
    pub created: bool,
}

/// What a cancel did.
#[derive(Debug, Clone, PartialEq)]
pub enum CancelOutcome {
    /// The job was queued (or joined but not yet training) and is now cancelled.
    Cancelled(Job),
    /// The job is running; the worker will see the request between phases.
    Requested(Job),
}

/// What a failure report did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailOutcome {
    /// Back to `queued`, to run again after the backoff.
    Retrying,
    /// Terminal: `failed` (fatal error or attempts exhausted). A job that had published
    /// keeps `published_version` and its result: its version exists but is not served.
    Failed,
    /// Terminal: `cancelled`, because a cancel was requested before the failure and the
    /// job would otherwise have gone back to the queue.
    Cancelled,
    /// The lease was lost; nothing changed.
    LeaseLost,
}

/// Filters for listing jobs, newest first; `before` is the cursor (the last id seen).
#[derive(Debug, Clone, Default)]
pub struct JobFilter {
    pub lora_id: Option<String>,
    /// Only LoRAs whose id starts with one of these (API keys limited to prefixes).
    pub lora_prefixes: Option<Vec<String>>,
    pub status: Option<JobStatus>,
    /// Jobs a worker ran (or runs).
    pub worker_id: Option<String>,
    /// Cursor: ids below this one (ids are UUIDv7, so also "created before").
    pub before: Option<Uuid>,
    /// Ids at or above this one ("created at or after", through a UUIDv7 floor).
    pub after: Option<Uuid>,
    pub limit: i64,
}

/// Counts the reaper produced.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Reaped {
    pub requeued: u64,
    pub failed: u64,
    /// Ended `cancelled` (cancel requested) instead.
    pub settled: u64,
}

/// How many queued jobs, in claim order, a claim looks at before it looks at each idle
/// LoRA's first job instead (both stores). When busy LoRAs hold the head of the queue,
/// reading on in order would cost a row visit (and a probe for a running job) per queued
/// job of theirs on every claim: with 20,000 jobs over 10 LoRAs and 16 claimers, an empty
/// Postgres claim read 119,000 buffers.
pub(crate) const CLAIM_WINDOW: u32 = 64;

/// The status a running lead takes when it stops without completing; `retry` says whether
/// its error and attempts allow another run. A published lead never trains again: it
/// resumes (reload and wake only) or ends `failed`, keeping `published_version` and its
/// result, so the caller learns the version exists but is not served; an unpublished
/// lead whose cancel was requested ends `cancelled` rather than going back to the queue.
/// The Postgres store writes the same rule in SQL (`postgres::next_status`).
pub(crate) fn next_status(published: bool, cancel_requested: bool, retry: bool) -> JobStatus {
    match (published, retry) {
        (true, true) => JobStatus::Queued,
        (true, false) => JobStatus::Failed,
        (false, true) if cancel_requested => JobStatus::Cancelled,
        (false, true) => JobStatus::Queued,
        (false, false) => JobStatus::Failed,
    }
}

/// What `/metrics` reports, read from the store at scrape time so every API replica
/// reports the same fleet-wide numbers.
#[derive(Debug, Clone, Default)]
pub struct MetricsSnapshot {
    /// Jobs queued, running, or joined to a running batch.
    pub live: Vec<(JobStatus, i64)>,
    /// Age of the oldest queued job.
    pub oldest_queued_s: Option<f64>,
    /// Jobs that ended within the window, by status.
    pub finished: Vec<(JobStatus, i64)>,
    /// Phase timings (ms) of jobs that succeeded within the window (at most 10,000).
    pub phase_ms: Vec<BTreeMap<String, u64>>,
    /// The training loss of each LoRA's current version (most recently updated first, at
    /// most 1,000 LoRAs).
    pub last_loss: Vec<(String, f64)>,
}

/// Why [`Store::reinit_lora`] changed nothing.
pub(crate) fn reinit_refusal(
    current: Option<Lora>,
    lora: &NewLora,
    expected: i32,
) -> crate::error::Error {
    use crate::error::Error;
    match current {
        None => Error::NotFound(format!("LoRA not found: {}", lora.lora_id)),
        Some(l) => Error::Conflict(format!(
            "LoRA {} is at version {} now, not {expected}: a job published meanwhile; retry",
            lora.lora_id, l.current_version
        )),
    }
}

/// Why [`Store::retry_job`] changed nothing.
pub(crate) fn retry_refusal(job: Option<Job>, id: Uuid) -> crate::error::Error {
    use crate::error::Error;
    match job {
        None => Error::NotFound(format!("job not found: {id}")),
        Some(j) if j.status != JobStatus::Failed => Error::Conflict(format!(
            "job {id} is {}; only a failed job can be retried",
            j.status.as_str()
        )),
        Some(j) if j.published_version.is_some() => Error::Conflict(format!(
            "job {id} already trained version {} of LoRA {}; it is not trained again \
             (reload that version, or roll back, from the LoRA's page)",
            j.published_version.unwrap_or_default(),
            j.lora_id
        )),
        Some(j) => Error::Conflict(format!(
            "job {id} cannot be retried: LoRA {} was deleted",
            j.lora_id
        )),
    }
}

/// Why [`Store::delete_job`] deleted nothing.
pub(crate) fn delete_refusal(job: Option<Job>, id: Uuid) -> crate::error::Error {
    use crate::error::Error;
    match job {
        None => Error::NotFound(format!("job not found: {id}")),
        Some(j) => Error::Conflict(format!(
            "job {id} has not finished ({}); cancel it first",
            j.status.as_str()
        )),
    }
}

/// Why [`Store::revoke_api_key`] refused: `id` is the last live admin key.
pub(crate) fn last_admin(id: &str) -> crate::error::Error {
    crate::error::Error::Conflict(format!(
        "key {id} is the last admin key: create another admin key before revoking it \
         (without one nobody could manage keys, and the API never opens itself again)"
    ))
}

/// LoRA ids of taken adapter requests, oldest request first (`DELETE … RETURNING` has no
/// order of its own).
pub(crate) fn oldest_first<T: Ord>(mut rows: Vec<(String, T)>) -> Vec<String> {
    rows.sort_by(|a, b| a.1.cmp(&b.1).then_with(|| a.0.cmp(&b.0)));
    rows.into_iter().map(|(id, _)| id).collect()
}

/// Retry delay after attempt `attempt` (1-based): exponential from `base`, capped at
/// `max`, with full jitter in [50 %, 100 %] so a fleet of retries does not stampede.
pub fn backoff(attempt: i32, base: Duration, max: Duration) -> Duration {
    let exp = base.saturating_mul(1u32 << attempt.clamp(1, 16).saturating_sub(1));
    let capped = exp.min(max);
    let jitter: f64 = rand::Rng::gen_range(&mut rand::thread_rng(), 0.5..=1.0);
    capped.mul_f64(jitter)
}

/// Retry policy the store applies when it puts a job back.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    pub base: Duration,
    pub max: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            base: Duration::from_secs(2),
            max: Duration::from_secs(600),
        }
    }
}

/// Wake-ups for idle claimers: each clone sees every enqueue that happens after it last
/// waited. Fed by `LISTEN` on Postgres and by the store itself on SQLite.
#[derive(Debug, Clone)]
pub struct Wakeups {
    rx: watch::Receiver<u64>,
}

impl Wakeups {
    pub(crate) fn channel() -> (watch::Sender<u64>, Wakeups) {
        let (tx, rx) = watch::channel(0);
        (tx, Wakeups { rx })
    }

    /// Waits until something was enqueued since the last call, or `max` passes.
    /// Returns `true` when woken by an enqueue.
    pub async fn wait(&mut self, max: Duration) -> bool {
        matches!(
            tokio::time::timeout(max, self.rx.changed()).await,
            Ok(Ok(()))
        )
    }
}

/// `(status, count)` rows from a `group by status` query, as typed statuses.
pub(crate) fn parse_status_counts(rows: Vec<(String, i64)>) -> Result<Vec<(JobStatus, i64)>> {
    rows.into_iter()
        .map(|(status, n)| Ok((status.parse()?, n)))
        .collect()
}

pub(crate) fn bump(tx: &watch::Sender<u64>) {
    tx.send_modify(|n| *n = n.wrapping_add(1));
}

/// One operator action, as the audit log keeps it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AuditEntry {
    pub at: DateTime<Utc>,
    /// The API key id that acted ('' when the API is open).
    pub actor: String,
    /// `cancel`, `retry` or `delete`.
    pub action: String,
    pub job_id: Option<Uuid>,
    pub detail: String,
}

/// A shared store.
pub type SharedStore = Arc<dyn Store>;

/// Opens the store a database URL names: `postgres://…` or `sqlite:…`.
pub async fn connect(url: &str, max_connections: u32) -> Result<SharedStore> {
    connect_with(url, PoolSettings::tool(max_connections)).await
}

/// [`connect`] with a process's pool settings (Postgres; SQLite has one connection).
pub async fn connect_with(url: &str, settings: PoolSettings) -> Result<SharedStore> {
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        Ok(Arc::new(PgStore::connect_with(url, None, settings).await?))
    } else if url.starts_with("sqlite:") {
        Ok(Arc::new(SqliteStore::connect(url).await?))
    } else {
        Err(crate::error::Error::Config(format!(
            "database.url: unsupported URL '{}' (accepted: postgres://…, sqlite:…)",
            redact(url)
        )))
    }
}

/// The URL with any password replaced, for logs and errors.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            match userinfo.find(':') {
                Some(colon) => format!(
                    "{}{}:***{}",
                    &url[..scheme + 3],
                    &userinfo[..colon],
                    &url[at..]
                ),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

pub(crate) fn ms_to_datetime(ms: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(ms).unwrap_or_default()
}

/// A job's timeline: its own events, then, for a member of a batch, its lead's events from
/// the `claimed` one at which it joined (`batch_event`) until it finished with them (a
/// batch's jobs finish in one transaction, at one time), named as the batch's. Ordered by
/// event id (insertion order across both jobs). The same text serves both stores
/// (SQLite reads `$1` as one named parameter, bound first).
pub(crate) const MEMBER_AWARE_EVENTS: &str = "
    select at, phase, message from (
        select id, at, phase, message from job_events where job_id = $1
        union all
        select e.id, e.at,
               case when e.id = j.batch_event then 'coalesced' else e.phase end,
               case when e.id = j.batch_event then 'joined the batch of job ' || e.job_id
                    else 'batch of job ' || e.job_id || ': ' || e.message end
        from jobs j join job_events e on e.job_id = j.trained_by and e.id >= j.batch_event
        where j.id = $1 and (j.finished_at is null or e.at <= j.finished_at)
    ) t order by id";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        let base = Duration::from_secs(2);
        let max = Duration::from_secs(60);
        for _ in 0..50 {
            let first = backoff(1, base, max);
            assert!(first >= Duration::from_secs(1) && first <= base);
            let tenth = backoff(10, base, max);
            assert!(tenth >= max / 2 && tenth <= max);
        }
    }

    #[test]
    fn redact_hides_passwords_only() {
        assert_eq!(redact("postgres://u:secret@h/db"), "postgres://u:***@h/db");
        assert_eq!(redact("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(redact("sqlite:data/claas.db"), "sqlite:data/claas.db");
    }
}
