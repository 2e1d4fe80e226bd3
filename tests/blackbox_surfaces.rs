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
