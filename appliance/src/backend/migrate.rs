//! Applies `migrations/` to a PostgreSQL database at start.
//!
//! The files are compiled in (a node never runs SQL it was not built with). A session-level
//! advisory lock — the key every file also takes per transaction — makes nodes starting
//! together against one database migrate one after the other; each file records itself in
//! `schema_migrations`, so a file already applied is skipped and a re-run is harmless.

use tokio_postgres::Client;

use super::{BackendError, Result};

/// The advisory lock key every migration takes (migrations/README.md).
pub(super) const LOCK_KEY: i64 = 7_235_010_001;

/// One migration file.
#[derive(Clone, Copy, Debug)]
pub struct Migration {
    /// Its number (`0001_…` is 1).
    pub version: i64,
    /// Its name without `.sql`.
    pub name: &'static str,
    /// Its SQL (one transaction, recording itself in `schema_migrations`).
    pub sql: &'static str,
}

/// Every migration, in order.
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "0001_init",
        sql: include_str!("../../../migrations/0001_init.sql"),
    },
    Migration {
        version: 2,
        name: "0002_mesh_runtime",
        sql: include_str!("../../../migrations/0002_mesh_runtime.sql"),
    },
];

fn failed(e: impl std::fmt::Display) -> BackendError {
    BackendError::Failed {
        backend: "postgres",
        reason: format!("migrating: {e}"),
    }
}

/// Applies the missing migrations; returns the versions it applied.
pub(super) async fn migrate(client: &Client) -> Result<Vec<i64>> {
    client
        .execute("SELECT pg_advisory_lock($1)", &[&LOCK_KEY])
        .await
        .map_err(failed)?;
    let result = apply_missing(client).await;
    // Released whatever happened: a node that failed to migrate must not hold up the others.
    let unlock = client
        .execute("SELECT pg_advisory_unlock($1)", &[&LOCK_KEY])
        .await
        .map_err(failed);
    let applied = result?;
    unlock?;
    Ok(applied)
}

async fn apply_missing(client: &Client) -> Result<Vec<i64>> {
    let exists: bool = client
        .query_one("SELECT to_regclass('schema_migrations') IS NOT NULL", &[])
        .await
        .map_err(failed)?
        .get(0);
    let done: Vec<i64> = if exists {
        client
            .query("SELECT version FROM schema_migrations", &[])
            .await
            .map_err(failed)?
            .iter()
            .map(|row| row.get(0))
            .collect()
    } else {
        Vec::new()
    };
    if let Some(newest) = done.iter().max()
        && *newest > MIGRATIONS.last().map_or(0, |m| m.version)
    {
        tracing::warn!(
            database = newest,
            known = MIGRATIONS.len(),
            "the database was migrated by a newer meshd; using the tables this version knows"
        );
    }
    let mut applied = Vec::new();
    for migration in MIGRATIONS {
        if done.contains(&migration.version) {
            continue;
        }
        client.batch_execute(migration.sql).await.map_err(|e| {
            failed(format!(
                "{} did not apply: {}",
                migration.name,
                e.as_db_error()
                    .map_or(e.to_string(), |d| d.message().to_string())
            ))
        })?;
        tracing::info!(migration = migration.name, "applied");
        applied.push(migration.version);
    }
    Ok(applied)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_file_is_listed_in_order_and_records_itself() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../migrations");
        let mut files: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|name| name.ends_with(".sql"))
            .collect();
        files.sort();
        let names: Vec<String> = MIGRATIONS
            .iter()
            .map(|m| format!("{}.sql", m.name))
            .collect();
        assert_eq!(files, names, "migrations/ and MIGRATIONS differ");
        for (i, m) in MIGRATIONS.iter().enumerate() {
            assert_eq!(m.version, i as i64 + 1, "gap-free numbering");
            assert!(m.name.starts_with(&format!("{:04}_", m.version)));
            let record = format!("VALUES ({}, '{}')", m.version, m.name);
            assert!(m.sql.contains(&record), "{} must record itself", m.name);
            assert!(
                m.sql
                    .contains(&format!("pg_advisory_xact_lock({LOCK_KEY})"))
            );
            assert!(m.sql.trim_end().ends_with("COMMIT;"));
        }
    }
}
