//! The Tinker trainer against the fake Tinker, phase by phase: a step from a LoRA's
//! initial checkpoint to a stored version whose sampler weights differ from the initial
//! ones, CLaaS's metadata, attempts that write checkpoints of their own, and failures
//! classified where they happen (a 5xx past the retry budget, an unknown checkpoint, a
//! failed optim_step that stores nothing, an expired session).

use std::time::Duration;

use claas_core::testing::{sample, TEST_BASE_MODEL};
use claas_core::types::{Orchestration, Sample, TrainingConfig};
use claas_fake_tinker::{FakeTinker, Options};
use claas_testutil::tempdir;
use claas_tinker::{Config, RetryPolicy, SamplerSource, TinkerClient};
use claas_worker::testing::tiny_checkpoint;
use claas_worker::tinker::sampler_path_of;
use claas_worker::{AdapterSource, JobContext, PhaseError, Serving, TinkerTrainer, Trainer};
use sha2::Digest;

/// A client of `fake` that tries each call twice, at once.
fn client(fake: &FakeTinker) -> TinkerClient {
    let config = Config {
        retry: RetryPolicy {
            max_attempts: 2,
            base_delay: Duration::from_millis(1),
            max_delay: Duration::from_millis(1),
        },
        ..Config::new(&fake.url, "tml-test")
    };
    TinkerClient::new(config).expect("client")
}

/// The fake serving the test base model, and a trainer on it with the tiny checkpoint's
/// tokenizer.
async fn setup() -> (FakeTinker, TinkerTrainer) {
    let fake = FakeTinker::start(Options {
        base_models: vec![TEST_BASE_MODEL.into()],
        ..Options::default()
    })
    .await;
    let dir = tempdir("tinker-tokenizer");
    tiny_checkpoint(&dir, 3).await;
    let trainer = TinkerTrainer::from_tokenizer_dir(client(&fake), TEST_BASE_MODEL, &dir)
        .expect("the tokenizer");
    (fake, trainer)
}

fn job(write_tag: &str) -> JobContext {
    JobContext {
        job_id: uuid::Uuid::now_v7(),
        lora_id: "u/a".into(),
        base_model: TEST_BASE_MODEL.into(),
        attempt: 1,
        orchestration: Orchestration::default(),
        write_tag: write_tag.into(),
    }
}

fn source(version: i32, uri: &str, sha256: &str) -> AdapterSource {
    AdapterSource {
        version,
        uri: uri.into(),
        sha256: sha256.into(),
        base_model: TEST_BASE_MODEL.into(),
        rank: 4,
        alpha: 8.0,
        target_modules: vec!["q_proj".into()],
    }
}

fn batch() -> Vec<Sample> {
    vec![sample("shorter"), sample("in French")]
}

/// The log-probs a sampler checkpoint gives a fixed sequence (what serving it would see).
async fn logprobs_of(fake: &FakeTinker, sampler_path: &str) -> Vec<Option<f32>> {
    let c = client(fake);
    let session = c.create_session().await.expect("session");
    let path = sampler_path.parse().expect("a tinker path");
    let sampler = c
        .create_sampling_session(&session, 0, &SamplerSource::ModelPath(path))
        .await
        .expect("a sampler on the checkpoint");
    c.compute_logprobs(&sampler, 0, &[5, 6, 7, 8, 9])
        .await
        .expect("log-probs")
}

async fn distill_err(t: &TinkerTrainer, from: &AdapterSource, samples: &[Sample]) -> PhaseError {
    match t
        .distill(&job("t1"), from, samples, &TrainingConfig::default())
        .await
    {
        Ok(_) => panic!("distill should fail"),
        Err(e) => e,
    }
}

#[tokio::test]
async fn a_step_from_the_initial_checkpoint_stores_a_version_that_samples_differently() {
    let (fake, trainer) = setup().await;
    let init = trainer.init_lora(4).await.expect("init");
    assert!(
        init.starts_with("tinker://") && init.ends_with("/weights/init"),
        "{init}"
    );
    let init_sampler = sampler_path_of(&init).expect("a state path");
    assert!(
        fake.checkpoints().contains(&init_sampler),
        "{:?}",
        fake.checkpoints()
    );

    let from = source(0, &init, "");
    let training = TrainingConfig::default();
    let distilled = trainer
        .distill(&job("t1"), &from, &batch(), &training)
        .await
        .expect("distill");
    let m = distilled.metrics.clone();
    assert_eq!(m["step"], 1, "{m}");
    assert_eq!(
        (m["batch_size"].as_u64(), m["completion_len"].as_u64()),
        (Some(2), Some(4))
    );
    assert_eq!(m["loss_fn"], "importance_sampling");
    assert_eq!(m["lr"].as_f64(), Some(training.learning_rate));
    for key in [
        "effective_kl_coef",
        "kl_gain",
        "adv_mean",
        "adv_abs_mean",
        "kl_mean",
        "adv_abs_mean_raw",
    ] {
        assert!(m[key].as_f64().is_some_and(f64::is_finite), "{key}: {m}");
    }
    let gain = m["kl_gain"].as_f64().unwrap_or_default();
    assert!((1.0..=4.0).contains(&gain), "{m}");
    assert!(
        m["timestamp"]
            .as_str()
            .is_some_and(|t| t.ends_with("+00:00")),
        "{m}"
    );
    let texts = m["teacher_scored_texts"].as_array().expect("texts");
    assert_eq!(texts.len(), 2);
    assert!(texts[1]
        .as_str()
        .is_some_and(|t| t.contains("HINDSIGHT CONTEXT") && t.contains("in French")));
    assert!(
        m["tinker_fwd_metrics"]["loss:sum"].is_f64(),
        "awaited, so recorded: {m}"
    );

    let stored = trainer
        .store_adapter(&job("t1"), 1, distilled)
        .await
        .expect("store");
    assert!(stored.uri.ends_with("/weights/v1-t1"), "{}", stored.uri);
    assert_eq!(
        stored.sha256,
        hex::encode(sha2::Sha256::digest(stored.uri.as_bytes()))
    );
    let sampler = sampler_path_of(&stored.uri).expect("a state path");
    assert!(
        fake.checkpoints().contains(&sampler),
        "{:?}",
        fake.checkpoints()
    );
    assert_ne!(
        logprobs_of(&fake, &sampler).await,
        logprobs_of(&fake, &init_sampler).await,
        "the step changed what the LoRA samples"
    );

    // The next step trains from the stored version.
    let from = source(1, &stored.uri, &stored.sha256);
    let next = trainer
        .distill(&job("t2"), &from, &batch(), &training)
        .await
        .expect("distill from version 1");
    assert_eq!(next.metrics["step"], 2);
    let v2 = trainer
        .store_adapter(&job("t2"), 2, next)
        .await
        .expect("store v2");
    assert!(v2.uri.ends_with("/weights/v2-t2"), "{}", v2.uri);
}

#[tokio::test]
async fn each_attempt_writes_its_own_checkpoints_and_applies_the_step_once() {
    let (fake, trainer) = setup().await;
    let from = source(0, &trainer.init_lora(4).await.expect("init"), "");
    let mut uris = Vec::new();
    for tag in ["first", "retry"] {
        let d = trainer
            .distill(&job(tag), &from, &batch(), &TrainingConfig::default())
            .await
            .expect("distill");
        uris.push(
            trainer
                .store_adapter(&job(tag), 1, d)
                .await
                .expect("store")
                .uri,
        );
    }
    assert_ne!(
        uris[0], uris[1],
        "no attempt overwrites another's checkpoints"
    );
    let [a, b] = [&uris[0], &uris[1]].map(|u| sampler_path_of(u).expect("a state path"));
    assert_eq!(
        logprobs_of(&fake, &a).await,
        logprobs_of(&fake, &b).await,
        "a retry trains the current version afresh: one step, not two"
    );
}

#[tokio::test]
async fn an_initial_version_no_checkpoint_holds_starts_a_fresh_lora() {
    let (fake, trainer) = setup().await;
    let from = source(0, "file:///loras/u/a/v0", "");
    let d = trainer
        .distill(
            &job("t1"),
            &from,
            &[sample("shorter")],
            &TrainingConfig::default(),
        )
        .await
        .expect("distill");
    assert_eq!(fake.count("create_model"), 1);
    trainer
        .store_adapter(&job("t1"), 1, d)
        .await
        .expect("store");

    // A trained version must be where its record says.
    let err = distill_err(
        &trainer,
        &source(3, "file:///loras/u/a/v3", "abc"),
        &batch(),
    )
    .await;
    assert_eq!(
        (err.code.as_str(), err.retryable),
        ("adapter_unreadable", false),
        "{err:?}"
    );
}

#[tokio::test]
async fn a_server_error_past_the_retry_budget_is_retryable_and_names_the_call() {
    let (fake, trainer) = setup().await;
    let from = source(0, &trainer.init_lora(4).await.expect("init"), "");
    fake.fail_route("forward_backward", 2);
    let err = distill_err(&trainer, &from, &batch()).await;
    assert_eq!(
        (err.code.as_str(), err.retryable),
        ("tinker_error", true),
        "{err:?}"
    );
    assert!(
        err.message.contains("forward_backward") && err.message.contains("503"),
        "{err:?}"
    );
    // One failure fewer than the budget is absorbed by the client's retry.
    fake.fail_route("asample", 1);
    trainer
        .distill(&job("t1"), &from, &batch(), &TrainingConfig::default())
        .await
        .expect("a retried call succeeds");
}

#[tokio::test]
async fn an_unknown_checkpoint_is_fatal() {
    let (_fake, trainer) = setup().await;
    let from = source(2, "tinker://nobody:train:0/weights/v2-gone", "abc");
    let err = distill_err(&trainer, &from, &batch()).await;
    assert_eq!(
        (err.code.as_str(), err.retryable),
        ("tinker_error", false),
        "{err:?}"
    );
    assert!(
        err.message.contains("load_weights") && err.message.contains("not found"),
        "{err:?}"
    );
}

#[tokio::test]
async fn nothing_is_stored_when_the_optimizer_step_fails() {
    let (fake, trainer) = setup().await;
    let from = source(0, &trainer.init_lora(4).await.expect("init"), "");
    let before = fake.checkpoints();
    fake.fail_route("optim_step", 2);
    let err = distill_err(&trainer, &from, &batch()).await;
    assert!(
        err.retryable && err.message.contains("optim_step"),
        "{err:?}"
    );
    assert_eq!(fake.checkpoints(), before, "no version without its step");
}

#[tokio::test]
async fn an_expired_session_fails_the_attempt_retryably_and_the_next_opens_a_new_one() {
    let (fake, trainer) = setup().await;
    let from = source(0, &trainer.init_lora(4).await.expect("init"), "");
    fake.expire_sessions();
    let err = distill_err(&trainer, &from, &batch()).await;
    assert!(err.retryable && err.message.contains("expired"), "{err:?}");
    let sessions = fake.count("create_session");
    trainer
        .distill(&job("t2"), &from, &batch(), &TrainingConfig::default())
        .await
        .expect("a new session");
    assert_eq!(fake.count("create_session"), sessions + 1);
}

#[tokio::test]
async fn a_bad_sample_is_refused_by_index_before_anything_is_sent() {
    let (fake, trainer) = setup().await;
    let mut bad = sample("x");
    bad.rollout.response_logprobs.pop();
    let err = distill_err(
        &trainer,
        &source(1, "tinker://r/weights/v1", "abc"),
        &[sample("a"), bad],
    )
    .await;
    assert_eq!((err.sample, err.retryable), (Some(1), false), "{err:?}");
    assert!(fake.calls().is_empty(), "{:?}", fake.calls());

    let other = AdapterSource {
        base_model: "other/base".into(),
        ..source(1, "tinker://r/weights/v1", "abc")
    };
    let err = distill_err(&trainer, &other, &batch()).await;
    assert_eq!(err.code, "wrong_base_model");
}

/// While Tinker's health check fails the worker claims nothing (the runtime waits on
/// `Serving::ready`), so an outage does not spend jobs' attempts; it claims again once
/// Tinker answers.
#[tokio::test]
async fn the_worker_waits_while_tinker_is_down() {
    let (fake, trainer) = setup().await;
    fake.knobs()
        .unhealthy
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let down = Serving::ready(&trainer).await.expect_err("Tinker is down");
    assert!(down.contains("healthz") && down.contains("503"), "{down}");
    fake.knobs()
        .unhealthy
        .store(false, std::sync::atomic::Ordering::SeqCst);
    Serving::ready(&trainer).await.expect("Tinker is back");
    // A healthy answer holds for a while: no request per claim.
    fake.knobs()
        .unhealthy
        .store(true, std::sync::atomic::Ordering::SeqCst);
    Serving::ready(&trainer).await.expect("still fresh");
}
