//! How ackwire identities are stored: [`MessageId`] as the inbox row's key, [`IdKey`]
//! as the outbox row's key. The formats are frozen (a changed byte would make every
//! stored claim miss its duplicate); the unit tests pin them.
//!
//! Must not touch the database.

use ackwire::{ChannelId, IdKey, MessageId, NodeId, Origin};

/// Tag of an application key: `0x01` + the key's 16 bytes, big-endian (17 bytes).
const TAG_KEY: u8 = 0x01;
/// Tag of a library id: `0x02` + node (8) + incarnation (8) + channel (4) + seq (8),
/// all big-endian (29 bytes).
const TAG_SEQ: u8 = 0x02;

/// The inbox key of `id` (17 bytes for [`MessageId::Key`], 29 for [`MessageId::Seq`]).
pub fn message_id_bytes(id: MessageId) -> Vec<u8> {
    match id {
        MessageId::Key(key) => {
            let mut out = Vec::with_capacity(17);
            out.push(TAG_KEY);
            out.extend_from_slice(&key.0.to_be_bytes());
            out
        }
        MessageId::Seq {
            origin,
            channel,
            seq,
        } => {
            let mut out = Vec::with_capacity(29);
            out.push(TAG_SEQ);
            out.extend_from_slice(&origin.node.0.to_be_bytes());
            out.extend_from_slice(&origin.incarnation.to_be_bytes());
            out.extend_from_slice(&channel.0.to_be_bytes());
            out.extend_from_slice(&seq.to_be_bytes());
            out
        }
    }
}

/// The [`MessageId`] an inbox key encodes; `None` for bytes that are not one.
pub fn message_id_from_bytes(bytes: &[u8]) -> Option<MessageId> {
    let (&tag, rest) = bytes.split_first()?;
    match (tag, rest.len()) {
        (TAG_KEY, 16) => Some(MessageId::Key(IdKey(u128::from_be_bytes(
            rest.try_into().ok()?,
        )))),
        (TAG_SEQ, 28) => {
            let node = u64::from_be_bytes(rest[0..8].try_into().ok()?);
            let incarnation = u64::from_be_bytes(rest[8..16].try_into().ok()?);
            let channel = u32::from_be_bytes(rest[16..20].try_into().ok()?);
            let seq = u64::from_be_bytes(rest[20..28].try_into().ok()?);
            Some(MessageId::Seq {
                origin: Origin {
                    node: NodeId(node),
                    incarnation,
                },
                channel: ChannelId(channel),
                seq,
            })
        }
        _ => None,
    }
}

/// The outbox column of `key`: 16 bytes, big-endian.
pub(crate) fn key_bytes(key: IdKey) -> [u8; 16] {
    key.0.to_be_bytes()
}

/// The [`IdKey`] an outbox `key` column holds; `None` unless it is 16 bytes.
pub(crate) fn key_from_bytes(bytes: &[u8]) -> Option<IdKey> {
    Some(IdKey(u128::from_be_bytes(bytes.try_into().ok()?)))
}

/// A node id as stored (`BIGINT`/`INTEGER` are signed): the same 64 bits.
pub(crate) fn node_to_i64(node: NodeId) -> i64 {
    node.0 as i64
}

/// The node id a stored `target` holds (every `i64` is one).
pub(crate) fn node_from_i64(v: i64) -> NodeId {
    NodeId(v as u64)
}

/// The channel a stored `channel` holds; `None` outside `u32`.
pub(crate) fn channel_from_i64(v: i64) -> Option<ChannelId> {
    u32::try_from(v).ok().map(ChannelId)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_id_format_is_frozen() {
        let id = MessageId::Key(IdKey(0x0102_0304_0506_0708_090a_0b0c_0d0e_0f10));
        let b = message_id_bytes(id);
        assert_eq!(
            b,
            [1, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16]
        );
        assert_eq!(message_id_from_bytes(&b), Some(id));
    }

    #[test]
    fn seq_id_format_is_frozen() {
        let id = MessageId::Seq {
            origin: Origin {
                node: NodeId(7),
                incarnation: 0xaabb,
            },
            channel: ChannelId(3),
            seq: 258,
        };
        let b = message_id_bytes(id);
        let mut want = vec![2, 0, 0, 0, 0, 0, 0, 0, 7, 0, 0, 0, 0, 0, 0, 0xaa, 0xbb];
        want.extend_from_slice(&[0, 0, 0, 3, 0, 0, 0, 0, 0, 0, 1, 2]);
        assert_eq!(b, want);
        assert_eq!(message_id_from_bytes(&b), Some(id));
    }

    #[test]
    fn malformed_ids_decode_to_none() {
        for bad in [
            &[][..],
            &[1],
            &[1; 16],
            &[2; 17],
            &[3; 17],
            &[1; 18],
            &[2; 30],
        ] {
            assert_eq!(message_id_from_bytes(bad), None, "{bad:?}");
        }
        assert_eq!(key_from_bytes(&[0; 15]), None);
        assert_eq!(key_from_bytes(&[0; 16]), Some(IdKey(0)));
        assert_eq!(channel_from_i64(-1), None);
        assert_eq!(channel_from_i64(1 << 32), None);
        assert_eq!(channel_from_i64(9), Some(ChannelId(9)));
        assert_eq!(
            node_from_i64(node_to_i64(NodeId(u64::MAX))),
            NodeId(u64::MAX)
        );
    }
}
