//! The frame codec through `tokio_util::codec` (feature `tokio-util`): frames of every
//! kind round-trip through `FramedWrite` / `FramedRead` over a byte pipe, byte for byte
//! the hand-written encoder's output, and bad input surfaces as the codec's typed error.
#![cfg(feature = "tokio-util")]

use ackwire::wire::{
    Ack, CreditProbe, Data, DecodeError, EncodeError, Finish, Frame, FrameDecoder, FrameEncoder,
    FramedError, Handshake, Heartbeat, Nack, NodeCredit, Reject, RejectReason, SeqRange,
};
use ackwire::{ChannelId, Guarantee, IdKey, MessageId, NodeId, Origin};
use bytes::{Bytes, BytesMut};
use futures::{SinkExt, StreamExt};
use tokio::io::AsyncWriteExt;
use tokio_util::codec::{FramedRead, FramedWrite};

fn frames() -> Vec<Frame> {
    let origin = Origin {
        node: NodeId(3),
        incarnation: 0xABCD,
    };
    vec![
        Frame::Handshake(Handshake { version: 3, origin }),
        Frame::Data(Data {
            channel: ChannelId(1),
            seq: 7,
            floor: 5,
            id_floor: 5,
            id: Some(MessageId::Key(IdKey(99))),
            guarantee: Guarantee::EffectivelyOnce,
            schema: 0xC0FF_EE01,
            payload: Bytes::from(vec![0xA5; 70_000]),
        }),
        Frame::Ack(Ack {
            channel: ChannelId(1),
            incarnation: 0xABCD,
            cumulative: 6,
            ranges: vec![SeqRange { start: 8, end: 9 }],
            credit: Some(4096),
            received: 3,
            held: Vec::new(),
        }),
        Frame::Nack(Nack {
            channel: ChannelId(1),
            incarnation: 0xABCD,
            seq: 7,
        }),
        Frame::Ping(Heartbeat { nonce: 1 }),
        Frame::Pong(Heartbeat { nonce: 1 }),
        Frame::CreditProbe(CreditProbe {
            channel: ChannelId(1),
        }),
        Frame::Reject(Reject {
            channel: ChannelId(1),
            incarnation: 0xABCD,
            seq: 7,
            reason: RejectReason::TypeMismatch,
        }),
        Frame::Finish(Finish {
            channel: ChannelId(1),
            last_seq: 7,
            id_floor: 5,
        }),
        Frame::NodeCredit(NodeCredit {
            limit: 1 << 20,
            received: 12,
        }),
    ]
}

#[tokio::test]
async fn every_frame_round_trips_through_framed_read_and_write() {
    // A small pipe: frames cross it in many partial reads.
    let (client, server) = tokio::io::duplex(1024);
    let sent = frames();
    let writer = {
        let sent = sent.clone();
        tokio::spawn(async move {
            let mut out = FramedWrite::new(client, FrameEncoder::default());
            for f in sent {
                out.feed(f).await.unwrap();
            }
            out.close().await.unwrap();
        })
    };
    let got: Vec<Frame> = FramedRead::new(server, FrameDecoder::default())
        .map(|r| r.unwrap())
        .collect()
        .await;
    writer.await.unwrap();
    assert_eq!(got, sent);

    // The same bytes as the hand-written encoder writes.
    let mut by_hand = BytesMut::new();
    for f in &sent {
        FrameEncoder::default().encode(f, &mut by_hand).unwrap();
    }
    let mut framed = FramedWrite::new(Vec::new(), FrameEncoder::default());
    for f in sent {
        framed.send(f).await.unwrap();
    }
    assert_eq!(framed.get_ref().as_slice(), &by_hand[..]);
}

#[tokio::test]
async fn bad_input_and_refused_frames_are_typed_errors() {
    // A flipped payload byte: the checksum catches it.
    let mut bytes = BytesMut::new();
    FrameEncoder::default()
        .encode(&Frame::Ping(Heartbeat { nonce: 9 }), &mut bytes)
        .unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    let (mut client, server) = tokio::io::duplex(64);
    client.write_all(&bytes).await.unwrap();
    drop(client);
    let mut read = FramedRead::new(server, FrameDecoder::default());
    assert!(matches!(
        read.next().await,
        Some(Err(FramedError::Decode(DecodeError::BadChecksum)))
    ));

    // A stream that ends inside a frame: an IO error, not a silent end.
    let (mut client, server) = tokio::io::duplex(64);
    client.write_all(&bytes[..5]).await.unwrap();
    drop(client);
    let mut read = FramedRead::new(server, FrameDecoder::default());
    assert!(matches!(read.next().await, Some(Err(FramedError::Io(_)))));

    // The encoder's bound and version checks.
    let mut out = FramedWrite::new(Vec::new(), FrameEncoder::new(16));
    let big = Frame::Data(Data {
        channel: ChannelId(1),
        seq: 1,
        floor: 1,
        id_floor: 1,
        id: None,
        guarantee: Guarantee::AtLeastOnce,
        schema: 0,
        payload: Bytes::from_static(&[0; 64]),
    });
    assert!(matches!(
        out.send(big).await,
        Err(FramedError::Encode(EncodeError::TooLarge { max: 16, .. }))
    ));
    assert!(out.get_ref().is_empty(), "nothing written");
    let mut v1 = FramedWrite::new(Vec::new(), FrameEncoder::default().with_version(1));
    assert!(matches!(
        v1.send(Frame::NodeCredit(NodeCredit {
            limit: 1,
            received: 0
        }))
        .await,
        Err(FramedError::Encode(EncodeError::Unsupported { .. }))
    ));
}
