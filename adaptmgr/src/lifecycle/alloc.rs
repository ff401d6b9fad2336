//! Names, ids and addresses for violins and their VMs, without I/O: what the manager hands out
//! is decided here from what the inventory already holds, so it is tested without a store.
//!
//! - A violin's id is the lowest free one from 1 (24 bits, as on the overlay's wire).
//! - Its subnet is the user's (inside 10.0.0.0/8, /16 to /29, host bits zero) or
//!   `10.<id / 256>.<id % 256>.0/24`. The first address (network + 1) is the overlay's: the
//!   DHCP server identifier every host's daemon answers for; VMs get the next free ones.
//! - A VM's MAC is locally administered (`02:` first byte), derived from the violin id and the
//!   VM's name, so a re-created VM gets the same MAC; on a collision the next candidate is taken.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

/// Why a name, subnet or address request is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AllocError {
    #[error("violin name {0:?}: use 1 to 32 of a-z, 0-9 and '-'")]
    BadViolinName(String),
    #[error("VM name {0:?}: use 1 to 48 of A-Z, a-z, 0-9, '_' and '-'")]
    BadVmName(String),
    #[error(
        "subnet {0:?}: give 10.X.Y.Z/P inside 10.0.0.0/8 with P from 16 to 29 and no host bits"
    )]
    BadSubnet(String),
    #[error("every violin id is taken")]
    NoViolinId,
    #[error("subnet {0} has no free address left")]
    SubnetFull(String),
    #[error("no free MAC address for {0}")]
    NoMac(String),
    #[error(
        "SSH key: give one OpenSSH public key line (ssh-ed25519, ssh-rsa or ecdsa-sha2-*), at most {MAX_SSH_KEY} bytes: {0}"
    )]
    BadSshKey(&'static str),
}

/// The longest public key accepted: it travels on the guest's kernel command line (2 KiB on
/// x86 in all), and a 4096-bit RSA key is about 730 bytes.
pub const MAX_SSH_KEY: usize = 1024;

/// The kernel command-line value that carries an OpenSSH public key line to the guest:
/// `TYPE,BASE64` (no spaces, which end a parameter; the comment is dropped, as it may hold
/// anything).
pub fn ssh_key_param(line: &str) -> Result<String, AllocError> {
    let mut words = line.split_whitespace();
    let (Some(kind), Some(body)) = (words.next(), words.next()) else {
        return Err(AllocError::BadSshKey("expected TYPE KEY [COMMENT]"));
    };
    let kinds = [
        "ssh-ed25519",
        "ssh-rsa",
        "ecdsa-sha2-nistp256",
        "ecdsa-sha2-nistp384",
        "ecdsa-sha2-nistp521",
        "sk-ssh-ed25519@openssh.com",
        "sk-ecdsa-sha2-nistp256@openssh.com",
    ];
    if !kinds.contains(&kind) {
        return Err(AllocError::BadSshKey("unknown key type"));
    }
    if line.lines().count() != 1 {
        return Err(AllocError::BadSshKey("more than one line"));
    }
    let base64 = body
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"+/=".contains(&b));
    if !base64 || body.len() < 16 || kind.len() + 1 + body.len() > MAX_SSH_KEY {
        return Err(AllocError::BadSshKey(
            "the key is not base64 of a sane length",
        ));
    }
    Ok(format!("{kind},{body}"))
}

/// An IPv4 subnet of a violin.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Subnet {
    pub net: Ipv4Addr,
    pub prefix: u8,
}

impl Subnet {
    /// Parses and checks `10.X.Y.Z/P` (see the module documentation).
    pub fn parse(text: &str) -> Result<Self, AllocError> {
        let bad = || AllocError::BadSubnet(text.to_owned());
        let (addr, prefix) = text.split_once('/').ok_or_else(bad)?;
        let net: Ipv4Addr = addr.parse().map_err(|_| bad())?;
        let prefix: u8 = prefix.parse().map_err(|_| bad())?;
        if !(16..=29).contains(&prefix) || net.octets()[0] != 10 {
            return Err(bad());
        }
        let subnet = Self { net, prefix };
        if u32::from(net) & !subnet.mask() != 0 {
            return Err(bad());
        }
        Ok(subnet)
    }

    /// The subnet of violin `id` when the user names none.
    pub fn default_for(id: u32) -> Self {
        Self {
            net: Ipv4Addr::new(10, ((id >> 8) & 0xff) as u8, (id & 0xff) as u8, 0),
            prefix: 24,
        }
    }

    fn mask(self) -> u32 {
        u32::MAX << (32 - u32::from(self.prefix))
    }

    /// The overlay's own address in it (the DHCP server identifier).
    pub fn server(self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.net) + 1)
    }

    /// Whether `ip` may be given to a VM: inside, neither network, server nor broadcast.
    pub fn assignable(self, ip: Ipv4Addr) -> bool {
        let (ip, net) = (u32::from(ip), u32::from(self.net));
        ip & self.mask() == net && ip > net + 1 && ip < net | !self.mask()
    }

    /// The lowest assignable address not in `used`.
    pub fn next_free(self, used: &BTreeSet<Ipv4Addr>) -> Result<Ipv4Addr, AllocError> {
        let first = u32::from(self.net) + 2;
        let broadcast = u32::from(self.net) | !self.mask();
        (first..broadcast)
            .map(Ipv4Addr::from)
            .find(|ip| !used.contains(ip))
            .ok_or_else(|| AllocError::SubnetFull(self.to_string()))
    }
}

impl std::fmt::Display for Subnet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.net, self.prefix)
    }
}

/// The largest violin id (24 bits on the overlay's wire).
pub const MAX_VIOLIN_ID: u32 = (1 << 24) - 1;

/// The lowest violin id from 1 not in `used`.
pub fn next_violin_id(used: &BTreeSet<u32>) -> Result<u32, AllocError> {
    (1..=MAX_VIOLIN_ID)
        .find(|id| !used.contains(id))
        .ok_or(AllocError::NoViolinId)
}

pub fn check_violin_name(name: &str) -> Result<(), AllocError> {
    check_name(
        name,
        32,
        |b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-',
        AllocError::BadViolinName,
    )
}

pub fn check_vm_name(name: &str) -> Result<(), AllocError> {
    check_name(
        name,
        48,
        |b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-',
        AllocError::BadVmName,
    )
}

/// `name` is 1 to `max` bytes, each of them `allowed`; else `bad(name)`.
fn check_name(
    name: &str,
    max: usize,
    allowed: fn(u8) -> bool,
    bad: fn(String) -> AllocError,
) -> Result<(), AllocError> {
    if (1..=max).contains(&name.len()) && name.bytes().all(allowed) {
        Ok(())
    } else {
        Err(bad(name.to_owned()))
    }
}

/// 64-bit FNV-1a: stable across builds and platforms (the MAC must not change with the
/// compiler, unlike `DefaultHasher`'s).
fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for b in *part {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}

/// A locally administered unicast MAC for `vm` of violin `violin`, not in `used` (lower case).
pub fn mac_for(vm: &str, violin: u32, used: &BTreeSet<String>) -> Result<String, AllocError> {
    for attempt in 0u32..1024 {
        let h = fnv1a(&[&violin.to_be_bytes(), vm.as_bytes(), &attempt.to_be_bytes()]);
        let b = h.to_be_bytes();
        let mac = format!(
            "02:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4]
        );
        if !used.contains(&mac) {
            return Ok(mac);
        }
    }
    Err(AllocError::NoMac(vm.to_owned()))
}

/// The names `viola vm create NAME --count N` makes: `NAME` alone for one, else `NAME-1` ..
/// `NAME-N`.
pub fn names_for(name: &str, count: u32) -> Vec<String> {
    if count <= 1 {
        vec![name.to_owned()]
    } else {
        (1..=count).map(|i| format!("{name}-{i}")).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn subnets_are_checked() {
        let s = Subnet::parse("10.7.0.0/24").unwrap();
        assert_eq!(s.server(), Ipv4Addr::new(10, 7, 0, 1));
        assert_eq!(s.to_string(), "10.7.0.0/24");
        for bad in [
            "10.7.0.1/24",
            "192.168.1.0/24",
            "10.0.0.0/8",
            "10.7.0.0/30",
            "10.7.0.0",
            "10.7.0.0/x",
            "",
        ] {
            assert!(Subnet::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(Subnet::default_for(1).to_string(), "10.0.1.0/24");
        assert_eq!(Subnet::default_for(300).to_string(), "10.1.44.0/24");
    }

    #[test]
    fn addresses_skip_network_server_broadcast_and_used_ones() {
        let s = Subnet::parse("10.7.0.0/29").unwrap();
        let mut used = BTreeSet::new();
        let mut got = Vec::new();
        while let Ok(ip) = s.next_free(&used) {
            assert!(s.assignable(ip));
            used.insert(ip);
            got.push(ip.octets()[3]);
        }
        assert_eq!(got, [2, 3, 4, 5, 6]);
        assert_eq!(
            s.next_free(&used),
            Err(AllocError::SubnetFull("10.7.0.0/29".into()))
        );
        assert!(!s.assignable(Ipv4Addr::new(10, 7, 0, 1)));
        assert!(!s.assignable(Ipv4Addr::new(10, 7, 0, 7)));
        assert!(!s.assignable(Ipv4Addr::new(10, 7, 1, 2)));
    }

    #[test]
    fn violin_ids_fill_gaps_from_one() {
        assert_eq!(next_violin_id(&BTreeSet::new()), Ok(1));
        assert_eq!(next_violin_id(&[1, 2, 4].into()), Ok(3));
    }

    #[test]
    fn names_are_checked() {
        assert!(check_violin_name("lab-1").is_ok());
        for bad in ["", "Lab", "a b", "x/y", &"a".repeat(33)] {
            assert!(check_violin_name(bad).is_err(), "{bad}");
        }
        assert!(check_vm_name("node_1-A").is_ok());
        for bad in ["", "a.b", "a'b", "<x>", &"a".repeat(49)] {
            assert!(check_vm_name(bad).is_err(), "{bad}");
        }
        assert_eq!(names_for("n", 1), ["n"]);
        assert_eq!(names_for("n", 3), ["n-1", "n-2", "n-3"]);
    }

    #[test]
    fn macs_are_stable_and_avoid_collisions() {
        let a = mac_for("vm1", 1, &BTreeSet::new()).unwrap();
        assert_eq!(a, mac_for("vm1", 1, &BTreeSet::new()).unwrap());
        assert_ne!(a, mac_for("vm1", 2, &BTreeSet::new()).unwrap());
        let b = mac_for("vm1", 1, &[a.clone()].into()).unwrap();
        assert_ne!(a, b);
    }

    proptest! {
        #[test]
        fn macs_are_locally_administered_unicast(vm in "[a-z0-9-]{1,20}", violin in 1u32..MAX_VIOLIN_ID) {
            let mac = mac_for(&vm, violin, &BTreeSet::new()).unwrap();
            let first = u8::from_str_radix(&mac[..2], 16).unwrap();
            prop_assert_eq!(first & 0b11, 0b10);
            prop_assert_eq!(mac.len(), 17);
        }

        #[test]
        fn parsing_never_panics_and_accepted_subnets_print_back(text in "\\PC{0,24}") {
            if let Ok(s) = Subnet::parse(&text) {
                prop_assert_eq!(Subnet::parse(&s.to_string()).unwrap(), s);
            }
        }
    }

    #[test]
    fn ssh_keys_travel_without_spaces_and_without_their_comment() {
        let key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGm5Tq1tJ0dwXz9r6k ann@laptop";
        assert_eq!(
            ssh_key_param(key).unwrap(),
            "ssh-ed25519,AAAAC3NzaC1lZDI1NTE5AAAAIGm5Tq1tJ0dwXz9r6k"
        );
        for bad in [
            "",
            "ssh-ed25519",
            "ssh-dss AAAAB3NzaC1kc3MAAACBAP",
            "ssh-ed25519 AAAA;rm${IFS}-rf",
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGm5\nssh-rsa AAAAB3NzaC1yc2EAAAADAQAB",
        ] {
            assert!(ssh_key_param(bad).is_err(), "{bad:?}");
        }
        let long = format!("ssh-rsa {}", "A".repeat(MAX_SSH_KEY));
        assert!(ssh_key_param(&long).is_err());
    }
}
