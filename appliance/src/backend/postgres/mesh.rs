//! [`MeshStore`] on PostgreSQL: seed 001's operations as SQL on the `mesh_*` tables of
//! `0002_mesh_runtime.sql`, every row keyed by the owning node.

use std::sync::Arc;

use serde_json::Value;
use tokio_postgres::Row;

use super::{Client, PgStore, PgStreams, big, failed, seq_bound, transaction};
use crate::backend::{
    BackendError, BackendKind, ConsensusEntry, Counts, Health, MeshStore, Result, StoredMessage,
    StreamStore, Write,
};

fn message_row(row: &Row) -> StoredMessage {
    StoredMessage {
        id: row.get(0),
        from: row.get::<_, i64>(1) as u64,
        to: row.get::<_, i64>(2) as u64,
        content: row.get(3),
        timestamp_ms: row.get::<_, i64>(4) as u64,
    }
}

async fn apply_write(
    client: &Client,
    owner: i64,
    write: &Write,
) -> std::result::Result<(), tokio_postgres::Error> {
    match write {
        Write::PutMessage(m) => {
            client
                .execute(
                    "INSERT INTO mesh_messages (owner, id, from_node, to_node, content, ts_ms) \
                     VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (owner, id) DO UPDATE SET \
                     from_node = EXCLUDED.from_node, to_node = EXCLUDED.to_node, \
                     content = EXCLUDED.content, ts_ms = EXCLUDED.ts_ms",
                    &[
                        &owner,
                        &m.id,
                        &big(m.from),
                        &big(m.to),
                        &m.content,
                        &big(m.timestamp_ms),
                    ],
                )
                .await?;
        }
        Write::DeleteMessage(id) => {
            client
                .execute(
                    "DELETE FROM mesh_messages WHERE owner = $1 AND id = $2",
                    &[&owner, id],
                )
                .await?;
        }
        Write::PutState(key, value) => {
            client
                .execute(
                    "INSERT INTO mesh_state (owner, key, value) VALUES ($1, $2, $3) \
                     ON CONFLICT (owner, key) DO UPDATE SET value = EXCLUDED.value, updated = now()",
                    &[&owner, key, value],
                )
                .await?;
        }
        Write::DeleteState(key) => {
            client
                .execute(
                    "DELETE FROM mesh_state WHERE owner = $1 AND key = $2",
                    &[&owner, key],
                )
                .await?;
        }
        Write::PutNodeState(node, state) => {
            client
                .execute(
                    "INSERT INTO mesh_node_state (owner, node_id, state) VALUES ($1, $2, $3) \
                     ON CONFLICT (owner, node_id) DO UPDATE SET state = EXCLUDED.state, updated = now()",
                    &[&owner, &big(*node), state],
                )
                .await?;
        }
        Write::AppendConsensus(e) => {
            client
                .execute(
                    "INSERT INTO mesh_consensus_log (owner, log_index, term, entry) \
                     VALUES ($1, $2, $3, $4) ON CONFLICT (owner, log_index) DO UPDATE SET \
                     term = EXCLUDED.term, entry = EXCLUDED.entry",
                    &[&owner, &big(e.index), &big(e.term), &e.entry],
                )
                .await?;
        }
        Write::PurgeConsensus(up_to) => {
            client
                .execute(
                    "DELETE FROM mesh_consensus_log WHERE owner = $1 AND log_index <= $2",
                    &[&owner, &seq_bound(*up_to)],
                )
                .await?;
        }
        Write::ReplaceRoutes(routes) => {
            client
                .execute("DELETE FROM mesh_routing_table WHERE owner = $1", &[&owner])
                .await?;
            let destinations: Vec<i64> = routes.iter().map(|(d, _)| big(*d)).collect();
            let values: Vec<Value> = routes.iter().map(|(_, v)| v.clone()).collect();
            client
                .execute(
                    "INSERT INTO mesh_routing_table (owner, destination, route) \
                     SELECT $1, * FROM UNNEST($2::int8[], $3::jsonb[])",
                    &[&owner, &destinations, &values],
                )
                .await?;
        }
        Write::PutConfig(key, value) => {
            client
                .execute(
                    "INSERT INTO mesh_runtime_config (owner, key, value) VALUES ($1, $2, $3) \
                     ON CONFLICT (owner, key) DO UPDATE SET value = EXCLUDED.value, updated = now()",
                    &[&owner, key, value],
                )
                .await?;
        }
        Write::DeleteConfig(key) => {
            client
                .execute(
                    "DELETE FROM mesh_runtime_config WHERE owner = $1 AND key = $2",
                    &[&owner, key],
                )
                .await?;
        }
    }
    Ok(())
}

impl MeshStore for PgStore {
    fn kind(&self) -> BackendKind {
        BackendKind::Postgres
    }

    fn health(&self) -> &Arc<Health> {
        &self.shared.health
    }

    fn health_check(&self) -> Result<()> {
        let read = self.run(|client, owner| async move {
            transaction(&client, async {
                client
                    .execute(
                        "INSERT INTO mesh_state (owner, key, value) VALUES ($1, '__health_check', 'ok') \
                         ON CONFLICT (owner, key) DO UPDATE SET value = EXCLUDED.value, updated = now()",
                        &[&owner],
                    )
                    .await?;
                let row = client
                    .query_one(
                        "SELECT value FROM mesh_state WHERE owner = $1 AND key = '__health_check'",
                        &[&owner],
                    )
                    .await?;
                client
                    .execute(
                        "DELETE FROM mesh_state WHERE owner = $1 AND key = '__health_check'",
                        &[&owner],
                    )
                    .await?;
                Ok(row.get::<_, Vec<u8>>(0))
            })
            .await
        })?;
        if read == b"ok" {
            Ok(())
        } else {
            Err(failed("the probe key read back wrong"))
        }
    }

    fn apply(&self, writes: &[Write]) -> Result<()> {
        writes.iter().try_for_each(Write::validate)?;
        if writes.is_empty() {
            return Ok(());
        }
        let writes = writes.to_vec();
        self.run(|client, owner| async move {
            transaction(&client, async {
                for write in &writes {
                    apply_write(&client, owner, write).await?;
                }
                Ok(())
            })
            .await
        })
    }

    fn get_message(&self, id: &str) -> Result<Option<StoredMessage>> {
        let id = id.to_string();
        self.run(|client, owner| async move {
            let row = client
                .query_opt(
                    "SELECT id, from_node, to_node, content, ts_ms FROM mesh_messages \
                     WHERE owner = $1 AND id = $2",
                    &[&owner, &id],
                )
                .await?;
            Ok(row.as_ref().map(message_row))
        })
    }

    fn messages_to(&self, to: u64, limit: usize) -> Result<Vec<StoredMessage>> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.run(move |client, owner| async move {
            let rows = client
                .query(
                    "SELECT id, from_node, to_node, content, ts_ms FROM mesh_messages \
                     WHERE owner = $1 AND to_node = $2 ORDER BY ts_ms, id LIMIT $3",
                    &[&owner, &big(to), &limit],
                )
                .await?;
            Ok(rows.iter().map(message_row).collect())
        })
    }

    fn get_state(&self, key: &str) -> Result<Option<Vec<u8>>> {
        let key = key.to_string();
        self.run(|client, owner| async move {
            let row = client
                .query_opt(
                    "SELECT value FROM mesh_state WHERE owner = $1 AND key = $2",
                    &[&owner, &key],
                )
                .await?;
            Ok(row.map(|r| r.get(0)))
        })
    }

    fn node_states(&self) -> Result<Vec<(u64, Value)>> {
        self.run(|client, owner| async move {
            let rows = client
                .query(
                    "SELECT node_id, state FROM mesh_node_state WHERE owner = $1 ORDER BY node_id",
                    &[&owner],
                )
                .await?;
            Ok(rows
                .iter()
                .map(|r| (r.get::<_, i64>(0) as u64, r.get(1)))
                .collect())
        })
    }

    fn consensus_entries(&self, from: u64, limit: usize) -> Result<Vec<ConsensusEntry>> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let from = seq_bound(from);
        self.run(move |client, owner| async move {
            let rows = client
                .query(
                    "SELECT term, log_index, entry FROM mesh_consensus_log \
                     WHERE owner = $1 AND log_index >= $2 ORDER BY log_index LIMIT $3",
                    &[&owner, &from, &limit],
                )
                .await?;
            Ok(rows
                .iter()
                .map(|r| ConsensusEntry {
                    term: r.get::<_, i64>(0) as u64,
                    index: r.get::<_, i64>(1) as u64,
                    entry: r.get(2),
                })
                .collect())
        })
    }

    fn routes(&self) -> Result<Vec<(u64, Value)>> {
        self.run(|client, owner| async move {
            let rows = client
                .query(
                    "SELECT destination, route FROM mesh_routing_table WHERE owner = $1 \
                     ORDER BY destination",
                    &[&owner],
                )
                .await?;
            Ok(rows
                .iter()
                .map(|r| (r.get::<_, i64>(0) as u64, r.get(1)))
                .collect())
        })
    }

    fn config(&self) -> Result<Vec<(String, Value)>> {
        self.run(|client, owner| async move {
            let rows = client
                .query(
                    "SELECT key, value FROM mesh_runtime_config WHERE owner = $1 ORDER BY key",
                    &[&owner],
                )
                .await?;
            Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
        })
    }

    fn counts(&self) -> Result<Counts> {
        self.run(|client, owner| async move {
            let row = client
                .query_one(
                    "SELECT \
                     (SELECT count(*) FROM mesh_messages WHERE owner = $1), \
                     (SELECT count(*) FROM mesh_state WHERE owner = $1), \
                     (SELECT count(*) FROM mesh_node_state WHERE owner = $1), \
                     (SELECT count(*) FROM mesh_consensus_log WHERE owner = $1), \
                     (SELECT count(*) FROM mesh_routing_table WHERE owner = $1), \
                     (SELECT count(*) FROM mesh_runtime_config WHERE owner = $1)",
                    &[&owner],
                )
                .await?;
            let n = |i: usize| row.get::<_, i64>(i) as u64;
            Ok(Counts {
                messages: n(0),
                state: n(1),
                node_states: n(2),
                consensus: n(3),
                routes: n(4),
                config: n(5),
            })
        })
    }

    fn purge_messages_before(&self, before_ms: u64) -> Result<u64> {
        let before = seq_bound(before_ms);
        self.run(move |client, owner| async move {
            client
                .execute(
                    "DELETE FROM mesh_messages WHERE owner = $1 AND ts_ms < $2",
                    &[&owner, &before],
                )
                .await
        })
    }

    fn remember_key(&self, scope: &str, key: &str, ttl_ms: u64) -> Result<bool> {
        Write::DeleteState(scope.into()).validate()?;
        Write::DeleteState(key.into()).validate()?;
        let (scope, key) = (scope.to_string(), key.to_string());
        let now = big(crate::storage::now_ms());
        let expires = now.saturating_add(seq_bound(ttl_ms));
        self.run(move |client, owner| async move {
            // One statement: inserted, or taken over from an expired row; a live row stays
            // and nothing is returned. Expired rows are swept as new ones come.
            let row = client
                .query_opt(
                    "INSERT INTO mesh_idempotency_keys (owner, scope, key, expires_ms) \
                     VALUES ($1, $2, $3, $4) ON CONFLICT (owner, scope, key) DO UPDATE \
                     SET expires_ms = EXCLUDED.expires_ms \
                     WHERE mesh_idempotency_keys.expires_ms <= $5 RETURNING 1",
                    &[&owner, &scope, &key, &expires, &now],
                )
                .await?;
            client
                .execute(
                    "DELETE FROM mesh_idempotency_keys WHERE owner = $1 AND expires_ms <= $2",
                    &[&owner, &now],
                )
                .await?;
            Ok(row.is_some())
        })
    }

    fn take_credits(&self, bucket: &str, n: u64, capacity: u64, per_second: u64) -> Result<bool> {
        Write::DeleteState(bucket.into()).validate()?;
        let bucket = bucket.to_string();
        let now = crate::storage::now_ms();
        self.run(move |client, owner| async move {
            transaction(&client, async {
                client
                    .execute(
                        "INSERT INTO mesh_credits (owner, bucket, tokens, refreshed_ms) \
                         VALUES ($1, $2, $3, $4) ON CONFLICT (owner, bucket) DO NOTHING",
                        &[&owner, &bucket, &(capacity as f64), &big(now)],
                    )
                    .await?;
                let row = client
                    .query_one(
                        "SELECT tokens, refreshed_ms FROM mesh_credits \
                         WHERE owner = $1 AND bucket = $2 FOR UPDATE",
                        &[&owner, &bucket],
                    )
                    .await?;
                let (granted, left) = crate::backend::refill(
                    row.get(0),
                    row.get::<_, i64>(1) as u64,
                    now,
                    n,
                    capacity,
                    per_second,
                );
                client
                    .execute(
                        "UPDATE mesh_credits SET tokens = $3, refreshed_ms = $4 \
                         WHERE owner = $1 AND bucket = $2",
                        &[&owner, &bucket, &left, &big(now)],
                    )
                    .await?;
                Ok(granted)
            })
            .await
        })
    }

    fn streams(&self, worker: usize) -> Result<Box<dyn StreamStore>> {
        let worker =
            i32::try_from(worker).map_err(|_| BackendError::Invalid("worker index".into()))?;
        Ok(Box::new(PgStreams::new(Arc::clone(&self.shared), worker)))
    }
}
