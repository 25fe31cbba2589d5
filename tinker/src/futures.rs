//! The future protocol (§4): a submit answers a handle (`request_id`); the result is polled
//! from `POST /api/v1/retrieve_future`, which answers the result, `{"type": "try_again"}`
//! (pending: poll again at once, since the server long-polls), or `{"error", "category"}`.
//! Statuses on the poll follow the SDK (§4.4): 408 polls again; 5xx, 429 and connection
//! errors back off (the SDK polls again at once on a 5xx), 410 means the future is gone, a 400 is retried three times, any other
//! 4xx is fatal. Unlike the SDK, polling stops at [`crate::Config::future_deadline`] with a
//! retryable [`Error::FutureTimeout`].

use std::marker::PhantomData;
use std::time::{Duration, Instant};

use reqwest::header::{ACCEPT, CONTENT_TYPE};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::error::{message_from_body, Error, Result};
use crate::http::{decode_json, PROTOBUF};
use crate::TinkerClient;

/// A submitted call whose result is still to be read with [`TinkerClient::wait`].
#[derive(Debug, Clone, PartialEq)]
pub struct Pending<T> {
    pub request_id: String,
    /// The model the server says the request belongs to, if it said.
    pub model_id: Option<String>,
    /// One id per requested sample (`asample` only).
    pub sample_sequence_ids: Vec<String>,
    call: &'static str,
    /// `X-Tinker-Request-Type` (`CreateModel`, `ForwardBackward`, …).
    request_type: &'static str,
    result: PhantomData<fn() -> T>,
}

/// The handle every future route answers (`UntypedAPIFuture`, §4.1).
#[derive(Deserialize)]
pub(crate) struct Handle {
    request_id: String,
    #[serde(default)]
    model_id: Option<String>,
    #[serde(default)]
    sample_sequence_ids: Option<Vec<String>>,
}

impl<T> Pending<T> {
    pub(crate) fn new(handle: Handle, call: &'static str, request_type: &'static str) -> Self {
        Pending {
            request_id: handle.request_id,
            model_id: handle.model_id,
            sample_sequence_ids: handle.sample_sequence_ids.unwrap_or_default(),
            call,
            request_type,
            result: PhantomData,
        }
    }
}

/// A finished future's body.
pub enum Polled {
    Json(Value),
    Proto(Vec<u8>),
}

/// A type a future resolves to.
pub trait FutureResult: Sized {
    /// Whether the result travels as protobuf (asked for with `Accept`).
    const PROTO: bool = false;
    fn decode(body: Polled) -> std::result::Result<Self, String>;
}

/// What one poll learned.
enum Poll {
    Done(Polled),
    Pending,
    /// Poll again after this long (429, connection errors).
    Backoff(Duration),
}

/// Bare 400s tolerated on one future before it fails (the SDK's `_MAX_BAD_REQUEST_RETRIES`).
const MAX_BAD_REQUESTS: u32 = 3;
/// Back-off cap for 429s and connection errors (the SDK's).
const MAX_BACKOFF: Duration = Duration::from_secs(30);

impl TinkerClient {
    /// Polls `pending` until it finishes, fails, or [`crate::Config::future_deadline`] passes.
    pub async fn wait<T: FutureResult>(&self, pending: &Pending<T>) -> Result<T> {
        let call = pending.call;
        let start = Instant::now();
        let deadline = start + self.config.future_deadline;
        let (mut iteration, mut bad_requests, mut backoffs) = (0u32, 0u32, 0u32);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                let request_id = pending.request_id.clone();
                let waited = start.elapsed();
                return Err(Error::FutureTimeout {
                    call,
                    request_id,
                    waited,
                });
            }
            match self
                .poll_once(pending, iteration, left, T::PROTO, &mut bad_requests)
                .await?
            {
                Poll::Done(body) => {
                    return T::decode(body).map_err(|message| Error::Decode { call, message })
                }
                Poll::Pending => backoffs = 0,
                Poll::Backoff(base) => {
                    backoffs += 1;
                    let delay = base.saturating_mul(2u32.saturating_pow(backoffs - 1));
                    tokio::time::sleep(delay.min(MAX_BACKOFF).min(left)).await;
                }
            }
            iteration += 1;
        }
    }

    async fn poll_once<T>(
        &self,
        pending: &Pending<T>,
        iteration: u32,
        left: Duration,
        proto: bool,
        bad_requests: &mut u32,
    ) -> Result<Poll> {
        let call = pending.call;
        let body = json!({"request_id": pending.request_id, "allow_metadata_only": false});
        let mut req = self
            .http
            .post(format!("{}/api/v1/retrieve_future", self.config.base_url))
            .timeout(self.config.poll_timeout.min(left))
            .header("X-API-Key", &self.config.api_key)
            .header(
                "X-Idempotency-Key",
                format!("claas-tinker-{}", uuid::Uuid::new_v4()),
            )
            .header("X-Tinker-Request-Iteration", iteration.to_string())
            .header("X-Tinker-Request-Type", pending.request_type)
            .header(ACCEPT, if proto { PROTOBUF } else { "application/json" })
            .header(CONTENT_TYPE, "application/json")
            .body(body.to_string());
        if iteration == 0 {
            req = req.header("X-Tinker-Create-Promise-Roundtrip-Time", "0");
        }
        let _in_flight = self.stats.enter();
        let resp = match req.send().await {
            Ok(resp) => resp,
            Err(e) if e.is_timeout() => return Ok(Poll::Pending),
            Err(e) if e.is_connect() => return Ok(Poll::Backoff(Duration::from_secs(1))),
            Err(source) => return Err(Error::Transport { call, source }),
        };
        let status = resp.status().as_u16();
        if (200..300).contains(&status) {
            return read_poll(call, resp).await;
        }
        let message = message_from_body(&resp.text().await.unwrap_or_default());
        match status {
            408 => Ok(Poll::Pending),
            500..=599 => Ok(Poll::Backoff(self.config.retry.base_delay)),
            429 => Ok(Poll::Backoff(Duration::from_secs(1))),
            410 => Err(Error::FutureLost {
                call,
                request_id: pending.request_id.clone(),
            }),
            400 if *bad_requests < MAX_BAD_REQUESTS => {
                *bad_requests += 1;
                Ok(Poll::Pending)
            }
            _ => Err(Error::Status {
                call,
                status,
                message,
            }),
        }
    }
}

/// A 2xx poll answer: protobuf means done; JSON is `try_again`, a failure, or the result.
async fn read_poll(call: &'static str, resp: reqwest::Response) -> Result<Poll> {
    let is_proto = resp
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains(PROTOBUF));
    let bytes = resp
        .bytes()
        .await
        .map_err(|source| Error::Transport { call, source })?;
    if is_proto {
        return Ok(Poll::Done(Polled::Proto(bytes.to_vec())));
    }
    let v: Value = decode_json(call, &bytes)?;
    if v.get("type").and_then(Value::as_str) == Some("try_again") {
        return Ok(Poll::Pending);
    }
    if let Some(error) = v.get("error") {
        let message = error
            .as_str()
            .map_or_else(|| error.to_string(), str::to_owned);
        let category = v
            .get("category")
            .and_then(Value::as_str)
            .unwrap_or("unknown");
        let category = category.to_owned();
        return Err(Error::RequestFailed {
            call,
            category,
            message,
        });
    }
    Ok(Poll::Done(Polled::Json(v)))
}

/// A JSON result as `T`.
pub(crate) fn json_result<T: serde::de::DeserializeOwned>(
    body: Polled,
) -> std::result::Result<T, String> {
    match body {
        Polled::Json(v) => serde_json::from_value(v).map_err(|e| e.to_string()),
        Polled::Proto(_) => Err("a protobuf body where JSON was expected".into()),
    }
}
