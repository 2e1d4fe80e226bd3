//! The databases the inbox and outbox run on: the sealed [`Backend`] trait and its
//! SQLite and PostgreSQL implementations (each behind its cargo feature).
//!
//! Owns every SQL statement of the crate, so the dialect differences live in one place.
//! Must not decide anything about delivery: the inbox and the relay call these and
//! act on the results.

use std::future::Future;

/// A database the inbox and outbox run on: `sqlx::Sqlite` (feature `sqlite`,
/// default) or `sqlx::Postgres` (feature `postgres`). Sealed: the SQL of each
/// database is written and tested here.
pub trait Backend: sqlx::Database + sealed::Sql {}

#[cfg(feature = "sqlite")]
impl Backend for sqlx::Sqlite {}
#[cfg(feature = "postgres")]
impl Backend for sqlx::Postgres {}

pub(crate) use sealed::{OutboxRow, Sql};

pub(crate) mod sealed {
    use super::*;

    /// One row of `ackwire_outbox`, as read by the relay.
    #[derive(Debug, Clone)]
    pub struct OutboxRow {
        pub(crate) seq: i64,
        pub(crate) key: Vec<u8>,
        pub(crate) payload: Vec<u8>,
    }

    /// The statements, per database. Every method runs one short statement (or the
    /// idempotent migration) and maps nothing: errors are sqlx's.
    pub trait Sql: sqlx::Database + Sized {
        /// The migration script, shown in the crate docs.
        const MIGRATION: &'static str;

        /// Run [`Sql::MIGRATION`].
        fn migrate(pool: &sqlx::Pool<Self>) -> impl Future<Output = sqlx::Result<()>> + Send;

        /// Insert the inbox row unless it exists; the number of rows inserted (0 or 1).
        fn claim<'a>(
            conn: &'a mut Self::Connection,
            id: &'a [u8],
            now_ms: i64,
        ) -> impl Future<Output = sqlx::Result<u64>> + Send + 'a;

        /// Delete up to `limit` inbox rows claimed before `before_ms`, oldest first.
        fn cleanup(
            pool: &sqlx::Pool<Self>,
            before_ms: i64,
            limit: i64,
        ) -> impl Future<Output = sqlx::Result<u64>> + Send;

        /// Append one outbox row in the caller's transaction; returns its `seq`.
        #[allow(clippy::too_many_arguments)]
        fn enqueue<'a>(
            conn: &'a mut Self::Connection,
            target: i64,
            channel: i64,
            key: &'a [u8],
            payload: &'a [u8],
            now_ms: i64,
        ) -> impl Future<Output = sqlx::Result<i64>> + Send + 'a;

        /// The (target, channel) pairs that have outbox rows.
        fn streams(
            pool: &sqlx::Pool<Self>,
        ) -> impl Future<Output = sqlx::Result<Vec<(i64, i64)>>> + Send;

        /// The first `limit` rows of one stream, in `seq` order.
        fn fetch(
            pool: &sqlx::Pool<Self>,
            target: i64,
            channel: i64,
            limit: i64,
        ) -> impl Future<Output = sqlx::Result<Vec<OutboxRow>>> + Send;

        /// Delete the rows `seqs` of one stream (those not set aside). Exactly these:
        /// a range would also take a row that was set aside when the batch was
        /// fetched and put back (`rejected` = NULL) while it was in flight, which was
        /// never sent.
        fn delete(
            pool: &sqlx::Pool<Self>,
            target: i64,
            channel: i64,
            seqs: Vec<i64>,
        ) -> impl Future<Output = sqlx::Result<u64>> + Send;

        /// Set row `seq` aside as rejected for good, with `reason`.
        fn mark_rejected(
            pool: &sqlx::Pool<Self>,
            seq: i64,
            reason: &str,
        ) -> impl Future<Output = sqlx::Result<u64>> + Send;

        /// Rows set aside as rejected.
        fn rejected(pool: &sqlx::Pool<Self>) -> impl Future<Output = sqlx::Result<i64>> + Send;

        /// Rows waiting to be sent (not rejected).
        fn pending(pool: &sqlx::Pool<Self>) -> impl Future<Output = sqlx::Result<i64>> + Send;

        /// What a relay holds while it is the one relay that sends.
        type Leader: Send;

        /// Try to become the relay that sends (PostgreSQL: a session advisory lock on
        /// a connection of its own; SQLite: always). `None` while another holds it.
        fn try_lead(
            pool: &sqlx::Pool<Self>,
        ) -> impl Future<Output = sqlx::Result<Option<Self::Leader>>> + Send;

        /// Whether `leader` still holds the lead (its connection is alive).
        fn still_leading(leader: &mut Self::Leader) -> impl Future<Output = bool> + Send;

        /// Wake `wake` whenever an enqueueing transaction commits (PostgreSQL
        /// LISTEN/NOTIFY); `None` where the database has no such thing (SQLite).
        fn listen(
            pool: &sqlx::Pool<Self>,
            wake: std::sync::Arc<crate::outbox::Wake>,
            retry: std::time::Duration,
        ) -> Option<tokio::task::JoinHandle<()>>;

        /// Whether the error says "another transaction got in the way; retry": a
        /// serialization failure or deadlock (PostgreSQL), a busy or locked database
        /// (SQLite).
        fn is_conflict(code: &str) -> bool;
    }
}

#[cfg(feature = "sqlite")]
mod sqlite {
    use super::sealed::{OutboxRow, Sql};
    use sqlx::{Pool, Row, Sqlite, SqliteConnection};

    impl Sql for Sqlite {
        const MIGRATION: &'static str = include_str!("../migrations/sqlite.sql");

        async fn migrate(pool: &Pool<Self>) -> sqlx::Result<()> {
            // One write transaction: SQLite serializes it against other migrators.
            let mut tx = pool.begin_with("BEGIN IMMEDIATE").await?;
            sqlx::Executor::execute(&mut *tx, Self::MIGRATION).await?;
            tx.commit().await
        }

        async fn claim(conn: &mut SqliteConnection, id: &[u8], now_ms: i64) -> sqlx::Result<u64> {
            let done = sqlx::query(
                "INSERT INTO ackwire_inbox (id, claimed_at) VALUES (?1, ?2) \
                 ON CONFLICT (id) DO NOTHING",
            )
            .bind(id)
            .bind(now_ms)
            .execute(conn)
            .await?;
            Ok(done.rows_affected())
        }

        async fn cleanup(pool: &Pool<Self>, before_ms: i64, limit: i64) -> sqlx::Result<u64> {
            let done = sqlx::query(
                "DELETE FROM ackwire_inbox WHERE id IN (SELECT id FROM ackwire_inbox \
                 WHERE claimed_at < ?1 ORDER BY claimed_at LIMIT ?2)",
            )
            .bind(before_ms)
            .bind(limit)
            .execute(pool)
            .await?;
            Ok(done.rows_affected())
        }

        async fn enqueue(
            conn: &mut SqliteConnection,
            target: i64,
            channel: i64,
            key: &[u8],
            payload: &[u8],
            now_ms: i64,
        ) -> sqlx::Result<i64> {
            // SQLite has one writer at a time and the transaction holds the write
            // lock until it ends, so seq order is commit order.
            let row = sqlx::query(
                "INSERT INTO ackwire_outbox (target, channel, key, payload, created_at) \
                 VALUES (?1, ?2, ?3, ?4, ?5) RETURNING seq",
            )
            .bind(target)
            .bind(channel)
            .bind(key)
            .bind(payload)
            .bind(now_ms)
            .fetch_one(conn)
            .await?;
            row.try_get(0)
        }

        async fn streams(pool: &Pool<Self>) -> sqlx::Result<Vec<(i64, i64)>> {
            let rows = sqlx::query(
                "SELECT DISTINCT target, channel FROM ackwire_outbox WHERE rejected IS NULL",
            )
            .fetch_all(pool)
            .await?;
            rows.iter()
                .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
                .collect()
        }

        async fn fetch(
            pool: &Pool<Self>,
            target: i64,
            channel: i64,
            limit: i64,
        ) -> sqlx::Result<Vec<OutboxRow>> {
            let rows = sqlx::query(
                "SELECT seq, key, payload FROM ackwire_outbox \
                 WHERE target = ?1 AND channel = ?2 AND rejected IS NULL ORDER BY seq LIMIT ?3",
            )
            .bind(target)
            .bind(channel)
            .bind(limit)
            .fetch_all(pool)
            .await?;
            rows.iter()
                .map(|r| {
                    Ok(OutboxRow {
                        seq: r.try_get(0)?,
                        key: r.try_get(1)?,
                        payload: r.try_get(2)?,
                    })
                })
                .collect()
        }

        async fn delete(
            pool: &Pool<Self>,
            target: i64,
            channel: i64,
            seqs: Vec<i64>,
        ) -> sqlx::Result<u64> {
            // The seqs as one JSON array (one bind whatever the batch size).
            let list = format!(
                "[{}]",
                seqs.iter()
                    .map(i64::to_string)
                    .collect::<Vec<_>>()
                    .join(",")
            );
            let done = sqlx::query(
                "DELETE FROM ackwire_outbox WHERE target = ?1 AND channel = ?2 \
                 AND seq IN (SELECT value FROM json_each(?3)) AND rejected IS NULL",
            )
            .bind(target)
            .bind(channel)
            .bind(list)
            .execute(pool)
            .await?;
            Ok(done.rows_affected())
        }

        async fn mark_rejected(pool: &Pool<Self>, seq: i64, reason: &str) -> sqlx::Result<u64> {
            let done = sqlx::query("UPDATE ackwire_outbox SET rejected = ?1 WHERE seq = ?2")
                .bind(reason)
                .bind(seq)
                .execute(pool)
                .await?;
            Ok(done.rows_affected())
        }

        async fn rejected(pool: &Pool<Self>) -> sqlx::Result<i64> {
            sqlx::query("SELECT COUNT(*) FROM ackwire_outbox WHERE rejected IS NOT NULL")
                .fetch_one(pool)
                .await?
                .try_get(0)
        }

        async fn pending(pool: &Pool<Self>) -> sqlx::Result<i64> {
            sqlx::query("SELECT COUNT(*) FROM ackwire_outbox WHERE rejected IS NULL")
                .fetch_one(pool)
                .await?
                .try_get(0)
        }

        type Leader = ();

        async fn try_lead(_pool: &Pool<Self>) -> sqlx::Result<Option<()>> {
            // One process per database file: nothing to elect.
            Ok(Some(()))
        }

        async fn still_leading(_leader: &mut ()) -> bool {
            true
        }

        fn listen(
            _pool: &Pool<Self>,
            _wake: std::sync::Arc<crate::outbox::Wake>,
            _retry: std::time::Duration,
        ) -> Option<tokio::task::JoinHandle<()>> {
            None
        }

        fn is_conflict(code: &str) -> bool {
            // Extended result codes: the primary code is the low byte. SQLITE_BUSY (5)
            // and its extensions (BUSY_SNAPSHOT 517, BUSY_TIMEOUT 773…), SQLITE_LOCKED (6).
            code.parse::<i64>().is_ok_and(|c| matches!(c & 0xff, 5 | 6))
        }
    }
}

#[cfg(feature = "postgres")]
mod postgres {
    use super::sealed::{OutboxRow, Sql};
    use sqlx::postgres::{PgConnection, PgListener};
    use sqlx::{Pool, Postgres, Row};
    use std::sync::Arc;
    use std::time::Duration;

    /// How long the leader's liveness check (`SELECT 1` on its lock's session) may
    /// take before the relay steps down (see `still_leading`).
    const LEAD_CHECK_TIMEOUT: Duration = Duration::from_secs(10);

    /// The channel enqueue notifies and the relay listens on.
    const NOTIFY_CHANNEL: &str = "ackwire_outbox";

    /// `pg_advisory_xact_lock` key that serializes concurrent migrations.
    const MIGRATION_LOCK: i64 = 0x61636b_77697265; // "ackwire"

    impl Sql for Postgres {
        const MIGRATION: &'static str = include_str!("../migrations/postgres.sql");

        async fn migrate(pool: &Pool<Self>) -> sqlx::Result<()> {
            // CREATE ... IF NOT EXISTS is not safe against a concurrent twin in
            // PostgreSQL: serialize migrators on an advisory lock.
            let mut tx = pool.begin().await?;
            sqlx::query("SELECT pg_advisory_xact_lock($1)")
                .bind(MIGRATION_LOCK)
                .execute(&mut *tx)
                .await?;
            sqlx::Executor::execute(&mut *tx, Self::MIGRATION).await?;
            tx.commit().await
        }

        async fn claim(conn: &mut PgConnection, id: &[u8], now_ms: i64) -> sqlx::Result<u64> {
            // A concurrent, uncommitted insert of the same id makes this wait until
            // that transaction ends: then it does nothing (committed) or inserts
            // (rolled back). That wait is the pessimistic mode.
            let done = sqlx::query(
                "INSERT INTO ackwire_inbox (id, claimed_at) VALUES ($1, $2) \
                 ON CONFLICT (id) DO NOTHING",
            )
            .bind(id)
            .bind(now_ms)
            .execute(conn)
            .await?;
            Ok(done.rows_affected())
        }

        async fn cleanup(pool: &Pool<Self>, before_ms: i64, limit: i64) -> sqlx::Result<u64> {
            // SKIP LOCKED: two cleaners (replicas) split the work instead of queueing.
            let done = sqlx::query(
                "DELETE FROM ackwire_inbox WHERE id IN (SELECT id FROM ackwire_inbox \
                 WHERE claimed_at < $1 ORDER BY claimed_at LIMIT $2 FOR UPDATE SKIP LOCKED)",
            )
            .bind(before_ms)
            .bind(limit)
            .execute(pool)
            .await?;
            Ok(done.rows_affected())
        }

        async fn enqueue(
            conn: &mut PgConnection,
            target: i64,
            channel: i64,
            key: &[u8],
            payload: &[u8],
            now_ms: i64,
        ) -> sqlx::Result<i64> {
            // Serialize the stream's enqueuers until commit, so that seq order
            // (assigned at insert) is commit order and the relay never sees a
            // lower seq appear behind one it has already sent.
            sqlx::query("SELECT pg_advisory_xact_lock($1, $2)")
                .bind(stream_lock(target))
                .bind(channel as i32)
                .execute(&mut *conn)
                .await?;
            let row = sqlx::query(
                "INSERT INTO ackwire_outbox (target, channel, key, payload, created_at) \
                 VALUES ($1, $2, $3, $4, $5) RETURNING seq",
            )
            .bind(target)
            .bind(channel)
            .bind(key)
            .bind(payload)
            .bind(now_ms)
            .fetch_one(&mut *conn)
            .await?;
            // Delivered to listeners when (and only if) the transaction commits.
            sqlx::query("SELECT pg_notify($1, '')")
                .bind(NOTIFY_CHANNEL)
                .execute(&mut *conn)
                .await?;
            row.try_get(0)
        }

        async fn streams(pool: &Pool<Self>) -> sqlx::Result<Vec<(i64, i64)>> {
            let rows = sqlx::query(
                "SELECT DISTINCT target, channel FROM ackwire_outbox WHERE rejected IS NULL",
            )
            .fetch_all(pool)
            .await?;
            rows.iter()
                .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
                .collect()
        }

        async fn fetch(
            pool: &Pool<Self>,
            target: i64,
            channel: i64,
            limit: i64,
        ) -> sqlx::Result<Vec<OutboxRow>> {
            let rows = sqlx::query(
                "SELECT seq, key, payload FROM ackwire_outbox \
                 WHERE target = $1 AND channel = $2 AND rejected IS NULL ORDER BY seq LIMIT $3",
            )
            .bind(target)
            .bind(channel)
            .bind(limit)
            .fetch_all(pool)
            .await?;
            rows.iter()
                .map(|r| {
                    Ok(OutboxRow {
                        seq: r.try_get(0)?,
                        key: r.try_get(1)?,
                        payload: r.try_get(2)?,
                    })
                })
                .collect()
        }

        async fn delete(
            pool: &Pool<Self>,
            target: i64,
            channel: i64,
            seqs: Vec<i64>,
        ) -> sqlx::Result<u64> {
            let done = sqlx::query(
                "DELETE FROM ackwire_outbox WHERE target = $1 AND channel = $2 \
                 AND seq = ANY($3) AND rejected IS NULL",
            )
            .bind(target)
            .bind(channel)
            .bind(seqs)
            .execute(pool)
            .await?;
            Ok(done.rows_affected())
        }

        async fn mark_rejected(pool: &Pool<Self>, seq: i64, reason: &str) -> sqlx::Result<u64> {
            let done = sqlx::query("UPDATE ackwire_outbox SET rejected = $1 WHERE seq = $2")
                .bind(reason)
                .bind(seq)
                .execute(pool)
                .await?;
            Ok(done.rows_affected())
        }

        async fn rejected(pool: &Pool<Self>) -> sqlx::Result<i64> {
            sqlx::query("SELECT COUNT(*) FROM ackwire_outbox WHERE rejected IS NOT NULL")
                .fetch_one(pool)
                .await?
                .try_get(0)
        }

        async fn pending(pool: &Pool<Self>) -> sqlx::Result<i64> {
            sqlx::query("SELECT COUNT(*) FROM ackwire_outbox WHERE rejected IS NULL")
                .fetch_one(pool)
                .await?
                .try_get(0)
        }

        type Leader = PgConnection;

        async fn try_lead(pool: &Pool<Self>) -> sqlx::Result<Option<PgConnection>> {
            // A session lock, held as long as this connection lives: keyed by the
            // schema, so outboxes in different schemas have a relay each.
            // A pooled connection until the lock is granted: a relay that does not get
            // it (every poll of a follower) gives the connection back to the pool
            // instead of closing it, which made the pool open a new one each time.
            let mut conn = pool.acquire().await?;
            let (held,): (bool,) = sqlx::query_as(
                "SELECT pg_try_advisory_lock(hashtextextended('ackwire_outbox_relay:' || current_schema(), 0))",
            )
            .fetch_one(&mut *conn)
            .await?;
            if !held {
                return Ok(None);
            }
            let mut conn = conn.detach();
            // The server frees the lock when it sees this session end; a leader host
            // that vanishes without closing its connection (power loss, a partition)
            // would otherwise hold it until the server's TCP keepalive, by default
            // about two hours. With these, within about half a minute. (A Unix-socket
            // connection ignores them; `tcp_user_timeout` needs PostgreSQL 12, so each
            // is set on its own and a refusal is only logged.)
            for setting in [
                "SET tcp_keepalives_idle = 10",
                "SET tcp_keepalives_interval = 5",
                "SET tcp_keepalives_count = 3",
                "SET tcp_user_timeout = 30000",
            ] {
                if let Err(e) = sqlx::query(setting).execute(&mut conn).await {
                    tracing::debug!(error = %e, setting, "outbox relay: leader session setting refused");
                }
            }
            Ok(Some(conn))
        }

        async fn still_leading(leader: &mut PgConnection) -> bool {
            // Bounded: on a connection cut without a reset, the query would wait for
            // the kernel's retransmission timeout (about 15 minutes), and the relay
            // with it. A leader that cannot answer in time steps down and tries again.
            matches!(
                tokio::time::timeout(LEAD_CHECK_TIMEOUT, sqlx::query("SELECT 1").execute(leader))
                    .await,
                Ok(Ok(_))
            )
        }

        fn listen(
            pool: &Pool<Self>,
            wake: Arc<crate::outbox::Wake>,
            retry: Duration,
        ) -> Option<tokio::task::JoinHandle<()>> {
            let pool = pool.clone();
            Some(tokio::spawn(async move {
                loop {
                    match PgListener::connect_with(&pool).await {
                        Ok(mut listener) => match listener.listen(NOTIFY_CHANNEL).await {
                            Ok(()) => {
                                wake.set_listening(true);
                                // Catch up on whatever committed before LISTEN took.
                                wake.wake();
                                loop {
                                    match listener.try_recv().await {
                                        Ok(Some(_)) => wake.notified(),
                                        // Connection lost (reconnects on the next
                                        // call): notifications may be missed, so poll.
                                        Ok(None) => wake.wake(),
                                        Err(e) => {
                                            tracing::warn!(error = %e, "outbox LISTEN failed; polling until it is back");
                                            break;
                                        }
                                    }
                                }
                            }
                            Err(e) => {
                                tracing::warn!(error = %e, "outbox LISTEN failed; polling until it is back")
                            }
                        },
                        Err(e) => {
                            tracing::warn!(error = %e, "outbox listener cannot connect; polling until it can")
                        }
                    }
                    wake.set_listening(false);
                    if pool.is_closed() {
                        return;
                    }
                    tokio::time::sleep(retry).await;
                }
            }))
        }

        fn is_conflict(code: &str) -> bool {
            // serialization_failure, deadlock_detected, lock_not_available
            matches!(code, "40001" | "40P01" | "55P03")
        }
    }

    /// The advisory-lock key of a stream's target (the channel is the second key).
    fn stream_lock(target: i64) -> i32 {
        // Fold the 64-bit node id into the 32-bit key; a collision only serializes
        // two streams' enqueuers, never breaks anything.
        (target ^ (target >> 32)) as i32
    }
}
