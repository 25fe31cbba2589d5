//! The future protocol (§4): a submit answers `{"request_id", "model_id"?,
//! "sample_sequence_ids"?}` at once; `POST /api/v1/retrieve_future` then answers the result,
//! `try_again` (after holding the poll, since the SDK polls again immediately), or a
//! `{"error", "category"}` failure.

use axum::body::Bytes;
use axum::http::{header, HeaderMap};
use serde::Deserialize;

use crate::*;

/// What a finished request produced.
#[derive(Debug, Clone)]
pub(crate) enum Outcome {
    Json(Value),
    /// `ForwardBackwardOutput` and `SampleResponse` results: protobuf only (§4.3).
    Proto(Vec<u8>),
    /// A RequestFailed body; `category` is `user`, `server` or `unknown`.
    Failed {
        error: String,
        category: &'static str,
    },
}

#[derive(Debug)]
pub(crate) struct Future {
    outcome: Outcome,
    /// Polls still to answer `try_again` before the outcome.
    try_again: usize,
    /// Never completes ([`Knobs::stall_futures`]).
    stalled: bool,
}

/// Records a finished request and builds the submit's answer. `model_id` and
/// `sample_sequence_ids` go into the handle when given (§4.1).
pub(crate) fn submit(
    s: &Shared,
    world: &mut World,
    outcome: Outcome,
    model_id: Option<&str>,
    num_samples: Option<usize>,
) -> Answer {
    let request_id = format!("req-{}", world.fresh_id());
    world.futures.insert(
        request_id.clone(),
        Future {
            outcome,
            try_again: s.knobs.try_again_polls.load(Ordering::SeqCst),
            stalled: s.knobs.stall_futures.load(Ordering::SeqCst),
        },
    );
    let mut handle = json!({ "request_id": request_id });
    if let Some(model_id) = model_id {
        handle["model_id"] = json!(model_id);
    }
    if let Some(n) = num_samples {
        let ids: Vec<String> = (0..n).map(|i| format!("{request_id}:{i}")).collect();
        handle["sample_sequence_ids"] = json!(ids);
    }
    Ok(ok(handle))
}

#[derive(Deserialize)]
pub(crate) struct RetrieveRequest {
    request_id: String,
}

enum Poll {
    Ready(Outcome),
    Pending,
}

pub(crate) async fn retrieve_future(
    State(s): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Bytes,
) -> Answer {
    let req: RetrieveRequest = parse(&body)?;
    let poll = {
        let mut world = s.world();
        let Some(f) = world.futures.get_mut(&req.request_id) else {
            let msg = format!("future {} not found", req.request_id);
            return Err(reject(StatusCode::NOT_FOUND, msg));
        };
        if f.stalled {
            Poll::Pending
        } else if f.try_again > 0 {
            f.try_again -= 1;
            Poll::Pending
        } else {
            Poll::Ready(f.outcome.clone())
        }
    };
    match poll {
        Poll::Pending => {
            tokio::time::sleep(s.opts.long_poll).await;
            let body =
                json!({"type": "try_again", "request_id": req.request_id, "queue_state": "active"});
            Ok(ok(body))
        }
        Poll::Ready(outcome) => answer(outcome, &headers),
    }
}

fn answer(outcome: Outcome, headers: &HeaderMap) -> Answer {
    Ok(match outcome {
        Outcome::Json(v) => ok(v),
        Outcome::Failed { error, category } => ok(json!({"error": error, "category": category})),
        Outcome::Proto(bytes) => {
            let accepts_proto = headers
                .get(header::ACCEPT)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.contains("application/x-protobuf"));
            if !accepts_proto {
                let msg = "this result is protobuf only: send Accept: application/x-protobuf";
                return Err(reject(StatusCode::NOT_ACCEPTABLE, msg));
            }
            ([(header::CONTENT_TYPE, "application/x-protobuf")], bytes).into_response()
        }
    })
}
