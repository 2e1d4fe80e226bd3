//! An order service and a ledger service, each with its own SQLite database (no
//! server): the order service commits each order together with its outgoing "charge"
//! message (outbox); the ledger applies each charge together with its inbox claim.
//! Both crash in the middle — the ledger after committing a charge but before acking
//! it, the order service with charges still unacknowledged in its outbox — and are
//! restarted. At the end the ledger balances: every order charged exactly once.
//!
//! ```text
//! cargo run -p ackwire-inbox --example inbox_outbox
//! ```

use ackwire::{ChannelId, IdKey, Node, NodeId, ReceiverOptions};
use ackwire_inbox::{Claim, Inbox, Outbox, RelayOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool};
use sqlx::Sqlite;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

const SHOP: NodeId = NodeId(1);
const LEDGER: NodeId = NodeId(2);
const CHARGES: ChannelId = ChannelId(1);
/// The ledger "crashes" right after committing this order's charge.
const CRASH_AT: u64 = 7;
const ORDERS: u64 = 40;

/// The message: (order id, customer, cents).
type Charge = (u64, String, i64);

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let shop_db = open(&dir.path().join("orders.sqlite")).await?;
    let ledger_db = open(&dir.path().join("ledger.sqlite")).await?;
    ackwire_inbox::migrate(&shop_db).await?;
    ackwire_inbox::migrate(&ledger_db).await?;
    sqlx::query("CREATE TABLE orders (id INTEGER PRIMARY KEY, customer TEXT NOT NULL, cents INTEGER NOT NULL)")
        .execute(&shop_db)
        .await?;
    sqlx::query("CREATE TABLE entries (order_id INTEGER NOT NULL, customer TEXT NOT NULL, cents INTEGER NOT NULL)")
        .execute(&ledger_db)
        .await?;
    let ledger_addr = free_addr()?;
    let repeats = Arc::new(AtomicU64::new(0));

    // Ledger, first run: it will crash after committing order CRASH_AT.
    let ledger = start_ledger(ledger_addr, ledger_db.clone(), repeats.clone(), true).await?;
    // Order service, first run.
    let outbox = Outbox::<Sqlite>::new();
    let (shop, relay) = start_shop(ledger_addr, &outbox, shop_db.clone()).await?;

    for id in 1..=20 {
        place_order(&shop_db, &outbox, id).await?;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    println!("order service: placed orders 1..=20, each with its outbox row in one commit");
    // The ledger's handler returns when it "crashes"; the node goes down with it.
    let crashed_node = ledger.await??;
    drop(crashed_node);
    println!("ledger: crashed after committing order {CRASH_AT}'s charge, before acking it");
    let ledger = start_ledger(ledger_addr, ledger_db.clone(), repeats.clone(), false).await?;
    println!("ledger: restarted (its in-memory dedup starts empty)");

    for id in 21..=ORDERS {
        place_order(&shop_db, &outbox, id).await?;
    }
    let unacked = Outbox::<Sqlite>::pending(&shop_db).await?;
    drop(relay);
    drop(shop);
    println!(
        "order service: placed orders 21..={ORDERS}, then crashed with {unacked} of them \
         not yet acknowledged (still in its outbox)"
    );
    let (_shop, _relay) = start_shop(ledger_addr, &outbox, shop_db.clone()).await?;
    println!("order service: restarted; its relay sends the outbox rows again, under their keys");

    // Wait for the outbox to drain and the ledger to have every order.
    for _ in 0..600 {
        let entries: (i64,) = sqlx::query_as("SELECT COUNT(*) FROM entries")
            .fetch_one(&ledger_db)
            .await?;
        if Outbox::<Sqlite>::pending(&shop_db).await? == 0 && entries.0 as u64 == ORDERS {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let (orders, ordered): (i64, i64) =
        sqlx::query_as("SELECT COUNT(*), COALESCE(SUM(cents), 0) FROM orders")
            .fetch_one(&shop_db)
            .await?;
    let (entries, charged): (i64, i64) =
        sqlx::query_as("SELECT COUNT(*), COALESCE(SUM(cents), 0) FROM entries")
            .fetch_one(&ledger_db)
            .await?;
    let (twice,): (i64,) = sqlx::query_as(
        "SELECT COUNT(*) FROM (SELECT order_id FROM entries GROUP BY order_id HAVING COUNT(*) > 1)",
    )
    .fetch_one(&ledger_db)
    .await?;
    println!(
        "ledger: {entries} entries for {orders} orders, {twice} charged twice; \
         repeats dropped by the inbox: {}",
        repeats.load(Ordering::Relaxed)
    );
    println!("ledger: charged {charged} cents, orders total {ordered} cents");
    drop(ledger);
    if entries == orders && charged == ordered && twice == 0 {
        println!("the ledger balances");
        Ok(())
    } else {
        Err("the ledger does not balance".into())
    }
}

/// The order service: one transaction inserts the order and enqueues its charge.
async fn place_order(
    db: &SqlitePool,
    outbox: &Outbox<Sqlite>,
    id: u64,
) -> Result<(), Box<dyn std::error::Error>> {
    let customer = ["alice", "bob", "carol"][(id % 3) as usize].to_string();
    let cents = 100 + (id as i64 * 37) % 900;
    let mut tx = db.begin().await?;
    sqlx::query("INSERT INTO orders (id, customer, cents) VALUES (?1, ?2, ?3)")
        .bind(id as i64)
        .bind(&customer)
        .bind(cents)
        .execute(&mut *tx)
        .await?;
    let charge: Charge = (id, customer, cents);
    // The key is the order id: a re-send after a crash carries the same one.
    outbox
        .enqueue(&mut tx, LEDGER, CHARGES, IdKey(u128::from(id)), &charge)
        .await?;
    tx.commit().await?;
    Ok(())
}

/// Start the order service's node and relay.
async fn start_shop(
    ledger: SocketAddr,
    outbox: &Outbox<Sqlite>,
    db: SqlitePool,
) -> Result<(Arc<Node>, ackwire_inbox::Relay), Box<dyn std::error::Error>> {
    let node = Arc::new(
        Node::builder(SHOP)
            .bind("127.0.0.1:0".parse()?)
            .peer(LEDGER, ledger)
            .build()
            .await?,
    );
    let relay = outbox.relay(node.clone(), db, RelayOptions::default())?;
    Ok((node, relay))
}

/// Start the ledger; its handler task returns the node if it "crashes".
async fn start_ledger(
    addr: SocketAddr,
    db: SqlitePool,
    repeats: Arc<AtomicU64>,
    crash: bool,
) -> Result<tokio::task::JoinHandle<Result<Node, sqlx::Error>>, Box<dyn std::error::Error>> {
    let node = Node::builder(LEDGER)
        .bind(addr)
        .allow_peer(SHOP)
        .build()
        .await?;
    let mut charges = node.receiver_with::<Charge>(CHARGES, ReceiverOptions::ordered())?;
    let inbox = Inbox::<Sqlite>::default();
    Ok(tokio::spawn(async move {
        while let Some(delivery) = charges.recv().await {
            let (order, customer, cents) = delivery.message().clone();
            let mut tx = db.begin().await?;
            match inbox.claim(&mut tx, delivery.id()).await {
                Ok(Claim::Fresh) => {
                    sqlx::query(
                        "INSERT INTO entries (order_id, customer, cents) VALUES (?1, ?2, ?3)",
                    )
                    .bind(order as i64)
                    .bind(customer)
                    .bind(cents)
                    .execute(&mut *tx)
                    .await?;
                    tx.commit().await?;
                }
                Ok(Claim::Duplicate) => {
                    tx.rollback().await?;
                    repeats.fetch_add(1, Ordering::Relaxed);
                    println!("ledger: order {order} arrived again: already applied, skipped");
                }
                Err(e) => {
                    eprintln!("ledger: {e}; the charge will be redelivered");
                    continue; // dropping the delivery unacked gets it redelivered
                }
            }
            if crash && order == CRASH_AT {
                // Simulated crash between the commit and the ack: neither ack nor nack
                // ever leaves this process.
                std::mem::forget(delivery);
                return Ok(node);
            }
            delivery.ack();
        }
        Ok(node)
    }))
}

async fn open(path: &Path) -> Result<SqlitePool, sqlx::Error> {
    let options = SqliteConnectOptions::new()
        .filename(path)
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal);
    SqlitePool::connect_with(options).await
}

/// A loopback address nobody listens on now.
fn free_addr() -> std::io::Result<SocketAddr> {
    std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()
}
