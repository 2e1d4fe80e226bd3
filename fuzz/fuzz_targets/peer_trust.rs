//! Inbound authorization on arbitrary data frames, and the TLS configuration / peer
//! certificate inputs on arbitrary bytes: never panics, refusals follow the documented
//! rule. See `ackwire::fuzzing::fuzz_peer_trust` for the input layout.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    ackwire::fuzzing::fuzz_peer_trust(data);
});
