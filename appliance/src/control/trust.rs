//! The keys this node trusts: every node's certified Ed25519 key, learned from link handshakes
//! (the certificate checked there) and from signed LSAs (`lsa_auth`), and the pair keys derived
//! from them (`meshd_shards::origin`), published to the shards and the api through the
//! [`KeyBook`]. Membership checks notices against the same keys.
//!
//! The first certified key of a node stays until the node leaves (or is evicted, which also
//! revokes it: its frames, LSAs and notices are refused everywhere the eviction reached).
#![forbid(unsafe_code)]

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
};

use ed25519_dalek::SigningKey;
use meshd_shards::{
    frame::Header,
    origin::{KeyBook, PairKeys, pair_key, sealed},
};

use super::types::Refusals;

/// The most nodes whose keys are held: the member table's bound plus every LSDB origin.
pub const MAX_TRUSTED: usize = 2 * super::lsdb::MAX_ORIGINS;

/// Certified keys and pair keys.
pub struct Trust {
    local: u64,
    key: SigningKey,
    book: Arc<KeyBook>,
    public: HashMap<u64, [u8; 32]>,
    pairs: HashMap<u64, [u8; 32]>,
    revoked: HashSet<u64>,
    changed: bool,
    conflicts: Refusals,
    /// This node's certificate, carried by the notices it signs.
    certificate: Vec<u8>,
}

impl Trust {
    /// For node `local` holding `key`; publishes to `book`.
    pub fn new(local: u64, key: SigningKey, book: Arc<KeyBook>) -> Self {
        let mut trust = Self {
            local,
            key,
            book,
            public: HashMap::new(),
            pairs: HashMap::new(),
            revoked: HashSet::new(),
            changed: true,
            conflicts: Refusals::default(),
            certificate: Vec::new(),
        };
        trust.reset();
        trust
    }

    /// Another mesh (or none): every key learned under the old authority goes.
    pub fn reset(&mut self) {
        self.public.clear();
        self.pairs.clear();
        self.public
            .insert(self.local, self.key.verifying_key().to_bytes());
        self.changed = true;
    }

    /// `node` is certified to hold `public_key`. A different key for a node already known is
    /// ignored (and counted): the first stays until the node leaves.
    pub fn learn(&mut self, node: u64, public_key: [u8; 32]) {
        if node == self.local || self.revoked.contains(&node) {
            return;
        }
        match self.public.get(&node) {
            Some(known) if *known == public_key => return,
            Some(_) => {
                self.conflicts
                    .record("trusted keys (conflicting key)", node);
                return;
            }
            None if self.public.len() >= MAX_TRUSTED => {
                self.conflicts.record("trusted keys (full)", node);
                return;
            }
            None => {}
        }
        let Some(pair) = pair_key(&self.key, self.local, node, &public_key) else {
            return;
        };
        self.public.insert(node, public_key);
        self.pairs.insert(node, pair);
        self.changed = true;
    }

    /// The certified key held for `node`.
    pub fn key_of(&self, node: u64) -> Option<[u8; 32]> {
        self.public.get(&node).copied()
    }

    /// Whether `node`'s certified key is held (frames to it can be sealed).
    pub fn knows(&self, node: u64) -> bool {
        self.pairs.contains_key(&node)
    }

    /// `node` left: a later certificate may bind its id to another key.
    pub fn forget(&mut self, node: u64) {
        if node == self.local {
            return;
        }
        if self.public.remove(&node).is_some() {
            self.pairs.remove(&node);
            self.changed = true;
        }
    }

    /// `node` was evicted: nothing from it is accepted until it is admitted again.
    pub fn revoke(&mut self, node: u64) {
        self.revoked.insert(node);
        self.forget(node);
    }

    /// `node` was admitted again.
    pub fn unrevoke(&mut self, node: u64) {
        self.revoked.remove(&node);
    }

    /// Publishes the pair keys if they changed; returns the public keys for membership then.
    pub fn publish(&mut self) -> Option<Arc<HashMap<u64, [u8; 32]>>> {
        if !std::mem::take(&mut self.changed) {
            return None;
        }
        self.book.publish(PairKeys::new(self.pairs.clone()));
        Some(Arc::new(self.public.clone()))
    }

    /// A routed frame's payload with its origin tag, for a frame the control thread sends.
    pub fn seal(&self, header: &Header, body: &[u8]) -> Option<Vec<u8>> {
        Some(sealed(self.pairs.get(&header.dst)?, header, body))
    }

    /// `notice`, issued and signed by this node.
    pub fn sign(&self, notice: super::membership::Notice) -> super::membership::Notice {
        notice.signed(self.local, &self.key, &self.certificate)
    }

    /// This node's current certificate (issued or renewed).
    pub fn set_certificate(&mut self, certificate: &[u8]) {
        self.certificate = certificate.to_vec();
    }

    /// Nodes with a certified key (this one included).
    pub fn len(&self) -> usize {
        self.public.len()
    }

    /// Never true: this node's own key is always held.
    pub fn is_empty(&self) -> bool {
        self.public.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(seed: u8) -> SigningKey {
        SigningKey::from_bytes(&[seed; 32])
    }

    #[test]
    fn keys_are_learned_once_revoked_for_good_and_published_on_change() {
        let book = Arc::new(KeyBook::default());
        let mut trust = Trust::new(1, key(1), Arc::clone(&book));
        assert_eq!(trust.publish().map(|p| p.len()), Some(1));
        assert_eq!(trust.publish(), None, "nothing changed");
        trust.learn(2, key(2).verifying_key().to_bytes());
        trust.learn(2, key(9).verifying_key().to_bytes());
        let public = trust.publish().unwrap();
        assert_eq!(
            public[&2],
            key(2).verifying_key().to_bytes(),
            "the first key stays"
        );
        assert!(book.load().get(2).is_some());
        trust.revoke(2);
        trust.learn(2, key(2).verifying_key().to_bytes());
        trust.publish();
        assert!(book.load().get(2).is_none(), "revoked: no pair key");
        trust.unrevoke(2);
        trust.learn(2, key(3).verifying_key().to_bytes());
        assert_eq!(
            trust.publish().unwrap()[&2],
            key(3).verifying_key().to_bytes()
        );
    }
}
