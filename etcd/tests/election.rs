//! Leader election against a one-member etcd.

use std::time::Duration;

use viola_etcd::testing::{Cluster, wait_for};
use viola_etcd::{Acquire, Leadership, Op, Txn};

const KEY: &[u8] = b"/viola/leader";

fn won(acquire: Acquire) -> Leadership {
    match acquire {
        Acquire::Won(leadership) => leadership,
        held => panic!("expected to win, got {held:?}"),
    }
}

#[test]
fn leadership_passes_on_and_fences_the_old_leader() {
    let etcd_process = Cluster::start(1);
    let a = etcd_process.client();
    let b = etcd_process.client();
    let a_lease = a.lease_grant(10).unwrap();
    let b_lease = b.lease_grant(10).unwrap();

    let la = won(a.try_acquire(KEY, b"manager-a", a_lease.id).unwrap());
    assert_eq!(la.lease, a_lease.id);
    // Trying again with the same lease (as after an unknown outcome) is still A's leadership.
    assert_eq!(
        won(a.try_acquire(KEY, b"manager-a", a_lease.id).unwrap()),
        la
    );

    match b.try_acquire(KEY, b"manager-b", b_lease.id).unwrap() {
        Acquire::Held {
            holder_value,
            create_revision,
            lease,
        } => {
            assert_eq!(holder_value, b"manager-a");
            assert_eq!(create_revision, la.create_revision);
            assert_eq!(lease, a_lease.id);
        }
        won => panic!("B should see A's leadership, got {won:?}"),
    }
    let a_write = Txn::new()
        .when(la.fence())
        .then(Op::put(b"/viola/state", b"from a"));
    assert!(
        a.txn(&a_write).unwrap().succeeded,
        "the leader's fenced write goes through"
    );

    // A's lease ends: its key goes, B takes over and writes.
    a.lease_revoke(a_lease.id).unwrap();
    let lb = won(b.try_acquire(KEY, b"manager-b", b_lease.id).unwrap());
    assert!(lb.create_revision > la.create_revision);
    let b_write = Txn::new()
        .when(lb.fence())
        .then(Op::put(b"/viola/state", b"from b"));
    assert!(b.txn(&b_write).unwrap().succeeded);

    // A, not knowing yet, writes with its fence: refused, nothing written.
    let revision = b.status().unwrap().revision;
    let stale = Txn::new()
        .when(la.fence())
        .then(Op::put(b"/viola/state", b"stale a"))
        .then(Op::put(b"/viola/other", b"stale a"));
    let result = a.txn(&stale).unwrap();
    assert!(
        !result.succeeded,
        "a deposed leader's fenced write must fail"
    );
    assert_eq!(result.revision, revision);
    assert_eq!(
        a.get(b"/viola/state").unwrap().expect("state").value,
        b"from b"
    );
    assert_eq!(a.get(b"/viola/other").unwrap(), None);

    // Resigning deletes only one's own key.
    assert!(!a.resign(&la).unwrap(), "A's key is gone already");
    assert_eq!(
        a.get(KEY).unwrap().expect("B's key stays").value,
        b"manager-b"
    );
    assert!(b.resign(&lb).unwrap());
    assert_eq!(b.get(KEY).unwrap(), None);
    assert!(
        !b.txn(&b_write).unwrap().succeeded,
        "after resigning, B's fence fails too"
    );
    b.lease_revoke(b_lease.id).unwrap();
}

#[test]
fn leadership_passes_on_when_the_leader_stops_keeping_its_lease_alive() {
    let etcd_process = Cluster::start(1);
    let etcd = etcd_process.client();
    let a_lease = etcd.lease_grant(1).unwrap(); // etcd's minimum: 2 s
    let b_lease = etcd.lease_grant(10).unwrap();
    let la = won(etcd.try_acquire(KEY, b"a", a_lease.id).unwrap());

    // B campaigns every 100 ms; A does not keep its lease alive.
    let timeout = Duration::from_secs(a_lease.ttl_s.unsigned_abs() + 3);
    let lb = wait_for(timeout, || {
        match etcd.try_acquire(KEY, b"b", b_lease.id).unwrap() {
            Acquire::Won(lb) => Some(lb),
            Acquire::Held { holder_value, .. } => {
                assert_eq!(holder_value, b"a");
                None
            }
        }
    })
    .expect("B did not take over within the lease's TTL + 3 s");
    assert!(lb.create_revision > la.create_revision);
    let stale = Txn::new()
        .when(la.fence())
        .then(Op::put(b"/viola/state", b"stale"));
    assert!(!etcd.txn(&stale).unwrap().succeeded);
    assert_eq!(etcd.get(b"/viola/state").unwrap(), None);
}
