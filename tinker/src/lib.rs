//! An async client for Tinker's REST API (Thinking Machines' hosted LoRA training and
//! sampling), speaking the wire protocol of the official `tinker` 0.38.0 Python SDK as
//! `docs/tinker-wire.md` records it: the routes, the `X-API-Key` and idempotency headers, the
//! future protocol (submit, then poll `/api/v1/retrieve_future`), and protobuf for
//! forward_backward and for sample results.
//!
//! It owns the HTTP exchange and the process's session ([`Sessions`]: heartbeats, seq ids);
//! models, sampling sessions and checkpoint names are the caller's (the Tinker backend's). [`TinkerClient`] has one method per
//! call CLaaS makes; each future-returning call has a `submit_*` form that returns a
//! [`Pending`] handle and a plain form that also waits for the result.
//!
//! Failures are one [`Error`] that names the call and carries Tinker's message;
//! [`Error::is_retryable`] separates 5xx, timeouts and a future still pending at its deadline
//! (retryable) from a bad key, an unknown model or a malformed request (fatal).
//!
//! Layering: this crate may not depend on candle, `claas-trainer`, `claas-api` or
//! `claas-worker` (or `claas-core`: it needs no domain types). Its tests run against
//! `claas-fake-tinker`, which the real SDK is checked against in turn.

use std::time::Duration;

mod error;
mod futures;
mod http;
mod path;
mod proto;
mod results;
mod sampling;
mod session;
mod stats;
mod training;
mod types;

pub use error::{Error, Result};
pub use futures::{FutureResult, Pending, Polled};
pub use path::{CheckpointKind, TinkerPath};
pub use results::{CreateModelResponse, LoadWeightsResponse};
pub use session::{Seq, Sessions};
pub use stats::StatsSnapshot;
pub use types::{
    AdamParams, Datum, ForwardBackwardOutput, LossFn, ModelData, ModelInfo, OptimStepResponse,
    SampleResponse, SampledSequence, SamplerSource, SamplingParams, ServerCapabilities, Stop,
    StopReason, SupportedModel, TensorData,
};

/// Tinker's production endpoint (the SDK's default, `tinker/lib/base_url.py`).
pub const DEFAULT_BASE_URL: &str = "https://tinker.thinkingmachines.dev/services/tinker-prod";

/// The SDK release whose wire format this client speaks; sent as `sdk_version` where the SDK
/// sends its own.
pub const WIRE_SDK_VERSION: &str = "0.38.0";

/// How many times, and how patiently, a call is retried when the failure is retryable.
#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    /// Attempts per call, the first included (default 4). 1 turns retries off.
    pub max_attempts: u32,
    /// Delay before the first retry, doubled each time (default 500 ms, the SDK's).
    pub base_delay: Duration,
    /// Longest delay between attempts (default 10 s, the SDK's).
    pub max_delay: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 4,
            base_delay: Duration::from_millis(500),
            max_delay: Duration::from_secs(10),
        }
    }
}

impl RetryPolicy {
    /// The delay before retry number `retry` (1 for the first).
    pub(crate) fn delay(&self, retry: u32) -> Duration {
        let factor = 2u32.saturating_pow(retry.saturating_sub(1));
        self.base_delay.saturating_mul(factor).min(self.max_delay)
    }
}

/// Where Tinker is and how to talk to it.
#[derive(Debug, Clone)]
pub struct Config {
    /// `TINKER_BASE_URL`, default [`DEFAULT_BASE_URL`]; a trailing `/` is dropped.
    pub base_url: String,
    /// `TINKER_API_KEY`, else `CLAAS_TINKER_API_KEY`; sent raw in `X-API-Key`.
    pub api_key: String,
    /// Per HTTP request (default 60 s, the SDK's).
    pub request_timeout: Duration,
    /// Per connection (default 5 s, the SDK's).
    pub connect_timeout: Duration,
    /// Longest one `retrieve_future` poll may be held (default 45 s, the SDK's).
    pub poll_timeout: Duration,
    /// How long to wait for a future before giving up with a retryable
    /// [`Error::FutureTimeout`] (default 10 min; the SDK waits for ever).
    pub future_deadline: Duration,
    pub retry: RetryPolicy,
}

impl Config {
    /// A config with the SDK's timeouts for `base_url` and `api_key`.
    pub fn new(base_url: impl Into<String>, api_key: impl Into<String>) -> Config {
        let base_url: String = base_url.into();
        Config {
            base_url: base_url.trim_end_matches('/').to_owned(),
            api_key: api_key.into(),
            request_timeout: Duration::from_secs(60),
            connect_timeout: Duration::from_secs(5),
            poll_timeout: Duration::from_secs(45),
            future_deadline: Duration::from_secs(600),
            retry: RetryPolicy::default(),
        }
    }

    /// The config the environment gives: `TINKER_BASE_URL` (empty counts as unset) and the
    /// key from `TINKER_API_KEY`, else `CLAAS_TINKER_API_KEY`. No key is
    /// [`Error::MissingApiKey`].
    pub fn from_env() -> Result<Config> {
        Config::from_vars(|name| std::env::var(name).ok())
    }

    /// As [`Config::from_env`] with `lookup` for the environment (tests pass a fixed one).
    pub fn from_vars(lookup: impl Fn(&str) -> Option<String>) -> Result<Config> {
        let var = |name: &str| lookup(name).filter(|v| !v.trim().is_empty());
        let api_key = var("TINKER_API_KEY")
            .or_else(|| var("CLAAS_TINKER_API_KEY"))
            .ok_or(Error::MissingApiKey)?;
        let base_url = var("TINKER_BASE_URL").unwrap_or_else(|| DEFAULT_BASE_URL.to_owned());
        Ok(Config::new(base_url, api_key))
    }
}

/// A connection to Tinker. Cheap to clone; clones share one connection pool.
#[derive(Debug, Clone)]
pub struct TinkerClient {
    http: reqwest::Client,
    config: Config,
    stats: std::sync::Arc<stats::CallStats>,
}

impl TinkerClient {
    /// A client for `config`; an empty key is [`Error::MissingApiKey`].
    pub fn new(config: Config) -> Result<TinkerClient> {
        if config.api_key.trim().is_empty() {
            return Err(Error::MissingApiKey);
        }
        if !(config.base_url.starts_with("http://") || config.base_url.starts_with("https://")) {
            let msg = format!("base URL {:?} is not http(s)", config.base_url);
            return Err(Error::Config(msg));
        }
        let http = reqwest::Client::builder()
            .connect_timeout(config.connect_timeout)
            .user_agent(concat!("claas-tinker/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| Error::Config(format!("HTTP client: {e}")))?;
        let stats = Default::default();
        Ok(TinkerClient {
            http,
            config,
            stats,
        })
    }

    /// A client configured from the environment ([`Config::from_env`]).
    pub fn from_env() -> Result<TinkerClient> {
        TinkerClient::new(Config::from_env()?)
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The requests this client and its clones have in flight and have sent.
    pub fn stats(&self) -> StatsSnapshot {
        self.stats.snapshot()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_delays_double_up_to_the_cap() {
        let p = RetryPolicy::default();
        let delays: Vec<u64> = (1..=7).map(|n| p.delay(n).as_millis() as u64).collect();
        assert_eq!(delays, [500, 1000, 2000, 4000, 8000, 10000, 10000]);
    }

    #[test]
    fn an_empty_key_is_a_missing_key_and_a_trailing_slash_is_dropped() {
        let err = TinkerClient::new(Config::new("http://x", " ")).err();
        assert!(matches!(err, Some(Error::MissingApiKey)), "{err:?}");
        assert_eq!(Config::new("http://x/base/", "k").base_url, "http://x/base");
    }
}
