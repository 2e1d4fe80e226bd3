//! The wire protocol: frame types and their byte encoding.
//!
//! Owns what goes on the wire; must not do IO. The codec (bincode 2 body, crc32c,
//! length prefix) is kept behind this module so it could be swapped.

mod codec;
mod frame;
#[cfg(feature = "tokio-util")]
mod framed;
mod version;

pub use codec::{
    encode, DecodeError, EncodeError, FrameDecoder, FrameEncoder, COPY_PAYLOAD_BELOW,
    DEFAULT_MAX_FRAME_LEN, FRAME_PREFIX_LEN, WIRE_FORMAT_VERSION,
};
pub use frame::{
    Ack, CreditProbe, Data, Finish, Frame, Handshake, Heartbeat, Nack, NodeCredit, Reject,
    RejectReason, SeqRange, Settled, MAX_ACK_RANGES, MAX_HELD_RANGES,
};
#[cfg(feature = "tokio-util")]
pub use framed::FramedError;
pub use version::{
    parse_probe, probe, IncompatibleVersion, Negotiation, NegotiationError, NegotiationStep,
    UnsupportedRange, VersionRange, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION,
};
