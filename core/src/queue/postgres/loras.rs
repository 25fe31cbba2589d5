//! The Postgres store: LoRAs, their versions and adapter requests.

use super::*;
use crate::queue::prelude::*;

#[async_trait]
impl LoraStore for PgStore {
    async fn create_lora(&self, lora: &NewLora) -> Result<Lora> {
        let mut tx = self.pool.begin().await?;
        // A deleted LoRA's id can be used again once none of its jobs runs.
        sqlx::query(
            "delete from lora_versions v using loras l
             where v.lora_id = $1 and l.lora_id = $1 and l.deleted_at is not null
               and not exists (select 1 from jobs where lora_id = $1 and status = 'running')",
        )
        .bind(&lora.lora_id)
        .execute(&mut *tx)
        .await?;
        let row = sqlx::query(
            "with l as (
                insert into loras (lora_id, base_model, rank, alpha, target_modules)
                values ($1, $2, $3, $4, $5)
                on conflict (lora_id) do update set
                    base_model = excluded.base_model, rank = excluded.rank,
                    alpha = excluded.alpha, target_modules = excluded.target_modules,
                    current_version = 0, created_at = now(), updated_at = now(),
                    deleted_at = null
                where loras.deleted_at is not null
                  and not exists (select 1 from jobs where lora_id = $1 and status = 'running')
                returning *
            ), v as (
                insert into lora_versions (lora_id, version, storage_uri, sha256)
                select lora_id, 0, $6, $7 from l
            )
            select * from l",
        )
        .bind(&lora.lora_id)
        .bind(&lora.base_model)
        .bind(lora.rank)
        .bind(lora.alpha)
        .bind(serde_json::to_value(&lora.target_modules)?)
        .bind(&lora.initial_uri)
        .bind(&lora.initial_sha256)
        .fetch_optional(&mut *tx)
        .await?;
        match row {
            Some(row) => {
                let out = lora_from_row(&row)?;
                tx.commit().await?;
                Ok(out)
            }
            None => Err(Error::Conflict(format!(
                "LoRA already exists: {}",
                lora.lora_id
            ))),
        }
    }

    async fn reinit_lora(
        &self,
        lora: &NewLora,
        expected: i32,
        note: &serde_json::Value,
    ) -> Result<Lora> {
        let row = sqlx::query(
            "with l as (
                update loras set base_model = $2, rank = $3, alpha = $4, target_modules = $5,
                    current_version = current_version + 1, updated_at = now()
                where lora_id = $1 and deleted_at is null and current_version = $8
                returning *
            ), v as (
                insert into lora_versions (lora_id, version, storage_uri, sha256, metrics)
                select lora_id, current_version, $6, $7, $9 from l
            )
            select * from l",
        )
        .bind(&lora.lora_id)
        .bind(&lora.base_model)
        .bind(lora.rank)
        .bind(lora.alpha)
        .bind(serde_json::to_value(&lora.target_modules)?)
        .bind(&lora.initial_uri)
        .bind(&lora.initial_sha256)
        .bind(expected)
        .bind(note)
        .fetch_optional(&self.pool)
        .await?;
        match row {
            Some(row) => lora_from_row(&row),
            None => Err(crate::queue::reinit_refusal(
                self.get_lora(&lora.lora_id).await?,
                lora,
                expected,
            )),
        }
    }

    async fn pin_version(&self, lora_id: &str, version: i32, pinned: bool) -> Result<bool> {
        let done =
            sqlx::query("update lora_versions set pinned = $3 where lora_id = $1 and version = $2")
                .bind(lora_id)
                .bind(version)
                .bind(pinned)
                .execute(&self.pool)
                .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn prune_versions(&self, lora_id: &str, keep: i32) -> Result<Vec<String>> {
        // Files of versions older than the newest `keep`, except version 0, pinned ones,
        // and files a kept version still points at (a rollback shares its target's files).
        let uris: Vec<String> = sqlx::query_scalar(
            "with latest as (select max(version) as v from lora_versions where lora_id = $1),
             kept as (
                select storage_uri from lora_versions, latest
                where lora_id = $1 and (version > latest.v - $2 or version = 0 or pinned)
             ),
             gone as (
                update lora_versions set pruned_at = now()
                from latest
                where lora_id = $1 and version <= latest.v - $2 and version > 0 and not pinned
                  and pruned_at is null
                  and storage_uri not in (select storage_uri from kept)
                returning storage_uri
             )
             select distinct storage_uri from gone",
        )
        .bind(lora_id)
        .bind(keep)
        .fetch_all(&self.pool)
        .await?;
        Ok(uris)
    }

    async fn delete_lora(&self, lora_id: &str) -> Result<Option<DateTime<Utc>>> {
        let at: Option<DateTime<Utc>> = sqlx::query_scalar(
            "update loras set deleted_at = now(), updated_at = now()
             where lora_id = $1 and deleted_at is null returning deleted_at",
        )
        .bind(lora_id)
        .fetch_optional(&self.pool)
        .await?;
        Ok(at)
    }

    async fn purge_lora(
        &self,
        lora_id: &str,
        deleted_at: DateTime<Utc>,
    ) -> Result<Option<Vec<String>>> {
        let mut tx = self.pool.begin().await?;
        let still: Option<i32> = sqlx::query_scalar(
            "select 1 from loras where lora_id = $1 and deleted_at = $2 for update",
        )
        .bind(lora_id)
        .bind(deleted_at)
        .fetch_optional(&mut *tx)
        .await?;
        if still.is_none() {
            return Ok(None);
        }
        let uris: Vec<String> = sqlx::query_scalar(
            "delete from lora_versions where lora_id = $1 returning storage_uri",
        )
        .bind(lora_id)
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(Some(uris))
    }

    async fn get_lora(&self, lora_id: &str) -> Result<Option<Lora>> {
        let row = sqlx::query("select * from loras where lora_id = $1 and deleted_at is null")
            .bind(lora_id)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(lora_from_row).transpose()
    }

    async fn lora_by_adapter_name(&self, name: &str) -> Result<Option<Lora>> {
        // The same expression as the index `loras_adapter_name`.
        let row = sqlx::query(
            "select * from loras where replace(lora_id, '/', '-') = $1 and deleted_at is null
             order by lora_id limit 1",
        )
        .bind(name)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(lora_from_row).transpose()
    }

    async fn list_loras(&self, prefix: &str) -> Result<Vec<Lora>> {
        let rows = sqlx::query(
            "select * from loras where deleted_at is null and starts_with(lora_id, $1)
             order by lora_id",
        )
        .bind(prefix)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(lora_from_row).collect()
    }

    async fn lora_versions(&self, lora_id: &str) -> Result<Vec<LoraVersion>> {
        let rows = sqlx::query("select * from lora_versions where lora_id = $1 order by version")
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
                    job_id: r.try_get("job_id")?,
                    metrics: r.try_get("metrics")?,
                    created_at: r.try_get("created_at")?,
                    pinned: r.try_get("pinned")?,
                    pruned_at: r.try_get("pruned_at")?,
                })
            })
            .collect()
    }

    async fn request_adapter(&self, vllm_url: &str, lora_id: &str) -> Result<()> {
        sqlx::query(
            "with r as (
                insert into adapter_requests (vllm_url, lora_id) values ($1, $2)
                on conflict do nothing
             )
             select pg_notify($3, '')",
        )
        .bind(vllm_url)
        .bind(lora_id)
        .bind(CHANNEL)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn take_adapter_requests(&self, vllm_url: &str) -> Result<Vec<String>> {
        let rows: Vec<(String, DateTime<Utc>)> = sqlx::query_as(
            "delete from adapter_requests where vllm_url = $1 returning lora_id, requested_at",
        )
        .bind(vllm_url)
        .fetch_all(&self.pool)
        .await?;
        Ok(oldest_first(rows))
    }
}
