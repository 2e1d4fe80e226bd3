//! Codec properties: round trip of every frame type, robustness against arbitrary and
//! mutated input, incremental decoding, and the length bound.

mod support;

use support::reliability::case_passed;
use support::strategies;

use ackwire::wire::{
    encode, Data, DecodeError, Frame, FrameDecoder, FrameEncoder, Heartbeat, DEFAULT_MAX_FRAME_LEN,
    FRAME_PREFIX_LEN,
};
use ackwire::{ChannelId, Guarantee};
use bytes::{BufMut, Bytes, BytesMut};
use proptest::prelude::*;

/// Every frame type, payloads up to 4 KiB.
fn frame() -> impl Strategy<Value = Frame> {
    strategies::frame(4096, 64)
}

fn encoded(frames: &[Frame]) -> BytesMut {
    let mut buf = BytesMut::new();
    for f in frames {
        encode(f, &mut buf).expect("within default bound");
    }
    buf
}

/// Decode until `Ok(None)` or an error; bounded by the input length so a decoder that
/// failed to make progress would be caught instead of looping.
fn decode_all(buf: &mut BytesMut) -> (Vec<Frame>, Option<DecodeError>) {
    let mut dec = FrameDecoder::default();
    let mut out = Vec::new();
    for _ in 0..=buf.len() {
        match dec.decode(buf) {
            Ok(Some(f)) => out.push(f),
            Ok(None) => return (out, None),
            Err(e) => return (out, Some(e)),
        }
    }
    panic!("decoder did not finish within input length iterations");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1000))]

    /// Property: decode(encode(f)) == f for every frame type, and the input is consumed.
    #[test]
    fn round_trip_every_frame_type(frames in proptest::collection::vec(frame(), 1..4)) {
        let mut buf = encoded(&frames);
        let (out, err) = decode_all(&mut buf);
        prop_assert_eq!(err, None);
        prop_assert_eq!(out, frames);
        prop_assert!(buf.is_empty());
    }

    /// Property: arbitrary bytes never panic, never hang; the result is frames, "need
    /// more", or an error.
    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let mut buf = BytesMut::from(&bytes[..]);
        let _ = decode_all(&mut buf);
        case_passed("arbitrary", 1000, || ("wire codec".into(), "arbitrary bytes fed to the frame decoder".into(), "no panic, no hang: frames, need-more, or a typed error".into()));
    }

    /// Property: arbitrary bytes behind a plausible (small) length prefix and a correct
    /// checksum reach the header decoder and still never panic.
    #[test]
    fn arbitrary_checksummed_bodies_never_panic(body in proptest::collection::vec(any::<u8>(), 0..512)) {
        let mut buf = BytesMut::new();
        buf.put_u32_le(body.len() as u32);
        buf.put_u32_le(crc32c::crc32c(&body));
        buf.extend_from_slice(&body);
        let _ = decode_all(&mut buf);
    }

    /// Property: mutating a valid encoding (overwrite, truncate, insert) gives frames or
    /// an error, never a panic.
    #[test]
    fn mutated_encodings_never_panic(
        f in frame(),
        edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0u8..3), 1..8),
    ) {
        let mut bytes = encoded(&[f]).to_vec();
        for (idx, val, op) in edits {
            if bytes.is_empty() { break; }
            let i = idx.index(bytes.len());
            match op {
                0 => bytes[i] = val,
                1 => bytes.truncate(i),
                _ => bytes.insert(i, val),
            }
        }
        let mut buf = BytesMut::from(&bytes[..]);
        let _ = decode_all(&mut buf);
        case_passed("mutated", 1000, || ("wire codec".into(), "valid frames with bytes overwritten, truncated, inserted".into(), "no panic: frames or a typed error".into()));
    }

    /// Property: one flipped bit anywhere in the body is detected as a bad checksum.
    #[test]
    fn flipped_body_bit_gives_bad_checksum(f in frame(), pos in any::<prop::sample::Index>(), bit in 0u8..8) {
        let mut buf = encoded(&[f]);
        let body_len = buf.len() - FRAME_PREFIX_LEN;
        let i = FRAME_PREFIX_LEN + pos.index(body_len);
        buf[i] ^= 1 << bit;
        prop_assert_eq!(FrameDecoder::default().decode(&mut buf), Err(DecodeError::BadChecksum));
    }

    /// Property: feeding the encoding one byte at a time yields the same frames, with
    /// `Ok(None)` (not an error) while incomplete.
    #[test]
    fn byte_by_byte_decoding_matches(frames in proptest::collection::vec(frame(), 1..4)) {
        let bytes = encoded(&frames);
        let mut dec = FrameDecoder::default();
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        for b in bytes.iter() {
            buf.put_u8(*b);
            while let Some(f) = dec.decode(&mut buf).expect("valid stream") {
                out.push(f);
            }
        }
        prop_assert_eq!(out, frames);
        prop_assert!(buf.is_empty());
    }
}

#[test]
fn oversize_length_prefix_is_too_large_without_allocating() {
    let mut buf = BytesMut::with_capacity(16);
    buf.put_u32_le(u32::MAX);
    buf.put_u32_le(0);
    let cap = buf.capacity();
    let err = FrameDecoder::default().decode(&mut buf).unwrap_err();
    assert_eq!(
        err,
        DecodeError::TooLarge {
            len: u32::MAX as usize,
            max: DEFAULT_MAX_FRAME_LEN
        }
    );
    assert_eq!(
        buf.capacity(),
        cap,
        "decoder reserved memory for a refused frame"
    );

    // A custom bound applies to both sides.
    let big = Frame::Data(Data {
        channel: ChannelId(1),
        seq: 1,
        floor: 0,
        id_floor: 0,
        id: None,
        guarantee: Guarantee::AtMostOnce,
        schema: 0,
        payload: Bytes::from(vec![0u8; 2000]),
    });
    let mut buf = BytesMut::new();
    encode(&big, &mut buf).unwrap();
    assert!(matches!(
        FrameDecoder::new(1000).decode(&mut buf),
        Err(DecodeError::TooLarge { max: 1000, .. })
    ));
    let mut out = BytesMut::new();
    assert!(FrameEncoder::new(1000).encode(&big, &mut out).is_err());
    assert!(out.is_empty());
}

#[test]
fn incomplete_frame_is_none_and_consumes_nothing() {
    let mut buf = encoded(&[Frame::Ping(Heartbeat { nonce: 1 })]);
    let full = buf.clone();
    buf.truncate(full.len() - 1);
    let before = buf.clone();
    assert_eq!(FrameDecoder::default().decode(&mut buf), Ok(None));
    assert_eq!(buf, before);
}

#[test]
fn unknown_format_version_is_unsupported() {
    let body = [9u8, 4, 1];
    let mut buf = BytesMut::new();
    buf.put_u32_le(body.len() as u32);
    buf.put_u32_le(crc32c::crc32c(&body));
    buf.extend_from_slice(&body);
    assert!(matches!(
        FrameDecoder::default().decode(&mut buf),
        Err(DecodeError::UnsupportedVersion { got: 9, .. })
    ));
}
