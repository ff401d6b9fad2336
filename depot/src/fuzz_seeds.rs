//! The checked-in seed corpus of `fuzz/` (`fuzz/seeds/<target>/`), made by the real encoders.
//! The test fails when an encoding changes and the seeds are stale; regenerate them with
//! `VIOLA_WRITE_FUZZ_SEEDS=1 cargo test -p viola-depot fuzz_seeds`.

use std::path::Path;

use crate::api::{ImageEntry, StageRequest, StageState, StageStatus, UploadReport};
use crate::chunker::ChunkerSpec;
use crate::hash::Hash;
use crate::manifest::{DiskFormat, MANIFEST_VERSION, Manifest, OverlaySpec, PartRef};
use crate::part::{ChunkEntry, PartIndex};
use crate::wire::{self, Frame, Request, Response};

fn check(target: &str, seeds: &[(&str, Vec<u8>)], run: fn(&[u8])) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/seeds")
        .join(target);
    viola_common::fuzz_seeds::check(&dir, seeds, run);
}

fn control_frame<T: serde::Serialize>(msg: &T) -> Vec<u8> {
    wire::encode(&wire::control(msg))
}

#[test]
fn fuzz_seeds() {
    let base = PartRef {
        id: Hash::of(b"base"),
        size: 3 << 20,
        format: DiskFormat::Raw,
        virtual_size: 1 << 30,
        backing: None,
        label: "debian-base".into(),
    };
    let layer = PartRef {
        id: Hash::of(b"layer"),
        size: 1 << 20,
        format: DiskFormat::Qcow2,
        virtual_size: 1 << 30,
        backing: Some(base.id),
        label: "mpi-libs".into(),
    };
    let manifest = Manifest {
        version: MANIFEST_VERSION,
        name: "mpi-node".into(),
        parts: vec![base, layer],
        overlay: OverlaySpec {
            cluster_size: Some(65536),
        },
    };
    check("manifest", &[("two_parts", manifest.to_json())], |b| {
        // A seed that is rejected would only exercise the error paths.
        assert!(Manifest::from_json(b).is_ok());
        crate::manifest::fuzz_decode(b);
    });

    let chunk = |i: u8, len, zero| ChunkEntry {
        hash: Hash::of(&[i]),
        len,
        zero,
    };
    let fixed = PartIndex {
        size: 65536 * 2 + 100,
        content_hash: Hash::of(b"content"),
        chunker: ChunkerSpec::Fixed { size: 65536 },
        chunks: vec![
            chunk(0, 65536, false),
            chunk(1, 65536, true),
            chunk(2, 100, false),
        ],
    };
    let cdc = PartIndex {
        size: 12288,
        content_hash: Hash::of(b"cdc"),
        chunker: ChunkerSpec::FastCdcAligned {
            min: 4096,
            avg: 8192,
            max: 16384,
        },
        chunks: vec![chunk(3, 4096, false), chunk(4, 8192, false)],
    };
    check(
        "part_index",
        &[("fixed", fixed.encode()), ("cdc_aligned", cdc.encode())],
        |b| {
            assert!(PartIndex::decode(b).is_ok());
            crate::part::fuzz_decode(b);
        },
    );

    let part = Hash::of(b"part");
    let mut stream = control_frame(&Response::Ok);
    stream.extend(wire::encode(&Frame::Chunk {
        index: 3,
        data: vec![1, 2, 3, 4, 5],
    }));
    stream.extend(wire::encode(&Frame::Blob(fixed.encode()[..40].to_vec())));
    stream.extend(wire::encode(&Frame::End));
    // An upload as the client sends it: the request, the bytes, the end.
    let mut upload = control_frame(&Request::Upload {
        name: "mpi-node".into(),
        size: 8,
        replace: true,
    });
    upload.extend(wire::encode(&Frame::Blob(b"QFI\xfb\0\0\0\x03".to_vec())));
    upload.extend(wire::encode(&Frame::End));
    let entry = ImageEntry {
        name: "mpi-node".into(),
        manifest: Hash::of(b"manifest"),
        virtual_size: 1 << 30,
        bytes: 4 << 20,
        parts: 2,
        complete: true,
        problem: None,
    };
    let damaged = ImageEntry {
        name: "old".into(),
        problem: Some("reading manifest: No such file or directory".into()),
        complete: false,
        ..entry.clone()
    };
    check(
        "wire",
        &[
            (
                "chunks",
                control_frame(&Request::Chunks {
                    part,
                    first: 0,
                    count: 16,
                }),
            ),
            ("have", control_frame(&Request::Have { parts: vec![part] })),
            (
                "stage",
                control_frame(&Request::Stage(StageRequest {
                    image: "mpi-node".into(),
                    vm: "vm1".into(),
                    host: "b/b1".into(),
                    deadline_unix_ms: 1_800_000_000_000,
                    reject_if_late: true,
                    chain_only: true,
                })),
            ),
            (
                "stage_status",
                control_frame(&Response::Stage(StageStatus {
                    stage_id: "s1".into(),
                    state: StageState::Ready,
                    accepted: true,
                    predicted_ready_unix_ms: Some(1_800_000_000_000),
                    ready_unix_ms: None,
                    deadline_unix_ms: 1_800_000_000_500,
                    bytes_total: 4096,
                    bytes_done: 4096,
                    overlay: Some("/var/lib/viola/vm1.qcow2".into()),
                    chain: vec!["/var/lib/viola/a.raw".into()],
                    message: String::new(),
                })),
            ),
            ("stream", stream),
            (
                "images",
                control_frame(&Request::Images {
                    after: Some("debian".into()),
                }),
            ),
            (
                "images_page",
                control_frame(&Response::Images {
                    images: vec![entry, damaged],
                    more: true,
                }),
            ),
            ("upload", upload),
            (
                "upload_report",
                control_frame(&Response::Upload(UploadReport {
                    name: "mpi-node".into(),
                    manifest: Hash::of(b"manifest"),
                    replaced: Some(Hash::of(b"before")),
                    bytes_received: 4 << 20,
                    format: DiskFormat::Qcow2,
                    virtual_size: 1 << 30,
                    parts: 1,
                    chunks: 40,
                    zero_chunks: 4,
                    new_chunks: 30,
                    new_bytes: 3 << 20,
                    dedup_chunks: 6,
                    dedup_bytes: 1 << 19,
                })),
            ),
        ],
        |b| {
            assert!(matches!(wire::decode(b), Ok(Some(_))));
            wire::fuzz_decode(b);
        },
    );
}
