//! Rejections travel back (protocol version 3, issue 13 items 4 and 5): a receiver that
//! will never process a message says why, the sender's receipt fails with that reason
//! at once, and messages that exhaust their channel's delivery limit become dead
//! letters. Each test prints a `reliability:` line once it has held.

use crate::support;

use ackwire::proto::Authorization;
use ackwire::transport::mem::{FaultPlan, MemNetwork};
use ackwire::{
    ChannelId, ChannelOptions, DeadLetterReason, Guarantee, IdKey, Node, NodeConfig, NodeId,
    Outcome, ReceiverOptions, RejectReason, SendError,
};
use std::time::Duration;
use support::reliability::report;

const CH: ChannelId = ChannelId(7);
const A: NodeId = NodeId(1);
const B: NodeId = NodeId(2);

async fn node(net: &MemNetwork, id: NodeId, config: NodeConfig) -> Node {
    Node::builder(id)
        .transport(net.transport(id))
        .config(config)
        .seed(id.0)
        .build()
        .await
        .unwrap()
}

async fn pair(seed: u64) -> (MemNetwork, Node, Node) {
    let net = MemNetwork::new(FaultPlan::new(seed)).unwrap();
    let a = node(&net, A, NodeConfig::default()).await;
    let b = node(&net, B, NodeConfig::default()).await;
    (net, a, b)
}

async fn within<F: std::future::Future>(f: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(120), f)
        .await
        .expect("did not complete within 2 virtual minutes")
}

#[tokio::test(start_paused = true)]
async fn a_message_nacked_up_to_the_limit_is_dead_lettered_and_the_sender_told() {
    for guarantee in [Guarantee::AtLeastOnce, Guarantee::EffectivelyOnce] {
        let (_net, a, b) = pair(3).await;
        let mut inbox = b
            .receiver_with::<u64>(CH, ReceiverOptions::unordered().max_deliveries(Some(3)))
            .unwrap();
        let out = a
            .sender::<u64>(B, ChannelOptions::new(CH, guarantee))
            .unwrap();
        let poison = out.send(&13).await.unwrap();
        let mut seen = 0;
        for _ in 0..3 {
            let d = within(inbox.recv()).await.unwrap();
            assert_eq!(*d.message(), 13);
            seen += 1;
            if seen % 2 == 0 {
                d.nack();
            } else {
                drop(d); // dropping unfinished counts as a nack
            }
        }
        assert_eq!(
            within(poison).await,
            Err(SendError::Rejected {
                reason: RejectReason::DeadLettered
            }),
            "{guarantee:?}"
        );
        let letter = within(b.dead_letters().recv()).await.unwrap();
        assert_eq!(letter.reason, DeadLetterReason::MaxDeliveries);
        assert_eq!(letter.deliveries, 3);
        assert_eq!((letter.from, letter.channel), (a.origin(), CH));
        // Never delivered a fourth time; the channel keeps working.
        let next = out.send(&14).await.unwrap();
        let d = within(inbox.recv()).await.unwrap();
        assert_eq!(*d.message(), 14, "{guarantee:?}: the dead letter came back");
        d.ack();
        assert_eq!(within(next).await, Ok(Outcome::Acked));
        let stats = b.stats().await.unwrap();
        assert_eq!(stats.proto.dead_lettered, 1, "{guarantee:?}");
        assert_eq!(a.stats().await.unwrap().proto.rejects_received, 1);
    }
    report(
        "rejections",
        "a message nacked or dropped max_deliveries times (ALO and EO)",
        "2",
        "dead-lettered with its delivery count, never delivered again; receipt fails Rejected(DeadLettered)",
    );
}

#[tokio::test(start_paused = true)]
async fn an_ordered_stream_moves_past_a_dead_letter_in_order() {
    let (_net, a, b) = pair(4).await;
    let mut inbox = b
        .receiver_with::<u64>(CH, ReceiverOptions::ordered().max_deliveries(Some(2)))
        .unwrap();
    let out = a
        .sender::<u64>(B, ChannelOptions::new(CH, Guarantee::EffectivelyOnce))
        .unwrap();
    let mut receipts = Vec::new();
    for n in 1..=20u64 {
        receipts.push(out.send(&n).await.unwrap());
    }
    // Message 5 is poison: nacked each time. Every other message is acked.
    let mut first_seen = Vec::new();
    let mut deliveries_of_5 = 0;
    while first_seen.len() < 19 || deliveries_of_5 < 2 {
        let d = within(inbox.recv()).await.unwrap();
        let n = *d.message();
        if n == 5 {
            deliveries_of_5 += 1;
            d.nack();
            continue;
        }
        if !first_seen.contains(&n) {
            first_seen.push(n);
        }
        d.ack();
    }
    let want: Vec<u64> = (1..=20).filter(|n| *n != 5).collect();
    assert_eq!(first_seen, want, "first deliveries in send order");
    assert_eq!(deliveries_of_5, 2);
    for (i, r) in receipts.into_iter().enumerate() {
        let got = within(r).await;
        if i + 1 == 5 {
            assert_eq!(
                got,
                Err(SendError::Rejected {
                    reason: RejectReason::DeadLettered
                })
            );
        } else {
            assert_eq!(got, Ok(Outcome::Acked), "message {}", i + 1);
        }
    }
    assert_eq!(within(b.dead_letters().recv()).await.unwrap().deliveries, 2);
    report(
        "rejections",
        "an ordered effectively-once stream with a poison message",
        "1",
        "the rest delivered once each in send order; the poison message dead-lettered after 2 deliveries",
    );
}

#[tokio::test(start_paused = true)]
async fn without_a_limit_a_nacked_message_is_redelivered_until_acked() {
    let (_net, a, b) = pair(5).await;
    let mut inbox = b
        .receiver_with::<u64>(CH, ReceiverOptions::unordered().max_deliveries(None))
        .unwrap();
    let out = a
        .sender::<u64>(B, ChannelOptions::new(CH, Guarantee::AtLeastOnce))
        .unwrap();
    let receipt = out.send(&1).await.unwrap();
    for _ in 0..30 {
        within(inbox.recv()).await.unwrap().nack();
    }
    within(inbox.recv()).await.unwrap().ack();
    assert_eq!(within(receipt).await, Ok(Outcome::Acked));
    assert!(b.dead_letters().try_recv().is_none());
}

#[tokio::test(start_paused = true)]
async fn a_sender_the_channel_does_not_allow_is_rejected_unauthorized() {
    let net = MemNetwork::new(FaultPlan::new(6)).unwrap();
    let a = node(&net, A, NodeConfig::default()).await;
    let mut config = NodeConfig::default();
    config.authorization = Authorization::default().restrict_channel(CH, [NodeId(9)]);
    let b = node(&net, B, config).await;
    let _inbox = b.receiver::<u64>(CH, false).unwrap();
    let out = a
        .sender::<u64>(B, ChannelOptions::new(CH, Guarantee::AtLeastOnce))
        .unwrap();
    let receipt = out.send(&1).await.unwrap();
    assert_eq!(
        within(receipt).await,
        Err(SendError::Rejected {
            reason: RejectReason::Unauthorized
        })
    );
    assert_eq!(b.stats().await.unwrap().proto.unauthorized_dropped, 1);
    report(
        "rejections",
        "a sender the receiver's authorization refuses on the channel",
        "1",
        "receipt fails Rejected(Unauthorized) at once (not at its deadline)",
    );
}

#[tokio::test(start_paused = true)]
async fn a_receiver_that_starts_within_the_grace_period_gets_the_message() {
    let (_net, a, b) = pair(7).await;
    let out = a
        .sender::<u64>(B, ChannelOptions::new(CH, Guarantee::EffectivelyOnce))
        .unwrap();
    let receipt = out.send(&77).await.unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut inbox = b.receiver::<u64>(CH, false).unwrap();
    let d = within(inbox.recv()).await.unwrap();
    assert_eq!(*d.message(), 77);
    d.ack();
    assert_eq!(within(receipt).await, Ok(Outcome::Acked));
    report(
        "rejections",
        "a receiver registered 3 s after the first message (grace 5 s)",
        "1",
        "the message is delivered and acked, not rejected",
    );
}

/// `Rejected(NoReceiver)` says no handler saw the message. A receiver dropped while a
/// slow handler still holds a message: a later message on the channel is refused
/// `NoReceiver` past the grace, but the held one is not; its handler acks it 20 s
/// later, after the drop, and its receipt is `Ok(Acked)`. (Regression: the credit ack
/// sent with the later refusal said nothing was held, the sender retransmitted the
/// held message, and that copy was refused `NoReceiver` too: the receipt of a message
/// its handler processed failed.)
#[tokio::test(start_paused = true)]
async fn a_message_held_by_a_handler_when_its_receiver_is_dropped_is_not_refused() {
    for guarantee in [Guarantee::AtLeastOnce, Guarantee::EffectivelyOnce] {
        let (_net, a, b) = pair(9).await;
        let mut inbox = b.receiver::<u64>(CH, false).unwrap();
        let out = a
            .sender::<u64>(B, ChannelOptions::new(CH, guarantee))
            .unwrap();
        let held_receipt = out.send(&1).await.unwrap();
        let held = within(inbox.recv()).await.unwrap();
        drop(inbox);
        let later = out.send(&2).await.unwrap();
        assert_eq!(
            within(later).await,
            Err(SendError::Rejected {
                reason: RejectReason::NoReceiver
            }),
            "{guarantee:?}"
        );
        tokio::time::sleep(Duration::from_secs(20)).await;
        held.ack();
        assert_eq!(
            within(held_receipt).await,
            Ok(Outcome::Acked),
            "{guarantee:?}"
        );
        a.shutdown().await;
        b.shutdown().await;
    }
}

#[tokio::test(start_paused = true)]
async fn a_dropped_receiver_leads_to_no_receiver_rejects() {
    let (_net, a, b) = pair(8).await;
    let inbox = b.receiver::<u64>(CH, false).unwrap();
    drop(inbox);
    let out = a
        .sender::<u64>(B, ChannelOptions::new(CH, Guarantee::AtLeastOnce))
        .unwrap();
    let receipt = out.send(&1).await.unwrap();
    assert_eq!(
        within(receipt).await,
        Err(SendError::Rejected {
            reason: RejectReason::NoReceiver
        })
    );
}

#[tokio::test(start_paused = true)]
async fn a_clean_shutdown_retires_the_senders_dedup_streams_at_once() {
    let (_net, a, b) = pair(9).await;
    let mut inbox = b.receiver::<u64>(CH, false).unwrap();
    let out = a
        .sender::<u64>(B, ChannelOptions::new(CH, Guarantee::EffectivelyOnce))
        .unwrap();
    let mut receipts = Vec::new();
    for n in 0..10u64 {
        receipts.push(out.send(&n).await.unwrap());
    }
    receipts.push(out.send_with_key(&99, IdKey(99)).await.unwrap());
    for _ in 0..11 {
        within(inbox.recv()).await.unwrap().ack();
    }
    for r in receipts {
        assert_eq!(within(r).await, Ok(Outcome::Acked));
    }
    let before = b.stats().await.unwrap().dedup;
    assert_eq!(before.streams_retired_finished, 0);
    a.shutdown().await;
    // No retention wait (24 h by default): the finish frame retires it.
    let mut retired = 0;
    for _ in 0..100 {
        retired = b.stats().await.unwrap().dedup.streams_retired_finished;
        if retired > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(retired, 1, "the finished stream is retired");
    report(
        "rejections",
        "an effectively-once sender that shuts down cleanly",
        "1",
        "its receiver retires the stream's dedup state at once (finish frame), not after the 24 h retention",
    );
}

/// Issue 13 item 7: `ack_durable` resolves only once the completion is on disk, so a
/// receiver killed after it returned cannot process the message again.
#[tokio::test]
async fn ack_durable_resolves_after_the_dedup_record_is_on_disk() {
    use ackwire::dedup::{Admit, Dedup, DedupConfig, DurableDedup};
    let dir = tempfile::tempdir().unwrap();
    let net = MemNetwork::new(FaultPlan::new(10)).unwrap();
    let a = node(&net, A, NodeConfig::default()).await;
    let mut config = NodeConfig::default();
    config.dedup.durable = Some(DurableDedup::new(dir.path().join("dedup")));
    let b = node(&net, B, config).await;
    let mut inbox = b.receiver::<u64>(CH, false).unwrap();
    let out = a
        .sender::<u64>(B, ChannelOptions::new(CH, Guarantee::EffectivelyOnce))
        .unwrap();
    let mut ids = Vec::new();
    for n in 0..20u64 {
        let receipt = out
            .send_with_key(&n, IdKey(1000 + u128::from(n)))
            .await
            .unwrap();
        let d = within(inbox.recv()).await.unwrap();
        ids.push(d.id());
        within(d.ack_durable()).await.expect("persisted");
        // What is on disk now is what a restarted receiver would read.
        let copy = tempfile::tempdir().unwrap();
        for e in std::fs::read_dir(dir.path().join("dedup")).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), copy.path().join(e.file_name())).unwrap();
        }
        let reread = Dedup::open(DedupConfig {
            durable: Some(DurableDedup::new(copy.path())),
            ..DedupConfig::default()
        })
        .unwrap();
        let now = std::time::Instant::now();
        for id in &ids {
            assert_eq!(
                reread.begin(id, now).unwrap(),
                Admit::Duplicate,
                "{id} acked durably but not on disk"
            );
        }
        assert_eq!(within(receipt).await, Ok(Outcome::Acked));
    }
    report(
        "rejections",
        "ack_durable with durable dedup (20 messages, log re-read after each)",
        "1",
        "every message acked with ack_durable is a duplicate to a dedup opened from the files on disk at that moment",
    );
}

#[tokio::test(start_paused = true)]
async fn a_zero_delivery_limit_is_a_typed_error() {
    let (_net, _a, b) = pair(11).await;
    match b.receiver_with::<u64>(CH, ReceiverOptions::unordered().max_deliveries(Some(0))) {
        Err(ackwire::NodeError::Config(ackwire::ConfigError::TooSmall { field, min, .. })) => {
            assert_eq!((field, min), ("max_deliveries", 1));
        }
        other => panic!("expected a typed config error, got {other:?}"),
    }
    // The channel is still free for a valid receiver.
    assert!(b
        .receiver_with::<u64>(CH, ReceiverOptions::unordered().max_deliveries(Some(1)))
        .is_ok());
}

/// Dead letters kept durably survive a node restart; a torn last record (a crash in
/// the middle of a write) loses that record only, never the others, and never panics.
#[tokio::test(start_paused = true)]
async fn durable_dead_letters_survive_a_restart_and_a_torn_tail() {
    let dir = tempfile::tempdir().unwrap();
    let net = MemNetwork::new(FaultPlan::new(12)).unwrap();
    let a = node(&net, A, NodeConfig::default()).await;
    let mut config = NodeConfig::default();
    config.dead_letter_dir = Some(dir.path().to_path_buf());
    let b = node(&net, B, config.clone()).await;
    let mut inbox = b
        .receiver_with::<u64>(CH, ReceiverOptions::unordered().max_deliveries(Some(1)))
        .unwrap();
    let out = a
        .sender::<u64>(B, ChannelOptions::new(CH, Guarantee::AtLeastOnce))
        .unwrap();
    for n in 0..3u64 {
        let r = out.send(&(100 + n)).await.unwrap();
        within(inbox.recv()).await.unwrap().nack();
        assert_eq!(
            within(r).await,
            Err(SendError::Rejected {
                reason: RejectReason::DeadLettered
            })
        );
    }
    // Take one: it leaves the log.
    let first = b.dead_letters().try_recv().unwrap();
    assert_eq!(&first.message[..], &[100]);
    drop(inbox);
    b.shutdown().await;
    drop(b);

    let b = node(&net, NodeId(3), config.clone()).await;
    let mut dead = b.dead_letters();
    let mut got = Vec::new();
    while let Some(letter) = dead.try_recv() {
        assert_eq!(letter.reason, DeadLetterReason::MaxDeliveries);
        assert_eq!(
            (letter.from, letter.channel, letter.deliveries),
            (a.origin(), CH, 1)
        );
        got.push(letter.message[0]);
    }
    assert_eq!(got, [101, 102], "the letters not taken, in order");
    b.shutdown().await;
    drop(b);

    // Nothing left now; write two more, then tear the last record.
    let b = node(&net, NodeId(4), config.clone()).await;
    assert!(
        b.dead_letters().try_recv().is_none(),
        "taken letters stay taken"
    );
    let mut inbox = b
        .receiver_with::<u64>(CH, ReceiverOptions::unordered().max_deliveries(Some(1)))
        .unwrap();
    let out = a
        .sender::<u64>(NodeId(4), ChannelOptions::new(CH, Guarantee::AtLeastOnce))
        .unwrap();
    for n in 0..2u64 {
        let r = out.send(&(110 + n)).await.unwrap();
        within(inbox.recv()).await.unwrap().nack();
        assert!(within(r).await.is_err());
    }
    drop(inbox);
    b.shutdown().await;
    drop(b);
    let mut segments: Vec<_> = walk(dir.path())
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .collect();
    segments.sort();
    let last = segments.last().expect("a segment file").clone();
    let len = std::fs::metadata(&last).unwrap().len();
    let f = std::fs::OpenOptions::new().write(true).open(&last).unwrap();
    f.set_len(len - 3).unwrap();
    drop(f);
    let b = node(&net, NodeId(5), config).await;
    let mut dead = b.dead_letters();
    let mut got = Vec::new();
    while let Some(letter) = dead.try_recv() {
        got.push(letter.message[0]);
    }
    assert_eq!(got, [110], "the intact record survives the torn one");
    report(
        "rejections",
        "durable dead letters: restart, a letter taken before it, a torn last record",
        "1",
        "untaken letters come back in order with sender, count and reason; a torn record loses only itself",
    );
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// At the key table's memory budget a keyed message is refused with a typed reason the
/// sender sees at once (`KeyTableFull`), counted, never processed; once the horizon has
/// passed the same keys go through.
#[tokio::test(start_paused = true)]
async fn a_full_key_table_rejects_typed_and_the_key_can_be_resent_later() {
    let net = MemNetwork::new(FaultPlan::new(5)).unwrap();
    let a = node(&net, A, NodeConfig::default()).await;
    let mut small = NodeConfig::default();
    // A fixed table of 64 slots.
    small.dedup.table_capacity = 64;
    small.dedup.table_budget_bytes = 64 * ackwire::dedup::BYTES_PER_SLOT;
    let b = node(&net, B, small).await;
    let mut inbox = b.receiver::<u64>(CH, false).unwrap();
    let processed = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let p = processed.clone();
    tokio::spawn(async move {
        while let Some(d) = inbox.recv().await {
            p.lock().unwrap().push(*d.message());
            d.ack();
        }
    });
    let out = a
        .sender::<u64>(B, ChannelOptions::new(CH, Guarantee::EffectivelyOnce))
        .unwrap();
    let mut receipts = Vec::new();
    for k in 0..200u64 {
        receipts.push((
            k,
            out.send_with_key(&k, IdKey(1000 + u128::from(k)))
                .await
                .unwrap(),
        ));
    }
    let (mut acked, mut refused) = (Vec::new(), Vec::new());
    for (k, r) in receipts {
        match within(r).await {
            Ok(Outcome::Acked) => acked.push(k),
            Err(SendError::Rejected {
                reason: RejectReason::KeyTableFull,
            }) => refused.push(k),
            other => panic!("key {k}: {other:?}"),
        }
    }
    assert!(
        !refused.is_empty() && acked.len() >= 32,
        "{} acked, {} refused",
        acked.len(),
        refused.len()
    );
    let mut seen = processed.lock().unwrap().clone();
    seen.sort_unstable();
    assert_eq!(
        seen, acked,
        "exactly the acked keys were processed, once each"
    );
    let stats = b.stats().await.unwrap();
    assert!(stats.proto.dedup_refused >= refused.len() as u64);
    // After the dedup horizon (2 min) the completed keys have expired: refused keys go
    // through when resent (as many as the small table holds at once).
    tokio::time::sleep(Duration::from_secs(130)).await;
    for &k in refused.iter().take(16) {
        let r = out
            .send_with_key(&k, IdKey(1000 + u128::from(k)))
            .await
            .unwrap();
        assert_eq!(within(r).await, Ok(Outcome::Acked), "key {k} resent");
    }
    assert_eq!(processed.lock().unwrap().len(), acked.len() + 16);
    report(
        "dedup",
        "application keys beyond the key table's memory budget (64-slot table, 200 keys)",
        "1",
        "refused keys fail Rejected(KeyTableFull) at once, were never processed, and go through when resent after the horizon",
    );
}
