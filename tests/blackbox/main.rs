//! Black-box suites, written from the docs alone against the public API (real TCP on
//! loopback, default settings unless a test is about a setting), as one test binary:
//! one module per suite. Run one suite with `cargo test --test blackbox acceptance::`,
//! one test with `cargo test --test blackbox NAME`.
//!
//! One binary rather than one per suite because most of these tests spend their time
//! waiting on real timers (retransmission timeouts, deadlines, failure detection):
//! `cargo test` runs test binaries one after another, so each suite's longest test
//! held up everything after it, while the machine sat mostly idle. Together, the
//! suites' tests overlap (and the binary is linked once instead of twenty times).
//!
//! Suites that cannot share a process stay binaries of their own
//! (`tests/blackbox_*.rs`): those that measure the process (file descriptors, RSS,
//! tasks: `leaks`, `liars`, `links`, `os_limits`, `adversary`, `misbehaving_peer`), run
//! child processes of their own binary (`batch`, `files`, `handlers`, `ordering`,
//! `restarts`), install a global tracing subscriber (`claims`, `slow_handlers`), or need
//! the machine to themselves (`scale`).
//!
//! Every module takes its ports from the one `support::ports` of this binary: ports
//! are handed out once per process, so two suites never get the same one.

#[path = "../support/mod.rs"]
mod support;

mod acceptance;
mod api;
mod boundaries;
mod combos;
mod concurrency;
mod cuts;
mod docs_audit;
mod durability;
mod groups;
mod keys;
mod lifecycle;
mod mismatch;
mod ops;
mod pressure;
mod relays;
mod replay;
mod runtimes;
mod surfaces;
mod tails;
mod trust;
