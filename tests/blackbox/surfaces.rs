//! Black-box probes of the secondary public surfaces (config files, postcard codec,
//! dead-letter queue bounds, tower service, sink) against real TCP with defaults.
//! Every await that could hang is under a timeout.
//!
//! Found: a huge duration with a fraction in a config file overflowed (a panic in
//! debug builds, a silently wrapped tiny duration in release); an undecodable
//! at-most-once payload was never put in the dead letters. Both fixed.

use crate::support::ports;

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

/// README: effectively-once "counts the deliveries of every copy of an id together
/// (the same key sent twice counts once towards the limit, and gets one letter), and
/// refuses copies of a dead-lettered id arriving within 2 minutes without a new
/// letter".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_sent_twice_and_nacked_gets_one_dead_letter_and_both_senders_told() {
    use ackwire::IdKey;
    let (a, b) = pair(1, 2).await;
    let mut rx = b
        .receiver_with::<u64>(
            ChannelId(14),
            ReceiverOptions::default().max_deliveries(Some(2)),
        )
        .unwrap();
    let mut dead = b.dead_letters();
    let tx = a
        .sender::<u64>(NodeId(2), opts(14, Guarantee::EffectivelyOnce))
        .unwrap();
    let r1 = tx.send_with_key(&7, IdKey(99)).await.unwrap();
    let d = within(10, "first delivery", rx.recv()).await.unwrap();
    // A second copy under the same key while the first is held.
    let r2 = tx.send_with_key(&7, IdKey(99)).await.unwrap();
    d.nack();
    let mut seen = 1u32;
    let nacker = tokio::spawn(async move {
        let mut more = 0u32;
        while let Some(d) = rx.recv().await {
            more += 1;
            d.nack();
        }
        more
    });
    let res1 = within(40, "r1", r1).await;
    let res2 = within(40, "r2", r2).await;
    let letter = within(10, "letter", dead.recv()).await.unwrap();
    assert_eq!(letter.reason, DeadLetterReason::MaxDeliveries);
    assert_eq!(letter.id, ackwire::MessageId::Key(IdKey(99)), "{letter:?}");
    // A third copy after the letter: refused, no new letter.
    let r3 = tx.send_with_key(&7, IdKey(99)).await.unwrap();
    let res3 = within(40, "r3", r3).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(dead.try_recv().is_none(), "a second letter for one key");
    a.shutdown().await;
    b.shutdown().await;
    seen += within(10, "nacker", nacker).await.unwrap();
    assert!(
        seen <= 2,
        "the handler saw key 99 {seen} times with a limit of 2"
    );
    for (i, r) in [res1, res2, res3].into_iter().enumerate() {
        assert!(
            matches!(
                r,
                Err(SendError::Rejected {
                    reason: RejectReason::DeadLettered,
                    ..
                })
            ),
            "copy {}: {r:?}",
            i + 1
        );
    }
}

/// README: "a payload announcing a 2^64-byte string or 2^64 `()`s is undecodable, not
/// an allocation or an endless loop" — with the postcard codec too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_lengths_are_undecodable_with_postcard_too() {
    use ackwire::codec::Decode;
    // varint of u64::MAX: nine 0xFF then 0x01.
    let mut huge = vec![0xFFu8; 9];
    huge.push(0x01);
    let started = std::time::Instant::now();
    let r: Result<Vec<()>, _> = Decode::<Vec<()>>::decode(&Postcard, &huge);
    assert!(
        r.is_err(),
        "decoded {} units",
        r.map(|v| v.len()).unwrap_or(0)
    );
    let r: Result<String, _> = Decode::<String>::decode(&Postcard, &huge);
    assert!(r.is_err());
    let r: Result<Vec<u64>, _> = Decode::<Vec<u64>>::decode(&Postcard, &huge);
    assert!(r.is_err());
    // 1000 bytes claiming 10^6 units each nested: bounded.
    let mut nested = Vec::new();
    for _ in 0..100 {
        nested.extend_from_slice(&[0xC0, 0x84, 0x3D]); // varint 1_000_000
    }
    let r: Result<Vec<Vec<()>>, _> = Decode::<Vec<Vec<()>>>::decode(&Postcard, &nested);
    assert!(r.is_err());
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
}

/// examples/toml_config.toml: "Uncomment to store messages for unreachable peers on
/// disk" — the commented handoff section, uncommented, must read and validate.
#[test]
fn the_example_configs_commented_handoff_section_reads_when_uncommented() {
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "[handoff.store]\ndir = {:?}\nfsync = {{ Every = \"10ms\" }}\n",
        dir.path().display().to_string()
    );
    let cfg: NodeConfig = toml::from_str(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    let h = cfg.handoff.as_ref().expect("handoff on");
    assert_eq!(h.store.dir, dir.path());
    cfg.validate().unwrap();
    // And a round trip of the whole thing.
    let back: NodeConfig = toml::from_str(&toml::to_string(&cfg).unwrap()).unwrap();
    assert_eq!(back.handoff.unwrap().store.dir, dir.path());
}

/// A delivery taken before its receiver was dropped (split with `into_parts`) can
/// still be acked: the sender sees `Acked` and a new receiver of the channel does not
/// get it again (effectively-once).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_outliving_its_receiver_can_still_be_acked() {
    let (a, b) = pair(1, 2).await;
    let mut rx = b.receiver::<u64>(ChannelId(15), false).unwrap();
    let tx = a
        .sender::<u64>(NodeId(2), opts(15, Guarantee::EffectivelyOnce))
        .unwrap();
    let r = tx.send(&1).await.unwrap();
    let d = within(10, "recv", rx.recv()).await.unwrap();
    drop(rx);
    let (v, handle) = d.into_parts();
    assert_eq!(v, 1);
    let mut rx2 = b.receiver::<u64>(ChannelId(15), false).unwrap();
    handle.ack();
    assert_eq!(within(15, "receipt", r).await.unwrap(), Outcome::Acked);
    let r2 = tx.send(&2).await.unwrap();
    let d2 = within(10, "recv 2", rx2.recv()).await.unwrap();
    assert_eq!(*d2.message(), 2, "the acked message came again");
    d2.ack();
    within(10, "r2", r2).await.unwrap();
    a.shutdown().await;
    b.shutdown().await;
}

// ------------------------------------------------------------------ config text sweep

/// Every leaf of a full NodeConfig (handoff, durable dedup and dead-letter dir on),
/// written as TOML, set in turn to extreme text values (0, 1, huge, "0", "never",
/// "1ns", a flipped bool): reading it is a typed error, or `validate` is, or two nodes
/// built with it round-trip a message and stop cleanly. Never a panic, a dead driver
/// or a hang (virtual clock).
#[test]
fn every_config_key_at_an_extreme_text_value_is_typed_or_works() {
    use ackwire::dedup::DurableDedup;
    use ackwire::transport::mem::{FaultPlan, MemNetwork};
    use ackwire::HandoffConfig;
    use toml::Value;

    let tmp = tempfile::tempdir().unwrap();
    let mut base = NodeConfig::default();
    base.handoff = Some(HandoffConfig::new(tmp.path().join("hints")));
    base.dedup.durable = Some(DurableDedup::new(tmp.path().join("dedup")));
    base.dead_letter_dir = Some(tmp.path().join("dead"));
    let root: Value = Value::try_from(&base).unwrap();

    fn leaves(v: &Value, path: Vec<String>, out: &mut Vec<(Vec<String>, Value)>) {
        match v {
            Value::Table(t) => {
                for (k, v) in t {
                    let mut p = path.clone();
                    p.push(k.clone());
                    leaves(v, p, out);
                }
            }
            Value::Array(_) => {}
            other => out.push((path, other.clone())),
        }
    }
    fn set(v: &mut Value, path: &[String], new: Value) {
        let mut cur = v;
        for k in &path[..path.len() - 1] {
            cur = cur.get_mut(k.as_str()).unwrap();
        }
        cur.as_table_mut()
            .unwrap()
            .insert(path[path.len() - 1].clone(), new);
    }
    let mut all = Vec::new();
    leaves(&root, vec![], &mut all);
    let mut problems = Vec::new();
    let mut cases = 0;
    for (path, value) in all {
        if path.iter().any(|p| p == "dir" || p == "dead_letter_dir") {
            continue;
        }
        let variants: Vec<Value> = match &value {
            Value::Integer(_) => vec![
                Value::Integer(0),
                Value::Integer(1),
                Value::Integer(i64::MAX),
            ],
            Value::Float(_) => vec![
                Value::Float(0.0),
                Value::Float(-1.0),
                Value::Float(f64::NAN),
                Value::Float(f64::INFINITY),
                Value::Float(1e300),
            ],
            Value::String(s)
                if s.chars().next().is_some_and(|c| c.is_ascii_digit())
                    || s == "never"
                    || s == "none" =>
            {
                vec![
                    Value::String("0".into()),
                    Value::String("1ns".into()),
                    Value::String("never".into()),
                    Value::String("none".into()),
                ]
            }
            Value::Boolean(b) => vec![Value::Boolean(!b)],
            _ => vec![],
        };
        for new in variants {
            cases += 1;
            let label = format!("{} = {new}", path.join("."));
            let mut v = root.clone();
            set(&mut v, &path, new);
            // Fresh directories per case.
            let dir = tempfile::tempdir().unwrap();
            set(
                &mut v,
                &["handoff".into(), "store".into(), "dir".into()],
                Value::String(dir.path().join("h").display().to_string()),
            );
            set(
                &mut v,
                &["dedup".into(), "durable".into(), "dir".into()],
                Value::String(dir.path().join("d").display().to_string()),
            );
            set(
                &mut v,
                &["dead_letter_dir".into()],
                Value::String(dir.path().join("l").display().to_string()),
            );
            let text = toml::to_string(&v).unwrap();
            let outcome = std::panic::catch_unwind(|| {
                let cfg: NodeConfig = match toml::from_str(&text) {
                    Ok(c) => c,
                    Err(_) => return "read error".to_string(),
                };
                if let Err(e) = cfg.validate() {
                    return format!("invalid: {e}");
                }
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .start_paused(true)
                    .build()
                    .unwrap();
                rt.block_on(async move {
                    let net = MemNetwork::new(FaultPlan::new(1)).unwrap();
                    let mut cfg_b = cfg.clone();
                    if let Some(h) = cfg_b.handoff.as_mut() {
                        h.store.dir = h.store.dir.with_extension("b");
                    }
                    if let Some(d) = cfg_b.dedup.durable.as_mut() {
                        d.dir = d.dir.with_extension("b");
                    }
                    cfg_b.dead_letter_dir = cfg_b.dead_letter_dir.map(|d| d.with_extension("b"));
                    let a = match Node::builder(NodeId(1))
                        .transport(net.transport(NodeId(1)))
                        .config(cfg)
                        .build()
                        .await
                    {
                        Ok(n) => n,
                        Err(e) => return format!("build error {e}"),
                    };
                    let b = match Node::builder(NodeId(2))
                        .transport(net.transport(NodeId(2)))
                        .config(cfg_b)
                        .build()
                        .await
                    {
                        Ok(n) => n,
                        Err(e) => return format!("build error b {e}"),
                    };
                    let mut rx = b.receiver::<u64>(ChannelId(1), false).unwrap();
                    let tx = match a.sender::<u64>(NodeId(2), opts(1, Guarantee::EffectivelyOnce)) {
                        Ok(t) => t,
                        Err(e) => return format!("sender error {e}"),
                    };
                    let res = tokio::time::timeout(Duration::from_secs(600), async {
                        let r = tx.send(&5).await?;
                        if let Some(d) = rx.recv().await {
                            d.ack();
                        }
                        r.await
                    })
                    .await;
                    let res = match res {
                        Ok(r) => format!("{r:?}"),
                        Err(_) => "HANG: no receipt within 600 s virtual".to_string(),
                    };
                    let stop = tokio::time::timeout(Duration::from_secs(3600), async {
                        a.shutdown().await;
                        b.shutdown().await;
                        (a.closed().await, b.closed().await)
                    })
                    .await;
                    match stop {
                        Ok((Ok(()), Ok(()))) => res,
                        Ok(other) => format!("DRIVER FAILED {other:?} after {res}"),
                        Err(_) => format!("HANG at shutdown after {res}"),
                    }
                })
            });
            match outcome {
                Err(p) => {
                    let msg = p
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                        .unwrap_or_default();
                    problems.push(format!("{label}: PANIC {msg}"));
                }
                Ok(s) if s.contains("HANG") || s.contains("FAILED") => {
                    problems.push(format!("{label}: {s}"))
                }
                Ok(s) => eprintln!("{label}: {s}"),
            }
        }
    }
    assert!(cases > 50, "only {cases} cases");
    assert!(
        problems.is_empty(),
        "{} problems:\n{}",
        problems.len(),
        problems.join("\n")
    );
}

/// Misuse: a handler calls `shutdown()` on its own node while it holds a delivery.
/// The docs give held deliveries 1 s of grace: shutdown must return (not deadlock),
/// and the sender must not see `Acked` for a message that was not acked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_shutting_down_its_own_node_while_holding_a_delivery_does_not_deadlock() {
    let (a, b) = pair(1, 2).await;
    let b = std::sync::Arc::new(b);
    let mut rx = b.receiver::<u64>(ChannelId(16), false).unwrap();
    let tx = a
        .sender::<u64>(NodeId(2), opts(16, Guarantee::AtLeastOnce))
        .unwrap();
    let r = tx.send(&1).await.unwrap();
    let b2 = b.clone();
    let handler = tokio::spawn(async move {
        let d = rx.recv().await.unwrap();
        b2.shutdown().await; // holding `d`
        d.ack(); // after the node stopped: goes nowhere
        rx.recv().await.is_none()
    });
    let ended = within(20, "handler's shutdown", handler).await.unwrap();
    assert!(ended, "recv after shutdown handed something out");
    // The receipt must not be Acked: the ack came after the stop.
    let res = tokio::time::timeout(Duration::from_secs(3), r).await;
    if let Ok(res) = res {
        assert!(res.is_err(), "acked after the receiver stopped: {res:?}");
    }
    a.shutdown().await;
}

/// `SendSink`'s rustdoc example, over TCP with defaults: 10 000 items through
/// `send_all`, `close()` → every one acknowledged, `settled() == 10_000`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sink_rustdoc_example_holds_over_tcp() {
    use futures::{stream, SinkExt, StreamExt};
    let (a, b) = pair(1, 2).await;
    let mut rx = b.receiver::<u64>(ChannelId(17), false).unwrap();
    let acker = tokio::spawn(async move {
        let mut seen = std::collections::HashSet::new();
        let mut buf = Vec::new();
        while rx.recv_many(&mut buf, 512).await > 0 {
            for d in buf.drain(..) {
                seen.insert(*d.message());
                d.ack();
            }
        }
        seen
    });
    let out = a
        .sender::<u64>(NodeId(2), opts(17, Guarantee::AtLeastOnce))
        .unwrap();
    let mut sink = out.sink();
    within(
        60,
        "send_all",
        sink.send_all(&mut stream::iter(0..10_000u64).map(Ok)),
    )
    .await
    .unwrap();
    within(60, "close", sink.close()).await.unwrap();
    assert_eq!(sink.settled(), 10_000);
    assert_eq!(sink.failed(), 0);
    assert_eq!(sink.outstanding(), 0);
    a.shutdown().await;
    b.shutdown().await;
    let seen = within(10, "acker", acker).await.unwrap();
    assert_eq!(seen.len(), 10_000);
}

/// Every public handle can move into a spawned task (`Send + 'static`); the cheap
/// shared ones are also `Sync`.
#[test]
fn public_handles_are_send_and_the_shared_ones_sync() {
    fn send<T: Send + 'static>() {}
    fn sync<T: Sync>() {}
    send::<Node>();
    sync::<Node>();
    send::<ackwire::Sender<u64>>();
    sync::<ackwire::Sender<u64>>();
    send::<ackwire::Sender<u64, Postcard>>();
    send::<ackwire::RawSender>();
    sync::<ackwire::RawSender>();
    send::<ackwire::Receiver<u64>>();
    send::<ackwire::RawReceiver>();
    send::<ackwire::Receipt>();
    send::<ackwire::Delivery<u64>>();
    send::<ackwire::DeliveryHandle>();
    send::<ackwire::DeadLetters>();
    sync::<ackwire::DeadLetters>();
    send::<ackwire::SendSink<u64>>();
    send::<ackwire::RawSendSink>();
    send::<ackwire::SenderService<u64>>();
    send::<ackwire::RawSenderService>();
    send::<ackwire::SendFuture>();
    send::<ackwire::group::GroupSender<u64>>();
    send::<ackwire::SendError>();
    sync::<ackwire::SendError>();
    send::<ackwire::NodeError>();
    sync::<ackwire::NodeError>();
    send::<ackwire::ConfigError>();
    sync::<ackwire::ConfigError>();
}

/// `ack_durable`'s docs: `AckError::NodeStopped` when the node stopped first — never
/// `Ok` for an ack that went nowhere, never a hang.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ack_durable_after_the_node_stopped_is_node_stopped() {
    let (a, b) = pair(1, 2).await;
    let mut rx = b.receiver::<u64>(ChannelId(18), false).unwrap();
    let tx = a
        .sender::<u64>(NodeId(2), opts(18, Guarantee::EffectivelyOnce))
        .unwrap();
    let _r = tx.send(&1).await.unwrap();
    let d = within(10, "recv", rx.recv()).await.unwrap();
    within(20, "shutdown", b.shutdown()).await;
    let res = within(10, "ack_durable", d.ack_durable()).await;
    assert!(
        matches!(res, Err(ackwire::AckError::NodeStopped)),
        "{res:?}"
    );
    a.shutdown().await;
}
