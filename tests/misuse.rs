//! Misuse, as a new user would commit it: every case gives a typed error or a correct
//! delivery, never a panic, a silent loss or a success for a message nobody processed
//! (issue 13). One test per case; each prints a `reliability:` line once it has held.

mod support;

use ackwire::detector::Health;
use ackwire::transport::mem::{FaultPlan, MemNetwork};
use ackwire::transport::tcp::TcpConfig;
use ackwire::{
    ChannelId, ChannelOptions, ConfigError, DeadLetterReason, Guarantee, Node, NodeConfig,
    NodeError, NodeId, Outcome, ProtoConfig, RejectReason, SendError,
};
use bytes::Bytes;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use support::reliability::report;

const CH: ChannelId = ChannelId(5);
const A: NodeId = NodeId(1);
const B: NodeId = NodeId(2);

fn net() -> MemNetwork {
    MemNetwork::new(FaultPlan::new(1)).unwrap()
}

async fn node(net: &MemNetwork, id: NodeId, config: NodeConfig) -> Result<Node, NodeError> {
    Node::builder(id)
        .transport(net.transport(id))
        .config(config)
        .seed(id.0)
        .build()
        .await
}

async fn pair(net: &MemNetwork, config: NodeConfig) -> (Node, Node) {
    let a = node(net, A, config.clone()).await.unwrap();
    let b = node(net, B, config).await.unwrap();
    (a, b)
}

/// The default config changed by `f` (`NodeConfig` is non-exhaustive).
fn cfg(f: impl FnOnce(&mut NodeConfig)) -> NodeConfig {
    let mut c = NodeConfig::default();
    f(&mut c);
    c
}

fn opts(g: Guarantee) -> ChannelOptions {
    ChannelOptions::new(CH, g)
}

/// One `u64` from `a` to `b`, acked by the receiver: the receipt's outcome.
async fn round_trip(a: &Node, b: &Node, options: ChannelOptions) -> Result<Outcome, SendError> {
    let mut inbox = b.receiver::<u64>(options.channel, false).unwrap();
    let out = a.sender::<u64>(b.id(), options).unwrap();
    let receipt = out.send(&42).await.unwrap();
    let d = within(inbox.recv()).await.expect("delivered");
    assert_eq!(*d.message(), 42);
    d.ack();
    within(receipt).await
}

/// `f`'s output, failing the test after 5 virtual minutes (a hang is a failure).
async fn within<F: std::future::Future>(f: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(300), f)
        .await
        .expect("did not complete within 5 minutes")
}

fn config_err(r: Result<Node, NodeError>) -> ConfigError {
    match r {
        Err(NodeError::Config(e)) => e,
        Err(e) => panic!("expected a config error, got {e}"),
        Ok(_) => panic!("expected a config error, got a node"),
    }
}

/// A user who turns on durable dedup the struct-update way keeps a valid config: the
/// dedup defaults agree with the node's (they used to differ, 1024 vs 8192, and this
/// config failed validation with `DedupWindowBelowInFlight`).
#[tokio::test(start_paused = true)]
async fn durable_dedup_with_struct_update_defaults_builds_a_node() {
    let dir = tempfile::tempdir().unwrap();
    let config = cfg(|c| {
        c.dedup = ackwire::dedup::DedupConfig {
            durable: Some(ackwire::dedup::DurableDedup::new(dir.path())),
            ..Default::default()
        }
    });
    if let Err(e) = config.validate() {
        panic!("{e}");
    }
    assert_eq!(
        ackwire::dedup::DedupConfig::default(),
        NodeConfig::default().dedup
    );
    let net = net();
    let a = node(&net, A, NodeConfig::default()).await.unwrap();
    let b = node(&net, B, config).await.unwrap();
    let out = round_trip(&a, &b, opts(Guarantee::EffectivelyOnce)).await;
    assert_eq!(out, Ok(Outcome::Acked));
}

/// A sender to the node's own id is a typed error at once (it used to be accepted,
/// and every message failed its deadline after 22 transmissions into nowhere).
#[tokio::test(start_paused = true)]
async fn a_sender_to_the_node_itself_is_a_typed_error() {
    let net = net();
    let (a, _b) = pair(&net, NodeConfig::default()).await;
    for g in [
        Guarantee::AtMostOnce,
        Guarantee::AtLeastOnce,
        Guarantee::EffectivelyOnce,
    ] {
        assert!(matches!(
            a.sender::<u64>(A, opts(g)),
            Err(NodeError::SelfPeer(A))
        ));
        assert!(matches!(
            a.raw_sender(A, opts(g)),
            Err(NodeError::SelfPeer(A))
        ));
    }
    report(
        "misuse",
        "a sender to the node's own id",
        "3 guarantees, typed and raw",
        "NodeError::SelfPeer at once (no message sent into nowhere)",
    );
}

/// The node's own id given to `NodeBuilder::peer` is a typed error from `build()`
/// (it used to be accepted: the node watched itself, declared itself Down and warned
/// about a heartbeat to itself every second), and nothing is left bound.
#[tokio::test]
async fn the_node_itself_as_a_builder_peer_is_a_typed_error() {
    let addr = support::ports::restartable_addr();
    let r = Node::builder(A).bind(addr).peer(A, addr).build().await;
    assert!(matches!(r, Err(NodeError::SelfPeer(A))), "{r:?}");
    // The address is free again: nothing was started.
    let n = Node::builder(A).bind(addr).build().await.unwrap();
    n.shutdown().await;
    report(
        "misuse",
        "the node's own id given to NodeBuilder::peer",
        "1 build",
        "NodeError::SelfPeer from build(), nothing started",
    );
}

/// A durable-dedup or hint directory written by one node id, given to a node with
/// another id, fails `build()` with `NodeError::DirectoryOfAnotherNode` (its `OWNER`
/// file names the first); the first id opens it again. (Regression: accepted — a
/// durable dedup log of node 2 made node 4 ack 20 of 30 messages it never processed,
/// since library-assigned ids name the sending run, channel and seq, not the
/// receiver; node 2's hints were replayed by node 3 under ids it may not claim,
/// refused by their target, and deleted.)
#[tokio::test(start_paused = true)]
async fn a_store_directory_of_another_node_id_is_a_typed_error() {
    let tmp = tempfile::tempdir().unwrap();
    let dedup_dir = tmp.path().join("dedup");
    let hint_dir = tmp.path().join("hints");
    let stores = cfg(|c| {
        c.dedup.durable = Some(ackwire::dedup::DurableDedup::new(&dedup_dir));
        c.handoff = Some(ackwire::HandoffConfig::new(&hint_dir));
    });
    let net = net();
    node(&net, A, stores.clone())
        .await
        .unwrap()
        .shutdown()
        .await;
    for (what, config) in [
        (
            "dedup",
            cfg(|c| c.dedup.durable = Some(ackwire::dedup::DurableDedup::new(&dedup_dir))),
        ),
        (
            "hints",
            cfg(|c| c.handoff = Some(ackwire::HandoffConfig::new(&hint_dir))),
        ),
    ] {
        match node(&net, B, config).await {
            Err(NodeError::DirectoryOfAnotherNode { dir, owner, node }) => {
                assert_eq!((owner, node), (A, B), "{what}");
                assert!(dir.ends_with(what), "{what}: {}", dir.display());
            }
            other => panic!("{what}: {other:?}"),
        }
    }
    let again = node(&net, A, stores).await.unwrap();
    again.shutdown().await;
    report(
        "misuse",
        "a durable-dedup or hint directory of another node id",
        "2 stores",
        "NodeError::DirectoryOfAnotherNode from build(); the owner opens it again",
    );
}

#[tokio::test(start_paused = true)]
async fn heartbeat_interval_max_is_a_typed_error() {
    let config = cfg(|c| c.heartbeat_interval = Duration::MAX);
    let e = config_err(node(&net(), A, config).await);
    assert!(
        matches!(
            e,
            ConfigError::DurationTooLong {
                field: "heartbeat_interval",
                value: Duration::MAX,
                max
            } if max == NodeConfig::MAX_HEARTBEAT_INTERVAL
        ),
        "{e:?}"
    );
    assert_eq!(e.field(), "heartbeat_interval");
    report(
        "misuse",
        "heartbeat_interval = Duration::MAX (used to panic build)",
        "1",
        "build fails with ConfigError::DurationTooLong naming the field and the 1 h bound",
    );
}

#[tokio::test(start_paused = true)]
async fn retry_deadline_max_means_no_deadline() {
    let mut config = NodeConfig::default();
    config.proto.retry.deadline = Some(Duration::MAX);
    let net = net();
    let (a, b) = pair(&net, config).await;
    assert_eq!(
        round_trip(&a, &b, opts(Guarantee::AtLeastOnce)).await,
        Ok(Outcome::Acked)
    );
    // A message that must be retransmitted for a minute (partition) still settles.
    net.partition(A, B);
    let mut inbox = b.receiver::<u64>(ChannelId(6), false).unwrap();
    let out = a
        .sender::<u64>(B, ChannelOptions::new(ChannelId(6), Guarantee::AtLeastOnce))
        .unwrap();
    let receipt = out.send(&7).await.unwrap();
    tokio::time::sleep(Duration::from_secs(60)).await;
    net.heal(A, B);
    let d = within(inbox.recv()).await.unwrap();
    d.ack();
    assert_eq!(within(receipt).await, Ok(Outcome::Acked));
    a.shutdown().await;
    assert!(a.closed().await.is_ok(), "the driver must not have died");
    report(
        "misuse",
        "retry.deadline = Some(Duration::MAX) (used to panic the driver on the first send)",
        "1",
        "taken as no deadline: acked, also after 60 s of retransmissions; driver alive",
    );
}

#[tokio::test(start_paused = true)]
async fn channel_deadline_max_means_no_deadline() {
    let net = net();
    let (a, b) = pair(&net, NodeConfig::default()).await;
    let options = ChannelOptions {
        deadline: Some(Duration::MAX),
        ..opts(Guarantee::EffectivelyOnce)
    };
    assert_eq!(round_trip(&a, &b, options).await, Ok(Outcome::Acked));
    // Zero is refused when the sender is made, not at the first send.
    let zero = ChannelOptions {
        deadline: Some(Duration::ZERO),
        ..opts(Guarantee::AtLeastOnce)
    };
    match a.sender::<u64>(B, zero) {
        Err(NodeError::Config(ConfigError::DurationTooShort {
            field: "deadline", ..
        })) => {}
        other => panic!("expected DurationTooShort for deadline, got {other:?}"),
    }
    a.shutdown().await;
    assert!(a.closed().await.is_ok());
    report(
        "misuse",
        "ChannelOptions.deadline = Some(Duration::MAX) / Some(0)",
        "1",
        "MAX: acked, driver alive; 0: sender() fails with ConfigError::DurationTooShort",
    );
}

#[tokio::test(start_paused = true)]
async fn shutdown_drain_max_waits_for_the_last_receipt_and_stops_cleanly() {
    let config = cfg(|c| c.shutdown_drain = Duration::MAX);
    let net = net();
    let (a, _b) = pair(&net, config).await;
    net.partition(A, B);
    let out = a.sender::<u64>(B, opts(Guarantee::AtLeastOnce)).unwrap();
    let receipt = out.send(&1).await.unwrap();
    let started = tokio::time::Instant::now();
    within(a.shutdown()).await;
    // The drain waited for the message to settle: at its 30 s default deadline.
    assert!(
        started.elapsed() >= Duration::from_secs(29),
        "{:?}",
        started.elapsed()
    );
    assert!(matches!(receipt.await, Err(SendError::Deadline { .. })));
    assert!(a.closed().await.is_ok(), "the driver must not have died");
    assert!(matches!(
        a.sender::<u64>(B, opts(Guarantee::AtLeastOnce)),
        Err(NodeError::Shutdown)
    ));
    report(
        "misuse",
        "shutdown_drain = Duration::MAX (used to panic the driver at shutdown)",
        "1",
        "drain waits until the last message settles, then a clean stop: closed() is Ok",
    );
}

/// `TcpConfig::handshake_timeout` and `read_timeout` accept any non-zero duration, so
/// `Duration::MAX` ("never") is valid: connections handshake and a payload that
/// arrives in many reads (a frame in progress arms the read timeout) is delivered.
/// (Regression: `now + timeout` overflowed and panicked the connection tasks.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_timeouts_max_are_accepted_and_a_large_frame_is_delivered() {
    let tcp = TcpConfig {
        handshake_timeout: Duration::MAX,
        read_timeout: Duration::MAX,
        ..TcpConfig::default()
    };
    let b = Node::builder(B)
        .tcp(support::ports::restartable_addr(), tcp.clone())
        .allow_peer(A)
        .build()
        .await
        .unwrap();
    let a = Node::builder(A)
        .tcp(support::ports::restartable_addr(), tcp)
        .peer(B, b.local_addr().unwrap())
        .build()
        .await
        .unwrap();
    let mut inbox = b.raw_receiver(CH, false).unwrap();
    let out = a.raw_sender(B, opts(Guarantee::EffectivelyOnce)).unwrap();
    let payload = Bytes::from(vec![9u8; 900 << 10]);
    let receipt = out.send(payload.clone()).await.unwrap();
    let d = tokio::time::timeout(Duration::from_secs(20), inbox.recv())
        .await
        .expect("delivered")
        .unwrap();
    assert_eq!(d.message(), &payload);
    d.ack();
    assert_eq!(
        tokio::time::timeout(Duration::from_secs(20), receipt).await,
        Ok(Ok(Outcome::Acked))
    );
    report(
        "misuse",
        "TcpConfig handshake_timeout and read_timeout = Duration::MAX (used to panic the connection tasks)",
        "1",
        "accepted; the nodes connect and a 900 KiB payload is delivered and acked",
    );
}

#[tokio::test(start_paused = true)]
async fn stream_credit_max_is_a_typed_error_and_the_largest_accepted_works() {
    let config = cfg(|c| c.proto.stream_credit = u64::MAX);
    let e = config_err(node(&net(), A, config).await);
    assert!(
        matches!(e, ConfigError::TooLarge { field: "proto.stream_credit", max, .. }
            if max == ProtoConfig::MAX_BOOKKEEPING as u64),
        "{e:?}"
    );
    let config = cfg(|c| c.proto.stream_credit = ProtoConfig::MAX_BOOKKEEPING as u64);
    let net = net();
    let (a, b) = pair(&net, config).await;
    assert_eq!(
        round_trip(&a, &b, opts(Guarantee::AtLeastOnce)).await,
        Ok(Outcome::Acked)
    );
    report(
        "misuse",
        "stream_credit = u64::MAX (receiver_buffer = usize::MAX used to panic receiver())",
        "1",
        "build fails with ConfigError::TooLarge; the largest accepted value delivers",
    );
}

#[tokio::test]
async fn max_payload_above_the_tcp_frame_limit_is_a_typed_error() {
    let config = cfg(|c| c.max_payload = 64 << 20);
    let r = Node::builder(A)
        .bind(support::ports::restartable_addr())
        .config(config)
        .build()
        .await;
    let max = match config_err(r) {
        ConfigError::PayloadAboveFrameLimit {
            max_payload,
            max_frame_len,
            max,
        } => {
            assert_eq!(max_payload, 64 << 20);
            assert_eq!(max_frame_len, TcpConfig::default().max_frame_len);
            assert!(max < max_frame_len && max > max_frame_len - 1024, "{max}");
            max
        }
        e => panic!("expected PayloadAboveFrameLimit, got {e:?}"),
    };
    // The largest accepted payload is delivered over TCP (a small frame limit keeps
    // this quick; the bound is computed the same way).
    let tcp = TcpConfig {
        max_frame_len: 64 << 10,
        ..TcpConfig::default()
    };
    let limit = max - (TcpConfig::default().max_frame_len - tcp.max_frame_len);
    let config = cfg(|c| c.max_payload = limit);
    let b = Node::builder(B)
        .tcp(support::ports::restartable_addr(), tcp.clone())
        .allow_peer(A)
        .config(config.clone())
        .build()
        .await
        .unwrap();
    let a = Node::builder(A)
        .tcp(support::ports::restartable_addr(), tcp.clone())
        .peer(B, b.local_addr().unwrap())
        .config(config.clone())
        .build()
        .await
        .unwrap();
    let mut inbox = b.raw_receiver(CH, false).unwrap();
    let out = a.raw_sender(B, opts(Guarantee::EffectivelyOnce)).unwrap();
    let receipt = out.send(Bytes::from(vec![7u8; limit])).await.unwrap();
    let d = tokio::time::timeout(Duration::from_secs(10), inbox.recv())
        .await
        .expect("the largest accepted payload must arrive")
        .unwrap();
    assert_eq!(d.message().len(), limit);
    d.ack();
    assert_eq!(receipt.await, Ok(Outcome::Acked));
    // One byte more fails fast, typed.
    assert_eq!(
        out.send(Bytes::from(vec![7u8; limit + 1])).await.err(),
        Some(SendError::TooLarge {
            len: limit + 1,
            max: limit
        })
    );
    let mut too_big = config;
    too_big.max_payload = limit + 1;
    let r = Node::builder(NodeId(3))
        .tcp(support::ports::restartable_addr(), tcp)
        .config(too_big)
        .build()
        .await;
    assert!(matches!(
        config_err(r),
        ConfigError::PayloadAboveFrameLimit { .. }
    ));
    report(
        "misuse",
        "max_payload = 64 MiB over TCP's 8 MiB frame limit (used to time out after 6 retransmissions)",
        "1",
        "build fails with ConfigError::PayloadAboveFrameLimit; the largest accepted payload is delivered over TCP",
    );
}

/// `NodeBuilder::build`: a `TcpTransport` given ready-made to `transport` (as
/// `TcpTransport::with_tls` needs) is checked as one built by `bind`: a channel size
/// tokio cannot hold is a typed error from `TcpTransport::new` (it panicked when the
/// transport started), and `max_payload` above its frame limit fails the build (a
/// payload between the two was accepted by `send` and dropped at every attempt).
#[tokio::test]
async fn a_tcp_transport_given_ready_made_is_checked_as_one_built_by_bind() {
    use ackwire::transport::tcp::{TcpConfigError, TcpTransport};
    let addr = support::ports::restartable_addr();
    for field in ["channel_capacity", "queue_bound"] {
        let mut tcp = TcpConfig::default();
        match field {
            "channel_capacity" => tcp.channel_capacity = usize::MAX >> 2,
            _ => tcp.queue_bound = usize::MAX >> 2,
        }
        let e = TcpTransport::new(addr, tcp).err();
        assert!(
            matches!(e, Some(TcpConfigError::AboveChannelLimit { field: f, .. }) if f == field),
            "{field}: {e:?}"
        );
    }
    let tcp = TcpConfig {
        max_frame_len: 1 << 20,
        ..TcpConfig::default()
    };
    let t = TcpTransport::new(addr, tcp.clone()).unwrap();
    let r = Node::builder(A).transport(t).build().await;
    assert!(matches!(
        config_err(r),
        ConfigError::PayloadAboveFrameLimit {
            max_frame_len: 1_048_576,
            ..
        }
    ));
    // Within the limit, it builds.
    let t = TcpTransport::new(addr, tcp).unwrap();
    let node = Node::builder(A)
        .transport(t)
        .config(cfg(|c| c.max_payload = 1 << 19))
        .build()
        .await
        .unwrap();
    node.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_string_received_as_u64_is_rejected_as_another_type() {
    let net = net();
    let (a, b) = pair(&net, NodeConfig::default()).await;
    let mut inbox = b.receiver::<u64>(CH, false).unwrap();
    let options = ChannelOptions {
        deadline: Some(Duration::from_secs(3)),
        ..opts(Guarantee::AtLeastOnce)
    };
    // bincode's "hello" is [5, b'h', ...]: it used to decode as Some(5).
    let wrong = a.sender::<String>(B, options).unwrap();
    let receipt = wrong.send(&"hello".to_string()).await.unwrap();
    assert_eq!(
        within(receipt).await,
        Err(SendError::Rejected {
            reason: RejectReason::TypeMismatch
        }),
        "the sender must not see Acked, and learns why at once"
    );
    let got = tokio::time::timeout(Duration::from_secs(1), inbox.recv()).await;
    assert!(
        got.is_err(),
        "a String must not be delivered as a u64: {got:?}"
    );
    let stats = b.stats().await.unwrap();
    assert_eq!(stats.proto.type_mismatches, 1, "{stats:?}");
    // The same bytes without the type check reach the decoder, which refuses them
    // (trailing bytes): dead-lettered as undecodable.
    let unchecked = a.sender::<String>(B, options).unwrap().without_type_check();
    let receipt = unchecked.send(&"hello".to_string()).await.unwrap();
    // The typed receiver decodes when polled: it yields nothing and refuses the payload.
    let got = tokio::time::timeout(Duration::from_secs(1), inbox.recv()).await;
    assert!(got.is_err(), "{got:?}");
    assert_eq!(
        within(receipt).await,
        Err(SendError::Rejected {
            reason: RejectReason::Undecodable
        })
    );
    let letter = b.dead_letters().try_recv().expect("a dead letter");
    assert_eq!(letter.reason, DeadLetterReason::Undecodable);
    assert_eq!(
        (letter.from.node, letter.channel, letter.deliveries),
        (A, CH, 1)
    );
    assert_eq!(
        bincode::serde::decode_from_slice::<String, _>(
            &letter.message,
            bincode::config::standard()
        )
        .unwrap()
        .0,
        "hello"
    );
    // The channel still works for the right type.
    let right = a.sender::<u64>(B, opts(Guarantee::AtLeastOnce)).unwrap();
    let receipt = right.send(&9).await.unwrap();
    let d = within(inbox.recv()).await.unwrap();
    assert_eq!(*d.message(), 9);
    d.ack();
    assert_eq!(receipt.await, Ok(Outcome::Acked));
    report(
        "misuse",
        "a String payload received as u64 (used to yield Some(5) and ack)",
        "1",
        "type fingerprints differ: rejected before decoding, receipt fails Rejected(TypeMismatch) at once; without the type check the decoder refuses it (Undecodable, dead-lettered)",
    );
}

mod shop {
    #[derive(serde::Serialize, serde::Deserialize, Debug, PartialEq)]
    pub(crate) struct Payment {
        pub(crate) cents: u64,
    }
}

mod ledger {
    #[derive(serde::Serialize, serde::Deserialize, Debug, PartialEq)]
    pub(crate) struct Payment {
        pub(crate) cents: u64,
    }
}

#[tokio::test(start_paused = true)]
async fn two_services_copies_of_one_type_pass_the_type_check() {
    let net = net();
    let (a, b) = pair(&net, NodeConfig::default()).await;
    let mut inbox = b.receiver::<ledger::Payment>(CH, false).unwrap();
    let out = a
        .sender::<shop::Payment>(B, opts(Guarantee::EffectivelyOnce))
        .unwrap();
    let receipt = out.send(&shop::Payment { cents: 250 }).await.unwrap();
    let d = within(inbox.recv()).await.unwrap();
    assert_eq!(*d.message(), ledger::Payment { cents: 250 });
    d.ack();
    assert_eq!(within(receipt).await, Ok(Outcome::Acked));
    // A receiver with the check off takes any typed sender's payload.
    let mut any = b
        .receiver_with::<u64>(
            ChannelId(8),
            ackwire::ReceiverOptions::unordered().type_check(false),
        )
        .unwrap();
    let out = a
        .sender::<u32>(B, ChannelOptions::new(ChannelId(8), Guarantee::AtLeastOnce))
        .unwrap();
    let receipt = out.send(&7).await.unwrap();
    let d = within(any.recv()).await.unwrap();
    assert_eq!(*d.message(), 7);
    d.ack();
    assert_eq!(within(receipt).await, Ok(Outcome::Acked));
}

#[tokio::test(start_paused = true)]
async fn an_undecodable_payload_is_rejected_not_acked() {
    let net = net();
    let (a, b) = pair(&net, NodeConfig::default()).await;
    let mut inbox = b.receiver::<u64>(CH, false).unwrap();
    let options = ChannelOptions {
        deadline: Some(Duration::from_secs(3)),
        ..opts(Guarantee::EffectivelyOnce)
    };
    let raw = a.raw_sender(B, options).unwrap();
    // 0xFF announces a u128 varint: three bytes cannot hold it.
    let receipt = raw.send(Bytes::from_static(&[0xFF, 1, 2])).await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(5), inbox.recv()).await;
    assert!(got.is_err(), "{got:?}");
    assert_eq!(
        receipt.await,
        Err(SendError::Rejected {
            reason: RejectReason::Undecodable
        })
    );
    assert!(b.stats().await.unwrap().decode_failed >= 1);
    let letter = b.dead_letters().try_recv().expect("a dead letter");
    assert_eq!(&letter.message[..], &[0xFF, 1, 2]);
    assert_eq!(letter.reason, DeadLetterReason::Undecodable);
    report(
        "misuse",
        "an undecodable payload (used to be acked and dropped: sender saw Ok(Acked))",
        "1",
        "dead-lettered, counted in decode_failed, warn logged; the sender's receipt fails Rejected(Undecodable)",
    );
}

#[tokio::test]
async fn a_sender_to_an_unknown_peer_is_a_typed_error() {
    let a = Node::builder(A)
        .bind(support::ports::restartable_addr())
        .build()
        .await
        .unwrap();
    for g in [
        Guarantee::AtMostOnce,
        Guarantee::AtLeastOnce,
        Guarantee::EffectivelyOnce,
    ] {
        match a.sender::<u64>(NodeId(99), opts(g)) {
            Err(NodeError::UnknownPeer(NodeId(99))) => {}
            other => panic!("{g:?}: expected UnknownPeer, got {other:?}"),
        }
    }
    assert!(matches!(
        a.raw_sender(NodeId(99), opts(Guarantee::AtMostOnce)),
        Err(NodeError::UnknownPeer(NodeId(99)))
    ));
    // Once added it is known, and watched at once as the docs of `Node::health` say:
    // `Some(Up)` before the node's driver has run (this is a current-thread runtime).
    // (Regression: `None` until the driver took the command.)
    a.add_peer(NodeId(99), "127.0.0.1:9".parse().unwrap());
    assert_eq!(a.health(NodeId(99)), Some(Health::Up));
    assert!(a
        .sender::<u64>(NodeId(99), opts(Guarantee::AtMostOnce))
        .is_ok());
    // Dynamic peers, when asked for, are accepted.
    let config = cfg(|c| c.allow_dynamic_peers = true);
    let c = Node::builder(NodeId(3))
        .bind(support::ports::restartable_addr())
        .config(config)
        .build()
        .await
        .unwrap();
    assert!(c
        .sender::<u64>(NodeId(98), opts(Guarantee::AtLeastOnce))
        .is_ok());
    report(
        "misuse",
        "a sender to a NodeId never configured (used to be accepted: Deadline after 30 s, AMO Ok(Sent))",
        "1",
        "sender() fails with NodeError::UnknownPeer for every guarantee unless allow_dynamic_peers",
    );
}

#[tokio::test(start_paused = true)]
async fn a_channel_without_receiver_is_counted_and_the_sender_is_told() {
    let net = net();
    let (a, b) = pair(&net, NodeConfig::default()).await;
    let options = ChannelOptions {
        deadline: Some(Duration::from_secs(2)),
        ..opts(Guarantee::AtLeastOnce)
    };
    // A deadline inside the grace period: the sender gives up first.
    let out = a.sender::<u64>(B, options).unwrap();
    let receipt = out.send(&1).await.unwrap();
    assert!(matches!(receipt.await, Err(SendError::Deadline { .. })));
    let stats = b.stats().await.unwrap();
    assert!(stats.no_receiver >= 1, "{stats:?}");
    // Default deadline (30 s): rejected once the grace period (5 s) has passed.
    let out = a
        .sender::<u64>(
            B,
            ChannelOptions::new(ChannelId(6), Guarantee::EffectivelyOnce),
        )
        .unwrap();
    let started = tokio::time::Instant::now();
    let receipt = out.send(&2).await.unwrap();
    assert_eq!(
        within(receipt).await,
        Err(SendError::Rejected {
            reason: RejectReason::NoReceiver
        })
    );
    let waited = started.elapsed();
    let grace = ProtoConfig::default().no_receiver_grace;
    assert!(
        waited >= grace && waited < grace + Duration::from_secs(3),
        "rejected after {waited:?}"
    );
    report(
        "misuse",
        "a channel with no receiver (used to retry silently, nothing logged)",
        "1",
        "counted in Stats::no_receiver and warned (rate-limited) on the receiver; the sender's receipt fails Rejected(NoReceiver) once the 5 s grace period has passed",
    );
}

async fn down(a: &Node, peer: NodeId) {
    let mut events = a.health_events();
    for _ in 0..60 {
        if a.health(peer) == Some(Health::Down) {
            return;
        }
        let _ = tokio::time::timeout(Duration::from_secs(1), events.recv()).await;
    }
    panic!("{peer} not Down after 60 s");
}

#[tokio::test(start_paused = true)]
async fn a_send_to_a_down_peer_without_handoff_fails_fast() {
    let events = Events::default();
    let _guard = tracing::subscriber::set_default(Recorder {
        panic_on: None,
        events: events.clone(),
    });
    let net = net();
    let (a, _b) = pair(&net, NodeConfig::default()).await;
    let out = a.sender::<u64>(B, opts(Guarantee::AtLeastOnce)).unwrap();
    let amo = a.sender::<u64>(B, opts(Guarantee::AtMostOnce)).unwrap();
    net.isolate(B);
    down(&a, B).await;
    let t = tokio::time::Instant::now();
    assert_eq!(
        out.send(&1).await.err(),
        Some(SendError::PeerDown { peer: B })
    );
    assert_eq!(
        out.try_send(&1).err(),
        Some(SendError::PeerDown { peer: B })
    );
    assert_eq!(
        amo.send(&1).await.err(),
        Some(SendError::PeerDown { peer: B })
    );
    assert_eq!(t.elapsed(), Duration::ZERO, "must fail at once");
    let downs: Vec<_> = events
        .lock()
        .unwrap()
        .iter()
        .filter(|(l, m)| {
            *l == tracing::Level::WARN && m.starts_with("peer is Down") && m.contains("peer=n2")
        })
        .cloned()
        .collect();
    assert_eq!(downs.len(), 1, "one warn per transition: {downs:?}");
    // Back Up: sends are taken again.
    net.rejoin(B);
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_ne!(a.health(B), Some(Health::Down));
    assert!(out.send(&2).await.is_ok());

    // Configurable: without fail-fast the send is taken (and fails at its deadline).
    let net = MemNetwork::new(FaultPlan::new(2)).unwrap();
    let config = cfg(|c| c.fail_fast_when_down = false);
    let (a, _b) = pair(&net, config).await;
    let options = ChannelOptions {
        deadline: Some(Duration::from_secs(1)),
        ..opts(Guarantee::AtLeastOnce)
    };
    let out = a.sender::<u64>(B, options).unwrap();
    net.isolate(B);
    down(&a, B).await;
    let receipt = out.send(&1).await.unwrap();
    assert!(matches!(receipt.await, Err(SendError::Deadline { .. })));
    report(
        "misuse",
        "a send to a peer the detector holds Down, handoff off (used to wait the full deadline)",
        "1",
        "fails at once with SendError::PeerDown (every guarantee), one warn per transition; configurable; Up again accepts sends",
    );
}

/// Hinted handoff with the default key horizon (2 min) against the default hint TTL
/// (6 h): a keyed effectively-once message replayed from a hint after the horizon is
/// taken for a new one by its receiver. The node says so once at build (warn, naming
/// both durations); with a horizon that covers the deadline plus the TTL it does not.
#[tokio::test(start_paused = true)]
async fn handoff_with_a_key_horizon_shorter_than_the_hint_ttl_warns_at_build() {
    for (horizon, warns) in [(None, true), (Some(Duration::from_secs(7 * 3600)), false)] {
        let events = Events::default();
        let _guard = tracing::subscriber::set_default(Recorder {
            panic_on: None,
            events: events.clone(),
        });
        let dir = tempfile::tempdir().unwrap();
        let config = cfg(|c| {
            c.handoff = Some(ackwire::HandoffConfig::new(dir.path()));
            if let Some(h) = horizon {
                c.dedup.horizon = h;
            }
        });
        let a = node(&net(), A, config).await.unwrap();
        let warned = events
            .lock()
            .unwrap()
            .iter()
            .filter(|(l, m)| *l == tracing::Level::WARN && m.contains("dedup.horizon is shorter"))
            .count();
        assert_eq!(warned, usize::from(warns), "horizon {horizon:?}");
        a.shutdown().await;
    }
}

/// A subscriber that records events (level, message and fields) and, if asked, panics
/// when one starts with a chosen message: a controlled panic inside the driver with no
/// test hook in the library.
struct Recorder {
    panic_on: Option<&'static str>,
    events: Events,
}

type Events = Arc<Mutex<Vec<(tracing::Level, String)>>>;

struct Message(String);

impl tracing::field::Visit for Message {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            self.0 = format!("{value:?}");
        } else {
            self.0.push_str(&format!(" {}={value:?}", field.name()));
        }
    }
}

impl tracing::Subscriber for Recorder {
    fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
        true
    }
    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(1)
    }
    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, event: &tracing::Event<'_>) {
        let mut m = Message(String::new());
        event.record(&mut m);
        self.events
            .lock()
            .unwrap()
            .push((*event.metadata().level(), m.0.clone()));
        if let Some(p) = self.panic_on.filter(|p| m.0.starts_with(p)) {
            panic!("provoked: {p}");
        }
    }
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}

#[tokio::test(start_paused = true)]
async fn a_dead_driver_fails_every_call_with_the_cause() {
    let events = Events::default();
    let _guard = tracing::subscriber::set_default(Recorder {
        panic_on: Some("peer decommissioned"),
        events: events.clone(),
    });
    let net = net();
    let (a, b) = pair(&net, NodeConfig::default()).await;
    let mut inbox = b.receiver::<u64>(CH, false).unwrap();
    let out = a.sender::<u64>(B, opts(Guarantee::AtLeastOnce)).unwrap();
    // Pending: delivered but not acked yet when the driver dies.
    let pending = out.send(&1).await.unwrap();
    let _held = within(inbox.recv()).await.unwrap();
    let closed = {
        let a = &a;
        async move { a.closed().await }
    };
    // The driver logs "peer decommissioned" at info: the subscriber panics there.
    let decommission = a.decommission(NodeId(77)).await;
    let failure = match decommission {
        Err(NodeError::Failed(f)) => f,
        other => panic!("expected NodeError::Failed, got {other:?}"),
    };
    assert!(failure.cause().contains("provoked"), "{failure}");
    match pending.await {
        Err(SendError::NodeFailed(f)) => assert_eq!(f, failure),
        other => panic!("pending receipt: expected NodeFailed, got {other:?}"),
    }
    match closed.await {
        Err(NodeError::Failed(f)) => assert_eq!(f, failure),
        other => panic!("closed(): expected Failed, got {other:?}"),
    }
    // Every later call fails the same way.
    assert_eq!(
        out.send(&2).await.err(),
        Some(SendError::NodeFailed(failure.clone()))
    );
    assert!(matches!(a.stats().await, Err(NodeError::Failed(_))));
    assert!(matches!(
        a.sender::<u64>(B, opts(Guarantee::AtLeastOnce)),
        Err(NodeError::Failed(_))
    ));
    assert!(matches!(
        a.receiver::<u64>(ChannelId(8), false),
        Err(NodeError::Failed(_))
    ));
    let logged = events.lock().unwrap().clone();
    assert!(
        logged
            .iter()
            .any(|(level, e)| *level == tracing::Level::ERROR
                && e.contains("node driver panicked")
                && e.contains("provoked")),
        "{logged:?}"
    );
    report(
        "misuse",
        "the node's driver task panics (used to leave a dead node: receipts said Shutdown, nothing logged)",
        "1",
        "logged at error; pending receipt, later sends and calls fail NodeFailed/Failed with the cause; closed() resolves with it",
    );
}

// ---------------------------------------------------------------------------------------
// Property: no configuration panics
// ---------------------------------------------------------------------------------------

use ackwire::handoff::FsyncPolicy;
use ackwire::HandoffConfig;
use proptest::prelude::*;
use proptest::strategy::Union;
use proptest::test_runner::{Config as RunnerConfig, TestCaseError, TestRunner};

/// One configuration value set to something arbitrary.
#[derive(Clone, Debug)]
enum Knob {
    MaxInFlight(usize),
    AckDelay(Duration),
    MaxAckRanges(usize),
    MaxReorderBuffer(usize),
    MaxStreamsPerPeer(usize),
    AmoReorderSlack(u64),
    MaxAttempts(Option<u32>),
    RetryDeadline(Option<Duration>),
    BackoffCap(Duration),
    Jitter(bool),
    InitialRto(Duration),
    MinRto(Duration),
    MaxRto(Duration),
    Granularity(Duration),
    BudgetTtl(Duration),
    BudgetMinRetries(u32),
    BudgetRatio(f64),
    DedupWindow(u32),
    DedupMaxStreams(usize),
    DedupTableCapacity(usize),
    DedupHorizon(Duration),
    MaxPayload(usize),
    StreamCredit(u64),
    NodeCredit(u64),
    NoReceiverGrace(Duration),
    DeadLetterCapacity(usize),
    Threshold(f64),
    SuspectThreshold(f64),
    MaxSamples(usize),
    MinStdDev(Duration),
    HeartbeatPause(Duration),
    FirstHeartbeat(Duration),
    HeartbeatInterval(Duration),
    ShutdownDrain(Duration),
    DynamicPeers(bool),
    FailFastDown(bool),
    Handoff,
    HintTtl(Duration),
    HintWindow(Duration),
    HintFsync(Duration),
    ReplayRate(u64),
    ReplayConcurrency(usize),
    ReplayBatch(u64),
}

impl Knob {
    fn apply(&self, c: &mut NodeConfig, dir: &std::path::Path) {
        let p = &mut c.proto;
        fn hinted<'a>(c: &'a mut NodeConfig, dir: &std::path::Path) -> &'a mut HandoffConfig {
            c.handoff.get_or_insert_with(|| HandoffConfig::new(dir))
        }
        let h = |c| hinted(c, dir);
        match *self {
            Knob::MaxInFlight(v) => p.max_in_flight = v,
            Knob::AckDelay(v) => p.ack_delay = v,
            Knob::MaxAckRanges(v) => p.max_ack_ranges = v,
            Knob::MaxReorderBuffer(v) => p.max_reorder_buffer = v,
            Knob::MaxStreamsPerPeer(v) => p.max_streams_per_peer = v,
            Knob::AmoReorderSlack(v) => p.amo_reorder_slack = v,
            Knob::MaxAttempts(v) => p.retry.max_attempts = v,
            Knob::RetryDeadline(v) => p.retry.deadline = v,
            Knob::BackoffCap(v) => p.retry.backoff_cap = v,
            Knob::Jitter(v) => p.retry.jitter = v,
            Knob::InitialRto(v) => p.rtt.initial_rto = v,
            Knob::MinRto(v) => p.rtt.min_rto = v,
            Knob::MaxRto(v) => p.rtt.max_rto = v,
            Knob::Granularity(v) => p.rtt.granularity = v,
            Knob::BudgetTtl(v) => p.retry_budget.ttl = v,
            Knob::BudgetMinRetries(v) => p.retry_budget.min_retries_per_sec = v,
            Knob::BudgetRatio(v) => p.retry_budget.retry_ratio = v,
            Knob::DedupWindow(v) => c.dedup.window = v,
            Knob::DedupMaxStreams(v) => c.dedup.max_streams = v,
            Knob::DedupTableCapacity(v) => c.dedup.table_capacity = v,
            Knob::DedupHorizon(v) => c.dedup.horizon = v,
            Knob::MaxPayload(v) => c.max_payload = v,
            Knob::StreamCredit(v) => c.proto.stream_credit = v,
            Knob::NodeCredit(v) => c.proto.node_credit = v,
            Knob::NoReceiverGrace(v) => c.proto.no_receiver_grace = v,
            Knob::DeadLetterCapacity(v) => c.dead_letter_capacity = v,
            Knob::Threshold(v) => c.detector.threshold = v,
            Knob::SuspectThreshold(v) => c.detector.suspect_threshold = v,
            Knob::MaxSamples(v) => c.detector.max_samples = v,
            Knob::MinStdDev(v) => c.detector.min_std_dev = v,
            Knob::HeartbeatPause(v) => c.detector.acceptable_heartbeat_pause = v,
            Knob::FirstHeartbeat(v) => c.detector.first_heartbeat_estimate = v,
            Knob::HeartbeatInterval(v) => c.heartbeat_interval = v,
            Knob::ShutdownDrain(v) => c.shutdown_drain = v,
            Knob::DynamicPeers(v) => c.allow_dynamic_peers = v,
            Knob::FailFastDown(v) => c.fail_fast_when_down = v,
            Knob::Handoff => {
                h(c);
            }
            Knob::HintTtl(v) => h(c).store.default_ttl = v,
            Knob::HintWindow(v) => h(c).store.max_hint_window = v,
            Knob::HintFsync(v) => h(c).store.fsync = FsyncPolicy::Every(v),
            Knob::ReplayRate(v) => h(c).replay_bytes_per_sec = v,
            Knob::ReplayConcurrency(v) => h(c).replay_concurrency = v,
            Knob::ReplayBatch(v) => h(c).replay_batch_bytes = v,
        }
    }
}

/// 0, 1 ns, typical values, `Duration::MAX`, and anything in between.
fn any_duration() -> BoxedStrategy<Duration> {
    prop_oneof![
        Just(Duration::ZERO),
        Just(Duration::from_nanos(1)),
        Just(Duration::from_millis(1)),
        Just(Duration::from_secs(1)),
        Just(Duration::from_secs(3600)),
        Just(Duration::MAX),
        (0u64..10_000_000_000).prop_map(Duration::from_nanos),
        any::<u64>().prop_map(Duration::from_nanos),
        (any::<u64>(), 0u32..1_000_000_000).prop_map(|(s, n)| Duration::new(s, n)),
    ]
    .boxed()
}

/// 0, 1, `MAX`, small and arbitrary values. Values that are valid but allocate in
/// proportion (dedup table and stream registry) are drawn up to `2^16` in between.
fn any_usize() -> BoxedStrategy<usize> {
    prop_oneof![
        Just(0usize),
        Just(1),
        Just(usize::MAX),
        0usize..100_000,
        any::<usize>(),
    ]
    .boxed()
}

fn any_u64() -> BoxedStrategy<u64> {
    prop_oneof![
        Just(0u64),
        Just(1),
        Just(u64::MAX),
        0u64..100_000,
        any::<u64>()
    ]
    .boxed()
}

fn any_f64() -> BoxedStrategy<f64> {
    prop_oneof![
        Just(0.0),
        Just(-1.0),
        Just(f64::NAN),
        Just(f64::INFINITY),
        Just(f64::MIN_POSITIVE),
        Just(1000.5),
        0.0f64..1000.0,
    ]
    .boxed()
}

fn knob() -> impl Strategy<Value = Knob> {
    let d = any_duration;
    let od = || proptest::option::of(any_duration());
    let memory = || prop_oneof![Just(0usize), Just(usize::MAX), 1usize..=65_536];
    Union::new(vec![
        any_usize().prop_map(Knob::MaxInFlight).boxed(),
        d().prop_map(Knob::AckDelay).boxed(),
        any_usize().prop_map(Knob::MaxAckRanges).boxed(),
        any_usize().prop_map(Knob::MaxReorderBuffer).boxed(),
        any_usize().prop_map(Knob::MaxStreamsPerPeer).boxed(),
        any_u64().prop_map(Knob::AmoReorderSlack).boxed(),
        proptest::option::of(prop_oneof![
            Just(0u32),
            Just(1),
            Just(u32::MAX),
            any::<u32>()
        ])
        .prop_map(Knob::MaxAttempts)
        .boxed(),
        od().prop_map(Knob::RetryDeadline).boxed(),
        d().prop_map(Knob::BackoffCap).boxed(),
        any::<bool>().prop_map(Knob::Jitter).boxed(),
        d().prop_map(Knob::InitialRto).boxed(),
        d().prop_map(Knob::MinRto).boxed(),
        d().prop_map(Knob::MaxRto).boxed(),
        d().prop_map(Knob::Granularity).boxed(),
        d().prop_map(Knob::BudgetTtl).boxed(),
        any::<u32>().prop_map(Knob::BudgetMinRetries).boxed(),
        any_f64().prop_map(Knob::BudgetRatio).boxed(),
        prop_oneof![
            Just(0u32),
            Just(1),
            Just(64),
            Just(1 << 24),
            Just((1 << 24) + 1),
            Just(u32::MAX),
            1u32..=(1 << 20),
        ]
        .prop_map(Knob::DedupWindow)
        .boxed(),
        memory().prop_map(Knob::DedupMaxStreams).boxed(),
        memory().prop_map(Knob::DedupTableCapacity).boxed(),
        d().prop_map(Knob::DedupHorizon).boxed(),
        any_usize().prop_map(Knob::MaxPayload).boxed(),
        any::<u64>().prop_map(Knob::StreamCredit).boxed(),
        any::<u64>().prop_map(Knob::NodeCredit).boxed(),
        d().prop_map(Knob::NoReceiverGrace).boxed(),
        any_usize().prop_map(Knob::DeadLetterCapacity).boxed(),
        any_f64().prop_map(Knob::Threshold).boxed(),
        any_f64().prop_map(Knob::SuspectThreshold).boxed(),
        any_usize().prop_map(Knob::MaxSamples).boxed(),
        d().prop_map(Knob::MinStdDev).boxed(),
        d().prop_map(Knob::HeartbeatPause).boxed(),
        d().prop_map(Knob::FirstHeartbeat).boxed(),
        d().prop_map(Knob::HeartbeatInterval).boxed(),
        d().prop_map(Knob::ShutdownDrain).boxed(),
        any::<bool>().prop_map(Knob::DynamicPeers).boxed(),
        any::<bool>().prop_map(Knob::FailFastDown).boxed(),
        Just(Knob::Handoff).boxed(),
        d().prop_map(Knob::HintTtl).boxed(),
        d().prop_map(Knob::HintWindow).boxed(),
        d().prop_map(Knob::HintFsync).boxed(),
        any_u64().prop_map(Knob::ReplayRate).boxed(),
        any_usize().prop_map(Knob::ReplayConcurrency).boxed(),
        any_u64().prop_map(Knob::ReplayBatch).boxed(),
    ])
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    /// A typed configuration error at build or sender().
    Rejected,
    /// A node that round-tripped a message.
    Worked,
}

/// Build two nodes with `config` on a fault-free mem network, send one message with
/// `deadline` and ack it, shut both down: a typed error, or a delivery with a typed
/// receipt and a clean stop. Any panic (build, handles, or a driver: `closed()` would
/// report it) or hang (virtual-time bounds) fails the case.
async fn config_case(
    config: NodeConfig,
    deadline: Option<Duration>,
    g: Guarantee,
) -> Result<Verdict, TestCaseError> {
    let valid = config.validate();
    let net = net();
    let a = match (node(&net, A, config.clone()).await, &valid) {
        (Err(NodeError::Config(e)), Err(v)) => {
            prop_assert_eq!(e.to_string(), v.to_string());
            prop_assert!(e.to_string().contains(e.field()), "{}", e);
            return Ok(Verdict::Rejected);
        }
        (Ok(a), Ok(())) => a,
        (r, v) => {
            return Err(TestCaseError::fail(format!(
                "build {r:?} vs validate {v:?}"
            )))
        }
    };
    // B gets directories of its own: one durable directory serves one live node.
    let mut config = config;
    if let Some(h) = &mut config.handoff {
        h.store.dir = h.store.dir.join("b");
    }
    if let Some(d) = &mut config.dedup.durable {
        d.dir = d.dir.join("b");
    }
    if let Some(dl) = &mut config.dead_letter_dir {
        *dl = dl.join("b");
    }
    let b = node(&net, B, config)
        .await
        .map_err(|e| TestCaseError::fail(e.to_string()))?;
    let options = ChannelOptions {
        deadline,
        ..opts(g)
    };
    let out = match a.sender::<u64>(B, options) {
        Ok(s) => s,
        Err(NodeError::Config(ConfigError::DurationTooShort {
            field: "deadline", ..
        })) if deadline == Some(Duration::ZERO) => {
            return Ok(Verdict::Rejected);
        }
        Err(e) => return Err(TestCaseError::fail(format!("sender: {e}"))),
    };
    let mut inbox = b
        .receiver::<u64>(CH, false)
        .map_err(|e| TestCaseError::fail(e.to_string()))?;
    let verdict = match out.send(&42).await {
        // A detector config with a near-zero threshold holds every peer Down.
        Err(SendError::PeerDown { .. }) => Verdict::Rejected,
        Err(e) => return Err(TestCaseError::fail(format!("send: {e}"))),
        Ok(receipt) => {
            let d = tokio::time::timeout(Duration::from_secs(60), inbox.recv())
                .await
                .map_err(|_| TestCaseError::fail("not delivered within 60 s"))?
                .ok_or_else(|| TestCaseError::fail("receiver closed"))?;
            prop_assert_eq!(*d.message(), 42);
            d.ack();
            let r = tokio::time::timeout(Duration::from_secs(120), receipt)
                .await
                .map_err(|_| TestCaseError::fail("receipt unresolved after 120 s"))?;
            match r {
                Ok(_) | Err(SendError::Deadline { .. } | SendError::AttemptsExhausted { .. }) => {}
                Err(e) => return Err(TestCaseError::fail(format!("receipt: {e}"))),
            }
            Verdict::Worked
        }
    };
    for n in [&a, &b] {
        tokio::time::timeout(Duration::from_secs(300), n.shutdown())
            .await
            .map_err(|_| TestCaseError::fail("shutdown hung"))?;
        if let Err(e) = n.closed().await {
            return Err(TestCaseError::fail(format!("driver died: {e}")));
        }
    }
    Ok(verdict)
}

/// Arbitrary configuration values (0, MAX and everything between, a few at a time on
/// top of the defaults) give a typed error or a working node — never a panic or hang.
#[test]
fn no_configuration_panics_the_library() {
    let cases: u32 = std::env::var("MISUSE_CONFIG_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(96);
    let strategy = (
        prop::collection::vec(knob(), 0..5),
        proptest::option::of(any_duration()),
        prop_oneof![
            Just(Guarantee::AtMostOnce),
            Just(Guarantee::AtLeastOnce),
            Just(Guarantee::EffectivelyOnce)
        ],
    );
    let mut runner = TestRunner::new(RunnerConfig {
        cases,
        failure_persistence: None,
        max_shrink_time: 30_000,
        ..RunnerConfig::default()
    });
    let counts = Mutex::new((0u32, 0u32));
    runner
        .run(&strategy, |(knobs, deadline, g)| {
            let dir = tempfile::tempdir().unwrap();
            let mut config = NodeConfig::default();
            for k in &knobs {
                k.apply(&mut config, dir.path());
            }
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .start_paused(true)
                .build()
                .unwrap();
            let verdict = rt.block_on(config_case(config, deadline, g))?;
            let mut c = counts.lock().unwrap();
            match verdict {
                Verdict::Rejected => c.0 += 1,
                Verdict::Worked => c.1 += 1,
            }
            Ok(())
        })
        .unwrap();
    let (rejected, worked) = *counts.lock().unwrap();
    // Not vacuous: both outcomes are exercised (shrinking runs add to both counts).
    assert!(worked >= cases / 5, "only {worked} working nodes");
    assert!(rejected >= cases / 10, "only {rejected} typed errors");
    report(
        "misuse",
        "arbitrary config values (0, MAX, in between; 40 fields incl. handoff) and ChannelOptions.deadline",
        &format!("{cases} cases"),
        &format!("typed ConfigError ({rejected}) or a node that round-trips a message and stops cleanly ({worked}); never a panic or hang"),
    );
}

#[tokio::test]
async fn connection_failures_to_a_configured_peer_are_warned_rate_limited() {
    let events = Events::default();
    let _guard = tracing::subscriber::set_default(Recorder {
        panic_on: None,
        events: events.clone(),
    });
    // A port nobody listens on: every dial is refused at once.
    let dead = support::ports::restartable_addr();
    let a = Node::builder(A)
        .bind(support::ports::restartable_addr())
        .peer(B, dead)
        .build()
        .await
        .unwrap();
    // Sends make the transport dial (and redial with backoff: 50 ms, 100 ms, ...).
    let out = a.sender::<u64>(B, opts(Guarantee::AtMostOnce)).unwrap();
    let _ = out.send(&1).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let _ = out.send(&2).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let logged = events.lock().unwrap().clone();
    let debug_failures = logged
        .iter()
        .filter(|(l, m)| *l == tracing::Level::DEBUG && m.starts_with("tcp: connect failed"))
        .count();
    let warns = logged
        .iter()
        .filter(|(l, m)| *l == tracing::Level::WARN && m.starts_with("tcp: cannot connect"))
        .count();
    assert_eq!(warns, 1, "{logged:#?}");
    assert!(debug_failures >= 2, "{logged:#?}");
    a.shutdown().await;
    report(
        "misuse",
        "a configured peer that cannot be reached (dial failures used to be logged at debug only)",
        "1",
        "warned once with the attempt count, then at most every 30 s per peer; later failures at debug",
    );
}

/// Arbitrary TCP settings with arbitrary `max_payload`: a typed error, or two nodes
/// that build, take a send and stop cleanly (real sockets, so no delivery is required
/// of settings such as a 1 ms connect timeout; the mem property above checks delivery).
#[test]
fn no_tcp_configuration_panics_the_library() {
    let cases: u32 = std::env::var("MISUSE_CONFIG_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .map_or(32, |n: u32| n / 3);
    // Each value is the default 3 times in 4, so valid combinations are common.
    fn mostly<T: Clone + std::fmt::Debug + 'static>(
        default: T,
        s: impl Strategy<Value = T> + 'static,
    ) -> BoxedStrategy<T> {
        prop_oneof![3 => Just(default), 1 => s].boxed()
    }
    let t = TcpConfig::default();
    let d = |v| mostly(v, any_duration());
    let u = |v| mostly(v, any_usize());
    let frame = prop_oneof![
        Just(0usize),
        Just(255),
        Just(256),
        Just(64 << 10),
        Just(8 << 20),
        Just(u32::MAX as usize),
        Just(u32::MAX as usize + 1),
        Just(usize::MAX),
        any::<usize>(),
    ];
    let strategy = (
        (
            d(t.connect_timeout),
            d(t.handshake_timeout),
            d(t.backoff_min),
            d(t.backoff_max),
        ),
        (
            mostly(t.max_frame_len, frame),
            u(t.queue_bound),
            u(t.write_batch_bytes),
            u(t.channel_capacity),
        ),
        mostly(
            NodeConfig::default().max_payload,
            prop_oneof![Just(0usize), Just(1), Just(usize::MAX), 0usize..(16 << 20)],
        ),
    );
    let mut runner = TestRunner::new(RunnerConfig {
        cases,
        failure_persistence: None,
        max_shrink_time: 30_000,
        ..RunnerConfig::default()
    });
    let counts = Mutex::new((0u32, 0u32));
    runner
        .run(
            &strategy,
            |((ct, ht, bmin, bmax), (mfl, qb, wb, cc), mp)| {
                // `..default()`: TcpConfig is growing fields (TLS).
                #[allow(clippy::needless_update)]
                let tcp = TcpConfig {
                    connect_timeout: ct,
                    handshake_timeout: ht,
                    backoff_min: bmin,
                    backoff_max: bmax,
                    max_frame_len: mfl,
                    queue_bound: qb,
                    write_batch_bytes: wb,
                    channel_capacity: cc,
                    ..TcpConfig::default()
                };
                let config = cfg(|c| c.max_payload = mp);
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                let worked = rt.block_on(async {
                    let b = match Node::builder(B)
                        .tcp(support::ports::restartable_addr(), tcp.clone())
                        .config(config.clone())
                        .build()
                        .await
                    {
                        Err(NodeError::Config(e)) => {
                            prop_assert!(e.to_string().contains(e.field()), "{}", e);
                            return Ok(false);
                        }
                        Err(e) => return Err(TestCaseError::fail(format!("build: {e}"))),
                        Ok(b) => b,
                    };
                    let a = Node::builder(A)
                        .tcp(support::ports::restartable_addr(), tcp)
                        .peer(B, b.local_addr().unwrap())
                        .config(config)
                        .build()
                        .await
                        .map_err(|e| TestCaseError::fail(format!("second build: {e}")))?;
                    let out = a
                        .raw_sender(B, opts(Guarantee::AtMostOnce))
                        .map_err(|e| TestCaseError::fail(e.to_string()))?;
                    let len = mp.min(1 << 16);
                    match out.send(Bytes::from(vec![1u8; len])).await {
                        Ok(r) => {
                            let _ = tokio::time::timeout(Duration::from_secs(5), r).await;
                        }
                        Err(e) => return Err(TestCaseError::fail(format!("send: {e}"))),
                    }
                    for n in [&a, &b] {
                        tokio::time::timeout(Duration::from_secs(30), n.shutdown())
                            .await
                            .map_err(|_| TestCaseError::fail("shutdown hung"))?;
                        if let Err(e) = n.closed().await {
                            return Err(TestCaseError::fail(format!("driver died: {e}")));
                        }
                    }
                    Ok(true)
                })?;
                let mut c = counts.lock().unwrap();
                if worked {
                    c.1 += 1
                } else {
                    c.0 += 1
                }
                Ok(())
            },
        )
        .unwrap();
    let (rejected, worked) = *counts.lock().unwrap();
    assert!(
        worked >= 1 && rejected >= 1,
        "{worked} worked, {rejected} rejected"
    );
    report(
        "misuse",
        "arbitrary TcpConfig values (timeouts, backoff, frame limit, queues) and max_payload",
        &format!("{cases} cases"),
        &format!("typed ConfigError ({rejected}) or nodes that build, send and stop cleanly ({worked}); never a panic"),
    );
}

/// The same application key sent twice back to back: the second copy arrives while the
/// first is still in the handler. It is neither delivered nor left for a retransmission
/// timer: both receipts resolve together, right after the handler's one ack.
#[tokio::test(start_paused = true)]
async fn duplicate_key_while_the_original_is_processing_resolves_with_it() {
    let net = net();
    let (a, b) = pair(&net, NodeConfig::default()).await;
    let mut inbox = b.raw_receiver(CH, false).unwrap();
    let out = a.raw_sender(B, opts(Guarantee::EffectivelyOnce)).unwrap();
    let key = ackwire::IdKey(42);
    let first = out
        .send_with_key(Bytes::from_static(b"x"), key)
        .await
        .unwrap();
    let second = out
        .send_with_key(Bytes::from_static(b"x"), key)
        .await
        .unwrap();
    let d = tokio::time::timeout(Duration::from_secs(5), inbox.recv())
        .await
        .unwrap()
        .unwrap();
    // The duplicate has arrived and is waiting while the handler holds the original.
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(b.stats().await.unwrap().proto.in_progress_dropped, 1);
    let acked_at = tokio::time::Instant::now();
    d.ack();
    assert_eq!(first.await, Ok(Outcome::Acked));
    assert_eq!(second.await, Ok(Outcome::Acked));
    let took = acked_at.elapsed();
    assert!(
        took < Duration::from_millis(5),
        "second receipt took {took:?}"
    );
    // Processed once: nothing else is ever delivered.
    assert!(
        tokio::time::timeout(Duration::from_secs(2), inbox.recv())
            .await
            .is_err(),
        "the duplicate was delivered"
    );
    report(
        "misuse",
        "same application key sent twice back to back (second took ~186 ms before)",
        "1",
        "both receipts Acked within 5 ms of the one ack; processed once",
    );
}

/// Two live nodes on one durable directory (a deploy that starts the new process
/// before the old one exits, two nodes given one path) would each compact the log
/// from its own state and drop the other's records: effectively-once messages acked
/// by one would be processed again. The second is refused with a typed error naming
/// the directory; a node that shut down, or was just dropped, frees it at once.
/// (Regression: both built, and after a compaction 1 000 of 2 000 acked keys were
/// processed a second time.)
#[tokio::test]
async fn a_durable_directory_serves_one_live_node_at_a_time() {
    let dir = tempfile::tempdir().unwrap();
    let durable = cfg(|c| {
        c.dedup.durable = Some(ackwire::dedup::DurableDedup::new(dir.path().join("dedup")));
        c.handoff = Some(ackwire::HandoffConfig::new(dir.path().join("hints")));
    });
    let net = net();
    let first = node(&net, A, durable.clone()).await.unwrap();
    let dedup_only = cfg(|c| c.dedup.durable = durable.dedup.durable.clone());
    // (Node B is refused before it reaches the lock: the directory records A as its
    // owner; see `a_store_directory_of_another_node_id_is_a_typed_error`.)
    match node(&net, B, dedup_only).await {
        Err(NodeError::Dedup(ackwire::dedup::DedupError::InUse { dir: d }))
        | Err(NodeError::DirectoryOfAnotherNode {
            dir: d, owner: A, ..
        }) => {
            assert_eq!(d, dir.path().join("dedup"))
        }
        other => panic!(
            "a second node on the dedup directory: {:?}",
            other.map(|n| n.id())
        ),
    }
    let hints_only = cfg(|c| c.handoff = durable.handoff.clone());
    match node(&net, B, hints_only).await {
        Err(NodeError::Handoff(ackwire::handoff::HintError::InUse { .. }))
        | Err(NodeError::DirectoryOfAnotherNode { owner: A, .. }) => {}
        other => panic!(
            "a second node on the hint directory: {:?}",
            other.map(|n| n.id())
        ),
    }
    first.shutdown().await;
    let second = within(node(&net, A, durable.clone()))
        .await
        .expect("free after shutdown");
    drop(second); // dropped, not shut down: its task releases the directories as it ends
    let third = within(node(&net, A, durable))
        .await
        .expect("free after a drop");
    third.shutdown().await;
    report(
        "misuse",
        "two live nodes on one durable dedup or hint directory",
        "1 run",
        "the second refused with InUse naming the directory; free again after shutdown and after drop",
    );
}

/// The dead-letter log and the hint store on one directory would both open
/// `<dir>/hints`: refused when the config is checked, naming the field, instead of a
/// build that waits for a directory "in use by another live node".
#[tokio::test]
async fn dead_letters_in_the_hint_directory_are_a_config_error() {
    let dir = tempfile::tempdir().unwrap();
    let c = cfg(|c| {
        c.handoff = Some(ackwire::HandoffConfig::new(dir.path()));
        c.dead_letter_dir = Some(dir.path().to_path_buf());
    });
    let e = config_err(node(&net(), A, c).await);
    assert_eq!(e.field(), "dead_letter_dir", "{e}");
    report(
        "misuse",
        "dead-letter directory equal to the hint directory",
        "1 run",
        "ConfigError naming dead_letter_dir",
    );
}
