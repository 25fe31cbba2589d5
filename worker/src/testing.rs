//! Test support (feature `testing`): the tiny random Qwen3 checkpoint and the candle
//! executor the worker, engine and end-to-end suites (and the benches) run over it: on
//! the CPU, the base model resident in host memory, 4096 tokens, no object store and no
//! vLLM unless a test sets them.

use std::path::{Path, PathBuf};

use claas_core::config::{Residency, TrainerDevice};
use claas_trainer::random::{write_checkpoint, Preset};

use crate::candle::{CandleExecutor, CandleOptions};

/// Writes the tiny random Qwen3 to `dir` (`seed` picks its weights; the same seed, the
/// same bytes).
pub async fn tiny_checkpoint(dir: &Path, seed: u64) {
    let dir = dir.to_path_buf();
    tokio::task::spawn_blocking(move || write_checkpoint(Preset::Tiny, &dir, seed))
        .await
        .expect("join")
        .expect("the tiny checkpoint");
}

/// The options of a CPU candle executor: the checkpoint at `model_dir`, named
/// `base_model_id` by LoRAs, versions under `lora_root`.
pub fn cpu_options(
    base_model_id: &str,
    model_dir: impl Into<PathBuf>,
    lora_root: impl Into<PathBuf>,
) -> CandleOptions {
    CandleOptions {
        base_model_id: base_model_id.to_owned(),
        model_dir: model_dir.into(),
        lora_root: lora_root.into(),
        store: None,
        device: TrainerDevice::Cpu,
        residency: Residency::Host,
        max_seq_len: 4096,
        vllm: None,
    }
}

/// A tiny checkpoint written to `model_dir` and a CPU executor over it ([`cpu_options`]).
/// Host residency reads the checkpoint here: its files may go when this returns.
pub async fn tiny_executor(
    base_model_id: &str,
    model_dir: &Path,
    lora_root: impl Into<PathBuf>,
    seed: u64,
) -> CandleExecutor {
    tiny_checkpoint(model_dir, seed).await;
    CandleExecutor::new(cpu_options(base_model_id, model_dir, lora_root)).expect("executor")
}
