//! How long a request may take, by route class, so a stuck dependency (a hung vLLM, a
//! database that stopped answering) or a client that sends its body at a trickle cannot
//! hold a connection and a task forever:
//!
//! - the body must arrive within `server.request_body_timeout_s` (408, see
//!   [`crate::error::JsonBody`]);
//! - the answer (its status and headers; a stream may go on after) must start within the
//!   route class's limit, else 504: feedback and LoRA deletion wait up to
//!   `server.feedback_max_wait_s` by design, so they get that plus [`WAIT_MARGIN`];
//!   inference and adapter transfers get [`SLOW`]; everything else gets
//!   `server.request_timeout_s`.

use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::Method;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::error::ApiError;
use crate::AppState;

/// Beyond the longest wait a feedback or delete request may ask for.
pub const WAIT_MARGIN: Duration = Duration::from_secs(30);
/// Inference (a long generation on a busy node) and adapter transfers (export, init and
/// rollback write or load whole adapters): the proxy's own upstream timeout.
pub const SLOW: Duration = Duration::from_secs(600);

/// The limits, from `server`.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// Routes with no class of their own (`server.request_timeout_s`, default 30 s).
    pub default: Duration,
    /// A request body's arrival (`server.request_body_timeout_s`, default 30 s).
    pub body: Duration,
    /// `server.feedback_max_wait_s`.
    pub max_wait: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            default: Duration::from_secs(30),
            body: Duration::from_secs(30),
            max_wait: Duration::from_secs(600),
        }
    }
}

pub use crate::error::BodyDeadline;

impl Timeouts {
    /// The limit for `method path`.
    pub fn for_route(&self, method: &Method, path: &str) -> Duration {
        let waits = path == "/v1/feedback" || (path == "/v1/lora" && method == Method::DELETE);
        let slow = matches!(
            path,
            "/v1/chat/completions"
                | "/v1/completions"
                | "/v1/score"
                | "/v1/lora/export"
                | "/v1/lora/init"
        ) || path.ends_with("/rollback");
        if waits {
            self.max_wait + WAIT_MARGIN
        } else if slow {
            SLOW.max(self.default)
        } else {
            self.default
        }
    }
}

/// Middleware: the request's answer must start within its route class's limit.
pub async fn deadline(State(state): State<AppState>, mut req: Request, next: Next) -> Response {
    let t = state.timeouts;
    req.extensions_mut().insert(BodyDeadline(t.body));
    let limit = t.for_route(req.method(), req.uri().path());
    match tokio::time::timeout(limit, next.run(req)).await {
        Ok(resp) => resp,
        Err(_) => ApiError::answer_timed_out(limit).into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_route_class_gets_its_limit() {
        let t = Timeouts {
            default: Duration::from_secs(5),
            body: Duration::from_secs(5),
            max_wait: Duration::from_secs(120),
        };
        let waits = Duration::from_secs(150);
        assert_eq!(t.for_route(&Method::POST, "/v1/feedback"), waits);
        assert_eq!(t.for_route(&Method::DELETE, "/v1/lora"), waits);
        assert_eq!(t.for_route(&Method::GET, "/v1/lora"), t.default);
        assert_eq!(t.for_route(&Method::POST, "/v1/chat/completions"), SLOW);
        assert_eq!(t.for_route(&Method::POST, "/v1/lora/a%2Fb/rollback"), SLOW);
        assert_eq!(t.for_route(&Method::GET, "/v1/health"), t.default);
    }
}
