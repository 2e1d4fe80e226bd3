//! Hint segment recovery scan and store replay over arbitrary segment bytes: never
//! panics, every replayed hint is a record the scan found and decoded.
//! See `ackwire::fuzzing::fuzz_hint_segment` for the input layout.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    ackwire::fuzzing::fuzz_hint_segment(data);
});
