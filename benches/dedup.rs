//! Dedup check-and-insert throughput: ackwire's `IdTable` against `Mutex<HashSet>`,
//! DashMap, papaya and moka (the only expiring peer), plus `SeqWindow`, plus the
//! sustained keyed rate through the `Dedup` façade with its default configuration.
//!
//! `ackwire_idtable` is one fixed generation sized for the workload (what
//! `table_capacity` = `table_budget_bytes` / 24 gives); `ackwire_idtable_growing_default`
//! is the default growing table right after a 1 M-key burst, the worst case for it:
//! the burst left one generation per ×4 of growth (16 K … 4 M slots), and a lookup of
//! a new key probes each of them until they expire one horizon later.
//!
//! Workload, the same for every structure: a 1 M-entry working set of random 128-bit
//! IDs is inserted first (untimed); then each timed op offers one ID, 10 % of them
//! repeats of working-set IDs (duplicates), 90 % new random IDs. After 2^18 ops the
//! structure is rebuilt (untimed), so the working set stays between 1 M and 1.24 M.
//! With 2 threads, the ops are split between them. Run:
//! `cargo bench -p ackwire-benches --bench dedup -- --warm-up-time 1 --measurement-time 3`.
#![allow(missing_docs)]

use std::cell::RefCell;
use std::collections::HashSet;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use ackwire::dedup::{
    Admit, Dedup, DedupConfig, IdTable, SeqWindow, DEFAULT_INITIAL_SLOTS,
    DEFAULT_TABLE_BUDGET_BYTES,
};
use ackwire::{ChannelId, IdKey, MessageId, NodeId, Origin};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

const WORKING_SET: usize = 1 << 20;
const OPS: usize = 1 << 18;
const CAPACITY: usize = 1 << 21;
const HORIZON: Duration = Duration::from_secs(120);
/// Keys handed to a structure at once: a receiver's burst of frames from one read.
const CHUNK: usize = 64;

trait CheckInsert: Sync {
    fn build() -> Self;
    /// `true` if `k` was new.
    fn check_insert(&self, k: u128, now: Instant) -> bool;
    /// `check_insert` for each of `ks` in order; how many were new. Structures
    /// without a batch API loop over `check_insert`.
    fn check_insert_chunk(&self, ks: &[u128], now: Instant) -> usize {
        ks.iter().filter(|&&k| self.check_insert(k, now)).count()
    }
}

struct Ackwire(IdTable);
impl CheckInsert for Ackwire {
    fn build() -> Self {
        Ackwire(IdTable::new(CAPACITY, HORIZON, Instant::now()))
    }
    fn check_insert(&self, k: u128, now: Instant) -> bool {
        self.0
            .begin(IdKey(k), now)
            .expect("table sized for the workload")
            == Admit::Fresh
    }
}

/// The same table through its batch API, `IdTable::begin_many` (prefetches the next
/// keys' slots while one is claimed).
struct AckwireBatched(IdTable);
impl CheckInsert for AckwireBatched {
    fn build() -> Self {
        AckwireBatched(IdTable::new(CAPACITY, HORIZON, Instant::now()))
    }
    fn check_insert(&self, k: u128, now: Instant) -> bool {
        self.0.begin(IdKey(k), now).expect("sized") == Admit::Fresh
    }
    fn check_insert_chunk(&self, ks: &[u128], now: Instant) -> usize {
        thread_local! {
            static BUF: RefCell<(Vec<IdKey>, Vec<Admit>)> =
                const { RefCell::new((Vec::new(), Vec::new())) };
        }
        BUF.with_borrow_mut(|(keys, out)| {
            keys.clear();
            keys.extend(ks.iter().map(|&k| IdKey(k)));
            out.clear();
            self.0.begin_many(keys, now, out).expect("sized");
            out.iter().filter(|&&a| a == Admit::Fresh).count()
        })
    }
}

/// The default growing table (16 K initial slots, 256 MiB budget).
struct AckwireGrowing(IdTable);
impl CheckInsert for AckwireGrowing {
    fn build() -> Self {
        AckwireGrowing(IdTable::growing(
            DEFAULT_INITIAL_SLOTS,
            DEFAULT_TABLE_BUDGET_BYTES,
            HORIZON,
            Instant::now(),
        ))
    }
    fn check_insert(&self, k: u128, now: Instant) -> bool {
        self.0.begin(IdKey(k), now).expect("within the budget") == Admit::Fresh
    }
}

/// The realistic receiver sequence: begin, then complete when fresh.
struct AckwireComplete(IdTable);
impl CheckInsert for AckwireComplete {
    fn build() -> Self {
        AckwireComplete(IdTable::new(CAPACITY, HORIZON, Instant::now()))
    }
    fn check_insert(&self, k: u128, now: Instant) -> bool {
        let fresh = self.0.begin(IdKey(k), now).expect("sized") == Admit::Fresh;
        if fresh {
            self.0.complete(IdKey(k), now);
        }
        fresh
    }
}

/// Not a set: one random 8-byte load per op from a 48 MiB array (the size of the
/// ackwire slot array), i.e. the memory-latency floor of any table at this size.
struct RandomLoadFloor(Vec<u64>);
impl CheckInsert for RandomLoadFloor {
    fn build() -> Self {
        RandomLoadFloor(vec![1; CAPACITY * 3])
    }
    fn check_insert(&self, k: u128, _: Instant) -> bool {
        let i = ((k as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32) as usize % self.0.len();
        self.0[i] == 1
    }
}

struct Locked(Mutex<HashSet<u128>>);
impl CheckInsert for Locked {
    fn build() -> Self {
        Locked(Mutex::new(HashSet::with_capacity(CAPACITY)))
    }
    fn check_insert(&self, k: u128, _: Instant) -> bool {
        self.0.lock().unwrap().insert(k)
    }
}

struct Dash(dashmap::DashMap<u128, ()>);
impl CheckInsert for Dash {
    fn build() -> Self {
        Dash(dashmap::DashMap::with_capacity(CAPACITY))
    }
    fn check_insert(&self, k: u128, _: Instant) -> bool {
        self.0.insert(k, ()).is_none()
    }
}

struct Papaya(papaya::HashMap<u128, ()>);
impl CheckInsert for Papaya {
    fn build() -> Self {
        Papaya(papaya::HashMap::with_capacity(CAPACITY))
    }
    fn check_insert(&self, k: u128, _: Instant) -> bool {
        self.0.pin().try_insert(k, ()).is_ok()
    }
}

struct Moka(moka::sync::Cache<u128, ()>);
impl CheckInsert for Moka {
    fn build() -> Self {
        Moka(
            moka::sync::Cache::builder()
                .max_capacity(CAPACITY as u64)
                .time_to_live(HORIZON)
                .build(),
        )
    }
    fn check_insert(&self, k: u128, _: Instant) -> bool {
        self.0.entry(k).or_insert(()).is_fresh()
    }
}

struct Workload {
    prefill: Vec<u128>,
    ops: Vec<u128>,
}

fn xorshift(x: &mut u64) -> u64 {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    *x
}

fn workload() -> Workload {
    let mut x = 0x2545_F491_4F6C_DD1D_u64;
    let r128 = |x: &mut u64| ((xorshift(x) as u128) << 64) | xorshift(x) as u128;
    let prefill: Vec<u128> = (0..WORKING_SET).map(|_| r128(&mut x)).collect();
    let ops = (0..OPS)
        .map(|_| {
            if xorshift(&mut x) % 10 == 0 {
                prefill[(xorshift(&mut x) % WORKING_SET as u64) as usize]
            } else {
                r128(&mut x)
            }
        })
        .collect();
    Workload { prefill, ops }
}

fn rss() -> usize {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<usize>().ok())
        .map_or(0, |pages| pages * 4096)
}

fn prefilled<S: CheckInsert>(w: &Workload, now: Instant) -> S {
    let s = S::build();
    for part in w.prefill.chunks(CHUNK) {
        s.check_insert_chunk(part, now);
    }
    s
}

fn bench_structure<S: CheckInsert>(c: &mut Criterion, w: &Workload, name: &str) {
    let now = Instant::now();
    let before = rss();
    let probe: S = prefilled(w, now);
    let bytes = rss().saturating_sub(before) as f64 / WORKING_SET as f64;
    eprintln!("{name}: ~{bytes:.0} bytes/entry (RSS growth over the 1 M prefill)");
    drop(probe);

    let mut g = c.benchmark_group("dedup_check_insert");
    g.throughput(Throughput::Elements(1));
    g.sample_size(20);
    for threads in [1usize, 2] {
        let state: RefCell<Option<(S, usize)>> = RefCell::new(None);
        g.bench_function(format!("{name}/{threads}t"), |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                let mut left = iters as usize;
                while left > 0 {
                    let mut st = state.borrow_mut();
                    if st.as_ref().is_none_or(|(_, cur)| *cur == OPS) {
                        *st = None; // free the old one before building the next
                        *st = Some((prefilled(w, now), 0));
                    }
                    let (s, cur) = st.as_mut().unwrap();
                    let n = left.min(OPS - *cur);
                    let chunk = &w.ops[*cur..*cur + n];
                    let start = Instant::now();
                    if threads == 1 {
                        for part in chunk.chunks(CHUNK) {
                            std::hint::black_box(s.check_insert_chunk(part, now));
                        }
                    } else {
                        let s: &S = s;
                        let half = chunk.len() / 2;
                        std::thread::scope(|sc| {
                            for part in [&chunk[..half], &chunk[half..]] {
                                sc.spawn(move || {
                                    for c in part.chunks(CHUNK) {
                                        std::hint::black_box(s.check_insert_chunk(c, now));
                                    }
                                });
                            }
                        });
                    }
                    total += start.elapsed();
                    *cur += n;
                    left -= n;
                }
                total
            })
        });
    }
    g.finish();
}

fn bench_tables(c: &mut Criterion) {
    let w = workload();
    bench_structure::<RandomLoadFloor>(c, &w, "floor_one_random_load");
    bench_structure::<Ackwire>(c, &w, "ackwire_idtable");
    bench_structure::<AckwireBatched>(c, &w, "ackwire_idtable_begin_many");
    bench_structure::<AckwireComplete>(c, &w, "ackwire_idtable_begin_complete");
    bench_structure::<AckwireGrowing>(c, &w, "ackwire_idtable_growing_default");
    bench_structure::<Dash>(c, &w, "dashmap");
    bench_structure::<Papaya>(c, &w, "papaya");
    bench_structure::<Locked>(c, &w, "mutex_hashset");
    bench_structure::<Moka>(c, &w, "moka_ttl");
}

fn bench_window(c: &mut Criterion) {
    let mut g = c.benchmark_group("dedup_seq_window");
    g.throughput(Throughput::Elements(1));
    let win = SeqWindow::new(1024);
    let mut seq = 0u64;
    g.bench_function("begin_complete_sequential", |b| {
        b.iter(|| {
            seq += 1;
            let a = win.begin(std::hint::black_box(seq)).unwrap();
            win.complete(seq);
            a
        })
    });
    g.bench_function("begin_duplicate", |b| {
        b.iter(|| win.begin(std::hint::black_box(seq / 2 + 1)).unwrap())
    });
    let fresh_only = SeqWindow::new(1 << 24);
    let mut s2 = 0u64;
    g.bench_function("begin_only_sequential", |b| {
        b.iter(|| {
            s2 += 1;
            if s2 > (1 << 24) - 64 {
                s2 = 1; // stays in the window; answers turn InProgress, cost is the same path
            }
            fresh_only.begin(std::hint::black_box(s2)).unwrap()
        })
    });
    let d = Dedup::open(DedupConfig::default()).unwrap();
    let origin = Origin {
        node: NodeId(1),
        incarnation: 9,
    };
    let mut s3 = 0u64;
    let now = Instant::now();
    g.bench_function("facade_seq_begin_complete", |b| {
        b.iter(|| {
            s3 += 1;
            let id = MessageId::Seq {
                origin,
                channel: ChannelId(0),
                seq: s3,
            };
            let a = d.begin(&id, now).unwrap();
            d.complete(&id, now).unwrap();
            a
        })
    });
    g.finish();
}

/// Keys per virtual second in the sustained-rate bench: 10 000/s for a 2-minute
/// horizon keeps 1.2 M keys live, within the default 256 MiB budget.
const SUSTAINED_RATE: u64 = 10_000;

/// The sustained keyed rate through the `Dedup` façade with `DedupConfig::default()`:
/// each op is `begin` + `complete` of a new key, with a virtual clock advancing at
/// `SUSTAINED_RATE` keys/s. Three horizons are run untimed first, so the table is in
/// its steady state (generations added per period and dropped whole as they expire).
/// Compare with `dedup_seq_window/facade_seq_begin_complete` (unkeyed, same façade).
fn bench_sustained(c: &mut Criterion) {
    let mut g = c.benchmark_group("dedup_sustained");
    g.throughput(Throughput::Elements(1));
    g.sample_size(20);
    let t0 = Instant::now();
    let d = Dedup::open_at(DedupConfig::default(), t0).unwrap();
    let mut x = 0x9E37_79B9_7F4A_7C15_u64;
    let mut i = 0u64;
    let mut step = |d: &Dedup| {
        i += 1;
        let now = t0 + Duration::from_micros(i * 1_000_000 / SUSTAINED_RATE);
        let id = MessageId::Key(IdKey(
            ((xorshift(&mut x) as u128) << 64) | xorshift(&mut x) as u128,
        ));
        let a = d.begin(&id, now).expect("within the budget");
        d.complete(&id, now).unwrap();
        a
    };
    let warm = 3 * HORIZON.as_secs() * SUSTAINED_RATE;
    for _ in 0..warm {
        step(&d);
    }
    eprintln!(
        "sustained keyed: {} generations, {} MiB of key slots after {warm} keys",
        d.key_table().generations(),
        d.key_table().memory_bytes() >> 20
    );
    g.bench_function("facade_key_begin_complete_default_config", |b| {
        b.iter(|| step(&d))
    });
    g.finish();
    let s = d.stats();
    assert_eq!(s.table_full, 0, "{s:?}");
}

criterion_group!(benches, bench_window, bench_sustained, bench_tables);
criterion_main!(benches);
