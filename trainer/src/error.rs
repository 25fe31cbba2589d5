//! Trainer errors: bad input (the job fails, retrying cannot help) versus everything else.

/// What went wrong in the trainer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The batch or its config is invalid: token ids outside the vocabulary, an empty
    /// response, log-probs that do not match the response, a sequence over the limit.
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// One sample of the batch is invalid (`index` counts from 0 in batch order); the
    /// others may still train without it.
    #[error("invalid input: {message}")]
    InvalidSample { index: usize, message: String },
    /// A checkpoint, adapter or optimizer state on disk is missing or malformed.
    #[error("{0}")]
    Checkpoint(String),
    #[error("tensor error: {0}")]
    Candle(#[from] candle_core::Error),
    #[error("io error: {0}")]
    Io(#[from] std::io::Error),
    #[error("json error: {0}")]
    Json(#[from] serde_json::Error),
}

pub type Result<T> = std::result::Result<T, Error>;

pub(crate) fn invalid(msg: impl Into<String>) -> Error {
    Error::InvalidInput(msg.into())
}

pub(crate) fn checkpoint(msg: impl Into<String>) -> Error {
    Error::Checkpoint(msg.into())
}
