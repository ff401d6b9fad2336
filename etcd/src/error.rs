//! What can go wrong, worded for the administrator who reads it: which request, which
//! endpoint(s), and etcd's own message when etcd answered. Messages name no source; print the
//! whole chain (`viola_common::errors::chain`) to see the cause.

use std::io;
use std::time::Duration;

use crate::http::HttpError;

/// Why one endpoint did not give an answer to one request.
#[derive(Debug, thiserror::Error)]
pub enum AttemptError {
    /// No TCP connection could be made (nothing was sent).
    #[error("cannot connect to etcd at {endpoint}")]
    Connect {
        endpoint: String,
        #[source]
        source: io::Error,
    },
    /// The request (possibly sent) got no complete answer before its deadline.
    #[error("etcd at {endpoint} did not answer within {timeout:?}")]
    TimedOut {
        endpoint: String,
        timeout: Duration,
        #[source]
        source: HttpError,
    },
    /// Sending the request or reading the answer failed (connection reset or closed, or not
    /// HTTP).
    #[error("the exchange with etcd at {endpoint} failed")]
    Exchange {
        endpoint: String,
        #[source]
        source: HttpError,
    },
    /// The member answered that it cannot serve requests now (no leader, not enough members
    /// for a quorum, overloaded, stopping): HTTP 503 or 429, or a server-side deadline.
    #[error("etcd at {endpoint} is unavailable (HTTP {status}): {message}")]
    Unavailable {
        endpoint: String,
        status: u16,
        message: String,
    },
}

impl AttemptError {
    /// The endpoint this attempt went to.
    pub fn endpoint(&self) -> &str {
        match self {
            Self::Connect { endpoint, .. }
            | Self::TimedOut { endpoint, .. }
            | Self::Exchange { endpoint, .. }
            | Self::Unavailable { endpoint, .. } => endpoint,
        }
    }
}

/// An error of this client.
#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    /// The client was given endpoints it cannot use.
    #[error("invalid etcd client configuration: {0}")]
    Config(String),
    /// No endpoint answered: each was tried once, in turn, starting with the one that answered
    /// last. `last` is the last endpoint's failure.
    #[error("no etcd endpoint could serve the {op} request (tried {})", .tried.join(", "))]
    Unreachable {
        op: &'static str,
        tried: Vec<String>,
        #[source]
        last: AttemptError,
    },
    /// etcd answered and refused the request: a limit (too many operations, request too large),
    /// a lease that does not exist, an invalid argument. Retrying the same request will not
    /// help. `message` is etcd's, `code` its gRPC status code when it gave one.
    #[error("etcd at {endpoint} refused the {op} request (HTTP {status}): {message}")]
    Refused {
        op: &'static str,
        endpoint: String,
        status: u16,
        code: Option<i64>,
        message: String,
    },
    /// etcd answered with something this client cannot read.
    #[error("cannot read etcd's answer to the {op} request from {endpoint}")]
    Decode {
        op: &'static str,
        endpoint: String,
        #[source]
        source: serde_json::Error,
    },
    /// etcd's answer reads, but contradicts itself.
    #[error("etcd's answer to the {op} request makes no sense: {detail}")]
    Unexpected { op: &'static str, detail: String },
    /// A transaction was sent but its outcome is unknown: the member timed out, the connection
    /// broke before the answer, or etcd reported a timeout of its own. It may or may not have
    /// been applied (it is not retried on another endpoint for that reason): re-read the keys
    /// it writes before deciding to send it again.
    #[error(
        "the {op} request sent to etcd at {} may or may not have been applied; re-read before retrying",
        .source.endpoint()
    )]
    UnknownOutcome {
        op: &'static str,
        #[source]
        source: AttemptError,
    },
}

impl EtcdError {
    /// etcd's own message, when etcd answered with one.
    pub fn etcd_message(&self) -> Option<&str> {
        match self {
            Self::Refused { message, .. }
            | Self::Unreachable {
                last: AttemptError::Unavailable { message, .. },
                ..
            }
            | Self::UnknownOutcome {
                source: AttemptError::Unavailable { message, .. },
                ..
            } => Some(message),
            _ => None,
        }
    }
}
