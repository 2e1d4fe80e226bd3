//! SeqWindow against a set model, plus real-thread stress with exact counts.
#![cfg(not(ackwire_loom))] // real threads and files; the loom models are in loom_dedup.rs

use ackwire::dedup::{Admit, DedupError, SeqWindow};
use proptest::prelude::*;
use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

#[derive(Clone, Debug)]
enum Op {
    Begin(u64),
    Complete(u64),
    Release(u64),
    Floor(u64),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (1u64..200).prop_map(Op::Begin),
        3 => (1u64..200).prop_map(Op::Complete),
        1 => (1u64..200).prop_map(Op::Release),
        1 => (1u64..200).prop_map(Op::Floor),
    ]
}

/// The model: a set of done seqs, a set of in-progress seqs and a floor.
#[derive(Default)]
struct Model {
    done: HashSet<u64>,
    inprog: HashSet<u64>,
    floor: u64,
}

impl Model {
    fn watermark(&self) -> u64 {
        let mut w = self.floor.saturating_sub(1);
        while self.done.contains(&(w + 1)) {
            w += 1;
        }
        w
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    /// Property `seq_window_matches_set_model`: every answer of a single-threaded
    /// SeqWindow equals the set model's — in particular `Duplicate` only for seqs that
    /// are done or below the floor (no false duplicate), and `WindowOverrun` exactly
    /// when the seq's block is beyond the ring.
    #[test]
    fn seq_window_matches_set_model(ops in prop::collection::vec(op(), 1..300)) {
        let w = SeqWindow::new(64);
        let mut m = Model::default();
        for op in ops {
            match op {
                Op::Begin(s) => {
                    let wm = m.watermark();
                    let expect = if s <= wm || m.done.contains(&s) {
                        Ok(Admit::Duplicate)
                    } else if m.inprog.contains(&s) {
                        Ok(Admit::InProgress)
                    } else if (s >> 3) > ((wm + 1) >> 3) + 7 {
                        Err(())
                    } else {
                        m.inprog.insert(s);
                        Ok(Admit::Fresh)
                    };
                    let got = w.begin(s).map_err(|e| {
                        assert!(matches!(e, DedupError::WindowOverrun { .. }), "{e}");
                    });
                    prop_assert_eq!(got, expect, "begin({})", s);
                }
                Op::Complete(s) => {
                    let below = s <= m.watermark();
                    let was = m.inprog.remove(&s);
                    if was {
                        m.done.insert(s);
                    }
                    let got = w.complete(s);
                    if !below {
                        prop_assert_eq!(got, was, "complete({})", s);
                    }
                }
                Op::Release(s) => {
                    let below = s <= m.watermark();
                    let was = m.inprog.remove(&s);
                    let got = w.release(s);
                    if !below {
                        prop_assert_eq!(got, was, "release({})", s);
                    }
                }
                Op::Floor(f) => {
                    m.floor = m.floor.max(f);
                    w.advance_floor(f);
                }
            }
            prop_assert_eq!(w.watermark(), m.watermark());
        }
    }
}

/// Four threads offer every seq of 1..=N (two of them slightly out of order); a
/// `Fresh` is completed, `InProgress`/`WindowOverrun` are retried like a sender would.
/// Exactly N `Fresh` in total, 3N `Duplicate`, and the watermark ends at N.
#[test]
fn four_threads_exactly_one_fresh_per_seq() {
    const N: u64 = 20_000;
    let w = Arc::new(SeqWindow::new(1024));
    let fresh = Arc::new(AtomicU64::new(0));
    let dups = Arc::new(AtomicU64::new(0));
    let handles: Vec<_> = (0..4u64)
        .map(|t| {
            let (w, fresh, dups) = (w.clone(), fresh.clone(), dups.clone());
            std::thread::spawn(move || {
                let mut s = 1;
                while s <= N {
                    let seq = if t % 2 == 0 { s } else { (s ^ 3).clamp(1, N) };
                    match w.begin(seq) {
                        Ok(Admit::Fresh) => {
                            fresh.fetch_add(1, Ordering::Relaxed);
                            assert!(w.complete(seq));
                        }
                        Ok(Admit::Duplicate) => {
                            dups.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(Admit::InProgress) | Err(DedupError::WindowOverrun { .. }) => {
                            std::thread::yield_now();
                            continue;
                        }
                        Err(e) => panic!("{e}"),
                    }
                    s += 1;
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    assert_eq!(fresh.load(Ordering::Relaxed), N);
    assert_eq!(dups.load(Ordering::Relaxed), 3 * N);
    assert_eq!(w.watermark(), N);
}

/// Threads race `begin` with a floor advancing underneath (up to 1000): no seq above
/// the final floor is answered `Duplicate` unless some thread completed it, and each
/// of those is completed exactly once.
#[test]
fn floor_racing_begins_never_invents_duplicates_above_it() {
    let w = Arc::new(SeqWindow::new(256));
    let completed: Arc<Vec<AtomicU64>> = Arc::new((0..2001).map(|_| AtomicU64::new(0)).collect());
    let w2 = w.clone();
    let floors = std::thread::spawn(move || {
        for f in (0..=1000).step_by(10) {
            w2.advance_floor(f);
        }
    });
    let workers: Vec<_> = (0..2)
        .map(|_| {
            let (w, completed) = (w.clone(), completed.clone());
            std::thread::spawn(move || {
                let mut dup_above = Vec::new();
                for s in 1..=2000u64 {
                    loop {
                        match w.begin(s) {
                            Ok(Admit::Fresh) => {
                                completed[s as usize].fetch_add(1, Ordering::SeqCst);
                                w.complete(s);
                            }
                            Ok(Admit::Duplicate) => {
                                if s > 1000 && completed[s as usize].load(Ordering::SeqCst) == 0 {
                                    dup_above.push(s);
                                }
                            }
                            Ok(Admit::InProgress) => {}
                            Err(_) => {
                                std::thread::yield_now();
                                continue;
                            }
                        }
                        break;
                    }
                }
                dup_above
            })
        })
        .collect();
    floors.join().unwrap();
    for h in workers {
        assert_eq!(h.join().unwrap(), Vec::<u64>::new());
    }
    for (s, c) in completed.iter().enumerate().skip(1001) {
        assert_eq!(c.load(Ordering::SeqCst), 1, "seq {s}");
    }
}
