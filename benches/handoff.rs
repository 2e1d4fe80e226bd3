//! Hint store throughput: append per fsync policy and replay, against a plain sequential
//! file write of the same bytes (with and without fsync per write) as the baseline.
//!
//! Run: `cargo bench -p ackwire-benches --bench handoff -- --warm-up-time 1 --measurement-time 3`.

use ackwire::handoff::{FsyncPolicy, Hint, HintStore, HintStoreConfig};
use ackwire::{ChannelId, Guarantee, MessageId, NodeId, Origin};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use std::io::Write;
use std::time::{Duration, Instant};

const T: NodeId = NodeId(3);
const PAYLOAD: usize = 1024;
/// Appends between resets, so a run never leaves more than ~16 MiB on disk.
const CHUNK: u64 = 16 * 1024;

fn hint(seq: u64) -> Hint {
    Hint {
        target: T,
        id: MessageId::Seq {
            origin: Origin {
                node: NodeId(1),
                incarnation: 1,
            },
            channel: ChannelId(0),
            seq,
        },
        channel: ChannelId(0),
        guarantee: Guarantee::EffectivelyOnce,
        created_unix_ms: 1_000,
        ttl_ms: 1 << 40,
        payload: vec![0xa5; PAYLOAD].into(),
    }
}

fn config(dir: &std::path::Path, fsync: FsyncPolicy) -> HintStoreConfig {
    HintStoreConfig {
        fsync,
        ..HintStoreConfig::new(dir)
    }
}

/// On-disk size of one 1 KiB-payload record, so the baseline writes the same bytes.
fn record_len() -> usize {
    let dir = tempfile::tempdir().unwrap();
    let (mut s, _) = HintStore::open(config(dir.path(), FsyncPolicy::Never)).unwrap();
    s.append(hint(1), None, Instant::now()).unwrap();
    s.targets()[0].pending_bytes as usize
}

fn append(c: &mut Criterion) {
    let rec = record_len();
    let mut g = c.benchmark_group("handoff_append_1KiB");
    g.throughput(Throughput::Bytes(rec as u64));
    let policies = [
        ("always", FsyncPolicy::Always),
        ("every_10ms", FsyncPolicy::Every(Duration::from_millis(10))),
        ("never", FsyncPolicy::Never),
    ];
    for (name, policy) in policies {
        g.bench_function(name, |b| {
            let dir = tempfile::tempdir().unwrap();
            let (mut store, _) = HintStore::open(config(dir.path(), policy)).unwrap();
            let mut seq = 0;
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                let mut done = 0;
                while done < iters {
                    let n = (iters - done).min(CHUNK);
                    let start = Instant::now();
                    for _ in 0..n {
                        seq += 1;
                        store.append(hint(seq), None, Instant::now()).unwrap();
                    }
                    total += start.elapsed();
                    done += n;
                    store.decommission(T).unwrap();
                }
                total
            });
        });
    }
    for (name, fsync) in [("raw_write_fsync", true), ("raw_write", false)] {
        g.bench_function(name, |b| {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("raw.log");
            let buf = vec![0xa5u8; rec];
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                let mut done = 0;
                while done < iters {
                    let n = (iters - done).min(CHUNK);
                    let mut f = std::fs::File::create(&path).unwrap();
                    let start = Instant::now();
                    for _ in 0..n {
                        f.write_all(&buf).unwrap();
                        if fsync {
                            f.sync_data().unwrap();
                        }
                    }
                    total += start.elapsed();
                    done += n;
                }
                total
            });
        });
    }
    g.finish();
}

fn replay(c: &mut Criterion) {
    let rec = record_len();
    let mut g = c.benchmark_group("handoff_replay_1KiB");
    g.throughput(Throughput::Bytes(rec as u64));
    g.bench_function("next_batch_256KiB+mark_delivered", |b| {
        let dir = tempfile::tempdir().unwrap();
        let (mut store, _) = HintStore::open(config(dir.path(), FsyncPolicy::Never)).unwrap();
        let mut seq = 0;
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            let mut done = 0;
            while done < iters {
                let n = (iters - done).min(CHUNK);
                for _ in 0..n {
                    seq += 1;
                    store.append(hint(seq), None, Instant::now()).unwrap();
                }
                let start = Instant::now();
                let mut got = 0;
                while got < n {
                    let batch = store.next_batch(T, 256 << 10, 2_000).unwrap();
                    got += batch.len() as u64;
                    for (pos, h) in batch {
                        std::hint::black_box(h);
                        store.mark_delivered(T, pos).unwrap();
                    }
                }
                total += start.elapsed();
                done += n;
            }
            total
        });
    });
    g.bench_function("raw_read", |b| {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("raw.log");
        std::fs::write(&path, vec![0xa5u8; rec * CHUNK as usize]).unwrap();
        b.iter_custom(|iters| {
            use std::io::Read;
            let mut total = Duration::ZERO;
            let mut done = 0;
            let mut buf = vec![0u8; rec];
            while done < iters {
                let n = (iters - done).min(CHUNK);
                let mut f = std::fs::File::open(&path).unwrap();
                let start = Instant::now();
                for _ in 0..n {
                    f.read_exact(&mut buf).unwrap();
                    std::hint::black_box(&buf);
                }
                total += start.elapsed();
                done += n;
            }
            total
        });
    });
    g.finish();
}

criterion_group!(benches, append, replay);
criterion_main!(benches);
