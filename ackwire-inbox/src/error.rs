//! The crate's one error type, [`InboxError`]. Each variant says what the caller should
//! do. Must not log: callers decide.

/// Why an inbox or outbox operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum InboxError {
    /// Another transaction got in the way: a serialization failure or deadlock
    /// (PostgreSQL), a busy or locked database (SQLite, e.g. a transaction that read
    /// before it claimed and found a newer write). Roll the transaction back and run
    /// the handler again; do not ack the delivery before that (or drop it: it is then
    /// redelivered). The retry sees the other transaction's outcome.
    #[error("transaction conflict, roll back and retry: {0}")]
    Conflict(#[source] sqlx::Error),
    /// The database failed (connection lost, disk full, missing table: run
    /// [`migrate`](crate::migrate) first…). Roll back; do not ack the delivery (drop or
    /// nack it, it is redelivered). For the outbox, nothing was enqueued.
    #[error("database: {0}")]
    Database(#[source] sqlx::Error),
    /// A configuration value is out of range; the message names it. Fix the value.
    #[error("invalid configuration: {field} {reason}")]
    Config {
        /// The field.
        field: &'static str,
        /// The bound it broke.
        reason: &'static str,
    },
    /// The payload could not be encoded for the outbox (its `Serialize` failed);
    /// nothing was enqueued. Fix the value or its `Serialize` impl.
    #[error("cannot encode outbox payload: {0}")]
    Encode(String),
}

impl InboxError {
    /// Sort a database error into [`InboxError::Conflict`] or [`InboxError::Database`].
    pub(crate) fn from_sqlx<DB: crate::backend::Sql>(e: sqlx::Error) -> InboxError {
        let conflict = match &e {
            sqlx::Error::Database(db) => db.code().is_some_and(|c| DB::is_conflict(&c)),
            _ => false,
        };
        if conflict {
            InboxError::Conflict(e)
        } else {
            InboxError::Database(e)
        }
    }

    /// Whether rolling back and running the transaction again is the fix.
    pub fn is_conflict(&self) -> bool {
        matches!(self, InboxError::Conflict(_))
    }
}
