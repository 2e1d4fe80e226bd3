//! Concurrency shim: loom's model-checked atomics under `--cfg ackwire_loom`, std's
//! otherwise; plus the two reclaiming containers the dedup structures remove from.
//!
//! Owns the import switch and the reclamation boundary. The dedup structures must take
//! every atomic from here so `tests/loom_dedup.rs` explores their real code. Memory
//! reclamation is never hand-rolled: outside loom, [`Snapshot`] is a
//! `crossbeam_epoch::Atomic` and [`StreamMap`] a `papaya::HashMap` (built on `seize`).
//! Under loom, whose scheduler cannot see inside those crates, they become a loom
//! `AtomicPtr` whose replaced values are freed only when the container drops, and a
//! mutex-guarded map: the models then check the algorithms that sit on top (gates,
//! arbitration, retirement), not the reclamation crates, which have their own tests.

#[cfg(ackwire_loom)]
pub(crate) use loom::sync::atomic::*;
#[cfg(not(ackwire_loom))]
pub(crate) use std::sync::atomic::*;

pub(crate) use imp::{pin, Pin, Snapshot, StreamMap};

/// Lets another thread run while waiting for it to finish a step (loom must be told).
#[inline]
pub(crate) fn wait_for_other() {
    #[cfg(ackwire_loom)]
    loom::thread::yield_now();
    #[cfg(not(ackwire_loom))]
    std::thread::yield_now();
}

#[cfg(not(ackwire_loom))]
mod imp {
    use crossbeam_epoch::{self as epoch, Atomic, Guard, Owned, Shared};
    use std::hash::Hash;
    use std::sync::atomic::Ordering;

    /// A critical section: values loaded from a [`Snapshot`] stay valid while it lives.
    pub(crate) type Pin = Guard;

    /// Enters a critical section.
    #[inline]
    pub(crate) fn pin() -> Pin {
        epoch::pin()
    }

    /// An immutable value replaced as a whole by compare-and-swap; the replaced value
    /// is freed once no critical section can still see it (crossbeam-epoch).
    pub(crate) struct Snapshot<T: Send + Sync + 'static> {
        cur: Atomic<T>,
    }

    impl<T: Send + Sync + 'static> Snapshot<T> {
        pub(crate) fn new(v: T) -> Self {
            Snapshot {
                cur: Atomic::new(v),
            }
        }

        /// The current value.
        #[inline]
        pub(crate) fn load<'g>(&self, g: &'g Pin) -> &'g T {
            let s = self.cur.load(Ordering::Acquire, g);
            // SAFETY: `cur` is never null (set in `new`, only ever replaced by
            // `Owned` values), and a loaded pointer is only destroyed through
            // `defer_destroy`, i.e. after every guard that could have seen it, `g`
            // included, is dropped.
            unsafe { s.deref() }
        }

        /// Replaces `old` (a value `load` returned) by `new`; `false` (and `new` is
        /// dropped) if it had been replaced meanwhile.
        pub(crate) fn replace(&self, old: &T, new: T, g: &Pin) -> bool {
            let old = Shared::from(old as *const T);
            match self.cur.compare_exchange(
                old,
                Owned::new(new),
                Ordering::AcqRel,
                Ordering::Acquire,
                g,
            ) {
                Ok(_) => {
                    // SAFETY: `old` is unlinked now; readers that loaded it hold
                    // guards, and the epoch scheme waits for them before freeing it.
                    unsafe { g.defer_destroy(old) };
                    true
                }
                Err(_) => false,
            }
        }
    }

    impl<T: Send + Sync + 'static> Drop for Snapshot<T> {
        fn drop(&mut self) {
            // SAFETY: `&mut self`: no other thread can reach `cur` any more.
            unsafe {
                let g = epoch::unprotected();
                drop(self.cur.load(Ordering::Relaxed, g).into_owned());
            }
        }
    }

    /// A concurrent map whose values may be removed while others read them (papaya).
    pub(crate) struct StreamMap<K, V> {
        map: papaya::HashMap<K, V>,
    }

    impl<K: Hash + Eq + Send + Sync + Clone, V: Send + Sync> StreamMap<K, V> {
        pub(crate) fn new() -> Self {
            StreamMap {
                map: papaya::HashMap::new(),
            }
        }

        /// Calls `f` with `k`'s value, if present.
        #[inline]
        pub(crate) fn with<R>(&self, k: &K, f: impl FnOnce(Option<&V>) -> R) -> R {
            let m = self.map.pin();
            f(m.get(k))
        }

        /// Inserts `v` under `k` unless present; calls `f` with the value now there and
        /// whether it is ours.
        pub(crate) fn with_try_insert<R>(&self, k: K, v: V, f: impl FnOnce(&V, bool) -> R) -> R {
            let m = self.map.pin();
            match m.try_insert(k, v) {
                Ok(v) => f(v, true),
                Err(e) => f(e.current, false),
            }
        }

        /// Inserts or replaces `k`'s value; `true` if `k` was absent.
        pub(crate) fn insert(&self, k: K, v: V) -> bool {
            self.map.pin().insert(k, v).is_none()
        }

        /// Removes `k`; `true` if it was present (so of racing removers, one).
        pub(crate) fn remove(&self, k: &K) -> bool {
            self.map.pin().remove(k).is_some()
        }

        /// Calls `f` on every entry (a weakly consistent walk).
        pub(crate) fn for_each(&self, mut f: impl FnMut(&K, &V)) {
            for (k, v) in self.map.pin().iter() {
                f(k, v);
            }
        }
    }
}

#[cfg(ackwire_loom)]
mod imp {
    use super::{AtomicPtr, Ordering};
    use std::collections::HashMap;
    use std::hash::Hash;
    use std::sync::Arc;

    /// Under loom there is no epoch: replaced snapshots live until the owner drops.
    pub(crate) type Pin = ();

    pub(crate) fn pin() -> Pin {}

    pub(crate) struct Snapshot<T: Send + Sync + 'static> {
        cur: AtomicPtr<T>,
        retired: std::sync::Mutex<Vec<usize>>,
    }

    impl<T: Send + Sync + 'static> Snapshot<T> {
        pub(crate) fn new(v: T) -> Self {
            Snapshot {
                cur: AtomicPtr::new(Box::into_raw(Box::new(v))),
                retired: std::sync::Mutex::new(Vec::new()),
            }
        }

        pub(crate) fn load<'g>(&self, _g: &'g Pin) -> &'g T {
            // SAFETY: never null; replaced values are freed only in `Drop`.
            unsafe { &*self.cur.load(Ordering::Acquire) }
        }

        pub(crate) fn replace(&self, old: &T, new: T, _g: &Pin) -> bool {
            let old = old as *const T as *mut T;
            let new = Box::into_raw(Box::new(new));
            match self
                .cur
                .compare_exchange(old, new, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => {
                    self.retired.lock().unwrap().push(old as usize);
                    true
                }
                Err(_) => {
                    // SAFETY: `new` was never published.
                    drop(unsafe { Box::from_raw(new) });
                    false
                }
            }
        }
    }

    impl<T: Send + Sync + 'static> Drop for Snapshot<T> {
        fn drop(&mut self) {
            let cur = self.cur.load(Ordering::Relaxed);
            // SAFETY: `&mut self`; every pointer is a unique `Box::into_raw` result.
            unsafe {
                drop(Box::from_raw(cur));
                for p in self.retired.get_mut().unwrap().drain(..) {
                    drop(Box::from_raw(p as *mut T));
                }
            }
        }
    }

    pub(crate) struct StreamMap<K, V> {
        map: loom::sync::Mutex<HashMap<K, Arc<V>>>,
    }

    impl<K: Hash + Eq + Send + Sync + Clone, V: Send + Sync> StreamMap<K, V> {
        pub(crate) fn new() -> Self {
            StreamMap {
                map: loom::sync::Mutex::new(HashMap::new()),
            }
        }

        pub(crate) fn with<R>(&self, k: &K, f: impl FnOnce(Option<&V>) -> R) -> R {
            let v = self.map.lock().unwrap().get(k).cloned();
            f(v.as_deref())
        }

        pub(crate) fn with_try_insert<R>(&self, k: K, v: V, f: impl FnOnce(&V, bool) -> R) -> R {
            let mut m = self.map.lock().unwrap();
            let (v, ours) = match m.get(&k) {
                Some(cur) => (cur.clone(), false),
                None => {
                    let v = Arc::new(v);
                    m.insert(k, v.clone());
                    (v, true)
                }
            };
            drop(m);
            f(&v, ours)
        }

        pub(crate) fn insert(&self, k: K, v: V) -> bool {
            self.map.lock().unwrap().insert(k, Arc::new(v)).is_none()
        }

        pub(crate) fn remove(&self, k: &K) -> bool {
            self.map.lock().unwrap().remove(k).is_some()
        }

        pub(crate) fn for_each(&self, mut f: impl FnMut(&K, &V)) {
            let all: Vec<(K, Arc<V>)> = self
                .map
                .lock()
                .unwrap()
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            for (k, v) in &all {
                f(k, v);
            }
        }
    }
}
