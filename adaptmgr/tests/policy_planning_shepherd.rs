//! Migration planning and shepherding, as a caller uses them.

use viola_adaptmgr::policy::planning::{PlanInput, check, plan};
use viola_adaptmgr::policy::shepherd::{Origin, Quota, Refusal, Shepherd};

#[test]
fn a_three_way_rotation_on_full_hosts_is_planned_within_capacity() {
    let input = PlanInput {
        capacity: vec![2.0, 2.0, 2.0, 1.0],
        size: vec![2.0, 2.0, 2.0],
        current: vec![Some(0), Some(1), Some(2)],
        target: vec![Some(1), Some(2), Some(0)],
        max_parallel: 2,
    };
    let p = plan(&input).expect("plannable");
    assert_eq!(check(&input, &p), Ok(()));
    // No host has room for a 2-unit VM: one stop-and-copy breaks the cycle.
    assert_eq!(p.stop_and_copy(), 1);
    assert_eq!(p.migrations(), 2);
}

fn quota() -> Quota {
    Quota {
        max_cpu_mips_per_vm: 4000.0,
        max_ram_mb_per_vm: 4096.0,
        max_cpu_mips_total: 6000.0,
        max_ram_mb_total: 8192.0,
        vm_rate_per_min: 5,
        violin_rate_per_min: 8,
        migrations_per_hour: 2,
    }
}

#[test]
fn abusive_or_malformed_requests_are_refused_logged_and_do_not_touch_other_violins() {
    let mut s = Shepherd::new();
    s.set_quota("red", quota());
    s.set_quota("blue", quota());
    s.add_vm("red", "r1", 1000.0, 1024.0);
    s.add_vm("red", "r2", 1000.0, 1024.0);
    s.add_vm("blue", "b1", 1000.0, 1024.0);
    let r1 = Origin {
        violin: "red".into(),
        vm: "r1".into(),
    };
    let b1 = Origin {
        violin: "blue".into(),
        vm: "b1".into(),
    };
    let grow = |vm: &str, mips: f64| {
        format!(r#"{{"op":"resize","vm":"{vm}","cpu_mips":{mips}}}"#).into_bytes()
    };

    assert_eq!(
        s.validate(0.0, None, &grow("r1", 2000.0)),
        Err(Refusal::Unauthenticated)
    );
    assert!(matches!(
        s.validate(0.0, Some(&r1), &grow("b1", 2000.0)),
        Err(Refusal::NotItself { .. })
    ));
    assert!(matches!(
        s.validate(1.0, Some(&r1), b"{\"op\":\"resize\",\"vm\":"),
        Err(Refusal::Malformed(_))
    ));
    assert!(matches!(
        s.validate(2.0, Some(&r1), &grow("r1", 9000.0)),
        Err(Refusal::Quota(_))
    ));
    assert!(s.validate(3.0, Some(&r1), &grow("r1", 3000.0)).is_ok());
    // 3000 + 3500 would exceed the violin's 6000 MIPS in total.
    let r2 = Origin {
        violin: "red".into(),
        vm: "r2".into(),
    };
    assert!(matches!(
        s.validate(4.0, Some(&r2), &grow("r2", 3500.0)),
        Err(Refusal::Quota(_))
    ));
    // r1 floods: refused by its rate limit, then the violin's.
    let mut refused = 0;
    for i in 0..20 {
        if let Err(Refusal::RateLimited(_)) =
            s.validate(5.0 + f64::from(i) * 0.1, Some(&r1), &grow("r1", 1500.0))
        {
            refused += 1;
        }
    }
    assert!(refused >= 15, "flood refused {refused} times");
    // Blue is unaffected by all of this.
    let b = Origin { ..b1 };
    assert!(s.validate(6.0, Some(&b), &grow("b1", 3500.0)).is_ok());
    let mig = br#"{"op":"migrate","vm":"b1","to_site":"b"}"#;
    assert!(s.validate(7.0, Some(&b), mig).is_ok());
    assert!(s.validate(8.0, Some(&b), mig).is_ok());
    assert!(matches!(
        s.validate(9.0, Some(&b), mig),
        Err(Refusal::Quota(_))
    ));
    // Every decision is in the log, with the refusals' reasons.
    assert!(s.log().len() >= 28);
    assert!(
        s.log()
            .iter()
            .any(|e| !e.accepted && e.detail.contains("malformed"))
    );
}
