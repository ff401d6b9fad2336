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
        let child = monitor_command(
            Command::new(bin("viola-monitor")),
            host,
            site,
            &self.mgr,
            &id,
        )
        .spawn()
        .expect("start viola-monitor");
        self.daemons.add(&format!("monitor-{host}"), child);
    }
}

/// `cmd` (the monitor's binary, or a command that runs it) with the arguments of `host`'s
/// monitor, reporting to `managers` as identity `id`.
fn monitor_command(mut cmd: Command, host: &str, site: &str, managers: &str, id: &Path) -> Command {
    cmd.args(["--host", host, "--site", site, "--manager", managers])
        .args(["--interval-ms", "1000", "--libvirt-uri", &manager_uri(host)])
        .args(monitor_libvirt_dirs(host))
        .args(["--metrics-listen", &format!("127.0.0.1:{}", free_port())])
        .arg("--identity")
        .arg(id)
        .stderr(Stdio::null());
    cmd
}

pub fn viola_json(mgr: &str, cli: &Path, args: &[&str]) -> Option<serde_json::Value> {
    viola_json_in(None, mgr, cli, args)
}

/// `viola --json ARGS` run in lab namespace `ns` (`None`: here); its answer, if it succeeded.
pub fn viola_json_in(
    ns: Option<&str>,
    mgr: &str,
    cli: &Path,
    args: &[&str],
) -> Option<serde_json::Value> {
    let mut cmd = match ns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns]).arg(bin("viola"));
            c
        }
        None => Command::new(bin("viola")),
    };
    let out = cmd
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
    vm_host_in(None, mgr, cli, vm)
}

/// Where the manager has `vm` (and whether it keeps its definition), asked from namespace `ns`.
pub fn vm_host_in(ns: Option<&str>, mgr: &str, cli: &Path, vm: &str) -> Option<(String, bool)> {
    let vms = viola_json_in(ns, mgr, cli, &["vm", "list"])?;
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
    let cfg = fed.dir.path().join("adaptmgr.toml");
    std::fs::write(&cfg, write_manager_config_text(fed, hosts, extra)).unwrap();
    cfg
}

/// The text of [`write_manager_config`].
fn write_manager_config_text(fed: &Federation, hosts: &[(&str, &str)], extra: &str) -> String {
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
    toml
}

/// Replicated managers for a lab test: a three-member etcd cluster and a manager beside each
/// member, on three "machines" (lab hosts' namespaces, at their addresses), every manager
/// with the same configuration but its `[replication]` name; monitors in their hosts'
/// namespaces report to whichever leads, and the CLI runs in the namespace of `cli_host`
/// (lab addresses are not reachable from the root namespace).
pub struct Replicated {
    pub fed: Federation,
    /// The machines, in the order their managers started (the first leads at first).
    pub machines: Vec<String>,
    /// Every manager's address, comma-separated (what the CLI and the monitors are given).
    pub managers: String,
    pub cli_ns: String,
}

/// The managers' port at their machines' addresses.
const REPLICA_PORT: u16 = 7443;

impl Replicated {
    /// Starts etcd on `machines`, then a manager on each (the first alone until it leads),
    /// configured for `hosts` (name, site) with `extra`, then a monitor at each host.
    pub fn start(machines: &[&str], hosts: &[(&str, &str)], extra: &str, cli_host: &str) -> Self {
        crate::daemons::build(&["viola-adaptmgr", "viola-monitor", "viola-common"])
            .expect("building the daemons");
        crate::assert_tools(&["etcd", "etcdctl"]);
        let lab = crate::mech::lab();
        let fed = Federation::new();
        let addr = |m: &str| lab.host(m).address.clone();
        let managers: Vec<String> = machines
            .iter()
            .map(|m| format!("{}:{REPLICA_PORT}", addr(m)))
            .collect();
        let cluster = machines
            .iter()
            .map(|m| format!("{m}=https://{}:2380", addr(m)))
            .collect::<Vec<_>>()
            .join(",");
        let endpoints: Vec<String> = machines
            .iter()
            .map(|m| format!("\"{}:2379\"", addr(m)))
            .collect();
        let mut repl = Self {
            managers: managers.join(","),
            machines: machines.iter().map(|m| (*m).to_owned()).collect(),
            cli_ns: lab.host(cli_host).namespace.clone(),
            fed,
        };
        let crl = repl.fed.pki.crl().expect("the CA's revocation list");
        for m in machines {
            let a = addr(m);
            let data = repl.fed.dir.path().join(format!("etcd-{m}"));
            // Each member's certificate from the federation CA names its address; it serves
            // clients and peers over TLS, asks both for certificates of the CA, and refuses
            // those the CA's revocation list names (installed as on a host: DEPLOY.md).
            let etc = repl.fed.dir.path().join(format!("etc-{m}"));
            let id = etc.join("etcd");
            repl.fed
                .pki
                .issue_with_addresses("etcd", "fed", m, &[&a], &id)
                .expect("etcd certificate");
            Pki::install_crl(&crl, &etc).expect("install the CRL");
            let (cert, key, ca) = (id.join("cert.pem"), id.join("key.pem"), id.join("ca.pem"));
            let member_crl = id.join("crl.pem");
            let tls = |flag: &str, path: &Path| format!("--{flag}={}", path.display());
            let child = crate::daemons::spawn_logged(
                Command::new("ip")
                    .args(["netns", "exec", &lab.host(m).namespace, "etcd"])
                    .args(["--name", m, "--data-dir"])
                    .arg(&data)
                    .arg(format!("--listen-client-urls=https://{a}:2379"))
                    .arg(format!("--advertise-client-urls=https://{a}:2379"))
                    .arg(format!("--listen-peer-urls=https://{a}:2380"))
                    .arg(format!("--initial-advertise-peer-urls=https://{a}:2380"))
                    .args([tls("cert-file", &cert), tls("key-file", &key)])
                    .args([tls("trusted-ca-file", &ca), "--client-cert-auth".into()])
                    .args([tls("peer-cert-file", &cert), tls("peer-key-file", &key)])
                    .args([
                        tls("peer-trusted-ca-file", &ca),
                        "--peer-client-cert-auth".into(),
                    ])
                    .args([
                        tls("client-crl-file", &member_crl),
                        tls("peer-crl-file", &member_crl),
                    ])
                    .arg(format!("--initial-cluster={cluster}"))
                    .args([
                        "--initial-cluster-token",
                        "viola-lab",
                        "--initial-cluster-state",
                        "new",
                    ])
                    // A report is one transaction of two writes per VM; keep a day of history.
                    .args(["--max-txn-ops", "10000", "--max-request-bytes", "10485760"])
                    .args([
                        "--auto-compaction-mode",
                        "periodic",
                        "--auto-compaction-retention",
                        "1h",
                    ]),
                &repl.fed.dir.path().join(format!("etcd-{m}.log")),
            )
            .expect("start etcd");
            repl.fed.daemons.add(&format!("etcd-{m}"), child);
        }
        for (i, m) in machines.iter().enumerate() {
            let cfg = repl.fed.dir.path().join(format!("adaptmgr-{m}.toml"));
            let mut toml = write_manager_config_text(&repl.fed, hosts, extra).replace(
                &format!("listen = \"{}\"", repl.fed.mgr),
                &format!("listen = \"{}\"", managers[i]),
            );
            toml.push_str(&format!(
                "[replication]\netcd = [{}]\nname = \"{m}\"\n",
                endpoints.join(", ")
            ));
            std::fs::write(&cfg, toml).unwrap();
            let log = repl.fed.dir.path().join(format!("adaptmgr-{m}.log"));
            let child = crate::lifecycle::spawn_manager(&lab.host(m).namespace, &cfg, &log);
            repl.fed.daemons.add(&format!("manager-{m}"), child);
            if i == 0 {
                wait_until("the first manager leads", Duration::from_secs(60), || {
                    repl.leader().as_deref() == Some(*m)
                })
                .unwrap_or_else(|e| panic!("{e:#}\n{}", crate::daemons::log_text(&log)));
            }
        }
        for (h, site) in hosts {
            let id = repl.fed.dir.path().join(format!("monitor-{h}"));
            repl.fed.pki.issue("monitor", site, h, &id).unwrap();
            let mut ns = Command::new("ip");
            ns.args(["netns", "exec", &lab.host(h).namespace])
                .arg(bin("viola-monitor"));
            let child = monitor_command(ns, h, site, &repl.managers, &id)
                .spawn()
                .expect("start viola-monitor");
            repl.fed.daemons.add(&format!("monitor-{h}"), child);
        }
        repl
    }

    /// The etcd endpoints of the machines still standing.
    pub fn endpoints(&self) -> String {
        let lab = crate::mech::lab();
        self.machines
            .iter()
            .filter(|m| self.fed.daemons.pid(&format!("etcd-{m}")).is_some())
            .map(|m| format!("https://{}:2379", lab.host(m).address))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The machine whose manager leads now, as etcd says.
    pub fn leader(&self) -> Option<String> {
        let out = crate::run_ok(
            Command::new("ip")
                .args(["netns", "exec", &self.cli_ns, "etcdctl"])
                .env("ETCDCTL_API", "3")
                .args(["--endpoints", &self.endpoints(), "--dial-timeout", "2s"])
                .arg(format!(
                    "--cacert={}",
                    self.fed.cli_id.join("ca.pem").display()
                ))
                .arg(format!(
                    "--cert={}",
                    self.fed.cli_id.join("cert.pem").display()
                ))
                .arg(format!(
                    "--key={}",
                    self.fed.cli_id.join("key.pem").display()
                ))
                .args(["get", "/viola/leader", "--print-value-only"]),
        )
        .ok()?;
        out.split_whitespace().next().map(str::to_owned)
    }

    /// `viola ARGS` against the managers, run in the CLI's namespace.
    pub fn viola_command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.cli_ns])
            .arg(bin("viola"))
            .args(["--manager", &self.managers, "--identity"])
            .arg(&self.fed.cli_id)
            .args(args);
        cmd
    }

    /// `viola --json ARGS` against the managers; its answer if it succeeded.
    pub fn viola_json(&self, args: &[&str]) -> Option<serde_json::Value> {
        viola_json_in(Some(&self.cli_ns), &self.managers, &self.fed.cli_id, args)
    }

    /// Where the managers have `vm`.
    pub fn vm_host(&self, vm: &str) -> Option<(String, bool)> {
        vm_host_in(Some(&self.cli_ns), &self.managers, &self.fed.cli_id, vm)
    }

    /// `machine` is lost: its manager and its etcd member are killed (SIGKILL).
    pub fn lose_machine(&mut self, machine: &str) {
        for d in [format!("manager-{machine}"), format!("etcd-{machine}")] {
            self.fed
                .daemons
                .kill(&d, libc::SIGKILL)
                .unwrap_or_else(|e| panic!("kill {d}: {e:#}"));
        }
    }

    /// A manager's log.
    pub fn manager_log(&self, machine: &str) -> String {
        crate::daemons::log_text(&self.fed.dir.path().join(format!("adaptmgr-{machine}.log")))
    }
}
