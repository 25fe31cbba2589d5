//! Property-based fuzzing of the whole HTTP API from its own OpenAPI document: schemathesis
//! (from PyPI, installed by `scripts/test-schemathesis.sh`, which `make test` runs) against a
//! real `claas api` on Postgres with the fake vLLM behind it, a tenant key for the tenant
//! routes and the admin key for the admin ones. It must find no 5xx and no response that
//! breaks the document, and every operation must answer 2xx at least once (the three browser
//! form posts answer 303 by design, and the two sampler routes exist only with `mode: tinker`;
//! `engine/tests/tinker_sampler.rs` and `tests/e2e_tinker.rs` get their 2xx).
//! `scripts/fuzz_report.py` counts per operation.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use claas_api::routes::keys::{create_key, NewKey};
use claas_core::testing::TestDb;
use common::{env, free_port, spawn, wait_http};
use serde_json::{json, Value};

/// The browser forms of the dashboard, which redirect (303) on success, and CLaaS's Tinker
/// routes, which answer 404 unless the inference backend is Tinker's sampler (this API
/// proxies to the fake vLLM).
const NO_2XX_BY_DESIGN: [&str; 5] = [
    "POST /v1/dashboard/login",
    "POST /v1/dashboard/logout",
    "POST /v1/dashboard/jobs/{id}/{action}",
    "GET /v1/sampler/status",
    "POST /v1/sampler/refresh",
];

async fn send(
    http: &reqwest::Client,
    key: &str,
    method: reqwest::Method,
    url: String,
    body: Value,
) -> Value {
    let resp = http
        .request(method, &url)
        .bearer_auth(key)
        .json(&body)
        .send()
        .await
        .expect("request");
    let status = resp.status();
    let value: Value = resp.json().await.unwrap_or(Value::Null);
    assert!(status.is_success(), "{url}: {status} {value}");
    value
}

fn write(path: &Path, bytes: &[u8]) {
    std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
    std::fs::write(path, bytes).expect("write");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemathesis_finds_no_5xx_no_schema_break_and_a_2xx_from_every_operation() {
    let Some(schemathesis) = std::env::var_os("CLAAS_TEST_SCHEMATHESIS") else {
        eprintln!("skipped: CLAAS_TEST_SCHEMATHESIS is not set (make test sets it)");
        return;
    };
    let db = TestDb::postgres().await;
    let root = claas_testutil::tempdir("fuzz");
    let model = root.join("model");
    let data = root.join("data");
    claas_worker::testing::tiny_checkpoint(&model, 5).await;
    let model_id = model.display().to_string();
    let vllm = common::fake_vllm(&model_id).await;

    // A tenant limited to `demo`, the bootstrap admin, and a key for the fuzzer to revoke.
    let admin = format!("claas_{}", "ad".repeat(32));
    let tenant = create_key(
        &db.store,
        NewKey {
            name: "fuzz tenant".into(),
            prefixes: vec!["demo".into()],
            admin: false,
        },
    )
    .await
    .expect("tenant key")
    .secret;
    let doomed = create_key(
        &db.store,
        NewKey {
            name: "to revoke".into(),
            prefixes: vec!["gone".into()],
            admin: false,
        },
    )
    .await
    .expect("key")
    .key
    .id;

    let port = free_port().to_string();
    let data_s = data.display().to_string();
    let _api = spawn(
        "api",
        &["api"],
        &env(&[
            ("DATABASE_URL", db.url.as_str()),
            ("CLAAS_BASE_MODEL_ID", model_id.as_str()),
            ("CLAAS_LORA_ROOT", &format!("{data_s}/loras")),
            ("CLAAS_DATA_DIR", &data_s),
            ("CLAAS_API_HOST", "127.0.0.1"),
            ("CLAAS_API_PORT", &port),
            // Nothing trains here: a valid feedback must not hold the fuzzer for 120 s.
            ("CLAAS_FEEDBACK_DEFAULT_WAIT_S", "0"),
            ("VLLM_BASE_URL", &vllm.url),
            ("VLLM_MAX_LORA_RANK", "64"),
            ("CLAAS_ADMIN_KEY", &admin),
            ("CLAAS_FEEDBACK_MAX_WAIT_S", "1"),
        ]),
    );
    let base = format!("http://127.0.0.1:{port}");
    wait_http(&base).await;

    // What the document's examples name: a LoRA with two versions, one to delete, a job,
    // and an eval run with a plot.
    let http = reqwest::Client::new();
    let init = format!("{base}/v1/lora/init");
    let post = reqwest::Method::POST;
    for body in [
        json!({"lora_id": "demo/assistant"}),
        json!({"lora_id": "demo/assistant", "overwrite": true}),
        json!({"lora_id": "demo/scratch"}),
    ] {
        send(&http, &tenant, post.clone(), init.clone(), body).await;
    }
    let feedback = json!({"requests": [{
        "lora_id": "demo/assistant", "prompt": "p", "response": "r", "feedback": "f",
        "prompt_token_ids": [1, 2], "response_token_ids": [3], "response_logprobs": [-0.5],
        "system_prompt": "s"}]});
    let job = send(
        &http,
        &tenant,
        post.clone(),
        format!("{base}/v1/feedback"),
        feedback,
    )
    .await["job_id"]
        .as_str()
        .expect("job id")
        .to_owned();
    write(&data.join("evals/run1/summary.json"), b"{}");
    write(
        &data.join("evals/run1/plots/learning_curves.png"),
        b"\x89PNG\r\n\x1a\n",
    );

    let config = format!(
        r#"
headers = {{ Authorization = "Bearer {tenant}" }}

[checks]
enabled = false
not_a_server_error.enabled = true
status_code_conformance.enabled = true
content_type_conformance.enabled = true
response_schema_conformance.enabled = true

[phases.examples]
fill-missing = true

[[operations]]
include-name = "GET /v1/jobs/{{id}}"
parameters = {{ id = "{job}" }}

[[operations]]
include-name = "POST /v1/jobs/{{id}}/cancel"
parameters = {{ id = "{job}" }}

[[operations]]
include-name = "GET /v1/dashboard/jobs/{{id}}"
headers = {{ Authorization = "Bearer {admin}" }}
parameters = {{ id = "{job}" }}

[[operations]]
include-name = "POST /v1/dashboard/jobs/{{id}}/{{action}}"
headers = {{ Authorization = "Bearer {admin}" }}
parameters = {{ id = "{job}" }}

[[operations]]
include-name = "DELETE /v1/lora"
parameters = {{ lora_id = "demo/scratch" }}

[[operations]]
include-name = "DELETE /v1/keys/{{id}}"
headers = {{ Authorization = "Bearer {admin}" }}
parameters = {{ id = "{doomed}" }}

[[operations]]
include-name = "GET /v1/eval/{{run}}/plots/{{file}}"
headers = {{ Authorization = "Bearer {admin}" }}
parameters = {{ run = "run1", file = "learning_curves.png" }}

[[operations]]
include-tag = "admin"
headers = {{ Authorization = "Bearer {admin}" }}
"#
    );
    let work = root.join("schemathesis");
    std::fs::create_dir_all(&work).expect("mkdir");
    std::fs::write(work.join("schemathesis.toml"), config).expect("config");
    let report = work.join("report.ndjson");
    // From a file, so that GET /openapi.json is fuzzed like every other operation.
    let document = work.join("openapi.json");
    let served = http
        .get(format!("{base}/openapi.json"))
        .send()
        .await
        .expect("document")
        .bytes()
        .await
        .expect("document");
    std::fs::write(&document, &served).expect("write the document");
    let started = Instant::now();
    let run = Command::new(&schemathesis)
        .current_dir(&work)
        .arg("run")
        .arg(&document)
        .args(["--url", &base])
        .args(["--max-examples", "100", "--seed", "20261204", "--no-color"])
        .args(["--generation-database", "none"])
        .args(["--report", "ndjson", "--report-ndjson-path"])
        .arg(&report)
        .output()
        .expect("schemathesis runs");
    let fuzz_log = String::from_utf8_lossy(&run.stdout);
    eprintln!(
        "schemathesis ({:.0} s):\n{fuzz_log}\n{}",
        started.elapsed().as_secs_f64(),
        String::from_utf8_lossy(&run.stderr)
    );

    let mut summary = Command::new("python3");
    summary
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/fuzz_report.py"))
        .arg(&document)
        .arg(&report);
    for op in NO_2XX_BY_DESIGN {
        summary.args(["--no-2xx-by-design", op]);
    }
    let summary = summary.output().expect("fuzz_report runs");
    let table = String::from_utf8_lossy(&summary.stdout);
    eprintln!("{table}{}", String::from_utf8_lossy(&summary.stderr));
    assert!(
        summary.status.success(),
        "fuzzing found problems (table above)"
    );
    assert!(
        run.status.success(),
        "schemathesis reported failures:\n{fuzz_log}"
    );
    db.cleanup().await;
}
