//! The golden distill-step fixture (`../shared/fixtures/distill_step`), shared by the
//! trainer's tests.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use claas_trainer::{Qwen3, StepConfig, StepSample};

pub fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../shared/fixtures/distill_step")
        .join(rel)
}

/// The fixture's tiny Qwen3 in f32 on the CPU.
pub fn model() -> Qwen3 {
    Qwen3::load(&fixture("base_model"), &Device::Cpu, DType::F32).expect("base model")
}

/// A step's samples and training config (`step1` or `step2`).
pub fn input(step: &str) -> (Vec<StepSample>, StepConfig) {
    let text = std::fs::read_to_string(fixture(&format!("{step}/input.json"))).expect("input");
    let doc: serde_json::Value = serde_json::from_str(&text).expect("json");
    let samples = serde_json::from_value(doc["samples"].clone()).expect("samples");
    let cfg = serde_json::from_value(doc["training"].clone()).expect("training");
    (samples, cfg)
}
