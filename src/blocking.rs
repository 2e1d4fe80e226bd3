//! Running a blocking call (an fsync) from code that may be on an async runtime's
//! worker thread.
//!
//! Owns one function, [`run`]. On a worker of a tokio multi-thread runtime it runs the
//! call under [`tokio::task::block_in_place`]: the worker hands its other tasks to
//! another thread while this one waits for the disk, so an fsync of the dedup log or
//! the hint store (milliseconds on a slow disk, per burst) does not stall unrelated
//! tasks of the application that share the worker. Anywhere else (no runtime, a
//! current-thread runtime, a plain thread) the call runs inline. Must not change what
//! the call does or when the caller continues: the caller still waits for it, so an
//! ack that follows a dedup fsync is still sent only once the record is on disk.

/// Runs `f`, telling tokio first if this thread is a multi-thread runtime's worker
/// (see the module docs).
pub(crate) fn run<T>(f: impl FnOnce() -> T) -> T {
    if let Ok(handle) = tokio::runtime::Handle::try_current() {
        if handle.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread {
            return tokio::task::block_in_place(f);
        }
    }
    f()
}

#[cfg(test)]
mod tests {
    use super::run;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    /// With one worker, a task blocked in `run` does not stop another task on that
    /// worker (without `block_in_place` the ticker below would not tick at all for the
    /// 300 ms the blocking call takes).
    #[test]
    fn a_blocking_call_on_the_only_worker_lets_other_tasks_run() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_time()
            .build()
            .unwrap();
        let ticks = Arc::new(AtomicU64::new(0));
        let during = rt.block_on(async {
            let t = ticks.clone();
            tokio::spawn(async move {
                loop {
                    t.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            });
            while ticks.load(Ordering::Relaxed) < 3 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            let t = ticks.clone();
            tokio::spawn(async move {
                let before = t.load(Ordering::Relaxed);
                run(|| std::thread::sleep(Duration::from_millis(300)));
                t.load(Ordering::Relaxed) - before
            })
            .await
            .unwrap()
        });
        assert!(
            during >= 5,
            "the other task ticked {during} times in 300 ms"
        );
    }

    #[test]
    fn runs_inline_without_a_runtime_and_on_a_current_thread_runtime() {
        assert_eq!(run(|| 7), 7);
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        assert_eq!(rt.block_on(async { run(|| 8) }), 8);
        // Inside a multi-thread runtime but off its workers (its `block_on` thread).
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .build()
            .unwrap();
        assert_eq!(rt.block_on(async { run(|| 9) }), 9);
    }
}
