//! Inbox-handled throughput against durable dedup and plain effectively-once, on
//! SQLite and PostgreSQL: one run per configuration, printed as a table.
//!
//! Every configuration sends the same messages effectively-once over TCP loopback and
//! applies one effect row per message in the receiver's database; what differs is how
//! duplicates are kept out:
//!
//! * `effectively-once` — ackwire's in-memory dedup; the effect is an autocommit insert.
//! * `+ durable dedup` — the same with `DurableDedup` (fsync `Always`, the default).
//! * `+ inbox, 1/tx` — claim + effect in one transaction per message.
//! * `+ inbox, <=64/tx` — claims and effects of up to 64 waiting deliveries in one
//!   transaction (where the application allows batching), acked after the commit.
//!
//! ```text
//! cargo bench -p ackwire-inbox --features postgres --bench inbox_throughput
//! ```
//!
//! `ACKWIRE_INBOX_BENCH_N` sets the message count (default 3000). PostgreSQL runs when
//! the `postgres` feature is on and `127.0.0.1:5432` (database `test`, or
//! `ACKWIRE_PG_URL`) answers; otherwise its rows say `skipped`.

use ackwire::dedup::DurableDedup;
use ackwire::transport::tcp::TcpConfig;
use ackwire::{ChannelId, ChannelOptions, Delivery, Guarantee, Node, NodeConfig, NodeId, Receiver};
use ackwire_inbox::{Claim, Inbox};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

const SENDER: NodeId = NodeId(1);
const RECEIVER: NodeId = NodeId(2);
const CH: ChannelId = ChannelId(1);

#[derive(Debug, Clone, Copy, PartialEq)]
enum Mode {
    Plain,
    Durable,
    Inbox,
    InboxBatch,
}

impl Mode {
    fn label(self) -> &'static str {
        match self {
            Mode::Plain => "effectively-once (memory dedup)",
            Mode::Durable => "+ durable dedup (fsync Always)",
            Mode::Inbox => "+ inbox, 1 claim/tx",
            Mode::InboxBatch => "+ inbox, <=64 claims/tx",
        }
    }
}

const MODES: [Mode; 4] = [Mode::Plain, Mode::Durable, Mode::Inbox, Mode::InboxBatch];

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` passes nothing useful to us.
    let n: u64 = std::env::var("ACKWIRE_INBOX_BENCH_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3000);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    println!(
        "inbox-handled throughput: {n} messages (u64) per run, effectively-once over TCP \
         loopback, one effect row per message"
    );
    println!(
        "{:<11} {:<34} {:>10} {:>8}",
        "database", "mode", "msgs/s", "effects"
    );
    for mode in MODES {
        let r = rt.block_on(async {
            let dir = tempfile::tempdir().expect("tempdir");
            let opts = sqlx::sqlite::SqliteConnectOptions::new()
                .filename(dir.path().join("bench.sqlite"))
                .create_if_missing(true)
                .journal_mode(sqlx::sqlite::SqliteJournalMode::Wal)
                .busy_timeout(Duration::from_secs(10));
            let pool = sqlx::SqlitePool::connect_with(opts).await.expect("sqlite");
            setup(&pool).await;
            let r = run(&pool, mode, n, dir.path()).await;
            pool.close().await;
            r
        });
        print_row("SQLite", mode, n, r);
    }
    postgres(&rt, n);
}

fn print_row(db: &str, mode: Mode, n: u64, (elapsed, effects): (Duration, i64)) {
    println!(
        "{db:<11} {:<34} {:>10.0} {:>8}",
        mode.label(),
        n as f64 / elapsed.as_secs_f64(),
        effects
    );
}

#[cfg(feature = "postgres")]
fn postgres(rt: &tokio::runtime::Runtime, n: u64) {
    use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
    use std::str::FromStr;
    let url = std::env::var("ACKWIRE_PG_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_string());
    for mode in MODES {
        let r = rt.block_on(async {
            let admin = PgPoolOptions::new()
                .max_connections(1)
                .acquire_timeout(Duration::from_secs(3))
                .connect(&url)
                .await
                .ok()?;
            let schema = format!("ackwire_bench_{}", std::process::id());
            sqlx::query(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))
                .execute(&admin)
                .await
                .ok()?;
            sqlx::query(&format!("CREATE SCHEMA {schema}"))
                .execute(&admin)
                .await
                .ok()?;
            let opts = PgConnectOptions::from_str(&url)
                .ok()?
                .options([("search_path", schema.as_str())]);
            let pool = PgPoolOptions::new()
                .max_connections(4)
                .connect_with(opts)
                .await
                .ok()?;
            setup(&pool).await;
            let dir = tempfile::tempdir().expect("tempdir");
            let r = run(&pool, mode, n, dir.path()).await;
            pool.close().await;
            let _ = sqlx::query(&format!("DROP SCHEMA {schema} CASCADE"))
                .execute(&admin)
                .await;
            Some(r)
        });
        match r {
            Some(r) => print_row("PostgreSQL", mode, n, r),
            None => println!(
                "{:<11} {:<34} skipped: not reachable at {url}",
                "PostgreSQL",
                mode.label()
            ),
        }
    }
}

#[cfg(not(feature = "postgres"))]
fn postgres(_rt: &tokio::runtime::Runtime, _n: u64) {
    println!("PostgreSQL  skipped: built without the `postgres` feature");
}

async fn setup<DB: ackwire_inbox::Backend>(pool: &sqlx::Pool<DB>)
where
    for<'c> &'c sqlx::Pool<DB>: sqlx::Executor<'c, Database = DB>,
{
    ackwire_inbox::migrate(pool).await.expect("migrate");
    sqlx::Executor::execute(pool, "CREATE TABLE effects (n BIGINT NOT NULL)")
        .await
        .expect("effects table");
}

/// One run: returns the time from the first send to the last receipt, and the number
/// of effect rows.
async fn run<DB>(
    pool: &sqlx::Pool<DB>,
    mode: Mode,
    n: u64,
    dir: &std::path::Path,
) -> (Duration, i64)
where
    DB: ackwire_inbox::Backend,
    for<'c> &'c mut DB::Connection: sqlx::Executor<'c, Database = DB>,
    for<'c> &'c sqlx::Pool<DB>: sqlx::Executor<'c, Database = DB>,
    for<'q> i64: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    for<'q> <DB as sqlx::Database>::Arguments<'q>: sqlx::IntoArguments<'q, DB>,
    for<'r> (i64,): sqlx::FromRow<'r, DB::Row>,
{
    let mut cfg = NodeConfig::default();
    if mode == Mode::Durable {
        cfg.dedup.durable = Some(DurableDedup::new(dir.join("dedup")));
    }
    let tcp = TcpConfig::default();
    let receiver = Node::builder(RECEIVER)
        .tcp("127.0.0.1:0".parse().expect("addr"), tcp.clone())
        .allow_peer(SENDER)
        .config(cfg)
        .build()
        .await
        .expect("receiver");
    let sender = Node::builder(SENDER)
        .tcp("127.0.0.1:0".parse().expect("addr"), tcp)
        .peer(RECEIVER, receiver.local_addr().expect("addr"))
        .build()
        .await
        .expect("sender");
    let rx = receiver.receiver::<u64>(CH, false).expect("receiver");
    let handler = tokio::spawn(handle(rx, pool.clone(), mode, n));
    let out = sender
        .sender::<u64>(
            RECEIVER,
            ChannelOptions::new(CH, Guarantee::EffectivelyOnce),
        )
        .expect("sender");
    let started = Instant::now();
    let mut receipts = Vec::with_capacity(n as usize);
    for i in 0..n {
        receipts.push(out.send(&i).await.expect("send"));
    }
    for r in receipts {
        r.await.expect("receipt");
    }
    let elapsed = started.elapsed();
    handler.abort();
    let (effects,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM effects")
        .fetch_one(pool)
        .await
        .expect("count");
    (elapsed, effects)
}

/// The receiver's handler loop for `mode`.
async fn handle<DB>(mut rx: Receiver<u64>, pool: sqlx::Pool<DB>, mode: Mode, n: u64)
where
    DB: ackwire_inbox::Backend,
    for<'c> &'c mut DB::Connection: sqlx::Executor<'c, Database = DB>,
    for<'c> &'c sqlx::Pool<DB>: sqlx::Executor<'c, Database = DB>,
    for<'q> i64: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    for<'q> <DB as sqlx::Database>::Arguments<'q>: sqlx::IntoArguments<'q, DB>,
{
    let inbox = Inbox::<DB>::default();
    let insert = "INSERT INTO effects (n) VALUES ($1)";
    let mut handled = 0;
    while handled < n {
        let Some(first) = rx.recv().await else { return };
        let mut batch: Vec<Delivery<u64>> = vec![first];
        if mode == Mode::InboxBatch {
            let mut cx = Context::from_waker(Waker::noop());
            while batch.len() < 64 {
                match rx.poll_recv(&mut cx) {
                    Poll::Ready(Some(d)) => batch.push(d),
                    _ => break,
                }
            }
        }
        match mode {
            Mode::Plain | Mode::Durable => {
                for d in &batch {
                    sqlx::query(insert)
                        .bind(*d.message() as i64)
                        .execute(&pool)
                        .await
                        .expect("effect");
                }
            }
            Mode::Inbox | Mode::InboxBatch => {
                let mut tx = pool.begin().await.expect("begin");
                for d in &batch {
                    if inbox.claim(&mut tx, d.id()).await.expect("claim") == Claim::Fresh {
                        sqlx::query(insert)
                            .bind(*d.message() as i64)
                            .execute(&mut *tx)
                            .await
                            .expect("effect");
                    }
                }
                tx.commit().await.expect("commit");
            }
        }
        handled += batch.len() as u64;
        for d in batch {
            d.ack();
        }
    }
}
