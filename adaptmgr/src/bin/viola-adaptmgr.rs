//! `viola-adaptmgr`: the federation's adaptation manager daemon. Receives monitor reports and
//! CLI requests over QUIC with mutual TLS, keeps the inventory, migrates and resizes VMs,
//! re-instantiates the VMs of failed hosts, runs the adaptation policy loop (`[policy]`), and
//! exposes Prometheus metrics.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicI64;
use tokio_util::sync::CancellationToken;
use viola_adaptmgr::control::server;
use viola_adaptmgr::inventory::Inventory;
use viola_adaptmgr::manager::{Manager, ManagerConfig};
use viola_adaptmgr::policy_loop::{PolicyLoop, PolicyMetrics};
use viola_adaptmgr::replication::{Lost, Replica};
use viola_common::identity::{Identity, alpn};
use viola_hypervisor::libvirt::LibvirtConnector;

#[derive(Debug, Parser)]
#[command(version, about = "Viola adaptation manager daemon")]
struct Args {
    /// TOML configuration file (defaults apply to missing keys; unknown keys are errors).
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Address for monitors and the CLI (overrides `listen`).
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Prometheus endpoint address (overrides `metrics_listen`).
    #[arg(long)]
    metrics_listen: Option<SocketAddr>,
    /// Directory with cert.pem, key.pem and ca.pem (overrides `identity_dir`).
    #[arg(long)]
    identity: Option<PathBuf>,
    /// Inventory file (overrides `inventory`).
    #[arg(long)]
    inventory: Option<PathBuf>,
    /// Seconds without a report before a host is declared failed.
    #[arg(long)]
    heartbeat_timeout_s: Option<u64>,
}

fn main() -> std::process::ExitCode {
    viola_common::shutdown::init_tracing();
    viola_common::errors::run_main("viola-adaptmgr", run(Args::parse()))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let mut cfg: ManagerConfig = viola_common::config::load(args.config.as_deref())?;
    viola_common::override_with! {
        args.listen => cfg.listen,
        args.metrics_listen => cfg.metrics_listen,
        args.identity => cfg.identity_dir,
        args.inventory => cfg.inventory,
        args.heartbeat_timeout_s => cfg.heartbeat_timeout_s,
    }
    let token = viola_common::shutdown::signal_token().context("cannot watch signals")?;
    viola_adaptmgr::tenants::check_tenants(&cfg.tenants).context("[[tenants]]")?;
    cfg.vm_template.check().context("[vm_template]")?;
    let identity = Identity::load_dir(&cfg.identity_dir)
        .with_context(|| format!("cannot load identity from {}", cfg.identity_dir.display()))?;
    let mut registry = Registry::default();
    let leader = Gauge::<i64, AtomicI64>::default();
    registry.register(
        "viola_manager_leader",
        "1 while this manager leads (always, without [replication]); 0 while it stands by",
        leader.clone(),
    );
    let registry = Arc::new(Mutex::new(registry));
    let (metrics_addr, metrics) =
        viola_common::metrics::serve(cfg.metrics_listen, Arc::clone(&registry), token.clone())
            .await?;
    tracing::info!(metrics = %metrics_addr, "metrics");
    // Bound once, before anything else: a standby refuses connections on it (so a client
    // asking it moves on to the next manager at once), the leader serves on it.
    let server_config = identity
        .server_config(&[alpn::ADAPTMGR])
        .context("cannot build the TLS server configuration")?;
    let endpoint = quinn::Endpoint::server(server_config, cfg.listen)
        .with_context(|| format!("cannot listen on {}", cfg.listen))?;

    let role = async {
        let Some(replication) = &cfg.replication else {
            if let Some(dir) = cfg.inventory.parent() {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("cannot create {}", dir.display()))?;
            }
            let inventory = Inventory::open(&cfg.inventory)?;
            leader.set(1);
            return lead(
                &cfg,
                identity,
                endpoint,
                inventory,
                &registry,
                token.clone(),
            )
            .await;
        };
        let replica = Arc::new(Replica::join(replication, cfg.listen, &identity).await?);
        let refusing = async {
            while let Some(incoming) = endpoint.accept().await {
                incoming.refuse();
            }
        };
        let elected = tokio::select! {
            elected = replica.campaign(&token) => elected,
            () = refusing => None,
        };
        let Some(leadership) = elected else {
            replica.resign(None).await;
            return Ok(());
        };
        leader.set(1);
        let inventory = replica.inventory(&leadership);
        let leading = token.child_token();
        // The lease is renewed by a task of its own: the leader's work calls the inventory
        // synchronously, and must not hold the renewal back past the lease's end.
        let held = tokio::spawn({
            let (replica, leading) = (Arc::clone(&replica), leading.clone());
            async move {
                let lost = replica.hold(&leading).await;
                if lost.is_some() {
                    leading.cancel();
                }
                lost
            }
        });
        let led = lead(
            &cfg,
            identity,
            endpoint.clone(),
            inventory,
            &registry,
            leading.clone(),
        )
        .await;
        leading.cancel();
        let lost = held
            .await
            .unwrap_or_else(|e| Some(Lost::Unreachable(format!("the lease task failed: {e}"))));
        leader.set(0);
        if let Some(lost) = lost {
            anyhow::bail!(
                "lost the leadership of the managers ({lost}); stopping so that this manager starts again as a standby"
            );
        }
        replica.resign(Some(leadership)).await;
        led
    };
    // Whatever ends the role (a signal, a lost leadership, an error) ends the process: the
    // metrics endpoint stops with it.
    let stop = token.clone();
    let role = async {
        let role = role.await;
        stop.cancel();
        role
    };
    let (role, ()) = tokio::join!(role, metrics);
    role?;
    tracing::info!("viola-adaptmgr stopped");
    Ok(())
}

/// The manager's work, while it leads (always, without `[replication]`): the endpoint for
/// monitors and the CLI, the dashboard, failure handling, the journal's recovery and the
/// policy loop, until `token` is cancelled.
async fn lead(
    cfg: &ManagerConfig,
    identity: Identity,
    endpoint: quinn::Endpoint,
    inventory: Inventory,
    registry: &Mutex<Registry>,
    token: CancellationToken,
) -> anyhow::Result<()> {
    tracing::info!(store = %inventory.describe(), "leading");
    let manager = Arc::new(Manager::new(
        cfg.clone(),
        Arc::new(inventory),
        Arc::new(LibvirtConnector),
    )?);

    // Built (and so checked) even when `off`: a typo in the policy's name fails the start.
    let policy_metrics = Arc::new(PolicyMetrics::default());
    let policy_loop = PolicyLoop::new(
        cfg.policy.clone(),
        &manager.inventory,
        Arc::clone(&policy_metrics),
    )
    .context("cannot start the policy loop")?;
    {
        let mut registry = registry
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        manager.metrics.register(&mut registry);
        policy_metrics.register(&mut registry);
    }

    let dashboard = match cfg.dashboard_listen {
        Some(addr) => {
            let (bound, serve) = viola_adaptmgr::dashboard::serve(
                addr,
                &identity,
                Arc::clone(&manager),
                token.clone(),
            )
            .await?;
            tracing::info!(listen = %bound, "dashboard: https://{bound}/ (client certificate from the federation CA)");
            Some(serve)
        }
        None => None,
    };
    let dashboard = async move {
        if let Some(serve) = dashboard {
            serve.await;
        }
    };

    tracing::info!(listen = %cfg.listen, hosts = cfg.hosts.len(),
        policy = %cfg.policy.name, mode = %cfg.policy.mode, period_s = cfg.policy.period_s, "viola-adaptmgr running");

    let ha = {
        let manager = Arc::clone(&manager);
        let token = token.clone();
        async move {
            let mut tick = tokio::time::interval(Duration::from_millis(500));
            loop {
                tokio::select! {
                    () = token.cancelled() => return,
                    _ = tick.tick() => {
                        if let Err(e) = manager.ha_tick().await {
                            tracing::warn!(error = %viola_common::errors::chain(&e), "failure handling");
                        }
                    }
                }
            }
        }
    };
    // Migrations a previous manager left in progress: finished or rolled back while serving
    // (a request for such a VM meanwhile gets "busy").
    let resume = {
        let manager = Arc::clone(&manager);
        let token = token.clone();
        async move {
            tokio::select! {
                () = token.cancelled() => {}
                r = manager.resume_migrations() => match r {
                    Ok(reports) if !reports.is_empty() => {
                        tracing::info!(count = reports.len(), "interrupted migrations resolved");
                    }
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %viola_common::errors::chain(&e), "cannot resume interrupted migrations"),
                },
            }
            // Then creates and deletes left half-done (undone, finished), and every violin
            // made through the API pushed again to its overlay daemons.
            tokio::select! {
                () = token.cancelled() => {}
                r = async {
                    let undone = manager.resume_pending().await?;
                    manager.push_all_violins().await?;
                    Ok::<_, viola_adaptmgr::inventory::InventoryError>(undone)
                } => match r {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(count = n, "interrupted creates and deletes resolved"),
                    Err(e) => tracing::warn!(error = %viola_common::errors::chain(&e), "cannot resolve interrupted creates and deletes"),
                },
            }
        }
    };
    tokio::join!(
        server::serve(
            endpoint,
            identity.clone(),
            Arc::clone(&manager),
            token.clone()
        ),
        ha,
        resume,
        policy_loop.run(Arc::clone(&manager), token.clone()),
        dashboard
    );
    Ok(())
}
