//! The vLLM the API proxies inference to: requests, its error bodies, and re-loading an
//! adapter it does not know (a vLLM that restarted, or a node that never served it).

use std::time::Duration;

use axum::http::StatusCode;
use serde_json::{json, Value};
use sha2::Digest;

use crate::error::ApiError;

/// An OpenAI-compatible vLLM server.
#[derive(Clone, Debug)]
pub struct Upstream {
    client: reqwest::Client,
    base_url: String,
    api_key: Option<String>,
}

/// A non-2xx answer from vLLM, kept whole so the client sees vLLM's own error.
#[derive(Debug)]
pub struct UpstreamStatus {
    pub status: StatusCode,
    pub body: axum::body::Bytes,
}

impl UpstreamStatus {
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
}

pub enum UpstreamError {
    /// vLLM could not be reached or broke the connection.
    Unreachable(String),
    /// vLLM answered with an error status.
    Status(UpstreamStatus),
}

impl From<UpstreamError> for ApiError {
    fn from(e: UpstreamError) -> ApiError {
        match e {
            UpstreamError::Unreachable(m) => ApiError::upstream_unreachable(m),
            UpstreamError::Status(s) => {
                let message = s
                    .json()
                    .and_then(|v| {
                        v["error"]["message"]
                            .as_str()
                            .or(v["error"].as_str())
                            .or(v["detail"].as_str())
                            .map(str::to_owned)
                    })
                    .unwrap_or_else(|| String::from_utf8_lossy(&s.body).into_owned());
                ApiError::upstream_answered(s.status.as_u16(), message)
            }
        }
    }
}

impl Upstream {
    pub fn new(base_url: &str, api_key: Option<String>, timeout: Duration) -> Upstream {
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .read_timeout(timeout)
            .build()
            .unwrap_or_default();
        Upstream {
            client,
            base_url: base_url.trim_end_matches('/').to_owned(),
            api_key,
        }
    }

    pub fn base_url(&self) -> &str {
        &self.base_url
    }

    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let r = self
            .client
            .request(method, format!("{}{path}", self.base_url));
        match &self.api_key {
            Some(k) => r.bearer_auth(k),
            None => r,
        }
    }

    /// Sends `body` and returns the response when it is 2xx (its body not yet read).
    pub async fn post(&self, path: &str, body: &Value) -> Result<reqwest::Response, UpstreamError> {
        let resp = self
            .request(reqwest::Method::POST, path)
            .json(body)
            .send()
            .await
            .map_err(|e| UpstreamError::Unreachable(e.to_string()))?;
        check(resp).await
    }

    pub async fn get(&self, path: &str) -> Result<reqwest::Response, UpstreamError> {
        let resp = self
            .request(reqwest::Method::GET, path)
            .send()
            .await
            .map_err(|e| UpstreamError::Unreachable(e.to_string()))?;
        check(resp).await
    }

    /// POST and parse the JSON answer.
    pub async fn post_json(&self, path: &str, body: &Value) -> Result<Value, UpstreamError> {
        let resp = self.post(path, body).await?;
        resp.json()
            .await
            .map_err(|e| UpstreamError::Unreachable(format!("unreadable answer from {path}: {e}")))
    }

    /// Token ids vLLM's `/tokenize` gives for `body` (chat or prompt form).
    pub async fn tokenize(&self, body: &Value) -> Result<Vec<u32>, UpstreamError> {
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

    /// Unloads adapter `name`; one that is not loaded is fine.
    pub async fn unload_lora(&self, name: &str) -> Result<(), UpstreamError> {
        match self
            .post("/v1/unload_lora_adapter", &json!({"lora_name": name}))
            .await
        {
            Ok(_) => Ok(()),
            Err(UpstreamError::Status(s)) if s.status == StatusCode::NOT_FOUND => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Loads adapter `name` from `path`; "already loaded" counts as success.
    pub async fn load_lora(&self, name: &str, path: &str) -> Result<(), UpstreamError> {
        self.load_lora_at(name, path, false).await
    }

    /// Loads adapter `name` from `path`, in place of a loaded one when `inplace`.
    pub async fn load_lora_at(
        &self,
        name: &str,
        path: &str,
        inplace: bool,
    ) -> Result<(), UpstreamError> {
        let body = json!({"lora_name": name, "lora_path": path, "load_inplace": inplace});
        match self.post("/v1/load_lora_adapter", &body).await {
            Ok(_) => Ok(()),
            Err(UpstreamError::Status(s))
                if s.status == StatusCode::BAD_REQUEST
                    && String::from_utf8_lossy(&s.body).contains("already been loaded") =>
            {
                Ok(())
            }
            Err(e) => Err(e),
        }
    }
}

async fn check(resp: reqwest::Response) -> Result<reqwest::Response, UpstreamError> {
    let status = StatusCode::from_u16(resp.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
    if status.is_success() {
        return Ok(resp);
    }
    let body = resp
        .bytes()
        .await
        .map_err(|e| UpstreamError::Unreachable(e.to_string()))?;
    Err(UpstreamError::Status(UpstreamStatus { status, body }))
}

/// The vLLMs inference can go to, one per GPU node. A request goes to a backend whose
/// worker is not draining or sleeping it (the `workers` table), preferring the same
/// backend for the same model (its adapter is already loaded there); when none is
/// available it waits up to `wait`, then answers 503 with `Retry-After`.
pub struct Backends {
    list: Vec<Upstream>,
    wait: Duration,
    poll: Duration,
}

/// Worker states in which its vLLM must not be sent requests.
const UNAVAILABLE_STATES: [&str; 2] = ["draining", "sleeping"];

/// The backend a model's requests go to while it is available (so its adapter stays
/// loaded in one vLLM's slots); the next ones in order take over while it is not.
pub fn preferred_backend(model: &str, backends: usize) -> usize {
    let digest = sha2::Sha256::digest(model.as_bytes());
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    (u64::from_le_bytes(first) % backends.max(1) as u64) as usize
}

fn same_url(a: &str, b: &str) -> bool {
    a.trim_end_matches('/') == b.trim_end_matches('/')
}

impl Backends {
    pub fn new(list: Vec<Upstream>, wait: Duration) -> Backends {
        Backends {
            list,
            wait,
            poll: Duration::from_millis(100),
        }
    }

    pub fn all(&self) -> &[Upstream] {
        &self.list
    }

    /// Indexes of backends no worker has taken out of service.
    async fn available(&self, store: &claas_core::queue::SharedStore) -> Vec<usize> {
        let workers = match store.list_workers().await {
            Ok(w) => w,
            Err(e) => {
                // Without the table, routing blind beats refusing every request.
                tracing::warn!(error = %e, "cannot read worker states; routing to every backend");
                return (0..self.list.len()).collect();
            }
        };
        (0..self.list.len())
            .filter(|&i| {
                !workers.iter().any(|w| {
                    UNAVAILABLE_STATES.contains(&w.state.as_str())
                        && w.vllm_url
                            .as_deref()
                            .is_some_and(|u| same_url(u, self.list[i].base_url()))
                })
            })
            .collect()
    }

    /// A backend to send a request for `model` to.
    pub async fn pick(
        &self,
        store: &claas_core::queue::SharedStore,
        model: &str,
    ) -> Result<Upstream, ApiError> {
        if self.list.len() == 1 && self.wait.is_zero() {
            return Ok(self.list[0].clone());
        }
        let start = preferred_backend(model, self.list.len());
        let deadline = tokio::time::Instant::now() + self.wait;
        loop {
            let available = self.available(store).await;
            let n = self.list.len();
            if let Some(i) = (0..n)
                .map(|k| (start + k) % n)
                .find(|i| available.contains(i))
            {
                return Ok(self.list[i].clone());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(ApiError::backends_busy(self.wait).with_retry_after(5));
            }
            tokio::time::sleep(self.poll).await;
        }
    }
}
