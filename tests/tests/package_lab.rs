//! Viola's Debian packages, installed as an administrator installs them (lab test; see
//! `docs/DEPLOY.md`, "What is tested"):
//!
//! - `scripts/package.sh` builds the five packages from the release build;
//! - `mmdebstrap` makes a throwaway Debian 12 root, where `apt-get install ./…deb` installs them
//!   with their dependencies, as on a real machine (the depot's `viola` user made by its
//!   `postinst`);
//! - each unit's files are where the unit says; systemd (installed in the root) verifies the
//!   units, and its security analysis rates each one "OK";
//! - in a network namespace of its own (prefix `vpk-`), the host enrolled as `docs/DEPLOY.md`
//!   says (`viola-ca enrol` makes its bundle, `viola-ca install` writes its overlay's, monitor's
//!   and depot's identities and configurations, and the manager's identity but not its
//!   configuration, saying to copy the example) and the manager configured from its packaged
//!   example as `install` says (addresses turned to the namespace's loopback), each unit's
//!   `ExecStart` runs as written (as the unit's `User`) in that root: every daemon comes up,
//!   the manager lists the hosts and sees the packaged monitor's host up, the overlay's and the
//!   depot's metrics answer, the dashboard answers; then each stops cleanly on SIGTERM
//!   ("stopped" in its log).
//!
//! What systemd itself would add (its sandboxing, its directories) is not exercised: the test
//! makes `/run/viola` and the units' state directories as systemd would.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Duration;

use viola_labtests::daemons::{log_text, spawn_logged};
use viola_labtests::{assert_tools, lab_tests_enabled, names, repo_root, run, run_ok, wait_until};

const NS: &str = "vpk-host";
const UNITS: [(&str, &str); 4] = [
    ("viola-adaptmgr", "adaptmgr"),
    ("viola-depot", "depot"),
    ("viola-overlay", "overlay"),
    ("viola-monitor", "monitor"),
];

/// Removes the namespace and stops what runs in it, also when the test fails.
struct Lab {
    units: Vec<(String, Child)>,
}

impl Drop for Lab {
    fn drop(&mut self) {
        for (_, child) in &mut self.units {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = run(Command::new("ip").args(["netns", "del", NS]));
    }
}

/// `sh -c SCRIPT` inside the Debian root (chroot), in the lab's network namespace.
fn in_root(root: &Path, script: &str) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", NS, "chroot"])
        .arg(root)
        .args(["sh", "-c", script]);
    c
}

/// The value of `key=` in a unit file.
fn unit_value(unit: &str, key: &str) -> Option<String> {
    unit.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}=")))
        .map(str::to_owned)
}

#[test]
fn the_packages_install_into_a_fresh_debian_and_their_units_start_the_daemons() {
    if !lab_tests_enabled() {
        return;
    }
    assert_tools(&["mmdebstrap", "dpkg-deb", "dpkg-shlibdeps", "unshare"]);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let debs = dir.join("debs");

    // The packages.
    let built = run_ok(
        Command::new(repo_root().join("scripts/package.sh"))
            .arg("--out")
            .arg(&debs),
    )
    .expect("scripts/package.sh");
    let packages: Vec<PathBuf> = built.lines().map(PathBuf::from).collect();
    assert_eq!(packages.len(), 5, "five packages: {built}");

    // A fresh Debian 12 with them installed by apt, dependencies resolved.
    let root = dir.join("root");
    let mut debstrap = Command::new("timeout");
    debstrap
        .args([
            "600",
            "mmdebstrap",
            "--variant=apt",
            "--include=ca-certificates,systemd",
        ])
        .arg("--customize-hook=mkdir -p \"$1/tmp/debs\"");
    let mut copy_in = String::from("--customize-hook=copy-in");
    for p in &packages {
        copy_in.push(' ');
        copy_in.push_str(p.to_str().unwrap());
    }
    copy_in.push_str(" /tmp/debs");
    debstrap
        .arg(copy_in)
        .arg("--customize-hook=chroot \"$1\" sh -c \"apt-get install -y /tmp/debs/*.deb\"")
        .arg("bookworm")
        .arg(&root);
    let log = dir.join("mmdebstrap.log");
    let status = spawn_logged(&mut debstrap, &log).unwrap().wait().unwrap();
    assert!(status.success(), "mmdebstrap: {}", log_text(&log));
    let passwd = std::fs::read_to_string(root.join("etc/passwd")).unwrap();
    assert!(
        passwd.lines().any(|l| l.starts_with("viola:")),
        "the depot's postinst made the viola user"
    );

    // Each unit: its binary and its example configuration are where it says.
    for (unit, role) in UNITS {
        let text = std::fs::read_to_string(root.join(format!("lib/systemd/system/{unit}.service")))
            .unwrap_or_else(|e| panic!("{unit}.service: {e}"));
        let exec = unit_value(&text, "ExecStart").expect("ExecStart");
        let binary = exec.split_whitespace().next().unwrap();
        assert!(
            root.join(binary.trim_start_matches('/')).exists(),
            "{unit}: {binary}"
        );
        assert!(
            exec.contains(&format!("/etc/viola/{role}.toml")),
            "{unit} reads /etc/viola/{role}.toml: {exec}"
        );
        assert!(
            root.join(format!("etc/viola/{role}.toml.example")).exists(),
            "{unit}'s example configuration"
        );
        assert_eq!(
            unit_value(&text, "ConditionPathExists").as_deref(),
            Some(format!("/etc/viola/{role}.toml").as_str())
        );
    }
    // systemd's own checks of the units, inside the root (systemd is installed there).
    let units: Vec<String> = UNITS
        .iter()
        .map(|(u, _)| format!("/lib/systemd/system/{u}.service"))
        .collect();
    let out = run(Command::new("chroot")
        .arg(&root)
        .args(["systemd-analyze", "verify"])
        .args(&units))
    .unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && said.trim().is_empty(),
        "systemd-analyze verify: {said}"
    );
    for unit in &units {
        let out = run_ok(Command::new("chroot").arg(&root).args([
            "systemd-analyze",
            "security",
            "--offline=yes",
            unit,
        ]))
        .unwrap();
        let verdict = out
            .lines()
            .find(|l| l.contains("Overall exposure level"))
            .unwrap_or_default()
            .to_owned();
        eprintln!("{verdict}");
        assert!(verdict.contains(" OK"), "{unit} is hardened: {verdict}");
    }

    // The network namespace the daemons run in.
    let _ = run(Command::new("ip").args(["netns", "del", NS]));
    run_ok(Command::new("ip").args(["netns", "add", NS])).unwrap();
    let mut lab = Lab { units: Vec::new() };
    run_ok(Command::new("ip").args(["-n", NS, "link", "set", "lo", "up"])).unwrap();

    // Certificates as DEPLOY.md makes them, with the packaged viola-ca; the manager's
    // configuration from its packaged example as `install` says, addresses turned to this
    // namespace's loopback.
    let setup = r#"set -e
        fail() { echo "$*" >&2; exit 1; }
        viola-ca init --ca-dir /root/viola-ca --name example-federation
        viola-ca enrol --ca-dir /root/viola-ca --site a --host a1 --manager 127.0.0.1:7443 \
          --peer 127.0.0.2:4500 --libvirt-address 127.0.0.1 \
          --depot-peer b=127.0.0.2:7410 \
          --manager-address 127.0.0.1 --out /root/a1.bundle
        viola-ca install --bundle /root/a1.bundle >/root/install.out
        # The manager's identity came with the bundle; its configuration is left to the
        # administrator, who is told how to make it.
        test "$(stat -c %a /etc/viola/adaptmgr/key.pem)" = 600 || fail "adaptmgr/key.pem not 0600"
        test "$(viola-ca show /etc/viola/adaptmgr/cert.pem)" = viola://adaptmgr/a/a1 \
          || fail "adaptmgr/cert.pem: $(viola-ca show /etc/viola/adaptmgr/cert.pem)"
        test ! -e /etc/viola/adaptmgr.toml || fail "install wrote adaptmgr.toml"
        grep -qF 'cp /etc/viola/adaptmgr.toml.example /etc/viola/adaptmgr.toml' /root/install.out \
          || fail "install did not say how to configure the manager: $(cat /root/install.out)"
        # The host's libvirt and QEMU certificates came with the bundle, where they read them.
        for f in CA/cacert.pem libvirt/servercert.pem libvirt/private/serverkey.pem \
            qemu/server-cert.pem qemu/client-key.pem; do
          test -s /etc/pki/$f || { echo "install left no /etc/pki/$f" >&2; exit 1; }
        done
        # The host's own depot: it lays images down for this host only, in its own directory.
        grep -qx 'hosts = \["a1"\]' /etc/viola/depot.toml &&
          grep -qx 'image_dir_template = "/var/lib/viola/images"' /etc/viola/depot.toml ||
          fail "the host's depot would write other hosts' images: $(cat /etc/viola/depot.toml)"
        chown -R viola: /etc/viola/depot
        viola-ca issue --ca-dir /root/viola-ca --role cli --site a --host operator --out /root/operator
        sed -e 's/192\.0\.2\.[0-9]*/127.0.0.1/g' -e 's/198\.51\.100\.[0-9]*/127.0.0.1/g' \
            -e 's/^addr = "127\.0\.0\.1:/addr = "127.0.0.2:/' \
            /etc/viola/adaptmgr.toml.example >/etc/viola/adaptmgr.toml
        # What systemd makes for the units: RuntimeDirectory, StateDirectory.
        mkdir -p /run/viola /var/lib/viola/overlay /var/lib/viola/adaptmgr
        install -d -o viola -g viola /var/lib/viola/depot
    "#;
    let out = run(&mut in_root(&root, setup)).unwrap();
    assert!(
        out.status.success(),
        "setup in the root: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Each unit's ExecStart, as its User, in the root; /dev and /proc mounted for it in a mount
    // namespace of its own (gone with it).
    for (unit, role) in UNITS {
        let text = std::fs::read_to_string(root.join(format!("lib/systemd/system/{unit}.service")))
            .unwrap();
        let exec = unit_value(&text, "ExecStart").unwrap();
        let as_user = unit_value(&text, "User")
            .map(|u| format!("setpriv --reuid={u} --regid={u} --init-groups "))
            .unwrap_or_default();
        let script = format!(
            "mount --rbind /dev '{r}/dev' && mount -t proc proc '{r}/proc' && \
             exec ip netns exec {NS} chroot '{r}' env RUST_LOG=info {as_user}{exec}",
            r = root.display()
        );
        let mut cmd = Command::new("unshare");
        cmd.args([
            "--mount",
            "--propagation",
            "private",
            "--fork",
            "--kill-child=TERM",
        ])
        .args(["sh", "-c", &script]);
        let child = spawn_logged(&mut cmd, &dir.join(format!("{role}.log"))).unwrap();
        lab.units.push((role.to_owned(), child));
    }
    let log = |role: &str| log_text(&dir.join(format!("{role}.log")));
    for (role, needle) in [
        ("adaptmgr", "viola-adaptmgr running"),
        ("monitor", "viola-monitor running"),
        ("depot", "depot serving"),
        ("overlay", "QUIC endpoint listening"),
    ] {
        wait_until(&format!("{role} starts"), Duration::from_secs(30), || {
            log(role).contains(needle)
        })
        .unwrap_or_else(|e| panic!("{e}\n{role}'s log:\n{}", log(role)));
    }

    // The manager answers the packaged CLI and sees the monitor's host up.
    let hosts = || {
        run(&mut in_root(
            &root,
            "viola --manager 127.0.0.1:7443 --identity /root/operator --json host list",
        ))
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| serde_json::from_slice::<serde_json::Value>(&o.stdout).ok())
    };
    wait_until(
        "the monitor's host a1 is up",
        Duration::from_secs(30),
        || {
            hosts().is_some_and(|h| {
                h.as_array()
                    .is_some_and(|a| a.iter().any(|h| h["name"] == "a1" && h["state"] == "up"))
            })
        },
    )
    .unwrap_or_else(|e| {
        panic!(
            "{e}\nhosts: {:?}\nmanager:\n{}\nmonitor:\n{}",
            hosts(),
            log("adaptmgr"),
            log("monitor")
        )
    });
    let listed = hosts().unwrap();
    assert_eq!(names(&listed), ["a1", "b1"], "the example's two hosts");

    // Metrics of every daemon, and the dashboard, from inside the namespace.
    for (what, url) in [
        ("manager", "http://127.0.0.1:9443/metrics"),
        ("monitor", "http://127.0.0.1:9444/metrics"),
        ("overlay", "http://127.0.0.1:9445/metrics"),
        ("depot", "http://127.0.0.1:9446/metrics"),
    ] {
        let body =
            run_ok(Command::new("ip").args(["netns", "exec", NS, "curl", "-sf", "-m", "5", url]))
                .unwrap_or_else(|e| panic!("{what}'s metrics at {url}: {e}"));
        assert!(body.contains("viola_"), "{what}'s metrics: {body}");
    }
    let pem = |p: &str| root.join("root").join(p).display().to_string();
    let code = run_ok(Command::new("ip").args([
        "netns",
        "exec",
        NS,
        "curl",
        "-s",
        "-m",
        "5",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "--cacert",
        &pem("viola-ca/ca.pem"),
        "--cert",
        &pem("operator/cert.pem"),
        "--key",
        &pem("operator/key.pem"),
        "https://127.0.0.1:8443/api/v1/overview",
    ]))
    .unwrap_or_default();
    assert_eq!(code, "200", "the dashboard answers the operator");

    // SIGTERM to each: a clean stop.
    for (role, child) in &mut lab.units {
        let pid = child.id();
        // The daemon is the process the shell exec'd into, the child of unshare.
        let daemon =
            run_ok(Command::new("pgrep").args(["-P", &pid.to_string()])).unwrap_or_default();
        let daemon = daemon.trim();
        assert!(!daemon.is_empty(), "{role}'s daemon process");
        run_ok(Command::new("kill").args(["-TERM", daemon])).unwrap();
        let start = std::time::Instant::now();
        while child.try_wait().unwrap().is_none() && start.elapsed() < Duration::from_secs(15) {
            std::thread::sleep(Duration::from_millis(100));
        }
        assert!(
            child.try_wait().unwrap().is_some(),
            "{role} stops within 15 s of SIGTERM"
        );
        let text = log_text(&dir.join(format!("{role}.log")));
        assert!(text.contains("stopped"), "{role} stopped cleanly:\n{text}");
    }
}
