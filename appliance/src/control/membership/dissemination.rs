//! What rides on foca's custom broadcasts: node metadata and notices (evicted, admitted,
//! left), each keeping only the newest per node so stale news stops spreading.
#![forbid(unsafe_code)]

use std::{cell::RefCell, collections::BTreeMap, rc::Rc};

use foca::{BroadcastHandler, Invalidates};
use serde::{Deserialize, Serialize};

use super::{MemberId, NodeMeta};

pub(super) type MetaTable = Rc<RefCell<Disseminated>>;

/// A decision about a node's place in the mesh, spread to every member.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum NoticeKind {
    /// Removed by an operator: its datagrams and links are refused.
    Evicted,
    /// Joined again after an eviction.
    Admitted,
    /// Left for good.
    Left,
}

/// A notice about `node`; of two notices about one node the higher `seq` wins (callers use
/// the decision's wall-clock time in ms).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Notice {
    /// The node concerned.
    pub node: u64,
    /// Order among notices about the node.
    pub seq: u64,
    /// What was decided.
    pub kind: NoticeKind,
}

/// What rides on foca's custom broadcasts.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(super) enum Gossiped {
    Meta(NodeMeta),
    Notice(Notice),
}

/// The newest of everything disseminated, shared by the handler and [`Membership`].
#[derive(Default)]
pub(super) struct Disseminated {
    pub(super) meta: BTreeMap<u64, NodeMeta>,
    pub(super) notices: BTreeMap<u64, Notice>,
    /// Notices not yet applied to the member table.
    pub(super) fresh: Vec<Notice>,
}

/// Keeps the newest metadata and notices of every node and tells foca what is worth spreading.
pub(super) struct MetaHandler {
    pub(super) table: MetaTable,
}

/// Key of a broadcast: a newer seq about the same node (and kind of news) replaces older.
#[derive(Clone, Copy, Debug)]
pub(super) struct MetaKey {
    node: u64,
    seq: u64,
    notice: bool,
}

impl Invalidates for MetaKey {
    fn invalidates(&self, other: &Self) -> bool {
        self.node == other.node && self.notice == other.notice && self.seq >= other.seq
    }
}

/// A metadata broadcast that does not decode.
#[derive(Debug, thiserror::Error)]
#[error("undecodable node metadata: {0}")]
pub(super) struct BadMeta(String);

impl BroadcastHandler<MemberId> for MetaHandler {
    type Key = MetaKey;
    type Error = BadMeta;

    fn receive_item(
        &mut self,
        data: &[u8],
        _sender: Option<&MemberId>,
    ) -> Result<Option<MetaKey>, BadMeta> {
        let item: Gossiped = postcard::from_bytes(data).map_err(|e| BadMeta(e.to_string()))?;
        let mut table = self.table.borrow_mut();
        match item {
            Gossiped::Meta(meta) => {
                if table
                    .meta
                    .get(&meta.node)
                    .is_some_and(|known| known.seq >= meta.seq)
                {
                    return Ok(None);
                }
                let key = MetaKey {
                    node: meta.node,
                    seq: meta.seq,
                    notice: false,
                };
                table.meta.insert(meta.node, meta);
                Ok(Some(key))
            }
            Gossiped::Notice(notice) => {
                if table
                    .notices
                    .get(&notice.node)
                    .is_some_and(|known| known.seq >= notice.seq)
                {
                    return Ok(None);
                }
                table.notices.insert(notice.node, notice);
                table.fresh.push(notice);
                Ok(Some(MetaKey {
                    node: notice.node,
                    seq: notice.seq,
                    notice: true,
                }))
            }
        }
    }
}
