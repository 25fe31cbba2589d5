//! The one vLLM HTTP client, for the API's proxy and the worker's control alike: requests
//! with vLLM's bearer key, its error answers kept whole, and the calls both sides make
//! (`/tokenize`, `/v1/models`, runtime LoRA loading, `/metrics`, sleep and wake). What an
//! error means is the caller's to decide: the API passes vLLM's client errors on, the
//! worker turns them into phase errors. Wire formats: research notes `vllm-api.md`; the
//! empty 200 bodies of vLLM ≤ 0.31 and the JSON ones of ≥ 0.32 are both accepted.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{json, Value};

/// An OpenAI-compatible vLLM server.
#[derive(Clone, Debug)]
pub struct Vllm {
    http: reqwest::Client,
    base_url: String,
    api_key: Option<String>,
}

/// A non-2xx answer from vLLM, kept whole so a client can see vLLM's own error.
#[derive(Debug)]
pub struct VllmStatus {
    pub status: StatusCode,
    pub body: Vec<u8>,
}

impl VllmStatus {
    pub fn json(&self) -> Option<Value> {
        serde_json::from_slice(&self.body).ok()
    }

    /// vLLM's "The model `x` does not exist." (404, `param: model`).
    pub fn is_unknown_model(&self) -> bool {
        self.status == StatusCode::NOT_FOUND
            && self.json().is_some_and(|v| {
                v["error"]["param"] == "model"
                    || v["error"]["message"]
                        .as_str()
                        .is_some_and(|m| m.contains("does not exist"))
            })
    }

    /// vLLM 0.15's 400 for loading a name that is already loaded.
    pub fn is_already_loaded(&self) -> bool {
        self.status == StatusCode::BAD_REQUEST
            && String::from_utf8_lossy(&self.body).contains("already been loaded")
    }
}

#[derive(Debug)]
pub enum VllmError {
    /// vLLM could not be reached or broke the connection.
    Unreachable(String),
    /// vLLM answered with an error status.
    Status(VllmStatus),
}

impl std::fmt::Display for VllmError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            VllmError::Unreachable(m) => write!(f, "vLLM is unreachable: {m}"),
            VllmError::Status(s) => write!(
                f,
                "vLLM answered {}: {}",
                s.status,
                String::from_utf8_lossy(&s.body).trim()
            ),
        }
    }
}

pub type VllmResult<T> = Result<T, VllmError>;

impl Vllm {
    /// A client for the vLLM at `base_url`; `read_timeout` bounds each wait for bytes.
    pub fn new(base_url: &str, api_key: Option<String>, read_timeout: Duration) -> Vllm {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .read_timeout(read_timeout)
            .build()
            .unwrap_or_default();
        Vllm {
            http,
            base_url: base_url.trim_end_matches('/').to_owned(),
            api_key,
        }
    }

    pub fn base_url(&self) -> &str {
        &self.base_url
    }

    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let r = self
            .http
            .request(method, format!("{}{path}", self.base_url));
        match &self.api_key {
            Some(k) => r.bearer_auth(k),
            None => r,
        }
    }

    async fn send(&self, req: reqwest::RequestBuilder) -> VllmResult<reqwest::Response> {
        let resp = req
            .send()
            .await
            .map_err(|e| VllmError::Unreachable(e.to_string()))?;
        let status = resp.status();
        if status.is_success() {
            return Ok(resp);
        }
        let body = resp
            .bytes()
            .await
            .map_err(|e| VllmError::Unreachable(e.to_string()))?;
        Err(VllmError::Status(VllmStatus {
            status,
            body: body.to_vec(),
        }))
    }

    /// Sends `body` and returns the response when it is 2xx (its body not yet read).
    pub async fn post(&self, path: &str, body: &Value) -> VllmResult<reqwest::Response> {
        self.send(self.request(reqwest::Method::POST, path).json(body))
            .await
    }

    pub async fn get(&self, path: &str) -> VllmResult<reqwest::Response> {
        self.send(self.request(reqwest::Method::GET, path)).await
    }

    /// POST and parse the JSON answer.
    pub async fn post_json(&self, path: &str, body: &Value) -> VllmResult<Value> {
        self.post(path, body)
            .await?
            .json()
            .await
            .map_err(|e| VllmError::Unreachable(format!("unreadable answer from {path}: {e}")))
    }

    /// A `POST` with no body whose answer only has to succeed (sleep, wake, pause, resume).
    async fn post_empty(&self, path_and_query: &str) -> VllmResult<()> {
        self.send(self.request(reqwest::Method::POST, path_and_query))
            .await
            .map(|_| ())
    }

    /// Token ids vLLM's `/tokenize` gives for `body` (chat or prompt form).
    pub async fn tokenize(&self, body: &Value) -> VllmResult<Vec<u32>> {
        let v = self.post_json("/tokenize", body).await?;
        Ok(v["tokens"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(Value::as_u64)
                    .map(|i| i as u32)
                    .collect()
            })
            .unwrap_or_default())
    }

    /// Whether vLLM answers `GET /health` with 200 within two seconds; the reason if not.
    pub async fn healthy(&self) -> Result<(), String> {
        let req = self
            .request(reqwest::Method::GET, "/health")
            .timeout(Duration::from_secs(2));
        match self.send(req).await {
            Ok(_) => Ok(()),
            Err(VllmError::Unreachable(e)) => {
                Err(format!("vLLM at {} is unreachable: {e}", self.base_url))
            }
            Err(VllmError::Status(s)) => Err(format!(
                "vLLM at {} is not healthy: {}",
                self.base_url, s.status
            )),
        }
    }

    /// The Prometheus text of `/metrics`.
    pub async fn metrics(&self) -> VllmResult<String> {
        self.get("/metrics")
            .await?
            .text()
            .await
            .map_err(|e| VllmError::Unreachable(format!("unreadable /metrics: {e}")))
    }

    pub async fn sleep(&self, level: u8) -> VllmResult<()> {
        self.post_empty(&format!("/sleep?level={level}")).await
    }

    /// `POST /wake_up`, for the given tags only (`weights`, `kv_cache`) or everything.
    pub async fn wake(&self, tags: &[&str]) -> VllmResult<()> {
        let query: String = tags
            .iter()
            .enumerate()
            .map(|(i, t)| format!("{}tags={t}", if i == 0 { "?" } else { "&" }))
            .collect();
        self.post_empty(&format!("/wake_up{query}")).await
    }

    /// `POST /pause`: stops generation (frees no GPU memory).
    pub async fn pause(&self) -> VllmResult<()> {
        self.post_empty("/pause").await
    }

    /// `POST /resume`.
    pub async fn resume(&self) -> VllmResult<()> {
        self.post_empty("/resume").await
    }

    /// Loaded adapters as (name, path), from `/v1/models` (the cards with a `parent`).
    pub async fn adapters(&self) -> VllmResult<Vec<(String, String)>> {
        let v: Value = self
            .get("/v1/models")
            .await?
            .json()
            .await
            .map_err(|e| VllmError::Unreachable(format!("unreadable /v1/models: {e}")))?;
        Ok(v["data"]
            .as_array()
            .map(|cards| {
                cards
                    .iter()
                    .filter(|c| !c["parent"].is_null())
                    .filter_map(|c| {
                        Some((c["id"].as_str()?.to_owned(), c["root"].as_str()?.to_owned()))
                    })
                    .collect()
            })
            .unwrap_or_default())
    }

    /// Removes adapter `name`; one that is not loaded is fine.
    pub async fn unload_adapter(&self, name: &str) -> VllmResult<()> {
        match self
            .post("/v1/unload_lora_adapter", &json!({ "lora_name": name }))
            .await
        {
            Err(VllmError::Status(s)) if s.status == StatusCode::NOT_FOUND => Ok(()),
            other => other.map(|_| ()),
        }
    }

    /// Loads `path` under `name`; `inplace` swaps an already-loaded adapter without a gap.
    /// Loading a name that is already loaded is vLLM's error (see
    /// [`VllmStatus::is_already_loaded`]): whether that is fine is the caller's call.
    pub async fn load_adapter(&self, name: &str, path: &str, inplace: bool) -> VllmResult<()> {
        let mut body = json!({ "lora_name": name, "lora_path": path });
        if inplace {
            body["load_inplace"] = true.into();
        }
        self.post("/v1/load_lora_adapter", &body).await.map(|_| ())
    }
}
