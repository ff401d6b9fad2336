//! In-process depot servers and clients on loopback with a test CA (shared by the test crates
//! that talk QUIC).

use std::net::SocketAddr;
use std::sync::Arc;

use viola_common::identity::{
    CertificateAuthority, Identity, PeerIdentity, Role, alpn, server_name,
};
use viola_depot::store::Store;
use viola_depot::transfer::{PathTuning, Services, Source, serve_connection, transport_config};

pub fn identity(ca: &CertificateAuthority, role: Role, site: &str) -> Identity {
    ca.issue(
        &PeerIdentity::new(role, site, &format!("{site}1")).unwrap(),
        1,
    )
    .unwrap()
    .to_identity()
    .unwrap()
}

/// A depot server on loopback serving `store` and `services` until the endpoint is dropped.
pub fn serve(store: Store, id: &Identity, services: Services) -> (SocketAddr, quinn::Endpoint) {
    let mut cfg = id.server_config(&[alpn::DEPOT]).unwrap();
    cfg.transport_config(Arc::new(transport_config(PathTuning::default())));
    let ep = quinn::Endpoint::server(cfg, "127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = ep.local_addr().unwrap();
    let accept = ep.clone();
    tokio::spawn(async move {
        while let Some(inc) = accept.accept().await {
            let (store, services) = (store.clone(), services.clone());
            tokio::spawn(async move {
                if let Ok(conn) = inc.await {
                    serve_connection(store, conn, services).await;
                }
            });
        }
    });
    (addr, ep)
}

pub async fn connect(id: &Identity, addr: SocketAddr, name: &str) -> Source {
    let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    let mut cfg = id.client_config(alpn::DEPOT).unwrap();
    cfg.transport_config(Arc::new(transport_config(PathTuning::default())));
    ep.set_default_client_config(cfg);
    let conn = ep
        .connect(addr, &server_name(Role::Depot))
        .unwrap()
        .await
        .unwrap();
    Source {
        name: name.into(),
        conn,
    }
}
