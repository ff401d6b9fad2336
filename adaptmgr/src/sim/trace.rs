//! Reading PlanetLab-format workload folders: one file per VM, one integer CPU percentage per
//! line, one line per 5-minute interval.

use std::path::{Path, PathBuf};

/// One VM's workload.
#[derive(Debug, Clone, PartialEq)]
pub struct VmTrace {
    pub name: String,
    /// CPU demand as a fraction of the VM's size, one sample per interval.
    pub utilization: Vec<f64>,
}

#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    #[error("cannot list trace folder {path}")]
    ListDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read trace file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}:{line}: not a CPU percentage: {text:?}")]
    Parse {
        path: PathBuf,
        line: usize,
        text: String,
    },
    #[error("{path}: value {value} on line {line} is outside 0..=100")]
    OutOfRange {
        path: PathBuf,
        line: usize,
        value: i64,
    },
    #[error("trace folder {path} holds no trace files")]
    Empty { path: PathBuf },
}

/// Parses one trace file's text. Blank lines are skipped.
pub fn parse_trace(path: &Path, text: &str) -> Result<Vec<f64>, TraceError> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let t = line.trim();
        if t.is_empty() {
            continue;
        }
        let value: i64 = t.parse().map_err(|_| TraceError::Parse {
            path: path.to_path_buf(),
            line: i + 1,
            text: t.chars().take(40).collect(),
        })?;
        if !(0..=100).contains(&value) {
            return Err(TraceError::OutOfRange {
                path: path.to_path_buf(),
                line: i + 1,
                value,
            });
        }
        out.push(value as f64 / 100.0);
    }
    Ok(out)
}

/// Loads every regular file of `dir` in name order (so VM `i` is the `i`-th name).
pub fn load_dir(dir: &Path) -> Result<Vec<VmTrace>, TraceError> {
    let entries = std::fs::read_dir(dir).map_err(|source| TraceError::ListDir {
        path: dir.to_path_buf(),
        source,
    })?;
    let mut paths = Vec::new();
    for e in entries {
        let e = e.map_err(|source| TraceError::ListDir {
            path: dir.to_path_buf(),
            source,
        })?;
        let p = e.path();
        if p.is_file() {
            paths.push(p);
        }
    }
    paths.sort();
    if paths.is_empty() {
        return Err(TraceError::Empty {
            path: dir.to_path_buf(),
        });
    }
    paths
        .into_iter()
        .map(|p| {
            let text = std::fs::read_to_string(&p).map_err(|source| TraceError::Read {
                path: p.clone(),
                source,
            })?;
            let utilization = parse_trace(&p, &text)?;
            let name = p
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            Ok(VmTrace { name, utilization })
        })
        .collect()
}

/// FNV-1a hash of a name (a deterministic, name-independent-looking order).
pub fn fnv1a(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_percentages_and_refuses_garbage() {
        let p = Path::new("x");
        assert_eq!(
            parse_trace(p, "5\n\n100\n0\n").ok(),
            Some(vec![0.05, 1.0, 0.0])
        );
        assert!(matches!(
            parse_trace(p, "5\nabc\n"),
            Err(TraceError::Parse { line: 2, .. })
        ));
        assert!(matches!(
            parse_trace(p, "101\n"),
            Err(TraceError::OutOfRange { .. })
        ));
    }
}
