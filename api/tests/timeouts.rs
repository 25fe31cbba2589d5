//! Requests are bounded in time: a body sent at a trickle gets 408, and an answer held up
//! by a hung dependency gets 504, each within its limit, on a real socket.

mod common;

use std::time::{Duration, Instant};

use claas_api::timeouts::Timeouts;
use claas_api::upstream::Upstream;
use claas_api::AppState;
use claas_core::testing::TestDb;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn short() -> Timeouts {
    Timeouts {
        default: Duration::from_millis(500),
        body: Duration::from_millis(300),
        max_wait: Duration::from_secs(5),
    }
}

#[tokio::test]
async fn a_body_that_trickles_in_gets_408_and_a_hung_dependency_504() {
    let dir = claas_testutil::tempdir("timeouts");
    let db = TestDb::sqlite().await;
    // A "vLLM" that accepts connections and never answers.
    let hung = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let hung_url = format!("http://{}", hung.local_addr().expect("addr"));
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = hung.accept().await {
            held.push(s);
        }
    });
    let state = AppState::new(db.store.clone(), common::options(&dir))
        .with_upstream(Some(Upstream::new(
            &hung_url,
            None,
            Duration::from_secs(60),
        )))
        .with_timeouts(short());
    let api = common::serve(state).await;

    // Half a body, then silence.
    let addr = api.trim_start_matches("http://").to_owned();
    let mut conn = tokio::net::TcpStream::connect(&addr)
        .await
        .expect("connect");
    let head = "POST /v1/feedback HTTP/1.1\r\nHost: 127.0.0.1\r\n\
                Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"requests\":";
    conn.write_all(head.as_bytes()).await.expect("send");
    let started = Instant::now();
    let mut answer = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), conn.read(&mut answer))
        .await
        .expect("answered within 5 s")
        .expect("read");
    let answer = String::from_utf8_lossy(&answer[..n]).into_owned();
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("request_timeout"), "{answer}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );

    // Health asks the hung vLLM; the answer is bounded all the same.
    let started = Instant::now();
    let r = reqwest::get(format!("{api}/v1/health"))
        .await
        .expect("health");
    assert_eq!(r.status(), 504);
    let body: serde_json::Value = r.json().await.expect("json");
    assert_eq!(body["error"]["code"], "timeout", "{body}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    db.cleanup().await;
}
