//! Reading what the manager needs out of libvirt domain XML (disks with their backing chain,
//! NICs, name). Pure functions over text, shared by the libvirt backend and the fake.

use crate::{DiskInfo, NicInfo};

/// Why domain XML could not be read.
#[derive(Debug, thiserror::Error)]
pub enum XmlError {
    #[error("not well-formed XML")]
    Parse(#[source] roxmltree::Error),
    #[error("missing <{0}>")]
    Missing(&'static str),
}

fn child<'a, 'i>(node: roxmltree::Node<'a, 'i>, name: &str) -> Option<roxmltree::Node<'a, 'i>> {
    node.children().find(|c| c.has_tag_name(name))
}

/// The `<name>` of a domain.
pub fn domain_name(xml: &str) -> Result<String, XmlError> {
    let doc = roxmltree::Document::parse(xml).map_err(XmlError::Parse)?;
    child(doc.root_element(), "name")
        .and_then(|n| n.text())
        .map(|t| t.trim().to_owned())
        .filter(|t| !t.is_empty())
        .ok_or(XmlError::Missing("name"))
}

/// File-backed disks (`<disk type='file' device='disk'>`) with the image right below the top.
pub fn disks(xml: &str) -> Result<Vec<DiskInfo>, XmlError> {
    let doc = roxmltree::Document::parse(xml).map_err(XmlError::Parse)?;
    let devices = child(doc.root_element(), "devices").ok_or(XmlError::Missing("devices"))?;
    let mut out = Vec::new();
    for disk in devices.children().filter(|c| c.has_tag_name("disk")) {
        if disk.attribute("device").unwrap_or("disk") != "disk" {
            continue;
        }
        let Some(path) = child(disk, "source").and_then(|s| s.attribute("file")) else {
            continue;
        };
        let Some(target) = child(disk, "target").and_then(|t| t.attribute("dev")) else {
            continue;
        };
        let format = child(disk, "driver")
            .and_then(|d| d.attribute("type"))
            .unwrap_or("raw")
            .to_owned();
        let backing = child(disk, "backingStore").and_then(|b| {
            let path = child(b, "source")?.attribute("file")?;
            let format = child(b, "format")
                .and_then(|f| f.attribute("type"))
                .unwrap_or("raw");
            Some((path.to_owned(), format.to_owned()))
        });
        out.push(DiskInfo {
            target: target.to_owned(),
            path: path.to_owned(),
            format,
            backing,
            read_only: child(disk, "readonly").is_some(),
        });
    }
    Ok(out)
}

/// NICs with their MAC, bridge and host-side tap.
pub fn nics(xml: &str) -> Result<Vec<NicInfo>, XmlError> {
    let doc = roxmltree::Document::parse(xml).map_err(XmlError::Parse)?;
    let devices = child(doc.root_element(), "devices").ok_or(XmlError::Missing("devices"))?;
    let mut out = Vec::new();
    for nic in devices.children().filter(|c| c.has_tag_name("interface")) {
        let Some(mac) = child(nic, "mac").and_then(|m| m.attribute("address")) else {
            continue;
        };
        out.push(NicInfo {
            mac: mac.to_ascii_lowercase(),
            bridge: child(nic, "source")
                .and_then(|s| s.attribute("bridge"))
                .map(str::to_owned),
            tap: child(nic, "target")
                .and_then(|t| t.attribute("dev"))
                .map(str::to_owned),
        });
    }
    Ok(out)
}

/// The host-side socket of the unix channel whose virtio port is named `port` (libvirt
/// writes the path it chose into a running domain's XML), if the domain has one.
pub fn unix_channel_path(xml: &str, port: &str) -> Result<Option<String>, XmlError> {
    let doc = roxmltree::Document::parse(xml).map_err(XmlError::Parse)?;
    let devices = child(doc.root_element(), "devices").ok_or(XmlError::Missing("devices"))?;
    Ok(devices
        .children()
        .filter(|c| c.has_tag_name("channel") && c.attribute("type") == Some("unix"))
        .find(|c| child(*c, "target").and_then(|t| t.attribute("name")) == Some(port))
        .and_then(|c| child(c, "source")?.attribute("path"))
        .map(str::to_owned))
}

/// `(current, maximum)` vCPUs declared in the XML.
pub fn vcpus(xml: &str) -> Result<(u32, u32), XmlError> {
    let doc = roxmltree::Document::parse(xml).map_err(XmlError::Parse)?;
    let node = child(doc.root_element(), "vcpu").ok_or(XmlError::Missing("vcpu"))?;
    let max: u32 = node
        .text()
        .and_then(|t| t.trim().parse().ok())
        .ok_or(XmlError::Missing("vcpu"))?;
    let current = node
        .attribute("current")
        .and_then(|c| c.parse().ok())
        .unwrap_or(max);
    Ok((current, max))
}

/// `(current, maximum)` memory in KiB declared in the XML.
pub fn memory_kib(xml: &str) -> Result<(u64, u64), XmlError> {
    let doc = roxmltree::Document::parse(xml).map_err(XmlError::Parse)?;
    let root = doc.root_element();
    let read = |name: &'static str| -> Option<u64> {
        let node = child(root, name)?;
        let value: u64 = node.text()?.trim().parse().ok()?;
        Some(match node.attribute("unit").unwrap_or("KiB") {
            "b" | "bytes" => value / 1024,
            "k" | "KiB" => value,
            "M" | "MiB" => value * 1024,
            "G" | "GiB" => value * 1024 * 1024,
            _ => return None,
        })
    };
    let max = read("memory").ok_or(XmlError::Missing("memory"))?;
    Ok((read("currentMemory").unwrap_or(max), max))
}

/// The violin and tenant a domain belongs to, from its metadata
/// (`<viola:vm xmlns:viola='urn:viola:vm:1' violin='…' tenant='…'/>`, see
/// [`crate::domain::DomainSpec`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VmMetadata {
    pub violin: Option<String>,
    pub tenant: Option<String>,
}

/// The domain's [`VmMetadata`], `None` when its metadata has no element of that namespace.
/// Empty attributes read as absent.
pub fn viola_vm_metadata(xml: &str) -> Result<Option<VmMetadata>, XmlError> {
    let doc = roxmltree::Document::parse(xml).map_err(XmlError::Parse)?;
    let found = doc
        .root_element()
        .children()
        .filter(|c| c.has_tag_name("metadata"))
        .flat_map(|m| m.children())
        .find(|n| {
            n.tag_name().namespace() == Some(crate::domain::VM_METADATA_NS)
                && n.tag_name().name() == "vm"
        });
    Ok(found.map(|n| {
        let read = |name: &str| {
            n.attribute(name)
                .map(str::trim)
                .filter(|v| !v.is_empty())
                .map(str::to_owned)
        };
        VmMetadata {
            violin: read("violin"),
            tenant: read("tenant"),
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) const SAMPLE: &str = r#"<domain type='qemu'>
  <name>vm1</name>
  <memory unit='MiB'>256</memory>
  <currentMemory unit='KiB'>196608</currentMemory>
  <vcpu placement='static' current='1'>2</vcpu>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='/var/lib/libvirt/images/vm1.qcow2'/>
      <backingStore type='file'>
        <format type='qcow2'/>
        <source file='/var/lib/libvirt/images/base.qcow2'/>
        <backingStore/>
      </backingStore>
      <target dev='vda' bus='virtio'/>
    </disk>
    <disk type='file' device='cdrom'>
      <source file='/tmp/seed.iso'/>
      <target dev='hdc' bus='ide'/>
    </disk>
    <interface type='bridge'>
      <mac address='52:54:00:AA:BB:CC'/>
      <source bridge='vbr-1'/>
      <target dev='vnet3'/>
      <model type='virtio'/>
    </interface>
    <channel type='unix'>
      <source mode='bind' path='/var/lib/libvirt/qemu/channel/target/domain-3-vm1/org.viola.shepherd'/>
      <target type='virtio' name='org.viola.shepherd' state='connected'/>
    </channel>
    <channel type='unix'>
      <source mode='bind' path='/var/lib/libvirt/qemu/channel/target/domain-3-vm1/other'/>
      <target type='virtio' name='other'/>
    </channel>
  </devices>
</domain>"#;

    #[test]
    fn reads_disk_with_backing_and_skips_cdrom() {
        let d = disks(SAMPLE).unwrap();
        assert_eq!(d.len(), 1);
        assert_eq!(d[0].target, "vda");
        assert_eq!(d[0].path, "/var/lib/libvirt/images/vm1.qcow2");
        assert_eq!(d[0].format, "qcow2");
        assert_eq!(
            d[0].backing,
            Some(("/var/lib/libvirt/images/base.qcow2".into(), "qcow2".into()))
        );
    }

    #[test]
    fn finds_the_shepherd_channel_by_its_port_name() {
        assert_eq!(
            unix_channel_path(SAMPLE, crate::domain::SHEPHERD_CHANNEL)
                .unwrap()
                .as_deref(),
            Some("/var/lib/libvirt/qemu/channel/target/domain-3-vm1/org.viola.shepherd")
        );
        assert_eq!(unix_channel_path(SAMPLE, "absent").unwrap(), None);
    }

    #[test]
    fn reads_nic_mac_lowercased() {
        let n = nics(SAMPLE).unwrap();
        assert_eq!(n[0].mac, "52:54:00:aa:bb:cc");
        assert_eq!(n[0].bridge.as_deref(), Some("vbr-1"));
        assert_eq!(n[0].tap.as_deref(), Some("vnet3"));
    }

    #[test]
    fn reads_name_vcpus_and_memory_units() {
        assert_eq!(domain_name(SAMPLE).unwrap(), "vm1");
        assert_eq!(vcpus(SAMPLE).unwrap(), (1, 2));
        assert_eq!(memory_kib(SAMPLE).unwrap(), (196_608, 262_144));
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert!(domain_name("<domain><name>").is_err());
        assert!(disks("<domain/>").is_err());
        assert!(domain_name("<domain><name> </name></domain>").is_err());
    }
}
