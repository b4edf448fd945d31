//! Redis beside the primary backend (seed 002): idempotency keys with a TTL, credit buckets and
//! the hot set (node state, routing table) for readers that want them without a database
//! round trip. It implements the whole [`MeshStore`] so one conformance suite covers it, but it
//! holds no streams ([`MeshStore::streams`] refuses): an outbox and its offsets must survive
//! what Redis's default persistence (a snapshot every so often) does not promise.
//!
//! Keys are `meshd:<owner>:…`, so several nodes can share one Redis. A write set is one
//! `MULTI … EXEC` (atomic; Redis has no rollback, so every write is validated first and the
//! commands are such that none can fail on a well-formed key). Each store has one connection,
//! remade (within `connect_timeout`) after a failure; every call has a read/write deadline.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use redis::{Commands, Connection, RedisError};
use serde_json::Value;

use super::{
    BackendError, BackendKind, ConsensusEntry, Counts, Health, MeshStore, Result, StoredMessage,
    StreamStore, Write,
};

/// The credit bucket's refill-and-take, atomically in Redis (the arithmetic of `refill`).
const TAKE_CREDITS: &str = r"
local tokens = tonumber(redis.call('HGET', KEYS[1], 'tokens') or ARGV[2])
local at = tonumber(redis.call('HGET', KEYS[1], 'at') or ARGV[4])
local now, n, capacity, rate = tonumber(ARGV[4]), tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local elapsed = math.max(now - at, 0) / 1000.0
tokens = math.min(tokens + elapsed * rate, capacity)
local granted = 0
if tokens >= n then tokens = tokens - n; granted = 1 end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'at', tostring(now))
return granted
";

fn unavailable(e: impl std::fmt::Display) -> BackendError {
    BackendError::Unavailable {
        backend: "redis",
        reason: e.to_string(),
    }
}

fn failed(e: impl std::fmt::Display) -> BackendError {
    BackendError::Failed {
        backend: "redis",
        reason: e.to_string(),
    }
}

fn lost(e: &RedisError) -> bool {
    e.is_io_error() || e.is_timeout() || e.is_connection_dropped() || e.is_connection_refusal()
}

fn json(bytes: &[u8]) -> Result<Value> {
    serde_json::from_slice(bytes).map_err(failed)
}

/// [`MeshStore`] on Redis.
pub struct RedisStore {
    client: redis::Client,
    prefix: String,
    timeout: Duration,
    connection: Mutex<Option<Connection>>,
    credits: redis::Script,
    health: Arc<Health>,
}

impl RedisStore {
    /// Connects to `url` and checks it answers.
    pub fn connect(url: &str, owner: u64, timeout: Duration) -> anyhow::Result<Self> {
        let client = redis::Client::open(url)
            .map_err(|e| anyhow::anyhow!("storage.redis_url is not a Redis URL: {e}"))?;
        let store = Self {
            client,
            prefix: format!("meshd:{owner}:"),
            timeout,
            connection: Mutex::new(None),
            credits: redis::Script::new(TAKE_CREDITS),
            health: Arc::default(),
        };
        store
            .health_check()
            .map_err(|e| anyhow::anyhow!("Redis health check: {e}"))?;
        Ok(store)
    }

    fn key(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    /// Runs `op` on the connection (made first if there is none).
    fn run<T>(&self, op: impl FnOnce(&mut Connection) -> redis::RedisResult<T>) -> Result<T> {
        let mut guard = self
            .connection
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let result = (|| {
            if guard.is_none() {
                let connection = self
                    .client
                    .get_connection_with_timeout(self.timeout)
                    .map_err(unavailable)?;
                connection
                    .set_read_timeout(Some(self.timeout))
                    .map_err(unavailable)?;
                connection
                    .set_write_timeout(Some(self.timeout))
                    .map_err(unavailable)?;
                *guard = Some(connection);
            }
            let connection = guard.as_mut().expect("made above");
            op(connection).map_err(|e| {
                if lost(&e) {
                    *guard = None;
                    unavailable(e)
                } else {
                    failed(e)
                }
            })
        })();
        self.health.observe(&result);
        result
    }

    fn message_key(&self) -> String {
        self.key("messages")
    }

    fn by_time_key(&self) -> String {
        self.key("messages_by_time")
    }

    fn to_key(&self, to: u64) -> String {
        self.key(&format!("messages_to:{to}"))
    }

    /// Every field of hash `name` with its JSON value, in field order.
    fn json_hash<K: redis::FromRedisValue + Ord>(&self, name: &str) -> Result<Vec<(K, Value)>> {
        let hash = self.key(name);
        let rows: Vec<(K, Vec<u8>)> = self.run(|c| c.hgetall(&hash))?;
        let mut out = rows
            .into_iter()
            .map(|(k, v)| Ok((k, json(&v)?)))
            .collect::<Result<Vec<_>>>()?;
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }

    /// Drops a message's entry in its receiver's index (the old row, before a replace).
    fn unindex(&self, pipe: &mut redis::Pipeline, id: &str, old: Option<Vec<u8>>) {
        if let Some(old) = old.and_then(|b| StoredMessage::decode_row(String::new(), &b)) {
            pipe.zrem(self.to_key(old.to), id).ignore();
        }
    }

    fn decode_message(id: String, bytes: &[u8]) -> Result<StoredMessage> {
        StoredMessage::decode_row(id, bytes).ok_or_else(|| failed("corrupt message row"))
    }
}

impl MeshStore for RedisStore {
    fn kind(&self) -> BackendKind {
        BackendKind::Redis
    }

    fn health(&self) -> &Arc<Health> {
        &self.health
    }

    fn health_check(&self) -> Result<()> {
        let key = self.key("health_check");
        let read: Option<Vec<u8>> = self.run(|c| {
            let (_, read, _): ((), Option<Vec<u8>>, ()) = redis::pipe()
                .set(&key, b"ok".as_slice())
                .get(&key)
                .del(&key)
                .query(c)?;
            Ok(read)
        })?;
        if read.as_deref() == Some(b"ok".as_slice()) {
            Ok(())
        } else {
            Err(failed("the probe key read back wrong"))
        }
    }

    fn apply(&self, writes: &[Write]) -> Result<()> {
        writes.iter().try_for_each(Write::validate)?;
        // Index entries of messages being replaced or deleted: read first (one owner writes
        // its own keys, so nothing moves between this read and the EXEC).
        let touched: Vec<&str> = writes
            .iter()
            .filter_map(|w| match w {
                Write::PutMessage(m) => Some(m.id.as_str()),
                Write::DeleteMessage(id) => Some(id.as_str()),
                _ => None,
            })
            .collect();
        let old: Vec<Option<Vec<u8>>> = if touched.is_empty() {
            Vec::new()
        } else {
            let key = self.message_key();
            self.run(|c| redis::cmd("HMGET").arg(&key).arg(&touched).query(c))?
        };
        let purge_up_to = writes.iter().filter_map(|w| match w {
            Write::PurgeConsensus(i) => Some(*i),
            _ => None,
        });
        let purge_up_to = purge_up_to.max();
        let purged: Vec<String> = match purge_up_to {
            Some(up_to) => {
                let key = self.key("consensus_index");
                self.run(|c| c.zrangebyscore(&key, 0, up_to as f64))?
            }
            None => Vec::new(),
        };
        let mut pipe = redis::pipe();
        pipe.atomic();
        let mut old = old.into_iter();
        for write in writes {
            match write {
                Write::PutMessage(m) => {
                    self.unindex(&mut pipe, &m.id, old.next().flatten());
                    let row = m.encode_row();
                    pipe.hset(self.message_key(), &m.id, row).ignore();
                    pipe.zadd(self.by_time_key(), &m.id, m.timestamp_ms as f64)
                        .ignore();
                    pipe.zadd(self.to_key(m.to), &m.id, m.timestamp_ms as f64)
                        .ignore();
                }
                Write::DeleteMessage(id) => {
                    self.unindex(&mut pipe, id, old.next().flatten());
                    pipe.hdel(self.message_key(), id).ignore();
                    pipe.zrem(self.by_time_key(), id).ignore();
                }
                Write::PutState(k, v) => {
                    pipe.hset(self.key("state"), k, v.as_slice()).ignore();
                }
                Write::DeleteState(k) => {
                    pipe.hdel(self.key("state"), k).ignore();
                }
                Write::PutNodeState(node, v) => {
                    pipe.hset(self.key("node_state"), node, v.to_string())
                        .ignore();
                }
                Write::AppendConsensus(e) => {
                    let row = serde_json::json!({ "term": e.term, "entry": e.entry });
                    pipe.hset(self.key("consensus"), e.index, row.to_string())
                        .ignore();
                    pipe.zadd(self.key("consensus_index"), e.index, e.index as f64)
                        .ignore();
                }
                Write::PurgeConsensus(up_to) => {
                    if !purged.is_empty() {
                        pipe.hdel(self.key("consensus"), &purged).ignore();
                    }
                    pipe.zrembyscore(self.key("consensus_index"), 0, *up_to as f64)
                        .ignore();
                }
                Write::ReplaceRoutes(routes) => {
                    pipe.del(self.key("routes")).ignore();
                    for (dst, v) in routes {
                        pipe.hset(self.key("routes"), dst, v.to_string()).ignore();
                    }
                }
                Write::PutConfig(k, v) => {
                    pipe.hset(self.key("config"), k, v.to_string()).ignore();
                }
                Write::DeleteConfig(k) => {
                    pipe.hdel(self.key("config"), k).ignore();
                }
            }
        }
        self.run(|c| pipe.query::<()>(c))
    }

    fn get_message(&self, id: &str) -> Result<Option<StoredMessage>> {
        let key = self.message_key();
        let bytes: Option<Vec<u8>> = self.run(|c| c.hget(&key, id))?;
        bytes
            .map(|b| Self::decode_message(id.to_string(), &b))
            .transpose()
    }

    fn messages_to(&self, to: u64, limit: usize) -> Result<Vec<StoredMessage>> {
        let index = self.to_key(to);
        let ids: Vec<String> = self.run(|c| {
            redis::cmd("ZRANGE")
                .arg(&index)
                .arg(0)
                .arg(limit.saturating_sub(1) as isize)
                .query(c)
        })?;
        if ids.is_empty() || limit == 0 {
            return Ok(Vec::new());
        }
        let key = self.message_key();
        let rows: Vec<Option<Vec<u8>>> =
            self.run(|c| redis::cmd("HMGET").arg(&key).arg(&ids).query(c))?;
        let mut out = Vec::new();
        for (id, row) in ids.into_iter().zip(rows) {
            if let Some(bytes) = row {
                out.push(Self::decode_message(id, &bytes)?);
            }
        }
        out.sort_by(|a, b| (a.timestamp_ms, &a.id).cmp(&(b.timestamp_ms, &b.id)));
        Ok(out)
    }

    fn get_state(&self, key: &str) -> Result<Option<Vec<u8>>> {
        let hash = self.key("state");
        self.run(|c| c.hget(&hash, key))
    }

    fn node_states(&self) -> Result<Vec<(u64, Value)>> {
        self.json_hash("node_state")
    }

    fn consensus_entries(&self, from: u64, limit: usize) -> Result<Vec<ConsensusEntry>> {
        let index = self.key("consensus_index");
        let ids: Vec<u64> = self.run(|c| {
            redis::cmd("ZRANGE")
                .arg(&index)
                .arg(from as f64)
                .arg("+inf")
                .arg("BYSCORE")
                .arg("LIMIT")
                .arg(0)
                .arg(limit)
                .query(c)
        })?;
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let hash = self.key("consensus");
        let rows: Vec<Option<Vec<u8>>> =
            self.run(|c| redis::cmd("HMGET").arg(&hash).arg(&ids).query(c))?;
        let mut out = Vec::new();
        for (index, row) in ids.into_iter().zip(rows) {
            let Some(bytes) = row else { continue };
            let value = json(&bytes)?;
            out.push(ConsensusEntry {
                term: value["term"]
                    .as_u64()
                    .ok_or_else(|| failed("entry without a term"))?,
                index,
                entry: value["entry"].clone(),
            });
        }
        Ok(out)
    }

    fn routes(&self) -> Result<Vec<(u64, Value)>> {
        self.json_hash("routes")
    }

    fn config(&self) -> Result<Vec<(String, Value)>> {
        self.json_hash("config")
    }

    fn counts(&self) -> Result<Counts> {
        let keys = [
            self.message_key(),
            self.key("state"),
            self.key("node_state"),
            self.key("consensus"),
            self.key("routes"),
            self.key("config"),
        ];
        let n: Vec<u64> = self.run(|c| {
            let mut pipe = redis::pipe();
            for key in &keys {
                pipe.hlen(key);
            }
            pipe.query(c)
        })?;
        Ok(Counts {
            messages: n[0],
            state: n[1],
            node_states: n[2],
            consensus: n[3],
            routes: n[4],
            config: n[5],
        })
    }

    fn purge_messages_before(&self, before_ms: u64) -> Result<u64> {
        let by_time = self.by_time_key();
        let ids: Vec<String> = self.run(|c| {
            redis::cmd("ZRANGE")
                .arg(&by_time)
                .arg("-inf")
                .arg(format!("({before_ms}"))
                .arg("BYSCORE")
                .query(c)
        })?;
        let gone = ids.len() as u64;
        let writes: Vec<Write> = ids.into_iter().map(Write::DeleteMessage).collect();
        for chunk in writes.chunks(1024) {
            self.apply(chunk)?;
        }
        Ok(gone)
    }

    fn remember_key(&self, scope: &str, key: &str, ttl_ms: u64) -> Result<bool> {
        Write::DeleteState(scope.into()).validate()?;
        Write::DeleteState(key.into()).validate()?;
        // The scope's length keeps ("a:b", "c") and ("a", "b:c") apart.
        let name = self.key(&format!("idempotency:{}:{scope}:{key}", scope.len()));
        let set: Option<String> = self.run(|c| {
            redis::cmd("SET")
                .arg(&name)
                .arg(1)
                .arg("NX")
                .arg("PX")
                .arg(ttl_ms.max(1))
                .query(c)
        })?;
        Ok(set.is_some())
    }

    fn take_credits(&self, bucket: &str, n: u64, capacity: u64, per_second: u64) -> Result<bool> {
        Write::DeleteState(bucket.into()).validate()?;
        let key = self.key(&format!("credits:{bucket}"));
        let now = crate::storage::now_ms();
        let granted: i64 = self.run(|c| {
            self.credits
                .key(&key)
                .arg(n)
                .arg(capacity)
                .arg(per_second)
                .arg(now)
                .invoke(c)
        })?;
        Ok(granted == 1)
    }

    fn streams(&self, _worker: usize) -> Result<Box<dyn StreamStore>> {
        Err(BackendError::Invalid(
            "Redis holds no streams (their outbox and offsets need the primary backend: redb or postgres)"
                .into(),
        ))
    }
}
