//! The values CLaaS's calls take and return: datums and forward_backward outputs (protobuf
//! on the wire), sampling parameters and results, Adam parameters, model info.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::proto;

/// A 1-D tensor in one of the two public dtypes (§3.2).
#[derive(Debug, Clone, PartialEq)]
pub enum TensorData {
    Int64(Vec<i64>),
    Float32(Vec<f32>),
}

impl TensorData {
    pub fn as_f32(&self) -> Option<&[f32]> {
        match self {
            TensorData::Float32(v) => Some(v),
            TensorData::Int64(_) => None,
        }
    }
    pub fn as_i64(&self) -> Option<&[i64]> {
        match self {
            TensorData::Int64(v) => Some(v),
            TensorData::Float32(_) => None,
        }
    }
    fn to_proto(&self) -> proto::Tensor {
        let (dense, dtype) = match self {
            TensorData::Int64(v) => (proto::pack_i64(v), proto::DTYPE_INT64),
            TensorData::Float32(v) => (proto::pack_f32(v), proto::DTYPE_FLOAT32),
        };
        proto::Tensor {
            dense: Some(dense),
            dtype,
            shape: Vec::new(),
        }
    }
}

/// One training example: input tokens and the loss function's named inputs (§3.3).
#[derive(Debug, Clone, PartialEq)]
pub struct Datum {
    pub model_input: Vec<i32>,
    pub loss_fn_inputs: BTreeMap<String, TensorData>,
}

impl Datum {
    /// CLaaS's datum for `importance_sampling`: for a sequence `full` of prompt and response,
    /// `model_input = full[..n-1]`, `target_tokens = full[1..]`, and the sampler's log-probs
    /// and the advantages, one per target (zero over the prompt).
    pub fn importance_sampling(
        model_input: Vec<i32>,
        target_tokens: Vec<i64>,
        logprobs: Vec<f32>,
        advantages: Vec<f32>,
    ) -> Datum {
        let loss_fn_inputs = BTreeMap::from([
            ("target_tokens".to_owned(), TensorData::Int64(target_tokens)),
            ("logprobs".to_owned(), TensorData::Float32(logprobs)),
            ("advantages".to_owned(), TensorData::Float32(advantages)),
        ]);
        Datum {
            model_input,
            loss_fn_inputs,
        }
    }

    pub(crate) fn to_proto(&self) -> proto::Datum {
        let chunk = proto::Chunk {
            encoded_text: Some(proto::EncodedTextChunk {
                tokens: proto::pack_i32(&self.model_input),
            }),
        };
        let loss_fn_inputs = self
            .loss_fn_inputs
            .iter()
            .map(|(k, v)| (k.clone(), v.to_proto()))
            .collect();
        proto::Datum {
            model_input: vec![chunk],
            loss_fn_inputs,
        }
    }
}

/// The loss functions this client names (the SDK knows more, §6.5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LossFn {
    ImportanceSampling,
    CrossEntropy,
}

impl LossFn {
    pub fn as_str(self) -> &'static str {
        match self {
            LossFn::ImportanceSampling => "importance_sampling",
            LossFn::CrossEntropy => "cross_entropy",
        }
    }
}

/// A forward_backward result: per-datum outputs (for importance sampling, `logprobs` of the
/// targets under the current weights) and metrics keyed `name:reduction` (`loss:sum`).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ForwardBackwardOutput {
    pub loss_fn_output_type: String,
    pub loss_fn_outputs: Vec<BTreeMap<String, TensorData>>,
    pub metrics: BTreeMap<String, f64>,
}

/// Adam's settings for one `optim_step`; the defaults are the SDK's.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct AdamParams {
    pub learning_rate: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    pub grad_clip_norm: f64,
}

impl Default for AdamParams {
    fn default() -> Self {
        AdamParams {
            learning_rate: 1e-4,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-12,
            weight_decay: 0.0,
            grad_clip_norm: 0.0,
        }
    }
}

/// `optim_step`'s result.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
pub struct OptimStepResponse {
    #[serde(default)]
    pub metrics: Option<BTreeMap<String, f64>>,
}

/// Where sampling stops, besides `max_tokens`.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Stop {
    Strings(Vec<String>),
    Tokens(Vec<i32>),
}

/// Sampling settings (§3.5); the defaults are the SDK's (`top_k: -1` is "no limit").
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SamplingParams {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seed: Option<i64>,
    /// `None` keeps the implicit stop at EOS; `Some(empty)` turns every stop off.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stop: Option<Stop>,
    pub temperature: f64,
    pub top_k: i64,
    pub top_p: f64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            max_tokens: None,
            seed: None,
            stop: None,
            temperature: 1.0,
            top_k: -1,
            top_p: 1.0,
        }
    }
}

/// Why a sampled sequence ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// A stop token or string (or EOS).
    Stop,
    /// `max_tokens`.
    Length,
}

#[derive(Debug, Clone, PartialEq)]
pub struct SampledSequence {
    pub tokens: Vec<i32>,
    /// One per token, when the server sent them.
    pub logprobs: Option<Vec<f32>>,
    pub stop_reason: StopReason,
    /// With `topk_sample_logprobs`: per token, the most likely `(token, log-prob)` pairs at
    /// its position, best first (the sentinel padding dropped).
    pub top: Option<Vec<Vec<(i32, f32)>>>,
}

/// An `asample` result.
#[derive(Debug, Clone, PartialEq)]
pub struct SampleResponse {
    pub sequences: Vec<SampledSequence>,
    /// With `prompt_logprobs`: one per prompt token, `None` where none was computed
    /// (position 0).
    pub prompt_logprobs: Option<Vec<Option<f32>>>,
}

/// What a sampling session samples from (§6.10).
#[derive(Debug, Clone, PartialEq)]
pub enum SamplerSource {
    BaseModel(String),
    ModelPath(crate::TinkerPath),
}

/// `get_info`'s answer (§6.4).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ModelInfo {
    pub model_id: String,
    pub model_data: ModelData,
    #[serde(default)]
    pub is_lora: Option<bool>,
    #[serde(default)]
    pub lora_rank: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ModelData {
    #[serde(default)]
    pub arch: Option<String>,
    #[serde(default)]
    pub model_name: Option<String>,
    #[serde(default)]
    pub tokenizer_id: Option<String>,
}

/// `get_server_capabilities`' answer (§6.12).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ServerCapabilities {
    pub supported_models: Vec<SupportedModel>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct SupportedModel {
    #[serde(default)]
    pub model_name: Option<String>,
    #[serde(default)]
    pub max_context_length: Option<u64>,
}
