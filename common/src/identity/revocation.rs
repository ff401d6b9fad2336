//! Revocation: the CA's register of what it issued and revoked, and the certificate revocation
//! list (CRL) every daemon checks its peers against.
//!
//! The CA directory holds, beside `ca.pem` and `ca.key`:
//!
//! | file | what |
//! |---|---|
//! | `issued.tsv` | one line per certificate issued: serial (hex), identity URI, expiry (Unix seconds) |
//! | `revoked.tsv` | one line per certificate revoked: serial (hex), identity URI, when (Unix seconds) |
//! | `crl.pem` | the CRL, signed by the CA, listing every revoked serial |
//!
//! `viola-ca revoke --identity viola://overlay/a/a1` revokes every certificate ever issued to
//! that identity (a host removed from the federation loses all of them at once); `--cert FILE`
//! revokes one. Either writes a fresh `crl.pem`. It is distributed like the peers list: it
//! travels in enrolment bundles, and `viola-ca install-crl` puts it beside each daemon's
//! identity on a host (`/etc/viola/ROLE/crl.pem`). Daemons re-read their identity directory
//! when a file in it changes ([`super::Identity::load_dir`]), so a new CRL refuses the revoked
//! peers' next handshakes without a restart, and [`super::Identity::is_revoked`] lets a daemon
//! drop connections already open to them.
//!
//! Serial numbers are the ones rcgen writes (the first 20 bytes of the SHA-256 of the public
//! key, top bit cleared), so they are unique per key; they are compared without leading zero
//! bytes, as DER may or may not carry one.

use std::collections::BTreeSet;
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use rcgen::{
    CertificateRevocationListParams, KeyIdMethod, RevocationReason, RevokedCertParams, SerialNumber,
};
use rustls_pki_types::CertificateDer;
use time::{Duration, OffsetDateTime};

use super::{CertificateAuthority, PeerIdentity};

/// A certificate serial number, without leading zero bytes.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Serial(Vec<u8>);

impl Serial {
    /// From the DER integer's content bytes.
    pub fn from_der_bytes(bytes: &[u8]) -> Self {
        let start = bytes.iter().position(|b| *b != 0).unwrap_or(bytes.len());
        Self(bytes[start..].to_vec())
    }

    /// The serial of a certificate.
    pub fn of(cert: &CertificateDer<'_>) -> Result<Self, RevocationError> {
        let (_, x509) = x509_parser::parse_x509_certificate(cert.as_ref())
            .map_err(|e| RevocationError::X509(e.to_string()))?;
        Ok(Self::from_der_bytes(x509.tbs_certificate.raw_serial()))
    }

    /// Lower-case hex, as in the register files.
    pub fn hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    fn parse_hex(s: &str) -> Option<Self> {
        if s.is_empty() || !s.len().is_multiple_of(2) {
            return None;
        }
        let bytes = (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
            .collect::<Option<Vec<u8>>>()?;
        Some(Self::from_der_bytes(&bytes))
    }
}

impl std::fmt::Display for Serial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.hex())
    }
}

/// Why the register or the CRL could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum RevocationError {
    /// A register file or the CRL could not be read or written.
    #[error("{}", .path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A line of a register file is not `SERIAL<TAB>URI<TAB>SECONDS`.
    #[error("{}:{line}: not SERIAL<TAB>viola://ROLE/SITE/HOST<TAB>SECONDS", .path.display())]
    Register { path: PathBuf, line: usize },
    /// A certificate or CRL is not valid X.509.
    #[error("not valid X.509: {0}")]
    X509(String),
    /// The CRL was not issued by this federation's CA.
    #[error("the CRL's issuer ({crl_issuer}) is not the federation CA ({ca})")]
    ForeignCrl { crl_issuer: String, ca: String },
    /// Nothing the CA issued matches what was to be revoked.
    #[error("the CA's register has no certificate issued to {0}")]
    NothingIssued(String),
    /// rcgen could not sign the CRL.
    #[error("signing the CRL")]
    Sign(#[source] rcgen::Error),
}

/// One line of a register: a certificate, whom it names, and a time (expiry or revocation).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegisterEntry {
    pub serial: Serial,
    pub identity: PeerIdentity,
    /// Unix seconds: when it expires (`issued.tsv`) or was revoked (`revoked.tsv`).
    pub at: i64,
}

/// What to revoke.
#[derive(Debug, Clone)]
pub enum RevokeTarget {
    /// Every certificate the CA issued to this identity.
    Identity(PeerIdentity),
    /// One certificate.
    Certificate(CertificateDer<'static>),
}

/// The CA directory's register of issued and revoked certificates.
pub struct Register {
    dir: PathBuf,
}

const ISSUED: &str = "issued.tsv";
const REVOKED: &str = "revoked.tsv";
/// The CRL's file name, in the CA directory and beside each daemon's identity.
pub const CRL_FILE: &str = "crl.pem";

impl Register {
    /// The register of the CA in `ca_dir` (its files are made on first use).
    pub fn new(ca_dir: &Path) -> Self {
        Self {
            dir: ca_dir.to_owned(),
        }
    }

    /// Records a certificate the CA issued.
    pub fn record_issued(&self, cert_pem: &str) -> Result<RegisterEntry, RevocationError> {
        use rustls_pki_types::pem::PemObject;
        let der = CertificateDer::from_pem_slice(cert_pem.as_bytes())
            .map_err(|e| RevocationError::X509(e.to_string()))?;
        let (_, x509) = x509_parser::parse_x509_certificate(der.as_ref())
            .map_err(|e| RevocationError::X509(e.to_string()))?;
        let entry = RegisterEntry {
            serial: Serial::from_der_bytes(x509.tbs_certificate.raw_serial()),
            identity: super::identity_of(&der).map_err(|e| RevocationError::X509(e.to_string()))?,
            at: x509.validity().not_after.timestamp(),
        };
        self.append(ISSUED, &entry)?;
        Ok(entry)
    }

    /// Every certificate issued so far.
    pub fn issued(&self) -> Result<Vec<RegisterEntry>, RevocationError> {
        self.read(ISSUED)
    }

    /// Every certificate revoked so far.
    pub fn revoked(&self) -> Result<Vec<RegisterEntry>, RevocationError> {
        self.read(REVOKED)
    }

    /// Revokes `target` (what was revoked already stays so) and writes a fresh `crl.pem`
    /// signed by `ca`, valid for `crl_days`. Returns the certificates newly revoked.
    pub fn revoke(
        &self,
        ca: &CertificateAuthority,
        target: &RevokeTarget,
        crl_days: u32,
    ) -> Result<Vec<RegisterEntry>, RevocationError> {
        let already: BTreeSet<Serial> = self.revoked()?.into_iter().map(|e| e.serial).collect();
        let now = OffsetDateTime::now_utc().unix_timestamp();
        let wanted: Vec<RegisterEntry> = match target {
            RevokeTarget::Identity(id) => {
                let issued: Vec<_> = self
                    .issued()?
                    .into_iter()
                    .filter(|e| &e.identity == id)
                    .collect();
                if issued.is_empty() {
                    return Err(RevocationError::NothingIssued(id.to_string()));
                }
                issued
            }
            RevokeTarget::Certificate(der) => vec![RegisterEntry {
                serial: Serial::of(der)?,
                identity: super::identity_of(der)
                    .map_err(|e| RevocationError::X509(e.to_string()))?,
                at: now,
            }],
        };
        let mut fresh = Vec::new();
        for mut entry in wanted {
            if already.contains(&entry.serial)
                || fresh
                    .iter()
                    .any(|e: &RegisterEntry| e.serial == entry.serial)
            {
                continue;
            }
            entry.at = now;
            self.append(REVOKED, &entry)?;
            fresh.push(entry);
        }
        self.write_crl(ca, crl_days)?;
        Ok(fresh)
    }

    /// Signs and writes `crl.pem` listing every revoked certificate; returns its path.
    pub fn write_crl(
        &self,
        ca: &CertificateAuthority,
        crl_days: u32,
    ) -> Result<PathBuf, RevocationError> {
        let pem = ca.sign_crl(&self.revoked()?, crl_days)?;
        let path = self.dir.join(CRL_FILE);
        write_atomically(&path, pem.as_bytes(), 0o644)?;
        Ok(path)
    }

    fn append(&self, file: &str, e: &RegisterEntry) -> Result<(), RevocationError> {
        let path = self.dir.join(file);
        let io = |source| RevocationError::Io {
            path: path.clone(),
            source,
        };
        let mut f = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(io)?;
        writeln!(f, "{}\t{}\t{}", e.serial, e.identity, e.at).map_err(io)?;
        f.sync_all().map_err(io)
    }

    fn read(&self, file: &str) -> Result<Vec<RegisterEntry>, RevocationError> {
        let path = self.dir.join(file);
        let text = match fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => return Err(RevocationError::Io { path, source }),
        };
        text.lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
            .map(|(i, l)| {
                let bad = || RevocationError::Register {
                    path: path.clone(),
                    line: i + 1,
                };
                let mut parts = l.split('\t');
                let (Some(serial), Some(uri), Some(at), None) =
                    (parts.next(), parts.next(), parts.next(), parts.next())
                else {
                    return Err(bad());
                };
                Ok(RegisterEntry {
                    serial: Serial::parse_hex(serial).ok_or_else(bad)?,
                    identity: uri.parse().map_err(|_| bad())?,
                    at: at.parse().map_err(|_| bad())?,
                })
            })
            .collect()
    }
}

impl CertificateAuthority {
    /// A CRL (PEM) listing `revoked`, signed by this CA, valid for `valid_days`. Its number is
    /// the signing time in seconds, so a later CRL always has a larger one.
    pub fn sign_crl(
        &self,
        revoked: &[RegisterEntry],
        valid_days: u32,
    ) -> Result<String, RevocationError> {
        let now = OffsetDateTime::now_utc();
        let params = CertificateRevocationListParams {
            this_update: now - Duration::minutes(5),
            next_update: now + Duration::days(i64::from(valid_days.max(1))),
            crl_number: SerialNumber::from(u64::try_from(now.unix_timestamp()).unwrap_or(0)),
            issuing_distribution_point: None,
            revoked_certs: revoked
                .iter()
                .map(|e| RevokedCertParams {
                    serial_number: SerialNumber::from_slice(&e.serial.0),
                    revocation_time: OffsetDateTime::from_unix_timestamp(e.at).unwrap_or(now),
                    reason_code: Some(RevocationReason::CessationOfOperation),
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: KeyIdMethod::Sha256,
        };
        params
            .signed_by(&self.cert, &self.key)
            .and_then(|crl| crl.pem())
            .map_err(RevocationError::Sign)
    }
}

/// The serials a CRL lists, after checking that `ca` issued it (by name; rustls checks the
/// signature at each handshake).
pub fn revoked_serials(
    crl_der: &[u8],
    ca: &CertificateDer<'_>,
) -> Result<BTreeSet<Serial>, RevocationError> {
    let (_, crl) =
        x509_parser::parse_x509_crl(crl_der).map_err(|e| RevocationError::X509(e.to_string()))?;
    let (_, ca) = x509_parser::parse_x509_certificate(ca.as_ref())
        .map_err(|e| RevocationError::X509(e.to_string()))?;
    if crl.issuer().as_raw() != ca.subject().as_raw() {
        return Err(RevocationError::ForeignCrl {
            crl_issuer: crl.issuer().to_string(),
            ca: ca.subject().to_string(),
        });
    }
    Ok(crl
        .iter_revoked_certificates()
        .map(|r| Serial::from_der_bytes(r.raw_serial()))
        .collect())
}

/// Writes `path` by writing a temporary file beside it and renaming it over, so that a daemon
/// re-reading the file never sees half of it.
pub fn write_atomically(path: &Path, bytes: &[u8], mode: u32) -> Result<(), RevocationError> {
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let io = |source| RevocationError::Io {
        path: path.to_owned(),
        source,
    };
    let result = (|| {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.map_err(io)
}
