//! IdTable against a HashMap + clock model, plus real-thread stress with exact counts.
#![cfg(not(ackwire_loom))] // real threads and files; the loom models are in loom_dedup.rs

use ackwire::dedup::{Admit, DedupError, IdTable};
use ackwire::IdKey;
use proptest::prelude::*;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Clone, Debug)]
enum Op {
    Begin(u128),
    Complete(u128),
    Release(u128),
    Tick(u64),
}

/// Keys from a tiny domain, half of them differing only in the high bits, so homes
/// collide and full-key comparison is exercised.
fn key() -> impl Strategy<Value = u128> {
    (0u128..12, any::<bool>()).prop_map(|(k, hi)| if hi { k | (1 << 90) } else { k })
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        5 => key().prop_map(Op::Begin),
        3 => key().prop_map(Op::Complete),
        1 => key().prop_map(Op::Release),
        2 => (0u64..40).prop_map(Op::Tick),
    ]
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum St {
    InProg,
    Done(u64),
}

/// Key `i` of the stress tests: distinct for distinct `i`, spread over the table
/// (an odd multiplier), never the zero key.
fn spread_key(i: u128) -> IdKey {
    IdKey(i.wrapping_mul(0x9E37_79B9_7F4A_7C15_F39C_C060_5CED_C835) | 1)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    /// Property `id_table_matches_hashmap_clock_model`: with a 16-slot table and a
    /// 50 ms horizon, every answer equals the model (HashMap key → in progress /
    /// done-at-ms; done entries expire at done + horizon), except that the table may
    /// refuse with `TableFull` — and only for a key the model says is absent. So: never
    /// a false `Duplicate`, never a missed one, never a silent drop.
    #[test]
    fn id_table_matches_hashmap_clock_model(ops in prop::collection::vec(op(), 1..300)) {
        const H: u64 = 50;
        let t0 = Instant::now();
        let t = IdTable::new(16, Duration::from_millis(H), t0);
        let mut m: HashMap<u128, St> = HashMap::new();
        let mut now_ms = 0u64;
        for op in ops {
            let now = t0 + Duration::from_millis(now_ms);
            m.retain(|_, s| !matches!(s, St::Done(d) if now_ms >= *d + H));
            match op {
                Op::Begin(k) => {
                    let expect = match m.get(&k) {
                        Some(St::InProg) => Admit::InProgress,
                        Some(St::Done(_)) => Admit::Duplicate,
                        None => Admit::Fresh,
                    };
                    match t.begin(IdKey(k), now) {
                        Ok(a) => {
                            prop_assert_eq!(a, expect, "begin({:x})", k);
                            if a == Admit::Fresh {
                                m.insert(k, St::InProg);
                            }
                        }
                        Err(DedupError::TableFull { .. }) => {
                            prop_assert_eq!(expect, Admit::Fresh, "TableFull hid {:x}", k);
                        }
                        Err(e) => prop_assert!(false, "{}", e),
                    }
                }
                Op::Complete(k) => {
                    let was = m.get(&k) == Some(&St::InProg);
                    if was {
                        m.insert(k, St::Done(now_ms));
                    }
                    prop_assert_eq!(t.complete(IdKey(k), now), was);
                }
                Op::Release(k) => {
                    let was = m.get(&k) == Some(&St::InProg);
                    if was {
                        m.remove(&k);
                    }
                    prop_assert_eq!(t.release(IdKey(k)), was);
                }
                Op::Tick(ms) => now_ms += ms,
            }
        }
    }
}

/// Four threads offer the same 50 000 keys (two forwards, two backwards); a `Fresh`
/// is completed. Exactly one `Fresh` per key; the rest are `Duplicate`/`InProgress`.
#[test]
fn threads_racing_on_same_keys_get_exactly_one_fresh_each() {
    const N: u128 = 50_000;
    let t0 = Instant::now();
    let t = Arc::new(IdTable::new(1 << 17, Duration::from_secs(3600), t0));
    let fresh = Arc::new(AtomicU64::new(0));
    let hs: Vec<_> = (0..4u128)
        .map(|th| {
            let (t, fresh) = (t.clone(), fresh.clone());
            std::thread::spawn(move || {
                for i in 0..N {
                    let k = if th % 2 == 0 { i } else { N - 1 - i };
                    let k = IdKey(k.wrapping_mul(0x9E37_79B9_7F4A_7C15_F39C_C060_5CED_C835));
                    match t.begin(k, t0).unwrap() {
                        Admit::Fresh => {
                            fresh.fetch_add(1, Ordering::Relaxed);
                            assert!(t.complete(k, t0));
                        }
                        Admit::Duplicate | Admit::InProgress => {}
                    }
                }
            })
        })
        .collect();
    for h in hs {
        h.join().unwrap();
    }
    assert_eq!(fresh.load(Ordering::Relaxed), N as u64);
}

/// Three threads that fail a quarter of their attempts (release) and retry
/// `InProgress`: released slots are reused mid-chain all the time, and still every key
/// is completed exactly once.
#[test]
fn release_and_retry_completes_each_key_exactly_once() {
    const N: usize = 3_000;
    let t0 = Instant::now();
    let t = Arc::new(IdTable::new(4096, Duration::from_secs(3600), t0));
    let completions: Arc<Vec<AtomicU64>> = Arc::new((0..N).map(|_| AtomicU64::new(0)).collect());
    let hs: Vec<_> = (0..3u64)
        .map(|th| {
            let (t, completions) = (t.clone(), completions.clone());
            std::thread::spawn(move || {
                let mut x = th + 1;
                for i in 0..N {
                    let k = IdKey(i as u128 | 1 << 127);
                    loop {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        match t.begin(k, t0) {
                            Ok(Admit::Fresh) if x % 4 == 0 => {
                                assert!(t.release(k));
                                continue;
                            }
                            Ok(Admit::Fresh) => {
                                completions[i].fetch_add(1, Ordering::SeqCst);
                                assert!(t.complete(k, t0));
                                break;
                            }
                            Ok(Admit::Duplicate) => break,
                            Ok(Admit::InProgress) => std::thread::yield_now(),
                            Err(e) => panic!("{e}"),
                        }
                    }
                }
            })
        })
        .collect();
    for h in hs {
        h.join().unwrap();
    }
    for (i, c) in completions.iter().enumerate() {
        assert_eq!(c.load(Ordering::SeqCst), 1, "key {i}");
    }
}

/// No false positives under expiry churn: two threads insert unique keys (each key
/// offered once, by one thread) into a 256-slot table with a 1 ms horizon while the
/// clock advances, so expired slots are reclaimed constantly and keys share chains.
/// Every answer must be `Fresh` or `TableFull` — never `Duplicate`/`InProgress`.
#[test]
fn unique_keys_under_expiry_churn_are_never_reported_duplicate() {
    let t0 = Instant::now();
    let t = Arc::new(IdTable::new(256, Duration::from_millis(1), t0));
    unique_keys_under_churn(t, t0);
    // The same on a growing table: generations are added and dropped whole under the
    // racers all the time.
    let t = Arc::new(IdTable::growing(16, 1 << 20, Duration::from_millis(1), t0));
    unique_keys_under_churn(t.clone(), t0);
    assert!(t.generations_dropped() > 100, "{t:?}");
}

fn unique_keys_under_churn(t: Arc<IdTable>, t0: Instant) {
    let hs: Vec<_> = (0..2u128)
        .map(|th| {
            let t = t.clone();
            std::thread::spawn(move || {
                let mut full = 0u64;
                for i in 0..100_000u128 {
                    let now = t0 + Duration::from_micros((i * 50) as u64);
                    let k = IdKey((th << 120) | i.wrapping_mul(0x2545_F491_4F6C_DD1D));
                    match t.begin(k, now) {
                        Ok(Admit::Fresh) => assert!(t.complete(k, now)),
                        Err(DedupError::TableFull { .. }) => full += 1,
                        other => panic!("false positive for a unique key: {other:?}"),
                    }
                }
                full
            })
        })
        .collect();
    let full: u64 = hs.into_iter().map(|h| h.join().unwrap()).sum();
    // Expired entries go either one by one (reused in place) or a whole generation
    // at a time (the table is swapped for a fresh one once everything in it expired).
    assert!(
        t.expired_reclaimed_count() + 256 * t.generations_dropped() > 100_000,
        "churn happened: {t:?}"
    );
    assert_eq!(t.table_full_count(), full);
}

/// Stress: four threads offer the same 40 000 keys (two ascending, two descending) to a
/// growing table that starts at 8 slots, so generations are added (and the racers
/// straddle them) all through the run. Exactly one `Fresh` per key, no refusal, and
/// every key is a `Duplicate` afterwards.
#[test]
fn threads_racing_on_same_keys_while_the_table_grows_get_exactly_one_fresh_each() {
    const N: u128 = 40_000;
    let t0 = Instant::now();
    let t = Arc::new(IdTable::growing(
        8,
        256 << 20,
        Duration::from_secs(3600),
        t0,
    ));
    let fresh = Arc::new(AtomicU64::new(0));
    let hs: Vec<_> = (0..4u128)
        .map(|th| {
            let (t, fresh) = (t.clone(), fresh.clone());
            std::thread::spawn(move || {
                for i in 0..N {
                    let k = spread_key(if th % 2 == 0 { i } else { N - 1 - i });
                    match t.begin(k, t0).unwrap() {
                        Admit::Fresh => {
                            fresh.fetch_add(1, Ordering::Relaxed);
                            assert!(t.complete(k, t0));
                        }
                        Admit::Duplicate | Admit::InProgress => {}
                    }
                }
            })
        })
        .collect();
    for h in hs {
        h.join().unwrap();
    }
    assert_eq!(fresh.load(Ordering::Relaxed), N as u64);
    assert!(t.generations() > 3, "{t:?}");
    assert_eq!(t.table_full_count(), 0);
    for i in 0..N {
        assert_eq!(
            t.begin(spread_key(i), t0).unwrap(),
            Admit::Duplicate,
            "key {i}"
        );
    }
}

/// Stress for `begin_many`, which claims a group of keys before one fence and then
/// arbitrates them: four threads offer the same 40 000 keys in batches of 64 (two
/// ascending, two descending; every batch repeats one of its keys), two of them
/// through `begin_many` and two through `begin`, on a fixed table and on a growing one
/// that starts at 8 slots (generations are added under the racers all through the
/// run). Exactly one `Fresh` per key, no refusal, every key a `Duplicate` afterwards.
#[test]
fn batches_racing_single_begins_on_same_keys_get_exactly_one_fresh_each() {
    const N: u128 = 40_000;
    let t0 = Instant::now();
    let h = Duration::from_secs(3600);
    for t in [
        IdTable::new(1 << 17, h, t0),
        IdTable::growing(8, 256 << 20, h, t0),
    ] {
        let t = Arc::new(t);
        let fresh = Arc::new(AtomicU64::new(0));
        let hs: Vec<_> = (0..4u128)
            .map(|th| {
                let (t, fresh) = (t.clone(), fresh.clone());
                std::thread::spawn(move || {
                    let order: Vec<IdKey> = (0..N)
                        .map(|i| spread_key(if th % 2 == 0 { i } else { N - 1 - i }))
                        .collect();
                    let mut out = Vec::new();
                    for chunk in order.chunks(64) {
                        let mut batch = chunk.to_vec();
                        batch.push(chunk[chunk.len() / 2]);
                        out.clear();
                        if th < 2 {
                            t.begin_many(&batch, t0, &mut out).unwrap();
                        } else {
                            out.extend(batch.iter().map(|&k| t.begin(k, t0).unwrap()));
                        }
                        assert_eq!(out.len(), batch.len());
                        for (k, a) in batch.iter().zip(&out) {
                            if *a == Admit::Fresh {
                                fresh.fetch_add(1, Ordering::Relaxed);
                                assert!(t.complete(*k, t0));
                            }
                        }
                    }
                })
            })
            .collect();
        for h in hs {
            h.join().unwrap();
        }
        assert_eq!(fresh.load(Ordering::Relaxed), N as u64, "{t:?}");
        assert_eq!(t.table_full_count(), 0);
        for i in 0..N {
            assert_eq!(
                t.begin(spread_key(i), t0).unwrap(),
                Admit::Duplicate,
                "key {i}"
            );
        }
    }
}
