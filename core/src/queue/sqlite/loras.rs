//! The SQLite store: LoRAs, their versions and adapter requests.

use super::*;
use crate::queue::prelude::*;

#[async_trait]
impl LoraStore for SqliteStore {
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
            return Err(crate::queue::reinit_refusal(
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

    async fn purge_lora(
        &self,
        lora_id: &str,
        deleted_at: chrono::DateTime<Utc>,
    ) -> Result<Option<Vec<String>>> {
        let mut tx = self.pool.begin().await?;
        let still: Option<i64> =
            sqlx::query_scalar("select 1 from loras where lora_id = ? and deleted_at = ?")
                .bind(lora_id)
                .bind(deleted_at.timestamp_millis())
                .fetch_optional(&mut *tx)
                .await?;
        if still.is_none() {
            return Ok(None);
        }
        let uris: Vec<String> =
            sqlx::query_scalar("delete from lora_versions where lora_id = ? returning storage_uri")
                .bind(lora_id)
                .fetch_all(&mut *tx)
                .await?;
        tx.commit().await?;
        Ok(Some(uris))
    }

    async fn get_lora(&self, lora_id: &str) -> Result<Option<Lora>> {
        let row = sqlx::query("select * from loras where lora_id = ? and deleted_at is null")
            .bind(lora_id)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(lora_from_row).transpose()
    }

    async fn lora_by_adapter_name(&self, name: &str) -> Result<Option<Lora>> {
        // The same expression as the index `loras_adapter_name`.
        let row = sqlx::query(
            "select * from loras where replace(lora_id, '/', '-') = ? and deleted_at is null
             order by lora_id limit 1",
        )
        .bind(name)
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
