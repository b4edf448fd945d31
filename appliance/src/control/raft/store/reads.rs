//! What the control group's subscribers, `RequestDatabaseSync` and start-up read from the
//! applied state (read transactions: never waiting on the writer), and the subscribers'
//! positions. The openraft storage itself is in the parent module.

use redb::{Database, ReadableDatabase, ReadableTable};

use super::{
    AnyError, Decision, RAFT_SM, RAFT_UPDATES, REMOVED_LEFT, Standing, Stream, UPDATE_CURSORS, any,
    decode, read_value, standing,
};

/// The group's decisions as they stand: every admitted member with its key, every removed
/// node and every live setting (what a node applies at start).
pub fn decisions(db: &Database) -> Result<Vec<Decision>, AnyError> {
    let Standing {
        removed,
        policy,
        members,
    } = standing(&db.begin_read().map_err(any)?)?;
    let admitted = members
        .into_iter()
        .map(|(node, key)| Decision::Admit(node, key));
    let removed = removed.into_iter().map(|(node, kind)| match kind {
        REMOVED_LEFT => Decision::Leave(node),
        _ => Decision::Evict(node),
    });
    let settings = policy
        .into_iter()
        .map(|(key, value)| Decision::SetPolicy(key, value));
    Ok(admitted.chain(removed).chain(settings).collect())
}

/// The admitted members with the key each proved when it joined (the group's member list).
pub fn members(db: &Database) -> Result<Vec<(u64, [u8; 32])>, AnyError> {
    Ok(standing(&db.begin_read().map_err(any)?)?.members)
}

/// The oldest update index still held (older ones were dropped by retention; 0: none
/// dropped).
pub fn oldest_kept(db: &Database) -> Result<u64, AnyError> {
    Ok(read_value::<u64>(db, RAFT_SM, "oldest_kept")?.unwrap_or(0))
}

/// Up to `limit` applied updates of `stream` with index above `after`, in log order, and
/// whether the scan stopped at the limit (more may follow). A read transaction: never waits
/// on the writer.
pub fn read_updates(
    db: &Database,
    stream: Stream,
    after: u64,
    limit: usize,
) -> Result<(Vec<(u64, Vec<u8>)>, bool), AnyError> {
    read_updates_where(db, stream, after, limit, |_| true)
}

/// As [`read_updates`], keeping only payloads `keep` accepts.
pub fn read_updates_where(
    db: &Database,
    stream: Stream,
    after: u64,
    limit: usize,
    mut keep: impl FnMut(&[u8]) -> bool,
) -> Result<(Vec<(u64, Vec<u8>)>, bool), AnyError> {
    let txn = db.begin_read().map_err(any)?;
    let table = txn.open_table(RAFT_UPDATES).map_err(any)?;
    let mut found = Vec::new();
    let Some(start) = after.checked_add(1) else {
        return Ok((found, false));
    };
    for row in table.range(start..).map_err(any)? {
        let (index, value) = row.map_err(any)?;
        let (row_stream, payload): (Stream, Vec<u8>) = decode(value.value())?;
        if row_stream != stream || !keep(&payload) {
            continue;
        }
        if found.len() == limit {
            return Ok((found, true));
        }
        found.push((index.value(), payload));
    }
    Ok((found, false))
}

/// The index `subscriber` acknowledged on `stream` (0: none).
pub fn cursor(db: &Database, stream: Stream, subscriber: &str) -> Result<u64, AnyError> {
    let key = format!("{}/{subscriber}", stream.name());
    let txn = db.begin_read().map_err(any)?;
    let table = txn.open_table(UPDATE_CURSORS).map_err(any)?;
    Ok(table
        .get(key.as_str())
        .map_err(any)?
        .map_or(0, |v| v.value()))
}

/// Records that `subscriber` processed `stream` up to `index` (never moving back); answers
/// the stored index. Durable when it returns.
pub fn ack_cursor(
    db: &Database,
    stream: Stream,
    subscriber: &str,
    index: u64,
) -> Result<u64, AnyError> {
    let key = format!("{}/{subscriber}", stream.name());
    let txn = db.begin_write().map_err(any)?;
    let stored = {
        let mut table = txn.open_table(UPDATE_CURSORS).map_err(any)?;
        let held = table
            .get(key.as_str())
            .map_err(any)?
            .map_or(0, |v| v.value());
        let stored = held.max(index);
        table.insert(key.as_str(), stored).map_err(any)?;
        stored
    };
    txn.commit().map_err(any)?;
    Ok(stored)
}
