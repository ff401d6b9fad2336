//! Federation identity: one CA, per-daemon certificates, mutual-TLS QUIC.
//!
//! Every Viola daemon holds a certificate issued by the federation CA that names its
//! [`Role`], site and host. The names live in the certificate's subject alternative names:
//!
//! - URI `viola://ROLE/SITE/HOST` (e.g. `viola://overlay/a/a1`): the identity that
//!   [`peer_identity`] reads off a connection after the handshake;
//! - DNS `ROLE.viola` and `HOST.SITE.ROLE.viola` (e.g. `overlay.viola`, `a1.a.overlay.viola`):
//!   what a client passes as the QUIC server name, so the TLS handshake itself already
//!   checks the server's role ([`server_name`]) or its exact identity ([`PeerIdentity::server_name`]).
//!
//! Site and host names are DNS labels: 1–63 characters of `a-z`, `0-9` and `-`, not starting
//! or ending with `-`. The certificate is valid for both TLS server and client authentication,
//! so a daemon uses the same one for accepting and for connecting.
//!
//! Every connection is QUIC with TLS 1.3 only (rustls with *ring*) and mutual authentication
//! against the federation CA only: [`Identity::server_config`] refuses clients without a
//! certificate from the CA, [`Identity::client_config`] refuses servers without one. Each
//! service has its own ALPN ([`alpn`]). After the handshake, [`peer_identity`] returns who the
//! peer is and [`PeerIdentity::require_role`] checks that its role may use the service.
//!
//! Files: a CA directory holds `ca.pem` and `ca.key` ([`CertificateAuthority::save`]); a daemon
//! directory holds `cert.pem`, `key.pem` and `ca.pem` ([`IssuedCertificate::save`],
//! [`Identity::load_dir`]). The `viola-ca` binary creates both.
//!
//! ```no_run
//! # async fn demo(conn: quinn::Connection) -> Result<(), Box<dyn std::error::Error>> {
//! use viola_common::identity::{self, Identity, Role, alpn};
//! let me = Identity::load_dir("/etc/viola/overlay".as_ref())?;
//! let server = me.server_config(&[alpn::OVERLAY])?;
//! let client = me.client_config(alpn::OVERLAY)?;
//! # let _ = (server, client);
//! // on an accepted connection:
//! let peer = identity::peer_identity(&conn)?;
//! peer.require_role(&[Role::Overlay, Role::Adaptmgr])?;
//! # Ok(()) }
//! ```

use std::fmt;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};
use rustls::crypto::CryptoProvider;
use rustls_pki_types::CertificateDer;
use time::{Duration, OffsetDateTime};

pub mod libvirt;
pub mod live;
pub mod revocation;

/// ALPN protocol ids, one per service. A server lists the services it offers, a client names one.
pub mod alpn {
    /// Overlay daemon peering (frames as datagrams, control on streams).
    pub const OVERLAY: &[u8] = b"viola-overlay/1";
    /// Overlay daemon local control (expect_move, status) for the adaptation manager / CLI.
    pub const OVERLAY_CONTROL: &[u8] = b"viola-overlay-ctl/1";
    /// Depot part transfers and queries.
    pub const DEPOT: &[u8] = b"viola-depot/1";
    /// Monitor reports.
    pub const MONITOR: &[u8] = b"viola-monitor/1";
    /// Adaptation manager endpoint (monitor pushes, CLI requests).
    pub const ADAPTMGR: &[u8] = b"viola-adaptmgr/1";
}

/// Top-level DNS suffix of the names in Viola certificates.
const DNS_SUFFIX: &str = "viola";
/// URI scheme of the identity SAN.
const URI_SCHEME: &str = "viola://";

/// What a daemon is. Each role may use only the services its role allows
/// ([`PeerIdentity::require_role`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Role {
    /// Adaptation manager (federation controller).
    Adaptmgr,
    /// An administrator's or user's command-line tool.
    Cli,
    /// Per-site image depot.
    Depot,
    /// A member of the etcd cluster that replicated managers share (its server and peer
    /// certificate, naming its addresses). No Viola service accepts this role.
    Etcd,
    /// A host's libvirtd and QEMU, for TLS migrations ([`libvirt`]). No Viola service accepts
    /// this role: the key lies where QEMU can read it, so it must not stand for a daemon.
    Libvirt,
    /// Per-host monitor daemon.
    Monitor,
    /// Per-host overlay daemon.
    Overlay,
    /// A tenant's user's command-line tool: `viola://user/TENANT/NAME` (the site part names
    /// the tenant, the host part the user; see [`PeerIdentity::tenant`]). The manager lets it
    /// see and change only its tenant's violins and VMs; the `cli` role is an administrator's.
    User,
}

impl Role {
    /// All roles, in a stable order.
    pub const ALL: [Self; 8] = [
        Self::Adaptmgr,
        Self::Cli,
        Self::Depot,
        Self::Etcd,
        Self::Libvirt,
        Self::Monitor,
        Self::Overlay,
        Self::User,
    ];

    /// The lower-case name used in certificates and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Adaptmgr => "adaptmgr",
            Self::Cli => "cli",
            Self::Depot => "depot",
            Self::Etcd => "etcd",
            Self::Libvirt => "libvirt",
            Self::Monitor => "monitor",
            Self::Overlay => "overlay",
            Self::User => "user",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A string that is not one of the [`Role`] names.
#[derive(Debug, thiserror::Error)]
#[error(
    "unknown role {0:?} (expected one of adaptmgr, cli, depot, etcd, libvirt, monitor, overlay, user)"
)]
pub struct UnknownRole(String);

impl FromStr for Role {
    type Err = UnknownRole;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| UnknownRole(s.to_owned()))
    }
}

/// Who a daemon is: role, site and host, as named in its certificate.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PeerIdentity {
    /// What the daemon is.
    pub role: Role,
    /// The site (domain) it runs in.
    pub site: String,
    /// The host it runs on (unique within the site).
    pub host: String,
}

/// A malformed identity or identity URI.
#[derive(Debug, thiserror::Error)]
pub enum IdentityParseError {
    /// Not of the form `viola://ROLE/SITE/HOST`.
    #[error("{0:?} is not of the form viola://ROLE/SITE/HOST")]
    Shape(String),
    /// The role part is not a role.
    #[error(transparent)]
    Role(#[from] UnknownRole),
    /// A site or host name is not a DNS label.
    #[error(
        "{what} name {name:?} must be 1-63 characters of a-z, 0-9 and '-', not starting or ending with '-'"
    )]
    Label {
        /// "site" or "host".
        what: &'static str,
        /// The offending name.
        name: String,
    },
}

fn check_label(what: &'static str, name: &str) -> Result<(), IdentityParseError> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && !name.starts_with('-')
        && !name.ends_with('-')
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(IdentityParseError::Label {
            what,
            name: name.to_owned(),
        })
    }
}

impl PeerIdentity {
    /// Builds an identity, checking that site and host are DNS labels.
    pub fn new(role: Role, site: &str, host: &str) -> Result<Self, IdentityParseError> {
        check_label("site", site)?;
        check_label("host", host)?;
        Ok(Self {
            role,
            site: site.to_owned(),
            host: host.to_owned(),
        })
    }

    /// The identity URI `viola://ROLE/SITE/HOST`.
    pub fn uri(&self) -> String {
        format!("{URI_SCHEME}{}/{}/{}", self.role, self.site, self.host)
    }

    /// The DNS name `HOST.SITE.ROLE.viola` that only this daemon's certificate carries: pass it
    /// as the server name to connect to exactly this daemon.
    pub fn server_name(&self) -> String {
        format!("{}.{}.{}.{DNS_SUFFIX}", self.host, self.site, self.role)
    }

    /// The tenant a user's certificate names (role `user`: its site part); `None` for daemons
    /// and administrators.
    pub fn tenant(&self) -> Option<&str> {
        (self.role == Role::User).then_some(self.site.as_str())
    }

    /// Ok if this identity's role is one of `allowed`; otherwise an error naming both.
    pub fn require_role(&self, allowed: &[Role]) -> Result<(), RoleNotAllowed> {
        if allowed.contains(&self.role) {
            Ok(())
        } else {
            Err(RoleNotAllowed {
                peer: self.clone(),
                allowed: allowed.to_vec(),
            })
        }
    }
}

impl fmt::Display for PeerIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.uri())
    }
}

impl FromStr for PeerIdentity {
    type Err = IdentityParseError;

    /// Parses `viola://ROLE/SITE/HOST`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let shape = || IdentityParseError::Shape(s.to_owned());
        let rest = s.strip_prefix(URI_SCHEME).ok_or_else(shape)?;
        let mut parts = rest.split('/');
        let (Some(role), Some(site), Some(host), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(shape());
        };
        Self::new(role.parse()?, site, host)
    }
}

/// The DNS name `ROLE.viola` that every certificate of that role carries: pass it as the server
/// name when any daemon of that role will do (the handshake then checks the server's role).
pub fn server_name(role: Role) -> String {
    format!("{role}.{DNS_SUFFIX}")
}

/// A peer whose role may not use the service it asked for.
#[derive(Debug, thiserror::Error)]
#[error("{peer} is not allowed here (allowed roles: {})", display_roles(.allowed))]
pub struct RoleNotAllowed {
    /// Who asked.
    pub peer: PeerIdentity,
    /// The roles that would have been allowed.
    pub allowed: Vec<Role>,
}

fn display_roles(roles: &[Role]) -> String {
    roles
        .iter()
        .map(|r| r.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Failure to create, load, save or use a certificate authority.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    /// rcgen could not generate a key or sign a certificate.
    #[error("certificate generation failed")]
    Generate(#[source] rcgen::Error),
    /// A file could not be read or written.
    #[error("{}", .path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        #[source]
        source: io::Error,
    },
    /// A PEM file does not hold what it should.
    #[error("{}: not a valid PEM {what}", .path.display())]
    Pem {
        /// The file.
        path: PathBuf,
        /// "certificate" or "private key".
        what: &'static str,
        /// rcgen's or pki-types' reason.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// Refusing to overwrite an existing CA.
    #[error("{} already exists; refusing to overwrite a CA", .0.display())]
    Exists(PathBuf),
    /// A site or host name the certificate would carry is not a DNS label.
    #[error("certificate name")]
    Name(#[source] IdentityParseError),
}

/// The federation certificate authority: its certificate and private key.
pub struct CertificateAuthority {
    /// Used for signing (subject, key identifier).
    cert: rcgen::Certificate,
    key: KeyPair,
    /// The certificate exactly as stored and trusted by the daemons.
    cert_pem: String,
}

/// A certificate issued to one daemon, with its private key and the CA certificate (PEM).
pub struct IssuedCertificate {
    /// Whom it names.
    pub identity: PeerIdentity,
    /// The daemon's certificate.
    pub cert_pem: String,
    /// The daemon's private key (PKCS#8).
    pub key_pem: String,
    /// The CA certificate that verifies peers.
    pub ca_pem: String,
}

impl CertificateAuthority {
    /// Creates a new CA (ECDSA P-256) named `federation`, valid for `valid_days` days.
    pub fn generate(federation: &str, valid_days: u32) -> Result<Self, CaError> {
        let key = KeyPair::generate().map_err(CaError::Generate)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(
            DnType::CommonName,
            format!("Viola federation CA {federation}"),
        );
        dn.push(DnType::OrganizationName, "Viola");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - Duration::hours(1);
        params.not_after = now + Duration::days(i64::from(valid_days));
        let cert = params.self_signed(&key).map_err(CaError::Generate)?;
        let cert_pem = cert.pem();
        Ok(Self {
            cert,
            key,
            cert_pem,
        })
    }

    /// Loads a CA from PEM text (certificate and private key).
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, CaError> {
        Self::from_pem_at(
            cert_pem,
            Path::new("<certificate>"),
            key_pem,
            Path::new("<key>"),
        )
    }

    /// Loads `ca.pem` and `ca.key` from `dir`.
    pub fn load(dir: &Path) -> Result<Self, CaError> {
        let cert_path = dir.join("ca.pem");
        let key_path = dir.join("ca.key");
        let read = |p: &Path| {
            fs::read_to_string(p).map_err(|source| CaError::Io {
                path: p.to_owned(),
                source,
            })
        };
        Self::from_pem_at(&read(&cert_path)?, &cert_path, &read(&key_path)?, &key_path)
    }

    fn from_pem_at(
        cert_pem: &str,
        cert_path: &Path,
        key_pem: &str,
        key_path: &Path,
    ) -> Result<Self, CaError> {
        let key = KeyPair::from_pem(key_pem).map_err(|e| CaError::Pem {
            path: key_path.to_owned(),
            what: "private key",
            source: Box::new(e),
        })?;
        let params = CertificateParams::from_ca_cert_pem(cert_pem).map_err(|e| CaError::Pem {
            path: cert_path.to_owned(),
            what: "certificate",
            source: Box::new(e),
        })?;
        // Re-signing yields a certificate with the stored subject and key, which is all issuing
        // needs; the stored PEM stays the one that peers trust.
        let cert = params.self_signed(&key).map_err(CaError::Generate)?;
        Ok(Self {
            cert,
            key,
            cert_pem: cert_pem.to_owned(),
        })
    }

    /// Writes `ca.pem` and `ca.key` (mode 0600) into `dir`, creating it; never overwrites.
    pub fn save(&self, dir: &Path) -> Result<(), CaError> {
        let cert_path = dir.join("ca.pem");
        let key_path = dir.join("ca.key");
        for p in [&cert_path, &key_path] {
            if p.exists() {
                return Err(CaError::Exists(p.clone()));
            }
        }
        fs::create_dir_all(dir).map_err(|source| CaError::Io {
            path: dir.to_owned(),
            source,
        })?;
        write_file(&key_path, &self.key.serialize_pem(), true)?;
        write_file(&cert_path, &self.cert_pem, false)
    }

    /// The CA certificate (PEM) that every daemon trusts.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// Issues a certificate for `identity`, valid for `valid_days` days, with a fresh key.
    pub fn issue(
        &self,
        identity: &PeerIdentity,
        valid_days: u32,
    ) -> Result<IssuedCertificate, CaError> {
        self.sign(
            identity,
            identity.uri(),
            Vec::new(),
            vec![KeyUsagePurpose::DigitalSignature],
            valid_days,
        )
    }

    /// Issues a certificate for `identity` that also names `addresses` and `dns_names`, so
    /// that a browser reaching the daemon by one of them accepts it (the manager's dashboard).
    pub fn issue_with_names(
        &self,
        identity: &PeerIdentity,
        addresses: &[std::net::IpAddr],
        dns_names: &[String],
        valid_days: u32,
    ) -> Result<IssuedCertificate, CaError> {
        let mut sans: Vec<SanType> = addresses.iter().map(|a| SanType::IpAddress(*a)).collect();
        for name in dns_names {
            sans.push(SanType::DnsName(
                name.clone().try_into().map_err(CaError::Generate)?,
            ));
        }
        self.sign(
            identity,
            identity.uri(),
            sans,
            vec![KeyUsagePurpose::DigitalSignature],
            valid_days,
        )
    }

    /// Signs a fresh key's certificate naming `identity` (URI and DNS SANs) and `extra_sans`,
    /// for TLS server and client authentication.
    fn sign(
        &self,
        identity: &PeerIdentity,
        common_name: String,
        extra_sans: Vec<SanType>,
        key_usages: Vec<KeyUsagePurpose>,
        valid_days: u32,
    ) -> Result<IssuedCertificate, CaError> {
        let key = KeyPair::generate().map_err(CaError::Generate)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, common_name);
        dn.push(DnType::OrganizationName, "Viola");
        params.distinguished_name = dn;
        let san = |s: String| s.try_into().map_err(CaError::Generate);
        params.subject_alt_names = vec![
            SanType::URI(san(identity.uri())?),
            SanType::DnsName(san(identity.server_name())?),
            SanType::DnsName(san(server_name(identity.role))?),
        ];
        params.subject_alt_names.extend(extra_sans);
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = key_usages;
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        let now = OffsetDateTime::now_utc();
        params.not_before = now - Duration::hours(1);
        params.not_after = now + Duration::days(i64::from(valid_days));
        let cert = params
            .signed_by(&key, &self.cert, &self.key)
            .map_err(CaError::Generate)?;
        Ok(IssuedCertificate {
            identity: identity.clone(),
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            ca_pem: self.cert_pem.clone(),
        })
    }
}

impl IssuedCertificate {
    /// Writes `cert.pem`, `key.pem` (mode 0600) and `ca.pem` into `dir`, creating it.
    pub fn save(&self, dir: &Path) -> Result<(), CaError> {
        fs::create_dir_all(dir).map_err(|source| CaError::Io {
            path: dir.to_owned(),
            source,
        })?;
        write_file(&dir.join("key.pem"), &self.key_pem, true)?;
        write_file(&dir.join("cert.pem"), &self.cert_pem, false)?;
        write_file(&dir.join("ca.pem"), &self.ca_pem, false)
    }

    /// The daemon identity built from this certificate (for tests and in-process use).
    pub fn to_identity(&self) -> Result<Identity, LoadError> {
        Identity::from_pem(&self.cert_pem, &self.key_pem, &self.ca_pem)
    }
}

fn write_file(path: &Path, text: &str, private: bool) -> Result<(), CaError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let io_err = |source| CaError::Io {
        path: path.to_owned(),
        source,
    };
    let mut opts = fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    if private {
        opts.mode(0o600);
    }
    let mut f = opts.open(path).map_err(io_err)?;
    f.write_all(text.as_bytes()).map_err(io_err)
}

/// Failure to load a daemon's identity (certificate, key, CA, CRL).
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// A file could not be read.
    #[error("{}", .path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        #[source]
        source: io::Error,
    },
    /// A PEM section is missing or malformed.
    #[error("{what}: not valid PEM")]
    Pem {
        /// Which input ("certificate", "private key", "CA certificate"), with its path if any.
        what: String,
        /// The reason.
        #[source]
        source: rustls_pki_types::pem::Error,
    },
    /// The certificate does not carry a `viola://` identity.
    #[error("certificate does not name a Viola identity")]
    Identity(#[source] PeerIdentityError),
    /// rustls refused the key (unsupported, or not the certificate's) or the CA certificate.
    #[error("the private key does not fit the certificate, or the CA certificate is unusable")]
    Key(#[source] rustls::Error),
    /// The certificate verifiers could not be built from the CA and CRL.
    #[error("certificate verifier")]
    Verifier(#[source] rustls::server::VerifierBuilderError),
    /// The CRL does not load or is not the federation CA's.
    #[error("{what}: unusable revocation list")]
    Crl {
        /// The CRL's path.
        what: String,
        #[source]
        source: Box<revocation::RevocationError>,
    },
    /// The renewed certificate names another identity than the one in use.
    #[error("the new certificate names {now}, the daemon is {was}")]
    Changed {
        /// The identity in use.
        was: Box<PeerIdentity>,
        /// The one the new certificate names.
        now: Box<PeerIdentity>,
    },
}

/// A daemon's own identity: its certificate and private key, the federation CA and its
/// revocation list. Loaded from a directory ([`Self::load_dir`]), it follows that directory:
/// configurations built from it present a renewed certificate and enforce a new CRL from the
/// next handshake on ([`live`]). Clones share the same live state.
#[derive(Debug, Clone)]
pub struct Identity {
    id: PeerIdentity,
    live: Arc<live::LiveIdentity>,
}

/// How often [`Identity::until_revoked`] looks at a connection.
pub const REVOCATION_POLL: std::time::Duration = std::time::Duration::from_secs(1);

/// The QUIC close code of a connection closed because its peer's certificate was revoked.
pub const CLOSE_REVOKED: u32 = 0x7265;

/// Failure to build a TLS/QUIC configuration from an identity.
#[derive(Debug, thiserror::Error)]
pub enum TlsConfigError {
    /// rustls refused the certificate, key or CA.
    #[error("rustls configuration")]
    Rustls(#[from] rustls::Error),
    /// The client verifier could not be built.
    #[error("client certificate verifier")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    /// quinn refused the rustls configuration.
    #[error("QUIC crypto configuration")]
    Quic(#[from] quinn::crypto::rustls::NoInitialCipherSuite),
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl Identity {
    /// Loads `cert.pem`, `key.pem`, `ca.pem` and, if present, `crl.pem` from `dir`, and
    /// follows them: see [`live`].
    pub fn load_dir(dir: &Path) -> Result<Self, LoadError> {
        Self::from_files(live::Files {
            cert: dir.join("cert.pem"),
            key: dir.join("key.pem"),
            ca: dir.join("ca.pem"),
            crl: Some(dir.join(revocation::CRL_FILE)),
        })
    }

    /// Loads the daemon certificate (chain), its private key and the CA certificate (no CRL),
    /// and follows them.
    pub fn load(cert: &Path, key: &Path, ca: &Path) -> Result<Self, LoadError> {
        Self::from_files(live::Files {
            cert: cert.to_owned(),
            key: key.to_owned(),
            ca: ca.to_owned(),
            crl: None,
        })
    }

    fn from_files(files: live::Files) -> Result<Self, LoadError> {
        let live = live::LiveIdentity::load(files)?;
        Ok(Self {
            id: live.current().id.clone(),
            live: Arc::new(live),
        })
    }

    /// Builds an identity from PEM text (it does not change).
    pub fn from_pem(cert_pem: &str, key_pem: &str, ca_pem: &str) -> Result<Self, LoadError> {
        Self::from_pems(&live::Pems {
            cert: (cert_pem, "certificate"),
            key: (key_pem, "private key"),
            ca: (ca_pem, "CA certificate"),
            crl: None,
        })
    }

    /// Builds an identity from PEM text with a revocation list (it does not change).
    pub fn from_pem_with_crl(
        cert_pem: &str,
        key_pem: &str,
        ca_pem: &str,
        crl_pem: &str,
    ) -> Result<Self, LoadError> {
        Self::from_pems(&live::Pems {
            cert: (cert_pem, "certificate"),
            key: (key_pem, "private key"),
            ca: (ca_pem, "CA certificate"),
            crl: Some((crl_pem, "revocation list")),
        })
    }

    fn from_pems(pems: &live::Pems<'_>) -> Result<Self, LoadError> {
        let material = live::Material::from_pems(pems)?;
        Ok(Self {
            id: material.id.clone(),
            live: Arc::new(live::LiveIdentity::fixed(material)),
        })
    }

    /// Who this daemon is.
    pub fn id(&self) -> &PeerIdentity {
        &self.id
    }

    /// Looks at the identity's files now rather than at the next handshake; true if a renewed
    /// certificate or a new CRL is now in use.
    pub fn refresh(&self) -> bool {
        self.live.refresh_now()
    }

    /// Whether the current CRL revokes the certificate the peer of `conn` presented (a daemon
    /// calls this to drop connections opened before the revocation; new handshakes are refused
    /// by the verifiers). A connection without a certificate counts as revoked.
    pub fn is_revoked(&self, conn: &quinn::Connection) -> bool {
        let Some(certs) = conn
            .peer_identity()
            .and_then(|any| any.downcast::<Vec<CertificateDer<'static>>>().ok())
        else {
            return true;
        };
        certs.first().is_none_or(|leaf| self.is_revoked_cert(leaf))
    }

    /// Resolves once the current CRL revokes the peer of `conn` (looked at every
    /// [`REVOCATION_POLL`]). A daemon serving a long-lived connection selects on it and closes
    /// the connection when it resolves: revoking a host ends the links it already has.
    pub async fn until_revoked(&self, conn: &quinn::Connection) {
        let leaf = conn
            .peer_identity()
            .and_then(|any| any.downcast::<Vec<CertificateDer<'static>>>().ok())
            .and_then(|certs| certs.first().cloned());
        // A connection without a certificate counts as revoked (as in `is_revoked`).
        if let Some(leaf) = &leaf {
            self.wait_revoked(leaf).await;
        }
        tracing::warn!(
            peer = %peer_identity(conn).map_or_else(|e| e.to_string(), |p| p.to_string()),
            remote = %conn.remote_address(),
            "the peer's certificate is revoked: closing its connection"
        );
    }

    /// [`Self::until_revoked`] for a connection that is not QUIC (the dashboard's HTTPS): resolves
    /// once the current CRL revokes `cert`, the peer's certificate.
    pub async fn until_cert_revoked(&self, cert: &CertificateDer<'_>) {
        self.wait_revoked(cert).await;
        tracing::warn!(
            peer = %identity_of(cert).map_or_else(|e| e.to_string(), |p| p.to_string()),
            "the peer's certificate is revoked: closing its connection"
        );
    }

    /// Waits until the current CRL lists `cert`. Its serial is read once: every open
    /// connection is looked at each second, and a look is then one set lookup.
    async fn wait_revoked(&self, cert: &CertificateDer<'_>) {
        let serial = revocation::Serial::of(cert).ok();
        while !serial
            .as_ref()
            .is_some_and(|s| self.live.current().revoked.contains(s))
        {
            tokio::time::sleep(REVOCATION_POLL).await;
        }
    }

    /// Whether the current CRL revokes `cert`.
    pub fn is_revoked_cert(&self, cert: &CertificateDer<'_>) -> bool {
        let revoked = &self.live.current().revoked;
        !revoked.is_empty() && revocation::Serial::of(cert).is_ok_and(|s| revoked.contains(&s))
    }

    /// The federation CA certificate in use.
    pub fn ca_cert(&self) -> CertificateDer<'static> {
        self.live.current().ca.clone()
    }

    /// A rustls server configuration: TLS 1.3 only, client certificates from the federation CA
    /// and not revoked required, offering the given ALPN protocols.
    pub fn rustls_server_config(
        &self,
        alpns: &[&[u8]],
    ) -> Result<rustls::ServerConfig, TlsConfigError> {
        let hints = self
            .live
            .current()
            .client_verifier
            .root_hint_subjects()
            .to_vec();
        let verifier = Arc::new(live::CurrentClientVerifier {
            live: self.live.clone(),
            hints,
        });
        let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(verifier)
            .with_cert_resolver(Arc::new(live::CurrentCert(self.live.clone())));
        cfg.alpn_protocols = alpns.iter().map(|a| a.to_vec()).collect();
        Ok(cfg)
    }

    /// A rustls client configuration: TLS 1.3 only, server verified against the federation
    /// CA and CRL, presenting this daemon's certificate, asking for `alpn`.
    pub fn rustls_client_config(
        &self,
        alpn: &[u8],
    ) -> Result<rustls::ClientConfig, TlsConfigError> {
        let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(live::CurrentServerVerifier(
                self.live.clone(),
            )))
            .with_client_cert_resolver(Arc::new(live::CurrentCert(self.live.clone())));
        cfg.alpn_protocols = vec![alpn.to_vec()];
        Ok(cfg)
    }

    /// A quinn server configuration with mutual TLS 1.3 (see [`Self::rustls_server_config`]).
    /// Set its transport with `quinn::ServerConfig::transport_config`.
    pub fn server_config(&self, alpns: &[&[u8]]) -> Result<quinn::ServerConfig, TlsConfigError> {
        let crypto =
            quinn::crypto::rustls::QuicServerConfig::try_from(self.rustls_server_config(alpns)?)?;
        Ok(quinn::ServerConfig::with_crypto(Arc::new(crypto)))
    }

    /// A quinn client configuration with mutual TLS 1.3 (see [`Self::rustls_client_config`]).
    /// Connect with [`server_name`] (any daemon of a role) or [`PeerIdentity::server_name`].
    pub fn client_config(&self, alpn: &[u8]) -> Result<quinn::ClientConfig, TlsConfigError> {
        let crypto =
            quinn::crypto::rustls::QuicClientConfig::try_from(self.rustls_client_config(alpn)?)?;
        Ok(quinn::ClientConfig::new(Arc::new(crypto)))
    }
}

/// Failure to read a Viola identity off a peer or a certificate.
#[derive(Debug, thiserror::Error)]
pub enum PeerIdentityError {
    /// The connection carries no certificate (the handshake did not authenticate the peer).
    #[error("peer presented no certificate")]
    NoCertificate,
    /// The certificate is not valid X.509.
    #[error("peer certificate is not valid X.509: {0}")]
    X509(String),
    /// The certificate has no `viola://` URI SAN.
    #[error("certificate has no viola:// URI subject alternative name")]
    NoIdentity,
    /// The `viola://` URI is malformed.
    #[error("certificate identity")]
    Malformed(#[source] IdentityParseError),
}

/// The Viola identity named in a (verified) certificate.
pub fn identity_of(cert: &CertificateDer<'_>) -> Result<PeerIdentity, PeerIdentityError> {
    use x509_parser::extensions::GeneralName;
    let (_, x509) = x509_parser::parse_x509_certificate(cert.as_ref())
        .map_err(|e| PeerIdentityError::X509(e.to_string()))?;
    let san = x509
        .subject_alternative_name()
        .map_err(|e| PeerIdentityError::X509(e.to_string()))?
        .ok_or(PeerIdentityError::NoIdentity)?;
    let uri = san
        .value
        .general_names
        .iter()
        .find_map(|n| match n {
            GeneralName::URI(u) if u.starts_with(URI_SCHEME) => Some(*u),
            _ => None,
        })
        .ok_or(PeerIdentityError::NoIdentity)?;
    uri.parse().map_err(PeerIdentityError::Malformed)
}

/// The verified identity of the peer of an established connection (either side). The TLS
/// handshake already checked the certificate against the federation CA.
pub fn peer_identity(conn: &quinn::Connection) -> Result<PeerIdentity, PeerIdentityError> {
    let certs = conn
        .peer_identity()
        .and_then(|any| any.downcast::<Vec<CertificateDer<'static>>>().ok())
        .ok_or(PeerIdentityError::NoCertificate)?;
    let leaf = certs.first().ok_or(PeerIdentityError::NoCertificate)?;
    identity_of(leaf)
}

#[cfg(test)]
mod tests {
    use rustls_pki_types::pem::PemObject;
    use std::net::{Ipv4Addr, SocketAddr};

    use super::*;

    fn id(role: Role, site: &str, host: &str) -> PeerIdentity {
        PeerIdentity::new(role, site, host).unwrap()
    }

    /// A one-day identity from `ca` for `role` at `site`/`host`.
    fn issued(ca: &CertificateAuthority, role: Role, site: &str, host: &str) -> Identity {
        ca.issue(&id(role, site, host), 1)
            .unwrap()
            .to_identity()
            .unwrap()
    }

    #[test]
    fn identity_uri_roundtrip_and_validation() {
        let i = id(Role::Overlay, "a", "a1");
        assert_eq!(i.uri(), "viola://overlay/a/a1");
        assert_eq!(i.server_name(), "a1.a.overlay.viola");
        assert_eq!(i.uri().parse::<PeerIdentity>().unwrap(), i);
        for bad in [
            "viola://overlay/a",
            "viola://overlay/a/a1/x",
            "http://overlay/a/a1",
            "viola://king/a/a1",
            "viola://overlay/A/a1",
            "viola://overlay/a/-x",
            "viola://overlay//a1",
        ] {
            assert!(bad.parse::<PeerIdentity>().is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn require_role() {
        let i = id(Role::Depot, "b", "b1");
        assert!(i.require_role(&[Role::Depot, Role::Cli]).is_ok());
        let err = i.require_role(&[Role::Overlay]).unwrap_err();
        assert!(err.to_string().contains("viola://depot/b/b1"));
    }

    #[test]
    fn issued_certificate_names_identity_and_survives_save_load() {
        let dir = tempfile::tempdir().unwrap();
        let ca = CertificateAuthority::generate("test", 30).unwrap();
        ca.save(&dir.path().join("ca")).unwrap();
        assert!(matches!(
            ca.save(&dir.path().join("ca")),
            Err(CaError::Exists(_))
        ));
        let ca = CertificateAuthority::load(&dir.path().join("ca")).unwrap();
        let want = id(Role::Monitor, "c", "c7");
        let issued = ca.issue(&want, 10).unwrap();
        issued.save(&dir.path().join("mon")).unwrap();
        let me = Identity::load_dir(&dir.path().join("mon")).unwrap();
        assert_eq!(me.id(), &want);
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &fs::metadata(dir.path().join("mon/key.pem"))
                .unwrap()
                .permissions(),
        );
        assert_eq!(mode & 0o077, 0, "key must not be group/world readable");
    }

    /// Runs a QUIC handshake between `server` and `client` on loopback. Returns the identity
    /// each side sees of the other, or the error of whichever side failed.
    async fn handshake(
        server: &Identity,
        client: &Identity,
        server_alpns: &[&[u8]],
        client_alpn: &[u8],
        server_name: &str,
    ) -> Result<(PeerIdentity, PeerIdentity), String> {
        let localhost = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
        let srv = quinn::Endpoint::server(server.server_config(server_alpns).unwrap(), localhost)
            .unwrap();
        let addr = srv.local_addr().unwrap();
        let mut cli = quinn::Endpoint::client(localhost).unwrap();
        cli.set_default_client_config(client.client_config(client_alpn).unwrap());
        let accept = async {
            let incoming = srv.accept().await.ok_or("endpoint closed")?;
            let conn = incoming.await.map_err(|e| format!("server: {e}"))?;
            let seen = peer_identity(&conn).map_err(|e| e.to_string())?;
            Ok::<_, String>((seen, conn))
        };
        let connect = async {
            let conn = cli
                .connect(addr, server_name)
                .map_err(|e| format!("client: {e}"))?
                .await
                .map_err(|e| format!("client: {e}"))?;
            // Wait until the server has decided about our certificate too.
            let seen = peer_identity(&conn).map_err(|e| e.to_string())?;
            let closed = tokio::time::timeout(std::time::Duration::from_millis(300), conn.closed());
            match closed.await {
                Ok(e) => Err(format!("client: closed by server: {e}")),
                Err(_) => Ok(seen),
            }
        };
        let (s, c) = tokio::time::timeout(std::time::Duration::from_secs(10), async {
            tokio::join!(accept, connect)
        })
        .await
        .map_err(|_| "timeout".to_owned())?;
        let result = match (s, c) {
            (Ok((s, _conn)), Ok(c)) => Ok((s, c)),
            (s, c) => Err(format!("{:?} / {:?}", s.err(), c.err())),
        };
        srv.close(0u32.into(), b"");
        cli.close(0u32.into(), b"");
        result
    }

    /// [`handshake`] of two overlay daemons (the name every overlay daemon's certificate holds).
    async fn overlay_handshake(
        server: &Identity,
        client: &Identity,
    ) -> Result<(PeerIdentity, PeerIdentity), String> {
        let name = server_name(Role::Overlay);
        handshake(server, client, &[alpn::OVERLAY], alpn::OVERLAY, &name).await
    }

    #[tokio::test]
    async fn mutual_tls_between_daemons_of_one_ca() {
        let ca = CertificateAuthority::generate("test", 30).unwrap();
        let a = issued(&ca, Role::Overlay, "a", "a1");
        let b = issued(&ca, Role::Adaptmgr, "a", "ctl");
        let (seen_by_server, seen_by_client) = handshake(
            &a,
            &b,
            &[alpn::OVERLAY, alpn::OVERLAY_CONTROL],
            alpn::OVERLAY_CONTROL,
            &server_name(Role::Overlay),
        )
        .await
        .unwrap();
        assert_eq!(&seen_by_server, b.id());
        assert_eq!(&seen_by_client, a.id());
        // The exact per-daemon name works as well.
        handshake(
            &a,
            &b,
            &[alpn::OVERLAY],
            alpn::OVERLAY,
            &a.id().server_name(),
        )
        .await
        .unwrap();
    }

    #[tokio::test]
    async fn certificate_from_another_ca_is_refused() {
        let ours = CertificateAuthority::generate("ours", 30).unwrap();
        let theirs = CertificateAuthority::generate("theirs", 30).unwrap();
        let good = issued(&ours, Role::Overlay, "a", "a1");
        // Same names, wrong CA.
        let foreign = issued(&theirs, Role::Overlay, "b", "b1");
        let err = overlay_handshake(&good, &foreign).await.unwrap_err();
        assert!(err.contains("UnknownIssuer"), "{err}");
        let err = overlay_handshake(&foreign, &good).await.unwrap_err();
        assert!(err.contains("UnknownIssuer"), "{err}");
    }

    #[tokio::test]
    async fn wrong_role_name_or_alpn_is_refused() {
        let ca = CertificateAuthority::generate("test", 30).unwrap();
        let depot = issued(&ca, Role::Depot, "a", "d1");
        let overlay = issued(&ca, Role::Overlay, "a", "a1");
        // A depot cannot pass itself off as an overlay daemon.
        let err = overlay_handshake(&depot, &overlay).await.unwrap_err();
        assert!(err.contains("not valid for name"), "{err}");
        // A client asking for a service the server does not offer is refused.
        assert!(
            handshake(
                &overlay,
                &depot,
                &[alpn::OVERLAY],
                alpn::DEPOT,
                &server_name(Role::Overlay)
            )
            .await
            .is_err()
        );
    }

    /// A test CA saved in `dir/ca` (its directory, the CA, and its register).
    fn saved_ca(dir: &Path) -> (PathBuf, CertificateAuthority, revocation::Register) {
        let ca_dir = dir.join("ca");
        let ca = CertificateAuthority::generate("test", 30).unwrap();
        ca.save(&ca_dir).unwrap();
        let register = revocation::Register::new(&ca_dir);
        (ca_dir, ca, register)
    }

    /// Writes `issued` as a daemon identity directory `dir` and notes it in `register`.
    fn install(issued: &IssuedCertificate, register: &revocation::Register, dir: &Path) {
        register.record_issued(&issued.cert_pem).unwrap();
        issued.save(dir).unwrap();
    }

    /// An open connection from `client` to `server` on loopback: (server side, client side,
    /// the endpoints to keep alive).
    async fn open_connection(
        server: &Identity,
        client: &Identity,
    ) -> (quinn::Connection, quinn::Connection, [quinn::Endpoint; 2]) {
        let localhost = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
        let srv =
            quinn::Endpoint::server(server.server_config(&[alpn::OVERLAY]).unwrap(), localhost)
                .unwrap();
        let mut cli = quinn::Endpoint::client(localhost).unwrap();
        cli.set_default_client_config(client.client_config(alpn::OVERLAY).unwrap());
        let addr = srv.local_addr().unwrap();
        let (s, c) = tokio::join!(
            async { srv.accept().await.unwrap().await.unwrap() },
            async {
                cli.connect(addr, &server_name(Role::Overlay))
                    .unwrap()
                    .await
                    .unwrap()
            }
        );
        (s, c, [srv, cli])
    }

    #[tokio::test]
    async fn a_revoked_host_is_refused_at_its_next_handshake_without_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let (ca_dir, ca, register) = saved_ca(dir.path());
        let etc = dir.path().join("etc");
        install(
            &ca.issue(&id(Role::Overlay, "a", "a1"), 1).unwrap(),
            &register,
            &etc.join("overlay"),
        );
        let server = Identity::load_dir(&etc.join("overlay")).unwrap();
        // b1 was enrolled twice (a renewal); both of its certificates must go.
        let leaving_id = id(Role::Overlay, "b", "b1");
        let old = ca.issue(&leaving_id, 1).unwrap();
        register.record_issued(&old.cert_pem).unwrap();
        let leaving = ca.issue(&leaving_id, 1).unwrap();
        register.record_issued(&leaving.cert_pem).unwrap();
        let leaving = leaving.to_identity().unwrap();
        let staying = ca.issue(&id(Role::Overlay, "b", "b2"), 1).unwrap();
        register.record_issued(&staying.cert_pem).unwrap();
        let staying = staying.to_identity().unwrap();

        let (open, _client_side, _endpoints) = open_connection(&server, &leaving).await;
        assert!(!server.is_revoked(&open));

        let b1_leaves = revocation::RevokeTarget::Identity(leaving_id.clone());
        let revoked = register.revoke(&ca, &b1_leaves, 30).unwrap();
        assert_eq!(revoked.len(), 2, "both of b1's certificates");
        assert!(revoked.iter().all(|e| e.identity == leaving_id));
        // Revoking again adds nothing and keeps the list.
        let again = register.revoke(&ca, &b1_leaves, 30).unwrap();
        assert!(again.is_empty());
        assert_eq!(register.revoked().unwrap().len(), 2);

        let crl = fs::read_to_string(ca_dir.join(revocation::CRL_FILE)).unwrap();
        let written = crate::enrol::install_crl(&crl, &etc).unwrap();
        assert_eq!(
            written,
            vec![etc.join("overlay").join(revocation::CRL_FILE)]
        );
        assert!(server.refresh(), "the daemon took the new CRL");
        assert!(
            server.is_revoked(&open),
            "the connection open before is flagged"
        );

        let err = overlay_handshake(&server, &leaving).await.unwrap_err();
        assert!(err.contains("Revoked"), "{err}");
        let (seen, _) = overlay_handshake(&server, &staying).await.unwrap();
        assert_eq!(&seen, staying.id());

        // A client holding the CRL refuses a revoked server, too.
        let careful = ca.issue(&id(Role::Overlay, "c", "c1"), 1).unwrap();
        let careful =
            Identity::from_pem_with_crl(&careful.cert_pem, &careful.key_pem, &careful.ca_pem, &crl)
                .unwrap();
        let err = overlay_handshake(&leaving, &careful).await.unwrap_err();
        assert!(err.contains("Revoked"), "{err}");
    }

    #[tokio::test]
    async fn a_renewed_certificate_is_presented_without_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let (ca_dir, ca, register) = saved_ca(dir.path());
        let srv_dir = dir.path().join("overlay");
        let first = ca.issue(&id(Role::Overlay, "a", "a1"), 1).unwrap();
        install(&first, &register, &srv_dir);
        let server = Identity::load_dir(&srv_dir).unwrap();
        // A client that no longer trusts the first certificate (revoked after a key leak).
        let der = CertificateDer::from_pem_slice(first.cert_pem.as_bytes()).unwrap();
        register
            .revoke(&ca, &revocation::RevokeTarget::Certificate(der), 30)
            .unwrap();
        let crl = fs::read_to_string(ca_dir.join(revocation::CRL_FILE)).unwrap();
        let client = ca.issue(&id(Role::Overlay, "b", "b1"), 1).unwrap();
        let client =
            Identity::from_pem_with_crl(&client.cert_pem, &client.key_pem, &client.ca_pem, &crl)
                .unwrap();
        let err = overlay_handshake(&server, &client).await.unwrap_err();
        assert!(err.contains("Revoked"), "{err}");

        // Renewal: a new key and certificate replace the files while the daemon runs.
        crate::enrol::Bundle {
            version: crate::enrol::BUNDLE_VERSION,
            site: "a".into(),
            host: "a1".into(),
            manager: "192.0.2.1:7443".parse().unwrap(),
            peers: Vec::new(),
            overlay_listen: "192.0.2.2:4500".parse().unwrap(),
            depot: crate::enrol::DepotPlan::default(),
            identities: [(
                "overlay".to_owned(),
                crate::enrol::IdentityFiles::from(
                    ca.issue(&id(Role::Overlay, "a", "a1"), 1).unwrap(),
                ),
            )]
            .into(),
            crl_pem: None,
            libvirt: None,
        }
        .install(dir.path(), None, false)
        .unwrap();
        assert!(server.refresh());
        overlay_handshake(&server, &client).await.unwrap();
    }

    #[tokio::test]
    async fn files_that_do_not_load_are_refused_and_the_identity_in_use_stays() {
        let dir = tempfile::tempdir().unwrap();
        let ca = CertificateAuthority::generate("ours", 30).unwrap();
        let theirs = CertificateAuthority::generate("theirs", 30).unwrap();
        let srv_dir = dir.path().join("overlay");
        ca.issue(&id(Role::Overlay, "a", "a1"), 1)
            .unwrap()
            .save(&srv_dir)
            .unwrap();
        // Another federation's CRL: the daemon does not start with it.
        let foreign = theirs.sign_crl(&[], 30).unwrap();
        fs::write(srv_dir.join(revocation::CRL_FILE), &foreign).unwrap();
        let err = Identity::load_dir(&srv_dir).unwrap_err();
        assert!(
            matches!(
                &err,
                LoadError::Crl { source, .. }
                    if matches!(**source, revocation::RevocationError::ForeignCrl { .. })
            ),
            "{err:?}"
        );
        fs::remove_file(srv_dir.join(revocation::CRL_FILE)).unwrap();
        let server = Identity::load_dir(&srv_dir).unwrap();
        let client = issued(&ca, Role::Overlay, "b", "b1");

        // A running daemon keeps its identity when a broken set of files appears: a key that
        // is not the certificate's, then a certificate naming someone else.
        let stranger = ca.issue(&id(Role::Overlay, "z", "z9"), 1).unwrap();
        fs::write(srv_dir.join("key.pem"), &stranger.key_pem).unwrap();
        assert!(!server.refresh());
        fs::write(srv_dir.join("cert.pem"), &stranger.cert_pem).unwrap();
        assert!(!server.refresh());
        let (_, seen) = overlay_handshake(&server, &client).await.unwrap();
        assert_eq!(&seen, &id(Role::Overlay, "a", "a1"));
        assert_eq!(server.id(), &id(Role::Overlay, "a", "a1"));
    }

    #[test]
    fn the_register_refuses_what_it_cannot_read() {
        let dir = tempfile::tempdir().unwrap();
        let ca = CertificateAuthority::generate("test", 30).unwrap();
        let register = revocation::Register::new(dir.path());
        let nobody = id(Role::Overlay, "a", "a1");
        let err = register
            .revoke(&ca, &revocation::RevokeTarget::Identity(nobody), 30)
            .unwrap_err();
        assert!(
            matches!(err, revocation::RevocationError::NothingIssued(_)),
            "{err}"
        );
        fs::write(
            dir.path().join("issued.tsv"),
            "zz\tviola://overlay/a/a1\t1\n",
        )
        .unwrap();
        let err = register.issued().unwrap_err();
        assert!(err.to_string().contains("issued.tsv:1"), "{err}");
    }
}
