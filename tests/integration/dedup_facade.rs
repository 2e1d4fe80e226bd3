//! The `Dedup` façade: routing, stats, limits, config validation.
#![cfg(not(ackwire_loom))] // real threads and files; the loom models are in loom_dedup.rs

use ackwire::dedup::{Admit, Dedup, DedupConfig, DedupError};
use ackwire::{ChannelId, IdKey, MessageId, NodeId, Origin};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn seq(node: u64, ch: u32, seq: u64) -> MessageId {
    MessageId::Seq {
        origin: Origin {
            node: NodeId(node),
            incarnation: 1,
        },
        channel: ChannelId(ch),
        seq,
    }
}

fn assert_send_sync<T: Send + Sync>() {}

#[test]
fn stats_count_every_outcome_and_limits_are_typed_errors() {
    assert_send_sync::<Dedup>();
    let d = Dedup::open(DedupConfig {
        window: 64,
        max_streams: 2,
        max_streams_per_node: 2,
        table_capacity: 8,
        table_budget_bytes: 8 * ackwire::dedup::BYTES_PER_SLOT,
        horizon: Duration::from_secs(1),
        retention: Duration::from_secs(3600),
        durable: None,
    })
    .unwrap();
    let now = Instant::now();
    assert_eq!(d.begin(&seq(1, 0, 1), now).unwrap(), Admit::Fresh);
    assert_eq!(d.begin(&seq(1, 0, 1), now).unwrap(), Admit::InProgress);
    d.release(&seq(1, 0, 1));
    assert_eq!(d.begin(&seq(1, 0, 1), now).unwrap(), Admit::Fresh);
    d.complete(&seq(1, 0, 1), now).unwrap();
    assert_eq!(d.begin(&seq(1, 0, 1), now).unwrap(), Admit::Duplicate);
    assert!(matches!(
        d.begin(&seq(1, 0, 100), now),
        Err(DedupError::WindowOverrun { .. })
    ));
    d.advance_floor(seq_origin(1), ChannelId(0), 90, now)
        .unwrap();
    assert_eq!(d.begin(&seq(1, 0, 100), now).unwrap(), Admit::Fresh);
    assert_eq!(d.begin(&seq(2, 0, 1), now).unwrap(), Admit::Fresh);
    assert!(matches!(
        d.begin(&seq(3, 0, 1), now),
        Err(DedupError::TooManyStreams { max: 2 })
    ));
    for k in 0..8 {
        assert_eq!(
            d.begin(&MessageId::Key(IdKey(k)), now).unwrap(),
            Admit::Fresh
        );
    }
    assert!(matches!(
        d.begin(&MessageId::Key(IdKey(8)), now),
        Err(DedupError::TableFull { capacity: 8, .. })
    ));
    let s = d.stats();
    assert_eq!(s.fresh, 12);
    assert_eq!(s.duplicates, 1);
    assert_eq!(s.in_progress_hits, 1);
    assert_eq!(s.overruns, 1);
    assert_eq!(s.table_full, 1);
    assert_eq!(s.released, 1);
    assert_eq!(s.completed, 1);
    assert_eq!(s.streams, 2);
    assert_eq!(d.watermark_of(seq_origin(1), ChannelId(0)), Some(89));
}

fn seq_origin(node: u64) -> Origin {
    Origin {
        node: NodeId(node),
        incarnation: 1,
    }
}

#[test]
fn invalid_configs_are_rejected() {
    for bad in [
        DedupConfig {
            window: 0,
            ..Default::default()
        },
        DedupConfig {
            table_capacity: 0,
            ..Default::default()
        },
        DedupConfig {
            max_streams: 0,
            ..Default::default()
        },
        DedupConfig {
            max_streams_per_node: 0,
            ..Default::default()
        },
        DedupConfig {
            horizon: Duration::ZERO,
            ..Default::default()
        },
        DedupConfig {
            retention: Duration::ZERO,
            ..Default::default()
        },
        DedupConfig {
            table_capacity: 1024,
            table_budget_bytes: 1023 * ackwire::dedup::BYTES_PER_SLOT,
            ..Default::default()
        },
    ] {
        assert!(matches!(
            Dedup::open(bad),
            Err(DedupError::InvalidConfig(_))
        ));
    }
    assert!(DedupConfig::default().validate().is_ok());
}

/// Many threads discover the same new streams at once: one window per stream, one
/// `Fresh` per seq.
#[test]
fn concurrent_stream_discovery_registers_each_stream_once() {
    let d = Arc::new(Dedup::open(DedupConfig::default()).unwrap());
    let now = Instant::now();
    let hs: Vec<_> = (0..4)
        .map(|_| {
            let d = d.clone();
            std::thread::spawn(move || {
                let mut fresh = 0;
                for node in 0..200 {
                    for s in 1..=5 {
                        if d.begin(&seq(node, 3, s), now).unwrap() == Admit::Fresh {
                            fresh += 1;
                            d.complete(&seq(node, 3, s), now).unwrap();
                        }
                    }
                }
                fresh
            })
        })
        .collect();
    let fresh: u64 = hs.into_iter().map(|h| h.join().unwrap()).sum();
    assert_eq!(fresh, 1000);
    assert_eq!(d.stats().streams, 200);
}
