//! claas-eval: the eval harness's parts, as CLaaS's eval defines them: the configuration
//! (`configs/eval.yaml` + Hydra-style overrides), preferences (`configs/preferences/*.yaml`)
//! and their verifiers, and the text metrics (self-ROUGE-L, entropy of the top log-probs,
//! the IFEval-style checks, the coding probe). The run loop, outputs and plots that drive
//! a running API with them are the rest of issue 9.

pub mod config;
pub mod preferences;
pub mod text;
pub mod verifiers;
