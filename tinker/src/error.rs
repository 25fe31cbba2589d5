//! The crate's one error type. Every variant that comes from a call names it (`create_model`,
//! `forward_backward`, …) and carries Tinker's own message; [`Error::is_retryable`] says
//! whether trying the same thing again later can succeed.

use std::time::Duration;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Neither `TINKER_API_KEY` nor `CLAAS_TINKER_API_KEY` is set (or both are empty).
    #[error("no Tinker API key: set TINKER_API_KEY or CLAAS_TINKER_API_KEY")]
    MissingApiKey,
    /// A setting the client cannot start with (a bad base URL, an HTTP client that would not
    /// build).
    #[error("Tinker client configuration: {0}")]
    Config(String),
    /// Tinker answered the call with an HTTP error status.
    #[error("Tinker {call} failed with HTTP {status}: {message}")]
    Status {
        call: &'static str,
        status: u16,
        message: String,
    },
    /// The call's future finished with an error (`{"error", "category"}`, §4.3).
    #[error("Tinker {call} failed ({category} error): {message}")]
    RequestFailed {
        call: &'static str,
        /// `user`, `server` or `unknown`.
        category: String,
        message: String,
    },
    /// The call's future was still pending when the poll deadline passed.
    #[error("Tinker {call}: request {request_id} still pending after {waited:?}")]
    FutureTimeout {
        call: &'static str,
        request_id: String,
        waited: Duration,
    },
    /// Tinker no longer knows the call's future (410 on the poll); submitting again may work.
    #[error("Tinker {call}: request {request_id} expired before its result was read")]
    FutureLost {
        call: &'static str,
        request_id: String,
    },
    /// No HTTP answer: connection refused or reset, or a timeout.
    #[error("Tinker {call}: {source}")]
    Transport {
        call: &'static str,
        #[source]
        source: reqwest::Error,
    },
    /// An answer this client cannot read.
    #[error("Tinker {call}: unexpected response: {message}")]
    Decode { call: &'static str, message: String },
}

impl Error {
    /// Whether the same call may succeed later: 5xx, 408, 409 and 429 statuses, a future
    /// that timed out or expired, a server-category failure, and connection errors. A bad
    /// key, an unknown model, a malformed request, an expired session (410) and a
    /// user-category failure are fatal.
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Status { status, .. } => *status >= 500 || matches!(status, 408 | 409 | 429),
            Error::RequestFailed { category, .. } => category == "server",
            Error::FutureTimeout { .. } | Error::FutureLost { .. } => true,
            Error::Transport { source, .. } => {
                source.is_timeout() || source.is_connect() || source.is_request()
            }
            Error::MissingApiKey | Error::Config(_) | Error::Decode { .. } => false,
        }
    }

    /// Whether Tinker said the session (or a model or sampler in it) is gone: a new session
    /// is needed.
    pub fn is_session_expired(&self) -> bool {
        matches!(self, Error::Status { status: 410, .. })
    }

    /// The HTTP status Tinker answered, if it answered one.
    pub fn status(&self) -> Option<u16> {
        match self {
            Error::Status { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// The name of the call that failed, if the error came from one.
    pub fn call(&self) -> Option<&'static str> {
        match self {
            Error::Status { call, .. }
            | Error::RequestFailed { call, .. }
            | Error::FutureTimeout { call, .. }
            | Error::FutureLost { call, .. }
            | Error::Transport { call, .. }
            | Error::Decode { call, .. } => Some(call),
            Error::MissingApiKey | Error::Config(_) => None,
        }
    }
}

/// Tinker's message from an error body: `detail` (FastAPI's), `error` or `message` when the
/// body is JSON, else the text itself, cut to a readable length.
pub(crate) fn message_from_body(body: &str) -> String {
    const MAX_CHARS: usize = 500;
    let from_json = serde_json::from_str::<serde_json::Value>(body)
        .ok()
        .and_then(|v| {
            ["detail", "error", "message"]
                .iter()
                .find_map(|k| v.get(*k).cloned())
        })
        .map(|v| match v {
            serde_json::Value::String(s) => s,
            other => other.to_string(),
        });
    let text = from_json.unwrap_or_else(|| body.trim().to_owned());
    if text.is_empty() {
        return "(empty body)".into();
    }
    text.chars().take(MAX_CHARS).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_comes_from_detail_error_or_the_text() {
        assert_eq!(
            message_from_body(r#"{"detail":"Invalid API key"}"#),
            "Invalid API key"
        );
        assert_eq!(
            message_from_body(r#"{"error":"boom","category":"user"}"#),
            "boom"
        );
        assert_eq!(message_from_body("  upstream reset \n"), "upstream reset");
        assert_eq!(message_from_body(""), "(empty body)");
    }

    #[test]
    fn server_statuses_are_retryable_and_client_statuses_are_not() {
        let status = |status| Error::Status {
            call: "optim_step",
            status,
            message: String::new(),
        };
        assert!(status(503).is_retryable());
        assert!(status(429).is_retryable());
        assert!(!status(401).is_retryable());
        assert!(!status(400).is_retryable());
        assert!(status(410).is_session_expired() && !status(410).is_retryable());
    }
}
