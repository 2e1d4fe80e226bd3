//! The node's driver task as seen from outside: [`supervise`] runs
//! [`Driver::run`](super::driver::Driver) and turns its end, normal or a panic, into
//! the node's state.

use super::driver::Driver;
use super::error::NodeFailure;
use super::shared::{NodeState, Shared};
use crate::id::Origin;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

/// Runs the driver and makes its end visible: a panic is logged at error level and
/// recorded as the node's [`NodeFailure`] *before* the driver's state is dropped, so
/// every receipt, window wait and later call it fails sees [`NodeError::Failed`](crate::NodeError::Failed) /
/// [`SendError::NodeFailed`](crate::SendError::NodeFailed) rather than a plain shutdown.
///
/// `end` records the end also when this future is dropped unfinished, even before
/// its first poll (it is an argument, not a local), as a runtime shut down under a
/// live node does: the node is then stopped for every handle. (Regression: `closed()`,
/// a send waiting for window space and `DeadLetters::recv` waited for good.)
pub(super) async fn supervise(
    mut driver: Driver,
    shared: Arc<Shared>,
    origin: Origin,
    end: EndGuard,
) {
    let span = shared.span.clone();
    let mut run = Box::pin(tracing::Instrument::instrument(driver.run(), span));
    if let Err(panic) = (CatchUnwind(&mut run)).await {
        let cause: Arc<str> = if let Some(s) = panic.downcast_ref::<&str>() {
            (*s).into()
        } else if let Some(s) = panic.downcast_ref::<String>() {
            s.as_str().into()
        } else {
            "driver panicked (non-string payload)".into()
        };
        tracing::error!(node = %origin, %cause, "node driver panicked: the node is dead, every call now fails with NodeError::Failed");
        shared
            .state
            .send_replace(NodeState::Failed(NodeFailure { cause }));
    }
    // `Closed` unless it failed; the windows and the dead letters close, so a sender
    // waiting for window space and the dead-letter handles see the stop whichever way
    // it came, and the durable dead-letter log is released for the node's next run.
    drop(end);
    drop(run);
    // The state is set and the windows are closed; now close the command channel and
    // take what is left in it, also a command whose push was still under way:
    // dropping the receiver alone frees only the commands already queued, and one
    // pushed just after stays queued as long as any sender handle lives, its receipt
    // never resolved. (Regression: a send racing a dropped node hung; the driver used
    // to drop its receiver as it returned, before the windows closed.) Each command
    // dropped here resolves its caller as the state says.
    driver.commands.close();
    while driver.commands.recv().await.is_some() {}
    // Only now drop the driver (its receipts and receiver queues).
    drop(driver);
}

/// Marks the node stopped when dropped, unless its end was already recorded: the state
/// becomes `Closed`, the windows, the dead letters and the event streams
/// (`health_events`, `identity_conflicts`) close.
pub(super) struct EndGuard(pub(super) Arc<Shared>);

impl Drop for EndGuard {
    fn drop(&mut self) {
        self.0.state.send_if_modified(|s| {
            if matches!(s, NodeState::Running) {
                *s = NodeState::Closed;
                true
            } else {
                false
            }
        });
        // Receivers hand out nothing more (what is queued in them is taken back): the
        // acks of a delivery handed out now would go nowhere. A graceful stop sets this
        // at its grace; a driver that panicked or a runtime dropped under the node gets
        // here without one. (Regression: `recv` kept handing out queued deliveries
        // after the node was `Closed`, and their acks were lost without an error.)
        self.0
            .receivers_stopped
            .store(true, std::sync::atomic::Ordering::Release);
        self.0.close_windows();
        self.0.dead_letters.close();
        self.0.health_tx.close();
        self.0.conflict_tx.close();
    }
}

/// Polls a future, turning a panic inside it into `Err(payload)`.
struct CatchUnwind<F>(F);

impl<F: Future + Unpin> Future for CatchUnwind<F> {
    type Output = Result<F::Output, Box<dyn std::any::Any + Send>>;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let inner = &mut self.0;
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| Pin::new(inner).poll(cx))) {
            Ok(Poll::Ready(v)) => Poll::Ready(Ok(v)),
            Ok(Poll::Pending) => Poll::Pending,
            Err(panic) => Poll::Ready(Err(panic)),
        }
    }
}
