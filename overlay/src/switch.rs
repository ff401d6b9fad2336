//! The switching core: per-violin MAC learning, flooding to members, ARP answering, MAC moves
//! with sequence numbers, fragmentation and relay routing. No I/O and no clock: the caller
//! passes `now` and events in, and gets [`Output`]s back (quinn-proto's shape).
//!
//! Invariants:
//! - A frame of violin V is only sent to, and only accepted from, hosts that claimed
//!   membership of V *and* are allowed in V by local configuration; everything else is dropped
//!   and counted ([`DropReason`]).
//! - Frames received from peers are never flooded again (full mesh: no loops); the only
//!   re-sending of a received frame is one REDIRECT to a MAC's new host, never repeated.
//! - A MAC's remote location changes only through an announcement with a higher sequence
//!   number (or, while the adaptation manager announced the move in advance, a frame from the
//!   expected host). A late frame from the old location never pulls it back, and the old host
//!   ignores the moved MAC on its own TAP for [`SwitchConfig::move_hold_down`].
//! - A managed MAC (a VM the control plane lists with its address, [`ManagedVm`]) is accepted
//!   as a source only from its home: the host the control plane names, else the first that
//!   claimed it. Frames and announcements naming it from elsewhere are dropped and counted
//!   ([`DropReason::SpoofedSource`]); its home changes only through `expect_move`. ARP for a
//!   managed address is answered only from the control plane's table, and ARP claiming a
//!   managed address or MAC for someone else is dropped ([`DropReason::ArpSpoof`]).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{Ipv4Addr, Ipv6Addr};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};

use crate::HostId;
use crate::control::ControlMsg;
use crate::dhcp::{self, MessageType, Subnet};
use crate::reassembly::{Reassembler, ReassemblyLimits};
use crate::wire::{
    self, Arp, BROADCAST, Datagram, ETHERTYPE_ARP, FRAME_HEADER_LEN, Mac, Nd, ViolinId,
};
use viola_api::overlay::{Counters, MacStatus, PeerStatus, SwitchStatus, ViolinStatus};

/// Tunables of the core.
#[derive(Debug, Clone)]
pub struct SwitchConfig {
    /// Learned MACs not seen for this long are forgotten.
    pub mac_ageing: Duration,
    /// After a MAC moved away, frames from it on the local TAP are ignored this long.
    pub move_hold_down: Duration,
    /// How long an `expect_move` stays in force. For a managed VM it is the only way to move,
    /// so it must outlast the longest migration (disk and memory copy) it announces.
    pub expect_move_ttl: Duration,
    /// Reassembly limits.
    pub reassembly: ReassemblyLimits,
    /// Datagram size assumed for a peer until the driver reports one, and the most sent
    /// through a relay: QUIC's smallest path (1200-byte UDP payloads) carries it.
    pub default_max_datagram: usize,
    /// Period of the housekeeping timer.
    pub sweep_interval: Duration,
    /// Bounds on learned (unmanaged) MACs.
    pub learning: LearningLimits,
    /// Lower the MSS of TCP SYNs from the local TAP so full segments fit one datagram on the
    /// way they take ([`crate::mss`]).
    pub mss_clamp: bool,
    /// Lease time of the DHCP answers to managed VMs (T1 half of it, T2 seven eighths).
    pub dhcp_lease: Duration,
    /// Interface MTU (option 26) in the DHCP answers; None: not sent.
    pub dhcp_mtu: Option<u16>,
}

/// Bounds on learned (unmanaged) MACs; managed VMs are exempt (the configuration bounds them).
#[derive(Debug, Clone, Copy)]
pub struct LearningLimits {
    /// Learned MACs per violin.
    pub per_violin: usize,
    /// Learned MACs per port (the local TAP, or one peer host), so that one flooding port
    /// leaves room for the others.
    pub per_port: usize,
    /// New MACs learned from the local TAP per second and violin (token bucket)...
    pub local_rate_per_s: u32,
    /// ...with this burst.
    pub local_burst: u32,
}

impl Default for LearningLimits {
    fn default() -> Self {
        Self {
            per_violin: 1024,
            per_port: 512,
            local_rate_per_s: 100,
            local_burst: 200,
        }
    }
}

/// A token bucket with time passed in.
#[derive(Debug, Clone, Default)]
struct TokenBucket {
    tokens: f64,
    /// None: never used, full.
    at: Option<Instant>,
}

impl TokenBucket {
    fn take(&mut self, now: Instant, rate_per_s: u32, burst: u32) -> bool {
        let burst = f64::from(burst);
        self.tokens = match self.at {
            None => burst,
            Some(at) => {
                let refill = now.duration_since(at).as_secs_f64() * f64::from(rate_per_s);
                (self.tokens + refill).min(burst)
            }
        };
        self.at = Some(now);
        if self.tokens < 1.0 {
            return false;
        }
        self.tokens -= 1.0;
        true
    }
}

impl Default for SwitchConfig {
    fn default() -> Self {
        Self {
            mac_ageing: Duration::from_secs(300),
            move_hold_down: Duration::from_secs(2),
            expect_move_ttl: Duration::from_secs(600),
            reassembly: ReassemblyLimits::default(),
            default_max_datagram: 1162,
            sweep_interval: Duration::from_millis(250),
            learning: LearningLimits::default(),
            mss_clamp: true,
            dhcp_lease: Duration::from_secs(3600),
            dhcp_mtu: None,
        }
    }
}

/// What the driver must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    /// Send `datagram` on the connection to `via` (the next hop).
    Transmit {
        /// Next hop.
        via: HostId,
        /// The datagram.
        datagram: Bytes,
    },
    /// Write `frame` to the violin's local TAP.
    Deliver {
        /// Violin.
        violin: ViolinId,
        /// Ethernet frame.
        frame: Bytes,
    },
    /// Send a control message on the control stream to `via`.
    Control {
        /// Next hop.
        via: HostId,
        /// Message.
        msg: ControlMsg,
    },
}

labelled_enum! {
    /// Why a frame, datagram or message was dropped.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
    pub enum DropReason {
        /// A datagram or frame that does not parse.
        Malformed = "malformed",
        /// A violin this host is not a member of.
        UnknownViolin = "unknown_violin",
        /// A sender that is not a (permitted) member of the violin.
        NotMember = "not_member",
        /// No direct connection and no relay towards the destination.
        NoRoute = "no_route",
        /// A frame too large even for [`wire::MAX_FRAGMENTS`] fragments.
        Oversize = "oversize",
        /// Inconsistent fragments.
        FragmentMismatch = "fragment_mismatch",
        /// A local frame from a MAC that just moved away (hold-down).
        StaleLocalAfterMove = "stale_local_after_move",
        /// A unicast frame on the TAP for a MAC that is local (no hairpin).
        LocalDestination = "local_destination",
        /// A received frame for a MAC that is elsewhere, already redirected once.
        Misdelivered = "misdelivered",
        /// A relay request from or to a host we cannot serve.
        RelayRefused = "relay_refused",
        /// A frame from a new source MAC on the local TAP while the violin's or the port's
        /// limit of learned MACs is reached.
        MacLimit = "mac_limit",
        /// A frame from a new source MAC on the local TAP above the learning rate.
        LearnRateLimit = "learn_rate_limit",
        /// A managed VM's MAC as the source of a frame or announcement from somewhere other
        /// than its home (MAC theft, or a move the control plane did not announce).
        SpoofedSource = "spoofed_source",
        /// ARP claiming a managed VM's address with another MAC, or a managed MAC sent by
        /// someone else.
        ArpSpoof = "arp_spoof",
        /// An IPv6 neighbour solicitation or advertisement claiming a managed VM's IPv6
        /// address from another MAC, or naming a managed MAC someone else sent.
        NdSpoof = "nd_spoof",
    }
}

/// Where a MAC is.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Location {
    /// Behind the local TAP.
    Local,
    /// At another host.
    Remote(HostId),
}

#[derive(Debug, Clone)]
struct MacEntry {
    loc: Location,
    seq: u64,
    last_seen: Instant,
    ip: Option<Ipv4Addr>,
}

/// A host pattern allowed in a violin: `site/host`, `site/*` or `*`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostPattern(String);

impl HostPattern {
    /// A pattern (`site/host`, `site/*` or `*`).
    pub fn new(p: &str) -> Self {
        Self(p.to_owned())
    }

    /// Whether `host` (`site/host`) matches.
    pub fn matches(&self, host: &str) -> bool {
        match self.0.strip_suffix("/*") {
            _ if self.0 == "*" => true,
            Some(site) => host.split_once('/').is_some_and(|(s, _)| s == site),
            None => self.0 == host,
        }
    }
}

/// Local configuration of one violin.
#[derive(Debug, Clone)]
pub struct ViolinConfig {
    /// Id.
    pub id: ViolinId,
    /// Human name.
    pub name: String,
    /// Hosts allowed to be members (besides this one).
    pub allowed: Vec<HostPattern>,
    /// VMs the control plane manages in this violin.
    pub vms: Vec<ManagedVm>,
    /// The violin's IPv4 subnet: with it, DHCP from managed VMs on the local TAP is answered
    /// here (each gets its configured address) and ARP for the server's address too.
    pub subnet: Option<Subnet>,
    /// The MTU its DHCP answers carry (option 26); `None`: the switch's `dhcp_mtu`.
    pub dhcp_mtu: Option<u16>,
}

/// A VM whose addresses the control plane knows: its MAC is accepted only from its home and
/// ARP for its address is answered from here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManagedVm {
    /// MAC.
    pub mac: Mac,
    /// IPv4 address.
    pub ip: Ipv4Addr,
    /// The host it runs on (`site/host`); None: the first host that claims it.
    pub host: Option<HostId>,
}

/// Where the control plane says a managed VM is.
#[derive(Debug, Clone)]
struct Managed {
    /// None until configured or first claimed.
    home: Option<Location>,
    /// The home it left and when: late frames from there are delivered, not counted as theft.
    left: Option<(Location, Instant)>,
}

impl Managed {
    fn move_home(&mut self, to: Location, now: Instant) {
        if let Some(old) = self.home.replace(to) {
            self.left = Some((old, now));
        }
    }

    /// A frame from `at` just after the VM left it (in flight during the move).
    fn just_left(&self, at: &Location, now: Instant, hold: Duration) -> bool {
        self.left
            .as_ref()
            .is_some_and(|(l, t)| l == at && now.duration_since(*t) < hold)
    }
}

struct Violin {
    cfg: ViolinConfig,
    macs: HashMap<Mac, MacEntry>,
    /// Managed VMs by MAC (never aged: the control plane's word stands until it changes it).
    managed: HashMap<Mac, Managed>,
    /// ARP knowledge: ip → (mac, managed).
    arp: HashMap<Ipv4Addr, (Mac, bool)>,
    /// Managed VMs' IPv6 addresses → their MAC: each one's EUI-64 link-local from the start,
    /// and the addresses it claims itself (duplicate address detection, advertisements) once
    /// seen, [`ND_ADDRESSES_PER_VM`] at most per VM.
    nd: HashMap<Ipv6Addr, Mac>,
    /// mac → (host it will appear on, until).
    expected: HashMap<Mac, (HostId, Instant)>,
    /// mac → when it moved away from here.
    moved_away: HashMap<Mac, Instant>,
    /// Learned (unmanaged) MACs per port, for the limits; recounted at every sweep.
    learned: HashMap<Location, usize>,
    learned_total: usize,
    /// New MACs from the local TAP.
    local_learning: TokenBucket,
}

impl Violin {
    /// Whether a new unmanaged MAC may be learned at `port`.
    fn may_learn(&self, port: &Location, limits: &LearningLimits) -> bool {
        self.learned_total < limits.per_violin
            && self.learned.get(port).copied().unwrap_or(0) < limits.per_port
    }

    fn note_learned(&mut self, mac: &Mac, port: Location) {
        if !self.managed.contains_key(mac) {
            self.learned_total += 1;
            *self.learned.entry(port).or_default() += 1;
        }
    }

    fn note_moved(&mut self, mac: &Mac, from: &Location, to: Location) {
        if !self.managed.contains_key(mac) {
            if let Some(n) = self.learned.get_mut(from) {
                *n = n.saturating_sub(1);
            }
            *self.learned.entry(to).or_default() += 1;
        }
    }

    fn recount_learned(&mut self) {
        self.learned.clear();
        self.learned_total = 0;
        for (mac, e) in &self.macs {
            if !self.managed.contains_key(mac) {
                self.learned_total += 1;
                *self.learned.entry(e.loc.clone()).or_default() += 1;
            }
        }
    }

    /// Records that `ip` is at `mac` unless a managed VM owns `ip` or the table is full.
    fn learn_ip(&mut self, ip: Ipv4Addr, mac: Mac, limits: &LearningLimits) {
        let full = self.arp.len() >= limits.per_violin + self.managed.len();
        match self.arp.get_mut(&ip) {
            Some((_, true)) => {}
            Some(known) => *known = (mac, false),
            None if full => {}
            None => {
                self.arp.insert(ip, (mac, false));
            }
        }
    }

    /// Why a frame from `src` carrying `arp` or `nd` is dropped as a false claim to a managed
    /// VM's address or MAC, if it is (the same check on the TAP and from peers).
    fn claim_spoofed(&self, src: Mac, arp: Option<&Arp>, nd: Option<&Nd>) -> Option<DropReason> {
        if arp.is_some_and(|a| self.arp_spoofed(src, a)) {
            Some(DropReason::ArpSpoof)
        } else if nd.is_some_and(|n| self.nd_spoofed(src, n)) {
            Some(DropReason::NdSpoof)
        } else {
            None
        }
    }

    /// Whether `nd` (in a frame from `src`) claims a managed VM's IPv6 address from another
    /// MAC, or names a managed MAC as the link-layer address of a frame someone else sent.
    fn nd_spoofed(&self, src: Mac, nd: &Nd) -> bool {
        let names_other_managed = nd
            .lladdr
            .is_some_and(|m| m != src && self.managed.contains_key(&m));
        names_other_managed
            || nd_claims(nd).any(|ip| self.nd.get(&ip).is_some_and(|owner| *owner != src))
    }

    /// Records the IPv6 addresses a managed VM claims for itself (after [`Self::nd_spoofed`]
    /// let the frame through).
    fn note_nd_claims(&mut self, src: Mac, nd: &Nd) {
        if !self.managed.contains_key(&src) {
            return;
        }
        for ip in nd_claims(nd) {
            if self.nd.contains_key(&ip) {
                continue;
            }
            if self.nd.values().filter(|m| **m == src).count() >= ND_ADDRESSES_PER_VM {
                return;
            }
            self.nd.insert(ip, src);
        }
    }

    /// Whether `arp` (in a frame from `src`) claims a managed VM's address with another MAC, or
    /// a managed MAC for a frame some other MAC sent.
    fn arp_spoofed(&self, src: Mac, arp: &Arp) -> bool {
        let claims_managed_ip = arp.spa != [0; 4]
            && self
                .arp
                .get(&Ipv4Addr::from(arp.spa))
                .is_some_and(|(mac, managed)| *managed && *mac != arp.sha);
        claims_managed_ip || (arp.sha != src && self.managed.contains_key(&arp.sha))
    }
}

/// What the switch does with a DHCP client message from its TAP.
enum DhcpVerdict {
    /// Not for us: switched like any frame.
    Forward,
    /// Taken, no answer.
    Consumed,
    /// Taken, this frame goes back to the TAP.
    Answer(Vec<u8>),
}

/// The MAC the DHCP server of `violin` answers from (and its address resolves to), locally
/// administered: `02:76:64` and the violin's id. Seen only on the local bridge.
pub fn dhcp_server_mac(violin: ViolinId) -> Mac {
    let [_, a, b, c] = violin.get().to_be_bytes();
    [0x02, 0x76, 0x64, a, b, c]
}

/// IPv6 addresses remembered per managed VM (its link-local and a few global ones).
const ND_ADDRESSES_PER_VM: usize = 16;

/// The addresses an ND message claims for its sender: an advertisement's target, a
/// solicitation's source, and the tentative target of duplicate address detection.
fn nd_claims(nd: &Nd) -> impl Iterator<Item = Ipv6Addr> {
    let claimed = if nd.advert || nd.src_ip.is_unspecified() {
        nd.target
    } else {
        nd.src_ip
    };
    std::iter::once(claimed).filter(|ip| !ip.is_unspecified() && !ip.is_multicast())
}

#[derive(Debug, Default)]
struct Peer {
    connected: bool,
    max_datagram: usize,
    violins: BTreeSet<ViolinId>,
    /// Hosts this peer is directly connected to.
    reach: BTreeSet<HostId>,
    /// We sent it our membership (directly or through a relay).
    introduced: bool,
}

/// One host's switch.
pub struct Switch {
    me: HostId,
    cfg: SwitchConfig,
    violins: BTreeMap<ViolinId, Violin>,
    peers: BTreeMap<HostId, Peer>,
    reassembler: Reassembler,
    next_frag_id: u32,
    next_sweep: Option<Instant>,
    counters: Counters,
}

impl Switch {
    /// A switch for host `me` (`site/host`).
    pub fn new(me: HostId, cfg: SwitchConfig) -> Self {
        Self {
            me,
            reassembler: Reassembler::new(cfg.reassembly),
            cfg,
            violins: BTreeMap::new(),
            peers: BTreeMap::new(),
            next_frag_id: 0,
            next_sweep: None,
            counters: Counters::default(),
        }
    }

    /// This host's name.
    pub fn me(&self) -> &HostId {
        &self.me
    }

    /// Makes this host a member of a violin and tells connected peers; if it already is,
    /// replaces the violin's settings in place ([`Self::update_violin`]).
    pub fn add_violin(&mut self, cfg: ViolinConfig, out: &mut Vec<Output>) {
        if self.violins.contains_key(&cfg.id) {
            self.update_violin(cfg);
            return;
        }
        let id = cfg.id;
        self.violins.insert(
            id,
            Violin {
                cfg: ViolinConfig {
                    vms: Vec::new(),
                    subnet: None,
                    ..cfg.clone()
                },
                macs: HashMap::new(),
                managed: HashMap::new(),
                arp: HashMap::new(),
                nd: HashMap::new(),
                expected: HashMap::new(),
                moved_away: HashMap::new(),
                learned: HashMap::new(),
                learned_total: 0,
                local_learning: TokenBucket::default(),
            },
        );
        self.update_violin(cfg);
        self.broadcast_membership(out);
    }

    /// Replaces the settings of a violin this host is a member of (name, allowed hosts,
    /// managed VMs, subnet) without leaving it. Managed VMs no longer listed lose their ARP,
    /// ND and home entries (their MACs become ordinary learned ones); new ones get them; those
    /// still listed keep their home. Learned MACs and their sequence numbers stay. Returns
    /// whether the violin exists. Nothing is sent: membership does not change, and the
    /// allowed hosts are checked on every frame.
    pub fn update_violin(&mut self, cfg: ViolinConfig) -> bool {
        let me = self.me.clone();
        let Some(v) = self.violins.get_mut(&cfg.id) else {
            return false;
        };
        let listed: HashMap<Mac, &ManagedVm> = cfg.vms.iter().map(|vm| (vm.mac, vm)).collect();
        v.managed.retain(|mac, _| listed.contains_key(mac));
        v.nd.retain(|_, mac| listed.contains_key(mac));
        for vm in &cfg.vms {
            v.managed.entry(vm.mac).or_insert_with(|| {
                let home = vm.host.as_ref().map(|h| {
                    if *h == me {
                        Location::Local
                    } else {
                        Location::Remote(h.clone())
                    }
                });
                Managed { home, left: None }
            });
            v.nd.entry(wire::eui64_link_local(&vm.mac))
                .or_insert(vm.mac);
        }
        // The static ARP entries are the table's: the VMs' addresses and the DHCP server's.
        v.arp.retain(|_, (_, is_static)| !*is_static);
        for vm in &cfg.vms {
            v.arp.insert(vm.ip, (vm.mac, true));
        }
        if let Some(subnet) = &cfg.subnet {
            v.arp
                .insert(subnet.server(), (dhcp_server_mac(cfg.id), true));
        }
        v.cfg = cfg;
        v.recount_learned();
        true
    }

    /// Leaves a violin and tells connected peers.
    pub fn remove_violin(&mut self, id: ViolinId, out: &mut Vec<Output>) {
        if self.violins.remove(&id).is_some() {
            self.broadcast_membership(out);
        }
    }

    fn membership(&self, ask: bool) -> ControlMsg {
        ControlMsg::Membership {
            violins: self.violins.keys().copied().collect(),
            ask,
        }
    }

    fn broadcast_membership(&mut self, out: &mut Vec<Output>) {
        let msg = self.membership(false);
        let known: Vec<HostId> = self.peers.keys().cloned().collect();
        for p in known {
            self.send_control(&p, msg.clone(), out);
        }
    }

    fn reach_msg(&self) -> ControlMsg {
        ControlMsg::Reach {
            connected: self
                .peers
                .iter()
                .filter(|(_, p)| p.connected)
                .map(|(h, _)| h.to_string())
                .collect(),
        }
    }

    /// A direct connection to `host` is up; `max_datagram` is its current datagram limit.
    pub fn peer_up(&mut self, host: HostId, max_datagram: usize, out: &mut Vec<Output>) {
        let peer = self.peers.entry(host.clone()).or_default();
        peer.connected = true;
        peer.max_datagram = max_datagram;
        peer.introduced = true;
        // A (re)connected peer may have restarted: its membership (and with it a full sync
        // of our MACs) comes anew.
        peer.violins.clear();
        out.push(Output::Control {
            via: host.clone(),
            msg: self.membership(true),
        });
        self.broadcast_reach(out);
    }

    /// The direct connection to `host` is gone (it may still be reachable through a relay).
    pub fn peer_down(&mut self, host: &HostId, out: &mut Vec<Output>) {
        if let Some(p) = self.peers.get_mut(host) {
            p.connected = false;
            p.reach.clear();
            p.introduced = false;
        }
        self.broadcast_reach(out);
    }

    fn broadcast_reach(&mut self, out: &mut Vec<Output>) {
        let msg = self.reach_msg();
        for (h, p) in &self.peers {
            if p.connected {
                out.push(Output::Control {
                    via: h.clone(),
                    msg: msg.clone(),
                });
            }
        }
    }

    /// The datagram limit of the connection to `host` changed.
    pub fn set_max_datagram(&mut self, host: &HostId, max_datagram: usize) {
        if let Some(p) = self.peers.get_mut(host) {
            p.max_datagram = max_datagram;
        }
    }

    /// Whether `host` is a member of `violin` that we accept: it claimed membership and local
    /// configuration allows it.
    fn is_member(&self, violin: &Violin, host: &HostId) -> bool {
        violin.cfg.allowed.iter().any(|p| p.matches(host))
            && self
                .peers
                .get(host)
                .is_some_and(|p| p.violins.contains(&violin.cfg.id))
    }

    /// The MAC address `text` spells; counts a malformed message if it spells none.
    fn parse_mac(&mut self, text: &str) -> Option<Mac> {
        let mac = wire::parse_mac(text);
        if mac.is_none() {
            self.drop(DropReason::Malformed);
        }
        mac
    }

    /// Whether `from` is a permitted member of `violin`; if not, counts the drop and why.
    fn accepts_from(&mut self, violin: ViolinId, from: &HostId) -> bool {
        let why = match self.violins.get(&violin) {
            None => DropReason::UnknownViolin,
            Some(v) if !self.is_member(v, from) => DropReason::NotMember,
            Some(_) => return true,
        };
        self.drop(why);
        false
    }

    fn members(&self, violin: &Violin) -> Vec<HostId> {
        self.peers
            .keys()
            .filter(|h| self.is_member(violin, h))
            .cloned()
            .collect()
    }

    /// Next hop towards `host`: itself if connected, else the first connected peer that
    /// reaches it.
    fn next_hop(&self, host: &HostId) -> Option<HostId> {
        if self.peers.get(host).is_some_and(|p| p.connected) {
            return Some(host.clone());
        }
        self.peers
            .iter()
            .find(|(_, p)| p.connected && p.reach.contains(host))
            .map(|(h, _)| h.clone())
    }

    fn drop(&mut self, reason: DropReason) {
        // Keyed by label for the status; allocates only the first time a reason is counted.
        match self.counters.drops.get_mut(reason.as_str()) {
            Some(n) => *n += 1,
            None => {
                self.counters.drops.insert(reason.as_str().to_owned(), 1);
            }
        }
    }

    fn send_control(&mut self, to: &HostId, msg: ControlMsg, out: &mut Vec<Output>) {
        let Some(via) = self.next_hop(to) else {
            return;
        };
        let msg = if &via == to {
            msg
        } else {
            ControlMsg::Relay {
                to: to.to_string(),
                msg: Box::new(msg),
            }
        };
        out.push(Output::Control { via, msg });
    }

    /// The next hop towards `to` and the largest datagram that reaches `to` that way whole.
    fn route(&self, to: &HostId) -> Option<(HostId, usize)> {
        let via = self.next_hop(to)?;
        let mut max = self
            .peers
            .get(&via)
            .map_or(self.cfg.default_max_datagram, |p| p.max_datagram);
        if &via != to {
            // The relay's next link is unknown here and may be narrower than ours: stay within
            // what every QUIC path carries. RELAY header here, RELAYED header (naming us) on
            // the next link.
            max = max.min(self.cfg.default_max_datagram);
            max = max.saturating_sub(2 + to.len().max(self.me.len()));
        }
        Some((via, max))
    }

    /// Sends a sealed FRAME datagram to `to`, fragmenting or relaying as needed.
    fn send_datagram(
        &mut self,
        to: &HostId,
        violin: ViolinId,
        datagram: &Bytes,
        redirected: bool,
        out: &mut Vec<Output>,
    ) {
        let Some((via, max)) = self.route(to) else {
            self.drop(DropReason::NoRoute);
            return;
        };
        let relayed = &via != to;
        let parts = if datagram.len() <= max {
            vec![datagram.clone()]
        } else {
            self.next_frag_id = self.next_frag_id.wrapping_add(1);
            match wire::fragment(
                violin,
                &datagram[FRAME_HEADER_LEN..],
                redirected,
                self.next_frag_id,
                max,
            ) {
                Some(parts) => {
                    self.counters.fragmented += 1;
                    parts
                }
                None => {
                    self.drop(DropReason::Oversize);
                    return;
                }
            }
        };
        for part in parts {
            let datagram = if relayed {
                match wire::encode_relay(false, to, &part) {
                    Some(d) => d,
                    None => {
                        self.drop(DropReason::NoRoute);
                        return;
                    }
                }
            } else {
                part
            };
            self.counters.datagrams_out += 1;
            out.push(Output::Transmit {
                via: via.clone(),
                datagram,
            });
        }
    }

    /// A frame read from the local TAP of `violin`. `buf` holds [`FRAME_HEADER_LEN`] reserved
    /// bytes followed by the Ethernet frame (so the common case sends it without copying).
    pub fn handle_tap_frame(
        &mut self,
        now: Instant,
        violin_id: ViolinId,
        buf: BytesMut,
        out: &mut Vec<Output>,
    ) {
        self.counters.tap_frames += 1;
        let Some(frame) = buf.get(FRAME_HEADER_LEN..) else {
            self.drop(DropReason::Malformed);
            return;
        };
        let Some((dst, src, ethertype)) = wire::ethernet(frame) else {
            self.drop(DropReason::Malformed);
            return;
        };
        let arp = wire::parse_arp(frame);
        if !self.violins.contains_key(&violin_id) {
            self.drop(DropReason::UnknownViolin);
            return;
        }
        let nd = wire::parse_nd(frame);
        if let Some(reason) = self
            .violins
            .get(&violin_id)
            .and_then(|v| v.claim_spoofed(src, arp.as_ref(), nd.as_ref()))
        {
            self.drop(reason);
            return;
        }
        if !wire::is_group(&src)
            && let Err(reason) = self.learn_local(now, violin_id, src, arp.as_ref(), out)
        {
            self.drop(reason);
            return;
        }
        // Past port security: what a managed VM claims is its own.
        if let Some(nd) = &nd
            && let Some(v) = self.violins.get_mut(&violin_id)
        {
            v.note_nd_claims(src, nd);
        }
        if dhcp::is_client_frame(frame) {
            match self.answer_dhcp(violin_id, src, frame) {
                DhcpVerdict::Forward => {}
                DhcpVerdict::Consumed => return,
                DhcpVerdict::Answer(reply) => {
                    self.counters.delivered += 1;
                    out.push(Output::Deliver {
                        violin: violin_id,
                        frame: Bytes::from(reply),
                    });
                    return;
                }
            }
        }
        if ethertype == ETHERTYPE_ARP
            && let Some(arp) = arp
            && arp.op == 1
            && let Some(reply) = self.answer_arp(violin_id, &arp)
        {
            self.counters.arp_answered += 1;
            self.counters.delivered += 1;
            out.push(Output::Deliver {
                violin: violin_id,
                frame: Bytes::from(reply),
            });
            return;
        }
        let Some(violin) = self.violins.get(&violin_id) else {
            return;
        };
        let target = if wire::is_group(&dst) {
            None
        } else {
            // A managed VM's home stands in for an aged-out entry: no flooding towards it.
            let loc = violin
                .macs
                .get(&dst)
                .map(|e| &e.loc)
                .or_else(|| violin.managed.get(&dst).and_then(|m| m.home.as_ref()));
            match loc {
                Some(Location::Local) => {
                    self.drop(DropReason::LocalDestination);
                    return;
                }
                Some(Location::Remote(h)) if self.is_member(violin, h) => Some(h.clone()),
                _ => None,
            }
        };
        let mut buf = buf;
        if self.cfg.mss_clamp {
            // What the frame may take on the narrowest way it goes (all members if flooded).
            let max_datagram = match &target {
                Some(h) => self.route(h).map(|(_, max)| max),
                None => self
                    .members(violin)
                    .iter()
                    .filter_map(|h| self.route(h).map(|(_, max)| max))
                    .min(),
            };
            if let Some(max) = max_datagram
                && crate::mss::clamp(
                    &mut buf[FRAME_HEADER_LEN..],
                    max.saturating_sub(FRAME_HEADER_LEN),
                )
            {
                self.counters.mss_clamped += 1;
            }
        }
        let datagram = wire::seal_frame(buf, violin_id, false);
        match target {
            Some(h) => self.send_datagram(&h, violin_id, &datagram, false, out),
            None => {
                self.counters.flooded += 1;
                for h in self.members(violin) {
                    self.send_datagram(&h, violin_id, &datagram, false, out);
                }
            }
        }
    }

    /// Learns `src` as local, or says why the frame must be dropped.
    fn learn_local(
        &mut self,
        now: Instant,
        violin_id: ViolinId,
        src: Mac,
        arp: Option<&Arp>,
        out: &mut Vec<Output>,
    ) -> Result<(), DropReason> {
        let me = self.me.clone();
        let hold = self.cfg.move_hold_down;
        let Some(v) = self.violins.get_mut(&violin_id) else {
            return Err(DropReason::UnknownViolin);
        };
        let expected_here = v
            .expected
            .get(&src)
            .is_some_and(|(h, until)| *h == me && *until > now);
        let held_down = v
            .moved_away
            .get(&src)
            .is_some_and(|t| now.duration_since(*t) < hold);
        if let Some(m) = v.managed.get(&src)
            && matches!(m.home, Some(Location::Remote(_)))
            && !expected_here
        {
            // Its home is elsewhere: either a late frame of a VM that just left, or theft.
            return Err(if held_down {
                DropReason::StaleLocalAfterMove
            } else {
                DropReason::SpoofedSource
            });
        }
        let limits = self.cfg.learning;
        let new_here = v.macs.get(&src).is_none_or(|e| e.loc != Location::Local);
        if new_here && !v.managed.contains_key(&src) {
            if !v.may_learn(&Location::Local, &limits) {
                return Err(DropReason::MacLimit);
            }
            if !v
                .local_learning
                .take(now, limits.local_rate_per_s, limits.local_burst)
            {
                return Err(DropReason::LearnRateLimit);
            }
        }
        let ip = arp
            .filter(|a| a.sha == src && a.spa != [0; 4])
            .map(|a| Ipv4Addr::from(a.spa));
        if let Some(ip) = ip {
            v.learn_ip(ip, src, &limits);
        }
        if let Some(m) = v.managed.get_mut(&src)
            && m.home != Some(Location::Local)
        {
            m.move_home(Location::Local, now);
        }
        let seq = match v.macs.get_mut(&src) {
            Some(e) if e.loc == Location::Local => {
                e.last_seen = now;
                if ip.is_none() || e.ip == ip {
                    return Ok(());
                }
                e.ip = ip;
                e.seq // re-announce the new address with the same sequence number
            }
            Some(_) if !expected_here && held_down => return Err(DropReason::StaleLocalAfterMove),
            Some(e) => {
                self.counters.mac_moves += 1;
                let (old, seq) = (e.loc.clone(), e.seq + 1);
                tracing::info!(violin = %violin_id, mac = %wire::mac_to_string(&src), seq,
                    expected = expected_here, "mac moved here: seen on the local TAP");
                v.note_moved(&src, &old, Location::Local);
                seq
            }
            None => {
                v.note_learned(&src, Location::Local);
                1
            }
        };
        v.moved_away.remove(&src);
        v.expected.remove(&src);
        v.macs.insert(
            src,
            MacEntry {
                loc: Location::Local,
                seq,
                last_seen: now,
                ip,
            },
        );
        let msg = ControlMsg::Announce {
            violin: violin_id,
            mac: wire::mac_to_string(&src),
            seq,
            ip,
        };
        let Some(v) = self.violins.get(&violin_id) else {
            return Ok(());
        };
        for h in self.members(v) {
            self.send_control(&h, msg.clone(), out);
        }
        Ok(())
    }

    /// What becomes of a DHCP client message from `src` on the local TAP (see
    /// [`crate::dhcp`]). Answered here: messages of a managed VM (`chaddr` is the frame's
    /// source and listed in `vms`) of a violin with a subnet, sent to the broadcast address or
    /// the server's. Everyone else's go their usual way (there may be a DHCP server in the
    /// violin), counted as `dhcp_unknown_client`.
    fn answer_dhcp(&mut self, violin_id: ViolinId, src: Mac, frame: &[u8]) -> DhcpVerdict {
        let Some(v) = self.violins.get(&violin_id) else {
            return DhcpVerdict::Forward;
        };
        let Some(subnet) = v.cfg.subnet else {
            return DhcpVerdict::Forward;
        };
        let Some(req) = dhcp::parse_client_frame(frame) else {
            return DhcpVerdict::Forward;
        };
        let server = subnet.server();
        let to_us = req.dst_ip == server;
        if !(to_us || req.dst_ip == Ipv4Addr::BROADCAST) || !req.msg.giaddr.is_unspecified() {
            return DhcpVerdict::Forward;
        }
        let vm = v
            .cfg
            .vms
            .iter()
            .find(|vm| vm.mac == req.msg.chaddr && vm.mac == src)
            .map(|vm| vm.ip);
        let Some(vm_ip) = vm else {
            self.counters.dhcp_unknown_client += 1;
            // Only we are at the server's address: nobody else would answer.
            return if to_us {
                DhcpVerdict::Consumed
            } else {
                DhcpVerdict::Forward
            };
        };
        let o = &req.msg.options;
        let reply_type = match o.msg_type {
            Some(MessageType::Discover) => MessageType::Offer,
            Some(MessageType::Request) if o.server_id.is_some_and(|s| s != server) => {
                // It took another server's offer (it cannot have had one from us).
                return DhcpVerdict::Consumed;
            }
            Some(MessageType::Request) => {
                let asked = o
                    .requested_ip
                    .or((!req.msg.ciaddr.is_unspecified()).then_some(req.msg.ciaddr));
                if asked == Some(vm_ip) {
                    MessageType::Ack
                } else {
                    MessageType::Nak
                }
            }
            // Release, decline, inform: nothing to do for a fixed address.
            _ => return DhcpVerdict::Consumed,
        };
        let nak = reply_type == MessageType::Nak;
        let lease = u32::try_from(self.cfg.dhcp_lease.as_secs()).unwrap_or(u32::MAX);
        let granted = (!nak).then_some(lease);
        let reply = dhcp::Message {
            op: 2,
            xid: req.msg.xid,
            secs: 0,
            flags: req.msg.flags,
            ciaddr: if reply_type == MessageType::Ack {
                req.msg.ciaddr
            } else {
                Ipv4Addr::UNSPECIFIED
            },
            yiaddr: if nak { Ipv4Addr::UNSPECIFIED } else { vm_ip },
            siaddr: Ipv4Addr::UNSPECIFIED,
            giaddr: Ipv4Addr::UNSPECIFIED,
            chaddr: req.msg.chaddr,
            options: dhcp::Options {
                msg_type: Some(reply_type),
                server_id: Some(server),
                lease_time: granted,
                renewal_time: granted.map(|l| l / 2),
                rebinding_time: granted.map(|l| (u64::from(l) * 7 / 8) as u32),
                subnet_mask: (!nak).then(|| subnet.mask()),
                mtu: if nak {
                    None
                } else {
                    v.cfg.dhcp_mtu.or(self.cfg.dhcp_mtu)
                },
                requested_ip: None,
            },
        };
        // RFC 2131 4.1: a NAK is broadcast; a renewing client (ciaddr) is unicast; else the
        // broadcast flag decides; else unicast to chaddr and yiaddr.
        let (dst_mac, dst_ip) = if nak {
            (BROADCAST, Ipv4Addr::BROADCAST)
        } else if !req.msg.ciaddr.is_unspecified() {
            (req.msg.chaddr, req.msg.ciaddr)
        } else if req.msg.flags & dhcp::FLAG_BROADCAST != 0 {
            (BROADCAST, Ipv4Addr::BROADCAST)
        } else {
            (req.msg.chaddr, vm_ip)
        };
        match reply_type {
            MessageType::Offer => self.counters.dhcp_offers += 1,
            MessageType::Ack => self.counters.dhcp_acks += 1,
            _ => self.counters.dhcp_naks += 1,
        }
        DhcpVerdict::Answer(dhcp::build_server_frame(
            dst_mac,
            dhcp_server_mac(violin_id),
            server,
            dst_ip,
            &reply,
        ))
    }

    fn answer_arp(&self, violin_id: ViolinId, req: &Arp) -> Option<Vec<u8>> {
        let v = self.violins.get(&violin_id)?;
        let (mac, _) = v.arp.get(&Ipv4Addr::from(req.tpa))?;
        // A local owner answers for itself on the bridge.
        if v.macs.get(mac).is_some_and(|e| e.loc == Location::Local) || *mac == req.sha {
            return None;
        }
        let reply = Arp {
            op: 2,
            sha: *mac,
            spa: req.tpa,
            tha: req.sha,
            tpa: req.spa,
        };
        Some(wire::build_arp(req.sha, *mac, &reply))
    }

    /// A datagram received on the connection to `from`.
    pub fn handle_datagram(
        &mut self,
        now: Instant,
        from: &HostId,
        datagram: Bytes,
        out: &mut Vec<Output>,
    ) {
        self.counters.datagrams_in += 1;
        self.handle_datagram_inner(now, from, datagram, true, out);
    }

    fn handle_datagram_inner(
        &mut self,
        now: Instant,
        from: &HostId,
        datagram: Bytes,
        direct: bool,
        out: &mut Vec<Output>,
    ) {
        let Ok(decoded) = wire::decode(&datagram) else {
            self.drop(DropReason::Malformed);
            return;
        };
        match decoded {
            Datagram::Frame {
                violin,
                frame,
                redirected,
            } => self.handle_remote_frame(now, from, violin, frame, redirected, out),
            Datagram::Fragment(frag) => {
                match self.reassembler.push(now, from, frag) {
                    Ok(Some(r)) => {
                        self.counters.reassembled += 1;
                        self.handle_remote_frame(now, from, r.violin, r.frame, r.redirected, out);
                    }
                    Ok(None) => {}
                    Err(_) => self.drop(DropReason::FragmentMismatch),
                }
                self.counters.reassembly_evicted = self.reassembler.evicted;
            }
            Datagram::Relay { to, inner } => {
                let to: HostId = to.into();
                if !direct || !self.peers.get(&to).is_some_and(|p| p.connected) {
                    self.drop(DropReason::RelayRefused);
                    return;
                }
                match wire::encode_relay(true, from, &inner) {
                    Some(datagram) => {
                        self.counters.relayed += 1;
                        self.counters.datagrams_out += 1;
                        out.push(Output::Transmit { via: to, datagram });
                    }
                    None => self.drop(DropReason::RelayRefused),
                }
            }
            Datagram::Relayed {
                from: origin,
                inner,
            } => {
                if !direct {
                    self.drop(DropReason::RelayRefused);
                    return;
                }
                let origin: HostId = origin.into();
                self.handle_datagram_inner(now, &origin, inner, false, out);
            }
        }
    }

    fn handle_remote_frame(
        &mut self,
        now: Instant,
        from: &HostId,
        violin_id: ViolinId,
        frame: Bytes,
        redirected: bool,
        out: &mut Vec<Output>,
    ) {
        if !self.accepts_from(violin_id, from) {
            return;
        }
        let Some((dst, src, _)) = wire::ethernet(&frame) else {
            self.drop(DropReason::Malformed);
            return;
        };
        let arp = wire::parse_arp(&frame);
        let hold = self.cfg.move_hold_down;
        let Some(v) = self.violins.get_mut(&violin_id) else {
            return;
        };
        let nd = wire::parse_nd(&frame);
        if let Some(reason) = v.claim_spoofed(src, arp.as_ref(), nd.as_ref()) {
            self.drop(reason);
            return;
        }
        let mut learn = !wire::is_group(&src);
        let expected_from_sender = v
            .expected
            .get(&src)
            .is_some_and(|(h, until)| h == from && *until > now);
        if learn && let Some(m) = v.managed.get_mut(&src) {
            let sender = Location::Remote(from.clone());
            match &m.home {
                None => m.home = Some(sender),
                Some(home) if *home == sender => {}
                Some(_) if expected_from_sender => m.move_home(sender, now),
                Some(_) if m.just_left(&sender, now, hold) => {
                    // In flight while the VM moved: deliver, but it does not move the MAC.
                    self.counters.stale_source_frames += 1;
                    learn = false;
                }
                Some(_) => {
                    self.drop(DropReason::SpoofedSource);
                    return;
                }
            }
        }
        let limits = self.cfg.learning;
        let sender = Location::Remote(from.clone());
        if learn
            && !v.macs.contains_key(&src)
            && !v.managed.contains_key(&src)
            && !v.may_learn(&sender, &limits)
        {
            // Delivered all the same: the sending host enforced its own limits.
            self.counters.learning_refused += 1;
            learn = false;
        }
        if let Some(a) = arp
            && learn
            && a.sha == src
            && a.spa != [0; 4]
        {
            v.learn_ip(Ipv4Addr::from(a.spa), src, &limits);
        }
        // Past port security: what a managed VM claims is its own.
        if let Some(nd) = &nd
            && learn
        {
            v.note_nd_claims(src, nd);
        }
        if learn {
            match v.macs.get_mut(&src) {
                None => {
                    v.note_learned(&src, sender);
                    v.macs.insert(
                        src,
                        MacEntry {
                            loc: Location::Remote(from.clone()),
                            seq: 0,
                            last_seen: now,
                            ip: None,
                        },
                    );
                }
                Some(e) if e.loc == Location::Remote(from.clone()) => e.last_seen = now,
                Some(e) if expected_from_sender => {
                    // Announced in advance: switch on the first frame, before the announcement.
                    if e.loc == Location::Local {
                        v.moved_away.insert(src, now);
                    }
                    let old = std::mem::replace(&mut e.loc, Location::Remote(from.clone()));
                    e.seq += 1;
                    e.last_seen = now;
                    tracing::info!(violin = %violin_id, mac = %wire::mac_to_string(&src), seq = e.seq,
                        to = %from, "mac moved: first frame from the expected host");
                    v.expected.remove(&src);
                    v.note_moved(&src, &old, Location::Remote(from.clone()));
                    self.counters.mac_moves += 1;
                }
                Some(_) => self.counters.stale_source_frames += 1,
            }
        }
        let Some(v) = self.violins.get(&violin_id) else {
            return;
        };
        if !wire::is_group(&dst)
            && let Some(MacEntry {
                loc: Location::Remote(h),
                ..
            }) = v.macs.get(&dst)
            && h != &self.me
        {
            let h = h.clone();
            if redirected || !self.is_member(v, &h) {
                self.drop(DropReason::Misdelivered);
                return;
            }
            self.counters.redirected += 1;
            let datagram = wire::encode_frame(violin_id, &frame, true);
            self.send_datagram(&h, violin_id, &datagram, true, out);
            return;
        }
        self.counters.delivered += 1;
        out.push(Output::Deliver {
            violin: violin_id,
            frame,
        });
    }

    /// A control message received on the connection to `from`.
    pub fn handle_control(
        &mut self,
        now: Instant,
        from: &HostId,
        msg: ControlMsg,
        out: &mut Vec<Output>,
    ) {
        self.handle_control_inner(now, from, msg, true, out);
    }

    fn handle_control_inner(
        &mut self,
        now: Instant,
        from: &HostId,
        msg: ControlMsg,
        direct: bool,
        out: &mut Vec<Output>,
    ) {
        match msg {
            ControlMsg::Membership { violins, ask } => {
                let new: BTreeSet<ViolinId> = violins.into_iter().collect();
                let peer = self.peers.entry(from.clone()).or_default();
                if ask {
                    // It is new to us (again): everything it shares with us is news to it.
                    peer.violins.clear();
                }
                let added: Vec<ViolinId> = new.difference(&peer.violins).copied().collect();
                peer.violins = new;
                if ask || !peer.introduced {
                    peer.introduced = true;
                    let m = self.membership(false);
                    self.send_control(from, m, out);
                }
                // Full sync of our local MACs for newly shared violins.
                for id in added {
                    let Some(v) = self.violins.get(&id) else {
                        continue;
                    };
                    if !self.is_member(v, from) {
                        continue;
                    }
                    let msgs: Vec<ControlMsg> = v
                        .macs
                        .iter()
                        .filter(|(_, e)| e.loc == Location::Local)
                        .map(|(mac, e)| ControlMsg::Announce {
                            violin: id,
                            mac: wire::mac_to_string(mac),
                            seq: e.seq,
                            ip: e.ip,
                        })
                        .collect();
                    for m in msgs {
                        self.send_control(from, m, out);
                    }
                }
            }
            ControlMsg::Reach { connected } => {
                if !direct {
                    return;
                }
                let reach: BTreeSet<HostId> = connected
                    .into_iter()
                    .map(HostId::from)
                    .filter(|h| h != &self.me)
                    .collect();
                // Introduce ourselves to hosts newly reachable through this peer (they may
                // have restarted) that we have no direct connection to.
                let old = self
                    .peers
                    .get(from)
                    .map(|p| p.reach.clone())
                    .unwrap_or_default();
                let fresh: Vec<HostId> = reach
                    .difference(&old)
                    .filter(|h| !self.peers.get(*h).is_some_and(|p| p.connected))
                    .cloned()
                    .collect();
                self.peers.entry(from.clone()).or_default().reach = reach;
                for h in fresh {
                    self.peers.entry(h.clone()).or_default().introduced = true;
                    let m = self.membership(true);
                    self.send_control(&h, m, out);
                }
            }
            ControlMsg::Peers { .. } => {}
            ControlMsg::Announce {
                violin,
                mac,
                seq,
                ip,
            } => self.handle_announce(now, from, violin, &mac, seq, ip, out),
            ControlMsg::SeqHint { violin, mac, seq } => {
                let Some(mac) = self.parse_mac(&mac) else {
                    return;
                };
                let Some(v) = self.violins.get_mut(&violin) else {
                    return;
                };
                let Some(e) = v.macs.get_mut(&mac) else {
                    return;
                };
                if e.loc != Location::Local || e.seq > seq {
                    return;
                }
                e.seq = seq + 1;
                tracing::info!(violin = %violin, mac = %wire::mac_to_string(&mac), seq = e.seq, from = %from,
                    "sequence hint: re-announcing a local mac with a higher sequence");
                let msg = ControlMsg::Announce {
                    violin,
                    mac: wire::mac_to_string(&mac),
                    seq: e.seq,
                    ip: e.ip,
                };
                let Some(v) = self.violins.get(&violin) else {
                    return;
                };
                for h in self.members(v) {
                    self.send_control(&h, msg.clone(), out);
                }
            }
            ControlMsg::ExpectMove { violin, mac, host } => {
                let Some(mac) = self.parse_mac(&mac) else {
                    return;
                };
                let Some(v) = self.violins.get(&violin) else {
                    return;
                };
                if !self.is_member(v, from) {
                    self.drop(DropReason::NotMember);
                    return;
                }
                let ttl = self.cfg.expect_move_ttl;
                let limit = self.cfg.learning.per_violin;
                if let Some(v) = self.violins.get_mut(&violin)
                    && (v.expected.len() < limit + v.managed.len() || v.expected.contains_key(&mac))
                {
                    v.expected.insert(mac, (host.into(), now + ttl));
                }
            }
            ControlMsg::Relay { to, msg } => {
                let to: HostId = to.into();
                if !direct || matches!(*msg, ControlMsg::Relay { .. } | ControlMsg::Relayed { .. })
                {
                    self.drop(DropReason::RelayRefused);
                    return;
                }
                if to == self.me {
                    self.handle_control_inner(now, from, *msg, false, out);
                } else if self.peers.get(&to).is_some_and(|p| p.connected) {
                    self.counters.relayed += 1;
                    out.push(Output::Control {
                        via: to,
                        msg: ControlMsg::Relayed {
                            from: from.to_string(),
                            msg,
                        },
                    });
                } else {
                    self.drop(DropReason::RelayRefused);
                }
            }
            ControlMsg::Relayed { from: origin, msg } => {
                if !direct || matches!(*msg, ControlMsg::Relay { .. } | ControlMsg::Relayed { .. })
                {
                    self.drop(DropReason::RelayRefused);
                    return;
                }
                let origin: HostId = origin.into();
                self.handle_control_inner(now, &origin, *msg, false, out);
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn handle_announce(
        &mut self,
        now: Instant,
        from: &HostId,
        violin: ViolinId,
        mac: &str,
        seq: u64,
        ip: Option<Ipv4Addr>,
        out: &mut Vec<Output>,
    ) {
        let Some(mac) = self.parse_mac(mac) else {
            return;
        };
        if !self.accepts_from(violin, from) {
            return;
        }
        let Some(v) = self.violins.get_mut(&violin) else {
            return;
        };
        let here = Location::Remote(from.clone());
        if let Some(m) = v.managed.get_mut(&mac) {
            let expected = v
                .expected
                .get(&mac)
                .is_some_and(|(h, until)| h == from && *until > now);
            match &m.home {
                None => m.home = Some(here.clone()),
                Some(home) if *home == here => {}
                Some(_) if expected => {
                    m.move_home(here.clone(), now);
                    v.expected.remove(&mac);
                }
                Some(_) => {
                    self.drop(DropReason::SpoofedSource);
                    return;
                }
            }
        }
        let limits = self.cfg.learning;
        if !v.macs.contains_key(&mac)
            && !v.managed.contains_key(&mac)
            && !v.may_learn(&here, &limits)
        {
            self.counters.learning_refused += 1;
            return;
        }
        let hint = match v.macs.get_mut(&mac) {
            None => {
                v.note_learned(&mac, here.clone());
                v.macs.insert(
                    mac,
                    MacEntry {
                        loc: here,
                        seq,
                        last_seen: now,
                        ip,
                    },
                );
                None
            }
            Some(e) if seq > e.seq => {
                let moved_from = (e.loc != here).then(|| e.loc.clone());
                *e = MacEntry {
                    loc: here.clone(),
                    seq,
                    last_seen: now,
                    ip: ip.or(e.ip),
                };
                if let Some(old) = moved_from {
                    if old == Location::Local {
                        v.moved_away.insert(mac, now);
                    }
                    v.note_moved(&mac, &old, here);
                    self.counters.mac_moves += 1;
                    tracing::info!(violin = %violin, mac = %wire::mac_to_string(&mac), seq, to = %from,
                        "mac moved: announcement with a higher sequence");
                }
                None
            }
            Some(e) if e.loc == here => {
                e.last_seen = now;
                e.ip = ip.or(e.ip);
                None
            }
            Some(e) => {
                self.counters.stale_announcements += 1;
                tracing::info!(violin = %violin, mac = %wire::mac_to_string(&mac), seq, ours = e.seq,
                    from = %from, "stale announcement: answering with a sequence hint");
                Some(e.seq)
            }
        };
        if let Some(ip) = ip
            && hint.is_none()
        {
            v.learn_ip(ip, mac, &limits);
        }
        if let Some(seq) = hint {
            self.send_control(
                from,
                ControlMsg::SeqHint {
                    violin,
                    mac: wire::mac_to_string(&mac),
                    seq,
                },
                out,
            );
        }
    }

    /// The adaptation manager announces that `mac` of `violin` will move to `host`. Recorded
    /// here and sent to every member, so each switches on the first frame from `host`.
    pub fn expect_move(
        &mut self,
        now: Instant,
        violin: ViolinId,
        mac: Mac,
        host: HostId,
        out: &mut Vec<Output>,
    ) -> bool {
        let ttl = self.cfg.expect_move_ttl;
        let Some(v) = self.violins.get_mut(&violin) else {
            return false;
        };
        v.expected.insert(mac, (host.clone(), now + ttl));
        let msg = ControlMsg::ExpectMove {
            violin,
            mac: wire::mac_to_string(&mac),
            host: host.to_string(),
        };
        let Some(v) = self.violins.get(&violin) else {
            return false;
        };
        for h in self.members(v) {
            self.send_control(&h, msg.clone(), out);
        }
        true
    }

    /// When [`Self::handle_timeout`] wants to be called next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.next_sweep
    }

    /// Housekeeping: ages MAC entries, expectations, hold-downs and partial frames.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.next_sweep.is_some_and(|t| t > now) {
            return;
        }
        self.next_sweep = Some(now + self.cfg.sweep_interval);
        let age = self.cfg.mac_ageing;
        let hold = self.cfg.move_hold_down;
        for v in self.violins.values_mut() {
            v.macs.retain(|_, e| now.duration_since(e.last_seen) < age);
            let macs = &v.macs;
            v.arp
                .retain(|_, (mac, is_static)| *is_static || macs.contains_key(mac));
            v.expected.retain(|_, (_, until)| *until > now);
            v.moved_away.retain(|_, t| now.duration_since(*t) < hold);
            v.recount_learned();
            // A flood leaves tables with room for thousands: give the memory back.
            shrink_if_sparse(&mut v.macs);
            shrink_if_sparse(&mut v.arp);
            shrink_if_sparse(&mut v.expected);
            shrink_if_sparse(&mut v.moved_away);
        }
        self.reassembler.handle_timeout(now);
        self.counters.reassembly_evicted = self.reassembler.evicted;
    }

    /// Entries and capacity of the MAC table of `violin` (tests).
    #[cfg(test)]
    pub(crate) fn mac_table_size(&self, violin: ViolinId) -> (usize, usize) {
        self.violins
            .get(&violin)
            .map_or((0, 0), |v| (v.macs.len(), v.macs.capacity()))
    }

    /// Where `mac` of `violin` is believed to be, with its sequence number.
    pub fn lookup(&self, violin: ViolinId, mac: &Mac) -> Option<(Location, u64)> {
        let e = self.violins.get(&violin)?.macs.get(mac)?;
        Some((e.loc.clone(), e.seq))
    }

    /// Counters so far.
    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// Bytes held by incomplete fragmented frames.
    pub fn reassembly_bytes(&self) -> usize {
        self.reassembler.buffered_bytes()
    }

    /// A snapshot for the status command.
    pub fn status(&self, now: Instant) -> SwitchStatus {
        SwitchStatus {
            host: self.me.to_string(),
            peers: self
                .peers
                .iter()
                .map(|(h, p)| PeerStatus {
                    host: h.to_string(),
                    connected: p.connected,
                    via: if p.connected {
                        None
                    } else {
                        self.next_hop(h).map(|v| v.to_string())
                    },
                    max_datagram: p.max_datagram,
                    violins: p.violins.iter().map(|v| v.get()).collect(),
                })
                .collect(),
            violins: self
                .violins
                .values()
                .map(|v| ViolinStatus {
                    id: v.cfg.id.get(),
                    name: v.cfg.name.clone(),
                    subnet: v.cfg.subnet.map(|s| s.to_string()),
                    runtime: false,
                    members: self.members(v).iter().map(|h| h.to_string()).collect(),
                    macs: {
                        let mut m: Vec<MacStatus> = v
                            .macs
                            .iter()
                            .map(|(mac, e)| MacStatus {
                                mac: wire::mac_to_string(mac),
                                location: match &e.loc {
                                    Location::Local => "local".into(),
                                    Location::Remote(h) => h.to_string(),
                                },
                                seq: e.seq,
                                age_s: now.duration_since(e.last_seen).as_secs_f64(),
                                ip: e.ip,
                            })
                            .collect();
                        m.sort_by(|a, b| a.mac.cmp(&b.mac));
                        m
                    },
                })
                .collect(),
            counters: self.counters.clone(),
            reassembly_bytes: self.reassembler.buffered_bytes(),
        }
    }
}

/// Frees a map's memory once it holds less than a quarter of its capacity.
fn shrink_if_sparse<K: std::hash::Hash + Eq, V>(map: &mut HashMap<K, V>) {
    if map.capacity() > 64 && map.len() < map.capacity() / 4 {
        map.shrink_to_fit();
    }
}

/// Helper for tests and the driver: a frame buffer with the reserved header in front.
pub fn tap_buffer(frame: &[u8]) -> BytesMut {
    let mut b = BytesMut::with_capacity(FRAME_HEADER_LEN + frame.len());
    b.extend_from_slice(&[0; FRAME_HEADER_LEN]);
    b.extend_from_slice(frame);
    b
}

/// An Ethernet frame with the given addresses and EtherType, padded to `len` bytes (tests).
pub fn test_frame(dst: Mac, src: Mac, ethertype: u16, len: usize, fill: u8) -> Vec<u8> {
    let mut f = Vec::with_capacity(len.max(14));
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.resize(len.max(14), fill);
    f
}

/// The broadcast MAC (re-exported for tests).
pub const BROADCAST_MAC: Mac = BROADCAST;

/// Fuzz entry point for the switching core: host `a/a0` in violins 1 and 2 with three peers
/// receives a script of datagrams, control messages, TAP frames and clock jumps. Never panics;
/// a datagram that does not decode is counted as malformed and has no effect, every datagram
/// sent decodes, and frames are delivered only into violins this host is a member of.
///
/// Script records: `op, len, bytes[len]`; `op % 4`: 0 datagram from peer `op / 4 % 3`, 1
/// control message (JSON body) from that peer, 2 TAP frame on violin `1 + op / 4 % 2`,
/// 3 clock advance of `op / 4` × 10 ms (no length byte).
pub fn fuzz_switch(data: &[u8]) {
    let mut sw = Switch::new(
        HostId::from("a/a0"),
        SwitchConfig {
            reassembly: ReassemblyLimits {
                max_bytes: 16 << 10,
                max_frames: 8,
                timeout: Duration::from_millis(500),
            },
            ..SwitchConfig::default()
        },
    );
    let peers: [HostId; 3] = ["a/a1", "b/b0", "c/c0"].map(HostId::from);
    let violins = [1, 2].map(|v| ViolinId::new(v).unwrap_or_else(|| unreachable!()));
    let mut out = Vec::new();
    for (i, v) in violins.into_iter().enumerate() {
        sw.add_violin(
            ViolinConfig {
                id: v,
                name: format!("v{i}"),
                allowed: vec![HostPattern::new(if i == 0 { "*" } else { "b/*" })],
                vms: vec![ManagedVm {
                    mac: [2, 0, 0, 0, 0, 9],
                    ip: Ipv4Addr::new(10, 0, 0, 9),
                    host: (i == 0).then(|| HostId::from("b/b0")),
                }],
                subnet: (i == 0)
                    .then(|| Subnet::parse("10.0.0.0/24").unwrap_or_else(|_| unreachable!())),
                dhcp_mtu: None,
            },
            &mut out,
        );
    }
    let mut now = Instant::now();
    for (i, p) in peers.iter().enumerate() {
        sw.peer_up(p.clone(), 600 + 400 * i, &mut out);
    }
    let mut rest = data;
    while let Some((&op, tail)) = rest.split_first() {
        rest = tail;
        out.clear();
        let peer = &peers[usize::from(op / 4 % 3)];
        if op % 4 == 3 {
            now += Duration::from_millis(10 * u64::from(op / 4));
            sw.handle_timeout(now);
        } else {
            let Some((&len, tail)) = rest.split_first() else {
                return;
            };
            let bytes = tail.get(..usize::from(len)).unwrap_or(tail);
            rest = &tail[bytes.len()..];
            match op % 4 {
                0 => {
                    let datagram = Bytes::copy_from_slice(bytes);
                    let malformed = wire::decode(&datagram).is_err();
                    let before = sw
                        .counters
                        .drops
                        .get(DropReason::Malformed.as_str())
                        .copied();
                    sw.handle_datagram(now, peer, datagram, &mut out);
                    if malformed {
                        let after = sw
                            .counters
                            .drops
                            .get(DropReason::Malformed.as_str())
                            .copied();
                        assert_eq!(after, Some(before.unwrap_or(0) + 1));
                        assert!(out.is_empty());
                    }
                }
                1 => {
                    if let Ok(msg) = crate::control::decode(bytes) {
                        sw.handle_control(now, peer, msg, &mut out);
                    }
                }
                _ => sw.handle_tap_frame(
                    now,
                    violins[usize::from(op / 4 % 2)],
                    tap_buffer(bytes),
                    &mut out,
                ),
            }
        }
        for o in &out {
            match o {
                Output::Transmit { datagram, .. } => {
                    assert!(wire::decode(datagram).is_ok(), "sent a malformed datagram");
                }
                Output::Deliver { violin, frame } => {
                    assert!(violins.contains(violin), "delivered into a foreign violin");
                    assert!(frame.len() >= wire::ETHERNET_HEADER_LEN);
                }
                Output::Control { .. } => {}
            }
        }
        assert!(sw.reassembly_bytes() <= 16 << 10);
    }
}

#[cfg(test)]
mod fuzz_tests {
    use proptest::prelude::*;

    use super::fuzz_switch;

    proptest! {
        #[test]
        fn switch_never_panics_on_scripts(data in proptest::collection::vec(any::<u8>(), 0..800)) {
            fuzz_switch(&data);
        }
    }
}
