//! claas-worker: the process that sits next to one GPU and its vLLM. It registers, claims
//! one job at a time from the shared queue, keeps the lease alive, walks the job's phases
//! through an [`Executor`], and publishes the new adapter version exactly once.
//!
//! It imports `claas-core` and `claas-trainer`, never the API (ARCHITECTURE.md).

pub mod candle;
pub mod executor;
pub mod feedback_log;
pub mod hub;
pub mod runtime;
pub mod serving;
pub mod simulated;
#[cfg(feature = "testing")]
pub mod testing;
pub mod tinker;
pub mod vllm;
pub mod vram;

pub use candle::{CandleExecutor, CandleOptions, CandleTrainer};
pub use executor::{
    AdapterSource, Distilled, Executor, JobContext, NoServing, PhaseError, ServedVersion, Serving,
    StoredAdapter, Trainer,
};
pub use runtime::{Worker, WorkerOptions};
pub use serving::{VllmOptions, VllmServing};
pub use simulated::SimulatedExecutor;
pub use tinker::TinkerTrainer;
