//! TLS to etcd as the replicated managers use it: certificates of the federation CA (etcd's
//! naming its address), the manager's identity as client certificate, etcd asking for it.

use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use std::time::Duration;

use viola_common::identity::{CertificateAuthority, Identity, PeerIdentity, Role};
use viola_etcd::Etcd;
use viola_etcd::testing::{Cluster, MemberTls};

/// The rustls configuration the manager uses for etcd: its identity's, without ALPN.
fn client_config(identity: &Identity) -> Arc<rustls::ClientConfig> {
    let mut cfg = identity.rustls_client_config(b"").unwrap();
    cfg.alpn_protocols.clear();
    Arc::new(cfg)
}

fn issue(ca: &CertificateAuthority, role: Role, host: &str, address: bool) -> Identity {
    let id = PeerIdentity::new(role, "fed", host).unwrap();
    let addresses: Vec<std::net::IpAddr> = if address {
        vec!["127.0.0.1".parse().unwrap()]
    } else {
        Vec::new()
    };
    ca.issue_with_names(&id, &addresses, &[], 1)
        .unwrap()
        .to_identity()
        .unwrap()
}

#[test]
fn only_a_client_with_a_certificate_of_the_federation_reaches_a_tls_member() {
    let dir = tempfile::tempdir().unwrap();
    let ca = CertificateAuthority::generate("fed", 1).unwrap();
    let member = ca
        .issue_with_names(
            &PeerIdentity::new(Role::Etcd, "fed", "e1").unwrap(),
            &["127.0.0.1".parse().unwrap()],
            &[],
            1,
        )
        .unwrap();
    member.save(dir.path()).unwrap();
    let manager = issue(&ca, Role::Adaptmgr, "m1", false);
    let cluster = Cluster::start_tls(&MemberTls {
        cert: dir.path().join("cert.pem"),
        key: dir.path().join("key.pem"),
        ca: dir.path().join("ca.pem"),
        client: client_config(&manager),
    });
    let endpoints = cluster.endpoints();
    let timeout = Duration::from_secs(3);

    let etcd = Etcd::with_tls(&endpoints, timeout, client_config(&manager)).unwrap();
    etcd.put(b"/viola/x", b"1", None).unwrap();
    assert_eq!(etcd.get(b"/viola/x").unwrap().unwrap().value, b"1");

    // Another federation's manager: its certificate is refused, and it refuses etcd's.
    let stranger = issue(
        &CertificateAuthority::generate("other", 1).unwrap(),
        Role::Adaptmgr,
        "m1",
        false,
    );
    let other = Etcd::with_tls(&endpoints, timeout, client_config(&stranger)).unwrap();
    let err = other.get(b"/viola/x").unwrap_err();
    assert!(
        viola_common::errors::chain(&err).contains("certificate"),
        "{}",
        viola_common::errors::chain(&err)
    );

    // No client certificate at all: etcd asks for one and ends the handshake.
    let roots = {
        let mut roots = rustls::RootCertStore::empty();
        for cert in
            rustls::pki_types::CertificateDer::pem_file_iter(dir.path().join("ca.pem")).unwrap()
        {
            roots.add(cert.unwrap()).unwrap();
        }
        roots
    };
    let anonymous = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let anonymous = Etcd::with_tls(&endpoints, timeout, Arc::new(anonymous)).unwrap();
    assert!(anonymous.get(b"/viola/x").is_err());

    // Plain HTTP to the TLS port gets no answer etcd would give.
    assert!(
        Etcd::new(&endpoints, timeout)
            .unwrap()
            .get(b"/viola/x")
            .is_err()
    );
}
