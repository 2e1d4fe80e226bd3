//! The payload type check of typed channels: a fingerprint of the Rust type a typed
//! [`Sender`](super::Sender) sends, carried in every data frame (protocol version 3),
//! compared by a typed [`Receiver`](super::Receiver) before it decodes anything.
//!
//! The fingerprint is the crc32c of the type's name *without module paths*:
//! `shop::api::Payment` and `ledger::dto::Payment` are both `Payment`, `Vec<my::Order>`
//! is `Vec<Order>`. Two services that each define their own copy of a message type
//! therefore agree, while a `String` sent to a `u64` receiver (which bincode would
//! otherwise decode as a wrong value) is caught. Types that differ in name but are
//! compatible on the wire (a renamed or evolved type) turn the check off with
//! [`ReceiverOptions::type_check`](super::ReceiverOptions::type_check) or
//! [`Sender::without_type_check`](super::Sender::without_type_check). `std::any::type_name` is
//! documented as best-effort, so a compiler upgrade could in principle change a name;
//! both ends are normally built by one toolchain, and the escape hatch covers the rest.

/// The fingerprint of `T` (never 0: 0 means "unchecked" on the wire).
pub(crate) fn fingerprint<T: ?Sized>() -> u32 {
    let name = short_name(std::any::type_name::<T>());
    match crc32c::crc32c(name.as_bytes()) {
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
        assert_eq!(fingerprint::<a::Payment>(), fingerprint::<b::Payment>());
        assert_ne!(fingerprint::<String>(), fingerprint::<u64>());
        assert_ne!(fingerprint::<Vec<u8>>(), fingerprint::<Vec<u16>>());
        assert_ne!(fingerprint::<(String, u64)>(), 0);
    }
}
