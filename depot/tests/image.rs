//! Import and assembly with the real `qemu-img`.

#[path = "support/qemu_tools.rs"]
mod qemu_tools;

use std::path::Path;
use std::sync::atomic::AtomicBool;

use qemu_tools::{create_qcow2, qemu_img, qemu_io};

use viola_depot::chunker::ChunkerSpec;
use viola_depot::image::{self, ImageError};
use viola_depot::manifest::{DiskFormat, MANIFEST_VERSION, Manifest, OverlaySpec, PartRef};
use viola_depot::store::{Store, StoreError};

/// Makes a 1 MiB qcow2 `dir/evil.qcow2` with `qemu-img create` `options`, imports it into a
/// new store in `dir` as the one part of an image, as a hostile peer would serve it, and
/// assembles that for VM `vm` in `dir/h`.
fn assemble_hostile_part(dir: &Path, options: &[&str]) -> Result<image::Assembled, ImageError> {
    let evil = dir.join("evil.qcow2");
    create_qcow2(&evil, options, Some("1M"));
    let store = Store::open(dir.join("store")).unwrap();
    let (idx, _) = store.import_file(&evil, spec(), |_| {}).unwrap();
    let m = Manifest {
        version: MANIFEST_VERSION,
        name: "evil".into(),
        parts: vec![PartRef {
            id: idx.id(),
            size: idx.size,
            format: DiskFormat::Qcow2,
            virtual_size: 1 << 20,
            backing: None,
            label: String::new(),
        }],
        overlay: OverlaySpec::default(),
    };
    image::assemble(&store, &m, &dir.join("h"), Some("vm"), &mut |_, _| {})
}

fn spec() -> ChunkerSpec {
    ChunkerSpec::FastCdc {
        min: 4096,
        avg: 16384,
        max: 65536,
    }
}

#[test]
fn a_chain_imported_elsewhere_assembles_to_the_same_disk_and_gets_a_checked_overlay() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    let base = src.join("base.qcow2");
    let layer = src.join("layer.qcow2");
    create_qcow2(&base, &[], Some("64M"));
    qemu_io(&base, "write -P 0x11 0 3M");
    create_qcow2(&layer, &["-b", base.to_str().unwrap(), "-F", "qcow2"], None);
    qemu_io(&layer, "write -P 0x22 1M 2M");
    let store = Store::open(dir.path().join("store")).unwrap();
    let (_, m) = image::import(&store, &layer, "demo", spec(), &mut |_, _| {}).unwrap();
    assert_eq!(m.parts.len(), 2);
    assert_eq!(m.parts[1].backing, Some(m.parts[0].id));

    let host = dir.path().join("images/h1");
    let a = image::assemble(&store, &m, &host, Some("vm1"), &mut |_, _| {}).unwrap();
    let overlay = a.overlay.clone().unwrap();
    // Same guest-visible content as the original chain.
    qemu_img(&[
        "compare",
        "-q",
        layer.to_str().unwrap(),
        overlay.to_str().unwrap(),
    ]);
    // The layer's backing reference is the relative, content-addressed name of the base.
    let info = viola_depot::qemu::info(&a.chain[1]).unwrap();
    assert_eq!(
        info.backing.as_deref(),
        Some(m.parts[0].file_name().as_str())
    );
    // A second VM reuses the laid-down chain (verified, not rewritten) and never clobbers vm1.
    let b = image::assemble(&store, &m, &host, Some("vm2"), &mut |_, _| {}).unwrap();
    assert_eq!(b.reused, 2);
    assert!(matches!(
        image::assemble(&store, &m, &host, Some("vm1"), &mut |_, _| {}),
        Err(ImageError::OverlayExists(_))
    ));
    // Hostile VM names never leave the image directory.
    assert!(image::assemble(&store, &m, &host, Some("../escape"), &mut |_, _| {}).is_err());
}

#[test]
fn a_part_whose_header_points_outside_the_chain_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    // A "base" that would let the guest read a host file through its backing chain.
    let err =
        assemble_hostile_part(dir.path(), &["-u", "-b", "/etc/hostname", "-F", "raw"]).unwrap_err();
    let host = dir.path().join("h");
    assert!(matches!(err, ImageError::WrongBacking { .. }), "{err}");
    assert!(!host.join("vm.qcow2").exists());
}

#[test]
fn the_header_parser_reads_what_qemu_img_info_reads() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.raw");
    let layer = dir.path().join("layer.qcow2");
    let v2 = dir.path().join("v2.qcow2");
    let data = dir.path().join("data.qcow2");
    qemu_img(&["create", "-q", "-f", "raw", base.to_str().unwrap(), "8M"]);
    create_qcow2(
        &layer,
        &["-o", "cluster_size=4096", "-b", "base.raw", "-F", "raw"],
        None,
    );
    create_qcow2(&v2, &["-o", "compat=0.10"], Some("3M"));
    let data_file = format!("data_file={}", dir.path().join("data.bin").display());
    create_qcow2(&data, &["-o", &data_file], Some("1M"));
    for img in [&layer, &v2, &data] {
        let bytes = std::fs::read(img).unwrap();
        let h = viola_depot::qemu::parse_qcow2_header(&bytes).unwrap();
        let info = viola_depot::qemu::info(img).unwrap();
        assert_eq!(h.virtual_size, info.virtual_size, "{}", img.display());
        assert_eq!(h.backing, info.backing, "{}", img.display());
        assert_eq!(h.backing_format, info.backing_format, "{}", img.display());
        assert_eq!(h.data_file, info.has_data_file, "{}", img.display());
        // Every truncation of a real header is an error or a prefix-consistent parse, never
        // a panic, and never a different backing file.
        for cut in (0..bytes.len().min(8192)).step_by(7) {
            if let Ok(t) = viola_depot::qemu::parse_qcow2_header(&bytes[..cut]) {
                assert!(t.backing.is_none() || t.backing == h.backing);
            }
        }
    }
    assert_eq!(
        viola_depot::qemu::parse_qcow2_header(&std::fs::read(&v2).unwrap())
            .unwrap()
            .version,
        2
    );
    assert!(viola_depot::qemu::parse_qcow2_header(&std::fs::read(&base).unwrap()).is_err());
}

#[test]
fn a_part_with_an_external_data_file_is_refused_before_anything_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let options = ["-o", "data_file=/etc/hostname,data_file_raw=on"];
    let err = assemble_hostile_part(dir.path(), &options).unwrap_err();
    let host = dir.path().join("h");
    assert!(matches!(err, ImageError::DataFile { .. }), "{err}");
    // Nothing under any name: no part, no overlay, no temp file.
    assert_eq!(std::fs::read_dir(&host).unwrap().count(), 0);
}

#[test]
fn an_upload_is_inspected_then_imported_and_a_stopped_import_names_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("u.qcow2");
    create_qcow2(&img, &[], Some("4M"));
    qemu_io(&img, "write -P 0x7 0 1M");
    let store = Store::open(dir.path().join("store")).unwrap();
    let info = image::inspect_untrusted(&img).unwrap();
    assert_eq!(
        (info.format, info.virtual_size),
        (DiskFormat::Qcow2, 4 << 20)
    );
    let stop = AtomicBool::new(true);
    let err =
        image::import_self_contained(&store, &info, "u", false, spec(), &stop, &mut |_, _| {})
            .unwrap_err();
    assert!(
        matches!(err, ImageError::Store(StoreError::Cancelled)),
        "{err}"
    );
    assert!(matches!(
        store.resolve("u"),
        Err(StoreError::NoSuchImage(_))
    ));
    let go = AtomicBool::new(false);
    let done = image::import_self_contained(&store, &info, "u", false, spec(), &go, &mut |_, _| {})
        .unwrap();
    assert_eq!(store.resolve("u").unwrap().0, done.hash);
    assert_eq!(done.manifest.parts[0].label, "u");
    // A name is written once without replace, even by the same import.
    let err = image::import_self_contained(&store, &info, "u", false, spec(), &go, &mut |_, _| {})
        .unwrap_err();
    assert!(
        matches!(err, ImageError::Store(StoreError::NameExists(_))),
        "{err}"
    );
}
