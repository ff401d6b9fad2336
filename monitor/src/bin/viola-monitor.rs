//! `viola-monitor`: per-host monitor daemon (host and VM usage, probes, heartbeats).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use anyhow::{Context, bail};
use clap::Parser;
use prometheus_client::registry::Registry;
use viola_common::identity::Identity;
use viola_hypervisor::libvirt::LibvirtConnector;
use viola_monitor::daemon::{self, MonitorConfig, MonitorMetrics};

#[derive(Debug, Parser)]
#[command(version, about = "Viola monitor daemon")]
struct Args {
    #[arg(long, short)]
    config: Option<PathBuf>,
    #[arg(long)]
    host: Option<String>,
    #[arg(long)]
    site: Option<String>,
    /// The manager's address; a replicated manager's addresses separated by commas (the
    /// first is `manager`, the others `manager_replicas`).
    #[arg(long, value_delimiter = ',')]
    manager: Vec<SocketAddr>,
    #[arg(long)]
    identity: Option<PathBuf>,
    #[arg(long)]
    libvirt_uri: Option<String>,
    #[arg(long)]
    interval_ms: Option<u64>,
    #[arg(long)]
    metrics_listen: Option<SocketAddr>,
    /// The host is a partition of a bigger machine: its cgroup directory (repeat for the cpu
    /// and cpuacct hierarchies of cgroup v1). Replaces the config's `cgroup_dirs`.
    #[arg(long = "cgroup-dir")]
    cgroup_dirs: Vec<PathBuf>,
    /// The host's overlay daemon's control socket: reports then carry its links' traffic.
    #[arg(long)]
    overlay_socket: Option<PathBuf>,
    /// Where the host's /var/lib/libvirt is as this monitor sees it (the VMs' channels).
    #[arg(long)]
    libvirt_state_dir: Option<PathBuf>,
    /// Where the host's /run/libvirt is as this monitor sees it (the VMs' channels).
    #[arg(long)]
    libvirt_run_dir: Option<PathBuf>,
    /// Print one report as JSON and exit (no manager needed).
    #[arg(long)]
    once: bool,
}

fn main() -> std::process::ExitCode {
    viola_common::shutdown::init_tracing();
    viola_common::errors::run_main("viola-monitor", run(Args::parse()))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let mut cfg: MonitorConfig = viola_common::config::load(args.config.as_deref())?;
    viola_common::override_with! {
        args.host => cfg.host,
        args.site => cfg.site,
        args.identity => cfg.identity_dir,
        args.libvirt_uri => cfg.libvirt_uri,
        args.interval_ms => cfg.interval_ms,
        args.metrics_listen => cfg.metrics_listen,
        args.libvirt_state_dir => cfg.libvirt_state_dir,
        args.libvirt_run_dir => cfg.libvirt_run_dir,
    }
    if cfg.host.is_empty() || cfg.site.is_empty() {
        bail!("host and site must be set (config keys `host`, `site` or --host/--site)");
    }
    if let Some((first, replicas)) = args.manager.split_first() {
        cfg.manager = *first;
        cfg.manager_replicas = replicas.to_vec();
    }
    if !args.cgroup_dirs.is_empty() {
        cfg.cgroup_dirs = args.cgroup_dirs;
    }
    if args.overlay_socket.is_some() {
        cfg.overlay_socket = args.overlay_socket;
    }
    if !cfg.cgroup_dirs.is_empty() {
        // A misnamed partition is a configuration error, not a host that silently reports the
        // whole machine.
        let sample = daemon::read_cgroup(&cfg.cgroup_dirs)
            .context("the host's cgroup (cgroup_dirs) cannot be read")?;
        tracing::info!(capacity = ?sample.capacity, "the host is a cgroup partition");
    }
    if args.once {
        let connector = LibvirtConnector;
        let mut hv = viola_hypervisor::Connector::open(&connector, &cfg.libvirt_uri).ok();
        let mut sampler = viola_monitor::sampler::Sampler::new(&cfg.host, &cfg.site);
        let _ = daemon::collect(&cfg, &mut sampler, &mut hv).await;
        tokio::time::sleep(std::time::Duration::from_millis(cfg.interval_ms.max(100))).await;
        let report = daemon::collect(&cfg, &mut sampler, &mut hv).await;
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    let token = viola_common::shutdown::signal_token().context("cannot watch signals")?;
    let identity = Identity::load_dir(&cfg.identity_dir)
        .with_context(|| format!("cannot load identity from {}", cfg.identity_dir.display()))?;
    let metrics = Arc::new(MonitorMetrics::default());
    let mut registry = Registry::default();
    metrics.register(&mut registry);
    let (addr, serve) = viola_common::metrics::serve(
        cfg.metrics_listen,
        Arc::new(Mutex::new(registry)),
        token.clone(),
    )
    .await?;
    tracing::info!(host = %cfg.host, site = %cfg.site, manager = %cfg.manager, metrics = %addr, "viola-monitor running");
    tokio::join!(
        daemon::run(
            cfg,
            identity,
            Arc::new(LibvirtConnector),
            metrics,
            token.clone()
        ),
        serve
    );
    tracing::info!("viola-monitor stopped");
    Ok(())
}
