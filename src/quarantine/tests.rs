//! Tests of the quarantine table: what it refuses, when it ends, and how it merges with the
//! cluster's entries.

use super::*;

const HOUR: Duration = Duration::from_secs(3600);

fn at(secs: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000 + secs)
}

fn bob() -> Subject {
    Subject::identity("bob").expect("identity")
}

#[test]
fn a_quarantined_identity_is_refused_until_its_end_and_others_are_not() {
    let mut table = Quarantines::default();
    let until = table.add(bob(), at(0), HOUR, "leaked").expect("added");
    assert_eq!(until, at(3600));
    let (subject, entry) = table.refusing("bob", "01", at(10)).expect("refused");
    assert_eq!((subject, entry.reason.as_str()), (&bob(), "leaked"));
    assert!(table.refusing("alice", "01", at(10)).is_none());
    assert!(table.refusing("bobby", "01", at(10)).is_none());
    assert!(
        table.refusing("bob", "01", at(3600)).is_none(),
        "still refused at its end"
    );
}

#[test]
fn a_serial_is_one_subject_however_it_is_written() {
    let mut table = Quarantines::default();
    let serial = Subject::serial("00:0A:1b:FF").expect("serial");
    assert_eq!(serial, Subject::Serial("a1bff".into()));
    table.add(serial, at(0), HOUR, "").expect("added");
    assert!(table.refusing("anyone", "0a:1b:ff", at(1)).is_some());
    assert!(table.refusing("anyone", "0A1BFF", at(1)).is_some());
    assert!(table.refusing("anyone", "0a:1b:fe", at(1)).is_none());
    for bad in ["", "xyz", "0a:1g", ":"] {
        assert_eq!(Subject::serial(bad), Err(QuarantineError::Serial), "{bad:?}");
    }
}

#[test]
fn a_release_ends_it_and_is_owed_to_the_cluster() {
    let mut table = Quarantines::default();
    table.add(bob(), at(0), HOUR, "").expect("added");
    assert!(table.release(&bob()));
    assert!(table.refusing("bob", "", at(1)).is_none());
    assert_eq!(table.unsynced().1, [bob()]);
    // The cluster still lists it until the release is written: it is not taken back.
    let back = table.merge_cluster(vec![(bob(), at(3600), String::new())], at(2));
    assert!(back.is_empty() && table.refusing("bob", "", at(2)).is_none());
    table.synced(&[], &[bob()]);
    assert!(table.unsynced().1.is_empty());
}

#[test]
fn durations_reasons_and_the_table_are_bounded() {
    let mut table = Quarantines::default();
    assert_eq!(
        table.add(bob(), at(0), Duration::ZERO, ""),
        Err(QuarantineError::Duration)
    );
    let too_long = MAX_DURATION + Duration::from_secs(1);
    assert_eq!(
        table.add(bob(), at(0), too_long, ""),
        Err(QuarantineError::Duration)
    );
    let long_reason = "x".repeat(MAX_REASON + 1);
    assert_eq!(
        table.add(bob(), at(0), HOUR, &long_reason),
        Err(QuarantineError::Reason)
    );
    for i in 0..MAX_ENTRIES {
        table
            .add(Subject::Identity(format!("c{i}")), at(0), HOUR, "")
            .expect("room");
    }
    assert_eq!(table.add(bob(), at(0), HOUR, ""), Err(QuarantineError::Full));
    // Ended entries make room again.
    table
        .add(bob(), at(3600), HOUR, "")
        .expect("room after the others ended");
}

#[test]
fn the_clusters_entries_join_the_table_and_only_new_ones_are_reported() {
    let mut table = Quarantines::default();
    let carol = Subject::identity("carol").expect("identity");
    let new = table.merge_cluster(vec![(bob(), at(3600), "from A".into())], at(0));
    assert_eq!(new, [bob()]);
    assert!(table.refusing("bob", "", at(1)).is_some());
    let new = table.merge_cluster(
        vec![
            (bob(), at(3600), "from A".into()),
            (carol.clone(), at(3600), String::new()),
        ],
        at(1),
    );
    assert_eq!(new, std::slice::from_ref(&carol), "bob was reported once");
    // Released elsewhere: gone from the cluster's list, gone here.
    table.merge_cluster(vec![(carol, at(3600), String::new())], at(2));
    assert!(table.refusing("bob", "", at(3)).is_none());
}

#[test]
fn an_entry_owed_to_the_cluster_survives_a_merge_without_it() {
    let mut table = Quarantines::default();
    table.add(bob(), at(0), HOUR, "local").expect("added");
    table.merge_cluster(Vec::new(), at(1));
    assert!(table.refusing("bob", "", at(2)).is_some());
    let (owed, _) = table.unsynced();
    table.synced(&owed, &[]);
    assert!(table.unsynced().0.is_empty());
}

#[test]
fn the_store_skips_its_lock_only_while_it_is_empty() {
    let store = QuarantineStore::default();
    assert!(store.refusing("bob", "", at(0)).is_none());
    store.lock().add(bob(), at(0), HOUR, "").expect("added");
    assert!(store.refusing("bob", "", at(1)).is_some());
    store.lock().release(&bob());
    assert!(store.refusing("bob", "", at(1)).is_none());
}
