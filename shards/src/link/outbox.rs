//! A link's outbox: the frames waiting to be written to its lanes (sans-IO but for the
//! wake-ups), and which lane carries which frame.

use std::{cell::RefCell, collections::VecDeque, mem, time::Duration};

use event_listener::{Event, listener};

use crate::frame::{self, FrameType, Header, TrafficClass};

use super::timeout;

/// Largest WebSocket message the writer produces, unless one frame alone is larger: a new
/// batch is started before a frame that would take the current one past this. Keeps every
/// message under the receiver's limit whatever either side's queue bound is.
pub(crate) const MAX_BATCH_BYTES: usize = 256 * 1024;

/// Room above the data bound that control frames (heartbeats and their acks, goodbyes,
/// routing, gossip, join) may use, so a link full of data is not declared dead for lack of
/// heartbeats. Past it, control frames are dropped too: a peer that floods heartbeats at a
/// link that cannot drain grows nothing.
pub(crate) const CONTROL_ALLOWANCE_BYTES: usize = 64 * 1024;

/// Largest payload a frame may have on a control lane. Served-first frames above it (a Raft
/// append of big entries, a snapshot chunk) go in the data queue instead, so a control lane
/// write never takes long, and a control lane reader refuses anything bigger: a peer cannot
/// make the lane that carries liveness carry bulk.
pub(crate) const CONTROL_LANE_MAX_PAYLOAD: usize = 64 * 1024;

/// Bytes of heartbeats and acks one lane may have waiting (its own, written before anything
/// else on that connection). A lane that cannot write them is about to be declared stalled.
const BEATS_BOUND_BYTES: usize = 4 * 1024;

/// Which connection of a link a writer (or reader) serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Lane {
    /// The link's first connection: client data and stream frames, goodbyes, and whatever
    /// another lane would carry while that lane is not attached.
    Data = 0,
    /// The control lane: frames served first ([`FrameType::is_served_first`]) up to
    /// [`CONTROL_LANE_MAX_PAYLOAD`], and its own heartbeats.
    Control = 1,
    /// The priority lane: system and internal-DB traffic ([`TrafficClass::System`],
    /// [`TrafficClass::DbUpdate`]) that is not served first, so a DB update never queues
    /// behind client data.
    Priority = 2,
}

impl Lane {
    /// Every lane, indexed by its number.
    pub(crate) const ALL: [Self; 3] = [Self::Data, Self::Control, Self::Priority];

    /// The name in sessions, metrics and logs.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::Data => "data",
            Self::Control => "control",
            Self::Priority => "priority",
        }
    }

    /// The lane `Hello.lane` names, if any.
    pub(crate) fn from_hello(lane: u32) -> Option<Self> {
        Self::ALL.get(usize::try_from(lane).ok()?).copied()
    }

    /// Lanes a link runs when its ends say they run `lanes` (`Hello.lanes`) each: a side lane
    /// is dialed only when both ends run it.
    pub(crate) fn runs(self, local_lanes: u32, peer_lanes: u32) -> bool {
        local_lanes.min(peer_lanes) > self as u32
    }

    /// Where a frame waits in an [`Outbox`] (and so which lane carries it when attached):
    /// served first within the control cap, else system and DB traffic, else data.
    pub(crate) fn of(header: &Header, payload_len: usize) -> Self {
        if header.frame_type.is_served_first() && payload_len <= CONTROL_LANE_MAX_PAYLOAD {
            Self::Control
        } else if matches!(
            header.traffic_class,
            TrafficClass::System | TrafficClass::DbUpdate
        ) && header.frame_type != FrameType::Goodbye
        {
            Self::Priority
        } else {
            Self::Data
        }
    }

    /// Whether this lane's reader takes such a frame: the data lane takes anything (it stands
    /// in for a side lane that is down); a side lane only what [`Lane::of`] gives it, its own
    /// heartbeats and a goodbye, so a peer cannot make a side lane carry bulk.
    pub(crate) fn accepts(self, header: &Header, payload_len: usize) -> bool {
        self == Self::Data
            || matches!(
                header.frame_type,
                FrameType::Goodbye
                    | FrameType::Heartbeat
                    | FrameType::HeartbeatAck
                    | FrameType::LaneAck
            )
            || Self::of(header, payload_len) == self
    }
}

/// Frames waiting to be written to one link, batched into WebSocket messages.
///
/// Three shared queues, one per [`Lane`] ([`Lane::of`] picks): frames that are served first
/// ([`FrameType::is_served_first`]: heartbeats, routing, gossip, Raft, delivery reports and
/// acks, each up to [`CONTROL_LANE_MAX_PAYLOAD`]), system and DB traffic, and everything
/// else; and per lane a small queue of that connection's own heartbeats and acks. Senders
/// encode straight into a queue's open batch. A side lane (control, priority) that is
/// attached writes its queue, so a heartbeat, a Raft message or a DB update never waits
/// behind client data, not even in the kernel's socket buffers; while one is not attached
/// the data lane's writer takes its queue before any data batch (control, then priority,
/// then data). Data frames are queued while fewer than `max_pending_bytes` wait (the shared
/// queues counted; [`Outbox::push`] waits for room, [`Outbox::try_push`] does not);
/// served-first frames, and control frames pushed with [`Outbox::push_now`], may use
/// [`CONTROL_ALLOWANCE_BYTES`] more. Nothing else ever grows it.
pub(crate) struct Outbox {
    inner: RefCell<OutboxInner>,
    /// Per lane: something to write.
    ready: [Event; 3],
    room: Event,
    max_pending_bytes: usize,
    max_payload_bytes: usize,
}

struct OutboxInner {
    /// The shared queues, indexed by [`Lane`].
    queues: [Queue; 3],
    /// Each lane's own heartbeats and heartbeat acks, indexed by [`Lane`].
    beats: [Queue; 3],
    /// Per side lane: attached, writing its queue (the data lane is always).
    attached: [bool; 3],
    /// Bytes in the shared queues.
    queued: usize,
    closing: Option<String>,
}

impl OutboxInner {
    /// The lane whose writer takes `queue`'s batches now.
    fn writer_of(&self, queue: Lane) -> Lane {
        if self.attached[queue as usize] {
            queue
        } else {
            Lane::Data
        }
    }
}

/// One queue of an [`Outbox`]: sealed batches and the open one.
#[derive(Default)]
struct Queue {
    sealed: VecDeque<(Vec<u8>, u64)>,
    batch: Vec<u8>,
    frames: u64,
    /// Bytes in `sealed` and `batch`.
    bytes: usize,
}

impl Queue {
    /// Encodes a frame into the open batch (sealing it first when the frame would overfill
    /// it); returns the bytes added.
    fn encode(
        &mut self,
        header: &Header,
        payload: &[u8],
        max_payload: usize,
    ) -> Result<usize, OutboxError> {
        let frame_len = frame::HEADER_LEN + payload.len();
        if !self.batch.is_empty() && self.batch.len() + frame_len > MAX_BATCH_BYTES {
            let batch = mem::take(&mut self.batch);
            let frames = mem::take(&mut self.frames);
            self.sealed.push_back((batch, frames));
        }
        if self.batch.capacity() == 0 {
            self.batch
                .reserve(frame_len.clamp(64 * 1024, MAX_BATCH_BYTES));
        }
        let before = self.batch.len();
        frame::encode_into(&mut self.batch, header, payload, max_payload)
            .map_err(|_| OutboxError::Oversized)?;
        self.frames += 1;
        let added = self.batch.len() - before;
        self.bytes += added;
        Ok(added)
    }

    /// The oldest sealed batch, else the open one.
    fn take(&mut self) -> Option<(Vec<u8>, u64)> {
        let taken = self.sealed.pop_front().or_else(|| {
            (!self.batch.is_empty())
                .then(|| (mem::take(&mut self.batch), mem::take(&mut self.frames)))
        });
        if let Some((batch, _)) = &taken {
            self.bytes -= batch.len();
        }
        taken
    }
}

/// What the writer takes from the outbox.
pub(super) enum Take {
    /// Frames of the shared queues: kept until the peer confirms reading them.
    Batch(Vec<u8>, u64),
    /// The lane's own heartbeats and acks: written even without credit, never kept.
    Beats(Vec<u8>, u64),
    Closed(String),
}

/// Why a frame was not queued.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum OutboxError {
    /// The link is closing or closed.
    Closed,
    /// The payload exceeds the maximum frame payload.
    Oversized,
    /// The outbox is at its bound (and, for a waiting push, stayed there for the whole wait).
    Full,
}

impl Outbox {
    pub(crate) fn new(max_pending_bytes: usize, max_payload_bytes: usize) -> Self {
        Self {
            inner: RefCell::new(OutboxInner {
                queues: Default::default(),
                beats: Default::default(),
                attached: [true, false, false],
                queued: 0,
                closing: None,
            }),
            ready: [Event::new(), Event::new(), Event::new()],
            room: Event::new(),
            max_pending_bytes,
            max_payload_bytes,
        }
    }

    /// Queues a data frame, waiting while the outbox is at its bound: until there is room,
    /// the link closes, or `limit` passes (then [`OutboxError::Full`]).
    ///
    /// The wait is on this link's writer, whose every write has a deadline, so it ends.
    pub(crate) async fn push(
        &self,
        header: &Header,
        payload: &[u8],
        limit: Duration,
    ) -> Result<(), OutboxError> {
        match self.try_push(header, payload) {
            Err(OutboxError::Full) => {}
            other => return other,
        }
        let waited = timeout(limit, async {
            loop {
                listener!(self.room => room);
                match self.try_push(header, payload) {
                    Err(OutboxError::Full) => {}
                    other => return other,
                }
                room.await;
                match self.try_push(header, payload) {
                    Err(OutboxError::Full) => {}
                    other => return other,
                }
            }
        })
        .await;
        waited.unwrap_or(Err(OutboxError::Full))
    }

    /// Queues a data frame if the outbox is under its bound.
    pub(crate) fn try_push(&self, header: &Header, payload: &[u8]) -> Result<(), OutboxError> {
        self.queue(header, payload, self.max_pending_bytes)
    }

    /// Queues a control frame at once, past the data bound by up to
    /// [`CONTROL_ALLOWANCE_BYTES`].
    pub(crate) fn push_now(&self, header: &Header, payload: &[u8]) -> Result<(), OutboxError> {
        self.queue(
            header,
            payload,
            self.max_pending_bytes + CONTROL_ALLOWANCE_BYTES,
        )
    }

    /// Queues a heartbeat or heartbeat ack of `lane`, written on that connection before
    /// anything else (its round trip measures that connection).
    pub(crate) fn push_beat(&self, lane: Lane, header: &Header) -> Result<(), OutboxError> {
        let mut inner = self.inner.borrow_mut();
        if inner.closing.is_some() {
            return Err(OutboxError::Closed);
        }
        let queue = &mut inner.beats[lane as usize];
        if queue.bytes >= BEATS_BOUND_BYTES {
            return Err(OutboxError::Full);
        }
        queue.encode(header, &[], self.max_payload_bytes)?;
        drop(inner);
        self.ready[lane as usize].notify(1);
        Ok(())
    }

    fn queue(&self, header: &Header, payload: &[u8], bound: usize) -> Result<(), OutboxError> {
        let queue = Lane::of(header, payload.len());
        let bound = if queue == Lane::Control {
            bound.max(self.max_pending_bytes + CONTROL_ALLOWANCE_BYTES)
        } else {
            bound
        };
        let mut inner = self.inner.borrow_mut();
        if inner.closing.is_some() {
            return Err(OutboxError::Closed);
        }
        // System and DB traffic has a bound of its own, so a data flood cannot refuse it; the
        // served-first and data queues share theirs as before.
        let priority = inner.queues[Lane::Priority as usize].bytes;
        let held = match queue {
            Lane::Priority => priority,
            Lane::Control | Lane::Data => inner.queued - priority,
        };
        if held >= bound {
            return Err(OutboxError::Full);
        }
        let lane = inner.writer_of(queue);
        let added = inner.queues[queue as usize].encode(header, payload, self.max_payload_bytes)?;
        inner.queued += added;
        drop(inner);
        self.ready[lane as usize].notify(1);
        Ok(())
    }

    /// A side lane now writes its queue (`true`), or no longer does and the data lane takes
    /// it back at once (`false`; what the lost connection had taken is gone with it, as on
    /// any broken connection). The data lane is always attached.
    pub(crate) fn set_attached(&self, lane: Lane, attached: bool) {
        if lane == Lane::Data {
            return;
        }
        self.inner.borrow_mut().attached[lane as usize] = attached;
        for ready in &self.ready {
            ready.notify(usize::MAX);
        }
    }

    /// Bytes waiting for `lane` now (its own heartbeats included).
    pub(crate) fn queued_for(&self, lane: Lane) -> usize {
        let inner = self.inner.borrow();
        let shared: usize = Lane::ALL
            .iter()
            .filter(|&&queue| inner.writer_of(queue) == lane)
            .map(|&queue| inner.queues[queue as usize].bytes)
            .sum();
        inner.beats[lane as usize].bytes + shared
    }

    /// Stops accepting frames; the writers flush what is queued, then end the link.
    pub(crate) fn close(&self, reason: String) {
        let mut inner = self.inner.borrow_mut();
        if inner.closing.is_none() {
            inner.closing = Some(reason);
        }
        drop(inner);
        for ready in &self.ready {
            ready.notify(usize::MAX);
        }
        self.room.notify(usize::MAX);
    }

    pub(crate) fn is_closing(&self) -> bool {
        self.inner.borrow().closing.is_some()
    }

    fn try_take(&self, lane: Lane, credit: bool) -> Option<Take> {
        let mut inner = self.inner.borrow_mut();
        if let Some((batch, frames)) = inner.beats[lane as usize].take() {
            return Some(Take::Beats(batch, frames));
        }
        // Served first, then system and DB traffic, then data: the order the data lane takes
        // what it stands in for.
        let mut taken = None;
        for queue in [Lane::Control, Lane::Priority, Lane::Data] {
            if credit && inner.writer_of(queue) == lane {
                taken = inner.queues[queue as usize].take();
                if taken.is_some() {
                    break;
                }
            }
        }
        if let Some((batch, frames)) = taken {
            inner.queued -= batch.len();
            drop(inner);
            self.room.notify(usize::MAX);
            return Some(Take::Batch(batch, frames));
        }
        let waiting_for_credit = Lane::ALL
            .iter()
            .any(|&queue| inner.writer_of(queue) == lane && inner.queues[queue as usize].bytes > 0);
        if waiting_for_credit {
            // Closing still flushes what is queued first, once the peer gives credit (or the
            // link is declared stalled).
            return None;
        }
        inner
            .closing
            .as_ref()
            .map(|reason| Take::Closed(reason.clone()))
    }

    /// What `lane`'s writer writes next: its own beats whenever there are some, shared
    /// batches only while `credit()` says the peer has confirmed enough (then [`Outbox::wake`]
    /// when it changes), the close once everything it may take is written.
    pub(super) async fn take(&self, lane: Lane, credit: impl Fn() -> bool) -> Take {
        loop {
            if let Some(take) = self.try_take(lane, credit()) {
                return take;
            }
            listener!(self.ready[lane as usize] => ready);
            if let Some(take) = self.try_take(lane, credit()) {
                return take;
            }
            ready.await;
        }
    }

    /// Wakes `lane`'s writer (its credit changed).
    pub(super) fn wake(&self, lane: Lane) {
        self.ready[lane as usize].notify(usize::MAX);
    }

    /// Everything still queued for the shared queues, in batches never written: for a link
    /// that ended, to send another way or report. Call after [`Outbox::close`].
    pub(crate) fn drain(&self) -> Vec<Vec<u8>> {
        let mut inner = self.inner.borrow_mut();
        let mut batches = Vec::new();
        for queue in &mut inner.queues {
            while let Some((batch, _)) = queue.take() {
                batches.push(batch);
            }
        }
        inner.queued = 0;
        drop(inner);
        self.room.notify(usize::MAX);
        batches
    }
}

#[cfg(test)]
mod tests;
