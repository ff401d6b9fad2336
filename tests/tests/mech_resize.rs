//! Lab: live resize of a running guest (vCPU hot-plug, balloon, CPU cap) through the
//! hypervisor trait, checked from inside the guest.
// lab: default

use std::time::Duration;

use viola_hypervisor::{CpuCap, CpuTuning, HypervisorError};
use viola_labtests::mech::*;

#[test]
fn resize_vcpus_memory_and_cap_of_a_running_guest() {
    let name = "vm-resize";
    let (_cleanup, hv, ip) = begin_with_guest("a1", name, "10.77.1", 2);
    let ip = ip.as_str();

    let info = wait_guest("a1", ip, Duration::from_secs(180));
    assert_eq!(info_value(&info, "cpus_online"), Some(1), "{info}");
    let mem_before = info_value(&info, "mem_total_kib").expect("mem_total_kib");

    // vCPU hot-plug: the guest brings the new CPU online by itself.
    hv.set_vcpus(name, 2).expect("set vcpus");
    assert_eq!(hv.domain(name).unwrap().unwrap().vcpus, 2);
    wait_info("a1", ip, "cpus_online", Duration::from_secs(60), |n| n == 2);
    // Above the maximum: refused with a clear error, nothing changes.
    let err = hv.set_vcpus(name, 3).unwrap_err();
    assert!(matches!(err, HypervisorError::OutOfRange { .. }), "{err}");

    // Balloon: 256 MiB → 160 MiB; the guest's MemTotal drops by about the difference.
    hv.set_memory(name, 160 * 1024).expect("set memory");
    wait_info("a1", ip, "mem_total_kib", Duration::from_secs(60), |m| {
        m + 80 * 1024 < mem_before
    });
    hv.set_memory(name, 256 * 1024).expect("grow memory");
    wait_info("a1", ip, "mem_total_kib", Duration::from_secs(60), |m| {
        m + 16 * 1024 >= mem_before
    });

    // CPU cap and shares: either applied and read back, or refused saying why.
    let want = CpuTuning {
        shares: Some(512),
        cap: Some(CpuCap::percent(50)),
    };
    match hv.set_cpu_tuning(name, want) {
        Ok(()) => {
            let got = hv.cpu_tuning(name).expect("read tuning");
            assert_eq!(got.shares, Some(512));
            assert_eq!(got.cap, Some(CpuCap::percent(50)));
        }
        Err(HypervisorError::Unsupported { reason, .. }) => {
            assert!(reason.contains("cgroup"), "{reason}");
            eprintln!("CPU cap unsupported on this host: {reason}");
        }
        Err(e) => panic!("set cpu tuning: {e}"),
    }
}
