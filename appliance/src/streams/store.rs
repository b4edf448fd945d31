//! A stream worker's redb database (`streams-<i>.redb`): stream records, the source's outbox,
//! the target's inbox and its delivery log. Every turn of the worker is one write transaction
//! (group commit: one fsync for every message, report and acknowledgement of the turn), and a
//! target's processed offset is written in the same transaction as the delivery record of
//! the messages it covers and the removal of their inbox rows.

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

/// Stream id → [`StreamRecord`] (postcard).
const STREAMS: TableDefinition<'_, u128, &[u8]> = TableDefinition::new("streams");
/// (stream, seq) → the sealed message, until every target processed it.
const OUTBOX: TableDefinition<'_, (u128, u64), &[u8]> = TableDefinition::new("outbox");
/// (stream, seq) → the message, from its arrival until the subscriber processed it.
const INBOX: TableDefinition<'_, (u128, u64), &[u8]> = TableDefinition::new("inbox");
/// (stream, seq) → when the subscriber's acknowledgement of it was recorded (ms).
const DELIVERY_LOG: TableDefinition<'_, (u128, u64), u64> = TableDefinition::new("delivery_log");

/// Delivery records kept per stream (the most recent ones).
pub const DELIVERY_LOG_KEEP: u64 = 4096;

/// Which end of a stream this node is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Role {
    /// It publishes.
    Source,
    /// It receives.
    Target,
}

/// What a node keeps about one stream.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamRecord {
    /// Which end this node is.
    pub role: Role,
    /// The tenant whose key seals the messages.
    pub tenant: String,
    /// The source node.
    pub source: u64,
    /// Every target node.
    pub targets: Vec<u64>,
    /// 0: all targets; k: k of them.
    pub quorum: u32,
    /// Publishes are answered on the source's fsync alone.
    pub ack_on_source: bool,
    /// Source: the last seq published. Target: every seq up to here is in the inbox.
    pub high: u64,
    /// Source: every seq up to here left the outbox. Target: every seq up to here processed.
    pub low: u64,
    /// Closed at this seq (source: by its producer; target: as the source said).
    pub closed: Option<u64>,
    /// 0..=7, higher first: sent (source) and delivered (target) before lower ones.
    pub priority: u8,
}

/// The writes of one turn, committed together.
#[derive(Debug, Default)]
pub struct Batch {
    /// Records to write (`None`: the stream and all its rows go).
    pub records: Vec<(u128, Option<StreamRecord>)>,
    /// Messages entering the outbox.
    pub outbox: Vec<(u128, u64, Vec<u8>)>,
    /// Outbox rows up to a seq to delete.
    pub released: Vec<(u128, u64)>,
    /// Messages entering the inbox.
    pub inbox: Vec<(u128, u64, Vec<u8>)>,
    /// Subscriber acknowledgements: (stream, from, to) processed; their inbox rows go and
    /// their delivery records are written.
    pub processed: Vec<(u128, u64, u64)>,
}

impl Batch {
    /// Nothing to write.
    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
            && self.outbox.is_empty()
            && self.released.is_empty()
            && self.inbox.is_empty()
            && self.processed.is_empty()
    }
}

/// A storage failure, with what failed.
#[derive(Debug, thiserror::Error)]
#[error("stream storage: {0}")]
pub struct StoreError(String);

fn err(e: impl std::fmt::Display) -> StoreError {
    StoreError(e.to_string())
}

/// Opens (creating if needed) the database and its tables.
pub fn open(path: &std::path::Path) -> Result<Database, StoreError> {
    let db = Database::create(path).map_err(err)?;
    let txn = db.begin_write().map_err(err)?;
    txn.open_table(STREAMS).map_err(err)?;
    txn.open_table(OUTBOX).map_err(err)?;
    txn.open_table(INBOX).map_err(err)?;
    txn.open_table(DELIVERY_LOG).map_err(err)?;
    txn.commit().map_err(err)?;
    Ok(db)
}

/// Every stream record.
pub fn load(db: &Database) -> Result<Vec<(u128, StreamRecord)>, StoreError> {
    let txn = db.begin_read().map_err(err)?;
    let table = txn.open_table(STREAMS).map_err(err)?;
    let mut out = Vec::new();
    for row in table.iter().map_err(err)? {
        let (id, bytes) = row.map_err(err)?;
        let record: StreamRecord = postcard::from_bytes(bytes.value()).map_err(err)?;
        assert!(
            record.low <= record.high,
            "stream record with low past high"
        );
        out.push((id.value(), record));
    }
    Ok(out)
}

/// Writes a batch in one transaction, durable (fsync) when this returns.
pub fn commit(db: &Database, batch: &Batch, now_ms: u64) -> Result<(), StoreError> {
    let txn = db.begin_write().map_err(err)?;
    {
        let mut streams = txn.open_table(STREAMS).map_err(err)?;
        let mut outbox = txn.open_table(OUTBOX).map_err(err)?;
        let mut inbox = txn.open_table(INBOX).map_err(err)?;
        let mut log = txn.open_table(DELIVERY_LOG).map_err(err)?;
        for (stream, seq, message) in &batch.outbox {
            outbox
                .insert((*stream, *seq), message.as_slice())
                .map_err(err)?;
        }
        for (stream, up_to) in &batch.released {
            outbox
                .retain_in((*stream, 0)..=(*stream, *up_to), |_, _| false)
                .map_err(err)?;
        }
        for (stream, seq, message) in &batch.inbox {
            inbox
                .insert((*stream, *seq), message.as_slice())
                .map_err(err)?;
        }
        for &(stream, from, to) in &batch.processed {
            debug_assert!(from <= to);
            inbox
                .retain_in((stream, 0)..=(stream, to), |_, _| false)
                .map_err(err)?;
            for seq in from.max(to.saturating_sub(DELIVERY_LOG_KEEP) + 1)..=to {
                log.insert((stream, seq), now_ms).map_err(err)?;
            }
            if to > DELIVERY_LOG_KEEP {
                log.retain_in((stream, 0)..=(stream, to - DELIVERY_LOG_KEEP), |_, _| false)
                    .map_err(err)?;
            }
        }
        for (stream, record) in &batch.records {
            match record {
                Some(record) => {
                    let bytes = postcard::to_allocvec(record).map_err(err)?;
                    streams.insert(*stream, bytes.as_slice()).map_err(err)?;
                }
                None => {
                    streams.remove(*stream).map_err(err)?;
                    let all = (*stream, 0)..=(*stream, u64::MAX);
                    outbox.retain_in(all.clone(), |_, _| false).map_err(err)?;
                    inbox.retain_in(all.clone(), |_, _| false).map_err(err)?;
                    log.retain_in(all, |_, _| false).map_err(err)?;
                }
            }
        }
    }
    txn.commit().map_err(err)
}

/// Which table [`read`] reads.
#[derive(Clone, Copy, Debug)]
pub enum Queue {
    /// The source's outbox.
    Outbox,
    /// The target's inbox.
    Inbox,
}

/// The messages at `keys` (`None` for one not there), in one read transaction, each in a
/// buffer with `spare` bytes of room after it (for an origin tag, so sending copies nothing
/// more). Stops once `max_bytes` were read (at least one message is): the answer may be
/// shorter than `keys`, and the caller sends the rest later.
pub fn read(
    db: &Database,
    which: Queue,
    keys: &[(u128, u64)],
    spare: usize,
    max_bytes: usize,
) -> Result<Vec<Option<Vec<u8>>>, StoreError> {
    if keys.is_empty() {
        return Ok(Vec::new());
    }
    let txn = db.begin_read().map_err(err)?;
    let table = txn
        .open_table(match which {
            Queue::Outbox => OUTBOX,
            Queue::Inbox => INBOX,
        })
        .map_err(err)?;
    let mut out = Vec::with_capacity(keys.len());
    let mut bytes = 0;
    for key in keys {
        if bytes >= max_bytes {
            break;
        }
        let message = table.get(*key).map_err(err)?.map(|v| {
            let value = v.value();
            let mut message = Vec::with_capacity(value.len() + spare);
            message.extend_from_slice(value);
            message
        });
        bytes += message.as_ref().map_or(0, Vec::len);
        out.push(message);
    }
    Ok(out)
}

/// The delivery records of `stream` from `from` on: (seq, ms).
pub fn delivery_log(db: &Database, stream: u128, from: u64) -> Result<Vec<(u64, u64)>, StoreError> {
    let txn = db.begin_read().map_err(err)?;
    let table = txn.open_table(DELIVERY_LOG).map_err(err)?;
    let mut out = Vec::new();
    for row in table
        .range((stream, from)..=(stream, u64::MAX))
        .map_err(err)?
    {
        let (key, at) = row.map_err(err)?;
        out.push((key.value().1, at.value()));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(role: Role) -> StreamRecord {
        StreamRecord {
            role,
            tenant: "acme".into(),
            source: 1,
            targets: vec![2, 3],
            quorum: 0,
            ack_on_source: false,
            high: 0,
            low: 0,
            closed: None,
            priority: 0,
        }
    }

    #[test]
    fn a_batch_lands_whole_and_processed_offsets_move_with_their_records() {
        let dir = tempfile::tempdir().unwrap();
        let db = open(&dir.path().join("s.redb")).unwrap();
        let mut batch = Batch::default();
        let mut target = record(Role::Target);
        target.high = 3;
        batch.records.push((7, Some(record(Role::Source))));
        batch.records.push((8, Some(target.clone())));
        batch.outbox.push((7, 1, b"one".to_vec()));
        batch.outbox.push((7, 2, b"two".to_vec()));
        for seq in 1..=3 {
            batch.inbox.push((8, seq, vec![seq as u8]));
        }
        commit(&db, &batch, 100).unwrap();
        assert_eq!(load(&db).unwrap().len(), 2);
        assert_eq!(
            read(&db, Queue::Outbox, &[(7, 1), (7, 3)], 0, usize::MAX).unwrap(),
            vec![Some(b"one".to_vec()), None]
        );
        let budgeted = read(&db, Queue::Outbox, &[(7, 1), (7, 2)], 16, 1).unwrap();
        assert_eq!(budgeted.len(), 1, "stops once the budget is read");
        assert!(
            budgeted[0].as_ref().unwrap().capacity() >= 3 + 16,
            "room for a tag"
        );

        let mut batch = Batch::default();
        target.low = 2;
        batch.records.push((8, Some(target)));
        batch.processed.push((8, 1, 2));
        batch.released.push((7, 1));
        commit(&db, &batch, 200).unwrap();
        assert_eq!(
            read(&db, Queue::Inbox, &[(8, 1), (8, 2), (8, 3)], 0, usize::MAX).unwrap(),
            vec![None, None, Some(vec![3])]
        );
        assert_eq!(
            read(&db, Queue::Outbox, &[(7, 1)], 0, usize::MAX).unwrap(),
            vec![None]
        );
        assert_eq!(delivery_log(&db, 8, 0).unwrap(), vec![(1, 200), (2, 200)]);
        drop(db);

        let db = open(&dir.path().join("s.redb")).unwrap();
        let records = load(&db).unwrap();
        assert_eq!(records.iter().find(|(id, _)| *id == 8).unwrap().1.low, 2);
        let mut batch = Batch::default();
        batch.records.push((7, None));
        commit(&db, &batch, 300).unwrap();
        assert_eq!(
            read(&db, Queue::Outbox, &[(7, 2)], 0, usize::MAX).unwrap(),
            vec![None]
        );
        assert_eq!(load(&db).unwrap().len(), 1);
    }
}
