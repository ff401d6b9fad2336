//! Verified multi-source transfers over real QUIC with mutual TLS on loopback.

#[path = "support/quic.rs"]
mod quic;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use quic::{connect, identity};
use viola_common::identity::{CertificateAuthority, Role};
use viola_depot::chunker::ChunkerSpec;
use viola_depot::hash::Hash;
use viola_depot::scenario_gen::pseudo_random_bytes as data;
use viola_depot::store::Store;
use viola_depot::transfer::{FetchOptions, Services, fetch_part};

/// A bare part server (no staging, no uploads).
fn serve(
    store: Store,
    id: &viola_common::identity::Identity,
) -> (std::net::SocketAddr, quinn::Endpoint) {
    quic::serve(store, id, Services::default())
}

fn import(store: &Store, dir: &Path, bytes: &[u8]) -> Hash {
    let p = dir.join("img.raw");
    std::fs::write(&p, bytes).unwrap();
    store
        .import_file(
            &p,
            ChunkerSpec::FastCdc {
                min: 4096,
                avg: 16384,
                max: 65536,
            },
            |_| {},
        )
        .unwrap()
        .0
        .id()
}

fn read_back(store: &Store, part: Hash) -> Vec<u8> {
    let idx = store.part_index(&part).unwrap();
    let mut out = Vec::new();
    for (c, b) in store.read_part_range(&idx, 0..idx.chunks.len()).unwrap() {
        if c.zero {
            out.extend(vec![0; c.len as usize])
        } else {
            out.extend(b)
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_source_is_caught_and_the_part_is_completed_from_another() {
    let dir = tempfile::tempdir().unwrap();
    let ca = CertificateAuthority::generate("test", 1).unwrap();
    let (a, b, c) = (
        Store::open(dir.path().join("a")).unwrap(),
        Store::open(dir.path().join("b")).unwrap(),
        Store::open(dir.path().join("c")).unwrap(),
    );
    let mut bytes = data(3_000_000, 1);
    bytes[1_000_000..1_200_000].fill(0);
    let part = import(&a, dir.path(), &bytes);
    assert_eq!(import(&b, dir.path(), &bytes), part);
    // Flip a bit in every fourth data chunk at source a, so whichever ranges the scheduler
    // gives a (it splits the part between the sources as they answer), a serves corrupt bytes.
    let idx = a.part_index(&part).unwrap();
    let victims: Vec<_> = idx
        .chunks
        .iter()
        .enumerate()
        .filter(|(i, c)| !c.zero && i % 4 == 0)
        .map(|(_, c)| a.chunk_path(&c.hash))
        .collect();
    assert!(victims.len() > 10);
    for path in &victims {
        let mut chunk = std::fs::read(path).unwrap();
        chunk[10] ^= 1;
        std::fs::write(path, chunk).unwrap();
    }

    let (addr_a, _ea) = serve(a, &identity(&ca, Role::Depot, "a"));
    let (addr_b, _eb) = serve(b, &identity(&ca, Role::Depot, "b"));
    let me = identity(&ca, Role::Depot, "c");
    let sources = vec![
        connect(&me, addr_a, "a").await,
        connect(&me, addr_b, "b").await,
    ];
    let opts = FetchOptions {
        range_chunks: 8,
        streams_per_source: 2,
    };
    let report = fetch_part(&c, part, &sources, opts, Arc::new(AtomicU64::new(0)))
        .await
        .unwrap();
    assert_eq!(report.lying_sources, vec!["a".to_string()], "{report:?}");
    assert!(report.bad_chunks >= 1);
    assert!(report.bytes_by_source.get("b").copied().unwrap_or(0) > 0);
    assert!(c.has_part(&part));
    assert_eq!(
        read_back(&c, part),
        bytes,
        "every byte verified and correct"
    );
    for path in &victims {
        assert!(
            !c.has_chunk(&Hash::of(&std::fs::read(path).unwrap())),
            "the corrupt bytes were never stored"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interrupted_fetch_resumes_without_refetching_verified_chunks() {
    let dir = tempfile::tempdir().unwrap();
    let ca = CertificateAuthority::generate("test", 1).unwrap();
    let (a, b) = (
        Store::open(dir.path().join("a")).unwrap(),
        Store::open(dir.path().join("b")).unwrap(),
    );
    let bytes = data(2_000_000, 2);
    let part = import(&a, dir.path(), &bytes);
    assert_eq!(import(&b, dir.path(), &bytes), part);
    // Source a loses the second half of its chunks: a transfer from it dies part-way.
    let idx = a.part_index(&part).unwrap();
    let half = idx.chunks.len() / 2;
    for c in &idx.chunks[half..] {
        std::fs::remove_file(a.chunk_path(&c.hash)).unwrap();
    }
    let (addr_a, _ea) = serve(a, &identity(&ca, Role::Depot, "a"));
    let (addr_b, _eb) = serve(b, &identity(&ca, Role::Depot, "b"));
    let me = identity(&ca, Role::Depot, "c");
    let opts = FetchOptions {
        range_chunks: 4,
        streams_per_source: 1,
    };
    {
        let c = Store::open(dir.path().join("c")).unwrap();
        let only_a = vec![connect(&me, addr_a, "a").await];
        let err = fetch_part(&c, part, &only_a, opts, Arc::new(AtomicU64::new(0)))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("no source"), "{err}");
        assert!(!c.has_part(&part));
    }
    // "Restart": a fresh handle on the same directory; the partial index is still there.
    let c = Store::open(dir.path().join("c")).unwrap();
    let partial = c
        .partial_index(&part)
        .unwrap()
        .expect("partial index survives");
    let before = partial.chunks.len() - c.missing_chunks(&partial).len();
    assert!(
        before >= 4,
        "some chunks were verified before the source died ({before})"
    );
    let only_b = vec![connect(&me, addr_b, "b").await];
    let report = fetch_part(&c, part, &only_b, opts, Arc::new(AtomicU64::new(0)))
        .await
        .unwrap();
    assert_eq!(report.chunks_already_present, before);
    assert_eq!(
        report.chunks_fetched,
        idx.chunks.len() - before,
        "only what was missing was fetched"
    );
    assert_eq!(read_back(&c, part), bytes);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_without_a_depot_or_manager_role_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let ca = CertificateAuthority::generate("test", 1).unwrap();
    let a = Store::open(dir.path().join("a")).unwrap();
    let part = import(&a, dir.path(), &data(100_000, 3));
    let (addr, _e) = serve(a, &identity(&ca, Role::Depot, "a"));
    let monitor = identity(&ca, Role::Monitor, "m");
    let src = connect(&monitor, addr, "a").await;
    let err = viola_depot::transfer::fetch_index(&src.conn, "a", part)
        .await
        .unwrap_err();
    assert!(
        viola_common::errors::chain(&err).contains("not allowed"),
        "{err}"
    );
}
