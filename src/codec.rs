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
//! payload and must refuse bytes left over: that catches most values of another type
//! (a shorter one), not all. Neither bincode nor postcard describes its fields, so two
//! builds of a type with the same name whose fields are reordered, or whose enum gained
//! a variant in the middle, decode each other's bytes as wrong values: evolve a
//! message type by adding fields at the end, or give the new shape a new name.
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
        // byte of the largest payload in its size bucket (a String asks 1, a
        // Vec<String> of empty strings 24), so at least 1 MiB; above the default
        // `max_payload` (4 MiB) it is 2 GiB. Beyond it the payload is undecodable.
        //
        // The limit counts only claimed bytes, and a sequence of zero-sized values
        // (`Vec<()>`) claims none and reads none per element: the same 9 bytes
        // announcing 2^64 of them looped forever. So the decode also runs on a budget
        // of elements ([`budget`]).
        let cfg = bincode::config::standard();
        let budget = budget::Budget::for_payload(payload.len());
        let seed = budget.seed::<T>();
        let (value, used) = match payload.len() {
            0..=16_384 => bincode::serde::seed_decode_from_slice(
                seed,
                payload,
                cfg.with_limit::<{ 1 << 20 }>(),
            ),
            16_385..=262_144 => bincode::serde::seed_decode_from_slice(
                seed,
                payload,
                cfg.with_limit::<{ 16 << 20 }>(),
            ),
            262_145..=4_194_304 => bincode::serde::seed_decode_from_slice(
                seed,
                payload,
                cfg.with_limit::<{ 256 << 20 }>(),
            ),
            _ => bincode::serde::seed_decode_from_slice(
                seed,
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
        // `postcard::take_from_bytes`, on the element budget that stops a sequence of
        // zero-sized values from looping on an absurd length (see [`budget`]).
        use serde::de::DeserializeSeed;
        let budget = budget::Budget::for_payload(payload.len());
        let mut de = postcard::Deserializer::from_bytes(payload);
        let value = budget
            .seed::<T>()
            .deserialize(&mut de)
            .map_err(CodecError::format)?;
        let rest = de.finalize().map_err(CodecError::format)?;
        CodecError::whole(value, payload.len() - rest.len(), payload.len())
    }
}

/// The element budget of a serde decode: how many sequence elements and map entries one
/// payload may have decoded, at any depth.
///
/// A format's own limits count bytes, and a sequence of zero-sized values (`Vec<()>`,
/// `Vec<Marker>`, `BTreeSet<()>`) costs no bytes per element: its length prefix alone
/// made bincode and postcard loop up to 2^64 times on a 9-byte payload, inside the
/// application's `recv`. Here every next element or map key asked of the format takes
/// one unit from a budget shared by the whole decode (a struct's or tuple's fields
/// too, which both formats decode as sequences, and the ask that finds a sequence's
/// end), and running out is a decode error. The budget is 64 per payload byte plus
/// 1024: an element that reads a byte or more never runs it out, so only sequences of
/// elements that read none (zero-sized values, or structs whose fields are all
/// `#[serde(skip)]`) come near it (`Vec<()>` of 1 000 elements decodes from its 3
/// bytes; of 2^40, never).
///
/// It is a [`Deserializer`] wrapper (as serde_path_to_error's): every deserializer,
/// visitor, seed, and sequence, map and enum access the decode goes through is wrapped,
/// so nested sequences (`Vec<Vec<()>>`, an `Option<Vec<()>>` field, an enum variant
/// holding one) draw on the same budget.
mod budget {
    use serde::de::{
        self, DeserializeSeed, Deserializer, EnumAccess, MapAccess, SeqAccess, VariantAccess,
        Visitor,
    };
    use std::cell::Cell;
    use std::fmt;
    use std::marker::PhantomData;

    /// Elements a payload may hold per byte of it (the byte limit's ratio too: 64 bytes
    /// of memory per payload byte).
    const PER_BYTE: u64 = 64;
    /// Elements any payload may hold, however short.
    const FLOOR: u64 = 1024;

    /// How deeply one decode may nest: values inside values (a struct's field, an
    /// element, an `Option`'s content, an enum variant's), counted as the deserializer
    /// calls open at once. A recursive payload type (`enum Tree { Leaf, Node(Box<Tree>)
    /// }`) costs a byte or less per level, so without a limit a 16 MiB payload nests
    /// millions deep and the decode overflows the receiving thread's stack (an abort,
    /// not an error). 256 calls is far beyond what non-recursive types reach (a field
    /// that is a `Vec` of structs holding an `Option<String>` is 5 deep) and, at a few
    /// hundred bytes of stack per level in debug builds, well within a 2 MiB thread's.
    pub(super) const MAX_DEPTH: u32 = 256;

    /// The error of a spent budget (out of line: the loop that checks is hot).
    #[cold]
    #[inline(never)]
    fn spent<E: de::Error>() -> E {
        E::custom("more sequence elements or map entries than the payload's size allows")
    }

    /// The error of a decode nested deeper than [`MAX_DEPTH`].
    #[cold]
    #[inline(never)]
    fn too_deep<E: de::Error>() -> E {
        E::custom(format_args!(
            "values nested more than {MAX_DEPTH} deep (a recursive payload type)"
        ))
    }

    /// What is left of one decode's budget.
    pub(super) struct Budget {
        left: Cell<u64>,
        /// Deserializer calls open now (see [`MAX_DEPTH`]).
        depth: Cell<u32>,
    }

    /// One open deserializer call; closing it (drop) gives the level back.
    struct Level<'b>(&'b Cell<u32>);

    impl Drop for Level<'_> {
        #[inline]
        fn drop(&mut self) {
            self.0.set(self.0.get() - 1);
        }
    }

    impl Budget {
        /// The budget of a `len`-byte payload.
        pub(super) fn for_payload(len: usize) -> Self {
            Budget {
                left: Cell::new((len as u64).saturating_mul(PER_BYTE).saturating_add(FLOOR)),
                depth: Cell::new(0),
            }
        }

        /// One level deeper, or the error that ends the decode.
        #[inline]
        fn enter<E: de::Error>(&self) -> Result<Level<'_>, E> {
            let depth = self.depth.get();
            if depth >= MAX_DEPTH {
                return Err(too_deep());
            }
            self.depth.set(depth + 1);
            Ok(Level(&self.depth))
        }

        /// A seed that deserializes a `T` on this budget.
        pub(super) fn seed<T>(&self) -> Seed<'_, PhantomData<T>> {
            Seed {
                inner: PhantomData::<T>,
                budget: self,
            }
        }

        /// One unit, or the error that ends the decode.
        #[inline]
        fn take<E: de::Error>(&self) -> Result<(), E> {
            match self.left.get().checked_sub(1) {
                Some(left) => {
                    self.left.set(left);
                    Ok(())
                }
                None => Err(spent()),
            }
        }

        /// A format's size hint, no larger than what is left.
        #[inline]
        fn cap(&self, hint: Option<usize>) -> Option<usize> {
            hint.map(|n| n.min(usize::try_from(self.left.get()).unwrap_or(usize::MAX)))
        }
    }

    /// A seed (the payload's, an element's, a key's, a value's, a variant's) whose
    /// deserializer is wrapped.
    pub(super) struct Seed<'b, S> {
        inner: S,
        budget: &'b Budget,
    }

    impl<'de, S: DeserializeSeed<'de>> DeserializeSeed<'de> for Seed<'_, S> {
        type Value = S::Value;

        #[inline]
        fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<S::Value, D::Error> {
            self.inner.deserialize(Wrap {
                inner: deserializer,
                budget: self.budget,
            })
        }
    }

    /// A deserializer whose visitors are wrapped.
    struct Wrap<'b, D> {
        inner: D,
        budget: &'b Budget,
    }

    impl<'b, D> Wrap<'b, D> {
        #[inline]
        fn visitor<V>(&self, inner: V) -> Visit<'b, V> {
            Visit {
                inner,
                budget: self.budget,
            }
        }
    }

    macro_rules! forward_deserialize {
        ($($method:ident)*) => {$(
            #[inline]
            fn $method<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, D::Error> {
                let _level = self.budget.enter()?;
                let visitor = self.visitor(visitor);
                self.inner.$method(visitor)
            }
        )*};
    }

    impl<'de, D: Deserializer<'de>> Deserializer<'de> for Wrap<'_, D> {
        type Error = D::Error;

        forward_deserialize! {
            deserialize_any deserialize_bool
            deserialize_i8 deserialize_i16 deserialize_i32 deserialize_i64 deserialize_i128
            deserialize_u8 deserialize_u16 deserialize_u32 deserialize_u64 deserialize_u128
            deserialize_f32 deserialize_f64 deserialize_char
            deserialize_str deserialize_string deserialize_bytes deserialize_byte_buf
            deserialize_option deserialize_unit deserialize_seq deserialize_map
            deserialize_identifier deserialize_ignored_any
        }

        #[inline]
        fn deserialize_unit_struct<V: Visitor<'de>>(
            self,
            name: &'static str,
            visitor: V,
        ) -> Result<V::Value, D::Error> {
            let _level = self.budget.enter()?;
            let visitor = self.visitor(visitor);
            self.inner.deserialize_unit_struct(name, visitor)
        }

        #[inline]
        fn deserialize_newtype_struct<V: Visitor<'de>>(
            self,
            name: &'static str,
            visitor: V,
        ) -> Result<V::Value, D::Error> {
            let _level = self.budget.enter()?;
            let visitor = self.visitor(visitor);
            self.inner.deserialize_newtype_struct(name, visitor)
        }

        #[inline]
        fn deserialize_tuple<V: Visitor<'de>>(
            self,
            len: usize,
            visitor: V,
        ) -> Result<V::Value, D::Error> {
            let _level = self.budget.enter()?;
            let visitor = self.visitor(visitor);
            self.inner.deserialize_tuple(len, visitor)
        }

        #[inline]
        fn deserialize_tuple_struct<V: Visitor<'de>>(
            self,
            name: &'static str,
            len: usize,
            visitor: V,
        ) -> Result<V::Value, D::Error> {
            let _level = self.budget.enter()?;
            let visitor = self.visitor(visitor);
            self.inner.deserialize_tuple_struct(name, len, visitor)
        }

        #[inline]
        fn deserialize_struct<V: Visitor<'de>>(
            self,
            name: &'static str,
            fields: &'static [&'static str],
            visitor: V,
        ) -> Result<V::Value, D::Error> {
            let _level = self.budget.enter()?;
            let visitor = self.visitor(visitor);
            self.inner.deserialize_struct(name, fields, visitor)
        }

        #[inline]
        fn deserialize_enum<V: Visitor<'de>>(
            self,
            name: &'static str,
            variants: &'static [&'static str],
            visitor: V,
        ) -> Result<V::Value, D::Error> {
            let _level = self.budget.enter()?;
            let visitor = self.visitor(visitor);
            self.inner.deserialize_enum(name, variants, visitor)
        }

        #[inline]
        fn is_human_readable(&self) -> bool {
            self.inner.is_human_readable()
        }
    }

    /// A visitor whose deserializers and accesses are wrapped.
    struct Visit<'b, V> {
        inner: V,
        budget: &'b Budget,
    }

    macro_rules! forward_visit {
        ($($method:ident($ty:ty))*) => {$(
            #[inline]
            fn $method<E: de::Error>(self, v: $ty) -> Result<V::Value, E> {
                self.inner.$method(v)
            }
        )*};
    }

    impl<'de, V: Visitor<'de>> Visitor<'de> for Visit<'_, V> {
        type Value = V::Value;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            self.inner.expecting(f)
        }

        forward_visit! {
            visit_bool(bool)
            visit_i8(i8) visit_i16(i16) visit_i32(i32) visit_i64(i64) visit_i128(i128)
            visit_u8(u8) visit_u16(u16) visit_u32(u32) visit_u64(u64) visit_u128(u128)
            visit_f32(f32) visit_f64(f64) visit_char(char)
            visit_str(&str) visit_borrowed_str(&'de str) visit_string(String)
            visit_bytes(&[u8]) visit_borrowed_bytes(&'de [u8]) visit_byte_buf(Vec<u8>)
        }

        #[inline]
        fn visit_none<E: de::Error>(self) -> Result<V::Value, E> {
            self.inner.visit_none()
        }

        #[inline]
        fn visit_unit<E: de::Error>(self) -> Result<V::Value, E> {
            self.inner.visit_unit()
        }

        #[inline]
        fn visit_some<D: Deserializer<'de>>(self, deserializer: D) -> Result<V::Value, D::Error> {
            self.inner.visit_some(Wrap {
                inner: deserializer,
                budget: self.budget,
            })
        }

        #[inline]
        fn visit_newtype_struct<D: Deserializer<'de>>(
            self,
            deserializer: D,
        ) -> Result<V::Value, D::Error> {
            self.inner.visit_newtype_struct(Wrap {
                inner: deserializer,
                budget: self.budget,
            })
        }

        #[inline]
        fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<V::Value, A::Error> {
            self.inner.visit_seq(Access {
                inner: seq,
                budget: self.budget,
            })
        }

        #[inline]
        fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<V::Value, A::Error> {
            self.inner.visit_map(Access {
                inner: map,
                budget: self.budget,
            })
        }

        #[inline]
        fn visit_enum<A: EnumAccess<'de>>(self, data: A) -> Result<V::Value, A::Error> {
            self.inner.visit_enum(Access {
                inner: data,
                budget: self.budget,
            })
        }
    }

    /// A sequence, map, enum or variant access: each element and map key takes one
    /// unit; its seed is wrapped.
    struct Access<'b, A> {
        inner: A,
        budget: &'b Budget,
    }

    impl<'b, A> Access<'b, A> {
        #[inline]
        fn seed<S>(&self, inner: S) -> Seed<'b, S> {
            Seed {
                inner,
                budget: self.budget,
            }
        }
    }

    impl<'de, A: SeqAccess<'de>> SeqAccess<'de> for Access<'_, A> {
        type Error = A::Error;

        #[inline]
        fn next_element_seed<S: DeserializeSeed<'de>>(
            &mut self,
            seed: S,
        ) -> Result<Option<S::Value>, A::Error> {
            self.budget.take()?;
            let seed = self.seed(seed);
            self.inner.next_element_seed(seed)
        }

        #[inline]
        fn size_hint(&self) -> Option<usize> {
            self.budget.cap(self.inner.size_hint())
        }
    }

    impl<'de, A: MapAccess<'de>> MapAccess<'de> for Access<'_, A> {
        type Error = A::Error;

        #[inline]
        fn next_key_seed<S: DeserializeSeed<'de>>(
            &mut self,
            seed: S,
        ) -> Result<Option<S::Value>, A::Error> {
            self.budget.take()?;
            let seed = self.seed(seed);
            self.inner.next_key_seed(seed)
        }

        #[inline]
        fn next_value_seed<S: DeserializeSeed<'de>>(
            &mut self,
            seed: S,
        ) -> Result<S::Value, A::Error> {
            let seed = self.seed(seed);
            self.inner.next_value_seed(seed)
        }

        #[inline]
        fn size_hint(&self) -> Option<usize> {
            self.budget.cap(self.inner.size_hint())
        }
    }

    impl<'de, 'b, A: EnumAccess<'de>> EnumAccess<'de> for Access<'b, A> {
        type Error = A::Error;
        type Variant = Access<'b, A::Variant>;

        #[inline]
        fn variant_seed<S: DeserializeSeed<'de>>(
            self,
            seed: S,
        ) -> Result<(S::Value, Self::Variant), A::Error> {
            let seed = self.seed(seed);
            let (value, variant) = self.inner.variant_seed(seed)?;
            Ok((
                value,
                Access {
                    inner: variant,
                    budget: self.budget,
                },
            ))
        }
    }

    impl<'de, A: VariantAccess<'de>> VariantAccess<'de> for Access<'_, A> {
        type Error = A::Error;

        #[inline]
        fn unit_variant(self) -> Result<(), A::Error> {
            self.inner.unit_variant()
        }

        #[inline]
        fn newtype_variant_seed<S: DeserializeSeed<'de>>(
            self,
            seed: S,
        ) -> Result<S::Value, A::Error> {
            let seed = self.seed(seed);
            self.inner.newtype_variant_seed(seed)
        }

        #[inline]
        fn tuple_variant<V: Visitor<'de>>(
            self,
            len: usize,
            visitor: V,
        ) -> Result<V::Value, A::Error> {
            self.inner.tuple_variant(
                len,
                Visit {
                    inner: visitor,
                    budget: self.budget,
                },
            )
        }

        #[inline]
        fn struct_variant<V: Visitor<'de>>(
            self,
            fields: &'static [&'static str],
            visitor: V,
        ) -> Result<V::Value, A::Error> {
            self.inner.struct_variant(
                fields,
                Visit {
                    inner: visitor,
                    budget: self.budget,
                },
            )
        }
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

    /// The byte limit a length prefix may claim is set by the payload's size bucket
    /// (the numbers the README states): 1 MiB up to 16 KiB of payload, 16 MiB up to
    /// 256 KiB, 256 MiB up to 4 MiB. A claim just over the bucket's limit is refused
    /// as over the limit; one just under it fails only for want of bytes.
    #[test]
    fn bincode_length_claims_are_limited_by_the_payload_size_bucket() {
        fn over_limit(len: usize, claim: u64) -> bool {
            // A `String` whose length prefix (varint: 253 then a u64) claims `claim`
            // bytes, padded to `len` bytes of payload.
            let mut p = vec![253u8];
            p.extend_from_slice(&claim.to_le_bytes());
            p.resize(len, b'x');
            match Decode::<String>::decode(&Bincode, &p).unwrap_err() {
                CodecError::Format(e) => matches!(
                    e.downcast_ref::<bincode::error::DecodeError>(),
                    Some(bincode::error::DecodeError::LimitExceeded)
                ),
                other => panic!("{other:?}"),
            }
        }
        for (len, limit) in [
            (16, 1u64 << 20),
            (16_384, 1 << 20),
            (16_385, 16 << 20),
            (262_144, 16 << 20),
            (262_145, 256 << 20),
        ] {
            assert!(
                over_limit(len, limit + 1),
                "{len} bytes claiming {}",
                limit + 1
            );
            assert!(
                !over_limit(len, limit - 64),
                "{len} bytes claiming {}",
                limit - 64
            );
        }
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

    /// A budget that runs out fails the decode (tests/hostile_payloads.rs has the
    /// absurd lengths, on a timer): 5 000 `()`s in 3 bytes or fewer are over it,
    /// 1 000 not.
    fn counts_elements<C: Encode<Vec<()>> + Decode<Vec<()>>>(c: C) {
        let few = c.encode(&vec![(); 1000]).unwrap();
        assert_eq!(Decode::<Vec<()>>::decode(&c, &few).unwrap().len(), 1000);
        let many = c.encode(&vec![(); 5000]).unwrap();
        assert!(many.len() <= 3, "{many:?}");
        assert!(Decode::<Vec<()>>::decode(&c, &many).is_err());
    }

    #[test]
    fn bincode_counts_elements() {
        counts_elements(Bincode);
        let many = Bincode.encode(&vec![(); 5000]).unwrap();
        let err = Decode::<Vec<()>>::decode(&Bincode, &many).unwrap_err();
        assert!(
            matches!(err, CodecError::Format(_))
                && err
                    .to_string()
                    .contains("more sequence elements or map entries"),
            "{err:?}"
        );
    }

    #[cfg(feature = "postcard")]
    #[test]
    fn postcard_counts_elements() {
        counts_elements(Postcard);
    }

    /// A recursive payload type: one byte (the variant's index) per level in both
    /// formats, so a payload of n ones and a zero is a tree n deep.
    #[derive(serde::Serialize, serde::Deserialize, Debug)]
    enum Tree {
        Leaf,
        Node(Box<Tree>),
    }

    fn tree_bytes(depth: usize) -> Vec<u8> {
        let mut bytes = vec![1u8; depth];
        bytes.push(0);
        bytes
    }

    fn depth_of(mut tree: &Tree) -> usize {
        let mut depth = 0;
        while let Tree::Node(next) = tree {
            depth += 1;
            tree = next;
        }
        depth
    }

    /// Property: a payload nested deeper than `MAX_DEPTH` is a decode error, never a
    /// stack overflow; one nested just under it decodes, on a thread with a quarter of
    /// the 2 MiB stack a tokio worker or a spawned thread has.
    fn limits_depth<C: Decode<Tree> + Send + 'static>(codec: C) {
        // n nodes are n + 1 enum values, the innermost reading its variant index
        // inside: n + 2 calls open at the deepest point.
        let within = budget::MAX_DEPTH as usize - 2;
        let run = std::thread::Builder::new()
            .stack_size(512 << 10)
            .spawn(move || {
                let tree = Decode::<Tree>::decode(&codec, &tree_bytes(within)).unwrap();
                assert_eq!(depth_of(&tree), within);
                // A million levels in a million and one bytes (within every size
                // limit): without the depth limit this overflowed the stack.
                let err = Decode::<Tree>::decode(&codec, &tree_bytes(1_000_000)).unwrap_err();
                assert!(matches!(err, CodecError::Format(_)), "{err:?}");
                let err = Decode::<Tree>::decode(&codec, &tree_bytes(within + 1)).unwrap_err();
                assert!(matches!(err, CodecError::Format(_)), "{err:?}");
            })
            .unwrap();
        run.join().unwrap();
    }

    #[test]
    fn bincode_refuses_payloads_nested_past_the_depth_limit() {
        limits_depth(Bincode);
        // bincode keeps the message (postcard's error drops it).
        let err = Decode::<Tree>::decode(&Bincode, &tree_bytes(300)).unwrap_err();
        assert!(err.to_string().contains("nested more than 256"), "{err}");
    }

    #[cfg(feature = "postcard")]
    #[test]
    fn postcard_refuses_payloads_nested_past_the_depth_limit() {
        limits_depth(Postcard);
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
