//! A Qwen3 checkpoint's `config.json`, as transformers 4 and 5 write it.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{checkpoint, Result};

/// The shape of a Qwen3 model. `head_dim` is explicit (Qwen3 heads are not hidden/heads).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Qwen3Config {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub tie_word_embeddings: bool,
    pub max_position_embeddings: usize,
}

#[derive(Deserialize)]
struct RawConfig {
    model_type: Option<String>,
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    rope_parameters: Option<RopeParameters>,
    #[serde(default)]
    tie_word_embeddings: bool,
    max_position_embeddings: Option<usize>,
}

#[derive(Deserialize)]
struct RopeParameters {
    rope_theta: Option<f64>,
}

impl Qwen3Config {
    /// Reads `config.json` from a checkpoint directory. RoPE's base may be top-level
    /// (`rope_theta`, transformers 4) or under `rope_parameters` (transformers 5).
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path)
            .map_err(|e| checkpoint(format!("cannot read {}: {e}", path.display())))?;
        Self::from_json(&text).map_err(|e| checkpoint(format!("{}: {e}", path.display())))
    }

    pub fn from_json(text: &str) -> Result<Self> {
        let raw: RawConfig = serde_json::from_str(text)?;
        if let Some(t) = raw.model_type.as_deref() {
            if t != "qwen3" {
                return Err(checkpoint(format!(
                    "model_type {t:?} is not supported (only qwen3)"
                )));
            }
        }
        let heads = raw.num_attention_heads;
        let kv = raw.num_key_value_heads.unwrap_or(heads);
        if heads == 0 || kv == 0 || !heads.is_multiple_of(kv) {
            return Err(checkpoint(format!(
                "num_attention_heads {heads} must be a positive multiple of num_key_value_heads {kv}"
            )));
        }
        let head_dim = raw.head_dim.unwrap_or(raw.hidden_size / heads);
        if head_dim == 0 || !head_dim.is_multiple_of(2) {
            return Err(checkpoint(format!(
                "head_dim {head_dim} must be even and positive"
            )));
        }
        let rope_theta = raw
            .rope_theta
            .or(raw.rope_parameters.and_then(|p| p.rope_theta))
            .unwrap_or(1_000_000.0);
        Ok(Qwen3Config {
            vocab_size: raw.vocab_size,
            hidden_size: raw.hidden_size,
            intermediate_size: raw.intermediate_size,
            num_hidden_layers: raw.num_hidden_layers,
            num_attention_heads: heads,
            num_key_value_heads: kv,
            head_dim,
            rms_norm_eps: raw.rms_norm_eps.unwrap_or(1e-6),
            rope_theta,
            tie_word_embeddings: raw.tie_word_embeddings,
            max_position_embeddings: raw.max_position_embeddings.unwrap_or(40_960),
        })
    }

    /// `(in, out)` features of a projection.
    pub fn shape_of(&self, m: Module) -> (usize, usize) {
        let (h, i) = (self.hidden_size, self.intermediate_size);
        let q = self.num_attention_heads * self.head_dim;
        let kv = self.num_key_value_heads * self.head_dim;
        match m {
            Module::Q => (h, q),
            Module::K | Module::V => (h, kv),
            Module::O => (q, h),
            Module::Gate | Module::Up => (h, i),
            Module::Down => (i, h),
        }
    }
}

/// The seven projections of a Qwen3 decoder layer, LoRA's possible targets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Module {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

impl Module {
    pub const ALL: [Module; 7] = [
        Module::Q,
        Module::K,
        Module::V,
        Module::O,
        Module::Gate,
        Module::Up,
        Module::Down,
    ];

    /// The PEFT `target_modules` name.
    pub fn name(self) -> &'static str {
        match self {
            Module::Q => "q_proj",
            Module::K => "k_proj",
            Module::V => "v_proj",
            Module::O => "o_proj",
            Module::Gate => "gate_proj",
            Module::Up => "up_proj",
            Module::Down => "down_proj",
        }
    }

    /// The block the projection sits in (`self_attn` or `mlp`).
    pub fn block(self) -> &'static str {
        match self {
            Module::Q | Module::K | Module::V | Module::O => "self_attn",
            Module::Gate | Module::Up | Module::Down => "mlp",
        }
    }

    pub fn parse(name: &str) -> Option<Module> {
        Module::ALL.into_iter().find(|m| m.name() == name)
    }

    pub(crate) fn index(self) -> usize {
        self as usize
    }
}
