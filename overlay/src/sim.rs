//! Deterministic in-memory simulator of several hosts' switches (tests only).

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::HostId;
use crate::control::ControlMsg;
use crate::dhcp::{self, MessageType, Subnet};
use crate::switch::{
    DropReason, HostPattern, Location, ManagedVm, Output, Switch, SwitchConfig, ViolinConfig,
    tap_buffer, test_frame,
};
use crate::wire::{self, Arp, BROADCAST, ETHERTYPE_RARP, Mac, ViolinId};

struct Sim {
    now: Instant,
    hosts: BTreeMap<HostId, Switch>,
    links: BTreeSet<(HostId, HostId)>,
    max_datagram: usize,
    /// Links whose datagram limit differs from `max_datagram`.
    link_max: BTreeMap<(HostId, HostId), usize>,
    queue: VecDeque<(HostId, Output)>,
    delivered: BTreeMap<HostId, Vec<(ViolinId, Bytes)>>,
    /// Datagrams from this host are held back (to deliver them late).
    hold_from: Option<HostId>,
    held: Vec<(HostId, Output)>,
    datagrams_on_links: BTreeMap<(HostId, HostId), usize>,
}

fn h(s: &str) -> HostId {
    s.into()
}

fn v(id: u32) -> ViolinId {
    ViolinId::new(id).unwrap()
}

const IP: u16 = 0x0800;

fn mac(n: u8) -> Mac {
    [2, 0, 0, 0, 0, n]
}

impl Sim {
    fn new(hosts: &[&str], max_datagram: usize) -> Self {
        let now = Instant::now();
        Self {
            now,
            hosts: hosts
                .iter()
                .map(|n| (h(n), Switch::new(h(n), SwitchConfig::default())))
                .collect(),
            links: BTreeSet::new(),
            max_datagram,
            link_max: BTreeMap::new(),
            queue: VecDeque::new(),
            delivered: BTreeMap::new(),
            hold_from: None,
            held: Vec::new(),
            datagrams_on_links: BTreeMap::new(),
        }
    }

    fn sw(&mut self, host: &str) -> &mut Switch {
        self.hosts.get_mut(&h(host)).unwrap()
    }

    /// Makes `host` a member of violin `id`; `arp` lists managed VMs whose home is unknown.
    fn violin(&mut self, host: &str, id: u32, allowed: &[&str], arp: &[(Ipv4Addr, Mac)]) {
        let vms: Vec<ManagedVm> = arp
            .iter()
            .map(|(ip, mac)| ManagedVm {
                mac: *mac,
                ip: *ip,
                host: None,
            })
            .collect();
        self.violin_with_vms(host, id, allowed, vms);
    }

    fn violin_with_vms(&mut self, host: &str, id: u32, allowed: &[&str], vms: Vec<ManagedVm>) {
        self.set_violin(
            host,
            ViolinConfig {
                id: v(id),
                name: format!("v{id}"),
                allowed: allowed.iter().map(|p| HostPattern::new(p)).collect(),
                vms,
                subnet: None,
                dhcp_mtu: None,
            },
        );
    }

    /// Adds the violin to `host`, or replaces its settings there.
    fn set_violin(&mut self, host: &str, cfg: ViolinConfig) {
        let mut out = Vec::new();
        self.sw(host).add_violin(cfg, &mut out);
        self.push(host, out);
        self.run();
    }

    fn push(&mut self, from: &str, out: Vec<Output>) {
        for o in out {
            self.queue.push_back((h(from), o));
        }
    }

    fn connect(&mut self, a: &str, b: &str) {
        let max = self.max_datagram;
        self.connect_with_max(a, b, max);
    }

    /// Connects `a` and `b` over a path that carries datagrams of at most `max` bytes.
    fn connect_with_max(&mut self, a: &str, b: &str, max: usize) {
        self.links.insert((h(a), h(b)));
        self.links.insert((h(b), h(a)));
        self.link_max.insert((h(a), h(b)), max);
        self.link_max.insert((h(b), h(a)), max);
        for (x, y) in [(a, b), (b, a)] {
            let mut out = Vec::new();
            self.sw(x).peer_up(h(y), max, &mut out);
            self.push(x, out);
        }
        self.run();
    }

    fn disconnect(&mut self, a: &str, b: &str) {
        self.links.remove(&(h(a), h(b)));
        self.links.remove(&(h(b), h(a)));
        for (x, y) in [(a, b), (b, a)] {
            let mut out = Vec::new();
            self.sw(x).peer_down(&h(y), &mut out);
            self.push(x, out);
        }
        self.run();
    }

    /// `host` restarts with a fresh switch in violin 1 and reconnects to `neighbours`.
    fn restart(&mut self, host: &str, neighbours: &[&str]) {
        for n in neighbours {
            self.disconnect(n, host);
        }
        self.hosts
            .insert(h(host), Switch::new(h(host), SwitchConfig::default()));
        self.violin(host, 1, &["*"], &[]);
        for n in neighbours {
            self.connect(n, host);
        }
    }

    /// A broadcast ARP request at `host`'s TAP of `violin`: `sha` at `spa` asks who has `tpa`.
    fn arp_request(&mut self, host: &str, violin: u32, sha: Mac, spa: [u8; 4], tpa: [u8; 4]) {
        let req = Arp {
            op: 1,
            sha,
            spa,
            tha: [0; 6],
            tpa,
        };
        self.tap(host, violin, &wire::build_arp(BROADCAST, sha, &req));
    }

    /// A DHCPDISCOVER from `mac(vm)` at `host`'s TAP of `violin`.
    fn discover(&mut self, host: &str, violin: u32, vm: u8) {
        let frame = dhcp::tests::client_frame(mac(vm), MessageType::Discover, None, None);
        self.tap(host, violin, &frame);
    }

    fn tap(&mut self, host: &str, violin: u32, frame: &[u8]) {
        let now = self.now;
        let mut out = Vec::new();
        self.sw(host)
            .handle_tap_frame(now, v(violin), tap_buffer(frame), &mut out);
        self.push(host, out);
        self.run();
    }

    fn advance(&mut self, d: Duration) {
        self.now += d;
        let now = self.now;
        for sw in self.hosts.values_mut() {
            sw.handle_timeout(now);
        }
    }

    fn run(&mut self) {
        let mut steps = 0;
        while let Some((from, o)) = self.queue.pop_front() {
            steps += 1;
            assert!(steps < 100_000, "forwarding loop");
            let now = self.now;
            let mut out = Vec::new();
            match o {
                Output::Deliver { violin, frame } => {
                    self.delivered
                        .entry(from)
                        .or_default()
                        .push((violin, frame));
                    continue;
                }
                Output::Transmit { via, datagram } => {
                    if self.hold_from.as_ref() == Some(&from) {
                        self.held.push((from, Output::Transmit { via, datagram }));
                        continue;
                    }
                    if !self.links.contains(&(from.clone(), via.clone())) {
                        continue;
                    }
                    let max = self
                        .link_max
                        .get(&(from.clone(), via.clone()))
                        .copied()
                        .unwrap_or(self.max_datagram);
                    assert!(
                        datagram.len() <= max,
                        "datagram too large for {from}->{via}"
                    );
                    *self
                        .datagrams_on_links
                        .entry((from.clone(), via.clone()))
                        .or_default() += 1;
                    let sw = self.hosts.get_mut(&via).unwrap();
                    sw.handle_datagram(now, &from, datagram, &mut out);
                    for o in out {
                        self.queue.push_back((via.clone(), o));
                    }
                }
                Output::Control { via, msg } => {
                    if !self.links.contains(&(from.clone(), via.clone())) {
                        continue;
                    }
                    let sw = self.hosts.get_mut(&via).unwrap();
                    sw.handle_control(now, &from, msg, &mut out);
                    for o in out {
                        self.queue.push_back((via.clone(), o));
                    }
                }
            }
        }
    }

    fn release_held(&mut self) {
        self.hold_from = None;
        let held = std::mem::take(&mut self.held);
        self.queue.extend(held);
        self.run();
    }

    /// Frames delivered to `host`'s TAP of `violin` since the last call.
    fn take(&mut self, host: &str, violin: u32) -> Vec<Bytes> {
        let all = self.delivered.remove(&h(host)).unwrap_or_default();
        let (mine, rest): (Vec<_>, Vec<_>) = all.into_iter().partition(|(vi, _)| *vi == v(violin));
        if !rest.is_empty() {
            self.delivered.insert(h(host), rest);
        }
        mine.into_iter().map(|(_, f)| f).collect()
    }

    fn clear(&mut self) {
        self.delivered.clear();
        self.datagrams_on_links.clear();
    }

    fn drops(&mut self, host: &str, r: DropReason) -> u64 {
        self.sw(host)
            .counters()
            .drops
            .get(r.as_str())
            .copied()
            .unwrap_or(0)
    }

    fn loc(&mut self, host: &str, violin: u32, m: Mac) -> Option<Location> {
        self.sw(host).lookup(v(violin), &m).map(|(l, _)| l)
    }
}

fn full_mesh(names: &[&str], max: usize) -> Sim {
    let mut s = Sim::new(names, max);
    for (i, a) in names.iter().enumerate() {
        for b in &names[i + 1..] {
            s.connect(a, b);
        }
    }
    s
}

/// [`full_mesh`] with every host in violin 1 (open to all).
fn mesh_in_violin_1(names: &[&str], max: usize) -> Sim {
    let mut s = full_mesh(names, max);
    for host in names {
        s.violin(host, 1, &["*"], &[]);
    }
    s
}

/// a1, b1 and c1 in violin 1, and a VM (the returned MAC) that spoke up at a1.
fn vm_at_a1_of_three() -> (Sim, Mac) {
    let mut s = mesh_in_violin_1(&["a/a1", "b/b1", "c/c1"], 1414);
    let vm = mac(5);
    s.tap("a/a1", 1, &test_frame(BROADCAST, vm, IP, 60, 0));
    (s, vm)
}

#[test]
fn learning_unicast_and_flooding_to_members_only() {
    let mut s = full_mesh(&["a/a1", "a/a2", "b/b1", "b/b2"], 1414);
    for host in ["a/a1", "b/b1", "b/b2"] {
        s.violin(host, 1, &["*"], &[]);
    }
    // a2 is not a member of violin 1.
    s.violin("a/a2", 2, &["*"], &[]);
    s.clear();

    // Broadcast from VM 1 on a1 reaches the members b1, b2 and not a2.
    let bc = test_frame(BROADCAST, mac(1), IP, 100, 1);
    s.tap("a/a1", 1, &bc);
    assert_eq!(s.take("b/b1", 1), vec![Bytes::from(bc.clone())]);
    assert_eq!(s.take("b/b2", 1), vec![Bytes::from(bc.clone())]);
    assert!(s.take("a/a2", 1).is_empty());
    assert_eq!(
        s.datagrams_on_links.get(&(h("a/a1"), h("a/a2"))),
        None,
        "a non-member got a datagram"
    );
    assert_eq!(s.loc("b/b1", 1, mac(1)), Some(Location::Remote(h("a/a1"))));
    assert_eq!(s.loc("a/a1", 1, mac(1)), Some(Location::Local));

    // The reply from VM 2 on b1 is unicast: only a1 gets it.
    s.clear();
    let reply = test_frame(mac(1), mac(2), IP, 200, 2);
    s.tap("b/b1", 1, &reply);
    assert_eq!(s.take("a/a1", 1), vec![Bytes::from(reply)]);
    assert!(s.take("b/b2", 1).is_empty());
    assert_eq!(s.datagrams_on_links.values().sum::<usize>(), 1);
}

#[test]
fn violins_with_same_addresses_stay_isolated() {
    let mut s = full_mesh(&["a/a1", "b/b1"], 1414);
    for host in ["a/a1", "b/b1"] {
        s.violin(host, 1, &["*"], &[]);
        s.violin(host, 2, &["*"], &[]);
    }
    s.clear();
    // Same MAC in both violins (same IP range inside), different hosts.
    s.tap("a/a1", 1, &test_frame(BROADCAST, mac(9), IP, 60, 1));
    s.tap("b/b1", 2, &test_frame(BROADCAST, mac(9), IP, 60, 2));
    assert_eq!(s.take("b/b1", 1).len(), 1);
    assert!(s.take("b/b1", 2).is_empty());
    assert_eq!(s.take("a/a1", 2).len(), 1);
    assert!(s.take("a/a1", 1).is_empty());
    assert_eq!(s.loc("a/a1", 1, mac(9)), Some(Location::Local));
    assert_eq!(s.loc("a/a1", 2, mac(9)), Some(Location::Remote(h("b/b1"))));
}

#[test]
fn hosts_not_allowed_in_a_violin_neither_send_nor_receive() {
    let mut s = full_mesh(&["a/a1", "b/b1", "c/c1"], 1414);
    s.violin("a/a1", 1, &["b/*"], &[]);
    s.violin("b/b1", 1, &["a/a1"], &[]);
    // c1 claims membership, but the others do not allow it.
    s.violin("c/c1", 1, &["*"], &[]);
    s.clear();
    s.tap("a/a1", 1, &test_frame(BROADCAST, mac(1), IP, 60, 1));
    assert_eq!(s.take("b/b1", 1).len(), 1);
    assert!(s.take("c/c1", 1).is_empty());
    // c1 floods (it believes a1 and b1 are members); both drop it.
    s.tap("c/c1", 1, &test_frame(BROADCAST, mac(3), IP, 60, 3));
    assert!(s.take("a/a1", 1).is_empty());
    assert!(s.take("b/b1", 1).is_empty());
    // One frame and one announcement each.
    assert_eq!(s.drops("a/a1", DropReason::NotMember), 2);
    assert_eq!(s.drops("b/b1", DropReason::NotMember), 2);
    // Its announcements are refused too: a1 never learns mac 3.
    assert_eq!(s.loc("a/a1", 1, mac(3)), None);
}

#[test]
fn mac_move_converges_and_late_frames_never_pull_it_back() {
    let (mut s, vm) = vm_at_a1_of_three();
    assert_eq!(s.loc("c/c1", 1, vm), Some(Location::Remote(h("a/a1"))));

    // A late frame from the old host is held in flight while the VM moves to b1.
    s.hold_from = Some(h("a/a1"));
    s.tap("a/a1", 1, &test_frame(mac(7), vm, IP, 60, 0)); // unicast to unknown -> flooded
    s.hold_from = None;
    s.advance(Duration::from_millis(500));
    // The migrated guest's RARP on b1.
    let rarp = test_frame(BROADCAST, vm, ETHERTYPE_RARP, 60, 0);
    s.tap("b/b1", 1, &rarp);
    for host in ["a/a1", "c/c1"] {
        assert_eq!(
            s.loc(host, 1, vm),
            Some(Location::Remote(h("b/b1"))),
            "{host}"
        );
    }
    // Traffic from c1 to the VM now goes to b1 only.
    s.clear();
    s.tap("c/c1", 1, &test_frame(vm, mac(8), IP, 60, 0));
    assert_eq!(s.take("b/b1", 1).len(), 1);
    assert!(s.take("a/a1", 1).is_empty());
    // The late datagram from a1 arrives: nobody moves the MAC back.
    s.release_held();
    assert_eq!(s.loc("c/c1", 1, vm), Some(Location::Remote(h("b/b1"))));
    assert!(s.sw("c/c1").counters().stale_source_frames >= 1);
    // A late frame on a1's own TAP (within the hold-down) is dropped, not re-announced.
    s.tap("a/a1", 1, &test_frame(BROADCAST, vm, IP, 60, 0));
    assert_eq!(s.drops("a/a1", DropReason::StaleLocalAfterMove), 1);
    assert_eq!(s.loc("c/c1", 1, vm), Some(Location::Remote(h("b/b1"))));
    assert_eq!(s.sw("c/c1").lookup(v(1), &vm).unwrap().1, 2);
    // After the hold-down a real move back works and gets a higher sequence number.
    s.advance(Duration::from_secs(3));
    s.tap("a/a1", 1, &rarp);
    assert_eq!(s.loc("c/c1", 1, vm), Some(Location::Remote(h("a/a1"))));
    assert_eq!(s.sw("c/c1").lookup(v(1), &vm).unwrap().1, 3);
}

#[test]
fn frames_in_flight_to_the_old_host_are_redirected_once() {
    let (mut s, vm) = vm_at_a1_of_three();
    // c1 sends to the VM, but the datagram is in flight while the VM moves to b1.
    s.hold_from = Some(h("c/c1"));
    s.tap("c/c1", 1, &test_frame(vm, mac(8), IP, 60, 0));
    s.hold_from = None;
    s.tap("b/b1", 1, &test_frame(BROADCAST, vm, ETHERTYPE_RARP, 60, 0));
    s.clear();
    s.release_held();
    assert!(s.take("a/a1", 1).is_empty());
    assert_eq!(s.take("b/b1", 1).len(), 1);
    assert_eq!(s.sw("a/a1").counters().redirected, 1);
}

#[test]
fn a_stale_announcement_after_forgetting_is_corrected_by_a_seq_hint() {
    let (mut s, vm) = vm_at_a1_of_three();
    s.advance(Duration::from_secs(3));
    s.tap("b/b1", 1, &test_frame(BROADCAST, vm, IP, 60, 0));
    s.advance(Duration::from_secs(3));
    s.tap("a/a1", 1, &test_frame(BROADCAST, vm, IP, 60, 0));
    assert_eq!(s.sw("c/c1").lookup(v(1), &vm).unwrap().1, 3);
    // b1 is restarted: it forgot everything, and the VM moves to it again.
    s.restart("b/b1", &["a/a1", "c/c1"]);
    s.advance(Duration::from_secs(3));
    s.tap("b/b1", 1, &test_frame(BROADCAST, vm, IP, 60, 0));
    // It announced seq 1 first; the hint made it re-announce above 3.
    for host in ["a/a1", "c/c1"] {
        let (loc, seq) = s.sw(host).lookup(v(1), &vm).unwrap();
        assert_eq!(loc, Location::Remote(h("b/b1")), "{host}");
        assert!(seq > 3);
    }
}

#[test]
fn expected_move_switches_on_the_first_data_frame() {
    let (mut s, vm) = vm_at_a1_of_three();
    let now = s.now;
    let mut out = Vec::new();
    assert!(s.sw("a/a1").expect_move(now, v(1), vm, h("b/b1"), &mut out));
    s.push("a/a1", out);
    s.run();
    // A data frame from b1 (the announcement is lost here: control from b1 dropped).
    let mut out = Vec::new();
    s.sw("b/b1").handle_tap_frame(
        now,
        v(1),
        tap_buffer(&test_frame(BROADCAST, vm, IP, 60, 0)),
        &mut out,
    );
    let data: Vec<Output> = out
        .into_iter()
        .filter(|o| matches!(o, Output::Transmit { .. }))
        .collect();
    assert_eq!(data.len(), 2);
    s.push("b/b1", data);
    s.run();
    assert_eq!(s.loc("c/c1", 1, vm), Some(Location::Remote(h("b/b1"))));
    assert_eq!(s.loc("a/a1", 1, vm), Some(Location::Remote(h("b/b1"))));
}

#[test]
fn full_frames_cross_small_datagram_paths_by_fragmentation() {
    let mut s = mesh_in_violin_1(&["a/a1", "b/b1"], 600);
    s.clear();
    let big = test_frame(BROADCAST, mac(1), IP, 1514, 7);
    s.tap("a/a1", 1, &big);
    assert_eq!(s.take("b/b1", 1), vec![Bytes::from(big)]);
    assert_eq!(s.datagrams_on_links[&(h("a/a1"), h("b/b1"))], 3);
    assert_eq!(s.sw("a/a1").counters().fragmented, 1);
    // Jumbo frames beyond 8 fragments are refused and counted, not silently lost.
    s.tap("a/a1", 1, &test_frame(BROADCAST, mac(1), IP, 9000, 7));
    assert_eq!(s.drops("a/a1", DropReason::Oversize), 1);
}

#[test]
fn reassembly_is_memory_bounded_and_times_out() {
    let mut s = mesh_in_violin_1(&["a/a1", "b/b1"], 600);
    // Only the first fragment of each of many frames arrives.
    for i in 0..2000u32 {
        let parts = wire::fragment(
            v(1),
            &test_frame(BROADCAST, mac(1), IP, 1514, 0),
            false,
            i,
            600,
        )
        .unwrap();
        let now = s.now;
        let mut out = Vec::new();
        s.sw("b/b1")
            .handle_datagram(now, &h("a/a1"), parts[0].clone(), &mut out);
        assert!(out.is_empty());
    }
    let held = s.sw("b/b1").reassembly_bytes();
    assert!(held > 0 && held <= 4 << 20, "{held}");
    assert!(s.sw("b/b1").counters().reassembly_evicted >= 2000 - 1024);
    s.advance(Duration::from_secs(1));
    assert_eq!(s.sw("b/b1").reassembly_bytes(), 0);
}

#[test]
fn arp_requests_for_known_addresses_are_answered_locally() {
    let ip_b = Ipv4Addr::new(10, 1, 0, 2);
    let mut s = full_mesh(&["a/a1", "b/b1"], 1414);
    s.violin("a/a1", 1, &["*"], &[(ip_b, mac(2))]);
    s.violin("b/b1", 1, &["*"], &[]);
    s.clear();
    s.arp_request("a/a1", 1, mac(1), [10, 1, 0, 1], ip_b.octets());
    let replies = s.take("a/a1", 1);
    assert_eq!(replies.len(), 1);
    let reply = wire::parse_arp(&replies[0]).unwrap();
    assert_eq!((reply.op, reply.sha, reply.tpa), (2, mac(2), [10, 1, 0, 1]));
    assert!(s.take("b/b1", 1).is_empty(), "answered request was flooded");
    // An address nobody knows is flooded as usual.
    s.arp_request("a/a1", 1, mac(1), [10, 1, 0, 1], [10, 1, 0, 99]);
    assert_eq!(s.take("b/b1", 1).len(), 1);
    // b1 learned 10.1.0.1 from a1's announcement (sender of the ARP) and answers for it.
    s.arp_request("b/b1", 1, mac(2), ip_b.octets(), [10, 1, 0, 1]);
    assert_eq!(s.take("b/b1", 1).len(), 1);
    assert_eq!(s.sw("b/b1").counters().arp_answered, 1);
}

/// a1 — r1 — c1 in violin 1 (a1 and c1 not connected), links of 1414 bytes except r1–c1's
/// `behind_relay_max`; nothing delivered yet.
fn relay_line(behind_relay_max: usize) -> Sim {
    let mut s = Sim::new(&["a/a1", "r/r1", "c/c1"], 1414);
    for host in ["a/a1", "r/r1", "c/c1"] {
        s.violin(host, 1, &["*"], &[]);
    }
    s.connect("a/a1", "r/r1");
    s.connect_with_max("r/r1", "c/c1", behind_relay_max);
    s.clear();
    s
}

#[test]
fn relay_carries_frames_and_control_between_unconnected_hosts() {
    let mut s = relay_line(1414);
    let vm_a = mac(1);
    s.tap("a/a1", 1, &test_frame(BROADCAST, vm_a, IP, 1514, 1));
    assert_eq!(s.take("c/c1", 1).len(), 1, "broadcast did not reach c1");
    assert_eq!(s.take("r/r1", 1).len(), 1);
    assert_eq!(s.loc("c/c1", 1, vm_a), Some(Location::Remote(h("a/a1"))));
    s.clear();
    s.tap("c/c1", 1, &test_frame(vm_a, mac(3), IP, 1000, 3));
    assert_eq!(s.take("a/a1", 1).len(), 1);
    assert!(
        s.take("r/r1", 1).is_empty(),
        "relay delivered a unicast frame locally"
    );
    assert!(s.sw("r/r1").counters().relayed >= 2);
    // The relay does not carry a violin it is not allowed in for others: control of an
    // unrelated violin still flows, frames are relayed opaquely.
    let now = s.now;
    let st = s.sw("a/a1").status(now);
    let c = st.peers.iter().find(|p| p.host == "c/c1").unwrap();
    assert!(!c.connected);
    assert_eq!(c.via.as_deref(), Some("r/r1"));
}

#[test]
fn relayed_frames_fit_a_narrower_link_behind_the_relay() {
    // a1's own link is wide, the relay's link on to c1 carries only QUIC's minimum: a1 cannot
    // see that, so what it sends through a relay must fit any QUIC path.
    let mut s = relay_line(SwitchConfig::default().default_max_datagram);
    let (vm_a, vm_c) = (mac(1), mac(2));
    s.tap("c/c1", 1, &test_frame(BROADCAST, vm_c, IP, 60, 0));
    s.clear();
    for len in [60, 1000, 1200, 1514] {
        s.tap("a/a1", 1, &test_frame(vm_c, vm_a, IP, len, 1));
        let got = s.take("c/c1", 1);
        assert_eq!(
            got.len(),
            1,
            "a {len}-byte frame did not reach c1 through r1"
        );
        assert_eq!(got[0].len(), len);
    }
    assert_eq!(s.sw("r/r1").counters().drops.values().sum::<u64>(), 0);
}

#[test]
fn restarted_host_rejoins_and_relearns() {
    let mut s = mesh_in_violin_1(&["a/a1", "b/b1"], 1414);
    s.tap("a/a1", 1, &test_frame(BROADCAST, mac(1), IP, 60, 0));
    s.restart("b/b1", &["a/a1"]);
    // The full sync on (re)join told b1 where mac 1 is without any new frame.
    assert_eq!(s.loc("b/b1", 1, mac(1)), Some(Location::Remote(h("a/a1"))));
    s.clear();
    s.tap("b/b1", 1, &test_frame(mac(1), mac(2), IP, 60, 0));
    assert_eq!(s.take("a/a1", 1).len(), 1);
}

#[test]
fn malformed_datagrams_and_control_are_counted_and_dropped() {
    let mut s = full_mesh(&["a/a1", "b/b1"], 1414);
    s.violin("b/b1", 1, &["*"], &[]);
    let now = s.now;
    let mut out = Vec::new();
    let sw = s.sw("b/b1");
    for d in [&b""[..], &[0x10, 0, 0, 1, 1], &[0x2F, 1, 2], &[0x11; 12]] {
        sw.handle_datagram(now, &h("a/a1"), Bytes::copy_from_slice(d), &mut out);
    }
    sw.handle_control(
        now,
        &h("a/a1"),
        ControlMsg::SeqHint {
            violin: v(1),
            mac: "zz".into(),
            seq: 1,
        },
        &mut out,
    );
    assert!(out.is_empty());
    let drops: u64 = sw.counters().drops.values().sum();
    assert_eq!(drops, 5);
}

#[test]
fn restarted_host_behind_a_relay_rejoins() {
    let mut s = relay_line(1414);
    s.tap("a/a1", 1, &test_frame(BROADCAST, mac(1), IP, 60, 1));
    // c1 restarts: new switch, reconnects to the relay only.
    s.restart("c/c1", &["r/r1"]);
    // Both ends re-introduced themselves through the relay: a1's MAC is known at once, and
    // frames flow both ways.
    assert_eq!(s.loc("c/c1", 1, mac(1)), Some(Location::Remote(h("a/a1"))));
    s.clear();
    s.tap("c/c1", 1, &test_frame(mac(1), mac(3), IP, 60, 3));
    assert_eq!(s.take("a/a1", 1).len(), 1);
    s.tap("a/a1", 1, &test_frame(mac(3), mac(1), IP, 60, 1));
    assert_eq!(s.take("c/c1", 1).len(), 1);
}

const VICTIM_IP: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 5);

/// a1, b1, c1 in violin 1; the managed victim mac 5 (10.1.0.5) lives on a1 (`home`: what the
/// control plane says, None for first claim) and has spoken once.
fn managed_victim(home: Option<&str>) -> Sim {
    let mut s = full_mesh(&["a/a1", "b/b1", "c/c1"], 1414);
    for host in ["a/a1", "b/b1", "c/c1"] {
        let vm = ManagedVm {
            mac: mac(5),
            ip: VICTIM_IP,
            host: home.map(h),
        };
        s.violin_with_vms(host, 1, &["*"], vec![vm]);
    }
    s.tap("a/a1", 1, &test_frame(BROADCAST, mac(5), IP, 60, 5));
    s.clear();
    s
}

#[test]
fn a_guest_cannot_steal_a_managed_mac() {
    for home in [Some("a/a1"), None] {
        let mut s = managed_victim(home);
        // The spoofer on b1 sends as the victim, broadcast and unicast.
        s.tap("b/b1", 1, &test_frame(BROADCAST, mac(5), IP, 60, 7));
        s.tap("b/b1", 1, &test_frame(mac(8), mac(5), IP, 60, 7));
        assert_eq!(s.drops("b/b1", DropReason::SpoofedSource), 2, "{home:?}");
        assert_eq!(s.datagrams_on_links.values().sum::<usize>(), 0, "{home:?}");
        for host in ["b/b1", "c/c1"] {
            assert_eq!(s.loc(host, 1, mac(5)), Some(Location::Remote(h("a/a1"))));
        }
        // The victim keeps its traffic.
        s.tap("c/c1", 1, &test_frame(mac(5), mac(8), IP, 60, 8));
        assert_eq!(s.take("a/a1", 1).len(), 1, "{home:?}");
        assert!(s.take("b/b1", 1).is_empty(), "{home:?}");
    }
}

#[test]
fn a_managed_mac_from_the_wrong_host_is_refused_by_every_receiver() {
    let mut s = managed_victim(Some("a/a1"));
    // As if b1's overlay forwarded the theft anyway (an older daemon): c1 and a1 refuse the
    // frame and the announcement.
    let now = s.now;
    let frame = wire::encode_frame(v(1), &test_frame(BROADCAST, mac(5), IP, 60, 7), false);
    let announce = ControlMsg::Announce {
        violin: v(1),
        mac: wire::mac_to_string(&mac(5)),
        seq: 100,
        ip: None,
    };
    for host in ["a/a1", "c/c1"] {
        let mut out = Vec::new();
        let sw = s.sw(host);
        sw.handle_datagram(now, &h("b/b1"), frame.clone(), &mut out);
        sw.handle_control(now, &h("b/b1"), announce.clone(), &mut out);
        assert!(out.is_empty(), "{host}: {out:?}");
        assert_eq!(s.drops(host, DropReason::SpoofedSource), 2, "{host}");
    }
    assert_eq!(s.loc("c/c1", 1, mac(5)), Some(Location::Remote(h("a/a1"))));
    assert_eq!(s.loc("a/a1", 1, mac(5)), Some(Location::Local));
    // The home outlives ageing: after the victim's entry aged out, theft still fails.
    s.advance(Duration::from_secs(301));
    s.tap("b/b1", 1, &test_frame(BROADCAST, mac(5), IP, 60, 7));
    assert_eq!(s.drops("b/b1", DropReason::SpoofedSource), 1);
    s.tap("c/c1", 1, &test_frame(mac(5), mac(8), IP, 60, 8));
    assert_eq!(s.take("a/a1", 1).len(), 1, "not sent to the victim's home");
    assert!(s.take("b/b1", 1).is_empty());
}

#[test]
fn a_managed_mac_moves_when_the_control_plane_says_so() {
    let mut s = managed_victim(Some("a/a1"));
    let now = s.now;
    let mut out = Vec::new();
    assert!(
        s.sw("a/a1")
            .expect_move(now, v(1), mac(5), h("b/b1"), &mut out)
    );
    s.push("a/a1", out);
    s.run();
    // The migrated VM's RARP on b1 moves it everywhere.
    s.tap(
        "b/b1",
        1,
        &test_frame(BROADCAST, mac(5), ETHERTYPE_RARP, 60, 0),
    );
    assert_eq!(s.drops("b/b1", DropReason::SpoofedSource), 0);
    for host in ["a/a1", "c/c1"] {
        assert_eq!(s.loc(host, 1, mac(5)), Some(Location::Remote(h("b/b1"))));
    }
    s.clear();
    s.tap("c/c1", 1, &test_frame(mac(5), mac(8), IP, 60, 8));
    assert_eq!(s.take("b/b1", 1).len(), 1);
    // A late frame on a1's TAP is held down, not theft; afterwards a1 cannot take it back.
    s.tap("a/a1", 1, &test_frame(BROADCAST, mac(5), IP, 60, 5));
    assert_eq!(s.drops("a/a1", DropReason::StaleLocalAfterMove), 1);
    s.advance(Duration::from_secs(3));
    s.tap("a/a1", 1, &test_frame(BROADCAST, mac(5), IP, 60, 5));
    assert_eq!(s.drops("a/a1", DropReason::SpoofedSource), 1);
    assert_eq!(s.loc("c/c1", 1, mac(5)), Some(Location::Remote(h("b/b1"))));
}

#[test]
fn arp_for_a_managed_address_cannot_be_poisoned() {
    let mut s = managed_victim(Some("a/a1"));
    let garp = Arp {
        op: 2,
        sha: mac(7),
        spa: VICTIM_IP.octets(),
        tha: BROADCAST,
        tpa: VICTIM_IP.octets(),
    };
    // The spoofer's gratuitous ARP at its own MAC, and one naming the victim's MAC as sender.
    s.tap("b/b1", 1, &wire::build_arp(BROADCAST, mac(7), &garp));
    let forged_sender = Arp {
        sha: mac(5),
        spa: [10, 1, 0, 7],
        ..garp
    };
    s.tap(
        "b/b1",
        1,
        &wire::build_arp(BROADCAST, mac(7), &forged_sender),
    );
    assert_eq!(s.drops("b/b1", DropReason::ArpSpoof), 2);
    assert_eq!(s.datagrams_on_links.values().sum::<usize>(), 0, "forwarded");
    // Also refused when it arrives from another host.
    let now = s.now;
    let mut out = Vec::new();
    let datagram = wire::encode_frame(v(1), &wire::build_arp(BROADCAST, mac(7), &garp), false);
    s.sw("c/c1")
        .handle_datagram(now, &h("b/b1"), datagram, &mut out);
    assert!(out.is_empty());
    assert_eq!(s.drops("c/c1", DropReason::ArpSpoof), 1);
    // Everyone still answers with the victim's MAC.
    for host in ["b/b1", "c/c1"] {
        s.arp_request(host, 1, mac(8), [10, 1, 0, 8], VICTIM_IP.octets());
        let replies = s.take(host, 1);
        assert_eq!(replies.len(), 1, "{host}");
        assert_eq!(wire::parse_arp(&replies[0]).unwrap().sha, mac(5), "{host}");
    }
    // The victim's own ARP passes.
    let own = Arp {
        sha: mac(5),
        ..garp
    };
    s.tap("a/a1", 1, &wire::build_arp(BROADCAST, mac(5), &own));
    assert_eq!(s.drops("a/a1", DropReason::ArpSpoof), 0);
}

#[test]
fn neighbour_discovery_for_a_managed_vm_cannot_be_poisoned() {
    let mut s = managed_victim(Some("a/a1"));
    let victim_ll = wire::eui64_link_local(&mac(5));
    let global: std::net::Ipv6Addr = "fd00::5".parse().unwrap();
    let advert = |target, lladdr| wire::Nd {
        advert: true,
        src_ip: target,
        target,
        lladdr: Some(lladdr),
    };
    // The spoofer advertises the victim's link-local address at its own MAC, and its own
    // address naming the victim's MAC: both dropped on its host, nothing forwarded.
    s.tap(
        "b/b1",
        1,
        &wire::build_nd(BROADCAST, mac(7), &advert(victim_ll, mac(7))),
    );
    let own_ll = wire::eui64_link_local(&mac(7));
    s.tap(
        "b/b1",
        1,
        &wire::build_nd(BROADCAST, mac(7), &advert(own_ll, mac(5))),
    );
    assert_eq!(s.drops("b/b1", DropReason::NdSpoof), 2);
    assert_eq!(s.datagrams_on_links.values().sum::<usize>(), 0, "forwarded");
    // The victim's duplicate address detection claims its global address first; from then on
    // the spoofer cannot advertise it, on its own host or from another.
    let dad = wire::Nd {
        advert: false,
        src_ip: std::net::Ipv6Addr::UNSPECIFIED,
        target: global,
        lladdr: None,
    };
    s.tap("a/a1", 1, &wire::build_nd(BROADCAST, mac(5), &dad));
    s.tap(
        "a/a1",
        1,
        &wire::build_nd(BROADCAST, mac(5), &advert(victim_ll, mac(5))),
    );
    assert_eq!(
        s.drops("a/a1", DropReason::NdSpoof),
        0,
        "the victim's own ND"
    );
    s.run();
    s.clear();
    s.tap(
        "b/b1",
        1,
        &wire::build_nd(BROADCAST, mac(7), &advert(global, mac(7))),
    );
    assert_eq!(s.drops("b/b1", DropReason::NdSpoof), 3);
    let now = s.now;
    let mut out = Vec::new();
    let forged = wire::encode_frame(
        v(1),
        &wire::build_nd(BROADCAST, mac(7), &advert(global, mac(7))),
        false,
    );
    s.sw("c/c1")
        .handle_datagram(now, &h("b/b1"), forged, &mut out);
    assert!(out.is_empty());
    assert_eq!(s.drops("c/c1", DropReason::NdSpoof), 1);
    // An unmanaged guest's own neighbour discovery passes.
    s.tap(
        "b/b1",
        1,
        &wire::build_nd(BROADCAST, mac(7), &advert(own_ll, mac(7))),
    );
    assert_eq!(s.drops("b/b1", DropReason::NdSpoof), 3);
}

#[test]
fn a_flood_of_source_macs_is_bounded_and_spares_managed_vms() {
    let mut s = managed_victim(Some("a/a1"));
    let limits = SwitchConfig::default().learning;
    // b1's guest sends 5,000 frames from random MACs, 100 µs apart, then 5,000 more slowly
    // enough for the learning rate (so the port limit is what stops them).
    let mut seed = 0x9E37_79B9_7F4A_7C15u64;
    let mut random_mac = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let b = seed.to_be_bytes();
        [b[0] & 0xFE | 0x02, b[1], b[2], b[3], b[4], b[5]]
    };
    for i in 0..10_000 {
        s.advance(Duration::from_micros(if i < 5000 { 100 } else { 20_000 }));
        let src = random_mac();
        s.tap("b/b1", 1, &test_frame(BROADCAST, src, IP, 60, 0));
        if i % 1000 == 0 {
            // The victim keeps talking through the flood.
            s.tap("c/c1", 1, &test_frame(mac(5), mac(8), IP, 60, 8));
            let to = |frames: Vec<Bytes>, m: Mac| frames.iter().filter(|f| f[..6] == m).count();
            assert_eq!(to(s.take("a/a1", 1), mac(5)), 1, "frame {i}");
            s.tap("a/a1", 1, &test_frame(mac(8), mac(5), IP, 60, 5));
            assert_eq!(to(s.take("c/c1", 1), mac(8)), 1, "frame {i}");
        }
    }
    let managed_and_c1 = 2;
    for host in ["b/b1", "c/c1"] {
        let (len, _) = s.sw(host).mac_table_size(v(1));
        assert!(len <= limits.per_port + managed_and_c1, "{host}: {len}");
    }
    assert!(s.drops("b/b1", DropReason::LearnRateLimit) > 0);
    assert!(s.drops("b/b1", DropReason::MacLimit) > 0);
    let dropped =
        s.drops("b/b1", DropReason::LearnRateLimit) + s.drops("b/b1", DropReason::MacLimit);
    assert_eq!(dropped as usize, 10_000 - limits.per_port);
    assert_eq!(s.loc("c/c1", 1, mac(5)), Some(Location::Remote(h("a/a1"))));
    // After ageing the tables shrink, memory included.
    let (_, cap_before) = s.sw("c/c1").mac_table_size(v(1));
    s.advance(Duration::from_secs(301));
    for host in ["b/b1", "c/c1"] {
        let (len, cap) = s.sw(host).mac_table_size(v(1));
        assert_eq!(len, 0, "{host}");
        assert!(
            cap < cap_before / 4,
            "{host}: capacity {cap} of {cap_before}"
        );
    }
    // And b1 learns again.
    s.tap("b/b1", 1, &test_frame(BROADCAST, mac(9), IP, 60, 0));
    assert_eq!(s.loc("c/c1", 1, mac(9)), Some(Location::Remote(h("b/b1"))));
}

#[test]
fn tcp_syns_from_guests_get_an_mss_that_fits_the_path() {
    let mut s = full_mesh(&["a/a1", "b/b1"], 1414);
    for host in ["a/a1", "b/b1"] {
        s.violin(host, 1, &["*"], &[]);
    }
    s.tap("b/b1", 1, &test_frame(BROADCAST, mac(2), IP, 60, 0));
    // A SYN from a guest at MTU 1500 (MSS 1460), IPv4 without options, MSS first.
    let mut syn = test_frame(mac(2), mac(1), IP, 14 + 20 + 24, 0);
    syn[14] = 0x45;
    syn[23] = 6; // TCP
    syn[14 + 20 + 12] = 6 << 4; // data offset: 24 bytes
    syn[14 + 20 + 13] = 0x02; // SYN
    syn[14 + 20 + 20..].copy_from_slice(&[2, 4, 0x05, 0xB4]);
    s.clear();
    s.tap("a/a1", 1, &syn);
    let got = s.take("b/b1", 1);
    let mss = u16::from_be_bytes([got[0][14 + 20 + 22], got[0][14 + 20 + 23]]);
    // 1414-byte datagrams: FRAME header 4, Ethernet 14, IPv4 20, TCP 20.
    assert_eq!(mss, 1414 - 4 - 14 - 20 - 20);
    assert_eq!(s.sw("a/a1").counters().mss_clamped, 1);
    // A full segment at that MSS crosses in one datagram.
    s.clear();
    s.tap(
        "a/a1",
        1,
        &test_frame(mac(2), mac(1), IP, 14 + 20 + 20 + 1356, 0),
    );
    assert_eq!(s.datagrams_on_links.values().sum::<usize>(), 1);
    assert_eq!(s.sw("a/a1").counters().fragmented, 0);
}

/// a1 and b1 in violin 7 (subnet 10.7.0.0/24) with managed VMs `mac(10)` at 10.7.0.10 and
/// `mac(11)` at 10.7.0.11, both on a1.
fn dhcp_violin(vms: &[(u8, [u8; 4])]) -> ViolinConfig {
    ViolinConfig {
        id: v(7),
        name: "lab".into(),
        allowed: vec![HostPattern::new("*")],
        vms: vms
            .iter()
            .map(|(n, ip)| ManagedVm {
                mac: mac(*n),
                ip: Ipv4Addr::from(*ip),
                host: Some(h("a/a1")),
            })
            .collect(),
        subnet: Some(Subnet::parse("10.7.0.0/24").unwrap()),
        dhcp_mtu: None,
    }
}

fn dhcp_pair() -> Sim {
    let mut s = full_mesh(&["a/a1", "b/b1"], 1414);
    let cfg = dhcp_violin(&[(10, [10, 7, 0, 10]), (11, [10, 7, 0, 11])]);
    s.set_violin("a/a1", cfg.clone());
    s.set_violin("b/b1", cfg);
    s.clear();
    s
}

/// The one DHCP reply delivered to a1's TAP of violin 7: (Ethernet dst, IPv4 dst, message).
fn dhcp_reply(s: &mut Sim) -> (Mac, Ipv4Addr, dhcp::Message) {
    let frames = s.take("a/a1", 7);
    assert_eq!(frames.len(), 1, "one reply: {frames:?}");
    dhcp::tests::server_reply(&frames[0])
}

#[test]
fn a_managed_vm_gets_its_address_by_dhcp_from_its_own_host() {
    let mut s = dhcp_pair();
    let server = Ipv4Addr::new(10, 7, 0, 1);
    let ip = Ipv4Addr::new(10, 7, 0, 10);
    s.discover("a/a1", 7, 10);
    let (dst, to, offer) = dhcp_reply(&mut s);
    assert_eq!((dst, to), (mac(10), ip), "unicast to chaddr and yiaddr");
    assert_eq!(offer.op, 2);
    assert_eq!(offer.xid, 0x1234_5678);
    assert_eq!(offer.yiaddr, ip);
    assert_eq!(offer.options.msg_type, Some(MessageType::Offer));
    assert_eq!(offer.options.server_id, Some(server));
    assert_eq!(
        offer.options.subnet_mask,
        Some(Ipv4Addr::new(255, 255, 255, 0))
    );
    assert_eq!(offer.options.lease_time, Some(3600));
    assert_eq!(offer.options.renewal_time, Some(1800));
    assert_eq!(offer.options.rebinding_time, Some(3150));
    assert!(s.take("b/b1", 7).is_empty(), "the DISCOVER stays on a1");
    s.tap(
        "a/a1",
        7,
        &dhcp::tests::client_frame(mac(10), MessageType::Request, Some(ip), Some(server)),
    );
    let (_, _, ack) = dhcp_reply(&mut s);
    assert_eq!(ack.options.msg_type, Some(MessageType::Ack));
    assert_eq!(ack.yiaddr, ip);
    assert!(s.take("b/b1", 7).is_empty(), "the REQUEST stays on a1");
    let c = s.sw("a/a1").counters().clone();
    assert_eq!((c.dhcp_offers, c.dhcp_acks, c.dhcp_naks), (1, 1, 0));

    // The server's address resolves (renewals are unicast to it), from a1's TAP only.
    s.arp_request("a/a1", 7, mac(10), ip.octets(), server.octets());
    let answers = s.take("a/a1", 7);
    assert_eq!(answers.len(), 1);
    let reply = wire::parse_arp(&answers[0]).unwrap();
    assert_eq!((reply.op, reply.spa), (2, server.octets()));
    assert_eq!(reply.sha, crate::switch::dhcp_server_mac(v(7)));
    // A renewal unicast to the server is answered unicast to the client's address.
    let mut renew = dhcp::tests::client_frame(mac(10), MessageType::Request, None, None);
    let mut msg = dhcp::parse_client_frame(&renew).unwrap().msg;
    msg.ciaddr = ip;
    renew = dhcp::build_server_frame(reply.sha, mac(10), ip, server, &msg);
    renew[34..38].copy_from_slice(&[0, 68, 0, 67]);
    s.tap("a/a1", 7, &renew);
    let (dst, to, ack) = dhcp_reply(&mut s);
    assert_eq!((dst, to), (mac(10), ip));
    assert_eq!(
        (ack.options.msg_type, ack.ciaddr),
        (Some(MessageType::Ack), ip)
    );
}

#[test]
fn a_violin_with_its_own_mtu_tells_its_vms_that_one() {
    let mut s = full_mesh(&["a/a1", "b/b1"], 1414);
    let cfg = ViolinConfig {
        dhcp_mtu: Some(1400),
        ..dhcp_violin(&[(10, [10, 7, 0, 10])])
    };
    s.set_violin("a/a1", cfg);
    s.clear();
    s.discover("a/a1", 7, 10);
    let (_, _, offer) = dhcp_reply(&mut s);
    assert_eq!(offer.options.mtu, Some(1400));
}

#[test]
fn a_request_for_another_address_gets_a_nak() {
    let mut s = dhcp_pair();
    s.tap(
        "a/a1",
        7,
        &dhcp::tests::client_frame(
            mac(10),
            MessageType::Request,
            Some(Ipv4Addr::new(10, 7, 0, 99)),
            None,
        ),
    );
    let (dst, to, nak) = dhcp_reply(&mut s);
    assert_eq!(
        (dst, to),
        (BROADCAST, Ipv4Addr::BROADCAST),
        "a NAK is broadcast"
    );
    assert_eq!(nak.options.msg_type, Some(MessageType::Nak));
    assert_eq!(nak.yiaddr, Ipv4Addr::UNSPECIFIED);
    assert_eq!(nak.options.lease_time, None);
    assert_eq!(s.sw("a/a1").counters().dhcp_naks, 1);
    assert!(s.take("b/b1", 7).is_empty());
}

#[test]
fn unknown_clients_get_no_lease_and_their_dhcp_is_flooded() {
    let mut s = dhcp_pair();
    let stranger = mac(99);
    let discover = dhcp::tests::client_frame(stranger, MessageType::Discover, None, None);
    s.tap("a/a1", 7, &discover);
    assert!(s.take("a/a1", 7).is_empty(), "no answer from the overlay");
    assert_eq!(s.take("b/b1", 7), vec![Bytes::from(discover)], "flooded");
    // A guest naming a managed VM's MAC as chaddr from its own MAC gets nothing either.
    let mut forged = dhcp::tests::client_frame(mac(10), MessageType::Discover, None, None);
    forged[6..12].copy_from_slice(&stranger);
    s.tap("a/a1", 7, &forged);
    assert!(s.take("a/a1", 7).is_empty());
    assert_eq!(s.take("b/b1", 7).len(), 1);
    let c = s.sw("a/a1").counters().clone();
    assert_eq!(c.dhcp_unknown_client, 2);
    assert_eq!((c.dhcp_offers, c.dhcp_acks, c.dhcp_naks), (0, 0, 0));
    assert!(c.drops.is_empty(), "not drops: {:?}", c.drops);
}

#[test]
fn a_violin_without_a_subnet_leaves_dhcp_alone() {
    let mut s = mesh_in_violin_1(&["a/a1", "b/b1"], 1414);
    s.clear();
    s.discover("a/a1", 1, 10);
    assert!(s.take("a/a1", 1).is_empty());
    assert_eq!(s.take("b/b1", 1).len(), 1);
    assert_eq!(s.sw("a/a1").counters().dhcp_unknown_client, 0);
}

#[test]
fn a_changed_violin_spec_takes_effect_in_place() {
    let mut s = dhcp_pair();
    // mac(10) speaks up at a1: learned, sequence 1, home a1.
    s.tap("a/a1", 7, &test_frame(BROADCAST, mac(10), IP, 60, 0));
    s.tap("a/a1", 7, &test_frame(BROADCAST, mac(11), IP, 60, 0));
    assert_eq!(s.loc("b/b1", 7, mac(10)), Some(Location::Remote(h("a/a1"))));
    s.clear();
    // mac(10) removed, mac(12) added, the violin renamed.
    let mut cfg = dhcp_violin(&[(11, [10, 7, 0, 11]), (12, [10, 7, 0, 12])]);
    cfg.name = "renamed".into();
    s.set_violin("a/a1", cfg.clone());
    s.set_violin("b/b1", cfg);
    assert!(s.take("b/b1", 7).is_empty());
    let now = s.now;
    let status = s.sw("a/a1").status(now);
    assert_eq!(status.violins[0].name, "renamed");
    assert_eq!(status.violins[0].subnet.as_deref(), Some("10.7.0.0/24"));
    // The removed VM gets no lease; its DISCOVER goes out like anyone's.
    s.discover("a/a1", 7, 10);
    assert!(s.take("a/a1", 7).is_empty());
    assert_eq!(s.take("b/b1", 7).len(), 1);
    // ... nor is ARP for its old address answered from the table.
    s.arp_request("b/b1", 7, mac(1), [10, 7, 0, 50], [10, 7, 0, 10]);
    assert!(
        s.take("b/b1", 7).is_empty(),
        "b1 no longer answers for 10.7.0.10"
    );
    s.clear();
    // The VM kept keeps its lease, its MAC entry and sequence number; the new one gets one.
    assert_eq!(
        s.sw("a/a1").lookup(v(7), &mac(11)),
        Some((Location::Local, 1))
    );
    s.discover("a/a1", 7, 11);
    assert_eq!(dhcp_reply(&mut s).2.yiaddr, Ipv4Addr::new(10, 7, 0, 11));
    s.discover("a/a1", 7, 12);
    assert_eq!(dhcp_reply(&mut s).2.yiaddr, Ipv4Addr::new(10, 7, 0, 12));
    // The new VM's home is a1: b1 refuses it from elsewhere.
    s.tap("b/b1", 7, &test_frame(BROADCAST, mac(12), IP, 60, 0));
    assert_eq!(s.drops("b/b1", DropReason::SpoofedSource), 1);
    // Removed from the subnet: no DHCP at all.
    let mut cfg = dhcp_violin(&[(11, [10, 7, 0, 11])]);
    cfg.subnet = None;
    s.set_violin("a/a1", cfg);
    s.clear();
    s.discover("a/a1", 7, 11);
    assert!(s.take("a/a1", 7).is_empty());
    assert_eq!(s.take("b/b1", 7).len(), 1);
}
