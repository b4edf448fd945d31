//! The conformance suite every backend passes (run by `tests/tests/storage_backends.rs`
//! against redb, a real PostgreSQL and a real Redis, and by the unit tests against redb).
//!
//! Each check panics with what differed. `open(owner)` opens a store for `owner` on the
//! backend under test; two owners share the backend, as nodes sharing one database do.

use std::{sync::Arc, time::Duration};

use serde_json::json;

use super::{BackendError, ConsensusEntry, MeshStore, StoredMessage, Write};
use crate::streams::store::{Batch, Queue, Role, StreamRecord};

/// Runs every [`MeshStore`] check (not the streams).
pub fn mesh_store(open: &dyn Fn(u64) -> Arc<dyn MeshStore>) {
    let store = open(1);
    store.health_check().expect("health check");
    assert!(store.health().status().is_ok());
    messages(&*store);
    state(&*store);
    tables(&*store);
    transactions(&*store);
    idempotency(&*store);
    credits(&*store);
    refusals(&*store);
    owners(open);
}

fn message(id: &str, to: u64, at: u64) -> StoredMessage {
    StoredMessage {
        id: id.into(),
        from: 1,
        to,
        content: vec![0, 255, 7],
        timestamp_ms: at,
    }
}

fn messages(store: &dyn MeshStore) {
    store
        .apply(&[
            Write::PutMessage(message("m1", 2, 100)),
            Write::PutMessage(message("m2", 2, 50)),
            Write::PutMessage(message("m3", 3, 200)),
        ])
        .unwrap();
    assert_eq!(
        store.get_message("m1").unwrap(),
        Some(message("m1", 2, 100))
    );
    assert_eq!(store.get_message("nope").unwrap(), None);
    let ids = |to| -> Vec<String> {
        store
            .messages_to(to, 10)
            .unwrap()
            .into_iter()
            .map(|m| m.id)
            .collect()
    };
    assert_eq!(ids(2), ["m2", "m1"], "oldest first");
    assert_eq!(store.messages_to(2, 1).unwrap().len(), 1, "limit");
    // Re-addressed: it leaves the old receiver's list.
    store
        .apply(&[Write::PutMessage(message("m1", 3, 100))])
        .unwrap();
    assert_eq!(ids(2), ["m2"]);
    assert_eq!(ids(3), ["m1", "m3"]);
    assert_eq!(store.purge_messages_before(150).unwrap(), 2);
    assert_eq!(ids(3), ["m3"]);
    store.apply(&[Write::DeleteMessage("m3".into())]).unwrap();
    assert_eq!(store.get_message("m3").unwrap(), None);
    assert_eq!(store.counts().unwrap().messages, 0);
}

fn state(store: &dyn MeshStore) {
    let bytes: Vec<u8> = (0..=255).collect();
    store
        .apply(&[Write::PutState("k".into(), bytes.clone())])
        .unwrap();
    assert_eq!(store.get_state("k").unwrap(), Some(bytes));
    store
        .apply(&[Write::PutState("k".into(), b"v2".to_vec())])
        .unwrap();
    assert_eq!(store.get_state("k").unwrap().as_deref(), Some(&b"v2"[..]));
    store.apply(&[Write::DeleteState("k".into())]).unwrap();
    assert_eq!(store.get_state("k").unwrap(), None);
    // Deleting what is not there is no error.
    store.apply(&[Write::DeleteState("k".into())]).unwrap();
}

fn tables(store: &dyn MeshStore) {
    store
        .apply(&[
            Write::PutNodeState(9, json!({"health": "HEALTHY"})),
            Write::PutNodeState(u64::MAX, json!({"health": "DEGRADED"})),
        ])
        .unwrap();
    let states = store.node_states().unwrap();
    assert_eq!(states.len(), 2);
    assert!(states.contains(&(9, json!({"health": "HEALTHY"}))));
    assert!(
        states.contains(&(u64::MAX, json!({"health": "DEGRADED"}))),
        "u64 ids past 2^63 round-trip"
    );

    let entry = |term, index| ConsensusEntry {
        term,
        index,
        entry: json!({ "at": index }),
    };
    store
        .apply(
            &(1..=5)
                .map(|i| Write::AppendConsensus(entry(1, i)))
                .collect::<Vec<_>>(),
        )
        .unwrap();
    assert_eq!(
        store.consensus_entries(3, 2).unwrap(),
        vec![entry(1, 3), entry(1, 4)]
    );
    store
        .apply(&[
            Write::PurgeConsensus(3),
            Write::AppendConsensus(entry(2, 5)),
        ])
        .unwrap();
    assert_eq!(
        store.consensus_entries(0, 10).unwrap(),
        vec![entry(1, 4), entry(2, 5)],
        "purged up to 3, index 5 overwritten"
    );

    store
        .apply(&[Write::ReplaceRoutes(vec![
            (2, json!({"next_hop": 2, "cost": 1.5})),
            (3, json!({"next_hop": 2, "cost": 3.0})),
        ])])
        .unwrap();
    store
        .apply(&[Write::ReplaceRoutes(vec![(3, json!({"next_hop": 3}))])])
        .unwrap();
    assert_eq!(store.routes().unwrap(), vec![(3, json!({"next_hop": 3}))]);
    store.apply(&[Write::ReplaceRoutes(Vec::new())]).unwrap();
    assert!(store.routes().unwrap().is_empty());

    store
        .apply(&[
            Write::PutConfig("b".into(), json!(2)),
            Write::PutConfig("a".into(), json!({"x": [1, 2]})),
            Write::PutConfig("b".into(), json!(3)),
        ])
        .unwrap();
    assert_eq!(
        store.config().unwrap(),
        vec![("a".into(), json!({"x": [1, 2]})), ("b".into(), json!(3))]
    );
    store.apply(&[Write::DeleteConfig("a".into())]).unwrap();
    let counts = store.counts().unwrap();
    assert_eq!(
        (
            counts.node_states,
            counts.consensus,
            counts.routes,
            counts.config
        ),
        (2, 2, 0, 1)
    );
}

fn transactions(store: &dyn MeshStore) {
    // A set with one bad write is refused whole: nothing of it lands.
    let result = store.apply(&[
        Write::PutState("t1".into(), b"x".to_vec()),
        Write::PutState(String::new(), b"y".to_vec()),
    ]);
    assert!(
        matches!(result, Err(BackendError::Invalid(_))),
        "{result:?}"
    );
    assert_eq!(store.get_state("t1").unwrap(), None);
    // A good set lands whole.
    store
        .apply(&[
            Write::PutState("t1".into(), b"x".to_vec()),
            Write::PutState("t2".into(), b"y".to_vec()),
            Write::DeleteState("t1".into()),
        ])
        .unwrap();
    assert_eq!(store.get_state("t1").unwrap(), None);
    assert_eq!(store.get_state("t2").unwrap().as_deref(), Some(&b"y"[..]));
    store.apply(&[]).unwrap();
}

fn idempotency(store: &dyn MeshStore) {
    assert!(store.remember_key("publish", "k1", 60_000).unwrap());
    assert!(
        !store.remember_key("publish", "k1", 60_000).unwrap(),
        "duplicate"
    );
    assert!(
        store.remember_key("other", "k1", 60_000).unwrap(),
        "scopes apart"
    );
    assert!(store.remember_key("a:b", "c", 60_000).unwrap());
    assert!(
        store.remember_key("a", "b:c", 60_000).unwrap(),
        "no ambiguity"
    );
    assert!(store.remember_key("short", "k", 50).unwrap());
    std::thread::sleep(Duration::from_millis(120));
    assert!(store.remember_key("short", "k", 50).unwrap(), "expired");
}

fn credits(store: &dyn MeshStore) {
    // No refill: a plain budget of 10.
    assert!(store.take_credits("link-1", 4, 10, 0).unwrap());
    assert!(store.take_credits("link-1", 4, 10, 0).unwrap());
    assert!(!store.take_credits("link-1", 4, 10, 0).unwrap(), "2 left");
    assert!(store.take_credits("link-1", 2, 10, 0).unwrap());
    assert!(!store.take_credits("link-1", 1, 10, 0).unwrap());
    // Refilled at 1000/s: 50 ms later there are tokens again.
    assert!(store.take_credits("link-2", 10, 10, 1000).unwrap());
    std::thread::sleep(Duration::from_millis(60));
    assert!(store.take_credits("link-2", 10, 10, 1000).unwrap());
}

fn refusals(store: &dyn MeshStore) {
    let invalid =
        |r: super::Result<()>| assert!(matches!(r, Err(BackendError::Invalid(_))), "{r:?}");
    invalid(store.apply(&[Write::PutState(String::new(), Vec::new())]));
    invalid(store.apply(&[Write::PutState(
        "x".repeat(super::MAX_KEY_BYTES + 1),
        Vec::new(),
    )]));
    invalid(store.apply(&[Write::PutState(
        "big".into(),
        vec![0; super::MAX_VALUE_BYTES + 1],
    )]));
    assert!(matches!(
        store.remember_key("", "k", 1),
        Err(BackendError::Invalid(_))
    ));
    assert!(store.health().status().is_ok(), "refusals are not failures");
}

fn owners(open: &dyn Fn(u64) -> Arc<dyn MeshStore>) {
    let (a, b) = (open(101), open(102));
    a.apply(&[
        Write::PutState("shared-name".into(), b"a".to_vec()),
        Write::PutNodeState(101, json!("a")),
    ])
    .unwrap();
    b.apply(&[Write::PutState("shared-name".into(), b"b".to_vec())])
        .unwrap();
    assert_eq!(
        a.get_state("shared-name").unwrap().as_deref(),
        Some(&b"a"[..])
    );
    assert_eq!(
        b.get_state("shared-name").unwrap().as_deref(),
        Some(&b"b"[..])
    );
    assert!(
        b.node_states().unwrap().is_empty(),
        "owners never see each other's rows"
    );
}

fn record(role: Role) -> StreamRecord {
    StreamRecord {
        role,
        tenant: "acme".into(),
        source: 1,
        targets: vec![2, u64::MAX],
        quorum: 1,
        ack_on_source: true,
        high: 0,
        low: 0,
        closed: None,
        priority: 7,
    }
}

/// Runs the stream store checks (backends that hold streams).
pub fn streams(open: &dyn Fn(u64) -> Arc<dyn MeshStore>) {
    let store = open(1);
    let db = store.streams(0).expect("a stream store");
    let (source, target) = (u128::MAX - 7, 8);
    let mut batch = Batch::default();
    let mut t = record(Role::Target);
    t.high = 3;
    batch.records.push((source, Some(record(Role::Source))));
    batch.records.push((target, Some(t.clone())));
    batch.outbox.push((source, 1, b"one".to_vec()));
    batch.outbox.push((source, 2, b"two".to_vec()));
    for seq in 1..=3 {
        batch.inbox.push((target, seq, vec![seq as u8]));
    }
    db.commit(batch, 100).unwrap();
    let mut loaded = db.load().unwrap();
    loaded.sort_by_key(|(id, _)| *id);
    assert_eq!(
        loaded,
        vec![(target, t.clone()), (source, record(Role::Source))],
        "records round-trip whole"
    );
    assert_eq!(
        db.read(Queue::Outbox, &[(source, 1), (source, 3)], 0, usize::MAX)
            .unwrap(),
        vec![Some(b"one".to_vec()), None]
    );
    let budgeted = db
        .read(Queue::Outbox, &[(source, 1), (source, 2)], 16, 1)
        .unwrap();
    assert_eq!(budgeted.len(), 1, "stops once the budget is read");
    assert!(
        budgeted[0].as_ref().unwrap().capacity() >= 3 + 16,
        "room for a tag"
    );

    // Another worker and another owner see none of it.
    assert!(store.streams(1).unwrap().load().unwrap().is_empty());
    assert!(open(2).streams(0).unwrap().load().unwrap().is_empty());

    let mut batch = Batch::default();
    t.low = 2;
    t.closed = Some(3);
    batch.records.push((target, Some(t.clone())));
    batch.processed.push((target, 1, 2));
    batch.released.push((source, 1));
    db.commit(batch, 200).unwrap();
    assert_eq!(
        db.read(
            Queue::Inbox,
            &[(target, 1), (target, 2), (target, 3)],
            0,
            usize::MAX
        )
        .unwrap(),
        vec![None, None, Some(vec![3])]
    );
    assert_eq!(
        db.read(Queue::Outbox, &[(source, 1), (source, 2)], 0, usize::MAX)
            .unwrap(),
        vec![None, Some(b"two".to_vec())]
    );
    assert_eq!(
        db.delivery_log(target, 0).unwrap(),
        vec![(1, 200), (2, 200)]
    );
    assert_eq!(db.delivery_log(target, 2).unwrap(), vec![(2, 200)]);

    // A fresh handle (a restart) sees the same.
    drop(db);
    let db = store.streams(0).unwrap();
    let loaded = db.load().unwrap();
    assert_eq!(
        loaded.iter().find(|(id, _)| *id == target).map(|(_, r)| r),
        Some(&t)
    );

    // The delivery log keeps the newest DELIVERY_LOG_KEEP records.
    let keep = crate::streams::store::DELIVERY_LOG_KEEP;
    let mut batch = Batch::default();
    batch.processed.push((target, 3, keep + 10));
    db.commit(batch, 300).unwrap();
    let log = db.delivery_log(target, 0).unwrap();
    assert_eq!(log.len() as u64, keep);
    assert_eq!(log.first().map(|r| r.0), Some(11));
    assert_eq!(log.last(), Some(&(keep + 10, 300)));

    // A forgotten stream takes every row with it.
    let mut batch = Batch::default();
    batch.records.push((source, None));
    batch.records.push((target, None));
    db.commit(batch, 400).unwrap();
    assert!(db.load().unwrap().is_empty());
    assert_eq!(
        db.read(Queue::Outbox, &[(source, 2)], 0, usize::MAX)
            .unwrap(),
        vec![None]
    );
    assert!(db.delivery_log(target, 0).unwrap().is_empty());

    // Large batches land whole (one statement per table, whatever the count).
    let mut batch = Batch::default();
    batch.records.push((5, Some(record(Role::Source))));
    for seq in 1..=5000 {
        batch.outbox.push((5, seq, vec![1; 100]));
    }
    db.commit(batch, 500).unwrap();
    let keys: Vec<(u128, u64)> = (1..=5000).map(|s| (5, s)).collect();
    let read = db.read(Queue::Outbox, &keys, 0, usize::MAX).unwrap();
    assert!(read.iter().all(Option::is_some) && read.len() == 5000);
    let mut batch = Batch::default();
    batch.records.push((5, None));
    db.commit(batch, 600).unwrap();
}
