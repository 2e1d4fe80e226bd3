//! Black-box: a replica group over real TCP in front of replicas that share one
//! PostgreSQL inbox (`127.0.0.1:5432`, database `test`; `ACKWIRE_PG_URL` overrides),
//! written from the docs only. Skips (prints `skipped:`) when no server answers.

#[path = "../../tests/support/ports.rs"]
mod ports;
use ackwire::group::{GroupConfig, GroupSender, Member, Membership, Spread, StaticMembers};
use ackwire::{ChannelId, Delivery, Node, NodeId};
use ackwire_inbox::{Claim, Inbox};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{PgPool, Postgres};
use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const CH: ChannelId = ChannelId(7);
const SENDER: NodeId = NodeId(1);

fn url() -> String {
    std::env::var("ACKWIRE_PG_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_string())
}

async fn within<F: std::future::Future>(secs: f64, what: &str, f: F) -> F::Output {
    match tokio::time::timeout(Duration::from_secs_f64(secs), f).await {
        Ok(v) => v,
        Err(_) => panic!("timed out after {secs} s: {what}"),
    }
}

/// A fresh schema; `None` when the server is not reachable (said past libtest's
/// output capture, as the other PostgreSQL tests do: `skipped: ...`).
async fn schema(test: &str) -> Option<String> {
    let skip = |e: &dyn std::fmt::Display| {
        assert!(
            std::env::var("ACKWIRE_REQUIRE_POSTGRES").as_deref() != Ok("1"),
            "{test}: PostgreSQL is required (ACKWIRE_REQUIRE_POSTGRES=1) but not reachable: {e}"
        );
        use std::io::Write;
        let _ = writeln!(
            std::io::stderr().lock(),
            "{test}: skipped: PostgreSQL not reachable ({e})"
        );
    };
    // A quick port check first: a refused connection is otherwise retried until the
    // pool's acquire timeout.
    let opts = PgConnectOptions::from_str(&url()).unwrap();
    let port_open = std::net::ToSocketAddrs::to_socket_addrs(&(opts.get_host(), opts.get_port()))
        .ok()
        .and_then(|mut a| a.next())
        .is_some_and(|a| std::net::TcpStream::connect_timeout(&a, Duration::from_secs(1)).is_ok());
    if !port_open {
        skip(&"nothing listens on its port");
        return None;
    }
    let admin = match PgPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(Duration::from_secs(3))
        .connect_with(opts)
        .await
    {
        Ok(a) => a,
        Err(e) => {
            skip(&e);
            return None;
        }
    };
    // Unique per process and call (a counter), and across processes and earlier runs
    // (pid and clock); a name taken anyway (a schema left by a killed run) is replaced
    // by the next. (Regression: two names collided once, `duplicate key value`.)
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let mut name = String::new();
    for attempt in 0..5 {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        name = format!(
            "bbg_{}_{}_{nanos:x}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        match sqlx::query(&format!("CREATE SCHEMA {name}"))
            .execute(&admin)
            .await
        {
            Ok(_) => break,
            Err(e) if attempt < 4 => eprintln!("{test}: schema {name}: {e}; another name"),
            Err(e) => panic!("{test}: cannot create a schema: {e}"),
        }
    }
    let pool = pool(&name).await;
    ackwire_inbox::migrate(&pool).await.unwrap();
    sqlx::query("CREATE TABLE effects (n BIGINT NOT NULL)")
        .execute(&pool)
        .await
        .unwrap();
    pool.close().await;
    admin.close().await;
    Some(name)
}

async fn pool(schema: &str) -> PgPool {
    PgPoolOptions::new()
        .max_connections(3)
        .acquire_timeout(Duration::from_secs(10))
        .connect_with(
            PgConnectOptions::from_str(&url())
                .unwrap()
                .options([("search_path", schema)]),
        )
        .await
        .unwrap()
}

/// How each replica's handler behaves.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    /// claim, effect, commit, ack
    Normal,
    /// claim, effect, commit, never ack ("killed between commit and ack")
    CommitNoAck,
    /// claim and effect, then keep the transaction open until released; then commit, ack
    Stall,
}

struct Replica {
    id: NodeId,
    addr: SocketAddr,
    node: Option<Node>,
    fresh: Arc<AtomicU64>,
    duplicate: Arc<AtomicU64>,
    handled: Arc<AtomicU64>,
    release: Arc<tokio::sync::Notify>,
    released: Arc<AtomicBool>,
    held: Arc<Mutex<Vec<Delivery<u64>>>>,
}

async fn replica(id: NodeId, schema: &str, mode: Mode) -> Replica {
    let node = Node::builder(id)
        .bind(ports::restartable_addr())
        .allow_peer(SENDER)
        .build()
        .await
        .unwrap();
    let addr = node.local_addr().unwrap();
    let mut rx = node.receiver::<u64>(CH, false).unwrap();
    let pool = pool(schema).await;
    let r = Replica {
        id,
        addr,
        node: Some(node),
        fresh: Arc::default(),
        duplicate: Arc::default(),
        handled: Arc::default(),
        release: Arc::default(),
        released: Arc::default(),
        held: Arc::default(),
    };
    let (fresh, dup, handled, release, released, held) = (
        r.fresh.clone(),
        r.duplicate.clone(),
        r.handled.clone(),
        r.release.clone(),
        r.released.clone(),
        r.held.clone(),
    );
    tokio::spawn(async move {
        let inbox = Inbox::<Postgres>::default();
        while let Some(d) = rx.recv().await {
            let mut tx = pool.begin().await.unwrap();
            let claim = inbox.claim(&mut tx, d.id()).await.unwrap();
            match claim {
                Claim::Fresh => {
                    sqlx::query("INSERT INTO effects (n) VALUES ($1)")
                        .bind(*d.message() as i64)
                        .execute(&mut *tx)
                        .await
                        .unwrap();
                    handled.fetch_add(1, Ordering::SeqCst);
                    if mode == Mode::Stall && !released.load(Ordering::SeqCst) {
                        release.notified().await;
                    }
                    tx.commit().await.unwrap();
                    fresh.fetch_add(1, Ordering::SeqCst);
                }
                Claim::Duplicate => {
                    tx.rollback().await.unwrap();
                    dup.fetch_add(1, Ordering::SeqCst);
                }
            }
            if mode == Mode::CommitNoAck {
                held.lock().unwrap().push(d);
            } else {
                d.ack();
            }
        }
    });
    r
}

async fn effects(schema: &str) -> Vec<(i64, i64)> {
    let p = pool(schema).await;
    let rows: Vec<(i64, i64)> =
        sqlx::query_as("SELECT n, COUNT(*) FROM effects GROUP BY n ORDER BY n")
            .fetch_all(&p)
            .await
            .unwrap();
    p.close().await;
    rows
}

async fn drop_schema(schema: &str) {
    if let Ok(admin) = PgPoolOptions::new()
        .max_connections(1)
        .connect_with(PgConnectOptions::from_str(&url()).unwrap())
        .await
    {
        let _ = sqlx::query(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))
            .execute(&admin)
            .await;
    }
}

fn assert_each_once(rows: &[(i64, i64)], n: i64) {
    let wrong: Vec<_> = rows.iter().filter(|(_, c)| *c != 1).collect();
    assert!(
        wrong.is_empty(),
        "effects applied more than once (n, times): {wrong:?}"
    );
    assert_eq!(rows.len() as i64, n, "effects missing: {rows:?}");
}

/// Replica A commits its effects and is killed before acking; the group re-sends them
/// to B and C under the same ids; the shared inbox reports them as duplicates.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_killed_after_commit_has_its_messages_rerouted_and_applied_once() {
    let Some(s) = schema("killed_after_commit").await else {
        return;
    };
    let mut a = replica(NodeId(10), &s, Mode::CommitNoAck).await;
    let b = replica(NodeId(11), &s, Mode::Normal).await;
    let c = replica(NodeId(12), &s, Mode::Normal).await;
    let node = Arc::new(
        Node::builder(SENDER)
            .bind(ports::restartable_addr())
            .build()
            .await
            .unwrap(),
    );
    let mut cfg = GroupConfig::new(CH);
    cfg.spread = Spread::RoundRobin;
    let g = GroupSender::<u64>::new(
        node.clone(),
        cfg,
        StaticMembers::new([(a.id, a.addr), (b.id, b.addr), (c.id, c.addr)]).unwrap(),
    )
    .await
    .unwrap();
    let mut receipts = vec![];
    for v in 0..45u64 {
        receipts.push(within(10.0, "send", g.send(&v)).await.unwrap());
    }
    within(8.0, "A to commit its share", async {
        while a.held.lock().unwrap().len() < 15 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    a.held.lock().unwrap().clear();
    drop(a.node.take());
    for r in receipts {
        let o = within(10.0, "receipt", r).await.unwrap();
        assert_ne!(o.member, NodeId(10));
    }
    let rows = effects(&s).await;
    assert_each_once(&rows, 45);
    let dups = b.duplicate.load(Ordering::SeqCst) + c.duplicate.load(Ordering::SeqCst);
    assert!(
        dups >= 15,
        "re-routed messages not seen as duplicates: {dups}"
    );
    drop_schema(&s).await;
}

/// A replica stalls with a claim open (uncommitted) and then leaves the membership; the
/// group re-sends to B, whose claim must wait for A's transaction and then find it a
/// duplicate: the body runs once.
#[derive(Clone)]
struct Live(Arc<Mutex<Vec<Member>>>);
impl Membership for Live {
    async fn members(&mut self) -> std::io::Result<Vec<Member>> {
        Ok(self.0.lock().unwrap().clone())
    }
    fn refresh_every(&self) -> Option<Duration> {
        Some(Duration::from_millis(100))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reroute_racing_an_open_claim_runs_the_body_once() {
    let Some(s) = schema("racing_open_claim").await else {
        return;
    };
    let a = replica(NodeId(10), &s, Mode::Stall).await;
    let b = replica(NodeId(11), &s, Mode::Normal).await;
    let node = Arc::new(
        Node::builder(SENDER)
            .bind(ports::restartable_addr())
            .build()
            .await
            .unwrap(),
    );
    let live = Live(Arc::new(Mutex::new(vec![
        Member {
            id: a.id,
            addr: a.addr,
        },
        Member {
            id: b.id,
            addr: b.addr,
        },
    ])));
    let mut cfg = GroupConfig::new(CH);
    cfg.spread = Spread::RoundRobin;
    let g = GroupSender::<u64>::new(node.clone(), cfg, live.clone())
        .await
        .unwrap();
    // Find a message that A takes.
    let mut receipts = vec![];
    for v in 0..4u64 {
        receipts.push(within(10.0, "send", g.send(&v)).await.unwrap());
    }
    within(8.0, "A to open its claim", async {
        while a.handled.load(Ordering::SeqCst) < 1 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    live.0.lock().unwrap().retain(|m| m.id != a.id);
    // B gets A's message; its claim blocks on A's open transaction.
    tokio::time::sleep(Duration::from_millis(800)).await;
    a.released.store(true, Ordering::SeqCst);
    a.release.notify_waiters();
    a.release.notify_one();
    for r in receipts {
        within(10.0, "receipt", r).await.unwrap();
    }
    let rows = effects(&s).await;
    assert_each_once(&rows, 4);
    let bodies = a.handled.load(Ordering::SeqCst) + b.handled.load(Ordering::SeqCst);
    assert_eq!(bodies, 4, "a handler body ran twice for one message");
    let (ad, bd) = (
        a.duplicate.load(Ordering::SeqCst),
        b.duplicate.load(Ordering::SeqCst),
    );
    eprintln!("duplicates: A {ad}, B {bd}");
    assert!(
        bd >= 1,
        "the re-routed copy never reached B while A's claim was open"
    );
    drop_schema(&s).await;
}
