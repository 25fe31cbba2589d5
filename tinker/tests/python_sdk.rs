//! The official `tinker` Python SDK (0.38.0, unchanged) against the fake Tinker, making
//! CLaaS's calls (`sdk_against_fake.py`). This is what shows the fake speaks the SDK's wire
//! protocol, and so that the client's tests against the fake mean something. Needs
//! `CLAAS_TEST_TINKER_PYTHON`, a python with `tinker==0.38.0` (`scripts/test-tinker.sh`
//! makes one; `make test` sets it).

use std::sync::atomic::Ordering;
use std::time::Duration;

use claas_fake_tinker::{FakeTinker, Options, DEFAULT_BASE_MODEL};

#[tokio::test]
async fn the_tinker_sdk_runs_claas_calls_against_the_fake() {
    let Ok(python) = std::env::var("CLAAS_TEST_TINKER_PYTHON") else {
        eprintln!("skipped: CLAAS_TEST_TINKER_PYTHON is not set (make test sets it)");
        return;
    };
    let fake = FakeTinker::start(Options {
        long_poll: Duration::from_millis(200),
        ..Options::default()
    })
    .await;
    // Every future answers try_again once, so the SDK's pending path runs too; the first
    // submit (create_model) and the first poll answer 5xx, which the SDK must retry.
    let knobs = fake.knobs();
    knobs.try_again_polls.store(1, Ordering::SeqCst);
    knobs.submit_errors.store(1, Ordering::SeqCst);
    knobs.poll_errors.store(1, Ordering::SeqCst);
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/sdk_against_fake.py");
    let run = tokio::process::Command::new(python)
        .arg(script)
        .arg(DEFAULT_BASE_MODEL)
        .env("TINKER_BASE_URL", &fake.url)
        .env("TINKER_API_KEY", "tml-fake")
        .env("TINKER_TELEMETRY", "0")
        .env("HF_HUB_OFFLINE", "1")
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(120), run)
        .await
        .expect("the SDK script finishes within 2 minutes")
        .expect("run python");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the tinker SDK failed against the fake:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.ends_with("ok\n"), "{stdout}");
    assert!(stdout.contains("delete again: 404"), "{stdout}");
    assert_eq!(fake.count("create_model"), 2, "a 503, then the retry");
    assert_eq!(fake.count("forward_backward"), 1, "{:?}", fake.calls());
    assert_eq!(fake.count("optim_step"), 1);
    assert!(fake.checkpoints().is_empty(), "{:?}", fake.checkpoints());
    assert!(fake.count("client/config") >= 1, "{:?}", fake.calls());
}
