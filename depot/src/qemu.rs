//! The few `qemu-img` calls the depot needs, with their output parsed.

use std::path::{Path, PathBuf};
use std::process::Command;

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
    let shown = args.join(" ");
    let out = Command::new("qemu-img")
        .args(args)
        .output()
        .map_err(|source| QemuImgError::Spawn {
            args: shown.clone(),
            source,
        })?;
    if !out.status.success() {
        return Err(QemuImgError::Failed {
            args: shown,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
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
    let p = path.to_string_lossy();
    let out = run(&["info", "-U", "--output=json", &p])?;
    let raw: RawInfo = serde_json::from_str(&out).map_err(|e| QemuImgError::Parse {
        path: path.to_path_buf(),
        detail: e.to_string(),
    })?;
    convert(raw)
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

/// Creates a qcow2 overlay on `backing`.
pub fn create_overlay(
    overlay: &Path,
    backing: &Path,
    backing_format: DiskFormat,
    cluster_size: Option<u32>,
) -> Result<(), QemuImgError> {
    let b = backing.to_string_lossy();
    let o = overlay.to_string_lossy();
    let cluster = cluster_size.map(|c| format!("cluster_size={c}"));
    let mut args = vec![
        "create",
        "-q",
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
    args.push(&o);
    run(&args).map(drop)
}

/// `qemu-img check` of a qcow2 image (raw images have nothing to check).
pub fn check(image: &Path) -> Result<(), QemuImgError> {
    run(&["check", "-q", "-U", "-f", "qcow2", &image.to_string_lossy()]).map(drop)
}
