//! Keys, ranges, deletes and transactions against a one-member etcd.

use viola_etcd::testing::Cluster;
use viola_etcd::{Compare, EtcdError, KeyValue, Op, OpResponse, Txn, prefix_end};

fn keys(kvs: &[KeyValue]) -> Vec<&[u8]> {
    kvs.iter().map(|kv| kv.key.as_slice()).collect()
}

#[test]
fn values_of_any_bytes_round_trip_and_ranges_order_and_limit() {
    let etcd_process = Cluster::start(1);
    let etcd = etcd_process.client();

    let every_byte: Vec<u8> = (0..=255).collect();
    etcd.put(b"/t/a", &every_byte, None).unwrap();
    etcd.put(b"/t/b", b"", None).unwrap();
    etcd.put(b"/t/c\0\xff", b"\0\n\r\"\\{}", None).unwrap();
    etcd.put(b"/t/d", b"d", None).unwrap();
    etcd.put(b"/t", b"the prefix itself, no slash", None)
        .unwrap();
    etcd.put(b"/u/a", b"outside", None).unwrap();

    let a = etcd.get(b"/t/a").unwrap().expect("/t/a exists");
    assert_eq!(a.value, every_byte);
    assert_eq!(a.version, 1);
    assert_eq!(a.create_revision, a.mod_revision);
    assert_eq!(etcd.get(b"/t/b").unwrap().expect("/t/b exists").value, b"");
    assert_eq!(
        etcd.get(b"/t/c\0\xff").unwrap().expect("binary key").value,
        b"\0\n\r\"\\{}"
    );
    assert_eq!(etcd.get(b"/t/none").unwrap(), None);

    let end = prefix_end(b"/t/");
    let all = etcd.range(b"/t/", &end, None, false).unwrap();
    assert_eq!(keys(&all), [&b"/t/a"[..], b"/t/b", b"/t/c\0\xff", b"/t/d"]);
    let down = etcd.range(b"/t/", &end, None, true).unwrap();
    assert_eq!(keys(&down), [&b"/t/d"[..], b"/t/c\0\xff", b"/t/b", b"/t/a"]);
    let first_two = etcd.range(b"/t/", &end, Some(2), false).unwrap();
    assert_eq!(keys(&first_two), [&b"/t/a"[..], b"/t/b"]);
    let last_two = etcd.range(b"/t/", &end, Some(2), true).unwrap();
    assert_eq!(keys(&last_two), [&b"/t/d"[..], b"/t/c\0\xff"]);
    assert!(etcd.range(b"/t/", &end, Some(0), false).unwrap().is_empty());
    // An empty end: just the start key.
    assert_eq!(
        keys(&etcd.range(b"/t/b", b"", None, false).unwrap()),
        [&b"/t/b"[..]]
    );
    // [start, end): the end is excluded.
    assert_eq!(
        keys(&etcd.range(b"/t/a", b"/t/c", None, false).unwrap()),
        [&b"/t/a"[..], b"/t/b"]
    );
    // "\0" as the end: everything from the start on.
    let rest = etcd.range(b"/t/d", b"\0", None, false).unwrap();
    assert_eq!(keys(&rest), [&b"/t/d"[..], b"/u/a"]);

    // A second put: same create revision, later mod revision, version 2.
    let revision = etcd.put(b"/t/a", b"again", None).unwrap();
    let a2 = etcd.get(b"/t/a").unwrap().expect("/t/a exists");
    assert_eq!((a2.value.as_slice(), a2.version), (&b"again"[..], 2));
    assert_eq!(a2.create_revision, a.create_revision);
    assert_eq!(a2.mod_revision, revision);
    assert!(revision > a.mod_revision);

    // A prefix of 0xff bytes has no finite end; prefix_end gives "\0": to the end.
    etcd.put(b"\xff\xff\x01", b"high", None).unwrap();
    let high = etcd
        .range(b"\xff\xff", &prefix_end(b"\xff\xff"), None, false)
        .unwrap();
    assert_eq!(keys(&high), [&b"\xff\xff\x01"[..]]);
}

#[test]
fn delete_range_removes_only_the_range() {
    let etcd_process = Cluster::start(1);
    let etcd = etcd_process.client();
    for key in [&b"/d/1"[..], b"/d/2", b"/d/3", b"/d", b"/e/1"] {
        etcd.put(key, b"x", None).unwrap();
    }
    assert_eq!(etcd.delete_range(b"/d/", &prefix_end(b"/d/")).unwrap(), 3);
    assert!(
        etcd.range(b"/d/", &prefix_end(b"/d/"), None, false)
            .unwrap()
            .is_empty()
    );
    assert!(
        etcd.get(b"/d").unwrap().is_some(),
        "the prefix without its slash stays"
    );
    assert!(etcd.get(b"/e/1").unwrap().is_some());
    assert_eq!(etcd.delete_range(b"/e/1", b"").unwrap(), 1);
    assert_eq!(etcd.delete_range(b"/e/1", b"").unwrap(), 0);
    assert_eq!(etcd.get(b"/e/1").unwrap(), None);
}

#[test]
fn a_failed_compare_writes_nothing_and_runs_the_other_branch() {
    let etcd_process = Cluster::start(1);
    let etcd = etcd_process.client();
    let revision = etcd.put(b"k", b"v1", None).unwrap();

    let txn = Txn::new()
        .when(Compare::Value {
            key: b"k".to_vec(),
            equals: b"v0".to_vec(),
        })
        .then(Op::put(b"k", b"v2"))
        .then(Op::put(b"other", b"x"))
        .otherwise(Op::get(b"k"));
    let result = etcd.txn(&txn).unwrap();
    assert!(!result.succeeded);
    assert_eq!(result.revision, revision, "nothing was written");
    let [OpResponse::Get(kvs)] = result.responses.as_slice() else {
        panic!("expected one get, got {:?}", result.responses);
    };
    assert_eq!(kvs[0].value, b"v1");
    assert_eq!(etcd.get(b"k").unwrap().expect("k exists").value, b"v1");
    assert_eq!(etcd.get(b"other").unwrap(), None);

    // Each kind of compare, holding: the branch runs.
    let k = etcd.get(b"k").unwrap().expect("k exists");
    for compare in [
        Compare::Value {
            key: b"k".to_vec(),
            equals: b"v1".to_vec(),
        },
        Compare::ModRevision {
            key: b"k".to_vec(),
            equals: k.mod_revision,
        },
        Compare::CreateRevision {
            key: b"k".to_vec(),
            equals: k.create_revision,
        },
        Compare::Version {
            key: b"k".to_vec(),
            equals: 1,
        },
        Compare::absent(b"never"),
    ] {
        let txn = Txn::new()
            .when(compare.clone())
            .otherwise(Op::put(b"other", b"x"));
        assert!(etcd.txn(&txn).unwrap().succeeded, "{compare:?}");
    }
    assert_eq!(etcd.get(b"other").unwrap(), None);
    // And failing: a compare against the wrong revision.
    let stale = Txn::new()
        .when(Compare::ModRevision {
            key: b"k".to_vec(),
            equals: k.mod_revision - 1,
        })
        .then(Op::delete(b"k"));
    assert!(!etcd.txn(&stale).unwrap().succeeded);
    assert!(etcd.get(b"k").unwrap().is_some());
}

#[test]
fn requests_over_etcds_limits_fail_with_etcds_message() {
    let etcd_process = Cluster::start(1);
    let etcd = etcd_process.client();

    // --max-txn-ops defaults to 128.
    let txn = |n: usize| {
        (0..n).fold(Txn::new(), |t, i| {
            t.then(Op::put(format!("/ops/{i}").as_bytes(), b"x"))
        })
    };
    assert!(etcd.txn(&txn(128)).unwrap().succeeded);
    etcd.delete_range(b"/ops/", &prefix_end(b"/ops/")).unwrap();
    let err = etcd.txn(&txn(129)).unwrap_err();
    assert!(
        matches!(&err, EtcdError::Refused { status: 400, .. }),
        "unexpected error: {err:?}"
    );
    assert!(
        err.to_string()
            .contains("etcdserver: too many operations in txn request"),
        "{err}"
    );
    assert!(etcd.get(b"/ops/0").unwrap().is_none());

    // --max-request-bytes defaults to 1.5 MiB; past 2 MiB gRPC itself refuses the message.
    let value = vec![b'x'; 1600 * 1024];
    let err = etcd.put(b"/big", &value, None).unwrap_err();
    assert_eq!(
        err.etcd_message(),
        Some("etcdserver: request is too large"),
        "{err:?}"
    );
    assert!(
        err.to_string().contains(&etcd_process.members[0].client),
        "{err}"
    );
    let value = vec![b'x'; 3 * 1024 * 1024];
    let err = etcd.put(b"/big", &value, None).unwrap_err();
    let message = err
        .etcd_message()
        .unwrap_or_else(|| panic!("no etcd message: {err:?}"));
    assert!(message.contains("larger than max"), "{err:?}");
    assert_eq!(etcd.get(b"/big").unwrap(), None);
    // Just under the limit works.
    etcd.put(b"/big", &vec![b'y'; 1024 * 1024], None).unwrap();
    assert_eq!(
        etcd.get(b"/big").unwrap().expect("/big exists").value.len(),
        1024 * 1024
    );
}

#[test]
fn status_reports_the_member_and_its_leader() {
    let etcd_process = Cluster::start(1);
    let etcd = etcd_process.client();
    let status = etcd.status().unwrap();
    assert_eq!(status.version, "3.4.23");
    assert_ne!(status.member_id, 0);
    assert_eq!(status.leader, status.member_id, "a lone member leads");
    assert!(status.raft_term >= 1);
    assert!(status.errors.is_empty(), "{:?}", status.errors);
    assert_eq!(status.endpoint, etcd_process.members[0].client);
    let revision = etcd.put(b"x", b"y", None).unwrap();
    assert_eq!(etcd.status().unwrap().revision, revision);
}
