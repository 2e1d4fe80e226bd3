//! Kill -9 tests: receiver and sender processes SIGKILLed at the moments the inbox and
//! outbox exist for, on SQLite and PostgreSQL.
//!
//! The children are this test binary re-executed to run only [`child_entry`] with
//! `ACKWIRE_CHILD_ROLE` set (ackwire's `tests/support/child.rs`): they exit when their
//! stdin closes, so a dying parent leaves no orphans. Every wait is bounded.
//!
//! 1. **Receiver killed between its effect's commit and its ack**
//!    ([`receiver_kill9_between_commit_and_ack_applies_no_effect_twice_sqlite`] and
//!    `_postgres`). The parent sends `N` messages effectively-once (each under its own
//!    `IdKey`). The receiver child handles each in one transaction — claim, insert one
//!    row into `effects`, commit — prints `C n`, then acks. For some messages it prints
//!    `S n` after the commit and waits 1 s before acking: the parent SIGKILLs it on
//!    that line, so the kill lands after the commit and before the ack, and restarts
//!    it. Checked: every receipt ends `Ok`; every message has **exactly one** row in
//!    `effects` (none lost, none applied twice); and each killed message came back and
//!    was dropped as `Duplicate` by a later run (the window was really hit).
//! 2. The contrast ([`receiver_kill9_between_commit_and_ack_with_durable_dedup_applies_effects_twice`]):
//!    the same kills with ackwire's `DurableDedup` instead of the inbox. Its record is
//!    written with the ack, after the effect's commit, so each killed message is applied
//!    again by the next run: checked that at least one effect is applied twice.
//! 3. **Sender killed after committing outbox rows**
//!    ([`sender_kill9_after_outbox_commit_applies_every_committed_row_once_sqlite`] and
//!    `_postgres`). The sender child commits, per order, the order row and its outbox
//!    row in one transaction (printing `E n` after the commit) while its relay sends;
//!    it is SIGKILLed after a random number of orders and restarted (continuing after
//!    its last committed order), three times. The receiver (in the parent) applies
//!    each message through the inbox. Checked: the sender's `orders` are `0..N` once
//!    each, every committed order's effect is in the receiver's `effects` **exactly
//!    once**, and the outbox ends empty.
//!
//! A run takes a few seconds per test in a debug build. Each prints its seed;
//! `ACKWIRE_CRASH_SEED=<seed>` replays the kill schedule.

#[macro_use]
mod support;

use ackwire::dedup::DurableDedup;
use ackwire::{ChannelId, ChannelOptions, Guarantee, IdKey, Node, NodeConfig, ReceiverOptions};
use ackwire_inbox::{Claim, Inbox, Outbox, RelayOptions};
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use support::child::{say, seed, watchdog, ChildProc, Rng, ROLE_ENV};
use support::net::{fast_tcp, RECEIVER, SENDER};

const ENTRY: &str = "child_entry";
const CH: ChannelId = ChannelId(21);
const ADDR_ENV: &str = "ACKWIRE_KILL9_ADDR";
/// `sqlite:<path>` or `postgres:<schema>`.
const DB_ENV: &str = "ACKWIRE_KILL9_DB";
/// Set to a directory: use `DurableDedup` there instead of the inbox.
const DURABLE_ENV: &str = "ACKWIRE_KILL9_DURABLE";
const TOTAL_ENV: &str = "ACKWIRE_KILL9_TOTAL";
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// Messages whose handler waits before acking (the kill window): `n % SLOW_EVERY == 3`.
const SLOW_EVERY: u64 = 25;

// ---------------------------------------------------------------- databases

/// A pool on one of the two databases.
#[derive(Debug, Clone)]
enum Db {
    Sqlite(sqlx::SqlitePool),
    #[cfg(feature = "postgres")]
    Pg(sqlx::PgPool),
}

/// Run `$body` with `$pool` bound to the concrete pool of `$db`.
macro_rules! on_db {
    ($db:expr, $pool:ident => $body:expr) => {
        match $db {
            Db::Sqlite($pool) => $body,
            #[cfg(feature = "postgres")]
            Db::Pg($pool) => $body,
        }
    };
}

impl Db {
    /// Open the database named by a [`DB_ENV`] value.
    async fn open(spec: &str) -> Db {
        match spec.split_once(':') {
            Some(("sqlite", path)) => Db::Sqlite(support::db::sqlite_pool(path.as_ref()).await),
            #[cfg(feature = "postgres")]
            Some(("postgres", schema)) => Db::Pg(support::db::pg_pool(schema).await),
            _ => panic!("bad {DB_ENV}: {spec}"),
        }
    }

    async fn exec(&self, sql: &str) {
        on_db!(self, p => { sqlx::query(sql).execute(p).await.expect(sql); })
    }

    /// `SELECT n, COUNT(*) FROM table GROUP BY n`.
    async fn counts(&self, table: &str) -> BTreeMap<i64, i64> {
        let sql = format!("SELECT n, COUNT(*) FROM {table} GROUP BY n");
        let rows: Vec<(i64, i64)> =
            on_db!(self, p => sqlx::query_as(&sql).fetch_all(p).await.expect("counts"));
        rows.into_iter().collect()
    }

    async fn pending(&self) -> u64 {
        on_db!(self, p => Outbox::pending(p).await.expect("pending"))
    }

    /// Handle one delivery of `n` with the inbox: claim, apply, commit. `true` if fresh.
    async fn apply_once(&self, id: ackwire::MessageId, n: u64) -> bool {
        on_db!(self, p => {
            let inbox = Inbox::default();
            loop {
                let mut tx = p.begin().await.expect("begin");
                match inbox.claim(&mut tx, id).await {
                    Ok(Claim::Fresh) => {
                        sqlx::query("INSERT INTO effects (n) VALUES ($1)")
                            .bind(n as i64)
                            .execute(&mut *tx)
                            .await
                            .expect("effect");
                        tx.commit().await.expect("commit");
                        break true;
                    }
                    Ok(Claim::Duplicate) => {
                        tx.rollback().await.expect("rollback");
                        break false;
                    }
                    Err(e) if e.is_conflict() => continue,
                    Err(e) => panic!("claim: {e}"),
                }
            }
        })
    }

    /// Apply `n` without an inbox (the durable-dedup contrast).
    async fn apply_plain(&self, n: u64) {
        on_db!(self, p => {
            sqlx::query("INSERT INTO effects (n) VALUES ($1)")
                .bind(n as i64)
                .execute(p)
                .await
                .expect("effect");
        })
    }

    /// Commit order `n` and its outbox row in one transaction.
    async fn place_order(&self, outbox_any: &OutboxAny, n: u64) {
        match (self, outbox_any) {
            (Db::Sqlite(p), OutboxAny::Sqlite(o)) => {
                let mut tx = p.begin().await.expect("begin");
                sqlx::query("INSERT INTO orders (n) VALUES ($1)")
                    .bind(n as i64)
                    .execute(&mut *tx)
                    .await
                    .expect("order");
                o.enqueue(&mut tx, RECEIVER, CH, IdKey(u128::from(n)), &n)
                    .await
                    .expect("enqueue");
                tx.commit().await.expect("commit");
            }
            #[cfg(feature = "postgres")]
            (Db::Pg(p), OutboxAny::Pg(o)) => {
                let mut tx = p.begin().await.expect("begin");
                sqlx::query("INSERT INTO orders (n) VALUES ($1)")
                    .bind(n as i64)
                    .execute(&mut *tx)
                    .await
                    .expect("order");
                o.enqueue(&mut tx, RECEIVER, CH, IdKey(u128::from(n)), &n)
                    .await
                    .expect("enqueue");
                tx.commit().await.expect("commit");
            }
            #[allow(unreachable_patterns)]
            _ => unreachable!("outbox and pool of different databases"),
        }
    }
}

/// An outbox of either database.
enum OutboxAny {
    Sqlite(Outbox<sqlx::Sqlite>),
    #[cfg(feature = "postgres")]
    Pg(Outbox<sqlx::Postgres>),
}

/// A database for one test: where it is (for children), a pool, and its cleanup.
struct TestDb {
    spec: String,
    db: Db,
    _sqlite: Option<support::db::SqliteDb>,
    #[cfg(feature = "postgres")]
    pg: Option<support::db::PgDb>,
}

impl TestDb {
    async fn sqlite() -> TestDb {
        let s = support::db::sqlite().await;
        TestDb {
            spec: format!("sqlite:{}", s.path.display()),
            db: Db::Sqlite(s.pool.clone()),
            _sqlite: Some(s),
            #[cfg(feature = "postgres")]
            pg: None,
        }
    }

    #[cfg(feature = "postgres")]
    async fn postgres(test: &str) -> Option<TestDb> {
        let pg = support::db::postgres(test).await?;
        Some(TestDb {
            spec: format!("postgres:{}", pg.schema),
            db: Db::Pg(pg.pool.clone()),
            _sqlite: None,
            pg: Some(pg),
        })
    }

    async fn close(self) {
        #[cfg(feature = "postgres")]
        if let Some(pg) = self.pg {
            pg.drop_schema().await;
        }
    }
}

// ---------------------------------------------------------------- child side

/// Entry point of the child processes; does nothing unless `ACKWIRE_CHILD_ROLE` is set.
#[test]
#[ignore = "child process entry point, run by the other tests of this file"]
fn child_entry() {
    let Ok(role) = std::env::var(ROLE_ENV) else {
        return;
    };
    watchdog(Duration::from_secs(120));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    match role.as_str() {
        "receiver" => rt.block_on(receiver_role()),
        "sender" => rt.block_on(sender_role()),
        other => panic!("unknown role {other}"),
    }
}

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("{name} not set"))
}

/// Receives `u64`s; per message: claim + effect + commit (or, with [`DURABLE_ENV`],
/// effect + commit under durable dedup), `C n`, for slow ones `S n` and a 1 s wait,
/// then ack. A duplicate claim prints `D n` and acks.
async fn receiver_role() {
    let addr: SocketAddr = env(ADDR_ENV).parse().expect("addr");
    let db = Db::open(&env(DB_ENV)).await;
    let durable = std::env::var(DURABLE_ENV).ok();
    let mut cfg = NodeConfig::default();
    if let Some(dir) = &durable {
        cfg.dedup.durable = Some(DurableDedup::new(dir));
    }
    let node = Node::builder(RECEIVER)
        .tcp(addr, fast_tcp())
        .allow_peer(SENDER)
        .config(cfg)
        .build()
        .await
        .expect("receiver node");
    let mut rx = node.receiver::<u64>(CH, false).expect("receiver");
    say("READY");
    while let Some(d) = rx.recv().await {
        let n = *d.message();
        let fresh = if durable.is_some() {
            db.apply_plain(n).await;
            true
        } else {
            db.apply_once(d.id(), n).await
        };
        if fresh {
            say(&format!("C {n}"));
            if n % SLOW_EVERY == 3 {
                say(&format!("S {n}"));
                tokio::time::sleep(Duration::from_millis(1000)).await;
            }
        } else {
            say(&format!("D {n}"));
        }
        d.ack();
    }
}

/// Places orders `next..TOTAL` (each: order row + outbox row, one commit, then
/// `E n`) while its relay sends; then waits for the outbox to drain and prints `DONE`.
async fn sender_role() {
    let target: SocketAddr = env(ADDR_ENV).parse().expect("addr");
    let total: u64 = env(TOTAL_ENV).parse().expect("total");
    let db = Db::open(&env(DB_ENV)).await;
    let node = Arc::new(
        Node::builder(SENDER)
            .tcp(support::ports::restartable_addr(), fast_tcp())
            .peer(RECEIVER, target)
            .build()
            .await
            .expect("sender node"),
    );
    let mut opts = RelayOptions::default();
    opts.retry_min = Duration::from_millis(50);
    opts.retry_max = Duration::from_millis(500);
    let (outbox, _relay) = match &db {
        Db::Sqlite(p) => {
            let o = Outbox::new();
            let r = o.relay(node.clone(), p.clone(), opts).expect("relay");
            (OutboxAny::Sqlite(o), r)
        }
        #[cfg(feature = "postgres")]
        Db::Pg(p) => {
            let o = Outbox::new();
            let r = o.relay(node.clone(), p.clone(), opts).expect("relay");
            (OutboxAny::Pg(o), r)
        }
    };
    let next = db
        .counts("orders")
        .await
        .keys()
        .max()
        .map_or(0, |m| *m as u64 + 1);
    say("READY");
    for n in next..total {
        db.place_order(&outbox, n).await;
        say(&format!("E {n}"));
        if n % 4 == 3 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    while db.pending().await > 0 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    say("DONE");
    std::future::pending::<()>().await;
}

// ---------------------------------------------------------------- parent side

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

fn spawn_ready(role: &str, envs: &[(&str, String)]) -> ChildProc {
    let mut child = ChildProc::spawn(ENTRY, role, envs);
    assert!(
        child.wait_line("READY", READY_TIMEOUT).is_some(),
        "{role} child not ready: {:?}",
        child.drain()
    );
    child
}

/// What a receiver-kill run saw.
#[derive(Debug)]
struct ReceiverRun {
    /// Rows in `effects` per message.
    effects: BTreeMap<i64, i64>,
    /// Messages killed in the window (`S` seen, then SIGKILL).
    killed_in_window: Vec<u64>,
    /// Messages a later run found already claimed (`D` lines).
    duplicates: BTreeSet<u64>,
    elapsed: Duration,
}

/// Send `total` messages to a receiver child that is SIGKILLed `kills` times between an
/// effect's commit and its ack (see the module docs).
fn run_receiver_kills(
    test: &TestDb,
    rt: &tokio::runtime::Runtime,
    total: u64,
    kills: usize,
    durable: Option<PathBuf>,
) -> ReceiverRun {
    let started = Instant::now();
    let addr = support::ports::restartable_addr();
    let mut envs = vec![(ADDR_ENV, addr.to_string()), (DB_ENV, test.spec.clone())];
    if let Some(dir) = &durable {
        envs.push((DURABLE_ENV, dir.display().to_string()));
    }
    let mut child = spawn_ready("receiver", &envs);
    // The sender: every message under its own key, resent under it until acked.
    let acked = Arc::new(Mutex::new(BTreeSet::new()));
    let sender = rt.block_on(support::net::sender_node(addr));
    let mut opts = ChannelOptions::new(CH, Guarantee::EffectivelyOnce);
    opts.deadline = Some(Duration::from_secs(10));
    let out = sender.sender::<u64>(RECEIVER, opts).expect("sender");
    let send_all = {
        let acked = acked.clone();
        rt.spawn(async move {
            let mut receipts = tokio::task::JoinSet::new();
            for n in 0..total {
                let out = out.clone();
                let acked = acked.clone();
                receipts.spawn(async move {
                    loop {
                        if let Ok(receipt) = out.send_with_key(&n, IdKey(u128::from(n))).await {
                            if receipt.await.is_ok() {
                                break;
                            }
                        }
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    acked.lock().unwrap().insert(n);
                });
                if n % 5 == 4 {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
            while receipts.join_next().await.is_some() {}
        })
    };
    let mut lines = Vec::new();
    let mut killed_in_window = Vec::new();
    for _ in 0..kills {
        let line = child
            .wait_line("S ", Duration::from_secs(30))
            .unwrap_or_else(|| panic!("no slow message reached: {:?}", child.drain()));
        child.kill();
        killed_in_window.push(line[2..].parse::<u64>().expect("S line"));
        lines.extend(std::mem::take(&mut child.lines));
        child = spawn_ready("receiver", &envs);
    }
    rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(60), send_all)
            .await
            .expect("every message acked within 60 s")
            .expect("sender task")
    });
    assert_eq!(acked.lock().unwrap().len() as u64, total);
    child.finish(Duration::from_secs(5));
    lines.extend(std::mem::take(&mut child.lines));
    drop(sender);
    let duplicates = lines
        .iter()
        .filter_map(|l| l.strip_prefix("D ").and_then(|n| n.parse().ok()))
        .collect();
    let effects = rt.block_on(test.db.counts("effects"));
    ReceiverRun {
        effects,
        killed_in_window,
        duplicates,
        elapsed: started.elapsed(),
    }
}

fn receiver_kills_with_inbox(test: TestDb, rt: tokio::runtime::Runtime, name: &str) {
    let total = 150;
    let kills = 4;
    rt.block_on(test.db.exec("CREATE TABLE effects (n BIGINT NOT NULL)"));
    let run = run_receiver_kills(&test, &rt, total, kills, None);
    let twice: Vec<_> = run.effects.iter().filter(|(_, c)| **c > 1).collect();
    let missing: Vec<_> = (0..total as i64)
        .filter(|n| !run.effects.contains_key(n))
        .collect();
    println!(
        "{name}: {total} messages, {} kills between commit and ack ({:?}), {} redelivered \
         and dropped as duplicates by the inbox, {} applied twice, {} missing, {:.1} s",
        run.killed_in_window.len(),
        run.killed_in_window,
        run.duplicates.len(),
        twice.len(),
        missing.len(),
        run.elapsed.as_secs_f64()
    );
    assert!(twice.is_empty(), "effects applied twice: {twice:?}");
    assert!(
        missing.is_empty(),
        "acked messages without their effect: {missing:?}"
    );
    for n in &run.killed_in_window {
        assert!(
            run.duplicates.contains(n),
            "message {n} was killed after its commit but never came back as a duplicate"
        );
    }
    rt.block_on(test.close());
}

#[test]
fn receiver_kill9_between_commit_and_ack_applies_no_effect_twice_sqlite() {
    let rt = runtime();
    let test = rt.block_on(TestDb::sqlite());
    receiver_kills_with_inbox(test, rt, "receiver kill -9, inbox, SQLite");
}

#[cfg(feature = "postgres")]
#[test]
fn receiver_kill9_between_commit_and_ack_applies_no_effect_twice_postgres() {
    let rt = runtime();
    let Some(test) = rt.block_on(TestDb::postgres("kill9_receiver")) else {
        return;
    };
    receiver_kills_with_inbox(test, rt, "receiver kill -9, inbox, PostgreSQL");
}

#[cfg(not(feature = "postgres"))]
#[test]
fn receiver_kill9_between_commit_and_ack_applies_no_effect_twice_postgres() {
    support::db::postgres_not_built(
        "receiver_kill9_between_commit_and_ack_applies_no_effect_twice_postgres",
    );
}

#[test]
fn receiver_kill9_between_commit_and_ack_with_durable_dedup_applies_effects_twice() {
    let rt = runtime();
    let test = rt.block_on(TestDb::sqlite());
    let dedup = tempfile::tempdir().expect("tempdir");
    let total = 100;
    rt.block_on(test.db.exec("CREATE TABLE effects (n BIGINT NOT NULL)"));
    let run = run_receiver_kills(&test, &rt, total, 2, Some(dedup.path().to_path_buf()));
    let twice: Vec<_> = run
        .effects
        .iter()
        .filter(|(_, c)| **c > 1)
        .map(|(n, _)| *n)
        .collect();
    println!(
        "receiver kill -9, durable dedup (no inbox), SQLite: {total} messages, {} kills \
         between commit and ack ({:?}), {} effects applied twice ({twice:?}), {:.1} s",
        run.killed_in_window.len(),
        run.killed_in_window,
        twice.len(),
        run.elapsed.as_secs_f64()
    );
    assert!(
        !twice.is_empty(),
        "durable dedup records the completion with the ack, so a kill between the \
         effect's commit and the ack should apply that effect twice"
    );
    assert!((0..total as i64).all(|n| run.effects.contains_key(&n)));
}

/// Orders placed by a sender child that is killed `kills` times; the receiver (here)
/// applies them through its inbox on `ledger`.
fn sender_kills(sender_db: TestDb, ledger: TestDb, rt: tokio::runtime::Runtime, name: &str) {
    let started = Instant::now();
    let total: u64 = 300;
    let kills = 3;
    let seed = seed(7);
    println!("{name}: seed {seed}");
    let mut rng = Rng::new(seed);
    rt.block_on(
        sender_db
            .db
            .exec("CREATE TABLE orders (n BIGINT NOT NULL PRIMARY KEY)"),
    );
    rt.block_on(ledger.db.exec("CREATE TABLE effects (n BIGINT NOT NULL)"));
    let addr = support::ports::restartable_addr();
    // The receiver: ordered, applying each message through the inbox. Restarted once
    // (with the sender's second kill), so that repeats also reach a receiver whose
    // in-memory dedup has never seen them: then only the inbox drops them.
    let stats = Arc::new(Mutex::new((0u64, 0u64, Vec::new()))); // fresh, duplicate, order
    let start_receiver = |ledger_db: Db, stats: Arc<Mutex<(u64, u64, Vec<u64>)>>| {
        let node = rt.block_on(support::net::receiver_node(addr));
        let mut rx = node
            .receiver_with::<u64>(CH, ReceiverOptions::ordered())
            .expect("receiver");
        let handler = rt.spawn(async move {
            while let Some(d) = rx.recv().await {
                let n = *d.message();
                let fresh = ledger_db.apply_once(d.id(), n).await;
                let mut s = stats.lock().unwrap();
                if fresh {
                    s.0 += 1;
                    s.2.push(n);
                } else {
                    s.1 += 1;
                }
                drop(s);
                d.ack();
            }
        });
        (node, handler)
    };
    let (mut node, mut handler) = start_receiver(ledger.db.clone(), stats.clone());
    let mut ackwire_dups = 0;
    let envs = [
        (ADDR_ENV, addr.to_string()),
        (DB_ENV, sender_db.spec.clone()),
        (TOTAL_ENV, total.to_string()),
    ];
    let mut committed_at_kill = Vec::new();
    let mut child = spawn_ready("sender", &envs);
    for _ in 0..kills {
        let more = 30 + rng.next() % 50;
        let give_up = Instant::now() + Duration::from_secs(30);
        while child.drain().iter().filter(|l| l.starts_with("E ")).count() < more as usize {
            assert!(
                Instant::now() < give_up,
                "sender child stalled: {:?}",
                child.drain()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        child.kill();
        let last = child
            .lines
            .iter()
            .rev()
            .find_map(|l| l.strip_prefix("E ").and_then(|n| n.parse::<u64>().ok()));
        committed_at_kill.push(last);
        if committed_at_kill.len() == 2 {
            handler.abort();
            ackwire_dups += rt
                .block_on(node.stats())
                .map_or(0, |s| s.proto.duplicates_dropped);
            drop(node);
            (node, handler) = start_receiver(ledger.db.clone(), stats.clone());
        }
        child = spawn_ready("sender", &envs);
    }
    assert!(
        child.wait_line("DONE", Duration::from_secs(60)).is_some(),
        "the last sender never drained its outbox: {:?}",
        child.drain()
    );
    child.finish(Duration::from_secs(5));
    let orders = rt.block_on(sender_db.db.counts("orders"));
    assert_eq!(
        orders.keys().copied().collect::<Vec<_>>(),
        (0..total as i64).collect::<Vec<_>>(),
        "every order committed once"
    );
    let ledger_db = ledger.db.clone();
    let all_applied = rt.block_on(support::net::eventually(Duration::from_secs(20), || {
        let db = ledger_db.clone();
        async move { db.counts("effects").await.len() as u64 == total }
    }));
    let effects = rt.block_on(ledger.db.counts("effects"));
    let twice: Vec<_> = effects.iter().filter(|(_, c)| **c > 1).collect();
    let missing: Vec<_> = (0..total as i64)
        .filter(|n| !effects.contains_key(n))
        .collect();
    let (fresh, dups, order) = stats.lock().unwrap().clone();
    ackwire_dups += rt
        .block_on(node.stats())
        .map_or(0, |s| s.proto.duplicates_dropped);
    let inversions = order.windows(2).filter(|w| w[1] < w[0]).count();
    println!(
        "{name}: {total} orders, {kills} sender kills and a receiver restart (last committed order at each kill: \
         {committed_at_kill:?}), {fresh} applied; repeats after restarts: {ackwire_dups} \
         dropped by ackwire's dedup, {dups} by the inbox; {} applied twice, {} missing, {inversions} order inversions, {:.1} s",
        twice.len(),
        missing.len(),
        started.elapsed().as_secs_f64()
    );
    assert!(
        all_applied && missing.is_empty(),
        "committed orders never applied: {missing:?}"
    );
    assert!(twice.is_empty(), "effects applied twice: {twice:?}");
    assert_eq!(rt.block_on(sender_db.db.pending()), 0, "outbox drained");
    handler.abort();
    drop(node);
    rt.block_on(sender_db.close());
    rt.block_on(ledger.close());
}

#[test]
fn sender_kill9_after_outbox_commit_applies_every_committed_row_once_sqlite() {
    let rt = runtime();
    let sender_db = rt.block_on(TestDb::sqlite());
    let ledger = rt.block_on(TestDb::sqlite());
    sender_kills(
        sender_db,
        ledger,
        rt,
        "sender kill -9, outbox + inbox, SQLite",
    );
}

#[cfg(feature = "postgres")]
#[test]
fn sender_kill9_after_outbox_commit_applies_every_committed_row_once_postgres() {
    let rt = runtime();
    let Some(sender_db) = rt.block_on(TestDb::postgres("kill9_sender_orders")) else {
        return;
    };
    let Some(ledger) = rt.block_on(TestDb::postgres("kill9_sender_ledger")) else {
        return;
    };
    sender_kills(
        sender_db,
        ledger,
        rt,
        "sender kill -9, outbox + inbox, PostgreSQL",
    );
}

#[cfg(not(feature = "postgres"))]
#[test]
fn sender_kill9_after_outbox_commit_applies_every_committed_row_once_postgres() {
    support::db::postgres_not_built(
        "sender_kill9_after_outbox_commit_applies_every_committed_row_once_postgres",
    );
}
