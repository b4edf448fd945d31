//! The node's control database (embedded redb): identity and peers.
//!
//! One file, `<data_dir>/control.redb`. Tables:
//! - `identity`: node id, Ed25519 signing key, TLS certificate and key, mesh id, creation time.
//! - `peers`: node id → public key, last address, listen address, last seen (trust on first use);
//!   a node's row goes when it leaves, is evicted or joins again (maybe with a new key), and
//!   every row when this node leaves the mesh.
//! - `dial_targets`: addresses added with `AddSession`, re-dialed after a restart.
//! - `mesh`, `evicted`: the seeded or joined mesh and the nodes evicted from it.
//!
//! **Invariant:** the identity is written once, in one transaction, and never changes; a config
//! that asks for another node id is refused rather than silently re-keying the node.
//!
//! At run time the control thread does not write row by row: it gathers writes in a
//! [`WriteBatch`] (the newest write of each row wins) and commits the batch in one transaction
//! ([`ControlDb::commit`]), so a burst of link-ups costs one fsync, not one each.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::atomic::{AtomicU64, Ordering},
    time::{SystemTime, UNIX_EPOCH},
};

use ed25519_dalek::SigningKey;
use meshd_proto::link::MeshRecord;
use prost::Message;
use rand::{RngCore, rngs::OsRng};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

const IDENTITY: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("identity");
const PEERS: TableDefinition<'_, u64, &[u8]> = TableDefinition::new("peers");
const DIAL_TARGETS: TableDefinition<'_, &str, u64> = TableDefinition::new("dial_targets");
/// One row, key "mesh": the prost-encoded `meshd.v1.MeshRecord` of the mesh this node belongs to.
const MESH: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("mesh");
/// Nodes evicted from the mesh → when (ms since the Unix epoch).
const EVICTED: TableDefinition<'_, u64, u64> = TableDefinition::new("evicted");

/// File name of the control database inside the data directory.
pub const CONTROL_DB_FILE: &str = "control.redb";

/// Storage failures. The database is left as it was before the failing call.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// The data directory could not be created or the database opened.
    #[error("cannot open control database {path}: {reason}")]
    Open {
        /// Database path.
        path: PathBuf,
        /// Underlying error.
        reason: String,
    },
    /// A read or write failed.
    #[error("control database: {0}")]
    Db(String),
    /// Stored data is not what this version wrote.
    #[error("control database holds a corrupt {0}")]
    Corrupt(&'static str),
    /// The configured node id differs from the stored one.
    #[error(
        "this data directory belongs to node {stored}, but the config asks for node {configured}; \
         fix: use node_id = {stored}, or give the new node its own data_dir"
    )]
    NodeIdMismatch {
        /// Id in the database.
        stored: u64,
        /// Id in the config.
        configured: u64,
    },
}

fn db_error(e: impl std::fmt::Display) -> StorageError {
    StorageError::Db(e.to_string())
}

/// The node's permanent identity.
#[derive(Clone)]
pub struct Identity {
    /// The node id.
    pub node_id: u64,
    /// The Ed25519 key that proves it.
    pub signing_key: SigningKey,
    /// Self-signed TLS certificate (DER).
    pub tls_cert_der: Vec<u8>,
    /// Its PKCS#8 key (DER).
    pub tls_key_der: Vec<u8>,
}

/// What the node remembers about one peer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerRecord {
    /// The peer's Ed25519 public key, pinned on first link.
    pub public_key: [u8; 32],
    /// Where the peer says it listens ("" behind NAT).
    pub listen_addr: String,
    /// Last time a link came up, ms since the Unix epoch.
    pub last_seen_ms: u64,
}

impl PeerRecord {
    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(32 + 8 + self.listen_addr.len());
        out.extend_from_slice(&self.public_key);
        out.extend_from_slice(&self.last_seen_ms.to_le_bytes());
        out.extend_from_slice(self.listen_addr.as_bytes());
        out
    }

    fn decode(bytes: &[u8]) -> Option<Self> {
        let public_key = bytes.get(..32)?.try_into().ok()?;
        let last_seen_ms = u64::from_le_bytes(bytes.get(32..40)?.try_into().ok()?);
        let listen_addr = String::from_utf8(bytes.get(40..)?.to_vec()).ok()?;
        Some(Self {
            public_key,
            listen_addr,
            last_seen_ms,
        })
    }
}

/// Writes gathered by the control thread and committed together in one transaction.
///
/// Each row keeps only its newest write, and clearing a table drops the writes gathered for it
/// before, so committing a batch leaves the database exactly as applying its writes one by one
/// in order would, whatever the number of writes: the batch grows with the rows touched, not
/// with the events that touched them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WriteBatch {
    clear_peers: bool,
    clear_dial_targets: bool,
    clear_evicted: bool,
    /// `Some(None)`: forget the mesh record.
    mesh: Option<Option<MeshRecord>>,
    /// `None`: remove the row.
    peers: BTreeMap<u64, Option<PeerRecord>>,
    /// `Some(ms)`: added at that time; `None`: removed.
    dial_targets: BTreeMap<SocketAddr, Option<u64>>,
    /// `Some(ms)`: evicted at that time; `None`: readmitted.
    evicted: BTreeMap<u64, Option<u64>>,
    /// The highest identity generation used so far (the stored one never goes down).
    generation: Option<u32>,
}

impl WriteBatch {
    /// Whether there is nothing to commit.
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }

    /// Records a peer seen on a link (first key pinned; later writes refresh address and time).
    pub fn upsert_peer(&mut self, node_id: u64, record: PeerRecord) {
        self.peers.insert(node_id, Some(record));
    }

    /// Forgets a peer: its pinned key and addresses.
    pub fn remove_peer(&mut self, node_id: u64) {
        self.peers.insert(node_id, None);
    }

    /// Remembers an address to dial after restarts.
    pub fn add_dial_target(&mut self, addr: SocketAddr) {
        self.dial_targets.insert(addr, Some(now_ms()));
    }

    /// Forgets an address.
    pub fn remove_dial_target(&mut self, addr: SocketAddr) {
        self.dial_targets.insert(addr, None);
    }

    /// Records an eviction (`evicted`) or a readmission (`!evicted`).
    pub fn set_evicted(&mut self, node: u64, evicted: bool) {
        self.evicted.insert(node, evicted.then(now_ms));
    }

    /// Notes that `generation` was used; the stored generation becomes at least this.
    pub fn raise_generation(&mut self, generation: u32) {
        self.generation = Some(self.generation.map_or(generation, |g| g.max(generation)));
    }

    /// Replaces the mesh record; with `clear_evicted` every eviction is forgotten too (a new
    /// mesh starts with none).
    pub fn save_mesh(&mut self, record: MeshRecord, clear_evicted: bool) {
        self.mesh = Some(Some(record));
        if clear_evicted {
            self.clear_evicted = true;
            self.evicted.clear();
        }
    }

    /// Forgets the mesh (after LeaveMesh) and everything learnt in it: evictions, dial
    /// targets and peers (another mesh has other members and may pin other keys).
    pub fn clear_mesh(&mut self) {
        self.mesh = Some(None);
        self.clear_evicted = true;
        self.clear_dial_targets = true;
        self.clear_peers = true;
        self.evicted.clear();
        self.dial_targets.clear();
        self.peers.clear();
    }

    /// Adds `later`'s writes after this batch's (a batch that failed to commit is kept and
    /// the writes gathered since are merged on top).
    pub fn merge(&mut self, later: Self) {
        if later.clear_peers {
            self.peers.clear();
        }
        if later.clear_dial_targets {
            self.dial_targets.clear();
        }
        if later.clear_evicted {
            self.evicted.clear();
        }
        self.clear_peers |= later.clear_peers;
        self.clear_dial_targets |= later.clear_dial_targets;
        self.clear_evicted |= later.clear_evicted;
        if later.mesh.is_some() {
            self.mesh = later.mesh;
        }
        self.peers.extend(later.peers);
        self.dial_targets.extend(later.dial_targets);
        self.evicted.extend(later.evicted);
        if let Some(generation) = later.generation {
            self.raise_generation(generation);
        }
    }

    /// Rows this batch writes (a cleared table counts as one).
    pub fn len(&self) -> usize {
        usize::from(self.clear_peers)
            + usize::from(self.clear_dial_targets)
            + usize::from(self.clear_evicted)
            + usize::from(self.mesh.is_some())
            + self.peers.len()
            + self.dial_targets.len()
            + self.evicted.len()
            + usize::from(self.generation.is_some())
    }
}

/// The open control database.
pub struct ControlDb {
    db: Database,
    /// Write transactions committed since opening (what a batch saves is visible here).
    commits: AtomicU64,
}

/// Creates `dir` if needed and makes it this user's alone (0700), whatever the umask: it
/// holds the node's signing key, the pair keys' inputs and every message at rest.
pub fn private_dir(dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir)
        .map_err(|e| anyhow::anyhow!("data_dir {}: cannot create: {e}", dir.display()))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(|e| {
        anyhow::anyhow!(
            "data_dir {}: cannot make it private (0700): {e}; fix: run meshd as the directory's owner",
            dir.display()
        )
    })
}

/// Makes every regular file directly in `dir` this user's alone (0600).
pub fn private_files(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_file() {
            std::fs::set_permissions(entry.path(), std::fs::Permissions::from_mode(0o600))?;
        }
    }
    Ok(())
}

impl ControlDb {
    /// Opens (creating if needed) `<data_dir>/control.redb`.
    pub fn open(data_dir: &Path) -> Result<Self, StorageError> {
        let open_error = |reason: String| StorageError::Open {
            path: data_dir.join(CONTROL_DB_FILE),
            reason,
        };
        std::fs::create_dir_all(data_dir).map_err(|e| open_error(e.to_string()))?;
        let db = Database::create(data_dir.join(CONTROL_DB_FILE))
            .map_err(|e| open_error(e.to_string()))?;
        let txn = db.begin_write().map_err(db_error)?;
        txn.open_table(IDENTITY).map_err(db_error)?;
        txn.open_table(PEERS).map_err(db_error)?;
        txn.open_table(DIAL_TARGETS).map_err(db_error)?;
        txn.open_table(MESH).map_err(db_error)?;
        txn.open_table(EVICTED).map_err(db_error)?;
        txn.commit().map_err(db_error)?;
        Ok(Self {
            db,
            commits: AtomicU64::new(0),
        })
    }

    /// Write transactions committed since the database was opened (each is an fsync).
    pub fn commits(&self) -> u64 {
        self.commits.load(Ordering::Relaxed)
    }

    fn commit_txn(&self, txn: redb::WriteTransaction) -> Result<(), StorageError> {
        txn.commit().map_err(db_error)?;
        self.commits.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Commits every write of `batch` in one transaction: all of them or, on error, none.
    pub fn commit(&self, batch: &WriteBatch) -> Result<(), StorageError> {
        if batch.is_empty() {
            return Ok(());
        }
        let txn = self.db.begin_write().map_err(db_error)?;
        {
            let mut peers = txn.open_table(PEERS).map_err(db_error)?;
            if batch.clear_peers {
                peers.retain(|_, _| false).map_err(db_error)?;
            }
            for (node, record) in &batch.peers {
                match record {
                    Some(record) => {
                        peers
                            .insert(*node, record.encode().as_slice())
                            .map_err(db_error)?;
                    }
                    None => {
                        peers.remove(*node).map_err(db_error)?;
                    }
                }
            }
            let mut targets = txn.open_table(DIAL_TARGETS).map_err(db_error)?;
            if batch.clear_dial_targets {
                targets.retain(|_, _| false).map_err(db_error)?;
            }
            for (addr, added) in &batch.dial_targets {
                let key = addr.to_string();
                match added {
                    Some(at) => {
                        targets.insert(key.as_str(), *at).map_err(db_error)?;
                    }
                    None => {
                        targets.remove(key.as_str()).map_err(db_error)?;
                    }
                }
            }
            let mut evicted = txn.open_table(EVICTED).map_err(db_error)?;
            if batch.clear_evicted {
                evicted.retain(|_, _| false).map_err(db_error)?;
            }
            for (node, at) in &batch.evicted {
                match at {
                    Some(at) => {
                        evicted.insert(*node, *at).map_err(db_error)?;
                    }
                    None => {
                        evicted.remove(*node).map_err(db_error)?;
                    }
                }
            }
            let mut mesh = txn.open_table(MESH).map_err(db_error)?;
            match &batch.mesh {
                Some(Some(record)) => {
                    mesh.insert("mesh", record.encode_to_vec().as_slice())
                        .map_err(db_error)?;
                }
                Some(None) => {
                    mesh.remove("mesh").map_err(db_error)?;
                }
                None => {}
            }
            if let Some(generation) = batch.generation {
                let mut identity = txn.open_table(IDENTITY).map_err(db_error)?;
                let stored = stored_generation(&identity)?;
                if generation > stored {
                    identity
                        .insert("generation", generation.to_le_bytes().as_slice())
                        .map_err(db_error)?;
                }
            }
        }
        self.commit_txn(txn)
    }

    /// Loads the identity, creating it on first use.
    ///
    /// `configured_id` (0 = none) becomes the id of a new node; for an existing node it must
    /// match the stored id.
    pub fn load_or_create_identity(
        &self,
        configured_id: u64,
    ) -> Result<(Identity, bool), StorageError> {
        if let Some(identity) = self.load_identity()? {
            if configured_id != 0 && configured_id != identity.node_id {
                return Err(StorageError::NodeIdMismatch {
                    stored: identity.node_id,
                    configured: configured_id,
                });
            }
            return Ok((identity, false));
        }
        let node_id = if configured_id != 0 {
            configured_id
        } else {
            random_node_id()
        };
        let mut secret = [0u8; 32];
        OsRng.fill_bytes(&mut secret);
        let signing_key = SigningKey::from_bytes(&secret);
        let certified =
            rcgen::generate_simple_self_signed(vec![meshd_shards::tls::SERVER_NAME.to_owned()])
                .map_err(|e| StorageError::Db(format!("TLS certificate generation: {e}")))?;
        let identity = Identity {
            node_id,
            signing_key,
            tls_cert_der: certified.cert.der().to_vec(),
            tls_key_der: certified.signing_key.serialize_der(),
        };
        let txn = self.db.begin_write().map_err(db_error)?;
        {
            let mut table = txn.open_table(IDENTITY).map_err(db_error)?;
            table
                .insert("node_id", node_id.to_le_bytes().as_slice())
                .map_err(db_error)?;
            table
                .insert("signing_key", identity.signing_key.to_bytes().as_slice())
                .map_err(db_error)?;
            table
                .insert("tls_cert", identity.tls_cert_der.as_slice())
                .map_err(db_error)?;
            table
                .insert("tls_key", identity.tls_key_der.as_slice())
                .map_err(db_error)?;
            table
                .insert("created_ms", now_ms().to_le_bytes().as_slice())
                .map_err(db_error)?;
        }
        self.commit_txn(txn)?;
        let reread = self
            .load_identity()?
            .ok_or(StorageError::Corrupt("identity"))?;
        assert_eq!(
            reread.node_id, node_id,
            "identity must read back as written"
        );
        Ok((identity, true))
    }

    fn load_identity(&self) -> Result<Option<Identity>, StorageError> {
        let txn = self.db.begin_read().map_err(db_error)?;
        let table = txn.open_table(IDENTITY).map_err(db_error)?;
        let get = |key: &str| -> Result<Option<Vec<u8>>, StorageError> {
            Ok(table
                .get(key)
                .map_err(db_error)?
                .map(|v| v.value().to_vec()))
        };
        let Some(id_bytes) = get("node_id")? else {
            return Ok(None);
        };
        let node_id = u64::from_le_bytes(
            id_bytes
                .try_into()
                .map_err(|_| StorageError::Corrupt("node id"))?,
        );
        let secret: [u8; 32] = get("signing_key")?
            .ok_or(StorageError::Corrupt("signing key"))?
            .try_into()
            .map_err(|_| StorageError::Corrupt("signing key"))?;
        let tls_cert_der = get("tls_cert")?.ok_or(StorageError::Corrupt("TLS certificate"))?;
        let tls_key_der = get("tls_key")?.ok_or(StorageError::Corrupt("TLS key"))?;
        Ok(Some(Identity {
            node_id,
            signing_key: SigningKey::from_bytes(&secret),
            tls_cert_der,
            tls_key_der,
        }))
    }

    /// The identity generation of this start: one more than the highest generation used so
    /// far (by a start, or renewed at run time and recorded with
    /// [`WriteBatch::raise_generation`]), persisted before it is returned so a crash cannot
    /// hand out the same generation twice.
    ///
    /// A generation at `u32::MAX` cannot grow: that is refused rather than wrapped to 1, where
    /// the node's identity would lose to every earlier one.
    pub fn next_generation(&self) -> Result<u32, StorageError> {
        let txn = self.db.begin_write().map_err(db_error)?;
        let next = {
            let mut table = txn.open_table(IDENTITY).map_err(db_error)?;
            let last = stored_generation(&table)?;
            let next = last
                .checked_add(1)
                .ok_or(StorageError::Corrupt("generation (at its maximum)"))?;
            table
                .insert("generation", next.to_le_bytes().as_slice())
                .map_err(db_error)?;
            next
        };
        self.commit_txn(txn)?;
        Ok(next)
    }

    /// Records a peer seen on a link, in a transaction of its own (the control thread batches
    /// instead: [`WriteBatch::upsert_peer`]).
    pub fn upsert_peer(&self, node_id: u64, record: &PeerRecord) -> Result<(), StorageError> {
        let mut batch = WriteBatch::default();
        batch.upsert_peer(node_id, record.clone());
        self.commit(&batch)
    }

    /// Every peer ever linked with.
    pub fn peers(&self) -> Result<Vec<(u64, PeerRecord)>, StorageError> {
        let txn = self.db.begin_read().map_err(db_error)?;
        let table = txn.open_table(PEERS).map_err(db_error)?;
        let mut out = Vec::new();
        for entry in table.iter().map_err(db_error)? {
            let (key, value) = entry.map_err(db_error)?;
            let record =
                PeerRecord::decode(value.value()).ok_or(StorageError::Corrupt("peer record"))?;
            out.push((key.value(), record));
        }
        Ok(out)
    }

    /// Remembers an address to dial after restarts, in a transaction of its own.
    pub fn add_dial_target(&self, addr: SocketAddr) -> Result<(), StorageError> {
        let mut batch = WriteBatch::default();
        batch.add_dial_target(addr);
        self.commit(&batch)
    }

    /// Forgets an address, in a transaction of its own.
    pub fn remove_dial_target(&self, addr: SocketAddr) -> Result<(), StorageError> {
        let mut batch = WriteBatch::default();
        batch.remove_dial_target(addr);
        self.commit(&batch)
    }

    /// Addresses added with `AddSession`.
    pub fn dial_targets(&self) -> Result<Vec<SocketAddr>, StorageError> {
        let txn = self.db.begin_read().map_err(db_error)?;
        let table = txn.open_table(DIAL_TARGETS).map_err(db_error)?;
        let mut out = Vec::new();
        for entry in table.iter().map_err(db_error)? {
            let (key, _) = entry.map_err(db_error)?;
            if let Ok(addr) = key.value().parse() {
                out.push(addr);
            }
        }
        Ok(out)
    }
}

impl ControlDb {
    /// The mesh this node belongs to, if it was seeded or joined.
    pub fn mesh(&self) -> Result<Option<MeshRecord>, StorageError> {
        let txn = self.db.begin_read().map_err(db_error)?;
        let table = txn.open_table(MESH).map_err(db_error)?;
        let Some(value) = table.get("mesh").map_err(db_error)? else {
            return Ok(None);
        };
        MeshRecord::decode(value.value())
            .map(Some)
            .map_err(|e| StorageError::Db(format!("mesh record: {e}")))
    }

    /// Replaces the mesh record, and when `clear_evicted` forgets every eviction (a new mesh
    /// starts with none), in one transaction.
    pub fn save_mesh(&self, record: &MeshRecord, clear_evicted: bool) -> Result<(), StorageError> {
        let mut batch = WriteBatch::default();
        batch.save_mesh(record.clone(), clear_evicted);
        self.commit(&batch)
    }

    /// Forgets the mesh (after LeaveMesh), its evictions, dial targets and peers, in one
    /// transaction.
    pub fn clear_mesh(&self) -> Result<(), StorageError> {
        let mut batch = WriteBatch::default();
        batch.clear_mesh();
        self.commit(&batch)
    }

    /// Records an eviction (`evicted`) or a readmission (`!evicted`), in one transaction.
    pub fn set_evicted(&self, node: u64, evicted: bool) -> Result<(), StorageError> {
        let mut batch = WriteBatch::default();
        batch.set_evicted(node, evicted);
        self.commit(&batch)
    }

    /// Every evicted node.
    pub fn evicted(&self) -> Result<Vec<u64>, StorageError> {
        let txn = self.db.begin_read().map_err(db_error)?;
        let table = txn.open_table(EVICTED).map_err(db_error)?;
        let mut out = Vec::new();
        for entry in table.iter().map_err(db_error)? {
            out.push(entry.map_err(db_error)?.0.value());
        }
        Ok(out)
    }
}

fn stored_generation(
    table: &impl ReadableTable<&'static str, &'static [u8]>,
) -> Result<u32, StorageError> {
    Ok(table
        .get("generation")
        .map_err(db_error)?
        .and_then(|v| <[u8; 4]>::try_from(v.value()).ok())
        .map_or(0, u32::from_le_bytes))
}

fn random_node_id() -> u64 {
    loop {
        let id = OsRng.next_u64();
        if id != 0 {
            return id;
        }
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests;
