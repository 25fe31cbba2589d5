//! The SQLite store: maintenance and operator actions.

use super::*;
use crate::queue::prelude::*;

#[async_trait]
impl OpsStore for SqliteStore {
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

    async fn retry_job(&self, id: Uuid, message: &str) -> Result<Job> {
        let now = now_ms();
        let mut tx = self.pool.begin().await?;
        let left_batch: Option<String> =
            sqlx::query_scalar("select trained_by from jobs where id = ? and status = 'failed'")
                .bind(id.to_string())
                .fetch_optional(&mut *tx)
                .await?
                .flatten();
        // A retried member leaves its failed batch (as on Postgres).
        let sql = format!(
            "update jobs set status = 'queued', phase = 'queued', attempt = 0, run_at = ?2,
                worker_id = null, lease_expires_at = null, lease_token = null, cancel_requested = 0,
                finished_at = null, error = null, trained_by = null, batch_event = null
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
        if let Some(lead) = left_batch {
            let note = format!("had failed in the batch of job {lead}");
            event(&mut tx, &id.to_string(), now, "failed", &note).await?;
        }
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
}
