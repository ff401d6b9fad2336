//! The overlay lab tests' helpers (`overlay_*.rs`): `viola-overlay` daemons in lab hosts,
//! namespaces standing in for VMs, status queries. Everything made here is named `vo-…` and
//! removed again (also on panic). Build the daemons first: [`build_binaries`].

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::daemons::{Daemons, bin, log_text, spawn_logged};
use crate::pki::Pki;
use crate::{Lab, LabSpec, lab_tests_enabled, run, run_ok, wait_until};

/// Builds `viola-overlay` and `viola-ca`.
pub fn build_binaries() -> Result<()> {
    crate::daemons::build(&["viola-overlay", "viola-common"])
}

/// What every overlay lab test starts from: the daemons built, lab `instance` up as `spec`
/// says, no daemons yet and a CA in the test's directory. `None` where lab tests are off.
/// Bind the three in this order: dropped in reverse, the daemons go before the lab.
pub fn start_lab(instance: &str, spec: &LabSpec) -> Result<Option<(Lab, Overlay, Pki)>> {
    if !lab_tests_enabled() {
        return Ok(None);
    }
    build_binaries()?;
    let lab = Lab::up(instance, spec)?;
    let overlay = Overlay::new(instance)?;
    let pki = Pki::init(&overlay.path("ca"))?;
    Ok(Some((lab, overlay, pki)))
}

/// Daemons, VM namespaces and files of this test; removed on drop (also on panic).
pub struct Overlay {
    pub lab: String,
    pub dir: tempfile::TempDir,
    pub daemons: Daemons,
    pub vm_namespaces: Vec<String>,
}

impl Drop for Overlay {
    fn drop(&mut self) {
        // The daemons first (they own the bridges the VM namespaces' links are ports of).
        drop(std::mem::take(&mut self.daemons));
        for ns in &self.vm_namespaces {
            let _ = run(Command::new("ip").args(["netns", "del", ns]));
        }
    }
}

impl Overlay {
    /// No daemons yet, files in a new temporary directory; VM namespaces named `vo-LAB-…`.
    pub fn new(lab: &str) -> Result<Self> {
        Ok(Self {
            lab: lab.to_owned(),
            dir: tempfile::tempdir()?,
            daemons: Daemons::default(),
            vm_namespaces: Vec::new(),
        })
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    pub fn write_config(&self, name: &str, body: &str) -> Result<PathBuf> {
        let p = self.path(&format!("{name}.toml"));
        std::fs::write(&p, body)?;
        Ok(p)
    }

    /// Issues `host`'s overlay identity (site: the host name's first letter) and writes its
    /// configuration: QUIC on its underlay address (port 4500), its identity, its control
    /// socket, then `keys` (top-level keys), every one of `peers` as `[[peers]]`, then `tables`
    /// (`[[violins]]` …). Returns the file. Top-level keys in `VIOLA_OVERLAY_TOML` (if set)
    /// come first: the lab tests run with other settings, e.g. `tap_offload = true` (the same
    /// variable as `scripts/bench/overlay.sh`'s).
    pub fn host_config(
        &self,
        lab: &Lab,
        pki: &Pki,
        host: &str,
        peers: &[&str],
        keys: &str,
        tables: &str,
    ) -> Result<PathBuf> {
        let dir = pki.issue(
            "overlay",
            &host[..1],
            host,
            &self.path(&format!("pki-{host}")),
        )?;
        let peers: String = peers
            .iter()
            .map(|p| format!("[[peers]]\naddr = \"{}:4500\"\n", lab.host(p).address))
            .collect();
        let extra = std::env::var("VIOLA_OVERLAY_TOML").unwrap_or_default();
        self.write_config(
            host,
            &format!(
                "{extra}\nlisten = \"{}:4500\"\nidentity_dir = \"{}\"\ncontrol_socket = \"{}\"\n{keys}\n{peers}{tables}\n",
                lab.host(host).address,
                dir.display(),
                self.socket(host).display(),
            ),
        )
    }

    /// Starts `viola-overlay run` in network namespace `netns` as daemon `name`.
    pub fn start(&mut self, name: &str, netns: &str, config: &Path) -> Result<()> {
        let log = self.path(&format!("{name}.log"));
        // A fresh log per start: a restarted daemon's log is its own.
        std::fs::File::create(&log)?;
        let child = spawn_logged(
            Command::new("ip")
                .args(["netns", "exec", netns])
                .arg(bin("viola-overlay"))
                .args(["run", "--config"])
                .arg(config)
                .env("RUST_LOG", "info"),
            &log,
        )?;
        self.daemons.add(name, child);
        Ok(())
    }

    pub fn kill(&mut self, name: &str, signal: i32) -> Result<()> {
        self.daemons.kill(name, signal).map(|_| ())
    }

    pub fn socket(&self, name: &str) -> PathBuf {
        self.path(&format!("{name}.sock"))
    }

    pub fn status(&self, name: &str) -> Result<serde_json::Value> {
        let out = run_ok(
            Command::new(bin("viola-overlay"))
                .args(["status", "--json", "--socket"])
                .arg(self.socket(name)),
        )?;
        Ok(serde_json::from_str(&out)?)
    }

    pub fn log(&self, name: &str) -> String {
        log_text(&self.path(&format!("{name}.log")))
    }

    /// A VM namespace on violin `violin` at each of `hosts`, the i-th at `10.1.0.(i+1)/24`
    /// (the same addresses in every violin); their names.
    pub fn vm_per_host(&mut self, lab: &Lab, hosts: &[&str], violin: u32) -> Result<Vec<String>> {
        hosts
            .iter()
            .enumerate()
            .map(|(i, h)| {
                self.vm(
                    &lab.host(h).namespace,
                    h,
                    violin,
                    &format!("10.1.0.{}/24", i + 1),
                )
            })
            .collect()
    }

    /// A namespace standing in for a VM of `violin` on `host`, attached to the violin's bridge.
    pub fn vm(&mut self, host_ns: &str, host: &str, violin: u32, ip: &str) -> Result<String> {
        let ns = format!("vo-{}-{host}v{violin}", self.lab);
        run_ok(Command::new("ip").args(["netns", "add", &ns]))?;
        self.vm_namespaces.push(ns.clone());
        let port = format!("vm{violin}");
        let bridge = format!("vio{violin}");
        wait_for_link(host_ns, &bridge, Duration::from_secs(15))?;
        for args in [
            vec![
                "-n", host_ns, "link", "add", &port, "type", "veth", "peer", "name", "eth0",
                "netns", &ns,
            ],
            vec!["-n", host_ns, "link", "set", &port, "master", &bridge, "up"],
            vec!["-n", &ns, "link", "set", "lo", "up"],
            vec!["-n", &ns, "link", "set", "eth0", "up"],
            vec!["-n", &ns, "addr", "add", ip, "dev", "eth0"],
        ] {
            run_ok(Command::new("ip").args(&args))?;
        }
        run_ok(Command::new("ip").args([
            "netns",
            "exec",
            &ns,
            "sysctl",
            "-qw",
            "net.ipv4.icmp_echo_ignore_broadcasts=0",
        ]))?;
        Ok(ns)
    }
}

/// Whether network namespace `ns` has a link named `link`.
pub fn link_exists(ns: &str, link: &str) -> bool {
    run(Command::new("ip").args(["-n", ns, "link", "show", link])).is_ok_and(|o| o.status.success())
}

/// The MTU of `link` in namespace `ns`.
pub fn link_mtu(ns: &str, link: &str) -> Result<u32> {
    let shown = run_ok(Command::new("ip").args(["-n", ns, "-o", "link", "show", "dev", link]))?;
    let mut words = shown.split_whitespace();
    words
        .find(|w| *w == "mtu")
        .and_then(|_| words.next())
        .and_then(|m| m.parse().ok())
        .with_context(|| format!("no MTU in {shown:?}"))
}

/// Waits until the daemon has made `link` (a violin's bridge) in namespace `ns`.
pub fn wait_for_link(ns: &str, link: &str, timeout: Duration) -> Result<()> {
    wait_until(&format!("{link} in {ns}"), timeout, || {
        link_exists(ns, link)
    })
}

/// `count` pings to `ip` from namespace `ns`, 0.2 s apart, each waited for 2 s at most.
fn ping_output(ns: &str, ip: &str, count: u32) -> Result<std::process::Output> {
    run(Command::new("ip").args([
        "netns",
        "exec",
        ns,
        "ping",
        "-q",
        "-c",
        &count.to_string(),
        "-i",
        "0.2",
        "-W",
        "2",
        ip,
    ]))
}

/// Whether any of `count` pings from `ns` to `ip` was answered.
pub fn ping(ns: &str, ip: &str, count: u32) -> bool {
    ping_output(ns, ip, count).is_ok_and(|o| o.status.success())
}

/// Echo replies `ns` got for `count` pings to `ip`, 0.2 s apart.
pub fn pings_answered(ns: &str, ip: &str, count: u32) -> Result<u32> {
    let out = ping_output(ns, ip, count)?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.split(',')
        .find_map(|part| part.trim().strip_suffix(" received"))
        .and_then(|n| n.trim().parse().ok())
        .with_context(|| format!("no ping summary in {text}"))
}

/// Pings broadcast address `broadcast` `count` times from namespace `ns` (whoever answers).
pub fn broadcast_ping(ns: &str, broadcast: &str, count: u32) {
    let _ = run(Command::new("ip").args([
        "netns",
        "exec",
        ns,
        "ping",
        "-b",
        "-c",
        &count.to_string(),
        "-i",
        "0.3",
        "-W",
        "1",
        broadcast,
    ]));
}

/// Waits until `ip` answers a ping from namespace `ns`; how long that took.
pub fn wait_ping_from(ns: &str, ip: &str, limit: Duration) -> Result<Duration> {
    let start = Instant::now();
    wait_until(&format!("ping {ns} -> {ip}"), limit, || ping(ns, ip, 1))?;
    Ok(start.elapsed())
}

/// ICMP echo requests received by a namespace (/proc/net/snmp `Icmp: InEchos`).
pub fn in_echos(ns: &str) -> Result<u64> {
    let snmp = run_ok(Command::new("ip").args(["netns", "exec", ns, "cat", "/proc/net/snmp"]))?;
    let mut icmp = snmp.lines().filter(|l| l.starts_with("Icmp:"));
    let (Some(names), Some(values)) = (icmp.next(), icmp.next()) else {
        bail!("no Icmp lines in /proc/net/snmp");
    };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(n, _)| *n == "InEchos")
        .and_then(|(_, v)| v.parse().ok())
        .context("no InEchos")
}

pub fn mac_of(ns: &str) -> Result<String> {
    Ok(run_ok(Command::new("ip").args([
        "netns",
        "exec",
        ns,
        "cat",
        "/sys/class/net/eth0/address",
    ]))?
    .trim()
    .to_owned())
}

pub fn neighbour_mac(ns: &str, ip: &str) -> Result<String> {
    let out = run_ok(Command::new("ip").args(["-n", ns, "neigh", "show", ip]))?;
    out.split_whitespace()
        .skip_while(|w| *w != "lladdr")
        .nth(1)
        .map(str::to_owned)
        .with_context(|| format!("no neighbour entry for {ip} in {ns}: {out}"))
}

pub fn counter(status: &serde_json::Value, path: &[&str]) -> u64 {
    let mut v = status;
    for p in path {
        v = &v[*p];
    }
    v.as_u64().unwrap_or(0)
}

pub fn peer<'a>(status: &'a serde_json::Value, host: &str) -> Option<&'a serde_json::Value> {
    status["switch"]["peers"]
        .as_array()?
        .iter()
        .find(|p| p["host"] == host)
}
