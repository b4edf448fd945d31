//! The control database across reopenings (what a restart or kill -9 leaves).
use super::*;

#[test]
fn identity_is_created_once_and_survives_reopening() {
    let dir = tempfile::tempdir().unwrap();
    let (first, created) = ControlDb::open(dir.path())
        .unwrap()
        .load_or_create_identity(42)
        .unwrap();
    assert!(created);
    assert_eq!(first.node_id, 42);
    let db = ControlDb::open(dir.path()).unwrap();
    let (again, created) = db.load_or_create_identity(0).unwrap();
    assert!(!created);
    assert_eq!(again.node_id, 42);
    assert_eq!(again.signing_key.to_bytes(), first.signing_key.to_bytes());
    assert_eq!(again.tls_cert_der, first.tls_cert_der);
}

#[test]
fn a_config_with_another_node_id_is_refused_with_a_fix() {
    let dir = tempfile::tempdir().unwrap();
    let db = ControlDb::open(dir.path()).unwrap();
    db.load_or_create_identity(7).unwrap();
    let error = db.load_or_create_identity(8).err().unwrap().to_string();
    assert!(
        error.contains("node 7") && error.contains("fix:"),
        "{error}"
    );
}

#[test]
fn the_mesh_record_and_evictions_round_trip_and_leaving_forgets_them() {
    let dir = tempfile::tempdir().unwrap();
    let db = ControlDb::open(dir.path()).unwrap();
    assert!(db.mesh().unwrap().is_none());
    let record = MeshRecord {
        config: Some(meshd_proto::link::MeshConfig {
            mesh_id: "01J".into(),
            name: "prod".into(),
            ..Default::default()
        }),
        state: 1,
    };
    db.save_mesh(&record, true).unwrap();
    db.set_evicted(7, true).unwrap();
    db.add_dial_target("127.0.0.1:9".parse().unwrap()).unwrap();
    drop(db);
    let db = ControlDb::open(dir.path()).unwrap();
    assert_eq!(db.mesh().unwrap(), Some(record));
    assert_eq!(db.evicted().unwrap(), vec![7]);
    db.clear_mesh().unwrap();
    assert!(db.mesh().unwrap().is_none() && db.evicted().unwrap().is_empty());
    assert!(db.dial_targets().unwrap().is_empty());
}

#[test]
fn the_generation_grows_with_every_start() {
    let dir = tempfile::tempdir().unwrap();
    let first = ControlDb::open(dir.path())
        .unwrap()
        .next_generation()
        .unwrap();
    let second = ControlDb::open(dir.path())
        .unwrap()
        .next_generation()
        .unwrap();
    assert_eq!((first, second), (1, 2));
}

#[test]
fn peers_and_dial_targets_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let db = ControlDb::open(dir.path()).unwrap();
    let record = PeerRecord {
        public_key: [5; 32],
        listen_addr: "127.0.0.1:9".into(),
        last_seen_ms: 123,
    };
    db.upsert_peer(3, &record).unwrap();
    assert_eq!(db.peers().unwrap(), vec![(3, record)]);
    let addr: SocketAddr = "127.0.0.1:7000".parse().unwrap();
    db.add_dial_target(addr).unwrap();
    assert_eq!(db.dial_targets().unwrap(), vec![addr]);
    db.remove_dial_target(addr).unwrap();
    assert!(db.dial_targets().unwrap().is_empty());
}

fn peer(key: u8) -> PeerRecord {
    PeerRecord {
        public_key: [key; 32],
        listen_addr: format!("127.0.0.1:{}", 7000 + u16::from(key)),
        last_seen_ms: u64::from(key),
    }
}

#[test]
fn a_batch_of_many_writes_is_one_transaction_and_the_newest_write_of_a_row_wins() {
    let dir = tempfile::tempdir().unwrap();
    let db = ControlDb::open(dir.path()).unwrap();
    let before = db.commits();
    let mut batch = WriteBatch::default();
    // A burst of link-ups of 100 peers, each seen 10 times, and a flapping dial target.
    for round in 0..10u8 {
        for node in 1..=100u64 {
            batch.upsert_peer(node, peer(round));
        }
    }
    let addr: SocketAddr = "127.0.0.1:9000".parse().unwrap();
    for _ in 0..50 {
        batch.add_dial_target(addr);
        batch.remove_dial_target(addr);
    }
    batch.add_dial_target(addr);
    batch.set_evicted(7, true);
    batch.set_evicted(8, true);
    batch.set_evicted(8, false);
    assert_eq!(batch.len(), 100 + 1 + 2, "rows, not events");
    db.commit(&batch).unwrap();
    assert_eq!(db.commits() - before, 1);
    let peers = db.peers().unwrap();
    assert_eq!(peers.len(), 100);
    assert!(peers.iter().all(|(_, record)| *record == peer(9)));
    assert_eq!(db.dial_targets().unwrap(), vec![addr]);
    assert_eq!(db.evicted().unwrap(), vec![7]);
    db.commit(&WriteBatch::default()).unwrap();
    assert_eq!(db.commits() - before, 1, "an empty batch writes nothing");
}

#[test]
fn a_renewed_generation_is_never_handed_out_again_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let db = ControlDb::open(dir.path()).unwrap();
    assert_eq!(db.next_generation().unwrap(), 1);
    // Membership renewed the identity twice at run time (refuted a false "down").
    let mut batch = WriteBatch::default();
    batch.raise_generation(2);
    batch.raise_generation(3);
    batch.raise_generation(2);
    db.commit(&batch).unwrap();
    drop(db);
    let db = ControlDb::open(dir.path()).unwrap();
    assert_eq!(
        db.next_generation().unwrap(),
        4,
        "strictly above every one used"
    );
    // A late batch with a lower generation does not lower it.
    let mut batch = WriteBatch::default();
    batch.raise_generation(2);
    db.commit(&batch).unwrap();
    assert_eq!(db.next_generation().unwrap(), 5);
}

#[test]
fn the_generation_at_its_maximum_is_refused_not_wrapped() {
    let dir = tempfile::tempdir().unwrap();
    let db = ControlDb::open(dir.path()).unwrap();
    let mut batch = WriteBatch::default();
    batch.raise_generation(u32::MAX);
    db.commit(&batch).unwrap();
    assert!(db.next_generation().is_err());
}

#[test]
fn departed_and_replaced_peers_are_pruned_and_leaving_forgets_every_peer() {
    let dir = tempfile::tempdir().unwrap();
    let db = ControlDb::open(dir.path()).unwrap();
    let mut batch = WriteBatch::default();
    for node in 1..=5 {
        batch.upsert_peer(node, peer(node as u8));
    }
    db.commit(&batch).unwrap();
    let mut batch = WriteBatch::default();
    batch.remove_peer(2);
    batch.remove_peer(4);
    batch.remove_peer(99);
    db.commit(&batch).unwrap();
    drop(db);
    let db = ControlDb::open(dir.path()).unwrap();
    let ids: Vec<u64> = db.peers().unwrap().into_iter().map(|(id, _)| id).collect();
    assert_eq!(ids, vec![1, 3, 5]);
    // A node replaced by a new key: the old row goes, the new key is pinned on link-up.
    let mut batch = WriteBatch::default();
    batch.remove_peer(3);
    batch.upsert_peer(3, peer(33));
    db.commit(&batch).unwrap();
    assert!(db.peers().unwrap().contains(&(3, peer(33))));
    db.clear_mesh().unwrap();
    assert!(db.peers().unwrap().is_empty());
}

#[test]
fn merging_batches_equals_applying_their_writes_in_order() {
    let addr: SocketAddr = "127.0.0.1:9".parse().unwrap();
    let mut first = WriteBatch::default();
    first.upsert_peer(1, peer(1));
    first.add_dial_target(addr);
    first.set_evicted(4, true);
    first.raise_generation(9);
    let mut second = WriteBatch::default();
    second.clear_mesh();
    second.upsert_peer(2, peer(2));
    second.raise_generation(3);
    let mut merged = first.clone();
    merged.merge(second.clone());

    let dir = tempfile::tempdir().unwrap();
    let one_by_one = ControlDb::open(dir.path()).unwrap();
    one_by_one.commit(&first).unwrap();
    one_by_one.commit(&second).unwrap();
    let dir2 = tempfile::tempdir().unwrap();
    let together = ControlDb::open(dir2.path()).unwrap();
    together.commit(&merged).unwrap();
    for db in [&one_by_one, &together] {
        assert_eq!(db.peers().unwrap(), vec![(2, peer(2))]);
        assert!(db.dial_targets().unwrap().is_empty());
        assert!(db.evicted().unwrap().is_empty());
        assert_eq!(db.next_generation().unwrap(), 10);
    }
}
