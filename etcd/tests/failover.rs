//! Endpoint failover, with stand-in servers playing a dead, hung or leaderless member (no etcd
//! needed: these cases are hard to produce on demand with a real one).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use viola_etcd::{AttemptError, Etcd, EtcdError, Op, Txn};

/// How a stand-in answers every request.
#[derive(Clone)]
enum Behaviour {
    /// Reads the request, then says nothing for this long and closes.
    Hang(Duration),
    /// Reads the request and answers `status` with `body` (chunked, as etcd's errors are).
    Answer(u16, &'static str),
}

struct StandIn {
    endpoint: String,
    requests: Arc<AtomicUsize>,
}

impl StandIn {
    fn start(behaviour: Behaviour) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let endpoint = listener.local_addr().unwrap().to_string();
        let requests = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&requests);
        // The thread ends with the test binary; each connection is served on its own thread.
        thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let behaviour = behaviour.clone();
                let counter = Arc::clone(&counter);
                thread::spawn(move || serve(stream, &behaviour, &counter));
            }
        });
        Self { endpoint, requests }
    }

    fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }
}

fn serve(stream: TcpStream, behaviour: &Behaviour, counter: &AtomicUsize) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut length = 0;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
            length = v.trim().parse().unwrap();
        }
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body).unwrap();
    counter.fetch_add(1, Ordering::SeqCst);
    let mut stream = stream;
    match behaviour {
        Behaviour::Hang(time) => thread::sleep(*time),
        Behaviour::Answer(status, body) => {
            let response = format!(
                "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\n\
                 Transfer-Encoding: chunked\r\n\r\n{:x}\r\n{body}\r\n0\r\n\
                 Grpc-Trailer-Content-Type: application/grpc\r\n\r\n",
                body.len()
            );
            let _ = stream.write_all(response.as_bytes());
        }
    }
}

/// A port nothing listens on.
fn closed_port() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().to_string()
}

const TXN_OK: &str = r#"{"header":{"revision":"7"},"succeeded":true,"responses":[{"response_put":{"header":{"revision":"7"}}}]}"#;
const NO_LEADER: &str =
    r#"{"error":"etcdserver: no leader","message":"etcdserver: no leader","code":14}"#;
const TIMED_OUT: &str = r#"{"error":"etcdserver: request timed out","message":"etcdserver: request timed out","code":14}"#;

fn put() -> Txn {
    Txn::new().then(Op::put(b"k", b"v"))
}

#[test]
fn unreachable_names_every_endpoint_tried_and_the_last_cause() {
    let endpoints = vec![closed_port(), format!("http://{}", closed_port())];
    let etcd = Etcd::new(&endpoints, Duration::from_millis(500)).unwrap();
    let err = etcd.get(b"k").unwrap_err();
    let EtcdError::Unreachable { op, tried, last } = &err else {
        panic!("expected Unreachable, got {err:?}");
    };
    assert_eq!(*op, "range");
    assert_eq!(tried, etcd.endpoints());
    assert!(matches!(last, AttemptError::Connect { .. }), "{last:?}");
    let text = err.to_string();
    assert!(
        text.contains(&endpoints[0]) && text.contains(&etcd.endpoints()[1]),
        "{text}"
    );
    let cause = std::error::Error::source(&err).unwrap().to_string();
    assert!(cause.contains(&etcd.endpoints()[1]), "{cause}");
    // Nothing was sent: a transaction is tried everywhere too.
    assert!(matches!(
        etcd.txn(&put()).unwrap_err(),
        EtcdError::Unreachable { .. }
    ));
}

#[test]
fn a_txn_that_times_out_is_an_unknown_outcome_and_not_resent() {
    let hung = StandIn::start(Behaviour::Hang(Duration::from_secs(3)));
    let good = StandIn::start(Behaviour::Answer(200, TXN_OK));
    let etcd = Etcd::new(
        &[hung.endpoint.clone(), good.endpoint.clone()],
        Duration::from_millis(300),
    )
    .unwrap();
    let started = Instant::now();
    let err = etcd.txn(&put()).unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(1));
    let EtcdError::UnknownOutcome {
        source: AttemptError::TimedOut { endpoint, .. },
        ..
    } = &err
    else {
        panic!("expected UnknownOutcome after a timeout, got {err:?}");
    };
    assert_eq!(endpoint, &hung.endpoint);
    assert!(
        err.to_string().contains("may or may not have been applied"),
        "{err}"
    );
    assert_eq!(
        (hung.requests(), good.requests()),
        (1, 0),
        "the txn was not resent"
    );

    // A read is idempotent: after the same timeout it goes on to the next endpoint, which is
    // then used first.
    assert_eq!(etcd.range(b"a", b"b", None, false).unwrap(), vec![]);
    assert_eq!((hung.requests(), good.requests()), (2, 1));
    assert_eq!(etcd.current_endpoint(), good.endpoint);
    assert!(etcd.txn(&put()).unwrap().succeeded);
    assert_eq!((hung.requests(), good.requests()), (2, 2));
}

#[test]
fn a_member_without_leader_is_skipped_even_for_a_txn() {
    let leaderless = StandIn::start(Behaviour::Answer(503, NO_LEADER));
    let good = StandIn::start(Behaviour::Answer(200, TXN_OK));
    let etcd = Etcd::new(
        &[leaderless.endpoint.clone(), good.endpoint.clone()],
        Duration::from_secs(2),
    )
    .unwrap();
    let result = etcd.txn(&put()).unwrap();
    assert!(result.succeeded);
    assert_eq!(result.revision, 7);
    assert_eq!((leaderless.requests(), good.requests()), (1, 1));
    assert_eq!(etcd.current_endpoint(), good.endpoint);
}

#[test]
fn an_etcd_side_timeout_of_a_txn_is_an_unknown_outcome() {
    let slow = StandIn::start(Behaviour::Answer(503, TIMED_OUT));
    let good = StandIn::start(Behaviour::Answer(200, TXN_OK));
    let etcd = Etcd::new(
        &[slow.endpoint.clone(), good.endpoint.clone()],
        Duration::from_secs(2),
    )
    .unwrap();
    let err = etcd.txn(&put()).unwrap_err();
    assert!(matches!(err, EtcdError::UnknownOutcome { .. }), "{err:?}");
    assert_eq!(err.etcd_message(), Some("etcdserver: request timed out"));
    assert_eq!(good.requests(), 0);
    // A status request is retried elsewhere (the stand-in's answer decodes as an empty status).
    assert!(etcd.status().is_ok());
    assert_eq!(good.requests(), 1);
}

#[test]
fn every_endpoint_unavailable_gives_the_last_members_message() {
    let a = StandIn::start(Behaviour::Answer(503, NO_LEADER));
    let b = StandIn::start(Behaviour::Answer(503, NO_LEADER));
    let etcd = Etcd::new(
        &[a.endpoint.clone(), b.endpoint.clone()],
        Duration::from_secs(2),
    )
    .unwrap();
    let err = etcd.lease_keep_alive(1).unwrap_err();
    assert!(matches!(err, EtcdError::Unreachable { .. }), "{err:?}");
    assert_eq!(err.etcd_message(), Some("etcdserver: no leader"));
    assert_eq!((a.requests(), b.requests()), (1, 1));
}
