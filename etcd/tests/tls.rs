//! TLS to etcd as the replicated managers use it: certificates of the federation CA (etcd's
//! naming its address), the manager's identity as client certificate, etcd asking for it and
//! reading the federation's revocation list.
//!
//! etcd cannot tell a manager's certificate from another of the same CA here: restricting its
//! clients by name (`--client-cert-allowed-hostname`) also refuses its own JSON gateway, which
//! connects with the member's certificate and does not check names (etcd-io/etcd#15755).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use viola_common::identity::revocation::{Register, RevokeTarget};
use viola_common::identity::{
    CertificateAuthority, Identity, IssuedCertificate, PeerIdentity, Role,
};
use viola_etcd::Etcd;
use viola_etcd::testing::{Cluster, MemberTls};

/// The rustls configuration the manager uses for etcd: its identity's, without ALPN.
fn client_config(identity: &Identity) -> Arc<rustls::ClientConfig> {
    let mut cfg = identity.rustls_client_config(b"").unwrap();
    cfg.alpn_protocols.clear();
    Arc::new(cfg)
}

/// A certificate of `role` from `ca`, recorded in the CA's register at `ca_dir`; with the
/// loopback address for a member.
fn issue(ca: &CertificateAuthority, ca_dir: &Path, role: Role, host: &str) -> IssuedCertificate {
    let id = PeerIdentity::new(role, "fed", host).unwrap();
    let addresses: Vec<std::net::IpAddr> = if role == Role::Etcd {
        vec!["127.0.0.1".parse().unwrap()]
    } else {
        Vec::new()
    };
    let issued = ca.issue_with_names(&id, &addresses, &[], 1).unwrap();
    Register::new(ca_dir)
        .record_issued(&issued.cert_pem)
        .unwrap();
    issued
}

fn client(endpoints: &[String], cert: &IssuedCertificate) -> Etcd {
    Etcd::with_tls(
        endpoints,
        Duration::from_secs(3),
        client_config(&cert.to_identity().unwrap()),
    )
    .unwrap()
}

#[test]
fn only_the_federations_certificates_reach_a_tls_member_and_a_revoked_one_at_once_no_more() {
    let dir = tempfile::tempdir().unwrap();
    let ca_dir = dir.path().join("ca");
    let ca = CertificateAuthority::generate("fed", 1).unwrap();
    ca.save(&ca_dir).unwrap();
    let register = Register::new(&ca_dir);
    let crl = register.write_crl(&ca, 1).unwrap();
    issue(&ca, &ca_dir, Role::Etcd, "e1")
        .save(&dir.path().join("e1"))
        .unwrap();
    let (m1, m2) = (
        issue(&ca, &ca_dir, Role::Adaptmgr, "m1"),
        issue(&ca, &ca_dir, Role::Adaptmgr, "m2"),
    );
    let cluster = Cluster::start_tls(&MemberTls {
        cert: dir.path().join("e1/cert.pem"),
        key: dir.path().join("e1/key.pem"),
        ca: dir.path().join("e1/ca.pem"),
        crl: Some(crl.clone()),
        client: client_config(&m1.to_identity().unwrap()),
    });
    let endpoints = cluster.endpoints();

    let etcd = client(&endpoints, &m1);
    etcd.put(b"/viola/x", b"1", None).unwrap();
    assert_eq!(etcd.get(b"/viola/x").unwrap().unwrap().value, b"1");
    assert!(client(&endpoints, &m2).get(b"/viola/x").is_ok());

    // m2 is revoked: once the new CRL is in etcd's file, its next connection is refused
    // (etcd reads the file at each handshake), m1's still served.
    let m2_id = PeerIdentity::new(Role::Adaptmgr, "fed", "m2").unwrap();
    register
        .revoke(&ca, &RevokeTarget::Identity(m2_id), 1)
        .unwrap();
    assert_eq!(register.write_crl(&ca, 1).unwrap(), crl);
    assert!(client(&endpoints, &m2).get(b"/viola/x").is_err());
    assert!(etcd.get(b"/viola/x").is_ok());

    // Another federation's manager: its certificate is refused, and it refuses etcd's.
    let stranger_ca = CertificateAuthority::generate("other", 1).unwrap();
    stranger_ca.save(&dir.path().join("other")).unwrap();
    let stranger = issue(
        &stranger_ca,
        &dir.path().join("other"),
        Role::Adaptmgr,
        "m1",
    );
    let err = client(&endpoints, &stranger).get(b"/viola/x").unwrap_err();
    assert!(
        viola_common::errors::chain(&err).contains("certificate"),
        "{}",
        viola_common::errors::chain(&err)
    );

    // No client certificate at all: etcd asks for one and ends the handshake.
    let mut roots = rustls::RootCertStore::empty();
    for cert in
        rustls::pki_types::CertificateDer::pem_file_iter(dir.path().join("e1/ca.pem")).unwrap()
    {
        roots.add(cert.unwrap()).unwrap();
    }
    let anonymous = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let anonymous = Etcd::with_tls(&endpoints, Duration::from_secs(3), Arc::new(anonymous));
    assert!(anonymous.unwrap().get(b"/viola/x").is_err());

    // Plain HTTP to the TLS port gets no answer etcd would give.
    let plain = Etcd::new(&endpoints, Duration::from_secs(3)).unwrap();
    assert!(plain.get(b"/viola/x").is_err());
}
