//! The driver's side of the switching core: the state the tasks share, carrying out what the
//! core asks for, the TAP readers and the ticker.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::io;
use std::rc::Rc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use tokio::io::unix::AsyncFd;
use tokio::sync::mpsc;
use tracing::warn;
use tun_tap::Iface;

use super::Ctx;
use super::peers::PeerBook;
use crate::HostId;
use crate::control::ControlMsg;
use crate::sparse::SparsePath;
use crate::switch::{Output, Switch};
use crate::wire::{FRAME_HEADER_LEN, ViolinId};

labelled_enum! {
    /// Why the driver dropped something (the core counts its own, `DropReason`).
    #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
    pub(super) enum DriverDrop {
        /// The TAP's queue is full.
        TapFull = "tap_full",
        /// Writing to the TAP failed otherwise.
        TapWrite = "tap_write",
        /// A datagram above the connection's current limit.
        DatagramTooLarge = "datagram_too_large",
        /// No connection to the next hop.
        NoConnection = "no_connection",
        /// The peer's control stream is too far behind.
        ControlQueueFull = "control_queue_full",
        /// QUIC refused the datagram otherwise.
        SendFailed = "send_failed",
        /// A control message from a peer that does not decode.
        ControlMalformed = "control_malformed",
    }
}

labelled_enum! {
    /// Why a connection was refused.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
    pub(super) enum Refusal {
        /// The TLS handshake failed (unknown CA, bad certificate, wrong ALPN).
        Handshake = "handshake",
        /// The certificate's role may not use this connection.
        Role = "role",
    }
}

/// A peer connection the switch sends through.
pub(super) struct Conn {
    pub(super) conn: quinn::Connection,
    /// Control messages to the peer, written by the connection's control writer.
    pub(super) ctl: mpsc::Sender<ControlMsg>,
    pub(super) since: Instant,
    /// Tells this connection from a later one to the same host.
    pub(super) serial: u64,
}

/// What the daemon's tasks share (all on one thread).
pub(super) struct Shared {
    pub(super) switch: Switch,
    pub(super) conns: HashMap<HostId, Conn>,
    pub(super) taps: HashMap<ViolinId, Rc<AsyncFd<Iface>>>,
    pub(super) peers: PeerBook,
    pub(super) driver_drops: BTreeMap<DriverDrop, u64>,
    pub(super) refused: BTreeMap<Refusal, u64>,
    /// The core's outputs, carried out by [`execute`](Self::execute).
    pub(super) out: Vec<Output>,
    pub(super) serial: u64,
    /// Sparse TAP writes: the frame's reader may be woken onto this CPU (see [`crate::sparse`]).
    pub(super) tap_path: SparsePath,
}

pub(super) type State = Rc<RefCell<Shared>>;

impl Shared {
    pub(super) fn count(&mut self, what: DriverDrop) {
        *self.driver_drops.entry(what).or_default() += 1;
    }

    pub(super) fn refuse(&mut self, why: Refusal) {
        *self.refused.entry(why).or_default() += 1;
    }

    /// Carries out what the core asked for.
    pub(super) fn execute(&mut self) {
        let mut out = std::mem::take(&mut self.out);
        for o in out.drain(..) {
            match o {
                Output::Transmit { via, datagram } => {
                    let Some(c) = self.conns.get(&via) else {
                        self.count(DriverDrop::NoConnection);
                        continue;
                    };
                    match c.conn.send_datagram(datagram) {
                        Ok(()) => {}
                        Err(quinn::SendDatagramError::TooLarge) => {
                            let max = c.conn.max_datagram_size().unwrap_or(0);
                            self.switch.set_max_datagram(&via, max);
                            self.count(DriverDrop::DatagramTooLarge);
                        }
                        Err(_) => self.count(DriverDrop::SendFailed),
                    }
                }
                Output::Deliver { violin, frame } => {
                    let Some(tap) = self.taps.get(&violin) else {
                        continue;
                    };
                    match tap.get_ref().send(&frame) {
                        Ok(_) => self.tap_path.after_handoff(),
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                            self.count(DriverDrop::TapFull);
                        }
                        Err(_) => self.count(DriverDrop::TapWrite),
                    }
                }
                Output::Control { via, msg } => {
                    let Some(c) = self.conns.get(&via) else {
                        self.count(DriverDrop::NoConnection);
                        continue;
                    };
                    if c.ctl.try_send(msg).is_err() {
                        self.count(DriverDrop::ControlQueueFull);
                    }
                }
            }
        }
        self.out = out;
    }
}

/// Reads frames from the TAP of `violin` into the switch until cancelled.
pub(super) async fn tap_reader(ctx: Rc<Ctx>, violin: ViolinId) {
    let Some(tap) = ctx.state.borrow().taps.get(&violin).cloned() else {
        return;
    };
    // Ethernet header + VLAN tag + payload.
    let max_frame = ctx.mtu + 18;
    let mut slab = BytesMut::with_capacity(256 * 1024);
    loop {
        let mut guard = tokio::select! {
            () = ctx.token.cancelled() => return,
            g = tap.readable() => match g {
                Ok(g) => g,
                Err(e) => { warn!(%violin, "TAP not readable: {e}"); return; }
            },
        };
        let mut n_frames = 0usize;
        loop {
            if slab.capacity() < FRAME_HEADER_LEN + max_frame {
                slab.reserve(256 * 1024);
            }
            slab.resize(FRAME_HEADER_LEN + max_frame, 0);
            let res = guard.try_io(|inner| inner.get_ref().recv(&mut slab[FRAME_HEADER_LEN..]));
            match res {
                Ok(Ok(n)) => {
                    slab.truncate(FRAME_HEADER_LEN + n);
                    let buf = slab.split();
                    let mut st = ctx.state.borrow_mut();
                    let st = &mut *st;
                    st.switch
                        .handle_tap_frame(Instant::now(), violin, buf, &mut st.out);
                    st.execute();
                }
                Ok(Err(e)) => {
                    slab.clear();
                    warn!(%violin, "TAP read: {e}");
                    break;
                }
                Err(_would_block) => {
                    slab.clear();
                    break;
                }
            }
            n_frames += 1;
            if n_frames.is_multiple_of(64) {
                tokio::task::yield_now().await;
            }
        }
    }
}

/// Drives the core's timers and keeps its datagram limits in step with QUIC's.
pub(super) async fn ticker(ctx: Rc<Ctx>) {
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    loop {
        tokio::select! {
            () = ctx.token.cancelled() => return,
            _ = tick.tick() => {}
        }
        let mut st = ctx.state.borrow_mut();
        let st = &mut *st;
        st.switch.handle_timeout(Instant::now());
        let sizes: Vec<(HostId, usize)> = st
            .conns
            .iter()
            .filter_map(|(h, c)| Some((h.clone(), c.conn.max_datagram_size()?)))
            .collect();
        for (h, m) in sizes {
            st.switch.set_max_datagram(&h, m);
        }
    }
}
