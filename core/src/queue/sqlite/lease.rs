//! The SQLite store: the fenced worker path (claim to finish).

use super::*;
use crate::queue::prelude::*;
use crate::queue::CLAIM_WINDOW;

#[async_trait]
impl LeaseStore for SqliteStore {
    // Long: one transaction whose statements must run in this order.
    async fn claim(&self, req: &ClaimRequest) -> Result<Option<Claimed>> {
        let now = now_ms();
        let token = Uuid::new_v4();
        let mut tx = self.pool.begin().await?;
        let sql = format!(
            "update jobs set status = 'running', phase = 'claimed', attempt = attempt + 1,
                worker_id = ?2, lease_expires_at = ?3 + ?4, started_at = coalesce(started_at, ?3),
                lease_token = ?5
             where id = coalesce(
                -- The first {CLAIM_WINDOW} queued jobs in claim order, as on Postgres.
                (select j.id from (
                    select id, lora_id, base_model, priority, run_at from jobs
                    where status = 'queued' order by priority desc, run_at, id limit {CLAIM_WINDOW}
                 ) j
                 where j.run_at <= ?3 and j.base_model in (select value from json_each(?1))
                   and not exists (select 1 from jobs r where r.lora_id = j.lora_id and r.status = 'running')
                 order by j.priority desc, j.run_at, j.id limit 1),
                -- Only when busy LoRAs hold all of them: each idle LoRA's best first job,
                -- through a skip scan over `jobs_queued_by_lora`.
                (with recursive queued_loras(lora_id) as (
                    select (select lora_id from jobs where status = 'queued' order by lora_id limit 1)
                    union all
                    select (select q.lora_id from jobs q
                            where q.status = 'queued' and q.lora_id > l.lora_id
                            order by q.lora_id limit 1)
                    from queued_loras l where l.lora_id is not null
                 )
                 select h.id from queued_loras l join jobs h on h.id = (
                    select x.id from jobs x
                    where x.lora_id = l.lora_id and x.status = 'queued' and x.run_at <= ?3
                      and x.base_model in (select value from json_each(?1))
                    order by x.priority desc, x.run_at, x.id limit 1)
                 where l.lora_id is not null
                   and not exists (select 1 from jobs r where r.lora_id = l.lora_id and r.status = 'running')
                 order by h.priority desc, h.run_at, h.id limit 1))
             returning {JOB_COLUMNS}, payload, coalesce_key"
        );
        let row = sqlx::query(&sql)
            .bind(serde_json::to_string(&req.base_models)?)
            .bind(&req.worker_id)
            .bind(now)
            .bind(ms(req.lease))
            .bind(token.to_string())
            .fetch_optional(&mut *tx)
            .await?;
        let Some(row) = row else {
            return Ok(None);
        };
        let lead = job_from_row(&row)?;
        let payload: JobPayload = required(json_col(&row, "payload")?, "payload")?;
        let coalesce_key: String = row.try_get("coalesce_key")?;
        let lead_id = lead.id.to_string();
        // The batch: queued jobs of this LoRA with the same coalesce key, in claim order,
        // while their samples fit.
        let joining: Vec<String> = if lead.published_version.is_none() {
            sqlx::query_scalar(
                "select id from (
                    select id, sum(sample_count) over (order by priority desc, run_at, id) as total
                    from jobs
                    where status = 'queued' and lora_id = ?1 and coalesce_key = ?2 and run_at <= ?3
                      and published_version is null and not cancel_requested
                    order by priority desc, run_at, id limit ?4)
                 where total + ?5 <= ?4",
            )
            .bind(&lead.lora_id)
            .bind(&coalesce_key)
            .bind(now)
            .bind(req.max_batch_samples)
            .bind(lead.sample_count)
            .fetch_all(&mut *tx)
            .await?
        } else {
            Vec::new()
        };
        let mut message = format!("claimed by {} (attempt {})", req.worker_id, lead.attempt);
        if !joining.is_empty() {
            message.push_str(&format!(" with {} coalesced job(s)", joining.len()));
        }
        let batch_event = event(&mut tx, &lead_id, now, "claimed", &message).await?;
        let mut members = Vec::new();
        if !joining.is_empty() {
            // No event per member: a member's timeline reads its lead's from `batch_event` on.
            let sql = format!(
                "update jobs set status = 'coalesced', phase = 'queued', trained_by = ?1,
                    batch_event = ?2, started_at = coalesce(started_at, ?3)
                 where id in (select value from json_each(?4))
                 returning {JOB_COLUMNS}, payload"
            );
            let rows = sqlx::query(&sql)
                .bind(&lead_id)
                .bind(batch_event)
                .bind(now)
                .bind(serde_json::to_string(&joining)?)
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
        tx.commit().await?;
        Ok(Some(Claimed {
            job: lead,
            payload,
            members,
            token,
        }))
    }

    async fn heartbeat(&self, lease: &Lease, extend: Duration) -> Result<LeaseState> {
        let sql = format!(
            "update jobs set lease_expires_at = ?4 + ?5 where {FENCE} returning cancel_requested"
        );
        let row = sqlx::query(&sql)
            .bind(lease.job_id.to_string())
            .bind(lease.token.to_string())
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
        let ids = rows
            .iter()
            .map(|r| required(uuid_col(r, "id")?, "id"))
            .collect::<Result<Vec<_>>>()?;
        tx.commit().await?;
        Ok(Some(ids))
    }

    async fn leave_batch(
        &self,
        lease: &Lease,
        member: Uuid,
        error: Option<&JobError>,
    ) -> Result<bool> {
        // The fence first: a write to the lead that changes nothing, in the same transaction.
        let Some((mut tx, now)) = self.fenced_update(lease, "phase = phase", &[]).await? else {
            return Ok(false);
        };
        let lead = lease.job_id.to_string();
        let reason = error.map(|e| e.message.clone());
        let error = error.map(serde_json::to_string).transpose()?;
        let status: Option<String> = sqlx::query_scalar(
            "update jobs set
                status = case when ?3 is null then 'queued' else 'failed' end,
                phase = case when ?3 is null then 'queued' else phase end,
                trained_by = null, batch_event = null, worker_id = null, error = ?3,
                finished_at = case when ?3 is null then null else ?4 end
             where id = ?1 and trained_by = ?2 and status = 'coalesced'
               and published_version is null
             returning status",
        )
        .bind(member.to_string())
        .bind(&lead)
        .bind(&error)
        .bind(now)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(status) = status else {
            return Ok(false);
        };
        let message = match reason {
            Some(why) => format!("failed alone, out of the batch of job {lead}: {why}"),
            None => format!(
                "left the batch of job {lead}, which fails for its own sample; back in the queue"
            ),
        };
        event(&mut tx, &member.to_string(), now, &status, &message).await?;
        tx.commit().await?;
        if status == "queued" {
            bump(&self.wake_tx);
        }
        Ok(true)
    }

    async fn publish(&self, lease: &Lease, v: &NewVersion) -> Result<bool> {
        let set = "published_version = cast(?5 as integer)";
        let cond = "published_version is null and exists (select 1 from loras l \
            where l.lora_id = jobs.lora_id and l.current_version = cast(?5 as integer) - 1 \
            and l.deleted_at is null)";
        let now = now_ms();
        let mut tx = self.pool.begin().await?;
        let sql = format!("update jobs set {set} where {FENCE} and {cond} returning lora_id");
        let row = sqlx::query(&sql)
            .bind(lease.job_id.to_string())
            .bind(lease.token.to_string())
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
             lease_expires_at = null, lease_token = null, {ADD_TIMING}"
        );
        let binds = [name, took, Some(result.to_string())];
        let Some((mut tx, now)) = self.fenced_update(lease, &set, &binds).await? else {
            return Ok(false);
        };
        let lead = lease.job_id.to_string();
        members_follow_lead(&mut tx, &lead, JobStatus::Succeeded, now).await?;
        event(&mut tx, &lead, now, "done", "succeeded").await?;
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
        let next = crate::queue::next_status(lead.published, lead.cancel_requested, retry_now);
        let run_at = now + ms(crate::queue::backoff(lease.attempt, retry.base, retry.max));
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
        let set =
            "status = 'cancelled', finished_at = ?4, lease_expires_at = null, lease_token = null, \
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
        let next = crate::queue::next_status(lead.published, lead.cancel_requested, true);
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
            let next = crate::queue::next_status(
                lead.published,
                lead.cancel_requested,
                lead.attempt < lead.max_attempts,
            );
            let run_at = now + ms(crate::queue::backoff(lead.attempt, retry.base, retry.max));
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
}
