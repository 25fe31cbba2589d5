//! What a feedback request waiting for its job costs an API process.
//!
//! N requests with `Prefer: wait=600` for jobs nobody trains (no worker runs) go through
//! the API's router at once, on SQLite; once every one waits, the heap the process holds
//! (a counting allocator: bytes allocated and not yet freed) is compared with the heap
//! before they were sent. The socket and HTTP/1 connection of a real request come on top
//! (hyper's buffers, the kernel's). Then as many bare waits (the waiter alone, in a task of
//! its own) are measured the same way: the difference is what the request's way through
//! the router's layers holds. Then the jobs finish (marked cancelled) and the time until
//! every request has answered is printed.
//!
//! cargo bench --bench waiting [-- N]   (default 10000)

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::Request;
use claas_api::{router, ApiOptions, AppState};
use claas_core::testing::{lora, TestDb, TEST_BASE_MODEL};
use tower::ServiceExt;

struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

// The counting allocator needs `unsafe impl` (the trait's contract); it only forwards to
// the system allocator.
#[allow(unsafe_code)]
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: the caller's contract for `GlobalAlloc::alloc`, passed on.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: the caller's contract for `GlobalAlloc::dealloc`, passed on.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(
            new_size as isize - layout.size() as isize,
            Ordering::Relaxed,
        );
        // SAFETY: the caller's contract for `GlobalAlloc::realloc`, passed on.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Requests sent at once.
const WAVE: usize = 2_000;

fn feedback(i: usize) -> String {
    serde_json::json!({"requests": [{
        "lora_id": "bench/wait",
        "prompt": "Explain recursion",
        "response": "Recursion is when a function calls itself.",
        "feedback": format!("request {i}: shorter"),
        "prompt_token_ids": (1..200).collect::<Vec<u32>>(),
        "response_token_ids": (200..400).collect::<Vec<u32>>(),
        "response_logprobs": vec![-0.5; 200],
        "system_prompt": "You are a teacher."
    }]})
    .to_string()
}

fn request(i: usize, prefer: &str) -> Request<Body> {
    Request::post("/v1/feedback")
        .header("content-type", "application/json")
        .header("prefer", prefer)
        .body(Body::from(feedback(i)))
        .unwrap_or_default()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    // `cargo bench` passes --bench; `cargo test --all-targets` runs this as a smoke test.
    let args: Vec<String> = std::env::args().skip(1).collect();
    let full = args.iter().any(|a| a == "--bench");
    let n: usize =
        args.iter()
            .find_map(|a| a.parse().ok())
            .unwrap_or(if full { 10_000 } else { 200 });
    let db = TestDb::sqlite().await;
    let dir = claas_testutil::tempdir("bench-waiting");
    db.store.create_lora(&lora("bench/wait")).await?;
    let state = AppState::new(
        db.store.clone(),
        ApiOptions {
            max_body_bytes: 1 << 20,
            feedback_default_wait_s: 120,
            feedback_max_wait_s: 600,
            max_attempts: 3,
            default_base_model: TEST_BASE_MODEL.into(),
            allowed_init_base_models: vec![TEST_BASE_MODEL.into()],
            lora_root: dir.join("loras").display().to_string(),
            data_dir: dir.join("data"),
            max_lora_rank: None,
        },
    )
    .with_max_waiting(n);
    let app = router(state.clone());
    // Warm-up: the same number enqueued without waiting, so the database, the allocator
    // and the router have grown to this size before the baseline is taken.
    let mut warm = Vec::new();
    for i in 0..n {
        warm.push(tokio::spawn(
            app.clone().oneshot(request(i, "respond-async")),
        ));
    }
    for t in warm {
        t.await??;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The state machine of one request through the router (allocated once per request).
    let future_bytes = std::mem::size_of_val(&app.clone().oneshot(request(0, "wait=600")));
    let before = LIVE.load(Ordering::SeqCst);
    let sent = Instant::now();
    let mut waiting = Vec::new();
    // In waves: 20,000 enqueues at once on SQLite and two cores outlast the request
    // deadline, and what is measured here is the wait, not the intake (BENCHMARKS.md "API intake").
    for wave in (0..n).collect::<Vec<_>>().chunks(WAVE) {
        for i in wave {
            waiting.push(tokio::spawn(
                app.clone().oneshot(request(n + i, "wait=600")),
            ));
        }
        while state.waiting.jobs.len() < waiting.len() {
            if let Some(early) = waiting.iter().position(|t| t.is_finished()) {
                let resp = waiting.swap_remove(early).await??;
                anyhow::bail!("a request answered {} instead of waiting", resp.status());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let all_waiting_s = sent.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let held = LIVE.load(Ordering::SeqCst) - before;
    let per = held as f64 / n as f64;
    // The wait's own share: as many bare waits (a task each, as the runtime gives every
    // connection) on the warm-up jobs, without the HTTP request around them.
    let queued = db
        .store
        .list_jobs(&claas_core::queue::JobFilter {
            status: Some(claas_core::types::JobStatus::Queued),
            limit: i64::try_from(2 * n).unwrap_or(i64::MAX),
            ..Default::default()
        })
        .await?;
    let before_bare = LIVE.load(Ordering::SeqCst);
    let bare: Vec<_> = queued
        .iter()
        .take(n)
        .map(|j| {
            let (jobs, id) = (state.waiting.jobs.clone(), j.id);
            tokio::spawn(async move { jobs.wait(id, Duration::from_secs(600)).await })
        })
        .collect();
    while state.waiting.jobs.len() < 2 * n {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let bare_per = (LIVE.load(Ordering::SeqCst) - before_bare) as f64 / n as f64;
    // Finish every job at once (all 2n are still queued, as listed above: cancelling ends
    // them).
    for j in &queued {
        db.store.cancel(j.id).await?;
    }
    // From the last job's end: one poll (200 ms) and the answers' own work.
    let finished = Instant::now();
    let mut answered = 0;
    for t in waiting {
        if t.await?.is_ok() {
            answered += 1;
        }
    }
    for t in bare {
        t.await?;
    }
    println!(
        "waiting: requests={n} router_future_bytes={future_bytes} all_waiting_after_s={all_waiting_s:.2} heap_held_bytes={held} \
         bytes_per_waiting_request={per:.0} bytes_per_bare_wait={bare_per:.0} answered={answered} \
         answered_within_s_of_the_last_end={:.2}",
        finished.elapsed().as_secs_f64()
    );
    db.cleanup().await;
    Ok(())
}
