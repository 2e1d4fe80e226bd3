//! The inbox on both databases: claims inside the application's transaction, the
//! pessimistic mode under concurrent claimers, conflicts, and the bounded cleanup.
//!
//! Every scenario in [`scenarios!`] runs twice: `sqlite::NAME` on a temporary file,
//! `postgres::NAME` on a schema of its own (skipped with a `skipped:` line when the
//! server is unreachable, failed when `ACKWIRE_REQUIRE_POSTGRES=1`).

#[macro_use]
mod support;

use ackwire::{ChannelId, IdKey, MessageId, NodeId, Origin};
use ackwire_inbox::{Claim, Inbox, InboxConfig, InboxError};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Insert one effect row for `n` in `tx` (the handler's effect).
macro_rules! apply_effect {
    ($tx:expr, $n:expr) => {
        sqlx::query("INSERT INTO effects (n) VALUES ($1)")
            .bind($n as i64)
            .execute(&mut *$tx)
            .await
            .expect("apply effect")
    };
}

/// Rows in `effects` for `n`.
macro_rules! effects_of {
    ($pool:expr, $n:expr) => {{
        let row: (i64,) = sqlx::query_as("SELECT COUNT(*) FROM effects WHERE n = $1")
            .bind($n as i64)
            .fetch_one(&$pool)
            .await
            .expect("count effects");
        row.0
    }};
}

/// Rows in `ackwire_inbox`.
macro_rules! claims {
    ($pool:expr) => {{
        let row: (i64,) = sqlx::query_as("SELECT COUNT(*) FROM ackwire_inbox")
            .fetch_one(&$pool)
            .await
            .expect("count claims");
        row.0
    }};
}

fn seq_id(seq: u64) -> MessageId {
    MessageId::Seq {
        origin: Origin {
            node: NodeId(9),
            incarnation: 0x1234,
        },
        channel: ChannelId(4),
        seq,
    }
}

scenarios! {
    async fn a_committed_claim_makes_every_later_claim_a_duplicate(pool) {
        let inbox = Inbox::<DB>::default();
        for (n, id) in [(1, MessageId::Key(IdKey(1))), (2, seq_id(2))] {
            let mut tx = pool.begin().await.unwrap();
            assert_eq!(inbox.claim(&mut tx, id).await.unwrap(), Claim::Fresh);
            apply_effect!(tx, n);
            tx.commit().await.unwrap();
            for _ in 0..3 {
                let mut tx = pool.begin().await.unwrap();
                assert_eq!(inbox.claim(&mut tx, id).await.unwrap(), Claim::Duplicate);
                tx.rollback().await.unwrap();
            }
            assert_eq!(effects_of!(pool, n), 1);
        }
        // A key and a library id with equal numbers are different messages.
        let mut tx = pool.begin().await.unwrap();
        assert_eq!(inbox.claim(&mut tx, MessageId::Key(IdKey(2))).await.unwrap(), Claim::Fresh);
        tx.rollback().await.unwrap();
    }

    async fn a_rolled_back_claim_is_forgotten(pool) {
        let inbox = Inbox::<DB>::default();
        let id = MessageId::Key(IdKey(5));
        let mut tx = pool.begin().await.unwrap();
        assert_eq!(inbox.claim(&mut tx, id).await.unwrap(), Claim::Fresh);
        apply_effect!(tx, 5);
        tx.rollback().await.unwrap(); // the handler failed: claim and effect go together
        assert_eq!(effects_of!(pool, 5), 0);
        assert_eq!(claims!(pool), 0);
        let mut tx = pool.begin().await.unwrap();
        assert_eq!(inbox.claim(&mut tx, id).await.unwrap(), Claim::Fresh);
        apply_effect!(tx, 5);
        tx.commit().await.unwrap();
        assert_eq!(effects_of!(pool, 5), 1);
    }

    async fn concurrent_claims_run_the_body_once(pool) {
        // A claims and holds its transaction open for 400 ms; B claims the same id
        // meanwhile. B's claim must return only after A's commit (it blocked) and see
        // Duplicate: the body runs once, not only the effect.
        let inbox = Inbox::<DB>::default();
        let id = MessageId::Key(IdKey(7));
        let body_runs = Arc::new(AtomicU32::new(0));
        let (claimed_tx, claimed_rx) = tokio::sync::oneshot::channel();
        let a = {
            let (pool, inbox, body_runs) = (pool.clone(), inbox.clone(), body_runs.clone());
            tokio::spawn(async move {
                let mut tx = pool.begin().await.unwrap();
                let claim = inbox.claim(&mut tx, id).await.unwrap();
                let _ = claimed_tx.send(());
                let mut ending = Instant::now();
                if claim == Claim::Fresh {
                    body_runs.fetch_add(1, Ordering::SeqCst);
                    apply_effect!(tx, 7);
                    tokio::time::sleep(Duration::from_millis(400)).await;
                    ending = Instant::now();
                    tx.commit().await.unwrap();
                }
                (claim, ending)
            })
        };
        claimed_rx.await.unwrap();
        let b = {
            let (pool, inbox, body_runs) = (pool.clone(), inbox.clone(), body_runs.clone());
            tokio::spawn(async move {
                let mut tx = pool.begin().await.unwrap();
                let claim = inbox.claim(&mut tx, id).await.unwrap();
                let returned = Instant::now();
                if claim == Claim::Fresh {
                    body_runs.fetch_add(1, Ordering::SeqCst);
                    apply_effect!(tx, 7);
                    tx.commit().await.unwrap();
                }
                (claim, returned)
            })
        };
        let (a, a_ending) = a.await.unwrap();
        let (b, b_returned) = b.await.unwrap();
        assert_eq!(a, Claim::Fresh);
        assert_eq!(b, Claim::Duplicate);
        assert!(b_returned >= a_ending, "B's claim returned before A's transaction ended");
        assert_eq!(body_runs.load(Ordering::SeqCst), 1);
        assert_eq!(effects_of!(pool, 7), 1);
    }

    async fn a_waiting_claim_is_fresh_when_the_first_rolls_back(pool) {
        let inbox = Inbox::<DB>::default();
        let id = MessageId::Key(IdKey(8));
        let (claimed_tx, claimed_rx) = tokio::sync::oneshot::channel();
        let a = {
            let (pool, inbox) = (pool.clone(), inbox.clone());
            tokio::spawn(async move {
                let mut tx = pool.begin().await.unwrap();
                let claim = inbox.claim(&mut tx, id).await.unwrap();
                let _ = claimed_tx.send(());
                apply_effect!(tx, 8);
                tokio::time::sleep(Duration::from_millis(300)).await;
                let ending = Instant::now();
                tx.rollback().await.unwrap(); // the handler failed
                (claim, ending)
            })
        };
        claimed_rx.await.unwrap();
        let mut tx = pool.begin().await.unwrap();
        let b = inbox.claim(&mut tx, id).await.unwrap();
        let b_returned = Instant::now();
        apply_effect!(tx, 8);
        tx.commit().await.unwrap();
        let (a, a_ending) = a.await.unwrap();
        assert_eq!(a, Claim::Fresh);
        assert_eq!(b, Claim::Fresh);
        assert!(b_returned >= a_ending, "B's claim returned before A's transaction ended");
        assert_eq!(effects_of!(pool, 8), 1);
    }

    async fn many_concurrent_claimers_apply_each_effect_once(pool) {
        // Four "replicas" handle the same 40 messages, each in its own order.
        let inbox = Inbox::<DB>::default();
        let fresh = Arc::new(AtomicU32::new(0));
        let mut tasks = Vec::new();
        for r in 0..4u64 {
            let (pool, inbox, fresh) = (pool.clone(), inbox.clone(), fresh.clone());
            tasks.push(tokio::spawn(async move {
                for i in 0..40u64 {
                    let n = (i + r * 10) % 40;
                    loop {
                        let mut tx = pool.begin().await.unwrap();
                        match inbox.claim(&mut tx, MessageId::Key(IdKey(u128::from(n)))).await {
                            Ok(Claim::Fresh) => {
                                apply_effect!(tx, n);
                                tx.commit().await.unwrap();
                                fresh.fetch_add(1, Ordering::SeqCst);
                                break;
                            }
                            Ok(Claim::Duplicate) => break,
                            Err(e) if e.is_conflict() => continue,
                            Err(e) => panic!("claim: {e}"),
                        }
                    }
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(fresh.load(Ordering::SeqCst), 40);
        for n in 0..40u64 {
            assert_eq!(effects_of!(pool, n), 1, "message {n}");
        }
    }

    async fn cleanup_deletes_at_most_limit_expired_claims(pool) {
        let short = Inbox::<DB>::new(InboxConfig::default().with_retention(Duration::from_millis(1))).unwrap();
        let long = Inbox::<DB>::new(InboxConfig::default().with_retention(Duration::from_secs(3600))).unwrap();
        for k in 0..10u128 {
            let mut tx = pool.begin().await.unwrap();
            assert_eq!(short.claim(&mut tx, MessageId::Key(IdKey(k))).await.unwrap(), Claim::Fresh);
            tx.commit().await.unwrap();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(long.cleanup(&pool, 100).await.unwrap(), 0, "nothing is an hour old");
        assert_eq!(short.cleanup(&pool, 0).await.unwrap(), 0);
        let mut deleted = Vec::new();
        loop {
            let n = short.cleanup(&pool, 3).await.unwrap();
            deleted.push(n);
            if n < 3 {
                break;
            }
        }
        assert_eq!(deleted, [3, 3, 3, 1]);
        assert_eq!(claims!(pool), 0);
        // The documented limit: past the retention, a repeat is fresh again.
        let mut tx = pool.begin().await.unwrap();
        assert_eq!(short.claim(&mut tx, MessageId::Key(IdKey(0))).await.unwrap(), Claim::Fresh);
        tx.rollback().await.unwrap();
    }

    async fn background_cleanup_removes_expired_claims_in_batches(pool) {
        let config = InboxConfig::default()
            .with_retention(Duration::from_millis(1))
            .with_cleanup(Duration::from_millis(20), 4);
        let inbox = Inbox::<DB>::new(config).unwrap();
        for k in 0..10u128 {
            let mut tx = pool.begin().await.unwrap();
            assert_eq!(inbox.claim(&mut tx, MessageId::Key(IdKey(k))).await.unwrap(), Claim::Fresh);
            tx.commit().await.unwrap();
        }
        let task = inbox.spawn_cleanup(pool.clone());
        let pool2 = pool.clone();
        // The task counts a statement's rows after it committed: wait for both.
        let emptied = support::net::eventually(Duration::from_secs(10), || {
            let pool = pool2.clone();
            let counted = task.deleted();
            async move { counted == 10 && claims!(pool) == 0 }
        })
        .await;
        assert!(
            emptied,
            "claims left: {}, deleted: {}",
            claims!(pool),
            task.deleted()
        );
        assert_eq!(task.deleted(), 10);
        task.stop();
    }

    async fn a_missing_table_is_a_typed_error_not_a_panic(pool) {
        sqlx::query("DROP TABLE ackwire_inbox").execute(&pool).await.unwrap();
        let inbox = Inbox::<DB>::default();
        let mut tx = pool.begin().await.unwrap();
        let err = inbox.claim(&mut tx, MessageId::Key(IdKey(1))).await.unwrap_err();
        assert!(matches!(err, InboxError::Database(_)), "{err:?}");
        drop(tx);
        assert!(matches!(inbox.cleanup(&pool, 10).await, Err(InboxError::Database(_))));
        // migrate is idempotent and repairs it.
        ackwire_inbox::migrate(&pool).await.unwrap();
        ackwire_inbox::migrate(&pool).await.unwrap();
        let mut tx = pool.begin().await.unwrap();
        assert_eq!(inbox.claim(&mut tx, MessageId::Key(IdKey(1))).await.unwrap(), Claim::Fresh);
        tx.commit().await.unwrap();
    }
}

/// SQLite: a transaction that read before claiming, and meets a newer committed
/// write, cannot take the write lock: `Conflict`, and the retry sees `Duplicate`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_claim_after_a_stale_read_is_a_conflict() {
    let db = support::db::sqlite().await;
    let inbox = Inbox::<sqlx::Sqlite>::default();
    let id = MessageId::Key(IdKey(3));
    let mut stale = db.pool.begin().await.unwrap();
    let _: (i64,) = sqlx::query_as("SELECT COUNT(*) FROM ackwire_inbox")
        .fetch_one(&mut *stale)
        .await
        .unwrap();
    let mut tx = db.pool.begin().await.unwrap();
    assert_eq!(inbox.claim(&mut tx, id).await.unwrap(), Claim::Fresh);
    tx.commit().await.unwrap();
    let err = inbox.claim(&mut stale, id).await.unwrap_err();
    assert!(err.is_conflict(), "{err:?}");
    drop(stale);
    let mut retry = db.pool.begin().await.unwrap();
    assert_eq!(inbox.claim(&mut retry, id).await.unwrap(), Claim::Duplicate);
}

/// PostgreSQL: under REPEATABLE READ, a claim whose duplicate committed after the
/// transaction's snapshot is a serialization failure: `Conflict`, and the retry sees
/// `Duplicate`.
#[cfg(feature = "postgres")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_repeatable_read_claim_of_a_newer_duplicate_is_a_conflict() {
    let Some(db) =
        support::db::postgres("postgres_repeatable_read_claim_of_a_newer_duplicate_is_a_conflict")
            .await
    else {
        return;
    };
    let inbox = Inbox::<sqlx::Postgres>::default();
    let id = MessageId::Key(IdKey(3));
    let mut stale = db.pool.begin().await.unwrap();
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        .execute(&mut *stale)
        .await
        .unwrap();
    let _: (i64,) = sqlx::query_as("SELECT COUNT(*) FROM ackwire_inbox")
        .fetch_one(&mut *stale)
        .await
        .unwrap();
    let mut tx = db.pool.begin().await.unwrap();
    assert_eq!(inbox.claim(&mut tx, id).await.unwrap(), Claim::Fresh);
    tx.commit().await.unwrap();
    let err = inbox.claim(&mut stale, id).await.unwrap_err();
    assert!(err.is_conflict(), "{err:?}");
    drop(stale);
    let mut retry = db.pool.begin().await.unwrap();
    assert_eq!(inbox.claim(&mut retry, id).await.unwrap(), Claim::Duplicate);
    drop(retry);
    db.drop_schema().await;
}

#[cfg(not(feature = "postgres"))]
#[test]
fn postgres_repeatable_read_claim_of_a_newer_duplicate_is_a_conflict() {
    support::db::postgres_not_built(
        "postgres_repeatable_read_claim_of_a_newer_duplicate_is_a_conflict",
    );
}
