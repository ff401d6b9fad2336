//! Lab: the monitor's figures agree with what the guest does — a CPU burner inside a 2-vCPU
//! guest shows as about one vCPU busy; idle shows as well below.
// lab: default

use std::path::PathBuf;
use std::time::Duration;

use viola_labtests::mech::*;
use viola_monitor::daemon::{MonitorConfig, collect};
use viola_monitor::sampler::Sampler;

async fn busy_over(
    cfg: &MonitorConfig,
    hv: &std::sync::Arc<dyn viola_hypervisor::Hypervisor>,
    name: &str,
    secs: u64,
) -> f64 {
    let mut sampler = Sampler::new("a1", "a");
    let mut hv = Some(std::sync::Arc::clone(hv));
    let _ = collect(cfg, &mut sampler, &mut hv).await;
    tokio::time::sleep(Duration::from_secs(secs)).await;
    let report = collect(cfg, &mut sampler, &mut hv).await;
    assert!(hv.is_some(), "libvirt statistics failed");
    assert!(
        report.usage.cpus > 0 && report.usage.mem_total_kib > 0,
        "{:?}",
        report.usage
    );
    report
        .vms
        .iter()
        .find(|v| v.name == name)
        .map(|v| v.cpu_busy)
        .expect("the monitor reports the guest")
}

/// CPU seconds (user + system) a process has used, from /proc/PID/stat.
fn process_cpu_s(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("spinner stat");
    // After the parenthesised command name: state, ppid, ... utime (12th), stime (13th).
    let rest = &stat[stat.rfind(')').expect("stat format") + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f[11].parse::<u64>().expect("utime") + f[12].parse::<u64>().expect("stime");
    ticks as f64 / 100.0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cpu_burner_in_guest_shows_as_one_busy_vcpu() {
    let name = "vm-burn";
    let (_cleanup, hv, ip) = begin_with_guest("a1", name, "10.77.5", 2);
    let ip = ip.as_str();
    hv.set_vcpus(name, 2).expect("two vCPUs");
    wait_guest("a1", ip, Duration::from_secs(180));
    wait_info("a1", ip, "cpus_online", Duration::from_secs(60), |n| n == 2);
    let cfg = MonitorConfig {
        host: "a1".into(),
        site: "a".into(),
        libvirt_uri: manager_uri("a1"),
        proc_root: PathBuf::from("/proc"),
        ..MonitorConfig::default()
    };
    // Let boot-time activity settle, then measure idle.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let idle = busy_over(&cfg, &hv, name, 4).await;
    assert_eq!(
        guest_http("a1", ip, "burn=1,40").as_deref().map(str::trim),
        Some("ok")
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    // The machine's two cores are shared with everything else running on it, so "one vCPU
    // busy" is measured against what one busy host process gets over the same window.
    let spinner = std::process::Command::new("sh")
        .args(["-c", "i=0; while [ $i -lt 400000000 ]; do i=$((i+1)); done"])
        .spawn()
        .expect("spinner");
    let spin_pid = spinner.id();
    let started = std::time::Instant::now();
    let cpu0 = process_cpu_s(spin_pid);
    let burning = busy_over(&cfg, &hv, name, 6).await;
    let one_cpu = (process_cpu_s(spin_pid) - cpu0) / started.elapsed().as_secs_f64();
    let _ = std::process::Command::new("kill")
        .arg(spin_pid.to_string())
        .status();
    let mut spinner = spinner;
    let _ = spinner.wait();
    eprintln!(
        "idle {idle:.2} vCPUs, burning {burning:.2} vCPUs, one busy host process gets {one_cpu:.2} CPUs"
    );
    assert!(idle < 0.5, "idle guest shows {idle:.2} vCPUs busy");
    let ratio = burning / one_cpu;
    assert!(
        (0.7..1.4).contains(&ratio),
        "burner shows {burning:.2} vCPUs busy where one busy process gets {one_cpu:.2} ({ratio:.2}x)"
    );
}
