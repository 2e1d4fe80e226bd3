//! The ack path from handler threads to the driver, without a channel message per ack.
//!
//! [`Delivery::ack`](super::Delivery::ack) / `nack` / drop push the completion onto a
//! lock-free stack (a Treiber stack the consumer empties whole with one swap, so no
//! node is ever popped singly and there is no ABA problem and nothing to reclaim
//! concurrently). The push that finds the stack empty is the one that wakes the
//! driver; every later push of the same burst only links its node. The driver takes
//! the whole burst at once, in completion order, and turns it into one ack frame per
//! stream and one dedup group commit (see `Endpoint::persist_owed`).
//!
//! Owns the stack and the wake-up rule; must not interpret completions. Takes its
//! atomics from the loom shim, so the loom models below check this very code
//! (`RUSTFLAGS="--cfg ackwire_loom" cargo test --release --lib completions`).

use crate::dedup::sync::{AtomicPtr, Ordering};
use std::ptr;

struct Node<T> {
    value: T,
    next: *mut Node<T>,
}

/// A multi-producer, single-consumer stack drained whole (LIFO inside, handed out
/// FIFO).
#[derive(Debug)]
pub(crate) struct CompletionStack<T> {
    head: AtomicPtr<Node<T>>,
}

// Nodes are owned by the stack between `push` and `drain`; values cross threads.
unsafe impl<T: Send> Send for CompletionStack<T> {}
unsafe impl<T: Send> Sync for CompletionStack<T> {}

impl<T> Default for CompletionStack<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T> CompletionStack<T> {
    /// An empty stack.
    pub(crate) fn new() -> Self {
        CompletionStack {
            head: AtomicPtr::new(ptr::null_mut()),
        }
    }

    /// Push `value`. Returns `true` when the stack was empty: the caller must wake the
    /// consumer (every other push finds a wake-up already owed for the burst).
    pub(crate) fn push(&self, value: T) -> bool {
        let node = Box::into_raw(Box::new(Node {
            value,
            next: ptr::null_mut(),
        }));
        let mut head = self.head.load(Ordering::Relaxed);
        loop {
            // SAFETY: `node` is ours until the CAS below publishes it.
            unsafe { (*node).next = head };
            match self
                .head
                .compare_exchange_weak(head, node, Ordering::Release, Ordering::Relaxed)
            {
                Ok(_) => return head.is_null(),
                Err(actual) => head = actual,
            }
        }
    }

    /// Take everything pushed so far, oldest first, into `out`. Returns how many.
    /// Single consumer: only the driver calls it.
    pub(crate) fn drain_into(&self, out: &mut Vec<T>) -> usize {
        let mut node = self.head.swap(ptr::null_mut(), Ordering::Acquire);
        let start = out.len();
        // SAFETY: the swap made this whole list ours; producers only ever link nodes
        // in front of the head, never touch nodes behind it.
        while !node.is_null() {
            let boxed = unsafe { Box::from_raw(node) };
            node = boxed.next;
            out.push(boxed.value);
        }
        out[start..].reverse();
        out.len() - start
    }

    /// Is the stack empty right now?
    #[cfg(test)]
    pub(crate) fn is_empty(&self) -> bool {
        self.head.load(Ordering::Acquire).is_null()
    }
}

impl<T> Drop for CompletionStack<T> {
    fn drop(&mut self) {
        let mut rest: Vec<T> = Vec::new();
        self.drain_into(&mut rest);
    }
}

#[cfg(all(test, not(ackwire_loom)))]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn drains_in_push_order_and_wakes_once_per_burst() {
        let s = CompletionStack::new();
        assert!(s.push(1));
        assert!(!s.push(2));
        assert!(!s.push(3));
        let mut out = Vec::new();
        assert_eq!(s.drain_into(&mut out), 3);
        assert_eq!(out, [1, 2, 3]);
        assert!(s.is_empty());
        assert!(s.push(4), "the first push after a drain wakes again");
    }

    /// Real threads: 4 producers × 100 000 values, one consumer draining as it goes;
    /// every value arrives exactly once, each producer's in its push order, and the
    /// consumer is woken no more often than there were pushes onto an empty stack.
    #[test]
    fn stress_every_value_once_in_producer_order() {
        const P: u64 = 4;
        const N: u64 = 100_000;
        let s = Arc::new(CompletionStack::new());
        let wakes = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let producers: Vec<_> = (0..P)
            .map(|p| {
                let s = s.clone();
                let wakes = wakes.clone();
                std::thread::spawn(move || {
                    for i in 0..N {
                        if s.push((p, i)) {
                            wakes.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                    }
                })
            })
            .collect();
        let mut next = [0u64; P as usize];
        let mut got = 0;
        let mut drains = 0u64;
        let mut buf = Vec::new();
        while got < P * N {
            buf.clear();
            if s.drain_into(&mut buf) == 0 {
                std::thread::yield_now();
                continue;
            }
            drains += 1;
            for &(p, i) in &buf {
                assert_eq!(i, next[p as usize], "producer {p} out of order");
                next[p as usize] += 1;
                got += 1;
            }
        }
        for h in producers {
            h.join().unwrap();
        }
        assert!(s.is_empty());
        assert_eq!(next, [N; P as usize]);
        // Each non-empty drain was preceded by at least one waking push.
        assert!(wakes.load(std::sync::atomic::Ordering::Relaxed) >= drains);
    }
}

#[cfg(all(test, ackwire_loom))]
mod loom_tests {
    use super::*;
    use loom::sync::Arc;
    use loom::thread;

    /// Two producers push concurrently with a draining consumer: every value arrives
    /// exactly once, each producer's in order, and a push that found the stack empty
    /// (the one that wakes the driver) is never followed by an undrained value the
    /// consumer was not woken for.
    #[test]
    fn concurrent_pushes_and_drains_lose_nothing() {
        loom::model(|| {
            let s = Arc::new(CompletionStack::new());
            let wakes = Arc::new(crate::dedup::sync::AtomicUsize::new(0));
            let producers: Vec<_> = (0..2u8)
                .map(|p| {
                    let s = s.clone();
                    let wakes = wakes.clone();
                    thread::spawn(move || {
                        for i in 0..2u8 {
                            if s.push((p, i)) {
                                wakes.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    })
                })
                .collect();
            let mut got = Vec::new();
            let mut nonempty_drains = 0;
            if s.drain_into(&mut got) > 0 {
                nonempty_drains += 1;
            }
            for h in producers {
                h.join().unwrap();
            }
            if s.drain_into(&mut got) > 0 {
                nonempty_drains += 1;
            }
            assert_eq!(got.len(), 4, "{got:?}");
            for p in 0..2u8 {
                let mine: Vec<u8> = got
                    .iter()
                    .filter(|(q, _)| *q == p)
                    .map(|(_, i)| *i)
                    .collect();
                assert_eq!(mine, [0, 1], "producer {p} out of order: {got:?}");
            }
            assert!(wakes.load(Ordering::Relaxed) >= nonempty_drains);
        });
    }
}
