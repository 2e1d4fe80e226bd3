//! The wire protocol: frame types and their byte encoding.
//!
//! Owns what goes on the wire; must not do IO. The codec (bincode 2 body, crc32c,
//! length prefix) is kept behind this module so it could be swapped.

mod codec;
mod frame;

pub use codec::{
    check_handshake, encode, DecodeError, EncodeError, FrameDecoder, FrameEncoder,
    DEFAULT_MAX_FRAME_LEN, FRAME_PREFIX_LEN, WIRE_FORMAT_VERSION,
};
pub use frame::{Ack, Data, Frame, Handshake, Heartbeat, Nack, SeqRange, PROTOCOL_VERSION};
