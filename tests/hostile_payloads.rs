//! Hostile payloads to typed receivers: bytes from a raw sender (no type fingerprint,
//! so the type check cannot stop them) that announce absurd lengths or are random.
//! Property: every such message is either decoded and delivered, or rejected as
//! `Undecodable` back to its sender; the receiving application's `recv` never panics,
//! never aborts the process on a huge allocation, never loops on a sequence of
//! zero-sized values it cannot reach the end of, and keeps working afterwards.
#![cfg(not(ackwire_loom))]

mod support;

use ackwire::codec::{Decode, Encode};
use ackwire::transport::mem::{FaultPlan, MemNetwork};
use ackwire::{
    Bincode, ChannelId, ChannelOptions, Guarantee, Node, NodeId, Outcome, RejectReason, SendError,
};
use bytes::Bytes;
use proptest::prelude::*;
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Debug;
use std::sync::mpsc::RecvTimeoutError;
use std::time::Duration;
use support::pair::tcp_pair;

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

/// A recursive payload type: each level is one byte (the variant index).
#[derive(serde::Serialize, serde::Deserialize, Debug, Clone, PartialEq)]
enum Tree {
    Leaf,
    Node(Box<Tree>),
}

/// A payload of a million nested `Tree::Node`s (a million and one bytes, within the
/// default `max_payload`): rejected as undecodable, where the decode used to recurse
/// a million deep and overflow the receiving thread's stack (an abort of the whole
/// process, from 1 MB a peer sent). A shallow tree is delivered afterwards.
#[test]
fn deeply_nested_payloads_are_rejected_not_a_stack_overflow() {
    runtime().block_on(async {
        let (a, b) = nodes().await;
        let deep = [vec![1u8; 1_000_000], vec![0]].concat();
        // Deeper than the limit by one: refused too. Nested 100 deep: decoded.
        let over = [vec![1u8; 256], vec![0]].concat();
        let mut fine = Tree::Leaf;
        for _ in 0..100 {
            fine = Tree::Node(Box::new(fine));
        }
        offer::<Tree>(&a, &b, ChannelId(1), &[deep, over], fine).await;
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

// Sequences of zero-sized values. A length prefix of 2^40 `()`s claims no memory and
// each `()` reads no byte, so the byte limit never stops the decode: bincode and
// postcard looped up to 2^64 times on 9 bytes, inside `recv`, burning a worker
// thread (and freezing a current-thread runtime). The codecs count elements too.

/// A zero-sized element type of the application's own.
#[derive(serde::Serialize, serde::Deserialize, Debug, Clone, PartialEq)]
struct Marker;

/// Not zero-sized, but decoded from no bytes at all: its only field is skipped.
#[derive(serde::Serialize, serde::Deserialize, Debug, Clone, PartialEq)]
struct Cached {
    #[serde(skip)]
    cache: Vec<u8>,
}

/// A struct whose field holds a sequence of zero-sized values.
#[derive(serde::Serialize, serde::Deserialize, Debug, Clone, PartialEq)]
struct Tagged {
    id: u8,
    marks: Option<Vec<()>>,
}

/// An enum whose variants hold sequences of zero-sized values.
#[derive(serde::Serialize, serde::Deserialize, Debug, Clone, PartialEq)]
enum Event {
    Ping,
    Marks(Vec<()>),
    Spans { first: u8, markers: Vec<Marker> },
}

/// Nested structs, maps and enums, for the honest round trips.
#[derive(serde::Serialize, serde::Deserialize, Debug, Clone, PartialEq)]
struct Batch {
    name: String,
    tagged: Vec<Tagged>,
    by_key: BTreeMap<String, Vec<Event>>,
    counts: HashMap<u32, (u64, Option<String>)>,
    events: Vec<Event>,
}

/// How a codec writes a sequence length: bincode's varint (`0xFD` + u64) or
/// postcard's LEB128.
#[derive(Clone, Copy, Debug)]
enum Lengths {
    Bincode,
    #[cfg_attr(not(feature = "postcard"), allow(dead_code))]
    Postcard,
}

impl Lengths {
    fn claim(self, n: u64) -> Vec<u8> {
        match self {
            Lengths::Bincode => [vec![0xFD], n.to_le_bytes().to_vec()].concat(),
            Lengths::Postcard => {
                let (mut out, mut n) = (Vec::new(), n);
                while n >= 0x80 {
                    out.push(n as u8 | 0x80);
                    n >>= 7;
                }
                out.push(n as u8);
                out
            }
        }
    }

    /// The claims of 2^40 and of u64::MAX elements (9 bytes each in bincode).
    fn absurd(self) -> [Vec<u8>; 2] {
        [self.claim(1 << 40), self.claim(u64::MAX)]
    }
}

/// `f` on a thread of its own, given `limit` to answer: a decode that loops fails the
/// test instead of hanging it.
fn within<R: Send + 'static>(
    limit: Duration,
    what: &str,
    f: impl FnOnce() -> R + Send + 'static,
) -> R {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(limit) {
        Ok(r) => r,
        Err(RecvTimeoutError::Timeout) => panic!("{what}: no answer in {limit:?}"),
        Err(RecvTimeoutError::Disconnected) => panic!("{what}: panicked"),
    }
}

/// `payload` decoded as a `T` by `codec`: an error, within 5 s.
fn refused<T, C>(codec: C, payload: Vec<u8>)
where
    T: Debug + Send + 'static,
    C: Decode<T> + Send,
{
    let what = format!(
        "{} {} from {payload:02x?}",
        C::NAME,
        std::any::type_name::<T>()
    );
    let got = within(Duration::from_secs(5), &what, move || {
        Decode::<T>::decode(&codec, &payload)
    });
    assert!(got.is_err(), "{what}: decoded as {got:?}");
}

/// Every shape of a sequence of zero-sized values (or of values that read no byte),
/// each announcing 2^40 and 2^64 - 1 elements: refused by `codec`, promptly. The bytes before the claim (an outer
/// length of 1, a `Some`, a field, an enum variant's index) read the same in bincode
/// and postcard.
fn zst_sequences_are_refused<C>(codec: C, lengths: Lengths)
where
    C: Decode<Vec<()>>
        + Decode<Vec<Marker>>
        + Decode<Vec<Cached>>
        + Decode<BTreeSet<()>>
        + Decode<Vec<Vec<()>>>
        + Decode<Tagged>
        + Decode<BTreeMap<(), ()>>
        + Decode<Event>
        + Send,
{
    for claim in lengths.absurd() {
        refused::<Vec<()>, _>(codec.clone(), claim.clone());
        refused::<Vec<Marker>, _>(codec.clone(), claim.clone());
        refused::<Vec<Cached>, _>(codec.clone(), claim.clone());
        refused::<BTreeSet<()>, _>(codec.clone(), claim.clone());
        refused::<Vec<Vec<()>>, _>(codec.clone(), [vec![1], claim.clone()].concat());
        refused::<Tagged, _>(codec.clone(), [vec![7, 1], claim.clone()].concat());
        refused::<BTreeMap<(), ()>, _>(codec.clone(), claim.clone());
        refused::<Event, _>(codec.clone(), [vec![1], claim.clone()].concat());
        refused::<Event, _>(codec.clone(), [vec![2, 9], claim.clone()].concat());
    }
}

#[test]
fn bincode_refuses_endless_sequences_of_zero_sized_values() {
    zst_sequences_are_refused(Bincode, Lengths::Bincode);
}

#[cfg(feature = "postcard")]
#[test]
fn postcard_refuses_endless_sequences_of_zero_sized_values() {
    zst_sequences_are_refused(ackwire::codec::Postcard, Lengths::Postcard);
}

/// A format's own decoder, without ackwire's limits: what honest payloads must still
/// decode as.
trait Plain {
    fn decode<T: DeserializeOwned>(&self, bytes: &[u8]) -> T;
}

struct PlainBincode;

impl Plain for PlainBincode {
    fn decode<T: DeserializeOwned>(&self, bytes: &[u8]) -> T {
        let (value, used) =
            bincode::serde::decode_from_slice(bytes, bincode::config::standard()).unwrap();
        assert_eq!(used, bytes.len());
        value
    }
}

#[cfg(feature = "postcard")]
struct PlainPostcard;

#[cfg(feature = "postcard")]
impl Plain for PlainPostcard {
    fn decode<T: DeserializeOwned>(&self, bytes: &[u8]) -> T {
        postcard::from_bytes(bytes).unwrap()
    }
}

/// `value` encoded, then decoded by `codec`: the value itself, and what the format
/// decodes without ackwire's limits.
fn round_trips<T, C>(codec: &C, plain: &impl Plain, value: T)
where
    T: DeserializeOwned + Debug + PartialEq,
    C: Encode<T> + Decode<T>,
{
    let bytes = codec.encode(&value).unwrap();
    let got = Decode::<T>::decode(codec, &bytes)
        .unwrap_or_else(|e| panic!("{} {}: {e}", C::NAME, std::any::type_name::<T>()));
    assert_eq!(got, plain.decode::<T>(&bytes));
    assert_eq!(got, value);
}

fn batch() -> Batch {
    let tagged = |id: u8| Tagged {
        id,
        marks: id.is_multiple_of(2).then(|| vec![(); usize::from(id)]),
    };
    Batch {
        name: "nightly \u{263e}".into(),
        tagged: (0..40).map(tagged).collect(),
        by_key: (0..50u8)
            .map(|k| {
                let events = vec![
                    Event::Ping,
                    Event::Marks(vec![(); usize::from(k)]),
                    Event::Spans {
                        first: k,
                        markers: vec![Marker; usize::from(k % 7)],
                    },
                ];
                (format!("key-{k}"), events)
            })
            .collect(),
        counts: (0..100u32)
            .map(|k| {
                (
                    k,
                    (
                        u64::from(k) << 33,
                        k.is_multiple_of(3).then(|| k.to_string()),
                    ),
                )
            })
            .collect(),
        events: vec![Event::Marks(Vec::new()), Event::Ping],
    }
}

/// Honest payloads decode as before: a MiB of bytes, a thousand `()`s, nested
/// structs, maps and enums with sequences of zero-sized values in them, a string.
fn honest_payloads_round_trip<C>(codec: C, plain: impl Plain)
where
    C: Encode<Vec<u8>>
        + Decode<Vec<u8>>
        + Encode<Vec<()>>
        + Decode<Vec<()>>
        + Encode<Vec<Marker>>
        + Decode<Vec<Marker>>
        + Encode<Vec<Vec<()>>>
        + Decode<Vec<Vec<()>>>
        + Encode<Batch>
        + Decode<Batch>
        + Encode<String>
        + Decode<String>,
{
    let mib: Vec<u8> = (0..1u32 << 20).map(|i| (i * 7 % 251) as u8).collect();
    round_trips(&codec, &plain, mib);
    round_trips(&codec, &plain, vec![(); 1000]);
    round_trips(&codec, &plain, vec![Marker; 1000]);
    round_trips(&codec, &plain, vec![vec![(); 30]; 30]);
    round_trips(&codec, &plain, batch());
    round_trips(&codec, &plain, "\u{fc}n\u{ef}code ".repeat(10_000));
    // The bound: a sequence of zero-sized values longer than its payload's size allows
    // (64 elements per byte, plus 1024) is refused, even an honest one.
    let many = codec.encode(&vec![(); 1 << 20]).unwrap();
    assert!(many.len() < 8, "{many:02x?}");
    assert!(Decode::<Vec<()>>::decode(&codec, &many).is_err());
}

#[test]
fn bincode_decodes_honest_payloads_as_before() {
    honest_payloads_round_trip(Bincode, PlainBincode);
}

#[cfg(feature = "postcard")]
#[test]
fn postcard_decodes_honest_payloads_as_before() {
    honest_payloads_round_trip(ackwire::codec::Postcard, PlainPostcard);
}

/// Over TCP: a `Vec<()>` receiver gets 2^40 and 2^64 - 1 `()`s announced by a raw
/// sender. Each is rejected as undecodable to its sender, the receiver then decodes a
/// valid `Vec<()>`, and a `u64` channel on the same node is served throughout. (On
/// the current-thread runtime, a looping decode froze everything.)
#[test]
fn endless_zero_sized_sequences_over_tcp_are_rejected_and_the_node_keeps_serving() {
    within(Duration::from_secs(60), "the TCP exchange", || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(async {
                let (b, a) = tcp_pair(B, A).await;
                let mut zst = b.receiver::<Vec<()>>(ChannelId(1), false).unwrap();
                let mut numbers = b.receiver::<u64>(ChannelId(2), false).unwrap();
                let (got_zst, mut zst_seen) = tokio::sync::mpsc::unbounded_channel();
                tokio::spawn(async move {
                    while let Some(d) = zst.recv().await {
                        let (value, handle) = d.into_parts();
                        handle.ack();
                        let _ = got_zst.send(value);
                    }
                });
                let (got_number, mut numbers_seen) = tokio::sync::mpsc::unbounded_channel();
                tokio::spawn(async move {
                    while let Some(d) = numbers.recv().await {
                        let (value, handle) = d.into_parts();
                        handle.ack();
                        let _ = got_number.send(value);
                    }
                });
                let options = |channel| ChannelOptions {
                    deadline: Some(Duration::from_secs(30)),
                    ..ChannelOptions::new(channel, Guarantee::AtLeastOnce)
                };
                let raw = a.raw_sender(B, options(ChannelId(1))).unwrap();
                let typed = a.sender::<u64>(B, options(ChannelId(2))).unwrap();
                let wait = |what: String| {
                    move |r: Result<_, _>| r.unwrap_or_else(|_| panic!("{what}: no answer"))
                };
                for (i, claim) in Lengths::Bincode.absurd().into_iter().enumerate() {
                    let receipt = raw.send(Bytes::from(claim.clone())).await.unwrap();
                    let outcome = tokio::time::timeout(Duration::from_secs(20), receipt).await;
                    assert_eq!(
                        wait(format!("{claim:02x?}"))(outcome),
                        Err(SendError::Rejected {
                            reason: RejectReason::Undecodable
                        }),
                        "{claim:02x?}"
                    );
                    let n = i as u64 + 1;
                    let receipt = typed.send(&n).await.unwrap();
                    let outcome = tokio::time::timeout(Duration::from_secs(20), receipt).await;
                    assert_eq!(wait(format!("u64 {n}"))(outcome), Ok(Outcome::Acked));
                    assert_eq!(numbers_seen.recv().await, Some(n));
                }
                let valid = a.sender::<Vec<()>>(B, options(ChannelId(1))).unwrap();
                let receipt = valid.send(&vec![(); 5]).await.unwrap();
                let outcome = tokio::time::timeout(Duration::from_secs(20), receipt).await;
                assert_eq!(wait("valid Vec<()>".into())(outcome), Ok(Outcome::Acked));
                assert_eq!(zst_seen.recv().await, Some(vec![(); 5]));
                assert!(
                    zst_seen.try_recv().is_err(),
                    "a hostile payload was delivered"
                );
                a.shutdown().await;
                b.shutdown().await;
            })
    });
}
