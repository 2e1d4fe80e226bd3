//! The payload type check of typed channels: a fingerprint of the Rust type a typed
//! [`Sender`](super::Sender) sends, carried in every data frame (protocol version 3),
//! compared by a typed [`Receiver`](super::Receiver) before it decodes anything.
//!
//! The fingerprint is the crc32c of the type's name *without module paths* (with a
//! codec other than [`Bincode`](crate::codec::Bincode), of `"<codec name>:<type name>"`;
//! see [`crate::codec::fingerprint`]):
//! `shop::api::Payment` and `ledger::dto::Payment` are both `Payment`, `Vec<my::Order>`
//! is `Vec<Order>`. Two services that each define their own copy of a message type
//! therefore agree, while a `String` sent to a `u64` receiver (which bincode would
//! otherwise decode as a wrong value) is caught. Types that differ in name but are
//! compatible on the wire (a renamed or evolved type) turn the check off with
//! [`ReceiverOptions::type_check`](super::ReceiverOptions::type_check) or
//! [`Sender::without_type_check`](super::Sender::without_type_check). `std::any::type_name` is
//! documented as best-effort, so a compiler upgrade could in principle change a name;
//! both ends are normally built by one toolchain, and the escape hatch covers the rest.

/// The fingerprint of `T` sent with the codec named `codec` (never 0: 0 means
/// "unchecked" on the wire). For bincode it is the crc32c of the short type name alone,
/// byte for byte what typed channels sent before codecs could be chosen, so nodes of
/// earlier releases still agree; any other codec's name is mixed in first.
pub(crate) fn fingerprint<T: ?Sized>(codec: &str) -> u32 {
    let name = short_name(std::any::type_name::<T>());
    let h = if codec == <crate::codec::Bincode as crate::codec::Codec>::NAME {
        crc32c::crc32c(name.as_bytes())
    } else {
        let prefix = crc32c::crc32c_append(crc32c::crc32c(codec.as_bytes()), b":");
        crc32c::crc32c_append(prefix, name.as_bytes())
    };
    match h {
        0 => 1,
        h => h,
    }
}

/// `name` with every `path::` prefix removed (inside generics and tuples too).
fn short_name(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    let mut segment_start = 0;
    let mut chars = name.chars().peekable();
    while let Some(c) = chars.next() {
        if c == ':' && chars.peek() == Some(&':') {
            chars.next();
            out.truncate(segment_start);
            continue;
        }
        out.push(c);
        if !(c.is_alphanumeric() || c == '_') {
            segment_start = out.len();
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    mod a {
        pub(super) struct Payment;
    }
    mod b {
        pub(super) struct Payment;
    }

    #[test]
    fn module_paths_do_not_matter_names_do() {
        assert_eq!(
            short_name("alloc::vec::Vec<shop::api::Order>"),
            "Vec<Order>"
        );
        assert_eq!(short_name("(alloc::string::String, u64)"), "(String, u64)");
        for codec in ["bincode", "postcard"] {
            assert_eq!(
                fingerprint::<a::Payment>(codec),
                fingerprint::<b::Payment>(codec)
            );
            assert_ne!(fingerprint::<String>(codec), fingerprint::<u64>(codec));
            assert_ne!(
                fingerprint::<Vec<u8>>(codec),
                fingerprint::<Vec<u16>>(codec)
            );
            assert_ne!(fingerprint::<(String, u64)>(codec), 0);
        }
        assert_ne!(
            fingerprint::<String>("bincode"),
            fingerprint::<String>("postcard")
        );
    }
}
