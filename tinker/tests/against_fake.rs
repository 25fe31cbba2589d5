//! The client against the fake Tinker (`claas-fake-tinker`, itself checked against the real
//! SDK by `python_sdk.rs`): one distill step end to end, then each fault the backend must
//! classify. Expected numbers come from the fake's model (`claas_fake_tinker::model`):
//! deterministic, so equalities are exact.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use claas_fake_tinker::{FakeTinker, Options, DEFAULT_BASE_MODEL as BASE};
use claas_tinker::{
    AdamParams, Config, Datum, Error, ForwardBackwardOutput, LossFn, RetryPolicy, SampleResponse,
    SamplerSource, SamplingParams, Stop, StopReason, TinkerClient, TinkerPath,
};

type TestResult = Result<(), Error>;

const PROMPT: [i32; 4] = [101, 102, 103, 104];

fn config(fake: &FakeTinker, key: &str) -> Config {
    Config {
        future_deadline: Duration::from_secs(5),
        poll_timeout: Duration::from_secs(2),
        retry: RetryPolicy {
            max_attempts: 4,
            base_delay: Duration::from_millis(10),
            max_delay: Duration::from_millis(50),
        },
        ..Config::new(&fake.url, key)
    }
}

fn client(fake: &FakeTinker) -> Result<TinkerClient, Error> {
    TinkerClient::new(config(fake, "tml-test"))
}

/// CLaaS's sampling parameters (`inference/tinker.py:189-202`).
fn claas_params() -> SamplingParams {
    SamplingParams {
        max_tokens: Some(64),
        seed: Some(0),
        stop: Some(Stop::Strings(vec!["<|im_end|>".into()])),
        temperature: 0.7,
        top_k: 0,
        top_p: 1.0,
    }
}

/// CLaaS's datum (`engine.py:330-347`) for prompt + response with the student's log-probs.
fn claas_datum(full: &[i32], prompt_len: usize, logprobs: &[f32], advantage: f32) -> Datum {
    let pad = vec![0.0; prompt_len];
    let shifted = |tail: Vec<f32>| [pad.clone(), tail].concat()[1..].to_vec();
    Datum::importance_sampling(
        full[..full.len() - 1].to_vec(),
        full[1..].iter().map(|&t| i64::from(t)).collect(),
        shifted(logprobs.to_vec()),
        shifted(vec![advantage; full.len() - prompt_len]),
    )
}

fn first(sample: &SampleResponse) -> (&[i32], &[f32]) {
    let seq = &sample.sequences[0];
    (&seq.tokens, seq.logprobs.as_deref().unwrap_or_default())
}

fn logprobs(out: &ForwardBackwardOutput) -> Vec<f32> {
    let lps = out.loss_fn_outputs[0]["logprobs"].as_f32();
    lps.unwrap_or_default().to_vec()
}

/// CLaaS's first call on a LoRA: a rank-8 model and its `init` state.
async fn init_lora(tinker: &TinkerClient, session: &str) -> Result<TinkerPath, Error> {
    let model = tinker.create_model(session, 0, BASE, 8).await?;
    assert_eq!(model, format!("{session}:train:0"));
    let info = tinker.get_info(&model).await?;
    assert_eq!(info.lora_rank, Some(8));
    assert_eq!(info.model_data.model_name.as_deref(), Some(BASE));
    let init = tinker.save_weights(&model, 1, "init").await?;
    assert_eq!(init.to_string(), format!("tinker://{model}/weights/init"));
    Ok(init)
}

/// A teacher on the base model: a (deterministic) sample, and the log-probs of prompt +
/// response, which agree with the sample's own. Returns (sample, prompt + response,
/// log-probs of tokens 1..).
async fn teacher_view(
    tinker: &TinkerClient,
    session: &str,
) -> Result<(SampleResponse, Vec<i32>, Vec<f32>), Error> {
    let teacher = tinker
        .create_sampling_session(session, 0, &SamplerSource::BaseModel(BASE.into()))
        .await?;
    let sample = tinker
        .sample(&teacher, 0, &PROMPT, 1, &claas_params())
        .await?;
    let again = tinker
        .sample(&teacher, 1, &PROMPT, 1, &claas_params())
        .await?;
    assert_eq!(again, sample, "sampling is deterministic");
    let (response, sampled_lps) = first(&sample);
    assert_eq!(sampled_lps.len(), response.len());

    let full = [&PROMPT[..], response].concat();
    let lps = tinker.compute_logprobs(&teacher, 2, &full).await?;
    assert_eq!((lps.len(), lps[0]), (full.len(), None));
    let lps: Vec<f32> = lps[1..].iter().map(|lp| lp.unwrap_or(f32::NAN)).collect();
    assert_eq!(
        lps[PROMPT.len() - 1..],
        *sampled_lps,
        "the sampler's log-probs"
    );
    Ok((sample, full, lps))
}

/// One distill step as CLaaS's engine makes it, in its order (one test, not several: each
/// call uses what the one before returned).
#[tokio::test]
async fn a_distill_step_runs_end_to_end_and_training_changes_the_samples() -> TestResult {
    let fake = FakeTinker::start(Options::default()).await;
    let tinker = client(&fake)?;
    let session = tinker.create_session().await?;
    tinker.session_heartbeat(&session).await?;
    assert_eq!(fake.heartbeats(&session), 1);
    let init = init_lora(&tinker, &session).await?;

    // Each distill step: a student from the last state, a teacher on the base model.
    let student = tinker.load_weights(&session, 1, &init, false).await?;
    assert_eq!(student, format!("{session}:train:1"));
    let (before, full, teacher_lps) = teacher_view(&tinker, &session).await?;
    let response_len = full.len() - PROMPT.len();
    let data = [claas_datum(&full, PROMPT.len(), first(&before).1, 0.5)];
    let out = tinker
        .forward_backward(&student, 1, &data, LossFn::ImportanceSampling)
        .await?;
    // An untrained adapter is the base model: its target log-probs are the teacher's.
    assert_eq!(logprobs(&out), teacher_lps);
    // -Σ exp(lp − old) · A over the response, with lp = old: −0.5 per response token.
    assert_eq!(out.metrics["loss:sum"], -0.5 * response_len as f64);
    let adam = AdamParams {
        learning_rate: 1e-4,
        beta1: 0.9,
        beta2: 0.95,
        ..AdamParams::default()
    };
    tinker.optim_step(&student, 2, adam).await?;
    assert_eq!(fake.steps(&student), Some(1));
    let state = tinker.save_weights(&student, 3, "step-1").await?;
    let for_sampler = tinker
        .save_weights_for_sampler(&student, 4, "step-1")
        .await?;
    assert_eq!(
        for_sampler.to_string(),
        format!("tinker://{student}/sampler_weights/step-1")
    );

    // The trained weights sample and score differently, and still deterministically.
    let source = SamplerSource::ModelPath(for_sampler.clone());
    let trained = tinker.create_sampling_session(&session, 1, &source).await?;
    let after = tinker
        .sample(&trained, 0, &PROMPT, 1, &claas_params())
        .await?;
    assert_ne!(after, before, "training changed the adapter");
    assert_eq!(
        tinker
            .sample(&trained, 1, &PROMPT, 1, &claas_params())
            .await?,
        after
    );
    let out = tinker
        .forward_backward(&student, 5, &data, LossFn::ImportanceSampling)
        .await?;
    assert_ne!(logprobs(&out), teacher_lps);

    for path in [&init, &state, &for_sampler] {
        tinker.delete_checkpoint(path).await?;
    }
    assert!(fake.checkpoints().is_empty(), "{:?}", fake.checkpoints());
    let again = tinker.delete_checkpoint(&init).await.err();
    assert_eq!(
        again.as_ref().and_then(Error::status),
        Some(404),
        "{again:?}"
    );
    assert_eq!(
        again.as_ref().and_then(Error::call),
        Some("delete_checkpoint")
    );
    Ok(())
}

#[tokio::test]
async fn samples_honour_max_tokens_and_num_samples() -> TestResult {
    let fake = FakeTinker::start(Options::default()).await;
    let tinker = client(&fake)?;
    let session = tinker.create_session().await?;
    let sampler = tinker
        .create_sampling_session(&session, 0, &SamplerSource::BaseModel(BASE.into()))
        .await?;
    let params = SamplingParams {
        max_tokens: Some(2),
        ..claas_params()
    };
    let pending = tinker.asample(&sampler, 0, &PROMPT, 3, &params).await?;
    assert_eq!(pending.sample_sequence_ids.len(), 3);
    let out = tinker.wait(&pending).await?;
    assert_eq!(out.sequences.len(), 3);
    for seq in &out.sequences {
        assert_eq!((seq.tokens.len(), seq.stop_reason), (2, StopReason::Length));
    }
    assert_ne!(out.sequences[0].tokens, out.sequences[1].tokens);
    Ok(())
}

/// A session with a rank-8 model on the base model: (client, session, model id).
async fn trained_model(fake: &FakeTinker) -> Result<(TinkerClient, String, String), Error> {
    let tinker = client(fake)?;
    let session = tinker.create_session().await?;
    let model = tinker.create_model(&session, 0, BASE, 8).await?;
    Ok((tinker, session, model))
}

#[tokio::test]
async fn a_5xx_on_submit_is_retried_until_it_succeeds() -> TestResult {
    let fake = FakeTinker::start(Options::default()).await;
    let (tinker, _, model) = trained_model(&fake).await?;
    fake.knobs().submit_errors.store(2, Ordering::SeqCst);
    tinker.optim_step(&model, 1, AdamParams::default()).await?;
    assert_eq!(fake.count("optim_step"), 3, "two 503s, then the step");
    Ok(())
}

#[tokio::test]
async fn a_5xx_past_the_retry_budget_is_a_retryable_error_naming_the_call() -> TestResult {
    let fake = FakeTinker::start(Options::default()).await;
    let (_, _, model) = trained_model(&fake).await?;
    let tinker = TinkerClient::new(Config {
        retry: RetryPolicy {
            max_attempts: 2,
            ..config(&fake, "tml-test").retry
        },
        ..config(&fake, "tml-test")
    })?;
    fake.knobs().submit_errors.store(5, Ordering::SeqCst);
    let err = tinker
        .optim_step(&model, 1, AdamParams::default())
        .await
        .err();
    let Some(err) = err else {
        panic!("the step succeeded through five 503s")
    };
    assert_eq!(
        (err.call(), err.status()),
        (Some("optim_step"), Some(503)),
        "{err}"
    );
    assert!(err.is_retryable(), "{err}");
    assert!(
        err.to_string().contains("injected failure of optim_step"),
        "{err}"
    );
    assert_eq!(fake.count("optim_step"), 2);
    Ok(())
}

#[tokio::test]
async fn a_5xx_on_the_poll_is_polled_through() -> TestResult {
    let fake = FakeTinker::start(Options::default()).await;
    let (tinker, _, model) = trained_model(&fake).await?;
    fake.knobs().poll_errors.store(2, Ordering::SeqCst);
    fake.knobs().try_again_polls.store(1, Ordering::SeqCst);
    let path = tinker.save_weights(&model, 1, "s").await?;
    assert_eq!(path.name, "s");
    Ok(())
}

#[tokio::test]
async fn a_future_that_stays_pending_hits_the_deadline_as_a_retryable_timeout() -> TestResult {
    let fake = FakeTinker::start(Options {
        long_poll: Duration::from_millis(100),
        ..Options::default()
    })
    .await;
    let tinker = TinkerClient::new(Config {
        future_deadline: Duration::from_millis(600),
        ..config(&fake, "tml-test")
    })?;
    let session = tinker.create_session().await?;
    fake.knobs().stall_futures.store(true, Ordering::SeqCst);
    let start = Instant::now();
    let err = tinker.create_model(&session, 0, BASE, 8).await.err();
    let Some(err) = err else {
        panic!("a stalled future completed")
    };
    assert!(
        matches!(
            err,
            Error::FutureTimeout {
                call: "create_model",
                ..
            }
        ),
        "{err}"
    );
    assert!(err.is_retryable());
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "{:?}",
        start.elapsed()
    );
    assert!(
        fake.count("retrieve_future") >= 2,
        "polled until the deadline"
    );
    Ok(())
}

#[tokio::test]
async fn a_key_without_the_tml_prefix_is_a_fatal_401_naming_the_call() -> TestResult {
    let fake = FakeTinker::start(Options::default()).await;
    let tinker = TinkerClient::new(config(&fake, "sk-not-a-tinker-key"))?;
    let err = tinker.create_session().await.err();
    let Some(err) = err else {
        panic!("a bad key was accepted")
    };
    assert_eq!(
        (err.call(), err.status()),
        (Some("create_session"), Some(401)),
        "{err}"
    );
    assert!(!err.is_retryable());
    assert!(err.to_string().contains("Invalid API key"), "{err}");
    assert_eq!(fake.calls(), Vec::<String>::new(), "refused at the gate");
    Ok(())
}

#[tokio::test]
async fn an_unknown_base_model_is_a_fatal_400_naming_create_model() -> TestResult {
    let fake = FakeTinker::start(Options::default()).await;
    let tinker = client(&fake)?;
    let session = tinker.create_session().await?;
    let err = tinker
        .create_model(&session, 0, "no/such-model", 8)
        .await
        .err();
    let Some(err) = err else {
        panic!("an unknown model was created")
    };
    assert_eq!(
        (err.call(), err.status()),
        (Some("create_model"), Some(400)),
        "{err}"
    );
    assert!(!err.is_retryable());
    assert!(err.to_string().contains("no/such-model"), "{err}");
    Ok(())
}

#[tokio::test]
async fn an_unknown_model_id_is_a_fatal_404_naming_the_call() -> TestResult {
    let fake = FakeTinker::start(Options::default()).await;
    let tinker = client(&fake)?;
    let err = tinker
        .optim_step("nobody:train:9", 1, AdamParams::default())
        .await
        .err();
    let Some(err) = err else {
        panic!("a step on no model succeeded")
    };
    assert_eq!(
        (err.call(), err.status()),
        (Some("optim_step"), Some(404)),
        "{err}"
    );
    assert!(!err.is_retryable());
    Ok(())
}

#[tokio::test]
async fn loading_an_unknown_checkpoint_is_a_fatal_user_failure() -> TestResult {
    let fake = FakeTinker::start(Options::default()).await;
    let tinker = client(&fake)?;
    let session = tinker.create_session().await?;
    let path: TinkerPath = "tinker://nobody:train:0/weights/missing".parse()?;
    let err = tinker.load_weights(&session, 0, &path, false).await.err();
    let Some(err) = err else {
        panic!("a missing checkpoint loaded")
    };
    assert!(
        matches!(&err, Error::RequestFailed { call: "load_weights", category, .. } if category == "user"),
        "{err}"
    );
    assert!(!err.is_retryable());
    Ok(())
}

#[tokio::test]
async fn an_expired_session_is_a_410_the_caller_can_recognise() -> TestResult {
    let fake = FakeTinker::start(Options::default()).await;
    let (tinker, session, model) = trained_model(&fake).await?;
    fake.expire_sessions();
    let heartbeat = tinker.session_heartbeat(&session).await.err();
    assert!(
        heartbeat.as_ref().is_some_and(Error::is_session_expired),
        "{heartbeat:?}"
    );
    let step = tinker
        .optim_step(&model, 1, AdamParams::default())
        .await
        .err();
    assert!(
        step.as_ref()
            .is_some_and(|e| e.is_session_expired() && !e.is_retryable()),
        "{step:?}"
    );
    Ok(())
}

#[test]
fn a_missing_key_is_a_clear_error() {
    let env = |pairs: &'static [(&'static str, &'static str)]| {
        move |name: &str| {
            let found = pairs.iter().find(|(k, _)| *k == name);
            found.map(|(_, v)| v.to_string())
        }
    };
    let err = Config::from_vars(env(&[("CLAAS_TINKER_API_KEY", "")])).err();
    assert!(matches!(err, Some(Error::MissingApiKey)), "{err:?}");
    let message = err.map(|e| e.to_string()).unwrap_or_default();
    assert!(message.contains("TINKER_API_KEY") && message.contains("CLAAS_TINKER_API_KEY"));

    let config = Config::from_vars(env(&[
        ("TINKER_API_KEY", " "),
        ("CLAAS_TINKER_API_KEY", "tml-from-claas"),
        ("TINKER_BASE_URL", "http://127.0.0.1:9/"),
    ]));
    let got = config
        .as_ref()
        .map(|c| (c.api_key.as_str(), c.base_url.as_str()));
    assert_eq!(got.ok(), Some(("tml-from-claas", "http://127.0.0.1:9")));
}
