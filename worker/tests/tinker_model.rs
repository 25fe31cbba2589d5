//! The fake Tinker backed by the tiny candle model (`Options::model_dir`): its log-probs are
//! the model's, `forward_backward` differentiates the importance-sampling loss, and
//! `optim_step` moves the adapter the way the advantages say, which the sampler
//! checkpoint saved after it then serves.

use candle_core::{DType, Device};
use claas_core::testing::TEST_BASE_MODEL;
use claas_fake_tinker::{FakeTinker, Options};
use claas_tinker::{AdamParams, Config, Datum, LossFn, SamplerSource, TensorData, TinkerClient};
use claas_trainer::Qwen3;
use claas_worker::testing::tiny_checkpoint;

fn logprobs_of(out: &claas_tinker::ForwardBackwardOutput) -> Vec<f32> {
    match out.loss_fn_outputs.first().and_then(|o| o.get("logprobs")) {
        Some(TensorData::Float32(v)) => v.clone(),
        other => panic!("no logprobs: {other:?}"),
    }
}

#[tokio::test]
async fn the_model_computes_every_number_and_a_step_follows_the_advantages() {
    let dir = claas_testutil::tempdir("tinker-model");
    tiny_checkpoint(&dir, 9).await;
    let model = Qwen3::load(&dir, &Device::Cpu, DType::F32).expect("model");
    let fake = FakeTinker::start(Options {
        base_models: vec![TEST_BASE_MODEL.into()],
        model_dir: Some(dir.to_path_buf()),
        ..Options::default()
    })
    .await;
    let c = TinkerClient::new(Config::new(&fake.url, "tml-model")).expect("client");
    let session = c.create_session().await.expect("session");
    let ids: Vec<i32> = "The quick brown fox".bytes().map(i32::from).collect();
    let u: Vec<u32> = ids.iter().map(|&t| t as u32).collect();

    // Base log-probs are the model's own.
    let base = SamplerSource::BaseModel(TEST_BASE_MODEL.into());
    let sampler = c
        .create_sampling_session(&session, 0, &base)
        .await
        .expect("sampler");
    let got = c
        .compute_logprobs(&sampler, 0, &ids)
        .await
        .expect("logprobs");
    let want = claas_trainer::generate::token_logprobs(&model, &u, 1, None).expect("reference");
    assert_eq!(got[0], None);
    for (g, w) in got[1..].iter().zip(&want) {
        assert!((g.expect("a log-prob") - w).abs() < 1e-5, "{g:?} vs {w}");
    }

    // A step with positive advantages on every target makes those targets likelier.
    let trainee = c
        .create_model(&session, 0, TEST_BASE_MODEL, 4)
        .await
        .expect("model");
    let input = ids[..ids.len() - 1].to_vec();
    let targets: Vec<i64> = ids[1..].iter().map(|&t| i64::from(t)).collect();
    let datum = |old: Vec<f32>| {
        Datum::importance_sampling(
            input.clone(),
            targets.clone(),
            old,
            vec![1.0; targets.len()],
        )
    };
    let first = c
        .forward_backward(
            &trainee,
            1,
            &[datum(want.clone())],
            LossFn::ImportanceSampling,
        )
        .await
        .expect("forward_backward");
    let before = logprobs_of(&first);
    for (b, w) in before.iter().zip(&want) {
        assert!(
            (b - w).abs() < 1e-5,
            "a fresh LoRA is the base model: {b} vs {w}"
        );
    }
    let loss = first.metrics["loss:sum"];
    assert!(
        (loss + targets.len() as f64).abs() < 1e-3,
        "-Σ exp(0)·1 = -n: {loss}"
    );
    let adam = AdamParams {
        learning_rate: 1e-2,
        ..AdamParams::default()
    };
    c.optim_step(&trainee, 2, adam).await.expect("optim_step");
    let second = c
        .forward_backward(
            &trainee,
            3,
            &[datum(want.clone())],
            LossFn::ImportanceSampling,
        )
        .await
        .expect("forward again");
    let after = logprobs_of(&second);
    let mean = |v: &[f32]| v.iter().sum::<f32>() / v.len() as f32;
    assert!(
        mean(&after) > mean(&before) + 1e-3,
        "{before:?} -> {after:?}"
    );

    // The sampler checkpoint serves the trained adapter.
    let saved = c
        .save_weights_for_sampler(&trainee, 4, "step-1")
        .await
        .expect("save");
    let trained = SamplerSource::ModelPath(saved);
    let sampler = c
        .create_sampling_session(&session, 1, &trained)
        .await
        .expect("sampler");
    let served = c
        .compute_logprobs(&sampler, 0, &ids)
        .await
        .expect("logprobs");
    for (s, a) in served[1..].iter().zip(&after) {
        assert!((s.expect("a log-prob") - a).abs() < 1e-4, "{s:?} vs {a}");
    }
}
