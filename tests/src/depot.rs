//! Depots in lab tests: `viola-depot` commands, and `viola-depot serve` daemons in lab hosts
//! (build them first: `daemons::build(&["viola-depot", "viola-common"])`).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result};

use crate::daemons::{Daemons, bin, log_text, spawn_logged, wait_for_log};
use crate::{Lab, run_ok};

/// `viola-depot --quiet ARGS...`, insisting on success; its stdout.
pub fn depot(args: &[&str]) -> Result<String> {
    run_ok(Command::new(bin("viola-depot")).arg("--quiet").args(args))
}

/// `viola-depot --store STORE import FILE --name NAME`: `file` becomes image `name` in `store`.
pub fn import(store: &Path, file: &Path, name: &str) -> Result<String> {
    depot(&[
        "--store",
        store.to_str().unwrap(),
        "import",
        file.to_str().unwrap(),
        "--name",
        name,
    ])
}

/// The configuration of a depot of `site` serving on `host`'s underlay address (port 7410) from
/// `store`, laying chains down in the lab's image directories, with the lab's WAN as its path
/// (200 Mbit/s, 20 ms RTT); `extra` holds further top-level keys and tables.
pub fn serve_config(
    lab: &Lab,
    site: &str,
    host: &str,
    store: &Path,
    identity: &Path,
    extra: &str,
) -> String {
    format!(
        "site = \"{site}\"\nstore = \"{}\"\nlisten = \"{}:7410\"\nidentity_dir = \"{}\"\nimage_dir_template = \"{}/images/{{host}}\"\n{extra}\n[path]\nrate_mbit = 200.0\nrtt_ms = 20.0\n",
        store.display(),
        lab.host(host).address,
        identity.display(),
        lab.status.lab_dir
    )
}

/// Port of a host's own depot agent (a site's depot listens on 7410).
pub const AGENT_PORT: u16 = 7411;

/// The configuration of `host`'s own depot agent (site `site`, store `store`): it lays images
/// down in the host's image directory, as the host sees it, for that host only, fetching parts
/// from `peers` (`(site, address)`, each a depot's `listen`).
pub fn agent_config(
    lab: &Lab,
    site: &str,
    host: &str,
    store: &Path,
    identity: &Path,
    peers: &[(&str, &str)],
) -> String {
    let mut peers_toml = String::new();
    for (peer_site, addr) in peers {
        peers_toml += &format!("[[peers]]\nsite = \"{peer_site}\"\naddr = \"{addr}\"\n");
    }
    format!(
        "site = \"{site}\"\nstore = \"{}\"\nlisten = \"{}:{AGENT_PORT}\"\nidentity_dir = \"{}\"\nimage_dir_template = \"/var/lib/viola/images\"\nhosts = [\"{host}\"]\n{peers_toml}[path]\nrate_mbit = 200.0\nrtt_ms = 20.0\n",
        store.display(),
        lab.host(host).address,
        identity.display(),
    )
}

/// Where [`start`] logs the depot of `host`.
pub fn log_path(dir: &Path, host: &str) -> PathBuf {
    dir.join(format!("depot-{host}.log"))
}

/// Starts `viola-depot serve` with `config` in `host`'s network namespace as daemon `host`
/// (configuration and log in `dir`; a restarted depot appends to the log) and waits until it
/// serves. Returns the log's path.
pub fn start(
    lab: &Lab,
    daemons: &mut Daemons,
    host: &str,
    config: &str,
    dir: &Path,
) -> Result<PathBuf> {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &lab.host(host).namespace]);
    start_as(daemons, host, cmd, config, dir)
}

/// Starts `host`'s own depot agent with `config` (see [`agent_config`]) inside the host's
/// network *and* mount namespace, so it sees the host's image directory as the host's libvirtd
/// does, as daemon `agent-HOST`; waits until it serves. Returns the log's path.
pub fn start_agent(
    lab: &Lab,
    daemons: &mut Daemons,
    host: &str,
    config: &str,
    dir: &Path,
) -> Result<PathBuf> {
    let h = lab.host(host);
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net=/run/netns/{}", h.namespace))
        .arg(format!("--mount={}", h.mount_namespace))
        .arg("--");
    start_as(daemons, &format!("agent-{host}"), cmd, config, dir)
}

/// Runs `viola-depot serve --config` (written to `dir`) under `prefix` (a command that enters
/// namespaces and then runs its arguments) as daemon `name`, logging to `dir`.
fn start_as(
    daemons: &mut Daemons,
    name: &str,
    mut prefix: Command,
    config: &str,
    dir: &Path,
) -> Result<PathBuf> {
    let cfg = dir.join(format!("depot-{name}.toml"));
    std::fs::write(&cfg, config)?;
    let log = log_path(dir, name);
    let serving_before = log_text(&log).matches("depot serving").count();
    let child = spawn_logged(
        prefix
            .arg(bin("viola-depot"))
            .args(["serve", "--config"])
            .arg(&cfg)
            .env("RUST_LOG", "info"),
        &log,
    )?;
    daemons.add(name, child);
    // Ready when it accepts QUIC: it logs "depot serving" then.
    wait_for_log(
        &log,
        "depot serving",
        serving_before,
        Duration::from_secs(20),
    )
    .with_context(|| format!("depot {name} did not start"))?;
    Ok(log)
}

/// The manifest hash image `name` has in `store`, and the manifest.
pub fn manifest(store: &Path, name: &str) -> Result<(String, serde_json::Value)> {
    let hash = std::fs::read_to_string(store.join("names").join(name))
        .with_context(|| format!("image {name} in {}", store.display()))?
        .trim()
        .to_owned();
    let path = store.join("manifests").join(format!("{hash}.json"));
    let manifest = serde_json::from_slice(
        &std::fs::read(&path).with_context(|| format!("manifest {}", path.display()))?,
    )?;
    Ok((hash, manifest))
}
