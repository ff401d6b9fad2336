//! `viola`: the command-line client of the adaptation manager.
//!
//!   viola host list [--json]
//!   viola vm list [--json]
//!   viola vm resize VM [--vcpus N] [--memory-mib M] [--cap-percent P] [--shares S]
//!   viola vm migrate VM --to HOST [--bandwidth-mib-s B] [--full-copy] [--timeout-s T] [--json]
//!   viola vm create NAME --violin V --image IMAGE [--site S | --host H] [--vcpus N]
//!                  [--memory-mib M] [--ready-by SECONDS] [--count N] [--ssh-key FILE] [--json]
//!   viola vm start|stop|delete VM
//!   viola violin create NAME [--subnet 10.x.y.0/24] [--sites a,b] [--mtu N] [--json]
//!   viola violin list|show NAME [--json]
//!   viola violin delete NAME [--force]
//!   viola violin hostfile NAME [--format hydra|openmpi|pairs] [--slots N] [-o FILE]
//!   viola image list [--json]
//!   viola image import FILE --name NAME --site S [--replace] [--json]
//!   viola decisions [--after SEQ] [--follow] [--json]
//!   viola policy show [--json]

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use viola_api::adaptation::{DecisionRecord, PolicyView};
use viola_api::client::Client;
use viola_api::manager::{
    HostState, HostView, ImageImport, ImageView, ViolinCreate, ViolinView, VmCreate, VmView,
};
use viola_api::manager::{Request, Response, VmDeadline, VmMigrate, VmResize};
use viola_api::migration::Outcome;
use viola_common::identity::Identity;

#[derive(Debug, Parser)]
#[command(version, about = "Viola command-line client")]
struct Args {
    /// The manager's address; a replicated manager's addresses separated by commas (the one
    /// that answers, its leader, is asked).
    #[arg(long, default_value = "127.0.0.1:7443", value_delimiter = ',')]
    manager: Vec<SocketAddr>,
    /// Directory with this user's cert.pem, key.pem and ca.pem: role `cli` (an administrator,
    /// `viola-ca issue`) or `user` (a tenant's user, `viola-ca issue-user`).
    #[arg(long, default_value = "/etc/viola/cli")]
    identity: PathBuf,
    /// Machine-readable output.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Hosts.
    Host {
        #[command(subcommand)]
        command: HostCommand,
    },
    /// Virtual machines.
    Vm {
        #[command(subcommand)]
        command: VmCommand,
    },
    /// Violins: private Ethernets across sites.
    Violin {
        #[command(subcommand)]
        command: ViolinCommand,
    },
    /// Disk images in the sites' depots.
    Image {
        #[command(subcommand)]
        command: ImageCommand,
    },
    /// The policy loop's decisions: what it saw, what it chose and why, how each action ended.
    Decisions {
        /// Only decisions after this sequence number.
        #[arg(long, default_value_t = 0)]
        after: u64,
        /// Keep printing new decisions as they come (polls every 2 s).
        #[arg(long)]
        follow: bool,
    },
    /// The adaptation policy.
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
    },
}

#[derive(Debug, Subcommand)]
enum ViolinCommand {
    /// Make a violin over the hosts of some sites (all by default).
    Create {
        name: String,
        /// Its IPv4 subnet inside 10.0.0.0/8 (default 10.<id/256>.<id%256>.0/24).
        #[arg(long)]
        subnet: Option<String>,
        /// Comma-separated sites.
        #[arg(long, value_delimiter = ',')]
        sites: Vec<String>,
        /// Its MTU, 68 to 9000 (default: the manager's [vm_template] mtu, else the overlays').
        #[arg(long)]
        mtu: Option<u16>,
    },
    /// Every violin with its VMs' addresses.
    List,
    /// One violin.
    Show { name: String },
    /// Delete a violin (its VMs first, which needs --force when it has any).
    Delete {
        name: String,
        #[arg(long)]
        force: bool,
    },
    /// The MPI host file of a violin's VMs: their violin addresses in VM-name order (the first
    /// VM is where mpirun runs rank 0), each with its vCPUs as slots.
    Hostfile {
        name: String,
        /// hydra (MPICH: ADDR:SLOTS), openmpi (ADDR slots=SLOTS) or pairs (NAME=ADDR, what
        /// the MPI guest's viola-hosts takes).
        #[arg(long, value_enum, default_value_t = HostfileFormat::Hydra)]
        format: HostfileFormat,
        /// Slots per VM instead of its vCPUs.
        #[arg(long)]
        slots: Option<u32>,
        /// Write it to FILE instead of standard output.
        #[arg(short, long)]
        output: Option<PathBuf>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum HostfileFormat {
    Hydra,
    Openmpi,
    Pairs,
}

/// The host file of `violin` (its members, slots from `vms`' vCPUs unless `slots` is given).
/// Every member must have an address: a host file that silently leaves out a VM would start a
/// job on fewer ranks than the user asked for.
fn hostfile(
    violin: &ViolinView,
    vms: &[VmView],
    format: HostfileFormat,
    slots: Option<u32>,
) -> anyhow::Result<String> {
    if violin.vms.is_empty() {
        bail!("violin {} has no VMs", violin.name);
    }
    let mut members: Vec<_> = violin.vms.iter().collect();
    members.sort_by(|a, b| a.vm.cmp(&b.vm));
    let mut out = String::new();
    for m in members {
        let Some(ip) = m.ip else {
            bail!(
                "VM {} of violin {} has no violin address (made outside `viola vm create`?)",
                m.vm,
                violin.name
            );
        };
        let n = match slots {
            Some(n) => n,
            None => vms
                .iter()
                .find(|v| v.name == m.vm)
                .map(|v| v.vcpus.max(1))
                .with_context(|| format!("VM {} is not in the manager's inventory", m.vm))?,
        };
        match format {
            HostfileFormat::Hydra => out.push_str(&format!("{ip}:{n}\n")),
            HostfileFormat::Openmpi => out.push_str(&format!("{ip} slots={n}\n")),
            HostfileFormat::Pairs => out.push_str(&format!("{}={ip}\n", m.vm)),
        }
    }
    Ok(out)
}

#[derive(Debug, Subcommand)]
enum ImageCommand {
    /// The images you may use, with the sites whose depot holds them.
    List,
    /// Put an image file (a self-contained qcow2 or raw image) into a site's depot; as a
    /// tenant's user, it is your tenant's own.
    Import {
        file: PathBuf,
        #[arg(long)]
        name: String,
        /// The site whose depot takes it (others fetch it when they need it).
        #[arg(long)]
        site: String,
        /// Point an existing name at the new content.
        #[arg(long)]
        replace: bool,
    },
}

#[derive(Debug, Subcommand)]
enum PolicyCommand {
    /// The policy, mode and parameters in force.
    Show,
}

#[derive(Debug, Subcommand)]
enum HostCommand {
    /// Every host with its site, state and usage.
    List,
}

#[derive(Debug, Subcommand)]
enum VmCommand {
    /// Every VM with its host, size and CPU use.
    List,
    /// Make a VM (or --count of them) on a violin from a depot image.
    Create {
        name: String,
        #[arg(long)]
        violin: String,
        /// Depot image name (or manifest hash).
        #[arg(long)]
        image: String,
        #[arg(long, conflicts_with = "host")]
        site: Option<String>,
        #[arg(long)]
        host: Option<String>,
        #[arg(long)]
        vcpus: Option<u32>,
        #[arg(long)]
        memory_mib: Option<u64>,
        /// The disk must be ready within this many seconds, else the create is refused at once.
        #[arg(long)]
        ready_by: Option<u64>,
        /// Make NAME-1 .. NAME-N, their images staged together.
        #[arg(long)]
        count: Option<u32>,
        /// A file with the OpenSSH public key that may log in as root (e.g. ~/.ssh/id_ed25519.pub).
        #[arg(long)]
        ssh_key: Option<PathBuf>,
    },
    /// Start a stopped VM.
    Start { vm: String },
    /// Power a VM off (it keeps its disk and address).
    Stop { vm: String },
    /// Delete a VM: its domain, its disk and its address.
    Delete { vm: String },
    /// Change a running VM's size.
    Resize {
        vm: String,
        #[arg(long)]
        vcpus: Option<u32>,
        #[arg(long)]
        memory_mib: Option<u64>,
        /// CPU cap in percent of one CPU.
        #[arg(long)]
        cap_percent: Option<u32>,
        #[arg(long)]
        shares: Option<u64>,
    },
    /// Give the VM's job a deadline: from the progress the job reports from inside
    /// (`viola-ask progress DONE TOTAL`), the manager keeps its CPU cap at the smallest share
    /// that finishes it in time.
    Deadline {
        vm: String,
        /// Seconds from now.
        #[arg(long, required_unless_present = "clear")]
        in_s: Option<u64>,
        /// The most of a CPU the job may get, percent (default: its vCPUs' worth).
        #[arg(long, conflicts_with = "clear")]
        max_cap_percent: Option<u32>,
        /// Remove the deadline (the VM gets its cap from before back).
        #[arg(long, conflicts_with = "in_s")]
        clear: bool,
    },
    /// Live-migrate a VM (with its disk) to another host.
    Migrate {
        vm: String,
        #[arg(long)]
        to: String,
        #[arg(long)]
        bandwidth_mib_s: Option<u64>,
        /// Copy the whole disk instead of staging the base and copying the overlay.
        #[arg(long)]
        full_copy: bool,
        #[arg(long)]
        timeout_s: Option<u64>,
    },
}

fn main() -> std::process::ExitCode {
    viola_common::errors::run_main("viola", run(Args::parse()))
}

fn fail_on_error(resp: Response) -> anyhow::Result<Response> {
    if let Response::Error { message } = resp {
        bail!("{message}");
    }
    Ok(resp)
}

/// How long a manager gets to answer before the next address is tried (a one-address manager
/// that does not answer fails after it too).
const MANAGER_CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Asks the manager `req` and returns its answer, failing on an error answer.
async fn ask(client: &Client, req: &Request) -> anyhow::Result<Response> {
    fail_on_error(client.call(req, |_| {}).await?)
}

/// Prints `value` as JSON with `json`, else for people with `print`.
fn show<T: serde::Serialize + ?Sized>(json: bool, value: &T, print: fn(&T)) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(value)?);
    } else {
        print(value);
    }
    Ok(())
}

async fn run(args: Args) -> anyhow::Result<()> {
    let me = Identity::load_dir(&args.identity)
        .with_context(|| format!("cannot load identity from {}", args.identity.display()))?;
    let (client, _) = Client::connect_first(&me, &args.manager, MANAGER_CONNECT_TIMEOUT).await?;
    match args.command {
        Command::Decisions { after, follow } => {
            decisions(&client, after, follow, args.json).await?;
        }
        Command::Policy {
            command: PolicyCommand::Show,
        } => {
            let Response::Policy(view) = ask(&client, &Request::PolicyShow).await? else {
                bail!("unexpected answer");
            };
            show(args.json, &*view, print_policy)?;
        }
        Command::Host {
            command: HostCommand::List,
        } => {
            let Response::Hosts(hosts) = ask(&client, &Request::ListHosts).await? else {
                bail!("unexpected answer");
            };
            show(args.json, &hosts[..], print_hosts)?;
        }
        Command::Violin { command } => violin(&client, command, args.json).await?,
        Command::Image { command } => image(&client, command, args.json).await?,
        Command::Vm { command } => vm(&client, command, args.json).await?,
    }
    client.close().await;
    Ok(())
}

async fn vm(client: &Client, command: VmCommand, json: bool) -> anyhow::Result<()> {
    // A request answered by `Ack`: what is asked, of which VM, and what happened to it; the
    // others say more and return.
    let (req, vm, what) = match command {
        VmCommand::Start { vm } => (Request::VmStart { vm: vm.clone() }, vm, "started"),
        VmCommand::Stop { vm } => (Request::VmStop { vm: vm.clone() }, vm, "stopped"),
        VmCommand::Delete { vm } => (Request::VmDelete { vm: vm.clone() }, vm, "deleted"),
        VmCommand::Deadline {
            vm,
            in_s,
            max_cap_percent,
            clear,
        } => {
            let req = Request::VmDeadline(VmDeadline {
                vm: vm.clone(),
                in_s: if clear { None } else { in_s },
                max_cap_percent,
            });
            let what = if clear {
                "deadline cleared"
            } else {
                "deadline set"
            };
            (req, vm, what)
        }
        VmCommand::Create {
            name,
            violin,
            image,
            site,
            host,
            vcpus,
            memory_mib,
            ready_by,
            count,
            ssh_key,
        } => {
            let ssh_key = match ssh_key {
                Some(path) => Some(
                    std::fs::read_to_string(&path)
                        .with_context(|| format!("cannot read {}", path.display()))?
                        .trim()
                        .to_owned(),
                ),
                None => None,
            };
            let req = Request::VmCreate(VmCreate {
                name,
                violin,
                image,
                host,
                site,
                vcpus,
                memory_mib,
                ready_by_s: ready_by,
                count,
                ssh_key,
            });
            let last = client
                .call(&req, |resp| {
                    if let Response::Step { message } = resp
                        && !json
                    {
                        println!("  {message}");
                    }
                })
                .await?;
            let Response::Vms(vms) = fail_on_error(last)? else {
                bail!("unexpected answer");
            };
            return show(json, &vms[..], print_vms);
        }
        VmCommand::List => {
            let Response::Vms(vms) = ask(client, &Request::ListVms).await? else {
                bail!("unexpected answer");
            };
            return show(json, &vms[..], print_vms);
        }
        VmCommand::Resize {
            vm,
            vcpus,
            memory_mib,
            cap_percent,
            shares,
        } => {
            let req = Request::Resize(VmResize {
                vm: vm.clone(),
                vcpus,
                memory_mib,
                cap_percent,
                shares,
            });
            ask(client, &req).await?;
            if json {
                println!("{}", serde_json::json!({"vm": vm, "resized": true}));
            } else {
                println!("{vm} resized");
            }
            return Ok(());
        }
        VmCommand::Migrate {
            vm,
            to,
            bandwidth_mib_s,
            full_copy,
            timeout_s,
        } => {
            let req = Request::Migrate(VmMigrate {
                vm: vm.clone(),
                to_host: to.clone(),
                bandwidth_mib_s,
                stage_base: !full_copy,
                timeout_s,
            });
            let bar = if json {
                ProgressBar::hidden()
            } else {
                let bar = ProgressBar::new(1000);
                bar.set_style(
                    ProgressStyle::with_template(
                        "{spinner} {msg:30} [{bar:30}] {percent:>3}%  {elapsed}",
                    )
                    .unwrap_or_else(|_| ProgressStyle::default_bar()),
                );
                bar.enable_steady_tick(std::time::Duration::from_millis(200));
                bar
            };
            let last = client
                .call(&req, |resp| {
                    if let Response::Progress(status) = resp {
                        let step = status.step.trim_start_matches("Run(").trim_end_matches(')');
                        bar.set_message(step.to_owned());
                        if let Some(job) = &status.job {
                            bar.set_position((job.fraction() * 1000.0) as u64);
                        }
                        if let Some(s) = &status.staging {
                            bar.set_message(format!("{step}: {} {}", s.by, s.state));
                            let fraction = if s.bytes_total == 0 {
                                0.0
                            } else {
                                s.bytes_done as f64 / s.bytes_total as f64
                            };
                            bar.set_position((fraction * 1000.0) as u64);
                        }
                    }
                })
                .await?;
            bar.finish_and_clear();
            let Response::Migrated(report) = fail_on_error(last)? else {
                bail!("unexpected answer");
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                for r in &report.records {
                    println!(
                        "  {:>8} ms  {:<32} {}",
                        r.finished_ms.saturating_sub(r.started_ms),
                        r.action,
                        r.result
                    );
                }
                if let Some(c) = &report.completed {
                    println!(
                        "  time {} ms, downtime {} ms, {} bytes moved",
                        c.time_elapsed_ms,
                        c.downtime_ms.map_or("?".into(), |d| d.to_string()),
                        c.data_processed
                    );
                }
            }
            match report.outcome {
                Outcome::Migrated { storage } => {
                    if !json {
                        println!("{vm} now runs at {to} ({storage:?} disk copy)");
                    }
                }
                Outcome::RolledBack { reason } => bail!("{vm} stays where it was: {reason}"),
                Outcome::Stuck { reason } => bail!("{vm} needs an operator: {reason}"),
            }
            return Ok(());
        }
    };
    done(client, req, &vm, what, json).await
}

/// Asks `req` (answered by `Ack`) and says `what` happened to `subject`.
async fn done(
    client: &Client,
    req: Request,
    subject: &str,
    what: &str,
    json: bool,
) -> anyhow::Result<()> {
    ask(client, &req).await?;
    if json {
        println!("{}", serde_json::json!({ "name": subject, what: true }));
    } else {
        println!("{subject} {what}");
    }
    Ok(())
}

async fn image(client: &Client, command: ImageCommand, json: bool) -> anyhow::Result<()> {
    // Steps (a depot left out of a list, an import's progress) go to stderr.
    let step = |resp: &Response| {
        if let Response::Step { message } = resp {
            eprintln!("  {message}");
        }
    };
    let answer = match command {
        ImageCommand::List => client.call(&Request::ImageList, step).await?,
        ImageCommand::Import {
            file,
            name,
            site,
            replace,
        } => {
            let body = tokio::fs::File::open(&file)
                .await
                .with_context(|| format!("cannot open {}", file.display()))?;
            let size = body.metadata().await?.len();
            let req = Request::ImageImport(ImageImport {
                name,
                site,
                size,
                replace,
            });
            client.call_with_body(&req, body, step).await?
        }
    };
    let Response::Images(images) = fail_on_error(answer)? else {
        bail!("unexpected answer");
    };
    show(json, &images[..], print_images)
}

fn print_images(images: &[ImageView]) {
    println!(
        "{:<24} {:<10} {:>10} {:>5} {:<12} {:<12} MANIFEST",
        "IMAGE", "TENANT", "SIZE", "PARTS", "SITES", "INCOMPLETE"
    );
    for i in images {
        println!(
            "{:<24} {:<10} {:>8.1}Gi {:>5} {:<12} {:<12} {}",
            i.name,
            i.tenant.as_deref().unwrap_or("-"),
            i.virtual_size as f64 / (1u64 << 30) as f64,
            i.parts,
            i.sites.join(","),
            if i.incomplete.is_empty() {
                "-".to_owned()
            } else {
                i.incomplete.join(",")
            },
            i.manifest.get(..16).unwrap_or(&i.manifest),
        );
    }
}

async fn violin(client: &Client, command: ViolinCommand, json: bool) -> anyhow::Result<()> {
    let req = match command {
        ViolinCommand::Create {
            name,
            subnet,
            sites,
            mtu,
        } => Request::ViolinCreate(ViolinCreate {
            name,
            subnet,
            sites,
            mtu,
        }),
        ViolinCommand::List => Request::ViolinList,
        ViolinCommand::Show { name } => Request::ViolinShow { name },
        ViolinCommand::Delete { name, force } => {
            let req = Request::ViolinDelete {
                name: name.clone(),
                force,
            };
            return done(client, req, &name, "deleted", json).await;
        }
        ViolinCommand::Hostfile {
            name,
            format,
            slots,
            output,
        } => {
            let Response::Violins(violins) = ask(client, &Request::ViolinShow { name }).await?
            else {
                bail!("unexpected answer");
            };
            let Response::Vms(vms) = ask(client, &Request::ListVms).await? else {
                bail!("unexpected answer");
            };
            let violin = violins.first().context("the manager sent no violin")?;
            let text = hostfile(violin, &vms, format, slots)?;
            match output {
                Some(path) => std::fs::write(&path, text)
                    .with_context(|| format!("cannot write {}", path.display()))?,
                None => print!("{text}"),
            }
            return Ok(());
        }
    };
    let Response::Violins(violins) = ask(client, &req).await? else {
        bail!("unexpected answer");
    };
    show(json, &violins[..], print_violins)
}

fn print_violins(violins: &[ViolinView]) {
    println!(
        "{:<16} {:>6} {:<18} {:<10} {:<12} {:>5} {:>4}",
        "VIOLIN", "ID", "SUBNET", "SITES", "TENANT", "MTU", "VMS"
    );
    for v in violins {
        let sites = if v.managed {
            v.sites.join(",")
        } else {
            "(config)".to_owned()
        };
        println!(
            "{:<16} {:>6} {:<18} {:<10} {:<12} {:>5} {:>4}",
            v.name,
            v.id,
            v.subnet.as_deref().unwrap_or("-"),
            sites,
            v.tenant.as_deref().unwrap_or("-"),
            v.mtu.map_or("-".to_owned(), |m| m.to_string()),
            v.vms.len()
        );
        for m in &v.vms {
            println!(
                "  {:<16} {:<18} {:<16} {}",
                m.vm,
                m.mac.as_deref().unwrap_or("-"),
                m.ip.map_or("-".to_owned(), |ip| ip.to_string()),
                m.host.as_deref().unwrap_or("-")
            );
        }
    }
}

/// Prints the decisions after `after`; with `follow`, keeps asking for newer ones. (Outcomes
/// of an act-mode decision settle after it is first printed: `--json` lines are the decision as
/// it stood when read.)
async fn decisions(
    client: &Client,
    mut after: u64,
    follow: bool,
    json: bool,
) -> anyhow::Result<()> {
    loop {
        let req = Request::Decisions {
            after_seq: after,
            limit: 100,
        };
        let Response::Decisions(batch) = ask(client, &req).await? else {
            bail!("unexpected answer");
        };
        for d in &batch {
            if json {
                println!("{}", serde_json::to_string(d)?);
            } else {
                print_decision(d);
            }
            after = d.seq;
        }
        // The manager may send fewer than asked (one frame's worth): ask until none is left.
        if !batch.is_empty() {
            continue;
        }
        if !follow {
            return Ok(());
        }
        tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    }
}

fn print_decision(d: &DecisionRecord) {
    let s = &d.state;
    println!(
        "#{} at {} ms: {} ({}) saw {}/{} hosts up, {} VMs ({} held), {} overloaded, mean demand {:.0} %",
        d.seq,
        d.ts_ms,
        d.policy,
        d.mode,
        s.hosts_up,
        s.hosts,
        s.vms,
        s.vms_held,
        s.hosts_overloaded,
        s.mean_demand * 100.0
    );
    for a in &d.actions {
        let what = match (&a.from, &a.to, &a.detail) {
            (Some(f), Some(t), _) => format!("{f} -> {t}"),
            (None, Some(t), _) => format!("-> {t}"),
            (_, _, Some(detail)) => detail.clone(),
            _ => String::new(),
        };
        let outcome = match &a.outcome {
            viola_api::adaptation::ActionOutcome::RolledBack { reason }
            | viola_api::adaptation::ActionOutcome::Stuck { reason }
            | viola_api::adaptation::ActionOutcome::Skipped { reason } => {
                format!("{}: {reason}", a.outcome.label())
            }
            viola_api::adaptation::ActionOutcome::Failed { error } => format!("failed: {error}"),
            viola_api::adaptation::ActionOutcome::Done { moved: Some(m) } => format!(
                "done in {:.1} s, downtime {}, {} MiB moved",
                m.time_ms as f64 / 1000.0,
                m.downtime_ms.map_or("?".to_owned(), |d| format!("{d} ms")),
                m.bytes >> 20
            ),
            other => other.label().to_owned(),
        };
        let stage = a.stage.map_or(String::new(), |s| format!(" [stage {s}]"));
        println!(
            "  {:<8} {:<14} {:<20} {}{stage}\n           because {}",
            a.action,
            a.vm.as_deref().unwrap_or("-"),
            what,
            outcome,
            a.reason
        );
    }
}

fn print_policy(view: &PolicyView) {
    println!("policy  {}", view.policy);
    println!("mode    {}", view.mode);
    println!("period  {} s", view.period_s);
    if let Some(map) = view.parameters.as_object() {
        for (k, v) in map {
            println!("{k:<14} {v}");
        }
    }
}

fn print_hosts(hosts: &[HostView]) {
    println!(
        "{:<10} {:<6} {:<10} {:>5} {:>10} {:>9} {:>10}",
        "HOST", "SITE", "STATE", "CPUS", "MEM MiB", "CPU BUSY", "AVAIL MiB"
    );
    for h in hosts {
        let state = match h.state {
            HostState::Up => "up",
            HostState::Unknown => "unknown",
            HostState::Failed { .. } => "FAILED",
        };
        let (busy, avail) = h.usage.as_ref().map_or(("-".into(), "-".into()), |u| {
            (
                format!("{:.2}", u.cpu_busy),
                (u.mem_available_kib / 1024).to_string(),
            )
        });
        // A partition's capacity (its cgroup quota) where it has one, else the machine's CPUs.
        let cpus = h
            .usage
            .as_ref()
            .and_then(|u| u.cpu_capacity)
            .map_or_else(|| h.cpus.to_string(), |c| format!("{c:.2}"));
        println!(
            "{:<10} {:<6} {:<10} {:>5} {:>10} {:>9} {:>10}",
            h.name,
            h.site,
            state,
            cpus,
            h.memory_kib / 1024,
            busy,
            avail
        );
    }
}

fn print_vms(vms: &[VmView]) {
    println!(
        "{:<16} {:<8} {:<9} {:>6} {:>8} {:>8} {:<10} {:<15}",
        "VM", "HOST", "STATE", "VCPUS", "MEM MiB", "CPU", "VIOLIN", "ADDRESS"
    );
    for v in vms {
        println!(
            "{:<16} {:<8} {:<9} {:>6} {:>8} {:>8.2} {:<10} {:<15}",
            v.name,
            v.host,
            format!("{:?}", v.state).to_lowercase(),
            format!("{}/{}", v.vcpus, v.max_vcpus),
            v.memory_kib / 1024,
            v.cpu_busy,
            v.violin.as_deref().unwrap_or("-"),
            v.ip.map_or("-".to_owned(), |ip| ip.to_string())
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use viola_api::domain::DomainState;
    use viola_api::manager::ViolinMember;

    fn member(vm: &str, ip: Option<&str>) -> ViolinMember {
        ViolinMember {
            vm: vm.to_owned(),
            mac: None,
            ip: ip.map(|a| a.parse().unwrap()),
            host: Some("a1".to_owned()),
        }
    }

    fn vm(name: &str, vcpus: u32) -> VmView {
        VmView {
            name: name.to_owned(),
            host: "a1".to_owned(),
            violin: Some("hpc".to_owned()),
            macs: vec![],
            ip: None,
            state: DomainState::Running,
            vcpus,
            max_vcpus: 4,
            memory_kib: 524_288,
            max_memory_kib: 524_288,
            cpu_busy: 0.0,
            domain_xml: None,
            updated_ms: 0,
        }
    }

    fn violin(members: Vec<ViolinMember>) -> ViolinView {
        ViolinView {
            name: "hpc".to_owned(),
            id: 7,
            subnet: Some("10.0.7.0/24".to_owned()),
            sites: vec!["a".to_owned(), "b".to_owned()],
            managed: true,
            tenant: None,
            mtu: None,
            vms: members,
        }
    }

    #[test]
    fn hostfile_lists_members_in_name_order_with_their_vcpus() {
        let v = violin(vec![
            member("rank1", Some("10.0.7.3")),
            member("rank0", Some("10.0.7.2")),
        ]);
        let vms = [vm("rank0", 2), vm("rank1", 1)];
        let hydra = hostfile(&v, &vms, HostfileFormat::Hydra, None).unwrap();
        assert_eq!(hydra, "10.0.7.2:2\n10.0.7.3:1\n");
        let ompi = hostfile(&v, &vms, HostfileFormat::Openmpi, Some(4)).unwrap();
        assert_eq!(ompi, "10.0.7.2 slots=4\n10.0.7.3 slots=4\n");
        let pairs = hostfile(&v, &vms, HostfileFormat::Pairs, None).unwrap();
        assert_eq!(pairs, "rank0=10.0.7.2\nrank1=10.0.7.3\n");
    }

    #[test]
    fn hostfile_refuses_a_member_without_address_or_record_and_an_empty_violin() {
        let vms = [vm("rank0", 1), vm("rank1", 1)];
        let v = violin(vec![
            member("rank0", Some("10.0.7.2")),
            member("rank1", None),
        ]);
        let err = hostfile(&v, &vms, HostfileFormat::Hydra, None).unwrap_err();
        assert!(err.to_string().contains("rank1"), "{err}");
        let v = violin(vec![member("ghost", Some("10.0.7.9"))]);
        let err = hostfile(&v, &vms, HostfileFormat::Hydra, None).unwrap_err();
        assert!(err.to_string().contains("ghost"), "{err}");
        let err = hostfile(&violin(vec![]), &vms, HostfileFormat::Hydra, None).unwrap_err();
        assert!(err.to_string().contains("no VMs"), "{err}");
    }
}
