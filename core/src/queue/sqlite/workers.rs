//! The SQLite store: the worker registry.

use super::*;
use crate::queue::prelude::*;

#[async_trait]
impl WorkerStore for SqliteStore {
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
}
