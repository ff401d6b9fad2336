//! The host's end of its guests' shepherd channels. Each VM Viola defines has a virtio-serial
//! port `org.viola.shepherd` whose host side is a unix socket QEMU listens on (libvirt picks
//! the path, under `/run/libvirt` or `/var/lib/libvirt` by version, and writes it into the
//! running domain's XML). Every `CHANNEL_SCAN` the monitor
//! connects to the channels of running domains it does not serve yet, reads one JSON line per
//! request (at most [`MAX_LINE`] bytes), forwards it to the manager as a
//! [`GuestAsk`](viola_api::manager::GuestAsk) naming the VM the socket belongs to, and writes
//! the manager's [`GuestAnswer`] back as one JSON line.
//!
//! Why this channel: only the VM's own QEMU writes into its socket, so the VM a line came from
//! is known without trusting anything the guest says; another VM (on this host or elsewhere)
//! has no way into it. The guest needs no address, key or route to the manager.
//!
//! One task per VM, owned by a `JoinSet` and ended through a child of the monitor's token;
//! one manager connection shared by them, made on first use and again after a failure.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use viola_api::client::Client;
use viola_api::domain::DomainState;
use viola_api::manager::{GuestAnswer, GuestAsk, Request, Response};
use viola_common::identity::Identity;
use viola_hypervisor::domain::SHEPHERD_CHANNEL;
use viola_hypervisor::{Connector, Hypervisor, blocking};

/// The longest request line read from a guest (the shepherd refuses longer bodies anyway).
pub const MAX_LINE: usize = 4096;

/// How often running domains are looked at for channels not served yet.
const CHANNEL_SCAN: Duration = Duration::from_secs(2);

/// How long the manager may take to answer a guest.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(60);

/// Where the channel sockets are, and who this host is.
#[derive(Debug, Clone)]
pub struct ChannelConfig {
    pub host: String,
    pub site: String,
    /// Every manager address (a replicated manager's leader is the one that answers).
    pub managers: Vec<SocketAddr>,
    pub libvirt_uri: String,
    /// Where the host's `/var/lib/libvirt` and `/run/libvirt` are as this monitor sees them
    /// (the lab's monitors run outside the hosts' mount namespaces).
    pub libvirt_state_dir: PathBuf,
    pub libvirt_run_dir: PathBuf,
}

/// Counters by outcome (`accepted`, `refused`, `unanswered`, `malformed`).
pub type GuestRequestCounts = Family<Vec<(String, String)>, Counter>;

/// The socket path libvirt wrote, seen through `state_dir` and `run_dir`.
pub fn seen_from_here(path: &str, state_dir: &Path, run_dir: &Path) -> PathBuf {
    let path = Path::new(path);
    if let Ok(rest) = path.strip_prefix("/var/lib/libvirt") {
        state_dir.join(rest)
    } else if let Ok(rest) = path.strip_prefix("/run/libvirt") {
        run_dir.join(rest)
    } else {
        path.to_owned()
    }
}

/// One manager connection for every VM's task.
struct ManagerLink {
    identity: Identity,
    addrs: Vec<SocketAddr>,
    client: tokio::sync::Mutex<Option<Arc<Client>>>,
}

impl ManagerLink {
    async fn client(&self) -> Result<Arc<Client>, String> {
        let mut slot = self.client.lock().await;
        if let Some(c) = slot.as_ref() {
            return Ok(Arc::clone(c));
        }
        let (c, _) = Client::connect_first(
            &self.identity,
            &self.addrs,
            crate::daemon::MANAGER_CONNECT_TIMEOUT,
        )
        .await
        .map_err(|e| viola_common::errors::chain(&e))?;
        let c = Arc::new(c);
        *slot = Some(Arc::clone(&c));
        Ok(c)
    }

    async fn forget(&self) {
        *self.client.lock().await = None;
    }

    /// Forwards `ask`; the manager's answer for the guest. A move the guest asked for is
    /// answered before it runs; the stream is dropped then (the manager carries on).
    async fn ask(&self, ask: GuestAsk) -> Result<GuestAnswer, String> {
        let client = self.client().await?;
        let (tx, rx) = tokio::sync::oneshot::channel();
        let mut tx = Some(tx);
        let req = Request::GuestAsk(ask);
        let call = client.call(&req, move |r| {
            if let Response::GuestAnswer(a) = r
                && let Some(tx) = tx.take()
            {
                let _ = tx.send(a.clone());
            }
        });
        tokio::pin!(call);
        let result = tokio::time::timeout(ANSWER_TIMEOUT, async {
            tokio::select! {
                Ok(answer) = rx => Ok(answer),
                ended = &mut call => match ended {
                    Ok(Response::GuestAnswer(a)) => Ok(a),
                    Ok(Response::Error { message }) => Ok(GuestAnswer {
                        accepted: false,
                        detail: message,
                    }),
                    Ok(other) => Err(format!("the manager answered {other:?}")),
                    Err(e) => Err(viola_common::errors::chain(&e)),
                },
            }
        })
        .await;
        match result {
            Ok(Ok(answer)) => Ok(answer),
            Ok(Err(e)) => {
                self.forget().await;
                Err(e)
            }
            Err(_) => Err("the manager did not answer in time".into()),
        }
    }
}

/// Serves the shepherd channels of this host's running domains until `token` is cancelled.
pub async fn run(
    cfg: ChannelConfig,
    identity: Identity,
    connector: Arc<dyn Connector>,
    counts: GuestRequestCounts,
    token: CancellationToken,
) {
    let link = Arc::new(ManagerLink {
        identity,
        addrs: cfg.managers.clone(),
        client: tokio::sync::Mutex::new(None),
    });
    let mut served: HashMap<String, CancellationToken> = HashMap::new();
    let mut denied: std::collections::HashSet<String> = std::collections::HashSet::new();
    let mut tasks: JoinSet<String> = JoinSet::new();
    let mut hv: Option<Arc<dyn Hypervisor>> = None;
    let mut scan = tokio::time::interval(CHANNEL_SCAN);
    scan.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = token.cancelled() => break,
            Some(done) = tasks.join_next(), if !tasks.is_empty() => {
                match done {
                    Ok(vm) => { served.remove(&vm); }
                    Err(e) => tracing::warn!(error = %e, "a guest channel task failed"),
                }
                continue;
            }
            _ = scan.tick() => {}
        }
        if hv.is_none() {
            let c = Arc::clone(&connector);
            let uri = cfg.libvirt_uri.clone();
            hv = tokio::task::spawn_blocking(move || c.open(&uri))
                .await
                .ok()
                .and_then(Result::ok);
        }
        let Some(h) = hv.as_ref() else { continue };
        let running = match blocking(h, |h| h.list_domains()).await {
            Ok(d) => d
                .into_iter()
                .filter(|d| d.state == DomainState::Running)
                .map(|d| d.name)
                .collect::<Vec<_>>(),
            Err(e) => {
                tracing::debug!(error = %viola_common::errors::chain(&e), "cannot list domains");
                hv = None;
                continue;
            }
        };
        // Domains that stopped or left: their tasks end (a migrated VM's socket closes anyway).
        for (vm, t) in &served {
            if !running.contains(vm) {
                t.cancel();
            }
        }
        for vm in running {
            if served.contains_key(&vm) {
                continue;
            }
            let name = vm.clone();
            let Ok(xml) = blocking(h, move |h| h.domain_xml(&name)).await else {
                continue;
            };
            let Ok(Some(path)) = viola_hypervisor::xml::unix_channel_path(&xml, SHEPHERD_CHANNEL)
            else {
                continue;
            };
            let path = seen_from_here(&path, &cfg.libvirt_state_dir, &cfg.libvirt_run_dir);
            let stream = match UnixStream::connect(&path).await {
                Ok(s) => s,
                Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
                    // Tried again every scan, said once per VM.
                    if denied.insert(vm.clone()) {
                        tracing::warn!(%vm, path = %path.display(), error = %e, "cannot open the guest's channel");
                    }
                    continue;
                }
                Err(e) => {
                    tracing::debug!(%vm, path = %path.display(), error = %e, "guest channel not open yet");
                    continue;
                }
            };
            tracing::info!(%vm, path = %path.display(), "serving the guest's shepherd channel");
            let vm_token = token.child_token();
            served.insert(vm.clone(), vm_token.clone());
            let link = Arc::clone(&link);
            let counts = counts.clone();
            let (host, site) = (cfg.host.clone(), cfg.site.clone());
            tasks.spawn(async move {
                let (rd, wr) = stream.into_split();
                let forward = |line: String| {
                    let ask = GuestAsk {
                        host: host.clone(),
                        site: site.clone(),
                        vm: vm.clone(),
                        line,
                    };
                    let link = Arc::clone(&link);
                    async move { link.ask(ask).await }
                };
                if let Err(e) = serve_channel(rd, wr, forward, &counts, &vm_token).await {
                    tracing::debug!(%vm, error = %e, "guest channel closed");
                }
                vm
            });
        }
    }
    for t in served.values() {
        t.cancel();
    }
    while tasks.join_next().await.is_some() {}
    link.forget().await;
}

/// Reads request lines from one guest and writes an answer line for each, until the guest's
/// side closes or `token` is cancelled. `forward` gets each well-formed line (at most
/// [`MAX_LINE`] bytes, UTF-8) and returns the answer, or why there is none.
pub async fn serve_channel<R, W, F, Fut>(
    rd: R,
    mut wr: W,
    forward: F,
    counts: &GuestRequestCounts,
    token: &CancellationToken,
) -> std::io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
    F: Fn(String) -> Fut,
    Fut: Future<Output = Result<GuestAnswer, String>>,
{
    let mut rd = BufReader::new(rd);
    let count = |outcome: &str| {
        counts
            .get_or_create(&vec![("outcome".to_owned(), outcome.to_owned())])
            .inc();
    };
    loop {
        let line = tokio::select! {
            () = token.cancelled() => return Ok(()),
            line = read_line(&mut rd) => line?,
        };
        let answer = match line {
            Line::Closed => return Ok(()),
            Line::Bad(why) => {
                count("malformed");
                GuestAnswer {
                    accepted: false,
                    detail: why,
                }
            }
            Line::Text(text) if text.trim().is_empty() => continue,
            Line::Text(text) => match forward(text).await {
                Ok(a) => {
                    count(if a.accepted { "accepted" } else { "refused" });
                    a
                }
                Err(why) => {
                    count("unanswered");
                    GuestAnswer {
                        accepted: false,
                        detail: format!("the manager could not be asked: {why}"),
                    }
                }
            },
        };
        let mut out = serde_json::to_vec(&answer).unwrap_or_default();
        out.push(b'\n');
        tokio::time::timeout(Duration::from_secs(5), wr.write_all(&out))
            .await
            .map_err(|_| std::io::Error::other("the guest does not read its answers"))??;
    }
}

enum Line {
    Text(String),
    Bad(String),
    Closed,
}

/// One line, without its newline. A line over [`MAX_LINE`] bytes is skipped to its end.
async fn read_line<R: AsyncRead + Unpin>(rd: &mut BufReader<R>) -> std::io::Result<Line> {
    let mut buf = Vec::new();
    let n = (&mut *rd)
        .take(MAX_LINE as u64 + 1)
        .read_until(b'\n', &mut buf)
        .await?;
    if n == 0 {
        return Ok(Line::Closed);
    }
    if buf.last() == Some(&b'\n') {
        buf.pop();
    } else if buf.len() > MAX_LINE {
        // Discard the rest of the line, bounded reads at a time.
        loop {
            let mut rest = Vec::new();
            let n = (&mut *rd)
                .take(MAX_LINE as u64)
                .read_until(b'\n', &mut rest)
                .await?;
            if n == 0 || rest.last() == Some(&b'\n') {
                break;
            }
        }
        return Ok(Line::Bad(format!("request longer than {MAX_LINE} bytes")));
    } else {
        // The guest's side closed in the middle of a line: nothing to answer.
        return Ok(Line::Closed);
    }
    Ok(match String::from_utf8(buf) {
        Ok(s) => Line::Text(s),
        Err(_) => Line::Bad("request is not UTF-8".into()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libvirt_paths_are_seen_through_the_state_and_run_dirs() {
        let (lib, run) = (Path::new("/lab/a1/lib"), Path::new("/lab/a1/run"));
        assert_eq!(
            seen_from_here(
                "/var/lib/libvirt/qemu/channel/target/d/org.viola.shepherd",
                lib,
                run
            ),
            lib.join("qemu/channel/target/d/org.viola.shepherd")
        );
        assert_eq!(
            seen_from_here(
                "/run/libvirt/qemu/channel/6-vm/org.viola.shepherd",
                lib,
                run
            ),
            run.join("qemu/channel/6-vm/org.viola.shepherd")
        );
        assert_eq!(
            seen_from_here("/srv/other.sock", lib, run),
            PathBuf::from("/srv/other.sock")
        );
    }

    /// What a guest sends, through an in-memory pipe; the answers it reads back.
    async fn exchange(sent: &[u8]) -> (Vec<GuestAnswer>, Vec<String>, GuestRequestCounts) {
        let (guest, host) = tokio::io::duplex(64 * 1024);
        let (host_rd, host_wr) = tokio::io::split(host);
        let (mut guest_rd, mut guest_wr) = tokio::io::split(guest);
        let forwarded = Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = Arc::clone(&forwarded);
        let forward = move |line: String| {
            let seen = Arc::clone(&seen);
            async move {
                seen.lock().unwrap().push(line.clone());
                if line.contains("down") {
                    return Err("unreachable".to_owned());
                }
                Ok(GuestAnswer {
                    accepted: line.contains("ok"),
                    detail: format!("judged {line}"),
                })
            }
        };
        let counts = GuestRequestCounts::default();
        let token = CancellationToken::new();
        guest_wr.write_all(sent).await.unwrap();
        guest_wr.shutdown().await.unwrap();
        drop(guest_wr);
        let served = serve_channel(host_rd, host_wr, forward, &counts, &token);
        let mut text = String::new();
        let (r, _) = tokio::join!(served, guest_rd.read_to_string(&mut text));
        r.unwrap();
        let answers = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let lines = forwarded.lock().unwrap().clone();
        (answers, lines, counts)
    }

    fn count(counts: &GuestRequestCounts, outcome: &str) -> u64 {
        counts
            .get_or_create(&vec![("outcome".to_owned(), outcome.to_owned())])
            .get()
    }

    #[tokio::test]
    async fn each_line_gets_one_answer_and_bad_lines_are_refused_here() {
        let mut sent = b"{\"ok\":1}\n\n{\"no\":2}\n".to_vec();
        sent.extend(vec![b'x'; MAX_LINE + 10]);
        sent.extend(b"\n\xff\xfe\n{\"down\":3}\n{\"ok\":4}\n");
        let (answers, forwarded, counts) = exchange(&sent).await;
        assert_eq!(
            forwarded,
            ["{\"ok\":1}", "{\"no\":2}", "{\"down\":3}", "{\"ok\":4}"]
        );
        let accepted: Vec<bool> = answers.iter().map(|a| a.accepted).collect();
        assert_eq!(accepted, [true, false, false, false, false, true]);
        assert!(
            answers[2].detail.contains("longer than 4096"),
            "{answers:?}"
        );
        assert!(answers[3].detail.contains("UTF-8"), "{answers:?}");
        assert!(
            answers[4].detail.contains("could not be asked"),
            "{answers:?}"
        );
        assert_eq!(count(&counts, "accepted"), 2);
        assert_eq!(count(&counts, "refused"), 1);
        assert_eq!(count(&counts, "malformed"), 2);
        assert_eq!(count(&counts, "unanswered"), 1);
    }

    #[tokio::test]
    async fn a_line_cut_off_by_the_guest_closing_is_not_forwarded() {
        let (answers, forwarded, _) = exchange(b"{\"ok\":1}\n{\"ok\":2").await;
        assert_eq!(forwarded, ["{\"ok\":1}"]);
        assert_eq!(answers.len(), 1);
    }
}
