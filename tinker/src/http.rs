//! One HTTP exchange with Tinker, retried while the failure is retryable: the headers every
//! request carries (§1.3: `X-API-Key`, and `X-Idempotency-Key` on all but GETs, kept across a
//! call's retries as the SDK's Stainless layer keeps it), and error statuses turned into
//! [`Error::Status`] with Tinker's message.

use reqwest::header::{ACCEPT, CONTENT_TYPE};
use reqwest::Method;
use serde::de::DeserializeOwned;

use crate::error::{message_from_body, Error, Result};
use crate::TinkerClient;

/// A request body.
pub(crate) enum Body {
    Empty,
    Json(serde_json::Value),
    Proto(Vec<u8>),
}

pub(crate) const PROTOBUF: &str = "application/x-protobuf";

impl TinkerClient {
    fn url(&self, route: &str) -> String {
        format!("{}/api/v1/{route}", self.config.base_url)
    }

    /// Sends `call` to `route`, retrying retryable failures as [`crate::RetryPolicy`] says;
    /// the 2xx response, or the last failure.
    pub(crate) async fn send(
        &self,
        call: &'static str,
        method: Method,
        route: &str,
        body: Body,
    ) -> Result<reqwest::Response> {
        let idempotency_key = format!("claas-tinker-{}", uuid::Uuid::new_v4());
        let mut attempt = 1;
        loop {
            let req = self.request(&method, route, &body, &idempotency_key);
            let in_flight = self.stats.enter();
            let sent = req.send().await;
            let err = match sent {
                Ok(resp) => match check(call, resp).await {
                    Ok(resp) => return Ok(resp),
                    Err(e) => e,
                },
                Err(source) => Error::Transport { call, source },
            };
            drop(in_flight);
            if !err.is_retryable() || attempt >= self.config.retry.max_attempts {
                return Err(err);
            }
            let delay = self.config.retry.delay(attempt);
            tracing::warn!(call, attempt, error = %err, ?delay, "Tinker call failed; retrying");
            tokio::time::sleep(delay).await;
            attempt += 1;
        }
    }

    fn request(
        &self,
        method: &Method,
        route: &str,
        body: &Body,
        idempotency_key: &str,
    ) -> reqwest::RequestBuilder {
        let mut req = self
            .http
            .request(method.clone(), self.url(route))
            .timeout(self.config.request_timeout)
            .header("X-API-Key", &self.config.api_key)
            .header(ACCEPT, "application/json");
        if method != Method::GET {
            req = req.header("X-Idempotency-Key", idempotency_key);
        }
        match body {
            Body::Empty => req,
            Body::Json(v) => req
                .header(CONTENT_TYPE, "application/json")
                .body(v.to_string()),
            Body::Proto(bytes) => req.header(CONTENT_TYPE, PROTOBUF).body(bytes.clone()),
        }
    }

    /// POSTs a JSON body and reads a JSON answer.
    pub(crate) async fn post_json<T: DeserializeOwned>(
        &self,
        call: &'static str,
        route: &str,
        body: serde_json::Value,
    ) -> Result<T> {
        let resp = self
            .send(call, Method::POST, route, Body::Json(body))
            .await?;
        read_json(call, resp).await
    }
}

/// The response if its status is 2xx, else [`Error::Status`] with Tinker's message.
pub(crate) async fn check(
    call: &'static str,
    resp: reqwest::Response,
) -> Result<reqwest::Response> {
    let status = resp.status();
    if status.is_success() {
        return Ok(resp);
    }
    let text = resp.text().await.unwrap_or_default();
    Err(Error::Status {
        call,
        status: status.as_u16(),
        message: message_from_body(&text),
    })
}

/// A JSON body as `T`, or [`Error::Decode`] quoting the start of what came.
pub(crate) async fn read_json<T: DeserializeOwned>(
    call: &'static str,
    resp: reqwest::Response,
) -> Result<T> {
    let bytes = resp
        .bytes()
        .await
        .map_err(|source| Error::Transport { call, source })?;
    decode_json(call, &bytes)
}

pub(crate) fn decode_json<T: DeserializeOwned>(call: &'static str, bytes: &[u8]) -> Result<T> {
    serde_json::from_slice(bytes).map_err(|e| Error::Decode {
        call,
        message: format!(
            "{e} in {}",
            message_from_body(&String::from_utf8_lossy(bytes))
        ),
    })
}
