//! A scientist's cluster on the lab (lab test, lab `vlc`): the MPI guest (Debian with MPICH
//! and OpenSSH, `scripts/guest/mpi-image.sh`) imported into site a's depot as two layers,
//! two VMs made from it with the CLI on one violin, one per site, each with the user's SSH
//! key, and the host file from `viola violin hostfile`; MPI jobs (`mpiexec -launcher ssh`) run
//! across them, and the two-phase NEMO3D-shaped job (`mpi-nemo --verify`) ends with the correct
//! result while one of its ranks is live-migrated to the other site, with an SSH session to
//! that rank open throughout.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use viola_labtests::daemons::log_text;
use viola_labtests::lifecycle::{
    Fed, console_ready_ip, output_text as text, spawn_manager, ssh, ssh_keygen,
};
use viola_labtests::{lab_tests_enabled, progress, run, run_ok, wait_until};

/// The MPI guest's top layer (its backing file is the OS layer beside it).
fn mpi_image() -> PathBuf {
    std::env::var_os("VIOLA_MPI_GUEST_DIR")
        .map_or_else(
            || PathBuf::from("/var/cache/viola/guest-mpi"),
            PathBuf::from,
        )
        .join("mpi.qcow2")
}

/// Bound of a quick command on a rank (a login, `hostname` on both ranks, a short ring).
const SHORT: Duration = Duration::from_secs(120);
/// Bound of the job that spans a migration (about 30 s here).
const ACROSS_MOVE: Duration = Duration::from_secs(150);
/// Bound of a benchmark phase (minutes when capped).
const LONG: Duration = Duration::from_secs(900);

/// `mpiexec` of `program` on both ranks (launched from rank0 over SSH), which Hydra ends after
/// `limit` (less a margin for the SSH session around it) if it has not ended by then.
fn mpiexec(program: &str, limit: Duration) -> String {
    format!(
        "MPIEXEC_TIMEOUT={} mpiexec -launcher ssh -f /root/hosts -n 2 {program}",
        limit.as_secs().saturating_sub(15).max(5)
    )
}

/// What the scientist's machine (a2) reaches of the ranks, and the manager's last words: the
/// explanation a failed job's assertion carries.
fn reachability(fed: &Fed, ranks: &[(&'static str, String, String)]) -> String {
    let mut report = String::new();
    for (name, host, ip) in ranks {
        let pinged = run(Command::new("ip").args([
            "netns",
            "exec",
            &fed.ns("a2"),
            "ping",
            "-c",
            "3",
            "-i",
            "0.3",
            "-W",
            "1",
            ip,
        ]))
        .map(|o| text(&o))
        .unwrap_or_else(|e| e.to_string());
        let summary = pinged
            .lines()
            .find(|l| l.contains("packets transmitted"))
            .unwrap_or("no ping summary");
        report.push_str(&format!(
            "{name} ({ip}, was placed at {host}; now at {:?}): {summary}\n",
            ["a1", "a2", "b1", "b2"]
                .into_iter()
                .find(|h| fed.lab.domain_state(h, name).as_deref() == Some("running"))
        ));
    }
    let log = log_text(&fed.mgr_log);
    let tail: Vec<&str> = log.lines().rev().take(20).collect();
    report.push_str("manager log (last lines):\n");
    for line in tail.into_iter().rev() {
        report.push_str(line);
        report.push('\n');
    }
    report
}

/// `script`'s output on each rank (over SSH from `ns`), headed by the rank's name.
fn on_each_rank(
    ns: &str,
    key: &Path,
    ranks: &[(&'static str, String, String)],
    script: &str,
) -> String {
    let mut report = String::new();
    for (name, _, ip) in ranks {
        let out = ssh(ns, key, ip, script, None, Duration::from_secs(30));
        report.push_str(&format!(
            "--- {name} ({ip}): {}\n{}\n",
            out.status,
            text(&out)
        ));
    }
    report
}

/// Each rank's TCP sockets with their timers and counters, its TCP statistics and its last
/// kernel messages: what a failed job across a move left behind inside the guests.
fn guest_sockets(ns: &str, key: &Path, ranks: &[(&'static str, String, String)]) -> String {
    on_each_rank(
        ns,
        key,
        ranks,
        "ss -tnoi; grep Tcp: /proc/net/snmp; grep TcpExt: /proc/net/netstat; dmesg | tail -n 20",
    )
}

/// Each rank's processes with what they wait in, and their TCP sockets with their owners.
fn guest_processes(ns: &str, key: &Path, ranks: &[(&'static str, String, String)]) -> String {
    on_each_rank(
        ns,
        key,
        ranks,
        "ps -eo pid,ppid,stat,wchan:24,etime,args | grep -v ' \\[' ; ss -tnpoi; \
         for p in $(pgrep -f 'hydra|mpi-nemo'); do echo \"== $p\"; cat /proc/$p/stack 2>/dev/null; \
         ls -l /proc/$p/fd 2>/dev/null | grep -c socket; done",
    )
}

/// Two VMs of the MPI image on violin "hpc", rank0 at site a and rank1 at site b, made with
/// the CLI and the user's new SSH key; host a2 joins the violin; rank0 holds the key and
/// knows rank1, so it can launch jobs (`/root/hosts`).
struct Cluster {
    key: PathBuf,
    /// (name, host, address) of rank0 and rank1.
    ranks: Vec<(&'static str, String, String)>,
}

fn two_rank_cluster(fed: &Fed) -> Cluster {
    let a2 = fed.ns("a2");
    // The scientist's machine: host a2, on the violin from an address no VM holds.
    fed.violin_joined_by_a2("hpc");
    let key = fed.dir().join("id_ed25519");
    ssh_keygen(&key, Some("scientist@lab"));
    let pubkey = key.with_extension("pub");
    let started = Instant::now();
    let mut ranks = Vec::new();
    for (name, site) in [("rank0", "a"), ("rank1", "b")] {
        let made = fed
            .cli
            .vm_create(
                name,
                "hpc",
                "mpi",
                &[
                    "--site",
                    site,
                    "--memory-mib",
                    "512",
                    "--ready-by",
                    "300",
                    "--ssh-key",
                    pubkey.to_str().unwrap(),
                ],
            )
            .unwrap_or_else(|e| panic!("vm create {name}: {e}\n{}", log_text(&fed.mgr_log)));
        let host = made[0]["host"].as_str().unwrap().to_owned();
        let ip = made[0]["ip"].as_str().unwrap().to_owned();
        ranks.push((name, host, ip));
    }
    for (name, host, ip) in &ranks {
        wait_until(
            &format!("{name} at {host} is up at {ip}"),
            Duration::from_secs(240),
            || console_ready_ip(&fed.console, name).is_some_and(|got| &got == ip),
        )
        .unwrap_or_else(|e| {
            panic!(
                "{e}; console: {:?}",
                std::fs::read_to_string(fed.console.join(format!("{name}.log")))
            )
        });
        progress(&format!(
            "{name} at {host} ready at {ip} {:.1} s after the first create",
            started.elapsed().as_secs_f64()
        ));
    }
    let (ip0, ip1) = (&ranks[0].2, &ranks[1].2);
    // The violin's host files, as a scientist gets them.
    let hydra = run_ok(&mut fed.cli.cmd(&["violin", "hostfile", "hpc"])).unwrap();
    assert_eq!(hydra, format!("{ip0}:1\n{ip1}:1\n"));
    let pairs = run_ok(
        &mut fed
            .cli
            .cmd(&["violin", "hostfile", "hpc", "--format", "pairs"]),
    )
    .unwrap();
    assert_eq!(pairs, format!("rank0={ip0}\nrank1={ip1}\n"));

    // rank0 launches the job: it gets the key rank1 accepts and knows rank1's host key.
    let out = ssh(
        &a2,
        &key,
        ip0,
        "umask 077 && cat >/root/.ssh/id_ed25519",
        Some(&std::fs::read_to_string(&key).unwrap()),
        SHORT,
    );
    assert!(out.status.success(), "key to rank0: {}", text(&out));
    let out = ssh(
        &a2,
        &key,
        ip0,
        &format!(
            "viola-hosts {}",
            pairs.lines().collect::<Vec<_>>().join(" ")
        ),
        None,
        SHORT,
    );
    assert!(out.status.success(), "viola-hosts: {}", text(&out));
    Cluster { key, ranks }
}

#[test]
fn an_mpi_job_runs_across_sites_and_keeps_running_while_a_rank_moves_between_them() {
    if !lab_tests_enabled() {
        return;
    }
    let image = mpi_image();
    assert!(
        image.exists(),
        "{} missing: run scripts/guest/mpi-image.sh (scripts/setup.sh does)",
        image.display()
    );
    let fed = Fed::up(&[("mpi", &image)]);
    let cli = &fed.cli;
    let a2 = fed.ns("a2");

    // The image is two layers at site a: the OS and MPI on it.
    let images = cli.json(&["image", "list"]).unwrap();
    let mpi = images
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["name"] == "mpi")
        .unwrap_or_else(|| panic!("mpi not listed: {images}"));
    assert_eq!(mpi["parts"], 2, "{mpi}");
    assert_eq!(mpi["sites"], serde_json::json!(["a"]), "{mpi}");

    let Cluster { key, ranks } = two_rank_cluster(&fed);
    let ip0 = ranks[0].2.clone();
    let out = ssh(&a2, &key, &ip0, &mpiexec("hostname", SHORT), None, SHORT);
    let names = text(&out);
    assert!(
        out.status.success() && names.contains("rank0") && names.contains("rank1"),
        "mpiexec hostname ({}): {names}\n{}",
        out.status,
        reachability(&fed, &ranks)
    );
    progress("mpiexec across the sites: both ranks answered");
    let out = ssh(
        &a2,
        &key,
        &ip0,
        &mpiexec("/usr/local/bin/mpi-ring 100", SHORT),
        None,
        SHORT,
    );
    let before = text(&out);
    assert!(
        before.contains("ring ok ranks=2"),
        "ring ({}): {before}\n{}",
        out.status,
        reachability(&fed, &ranks)
    );
    progress(&format!("ring across sites: {}", before.trim()));

    // The NEMO3D-shaped job (CI size) while rank1 moves to site a; `VIOLA_MPI_MOVES` (default
    // 1) rounds, rank1 going back and forth, to soak the path a scientist depends on.
    let rounds: usize = std::env::var("VIOLA_MPI_MOVES")
        .ok()
        .map_or(1, |v| v.parse().expect("VIOLA_MPI_MOVES: a number"));
    let there = if ranks[0].1 == "a1" { "a2" } else { "a1" };
    let mut at = ranks[1].1.clone();
    for round in 1..=rounds {
        let to = if at == there {
            ranks[1].1.as_str()
        } else {
            there
        };
        job_across_move(&fed, &key, &ranks, &at, to);
        progress(&format!("round {round}/{rounds} done"));
        at = to.to_owned();
    }
    cli.json(&["violin", "delete", "hpc", "--force"])
        .expect("violin delete");
}

/// One round of the NEMO3D-shaped job (CI size) across a move: its ring-exchange phase takes
/// tens of seconds while rank1 moves `from` -> `to`; an SSH session to rank1 stays open across
/// the move; the job ends with rank0's own recomputation of the result.
fn job_across_move(
    fed: &Fed,
    key: &Path,
    ranks: &[(&'static str, String, String)],
    from: &str,
    to: &str,
) {
    let cli = &fed.cli;
    let a2 = fed.ns("a2");
    let ip0 = ranks[0].2.clone();
    let job_cmd = mpiexec(
        "/usr/local/bin/mpi-nemo --strain-iters 2000 --block-kib 16 --lanczos-iters 3 \
         --mem-mib 32 --verify",
        ACROSS_MOVE,
    );
    let started = Instant::now();
    let job = std::thread::spawn({
        let (a2, key, ip0) = (a2.clone(), key.to_path_buf(), ip0.clone());
        move || ssh(&a2, &key, &ip0, &job_cmd, None, ACROSS_MOVE)
    });
    let ticks = 60;
    let session = std::thread::spawn({
        let (a2, key, ip1) = (a2.clone(), key.to_path_buf(), ranks[1].2.clone());
        let cmd =
            format!("i=0; while [ $i -lt {ticks} ]; do i=$((i+1)); echo tick $i; sleep 0.5; done");
        move || ssh(&a2, &key, &ip1, &cmd, None, ACROSS_MOVE)
    });
    std::thread::sleep(Duration::from_secs(3));
    let moved =
        run(&mut cli.cmd(&["vm", "migrate", "rank1", "--to", to, "--timeout-s", "240"])).unwrap();
    assert!(
        moved.status.success(),
        "migrate rank1: {}\n{}",
        text(&moved),
        log_text(&fed.mgr_log)
    );
    let downtime = String::from_utf8_lossy(&moved.stdout)
        .lines()
        .find(|l| l.contains("downtime"))
        .unwrap_or_default()
        .trim()
        .to_owned();
    progress(&format!("rank1 moved to {to}: {downtime}"));
    assert!(
        !job.is_finished(),
        "the job ended before the move did: make it longer"
    );
    // The job takes about 30 s: if it has not returned a minute after it began, say what the
    // ranks' processes wait for while it still hangs (the teardown stall below).
    while !job.is_finished() && started.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(500));
    }
    if !job.is_finished() {
        progress(&format!(
            "the job has not returned after {:.0} s; the ranks now:\n{}",
            started.elapsed().as_secs_f64(),
            guest_processes(&a2, key, ranks)
        ));
    }
    let out = job.join().unwrap();
    let said = text(&out);
    let last = said
        .lines()
        .rev()
        .find(|l| l.starts_with("nemo "))
        .unwrap_or_default();
    let verified = last.starts_with("nemo ok ranks=2") && last.ends_with("verify=ok");
    // Known, not Viola's: now and then mpiexec does not return after the job has ended and
    // verified, until MPIEXEC_TIMEOUT kills it ("APPLICATION TIMED OUT"). Seen from inside
    // (guest_processes): both ranks spin in MPI's teardown (the result's broadcast or
    // MPI_Finalize, UCX over TCP) with empty TCP queues between them; and it happens without
    // any migration too (1 of 8 cross-site jobs that never moved). The result is what this test
    // checks; the stall is reported, not hidden, and any other failure fails the test.
    let stalled_after_the_result = !out.status.success()
        && verified
        && said.contains("APPLICATION TIMED OUT")
        && said
            .lines()
            .skip_while(|l| !l.starts_with("nemo ok"))
            .skip(1)
            .all(|l| l.is_empty() || l.starts_with("[mpiexec@") || l.starts_with("[proxy:"));
    if stalled_after_the_result {
        progress(
            "WARNING: the job ended and verified, but mpiexec did not return until its timeout \
             (a known stall in MPI's UCX teardown across sites, with or without a migration)",
        );
    }
    assert!(
        (out.status.success() || stalled_after_the_result) && verified,
        "the job across the move ({}): {said}\n{}\n{}",
        out.status,
        reachability(fed, ranks),
        guest_sockets(&a2, key, ranks)
    );
    assert!(
        !said.contains("Fatal error") && !said.contains("UCX  ERROR"),
        "MPI errors in the job's output: {said}"
    );
    let out = session.join().unwrap();
    assert!(
        out.status.success() && text(&out).contains(&format!("tick {ticks}\n")),
        "the SSH session to rank1 across its move ({}): {}",
        out.status,
        text(&out)
    );
    assert_eq!(
        fed.lab.domain_state(to, "rank1").as_deref(),
        Some("running")
    );
    progress(&format!(
        "rank1 moved {from} -> {to} ({downtime}) while the job ran, and an SSH session to it stayed open: {last}"
    ));
}

/// Runs `cmd` on rank0 (from a2) and returns (seconds it took, its output); panics if it fails.
fn timed_on_rank0(ns: &str, key: &Path, ip0: &str, cmd: &str) -> (f64, String) {
    let t = Instant::now();
    let out = ssh(ns, key, ip0, cmd, None, LONG);
    let took = t.elapsed().as_secs_f64();
    let said = text(&out);
    assert!(out.status.success(), "{cmd}: {said}");
    (took, said)
}

/// `scripts/bench/mpi.sh`: the VIOLIN paper's NEMO3D scenario in small. A two-rank job (one
/// rank per site) runs a network-heavy phase (the token ring, `VIOLA_BENCH_RING_LAPS`) then a
/// CPU-heavy phase (a fixed amount of arithmetic per rank, `VIOLA_BENCH_WORK` loop turns).
/// Both VMs are capped at 30 % of a CPU, as VMs sharing their hosts would be. The job runs
/// three times on the same VMs: uncapped (the reference), capped with the manager's policy
/// loop in `advise` mode (it decides, changes nothing), and capped with the loop in `act` mode
/// (it raises the caps of the ranks that run at their cap). Writes the phases' times to
/// `VIOLA_BENCH_JSON`.
#[test]
#[ignore = "benchmark: scripts/bench/mpi.sh"]
fn adaptation_benchmark() {
    if !lab_tests_enabled() {
        return;
    }
    let out_file = std::env::var("VIOLA_BENCH_JSON").expect("VIOLA_BENCH_JSON: where to write");
    let env_num = |name: &str, default: u64| {
        std::env::var(name).ok().map_or(default, |v| {
            v.parse().unwrap_or_else(|_| panic!("{name}: a number"))
        })
    };
    let laps = env_num("VIOLA_BENCH_RING_LAPS", 300);
    let work = env_num("VIOLA_BENCH_WORK", 3_000_000);
    let image = mpi_image();
    assert!(
        image.exists(),
        "{} missing: run scripts/guest/mpi-image.sh",
        image.display()
    );
    let mut fed = Fed::up(&[("mpi", &image)]);
    let a2 = fed.ns("a2");
    let Cluster { key, ranks } = two_rank_cluster(&fed);
    let ip0 = ranks[0].2.clone();
    let ring = mpiexec(&format!("/usr/local/bin/mpi-ring {laps}"), LONG);
    let compute = mpiexec(
        &format!("sh -c 'i=0; while [ $i -lt {work} ]; do i=$((i+1)); done; hostname'"),
        LONG,
    );
    let job = |label: &str| {
        let (strain, said) = timed_on_rank0(&a2, &key, &ip0, &ring);
        assert!(said.contains("ring ok"), "{said}");
        let (lanczos, _) = timed_on_rank0(&a2, &key, &ip0, &compute);
        progress(&format!(
            "{label}: ring {strain:.1} s, compute {lanczos:.1} s"
        ));
        (strain, lanczos)
    };
    let free = job("uncapped");
    for vm in ["rank0", "rank1"] {
        fed.cli
            .json(&["vm", "resize", vm, "--cap-percent", "30"])
            .expect("cap");
    }
    let advised = job("capped, policy advises only");
    // The same manager in act mode: its policy loop may now change the VMs.
    fed.daemons.kill("manager", libc::SIGTERM).unwrap();
    let mut cfg = std::fs::read_to_string(&fed.mgr_cfg).unwrap();
    cfg.push_str(
        "\n[policy]\nmode = \"act\"\nperiod_s = 5\n\n[policy.viola]\nunderload = 0.0\n\n\
         [policy.vertical]\ncooldown_s = 10\nquiet_periods = 2\n",
    );
    std::fs::write(&fed.mgr_cfg, cfg).unwrap();
    let log = fed.dir().join("adaptmgr-act.log");
    let manager = spawn_manager(&a2, &fed.mgr_cfg, &log);
    fed.daemons.add("manager", manager);
    wait_until(
        "the manager in act mode sees every host",
        Duration::from_secs(60),
        || {
            fed.cli.json(&["host", "list"]).is_ok_and(|h| {
                h.as_array()
                    .is_some_and(|a| a.len() == 4 && a.iter().all(|h| h["state"] == "up"))
            })
        },
    )
    .unwrap();
    for vm in ["rank0", "rank1"] {
        fed.cli
            .json(&["vm", "resize", vm, "--cap-percent", "30"])
            .expect("cap");
    }
    std::thread::sleep(Duration::from_secs(6));
    let adapted = job("capped, policy acts");
    // The loop's carried-out resizes (`viola --json decisions` prints one record per line).
    let listed = run_ok(&mut fed.cli.cmd(&["--json", "decisions"])).unwrap();
    let resizes = serde_json::Deserializer::from_str(&listed)
        .into_iter::<serde_json::Value>()
        .map(|r| r.expect("a decision record"))
        .flat_map(|r| r["actions"].as_array().cloned().unwrap_or_default())
        .filter(|a| a["action"] == "resize" && a["outcome"]["outcome"] == "done")
        .count();
    let result = serde_json::json!({
        "ring_laps": laps,
        "work": work,
        "uncapped.ring_s": free.0,
        "uncapped.compute_s": free.1,
        "advise.ring_s": advised.0,
        "advise.compute_s": advised.1,
        "act.ring_s": adapted.0,
        "act.compute_s": adapted.1,
        "act.resizes": resizes,
        "speedup.compute": advised.1 / adapted.1,
        "speedup.job": (advised.0 + advised.1) / (adapted.0 + adapted.1),
    });
    eprintln!("{result}");
    std::fs::write(out_file, result.to_string()).unwrap();
    fed.cli
        .json(&["violin", "delete", "hpc", "--force"])
        .expect("violin delete");
}
