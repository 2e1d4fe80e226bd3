//! The repository's own integration suites that can share a process, as one test
//! binary: one module per suite (`cargo test --test integration shutdown::` runs one).
//!
//! One binary rather than one per suite: `cargo test` runs test binaries one after
//! another, so each suite's longest test (most wait on real timers) held up everything
//! after it, and each binary was linked on its own. Suites that cannot share a process
//! stay binaries of their own (`tests/*.rs`): property tests and simulations that keep
//! both cores busy, tests of crashes and child processes, and those that install a
//! tracing subscriber or measure the process. The black-box suites are the `blackbox`
//! binary (`tests/blackbox/`).

#[path = "../support/mod.rs"]
mod support;

mod batch;
mod chaos_tcp;
mod codec;
mod compat;
mod config_serde;
mod dedup_durable;
mod dedup_facade;
mod dedup_node_lifecycle;
mod flow_control;
mod framed;
mod handoff_e2e;
mod layering;
mod metrics;
mod node_credit;
mod node_mem;
mod rejections;
mod replica_group;
mod review_round;
mod review_round2;
mod review_round3;
mod review_round4;
mod shutdown;
mod slow_handler;
mod stream_sink;
mod tcp_delivery;
mod testing_harness;
mod tls;
mod tower_service;
mod transport_mem;
mod transport_tcp;
mod trust;
mod upgrade;
