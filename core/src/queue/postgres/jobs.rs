//! The Postgres store: intake and reads.

use super::*;
use crate::queue::prelude::*;
use crate::queue::{parse_status_counts, MEMBER_AWARE_EVENTS};

#[async_trait]
impl JobStore for PgStore {
    async fn queued_jobs_of(&self, caller: &str) -> Result<i64> {
        Ok(
            sqlx::query_scalar("select count(*) from jobs where status = 'queued' and caller = $1")
                .bind(caller)
                .fetch_one(&self.pool)
                .await?,
        )
    }

    async fn metrics_snapshot(&self, window: Duration) -> Result<crate::queue::MetricsSnapshot> {
        // One count per status, each matching a partial index's predicate exactly (there is
        // no index of every live row: it cost each job two more index entries).
        let live = parse_status_counts(
            sqlx::query_as(
                "select 'queued' as status, count(*) as n from jobs where status = 'queued'
                 union all select 'running', count(*) from jobs where status = 'running'
                 union all select 'coalesced', count(*) from jobs where status = 'coalesced'",
            )
            .fetch_all(&self.pool)
            .await?
            .into_iter()
            .filter(|(_, n): &(String, i64)| *n > 0)
            .collect(),
        )?;
        let oldest_queued_s: Option<f64> = sqlx::query_scalar(
            "select extract(epoch from now() - min(created_at))::float8 from jobs
             where status = 'queued'",
        )
        .fetch_one(&self.pool)
        .await?;
        // The cutoff is written into the statement (it is our own timestamp, not input):
        // as a bound parameter, a cached generic plan cannot see that it selects only the
        // last hour and scans every finished job instead of the finished_at index.
        let cutoff = (Utc::now() - chrono::Duration::milliseconds(ms(window) as i64))
            .to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
        let finished = parse_status_counts(
            sqlx::query_as(&format!(
                "select status, count(*) as n from jobs
                 where finished_at > '{cutoff}'::timestamptz group by status"
            ))
            .persistent(false)
            .fetch_all(&self.pool)
            .await?,
        )?;
        let timings: Vec<serde_json::Value> = sqlx::query_scalar(&format!(
            "select timings_ms from jobs
             where finished_at > '{cutoff}'::timestamptz and status = 'succeeded'
             limit 10000"
        ))
        .persistent(false)
        .fetch_all(&self.pool)
        .await?;
        let last_loss = sqlx::query(
            "select l.lora_id, (v.metrics->>'total_loss')::float8 as loss
             from loras l join lora_versions v
               on v.lora_id = l.lora_id and v.version = l.current_version
             where l.deleted_at is null and v.metrics ? 'total_loss'
             order by l.updated_at desc limit 1000",
        )
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(|r| Ok((r.try_get("lora_id")?, r.try_get("loss")?)))
        .collect::<Result<Vec<(String, f64)>>>()?;
        Ok(crate::queue::MetricsSnapshot {
            live,
            oldest_queued_s,
            finished,
            phase_ms: timings
                .into_iter()
                .filter_map(|t| serde_json::from_value(t).ok())
                .collect(),
            last_loss,
        })
    }

    async fn enqueue(&self, job: &NewJob) -> Result<Enqueued> {
        let sql = format!(
            "with lora as (
                select base_model from loras where lora_id = $2 and deleted_at is null
            ), ins as (
                insert into jobs (id, lora_id, base_model, caller, payload, sample_count,
                    coalesce_key, orchestration, priority, max_attempts, idempotency_key,
                    request_hash, trace_context)
                select $1, $2, lora.base_model, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12 from lora
                on conflict (caller, idempotency_key) where idempotency_key is not null do nothing
                returning {JOB_COLUMNS}
            ), ev as (
                insert into job_events (job_id, phase, message)
                select id, 'queued', 'enqueued with ' || sample_count || ' sample(s)' from ins
            )
            select * from ins"
        );
        let row = sqlx::query(&sql)
            .bind(job.id)
            .bind(&job.lora_id)
            .bind(&job.caller)
            .bind(serde_json::to_value(&job.payload)?)
            .bind(i32::try_from(job.payload.samples.len()).unwrap_or(i32::MAX))
            .bind(job.coalesce_key())
            .bind(serde_json::to_value(&job.orchestration)?)
            .bind(job.priority)
            .bind(job.max_attempts)
            .bind(&job.idempotency_key)
            .bind(&job.request_hash)
            .bind(&job.trace_context)
            .fetch_optional(&self.pool)
            .await?;
        if let Some(row) = row {
            self.enqueued.notify_one();
            return Ok(Enqueued {
                job: job_from_row(&row)?,
                created: true,
            });
        }
        if let Some(key) = &job.idempotency_key {
            let sql = format!(
                "select {JOB_COLUMNS}, request_hash from jobs where caller = $1 and idempotency_key = $2"
            );
            if let Some(row) = sqlx::query(&sql)
                .bind(&job.caller)
                .bind(key)
                .fetch_optional(&self.pool)
                .await?
            {
                let hash: Option<String> = row.try_get("request_hash")?;
                if hash != job.request_hash {
                    return Err(Error::IdempotencyKeyReused(format!(
                        "Idempotency-Key '{key}' was already used with a different request body"
                    )));
                }
                return Ok(Enqueued {
                    job: job_from_row(&row)?,
                    created: false,
                });
            }
        }
        Err(Error::NotFound(format!("LoRA not found: {}", job.lora_id)))
    }

    async fn get_job(&self, id: Uuid) -> Result<Option<Job>> {
        let sql = format!("select {JOB_COLUMNS} from jobs where id = $1");
        let row = sqlx::query(&sql)
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(job_from_row).transpose()
    }

    async fn unfinished_jobs(&self, ids: &[Uuid]) -> Result<Vec<Uuid>> {
        Ok(sqlx::query_scalar(
            "select id from jobs where id = any($1) and status in ('queued', 'coalesced', 'running')",
        )
        .bind(ids)
        .fetch_all(&self.pool)
        .await?)
    }

    async fn list_jobs(&self, filter: &JobFilter) -> Result<Vec<Job>> {
        // Only the filters given become conditions, so each combination gets a plan that
        // uses its index (a generic `$1 is null or …` plan cannot).
        let mut q = sqlx::QueryBuilder::<sqlx::Postgres>::new(format!(
            "select {JOB_COLUMNS} from jobs where true"
        ));
        if let Some(lora) = &filter.lora_id {
            q.push(" and lora_id = ").push_bind(lora);
        }
        if let Some(status) = filter.status {
            q.push(" and status = ").push_bind(status.as_str());
        }
        if let Some(worker) = &filter.worker_id {
            q.push(" and worker_id = ").push_bind(worker);
        }
        if let Some(before) = filter.before {
            q.push(" and id < ").push_bind(before);
        }
        if let Some(after) = filter.after {
            q.push(" and id >= ").push_bind(after);
        }
        if let Some(prefixes) = &filter.lora_prefixes {
            // `types::prefix_covers` in SQL: whole path segments, unless the prefix ends in
            // `/` or `-`; filtering here (not after the limit) keeps pages full.
            q.push(" and exists (select 1 from unnest(")
                .push_bind(prefixes)
                .push(
                    "::text[]) p where p <> '' and (lora_id = p \
                     or starts_with(lora_id, p || '/') \
                     or (right(p, 1) in ('/', '-') and starts_with(lora_id, p))))",
                );
        }
        q.push(" order by id desc limit ").push_bind(filter.limit);
        let rows = q.build().fetch_all(&self.pool).await?;
        rows.iter().map(job_from_row).collect()
    }

    async fn job_events(&self, id: Uuid) -> Result<Vec<JobEvent>> {
        let rows = sqlx::query(MEMBER_AWARE_EVENTS)
            .bind(id)
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| {
                Ok(JobEvent {
                    at: r.try_get("at")?,
                    phase: r.try_get("phase")?,
                    message: r.try_get("message")?,
                })
            })
            .collect()
    }

    async fn cancel(&self, id: Uuid) -> Result<CancelOutcome> {
        // A member whose phase is still `queued` has not started training (begin_training
        // moves members to `distill` under a row lock, so this check cannot race it).
        let sql = format!(
            "with c as (
                update jobs j set
                    status = case when j.status = 'running' then 'running' else 'cancelled' end,
                    cancel_requested = true,
                    trained_by = case when j.status = 'coalesced' then null else j.trained_by end,
                    batch_event = case when j.status = 'coalesced' then null else j.batch_event end,
                    worker_id = case when j.status = 'running' then j.worker_id else null end,
                    finished_at = case when j.status = 'running' then null else now() end,
                    error = case when j.status = 'running' then j.error
                            else jsonb_build_object('code', 'cancelled', 'message', 'cancelled by request') end
                where id = $1 and published_version is null
                  and (status in ('queued', 'running') or (status = 'coalesced' and phase = 'queued'))
                returning {JOB_COLUMNS}
            ), ev as (
                insert into job_events (job_id, phase, message)
                select id, phase, case when status = 'running' then 'cancel requested'
                                  else 'cancelled' end from c
            )
            select * from c"
        );
        if let Some(row) = sqlx::query(&sql)
            .bind(id)
            .fetch_optional(&self.pool)
            .await?
        {
            let job = job_from_row(&row)?;
            return Ok(if job.status == JobStatus::Running {
                CancelOutcome::Requested(job)
            } else {
                CancelOutcome::Cancelled(job)
            });
        }
        match self.get_job(id).await? {
            None => Err(Error::NotFound(format!("job not found: {id}"))),
            Some(job) => Err(cancel_refusal(&job)),
        }
    }

    async fn status_counts(&self) -> Result<Vec<(JobStatus, i64)>> {
        parse_status_counts(
            sqlx::query_as("select status, count(*) as n from jobs group by status")
                .fetch_all(&self.pool)
                .await?,
        )
    }

    async fn job_payload(&self, id: Uuid) -> Result<Option<JobPayload>> {
        let payload: Option<serde_json::Value> =
            sqlx::query_scalar("select payload from jobs where id = $1")
                .bind(id)
                .fetch_optional(&self.pool)
                .await?;
        Ok(payload.map(serde_json::from_value).transpose()?)
    }
}
