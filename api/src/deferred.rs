//! Waiting feedback requests, held outside the router.
//!
//! A feedback request that waits for its job goes through the router as any request does
//! (authentication, limits, validation, enqueueing), and the handler answers with a 202
//! that carries a [`DeferredWait`]. [`Deferring`], the outermost service, sees it, lets
//! the router's futures go (the route, every middleware and the handler: about 14 KB a
//! request) and waits holding only the wait itself: the job's id, a place among the
//! process's waiters, the request's slot and span. Then it answers with the job as it is.
//! Without `Deferring` around the router the 202 goes out as it is, which is a correct
//! answer (the caller polls). The handler says how to answer ([`Answer`]), so this module
//! knows nothing of feedback. BENCHMARKS.md "Waiting feedback requests" has the figures.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::extract::Request;
use axum::response::Response;
use axum::Router;
use claas_core::types::JobStatus;
use tokio::sync::OwnedSemaphorePermit;
use tower::{Service, ServiceExt};
use tracing::Instrument;
use uuid::Uuid;

use crate::AppState;

/// The one route whose requests wait here.
pub const FEEDBACK_ROUTE: &str = "/v1/feedback";

/// How the handler answers once the wait is over: job `id` as it is now (`status` is what
/// it was when the wait began).
pub type Answer = for<'a> fn(
    &'a AppState,
    Uuid,
    JobStatus,
) -> Pin<Box<dyn Future<Output = Response> + Send + 'a>>;

/// What the feedback handler leaves for [`Deferring`]: the wait still to do.
#[derive(Clone)]
pub struct DeferredWait {
    job_id: Uuid,
    status: JobStatus,
    wait: Duration,
    answer: Answer,
    /// The request's place among `server.max_waiting_feedback`, held until it answers.
    _slot: Arc<OwnedSemaphorePermit>,
    /// The request's span, open until it answers.
    span: tracing::Span,
    /// When the HTTP metrics started timing it; they count it once it has answered.
    started: Option<Instant>,
}

impl DeferredWait {
    pub fn new(
        job_id: Uuid,
        status: JobStatus,
        wait: Duration,
        slot: OwnedSemaphorePermit,
        answer: Answer,
    ) -> Self {
        DeferredWait {
            job_id,
            status,
            wait,
            answer,
            _slot: Arc::new(slot),
            span: tracing::Span::current(),
            started: None,
        }
    }

    /// For the HTTP metrics: count this request when it answers, not now.
    pub fn count_when_answered(&mut self, started: Instant) {
        self.started = Some(started);
    }

    /// The wait (which logs nothing, so it runs outside the span; the span stays open), then
    /// the answer.
    async fn finish(self, state: Arc<AppState>) -> Response {
        state.waiting.jobs.wait(self.job_id, self.wait).await;
        // Boxed by `answer`: the read's state is not part of what a waiting request holds.
        let resp = (self.answer)(&state, self.job_id, self.status)
            .instrument(self.span.clone())
            .await;
        if let Some(started) = self.started {
            state
                .http_metrics
                .count("POST", FEEDBACK_ROUTE, resp.status(), started);
        }
        resp
    }
}

/// The router, with waiting feedback requests taken out of it while they wait.
#[derive(Clone)]
pub struct Deferring {
    inner: Router,
    state: Arc<AppState>,
}

impl Deferring {
    pub fn new(inner: Router, state: AppState) -> Self {
        Deferring {
            inner,
            state: Arc::new(state),
        }
    }
}

impl Service<Request> for Deferring {
    type Response = Response;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request) -> Self::Future {
        // Made (and boxed) out here: what the block below captures lives as long as it
        // does, so it captures only two pointers.
        let routed = Box::pin(self.inner.clone().oneshot(req));
        let state = self.state.clone();
        Box::pin(async move {
            // Moved in here so its box is freed as soon as the router has answered.
            let routed = routed;
            let mut resp = routed.await?;
            match resp.extensions_mut().remove::<DeferredWait>() {
                None => Ok(resp),
                Some(wait) => {
                    drop(resp);
                    // Boxed: the router's answer above is freed before the wait.
                    Ok(Box::pin(wait.finish(state)).await)
                }
            }
        })
    }
}
