//! Violins as the control plane describes them ([`ViolinSpec`]): checking one into the
//! switch's [`ViolinConfig`], and the state file that keeps the daemon's run-time violins
//! across its restarts. No sockets, no devices.

use std::collections::HashSet;
use std::io::{self, Write as _};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use viola_api::overlay::ViolinSpec;

use crate::HostId;
use crate::dhcp::{Subnet, SubnetError};
use crate::switch::{HostPattern, ManagedVm, ViolinConfig};
use crate::wire::{self, ViolinId};

/// Why a violin spec is refused (nothing is changed).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    /// The id does not fit 24 bits.
    #[error("violin id {0} exceeds 24 bits")]
    Id(u32),
    /// The name is too long or has control characters.
    #[error("violin name {0:?}: at most 64 printable characters")]
    Name(String),
    /// The violin's MTU is below what IPv4 allows (RFC 2132: 68) or above [`MAX_MTU`].
    #[error("violin MTU {0}: 68 to {MAX_MTU}")]
    Mtu(u16),
    /// An allowed-host pattern is not `site/host`, `site/*` or `*`.
    #[error("allowed host {0:?} is not site/host, site/* or *")]
    Pattern(String),
    /// A VM's host is not `site/host`.
    #[error("VM {mac}: host {host:?} is not site/host")]
    Host {
        /// The VM.
        mac: String,
        /// Its host.
        host: String,
    },
    /// A MAC that does not parse, or a group or all-zero MAC.
    #[error("bad MAC {0:?} (want a unicast aa:bb:cc:dd:ee:ff)")]
    Mac(String),
    /// The subnet does not parse.
    #[error(transparent)]
    Subnet(#[from] SubnetError),
    /// A VM's address outside the subnet (or its network or broadcast address).
    #[error("VM {mac}: {ip} is not a host address of {subnet}")]
    OutsideSubnet {
        /// The VM.
        mac: String,
        /// Its address.
        ip: Ipv4Addr,
        /// The subnet.
        subnet: Subnet,
    },
    /// A VM at the DHCP server's address (the subnet's first).
    #[error("VM {mac}: {ip} is the DHCP server's address (the subnet's first)")]
    ServerAddress {
        /// The VM.
        mac: String,
        /// Its address.
        ip: Ipv4Addr,
    },
    /// Two VMs with one MAC.
    #[error("MAC {0} is listed twice")]
    DuplicateMac(String),
    /// Two VMs with one address.
    #[error("address {0} is listed twice")]
    DuplicateIp(Ipv4Addr),
}

/// Whether `s` is `site/host` (both parts non-empty, no `*`, no spaces, one `/`).
fn is_host_name(s: &str) -> bool {
    let part = |p: &str| {
        !p.is_empty()
            && p.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    };
    s.split_once('/').is_some_and(|(a, b)| part(a) && part(b))
}

fn is_pattern(s: &str) -> bool {
    s == "*"
        || is_host_name(s)
        || s.strip_suffix("/*")
            .is_some_and(|site| is_host_name(&format!("{site}/x")))
}

pub use viola_api::overlay::{MAX_VIOLIN_MTU as MAX_MTU, MIN_VIOLIN_MTU as MIN_MTU};

/// The MTU of a violin's bridge and TAP: the spec's, else the daemon's `mtu`.
pub fn violin_mtu(spec: &ViolinSpec, daemon_mtu: u32) -> u32 {
    spec.mtu.map_or(daemon_mtu, u32::from)
}

/// Checks `spec` and turns it into the switch's configuration.
pub fn violin_config(spec: &ViolinSpec) -> Result<ViolinConfig, SpecError> {
    let id = ViolinId::new(spec.id).ok_or(SpecError::Id(spec.id))?;
    if spec.name.chars().count() > 64 || spec.name.chars().any(char::is_control) {
        return Err(SpecError::Name(spec.name.clone()));
    }
    if let Some(mtu) = spec.mtu.filter(|m| !(MIN_MTU..=MAX_MTU).contains(m)) {
        return Err(SpecError::Mtu(mtu));
    }
    if let Some(p) = spec.allowed.iter().find(|p| !is_pattern(p)) {
        return Err(SpecError::Pattern(p.clone()));
    }
    let subnet = spec.subnet.as_deref().map(Subnet::parse).transpose()?;
    let mut macs = HashSet::new();
    let mut ips = HashSet::new();
    let mut vms = Vec::with_capacity(spec.vms.len());
    for vm in &spec.vms {
        let mac = wire::parse_mac(&vm.mac)
            .filter(|m| !wire::is_group(m) && *m != [0; 6])
            .ok_or_else(|| SpecError::Mac(vm.mac.clone()))?;
        let name = wire::mac_to_string(&mac);
        if let Some(s) = subnet {
            if !s.contains_host(vm.ip) {
                return Err(SpecError::OutsideSubnet {
                    mac: name,
                    ip: vm.ip,
                    subnet: s,
                });
            }
            if vm.ip == s.server() {
                return Err(SpecError::ServerAddress {
                    mac: name,
                    ip: vm.ip,
                });
            }
        }
        if let Some(h) = vm.host.as_deref().filter(|h| !is_host_name(h)) {
            return Err(SpecError::Host {
                mac: name,
                host: h.to_owned(),
            });
        }
        if !macs.insert(mac) {
            return Err(SpecError::DuplicateMac(name));
        }
        if !ips.insert(vm.ip) {
            return Err(SpecError::DuplicateIp(vm.ip));
        }
        vms.push(ManagedVm {
            mac,
            ip: vm.ip,
            host: vm.host.as_deref().map(HostId::from),
        });
    }
    Ok(ViolinConfig {
        id,
        name: spec.name.clone(),
        allowed: spec.allowed.iter().map(|p| HostPattern::new(p)).collect(),
        vms,
        subnet,
        dhcp_mtu: spec.mtu,
    })
}

/// A run-time violin as the state file keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeptViolin {
    /// What the control plane sent.
    pub spec: ViolinSpec,
    /// The daemon made the violin's bridge (and removes it with the violin).
    #[serde(default)]
    pub bridge_made: bool,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StateFile {
    violins: Vec<KeptViolin>,
}

/// Why the state file cannot be read or written.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// Reading it.
    #[error("cannot read the state file {}", .path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// It is not a state file.
    #[error("the state file {} is corrupt (move it away to start without its violins)", .path.display())]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: serde_json::Error,
    },
    /// Writing it.
    #[error("cannot write the state file {}", .path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
}

/// The violins kept in the state file at `path` (none if it does not exist).
pub fn load_state(path: &Path) -> Result<Vec<KeptViolin>, StateError> {
    let text = match std::fs::read(path) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(StateError::Read {
                path: path.to_owned(),
                source,
            });
        }
    };
    let state: StateFile = serde_json::from_slice(&text).map_err(|source| StateError::Corrupt {
        path: path.to_owned(),
        source,
    })?;
    Ok(state.violins)
}

/// Replaces the state file at `path` with `violins`: written to a temporary file beside it,
/// synced, renamed over it, and the directory synced, so that a crash leaves the old or the
/// new file, never a part.
pub fn save_state(path: &Path, violins: &[KeptViolin]) -> Result<(), StateError> {
    let err = |source| StateError::Write {
        path: path.to_owned(),
        source,
    };
    let body = serde_json::to_vec_pretty(&StateFile {
        violins: violins.to_vec(),
    })
    .map_err(|e| err(io::Error::other(e)))?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    std::fs::create_dir_all(dir).map_err(err)?;
    let mut tmp_name = path.as_os_str().to_owned();
    tmp_name.push(".tmp");
    let tmp = PathBuf::from(tmp_name);
    let write = || -> io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&body)?;
        f.write_all(b"\n")?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(dir)?.sync_all()
    };
    write().map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        err(e)
    })
}

#[cfg(test)]
mod tests {
    use viola_api::overlay::ManagedVmSpec;

    use super::*;

    fn spec() -> ViolinSpec {
        serde_json::from_str(
            r#"{"id":7,"name":"lab","allowed":["a/*","b/b1"],"subnet":"10.7.0.0/24",
                "vms":[{"mac":"52:54:00:aa:bb:cc","ip":"10.7.0.10"},
                       {"mac":"52:54:00:aa:bb:cd","ip":"10.7.0.11","host":"b/b1"}]}"#,
        )
        .unwrap()
    }

    #[test]
    fn a_good_spec_becomes_a_violin_config() {
        let cfg = violin_config(&spec()).unwrap();
        assert_eq!(cfg.id.get(), 7);
        assert_eq!(cfg.subnet.unwrap().to_string(), "10.7.0.0/24");
        assert_eq!(cfg.vms.len(), 2);
        assert_eq!(cfg.vms[1].host.as_deref(), Some("b/b1"));
        assert!(cfg.allowed[0].matches("a/a9"));
        let mut open = spec();
        open.allowed = vec!["*".into()];
        open.subnet = None;
        open.vms[0].ip = Ipv4Addr::new(192, 168, 1, 1);
        assert!(violin_config(&open).is_ok(), "without a subnet any address");
    }

    #[test]
    fn bad_specs_are_refused_with_a_reason() {
        type Break = Box<dyn Fn(&mut ViolinSpec)>;
        let cases: Vec<(Break, &str)> = vec![
            (Box::new(|s| s.id = 1 << 24), "exceeds 24 bits"),
            (Box::new(|s| s.mtu = Some(67)), "violin MTU 67"),
            (
                Box::new(|s| s.mtu = Some(9001)),
                "violin MTU 9001: 68 to 9000",
            ),
            (Box::new(|s| s.name = "a\nb".into()), "violin name"),
            (Box::new(|s| s.allowed.push("a/b/c".into())), "allowed host"),
            (Box::new(|s| s.allowed.push("".into())), "allowed host"),
            (Box::new(|s| s.allowed.push("*/x".into())), "allowed host"),
            (
                Box::new(|s| s.vms[0].mac = "52:54:00:aa:bb".into()),
                "bad MAC",
            ),
            (
                Box::new(|s| s.vms[0].mac = "01:00:5e:00:00:01".into()),
                "bad MAC",
            ),
            (
                Box::new(|s| s.subnet = Some("10.7.0.0/33".into())),
                "prefix",
            ),
            (
                Box::new(|s| s.subnet = Some("10.7.0.1/24".into())),
                "host bits",
            ),
            (
                Box::new(|s| s.subnet = Some("ten".into())),
                "ADDRESS/PREFIX",
            ),
            (
                Box::new(|s| s.vms[0].ip = Ipv4Addr::new(10, 8, 0, 1)),
                "not a host address of 10.7.0.0/24",
            ),
            (
                Box::new(|s| s.vms[0].ip = Ipv4Addr::new(10, 7, 0, 255)),
                "not a host address",
            ),
            (
                Box::new(|s| s.vms[0].ip = Ipv4Addr::new(10, 7, 0, 1)),
                "DHCP server's address",
            ),
            (
                Box::new(|s| s.vms[1].mac = "52:54:00:AA:BB:CC".into()),
                "listed twice",
            ),
            (
                Box::new(|s| s.vms[1].ip = Ipv4Addr::new(10, 7, 0, 10)),
                "10.7.0.10 is listed twice",
            ),
            (
                Box::new(|s| s.vms[1].host = Some("b1".into())),
                "is not site/host",
            ),
        ];
        for (break_it, why) in cases {
            let mut s = spec();
            break_it(&mut s);
            let e = violin_config(&s).unwrap_err().to_string();
            assert!(e.contains(why), "{e:?} should say {why:?} for {s:?}");
        }
    }

    #[test]
    fn the_state_file_round_trips_and_a_corrupt_one_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/state.json");
        assert_eq!(load_state(&path).unwrap(), vec![], "no file: no violins");
        let mut other = spec();
        other.id = 8;
        other.subnet = None;
        other.vms = vec![ManagedVmSpec {
            mac: "52:54:00:00:00:01".into(),
            ip: Ipv4Addr::new(10, 8, 0, 5),
            host: None,
        }];
        let kept = vec![
            KeptViolin {
                spec: spec(),
                bridge_made: true,
            },
            KeptViolin {
                spec: other,
                bridge_made: false,
            },
        ];
        save_state(&path, &kept).unwrap();
        assert_eq!(load_state(&path).unwrap(), kept);
        save_state(&path, &kept[1..]).unwrap();
        assert_eq!(load_state(&path).unwrap(), kept[1..]);
        let names: Vec<_> = std::fs::read_dir(path.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["state.json"], "no temporary file left");
        std::fs::write(&path, b"{\"violins\":[{\"spec\":").unwrap();
        let e = load_state(&path).unwrap_err();
        assert!(matches!(e, StateError::Corrupt { .. }), "{e:?}");
        assert!(e.to_string().contains("corrupt"));
    }
}
