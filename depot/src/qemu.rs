//! The few `qemu-img` calls the depot needs, with their output parsed.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde::Deserialize;

use crate::manifest::DiskFormat;

/// A failed `qemu-img` call.
#[derive(Debug, thiserror::Error)]
pub enum QemuImgError {
    #[error("running qemu-img {args}")]
    Spawn {
        args: String,
        #[source]
        source: std::io::Error,
    },
    #[error("qemu-img {args} failed: {stderr}")]
    Failed { args: String, stderr: String },
    #[error("qemu-img info output for {path} not understood: {detail}")]
    Parse { path: PathBuf, detail: String },
    #[error("{path} has format {format:?}; the depot handles qcow2 and raw")]
    Format { path: PathBuf, format: String },
}

fn run(args: &[&str]) -> Result<String, QemuImgError> {
    Pending::spawn(args)?.wait()
}

/// A `qemu-img` call running in the background, so independent checks overlap each other and
/// the caller's own work.
pub struct Pending {
    args: String,
    child: Option<std::process::Child>,
}

impl Drop for Pending {
    /// A call abandoned on an error path is still reaped (no zombies in the daemon).
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.wait();
        }
    }
}

impl Pending {
    fn spawn(args: &[&str]) -> Result<Self, QemuImgError> {
        let shown = args.join(" ");
        let child = Command::new("qemu-img")
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|source| QemuImgError::Spawn {
                args: shown.clone(),
                source,
            })?;
        Ok(Self {
            args: shown,
            child: Some(child),
        })
    }

    /// Waits for the call; its stdout if it succeeded.
    pub fn wait(mut self) -> Result<String, QemuImgError> {
        let Some(child) = self.child.take() else {
            return Ok(String::new());
        };
        let out = child
            .wait_with_output()
            .map_err(|source| QemuImgError::Spawn {
                args: self.args.clone(),
                source,
            })?;
        if !out.status.success() {
            return Err(QemuImgError::Failed {
                args: self.args.clone(),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

#[derive(Deserialize)]
struct RawInfo {
    filename: String,
    format: String,
    #[serde(rename = "virtual-size")]
    virtual_size: u64,
    #[serde(rename = "backing-filename")]
    backing_filename: Option<String>,
    #[serde(rename = "full-backing-filename")]
    full_backing_filename: Option<String>,
    #[serde(rename = "backing-filename-format")]
    backing_format: Option<String>,
    #[serde(rename = "format-specific")]
    format_specific: Option<serde_json::Value>,
}

/// What `qemu-img info` says about one image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageInfo {
    pub path: PathBuf,
    pub format: DiskFormat,
    pub virtual_size: u64,
    /// The backing file name as written in the header.
    pub backing: Option<String>,
    /// The backing file resolved against the image's directory.
    pub full_backing: Option<PathBuf>,
    pub backing_format: Option<String>,
    /// qcow2 with an external data file (never accepted: it points outside the image).
    pub has_data_file: bool,
}

fn convert(raw: RawInfo) -> Result<ImageInfo, QemuImgError> {
    let path = PathBuf::from(&raw.filename);
    let format = match raw.format.as_str() {
        "qcow2" => DiskFormat::Qcow2,
        "raw" => DiskFormat::Raw,
        other => {
            return Err(QemuImgError::Format {
                path,
                format: other.to_string(),
            });
        }
    };
    let has_data_file = raw
        .format_specific
        .as_ref()
        .and_then(|v| v.pointer("/data/data-file"))
        .is_some();
    Ok(ImageInfo {
        path,
        format,
        virtual_size: raw.virtual_size,
        backing: raw.backing_filename,
        full_backing: raw.full_backing_filename.map(PathBuf::from),
        backing_format: raw.backing_format,
        has_data_file,
    })
}

/// `qemu-img info` of one image (without opening its backing chain).
pub fn info(path: &Path) -> Result<ImageInfo, QemuImgError> {
    spawn_info(path)?.wait()
}

/// [`info`] started in the background.
pub fn spawn_info(path: &Path) -> Result<PendingInfo, QemuImgError> {
    let p = path.to_string_lossy();
    Ok(PendingInfo {
        path: path.to_path_buf(),
        call: Pending::spawn(&["info", "-U", "--output=json", &p])?,
    })
}

/// `qemu-img info` of one image read as `format`: qemu does not probe the format (a file
/// whose first bytes look like another format is not opened as that format) and, as `info`
/// always does, does not open a backing file.
pub fn info_as(path: &Path, format: DiskFormat) -> Result<ImageInfo, QemuImgError> {
    let p = path.to_string_lossy();
    let call = Pending::spawn(&["info", "-U", "-f", format.as_str(), "--output=json", &p])?;
    PendingInfo {
        path: path.to_path_buf(),
        call,
    }
    .wait()
}

/// How many first bytes of a file qemu looks at to probe its format (`BLOCK_PROBE_BUF_SIZE`).
pub const PROBE_LEN: usize = 2048;

/// The image format other than qcow2 and raw that qemu's probing would take a file starting
/// with `head` for, if any: every format with a probe in qemu's block drivers (`qcow`, `qed`,
/// `vmdk` binary and text descriptor, `vdi`, `vpc`, `vhdx`, `cloop`, `bochs`, `parallels`,
/// `luks`; `dmg` goes by the file name's extension only). Several of them name other files
/// (backing files, extents), and a file that only *contains* such bytes, stored as raw, would
/// still be opened as that format by anything that probes it later.
pub fn foreign_signature(head: &[u8]) -> Option<&'static str> {
    let starts = |magic: &[u8]| head.starts_with(magic);
    let qcow_version = head
        .get(4..8)
        .map(|v| u32::from_be_bytes([v[0], v[1], v[2], v[3]]));
    if starts(b"QFI\xfb") && qcow_version != Some(2) && qcow_version != Some(3) {
        return Some("qcow (version 1) or an unknown qcow2 version");
    }
    let table: [(&[u8], &'static str); 10] = [
        (b"QED\0", "qed"),
        (b"KDMV", "vmdk"),
        (b"COWD", "vmdk (ESX COWD)"),
        (b"conectix", "vpc"),
        (b"vhdxfile", "vhdx"),
        (b"#!/bin/sh\n#V2.0 Format\n", "cloop"),
        (b"Bochs Virtual HD Image", "bochs"),
        (b"WithoutFreeSpace", "parallels"),
        (b"WithouFreSpacExt", "parallels"),
        (b"LUKS\xba\xbe", "luks"),
    ];
    if let Some((_, name)) = table.iter().find(|(magic, _)| starts(magic)) {
        return Some(name);
    }
    // vdi: the signature is at offset 64, little-endian.
    if head.get(64..68) == Some(&[0x7f, 0x10, 0xda, 0xbe][..]) {
        return Some("vdi");
    }
    vmdk_descriptor(&head[..head.len().min(PROBE_LEN)]).then_some("vmdk (text descriptor)")
}

/// qemu's `vmdk_probe` for a text descriptor: comment lines and blank lines of spaces, then a
/// line `version=1`, `2` or `3`.
fn vmdk_descriptor(buf: &[u8]) -> bool {
    let mut p = 0;
    while p < buf.len() {
        match buf[p] {
            b'#' => {
                while p < buf.len() && buf[p] != b'\n' {
                    p += 1;
                }
                p += 1;
            }
            b' ' => {
                while p < buf.len() && buf[p] == b' ' {
                    p += 1;
                }
                if p < buf.len() && buf[p] == b'\r' {
                    p += 1;
                }
                if p == buf.len() || buf[p] != b'\n' {
                    return false;
                }
                p += 1;
            }
            _ => {
                let rest = &buf[p..];
                return [b'1', b'2', b'3'].iter().any(|v| {
                    let line = [b"version=".as_slice(), &[*v]].concat();
                    rest.starts_with(&[line.as_slice(), b"\n"].concat())
                        || rest.starts_with(&[line.as_slice(), b"\r\n"].concat())
                });
            }
        }
    }
    false
}

/// A background `qemu-img info`.
pub struct PendingInfo {
    path: PathBuf,
    call: Pending,
}

impl PendingInfo {
    pub fn wait(self) -> Result<ImageInfo, QemuImgError> {
        let out = self.call.wait()?;
        let raw: RawInfo = serde_json::from_str(&out).map_err(|e| QemuImgError::Parse {
            path: self.path,
            detail: e.to_string(),
        })?;
        convert(raw)
    }
}

/// The whole backing chain of an image, top first.
pub fn chain(path: &Path) -> Result<Vec<ImageInfo>, QemuImgError> {
    let p = path.to_string_lossy();
    let out = run(&["info", "-U", "--backing-chain", "--output=json", &p])?;
    let raw: Vec<RawInfo> = serde_json::from_str(&out).map_err(|e| QemuImgError::Parse {
        path: path.to_path_buf(),
        detail: e.to_string(),
    })?;
    raw.into_iter().map(convert).collect()
}

/// Rewrites the backing file name without touching data (`rebase -u`).
pub fn rebase_unsafe(
    image: &Path,
    backing: &str,
    backing_format: DiskFormat,
) -> Result<(), QemuImgError> {
    run(&[
        "rebase",
        "-u",
        "-f",
        "qcow2",
        "-b",
        backing,
        "-F",
        backing_format.as_str(),
        &image.to_string_lossy(),
    ])
    .map(drop)
}

/// Starts creating a qcow2 overlay of `virtual_size` bytes on `backing` in the background.
/// The backing file is not opened (`-u`): the caller checks the finished chain with [`check`],
/// so creation can overlap laying the chain down.
pub fn spawn_create_overlay(
    overlay: &Path,
    backing: &Path,
    backing_format: DiskFormat,
    cluster_size: Option<u32>,
    virtual_size: u64,
) -> Result<Pending, QemuImgError> {
    let b = backing.to_string_lossy();
    let o = overlay.to_string_lossy();
    let cluster = cluster_size.map(|c| format!("cluster_size={c}"));
    let size = virtual_size.to_string();
    let mut args = vec![
        "create",
        "-q",
        "-u",
        "-f",
        "qcow2",
        "-b",
        &b,
        "-F",
        backing_format.as_str(),
    ];
    if let Some(c) = &cluster {
        args.extend(["-o", c.as_str()]);
    }
    args.extend([o.as_ref(), size.as_str()]);
    Pending::spawn(&args)
}

/// `qemu-img check` of a qcow2 image (raw images have nothing to check). It checks the
/// metadata of this one image only (not its backing files), but fails if the chain cannot be
/// opened.
pub fn check(image: &Path) -> Result<(), QemuImgError> {
    spawn_check(image)?.wait().map(drop)
}

/// [`check`] started in the background; `wait` gives its (quiet) output.
pub fn spawn_check(image: &Path) -> Result<Pending, QemuImgError> {
    Pending::spawn(&["check", "-q", "-U", "-f", "qcow2", &image.to_string_lossy()])
}

/// What a qcow2 header says about where the image's data comes from, parsed from its bytes the
/// way qemu's qcow2 driver reads them (header, backing file name, header extensions).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Qcow2Header {
    pub version: u32,
    pub cluster_size: u64,
    pub virtual_size: u64,
    pub backing: Option<String>,
    pub backing_format: Option<String>,
    /// An external data file is named or required (never accepted by the depot).
    pub data_file: bool,
}

/// A qcow2 header that cannot be read (or that qemu itself would refuse to open).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("qcow2 header: {0}")]
pub struct Qcow2HeaderError(pub &'static str);

const QCOW2_EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
const QCOW2_EXT_DATA_FILE: u32 = 0x4441_5441;
const QCOW2_INCOMPAT_DATA_FILE: u64 = 1 << 2;

/// Parses the qcow2 header at the start of `head` (the image's first bytes: at least its first
/// cluster, or the whole image if it is shorter). Hostile input only yields errors.
pub fn parse_qcow2_header(head: &[u8]) -> Result<Qcow2Header, Qcow2HeaderError> {
    let e = Qcow2HeaderError;
    let be32 = |o: usize| -> Result<u32, Qcow2HeaderError> {
        head.get(o..o + 4)
            .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
            .ok_or(e("truncated"))
    };
    let be64 = |o: usize| -> Result<u64, Qcow2HeaderError> {
        let hi = u64::from(be32(o)?);
        Ok(hi << 32 | u64::from(be32(o + 4)?))
    };
    if head.get(..4) != Some(b"QFI\xfb".as_slice()) {
        return Err(e("not a qcow2 image (bad magic)"));
    }
    let version = be32(4)?;
    if version != 2 && version != 3 {
        return Err(e("unsupported qcow2 version"));
    }
    let backing_offset = be64(8)?;
    let backing_len = be32(16)?;
    let cluster_bits = be32(20)?;
    if !(9..=21).contains(&cluster_bits) {
        return Err(e("cluster size out of range"));
    }
    let cluster_size = 1u64 << cluster_bits;
    let virtual_size = be64(24)?;
    let (header_len, incompatible) = if version == 3 {
        (u64::from(be32(100)?), be64(72)?)
    } else {
        (72, 0)
    };
    if header_len < if version == 3 { 104 } else { 72 } || header_len > cluster_size {
        return Err(e("bad header length"));
    }
    let backing = if backing_offset == 0 {
        None
    } else {
        // qemu's limits: the name is at most 1023 bytes and inside the first cluster.
        let end = backing_offset
            .checked_add(u64::from(backing_len))
            .ok_or(e("backing file name out of range"))?;
        if backing_len > 1023 || end > cluster_size || end > head.len() as u64 {
            return Err(e("backing file name out of range"));
        }
        let name = &head[backing_offset as usize..end as usize];
        Some(
            std::str::from_utf8(name)
                .map_err(|_| e("backing file name is not UTF-8"))?
                .to_string(),
        )
    };
    // Header extensions run from the end of the header to the backing file name (or the end
    // of the first cluster), as in qemu.
    let ext_end = if backing_offset != 0 {
        backing_offset
    } else {
        cluster_size
    }
    .min(head.len() as u64) as usize;
    let mut backing_format = None;
    let mut data_file = incompatible & QCOW2_INCOMPAT_DATA_FILE != 0;
    let mut at = header_len as usize;
    while at + 8 <= ext_end {
        let (kind, len) = (be32(at)?, be32(at + 4)? as usize);
        at += 8;
        if kind == 0 {
            break;
        }
        if len > ext_end - at {
            return Err(e("header extension runs past its area"));
        }
        let data = &head[at..at + len];
        match kind {
            QCOW2_EXT_BACKING_FORMAT => {
                if len >= 16 {
                    return Err(e("backing format name too long"));
                }
                backing_format = Some(
                    std::str::from_utf8(data)
                        .map_err(|_| e("backing format is not UTF-8"))?
                        .to_string(),
                );
            }
            QCOW2_EXT_DATA_FILE => data_file = true,
            _ => {}
        }
        at += len.div_ceil(8) * 8;
    }
    Ok(Qcow2Header {
        version,
        cluster_size,
        virtual_size,
        backing,
        backing_format,
        data_file,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn other_formats_are_recognised_by_their_first_bytes() {
        let mut qcow2 = b"QFI\xfb\0\0\0\x03".to_vec();
        qcow2.resize(4096, 0);
        assert_eq!(foreign_signature(&qcow2), None);
        qcow2[7] = 1;
        assert!(foreign_signature(&qcow2).unwrap().starts_with("qcow"));
        assert_eq!(foreign_signature(&[0u8; 4096]), None);
        assert_eq!(foreign_signature(b"hello, raw world\n"), None);
        assert_eq!(foreign_signature(b"KDMV\x01\0\0\0"), Some("vmdk"));
        assert_eq!(foreign_signature(b"conectix\0\0"), Some("vpc"));
        let mut vdi = vec![b'<'; 64];
        vdi.extend([0x7f, 0x10, 0xda, 0xbe]);
        assert_eq!(foreign_signature(&vdi), Some("vdi"));
        // qemu's vmdk text probe: comments and lines of spaces, then `version=N`.
        let desc = b"# Disk DescriptorFile\n   \r\nversion=1\r\nRW 1 FLAT \"/etc/shadow\" 0\n";
        assert_eq!(foreign_signature(desc), Some("vmdk (text descriptor)"));
        assert_eq!(foreign_signature(b"#c\nversion=4\n"), None);
        assert_eq!(
            foreign_signature(b"#c\n\nversion=1\n"),
            None,
            "qemu stops at an empty line"
        );
    }
}
