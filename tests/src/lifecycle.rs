//! The federation of the lifecycle lab tests: two sites of two hosts with an overlay daemon,
//! a depot per site, the manager and monitors, all started as a user would, and the CLI.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use crate::daemons::{Daemons, bin, free_port, log_text, spawn_logged};
use crate::depot::{self, serve_config};
use crate::overlay::Overlay;
use crate::pki::Pki;
use crate::{Lab, LabSpec, guest_dir, run, wait_until};

/// The lab these tests build (one at a time).
pub const LAB: &str = "vlc";
pub const HOSTS: [&str; 4] = ["a1", "a2", "b1", "b2"];

/// The `viola` CLI in a host's namespace, with one identity.
pub struct Cli {
    pub ns: String,
    pub mgr: String,
    pub id: PathBuf,
}

impl Cli {
    /// `viola ARGS` as this identity, from the scientist's/administrator's host; bounded at
    /// 10 minutes (the CLI itself waits as long as the manager works on a request).
    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new("timeout");
        c.args(["--kill-after=5", "600", "ip", "netns", "exec", &self.ns])
            .arg(bin("viola"))
            .args(["--manager", &self.mgr, "--identity"])
            .arg(&self.id)
            .args(args);
        c
    }

    /// `viola --json ARGS`: its JSON answer, or the error it printed.
    pub fn json(&self, args: &[&str]) -> Result<serde_json::Value, String> {
        let mut full = vec!["--json"];
        full.extend_from_slice(args);
        let out = run(&mut self.cmd(&full)).map_err(|e| e.to_string())?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).into_owned());
        }
        serde_json::from_slice(&out.stdout).map_err(|e| format!("{e}: {:?}", out.stdout))
    }

    /// `viola --json vm create NAME --violin VIOLIN --image IMAGE ARGS` (where, sizes,
    /// `--ready-by` and the rest): the VMs made, or the error printed.
    pub fn vm_create(
        &self,
        name: &str,
        violin: &str,
        image: &str,
        args: &[&str],
    ) -> Result<serde_json::Value, String> {
        let mut full = vec!["vm", "create", name, "--violin", violin, "--image", image];
        full.extend_from_slice(args);
        self.json(&full)
    }
}

/// The address the guest's console says it got (`VIOLA-GUEST-READY ... ip=A/P`).
pub fn console_ready_ip(console: &Path, vm: &str) -> Option<String> {
    let text = std::fs::read_to_string(console.join(format!("{vm}.log"))).ok()?;
    let line = text
        .lines()
        .rev()
        .find(|l| l.contains("VIOLA-GUEST-READY"))?;
    let ip = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("ip="))?;
    Some(ip.split('/').next()?.to_owned())
}

/// The federation every test here runs on: lab `vlc` (two sites of two hosts), an overlay
/// daemon per host with no violin in its TOML, a depot per site (site a holds the guest image
/// as "guest", site b fetches from a), the manager in a2's namespace with `[vm_template]` and
/// two tenants (physics: at most 1 VM; chem), a monitor per host, and the CLI identities
/// (administrator "cli", physics's "ann", chem's "bob").
pub struct Fed {
    // Dropped in this order: daemons, then the lab, then the files.
    pub daemons: Daemons,
    pub overlays: Overlay,
    pub cli: Cli,
    pub mgr: String,
    pub mgr_cfg: PathBuf,
    pub mgr_log: PathBuf,
    pub console: PathBuf,
    /// Each host's monitor's Prometheus port (on 127.0.0.1 in the host's namespace).
    pub monitor_metrics: std::collections::BTreeMap<String, u16>,
    /// The dashboard as a browser on this machine reaches it (`https://127.0.0.1:PORT`), when
    /// [`FedSpec::dashboard`] asked for it.
    pub dashboard_url: Option<String>,
    pub lab: Lab,
    pub tmp: tempfile::TempDir,
}

/// Starts the manager in namespace `ns` with configuration `cfg`, logging to `log`.
pub fn spawn_manager(ns: &str, cfg: &Path, log: &Path) -> std::process::Child {
    spawn_logged(
        Command::new("ip")
            .args(["netns", "exec", ns])
            .arg(bin("viola-adaptmgr"))
            .arg("--config")
            .arg(cfg)
            .env("RUST_LOG", "info"),
        log,
    )
    .unwrap()
}

/// What a test wants of the federation beyond the defaults.
#[derive(Default)]
pub struct FedSpec<'a> {
    /// More (name, file) images imported at site a's depot beside "guest" (chains as layers).
    pub images: &'a [(&'a str, &'a Path)],
    /// Each lab host's own CPU capacity (`lab.sh up --host-cpus`); the monitors then report
    /// their host's cgroup (quota and CPU time), not the machine's /proc.
    pub host_cpus: Option<f64>,
    /// TOML appended to the manager's configuration (e.g. a `[policy]` table).
    pub manager_toml: &'a str,
    /// Serve the manager's dashboard, forwarded to 127.0.0.1 of the machine (see
    /// [`Fed::dashboard_url`]).
    pub dashboard: bool,
}

impl Fed {
    /// Builds the daemons, brings lab `LAB` up and starts everything; `images` are more
    /// (name, file) images imported at site a's depot beside "guest" (chains as layers).
    pub fn up(images: &[(&str, &Path)]) -> Self {
        Self::with(&FedSpec {
            images,
            ..FedSpec::default()
        })
    }

    /// [`up`](Self::up) with more than images.
    pub fn with(spec: &FedSpec) -> Self {
        let images = spec.images;
        crate::daemons::build(&[
            "viola-adaptmgr",
            "viola-monitor",
            "viola-overlay",
            "viola-depot",
            "viola-common",
        ])
        .expect("build");
        let lab = Lab::up(
            LAB,
            &LabSpec {
                host_cpus: spec.host_cpus,
                ..LabSpec::default()
            },
        )
        .expect("lab up");
        let mut daemons = Daemons::default();
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().to_owned();
        let dir = dir.as_path();
        let lab_dir = PathBuf::from(&lab.status.lab_dir);
        let console = lab_dir.join("console");
        let ns = |h: &str| lab.host(h).namespace.clone();
        let addr = |h: &str| lab.host(h).address.clone();
        let manager_uri = |h: &str| {
            format!(
                "qemu+unix:///system?socket={}/hosts/{h}/run/libvirt-sock",
                lab_dir.display()
            )
        };

        let pki = Pki::init(&dir.join("ca")).unwrap();
        let id = |name: &str| dir.join(format!("id-{name}"));
        for h in HOSTS {
            pki.issue("monitor", &h[..1], h, &id(&format!("monitor-{h}")))
                .unwrap();
        }
        pki.issue("depot", "a", "a1", &id("depot-a1")).unwrap();
        pki.issue("depot", "b", "b1", &id("depot-b1")).unwrap();
        // The dashboard is reached at a2's address in the lab and through the forward on the
        // machine's loopback: the manager's certificate names both.
        pki.issue_with_addresses(
            "adaptmgr",
            "fed",
            "mgr",
            &["127.0.0.1", &addr("a2")],
            &id("mgr"),
        )
        .unwrap();
        pki.issue("cli", "fed", "user", &id("cli")).unwrap();
        pki.issue_user("physics", "ann", &id("ann")).unwrap();
        pki.issue_user("chem", "bob", &id("bob")).unwrap();

        // Overlays: peers only, no violin; each keeps what it is given in a state file.
        let mut overlays = Overlay::new(LAB).unwrap();
        for h in HOSTS {
            let state = format!(
                "state_file = \"{}\"",
                dir.join(format!("overlay-{h}.state")).display()
            );
            let cfg = overlays
                .host_config(&lab, &pki, h, &HOSTS, &state, "")
                .unwrap();
            overlays.start(h, &ns(h), &cfg).unwrap();
        }

        // Depots: the guest image at site a; site b fetches from a.
        let store_a = dir.join("store-a");
        depot::import(&store_a, &guest_dir().join("base.qcow2"), "guest").expect("import");
        for (name, file) in images {
            depot::import(&store_a, file, name).unwrap_or_else(|e| panic!("import {name}: {e}"));
        }
        let a_cfg = serve_config(
            &lab,
            "a",
            "a1",
            &store_a,
            &id("depot-a1"),
            "hosts = [\"a1\", \"a2\"]",
        );
        let b_cfg = serve_config(
            &lab,
            "b",
            "b1",
            &dir.join("store-b"),
            &id("depot-b1"),
            &format!(
                "hosts = [\"b1\", \"b2\"]\n[[peers]]\nsite = \"a\"\naddr = \"{}:7410\"",
                addr("a1")
            ),
        );
        depot::start(&lab, &mut daemons, "a1", &a_cfg, dir).expect("depot a");
        depot::start(&lab, &mut daemons, "b1", &b_cfg, dir).expect("depot b");

        // The manager in a2's namespace.
        let mgr = format!("{}:{}", addr("a2"), free_port());
        let dashboard = spec
            .dashboard
            .then(|| format!("{}:{}", addr("a2"), free_port()));
        let mut cfg = dashboard
            .as_ref()
            .map(|d| format!("dashboard_listen = \"{d}\"\n"))
            .unwrap_or_default();
        cfg += &format!(
            "listen = \"{mgr}\"\nmetrics_listen = \"127.0.0.1:{}\"\nidentity_dir = \"{}\"\ninventory = \"{}\"\nimages_host_dir = \"/var/lib/viola/images\"\n\n",
            free_port(),
            id("mgr").display(),
            dir.join("inventory.redb").display(),
        );
        for h in HOSTS {
            cfg.push_str(&format!(
                "[[hosts]]\nname = \"{h}\"\nsite = \"{}\"\nlibvirt_uri = \"{}\"\nmigration_uri = \"{}\"\noverlay_addr = \"{}:4500\"\n\n",
                &h[..1],
                manager_uri(h),
                lab.host(h).libvirt_uri,
                addr(h)
            ));
        }
        cfg.push_str(&format!(
            "[[depots]]\nsite = \"a\"\naddr = \"{}:7410\"\n\n[[depots]]\nsite = \"b\"\naddr = \"{}:7410\"\n\n\
             [vm_template]\nkernel = \"{g}/vmlinuz\"\ninitrd = \"{g}/initrd.img\"\n\
             cmdline = \"console=ttyS0 quiet panic=-1 viola.ip=dhcp viola.http=1\"\n\
             console_dir = \"{}\"\nmtu = 1400\n\n\
             [[tenants]]\nname = \"physics\"\nmax_vms = 1\n\n[[tenants]]\nname = \"chem\"\n\n{}\n",
            addr("a1"),
            addr("b1"),
            console.display(),
            spec.manager_toml,
            g = guest_dir().display(),
        ));
        let mgr_cfg = dir.join("adaptmgr.toml");
        std::fs::write(&mgr_cfg, cfg).unwrap();
        let mgr_log = dir.join("adaptmgr.log");
        daemons.add("manager", spawn_manager(&ns("a2"), &mgr_cfg, &mgr_log));
        let mut monitor_metrics = std::collections::BTreeMap::new();
        for h in HOSTS {
            // nsenter, not `ip netns exec`: that mounts a fresh /sys, which hides the machine's
            // cgroup file systems the monitor reads its host's partition from.
            let metrics_port = free_port();
            monitor_metrics.insert(h.to_string(), metrics_port);
            let mut monitor = Command::new("nsenter");
            monitor
                .arg(format!("--net=/run/netns/{}", ns(h)))
                .arg("--")
                .arg(bin("viola-monitor"))
                .args(["--host", h, "--site", &h[..1], "--manager", &mgr])
                .args(["--interval-ms", "1000", "--libvirt-uri", &manager_uri(h)])
                .args(lab.monitor_libvirt_dirs(h))
                .args(["--metrics-listen", &format!("127.0.0.1:{metrics_port}")])
                .arg("--identity")
                .arg(id(&format!("monitor-{h}")))
                .arg("--overlay-socket")
                .arg(overlays.socket(h));
            if spec.host_cpus.is_some() {
                for d in lab.host(h).cgroups.split_whitespace() {
                    monitor.args(["--cgroup-dir", d]);
                }
            }
            let child = spawn_logged(&mut monitor, &dir.join(format!("monitor-{h}.log"))).unwrap();
            daemons.add(&format!("monitor-{h}"), child);
        }
        let cli = Cli {
            ns: ns("a2"),
            mgr: mgr.clone(),
            id: id("cli"),
        };
        // The dashboard on the machine's loopback (where a browser runs), forwarded into a2's
        // namespace by socat, as the demo does.
        let dashboard_url = dashboard.map(|d| {
            let port = free_port();
            let forward = spawn_logged(
                Command::new("socat")
                    .arg(format!("TCP-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork"))
                    .arg(format!(
                        "SYSTEM:ip netns exec {} socat STDIO TCP\\:{}",
                        ns("a2"),
                        d.replace(':', "\\:")
                    )),
                &dir.join("dashboard-forward.log"),
            )
            .unwrap();
            daemons.add("dashboard-forward", forward);
            format!("https://127.0.0.1:{port}")
        });
        wait_until("every host reports", Duration::from_secs(60), || {
            cli.json(&["host", "list"]).is_ok_and(|hosts| {
                hosts
                    .as_array()
                    .is_some_and(|a| a.len() == 4 && a.iter().all(|h| h["state"] == "up"))
            })
        })
        .unwrap_or_else(|e| panic!("{e}\nmanager log:\n{}", log_text(&mgr_log)));
        Self {
            daemons,
            overlays,
            cli,
            mgr,
            mgr_cfg,
            mgr_log,
            console,
            monitor_metrics,
            dashboard_url,
            lab,
            tmp,
        }
    }

    /// The value of `metric` for VM `vm` in host `host`'s monitor's Prometheus text, if any.
    pub fn monitor_vm_metric(&self, host: &str, metric: &str, vm: &str) -> Option<f64> {
        let port = self.monitor_metrics.get(host)?;
        let text = crate::run_ok(Command::new("ip").args([
            "netns",
            "exec",
            &self.ns(host),
            "curl",
            "-s",
            "-m",
            "5",
            &format!("http://127.0.0.1:{port}/metrics"),
        ]))
        .ok()?;
        let series = format!("{metric}{{vm=\"{vm}\"}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(&series))
            .and_then(|v| v.trim().parse().ok())
    }

    pub fn dir(&self) -> &Path {
        self.tmp.path()
    }

    /// `viola violin create NAME --sites a,b`, with host a2 (the scientist's or operator's
    /// machine) joining it on its bridge at the subnet's .250, an address the violin does not
    /// hand out. Returns the CLI's answer (a list of one violin).
    pub fn violin_joined_by_a2(&self, name: &str) -> serde_json::Value {
        let violin = self
            .cli
            .json(&["violin", "create", name, "--sites", "a,b"])
            .unwrap_or_else(|e| panic!("violin create {name}: {e}"));
        let observer = violin[0]["subnet"]
            .as_str()
            .unwrap()
            .replace(".0/", ".250/");
        let bridge = format!("vio{}", violin[0]["id"]);
        crate::run_ok(Command::new("ip").args([
            "-n",
            &self.ns("a2"),
            "addr",
            "add",
            &observer,
            "dev",
            &bridge,
        ]))
        .unwrap();
        violin
    }

    pub fn ns(&self, h: &str) -> String {
        self.lab.host(h).namespace.clone()
    }

    pub fn id(&self, name: &str) -> PathBuf {
        self.dir().join(format!("id-{name}"))
    }

    /// The CLI as `who` (an identity made by `up`).
    pub fn user(&self, who: &str) -> Cli {
        Cli {
            ns: self.ns("a2"),
            mgr: self.mgr.clone(),
            id: self.id(who),
        }
    }
}

/// A new ed25519 key pair without a passphrase: the private key at `path`, the public one at
/// `path.pub`, commented `comment` if given (else ssh-keygen's default, user@host).
pub fn ssh_keygen(path: &Path, comment: Option<&str>) {
    let mut cmd = Command::new("ssh-keygen");
    cmd.args(["-q", "-t", "ed25519", "-N", ""]);
    if let Some(comment) = comment {
        cmd.args(["-C", comment]);
    }
    crate::run_ok(cmd.arg("-f").arg(path)).unwrap();
}

/// `ssh root@IP CMD` from namespace `ns` with the private key `key` (no host-key checks: lab
/// guests make a new host key at each boot); `stdin` is fed to it. The whole command is bounded
/// by `limit` (then killed: exit status 124 or 137) and a dead connection by keep-alives, so a
/// hung guest or job fails the test instead of stalling it.
pub fn ssh(
    ns: &str,
    key: &Path,
    ip: &str,
    cmd: &str,
    stdin: Option<&str>,
    limit: Duration,
) -> Output {
    let mut c = Command::new("timeout");
    c.args(["--kill-after=5", &format!("{}", limit.as_secs().max(1))])
        .args(["ip", "netns", "exec", ns, "ssh", "-i"])
        .arg(key)
        .args(["-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no"])
        .args([
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "LogLevel=ERROR",
            "-o",
            "ConnectTimeout=10",
            "-o",
            "ServerAliveInterval=5",
            "-o",
            "ServerAliveCountMax=6",
        ])
        .args([&format!("root@{ip}"), cmd]);
    let Some(text) = stdin else {
        return run(&mut c).unwrap();
    };
    let mut child = c
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write as _;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

/// A command's stdout and stderr, for messages.
pub fn output_text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}
