//! How typed channels turn values into payloads and back: the [`Codec`] trait (with its
//! [`Encode`] and [`Decode`] halves), [`Bincode`] (the default) and, with the feature
//! `postcard`, `Postcard`.
//!
//! Owns the value ↔ payload step of [`Sender`](crate::Sender) and
//! [`Receiver`](crate::Receiver) only; frames, headers and checksums are the wire
//! codec's ([`crate::wire`]), and raw senders and receivers carry their bytes untouched.
//!
//! # The codec and the type check
//!
//! The codec is not negotiated: both ends of a channel must use the same one, as they
//! must agree on the type. A typed sender puts a fingerprint of its type *and codec* in
//! every data frame ([`fingerprint`]), and a typed receiver whose fingerprint differs
//! rejects the message before decoding it
//! ([`RejectReason::TypeMismatch`](crate::RejectReason::TypeMismatch)): a postcard
//! sender of `Order` and a bincode receiver of `Order` do not silently decode each
//! other's bytes (small integers and strings even look the same in both formats). For
//! [`Bincode`] the fingerprint is the one typed channels always sent, so nodes of
//! earlier releases still interoperate with the default codec.
//!
//! # Writing a codec
//!
//! A codec is a small `Clone` value (usually a unit struct) with a stable
//! [`Codec::NAME`], implementing [`Encode<T>`] for the types it can send and
//! [`Decode<T>`] for those it can receive. The two halves are separate traits so that a
//! serde codec asks only `T: Serialize` of senders and only `T: DeserializeOwned` of
//! receivers, as `Node::sender` and `Node::receiver` always did. `decode` gets the whole
//! payload and must refuse bytes left over: that is what keeps a value of another type
//! from being delivered as a `T`.
//!
//! ```
//! use ackwire::codec::{Codec, CodecError, Decode, Encode};
//!
//! /// A `u32` as exactly four little-endian bytes.
//! #[derive(Clone, Copy, Debug, Default)]
//! struct LeU32;
//!
//! impl Codec for LeU32 {
//!     const NAME: &'static str = "le-u32";
//! }
//! impl Encode<u32> for LeU32 {
//!     fn encode(&self, value: &u32) -> Result<Vec<u8>, CodecError> {
//!         Ok(value.to_le_bytes().to_vec())
//!     }
//! }
//! impl Decode<u32> for LeU32 {
//!     fn decode(&self, payload: &[u8]) -> Result<u32, CodecError> {
//!         let bytes: [u8; 4] = payload
//!             .try_into()
//!             .map_err(|_| CodecError::msg(format!("{} bytes, want 4", payload.len())))?;
//!         Ok(u32::from_le_bytes(bytes))
//!     }
//! }
//!
//! assert_eq!(LeU32.decode(&LeU32.encode(&7).unwrap()).unwrap(), 7);
//! assert!(LeU32.decode(&[1, 2, 3, 4, 5]).is_err());
//! // Used as `node.sender_with_codec::<u32, _>(peer, options, LeU32)` and
//! // `node.receiver_with_codec::<u32, _>(channel, ReceiverOptions::default(), LeU32)`.
//! ```

use serde::de::DeserializeOwned;
use serde::Serialize;
use std::error::Error as StdError;
use std::fmt;

/// A codec for typed channels: its identity. What it encodes and decodes is given by
/// [`Encode<T>`] and [`Decode<T>`]; see the [module docs](self) for an example.
///
/// A codec is a plain value handed to `Node::sender_with_codec` /
/// `Node::receiver_with_codec` and kept (cloned) by every sender, sink and service made
/// from it.
pub trait Codec: Clone + Send + Sync + Unpin + 'static {
    /// A short, stable name for the payload format (`"bincode"`, `"postcard"`). It is
    /// folded into the type fingerprint of every message (see [`fingerprint`]), so a
    /// sender and a receiver with codecs of different names never decode each other's
    /// payloads. Change it only when the format changes. The name `"bincode"` means
    /// "bincode 2, standard config, through serde": another codec may use it only if its
    /// bytes are exactly those.
    const NAME: &'static str;
}

/// The sending half of a [`Codec`]: `T` as one payload.
pub trait Encode<T: ?Sized>: Codec {
    /// `value` as one payload. An error fails the send with
    /// [`SendError::Encode`](crate::SendError::Encode) before anything is sent.
    fn encode(&self, value: &T) -> Result<Vec<u8>, CodecError>;
}

/// The receiving half of a [`Codec`]: one payload as a `T`.
pub trait Decode<T>: Codec {
    /// The whole `payload` as a `T`. Bytes left over after the value are an error
    /// ([`CodecError::TrailingBytes`]), not ignored. An error is never delivered: the
    /// message is counted in `Stats::decode_failed`, dead-lettered, and its sender's
    /// receipt fails with `Rejected { reason: Undecodable }`.
    fn decode(&self, payload: &[u8]) -> Result<T, CodecError>;
}

/// A value could not be encoded, or a payload could not be decoded.
#[derive(Debug)]
#[non_exhaustive]
pub enum CodecError {
    /// The payload held a whole value and then `total - used` more bytes: most likely
    /// a value of another type.
    TrailingBytes {
        /// Bytes the value took.
        used: usize,
        /// Bytes in the payload.
        total: usize,
    },
    /// The format's own error (bincode's, postcard's, a custom codec's).
    Format(Box<dyn StdError + Send + Sync + 'static>),
    /// A plain message, for codecs with no error type of their own.
    Message(String),
}

impl CodecError {
    /// An error with only a message.
    pub fn msg(message: impl Into<String>) -> Self {
        CodecError::Message(message.into())
    }

    /// Wrap a format's error.
    pub fn format(error: impl StdError + Send + Sync + 'static) -> Self {
        CodecError::Format(Box::new(error))
    }

    /// `Ok(value)` if the value took the whole payload, else
    /// [`CodecError::TrailingBytes`]: the check every [`Decode`] impl makes.
    pub fn whole<T>(value: T, used: usize, total: usize) -> Result<T, CodecError> {
        if used == total {
            Ok(value)
        } else {
            Err(CodecError::TrailingBytes { used, total })
        }
    }
}

impl fmt::Display for CodecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CodecError::TrailingBytes { used, total } => write!(
                f,
                "{} trailing bytes after the value ({used} of {total} bytes used)",
                total.saturating_sub(*used)
            ),
            CodecError::Format(e) => fmt::Display::fmt(e, f),
            CodecError::Message(m) => f.write_str(m),
        }
    }
}

/// Two codec errors are equal if they are the same kind and say the same (a format's
/// own error is compared by its message: `dyn Error` has no `==`). Lets
/// [`SendError`](crate::SendError), which carries one, be compared in tests.
impl PartialEq for CodecError {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (
                CodecError::TrailingBytes { used, total },
                CodecError::TrailingBytes {
                    used: u2,
                    total: t2,
                },
            ) => used == u2 && total == t2,
            (CodecError::Format(a), CodecError::Format(b)) => a.to_string() == b.to_string(),
            (CodecError::Message(a), CodecError::Message(b)) => a == b,
            _ => false,
        }
    }
}

impl Eq for CodecError {}

impl StdError for CodecError {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        match self {
            // The format's error is displayed as this error, so its cause comes next.
            CodecError::Format(e) => e.source(),
            _ => None,
        }
    }
}

/// bincode 2 with its standard config (varint integers), through serde: the default
/// codec of `Node::sender` and `Node::receiver`, and the payload format of every typed
/// channel before codecs could be chosen.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Bincode;

impl Codec for Bincode {
    const NAME: &'static str = "bincode";
}

impl<T: Serialize + ?Sized> Encode<T> for Bincode {
    #[inline]
    fn encode(&self, value: &T) -> Result<Vec<u8>, CodecError> {
        bincode::serde::encode_to_vec(value, bincode::config::standard())
            .map_err(CodecError::format)
    }
}

impl<T: DeserializeOwned> Decode<T> for Bincode {
    #[inline]
    fn decode(&self, payload: &[u8]) -> Result<T, CodecError> {
        // A length prefix is a claim on memory, and it comes from the network: without
        // a limit, a 9-byte payload announcing a 2^64-byte string made bincode panic
        // ("capacity overflow") in the application's receive loop, and 2^40 would abort
        // the process on a failed allocation (tests/hostile_payloads.rs). The limit is
        // what a payload of this size can honestly ask for: 64 bytes of memory per
        // payload byte (a String asks 1, a Vec<String> of empty strings 24), rounded
        // up to a bucket, at least 1 MiB. Beyond it the payload is undecodable.
        let cfg = bincode::config::standard();
        let (value, used) = match payload.len() {
            0..=16_384 => {
                bincode::serde::decode_from_slice::<T, _>(payload, cfg.with_limit::<{ 1 << 20 }>())
            }
            16_385..=262_144 => {
                bincode::serde::decode_from_slice::<T, _>(payload, cfg.with_limit::<{ 16 << 20 }>())
            }
            262_145..=4_194_304 => bincode::serde::decode_from_slice::<T, _>(
                payload,
                cfg.with_limit::<{ 256 << 20 }>(),
            ),
            _ => bincode::serde::decode_from_slice::<T, _>(
                payload,
                cfg.with_limit::<{ i32::MAX as usize }>(),
            ),
        }
        .map_err(CodecError::format)?;
        CodecError::whole(value, used, payload.len())
    }
}

/// [postcard](https://docs.rs/postcard) through serde (feature `postcard`): compact
/// (LEB128 varints), stable, `no_std`-friendly, so embedded peers can speak it.
#[cfg(feature = "postcard")]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Postcard;

#[cfg(feature = "postcard")]
impl Codec for Postcard {
    const NAME: &'static str = "postcard";
}

#[cfg(feature = "postcard")]
impl<T: Serialize + ?Sized> Encode<T> for Postcard {
    fn encode(&self, value: &T) -> Result<Vec<u8>, CodecError> {
        postcard::to_allocvec(value).map_err(CodecError::format)
    }
}

#[cfg(feature = "postcard")]
impl<T: DeserializeOwned> Decode<T> for Postcard {
    fn decode(&self, payload: &[u8]) -> Result<T, CodecError> {
        let (value, rest) = postcard::take_from_bytes::<T>(payload).map_err(CodecError::format)?;
        CodecError::whole(value, payload.len() - rest.len(), payload.len())
    }
}

/// The payload type fingerprint a typed sender of `T` with codec `C` puts in every data
/// frame ([`wire::Data::schema`](crate::wire::Data::schema)), and a typed receiver of
/// `T` with `C` expects (never 0: 0 means "unchecked").
///
/// It is the crc32c of `T`'s name without module paths (`Payment`, `Vec<Order>`): for
/// [`Bincode`] exactly that, as typed channels have always sent; for any other codec
/// the crc32c of `"<C::NAME>:<name>"`, so the codec takes part in the check.
///
/// ```
/// use ackwire::codec::{fingerprint, Bincode};
/// assert_eq!(fingerprint::<u64, Bincode>(), crc32c::crc32c(b"u64"));
/// # #[cfg(feature = "postcard")]
/// assert_ne!(fingerprint::<u64, ackwire::codec::Postcard>(), fingerprint::<u64, Bincode>());
/// ```
pub fn fingerprint<T: ?Sized, C: Codec>() -> u32 {
    crate::node::typecheck::fingerprint::<T>(C::NAME)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Serialize, serde::Deserialize, Debug, PartialEq)]
    struct Order {
        id: u64,
        item: String,
        qty: Option<u32>,
    }

    fn order() -> Order {
        Order {
            id: 300,
            item: "tea".into(),
            qty: Some(2),
        }
    }

    fn round_trips_and_refuses_extra<C: Encode<Order> + Decode<Order> + Decode<u64>>(c: C) {
        let bytes = c.encode(&order()).unwrap();
        assert_eq!(Decode::<Order>::decode(&c, &bytes).unwrap(), order());
        let mut longer = bytes.clone();
        longer.push(0);
        let err = Decode::<Order>::decode(&c, &longer).unwrap_err();
        assert!(
            matches!(err, CodecError::TrailingBytes { used, total } if used == bytes.len() && total == bytes.len() + 1),
            "{err:?}"
        );
        // An `Order` read as a `u64` leaves bytes over.
        assert!(Decode::<u64>::decode(&c, &bytes).is_err());
        assert!(Decode::<Order>::decode(&c, &[]).is_err());
    }

    #[test]
    fn bincode_round_trips_refuses_trailing_bytes_and_is_the_old_format() {
        round_trips_and_refuses_extra(Bincode);
        let old = bincode::serde::encode_to_vec(order(), bincode::config::standard()).unwrap();
        assert_eq!(Bincode.encode(&order()).unwrap(), old);
        assert_eq!(
            CodecError::TrailingBytes { used: 3, total: 5 }.to_string(),
            "2 trailing bytes after the value (3 of 5 bytes used)"
        );
    }

    #[cfg(feature = "postcard")]
    #[test]
    fn postcard_round_trips_and_refuses_trailing_bytes() {
        round_trips_and_refuses_extra(Postcard);
        assert_ne!(
            Postcard.encode(&order()).unwrap(),
            Bincode.encode(&order()).unwrap(),
            "300 is a LEB128 varint in postcard, a 3-byte one in bincode"
        );
    }

    #[test]
    fn bincode_fingerprint_is_the_type_name_alone() {
        assert_eq!(fingerprint::<Order, Bincode>(), crc32c::crc32c(b"Order"));
        assert_eq!(
            fingerprint::<Vec<Order>, Bincode>(),
            crc32c::crc32c(b"Vec<Order>")
        );
    }

    #[cfg(feature = "postcard")]
    #[test]
    fn other_codecs_fold_their_name_in() {
        assert_eq!(
            fingerprint::<Order, Postcard>(),
            crc32c::crc32c(b"postcard:Order")
        );
        assert_ne!(
            fingerprint::<Order, Postcard>(),
            fingerprint::<Order, Bincode>()
        );
    }
}
