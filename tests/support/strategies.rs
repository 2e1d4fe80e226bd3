//! proptest strategies for protocol values, shared by the codec and fuzz-twin tests.

use ackwire::wire::{Ack, CreditProbe, Data, Frame, Handshake, Heartbeat, Nack, SeqRange};
use ackwire::{ChannelId, Guarantee, IdKey, MessageId, NodeId, Origin};
use bytes::Bytes;
use proptest::prelude::*;

pub fn origin() -> impl Strategy<Value = Origin> {
    (any::<u64>(), any::<u64>()).prop_map(|(n, i)| Origin {
        node: NodeId(n),
        incarnation: i,
    })
}

pub fn message_id() -> impl Strategy<Value = MessageId> {
    prop_oneof![
        (origin(), any::<u32>(), any::<u64>()).prop_map(|(origin, c, seq)| MessageId::Seq {
            origin,
            channel: ChannelId(c),
            seq
        }),
        any::<u128>().prop_map(|k| MessageId::Key(IdKey(k))),
    ]
}

pub fn guarantee() -> impl Strategy<Value = Guarantee> {
    prop_oneof![
        Just(Guarantee::AtMostOnce),
        Just(Guarantee::AtLeastOnce),
        Just(Guarantee::EffectivelyOnce)
    ]
}

/// A `Data` frame with up to `max_payload` payload bytes.
pub fn data(max_payload: usize) -> impl Strategy<Value = Frame> {
    (
        any::<u32>(),
        any::<u64>(),
        any::<u64>(),
        any::<u64>(),
        proptest::option::of(message_id()),
        guarantee(),
        proptest::collection::vec(any::<u8>(), 0..max_payload),
    )
        .prop_map(|(c, seq, floor, id_gap, id, guarantee, payload)| {
            Frame::Data(Data {
                channel: ChannelId(c),
                seq,
                floor,
                // The id floor never exceeds the stream floor.
                id_floor: floor.saturating_sub(id_gap),
                id,
                guarantee,
                schema: 0,
                payload: Bytes::from(payload),
            })
        })
}

/// Every frame type with arbitrary field values (payloads below `max_payload` bytes,
/// acks with fewer than `max_ranges` ranges).
pub fn frame(max_payload: usize, max_ranges: usize) -> impl Strategy<Value = Frame> {
    prop_oneof![
        (any::<u16>(), origin())
            .prop_map(|(version, origin)| Frame::Handshake(Handshake { version, origin })),
        data(max_payload),
        (
            any::<u32>(),
            any::<u64>(),
            any::<u64>(),
            proptest::collection::vec((any::<u64>(), any::<u64>()), 0..max_ranges),
            (
                any::<Option<u64>>(),
                any::<u64>(),
                proptest::collection::vec(
                    (any::<u64>(), any::<u64>()),
                    0..max_ranges.min(ackwire::wire::MAX_HELD_RANGES)
                ),
            ),
        )
            .prop_map(
                |(c, incarnation, cumulative, r, (credit, received, held))| Frame::Ack(Ack {
                    channel: ChannelId(c),
                    incarnation,
                    cumulative,
                    ranges: r
                        .into_iter()
                        .map(|(start, end)| SeqRange { start, end })
                        .collect(),
                    credit,
                    received,
                    held: held
                        .into_iter()
                        .map(|(start, end)| SeqRange { start, end })
                        .collect(),
                })
            ),
        (any::<u32>(), any::<u64>(), any::<u64>()).prop_map(|(c, incarnation, seq)| {
            Frame::Nack(Nack {
                channel: ChannelId(c),
                incarnation,
                seq,
            })
        }),
        any::<u64>().prop_map(|nonce| Frame::Ping(Heartbeat { nonce })),
        any::<u64>().prop_map(|nonce| Frame::Pong(Heartbeat { nonce })),
        any::<u32>().prop_map(|c| Frame::CreditProbe(CreditProbe {
            channel: ChannelId(c)
        })),
    ]
}
