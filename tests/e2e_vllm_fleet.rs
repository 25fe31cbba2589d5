//! Two GPU nodes, each a real `claas worker` next to its own (fake) vLLM, behind one real
//! `claas api`: chat keeps flowing with zero errors while one node drains, sleeps, trains
//! and reloads, no request ever reaches a sleeping vLLM, and the other node's vLLM picks up
//! the newly published version by itself.
//!
//! The fakes answer like vLLM 0.15, where a request that meets a sleeping engine fails, and
//! each generation takes 30 ms, so a drain that does not wait or a misrouted request shows
//! up as an error.

mod common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use claas_core::testing::TestDb;
use common::{env, eventually, free_port, spawn, wait_http};
use serde_json::{json, Value};

const LORA: &str = "team/x";

fn chat(user: &str) -> Value {
    json!({"model": LORA, "messages": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": user}]})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_traffic_never_errors_while_a_node_trains_and_every_node_serves_the_new_version() {
    let db = TestDb::postgres().await;
    let root = claas_testutil::tempdir("vllm-fleet");
    let model = root.join("model");
    let adapters = root.join("loras");
    claas_worker::testing::tiny_checkpoint(&model, 5).await;
    let model_id = model.display().to_string();
    let adapters_s = adapters.display().to_string();

    let mut fakes = Vec::new();
    for _ in 0..2 {
        let f = common::fake_vllm(&model_id).await;
        f.knobs().latency_ms.store(30, Ordering::SeqCst);
        fakes.push(f);
    }
    // fakes[0]'s node trains (its worker alone serves the model's queue); list it where
    // the LoRA's requests go first, so its traffic must move to the other node meanwhile.
    let backends = if claas_api::upstream::preferred_backend(LORA, 2) == 0 {
        format!("{},{}", fakes[0].url, fakes[1].url)
    } else {
        format!("{},{}", fakes[1].url, fakes[0].url)
    };
    let port = free_port().to_string();
    let common_env = [
        ("DATABASE_URL", db.url.as_str()),
        ("CLAAS_BASE_MODEL_ID", model_id.as_str()),
        ("CLAAS_LORA_ROOT", adapters_s.as_str()),
        ("CLAAS_DATA_DIR", adapters_s.as_str()),
    ];
    let mut api_env = env(&common_env);
    api_env.extend(env(&[
        ("CLAAS_API_HOST", "127.0.0.1"),
        ("CLAAS_API_PORT", &port),
        ("CLAAS_VLLM_BACKENDS", &backends),
        ("CLAAS_VLLM_UNAVAILABLE_WAIT_S", "20"),
        ("REDIS_URL", "redis://127.0.0.1:6379"),
    ]));
    let _api = spawn("api", &["api"], &api_env);
    let base = format!("http://127.0.0.1:{port}");
    wait_http(&base).await;
    let worker = |i: usize| {
        let id = format!("node{i}");
        let mut vars = env(&common_env);
        vars.extend(env(&[
            ("CLAAS_WORKER_ID", &id),
            ("CLAAS_WORKER_EXECUTOR", "candle"),
            ("CLAAS_TRAINER_DEVICE", "cpu"),
            ("VLLM_BASE_URL", &fakes[i].url),
            ("CLAAS_QUEUE_POLL_INTERVAL_MS", "100"),
        ]));
        spawn(&id, &["worker"], &vars)
    };
    // node1's worker starts once node0 has claimed the job, so node0 is the one that
    // trains; node1 then only keeps its vLLM's adapters current.
    let mut workers = vec![worker(0)];
    let http = reqwest::Client::new();

    // The LoRA, served on both nodes.
    let r = http
        .post(format!("{base}/v1/lora/init"))
        .json(&json!({"lora_id": LORA, "lora_r": 4, "lora_alpha": 8}))
        .send()
        .await
        .expect("init");
    assert!(
        r.status().is_success(),
        "{}",
        r.text().await.unwrap_or_default()
    );
    // Where a version is stored, as recorded (under `adapters`).
    let version_dir = |v: i32| {
        let store = db.store.clone();
        async move {
            let versions = store.lora_versions(LORA).await.expect("versions");
            let uri = versions
                .iter()
                .find(|x| x.version == v)
                .map(|x| x.storage_uri.clone())
                .unwrap_or_default();
            let dir = claas_core::types::local_path(&uri).expect("a local version");
            dir.display().to_string()
        }
    };
    // Init wrote version 0 and loaded it into every vLLM.
    let v0 = version_dir(0).await;
    assert!(v0.starts_with(&adapters.display().to_string()), "{v0}");
    for f in &fakes {
        assert_eq!(f.loras(), vec![(LORA.to_string(), v0.clone())]);
    }
    eventually(Duration::from_secs(30), "node0's worker registered", || {
        let store = db.store.clone();
        async move { (store.list_workers().await.ok()?.len() == 1).then_some(()) }
    })
    .await;

    // One answer to give feedback on.
    let answer: Value = http
        .post(format!("{base}/v1/chat/completions"))
        .json(&chat("Explain recursion"))
        .send()
        .await
        .expect("chat")
        .json()
        .await
        .expect("json");
    let text = answer["choices"][0]["message"]["content"]
        .as_str()
        .unwrap_or_else(|| panic!("an answer: {answer}"))
        .to_owned();

    // Continuous chat traffic from three clients.
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, errors) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let mut clients = Vec::new();
    for c in 0..3 {
        let (http, base, stop, ok, errors) = (
            http.clone(),
            base.clone(),
            stop.clone(),
            ok.clone(),
            errors.clone(),
        );
        clients.push(tokio::spawn(async move {
            let mut n = 0;
            while !stop.load(Ordering::SeqCst) {
                n += 1;
                let r = http
                    .post(format!("{base}/v1/chat/completions"))
                    .json(&chat(&format!("client {c} message {n}")))
                    .send()
                    .await;
                match r {
                    Ok(r) if r.status().is_success() => ok.fetch_add(1, Ordering::SeqCst),
                    Ok(r) => {
                        eprintln!(
                            "chat failed: {} {}",
                            r.status(),
                            r.text().await.unwrap_or_default()
                        );
                        errors.fetch_add(1, Ordering::SeqCst)
                    }
                    Err(e) => {
                        eprintln!("chat failed: {e}");
                        errors.fetch_add(1, Ordering::SeqCst)
                    }
                };
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before: Vec<usize> = fakes.iter().map(|f| f.generations()).collect();
    assert!(
        before[0] > 0 && before[1] == 0,
        "traffic goes to node0 first: {before:?}"
    );

    let feedback = http
        .post(format!("{base}/v1/feedback"))
        .header("Prefer", "wait=60")
        .json(
            &json!({"requests": [{"lora_id": LORA, "prompt": "Explain recursion",
            "response": text, "feedback": "shorter"}]}),
        )
        .send();
    let feedback = tokio::spawn(feedback);
    eventually(Duration::from_secs(30), "node0 to claim the job", || {
        let store = db.store.clone();
        async move {
            let ws = store.list_workers().await.ok()?;
            ws.iter()
                .any(|w| w.id == "node0" && w.current_job.is_some())
                .then_some(())
        }
    })
    .await;
    workers.push(worker(1));
    let r = feedback.await.expect("join").expect("feedback");
    let status = r.status();
    let body: Value = r.json().await.expect("json");
    assert_eq!(status, 200, "the job trained and was served: {body}");

    // The node that did not train swaps to version 1 by itself.
    let want = vec![(LORA.to_string(), version_dir(1).await)];
    for f in &fakes {
        eventually(
            Duration::from_secs(15),
            "every vLLM serves version 1",
            || {
                let f = f.clone();
                let want = want.clone();
                async move { (f.loras() == want).then_some(()) }
            },
        )
        .await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::SeqCst);
    for c in clients {
        c.await.expect("client");
    }

    assert!(
        fakes[0].calls().iter().any(|c| c.starts_with("sleep")),
        "node0 trained"
    );
    assert!(
        !fakes[1].calls().iter().any(|c| c.starts_with("sleep")),
        "node1 did not"
    );
    assert!(
        fakes[1].generations() > 0,
        "node1 took node0's traffic while it trained"
    );
    for f in &fakes {
        assert_eq!(
            f.served_while_asleep(),
            0,
            "a request reached a sleeping vLLM"
        );
        assert!(!f.is_asleep(), "every vLLM is awake again");
    }
    let (ok, errors) = (ok.load(Ordering::SeqCst), errors.load(Ordering::SeqCst));
    assert_eq!(
        errors, 0,
        "chat errors while a node trained ({ok} answered)"
    );
    assert!(ok >= 10, "traffic flowed throughout: {ok} answers");
    drop(workers);
    db.cleanup().await;
}
