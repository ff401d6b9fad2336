//! The depot wire protocol on QUIC streams (ALPN `viola-depot/1`).
//!
//! One request per bidirectional stream: the client sends one JSON control frame and finishes
//! its side (an upload sends more, below); the server answers with frames and finishes. A frame
//! is a 1-byte kind, a 4-byte big-endian length and the payload:
//!
//! | kind | payload |
//! |---|---|
//! | 1 control | JSON ([`Request`] or [`Response`]) |
//! | 2 chunk | 4-byte chunk index (BE) then the chunk bytes |
//! | 3 blob | raw bytes (a part index, a manifest) |
//! | 4 end | empty |
//!
//! Every length is bounded before anything is allocated; nothing in a frame is trusted until
//! it was verified against a hash the receiver already knows.
//!
//! Who may ask what (the role in the client's certificate): parts, indexes, manifests and
//! `have` any depot, manager or CLI; `stage`, `stage_status` and `images` the manager and the
//! CLI; `upload` the manager only.
//!
//! `images`: the answer is one control frame [`Response::Images`], the names after `after`
//! (sorted by name) that fit in it; `more` says whether to ask again with `after` set to the
//! last name received. So the list is paged, never cut short silently.
//!
//! `upload` (the image's bytes, untrusted, from the manager):
//!
//! | step | direction | frames |
//! |---|---|---|
//! | 1 | client → depot | control [`Request::Upload`] `{name, size, replace}` |
//! | 2 | depot → client | control [`Response::Ok`] (send) or [`Response::Error`] (refused; the stream ends) |
//! | 3 | client → depot | blob frames of 1 to [`MAX_UPLOAD_BLOB`] bytes, `size` bytes in all, then end; the client finishes its side |
//! | 4 | depot → client | control [`Response::Upload`] (the report) or [`Response::Error`]; the depot finishes |
//!
//! The depot refuses at step 2 what it can decide without the bytes (role, name, an existing
//! name without `replace`, size above its limit or its free space, too many uploads at once),
//! so a refused client sends nothing. At step 3 it writes each blob to a temp file in its
//! store as it arrives (one frame in memory at a time). A frame of another kind, a blob larger
//! than [`MAX_UPLOAD_BLOB`], more than `size` bytes, or a stream that ends before the end frame
//! is an error at once (the depot answers it and stops reading); fewer than `size` bytes
//! before the end frame is one too.

use serde::{Deserialize, Serialize};

use crate::api::{ImageEntry, StageRequest, StageStatus, UploadReport};
use crate::chunker::MAX_CHUNK_LEN;
use crate::hash::Hash;

/// Largest control frame.
pub const MAX_CONTROL_LEN: u32 = 64 * 1024;
/// Largest blob frame (a part index of 2^20 chunks is ~37 MiB; parts bigger than that are
/// refused by the sender).
pub const MAX_BLOB_LEN: u32 = 64 << 20;
/// Largest chunk frame.
pub const MAX_CHUNK_FRAME: u32 = MAX_CHUNK_LEN + 4;
/// Largest blob frame of an upload: the depot holds one such frame per upload in memory.
pub const MAX_UPLOAD_BLOB: u32 = 1 << 20;
pub const HEADER_LEN: usize = 5;

/// A request (client → server).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// The part index of a committed part (answered by a blob frame).
    Index { part: Hash },
    /// Chunks `first..first+count` of a part (answered by chunk frames, zero chunks skipped).
    Chunks { part: Hash, first: u32, count: u32 },
    /// A manifest by image name or hash (answered by a blob frame).
    Manifest { image: String },
    /// Which of these parts the server holds completely.
    Have { parts: Vec<Hash> },
    /// Stage an image for a VM (adaptation manager and CLI only).
    Stage(StageRequest),
    /// Status of a staging request.
    StageStatus { stage_id: String },
    /// The depot's named images after `after`, a page (answered by [`Response::Images`];
    /// manager and CLI only).
    Images { after: Option<String> },
    /// Upload `size` bytes of a qcow2 or raw image to import as `name` (manager only; the frame
    /// sequence is in the module doc). An existing name is refused unless `replace`.
    Upload {
        name: String,
        size: u64,
        #[serde(default)]
        replace: bool,
    },
}

/// A control response (server → client).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Response {
    Ok,
    Have {
        complete: Vec<bool>,
    },
    Stage(StageStatus),
    Error {
        message: String,
    },
    /// A page of the image list; `more`: ask again after the last name.
    Images {
        images: Vec<ImageEntry>,
        more: bool,
    },
    Upload(UploadReport),
}

/// A frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frame {
    Control(Vec<u8>),
    Chunk { index: u32, data: Vec<u8> },
    Blob(Vec<u8>),
    End,
}

/// A frame that breaks the protocol.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WireError {
    #[error("unknown frame kind {0}")]
    Kind(u8),
    #[error("frame of kind {kind} is {len} bytes (limit {limit})")]
    TooLong { kind: u8, len: u32, limit: u32 },
    #[error("chunk frame shorter than its index")]
    ShortChunk,
    #[error("end frame with a payload")]
    EndPayload,
    #[error("bad control message: {0}")]
    Json(String),
}

/// Validates a frame header; returns (kind, payload length).
pub fn parse_header(h: [u8; HEADER_LEN]) -> Result<(u8, u32), WireError> {
    let kind = h[0];
    let len = u32::from_be_bytes([h[1], h[2], h[3], h[4]]);
    let limit = match kind {
        1 => MAX_CONTROL_LEN,
        2 => MAX_CHUNK_FRAME,
        3 => MAX_BLOB_LEN,
        4 => 0,
        k => return Err(WireError::Kind(k)),
    };
    if len > limit {
        return Err(if kind == 4 {
            WireError::EndPayload
        } else {
            WireError::TooLong { kind, len, limit }
        });
    }
    Ok((kind, len))
}

/// Builds a frame from a validated header and its payload.
pub fn frame_from(kind: u8, mut payload: Vec<u8>) -> Result<Frame, WireError> {
    Ok(match kind {
        1 => Frame::Control(payload),
        2 => {
            if payload.len() < 4 {
                return Err(WireError::ShortChunk);
            }
            let index = u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]]);
            payload.drain(..4);
            Frame::Chunk {
                index,
                data: payload,
            }
        }
        3 => Frame::Blob(payload),
        4 => Frame::End,
        k => return Err(WireError::Kind(k)),
    })
}

/// Decodes one frame from the front of `buf`: `Ok(None)` if more bytes are needed.
pub fn decode(buf: &[u8]) -> Result<Option<(Frame, usize)>, WireError> {
    if buf.len() < HEADER_LEN {
        return Ok(None);
    }
    let (kind, len) = parse_header([buf[0], buf[1], buf[2], buf[3], buf[4]])?;
    let end = HEADER_LEN + len as usize;
    if buf.len() < end {
        return Ok(None);
    }
    Ok(Some((
        frame_from(kind, buf[HEADER_LEN..end].to_vec())?,
        end,
    )))
}

/// Encodes a frame.
pub fn encode(f: &Frame) -> Vec<u8> {
    let (kind, body): (u8, Vec<&[u8]>) = match f {
        Frame::Control(b) => (1, vec![b]),
        Frame::Chunk { index: _, data } => (2, vec![data]),
        Frame::Blob(b) => (3, vec![b]),
        Frame::End => (4, vec![]),
    };
    let idx;
    let mut parts = body;
    if let Frame::Chunk { index, .. } = f {
        idx = index.to_be_bytes();
        parts.insert(0, &idx);
    }
    let len: usize = parts.iter().map(|p| p.len()).sum();
    let mut out = Vec::with_capacity(HEADER_LEN + len);
    out.push(kind);
    out.extend_from_slice(&(len as u32).to_be_bytes());
    for p in parts {
        out.extend_from_slice(p);
    }
    out
}

/// The chunk frame header for `len` bytes of chunk `index` (lets the server send the chunk
/// bytes without copying them).
pub fn chunk_header(index: u32, len: usize) -> [u8; HEADER_LEN + 4] {
    let mut h = [0u8; HEADER_LEN + 4];
    h[0] = 2;
    h[1..5].copy_from_slice(&((len + 4) as u32).to_be_bytes());
    h[5..9].copy_from_slice(&index.to_be_bytes());
    h
}

/// The blob frame header for `len` bytes (lets an uploader send its buffer without copying).
pub fn blob_header(len: usize) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[0] = 3;
    h[1..5].copy_from_slice(&(len as u32).to_be_bytes());
    h
}

pub fn control<T: Serialize>(msg: &T) -> Frame {
    Frame::Control(serde_json::to_vec(msg).unwrap_or_default())
}

pub fn parse_request(b: &[u8]) -> Result<Request, WireError> {
    serde_json::from_slice(b).map_err(|e| WireError::Json(e.to_string()))
}

pub fn parse_response(b: &[u8]) -> Result<Response, WireError> {
    serde_json::from_slice(b).map_err(|e| WireError::Json(e.to_string()))
}

/// Fuzz entry point: decode frames from arbitrary bytes and parse control payloads. Never
/// panics; a decoded frame re-encodes to the bytes it came from, and a parsed request or
/// response re-encodes to one that parses to the same value.
pub fn fuzz_decode(data: &[u8]) {
    let mut rest = data;
    while let Ok(Some((frame, used))) = decode(rest) {
        assert_eq!(encode(&frame), &rest[..used]);
        if let Frame::Control(b) = &frame {
            if let Ok(r) = parse_request(b) {
                assert_eq!(reparse(&r, parse_request), Some(r));
            }
            if let Ok(r) = parse_response(b) {
                assert_eq!(reparse(&r, parse_response), Some(r));
            }
        }
        rest = &rest[used..];
    }
}

fn reparse<T: Serialize>(msg: &T, parse: fn(&[u8]) -> Result<T, WireError>) -> Option<T> {
    let Frame::Control(b) = control(msg) else {
        return None;
    };
    parse(&b).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn arb_frame() -> impl Strategy<Value = Frame> {
        prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..100).prop_map(Frame::Control),
            (any::<u32>(), proptest::collection::vec(any::<u8>(), 0..100))
                .prop_map(|(index, data)| Frame::Chunk { index, data }),
            proptest::collection::vec(any::<u8>(), 0..100).prop_map(Frame::Blob),
            Just(Frame::End),
        ]
    }

    fn arb_hash() -> impl Strategy<Value = Hash> {
        any::<[u8; 8]>().prop_map(|b| Hash::of(&b))
    }

    /// Names as they come: safe ones, and anything else a client might send.
    fn arb_name() -> impl Strategy<Value = String> {
        prop_oneof!["[A-Za-z0-9][A-Za-z0-9._-]{0,20}", any::<String>()]
    }

    /// Every request variant.
    fn arb_request() -> impl Strategy<Value = Request> {
        prop_oneof![
            arb_hash().prop_map(|part| Request::Index { part }),
            (arb_hash(), any::<u32>(), any::<u32>())
                .prop_map(|(part, first, count)| Request::Chunks { part, first, count }),
            arb_name().prop_map(|image| Request::Manifest { image }),
            proptest::collection::vec(arb_hash(), 0..4).prop_map(|parts| Request::Have { parts }),
            (
                arb_name(),
                arb_name(),
                any::<u64>(),
                any::<bool>(),
                any::<bool>()
            )
                .prop_map(
                    |(image, vm, deadline_unix_ms, reject_if_late, chain_only)| {
                        Request::Stage(StageRequest {
                            image,
                            host: vm.clone(),
                            vm,
                            deadline_unix_ms,
                            reject_if_late,
                            chain_only,
                        })
                    }
                ),
            arb_name().prop_map(|stage_id| Request::StageStatus { stage_id }),
            proptest::option::of(arb_name()).prop_map(|after| Request::Images { after }),
            (arb_name(), any::<u64>(), any::<bool>()).prop_map(|(name, size, replace)| {
                Request::Upload {
                    name,
                    size,
                    replace,
                }
            }),
        ]
    }

    fn arb_entry() -> impl Strategy<Value = ImageEntry> {
        (
            arb_name(),
            arb_hash(),
            any::<u64>(),
            any::<u64>(),
            0usize..40,
            any::<bool>(),
            proptest::option::of(any::<String>()),
        )
            .prop_map(
                |(name, manifest, virtual_size, bytes, parts, complete, problem)| ImageEntry {
                    name,
                    manifest,
                    virtual_size,
                    bytes,
                    parts,
                    complete,
                    problem,
                },
            )
    }

    /// The responses the new requests get (and the plain ones).
    fn arb_response() -> impl Strategy<Value = Response> {
        prop_oneof![
            Just(Response::Ok),
            any::<String>().prop_map(|message| Response::Error { message }),
            (proptest::collection::vec(arb_entry(), 0..4), any::<bool>())
                .prop_map(|(images, more)| Response::Images { images, more }),
            (
                arb_name(),
                arb_hash(),
                proptest::option::of(arb_hash()),
                any::<[u64; 4]>(),
                any::<[u32; 4]>(),
                any::<bool>()
            )
                .prop_map(|(name, manifest, replaced, b, c, qcow2)| {
                    Response::Upload(UploadReport {
                        name,
                        manifest,
                        replaced,
                        bytes_received: b[0],
                        format: if qcow2 {
                            crate::manifest::DiskFormat::Qcow2
                        } else {
                            crate::manifest::DiskFormat::Raw
                        },
                        virtual_size: b[1],
                        parts: 1,
                        chunks: c[0] as usize,
                        zero_chunks: c[1] as usize,
                        new_chunks: c[2] as usize,
                        new_bytes: b[2],
                        dedup_chunks: c[3] as usize,
                        dedup_bytes: b[3],
                    })
                }),
        ]
    }

    proptest! {
        #[test]
        fn requests_and_responses_round_trip(req in arb_request(), resp in arb_response()) {
            let mut bytes = encode(&control(&req));
            bytes.extend(encode(&control(&resp)));
            // The fuzz target's own checks hold on these too.
            fuzz_decode(&bytes);
            let Some((Frame::Control(b), n)) = decode(&bytes).unwrap() else {
                panic!("no control frame")
            };
            prop_assert_eq!(parse_request(&b).unwrap(), req);
            let Some((Frame::Control(b), _)) = decode(&bytes[n..]).unwrap() else {
                panic!("no control frame")
            };
            prop_assert_eq!(parse_response(&b).unwrap(), resp);
        }

        #[test]
        fn frames_round_trip_in_sequence(frames in proptest::collection::vec(arb_frame(), 0..8)) {
            let bytes: Vec<u8> = frames.iter().flat_map(encode).collect();
            let mut rest = &bytes[..];
            let mut back = Vec::new();
            while let Some((f, n)) = decode(rest).unwrap() {
                back.push(f);
                rest = &rest[n..];
            }
            prop_assert!(rest.is_empty());
            prop_assert_eq!(back, frames);
        }

        #[test]
        fn decoder_never_panics(data in proptest::collection::vec(any::<u8>(), 0..300)) {
            fuzz_decode(&data);
        }
    }

    #[test]
    fn refuses_huge_and_unknown_frames_before_allocating() {
        assert_eq!(parse_header([9, 0, 0, 0, 0]), Err(WireError::Kind(9)));
        assert!(matches!(
            parse_header([1, 0xff, 0xff, 0xff, 0xff]),
            Err(WireError::TooLong { .. })
        ));
        assert!(matches!(
            parse_header([2, 0x7f, 0, 0, 0]),
            Err(WireError::TooLong { .. })
        ));
        assert_eq!(parse_header([4, 0, 0, 0, 1]), Err(WireError::EndPayload));
        assert_eq!(frame_from(2, vec![1, 2]), Err(WireError::ShortChunk));
        assert_eq!(
            chunk_header(7, 3).to_vec(),
            encode(&Frame::Chunk {
                index: 7,
                data: vec![0; 3]
            })[..9]
                .to_vec()
        );
    }

    #[test]
    fn requests_round_trip_and_unknown_ops_are_rejected() {
        let r = Request::Chunks {
            part: Hash::of(b"p"),
            first: 3,
            count: 9,
        };
        let Frame::Control(b) = control(&r) else {
            panic!()
        };
        assert_eq!(parse_request(&b).unwrap(), r);
        assert!(parse_request(br#"{"op":"rm_rf"}"#).is_err());
        // Defaults: the first page; no replacing unless asked.
        assert_eq!(
            parse_request(br#"{"op":"images"}"#).unwrap(),
            Request::Images { after: None }
        );
        assert_eq!(
            parse_request(br#"{"op":"upload","name":"x","size":3}"#).unwrap(),
            Request::Upload {
                name: "x".into(),
                size: 3,
                replace: false
            }
        );
        assert!(parse_request(br#"{"op":"upload","name":"x","size":3,"path":"/"}"#).is_err());
        assert!(parse_request(br#"{"op":"upload","name":"x","size":-1}"#).is_err());
        assert_eq!(
            blob_header(5).to_vec(),
            encode(&Frame::Blob(vec![0; 5]))[..HEADER_LEN].to_vec()
        );
        assert!(parse_request(br#"{"op":"index","part":"zz"}"#).is_err());
    }
}
