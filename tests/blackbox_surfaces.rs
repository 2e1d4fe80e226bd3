//! Black-box probes of the secondary public surfaces (config files, postcard codec,
//! dead-letter queue bounds, tower service, sink) against real TCP with defaults.
//! Every await that could hang is under a timeout.

#[path = "support/ports.rs"]
mod ports;

use ackwire::codec::Postcard;
use ackwire::{
    ChannelId, ChannelOptions, DeadLetterReason, Guarantee, Node, NodeConfig, NodeId, Outcome,
    ReceiverOptions, RejectReason, SendError,
};
use bytes::Bytes;
use std::net::SocketAddr;
use std::time::Duration;

fn any_addr() -> SocketAddr {
    ports::restartable_addr()
}

async fn within<F: std::future::Future>(secs: u64, what: &str, f: F) -> F::Output {
    match tokio::time::timeout(Duration::from_secs(secs), f).await {
        Ok(v) => v,
        Err(_) => panic!("{what}: did not finish within {secs} s (hang)"),
    }
}

async fn pair_with(a_id: u64, b_id: u64, b_cfg: NodeConfig) -> (Node, Node) {
    let b = within(
        10,
        "receiver build",
        Node::builder(NodeId(b_id))
            .bind(any_addr())
            .allow_peer(NodeId(a_id))
            .config(b_cfg)
            .build(),
    )
    .await
    .expect("receiver builds");
    let a = within(
        10,
        "sender build",
        Node::builder(NodeId(a_id))
            .bind(any_addr())
            .peer(NodeId(b_id), b.local_addr().unwrap())
            .build(),
    )
    .await
    .expect("sender builds");
    (a, b)
}

async fn pair(a_id: u64, b_id: u64) -> (Node, Node) {
    pair_with(a_id, b_id, NodeConfig::default()).await
}

fn opts(ch: u32, g: Guarantee) -> ChannelOptions {
    ChannelOptions::new(ChannelId(ch), g)
}

// ------------------------------------------------------------------ config files

/// The module doc of the duration grammar: a value that does not fit is an error
/// ("too large"), never a panic or a silently wrapped value. A number just below the
/// u128-nanosecond limit with a fractional part overflowed in `scale_number`.
#[test]
fn a_huge_fractional_duration_in_a_config_file_is_an_error_not_a_panic() {
    for text in [
        "340282366920938463463374607431.9s",
        "3938453320844195178974243.99999d",
        "94522879700260684295381835.9h",
    ] {
        let toml = format!("heartbeat_interval = \"{text}\"\n");
        let r = std::panic::catch_unwind(|| toml::from_str::<NodeConfig>(&toml));
        match r {
            Err(_) => panic!("parsing {text:?} panicked"),
            Ok(Ok(c)) => panic!("{text:?} parsed as {:?}", c.heartbeat_interval),
            Ok(Err(e)) => {
                let msg = e.to_string();
                assert!(
                    msg.contains("heartbeat_interval") || msg.contains("too large"),
                    "error does not say what is wrong: {msg}"
                );
            }
        }
    }
}

/// Bad values and zero sizes in a file: typed errors naming the key, never a panic,
/// either when read or when a node is built from them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zero_and_bad_values_in_a_config_file_are_typed_errors_naming_the_key() {
    for (text, key) in [
        ("max_payload = 0\n", "max_payload"),
        ("[proto]\nmax_in_flight = 0\n", "max_in_flight"),
        ("heartbeat_interval = \"0\"\n", "heartbeat_interval"),
        ("[dedup]\nwindow = 0\n", "window"),
        (
            "dead_letter_capacity = 99999999999\n",
            "dead_letter_capacity",
        ),
    ] {
        let cfg: NodeConfig = match toml::from_str(text) {
            Ok(c) => c,
            Err(e) => {
                assert!(e.to_string().contains(key), "{text:?}: {e}");
                continue;
            }
        };
        let err = cfg.validate().expect_err(text);
        assert!(err.to_string().contains(key), "{text:?}: {err}");
        let built = within(
            10,
            "build",
            Node::builder(NodeId(1))
                .bind(any_addr())
                .config(cfg)
                .build(),
        )
        .await;
        let e = built.expect_err(text);
        assert!(e.to_string().contains(key), "{text:?}: {e}");
    }
    let e = toml::from_str::<NodeConfig>("max_paylod = 5\n").unwrap_err();
    assert!(e.to_string().contains("max_paylod"), "{e}");
}

// ------------------------------------------------------------------ postcard codec

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postcard_channel_delivers_and_a_bincode_peer_is_refused_as_another_type() {
    let (a, b) = pair(1, 2).await;
    let mut rx = b
        .receiver_with_codec::<String, _>(ChannelId(5), ReceiverOptions::default(), Postcard)
        .unwrap();
    let tx = a
        .sender_with_codec::<String, _>(NodeId(2), opts(5, Guarantee::EffectivelyOnce), Postcard)
        .unwrap();
    let r = tx.send(&"hello".to_string()).await.unwrap();
    let d = within(10, "postcard recv", rx.recv()).await.unwrap();
    assert_eq!(d.message(), "hello");
    d.ack();
    assert_eq!(within(10, "receipt", r).await.unwrap(), Outcome::Acked);

    // The same type with the default codec: another fingerprint, refused.
    let wrong = a
        .sender::<String>(NodeId(2), opts(5, Guarantee::EffectivelyOnce))
        .unwrap();
    let r = wrong.send(&"bincode".to_string()).await.unwrap();
    let rr = within(40, "mismatch receipt", async {
        tokio::select! {
            r = r => r,
            d = rx.recv() => panic!("a bincode message reached a postcard receiver: {:?}", d.map(|d| d.message().clone())),
        }
    })
    .await;
    assert!(
        matches!(
            rr,
            Err(SendError::Rejected {
                reason: RejectReason::TypeMismatch,
                ..
            })
        ),
        "{rr:?}"
    );
    a.shutdown().await;
    b.shutdown().await;
}

/// Postcard decode of a payload with bytes left over is Undecodable (as documented
/// for `DeadLetterReason::Undecodable`: "or leaves bytes over"), dead-lettered with
/// its identity, and the raw sender's receipt is Rejected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postcard_trailing_bytes_are_dead_lettered_with_a_complete_record() {
    let (a, b) = pair(1, 2).await;
    let mut rx = b
        .receiver_with_codec::<u32, _>(ChannelId(6), ReceiverOptions::default(), Postcard)
        .unwrap();
    let mut dead = b.dead_letters();
    let raw = a
        .raw_sender(NodeId(2), opts(6, Guarantee::AtLeastOnce))
        .unwrap();
    // postcard(7u32) is [7]; append junk. Then a good one.
    let bad = raw
        .send(Bytes::from_static(&[7, 0xAA, 0xBB]))
        .await
        .unwrap();
    let good = raw.send(Bytes::from_static(&[9])).await.unwrap();
    let d = within(10, "recv", rx.recv()).await.unwrap();
    assert_eq!(*d.message(), 9, "the junk was delivered as a value");
    d.ack();
    assert_eq!(within(10, "good", good).await.unwrap(), Outcome::Acked);
    let rb = within(10, "bad receipt", bad).await;
    assert!(
        matches!(
            rb,
            Err(SendError::Rejected {
                reason: RejectReason::Undecodable,
                ..
            })
        ),
        "{rb:?}"
    );
    let letter = within(10, "dead letter", dead.recv()).await.unwrap();
    assert_eq!(letter.reason, DeadLetterReason::Undecodable);
    assert_eq!(&letter.message[..], &[7, 0xAA, 0xBB]);
    assert_eq!(letter.channel, ChannelId(6));
    assert_eq!(letter.from, a.origin());
    assert_eq!(letter.deliveries, 1, "{letter:?}");
    assert_eq!(b.stats().await.unwrap().decode_failed, 1);
    a.shutdown().await;
    b.shutdown().await;
}

// ------------------------------------------------------------------ dead letters

/// `dead_letter_capacity = 0` is accepted by `validate` (bound 0..=2^24): every letter
/// is then dropped at once, but counted and the sender still told.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zero_dead_letter_capacity_drops_counts_and_still_tells_the_sender() {
    let mut cfg = NodeConfig::default();
    cfg.dead_letter_capacity = 0;
    let (a, b) = pair_with(1, 2, cfg).await;
    let mut rx = b
        .receiver_with::<u64>(
            ChannelId(7),
            ReceiverOptions::default().max_deliveries(Some(1)),
        )
        .unwrap();
    let tx = a
        .sender::<u64>(NodeId(2), opts(7, Guarantee::AtLeastOnce))
        .unwrap();
    let r = tx.send(&1).await.unwrap();
    let d = within(10, "recv", rx.recv()).await.unwrap();
    d.nack();
    let rr = within(15, "receipt", r).await;
    assert!(
        matches!(
            rr,
            Err(SendError::Rejected {
                reason: RejectReason::DeadLettered,
                ..
            })
        ),
        "{rr:?}"
    );
    let mut dl = b.dead_letters();
    assert!(dl.try_recv().is_none());
    assert_eq!(b.stats().await.unwrap().dead_letters_dropped, 1);
    a.shutdown().await;
    b.shutdown().await;
    assert!(within(5, "dl end", dl.recv()).await.is_none());
}

/// After shutdown the dead-letter handle ends instead of hanging, and handles
/// made after shutdown end too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_shutdown_every_surface_fails_typed_or_ends() {
    let (a, b) = pair(1, 2).await;
    let tx = a
        .sender::<u64>(NodeId(2), opts(8, Guarantee::AtLeastOnce))
        .unwrap();
    let raw = a
        .raw_sender(NodeId(2), opts(9, Guarantee::AtLeastOnce))
        .unwrap();
    a.shutdown().await;
    assert!(matches!(tx.send(&1).await, Err(SendError::Shutdown)));
    assert!(matches!(tx.try_send(&1), Err(SendError::Shutdown)));
    assert!(matches!(
        tx.send_many([1u64, 2].iter()).await,
        Err(SendError::Shutdown)
    ));
    let mut svc = tx.service();
    use tower::ServiceExt;
    let r = within(5, "svc ready", svc.ready()).await.map(|_| ());
    assert!(matches!(r, Err(SendError::Shutdown)), "{r:?}");
    let mut sink = raw.sink();
    use futures::SinkExt;
    let r = within(5, "sink", sink.send(Bytes::from_static(b"x"))).await;
    assert!(matches!(r, Err(SendError::Shutdown)), "{r:?}");
    assert!(a
        .sender::<u64>(NodeId(2), opts(8, Guarantee::AtLeastOnce))
        .is_err());
    assert!(a.receiver::<u64>(ChannelId(8), false).is_err());
    let mut dl = a.dead_letters();
    assert!(within(5, "dead letters after shutdown", dl.recv())
        .await
        .is_none());
    assert!(a.stats().await.is_err());
    b.shutdown().await;
}

// ------------------------------------------------------------------ tower

/// A tower call whose response future is dropped at once: the docs say the message is
/// not recalled; it is delivered and its slot comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_tower_response_still_delivers_and_frees_its_slot() {
    use tower::{Service, ServiceExt};
    let (a, b) = pair(1, 2).await;
    let mut rx = b.receiver::<u64>(ChannelId(10), false).unwrap();
    let tx = a
        .sender::<u64>(NodeId(2), opts(10, Guarantee::EffectivelyOnce))
        .unwrap();
    let window = NodeConfig::default().proto.max_in_flight;
    let mut svc = tx.service();
    let acker = tokio::spawn(async move {
        let mut n = 0u64;
        while let Some(d) = rx.recv().await {
            n += 1;
            d.ack();
        }
        n
    });
    for i in 0..(window as u64 + 10) {
        let s = within(20, "ready", svc.ready()).await.unwrap();
        drop(s.call(i));
    }
    let last = within(20, "ready", svc.ready()).await.unwrap().call(9999);
    assert_eq!(within(20, "last", last).await.unwrap(), Outcome::Acked);
    a.shutdown().await;
    b.shutdown().await;
    let n = within(10, "acker", acker).await.unwrap();
    assert_eq!(n, window as u64 + 11);
}

// ------------------------------------------------------------------ metrics

mod metrics_probe {
    use ackwire::transport::mem::{FaultPlan, MemNetwork};
    use ackwire::{
        ChannelId, ChannelOptions, Guarantee, Node, NodeConfig, NodeId, Outcome, RejectReason,
        SendError,
    };
    use bytes::Bytes;
    use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
    use std::future::Future;
    use std::time::Duration;

    fn with_recorder<F: Future<Output = ()>>(f: impl FnOnce(Snapshotter) -> F) {
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .unwrap();
        metrics::with_local_recorder(&recorder, || rt.block_on(f(snapshotter)));
    }

    type Row = (String, Vec<(String, String)>, DebugValue);

    fn rows(s: &Snapshotter) -> Vec<Row> {
        s.snapshot()
            .into_vec()
            .into_iter()
            .map(|(k, _, _, v)| {
                let key = k.key();
                (
                    key.name().to_string(),
                    key.labels()
                        .map(|l| (l.key().to_string(), l.value().to_string()))
                        .collect(),
                    v,
                )
            })
            .collect()
    }

    fn counter(rows: &[Row], name: &str, labels: &[(&str, &str)]) -> u64 {
        rows.iter()
            .filter(|(n, ls, _)| {
                n == name
                    && labels
                        .iter()
                        .all(|(k, v)| ls.iter().any(|(lk, lv)| lk == k && lv == v))
            })
            .map(|(_, _, v)| match v {
                DebugValue::Counter(c) => *c,
                other => panic!("{name}: {other:?}"),
            })
            .sum()
    }

    fn gauge(rows: &[Row], name: &str, labels: &[(&str, &str)]) -> f64 {
        rows.iter()
            .filter(|(n, ls, _)| {
                n == name
                    && labels
                        .iter()
                        .all(|(k, v)| ls.iter().any(|(lk, lv)| lk == k && lv == v))
            })
            .map(|(_, _, v)| match v {
                DebugValue::Gauge(g) => g.into_inner(),
                other => panic!("{name}: {other:?}"),
            })
            .sum()
    }

    async fn within<F: Future>(f: F) -> F::Output {
        tokio::time::timeout(Duration::from_secs(300), f)
            .await
            .expect("hang (300 s virtual)")
    }

    /// The README's metric table: sink, service and batch sends count as sent; an
    /// undecodable payload counts `rejected{undecodable}` at the sender and
    /// `dead_letters{undecodable}` at the receiver; a type mismatch counts
    /// `rejected{type_mismatch}`; the in-flight gauge returns to 0.
    #[test]
    fn every_send_surface_and_every_rejection_is_counted() {
        with_recorder(|snap| async move {
            let net = MemNetwork::new(FaultPlan::new(1)).unwrap();
            let mk = |id: u64| {
                Node::builder(NodeId(id))
                    .transport(net.transport(NodeId(id)))
                    .seed(id)
                    .build()
            };
            let a = mk(1).await.unwrap();
            let b = mk(2).await.unwrap();
            let mut rx = b.receiver::<u64>(ChannelId(5), false).unwrap();
            let acker = tokio::spawn(async move {
                while let Some(d) = rx.recv().await {
                    d.ack();
                }
            });
            let opts = ChannelOptions::new(ChannelId(5), Guarantee::AtLeastOnce);
            let tx = a.sender::<u64>(NodeId(2), opts).unwrap();
            // send, send_many (2), sink (1), service (1) = 5 good messages
            let mut receipts = vec![tx.send(&1).await.unwrap()];
            receipts.extend(tx.send_many([2u64, 3].iter()).await.unwrap());
            for r in receipts {
                assert_eq!(within(r).await.unwrap(), Outcome::Acked);
            }
            {
                use futures::SinkExt;
                let mut sink = tx.sink();
                within(sink.send(4)).await.unwrap();
                within(sink.close()).await.unwrap();
            }
            {
                use tower::{Service, ServiceExt};
                let mut svc = tx.service();
                let f = within(svc.ready()).await.unwrap().call(5);
                assert_eq!(within(f).await.unwrap(), Outcome::Acked);
            }
            // Junk from a raw sender: undecodable.
            let raw = a.raw_sender(NodeId(2), opts).unwrap();
            let r = raw.send(Bytes::from_static(&[0xFF; 3])).await.unwrap();
            assert!(matches!(
                within(r).await,
                Err(SendError::Rejected {
                    reason: RejectReason::Undecodable,
                    ..
                })
            ));
            // Another type: type mismatch.
            let wrong = a.sender::<String>(NodeId(2), opts).unwrap();
            let r = wrong.send(&"x".to_string()).await.unwrap();
            assert!(matches!(
                within(r).await,
                Err(SendError::Rejected {
                    reason: RejectReason::TypeMismatch,
                    ..
                })
            ));
            let stats_a = a.stats().await.unwrap();
            a.shutdown().await;
            b.shutdown().await;
            acker.await.unwrap();
            let m = rows(&snap);
            let at_a = [("node", "n1"), ("peer", "n2"), ("channel", "5")];
            let at_b = [("node", "n2"), ("peer", "n1"), ("channel", "5")];
            assert_eq!(
                counter(&m, "ackwire_messages_sent_total", &at_a),
                7,
                "proto stats: {:?}",
                stats_a.proto
            );
            assert_eq!(counter(&m, "ackwire_messages_acked_total", &at_a), 5);
            let und = [&at_a[..], &[("reason", "undecodable")]].concat();
            assert_eq!(counter(&m, "ackwire_messages_rejected_total", &und), 1);
            let tm = [&at_a[..], &[("reason", "type_mismatch")]].concat();
            assert_eq!(counter(&m, "ackwire_messages_rejected_total", &tm), 1);
            let dl = [&at_b[..], &[("reason", "undecodable")]].concat();
            assert_eq!(counter(&m, "ackwire_dead_letters_total", &dl), 1);
            assert_eq!(gauge(&m, "ackwire_messages_in_flight", &at_a), 0.0);
        });
    }

    /// A message whose deadline passes while the receiver holds it unacked counts as
    /// given up, and the in-flight gauge comes back to 0.
    #[test]
    fn a_deadline_give_up_is_counted_and_leaves_no_in_flight() {
        with_recorder(|snap| async move {
            let net = MemNetwork::new(FaultPlan::new(1)).unwrap();
            let mk = |id: u64| {
                Node::builder(NodeId(id))
                    .transport(net.transport(NodeId(id)))
                    .seed(id)
                    .build()
            };
            let a = mk(1).await.unwrap();
            let b = mk(2).await.unwrap();
            let mut rx = b.receiver::<u64>(ChannelId(5), false).unwrap();
            let mut opts = ChannelOptions::new(ChannelId(5), Guarantee::AtLeastOnce);
            opts.deadline = Some(Duration::from_secs(2));
            let tx = a.sender::<u64>(NodeId(2), opts).unwrap();
            let r = tx.send(&1).await.unwrap();
            let held = within(rx.recv()).await.unwrap();
            let res = within(r).await;
            assert!(matches!(res, Err(SendError::Deadline { .. })), "{res:?}");
            drop(held);
            a.shutdown().await;
            b.shutdown().await;
            let m = rows(&snap);
            let at_a = [("node", "n1"), ("peer", "n2"), ("channel", "5")];
            assert_eq!(counter(&m, "ackwire_messages_given_up_total", &at_a), 1);
            assert_eq!(gauge(&m, "ackwire_messages_in_flight", &at_a), 0.0);
            let _ = NodeConfig::default();
        });
    }
}

/// `Receiver::recv`'s rustdoc, `Stats::decode_failed` and `Node::dead_letters`: a
/// payload that does not decode as the typed receiver's type is "put in
/// `Node::dead_letters`" — with no exception for the guarantee. An at-most-once
/// undecodable payload was counted in `decode_failed` but never became a dead letter.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_undecodable_at_most_once_payload_is_dead_lettered_too() {
    let (a, b) = pair(1, 2).await;
    let mut rx = b.receiver::<u64>(ChannelId(11), false).unwrap();
    let mut dead = b.dead_letters();
    let raw = a
        .raw_sender(NodeId(2), opts(11, Guarantee::AtMostOnce))
        .unwrap();
    let junk = raw
        .send(Bytes::from_static(&[0xFF, 0xFF, 0xFF]))
        .await
        .unwrap();
    assert_eq!(within(10, "junk sent", junk).await.unwrap(), Outcome::Sent);
    let good = raw.send(Bytes::from_static(&[5])).await.unwrap();
    assert_eq!(within(10, "good sent", good).await.unwrap(), Outcome::Sent);
    let d = within(10, "recv", rx.recv()).await.unwrap();
    assert_eq!(*d.message(), 5);
    d.ack();
    assert_eq!(b.stats().await.unwrap().decode_failed, 1);
    let letter = within(
        5,
        "the undecodable at-most-once payload's dead letter",
        dead.recv(),
    )
    .await
    .expect("a dead letter");
    assert_eq!(letter.reason, DeadLetterReason::Undecodable);
    assert_eq!(&letter.message[..], &[0xFF, 0xFF, 0xFF]);
    assert_eq!(letter.channel, ChannelId(11));
    assert_eq!(letter.from, a.origin());
    assert_eq!(letter.deliveries, 1);
    a.shutdown().await;
    b.shutdown().await;
}

/// Misuse: a node built on a runtime that is then dropped (a temporary runtime in
/// synchronous code). Its handles, used from another runtime, fail typed or end;
/// nothing hangs or panics.
#[test]
fn a_node_whose_runtime_was_dropped_fails_typed_from_another_runtime() {
    let rt1 = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let (a, b, tx, mut rx) = rt1.block_on(async {
        let (a, b) = pair(1, 2).await;
        let tx = a
            .sender::<u64>(NodeId(2), opts(12, Guarantee::AtLeastOnce))
            .unwrap();
        let rx = b.receiver::<u64>(ChannelId(12), false).unwrap();
        (a, b, tx, rx)
    });
    drop(rt1);
    let rt2 = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt2.block_on(async {
        let r = within(10, "send on a dead runtime's node", tx.send(&1)).await;
        match r {
            Err(_) => {}
            Ok(receipt) => {
                let res = within(10, "receipt", receipt).await;
                assert!(res.is_err(), "{res:?}");
            }
        }
        assert!(within(10, "recv", rx.recv()).await.is_none());
        let closed = within(10, "closed", a.closed()).await;
        eprintln!("closed: {closed:?}");
        assert!(within(10, "stats", a.stats()).await.is_err());
        within(10, "shutdown a", a.shutdown()).await;
        within(10, "shutdown b", b.shutdown()).await;
        let r = a.sender::<u64>(NodeId(2), opts(13, Guarantee::AtLeastOnce));
        assert!(r.is_err());
    });
}
