//! The SQLite store: the embedded default's queue. SQLite runs one writer at a time, and
//! this store holds a single connection, so each transition is a short transaction whose
//! statements mirror the Postgres CTEs one for one; no other writer can interleave.
//! Timestamps are milliseconds since the epoch, taken from this process's clock.

use std::collections::BTreeMap;
use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use chrono::Utc;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteRow,
    SqliteSynchronous,
};
use sqlx::{Row, Sqlite, Transaction};
use tokio::sync::watch;
use uuid::Uuid;

use super::oldest_first;
use super::postgres::cancel_refusal;
use super::{
    bump, delete_refusal, ms_to_datetime, retry_refusal, AuditEntry, CancelOutcome, ClaimRequest,
    Claimed, Enqueued, FailOutcome, JobFilter, Lease, LeaseState, Reaped, RetryPolicy, Store,
    Wakeups,
};
use crate::error::{Error, Result};
use crate::types::{
    ApiKey, Job, JobError, JobEvent, JobPayload, JobStatus, Lora, LoraVersion, NewJob, NewLora,
    NewVersion, Phase, WorkerInfo, WorkerRow, WorkerState,
};

mod jobs;
mod keys;
mod lease;
mod loras;
mod ops;
mod workers;

const JOB_COLUMNS: &str = "id, lora_id, base_model, caller, status, phase, sample_count, \
    orchestration, priority, attempt, max_attempts, run_at, worker_id, lease_expires_at, \
    cancel_requested, idempotency_key, trace_context, timings_ms, result, error, trained_by, \
    published_version, created_at, started_at, finished_at";

/// Same predicate as Postgres' fence; `?4` is now.
const FENCE: &str = "id = ?1 and lease_token = ?2 and worker_id = ?3 and status = 'running' \
    and lease_expires_at > ?4";

pub struct SqliteStore {
    pool: SqlitePool,
    wake_tx: watch::Sender<u64>,
    wake_rx: Wakeups,
}

fn now_ms() -> i64 {
    Utc::now().timestamp_millis()
}

fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

fn uuid_col(row: &SqliteRow, col: &str) -> Result<Option<Uuid>> {
    let s: Option<String> = row.try_get(col)?;
    s.map(|s| Uuid::parse_str(&s).map_err(|e| Error::Corrupt(format!("{col}: {e}"))))
        .transpose()
}

fn json_col<T: serde::de::DeserializeOwned>(row: &SqliteRow, col: &str) -> Result<Option<T>> {
    let s: Option<String> = row.try_get(col)?;
    Ok(s.map(|s| serde_json::from_str(&s)).transpose()?)
}

fn time_col(row: &SqliteRow, col: &str) -> Result<Option<chrono::DateTime<Utc>>> {
    let t: Option<i64> = row.try_get(col)?;
    Ok(t.map(ms_to_datetime))
}

fn required<T>(v: Option<T>, col: &str) -> Result<T> {
    v.ok_or_else(|| Error::Corrupt(format!("{col} is null")))
}

fn api_key_from_row(r: &SqliteRow) -> Result<ApiKey> {
    Ok(ApiKey {
        id: r.try_get("id")?,
        name: r.try_get("name")?,
        prefixes: required(json_col(r, "prefixes")?, "prefixes")?,
        admin: r.try_get("admin")?,
        created_at: required(time_col(r, "created_at")?, "created_at")?,
        revoked_at: time_col(r, "revoked_at")?,
    })
}

fn job_from_row(row: &SqliteRow) -> Result<Job> {
    let status: String = row.try_get("status")?;
    let phase: String = row.try_get("phase")?;
    Ok(Job {
        id: required(uuid_col(row, "id")?, "id")?,
        lora_id: row.try_get("lora_id")?,
        base_model: row.try_get("base_model")?,
        caller: row.try_get("caller")?,
        status: status.parse().map_err(|_| Error::Corrupt(status))?,
        phase: phase.parse()?,
        sample_count: row.try_get("sample_count")?,
        orchestration: required(json_col(row, "orchestration")?, "orchestration")?,
        priority: row.try_get("priority")?,
        attempt: row.try_get("attempt")?,
        max_attempts: row.try_get("max_attempts")?,
        run_at: required(time_col(row, "run_at")?, "run_at")?,
        worker_id: row.try_get("worker_id")?,
        lease_expires_at: time_col(row, "lease_expires_at")?,
        cancel_requested: row.try_get("cancel_requested")?,
        idempotency_key: row.try_get("idempotency_key")?,
        trace_context: json_col(row, "trace_context")?,
        timings_ms: json_col::<BTreeMap<String, u64>>(row, "timings_ms")?.unwrap_or_default(),
        result: json_col(row, "result")?,
        error: json_col(row, "error")?,
        trained_by: uuid_col(row, "trained_by")?,
        published_version: row.try_get("published_version")?,
        created_at: required(time_col(row, "created_at")?, "created_at")?,
        started_at: time_col(row, "started_at")?,
        finished_at: time_col(row, "finished_at")?,
    })
}

fn lora_from_row(row: &SqliteRow) -> Result<Lora> {
    Ok(Lora {
        lora_id: row.try_get("lora_id")?,
        base_model: row.try_get("base_model")?,
        rank: row.try_get("rank")?,
        alpha: row.try_get("alpha")?,
        target_modules: required(json_col(row, "target_modules")?, "target_modules")?,
        current_version: row.try_get("current_version")?,
        created_at: required(time_col(row, "created_at")?, "created_at")?,
        updated_at: required(time_col(row, "updated_at")?, "updated_at")?,
    })
}

async fn event(
    tx: &mut Transaction<'_, Sqlite>,
    job_id: &str,
    now: i64,
    phase: &str,
    message: &str,
) -> Result<i64> {
    let id = sqlx::query_scalar(
        "insert into job_events (job_id, at, phase, message) values (?, ?, ?, ?) returning id",
    )
    .bind(job_id)
    .bind(now)
    .bind(phase)
    .bind(message)
    .fetch_one(&mut **tx)
    .await?;
    Ok(id)
}

/// Mirror of Postgres' `MEMBERS_FOLLOW_LEAD` and `DETACHED_MEMBER_EVENTS`: settle the
/// members of `lead` after the lead moved to `status` (its result and error are copied when
/// it ends); a member sent back to the queue gets an event saying so.
async fn members_follow_lead(
    tx: &mut Transaction<'_, Sqlite>,
    lead: &str,
    status: JobStatus,
    now: i64,
) -> Result<()> {
    let rows = sqlx::query(
        "update jobs set
            status = case when ?2 in ('succeeded', 'failed', 'cancelled')
                           and (?2 <> 'cancelled' or published_version is not null) then ?2
                          when published_version is null then 'queued' else 'coalesced' end,
            trained_by = case when published_version is null and ?2 in ('queued', 'cancelled')
                              then null else trained_by end,
            batch_event = case when published_version is null and ?2 in ('queued', 'cancelled')
                               then null else batch_event end,
            phase = case when ?2 = 'succeeded' then 'done'
                         when published_version is null then 'queued' else phase end,
            worker_id = null,
            result = case when ?2 = 'succeeded' then (select result from jobs where id = ?1) else result end,
            error = case when ?2 = 'failed' then (select error from jobs where id = ?1)
                         when ?2 = 'succeeded' then null else error end,
            finished_at = case when ?2 in ('succeeded', 'failed') then ?3
                               when ?2 = 'cancelled' and published_version is not null then ?3
                               else null end
         where trained_by = ?1 and status = 'coalesced'
         returning id, status",
    )
    .bind(lead)
    .bind(status.as_str())
    .bind(now)
    .fetch_all(&mut **tx)
    .await?;
    for r in &rows {
        if r.try_get::<String, _>("status")? == "queued" {
            let message = format!(
                "left the batch of job {lead} unpublished (its lead is now {}); back in the queue",
                status.as_str()
            );
            event(tx, &r.try_get::<String, _>("id")?, now, "queued", &message).await?;
        }
    }
    Ok(())
}

/// The running lead `id` as it stops without completing: what [`super::next_status`] needs.
struct Stopping {
    published: bool,
    cancel_requested: bool,
    attempt: i32,
    max_attempts: i32,
    worker_id: Option<String>,
}

/// Reads the lead under `FENCE` (binds ?1..?4), or `None` when the lease is lost.
async fn fenced_lead(
    tx: &mut Transaction<'_, Sqlite>,
    lease: &Lease,
    now: i64,
) -> Result<Option<Stopping>> {
    let sql = format!(
        "select published_version, cancel_requested, attempt, max_attempts, worker_id
         from jobs where {FENCE}"
    );
    let row = sqlx::query(&sql)
        .bind(lease.job_id.to_string())
        .bind(lease.token.to_string())
        .bind(&lease.worker_id)
        .bind(now)
        .fetch_optional(&mut **tx)
        .await?;
    row.map(|r| {
        Ok(Stopping {
            published: r.try_get::<Option<i32>, _>("published_version")?.is_some(),
            cancel_requested: r.try_get("cancel_requested")?,
            attempt: r.try_get("attempt")?,
            max_attempts: r.try_get("max_attempts")?,
            worker_id: r.try_get("worker_id")?,
        })
    })
    .transpose()
}

/// Moves a running lead to `next` (from [`super::next_status`]) with `error`, retrying at
/// `run_at`; `extra_attempts` raises `max_attempts` (a hand-back costs no attempt). Then
/// settles its members.
#[allow(clippy::too_many_arguments)]
async fn settle_lead(
    tx: &mut Transaction<'_, Sqlite>,
    id: &str,
    next: JobStatus,
    error: Option<&serde_json::Value>,
    now: i64,
    run_at: i64,
    extra_attempts: i32,
) -> Result<()> {
    let error = match next {
        JobStatus::Cancelled => Some(serde_json::json!({
            "code": "cancelled",
            "message": format!(
                "cancelled by request (the run had stopped: {})",
                error
                    .and_then(|e| e.get("message"))
                    .and_then(|m| m.as_str())
                    .unwrap_or("handed back")
            ),
        })),
        _ => error.cloned(),
    };
    sqlx::query(
        "update jobs set status = ?2,
            phase = case ?2 when 'queued' then 'queued' when 'succeeded' then 'done' else phase end,
            run_at = case when ?2 = 'queued' then ?3 else run_at end,
            finished_at = case when ?2 = 'queued' then null else ?4 end,
            result = case when published_version is not null
                     then coalesce(result, json_object('version', published_version)) else result end,
            error = coalesce(?5, error), lease_expires_at = null, lease_token = null,
            worker_id = case when ?2 = 'queued' then null else worker_id end,
            max_attempts = max_attempts + ?6
         where id = ?1",
    )
    .bind(id)
    .bind(next.as_str())
    .bind(run_at)
    .bind(now)
    .bind(error.map(|e| e.to_string()))
    .bind(extra_attempts)
    .execute(&mut **tx)
    .await?;
    members_follow_lead(tx, id, next, now).await
}

impl SqliteStore {
    /// Opens (creating if missing) the database file the URL names, in WAL mode, with one
    /// connection: SQLite serialises writers anyway, and one connection makes each
    /// transaction below as atomic as a Postgres statement.
    ///
    /// Every commit syncs the WAL (`synchronous = FULL`): a feedback answered 202, a LoRA
    /// answered 201 or a published version survives a power loss. `NORMAL` would sync only
    /// at checkpoints, and a power loss could undo commits the client was already told
    /// about (BENCHMARKS.md measures what FULL costs the embedded intake).
    pub async fn connect(url: &str) -> Result<Self> {
        let opts = SqliteConnectOptions::from_str(url)
            .map_err(|e| Error::Config(format!("database.url: {e}")))?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(5));
        let pool = SqlitePoolOptions::new()
            .max_connections(1)
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(opts)
            .await?;
        let (wake_tx, wake_rx) = Wakeups::channel();
        Ok(SqliteStore {
            pool,
            wake_tx,
            wake_rx,
        })
    }

    async fn fenced_update(
        &self,
        lease: &Lease,
        set: &str,
        extra_binds: &[Option<String>],
    ) -> Result<Option<(Transaction<'static, Sqlite>, i64)>> {
        let now = now_ms();
        let mut tx = self.pool.begin().await?;
        let sql = format!("update jobs set {set} where {FENCE}");
        let mut q = sqlx::query(&sql)
            .bind(lease.job_id.to_string())
            .bind(lease.token.to_string())
            .bind(&lease.worker_id)
            .bind(now);
        for b in extra_binds {
            q = q.bind(b.clone());
        }
        let done = q.execute(&mut *tx).await?;
        if done.rows_affected() == 1 {
            Ok(Some((tx, now)))
        } else {
            Ok(None)
        }
    }
}

/// `(name, ms)` of a finished phase as two binds for `json_set`.
fn timing(finished: Option<(Phase, u64)>) -> [Option<String>; 2] {
    match finished {
        Some((p, t)) => [Some(format!("$.{}", p.as_str())), Some(t.to_string())],
        None => [None, None],
    }
}

/// Adds the finished phase's duration (binds ?5, ?6) to `timings_ms`.
const ADD_TIMING: &str = "timings_ms = case when ?5 is null then timings_ms \
    else json_set(timings_ms, ?5, cast(?6 as integer)) end";

#[async_trait]
impl Store for SqliteStore {
    fn backend(&self) -> &'static str {
        "sqlite"
    }

    async fn migrate(&self) -> Result<()> {
        sqlx::migrate!("../migrations/sqlite")
            .run(&self.pool)
            .await?;
        Ok(())
    }

    async fn ping(&self) -> Result<()> {
        sqlx::query("select 1").execute(&self.pool).await?;
        Ok(())
    }

    async fn wakeups(&self) -> Result<Wakeups> {
        Ok(self.wake_rx.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn every_commit_syncs_the_wal_so_accepted_feedback_survives_a_power_loss() {
        let dir = claas_testutil::tempdir("sync");
        let file = dir.join("claas.db");
        let store = SqliteStore::connect(&format!("sqlite:{}", file.display()))
            .await
            .expect("store");
        let journal: String = sqlx::query_scalar("pragma journal_mode")
            .fetch_one(&store.pool)
            .await
            .expect("journal mode");
        // 2 = FULL: the WAL is synced at every commit, not only at checkpoints (1 = NORMAL).
        let sync: i64 = sqlx::query_scalar("pragma synchronous")
            .fetch_one(&store.pool)
            .await
            .expect("synchronous");
        store.pool.close().await;
        assert_eq!(journal, "wal");
        assert_eq!(sync, 2, "synchronous must be FULL");
    }
}
