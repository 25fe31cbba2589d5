//! What a process does itself with a base model on this machine: read its vocabulary (for
//! intake checks) and write version 0 of a new LoRA. `claas-engine` implements it with the
//! trainer; the API depends on neither candle nor the trainer, and a process without it
//! leaves version 0 to the first worker. (In-process inference is one [`crate::inference`]
//! backend, also from `claas-engine`.)

use std::path::Path;

use claas_core::types::NewLora;

/// The base models whose checkpoints are on this machine.
pub trait BaseModels: Send + Sync {
    /// The vocabulary size of `base_model`, when its checkpoint is here.
    fn vocab_size(&self, base_model: &str) -> Option<u64>;

    /// Writes version 0 of `lora` (PEFT's initialisation, the same bytes in every process)
    /// into `dir` when its base checkpoint is here, and returns the weights' sha256;
    /// `Ok(None)` when it is not (the first worker to train the LoRA writes it).
    fn write_initial_adapter(&self, dir: &Path, lora: &NewLora) -> Result<Option<String>, String>;
}
