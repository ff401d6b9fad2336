//! The on-disk store: chunks by BLAKE3, part indexes by part id, manifests by hash and name.
//!
//! Layout under the root:
//! ```text
//! chunks/ab/<hash>          chunk bytes (verified before they were written)
//! parts/<id>.idx            committed part index: every chunk it names is present and durable
//! partial/<id>.idx          index of a part being fetched (its chunks are GC roots too)
//! manifests/<hash>.json     image manifests
//! names/<name>              the manifest hash an image name points at
//! tmp/                      writes in progress; emptied on open
//! ```
//! Invariants: a file appears under its final name only by `rename` (or, for a name that must
//! be new, `link`) from `tmp/` after its bytes were written, so nobody ever sees half a file. A part index is committed only after
//! `syncfs`, so after a crash every committed index names chunks that are on disk. Chunks that
//! were renamed but not yet synced when the machine crashed may be damaged; they are never
//! referenced by a committed index, and resume re-hashes them before trusting them.

use std::collections::HashSet;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use std::sync::atomic::{AtomicBool, Ordering};

use crate::api::ImageEntry;
use crate::chunker::{self, ChunkerSpec};
use crate::hash::Hash;
use crate::manifest::{Manifest, ManifestError};
use crate::part::{ChunkEntry, IndexError, PartIndex};

/// Errors of store operations.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    Io(#[from] PathIoError),
    #[error("part index {path} is corrupt")]
    Index {
        path: PathBuf,
        #[source]
        source: IndexError,
    },
    #[error("manifest {path} is invalid")]
    Manifest {
        path: PathBuf,
        #[source]
        source: ManifestError,
    },
    #[error("chunk {hash} of part {part} is missing from the store")]
    MissingChunk { part: Hash, hash: Hash },
    #[error("chunk {0} does not match its hash (store corruption; run `viola-depot scrub`)")]
    CorruptChunk(Hash),
    #[error("part {0} is not in the store")]
    NoSuchPart(Hash),
    #[error("no image named {0:?} in the store")]
    NoSuchImage(String),
    #[error("chunking {path}")]
    Chunking {
        path: PathBuf,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("another garbage collection holds the store lock")]
    Locked,
    #[error("image {0} exists; pass replace to point it at the new content")]
    NameExists(String),
    #[error("import stopped (the depot is shutting down or the request is gone)")]
    Cancelled,
}

/// A file operation that failed: what was done, to which path, and why.
#[derive(Debug, thiserror::Error)]
#[error("{what} {path}")]
pub struct PathIoError {
    pub what: &'static str,
    pub path: PathBuf,
    #[source]
    pub source: io::Error,
}

impl PathIoError {
    /// For `map_err`: the failure of `what` on `path`, as the caller's error `E`.
    pub(crate) fn on<'a, E: From<Self>>(
        what: &'static str,
        path: &'a Path,
    ) -> impl FnOnce(io::Error) -> E + 'a {
        move |source| {
            Self {
                what,
                path: path.to_path_buf(),
                source,
            }
            .into()
        }
    }
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> StoreError + 'a {
    PathIoError::on(what, path)
}

/// A depot's store rooted at a directory.
#[derive(Clone, Debug)]
pub struct Store {
    root: PathBuf,
}

/// What `gc` removed.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize)]
pub struct GcReport {
    pub kept_parts: usize,
    pub removed_parts: usize,
    pub removed_partials: usize,
    pub kept_chunks: usize,
    pub removed_chunks: usize,
    pub removed_bytes: u64,
    pub spared_young_chunks: usize,
}

/// What `scrub` found.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize)]
pub struct ScrubReport {
    pub chunks_checked: usize,
    pub bytes_checked: u64,
    pub corrupt_chunks: Vec<Hash>,
    pub parts_checked: usize,
    pub damaged_parts: Vec<Hash>,
    pub bad_indexes: Vec<PathBuf>,
    pub bad_manifests: Vec<PathBuf>,
}

use serde::Serialize;

/// Import statistics of one part.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ImportStats {
    pub chunks: usize,
    pub zero_chunks: usize,
    pub zero_bytes: u64,
    pub new_chunks: usize,
    pub new_bytes: u64,
}

static TMP_COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Writes `bytes` to `path` atomically: temp file in `tmp_dir`, fsync, rename, fsync the dir.
pub fn write_atomic(
    tmp_dir: &Path,
    path: &Path,
    bytes: &[u8],
    durable: bool,
) -> Result<(), StoreError> {
    let tmp = tmp_path(tmp_dir);
    let mut f = File::create(&tmp).map_err(io_err("creating", &tmp))?;
    f.write_all(bytes).map_err(io_err("writing", &tmp))?;
    if durable {
        f.sync_all().map_err(io_err("syncing", &tmp))?;
    }
    drop(f);
    fs::rename(&tmp, path).map_err(io_err("renaming into place", path))?;
    if durable && let Some(dir) = path.parent() {
        sync_dir(dir)?;
    }
    Ok(())
}

fn tmp_path(tmp_dir: &Path) -> PathBuf {
    let n = TMP_COUNTER.fetch_add(1, Ordering::Relaxed);
    tmp_dir.join(format!(
        "{}-{}-{}",
        std::process::id(),
        n,
        rand::random::<u32>()
    ))
}

fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("syncing directory", dir))
}

fn syncfs(path: &Path) -> Result<(), StoreError> {
    let f = File::open(path).map_err(io_err("opening", path))?;
    // SAFETY: syncfs only reads the descriptor, which `f` keeps open for the call.
    let rc = unsafe { libc::syncfs(f.as_raw_fd()) };
    if rc != 0 {
        return Err(io_err("syncfs", path)(io::Error::last_os_error()));
    }
    Ok(())
}

/// Whether every byte is zero (block-wise OR folds vectorise well).
pub fn is_zero(data: &[u8]) -> bool {
    let blocks = data.chunks_exact(64);
    let rest = blocks.remainder();
    blocks
        .into_iter()
        .all(|b| b.iter().fold(0u8, |acc, &x| acc | x) == 0)
        && rest.iter().all(|&x| x == 0)
}

impl Store {
    /// Opens (creating if needed) a store at `root` and clears stale temp files.
    pub fn open(root: impl Into<PathBuf>) -> Result<Self, StoreError> {
        let root = root.into();
        for d in ["chunks", "parts", "partial", "manifests", "names", "tmp"] {
            let p = root.join(d);
            fs::create_dir_all(&p).map_err(io_err("creating", &p))?;
        }
        let store = Self { root };
        let tmp = store.tmp_dir();
        if let Ok(rd) = fs::read_dir(&tmp) {
            let me = format!("{}-", std::process::id());
            for e in rd.flatten() {
                let old = e
                    .metadata()
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|m| m.elapsed().ok());
                // Only remove temp files older than an hour: another process may be writing.
                if !e.file_name().to_string_lossy().starts_with(&me)
                    && old.is_some_and(|d| d > Duration::from_secs(3600))
                {
                    let _ = fs::remove_file(e.path());
                }
            }
        }
        Ok(store)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn tmp_dir(&self) -> PathBuf {
        self.root.join("tmp")
    }

    /// A fresh name in `tmp/`. It starts with this process's id, so `open` in another process
    /// leaves the file alone for an hour and removes it after that (a crash's leftover).
    pub fn tmp_file(&self) -> PathBuf {
        tmp_path(&self.tmp_dir())
    }

    /// Bytes free for an unprivileged writer on the store's filesystem.
    pub fn free_bytes(&self) -> Result<u64, StoreError> {
        let path = self.tmp_dir();
        let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).map_err(|_| {
            io_err("measuring free space of", &path)(io::ErrorKind::InvalidInput.into())
        })?;
        // SAFETY: statvfs writes into a zeroed struct we own, given a NUL-terminated path that
        // lives for the call.
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        if unsafe { libc::statvfs(c.as_ptr(), &raw mut st) } != 0 {
            return Err(io_err("measuring free space of", &path)(
                io::Error::last_os_error(),
            ));
        }
        Ok(st.f_bavail.saturating_mul(st.f_frsize))
    }

    pub fn chunk_path(&self, h: &Hash) -> PathBuf {
        let hex = h.to_hex();
        self.root.join("chunks").join(&hex[..2]).join(hex)
    }

    fn part_path(&self, id: &Hash) -> PathBuf {
        self.root.join("parts").join(format!("{id}.idx"))
    }

    fn partial_path(&self, id: &Hash) -> PathBuf {
        self.root.join("partial").join(format!("{id}.idx"))
    }

    pub fn has_chunk(&self, h: &Hash) -> bool {
        self.chunk_path(h).is_file()
    }

    /// Stores a chunk whose bytes the caller has verified against `h`. Not synced: the part
    /// index commit syncs. Returns whether it was new.
    pub fn put_chunk(&self, h: &Hash, data: &[u8]) -> Result<bool, StoreError> {
        let path = self.chunk_path(h);
        if path.is_file() {
            return Ok(false);
        }
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir).map_err(io_err("creating", dir))?;
        }
        write_atomic(&self.tmp_dir(), &path, data, false)?;
        Ok(true)
    }

    /// Reads a chunk and checks it against its hash.
    pub fn read_chunk(&self, h: &Hash) -> Result<Vec<u8>, StoreError> {
        let path = self.chunk_path(h);
        let data = fs::read(&path).map_err(io_err("reading chunk", &path))?;
        if Hash::of(&data) != *h {
            return Err(StoreError::CorruptChunk(*h));
        }
        Ok(data)
    }

    /// Reads a chunk of `buf.len()` bytes into `buf` (no allocation, one read for the whole
    /// chunk) and checks it against its hash. A shorter file is reported as corrupt.
    pub fn read_chunk_into(&self, h: &Hash, buf: &mut [u8]) -> Result<(), StoreError> {
        let path = self.chunk_path(h);
        let mut f = File::open(&path).map_err(io_err("reading chunk", &path))?;
        match f.read_exact(buf) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                return Err(StoreError::CorruptChunk(*h));
            }
            Err(e) => return Err(io_err("reading chunk", &path)(e)),
        }
        if Hash::of(buf) != *h {
            return Err(StoreError::CorruptChunk(*h));
        }
        Ok(())
    }

    /// Reads a chunk without checking it (the caller verifies, e.g. the receiving depot).
    pub fn read_chunk_unverified(&self, h: &Hash) -> Result<Vec<u8>, StoreError> {
        let path = self.chunk_path(h);
        fs::read(&path).map_err(io_err("reading chunk", &path))
    }

    /// Commits a part index whose chunks are all present. Syncs the filesystem first so the
    /// index never names chunks that a crash could lose.
    pub fn commit_part(&self, idx: &PartIndex) -> Result<Hash, StoreError> {
        let id = idx.id();
        for c in &idx.chunks {
            if !c.zero && !self.has_chunk(&c.hash) {
                return Err(StoreError::MissingChunk {
                    part: id,
                    hash: c.hash,
                });
            }
        }
        syncfs(&self.root)?;
        write_atomic(&self.tmp_dir(), &self.part_path(&id), &idx.encode(), true)?;
        let partial = self.partial_path(&id);
        if partial.exists() {
            let _ = fs::remove_file(&partial);
        }
        Ok(id)
    }

    /// Records the index of a part that is being fetched, so its chunks survive GC and the
    /// fetch can resume.
    pub fn begin_partial(&self, idx: &PartIndex) -> Result<(), StoreError> {
        write_atomic(
            &self.tmp_dir(),
            &self.partial_path(&idx.id()),
            &idx.encode(),
            true,
        )
    }

    pub fn has_part(&self, id: &Hash) -> bool {
        self.part_path(id).is_file()
    }

    /// A committed part index.
    pub fn part_index(&self, id: &Hash) -> Result<PartIndex, StoreError> {
        self.read_index(&self.part_path(id), id)
    }

    /// A partial (in-progress) part index, if any.
    pub fn partial_index(&self, id: &Hash) -> Result<Option<PartIndex>, StoreError> {
        let p = self.partial_path(id);
        if !p.exists() {
            return Ok(None);
        }
        self.read_index(&p, id).map(Some)
    }

    fn read_index(&self, path: &Path, id: &Hash) -> Result<PartIndex, StoreError> {
        let bytes = match fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(StoreError::NoSuchPart(*id));
            }
            Err(e) => {
                return Err(io_err("reading", path)(e));
            }
        };
        let idx = PartIndex::decode(&bytes).map_err(|source| StoreError::Index {
            path: path.to_path_buf(),
            source,
        })?;
        if idx.id() != *id {
            return Err(StoreError::Index {
                path: path.to_path_buf(),
                source: IndexError::Magic,
            });
        }
        Ok(idx)
    }

    /// Ids of all committed parts.
    pub fn parts(&self) -> Result<Vec<Hash>, StoreError> {
        self.list_ids("parts")
    }

    /// Ids of all partial parts.
    pub fn partials(&self) -> Result<Vec<Hash>, StoreError> {
        self.list_ids("partial")
    }

    fn list_ids(&self, dir: &str) -> Result<Vec<Hash>, StoreError> {
        let d = self.root.join(dir);
        let mut out = Vec::new();
        for e in fs::read_dir(&d).map_err(io_err("listing", &d))? {
            let e = e.map_err(io_err("listing", &d))?;
            let name = e.file_name();
            if let Some(stem) = name.to_string_lossy().strip_suffix(".idx")
                && let Ok(h) = stem.parse()
            {
                out.push(h);
            }
        }
        out.sort();
        Ok(out)
    }

    /// Indices of chunks of `idx` not yet in the store (zero chunks never count).
    pub fn missing_chunks(&self, idx: &PartIndex) -> Vec<usize> {
        idx.chunks
            .iter()
            .enumerate()
            .filter(|(_, c)| !c.zero && !self.has_chunk(&c.hash))
            .map(|(i, _)| i)
            .collect()
    }

    /// Chunks `idx` names, read from the store at their offsets, each verified.
    pub fn read_part_range(
        &self,
        idx: &PartIndex,
        chunk_range: std::ops::Range<usize>,
    ) -> Result<Vec<(ChunkEntry, Vec<u8>)>, StoreError> {
        let mut out = Vec::new();
        for c in &idx.chunks[chunk_range] {
            if c.zero {
                out.push((*c, Vec::new()));
            } else {
                out.push((*c, self.read_chunk(&c.hash)?));
            }
        }
        Ok(out)
    }

    /// Cuts a file into chunks, stores the new ones and commits the part. `progress` gets the
    /// bytes consumed so far.
    pub fn import_file(
        &self,
        path: &Path,
        spec: ChunkerSpec,
        progress: impl FnMut(u64),
    ) -> Result<(PartIndex, ImportStats), StoreError> {
        self.import_file_until(path, spec, progress, &AtomicBool::new(false))
    }

    /// [`Store::import_file`] that gives up with [`StoreError::Cancelled`] as soon as `stop` is
    /// set (before the next chunk), so a shutdown need not wait for a large file. The chunks
    /// stored by then stay (unreferenced: the next GC removes them).
    pub fn import_file_until(
        &self,
        path: &Path,
        spec: ChunkerSpec,
        mut progress: impl FnMut(u64),
        stop: &AtomicBool,
    ) -> Result<(PartIndex, ImportStats), StoreError> {
        let file = File::open(path).map_err(io_err("opening", path))?;
        let reader = io::BufReader::with_capacity(1 << 20, file);
        let mut chunks = Vec::new();
        let mut whole = blake3::Hasher::new();
        let mut stats = ImportStats::default();
        let size = chunker::for_each_chunk(spec, reader, |off, data| -> Result<(), StoreError> {
            if stop.load(Ordering::Relaxed) {
                return Err(StoreError::Cancelled);
            }
            whole.update(data);
            let hash = Hash::of(data);
            let zero = is_zero(data);
            stats.chunks += 1;
            if zero {
                stats.zero_chunks += 1;
                stats.zero_bytes += data.len() as u64;
            } else if self.put_chunk(&hash, data)? {
                stats.new_chunks += 1;
                stats.new_bytes += data.len() as u64;
            }
            chunks.push(ChunkEntry {
                hash,
                len: data.len() as u32,
                zero,
            });
            progress(off + data.len() as u64);
            Ok(())
        })
        .map_err(|e| match e {
            chunker::ChunkError::Sink(s) => s,
            other => StoreError::Chunking {
                path: path.to_path_buf(),
                source: other.to_string().into(),
            },
        })?;
        let idx = PartIndex {
            size,
            content_hash: whole.finalize().into(),
            chunker: spec,
            chunks,
        };
        self.commit_part(&idx)?;
        Ok((idx, stats))
    }

    /// Stores a manifest (validated) and points `name` at it. Returns the manifest hash.
    pub fn put_manifest(&self, m: &Manifest) -> Result<Hash, StoreError> {
        self.put_manifest_with(m, true).map(|(h, _)| h)
    }

    /// Stores a manifest (validated) and points its name at it; without `replace`, only if no
    /// image has that name ([`StoreError::NameExists`]; decided by one `link`, so of two
    /// writers of a new name one wins and the other is told). Returns the manifest hash and,
    /// with `replace`, the one the name pointed at before.
    pub fn put_manifest_with(
        &self,
        m: &Manifest,
        replace: bool,
    ) -> Result<(Hash, Option<Hash>), StoreError> {
        let mpath = self.root.join("manifests");
        m.validate().map_err(|source| StoreError::Manifest {
            path: mpath.clone(),
            source,
        })?;
        let bytes = m.to_json();
        let h = Hash::of(&bytes);
        write_atomic(
            &self.tmp_dir(),
            &mpath.join(format!("{h}.json")),
            &bytes,
            true,
        )?;
        let names = self.root.join("names");
        let name = names.join(&m.name);
        let before = fs::read_to_string(&name)
            .ok()
            .and_then(|t| t.trim().parse::<Hash>().ok());
        if replace {
            write_atomic(&self.tmp_dir(), &name, h.to_hex().as_bytes(), true)?;
            return Ok((h, before));
        }
        let tmp = tmp_path(&self.tmp_dir());
        let linked = (|| {
            let mut f = File::create(&tmp).map_err(io_err("creating", &tmp))?;
            f.write_all(h.to_hex().as_bytes())
                .and_then(|()| f.sync_all())
                .map_err(io_err("writing", &tmp))?;
            fs::hard_link(&tmp, &name).map_err(|e| {
                if e.kind() == io::ErrorKind::AlreadyExists {
                    StoreError::NameExists(m.name.clone())
                } else {
                    io_err("linking into place", &name)(e)
                }
            })
        })();
        let _ = fs::remove_file(&tmp);
        linked?;
        sync_dir(&names)?;
        Ok((h, None))
    }

    /// What `images` tells about one name: read from its manifest, and whether each part is
    /// committed here. A manifest that cannot be read gives an entry with its `problem`.
    pub fn image_entry(&self, name: &str, h: Hash) -> ImageEntry {
        let mut e = ImageEntry {
            name: name.to_string(),
            manifest: h,
            virtual_size: 0,
            bytes: 0,
            parts: 0,
            complete: false,
            problem: None,
        };
        match self.manifest(&h) {
            Ok(m) => {
                e.virtual_size = m.top().map_or(0, |p| p.virtual_size);
                e.bytes = m.parts.iter().map(|p| p.size).sum();
                e.parts = m.parts.len();
                e.complete = m.parts.iter().all(|p| self.has_part(&p.id));
            }
            Err(err) => {
                // Bounded, so an entry always fits a control frame.
                let msg = viola_common::errors::chain(&err);
                e.problem = Some(msg.chars().take(512).collect());
            }
        }
        e
    }

    /// The manifest with this hash.
    pub fn manifest(&self, h: &Hash) -> Result<Manifest, StoreError> {
        let path = self.root.join("manifests").join(format!("{h}.json"));
        let bytes = fs::read(&path).map_err(io_err("reading manifest", &path))?;
        if Hash::of(&bytes) != *h {
            return Err(StoreError::Manifest {
                path,
                source: ManifestError::HashMismatch,
            });
        }
        Manifest::from_json(&bytes).map_err(|source| StoreError::Manifest { path, source })
    }

    /// Resolves an image name or a manifest hash.
    pub fn resolve(&self, name_or_hash: &str) -> Result<(Hash, Manifest), StoreError> {
        if let Ok(h) = name_or_hash.parse::<Hash>() {
            return Ok((h, self.manifest(&h)?));
        }
        crate::manifest::validate_name(name_or_hash).map_err(|source| StoreError::Manifest {
            path: PathBuf::from(name_or_hash),
            source,
        })?;
        let path = self.root.join("names").join(name_or_hash);
        let text = match fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(StoreError::NoSuchImage(name_or_hash.to_string()));
            }
            Err(e) => {
                return Err(io_err("reading", &path)(e));
            }
        };
        let h: Hash = text
            .trim()
            .parse()
            .map_err(|_| StoreError::NoSuchImage(name_or_hash.to_string()))?;
        Ok((h, self.manifest(&h)?))
    }

    /// All (name, manifest hash) pairs.
    pub fn images(&self) -> Result<Vec<(String, Hash)>, StoreError> {
        let d = self.root.join("names");
        let mut out = Vec::new();
        for e in fs::read_dir(&d).map_err(io_err("listing", &d))? {
            let e = e.map_err(io_err("listing", &d))?;
            let name = e.file_name().to_string_lossy().into_owned();
            if let Ok(t) = fs::read_to_string(e.path())
                && let Ok(h) = t.trim().parse()
            {
                out.push((name, h));
            }
        }
        out.sort();
        Ok(out)
    }

    fn manifest_hashes(&self) -> Result<Vec<(PathBuf, Option<Hash>)>, StoreError> {
        let d = self.root.join("manifests");
        let mut out = Vec::new();
        for e in fs::read_dir(&d).map_err(io_err("listing", &d))? {
            let e = e.map_err(io_err("listing", &d))?;
            let h = e
                .file_name()
                .to_string_lossy()
                .strip_suffix(".json")
                .and_then(|s| s.parse().ok());
            out.push((e.path(), h));
        }
        Ok(out)
    }

    /// Removes what no named image and no in-progress fetch references. Manifests not named
    /// any more go first, then parts no manifest lists, then chunks no part lists. Chunks
    /// younger than `grace` are spared (a concurrent fetch may not have recorded them yet).
    pub fn gc(&self, grace: Duration) -> Result<GcReport, StoreError> {
        let lock_path = self.root.join("gc.lock");
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io_err("opening", &lock_path))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => return Err(StoreError::Locked),
            Err(fs::TryLockError::Error(e)) => {
                return Err(io_err("locking", &lock_path)(e));
            }
        }
        let mut report = GcReport::default();
        let named: HashSet<Hash> = self.images()?.into_iter().map(|(_, h)| h).collect();
        let mut live_parts = HashSet::new();
        for (path, h) in self.manifest_hashes()? {
            match h {
                Some(h) if named.contains(&h) => {
                    let m = self.manifest(&h)?;
                    live_parts.extend(m.parts.iter().map(|p| p.id));
                }
                _ => {
                    if young(&path, grace) {
                        continue;
                    }
                    fs::remove_file(&path).map_err(io_err("removing", &path))?;
                }
            }
        }
        let mut live_chunks = HashSet::new();
        for id in self.parts()? {
            if live_parts.contains(&id) || young(&self.part_path(&id), grace) {
                report.kept_parts += 1;
                live_chunks.extend(self.part_index(&id)?.chunks.iter().map(|c| c.hash));
            } else {
                let p = self.part_path(&id);
                fs::remove_file(&p).map_err(io_err("removing", &p))?;
                report.removed_parts += 1;
            }
        }
        for id in self.partials()? {
            let p = self.partial_path(&id);
            if self.has_part(&id) {
                let _ = fs::remove_file(&p);
                report.removed_partials += 1;
                continue;
            }
            match self.partial_index(&id) {
                Ok(Some(idx)) => live_chunks.extend(idx.chunks.iter().map(|c| c.hash)),
                _ => {
                    let _ = fs::remove_file(&p);
                    report.removed_partials += 1;
                }
            }
        }
        self.for_each_chunk_file(|e| {
            let live = e
                .file_name()
                .to_string_lossy()
                .parse::<Hash>()
                .is_ok_and(|h| live_chunks.contains(&h));
            if live {
                report.kept_chunks += 1;
            } else if young(&e.path(), grace) {
                report.spared_young_chunks += 1;
            } else {
                let len = e.metadata().map(|m| m.len()).unwrap_or(0);
                fs::remove_file(e.path()).map_err(io_err("removing", &e.path()))?;
                report.removed_chunks += 1;
                report.removed_bytes += len;
            }
            Ok(())
        })?;
        Ok(report)
    }

    /// Re-hashes every chunk and re-checks every index and manifest. With `repair`, corrupt
    /// chunks are deleted (so a later fetch replaces them) instead of only reported.
    pub fn scrub(
        &self,
        repair: bool,
        mut progress: impl FnMut(u64),
    ) -> Result<ScrubReport, StoreError> {
        let mut report = ScrubReport::default();
        let mut buf = Vec::new();
        self.for_each_chunk_file(|e| {
            let Ok(h) = e.file_name().to_string_lossy().parse::<Hash>() else {
                return Ok(());
            };
            buf.clear();
            File::open(e.path())
                .and_then(|mut f| f.read_to_end(&mut buf))
                .map_err(io_err("reading", &e.path()))?;
            report.chunks_checked += 1;
            report.bytes_checked += buf.len() as u64;
            progress(report.bytes_checked);
            if Hash::of(&buf) != h {
                report.corrupt_chunks.push(h);
                if repair {
                    fs::remove_file(e.path()).map_err(io_err("removing", &e.path()))?;
                }
            }
            Ok(())
        })?;
        let corrupt: HashSet<Hash> = report.corrupt_chunks.iter().copied().collect();
        for id in self.parts()? {
            report.parts_checked += 1;
            match self.part_index(&id) {
                Ok(idx) => {
                    let damaged = idx.chunks.iter().any(|c| {
                        !c.zero && (corrupt.contains(&c.hash) || !self.has_chunk(&c.hash))
                    });
                    if damaged {
                        report.damaged_parts.push(id);
                        if repair {
                            // Demote to partial: its good chunks stay, a fetch completes it.
                            self.begin_partial(&idx)?;
                            let p = self.part_path(&id);
                            fs::remove_file(&p).map_err(io_err("removing", &p))?;
                        }
                    }
                }
                Err(_) => report.bad_indexes.push(self.part_path(&id)),
            }
        }
        for (path, h) in self.manifest_hashes()? {
            let ok = h.is_some_and(|h| self.manifest(&h).is_ok());
            if !ok {
                report.bad_manifests.push(path);
            }
        }
        Ok(report)
    }

    /// Calls `visit` with every chunk file (`chunks/<prefix>/<hash>`) until it fails; a
    /// directory that cannot be listed fails too.
    fn for_each_chunk_file(
        &self,
        mut visit: impl FnMut(fs::DirEntry) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        let chunks_dir = self.root.join("chunks");
        for sub in fs::read_dir(&chunks_dir)
            .map_err(io_err("listing", &chunks_dir))?
            .flatten()
        {
            for e in fs::read_dir(sub.path())
                .map_err(io_err("listing", &sub.path()))?
                .flatten()
            {
                visit(e)?;
            }
        }
        Ok(())
    }

    /// Total bytes of chunk files.
    pub fn chunk_bytes(&self) -> Result<(usize, u64), StoreError> {
        let chunks_dir = self.root.join("chunks");
        let (mut n, mut bytes) = (0usize, 0u64);
        for sub in fs::read_dir(&chunks_dir)
            .map_err(io_err("listing", &chunks_dir))?
            .flatten()
        {
            for e in fs::read_dir(sub.path()).into_iter().flatten().flatten() {
                n += 1;
                bytes += e.metadata().map(|m| m.len()).unwrap_or(0);
            }
        }
        Ok((n, bytes))
    }
}

fn young(path: &Path, grace: Duration) -> bool {
    if grace.is_zero() {
        return false;
    }
    fs::metadata(path)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| SystemTime::now().duration_since(t).ok())
        .is_some_and(|age| age < grace)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::{DiskFormat, MANIFEST_VERSION, OverlaySpec, PartRef};
    use crate::scenario_gen::pseudo_random_bytes as pseudo_random;

    fn assert_no_temp_file(store: &Store) {
        assert!(
            fs::read_dir(store.tmp_dir()).unwrap().next().is_none(),
            "no temp file left behind"
        );
    }

    fn import(store: &Store, dir: &Path, name: &str, data: &[u8]) -> PartIndex {
        let p = dir.join(name);
        fs::write(&p, data).unwrap();
        store
            .import_file(
                &p,
                ChunkerSpec::FastCdc {
                    min: 1024,
                    avg: 4096,
                    max: 16384,
                },
                |_| {},
            )
            .unwrap()
            .0
    }

    fn manifest_for(name: &str, idx: &PartIndex) -> Manifest {
        Manifest {
            version: MANIFEST_VERSION,
            name: name.into(),
            parts: vec![PartRef {
                id: idx.id(),
                size: idx.size,
                format: DiskFormat::Raw,
                virtual_size: idx.size.max(1),
                backing: None,
                label: String::new(),
            }],
            overlay: OverlaySpec::default(),
        }
    }

    #[test]
    fn import_dedups_zero_holes_and_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path().join("s")).unwrap();
        let mut data = pseudo_random(100_000, 1);
        data.extend(vec![0u8; 50_000]);
        data.extend(pseudo_random(100_000, 1));
        let idx = import(&store, dir.path(), "a.raw", &data);
        assert_eq!(idx.content_hash, Hash::of(&data));
        assert!(
            idx.chunks.iter().any(|c| c.zero),
            "the zero run becomes hole chunks"
        );
        let (_, stored) = store.chunk_bytes().unwrap();
        assert!(
            stored < 150_000,
            "the repeated 100 kB is stored once, zeros not at all: {stored}"
        );
        let mut back = Vec::new();
        for (c, bytes) in store.read_part_range(&idx, 0..idx.chunks.len()).unwrap() {
            if c.zero {
                back.extend(vec![0u8; c.len as usize]);
            } else {
                back.extend(bytes);
            }
        }
        assert_eq!(back, data);
        assert_eq!(store.part_index(&idx.id()).unwrap(), idx);
    }

    #[test]
    fn gc_keeps_named_and_partial_parts_and_removes_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path().join("s")).unwrap();
        let keep = import(&store, dir.path(), "keep", &pseudo_random(60_000, 2));
        let drop = import(&store, dir.path(), "drop", &pseudo_random(60_000, 3));
        let partial = PartIndex {
            ..import(&store, dir.path(), "partial", &pseudo_random(30_000, 4))
        };
        store.put_manifest(&manifest_for("keep", &keep)).unwrap();
        // The third part is only being fetched: demote it to partial.
        store.begin_partial(&partial).unwrap();
        fs::remove_file(store.part_path(&partial.id())).unwrap();
        let report = store.gc(Duration::ZERO).unwrap();
        assert!(
            report.removed_parts >= 1 && report.removed_chunks > 0,
            "{report:?}"
        );
        assert!(store.has_part(&keep.id()));
        assert!(!store.has_part(&drop.id()));
        assert!(store.missing_chunks(&keep).is_empty());
        assert!(
            store.missing_chunks(&partial).is_empty(),
            "chunks of an in-progress fetch survive"
        );
        assert!(drop.chunks.iter().all(|c| c.zero
            || !store.has_chunk(&c.hash)
            || keep.chunks.iter().any(|k| k.hash == c.hash)));
        // Nothing left to collect the second time.
        assert_eq!(store.gc(Duration::ZERO).unwrap().removed_chunks, 0);
    }

    #[test]
    fn gc_spares_young_unreferenced_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path().join("s")).unwrap();
        let data = pseudo_random(5000, 9);
        store.put_chunk(&Hash::of(&data), &data).unwrap();
        let r = store.gc(Duration::from_secs(600)).unwrap();
        assert_eq!((r.removed_chunks, r.spared_young_chunks), (0, 1));
        assert_eq!(store.gc(Duration::ZERO).unwrap().removed_chunks, 1);
    }

    #[test]
    fn scrub_finds_and_repairs_a_flipped_bit() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path().join("s")).unwrap();
        let idx = import(&store, dir.path(), "x", &pseudo_random(80_000, 5));
        store.put_manifest(&manifest_for("x", &idx)).unwrap();
        assert!(
            store
                .scrub(false, |_| {})
                .unwrap()
                .corrupt_chunks
                .is_empty()
        );
        let victim = idx.chunks[1].hash;
        let path = store.chunk_path(&victim);
        let mut bytes = fs::read(&path).unwrap();
        bytes[7] ^= 0x10;
        fs::write(&path, bytes).unwrap();
        assert!(
            matches!(store.read_chunk(&victim), Err(StoreError::CorruptChunk(h)) if h == victim)
        );
        let r = store.scrub(true, |_| {}).unwrap();
        assert_eq!(r.corrupt_chunks, vec![victim]);
        assert_eq!(r.damaged_parts, vec![idx.id()]);
        assert!(
            !store.has_part(&idx.id()),
            "a damaged part is demoted to partial"
        );
        assert_eq!(store.partial_index(&idx.id()).unwrap(), Some(idx.clone()));
        assert_eq!(store.missing_chunks(&idx), vec![1]);
    }

    #[test]
    fn commit_refuses_an_index_with_missing_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path().join("s")).unwrap();
        let data = pseudo_random(1000, 6);
        let idx = PartIndex {
            size: 1000,
            content_hash: Hash::of(&data),
            chunker: ChunkerSpec::Fixed { size: 4096 },
            chunks: vec![ChunkEntry {
                hash: Hash::of(&data),
                len: 1000,
                zero: false,
            }],
        };
        assert!(matches!(
            store.commit_part(&idx),
            Err(StoreError::MissingChunk { .. })
        ));
        assert!(!store.has_part(&idx.id()));
        assert_no_temp_file(&store);
    }

    #[test]
    fn a_name_is_taken_once_unless_replacing() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path().join("s")).unwrap();
        let idx = import(&store, dir.path(), "x", &pseudo_random(20_000, 7));
        let first = manifest_for("x", &idx);
        let mut second = first.clone();
        second.parts[0].label = "again".into();
        let (h1, before) = store.put_manifest_with(&first, false).unwrap();
        assert_eq!(before, None);
        assert!(matches!(
            store.put_manifest_with(&second, false),
            Err(StoreError::NameExists(n)) if n == "x"
        ));
        assert_eq!(store.resolve("x").unwrap().0, h1, "the name is unchanged");
        let (h2, before) = store.put_manifest_with(&second, true).unwrap();
        assert_eq!(before, Some(h1));
        assert_eq!(store.resolve("x").unwrap().0, h2);
        assert_no_temp_file(&store);
    }

    #[test]
    fn a_stopped_import_commits_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path().join("s")).unwrap();
        let p = dir.path().join("big");
        fs::write(&p, pseudo_random(200_000, 8)).unwrap();
        let stop = AtomicBool::new(true);
        let r = store.import_file_until(&p, ChunkerSpec::Fixed { size: 4096 }, |_| {}, &stop);
        assert!(matches!(r, Err(StoreError::Cancelled)), "{r:?}");
        assert!(store.parts().unwrap().is_empty());
    }

    #[test]
    fn resolve_rejects_traversal_and_unknown_names() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path().join("s")).unwrap();
        assert!(matches!(
            store.resolve("../../etc/passwd"),
            Err(StoreError::Manifest { .. })
        ));
        assert!(matches!(
            store.resolve("nope"),
            Err(StoreError::NoSuchImage(_))
        ));
    }
}
