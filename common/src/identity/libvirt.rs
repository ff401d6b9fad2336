//! Certificates for a host's libvirtd and QEMU, issued by the federation CA, so that live
//! migrations between hosts are encrypted and mutually authenticated: libvirt's `qemu+tls`
//! transport between the libvirtds, and QEMU's TLS migration stream (`VIR_MIGRATE_TLS`, which
//! also covers the NBD disk copy) between the QEMUs.
//!
//! A host gets one certificate, valid for TLS server and client authentication: in a
//! peer-to-peer migration the source's libvirtd is a client of the destination's, and the
//! source's QEMU a client of the destination's. It names the host by its identity URI
//! `viola://libvirt/SITE/HOST` (role [`Role::Libvirt`], which no Viola service accepts), by
//! `HOST.SITE.libvirt.viola`, by its host name, and by every address and DNS name other hosts'
//! libvirtds use in migration URIs: libvirt and QEMU check the URI's host against these names
//! (or the name given as the migration's TLS destination).
//!
//! [`write_layout`] writes the files where libvirt and QEMU look for them below a PKI directory
//! (`/etc/pki` on a host):
//!
//! | file | for |
//! |---|---|
//! | `CA/cacert.pem` | libvirtd (and virsh): the federation CA |
//! | `libvirt/servercert.pem`, `libvirt/private/serverkey.pem` | libvirtd's TLS listener |
//! | `libvirt/clientcert.pem`, `libvirt/private/clientkey.pem` | libvirtd or virsh connecting to another host |
//! | `qemu/ca-cert.pem`, `qemu/server-cert.pem`, `qemu/server-key.pem`, `qemu/client-cert.pem`, `qemu/client-key.pem` | QEMU (`default_tls_x509_cert_dir`) |
//!
//! Keys are written with mode 0600. Where QEMU runs as a user of its own (Debian's
//! `libvirt-qemu`), its group needs read access to the `qemu/` keys.

use std::fs;
use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use rcgen::{KeyUsagePurpose, SanType};

use super::{CaError, CertificateAuthority, IssuedCertificate, PeerIdentity, Role};

/// The host a libvirt certificate is for, and the names other hosts reach it by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LibvirtHost {
    pub site: String,
    /// Its host name (a DNS label), also a DNS name in the certificate.
    pub host: String,
    /// Addresses that other hosts' migration URIs name (`qemu+tls://ADDRESS/system`).
    pub addresses: Vec<IpAddr>,
    /// Further DNS names other hosts' migration URIs may name (e.g. a fully qualified name).
    pub dns_names: Vec<String>,
}

impl CertificateAuthority {
    /// Issues `host`'s libvirt certificate, valid for `valid_days` days, with a fresh key.
    pub fn issue_libvirt(
        &self,
        host: &LibvirtHost,
        valid_days: u32,
    ) -> Result<IssuedCertificate, CaError> {
        let identity =
            PeerIdentity::new(Role::Libvirt, &host.site, &host.host).map_err(CaError::Name)?;
        let dns = |s: &str| {
            s.to_owned()
                .try_into()
                .map(SanType::DnsName)
                .map_err(CaError::Generate)
        };
        let mut sans = vec![dns(&host.host)?];
        for name in &host.dns_names {
            sans.push(dns(name)?);
        }
        sans.extend(host.addresses.iter().copied().map(SanType::IpAddress));
        self.sign(
            &identity,
            // libvirt's tls_allowed_dn_list matches the subject: the host name is what an
            // administrator would write there.
            host.host.clone(),
            sans,
            // libvirt and QEMU refuse a certificate whose (critical) key usage lacks key
            // encipherment, whatever the key type.
            vec![
                KeyUsagePurpose::DigitalSignature,
                KeyUsagePurpose::KeyEncipherment,
            ],
            valid_days,
        )
    }
}

/// One file of the layout: its path below the PKI directory, and whether it is a private key.
const LAYOUT: [(&str, Part, bool); 10] = [
    ("CA/cacert.pem", Part::Ca, false),
    ("libvirt/servercert.pem", Part::Cert, false),
    ("libvirt/private/serverkey.pem", Part::Key, true),
    ("libvirt/clientcert.pem", Part::Cert, false),
    ("libvirt/private/clientkey.pem", Part::Key, true),
    ("qemu/ca-cert.pem", Part::Ca, false),
    ("qemu/server-cert.pem", Part::Cert, false),
    ("qemu/server-key.pem", Part::Key, true),
    ("qemu/client-cert.pem", Part::Cert, false),
    ("qemu/client-key.pem", Part::Key, true),
];

#[derive(Clone, Copy)]
enum Part {
    Ca,
    Cert,
    Key,
}

/// Writes `cert` in libvirt's and QEMU's layout below `pki_dir` (see the module docs), creating
/// directories; replaces existing files, each in one rename, so that a libvirtd or QEMU reading
/// during a renewal sees the old file or the new one. Returns the files written.
pub fn write_layout(cert: &IssuedCertificate, pki_dir: &Path) -> Result<Vec<PathBuf>, CaError> {
    let mut written = Vec::with_capacity(LAYOUT.len());
    for (rel, part, private) in LAYOUT {
        let path = pki_dir.join(rel);
        let text = match part {
            Part::Ca => &cert.ca_pem,
            Part::Cert => &cert.cert_pem,
            Part::Key => &cert.key_pem,
        };
        create_parent(&path)?;
        replace_file(&path, text, private)?;
        written.push(path);
    }
    Ok(written)
}

/// Where libvirt and QEMU look for the federation's revocation list below a PKI directory.
/// libvirt reads `CA/cacrl.pem` each time it connects to another host's libvirtd (the source of
/// a migration refuses a revoked destination); QEMU reads `qemu/ca-crl.pem` each time it
/// listens for an incoming migration (the destination refuses a revoked source). A libvirtd's
/// own listener reads it only when it starts.
pub const CRL_LAYOUT: [&str; 2] = ["CA/cacrl.pem", "qemu/ca-crl.pem"];

/// Why the host's libvirtd could not be told to read its TLS files again.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("cannot run virt-admin (libvirt-clients)")]
    Spawn(#[source] std::io::Error),
    #[error("virt-admin server-update-tls libvirtd failed: {0}")]
    Refused(String),
}

/// Tells the host's running libvirtd to read its TLS files again (the CA, the CRL, its
/// certificate and key): `virt-admin server-update-tls libvirtd`, over libvirtd's local admin
/// socket. Without it, its TLS listener reads them only when it starts, so a revoked host could
/// still connect to it and a renewed certificate would wait for a restart. libvirtd as a client
/// and QEMU read the files at each connection and need no reload.
pub fn reload_libvirtd_tls() -> Result<(), ReloadError> {
    let out = std::process::Command::new("virt-admin")
        .args(["-c", "libvirtd:///system", "server-update-tls", "libvirtd"])
        .output()
        .map_err(ReloadError::Spawn)?;
    if out.status.success() {
        Ok(())
    } else {
        Err(ReloadError::Refused(
            String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        ))
    }
}

/// Writes the federation's CRL (`crl_pem`) where libvirt and QEMU read it below `pki_dir`
/// ([`CRL_LAYOUT`]), each file in one rename. Returns the files written.
pub fn write_crl(crl_pem: &str, pki_dir: &Path) -> Result<Vec<PathBuf>, CaError> {
    let mut written = Vec::with_capacity(CRL_LAYOUT.len());
    for rel in CRL_LAYOUT {
        let path = pki_dir.join(rel);
        create_parent(&path)?;
        replace_file(&path, crl_pem, false)?;
        written.push(path);
    }
    Ok(written)
}

fn create_parent(path: &Path) -> Result<(), CaError> {
    match path.parent() {
        Some(dir) => fs::create_dir_all(dir).map_err(|source| CaError::Io {
            path: dir.to_owned(),
            source,
        }),
        None => Ok(()),
    }
}

fn replace_file(path: &Path, text: &str, private: bool) -> Result<(), CaError> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let io_err = |path: &Path| {
        let path = path.to_owned();
        move |source| CaError::Io { path, source }
    };
    // A leftover of an interrupted run would keep its old mode through `create`.
    match fs::remove_file(&tmp) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io_err(&tmp)(e)),
        _ => {}
    }
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(if private { 0o600 } else { 0o644 })
        .open(&tmp)
        .map_err(io_err(&tmp))?;
    f.write_all(text.as_bytes()).map_err(io_err(&tmp))?;
    f.sync_all().map_err(io_err(&tmp))?;
    fs::rename(&tmp, path).map_err(io_err(path))
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;
    use std::sync::Arc;

    use rcgen::KeyPair;
    use rustls::RootCertStore;
    use rustls::client::WebPkiServerVerifier;
    use rustls::client::danger::ServerCertVerifier;
    use rustls::server::WebPkiClientVerifier;
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
    use x509_parser::extensions::GeneralName;

    use super::*;
    use crate::identity::{identity_of, provider};

    fn host() -> LibvirtHost {
        LibvirtHost {
            site: "b".into(),
            host: "b1".into(),
            addresses: vec![IpAddr::V4(Ipv4Addr::new(198, 18, 2, 11))],
            dns_names: vec!["b1.example.org".into()],
        }
    }

    fn der(pem: &str) -> CertificateDer<'static> {
        CertificateDer::from_pem_slice(pem.as_bytes()).unwrap()
    }

    fn read(dir: &Path, rel: &str) -> String {
        fs::read_to_string(dir.join(rel)).unwrap()
    }

    /// Whether `leaf` verifies as a TLS server named `name` against `ca` (chain, validity,
    /// name, server-auth usage), and as a TLS client.
    fn verify(ca: &str, leaf: &str, name: &str) -> (Result<(), String>, Result<(), String>) {
        let mut roots = RootCertStore::empty();
        roots.add(der(ca)).unwrap();
        let roots = Arc::new(roots);
        let server = WebPkiServerVerifier::builder_with_provider(roots.clone(), provider())
            .build()
            .unwrap();
        let client = WebPkiClientVerifier::builder_with_provider(roots, provider())
            .build()
            .unwrap();
        let name = ServerName::try_from(name.to_owned()).unwrap();
        let now = UnixTime::now();
        (
            server
                .verify_server_cert(&der(leaf), &[], &name, &[], now)
                .map(|_| ())
                .map_err(|e| e.to_string()),
            client
                .verify_client_cert(&der(leaf), &[], now)
                .map(|_| ())
                .map_err(|e| e.to_string()),
        )
    }

    #[test]
    fn layout_holds_what_libvirt_and_qemu_expect() {
        let dir = tempfile::tempdir().unwrap();
        let ca = CertificateAuthority::generate("test", 30).unwrap();
        let issued = ca.issue_libvirt(&host(), 10).unwrap();
        let files = write_layout(&issued, dir.path()).unwrap();
        assert_eq!(files.len(), 10);
        let d = dir.path();
        for ca_file in ["CA/cacert.pem", "qemu/ca-cert.pem"] {
            assert_eq!(read(d, ca_file), ca.cert_pem(), "{ca_file}");
        }
        // Each certificate file with its key file: libvirt and QEMU, as server and client, all
        // hold the issued pair.
        let pairs = [
            ("libvirt/servercert.pem", "libvirt/private/serverkey.pem"),
            ("libvirt/clientcert.pem", "libvirt/private/clientkey.pem"),
            ("qemu/server-cert.pem", "qemu/server-key.pem"),
            ("qemu/client-cert.pem", "qemu/client-key.pem"),
        ];
        for (cert, key) in pairs {
            assert_eq!(read(d, cert), issued.cert_pem, "{cert}");
            assert_eq!(read(d, key), issued.key_pem, "{key}");
            let mode = std::os::unix::fs::PermissionsExt::mode(
                &fs::metadata(d.join(key)).unwrap().permissions(),
            );
            assert_eq!(mode & 0o077, 0, "{key} must not be group/world readable");
        }
        // Renewal replaces every file (no leftovers of the temporary names).
        let renewed = ca.issue_libvirt(&host(), 10).unwrap();
        write_layout(&renewed, d).unwrap();
        assert_eq!(read(d, "qemu/server-cert.pem"), renewed.cert_pem);
        assert!(!d.join("qemu/server-cert.pem.tmp").exists());
    }

    #[test]
    fn certificate_chains_to_the_ca_for_every_name_and_both_ends() {
        let ca = CertificateAuthority::generate("test", 30).unwrap();
        let issued = ca.issue_libvirt(&host(), 10).unwrap();
        for name in ["198.18.2.11", "b1", "b1.example.org", "b1.b.libvirt.viola"] {
            let (server, client) = verify(ca.cert_pem(), &issued.cert_pem, name);
            assert_eq!(server, Ok(()), "as server {name}");
            assert_eq!(client, Ok(()), "as client");
        }
        // Not for another address or host.
        for name in ["198.18.2.12", "b2"] {
            let (server, _) = verify(ca.cert_pem(), &issued.cert_pem, name);
            assert!(server.is_err(), "{name} accepted");
        }
        // Not from another CA.
        let other = CertificateAuthority::generate("other", 30).unwrap();
        let (server, client) = verify(other.cert_pem(), &issued.cert_pem, "198.18.2.11");
        assert!(server.is_err() && client.is_err());
    }

    #[test]
    fn certificate_carries_identity_names_usages_and_its_key() {
        let ca = CertificateAuthority::generate("test", 30).unwrap();
        let issued = ca.issue_libvirt(&host(), 10).unwrap();
        let cert = der(&issued.cert_pem);
        assert_eq!(
            identity_of(&cert).unwrap().uri(),
            "viola://libvirt/b/b1",
            "the federation identity stays"
        );
        let (_, x509) = x509_parser::parse_x509_certificate(cert.as_ref()).unwrap();
        let san = x509.subject_alternative_name().unwrap().unwrap();
        let mut dns = Vec::new();
        let mut ips = Vec::new();
        for n in &san.value.general_names {
            match n {
                GeneralName::DNSName(d) => dns.push(d.to_string()),
                GeneralName::IPAddress(ip) => ips.push(ip.to_vec()),
                _ => {}
            }
        }
        for want in ["b1", "b1.example.org", "b1.b.libvirt.viola"] {
            assert!(dns.iter().any(|d| d == want), "{want} missing in {dns:?}");
        }
        assert_eq!(ips, vec![vec![198, 18, 2, 11]]);
        let ku = x509.key_usage().unwrap().unwrap();
        assert!(ku.critical);
        assert!(ku.value.digital_signature() && ku.value.key_encipherment());
        let eku = x509.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.server_auth && eku.client_auth);
        assert!(!x509.is_ca());
        assert_eq!(
            x509.subject().iter_common_name().next().unwrap().as_str(),
            Ok("b1")
        );
        // The key file holds the certificate's key.
        let key = KeyPair::from_pem(&issued.key_pem).unwrap();
        assert_eq!(key.public_key_der(), x509.public_key().raw);
    }

    #[test]
    fn bad_host_names_are_refused() {
        let ca = CertificateAuthority::generate("test", 30).unwrap();
        let bad = LibvirtHost {
            host: "B_1".into(),
            ..host()
        };
        assert!(matches!(ca.issue_libvirt(&bad, 10), Err(CaError::Name(_))));
    }
}
