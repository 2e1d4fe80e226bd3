//! Loom model checks of the dedup structures' races.
//!
//! Run with: `RUSTFLAGS="--cfg ackwire_loom" cargo test --release --test loom_dedup`
//! (the structures take their atomics from `ackwire::dedup`'s loom shim under that cfg).
#![cfg(ackwire_loom)]

use ackwire::dedup::{Admit, Dedup, DedupConfig, DedupError, IdTable, SeqWindow};
use ackwire::{ChannelId, IdKey, MessageId, NodeId, Origin};
use loom::sync::Arc;
use loom::thread;
use std::time::{Duration, Instant};

/// Two threads check-and-insert the same key: exactly one `Fresh`.
#[test]
fn table_same_key_race_has_exactly_one_fresh() {
    loom::model(|| {
        let t0 = Instant::now();
        let t = Arc::new(IdTable::new(8, Duration::from_secs(1), t0));
        let t2 = t.clone();
        let h = thread::spawn(move || t2.begin(IdKey(7), t0).unwrap());
        let a = t.begin(IdKey(7), t0).unwrap();
        let b = h.join().unwrap();
        let fresh = [a, b].iter().filter(|x| **x == Admit::Fresh).count();
        assert_eq!(fresh, 1, "{a:?} {b:?}");
        assert!(t.complete(IdKey(7), t0));
        assert_eq!(t.begin(IdKey(7), t0).unwrap(), Admit::Duplicate);
    });
}

/// Same-key race where a released slot sits in the middle of the chain, so the two
/// racers can claim different slots and must arbitrate: still exactly one `Fresh`.
#[test]
fn table_same_key_race_over_a_reusable_slot_has_exactly_one_fresh() {
    loom::model(|| {
        let t0 = Instant::now();
        let t = Arc::new(IdTable::new(8, Duration::from_secs(1), t0));
        // Occupy every slot but one, then free one in the middle: probes now see a
        // FREE slot before the single EMPTY one.
        for k in 0..7u128 {
            assert_eq!(t.begin(IdKey(k << 64), t0).unwrap(), Admit::Fresh);
        }
        assert!(t.release(IdKey(3 << 64)));
        let key = IdKey(0xFEED);
        let t2 = t.clone();
        let h = thread::spawn(move || t2.begin(key, t0).unwrap());
        let a = t.begin(key, t0).unwrap();
        let b = h.join().unwrap();
        let fresh = [a, b].iter().filter(|x| **x == Admit::Fresh).count();
        assert_eq!(fresh, 1, "{a:?} {b:?}");
        assert_eq!(t.begin(key, t0).unwrap(), Admit::InProgress);
    });
}

/// The owner completes (or releases) while another thread begins: the other sees
/// `InProgress` or the settled state, never a second `Fresh` after a complete.
#[test]
fn table_complete_and_release_race_a_begin() {
    for complete in [true, false] {
        loom::model(move || {
            let t0 = Instant::now();
            let t = Arc::new(IdTable::new(8, Duration::from_secs(1), t0));
            assert_eq!(t.begin(IdKey(1), t0).unwrap(), Admit::Fresh);
            let t2 = t.clone();
            let h = thread::spawn(move || t2.begin(IdKey(1), t0).unwrap());
            if complete {
                assert!(t.complete(IdKey(1), t0));
            } else {
                assert!(t.release(IdKey(1)));
            }
            let other = h.join().unwrap();
            if complete {
                assert_ne!(other, Admit::Fresh);
            } else {
                assert_ne!(other, Admit::Duplicate);
                let again = t.begin(IdKey(1), t0).unwrap();
                let want = if other == Admit::Fresh {
                    Admit::InProgress
                } else {
                    Admit::Fresh
                };
                assert_eq!(again, want);
            }
        });
    }
}

/// Expiry reclaim racing an insert: the table is full except for one expired entry.
/// One thread inserts a new key (must reclaim that slot), the other re-offers the
/// expired key. Never a `Duplicate` (it expired), and the single slot goes to at most
/// one of them (the other gets `TableFull`).
#[test]
fn table_expiry_reclaim_races_an_insert() {
    loom::model(|| {
        let t0 = Instant::now();
        let t = Arc::new(IdTable::new(8, Duration::from_millis(10), t0));
        for k in 0..8u128 {
            assert_eq!(t.begin(IdKey(k), t0).unwrap(), Admit::Fresh);
        }
        assert!(t.complete(IdKey(5), t0));
        let later = t0 + Duration::from_millis(10);
        let t2 = t.clone();
        let h = thread::spawn(move || t2.begin(IdKey(100), later));
        let a = t.begin(IdKey(5), later);
        let b = h.join().unwrap();
        let ok = |r: &Result<Admit, DedupError>| match r {
            Ok(Admit::Fresh) => 1,
            Err(DedupError::TableFull { .. }) => 0,
            other => panic!("unexpected {other:?}"),
        };
        assert_eq!(ok(&a) + ok(&b), 1, "{a:?} {b:?}");
        assert_eq!(t.expired_reclaimed_count(), 1);
    });
}

/// Two threads check-and-insert the same seq: exactly one `Fresh`.
#[test]
fn window_same_seq_race_has_exactly_one_fresh() {
    loom::model(|| {
        let w = Arc::new(SeqWindow::new(64));
        let w2 = w.clone();
        let h = thread::spawn(move || w2.begin(9).unwrap());
        let a = w.begin(9).unwrap();
        let b = h.join().unwrap();
        assert_eq!([a, b].iter().filter(|x| **x == Admit::Fresh).count(), 1);
    });
}

/// Window slide racing a begin that needs the slid ring: seqs 2..=63 are done and 1
/// is the hole. Thread A fills the hole (watermark jumps to 63, ring words get
/// reused); thread B offers seq 64, whose slot is the one A's block vacates. B gets
/// `Fresh` or `WindowOverrun` — never `Duplicate` — and the final state is exact.
#[test]
fn window_slide_races_a_begin_beyond_it() {
    loom::model(|| {
        let w = Arc::new(SeqWindow::new(64));
        for s in 2..=63 {
            assert_eq!(w.begin(s).unwrap(), Admit::Fresh);
            assert!(w.complete(s));
        }
        let w2 = w.clone();
        let h = thread::spawn(move || w2.begin(64));
        assert_eq!(w.begin(1).unwrap(), Admit::Fresh);
        assert!(w.complete(1));
        let b = h.join().unwrap();
        assert_eq!(w.watermark(), 63);
        match b {
            Ok(Admit::Fresh) => assert_eq!(w.begin(64).unwrap(), Admit::InProgress),
            Err(DedupError::WindowOverrun { .. }) => {
                assert_eq!(w.begin(64).unwrap(), Admit::Fresh)
            }
            other => panic!("unexpected {other:?}"),
        }
    });
}

/// Complete racing release-and-retry on neighbouring seqs of one word, plus a floor:
/// bits of one seq never leak into another.
#[test]
fn window_neighbour_bits_and_floor_race() {
    loom::model(|| {
        let w = Arc::new(SeqWindow::new(64));
        assert_eq!(w.begin(1).unwrap(), Admit::Fresh);
        assert_eq!(w.begin(2).unwrap(), Admit::Fresh);
        let w2 = w.clone();
        let h = thread::spawn(move || {
            assert!(w2.release(2));
            w2.advance_floor(2);
        });
        assert!(w.complete(1));
        h.join().unwrap();
        assert_eq!(w.watermark(), 1);
        assert_eq!(w.begin(2).unwrap(), Admit::Fresh);
    });
}

/// Two threads discover the same new stream through the façade: one window, one
/// `Fresh`.
#[test]
fn facade_new_stream_race_registers_once() {
    loom::model(|| {
        // One time for every call: the dedup's branches depend on time (activity
        // stamps, sweeps), and a loom model must be deterministic.
        let t0 = Instant::now();
        let d = Arc::new(
            Dedup::open_at(
                DedupConfig {
                    window: 64,
                    max_streams: 2,
                    table_capacity: 8,
                    ..DedupConfig::default()
                },
                t0,
            )
            .unwrap(),
        );
        let id = MessageId::Seq {
            origin: Origin {
                node: NodeId(1),
                incarnation: 2,
            },
            channel: ChannelId(3),
            seq: 1,
        };
        let d2 = d.clone();
        let h = thread::spawn(move || d2.begin(&id, t0).unwrap());
        let a = d.begin(&id, t0).unwrap();
        let b = h.join().unwrap();
        assert_eq!([a, b].iter().filter(|x| **x == Admit::Fresh).count(), 1);
        assert_eq!(d.stats().streams, 1);
    });
}

/// Two threads check-and-insert the same key while the table adds a generation (the
/// current one is half used, so each begin first tries to roll): one racer may insert
/// into the old generation and the other into the new one. Still exactly one `Fresh`,
/// and afterwards the key is found from either generation. Both threads run the roll
/// (hundreds of atomic steps), so the model is bounded to 4 preemptions per execution
/// (unbounded it runs for hours).
#[test]
fn table_same_key_race_across_a_generation_roll_has_exactly_one_fresh() {
    let mut model = loom::model::Builder::new();
    model.preemption_bound = Some(4);
    model.check(|| {
        let t0 = Instant::now();
        let t = Arc::new(IdTable::growing(8, 1 << 20, Duration::from_secs(1), t0));
        for k in 0..4u128 {
            assert_eq!(t.begin(IdKey(k << 64), t0).unwrap(), Admit::Fresh);
        }
        let key = IdKey(0xBEEF);
        let t2 = t.clone();
        let h = thread::spawn(move || t2.begin(key, t0).unwrap());
        let a = t.begin(key, t0).unwrap();
        let b = h.join().unwrap();
        let fresh = [a, b].iter().filter(|x| **x == Admit::Fresh).count();
        assert_eq!(fresh, 1, "{a:?} {b:?}");
        assert!(t.generations() >= 2);
        assert!(t.complete(key, t0));
        assert_eq!(t.begin(key, t0).unwrap(), Admit::Duplicate);
    });
}

/// The remove path: a time roll tries to drop the only old generation while its
/// in-progress key is being completed. The generation must survive (its key is live
/// for another horizon): the key stays a `Duplicate`.
#[test]
fn table_generation_drop_races_a_complete() {
    loom::model(|| {
        let t0 = Instant::now();
        let h = Duration::from_millis(10);
        let t = Arc::new(IdTable::growing(8, 1 << 20, h, t0));
        let key = IdKey(1);
        assert_eq!(t.begin(key, t0).unwrap(), Admit::Fresh);
        let t2 = t.clone();
        let done_at = t0 + Duration::from_millis(15);
        let c = thread::spawn(move || assert!(t2.complete(key, done_at)));
        // Past the period: this begin adds a generation and tries to drop the old one.
        let roll_at = t0 + Duration::from_millis(20);
        assert_eq!(t.begin(IdKey(2), roll_at).unwrap(), Admit::Fresh);
        c.join().unwrap();
        assert_eq!(
            t.begin(key, t0 + Duration::from_millis(24)).unwrap(),
            Admit::Duplicate
        );
    });
}

/// The retention of [`small_facade`].
const RETENTION: Duration = Duration::from_secs(10);

/// The origin the facade models send from.
const ORIGIN: Origin = Origin {
    node: NodeId(1),
    incarnation: 2,
};

/// A dedup facade small enough for loom: a 64-seq window, 4 streams, 8 key slots.
fn small_facade(t0: Instant) -> Arc<Dedup> {
    Arc::new(
        Dedup::open_at(
            DedupConfig {
                window: 64,
                max_streams: 4,
                table_capacity: 8,
                retention: RETENTION,
                ..DedupConfig::default()
            },
            t0,
        )
        .unwrap(),
    )
}

/// [`small_facade`] with seq 1 of [`seq_of`]'s stream begun and completed at `t0`.
fn facade_with_seq_1_done(t0: Instant) -> Arc<Dedup> {
    let d = small_facade(t0);
    assert_eq!(d.begin(&seq_of(1), t0).unwrap(), Admit::Fresh);
    d.complete(&seq_of(1), t0).unwrap();
    d
}

/// `seq` of [`ORIGIN`]'s channel 0.
fn seq_of(seq: u64) -> MessageId {
    MessageId::Seq {
        origin: ORIGIN,
        channel: ChannelId(0),
        seq,
    }
}

/// A stream retirement (idle for the retention) races a message on that stream: the
/// message is `Fresh` exactly once whichever wins (retired first: revived from the
/// tombstone, which saw no holes; message first: the stream is no longer idle), and
/// the earlier seq stays a `Duplicate`.
#[test]
fn facade_retirement_races_a_begin() {
    loom::model(|| {
        let (t0, retention) = (Instant::now(), RETENTION);
        let d = facade_with_seq_1_done(t0);
        let id = seq_of;
        let later = t0 + retention;
        let d2 = d.clone();
        let h = thread::spawn(move || d2.retire_idle(later).unwrap());
        let a = d.begin(&id(2), later).unwrap();
        let retired = h.join().unwrap();
        assert_eq!(a, Admit::Fresh, "retired {retired}");
        assert_eq!(d.begin(&id(2), later).unwrap(), Admit::InProgress);
        assert_eq!(d.begin(&id(1), later).unwrap(), Admit::Duplicate);
        assert_eq!(d.stats().streams, 1);
    });
}

/// A tombstone's expiry (the sweep) races the revival of its stream (a message above
/// everything it saw): both remove the tombstone, and exactly one uncounts it, so the
/// registry's and the node's tombstone counts end at zero, never wrapped below it. (A
/// wrapped count would hold the node over its tombstone budget for good.)
#[test]
fn facade_tombstone_expiry_races_a_revival() {
    loom::model(|| {
        let (t0, retention) = (Instant::now(), RETENTION);
        let d = facade_with_seq_1_done(t0);
        let id = seq_of;
        assert_eq!(d.retire_idle(t0 + retention).unwrap(), 1);
        assert_eq!(d.stats().tombstones, 1);
        // Past the tombstone's expiry (a retention and a quarter after retirement).
        let later = t0 + retention * 2 + retention / 4;
        let d2 = d.clone();
        let h = thread::spawn(move || d2.retire_idle(later).unwrap());
        assert_eq!(d.begin(&id(2), later).unwrap(), Admit::Fresh);
        h.join().unwrap();
        let s = d.stats();
        assert_eq!((s.streams, s.tombstones), (1, 0), "{s:?}");
        // The node's own count is whole too: its finished stream retires at once.
        // (Whichever won, seq 1 is settled: by the tombstone, or by the sender's floor
        // when the stream came back new after the tombstone expired.)
        d.complete(&id(2), later).unwrap();
        d.advance_floor(ORIGIN, ChannelId(0), 2, later).unwrap();
        d.finish_stream(ORIGIN, ChannelId(0), 2, later).unwrap();
        let s = d.stats();
        assert_eq!(
            (s.streams, s.tombstones, s.retirements_deferred),
            (0, 1, 0),
            "{s:?}"
        );
    });
}

/// How many of `answers` are `Fresh`.
fn fresh_count(answers: &[Admit]) -> usize {
    answers.iter().filter(|a| **a == Admit::Fresh).count()
}

/// `begin_many` answers in key order.
fn begin_many(t: &IdTable, keys: &[IdKey], now: Instant) -> Vec<Admit> {
    let mut out = Vec::new();
    t.begin_many(keys, now, &mut out).unwrap();
    out
}

/// Two batches offer the same two keys in opposite orders. `begin_many` claims both
/// keys of a batch before ONE fence and then arbitrates them, so each thread holds two
/// `PENDING` copies at once: still exactly one `Fresh` per key, and afterwards each
/// key is in progress exactly once (its owner completes it: `Duplicate`). Bounded to
/// 3 preemptions per execution (unbounded, two keys per thread run for hours).
#[test]
fn table_batches_racing_on_the_same_keys_have_exactly_one_fresh_each() {
    let mut model = loom::model::Builder::new();
    model.preemption_bound = Some(3);
    model.check(|| {
        let t0 = Instant::now();
        let t = Arc::new(IdTable::new(8, Duration::from_secs(1), t0));
        let (a, b) = (IdKey(7), IdKey(7 | 1 << 64));
        let t2 = t.clone();
        let h = thread::spawn(move || begin_many(&t2, &[b, a], t0));
        let mine = begin_many(&t, &[a, b], t0);
        let theirs = h.join().unwrap();
        assert_eq!(fresh_count(&[mine[0], theirs[1]]), 1, "{mine:?} {theirs:?}");
        assert_eq!(fresh_count(&[mine[1], theirs[0]]), 1, "{mine:?} {theirs:?}");
        for k in [a, b] {
            assert_eq!(t.begin(k, t0).unwrap(), Admit::InProgress);
            assert!(t.complete(k, t0));
            assert_eq!(t.begin(k, t0).unwrap(), Admit::Duplicate);
        }
    });
}

/// A batch that offers one key twice races a single `begin` of that key over a
/// released slot mid-chain (so the racers can claim different slots). The batch's
/// second copy of the key sees the first one's claim: exactly one `Fresh` among the
/// three answers, and never the batch's second.
#[test]
fn table_batch_with_a_repeated_key_races_a_begin() {
    loom::model(|| {
        let t0 = Instant::now();
        let t = Arc::new(IdTable::new(8, Duration::from_secs(1), t0));
        for k in 0..7u128 {
            assert_eq!(t.begin(IdKey(k << 64), t0).unwrap(), Admit::Fresh);
        }
        assert!(t.release(IdKey(3 << 64)));
        let key = IdKey(0xFEED);
        let t2 = t.clone();
        let h = thread::spawn(move || t2.begin(key, t0).unwrap());
        let batch = begin_many(&t, &[key, key], t0);
        let single = h.join().unwrap();
        assert_eq!(
            fresh_count(&[batch[0], batch[1], single]),
            1,
            "{batch:?} {single:?}"
        );
        assert_ne!(batch[1], Admit::Fresh);
        assert_eq!(t.begin(key, t0).unwrap(), Admit::InProgress);
    });
}

/// A generation rotation races a batch: one thread's `begin` comes a horizon later, so
/// it adds a generation (and closes the old one if nobody is inside) while the other
/// thread's batch claims in the old one — or finds it closed and goes through `begin`.
/// Exactly one `Fresh` for the key both offer, the batch's other key is `Fresh`, and
/// afterwards both keys are found (from whichever generation holds them). Bounded to
/// 3 preemptions: the roll is hundreds of atomic steps.
#[test]
fn table_batch_races_a_generation_rotation() {
    let mut model = loom::model::Builder::new();
    model.preemption_bound = Some(3);
    model.check(|| {
        let t0 = Instant::now();
        let h = Duration::from_millis(10);
        let t = Arc::new(IdTable::growing(8, 1 << 20, h, t0));
        let (a, b) = (IdKey(1), IdKey(2 | 1 << 64));
        let later = t0 + h;
        let t2 = t.clone();
        let r = thread::spawn(move || t2.begin(b, later).unwrap());
        let batch = begin_many(&t, &[a, b], t0);
        let single = r.join().unwrap();
        assert_eq!(batch[0], Admit::Fresh);
        assert_eq!(fresh_count(&[batch[1], single]), 1, "{batch:?} {single:?}");
        for k in [a, b] {
            assert_eq!(t.begin(k, later).unwrap(), Admit::InProgress);
            assert!(t.complete(k, later));
            assert_eq!(t.begin(k, later).unwrap(), Admit::Duplicate);
        }
    });
}

/// A batch enters the generation's gate once for its whole group and gives back, in
/// one step, the counts of keys that did not become in-progress entries (here a
/// repeat). Meanwhile a roll adds a generation and tries to close and drop the old
/// one. The batch's in-progress keys must keep the old generation alive (too many
/// counts given back would let it be dropped: a completion would then not find its
/// key), and once everything settled and expired the old generation must be
/// droppable (counts kept back would pin it forever).
#[test]
fn table_batch_gate_counts_are_exact_across_a_roll() {
    let mut model = loom::model::Builder::new();
    model.preemption_bound = Some(3);
    model.check(|| {
        let t0 = Instant::now();
        let h = Duration::from_millis(10);
        let t = Arc::new(IdTable::growing(8, 1 << 20, h, t0));
        let (x, w, z) = (IdKey(1), IdKey(2 | 1 << 64), IdKey(3 | 2 << 64));
        let roll_at = t0 + Duration::from_millis(20);
        let t2 = t.clone();
        let r = thread::spawn(move || t2.begin(z, roll_at).unwrap());
        let batch = begin_many(&t, &[x, x, w], t0 + Duration::from_millis(5));
        assert_eq!(r.join().unwrap(), Admit::Fresh);
        assert_eq!(batch, [Admit::Fresh, Admit::InProgress, Admit::Fresh]);
        for k in [x, w] {
            assert!(t.complete(k, roll_at), "an in-progress key was lost");
            assert_eq!(t.begin(k, roll_at).unwrap(), Admit::Duplicate);
        }
        assert!(t.complete(z, roll_at));
        // Two horizons later every completion has expired: rolls drop the old ones.
        for ms in [40, 60, 80] {
            let at = t0 + Duration::from_millis(ms as u64);
            assert_eq!(t.begin(IdKey(ms), at).unwrap(), Admit::Fresh);
            assert!(t.complete(IdKey(ms), at));
        }
        assert_eq!(t.generations(), 1, "a gate count was never given back");
    });
}
