//! Lab: migrations are encrypted and authenticated.
//!
//! The lab's libvirtds listen only with TLS, with certificates the lab's CA issued
//! (`viola-ca issue-libvirt`), and their QEMUs refuse migrations without TLS. Shown here: a
//! guest's marker, in its memory and on its disk, never appears in a capture of the WAN link
//! while the guest moves across it; a host whose certificate comes from another CA cannot
//! receive a migration, nor can a host whose certificate the federation revoked, and a revoked
//! host cannot send one, nor connect to a libvirtd told to read its CRL again (`viola-ca
//! install-crl --reload-libvirtd`); a renewed certificate is served without a restart; there is
//! no plain TCP listener. The ignored test measures what TLS
//! costs against a plain migration (on a lab brought up with `--allow-plain-migration`), where
//! the same capture does show the marker.
// lab: default

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use viola_adaptmgr::migration::plan::{Action, Step};
use viola_adaptmgr::migration::testing::{RecordingAnnouncer, assert_rolled_back_clean};
use viola_adaptmgr::migration::{MigrationPlan, MigrationStatus, Outcome, run_migration_detailed};
use viola_hypervisor::StorageCopy;
use viola_labtests::mech::*;
use viola_labtests::{daemons, pki::Pki, run};

/// A lab migration, encrypted or not as `tls` says.
fn plan(vm: &str, from: &str, to: &str, tls: bool) -> MigrationPlan {
    // Above the WAN's rate: the link sets the pace.
    let mut plan = migration_plan(vm, from, to, 100);
    plan.tuning.tls = tls;
    plan
}

/// A marker no earlier run left anywhere (letters and digits, as the guest's CGI wants).
fn marker_word() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("violatls{nanos:x}{:x}", std::process::id())
}

/// Boots guest `name` at `ip` on a1 (a bridge of its own on a1 and on `dest`, so the guest's
/// own traffic never crosses the WAN), with `dest` holding the base already; writes a fresh
/// marker to its disk (and so its page cache) and 8 MiB more data. Returns the marker.
fn boot_with_marker(name: &str, ip: &str, subnet: &str, dest: &str) -> String {
    make_bridge("a1", &format!("{subnet}.1/24"));
    make_bridge(dest, &format!("{subnet}.3/24"));
    stage_base(dest);
    boot_guest(
        &open("a1"),
        "a1",
        name,
        &format!("{ip}/24"),
        "vm-br0",
        1,
        256,
    );
    wait_guest("a1", ip, Duration::from_secs(180));
    let word = marker_word();
    write_marker("a1", ip, &word);
    guest_http("a1", ip, "diskwrite=8").expect("diskwrite");
    word
}

/// tcpdump on the router's link toward site b, which every packet between the sites' hosts
/// crosses, into a file of its own; bounded by `timeout` in case the test never stops it.
struct Capture {
    tcpdump: Child,
    dir: tempfile::TempDir,
}

impl Capture {
    fn start() -> Self {
        let dir = tempfile::tempdir().expect("capture dir");
        let log = File::create(dir.path().join("tcpdump.log")).expect("tcpdump log");
        // `lab.sh exec rtr` execs into `ip netns exec`, which execs `timeout`: the child is
        // `timeout`, which passes a TERM on to tcpdump. Root keeps writing the file (tcpdump
        // would otherwise switch to its own user).
        let tcpdump = lab()
            .cmd("rtr", "timeout")
            .args([
                "300", "tcpdump", "-i", "wan-b", "-n", "-U", "-Z", "root", "-w",
            ])
            .arg(Self::path_in(dir.path()))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start tcpdump");
        let capture = Self { tcpdump, dir };
        // tcpdump writes the file's header once it captures.
        wait_until("tcpdump to capture", Duration::from_secs(10), || {
            std::fs::metadata(capture.path()).is_ok_and(|m| m.len() >= 24)
        });
        capture
    }

    fn path_in(dir: &Path) -> PathBuf {
        dir.join("wan-b.pcap")
    }

    fn path(&self) -> PathBuf {
        Self::path_in(self.dir.path())
    }

    /// Stops tcpdump; the capture's size in bytes.
    fn stop(&mut self) -> u64 {
        let stopped = Command::new("kill")
            .args(["-TERM", &self.tcpdump.id().to_string()])
            .status();
        assert!(stopped.is_ok_and(|s| s.success()), "stop tcpdump");
        self.tcpdump.wait().expect("tcpdump exits");
        std::fs::metadata(self.path()).map_or(0, |m| m.len())
    }

    /// Whether `word` appears anywhere in the captured bytes.
    fn contains(&self, word: &str) -> bool {
        let out = run(Command::new("grep")
            .args(["-q", "-a", "-F", "-e", word])
            .arg(self.path()))
        .expect("grep");
        match out.status.code() {
            Some(0) => true,
            Some(1) => false,
            _ => panic!("grep failed: {}", String::from_utf8_lossy(&out.stderr)),
        }
    }

    /// Whether any captured packet matches the tcpdump `filter`.
    fn has(&self, filter: &str) -> bool {
        let out = run(Command::new("tcpdump")
            .args(["-n", "-c", "1", "-r"])
            .arg(self.path())
            .arg(filter))
        .expect("tcpdump -r");
        !out.stdout.is_empty()
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        // After a panic: the one PID this capture started; nothing if it has exited already.
        if matches!(self.tcpdump.try_wait(), Ok(None)) {
            let _ = self.tcpdump.kill();
            let _ = self.tcpdump.wait();
        }
    }
}

/// One migration of `name` under a capture of the WAN link.
struct Measured {
    run: viola_adaptmgr::migration::MigrationRun,
    capture: Capture,
    captured_bytes: u64,
    wall: Duration,
}

async fn migrate_captured(name: &str, from: &str, to: &str, tls: bool) -> Measured {
    let mut capture = Capture::start();
    let (tx, _rx) = watch::channel(MigrationStatus::default());
    let start = Instant::now();
    let run = run_migration_detailed(
        plan(name, from, to, tls),
        &migration_deps(&[from, to], RecordingAnnouncer::default()),
        &tx,
        &CancellationToken::new(),
    )
    .await;
    let wall = start.elapsed();
    let captured_bytes = capture.stop();
    eprintln!("{}", serde_json::to_string_pretty(&run.report).unwrap());
    eprintln!("{from} -> {to} (tls: {tls}): {captured_bytes} bytes captured on the WAN link");
    assert_eq!(
        run.report.outcome,
        Outcome::Migrated {
            storage: StorageCopy::Incremental
        },
        "{from} -> {to} (tls: {tls})"
    );
    Measured {
        run,
        capture,
        captured_bytes,
        wall,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cross_site_move_never_shows_the_guest_s_data_on_the_wan() {
    let name = "vm-tls";
    let ip = "10.77.5.5";
    let _cleanup = begin(&["a1", "b1"], name);
    let word = boot_with_marker(name, ip, "10.77.5", "b1");

    let m = migrate_captured(name, "a1", "b1", true).await;

    // The capture holds the migration (RAM and disk copy, > 10 MB) and the libvirtds' TLS
    // session, and not the marker anywhere.
    assert!(
        m.captured_bytes > 10 << 20,
        "only {} bytes captured: the check would pass vacuously",
        m.captured_bytes
    );
    assert!(m.capture.has("tcp port 16514"), "no libvirt TLS session");
    assert!(!m.capture.has("tcp port 16509"), "plain libvirt traffic");
    assert!(
        !m.capture.contains(&word),
        "the marker crossed the WAN in the clear"
    );

    // The guest runs at b1 only, with its marker.
    assert!(open("a1").domain(name).unwrap().is_none(), "copy at a1");
    assert!(open("b1").domain(name).unwrap().is_some());
    assert_eq!(
        guest_http("b1", ip, "marker-read").as_deref(),
        Some(word.as_str()),
        "guest console:\n{}",
        console_tail(name, 15)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_whose_certificate_is_not_from_the_federation_ca_cannot_receive_a_migration() {
    let name = "vm-rogue";
    let ip = "10.77.6.5";
    let mut cleanup = begin(&["a1", "b2"], name);
    // b2 gets its certificates from another CA, and trusts only that one: a machine outside the
    // federation with the right names. Afterwards it is given the lab CA's again.
    daemons::build(&["viola-common"]).expect("build viola-ca");
    let rogue = tempfile::tempdir().expect("rogue CA dir");
    let rogue_ca = rogue.path().join("ca");
    Pki::init(&rogue_ca).expect("rogue CA");
    cleanup.first(|| issue_libvirt_certs("b2", None));
    issue_libvirt_certs("b2", Some(&rogue_ca));
    boot_with_marker(name, ip, "10.77.6", "b2");
    // Refused in the TLS handshake.
    migration_to_b2_is_refused(name, ip, |why| why.contains("certificate")).await;
}

/// Migrates `name` (at `ip` on a1) to b2 over TLS and checks that the migration step failed
/// for a reason `why` accepts (lower case), and was rolled back: the guest runs at a1 only,
/// answers there, and nothing of it is left at b2.
async fn migration_to_b2_is_refused(name: &str, ip: &str, why: impl Fn(&str) -> bool) {
    let announcer = RecordingAnnouncer::default();
    let d = migration_deps(&["a1", "b2"], announcer.clone());
    let (tx, _rx) = watch::channel(MigrationStatus::default());
    let run = run_migration_detailed(
        plan(name, "a1", "b2", true),
        &d,
        &tx,
        &CancellationToken::new(),
    )
    .await;
    eprintln!("{}", serde_json::to_string_pretty(&run.report).unwrap());
    assert_rolled_back_clean(
        &run,
        open("a1").as_ref(),
        open("b2").as_ref(),
        &announcer,
        |f| {
            f.action == Action::Run(Step::Migrate)
                && why(&viola_common::errors::chain(&f.error).to_lowercase())
        },
    );
    wait_guest("a1", ip, Duration::from_secs(30));
    assert!(
        !local_images("b2").join(format!("{name}.qcow2")).exists(),
        "overlay left at b2"
    );
}

/// The lab CA revokes the libvirt certificates of host `revoked` (site, host), and host `crl_at`
/// gets the CRL where its libvirt and QEMU read it. At cleanup `crl_at` forgets the CRL and
/// `revoked` gets a new certificate (a new key, so a serial the CRL does not list).
fn revoke_libvirt_certs(
    cleanup: &mut Cleanup,
    (site, revoked): (&str, &'static str),
    crl_at: &'static str,
) {
    daemons::build(&["viola-common"]).expect("build viola-ca");
    let pki_dir = move || lab_dir().join(format!("hosts/{crl_at}/pki"));
    cleanup.first(move || {
        for rel in viola_common::identity::libvirt::CRL_LAYOUT {
            let _ = std::fs::remove_file(pki_dir().join(rel));
        }
        issue_libvirt_certs(revoked, None);
    });
    let pki = Pki::open(&lab_dir().join("pki/ca"));
    let crl = pki
        .revoke(&format!("viola://libvirt/{site}/{revoked}"))
        .expect("viola-ca revoke");
    Pki::install_libvirt_crl(&crl, &pki_dir()).expect("viola-ca install-crl --pki");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_host_cannot_receive_a_migration() {
    let name = "vm-revoked";
    let ip = "10.77.7.5";
    let mut cleanup = begin(&["a1", "b2"], name);
    let libvirtd_log = lab_dir().join("hosts/a1/log/libvirtd.log");
    let revocations_logged = || {
        std::fs::read_to_string(&libvirtd_log)
            .unwrap_or_default()
            .matches("has been revoked")
            .count()
    };
    let logged_before = revocations_logged();
    // b2 leaves the federation; a1 gets the CRL.
    revoke_libvirt_certs(&mut cleanup, ("b", "b2"), "a1");
    boot_with_marker(name, ip, "10.77.7", "b2");
    // a1's libvirtd refuses b2's certificate when it connects.
    migration_to_b2_is_refused(name, ip, |why| {
        why.contains("revoked") || why.contains("certificate")
    })
    .await;
    // Refused for the revocation, not for anything else about the certificate.
    assert!(
        revocations_logged() > logged_before,
        "a1's libvirtd did not log b2's certificate as revoked ({})",
        libvirtd_log.display()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_host_cannot_send_a_migration() {
    let name = "vm-revoked-src";
    let ip = "10.77.8.5";
    let mut cleanup = begin(&["a1", "b2"], name);
    // a1 leaves the federation while it still runs a guest; b2 gets the CRL. b2's libvirtd read
    // its CRL when it started, so it still lets a1's libvirtd in; b2's QEMU reads it when it
    // listens for the incoming migration, and must refuse a1's QEMU.
    revoke_libvirt_certs(&mut cleanup, ("a", "a1"), "b2");
    let qemu_log = lab_dir().join(format!("hosts/b2/log/qemu/{name}.log"));
    boot_with_marker(name, ip, "10.77.8", "b2");
    migration_to_b2_is_refused(name, ip, |_| true).await;
    // Refused for the revocation, by the destination's QEMU.
    let log = std::fs::read_to_string(&qemu_log).unwrap_or_default();
    assert!(
        log.contains("revoked"),
        "b2's QEMU did not refuse a1's certificate as revoked ({}):\n{log}",
        qemu_log.display()
    );
}

#[test]
fn a_libvirtd_told_to_reload_refuses_a_revoked_client_at_once() {
    let mut cleanup = begin(&["a1", "b2"], "vm-none");
    let a1 = peer_uri("a1");
    let b2_connects = || lab_exec_status("b2", &["virsh", "-c", &a1, "uri"]);
    assert!(b2_connects(), "b2 cannot reach a1's libvirtd to begin with");
    // b2 leaves the federation; a1 gets the CRL where libvirt reads it. a1's listener read its
    // CRL when it started, so it still lets b2 in.
    revoke_libvirt_certs(&mut cleanup, ("b", "b2"), "a1");
    assert!(
        b2_connects(),
        "a1's listener already refuses b2 without a reload: the reload is no longer needed"
    );
    // On a1, as DEPLOY.md says: the CRL again, and libvirtd told to read its TLS files.
    let crl = lab_dir().join("pki/ca/crl.pem");
    let said = lab_exec(
        "a1",
        &[
            daemons::bin("viola-ca").to_str().unwrap(),
            "install-crl",
            "--crl",
            crl.to_str().unwrap(),
            "--pki",
            "/etc/pki",
            "--reload-libvirtd",
        ],
    );
    assert!(
        said.contains("libvirtd reads its TLS files again"),
        "{said}"
    );
    assert!(
        !b2_connects(),
        "a1's libvirtd lets revoked b2 in after the reload"
    );
}

/// The serial of the certificate `host`'s libvirtd presents, as host `from` sees it.
fn served_serial(from: &str, host: &str) -> String {
    lab_exec(
        from,
        &[
            "sh",
            "-c",
            &format!(
                "openssl s_client -connect {}:16514 -cert /etc/pki/libvirt/clientcert.pem \
                 -key /etc/pki/libvirt/private/clientkey.pem </dev/null 2>/dev/null | \
                 openssl x509 -noout -serial",
                address(host)
            ),
        ],
    )
    .trim()
    .to_owned()
}

#[test]
fn a_renewed_libvirt_certificate_is_served_without_a_restart() {
    let _cleanup = begin(&["a1", "b1"], "vm-none");
    let pid_file = lab_dir().join("hosts/b1/libvirtd.pid");
    let pid = || std::fs::read_to_string(&pid_file).unwrap();
    let (pid_before, served_before) = (pid(), served_serial("a1", "b1"));
    assert!(served_before.starts_with("serial="), "{served_before}");
    // A new key and certificate in b1's /etc/pki, and libvirtd told to read them.
    issue_libvirt_certs("b1", None);
    let new_serial = Command::new("openssl")
        .args(["x509", "-noout", "-serial", "-in"])
        .arg(lab_dir().join("hosts/b1/pki/libvirt/servercert.pem"))
        .output()
        .unwrap();
    let new_serial = String::from_utf8_lossy(&new_serial.stdout)
        .trim()
        .to_owned();
    assert_ne!(new_serial, served_before, "no new certificate was issued");
    assert_eq!(
        served_serial("a1", "b1"),
        new_serial,
        "b1 still serves its old certificate"
    );
    assert_eq!(pid(), pid_before, "b1's libvirtd was restarted");
    assert!(lab_exec_status(
        "a1",
        &["virsh", "-c", &peer_uri("b1"), "uri"]
    ));
}

#[test]
fn libvirtds_listen_with_tls_only() {
    let _cleanup = begin(&["a1", "b1"], "vm-none");
    let b1 = address("b1");
    // With the lab CA's client certificate in a1's /etc/pki, over TLS.
    assert!(lab_exec_status(
        "a1",
        &["virsh", "-c", &peer_uri("b1"), "uri"]
    ));
    // No plain TCP listener.
    let tcp = format!("qemu+tcp://{b1}/system");
    assert!(!lab_exec_status("a1", &["virsh", "-c", &tcp, "uri"]));
    let listening = lab_exec("b1", &["ss", "-ltnH"]);
    assert!(listening.contains(&format!("{b1}:16514")), "{listening}");
    assert!(!listening.contains(":16509"), "{listening}");
}

/// What TLS costs: the same guest moved a1 → b1 → a1 → b1 → a1, with TLS, without, without,
/// with (each mode once in each direction), its marker in the capture exactly when the
/// migration is plain. Needs a lab whose QEMUs take plain migrations:
///
/// ```text
/// VIOLA_LAB=tls scripts/lab.sh up --allow-plain-migration
/// VIOLA_LAB=tls cargo test -p viola-labtests --test mech_migrate_tls -- --ignored --nocapture
/// VIOLA_LAB=tls scripts/lab.sh down
/// ```
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement: needs a lab brought up with --allow-plain-migration"]
async fn tls_against_plain_migration() {
    assert!(
        lab().status.plain_migration_allowed,
        "bring the lab up with `scripts/lab.sh up --allow-plain-migration`"
    );
    let name = "vm-tlsm";
    let ip = "10.77.7.5";
    let _cleanup = begin(&["a1", "b1"], name);
    stage_base("a1");
    let word = boot_with_marker(name, ip, "10.77.7", "b1");
    let mut rows = Vec::new();
    for (from, to, tls) in [
        ("a1", "b1", true),
        ("b1", "a1", false),
        ("a1", "b1", false),
        ("b1", "a1", true),
    ] {
        let m = migrate_captured(name, from, to, tls).await;
        assert_eq!(
            m.capture.contains(&word),
            !tls,
            "{from} -> {to} (tls: {tls}): the marker must show exactly in the clear"
        );
        wait_guest(to, ip, Duration::from_secs(30));
        let completed = m.run.report.completed.clone().unwrap_or_default();
        rows.push(format!(
            "{from} -> {to} {:<5} total {:>6} ms (libvirt job {:>6} ms), downtime {:>4} ms, WAN capture {:>5.1} MB",
            if tls { "tls" } else { "plain" },
            m.wall.as_millis(),
            completed.time_elapsed_ms,
            completed.downtime_ms.unwrap_or_default(),
            m.captured_bytes as f64 / 1e6
        ));
    }
    eprintln!("\n{}", rows.join("\n"));
}
