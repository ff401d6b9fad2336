//! The HTTP/1.1 framing the client needs, and no more: write one `POST` with a JSON body and
//! `Connection: close`, read one response (status line, headers, then a body framed by
//! `Content-Length`, `Transfer-Encoding: chunked`, or the end of the connection).
//!
//! etcd's gateway answers unary calls with `Content-Length` and streaming ones (lease keepalive)
//! as well as errors from its gRPC layer with chunked bodies followed by a trailer
//! (`Grpc-Trailer-Content-Type`), so both framings are needed. Everything read is bounded: a
//! line, the head, and the body have limits, and a chunk size is never allocated up front, so a
//! malformed or hostile answer gives an error, never a huge allocation or a panic.

use std::io::{self, BufRead, Read, Write};

/// The longest status, header, chunk-size or trailer line accepted.
const MAX_LINE: usize = 16 * 1024;
/// The most header (or trailer) lines accepted.
const MAX_HEADERS: usize = 100;
/// The largest body accepted. etcd answers a range with every matching key in one response, so
/// this is generous; it only keeps a broken peer from filling memory.
pub(crate) const MAX_BODY: usize = 1 << 30;

/// Why a response could not be read.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// The connection failed, timed out, or closed early.
    #[error("the connection failed")]
    Io(#[from] io::Error),
    /// The bytes received are not an HTTP/1.1 response this client understands.
    #[error("malformed HTTP response: {0}")]
    Malformed(String),
}

impl HttpError {
    /// Whether the cause is the request's deadline passing.
    pub(crate) fn is_timeout(&self) -> bool {
        matches!(self, Self::Io(e) if e.kind() == io::ErrorKind::TimedOut)
    }
}

fn malformed(what: impl Into<String>) -> HttpError {
    HttpError::Malformed(what.into())
}

/// One response: its status code and its (de-chunked) body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Response {
    pub status: u16,
    pub body: Vec<u8>,
}

/// How much of the body to read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Until {
    /// All of it.
    End,
    /// Stop once a whole line (ending in `\n`) has arrived: a streaming endpoint's first message.
    FirstLine,
}

/// Writes `POST path` with `body` as one buffer (one segment on loopback: no Nagle wait between
/// head and body).
pub(crate) fn write_request(
    out: &mut impl Write,
    host: &str,
    path: &str,
    body: &[u8],
) -> io::Result<()> {
    let mut request = format!(
        "POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n\
         Accept: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    request.extend_from_slice(body);
    out.write_all(&request)?;
    out.flush()
}

/// Reads one response, skipping interim `1xx` answers.
pub(crate) fn read_response(r: &mut impl BufRead, until: Until) -> Result<Response, HttpError> {
    loop {
        let status = read_status_line(r)?;
        let headers = read_headers(r)?;
        if (100..200).contains(&status) {
            continue;
        }
        let body = match framing(&headers)? {
            Framing::Chunked => decode_chunked(r, until)?,
            Framing::Length(n) => read_length(r, n)?,
            Framing::Close => read_to_close(r)?,
        };
        return Ok(Response { status, body });
    }
}

/// Reads one line (through `\n`) of at most [`MAX_LINE`] bytes, without its line ending.
/// `None` at a clean end of input.
fn read_line(r: &mut impl BufRead) -> Result<Option<Vec<u8>>, HttpError> {
    let mut line = Vec::new();
    let limit = u64::try_from(MAX_LINE).unwrap_or(u64::MAX);
    (&mut *r).take(limit).read_until(b'\n', &mut line)?;
    if line.is_empty() {
        return Ok(None);
    }
    if line.last() != Some(&b'\n') {
        return Err(if line.len() >= MAX_LINE {
            malformed(format!("a line is longer than {MAX_LINE} bytes"))
        } else {
            io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "connection closed within a line",
            )
            .into()
        });
    }
    line.pop();
    if line.last() == Some(&b'\r') {
        line.pop();
    }
    Ok(Some(line))
}

fn require_line(r: &mut impl BufRead, what: &str) -> Result<Vec<u8>, HttpError> {
    read_line(r)?.ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("connection closed before the {what}"),
        )
        .into()
    })
}

/// Parses `HTTP/1.x NNN reason`.
pub(crate) fn parse_status_line(line: &[u8]) -> Result<u16, HttpError> {
    let text = std::str::from_utf8(line).map_err(|_| malformed("status line is not UTF-8"))?;
    let shown = || text.chars().take(80).collect::<String>();
    let mut parts = text.splitn(3, ' ');
    let version = parts.next().unwrap_or_default();
    let code = parts.next().unwrap_or_default();
    if !version.starts_with("HTTP/1.") {
        return Err(malformed(format!(
            "not an HTTP/1 status line: {:?}",
            shown()
        )));
    }
    if code.len() != 3 || !code.bytes().all(|b| b.is_ascii_digit()) {
        return Err(malformed(format!("bad status code in {:?}", shown())));
    }
    code.parse()
        .map_err(|_| malformed(format!("bad status code in {:?}", shown())))
}

fn read_status_line(r: &mut impl BufRead) -> Result<u16, HttpError> {
    parse_status_line(&require_line(r, "status line")?)
}

/// Reads `Name: value` lines up to the empty line; names are lower-cased.
fn read_headers(r: &mut impl BufRead) -> Result<Vec<(String, String)>, HttpError> {
    let mut headers = Vec::new();
    loop {
        let line = require_line(r, "end of the headers")?;
        if line.is_empty() {
            return Ok(headers);
        }
        if headers.len() == MAX_HEADERS {
            return Err(malformed(format!("more than {MAX_HEADERS} header lines")));
        }
        let text = String::from_utf8_lossy(&line);
        let (name, value) = text
            .split_once(':')
            .ok_or_else(|| malformed(format!("header line without a colon: {text:?}")))?;
        headers.push((name.trim().to_ascii_lowercase(), value.trim().to_owned()));
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Framing {
    Chunked,
    Length(usize),
    Close,
}

fn framing(headers: &[(String, String)]) -> Result<Framing, HttpError> {
    let mut length = None;
    for (name, value) in headers {
        match name.as_str() {
            "transfer-encoding" => {
                let last = value.rsplit(',').next().unwrap_or_default().trim();
                if last.eq_ignore_ascii_case("chunked") {
                    return Ok(Framing::Chunked);
                }
                if !last.eq_ignore_ascii_case("identity") {
                    return Err(malformed(format!(
                        "unsupported Transfer-Encoding {value:?}"
                    )));
                }
            }
            "content-length" => {
                let n: usize = value
                    .parse()
                    .map_err(|_| malformed(format!("bad Content-Length {value:?}")))?;
                if length.is_some_and(|m| m != n) {
                    return Err(malformed("conflicting Content-Length headers"));
                }
                length = Some(n);
            }
            _ => {}
        }
    }
    Ok(length.map_or(Framing::Close, Framing::Length))
}

fn too_large() -> HttpError {
    malformed(format!("body larger than {MAX_BODY} bytes"))
}

/// Appends exactly `n` bytes from `r` to `body`, growing it only as data arrives.
fn append_exact(r: &mut impl BufRead, n: usize, body: &mut Vec<u8>) -> Result<(), HttpError> {
    let limit = u64::try_from(n).map_err(|_| too_large())?;
    let got = (&mut *r).take(limit).read_to_end(body)?;
    if got < n {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("connection closed after {got} of {n} body bytes"),
        )
        .into());
    }
    Ok(())
}

fn read_length(r: &mut impl BufRead, n: usize) -> Result<Vec<u8>, HttpError> {
    if n > MAX_BODY {
        return Err(too_large());
    }
    let mut body = Vec::new();
    append_exact(r, n, &mut body)?;
    Ok(body)
}

fn read_to_close(r: &mut impl BufRead) -> Result<Vec<u8>, HttpError> {
    let mut body = Vec::new();
    let limit = u64::try_from(MAX_BODY).unwrap_or(u64::MAX) + 1;
    (&mut *r).take(limit).read_to_end(&mut body)?;
    if body.len() > MAX_BODY {
        return Err(too_large());
    }
    Ok(body)
}

/// Decodes a chunked body (chunk extensions ignored, trailer read and dropped).
pub(crate) fn decode_chunked(r: &mut impl BufRead, until: Until) -> Result<Vec<u8>, HttpError> {
    let mut body = Vec::new();
    loop {
        let line = require_line(r, "next chunk size")?;
        let size = parse_chunk_size(&line)?;
        if size == 0 {
            // The trailer: header lines up to an empty line.
            for _ in 0..=MAX_HEADERS {
                if require_line(r, "end of the chunked trailer")?.is_empty() {
                    return Ok(body);
                }
            }
            return Err(malformed(format!("more than {MAX_HEADERS} trailer lines")));
        }
        if size > MAX_BODY - body.len() {
            return Err(too_large());
        }
        let start = body.len();
        append_exact(r, size, &mut body)?;
        if !require_line(r, "end of a chunk")?.is_empty() {
            return Err(malformed("chunk data longer than its size"));
        }
        if until == Until::FirstLine && body[start..].contains(&b'\n') {
            return Ok(body);
        }
    }
}

fn parse_chunk_size(line: &[u8]) -> Result<usize, HttpError> {
    let size = line.split(|&b| b == b';').next().unwrap_or_default();
    let size = size.trim_ascii();
    let bad = || {
        malformed(format!(
            "bad chunk size line {:?}",
            String::from_utf8_lossy(line)
        ))
    };
    if size.is_empty() || size.len() > 15 || !size.iter().all(u8::is_ascii_hexdigit) {
        return Err(bad());
    }
    let text = std::str::from_utf8(size).map_err(|_| bad())?;
    usize::from_str_radix(text, 16).map_err(|_| bad())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn read(bytes: &[u8]) -> Result<Response, HttpError> {
        read_response(&mut io::BufReader::new(bytes), Until::End)
    }

    /// `body` as a chunked encoding with chunks of the given sizes (cycled; 0 → 1).
    fn chunk(body: &[u8], sizes: &[usize], extension: bool, trailer: bool) -> Vec<u8> {
        let mut out = Vec::new();
        let mut rest = body;
        let mut i = 0;
        while !rest.is_empty() {
            let n = sizes
                .get(i % sizes.len().max(1))
                .copied()
                .unwrap_or(1)
                .max(1);
            let n = n.min(rest.len());
            let ext = if extension { ";name=value" } else { "" };
            out.extend_from_slice(format!("{n:x}{ext}\r\n").as_bytes());
            out.extend_from_slice(&rest[..n]);
            out.extend_from_slice(b"\r\n");
            rest = &rest[n..];
            i += 1;
        }
        out.extend_from_slice(b"0\r\n");
        if trailer {
            out.extend_from_slice(b"Grpc-Trailer-Content-Type: application/grpc\r\n");
        }
        out.extend_from_slice(b"\r\n");
        out
    }

    #[test]
    fn writes_one_post_with_length_and_close() {
        let mut out = Vec::new();
        write_request(&mut out, "127.0.0.1:2379", "/v3/kv/range", b"{}").unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with("POST /v3/kv/range HTTP/1.1\r\nHost: 127.0.0.1:2379\r\n"));
        assert!(text.contains("\r\nContent-Length: 2\r\n"));
        assert!(text.contains("\r\nConnection: close\r\n"));
        assert!(text.ends_with("\r\n\r\n{}"));
    }

    #[test]
    fn reads_content_length_body() {
        let r = read(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}extra")
            .unwrap();
        assert_eq!(
            r,
            Response {
                status: 200,
                body: b"{}".to_vec()
            }
        );
    }

    #[test]
    fn reads_chunked_body_with_trailer_as_etcd_sends_errors() {
        let raw = b"HTTP/1.1 404 Not Found\r\nTrailer: Grpc-Trailer-Content-Type\r\n\
            Transfer-Encoding: chunked\r\n\r\n6\r\n{\"a\":1\r\n1\r\n}\r\n0\r\n\
            Grpc-Trailer-Content-Type: application/grpc\r\n\r\n";
        let r = read(raw).unwrap();
        assert_eq!(r.status, 404);
        assert_eq!(r.body, b"{\"a\":1}");
    }

    #[test]
    fn reads_until_close_without_framing() {
        let r = read(b"HTTP/1.0 404 Not Found\r\n\r\nNot Found\n").unwrap();
        assert_eq!(
            r,
            Response {
                status: 404,
                body: b"Not Found\n".to_vec()
            }
        );
    }

    #[test]
    fn skips_100_continue() {
        let r = read(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nx")
            .unwrap();
        assert_eq!(r.status, 200);
    }

    #[test]
    fn first_line_stops_before_the_stream_ends() {
        // A keepalive stream that has sent one message and not (yet) its end.
        let raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\n{}\n\n\r\n";
        let r = read_response(&mut io::BufReader::new(&raw[..]), Until::FirstLine).unwrap();
        assert_eq!(r.body, b"{}\n\n");
        assert!(
            read(raw).is_err(),
            "reading to the end needs the last chunk"
        );
    }

    #[test]
    fn status_lines() {
        assert_eq!(
            parse_status_line(b"HTTP/1.1 503 Service Unavailable").unwrap(),
            503
        );
        assert_eq!(parse_status_line(b"HTTP/1.1 200").unwrap(), 200);
        for bad in [
            &b"HTTP/2 200 OK"[..],
            b"HTTP/1.1 20 OK",
            b"HTTP/1.1 2000 OK",
            b"",
            b"\xff",
        ] {
            assert!(parse_status_line(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn malformed_responses_are_errors() {
        for bad in [
            &b""[..],
            b"HTTP/1.1 200 OK\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nab",
            b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
            b"HTTP/1.1 200 OK\r\nNoColon\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n+1\r\nx\r\n0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nxy\r\n0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffffffffff\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n7fffffff\r\nabc",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nx\r\n0\r\n",
        ] {
            assert!(read(bad).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn a_line_without_end_is_bounded() {
        let mut raw = b"HTTP/1.1 200 OK\r\nX: ".to_vec();
        raw.resize(raw.len() + 2 * MAX_LINE, b'a');
        assert!(matches!(read(&raw), Err(HttpError::Malformed(_))));
    }

    proptest! {
        #[test]
        fn chunked_round_trips(
            body in proptest::collection::vec(any::<u8>(), 0..4096),
            sizes in proptest::collection::vec(1usize..600, 1..8),
            extension: bool,
            trailer: bool,
        ) {
            let encoded = chunk(&body, &sizes, extension, trailer);
            let decoded = decode_chunked(&mut io::BufReader::new(&encoded[..]), Until::End).unwrap();
            prop_assert_eq!(decoded, body);
        }

        #[test]
        fn chunked_truncated_is_an_error(
            body in proptest::collection::vec(any::<u8>(), 1..512),
            sizes in proptest::collection::vec(1usize..100, 1..4),
            cut in any::<proptest::sample::Index>(),
        ) {
            let encoded = chunk(&body, &sizes, false, false);
            let cut = cut.index(encoded.len());
            let result = decode_chunked(&mut io::BufReader::new(&encoded[..cut]), Until::End);
            prop_assert!(result.is_err());
        }

        #[test]
        fn arbitrary_input_never_panics(raw in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode_chunked(&mut io::BufReader::new(&raw[..]), Until::End);
            let mut response = b"HTTP/1.1 200 OK\r\n".to_vec();
            response.extend_from_slice(&raw);
            let _ = read(&response);
        }

        #[test]
        fn chunk_like_input_never_panics(
            parts in proptest::collection::vec(
                prop_oneof![
                    Just(b"\r\n".to_vec()),
                    Just(b"0".to_vec()),
                    Just(b";x=y".to_vec()),
                    "[0-9a-fA-F]{1,17}".prop_map(String::into_bytes),
                    proptest::collection::vec(any::<u8>(), 0..8),
                ],
                0..24,
            ),
        ) {
            let raw = parts.concat();
            let _ = decode_chunked(&mut io::BufReader::new(&raw[..]), Until::End);
            let _ = decode_chunked(&mut io::BufReader::new(&raw[..]), Until::FirstLine);
        }
    }
}
