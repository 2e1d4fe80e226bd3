//! Throughput smoke test (issue 14, item 6; not timed): one million messages per
//! guarantee through real TCP loopback with the default configuration, sent with the
//! batch API and received with `recv_many`, each checked against its guarantee's
//! property.
//!
//! `ACKWIRE_MILLION` shortens the count for quick local runs.
#![cfg(not(ackwire_loom))]

mod support;

use ackwire::{ChannelId, ChannelOptions, Guarantee, NodeId};
use std::time::Duration;
use support::pair::{tcp_pair, GUARANTEES};

const CH: ChannelId = ChannelId(14);

fn n() -> u64 {
    std::env::var("ACKWIRE_MILLION")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000)
}

/// Property, per guarantee, with default settings over TCP loopback (which loses
/// nothing): every receipt resolves `Ok`; at-most-once delivers no message twice;
/// at-least-once delivers every message at least once; effectively-once delivers every
/// message exactly once. Loopback loses nothing, so at-most-once must deliver all too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_million_messages_per_guarantee_keep_their_property() {
    let n = n();
    for (i, g) in GUARANTEES.into_iter().enumerate() {
        let (rx_id, tx_id) = (NodeId(140 + 2 * i as u64), NodeId(141 + 2 * i as u64));
        let (b, a) = tcp_pair(rx_id, tx_id).await;
        let mut inbox = b.receiver::<u64>(CH, false).unwrap();
        let handler = tokio::spawn(async move {
            // How many times each value was delivered.
            let mut times = vec![0u8; n as usize];
            let mut distinct = 0u64;
            let mut buf = Vec::with_capacity(1024);
            while distinct < n {
                if inbox.recv_many(&mut buf, 1024).await == 0 {
                    break;
                }
                for d in buf.drain(..) {
                    let v = *d.message();
                    let t = &mut times[v as usize];
                    if *t == 0 {
                        distinct += 1;
                    }
                    *t = t.saturating_add(1);
                    d.ack();
                }
            }
            times
        });
        let out = a.sender::<u64>(rx_id, ChannelOptions::new(CH, g)).unwrap();
        let values: Vec<u64> = (0..n).collect();
        tokio::time::timeout(Duration::from_secs(300), async {
            for chunk in values.chunks(10_000) {
                for r in out.send_many(chunk).await.unwrap() {
                    // Awaited chunk by chunk, so at most one chunk of receipts is kept.
                    r.await.unwrap_or_else(|e| panic!("{g:?}: {e}"));
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("{g:?}: sending or receipts stalled"));
        let times = tokio::time::timeout(Duration::from_secs(60), handler)
            .await
            .unwrap_or_else(|_| panic!("{g:?}: not everything was delivered"))
            .unwrap();
        let missing = times.iter().filter(|t| **t == 0).count();
        let repeated = times.iter().filter(|t| **t > 1).count();
        assert_eq!(missing, 0, "{g:?}: {missing} of {n} never delivered");
        if g != Guarantee::AtLeastOnce {
            assert_eq!(repeated, 0, "{g:?}: {repeated} delivered more than once");
        }
        let sa = a.stats().await.unwrap().proto;
        eprintln!(
            "{g:?}: {n} msgs; repeated {repeated}; retransmitted {}",
            sa.retransmitted
        );
        support::reliability::report(
            &format!("{g:?}"),
            "default config, TCP loopback, send_many / recv_many",
            &format!("1 run x {n} msgs"),
            "all delivered; none twice (at-most-once, effectively-once)",
        );
        a.shutdown().await;
        b.shutdown().await;
    }
}
