//! Leases against a one-member etcd (election timeout 1 s, so etcd's minimum TTL is 2 s).

use std::thread::sleep;
use std::time::{Duration, Instant};

use viola_etcd::testing::{Cluster, wait_for};

#[test]
fn grant_keep_alive_and_revoke() {
    let etcd_process = Cluster::start(1);
    let etcd = etcd_process.client();

    let lease = etcd.lease_grant(5).unwrap();
    assert_eq!(lease.ttl_s, 5);
    assert_ne!(lease.id, 0);
    // Below etcd's minimum TTL (1.5 election timeouts, rounded up) etcd grants the minimum.
    let short = etcd.lease_grant(1).unwrap();
    assert_eq!(
        short.ttl_s, 2,
        "etcd's minimum TTL with --election-timeout 1000"
    );

    etcd.put(b"/lease/a", b"x", Some(lease.id)).unwrap();
    etcd.put(b"/lease/b", b"y", Some(lease.id)).unwrap();
    etcd.put(b"/lease/free", b"z", None).unwrap();
    assert_eq!(
        etcd.get(b"/lease/a").unwrap().expect("/lease/a").lease,
        lease.id
    );

    // The short lease would be gone after 2 s; kept alive, it is not.
    for _ in 0..4 {
        sleep(Duration::from_millis(800));
        assert_eq!(
            etcd.lease_keep_alive(short.id).unwrap(),
            2,
            "keepalive renews to the TTL"
        );
    }
    assert_eq!(etcd.lease_keep_alive(lease.id).unwrap(), 5);

    etcd.lease_revoke(lease.id).unwrap();
    assert_eq!(
        etcd.get(b"/lease/a").unwrap(),
        None,
        "revoking deletes attached keys"
    );
    assert_eq!(etcd.get(b"/lease/b").unwrap(), None);
    assert!(etcd.get(b"/lease/free").unwrap().is_some());
    assert_eq!(
        etcd.lease_keep_alive(lease.id).unwrap(),
        0,
        "a revoked lease is expired"
    );
    // Revoking again (as a retry after a lost answer would) is not an error.
    etcd.lease_revoke(lease.id).unwrap();
    // A key cannot be attached to a lease that does not exist.
    let err = etcd.put(b"/lease/c", b"x", Some(lease.id)).unwrap_err();
    assert_eq!(
        err.etcd_message(),
        Some("etcdserver: requested lease not found"),
        "{err:?}"
    );
    etcd.lease_revoke(short.id).unwrap();
}

#[test]
fn a_key_goes_when_its_lease_is_not_kept_alive() {
    let etcd_process = Cluster::start(1);
    let etcd = etcd_process.client();
    let lease = etcd.lease_grant(1).unwrap();
    let granted = Instant::now();
    etcd.put(b"/ephemeral", b"x", Some(lease.id)).unwrap();
    assert!(etcd.get(b"/ephemeral").unwrap().is_some());

    let ttl = Duration::from_secs(lease.ttl_s.unsigned_abs());
    let gone = wait_for(ttl + Duration::from_secs(3), || {
        etcd.get(b"/ephemeral")
            .unwrap()
            .is_none()
            .then(Instant::now)
    });
    let gone = gone.expect("the key outlived its lease's TTL by 3 s");
    let after = gone - granted;
    assert!(
        after >= ttl - Duration::from_millis(200),
        "gone after {after:?}, TTL {ttl:?}"
    );
    assert_eq!(etcd.lease_keep_alive(lease.id).unwrap(), 0);
}
