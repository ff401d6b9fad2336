//! Leader election on one key, the pattern of etcd's `concurrency.Election` without its gRPC
//! service: a candidate creates the key, attached to its lease, only if the key does not exist;
//! whoever created it leads until the key goes (resignation, or the lease ending because the
//! leader stopped keeping it alive). Every write of the leader carries [`Leadership::fence`], so
//! a leader that was deposed without noticing (paused, partitioned) has its writes refused
//! instead of overwriting its successor's.

use crate::txn::{Compare, Op, OpResponse, Txn};
use crate::{Etcd, EtcdError};

/// Leadership won: the election key as created by this candidate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Leadership {
    pub key: Vec<u8>,
    /// The revision that created the key; another candidate's key would have another.
    pub create_revision: i64,
    /// The lease the key is attached to; keep it alive to stay leader.
    pub lease: i64,
}

impl Leadership {
    /// The compare every write of the leader carries: the election key still exists with the
    /// create revision it had when this candidate won. Once the key is deleted (resignation,
    /// lease expired), or re-created by a successor, a transaction with this compare does not
    /// run its writes (`succeeded == false`).
    pub fn fence(&self) -> Compare {
        Compare::CreateRevision {
            key: self.key.clone(),
            equals: self.create_revision,
        }
    }
}

/// The outcome of one [`Etcd::try_acquire`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Acquire {
    Won(Leadership),
    /// Someone else leads: the value it wrote to the key, the key's create revision and lease.
    Held {
        holder_value: Vec<u8>,
        create_revision: i64,
        lease: i64,
    },
}

impl Etcd {
    /// One attempt at leadership: creates `key` = `value` attached to `lease` if the key does not
    /// exist, else reads who holds it. If the key is already held under `lease` (an earlier
    /// attempt applied though its answer was lost: [`EtcdError::UnknownOutcome`]) that is
    /// leadership too, so calling this again after an unknown outcome is safe.
    pub fn try_acquire(&self, key: &[u8], value: &[u8], lease: i64) -> Result<Acquire, EtcdError> {
        let txn = Txn::new()
            .when(Compare::absent(key))
            .then(Op::put_with_lease(key, value, lease))
            .otherwise(Op::get(key));
        let result = self.txn(&txn)?;
        if result.succeeded {
            return Ok(Acquire::Won(Leadership {
                key: key.to_vec(),
                create_revision: result.revision,
                lease,
            }));
        }
        let holder = match result.responses.first() {
            Some(OpResponse::Get(kvs)) => kvs.first(),
            _ => None,
        };
        let Some(holder) = holder else {
            return Err(EtcdError::Unexpected {
                op: "txn",
                detail: format!(
                    "election key {:?} exists, yet reading it in the same transaction gave nothing",
                    String::from_utf8_lossy(key)
                ),
            });
        };
        if lease != 0 && holder.lease == lease {
            return Ok(Acquire::Won(Leadership {
                key: key.to_vec(),
                create_revision: holder.create_revision,
                lease,
            }));
        }
        Ok(Acquire::Held {
            holder_value: holder.value.clone(),
            create_revision: holder.create_revision,
            lease: holder.lease,
        })
    }

    /// Gives leadership up: deletes the election key only if it is still this leadership's
    /// (fenced). Returns whether it was (false: it had already gone, e.g. the lease expired).
    /// Revoking the lease also ends leadership, and removes every other key attached to it.
    pub fn resign(&self, leadership: &Leadership) -> Result<bool, EtcdError> {
        let txn = Txn::new()
            .when(leadership.fence())
            .then(Op::delete(&leadership.key));
        Ok(self.txn(&txn)?.succeeded)
    }
}
