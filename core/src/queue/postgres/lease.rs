//! The Postgres store: the fenced worker path (claim to finish).

use std::sync::LazyLock;

use super::*;
use crate::queue::prelude::*;
use crate::queue::CLAIM_WINDOW;

/// The claim in claim order, among the first [`CLAIM_WINDOW`] queued jobs. The window is
/// read lazily: a claim whose first job can run reads one row. Each job is locked through
/// a lateral lookup of its row version (see [`LEAD`]), after the checks, so only the lead
/// is locked.
static CLAIM_IN_ORDER: LazyLock<String> = LazyLock::new(|| {
    claim_sql(&format!(
        "lead as (
            select x.* from (
                select id, ctid as tid from jobs where status = 'queued'
                order by priority desc, run_at, id limit {CLAIM_WINDOW}
            ) w cross join lateral (
                select {LEAD} from jobs j
                where j.ctid = w.tid and j.id = w.id and j.status = 'queued' and j.run_at <= now()
                  and j.base_model = any($1) and {IDLE}
                for update of j skip locked
            ) x
            limit 1
        )"
    ))
});

/// The claim when the window held nothing to run: the best first queued job of each idle
/// LoRA. `queued_loras` is a skip scan over `jobs_queued_by_lora`, one index descent per LoRA
/// with queued jobs however deep the busy LoRAs' backlogs, and every step is a `limit 1`
/// descent, so its plan does not depend on the table's statistics.
static CLAIM_PAST_BUSY_LORAS: LazyLock<String> = LazyLock::new(|| {
    claim_sql(&format!(
        "queued_loras(lora_id) as (
            (select lora_id from jobs where status = 'queued' order by lora_id limit 1)
            union all
            select (select q.lora_id from jobs q where q.status = 'queued' and q.lora_id > l.lora_id
                    order by q.lora_id limit 1)
            from queued_loras l
            where l.lora_id is not null
        ), lead as (
            select x.* from (
                select h.* from queued_loras l cross join lateral (
                    select id, ctid as tid, priority, run_at from jobs h
                    where h.lora_id = l.lora_id and h.status = 'queued' and h.run_at <= now()
                      and h.base_model = any($1)
                    order by priority desc, run_at, id limit 1
                ) h
                -- Idle LoRAs only, checked once per LoRA (the lock below re-checks nothing
                -- that this statement's snapshot could see differently).
                where l.lora_id is not null
                  and not exists (select 1 from jobs r where r.lora_id = l.lora_id and r.status = 'running')
                order by h.priority desc, h.run_at, h.id
            ) w cross join lateral (
                select {LEAD} from jobs j
                where j.ctid = w.tid and j.id = w.id and j.status = 'queued'
                for update of j skip locked
            ) x
            limit 1
        )"
    ))
});

/// The lead's columns the rest of the claim reads, and `tid`, the `ctid` of the version this
/// statement's snapshot saw. Rows are found again by that `ctid` (with the id re-checked)
/// rather than by primary key: these statements run as generic plans cached per connection,
/// and one planned while `jobs` was empty looked a job up by scanning a partial index (the
/// whole queue) and wrote the batch through a sequential scan of the table, a plan kept
/// until something invalidates it. A TID lookup is the one plan for `ctid = ...` at any
/// size. A row written since the snapshot is followed to its newest version by the row
/// lock and by the update, which re-check their conditions on it. (A member's `tid` comes
/// from its row lock; if that lock followed a newer version, the update does not see the
/// member, which stays queued, outside the batch.)
const LEAD: &str =
    "j.id, j.lora_id, j.coalesce_key, j.sample_count, j.published_version, j.attempt, w.tid";

/// No job of the row's LoRA is running.
const IDLE: &str =
    "not exists (select 1 from jobs r where r.lora_id = j.lora_id and r.status = 'running')";

/// The claim around a `lead` CTE: lock the lead's batch, write lead and members in one
/// `update` (every node that writes `jobs` opens its eleven indexes and prepares its check
/// constraints, once per statement: one node instead of two was +5 % on `claas bench
/// queue`), and return the lead first. (`recursive` is for the per-LoRA lead's skip scan.)
fn claim_sql(lead: &str) -> String {
    format!(
        "with recursive {lead}, candidates as (
            -- The lead's values as parameters, not a join: then `jobs_queued_by_lora`
            -- hands rows over in claim order and the scan stops at the limit, where a
            -- join read and sorted every queued job of the LoRA on each claim.
            select q.id, q.ctid as tid, q.sample_count, q.priority, q.run_at
            from jobs q
            where q.lora_id = (select lora_id from lead)
              and q.coalesce_key = (select coalesce_key from lead)
              and q.status = 'queued' and q.id <> (select id from lead) and q.run_at <= now()
              and (select published_version from lead) is null and q.published_version is null
              and not q.cancel_requested
            order by q.priority desc, q.run_at, q.id
            limit $4
            for update of q skip locked
        ), joined as (
            select t.id, t.tid from (
                select id, tid, sum(sample_count) over (order by priority desc, run_at, id) as total
                from candidates
            ) t, lead c
            where t.total + c.sample_count <= $4
        ), ev as (
            insert into job_events (job_id, phase, message)
            select id, 'claimed', 'claimed by ' || $2 || ' (attempt ' || (attempt + 1) || ')'
                || coalesce(' with ' || nullif((select count(*) from joined), 0) || ' coalesced job(s)', '')
            from lead
            returning id
        ), batch as (
            -- The lead runs; its members join it. No event per member: a member's
            -- timeline reads its lead's from `ev` on.
            update jobs j set
                status = case when t.lead then 'running' else 'coalesced' end,
                phase = case when t.lead then 'claimed' else 'queued' end,
                attempt = j.attempt + t.lead::int,
                worker_id = case when t.lead then $2 else j.worker_id end,
                lease_token = case when t.lead then $5 else j.lease_token end,
                lease_expires_at = case when t.lead
                    then now() + $3 * interval '1 millisecond' else j.lease_expires_at end,
                trained_by = case when t.lead then j.trained_by else lead.id end,
                batch_event = case when t.lead then j.batch_event else (select id from ev) end,
                started_at = coalesce(j.started_at, now())
            from lead, (select id, tid, true as lead from lead union all select id, tid, false from joined) t
            where j.ctid = t.tid and j.id = t.id
            returning (not t.lead)::int as ord, j.*
        ), {no_flush}
        select ord, {JOB_COLUMNS}, payload from batch, no_flush order by ord, run_at, id",
        no_flush = commit_without_flush("false")
    )
}

#[async_trait]
impl LeaseStore for PgStore {
    async fn claim(&self, req: &ClaimRequest) -> Result<Option<Claimed>> {
        let token = Uuid::new_v4();
        let mut conn = self.hot.get(&self.pool).await?;
        'race: for _ in 0..CLAIM_RACE_RETRIES {
            // The window in claim order holds the lead unless busy LoRAs hold the head of
            // the queue; only then does the second query look past them.
            let mut rows = Vec::new();
            for sql in [&*CLAIM_IN_ORDER, &*CLAIM_PAST_BUSY_LORAS] {
                rows = match sqlx::query(sql)
                    .bind(&req.base_models)
                    .bind(&req.worker_id)
                    .bind(ms(req.lease))
                    .bind(req.max_batch_samples)
                    .bind(token)
                    .fetch_all(&mut *conn)
                    .await
                {
                    Ok(rows) => rows,
                    Err(e) if is_unique_violation(&e) => continue 'race,
                    Err(e) => return Err(e.into()),
                };
                if !rows.is_empty() {
                    break;
                }
            }
            conn.keep();
            let mut decoded = rows.iter().map(|row| {
                let payload: serde_json::Value = row.try_get("payload")?;
                Ok::<_, Error>((
                    job_from_row(row)?,
                    serde_json::from_value::<JobPayload>(payload)?,
                ))
            });
            let Some(lead) = decoded.next().transpose()? else {
                return Ok(None);
            };
            let members = decoded.collect::<Result<Vec<_>>>()?;
            return Ok(Some(Claimed {
                job: lead.0,
                payload: lead.1,
                members,
                token,
            }));
        }
        Ok(None)
    }

    async fn heartbeat(&self, lease: &Lease, extend: Duration) -> Result<LeaseState> {
        let sql = format!(
            "update jobs set lease_expires_at = now() + $4 * interval '1 millisecond'
             where {FENCE} returning cancel_requested"
        );
        let mut conn = self.hot.get(&self.pool).await?;
        let row = sqlx::query(&sql)
            .bind(lease.job_id)
            .bind(lease.token)
            .bind(&lease.worker_id)
            .bind(ms(extend))
            .fetch_optional(&mut *conn)
            .await?;
        conn.keep();
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
        let (prev, took) = timing(finished);
        let sql = format!(
            "with j as (
                update jobs set phase = $4, timings_ms = {timings} where {FENCE} returning id
            )
            insert into job_events (job_id, phase, message) select id, $4, 'entered ' || $4 from j",
            timings = add_timing(5, 6)
        );
        let mut conn = self.hot.get(&self.pool).await?;
        let done = sqlx::query(&sql)
            .bind(lease.job_id)
            .bind(lease.token)
            .bind(&lease.worker_id)
            .bind(phase.as_str())
            .bind(prev)
            .bind(took)
            .execute(&mut *conn)
            .await?;
        conn.keep();
        Ok(done.rows_affected() == 1)
    }

    async fn begin_training(
        &self,
        lease: &Lease,
        finished: Option<(Phase, u64)>,
    ) -> Result<Option<Vec<Uuid>>> {
        let (prev, took) = timing(finished);
        let sql = format!(
            "with {HOLD_MEMBERS}, lead as (
                update jobs set phase = 'distill', timings_ms = {timings}
                where {FENCE} and {MEMBERS_HELD} returning id
            ), members as (
                update jobs m set phase = 'distill' from lead
                where m.trained_by = lead.id and m.status = 'coalesced' returning m.id
            ), ev as (
                insert into job_events (job_id, phase, message)
                select id, 'distill', 'training started' from lead
            )
            select (select count(*) from lead) as leads,
                   coalesce((select array_agg(id) from members), '{{}}') as members",
            timings = add_timing(4, 5)
        );
        let mut conn = self.hot.get(&self.pool).await?;
        let row = sqlx::query(&sql)
            .bind(lease.job_id)
            .bind(lease.token)
            .bind(&lease.worker_id)
            .bind(prev)
            .bind(took)
            .fetch_one(&mut *conn)
            .await?;
        conn.keep();
        let leads: i64 = row.try_get("leads")?;
        Ok((leads == 1).then(|| row.try_get("members")).transpose()?)
    }

    async fn leave_batch(
        &self,
        lease: &Lease,
        member: Uuid,
        error: Option<&JobError>,
    ) -> Result<bool> {
        // The member's row is locked before the lead's, as on every write to a batch.
        let sql = format!(
            "with held as (
                select id from jobs where id = $4 and trained_by = $1 and status = 'coalesced'
                  and published_version is null
                for update
            ), lead as (
                select id from jobs where {FENCE} and (select count(*) from held) >= 0 for update
            ), gone as (
                update jobs m set
                    status = case when $5::jsonb is null then 'queued' else 'failed' end,
                    phase = case when $5::jsonb is null then 'queued' else m.phase end,
                    trained_by = null, batch_event = null, worker_id = null, error = $5::jsonb,
                    finished_at = case when $5::jsonb is null then null else now() end
                from lead where m.id in (select id from held)
                returning m.id, m.status
            ), ev as (
                insert into job_events (job_id, phase, message)
                select id, status, case when status = 'failed'
                    then 'failed alone, out of the batch of job ' || $1::text || ': '
                         || (($5::jsonb)->>'message')
                    else 'left the batch of job ' || $1::text
                         || ', which fails for its own sample; back in the queue' end
                from gone
            ), n as (select pg_notify('{CHANNEL}', '') from gone where status = 'queued')
            select (select count(*) from gone) as n, (select count(*) from n) as notified"
        );
        let error = error.map(serde_json::to_value).transpose()?;
        let row = sqlx::query(&sql)
            .bind(lease.job_id)
            .bind(lease.token)
            .bind(&lease.worker_id)
            .bind(member)
            .bind(error)
            .fetch_one(&self.pool)
            .await?;
        Ok(row.try_get::<i64, _>("n")? == 1)
    }

    async fn publish(&self, lease: &Lease, v: &NewVersion) -> Result<bool> {
        let sql = format!(
            "with {HOLD_MEMBERS}, lead as (
                update jobs j set published_version = $4
                where {FENCE} and {MEMBERS_HELD} and j.published_version is null
                  -- A LoRA being deleted takes no new version: its files would outlive it.
                  and exists (select 1 from loras l where l.lora_id = j.lora_id
                              and l.current_version = $4 - 1 and l.deleted_at is null)
                returning j.id, j.lora_id
            ), members as (
                update jobs m set published_version = $4 from lead
                where m.trained_by = lead.id and m.status = 'coalesced'
            ), ver as (
                insert into lora_versions (lora_id, version, storage_uri, sha256, job_id, metrics)
                select lora_id, $4, $5, $6, id, $7 from lead
            ), lo as (
                update loras l set current_version = $4, updated_at = now()
                from lead where l.lora_id = lead.lora_id
            ), ev as (
                insert into job_events (job_id, phase, message)
                select id, 'publish', 'published version ' || $4 from lead
            )
            select count(*) as n from lead"
        );
        let mut conn = self.hot.get(&self.pool).await?;
        let row = sqlx::query(&sql)
            .bind(lease.job_id)
            .bind(lease.token)
            .bind(&lease.worker_id)
            .bind(v.version)
            .bind(&v.storage_uri)
            .bind(&v.sha256)
            .bind(&v.metrics)
            .fetch_one(&mut *conn)
            .await?;
        conn.keep();
        Ok(row.try_get::<i64, _>("n")? == 1)
    }

    async fn complete(
        &self,
        lease: &Lease,
        result: &serde_json::Value,
        finished: Option<(Phase, u64)>,
    ) -> Result<bool> {
        // No NOTIFY here: a notifying commit takes a database-wide lock until it is flushed,
        // which serialised every completion (complete p50 13 ms at 16 workers). The worker
        // that completes claims again at once, and idle workers poll. The commit does not
        // wait for its flush unless this is the job's last attempt: see
        // `commit_without_flush`.
        let (prev, took) = timing(finished);
        let sql = format!(
            "with fence as (
                -- The members before the lead (see `HOLD_MEMBERS`), and locking the lead
                -- first is one row lock where holding the members is one per member.
                select id, attempt >= max_attempts as last_attempt from jobs where {FENCE} for update
            ), members as (
                -- `MEMBERS_FOLLOW_LEAD` for a lead that succeeded, without its cases: this
                -- runs once per batch on the hot path. Members are found by `$1`, not by a
                -- join with `fence`, whose generic plan made on an empty table scanned
                -- every member of every batch.
                update jobs m set status = 'succeeded', phase = 'done', worker_id = null,
                    result = $4, error = null, finished_at = now()
                where m.trained_by = $1 and m.status = 'coalesced' and (select count(*) from fence) = 1
                returning m.id
            ), lead as (
                update jobs set status = 'succeeded', phase = 'done', result = $4, error = null,
                    finished_at = now(), lease_expires_at = null, lease_token = null, timings_ms = {timings}
                where id = (select id from fence) and (select count(*) from members) >= 0
                returning id
            ), ev as (
                insert into job_events (job_id, phase, message)
                select id, 'done', 'succeeded' from lead
            ), {no_flush}
            select (select count(*) from lead) as n from no_flush",
            timings = add_timing(5, 6),
            no_flush = commit_without_flush("(select last_attempt from fence)")
        );
        let mut conn = self.hot.get(&self.pool).await?;
        let row = sqlx::query(&sql)
            .bind(lease.job_id)
            .bind(lease.token)
            .bind(&lease.worker_id)
            .bind(result)
            .bind(prev)
            .bind(took)
            .fetch_one(&mut *conn)
            .await?;
        conn.keep();
        Ok(row.try_get::<i64, _>("n")? == 1)
    }

    async fn fail(
        &self,
        lease: &Lease,
        error: &JobError,
        retryable: bool,
        retry: RetryPolicy,
    ) -> Result<FailOutcome> {
        let delay = crate::queue::backoff(lease.attempt, retry.base, retry.max);
        let next = next_status("$4 and j.attempt < j.max_attempts");
        let sql = format!(
            "with {HOLD_MEMBERS}, lead as (
                update jobs j set {set}
                where {FENCE} and {MEMBERS_HELD} returning j.id, j.status, j.result, j.error
            ), members as ({MEMBERS_FOLLOW_LEAD}
            ), ev as (
                insert into job_events (job_id, phase, message)
                select id, status, ($5::jsonb)->>'message' from lead
                {DETACHED_MEMBER_EVENTS}
            ), n as (select pg_notify('{CHANNEL}', '') from lead)
            select (select status from lead) as status, (select count(*) from n) as notified",
            set = settle_lead(&next, "$5::jsonb", "$6::float8"),
        );
        let mut conn = self.hot.get(&self.pool).await?;
        let row = sqlx::query(&sql)
            .bind(lease.job_id)
            .bind(lease.token)
            .bind(&lease.worker_id)
            .bind(retryable)
            .bind(serde_json::to_value(error)?)
            .bind(ms(delay))
            .fetch_one(&mut *conn)
            .await?;
        conn.keep();
        let status: Option<String> = row.try_get("status")?;
        Ok(match status.as_deref() {
            Some("queued") => FailOutcome::Retrying,
            Some("cancelled") => FailOutcome::Cancelled,
            Some(_) => FailOutcome::Failed,
            None => FailOutcome::LeaseLost,
        })
    }

    async fn finish_cancelled(&self, lease: &Lease, message: &str) -> Result<bool> {
        let sql = format!(
            "with {HOLD_MEMBERS}, lead as (
                update jobs set status = 'cancelled', finished_at = now(), lease_expires_at = null, lease_token = null,
                    error = jsonb_build_object('code', 'cancelled', 'message', $4::text)
                where {FENCE} and {MEMBERS_HELD} returning id, status, result, error
            ), members as ({MEMBERS_FOLLOW_LEAD}
            ), ev as (
                insert into job_events (job_id, phase, message) select id, 'cancelled', $4 from lead
                {DETACHED_MEMBER_EVENTS}
            ), n as (select pg_notify('{CHANNEL}', '') from lead)
            select (select count(*) from lead) as n, (select count(*) from n) as notified"
        );
        let mut conn = self.hot.get(&self.pool).await?;
        let row = sqlx::query(&sql)
            .bind(lease.job_id)
            .bind(lease.token)
            .bind(&lease.worker_id)
            .bind(message)
            .fetch_one(&mut *conn)
            .await?;
        conn.keep();
        Ok(row.try_get::<i64, _>("n")? == 1)
    }

    async fn release(&self, lease: &Lease) -> Result<bool> {
        // max_attempts grows with the attempt so a hand-back costs nothing, while `attempt`
        // keeps rising and still fences this worker out.
        let sql = format!(
            "with {HOLD_MEMBERS}, lead as (
                update jobs j set {set}, max_attempts = j.max_attempts + 1
                where {FENCE} and {MEMBERS_HELD} returning j.id, j.status, j.result, j.error
            ), members as ({MEMBERS_FOLLOW_LEAD}
            ), ev as (
                insert into job_events (job_id, phase, message)
                select id, status, 'handed back by ' || $3 || ' on shutdown' from lead
                {DETACHED_MEMBER_EVENTS}
            ), n as (select pg_notify('{CHANNEL}', '') from lead)
            select (select count(*) from lead) as n, (select count(*) from n) as notified",
            set = settle_lead(&next_status("true"), "null::jsonb", "0"),
        );
        let mut conn = self.hot.get(&self.pool).await?;
        let row = sqlx::query(&sql)
            .bind(lease.job_id)
            .bind(lease.token)
            .bind(&lease.worker_id)
            .fetch_one(&mut *conn)
            .await?;
        conn.keep();
        Ok(row.try_get::<i64, _>("n")? == 1)
    }

    async fn reap_expired(&self, retry: RetryPolicy) -> Result<Reaped> {
        let sql = format!(
            "with expired as (
                select id from jobs where status = 'running' and lease_expires_at <= now()
                order by lease_expires_at limit 100 for update skip locked
            ), held as (
                -- As `HOLD_MEMBERS`, for every expired lead.
                select m.id from jobs m join expired e on m.trained_by = e.id
                where m.status = 'coalesced' for update of m
            ), lead as (
                update jobs j set {set}
                from expired where j.id = expired.id and {MEMBERS_HELD}
                returning j.id, j.status, j.result, j.error
            ), members as ({MEMBERS_FOLLOW_LEAD}
            ), ev as (
                insert into job_events (job_id, phase, message)
                select id, status, error->>'message' from lead
                {DETACHED_MEMBER_EVENTS}
            ), n as (select pg_notify('{CHANNEL}', '') from lead limit 1)
            select (select count(*) from lead where status = 'queued') as requeued,
                   (select count(*) from lead where status = 'failed') as failed,
                   (select count(*) from lead where status = 'cancelled') as settled,
                   (select count(*) from n) as notified",
            set = settle_lead(
                &next_status("j.attempt < j.max_attempts"),
                "jsonb_build_object('code', 'lease_expired', 'message',
                    'worker ' || coalesce(j.worker_id, '?') || ' stopped renewing its lease on attempt '
                    || j.attempt || ' of ' || j.max_attempts)",
                "(least($2::float8, $1::float8 * power(2, greatest(j.attempt - 1, 0))) * (0.5 + random() / 2))",
            ),
        );
        let mut conn = self.hot.get(&self.pool).await?;
        let row = sqlx::query(&sql)
            .bind(ms(retry.base))
            .bind(ms(retry.max))
            .fetch_one(&mut *conn)
            .await?;
        conn.keep();
        Ok(Reaped {
            requeued: row.try_get::<i64, _>("requeued")?.unsigned_abs(),
            failed: row.try_get::<i64, _>("failed")?.unsigned_abs(),
            settled: row.try_get::<i64, _>("settled")?.unsigned_abs(),
        })
    }
}

#[cfg(test)]
mod tests {
    use sqlx::Connection;

    use super::*;

    /// A claim's generic plan is made on its connection's first claim, often while `jobs` is
    /// still empty (a fresh deployment), and kept until something invalidates it. Made then,
    /// it must still find rows by TID: no sequential scan of `jobs`, no scan of a partial
    /// index standing in for a primary-key lookup.
    #[tokio::test]
    async fn claim_plans_made_on_an_empty_table_find_rows_by_tid() {
        let url = std::env::var("DATABASE_URL")
            .unwrap_or_else(|_| "postgres://postgres@localhost/test".into());
        let schema = format!("t_{}", Uuid::new_v4().simple());
        let mut admin = sqlx::PgConnection::connect(&url).await.expect("connect");
        sqlx::query(&format!("create schema {schema}"))
            .execute(&mut admin)
            .await
            .expect("schema");
        let store = PgStore::connect(&url, Some(&schema), 1)
            .await
            .expect("store");
        store.migrate().await.expect("migrate");
        let mut conn = store.pool().acquire().await.expect("connection");
        for (name, sql) in [
            ("in_order", &*CLAIM_IN_ORDER),
            ("past_busy", &*CLAIM_PAST_BUSY_LORAS),
        ] {
            sqlx::query(&format!(
                "prepare {name}(text[], text, float8, int, uuid) as {sql}"
            ))
            .execute(&mut *conn)
            .await
            .expect("prepare");
            let plan: Vec<String> = sqlx::query_scalar(&format!(
                "explain (costs off) execute {name}('{{m}}', 'w', 1000, 8, gen_random_uuid())"
            ))
            .fetch_all(&mut *conn)
            .await
            .expect("explain");
            let plan = plan.join("\n");
            assert!(!plan.contains("Seq Scan"), "{name}:\n{plan}");
            assert!(!plan.contains("jobs_queued_age"), "{name}:\n{plan}");
            assert_eq!(
                plan.matches("Tid Scan on jobs").count(),
                2,
                "{name}: the lead's lock and the batch's update\n{plan}"
            );
        }
        drop(conn);
        drop(store);
        sqlx::query(&format!("drop schema {schema} cascade"))
            .execute(&mut admin)
            .await
            .expect("drop schema");
    }
}
