//! The local vLLM as the worker drives it around a training step, through the one vLLM
//! client (`claas_core::vllm`): drain by polling `/metrics`, sleep, wake (by tags where
//! supported), pause, resume and runtime LoRA (un)loading, each failure a phase error
//! (vLLM unreachable or failing: retryable; vLLM refusing: fatal).

use std::time::{Duration, Instant};

use claas_core::vllm::{Vllm, VllmError};

use crate::executor::{PhaseError, PhaseResult};

#[derive(Debug, Clone)]
pub struct VllmClient {
    vllm: Vllm,
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

/// `what` failed: why, as the phase's error.
fn phase_error(what: &str, e: VllmError) -> PhaseError {
    match &e {
        VllmError::Unreachable(_) => {
            PhaseError::retryable("vllm_unavailable", format!("{what}: {e}"))
        }
        VllmError::Status(s) if s.status.is_server_error() => {
            PhaseError::retryable("vllm_error", format!("{what}: {e}"))
        }
        VllmError::Status(_) => PhaseError::fatal("vllm_rejected", format!("{what}: {e}")),
    }
}

impl VllmClient {
    pub fn new(base: &str, api_key: Option<String>) -> Self {
        // Sleep and wake move the weights between host and GPU: minutes on a large model.
        VllmClient {
            vllm: Vllm::new(base, api_key, Duration::from_secs(300)),
        }
    }

    pub fn base_url(&self) -> &str {
        self.vllm.base_url()
    }

    /// Whether vLLM answers `GET /health` with 200 within two seconds; the reason if not.
    pub async fn healthy(&self) -> Result<(), String> {
        self.vllm.healthy().await
    }

    /// Running and waiting requests, summed over engines and models.
    pub async fn load(&self) -> PhaseResult<(f64, f64)> {
        let text = (self.vllm.metrics().await).map_err(|e| phase_error("GET /metrics", e))?;
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

    pub async fn sleep(&self, level: u8) -> PhaseResult<()> {
        let what = format!("POST /sleep?level={level}");
        self.vllm
            .sleep(level)
            .await
            .map_err(|e| phase_error(&what, e))
    }

    /// `POST /wake_up`, for the given tags only (`weights`, `kv_cache`) or everything.
    pub async fn wake(&self, tags: &[&str]) -> PhaseResult<()> {
        let what = match tags {
            [] => "POST /wake_up".to_string(),
            _ => format!("POST /wake_up?tags={}", tags.join("&tags=")),
        };
        self.vllm
            .wake(tags)
            .await
            .map_err(|e| phase_error(&what, e))
    }

    /// `POST /pause`: stops generation (frees no GPU memory).
    pub async fn pause(&self) -> PhaseResult<()> {
        self.vllm
            .pause()
            .await
            .map_err(|e| phase_error("POST /pause", e))
    }

    /// `POST /resume`.
    pub async fn resume(&self) -> PhaseResult<()> {
        self.vllm
            .resume()
            .await
            .map_err(|e| phase_error("POST /resume", e))
    }

    /// Loaded adapters as (name, path), from `/v1/models` (cards with a `parent`).
    pub async fn adapters(&self) -> PhaseResult<Vec<(String, String)>> {
        self.vllm
            .adapters()
            .await
            .map_err(|e| phase_error("GET /v1/models", e))
    }

    /// Removes the adapter name from vLLM; an adapter that is not loaded is fine.
    pub async fn unload_adapter(&self, name: &str) -> PhaseResult<()> {
        (self.vllm.unload_adapter(name).await)
            .map_err(|e| phase_error("POST /v1/unload_lora_adapter", e))
    }

    /// Loads `path` under `name`; `inplace` swaps an already-loaded adapter without a gap.
    pub async fn load_adapter(&self, name: &str, path: &str, inplace: bool) -> PhaseResult<()> {
        (self.vllm.load_adapter(name, path, inplace).await)
            .map_err(|e| phase_error("POST /v1/load_lora_adapter", e))
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
