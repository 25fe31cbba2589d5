//! A fake Hugging Face Hub: serves one checkpoint directory as one model repository the way
//! huggingface.co does for `huggingface_hub` and the `hf-hub` crate (`/api/models/<id>/
//! revision/<rev>` lists the files, `<id>/resolve/<rev>/<file>` serves byte ranges with
//! `ETag` and `X-Repo-Commit`), optionally gated behind a token, and counts every request.

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use axum::extract::{Path as UrlPath, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use sha2::Digest;

/// The commit every file is served at.
pub const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

pub struct FakeHub {
    /// `http://127.0.0.1:<port>`: what `HF_ENDPOINT` is set to.
    pub url: String,
    state: Arc<HubState>,
}

struct HubState {
    repo: String,
    dir: PathBuf,
    /// When set, requests must carry `Authorization: Bearer <token>` (a gated model).
    token: Option<String>,
    requests: AtomicUsize,
}

impl FakeHub {
    /// Serves the files of `dir` as the model repository `repo` (`org/name`).
    pub async fn start(repo: &str, dir: PathBuf, token: Option<&str>) -> FakeHub {
        let state = Arc::new(HubState {
            repo: repo.into(),
            dir,
            token: token.map(String::from),
            requests: AtomicUsize::new(0),
        });
        let app = Router::new()
            .route("/api/models/{org}/{name}/revision/{rev}", get(info))
            .route("/{org}/{name}/resolve/{rev}/{*file}", get(resolve))
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the fake hub");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        tokio::spawn(async move { axum::serve(listener, app).await });
        FakeHub { url, state }
    }

    /// Requests answered so far, refused ones included.
    pub fn requests(&self) -> usize {
        self.state.requests.load(Ordering::SeqCst)
    }

    /// The directory served.
    pub fn dir(&self) -> &std::path::Path {
        &self.state.dir
    }
}

impl HubState {
    fn authorized(&self, headers: &HeaderMap) -> bool {
        match &self.token {
            None => true,
            Some(t) => {
                headers
                    .get(header::AUTHORIZATION)
                    .and_then(|v| v.to_str().ok())
                    == Some(format!("Bearer {t}").as_str())
            }
        }
    }

    fn refuse(&self, headers: &HeaderMap, org: &str, name: &str) -> Option<Response> {
        if format!("{org}/{name}") != self.repo {
            // Like huggingface.co without a token: 401, the reason in X-Error-Code.
            return Some(
                (
                    StatusCode::UNAUTHORIZED,
                    [("x-error-code", "RepoNotFound")],
                    "Repository not found",
                )
                    .into_response(),
            );
        }
        if !self.authorized(headers) {
            return Some(
                (
                    StatusCode::UNAUTHORIZED,
                    [("x-error-code", "GatedRepo")],
                    "Access to this model is restricted",
                )
                    .into_response(),
            );
        }
        None
    }
}

async fn info(
    State(hub): State<Arc<HubState>>,
    UrlPath((org, name, _rev)): UrlPath<(String, String, String)>,
    headers: HeaderMap,
) -> Response {
    hub.requests.fetch_add(1, Ordering::SeqCst);
    if let Some(refused) = hub.refuse(&headers, &org, &name) {
        return refused;
    }
    let Ok(entries) = std::fs::read_dir(&hub.dir) else {
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    };
    let mut siblings: Vec<serde_json::Value> = entries
        .filter_map(|e| e.ok())
        .map(|e| serde_json::json!({"rfilename": e.file_name().to_string_lossy()}))
        .collect();
    // Files a checkpoint does not need are listed by the Hub too.
    siblings.push(serde_json::json!({"rfilename": "README.md"}));
    siblings.push(serde_json::json!({"rfilename": "onnx/model.onnx"}));
    axum::Json(serde_json::json!({"id": hub.repo, "sha": COMMIT, "siblings": siblings}))
        .into_response()
}

async fn resolve(
    State(hub): State<Arc<HubState>>,
    UrlPath((org, name, _rev, file)): UrlPath<(String, String, String, String)>,
    headers: HeaderMap,
) -> Response {
    hub.requests.fetch_add(1, Ordering::SeqCst);
    if let Some(refused) = hub.refuse(&headers, &org, &name) {
        return refused;
    }
    if file.contains("..") {
        return StatusCode::BAD_REQUEST.into_response();
    }
    let Ok(bytes) = std::fs::read(hub.dir.join(&file)) else {
        return (StatusCode::NOT_FOUND, [("x-error-code", "EntryNotFound")]).into_response();
    };
    let etag = format!("\"{}\"", hex::encode(sha2::Sha256::digest(&bytes)));
    let len = bytes.len();
    let range = headers
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .and_then(|r| r.strip_prefix("bytes="))
        .and_then(|r| r.split_once('-'))
        .and_then(|(a, b)| Some((a.parse::<usize>().ok()?, b.parse::<usize>().ok()?)));
    let mut out = HeaderMap::new();
    if let Ok(v) = HeaderValue::from_str(&etag) {
        out.insert(header::ETAG, v);
    }
    out.insert("x-repo-commit", HeaderValue::from_static(COMMIT));
    match range {
        Some((a, b)) if a < len => {
            // A range past the end is cut at the end, as HTTP servers do.
            let b = b.min(len - 1);
            if let Ok(v) = HeaderValue::from_str(&format!("bytes {a}-{b}/{len}")) {
                out.insert(header::CONTENT_RANGE, v);
            }
            (StatusCode::PARTIAL_CONTENT, out, bytes[a..=b].to_vec()).into_response()
        }
        _ => (StatusCode::OK, out, bytes).into_response(),
    }
}
