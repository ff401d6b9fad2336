//! A daemon's identity as it is now: certificate, key, CA and CRL, re-read from the identity
//! directory when a file in it changes, so that a renewed certificate is presented and a new
//! CRL is enforced from the next handshake on, without a restart.
//!
//! Every TLS configuration built from an [`super::Identity`] asks this for the current
//! material at each handshake (certificate resolvers and verifiers that delegate). A check
//! costs four `stat`s and runs at most every [`CHECK_INTERVAL`]. Files are replaced by rename
//! (`viola-ca install`, `install-crl`), so a reader sees the old file or the new one; a set of
//! files that does not load (a key that does not match the certificate, a CRL from another CA,
//! a certificate naming another identity) is logged and ignored, and the material in use
//! stays.

use std::collections::BTreeSet;
use std::fmt;
use std::path::PathBuf;
use std::sync::{Arc, LazyLock, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant, SystemTime};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{ResolvesClientCert, WebPkiServerVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::{CertificateRevocationListDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

use super::revocation::{self, Serial};
use super::{LoadError, PeerIdentity, provider};

/// How often, at most, the identity directory is looked at.
pub const CHECK_INTERVAL: Duration = Duration::from_millis(250);

/// The files an identity was loaded from.
#[derive(Debug, Clone)]
pub(super) struct Files {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
    /// Optional: without it, nothing is revoked.
    pub crl: Option<PathBuf>,
}

/// What identifies one version of a file: a rename gives a new inode, an edit a new mtime.
type Stamp = Option<(SystemTime, u64, u64)>;

impl Files {
    fn stamps(&self) -> Vec<Stamp> {
        use std::os::unix::fs::MetadataExt;
        [
            Some(&self.cert),
            Some(&self.key),
            Some(&self.ca),
            self.crl.as_ref(),
        ]
        .into_iter()
        .map(|p| {
            let m = std::fs::metadata(p?).ok()?;
            Some((m.modified().ok()?, m.len(), m.ino()))
        })
        .collect()
    }
}

/// PEM text of the identity's parts, with names for error messages.
pub(super) struct Pems<'a> {
    pub cert: (&'a str, &'a str),
    pub key: (&'a str, &'a str),
    pub ca: (&'a str, &'a str),
    /// `None`: no CRL.
    pub crl: Option<(&'a str, &'a str)>,
}

/// One loaded version of the identity, with the verifiers built from it.
pub(super) struct Material {
    stamps: Vec<Stamp>,
    pub id: PeerIdentity,
    pub certified: Arc<CertifiedKey>,
    pub ca: CertificateDer<'static>,
    pub revoked: BTreeSet<Serial>,
    pub client_verifier: Arc<dyn ClientCertVerifier>,
    pub server_verifier: Arc<WebPkiServerVerifier>,
}

impl Material {
    pub fn from_pems(p: &Pems<'_>) -> Result<Self, LoadError> {
        let pem_err = |what: &str| {
            let what = what.to_owned();
            move |source| LoadError::Pem { what, source }
        };
        let chain = CertificateDer::pem_slice_iter(p.cert.0.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(pem_err(p.cert.1))?;
        let Some(leaf) = chain.first() else {
            return Err(LoadError::Pem {
                what: p.cert.1.to_owned(),
                source: rustls_pki_types::pem::Error::NoItemsFound,
            });
        };
        let id = super::identity_of(leaf).map_err(LoadError::Identity)?;
        let key = rustls_pki_types::PrivateKeyDer::from_pem_slice(p.key.0.as_bytes())
            .map_err(pem_err(p.key.1))?;
        let ca = CertificateDer::from_pem_slice(p.ca.0.as_bytes()).map_err(pem_err(p.ca.1))?;
        let crls = match p.crl {
            Some((text, name)) => vec![
                CertificateRevocationListDer::from_pem_slice(text.as_bytes())
                    .map_err(pem_err(name))?,
            ],
            None => Vec::new(),
        };
        let mut revoked = BTreeSet::new();
        for (crl, name) in crls.iter().zip(p.crl.map(|c| c.1)) {
            revoked.extend(
                revocation::revoked_serials(crl.as_ref(), &ca).map_err(|source| {
                    LoadError::Crl {
                        what: name.to_owned(),
                        source: Box::new(source),
                    }
                })?,
            );
        }
        let provider = provider();
        let certified = CertifiedKey::from_der(chain, key, &provider).map_err(LoadError::Key)?;
        let mut roots = RootCertStore::empty();
        roots.add(ca.clone()).map_err(LoadError::Key)?;
        let roots = Arc::new(roots);
        // Only the leaf is checked (the chain is leaf and CA); a peer whose status the CRL
        // cannot tell is refused, which cannot happen with the federation's own CRL.
        let client_verifier =
            WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
                .with_crls(crls.clone())
                .only_check_end_entity_revocation()
                .build()
                .map_err(LoadError::Verifier)?;
        let server_verifier = WebPkiServerVerifier::builder_with_provider(roots, provider)
            .with_crls(crls)
            .only_check_end_entity_revocation()
            .build()
            .map_err(LoadError::Verifier)?;
        Ok(Self {
            stamps: Vec::new(),
            id,
            certified: Arc::new(certified),
            ca,
            revoked,
            client_verifier,
            server_verifier,
        })
    }

    fn from_files(files: &Files) -> Result<Self, LoadError> {
        let stamps = files.stamps();
        let read = |p: &PathBuf| {
            std::fs::read_to_string(p).map_err(|source| LoadError::Io {
                path: p.clone(),
                source,
            })
        };
        let (cert, key, ca) = (read(&files.cert)?, read(&files.key)?, read(&files.ca)?);
        let crl = match &files.crl {
            Some(p) => match std::fs::read_to_string(p) {
                Ok(t) => Some((t, p.display().to_string())),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
                Err(source) => {
                    return Err(LoadError::Io {
                        path: p.clone(),
                        source,
                    });
                }
            },
            None => None,
        };
        let names = [&files.cert, &files.key, &files.ca].map(|p| p.display().to_string());
        let mut m = Self::from_pems(&Pems {
            cert: (&cert, &names[0]),
            key: (&key, &names[1]),
            ca: (&ca, &names[2]),
            crl: crl.as_ref().map(|(t, n)| (t.as_str(), n.as_str())),
        })?;
        m.stamps = stamps;
        Ok(m)
    }
}

/// The identity in use, and where to look for a newer one.
pub(super) struct LiveIdentity {
    files: Option<Files>,
    current: RwLock<Arc<Material>>,
    /// When the files were last looked at, and the stamps of a set that failed to load (so a
    /// broken set is reported once, not at every look).
    checked: Mutex<(Instant, Vec<Stamp>)>,
}

impl fmt::Debug for LiveIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LiveIdentity")
            .field("id", &self.get().id)
            .field("files", &self.files)
            .finish_non_exhaustive()
    }
}

impl LiveIdentity {
    pub fn fixed(material: Material) -> Self {
        Self {
            files: None,
            current: RwLock::new(Arc::new(material)),
            checked: Mutex::new((Instant::now(), Vec::new())),
        }
    }

    pub fn load(files: Files) -> Result<Self, LoadError> {
        let material = Material::from_files(&files)?;
        Ok(Self {
            files: Some(files),
            current: RwLock::new(Arc::new(material)),
            checked: Mutex::new((Instant::now(), Vec::new())),
        })
    }

    /// The material in use (no look at the files).
    fn get(&self) -> Arc<Material> {
        self.current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The material in use, after looking at the files if that is due.
    pub fn current(&self) -> Arc<Material> {
        if let Some(files) = &self.files {
            self.refresh(files, false);
        }
        self.get()
    }

    /// Looks at the files now (not waiting for [`CHECK_INTERVAL`]); true if a new version is
    /// in use.
    pub fn refresh_now(&self) -> bool {
        self.files.as_ref().is_some_and(|f| self.refresh(f, true))
    }

    fn refresh(&self, files: &Files, now: bool) -> bool {
        let mut checked = self.checked.lock().unwrap_or_else(PoisonError::into_inner);
        if !now && checked.0.elapsed() < CHECK_INTERVAL {
            return false;
        }
        checked.0 = Instant::now();
        let stamps = files.stamps();
        let in_use = self.get();
        if stamps == in_use.stamps || stamps == checked.1 {
            return false;
        }
        let loaded = Material::from_files(files).and_then(|m| {
            if m.id == in_use.id {
                Ok(m)
            } else {
                Err(LoadError::Changed {
                    was: Box::new(in_use.id.clone()),
                    now: Box::new(m.id),
                })
            }
        });
        match loaded {
            Ok(m) => {
                tracing::info!(
                    identity = %m.id,
                    revoked = m.revoked.len(),
                    cert = %files.cert.display(),
                    "identity files changed: presenting the current certificate and checking peers against the current CRL"
                );
                *self.current.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(m);
                checked.1.clear();
                true
            }
            Err(e) => {
                tracing::warn!(
                    error = %crate::errors::chain(&e),
                    cert = %files.cert.display(),
                    "identity files changed but do not load; keeping the ones in use"
                );
                checked.1 = stamps;
                false
            }
        }
    }
}

/// What handshake signatures are checked with: the provider's algorithms, whatever the CA and
/// CRL in use.
static SIGNATURE_ALGORITHMS: LazyLock<WebPkiSupportedAlgorithms> =
    LazyLock::new(|| provider().signature_verification_algorithms);

/// The handshake signature checks of a verifier, alike for clients and servers (what the
/// WebPKI verifiers of the material would do): `verify_tls12_signature` and
/// `verify_tls13_signature` call the `rustls::crypto` functions of the same name.
macro_rules! signature_checks {
    ($($check:ident),+) => {
        $(
            fn $check(
                &self,
                message: &[u8],
                cert: &CertificateDer<'_>,
                dss: &DigitallySignedStruct,
            ) -> Result<HandshakeSignatureValid, rustls::Error> {
                rustls::crypto::$check(message, cert, dss, &SIGNATURE_ALGORITHMS)
            }
        )+

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            SIGNATURE_ALGORITHMS.supported_schemes()
        }
    };
}

/// Presents the current certificate (server and client side).
#[derive(Debug)]
pub(super) struct CurrentCert(pub Arc<LiveIdentity>);

impl ResolvesServerCert for CurrentCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.current().certified.clone())
    }
}

impl ResolvesClientCert for CurrentCert {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(self.0.current().certified.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// Verifies clients with the current CA and CRL.
#[derive(Debug)]
pub(super) struct CurrentClientVerifier {
    pub live: Arc<LiveIdentity>,
    /// The CA's subject when the configuration was built (a hint only).
    pub hints: Vec<DistinguishedName>,
}

impl ClientCertVerifier for CurrentClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &self.hints
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.live
            .current()
            .client_verifier
            .verify_client_cert(end_entity, intermediates, now)
    }

    signature_checks!(verify_tls12_signature, verify_tls13_signature);
}

/// Verifies servers with the current CA and CRL.
#[derive(Debug)]
pub(super) struct CurrentServerVerifier(pub Arc<LiveIdentity>);

impl ServerCertVerifier for CurrentServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.0.current().server_verifier.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )
    }

    signature_checks!(verify_tls12_signature, verify_tls13_signature);
}
