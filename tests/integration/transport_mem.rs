//! In-memory transport: fault rates follow the plan, seeds reproduce, partitions and
//! disconnects behave. All tests run on paused tokio time.

use ackwire::transport::mem::{FaultInjector, FaultPlan, MemNetwork, MemStats};
use ackwire::transport::{Link, LinkCommand, LinkEvent, Transport};
use ackwire::wire::{Frame, Heartbeat};
use ackwire::{NodeId, Origin};
use std::time::Duration;

fn origin(n: u64) -> Origin {
    Origin {
        node: NodeId(n),
        incarnation: 100 + n,
    }
}

fn start(net: &MemNetwork, n: u64) -> Link {
    Box::new(net.transport(NodeId(n)))
        .start(origin(n))
        .expect("attach")
}

fn ping(nonce: u64) -> Frame {
    Frame::Ping(Heartbeat { nonce })
}

async fn expect_up(link: &mut Link, peer: u64) {
    match link.events.recv().await {
        Some(LinkEvent::Up { origin: o, .. }) => assert_eq!(o, origin(peer)),
        other => panic!("expected Up from {peer}, got {other:?}"),
    }
}

/// Send `n` pings 1..=n from `a` to node 2 in batches of 100.
async fn send_pings(a: &Link, n: u64) {
    for chunk in (1..=n).collect::<Vec<_>>().chunks(100) {
        a.commands
            .send(LinkCommand::Send {
                peer: NodeId(2),
                frames: chunk.iter().map(|&i| ping(i)).collect(),
            })
            .await
            .unwrap();
    }
}

/// Receive frames until `quiet` passes with nothing new (paused time makes this exact).
async fn drain_nonces(link: &mut Link, quiet: Duration) -> Vec<u64> {
    let mut got = Vec::new();
    while let Ok(Some(ev)) = tokio::time::timeout(quiet, link.events.recv()).await {
        if let LinkEvent::Frame {
            frame: Frame::Ping(h),
            ..
        } = ev
        {
            got.push(h.nonce);
        }
    }
    got
}

/// Run a two-node scenario under `plan`, returning the nonces node 2 received (in
/// arrival order) and the network stats.
async fn run(plan: FaultPlan, n: u64) -> (Vec<u64>, MemStats) {
    let net = MemNetwork::new(plan).unwrap();
    let a = start(&net, 1);
    let mut b = start(&net, 2);
    expect_up(&mut b, 1).await;
    send_pings(&a, n).await;
    let got = drain_nonces(&mut b, Duration::from_secs(1)).await;
    (got, net.stats())
}

#[tokio::test(start_paused = true)]
async fn observed_loss_and_duplication_rates_match_plan() {
    const N: u64 = 20_000;
    let plan = FaultPlan::new(0xA11CE)
        .loss(0.10)
        .duplicate(0.05)
        .reorder(0.10)
        .delay(Duration::from_millis(1), Duration::from_millis(3));
    let (got, stats) = run(plan, N).await;
    assert_eq!(stats.sent, N);
    let loss = stats.dropped_loss as f64 / N as f64;
    let dup = stats.duplicated as f64 / (N - stats.dropped_loss) as f64;
    // ±0.015 is > 6 standard deviations at these rates and N.
    assert!((loss - 0.10).abs() < 0.015, "loss rate {loss}");
    assert!((dup - 0.05).abs() < 0.015, "duplication rate {dup}");
    assert_eq!(stats.delivered, got.len() as u64);
    assert_eq!(got.len() as u64, N - stats.dropped_loss + stats.duplicated);
    // Reordering happened: arrival order is not sorted.
    assert!(
        got.windows(2).any(|w| w[0] > w[1]),
        "no reordering observed"
    );
}

#[tokio::test(start_paused = true)]
async fn same_seed_gives_identical_fault_decisions_and_arrivals() {
    let plan = FaultPlan::new(99)
        .loss(0.2)
        .duplicate(0.1)
        .reorder(0.3)
        .delay(Duration::from_millis(0), Duration::from_millis(5));
    let (first, s1) = run(plan, 2_000).await;
    let (second, s2) = run(plan, 2_000).await;
    assert_eq!(s1, s2);
    assert_eq!(first, second);
    let (other, _) = run(plan.seed(100), 2_000).await;
    assert_ne!(
        first, other,
        "a different seed should give different faults"
    );

    // The sans-IO injector alone is reproducible too.
    let mut x = FaultInjector::new(&plan, NodeId(1), NodeId(2));
    let mut y = FaultInjector::new(&plan, NodeId(1), NodeId(2));
    for _ in 0..10_000 {
        assert_eq!(x.decide(), y.decide());
    }
}

#[tokio::test(start_paused = true)]
async fn partition_blocks_all_frames_and_heal_lets_them_through() {
    let net = MemNetwork::new(FaultPlan::default()).unwrap();
    let a = start(&net, 1);
    let mut b = start(&net, 2);
    expect_up(&mut b, 1).await;

    net.partition(NodeId(1), NodeId(2));
    send_pings(&a, 500).await;
    assert!(drain_nonces(&mut b, Duration::from_secs(1))
        .await
        .is_empty());
    assert_eq!(net.stats().dropped_partition, 500);

    net.heal(NodeId(1), NodeId(2));
    send_pings(&a, 500).await;
    let got = drain_nonces(&mut b, Duration::from_secs(1)).await;
    assert_eq!(got, (1..=500).collect::<Vec<_>>());

    net.isolate(NodeId(2));
    send_pings(&a, 10).await;
    assert!(drain_nonces(&mut b, Duration::from_secs(1))
        .await
        .is_empty());
    net.heal_all();
    send_pings(&a, 10).await;
    assert_eq!(drain_nonces(&mut b, Duration::from_secs(1)).await.len(), 10);
    assert_eq!(net.stats().dropped_partition, 510);
}

#[tokio::test(start_paused = true)]
async fn disconnect_yields_down_then_up_on_both_sides() {
    let net = MemNetwork::new(FaultPlan::default()).unwrap();
    let mut a = start(&net, 1);
    let mut b = start(&net, 2);
    expect_up(&mut a, 2).await;
    expect_up(&mut b, 1).await;
    net.disconnect(NodeId(1), NodeId(2));
    for (link, peer) in [(&mut a, 2), (&mut b, 1)] {
        match link.events.recv().await {
            Some(LinkEvent::Down { peer: p }) => assert_eq!(p, NodeId(peer)),
            other => panic!("expected Down, got {other:?}"),
        }
        expect_up(link, peer).await;
    }
}

#[tokio::test(start_paused = true)]
async fn duplicate_node_is_refused_and_shutdown_emits_down() {
    let net = MemNetwork::new(FaultPlan::default()).unwrap();
    let a = start(&net, 1);
    let mut b = start(&net, 2);
    expect_up(&mut b, 1).await;
    assert!(Box::new(net.transport(NodeId(1))).start(origin(1)).is_err());
    a.commands.send(LinkCommand::Shutdown).await.unwrap();
    match b.events.recv().await {
        Some(LinkEvent::Down { peer }) => assert_eq!(peer, NodeId(1)),
        other => panic!("expected Down, got {other:?}"),
    }
    // The id is free again after shutdown (a restart).
    let _a2 = start(&net, 1);
    expect_up(&mut b, 1).await;
}
