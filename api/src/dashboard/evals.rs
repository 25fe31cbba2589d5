//! `GET /v1/eval`: the eval runs under `<data_dir>/evals` (what `claas eval` writes with
//! its default `output_dir`), newest first, each with its summary and plots.

use std::path::{Path, PathBuf};

use axum::extract::{Path as UrlPath, State};
use axum::http::{header, HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};
use minijinja::context;

use super::{render, PageResult};
use crate::auth::Caller;
use crate::error::ApiError;
use crate::AppState;

/// The plots `claas eval` draws, in display order.
pub const PLOTS: [&str; 5] = [
    "logprob_margins.png",
    "learning_curves.png",
    "collapse_dashboard.png",
    "forgetting.png",
    "sdpo_diagnostics.png",
];

fn root(state: &AppState) -> PathBuf {
    state.options.data_dir.join("evals")
}

/// A run directory name as the URL gives it: one plain path segment.
fn run_dir(state: &AppState, run: &str) -> Result<PathBuf, ApiError> {
    let plain = !run.is_empty()
        && run != "."
        && run != ".."
        && run
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
    let dir = root(state).join(run);
    if plain && dir.join("summary.json").is_file() {
        Ok(dir)
    } else {
        Err(ApiError::not_found(format!("no eval run '{run}'")))
    }
}

fn summary_rows(dir: &Path) -> Vec<minijinja::Value> {
    let text = std::fs::read_to_string(dir.join("summary.json")).unwrap_or_default();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
    let num = |x: &serde_json::Value| x.as_f64().map(|f| format!("{f:.4}"));
    v.as_object()
        .map(|m| {
            m.values()
                .map(|p| {
                    context! {
                        preference => p["preference"].as_str().unwrap_or_default(),
                        lora_id => p["lora_id"].as_str().unwrap_or_default(),
                        margin_delta => num(&p["logprob_margin_delta"]),
                        compliance => num(&p["final_compliance"]),
                        capability => num(&p["capability_ratio"]),
                    }
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Eval runs under `eval.output_dir` with their summaries and plots.
#[utoipa::path(get, path = "/v1/eval", tags = ["dashboard", "admin"],
    responses((status = 200, description = "The eval runs page", content_type = "text/html", body = String),
        (status = 303, description = "No session: to the login form", headers(("Location" = String))), super::PageErrors))]
pub async fn list(State(state): State<AppState>, headers: HeaderMap, caller: Caller) -> PageResult {
    let mut runs: Vec<(std::time::SystemTime, String, PathBuf)> = std::fs::read_dir(root(&state))
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok())
        .filter(|e| e.path().join("summary.json").is_file())
        .filter_map(|e| {
            let modified = e.metadata().and_then(|m| m.modified()).ok()?;
            Some((
                modified,
                e.file_name().to_string_lossy().into_owned(),
                e.path(),
            ))
        })
        .collect();
    runs.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| b.1.cmp(&a.1)));
    let runs: Vec<_> = runs
        .iter()
        .take(50)
        .map(|(_, name, dir)| {
            context! {
                name => name,
                summary => summary_rows(dir),
                plots => PLOTS.iter().copied().filter(|p| dir.join("plots").join(p).is_file()).collect::<Vec<_>>(),
            }
        })
        .collect();
    render(
        &state,
        &headers,
        &caller,
        "evals.html",
        context! { runs, root => root(&state).display().to_string() },
    )
}

/// One plot of an eval run.
#[utoipa::path(get, path = "/v1/eval/{run}/plots/{file}", tags = ["dashboard", "admin"],
    params(("run" = String, Path, description = "The run's directory name"),
        ("file" = String, Path, description = "A plot file name, e.g. `logprob_margins.png`")),
    responses((status = 200, description = "The PNG", content_type = "image/png", body = Vec<u8>),
        (status = 303, description = "No session: to the login form", headers(("Location" = String))), super::PageErrors))]
pub async fn plot(
    State(state): State<AppState>,
    UrlPath((run, file)): UrlPath<(String, String)>,
) -> Result<Response, super::PageError> {
    let dir = run_dir(&state, &run)?;
    let name = PLOTS
        .iter()
        .find(|p| **p == file)
        .ok_or_else(|| ApiError::not_found(format!("no plot '{file}'")))?;
    let bytes = tokio::fs::read(dir.join("plots").join(name))
        .await
        .map_err(|_| ApiError::not_found(format!("run '{run}' has no {name}")))?;
    let mut resp = bytes.into_response();
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("image/png"));
    Ok(resp)
}
