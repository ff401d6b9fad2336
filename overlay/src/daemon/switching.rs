//! The driver's side of the switching core: the state the tasks share, carrying out what the
//! core asks for, the TAP readers and the ticker.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::io;
use std::rc::Rc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use tokio::io::unix::AsyncFdReadyGuard;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use super::Ctx;
use super::net::{KernelDrops, Tap, TapDev, ViolinTap};
use super::peers::PeerBook;
use super::violins::{Member, Reader};
use crate::HostId;
use crate::control::ControlMsg;
use crate::offload::{self, Coalesced, Coalescer, VNET_HDR_LEN, VnetHdr};
use crate::sparse::SparsePath;
use crate::switch::{DropReason, Output, Switch};
use crate::wire::{FRAME_HEADER_LEN, ViolinId};
use viola_api::overlay::LinkBytes;

labelled_enum! {
    /// Why the driver dropped something (the core counts its own, `DropReason`).
    #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
    pub(super) enum DriverDrop {
        /// The TAP's queue is full.
        TapFull = "tap_full",
        /// Writing to the TAP failed otherwise.
        TapWrite = "tap_write",
        /// A frame from a peer longer than the violin's MTU allows (plus Ethernet header and
        /// one VLAN tag): the guests' ports would drop it silently.
        DeliverOversize = "deliver_oversize",
        /// A frame on the TAP longer than the MTU allows (read truncated).
        TapOversize = "tap_oversize",
        /// A frame on a TAP with offloads whose virtio-net header or headers could not be
        /// segmented (or its checksum completed).
        TapOffload = "tap_offload",
        /// A datagram above the connection's current limit.
        DatagramTooLarge = "datagram_too_large",
        /// A datagram that displaced older ones from QUIC's full datagram send buffer (QUIC
        /// drops the oldest; counted once per datagram sent into a full buffer).
        DatagramBufferFull = "datagram_buffer_full",
        /// No connection to the next hop.
        NoConnection = "no_connection",
        /// The connection to the next hop was lost while sending.
        ConnectionLost = "connection_lost",
        /// The peer does not take datagrams, or they are disabled here.
        DatagramsUnsupported = "datagrams_unsupported",
        /// Frames the kernel dropped because the TAP's queue was full (the daemon did not read
        /// them in time).
        TapQueueOverflow = "tap_queue_overflow",
        /// Datagrams the kernel dropped because the UDP socket's receive buffer was full.
        UdpReceiveOverflow = "udp_receive_overflow",
        /// The peer's control stream is too far behind.
        ControlQueueFull = "control_queue_full",
        /// A control message from a peer that does not decode.
        ControlMalformed = "control_malformed",
        /// Packets to peers that QUIC declared lost on the way (the WAN dropped them; each
        /// carried a datagram or control data). Read once a second from each connection's
        /// statistics, so up to a second of a closing connection's losses is not counted.
        WanLost = "wan_lost",
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
    /// QUIC's lost-packet count when last added to [`DriverDrop::WanLost`].
    pub(super) lost_counted: u64,
}

/// What the daemon's tasks share (all on one thread).
pub(super) struct Shared {
    pub(super) switch: Switch,
    pub(super) conns: HashMap<HostId, Conn>,
    /// What the ended connections to each peer carried (the open one's bytes come on top).
    pub(super) ended_link_bytes: HashMap<HostId, LinkBytes>,
    pub(super) taps: HashMap<ViolinId, ViolinTap>,
    /// The violins: where each comes from, its bridge.
    pub(super) members: BTreeMap<ViolinId, Member>,
    /// The TAP readers.
    pub(super) readers: HashMap<ViolinId, Reader>,
    pub(super) peers: PeerBook,
    pub(super) driver_drops: BTreeMap<DriverDrop, u64>,
    pub(super) refused: BTreeMap<Refusal, u64>,
    /// The core's outputs, carried out by [`execute`](Self::execute).
    pub(super) out: Vec<Output>,
    pub(super) serial: u64,
    /// Sparse TAP writes: the frame's reader may be woken onto this CPU (see [`crate::sparse`]).
    pub(super) tap_path: SparsePath,
    /// Rate-limited log lines about drops.
    pub(super) drop_log: DropLog,
    /// The kernel's drops on the TAPs and the UDP socket.
    pub(super) kernel_drops: KernelDrops,
    /// Frames for TAPs with offloads, merged per flow before they are written (one batch per
    /// [`execute`](Self::execute)).
    pub(super) coalescer: Coalescer,
    /// The coalescer's output (kept for its allocation).
    pub(super) coalesced: Vec<Coalesced>,
}

/// Logs drops at most once per reason per [`DropLog::INTERVAL`], with the number since the
/// last line: guests can make them happen at line rate.
#[derive(Default)]
pub(super) struct DropLog {
    /// reason → (when last logged, total then).
    logged: HashMap<&'static str, (Instant, u64)>,
}

impl DropLog {
    const INTERVAL: Duration = Duration::from_secs(10);

    /// `total` is the reason's counter now.
    pub(super) fn observe(&mut self, now: Instant, reason: &'static str, total: u64) {
        let (at, before) = self.logged.get(reason).copied().unwrap_or((now, 0));
        let due = before == 0 || now.duration_since(at) >= Self::INTERVAL;
        if total > before && due {
            warn!(reason, dropped = total - before, total, "dropped");
            self.logged.insert(reason, (now, total));
        }
    }
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
                    // QUIC makes room by dropping its oldest datagrams, without telling us.
                    let displaces = c.conn.datagram_send_buffer_space() < datagram.len();
                    match c.conn.send_datagram(datagram) {
                        Ok(()) if displaces => self.count(DriverDrop::DatagramBufferFull),
                        Ok(()) => {}
                        Err(quinn::SendDatagramError::TooLarge) => {
                            let max = c.conn.max_datagram_size().unwrap_or(0);
                            self.switch.set_max_datagram(&via, max);
                            self.count(DriverDrop::DatagramTooLarge);
                        }
                        Err(quinn::SendDatagramError::ConnectionLost(_)) => {
                            self.count(DriverDrop::ConnectionLost);
                        }
                        Err(
                            quinn::SendDatagramError::Disabled
                            | quinn::SendDatagramError::UnsupportedByPeer,
                        ) => self.count(DriverDrop::DatagramsUnsupported),
                    }
                }
                Output::Deliver { violin, frame } => {
                    let Some(ViolinTap { tap, max_frame }) = self.taps.get(&violin) else {
                        continue;
                    };
                    if frame.len() > *max_frame {
                        self.count(DriverDrop::DeliverOversize);
                        continue;
                    }
                    let sent = match tap.get_ref() {
                        TapDev::Plain(t) => t.send(&frame),
                        TapDev::Vnet(_) => {
                            self.coalescer.push(violin, frame);
                            continue;
                        }
                    };
                    self.tap_written(sent);
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
        if self.coalescer.pending() > 0 {
            self.write_coalesced();
        }
    }

    fn tap_written(&mut self, sent: io::Result<usize>) {
        match sent {
            Ok(_) => self.tap_path.after_handoff(),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.count(DriverDrop::TapFull),
            Err(_) => self.count(DriverDrop::TapWrite),
        }
    }

    /// Writes the frames the coalescer holds to their TAPs, each after its virtio-net header
    /// (one `writev`, the merged segments' payloads not copied).
    fn write_coalesced(&mut self) {
        let mut done = std::mem::take(&mut self.coalesced);
        self.coalescer.flush(&mut done);
        for c in &done {
            let Some(TapDev::Vnet(t)) = self.taps.get(&c.violin).map(|t| t.tap.get_ref()) else {
                continue;
            };
            let hdr = c.vnet.encode();
            let mut parts: Vec<&[u8]> = Vec::with_capacity(2 + c.payloads.len());
            parts.push(&hdr);
            parts.push(&c.head);
            parts.extend(c.payloads.iter().map(|p| &p[..]));
            let sent = t.send(&parts);
            self.tap_written(sent);
        }
        done.clear();
        self.coalesced = done;
    }
}

/// Waits until the TAP of `violin` is readable. Returns the violin's frame size, read at every
/// wake-up because `set_violin` may change its MTU in place, with the readiness guard; `None`
/// when the reader is to stop: `token` cancelled, the violin gone or the TAP broken.
async fn tap_readable<'a>(
    ctx: &Ctx,
    violin: ViolinId,
    token: &CancellationToken,
    tap: &'a Tap,
) -> Option<(usize, AsyncFdReadyGuard<'a, TapDev>)> {
    let max_frame = ctx.state.borrow().taps.get(&violin).map(|t| t.max_frame)?;
    let guard = tokio::select! {
        () = token.cancelled() => return None,
        g = tap.readable() => match g {
            Ok(g) => g,
            Err(e) => { warn!(%violin, "TAP not readable: {e}"); return None; }
        },
    };
    Some((max_frame, guard))
}

/// Reads frames from the TAP of `violin` into the switch until `token` is cancelled.
pub(super) async fn tap_reader(ctx: Rc<Ctx>, violin: ViolinId, token: CancellationToken) {
    let Some(tap) = ctx.state.borrow().taps.get(&violin).map(|t| t.tap.clone()) else {
        return;
    };
    if matches!(tap.get_ref(), TapDev::Vnet(_)) {
        return vnet_tap_reader(ctx, violin, token, tap).await;
    }
    let mut slab = BytesMut::with_capacity(256 * 1024);
    loop {
        let Some((max_frame, mut guard)) = tap_readable(&ctx, violin, &token, &tap).await else {
            return;
        };
        let mut n_frames = 0usize;
        loop {
            if slab.capacity() < FRAME_HEADER_LEN + max_frame {
                slab.reserve(256 * 1024);
            }
            // One byte more than a frame may have, to see longer ones.
            slab.resize(FRAME_HEADER_LEN + max_frame + 1, 0);
            let res = guard.try_io(|inner| match inner.get_ref() {
                TapDev::Plain(t) => t.recv(&mut slab[FRAME_HEADER_LEN..]),
                TapDev::Vnet(_) => Err(io::Error::other("TAP has a virtio-net header")),
            });
            match res {
                Ok(Ok(n)) if n > max_frame => {
                    slab.clear();
                    ctx.state.borrow_mut().count(DriverDrop::TapOversize);
                }
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

/// [`tap_reader`] for a TAP with a virtio-net header: each frame read (up to 64 KiB with
/// TSO) is cut into frames of at most the violin's frame size, which go to the switch as if
/// read one by one.
async fn vnet_tap_reader(ctx: Rc<Ctx>, violin: ViolinId, token: CancellationToken, tap: Tap) {
    let mut hdr = [0u8; VNET_HDR_LEN];
    // A whole TSO frame: 64 KiB of IP packet plus Ethernet and VLAN headers.
    let mut big = vec![0u8; 65_536 + 64];
    let mut slab = BytesMut::with_capacity(256 * 1024);
    let mut segs = Vec::new();
    loop {
        let Some((max_frame, mut guard)) = tap_readable(&ctx, violin, &token, &tap).await else {
            return;
        };
        let mut n_frames = 0usize;
        loop {
            let res = guard.try_io(|inner| match inner.get_ref() {
                TapDev::Vnet(t) => t.recv(&mut hdr, &mut big),
                TapDev::Plain(_) => Err(io::Error::other("TAP has no virtio-net header")),
            });
            let n = match res {
                Ok(Ok(n)) => n,
                Ok(Err(e)) => {
                    warn!(%violin, "TAP read: {e}");
                    break;
                }
                Err(_would_block) => break,
            };
            let cut = VnetHdr::parse(&hdr).and_then(|h| {
                if h.gso_type == offload::GSO_NONE && n > max_frame {
                    return Ok(false);
                }
                offload::segment(
                    &h,
                    &big[..n],
                    max_frame,
                    FRAME_HEADER_LEN,
                    &mut slab,
                    &mut segs,
                )
                .map(|()| true)
            });
            {
                let mut st = ctx.state.borrow_mut();
                let st = &mut *st;
                match cut {
                    Ok(true) => {
                        let now = Instant::now();
                        for s in segs.drain(..) {
                            st.switch.handle_tap_frame(now, violin, s, &mut st.out);
                        }
                        st.execute();
                    }
                    Ok(false) => st.count(DriverDrop::TapOversize),
                    Err(_) => st.count(DriverDrop::TapOffload),
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
    let mut ticks = 0u64;
    loop {
        tokio::select! {
            () = ctx.token.cancelled() => return,
            _ = tick.tick() => {}
        }
        let mut st = ctx.state.borrow_mut();
        let st = &mut *st;
        let now = Instant::now();
        st.switch.handle_timeout(now);
        ticks += 1;
        if ticks.is_multiple_of(4) {
            let taps = st.taps.values().map(|t| t.tap.get_ref().name());
            let (tap, udp) = st.kernel_drops.read(taps);
            st.driver_drops.insert(DriverDrop::TapQueueOverflow, tap);
            st.driver_drops.insert(DriverDrop::UdpReceiveOverflow, udp);
            let mut lost = 0;
            for c in st.conns.values_mut() {
                let now_lost = c.conn.stats().path.lost_packets;
                lost += now_lost.saturating_sub(c.lost_counted);
                c.lost_counted = now_lost;
            }
            if lost > 0 {
                *st.driver_drops.entry(DriverDrop::WanLost).or_default() += lost;
            }
        }
        let counters = st.switch.counters();
        for r in DropReason::ALL {
            let n = counters.drops.get(r.as_str()).copied().unwrap_or(0);
            st.drop_log.observe(now, r.as_str(), n);
        }
        st.drop_log
            .observe(now, "learning_refused", counters.learning_refused);
        for (d, n) in &st.driver_drops {
            st.drop_log.observe(now, d.as_str(), *n);
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drops_are_logged_at_most_once_per_reason_per_interval() {
        let mut log = DropLog::default();
        let t0 = Instant::now();
        log.observe(t0, "mac_limit", 0);
        assert!(log.logged.is_empty(), "nothing dropped, nothing logged");
        log.observe(t0, "mac_limit", 5);
        assert_eq!(log.logged["mac_limit"], (t0, 5));
        log.observe(t0 + Duration::from_secs(9), "mac_limit", 900);
        assert_eq!(log.logged["mac_limit"], (t0, 5), "logged again within 10 s");
        log.observe(t0 + Duration::from_secs(9), "tap_full", 1);
        assert_eq!(
            log.logged["tap_full"].1, 1,
            "reasons are limited separately"
        );
        let t10 = t0 + Duration::from_secs(10);
        log.observe(t10, "mac_limit", 1000);
        assert_eq!(log.logged["mac_limit"], (t10, 1000));
    }
}
