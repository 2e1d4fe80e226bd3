//! # ackwire-inbox
//!
//! Effectively-once beyond one process, on the application's own database: a
//! transactional **inbox** (the dedup record of a delivery commits in the same
//! transaction as the handler's effect) and a transactional **outbox** (an outgoing
//! message commits in the same transaction as the business change that caused it,
//! and a relay sends it). The pattern of NServiceBus's outbox and MassTransit's
//! transactional inbox/outbox, without a broker.
//!
//! ## Why
//!
//! [`ackwire`]'s effectively-once channel dedups in the receiving process. Two gaps
//! are left that only the application's own state can close (the end-to-end
//! argument):
//!
//! * a handler that crashes **after its effect committed but before `ack()`** sees
//!   the message again. ackwire's durable dedup does not help: its record is written
//!   when the ack is (`ack()`, or `ack_durable()` which waits for its fsync), after
//!   the effect's commit, so a kill between the two applies the effect twice
//!   (`tests/kill9.rs`,
//!   `receiver_kill9_between_commit_and_ack_with_durable_dedup_applies_effects_twice`,
//!   shows it). With the inbox the
//!   claim row and the effect are one commit: either both are there (the redelivery
//!   finds [`Claim::Duplicate`]) or neither (the redelivery applies it for the first
//!   time). `tests/kill9.rs` kills receivers in exactly that window, repeatedly, and
//!   checks that no effect is ever applied twice.
//! * a sender that crashes loses its in-flight messages, and a business change and
//!   the message announcing it cannot be committed together. With the outbox the
//!   message is a row in the same transaction; the relay sends committed rows and
//!   deletes them only once acknowledged, so a crash anywhere means the row is sent
//!   again under the same key, and the receiving inbox drops the repeat.
//!
//! ## Where it runs out
//!
//! With both, the limits left are the database's own durability (a commit the
//! database loses — `synchronous = OFF`, a lost disk, an asynchronous replica promoted
//! — takes the claim or the outbox row with it) and the inbox's retention window
//! ([`InboxConfig::retention`], 7 days by default): a duplicate arriving after its
//! claim was cleaned up is processed again.
//!
//! ## A separate crate, with features
//!
//! The inbox needs a database driver; most users of ackwire do not. So it lives in
//! its own crate: depending on `ackwire` alone never compiles a driver. Inside this
//! crate each database is a cargo feature, so a service compiles only its own:
//!
//! | feature | database | for |
//! |---|---|---|
//! | `sqlite` (default) | SQLite, bundled (no server, no system library) | one process per database; the embedded default |
//! | `postgres` | PostgreSQL | several replicas sharing one database |
//!
//! The driver is [sqlx](https://docs.rs/sqlx) 0.8, with no default features and no
//! query macros (they need a live database at compile time): one async API over both
//! databases on tokio (the runtime ackwire uses), with transactions as values the
//! application owns ([`sqlx::Transaction`]), which is exactly what a claim inside
//! "your" transaction needs. It is widely used and actively kept. Alternatives had a
//! database each (rusqlite is synchronous, tokio-postgres is PostgreSQL-only), so every
//! statement would have been written twice against two APIs; diesel-async reaches
//! SQLite only through a wrapper around the synchronous driver.
//!
//! ## The handler pattern (inbox)
//!
//! ```no_run
//! use ackwire::{ChannelId, Node};
//! use ackwire_inbox::{Claim, Inbox};
//! use sqlx::{Sqlite, SqlitePool};
//!
//! # async fn demo(node: Node, pool: SqlitePool) -> Result<(), Box<dyn std::error::Error>> {
//! ackwire_inbox::migrate(&pool).await?;
//! let inbox = Inbox::<Sqlite>::default();
//! let _cleanup = inbox.spawn_cleanup(pool.clone()); // bounded, every minute
//! let mut payments = node.receiver::<(String, i64)>(ChannelId(1), false)?;
//! while let Some(delivery) = payments.recv().await {
//!     let mut tx = pool.begin().await?;
//!     match inbox.claim(&mut tx, delivery.id()).await? { // first statement
//!         Claim::Fresh => {
//!             let (account, cents) = delivery.message();
//!             sqlx::query("UPDATE accounts SET balance = balance + ?1 WHERE name = ?2")
//!                 .bind(cents)
//!                 .bind(account)
//!                 .execute(&mut *tx)
//!                 .await?;
//!             tx.commit().await?; // the claim and the effect, one commit
//!         }
//!         Claim::Duplicate => tx.rollback().await?, // applied before: skip it
//!     }
//!     delivery.ack(); // only after the commit
//! }
//! # Ok(()) }
//! ```
//!
//! On an error, drop the delivery without acking (it is redelivered);
//! [`InboxError::Conflict`] means "roll back and run the handler again".
//!
//! **Pessimistic mode.** A claim waits for a concurrent, uncommitted claim of the
//! same id to end (PostgreSQL: `INSERT … ON CONFLICT DO NOTHING` blocks on the other
//! transaction's uncommitted index entry; SQLite: there is one writer at a time),
//! then reports `Duplicate` if it committed and `Fresh` if it rolled back. With the
//! claim as the transaction's first statement, the handler's body — not only its
//! effect — runs once even when two replicas receive the same message at once
//! (`tests/inbox.rs`, `concurrent_claims_run_the_body_once`).
//!
//! ## The outbox
//!
//! ```no_run
//! use ackwire::{ChannelId, IdKey, Node, NodeId};
//! use ackwire_inbox::{Outbox, RelayOptions};
//! use sqlx::{Sqlite, SqlitePool};
//! use std::sync::Arc;
//!
//! # async fn demo(node: Arc<Node>, pool: SqlitePool) -> Result<(), Box<dyn std::error::Error>> {
//! ackwire_inbox::migrate(&pool).await?;
//! let outbox = Outbox::<Sqlite>::new();
//! let _relay = outbox.relay(node, pool.clone(), RelayOptions::default())?;
//!
//! let mut tx = pool.begin().await?;
//! sqlx::query("INSERT INTO orders (id, cents) VALUES (?1, ?2)")
//!     .bind(42_i64)
//!     .bind(1999_i64)
//!     .execute(&mut *tx)
//!     .await?;
//! // The key names this message for good: a re-send after a crash reuses it.
//! outbox
//!     .enqueue(&mut tx, NodeId(2), ChannelId(1), IdKey(42), &("order-42", 1999_i64))
//!     .await?;
//! tx.commit().await?; // the order and its message, one commit; the relay sends it
//! # Ok(()) }
//! ```
//!
//! Replicas of the sending service may each run a relay: on PostgreSQL one of them is
//! elected (a session advisory lock per schema) and the others take over when it stops.
//!
//! ## Replica groups: several receivers, one inbox
//!
//! When the receiving service runs several replicas on one PostgreSQL database, the
//! sender can address them as one with [`ackwire::group::GroupSender`]: each message
//! goes to one live replica (by key affinity or round-robin) under an
//! [`IdKey`](ackwire::IdKey), and when that replica goes Down or leaves, the message
//! is re-sent to another one under the same [`MessageId`](ackwire::MessageId). The
//! replicas each run the handler pattern above on the shared inbox, so a repeat — the
//! killed replica had committed and lost only its ack, or a partitioned one receives
//! the held-back copy after the partition heals — is a [`Claim::Duplicate`], and the
//! pessimistic claim makes two replicas that receive one message at once run the body
//! once. What is exactly-once in effect is each message's claim and effect; its limits
//! are the ones above (the database's durability, the retention window: a group
//! message that fails and is resent under its key after the retention is applied
//! again), and no order is kept across replicas. `tests/kill9_replicas.rs` runs three
//! replica processes on one PostgreSQL inbox behind a group, SIGKILLs one and
//! partitions another mid-stream, and finds every effect exactly once.
//!
//! ## Throughput
//!
//! `cargo bench -p ackwire-inbox --features postgres --bench inbox_throughput` sends
//! 3000 messages effectively-once over TCP loopback and applies one effect row per
//! message. One run (release, 2 cores shared with other builds, so only the ratios
//! mean much), in messages per second:
//!
//! | database | memory dedup | durable dedup | inbox, 1 claim/tx | inbox, ≤64 claims/tx |
//! |---|---|---|---|---|
//! | SQLite (WAL, `synchronous = FULL`) | 2081 | 1287 | 1479 | 11077 |
//! | PostgreSQL 15 (local, `synchronous_commit = on`) | 1111 | 1306 | 585 | 5888 |
//!
//! Each message costs one commit (one fsync) in the first three columns; batching the
//! claims and effects of waiting deliveries into one transaction (ack them all after
//! its commit) is where the inbox gets its throughput back.
//!
//! ## Schema
//!
//! [`migrate`] runs this (idempotent; run it at start-up, or apply it with your own
//! migration tool). SQLite:
//!
#![doc = concat!("```sql\n", include_str!("../migrations/sqlite.sql"), "```")]
//!
//! PostgreSQL (tables in the connection's current schema; [`migrate`] holds an
//! advisory lock so that replicas starting together do not race):
//!
#![doc = concat!("```sql\n", include_str!("../migrations/postgres.sql"), "```")]
//!
//! The inbox key is the [`MessageId`](ackwire::MessageId) in a frozen binary form
//! ([`message_id_bytes`]): `0x01` + the 16-byte key for an application
//! [`IdKey`](ackwire::IdKey), `0x02` + node, incarnation, channel and seq for a
//! library-assigned id. Application keys are global to the inbox table: two senders
//! that use one key for different messages collide (as in ackwire's own dedup). A
//! library-assigned id names the sending run, channel and seq, not the receiver: one
//! sender's plain (unkeyed) sends to two replicas that share an inbox can carry equal
//! ids, and the second would be taken for a duplicate. Replicas sharing an inbox take
//! keyed messages (an [`ackwire::group`] sender always keys them).
//!
//! ## Tests
//!
//! `tests/inbox.rs` and `tests/outbox.rs` run every scenario on SQLite (a temporary
//! file) and, with the `postgres` feature, on PostgreSQL (a schema per test) at
//! `127.0.0.1:5432`, database `test` (`ACKWIRE_PG_URL` overrides); `tests/kill9.rs`
//! kills receiver and sender processes with SIGKILL, `tests/kill9_replicas.rs` one of
//! three replicas sharing a PostgreSQL inbox (and partitions another). From the workspace root, plain
//! `cargo test` runs them all (the tests build this crate with `postgres`). Without a
//! server, the PostgreSQL tests print `…: skipped: …` and pass, unless
//! `ACKWIRE_REQUIRE_POSTGRES=1` is set (as in CI), which makes them fail.

mod backend;
mod codec;
mod error;
mod inbox;
mod outbox;

pub use backend::Backend;
pub use codec::{message_id_bytes, message_id_from_bytes};
pub use error::InboxError;
pub use inbox::{Claim, CleanupTask, Inbox, InboxConfig};
pub use outbox::{Outbox, Relay, RelayOptions, RelayStats};

/// Create the `ackwire_inbox` and `ackwire_outbox` tables and their indexes if they
/// do not exist (the SQL is in the [crate docs](crate#schema)). Idempotent.
pub async fn migrate<DB: Backend>(pool: &sqlx::Pool<DB>) -> Result<(), InboxError> {
    DB::migrate(pool).await.map_err(InboxError::from_sqlx::<DB>)
}

#[cfg(not(any(feature = "sqlite", feature = "postgres")))]
compile_error!("ackwire-inbox needs a database: enable the `sqlite` or `postgres` feature");
