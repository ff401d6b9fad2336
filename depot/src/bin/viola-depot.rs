//! `viola-depot`: the depot's command line and daemon.
//!
//! ```text
//! viola-depot import  IMAGE.qcow2 --name NAME          cut an image (and its backing chain) into the store
//! viola-depot assemble NAME --image-dir DIR --vm VM   lay the chain down, create VM.qcow2 on top
//! viola-depot plan SCENARIO.json --explain            plan deliveries, compare with the LP bound
//! viola-depot serve --config depot.toml               the daemon
//! viola-depot fetch NAME --from ADDR...               fetch an image's parts from other depots
//! viola-depot stage NAME --vm VM --host H --deadline-secs S --depot ADDR   ask a depot to stage
//! viola-depot images --from ADDR --identity DIR        a depot's images, over the network
//! viola-depot upload FILE --name NAME --to ADDR --identity DIR [--replace]   send an image to a depot
//! viola-depot status | gc | scrub | chunk-stats
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use viola_common::identity::Identity;
use viola_depot::api::{StageRequest, StageState};
use viola_depot::bound;
use viola_depot::chunker::{self, ChunkerSpec};
use viola_depot::client::{DepotClient, client_endpoint, connect_on};
use viola_depot::daemon::{DepotConfig, PeerConfig};
use viola_depot::hash::Hash;
use viola_depot::image;
use viola_depot::planner::{self, Scenario};
use viola_depot::scenario_gen::{GenParams, generate};
use viola_depot::store::Store;
use viola_depot::transfer::{self, Congestion, FetchOptions, PathTuning};

#[derive(Parser)]
#[command(
    about = "Viola depot: content-addressed VM image parts, verified transfers, deadline-aware staging"
)]
struct Cli {
    /// Store directory (or VIOLA_DEPOT_STORE).
    #[arg(
        long,
        global = true,
        env = "VIOLA_DEPOT_STORE",
        default_value = "/var/lib/viola/depot"
    )]
    store: PathBuf,
    /// No progress bars (for scripts).
    #[arg(long, global = true)]
    quiet: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum CongestionArg {
    Cubic,
    Bbr,
}

impl From<CongestionArg> for Congestion {
    fn from(c: CongestionArg) -> Self {
        match c {
            CongestionArg::Cubic => Self::Cubic,
            CongestionArg::Bbr => Self::Bbr,
        }
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum ChunkerKind {
    /// FastCDC with cut points on 4 KiB block boundaries.
    FastcdcAligned,
    /// FastCDC with cut points on 16 KiB boundaries.
    FastcdcAligned16k,
    Fastcdc,
    Fixed,
}

#[derive(Subcommand)]
enum Command {
    /// Import a qcow2/raw image and its whole backing chain as NAME.
    Import {
        file: PathBuf,
        #[arg(long)]
        name: String,
        #[arg(long, value_enum, default_value = "fastcdc-aligned")]
        chunker: ChunkerKind,
        /// Average (fastcdc; min = avg/4, max = 4·avg) or fixed chunk size in KiB.
        #[arg(long, default_value_t = 64)]
        chunk_kib: u32,
    },
    /// Lay an image's chain down in --image-dir and (with --vm) create VM.qcow2 on top.
    Assemble {
        image: String,
        #[arg(long)]
        image_dir: PathBuf,
        #[arg(long)]
        vm: Option<String>,
    },
    /// Plan deliveries for a scenario (JSON or TOML) or a generated one; compare with the LP bound.
    Plan {
        scenario: Option<PathBuf>,
        /// Generate a scenario with this seed instead of reading one.
        #[arg(long)]
        generate: Option<u64>,
        #[arg(long, default_value_t = 50)]
        vms: usize,
        #[arg(long, default_value_t = 4)]
        sites: usize,
        /// Print the per-VM explanation and the transfers.
        #[arg(long)]
        explain: bool,
        /// Print the plan as JSON.
        #[arg(long)]
        json: bool,
        /// Also compute the exact optimum (MILP).
        #[arg(long)]
        exact: bool,
    },
    /// Run the depot daemon.
    Serve {
        #[arg(long)]
        config: Option<PathBuf>,
        #[arg(long)]
        site: Option<String>,
        #[arg(long)]
        listen: Option<SocketAddr>,
        #[arg(long)]
        identity: Option<PathBuf>,
        /// Peer depot as SITE=ADDR (repeatable).
        #[arg(long = "peer", value_parser = parse_peer)]
        peers: Vec<PeerConfig>,
        #[arg(long)]
        image_dir_template: Option<String>,
        #[arg(long)]
        metrics_listen: Option<SocketAddr>,
        #[arg(long)]
        rate_mbit: Option<f64>,
        #[arg(long)]
        rtt_ms: Option<f64>,
        #[arg(long, value_enum)]
        congestion: Option<CongestionArg>,
    },
    /// Fetch an image (manifest and parts) from other depots into the local store.
    Fetch {
        image: String,
        #[arg(long = "from", required = true)]
        from: Vec<SocketAddr>,
        /// Directory with cert.pem, key.pem, ca.pem.
        #[arg(long)]
        identity: PathBuf,
        #[arg(long, default_value_t = 8)]
        streams: usize,
        #[arg(long, default_value_t = 1000.0)]
        rate_mbit: f64,
        #[arg(long, default_value_t = 50.0)]
        rtt_ms: f64,
        #[arg(long, value_enum, default_value = "bbr")]
        congestion: CongestionArg,
        /// Print the fetch report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Ask a depot to stage IMAGE for VM at HOST before a deadline, and wait for it.
    Stage {
        image: String,
        #[arg(long)]
        vm: String,
        #[arg(long)]
        host: String,
        /// Deadline, seconds from now.
        #[arg(long)]
        deadline_secs: f64,
        #[arg(long)]
        depot: SocketAddr,
        #[arg(long)]
        identity: PathBuf,
        #[arg(long)]
        reject_if_late: bool,
        /// Lay down the image's chain only, without the VM's overlay.
        #[arg(long)]
        chain_only: bool,
        /// Return after the first answer instead of waiting for readiness.
        #[arg(long)]
        no_wait: bool,
        #[arg(long, default_value_t = 600)]
        timeout_secs: u64,
    },
    /// List the images of the depot at ADDR (certificate of role adaptmgr or cli).
    Images {
        #[arg(long = "from")]
        from: SocketAddr,
        /// Directory with cert.pem, key.pem, ca.pem.
        #[arg(long)]
        identity: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Send one self-contained qcow2 or raw image to the depot at ADDR, which imports it as
    /// NAME (certificate of role adaptmgr: the manager's; the depot refuses any other).
    Upload {
        file: PathBuf,
        #[arg(long)]
        name: String,
        #[arg(long)]
        to: SocketAddr,
        /// Directory with cert.pem, key.pem, ca.pem.
        #[arg(long)]
        identity: PathBuf,
        /// Point an existing NAME at the new content.
        #[arg(long)]
        replace: bool,
        /// Print the depot's report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Images, parts and space in the store.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Remove what no image references.
    Gc {
        /// Spare unreferenced data younger than this (in-flight writes).
        #[arg(long, default_value_t = 600)]
        grace_secs: u64,
    },
    /// Re-verify every chunk, index and manifest.
    Scrub {
        /// Delete corrupt chunks and demote damaged parts so a fetch repairs them.
        #[arg(long)]
        repair: bool,
    },
    /// Benchmark: chunk verification (BLAKE3 per chunk, as every transfer does) against raw
    /// BLAKE3 of the same bytes; both on one thread, on the same bytes already in memory (warm
    /// for both), interleaved rounds, medians; prints JSON.
    #[command(hide = true)]
    BenchVerify {
        file: PathBuf,
        #[arg(long, default_value_t = 15)]
        rounds: u32,
    },
    /// Measure deduplication of files under several chunkers (no store needed).
    ChunkStats {
        files: Vec<PathBuf>,
        #[arg(long)]
        json: bool,
    },
}

fn parse_peer(s: &str) -> Result<PeerConfig, String> {
    let (site, addr) = s.split_once('=').ok_or("expected SITE=ADDR")?;
    Ok(PeerConfig {
        site: site.to_string(),
        addr: addr.parse().map_err(|e| format!("{e}"))?,
        rate_mbit: None,
    })
}

fn bar(quiet: bool, total: u64, what: &str) -> ProgressBar {
    if quiet {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new(total);
    pb.set_style(
        ProgressStyle::with_template(
            "{msg:12} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    pb.set_message(what.to_string());
    pb
}

fn chunker_spec(kind: ChunkerKind, kib: u32) -> anyhow::Result<ChunkerSpec> {
    let avg = kib.saturating_mul(1024);
    let spec = match kind {
        ChunkerKind::Fixed => ChunkerSpec::Fixed { size: avg },
        ChunkerKind::Fastcdc => ChunkerSpec::FastCdc {
            min: avg / 4,
            avg,
            max: avg.saturating_mul(4),
        },
        ChunkerKind::FastcdcAligned => ChunkerSpec::FastCdcAligned {
            min: (avg / 4).max(4096),
            avg,
            max: avg.saturating_mul(4),
        },
        ChunkerKind::FastcdcAligned16k => ChunkerSpec::FastCdcAligned16k {
            min: (avg / 4).max(16384),
            avg,
            max: avg.saturating_mul(4),
        },
    };
    spec.validate().context("chunk size")?;
    Ok(spec)
}

fn load_scenario(path: &Path) -> anyhow::Result<Scenario> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    if path.extension().is_some_and(|e| e == "toml") {
        Ok(toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?)
    } else {
        Ok(serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?)
    }
}

/// Loads the identity in `dir` and runs `work` with it to the end on a new Tokio runtime.
fn run_with_identity<F>(dir: &Path, work: impl FnOnce(Identity) -> F) -> anyhow::Result<()>
where
    F: Future<Output = anyhow::Result<()>>,
{
    let identity = Identity::load_dir(dir)?;
    tokio::runtime::Runtime::new()?.block_on(work(identity))
}

/// [`run_with_identity`] with a client of `depot` connected for `work`.
fn run_with_depot<F>(
    identity_dir: &Path,
    depot: SocketAddr,
    work: impl FnOnce(DepotClient) -> F,
) -> anyhow::Result<()>
where
    F: Future<Output = anyhow::Result<()>>,
{
    run_with_identity(identity_dir, |identity| async move {
        let c = DepotClient::connect(&identity, depot, PathTuning::default()).await?;
        work(c).await
    })
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let quiet = cli.quiet;
    match cli.command {
        Command::Import {
            file,
            name,
            chunker,
            chunk_kib,
        } => {
            let store = Store::open(&cli.store)?;
            let spec = chunker_spec(chunker, chunk_kib)?;
            let pb = bar(quiet, 0, "import");
            let t = Instant::now();
            let (h, m) = image::import(&store, &file, &name, spec, &mut |done, total| {
                pb.set_length(total);
                pb.set_position(done);
            })?;
            pb.finish_and_clear();
            println!(
                "imported {name} ({} parts, {:.1}s) manifest {h}",
                m.parts.len(),
                t.elapsed().as_secs_f64()
            );
            for p in &m.parts {
                println!(
                    "  {} {:>6} {:>12} bytes  {}",
                    p.id,
                    p.format.as_str(),
                    p.size,
                    p.label
                );
            }
        }
        Command::Assemble {
            image,
            image_dir,
            vm,
        } => {
            let store = Store::open(&cli.store)?;
            let (_, m) = store.resolve(&image)?;
            let pb = bar(quiet, m.parts.iter().map(|p| p.size).sum(), "assemble");
            let t = Instant::now();
            let a = image::assemble(&store, &m, &image_dir, vm.as_deref(), &mut |done, _| {
                pb.set_position(done)
            })?;
            pb.finish_and_clear();
            println!(
                "assembled {} in {:.2}s ({} parts reused)",
                m.name,
                t.elapsed().as_secs_f64(),
                a.reused
            );
            for p in &a.chain {
                println!("  chain   {}", p.display());
            }
            if let Some(o) = &a.overlay {
                println!("  overlay {} (qemu-img check ok)", o.display());
            }
        }
        Command::Plan {
            scenario,
            generate: seed,
            vms,
            sites,
            explain,
            json,
            exact,
        } => {
            let sc = match (scenario, seed) {
                (Some(p), None) => load_scenario(&p)?,
                (None, Some(seed)) => generate(
                    seed,
                    GenParams {
                        vms,
                        sites,
                        ..GenParams::default()
                    },
                ),
                _ => bail!("give a scenario file or --generate SEED (not both)"),
            };
            let plan = planner::plan(&sc)?;
            let b = bound::lp_bound(&sc)?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&serde_json::json!({ "plan": plan, "bound": b }))?
                );
                return Ok(());
            }
            if explain {
                print!("{}", planner::explain(&sc, &plan, Some(b.max_met)));
            } else {
                println!(
                    "met {} of {}; LP bound {:.2} (LP value {:.2}); met/bound {:.3}",
                    plan.met,
                    plan.vms.len(),
                    b.max_met,
                    b.lp_value,
                    plan.met as f64 / b.max_met.max(1e-9)
                );
            }
            if exact {
                println!("exact optimum (MILP): {}", bound::milp_optimum(&sc)?);
            }
        }
        Command::Serve {
            config,
            site,
            listen,
            identity,
            peers,
            image_dir_template,
            metrics_listen,
            rate_mbit,
            rtt_ms,
            congestion,
        } => {
            let mut cfg: DepotConfig = viola_common::config::load(config.as_deref())?;
            viola_common::override_with! {
                site => cfg.site,
                listen => cfg.listen,
                identity => cfg.identity_dir,
                image_dir_template => cfg.image_dir_template,
                metrics_listen.map(Some) => cfg.metrics_listen,
                rate_mbit => cfg.path.rate_mbit,
                rtt_ms => cfg.path.rtt_ms,
                congestion.map(Into::into) => cfg.path.congestion,
            }
            if !peers.is_empty() {
                cfg.peers = peers;
            }
            if cli.store.as_os_str() != "/var/lib/viola/depot" {
                cfg.store = cli.store.clone();
            }
            let identity = Identity::load_dir(&cfg.identity_dir)?;
            let rt = tokio::runtime::Runtime::new()?;
            rt.block_on(async move {
                let token = viola_common::shutdown::signal_token()?;
                let registry = Arc::new(std::sync::Mutex::new(
                    prometheus_client::registry::Registry::default(),
                ));
                viola_depot::daemon::run(cfg, identity, registry, token).await?;
                anyhow::Ok(())
            })?;
        }
        Command::Fetch {
            image,
            from,
            identity,
            streams,
            rate_mbit,
            rtt_ms,
            congestion,
            json,
        } => {
            let store = Store::open(&cli.store)?;
            run_with_identity(&identity, |identity| async move {
                let ep = client_endpoint(
                    &identity,
                    PathTuning {
                        rate_mbit,
                        rtt_ms,
                        congestion: congestion.into(),
                    },
                )?;
                let mut sources = Vec::new();
                for addr in &from {
                    let (conn, peer) = connect_on(&ep, *addr).await?;
                    sources.push(transfer::Source {
                        name: format!("{}/{}", peer.site, peer.host),
                        conn,
                    });
                }
                let m = match store.resolve(&image) {
                    Ok((_, m)) => m,
                    Err(_) => {
                        let mut found = None;
                        for s in &sources {
                            if let Ok(m) = transfer::fetch_manifest(&s.conn, &image).await {
                                found = Some(m);
                                break;
                            }
                        }
                        let m =
                            found.with_context(|| format!("no source knows image {image:?}"))?;
                        if let Ok(h) = image.parse::<Hash>()
                            && m.hash() != h
                        {
                            bail!("manifest from source does not match hash {h}");
                        }
                        store.put_manifest(&m)?;
                        m
                    }
                };
                let total: u64 = m
                    .parts
                    .iter()
                    .filter(|p| !store.has_part(&p.id))
                    .map(|p| p.size)
                    .sum();
                let pb = bar(quiet, total, "fetch");
                let progress = Arc::new(AtomicU64::new(0));
                let t = Instant::now();
                let mut reports = Vec::new();
                for p in &m.parts {
                    let fut = transfer::fetch_part(
                        &store,
                        p.id,
                        &sources,
                        FetchOptions {
                            streams_per_source: streams,
                            ..FetchOptions::default()
                        },
                        progress.clone(),
                    );
                    tokio::pin!(fut);
                    let r = loop {
                        tokio::select! {
                            r = &mut fut => break r?,
                            () = tokio::time::sleep(Duration::from_millis(100)) => pb.set_position(progress.load(Ordering::Relaxed)),
                        }
                    };
                    reports.push(r);
                }
                pb.finish_and_clear();
                let secs = t.elapsed().as_secs_f64();
                let bytes: u64 = reports.iter().map(|r| r.bytes_fetched).sum();
                if json {
                    println!(
                        "{}",
                        serde_json::to_string(
                            &serde_json::json!({ "seconds": secs, "bytes_fetched": bytes, "parts": reports })
                        )?
                    );
                } else {
                    println!(
                        "fetched {} ({} parts): {} bytes in {:.2}s = {:.1} Mbit/s",
                        m.name,
                        m.parts.len(),
                        bytes,
                        secs,
                        bytes as f64 * 8.0 / secs / 1e6
                    );
                    for r in &reports {
                        println!(
                            "  {}: {} chunks fetched, {} already here, by source {:?}, lying {:?}",
                            r.part.map(|h| h.short()).unwrap_or_default(),
                            r.chunks_fetched,
                            r.chunks_already_present,
                            r.bytes_by_source,
                            r.lying_sources
                        );
                    }
                }
                anyhow::Ok(())
            })?;
        }
        Command::Stage {
            image,
            vm,
            host,
            deadline_secs,
            depot,
            identity,
            reject_if_late,
            chain_only,
            no_wait,
            timeout_secs,
        } => {
            run_with_depot(&identity, depot, |c| async move {
                let now_ms = SystemTime::now().duration_since(UNIX_EPOCH)?.as_millis() as u64;
                let deadline_unix_ms = now_ms + (deadline_secs * 1000.0) as u64;
                let st = c
                    .stage(StageRequest {
                        image,
                        vm,
                        host,
                        deadline_unix_ms,
                        reject_if_late,
                        chain_only,
                    })
                    .await?;
                println!("stage {} {:?}", st.stage_id, st.state);
                // A refusal is final and not kept by the depot: say why now.
                if matches!(st.state, StageState::Rejected | StageState::Failed) {
                    anyhow::bail!("the depot refused to stage {}: {}", st.stage_id, st.message);
                }
                if no_wait {
                    println!("{}", serde_json::to_string_pretty(&st)?);
                    return Ok(());
                }
                let pb = bar(quiet, 0, "stage");
                let st = c
                    .wait_ready(&st.stage_id, Duration::from_secs(timeout_secs), |s| {
                        pb.set_length(s.bytes_total);
                        pb.set_position(s.bytes_done);
                        pb.set_message(format!("{:?}", s.state));
                    })
                    .await?;
                pb.finish_and_clear();
                let late = st
                    .ready_unix_ms
                    .map(|r| r as i64 - st.deadline_unix_ms as i64)
                    .unwrap_or(0);
                println!("{}", serde_json::to_string_pretty(&st)?);
                println!(
                    "ready {} ms {} the deadline (predicted {:?})",
                    late.abs(),
                    if late <= 0 { "before" } else { "after" },
                    st.predicted_ready_unix_ms.map(|p| p as i64 - now_ms as i64)
                );
                anyhow::Ok(())
            })?;
        }
        Command::Images {
            from,
            identity,
            json,
        } => {
            run_with_depot(&identity, from, |c| async move {
                let images = c.images().await?;
                if json {
                    println!("{}", serde_json::to_string_pretty(&images)?);
                    return Ok(());
                }
                println!("depot {} ({from}): {} images", c.site, images.len());
                for e in &images {
                    let state = match (&e.problem, e.complete) {
                        (Some(p), _) => format!("damaged: {p}"),
                        (None, true) => "complete".to_string(),
                        (None, false) => "incomplete".to_string(),
                    };
                    println!(
                        "  {:<24} {} parts {:>10.1} MB  virtual {:>10.1} MB  {}  {state}",
                        e.name,
                        e.parts,
                        e.bytes as f64 / 1e6,
                        e.virtual_size as f64 / 1e6,
                        e.manifest.short()
                    );
                }
                anyhow::Ok(())
            })?;
        }
        Command::Upload {
            file,
            name,
            to,
            identity,
            replace,
            json,
        } => {
            run_with_identity(&identity, |identity| async move {
                let f = tokio::fs::File::open(&file)
                    .await
                    .with_context(|| format!("opening {}", file.display()))?;
                let size = f
                    .metadata()
                    .await
                    .with_context(|| format!("reading {}", file.display()))?
                    .len();
                let c = DepotClient::connect(&identity, to, PathTuning::default()).await?;
                let pb = bar(quiet, size, "upload");
                let t = Instant::now();
                let report = c
                    .upload(&name, size, replace, tokio::io::BufReader::new(f), |sent| {
                        pb.set_position(sent);
                        if sent == size {
                            pb.set_message("importing");
                        }
                    })
                    .await?;
                pb.finish_and_clear();
                if json {
                    println!("{}", serde_json::to_string_pretty(&report)?);
                    return Ok(());
                }
                println!(
                    "uploaded {name} to depot {} ({size} bytes, {:.1}s): manifest {}{}",
                    c.site,
                    t.elapsed().as_secs_f64(),
                    report.manifest,
                    report
                        .replaced
                        .map(|h| format!(" (was {})", h.short()))
                        .unwrap_or_default()
                );
                println!(
                    "  {} virtual {} bytes; {} chunks: {} new ({} bytes), {} already there ({} bytes), {} zero",
                    report.format.as_str(),
                    report.virtual_size,
                    report.chunks,
                    report.new_chunks,
                    report.new_bytes,
                    report.dedup_chunks,
                    report.dedup_bytes,
                    report.zero_chunks
                );
                anyhow::Ok(())
            })?;
        }
        Command::Status { json } => {
            let store = Store::open(&cli.store)?;
            let images = store.images()?;
            let parts = store.parts()?;
            let partials = store.partials()?;
            let (chunks, bytes) = store.chunk_bytes()?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(
                        &serde_json::json!({ "images": images, "parts": parts, "partials": partials, "chunks": chunks, "chunk_bytes": bytes })
                    )?
                );
            } else {
                println!(
                    "store {}: {} images, {} parts, {} partial, {} chunks, {:.1} MB",
                    cli.store.display(),
                    images.len(),
                    parts.len(),
                    partials.len(),
                    chunks,
                    bytes as f64 / 1e6
                );
                for (name, h) in images {
                    let m = store.manifest(&h)?;
                    let size: u64 = m.parts.iter().map(|p| p.size).sum();
                    println!(
                        "  {name:<24} {} parts {:>10.1} MB  {}",
                        m.parts.len(),
                        size as f64 / 1e6,
                        h.short()
                    );
                }
                for p in partials {
                    let idx = store.partial_index(&p)?;
                    if let Some(idx) = idx {
                        println!(
                            "  partial {} {}/{} chunks",
                            p.short(),
                            idx.chunks.len() - store.missing_chunks(&idx).len(),
                            idx.chunks.len()
                        );
                    }
                }
            }
        }
        Command::Gc { grace_secs } => {
            let store = Store::open(&cli.store)?;
            let r = store.gc(Duration::from_secs(grace_secs))?;
            println!("{}", serde_json::to_string_pretty(&r)?);
        }
        Command::Scrub { repair } => {
            let store = Store::open(&cli.store)?;
            let (_, total) = store.chunk_bytes()?;
            let pb = bar(quiet, total, "scrub");
            let r = store.scrub(repair, |b| pb.set_position(b))?;
            pb.finish_and_clear();
            println!("{}", serde_json::to_string_pretty(&r)?);
            if !r.corrupt_chunks.is_empty()
                || !r.bad_indexes.is_empty()
                || !r.bad_manifests.is_empty()
            {
                bail!(
                    "store damaged: {} corrupt chunks, {} damaged parts{}",
                    r.corrupt_chunks.len(),
                    r.damaged_parts.len(),
                    if repair {
                        " (repaired: fetch the images again)"
                    } else {
                        " (run scrub --repair)"
                    }
                );
            }
        }
        Command::BenchVerify { file, rounds } => {
            let data =
                std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?;
            // The default chunker (the figure) and, for comparison, the same at 64 KiB average
            // and 16 KiB-aligned cut points (every chunk whole AVX-512 BLAKE3 batches; see
            // `chunk-stats` for what each costs in dedup).
            let default = bench_verify(&data, ChunkerSpec::default(), rounds)?;
            let small = bench_verify(
                &data,
                ChunkerSpec::FastCdcAligned {
                    min: 16 * 1024,
                    avg: 64 * 1024,
                    max: 256 * 1024,
                },
                rounds,
            )?;
            let wide = bench_verify(
                &data,
                ChunkerSpec::FastCdcAligned16k {
                    min: 16 * 1024,
                    avg: 64 * 1024,
                    max: 256 * 1024,
                },
                rounds,
            )?;
            let mb = data.len() as f64 / 1e6;
            println!(
                "{}",
                serde_json::json!({
                    "bytes": data.len(),
                    "chunker": ChunkerSpec::default().label(),
                    "chunks": default.chunks,
                    "raw_blake3_mb_s": mb / default.raw_s,
                    "verify_mb_s": mb / default.verify_s,
                    "verify_over_raw_blake3": default.raw_s / default.verify_s,
                    "aligned4k_64k_verify_over_raw_blake3": small.raw_s / small.verify_s,
                    "aligned16k_chunks": wide.chunks,
                    "aligned16k_verify_over_raw_blake3": wide.raw_s / wide.verify_s,
                })
            );
        }
        Command::ChunkStats { files, json } => {
            let specs = [
                ChunkerSpec::Fixed { size: 4096 },
                ChunkerSpec::Fixed { size: 65536 },
                ChunkerSpec::FastCdc {
                    min: 4096,
                    avg: 16384,
                    max: 65536,
                },
                ChunkerSpec::FastCdc {
                    min: 16384,
                    avg: 65536,
                    max: 262144,
                },
                ChunkerSpec::FastCdcAligned {
                    min: 16384,
                    avg: 65536,
                    max: 262144,
                },
                ChunkerSpec::FastCdcAligned {
                    min: 24 * 1024,
                    avg: 96 * 1024,
                    max: 384 * 1024,
                },
                ChunkerSpec::FastCdcAligned {
                    min: 32 * 1024,
                    avg: 128 * 1024,
                    max: 512 * 1024,
                },
                ChunkerSpec::FastCdcAligned16k {
                    min: 16384,
                    avg: 65536,
                    max: 262144,
                },
            ];
            let mut rows = Vec::new();
            for spec in specs {
                let mut seen = std::collections::HashSet::new();
                let (mut total, mut unique, mut zero, mut n) = (0u64, 0u64, 0u64, 0u64);
                for f in &files {
                    let file = std::fs::File::open(f)
                        .with_context(|| format!("opening {}", f.display()))?;
                    chunker::for_each_chunk::<_, std::io::Error, _>(
                        spec,
                        std::io::BufReader::with_capacity(1 << 20, file),
                        |_, d| {
                            total += d.len() as u64;
                            n += 1;
                            if viola_depot::store::is_zero(d) {
                                zero += d.len() as u64;
                            } else if seen.insert(Hash::of(d)) {
                                unique += d.len() as u64;
                            }
                            Ok(())
                        },
                    )
                    .map_err(|e| anyhow::anyhow!("{}", viola_common::errors::chain(&e)))?;
                }
                let row = serde_json::json!({ "chunker": spec.label(), "chunks": n, "input_bytes": total, "zero_bytes": zero, "stored_bytes": unique, "dedup_ratio": total as f64 / unique.max(1) as f64 });
                if !json {
                    println!(
                        "{:<24} {:>9} chunks  input {:>10.1} MB  zero {:>9.1} MB  stored {:>9.1} MB  ratio {:>6.2}",
                        spec.label(),
                        n,
                        total as f64 / 1e6,
                        zero as f64 / 1e6,
                        unique as f64 / 1e6,
                        total as f64 / unique.max(1) as f64
                    );
                }
                rows.push(row);
            }
            if json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
            }
        }
    }
    Ok(())
}

/// Median seconds of raw one-thread BLAKE3 over all of `data` and of verifying every chunk of
/// `data` (cut with `spec`) against its hash, one thread, same bytes in memory for both.
struct VerifyTimes {
    chunks: usize,
    raw_s: f64,
    verify_s: f64,
}

fn bench_verify(data: &[u8], spec: ChunkerSpec, rounds: u32) -> anyhow::Result<VerifyTimes> {
    let cuts = chunker::boundaries(spec, data)?;
    let hashes: Vec<Hash> = cuts
        .iter()
        .map(|&(o, l)| Hash::of(&data[o as usize..o as usize + l]))
        .collect();
    // Interleaved rounds, alternating which goes first; medians (the machine is shared).
    let (mut raws, mut verifies) = (Vec::new(), Vec::new());
    for round in 0..rounds.max(1) {
        for step in 0..2 {
            if (round + step) % 2 == 0 {
                let t = Instant::now();
                std::hint::black_box(blake3::hash(data));
                raws.push(t.elapsed().as_secs_f64());
            } else {
                let t = Instant::now();
                let ok = cuts
                    .iter()
                    .zip(&hashes)
                    .all(|(&(o, l), h)| Hash::of(&data[o as usize..o as usize + l]) == *h);
                verifies.push(t.elapsed().as_secs_f64());
                if !ok {
                    bail!("verification failed on unchanged data");
                }
            }
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    Ok(VerifyTimes {
        chunks: cuts.len(),
        raw_s: median(&mut raws),
        verify_s: median(&mut verifies),
    })
}

fn main() -> ExitCode {
    viola_common::shutdown::init_tracing();
    viola_common::errors::exit_code("viola-depot", run(Cli::parse()))
}
