//! Image manifests: the ordered parts of a qcow2 backing chain plus the per-VM overlay.
//!
//! A manifest is JSON (versioned, unknown fields rejected). Parts are listed base first; every
//! part after the base names the part it is layered on (`backing`), which must be the part
//! before it, so the chain is linear and acyclic by construction and a manifest that tries to
//! describe a cycle or a fork is rejected. Names end up in file paths, so they are restricted to
//! a safe alphabet: no separators, no `..`, no leading dot.

use std::collections::HashSet;

use serde::{Deserialize, Serialize};

use crate::hash::Hash;
use crate::part::MAX_PART_SIZE;

/// The manifest format version this code writes and reads.
pub const MANIFEST_VERSION: u32 = 1;
/// Largest manifest accepted (bytes of JSON).
pub const MAX_MANIFEST_BYTES: usize = 256 * 1024;
/// Longest backing chain accepted (QEMU itself struggles with deep chains).
pub const MAX_CHAIN_LEN: usize = 32;
/// Largest virtual disk accepted.
pub const MAX_VIRTUAL_SIZE: u64 = 64 << 40;
const MAX_NAME_LEN: usize = 128;

/// Disk format of a part as QEMU sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskFormat {
    Qcow2,
    Raw,
}

impl DiskFormat {
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Qcow2 => "qcow2",
            Self::Raw => "raw",
        }
    }
}

/// One part of the chain.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartRef {
    /// Part id (BLAKE3 of its chunk index).
    pub id: Hash,
    /// Bytes of the part file.
    pub size: u64,
    pub format: DiskFormat,
    /// Size of the virtual disk the part presents.
    pub virtual_size: u64,
    /// The part this one is layered on; `None` only for the base.
    pub backing: Option<Hash>,
    /// What the part holds, for people ("debian-base", "mpi-libs", ...).
    #[serde(default)]
    pub label: String,
}

impl PartRef {
    /// File name of the part in an image directory. Layers reference their backing by this
    /// relative name, so a chain is valid in any directory it is laid down in.
    pub fn file_name(&self) -> String {
        format!("{}.{}", self.id, self.format.as_str())
    }
}

/// How the per-VM copy-on-write overlay is created.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct OverlaySpec {
    /// qcow2 cluster size of the overlay; QEMU's default when absent.
    pub cluster_size: Option<u32>,
}

/// An image: the chain libvirt boots, minus the VM's own overlay.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub version: u32,
    pub name: String,
    /// Base first, top layer last.
    pub parts: Vec<PartRef>,
    #[serde(default)]
    pub overlay: OverlaySpec,
}

/// A manifest that must not be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ManifestError {
    #[error("manifest is {0} bytes, more than the {MAX_MANIFEST_BYTES} allowed")]
    TooBig(usize),
    #[error("manifest is not valid JSON for this format: {0}")]
    Syntax(String),
    #[error("manifest version {0} is not supported (this depot reads version {MANIFEST_VERSION})")]
    Version(u32),
    #[error("name {0:?} is not allowed: use 1-128 of [A-Za-z0-9._-], not starting with '.' or '-'")]
    BadName(String),
    #[error("manifest lists no parts")]
    Empty,
    #[error("chain of {0} parts is longer than the {MAX_CHAIN_LEN} allowed")]
    TooLong(usize),
    #[error("part {index} size {size} exceeds the limit")]
    AbsurdSize { index: usize, size: u64 },
    #[error("part {index} virtual size {size} exceeds the limit")]
    AbsurdVirtualSize { index: usize, size: u64 },
    #[error("part {0} appears twice in the chain (a backing cycle)")]
    Cycle(Hash),
    #[error("the base part (index 0) names a backing part")]
    BaseHasBacking,
    #[error("part {index} must be layered on {expected} but names {found:?}")]
    BrokenChain {
        index: usize,
        expected: Hash,
        found: Option<Hash>,
    },
    #[error("part {0} is raw: only the base may be raw (a raw file cannot have a backing file)")]
    RawLayer(usize),
    #[error("overlay cluster size {0} is not a power of two in 512..=2 MiB")]
    ClusterSize(u32),
    #[error("manifest content does not match its hash")]
    HashMismatch,
}

/// Checks a name that will become part of a file path.
pub fn validate_name(name: &str) -> Result<(), ManifestError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && !name.starts_with('.')
        && !name.starts_with('-')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(ManifestError::BadName(name.chars().take(160).collect()))
    }
}

impl Manifest {
    /// Parses and validates a manifest from untrusted bytes.
    pub fn from_json(bytes: &[u8]) -> Result<Self, ManifestError> {
        if bytes.len() > MAX_MANIFEST_BYTES {
            return Err(ManifestError::TooBig(bytes.len()));
        }
        let m: Self =
            serde_json::from_slice(bytes).map_err(|e| ManifestError::Syntax(e.to_string()))?;
        m.validate()?;
        Ok(m)
    }

    /// Canonical JSON (its BLAKE3 is the manifest hash).
    pub fn to_json(&self) -> Vec<u8> {
        // Serializing plain structs with string keys cannot fail.
        serde_json::to_vec_pretty(self).unwrap_or_default()
    }

    pub fn hash(&self) -> Hash {
        Hash::of(&self.to_json())
    }

    /// The top part (the overlay's backing file).
    pub fn top(&self) -> Option<&PartRef> {
        self.parts.last()
    }

    /// Every rule a manifest must satisfy before anything acts on it.
    pub fn validate(&self) -> Result<(), ManifestError> {
        if self.version != MANIFEST_VERSION {
            return Err(ManifestError::Version(self.version));
        }
        validate_name(&self.name)?;
        if self.parts.is_empty() {
            return Err(ManifestError::Empty);
        }
        if self.parts.len() > MAX_CHAIN_LEN {
            return Err(ManifestError::TooLong(self.parts.len()));
        }
        let mut seen = HashSet::new();
        for (index, p) in self.parts.iter().enumerate() {
            if p.size > MAX_PART_SIZE {
                return Err(ManifestError::AbsurdSize {
                    index,
                    size: p.size,
                });
            }
            if p.virtual_size > MAX_VIRTUAL_SIZE || p.virtual_size == 0 {
                return Err(ManifestError::AbsurdVirtualSize {
                    index,
                    size: p.virtual_size,
                });
            }
            if !seen.insert(p.id) {
                return Err(ManifestError::Cycle(p.id));
            }
            if index == 0 {
                if p.backing.is_some() {
                    return Err(ManifestError::BaseHasBacking);
                }
            } else {
                let expected = self.parts[index - 1].id;
                if p.backing != Some(expected) {
                    return Err(ManifestError::BrokenChain {
                        index,
                        expected,
                        found: p.backing,
                    });
                }
                if p.format == DiskFormat::Raw {
                    return Err(ManifestError::RawLayer(index));
                }
            }
        }
        if let Some(c) = self.overlay.cluster_size
            && (!c.is_power_of_two() || !(512..=2 << 20).contains(&c))
        {
            return Err(ManifestError::ClusterSize(c));
        }
        Ok(())
    }
}

/// Fuzz entry point for the manifest decoder: never panics; what it accepts re-encodes to a
/// manifest that decodes to the same value.
pub fn fuzz_decode(data: &[u8]) {
    if let Ok(m) = Manifest::from_json(data) {
        let again = Manifest::from_json(&m.to_json());
        assert_eq!(again.as_ref(), Ok(&m));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn chain(n: usize) -> Manifest {
        let mut parts: Vec<PartRef> = Vec::new();
        for i in 0..n {
            let id = Hash::of(&[i as u8]);
            parts.push(PartRef {
                id,
                size: 1 << 20,
                format: if i == 0 {
                    DiskFormat::Raw
                } else {
                    DiskFormat::Qcow2
                },
                virtual_size: 1 << 30,
                backing: parts.last().map(|p| p.id),
                label: format!("layer{i}"),
            });
        }
        Manifest {
            version: MANIFEST_VERSION,
            name: "img".into(),
            parts,
            overlay: OverlaySpec::default(),
        }
    }

    proptest! {
        #[test]
        fn valid_chains_round_trip(n in 1usize..=MAX_CHAIN_LEN, name in "[a-z][a-z0-9._-]{0,40}") {
            let mut m = chain(n);
            m.name = name;
            prop_assert_eq!(Manifest::from_json(&m.to_json()), Ok(m.clone()));
        }

        #[test]
        fn decoder_never_panics(data in proptest::collection::vec(any::<u8>(), 0..600)) {
            fuzz_decode(&data);
        }

        #[test]
        fn mutated_json_never_panics(n in 1usize..4, pos in any::<prop::sample::Index>(), b in any::<u8>()) {
            let mut bytes = chain(n).to_json();
            let i = pos.index(bytes.len());
            bytes[i] = b;
            fuzz_decode(&bytes);
        }
    }

    #[test]
    fn rejects_path_traversal_names() {
        for bad in [
            "../etc",
            "a/b",
            "..",
            ".hidden",
            "",
            "-rf",
            "a\0b",
            "x".repeat(200).as_str(),
        ] {
            let mut m = chain(1);
            m.name = bad.into();
            assert!(
                matches!(m.validate(), Err(ManifestError::BadName(_))),
                "{bad:?} accepted"
            );
        }
    }

    #[test]
    fn rejects_cycles_forks_and_bad_chains() {
        let mut m = chain(3);
        m.parts[2] = m.parts[0].clone();
        m.parts[2].backing = Some(m.parts[1].id);
        assert!(matches!(m.validate(), Err(ManifestError::Cycle(_))));

        let mut m = chain(3);
        m.parts[2].backing = Some(m.parts[0].id); // a fork: skips layer 1
        assert!(matches!(
            m.validate(),
            Err(ManifestError::BrokenChain { index: 2, .. })
        ));

        let mut m = chain(2);
        m.parts[0].backing = Some(m.parts[1].id); // base points at its own child
        assert_eq!(m.validate(), Err(ManifestError::BaseHasBacking));

        let mut m = chain(2);
        m.parts[1].format = DiskFormat::Raw;
        assert_eq!(m.validate(), Err(ManifestError::RawLayer(1)));
    }

    #[test]
    fn rejects_absurd_sizes_versions_and_unknown_fields() {
        let mut m = chain(2);
        m.parts[1].size = u64::MAX;
        assert!(matches!(
            m.validate(),
            Err(ManifestError::AbsurdSize { index: 1, .. })
        ));
        let mut m = chain(2);
        m.parts[0].virtual_size = 1 << 60;
        assert!(matches!(
            m.validate(),
            Err(ManifestError::AbsurdVirtualSize { index: 0, .. })
        ));
        let m = chain(MAX_CHAIN_LEN + 1);
        assert_eq!(m.validate(), Err(ManifestError::TooLong(MAX_CHAIN_LEN + 1)));
        let mut m = chain(1);
        m.version = 2;
        assert_eq!(m.validate(), Err(ManifestError::Version(2)));
        let text = String::from_utf8(chain(1).to_json()).unwrap().replacen(
            "\"version\"",
            "\"evil\": 1, \"version\"",
            1,
        );
        assert!(matches!(
            Manifest::from_json(text.as_bytes()),
            Err(ManifestError::Syntax(_))
        ));
        assert!(matches!(
            Manifest::from_json(&vec![b' '; MAX_MANIFEST_BYTES + 1]),
            Err(ManifestError::TooBig(_))
        ));
    }
}
