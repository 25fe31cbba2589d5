//! The Postgres store: API keys.

use super::*;
use crate::queue::last_admin;
use crate::queue::prelude::*;

#[async_trait]
impl KeyStore for PgStore {
    async fn create_api_key(&self, key: &ApiKey, secret_hash: &str) -> Result<()> {
        sqlx::query(
            "insert into api_keys (id, name, prefixes, admin, secret_hash) values ($1, $2, $3, $4, $5)",
        )
        .bind(&key.id)
        .bind(&key.name)
        .bind(serde_json::to_value(&key.prefixes)?)
        .bind(key.admin)
        .bind(secret_hash)
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
        // Locking every live admin row makes two concurrent revokes of the last two admins
        // wait for each other; the second then re-reads the rows and sees one admin left.
        let done = sqlx::query(
            "with admins as (
                 select id from api_keys where admin and revoked_at is null for update
             )
             update api_keys set revoked_at = now()
             where id = $1 and revoked_at is null
               and (not admin or (select count(*) from admins where admins.id <> $1) > 0)",
        )
        .bind(id)
        .execute(&self.pool)
        .await?;
        if done.rows_affected() == 1 {
            return Ok(true);
        }
        let live_admin: bool = sqlx::query_scalar(
            "select exists (select 1 from api_keys where id = $1 and admin and revoked_at is null)",
        )
        .bind(id)
        .fetch_one(&self.pool)
        .await?;
        if live_admin {
            return Err(last_admin(id));
        }
        Ok(false)
    }

    async fn find_api_key(&self, secret_hash: &str) -> Result<Option<ApiKey>> {
        let row =
            sqlx::query("select * from api_keys where secret_hash = $1 and revoked_at is null")
                .bind(secret_hash)
                .fetch_optional(&self.pool)
                .await?;
        row.as_ref().map(api_key_from_row).transpose()
    }

    async fn find_api_key_by_id(&self, id: &str) -> Result<Option<(ApiKey, String)>> {
        let row = sqlx::query("select * from api_keys where id = $1 and revoked_at is null")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref()
            .map(|r| Ok((api_key_from_row(r)?, r.try_get("secret_hash")?)))
            .transpose()
    }

    async fn any_api_key_created(&self) -> Result<bool> {
        Ok(sqlx::query_scalar("select exists (select 1 from api_keys)")
            .fetch_one(&self.pool)
            .await?)
    }
}
