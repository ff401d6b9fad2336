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
//!
//! **Its UDP socket is registered for reading only.** quinn's tokio socket registers for both
//! directions, edge-triggered, and Linux signals "writable" each time a sent datagram's buffer is
//! freed: so every `sendmsg` woke the runtime's `epoll_wait` once more, for nothing, since no
//! task waits to write while sends succeed. [`ReadInterestSocket`] asks the kernel for
//! writability only after a send returned `WouldBlock`, through a duplicate of the socket
//! registered for writing until it is writable again. quinn 0.11 asks
//! [`poll_writable`](quinn::UdpPoller::poll_writable) before every send, so that answers "ready"
//! at once unless the last send would have blocked.

use std::fmt;
use std::future::Future;
use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Instant;

use quinn::udp::{RecvMeta, Transmit, UdpSocketState};
use quinn::{AsyncTimer, AsyncUdpSocket, Runtime, TokioRuntime, UdpPoller};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

use crate::sparse::SparsePath;

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
        Ok(Arc::new(ReadInterestSocket::new(socket)?))
    }

    fn now(&self) -> Instant {
        TokioRuntime.now()
    }
}

/// A UDP socket for quinn, registered with the runtime for reading only (see the module's doc).
pub struct ReadInterestSocket {
    io: AsyncFd<std::net::UdpSocket>,
    state: UdpSocketState,
    /// The last send would have blocked, and no waiter has seen the socket writable since.
    blocked: AtomicBool,
    /// Every send that passed is a handoff on this path (the daemon's sparse-packet handling).
    handoff: Option<Arc<SparsePath>>,
}

impl ReadInterestSocket {
    /// Takes `socket` (made non-blocking here) and quinn-udp's socket options for it (GSO, GRO,
    /// packet info).
    pub fn new(socket: std::net::UdpSocket) -> io::Result<Self> {
        socket.set_nonblocking(true)?;
        let state = UdpSocketState::new((&socket).into())?;
        // SAFETY: a `std::net::UdpSocket` owns its descriptor, and `as_raw_fd` returns that same
        // one for as long as the socket lives inside the `AsyncFd`.
        let io = unsafe { AsyncFd::register_with_interest(socket, Interest::READABLE)? };
        Ok(Self {
            io,
            state,
            blocked: AtomicBool::new(false),
            handoff: None,
        })
    }

    /// Treats every send that passed as a handoff on `path` ([`SparsePath::after_handoff`]).
    #[must_use]
    pub fn with_handoff(mut self, path: Arc<SparsePath>) -> Self {
        self.handoff = Some(path);
        self
    }
}

impl fmt::Debug for ReadInterestSocket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReadInterestSocket")
            .field("socket", self.io.get_ref())
            .finish_non_exhaustive()
    }
}

impl AsyncUdpSocket for ReadInterestSocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        Box::pin(WritableWaiter {
            socket: self,
            waiting: None,
        })
    }

    fn try_send(&self, transmit: &Transmit) -> io::Result<()> {
        match self.state.send(self.io.get_ref().into(), transmit) {
            Ok(()) => {
                if let Some(path) = &self.handoff {
                    path.after_handoff();
                }
                Ok(())
            }
            Err(e) => {
                if e.kind() == io::ErrorKind::WouldBlock {
                    self.blocked.store(true, Ordering::Relaxed);
                }
                Err(e)
            }
        }
    }

    fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        loop {
            let mut guard = ready!(self.io.poll_read_ready(cx))?;
            // `try_io` clears the readiness on WouldBlock, so the next turn waits for the kernel.
            if let Ok(received) =
                guard.try_io(|io| self.state.recv(io.get_ref().into(), bufs, meta))
            {
                return Poll::Ready(received);
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.io.get_ref().local_addr()
    }

    fn max_transmit_segments(&self) -> usize {
        self.state.max_gso_segments()
    }

    fn max_receive_segments(&self) -> usize {
        self.state.gro_segments()
    }

    fn may_fragment(&self) -> bool {
        self.state.may_fragment()
    }
}

/// Waits, after a send that would block, until the socket is writable: a duplicate of its file
/// descriptor is registered for writing for just that long.
#[derive(Debug)]
struct WritableWaiter {
    socket: Arc<ReadInterestSocket>,
    waiting: Option<AsyncFd<OwnedFd>>,
}

impl UdpPoller for WritableWaiter {
    fn poll_writable(self: Pin<&mut Self>, cx: &mut Context) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.waiting.is_none() && !this.socket.blocked.load(Ordering::Relaxed) {
            return Poll::Ready(Ok(()));
        }
        let waiting = match &mut this.waiting {
            Some(waiting) => waiting,
            None => {
                // Registering an fd that is writable already reports it at once (epoll checks
                // the state on insertion), so a buffer freed since the failed send is not missed.
                let dup = this.socket.io.get_ref().as_fd().try_clone_to_owned()?;
                // SAFETY: an `OwnedFd` owns its descriptor and always returns that same one.
                let waiting = unsafe { AsyncFd::register_with_interest(dup, Interest::WRITABLE)? };
                this.waiting.insert(waiting)
            }
        };
        let ready = ready!(waiting.poll_write_ready(cx)).map(drop);
        // Dropping it deregisters the duplicate: no more wake-ups until the next WouldBlock.
        this.waiting = None;
        this.socket.blocked.store(false, Ordering::Relaxed);
        Poll::Ready(ready)
    }
}

/// Sets a socket buffer's size: `opt_force` (beyond the system's limit, needs CAP_NET_ADMIN),
/// else `opt` (up to the limit).
pub(crate) fn set_buffer(fd: i32, opt_force: i32, opt: i32, size: usize) {
    let size = size as libc::c_int;
    let p = &size as *const libc::c_int as *const libc::c_void;
    let len = size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: setsockopt with a valid fd and a pointer to a live c_int of the given length.
    let rc = unsafe { libc::setsockopt(fd, libc::SOL_SOCKET, opt_force, p, len) };
    if rc != 0 {
        // SAFETY: as above.
        unsafe { libc::setsockopt(fd, libc::SOL_SOCKET, opt, p, len) };
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

    /// In a network namespace of its own (root only), with a token bucket letting 100 kbit/s
    /// through loopback (about 100 ms a datagram), the socket's send buffer fills: a send would
    /// block, the waiter is not ready while the datagrams are queued, becomes ready once the
    /// queue lets them go, and the next send passes. Received datagrams arrive through `poll_recv`.
    #[test]
    fn a_send_that_would_block_waits_until_the_socket_is_writable() {
        std::thread::spawn(|| {
            // SAFETY: unshare only affects this thread's network namespace.
            assert_eq!(
                unsafe { libc::unshare(libc::CLONE_NEWNET) },
                0,
                "this test needs root (CAP_SYS_ADMIN) for a network namespace"
            );
            // Children of this thread start in its namespace.
            for args in [
                &["ip", "link", "set", "lo", "up"][..],
                &[
                    "tc", "qdisc", "add", "dev", "lo", "root", "tbf", "rate", "100kbit", "burst",
                    "1600", "latency", "10s",
                ],
            ] {
                let st = std::process::Command::new(args[0])
                    .args(&args[1..])
                    .status()
                    .unwrap_or_else(|e| panic!("{}: {e}", args[0]));
                assert!(st.success(), "{args:?}: {st}");
            }
            block_on_local(would_block_then_writable()).unwrap();
        })
        .join()
        .unwrap();
    }

    /// Whether `waiter` is ready without waiting.
    fn ready_at_once(waiter: &mut Pin<Box<dyn UdpPoller>>) -> bool {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        waiter.as_mut().poll_writable(&mut cx).is_ready()
    }

    async fn would_block_then_writable() {
        let receiver = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let to = receiver.local_addr().unwrap();
        let std_socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        // The smallest send buffer (the kernel rounds 1 up to its minimum).
        let raw = std::os::fd::AsRawFd::as_raw_fd(&std_socket);
        set_buffer(raw, libc::SO_SNDBUFFORCE, libc::SO_SNDBUF, 1);
        let from = std_socket.local_addr().unwrap();
        let socket = Arc::new(ReadInterestSocket::new(std_socket).unwrap());
        let payload = [7u8; 1200];
        let transmit = Transmit {
            destination: to,
            ecn: None,
            contents: &payload,
            segment_size: None,
            src_ip: None,
        };
        let mut waiter = socket.clone().create_io_poller();
        assert!(
            ready_at_once(&mut waiter),
            "ready at once while no send would have blocked (quinn asks before every send)"
        );
        let mut sent = 0;
        let blocked = loop {
            match socket.try_send(&transmit) {
                Ok(()) => sent += 1,
                Err(e) => break e,
            }
            assert!(sent < 10_000, "the send buffer never filled");
        };
        assert_eq!(blocked.kind(), io::ErrorKind::WouldBlock, "{blocked}");
        assert!(sent > 0);

        let mut first = true;
        let writable = std::future::poll_fn(|cx| {
            let poll = waiter.as_mut().poll_writable(cx);
            if std::mem::take(&mut first) {
                assert!(
                    poll.is_pending(),
                    "ready while the datagrams are still queued"
                );
            }
            poll
        });
        tokio::time::timeout(std::time::Duration::from_secs(10), writable)
            .await
            .expect("writable once the queue let the datagrams go")
            .unwrap();
        socket.try_send(&transmit).expect("a send passes again");
        assert!(
            ready_at_once(&mut waiter),
            "ready at once again after a send that passed"
        );

        // The other way: what the receiver sends arrives through poll_recv.
        receiver.send_to(b"back", from).unwrap();
        let mut buf = [0u8; 64];
        let mut meta = [RecvMeta::default()];
        let n = tokio::time::timeout(
            std::time::Duration::from_secs(10),
            std::future::poll_fn(|cx| {
                socket.poll_recv(cx, &mut [IoSliceMut::new(&mut buf)], &mut meta)
            }),
        )
        .await
        .expect("the datagram arrives")
        .unwrap();
        assert_eq!(n, 1);
        assert_eq!(&buf[..meta[0].len], b"back");
        assert_eq!(meta[0].addr, to);
    }
}
