//! Importing qcow2/raw images into the store and laying a chain down for libvirt.
//!
//! Import normalises every layer's backing reference to the *relative* file name of its parent
//! part (`<part-id>.<fmt>`), so the stored bytes do not depend on where the image came from and
//! a chain laid down in any directory is valid there as it is. Assembly writes each part from
//! verified chunks (zero chunks become holes) to a temp name and renames it into place, checks
//! with `qemu-img info` that every part's backing reference is exactly its parent (a hostile
//! part naming `/etc/shadow` as backing file or an external data file is refused), then creates
//! the VM's overlay (backing file: the top part's relative name, so it resolves in whatever
//! mount namespace sees the directory) and runs `qemu-img check`.

use std::fs::{self, File};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::chunker::ChunkerSpec;
use crate::hash::Hash;
use crate::manifest::{
    self, DiskFormat, MANIFEST_VERSION, Manifest, ManifestError, OverlaySpec, PartRef,
};
use crate::qemu::{self, QemuImgError};
use crate::store::{Store, StoreError};

/// Errors of import and assembly.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("qemu-img")]
    Qemu(#[from] QemuImgError),
    #[error("store")]
    Store(#[from] StoreError),
    #[error("manifest")]
    Manifest(#[from] ManifestError),
    #[error("{what} {path}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} uses an external data file; refusing (it would point outside the image)")]
    DataFile { path: PathBuf },
    #[error("part {path} names backing {found:?} ({found_format:?}); expected {expected:?}")]
    WrongBacking {
        path: PathBuf,
        found: Option<String>,
        found_format: Option<String>,
        expected: Option<String>,
    },
    #[error(
        "part {path} is {found:?}/{found_size} bytes virtual; the manifest says {expected:?}/{expected_size}"
    )]
    WrongShape {
        path: PathBuf,
        found: DiskFormat,
        found_size: u64,
        expected: DiskFormat,
        expected_size: u64,
    },
    #[error("{0} already exists; refusing to overwrite a VM's disk (remove it first)")]
    OverlayExists(PathBuf),
    #[error("part {path} on disk does not match part {id} (size or content)")]
    Mismatch { path: PathBuf, id: Hash },
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> ImageError + 'a {
    move |source| ImageError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// Progress of a long operation: bytes done of bytes total.
pub type Progress<'a> = &'a mut dyn FnMut(u64, u64);

/// Imports an image (and its whole backing chain) as `name`. Returns the manifest hash.
pub fn import(
    store: &Store,
    top: &Path,
    name: &str,
    spec: ChunkerSpec,
    progress: Progress<'_>,
) -> Result<(Hash, Manifest), ImageError> {
    manifest::validate_name(name)?;
    let mut chain = qemu::chain(top)?;
    chain.reverse();
    let total: u64 = chain
        .iter()
        .map(|i| fs::metadata(&i.path).map(|m| m.len()).unwrap_or(0))
        .sum();
    let mut done_before = 0u64;
    let mut parts: Vec<PartRef> = Vec::new();
    for info in &chain {
        if info.has_data_file {
            return Err(ImageError::DataFile {
                path: info.path.clone(),
            });
        }
        let label = info
            .path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let (idx, _) = match parts.last() {
            None => store.import_file(&info.path, spec, |b| progress(done_before + b, total))?,
            Some(parent) => {
                // Copy, point the copy at its parent's content-addressed name, import the copy.
                let tmp =
                    store
                        .tmp_dir()
                        .join(format!("import-{}-{}", std::process::id(), parts.len()));
                fs::copy(&info.path, &tmp).map_err(io_err("copying", &info.path))?;
                let r = qemu::rebase_unsafe(&tmp, &parent.file_name(), parent.format)
                    .map_err(ImageError::from)
                    .and_then(|()| {
                        store
                            .import_file(&tmp, spec, |b| progress(done_before + b, total))
                            .map_err(ImageError::from)
                    });
                let _ = fs::remove_file(&tmp);
                r?
            }
        };
        done_before += idx.size;
        parts.push(PartRef {
            id: idx.id(),
            size: idx.size,
            format: info.format,
            virtual_size: info.virtual_size,
            backing: parts.last().map(|p| p.id),
            label,
        });
    }
    let m = Manifest {
        version: MANIFEST_VERSION,
        name: name.to_string(),
        parts,
        overlay: OverlaySpec::default(),
    };
    let h = store.put_manifest(&m)?;
    Ok((h, m))
}

/// What assembly laid down.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Assembled {
    /// The chain, base first.
    pub chain: Vec<PathBuf>,
    /// The VM's overlay (the disk libvirt boots), if a VM was named.
    pub overlay: Option<PathBuf>,
    /// Parts that were already there and verified instead of written.
    pub reused: usize,
}

/// Lays the image's chain down in `image_dir` and, with `vm`, creates `<vm>.qcow2` on top.
pub fn assemble(
    store: &Store,
    m: &Manifest,
    image_dir: &Path,
    vm: Option<&str>,
    progress: Progress<'_>,
) -> Result<Assembled, ImageError> {
    m.validate()?;
    if let Some(vm) = vm {
        manifest::validate_name(vm)?;
    }
    fs::create_dir_all(image_dir).map_err(io_err("creating", image_dir))?;
    let image_dir = fs::canonicalize(image_dir).map_err(io_err("resolving", image_dir))?;
    if let Some(vm) = vm {
        let overlay = image_dir.join(format!("{vm}.qcow2"));
        if overlay.exists() {
            return Err(ImageError::OverlayExists(overlay));
        }
    }
    let total: u64 = m.parts.iter().map(|p| p.size).sum();
    let mut done = 0u64;
    let mut chain = Vec::new();
    let mut reused = 0;
    for (i, part) in m.parts.iter().enumerate() {
        let idx = store.part_index(&part.id)?;
        if idx.size != part.size {
            return Err(ImageError::Mismatch {
                path: image_dir.join(part.file_name()),
                id: part.id,
            });
        }
        let path = image_dir.join(part.file_name());
        if path.exists() && matches_part(&path, &idx)? {
            reused += 1;
        } else {
            write_part(store, &idx, &image_dir, &path, &mut |b| {
                progress(done + b, total)
            })?;
        }
        done += part.size;
        progress(done, total);
        check_part(
            &path,
            part,
            if i == 0 { None } else { Some(&m.parts[i - 1]) },
        )?;
        chain.push(path);
    }
    let overlay = match (vm, m.top()) {
        (Some(vm), Some(top)) => {
            let overlay = image_dir.join(format!("{vm}.qcow2"));
            // Relative backing name: valid in every mount namespace that sees the directory
            // (a lab host sees its image directory under another path than the depot does).
            qemu::create_overlay(
                &overlay,
                Path::new(&top.file_name()),
                top.format,
                m.overlay.cluster_size,
            )?;
            qemu::check(&overlay)?;
            Some(overlay)
        }
        _ => None,
    };
    Ok(Assembled {
        chain,
        overlay,
        reused,
    })
}

fn write_part(
    store: &Store,
    idx: &crate::part::PartIndex,
    dir: &Path,
    path: &Path,
    progress: &mut dyn FnMut(u64),
) -> Result<(), ImageError> {
    let tmp = dir.join(format!(
        ".viola-{}-{}.tmp",
        idx.id().short(),
        std::process::id()
    ));
    let result = (|| {
        let f = File::create(&tmp).map_err(io_err("creating", &tmp))?;
        f.set_len(idx.size).map_err(io_err("sizing", &tmp))?;
        // Chunks are independent: read, verify and write them on every core, in interleaved
        // stripes so the threads stream through the file together.
        let offsets = idx.offsets();
        let threads = std::thread::available_parallelism()
            .map_or(2, |n| n.get())
            .clamp(1, 4);
        let written = std::sync::atomic::AtomicU64::new(0);
        let stripe = 16;
        std::thread::scope(|scope| -> Result<(), ImageError> {
            let workers: Vec<_> = (0..threads)
                .map(|t| {
                    let (f, offsets, written, tmp) = (&f, &offsets, &written, &tmp);
                    scope.spawn(move || -> Result<(), ImageError> {
                        let mut i = t * stripe;
                        while i < idx.chunks.len() {
                            for (c, &offset) in
                                idx.chunks.iter().zip(offsets.iter()).skip(i).take(stripe)
                            {
                                if !c.zero {
                                    let data = store.read_chunk(&c.hash)?;
                                    f.write_all_at(&data, offset)
                                        .map_err(io_err("writing", tmp))?;
                                }
                                written.fetch_add(
                                    u64::from(c.len),
                                    std::sync::atomic::Ordering::Relaxed,
                                );
                            }
                            i += threads * stripe;
                        }
                        Ok(())
                    })
                })
                .collect();
            let mut result = Ok(());
            for w in workers {
                while !w.is_finished() {
                    progress(written.load(std::sync::atomic::Ordering::Relaxed));
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                let r = w.join().unwrap_or_else(|_| {
                    Err(ImageError::Io {
                        what: "writing (worker panicked)",
                        path: tmp.clone(),
                        source: io::Error::other("panic"),
                    })
                });
                if result.is_ok() {
                    result = r;
                }
            }
            result
        })?;
        progress(idx.size);
        f.sync_all().map_err(io_err("syncing", &tmp))?;
        fs::rename(&tmp, path).map_err(io_err("renaming into place", path))?;
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io_err("syncing", dir))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Whether the file at `path` holds exactly the part's bytes (re-hashed, never trusted).
fn matches_part(path: &Path, idx: &crate::part::PartIndex) -> Result<bool, ImageError> {
    let meta = fs::metadata(path).map_err(io_err("reading", path))?;
    if meta.len() != idx.size {
        return Ok(false);
    }
    let mut h = blake3::Hasher::new();
    let f = File::open(path).map_err(io_err("opening", path))?;
    h.update_reader(io::BufReader::with_capacity(1 << 20, f))
        .map_err(io_err("hashing", path))?;
    Ok(Hash::from(h.finalize()) == idx.content_hash)
}

fn check_part(path: &Path, part: &PartRef, parent: Option<&PartRef>) -> Result<(), ImageError> {
    let info = qemu::info(path)?;
    if info.has_data_file {
        return Err(ImageError::DataFile {
            path: path.to_path_buf(),
        });
    }
    if info.format != part.format || info.virtual_size != part.virtual_size {
        return Err(ImageError::WrongShape {
            path: path.to_path_buf(),
            found: info.format,
            found_size: info.virtual_size,
            expected: part.format,
            expected_size: part.virtual_size,
        });
    }
    let expected = parent.map(PartRef::file_name);
    let format_ok = match parent {
        None => info.backing_format.is_none(),
        Some(p) => info.backing_format.as_deref() == Some(p.format.as_str()),
    };
    if info.backing != expected || !format_ok {
        return Err(ImageError::WrongBacking {
            path: path.to_path_buf(),
            found: info.backing,
            found_format: info.backing_format,
            expected,
        });
    }
    if part.format == DiskFormat::Qcow2 {
        qemu::check(path)?;
    }
    Ok(())
}
