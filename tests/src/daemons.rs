//! The workspace's daemons in lab tests: built once, started with their output in a log file,
//! and stopped when the test ends (also when it panics), by the PIDs the test started.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::{poll_until, repo_root, run_ok};

/// A binary of this workspace in the debug target directory.
pub fn bin(name: &str) -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target"));
    target.join("debug").join(name)
}

/// `cargo build --workspace --bins` (quietly; what is built already is not built again), the
/// same command `scripts/test.sh` runs before the lab tests. `packages` names the binaries the
/// caller needs; they are all built by the workspace build. A build of only those packages would
/// unify the dependencies' features differently, and cargo would build a second copy of every
/// dependency beside the first: on CI that filled the disk (blake3 and the hypervisor crate
/// failed with ENOSPC in the first lab test).
pub fn build(packages: &[&str]) -> Result<()> {
    debug_assert!(
        !packages.is_empty(),
        "name the packages whose binaries the caller runs"
    );
    let mut cmd = Command::new(env!("CARGO"));
    // Not the environment `cargo test` gave this test: with its LD_LIBRARY_PATH (and CARGO_*)
    // the build scripts' fingerprints change, so this build and the next `cargo test` rebuilt
    // ring, rustls, quinn and the workspace every time (~50 s per lab test file in CI).
    for (name, _) in std::env::vars_os() {
        let name = name.to_string_lossy();
        if name == "LD_LIBRARY_PATH"
            || (name.starts_with("CARGO_")
                && !matches!(
                    &*name,
                    "CARGO_HOME" | "CARGO_TARGET_DIR" | "CARGO_INCREMENTAL"
                ))
        {
            cmd.env_remove(&*name);
        }
    }
    cmd.current_dir(repo_root())
        .args(["build", "-q", "--workspace", "--bins"]);
    run_ok(&mut cmd)?;
    Ok(())
}

/// A local port free for both TCP and UDP at the time of asking (for listeners bound to
/// 127.0.0.1), never the same twice in one test process. It is taken below Linux's ephemeral
/// range (32768–60999): a port from that range (what binding port 0 gives) can be taken by any
/// process's outgoing connection before the daemon binds it, which once failed a manager's
/// metrics listener in CI ("Address already in use").
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU16, Ordering};
    const FIRST: u16 = 20_000;
    const COUNT: u16 = 12_000;
    // Spread test processes over the range; within one, count on.
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let start = (std::process::id() % u32::from(COUNT)) as u16;
    for _ in 0..COUNT {
        let offset = (start + NEXT.fetch_add(1, Ordering::Relaxed) % COUNT) % COUNT;
        let port = FIRST + offset;
        let free = std::net::TcpListener::bind(("127.0.0.1", port)).is_ok()
            && std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok();
        if free {
            return port;
        }
    }
    panic!("no free local port in {FIRST}..{}", FIRST + COUNT)
}

/// Spawns `cmd` with stdin closed and stdout and stderr appended to `log`.
pub fn spawn_logged(cmd: &mut Command, log: &Path) -> Result<Child> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("log file {}", log.display()))?;
    cmd.stdin(Stdio::null())
        .stdout(file.try_clone()?)
        .stderr(file)
        .spawn()
        .with_context(|| format!("cannot start {cmd:?}"))
}

/// A daemon's log file without terminal colour codes ("" if there is none yet).
pub fn log_text(path: &Path) -> String {
    let raw = std::fs::read_to_string(path).unwrap_or_default();
    let mut out = String::with_capacity(raw.len());
    let mut chars = raw.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for e in chars.by_ref() {
                if e == 'm' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Waits until `log` holds more than `seen` lines containing `needle` (a daemon started again
/// appends to the log of its predecessor).
pub fn wait_for_log(log: &Path, needle: &str, seen: usize, timeout: Duration) -> Result<()> {
    poll_until(
        &format!("{needle:?} in {}", log.display()),
        timeout,
        Duration::from_millis(50),
        || log_text(log).matches(needle).count() > seen,
    )
    .with_context(|| log_text(log))
}

/// The daemons a test started, by name; each is stopped on drop (SIGTERM, then SIGKILL after
/// 5 s), also when the test panics.
#[derive(Default)]
pub struct Daemons(Vec<(String, Child)>);

impl Daemons {
    /// Keeps `child` as `name`; a daemon of that name already ended is reaped.
    pub fn add(&mut self, name: &str, child: Child) {
        if let Some(i) = self.0.iter().position(|(n, _)| n == name) {
            let (_, mut old) = self.0.remove(i);
            let _ = old.wait();
        }
        self.0.push((name.to_owned(), child));
    }

    /// The PID of daemon `name`.
    pub fn pid(&self, name: &str) -> Option<u32> {
        self.0.iter().find(|(n, _)| n == name).map(|(_, c)| c.id())
    }

    /// Sends `signal` to daemon `name` and waits until it has ended.
    pub fn kill(&mut self, name: &str, signal: i32) -> Result<ExitStatus> {
        let i = self
            .0
            .iter()
            .position(|(n, _)| n == name)
            .with_context(|| format!("no daemon {name}"))?;
        let (_, mut child) = self.0.remove(i);
        signal_child(&child, signal);
        let status = child.wait()?;
        eprintln!("daemon {name} ended: {status}");
        Ok(status)
    }
}

impl Drop for Daemons {
    fn drop(&mut self) {
        for (name, child) in &mut self.0 {
            stop(name, child);
        }
    }
}

fn signal_child(child: &Child, signal: i32) {
    // SAFETY: kill(2) on the PID of a child we spawned and have not reaped yet.
    unsafe { libc::kill(child.id() as i32, signal) };
}

/// SIGTERM, then SIGKILL if `child` has not ended within 5 s.
fn stop(name: &str, child: &mut Child) {
    if let Ok(Some(_)) = child.try_wait() {
        return;
    }
    signal_child(child, libc::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        sleep(Duration::from_millis(50));
    }
    eprintln!("daemon {name} did not stop on SIGTERM; killing it");
    let _ = child.kill();
    let _ = child.wait();
}
