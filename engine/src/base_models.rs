//! The base-model files the API reads and writes, through the trainer: a checkpoint's
//! vocabulary size and version 0 of a new LoRA.

use std::path::{Path, PathBuf};

use claas_api::in_process::BaseModels;
use claas_core::types::NewLora;
use claas_trainer::resolve::existing_model_dir;
use claas_trainer::{AdapterConfig, Qwen3Config};

/// Base models found as the trainer finds them (a directory, a preset already created under
/// `data_dir/models`, the Hugging Face cache); never creates or downloads one.
pub struct TrainerModels {
    data_dir: PathBuf,
}

impl TrainerModels {
    pub fn new(data_dir: impl Into<PathBuf>) -> TrainerModels {
        TrainerModels {
            data_dir: data_dir.into(),
        }
    }
}

impl BaseModels for TrainerModels {
    fn vocab_size(&self, base_model: &str) -> Option<u64> {
        // Only `vocab_size` is read: a checkpoint of another architecture still has one.
        let dir = existing_model_dir(base_model, &self.data_dir)?;
        let text = std::fs::read_to_string(dir.join("config.json")).ok()?;
        serde_json::from_str::<serde_json::Value>(&text).ok()?["vocab_size"].as_u64()
    }

    fn write_initial_adapter(&self, dir: &Path, lora: &NewLora) -> Result<Option<String>, String> {
        let Some(model_dir) = existing_model_dir(&lora.base_model, &self.data_dir) else {
            return Ok(None);
        };
        let model = Qwen3Config::from_dir(&model_dir).map_err(|e| e.to_string())?;
        let config = AdapterConfig::for_lora(
            lora.rank,
            lora.alpha,
            lora.target_modules.clone(),
            &lora.base_model,
        );
        claas_trainer::storage::write_initial_adapter(dir, &lora.lora_id, &model, config)
            .map(Some)
            .map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_vocabulary_is_read_from_a_checkpoints_config() {
        let root = claas_testutil::tempdir("vocab");
        let dir = root.join("model");
        std::fs::create_dir_all(&dir).expect("dir");
        std::fs::write(dir.join("config.json"), r#"{"vocab_size": 1000}"#).expect("config");
        let models = TrainerModels::new(root.join("data"));
        let id = dir.display().to_string();
        assert_eq!(models.vocab_size(&id), Some(1000));
        assert_eq!(models.vocab_size("no/such-model"), None);
    }
}
