//! The node's control database (embedded redb): identity and peers.
//!
//! One file, `<data_dir>/control.redb`. Tables:
//! - `identity`: node id, Ed25519 signing key, TLS certificate and key, mesh id, creation time.
//! - `peers`: node id → public key, last address, listen address, last seen (trust on first use).
//! - `dial_targets`: addresses added with `AddSession`, re-dialed after a restart.
//!
//! **Invariant:** the identity is written once, in one transaction, and never changes; a config
//! that asks for another node id is refused rather than silently re-keying the node.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
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

/// The open control database.
pub struct ControlDb {
    db: Database,
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
        Ok(Self { db })
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
        txn.commit().map_err(db_error)?;
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

    /// The identity generation of this start: one more than the last start's, persisted before
    /// it is returned so a crash cannot hand out the same generation twice.
    pub fn next_generation(&self) -> Result<u32, StorageError> {
        let txn = self.db.begin_write().map_err(db_error)?;
        let next = {
            let mut table = txn.open_table(IDENTITY).map_err(db_error)?;
            let last = table
                .get("generation")
                .map_err(db_error)?
                .and_then(|v| <[u8; 4]>::try_from(v.value()).ok())
                .map_or(0, u32::from_le_bytes);
            let next = last.wrapping_add(1).max(1);
            table
                .insert("generation", next.to_le_bytes().as_slice())
                .map_err(db_error)?;
            next
        };
        txn.commit().map_err(db_error)?;
        Ok(next)
    }

    /// Records a peer seen on a link (first key pinned; later calls refresh address and time).
    pub fn upsert_peer(&self, node_id: u64, record: &PeerRecord) -> Result<(), StorageError> {
        let txn = self.db.begin_write().map_err(db_error)?;
        {
            let mut table = txn.open_table(PEERS).map_err(db_error)?;
            table
                .insert(node_id, record.encode().as_slice())
                .map_err(db_error)?;
        }
        txn.commit().map_err(db_error)
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

    /// Remembers an address to dial after restarts.
    pub fn add_dial_target(&self, addr: SocketAddr) -> Result<(), StorageError> {
        let txn = self.db.begin_write().map_err(db_error)?;
        {
            let mut table = txn.open_table(DIAL_TARGETS).map_err(db_error)?;
            table
                .insert(addr.to_string().as_str(), now_ms())
                .map_err(db_error)?;
        }
        txn.commit().map_err(db_error)
    }

    /// Forgets an address.
    pub fn remove_dial_target(&self, addr: SocketAddr) -> Result<(), StorageError> {
        let txn = self.db.begin_write().map_err(db_error)?;
        {
            let mut table = txn.open_table(DIAL_TARGETS).map_err(db_error)?;
            table.remove(addr.to_string().as_str()).map_err(db_error)?;
        }
        txn.commit().map_err(db_error)
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
        let txn = self.db.begin_write().map_err(db_error)?;
        {
            let mut table = txn.open_table(MESH).map_err(db_error)?;
            table
                .insert("mesh", record.encode_to_vec().as_slice())
                .map_err(db_error)?;
            if clear_evicted {
                let mut evicted = txn.open_table(EVICTED).map_err(db_error)?;
                evicted.retain(|_, _| false).map_err(db_error)?;
            }
        }
        txn.commit().map_err(db_error)
    }

    /// Forgets the mesh (after LeaveMesh), its evictions and the dial targets, in one
    /// transaction.
    pub fn clear_mesh(&self) -> Result<(), StorageError> {
        let txn = self.db.begin_write().map_err(db_error)?;
        {
            txn.open_table(MESH)
                .map_err(db_error)?
                .remove("mesh")
                .map_err(db_error)?;
            txn.open_table(EVICTED)
                .map_err(db_error)?
                .retain(|_, _| false)
                .map_err(db_error)?;
            txn.open_table(DIAL_TARGETS)
                .map_err(db_error)?
                .retain(|_, _| false)
                .map_err(db_error)?;
        }
        txn.commit().map_err(db_error)
    }

    /// Records an eviction (`evicted`) or a readmission (`!evicted`).
    pub fn set_evicted(&self, node: u64, evicted: bool) -> Result<(), StorageError> {
        let txn = self.db.begin_write().map_err(db_error)?;
        {
            let mut table = txn.open_table(EVICTED).map_err(db_error)?;
            if evicted {
                table.insert(node, now_ms()).map_err(db_error)?;
            } else {
                table.remove(node).map_err(db_error)?;
            }
        }
        txn.commit().map_err(db_error)
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
mod tests {
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
}
