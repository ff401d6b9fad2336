//! Building libvirt domain XML for the VMs the manager creates (`viola vm create`).
//!
//! [`DomainSpec::to_xml`] prints what `scripts/guest/domain-xml.sh` prints for the lab guest
//! (TCG with the CPU model qemu64, so a VM can live-migrate between any two hosts; a qcow2 overlay
//! as `vda`; one virtio NIC on a bridge; the serial console to a file), and can also boot a
//! distribution image from its own bootloader ([`Boot::Disk`]) or put the console on a pty.
//!
//! Metadata: `<viola:image xmlns:viola='urn:viola:depot:1' ref='…'/>` records the depot image (the
//! manager's `migration::depot_stage` reads it) and `<viola:vm xmlns:viola='urn:viola:vm:1'
//! violin='…' tenant='…'/>` the violin and tenant the VM belongs to
//! ([`crate::xml::viola_vm_metadata`] reads it back).
//!
//! Port security: with a [`PortFilter`] the NIC carries a libvirt `<filterref>` (nwfilter,
//! e.g. libvirt's own `clean-traffic`) with the VM's MAC and address, so the host's bridge
//! drops what the guest sends from any other MAC or IPv4 address, and ARP claiming anyone
//! else's, before another guest on the same bridge sees it (the overlay guards only what
//! reaches its TAP: stage2 research §4). libvirt installs the filter on the destination's port
//! before a migrated VM resumes.
//!
//! Every value is escaped; names, the MAC, the bridge and the image ref are validated, and
//! free-form values (paths, the kernel command line) only have to be characters XML 1.0 can
//! carry.

use std::fmt::Write as _;

/// XML namespace of the depot image element (`viola_adaptmgr::migration::depot_stage`).
pub const DEPOT_METADATA_NS: &str = "urn:viola:depot:1";
/// XML namespace of the VM's violin/tenant element.
pub const VM_METADATA_NS: &str = "urn:viola:vm:1";
/// The emulator every Viola domain runs under.
pub const EMULATOR: &str = "/usr/bin/qemu-system-x86_64";
/// The name of the virtio-serial port a guest asks the shepherd through (`viola-ask` in the
/// guest; the host's monitor reads the other end).
pub const SHEPHERD_CHANNEL: &str = "org.viola.shepherd";

/// How a domain boots.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Boot {
    /// Direct kernel boot (the lab guest): the host's kernel and initramfs, with `cmdline`.
    Kernel {
        kernel: String,
        initrd: String,
        cmdline: String,
    },
    /// The disk's own bootloader (distribution images).
    Disk,
}

/// A libvirt nwfilter on the VM's NIC, with the VM's address as its `IP` parameter (libvirt
/// adds `MAC`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortFilter {
    /// A filter every host's libvirt knows: one of libvirt's own (`clean-traffic`) or one the
    /// administrator defined on every host (`virsh nwfilter-define`); 1 to 64 of
    /// `A-Z a-z 0-9 _ . -`.
    pub filter: String,
    /// The only IPv4 source address the guest may use (DHCP from `0.0.0.0` stays allowed).
    pub ip: std::net::Ipv4Addr,
}

/// Whether `s` can name an nwfilter: `^[A-Za-z0-9_.-]{1,64}$`.
pub fn is_valid_filter_name(s: &str) -> bool {
    (1..=64).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

/// Everything needed to define one VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainSpec {
    /// Domain name: 1 to 48 of `A-Z a-z 0-9 _ -`.
    pub name: String,
    /// Memory at boot (`<currentMemory>`).
    pub memory_mib: u64,
    /// Memory the balloon may grow to (`<memory>`); raised to `memory_mib` if below.
    pub max_memory_mib: u64,
    /// vCPUs online at boot.
    pub vcpus: u32,
    /// vCPUs that can be hot-plugged up to; raised to `vcpus` if below.
    pub max_vcpus: u32,
    /// The VM's qcow2 root disk (its overlay), attached as virtio `vda`.
    pub disk: String,
    /// Host bridge the NIC is plugged into: 1 to 15 of `A-Z a-z 0-9 _ . -`.
    pub bridge: String,
    /// The NIC's MAC (`52:54:00:12:34:56`), unicast; written in lower case.
    pub mac: String,
    /// MTU of the host side of the NIC (libvirt `<mtu size=…/>`).
    pub mtu: Option<u32>,
    pub boot: Boot,
    /// Serial console appended to this file; `None` puts it on a pty (`virsh console`).
    pub console_log: Option<String>,
    /// Depot image the VM runs from (`[A-Za-z0-9._-]+`).
    pub image_ref: Option<String>,
    /// Violin the VM belongs to (a name like the domain's).
    pub violin: Option<String>,
    /// Tenant the VM belongs to (a name like the domain's).
    pub tenant: Option<String>,
    /// Port security on the NIC; `None` lets the guest send from any MAC and address.
    pub port_filter: Option<PortFilter>,
}

/// Why a [`DomainSpec`] cannot be turned into XML.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DomainError {
    #[error("bad {field} {value:?}: want 1 to 48 characters of A-Z a-z 0-9 _ -")]
    BadName { field: &'static str, value: String },
    #[error("bad MAC address {0:?}: want six hex pairs separated by ':', unicast")]
    BadMac(String),
    #[error("bad bridge name {0:?}: want 1 to 15 characters of A-Z a-z 0-9 _ . -")]
    BadBridge(String),
    #[error("bad depot image ref {0:?}: want characters of A-Z a-z 0-9 . _ -")]
    BadImageRef(String),
    #[error("bad nwfilter name {0:?}: want 1 to 64 characters of A-Z a-z 0-9 _ . -")]
    BadFilterName(String),
    #[error("bad MTU {0}: want 68 to 65535")]
    BadMtu(u32),
    #[error("{0} must be at least 1")]
    Zero(&'static str),
    #[error("{0} is empty")]
    Empty(&'static str),
    #[error("{field} contains {ch:?}, which XML cannot carry")]
    Unrepresentable { field: &'static str, ch: char },
    #[error("bad {field} {value:?} for the kernel command line: no whitespace, not empty")]
    BadCmdlineValue { field: &'static str, value: String },
}

/// Whether `s` is a Viola name: `^[A-Za-z0-9_-]{1,48}$`.
pub fn is_valid_name(s: &str) -> bool {
    (1..=48).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Whether `s` is a unicast MAC written as six hex pairs separated by `:`.
pub fn is_valid_mac(s: &str) -> bool {
    let parts: Vec<&str> = s.split(':').collect();
    parts.len() == 6
        && parts
            .iter()
            .all(|p| p.len() == 2 && p.bytes().all(|b| b.is_ascii_hexdigit()))
        && u8::from_str_radix(parts[0], 16).is_ok_and(|first| first & 1 == 0)
}

fn check_name(field: &'static str, value: &str) -> Result<(), DomainError> {
    if is_valid_name(value) {
        Ok(())
    } else {
        Err(DomainError::BadName {
            field,
            value: value.to_owned(),
        })
    }
}

/// Characters XML 1.0 can carry (`Char` of the spec); everything else is refused.
fn xml_char(c: char) -> bool {
    matches!(c, '\t' | '\n' | '\r' | '\u{20}'..='\u{D7FF}' | '\u{E000}'..='\u{FFFD}' | '\u{10000}'..)
}

fn check_text(field: &'static str, value: &str, may_be_empty: bool) -> Result<(), DomainError> {
    if value.is_empty() && !may_be_empty {
        return Err(DomainError::Empty(field));
    }
    match value.chars().find(|c| !xml_char(*c)) {
        Some(ch) => Err(DomainError::Unrepresentable { field, ch }),
        None => Ok(()),
    }
}

/// Escapes `s` for XML text or a quoted attribute value (either quote). Tabs and line breaks
/// become character references so that attribute-value normalisation and line-end handling
/// leave them as they were.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '\'' => out.push_str("&apos;"),
            '"' => out.push_str("&quot;"),
            '\t' => out.push_str("&#9;"),
            '\n' => out.push_str("&#10;"),
            '\r' => out.push_str("&#13;"),
            c => out.push(c),
        }
    }
    out
}

impl DomainSpec {
    /// Checks every field; [`DomainSpec::to_xml`] calls it first.
    pub fn validate(&self) -> Result<(), DomainError> {
        check_name("domain name", &self.name)?;
        if self.memory_mib == 0 {
            return Err(DomainError::Zero("memory"));
        }
        if self.vcpus == 0 {
            return Err(DomainError::Zero("vcpus"));
        }
        check_text("disk path", &self.disk, false)?;
        let bridge_ok = (1..=15).contains(&self.bridge.len())
            && self
                .bridge
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
        if !bridge_ok {
            return Err(DomainError::BadBridge(self.bridge.clone()));
        }
        if !is_valid_mac(&self.mac) {
            return Err(DomainError::BadMac(self.mac.clone()));
        }
        if let Some(mtu) = self.mtu
            && !(68..=65535).contains(&mtu)
        {
            return Err(DomainError::BadMtu(mtu));
        }
        if let Boot::Kernel {
            kernel,
            initrd,
            cmdline,
        } = &self.boot
        {
            check_text("kernel path", kernel, false)?;
            check_text("initrd path", initrd, false)?;
            check_text("kernel command line", cmdline, true)?;
        }
        if let Some(log) = &self.console_log {
            check_text("console log path", log, false)?;
        }
        if let Some(image) = &self.image_ref {
            let ok = !image.is_empty()
                && image
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
            if !ok {
                return Err(DomainError::BadImageRef(image.clone()));
            }
        }
        if let Some(violin) = &self.violin {
            check_name("violin name", violin)?;
        }
        if let Some(tenant) = &self.tenant {
            check_name("tenant name", tenant)?;
        }
        if let Some(f) = &self.port_filter
            && !is_valid_filter_name(&f.filter)
        {
            return Err(DomainError::BadFilterName(f.filter.clone()));
        }
        Ok(())
    }

    /// The domain XML (what `scripts/guest/domain-xml.sh` prints for the same values).
    pub fn to_xml(&self) -> Result<String, DomainError> {
        self.validate()?;
        let e = escape;
        let max_memory = self.max_memory_mib.max(self.memory_mib);
        let max_vcpus = self.max_vcpus.max(self.vcpus);
        let mut x = String::new();
        // Writing to a String cannot fail.
        let _ = writeln!(x, "<domain type='qemu'>");
        let _ = writeln!(x, "  <name>{}</name>", e(&self.name));
        if self.image_ref.is_some() || self.violin.is_some() || self.tenant.is_some() {
            x.push_str("  <metadata>");
            if let Some(image) = &self.image_ref {
                let _ = write!(
                    x,
                    "<viola:image xmlns:viola='{DEPOT_METADATA_NS}' ref='{}'/>",
                    e(image)
                );
            }
            if self.violin.is_some() || self.tenant.is_some() {
                let _ = write!(x, "<viola:vm xmlns:viola='{VM_METADATA_NS}'");
                if let Some(violin) = &self.violin {
                    let _ = write!(x, " violin='{}'", e(violin));
                }
                if let Some(tenant) = &self.tenant {
                    let _ = write!(x, " tenant='{}'", e(tenant));
                }
                x.push_str("/>");
            }
            x.push_str("</metadata>\n");
        }
        let _ = writeln!(x, "  <memory unit='MiB'>{max_memory}</memory>");
        let _ = writeln!(
            x,
            "  <currentMemory unit='MiB'>{}</currentMemory>",
            self.memory_mib
        );
        let _ = writeln!(
            x,
            "  <vcpu placement='static' current='{}'>{max_vcpus}</vcpu>",
            self.vcpus
        );
        x.push_str("  <os>\n    <type arch='x86_64' machine='pc'>hvm</type>\n");
        match &self.boot {
            Boot::Kernel {
                kernel,
                initrd,
                cmdline,
            } => {
                let _ = writeln!(x, "    <kernel>{}</kernel>", e(kernel));
                let _ = writeln!(x, "    <initrd>{}</initrd>", e(initrd));
                let _ = writeln!(x, "    <cmdline>{}</cmdline>", e(cmdline));
            }
            Boot::Disk => x.push_str("    <boot dev='hd'/>\n"),
        }
        x.push_str(concat!(
            "  </os>\n",
            "  <features><acpi/><apic/></features>\n",
            "  <cpu mode='custom' match='exact' check='none'>",
            "<model fallback='forbid'>qemu64</model></cpu>\n",
            "  <clock offset='utc'/>\n",
            "  <on_poweroff>destroy</on_poweroff>\n",
            "  <on_reboot>restart</on_reboot>\n",
            "  <on_crash>destroy</on_crash>\n",
            "  <devices>\n",
        ));
        let _ = writeln!(x, "    <emulator>{EMULATOR}</emulator>");
        x.push_str("    <disk type='file' device='disk'>\n");
        x.push_str("      <driver name='qemu' type='qcow2' cache='none'/>\n");
        let _ = writeln!(x, "      <source file='{}'/>", e(&self.disk));
        x.push_str("      <target dev='vda' bus='virtio'/>\n    </disk>\n");
        x.push_str("    <interface type='bridge'>\n");
        let _ = writeln!(
            x,
            "      <mac address='{}'/>",
            e(&self.mac.to_ascii_lowercase())
        );
        let _ = writeln!(x, "      <source bridge='{}'/>", e(&self.bridge));
        x.push_str("      <model type='virtio'/>\n");
        if let Some(mtu) = self.mtu {
            let _ = writeln!(x, "      <mtu size='{mtu}'/>");
        }
        if let Some(f) = &self.port_filter {
            let _ = writeln!(
                x,
                "      <filterref filter='{}'><parameter name='IP' value='{}'/></filterref>",
                e(&f.filter),
                f.ip
            );
        }
        x.push_str("      <rom enabled='no'/>\n    </interface>\n");
        match &self.console_log {
            Some(log) => {
                x.push_str("    <serial type='file'>\n");
                let _ = writeln!(x, "      <source path='{}' append='on'/>", e(log));
                x.push_str("      <target port='0'/>\n    </serial>\n");
            }
            None => x.push_str(concat!(
                "    <serial type='pty'>\n      <target port='0'/>\n    </serial>\n",
                "    <console type='pty'>\n      <target type='serial' port='0'/>\n",
                "    </console>\n",
            )),
        }
        // The shepherd's channel: libvirt picks the socket's path (under its own state
        // directory, where QEMU's confinement lets it bind); the host's monitor reads it.
        let _ = writeln!(
            x,
            "    <channel type='unix'>\n      <source mode='bind'/>\n      \
             <target type='virtio' name='{SHEPHERD_CHANNEL}'/>\n    </channel>"
        );
        x.push_str("    <memballoon model='virtio'><stats period='2'/></memballoon>\n");
        x.push_str("  </devices>\n</domain>\n");
        Ok(x)
    }
}

/// The lab guest's kernel command line (as `scripts/guest/domain-xml.sh` writes it):
/// `console=ttyS0 quiet panic=-1 viola.name=N viola.ip=IP|dhcp [viola.http=1] [viola.mtu=M]`.
/// `ip` is `ADDR/PREFIX`, or `None` for DHCP.
pub fn lab_cmdline(
    name: &str,
    ip: Option<&str>,
    mtu: Option<u32>,
    http: bool,
) -> Result<String, DomainError> {
    check_name("domain name", name)?;
    let ip = ip.unwrap_or("dhcp");
    if ip.is_empty() || ip.chars().any(|c| c.is_whitespace() || !xml_char(c)) {
        return Err(DomainError::BadCmdlineValue {
            field: "ip",
            value: ip.to_owned(),
        });
    }
    let mut cmdline = format!("console=ttyS0 quiet panic=-1 viola.name={name} viola.ip={ip}");
    if http {
        cmdline.push_str(" viola.http=1");
    }
    if let Some(mtu) = mtu {
        let _ = write!(cmdline, " viola.mtu={mtu}");
    }
    Ok(cmdline)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::xml;
    use proptest::prelude::*;

    fn lab_spec() -> DomainSpec {
        DomainSpec {
            name: "vm1".into(),
            memory_mib: 256,
            max_memory_mib: 512,
            vcpus: 1,
            max_vcpus: 2,
            disk: "/var/lib/viola/vm1.qcow2".into(),
            bridge: "vbr-1".into(),
            mac: "52:54:00:AA:bb:01".into(),
            mtu: Some(1400),
            boot: Boot::Kernel {
                kernel: "/var/cache/viola/guest/vmlinuz".into(),
                initrd: "/var/cache/viola/guest/initrd.img".into(),
                cmdline: lab_cmdline("vm1", Some("10.1.0.5/24"), Some(1400), true).unwrap(),
            },
            console_log: Some("/var/lib/viola-lab/console/vm1.log".into()),
            image_ref: Some("abc123".into()),
            violin: Some("blue".into()),
            tenant: Some("acme_1".into()),
            port_filter: Some(PortFilter {
                filter: "clean-traffic".into(),
                ip: "10.1.0.5".parse().unwrap(),
            }),
        }
    }

    /// The element `path` (child names from the root) of a parsed document.
    fn node<'a, 'i>(
        doc: &'a roxmltree::Document<'i>,
        path: &[&str],
    ) -> Option<roxmltree::Node<'a, 'i>> {
        let mut n = doc.root_element();
        for name in path {
            n = n.children().find(|c| c.has_tag_name(*name))?;
        }
        Some(n)
    }

    fn depot_image(xml: &str) -> Option<String> {
        // As viola_adaptmgr::migration::depot_stage::depot_image reads it.
        let doc = roxmltree::Document::parse(xml).unwrap();
        doc.root_element()
            .children()
            .filter(|c| c.has_tag_name("metadata"))
            .flat_map(|m| m.children())
            .find(|n| {
                n.tag_name().namespace() == Some(DEPOT_METADATA_NS)
                    && n.tag_name().name() == "image"
            })
            .and_then(|n| n.attribute("ref"))
            .map(str::to_owned)
    }

    #[test]
    fn lab_cmdline_matches_the_script() {
        assert_eq!(
            lab_cmdline("vm1", None, Some(1400), true).unwrap(),
            "console=ttyS0 quiet panic=-1 viola.name=vm1 viola.ip=dhcp viola.http=1 viola.mtu=1400"
        );
        assert_eq!(
            lab_cmdline("vm1", Some("10.1.0.5/24"), None, false).unwrap(),
            "console=ttyS0 quiet panic=-1 viola.name=vm1 viola.ip=10.1.0.5/24"
        );
        assert!(lab_cmdline("vm 1", None, None, true).is_err());
        assert!(lab_cmdline("vm1", Some("10.1.0.5/24 init=/bin/sh"), None, true).is_err());
        assert!(lab_cmdline("vm1", Some(""), None, true).is_err());
    }

    #[test]
    fn lab_guest_reads_back() {
        let spec = lab_spec();
        let x = spec.to_xml().unwrap();
        roxmltree::Document::parse(&x).unwrap();
        assert_eq!(xml::domain_name(&x).unwrap(), "vm1");
        assert_eq!(xml::vcpus(&x).unwrap(), (1, 2));
        assert_eq!(xml::memory_kib(&x).unwrap(), (256 * 1024, 512 * 1024));
        let disks = xml::disks(&x).unwrap();
        assert_eq!(disks.len(), 1);
        assert_eq!(disks[0].target, "vda");
        assert_eq!(disks[0].path, spec.disk);
        assert_eq!(disks[0].format, "qcow2");
        let nics = xml::nics(&x).unwrap();
        assert_eq!(nics.len(), 1);
        assert_eq!(nics[0].mac, "52:54:00:aa:bb:01");
        assert_eq!(nics[0].bridge.as_deref(), Some("vbr-1"));
        assert_eq!(
            xml::viola_vm_metadata(&x).unwrap(),
            Some(xml::VmMetadata {
                violin: Some("blue".into()),
                tenant: Some("acme_1".into()),
            })
        );
        assert_eq!(depot_image(&x).as_deref(), Some("abc123"));
        let doc = roxmltree::Document::parse(&x).unwrap();
        assert_eq!(
            node(&doc, &["devices", "interface", "mtu"]).and_then(|n| n.attribute("size")),
            Some("1400")
        );
        let filter = node(&doc, &["devices", "interface", "filterref"]).unwrap();
        assert_eq!(filter.attribute("filter"), Some("clean-traffic"));
        let param = filter
            .children()
            .find(|c| c.has_tag_name("parameter"))
            .unwrap();
        assert_eq!(
            (param.attribute("name"), param.attribute("value")),
            (Some("IP"), Some("10.1.0.5"))
        );
    }

    #[test]
    fn port_filter_is_optional_and_its_name_checked() {
        let mut spec = lab_spec();
        spec.port_filter = None;
        assert!(!spec.to_xml().unwrap().contains("filterref"));
        for bad in ["", "clean traffic", "x'/><y", &"f".repeat(65)] {
            spec.port_filter = Some(PortFilter {
                filter: bad.to_owned(),
                ip: "10.1.0.5".parse().unwrap(),
            });
            assert_eq!(
                spec.to_xml(),
                Err(DomainError::BadFilterName(bad.to_owned())),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn metadata_is_optional_and_partial() {
        let mut spec = lab_spec();
        spec.image_ref = None;
        spec.violin = None;
        spec.tenant = None;
        let x = spec.to_xml().unwrap();
        assert!(!x.contains("<metadata>"));
        assert_eq!(xml::viola_vm_metadata(&x).unwrap(), None);
        assert_eq!(depot_image(&x), None);

        spec.tenant = Some("t1".into());
        let x = spec.to_xml().unwrap();
        assert_eq!(
            xml::viola_vm_metadata(&x).unwrap(),
            Some(xml::VmMetadata {
                violin: None,
                tenant: Some("t1".into()),
            })
        );
        assert_eq!(depot_image(&x), None);

        spec.tenant = None;
        spec.image_ref = Some("img.v2".into());
        let x = spec.to_xml().unwrap();
        assert_eq!(xml::viola_vm_metadata(&x).unwrap(), None);
        assert_eq!(depot_image(&x).as_deref(), Some("img.v2"));
    }

    #[test]
    fn disk_boot_and_pty_console() {
        let mut spec = lab_spec();
        spec.boot = Boot::Disk;
        spec.console_log = None;
        spec.mtu = None;
        let x = spec.to_xml().unwrap();
        let doc = roxmltree::Document::parse(&x).unwrap();
        assert!(node(&doc, &["os", "kernel"]).is_none());
        assert_eq!(
            node(&doc, &["os", "boot"]).and_then(|n| n.attribute("dev")),
            Some("hd")
        );
        assert_eq!(
            node(&doc, &["devices", "serial"]).and_then(|n| n.attribute("type")),
            Some("pty")
        );
        assert!(node(&doc, &["devices", "console"]).is_some());
        assert!(node(&doc, &["devices", "interface", "mtu"]).is_none());
    }

    #[test]
    fn maxima_are_raised_to_the_current_values() {
        let mut spec = lab_spec();
        spec.max_memory_mib = 0;
        spec.max_vcpus = 0;
        let x = spec.to_xml().unwrap();
        assert_eq!(xml::vcpus(&x).unwrap(), (1, 1));
        assert_eq!(xml::memory_kib(&x).unwrap(), (256 * 1024, 256 * 1024));
    }

    #[test]
    fn bad_values_are_refused() {
        let bad = |f: &dyn Fn(&mut DomainSpec)| {
            let mut spec = lab_spec();
            f(&mut spec);
            spec.to_xml().unwrap_err()
        };
        for name in [
            "",
            "vm 1",
            "vm'1",
            "vm<1>",
            "vm.1",
            "vm/1",
            &"x".repeat(49),
            "vé",
        ] {
            assert!(
                matches!(bad(&|s| s.name = name.into()), DomainError::BadName { .. }),
                "{name:?}"
            );
        }
        assert!(matches!(
            bad(&|s| s.violin = Some("a b".into())),
            DomainError::BadName { .. }
        ));
        assert!(matches!(
            bad(&|s| s.tenant = Some(String::new())),
            DomainError::BadName { .. }
        ));
        for mac in [
            "",
            "52:54:00:aa:bb",
            "52:54:00:aa:bb:cc:dd",
            "52-54-00-aa-bb-cc",
            "52:54:00:aa:bb:cg",
            "52:54:00:aa:bb:c",
            "01:00:5e:00:00:01", // multicast
            "52:54:00:aa:bb:cc'/>",
        ] {
            assert!(
                matches!(bad(&|s| s.mac = mac.into()), DomainError::BadMac(_)),
                "{mac:?}"
            );
        }
        for bridge in ["", "br 0", "br/0", "a-very-long-bridge", "br'0"] {
            assert!(
                matches!(
                    bad(&|s| s.bridge = bridge.into()),
                    DomainError::BadBridge(_)
                ),
                "{bridge:?}"
            );
        }
        assert!(matches!(
            bad(&|s| s.image_ref = Some("a'b".into())),
            DomainError::BadImageRef(_)
        ));
        assert!(matches!(bad(&|s| s.mtu = Some(0)), DomainError::BadMtu(0)));
        assert!(matches!(bad(&|s| s.vcpus = 0), DomainError::Zero(_)));
        assert!(matches!(bad(&|s| s.memory_mib = 0), DomainError::Zero(_)));
        assert!(matches!(
            bad(&|s| s.disk = String::new()),
            DomainError::Empty(_)
        ));
        assert!(matches!(
            bad(&|s| s.disk = "/a\u{1}b".into()),
            DomainError::Unrepresentable { ch: '\u{1}', .. }
        ));
        assert!(matches!(
            bad(&|s| s.console_log = Some("/log\u{FFFF}".into())),
            DomainError::Unrepresentable { .. }
        ));
    }

    #[test]
    fn the_fake_hypervisor_defines_it() {
        use crate::Hypervisor as _;
        let cluster = crate::fake::FakeCluster::new();
        let hv = cluster.host("fake://a1");
        let spec = lab_spec();
        assert_eq!(hv.define(&spec.to_xml().unwrap()).unwrap(), "vm1");
        hv.start("vm1").unwrap();
        let summary = hv.domain("vm1").unwrap().unwrap();
        assert_eq!((summary.vcpus, summary.max_vcpus), (1, 2));
        assert_eq!(summary.memory_kib, 256 * 1024);
        assert_eq!(hv.disks("vm1").unwrap()[0].path, spec.disk);
        assert_eq!(hv.nics("vm1").unwrap()[0].mac, "52:54:00:aa:bb:01");
    }

    /// The same values through `scripts/guest/domain-xml.sh` give the same XML (the script leaves
    /// a blank line where it has no metadata or MTU; blank lines are not compared).
    #[test]
    fn same_as_domain_xml_sh() {
        let script = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../scripts/guest/domain-xml.sh"
        );
        let console_dir =
            std::env::temp_dir().join(format!("viola-domain-xml-{}", std::process::id()));
        for (ip, mtu, image) in [
            ("10.1.0.5/24", Some(1400), Some("abc123")),
            ("dhcp", None, None),
        ] {
            let mut args = vec![
                "--name",
                "vm1",
                "--disk",
                "/img/vm1.qcow2",
                "--bridge",
                "vbr-1",
                "--ip",
                ip,
                "--mac",
                "52:54:00:aa:bb:01",
                "--memory-mib",
                "256",
                "--max-memory-mib",
                "512",
                "--vcpus",
                "1",
                "--max-vcpus",
                "2",
            ];
            let mtu_s = mtu.map(|m: u32| m.to_string());
            if let Some(m) = &mtu_s {
                args.extend(["--mtu", m]);
            }
            if let Some(image) = image {
                args.extend(["--depot-image", image]);
            }
            let out = std::process::Command::new("bash")
                .arg(script)
                .args(&args)
                .env("VIOLA_GUEST_DIR", "/guest")
                .env("VIOLA_CONSOLE_DIR", &console_dir)
                .output()
                .expect("run domain-xml.sh");
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            let spec = DomainSpec {
                name: "vm1".into(),
                memory_mib: 256,
                max_memory_mib: 512,
                vcpus: 1,
                max_vcpus: 2,
                disk: "/img/vm1.qcow2".into(),
                bridge: "vbr-1".into(),
                mac: "52:54:00:aa:bb:01".into(),
                mtu,
                boot: Boot::Kernel {
                    kernel: "/guest/vmlinuz".into(),
                    initrd: "/guest/initrd.img".into(),
                    cmdline: lab_cmdline("vm1", Some(ip).filter(|i| *i != "dhcp"), mtu, true)
                        .unwrap(),
                },
                console_log: Some(format!("{}/vm1.log", console_dir.display())),
                image_ref: image.map(str::to_owned),
                violin: None,
                tenant: None,
                port_filter: None,
            };
            let lines = |s: &str| -> Vec<String> {
                s.lines()
                    .filter(|l| !l.trim().is_empty())
                    .map(str::to_owned)
                    .collect()
            };
            assert_eq!(
                lines(&String::from_utf8(out.stdout).unwrap()),
                lines(&spec.to_xml().unwrap())
            );
        }
        let _ = std::fs::remove_dir_all(&console_dir);
    }

    /// Characters XML 1.0 can carry, weighted towards the ones that need escaping.
    fn xml_text() -> impl Strategy<Value = String> {
        proptest::collection::vec(
            prop_oneof![
                3 => proptest::sample::select(vec![
                    '&', '<', '>', '\'', '"', '\t', '\n', '\r', ' ', ']', ';', '#', '='
                ]),
                3 => any::<char>().prop_filter("XML 1.0 Char", |c| xml_char(*c)),
                4 => proptest::char::range('a', 'z'),
            ],
            1..40,
        )
        .prop_map(|v| v.into_iter().collect())
    }

    proptest! {
        #[test]
        fn arbitrary_paths_and_cmdline_read_back(
            disk in xml_text(),
            kernel in xml_text(),
            initrd in xml_text(),
            cmdline in xml_text(),
            log in xml_text(),
        ) {
            let mut spec = lab_spec();
            spec.disk = disk.clone();
            spec.boot = Boot::Kernel {
                kernel: kernel.clone(),
                initrd: initrd.clone(),
                cmdline: cmdline.clone(),
            };
            spec.console_log = Some(log.clone());
            let x = spec.to_xml().unwrap();
            let doc = roxmltree::Document::parse(&x).unwrap();
            prop_assert_eq!(node(&doc, &["os", "kernel"]).and_then(|n| n.text()), Some(kernel.as_str()));
            prop_assert_eq!(node(&doc, &["os", "initrd"]).and_then(|n| n.text()), Some(initrd.as_str()));
            prop_assert_eq!(node(&doc, &["os", "cmdline"]).and_then(|n| n.text()), Some(cmdline.as_str()));
            prop_assert_eq!(
                node(&doc, &["devices", "serial", "source"]).and_then(|n| n.attribute("path")),
                Some(log.as_str())
            );
            prop_assert_eq!(&xml::disks(&x).unwrap()[0].path, &disk);
            prop_assert_eq!(xml::domain_name(&x).unwrap(), "vm1");
            prop_assert_eq!(&xml::nics(&x).unwrap()[0].mac, "52:54:00:aa:bb:01");
        }

        #[test]
        fn valid_names_and_macs_read_back(
            name in "[A-Za-z0-9_-]{1,48}",
            violin in "[A-Za-z0-9_-]{1,48}",
            tenant in "[A-Za-z0-9_-]{1,48}",
            mac in "[0-9a-f][02468ace](:[0-9a-fA-F]{2}){5}",
        ) {
            let mut spec = lab_spec();
            spec.name = name.clone();
            spec.violin = Some(violin.clone());
            spec.tenant = Some(tenant.clone());
            spec.mac = mac.clone();
            let x = spec.to_xml().unwrap();
            prop_assert_eq!(xml::domain_name(&x).unwrap(), name);
            prop_assert_eq!(&xml::nics(&x).unwrap()[0].mac, &mac.to_ascii_lowercase());
            prop_assert_eq!(
                xml::viola_vm_metadata(&x).unwrap(),
                Some(xml::VmMetadata { violin: Some(violin), tenant: Some(tenant) })
            );
        }
    }
}
