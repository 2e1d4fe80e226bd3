//! The outbox: outgoing messages committed in the application's transaction with the
//! business change that caused them ([`Outbox::enqueue`]), and the relay that sends
//! committed rows and deletes them once acknowledged ([`Outbox::relay`]).
//!
//! Owns the `ackwire_outbox` rows and the relay tasks. Must not open or commit the
//! application's transactions, and must not delete a row before its receipt is
//! `Ok(Acked)`.

use crate::backend::{Backend, OutboxRow};
use crate::codec;
use crate::error::InboxError;
use crate::inbox::now_ms;
use ackwire::{
    ChannelId, ChannelOptions, Guarantee, IdKey, Node, NodeError, NodeId, Outcome, RejectReason,
    SendError,
};
use bytes::Bytes;
use std::collections::HashMap;
use std::marker::PhantomData;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// The outbox on database `DB` (`sqlx::Sqlite` or `sqlx::Postgres`).
///
/// Cheap to clone; clones share one in-process wake-up, so a relay started from an
/// `Outbox` is woken by [`enqueue`](Self::enqueue) calls on any of its clones (on
/// SQLite, the only wake-up besides polling; on PostgreSQL, LISTEN/NOTIFY also wakes
/// relays in other processes).
#[derive(Debug)]
pub struct Outbox<DB> {
    wake: Arc<Wake>,
    _db: PhantomData<fn() -> DB>,
}

impl<DB> Clone for Outbox<DB> {
    fn clone(&self) -> Self {
        Outbox {
            wake: self.wake.clone(),
            _db: PhantomData,
        }
    }
}

impl<DB: Backend> Default for Outbox<DB> {
    fn default() -> Self {
        Self::new()
    }
}

impl<DB: Backend> Outbox<DB> {
    /// An outbox handle (the rows live in the database; see [`crate::migrate`]).
    pub fn new() -> Self {
        Outbox {
            wake: Arc::new(Wake::new()),
            _db: PhantomData,
        }
    }

    /// Create the `ackwire_inbox` and `ackwire_outbox` tables if they do not exist
    /// (the same as [`crate::migrate`]).
    pub async fn migrate(pool: &sqlx::Pool<DB>) -> Result<(), InboxError> {
        crate::migrate(pool).await
    }

    /// Enqueue `value` for `target` on `channel` inside the application's transaction
    /// `tx`, to be sent under `key`. The value is encoded as ackwire's typed
    /// [`Sender`](ackwire::Sender) encodes it (bincode 2, standard configuration), so
    /// the target reads it with a `Receiver<T>`.
    ///
    /// Nothing is sent until `tx` commits; if it rolls back, nothing is ever sent.
    /// `key` must identify this message for good (derive it from the business change,
    /// e.g. the order id and the event): after a crash the row is sent again under the
    /// same key, and the target's dedup or inbox drops the repeat. Returns the row's
    /// `seq`. Errors: [`InboxError::Encode`] (nothing enqueued), and as
    /// [`enqueue_raw`](Self::enqueue_raw).
    ///
    /// **Size**: the encoded value must fit the relaying node's
    /// [`NodeConfig::max_payload`](ackwire::NodeConfig::max_payload) (default 4 MiB).
    /// The outbox does not know which node will relay it, so `enqueue` does not check;
    /// a larger row is set aside by the relay, never sent (see [`Outbox::relay`]).
    pub async fn enqueue<T: serde::Serialize + ?Sized>(
        &self,
        tx: &mut sqlx::Transaction<'_, DB>,
        target: NodeId,
        channel: ChannelId,
        key: IdKey,
        value: &T,
    ) -> Result<i64, InboxError> {
        let payload = bincode::serde::encode_to_vec(value, bincode::config::standard())
            .map_err(|e| InboxError::Encode(e.to_string()))?;
        self.enqueue_raw(tx, target, channel, key, &payload).await
    }

    /// Enqueue raw `payload` bytes (a `RawReceiver` gets them as they are); see
    /// [`enqueue`](Self::enqueue).
    ///
    /// Rows of one `(target, channel)` are sent in the order their transactions
    /// committed. On PostgreSQL this holds a transaction-level advisory lock on the
    /// stream (`pg_advisory_xact_lock(target, channel)`, two-`int4` key space) until
    /// `tx` ends, so concurrent enqueuers of one stream wait for each other; enqueue
    /// to several streams in one transaction in a consistent order, or expect
    /// [`InboxError::Conflict`] (a deadlock, detected by the server). SQLite
    /// serializes all writers anyway. Errors: [`InboxError::Conflict`] (roll back and
    /// retry), [`InboxError::Database`] (roll back).
    pub async fn enqueue_raw(
        &self,
        tx: &mut sqlx::Transaction<'_, DB>,
        target: NodeId,
        channel: ChannelId,
        key: IdKey,
        payload: &[u8],
    ) -> Result<i64, InboxError> {
        let key = codec::key_bytes(key);
        let seq = DB::enqueue(
            &mut **tx,
            codec::node_to_i64(target),
            i64::from(channel.0),
            &key,
            payload,
            now_ms(),
        )
        .await
        .map_err(InboxError::from_sqlx::<DB>)?;
        // The row is not committed yet: a relay woken now looks again a few times
        // over the next poll interval (see `RelayOptions::poll_interval`).
        self.wake.wake();
        Ok(seq)
    }

    /// Rows the relay set aside because their target rejected them for good (see
    /// [`RelayStats::rejected`]); find them with
    /// `SELECT * FROM ackwire_outbox WHERE rejected IS NOT NULL` and delete them once
    /// handled.
    pub async fn rejected(pool: &sqlx::Pool<DB>) -> Result<u64, InboxError> {
        let n = DB::rejected(pool)
            .await
            .map_err(InboxError::from_sqlx::<DB>)?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    /// Rows waiting in the outbox (committed, not yet acknowledged, not set aside).
    pub async fn pending(pool: &sqlx::Pool<DB>) -> Result<u64, InboxError> {
        let n = DB::pending(pool)
            .await
            .map_err(InboxError::from_sqlx::<DB>)?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    /// Start the relay: a task that sends the committed rows of every
    /// `(target, channel)` stream from `node`, in `seq` order, on an
    /// [`EffectivelyOnce`](Guarantee::EffectivelyOnce) channel with the row's key as
    /// the [`IdKey`], and deletes each row once its receipt is `Ok(Acked)`.
    ///
    /// * **Order**: per stream, a batch of up to `options.batch` rows is sent in order
    ///   (the window pipelines them), then its receipts are awaited in order and the
    ///   acknowledged prefix is deleted. Messages never time out (the channel's
    ///   deadline is `Duration::MAX`), so the sender never skips one and a receiver
    ///   with [`ReceiverOptions::ordered`](ackwire::ReceiverOptions::ordered) applies
    ///   them in commit order — as long as the target accepts each row when it comes.
    ///   A row it refuses for now (see [`RelayStats::refused`]: no receiver yet, not
    ///   authorized, its key table full) is sent again after a backoff, so the rows of
    ///   its batch that the target accepted meanwhile are applied before it.
    /// * **Failure**: a send that fails (target Down with `fail_fast_when_down`, node
    ///   shutting down, unknown peer) or a receipt that is not `Ok(Acked)` (e.g.
    ///   `HandedOff`: the relay's node should not need hinted handoff; a refusal such
    ///   as `NoReceiver`) stops the batch; the rows from the first unacknowledged one
    ///   on stay and are sent again after a backoff (`retry_min` doubling to
    ///   `retry_max`) under the same keys, so the target's dedup or inbox drops
    ///   whatever had arrived.
    /// * **Rejected for good**: a row its target dead-letters (it cannot decode it, or
    ///   nacked it too often) is set aside in the table (`rejected` = the reason) and
    ///   never resent — the target would refuse it again unless it changes (a new
    ///   type or codec), which is for an operator to decide: setting `rejected` back
    ///   to `NULL` sends the row again — and the stream moves on
    ///   ([`RelayStats::rejected`],
    ///   [`Outbox::rejected`]). So is a row the relay's node refuses to send at all:
    ///   a payload larger than its
    ///   [`NodeConfig::max_payload`](ackwire::NodeConfig::max_payload) (`rejected` =
    ///   `TooLarge`; `Encode` is reserved for an encoding failure, which a raw send
    ///   does not have today); nothing of it was sent. Either way the row is logged at
    ///   error level once, kept in the table, and the rows behind it are delivered in
    ///   order without it. To send a `TooLarge` row after raising the node's limit,
    ///   set its `rejected` back to `NULL`: it then goes out after the rows that were
    ///   behind it (out of its commit order).
    /// * **Wake-up**: PostgreSQL: LISTEN on `ackwire_outbox` (enqueue notifies at
    ///   commit), falling back to polling every `poll_interval` while the listener is
    ///   down. SQLite: polling, and a faster look after an `enqueue` on a clone of this
    ///   `Outbox` in this process.
    /// * **Crash**: rows are deleted only after their ack, so a relay (or process)
    ///   killed anywhere sends the unacknowledged rows again when it restarts.
    ///
    /// * **Several relays** (replicas of the sending service, each running one):
    ///   PostgreSQL elects one. A relay sends only while it holds a session advisory
    ///   lock, `pg_try_advisory_lock(hashtextextended('ackwire_outbox_relay:' ||
    ///   current_schema(), 0))`, on a connection of its own (outside the pool's
    ///   count); the others try again every `poll_interval` and take over when the
    ///   holder stops or its connection drops. A relay that finds its connection gone
    ///   stops its workers; rows it had in flight may then be sent by both, and the
    ///   target's dedup or inbox drops the repeat. SQLite does not elect: run one relay
    ///   per database file ([`RelayStats::leading`] is always `true` there).
    ///
    /// Give the relay its own channels: a channel this node also uses with another
    /// guarantee fails every send with `GuaranteeMismatch` (counted in
    /// [`RelayStats::retries`]).
    ///
    /// Must run inside a tokio runtime. The relay stops when the [`Relay`] is dropped or
    /// stopped, or when `node` shuts down.
    pub fn relay(
        &self,
        node: Arc<Node>,
        pool: sqlx::Pool<DB>,
        options: RelayOptions,
    ) -> Result<Relay, InboxError> {
        options.validate()?;
        let counters = Arc::new(Counters::default());
        let task = tokio::spawn(dispatch::<DB>(
            node,
            pool,
            options,
            self.wake.clone(),
            counters.clone(),
        ));
        Ok(Relay {
            task,
            counters,
            wake: self.wake.clone(),
        })
    }
}

/// Relay settings. Every default is written on its field.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct RelayOptions {
    /// Rows fetched per statement and sent before their receipts are awaited, per
    /// stream. Default 256; 1 to 65 536.
    pub batch: u32,
    /// How often the relay looks for new rows without being woken (the only way on
    /// SQLite across processes; the fallback on PostgreSQL while LISTEN is down).
    /// After an in-process wake-up it looks again at 5 ms, 10 ms, 20 ms… up to this.
    /// Default 1 s; at least 1 ms.
    pub poll_interval: Duration,
    /// First backoff after a failed batch. Default 100 ms; at least 1 ms.
    pub retry_min: Duration,
    /// Longest backoff (it doubles from `retry_min`). Default 10 s; at least
    /// `retry_min`.
    pub retry_max: Duration,
}

impl Default for RelayOptions {
    fn default() -> Self {
        RelayOptions {
            batch: 256,
            poll_interval: Duration::from_secs(1),
            retry_min: Duration::from_millis(100),
            retry_max: Duration::from_secs(10),
        }
    }
}

impl RelayOptions {
    /// Check every value; the error names the field and the bound.
    pub fn validate(&self) -> Result<(), InboxError> {
        let ms = Duration::from_millis(1);
        if !(1..=65_536).contains(&self.batch) {
            return Err(InboxError::Config {
                field: "batch",
                reason: "must be between 1 and 65536",
            });
        }
        if self.poll_interval < ms {
            return Err(InboxError::Config {
                field: "poll_interval",
                reason: "must be at least 1 ms",
            });
        }
        if self.retry_min < ms {
            return Err(InboxError::Config {
                field: "retry_min",
                reason: "must be at least 1 ms",
            });
        }
        if self.retry_max < self.retry_min {
            return Err(InboxError::Config {
                field: "retry_max",
                reason: "must be at least retry_min",
            });
        }
        Ok(())
    }
}

/// A running relay ([`Outbox::relay`]). Dropping it stops the relay.
#[derive(Debug)]
#[must_use = "dropping the Relay stops it and no row is sent; keep it for as long as it should run"]
pub struct Relay {
    task: JoinHandle<()>,
    counters: Arc<Counters>,
    wake: Arc<Wake>,
}

/// Counters of a [`Relay`] (monotonic, except `listening`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RelayStats {
    /// Rows handed to the node (a row sent again after a failure counts again).
    pub sent: u64,
    /// Rows deleted after their receipt was `Ok(Acked)`.
    pub delivered: u64,
    /// Failed batches retried after a backoff (a send or receipt failed).
    pub retries: u64,
    /// Database statements of the relay that failed (retried).
    pub db_errors: u64,
    /// Rows whose addressing columns are malformed (a `key` that is not 16 bytes, a
    /// `channel` outside `u32`), which only a write that bypassed
    /// [`Outbox::enqueue`] can make: logged at error level, left in the table, and
    /// their stream is held there until someone fixes or deletes the row (order is
    /// kept). A well-formed row whose payload cannot be sent is set aside instead
    /// (see `rejected`).
    pub invalid_rows: u64,
    /// Rows set aside for good, never resent; the stream moves on. Either the target
    /// rejected them (`SendError::Rejected` with `Undecodable` or `DeadLettered`: the
    /// message is in the target's dead letters and a resend would be refused again
    /// unless the target changes; `TypeMismatch` cannot come from the relay's raw
    /// sends, and is treated the same), or the relay's node refused to send them at all
    /// (`SendError::TooLarge`: a payload over its `max_payload`; `SendError::Encode`).
    /// Logged at error level once each and set aside in the outbox (`rejected` column
    /// set to the reason: `Undecodable`, `DeadLettered`, `TypeMismatch`, `TooLarge`
    /// or `Encode`). [`Outbox::rejected`] counts them.
    pub rejected: u64,
    /// Refusals the relay retries (`Rejected` with `NoReceiver`, `Unauthorized`,
    /// `StreamRetired` or an unknown reason: refused before the target's dedup, so a
    /// resend is processed normally): the row stays and its stream waits, retried with
    /// the backoff, until the cause is fixed (e.g. the receiver starts). Rows of the
    /// same batch that the target accepted are not held back: they are applied before
    /// the refused row (see [`Outbox::relay`], Order).
    pub refused: u64,
    /// PostgreSQL notifications received.
    pub notifications: u64,
    /// Whether the PostgreSQL listener is connected (always `false` on SQLite).
    pub listening: bool,
    /// Whether this relay holds the lead and sends (see [`Outbox::relay`]; always
    /// `true` on SQLite once started).
    pub leading: bool,
}

impl Relay {
    /// Its counters.
    pub fn stats(&self) -> RelayStats {
        let c = &self.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        RelayStats {
            sent: get(&c.sent),
            delivered: get(&c.delivered),
            retries: get(&c.retries),
            db_errors: get(&c.db_errors),
            invalid_rows: get(&c.invalid_rows),
            rejected: get(&c.rejected),
            refused: get(&c.refused),
            notifications: get(&self.wake.notifications),
            listening: self.wake.listening.load(Ordering::Relaxed),
            leading: c.leading.load(Ordering::Relaxed),
        }
    }

    /// Look for new rows now (e.g. after committing rows enqueued elsewhere).
    pub fn wake(&self) {
        self.wake.wake();
    }

    /// Whether the relay task has ended (its node shut down).
    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }

    /// Stop the relay and wait for it to end. Rows in flight stay in the table and are
    /// sent again by the next relay.
    pub async fn stop(mut self) {
        self.task.abort();
        let _ = (&mut self.task).await;
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The relay's wake-up: enqueue, the PostgreSQL listener and [`Relay::wake`] bump it.
#[derive(Debug)]
pub struct Wake {
    tx: watch::Sender<u64>,
    listening: AtomicBool,
    notifications: AtomicU64,
}

impl Wake {
    fn new() -> Self {
        Wake {
            tx: watch::channel(0).0,
            listening: AtomicBool::new(false),
            notifications: AtomicU64::new(0),
        }
    }

    /// Wake the relay.
    pub(crate) fn wake(&self) {
        self.tx.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// A notification arrived: count it and wake the relay.
    #[cfg_attr(not(feature = "postgres"), allow(dead_code))]
    pub(crate) fn notified(&self) {
        self.notifications.fetch_add(1, Ordering::Relaxed);
        self.wake();
    }

    /// The listener connected or lost its connection.
    #[cfg_attr(not(feature = "postgres"), allow(dead_code))]
    pub(crate) fn set_listening(&self, on: bool) {
        self.listening.store(on, Ordering::Relaxed);
    }
}

#[derive(Debug, Default)]
struct Counters {
    leading: AtomicBool,
    rejected: AtomicU64,
    refused: AtomicU64,
    sent: AtomicU64,
    delivered: AtomicU64,
    retries: AtomicU64,
    db_errors: AtomicU64,
    invalid_rows: AtomicU64,
}

/// Aborts the task when dropped, so a stopped relay leaves no worker behind.
#[derive(Debug)]
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The relay's main loop: takes the lead (one sending relay per outbox), then finds the
/// streams that have rows and keeps one worker per such stream; a worker sends until
/// its stream is empty, then ends. Losing the lead stops the workers.
async fn dispatch<DB: Backend>(
    node: Arc<Node>,
    pool: sqlx::Pool<DB>,
    options: RelayOptions,
    wake: Arc<Wake>,
    counters: Arc<Counters>,
) {
    let _listener = DB::listen(&pool, wake.clone(), options.poll_interval).map(AbortOnDrop);
    let mut woken = wake.tx.subscribe();
    loop {
        let mut leader = match DB::try_lead(&pool).await {
            Ok(Some(leader)) => leader,
            Ok(None) => {
                // Another relay sends; look again every poll interval.
                tokio::select! {
                    _ = node.closed() => return,
                    _ = tokio::time::sleep(options.poll_interval) => continue,
                }
            }
            Err(e) => {
                counters.db_errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %e, "outbox relay cannot take the lead; retrying");
                tokio::select! {
                    _ = node.closed() => return,
                    _ = tokio::time::sleep(options.poll_interval) => continue,
                }
            }
        };
        counters.leading.store(true, Ordering::Relaxed);
        let end = lead::<DB>(&node, &pool, &options, &mut woken, &counters, &mut leader).await;
        counters.leading.store(false, Ordering::Relaxed);
        if end {
            return;
        }
        tracing::warn!("outbox relay lost the lead (its connection dropped); taking it again");
    }
}

/// Relay while `leader` holds the lead. Returns `true` when the relay should end (its
/// node or wake-up closed), `false` when the lead was lost.
async fn lead<DB: Backend>(
    node: &Arc<Node>,
    pool: &sqlx::Pool<DB>,
    options: &RelayOptions,
    woken: &mut watch::Receiver<u64>,
    counters: &Arc<Counters>,
    leader: &mut DB::Leader,
) -> bool {
    let mut workers: HashMap<(i64, i64), AbortOnDrop> = HashMap::new();
    // After a wake-up, look again soon (an enqueue wakes before its commit).
    let mut soon: Option<Duration> = None;
    loop {
        if !DB::still_leading(leader).await {
            return false; // dropping `workers` stops them
        }
        match DB::streams(pool).await {
            Ok(streams) => {
                workers.retain(|_, w| !w.0.is_finished());
                for stream in streams {
                    workers.entry(stream).or_insert_with(|| {
                        AbortOnDrop(tokio::spawn(stream_worker::<DB>(
                            node.clone(),
                            pool.clone(),
                            stream,
                            options.clone(),
                            counters.clone(),
                        )))
                    });
                }
            }
            Err(e) => {
                counters.db_errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %e, "outbox relay cannot list streams; retrying");
            }
        }
        let wait = soon.map_or(options.poll_interval, |s| s.min(options.poll_interval));
        tokio::select! {
            _ = node.closed() => return true,
            changed = woken.changed() => {
                if changed.is_err() {
                    return true;
                }
                soon = Some(Duration::from_millis(5));
            }
            _ = tokio::time::sleep(wait) => {
                soon = soon.map(|s| s * 2).filter(|s| *s < options.poll_interval);
            }
        }
    }
}

/// Sends one stream's rows until the stream is empty (see [`Outbox::relay`]).
async fn stream_worker<DB: Backend>(
    node: Arc<Node>,
    pool: sqlx::Pool<DB>,
    (target_col, channel_col): (i64, i64),
    options: RelayOptions,
    counters: Arc<Counters>,
) {
    let target = codec::node_from_i64(target_col);
    let Some(channel) = codec::channel_from_i64(channel_col) else {
        counters.invalid_rows.fetch_add(1, Ordering::Relaxed);
        tracing::error!(
            target = target_col,
            channel = channel_col,
            "outbox rows with a channel outside u32 cannot be sent; fix or delete them"
        );
        // Stay alive so the dispatcher does not restart (and re-log) this stream.
        return std::future::pending().await;
    };
    let mut channel_options = ChannelOptions::new(channel, Guarantee::EffectivelyOnce);
    channel_options.deadline = Some(Duration::MAX);
    let mut backoff = options.retry_min;
    let mut sender = None;
    loop {
        let out = match &sender {
            Some(s) => s,
            None => match node.raw_sender(target, channel_options) {
                Ok(s) => sender.insert(s),
                Err(NodeError::Shutdown | NodeError::Failed(_)) => return,
                Err(e) => {
                    tracing::warn!(%target, error = %e, "outbox relay cannot make a sender; retrying");
                    counters.retries.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(options.retry_max);
                    continue;
                }
            },
        };
        let rows = match DB::fetch(&pool, target_col, channel_col, i64::from(options.batch)).await {
            Ok(rows) => rows,
            Err(e) => {
                counters.db_errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %e, "outbox relay cannot read rows; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(options.retry_max);
                continue;
            }
        };
        if rows.is_empty() {
            return; // the dispatcher starts a new worker when rows appear
        }
        let mut settled = send_batch(out, &rows, &counters).await;
        for (seq, aside) in &settled.set_aside {
            let why = aside.column();
            match DB::mark_rejected(&pool, *seq, &why).await {
                Ok(_) => {
                    counters.rejected.fetch_add(1, Ordering::Relaxed);
                    // Once per row: a row set aside is not fetched again.
                    match aside {
                        SetAside::Target(_) => {
                            tracing::error!(seq, %target, channel = channel.0, reason = %why, "outbox row rejected for good by its target (in its dead letters); set aside in the outbox")
                        }
                        SetAside::TooLarge { len, max } => {
                            tracing::error!(seq, %target, channel = channel.0, reason = %why, len, max, "outbox row's payload is larger than the relay node's max_payload and can never be sent; set aside in the outbox, its stream moves on")
                        }
                        SetAside::Encode => {
                            tracing::error!(seq, %target, channel = channel.0, reason = %why, "outbox row cannot be encoded by the relay node and can never be sent; set aside in the outbox, its stream moves on")
                        }
                    }
                }
                Err(e) => {
                    // Deleting the range now would delete this row as if delivered.
                    counters.db_errors.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(error = %e, "outbox relay cannot set a rejected row aside; retrying");
                    settled.to = None;
                    settled.complete = false;
                }
            }
        }
        if let Some(to) = settled.to {
            // The rows of this batch up to `to` (the set-aside ones are marked and
            // stay), not a range of the table: see `Backend::delete`.
            let seqs = rows.iter().map(|r| r.seq).filter(|s| *s <= to).collect();
            match DB::delete(&pool, target_col, channel_col, seqs).await {
                Ok(n) => {
                    counters.delivered.fetch_add(n, Ordering::Relaxed);
                }
                Err(e) => {
                    // The rows stay and are sent again (the target drops the repeats),
                    // after the backoff: a database that reads but cannot delete
                    // (a full disk, a read-only replica after a failover) would
                    // otherwise have the batch resent in a tight loop.
                    counters.db_errors.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(error = %e, "outbox relay cannot delete delivered rows; they will be sent again");
                    settled.complete = false;
                }
            }
        }
        if settled.complete {
            backoff = options.retry_min;
        } else {
            counters.retries.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(options.retry_max);
        }
    }
}

/// How a batch settled ([`send_batch`]).
#[derive(Debug, Default)]
struct Settled {
    /// The `seq` of the last row of the settled prefix (acknowledged, or set aside).
    to: Option<i64>,
    /// Whether every row settled.
    complete: bool,
    /// Rows refused for good, with the reason: to be set aside.
    set_aside: Vec<(i64, SetAside)>,
}

/// Why a row is set aside (its `rejected` column): it can never be delivered as stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SetAside {
    /// Its target refused it for good (dead letters, see [`settled_by_target`]).
    Target(RejectReason),
    /// The relay's node refuses to send it at all: the payload is larger than the
    /// node's `max_payload` (`SendError::TooLarge`). Nothing was sent.
    TooLarge {
        /// The payload's size.
        len: usize,
        /// The node's `max_payload`.
        max: usize,
    },
    /// The relay's node cannot encode it (`SendError::Encode`). Nothing was sent.
    Encode,
}

impl SetAside {
    /// The `rejected` column's value: the reason's name (`Undecodable`,
    /// `DeadLettered`, `TypeMismatch`, `TooLarge`, `Encode`).
    fn column(&self) -> String {
        match self {
            SetAside::Target(reason) => format!("{reason:?}"),
            SetAside::TooLarge { .. } => "TooLarge".to_owned(),
            SetAside::Encode => "Encode".to_owned(),
        }
    }
}

/// Whether a failed send (`send_with_key` itself, before any receipt) means this row
/// can never be sent as stored, whatever the target or a later attempt: its payload is
/// over the node's `max_payload`, or the node cannot encode it. Every other send error
/// (target Down with `fail_fast_when_down`, a guarantee clash, the node stopping) is
/// about the node or the target, not the row, and is retried.
fn unsendable(e: &SendError) -> Option<SetAside> {
    match e {
        SendError::TooLarge { len, max } => Some(SetAside::TooLarge {
            len: *len,
            max: *max,
        }),
        SendError::Encode(_) => Some(SetAside::Encode),
        _ => None,
    }
}

/// Whether a rejection means the target has refused the message for good: it is in
/// its dead letters, and a resend would be refused the same way until the target
/// changes (so the row is set aside for an operator, not resent in a loop). Refusals
/// that pass by themselves (no receiver yet, not authorized, a retired stream,
/// reasons this build does not know) are retried instead.
fn settled_by_target(reason: RejectReason) -> bool {
    matches!(
        reason,
        RejectReason::Undecodable | RejectReason::DeadLettered | RejectReason::TypeMismatch
    )
}

/// Send `rows` in order, then await their receipts in order.
async fn send_batch(out: &ackwire::RawSender, rows: &[OutboxRow], counters: &Counters) -> Settled {
    let mut receipts = Vec::with_capacity(rows.len());
    let mut settled = Settled {
        complete: true,
        ..Settled::default()
    };
    for row in rows {
        let Some(key) = codec::key_from_bytes(&row.key) else {
            counters.invalid_rows.fetch_add(1, Ordering::Relaxed);
            tracing::error!(
                seq = row.seq,
                len = row.key.len(),
                "outbox row's key is not 16 bytes; its stream waits until it is fixed or deleted"
            );
            settled.complete = false;
            break;
        };
        match out
            .send_with_key(Bytes::copy_from_slice(&row.payload), key)
            .await
        {
            Ok(receipt) => {
                counters.sent.fetch_add(1, Ordering::Relaxed);
                receipts.push((row.seq, Ok(receipt)));
            }
            Err(e) => match unsendable(&e) {
                // This row can never be sent as stored: set it aside like a row its
                // target dead-letters, so the rows behind it are not held for ever.
                // The rows before it were sent; it settles in its place in order.
                Some(aside) => receipts.push((row.seq, Err(aside))),
                None => {
                    tracing::debug!(seq = row.seq, error = %e, "outbox send failed; retrying later");
                    settled.complete = false;
                    break;
                }
            },
        }
    }
    let mut prefix = true;
    for (seq, receipt) in receipts {
        let result = match receipt {
            Ok(receipt) => receipt.await,
            // Settled for good at send time: it counts as settled in its place in
            // the order (it is marked, so the range delete keeps it).
            Err(aside) => {
                settled.set_aside.push((seq, aside));
                Ok(Outcome::Acked)
            }
        };
        match result {
            Ok(Outcome::Acked) => {}
            Err(SendError::Rejected { reason }) if settled_by_target(reason) => {
                settled.set_aside.push((seq, SetAside::Target(reason)));
            }
            Err(SendError::Rejected { reason }) => {
                counters.refused.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    seq,
                    ?reason,
                    "outbox row refused by its target; retrying later"
                );
                prefix = false;
            }
            other => {
                tracing::debug!(seq, outcome = ?other, "outbox row not acknowledged; retrying later");
                prefix = false;
            }
        }
        if prefix {
            settled.to = Some(seq);
        } else {
            settled.complete = false;
        }
    }
    settled
}
