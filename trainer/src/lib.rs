//! The SDPO trainer: a differentiable Qwen3 with LoRA, the SDPO loss and AdamW.
//!
//! Empty until the trainer issue lands; the worker's distill phase is pluggable meanwhile.
