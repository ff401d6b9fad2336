//! Real etcd processes for tests (feature `testing`: this crate's and the manager's): one
//! member or a cluster on 127.0.0.1 with free ports, data in temporary directories, each
//! process killed by its own handle on drop.

use std::fs::File;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use crate::Etcd;

pub const ETCD: &str = "/usr/bin/etcd";

/// How long a cluster may take to start and elect a leader.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// The timeout of the clients tests use.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(3);

pub struct Member {
    pub name: String,
    /// "127.0.0.1:port"
    pub client: String,
    child: Option<Child>,
    log: PathBuf,
    /// Dropped after the process is killed (fields drop after `Drop::drop`).
    _dir: tempfile::TempDir,
}

impl Member {
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Kills the process (SIGKILL, by its handle) and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        self.kill();
    }
}

pub struct Cluster {
    pub members: Vec<Member>,
    /// Clients speak TLS with this configuration (`start_tls`).
    tls: Option<std::sync::Arc<rustls::ClientConfig>>,
}

/// A TLS member's files (PEM): its certificate and key, and the CA its clients' certificates
/// must come from (`--client-cert-auth`); and the configuration its test clients use.
pub struct MemberTls {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
    /// The revocation list etcd reads at each client's handshake (`--client-crl-file`).
    pub crl: Option<PathBuf>,
    pub client: std::sync::Arc<rustls::ClientConfig>,
}

/// Ports the kernel hands out now, all distinct (every listener is held until all are picked).
fn free_ports(n: usize) -> Vec<u16> {
    let listeners: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0"))
        .collect();
    listeners
        .iter()
        .map(|l| l.local_addr().expect("local address").port())
        .collect()
}

impl Cluster {
    /// Starts `n` members and waits (bounded) until every one answers and knows the leader.
    pub fn start(n: usize) -> Self {
        Self::start_with(n, None)
    }

    /// One member serving its clients over TLS only, asking for their certificates.
    pub fn start_tls(tls: &MemberTls) -> Self {
        Self::start_with(1, Some(tls))
    }

    fn start_with(n: usize, tls: Option<&MemberTls>) -> Self {
        assert!(
            Path::new(ETCD).exists(),
            "{ETCD} is missing: these tests run a real etcd; install Debian's etcd-server \
             (scripts/setup.sh does)"
        );
        let ports = free_ports(2 * n);
        let names: Vec<String> = (0..n).map(|i| format!("m{i}")).collect();
        let peer = |i: usize| format!("http://127.0.0.1:{}", ports[2 * i + 1]);
        let initial: Vec<String> = (0..n)
            .map(|i| format!("{}={}", names[i], peer(i)))
            .collect();
        let token = format!("viola-etcd-test-{}-{}", std::process::id(), ports[0]);
        let mut members = Vec::new();
        for i in 0..n {
            let dir = tempfile::tempdir().expect("temporary directory");
            let log = dir.path().join("etcd.log");
            let out = File::create(&log).expect("create etcd.log");
            let err = out.try_clone().expect("clone etcd.log handle");
            let client = format!("127.0.0.1:{}", ports[2 * i]);
            let scheme = if tls.is_some() { "https" } else { "http" };
            let mut cmd = Command::new(ETCD);
            if let Some(tls) = tls {
                cmd.arg("--cert-file")
                    .arg(&tls.cert)
                    .arg("--key-file")
                    .arg(&tls.key)
                    .arg("--trusted-ca-file")
                    .arg(&tls.ca)
                    .arg("--client-cert-auth");
                if let Some(crl) = &tls.crl {
                    cmd.arg("--client-crl-file").arg(crl);
                }
            }
            let child = cmd
                .arg("--name")
                .arg(&names[i])
                .arg("--data-dir")
                .arg(dir.path().join("data"))
                .arg("--listen-client-urls")
                .arg(format!("{scheme}://{client}"))
                .arg("--advertise-client-urls")
                .arg(format!("{scheme}://{client}"))
                .arg("--listen-peer-urls")
                .arg(peer(i))
                .arg("--initial-advertise-peer-urls")
                .arg(peer(i))
                .arg("--initial-cluster")
                .arg(initial.join(","))
                .arg("--initial-cluster-state")
                .arg("new")
                .arg("--initial-cluster-token")
                .arg(&token)
                .args(["--heartbeat-interval", "100", "--election-timeout", "1000"])
                .args(["--logger", "zap", "--log-outputs", "stderr"])
                .stdin(Stdio::null())
                .stdout(out)
                .stderr(err)
                .spawn()
                .unwrap_or_else(|e| panic!("cannot start {ETCD}: {e}"));
            members.push(Member {
                name: names[i].clone(),
                client,
                child: Some(child),
                log,
                _dir: dir,
            });
        }
        let mut cluster = Self {
            members,
            tls: tls.map(|t| std::sync::Arc::clone(&t.client)),
        };
        cluster.wait_ready();
        cluster
    }

    /// Waits until every running member answers status with the same, known, leader.
    pub fn wait_ready(&mut self) {
        let deadline = Instant::now() + START_TIMEOUT;
        let probe = self.client_with(Duration::from_millis(500));
        loop {
            for m in &mut self.members {
                if let Some(child) = m.child.as_mut()
                    && let Ok(Some(status)) = child.try_wait()
                {
                    panic!(
                        "etcd {} exited ({status}) while starting:\n{}",
                        m.name,
                        m.log_tail()
                    );
                }
            }
            let leaders: Vec<u64> = self
                .members
                .iter()
                .filter(|m| m.is_running())
                .map(|m| probe.status_of(&m.client).map(|s| s.leader).unwrap_or(0))
                .collect();
            if leaders.iter().all(|&l| l != 0 && l == leaders[0]) {
                return;
            }
            if Instant::now() > deadline {
                let logs: Vec<String> = self
                    .members
                    .iter()
                    .map(|m| format!("--- {} ({}):\n{}", m.name, m.client, m.log_tail()))
                    .collect();
                panic!(
                    "etcd cluster not ready within {START_TIMEOUT:?} (leaders seen: {leaders:?}):\n{}",
                    logs.join("\n")
                );
            }
            sleep(Duration::from_millis(50));
        }
    }

    /// Every member's client endpoint, as "127.0.0.1:port".
    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(|m| m.client.clone()).collect()
    }

    /// A client of every member.
    pub fn client(&self) -> Etcd {
        self.client_with(CLIENT_TIMEOUT)
    }

    fn client_with(&self, timeout: Duration) -> Etcd {
        match &self.tls {
            Some(tls) => Etcd::with_tls(&self.endpoints(), timeout, std::sync::Arc::clone(tls)),
            None => Etcd::new(&self.endpoints(), timeout),
        }
        .expect("client")
    }

    /// The index of the member at `endpoint`.
    pub fn index_of(&self, endpoint: &str) -> usize {
        self.members
            .iter()
            .position(|m| m.client == endpoint)
            .unwrap_or_else(|| panic!("{endpoint} is no member's"))
    }
}

/// Polls `check` every 50 ms until it gives `Some`, at most `timeout`.
pub fn wait_for<T>(timeout: Duration, mut check: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check() {
            return Some(value);
        }
        if Instant::now() > deadline {
            return None;
        }
        sleep(Duration::from_millis(50));
    }
}
