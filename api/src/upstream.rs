//! The vLLMs the API proxies inference to: the one vLLM client (`claas_core::vllm`, shared
//! with the worker) under the API's names, what its errors mean to a client, and the
//! fleet's list of backends.

use std::time::Duration;

use sha2::Digest;

use crate::error::ApiError;

pub use claas_core::vllm::{
    Vllm as Upstream, VllmError as UpstreamError, VllmStatus as UpstreamStatus,
};

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

/// Loads adapter `name` from `path` into `up` (in place of a loaded one when `inplace`);
/// a name vLLM already holds counts as loaded: the API loads only a LoRA's current version.
pub async fn load_lora(
    up: &Upstream,
    name: &str,
    path: &str,
    inplace: bool,
) -> Result<(), UpstreamError> {
    match up.load_adapter(name, path, inplace).await {
        Err(UpstreamError::Status(s)) if s.is_already_loaded() => Ok(()),
        other => other,
    }
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
