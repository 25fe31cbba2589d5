//! The local vLLM as the worker drives it around a training step (research notes
//! `vllm-api.md`): drain by polling `/metrics`, `POST /sleep?level=N`, `POST /wake_up` (by
//! tags where supported), and runtime LoRA (un)loading. Accepts the empty 200 bodies of
//! vLLM ≤ 0.31 and the JSON ones of ≥ 0.32.

use std::time::{Duration, Instant};

use crate::executor::{PhaseError, PhaseResult};

#[derive(Debug, Clone)]
pub struct VllmClient {
    base: String,
    api_key: Option<String>,
    http: reqwest::Client,
}

/// Sums every sample of the gauge `name` (all label sets), matching the name exactly: the
/// reference's prefix match also counted `vllm:num_requests_waiting_by_reason`.
pub fn gauge_sum(metrics: &str, name: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let rest = l.strip_prefix(name)?;
            let value = if let Some(labels) = rest.strip_prefix('{') {
                labels.split_once('}')?.1
            } else if rest.starts_with(' ') {
                rest
            } else {
                return None;
            };
            value.split_whitespace().next()?.parse::<f64>().ok()
        })
        .sum()
}

fn unavailable(what: &str, e: impl std::fmt::Display) -> PhaseError {
    PhaseError::retryable("vllm_unavailable", format!("{what}: {e}"))
}

impl VllmClient {
    pub fn new(base: &str, api_key: Option<String>) -> Self {
        VllmClient {
            base: base.trim_end_matches('/').to_string(),
            api_key,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(300))
                .build()
                .unwrap_or_default(),
        }
    }

    pub fn base_url(&self) -> &str {
        &self.base
    }

    fn post(&self, path: &str) -> reqwest::RequestBuilder {
        let req = self.http.post(format!("{}{path}", self.base));
        match &self.api_key {
            Some(k) => req.bearer_auth(k),
            None => req,
        }
    }

    async fn check(what: &str, resp: reqwest::Response) -> PhaseResult<String> {
        let status = resp.status();
        let body = resp.text().await.unwrap_or_default();
        if status.is_success() {
            return Ok(body);
        }
        let msg = format!("{what}: vLLM answered {status}: {}", body.trim());
        Err(if status.is_server_error() {
            PhaseError::retryable("vllm_error", msg)
        } else {
            PhaseError::fatal("vllm_rejected", msg)
        })
    }

    /// Whether vLLM answers `GET /health` with 200 within two seconds; the reason if not.
    pub async fn healthy(&self) -> Result<(), String> {
        let resp = self
            .http
            .get(format!("{}/health", self.base))
            .timeout(Duration::from_secs(2))
            .send()
            .await
            .map_err(|e| format!("vLLM at {} is unreachable: {e}", self.base))?;
        if resp.status().is_success() {
            Ok(())
        } else {
            Err(format!(
                "vLLM at {} is not healthy: {}",
                self.base,
                resp.status()
            ))
        }
    }

    /// Running and waiting requests, summed over engines and models.
    pub async fn load(&self) -> PhaseResult<(f64, f64)> {
        let text = self
            .http
            .get(format!("{}/metrics", self.base))
            .send()
            .await
            .map_err(|e| unavailable("GET /metrics", e))?;
        let text = Self::check("GET /metrics", text).await?;
        Ok((
            gauge_sum(&text, "vllm:num_requests_running"),
            gauge_sum(&text, "vllm:num_requests_waiting"),
        ))
    }

    /// Polls until nothing runs or waits; a timeout fails the phase (retryable) without
    /// touching vLLM.
    pub async fn drain(&self, timeout: Duration, every: Duration) -> PhaseResult<()> {
        let started = Instant::now();
        loop {
            let (running, waiting) = self.load().await?;
            if running == 0.0 && waiting == 0.0 {
                return Ok(());
            }
            if started.elapsed() >= timeout {
                return Err(PhaseError::retryable(
                    "drain_timeout",
                    format!(
                        "vLLM still had {running} running and {waiting} waiting requests after {:.0} s",
                        timeout.as_secs_f64()
                    ),
                ));
            }
            tokio::time::sleep(every).await;
        }
    }

    /// A `POST` with no body whose answer only has to succeed (sleep, wake, pause, resume).
    async fn post_empty(&self, path_and_query: &str) -> PhaseResult<()> {
        let what = format!("POST {path_and_query}");
        let resp = self
            .post(path_and_query)
            .send()
            .await
            .map_err(|e| unavailable(&what, e))?;
        Self::check(&what, resp).await.map(|_| ())
    }

    pub async fn sleep(&self, level: u8) -> PhaseResult<()> {
        self.post_empty(&format!("/sleep?level={level}")).await
    }

    /// `POST /wake_up`, for the given tags only (`weights`, `kv_cache`) or everything.
    pub async fn wake(&self, tags: &[&str]) -> PhaseResult<()> {
        let query: String = tags
            .iter()
            .enumerate()
            .map(|(i, t)| format!("{}tags={t}", if i == 0 { "?" } else { "&" }))
            .collect();
        self.post_empty(&format!("/wake_up{query}")).await
    }

    /// `POST /pause`: stops generation (frees no GPU memory).
    pub async fn pause(&self) -> PhaseResult<()> {
        self.post_empty("/pause").await
    }

    /// `POST /resume`.
    pub async fn resume(&self) -> PhaseResult<()> {
        self.post_empty("/resume").await
    }

    /// Loaded adapters as (name, path), from `/v1/models` (cards with a `parent`).
    pub async fn adapters(&self) -> PhaseResult<Vec<(String, String)>> {
        let what = "GET /v1/models";
        let mut req = self.http.get(format!("{}/v1/models", self.base));
        if let Some(k) = &self.api_key {
            req = req.bearer_auth(k);
        }
        let resp = req.send().await.map_err(|e| unavailable(what, e))?;
        let body = Self::check(what, resp).await?;
        let v: serde_json::Value = serde_json::from_str(&body)
            .map_err(|e| PhaseError::retryable("vllm_error", format!("{what}: {e}")))?;
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

    /// Removes the adapter name from vLLM; an adapter that is not loaded is fine.
    pub async fn unload_adapter(&self, name: &str) -> PhaseResult<()> {
        let what = "POST /v1/unload_lora_adapter";
        let resp = self
            .post("/v1/unload_lora_adapter")
            .json(&serde_json::json!({ "lora_name": name }))
            .send()
            .await
            .map_err(|e| unavailable(what, e))?;
        if resp.status() == reqwest::StatusCode::NOT_FOUND {
            return Ok(());
        }
        Self::check(what, resp).await.map(|_| ())
    }

    /// Loads `path` under `name`; `inplace` swaps an already-loaded adapter without a gap.
    pub async fn load_adapter(&self, name: &str, path: &str, inplace: bool) -> PhaseResult<()> {
        let what = "POST /v1/load_lora_adapter";
        let mut body = serde_json::json!({ "lora_name": name, "lora_path": path });
        if inplace {
            body["load_inplace"] = true.into();
        }
        let resp = self
            .post("/v1/load_lora_adapter")
            .json(&body)
            .send()
            .await
            .map_err(|e| unavailable(what, e))?;
        Self::check(what, resp).await.map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::gauge_sum;

    #[test]
    fn gauges_are_summed_over_label_sets_and_matched_exactly() {
        let text = "# HELP vllm:num_requests_waiting x\n\
# TYPE vllm:num_requests_waiting gauge\n\
vllm:num_requests_waiting{engine=\"0\",model_name=\"m\"} 2.0\n\
vllm:num_requests_waiting{engine=\"1\",model_name=\"m\"} 1.0\n\
vllm:num_requests_waiting_by_reason{engine=\"0\",model_name=\"m\",reason=\"capacity\"} 2.0\n\
vllm:num_requests_running 4\n";
        assert_eq!(gauge_sum(text, "vllm:num_requests_waiting"), 3.0);
        assert_eq!(gauge_sum(text, "vllm:num_requests_running"), 4.0);
        assert_eq!(gauge_sum(text, "vllm:kv_cache_usage_perc"), 0.0);
    }
}
