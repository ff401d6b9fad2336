//! A federation for lab tests on the default lab: a CA, a `viola-adaptmgr` on loopback with
//! its configuration, a `viola-monitor` per host, and the `viola` CLI's identity.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use viola_hypervisor::Hypervisor;

use crate::daemons::{Daemons, bin, free_port};
use crate::mech::{
    Cleanup, begin_with_guest, local_images, manager_uri, monitor_libvirt_dirs, peer_uri,
    wait_guest,
};
use crate::pki::Pki;
use crate::wait_until;

/// A lab guest under a federation's manager ([`managed_guest`]). Dropped in field order: the
/// daemons stop first, the guest and its bridge go last.
pub struct ManagedGuest {
    pub fed: Federation,
    pub hv: Arc<dyn Hypervisor>,
    /// The guest's address.
    pub ip: String,
    pub cleanup: Cleanup,
}

/// Guest `name` booted at `host` of site `site` on a bridge of its own (`SUBNET.5`, one vCPU:
/// [`begin_with_guest`]), a manager configured with `extra` and a monitor at `host`; returns
/// once the guest answers and the manager has it at `host`.
pub fn managed_guest(
    host: &'static str,
    site: &str,
    name: &'static str,
    subnet: &str,
    extra: &str,
) -> ManagedGuest {
    let (cleanup, hv, ip) = begin_with_guest(host, name, subnet, 1);
    let fed = Federation::start(&[(host, site)], extra);
    wait_guest(host, &ip, Duration::from_secs(180));
    wait_until(
        "the manager knows the guest",
        Duration::from_secs(60),
        || vm_host(&fed.mgr, &fed.cli_id, name).is_some_and(|(h, _)| h == host),
    )
    .unwrap();
    ManagedGuest {
        fed,
        hv,
        ip,
        cleanup,
    }
}

/// [`managed_guest`] `name` at `a1` of site `a`, the one VM of violin `lan` (`id`), guests'
/// requests configured by `guest_requests` (the TOML lines of the manager's
/// `[guest_requests]`).
pub fn guest_of_one_violin(
    name: &'static str,
    subnet: &str,
    id: u32,
    guest_requests: &str,
) -> ManagedGuest {
    managed_guest(
        "a1",
        "a",
        name,
        subnet,
        &format!(
            "[[violins]]\nname = \"lan\"\nid = {id}\nvms = [\"{name}\"]\n\
             [guest_requests]\n{guest_requests}\n"
        ),
    )
}

/// The federation of a test: its CA, the manager's and the CLI's identities, the manager's
/// address and configuration, the daemons (stopped at the end).
pub struct Federation {
    pub dir: tempfile::TempDir,
    pub pki: Pki,
    /// The manager's address.
    pub mgr: String,
    pub mgr_id: PathBuf,
    pub cli_id: PathBuf,
    pub cfg: PathBuf,
    /// The manager's Prometheus endpoint (loopback).
    pub metrics: String,
    pub daemons: Daemons,
}

impl Federation {
    /// Builds the daemons, makes the identities, configures the manager for `hosts` (name,
    /// site) with `extra` keys and tables, and starts it and a monitor at each host.
    pub fn start(hosts: &[(&str, &str)], extra: &str) -> Self {
        crate::daemons::build(&["viola-adaptmgr", "viola-monitor", "viola-common"])
            .expect("building the daemons");
        let mut fed = Self::new();
        fed.cfg = write_manager_config(&fed, hosts, extra);
        fed.start_manager();
        for (h, site) in hosts {
            fed.start_monitor(h, site);
        }
        fed
    }

    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::init(&dir.path().join("ca")).unwrap();
        let mgr_id = pki
            .issue("adaptmgr", "fed", "mgr", &dir.path().join("adaptmgr-mgr"))
            .unwrap();
        let cli_id = pki
            .issue("cli", "fed", "tester", &dir.path().join("cli-tester"))
            .unwrap();
        Self {
            mgr: format!("127.0.0.1:{}", free_port()),
            metrics: format!("127.0.0.1:{}", free_port()),
            dir,
            pki,
            mgr_id,
            cli_id,
            cfg: PathBuf::new(),
            daemons: Daemons::default(),
        }
    }

    /// Starts the manager as daemon "manager".
    pub fn start_manager(&mut self) {
        let child = Command::new(bin("viola-adaptmgr"))
            .arg("--config")
            .arg(&self.cfg)
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start viola-adaptmgr");
        self.daemons.add("manager", child);
    }

    /// `viola ARGS` as the CLI against this manager, insisting on success; its stdout.
    pub fn viola(&self, args: &[&str]) -> String {
        let out = Command::new(bin("viola"))
            .args(["--manager", &self.mgr, "--identity"])
            .arg(&self.cli_id)
            .args(args)
            .output()
            .expect("run viola");
        assert!(
            out.status.success(),
            "viola {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Every action of the decision log's decisions by `policy` (`viola --json decisions`
    /// prints one decision per line).
    pub fn actions_of(&self, policy: &str) -> Vec<serde_json::Value> {
        self.viola(&["--json", "decisions"])
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("a decision per line"))
            .filter(|d| policy.is_empty() || d["policy"] == policy)
            .flat_map(|d| d["actions"].as_array().cloned().unwrap_or_default())
            .collect()
    }

    /// The value of the manager's unlabelled metric `name`, if it has one.
    pub fn manager_metric(&self, name: &str) -> Option<f64> {
        let text = crate::run_ok(Command::new("curl").args([
            "-s",
            "-m",
            "5",
            &format!("http://{}/metrics", self.metrics),
        ]))
        .ok()?;
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .and_then(|v| v.trim().parse().ok())
    }

    /// Starts the monitor of `host` as daemon "monitor-HOST" (its identity issued once).
    pub fn start_monitor(&mut self, host: &str, site: &str) {
        let id = self.dir.path().join(format!("monitor-{host}"));
        if !id.exists() {
            self.pki.issue("monitor", site, host, &id).unwrap();
        }
        let child = Command::new(bin("viola-monitor"))
            .args(["--host", host, "--site", site, "--manager", &self.mgr])
            .args(["--interval-ms", "1000", "--libvirt-uri", &manager_uri(host)])
            .args(monitor_libvirt_dirs(host))
            .args(["--metrics-listen", &format!("127.0.0.1:{}", free_port())])
            .arg("--identity")
            .arg(&id)
            .stderr(Stdio::null())
            .spawn()
            .expect("start viola-monitor");
        self.daemons.add(&format!("monitor-{host}"), child);
    }
}

pub fn viola_json(mgr: &str, cli: &Path, args: &[&str]) -> Option<serde_json::Value> {
    let out = Command::new(bin("viola"))
        .args(["--manager", mgr, "--identity"])
        .arg(cli)
        .arg("--json")
        .args(args)
        .output()
        .ok()?;
    if !out.status.success() {
        eprintln!("viola {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        return None;
    }
    serde_json::from_slice(&out.stdout).ok()
}

pub fn vm_host(mgr: &str, cli: &Path, vm: &str) -> Option<(String, bool)> {
    let vms = viola_json(mgr, cli, &["vm", "list"])?;
    vms.as_array()?.iter().find(|v| v["name"] == vm).map(|v| {
        (
            v["host"].as_str().unwrap_or_default().to_owned(),
            !v["domain_xml"].is_null(),
        )
    })
}

/// Writes the manager's configuration for `hosts` (name, site) with `extra` keys and tables
/// (top-level keys first), its inventory in the federation's directory.
fn write_manager_config(fed: &Federation, hosts: &[(&str, &str)], extra: &str) -> PathBuf {
    let dir = fed.dir.path();
    let mut toml = format!(
        "listen = \"{}\"\nmetrics_listen = \"{}\"\nidentity_dir = \"{}\"\ninventory = \"{}\"\n{extra}\n",
        fed.mgr,
        fed.metrics,
        fed.mgr_id.display(),
        dir.join("inventory.redb").display()
    );
    for (h, site) in hosts {
        toml.push_str(&format!(
            "[[hosts]]\nname = \"{h}\"\nsite = \"{site}\"\nlibvirt_uri = \"{}\"\nmigration_uri = \"{}\"\nimages_local = \"{}\"\n\n",
            manager_uri(h),
            peer_uri(h),
            local_images(h).display()
        ));
    }
    let cfg = dir.join("adaptmgr.toml");
    std::fs::write(&cfg, toml).unwrap();
    cfg
}
