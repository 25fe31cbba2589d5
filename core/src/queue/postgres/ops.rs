//! The Postgres store: maintenance and operator actions.

use super::*;
use crate::queue::prelude::*;

#[async_trait]
impl OpsStore for PgStore {
    async fn prune(&self, older_than: Duration, batch: i64) -> Result<u64> {
        let mut tx = begin_read_committed(&self.pool).await?;
        let ids: Vec<Uuid> = sqlx::query_scalar(
            "delete from jobs where id in (
                select id from jobs
                where finished_at < now() - $1 * interval '1 millisecond'
                order by finished_at limit $2 for update skip locked)
             returning id",
        )
        .bind(ms(older_than))
        .bind(batch)
        .fetch_all(&mut *tx)
        .await?;
        delete_events(&mut tx, &ids).await?;
        tx.commit().await?;
        Ok(ids.len() as u64)
    }

    async fn retry_job(&self, id: Uuid, message: &str) -> Result<Job> {
        let sql = "with old as (
                select id, trained_by from jobs where id = $1
            ), r as (
                -- A retried member leaves its failed batch: it trains again on its own or in
                -- a new batch, and its timeline stops following the old lead.
                update jobs j set status = 'queued', phase = 'queued', attempt = 0,
                    run_at = now(), worker_id = null, lease_expires_at = null, lease_token = null,
                    cancel_requested = false, finished_at = null, error = null,
                    trained_by = null, batch_event = null
                from old
                where j.id = old.id and j.status = 'failed' and j.published_version is null
                  and exists (select 1 from loras l where l.lora_id = j.lora_id and l.deleted_at is null)
                returning j.*, old.trained_by as left_batch
            ), ev as (
                insert into job_events (job_id, phase, message)
                select id, 'failed', 'had failed in the batch of job ' || left_batch
                from r where left_batch is not null
                union all
                select id, 'queued', $2 from r
            )
            select * from r";
        match sqlx::query(sql)
            .bind(id)
            .bind(message)
            .fetch_optional(&self.pool)
            .await?
        {
            Some(row) => {
                // Wake idle workers now rather than at their next poll.
                self.enqueued.notify_one();
                job_from_row(&row)
            }
            None => Err(retry_refusal(self.get_job(id).await?, id)),
        }
    }

    async fn delete_job(&self, id: Uuid) -> Result<Job> {
        let sql = format!(
            "with d as (
                delete from jobs where id = $1 and status in ('succeeded', 'failed', 'cancelled')
                returning {JOB_COLUMNS}
            ), members as (
                -- What the foreign key's `on delete set null` did (migration 0009).
                update jobs m set trained_by = null, batch_event = null
                from d where m.lora_id = d.lora_id and m.trained_by = d.id
            )
            select * from d"
        );
        let mut tx = begin_read_committed(&self.pool).await?;
        match sqlx::query(&sql).bind(id).fetch_optional(&mut *tx).await? {
            Some(row) => {
                let job = job_from_row(&row)?;
                delete_events(&mut tx, &[id]).await?;
                tx.commit().await?;
                Ok(job)
            }
            None => {
                drop(tx);
                Err(delete_refusal(self.get_job(id).await?, id))
            }
        }
    }

    async fn add_job_event(&self, id: Uuid, phase: &str, message: &str) -> Result<()> {
        sqlx::query(
            "insert into job_events (job_id, phase, message)
             select id, $2, $3 from jobs where id = $1 for key share",
        )
        .bind(id)
        .bind(phase)
        .bind(message)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn record_audit(&self, entry: &AuditEntry) -> Result<()> {
        sqlx::query(
            "insert into audit_log (actor, action, job_id, detail) values ($1, $2, $3, $4)",
        )
        .bind(&entry.actor)
        .bind(&entry.action)
        .bind(entry.job_id)
        .bind(&entry.detail)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn recent_audit(&self, limit: i64) -> Result<Vec<AuditEntry>> {
        let rows = sqlx::query(
            "select at, actor, action, job_id, detail from audit_log order by id desc limit $1",
        )
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(AuditEntry {
                    at: r.try_get("at")?,
                    actor: r.try_get("actor")?,
                    action: r.try_get("action")?,
                    job_id: r.try_get("job_id")?,
                    detail: r.try_get("detail")?,
                })
            })
            .collect()
    }
}

/// Deletes the events of jobs this transaction deleted, as the foreign key's `on delete
/// cascade` did before migration 0012. A statement of its own, after the jobs' delete: its
/// snapshot also holds an event committed while that delete waited for the job's row
/// (`add_job_event` locks it), which the delete's own snapshot would miss.
/// The transaction must be read committed (see [`begin_read_committed`]).
async fn delete_events(tx: &mut sqlx::PgConnection, ids: &[Uuid]) -> Result<()> {
    sqlx::query("delete from job_events where job_id = any($1)")
        .bind(ids)
        .execute(tx)
        .await?;
    Ok(())
}

/// A transaction in which each statement takes a snapshot of its own, whatever the
/// database's `default_transaction_isolation` says: [`delete_events`] relies on it.
async fn begin_read_committed(pool: &PgPool) -> Result<sqlx::Transaction<'static, sqlx::Postgres>> {
    let mut tx = pool.begin().await?;
    sqlx::query("set transaction isolation level read committed")
        .execute(&mut *tx)
        .await?;
    Ok(tx)
}
