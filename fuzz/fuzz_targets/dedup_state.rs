//! Durable dedup log parse and `Dedup::open` on a log file holding arbitrary bytes:
//! never panics, open succeeds or returns a typed error, recovery truncates to the
//! intact part. See `ackwire::fuzzing::fuzz_dedup_state` for the input layout.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;

static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();

fuzz_target!(|data: &[u8]| {
    let dir = DIR.get_or_init(|| tempfile::tempdir().expect("scratch dir"));
    // Ok or a typed error are both fine; invariant violations panic inside.
    let _ = ackwire::fuzzing::fuzz_dedup_state(dir.path(), data);
});
