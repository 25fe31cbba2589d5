//! `claas model random`'s checkpoints load as real ones do, their ChatML template renders
//! plain conversations exactly as Qwen3's template does, and a step on them trains.

use std::path::Path;

use candle_core::{DType, Device};
use claas_testutil::tempdir;
use claas_trainer::random::{write_checkpoint, Preset};
use claas_trainer::template::{ChatTokenizer, Message};
use claas_trainer::{sdpo_step, AdamW, AdapterConfig, LoraAdapter, Qwen3, StepConfig, StepSample};

#[test]
fn the_chatml_template_renders_plain_conversations_as_qwen3_does() {
    let dir = tempdir("template");
    write_checkpoint(Preset::Tiny, &dir, 1).expect("write");
    let ours = ChatTokenizer::from_dir(&dir).expect("ours");
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tokenizer");
    let qwen3 = ChatTokenizer::from_dir(&fixtures).expect("qwen3");
    let conversations = [
        vec![
            Message::new("system", "You are a helpful assistant."),
            Message::new("user", "What is the capital of France?"),
        ],
        vec![
            Message::new("system", "Be brief."),
            Message::new("user", "Hi"),
            Message::new("assistant", "Hello! How can I help?"),
            Message::new("user", "Tell me a joke, no emoji 🙂"),
        ],
        vec![Message::new("user", "Hello!")],
    ];
    for kwargs in [
        serde_json::json!({}),
        serde_json::json!({"enable_thinking": false}),
    ] {
        let kwargs = kwargs.as_object().cloned().unwrap_or_default();
        for msgs in &conversations {
            let a = ours.render(msgs, true, &kwargs).expect("ours");
            let b = qwen3.render(msgs, true, &kwargs).expect("qwen3");
            assert_eq!(a, b);
            let ids = ours.encode(&a).expect("encode");
            assert_eq!(
                ours.decode(&ids).expect("decode"),
                a,
                "byte-level round trip"
            );
            assert_eq!(ids.first().copied(), ours.token_id("<|im_start|>"));
        }
    }
}

#[test]
fn a_random_tiny_checkpoint_loads_and_trains() {
    let dir = tempdir("train");
    write_checkpoint(Preset::Tiny, &dir, 2).expect("write");
    let model = Qwen3::load(&dir, &Device::Cpu, DType::F32).expect("load");
    assert_eq!(model.config, Preset::Tiny.config());
    let tok = ChatTokenizer::from_dir(&dir).expect("tokenizer");
    let cfg = AdapterConfig {
        r: 8,
        lora_alpha: 16.0,
        target_modules: claas_trainer::Module::ALL
            .iter()
            .map(|m| m.name().to_string())
            .collect(),
        use_rslora: false,
        base_model_name_or_path: None,
    };
    let adapter = LoraAdapter::init(&model.config, cfg, 3).expect("adapter");
    let prompt = tok
        .encode(
            &tok.render(&[Message::new("user", "Say hi")], true, &Default::default())
                .expect("render"),
        )
        .expect("ids");
    let response = tok.encode("Hello there!").expect("ids");
    let sample = StepSample {
        teacher_prompt_token_ids: tok
            .teacher_prompt_ids("", "Say hi", "shorter please")
            .expect("teacher"),
        prompt_token_ids: prompt,
        response_logprobs: vec![-6.0; response.len()],
        response_token_ids: response,
    };
    let step = StepConfig {
        learning_rate: 1e-2,
        alpha: 0.5,
        is_clip: 5.0,
        max_grad_norm: 1.0,
        kl_reg_weight: 0.0,
        teacher_top_k: 20,
        max_seq_len: 4096,
        checkpoint: false,
    };
    let mut opt = AdamW::default();
    let first = sdpo_step(
        &model,
        &adapter,
        &mut opt,
        std::slice::from_ref(&sample),
        &step,
    )
    .expect("step");
    let mut last = first.clone();
    for _ in 0..5 {
        last = sdpo_step(
            &model,
            &adapter,
            &mut opt,
            std::slice::from_ref(&sample),
            &step,
        )
        .expect("step");
    }
    assert!(
        last.total_loss < first.total_loss,
        "loss went {} -> {}",
        first.total_loss,
        last.total_loss
    );
}
