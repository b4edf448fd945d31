//! A stream worker's [`StreamStore`] on PostgreSQL: records, outbox, inbox and delivery log
//! in the `mesh_stream_*` tables, keyed by (owner, worker), one transaction per turn.

use std::{collections::HashMap, sync::Arc};

use tokio_postgres::Row;
use uuid::Uuid;

use super::{Client, READ_CHUNK, Shared, Slot, big, failed, seq_bound, transaction};
use crate::{
    backend::{Result, StreamStore},
    streams::store::{Batch, DELIVERY_LOG_KEEP, Queue, Role, StreamRecord},
};

/// A stream worker's tables on PostgreSQL, on a connection of its own.
pub struct PgStreams {
    shared: Arc<Shared>,
    worker: i32,
    slot: Slot,
}

impl PgStreams {
    pub(super) fn new(shared: Arc<Shared>, worker: i32) -> Self {
        Self {
            shared,
            worker,
            slot: std::sync::Mutex::new(None),
        }
    }

    fn run<T, F, Fut>(&self, op: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(Arc<Client>, i64, i32) -> Fut + Send + 'static,
        Fut: Future<Output = std::result::Result<T, tokio_postgres::Error>> + Send + 'static,
    {
        let (owner, worker) = (self.shared.owner, self.worker);
        self.shared
            .run(&self.slot, move |client| op(client, owner, worker))
    }
}

fn record_row(row: &Row) -> std::result::Result<(u128, StreamRecord), String> {
    let id: Uuid = row.get(0);
    let role = match row.get::<_, &str>(1) {
        "source" => Role::Source,
        "target" => Role::Target,
        other => return Err(format!("stream record with role {other:?}")),
    };
    let targets: Vec<i64> = row.get(4);
    let record = StreamRecord {
        role,
        tenant: row.get(2),
        source: row.get::<_, i64>(3) as u64,
        targets: targets.into_iter().map(|t| t as u64).collect(),
        quorum: u32::try_from(row.get::<_, i32>(5)).map_err(|_| "negative quorum")?,
        ack_on_source: row.get(6),
        high: row.get::<_, i64>(7) as u64,
        low: row.get::<_, i64>(8) as u64,
        closed: row.get::<_, Option<i64>>(9).map(|c| c as u64),
        priority: u8::try_from(row.get::<_, i32>(10)).map_err(|_| "priority out of range")?,
    };
    if record.low > record.high {
        return Err("stream record with low past high".into());
    }
    Ok((id.as_u128(), record))
}

/// Inserts (or overwrites) `rows` into a queue table in one statement.
async fn insert_queue(
    client: &Client,
    table: &str,
    owner: i64,
    worker: i32,
    rows: &[(u128, u64, Vec<u8>)],
) -> std::result::Result<(), tokio_postgres::Error> {
    if rows.is_empty() {
        return Ok(());
    }
    let ids: Vec<Uuid> = rows.iter().map(|(s, _, _)| Uuid::from_u128(*s)).collect();
    let seqs: Vec<i64> = rows.iter().map(|(_, q, _)| big(*q)).collect();
    let bodies: Vec<&[u8]> = rows.iter().map(|(_, _, m)| m.as_slice()).collect();
    client
        .execute(
            &format!(
                "INSERT INTO {table} (owner, worker, stream_id, seq, message) \
                 SELECT $1, $2, * FROM UNNEST($3::uuid[], $4::int8[], $5::bytea[]) \
                 ON CONFLICT (owner, worker, stream_id, seq) DO UPDATE SET message = EXCLUDED.message"
            ),
            &[&owner, &worker, &ids, &seqs, &bodies],
        )
        .await?;
    Ok(())
}

async fn commit_batch(
    client: &Client,
    owner: i64,
    worker: i32,
    batch: &Batch,
    now_ms: u64,
) -> std::result::Result<(), tokio_postgres::Error> {
    insert_queue(client, "mesh_stream_outbox", owner, worker, &batch.outbox).await?;
    for (stream, up_to) in &batch.released {
        client
            .execute(
                "DELETE FROM mesh_stream_outbox WHERE owner = $1 AND worker = $2 \
                 AND stream_id = $3 AND seq <= $4",
                &[
                    &owner,
                    &worker,
                    &Uuid::from_u128(*stream),
                    &seq_bound(*up_to),
                ],
            )
            .await?;
    }
    insert_queue(client, "mesh_stream_inbox", owner, worker, &batch.inbox).await?;
    for &(stream, from, to) in &batch.processed {
        let id = Uuid::from_u128(stream);
        client
            .execute(
                "DELETE FROM mesh_stream_inbox WHERE owner = $1 AND worker = $2 \
                 AND stream_id = $3 AND seq <= $4",
                &[&owner, &worker, &id, &seq_bound(to)],
            )
            .await?;
        let first = from.max(to.saturating_sub(DELIVERY_LOG_KEEP) + 1);
        client
            .execute(
                "INSERT INTO mesh_stream_delivery_log (owner, worker, stream_id, seq, delivered_ms) \
                 SELECT $1, $2, $3, s, $6 FROM generate_series($4::int8, $5::int8) AS s \
                 ON CONFLICT (owner, worker, stream_id, seq) DO UPDATE SET delivered_ms = EXCLUDED.delivered_ms",
                &[
                    &owner,
                    &worker,
                    &id,
                    &seq_bound(first),
                    &seq_bound(to),
                    &big(now_ms),
                ],
            )
            .await?;
        if to > DELIVERY_LOG_KEEP {
            client
                .execute(
                    "DELETE FROM mesh_stream_delivery_log WHERE owner = $1 AND worker = $2 \
                     AND stream_id = $3 AND seq <= $4",
                    &[&owner, &worker, &id, &seq_bound(to - DELIVERY_LOG_KEEP)],
                )
                .await?;
        }
    }
    for (stream, record) in &batch.records {
        let id = Uuid::from_u128(*stream);
        match record {
            Some(r) => {
                let role = match r.role {
                    Role::Source => "source",
                    Role::Target => "target",
                };
                let targets: Vec<i64> = r.targets.iter().map(|t| big(*t)).collect();
                client
                    .execute(
                        "INSERT INTO mesh_stream_records (owner, worker, stream_id, role, tenant, \
                         source, targets, quorum, ack_on_source, high, low, closed, priority) \
                         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13) \
                         ON CONFLICT (owner, worker, stream_id) DO UPDATE SET role = EXCLUDED.role, \
                         tenant = EXCLUDED.tenant, source = EXCLUDED.source, \
                         targets = EXCLUDED.targets, quorum = EXCLUDED.quorum, \
                         ack_on_source = EXCLUDED.ack_on_source, high = EXCLUDED.high, \
                         low = EXCLUDED.low, closed = EXCLUDED.closed, \
                         priority = EXCLUDED.priority, updated = now()",
                        &[
                            &owner,
                            &worker,
                            &id,
                            &role,
                            &r.tenant,
                            &big(r.source),
                            &targets,
                            &(r.quorum as i32),
                            &r.ack_on_source,
                            &big(r.high),
                            &big(r.low),
                            &r.closed.map(big),
                            &i32::from(r.priority),
                        ],
                    )
                    .await?;
            }
            None => {
                for table in [
                    "mesh_stream_records",
                    "mesh_stream_outbox",
                    "mesh_stream_inbox",
                    "mesh_stream_delivery_log",
                ] {
                    client
                        .execute(
                            &format!(
                                "DELETE FROM {table} WHERE owner = $1 AND worker = $2 AND stream_id = $3"
                            ),
                            &[&owner, &worker, &id],
                        )
                        .await?;
                }
            }
        }
    }
    Ok(())
}

impl StreamStore for PgStreams {
    fn load(&self) -> Result<Vec<(u128, StreamRecord)>> {
        let rows = self.run(|client, owner, worker| async move {
            client
                .query(
                    "SELECT stream_id, role, tenant, source, targets, quorum, ack_on_source, \
                     high, low, closed, priority FROM mesh_stream_records \
                     WHERE owner = $1 AND worker = $2",
                    &[&owner, &worker],
                )
                .await
        })?;
        rows.iter()
            .map(|row| record_row(row).map_err(failed))
            .collect()
    }

    fn commit(&self, batch: Batch, now_ms: u64) -> Result<()> {
        self.run(move |client, owner, worker| async move {
            transaction(
                &client,
                commit_batch(&client, owner, worker, &batch, now_ms),
            )
            .await
        })
    }

    fn read(
        &self,
        which: Queue,
        keys: &[(u128, u64)],
        spare: usize,
        max_bytes: usize,
    ) -> Result<Vec<Option<Vec<u8>>>> {
        let table = match which {
            Queue::Outbox => "mesh_stream_outbox",
            Queue::Inbox => "mesh_stream_inbox",
        };
        let mut out = Vec::with_capacity(keys.len());
        let mut bytes = 0;
        for chunk in keys.chunks(READ_CHUNK) {
            if bytes >= max_bytes {
                break;
            }
            let ids: Vec<Uuid> = chunk.iter().map(|(s, _)| Uuid::from_u128(*s)).collect();
            let seqs: Vec<i64> = chunk.iter().map(|(_, q)| big(*q)).collect();
            let rows = self.run(move |client, owner, worker| async move {
                client
                    .query(
                        &format!(
                            "SELECT stream_id, seq, message FROM {table} WHERE owner = $1 \
                             AND worker = $2 AND (stream_id, seq) IN \
                             (SELECT * FROM UNNEST($3::uuid[], $4::int8[]))"
                        ),
                        &[&owner, &worker, &ids, &seqs],
                    )
                    .await
            })?;
            let mut found: HashMap<(u128, u64), &[u8]> = rows
                .iter()
                .map(|r| {
                    let id: Uuid = r.get(0);
                    ((id.as_u128(), r.get::<_, i64>(1) as u64), r.get(2))
                })
                .collect();
            for key in chunk {
                if bytes >= max_bytes {
                    break;
                }
                let message = found.remove(key).map(|value| {
                    let mut message = Vec::with_capacity(value.len() + spare);
                    message.extend_from_slice(value);
                    message
                });
                bytes += message.as_ref().map_or(0, Vec::len);
                out.push(message);
            }
        }
        Ok(out)
    }

    fn delivery_log(&self, stream: u128, from: u64) -> Result<Vec<(u64, u64)>> {
        let id = Uuid::from_u128(stream);
        let from = seq_bound(from);
        self.run(move |client, owner, worker| async move {
            let rows = client
                .query(
                    "SELECT seq, delivered_ms FROM mesh_stream_delivery_log WHERE owner = $1 \
                     AND worker = $2 AND stream_id = $3 AND seq >= $4 ORDER BY seq",
                    &[&owner, &worker, &id, &from],
                )
                .await?;
            Ok(rows
                .iter()
                .map(|r| (r.get::<_, i64>(0) as u64, r.get::<_, i64>(1) as u64))
                .collect())
        })
    }
}
