//! The outbox and its relay on both databases, between two nodes on TCP loopback:
//! committed rows are delivered in commit order and deleted, rolled-back rows never
//! leave, a target that is down delays but does not reorder, the relay is woken
//! (in-process on SQLite, LISTEN/NOTIFY on PostgreSQL), and malformed rows are
//! counted instead of panicking.

#[macro_use]
mod support;

use ackwire::{ChannelId, IdKey, MessageId, Node, Receiver, ReceiverOptions};
use ackwire_inbox::{Outbox, RelayOptions};
use std::sync::Arc;
use std::time::Duration;
use support::net::{eventually, receiver_node, sender_node, RECEIVER};

const CH: ChannelId = ChannelId(11);
const CH2: ChannelId = ChannelId(12);

/// The next `n` messages of `rx` (acked), as `(key, number)`; panics after `within`.
async fn collect(rx: &mut Receiver<(u64, String)>, n: usize, within: Duration) -> Vec<u64> {
    let mut got = Vec::with_capacity(n);
    let deadline = tokio::time::Instant::now() + within;
    while got.len() < n {
        let d = tokio::time::timeout_at(deadline, rx.recv())
            .await
            .unwrap_or_else(|_| panic!("only {} of {n} messages arrived: {got:?}", got.len()))
            .expect("node stopped");
        let (number, label) = d.message().clone();
        assert_eq!(
            d.id(),
            MessageId::Key(IdKey(u128::from(number))),
            "sent under the row's key"
        );
        assert_eq!(label, format!("order-{number}"));
        got.push(number);
        d.ack();
    }
    got
}

/// Nothing more arrives on `rx` within `wait`.
async fn quiet(rx: &mut Receiver<(u64, String)>, wait: Duration) {
    if let Ok(Some(d)) = tokio::time::timeout(wait, rx.recv()).await {
        panic!("unexpected message {:?}", d.message());
    }
}

async fn nodes_on_loopback(ordered: bool) -> (Node, Receiver<(u64, String)>, Arc<Node>) {
    let rx_node = receiver_node(support::ports::restartable_addr()).await;
    let opts = if ordered {
        ReceiverOptions::ordered()
    } else {
        ReceiverOptions::unordered()
    };
    let rx = rx_node.receiver_with::<(u64, String)>(CH, opts).unwrap();
    let tx_node = sender_node(rx_node.local_addr().unwrap()).await;
    (rx_node, rx, Arc::new(tx_node))
}

fn quick_retry() -> RelayOptions {
    let mut o = RelayOptions::default();
    o.retry_min = Duration::from_millis(50);
    o.retry_max = Duration::from_millis(300);
    o
}

scenarios! {
    async fn committed_rows_are_delivered_in_commit_order_and_deleted(pool) {
        let (_rx_node, mut rx, node) = nodes_on_loopback(true).await;
        let outbox = Outbox::<DB>::new();
        let mut expected = Vec::new();
        // 10 transactions of 10 rows before the relay starts, 10 after; one rolled back.
        let mut relay = None;
        for t in 0..20u64 {
            if t == 10 {
                relay = Some(outbox.relay(node.clone(), pool.clone(), RelayOptions::default()).unwrap());
            }
            let mut tx = pool.begin().await.unwrap();
            for i in 0..10 {
                let n = t * 10 + i;
                outbox
                    .enqueue(&mut tx, RECEIVER, CH, IdKey(u128::from(n)), &(n, format!("order-{n}")))
                    .await
                    .unwrap();
            }
            if t == 13 {
                tx.rollback().await.unwrap();
            } else {
                tx.commit().await.unwrap();
                expected.extend(t * 10..t * 10 + 10);
            }
        }
        let relay = relay.unwrap();
        let got = collect(&mut rx, expected.len(), Duration::from_secs(30)).await;
        assert_eq!(got, expected, "delivered in commit order, rolled-back rows never");
        let p = pool.clone();
        assert!(eventually(Duration::from_secs(10), || {
            let p = p.clone();
            async move { Outbox::<DB>::pending(&p).await.unwrap() == 0 }
        }).await, "acked rows are deleted");
        quiet(&mut rx, Duration::from_millis(300)).await;
        let stats = relay.stats();
        assert_eq!(stats.delivered, 190);
        assert_eq!(stats.invalid_rows, 0);
        // The relay ends with its node.
        node.shutdown().await;
        assert!(eventually(Duration::from_secs(5), || async { relay.is_finished() }).await);
    }

    async fn a_target_that_is_down_delays_rows_without_reordering_them(pool) {
        let addr = support::ports::restartable_addr();
        let node = Arc::new(sender_node(addr).await);
        let outbox = Outbox::<DB>::new();
        let relay = outbox.relay(node.clone(), pool.clone(), quick_retry()).unwrap();
        for t in 0..3u64 {
            let mut tx = pool.begin().await.unwrap();
            for i in 0..20 {
                let n = t * 20 + i;
                outbox
                    .enqueue(&mut tx, RECEIVER, CH, IdKey(u128::from(n)), &(n, format!("order-{n}")))
                    .await
                    .unwrap();
            }
            tx.commit().await.unwrap();
        }
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert_eq!(relay.stats().delivered, 0);
        assert_eq!(Outbox::<DB>::pending(&pool).await.unwrap(), 60);
        // The target comes up on the address the sender knows.
        let rx_node = receiver_node(addr).await;
        let mut rx = rx_node.receiver_with::<(u64, String)>(CH, ReceiverOptions::ordered()).unwrap();
        let got = collect(&mut rx, 60, Duration::from_secs(30)).await;
        assert_eq!(got, (0..60).collect::<Vec<_>>(), "in order, each once");
        let p = pool.clone();
        assert!(eventually(Duration::from_secs(10), || {
            let p = p.clone();
            async move { Outbox::<DB>::pending(&p).await.unwrap() == 0 }
        }).await);
        quiet(&mut rx, Duration::from_millis(300)).await;
    }

    async fn a_row_its_target_dead_letters_is_set_aside_and_the_stream_moves_on(pool) {
        // The target cannot decode row 1 (a payload of another type, enqueued raw): it
        // dead-letters it, and would acknowledge a resend without processing it. The
        // relay must keep the row (set aside), not delete it as delivered, and go on.
        let (_rx_node, mut rx, node) = nodes_on_loopback(true).await;
        let outbox = Outbox::<DB>::new();
        let mut tx = pool.begin().await.unwrap();
        outbox.enqueue_raw(&mut tx, RECEIVER, CH, IdKey(1), &[0xff; 3]).await.unwrap();
        outbox.enqueue(&mut tx, RECEIVER, CH, IdKey(2), &(2u64, "order-2".to_string())).await.unwrap();
        tx.commit().await.unwrap();
        let relay = outbox.relay(node, pool.clone(), quick_retry()).unwrap();
        assert_eq!(collect(&mut rx, 1, Duration::from_secs(20)).await, [2], "the stream moves on");
        assert!(eventually(Duration::from_secs(5), || async { relay.stats().rejected == 1 }).await);
        assert_eq!(Outbox::<DB>::rejected(&pool).await.unwrap(), 1, "set aside, not deleted");
        assert!(eventually(Duration::from_secs(5), || async { relay.stats().delivered == 1 }).await);
        let p = pool.clone();
        assert!(eventually(Duration::from_secs(5), || {
            let p = p.clone();
            async move { Outbox::<DB>::pending(&p).await.unwrap() == 0 }
        }).await);
        let (seq, reason): (i64, Option<String>) =
            sqlx::query_as("SELECT seq, rejected FROM ackwire_outbox").fetch_one(&pool).await.unwrap();
        assert_eq!(reason.as_deref(), Some("Undecodable"), "row {seq}");
        assert_eq!(relay.stats().sent, 2, "never resent");
    }

    async fn a_row_refused_for_want_of_a_receiver_is_retried_until_one_appears(pool) {
        // The target runs but has no receiver on the channel yet: past its grace period
        // it rejects the row (NoReceiver, before its dedup). The relay must keep the row
        // and retry, and deliver it once the receiver appears.
        let mut cfg = ackwire::NodeConfig::default();
        cfg.proto.no_receiver_grace = Duration::from_millis(100);
        let rx_node = Node::builder(RECEIVER)
            .tcp(support::ports::restartable_addr(), support::net::fast_tcp())
            .allow_peer(support::net::SENDER)
            .config(cfg)
            .build()
            .await
            .unwrap();
        let node = Arc::new(sender_node(rx_node.local_addr().unwrap()).await);
        let outbox = Outbox::<DB>::new();
        let mut tx = pool.begin().await.unwrap();
        outbox.enqueue(&mut tx, RECEIVER, CH, IdKey(3), &(3u64, "order-3".to_string())).await.unwrap();
        tx.commit().await.unwrap();
        let relay = outbox.relay(node, pool.clone(), quick_retry()).unwrap();
        assert!(
            eventually(Duration::from_secs(20), || async { relay.stats().refused >= 1 }).await,
            "refused: {:?}",
            relay.stats()
        );
        assert_eq!(Outbox::<DB>::pending(&pool).await.unwrap(), 1, "the row stays");
        assert_eq!(relay.stats().rejected, 0, "not set aside");
        let mut rx = rx_node.receiver::<(u64, String)>(CH, false).unwrap();
        assert_eq!(collect(&mut rx, 1, Duration::from_secs(20)).await, [3]);
        assert!(eventually(Duration::from_secs(5), || async { relay.stats().delivered == 1 }).await);
    }

    async fn a_row_over_the_nodes_max_payload_is_set_aside_and_the_stream_moves_on(pool) {
        // Row 3's payload is larger than the relay node's `max_payload`: the node
        // refuses to send it (`TooLarge`), now and on every retry. The relay must set
        // it aside (kept in the table, `rejected` = "TooLarge", counted, logged at
        // error level) and deliver the rows behind it, in order. (Regression: the
        // failure was taken as transient, logged at debug and retried for ever, and
        // every later row of the stream waited behind it.)
        let rx_node = receiver_node(support::ports::restartable_addr()).await;
        let mut rx = rx_node.receiver_with::<(u64, String)>(CH, ReceiverOptions::ordered()).unwrap();
        let mut cfg = ackwire::NodeConfig::default();
        cfg.max_payload = 1024;
        let node = Arc::new(
            Node::builder(support::net::SENDER)
                .tcp(support::ports::restartable_addr(), support::net::fast_tcp())
                .peer(RECEIVER, rx_node.local_addr().unwrap())
                .config(cfg)
                .build()
                .await
                .unwrap(),
        );
        let outbox = Outbox::<DB>::new();
        let mut tx = pool.begin().await.unwrap();
        for n in 1..=5u64 {
            let label = if n == 3 { "x".repeat(2048) } else { format!("order-{n}") };
            outbox.enqueue(&mut tx, RECEIVER, CH, IdKey(u128::from(n)), &(n, label)).await.unwrap();
        }
        tx.commit().await.unwrap();
        // Default retry settings: the stream must not wait on a backoff for the row.
        let relay = outbox.relay(node, pool.clone(), RelayOptions::default()).unwrap();
        assert_eq!(collect(&mut rx, 4, Duration::from_secs(20)).await, [1, 2, 4, 5], "in order, without row 3");
        assert!(eventually(Duration::from_secs(5), || async { relay.stats().delivered == 4 }).await, "{:?}", relay.stats());
        let stats = relay.stats();
        assert_eq!(stats.rejected, 1, "{stats:?}");
        assert_eq!(stats.invalid_rows, 0, "{stats:?}");
        assert_eq!(stats.sent, 4, "row 3 was never handed to the node: {stats:?}");
        assert_eq!(Outbox::<DB>::rejected(&pool).await.unwrap(), 1, "set aside, not deleted");
        assert_eq!(Outbox::<DB>::pending(&pool).await.unwrap(), 0);
        let (key, reason): (Vec<u8>, Option<String>) =
            sqlx::query_as("SELECT key, rejected FROM ackwire_outbox").fetch_one(&pool).await.unwrap();
        assert_eq!(key, 3u128.to_be_bytes().to_vec(), "the oversized row is the one kept");
        assert_eq!(reason.as_deref(), Some("TooLarge"));
        quiet(&mut rx, Duration::from_millis(300)).await;
    }

    async fn a_row_put_back_while_its_batch_is_in_flight_is_sent_not_deleted(pool) {
        // Row 2 is set aside (as a `TooLarge` row is) when the relay fetches rows 1 and
        // 3; while they are in flight the operator puts row 2 back (`rejected` = NULL,
        // as the docs say to after raising `max_payload`). The acks of 1 and 3 must
        // delete those two rows only. (Regression: the delete took the range 1..=3,
        // and row 2, never sent, was gone.)
        let (_rx_node, mut rx, node) = nodes_on_loopback(false).await;
        let outbox = Outbox::<DB>::new();
        let mut tx = pool.begin().await.unwrap();
        for n in 1..=3u64 {
            outbox.enqueue(&mut tx, RECEIVER, CH, IdKey(u128::from(n)), &(n, format!("order-{n}"))).await.unwrap();
        }
        tx.commit().await.unwrap();
        let (seq2,): (i64,) = sqlx::query_as("SELECT seq FROM ackwire_outbox ORDER BY seq LIMIT 1 OFFSET 1")
            .fetch_one(&pool).await.unwrap();
        sqlx::query("UPDATE ackwire_outbox SET rejected = 'TooLarge' WHERE seq = $1")
            .bind(seq2).execute(&pool).await.unwrap();
        let relay = outbox.relay(node, pool.clone(), quick_retry()).unwrap();
        // Both in the application's hands, unacknowledged: the batch is in flight.
        let mut held = Vec::new();
        for _ in 0..2 {
            let d = tokio::time::timeout(Duration::from_secs(20), rx.recv()).await.unwrap().unwrap();
            held.push(d);
        }
        let mut got: Vec<u64> = held.iter().map(|d| d.message().0).collect();
        got.sort_unstable();
        assert_eq!(got, [1, 3]);
        sqlx::query("UPDATE ackwire_outbox SET rejected = NULL WHERE seq = $1")
            .bind(seq2).execute(&pool).await.unwrap();
        for d in held {
            d.ack();
        }
        assert_eq!(collect(&mut rx, 1, Duration::from_secs(20)).await, [2], "row 2 is sent");
        let p = pool.clone();
        assert!(eventually(Duration::from_secs(10), || {
            let p = p.clone();
            async move { Outbox::<DB>::pending(&p).await.unwrap() == 0 }
        }).await);
        // Counted once the DELETE has returned, a moment after the rows are gone.
        // (Regression: read at once, a CI run saw 2.)
        let r = &relay;
        assert!(eventually(Duration::from_secs(10), || async move { r.stats().delivered == 3 }).await,
            "{:?}", relay.stats());
    }

    async fn malformed_rows_hold_their_stream_and_are_counted(pool) {
        let (rx_node, mut rx, node) = nodes_on_loopback(true).await;
        let mut rx2 = rx_node.receiver::<(u64, String)>(CH2, false).unwrap();
        // Written by hand: a 3-byte key on CH, a channel outside u32.
        for (channel, key) in [(i64::from(CH.0), vec![1u8, 2, 3]), (-1, vec![0u8; 16])] {
            sqlx::query(
                "INSERT INTO ackwire_outbox (target, channel, key, payload, created_at) \
                 VALUES ($1, $2, $3, $4, 0)",
            )
            .bind(2_i64)
            .bind(channel)
            .bind(key)
            .bind(vec![0u8; 4])
            .execute(&pool)
            .await
            .unwrap();
        }
        let outbox = Outbox::<DB>::new();
        let mut tx = pool.begin().await.unwrap();
        outbox.enqueue(&mut tx, RECEIVER, CH, IdKey(1), &(1u64, "order-1".to_string())).await.unwrap();
        outbox.enqueue(&mut tx, RECEIVER, CH2, IdKey(2), &(2u64, "order-2".to_string())).await.unwrap();
        tx.commit().await.unwrap();
        let relay = outbox.relay(node.clone(), pool.clone(), quick_retry()).unwrap();
        assert_eq!(collect(&mut rx2, 1, Duration::from_secs(20)).await, [2], "other streams flow");
        assert!(eventually(Duration::from_secs(5), || async { relay.stats().invalid_rows >= 2 }).await);
        quiet(&mut rx, Duration::from_millis(500)).await; // held behind the bad row
        // Someone deletes the bad row: the stream moves on, in order.
        sqlx::query("DELETE FROM ackwire_outbox WHERE length(key) <> 16").execute(&pool).await.unwrap();
        relay.wake();
        assert_eq!(collect(&mut rx, 1, Duration::from_secs(20)).await, [1]);
    }
}

/// A database that reads but cannot delete (here a trigger; in life a full disk, or a
/// read-only replica after a failover): the acknowledged rows stay and are sent again,
/// after the backoff. (Regression: a failed delete did not count as a failed batch,
/// so the relay fetched and resent the same rows at once, in a tight loop.) Once the
/// database deletes again, the rows go and each was delivered once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_a_failing_delete_backs_off_instead_of_resending_in_a_loop() {
    let db = support::db::sqlite().await;
    let pool = db.pool.clone();
    let (_rx_node, mut rx, node) = nodes_on_loopback(false).await;
    sqlx::query(
        "CREATE TRIGGER no_delete BEFORE DELETE ON ackwire_outbox \
         BEGIN SELECT RAISE(ABORT, 'deletes fail for this test'); END",
    )
    .execute(&pool)
    .await
    .unwrap();
    let outbox = Outbox::<sqlx::Sqlite>::new();
    let mut tx = pool.begin().await.unwrap();
    for n in 0..10u64 {
        outbox
            .enqueue(
                &mut tx,
                RECEIVER,
                CH,
                IdKey(u128::from(n)),
                &(n, format!("order-{n}")),
            )
            .await
            .unwrap();
    }
    tx.commit().await.unwrap();
    // Default options: backoff from 100 ms doubling.
    let relay = outbox
        .relay(node, pool.clone(), RelayOptions::default())
        .unwrap();
    let mut got = collect(&mut rx, 10, Duration::from_secs(20)).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let stats = relay.stats();
    assert!(stats.db_errors >= 1, "{stats:?}");
    // About 5 batches of 10 in 2 s at 100, 200, 400, 800 ms; a loop sent thousands.
    assert!(stats.sent <= 150, "resent in a loop: {stats:?}");
    assert_eq!(stats.delivered, 0, "{stats:?}");
    assert_eq!(Outbox::<sqlx::Sqlite>::pending(&pool).await.unwrap(), 10);
    sqlx::query("DROP TRIGGER no_delete")
        .execute(&pool)
        .await
        .unwrap();
    relay.wake();
    let p = pool.clone();
    assert!(
        eventually(Duration::from_secs(20), || {
            let p = p.clone();
            async move { Outbox::<sqlx::Sqlite>::pending(&p).await.unwrap() == 0 }
        })
        .await,
        "{:?}",
        relay.stats()
    );
    quiet(&mut rx, Duration::from_millis(300)).await;
    got.sort_unstable();
    assert_eq!(got, (0..10).collect::<Vec<_>>(), "each delivered once");
}

/// SQLite has no notifications: with a 60 s poll, only the in-process wake-up of an
/// `enqueue` on the relay's `Outbox` can bring the row out quickly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_enqueue_wakes_the_relay_in_the_same_process() {
    let db = support::db::sqlite().await;
    let (_rx_node, mut rx, node) = nodes_on_loopback(false).await;
    let outbox = Outbox::<sqlx::Sqlite>::new();
    let mut opts = RelayOptions::default();
    opts.poll_interval = Duration::from_secs(60);
    let _relay = outbox.relay(node, db.pool.clone(), opts).unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await; // the first (empty) scan is done
    let mut tx = db.pool.begin().await.unwrap();
    outbox
        .enqueue(
            &mut tx,
            RECEIVER,
            CH,
            IdKey(5),
            &(5u64, "order-5".to_string()),
        )
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await; // commit after the wake-up
    tx.commit().await.unwrap();
    assert_eq!(collect(&mut rx, 1, Duration::from_secs(3)).await, [5]);
}

/// PostgreSQL: a row enqueued by another process (here: another `Outbox`, which shares
/// no in-process wake-up with the relay's) is brought out by NOTIFY, not by the 60 s
/// poll.
#[cfg(feature = "postgres")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_notify_wakes_the_relay_for_rows_from_another_process() {
    let Some(db) =
        support::db::postgres("postgres_notify_wakes_the_relay_for_rows_from_another_process")
            .await
    else {
        return;
    };
    let (_rx_node, mut rx, node) = nodes_on_loopback(false).await;
    let mut opts = RelayOptions::default();
    opts.poll_interval = Duration::from_secs(60);
    let relay = Outbox::<sqlx::Postgres>::new()
        .relay(node, db.pool.clone(), opts)
        .unwrap();
    assert!(
        eventually(Duration::from_secs(10), || async {
            relay.stats().listening
        })
        .await,
        "LISTEN connected"
    );
    tokio::time::sleep(Duration::from_millis(200)).await; // the first (empty) scans are done
    let elsewhere = Outbox::<sqlx::Postgres>::new();
    let mut tx = db.pool.begin().await.unwrap();
    elsewhere
        .enqueue(
            &mut tx,
            RECEIVER,
            CH,
            IdKey(6),
            &(6u64, "order-6".to_string()),
        )
        .await
        .unwrap();
    tx.commit().await.unwrap();
    assert_eq!(collect(&mut rx, 1, Duration::from_secs(5)).await, [6]);
    assert!(relay.stats().notifications >= 1);
    drop(relay);
    db.drop_schema().await;
}

#[cfg(not(feature = "postgres"))]
#[test]
fn postgres_notify_wakes_the_relay_for_rows_from_another_process() {
    support::db::postgres_not_built(
        "postgres_notify_wakes_the_relay_for_rows_from_another_process",
    );
}

/// PostgreSQL: two relays on one outbox (two replicas of the sending service) elect
/// one; only it sends, and when it stops the other takes over.
#[cfg(feature = "postgres")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_two_relays_elect_one_and_the_other_takes_over() {
    use ackwire::NodeId;
    let name = "postgres_two_relays_elect_one_and_the_other_takes_over";
    let Some(db) = support::db::postgres(name).await else {
        return;
    };
    const REPLICA: NodeId = NodeId(3);
    let rx_node = Node::builder(RECEIVER)
        .tcp(support::ports::restartable_addr(), support::net::fast_tcp())
        .allow_peer(support::net::SENDER)
        .allow_peer(REPLICA)
        .build()
        .await
        .unwrap();
    let mut rx = rx_node.receiver::<(u64, String)>(CH, false).unwrap();
    let addr = rx_node.local_addr().unwrap();
    let a = Arc::new(sender_node(addr).await);
    let b = Arc::new(
        Node::builder(REPLICA)
            .tcp(support::ports::restartable_addr(), support::net::fast_tcp())
            .peer(RECEIVER, addr)
            .build()
            .await
            .unwrap(),
    );
    let mut opts = RelayOptions::default();
    opts.poll_interval = Duration::from_millis(200);
    let outbox = Outbox::<sqlx::Postgres>::new();
    let relay_a = outbox.relay(a, db.pool.clone(), opts.clone()).unwrap();
    let relay_b = outbox.relay(b, db.pool.clone(), opts).unwrap();
    assert!(
        eventually(Duration::from_secs(10), || async {
            relay_a.stats().leading || relay_b.stats().leading
        })
        .await
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        relay_a.stats().leading != relay_b.stats().leading,
        "exactly one leads"
    );
    let (leader, follower) = if relay_a.stats().leading {
        (relay_a, relay_b)
    } else {
        (relay_b, relay_a)
    };
    let enqueue = |range: std::ops::Range<u64>| {
        let (pool, outbox) = (db.pool.clone(), outbox.clone());
        async move {
            let mut tx = pool.begin().await.unwrap();
            for n in range {
                outbox
                    .enqueue(
                        &mut tx,
                        RECEIVER,
                        CH,
                        IdKey(u128::from(n)),
                        &(n, format!("order-{n}")),
                    )
                    .await
                    .unwrap();
            }
            tx.commit().await.unwrap();
        }
    };
    enqueue(0..50).await;
    let mut got = collect(&mut rx, 50, Duration::from_secs(20)).await;
    got.sort_unstable();
    assert_eq!(got, (0..50).collect::<Vec<_>>(), "each row once");
    assert!(
        eventually(Duration::from_secs(5), || async {
            leader.stats().delivered == 50
        })
        .await
    );
    assert_eq!(follower.stats().sent, 0, "the follower sends nothing");
    // The leader stops: its lock goes with its connection, the follower takes over.
    leader.stop().await;
    assert!(
        eventually(Duration::from_secs(10), || async {
            follower.stats().leading
        })
        .await,
        "the follower takes the lead"
    );
    enqueue(50..70).await;
    let mut got = collect(&mut rx, 20, Duration::from_secs(20)).await;
    got.sort_unstable();
    assert_eq!(got, (50..70).collect::<Vec<_>>());
    assert!(
        eventually(Duration::from_secs(5), || async {
            follower.stats().delivered == 20
        })
        .await
    );
    quiet(&mut rx, Duration::from_millis(300)).await;
    drop(follower);
    db.drop_schema().await;
}

#[cfg(not(feature = "postgres"))]
#[test]
fn postgres_two_relays_elect_one_and_the_other_takes_over() {
    support::db::postgres_not_built("postgres_two_relays_elect_one_and_the_other_takes_over");
}
