//! The peer book: which hosts are known at which addresses (learnt from connections and
//! gossip), and which addresses to dial when. No I/O and no clock (quinn-proto's shape): the
//! driver passes `now` and events in, asks [`PeerBook::poll_dial`] what to dial, and sleeps
//! until [`PeerBook::poll_timeout`].
//!
//! Every address is dialed by at most one attempt at a time, never our own advertised one, and
//! again after its connection ends or its attempt fails; failures back off from
//! [`FIRST_BACKOFF`] to [`MAX_BACKOFF`]. An address that turned out to be this host is never
//! dialed again.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::HostId;
use crate::control::PeerAddr;

/// The wait after the first failed attempt (doubling per failure).
pub(super) const FIRST_BACKOFF: Duration = Duration::from_millis(250);

/// The longest wait between attempts.
pub(super) const MAX_BACKOFF: Duration = Duration::from_secs(4);

/// Known peers and the dial schedule of their addresses.
#[derive(Debug)]
pub(super) struct PeerBook {
    me: HostId,
    advertise: SocketAddr,
    /// Addresses per host: what it advertised, else where its connection came from.
    hosts: BTreeMap<HostId, Vec<SocketAddr>>,
    dials: BTreeMap<SocketAddr, Dial>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Dial {
    state: DialState,
    /// The wait after the next failure.
    backoff: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DialState {
    /// Dial at `due` (unless already connected to the address then).
    Waiting { due: Instant },
    /// An attempt, or the connection it made, is in progress.
    Busy,
    /// The address is this host's own.
    Abandoned,
}

impl PeerBook {
    /// An empty book of host `me`, which advertises itself at `advertise`.
    pub(super) fn new(me: HostId, advertise: SocketAddr) -> Self {
        Self {
            me,
            advertise,
            hosts: BTreeMap::new(),
            dials: BTreeMap::new(),
        }
    }

    /// Schedules `addr` to be dialed at `now`; false if it is known already or our own.
    pub(super) fn add_address(&mut self, addr: SocketAddr, now: Instant) -> bool {
        if addr == self.advertise || self.dials.contains_key(&addr) {
            return false;
        }
        self.dials.insert(
            addr,
            Dial {
                state: DialState::Waiting { due: now },
                backoff: FIRST_BACKOFF,
            },
        );
        true
    }

    /// Records a connection to `host`, coming from `remote`, and returns what to tell it about
    /// the other peers (and ourselves).
    pub(super) fn link_up(&mut self, host: &HostId, remote: SocketAddr) -> Vec<PeerAddr> {
        self.hosts.insert(host.clone(), vec![remote]);
        let mut gossip: Vec<PeerAddr> = self
            .hosts
            .iter()
            .filter(|(h, _)| *h != host)
            .map(|(h, addrs)| PeerAddr {
                host: h.to_string(),
                addrs: addrs.clone(),
            })
            .collect();
        gossip.push(PeerAddr {
            host: self.me.to_string(),
            addrs: vec![self.advertise],
        });
        gossip
    }

    /// Takes in the peers `from` told us about; returns the addresses new to the book (to be
    /// dialed from `now`).
    pub(super) fn learn(
        &mut self,
        from: &HostId,
        known: &[PeerAddr],
        now: Instant,
    ) -> Vec<SocketAddr> {
        let mut new = Vec::new();
        for p in known {
            let host: HostId = p.host.as_str().into();
            if host == self.me {
                continue;
            }
            new.extend(p.addrs.iter().filter(|a| self.add_address(**a, now)));
            if host == *from {
                // What the peer advertises beats the (possibly NAT'd) address we saw.
                self.hosts.insert(host, p.addrs.clone());
            } else {
                self.hosts.entry(host).or_insert_with(|| p.addrs.clone());
            }
        }
        new
    }

    /// The addresses to dial now; the caller reports each attempt's end. Due addresses that
    /// `connected` says we are connected to already (in either direction) wait once more.
    pub(super) fn poll_dial(
        &mut self,
        now: Instant,
        connected: impl Fn(SocketAddr) -> bool,
    ) -> Vec<SocketAddr> {
        let mut dial = Vec::new();
        for (addr, d) in &mut self.dials {
            let DialState::Waiting { due } = d.state else {
                continue;
            };
            if due > now {
                continue;
            }
            if connected(*addr) {
                d.wait(now);
            } else {
                d.state = DialState::Busy;
                dial.push(*addr);
            }
        }
        dial
    }

    /// When [`poll_dial`](Self::poll_dial) has something to do next, if ever.
    pub(super) fn poll_timeout(&self) -> Option<Instant> {
        self.dials
            .values()
            .filter_map(|d| match d.state {
                DialState::Waiting { due } => Some(due),
                DialState::Busy | DialState::Abandoned => None,
            })
            .min()
    }

    /// The attempt to `addr` failed at `now`.
    pub(super) fn dial_failed(&mut self, addr: SocketAddr, now: Instant) {
        if let Some(d) = self.dials.get_mut(&addr) {
            d.wait(now);
        }
    }

    /// The attempt to `addr` connected.
    pub(super) fn dial_succeeded(&mut self, addr: SocketAddr) {
        if let Some(d) = self.dials.get_mut(&addr) {
            d.backoff = FIRST_BACKOFF;
        }
    }

    /// `addr` turned out to be this host.
    pub(super) fn dialed_self(&mut self, addr: SocketAddr) {
        if let Some(d) = self.dials.get_mut(&addr) {
            d.state = DialState::Abandoned;
        }
    }

    /// The connection made by dialing `addr` ended at `now`: dial again at once.
    pub(super) fn dialed_link_ended(&mut self, addr: SocketAddr, now: Instant) {
        if let Some(d) = self.dials.get_mut(&addr) {
            d.state = DialState::Waiting { due: now };
        }
    }
}

impl Dial {
    /// Waits the current backoff from `now`, and doubles it for the next time.
    fn wait(&mut self, now: Instant) {
        self.state = DialState::Waiting {
            due: now + self.backoff,
        };
        self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(n: u8) -> SocketAddr {
        SocketAddr::from(([198, 18, n, 11], 4500))
    }

    fn book() -> PeerBook {
        PeerBook::new("a/a1".into(), addr(1))
    }

    fn peer(host: &str, addrs: &[SocketAddr]) -> PeerAddr {
        PeerAddr {
            host: host.into(),
            addrs: addrs.to_vec(),
        }
    }

    const NOT_CONNECTED: fn(SocketAddr) -> bool = |_| false;

    #[test]
    fn addresses_are_dialed_once_and_never_our_own() {
        let now = Instant::now();
        let mut b = book();
        assert!(b.add_address(addr(2), now));
        assert!(!b.add_address(addr(2), now), "duplicate");
        assert!(!b.add_address(addr(1), now), "our advertised address");
        assert_eq!(b.poll_timeout(), Some(now));
        assert_eq!(b.poll_dial(now, NOT_CONNECTED), vec![addr(2)]);
        // While the attempt runs nothing else is due.
        assert!(b.poll_dial(now + MAX_BACKOFF, NOT_CONNECTED).is_empty());
        assert_eq!(b.poll_timeout(), None);
        assert!(!b.add_address(addr(2), now), "still known while dialing");
    }

    #[test]
    fn failures_back_off_doubling_up_to_the_maximum_and_success_resets() {
        let mut now = Instant::now();
        let mut b = book();
        b.add_address(addr(2), now);
        let mut waits = Vec::new();
        for _ in 0..7 {
            assert_eq!(b.poll_dial(now, NOT_CONNECTED), vec![addr(2)]);
            b.dial_failed(addr(2), now);
            let due = b.poll_timeout().unwrap();
            assert!(
                b.poll_dial(due - Duration::from_millis(1), NOT_CONNECTED)
                    .is_empty()
            );
            waits.push(due - now);
            now = due;
        }
        let ms: Vec<u128> = waits.iter().map(Duration::as_millis).collect();
        assert_eq!(ms, [250, 500, 1000, 2000, 4000, 4000, 4000]);
        // A success resets the backoff; when its connection ends, the address is redialed at
        // once, and a failure then waits the first backoff again.
        assert_eq!(b.poll_dial(now, NOT_CONNECTED), vec![addr(2)]);
        b.dial_succeeded(addr(2));
        let later = now + Duration::from_secs(60);
        b.dialed_link_ended(addr(2), later);
        assert_eq!(b.poll_timeout(), Some(later));
        assert_eq!(b.poll_dial(later, NOT_CONNECTED), vec![addr(2)]);
        b.dial_failed(addr(2), later);
        assert_eq!(b.poll_timeout(), Some(later + FIRST_BACKOFF));
    }

    #[test]
    fn an_address_already_connected_waits_instead_of_being_dialed() {
        let now = Instant::now();
        let mut b = book();
        b.add_address(addr(2), now);
        b.add_address(addr(3), now);
        let dialed = b.poll_dial(now, |a| a == addr(2));
        assert_eq!(dialed, vec![addr(3)]);
        assert_eq!(b.poll_timeout(), Some(now + FIRST_BACKOFF));
        // Still connected: the waits grow like failures.
        let t1 = now + FIRST_BACKOFF;
        assert!(b.poll_dial(t1, |a| a == addr(2)).is_empty());
        assert_eq!(b.poll_timeout(), Some(t1 + FIRST_BACKOFF * 2));
        let t2 = t1 + FIRST_BACKOFF * 2;
        assert_eq!(b.poll_dial(t2, NOT_CONNECTED), vec![addr(2)]);
    }

    #[test]
    fn an_address_of_our_own_host_is_abandoned() {
        let now = Instant::now();
        let mut b = book();
        b.add_address(addr(9), now);
        assert_eq!(b.poll_dial(now, NOT_CONNECTED), vec![addr(9)]);
        b.dial_succeeded(addr(9));
        b.dialed_self(addr(9));
        assert_eq!(b.poll_timeout(), None);
        assert!(
            b.poll_dial(now + Duration::from_secs(60), NOT_CONNECTED)
                .is_empty()
        );
        assert!(!b.add_address(addr(9), now), "never scheduled again");
    }

    #[test]
    fn gossip_names_the_other_peers_and_ourselves_once_per_host() {
        let mut b = book();
        b.link_up(&"b/b1".into(), addr(2));
        let gossip = b.link_up(&"c/c1".into(), addr(3));
        assert_eq!(
            gossip,
            vec![peer("b/b1", &[addr(2)]), peer("a/a1", &[addr(1)])]
        );
        // A reconnect from another address replaces the host's entry instead of adding one.
        let gossip = b.link_up(&"b/b1".into(), addr(4));
        assert_eq!(
            gossip,
            vec![peer("c/c1", &[addr(3)]), peer("a/a1", &[addr(1)])]
        );
    }

    #[test]
    fn learning_dials_new_addresses_and_prefers_what_a_peer_says_of_itself() {
        let now = Instant::now();
        let mut b = book();
        let b1: HostId = "b/b1".into();
        // b1's connection arrived from its NAT's address.
        b.link_up(&b1, addr(20));
        let told = [
            peer("a/a1", &[addr(1), addr(10)]),
            peer("b/b1", &[addr(2)]),
            peer("c/c1", &[addr(3)]),
        ];
        let new = b.learn(&b1, &told, now);
        assert_eq!(new, vec![addr(2), addr(3)], "our own host is skipped");
        // Told again (by anyone): nothing new to dial.
        assert!(b.learn(&"c/c1".into(), &told, now).is_empty());
        // b1's own word replaced the NAT address; what c1 says of b1 does not override it.
        b.learn(&"c/c1".into(), &[peer("b/b1", &[addr(99)])], now);
        let gossip = b.link_up(&"d/d1".into(), addr(4));
        assert!(gossip.contains(&peer("b/b1", &[addr(2)])), "{gossip:?}");
        assert!(gossip.contains(&peer("c/c1", &[addr(3)])), "{gossip:?}");
        let dialed = b.poll_dial(now, NOT_CONNECTED);
        assert_eq!(dialed, vec![addr(2), addr(3), addr(99)]);
    }
}
