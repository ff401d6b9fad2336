//! The gateway's JSON: proto3's JSON mapping of etcd's `etcdserverpb` messages.
//!
//! As checked against etcd 3.4.23: `bytes` fields are standard base64; 64-bit integers come as
//! JSON strings (numbers are accepted too); fields holding their default value are omitted
//! (no `kvs` is an empty list, no `succeeded` is false, no `TTL` is 0), so every field here
//! defaults; enums are their names as strings.

use std::fmt;
use std::marker::PhantomData;
use std::str::FromStr;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use serde::Deserialize;
use serde::de::{self, Deserializer, Visitor};

/// Standard base64, as the gateway writes `bytes` fields.
pub(crate) fn b64(bytes: &[u8]) -> String {
    STANDARD.encode(bytes)
}

/// A 64-bit integer as the gateway wants it: a decimal string.
pub(crate) fn int(n: i64) -> String {
    n.to_string()
}

/// Deserializes an integer given as a JSON string or number (null → the default).
pub(crate) fn int_any<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: FromStr + TryFrom<i64> + TryFrom<u64> + Default,
{
    struct V<T>(PhantomData<T>);
    impl<T> Visitor<'_> for V<T>
    where
        T: FromStr + TryFrom<i64> + TryFrom<u64> + Default,
    {
        type Value = T;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("an integer, as a string or a number")
        }
        fn visit_str<E: de::Error>(self, s: &str) -> Result<T, E> {
            s.parse()
                .map_err(|_| E::invalid_value(de::Unexpected::Str(s), &self))
        }
        fn visit_i64<E: de::Error>(self, n: i64) -> Result<T, E> {
            T::try_from(n).map_err(|_| E::invalid_value(de::Unexpected::Signed(n), &self))
        }
        fn visit_u64<E: de::Error>(self, n: u64) -> Result<T, E> {
            T::try_from(n).map_err(|_| E::invalid_value(de::Unexpected::Unsigned(n), &self))
        }
        fn visit_unit<E: de::Error>(self) -> Result<T, E> {
            Ok(T::default())
        }
        fn visit_none<E: de::Error>(self) -> Result<T, E> {
            Ok(T::default())
        }
    }
    d.deserialize_any(V(PhantomData))
}

/// Deserializes a base64 `bytes` field (null → empty).
pub(crate) fn bytes<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
    struct V;
    impl Visitor<'_> for V {
        type Value = Vec<u8>;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("standard base64 in a string")
        }
        fn visit_str<E: de::Error>(self, s: &str) -> Result<Vec<u8>, E> {
            STANDARD
                .decode(s)
                .map_err(|e| E::custom(format_args!("invalid base64 {s:?}: {e}")))
        }
        fn visit_unit<E: de::Error>(self) -> Result<Vec<u8>, E> {
            Ok(Vec::new())
        }
        fn visit_none<E: de::Error>(self) -> Result<Vec<u8>, E> {
            Ok(Vec::new())
        }
    }
    d.deserialize_any(V)
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(crate) struct Header {
    #[serde(deserialize_with = "int_any")]
    pub cluster_id: u64,
    #[serde(deserialize_with = "int_any")]
    pub member_id: u64,
    #[serde(deserialize_with = "int_any")]
    pub revision: i64,
    #[serde(deserialize_with = "int_any")]
    pub raft_term: u64,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(crate) struct Kv {
    #[serde(deserialize_with = "bytes")]
    pub key: Vec<u8>,
    #[serde(deserialize_with = "bytes")]
    pub value: Vec<u8>,
    #[serde(deserialize_with = "int_any")]
    pub create_revision: i64,
    #[serde(deserialize_with = "int_any")]
    pub mod_revision: i64,
    #[serde(deserialize_with = "int_any")]
    pub version: i64,
    #[serde(deserialize_with = "int_any")]
    pub lease: i64,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(crate) struct RangeResponse {
    pub header: Header,
    pub kvs: Vec<Kv>,
    pub more: bool,
    #[serde(deserialize_with = "int_any")]
    pub count: i64,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(crate) struct DeleteRangeResponse {
    #[serde(deserialize_with = "int_any")]
    pub deleted: i64,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(crate) struct ResponseOp {
    pub response_range: Option<RangeResponse>,
    pub response_put: Option<de::IgnoredAny>,
    pub response_delete_range: Option<DeleteRangeResponse>,
    pub response_txn: Option<de::IgnoredAny>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(crate) struct TxnResponse {
    pub header: Header,
    pub succeeded: bool,
    pub responses: Vec<ResponseOp>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(crate) struct LeaseGrantResponse {
    pub header: Header,
    #[serde(rename = "ID", deserialize_with = "int_any")]
    pub id: i64,
    #[serde(rename = "TTL", deserialize_with = "int_any")]
    pub ttl: i64,
    pub error: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(crate) struct LeaseKeepAliveResponse {
    #[serde(rename = "ID", deserialize_with = "int_any")]
    pub id: i64,
    #[serde(rename = "TTL", deserialize_with = "int_any")]
    pub ttl: i64,
}

/// One message of a server stream: a result, or the error that ended the stream
/// (`{"error":{"grpc_code":14,"http_code":503,"message":"etcdserver: no leader",...}}`).
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(crate) struct StreamMessage<T> {
    pub result: Option<T>,
    pub error: Option<StreamError>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(crate) struct StreamError {
    #[serde(deserialize_with = "int_any")]
    pub grpc_code: i64,
    #[serde(deserialize_with = "int_any")]
    pub http_code: u16,
    pub message: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(crate) struct StatusResponse {
    pub header: Header,
    pub version: String,
    #[serde(rename = "dbSize", deserialize_with = "int_any")]
    pub db_size: i64,
    #[serde(rename = "dbSizeInUse", deserialize_with = "int_any")]
    pub db_size_in_use: i64,
    #[serde(deserialize_with = "int_any")]
    pub leader: u64,
    #[serde(rename = "raftIndex", deserialize_with = "int_any")]
    pub raft_index: u64,
    #[serde(rename = "raftTerm", deserialize_with = "int_any")]
    pub raft_term: u64,
    #[serde(rename = "raftAppliedIndex", deserialize_with = "int_any")]
    pub raft_applied_index: u64,
    pub errors: Vec<String>,
    #[serde(rename = "isLearner")]
    pub is_learner: bool,
}

/// etcd's error answer. Unary calls give `{"error":"…","code":N,"message":"…"}`, streams
/// `{"error":{"grpc_code":N,"http_code":N,"message":"…","http_status":"…"}}`, and paths the
/// gateway does not know plain text (`Not Found`).
pub(crate) struct ErrorBody {
    pub code: Option<i64>,
    pub message: String,
}

/// The most an error message keeps of a non-JSON body.
const MAX_SHOWN: usize = 300;

pub(crate) fn parse_error_body(body: &[u8]) -> ErrorBody {
    let value: Option<serde_json::Value> = serde_json::from_slice(body).ok();
    let as_int = |v: &serde_json::Value| {
        v.as_i64()
            .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
    };
    if let Some(value) = value {
        let message = value
            .get("message")
            .and_then(|m| m.as_str())
            .or_else(|| value.get("error").and_then(|e| e.as_str()))
            .or_else(|| {
                value
                    .get("error")
                    .and_then(|e| e.get("message"))
                    .and_then(|m| m.as_str())
            });
        if let Some(message) = message {
            let code = value.get("code").and_then(as_int).or_else(|| {
                value
                    .get("error")
                    .and_then(|e| e.get("grpc_code"))
                    .and_then(as_int)
            });
            return ErrorBody {
                code,
                message: message.to_owned(),
            };
        }
    }
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    let mut message: String = text.chars().take(MAX_SHOWN).collect();
    if message.len() < text.len() {
        message.push('…');
    }
    if message.is_empty() {
        message = "(no message)".to_owned();
    }
    ErrorBody {
        code: None,
        message,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn omitted_fields_are_defaults() {
        let r: RangeResponse = serde_json::from_str(
            r#"{"header":{"cluster_id":"15118495548433857066","member_id":"13668033151171901709","revision":"1","raft_term":"2"}}"#,
        )
        .unwrap();
        assert!(r.kvs.is_empty());
        assert_eq!(r.count, 0);
        assert_eq!(r.header.revision, 1);
        assert_eq!(r.header.cluster_id, 15118495548433857066);
        let t: TxnResponse = serde_json::from_str(r#"{"header":{"revision":"2"}}"#).unwrap();
        assert!(!t.succeeded);
        assert!(t.responses.is_empty());
        let k: StreamMessage<LeaseKeepAliveResponse> =
            serde_json::from_str(r#"{"result":{"header":{},"ID":"4111120510142232078"}}"#).unwrap();
        let k = k.result.unwrap();
        assert_eq!((k.id, k.ttl), (4111120510142232078, 0));
    }

    #[test]
    fn kv_as_etcd_sends_it() {
        // An empty value is omitted, like every default.
        let r: RangeResponse = serde_json::from_str(
            r#"{"kvs":[{"key":"Zm9v","create_revision":"2","mod_revision":"3","version":"1","value":"YmFy","lease":"7"},
                       {"key":"ZW1wdHk=","create_revision":3,"mod_revision":3,"version":1}],"more":true,"count":"3"}"#,
        )
        .unwrap();
        assert_eq!(r.kvs[0].key, b"foo");
        assert_eq!(r.kvs[0].value, b"bar");
        assert_eq!(
            (
                r.kvs[0].create_revision,
                r.kvs[0].mod_revision,
                r.kvs[0].lease
            ),
            (2, 3, 7)
        );
        assert_eq!(r.kvs[1].key, b"empty");
        assert!(r.kvs[1].value.is_empty());
        assert!(r.more);
        assert_eq!(r.count, 3);
    }

    #[test]
    fn bad_fields_are_errors() {
        assert!(serde_json::from_str::<Kv>(r#"{"key":"!!"}"#).is_err());
        assert!(serde_json::from_str::<Kv>(r#"{"create_revision":"x"}"#).is_err());
        assert!(serde_json::from_str::<Kv>(r#"{"create_revision":[]}"#).is_err());
        assert!(serde_json::from_str::<Header>(r#"{"member_id":-1}"#).is_err());
    }

    #[test]
    fn error_bodies() {
        let e = parse_error_body(
            br#"{"error":"etcdserver: too many operations in txn request","message":"etcdserver: too many operations in txn request","code":3}"#,
        );
        assert_eq!(e.code, Some(3));
        assert_eq!(e.message, "etcdserver: too many operations in txn request");
        let e = parse_error_body(
            br#"{"error":{"grpc_code":14,"http_code":503,"message":"etcdserver: no leader","http_status":"Service Unavailable"}}"#,
        );
        assert_eq!(e.code, Some(14));
        assert_eq!(e.message, "etcdserver: no leader");
        let e = parse_error_body(b"Not Found\n");
        assert_eq!((e.code, e.message.as_str()), (None, "Not Found"));
        assert_eq!(parse_error_body(b"").message, "(no message)");
        assert!(parse_error_body(&[b'x'; 1000]).message.ends_with('…'));
    }
}
