//! Loopback addresses for test nodes, from ports outside the kernel's ephemeral range.
//!
//! Many tests stop a node and start it again on the same port (as a restarted
//! service would). A node bound to `127.0.0.1:0` gets an ephemeral port, and once it
//! stops, any other socket in the test run that binds port 0 may be given that port
//! before the restart binds it again: the restart then fails with `AddrInUse` (seen
//! on CI). Ports handed out here come from below the ephemeral range, which the kernel
//! never assigns on its own, and each is handed out once per process, so a port stays
//! free for its test between a stop and a restart.
#![allow(dead_code, unreachable_pub)]

use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;

/// The pool: ports below the kernel's ephemeral range (Linux default 32768..=60999),
/// above the ports that services conventionally use.
fn pool() -> (u32, u32) {
    let eph_lo = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32_768);
    if eph_lo > 12_000 {
        (10_000, eph_lo)
    } else {
        // An unusual range starting low: use the ports above it instead.
        (61_000, 65_535)
    }
}

/// A loopback address whose port is free now and is handed out to no other caller in
/// this process; bind a node to it, stop the node, and bind the next one to it again.
pub fn restartable_addr() -> SocketAddr {
    static START: OnceLock<u32> = OnceLock::new();
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let (lo, hi) = pool();
    let len = hi - lo;
    // Different test processes (and the child processes of the crash tests) start at
    // different places in the pool.
    let start = *START.get_or_init(|| {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        (std::process::id().wrapping_mul(7_919) ^ nanos) % len
    });
    for _ in 0..len {
        let port = lo + (start + NEXT.fetch_add(1, Ordering::Relaxed)) % len;
        let addr = SocketAddr::from(([127, 0, 0, 1], port as u16));
        if TcpListener::bind(addr).is_ok() {
            return addr;
        }
    }
    // Every port of the pool taken: fall back on the kernel's choice.
    SocketAddr::from(([127, 0, 0, 1], 0))
}
