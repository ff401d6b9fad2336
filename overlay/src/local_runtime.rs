//! A quinn [`Runtime`](quinn::Runtime) that runs quinn's endpoint and connection drivers as
//! tasks of the daemon's `LocalSet`, beside the TAP readers and datagram handlers.
//!
//! With quinn's stock `TokioRuntime` the drivers are tasks of the runtime while the daemon's own
//! tasks live in a `LocalSet`, which the runtime polls as one future. When a connection driver
//! hands a received datagram to the daemon's task, it wakes that future from inside the
//! runtime; the current-thread scheduler then parks once more (a zero-timeout `epoll_wait` and a
//! turn of the timer wheel) before it polls the `LocalSet` again. That is a syscall and a few
//! microseconds of cold-cache work between every received datagram and its TAP write. With the
//! drivers in the same `LocalSet` the handoff is a push onto its run queue.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use quinn::{AsyncTimer, AsyncUdpSocket, Runtime, TokioRuntime};

/// quinn's tokio runtime, except that [`spawn`](Runtime::spawn) uses
/// [`tokio::task::spawn_local`]. Every endpoint built with it must be created and used inside a
/// `LocalSet` (the daemon's `main` runs everything in one).
#[derive(Debug, Default)]
pub struct LocalSetRuntime;

impl Runtime for LocalSetRuntime {
    fn new_timer(&self, at: Instant) -> Pin<Box<dyn AsyncTimer>> {
        TokioRuntime.new_timer(at)
    }

    fn spawn(&self, future: Pin<Box<dyn Future<Output = ()> + Send>>) {
        // The driver ends by itself when its endpoint or connection is closed and dropped; the
        // LocalSet drops what is left when the daemon exits.
        drop(tokio::task::spawn_local(future));
    }

    fn wrap_udp_socket(&self, socket: std::net::UdpSocket) -> io::Result<Arc<dyn AsyncUdpSocket>> {
        TokioRuntime.wrap_udp_socket(socket)
    }

    fn now(&self) -> Instant {
        TokioRuntime.now()
    }
}

/// Runs `main` to its end inside a `LocalSet` on a new current-thread runtime, as the daemon
/// runs everything (see the module's doc).
pub fn block_on_local<F: Future>(main: F) -> io::Result<F::Output> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    Ok(tokio::task::LocalSet::new().block_on(&rt, main))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};

    #[test]
    fn spawned_futures_run_in_the_local_set() {
        let ran = Arc::new(AtomicBool::new(false));
        let flag = ran.clone();
        block_on_local(async move {
            LocalSetRuntime.spawn(Box::pin(async move {
                // `spawn_local` panics outside a LocalSet, so the flag is set only if the
                // spawned future runs inside one (as it would not with `tokio::spawn`).
                drop(tokio::task::spawn_local(async {}));
                flag.store(true, Ordering::SeqCst);
            }));
            // A timer from the runtime fires, and the spawned task ran meanwhile.
            let mut t = LocalSetRuntime.new_timer(Instant::now());
            std::future::poll_fn(|cx| t.as_mut().poll(cx)).await;
            tokio::task::yield_now().await;
        })
        .unwrap();
        assert!(ran.load(Ordering::SeqCst));
    }
}
