//! Replicated managers: several `viola-adaptmgr`s (three, on three machines) share one
//! inventory in etcd and elect a leader. Only the leader listens for monitors and the CLI,
//! runs the policy loop, the failure detector, migrations, creates and deletes; the others
//! stand by, and clients try every manager's address in turn (only the leader answers).
//!
//! - **Election** is etcd's own recipe, over its key-value API: a candidate creates
//!   `PREFIX/leader` only if it is absent, attached to the candidate's lease, and keeps the
//!   lease alive while it leads. A leader that dies (or is cut off) stops renewing its lease;
//!   etcd deletes the key when the lease expires, and a standby's next attempt wins.
//! - **Fencing.** Every write of the leader is a transaction guarded by its leader key's
//!   creation revision ([`viola_etcd::Leadership::fence`]): a leader paused or partitioned
//!   past its lease cannot write once a successor holds the key, even if it has not noticed
//!   yet. A refused write is an error (`InventoryError::is_not_leader`); the leader that
//!   notices it has lost its lease stops leading (the process exits; its supervisor starts
//!   it again, as a standby).
//! - **Takeover.** The successor builds its manager from the inventory in etcd and resolves
//!   what its predecessor journaled there, as a restarted single manager does with its file:
//!   a migration in progress is finished or rolled back (exactly one running copy), a create
//!   half done undone, a delete half done finished.
//! - **Time to take over** ≈ the lease's TTL (etcd grants at least 1.5 × its election timeout:
//!   2 s with the default 1 s) + the standby's [`CAMPAIGN_PERIOD`] + an etcd leader election
//!   if the lost machine also held etcd's leadership (1.9 s measured with the defaults) + the
//!   journal's recovery.
//! - **Calls are synchronous** ([`viola_etcd`]'s client): the inventory's every call is one
//!   or two etcd round trips, made on the runtime's worker threads as the embedded store's
//!   disk writes are; etcd is near the managers (their site's network).

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use viola_etcd::{Acquire, Etcd, EtcdError, Leadership};

use crate::inventory::Inventory;
use crate::inventory::etcd_backend::EtcdBackend;

/// How often a standby tries to become the leader.
pub const CAMPAIGN_PERIOD: Duration = Duration::from_millis(500);

/// `[replication]`: this manager is one of several sharing their state in etcd.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplicationConfig {
    /// etcd's client endpoints (`HOST:PORT`), e.g. the three members'.
    pub etcd: Vec<String>,
    /// Speak TLS to etcd: the manager's certificate (`identity_dir`) as client certificate,
    /// etcd's members' certificates from the federation CA naming the addresses in `etcd`
    /// (`viola-ca issue --role etcd --address ...`), etcd run with `--client-cert-auth`.
    /// `false`: plain HTTP, for etcd on loopback only.
    #[serde(default = "default_tls")]
    pub tls: bool,
    /// This manager's name (what the others log as the leader); unique among the managers.
    pub name: String,
    /// Where the federation's state lives in etcd's keyspace.
    #[serde(default = "default_prefix")]
    pub prefix: String,
    /// Seconds the leader's lease lives without renewal: how long a lost leader blocks its
    /// successor (etcd may grant more: at least 1.5 × its election timeout).
    #[serde(default = "default_lease_ttl")]
    pub lease_ttl_s: u64,
    /// Seconds an etcd request may take before the next member is tried.
    #[serde(default = "default_request_timeout")]
    pub request_timeout_s: u64,
}

fn default_tls() -> bool {
    true
}
fn default_prefix() -> String {
    "/viola".into()
}
fn default_lease_ttl() -> u64 {
    3
}
fn default_request_timeout() -> u64 {
    2
}

impl ReplicationConfig {
    pub fn check(&self) -> Result<(), String> {
        if self.etcd.is_empty() {
            return Err("etcd: name at least one etcd endpoint (HOST:PORT)".into());
        }
        if self.name.is_empty() || self.name.contains(char::is_whitespace) {
            return Err(format!(
                "name {:?}: give this manager a name without spaces",
                self.name
            ));
        }
        if !self.prefix.starts_with('/') || self.prefix.ends_with('/') {
            return Err(format!(
                "prefix {:?}: a key prefix starts with / and does not end with one",
                self.prefix
            ));
        }
        if !(2..=60).contains(&self.lease_ttl_s) {
            return Err(format!(
                "lease_ttl_s {}: between 2 and 60 seconds",
                self.lease_ttl_s
            ));
        }
        if self.request_timeout_s == 0 || self.request_timeout_s >= self.lease_ttl_s {
            return Err(format!(
                "request_timeout_s {}: at least 1 and below lease_ttl_s ({}), or a leader cannot renew its lease in time",
                self.request_timeout_s, self.lease_ttl_s
            ));
        }
        Ok(())
    }

    fn leader_key(&self) -> Vec<u8> {
        format!("{}/leader", self.prefix).into_bytes()
    }

    fn inventory_prefix(&self) -> Vec<u8> {
        format!("{}/inventory/", self.prefix).into_bytes()
    }
}

/// Why replication failed.
#[derive(Debug, thiserror::Error)]
pub enum ReplicationError {
    #[error("[replication] {0}")]
    Config(String),
    #[error("etcd: cannot {what}")]
    Etcd {
        what: &'static str,
        #[source]
        source: EtcdError,
    },
    #[error("etcd call task failed")]
    Task(#[source] tokio::task::JoinError),
    #[error("cannot build the TLS configuration for etcd")]
    Tls(#[source] viola_common::identity::TlsConfigError),
}

/// Why a leader stopped leading.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lost {
    /// etcd says its lease expired (it could not renew it in time): another manager may lead.
    LeaseExpired,
    /// etcd did not answer for longer than the lease lives.
    Unreachable(String),
}

impl std::fmt::Display for Lost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::LeaseExpired => write!(f, "its lease expired"),
            Self::Unreachable(why) => write!(f, "etcd did not answer for a lease's time: {why}"),
        }
    }
}

/// One manager of a replicated set: its etcd client and its lease.
pub struct Replica {
    etcd: Arc<Etcd>,
    cfg: ReplicationConfig,
    /// What the leader key holds while this one leads: its name and its listen address.
    value: String,
    lease: std::sync::Mutex<i64>,
}

async fn call<T: Send + 'static>(
    etcd: &Arc<Etcd>,
    what: &'static str,
    f: impl FnOnce(&Etcd) -> Result<T, EtcdError> + Send + 'static,
) -> Result<T, ReplicationError> {
    let etcd = Arc::clone(etcd);
    tokio::task::spawn_blocking(move || f(&etcd))
        .await
        .map_err(ReplicationError::Task)?
        .map_err(|source| ReplicationError::Etcd { what, source })
}

impl Replica {
    /// Connects to etcd (over TLS as `identity`, unless `tls = false`) and takes a lease.
    /// `listen` is what the others log as the leader's address.
    pub async fn join(
        cfg: &ReplicationConfig,
        listen: std::net::SocketAddr,
        identity: &viola_common::identity::Identity,
    ) -> Result<Self, ReplicationError> {
        cfg.check().map_err(ReplicationError::Config)?;
        let timeout = Duration::from_secs(cfg.request_timeout_s);
        let etcd = if cfg.tls {
            // No ALPN: etcd serves its JSON gateway on HTTP/1.1, and Go refuses a client
            // whose ALPN list it shares nothing with.
            let mut tls = identity
                .rustls_client_config(b"")
                .map_err(ReplicationError::Tls)?;
            tls.alpn_protocols.clear();
            Etcd::with_tls(&cfg.etcd, timeout, Arc::new(tls))
        } else {
            tracing::warn!(
                "[replication] tls = false: the inventory travels to etcd in plain HTTP"
            );
            Etcd::new(&cfg.etcd, timeout)
        }
        .map_err(|source| ReplicationError::Etcd {
            what: "use the endpoints",
            source,
        })?;
        let etcd = Arc::new(etcd);
        let ttl = i64::try_from(cfg.lease_ttl_s).unwrap_or(3);
        let lease = call(&etcd, "grant a lease", move |e| e.lease_grant(ttl)).await?;
        tracing::info!(etcd = %cfg.etcd.join(","), lease = lease.id, ttl_s = lease.ttl_s, "joined the replicated managers");
        Ok(Self {
            etcd,
            value: format!("{} {listen}", cfg.name),
            cfg: cfg.clone(),
            lease: std::sync::Mutex::new(lease.id),
        })
    }

    fn lease(&self) -> i64 {
        *self
            .lease
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Renews the lease while standing by, taking a new one if it expired meanwhile (etcd
    /// down for longer than its TTL).
    async fn renew_standby_lease(&self) -> Result<(), ReplicationError> {
        let id = self.lease();
        let ttl = call(&self.etcd, "renew the lease", move |e| {
            e.lease_keep_alive(id)
        })
        .await?;
        if ttl <= 0 {
            let want = i64::try_from(self.cfg.lease_ttl_s).unwrap_or(3);
            let lease = call(&self.etcd, "grant a lease", move |e| e.lease_grant(want)).await?;
            *self
                .lease
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = lease.id;
        }
        Ok(())
    }

    /// Stands by until this manager is elected (`Some`) or `token` is cancelled (`None`).
    /// etcd being unreachable is logged and retried: a standby has nothing else to do.
    pub async fn campaign(&self, token: &CancellationToken) -> Option<Leadership> {
        let mut holder: Option<Vec<u8>> = None;
        let renew_every = Duration::from_secs(self.cfg.lease_ttl_s) / 3;
        let mut renewed = Instant::now();
        loop {
            if renewed.elapsed() >= renew_every {
                match self.renew_standby_lease().await {
                    Ok(()) => renewed = Instant::now(),
                    Err(e) => {
                        tracing::warn!(error = %viola_common::errors::chain(&e), "standing by")
                    }
                }
            }
            let (key, value, lease) = (
                self.cfg.leader_key(),
                self.value.clone().into_bytes(),
                self.lease(),
            );
            match call(&self.etcd, "campaign", move |e| {
                e.try_acquire(&key, &value, lease)
            })
            .await
            {
                Ok(Acquire::Won(leadership)) => {
                    tracing::info!(name = %self.cfg.name, revision = leadership.create_revision, "elected leader of the managers");
                    return Some(leadership);
                }
                Ok(Acquire::Held { holder_value, .. }) => {
                    if holder.as_ref() != Some(&holder_value) {
                        tracing::info!(leader = %String::from_utf8_lossy(&holder_value), "standing by");
                        holder = Some(holder_value);
                    }
                }
                Err(e) => {
                    // A lease etcd no longer knows (it expired while etcd was out of reach)
                    // cannot carry a key: take a new one at the next renewal.
                    tracing::warn!(error = %viola_common::errors::chain(&e), "cannot campaign");
                    renewed = Instant::now() - renew_every;
                }
            }
            tokio::select! {
                () = token.cancelled() => return None,
                () = tokio::time::sleep(CAMPAIGN_PERIOD) => {}
            }
        }
    }

    /// Keeps the leader's lease alive until it is lost (returned) or `token` is cancelled
    /// (`None`).
    pub async fn hold(&self, token: &CancellationToken) -> Option<Lost> {
        let ttl = Duration::from_secs(self.cfg.lease_ttl_s);
        let mut renewed = Instant::now();
        loop {
            tokio::select! {
                () = token.cancelled() => return None,
                () = tokio::time::sleep(ttl / 3) => {}
            }
            let id = self.lease();
            let since = renewed.elapsed();
            if since > ttl * 2 / 3 {
                tracing::warn!(
                    since_ms = since.as_millis() as u64,
                    ttl_ms = ttl.as_millis() as u64,
                    "renewing the leader's lease late"
                );
            }
            match call(&self.etcd, "renew the leader's lease", move |e| {
                e.lease_keep_alive(id)
            })
            .await
            {
                Ok(remaining) if remaining > 0 => renewed = Instant::now(),
                Ok(_) => return Some(Lost::LeaseExpired),
                Err(e) => {
                    let why = viola_common::errors::chain(&e);
                    if renewed.elapsed() >= ttl {
                        return Some(Lost::Unreachable(why));
                    }
                    tracing::warn!(error = %why, "cannot renew the leader's lease yet");
                }
            }
        }
    }

    /// The inventory in etcd, every write fenced by `leadership`.
    pub fn inventory(&self, leadership: &Leadership) -> Inventory {
        Inventory::with_backend(Box::new(EtcdBackend::new(
            Arc::clone(&self.etcd),
            self.cfg.inventory_prefix(),
            Some(leadership.clone()),
        )))
    }

    /// Hands leadership over at once (a clean stop): deletes the leader key if it is still
    /// this manager's and revokes the lease, so a standby need not wait for it to expire.
    pub async fn resign(&self, leadership: Option<Leadership>) {
        if let Some(leadership) = leadership {
            match call(&self.etcd, "resign", move |e| e.resign(&leadership)).await {
                Ok(true) => tracing::info!("resigned the managers' leadership"),
                Ok(false) => tracing::info!("leadership had already passed on"),
                Err(e) => {
                    tracing::warn!(error = %viola_common::errors::chain(&e), "cannot resign")
                }
            }
        }
        let id = self.lease();
        if let Err(e) = call(&self.etcd, "revoke the lease", move |e| e.lease_revoke(id)).await {
            tracing::warn!(error = %viola_common::errors::chain(&e), "cannot revoke the lease");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> ReplicationConfig {
        ReplicationConfig {
            etcd: vec!["198.18.0.1:2379".into()],
            tls: true,
            name: "m1".into(),
            prefix: default_prefix(),
            lease_ttl_s: default_lease_ttl(),
            request_timeout_s: default_request_timeout(),
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_standby_leads_once_the_leader_resigns_or_stops_renewing_its_lease() {
        let cluster = viola_etcd::testing::Cluster::start(1);
        let cfg = |name: &str| ReplicationConfig {
            etcd: cluster.endpoints(),
            tls: false,
            name: name.into(),
            prefix: "/t".into(),
            lease_ttl_s: 2,
            request_timeout_s: 1,
        };
        let listen = std::net::SocketAddr::from(([127, 0, 0, 1], 7443));
        let token = CancellationToken::new();
        let ca = viola_common::identity::CertificateAuthority::generate("fed", 1).unwrap();
        let identity = ca
            .issue(
                &viola_common::identity::PeerIdentity::new(
                    viola_common::identity::Role::Adaptmgr,
                    "fed",
                    "m",
                )
                .unwrap(),
                1,
            )
            .unwrap()
            .to_identity()
            .unwrap();
        let m1 = Arc::new(Replica::join(&cfg("m1"), listen, &identity).await.unwrap());
        let m2 = Replica::join(&cfg("m2"), listen, &identity).await.unwrap();
        let first = m1.campaign(&token).await.expect("m1 elected");

        // While m1 renews its lease, m2 stands by (three leases' time).
        let holding = token.child_token();
        let hold = tokio::spawn({
            let (m1, holding) = (Arc::clone(&m1), holding.clone());
            async move { m1.hold(&holding).await }
        });
        let standby = tokio::time::timeout(Duration::from_secs(6), m2.campaign(&token)).await;
        assert!(standby.is_err(), "m2 was elected while m1 led");
        holding.cancel();
        assert_eq!(hold.await.unwrap(), None, "m1 never lost its lease");

        // m1 stops cleanly: it resigns, and m2 is elected without waiting for m1's lease.
        m1.resign(Some(first.clone())).await;
        let second = tokio::time::timeout(Duration::from_secs(2), m2.campaign(&token))
            .await
            .expect("m2 elected at once")
            .expect("m2 elected");
        assert_ne!(second.create_revision, first.create_revision);
        let err = m1
            .inventory(&first)
            .put_site(&crate::inventory::SiteRecord { name: "a".into() })
            .unwrap_err();
        assert!(err.is_not_leader(), "{err}");
        m2.inventory(&second)
            .put_site(&crate::inventory::SiteRecord { name: "a".into() })
            .unwrap();

        // m2 stops renewing (paused, cut off): its lease ends, m3 is elected, and m2 learns it
        // lost at its next renewal.
        let m3 = Replica::join(&cfg("m3"), listen, &identity).await.unwrap();
        tokio::time::timeout(Duration::from_secs(15), m3.campaign(&token))
            .await
            .expect("m3 elected once m2's lease ended")
            .expect("m3 elected");
        assert_eq!(m2.hold(&token).await, Some(Lost::LeaseExpired));
    }

    #[test]
    fn a_configuration_that_cannot_work_is_refused_with_the_reason() {
        assert_eq!(cfg().check(), Ok(()));
        let bad = [
            (
                ReplicationConfig {
                    etcd: vec![],
                    ..cfg()
                },
                "endpoint",
            ),
            (
                ReplicationConfig {
                    name: "m 1".into(),
                    ..cfg()
                },
                "name",
            ),
            (
                ReplicationConfig {
                    prefix: "viola".into(),
                    ..cfg()
                },
                "prefix",
            ),
            (
                ReplicationConfig {
                    lease_ttl_s: 1,
                    ..cfg()
                },
                "lease_ttl_s",
            ),
            (
                ReplicationConfig {
                    request_timeout_s: 3,
                    ..cfg()
                },
                "renew",
            ),
        ];
        for (c, why) in bad {
            let err = c.check().unwrap_err();
            assert!(err.contains(why), "{err}");
        }
        let parsed: ReplicationConfig =
            toml::from_str("etcd = [\"198.18.0.1:2379\"]\nname = \"m1\"\n").unwrap();
        assert_eq!(parsed, cfg());
        assert!(toml::from_str::<ReplicationConfig>("etcd = []\nname = \"m\"\nttl = 3\n").is_err());
    }
}
