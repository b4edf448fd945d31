//! The storage conformance suite against every backend, on real servers: redb in a temporary
//! directory, a PostgreSQL and a Redis each started by this test on loopback. Also the
//! migrations: applied once, versioned, safe when several nodes start against one database.

use std::{sync::Arc, time::Duration};

use meshd::backend::{
    MIGRATIONS, MeshStore, conformance, embedded::RedbStore, postgres::PgSetup, postgres::PgStore,
    redis::RedisStore,
};
use meshd_tests::dbs::{Postgres, Redis};

fn pg_setup(owner: u64, url: &str) -> PgSetup {
    PgSetup {
        owner,
        url: url.to_string(),
        pool_size: 2,
        connect_timeout: Duration::from_secs(3),
        timeout: Duration::from_secs(5),
    }
}

#[test]
fn redb_passes_the_suite() {
    let dir = tempfile::tempdir().unwrap();
    let open = |owner: u64| -> Arc<dyn MeshStore> {
        // One file per node on the embedded backend: owners are directories.
        Arc::new(RedbStore::open(&dir.path().join(owner.to_string()), owner).unwrap())
    };
    conformance::mesh_store(&open);
    conformance::streams(&open);
}

#[test]
fn postgres_passes_the_suite_and_migrates_once() {
    let pg = Postgres::start().unwrap();
    let url = pg.create_database("conformance").unwrap();
    // Four nodes start against one empty database at once: one migrates, the others wait
    // on the advisory lock and find the work done.
    let starts: Vec<_> = (0..4)
        .map(|i| {
            let url = url.clone();
            std::thread::spawn(move || PgStore::connect(&pg_setup(1000 + i, &url)).map(|_| ()))
        })
        .collect();
    for start in starts {
        start.join().unwrap().unwrap();
    }
    let versions = pg
        .query(
            "conformance",
            "SELECT string_agg(version::text, ',' ORDER BY version) FROM schema_migrations",
        )
        .unwrap();
    let expected: Vec<String> = MIGRATIONS.iter().map(|m| m.version.to_string()).collect();
    assert_eq!(versions, expected.join(","));

    let open = |owner: u64| -> Arc<dyn MeshStore> {
        Arc::new(PgStore::connect(&pg_setup(owner, &url)).unwrap())
    };
    conformance::mesh_store(&open);
    conformance::streams(&open);
    // The platform sees the rows (u64 ids past 2^63 as two's complement, as 0001 says).
    let nodes = pg
        .query(
            "conformance",
            "SELECT node_id FROM mesh_node_state WHERE owner = 1 ORDER BY node_id",
        )
        .unwrap();
    assert_eq!(nodes, "-1\n9");
}

#[test]
fn postgres_away_is_unavailable_then_recovers() {
    let mut pg = Postgres::start().unwrap();
    let url = pg.create_database("away").unwrap();
    let store = PgStore::connect(&pg_setup(1, &url)).unwrap();
    let streams = store.streams(0).unwrap();
    pg.kill();
    let err = store.health_check().unwrap_err();
    assert!(err.is_unavailable(), "{err}");
    assert!(store.health().status().is_err());
    let err = streams.load().unwrap_err();
    assert!(err.is_unavailable(), "{err}");
    pg.restart().unwrap();
    store.health_check().unwrap();
    assert!(store.health().status().is_ok());
    assert!(streams.load().unwrap().is_empty());
}

#[test]
fn redis_passes_the_suite_but_holds_no_streams() {
    let redis = Redis::start().unwrap();
    let open = |owner: u64| -> Arc<dyn MeshStore> {
        Arc::new(RedisStore::connect(&redis.url(), owner, Duration::from_secs(3)).unwrap())
    };
    conformance::mesh_store(&open);
    let err = open(1).streams(0).err().unwrap();
    assert!(err.to_string().contains("holds no streams"), "{err}");
}

/// One stream worker turn's commit (64 messages of 256 B into the outbox and a record) per
/// backend, printed; the bound only catches a collapse (a figure, not a timed assert).
#[test]
fn commit_latency_per_backend() {
    use meshd::streams::store::{Batch, Role, StreamRecord};
    fn measure(store: &dyn MeshStore) -> (Duration, Duration) {
        let db = store.streams(0).unwrap();
        let mut record = StreamRecord {
            role: Role::Source,
            tenant: "acme".into(),
            source: 1,
            targets: vec![2, 3],
            quorum: 0,
            ack_on_source: false,
            high: 0,
            low: 0,
            closed: None,
            priority: 0,
        };
        let mut took = Vec::new();
        for turn in 0..200u64 {
            let mut batch = Batch::default();
            for i in 0..64 {
                batch.outbox.push((9, turn * 64 + i + 1, vec![7; 256]));
            }
            record.high = (turn + 1) * 64;
            batch.records.push((9, Some(record.clone())));
            if turn > 0 {
                batch.released.push((9, turn * 64));
                record.low = turn * 64;
            }
            let start = std::time::Instant::now();
            db.commit(batch, turn).unwrap();
            took.push(start.elapsed());
        }
        took.sort();
        (took[took.len() / 2], took[took.len() * 99 / 100])
    }
    let dir = tempfile::tempdir().unwrap();
    let redb = RedbStore::open(dir.path(), 1).unwrap();
    let pg = Postgres::start().unwrap();
    let url = pg.create_database("latency").unwrap();
    let postgres = PgStore::connect(&pg_setup(1, &url)).unwrap();
    for (name, store) in [("redb", &redb as &dyn MeshStore), ("postgres", &postgres)] {
        let (p50, p99) = measure(store);
        println!(
            "{name}: one turn's commit (64 × 256 B + record + release): p50 {p50:?}, p99 {p99:?}"
        );
        assert!(
            p99 < Duration::from_secs(1),
            "{name} commits collapsed: p99 {p99:?}"
        );
    }
}
