//! Shirako (Grit et al., section 5.1): migrations the site performs for each broker/site pair.
//! Reproduced: conflicting policies (energy-aware site) cause by far the most migrations,
//! follow-broker the fewest, room-for-growth/follow-broker none. Not reproduced by this model:
//! migrating/energy-aware above room-for-growth/energy-aware (they come out within a few percent).

use viola_adaptmgr::policy::shirako::{Provisioning::*, SitePlacement::*, run_experiment};

#[test]
fn conflicting_policies_migrate_most_and_follow_broker_least() {
    for seed in [1u64, 7, 42] {
        let re = run_experiment(RoomForGrowth, EnergyAware, 100, 60, seed);
        let me = run_experiment(Migrating, EnergyAware, 100, 60, seed);
        let mf = run_experiment(Migrating, FollowBroker, 100, 60, seed);
        let rf = run_experiment(RoomForGrowth, FollowBroker, 100, 60, seed);
        assert!(
            re.site_migrations > 10 * mf.site_migrations.max(1),
            "seed {seed}: RE {re:?} MF {mf:?}"
        );
        assert!(
            me.site_migrations > 10 * mf.site_migrations.max(1),
            "seed {seed}: ME {me:?} MF {mf:?}"
        );
        assert_eq!(
            mf.site_migrations, mf.broker_migrations,
            "follow-broker moves exactly when the broker does"
        );
        assert_eq!(
            rf.site_migrations, 0,
            "room-for-growth/follow-broker needs no migration"
        );
        assert_eq!(
            rf.denied_resizes, re.denied_resizes,
            "the site policy does not change what the broker grants"
        );
    }
}

#[test]
#[ignore = "prints the counts for the report"]
fn print_counts() {
    for seed in [1u64, 7, 42] {
        let r = |p, s| run_experiment(p, s, 100, 60, seed);
        println!(
            "seed {seed}: RE {:?}\n ME {:?}\n MF {:?}\n RF {:?}",
            r(RoomForGrowth, EnergyAware),
            r(Migrating, EnergyAware),
            r(Migrating, FollowBroker),
            r(RoomForGrowth, FollowBroker)
        );
    }
}
