//! Transactions: if every compare holds, run the `then` operations, else the `otherwise` ones,
//! atomically at one revision.

use serde_json::{Value, json};

use crate::KeyValue;
use crate::wire::{self, b64, int};

/// A condition on one key. A key that does not exist has create revision, mod revision and
/// version 0 and an empty value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Compare {
    /// The key's create revision is `equals` (0: the key does not exist).
    CreateRevision { key: Vec<u8>, equals: i64 },
    /// The key's last modification revision is `equals`.
    ModRevision { key: Vec<u8>, equals: i64 },
    /// The key's number of modifications since creation is `equals` (0: does not exist).
    Version { key: Vec<u8>, equals: i64 },
    /// The key's value is `equals`.
    Value { key: Vec<u8>, equals: Vec<u8> },
}

impl Compare {
    /// The key does not exist.
    pub fn absent(key: &[u8]) -> Self {
        Self::CreateRevision {
            key: key.to_vec(),
            equals: 0,
        }
    }

    fn to_json(&self) -> Value {
        match self {
            Self::CreateRevision { key, equals } => json!({
                "key": b64(key), "target": "CREATE", "result": "EQUAL", "create_revision": int(*equals)
            }),
            Self::ModRevision { key, equals } => json!({
                "key": b64(key), "target": "MOD", "result": "EQUAL", "mod_revision": int(*equals)
            }),
            Self::Version { key, equals } => json!({
                "key": b64(key), "target": "VERSION", "result": "EQUAL", "version": int(*equals)
            }),
            Self::Value { key, equals } => json!({
                "key": b64(key), "target": "VALUE", "result": "EQUAL", "value": b64(equals)
            }),
        }
    }
}

/// An operation in a transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Set `key` to `value`, attached to `lease` if given (the key is deleted when the lease
    /// ends).
    Put {
        key: Vec<u8>,
        value: Vec<u8>,
        lease: Option<i64>,
    },
    /// Delete `key`.
    Delete { key: Vec<u8> },
    /// Delete the keys in `[start, end)` (see [`crate::prefix_end`]).
    DeleteRange { start: Vec<u8>, end: Vec<u8> },
    /// Read `key`.
    Get { key: Vec<u8> },
}

impl Op {
    pub fn put(key: &[u8], value: &[u8]) -> Self {
        Self::Put {
            key: key.to_vec(),
            value: value.to_vec(),
            lease: None,
        }
    }

    pub fn put_with_lease(key: &[u8], value: &[u8], lease: i64) -> Self {
        Self::Put {
            key: key.to_vec(),
            value: value.to_vec(),
            lease: Some(lease),
        }
    }

    pub fn delete(key: &[u8]) -> Self {
        Self::Delete { key: key.to_vec() }
    }

    pub fn delete_range(start: &[u8], end: &[u8]) -> Self {
        Self::DeleteRange {
            start: start.to_vec(),
            end: end.to_vec(),
        }
    }

    pub fn get(key: &[u8]) -> Self {
        Self::Get { key: key.to_vec() }
    }

    fn to_json(&self) -> Value {
        match self {
            Self::Put { key, value, lease } => {
                let mut put = json!({"key": b64(key), "value": b64(value)});
                if let (Some(lease), Some(map)) = (lease, put.as_object_mut()) {
                    map.insert("lease".to_owned(), Value::String(int(*lease)));
                }
                json!({ "request_put": put })
            }
            Self::Delete { key } => json!({"request_delete_range": {"key": b64(key)}}),
            Self::DeleteRange { start, end } => {
                json!({"request_delete_range": {"key": b64(start), "range_end": b64(end)}})
            }
            Self::Get { key } => json!({"request_range": {"key": b64(key)}}),
        }
    }
}

/// A transaction, built with [`Txn::new`], [`Txn::when`], [`Txn::then`], [`Txn::otherwise`].
/// etcd applies at most `--max-txn-ops` (default 128) operations per branch and refuses
/// requests over `--max-request-bytes` (default 1.5 MiB); both come back as
/// [`crate::EtcdError::Refused`] with etcd's message.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Txn {
    compares: Vec<Compare>,
    success: Vec<Op>,
    failure: Vec<Op>,
}

impl Txn {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a condition; all must hold for the `then` branch to run.
    pub fn when(mut self, compare: Compare) -> Self {
        self.compares.push(compare);
        self
    }

    /// Adds an operation run when every condition holds (or there is none).
    pub fn then(mut self, op: Op) -> Self {
        self.success.push(op);
        self
    }

    /// Adds an operation run when a condition fails.
    pub fn otherwise(mut self, op: Op) -> Self {
        self.failure.push(op);
        self
    }

    pub fn compares(&self) -> &[Compare] {
        &self.compares
    }

    pub fn success(&self) -> &[Op] {
        &self.success
    }

    pub fn failure(&self) -> &[Op] {
        &self.failure
    }

    pub(crate) fn to_json(&self) -> Value {
        json!({
            "compare": self.compares.iter().map(Compare::to_json).collect::<Vec<_>>(),
            "success": self.success.iter().map(Op::to_json).collect::<Vec<_>>(),
            "failure": self.failure.iter().map(Op::to_json).collect::<Vec<_>>(),
        })
    }
}

/// The result of one operation of the branch that ran, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OpResponse {
    /// A [`Op::Get`]: the key, if it exists.
    Get(Vec<KeyValue>),
    Put,
    /// A delete: how many keys it removed.
    Delete {
        deleted: i64,
    },
    /// A nested transaction (this client sends none).
    Txn,
}

/// What a transaction did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TxnResult {
    /// Whether every compare held (so the `then` branch ran).
    pub succeeded: bool,
    /// The store's revision after the transaction (the revision of its writes, if it wrote).
    pub revision: i64,
    /// One per operation of the branch that ran.
    pub responses: Vec<OpResponse>,
}

impl TxnResult {
    pub(crate) fn from_wire(response: wire::TxnResponse) -> Result<Self, String> {
        let responses = response
            .responses
            .into_iter()
            .enumerate()
            .map(|(i, op)| {
                if let Some(range) = op.response_range {
                    Ok(OpResponse::Get(
                        range.kvs.into_iter().map(KeyValue::from).collect(),
                    ))
                } else if op.response_put.is_some() {
                    Ok(OpResponse::Put)
                } else if let Some(delete) = op.response_delete_range {
                    Ok(OpResponse::Delete {
                        deleted: delete.deleted,
                    })
                } else if op.response_txn.is_some() {
                    Ok(OpResponse::Txn)
                } else {
                    Err(format!(
                        "response {i} of the transaction names no operation"
                    ))
                }
            })
            .collect::<Result<_, _>>()?;
        Ok(Self {
            succeeded: response.succeeded,
            revision: response.header.revision,
            responses,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_as_the_gateway_expects() {
        let txn = Txn::new()
            .when(Compare::absent(b"k"))
            .when(Compare::Value {
                key: b"v".to_vec(),
                equals: b"\x00\xff".to_vec(),
            })
            .then(Op::put_with_lease(b"k", b"x", 7))
            .then(Op::delete_range(b"a", b"b"))
            .otherwise(Op::get(b"k"));
        assert_eq!(
            txn.to_json(),
            json!({
                "compare": [
                    {"key": "aw==", "target": "CREATE", "result": "EQUAL", "create_revision": "0"},
                    {"key": "dg==", "target": "VALUE", "result": "EQUAL", "value": "AP8="},
                ],
                "success": [
                    {"request_put": {"key": "aw==", "value": "eA==", "lease": "7"}},
                    {"request_delete_range": {"key": "YQ==", "range_end": "Yg=="}},
                ],
                "failure": [{"request_range": {"key": "aw=="}}],
            })
        );
        let put = Op::put(b"k", b"").to_json();
        assert_eq!(put, json!({"request_put": {"key": "aw==", "value": ""}}));
    }

    #[test]
    fn decodes_responses_in_order() {
        let wire: wire::TxnResponse = serde_json::from_str(
            r#"{"header":{"revision":"4"},"succeeded":true,"responses":[
                {"response_delete_range":{"header":{"revision":"4"},"deleted":"2"}},
                {"response_range":{"header":{"revision":"4"}}},
                {"response_put":{"header":{"revision":"4"}}},
                {"response_delete_range":{"header":{"revision":"4"}}}]}"#,
        )
        .unwrap();
        let result = TxnResult::from_wire(wire).unwrap();
        assert_eq!(
            result,
            TxnResult {
                succeeded: true,
                revision: 4,
                responses: vec![
                    OpResponse::Delete { deleted: 2 },
                    OpResponse::Get(vec![]),
                    OpResponse::Put,
                    OpResponse::Delete { deleted: 0 },
                ],
            }
        );
        let wire: wire::TxnResponse =
            serde_json::from_str(r#"{"succeeded":true,"responses":[{}]}"#).unwrap();
        assert!(TxnResult::from_wire(wire).is_err());
    }
}
