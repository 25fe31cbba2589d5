//! The core crate's error type. HTTP statuses are decided in `claas-api`, not here.

/// Errors from configuration, the queue store and domain validation.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The database could not be reached (connection refused, pool timed out). Retryable.
    #[error("database unavailable: {0}")]
    Unavailable(String),
    /// Any other database error.
    #[error("database error: {0}")]
    Database(sqlx::Error),
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// The named thing does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The request conflicts with the current state (job already finished, key reused).
    #[error("{0}")]
    Conflict(String),
    /// An `Idempotency-Key` was sent again with a different request body.
    #[error("{0}")]
    IdempotencyKeyReused(String),
    /// The input is malformed or out of range.
    #[error("{0}")]
    Invalid(String),
    /// A stored row could not be decoded: a bug or a hand-edited database.
    #[error("corrupt row: {0}")]
    Corrupt(String),
    /// A configuration value is missing or out of range; the message names the field.
    #[error("configuration error: {0}")]
    Config(String),
    /// Adapter storage (local files or the object store) failed.
    #[error("adapter storage: {0}")]
    Storage(String),
}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Self {
        Error::Storage(e.to_string())
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl From<sqlx::Error> for Error {
    fn from(e: sqlx::Error) -> Self {
        match e {
            sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::Io(_) => {
                Error::Unavailable(e.to_string())
            }
            sqlx::Error::Tls(_) => Error::Unavailable(e.to_string()),
            sqlx::Error::Database(ref db) if is_connection_failure(db.code().as_deref()) => {
                Error::Unavailable(e.to_string())
            }
            other => Error::Database(other),
        }
    }
}

/// SQLSTATE classes 08 (connection exception) and 57P (operator intervention: shutdown,
/// terminated backend) mean the server went away, not that the statement was wrong.
fn is_connection_failure(code: Option<&str>) -> bool {
    code.is_some_and(|c| c.starts_with("08") || c.starts_with("57P"))
}

impl Error {
    /// Whether retrying the same operation later may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(self, Error::Unavailable(_))
    }
}

impl From<serde_json::Error> for Error {
    fn from(e: serde_json::Error) -> Self {
        Error::Corrupt(e.to_string())
    }
}
