//! claas-eval: the eval harness's parts, as CLaaS's eval defines them: the configuration
//! (`configs/eval.yaml` + Hydra-style overrides), preferences (`configs/preferences/*.yaml`)
//! and their verifiers, and the text metrics (self-ROUGE-L, entropy of the top log-probs,
//! the IFEval-style checks, the coding probe and the sandbox its code runs in), and the run
//! loop that drives a running claas with them and writes CLaaS's output files.
//!
//! It imports only `claas-core` and reaches claas over HTTP, as CLaaS's harness does.

pub mod client;
pub mod config;
pub mod plots;
pub mod preferences;
pub mod results;
pub mod run;
pub mod sandbox;
pub mod text;
pub mod verifiers;
