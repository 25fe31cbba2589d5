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

const JOB_COLUMNS: &str = "id, lora_id, base_model, caller, status, phase, sample_count, \
    orchestration, priority, attempt, max_attempts, run_at, worker_id, lease_expires_at, \
    cancel_requested, idempotency_key, trace_context, timings_ms, result, error, trained_by, \
    published_version, created_at, started_at, finished_at";

/// Same predicate as Postgres' fence; `?4` is now.
const FENCE: &str = "id = ?1 and attempt = ?2 and worker_id = ?3 and status = 'running' \
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
) -> Result<()> {
    sqlx::query("insert into job_events (job_id, at, phase, message) values (?, ?, ?, ?)")
        .bind(job_id)
        .bind(now)
        .bind(phase)
        .bind(message)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// Mirror of Postgres' `MEMBERS_FOLLOW_LEAD`: settle the members of `lead` after the lead
/// moved to `status` (its result and error are copied when it ends).
async fn members_follow_lead(
    tx: &mut Transaction<'_, Sqlite>,
    lead: &str,
    status: JobStatus,
    now: i64,
) -> Result<Vec<String>> {
    let rows = sqlx::query(
        "update jobs set
            status = case when ?2 in ('succeeded', 'failed', 'cancelled')
                           and (?2 <> 'cancelled' or published_version is not null) then ?2
                          when published_version is null then 'queued' else 'coalesced' end,
            trained_by = case when published_version is null and ?2 in ('queued', 'cancelled')
                              then null else trained_by end,
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
         returning id",
    )
    .bind(lead)
    .bind(status.as_str())
    .bind(now)
    .fetch_all(&mut **tx)
    .await?;
    rows.iter()
        .map(|r| r.try_get::<String, _>("id").map_err(Error::from))
        .collect()
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
        .bind(lease.attempt)
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
) -> Result<Vec<String>> {
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
            error = coalesce(?5, error), lease_expires_at = null,
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
    pub async fn connect(url: &str) -> Result<Self> {
        let opts = SqliteConnectOptions::from_str(url)
            .map_err(|e| Error::Config(format!("database.url: {e}")))?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
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
            .bind(lease.attempt)
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

    async fn create_lora(&self, lora: &NewLora) -> Result<Lora> {
        let now = now_ms();
        let mut tx = self.pool.begin().await?;
        // A deleted LoRA's id can be used again once none of its jobs runs.
        let revivable = "exists (select 1 from loras where lora_id = ?1 and deleted_at is not null)
             and not exists (select 1 from jobs where lora_id = ?1 and status = 'running')";
        sqlx::query(&format!(
            "delete from lora_versions where lora_id = ?1 and {revivable}"
        ))
        .bind(&lora.lora_id)
        .execute(&mut *tx)
        .await?;
        let row = sqlx::query(
            "insert into loras (lora_id, base_model, rank, alpha, target_modules, created_at, updated_at)
             values (?1, ?2, ?3, ?4, ?5, ?6, ?7)
             on conflict (lora_id) do update set
                base_model = excluded.base_model, rank = excluded.rank, alpha = excluded.alpha,
                target_modules = excluded.target_modules, current_version = 0,
                created_at = excluded.created_at, updated_at = excluded.updated_at,
                deleted_at = null
             where loras.deleted_at is not null
               and not exists (select 1 from jobs where lora_id = ?1 and status = 'running')
             returning *",
        )
        .bind(&lora.lora_id)
        .bind(&lora.base_model)
        .bind(lora.rank)
        .bind(lora.alpha)
        .bind(serde_json::to_string(&lora.target_modules)?)
        .bind(now)
        .bind(now)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = row else {
            return Err(Error::Conflict(format!(
                "LoRA already exists: {}",
                lora.lora_id
            )));
        };
        sqlx::query(
            "insert into lora_versions (lora_id, version, storage_uri, sha256, created_at)
             values (?, 0, ?, ?, ?)",
        )
        .bind(&lora.lora_id)
        .bind(&lora.initial_uri)
        .bind(&lora.initial_sha256)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        let out = lora_from_row(&row)?;
        tx.commit().await?;
        Ok(out)
    }

    async fn reinit_lora(
        &self,
        lora: &NewLora,
        expected: i32,
        note: &serde_json::Value,
    ) -> Result<Lora> {
        let now = now_ms();
        let mut tx = self.pool.begin().await?;
        let row = sqlx::query(
            "update loras set base_model = ?2, rank = ?3, alpha = ?4, target_modules = ?5,
                current_version = current_version + 1, updated_at = ?6
             where lora_id = ?1 and deleted_at is null and current_version = ?7
             returning *",
        )
        .bind(&lora.lora_id)
        .bind(&lora.base_model)
        .bind(lora.rank)
        .bind(lora.alpha)
        .bind(serde_json::to_string(&lora.target_modules)?)
        .bind(now)
        .bind(expected)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = row else {
            drop(tx);
            return Err(super::reinit_refusal(
                self.get_lora(&lora.lora_id).await?,
                lora,
                expected,
            ));
        };
        sqlx::query(
            "insert into lora_versions (lora_id, version, storage_uri, sha256, metrics, created_at)
             values (?, ?, ?, ?, ?, ?)",
        )
        .bind(&lora.lora_id)
        .bind(expected + 1)
        .bind(&lora.initial_uri)
        .bind(&lora.initial_sha256)
        .bind(note.to_string())
        .bind(now)
        .execute(&mut *tx)
        .await?;
        let out = lora_from_row(&row)?;
        tx.commit().await?;
        Ok(out)
    }

    async fn create_api_key(&self, key: &ApiKey, secret_hash: &str) -> Result<()> {
        sqlx::query(
            "insert into api_keys (id, name, prefixes, admin, secret_hash, created_at)
             values (?, ?, ?, ?, ?, ?)",
        )
        .bind(&key.id)
        .bind(&key.name)
        .bind(serde_json::to_string(&key.prefixes)?)
        .bind(key.admin)
        .bind(secret_hash)
        .bind(now_ms())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn list_api_keys(&self) -> Result<Vec<ApiKey>> {
        let rows = sqlx::query("select * from api_keys order by created_at desc, id")
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(api_key_from_row).collect()
    }

    async fn revoke_api_key(&self, id: &str) -> Result<bool> {
        let done =
            sqlx::query("update api_keys set revoked_at = ? where id = ? and revoked_at is null")
                .bind(now_ms())
                .bind(id)
                .execute(&self.pool)
                .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn find_api_key(&self, secret_hash: &str) -> Result<Option<ApiKey>> {
        let row =
            sqlx::query("select * from api_keys where secret_hash = ? and revoked_at is null")
                .bind(secret_hash)
                .fetch_optional(&self.pool)
                .await?;
        row.as_ref().map(api_key_from_row).transpose()
    }

    async fn has_api_keys(&self) -> Result<bool> {
        let n: i64 = sqlx::query_scalar("select count(*) from api_keys where revoked_at is null")
            .fetch_one(&self.pool)
            .await?;
        Ok(n > 0)
    }

    async fn queued_jobs_of(&self, caller: &str) -> Result<i64> {
        Ok(
            sqlx::query_scalar("select count(*) from jobs where status = 'queued' and caller = ?")
                .bind(caller)
                .fetch_one(&self.pool)
                .await?,
        )
    }

    async fn metrics_snapshot(&self, window: Duration) -> Result<super::MetricsSnapshot> {
        let status_counts = |rows: Vec<SqliteRow>| -> Result<Vec<(JobStatus, i64)>> {
            rows.iter()
                .map(|r| {
                    let s: String = r.try_get("status")?;
                    Ok((s.parse()?, r.try_get("n")?))
                })
                .collect()
        };
        let now = now_ms();
        let live = status_counts(
            sqlx::query(
                "select status, count(*) as n from jobs
                 where status in ('queued', 'running', 'coalesced') group by status",
            )
            .fetch_all(&self.pool)
            .await?,
        )?;
        let oldest: Option<i64> =
            sqlx::query_scalar("select min(created_at) from jobs where status = 'queued'")
                .fetch_one(&self.pool)
                .await?;
        let since = now - i64::try_from(window.as_millis()).unwrap_or(i64::MAX);
        let finished = status_counts(
            sqlx::query(
                "select status, count(*) as n from jobs where finished_at > ? group by status",
            )
            .bind(since)
            .fetch_all(&self.pool)
            .await?,
        )?;
        let timings: Vec<String> = sqlx::query_scalar(
            "select timings_ms from jobs where finished_at > ? and status = 'succeeded' limit 10000",
        )
        .bind(since)
        .fetch_all(&self.pool)
        .await?;
        let last_loss = sqlx::query(
            "select l.lora_id, cast(json_extract(v.metrics, '$.total_loss') as real) as loss
             from loras l join lora_versions v
               on v.lora_id = l.lora_id and v.version = l.current_version
             where l.deleted_at is null and json_extract(v.metrics, '$.total_loss') is not null
             order by l.updated_at desc limit 1000",
        )
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(|r| Ok((r.try_get("lora_id")?, r.try_get("loss")?)))
        .collect::<Result<Vec<(String, f64)>>>()?;
        Ok(super::MetricsSnapshot {
            live,
            oldest_queued_s: oldest.map(|t| (now - t) as f64 / 1000.0),
            finished,
            phase_ms: timings
                .iter()
                .filter_map(|t| serde_json::from_str(t).ok())
                .collect(),
            last_loss,
        })
    }

    async fn pin_version(&self, lora_id: &str, version: i32, pinned: bool) -> Result<bool> {
        let done =
            sqlx::query("update lora_versions set pinned = ? where lora_id = ? and version = ?")
                .bind(pinned)
                .bind(lora_id)
                .bind(version)
                .execute(&self.pool)
                .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn prune_versions(&self, lora_id: &str, keep: i32) -> Result<Vec<String>> {
        let mut tx = self.pool.begin().await?;
        let latest: Option<i32> =
            sqlx::query_scalar("select max(version) from lora_versions where lora_id = ?")
                .bind(lora_id)
                .fetch_one(&mut *tx)
                .await?;
        let Some(latest) = latest else {
            return Ok(Vec::new());
        };
        let uris: Vec<String> = sqlx::query_scalar(
            "update lora_versions set pruned_at = ?3
             where lora_id = ?1 and version <= ?2 and version > 0 and not pinned
               and pruned_at is null
               and storage_uri not in (
                   select storage_uri from lora_versions
                   where lora_id = ?1 and (version > ?2 or version = 0 or pinned))
             returning storage_uri",
        )
        .bind(lora_id)
        .bind(latest - keep)
        .bind(now_ms())
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        let mut uris = uris;
        uris.sort();
        uris.dedup();
        Ok(uris)
    }

    async fn delete_lora(&self, lora_id: &str) -> Result<Option<chrono::DateTime<Utc>>> {
        let now = now_ms();
        let done = sqlx::query(
            "update loras set deleted_at = ?2, updated_at = ?2
             where lora_id = ?1 and deleted_at is null",
        )
        .bind(lora_id)
        .bind(now)
        .execute(&self.pool)
        .await?;
        Ok((done.rows_affected() == 1).then(|| ms_to_datetime(now)))
    }

    async fn purge_lora(&self, lora_id: &str, deleted_at: chrono::DateTime<Utc>) -> Result<bool> {
        let mut tx = self.pool.begin().await?;
        let still: Option<i64> =
            sqlx::query_scalar("select 1 from loras where lora_id = ? and deleted_at = ?")
                .bind(lora_id)
                .bind(deleted_at.timestamp_millis())
                .fetch_optional(&mut *tx)
                .await?;
        if still.is_none() {
            return Ok(false);
        }
        sqlx::query("delete from lora_versions where lora_id = ?")
            .bind(lora_id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(true)
    }

    async fn get_lora(&self, lora_id: &str) -> Result<Option<Lora>> {
        let row = sqlx::query("select * from loras where lora_id = ? and deleted_at is null")
            .bind(lora_id)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(lora_from_row).transpose()
    }

    async fn list_loras(&self, prefix: &str) -> Result<Vec<Lora>> {
        let rows = sqlx::query(
            "select * from loras where deleted_at is null and substr(lora_id, 1, length(?1)) = ?1
             order by lora_id",
        )
        .bind(prefix)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(lora_from_row).collect()
    }

    async fn lora_versions(&self, lora_id: &str) -> Result<Vec<LoraVersion>> {
        let rows = sqlx::query("select * from lora_versions where lora_id = ? order by version")
            .bind(lora_id)
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| {
                Ok(LoraVersion {
                    lora_id: r.try_get("lora_id")?,
                    version: r.try_get("version")?,
                    storage_uri: r.try_get("storage_uri")?,
                    sha256: r.try_get("sha256")?,
                    job_id: uuid_col(r, "job_id")?,
                    metrics: json_col(r, "metrics")?,
                    created_at: required(time_col(r, "created_at")?, "created_at")?,
                    pinned: r.try_get("pinned")?,
                    pruned_at: time_col(r, "pruned_at")?,
                })
            })
            .collect()
    }

    async fn enqueue(&self, job: &NewJob) -> Result<Enqueued> {
        let now = now_ms();
        let mut tx = self.pool.begin().await?;
        if let Some(key) = &job.idempotency_key {
            let sql = format!(
                "select {JOB_COLUMNS}, request_hash from jobs where caller = ? and idempotency_key = ?"
            );
            if let Some(row) = sqlx::query(&sql)
                .bind(&job.caller)
                .bind(key)
                .fetch_optional(&mut *tx)
                .await?
            {
                let hash: Option<String> = row.try_get("request_hash")?;
                if hash != job.request_hash {
                    return Err(Error::Conflict(format!(
                        "Idempotency-Key '{key}' was already used with a different request body"
                    )));
                }
                return Ok(Enqueued {
                    job: job_from_row(&row)?,
                    created: false,
                });
            }
        }
        let sql = format!(
            "insert into jobs (id, lora_id, base_model, caller, payload, sample_count, coalesce_key,
                orchestration, priority, max_attempts, idempotency_key, request_hash, trace_context,
                run_at, created_at)
             select ?, lora_id, base_model, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?
             from loras where lora_id = ? and deleted_at is null
             returning {JOB_COLUMNS}"
        );
        let row = sqlx::query(&sql)
            .bind(job.id.to_string())
            .bind(&job.caller)
            .bind(serde_json::to_string(&job.payload)?)
            .bind(i32::try_from(job.payload.samples.len()).unwrap_or(i32::MAX))
            .bind(job.coalesce_key())
            .bind(serde_json::to_string(&job.orchestration)?)
            .bind(job.priority)
            .bind(job.max_attempts)
            .bind(&job.idempotency_key)
            .bind(&job.request_hash)
            .bind(job.trace_context.as_ref().map(|v| v.to_string()))
            .bind(now)
            .bind(now)
            .bind(&job.lora_id)
            .fetch_optional(&mut *tx)
            .await?;
        let Some(row) = row else {
            return Err(Error::NotFound(format!("LoRA not found: {}", job.lora_id)));
        };
        let created = job_from_row(&row)?;
        let message = format!("enqueued with {} sample(s)", created.sample_count);
        event(&mut tx, &created.id.to_string(), now, "queued", &message).await?;
        tx.commit().await?;
        bump(&self.wake_tx);
        Ok(Enqueued {
            job: created,
            created: true,
        })
    }

    async fn get_job(&self, id: Uuid) -> Result<Option<Job>> {
        let sql = format!("select {JOB_COLUMNS} from jobs where id = ?");
        let row = sqlx::query(&sql)
            .bind(id.to_string())
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(job_from_row).transpose()
    }

    async fn list_jobs(&self, filter: &JobFilter) -> Result<Vec<Job>> {
        // Uuid v7 text sorts in creation order, like the uuid column in Postgres.
        let mut q =
            sqlx::QueryBuilder::<Sqlite>::new(format!("select {JOB_COLUMNS} from jobs where 1"));
        if let Some(lora) = &filter.lora_id {
            q.push(" and lora_id = ").push_bind(lora.clone());
        }
        if let Some(status) = filter.status {
            q.push(" and status = ").push_bind(status.as_str());
        }
        if let Some(worker) = &filter.worker_id {
            q.push(" and worker_id = ").push_bind(worker.clone());
        }
        if let Some(before) = filter.before {
            q.push(" and id < ").push_bind(before.to_string());
        }
        if let Some(after) = filter.after {
            q.push(" and id >= ").push_bind(after.to_string());
        }
        if let Some(prefixes) = &filter.lora_prefixes {
            q.push(" and exists (select 1 from json_each(")
                .push_bind(serde_json::to_string(prefixes)?)
                .push(") p where substr(lora_id, 1, length(p.value)) = p.value)");
        }
        q.push(" order by id desc limit ").push_bind(filter.limit);
        let rows = q.build().fetch_all(&self.pool).await?;
        rows.iter().map(job_from_row).collect()
    }

    async fn job_events(&self, id: Uuid) -> Result<Vec<JobEvent>> {
        let rows =
            sqlx::query("select at, phase, message from job_events where job_id = ? order by id")
                .bind(id.to_string())
                .fetch_all(&self.pool)
                .await?;
        rows.iter()
            .map(|r| {
                Ok(JobEvent {
                    at: ms_to_datetime(r.try_get("at")?),
                    phase: r.try_get("phase")?,
                    message: r.try_get("message")?,
                })
            })
            .collect()
    }

    async fn cancel(&self, id: Uuid) -> Result<CancelOutcome> {
        let now = now_ms();
        let mut tx = self.pool.begin().await?;
        let sql = format!(
            "update jobs set
                status = case when status = 'running' then 'running' else 'cancelled' end,
                cancel_requested = 1,
                trained_by = case when status = 'coalesced' then null else trained_by end,
                worker_id = case when status = 'running' then worker_id else null end,
                finished_at = case when status = 'running' then null else ?2 end,
                error = case when status = 'running' then error
                        else json_object('code', 'cancelled', 'message', 'cancelled by request') end
             where id = ?1 and published_version is null
               and (status in ('queued', 'running') or (status = 'coalesced' and phase = 'queued'))
             returning {JOB_COLUMNS}"
        );
        let row = sqlx::query(&sql)
            .bind(id.to_string())
            .bind(now)
            .fetch_optional(&mut *tx)
            .await?;
        let Some(row) = row else {
            drop(tx);
            return match self.get_job(id).await? {
                None => Err(Error::NotFound(format!("job not found: {id}"))),
                Some(job) => Err(cancel_refusal(&job)),
            };
        };
        let job = job_from_row(&row)?;
        let running = job.status == JobStatus::Running;
        let message = if running {
            "cancel requested"
        } else {
            "cancelled"
        };
        event(&mut tx, &id.to_string(), now, job.phase.as_str(), message).await?;
        tx.commit().await?;
        Ok(if running {
            CancelOutcome::Requested(job)
        } else {
            CancelOutcome::Cancelled(job)
        })
    }

    async fn register_worker(&self, w: &WorkerInfo) -> Result<()> {
        let now = now_ms();
        sqlx::query(
            "insert into workers (id, hostname, gpu, vllm_url, base_models, state, version, started_at, heartbeat_at)
             values (?1, ?2, ?3, ?4, ?5, 'idle', ?6, ?7, ?7)
             on conflict (id) do update set hostname = excluded.hostname, gpu = excluded.gpu,
                vllm_url = excluded.vllm_url, base_models = excluded.base_models, state = 'idle',
                version = excluded.version, started_at = ?7, heartbeat_at = ?7, current_job = null",
        )
        .bind(&w.id)
        .bind(&w.hostname)
        .bind(&w.gpu)
        .bind(&w.vllm_url)
        .bind(serde_json::to_string(&w.base_models)?)
        .bind(&w.version)
        .bind(now)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn worker_heartbeat(
        &self,
        worker_id: &str,
        state: WorkerState,
        current_job: Option<Uuid>,
    ) -> Result<()> {
        sqlx::query("update workers set heartbeat_at = ?, state = ?, current_job = ? where id = ?")
            .bind(now_ms())
            .bind(state.as_str())
            .bind(current_job.map(|u| u.to_string()))
            .bind(worker_id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn touch_worker(&self, worker_id: &str) -> Result<()> {
        sqlx::query("update workers set heartbeat_at = ? where id = ?")
            .bind(now_ms())
            .bind(worker_id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn list_workers(&self) -> Result<Vec<WorkerRow>> {
        let rows = sqlx::query("select * from workers order by heartbeat_at desc")
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| {
                Ok(WorkerRow {
                    id: r.try_get("id")?,
                    hostname: r.try_get("hostname")?,
                    gpu: r.try_get("gpu")?,
                    state: r.try_get("state")?,
                    version: r.try_get("version")?,
                    started_at: required(time_col(r, "started_at")?, "started_at")?,
                    heartbeat_at: required(time_col(r, "heartbeat_at")?, "heartbeat_at")?,
                    current_job: uuid_col(r, "current_job")?,
                    vllm_url: r.try_get("vllm_url")?,
                })
            })
            .collect()
    }

    async fn claim(&self, req: &ClaimRequest) -> Result<Option<Claimed>> {
        let now = now_ms();
        let mut tx = self.pool.begin().await?;
        let sql = format!(
            "update jobs set status = 'running', phase = 'claimed', attempt = attempt + 1,
                worker_id = ?2, lease_expires_at = ?3 + ?4, started_at = coalesce(started_at, ?3)
             where id = (
                select j.id from jobs j
                where j.status = 'queued' and j.run_at <= ?3
                  and j.base_model in (select value from json_each(?1))
                  and not exists (select 1 from jobs r where r.lora_id = j.lora_id and r.status = 'running')
                order by j.priority desc, j.run_at, j.id limit 1)
             returning {JOB_COLUMNS}, payload, coalesce_key"
        );
        let row = sqlx::query(&sql)
            .bind(serde_json::to_string(&req.base_models)?)
            .bind(&req.worker_id)
            .bind(now)
            .bind(ms(req.lease))
            .fetch_optional(&mut *tx)
            .await?;
        let Some(row) = row else {
            return Ok(None);
        };
        let lead = job_from_row(&row)?;
        let payload: JobPayload = required(json_col(&row, "payload")?, "payload")?;
        let coalesce_key: String = row.try_get("coalesce_key")?;
        let lead_id = lead.id.to_string();
        let mut members = Vec::new();
        if lead.published_version.is_none() {
            let sql = format!(
                "update jobs set status = 'coalesced', phase = 'queued', trained_by = ?1,
                    worker_id = ?2, started_at = coalesce(started_at, ?3)
                 where id in (
                    select id from (
                        select id, sum(sample_count) over (order by priority desc, run_at, id) as total
                        from jobs
                        where status = 'queued' and lora_id = ?4 and coalesce_key = ?5 and run_at <= ?3
                          and published_version is null and not cancel_requested
                        order by priority desc, run_at, id limit ?6)
                    where total + ?7 <= ?6)
                 returning {JOB_COLUMNS}, payload"
            );
            let rows = sqlx::query(&sql)
                .bind(&lead_id)
                .bind(&req.worker_id)
                .bind(now)
                .bind(&lead.lora_id)
                .bind(&coalesce_key)
                .bind(req.max_batch_samples)
                .bind(lead.sample_count)
                .fetch_all(&mut *tx)
                .await?;
            for r in &rows {
                members.push((
                    job_from_row(r)?,
                    required(json_col::<JobPayload>(r, "payload")?, "payload")?,
                ));
            }
        }
        members.sort_by_key(|m| (m.0.run_at, m.0.id));
        let message = format!("claimed by {} (attempt {})", req.worker_id, lead.attempt);
        event(&mut tx, &lead_id, now, "claimed", &message).await?;
        for (m, _) in &members {
            let message = format!("joined the batch of job {lead_id}");
            event(&mut tx, &m.id.to_string(), now, "coalesced", &message).await?;
        }
        tx.commit().await?;
        Ok(Some(Claimed {
            job: lead,
            payload,
            members,
        }))
    }

    async fn heartbeat(&self, lease: &Lease, extend: Duration) -> Result<LeaseState> {
        let sql = format!(
            "update jobs set lease_expires_at = ?4 + ?5 where {FENCE} returning cancel_requested"
        );
        let row = sqlx::query(&sql)
            .bind(lease.job_id.to_string())
            .bind(lease.attempt)
            .bind(&lease.worker_id)
            .bind(now_ms())
            .bind(ms(extend))
            .fetch_optional(&self.pool)
            .await?;
        Ok(match row {
            Some(row) => LeaseState::Held {
                cancel_requested: row.try_get("cancel_requested")?,
            },
            None => LeaseState::Lost,
        })
    }

    async fn enter_phase(
        &self,
        lease: &Lease,
        phase: Phase,
        finished: Option<(Phase, u64)>,
    ) -> Result<bool> {
        let [name, took] = timing(finished);
        let set = format!("phase = ?7, {ADD_TIMING}");
        let binds = [name, took, Some(phase.as_str().to_string())];
        let Some((mut tx, now)) = self.fenced_update(lease, &set, &binds).await? else {
            return Ok(false);
        };
        let message = format!("entered {}", phase.as_str());
        event(
            &mut tx,
            &lease.job_id.to_string(),
            now,
            phase.as_str(),
            &message,
        )
        .await?;
        tx.commit().await?;
        Ok(true)
    }

    async fn begin_training(
        &self,
        lease: &Lease,
        finished: Option<(Phase, u64)>,
    ) -> Result<Option<Vec<Uuid>>> {
        let set = format!("phase = 'distill', {ADD_TIMING}");
        let Some((mut tx, now)) = self.fenced_update(lease, &set, &timing(finished)).await? else {
            return Ok(None);
        };
        let lead = lease.job_id.to_string();
        let rows = sqlx::query(
            "update jobs set phase = 'distill' where trained_by = ? and status = 'coalesced' returning id",
        )
        .bind(&lead)
        .fetch_all(&mut *tx)
        .await?;
        event(&mut tx, &lead, now, "distill", "training started").await?;
        let mut ids = Vec::with_capacity(rows.len());
        for r in &rows {
            let id = required(uuid_col(r, "id")?, "id")?;
            let message = format!("training started in batch of {lead}");
            event(&mut tx, &id.to_string(), now, "distill", &message).await?;
            ids.push(id);
        }
        tx.commit().await?;
        Ok(Some(ids))
    }

    async fn publish(&self, lease: &Lease, v: &NewVersion) -> Result<bool> {
        let set = "published_version = cast(?5 as integer)";
        let cond = "published_version is null and exists (select 1 from loras l \
            where l.lora_id = jobs.lora_id and l.current_version = cast(?5 as integer) - 1)";
        let now = now_ms();
        let mut tx = self.pool.begin().await?;
        let sql = format!("update jobs set {set} where {FENCE} and {cond} returning lora_id");
        let row = sqlx::query(&sql)
            .bind(lease.job_id.to_string())
            .bind(lease.attempt)
            .bind(&lease.worker_id)
            .bind(now)
            .bind(v.version)
            .fetch_optional(&mut *tx)
            .await?;
        let Some(row) = row else {
            return Ok(false);
        };
        let lora_id: String = row.try_get("lora_id")?;
        let lead = lease.job_id.to_string();
        sqlx::query(
            "update jobs set published_version = ? where trained_by = ? and status = 'coalesced'",
        )
        .bind(v.version)
        .bind(&lead)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "insert into lora_versions (lora_id, version, storage_uri, sha256, job_id, metrics, created_at)
             values (?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(&lora_id)
        .bind(v.version)
        .bind(&v.storage_uri)
        .bind(&v.sha256)
        .bind(&lead)
        .bind(v.metrics.to_string())
        .bind(now)
        .execute(&mut *tx)
        .await?;
        sqlx::query("update loras set current_version = ?, updated_at = ? where lora_id = ?")
            .bind(v.version)
            .bind(now)
            .bind(&lora_id)
            .execute(&mut *tx)
            .await?;
        let message = format!("published version {}", v.version);
        event(&mut tx, &lead, now, "publish", &message).await?;
        tx.commit().await?;
        Ok(true)
    }

    async fn complete(
        &self,
        lease: &Lease,
        result: &serde_json::Value,
        finished: Option<(Phase, u64)>,
    ) -> Result<bool> {
        let [name, took] = timing(finished);
        let set = format!(
            "status = 'succeeded', phase = 'done', result = ?7, error = null, finished_at = ?4, \
             lease_expires_at = null, {ADD_TIMING}"
        );
        let binds = [name, took, Some(result.to_string())];
        let Some((mut tx, now)) = self.fenced_update(lease, &set, &binds).await? else {
            return Ok(false);
        };
        let lead = lease.job_id.to_string();
        let members = members_follow_lead(&mut tx, &lead, JobStatus::Succeeded, now).await?;
        event(&mut tx, &lead, now, "done", "succeeded").await?;
        for m in &members {
            let message = format!("succeeded in the batch of {lead}");
            event(&mut tx, m, now, "done", &message).await?;
        }
        tx.commit().await?;
        bump(&self.wake_tx);
        Ok(true)
    }

    async fn fail(
        &self,
        lease: &Lease,
        error: &JobError,
        retryable: bool,
        retry: RetryPolicy,
    ) -> Result<FailOutcome> {
        let now = now_ms();
        let mut tx = self.pool.begin().await?;
        let Some(lead) = fenced_lead(&mut tx, lease, now).await? else {
            return Ok(FailOutcome::LeaseLost);
        };
        let retry_now = retryable && lead.attempt < lead.max_attempts;
        let next = super::next_status(lead.published, lead.cancel_requested, retry_now);
        let run_at = now + ms(super::backoff(lease.attempt, retry.base, retry.max));
        let id = lease.job_id.to_string();
        let error = serde_json::to_value(error)?;
        settle_lead(&mut tx, &id, next, Some(&error), now, run_at, 0).await?;
        let message = error.get("message").and_then(|m| m.as_str()).unwrap_or("");
        event(&mut tx, &id, now, next.as_str(), message).await?;
        tx.commit().await?;
        bump(&self.wake_tx);
        Ok(match next {
            JobStatus::Queued => FailOutcome::Retrying,
            JobStatus::Cancelled => FailOutcome::Cancelled,
            _ => FailOutcome::Failed,
        })
    }

    async fn finish_cancelled(&self, lease: &Lease, message: &str) -> Result<bool> {
        let set = "status = 'cancelled', finished_at = ?4, lease_expires_at = null, \
                   error = json_object('code', 'cancelled', 'message', ?5)";
        let binds = [Some(message.to_string())];
        let Some((mut tx, now)) = self.fenced_update(lease, set, &binds).await? else {
            return Ok(false);
        };
        let lead = lease.job_id.to_string();
        members_follow_lead(&mut tx, &lead, JobStatus::Cancelled, now).await?;
        event(&mut tx, &lead, now, "cancelled", message).await?;
        tx.commit().await?;
        bump(&self.wake_tx);
        Ok(true)
    }

    async fn release(&self, lease: &Lease) -> Result<bool> {
        let now = now_ms();
        let mut tx = self.pool.begin().await?;
        let Some(lead) = fenced_lead(&mut tx, lease, now).await? else {
            return Ok(false);
        };
        let next = super::next_status(lead.published, lead.cancel_requested, true);
        let id = lease.job_id.to_string();
        settle_lead(&mut tx, &id, next, None, now, now, 1).await?;
        let message = format!("handed back by {} on shutdown", lease.worker_id);
        event(&mut tx, &id, now, next.as_str(), &message).await?;
        tx.commit().await?;
        bump(&self.wake_tx);
        Ok(true)
    }

    async fn reap_expired(&self, retry: RetryPolicy) -> Result<Reaped> {
        let now = now_ms();
        let mut tx = self.pool.begin().await?;
        let rows = sqlx::query(
            "select id, published_version, cancel_requested, attempt, max_attempts, worker_id
             from jobs where status = 'running' and lease_expires_at <= ?
             order by lease_expires_at limit 100",
        )
        .bind(now)
        .fetch_all(&mut *tx)
        .await?;
        let mut reaped = Reaped::default();
        for r in &rows {
            let id: String = r.try_get("id")?;
            let lead = Stopping {
                published: r.try_get::<Option<i32>, _>("published_version")?.is_some(),
                cancel_requested: r.try_get("cancel_requested")?,
                attempt: r.try_get("attempt")?,
                max_attempts: r.try_get("max_attempts")?,
                worker_id: r.try_get("worker_id")?,
            };
            let message = format!(
                "worker {} stopped renewing its lease on attempt {} of {}",
                lead.worker_id.as_deref().unwrap_or("?"),
                lead.attempt,
                lead.max_attempts
            );
            let error = serde_json::json!({"code": "lease_expired", "message": message});
            let next = super::next_status(
                lead.published,
                lead.cancel_requested,
                lead.attempt < lead.max_attempts,
            );
            let run_at = now + ms(super::backoff(lead.attempt, retry.base, retry.max));
            settle_lead(&mut tx, &id, next, Some(&error), now, run_at, 0).await?;
            event(&mut tx, &id, now, next.as_str(), &message).await?;
            match next {
                JobStatus::Queued => reaped.requeued += 1,
                JobStatus::Failed => reaped.failed += 1,
                _ => reaped.settled += 1,
            }
        }
        tx.commit().await?;
        if reaped.requeued > 0 {
            bump(&self.wake_tx);
        }
        Ok(reaped)
    }

    async fn prune(&self, older_than: Duration, batch: i64) -> Result<u64> {
        let done = sqlx::query(
            "delete from jobs where id in (
                select id from jobs where finished_at < ? order by finished_at limit ?)",
        )
        .bind(now_ms() - ms(older_than))
        .bind(batch)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected())
    }

    async fn status_counts(&self) -> Result<Vec<(JobStatus, i64)>> {
        let rows = sqlx::query("select status, count(*) as n from jobs group by status")
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| {
                let s: String = r.try_get("status")?;
                Ok((s.parse()?, r.try_get("n")?))
            })
            .collect()
    }

    async fn job_payload(&self, id: Uuid) -> Result<Option<JobPayload>> {
        let payload: Option<String> = sqlx::query_scalar("select payload from jobs where id = ?")
            .bind(id.to_string())
            .fetch_optional(&self.pool)
            .await?;
        Ok(payload.map(|p| serde_json::from_str(&p)).transpose()?)
    }

    async fn retry_job(&self, id: Uuid, message: &str) -> Result<Job> {
        let now = now_ms();
        let mut tx = self.pool.begin().await?;
        let sql = format!(
            "update jobs set status = 'queued', phase = 'queued', attempt = 0, run_at = ?2,
                worker_id = null, lease_expires_at = null, cancel_requested = 0,
                finished_at = null, error = null
             where id = ?1 and status = 'failed' and published_version is null
               and exists (select 1 from loras l where l.lora_id = jobs.lora_id and l.deleted_at is null)
             returning {JOB_COLUMNS}"
        );
        let row = sqlx::query(&sql)
            .bind(id.to_string())
            .bind(now)
            .fetch_optional(&mut *tx)
            .await?;
        let Some(row) = row else {
            drop(tx);
            return Err(retry_refusal(self.get_job(id).await?, id));
        };
        let job = job_from_row(&row)?;
        event(&mut tx, &id.to_string(), now, "queued", message).await?;
        tx.commit().await?;
        bump(&self.wake_tx);
        Ok(job)
    }

    async fn delete_job(&self, id: Uuid) -> Result<Job> {
        let sql = format!(
            "delete from jobs where id = ? and status in ('succeeded', 'failed', 'cancelled')
             returning {JOB_COLUMNS}"
        );
        match sqlx::query(&sql)
            .bind(id.to_string())
            .fetch_optional(&self.pool)
            .await?
        {
            Some(row) => job_from_row(&row),
            None => Err(delete_refusal(self.get_job(id).await?, id)),
        }
    }

    async fn add_job_event(&self, id: Uuid, phase: &str, message: &str) -> Result<()> {
        sqlx::query(
            "insert into job_events (job_id, at, phase, message)
             select id, ?2, ?3, ?4 from jobs where id = ?1",
        )
        .bind(id.to_string())
        .bind(now_ms())
        .bind(phase)
        .bind(message)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn record_audit(&self, entry: &AuditEntry) -> Result<()> {
        sqlx::query(
            "insert into audit_log (at, actor, action, job_id, detail) values (?1, ?2, ?3, ?4, ?5)",
        )
        .bind(entry.at.timestamp_millis())
        .bind(&entry.actor)
        .bind(&entry.action)
        .bind(entry.job_id.map(|u| u.to_string()))
        .bind(&entry.detail)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn recent_audit(&self, limit: i64) -> Result<Vec<AuditEntry>> {
        let rows = sqlx::query(
            "select at, actor, action, job_id, detail from audit_log order by id desc limit ?",
        )
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(AuditEntry {
                    at: ms_to_datetime(r.try_get("at")?),
                    actor: r.try_get("actor")?,
                    action: r.try_get("action")?,
                    job_id: uuid_col(r, "job_id")?,
                    detail: r.try_get("detail")?,
                })
            })
            .collect()
    }

    async fn request_adapter(&self, vllm_url: &str, lora_id: &str) -> Result<()> {
        sqlx::query(
            "insert into adapter_requests (vllm_url, lora_id, requested_at) values (?1, ?2, ?3)
             on conflict do nothing",
        )
        .bind(vllm_url)
        .bind(lora_id)
        .bind(now_ms())
        .execute(&self.pool)
        .await?;
        bump(&self.wake_tx);
        Ok(())
    }

    async fn take_adapter_requests(&self, vllm_url: &str) -> Result<Vec<String>> {
        let rows: Vec<(String, i64)> = sqlx::query_as(
            "delete from adapter_requests where vllm_url = ? returning lora_id, requested_at",
        )
        .bind(vllm_url)
        .fetch_all(&self.pool)
        .await?;
        Ok(oldest_first(rows))
    }
}
