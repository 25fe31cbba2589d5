//! Which LoRA a request names: its id, its vLLM adapter name, either with CLaaS's
//! `-latest` alias, checked against the caller's key. Every route that takes a `lora_id` or
//! a `model` resolves it here.

use axum::extract::{FromRequestParts, Path};
use axum::http::request::Parts;
use claas_core::types::validate_lora_id;

use crate::auth::Caller;
use crate::error::{ApiError, ApiResult};
use crate::AppState;

/// The LoRA a name means, the way CLaaS clients (its eval harness, OpenClaw's plugin) name
/// one as `lora_id` or as a chat `model`: its id; its vLLM adapter name (the id with `/` as
/// `-`, [`claas_core::types::adapter_name`]); and either with CLaaS's `-latest` suffix for the newest version.
/// A LoRA whose id is exactly the name wins, then one whose adapter name is, then the same
/// two without `-latest`. A name that means no LoRA comes back unchanged (the base model, or
/// a 404 later).
pub async fn resolve_alias(state: &AppState, name: &str) -> ApiResult<String> {
    let bare = name.strip_suffix("-latest").filter(|b| !b.is_empty());
    for candidate in std::iter::once(name).chain(bare) {
        if state.store.get_lora(candidate).await?.is_some() {
            return Ok(candidate.to_owned());
        }
        // Only a valid id can be a LoRA's adapter name (the base model's name is not one).
        if validate_lora_id(candidate).is_ok() && !candidate.contains('/') {
            if let Some(l) = state.store.lora_by_adapter_name(candidate).await? {
                return Ok(l.lora_id);
            }
        }
    }
    Ok(name.to_owned())
}

/// The LoRA a request names, as the caller may act on it: 400 for an id that is not one,
/// CLaaS's `-latest` alias resolved, 403 outside the caller's prefixes.
pub async fn lora_for(state: &AppState, caller: &Caller, raw: &str) -> ApiResult<String> {
    validate_lora_id(raw).map_err(|e| ApiError::bad_request(e.to_string()))?;
    let id = resolve_alias(state, raw).await?;
    caller.check(&id)?;
    Ok(id)
}

/// The LoRA a route's `{lora_id}` path segment names, resolved and checked as [`lora_for`]
/// does: every route with the id in its path takes it this way.
pub struct LoraPath(pub String);

impl FromRequestParts<AppState> for LoraPath {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> ApiResult<LoraPath> {
        let Path(raw) = Path::<String>::from_request_parts(parts, state)
            .await
            .map_err(|e| ApiError::bad_request(e.body_text()))?;
        let caller = match Caller::from_request_parts(parts, state).await {
            Ok(c) => c,
            Err(never) => match never {},
        };
        Ok(LoraPath(lora_for(state, &caller, &raw).await?))
    }
}
