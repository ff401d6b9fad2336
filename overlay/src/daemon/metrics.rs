//! Prometheus export of the daemon's status: events and drops (every reason, zero until it
//! happens), peers, RTT, MAC table sizes.

use std::collections::BTreeMap;
use std::rc::Rc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use viola_common::metrics::SharedRegistry;

use super::Ctx;
use super::switching::{DriverDrop, Refusal};
use crate::switch::DropReason;
use viola_api::overlay::OverlayStatus;

type Labels = Vec<(String, String)>;

/// The daemon's metrics, updated from its status.
pub(super) struct Metrics {
    events: Family<Labels, Counter>,
    drops: Family<Labels, Counter>,
    peers: Gauge,
    rtt: Family<Labels, Gauge<f64, AtomicU64>>,
    macs: Family<Labels, Gauge>,
    link_bytes: Family<Labels, Counter>,
    /// The status' counters at the last update, to turn them into counter increments.
    last: BTreeMap<(bool, String), u64>,
    /// The same for the links' bytes: (peer, direction).
    last_link: BTreeMap<(String, &'static str), u64>,
}

impl Metrics {
    /// Registers the metrics in `registry`.
    pub(super) fn register(registry: &SharedRegistry) -> Self {
        let m = Self {
            events: Family::default(),
            drops: Family::default(),
            peers: Gauge::default(),
            rtt: Family::default(),
            macs: Family::default(),
            link_bytes: Family::default(),
            last: BTreeMap::new(),
            last_link: BTreeMap::new(),
        };
        if let Ok(mut r) = registry.lock() {
            r.register(
                "viola_overlay_events",
                "Frames and datagrams handled, by event",
                m.events.clone(),
            );
            r.register(
                "viola_overlay_drops",
                "Frames, datagrams and messages dropped, and connections refused, by reason",
                m.drops.clone(),
            );
            r.register(
                "viola_overlay_peers_connected",
                "Directly connected peers",
                m.peers.clone(),
            );
            r.register(
                "viola_overlay_peer_rtt_seconds",
                "Round-trip time per peer",
                m.rtt.clone(),
            );
            r.register(
                "viola_overlay_macs",
                "MAC table entries per violin",
                m.macs.clone(),
            );
            r.register(
                "viola_overlay_link_bytes",
                "Bytes each peer link carried on the underlay (QUIC overhead included), by peer and direction",
                m.link_bytes.clone(),
            );
        }
        m
    }

    /// Brings the metrics up to `s`. Every drop reason is exported, also those that never
    /// happened, so that no reason can be missing from the export.
    pub(super) fn update(&mut self, s: &OverlayStatus) {
        let counters = &s.switch.counters;
        for (event, n) in counters.events() {
            self.bump(false, event, n);
        }
        let count = |map: &BTreeMap<String, u64>, key: &str| map.get(key).copied().unwrap_or(0);
        for r in DropReason::ALL {
            self.bump(true, r.as_str(), count(&counters.drops, r.as_str()));
        }
        for d in DriverDrop::ALL {
            self.bump(true, d.as_str(), count(&s.driver_drops, d.as_str()));
        }
        for r in Refusal::ALL {
            let n = count(&s.refused, r.as_str());
            self.bump(true, &format!("refused_{}", r.as_str()), n);
        }
        self.peers.set(s.rtt_ms.len() as i64);
        for (p, r) in &s.rtt_ms {
            self.rtt
                .get_or_create(&vec![("peer".into(), p.clone())])
                .set(r / 1000.0);
        }
        for (peer, bytes) in &s.link_bytes {
            for (direction, value) in [("tx", bytes.tx), ("rx", bytes.rx)] {
                let last = self.last_link.entry((peer.clone(), direction)).or_default();
                let delta = value.saturating_sub(*last);
                *last = value;
                self.link_bytes
                    .get_or_create(&vec![
                        ("peer".into(), peer.clone()),
                        ("direction".into(), direction.into()),
                    ])
                    .inc_by(delta);
            }
        }
        for v in &s.switch.violins {
            self.macs
                .get_or_create(&vec![("violin".into(), v.id.to_string())])
                .set(v.macs.len() as i64);
        }
    }

    fn bump(&mut self, drop: bool, name: &str, value: u64) {
        let last = self.last.entry((drop, name.to_owned())).or_default();
        let delta = value.saturating_sub(*last);
        *last = value;
        let (fam, key) = if drop {
            (&self.drops, "reason")
        } else {
            (&self.events, "event")
        };
        fam.get_or_create(&vec![(key.to_owned(), name.to_owned())])
            .inc_by(delta);
    }
}

/// Updates `m` from the daemon's status every second until cancelled.
pub(super) async fn updater(ctx: Rc<Ctx>, mut m: Metrics) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            () = ctx.token.cancelled() => return,
            _ = tick.tick() => {}
        }
        m.update(&ctx.status());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use viola_api::overlay::{Counters, SwitchStatus};

    fn status() -> OverlayStatus {
        OverlayStatus {
            switch: SwitchStatus {
                host: "a/a1".into(),
                peers: Vec::new(),
                violins: Vec::new(),
                counters: Counters {
                    relayed: 4,
                    drops: [("not_member".to_owned(), 2)].into(),
                    ..Counters::default()
                },
                reassembly_bytes: 0,
            },
            rtt_ms: BTreeMap::new(),
            driver_drops: [("control_malformed".to_owned(), 3)].into(),
            refused: [("role".to_owned(), 1)].into(),
            cpu_wake_latency_us: None,
            handoff_yields: None,
            busy_poll: None,
            link_bytes: [(
                "b/b1".to_owned(),
                viola_api::overlay::LinkBytes { tx: 1500, rx: 700 },
            )]
            .into(),
        }
    }

    fn exported(s: &OverlayStatus) -> String {
        let registry = SharedRegistry::default();
        let mut m = Metrics::register(&registry);
        m.update(s);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry.lock().unwrap()).unwrap();
        text
    }

    #[test]
    fn every_drop_reason_is_exported() {
        let text = exported(&status());
        let reasons = DropReason::ALL.iter().map(|r| r.as_str().to_owned());
        let driver = DriverDrop::ALL.iter().map(|d| d.as_str().to_owned());
        let refused = Refusal::ALL
            .iter()
            .map(|r| format!("refused_{}", r.as_str()));
        for reason in reasons.chain(driver).chain(refused) {
            let line = format!("viola_overlay_drops_total{{reason=\"{reason}\"}}");
            assert!(text.contains(&line), "{line} missing from\n{text}");
        }
        for line in [
            "viola_overlay_drops_total{reason=\"not_member\"} 2",
            "viola_overlay_drops_total{reason=\"control_malformed\"} 3",
            "viola_overlay_drops_total{reason=\"refused_role\"} 1",
            "viola_overlay_events_total{event=\"relayed\"} 4",
        ] {
            assert!(text.contains(line), "{line} missing from\n{text}");
        }
    }

    #[test]
    fn counters_become_increments() {
        let registry = SharedRegistry::default();
        let mut m = Metrics::register(&registry);
        let mut s = status();
        m.update(&s);
        s.switch.counters.relayed = 10;
        s.link_bytes.get_mut("b/b1").unwrap().tx = 4000;
        m.update(&s);
        m.update(&s);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry.lock().unwrap()).unwrap();
        for line in [
            "viola_overlay_events_total{event=\"relayed\"} 10",
            "viola_overlay_link_bytes_total{peer=\"b/b1\",direction=\"tx\"} 4000",
            "viola_overlay_link_bytes_total{peer=\"b/b1\",direction=\"rx\"} 700",
        ] {
            assert!(
                text.contains(line),
                "{line} missing from
{text}"
            );
        }
    }
}
