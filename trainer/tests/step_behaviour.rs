//! What users of the trainer rely on beyond the fixtures: the request's learning rate is
//! the one applied (also after restoring optimizer state), every LoRA tensor trains and no
//! base weight gets a gradient, and bad input is a clear error, never a panic.

use std::collections::{BTreeMap, HashSet};

use candle_core::{Device, Tensor};
use claas_trainer::step::sample_loss;
use claas_trainer::{sdpo_step, AdamW, Error, LoraAdapter, Module, Qwen3, StepConfig, StepSample};
use common::{fixture, input, model};

mod common;
use rand::{Rng, SeedableRng};

fn snapshot(adapter: &LoraAdapter) -> BTreeMap<String, Tensor> {
    adapter
        .params()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().copy().expect("copy")))
        .collect()
}

/// Adapter and optimizer exactly as they stand after the fixture's step 1.
fn after_step1(model: &Qwen3) -> (LoraAdapter, AdamW) {
    let adapter =
        LoraAdapter::load(&fixture("adapter_init"), &model.config, &Device::Cpu).expect("init");
    let mut opt = AdamW::default();
    let (samples, cfg) = input("step1");
    sdpo_step(model, &adapter, &mut opt, &samples, &cfg).expect("step 1");
    (adapter, opt)
}

fn change(before: &BTreeMap<String, Tensor>, adapter: &LoraAdapter) -> BTreeMap<String, Tensor> {
    adapter
        .params()
        .iter()
        .map(|(k, v)| (k.clone(), (v.as_tensor() - &before[k]).expect("diff")))
        .collect()
}

fn max_abs(t: &Tensor) -> f32 {
    t.abs()
        .expect("abs")
        .max_all()
        .expect("max")
        .to_scalar()
        .expect("scalar")
}

#[test]
fn the_requests_learning_rate_applies_after_restoring_state() {
    let model = model();
    let (samples, cfg) = input("step2");
    let mut deltas = Vec::new();
    for lr in [0.0, cfg.learning_rate, 2.0 * cfg.learning_rate] {
        let (adapter, mut opt) = after_step1(&model);
        let before = snapshot(&adapter);
        let cfg = StepConfig {
            learning_rate: lr,
            ..cfg
        };
        sdpo_step(&model, &adapter, &mut opt, &samples, &cfg).expect("step 2");
        deltas.push(change(&before, &adapter));
    }
    for d in deltas[0].values() {
        assert_eq!(max_abs(d), 0.0, "lr = 0 changed the adapter");
    }
    for (key, single) in &deltas[1] {
        let double = &deltas[2][key];
        let expected = (single * 2.0).expect("scale");
        let err = max_abs(&(double - &expected).expect("diff"));
        let scale = max_abs(double);
        assert!(scale > 0.0, "{key} did not change");
        assert!(
            err <= 1e-3 * scale + 1e-9,
            "{key}: doubling lr changed the update by {err} (update {scale})"
        );
    }
}

#[test]
fn every_lora_tensor_trains_and_no_base_weight_gets_a_gradient() {
    let model = model();
    let adapter =
        LoraAdapter::load(&fixture("adapter_init"), &model.config, &Device::Cpu).expect("init");
    // Random non-zero A and B: with B = 0 the A gradients are zero by construction.
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    for var in adapter.params().values() {
        let data: Vec<f32> = (0..var.elem_count())
            .map(|_| rng.gen_range(-0.1..0.1))
            .collect();
        var.set(&Tensor::from_vec(data, var.dims(), &Device::Cpu).expect("t"))
            .expect("set");
    }
    let (samples, cfg) = input("step1");
    let out = sample_loss(&model, &adapter, &samples[0], &cfg).expect("loss");
    let grads = out.loss.backward().expect("backward");
    for (key, var) in adapter.params() {
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("{key}: no gradient"));
        assert!(max_abs(g) > 0.0, "{key}: zero gradient");
    }
    let c = &model.config;
    let mut base_shapes: HashSet<Vec<usize>> = Module::ALL
        .iter()
        .flat_map(|&m| {
            let (i, o) = c.shape_of(m);
            [vec![o, i], vec![i, o]]
        })
        .collect();
    // A gradient of `W` or of its transposed view (what a plain `x · Wᵀ` would keep).
    base_shapes.insert(vec![c.vocab_size, c.hidden_size]);
    base_shapes.insert(vec![c.hidden_size, c.vocab_size]);
    let lora_ids: HashSet<_> = adapter.params().values().map(|v| v.id()).collect();
    for id in grads.get_ids() {
        if lora_ids.contains(id) {
            continue;
        }
        let shape = grads.get_id(*id).expect("entry").dims().to_vec();
        assert!(
            !base_shapes.contains(&shape),
            "a gradient of shape {shape:?} (a base weight's) was computed"
        );
    }
}

#[test]
fn bad_input_is_a_clear_error() {
    let model = model();
    let adapter =
        LoraAdapter::load(&fixture("adapter_init"), &model.config, &Device::Cpu).expect("init");
    let (samples, cfg) = input("step1");
    let good = samples[0].clone();
    let mut past_vocab = good.response_token_ids.clone();
    past_vocab[1] = model.config.vocab_size as u32;
    let cases: Vec<(&str, StepSample, StepConfig)> = vec![
        (
            "outside the vocabulary",
            StepSample {
                response_token_ids: past_vocab,
                ..good.clone()
            },
            cfg,
        ),
        (
            "response is empty",
            StepSample {
                response_token_ids: vec![],
                response_logprobs: vec![],
                ..good.clone()
            },
            cfg,
        ),
        (
            "response log-probs for",
            StepSample {
                response_logprobs: good.response_logprobs[..2].to_vec(),
                ..good.clone()
            },
            cfg,
        ),
        (
            "maximum sequence length",
            StepSample {
                prompt_token_ids: good.prompt_token_ids.repeat(3),
                ..good.clone()
            },
            StepConfig {
                max_seq_len: 20,
                ..cfg
            },
        ),
    ];
    for (expect, sample, cfg) in cases {
        let before = snapshot(&adapter);
        let mut opt = AdamW::default();
        match sdpo_step(&model, &adapter, &mut opt, &[good.clone(), sample], &cfg) {
            Err(Error::InvalidSample { index, message }) => {
                assert!(message.contains(expect), "{expect:?} not in {message:?}");
                assert!(message.contains("sample 1"), "names the sample: {message}");
                assert_eq!(index, 1, "says which sample, for the worker to drop it");
            }
            other => panic!("{expect}: expected invalid input, got {other:?}"),
        }
        let unchanged = change(&before, &adapter)
            .values()
            .all(|d| max_abs(d) == 0.0);
        assert!(unchanged, "a rejected batch changed the adapter");
    }
    let mut opt = AdamW::default();
    assert!(matches!(
        sdpo_step(&model, &adapter, &mut opt, &[], &cfg),
        Err(Error::InvalidInput(_))
    ));
}

#[test]
fn a_new_adapter_has_the_checkpoints_shapes_and_starts_at_the_base() {
    let model = model();
    let cfg = claas_trainer::AdapterConfig {
        r: 8,
        lora_alpha: 16.0,
        target_modules: vec!["q_proj".into(), "down_proj".into()],
        use_rslora: false,
        base_model_name_or_path: None,
    };
    let adapter = LoraAdapter::init(&model.config, cfg, 1).expect("init");
    let c = &model.config;
    // head_dim 32 × 4 heads = 128 ≠ hidden 64: q's output comes from head_dim.
    let (a, b, scale) = adapter.pair(0, Module::Q).expect("q targeted");
    assert_eq!(a.dims(), [8, c.hidden_size]);
    assert_eq!(b.dims(), [c.num_attention_heads * c.head_dim, 8]);
    assert_eq!(scale, 2.0);
    assert!(adapter.pair(0, Module::K).is_none());
    assert_eq!(max_abs(b), 0.0);
    let bound = 1.0 / (c.hidden_size as f32).sqrt();
    assert!(max_abs(a) > 0.0 && max_abs(a) <= bound);
    let dir = claas_testutil::tempdir("init");
    adapter.save(&dir).expect("save");
    let back = LoraAdapter::load(&dir, &model.config, &Device::Cpu).expect("load");
    assert_eq!(back.params().len(), 2 * 2 * c.num_hidden_layers);
}

#[test]
fn activation_checkpointing_changes_nothing_but_memory() {
    let model = model();
    let mut results = Vec::new();
    for checkpoint in [false, true] {
        let adapter =
            LoraAdapter::load(&fixture("adapter_init"), &model.config, &Device::Cpu).expect("init");
        // Non-zero B, so every LoRA matrix has a gradient to compare.
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        for var in adapter.params().values() {
            let data: Vec<f32> = (0..var.elem_count())
                .map(|_| rng.gen_range(-0.05..0.05))
                .collect();
            var.set(&Tensor::from_vec(data, var.dims(), &Device::Cpu).expect("t"))
                .expect("set");
        }
        let mut opt = AdamW::default();
        let (samples, cfg) = input("step1");
        let cfg = StepConfig { checkpoint, ..cfg };
        let m = sdpo_step(&model, &adapter, &mut opt, &samples, &cfg).expect("step");
        results.push((m, snapshot(&adapter)));
    }
    let (plain, ckpt) = (&results[0], &results[1]);
    assert_eq!(plain.0.grad_norm, ckpt.0.grad_norm, "same gradients");
    assert_eq!(plain.0.total_loss, ckpt.0.total_loss);
    for (key, t) in &plain.1 {
        let d = max_abs(&(t - &ckpt.1[key]).expect("diff"));
        assert_eq!(d, 0.0, "{key} differs by {d}");
    }
}

/// On the CPU in f32 the model keeps second layouts of its weights for speed: the LM head's
/// is made by the first product of many rows (inference's scoring too), the projections'
/// only by training (their backward), so a process that only serves never pays for those.
#[test]
fn the_backward_layouts_are_made_by_training_not_by_inference() {
    let model = model();
    let c = model.config.clone();
    let held = model.weight_bytes();
    let ids: Vec<u32> = (0..8).collect();
    model.logits(&ids, 0, 8, None).expect("inference logits");
    let after_inference = model.weight_bytes();
    assert_eq!(after_inference - held, c.vocab_size * c.hidden_size * 4);

    let (adapter, _) = after_step1(&model);
    drop(adapter);
    let per_layer: usize = Module::ALL
        .iter()
        .map(|&m| {
            let (inp, out) = c.shape_of(m);
            inp * out * 4
        })
        .sum();
    assert_eq!(
        model.weight_bytes() - after_inference,
        c.num_hidden_layers * per_layer
    );
}
