//! The SQLite store: intake and reads.

use super::*;
use crate::queue::prelude::*;
use crate::queue::{parse_status_counts, MEMBER_AWARE_EVENTS};

#[async_trait]
impl JobStore for SqliteStore {
    async fn queued_jobs_of(&self, caller: &str) -> Result<i64> {
        Ok(
            sqlx::query_scalar("select count(*) from jobs where status = 'queued' and caller = ?")
                .bind(caller)
                .fetch_one(&self.pool)
                .await?,
        )
    }

    async fn metrics_snapshot(&self, window: Duration) -> Result<crate::queue::MetricsSnapshot> {
        let now = now_ms();
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
        let oldest: Option<i64> =
            sqlx::query_scalar("select min(created_at) from jobs where status = 'queued'")
                .fetch_one(&self.pool)
                .await?;
        let since = now - i64::try_from(window.as_millis()).unwrap_or(i64::MAX);
        let finished = parse_status_counts(
            sqlx::query_as(
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
        Ok(crate::queue::MetricsSnapshot {
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

    async fn unfinished_jobs(&self, ids: &[Uuid]) -> Result<Vec<Uuid>> {
        let mut open = Vec::new();
        // Within SQLite's limit on bound parameters.
        for chunk in ids.chunks(500) {
            let mut q = sqlx::QueryBuilder::<Sqlite>::new(
                "select id from jobs where status in ('queued', 'coalesced', 'running') and id in (",
            );
            let mut list = q.separated(", ");
            for id in chunk {
                list.push_bind(id.to_string());
            }
            q.push(")");
            let rows: Vec<String> = q.build_query_scalar().fetch_all(&self.pool).await?;
            for id in rows {
                open.push(Uuid::parse_str(&id).map_err(|_| Error::Corrupt(id))?);
            }
        }
        Ok(open)
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
            // `types::prefix_covers` in SQL: whole path segments, unless the prefix ends in
            // `/` or `-`; filtering here (not after the limit) keeps pages full.
            q.push(" and exists (select 1 from json_each(")
                .push_bind(serde_json::to_string(prefixes)?)
                .push(
                    ") p where p.value <> '' and (lora_id = p.value \
                     or substr(lora_id, 1, length(p.value) + 1) = p.value || '/' \
                     or (substr(p.value, -1) in ('/', '-') \
                         and substr(lora_id, 1, length(p.value)) = p.value)))",
                );
        }
        q.push(" order by id desc limit ").push_bind(filter.limit);
        let rows = q.build().fetch_all(&self.pool).await?;
        rows.iter().map(job_from_row).collect()
    }

    async fn job_events(&self, id: Uuid) -> Result<Vec<JobEvent>> {
        let rows = sqlx::query(MEMBER_AWARE_EVENTS)
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
                batch_event = case when status = 'coalesced' then null else batch_event end,
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

    async fn status_counts(&self) -> Result<Vec<(JobStatus, i64)>> {
        parse_status_counts(
            sqlx::query_as("select status, count(*) as n from jobs group by status")
                .fetch_all(&self.pool)
                .await?,
        )
    }

    async fn job_payload(&self, id: Uuid) -> Result<Option<JobPayload>> {
        let payload: Option<String> = sqlx::query_scalar("select payload from jobs where id = ?")
            .bind(id.to_string())
            .fetch_optional(&self.pool)
            .await?;
        Ok(payload.map(|p| serde_json::from_str(&p)).transpose()?)
    }
}
