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
use prometheus_client::registry::Registry;
use viola_adaptmgr::control::server;
use viola_adaptmgr::inventory::Inventory;
use viola_adaptmgr::manager::{Manager, ManagerConfig};
use viola_adaptmgr::policy_loop::{PolicyLoop, PolicyMetrics};
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
    if let Some(dir) = cfg.inventory.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let inventory = Arc::new(Inventory::open(&cfg.inventory)?);
    let manager = Arc::new(Manager::new(
        cfg.clone(),
        inventory,
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

    let mut registry = Registry::default();
    manager.metrics.register(&mut registry);
    policy_metrics.register(&mut registry);
    let registry = Arc::new(Mutex::new(registry));
    let (metrics_addr, metrics) =
        viola_common::metrics::serve(cfg.metrics_listen, registry, token.clone()).await?;

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

    let server_config = identity
        .server_config(&[alpn::ADAPTMGR])
        .context("cannot build the TLS server configuration")?;
    let endpoint = quinn::Endpoint::server(server_config, cfg.listen)
        .with_context(|| format!("cannot listen on {}", cfg.listen))?;
    tracing::info!(listen = %cfg.listen, metrics = %metrics_addr, hosts = cfg.hosts.len(),
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
        metrics,
        dashboard
    );
    tracing::info!("viola-adaptmgr stopped");
    Ok(())
}
