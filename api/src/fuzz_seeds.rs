//! The checked-in seed corpus of `fuzz/` (`fuzz/seeds/control_frame/`), made by the real
//! encoder. The test fails when an encoding changes and the seeds are stale; regenerate them
//! with `VIOLA_WRITE_FUZZ_SEEDS=1 cargo test -p viola-api fuzz_seeds`.

use std::path::Path;

use crate::adaptation::{
    ActionOutcome, ActionRecord, DecisionRecord, PolicyMode, PolicyView, StateBrief,
};
use crate::manager::{
    GuestAnswer, GuestAsk, HostReport, HostUsage, LinkUsage, NetUsage, ProbeResult, Request,
    Response, VmMigrate, VmResize,
};
use crate::wire::{encode, fuzz_decode};

#[test]
fn fuzz_seeds() {
    let report = HostReport {
        host: "a1".into(),
        site: "a".into(),
        seq: 42,
        sent_ms: 1_800_000_000_000,
        usage: HostUsage {
            cpus: 4,
            cpu_capacity: Some(2.5),
            // Measured rates have all 17 digits (and need an exact float parser).
            cpu_busy: 30.070858376637702,
            mem_total_kib: 8 << 20,
            mem_available_kib: 3 << 20,
            net: vec![NetUsage {
                iface: "eth0".into(),
                rx_bytes: 1 << 30,
                tx_bytes: 1 << 29,
                rx_bps: 1.5e6,
                tx_bps: 37.523754495532884,
            }],
            links: vec![LinkUsage {
                peer: "b/b1".into(),
                rx_bytes: 3000,
                tx_bytes: 9000,
                rx_bps: 8000.0,
                tx_bps: 24000.0,
            }],
        },
        vms: vec![],
        probes: vec![ProbeResult {
            name: "web".into(),
            url: "http://10.1.0.5/".into(),
            ok: true,
            latency_ms: Some(3.7),
            error: None,
        }],
    };
    let decision = DecisionRecord {
        seq: 7,
        ts_ms: 1_800_000_000_000,
        policy: "viola".into(),
        mode: PolicyMode::Act,
        state: StateBrief {
            hosts: 3,
            hosts_up: 3,
            vms: 4,
            vms_held: 1,
            hosts_overloaded: 1,
            mean_demand: 0.6666666666666666,
        },
        actions: vec![ActionRecord::migration(
            Some("vm1".into()),
            Some("a1".into()),
            Some("a2".into()),
            "host a1 overloaded: demand 2100 / 2000 MIPS".into(),
            Some(0),
            ActionOutcome::RolledBack {
                reason: "destination refused".into(),
            },
        )],
    };
    let seeds: [(&str, Vec<u8>); 12] = [
        ("report", encode(&Request::Report(report)).unwrap()),
        (
            "resize",
            encode(&Request::Resize(VmResize {
                vm: "vm1".into(),
                vcpus: Some(2),
                memory_mib: None,
                cap_percent: Some(150),
                shares: None,
            }))
            .unwrap(),
        ),
        (
            "migrate",
            encode(&Request::Migrate(VmMigrate {
                vm: "vm1".into(),
                to_host: "b1".into(),
                bandwidth_mib_s: Some(100),
                stage_base: true,
                timeout_s: None,
            }))
            .unwrap(),
        ),
        ("list_hosts", encode(&Request::ListHosts).unwrap()),
        (
            "decisions",
            encode(&Request::Decisions {
                after_seq: 6,
                limit: 100,
            })
            .unwrap(),
        ),
        ("policy_show", encode(&Request::PolicyShow).unwrap()),
        (
            "decisions_reply",
            encode(&Response::Decisions(vec![decision])).unwrap(),
        ),
        (
            "policy_reply",
            encode(&Response::Policy(Box::new(PolicyView {
                policy: "viola".into(),
                mode: PolicyMode::Advise,
                period_s: 60.0,
                parameters: serde_json::json!({"max_parallel": 2, "cooldown_s": 600.0}),
            })))
            .unwrap(),
        ),
        ("ack", encode(&Response::Ack).unwrap()),
        (
            "guest_ask",
            encode(&Request::GuestAsk(GuestAsk {
                host: "a1".into(),
                site: "a".into(),
                vm: "vm1".into(),
                line: r#"{"op":"resize","vm":"vm1","cpu_mips":1500}"#.into(),
            }))
            .unwrap(),
        ),
        (
            "guest_answer",
            encode(&Response::GuestAnswer(GuestAnswer {
                accepted: false,
                detail: "rate limit exceeded: VM vm1 over 6 requests/min".into(),
            }))
            .unwrap(),
        ),
        (
            "error",
            encode(&Response::Error {
                message: "no such VM".into(),
            })
            .unwrap(),
        ),
    ];
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds/control_frame");
    viola_common::fuzz_seeds::check(&dir, &seeds, fuzz_decode);
}
