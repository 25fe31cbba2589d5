//! The SQLite store: API keys.

use super::*;
use crate::queue::last_admin;
use crate::queue::prelude::*;

#[async_trait]
impl KeyStore for SqliteStore {
    async fn create_api_key(&self, key: &ApiKey, secret_hash: &str) -> Result<()> {
        sqlx::query(
            "insert into api_keys (id, name, prefixes, admin, secret_hash, created_at)
             values (?, ?, ?, ?, ?, ?)",
        )
        .bind(&key.id)
        .bind(&key.name)
        .bind(serde_json::to_string(&key.prefixes)?)
        .bind(key.admin)
        .bind(secret_hash)
        .bind(now_ms())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn list_api_keys(&self) -> Result<Vec<ApiKey>> {
        let rows = sqlx::query("select * from api_keys order by created_at desc, id")
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(api_key_from_row).collect()
    }

    async fn revoke_api_key(&self, id: &str) -> Result<bool> {
        // SQLite has one writer at a time, so the count cannot change under the statement.
        let done = sqlx::query(
            "update api_keys set revoked_at = ?1
             where id = ?2 and revoked_at is null
               and (not admin or exists (
                   select 1 from api_keys k where k.admin and k.revoked_at is null and k.id <> ?2))",
        )
        .bind(now_ms())
        .bind(id)
        .execute(&self.pool)
        .await?;
        if done.rows_affected() == 1 {
            return Ok(true);
        }
        let live_admin: i64 = sqlx::query_scalar(
            "select count(*) from api_keys where id = ? and admin and revoked_at is null",
        )
        .bind(id)
        .fetch_one(&self.pool)
        .await?;
        if live_admin > 0 {
            return Err(last_admin(id));
        }
        Ok(false)
    }

    async fn find_api_key(&self, secret_hash: &str) -> Result<Option<ApiKey>> {
        let row =
            sqlx::query("select * from api_keys where secret_hash = ? and revoked_at is null")
                .bind(secret_hash)
                .fetch_optional(&self.pool)
                .await?;
        row.as_ref().map(api_key_from_row).transpose()
    }

    async fn find_api_key_by_id(&self, id: &str) -> Result<Option<(ApiKey, String)>> {
        let row = sqlx::query("select * from api_keys where id = ? and revoked_at is null")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref()
            .map(|r| Ok((api_key_from_row(r)?, r.try_get("secret_hash")?)))
            .transpose()
    }

    async fn any_api_key_created(&self) -> Result<bool> {
        let n: i64 = sqlx::query_scalar("select count(*) from api_keys")
            .fetch_one(&self.pool)
            .await?;
        Ok(n > 0)
    }
}
