//! Enrolment: everything a new host needs from the federation, made on the CA machine as one
//! bundle and installed on the host with one command (`viola-ca enrol`, `viola-ca install`).
//!
//! A bundle is one JSON file (mode 0600: it holds private keys). It carries a certificate per
//! daemon the host runs (overlay, monitor and its own depot; the manager when it runs there),
//! the manager's address, some peers, and the depots the host's depot fetches from. Every host
//! runs its own depot, which lays images down in this host's image directory and nowhere else:
//! no machine writes another's files. A site's depot is just the host depot the images are
//! imported into, which the others fetch from. `install` writes the identities under `/etc/viola/ROLE/` and a configuration per
//! daemon, `/etc/viola/ROLE.toml`, from what the bundle says. That is exactly what the units'
//! `ConditionPathExists` waits for. An existing configuration is kept unless `--force`, so a
//! re-enrolment renews the certificates without undoing an administrator's edits.
//!
//! The manager's configuration is the exception: it lists every host, depot and tenant of the
//! federation, which a bundle does not know, and a manager without its hosts would start and
//! refuse every monitor's report. So `install` writes only the manager's identity, and
//! [`Bundle::next_step`] says what the administrator does next.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::identity::libvirt;
use crate::identity::revocation::{CRL_FILE, Register, RevocationError, write_atomically};
use crate::identity::{
    CaError, CertificateAuthority, Identity, IssuedCertificate, PeerIdentity, Role,
};

/// What the bundle's format is; `install` refuses another.
pub const BUNDLE_VERSION: u32 = 2;

/// Where a host's depot lays its images down: the host's image directory, as its libvirtd sees
/// it (the manager's `images_host_dir`).
pub const HOST_IMAGE_DIR: &str = "/var/lib/viola/images";

/// Where the manager's package puts its commented example configuration, whatever `--etc`.
pub const MANAGER_EXAMPLE: &str = "/etc/viola/adaptmgr.toml.example";

/// What the CA machine knows about a new host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostPlan {
    pub site: String,
    pub host: String,
    /// The manager's QUIC endpoint (the monitor reports there).
    pub manager: SocketAddr,
    /// Overlay daemons of other hosts to start from (the rest are learnt from them).
    pub peers: Vec<SocketAddr>,
    /// Where this host's overlay listens.
    pub overlay_listen: SocketAddr,
    /// The host's own depot.
    pub depot: DepotPlan,
    /// Set to give the host its libvirtd's and QEMU's certificate for TLS migrations, naming
    /// these addresses and DNS names (what other hosts' migration URIs use).
    pub libvirt: Option<Names>,
    /// Set when the host also runs the manager: its certificate (role `adaptmgr`) names these
    /// addresses and DNS names, the ones browsers reach the dashboard by.
    pub manager_identity: Option<Names>,
    /// The machine runs the manager only, no VMs: its bundle holds the manager's certificate
    /// and nothing of a host's (no overlay, monitor, depot or libvirt certificate).
    pub manager_only: bool,
}

/// The addresses and DNS names a certificate names besides its identity: those a daemon is
/// reached by where its peers do not check the identity (libvirt's migration URIs, browsers).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Names {
    pub addresses: Vec<std::net::IpAddr>,
    pub dns_names: Vec<String>,
}

/// The new host's own depot: it stages images for this host only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct DepotPlan {
    /// The depots it fetches parts from, (site, address): its site's depot (where images are
    /// imported) and other sites'.
    pub peers: Vec<(String, SocketAddr)>,
}

/// One daemon's identity files.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdentityFiles {
    pub cert_pem: String,
    pub key_pem: String,
    pub ca_pem: String,
}

/// The bundle a host installs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Bundle {
    pub version: u32,
    pub site: String,
    pub host: String,
    pub manager: SocketAddr,
    pub peers: Vec<SocketAddr>,
    pub overlay_listen: SocketAddr,
    pub depot: DepotPlan,
    /// By role: `overlay`, `monitor`, `depot`, `adaptmgr`.
    pub identities: BTreeMap<String, IdentityFiles>,
    /// The federation's revocation list when the bundle was made (`crl.pem` in the CA
    /// directory), installed beside each identity.
    pub crl_pem: Option<String>,
    /// The host's libvirt and QEMU certificate (role `libvirt`), installed in libvirt's
    /// layout below the host's PKI directory (`/etc/pki`), with the CRL where they read it.
    pub libvirt: Option<IdentityFiles>,
}

/// Why a bundle could not be made or installed.
#[derive(Debug, thiserror::Error)]
pub enum EnrolError {
    #[error("host and site names")]
    Name(#[source] crate::identity::IdentityParseError),
    #[error("issuing a certificate")]
    Issue(#[source] CaError),
    #[error(
        "the manager's certificate names no address or DNS name: browsers could not reach its \
         dashboard (give --manager-address or --manager-dns-name)"
    )]
    ManagerUnnamed,
    #[error("a machine that runs only the manager runs no libvirt: it gets no libvirt certificate")]
    ManagerOnlyLibvirt,
    /// rcgen takes any ASCII string as a DNS name; no client would ever match a wrong one.
    #[error("{name:?} is not a DNS name (for the {role} certificate)")]
    DnsName { role: Role, name: String },
    #[error("recording the certificates in the CA's register")]
    Record(#[source] RevocationError),
    #[error("{} is not a Viola enrolment bundle", .path.display())]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("the bundle's libvirt certificate")]
    Identity(#[source] crate::identity::LoadError),
    #[error("bundle format {found} (this viola-ca reads {BUNDLE_VERSION})")]
    Version { found: u32 },
    #[error("{}", .path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl Names {
    /// Refuses a DNS name no client could match, before a certificate is issued with it.
    fn check(&self, role: Role) -> Result<(), EnrolError> {
        match self
            .dns_names
            .iter()
            .find(|n| rustls_pki_types::DnsName::try_from(n.as_str()).is_err())
        {
            Some(name) => Err(EnrolError::DnsName {
                role,
                name: name.clone(),
            }),
            None => Ok(()),
        }
    }
}

impl From<IssuedCertificate> for IdentityFiles {
    fn from(issued: IssuedCertificate) -> Self {
        Self {
            cert_pem: issued.cert_pem,
            key_pem: issued.key_pem,
            ca_pem: issued.ca_pem,
        }
    }
}

/// Issues the host's certificates (the manager's naming what browsers reach it by) and puts
/// them in a bundle with the plan and the CA's current revocation list, if it has one. The
/// caller notes them in the CA's register ([`Bundle::record`]).
pub fn make_bundle(
    ca: &CertificateAuthority,
    plan: &HostPlan,
    crl_pem: Option<String>,
    valid_days: u32,
) -> Result<Bundle, EnrolError> {
    // A wrong name refuses the bundle before any key is made.
    match &plan.manager_identity {
        Some(names) if names.addresses.is_empty() && names.dns_names.is_empty() => {
            return Err(EnrolError::ManagerUnnamed);
        }
        Some(names) => names.check(Role::Adaptmgr)?,
        None if plan.manager_only => return Err(EnrolError::ManagerUnnamed),
        None => {}
    }
    if let Some(names) = &plan.libvirt {
        if plan.manager_only {
            return Err(EnrolError::ManagerOnlyLibvirt);
        }
        names.check(Role::Libvirt)?;
    }
    let mut identities = BTreeMap::new();
    let host_roles: &[Role] = if plan.manager_only {
        &[]
    } else {
        &[Role::Overlay, Role::Monitor, Role::Depot]
    };
    for &role in host_roles {
        let id = PeerIdentity::new(role, &plan.site, &plan.host).map_err(EnrolError::Name)?;
        let issued = ca.issue(&id, valid_days).map_err(EnrolError::Issue)?;
        identities.insert(role.as_str().to_owned(), issued.into());
    }
    if let Some(names) = &plan.manager_identity {
        let id =
            PeerIdentity::new(Role::Adaptmgr, &plan.site, &plan.host).map_err(EnrolError::Name)?;
        let issued = ca
            .issue_with_names(&id, &names.addresses, &names.dns_names, valid_days)
            .map_err(EnrolError::Issue)?;
        identities.insert(Role::Adaptmgr.as_str().to_owned(), issued.into());
    }
    let libvirt = match &plan.libvirt {
        Some(names) => {
            let host = libvirt::LibvirtHost {
                site: plan.site.clone(),
                host: plan.host.clone(),
                addresses: names.addresses.clone(),
                dns_names: names.dns_names.clone(),
            };
            Some(
                ca.issue_libvirt(&host, valid_days)
                    .map_err(EnrolError::Issue)?
                    .into(),
            )
        }
        None => None,
    };
    Ok(Bundle {
        version: BUNDLE_VERSION,
        site: plan.site.clone(),
        host: plan.host.clone(),
        manager: plan.manager,
        peers: plan.peers.clone(),
        overlay_listen: plan.overlay_listen,
        depot: plan.depot.clone(),
        identities,
        crl_pem,
        libvirt,
    })
}

impl Bundle {
    /// Reads a bundle file.
    pub fn load(path: &Path) -> Result<Self, EnrolError> {
        let text = std::fs::read_to_string(path).map_err(|source| EnrolError::Io {
            path: path.to_owned(),
            source,
        })?;
        let parse_err = |source| EnrolError::Parse {
            path: path.to_owned(),
            source,
        };
        // The version first: another format's fields would not parse, and the error should
        // say which format it is, not that it is no bundle.
        #[derive(Deserialize)]
        struct Versioned {
            version: u32,
        }
        let Versioned { version } = serde_json::from_str(&text).map_err(parse_err)?;
        if version != BUNDLE_VERSION {
            return Err(EnrolError::Version { found: version });
        }
        serde_json::from_str(&text).map_err(parse_err)
    }

    /// Notes every certificate of the bundle in the CA's register (`issued.tsv`), so that
    /// `viola-ca revoke --identity` finds them.
    pub fn record(&self, register: &Register) -> Result<(), EnrolError> {
        for id in self.identities.values().chain(&self.libvirt) {
            register
                .record_issued(&id.cert_pem)
                .map_err(EnrolError::Record)?;
        }
        Ok(())
    }

    /// Writes the bundle (mode 0600).
    pub fn save(&self, path: &Path) -> Result<(), EnrolError> {
        let text = serde_json::to_string_pretty(self).unwrap_or_default();
        write(path, &text, 0o600)
    }

    /// The configuration of daemon `role` as `install` writes it, naming identities under
    /// `etc`; `None` for the manager (see the module's documentation) and unknown roles.
    pub fn config(&self, role: &str, etc: &Path) -> Option<String> {
        let id_dir = etc.join(role);
        let mut t = format!(
            "# Written by `viola-ca install` for {} (site {}); edit freely: a re-install keeps it.\n",
            self.host, self.site
        );
        match role {
            "overlay" => {
                let _ = write!(
                    t,
                    "listen = \"{}\"\nidentity_dir = \"{}\"\ncontrol_socket = \"/run/viola/overlay.sock\"\n\
                     metrics = \"127.0.0.1:9445\"\nstate_file = \"/var/lib/viola/overlay/violins.json\"\n",
                    self.overlay_listen,
                    id_dir.display()
                );
                for p in &self.peers {
                    let _ = write!(t, "\n[[peers]]\naddr = \"{p}\"\n");
                }
            }
            "monitor" => {
                let _ = write!(
                    t,
                    "host = \"{}\"\nsite = \"{}\"\nmanager = \"{}\"\nidentity_dir = \"{}\"\n\
                     libvirt_uri = \"qemu:///system\"\ninterval_ms = 5000\nmetrics_listen = \"127.0.0.1:9444\"\n\
                     overlay_socket = \"/run/viola/overlay.sock\"\n",
                    self.host,
                    self.site,
                    self.manager,
                    id_dir.display()
                );
            }
            "depot" => {
                let _ = write!(
                    t,
                    "site = \"{}\"\nstore = \"/var/lib/viola/depot\"\nlisten = \"0.0.0.0:7410\"\n\
                     identity_dir = \"{}\"\nmetrics_listen = \"127.0.0.1:9446\"\n\
                     # This host's own image directory: the depot lays images down for this host only.\n\
                     image_dir_template = \"{HOST_IMAGE_DIR}\"\nhosts = [{:?}]\n",
                    self.site,
                    id_dir.display(),
                    self.host
                );
                for (site, addr) in &self.depot.peers {
                    let _ = write!(t, "\n[[peers]]\nsite = \"{site}\"\naddr = \"{addr}\"\n");
                }
            }
            _ => return None,
        }
        Some(t)
    }

    /// Writes the identities under `etc/ROLE/` (keys 0600) and each daemon's configuration
    /// `etc/ROLE.toml` but the manager's ([`Bundle::next_step`]), keeping an existing one
    /// unless `force`; with `pki` (`/etc/pki`), the libvirt certificate in libvirt's and
    /// QEMU's layout there, and the CRL where they read it. Returns the files written.
    pub fn install(
        &self,
        etc: &Path,
        pki: Option<&Path>,
        force: bool,
    ) -> Result<Vec<PathBuf>, EnrolError> {
        let mut written = Vec::new();
        if let (Some(files), Some(pki)) = (&self.libvirt, pki) {
            let identity = Identity::from_pem(&files.cert_pem, &files.key_pem, &files.ca_pem)
                .map_err(EnrolError::Identity)?
                .id()
                .clone();
            let issued = IssuedCertificate {
                identity,
                cert_pem: files.cert_pem.clone(),
                key_pem: files.key_pem.clone(),
                ca_pem: files.ca_pem.clone(),
            };
            written.extend(libvirt::write_layout(&issued, pki).map_err(EnrolError::Issue)?);
            if let Some(crl) = &self.crl_pem {
                written.extend(libvirt::write_crl(crl, pki).map_err(EnrolError::Issue)?);
            }
        }
        for (role, id) in &self.identities {
            let dir = etc.join(role);
            std::fs::create_dir_all(&dir).map_err(|source| EnrolError::Io {
                path: dir.clone(),
                source,
            })?;
            // The key first: a daemon that re-reads its directory between two renames sees a
            // new key with the old certificate, refuses that pair and keeps the old one until
            // the certificate arrives too.
            let crl = self.crl_pem.as_ref().map(|c| (CRL_FILE, c, 0o644));
            for (name, text, mode) in [
                ("key.pem", &id.key_pem, 0o600),
                ("cert.pem", &id.cert_pem, 0o644),
                ("ca.pem", &id.ca_pem, 0o644),
            ]
            .into_iter()
            .chain(crl)
            {
                let path = dir.join(name);
                write(&path, text, mode)?;
                written.push(path);
            }
            let path = etc.join(format!("{role}.toml"));
            if (force || !path.exists())
                && let Some(config) = self.config(role, etc)
            {
                write(&path, &config, 0o644)?;
                written.push(path);
            }
        }
        Ok(written)
    }

    /// What is left to do after `install` into `etc`: `Some` when the bundle carries the
    /// manager's identity and `etc` has no configuration of the manager yet, which the
    /// administrator makes from the packaged example.
    pub fn next_step(&self, etc: &Path) -> Option<String> {
        let config = etc.join("adaptmgr.toml");
        if !self.identities.contains_key(Role::Adaptmgr.as_str()) || config.exists() {
            return None;
        }
        let unspecified: std::net::IpAddr = match self.manager {
            SocketAddr::V4(_) => std::net::Ipv4Addr::UNSPECIFIED.into(),
            SocketAddr::V6(_) => std::net::Ipv6Addr::UNSPECIFIED.into(),
        };
        Some(format!(
            "{config} not written: the manager's configuration lists the federation's hosts, \
             depots and tenants, which the bundle does not know.\n\
             Next: cp {MANAGER_EXAMPLE} {config}, then in it list every host ([[hosts]]), each \
             site's depot ([[depots]]) and the tenants ([[tenants]]), with\n  \
             identity_dir = \"{identity}\"\n  listen = \"{listen}\"\n\
             and start it: systemctl start viola-adaptmgr",
            config = config.display(),
            identity = etc.join(Role::Adaptmgr.as_str()).display(),
            listen = SocketAddr::new(unspecified, self.manager.port()),
        ))
    }
}

/// Writes by renaming a new file over the old one: a running daemon that re-reads its identity
/// directory sees either file whole (certificate renewal without a restart).
fn write(path: &Path, text: &str, mode: u32) -> Result<(), EnrolError> {
    write_atomically(path, text.as_bytes(), mode).map_err(|e| match e {
        RevocationError::Io { path, source } => EnrolError::Io { path, source },
        other => EnrolError::Io {
            path: path.to_owned(),
            source: std::io::Error::other(other.to_string()),
        },
    })
}

/// Installs a revocation list beside every identity below `etc` (each `etc/ROLE/` that holds a
/// `cert.pem`); returns the files written. The daemons pick it up at their next handshake.
pub fn install_crl(crl_pem: &str, etc: &Path) -> Result<Vec<PathBuf>, EnrolError> {
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| EnrolError::Io { path, source }
    };
    let mut written = Vec::new();
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(etc)
        .map_err(io(etc))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|d| d.join("cert.pem").is_file())
        .collect();
    dirs.sort();
    for dir in dirs {
        let path = dir.join(CRL_FILE);
        write(&path, crl_pem, 0o644)?;
        written.push(path);
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;
    use rustls_pki_types::pem::PemObject;

    fn plan() -> HostPlan {
        HostPlan {
            site: "a".into(),
            host: "a1".into(),
            manager: "192.0.2.10:7443".parse().unwrap(),
            peers: vec!["192.0.2.12:4500".parse().unwrap()],
            overlay_listen: "0.0.0.0:4500".parse().unwrap(),
            depot: DepotPlan {
                peers: vec![("b".into(), "198.51.100.11:7410".parse().unwrap())],
            },
            libvirt: None,
            manager_identity: None,
            manager_only: false,
        }
    }

    #[test]
    fn a_bundle_installs_identities_that_load_and_configurations_once() {
        let ca = CertificateAuthority::generate("test", 1).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a1.bundle");
        make_bundle(&ca, &plan(), None, 30)
            .unwrap()
            .save(&path)
            .unwrap();
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600,
            "the bundle holds keys"
        );
        let bundle = Bundle::load(&path).unwrap();
        let etc = dir.path().join("etc");
        let written = bundle.install(&etc, None, false).unwrap();
        assert_eq!(
            written.len(),
            3 * 3 + 3,
            "three identities, three configurations"
        );
        for role in ["overlay", "monitor", "depot"] {
            let id = Identity::load_dir(&etc.join(role)).unwrap();
            assert_eq!(id.id().role.as_str(), role);
            assert_eq!((id.id().site.as_str(), id.id().host.as_str()), ("a", "a1"));
            let key = etc.join(role).join("key.pem");
            assert_eq!(
                std::fs::metadata(key).unwrap().permissions().mode() & 0o777,
                0o600
            );
        }
        let monitor = std::fs::read_to_string(etc.join("monitor.toml")).unwrap();
        assert!(
            monitor.contains("manager = \"192.0.2.10:7443\""),
            "{monitor}"
        );
        // An administrator's edit survives a re-install; --force rewrites.
        std::fs::write(etc.join("monitor.toml"), "host = \"edited\"\n").unwrap();
        bundle.install(&etc, None, false).unwrap();
        assert_eq!(
            std::fs::read_to_string(etc.join("monitor.toml")).unwrap(),
            "host = \"edited\"\n"
        );
        bundle.install(&etc, None, true).unwrap();
        assert!(
            std::fs::read_to_string(etc.join("monitor.toml"))
                .unwrap()
                .contains("a1")
        );
    }

    #[test]
    fn a_bundle_of_another_format_is_refused_by_its_version() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("old.bundle");
        let ca = CertificateAuthority::generate("test", 1).unwrap();
        let mut v1 = serde_json::to_value(make_bundle(&ca, &plan(), None, 30).unwrap()).unwrap();
        v1["version"] = 1.into();
        v1["depot"] = serde_json::json!({"hosts": ["a1", "a2"], "peers": []});
        std::fs::write(&path, v1.to_string()).unwrap();
        let err = Bundle::load(&path).unwrap_err();
        assert_eq!(err.to_string(), "bundle format 1 (this viola-ca reads 2)");
        std::fs::write(&path, "{}").unwrap();
        assert!(matches!(Bundle::load(&path), Err(EnrolError::Parse { .. })));
    }

    #[test]
    fn a_manager_only_machine_gets_the_manager_s_certificate_and_nothing_of_a_host() {
        let ca = CertificateAuthority::generate("test", 1).unwrap();
        let plan = HostPlan {
            host: "mgr".into(),
            manager_only: true,
            ..manager_plan()
        };
        let bundle = make_bundle(&ca, &plan, None, 30).unwrap();
        assert_eq!(bundle.identities.keys().collect::<Vec<_>>(), ["adaptmgr"]);
        assert_eq!(bundle.libvirt, None);
        let dir = tempfile::tempdir().unwrap();
        let written = bundle.install(dir.path(), None, false).unwrap();
        assert!(
            written
                .iter()
                .all(|p| p.starts_with(dir.path().join("adaptmgr"))),
            "{written:?}"
        );
        let id = Identity::load_dir(&dir.path().join("adaptmgr")).unwrap();
        assert_eq!(id.id().uri(), "viola://adaptmgr/a/mgr");
        assert!(
            bundle.next_step(dir.path()).is_some(),
            "install says how to configure it"
        );
        // Without a name browsers could reach it by, or with a libvirt certificate: refused.
        let unnamed = HostPlan {
            manager_identity: None,
            ..plan.clone()
        };
        assert!(matches!(
            make_bundle(&ca, &unnamed, None, 30),
            Err(EnrolError::ManagerUnnamed)
        ));
        let with_libvirt = HostPlan {
            libvirt: Some(Names::default()),
            ..plan
        };
        assert!(matches!(
            make_bundle(&ca, &with_libvirt, None, 30),
            Err(EnrolError::ManagerOnlyLibvirt)
        ));
    }

    #[test]
    fn the_hosts_depot_stages_for_this_host_only_in_its_own_image_directory() {
        let ca = CertificateAuthority::generate("test", 1).unwrap();
        let bundle = make_bundle(&ca, &plan(), None, 30).unwrap();
        let text = bundle.config("depot", Path::new("/etc/viola")).unwrap();
        assert!(
            text.contains("image_dir_template = \"/var/lib/viola/images\"\n"),
            "{text}"
        );
        assert!(text.contains("hosts = [\"a1\"]\n"), "{text}");
        assert!(
            text.contains("site = \"b\"\naddr = \"198.51.100.11:7410\""),
            "{text}"
        );
        assert!(!text.contains("{host}"), "{text}");
    }

    #[test]
    fn a_bundle_gives_the_host_its_libvirt_certificate_and_the_crl_in_libvirt_s_layout() {
        let ca = CertificateAuthority::generate("test", 1).unwrap();
        let mut plan = plan();
        plan.libvirt = Some(Names {
            addresses: vec!["192.0.2.11".parse().unwrap()],
            dns_names: vec!["a1.example.org".into()],
        });
        let crl = ca.sign_crl(&[], 30).unwrap();
        let bundle = make_bundle(&ca, &plan, Some(crl.clone()), 30).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let (etc, pki) = (dir.path().join("etc"), dir.path().join("pki"));
        // Without a PKI directory the libvirt files are left alone.
        bundle.install(&etc, None, false).unwrap();
        assert!(!pki.exists());
        let written = bundle.install(&etc, Some(&pki), false).unwrap();
        for rel in [
            "libvirt/servercert.pem",
            "qemu/server-key.pem",
            "CA/cacrl.pem",
            "qemu/ca-crl.pem",
        ] {
            assert!(
                written.contains(&pki.join(rel)),
                "{rel} not written: {written:?}"
            );
        }
        let cert = std::fs::read_to_string(pki.join("libvirt/servercert.pem")).unwrap();
        let der = rustls_pki_types::CertificateDer::from_pem_slice(cert.as_bytes()).unwrap();
        assert_eq!(
            crate::identity::identity_of(&der).unwrap().uri(),
            "viola://libvirt/a/a1"
        );
        assert_eq!(
            std::fs::read_to_string(pki.join("CA/cacrl.pem")).unwrap(),
            crl
        );
        assert_eq!(
            std::fs::metadata(pki.join("libvirt/private/serverkey.pem"))
                .unwrap()
                .permissions()
                .mode()
                & 0o077,
            0
        );
    }

    /// Host a1 of `plan()` also running the manager, reached by browsers at 192.0.2.11
    /// and viola.example.org.
    fn manager_plan() -> HostPlan {
        HostPlan {
            manager_identity: Some(Names {
                addresses: vec!["192.0.2.11".parse().unwrap()],
                dns_names: vec!["viola.example.org".into()],
            }),
            ..plan()
        }
    }

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn a_manager_s_bundle_installs_its_identity_with_the_crl_and_the_names_browsers_use() {
        let dir = tempfile::tempdir().unwrap();
        let ca = CertificateAuthority::generate("test", 1).unwrap();
        let crl = ca.sign_crl(&[], 30).unwrap();
        let path = dir.path().join("a1.bundle");
        make_bundle(&ca, &manager_plan(), Some(crl.clone()), 30)
            .unwrap()
            .save(&path)
            .unwrap();
        let bundle = Bundle::load(&path).unwrap();
        let etc = dir.path().join("etc");
        let written = bundle.install(&etc, None, true).unwrap();
        let mgr = etc.join("adaptmgr");
        for name in ["key.pem", "cert.pem", "ca.pem", "crl.pem"] {
            assert!(written.contains(&mgr.join(name)), "{name}: {written:?}");
        }
        assert_eq!(mode(&mgr.join("key.pem")), 0o600);
        assert_eq!(mode(&mgr.join("cert.pem")), 0o644);
        assert_eq!(std::fs::read_to_string(mgr.join("crl.pem")).unwrap(), crl);
        // What the manager's `identity_dir` loads, CRL included.
        let id = Identity::load_dir(&mgr).unwrap();
        assert_eq!(id.id().uri(), "viola://adaptmgr/a/a1");
        let cert = std::fs::read_to_string(mgr.join("cert.pem")).unwrap();
        let der = rustls_pki_types::CertificateDer::from_pem_slice(cert.as_bytes()).unwrap();
        let (_, x509) = x509_parser::parse_x509_certificate(der.as_ref()).unwrap();
        let sans = x509.subject_alternative_name().unwrap().unwrap().value;
        let names: Vec<String> = sans.general_names.iter().map(|n| n.to_string()).collect();
        // x509-parser shows an address in hex: 192.0.2.11.
        for want in ["DNSName(viola.example.org)", "IPAddress(c0:00:02:0b)"] {
            assert!(names.iter().any(|n| n == want), "{want} not in {names:?}");
        }
        // The host's own daemons are installed as before.
        assert!(etc.join("overlay.toml").exists() && etc.join("monitor.toml").exists());
    }

    #[test]
    fn the_manager_s_configuration_is_left_to_the_administrator_who_is_told_how() {
        let ca = CertificateAuthority::generate("test", 1).unwrap();
        let bundle = make_bundle(&ca, &manager_plan(), None, 30).unwrap();
        let dir = tempfile::tempdir().unwrap();
        // Not even --force writes one: without the federation's hosts the manager would refuse
        // every monitor's report.
        bundle.install(dir.path(), None, true).unwrap();
        assert!(!dir.path().join("adaptmgr.toml").exists());
        let step = bundle.next_step(dir.path()).expect("a next step");
        let etc = dir.path().display();
        for want in [
            format!("cp /etc/viola/adaptmgr.toml.example {etc}/adaptmgr.toml"),
            format!("identity_dir = \"{etc}/adaptmgr\""),
            "listen = \"0.0.0.0:7443\"".to_owned(),
            "[[hosts]]".to_owned(),
        ] {
            assert!(step.contains(&want), "{want} not in:\n{step}");
        }
        // Once the administrator has made it (or for a host without the manager), nothing.
        std::fs::write(dir.path().join("adaptmgr.toml"), "").unwrap();
        assert_eq!(bundle.next_step(dir.path()), None);
        let host = make_bundle(&ca, &plan(), None, 30).unwrap();
        assert_eq!(host.next_step(tempfile::tempdir().unwrap().path()), None);
    }

    #[test]
    fn the_manager_s_certificate_is_registered_and_revoked_like_the_others() {
        let dir = tempfile::tempdir().unwrap();
        let ca_dir = dir.path().join("ca");
        let ca = CertificateAuthority::generate("test", 1).unwrap();
        ca.save(&ca_dir).unwrap();
        let register = Register::new(&ca_dir);
        let bundle = make_bundle(&ca, &manager_plan(), None, 30).unwrap();
        bundle.record(&register).unwrap();
        let issued: Vec<String> = register
            .issued()
            .unwrap()
            .iter()
            .map(|e| e.identity.uri())
            .collect();
        assert_eq!(
            issued,
            [
                "viola://adaptmgr/a/a1",
                "viola://depot/a/a1",
                "viola://monitor/a/a1",
                "viola://overlay/a/a1"
            ]
        );
        let manager: PeerIdentity = "viola://adaptmgr/a/a1".parse().unwrap();
        let revoked = register
            .revoke(
                &ca,
                &crate::identity::revocation::RevokeTarget::Identity(manager.clone()),
                30,
            )
            .unwrap();
        assert_eq!(revoked.len(), 1);
        assert_eq!(revoked[0].identity, manager);
        // The new CRL names it, and install-crl puts it beside the manager's identity too.
        let crl = std::fs::read_to_string(ca_dir.join(CRL_FILE)).unwrap();
        let etc = dir.path().join("etc");
        bundle.install(&etc, None, false).unwrap();
        let written = install_crl(&crl, &etc).unwrap();
        assert!(
            written.contains(&etc.join("adaptmgr").join(CRL_FILE)),
            "{written:?}"
        );
        let crl_der =
            rustls_pki_types::CertificateRevocationListDer::from_pem_slice(crl.as_bytes()).unwrap();
        let ca_der = rustls_pki_types::CertificateDer::from_pem_slice(
            bundle.identities["adaptmgr"].ca_pem.as_bytes(),
        )
        .unwrap();
        let listed =
            crate::identity::revocation::revoked_serials(crl_der.as_ref(), &ca_der).unwrap();
        assert_eq!(
            listed.into_iter().collect::<Vec<_>>(),
            [revoked[0].serial.clone()],
            "the CRL lists the manager's certificate"
        );
    }

    #[test]
    fn a_manager_s_certificate_without_names_or_with_a_wrong_dns_name_is_refused() {
        let ca = CertificateAuthority::generate("test", 1).unwrap();
        let plan = HostPlan {
            manager_identity: Some(Names::default()),
            ..plan()
        };
        let err = make_bundle(&ca, &plan, None, 30).unwrap_err();
        assert!(matches!(err, EnrolError::ManagerUnnamed), "{err:?}");
        assert!(err.to_string().contains("--manager-address"), "{err}");
        let plan = HostPlan {
            manager_identity: Some(Names {
                dns_names: vec!["viola example".into()],
                ..Names::default()
            }),
            ..plan
        };
        let err = make_bundle(&ca, &plan, None, 30).unwrap_err();
        assert_eq!(
            err.to_string(),
            "\"viola example\" is not a DNS name (for the adaptmgr certificate)"
        );
    }

    #[test]
    fn another_format_or_garbage_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.bundle");
        std::fs::write(&path, "{\"not\": \"a bundle\"}").unwrap();
        assert!(matches!(Bundle::load(&path), Err(EnrolError::Parse { .. })));
        let ca = CertificateAuthority::generate("test", 1).unwrap();
        let mut b = make_bundle(&ca, &plan(), None, 30).unwrap();
        b.version = 9;
        b.save(&path).unwrap();
        assert!(matches!(
            Bundle::load(&path),
            Err(EnrolError::Version { found: 9 })
        ));
    }
}
