//! The inbox: a delivery's dedup record committed in the application's own
//! transaction, with the handler's effect ([`Inbox::claim`]), and its bounded,
//! time-based cleanup ([`Inbox::cleanup`], [`Inbox::spawn_cleanup`]).
//!
//! Owns the `ackwire_inbox` rows. Must not open or commit the application's
//! transactions: the application does, so the claim and the effect are one commit.

use crate::backend::Backend;
use crate::error::InboxError;
use ackwire::MessageId;
use std::marker::PhantomData;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// What [`Inbox::claim`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use = "a duplicate claim means: roll back, do not apply the effect, ack"]
pub enum Claim {
    /// First time: apply the effect in the same transaction, commit, then ack.
    Fresh,
    /// Already claimed by a committed transaction (an earlier delivery, or another
    /// replica that got there first): roll back without applying the effect, then ack.
    Duplicate,
}

/// Inbox settings. Every default is written on its field.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct InboxConfig {
    /// How long a claim is kept. A duplicate arriving later than this is processed
    /// again, so it must exceed the longest time a message can be re-sent after its
    /// first delivery: the sender's retry deadline, plus the hint TTL with hinted
    /// handoff, plus how long an outbox row can wait for its receipt (its relay retries
    /// until acked). Default 7 days; at least 1 ms, at most 100 years.
    pub retention: Duration,
    /// How often [`Inbox::spawn_cleanup`] runs. Default 60 s; at least 1 ms.
    pub cleanup_interval: Duration,
    /// Most rows one cleanup statement deletes, so it never holds locks on a large
    /// part of the table. Default 1000; 1 to 1 000 000.
    pub cleanup_batch: u32,
}

impl Default for InboxConfig {
    fn default() -> Self {
        InboxConfig {
            retention: Duration::from_secs(7 * 24 * 3600),
            cleanup_interval: Duration::from_secs(60),
            cleanup_batch: 1000,
        }
    }
}

impl InboxConfig {
    /// Longest accepted [`retention`](Self::retention): 100 years.
    pub const MAX_RETENTION: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

    /// With `retention`.
    pub fn with_retention(mut self, retention: Duration) -> Self {
        self.retention = retention;
        self
    }

    /// With the background cleanup running every `interval`, in statements of at most
    /// `batch` rows.
    pub fn with_cleanup(mut self, interval: Duration, batch: u32) -> Self {
        self.cleanup_interval = interval;
        self.cleanup_batch = batch;
        self
    }

    /// Check every value; the error names the field and the bound.
    pub fn validate(&self) -> Result<(), InboxError> {
        let ms = Duration::from_millis(1);
        if self.retention < ms || self.retention > Self::MAX_RETENTION {
            return Err(InboxError::Config {
                field: "retention",
                reason: "must be between 1 ms and 100 years",
            });
        }
        if self.cleanup_interval < ms {
            return Err(InboxError::Config {
                field: "cleanup_interval",
                reason: "must be at least 1 ms",
            });
        }
        if !(1..=1_000_000).contains(&self.cleanup_batch) {
            return Err(InboxError::Config {
                field: "cleanup_batch",
                reason: "must be between 1 and 1000000",
            });
        }
        Ok(())
    }
}

/// The inbox on database `DB` (`sqlx::Sqlite` or `sqlx::Postgres`).
///
/// Cheap to clone; holds only its configuration (the rows are in the database).
/// See the [crate docs](crate) for the handler pattern.
#[derive(Debug)]
pub struct Inbox<DB> {
    config: InboxConfig,
    _db: PhantomData<fn() -> DB>,
}

impl<DB> Clone for Inbox<DB> {
    fn clone(&self) -> Self {
        Inbox {
            config: self.config.clone(),
            _db: PhantomData,
        }
    }
}

impl<DB: Backend> Default for Inbox<DB> {
    /// An inbox with [`InboxConfig::default`].
    fn default() -> Self {
        Inbox {
            config: InboxConfig::default(),
            _db: PhantomData,
        }
    }
}

impl<DB: Backend> Inbox<DB> {
    /// An inbox with `config` (validated).
    pub fn new(config: InboxConfig) -> Result<Self, InboxError> {
        config.validate()?;
        Ok(Inbox {
            config,
            _db: PhantomData,
        })
    }

    /// Its configuration.
    pub fn config(&self) -> &InboxConfig {
        &self.config
    }

    /// Create the `ackwire_inbox` and `ackwire_outbox` tables if they do not exist
    /// (the same as [`crate::migrate`]; the SQL is in the crate docs).
    pub async fn migrate(pool: &sqlx::Pool<DB>) -> Result<(), InboxError> {
        crate::migrate(pool).await
    }

    /// Claim `id` inside the application's transaction `tx`.
    ///
    /// [`Claim::Fresh`]: this transaction inserted the claim; apply the effect in
    /// `tx`, commit, then ack. If `tx` rolls back (or the process dies first), the
    /// claim goes with it and a redelivery is `Fresh` again.
    ///
    /// [`Claim::Duplicate`]: a committed transaction holds the claim; roll back and
    /// ack without applying the effect.
    ///
    /// **Pessimistic**: if another transaction has claimed `id` and not yet ended,
    /// this call waits for it (PostgreSQL: the unique index's row lock; SQLite: the
    /// database's single write lock, up to the connection's `busy_timeout`, 5 s by
    /// default). It then returns `Duplicate` if that transaction committed, `Fresh` if
    /// it rolled back. So, with the claim as the handler's first statement, the
    /// handler's *body* runs once, not only its effect. On SQLite, claim before
    /// reading in the transaction (or begin it with
    /// `pool.begin_with("BEGIN IMMEDIATE")`): a transaction that read first and then
    /// meets a newer write fails with [`InboxError::Conflict`].
    ///
    /// Errors: [`InboxError::Conflict`] (roll back, run the handler again),
    /// [`InboxError::Database`] (roll back, do not ack).
    pub async fn claim(
        &self,
        tx: &mut sqlx::Transaction<'_, DB>,
        id: MessageId,
    ) -> Result<Claim, InboxError> {
        let key = crate::codec::message_id_bytes(id);
        let inserted = DB::claim(&mut **tx, &key, now_ms())
            .await
            .map_err(InboxError::from_sqlx::<DB>)?;
        Ok(if inserted == 1 {
            Claim::Fresh
        } else {
            Claim::Duplicate
        })
    }

    /// Delete at most `limit` claims older than the retention, oldest first; returns
    /// how many were deleted. One statement: call it again while it returns `limit`.
    /// A `limit` of 0 deletes nothing.
    pub async fn cleanup(&self, pool: &sqlx::Pool<DB>, limit: u32) -> Result<u64, InboxError> {
        if limit == 0 {
            return Ok(0);
        }
        let retention = i64::try_from(self.config.retention.as_millis()).unwrap_or(i64::MAX);
        let before = now_ms().saturating_sub(retention);
        DB::cleanup(pool, before, i64::from(limit))
            .await
            .map_err(InboxError::from_sqlx::<DB>)
    }

    /// Run [`cleanup`](Self::cleanup) every `cleanup_interval` in a background task,
    /// in statements of at most `cleanup_batch` rows until a statement deletes fewer.
    /// Errors are logged (warn) and retried at the next interval. The task stops when
    /// the returned [`CleanupTask`] is dropped or stopped. Must run inside a tokio
    /// runtime.
    pub fn spawn_cleanup(&self, pool: sqlx::Pool<DB>) -> CleanupTask {
        let inbox = self.clone();
        let deleted = Arc::new(AtomicU64::new(0));
        let counter = deleted.clone();
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(inbox.config.cleanup_interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                loop {
                    match inbox.cleanup(&pool, inbox.config.cleanup_batch).await {
                        Ok(n) => {
                            counter.fetch_add(n, Ordering::Relaxed);
                            if n < u64::from(inbox.config.cleanup_batch) {
                                break;
                            }
                            tokio::task::yield_now().await;
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "inbox cleanup failed; retrying at the next interval");
                            break;
                        }
                    }
                }
            }
        });
        CleanupTask { task, deleted }
    }
}

/// The background cleanup of [`Inbox::spawn_cleanup`]; dropping it stops the task.
#[derive(Debug)]
#[must_use = "dropping the CleanupTask stops the cleanup; keep it for as long as it should run"]
pub struct CleanupTask {
    task: tokio::task::JoinHandle<()>,
    deleted: Arc<AtomicU64>,
}

impl CleanupTask {
    /// Claims deleted so far.
    pub fn deleted(&self) -> u64 {
        self.deleted.load(Ordering::Relaxed)
    }

    /// Stop the task. A delete already sent to the database may still complete there
    /// (the claims it removes were past their retention anyway); it is not counted in
    /// [`CleanupTask::deleted`].
    pub fn stop(self) {}
}

impl Drop for CleanupTask {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Unix time in milliseconds (0 for a clock before 1970).
pub(crate) fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_bounds_are_checked() {
        assert!(InboxConfig::default().validate().is_ok());
        let zero = InboxConfig::default().with_retention(Duration::ZERO);
        assert!(matches!(
            zero.validate(),
            Err(InboxError::Config {
                field: "retention",
                ..
            })
        ));
        let huge = InboxConfig::default().with_retention(Duration::MAX);
        assert!(huge.validate().is_err());
        let c = InboxConfig {
            cleanup_batch: 0,
            ..InboxConfig::default()
        };
        assert!(matches!(
            c.validate(),
            Err(InboxError::Config {
                field: "cleanup_batch",
                ..
            })
        ));
        let c = InboxConfig {
            cleanup_interval: Duration::ZERO,
            ..InboxConfig::default()
        };
        assert!(c.validate().is_err());
        assert_eq!(
            InboxConfig::default().retention,
            Duration::from_secs(604_800)
        );
    }
}
