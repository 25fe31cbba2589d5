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
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use axum::extract::Request;
use axum::response::Response;
use axum::Router;
use claas_core::types::JobStatus;
use tokio::sync::OwnedSemaphorePermit;
use tower::util::Oneshot;
use tower::{Service, ServiceExt};
use tracing::Instrument;
use uuid::Uuid;

use crate::waiters::Finished;
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
pub struct DeferredWait {
    job_id: Uuid,
    status: JobStatus,
    wait: Duration,
    answer: Answer,
    /// The request's place among `server.max_waiting_feedback`, held until it answers.
    _slot: OwnedSemaphorePermit,
    /// The request's span, open until it answers.
    span: tracing::Span,
    /// When the HTTP metrics started timing it; they count it once it has answered.
    started: Option<Instant>,
}

/// How a [`DeferredWait`] rides on the response: taken out once, by [`Deferring`]
/// (response extensions must be `Clone`, a place in line must not be).
#[derive(Clone)]
struct Deferral(Arc<Mutex<Option<DeferredWait>>>);

impl Deferral {
    fn lock(&self) -> MutexGuard<'_, Option<DeferredWait>> {
        // Nothing panics while holding the lock.
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
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
            _slot: slot,
            span: tracing::Span::current(),
            started: None,
        }
    }

    /// Leaves the wait on `resp` for [`Deferring`].
    pub fn attach(self, resp: &mut Response) {
        resp.extensions_mut()
            .insert(Deferral(Arc::new(Mutex::new(Some(self)))));
    }

    /// For the HTTP metrics: when `resp` carries a wait, count it when it answers, not now
    /// (true); false when there is none.
    pub fn count_when_answered(resp: &Response, started: Instant) -> bool {
        let Some(deferral) = resp.extensions().get::<Deferral>() else {
            return false;
        };
        if let Some(wait) = deferral.lock().as_mut() {
            wait.started = Some(started);
        }
        true
    }

    fn take(resp: &mut Response) -> Option<DeferredWait> {
        resp.extensions_mut().remove::<Deferral>()?.lock().take()
    }

    /// The answer, once the wait is over, in the request's span.
    async fn answer(self, state: Arc<AppState>) -> Response {
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

/// The whole API: the router, with waiting feedback requests taken out of it while they
/// wait. The outermost service itself, not wrapped in a `Router`: what a request holds
/// while it waits is this service's future, not a route's.
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
    type Future = Deferred;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request) -> Deferred {
        Deferred {
            state: self.state.clone(),
            stage: Stage::Routing(Box::pin(self.inner.clone().oneshot(req))),
        }
    }
}

/// A request through [`Deferring`]: its way through the router, then, when the handler
/// left a wait, the wait and the answer. Written by hand rather than as an `async` block,
/// which would keep room for the router's answer beside the wait: waiting, it holds the
/// [`DeferredWait`] and the receiving end of a channel, inline.
pub struct Deferred {
    state: Arc<AppState>,
    stage: Stage,
}

enum Stage {
    Routing(Pin<Box<Oneshot<Router, Request>>>),
    Waiting {
        wait: DeferredWait,
        finished: Finished,
    },
    Answering(Pin<Box<dyn Future<Output = Response> + Send>>),
    Answered,
}

impl Future for Deferred {
    type Output = Result<Response, Infallible>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        loop {
            match &mut this.stage {
                Stage::Routing(routed) => {
                    let Ok(mut resp) = ready!(routed.as_mut().poll(cx));
                    let Some(wait) = DeferredWait::take(&mut resp) else {
                        this.stage = Stage::Answered;
                        return Poll::Ready(Ok(resp));
                    };
                    // The router's futures and answer are freed before the wait. The wait
                    // logs nothing, so it runs outside the request's span (kept open).
                    drop(resp);
                    let finished = this.state.waiting.jobs.wait(wait.job_id, wait.wait);
                    this.stage = Stage::Waiting { wait, finished };
                }
                Stage::Waiting { finished, .. } => {
                    ready!(Pin::new(finished).poll(cx));
                    let Stage::Waiting { wait, .. } =
                        std::mem::replace(&mut this.stage, Stage::Answered)
                    else {
                        unreachable!("the stage matched above");
                    };
                    this.stage = Stage::Answering(Box::pin(wait.answer(this.state.clone())));
                }
                Stage::Answering(answering) => {
                    let resp = ready!(answering.as_mut().poll(cx));
                    this.stage = Stage::Answered;
                    return Poll::Ready(Ok(resp));
                }
                Stage::Answered => panic!("a request's future polled after it answered"),
            }
        }
    }
}
