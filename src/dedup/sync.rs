//! Atomics shim: loom's model-checked atomics under `--cfg ackwire_loom`, std's otherwise.
//!
//! Owns nothing but the import switch; the dedup structures must take every atomic from
//! here so `tests/loom_dedup.rs` explores their real code.

#[cfg(ackwire_loom)]
pub(crate) use loom::sync::atomic::*;
#[cfg(not(ackwire_loom))]
pub(crate) use std::sync::atomic::*;
