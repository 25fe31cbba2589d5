//! The GPU's precision on the CPU (issue 28): base weights in bf16, the adapter, its
//! gradients and AdamW's moments in f32, as the CUDA worker trains (`worker/src/candle.rs`
//! picks bf16 on CUDA). It is the same code path with another dtype, so the CPU checks it:
//! two fixture steps stay within bf16's tolerance of the f32 reference, and every LoRA
//! gradient is finite and non-zero.

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor};
use claas_trainer::step::sample_loss;
use claas_trainer::{sdpo_step, AdamW, LoraAdapter, Qwen3};
use common::Golden;
use serde_json::Value;

mod common;

/// bf16 keeps 8 bits of mantissa (relative rounding 2^-9 ≈ 0.2 %) on every base weight and
/// activation. The step's metrics may move by this much, relative.
const METRIC_REL: f64 = 5e-2;
/// AdamW's first steps move every weight by about ±lr whatever its gradient's size, so an
/// element whose gradient is near zero may step the other way under bf16: the adapters are
/// compared by their whole update's direction (cosine over all LoRA values), not elementwise.
const MIN_UPDATE_COSINE: f64 = 0.85;
/// The LoRA gradients themselves (what AdamW normalises away) at the same adapter: their
/// relative L2 distance from the f32 model's.
const GRAD_REL: f64 = 5e-2;

fn bf16_model(golden: &Golden) -> Qwen3 {
    Qwen3::load(&golden.path("base_model"), &Device::Cpu, DType::BF16).expect("bf16 base model")
}

/// Every LoRA tensor's values, by key.
type Values = BTreeMap<String, Vec<f32>>;

fn values(t: &Tensor) -> Vec<f32> {
    t.flatten_all().expect("flat").to_vec1().expect("vec")
}

fn snapshot(adapter: &LoraAdapter) -> Values {
    adapter
        .params()
        .iter()
        .map(|(k, v)| (k.clone(), values(v.as_tensor())))
        .collect()
}

fn load(golden: &Golden, rel: &str) -> Values {
    candle_core::safetensors::load(golden.path(rel), &Device::Cpu)
        .expect("adapter")
        .iter()
        .map(|(k, t)| (k.clone(), values(t)))
        .collect()
}

/// Cosine between two updates (`after - before` of each), over every LoRA value.
fn update_cosine(got: (&Values, &Values), want: (&Values, &Values)) -> f64 {
    let (mut dot, mut gg, mut ww) = (0.0f64, 0.0f64, 0.0f64);
    for (key, after) in got.1 {
        let (before, w_after, w_before) = (&got.0[key], &want.1[key], &want.0[key]);
        for i in 0..after.len() {
            let g = f64::from(after[i] - before[i]);
            let w = f64::from(w_after[i] - w_before[i]);
            dot += g * w;
            gg += g * g;
            ww += w * w;
        }
    }
    dot / (gg.sqrt() * ww.sqrt()).max(1e-30)
}

#[test]
fn two_steps_on_a_bf16_base_stay_near_the_f32_reference() {
    let golden = Golden::own();
    let model = bf16_model(&golden);
    let adapter =
        LoraAdapter::load(&golden.path("adapter_init"), &model.config, &Device::Cpu).expect("init");
    assert!(
        adapter.params().values().all(|v| v.dtype() == DType::F32),
        "the adapter is the f32 master copy"
    );
    let mut opt = AdamW::default();
    let mut worst = (0.0f64, 1.0f64);
    let mut before = snapshot(&adapter);
    for step in ["step1", "step2"] {
        let (samples, cfg) = golden.input(step);
        let got = sdpo_step(&model, &adapter, &mut opt, &samples, &cfg).expect(step);
        let got = serde_json::to_value(&got).expect("metrics");
        let text = std::fs::read_to_string(golden.path(&format!("{step}/expected_metrics.json")))
            .expect("expected");
        let want: Value = serde_json::from_str(&text).expect("json");
        for key in ["total_loss", "distill_loss", "mean_is_ratio", "grad_norm"] {
            let (g, w) = (
                got[key].as_f64().expect("got"),
                want[key].as_f64().expect("want"),
            );
            assert!(g.is_finite(), "{step} {key} is {g}");
            let rel = (g - w).abs() / w.abs().max(1e-6);
            worst.0 = worst.0.max(rel);
            assert!(
                rel <= METRIC_REL,
                "{step} {key}: bf16 {g}, f32 {w} ({rel:.2e})"
            );
        }
        let after = snapshot(&adapter);
        let prev = if step == "step1" {
            "adapter_init"
        } else {
            "step1"
        };
        let want_before = load(&golden, &format!("{prev}/adapter_model.safetensors"));
        let want_after = load(&golden, &format!("{step}/adapter_model.safetensors"));
        assert!(
            after.values().flatten().all(|x| x.is_finite()),
            "{step}: finite"
        );
        let cos = update_cosine((&before, &after), (&want_before, &want_after));
        worst.1 = worst.1.min(cos);
        println!("{step}: update cosine {cos:.5}");
        assert!(
            cos >= MIN_UPDATE_COSINE,
            "{step}: the bf16 update points {cos:.4} (cosine) along the f32 one"
        );
        before = after;
    }
    println!(
        "bf16 base vs f32 reference: metrics within {:.2e} relative, updates' cosine >= {:.5}",
        worst.0, worst.1
    );
}

#[test]
fn lora_gradients_on_a_bf16_base_are_finite_non_zero_and_near_f32() {
    let golden = Golden::own();
    let (bf16, f32) = (bf16_model(&golden), golden.model());
    // At the reference's adapter after step 1 (B = 0 at init gives A no gradient).
    let adapter =
        LoraAdapter::load(&golden.path("adapter_init"), &f32.config, &Device::Cpu).expect("init");
    for (key, t) in
        candle_core::safetensors::load(golden.path("step1/adapter_model.safetensors"), &Device::Cpu)
            .expect("step 1 adapter")
    {
        adapter.params()[&key].set(&t).expect("set");
    }
    let (samples, cfg) = golden.input("step2");
    let grads = |model: &Qwen3| -> Values {
        let out = sample_loss(model, &adapter, &samples[0], &cfg).expect("loss");
        let g = out.loss.backward().expect("backward");
        adapter
            .params()
            .iter()
            .map(|(k, v)| {
                let t = g
                    .get(v.as_tensor())
                    .unwrap_or_else(|| panic!("{k}: no gradient"));
                assert_eq!(t.dtype(), DType::F32, "{k}: the gradient is f32");
                (k.clone(), values(t))
            })
            .collect()
    };
    let (got, want) = (grads(&bf16), grads(&f32));
    let (mut diff, mut norm) = (0.0f64, 0.0f64);
    for (key, g) in &got {
        assert!(
            g.iter().all(|x| x.is_finite()),
            "{key}: a non-finite gradient"
        );
        assert!(g.iter().any(|x| *x != 0.0), "{key}: zero gradient");
        for (a, b) in g.iter().zip(&want[key]) {
            diff += f64::from(a - b).powi(2);
            norm += f64::from(*b).powi(2);
        }
    }
    let rel = (diff / norm).sqrt();
    println!("LoRA gradients, bf16 base vs f32: {rel:.3e} relative (L2)");
    assert!(
        rel <= GRAD_REL,
        "the bf16 gradients are {rel:.3e} (L2) from f32's"
    );
}
