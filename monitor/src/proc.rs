//! Host usage from /proc: pure parsers of `/proc/stat`, `/proc/meminfo` and `/proc/net/dev`
//! (tested on captured text), and rates from two samples; and of a host's own CPU share when it
//! is a cgroup (a partition of a bigger machine, as the lab's hosts are): its quota and its CPU
//! time, from cgroup v1 (`cpu.cfs_quota_us`, `cpu.cfs_period_us`, `cpuacct.usage`) or v2
//! (`cpu.max`, `cpu.stat`) files.

/// Packets dropped per ebtables chain, from `ebtables -t nat -L --Lc`: for each chain, the
/// packet counters of its DROP rules, summed (chains without one are listed with 0).
pub fn parse_ebtables_drops(listing: &str) -> std::collections::BTreeMap<String, u64> {
    let mut drops = std::collections::BTreeMap::new();
    let mut chain: Option<String> = None;
    for line in listing.lines() {
        if let Some(rest) = line.strip_prefix("Bridge chain: ") {
            let name = rest.split(',').next().unwrap_or_default().trim().to_owned();
            drops.entry(name.clone()).or_insert(0);
            chain = Some(name);
        } else if let Some(c) = &chain
            && line.contains("-j DROP")
            && let Some(count) = line
                .split("pcnt = ")
                .nth(1)
                .and_then(|s| s.split_whitespace().next())
                .and_then(|n| n.parse::<u64>().ok())
        {
            *drops.entry(c.clone()).or_insert(0) += count;
        }
    }
    drops
}

/// What libvirt's nwfilter dropped from the VM on bridge port `port`: the drops of the chains
/// that filter what comes from it (`libvirt-I-PORT`, `I-PORT`, `I-PORT-…`); `None` if the port
/// has no such chain (no filter).
pub fn port_filter_drops(
    chains: &std::collections::BTreeMap<String, u64>,
    port: &str,
) -> Option<u64> {
    let root = format!("libvirt-I-{port}");
    let own = format!("I-{port}");
    let sub = format!("I-{port}-");
    let mut found = false;
    let mut sum = 0;
    for (chain, n) in chains {
        if *chain == root || *chain == own || chain.starts_with(&sub) {
            found = true;
            sum += n;
        }
    }
    found.then_some(sum)
}

/// Cumulative CPU jiffies from the `cpu` line of /proc/stat.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CpuTimes {
    pub total: u64,
    pub idle: u64,
}

/// Parses the aggregate `cpu` line and counts `cpuN` lines.
pub fn parse_stat(text: &str) -> Option<(CpuTimes, u32)> {
    let mut agg = None;
    let mut cpus = 0u32;
    for line in text.lines() {
        let mut fields = line.split_whitespace();
        match fields.next() {
            Some("cpu") => {
                let v: Vec<u64> = fields.filter_map(|f| f.parse().ok()).collect();
                if v.len() < 4 {
                    return None;
                }
                // user nice system idle iowait irq softirq steal (guest time is inside user)
                let total: u64 = v.iter().take(8).sum();
                let idle = v[3] + v.get(4).copied().unwrap_or(0);
                agg = Some(CpuTimes { total, idle });
            }
            Some(name) if name.starts_with("cpu") => cpus += 1,
            _ => {}
        }
    }
    agg.map(|a| (a, cpus.max(1)))
}

/// CPUs' worth of busy time between two samples.
pub fn cpu_busy(before: CpuTimes, after: CpuTimes, cpus: u32) -> f64 {
    let total = after.total.saturating_sub(before.total);
    if total == 0 {
        return 0.0;
    }
    let idle = after.idle.saturating_sub(before.idle);
    (total.saturating_sub(idle) as f64 / total as f64) * f64::from(cpus)
}

/// CPUs a cgroup may use, from a v1 quota and period (`-1`: no limit) in microseconds.
pub fn parse_cfs_quota(quota: &str, period: &str) -> Result<Option<f64>, CgroupParseError> {
    let period: u64 = number(period)?;
    let quota = quota.trim();
    if quota == "-1" {
        return Ok(None);
    }
    share(number(quota)?, period)
}

/// CPUs a cgroup may use, from a v2 `cpu.max` ("max 100000" or "50000 100000").
pub fn parse_cpu_max(text: &str) -> Result<Option<f64>, CgroupParseError> {
    let mut fields = text.split_whitespace();
    let (Some(quota), Some(period), None) = (fields.next(), fields.next(), fields.next()) else {
        return Err(CgroupParseError(text.trim().to_owned()));
    };
    if quota == "max" {
        return Ok(None);
    }
    share(number(quota)?, number(period)?)
}

/// A cgroup's CPU time in nanoseconds from v1 `cpuacct.usage`.
pub fn parse_cpuacct_usage(text: &str) -> Result<u64, CgroupParseError> {
    number(text)
}

/// A cgroup's CPU time in nanoseconds from v2 `cpu.stat` (`usage_usec`).
pub fn parse_cpu_stat_usage(text: &str) -> Result<u64, CgroupParseError> {
    let usec: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("usage_usec "))
        .ok_or_else(|| CgroupParseError("cpu.stat without usage_usec".to_owned()))
        .and_then(number)?;
    Ok(usec.saturating_mul(1000))
}

/// A cgroup file that does not say what it should.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unexpected cgroup file content {0:?}")]
pub struct CgroupParseError(String);

fn number(text: &str) -> Result<u64, CgroupParseError> {
    text.trim()
        .parse()
        .map_err(|_| CgroupParseError(text.trim().to_owned()))
}

fn share(quota: u64, period: u64) -> Result<Option<f64>, CgroupParseError> {
    if period == 0 {
        return Err(CgroupParseError("a period of 0".to_owned()));
    }
    Ok(Some(quota as f64 / period as f64))
}

/// `(MemTotal, MemAvailable)` in KiB.
pub fn parse_meminfo(text: &str) -> Option<(u64, u64)> {
    let get = |key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|v| v.parse().ok())
    };
    Some((get("MemTotal:")?, get("MemAvailable:")?))
}

/// `(interface, rx_bytes, tx_bytes)` per interface of /proc/net/dev.
pub fn parse_net_dev(text: &str) -> Vec<(String, u64, u64)> {
    text.lines()
        .skip(2)
        .filter_map(|line| {
            let (name, rest) = line.split_once(':')?;
            let v: Vec<u64> = rest
                .split_whitespace()
                .filter_map(|f| f.parse().ok())
                .collect();
            Some((name.trim().to_owned(), *v.first()?, *v.get(8)?))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    /// The shape of `ebtables -t nat -L --Lc` with libvirt's clean-traffic on two ports.
    const EBTABLES: &str = "Bridge table: nat

Bridge chain: PREROUTING, entries: 2, policy: ACCEPT
-i vnet0 -j libvirt-I-vnet0 , pcnt = 170 -- bcnt = 12000
-i vnet10 -j libvirt-I-vnet10 , pcnt = 9 -- bcnt = 600

Bridge chain: POSTROUTING, entries: 1, policy: ACCEPT
-o vnet0 -j libvirt-O-vnet0 , pcnt = 100 -- bcnt = 8000

Bridge chain: libvirt-I-vnet0, entries: 4, policy: ACCEPT
-j I-vnet0-mac , pcnt = 170 -- bcnt = 12000
-p IPv4 -j I-vnet0-ipv4-ip , pcnt = 80 -- bcnt = 7000
-p ARP -j I-vnet0-arp-mac , pcnt = 40 -- bcnt = 1680
-j DROP , pcnt = 2 -- bcnt = 180

Bridge chain: I-vnet0-mac, entries: 2, policy: ACCEPT
-s 52:54:0:a:0:1 -j RETURN , pcnt = 126 -- bcnt = 9000
-j DROP , pcnt = 44 -- bcnt = 2640

Bridge chain: I-vnet0-ipv4-ip, entries: 3, policy: ACCEPT
-p IPv4 --ip-src 0.0.0.0 --ip-proto udp -j RETURN , pcnt = 1 -- bcnt = 342
-p IPv4 --ip-src 10.0.1.2 -j RETURN , pcnt = 76 -- bcnt = 6000
-j DROP , pcnt = 3 -- bcnt = 250

Bridge chain: libvirt-O-vnet0, entries: 1, policy: ACCEPT
-j DROP , pcnt = 7 -- bcnt = 700

Bridge chain: libvirt-I-vnet10, entries: 1, policy: ACCEPT
-j I-vnet10-mac , pcnt = 9 -- bcnt = 600

Bridge chain: I-vnet10-mac, entries: 2, policy: ACCEPT
-s 52:54:0:a:0:2 -j RETURN , pcnt = 9 -- bcnt = 600
-j DROP , pcnt = 0 -- bcnt = 0
";

    #[test]
    fn port_filter_drops_are_the_drops_of_the_ports_own_chains() {
        let chains = parse_ebtables_drops(EBTABLES);
        assert_eq!(chains["I-vnet0-mac"], 44);
        assert_eq!(chains["PREROUTING"], 0);
        // 2 + 44 + 3; not the frames to the VM (libvirt-O-vnet0), not vnet10's.
        assert_eq!(port_filter_drops(&chains, "vnet0"), Some(49));
        assert_eq!(port_filter_drops(&chains, "vnet10"), Some(0));
        assert_eq!(port_filter_drops(&chains, "vnet1"), None);
        assert!(parse_ebtables_drops("").is_empty());
        assert!(parse_ebtables_drops("-j DROP , pcnt = 5 -- bcnt = 1").is_empty());
    }

    const STAT: &str = "cpu  100 0 50 800 50 0 0 0 0 0\ncpu0 50 0 25 400 25 0 0 0 0 0\ncpu1 50 0 25 400 25 0 0 0 0 0\nintr 1\n";

    #[test]
    fn stat_and_busy_fraction() {
        let (a, cpus) = parse_stat(STAT).unwrap();
        assert_eq!(cpus, 2);
        assert_eq!(
            a,
            CpuTimes {
                total: 1000,
                idle: 850
            }
        );
        let b = CpuTimes {
            total: 1200,
            idle: 950,
        };
        // 200 jiffies passed, 100 idle: half of two CPUs = one CPU busy.
        assert!((cpu_busy(a, b, cpus) - 1.0).abs() < 1e-9);
    }

    #[test]
    fn meminfo_and_net_dev() {
        let mem =
            "MemTotal:       24684272 kB\nMemFree:        1 kB\nMemAvailable:   23000000 kB\n";
        assert_eq!(parse_meminfo(mem), Some((24_684_272, 23_000_000)));
        let net = "Inter-|   Receive\n face |bytes packets\n  eth0: 1000 10 0 0 0 0 0 0 2000 20 0 0 0 0 0 0\n    lo: 5 1 0 0 0 0 0 0 5 1 0 0 0 0 0 0\n";
        assert_eq!(
            parse_net_dev(net),
            vec![("eth0".to_string(), 1000, 2000), ("lo".to_string(), 5, 5)]
        );
    }

    #[test]
    fn cgroup_quota_and_usage_v1_and_v2() {
        assert_eq!(parse_cfs_quota("50000\n", "100000\n"), Ok(Some(0.5)));
        assert_eq!(parse_cfs_quota("-1\n", "100000\n"), Ok(None));
        assert_eq!(parse_cpu_max("150000 100000\n"), Ok(Some(1.5)));
        assert_eq!(parse_cpu_max("max 100000\n"), Ok(None));
        assert_eq!(parse_cpuacct_usage("123456789\n"), Ok(123_456_789));
        let stat = "usage_usec 2500\nuser_usec 2000\nsystem_usec 500\n";
        assert_eq!(parse_cpu_stat_usage(stat), Ok(2_500_000));
        assert!(parse_cfs_quota("50000", "0").is_err());
        assert!(parse_cfs_quota("lots", "100000").is_err());
        assert!(parse_cpu_max("50000").is_err());
        assert!(parse_cpu_max("50000 100000 7").is_err());
        assert!(parse_cpu_stat_usage("user_usec 1\n").is_err());
    }

    proptest! {
        #[test]
        fn parsers_never_panic(text in ".{0,400}", other in ".{0,40}") {
            let _ = parse_stat(&text);
            let _ = parse_meminfo(&text);
            let _ = parse_net_dev(&text);
            let _ = parse_cfs_quota(&text, &other);
            let _ = parse_cpu_max(&text);
            let _ = parse_cpuacct_usage(&text);
            let _ = parse_cpu_stat_usage(&text);
        }

        #[test]
        fn cpu_max_round_trips(quota in 1u64..10_000_000, period in 1_000u64..1_000_000) {
            let got = parse_cpu_max(&format!("{quota} {period}\n")).unwrap().unwrap();
            prop_assert!((got - quota as f64 / period as f64).abs() < 1e-9);
        }

        #[test]
        fn busy_is_within_zero_and_cpus(t0 in 0u64..1<<40, i0 in 0u64..1<<40, dt in 0u64..1<<20, di in 0u64..1<<20, cpus in 1u32..64) {
            let di = di.min(dt);
            let b = cpu_busy(CpuTimes { total: t0, idle: i0 }, CpuTimes { total: t0 + dt, idle: i0 + di }, cpus);
            prop_assert!((0.0..=f64::from(cpus)).contains(&b));
        }
    }
}
