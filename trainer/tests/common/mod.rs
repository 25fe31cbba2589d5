//! The golden distill-step fixtures, shared by the trainer's tests: the project's own
//! (`tests/fixtures/distill_step`, written by `scripts/make_golden.py`), and the reference
//! implementation's (`../shared/fixtures/distill_step`) as an extra check where that
//! folder is present.

#![allow(dead_code)]

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use claas_trainer::{Qwen3, StepConfig, StepSample};

/// The fixture folders (`tests/fixtures`, then `../shared/fixtures` when present).
pub fn roots() -> Vec<PathBuf> {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let own = repo.join("tests/fixtures");
    assert!(own.is_dir(), "{} is missing", own.display());
    let mut roots = vec![own];
    let shared = repo.join("../shared/fixtures");
    if shared.is_dir() {
        roots.push(shared);
    }
    roots
}

/// One set of distill-step fixtures.
pub struct Golden(PathBuf);

impl Golden {
    /// The project's own fixtures.
    pub fn own() -> Self {
        Golden(roots().remove(0).join("distill_step"))
    }

    /// Every set there is: the project's, then the reference's when present.
    pub fn all() -> Vec<Self> {
        roots()
            .into_iter()
            .map(|r| Golden(r.join("distill_step")))
            .collect()
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.0.join(rel)
    }

    /// The fixture's tiny Qwen3 in f32 on the CPU.
    pub fn model(&self) -> Qwen3 {
        Qwen3::load(&self.path("base_model"), &Device::Cpu, DType::F32).expect("base model")
    }

    /// A step's samples and training config (`step1` or `step2`).
    pub fn input(&self, step: &str) -> (Vec<StepSample>, StepConfig) {
        let text =
            std::fs::read_to_string(self.path(&format!("{step}/input.json"))).expect("input");
        let doc: serde_json::Value = serde_json::from_str(&text).expect("json");
        let samples = serde_json::from_value(doc["samples"].clone()).expect("samples");
        let cfg = serde_json::from_value(doc["training"].clone()).expect("training");
        (samples, cfg)
    }
}

impl std::fmt::Display for Golden {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0.display())
    }
}

pub fn fixture(rel: &str) -> PathBuf {
    Golden::own().path(rel)
}

pub fn model() -> Qwen3 {
    Golden::own().model()
}

pub fn input(step: &str) -> (Vec<StepSample>, StepConfig) {
    Golden::own().input(step)
}
