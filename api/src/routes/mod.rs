//! HTTP handlers, one module per resource.

pub mod feedback;
pub mod health;
pub mod inference;
mod inference_adapters;
pub mod inference_schema;
mod inference_stream;
pub mod inference_vllm;
pub mod jobs;
pub mod keys;
pub mod lora;
pub mod lora_delete;
pub mod lora_id;
pub mod lora_versions;
mod rollout;
pub mod sampler;
