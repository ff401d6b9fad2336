//! The image list and uploads over real QUIC with mutual TLS on loopback, with the real
//! `qemu-img`: what is listed, what is refused, and that a failed upload leaves nothing.

#[path = "support/qemu_tools.rs"]
mod qemu_tools;
#[path = "support/quic.rs"]
mod quic;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use qemu_tools::{create_qcow2, qemu_img, qemu_io};
use quic::{connect, identity};
use tokio::io::AsyncWriteExt;
use tokio_util::sync::CancellationToken;
use viola_common::identity::{CertificateAuthority, Role};
use viola_depot::api::UploadReport;
use viola_depot::chunker::ChunkerSpec;
use viola_depot::client::{ClientError, DepotClient};
use viola_depot::daemon::DepotConfig;
use viola_depot::manifest::DiskFormat;
use viola_depot::store::{Store, StoreError};
use viola_depot::transfer::{self, PathTuning, Services};
use viola_depot::upload::{UploadLimits, Uploads};
use viola_depot::wire::{self, Frame, Request, Response};

fn spec() -> ChunkerSpec {
    ChunkerSpec::FastCdc {
        min: 4096,
        avg: 16384,
        max: 65536,
    }
}

/// A depot (role depot, site a) serving a fresh store with uploads enabled.
struct Depot {
    dir: tempfile::TempDir,
    ca: CertificateAuthority,
    store: Store,
    addr: SocketAddr,
    uploads: Arc<Uploads>,
    _endpoint: quinn::Endpoint,
}

impl Depot {
    fn start(limits: UploadLimits) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let ca = CertificateAuthority::generate("test", 1).unwrap();
        let store = Store::open(dir.path().join("store")).unwrap();
        let uploads = Arc::new(Uploads::new(
            store.clone(),
            spec(),
            limits,
            CancellationToken::new(),
            Default::default(),
        ));
        let services = Services {
            stager: None,
            uploads: Some(uploads.clone()),
        };
        let (addr, ep) = quic::serve(store.clone(), &identity(&ca, Role::Depot, "a"), services);
        Self {
            dir,
            ca,
            store,
            addr,
            uploads,
            _endpoint: ep,
        }
    }

    async fn client(&self, role: Role) -> DepotClient {
        let id = identity(&self.ca, role, "m");
        DepotClient::connect(&id, self.addr, PathTuning::default())
            .await
            .unwrap()
    }

    fn tmp_files(&self) -> Vec<PathBuf> {
        std::fs::read_dir(self.store.tmp_dir())
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect()
    }

    /// Waits (bounded) until the store's tmp dir is empty; what is left after that.
    async fn tmp_files_settled(&self) -> Vec<PathBuf> {
        for _ in 0..100 {
            if self.tmp_files().is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.tmp_files()
    }

    fn counts(&self) -> (u64, u64, u64) {
        let c = self.uploads.counters();
        (c.ok.get(), c.refused.get(), c.failed.get())
    }
}

/// A small qcow2 image with `pattern` written over its first 3 MiB.
fn small_qcow2(dir: &Path, file: &str, pattern: u8) -> PathBuf {
    let p = dir.join(file);
    create_qcow2(&p, &[], Some("8M"));
    qemu_io(&p, &format!("write -P {pattern} 0 3M"));
    p
}

async fn upload_file(
    c: &DepotClient,
    name: &str,
    path: &Path,
    replace: bool,
) -> Result<UploadReport, ClientError> {
    let f = tokio::fs::File::open(path).await.unwrap();
    let size = f.metadata().await.unwrap().len();
    c.upload(name, size, replace, f, |_| {}).await
}

/// Opens a stream and asks to upload `size` bytes as image `name` (no replace), by hand as
/// a client breaking the protocol would; the stream and the daemon's first (control) answer.
async fn begin_upload(
    mgr: &DepotClient,
    name: &str,
    size: u64,
) -> (quinn::SendStream, quinn::RecvStream, Vec<u8>) {
    let (mut send, mut recv) = mgr.conn.open_bi().await.unwrap();
    let req = Request::Upload {
        name: name.into(),
        size,
        replace: false,
    };
    transfer::write_frame(&mut send, &wire::control(&req))
        .await
        .unwrap();
    let Some(Frame::Control(answer)) = transfer::read_frame(&mut recv).await.unwrap() else {
        panic!("no answer")
    };
    (send, recv, answer)
}

fn refusal(r: Result<UploadReport, ClientError>) -> String {
    match r {
        Err(ClientError::Refused(m)) => m,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_uploaded_qcow2_is_listed_served_and_assembles_to_the_same_disk() {
    let depot = Depot::start(UploadLimits::default());
    let src = small_qcow2(depot.dir.path(), "web.qcow2", 0x5a);
    let size = std::fs::metadata(&src).unwrap().len();
    let mgr = depot.client(Role::Adaptmgr).await;
    let mut seen = Vec::new();
    let f = tokio::fs::File::open(&src).await.unwrap();
    let report = mgr
        .upload("web", size, false, f, |n| seen.push(n))
        .await
        .unwrap();
    assert_eq!(seen.last(), Some(&size), "progress reaches the size");
    assert_eq!(report.bytes_received, size);
    assert_eq!(report.format, DiskFormat::Qcow2);
    assert_eq!(report.virtual_size, 8 << 20);
    assert_eq!(report.parts, 1);
    assert_eq!(report.replaced, None);
    assert!(report.new_chunks > 0 && report.new_bytes > 0, "{report:?}");
    assert_eq!(
        report.new_bytes + report.dedup_bytes + zero_bytes(&depot.store, &report),
        size,
        "every byte is new, deduplicated or zero"
    );

    // Listed (to the CLI role too), complete.
    let images = depot.client(Role::Cli).await.images().await.unwrap();
    assert_eq!(images.len(), 1);
    let e = &images[0];
    assert_eq!(
        (
            e.name.as_str(),
            e.manifest,
            e.parts,
            e.virtual_size,
            e.complete
        ),
        ("web", report.manifest, 1, 8 << 20, true)
    );
    assert_eq!(e.bytes, size);
    assert_eq!(e.problem, None);

    // Served to another depot by name, and it is the manifest the report names.
    let peer = connect(&identity(&depot.ca, Role::Depot, "b"), depot.addr, "a").await;
    let m = transfer::fetch_manifest(&peer.conn, "web").await.unwrap();
    assert_eq!(m.hash(), report.manifest);
    assert_eq!(
        m.parts[0].label, "web",
        "labelled by its name, not the temp file"
    );

    // Laid down, it is the same disk.
    let host = depot.dir.path().join("images");
    let a =
        viola_depot::image::assemble(&depot.store, &m, &host, Some("vm1"), &mut |_, _| {}).unwrap();
    let overlay = a.overlay.unwrap();
    qemu_img(&[
        "compare",
        "-q",
        src.to_str().unwrap(),
        overlay.to_str().unwrap(),
    ]);

    assert!(depot.tmp_files().is_empty(), "the temp file is gone");
    assert_eq!(depot.counts(), (1, 0, 0));
}

/// Bytes of the report's zero chunks (the report counts them, the index knows their length).
fn zero_bytes(store: &Store, r: &UploadReport) -> u64 {
    let (_, m) = store.resolve(&r.manifest.to_hex()).unwrap();
    let idx = store.part_index(&m.parts[0].id).unwrap();
    idx.chunks
        .iter()
        .filter(|c| c.zero)
        .map(|c| u64::from(c.len))
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_existing_name_is_refused_without_replace_and_repointed_with_it() {
    let depot = Depot::start(UploadLimits::default());
    let first = small_qcow2(depot.dir.path(), "one.qcow2", 0x11);
    let second = small_qcow2(depot.dir.path(), "two.qcow2", 0x22);
    let mgr = depot.client(Role::Adaptmgr).await;
    let a = upload_file(&mgr, "web", &first, false).await.unwrap();

    let msg = refusal(upload_file(&mgr, "web", &second, false).await);
    assert!(
        msg.contains("image web exists; pass replace to point it at the new content"),
        "{msg}"
    );
    assert_eq!(
        depot.store.resolve("web").unwrap().0,
        a.manifest,
        "unchanged"
    );

    let b = upload_file(&mgr, "web", &second, true).await.unwrap();
    assert_ne!(b.manifest, a.manifest);
    assert_eq!(b.replaced, Some(a.manifest));
    let images = mgr.images().await.unwrap();
    assert_eq!(images.len(), 1);
    assert_eq!(images[0].manifest, b.manifest);
    // The same bytes again under a new name: nothing new to store.
    let c = upload_file(&mgr, "web-copy", &second, false).await.unwrap();
    assert_eq!((c.new_chunks, c.new_bytes), (0, 0), "{c:?}");
    assert!(c.dedup_chunks > 0);
    assert_eq!(depot.counts(), (3, 1, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_image_that_points_outside_itself_or_is_another_format_is_refused_and_leaves_nothing() {
    let depot = Depot::start(UploadLimits::default());
    let dir = depot.dir.path();
    let backing = dir.join("backing.qcow2");
    create_qcow2(
        &backing,
        &["-u", "-b", "/etc/hostname", "-F", "raw"],
        Some("1M"),
    );
    let data_file = dir.join("data-file.qcow2");
    create_qcow2(
        &data_file,
        &["-o", "data_file=/etc/hostname,data_file_raw=on"],
        Some("1M"),
    );
    let qcow1 = dir.join("v1.qcow");
    qemu_img(&["create", "-q", "-f", "qcow", qcow1.to_str().unwrap(), "1M"]);
    // A "raw" disk whose first sector is a vmdk descriptor naming a host file as its extent:
    // stored as raw, anything that probes it later would open /etc/hostname.
    let vmdk = dir.join("descriptor.raw");
    let mut text = b"# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\ncreateType=\"monolithicFlat\"\nRW 2 FLAT \"/etc/hostname\" 0\n".to_vec();
    text.resize(1 << 20, 0);
    std::fs::write(&vmdk, text).unwrap();
    let mgr = depot.client(Role::Adaptmgr).await;
    for (file, expected) in [
        (&backing, "names backing file \"/etc/hostname\""),
        (&data_file, "external data file"),
        (&qcow1, "looks like qcow (version 1)"),
        (&vmdk, "looks like vmdk (text descriptor)"),
    ] {
        let msg = refusal(upload_file(&mgr, "evil", file, false).await);
        assert!(msg.contains(expected), "{}: {msg}", file.display());
        assert!(
            msg.contains("only") && msg.contains("accepted"),
            "says what is accepted: {msg}"
        );
    }
    assert!(mgr.images().await.unwrap().is_empty());
    assert!(matches!(
        depot.store.resolve("evil"),
        Err(StoreError::NoSuchImage(_))
    ));
    assert!(
        depot.store.parts().unwrap().is_empty(),
        "refused before the import"
    );
    assert!(depot.tmp_files().is_empty());
    assert_eq!(depot.counts(), (0, 4, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_or_broken_upload_leaves_nothing() {
    // Long enough that a busy machine (CI runs test binaries side by side on 2 cores) gets
    // the second upload's request to the depot while the stalled one is still under way.
    let depot = Depot::start(UploadLimits {
        idle_timeout: Duration::from_secs(6),
        ..UploadLimits::default()
    });
    let mgr = depot.client(Role::Adaptmgr).await;
    let size = 1u64 << 20;
    let half = vec![7u8; (size / 2) as usize];

    // The client sends half, then the end frame (or nothing more), and closes its side.
    for with_end in [true, false] {
        let (mut send, mut recv, c) = begin_upload(&mgr, "short", size).await;
        assert_eq!(wire::parse_response(&c).unwrap(), Response::Ok);
        transfer::write_frame(&mut send, &Frame::Blob(half.clone()))
            .await
            .unwrap();
        if with_end {
            transfer::write_frame(&mut send, &Frame::End).await.unwrap();
        }
        send.finish().unwrap();
        let Some(Frame::Control(c)) = transfer::read_frame(&mut recv).await.unwrap() else {
            panic!("no answer")
        };
        let Response::Error { message } = wire::parse_response(&c).unwrap() else {
            panic!("accepted a short upload")
        };
        assert!(
            message.contains(&format!("ended after {} of {size} bytes", size / 2)),
            "{message}"
        );
    }

    // The client's reader ends early: it resets the stream, the depot drops what it got.
    let r = mgr
        .upload("short", size, false, &half[..], |_| {})
        .await
        .unwrap_err();
    assert!(
        matches!(r, ClientError::ShortSource { sent, .. } if sent == size / 2),
        "{r}"
    );

    // A client that goes silent is dropped after the idle timeout; meanwhile the name is
    // being uploaded and a second upload of it is refused.
    assert!(
        depot.tmp_files_settled().await.is_empty(),
        "temp files left"
    );
    let (mut writer, reader) = tokio::io::duplex(2 << 20);
    writer.write_all(&half).await.unwrap();
    let stalled = {
        let mgr = depot.client(Role::Adaptmgr).await;
        tokio::spawn(async move { mgr.upload("short", size, false, reader, |_| {}).await })
    };
    for _ in 0..100 {
        if !depot.tmp_files().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        !depot.tmp_files().is_empty(),
        "the stalled upload is under way"
    );
    let msg = refusal(mgr.upload("short", size, false, &half[..], |_| {}).await);
    assert!(msg.contains("already in progress"), "{msg}");
    let r = tokio::time::timeout(Duration::from_secs(30), stalled)
        .await
        .expect("the depot gives up on a silent client")
        .unwrap();
    let msg = refusal(r);
    assert!(
        msg.contains("no complete frame from the client for"),
        "{msg}"
    );
    drop(writer);

    assert!(
        depot.tmp_files_settled().await.is_empty(),
        "temp files left"
    );
    assert!(depot.store.images().unwrap().is_empty());
    assert_eq!(depot.counts(), (0, 1, 4));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_breaks_the_upload_protocol_is_stopped_and_leaves_nothing() {
    let depot = Depot::start(UploadLimits::default());
    let mgr = depot.client(Role::Adaptmgr).await;
    let big = wire::MAX_UPLOAD_BLOB as usize + 1;
    for (size, frames, expected) in [
        (
            4096u64,
            vec![Frame::Blob(vec![1; 4097])],
            "more than the announced 4096 bytes",
        ),
        (
            big as u64,
            vec![Frame::Blob(vec![1; big])],
            "above the upload frame limit",
        ),
        (
            4096,
            vec![wire::control(&Request::Images { after: None })],
            "only blob and end frames",
        ),
        (4096, vec![Frame::Blob(Vec::new())], "empty blob"),
    ] {
        let (mut send, mut recv, _) = begin_upload(&mgr, "bad", size).await;
        for f in &frames {
            // The depot may stop reading before the whole frame is in.
            let _ = transfer::write_frame(&mut send, f).await;
        }
        let _ = send.finish();
        let Some(Frame::Control(c)) = transfer::read_frame(&mut recv).await.unwrap() else {
            panic!("no answer")
        };
        let Response::Error { message } = wire::parse_response(&c).unwrap() else {
            panic!("accepted a broken upload")
        };
        assert!(message.contains(expected), "{message}");
    }
    assert!(depot.tmp_files_settled().await.is_empty());
    assert!(depot.store.images().unwrap().is_empty());
    assert_eq!(depot.counts(), (0, 0, 4));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_manager_may_upload_and_nothing_is_sent_when_refused_up_front() {
    let depot = Depot::start(UploadLimits {
        max_bytes: 1 << 20,
        ..UploadLimits::default()
    });
    let bytes = vec![1u8; 4096];
    // A tenant's user goes through the manager, never to the depot directly.
    for role in [
        Role::Cli,
        Role::User,
        Role::Monitor,
        Role::Depot,
        Role::Overlay,
    ] {
        let c = depot.client(role).await;
        let msg = refusal(c.upload("x", 4096, false, &bytes[..], |_| panic!()).await);
        assert!(msg.contains("not allowed"), "{role:?}: {msg}");
    }
    for role in [Role::User, Role::Monitor, Role::Depot] {
        let c = depot.client(role).await;
        let err = c.images().await.unwrap_err();
        assert!(err.to_string().contains("not allowed"), "{role:?}: {err}");
    }
    let mgr = depot.client(Role::Adaptmgr).await;
    for (name, size, expected) in [
        ("../x", 4096, "not allowed"),
        ("x", 0, "0 bytes"),
        ("x", (1 << 20) + 1, "more than this depot accepts"),
    ] {
        let msg = refusal(
            mgr.upload(name, size, false, &bytes[..], |_| panic!())
                .await,
        );
        assert!(msg.contains(expected), "{name} {size}: {msg}");
    }
    // Raw is fine, and is what it says.
    let r = mgr
        .upload("x", 4096, false, &bytes[..], |_| {})
        .await
        .unwrap();
    assert_eq!((r.format, r.virtual_size), (DiskFormat::Raw, 4096));
    assert_eq!(depot.counts(), (1, 8, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_image_list_comes_in_pages_and_shows_damage() {
    let depot = Depot::start(UploadLimits::default());
    let mgr = depot.client(Role::Adaptmgr).await;
    let one = mgr
        .upload("base", 4096, false, &[3u8; 4096][..], |_| {})
        .await
        .unwrap();
    // Enough names that the list takes several control frames.
    let names = depot.store.root().join("names");
    for i in 0..700 {
        std::fs::write(names.join(format!("img-{i:04}")), one.manifest.to_hex()).unwrap();
    }
    // And one whose manifest is gone.
    let gone = viola_depot::hash::Hash::of(b"gone");
    std::fs::write(names.join("zz-damaged"), gone.to_hex()).unwrap();
    let (first, more) =
        transfer::images_page(&depot.store, None, wire::MAX_CONTROL_LEN as usize).unwrap();
    assert!(more && first.len() < 702, "one frame cannot hold them all");
    let all = mgr.images().await.unwrap();
    assert_eq!(all.len(), 702);
    assert!(all.windows(2).all(|w| w[0].name < w[1].name), "sorted");
    assert_eq!(all[0].name, "base");
    assert!(
        all[1..701]
            .iter()
            .all(|e| e.manifest == one.manifest && e.complete)
    );
    let damaged = &all[701];
    assert_eq!(damaged.name, "zz-damaged");
    assert!(!damaged.complete);
    assert!(
        damaged.problem.as_deref().unwrap().contains("manifest"),
        "{damaged:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_counts_uploads_and_a_shutdown_mid_upload_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let ca = CertificateAuthority::generate("test", 1).unwrap();
    // A free port for the daemon (it binds what it is configured with).
    let listen = std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let cfg = DepotConfig {
        store: dir.path().join("store"),
        listen,
        chunker: spec(),
        ..DepotConfig::default()
    };
    let registry = Arc::new(std::sync::Mutex::new(
        prometheus_client::registry::Registry::default(),
    ));
    let token = CancellationToken::new();
    let daemon = tokio::spawn(viola_depot::daemon::run(
        cfg,
        identity(&ca, Role::Depot, "a"),
        registry.clone(),
        token.clone(),
    ));
    let id = identity(&ca, Role::Adaptmgr, "m");
    let mut mgr = None;
    for _ in 0..50 {
        match DepotClient::connect(&id, listen, PathTuning::default()).await {
            Ok(c) => {
                mgr = Some(c);
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    let mgr = mgr.expect("the daemon listens");
    let src = small_qcow2(dir.path(), "web.qcow2", 0x33);
    upload_file(&mgr, "web", &src, false).await.unwrap();
    refusal(upload_file(&mgr, "web", &src, false).await);
    let metrics = {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry.lock().unwrap()).unwrap();
        text
    };
    assert!(
        metrics.contains("viola_depot_uploads_ok_total 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("viola_depot_uploads_refused_total 1"),
        "{metrics}"
    );

    // An upload in progress when the daemon stops: no temp file, no name.
    let store = Store::open(dir.path().join("store")).unwrap();
    let (mut writer, reader) = tokio::io::duplex(2 << 20);
    writer.write_all(&vec![9u8; 1 << 20]).await.unwrap();
    let upload =
        tokio::spawn(async move { mgr.upload("late", 4 << 20, false, reader, |_| {}).await });
    let tmp = store.tmp_dir();
    for _ in 0..100 {
        if std::fs::read_dir(&tmp).unwrap().next().is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        std::fs::read_dir(&tmp).unwrap().next().is_some(),
        "upload under way"
    );
    token.cancel();
    tokio::time::timeout(Duration::from_secs(20), daemon)
        .await
        .expect("the daemon stops")
        .unwrap()
        .unwrap();
    assert!(upload.await.unwrap().is_err());
    assert_eq!(
        std::fs::read_dir(&tmp).unwrap().count(),
        0,
        "temp file left"
    );
    assert!(matches!(
        store.resolve("late"),
        Err(StoreError::NoSuchImage(_))
    ));
    drop(writer);
}

/// The manager relays a user's upload from its own QUIC stream in a spawned task: the call
/// must take a `quinn::RecvStream` cut to the size and be `Send` (checked when compiling).
#[test]
fn an_upload_relayed_from_a_quic_stream_can_be_spawned() {
    fn spawnable<T: Send + 'static>(_: T) {}
    let relay = |c: Arc<DepotClient>, from_user: quinn::RecvStream, size: u64| {
        let c2 = c.clone();
        spawnable(async move {
            let limited = tokio::io::AsyncReadExt::take(from_user, size);
            c2.upload("img", size, false, limited, |_| {}).await
        });
        spawnable(async move { c.images().await });
    };
    let _ = relay;
}
