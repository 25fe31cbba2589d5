//! LoRA registration, listing and versions. `POST /v1/lora/init` records a LoRA and, when
//! the base checkpoint is on this machine, writes version 0 as a PEFT adapter (shapes from
//! its `config.json`); otherwise the first worker to train it creates the same file. Init
//! is idempotent: the same parameters answer 200 with the existing LoRA, different ones 409.

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use claas_core::types::{adapter_name, validate_lora_id, Lora, LoraVersion, NewLora};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::lora_id::LoraPath;
use crate::auth::Caller;
use crate::error::{ApiError, ApiResult, ErrorBody, Errors, JsonBody, QueryParams};
use crate::AppState;

/// The projections CLaaS adapts by default: attention and MLP.
pub const DEFAULT_TARGETS: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

/// CLaaS `LoraInitRequest`.
#[derive(Debug, Deserialize, ToSchema)]
pub struct LoraInitRequest {
    #[schema(example = "demo/assistant")]
    pub lora_id: String,
    /// Default: the deployment's base model; must be in `allowed_init_base_models`.
    pub base_model: Option<String>,
    #[serde(default = "default_r")]
    #[schema(minimum = 4, maximum = 128, default = 32)]
    pub lora_r: i32,
    #[serde(default = "default_alpha")]
    #[schema(minimum = 8, maximum = 256, default = 64)]
    pub lora_alpha: i32,
    /// Default: q/k/v/o and the MLP projections.
    pub target_modules: Option<Vec<String>>,
    /// Start an existing LoRA afresh as a new version (its history is kept).
    #[serde(default)]
    pub overwrite: bool,
}

/// A LoRA after init.
#[derive(Debug, Serialize, ToSchema)]
pub struct LoraInitResponse {
    pub lora_id: String,
    /// False when it existed with the same parameters.
    pub created: bool,
    /// Present (true) when `overwrite` started it afresh.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub overwritten: Option<bool>,
    pub current_version: i32,
    pub base_model: String,
}

fn default_r() -> i32 {
    32
}

fn default_alpha() -> i32 {
    64
}

/// Registers a LoRA (CLaaS's init). The same parameters again answer 200 with the existing
/// LoRA; different ones 409 unless `overwrite`.
#[utoipa::path(
    post,
    path = "/v1/lora/init",
    tag = "lora",
    request_body = LoraInitRequest,
    responses(
        (status = 200, body = LoraInitResponse),
        (status = 409, body = ErrorBody, description = "It exists with other parameters, or another LoRA has its adapter name"),
        (status = 429, body = ErrorBody, description = "The key created or overwrote its hourly share of LoRAs",
            headers(("Retry-After" = u64, description = "Seconds"))),
        Errors,
    )
)]
// Long: CLaaS's init contract in order: validate, limit, create or compare, version 0, vLLM.
pub async fn init(
    State(state): State<AppState>,
    caller: Caller,
    JsonBody(req, _): JsonBody<LoraInitRequest>,
) -> ApiResult<Response> {
    // 400: an id that could name a path outside the adapter root is not a range error.
    validate_lora_id(&req.lora_id).map_err(|e| ApiError::bad_request(e.to_string()))?;
    caller.check(&req.lora_id)?;
    if !(4..=128).contains(&req.lora_r) {
        return Err(ApiError::invalid("lora_r must be within [4, 128]"));
    }
    if !(8..=256).contains(&req.lora_alpha) {
        return Err(ApiError::invalid("lora_alpha must be within [8, 256]"));
    }
    if let Some(max) = state.options.max_lora_rank {
        if req.lora_r > max {
            return Err(ApiError::invalid(format!(
                "lora_r {} is above the vLLM's --max-lora-rank {max} (VLLM_MAX_LORA_RANK): \
                 vLLM would refuse to load the adapter",
                req.lora_r
            )));
        }
    }
    let base = req
        .base_model
        .clone()
        .unwrap_or_else(|| state.options.default_base_model.clone());
    let allowed = &state.options.allowed_init_base_models;
    if !allowed.contains(&base) {
        return Err(ApiError::base_model_not_allowed(&base, allowed));
    }
    let targets = req
        .target_modules
        .unwrap_or_else(|| DEFAULT_TARGETS.iter().map(|s| s.to_string()).collect());
    if let Some(bad) = targets
        .iter()
        .find(|t| !DEFAULT_TARGETS.contains(&t.as_str()))
    {
        return Err(ApiError::invalid(format!(
            "unsupported target module '{bad}' (supported: {})",
            DEFAULT_TARGETS.join(", ")
        )));
    }
    let wanted = NewLora {
        lora_id: req.lora_id.clone(),
        base_model: base,
        rank: req.lora_r,
        alpha: f64::from(req.lora_alpha),
        target_modules: targets,
        initial_uri: String::new(),
        initial_sha256: String::new(),
    };
    if let Some(existing) = state.store.get_lora(&req.lora_id).await? {
        if !req.overwrite {
            return same_or_conflict(&existing, &wanted);
        }
        charge_init(&state, &caller)?;
        return overwrite(&state, existing, wanted).await;
    }
    let name = adapter_name(&req.lora_id);
    if let Some(other) = state.store.lora_by_adapter_name(&name).await? {
        return Err(ApiError::adapter_name_taken(
            &req.lora_id,
            &name,
            &other.lora_id,
        ));
    }
    charge_init(&state, &caller)?;
    let (uri, sha) = write_initial_version(&state, &wanted, 0).await?;
    let created = state
        .store
        .create_lora(&NewLora {
            initial_uri: uri.clone(),
            initial_sha256: sha.clone(),
            ..wanted.clone()
        })
        .await;
    match created {
        Ok(lora) => {
            serve_in_vllm(&state, &lora.lora_id, &uri, &sha, false).await;
            Ok(init_answer(&lora, true))
        }
        // Another request created it meanwhile: the same rule as above. The files written
        // for this request are nobody's.
        Err(claas_core::Error::Conflict(_)) => {
            discard(&state, &uri).await;
            match state.store.get_lora(&req.lora_id).await? {
                Some(existing) => same_or_conflict(&existing, &wanted),
                None => Err(ApiError::conflict(format!(
                    "LoRA {} is being deleted and a job of it has not stopped yet; retry shortly",
                    req.lora_id
                ))),
            }
        }
        Err(e) => {
            discard(&state, &uri).await;
            Err(e.into())
        }
    }
}

/// Removes the files of an initial version no LoRA recorded. Best effort: what is left is
/// an orphan the worker's retention removes.
async fn discard(state: &AppState, uri: &str) {
    if let Err(e) = state.adapters.remove(uri).await {
        tracing::warn!(%uri, error = %e, "could not remove an unrecorded initial version");
    }
}

/// CLaaS answers init with `{"lora_id"}` and 200 (its clients check for success, not 201).
fn init_answer(lora: &Lora, created: bool) -> Response {
    Json(LoraInitResponse {
        lora_id: lora.lora_id.clone(),
        created,
        overwritten: None,
        current_version: lora.current_version,
        base_model: lora.base_model.clone(),
    })
    .into_response()
}

/// An init for an existing id: 200 when it asks for what exists (CLaaS clients init
/// blindly on every start), 409 naming what differs.
fn same_or_conflict(existing: &Lora, wanted: &NewLora) -> ApiResult<Response> {
    let mut diffs = Vec::new();
    if existing.base_model != wanted.base_model {
        diffs.push(format!(
            "base_model {} (requested {})",
            existing.base_model, wanted.base_model
        ));
    }
    if existing.rank != wanted.rank {
        diffs.push(format!(
            "lora_r {} (requested {})",
            existing.rank, wanted.rank
        ));
    }
    if existing.alpha != wanted.alpha {
        diffs.push(format!(
            "lora_alpha {} (requested {})",
            existing.alpha, wanted.alpha
        ));
    }
    let sorted = |v: &[String]| {
        let mut v = v.to_vec();
        v.sort();
        v
    };
    if sorted(&existing.target_modules) != sorted(&wanted.target_modules) {
        diffs.push(format!(
            "target_modules [{}] (requested [{}])",
            existing.target_modules.join(", "),
            wanted.target_modules.join(", ")
        ));
    }
    if diffs.is_empty() {
        return Ok(init_answer(existing, false));
    }
    Err(ApiError::lora_exists(&existing.lora_id, &diffs))
}

/// `overwrite: true` on an existing LoRA: fresh initial weights with the requested
/// parameters become its next version; the old versions stay. A job training meanwhile
/// cannot publish on top (its version is no longer current) and retries from the new one.
async fn overwrite(state: &AppState, existing: Lora, wanted: NewLora) -> ApiResult<Response> {
    let (uri, sha) = write_initial_version(state, &wanted, existing.current_version + 1).await?;
    let reinit = state
        .store
        .reinit_lora(
            &NewLora {
                initial_uri: uri.clone(),
                initial_sha256: sha.clone(),
                ..wanted
            },
            existing.current_version,
            &serde_json::json!({"reinitialized": true}),
        )
        .await;
    let lora = match reinit {
        Ok(l) => l,
        Err(e) => {
            discard(state, &uri).await;
            return Err(e.into());
        }
    };
    serve_in_vllm(state, &lora.lora_id, &uri, &sha, true).await;
    Ok(Json(LoraInitResponse {
        lora_id: lora.lora_id,
        created: false,
        overwritten: Some(true),
        current_version: lora.current_version,
        base_model: lora.base_model,
    })
    .into_response())
}

/// Loads a freshly written initial version into every vLLM (`swap`: in place of the
/// version it serves). Best effort: a vLLM that misses it loads it on first use. Versions
/// in an object store are loaded by each vLLM's own worker, which is asked here.
pub(crate) async fn serve_in_vllm(
    state: &AppState,
    lora_id: &str,
    uri: &str,
    sha: &str,
    swap: bool,
) {
    if sha.is_empty() {
        return; // no files yet: the first worker to train it writes them
    }
    let Some(dir) = claas_core::types::local_path(uri) else {
        for up in state.backends.iter().flat_map(|b| b.all()) {
            if let Err(e) = state.store.request_adapter(up.base_url(), lora_id).await {
                tracing::warn!(lora_id, vllm = up.base_url(), error = %e, "could not ask the node's worker to load the new adapter");
            }
        }
        return;
    };
    let dir = dir.display().to_string();
    for up in state.backends.iter().flat_map(|b| b.all()) {
        if let Err(e) = crate::upstream::load_lora(up, lora_id, &dir, swap).await {
            let e: ApiError = e.into();
            tracing::warn!(lora_id, vllm = up.base_url(), error = %e.message, "could not load the new adapter");
        }
    }
}

/// Counts a creation or overwrite against the caller's hourly share (keys only; the same
/// parameters again are free: they change nothing).
fn charge_init(state: &AppState, caller: &Caller) -> ApiResult<()> {
    if caller.id().is_empty() {
        return Ok(());
    }
    state
        .lora_inits
        .take(caller.id())
        .map_err(ApiError::too_many_lora_inits)
}

/// Writes an initial adapter as `version` when the base checkpoint is on this machine;
/// returns its URI and the sha256 of its weights, or the path a worker will create it at
/// (and no sha256). Like every version, in a location of its own (see `AdapterStore`), so
/// it never meets the files of a job publishing the same number, nor those of an earlier
/// LoRA of the same id.
async fn write_initial_version(
    state: &AppState,
    lora: &NewLora,
    version: i32,
) -> ApiResult<(String, String)> {
    let root = std::path::PathBuf::from(&state.options.lora_root);
    let root = std::path::absolute(&root).unwrap_or(root);
    let name = claas_core::adapter_store::AdapterStore::version_name(
        version,
        &claas_core::adapter_store::AdapterStore::new_tag(),
    );
    let dir = root.join(&lora.lora_id).join(&name);
    // The first worker to train it writes it when this process cannot.
    let later = || (state.adapters.uri_of(&lora.lora_id, &name), String::new());
    let Some(models) = state.base_models.clone() else {
        return Ok(later());
    };
    let (target, new) = (dir.clone(), lora.clone());
    let written = tokio::task::spawn_blocking(move || models.write_initial_adapter(&target, &new))
        .await
        .map_err(|e| ApiError::internal(format!("writing an initial adapter: {e}")))?
        .map_err(|e| ApiError::internal(format!("writing an initial adapter: {e}")))?;
    let Some(sha) = written else {
        return Ok(later());
    };
    if state.adapters.is_remote() {
        let uri = state
            .adapters
            .publish(&lora.lora_id, &name)
            .await
            .map_err(|e| ApiError::internal(e.to_string()))?;
        return Ok((uri, sha));
    }
    Ok((format!("file://{}", dir.display()), sha))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// Only ids starting with this.
    #[serde(default)]
    pub prefix: String,
}

/// CLaaS's `{"loras": [ids]}` plus each LoRA's current version.
#[derive(Debug, Serialize, ToSchema)]
pub struct LoraList {
    pub loras: Vec<String>,
    pub items: Vec<LoraItem>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct LoraItem {
    pub lora_id: String,
    pub current_version: i32,
    pub base_model: String,
    pub rank: i32,
    pub alpha: f64,
    pub updated_at: chrono::DateTime<chrono::Utc>,
}

/// A LoRA's versions, oldest first.
#[derive(Debug, Serialize, ToSchema)]
pub struct LoraVersions {
    pub lora_id: String,
    pub current_version: i32,
    pub versions: Vec<LoraVersion>,
}

/// The caller's LoRAs, optionally under a prefix.
#[utoipa::path(
    get,
    path = "/v1/lora",
    tag = "lora",
    params(ListQuery),
    responses((status = 200, body = LoraList), Errors)
)]
pub async fn list(
    State(state): State<AppState>,
    caller: Caller,
    QueryParams(q): QueryParams<ListQuery>,
) -> ApiResult<Json<LoraList>> {
    let mut loras = state.store.list_loras(&q.prefix).await?;
    loras.retain(|l| caller.covers(&l.lora_id));
    Ok(Json(LoraList {
        loras: loras.iter().map(|l| l.lora_id.clone()).collect(),
        items: loras
            .into_iter()
            .map(|l| LoraItem {
                lora_id: l.lora_id,
                current_version: l.current_version,
                base_model: l.base_model,
                rank: l.rank,
                alpha: l.alpha,
                updated_at: l.updated_at,
            })
            .collect(),
    }))
}

/// Every version of a LoRA with its metrics, pin and retention state.
#[utoipa::path(
    get,
    path = "/v1/lora/{lora_id}/versions",
    tag = "lora",
    params(("lora_id" = String, Path, description = "The LoRA (a `/` in it may be sent raw or as %2F)", example = "demo/assistant")),
    responses((status = 200, body = LoraVersions), Errors)
)]
pub async fn versions(
    State(state): State<AppState>,
    LoraPath(lora_id): LoraPath,
) -> ApiResult<Json<LoraVersions>> {
    let lora_id = &lora_id;
    let lora = state
        .store
        .get_lora(lora_id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("LoRA not found: {lora_id}")))?;
    let versions = state.store.lora_versions(lora_id).await?;
    Ok(Json(LoraVersions {
        lora_id: lora.lora_id,
        current_version: lora.current_version,
        versions,
    }))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ExportQuery {
    #[param(example = "demo/assistant")]
    pub lora_id: String,
    /// Default: the current version.
    pub version: Option<i32>,
    /// Also the AdamW moments (`optimizer_state.safetensors`), when the version has them
    /// (a version a worker trained does; version 0 starts from zero moments). Default false.
    #[serde(default)]
    pub include_optimizer: bool,
}

/// The files of a version that make a PEFT adapter.
const PEFT_FILES: [&str; 2] = ["adapter_config.json", "adapter_model.safetensors"];
/// The optimizer state beside them, exported on request.
const OPTIMIZER_FILE: &str = "optimizer_state.safetensors";

/// The local directory of `record`'s files: 404 when it has none yet, 409 when it is held
/// outside this deployment's adapter storage (a Tinker checkpoint).
async fn version_files(
    state: &AppState,
    lora_id: &str,
    record: &claas_core::types::LoraVersion,
) -> ApiResult<std::path::PathBuf> {
    let version = record.version;
    let no_files = || {
        ApiError::not_found(format!(
            "version {version} of {lora_id} has no files yet (version 0 is written by the \
             first training job when init could not read the base model)"
        ))
    };
    let uri = &record.storage_uri;
    if uri.is_empty() {
        return Err(no_files());
    }
    if !state.adapters.holds(uri) {
        return Err(ApiError::conflict(format!(
            "version {version} of {lora_id} is held outside this deployment's adapter \
             storage, at {uri}: export it from there (a tinker:// checkpoint with Tinker's \
             own tools)"
        )));
    }
    let dir = state
        .adapters
        .materialize(uri)
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?;
    if !dir.join("adapter_model.safetensors").is_file() {
        return Err(no_files());
    }
    Ok(dir)
}

/// `GET /v1/lora/export?lora_id=&version=`: a zip of the version's PEFT files, streamed,
/// after checking the weights against the sha256 recorded at publish.
#[utoipa::path(
    get,
    path = "/v1/lora/export",
    tag = "lora",
    params(ExportQuery),
    responses(
        (status = 200, description = "A zip of adapter_config.json and adapter_model.safetensors (and optimizer_state.safetensors with include_optimizer=true)", content_type = "application/zip", body = Vec<u8>),
        (status = 409, body = ErrorBody, description = "The version is held outside this deployment's adapter storage (a Tinker checkpoint)"),
        (status = 500, body = ErrorBody, description = "The stored files do not match their recorded sha256"),
        Errors,
    )
)]
pub async fn export(
    State(state): State<AppState>,
    caller: Caller,
    QueryParams(q): QueryParams<ExportQuery>,
) -> ApiResult<Response> {
    let mut q = q;
    q.lora_id = crate::routes::lora_id::lora_for(&state, &caller, &q.lora_id).await?;
    let lora = state
        .store
        .get_lora(&q.lora_id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("LoRA not found: {}", q.lora_id)))?;
    let version = q.version.unwrap_or(lora.current_version);
    let record = state
        .store
        .lora_versions(&q.lora_id)
        .await?
        .into_iter()
        .find(|v| v.version == version)
        .ok_or_else(|| {
            ApiError::not_found(format!("LoRA {} has no version {version}", q.lora_id))
        })?;
    let dir = version_files(&state, &q.lora_id, &record).await?;
    let expected = record.sha256.clone();
    let mut files = PEFT_FILES.to_vec();
    if q.include_optimizer && dir.join(OPTIMIZER_FILE).is_file() {
        files.push(OPTIMIZER_FILE);
    }
    let file = tokio::task::spawn_blocking(move || write_zip(&dir, &expected, &files))
        .await
        .map_err(|e| ApiError::internal(format!("export: {e}")))??;
    let name = format!("{}-v{version}.zip", q.lora_id.replace('/', "__"));
    let stream = futures::stream::unfold(tokio::fs::File::from_std(file), |mut f| async move {
        use tokio::io::AsyncReadExt;
        let mut buf = vec![0u8; 1 << 20];
        match f.read(&mut buf).await {
            Ok(0) => None,
            Ok(n) => {
                buf.truncate(n);
                Some((Ok::<_, std::io::Error>(axum::body::Bytes::from(buf)), f))
            }
            Err(e) => Some((Err(e), f)),
        }
    });
    Ok((
        [
            (
                axum::http::header::CONTENT_TYPE,
                "application/zip".to_string(),
            ),
            (
                axum::http::header::CONTENT_DISPOSITION,
                // The id is validated to [A-Za-z0-9._-/]; '/' becomes "__": nothing to escape.
                format!("attachment; filename=\"{name}\""),
            ),
        ],
        axum::body::Body::from_stream(stream),
    )
        .into_response())
}

/// Zips `files` of `dir` into an anonymous temporary file (unlinked at once) after checking
/// the weights' sha256 against `expected` (when one was recorded).
fn write_zip(dir: &std::path::Path, expected: &str, files: &[&str]) -> ApiResult<std::fs::File> {
    use std::io::Seek;
    let io = |e: std::io::Error| ApiError::internal(format!("export: {e}"));
    if !expected.is_empty() {
        let actual = claas_core::adapter_store::weights_sha256(dir)
            .map_err(|e| ApiError::internal(format!("export: {e}")))?;
        if actual != expected {
            return Err(ApiError::internal(format!(
                "stored adapter {} does not match its recorded sha256 ({actual} != {expected}); \
                 refusing to export corrupted weights",
                dir.display()
            )));
        }
    }
    let path = std::env::temp_dir().join(format!("claas-export-{}.zip", uuid::Uuid::now_v7()));
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)
        .map_err(io)?;
    let _ = std::fs::remove_file(&path);
    let mut zip = zip::ZipWriter::new(file);
    let opts = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Stored)
        .large_file(true);
    for &name in files {
        // Copied through a buffer, never read whole: weights can be hundreds of MB.
        let mut source = std::fs::File::open(dir.join(name)).map_err(io)?;
        zip.start_file(name, opts)
            .map_err(|e| ApiError::internal(format!("export: {e}")))?;
        std::io::copy(&mut source, &mut zip).map_err(io)?;
    }
    let mut file = zip
        .finish()
        .map_err(|e| ApiError::internal(format!("export: {e}")))?;
    file.rewind().map_err(io)?;
    Ok(file)
}
