//! Helpers of the overlay lab tests (`overlay_*.rs`), included with `#[path]`: `viola-overlay`
//! daemons in lab hosts, namespaces standing in for VMs, status queries. Everything made here is
//! named `vo-…` and removed again (also on panic).
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use viola_labtests::{repo_root, run, run_ok};

pub fn bin(name: &str) -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target"));
    target.join("debug").join(name)
}

pub fn build_binaries() -> Result<()> {
    run_ok(Command::new(env!("CARGO")).current_dir(repo_root()).args([
        "build",
        "-q",
        "-p",
        "viola-overlay",
        "-p",
        "viola-common",
        "--bins",
    ]))?;
    Ok(())
}

/// Daemons, VM namespaces and files of this test; removed on drop (also on panic).
pub struct Overlay {
    pub lab: String,
    pub dir: tempfile::TempDir,
    pub daemons: BTreeMap<String, Child>,
    pub vm_namespaces: Vec<String>,
}

impl Drop for Overlay {
    fn drop(&mut self) {
        for (name, child) in &mut self.daemons {
            // SAFETY: kill(2) on the PID of a child we spawned and have not reaped yet.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                sleep(Duration::from_millis(100));
            }
            if let Ok(None) = child.try_wait() {
                eprintln!("daemon {name} did not stop; killing it");
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        for ns in &self.vm_namespaces {
            let _ = run(Command::new("ip").args(["netns", "del", ns]));
        }
    }
}

impl Overlay {
    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    pub fn ca(&self, args: &[&str]) -> Result<()> {
        run_ok(Command::new(bin("viola-ca")).args(args))?;
        Ok(())
    }

    pub fn write_config(&self, name: &str, body: &str) -> Result<PathBuf> {
        let p = self.path(&format!("{name}.toml"));
        std::fs::write(&p, body)?;
        Ok(p)
    }

    pub fn start(&mut self, name: &str, netns: &str, config: &Path) -> Result<()> {
        let log = std::fs::File::create(self.path(&format!("{name}.log")))?;
        let child = Command::new("ip")
            .args(["netns", "exec", netns])
            .arg(bin("viola-overlay"))
            .args(["run", "--config"])
            .arg(config)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("cannot start viola-overlay")?;
        if let Some(mut old) = self.daemons.insert(name.to_owned(), child) {
            let _ = old.wait();
        }
        Ok(())
    }

    pub fn kill(&mut self, name: &str, signal: i32) -> Result<()> {
        let mut child = self.daemons.remove(name).context("no such daemon")?;
        // SAFETY: kill(2) on the PID of a child we spawned and have not reaped yet.
        unsafe { libc::kill(child.id() as i32, signal) };
        let status = child.wait()?;
        eprintln!("daemon {name} ended: {status}");
        Ok(())
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
        std::fs::read_to_string(self.path(&format!("{name}.log"))).unwrap_or_default()
    }

    /// A namespace standing in for a VM of `violin` on `host`, attached to the violin's bridge.
    pub fn vm(&mut self, host_ns: &str, host: &str, violin: u32, ip: &str) -> Result<String> {
        let ns = format!("vo-{}-{host}v{violin}", self.lab);
        run_ok(Command::new("ip").args(["netns", "add", &ns]))?;
        self.vm_namespaces.push(ns.clone());
        let port = format!("vm{violin}");
        let bridge = format!("vio{violin}");
        wait_until(
            Duration::from_secs(15),
            "bridge created by the daemon",
            || {
                run(Command::new("ip").args(["-n", host_ns, "link", "show", &bridge]))
                    .is_ok_and(|o| o.status.success())
            },
        )?;
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

pub fn wait_until(limit: Duration, what: &str, mut ok: impl FnMut() -> bool) -> Result<()> {
    let start = Instant::now();
    while start.elapsed() < limit {
        if ok() {
            return Ok(());
        }
        sleep(Duration::from_millis(200));
    }
    bail!("timeout after {limit:?} waiting for {what}")
}

pub fn ping(ns: &str, ip: &str, count: u32) -> bool {
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
    .is_ok_and(|o| o.status.success())
}

pub fn wait_ping(ns: &str, ip: &str, limit: Duration) -> Result<Duration> {
    let start = Instant::now();
    wait_until(limit, &format!("ping {ns} -> {ip}"), || ping(ns, ip, 1))?;
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
