//! Codecs of typed channels (`ackwire::codec`) between real nodes over the in-memory
//! transport: each codec round-trips, a codec mismatch is caught by the type check, a
//! hand-written codec works, and the default codec's type fingerprint on the wire is
//! the one earlier releases sent.

use ackwire::codec::{fingerprint, Bincode, Codec, CodecError, Decode, Encode, Postcard};
use ackwire::transport::mem::{FaultPlan, MemNetwork, MemTransport};
use ackwire::transport::{Link, LinkCommand, Transport, TransportError};
use ackwire::wire::{Frame, RejectReason};
use ackwire::{
    ChannelId, ChannelOptions, DeadLetterReason, Guarantee, Node, NodeId, Origin, Outcome,
    ReceiverOptions, SendError,
};
use futures::{SinkExt, StreamExt};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;

const A: NodeId = NodeId(1);
const B: NodeId = NodeId(2);
const CH: ChannelId = ChannelId(5);

#[derive(serde::Serialize, serde::Deserialize, Debug, Clone, PartialEq)]
struct Order {
    id: u64,
    item: String,
    lines: Vec<(u32, i64)>,
    note: Option<String>,
}

fn order(id: u64) -> Order {
    Order {
        id,
        item: format!("item {id}"),
        lines: vec![(1, -5), (300, 70_000)],
        note: id.is_multiple_of(2).then(|| "even".to_string()),
    }
}

fn opts() -> ChannelOptions {
    ChannelOptions {
        deadline: Some(Duration::from_secs(5)),
        ..ChannelOptions::new(CH, Guarantee::AtLeastOnce)
    }
}

/// A mem transport that records the `schema` of every data frame its node sends.
#[derive(Debug)]
struct Tap {
    inner: MemTransport,
    schemas: Arc<Mutex<Vec<u32>>>,
}

impl Transport for Tap {
    fn start(self: Box<Self>, local: Origin) -> Result<Link, TransportError> {
        let inner = Box::new(self.inner).start(local)?;
        let (tx, mut rx) = mpsc::channel::<LinkCommand>(64);
        let schemas = self.schemas;
        let forward = inner.commands;
        tokio::spawn(async move {
            while let Some(cmd) = rx.recv().await {
                if let LinkCommand::Send { frames, .. } = &cmd {
                    let mut seen = schemas.lock().unwrap();
                    for f in frames {
                        if let Frame::Data(d) = f {
                            seen.push(d.schema);
                        }
                    }
                }
                if forward.send(cmd).await.is_err() {
                    break;
                }
            }
        });
        Ok(Link {
            commands: tx,
            events: inner.events,
            local_addr: inner.local_addr,
        })
    }

    fn dials_by_id(&self) -> bool {
        true
    }
}

/// Node A (its sent data frames' schemas recorded) and node B on one mem network.
async fn pair() -> (Node, Node, Arc<Mutex<Vec<u32>>>) {
    let net = MemNetwork::new(FaultPlan::new(7)).unwrap();
    let schemas = Arc::new(Mutex::new(Vec::new()));
    let a = Node::builder(A)
        .transport(Tap {
            inner: net.transport(A),
            schemas: schemas.clone(),
        })
        .seed(1)
        .build()
        .await
        .unwrap();
    let b = Node::builder(B)
        .transport(net.transport(B))
        .seed(2)
        .build()
        .await
        .unwrap();
    (a, b, schemas)
}

async fn within<F: std::future::Future>(f: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(60), f)
        .await
        .expect("timed out")
}

/// The fingerprint as every release before codecs computed it: the crc32c of the type
/// name without module paths (never 0).
fn old_fingerprint(short_name: &str) -> u32 {
    match crc32c::crc32c(short_name.as_bytes()) {
        0 => 1,
        h => h,
    }
}

#[tokio::test(start_paused = true)]
async fn default_codec_round_trips_with_the_fingerprint_earlier_releases_sent() {
    let (a, b, schemas) = pair().await;
    // The API that predates codecs: `sender::<T>` / `receiver::<T>`, bincode.
    let mut inbox = b.receiver::<Order>(CH, false).unwrap();
    let out = a.sender::<Order>(B, opts()).unwrap();
    let receipt = out.send(&order(1)).await.unwrap();
    let d = within(inbox.recv()).await.unwrap();
    assert_eq!(d.message(), &order(1));
    d.ack();
    assert_eq!(within(receipt).await, Ok(Outcome::Acked));

    let want = old_fingerprint("Order");
    assert_eq!(fingerprint::<Order, Bincode>(), want);
    assert_eq!(
        fingerprint::<Vec<Order>, Bincode>(),
        old_fingerprint("Vec<Order>")
    );
    let seen = schemas.lock().unwrap().clone();
    assert!(!seen.is_empty());
    assert!(seen.iter().all(|s| *s == want), "{seen:x?} vs {want:x}");
    // Same bytes as bincode 2 (standard config) has always produced.
    assert_eq!(
        Bincode.encode(&order(1)).unwrap(),
        bincode::serde::encode_to_vec(order(1), bincode::config::standard()).unwrap()
    );
}

#[tokio::test(start_paused = true)]
async fn postcard_round_trips_through_send_sink_and_stream() {
    let (a, b, schemas) = pair().await;
    let mut inbox = b
        .receiver_with_codec::<Order, _>(CH, ReceiverOptions::default(), Postcard)
        .unwrap();
    // The receiver as a stream: ten orders, each acked.
    let consumer = tokio::spawn(async move {
        let mut got = Vec::new();
        while got.len() < 10 {
            let d = inbox.next().await.unwrap();
            got.push(d.message().clone());
            d.ack();
        }
        (got, inbox)
    });
    let out = a
        .sender_with_codec::<Order, _>(B, opts(), Postcard)
        .unwrap();
    let first = out.send(&order(1)).await.unwrap();
    // The sender as a sink (same codec); `send` and `close` wait for the acks.
    let mut sink = out.sink();
    within(sink.send(order(2))).await.unwrap();
    within(sink.send_all(&mut futures::stream::iter((3..=10).map(order).map(Ok))))
        .await
        .unwrap();
    within(sink.close()).await.unwrap();
    assert_eq!(sink.settled(), 9);
    assert_eq!(within(first).await, Ok(Outcome::Acked));
    let (mut got, mut inbox) = within(consumer).await.unwrap();
    got.sort_by_key(|o| o.id);
    assert_eq!(got, (1..=10).map(order).collect::<Vec<_>>());

    // The sender as a tower service encodes with its codec too.
    let mut svc = out.service();
    let outcome = tokio::spawn(async move {
        use tower::{Service, ServiceExt};
        svc.ready().await?.call(order(11)).await
    });
    let d = within(inbox.recv()).await.unwrap();
    assert_eq!(d.message(), &order(11));
    d.ack();
    assert_eq!(within(outcome).await.unwrap(), Ok(Outcome::Acked));
    let want = fingerprint::<Order, Postcard>();
    assert_eq!(want, old_fingerprint("postcard:Order"));
    assert!(schemas.lock().unwrap().iter().all(|s| *s == want));
    assert_eq!(b.stats().await.unwrap().decode_failed, 0);
}

#[tokio::test(start_paused = true)]
async fn a_postcard_sender_to_a_bincode_receiver_is_a_type_mismatch() {
    let (a, b, _) = pair().await;
    let mut inbox = b.receiver::<u64>(CH, false).unwrap();
    // 5 is the byte 0x05 in both formats: only the fingerprint tells them apart.
    let postcard = a.sender_with_codec::<u64, _>(B, opts(), Postcard).unwrap();
    let receipt = postcard.send(&5).await.unwrap();
    assert_eq!(
        within(receipt).await,
        Err(SendError::Rejected {
            reason: RejectReason::TypeMismatch
        })
    );
    let got = tokio::time::timeout(Duration::from_secs(1), inbox.recv()).await;
    assert!(got.is_err(), "delivered across codecs: {got:?}");
    assert_eq!(b.stats().await.unwrap().proto.type_mismatches, 1);

    // Without the type check the receiver's decoder is the last line: 300 is
    // [0xAC, 0x02] in postcard, which bincode reads as 172 and one byte over.
    let unchecked = a
        .sender_with_codec::<u64, _>(B, opts(), Postcard)
        .unwrap()
        .without_type_check();
    let receipt = unchecked.send(&300).await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(1), inbox.recv()).await;
    assert!(got.is_err(), "{got:?}");
    assert_eq!(
        within(receipt).await,
        Err(SendError::Rejected {
            reason: RejectReason::Undecodable
        })
    );
    let stats = b.stats().await.unwrap();
    assert_eq!(stats.decode_failed, 1, "{stats:?}");
    let letter = b.dead_letters().try_recv().expect("a dead letter");
    assert_eq!(letter.reason, DeadLetterReason::Undecodable);
    assert_eq!(&letter.message[..], &[0xAC, 0x02]);

    // The channel still takes bincode `u64`s.
    let right = a.sender::<u64>(B, opts()).unwrap();
    let receipt = right.send(&300).await.unwrap();
    let d = within(inbox.recv()).await.unwrap();
    assert_eq!(*d.message(), 300);
    d.ack();
    assert_eq!(within(receipt).await, Ok(Outcome::Acked));
}

/// A codec the application writes itself: a temperature in centi-degrees as a signed
/// big-endian `i32`, exactly four bytes.
#[derive(Clone, Copy, Debug, Default)]
struct CentiDegrees;

#[derive(Debug, PartialEq, Clone, Copy)]
struct Celsius(f64);

impl Codec for CentiDegrees {
    const NAME: &'static str = "centi-degrees-be";
}

impl Encode<Celsius> for CentiDegrees {
    fn encode(&self, value: &Celsius) -> Result<Vec<u8>, CodecError> {
        let centi = (value.0 * 100.0).round();
        if !(f64::from(i32::MIN)..=f64::from(i32::MAX)).contains(&centi) {
            return Err(CodecError::msg(format!("{} °C is out of range", value.0)));
        }
        Ok((centi as i32).to_be_bytes().to_vec())
    }
}

impl Decode<Celsius> for CentiDegrees {
    fn decode(&self, payload: &[u8]) -> Result<Celsius, CodecError> {
        let Some(head) = payload.first_chunk::<4>() else {
            return Err(CodecError::msg(format!("{} bytes, want 4", payload.len())));
        };
        let value = Celsius(f64::from(i32::from_be_bytes(*head)) / 100.0);
        CodecError::whole(value, 4, payload.len())
    }
}

mod serde_celsius {
    #[derive(serde::Serialize)]
    pub(crate) struct Celsius(pub(crate) f64);
}

#[tokio::test(start_paused = true)]
async fn a_hand_written_codec_works_and_is_type_checked() {
    let (a, b, schemas) = pair().await;
    let mut inbox = b
        .receiver_with_codec::<Celsius, _>(CH, ReceiverOptions::default(), CentiDegrees)
        .unwrap();
    let out = a
        .sender_with_codec::<Celsius, _>(B, opts(), CentiDegrees)
        .unwrap();
    let receipts = out
        .send_many(&[Celsius(21.5), Celsius(-40.25)])
        .await
        .unwrap();
    let mut got = Vec::new();
    while got.len() < 2 {
        let d = within(inbox.recv()).await.unwrap();
        got.push(*d.message());
        d.ack();
    }
    got.sort_by(|x, y| x.0.total_cmp(&y.0));
    assert_eq!(got, [Celsius(-40.25), Celsius(21.5)]);
    for r in receipts {
        assert_eq!(within(r).await, Ok(Outcome::Acked));
    }
    assert_eq!(
        schemas.lock().unwrap().first(),
        Some(&old_fingerprint("centi-degrees-be:Celsius"))
    );

    // An encoding error fails the send before anything is sent.
    match out.send(&Celsius(1e12)).await {
        Err(SendError::Encode(why)) => {
            assert!(why.to_string().contains("out of range"), "{why}");
            // The codec's error is kept typed, and is the send error's source.
            let err = SendError::Encode(why.clone());
            let source = std::error::Error::source(&err).expect("a source");
            assert_eq!(source.to_string(), why.to_string());
        }
        other => panic!("{other:?}"),
    }

    // A bincode sender of a type named `Celsius` is another codec: refused unread.
    let bincode = a.sender::<serde_celsius::Celsius>(B, opts()).unwrap();
    let receipt = bincode.send(&serde_celsius::Celsius(3.0)).await.unwrap();
    assert_eq!(
        within(receipt).await,
        Err(SendError::Rejected {
            reason: RejectReason::TypeMismatch
        })
    );
}
