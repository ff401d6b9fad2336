//! A small synchronous etcd v3 client, and leader election on top of it, for the adaptation
//! manager's replicated mode (three managers sharing their state in an etcd cluster, one of
//! them leading).
//!
//! **Synchronous** because the manager's storage layer is: it is called as plain functions from
//! many places, and a blocking client keeps it that way (no runtime to enter, no futures to
//! thread through).
//!
//! **etcd's JSON gateway over HTTP/1.1** (`POST /v3/kv/range`, `/v3/kv/txn`, `/v3/lease/*`,
//! `/v3/maintenance/status`) instead of gRPC: no protoc, no generated code, no HTTP/2 stack, only
//! `std::net`, `serde_json` and base64. The JSON is proto3's mapping of etcd's messages (see
//! `wire.rs` for what was checked against etcd 3.4.23).
//!
//! **One TCP connection per request** (`Connection: close`): no pool to keep healthy, and a
//! failed member is noticed at the next request. Measured on loopback (etcd 3.4.23, the 2-core
//! development machine, release build): a get takes 0.46 ms, a one-put transaction 0.70 ms, a
//! status 0.43 ms, in all; keeping the connection open would save about 0.13 ms a request (a
//! Python client: 0.46 ms kept alive, 0.60 ms with a connection each). The manager's storage
//! writes far less often than that matters.
//!
//! **Endpoints and failover.** A request goes to the endpoint that answered last. When a
//! member cannot be reached, times out, or says it cannot serve now (HTTP 503, or 429 "too many
//! requests"), the next endpoints are tried in turn, each once, and if none answers the error
//! ([`EtcdError::Unreachable`]) names every endpoint tried and the last cause. A transaction is
//! different once it may have reached a member: after a timeout, a broken connection or an
//! etcd-side timeout its outcome is unknown, so it is not sent again anywhere and the error is
//! [`EtcdError::UnknownOutcome`]; the caller re-reads and decides (ranges, status, lease grant,
//! keepalive and revoke are retried on the next endpoint in every case). A transaction is still
//! tried on the next endpoint when nothing was sent (connection refused) or the member said it
//! has no leader, as then it was certainly not applied. Expect the unknown outcome when a
//! leader dies: a follower that has not yet noticed forwards the write to the dead leader and
//! answers only at etcd's own request timeout (5 s + 2 election timeouts), so the client's
//! timeout fires first; reads meanwhile fail over and are served once a new leader is elected.
//!
//! **TLS.** [`Etcd::with_tls`] speaks HTTPS with the rustls configuration it is given (the
//! manager's: its certificate as client certificate, the federation CA as the only root, each
//! member's certificate checked against the address or name in its endpoint), for etcd run with
//! `--client-cert-auth`. [`Etcd::new`] speaks plain HTTP, for loopback and tests.
//!
//! **Limits.** etcd's own authentication (users, roles) is not supported. Reads are linearizable (the
//! default), ranges are returned whole (no paging), watches are not offered. A host name in
//! an endpoint is resolved outside the request's deadline.
//!
//! # Example
//! ```no_run
//! use std::time::Duration;
//! use viola_etcd::{Acquire, Etcd, Op, Txn};
//!
//! let etcd = Etcd::new(&["http://127.0.0.1:2379".to_owned()], Duration::from_secs(2))?;
//! let lease = etcd.lease_grant(5)?;
//! if let Acquire::Won(leadership) = etcd.try_acquire(b"/viola/leader", b"manager-a", lease.id)? {
//!     let write = Txn::new().when(leadership.fence()).then(Op::put(b"/viola/state", b"{}"));
//!     assert!(etcd.txn(&write)?.succeeded, "deposed: another manager leads now");
//! }
//! # Ok::<(), viola_etcd::EtcdError>(())
//! ```

mod conn;
mod election;
mod error;
mod http;
mod txn;
mod wire;

use std::io::BufReader;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde::de::{self, DeserializeOwned};
use serde_json::{Value, json};

#[cfg(feature = "testing")]
pub mod testing;

pub use election::{Acquire, Leadership};
pub use error::{AttemptError, EtcdError};
pub use http::HttpError;
pub use txn::{Compare, Op, OpResponse, Txn, TxnResult};

use conn::Transport;
use http::{Response, Until};
use wire::{b64, int};

/// One key as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValue {
    pub key: Vec<u8>,
    pub value: Vec<u8>,
    /// The revision that created the key (since its last deletion).
    pub create_revision: i64,
    /// The revision of its last modification.
    pub mod_revision: i64,
    /// The number of modifications since creation (1 after the first put).
    pub version: i64,
    /// The lease the key is attached to (0: none).
    pub lease: i64,
}

impl From<wire::Kv> for KeyValue {
    fn from(kv: wire::Kv) -> Self {
        Self {
            key: kv.key,
            value: kv.value,
            create_revision: kv.create_revision,
            mod_revision: kv.mod_revision,
            version: kv.version,
            lease: kv.lease,
        }
    }
}

/// A lease: keys attached to it are deleted when it ends (revoked, or not kept alive for its
/// TTL).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease {
    pub id: i64,
    /// The TTL etcd granted, in seconds. etcd grants at least its minimum TTL (1.5 election
    /// timeouts, rounded up: 2 s with a 1 s election timeout), so this may exceed the request.
    pub ttl_s: i64,
}

/// One member's view of the cluster, as `/v3/maintenance/status` gives it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    /// The endpoint that answered.
    pub endpoint: String,
    pub cluster_id: u64,
    pub member_id: u64,
    /// The leader's member id; 0 when the member knows of no leader (see `errors`).
    pub leader: u64,
    pub raft_term: u64,
    pub raft_index: u64,
    pub raft_applied_index: u64,
    /// The store's current revision.
    pub revision: i64,
    /// etcd's version, e.g. "3.4.23".
    pub version: String,
    pub db_size: i64,
    pub db_size_in_use: i64,
    pub is_learner: bool,
    /// Problems the member reports, e.g. "etcdserver: no leader".
    pub errors: Vec<String>,
}

/// The end of the range of keys starting with `prefix`, for [`Etcd::range`] and
/// [`Op::DeleteRange`]: `prefix` with trailing 0xff bytes dropped and the last byte then
/// incremented. A prefix of only 0xff bytes (or empty) has no such end; it gives `"\0"`, which
/// etcd reads as "every key from the start on".
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    match prefix.iter().rposition(|&b| b != 0xff) {
        Some(i) => {
            let mut end = prefix[..=i].to_vec();
            end[i] += 1;
            end
        }
        None => vec![0],
    }
}

/// Whether a request may be sent again to another endpoint after it may have reached one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Retry {
    /// Reads, and calls whose repetition is harmless.
    Always,
    /// Transactions: only when certainly not applied.
    UnlessMaybeApplied,
}

/// How a non-200 answer is taken.
enum Verdict {
    /// Not applied; another endpoint may serve it.
    TryNext(AttemptError),
    /// Final.
    Fail(EtcdError),
}

/// etcd's messages for requests it turned away before proposing them.
const NOT_APPLIED: &[&str] = &[
    "etcdserver: no leader",
    "etcdserver: not capable",
    "etcdserver: leader changed",
    "etcdserver: too many requests",
];

/// Parses "host:port", "http://host:port" or "http://host:port/" (with `tls`: "https://"
/// instead of "http://").
fn parse_endpoint(raw: &str, tls: bool) -> Result<String, EtcdError> {
    let text = raw.trim();
    let lower = text.to_ascii_lowercase();
    let (ours, other) = if tls {
        ("https://", "http://")
    } else {
        ("http://", "https://")
    };
    if lower.starts_with(other) {
        return Err(EtcdError::Config(if tls {
            format!("endpoint {raw:?}: this client speaks TLS to etcd; give https:// endpoints")
        } else {
            format!("endpoint {raw:?}: TLS needs a TLS configuration (Etcd::with_tls)")
        }));
    }
    let rest = if lower.starts_with(ours) {
        &text[ours.len()..]
    } else {
        text
    };
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    let bad = |why: &str| EtcdError::Config(format!("endpoint {raw:?} {why} (expected host:port)"));
    if rest.contains('/') || rest.contains("://") {
        return Err(bad("is not host:port"));
    }
    let (host, port) = rest.rsplit_once(':').ok_or_else(|| bad("has no port"))?;
    if host.is_empty() {
        return Err(bad("has no host"));
    }
    match port.parse::<u16>() {
        Ok(p) if p != 0 => Ok(rest.to_owned()),
        _ => Err(bad("has no valid port")),
    }
}

/// A client of one etcd cluster. Cheap to share between threads (`&Etcd` is enough: every
/// request opens its own connection).
pub struct Etcd {
    endpoints: Vec<String>,
    timeout: Duration,
    /// Index into `endpoints` of the one that answered last.
    current: AtomicUsize,
    /// HTTPS with this configuration; `None`: plain HTTP.
    tls: Option<Arc<rustls::ClientConfig>>,
}

impl std::fmt::Debug for Etcd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Etcd")
            .field("endpoints", &self.endpoints)
            .field("timeout", &self.timeout)
            .field("tls", &self.tls.is_some())
            .finish_non_exhaustive()
    }
}

impl Etcd {
    /// A client of the cluster at `endpoints` ("host:port", optionally with "http://"), each
    /// request bounded by `timeout` (connect, send and answer together). Nothing is contacted
    /// yet.
    pub fn new(endpoints: &[String], timeout: Duration) -> Result<Self, EtcdError> {
        Self::build(endpoints, timeout, None)
    }

    /// A client of the cluster at `endpoints` ("host:port", optionally with "https://") over
    /// TLS with `tls`: the member's certificate is checked against the host in its endpoint
    /// (an IP address or a DNS name), and `tls`'s client certificate is presented. Offer no
    /// ALPN protocol in it: etcd serves its JSON gateway on HTTP/1.1 and Go servers refuse a
    /// connection whose ALPN list they share nothing with.
    pub fn with_tls(
        endpoints: &[String],
        timeout: Duration,
        tls: Arc<rustls::ClientConfig>,
    ) -> Result<Self, EtcdError> {
        Self::build(endpoints, timeout, Some(tls))
    }

    fn build(
        endpoints: &[String],
        timeout: Duration,
        tls: Option<Arc<rustls::ClientConfig>>,
    ) -> Result<Self, EtcdError> {
        if endpoints.is_empty() {
            return Err(EtcdError::Config("no etcd endpoint given".to_owned()));
        }
        if timeout.is_zero() {
            return Err(EtcdError::Config("the request timeout is zero".to_owned()));
        }
        let endpoints = endpoints
            .iter()
            .map(|e| parse_endpoint(e, tls.is_some()))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            endpoints,
            timeout,
            current: AtomicUsize::new(0),
            tls,
        })
    }

    /// The endpoints, as "host:port".
    pub fn endpoints(&self) -> &[String] {
        &self.endpoints
    }

    /// The endpoint the next request goes to first: the one that answered last.
    pub fn current_endpoint(&self) -> &str {
        let i = self.current.load(Ordering::Relaxed) % self.endpoints.len();
        &self.endpoints[i]
    }

    /// The value of `key`, if it exists.
    pub fn get(&self, key: &[u8]) -> Result<Option<KeyValue>, EtcdError> {
        Ok(self.range(key, b"", Some(1), false)?.into_iter().next())
    }

    /// The keys in `[start, end)`, by key ascending (or descending), at most `limit` of them
    /// (`None`: all). An empty `end` means just `start`; `prefix_end(p)` as `end` with `p` as
    /// `start` means every key starting with `p`; `end` = `"\0"` means every key from `start`
    /// on. A descending read sorts the whole range in etcd before applying `limit`.
    pub fn range(
        &self,
        start: &[u8],
        end: &[u8],
        limit: Option<usize>,
        descending: bool,
    ) -> Result<Vec<KeyValue>, EtcdError> {
        if limit == Some(0) {
            return Ok(Vec::new());
        }
        let mut request = serde_json::Map::new();
        request.insert("key".to_owned(), Value::String(b64(start)));
        if !end.is_empty() {
            request.insert("range_end".to_owned(), Value::String(b64(end)));
        }
        if let Some(limit) = limit {
            let limit = i64::try_from(limit).unwrap_or(i64::MAX);
            request.insert("limit".to_owned(), Value::String(int(limit)));
        }
        if descending {
            request.insert("sort_order".to_owned(), Value::from("DESCEND"));
            request.insert("sort_target".to_owned(), Value::from("KEY"));
        }
        let (_, response): (_, wire::RangeResponse) = self.call(
            "range",
            "/v3/kv/range",
            &Value::Object(request),
            Retry::Always,
        )?;
        Ok(response.kvs.into_iter().map(KeyValue::from).collect())
    }

    /// Runs a transaction. [`EtcdError::UnknownOutcome`] means it may or may not have been
    /// applied: re-read before sending it again.
    pub fn txn(&self, txn: &Txn) -> Result<TxnResult, EtcdError> {
        let (endpoint, response) = self.call(
            "txn",
            "/v3/kv/txn",
            &txn.to_json(),
            Retry::UnlessMaybeApplied,
        )?;
        TxnResult::from_wire(response).map_err(|detail| EtcdError::Decode {
            op: "txn",
            endpoint,
            source: de::Error::custom(detail),
        })
    }

    /// Sets `key` to `value` (attached to `lease` if given), unconditionally; the revision of
    /// the write. A one-operation [`Etcd::txn`], with its unknown-outcome rule.
    pub fn put(&self, key: &[u8], value: &[u8], lease: Option<i64>) -> Result<i64, EtcdError> {
        let op = Op::Put {
            key: key.to_vec(),
            value: value.to_vec(),
            lease,
        };
        Ok(self.txn(&Txn::new().then(op))?.revision)
    }

    /// Deletes the keys in `[start, end)` (empty `end`: just `start`); how many there were.
    pub fn delete_range(&self, start: &[u8], end: &[u8]) -> Result<i64, EtcdError> {
        let op = if end.is_empty() {
            Op::delete(start)
        } else {
            Op::delete_range(start, end)
        };
        let result = self.txn(&Txn::new().then(op))?;
        Ok(match result.responses.first() {
            Some(OpResponse::Delete { deleted }) => *deleted,
            _ => 0,
        })
    }

    /// Grants a lease of `ttl_s` seconds (etcd may grant more: see [`Lease::ttl_s`]).
    pub fn lease_grant(&self, ttl_s: i64) -> Result<Lease, EtcdError> {
        let (endpoint, response): (_, wire::LeaseGrantResponse) = self.call(
            "lease grant",
            "/v3/lease/grant",
            &json!({ "TTL": int(ttl_s) }),
            Retry::Always,
        )?;
        if !response.error.is_empty() {
            return Err(EtcdError::Refused {
                op: "lease grant",
                endpoint,
                status: 200,
                code: None,
                message: response.error,
            });
        }
        if response.id == 0 {
            return Err(EtcdError::Unexpected {
                op: "lease grant",
                detail: format!("{endpoint} granted a lease without an ID"),
            });
        }
        Ok(Lease {
            id: response.id,
            ttl_s: response.ttl,
        })
    }

    /// Renews lease `id` once; the TTL it has again, in seconds. 0: the lease no longer exists
    /// (it expired or was revoked) and every key attached to it is gone.
    pub fn lease_keep_alive(&self, id: i64) -> Result<i64, EtcdError> {
        let (endpoint, message): (_, wire::StreamMessage<wire::LeaseKeepAliveResponse>) = self
            .call_with(
                "lease keepalive",
                "/v3/lease/keepalive",
                &json!({ "ID": int(id) }),
                Retry::Always,
                Until::FirstLine,
            )?;
        match message.result {
            Some(result) => Ok(result.ttl.max(0)),
            None => Err(EtcdError::Unexpected {
                op: "lease keepalive",
                detail: format!("{endpoint} answered without a result"),
            }),
        }
    }

    /// Revokes lease `id`, deleting every key attached to it. A lease that no longer exists
    /// (expired, or revoked by an earlier attempt whose answer was lost) is not an error.
    pub fn lease_revoke(&self, id: i64) -> Result<(), EtcdError> {
        let result: Result<(_, de::IgnoredAny), _> = self.call(
            "lease revoke",
            "/v3/lease/revoke",
            &json!({ "ID": int(id) }),
            Retry::Always,
        );
        match result {
            Ok(_) => Ok(()),
            Err(EtcdError::Refused { message, .. })
                if message == "etcdserver: requested lease not found" =>
            {
                tracing::debug!(lease = id, "lease to revoke was already gone");
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// The status of the member that answers (the one that answered last, or the next
    /// reachable one).
    pub fn status(&self) -> Result<Status, EtcdError> {
        let (endpoint, response) = self.call(
            "status",
            "/v3/maintenance/status",
            &json!({}),
            Retry::Always,
        )?;
        Ok(Self::status_from(endpoint, response))
    }

    /// The status of the member at `endpoint` (one of [`Etcd::endpoints`] or any other
    /// "host:port"), without failover.
    pub fn status_of(&self, endpoint: &str) -> Result<Status, EtcdError> {
        let endpoint = parse_endpoint(endpoint, self.tls.is_some())?;
        let one = Self {
            endpoints: vec![endpoint],
            timeout: self.timeout,
            current: AtomicUsize::new(0),
            tls: self.tls.clone(),
        };
        one.status()
    }

    fn status_from(endpoint: String, r: wire::StatusResponse) -> Status {
        Status {
            endpoint,
            cluster_id: r.header.cluster_id,
            member_id: r.header.member_id,
            leader: r.leader,
            raft_term: r.raft_term,
            raft_index: r.raft_index,
            raft_applied_index: r.raft_applied_index,
            revision: r.header.revision,
            version: r.version,
            db_size: r.db_size,
            db_size_in_use: r.db_size_in_use,
            is_learner: r.is_learner,
            errors: r.errors,
        }
    }

    fn call<T: DeserializeOwned>(
        &self,
        op: &'static str,
        path: &str,
        request: &Value,
        retry: Retry,
    ) -> Result<(String, T), EtcdError> {
        self.call_with(op, path, request, retry, Until::End)
    }

    /// Sends `request` to the endpoints in turn, from the one that answered last, until one
    /// answers; decodes its answer. Returns the endpoint that answered too.
    fn call_with<T: DeserializeOwned>(
        &self,
        op: &'static str,
        path: &str,
        request: &Value,
        retry: Retry,
        until: Until,
    ) -> Result<(String, T), EtcdError> {
        let body = request.to_string().into_bytes();
        let n = self.endpoints.len();
        let first = self.current.load(Ordering::Relaxed) % n;
        let mut tried = Vec::with_capacity(n);
        let mut last = None;
        for i in 0..n {
            let index = (first + i) % n;
            let endpoint = &self.endpoints[index];
            tried.push(endpoint.clone());
            let started = Instant::now();
            let failure = match self.attempt(endpoint, path, &body, until) {
                Ok(response) => match Self::judge(op, endpoint, response, retry, until) {
                    Ok(body) => {
                        self.current.store(index, Ordering::Relaxed);
                        tracing::trace!(op, endpoint, elapsed = ?started.elapsed(), "etcd answered");
                        return serde_json::from_slice(&body)
                            .map(|decoded| (endpoint.clone(), decoded))
                            .map_err(|source| EtcdError::Decode {
                                op,
                                endpoint: endpoint.clone(),
                                source,
                            });
                    }
                    Err(Verdict::Fail(e)) => {
                        self.current.store(index, Ordering::Relaxed);
                        return Err(e);
                    }
                    Err(Verdict::TryNext(e)) => e,
                },
                Err((maybe_applied, e)) => {
                    if maybe_applied && retry == Retry::UnlessMaybeApplied {
                        return Err(EtcdError::UnknownOutcome { op, source: e });
                    }
                    e
                }
            };
            if i + 1 < n {
                tracing::warn!(
                    op,
                    endpoint,
                    error = %failure,
                    cause = ?std::error::Error::source(&failure).map(ToString::to_string),
                    "etcd endpoint failed; trying the next one"
                );
            }
            last = Some(failure);
        }
        match last {
            Some(last) => Err(EtcdError::Unreachable { op, tried, last }),
            None => Err(EtcdError::Config("no etcd endpoint given".to_owned())),
        }
    }

    /// Sends one request to one endpoint and reads its answer. On failure, also whether the
    /// request may have reached etcd whole (and so may have been applied).
    fn attempt(
        &self,
        endpoint: &str,
        path: &str,
        body: &[u8],
        until: Until,
    ) -> Result<Response, (bool, AttemptError)> {
        let deadline = Instant::now() + self.timeout;
        let mut conn =
            Transport::connect(endpoint, deadline, self.tls.as_ref()).map_err(|source| {
                (
                    false,
                    AttemptError::Connect {
                        endpoint: endpoint.to_owned(),
                        source,
                    },
                )
            })?;
        let sent = http::write_request(&mut conn, endpoint, path, body);
        // Even when sending failed, etcd may have answered first (a request too large is
        // refused before it is read whole): read what it said.
        let read = http::read_response(&mut BufReader::new(conn), until);
        match (read, sent) {
            (Ok(response), _) => Ok(response),
            // A request not written whole cannot have been applied.
            (Err(_), Err(e)) => Err((false, self.exchange_error(endpoint, e.into()))),
            (Err(e), Ok(())) => Err((true, self.exchange_error(endpoint, e))),
        }
    }

    fn exchange_error(&self, endpoint: &str, source: HttpError) -> AttemptError {
        let endpoint = endpoint.to_owned();
        if source.is_timeout() {
            AttemptError::TimedOut {
                endpoint,
                timeout: self.timeout,
                source,
            }
        } else {
            AttemptError::Exchange { endpoint, source }
        }
    }

    /// The body of a successful answer, or how to take a failed one.
    fn judge(
        op: &'static str,
        endpoint: &str,
        response: Response,
        retry: Retry,
        until: Until,
    ) -> Result<Vec<u8>, Verdict> {
        let mut status = response.status;
        let mut body = response.body;
        if until == Until::FirstLine {
            if let Some(end) = body.iter().position(|&b| b == b'\n') {
                body.truncate(end);
            }
            // A stream that fails after its headers went out says so in a message, under 200.
            if status == 200
                && let Ok(wire::StreamMessage::<de::IgnoredAny> { error: Some(e), .. }) =
                    serde_json::from_slice(&body)
            {
                status = if e.http_code == 0 { 503 } else { e.http_code };
            }
        }
        if status == 200 {
            return Ok(body);
        }
        let error = wire::parse_error_body(&body);
        let unavailable = || AttemptError::Unavailable {
            endpoint: endpoint.to_owned(),
            status,
            message: error.message.clone(),
        };
        let turned_away =
            (status == 503 || status == 429) && NOT_APPLIED.contains(&error.message.as_str());
        // 503: gRPC's Unavailable (no quorum, request timed out, stopping); 504 and 500 with a
        // deadline: the gateway's or etcd's own timeout. A transaction may have been applied.
        let unavailable_status = status == 503
            || status == 504
            || (status == 500
                && (error.message.contains("deadline") || error.message.contains("timed out")));
        if turned_away || (unavailable_status && retry == Retry::Always) {
            Err(Verdict::TryNext(unavailable()))
        } else if unavailable_status || status == 500 && retry == Retry::UnlessMaybeApplied {
            Err(Verdict::Fail(EtcdError::UnknownOutcome {
                op,
                source: unavailable(),
            }))
        } else {
            Err(Verdict::Fail(EtcdError::Refused {
                op,
                endpoint: endpoint.to_owned(),
                status,
                code: error.code,
                message: error.message,
            }))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn prefix_end_follows_etcd() {
        assert_eq!(prefix_end(b"a"), b"b");
        assert_eq!(prefix_end(b"/viola/"), b"/viola0");
        assert_eq!(prefix_end(b"a\xff"), b"b");
        assert_eq!(prefix_end(b"a\xfe\xff\xff"), b"a\xff");
        assert_eq!(prefix_end(b"\xff\xff"), b"\0");
        assert_eq!(prefix_end(b""), b"\0");
    }

    #[test]
    fn endpoints_are_checked() {
        let ok = |s: &str| parse_endpoint(s, false).unwrap();
        assert_eq!(ok("127.0.0.1:2379"), "127.0.0.1:2379");
        assert_eq!(ok("http://127.0.0.1:2379"), "127.0.0.1:2379");
        assert_eq!(ok("HTTP://etcd-a:2379/"), "etcd-a:2379");
        assert_eq!(ok("[::1]:2379"), "[::1]:2379");
        let err = |s: &str| parse_endpoint(s, false).unwrap_err().to_string();
        assert!(err("https://127.0.0.1:2379").contains("TLS needs a TLS configuration"));
        assert_eq!(
            parse_endpoint("https://10.0.0.1:2379", true).unwrap(),
            "10.0.0.1:2379"
        );
        assert!(
            parse_endpoint("http://10.0.0.1:2379", true)
                .unwrap_err()
                .to_string()
                .contains("give https://")
        );
        assert!(err("127.0.0.1").contains("has no port"));
        assert!(err("127.0.0.1:0").contains("no valid port"));
        assert!(err(":2379").contains("no host"));
        assert!(err("http://a:1/v3").contains("not host:port"));
        assert!(err("unix://x:1").contains("not host:port"));
        let none = Etcd::new(&[], Duration::from_secs(1))
            .unwrap_err()
            .to_string();
        assert!(none.contains("no etcd endpoint"), "{none}");
        let zero = Etcd::new(&["a:1".to_owned()], Duration::ZERO)
            .unwrap_err()
            .to_string();
        assert!(zero.contains("timeout"), "{zero}");
    }

    fn verdict(status: u16, body: &str, retry: Retry) -> &'static str {
        let response = Response {
            status,
            body: body.as_bytes().to_vec(),
        };
        match Etcd::judge("txn", "e:1", response, retry, Until::End) {
            Ok(_) => "ok",
            Err(Verdict::TryNext(_)) => "next",
            Err(Verdict::Fail(EtcdError::UnknownOutcome { .. })) => "unknown",
            Err(Verdict::Fail(EtcdError::Refused { .. })) => "refused",
            Err(Verdict::Fail(_)) => "other",
        }
    }

    #[test]
    fn answers_are_judged_by_whether_they_may_have_applied() {
        use Retry::{Always, UnlessMaybeApplied as Txn};
        let body = |m: &str| format!(r#"{{"error":"{m}","message":"{m}","code":14}}"#);
        let no_leader = body("etcdserver: no leader");
        let timed_out = body("etcdserver: request timed out");
        let deadline = body("context deadline exceeded");
        let too_many = body("etcdserver: too many operations in txn request");
        let too_large = body("grpc: received message larger than max (2097172 vs. 2097152)");
        assert_eq!(verdict(200, "{}", Txn), "ok");
        assert_eq!(verdict(503, &no_leader, Txn), "next");
        assert_eq!(verdict(503, &timed_out, Txn), "unknown");
        assert_eq!(verdict(503, &timed_out, Always), "next");
        assert_eq!(verdict(500, &deadline, Txn), "unknown");
        assert_eq!(verdict(500, &deadline, Always), "next");
        assert_eq!(verdict(500, "oops", Txn), "unknown");
        assert_eq!(verdict(500, "oops", Always), "refused");
        assert_eq!(verdict(400, &too_many, Txn), "refused");
        assert_eq!(verdict(429, &too_large, Txn), "refused");
        assert_eq!(
            verdict(429, &body("etcdserver: too many requests"), Txn),
            "next"
        );
        assert_eq!(verdict(404, "Not Found", Always), "refused");
    }

    #[test]
    fn stream_errors_under_200_are_errors() {
        let body =
            r#"{"error":{"grpc_code":14,"http_code":503,"message":"etcdserver: no leader"}}"#;
        let response = Response {
            status: 200,
            body: format!("{body}\n").into_bytes(),
        };
        let verdict = Etcd::judge(
            "lease keepalive",
            "e:1",
            response,
            Retry::Always,
            Until::FirstLine,
        );
        assert!(matches!(
            verdict,
            Err(Verdict::TryNext(AttemptError::Unavailable {
                status: 503,
                ..
            }))
        ));
    }

    proptest! {
        #[test]
        fn prefix_end_bounds_every_key_with_the_prefix(
            prefix in proptest::collection::vec(
                prop_oneof![Just(0xffu8), Just(0u8), any::<u8>()], 1..8),
            suffix in proptest::collection::vec(any::<u8>(), 0..8),
        ) {
            let end = prefix_end(&prefix);
            let key = [prefix.as_slice(), suffix.as_slice()].concat();
            prop_assert!(key.as_slice() >= prefix.as_slice());
            if prefix.iter().all(|&b| b == 0xff) {
                // No finite end: "\0" is etcd's "to the end of the keyspace".
                prop_assert_eq!(end, vec![0]);
            } else {
                prop_assert!(key.as_slice() < end.as_slice());
                // And the end is tight: it does not start with the prefix.
                prop_assert!(!end.starts_with(&prefix));
            }
        }
    }
}
