//! Hostile payloads to typed receivers: bytes from a raw sender (no type fingerprint,
//! so the type check cannot stop them) that announce absurd lengths or are random.
//! Property: every such message is either decoded and delivered, or rejected as
//! `Undecodable` back to its sender; the receiving application's `recv` never panics,
//! never aborts the process on a huge allocation and keeps working afterwards.
#![cfg(not(ackwire_loom))]

mod support;

use ackwire::transport::mem::{FaultPlan, MemNetwork};
use ackwire::{
    ChannelId, ChannelOptions, Guarantee, Node, NodeId, Outcome, RejectReason, SendError,
};
use bytes::Bytes;
use proptest::prelude::*;
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};
use std::fmt::Debug;
use std::time::Duration;

const A: NodeId = NodeId(1);
const B: NodeId = NodeId(2);

/// Varint length prefixes (bincode's standard config) that claim far more than any
/// payload holds: u64::MAX, 2^40, 2^32 - 1, and 2^31 as a u32.
fn absurd_lengths() -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for prefix in [
        [vec![0xFD], u64::MAX.to_le_bytes().to_vec()].concat(),
        [vec![0xFD], (1u64 << 40).to_le_bytes().to_vec()].concat(),
        [vec![0xFC], u32::MAX.to_le_bytes().to_vec()].concat(),
        [vec![0xFC], (1u32 << 31).to_le_bytes().to_vec()].concat(),
    ] {
        out.push(prefix.clone());
        // The same claim with a few bytes of "content" after it, and nested one
        // level (a first element whose own length is absurd).
        out.push([prefix.clone(), vec![b'x'; 16]].concat());
        out.push([vec![1], prefix].concat());
    }
    out
}

async fn nodes() -> (Node, Node) {
    let net = MemNetwork::new(FaultPlan::new(1)).unwrap();
    let build = |id: NodeId| {
        Node::builder(id)
            .transport(net.transport(id))
            .seed(id.0)
            .build()
    };
    (build(A).await.unwrap(), build(B).await.unwrap())
}

/// Send every payload raw to a `T` receiver, then one valid `T`; check each outcome.
async fn offer<T>(a: &Node, b: &Node, channel: ChannelId, payloads: &[Vec<u8>], valid: T)
where
    T: Serialize + DeserializeOwned + Debug + PartialEq + Send + Sync + 'static,
{
    let mut inbox = b.receiver::<T>(channel, false).unwrap();
    let app = tokio::spawn(async move {
        let mut got = Vec::new();
        while let Some(d) = inbox.recv().await {
            let (value, handle) = d.into_parts();
            handle.ack();
            got.push(value);
        }
        got
    });
    let options = ChannelOptions {
        deadline: Some(Duration::from_secs(30)),
        ..ChannelOptions::new(channel, Guarantee::AtLeastOnce)
    };
    let raw = a.raw_sender(B, options).unwrap();
    for p in payloads {
        let receipt = raw.send(Bytes::copy_from_slice(p)).await.unwrap();
        match tokio::time::timeout(Duration::from_secs(60), receipt).await {
            Ok(Ok(Outcome::Acked)) => {}
            Ok(Err(SendError::Rejected {
                reason: RejectReason::Undecodable,
            })) => {}
            other => panic!("payload {p:02x?}: {other:?}"),
        }
    }
    // The application's receive loop survived: a valid message still arrives.
    let typed = a.sender::<T>(B, options).unwrap();
    let receipt = typed.send(&valid).await.unwrap();
    let outcome = tokio::time::timeout(Duration::from_secs(60), receipt).await;
    assert_eq!(
        outcome.ok(),
        Some(Ok(Outcome::Acked)),
        "valid message after hostile ones"
    );
    assert!(!app.is_finished(), "the receive loop ended");
    app.abort();
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .unwrap()
}

/// Length prefixes that announce up to 2^64 elements: rejected as undecodable, no
/// panic ("capacity overflow") and no attempt to allocate what they claim.
#[test]
fn absurd_length_prefixes_are_rejected_not_allocated() {
    runtime().block_on(async {
        let (a, b) = nodes().await;
        let p = absurd_lengths();
        offer::<String>(&a, &b, ChannelId(1), &p, "ok".into()).await;
        offer::<Vec<u64>>(&a, &b, ChannelId(2), &p, vec![1, 2]).await;
        offer::<Vec<String>>(&a, &b, ChannelId(3), &p, vec!["a".into()]).await;
        offer::<HashMap<u32, String>>(&a, &b, ChannelId(4), &p, HashMap::from([(1, "x".into())]))
            .await;
        offer::<BTreeMap<String, Vec<u8>>>(&a, &b, ChannelId(5), &p, BTreeMap::new()).await;
        offer::<(String, Vec<u8>)>(&a, &b, ChannelId(6), &p, ("k".into(), vec![0])).await;
        offer::<Option<Vec<u16>>>(&a, &b, ChannelId(7), &p, Some(vec![9])).await;
        support::reliability::report(
            "hostile payloads",
            "raw payloads announcing 2^31..2^64 elements to typed receivers (String, Vec, maps, tuples, Option)",
            &format!("{} payloads x 7 types", p.len()),
            "each rejected Undecodable to its sender; recv never panicked; a valid message arrives afterwards",
        );
        a.shutdown().await;
        b.shutdown().await;
    });
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 16, ..ProptestConfig::default() })]

    /// Property: random bytes to typed receivers are decoded or rejected as
    /// undecodable, never a panic, and the receivers keep working.
    #[test]
    fn random_payloads_are_decoded_or_rejected(
        payloads in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..48), 1..8)
    ) {
        runtime().block_on(async {
            let (a, b) = nodes().await;
            offer::<Vec<String>>(&a, &b, ChannelId(1), &payloads, vec!["v".into()]).await;
            offer::<HashMap<u64, Vec<u8>>>(&a, &b, ChannelId(2), &payloads, HashMap::new()).await;
            a.shutdown().await;
            b.shutdown().await;
        });
    }
}
