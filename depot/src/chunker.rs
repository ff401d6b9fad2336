//! Cutting a part into chunks: fixed-size or content-defined (FastCDC 2020).
//!
//! The chunker spec is recorded in every part index so a part is always re-chunked the same
//! way; changing the algorithm or its sizes changes the cut points and therefore the chunk names.

use std::io::{self, Read};

use serde::{Deserialize, Serialize};

/// Largest chunk any spec may produce (FastCDC's own ceiling).
pub const MAX_CHUNK_LEN: u32 = 16 * 1024 * 1024;

/// How a part is cut into chunks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum ChunkerSpec {
    /// Every chunk `size` bytes except the last.
    Fixed { size: u32 },
    /// FastCDC (2020 variant, normalization level 1) with these bounds.
    FastCdc { min: u32, avg: u32, max: u32 },
    /// FastCDC whose cut points are moved back to the previous multiple of [`CDC_ALIGN`]
    /// (chunks start and end on 4 KiB boundaries). Disk images shift in whole filesystem
    /// blocks, so this keeps CDC's resynchronisation there (measured: the same dedup as plain
    /// FastCDC on ext4 guest images); every chunk is whole BLAKE3 chunks and whole blocks
    /// (faster verification, reflink-friendly).
    FastCdcAligned { min: u32, avg: u32, max: u32 },
    /// FastCDC whose cut points are moved back to the previous multiple of
    /// [`CDC_ALIGN_WIDE`] (16 KiB): every chunk is whole groups of 16 BLAKE3 chunks, the width
    /// BLAKE3 hashes in parallel on one core (AVX-512), so verifying chunk by chunk runs at the
    /// speed of hashing the whole part (no partly filled SIMD batch at each chunk's end).
    FastCdcAligned16k { min: u32, avg: u32, max: u32 },
}

/// Alignment of [`ChunkerSpec::FastCdcAligned`] cut points (a filesystem block).
pub const CDC_ALIGN: u32 = 4 * 1024;
/// Alignment of [`ChunkerSpec::FastCdcAligned16k`] cut points.
pub const CDC_ALIGN_WIDE: u32 = 16 * 1024;

impl Default for ChunkerSpec {
    /// Block-aligned FastCDC 24/96/384 KiB, measured on guest images (`viola-depot
    /// chunk-stats`, `bench-verify`; docs/ARCHITECTURE.md): 4 KiB-aligned cut points keep
    /// content-defined dedup across block shifts (1.54× on two ext4 images, against 1.63× at
    /// 64 KiB, 1.29× fixed 64 KiB, 1.27× 16 KiB-aligned), and chunks this large verify at
    /// 0.92–0.93 of raw one-thread BLAKE3 (0.87–0.89 at 64 KiB, where each chunk's tail below
    /// a 16 KiB AVX-512 batch weighs more).
    fn default() -> Self {
        Self::FastCdcAligned {
            min: 24 * 1024,
            avg: 96 * 1024,
            max: 384 * 1024,
        }
    }
}

/// A chunker spec outside the bounds this crate accepts.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ChunkerSpecError {
    #[error("fixed chunk size {0} is outside 4 KiB..=16 MiB")]
    FixedSize(u32),
    #[error(
        "FastCDC sizes {min}/{avg}/{max} must satisfy 64 <= min <= avg <= max, avg in 256..=4 MiB, max in 1 KiB..=16 MiB, min <= 1 MiB"
    )]
    CdcBounds { min: u32, avg: u32, max: u32 },
    #[error("aligned FastCDC sizes {min}/{max} must be non-zero multiples of {align}")]
    Alignment { min: u32, max: u32, align: u32 },
}

impl ChunkerSpec {
    /// Checks the spec is usable (the fastcdc crate panics on out-of-range sizes).
    pub fn validate(&self) -> Result<(), ChunkerSpecError> {
        match *self {
            Self::Fixed { size } => {
                if !(4096..=MAX_CHUNK_LEN).contains(&size) {
                    return Err(ChunkerSpecError::FixedSize(size));
                }
            }
            Self::FastCdc { min, avg, max }
            | Self::FastCdcAligned { min, avg, max }
            | Self::FastCdcAligned16k { min, avg, max } => {
                use fastcdc::v2020 as f;
                let ok = (f::MINIMUM_MIN..=f::MINIMUM_MAX).contains(&min)
                    && (f::AVERAGE_MIN..=f::AVERAGE_MAX).contains(&avg)
                    && (f::MAXIMUM_MIN..=f::MAXIMUM_MAX).contains(&max)
                    && min <= avg
                    && avg <= max;
                if !ok {
                    return Err(ChunkerSpecError::CdcBounds { min, avg, max });
                }
                if let Some(align) = self.align()
                    && (min % align != 0 || max % align != 0 || min == 0)
                {
                    return Err(ChunkerSpecError::Alignment { min, max, align });
                }
            }
        }
        Ok(())
    }

    /// Largest chunk this spec produces.
    pub fn max_len(&self) -> u32 {
        match *self {
            Self::Fixed { size } => size,
            Self::FastCdc { max, .. }
            | Self::FastCdcAligned { max, .. }
            | Self::FastCdcAligned16k { max, .. } => max,
        }
    }

    /// The alignment of an aligned FastCDC spec's cut points.
    pub fn align(&self) -> Option<u32> {
        match self {
            Self::FastCdcAligned { .. } => Some(CDC_ALIGN),
            Self::FastCdcAligned16k { .. } => Some(CDC_ALIGN_WIDE),
            Self::Fixed { .. } | Self::FastCdc { .. } => None,
        }
    }

    /// Short human name, e.g. `fixed-64k` or `fastcdc-16k/64k/256k`.
    pub fn label(&self) -> String {
        let k = |v: u32| format!("{}k", v / 1024);
        match *self {
            Self::Fixed { size } => format!("fixed-{}", k(size)),
            Self::FastCdc { min, avg, max } => format!("fastcdc-{}/{}/{}", k(min), k(avg), k(max)),
            Self::FastCdcAligned { min, avg, max } => {
                format!("fastcdc-aligned4k-{}/{}/{}", k(min), k(avg), k(max))
            }
            Self::FastCdcAligned16k { min, avg, max } => {
                format!("fastcdc-aligned16k-{}/{}/{}", k(min), k(avg), k(max))
            }
        }
    }
}

/// Errors while chunking a stream.
#[derive(Debug, thiserror::Error)]
pub enum ChunkError<E: std::error::Error + 'static> {
    #[error("bad chunker spec")]
    Spec(#[from] ChunkerSpecError),
    #[error("reading the input")]
    Read(#[source] io::Error),
    #[error("handling a chunk")]
    Sink(#[source] E),
}

/// Reads `input` to the end, calling `sink(offset, bytes)` for every chunk in order.
pub fn for_each_chunk<R, E, F>(
    spec: ChunkerSpec,
    mut input: R,
    mut sink: F,
) -> Result<u64, ChunkError<E>>
where
    R: Read,
    E: std::error::Error + 'static,
    F: FnMut(u64, &[u8]) -> Result<(), E>,
{
    spec.validate()?;
    let mut offset = 0u64;
    match spec {
        ChunkerSpec::Fixed { size } => {
            let mut buf = vec![0u8; size as usize];
            loop {
                let n = read_full(&mut input, &mut buf).map_err(ChunkError::Read)?;
                if n == 0 {
                    break;
                }
                sink(offset, &buf[..n]).map_err(ChunkError::Sink)?;
                offset += n as u64;
                if n < buf.len() {
                    break;
                }
            }
        }
        ChunkerSpec::FastCdc { min, avg, max } => {
            let chunks = fastcdc::v2020::StreamCDC::new(input, min, avg, max);
            for chunk in chunks {
                let chunk = chunk.map_err(|e| match e {
                    fastcdc::v2020::Error::IoError(io) => ChunkError::Read(io),
                    other => ChunkError::Read(io::Error::other(other.to_string())),
                })?;
                sink(chunk.offset, &chunk.data).map_err(ChunkError::Sink)?;
                offset = chunk.offset + chunk.data.len() as u64;
            }
        }
        ChunkerSpec::FastCdcAligned { min, avg, max }
        | ChunkerSpec::FastCdcAligned16k { min, avg, max } => {
            let align = spec.align().unwrap_or(CDC_ALIGN) as usize;
            let max_len = max as usize;
            let mut buf: Vec<u8> = Vec::with_capacity(2 * max_len);
            let mut eof = false;
            loop {
                while !eof && buf.len() < max_len {
                    let start = buf.len();
                    buf.resize(2 * max_len, 0);
                    let n = read_full(&mut input, &mut buf[start..]).map_err(ChunkError::Read)?;
                    buf.truncate(start + n);
                    eof = start + n < 2 * max_len;
                }
                if buf.is_empty() {
                    break;
                }
                let cut = if buf.len() <= min as usize {
                    buf.len()
                } else {
                    let window = &buf[..buf.len().min(max_len)];
                    let natural = fastcdc::v2020::FastCDC::new(window, min, avg, max)
                        .next()
                        .map_or(window.len(), |c| c.length);
                    if natural == buf.len() {
                        natural
                    } else {
                        // Back to the previous block boundary (min is a multiple, so never 0).
                        (natural / align * align).max(min as usize)
                    }
                };
                sink(offset, &buf[..cut]).map_err(ChunkError::Sink)?;
                offset += cut as u64;
                buf.drain(..cut);
            }
        }
    }
    Ok(offset)
}

/// Cut points of an in-memory buffer (for tests and the dedup measurement).
pub fn boundaries(spec: ChunkerSpec, data: &[u8]) -> Result<Vec<(u64, usize)>, ChunkerSpecError> {
    let mut out = Vec::new();
    let r = for_each_chunk::<_, io::Error, _>(spec, data, |off, bytes| {
        out.push((off, bytes.len()));
        Ok(())
    });
    match r {
        Ok(_) => Ok(out),
        Err(ChunkError::Spec(e)) => Err(e),
        // Reading from a slice and pushing to a Vec cannot fail.
        Err(_) => Ok(out),
    }
}

fn read_full<R: Read>(r: &mut R, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match r.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn small_cdc() -> ChunkerSpec {
        ChunkerSpec::FastCdc {
            min: 64,
            avg: 256,
            max: 1024,
        }
    }

    #[test]
    fn aligned_cdc_tiles_on_block_boundaries_and_resynchronises_after_a_block_insertion() {
        for spec in [
            ChunkerSpec::FastCdcAligned {
                min: 16384,
                avg: 65536,
                max: 262144,
            },
            ChunkerSpec::FastCdcAligned16k {
                min: 16384,
                avg: 65536,
                max: 262144,
            },
        ] {
            aligned_cdc_case(spec);
        }
    }

    /// `len` pseudo-random bytes from `seed` (incompressible, reproducible).
    fn noise(seed: u64, len: usize) -> Vec<u8> {
        let mut s = seed;
        (0..len)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1);
                (s >> 33) as u8
            })
            .collect()
    }

    /// The hashes of the chunks `spec` cuts `data` into.
    fn chunk_hashes(spec: ChunkerSpec, data: &[u8]) -> std::collections::HashSet<blake3::Hash> {
        boundaries(spec, data)
            .unwrap()
            .into_iter()
            .map(|(o, l)| blake3::hash(&data[o as usize..o as usize + l]))
            .collect()
    }

    fn aligned_cdc_case(spec: ChunkerSpec) {
        let align = spec.align().unwrap() as usize;
        let data = noise(99, 3_000_000);
        let b = boundaries(spec, &data).unwrap();
        let mut expect = 0u64;
        for (i, (off, len)) in b.iter().enumerate() {
            assert_eq!(*off, expect);
            assert!(*len as u32 <= spec.max_len());
            if i + 1 < b.len() {
                assert_eq!(len % align, 0, "chunk {i} of {len} bytes");
            }
            expect += *len as u64;
        }
        assert_eq!(expect, data.len() as u64);
        let mut shifted = data.clone();
        shifted.splice(100_000..100_000, vec![3u8; 16384]);
        let (a, c) = (chunk_hashes(spec, &data), chunk_hashes(spec, &shifted));
        assert!(
            a.intersection(&c).count() * 10 >= a.len() * 8,
            "{} of {} shared",
            a.intersection(&c).count(),
            a.len()
        );
    }

    proptest! {
        #[test]
        fn chunks_tile_the_input(data in proptest::collection::vec(any::<u8>(), 0..20_000), fixed in prop::bool::ANY) {
            let spec = if fixed { ChunkerSpec::Fixed { size: 4096 } } else { small_cdc() };
            let b = boundaries(spec, &data).unwrap();
            let mut expect = 0u64;
            for (off, len) in &b {
                prop_assert_eq!(*off, expect);
                prop_assert!(*len > 0 && *len as u32 <= spec.max_len());
                expect += *len as u64;
            }
            prop_assert_eq!(expect, data.len() as u64);
        }
    }

    #[test]
    fn cdc_resynchronises_after_an_insertion_and_fixed_does_not() {
        let data = noise(12345, 200_000);
        let mut shifted = data.clone();
        shifted.splice(1000..1000, [7u8; 17]);
        let shared = |spec| {
            chunk_hashes(spec, &data)
                .intersection(&chunk_hashes(spec, &shifted))
                .count()
        };
        let cdc = small_cdc();
        let fixed = ChunkerSpec::Fixed { size: 4096 };
        assert!(
            shared(cdc) * 10 >= chunk_hashes(cdc, &data).len() * 9,
            "CDC should keep >= 90% of chunks"
        );
        assert_eq!(
            shared(fixed),
            0,
            "a 17-byte shift moves every fixed block after it"
        );
    }

    #[test]
    fn rejects_out_of_range_specs() {
        assert!(ChunkerSpec::Fixed { size: 10 }.validate().is_err());
        assert!(
            ChunkerSpec::FastCdc {
                min: 1,
                avg: 2,
                max: 3
            }
            .validate()
            .is_err()
        );
        assert!(
            ChunkerSpec::FastCdc {
                min: 4096,
                avg: 1024,
                max: 8192
            }
            .validate()
            .is_err()
        );
        assert!(ChunkerSpec::default().validate().is_ok());
    }
}
