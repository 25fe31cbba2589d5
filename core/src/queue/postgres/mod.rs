//! The Postgres store: the fleet's queue. Every state change is one SQL statement (CTEs
//! where it touches several rows), so a crash can never leave half a transition behind.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::postgres::{PgConnectOptions, PgListener, PgPool, PgPoolOptions, PgRow};
use sqlx::{ConnectOptions, Row};
use tokio::sync::{watch, OnceCell};
use tokio::task::JoinHandle;
use uuid::Uuid;

use super::oldest_first;
use super::{
    bump, delete_refusal, retry_refusal, AuditEntry, CancelOutcome, ClaimRequest, Claimed,
    Enqueued, FailOutcome, JobFilter, Lease, LeaseState, Reaped, RetryPolicy, Store, Wakeups,
};
use crate::error::{Error, Result};
use crate::types::{
    ApiKey, Job, JobError, JobEvent, JobPayload, JobStatus, Lora, LoraVersion, NewJob, NewLora,
    NewVersion, Phase, WorkerInfo, WorkerRow, WorkerState,
};

mod hot;
mod jobs;
mod keys;
mod lease;
mod loras;
mod ops;
mod workers;

/// The notification channel the enqueue trigger signals.
const CHANNEL: &str = "claas_jobs";

/// Columns of `jobs` that make a [`Job`] (everything but the payload).
const JOB_COLUMNS: &str = "id, lora_id, base_model, caller, status, phase, sample_count, \
    orchestration, priority, attempt, max_attempts, run_at, worker_id, lease_expires_at, \
    cancel_requested, idempotency_key, trace_context, timings_ms, result, error, trained_by, \
    published_version, created_at, started_at, finished_at";

/// The fencing predicate every worker write carries: the job is still running under the
/// claim this worker made (the token it drew, see `Lease::token`), and the lease has not
/// run out.
const FENCE: &str = "id = $1 and lease_token = $2 and worker_id = $3 and status = 'running' \
    and lease_expires_at > now()";

/// A claim that loses the race for a LoRA (unique violation) is retried at once, since the
/// next try sees the winner's running job and skips that LoRA; this bounds a pathological
/// storm so the caller's poll loop, not this function, waits.
const CLAIM_RACE_RETRIES: usize = 32;

/// What one process may hold of the database: see README "Connections".
#[derive(Debug, Clone, Copy)]
pub struct PoolSettings {
    /// The pool's size.
    pub max_connections: u32,
    /// Connections opened at start and kept (reopened in the background when lost).
    pub min_connections: u32,
    /// Pooled connections idle this long are closed (`None`: sqlx's 10 minutes).
    pub idle_timeout: Option<Duration>,
    /// Listener slots fleet-wide (per schema); a process whose `LISTEN` connection gets
    /// none closes it and polls. 0: never listen.
    pub listener_slots: u32,
    /// How long a statement waits for a connection (sqlx retries a full server meanwhile)
    /// before it fails.
    pub acquire_timeout: Duration,
}

impl PoolSettings {
    /// An API process: its whole pool is opened at start and kept, so a fleet of workers
    /// starting together cannot take the server's connections while requests wait.
    pub fn api(max_connections: u32) -> Self {
        PoolSettings {
            max_connections,
            min_connections: max_connections,
            idle_timeout: None,
            listener_slots: 0,
            // A request answers "unavailable" quickly while the database is down.
            acquire_timeout: Duration::from_secs(3),
        }
    }

    /// A command that runs and exits (`claas migrate`, `claas keys`), a test or a tool:
    /// connections are opened as they are needed and kept warm.
    pub fn tool(max_connections: u32) -> Self {
        PoolSettings {
            min_connections: 0,
            ..Self::api(max_connections)
        }
    }

    /// A worker process: its statements come in short bursts seconds apart (a claim, a
    /// phase, a heartbeat), so its connections close between them and a fleet of idle or
    /// training workers holds next to nothing; `listener_slots` of them keep a `LISTEN`.
    pub fn worker(max_connections: u32, listener_slots: u32) -> Self {
        PoolSettings {
            max_connections,
            min_connections: 0,
            idle_timeout: Some(Duration::from_millis(50)),
            listener_slots,
            // A worker would rather wait for a connection of a full server than fail a
            // job's phase: its lease outlives the wait.
            acquire_timeout: Duration::from_secs(30),
        }
    }
}

pub struct PgStore {
    pool: PgPool,
    listener_opts: PgConnectOptions,
    listener_slots: u32,
    wake_tx: watch::Sender<u64>,
    wake_rx: Wakeups,
    listener: OnceCell<JoinHandle<()>>,
    hot: Arc<hot::HotConnections>,
    sweeper: JoinHandle<()>,
    enqueued: Arc<tokio::sync::Notify>,
    notifier: JoinHandle<()>,
}

impl Drop for PgStore {
    fn drop(&mut self) {
        self.sweeper.abort();
        self.notifier.abort();
        if let Some(handle) = self.listener.get() {
            handle.abort();
        }
    }
}

impl PgStore {
    /// Connections the pool holds now, in use or idle.
    pub fn pool_size(&self) -> u32 {
        self.pool.size()
    }

    /// Connects a pool. With `schema`, every connection uses it as `search_path` (tests give
    /// each case its own schema). Acquiring a connection gives up after 3 s so callers
    /// answer "unavailable" quickly while the database is down.
    pub async fn connect(url: &str, schema: Option<&str>, max_connections: u32) -> Result<Self> {
        let mut settings = PoolSettings::tool(max_connections);
        // Tests and tools that claim through this store listen as a worker does.
        settings.listener_slots = u32::MAX;
        Self::connect_with(url, schema, settings).await
    }

    /// [`Self::connect`] with a process's [`PoolSettings`].
    pub async fn connect_with(
        url: &str,
        schema: Option<&str>,
        settings: PoolSettings,
    ) -> Result<Self> {
        let max_connections = settings.max_connections;
        let mut opts: PgConnectOptions = url
            .parse()
            .map_err(|e| Error::Config(format!("database.url: {e}")))?;
        opts = opts
            .application_name("claas")
            .log_statements(tracing::log::LevelFilter::Trace);
        // The queue's statements are parameterised CTEs whose best plan does not depend on the
        // values; re-planning each (custom plans) cost ~0.8 ms of CPU per claim.
        opts = opts.options([("plan_cache_mode", "force_generic_plan")]);
        if let Some(schema) = schema {
            opts = opts.options([("search_path", schema)]);
        }
        let listener_opts = opts
            .clone()
            .application_name(&format!("claas-listener-{}", schema.unwrap_or("public")));
        let mut pool = PgPoolOptions::new()
            .max_connections(max_connections)
            .min_connections(settings.min_connections)
            .acquire_timeout(settings.acquire_timeout);
        if let Some(idle) = settings.idle_timeout {
            pool = pool.idle_timeout(idle);
        }
        let pool = pool
            .test_before_acquire(false)
            .before_acquire(|conn, meta| Box::pin(ping_if_idle(conn, meta)))
            .connect_lazy_with(opts);
        if settings.min_connections > 0 {
            // sqlx opens `min_connections` of a lazy pool only after its first reap.
            tokio::spawn(open_connections(pool.clone(), settings.min_connections));
        }
        let (wake_tx, wake_rx) = Wakeups::channel();
        let hot = hot::HotConnections::new(max_connections as usize);
        let enqueued = Arc::new(tokio::sync::Notify::new());
        Ok(PgStore {
            notifier: tokio::spawn(notify_enqueues(pool.clone(), enqueued.clone())),
            enqueued,
            pool,
            listener_opts,
            listener_slots: settings.listener_slots,
            wake_tx,
            wake_rx,
            listener: OnceCell::new(),
            sweeper: hot.sweep(),
            hot,
        })
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }
}

/// How long a pooled connection may sit idle before it is pinged on acquire.
const PING_IDLE_AFTER: Duration = Duration::from_secs(1);

/// sqlx pings every connection when it goes back to the pool and, by default, again when it
/// comes out: three round trips per statement. A connection released
/// less than [`PING_IDLE_AFTER`] ago answered its release ping, so only one idle for longer
/// (across a database restart, say) is pinged; one that fails is dropped and another tried.
async fn ping_if_idle(
    conn: &mut sqlx::PgConnection,
    meta: sqlx::pool::PoolConnectionMetadata,
) -> std::result::Result<bool, sqlx::Error> {
    if meta.idle_for < PING_IDLE_AFTER {
        return Ok(true);
    }
    match sqlx::Connection::ping(conn).await {
        Ok(()) => Ok(true),
        Err(error) => {
            tracing::info!(%error, "an idle database connection is gone; opening another");
            Ok(false)
        }
    }
}

/// Opens `n` connections of a new pool and returns them to it idle, so they are there
/// before the first request. While the database is unreachable (or full) it tries again,
/// for about two minutes; after that connections open as requests need them.
async fn open_connections(pool: PgPool, n: u32) {
    for _ in 0..30 {
        let mut held = Vec::new();
        let mut error = None;
        while held.len() < n as usize {
            match pool.acquire().await {
                Ok(conn) => held.push(conn),
                Err(e) => {
                    error = Some(e);
                    break;
                }
            }
        }
        drop(held);
        match error {
            None => return,
            Some(_) if pool.is_closed() => return,
            Some(e) => {
                tracing::debug!(error = %e, "cannot open the pool's connections yet");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
    tracing::warn!(
        n,
        "could not open the pool's connections at start; they open as requests need them"
    );
}

/// At most one wake-up notification per this long from one process.
const NOTIFY_EVERY: Duration = Duration::from_millis(10);

/// Sends `NOTIFY` after enqueues commit, one for any number of them within [`NOTIFY_EVERY`].
/// A transaction that notifies holds a database-wide lock from its commit until the commit
/// record is flushed, so notifying inside every enqueue made concurrent enqueues wait for
/// each other's WAL flushes. Each poke is answered by a notification sent after it.
async fn notify_enqueues(pool: PgPool, enqueued: Arc<tokio::sync::Notify>) {
    loop {
        enqueued.notified().await;
        if let Err(error) = sqlx::query("select pg_notify($1, '')")
            .bind(CHANNEL)
            .execute(&pool)
            .await
        {
            // Workers poll as well: a lost wake-up only delays a claim.
            tracing::debug!(%error, "could not send the enqueue notification");
        }
        tokio::time::sleep(NOTIFY_EVERY).await;
    }
}

/// Keeps one `LISTEN` connection open for the process, if it gets one of `slots` listener
/// slots (session advisory locks, per schema, held by that connection): a fleet of
/// hundreds of workers cannot each hold a connection for listening, and with many workers
/// the polls alone claim a new job within milliseconds. Without a slot, or where `LISTEN`
/// fails (PgBouncer in transaction mode), the claim loop polls and a slot is tried again
/// later. After every (re)connect it wakes the claimers once: notifications sent while
/// the connection was down are lost, so each claimer must look at the table after
/// `LISTEN` is in place again.
// Long: one reconnect loop: connect, LISTEN, wake the claimers, dispatch, back off.
async fn listen_forever(
    shared: PgPool,
    opts: PgConnectOptions,
    slots: u32,
    tx: watch::Sender<u64>,
) {
    if slots == 0 {
        tracing::info!("not listening for job notifications (database.max_listeners = 0); polling");
        return;
    }
    let mut delay = Duration::from_millis(100);
    loop {
        // Whether a slot is free is asked on the process's pool, so a fleet starting at
        // once does not open a connection per worker only to find every slot taken.
        // `None`: slots are unlimited (tests and tools), take none.
        let slot = match free_listener_slot(&shared, slots).await {
            Ok(Some(slot)) => slot,
            Ok(None) => {
                tracing::debug!(slots, "every listener slot is taken; polling");
                let jitter = Duration::from_millis(rand::random::<u64>() % 30_000);
                tokio::time::sleep(SLOT_RETRY + jitter).await;
                continue;
            }
            Err(e) => {
                tracing::debug!(error = %e, "job listener cannot look for a slot yet");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        // A pool per attempt: closing it closes the connection of an attempt that lost
        // the slot, where dropping the listener would park it in the pool, held.
        let pool = PgPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(Duration::from_secs(3))
            .connect_lazy_with(opts.clone());
        let listener = async {
            let mut l = PgListener::connect_with(&pool).await?;
            l.ignore_pool_close_event(true);
            if let Some(slot) = slot {
                let taken: bool = sqlx::query_scalar(
                    "select pg_try_advisory_lock(hashtext('claas-listener:' || current_schema()), $1)",
                )
                .bind(slot)
                .fetch_one(&mut l)
                .await?;
                if !taken {
                    // Another process took it first.
                    return Ok(None);
                }
            }
            l.listen(CHANNEL).await?;
            Ok::<_, sqlx::Error>(Some(l))
        }
        .await;
        match listener {
            Ok(Some(mut l)) => {
                delay = Duration::from_millis(100);
                tracing::debug!("listening for job notifications");
                bump(&tx);
                loop {
                    match l.try_recv().await {
                        Ok(Some(_)) => bump(&tx),
                        Ok(None) => {
                            tracing::warn!("job listener connection lost; reconnecting");
                            break;
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "job listener failed; reconnecting");
                            break;
                        }
                    }
                }
                drop(l);
                pool.close().await;
            }
            Ok(None) => {
                pool.close().await;
                tracing::debug!(slots, "every listener slot is taken; polling");
                let jitter = Duration::from_millis(rand::random::<u64>() % 30_000);
                tokio::time::sleep(SLOT_RETRY + jitter).await;
            }
            Err(e) => {
                pool.close().await;
                tracing::debug!(error = %e, "job listener cannot connect yet");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// How long a process without a listener slot polls before it tries for one again.
const SLOT_RETRY: Duration = Duration::from_secs(30);

/// A listener slot nobody holds, `None` when all are held, or `Ok(Some(None))` when slots
/// are unlimited. Slots are advisory locks keyed by the schema, so test schemas (and two
/// queues in one database) count their own.
async fn free_listener_slot(
    pool: &PgPool,
    slots: u32,
) -> std::result::Result<Option<Option<i32>>, sqlx::Error> {
    if slots == u32::MAX {
        return Ok(Some(None));
    }
    let free: Option<i32> = sqlx::query_scalar(
        "select s from generate_series(0, $1::int - 1) s where not exists ( \
             select 1 from pg_locks l where l.locktype = 'advisory' \
               and l.database = (select oid from pg_database where datname = current_database()) \
               and l.classid = hashtext('claas-listener:' || current_schema())::oid \
               and l.objid = s::oid and l.objsubid = 2) \
         order by random() limit 1",
    )
    .bind(i32::try_from(slots).unwrap_or(i32::MAX))
    .fetch_optional(pool)
    .await?;
    Ok(free.map(Some))
}

fn job_from_row(row: &PgRow) -> Result<Job> {
    let status: String = row.try_get("status")?;
    let phase: String = row.try_get("phase")?;
    let orchestration: serde_json::Value = row.try_get("orchestration")?;
    let timings: serde_json::Value = row.try_get("timings_ms")?;
    let error: Option<serde_json::Value> = row.try_get("error")?;
    Ok(Job {
        id: row.try_get("id")?,
        lora_id: row.try_get("lora_id")?,
        base_model: row.try_get("base_model")?,
        caller: row.try_get("caller")?,
        status: status.parse().map_err(|_| Error::Corrupt(status))?,
        phase: phase.parse()?,
        sample_count: row.try_get("sample_count")?,
        orchestration: serde_json::from_value(orchestration)?,
        priority: row.try_get("priority")?,
        attempt: row.try_get("attempt")?,
        max_attempts: row.try_get("max_attempts")?,
        run_at: row.try_get("run_at")?,
        worker_id: row.try_get("worker_id")?,
        lease_expires_at: row.try_get("lease_expires_at")?,
        cancel_requested: row.try_get("cancel_requested")?,
        idempotency_key: row.try_get("idempotency_key")?,
        trace_context: row.try_get("trace_context")?,
        timings_ms: serde_json::from_value::<BTreeMap<String, u64>>(timings)?,
        result: row.try_get("result")?,
        error: error.map(serde_json::from_value).transpose()?,
        trained_by: row.try_get("trained_by")?,
        published_version: row.try_get("published_version")?,
        created_at: row.try_get("created_at")?,
        started_at: row.try_get("started_at")?,
        finished_at: row.try_get("finished_at")?,
    })
}

fn lora_from_row(row: &PgRow) -> Result<Lora> {
    let modules: serde_json::Value = row.try_get("target_modules")?;
    Ok(Lora {
        lora_id: row.try_get("lora_id")?,
        base_model: row.try_get("base_model")?,
        rank: row.try_get("rank")?,
        alpha: row.try_get("alpha")?,
        target_modules: serde_json::from_value(modules)?,
        current_version: row.try_get("current_version")?,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
    })
}

fn is_unique_violation(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(db) if db.code().as_deref() == Some("23505"))
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// A CTE that commits its statement without waiting for the WAL flush
/// (`synchronous_commit = off` for this transaction only), for claims and completions.
/// Postgres recovers a consistent prefix of commits, so a crash can undo at most the last
/// few hundred milliseconds of them, and each undo is one the queue already recovers from:
/// an undone claim leaves the job queued, and the worker that ran it is fenced out at its
/// next write (`publish` at the latest); an undone completion leaves the job running until its lease expires, and its
/// retry resumes after the version it published. `publish`, which records what training
/// produced, and enqueue, which accepts feedback, still wait for the flush; either flush
/// also makes every earlier commit durable. The commit still waits when `unless` (an SQL
/// condition) holds: a completion on the job's last attempt, whose undo would leave the
/// lease reaper no attempt to resume with, so a job seen `succeeded` would end `failed`.
/// Reference the CTE from the statement's final `select` (an unreferenced CTE that writes
/// nothing is never run).
fn commit_without_flush(unless: &str) -> String {
    format!(
        "no_flush as (select set_config('synchronous_commit', case when {unless} \
         then current_setting('synchronous_commit') else 'off' end, true) as setting)"
    )
}

/// `(phase name, ms)` of a finished phase as two nullable binds.
fn timing(finished: Option<(Phase, u64)>) -> (Option<&'static str>, Option<i64>) {
    match finished {
        Some((p, t)) => (Some(p.as_str()), Some(i64::try_from(t).unwrap_or(i64::MAX))),
        None => (None, None),
    }
}

/// SQL that adds `$a: $b` (phase, ms) to `timings_ms` when `$a` is not null.
fn add_timing(a: u8, b: u8) -> String {
    format!(
        "case when ${a}::text is null then timings_ms \
         else timings_ms || jsonb_build_object(${a}::text, ${b}::bigint) end"
    )
}

/// A CTE that locks the members of the running lead `$1`, for statements that write the
/// lead and then its members; [`MEMBERS_HELD`] makes the lead's write wait for it. A claim
/// can hold a member's row lock while it runs (Postgres keeps the lock on a row it re-checked
/// and skipped), and a claim whose new lead is of the same LoRA waits for whoever is writing
/// the LoRA's running row, to learn whether its unique entry stays. Writing the lead and only
/// then waiting for a member closed that cycle: deadlocks under `claas bench queue --loras 10`.
const HOLD_MEMBERS: &str =
    "held as (select id from jobs where trained_by = $1 and status = 'coalesced' for update)";

/// The condition that orders a lead's write after `held` (a one-time filter: Postgres
/// evaluates it before the scan returns the lead's row).
const MEMBERS_HELD: &str = "(select count(*) from held) >= 0";

/// The update that settles a batch's members when its lead leaves `running`: they end in
/// the lead's terminal state, or go back to `queued` (detached) unless already published.
const MEMBERS_FOLLOW_LEAD: &str = "
    update jobs m set
        status = case when lead.status in ('succeeded', 'failed', 'cancelled')
                       and (lead.status <> 'cancelled' or m.published_version is not null)
                      then lead.status
                      when m.published_version is null then 'queued' else 'coalesced' end,
        trained_by = case when m.published_version is null and lead.status in ('queued', 'cancelled')
                          then null else m.trained_by end,
        batch_event = case when m.published_version is null and lead.status in ('queued', 'cancelled')
                           then null else m.batch_event end,
        phase = case when lead.status = 'succeeded' then 'done'
                     when m.published_version is null then 'queued' else m.phase end,
        worker_id = null,
        result = case when lead.status = 'succeeded' then lead.result else m.result end,
        error = case when lead.status = 'failed' then lead.error
                     when lead.status = 'succeeded' then null else m.error end,
        finished_at = case when lead.status in ('succeeded', 'failed') then now()
                           when lead.status = 'cancelled' and m.published_version is not null then now()
                           else null end
    from lead where m.trained_by = lead.id and m.status = 'coalesced'
    returning m.id, m.status, lead.id as lead_id, lead.status as lead_status";

/// Events for the members [`MEMBERS_FOLLOW_LEAD`] sent back to the queue: once detached,
/// a member's timeline no longer reads its lead's, so it says itself where it went.
const DETACHED_MEMBER_EVENTS: &str = "
    union all
    select id, 'queued', 'left the batch of job ' || lead_id || ' unpublished (its lead is now '
        || lead_status || '); back in the queue'
    from members where status = 'queued'";

/// SQL for `super::next_status` on the lead aliased `j`: the status it takes when it stops
/// without completing, `retry` being the SQL condition for another run.
fn next_status(retry: &str) -> String {
    format!(
        "(case when j.published_version is not null
              then case when {retry} then 'queued' else 'failed' end
              when {retry} then case when j.cancel_requested then 'cancelled' else 'queued' end
              else 'failed' end)"
    )
}

/// The SET list that moves a running lead to `next` (an SQL expression from [`next_status`])
/// with the error `error` (jsonb), retrying after `delay` (ms).
fn settle_lead(next: &str, error: &str, delay: &str) -> String {
    format!(
        "status = {next},
         phase = case {next} when 'queued' then 'queued' when 'succeeded' then 'done' else j.phase end,
         run_at = case when {next} = 'queued' then now() + {delay} * interval '1 millisecond'
                  else j.run_at end,
         finished_at = case when {next} = 'queued' then null else now() end,
         result = case when j.published_version is not null
                  then coalesce(j.result, jsonb_build_object('version', j.published_version))
                  else j.result end,
         error = case when {next} = 'cancelled'
                 then jsonb_build_object('code', 'cancelled', 'message',
                      'cancelled by request (the run had stopped: ' || coalesce(({error})->>'message', 'handed back') || ')')
                 else coalesce({error}, j.error) end,
         -- A finished job keeps the worker that ran it last (the dashboard filters by it).
         worker_id = case when {next} = 'queued' then null else j.worker_id end,
         lease_expires_at = null, lease_token = null"
    )
}

#[async_trait]
impl Store for PgStore {
    fn backend(&self) -> &'static str {
        "postgres"
    }

    async fn migrate(&self) -> Result<()> {
        sqlx::migrate!("../migrations/postgres")
            .run(&self.pool)
            .await?;
        Ok(())
    }

    async fn ping(&self) -> Result<()> {
        sqlx::query("select 1").execute(&self.pool).await?;
        Ok(())
    }

    async fn wakeups(&self) -> Result<Wakeups> {
        self.listener
            .get_or_init(|| async {
                tokio::spawn(listen_forever(
                    self.pool.clone(),
                    self.listener_opts.clone(),
                    self.listener_slots,
                    self.wake_tx.clone(),
                ))
            })
            .await;
        Ok(self.wake_rx.clone())
    }
}

fn api_key_from_row(r: &PgRow) -> Result<ApiKey> {
    Ok(ApiKey {
        id: r.try_get("id")?,
        name: r.try_get("name")?,
        prefixes: serde_json::from_value(r.try_get("prefixes")?)?,
        admin: r.try_get("admin")?,
        created_at: r.try_get("created_at")?,
        revoked_at: r.try_get("revoked_at")?,
    })
}

/// Why a job that matched no cancellable state cannot be cancelled.
pub(crate) fn cancel_refusal(job: &Job) -> Error {
    if let (Some(v), false) = (job.published_version, job.status.is_terminal()) {
        return Error::Conflict(format!(
            "job {} is already trained into version {v} of LoRA {}; it can no longer be cancelled",
            job.id, job.lora_id
        ));
    }
    match (job.status, job.trained_by) {
        (JobStatus::Coalesced, Some(lead)) => Error::Conflict(format!(
            "job {} is already being trained in the batch of job {lead}; it can no longer be cancelled",
            job.id
        )),
        (status, _) => Error::Conflict(format!(
            "job {} already finished ({}); it can no longer be cancelled",
            job.id,
            status.as_str()
        )),
    }
}
