//! `viola-overlay`: the per-host overlay daemon and its status/control commands.
//!
//! ```text
//! viola-overlay run --config /etc/viola/overlay.toml [--listen ADDR] [--identity-dir DIR]
//!                   [--cpu-wake-latency-us US] [--handoff-yield BOOL] [--busy-poll-us US]
//! viola-overlay status [--json] [--socket PATH]
//! viola-overlay expect-move --violin 1 --mac 52:54:00:00:00:05 --host b/b1 [--socket PATH]
//! viola-overlay status --remote 198.18.1.11:4500 --identity-dir /etc/viola/adaptmgr  # over QUIC
//! viola-overlay violin set --json violin.json [--socket PATH]   # a ViolinSpec (set_violin)
//! viola-overlay violin remove 7 [--socket PATH]
//! ```

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use viola_api::overlay::{ControlReply, ControlRequest, OverlayStatus};
use viola_overlay::config::{OverlayConfig, PeerConfig};
use viola_overlay::daemon;

const DEFAULT_SOCKET: &str = "/run/viola/overlay.sock";

#[derive(Parser)]
#[command(about = "Viola overlay daemon: violins (virtual Ethernets) over QUIC")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the daemon until SIGINT/SIGTERM.
    Run {
        /// TOML configuration file.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Override `listen`.
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// Override `identity_dir`.
        #[arg(long)]
        identity_dir: Option<PathBuf>,
        /// Override `control_socket`.
        #[arg(long)]
        control_socket: Option<PathBuf>,
        /// Add a peer address (repeatable).
        #[arg(long)]
        peer: Vec<SocketAddr>,
        /// Override `cpu_wake_latency_us`: hold a CPU wake-up latency request of this many µs.
        #[arg(long)]
        cpu_wake_latency_us: Option<u32>,
        /// Override `handoff_yield`: give the CPU up once after a sparse send or TAP write.
        #[arg(long)]
        handoff_yield: Option<bool>,
        /// Override `busy_poll_us`: poll this many µs after a sparse packet before sleeping (0: off).
        #[arg(long)]
        busy_poll_us: Option<u32>,
    },
    /// Show peers (with RTT), violins, MAC tables, counters and drops.
    Status {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        #[arg(long, default_value = DEFAULT_SOCKET)]
        socket: PathBuf,
        #[command(flatten)]
        remote: Remote,
    },
    /// Tell the daemon (and through it every member) that a MAC will move to a host.
    ExpectMove {
        #[arg(long)]
        violin: u32,
        #[arg(long)]
        mac: String,
        /// Destination `site/host`.
        #[arg(long)]
        host: String,
        #[arg(long, default_value = DEFAULT_SOCKET)]
        socket: PathBuf,
        #[command(flatten)]
        remote: Remote,
    },
    /// Set or remove a violin at run time (kept in the daemon's state file, if it has one).
    Violin {
        #[command(subcommand)]
        command: ViolinCmd,
        #[arg(long, global = true, default_value = DEFAULT_SOCKET)]
        socket: PathBuf,
        #[command(flatten)]
        remote: Remote,
    },
}

#[derive(Subcommand)]
enum ViolinCmd {
    /// Make this host a member of a violin, or replace its settings (set_violin).
    Set {
        /// A JSON file with the violin: {"id":7,"name":"lab","allowed":["a/*"],
        /// "subnet":"10.7.0.0/24","vms":[{"mac":"52:54:00:aa:bb:cc","ip":"10.7.0.10"}]}
        /// ("-": standard input).
        #[arg(long)]
        json: PathBuf,
    },
    /// Take this host out of a violin set at run time (remove_violin).
    Remove {
        /// Violin id.
        id: u32,
    },
}

/// Talk to a daemon over QUIC (mutual TLS) instead of its local socket.
#[derive(clap::Args)]
struct Remote {
    /// The daemon's QUIC address (e.g. 198.18.1.11:4500).
    #[arg(long)]
    remote: Option<SocketAddr>,
    /// Our identity (cert.pem, key.pem, ca.pem) with role adaptmgr or cli; needed with --remote.
    #[arg(long, default_value = "/etc/viola/cli")]
    identity_dir: PathBuf,
}

async fn ask(
    socket: &std::path::Path,
    remote: &Remote,
    req: &ControlRequest,
) -> anyhow::Result<ControlReply> {
    match remote.remote {
        Some(addr) => {
            let me = viola_common::identity::Identity::load_dir(&remote.identity_dir)?;
            viola_api::overlay::request_quic(&me, addr, req)
                .await
                .with_context(|| format!("cannot reach daemon at {addr}"))
        }
        None => viola_api::overlay::request_unix(socket, req)
            .await
            .with_context(|| format!("cannot reach daemon at {}", socket.display())),
    }
}

fn format_status(s: &OverlayStatus) -> String {
    use std::fmt::Write as _;
    let mut o = String::new();
    let sw = &s.switch;
    let _ = writeln!(o, "host {}", sw.host);
    if let Some(us) = s.cpu_wake_latency_us {
        let _ = writeln!(o, "holding a CPU wake-up latency request of {us} µs");
    }
    match s.handoff_yields {
        Some(n) => {
            let _ = writeln!(o, "handoff yield on ({n} yields)");
        }
        None => {
            let _ = writeln!(o, "handoff yield off");
        }
    }
    if let Some(b) = s.busy_poll {
        let _ = writeln!(
            o,
            "busy polling {} µs after sparse packets ({} polls)",
            b.window_us, b.polls
        );
    }
    let _ = writeln!(o, "\npeers:");
    for p in &sw.peers {
        let how = if p.connected {
            match s.rtt_ms.get(&p.host) {
                Some(rtt) => format!("direct, rtt {rtt:.2} ms"),
                None => "direct".to_owned(),
            }
        } else {
            match &p.via {
                Some(v) => format!("via {v}"),
                None => "unreachable".to_owned(),
            }
        };
        let _ = writeln!(
            o,
            "  {:<20} {how:<28} max datagram {:>5}  violins {}",
            p.host,
            p.max_datagram,
            json_list(&p.violins)
        );
    }
    for v in &sw.violins {
        let _ = writeln!(
            o,
            "\nviolin {} {:?}  {}  subnet {}  members {}",
            v.id,
            v.name,
            if v.runtime { "run-time" } else { "configured" },
            v.subnet.as_deref().unwrap_or("-"),
            json_list(&v.members)
        );
        for m in &v.macs {
            let _ = writeln!(
                o,
                "  {}  {:<16} seq {:<4} age {:>6.1}s  {}",
                m.mac,
                m.location,
                m.seq,
                m.age_s,
                m.ip.map(|ip| ip.to_string()).unwrap_or_default()
            );
        }
    }
    let _ = writeln!(o, "\ncounters:");
    let mut events = sw.counters.events();
    events.sort_unstable_by_key(|(name, _)| *name);
    for (k, v) in events {
        let _ = writeln!(o, "  {k:<24} {v}");
    }
    let _ = writeln!(o, "\ndrops:");
    for (k, v) in sw.counters.drops.iter().chain(&s.driver_drops) {
        let _ = writeln!(o, "  {k:<24} {v}");
    }
    for (k, v) in &s.refused {
        let _ = writeln!(o, "  refused_{k:<16} {v}");
    }
    o
}

/// Prints `ok` for a carried-out request; a refusal is an error.
fn done(reply: ControlReply) -> anyhow::Result<()> {
    match reply {
        ControlReply::Done => {
            println!("ok");
            Ok(())
        }
        ControlReply::Refused { reason } => anyhow::bail!("{reason}"),
        ControlReply::Status(_) => anyhow::bail!("unexpected reply from daemon"),
    }
}

/// A list as the status JSON shows it (`[1,2]`, `["b/b1"]`).
fn json_list<T: serde::Serialize>(items: &[T]) -> String {
    serde_json::to_string(items).unwrap_or_default()
}

/// Prints without panicking when stdout is a closed pipe (`| head`).
fn emit(text: &str) {
    use std::io::Write as _;
    let _ = std::io::stdout().write_all(text.as_bytes());
}

fn main() -> ExitCode {
    viola_common::shutdown::init_tracing();
    let cli = Cli::parse();
    match viola_overlay::local_runtime::block_on_local(run(cli)) {
        Ok(result) => viola_common::errors::exit_code("viola-overlay", result),
        Err(e) => {
            eprintln!("viola-overlay: cannot start runtime: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Cmd::Run {
            config,
            listen,
            identity_dir,
            control_socket,
            peer,
            cpu_wake_latency_us,
            handoff_yield,
            busy_poll_us,
        } => {
            let mut cfg: OverlayConfig = viola_common::config::load(config.as_deref())?;
            viola_common::override_with! {
                listen => cfg.listen,
                identity_dir => cfg.identity_dir,
                control_socket => cfg.control_socket,
                cpu_wake_latency_us.map(Some) => cfg.cpu_wake_latency_us,
                handoff_yield => cfg.handoff_yield,
                busy_poll_us => cfg.busy_poll_us,
            }
            cfg.peers
                .extend(peer.into_iter().map(|addr| PeerConfig { addr }));
            let token = viola_common::shutdown::signal_token()?;
            daemon::run(cfg, token).await?;
        }
        Cmd::Status {
            json,
            socket,
            remote,
        } => match ask(&socket, &remote, &ControlRequest::Status).await? {
            ControlReply::Status(s) if json => {
                emit(&format!("{}\n", serde_json::to_string(&s)?));
            }
            ControlReply::Status(s) => emit(&format_status(&s)),
            ControlReply::Refused { reason } => anyhow::bail!("refused: {reason}"),
            ControlReply::Done => anyhow::bail!("unexpected reply from daemon"),
        },
        Cmd::ExpectMove {
            violin,
            mac,
            host,
            socket,
            remote,
        } => {
            let req = ControlRequest::ExpectMove { violin, mac, host };
            done(ask(&socket, &remote, &req).await?)?;
        }
        Cmd::Violin {
            command,
            socket,
            remote,
        } => {
            let req = match command {
                ViolinCmd::Set { json } => {
                    let text = if json.as_os_str() == "-" {
                        std::io::read_to_string(std::io::stdin())?
                    } else {
                        std::fs::read_to_string(&json)
                            .with_context(|| format!("cannot read {}", json.display()))?
                    };
                    let violin = serde_json::from_str(&text)
                        .with_context(|| format!("{} is not a violin spec", json.display()))?;
                    ControlRequest::SetViolin { violin }
                }
                ViolinCmd::Remove { id } => ControlRequest::RemoveViolin { violin: id },
            };
            done(ask(&socket, &remote, &req).await?)?;
        }
    }
    Ok(())
}
