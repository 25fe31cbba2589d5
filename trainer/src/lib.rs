//! The SDPO trainer: a differentiable Qwen3 with LoRA, the SDPO loss, AdamW with persisted
//! state, PEFT adapters and the Qwen3 chat template. No database and no HTTP: the worker's
//! distill phase calls [`step::sdpo_step`]. It imports no other crate of the workspace
//! (ARCHITECTURE.md).

pub mod adamw;
pub mod config;
pub mod error;
pub mod frozen;
mod gemv;
pub mod generate;
pub mod lora;
pub mod loss;
pub mod model;
pub mod random;
pub mod resolve;
pub mod step;
pub mod storage;
pub mod template;

pub use adamw::AdamW;
pub use config::{Module, Qwen3Config};
pub use error::{Error, Result};
pub use lora::{AdapterConfig, LoraAdapter};
pub use model::{KvCache, Qwen3};
pub use step::{sdpo_step, StepConfig, StepMetrics, StepSample};
pub use template::{ChatTokenizer, Message};

/// Deterministic values in [-1, 1] (xorshift) for the kernels' tests.
#[cfg(test)]
pub(crate) fn test_values(len: usize, seed: u32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(2_654_435_761).max(1);
    (0..len)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            (s % 2001) as f32 / 1000.0 - 1.0
        })
        .collect()
}
