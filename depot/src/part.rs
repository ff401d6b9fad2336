//! Part indexes: the ordered chunk list of one part, and the part's name.
//!
//! A part is named by the BLAKE3 of its canonical index encoding (a two-level hash tree: the
//! part id covers every chunk hash, every chunk hash covers its bytes). A receiver that knows a
//! part id can therefore verify the index it is sent, then every chunk on its own, before any
//! byte is used. The BLAKE3 of the whole content is kept too (`content_hash`, what `b3sum`
//! prints) and is checked when a part is laid down.

use serde::Serialize;

use crate::chunker::{ChunkerSpec, MAX_CHUNK_LEN};
use crate::hash::Hash;

const MAGIC: &[u8; 8] = b"VDPIDX01";
/// Upper bound on one part (16 TiB): more is a hostile or broken index.
pub const MAX_PART_SIZE: u64 = 16 << 40;
/// Upper bound on chunks in one part.
pub const MAX_CHUNKS: u64 = 1 << 26;
const ENTRY_LEN: usize = 32 + 4 + 1;
const HEADER_LEN: usize = 8 + 8 + 32 + 1 + 12 + 8;

/// One chunk of a part.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct ChunkEntry {
    pub hash: Hash,
    pub len: u32,
    /// All bytes are zero: never stored or sent, laid down as a hole.
    pub zero: bool,
}

/// The ordered chunk list of a part.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PartIndex {
    pub size: u64,
    pub content_hash: Hash,
    pub chunker: ChunkerSpec,
    pub chunks: Vec<ChunkEntry>,
}

/// An index that cannot be decoded or is inconsistent.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IndexError {
    #[error("index truncated: {0} bytes")]
    Truncated(usize),
    #[error("not a part index (bad magic)")]
    Magic,
    #[error("unknown chunker tag {0}")]
    ChunkerTag(u8),
    #[error("bad chunker spec")]
    Chunker(#[from] crate::chunker::ChunkerSpecError),
    #[error("part size {0} exceeds the limit of {MAX_PART_SIZE} bytes")]
    TooLarge(u64),
    #[error("chunk count {0} is impossible for the part size")]
    ChunkCount(u64),
    #[error("index length {got} does not match its chunk count (want {want})")]
    Length { got: usize, want: usize },
    #[error("chunk {index} has length {len} (must be 1..={max})")]
    ChunkLen { index: usize, len: u32, max: u32 },
    #[error("chunk lengths sum to {sum}, part size says {size}")]
    SizeMismatch { sum: u64, size: u64 },
    #[error("bad flags {flags:#x} on chunk {index}")]
    Flags { index: usize, flags: u8 },
}

impl PartIndex {
    /// Canonical binary encoding; its BLAKE3 is the part id.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_LEN + self.chunks.len() * ENTRY_LEN);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&self.size.to_le_bytes());
        out.extend_from_slice(&self.content_hash.0);
        let (tag, a, b, c) = match self.chunker {
            ChunkerSpec::Fixed { size } => (1u8, size, 0, 0),
            ChunkerSpec::FastCdc { min, avg, max } => (2u8, min, avg, max),
            ChunkerSpec::FastCdcAligned { min, avg, max } => (3u8, min, avg, max),
            ChunkerSpec::FastCdcAligned16k { min, avg, max } => (4u8, min, avg, max),
        };
        out.push(tag);
        for v in [a, b, c] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out.extend_from_slice(&(self.chunks.len() as u64).to_le_bytes());
        for c in &self.chunks {
            out.extend_from_slice(&c.hash.0);
            out.extend_from_slice(&c.len.to_le_bytes());
            out.push(u8::from(c.zero));
        }
        out
    }

    /// The part id.
    pub fn id(&self) -> Hash {
        Hash::of(&self.encode())
    }

    /// Decodes and validates an index (the input may be hostile).
    pub fn decode(bytes: &[u8]) -> Result<Self, IndexError> {
        if bytes.len() < HEADER_LEN {
            return Err(IndexError::Truncated(bytes.len()));
        }
        if &bytes[..8] != MAGIC {
            return Err(IndexError::Magic);
        }
        let u64_at = |o: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&bytes[o..o + 8]);
            u64::from_le_bytes(b)
        };
        let u32_at = |o: usize| {
            let mut b = [0u8; 4];
            b.copy_from_slice(&bytes[o..o + 4]);
            u32::from_le_bytes(b)
        };
        let size = u64_at(8);
        if size > MAX_PART_SIZE {
            return Err(IndexError::TooLarge(size));
        }
        let mut content_hash = [0u8; 32];
        content_hash.copy_from_slice(&bytes[16..48]);
        let (a, b, c) = (u32_at(49), u32_at(53), u32_at(57));
        let chunker = match bytes[48] {
            1 if b == 0 && c == 0 => ChunkerSpec::Fixed { size: a },
            2 => ChunkerSpec::FastCdc {
                min: a,
                avg: b,
                max: c,
            },
            3 => ChunkerSpec::FastCdcAligned {
                min: a,
                avg: b,
                max: c,
            },
            4 => ChunkerSpec::FastCdcAligned16k {
                min: a,
                avg: b,
                max: c,
            },
            t => return Err(IndexError::ChunkerTag(t)),
        };
        chunker.validate()?;
        let count = u64_at(61);
        // Every chunk but the last is at least one byte, so more chunks than bytes is a lie.
        if count > MAX_CHUNKS || count > size || (size > 0 && count == 0) {
            return Err(IndexError::ChunkCount(count));
        }
        let want = HEADER_LEN + count as usize * ENTRY_LEN;
        if bytes.len() != want {
            return Err(IndexError::Length {
                got: bytes.len(),
                want,
            });
        }
        let max = chunker.max_len().min(MAX_CHUNK_LEN);
        let mut chunks = Vec::with_capacity(count as usize);
        let mut sum = 0u64;
        for (index, e) in bytes[HEADER_LEN..].chunks_exact(ENTRY_LEN).enumerate() {
            let mut hash = [0u8; 32];
            hash.copy_from_slice(&e[..32]);
            let len = u32::from_le_bytes([e[32], e[33], e[34], e[35]]);
            if len == 0 || len > max {
                return Err(IndexError::ChunkLen { index, len, max });
            }
            let zero = match e[36] {
                0 => false,
                1 => true,
                flags => return Err(IndexError::Flags { index, flags }),
            };
            sum += u64::from(len);
            chunks.push(ChunkEntry {
                hash: Hash(hash),
                len,
                zero,
            });
        }
        if sum != size {
            return Err(IndexError::SizeMismatch { sum, size });
        }
        Ok(Self {
            size,
            content_hash: Hash(content_hash),
            chunker,
            chunks,
        })
    }

    /// Byte offset of every chunk.
    pub fn offsets(&self) -> Vec<u64> {
        let mut off = 0u64;
        self.chunks
            .iter()
            .map(|c| {
                let o = off;
                off += u64::from(c.len);
                o
            })
            .collect()
    }

    /// Bytes that must actually be stored or sent (zero chunks excluded).
    pub fn stored_bytes(&self) -> u64 {
        self.chunks
            .iter()
            .filter(|c| !c.zero)
            .map(|c| u64::from(c.len))
            .sum()
    }
}

/// Fuzz entry point for the index decoder: must never panic; a decoded index re-encodes to
/// the same bytes.
pub fn fuzz_decode(data: &[u8]) {
    if let Ok(idx) = PartIndex::decode(data) {
        assert_eq!(idx.encode(), data);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn arb_index() -> impl Strategy<Value = PartIndex> {
        proptest::collection::vec((any::<[u8; 32]>(), 1u32..=65536, any::<bool>()), 0..50).prop_map(
            |v| {
                let chunks: Vec<ChunkEntry> = v
                    .into_iter()
                    .map(|(h, len, zero)| ChunkEntry {
                        hash: Hash(h),
                        len,
                        zero,
                    })
                    .collect();
                PartIndex {
                    size: chunks.iter().map(|c| u64::from(c.len)).sum(),
                    content_hash: Hash::of(b"x"),
                    chunker: ChunkerSpec::Fixed { size: 65536 },
                    chunks,
                }
            },
        )
    }

    proptest! {
        #[test]
        fn round_trips(idx in arb_index()) {
            let bytes = idx.encode();
            prop_assert_eq!(PartIndex::decode(&bytes).unwrap(), idx);
        }

        #[test]
        fn decoder_never_panics(data in proptest::collection::vec(any::<u8>(), 0..400)) {
            fuzz_decode(&data);
        }

        #[test]
        fn single_byte_corruption_is_rejected_or_changes_the_id(idx in arb_index(), pos in any::<prop::sample::Index>(), x in 1u8..) {
            let mut bytes = idx.encode();
            let i = pos.index(bytes.len());
            bytes[i] ^= x;
            if let Ok(other) = PartIndex::decode(&bytes) {
                prop_assert_ne!(other.id(), idx.id());
            }
        }
    }

    #[test]
    fn every_chunker_kind_round_trips() {
        for chunker in [
            ChunkerSpec::Fixed { size: 65536 },
            ChunkerSpec::FastCdc {
                min: 16384,
                avg: 65536,
                max: 262144,
            },
            ChunkerSpec::default(),
            ChunkerSpec::FastCdcAligned16k {
                min: 16384,
                avg: 65536,
                max: 262144,
            },
        ] {
            let idx = PartIndex {
                size: 10,
                content_hash: Hash::of(b""),
                chunker,
                chunks: vec![ChunkEntry {
                    hash: Hash::of(b""),
                    len: 10,
                    zero: false,
                }],
            };
            assert_eq!(PartIndex::decode(&idx.encode()), Ok(idx));
        }
    }

    #[test]
    fn rejects_hostile_sizes() {
        let idx = PartIndex {
            size: 10,
            content_hash: Hash::of(b""),
            chunker: ChunkerSpec::Fixed { size: 4096 },
            chunks: vec![ChunkEntry {
                hash: Hash::of(b""),
                len: 10,
                zero: false,
            }],
        };
        let mut b = idx.encode();
        b[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
        assert_eq!(PartIndex::decode(&b), Err(IndexError::TooLarge(u64::MAX)));
        let mut b = idx.encode();
        b[61..69].copy_from_slice(&(1u64 << 40).to_le_bytes());
        assert!(matches!(
            PartIndex::decode(&b),
            Err(IndexError::ChunkCount(_))
        ));
        let mut b = idx.encode();
        b[8..16].copy_from_slice(&11u64.to_le_bytes());
        assert!(matches!(
            PartIndex::decode(&b),
            Err(IndexError::SizeMismatch { .. })
        ));
    }
}
