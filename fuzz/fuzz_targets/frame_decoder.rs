//! Frame decoder fed arbitrary bytes in random chunk sizes: never panics or loops, every
//! frame re-encodes and decodes to itself, chunked decoding equals whole decoding.
//! See `ackwire::fuzzing::fuzz_frame_decoder` for the input layout.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    ackwire::fuzzing::fuzz_frame_decoder(data);
});
