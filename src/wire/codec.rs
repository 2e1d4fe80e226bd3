//! The frame codec: length prefix + crc32c + bincode 2 header + raw payload.
//!
//! Owns the byte layout of a [`Frame`] and the checks on the way in (length bound,
//! checksum, format version, well-formed header). Must not do IO, keep connection
//! state beyond the bytes it was handed, or look at what frames mean (that is `proto`).
//!
//! # Layout
//!
//! ```text
//! [u32 LE body_len][u32 LE crc32c(body)][body]
//! body = [u8 WIRE_FORMAT_VERSION][u8 kind][bincode header][payload bytes (Data only)]
//! ```
//!
//! The header is encoded with `bincode::config::standard()` (varint integers). A
//! [`Data`] payload is not bincoded: it is everything in the body after the header, and
//! the decoder hands it out as a [`Bytes`] split from the input buffer (zero-copy), or,
//! below [`COPY_PAYLOAD_BELOW`] (16 KiB), copied out of it so that a held message
//! does not keep the buffer alive. A buffer grown for a frame over 64 KiB is left to
//! such frames: a smaller payload read into it after one is copied out too, and the
//! bytes after it move to a fresh buffer once fewer than 64 KiB are left, so a small
//! held message never keeps a large frame's buffer alive.
//!
//! `body_len` is bounded by a configured maximum ([`DEFAULT_MAX_FRAME_LEN`] unless
//! set): the encoder refuses bigger frames with [`EncodeError::TooLarge`] and the
//! decoder rejects a bigger length prefix with [`DecodeError::TooLarge`] before reading
//! or allocating anything for it.
//!
//! # Hand-written on purpose
//!
//! [`FrameDecoder`] and [`FrameEncoder`] have the shape of `tokio_util::codec`'s
//! `Decoder` and `Encoder`, and with the feature `tokio-util` they implement them (one
//! delegating call each, `FramedError` adding the IO case), for tools that want
//! `FramedRead` / `FramedWrite` over the wire format. The codec itself stays here, and
//! the TCP transport keeps its own read and write loops, because:
//!
//! * this module is part of the sans-IO core: it must build and be fuzzed without a
//!   runtime or an IO crate (`fuzz/`, the loom and simulation builds), so its types
//!   cannot require tokio-util's traits; an optional impl adds them without moving
//!   anything;
//! * the transport's reader changes decoder in the middle of a connection (a 1 KiB
//!   bound and protocol version 1 for the handshake, then the configured bound and the
//!   negotiated version), puts a deadline on completing a partly received frame, and
//!   counts each [`DecodeError`] kind; its writer encodes a whole batch of frames into one buffer
//!   and one write. `Framed` could be bent to each of these (`decoder_mut`,
//!   `FramedParts`), for no gain over the ten lines each takes now and with a
//!   dependency every user would compile;
//! * no crate does the layout itself: a length prefix *and* a crc32c over the body,
//!   a format-version byte, a bincode header whose fields depend on the negotiated
//!   protocol version, and a large payload split zero-copy from the input buffer
//!   (`LengthDelimitedCodec` covers only the first of these).

use super::frame::{
    Ack, CreditProbe, Data, Finish, Frame, Handshake, Heartbeat, Nack, NodeCredit, Reject,
    SeqRange, Settled, MAX_ACK_RANGES, MAX_HELD_RANGES,
};
use super::version::PROTOCOL_VERSION;
use crate::id::{ChannelId, Guarantee, MessageId};
use bincode::de::{read::Reader, Decode, DecoderImpl};
use bincode::enc::write::Writer;
use bytes::{Buf, BufMut, Bytes, BytesMut};

/// Version of the byte layout, the first body byte of every frame. Distinct from the
/// protocol version (what frames mean and which fields they carry), which each
/// connection negotiates (see [`crate::wire::Negotiation`]) and the codec is built for
/// ([`FrameEncoder::with_version`], [`FrameDecoder::with_version`]).
pub const WIRE_FORMAT_VERSION: u8 = 1;

/// Default bound on a frame's body length: 8 MiB.
pub const DEFAULT_MAX_FRAME_LEN: usize = 8 * 1024 * 1024;

/// Bytes before the body: `u32` length + `u32` crc32c.
pub const FRAME_PREFIX_LEN: usize = 8;

/// Most the decoder reserves ahead of the bytes it holds for a partly received frame.
const RESERVE_AHEAD: usize = 64 * 1024;

/// A [`Data`] payload shorter than this is copied out of the input buffer by
/// [`FrameDecoder::decode`], so a message that is held does not keep the buffer it
/// arrived in (up to a large frame's) alive; a longer one is split from it, zero-copy
/// (it is at least a quarter of a steady-state read).
pub const COPY_PAYLOAD_BELOW: usize = 16 * 1024;

/// Encoding refused a frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EncodeError {
    /// The encoded body would be `len` bytes, over the configured `max`. Nothing was
    /// written. Split the payload or raise the limit on both ends.
    #[error("frame body of {len} bytes exceeds the maximum of {max}")]
    TooLarge {
        /// Body length the frame would need.
        len: usize,
        /// Configured maximum body length.
        max: usize,
    },
    /// The connection's protocol version has no such frame; nothing was written. The
    /// protocol never produces one for such a peer (a bug if seen).
    #[error("{frame} frames need protocol version {since} or later (connection speaks {version})")]
    Unsupported {
        /// The frame type.
        frame: &'static str,
        /// The first protocol version with the frame.
        since: u16,
        /// The connection's version.
        version: u16,
    },
}

/// Decoding rejected the input. After any error the byte stream can no longer be
/// framed reliably: close the connection (and count the reason).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The body does not match its crc32c: bytes were corrupted in transit or the peer
    /// is not speaking this protocol. Close the connection.
    #[error("frame checksum mismatch")]
    BadChecksum,
    /// The frame's format version byte, or a handshake's protocol version, is not the
    /// one this build speaks. Close the connection; the peer needs a compatible build.
    #[error("unsupported version {got} (this build speaks {supported})")]
    UnsupportedVersion {
        /// Version the peer sent.
        got: u16,
        /// Version this build speaks.
        supported: u16,
    },
    /// The length prefix announces a body over the configured maximum. Nothing was
    /// allocated for it. Close the connection (or raise the limit on both ends).
    #[error("frame body of {len} bytes exceeds the maximum of {max}")]
    TooLarge {
        /// Announced body length.
        len: usize,
        /// Configured maximum body length.
        max: usize,
    },
    /// The checksum matched but the body is not a valid frame (unknown kind, bad
    /// header, trailing bytes). The peer has a bug or a different protocol: close the
    /// connection.
    #[error("malformed frame: {0}")]
    Malformed(String),
}

/// Encodes frames with a body-length bound, for one protocol version (default: the
/// newest, [`PROTOCOL_VERSION`]). Fields the version lacks are left out.
///
/// ```
/// use ackwire::wire::{Frame, FrameDecoder, FrameEncoder, Heartbeat};
/// use bytes::BytesMut;
///
/// let mut buf = BytesMut::new();
/// FrameEncoder::default().encode(&Frame::Ping(Heartbeat { nonce: 7 }), &mut buf).unwrap();
/// let frame = FrameDecoder::default().decode(&mut buf).unwrap();
/// assert_eq!(frame, Some(Frame::Ping(Heartbeat { nonce: 7 })));
/// ```
#[derive(Debug, Clone, Copy)]
pub struct FrameEncoder {
    max_frame_len: usize,
    version: u16,
}

impl FrameEncoder {
    /// An encoder refusing bodies over `max_frame_len` bytes (capped at `u32::MAX`).
    pub fn new(max_frame_len: usize) -> Self {
        FrameEncoder {
            max_frame_len: max_frame_len.min(u32::MAX as usize),
            version: PROTOCOL_VERSION,
        }
    }

    /// The same encoder for a connection that negotiated protocol `version`.
    pub fn with_version(self, version: u16) -> Self {
        FrameEncoder { version, ..self }
    }

    /// The protocol version frames are encoded for.
    pub fn version(&self) -> u16 {
        self.version
    }

    /// The body-length bound.
    pub fn max_frame_len(&self) -> usize {
        self.max_frame_len
    }

    /// Append `frame` to `dst`. On error `dst` is left as it was.
    pub fn encode(&self, frame: &Frame, dst: &mut BytesMut) -> Result<(), EncodeError> {
        let max = self.max_frame_len;
        if let Frame::Data(d) = frame {
            // Cheap early refusal so a huge payload is never copied.
            if d.payload.len() > max {
                return Err(EncodeError::TooLarge {
                    len: d.payload.len() + 2,
                    max,
                });
            }
        }
        let needs = match frame {
            Frame::CreditProbe(_) => Some(("CreditProbe", 2)),
            Frame::Reject(_) => Some(("Reject", 3)),
            Frame::Finish(_) => Some(("Finish", 3)),
            Frame::NodeCredit(_) => Some(("NodeCredit", 3)),
            Frame::Settled(_) => Some(("Settled", 4)),
            _ => None,
        };
        if let Some((name, since)) = needs.filter(|(_, since)| self.version < *since) {
            return Err(EncodeError::Unsupported {
                frame: name,
                since,
                version: self.version,
            });
        }
        let start = dst.len();
        dst.put_bytes(0, FRAME_PREFIX_LEN);
        dst.put_u8(WIRE_FORMAT_VERSION);
        dst.put_u8(kind_of(frame));
        encode_header(frame, self.version, dst);
        if let Frame::Data(d) = frame {
            dst.extend_from_slice(&d.payload);
        }
        let body_len = dst.len() - start - FRAME_PREFIX_LEN;
        if body_len > max {
            dst.truncate(start);
            return Err(EncodeError::TooLarge { len: body_len, max });
        }
        let crc = crc32c::crc32c(&dst[start + FRAME_PREFIX_LEN..]);
        dst[start..start + 4].copy_from_slice(&(body_len as u32).to_le_bytes());
        dst[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
        Ok(())
    }
}

impl Default for FrameEncoder {
    /// Bound: [`DEFAULT_MAX_FRAME_LEN`] (8 MiB).
    fn default() -> Self {
        FrameEncoder::new(DEFAULT_MAX_FRAME_LEN)
    }
}

/// Append `frame` to `dst` with the default bound ([`DEFAULT_MAX_FRAME_LEN`]).
pub fn encode(frame: &Frame, dst: &mut BytesMut) -> Result<(), EncodeError> {
    FrameEncoder::default().encode(frame, dst)
}

/// Incremental frame decoder for one protocol version (default: the newest).
///
/// Feed it a growing buffer; each [`decode`](FrameDecoder::decode) call takes at most
/// one frame off the front, so a buffer can be filled byte by byte. Between calls it
/// keeps only its bound, its version and whether the buffer's front still lies in an
/// allocation grown for a frame over 64 KiB (see the module docs); feed one decoder
/// one buffer.
#[derive(Debug, Clone, Copy)]
pub struct FrameDecoder {
    max_frame_len: usize,
    version: u16,
    /// The buffer's front lies in an allocation grown for a frame over
    /// `RESERVE_AHEAD`: payloads split from it are copied out.
    in_large_buffer: bool,
}

impl FrameDecoder {
    /// A decoder rejecting bodies over `max_frame_len` bytes.
    pub fn new(max_frame_len: usize) -> Self {
        FrameDecoder {
            max_frame_len: max_frame_len.min(u32::MAX as usize),
            version: PROTOCOL_VERSION,
            in_large_buffer: false,
        }
    }

    /// The same decoder for a connection that negotiated protocol `version`.
    pub fn with_version(self, version: u16) -> Self {
        FrameDecoder { version, ..self }
    }

    /// The body-length bound.
    pub fn max_frame_len(&self) -> usize {
        self.max_frame_len
    }

    /// Take one frame off the front of `src`.
    ///
    /// `Ok(None)`: `src` does not hold a whole frame yet; read more bytes and call
    /// again (nothing was consumed; each call reserves for at most the next 64 KiB of
    /// the frame, never for the whole announced length: the buffer grows as the bytes
    /// arrive — its capacity may round up to about twice what it holds — so a length
    /// prefix alone cannot make it hold more than 64 KiB).
    /// `Ok(Some(frame))`: the frame's bytes were removed from `src`. `Err(_)`: the
    /// stream is broken, close the connection.
    pub fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, DecodeError> {
        if src.len() < FRAME_PREFIX_LEN {
            return Ok(None);
        }
        let body_len = u32::from_le_bytes([src[0], src[1], src[2], src[3]]) as usize;
        if body_len > self.max_frame_len {
            return Err(DecodeError::TooLarge {
                len: body_len,
                max: self.max_frame_len,
            });
        }
        let total = FRAME_PREFIX_LEN + body_len;
        if src.len() < total {
            // Room for what may arrive next, not for what is merely announced: a
            // prefix claiming a frame of `max_frame_len` and then silence must not
            // cost that much memory per connection. (Regression: the whole rest of the
            // frame was reserved here, so 160 connections sending 16 bytes each held
            // 8 MiB apiece and aborted a process under an address-space limit.)
            // Growing by `BytesMut::reserve` stays amortised (it doubles).
            src.reserve((total - src.len()).min(RESERVE_AHEAD));
            return Ok(None);
        }
        let crc = u32::from_le_bytes([src[4], src[5], src[6], src[7]]);
        if crc32c::crc32c(&src[FRAME_PREFIX_LEN..total]) != crc {
            return Err(DecodeError::BadChecksum);
        }
        let mut body = src.split_to(total);
        // A buffer grown to hold a large frame is left to the large frames read into
        // it: a smaller payload split from it would keep the whole allocation alive
        // for as long as that message is held. (Regression: a 17 KiB message, past
        // `COPY_PAYLOAD_BELOW`, read after a 4 MiB frame and queued for a slow
        // receiver held the 4 MiB buffer.) So a frame of at most `RESERVE_AHEAD` from
        // such a buffer has its payload copied out, and once less than that is left
        // in it, those bytes move to a fresh buffer: each byte is copied at most once.
        let copy_out = self.in_large_buffer && total <= RESERVE_AHEAD;
        self.in_large_buffer |= total > RESERVE_AHEAD;
        if self.in_large_buffer && src.len() < RESERVE_AHEAD {
            *src = BytesMut::from(&src[..]);
            self.in_large_buffer = false;
        }
        body.advance(FRAME_PREFIX_LEN);
        let mut frame = decode_body(body, self.version)?;
        if let Frame::Data(d) = &mut frame {
            if d.payload.len() < COPY_PAYLOAD_BELOW || copy_out {
                // A payload split from the input buffer keeps its whole allocation
                // alive for as long as it is held: queued for a slow receiver,
                // buffered for order, parked. One two-byte message read after a
                // large frame held megabytes. (Regression: 600 small messages queued
                // for a slow receiver, interleaved with 4 MiB ones on another channel,
                // held 1.5 GiB.) A small payload is cheaper to copy than to pin.
                d.payload = Bytes::copy_from_slice(&d.payload);
            }
        }
        Ok(Some(frame))
    }
}

impl FrameDecoder {
    /// Does the buffer's front still lie in an allocation grown for a frame over
    /// 64 KiB? (A caller that goes on with another decoder moves the bytes out.)
    pub(crate) fn in_large_buffer(&self) -> bool {
        self.in_large_buffer
    }
}

impl Default for FrameDecoder {
    /// Bound: [`DEFAULT_MAX_FRAME_LEN`] (8 MiB).
    fn default() -> Self {
        FrameDecoder::new(DEFAULT_MAX_FRAME_LEN)
    }
}

// ---------------------------------------------------------------------------------------
// Helpers

const KIND_HANDSHAKE: u8 = 0;
const KIND_DATA: u8 = 1;
const KIND_ACK: u8 = 2;
const KIND_NACK: u8 = 3;
const KIND_PING: u8 = 4;
const KIND_PONG: u8 = 5;
/// Protocol version 2 on.
const KIND_CREDIT_PROBE: u8 = 6;
/// Protocol version 3 on.
const KIND_REJECT: u8 = 7;
/// Protocol version 3 on.
const KIND_FINISH: u8 = 8;
/// Protocol version 3 on.
const KIND_NODE_CREDIT: u8 = 9;
/// Protocol version 4 on.
const KIND_SETTLED: u8 = 10;

fn bincode_config() -> bincode::config::Configuration {
    bincode::config::standard()
}

fn kind_of(frame: &Frame) -> u8 {
    match frame {
        Frame::Handshake(_) => KIND_HANDSHAKE,
        Frame::Data(_) => KIND_DATA,
        Frame::Ack(_) => KIND_ACK,
        Frame::Nack(_) => KIND_NACK,
        Frame::Ping(_) => KIND_PING,
        Frame::Pong(_) => KIND_PONG,
        Frame::CreditProbe(_) => KIND_CREDIT_PROBE,
        Frame::Reject(_) => KIND_REJECT,
        Frame::Finish(_) => KIND_FINISH,
        Frame::NodeCredit(_) => KIND_NODE_CREDIT,
        Frame::Settled(_) => KIND_SETTLED,
    }
}

/// bincode writer appending to a `BytesMut`; cannot fail.
struct BytesWriter<'a>(&'a mut BytesMut);

impl Writer for BytesWriter<'_> {
    fn write(&mut self, bytes: &[u8]) -> Result<(), bincode::error::EncodeError> {
        self.0.extend_from_slice(bytes);
        Ok(())
    }
}

fn encode_header(frame: &Frame, version: u16, dst: &mut BytesMut) {
    let w = BytesWriter(dst);
    let cfg = bincode_config();
    // Our writer never fails and these types have no fallible encodings, so the
    // results are always Ok; ignoring them cannot lose data silently.
    let _ = match frame {
        Frame::Handshake(h) => bincode::encode_into_writer(h, w, cfg),
        Frame::Data(d) if version < 3 => bincode::encode_into_writer(
            (
                d.channel,
                d.seq,
                d.floor,
                d.floor.saturating_sub(d.id_floor),
                d.id,
                d.guarantee,
            ),
            w,
            cfg,
        ),
        Frame::Data(d) => bincode::encode_into_writer(
            (
                d.channel,
                d.seq,
                d.floor,
                d.floor.saturating_sub(d.id_floor),
                d.id,
                d.guarantee,
                d.schema,
            ),
            w,
            cfg,
        ),
        Frame::Ack(a) if version < 2 => {
            bincode::encode_into_writer((a.channel, a.incarnation, a.cumulative, &a.ranges), w, cfg)
        }
        Frame::Ack(a) if version < 5 => bincode::encode_into_writer(
            (
                a.channel,
                a.incarnation,
                a.cumulative,
                &a.ranges,
                a.credit,
                a.received,
            ),
            w,
            cfg,
        ),
        Frame::Ack(a) => bincode::encode_into_writer(
            (
                a.channel,
                a.incarnation,
                a.cumulative,
                &a.ranges,
                a.credit,
                a.received,
                &a.held[..a.held.len().min(MAX_HELD_RANGES)],
            ),
            w,
            cfg,
        ),
        Frame::Nack(n) => bincode::encode_into_writer(n, w, cfg),
        Frame::Ping(h) | Frame::Pong(h) => bincode::encode_into_writer(h, w, cfg),
        Frame::CreditProbe(p) => bincode::encode_into_writer(p, w, cfg),
        Frame::Reject(r) => bincode::encode_into_writer(r, w, cfg),
        Frame::Finish(f) => bincode::encode_into_writer(f, w, cfg),
        Frame::NodeCredit(c) => bincode::encode_into_writer(c, w, cfg),
        Frame::Settled(c) => bincode::encode_into_writer(c, w, cfg),
    };
}

/// bincode reader over a slice that remembers how far it got.
struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl Reader for Cursor<'_> {
    fn read(&mut self, bytes: &mut [u8]) -> Result<(), bincode::error::DecodeError> {
        let end = self.pos.checked_add(bytes.len());
        match end {
            Some(end) if end <= self.buf.len() => {
                bytes.copy_from_slice(&self.buf[self.pos..end]);
                self.pos = end;
                Ok(())
            }
            _ => Err(bincode::error::DecodeError::UnexpectedEnd {
                additional: bytes.len(),
            }),
        }
    }
}

fn malformed(e: bincode::error::DecodeError) -> DecodeError {
    DecodeError::Malformed(e.to_string())
}

/// Decode a checksummed body (version byte onwards).
fn decode_body(mut body: BytesMut, version: u16) -> Result<Frame, DecodeError> {
    if body.len() < 2 {
        return Err(DecodeError::Malformed("body shorter than 2 bytes".into()));
    }
    if body[0] != WIRE_FORMAT_VERSION {
        return Err(DecodeError::UnsupportedVersion {
            got: u16::from(body[0]),
            supported: u16::from(WIRE_FORMAT_VERSION),
        });
    }
    let kind = body[1];
    let mut cur = Cursor {
        buf: &body[2..],
        pos: 0,
    };
    let frame = {
        let mut dec = DecoderImpl::new(&mut cur, bincode_config(), ());
        match kind {
            KIND_HANDSHAKE => Frame::Handshake(Handshake::decode(&mut dec).map_err(malformed)?),
            KIND_DATA => {
                let channel = ChannelId::decode(&mut dec).map_err(malformed)?;
                let seq = u64::decode(&mut dec).map_err(malformed)?;
                let floor = u64::decode(&mut dec).map_err(malformed)?;
                // The id floor travels as its distance below the stream floor.
                let id_gap = u64::decode(&mut dec).map_err(malformed)?;
                let id_floor = floor.saturating_sub(id_gap);
                let id = Option::<MessageId>::decode(&mut dec).map_err(malformed)?;
                let guarantee = Guarantee::decode(&mut dec).map_err(malformed)?;
                let schema = if version >= 3 {
                    u32::decode(&mut dec).map_err(malformed)?
                } else {
                    0
                };
                Frame::Data(Data {
                    channel,
                    seq,
                    floor,
                    id_floor,
                    id,
                    guarantee,
                    schema,
                    payload: Bytes::new(),
                })
            }
            KIND_ACK => Frame::Ack(decode_ack(&mut dec, version)?),
            KIND_NACK => Frame::Nack(Nack::decode(&mut dec).map_err(malformed)?),
            KIND_PING => Frame::Ping(Heartbeat::decode(&mut dec).map_err(malformed)?),
            KIND_PONG => Frame::Pong(Heartbeat::decode(&mut dec).map_err(malformed)?),
            KIND_CREDIT_PROBE if version >= 2 => {
                Frame::CreditProbe(CreditProbe::decode(&mut dec).map_err(malformed)?)
            }
            KIND_REJECT if version >= 3 => {
                Frame::Reject(Reject::decode(&mut dec).map_err(malformed)?)
            }
            KIND_FINISH if version >= 3 => {
                Frame::Finish(Finish::decode(&mut dec).map_err(malformed)?)
            }
            KIND_NODE_CREDIT if version >= 3 => {
                Frame::NodeCredit(NodeCredit::decode(&mut dec).map_err(malformed)?)
            }
            KIND_SETTLED if version >= 4 => {
                Frame::Settled(Settled::decode(&mut dec).map_err(malformed)?)
            }
            other => {
                return Err(DecodeError::Malformed(format!(
                    "unknown frame kind {other}"
                )))
            }
        }
    };
    let header_end = 2 + cur.pos;
    match frame {
        Frame::Data(mut d) => {
            body.advance(header_end);
            d.payload = body.freeze();
            Ok(Frame::Data(d))
        }
        _ if header_end != body.len() => Err(DecodeError::Malformed(format!(
            "{} trailing bytes after header",
            body.len() - header_end
        ))),
        other => Ok(other),
    }
}

/// Decode an [`Ack`] field by field (same layout as its derived `Encode`), bounding
/// the range count by the bytes actually present so a hostile count cannot make us
/// allocate more than a small multiple of the (already bounded) body.
fn decode_ack<R: Reader>(
    dec: &mut DecoderImpl<R, bincode::config::Configuration, ()>,
    version: u16,
) -> Result<Ack, DecodeError> {
    let channel = ChannelId::decode(dec).map_err(malformed)?;
    let incarnation = u64::decode(dec).map_err(malformed)?;
    let cumulative = u64::decode(dec).map_err(malformed)?;
    let ranges = decode_ranges(dec, "ack", MAX_ACK_RANGES)?;
    let (credit, received) = if version >= 2 {
        (
            Option::<u64>::decode(dec).map_err(malformed)?,
            u64::decode(dec).map_err(malformed)?,
        )
    } else {
        (None, 0)
    };
    let held = if version >= 5 {
        decode_ranges(dec, "held", MAX_HELD_RANGES)?
    } else {
        Vec::new()
    };
    Ok(Ack {
        channel,
        incarnation,
        cumulative,
        ranges,
        credit,
        received,
        held,
    })
}

/// A length-prefixed list of [`SeqRange`]s, at most `max` of them. Each range takes at
/// least 2 bytes (two varints) and the body is bounded, so a count above that bound
/// is a lie refused before allocating.
fn decode_ranges<R: Reader>(
    dec: &mut DecoderImpl<R, bincode::config::Configuration, ()>,
    what: &str,
    max: usize,
) -> Result<Vec<SeqRange>, DecodeError> {
    let count = u64::decode(dec).map_err(malformed)?;
    let count = usize::try_from(count)
        .ok()
        .filter(|&c| c <= u32::MAX as usize / 2 && c <= max)
        .ok_or_else(|| DecodeError::Malformed(format!("{what} range count {count} too large")))?;
    let mut ranges = Vec::with_capacity(count.min(1024));
    for _ in 0..count {
        ranges.push(SeqRange::decode(dec).map_err(malformed)?);
    }
    Ok(ranges)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::id::IdKey;

    fn data(payload: &'static [u8]) -> Frame {
        Frame::Data(Data {
            channel: ChannelId(3),
            seq: 9,
            floor: 4,
            id_floor: 2,
            id: Some(MessageId::Key(IdKey(u128::MAX))),
            guarantee: Guarantee::EffectivelyOnce,
            payload: Bytes::from_static(payload),
            schema: 0,
        })
    }

    #[test]
    fn a_large_payload_is_a_zero_copy_slice_of_the_input() {
        let big: &'static [u8] = vec![3u8; COPY_PAYLOAD_BELOW].leak();
        let mut buf = BytesMut::new();
        encode(&data(big), &mut buf).unwrap();
        let base = buf.as_ptr() as usize;
        let len = buf.len();
        let f = FrameDecoder::default().decode(&mut buf).unwrap().unwrap();
        assert_eq!(f, data(big));
        let Frame::Data(d) = f else { unreachable!() };
        let p = d.payload.as_ptr() as usize;
        assert!(
            p >= base && p + big.len() <= base + len,
            "payload was copied"
        );
        assert!(buf.is_empty());
    }

    /// A small payload read after a large frame, into the same buffer, does not keep
    /// that buffer alive: it is copied out (`COPY_PAYLOAD_BELOW`).
    #[test]
    fn a_small_payload_does_not_pin_the_buffer_it_was_read_into() {
        let big: &'static [u8] = vec![1u8; 4 << 20].leak();
        let mut buf = BytesMut::new();
        encode(&data(big), &mut buf).unwrap();
        encode(&data(b"hi"), &mut buf).unwrap();
        let range = buf.as_ptr() as usize..buf.as_ptr() as usize + buf.capacity();
        let mut dec = FrameDecoder::default();
        let first = dec.decode(&mut buf).unwrap().unwrap();
        let second = dec.decode(&mut buf).unwrap().unwrap();
        let (Frame::Data(first), Frame::Data(second)) = (first, second) else {
            unreachable!()
        };
        assert!(range.contains(&(first.payload.as_ptr() as usize)));
        assert_eq!(&second.payload[..], b"hi");
        assert!(
            !range.contains(&(second.payload.as_ptr() as usize)),
            "the two-byte payload still points into the 4 MiB buffer"
        );
    }

    /// Nor does a payload too long to be copied (`COPY_PAYLOAD_BELOW` and more): the
    /// bytes read after a large frame go on in a buffer of their own. (Regression: a
    /// 17 KiB payload split from the 4 MiB buffer kept it alive while held.)
    #[test]
    fn a_payload_read_after_a_large_frame_does_not_pin_its_buffer() {
        let big: &'static [u8] = vec![1u8; 4 << 20].leak();
        let mid: &'static [u8] = vec![2u8; COPY_PAYLOAD_BELOW + 1024].leak();
        let mut buf = BytesMut::new();
        encode(&data(big), &mut buf).unwrap();
        // Five: more than 64 KiB of them are left after the large frame.
        for _ in 0..5 {
            encode(&data(mid), &mut buf).unwrap();
        }
        let range = buf.as_ptr() as usize..buf.as_ptr() as usize + buf.capacity();
        let mut dec = FrameDecoder::default();
        let first = dec.decode(&mut buf).unwrap().unwrap();
        assert_eq!(first, data(big));
        for _ in 0..5 {
            let Frame::Data(d) = dec.decode(&mut buf).unwrap().unwrap() else {
                unreachable!()
            };
            assert_eq!(&d.payload[..], mid);
            assert!(
                !range.contains(&(d.payload.as_ptr() as usize)),
                "a {} byte payload points into the 4 MiB buffer",
                mid.len()
            );
        }
        assert!(buf.is_empty());
    }

    #[test]
    fn oversize_encode_is_an_error_and_writes_nothing() {
        let mut buf = BytesMut::from(&b"xy"[..]);
        let enc = FrameEncoder::new(16);
        let err = enc.encode(&data(&[0u8; 32]), &mut buf).unwrap_err();
        assert!(matches!(err, EncodeError::TooLarge { max: 16, .. }));
        assert_eq!(&buf[..], b"xy");
        // Header alone over the bound.
        let err = FrameEncoder::new(3)
            .encode(&data(b""), &mut buf)
            .unwrap_err();
        assert!(matches!(err, EncodeError::TooLarge { max: 3, .. }));
        assert_eq!(&buf[..], b"xy");
    }

    #[test]
    fn ack_credit_travels_from_version_2_and_is_left_out_for_version_1() {
        let ack = Ack {
            channel: ChannelId(1),
            incarnation: 5,
            cumulative: 10,
            ranges: vec![SeqRange { start: 12, end: 13 }],
            credit: Some(4106),
            received: 0,
            held: Vec::new(),
        };
        for (version, want) in [(1, None), (2, Some(4106))] {
            let mut buf = BytesMut::new();
            FrameEncoder::default()
                .with_version(version)
                .encode(&Frame::Ack(ack.clone()), &mut buf)
                .unwrap();
            let got = FrameDecoder::default()
                .with_version(version)
                .decode(&mut buf)
                .unwrap();
            let Some(Frame::Ack(got)) = got else {
                panic!("{got:?}")
            };
            assert_eq!(got.credit, want, "version {version}");
            assert_eq!((got.cumulative, got.ranges), (10, ack.ranges.clone()));
        }
    }

    /// Held ranges (version 5): the encoder sends at most `MAX_HELD_RANGES`, the
    /// lowest; the decoder refuses an ack that lists more.
    #[test]
    fn held_ranges_are_bounded_on_both_sides() {
        let held: Vec<SeqRange> = (0..MAX_HELD_RANGES as u64 + 1)
            .map(|i| SeqRange {
                start: 10 * i + 20,
                end: 10 * i + 21,
            })
            .collect();
        let ack = Ack {
            channel: ChannelId(1),
            incarnation: 5,
            cumulative: 10,
            ranges: Vec::new(),
            credit: Some(4106),
            received: 11,
            held: held.clone(),
        };
        let mut buf = BytesMut::new();
        FrameEncoder::default()
            .encode(&Frame::Ack(ack.clone()), &mut buf)
            .unwrap();
        let Some(Frame::Ack(got)) = FrameDecoder::default().decode(&mut buf).unwrap() else {
            panic!("not an ack")
        };
        assert_eq!(got.held, held[..MAX_HELD_RANGES]);
        // One more than allowed, written by hand: malformed.
        let mut body = vec![WIRE_FORMAT_VERSION, KIND_ACK];
        let mut w = BytesMut::new();
        let _ = bincode::encode_into_writer(
            (
                ChannelId(1),
                5u64,
                10u64,
                Vec::<SeqRange>::new(),
                Some(4106u64),
                11u64,
                &held,
            ),
            BytesWriter(&mut w),
            bincode_config(),
        );
        body.extend_from_slice(&w);
        let mut buf = BytesMut::new();
        buf.put_u32_le(body.len() as u32);
        buf.put_u32_le(crc32c::crc32c(&body));
        buf.extend_from_slice(&body);
        let err = FrameDecoder::default().decode(&mut buf).unwrap_err();
        assert!(matches!(err, DecodeError::Malformed(_)), "{err:?}");
    }

    /// SACK ranges: an ack of `MAX_ACK_RANGES` decodes; one more is malformed, so a
    /// peer cannot make the node decode (and sort) millions of them from one frame.
    #[test]
    fn ack_ranges_are_bounded_when_decoded() {
        for (n, ok) in [(MAX_ACK_RANGES, true), (MAX_ACK_RANGES + 1, false)] {
            let ack = Ack {
                channel: ChannelId(1),
                incarnation: 5,
                cumulative: 10,
                ranges: (0..n as u64)
                    .map(|i| SeqRange {
                        start: 2 * i + 20,
                        end: 2 * i + 20,
                    })
                    .collect(),
                credit: Some(4106),
                received: 11,
                held: Vec::new(),
            };
            let mut buf = BytesMut::new();
            FrameEncoder::default()
                .encode(&Frame::Ack(ack.clone()), &mut buf)
                .unwrap();
            match FrameDecoder::default().decode(&mut buf) {
                Ok(Some(Frame::Ack(got))) if ok => assert_eq!(got.ranges, ack.ranges),
                Err(DecodeError::Malformed(_)) if !ok => {}
                other => panic!("{n} ranges: {other:?}"),
            }
        }
    }

    #[test]
    fn hostile_ack_range_count_is_malformed_not_a_huge_allocation() {
        // kind ACK with count = u64::MAX - small varint body, valid checksum.
        let mut body = vec![WIRE_FORMAT_VERSION, KIND_ACK, 1, 1, 1];
        body.push(253); // u64 varint marker
        body.extend_from_slice(&u64::MAX.to_le_bytes());
        let mut buf = BytesMut::new();
        buf.put_u32_le(body.len() as u32);
        buf.put_u32_le(crc32c::crc32c(&body));
        buf.extend_from_slice(&body);
        let err = FrameDecoder::default().decode(&mut buf).unwrap_err();
        assert!(matches!(err, DecodeError::Malformed(_)), "{err:?}");
    }

    #[test]
    fn a_length_prefix_alone_reserves_at_most_a_chunk_not_the_announced_frame() {
        let mut dec = FrameDecoder::default();
        let mut buf = BytesMut::new();
        buf.put_u32_le(DEFAULT_MAX_FRAME_LEN as u32);
        buf.put_u32_le(0);
        assert_eq!(dec.decode(&mut buf), Ok(None));
        assert!(
            buf.capacity() < 128 * 1024,
            "a prefix announcing {DEFAULT_MAX_FRAME_LEN} bytes reserved {}",
            buf.capacity()
        );
        // Asking again (a read that brought nothing new) reserves nothing more.
        assert_eq!(dec.decode(&mut buf), Ok(None));
        assert!(buf.capacity() < 128 * 1024, "{}", buf.capacity());
        assert_eq!(buf.len(), FRAME_PREFIX_LEN, "nothing consumed");
    }

    #[test]
    fn a_large_frame_fed_in_small_pieces_decodes_whole() {
        let payload: Vec<u8> = (0..3 * 1024 * 1024 + 17).map(|i| (i % 251) as u8).collect();
        let frame = Frame::Data(Data {
            channel: ChannelId(3),
            seq: 9,
            floor: 4,
            id_floor: 2,
            id: None,
            guarantee: Guarantee::AtLeastOnce,
            payload: Bytes::from(payload),
            schema: 0,
        });
        let mut wire = BytesMut::new();
        encode(&frame, &mut wire).unwrap();
        let mut dec = FrameDecoder::default();
        let mut buf = BytesMut::new();
        let mut got = None;
        let mut reallocations = 0;
        for (i, piece) in wire.chunks(1000).enumerate() {
            assert!(got.is_none(), "decoded before the last piece ({i})");
            let before = buf.capacity();
            buf.extend_from_slice(piece);
            got = dec.decode(&mut buf).unwrap();
            if buf.capacity() != before {
                reallocations += 1;
            }
            // Capacity follows what arrived, with a bounded look-ahead.
            if got.is_none() {
                assert!(
                    buf.capacity() <= 2 * buf.len() + 2 * RESERVE_AHEAD,
                    "capacity {} for {} bytes",
                    buf.capacity(),
                    buf.len()
                );
            }
        }
        assert_eq!(got, Some(frame));
        assert!(buf.is_empty());
        // Amortised growth: a few dozen reallocations, not one per piece.
        assert!(reallocations < 64, "{reallocations} reallocations");
    }

    #[test]
    fn trailing_bytes_after_header_are_malformed() {
        let mut body = vec![WIRE_FORMAT_VERSION, KIND_PING, 5, 0];
        let mut buf = BytesMut::new();
        buf.put_u32_le(body.len() as u32);
        buf.put_u32_le(crc32c::crc32c(&body));
        buf.extend_from_slice(&body);
        assert!(matches!(
            FrameDecoder::default().decode(&mut buf),
            Err(DecodeError::Malformed(_))
        ));
        body.pop();
        let mut buf = BytesMut::new();
        buf.put_u32_le(body.len() as u32);
        buf.put_u32_le(crc32c::crc32c(&body));
        buf.extend_from_slice(&body);
        assert_eq!(
            FrameDecoder::default().decode(&mut buf),
            Ok(Some(Frame::Ping(Heartbeat { nonce: 5 })))
        );
    }
}
