//! Kill test 4(c) of issue 15: three receiver replicas sharing one PostgreSQL inbox,
//! fed by one replica group ([`ackwire::group::GroupSender`]); one replica is
//! SIGKILLed mid-stream and another is partitioned (a TCP proxy in front of it stalls
//! its traffic both ways, then lets it through again). Checked: every message's
//! effect is in the database **exactly once**.
//!
//! The replicas are child processes (this test binary re-executed, as in `kill9.rs`):
//! each claims a delivery's `MessageId` in the shared inbox, inserts one row into
//! `effects` (no unique constraint: a second application would be a second row) and
//! commits in one transaction, prints `C n` (or `D n` for a duplicate claim), then
//! acks. The sender (here) sends `0..TOTAL`, each under `IdKey(n)`, through the
//! group; a message whose group receipt fails (e.g. no live member for a while on a
//! loaded machine) is sent again under the same key, as an application would.
//!
//! What happens: the killed replica's unacknowledged messages — some already
//! committed, their ack lost with the process — are re-sent by the group to the
//! others under the same id; the partitioned replica's are too, once the failure
//! detector holds it Down, and when the partition heals the stalled copies reach it
//! late. Both kinds of repeat find the claim committed and are dropped as `Duplicate`.
//!
//! PostgreSQL only (the point is replicas sharing a server): skipped with a line on
//! stderr when 127.0.0.1:5432 is unreachable, failing instead under
//! `ACKWIRE_REQUIRE_POSTGRES=1`. About 10 s in a debug build; every wait is bounded.

#[macro_use]
mod support;

#[cfg(feature = "postgres")]
mod pg {
    use super::support;
    use ackwire::group::{GroupConfig, GroupSender, Spread, StaticMembers};
    use ackwire::{ChannelId, IdKey, Node, NodeConfig, NodeId};
    use ackwire_inbox::{Claim, Inbox};
    use sqlx::PgPool;
    use std::collections::BTreeMap;
    use std::net::SocketAddr;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;
    use std::time::{Duration, Instant};
    use support::child::{say, watchdog, ChildProc, ROLE_ENV};
    use support::net::{fast_tcp, SENDER};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::sync::watch;

    const ENTRY: &str = "pg::replica_child_entry";
    const CH: ChannelId = ChannelId(31);
    const ADDR_ENV: &str = "ACKWIRE_REPLICA_ADDR";
    const ID_ENV: &str = "ACKWIRE_REPLICA_ID";
    const SCHEMA_ENV: &str = "ACKWIRE_REPLICA_SCHEMA";
    const TOTAL: u64 = 800;
    const READY_TIMEOUT: Duration = Duration::from_secs(30);
    const KILLED: NodeId = NodeId(2);
    const PARTITIONED: NodeId = NodeId(3);
    const STEADY: NodeId = NodeId(4);

    // ------------------------------------------------------------ child side

    /// Entry point of the replica processes; does nothing unless `ACKWIRE_CHILD_ROLE`.
    #[test]
    #[ignore = "child process entry point, run by the other tests of this file"]
    fn replica_child_entry() {
        let Ok(role) = std::env::var(ROLE_ENV) else {
            return;
        };
        assert_eq!(role, "replica");
        watchdog(Duration::from_secs(120));
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(replica_role());
    }

    fn env(name: &str) -> String {
        std::env::var(name).unwrap_or_else(|_| panic!("{name} not set"))
    }

    /// One replica: claim + effect + commit per message, `C n` / `D n`, then ack.
    async fn replica_role() {
        let addr: SocketAddr = env(ADDR_ENV).parse().expect("addr");
        let id = NodeId(env(ID_ENV).parse().expect("id"));
        let pool = support::db::pg_pool(&env(SCHEMA_ENV)).await;
        let node = Node::builder(id)
            .tcp(addr, fast_tcp())
            .allow_peer(SENDER)
            .build()
            .await
            .expect("replica node");
        let mut rx = node.receiver::<u64>(CH, false).expect("receiver");
        let inbox = Inbox::<sqlx::Postgres>::default();
        say("READY");
        while let Some(d) = rx.recv().await {
            let n = *d.message();
            let fresh = loop {
                let mut tx = pool.begin().await.expect("begin");
                match inbox.claim(&mut tx, d.id()).await {
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
            };
            say(&format!("{} {n}", if fresh { "C" } else { "D" }));
            d.ack();
        }
    }

    // ------------------------------------------------------------ the partition

    /// A loopback TCP proxy that can stall its traffic both ways (a partition that
    /// keeps connections open and silent), then let it flow again.
    struct StallProxy {
        addr: SocketAddr,
        stalled: watch::Sender<bool>,
        task: tokio::task::JoinHandle<()>,
    }

    impl StallProxy {
        async fn start(target: SocketAddr) -> StallProxy {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind proxy");
            let addr = listener.local_addr().expect("proxy addr");
            let (stalled, rx) = watch::channel(false);
            let task = tokio::spawn(async move {
                while let Ok((inbound, _)) = listener.accept().await {
                    let Ok(outbound) = tokio::net::TcpStream::connect(target).await else {
                        continue;
                    };
                    let (ri, wi) = inbound.into_split();
                    let (ro, wo) = outbound.into_split();
                    tokio::spawn(pump(ri, wo, rx.clone()));
                    tokio::spawn(pump(ro, wi, rx.clone()));
                }
            });
            StallProxy {
                addr,
                stalled,
                task,
            }
        }

        fn stall(&self, on: bool) {
            self.stalled.send_replace(on);
        }
    }

    impl Drop for StallProxy {
        fn drop(&mut self) {
            self.task.abort();
        }
    }

    /// Forward `r` to `w`; while stalled, hold the chunk read and stop reading.
    async fn pump(
        mut r: impl tokio::io::AsyncRead + Unpin,
        mut w: impl tokio::io::AsyncWrite + Unpin,
        mut stalled: watch::Receiver<bool>,
    ) {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = match r.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            if stalled.wait_for(|s| !*s).await.is_err() {
                return;
            }
            if w.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    }

    // ------------------------------------------------------------ parent side

    fn spawn_replica(id: NodeId, addr: SocketAddr, schema: &str) -> ChildProc {
        let envs = [
            (ADDR_ENV, addr.to_string()),
            (ID_ENV, id.0.to_string()),
            (SCHEMA_ENV, schema.to_string()),
        ];
        let mut child = ChildProc::spawn(ENTRY, "replica", &envs);
        assert!(
            child.wait_line("READY", READY_TIMEOUT).is_some(),
            "replica {id} not ready: {:?}",
            child.drain()
        );
        child
    }

    fn count(lines: &[String], prefix: &str) -> usize {
        lines.iter().filter(|l| l.starts_with(prefix)).count()
    }

    /// A sender whose failure detector notices a silent replica within about a second.
    async fn sender_node() -> Arc<Node> {
        let mut cfg = NodeConfig::default();
        cfg.heartbeat_interval = Duration::from_millis(250);
        cfg.detector.acceptable_heartbeat_pause = Duration::from_millis(500);
        cfg.detector.first_heartbeat_estimate = Duration::from_millis(250);
        Arc::new(
            Node::builder(SENDER)
                .tcp(support::ports::restartable_addr(), fast_tcp())
                .config(cfg)
                .build()
                .await
                .expect("sender node"),
        )
    }

    #[test]
    fn three_replicas_one_killed_one_partitioned_apply_each_effect_once_postgres() {
        let started = Instant::now();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let Some(db) = rt.block_on(support::db::postgres("kill9_replica_group")) else {
            return;
        };
        let pool: PgPool = db.pool.clone();
        rt.block_on(async {
            sqlx::query("CREATE TABLE effects (n BIGINT NOT NULL)")
                .execute(&pool)
                .await
                .expect("create effects");
        });
        let addrs: BTreeMap<NodeId, SocketAddr> = [KILLED, PARTITIONED, STEADY]
            .into_iter()
            .map(|id| (id, support::ports::restartable_addr()))
            .collect();
        let mut children: BTreeMap<NodeId, ChildProc> = addrs
            .iter()
            .map(|(id, addr)| (*id, spawn_replica(*id, *addr, &db.schema)))
            .collect();
        let proxy = rt.block_on(StallProxy::start(addrs[&PARTITIONED]));
        let node = rt.block_on(sender_node());
        let mut config = GroupConfig::new(CH);
        config.spread = Spread::Affinity;
        config.max_attempts = 20;
        config.member_wait = Duration::from_secs(30);
        let members = StaticMembers::new([
            (KILLED, addrs[&KILLED]),
            (PARTITIONED, proxy.addr),
            (STEADY, addrs[&STEADY]),
        ])
        .expect("members");
        let group = rt
            .block_on(GroupSender::<u64>::new(node.clone(), config, members))
            .expect("group");

        // Send 0..TOTAL, a few milliseconds apart, each retried under its key until
        // its group receipt is Ok.
        let sent = Arc::new(AtomicU64::new(0));
        let resent = Arc::new(AtomicU64::new(0));
        let sending = {
            let (group, sent, resent) = (group.clone(), sent.clone(), resent.clone());
            rt.spawn(async move {
                let mut receipts = tokio::task::JoinSet::new();
                for n in 0..TOTAL {
                    let group = group.clone();
                    let resent = resent.clone();
                    let first = group.send_with_key(&n, IdKey(u128::from(n))).await;
                    receipts.spawn(async move {
                        let mut receipt = first;
                        loop {
                            if let Ok(r) = receipt {
                                if r.await.is_ok() {
                                    return;
                                }
                            }
                            resent.fetch_add(1, Ordering::Relaxed);
                            tokio::time::sleep(Duration::from_millis(200)).await;
                            receipt = group.send_with_key(&n, IdKey(u128::from(n))).await;
                        }
                    });
                    sent.store(n + 1, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                while receipts.join_next().await.is_some() {}
            })
        };
        let wait_sent = |at: u64| {
            let give_up = Instant::now() + Duration::from_secs(60);
            while sent.load(Ordering::Relaxed) < at {
                assert!(Instant::now() < give_up, "sender stalled before {at}");
                std::thread::sleep(Duration::from_millis(5));
            }
        };

        // A quarter in: SIGKILL replica 2. Half-way: partition replica 3.
        wait_sent(TOTAL / 4);
        let killed = children.get_mut(&KILLED).expect("child");
        killed.kill();
        let killed_applied = count(&killed.lines, "C ");
        wait_sent(TOTAL / 2);
        proxy.stall(true);
        let partitioned_at = Instant::now();

        rt.block_on(async {
            tokio::time::timeout(Duration::from_secs(90), sending)
                .await
                .expect("every message acked within 90 s")
                .expect("sending task")
        });
        let all_acked = started.elapsed();
        // Heal: what the partition held back now reaches replica 3, late.
        let stalled_for = partitioned_at.elapsed();
        proxy.stall(false);
        std::thread::sleep(Duration::from_secs(2));

        let rows: Vec<(i64, i64)> = rt.block_on(async {
            sqlx::query_as("SELECT n, COUNT(*) FROM effects GROUP BY n")
                .fetch_all(&pool)
                .await
                .expect("effects")
        });
        let effects: BTreeMap<i64, i64> = rows.into_iter().collect();
        let mut lines = BTreeMap::new();
        for (id, mut child) in children {
            child.finish(Duration::from_secs(5));
            lines.insert(id, (count(&child.lines, "C "), count(&child.lines, "D ")));
        }
        let stats = group.stats();
        let twice: Vec<_> = effects.iter().filter(|(_, c)| **c > 1).collect();
        let missing: Vec<_> = (0..TOTAL as i64)
            .filter(|n| !effects.contains_key(n))
            .collect();
        println!(
            "replica group on one PostgreSQL inbox: {TOTAL} messages; replica {KILLED} \
             SIGKILLed after applying {killed_applied}, replica {PARTITIONED} partitioned \
             for {:.1} s; per replica (applied, duplicates dropped by the inbox): {lines:?}; \
             group: {} re-routes, {} attempts, {} group receipts failed and resent; \
             {} applied twice, {} missing; all acked after {:.1} s, {:.1} s in all",
            stalled_for.as_secs_f64(),
            stats.rerouted,
            stats.attempts,
            resent.load(Ordering::Relaxed),
            twice.len(),
            missing.len(),
            all_acked.as_secs_f64(),
            started.elapsed().as_secs_f64(),
        );
        assert!(twice.is_empty(), "effects applied twice: {twice:?}");
        assert!(
            missing.is_empty(),
            "acked messages without effect: {missing:?}"
        );
        assert!(
            stats.rerouted > 0,
            "a killed and a partitioned replica should have caused re-routes: {stats:?}"
        );
        println!(
            "reliability: replica group | three processes on one PostgreSQL inbox; one SIGKILLed \
             mid-stream, one partitioned (stalled both ways, then healed) | {TOTAL} messages | \
             every effect in the database exactly once ({} re-routes; {} late or repeated \
             copies dropped by the inbox)",
            stats.rerouted,
            lines.values().map(|(_, d)| d).sum::<usize>()
        );
        drop(group);
        drop(proxy);
        rt.block_on(db.drop_schema());
    }
}

#[cfg(not(feature = "postgres"))]
#[test]
fn three_replicas_one_killed_one_partitioned_apply_each_effect_once_postgres() {
    support::db::postgres_not_built(
        "three_replicas_one_killed_one_partitioned_apply_each_effect_once_postgres",
    );
}
