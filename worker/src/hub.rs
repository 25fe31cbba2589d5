//! Base models by Hugging Face id: `model.base_model_id: Qwen/Qwen3-0.6B` is downloaded into
//! the Hugging Face cache the first time a process needs it, the way `huggingface_hub` lays
//! it out, so vLLM, PyTorch and a second start all find it there without a request.
//!
//! Only the files a checkpoint needs are fetched (the repository's top-level `.json`,
//! `.safetensors`, `.txt` and `.jinja` files), `config.json` last: the resolver takes a
//! snapshot as complete only when it holds `config.json`, so a cut-off download is resumed
//! on the next start rather than loaded half-written.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use hf_hub::api::tokio::{ApiBuilder, ApiError, ApiRepo, Progress};
use hf_hub::api::RepoInfo;
use hf_hub::Cache;

/// The public Hub; `HF_ENDPOINT` replaces it (a mirror, or a test's fake Hub).
pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";

/// Where and how to reach the Hub; [`HubSettings::from_env`] reads the variables
/// `huggingface_hub` reads.
#[derive(Debug, Clone)]
pub struct HubSettings {
    pub endpoint: String,
    /// `HF_TOKEN`; without it, the token file `huggingface-cli login` writes, if any.
    pub token: Option<String>,
    /// The hub cache (`HF_HUB_CACHE`, `$HF_HOME/hub`, `~/.cache/huggingface/hub`).
    pub cache_dir: PathBuf,
    /// `HF_HUB_OFFLINE=1`: never download.
    pub offline: bool,
    /// Draw a progress bar (on a terminal); otherwise write a log line per file.
    pub progress_bar: bool,
}

impl HubSettings {
    pub fn from_env() -> Option<Self> {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
        Some(Self {
            endpoint: var("HF_ENDPOINT")
                .unwrap_or_else(|| DEFAULT_ENDPOINT.into())
                .trim_end_matches('/')
                .to_string(),
            token: var("HF_TOKEN").or_else(|| var("HUGGING_FACE_HUB_TOKEN")),
            cache_dir: claas_trainer::resolve::hf_hub_cache()?,
            offline: var("HF_HUB_OFFLINE").is_some_and(|v| !matches!(v.as_str(), "0" | "false")),
            progress_bar: std::io::stderr().is_terminal(),
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HubError {
    #[error(
        "the Hugging Face Hub ({endpoint}) refused {id} ({status}): the model is gated or \
         private; set HF_TOKEN to a token with access to it{hint}"
    )]
    Unauthorized {
        id: String,
        endpoint: String,
        status: u16,
        hint: &'static str,
    },
    #[error(
        "base model {id} does not exist on the Hugging Face Hub ({endpoint}); check \
         model.base_model_id (CLAAS_BASE_MODEL_ID)"
    )]
    NotFound { id: String, endpoint: String },
    #[error("downloading {what} of {id} from {endpoint}: {detail}")]
    Download {
        id: String,
        what: String,
        endpoint: String,
        detail: String,
    },
}

/// What [`fetch_if_missing`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fetched {
    /// Not a Hub id, already on disk, or offline: nothing was asked of the Hub.
    Nothing,
    /// These files were downloaded into the cache.
    Downloaded(Vec<String>),
}

/// Downloads `id` into the Hub cache when it is a Hub id (`org/name`) that is neither a
/// directory nor already cached. Paths, presets and cached models make no request.
pub async fn fetch_if_missing(
    id: &str,
    data_dir: &Path,
    hub: &HubSettings,
) -> Result<Fetched, HubError> {
    if !claas_trainer::resolve::is_hub_id(id)
        || claas_trainer::resolve::existing_model_dir(id, data_dir).is_some()
        || claas_trainer::resolve::hf_cache_snapshot_in(&hub.cache_dir, id).is_some()
        || hub.offline
    {
        return Ok(Fetched::Nothing);
    }
    download(id, hub).await.map(Fetched::Downloaded)
}

/// The files a process needs of a model that another service runs (Tinker): the chat
/// template and vocabulary.
const TOKENIZER_FILES: [&str; 2] = ["tokenizer.json", "tokenizer_config.json"];

/// The Hub cache's snapshot directory holding `id`'s tokenizer (`id` a Hub id), where
/// only [`TOKENIZER_FILES`] are fetched when missing, never the weights.
pub async fn fetch_tokenizer(id: &str, hub: &HubSettings) -> Result<PathBuf, HubError> {
    let cached = Cache::new(hub.cache_dir.clone()).model(id.to_string());
    if let Some(dir) = TOKENIZER_FILES
        .iter()
        .map(|f| cached.get(f))
        .collect::<Option<Vec<_>>>()
        .and_then(|paths| paths[0].parent().map(Path::to_path_buf))
    {
        return Ok(dir);
    }
    if hub.offline {
        return Err(failed(
            id,
            hub,
            "the tokenizer",
            "HF_HUB_OFFLINE is set and the Hub cache has no tokenizer.json for it".into(),
        ));
    }
    let fail = |what: &str, detail: String| failed(id, hub, what, detail);
    let repo = repo(id, hub, false)?;
    let mut dir = None;
    for file in TOKENIZER_FILES {
        let path = repo.get(file).await.map_err(|e| match status_of(&e) {
            Some(s @ (401 | 403)) => unauthorized(id, hub, s),
            Some(404) => not_found(id, hub),
            _ => fail(file, e.to_string()),
        })?;
        dir = path.parent().map(Path::to_path_buf);
    }
    dir.ok_or_else(|| fail("the tokenizer", "no snapshot directory".into()))
}

/// The Hub repository `id` through the cache, as `hub` says to reach it.
fn repo(id: &str, hub: &HubSettings, progress_bar: bool) -> Result<ApiRepo, HubError> {
    let mut builder = ApiBuilder::from_cache(Cache::new(hub.cache_dir.clone()))
        .with_endpoint(hub.endpoint.clone())
        .with_progress(progress_bar)
        .with_user_agent("claas-rs", env!("CARGO_PKG_VERSION"));
    if hub.token.is_some() {
        builder = builder.with_token(hub.token.clone());
    }
    let api = builder
        .build()
        .map_err(|e| failed(id, hub, "the client", e.to_string()))?;
    Ok(api.model(id.to_string()))
}

async fn download(id: &str, hub: &HubSettings) -> Result<Vec<String>, HubError> {
    let fail = |what: &str, detail: String| failed(id, hub, what, detail);
    let repo = repo(id, hub, hub.progress_bar)?;

    let files = checkpoint_files(&list(id, hub, &repo).await?);
    if !files.iter().any(|f| f == "config.json") {
        return Err(fail(
            "the file list",
            "the repository has no config.json: not a transformers checkpoint".into(),
        ));
    }
    tracing::info!(
        model = id,
        endpoint = %hub.endpoint,
        cache = %hub.cache_dir.display(),
        "downloading the base model: {}",
        files.join(", ")
    );
    for file in &files {
        let got = if hub.progress_bar {
            repo.download(file).await
        } else {
            repo.download_with_progress(file, LogLines::default()).await
        };
        got.map_err(|e| match status_of(&e) {
            Some(s @ (401 | 403)) => unauthorized(id, hub, s),
            _ => fail(file, e.to_string()),
        })?;
    }
    tracing::info!(model = id, "base model downloaded");
    Ok(files)
}

/// The repository's file list; the Hub's 401/403/404 become errors that say what to do.
async fn list(id: &str, hub: &HubSettings, repo: &ApiRepo) -> Result<RepoInfo, HubError> {
    let fail = |detail: String| failed(id, hub, "the file list", detail);
    let resp = repo
        .info_request()
        .send()
        .await
        .map_err(|e| fail(e.to_string()))?;
    let status = resp.status().as_u16();
    // Without a token the Hub answers 401 for a repository that does not exist, and says
    // which in `X-Error-Code`.
    let code = resp
        .headers()
        .get("x-error-code")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    match status {
        200..=299 => resp.json().await.map_err(|e| fail(e.to_string())),
        404 => Err(not_found(id, hub)),
        401 | 403 if code == "RepoNotFound" => Err(not_found(id, hub)),
        401 | 403 => Err(unauthorized(id, hub, status)),
        _ => Err(fail(format!("HTTP {status}"))),
    }
}

fn failed(id: &str, hub: &HubSettings, what: &str, detail: String) -> HubError {
    HubError::Download {
        id: id.into(),
        what: what.into(),
        endpoint: hub.endpoint.clone(),
        detail,
    }
}

fn not_found(id: &str, hub: &HubSettings) -> HubError {
    HubError::NotFound {
        id: id.into(),
        endpoint: hub.endpoint.clone(),
    }
}

fn unauthorized(id: &str, hub: &HubSettings, status: u16) -> HubError {
    HubError::Unauthorized {
        id: id.into(),
        endpoint: hub.endpoint.clone(),
        status,
        hint: if hub.token.is_some() {
            " (HF_TOKEN is set, but that token has no access)"
        } else {
            ""
        },
    }
}

fn status_of(e: &ApiError) -> Option<u16> {
    match e {
        ApiError::RequestError(e) => e.status().map(|s| s.as_u16()),
        _ => None,
    }
}

/// The top-level files a checkpoint needs, `config.json` last.
fn checkpoint_files(info: &RepoInfo) -> Vec<String> {
    let mut files: Vec<String> = info
        .siblings
        .iter()
        .map(|s| s.rfilename.clone())
        .filter(|f| {
            !f.contains('/')
                && f != "config.json"
                && [".json", ".safetensors", ".txt", ".jinja"]
                    .iter()
                    .any(|ext| f.ends_with(ext))
        })
        .collect();
    files.sort();
    if info.siblings.iter().any(|s| s.rfilename == "config.json") {
        files.push("config.json".into());
    }
    files
}

/// Progress as log lines (no terminal): the start of each file and every quarter of it.
#[derive(Clone, Default)]
struct LogLines {
    file: String,
    size: usize,
    done: usize,
    logged_quarter: usize,
}

impl Progress for LogLines {
    async fn init(&mut self, size: usize, filename: &str) {
        self.file = filename.to_string();
        self.size = size;
        tracing::info!(file = filename, bytes = size, "downloading");
    }

    async fn update(&mut self, size: usize) {
        self.done += size;
        let quarter = (self.done * 4).checked_div(self.size).unwrap_or(4);
        if quarter > self.logged_quarter && quarter < 4 {
            self.logged_quarter = quarter;
            tracing::info!(file = %self.file, "{}% downloaded", quarter * 25);
        }
    }

    async fn finish(&mut self) {
        tracing::info!(file = %self.file, bytes = self.size, "downloaded");
    }
}
