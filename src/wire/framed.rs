//! The frame codec as a `tokio_util::codec` [`Decoder`] / [`Encoder`] (feature
//! `tokio-util`), for tools that speak ackwire's wire format over their own IO with
//! `FramedRead`, `FramedWrite` or `Framed`.
//!
//! Owns the adaptation only: every call goes to [`FrameDecoder::decode`] /
//! [`FrameEncoder::encode`], so the bytes, bounds and checks are exactly the
//! hand-written codec's (see its module docs for why it stays hand-written and why the
//! TCP transport does not use `Framed`). A connection that negotiated an older protocol
//! version switches with `framed.decoder_mut()` / `encoder_mut()` and
//! [`FrameDecoder::with_version`] / [`FrameEncoder::with_version`].
//!
//! ```
//! use ackwire::wire::{Frame, FrameDecoder, FrameEncoder, Heartbeat};
//! use futures::{SinkExt, StreamExt};
//! use tokio_util::codec::{FramedRead, FramedWrite};
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let (client, server) = tokio::io::duplex(1024);
//! let mut out = FramedWrite::new(client, FrameEncoder::default());
//! let mut frames = FramedRead::new(server, FrameDecoder::default());
//! out.send(Frame::Ping(Heartbeat { nonce: 7 })).await.unwrap();
//! let got = frames.next().await.unwrap().unwrap();
//! assert_eq!(got, Frame::Ping(Heartbeat { nonce: 7 }));
//! # }
//! ```

use super::codec::{DecodeError, EncodeError, FrameDecoder, FrameEncoder};
use super::frame::Frame;
use bytes::BytesMut;
use tokio_util::codec::{Decoder, Encoder};

/// What a `Framed` stream or sink of frames fails with: the IO error of the underlying
/// reader or writer, or the codec's own (after a [`FramedError::Decode`] the byte
/// stream cannot be framed again: close the connection).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FramedError {
    /// Reading or writing failed (including a stream that ended inside a frame).
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// The input is not a valid frame ([`FrameDecoder::decode`]'s error).
    #[error(transparent)]
    Decode(#[from] DecodeError),
    /// The frame could not be encoded ([`FrameEncoder::encode`]'s error); nothing was
    /// written.
    #[error(transparent)]
    Encode(#[from] EncodeError),
}

impl Decoder for FrameDecoder {
    type Item = Frame;
    type Error = FramedError;

    #[inline]
    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, FramedError> {
        Ok(FrameDecoder::decode(self, src)?)
    }
}

/// Owned frames only: a second impl for `&Frame` would make every `flush` and `close`
/// of a `FramedWrite` need a type annotation.
impl Encoder<Frame> for FrameEncoder {
    type Error = FramedError;

    #[inline]
    fn encode(&mut self, frame: Frame, dst: &mut BytesMut) -> Result<(), FramedError> {
        Ok(FrameEncoder::encode(self, &frame, dst)?)
    }
}
