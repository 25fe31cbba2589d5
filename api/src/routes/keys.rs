//! Key management over HTTP (admin keys only): `GET /v1/keys`, `POST /v1/keys`,
//! `DELETE /v1/keys/{id}`. The same rules as `claas keys`; the secret is shown once and
//! only its hash is stored.

use axum::extract::{Path, State};
use axum::response::Response;
use axum::Json;
use claas_core::queue::SharedStore;
use claas_core::types::{validate_lora_id, ApiKey};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::auth::Caller;
use crate::error::{ApiError, ApiResult, ErrorBody, Errors, JsonBody};
use crate::AppState;

/// A key to create.
#[derive(Debug, Deserialize, ToSchema)]
#[schema(example = json!({"name": "demo tenant", "prefixes": ["demo/"]}))]
pub struct NewKey {
    /// A name to recognise the key by.
    #[schema(min_length = 1, max_length = 200)]
    pub name: String,
    /// LoRA id prefixes it may act on: `alice` covers `alice` and `alice/...`; a prefix
    /// ending in `/` or `-` is a plain prefix. Needed unless `admin`.
    #[serde(default)]
    pub prefixes: Vec<String>,
    /// Acts on every LoRA and job, manages keys, opens the dashboard.
    #[serde(default)]
    pub admin: bool,
}

/// A created key and its secret: shown this once.
#[derive(Debug, Serialize, ToSchema)]
pub struct CreatedKey {
    pub key: ApiKey,
    /// `Authorization: Bearer <secret>`.
    pub secret: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct KeyList {
    /// Newest first, revoked ones included; never their secrets.
    pub keys: Vec<ApiKey>,
}

/// Why a key cannot be created as asked, or `None`.
pub fn key_problem(name: &str, prefixes: &[String], admin: bool) -> Option<String> {
    if name.trim().is_empty() || name.len() > 200 {
        return Some("name must be 1 to 200 characters".into());
    }
    if !admin && prefixes.is_empty() {
        return Some("a key needs prefixes (one or more) or admin".into());
    }
    prefixes
        .iter()
        .find(|p| validate_lora_id(p.trim_end_matches(['/', '-'])).is_err())
        .map(|p| format!("prefix {p:?} is not a LoRA id prefix"))
}

/// Creates a key; its secret is returned once.
pub async fn create_key(store: &SharedStore, new: NewKey) -> claas_core::Result<CreatedKey> {
    if let Some(problem) = key_problem(&new.name, &new.prefixes, new.admin) {
        return Err(claas_core::Error::Invalid(problem));
    }
    let (id, secret) = crate::auth::new_secret();
    let key = ApiKey {
        id,
        name: new.name,
        prefixes: new.prefixes,
        admin: new.admin,
        created_at: chrono::Utc::now(),
        revoked_at: None,
    };
    store
        .create_api_key(&key, &crate::auth::secret_hash(&secret))
        .await?;
    Ok(CreatedKey { key, secret })
}

fn admin_only(caller: &Caller) -> ApiResult<()> {
    if caller.is_admin() {
        return Ok(());
    }
    Err(ApiError::forbidden("key management needs an admin key"))
}

/// Every key (never its secret).
#[utoipa::path(get, path = "/v1/keys", tags = ["admin"],
    responses((status = 200, body = KeyList), Errors))]
pub async fn list(State(state): State<AppState>, caller: Caller) -> ApiResult<Json<KeyList>> {
    admin_only(&caller)?;
    Ok(Json(KeyList {
        keys: state.store.list_api_keys().await?,
    }))
}

/// Creates a key and answers its secret, once.
#[utoipa::path(post, path = "/v1/keys", tags = ["admin"], request_body = NewKey,
    responses((status = 201, body = CreatedKey), Errors))]
pub async fn create(
    State(state): State<AppState>,
    caller: Caller,
    JsonBody(new, _): JsonBody<NewKey>,
) -> ApiResult<Response> {
    admin_only(&caller)?;
    let created = create_key(&state.store, new).await?;
    tracing::info!(key = %created.key.id, by = %caller.id(), "API key created");
    Ok(crate::error::created(Json(created)))
}

/// Revokes a key; every replica stops accepting it within seconds.
#[utoipa::path(delete, path = "/v1/keys/{id}", tags = ["admin"],
    params(("id" = String, Path, description = "The key's id (`key_...`), not its secret")),
    responses((status = 204, description = "Revoked"),
        (status = 409, body = ErrorBody, description = "The bootstrap key is configured, not stored; or it is the last admin key"),
        Errors))]
pub async fn revoke(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    admin_only(&caller)?;
    if id == "bootstrap" {
        return Err(ApiError::conflict(
            "the bootstrap admin key comes from configuration (CLAAS_ADMIN_KEY); remove it there",
        ));
    }
    if !state.store.revoke_api_key(&id).await? {
        return Err(ApiError::not_found(format!("no active key {id}")));
    }
    tracing::info!(key = %id, by = %caller.id(), "API key revoked");
    Ok(crate::error::no_content())
}
