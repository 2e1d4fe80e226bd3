//! Property-test twin of the `peer_trust` fuzz target (`fuzz/fuzz_targets/peer_trust.rs`):
//! the same `ackwire::fuzzing` wrapper, which panics on a violated invariant, on
//! arbitrary bytes and on structured data frames whose ids name a few node ids, so that
//! "names the connection's own node" and "names another node" both occur often.

mod support;

use ackwire::fuzzing::{check_authorization, fuzz_peer_trust};
use ackwire::wire::{encode, Frame};
use ackwire::{ChannelId, MessageId, NodeId, Origin};
use bytes::BytesMut;
use proptest::prelude::*;
use support::strategies;

/// An id naming node 0..4 (or an application key).
fn close_id() -> impl Strategy<Value = Option<MessageId>> {
    proptest::option::of(prop_oneof![
        (0u64..4, any::<u64>(), any::<u32>(), any::<u64>()).prop_map(|(n, inc, c, seq)| {
            MessageId::Seq {
                origin: Origin {
                    node: NodeId(n),
                    incarnation: inc,
                },
                channel: ChannelId(c),
                seq,
            }
        }),
        strategies::message_id(),
    ])
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn peer_trust_arbitrary_bytes_never_panic(
        bytes in proptest::collection::vec(any::<u8>(), 0..2048)
    ) {
        fuzz_peer_trust(&bytes);
    }

    #[test]
    fn authorization_rule_holds_for_every_data_frame(
        peer in 0u64..4,
        frame in strategies::data(32),
        id in close_id(),
    ) {
        let Frame::Data(mut d) = frame else { unreachable!("data() yields data frames") };
        d.id = id;
        check_authorization(NodeId(peer), &d);
        // The same frame through the fuzz entry's decode path: mode 0, peer byte, body.
        let mut wire = BytesMut::new();
        encode(&Frame::Data(d), &mut wire).unwrap();
        let body = &wire[8..];
        if body.len() < 256 {
            let mut input = vec![0u8, peer as u8, body.len() as u8];
            input.extend_from_slice(body);
            prop_assert_eq!(fuzz_peer_trust(&input), 1);
        }
    }
}
