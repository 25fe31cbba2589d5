//! claas-core: configuration, domain types, the durable job queue (Postgres and SQLite)
//! and telemetry setup. Everything else in the workspace builds on this crate; it holds
//! all of the project's SQL. It imports no other crate of the workspace (ARCHITECTURE.md).

pub mod adapter_store;
pub mod config;
pub mod error;
pub mod queue;
pub mod telemetry;
pub mod thinking;
pub mod types;
pub mod vllm;

pub use error::{Error, Result};
#[cfg(feature = "testing")]
pub mod testing;
