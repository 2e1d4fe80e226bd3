//! kill -9 test of the hint store: a child process appends with `FsyncPolicy::Always` and
//! reports each acknowledged position on stdout; the parent SIGKILLs it at a random moment,
//! reopens the store and checks every acknowledged hint is present and intact.
//!
//! The child is this same test binary, re-executed with
//! `--exact child_appender --nocapture --ignored` and `ACKWIRE_HANDOFF_CRASH_DIR` set.

use ackwire::handoff::{FsyncPolicy, Hint, HintStore, HintStoreConfig};
use ackwire::{ChannelId, Guarantee, MessageId, NodeId, Origin};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const DIR_ENV: &str = "ACKWIRE_HANDOFF_CRASH_DIR";
const TARGET: NodeId = NodeId(5);

fn config(dir: &std::path::Path) -> HintStoreConfig {
    HintStoreConfig {
        fsync: FsyncPolicy::Always,
        segment_bytes: 64 << 10,
        ..HintStoreConfig::new(dir)
    }
}

/// The hint the child writes as its `seq`-th append (payload length varies with seq).
fn expected(seq: u64) -> Hint {
    Hint {
        target: TARGET,
        id: MessageId::Seq {
            origin: Origin {
                node: NodeId(1),
                incarnation: 77,
            },
            channel: ChannelId(1),
            seq,
        },
        channel: ChannelId(1),
        guarantee: Guarantee::AtLeastOnce,
        created_unix_ms: 1_000_000,
        ttl_ms: 1_000_000,
        payload: (0..(seq % 700) as usize + 1)
            .map(|i| (seq as usize ^ i) as u8)
            .collect::<Vec<u8>>()
            .into(),
    }
}

/// The appender run in the child process; does nothing unless `ACKWIRE_HANDOFF_CRASH_DIR`
/// is set, so `cargo test -- --include-ignored` is harmless.
#[test]
#[ignore]
fn child_appender() {
    let Ok(dir) = std::env::var(DIR_ENV) else {
        return;
    };
    let (mut store, _) = HintStore::open(config(dir.as_ref())).unwrap();
    let out = std::io::stdout();
    let start = Instant::now();
    // Bounded so an orphaned child cannot run forever.
    for seq in 0..1_000_000u64 {
        if start.elapsed() > Duration::from_secs(30) {
            break;
        }
        let pos = store.append(expected(seq), None, Instant::now()).unwrap();
        let mut out = out.lock();
        writeln!(out, "DURABLE {seq} {} {}", pos.segment, pos.offset).unwrap();
        out.flush().unwrap();
    }
}

/// Small xorshift for kill timing (the crate's PRNG is crate-private).
fn next_rand(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

fn run_once(seed: u64) {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child_appender", "--nocapture", "--ignored"])
        .env(DIR_ENV, dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() == 4 && f[0] == "DURABLE" {
                let nums: Vec<u64> = f[1..].iter().map(|x| x.parse().unwrap()).collect();
                let _ = tx.send((nums[0], nums[1], nums[2]));
            }
        }
    });
    // Kill at a random moment after the first acknowledged append.
    let first = rx.recv_timeout(Duration::from_secs(20));
    let mut st = seed | 1;
    next_rand(&mut st);
    let delay = Duration::from_millis(next_rand(&mut st) % 300);
    std::thread::sleep(delay);
    child.kill().unwrap(); // SIGKILL on unix
    child.wait().unwrap();
    reader.join().unwrap();
    let mut acked: Vec<(u64, u64, u64)> = first.into_iter().collect();
    acked.extend(rx.try_iter());
    assert!(
        !acked.is_empty(),
        "child acknowledged nothing (seed {seed})"
    );

    let (mut store, report) = HintStore::open(config(dir.path())).unwrap();
    assert!(report.quarantined.is_empty(), "{report:?}");
    assert_eq!(report.corrupt_regions, 0, "{report:?}");
    let mut found = BTreeMap::new();
    loop {
        let batch = store.next_batch(TARGET, 1 << 20, 1_500_000).unwrap();
        if batch.is_empty() {
            break;
        }
        for (pos, h) in batch {
            let MessageId::Seq { seq, .. } = h.id else {
                panic!("unexpected id {:?}", h.id)
            };
            assert_eq!(h, expected(seq), "recovered hint {seq} differs");
            assert!(found.insert(seq, pos).is_none(), "hint {seq} twice");
        }
    }
    for &(seq, segment, offset) in &acked {
        let pos = found
            .get(&seq)
            .unwrap_or_else(|| panic!("acknowledged hint {seq} lost (seed {seed}, {report:?})"));
        assert_eq!((pos.segment, pos.offset), (segment, offset));
    }
    // Appends are sequential, so what survived is a prefix 0..k with k >= acked.
    let k = found.len() as u64;
    assert!(found.keys().copied().eq(0..k), "gap in recovered hints");
    assert!(k >= acked.len() as u64);
    assert!(
        k <= acked.len() as u64 + 1,
        "at most the one in-flight append extra"
    );
    eprintln!(
        "seed {seed}: killed after {delay:?}, {} acknowledged, {k} recovered, torn tails {}",
        acked.len(),
        report.torn_tails
    );
}

fn seed(i: u64) -> u64 {
    let t = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    t ^ (i.wrapping_mul(0x9E37_79B9_7F4A_7C15))
}

#[test]
fn kill9_during_appends_loses_no_acknowledged_hint() {
    for i in 0..3 {
        run_once(seed(i));
    }
    println!("reliability: hint store | kill -9 of a process appending hints (fsync Always) | 3 kills | every append reported durable was recovered intact");
}

/// Longer run: `cargo test --test handoff_crash -- --ignored kill9_many`.
#[test]
#[ignore]
fn kill9_many() {
    for i in 0..40 {
        run_once(seed(i));
    }
    println!("reliability: hint store | kill -9 of a process appending hints (fsync Always) | 40 kills | every append reported durable was recovered intact");
}
