//! SWIM membership (foca) as a sans-IO core: datagrams and the current time in, datagrams,
//! events and a member table out.
//!
//! ```text
//!  handle_link_up(peer)      ──► foca.announce(peer): a new neighbour is the way in
//!  handle_data(from, bytes)  ──► foca.handle_data      ┐
//!  handle_timeout(now)       ──► due foca timers       ├─► drain: sends → poll_transmit,
//!  set_load / leave          ──► foca broadcasts       ┘   timers → own queue, table sync → events
//! ```
//!
//! Gossip datagrams travel over the overlay as `Gossip` frames routed like data (multi-hop where
//! there is no direct link), unreliable like UDP, which is what SWIM expects. Probes, indirect
//! probes, suspicion with incarnation-based refutation and piggybacked dissemination are foca's;
//! node metadata (name, version, capabilities, load) rides on foca's custom broadcasts.
//!
//! foca forgets a member some time after it is down; this table does not: a dead member stays
//! `Dead` (it still counts towards mesh health) until it comes back or leaves.
//!
//! A member's identity is (node id, generation). The generation grows with every start of the
//! node (persisted by the caller) and when foca renews it after a false "down" (the caller reads
//! [`Membership::local`] and persists that too), so a restarted node always wins over the
//! identity of its previous life.
//!
//! Bounds: any member can name ids in its gossip, so every table here has a hard cap: the
//! member table and the metadata table [`MAX_MEMBERS`], notices [`MAX_NOTICES`] (aged out after
//! [`NOTICE_TTL`]), the evicted and removed sets [`MAX_NOTICES`]. What a full table refuses is
//! counted ([`Membership::refusals`]) and warned about at powers of two; this node's own row
//! and its direct neighbours' are never refused or pushed out. foca's own member list is not
//! capped here: it probes an invented id, declares it down and forgets it after
//! `remove_down_after` (60 s).
#![forbid(unsafe_code)]

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, VecDeque},
    num::{NonZeroU8, NonZeroUsize},
    rc::Rc,
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::Bytes;
use foca::{Foca, Identity, Notification, PostcardCodec, Runtime, State, Timer};
use rand09::{SeedableRng, rngs::StdRng};
use serde::{Deserialize, Serialize};

use self::dissemination::{Gossiped, MetaHandler, MetaTable};
pub use self::dissemination::{MAX_NOTICES, NOTICE_TTL, Notice, NoticeKind, NoticeTrust};
use super::types::Refusals;

/// The most members (this node included) and metadata entries kept. meshd's scale target is a
/// few hundred nodes; 4096 is an order of magnitude above it, matches the LSDB's origin bound
/// (a member routing cannot reach is soon dead anyway) and keeps a full table's census and
/// snapshot well under a millisecond.
pub const MAX_MEMBERS: usize = 4096;

/// A member's identity on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct MemberId {
    /// The node id.
    pub node: u64,
    /// Grows with every start and every renewal.
    pub generation: u32,
}

impl Identity for MemberId {
    type Addr = u64;

    fn renew(&self) -> Option<Self> {
        // At the top the identity stays as it is rather than wrap below every earlier one.
        Some(Self {
            node: self.node,
            generation: self.generation.checked_add(1)?,
        })
    }

    fn addr(&self) -> u64 {
        self.node
    }

    fn win_addr_conflict(&self, adversary: &Self) -> bool {
        self.generation > adversary.generation
    }
}

/// What a node tells the mesh about itself.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeMeta {
    /// The node.
    pub node: u64,
    /// Newer metadata of a node has a higher seq.
    pub seq: u64,
    /// Operator-facing name.
    pub name: String,
    /// Software version.
    pub version: String,
    /// What the node can do (e.g. "relay", "listener").
    pub capabilities: Vec<String>,
    /// Load in per mille of capacity.
    pub load_permille: u32,
}

/// A member as this node sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemberState {
    /// Answering probes.
    Alive,
    /// Missed a probe; will be declared dead unless it refutes.
    Suspect,
    /// Declared dead by the mesh.
    Dead,
}

/// One row of the member table.
#[derive(Clone, Debug)]
pub struct MemberView {
    /// The node.
    pub node: u64,
    /// Its state.
    pub state: MemberState,
    /// SWIM incarnation (bumped by the member to refute suspicion).
    pub incarnation: u16,
    /// Identity generation.
    pub generation: u32,
    /// When a datagram from it last arrived (None: never directly heard from).
    pub last_seen: Option<Instant>,
    /// When its state last changed.
    pub since: Instant,
    /// What it said about itself.
    pub meta: Option<NodeMeta>,
}

/// Membership news, in the order it happened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MembershipEvent {
    /// A node was seen for the first time.
    Joined(u64),
    /// A member missed probes.
    Suspect(u64),
    /// A member was declared dead.
    Dead(u64),
    /// A suspect or dead member is alive again.
    Recovered(u64),
    /// A member left for good.
    Left(u64),
    /// A member was evicted.
    Evicted(u64),
    /// An evicted node was admitted again.
    Admitted(u64),
}

/// Mesh health from the share of unreachable members.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Health {
    /// Every member reachable.
    Healthy,
    /// Some, but under half, unreachable.
    Degraded,
    /// Half or more unreachable.
    Critical,
}

/// SWIM timing.
#[derive(Clone, Debug)]
pub struct MembershipConfig {
    /// One member is probed per period.
    pub probe_period: Duration,
    /// Wait for a direct ack before asking others to probe.
    pub probe_rtt: Duration,
    /// Members asked to probe indirectly.
    pub indirect_probes: usize,
    /// A suspect not refuting for this long is declared dead.
    pub suspect_to_down: Duration,
    /// Updates are piggybacked this many times.
    pub max_transmissions: u8,
    /// Periodic gossip to a few members.
    pub gossip_period: Duration,
    /// Largest datagram.
    pub max_packet_bytes: usize,
}

impl Default for MembershipConfig {
    fn default() -> Self {
        Self {
            probe_period: Duration::from_millis(500),
            probe_rtt: Duration::from_millis(200),
            indirect_probes: 3,
            suspect_to_down: Duration::from_secs(3),
            max_transmissions: 10,
            gossip_period: Duration::from_millis(200),
            max_packet_bytes: 1400,
        }
    }
}

impl MembershipConfig {
    fn to_foca(&self) -> foca::Config {
        let mut config = foca::Config::simple();
        config.probe_period = self.probe_period;
        config.probe_rtt = self.probe_rtt;
        config.num_indirect_probes =
            NonZeroUsize::new(self.indirect_probes.max(1)).unwrap_or(NonZeroUsize::MIN);
        config.suspect_to_down_after = self.suspect_to_down;
        config.max_transmissions =
            NonZeroU8::new(self.max_transmissions.max(1)).unwrap_or(NonZeroU8::MIN);
        config.max_packet_size =
            NonZeroUsize::new(self.max_packet_bytes.max(512)).unwrap_or(NonZeroUsize::MIN);
        config.notify_down_members = true;
        config.remove_down_after = Duration::from_secs(60);
        config.periodic_gossip = Some(foca::PeriodicParams {
            frequency: self.gossip_period,
            num_members: NonZeroUsize::new(3).unwrap_or(NonZeroUsize::MIN),
        });
        config.periodic_announce = Some(foca::PeriodicParams {
            frequency: Duration::from_secs(10),
            num_members: NonZeroUsize::MIN,
        });
        config.periodic_announce_to_down_members = Some(foca::PeriodicParams {
            frequency: Duration::from_secs(5),
            num_members: NonZeroUsize::new(2).unwrap_or(NonZeroUsize::MIN),
        });
        config
    }
}

/// What foca asked for during one call.
#[derive(Default)]
struct Effects {
    sends: Vec<(u64, Bytes)>,
    timers: Vec<(Duration, Timer<MemberId>)>,
    /// foca renewed this node's own identity (it learnt it was declared down).
    rejoined: Option<MemberId>,
}

impl Runtime<MemberId> for Effects {
    fn notify(&mut self, notification: Notification<'_, MemberId>) {
        // `Rename` is about other members; our own renewal is reported as `Rejoin`.
        if let Notification::Rejoin(new) = notification {
            self.rejoined = Some(*new);
        }
    }

    fn send_to(&mut self, to: MemberId, data: &[u8]) {
        self.sends.push((to.node, Bytes::copy_from_slice(data)));
    }

    fn submit_after(&mut self, event: Timer<MemberId>, after: Duration) {
        self.timers.push((after, event));
    }
}

/// Counts behind [`Health`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Census {
    /// Members known, this node included.
    pub total: usize,
    /// Alive or suspect (reachable as far as SWIM knows), this node included.
    pub online: usize,
    /// Suspects among `online`.
    pub suspect: usize,
    /// Dead.
    pub dead: usize,
}

impl Census {
    /// HEALTHY / DEGRADED / CRITICAL.
    pub fn health(&self) -> Health {
        if self.dead == 0 {
            Health::Healthy
        } else if self.dead * 2 < self.total {
            Health::Degraded
        } else {
            Health::Critical
        }
    }
}

/// One node's membership.
pub struct Membership {
    local: MemberId,
    foca: Foca<MemberId, PostcardCodec, StdRng, MetaHandler>,
    /// The timing in force (live settings change it).
    config: MembershipConfig,
    meta: MetaTable,
    own_meta: NodeMeta,
    timers: BTreeMap<(Instant, u64), Timer<MemberId>>,
    timer_seq: u64,
    table: BTreeMap<u64, MemberView>,
    events: VecDeque<MembershipEvent>,
    outbox: VecDeque<(u64, Bytes)>,
    errors: u64,
    /// Direct neighbours; one that is not a reachable member yet is announced to again every
    /// `reannounce` (an announce is a datagram and may be lost).
    neighbours: BTreeSet<u64>,
    reannounce: Duration,
    next_announce: Option<Instant>,
    /// Evicted nodes: their datagrams are dropped.
    evicted: BTreeSet<u64>,
    /// Evicted or left: kept out of the member table.
    removed: BTreeSet<u64>,
    /// New members refused (or pushed out by a neighbour) at [`MAX_MEMBERS`].
    refused_members: Refusals,
    /// Notices about nodes outside the table refused at [`MAX_NOTICES`].
    refused_notices: Refusals,
}

impl Membership {
    /// Membership of `local` at `generation` (which must grow with every start).
    pub fn new(
        local: u64,
        generation: u32,
        config: &MembershipConfig,
        seed: u64,
        meta: NodeMeta,
        now: Instant,
    ) -> Self {
        assert_ne!(local, 0, "0 is never a node id");
        let id = MemberId {
            node: local,
            generation,
        };
        let table_meta: MetaTable = Rc::default();
        let handler = MetaHandler {
            table: Rc::clone(&table_meta),
        };
        let foca = Foca::with_custom_broadcast(
            id,
            config.to_foca(),
            StdRng::seed_from_u64(seed),
            PostcardCodec,
            handler,
        );
        let mut own_meta = meta;
        own_meta.node = local;
        own_meta.seq = u64::from(generation) << 32;
        let mut table = BTreeMap::new();
        table.insert(
            local,
            MemberView {
                node: local,
                state: MemberState::Alive,
                incarnation: 0,
                generation,
                last_seen: Some(now),
                since: now,
                meta: Some(own_meta.clone()),
            },
        );
        let mut membership = Self {
            local: id,
            foca,
            config: config.clone(),
            meta: table_meta,
            own_meta,
            timers: BTreeMap::new(),
            timer_seq: 0,
            table,
            events: VecDeque::new(),
            outbox: VecDeque::new(),
            errors: 0,
            neighbours: BTreeSet::new(),
            reannounce: config.probe_period,
            next_announce: None,
            evicted: BTreeSet::new(),
            removed: BTreeSet::new(),
            refused_members: Refusals::default(),
            refused_notices: Refusals::default(),
        };
        membership.publish_meta();
        membership
    }

    /// Nodes remembered from an earlier run: they count as dead until heard from.
    pub fn remember(&mut self, now: Instant, nodes: impl IntoIterator<Item = u64>) {
        for node in nodes {
            if node == 0 || node == self.local.node {
                continue;
            }
            if self.table.len() >= MAX_MEMBERS && !self.table.contains_key(&node) {
                self.refused_members.record("members", node);
                continue;
            }
            self.table.entry(node).or_insert(MemberView {
                node,
                state: MemberState::Dead,
                incarnation: 0,
                generation: 0,
                last_seen: None,
                since: now,
                meta: None,
            });
        }
    }

    /// A direct link came up: announce ourselves to the neighbour, which answers with the
    /// members it knows.
    pub fn handle_link_up(&mut self, now: Instant, peer: u64) {
        if peer == 0 || peer == self.local.node {
            return;
        }
        self.neighbours.insert(peer);
        self.announce(now, peer);
        self.next_announce = Some(now + self.reannounce);
    }

    /// The direct link to `peer` went down (membership itself is SWIM's to decide).
    pub fn handle_link_down(&mut self, peer: u64) {
        self.neighbours.remove(&peer);
    }

    fn announce(&mut self, now: Instant, peer: u64) {
        let target = MemberId {
            node: peer,
            generation: 0,
        };
        let mut effects = Effects::default();
        let result = self.foca.announce(target, &mut effects);
        self.after(now, effects, result);
    }

    /// A gossip datagram from `from` (the frame's source node).
    pub fn handle_data(&mut self, now: Instant, from: u64, data: &[u8]) {
        if self.evicted.contains(&from) {
            return;
        }
        if let Some(view) = self.table.get_mut(&from) {
            view.last_seen = Some(now);
        }
        let mut effects = Effects::default();
        let result = self.foca.handle_data(data, &mut effects);
        self.after(now, effects, result);
    }

    /// Fires every due timer.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.meta.borrow_mut().age_notices(now);
        if self.next_announce.is_some_and(|at| at <= now) {
            self.next_announce = None;
            let strangers: Vec<u64> = self
                .neighbours
                .iter()
                .copied()
                .filter(|n| {
                    self.table
                        .get(n)
                        .is_none_or(|v| v.state == MemberState::Dead)
                })
                .collect();
            if !strangers.is_empty() {
                for peer in strangers {
                    self.announce(now, peer);
                }
                self.next_announce = Some(now + self.reannounce);
            }
        }
        while let Some(entry) = self.timers.first_entry() {
            if entry.key().0 > now {
                break;
            }
            let timer = entry.remove();
            let mut effects = Effects::default();
            let result = self.foca.handle_timer(timer, &mut effects);
            self.after(now, effects, result);
        }
    }

    /// New load figure to spread (only when it moved, to keep gossip small).
    pub fn set_load(&mut self, load_permille: u32) {
        if self.own_meta.load_permille.abs_diff(load_permille) < 50 {
            return;
        }
        self.own_meta.load_permille = load_permille;
        self.publish_meta();
    }

    /// Leaves the mesh for good: tells a few members, who spread it.
    pub fn leave(&mut self, now: Instant) {
        let mut effects = Effects::default();
        let result = self.foca.leave_cluster(&mut effects);
        self.after(now, effects, result);
    }

    /// Decides about `node` and spreads the decision (evict, readmit, or this node leaving).
    pub fn publish_notice(&mut self, now: Instant, notice: Notice) {
        let stale = self
            .meta
            .borrow()
            .notices
            .get(&notice.node)
            .is_some_and(|(known, _)| known.seq >= notice.seq);
        if stale {
            return;
        }
        // foca hands the item to the handler, which records it as fresh news; the table
        // applies it in the drain below, like a notice from another member.
        match postcard::to_allocvec(&Gossiped::Notice(notice)) {
            Ok(encoded) if self.foca.add_broadcast(&encoded).is_ok() => {}
            _ => self.errors += 1,
        }
        // Spread it now rather than at the next periodic gossip.
        let mut effects = Effects::default();
        let result = self.foca.gossip(&mut effects);
        self.after(now, effects, result);
    }

    /// The certified keys notices are checked against (see `trust`).
    pub fn set_keys(&mut self, keys: Arc<HashMap<u64, [u8; 32]>>) {
        self.notice_trust().keys = keys;
    }

    /// The mesh and authority that vouch for issuers whose key is not held.
    pub fn set_authority(&mut self, authority: Option<(String, [u8; 32])>) {
        self.notice_trust().authority = authority;
    }

    /// The wall clock, for the validity of certificates in notices.
    pub fn set_wall_clock(&mut self, now_ms: u64) {
        if let Some(trust) = &mut self.meta.borrow_mut().trust {
            trust.now_ms = now_ms;
        }
    }

    fn notice_trust(&mut self) -> std::cell::RefMut<'_, NoticeTrust> {
        let evicted = self.evicted.clone();
        std::cell::RefMut::map(self.meta.borrow_mut(), |table| {
            table.trust.get_or_insert_with(|| NoticeTrust {
                revoked: evicted,
                ..NoticeTrust::default()
            })
        })
    }

    fn set_revoked(&mut self, node: u64, revoked: bool) {
        if let Some(trust) = &mut self.meta.borrow_mut().trust {
            if revoked {
                trust.revoked.insert(node);
            } else {
                trust.revoked.remove(&node);
            }
        }
    }

    /// Notices refused as not authentic so far.
    pub fn forged_notices(&self) -> u64 {
        self.meta.borrow().forged_notices
    }

    /// Nodes evicted earlier (from the control database): refused from the start.
    pub fn set_evicted(&mut self, nodes: impl IntoIterator<Item = u64>) {
        for node in nodes {
            if node != self.local.node {
                self.evicted.insert(node);
                self.removed.insert(node);
                self.table.remove(&node);
                self.set_revoked(node, true);
            }
        }
    }

    /// Whether `node` is evicted.
    pub fn is_evicted(&self, node: u64) -> bool {
        self.evicted.contains(&node)
    }

    /// Every evicted node.
    pub fn evicted(&self) -> impl Iterator<Item = u64> + '_ {
        self.evicted.iter().copied()
    }

    /// New SWIM timing, live (a committed setting); refused when foca finds it inconsistent.
    pub fn set_timing(&mut self, change: impl FnOnce(&mut MembershipConfig)) -> Result<(), String> {
        let mut config = self.config.clone();
        change(&mut config);
        if config.probe_rtt >= config.probe_period || config.suspect_to_down < config.probe_period {
            return Err(format!(
                "probe_rtt {:?} must be below probe_period {:?}, which must not exceed suspect_to_down {:?}",
                config.probe_rtt, config.probe_period, config.suspect_to_down
            ));
        }
        self.foca
            .set_config(config.to_foca())
            .map_err(|e| e.to_string())?;
        self.reannounce = config.probe_period;
        self.config = config;
        Ok(())
    }

    /// The control group decided `kind` about `node` (an eviction, a departure, a
    /// re-admission committed through its log): applied as a checked notice would be.
    pub fn decided(&mut self, node: u64, kind: NoticeKind) {
        let already = match kind {
            NoticeKind::Evicted => self.evicted.contains(&node),
            NoticeKind::Left => self.removed.contains(&node) && !self.evicted.contains(&node),
            NoticeKind::Admitted => !self.removed.contains(&node),
        };
        if !already {
            self.apply_notice(Notice::new(node, 0, kind));
        }
    }

    /// The seq of the newest notice held about `node` (see `publish_notice`).
    pub fn notice_seq(&self, node: u64) -> Option<u64> {
        self.meta.borrow().notices.get(&node).map(|(n, _)| n.seq)
    }

    /// Every node evicted or gone for good (left).
    pub fn removed(&self) -> impl Iterator<Item = u64> + '_ {
        self.removed.iter().copied()
    }

    /// A node admitted by this member (it joined again): its news counts again.
    pub fn readmit(&mut self, node: u64) {
        self.removed.remove(&node);
        self.evicted.remove(&node);
        self.set_revoked(node, false);
    }

    fn apply_notice(&mut self, notice: Notice) {
        let node = notice.node;
        if node == self.local.node || node == 0 {
            return;
        }
        // A notice about a node in the table frees its row; one about a node outside it would
        // only grow the sets below, so past the bound it is dropped.
        let grows = match notice.kind {
            NoticeKind::Evicted => !self.evicted.contains(&node),
            NoticeKind::Left => !self.removed.contains(&node),
            NoticeKind::Admitted => false,
        };
        if grows && !self.table.contains_key(&node) && !self.room_for_removal() {
            self.refused_notices.record("notices", node);
            return;
        }
        match notice.kind {
            NoticeKind::Evicted => {
                self.evicted.insert(node);
                self.removed.insert(node);
                self.table.remove(&node);
                self.set_revoked(node, true);
                self.events.push_back(MembershipEvent::Evicted(node));
            }
            NoticeKind::Admitted => {
                self.evicted.remove(&node);
                self.removed.remove(&node);
                self.set_revoked(node, false);
                self.events.push_back(MembershipEvent::Admitted(node));
            }
            NoticeKind::Left => {
                self.removed.insert(node);
                if self.table.remove(&node).is_some() {
                    self.events.push_back(MembershipEvent::Left(node));
                }
            }
        }
    }

    /// The next datagram to send: (destination node, bytes).
    pub fn poll_transmit(&mut self) -> Option<(u64, Bytes)> {
        self.outbox.pop_front()
    }

    /// The next event.
    pub fn poll_event(&mut self) -> Option<MembershipEvent> {
        self.events.pop_front()
    }

    /// When [`Self::handle_timeout`] must next run.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let timer = self.timers.keys().next().map(|(at, _)| *at);
        [timer, self.next_announce].into_iter().flatten().min()
    }

    /// Every member, this node included, by node id.
    pub fn members(&self) -> impl Iterator<Item = &MemberView> + '_ {
        self.table.values()
    }

    /// One member.
    pub fn member(&self, node: u64) -> Option<&MemberView> {
        self.table.get(&node)
    }

    /// Counts by state.
    pub fn census(&self) -> Census {
        let mut census = Census::default();
        for view in self.table.values() {
            census.total += 1;
            match view.state {
                MemberState::Alive => census.online += 1,
                MemberState::Suspect => {
                    census.online += 1;
                    census.suspect += 1;
                }
                MemberState::Dead => census.dead += 1,
            }
        }
        census
    }

    /// This node's identity.
    pub fn local(&self) -> MemberId {
        self.local
    }

    /// Datagrams foca refused (undecodable, from a stale identity, …).
    pub fn errors(&self) -> u64 {
        self.errors
    }

    /// What the bounded tables refused so far: (members, metadata, notices).
    pub fn refusals(&self) -> (u64, u64, u64) {
        let meta = self.meta.borrow();
        (
            self.refused_members.count(),
            meta.refused_meta.count(),
            self.refused_notices.count() + meta.dropped_notices.count(),
        )
    }

    /// Whether the evicted and removed sets may take one more node: below [`MAX_NOTICES`],
    /// after forgetting removed nodes foca has forgotten too (they cannot come back through
    /// gossip, only by joining, which readmits them anyway).
    fn room_for_removal(&mut self) -> bool {
        if self.removed.len() < MAX_NOTICES && self.evicted.len() < MAX_NOTICES {
            return true;
        }
        let in_foca: BTreeSet<u64> = self
            .foca
            .iter_membership_state()
            .map(|m| m.id().node)
            .collect();
        let evicted = &self.evicted;
        self.removed
            .retain(|n| evicted.contains(n) || in_foca.contains(n));
        self.removed.len() < MAX_NOTICES && self.evicted.len() < MAX_NOTICES
    }

    /// Panics if the table contradicts itself.
    pub fn check_invariants(&self) {
        let own = self.table.get(&self.local.node).expect("own row");
        assert_eq!(
            own.state,
            MemberState::Alive,
            "a node never sees itself dead"
        );
        for (node, view) in &self.table {
            assert_eq!(*node, view.node);
            assert_ne!(*node, 0);
        }
        assert!(
            self.table.len() <= MAX_MEMBERS,
            "member table over its bound"
        );
        let meta = self.meta.borrow();
        assert!(meta.meta.len() <= MAX_MEMBERS, "metadata over its bound");
        assert!(
            meta.notices.len() <= MAX_NOTICES,
            "notices over their bound"
        );
    }

    fn publish_meta(&mut self) {
        self.own_meta.seq += 1;
        let Ok(encoded) = postcard::to_allocvec(&Gossiped::Meta(self.own_meta.clone())) else {
            return;
        };
        if let Some(own) = self.table.get_mut(&self.local.node) {
            own.meta = Some(self.own_meta.clone());
        }
        match self.foca.add_broadcast(&encoded) {
            Ok(_) => {}
            Err(_) => self.errors += 1,
        }
    }

    /// Drains what foca asked for and syncs the table with its view.
    fn after(&mut self, now: Instant, effects: Effects, result: Result<(), foca::Error>) {
        if result.is_err() {
            self.errors += 1;
        }
        for (to, data) in effects.sends {
            if to != self.local.node && to != 0 {
                self.outbox.push_back((to, data));
            }
        }
        for (after, timer) in effects.timers {
            self.timer_seq += 1;
            self.timers.insert((now + after, self.timer_seq), timer);
        }
        if let Some(new) = effects.rejoined
            && new.node == self.local.node
            && new.generation > self.local.generation
        {
            // foca renewed our identity after a false "down": keep the row in step. The
            // caller persists the new generation before the datagrams carrying it leave.
            self.local = new;
            if let Some(own) = self.table.get_mut(&new.node) {
                own.generation = new.generation;
            }
        }
        self.sync_table(now);
    }

    fn sync_table(&mut self, now: Instant) {
        for member in self.foca.iter_membership_state() {
            let id = *member.id();
            if id.node == self.local.node || id.node == 0 || self.removed.contains(&id.node) {
                continue;
            }
            let state = match member.state() {
                State::Alive => MemberState::Alive,
                State::Suspect => MemberState::Suspect,
                State::Down => MemberState::Dead,
            };
            match self.table.get_mut(&id.node) {
                None => {
                    if self.table.len() >= MAX_MEMBERS {
                        let room =
                            make_room(&mut self.table, &self.neighbours, self.local.node, id.node);
                        // Pushed out or refused, one id is counted.
                        self.refused_members
                            .record("members", room.unwrap_or(id.node));
                        if room.is_none() {
                            continue;
                        }
                    }
                    self.table.insert(
                        id.node,
                        MemberView {
                            node: id.node,
                            state,
                            incarnation: member.incarnation(),
                            generation: id.generation,
                            last_seen: None,
                            since: now,
                            meta: None,
                        },
                    );
                    self.events.push_back(MembershipEvent::Joined(id.node));
                    if state == MemberState::Dead {
                        self.events.push_back(MembershipEvent::Dead(id.node));
                    }
                }
                Some(view) => {
                    // A row of an older generation than the one known is stale news.
                    if id.generation < view.generation {
                        continue;
                    }
                    let previous = view.state;
                    let renewed = id.generation > view.generation;
                    view.generation = id.generation;
                    view.incarnation = member.incarnation();
                    if previous == state {
                        continue;
                    }
                    // A newer generation that foca still holds as down is the old life's
                    // record; only news of the new life changes the row.
                    if renewed && state == MemberState::Dead {
                        continue;
                    }
                    view.state = state;
                    view.since = now;
                    let event = match (previous, state) {
                        (_, MemberState::Suspect) => MembershipEvent::Suspect(id.node),
                        (_, MemberState::Dead) => MembershipEvent::Dead(id.node),
                        (_, MemberState::Alive) => MembershipEvent::Recovered(id.node),
                    };
                    self.events.push_back(event);
                }
            }
        }
        let fresh = self.meta.borrow_mut().take_fresh(now);
        for notice in fresh {
            self.apply_notice(notice);
        }
        {
            // Metadata of nodes no longer in the table makes room for members' metadata.
            let mut meta = self.meta.borrow_mut();
            if meta.meta.len() >= MAX_MEMBERS {
                let table = &self.table;
                meta.meta.retain(|node, _| table.contains_key(node));
            }
        }
        let meta = self.meta.borrow();
        for (node, view) in &mut self.table {
            if *node != self.local.node
                && let Some(m) = meta.meta.get(node)
                && view.meta.as_ref().is_none_or(|old| old.seq < m.seq)
            {
                view.meta = Some(m.clone());
            }
        }
        drop(meta);
        debug_assert!(
            self.events.len() < 1 << 20,
            "events are drained by the caller"
        );
        self.check_invariants();
    }
}

/// At [`MAX_MEMBERS`], whether `node` may still get a row: only a direct neighbour, in place
/// of the member least likely to matter (dead before suspect before alive, never heard from
/// directly before heard from, longest in that state first), which is returned. Never this
/// node's own row or another neighbour's.
fn make_room(
    table: &mut BTreeMap<u64, MemberView>,
    neighbours: &BTreeSet<u64>,
    local: u64,
    node: u64,
) -> Option<u64> {
    if !neighbours.contains(&node) {
        return None;
    }
    let rank = |state: MemberState| match state {
        MemberState::Dead => 0,
        MemberState::Suspect => 1,
        MemberState::Alive => 2,
    };
    let victim = table
        .values()
        .filter(|v| v.node != local && !neighbours.contains(&v.node))
        .min_by_key(|v| (rank(v.state), v.last_seen.is_some(), v.since, v.node))
        .map(|v| v.node);
    let victim = victim?;
    table.remove(&victim);
    Some(victim)
}

mod dissemination;
#[cfg(test)]
mod tests;
