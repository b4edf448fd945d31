//! The send and fwd tasks and their parking: no destination (or next hop) holds up another.
//!
//! The send task tries each frame without waiting. A frame whose next hop has no room is
//! parked in its destination's queue, and a drainer task for that destination waits for room
//! (at most until the frame's deadline) while the send task goes on with frames for everyone
//! else. Frames for a destination that has a queue join it, so each destination's frames still
//! leave in the order they came. Parked bytes are published in the node-wide
//! [`Congestion`](crate::congestion::Congestion) gauge, where the api holds back the callers of
//! a congested destination; the shard's own bound ([`MAX_PARKED_BYTES`]) makes the send task
//! wait only when everything parked together is that large (overload of the whole shard; the
//! drainers' deadlines end that wait).

use std::{
    cell::{Cell, RefCell},
    collections::{HashMap, VecDeque},
    rc::Rc,
    sync::Arc,
    time::{Duration, Instant},
};

use event_listener::{Event, listener};

use super::{RouteError, Shard, Wait, handle_misrouted, report_send_failure, send_header};
use crate::{
    command::{Forwarded, Outgoing, ShardInput},
    congestion::Congestion,
    ring::Consumer,
};

/// Bytes parked on one shard, all destinations together, before the send task waits.
pub(crate) const MAX_PARKED_BYTES: usize = 16 << 20;

/// What a parking lot holds: frames keyed by the queue they wait in.
pub(crate) trait Parkable {
    /// The queue: the destination (send task) or the next hop (fwd task).
    fn key(&self) -> u64;
    /// Payload bytes.
    fn weight(&self) -> usize;
}

impl Parkable for Outgoing {
    fn key(&self) -> u64 {
        self.dst
    }
    fn weight(&self) -> usize {
        self.payload.len()
    }
}

impl Parkable for Forwarded {
    fn key(&self) -> u64 {
        self.next_hop
    }
    fn weight(&self) -> usize {
        self.payload.len()
    }
}

/// The parked frames of one of a shard's tasks.
pub(crate) struct Parked<T> {
    queues: RefCell<HashMap<u64, VecDeque<(T, Instant)>>>,
    bytes: Cell<usize>,
    room: Event,
    /// Published for the api (send task only).
    congestion: Option<Arc<Congestion>>,
}

impl<T: Parkable> Parked<T> {
    pub(crate) fn new(congestion: Option<Arc<Congestion>>) -> Self {
        Self {
            queues: RefCell::new(HashMap::new()),
            bytes: Cell::new(0),
            room: Event::new(),
            congestion,
        }
    }

    /// Whether `key` has a queue (possibly empty while its drainer sends the last frame).
    fn holds(&self, key: u64) -> bool {
        self.queues.borrow().contains_key(&key)
    }

    /// Appends a frame; returns whether its queue is new (needs a drainer).
    fn park(&self, item: T, deadline: Instant) -> bool {
        let (key, weight) = (item.key(), item.weight());
        self.bytes.set(self.bytes.get() + weight);
        if let Some(congestion) = &self.congestion {
            congestion.park(key, weight);
        }
        let mut queues = self.queues.borrow_mut();
        let fresh = !queues.contains_key(&key);
        queues.entry(key).or_default().push_back((item, deadline));
        fresh
    }

    /// The queue's next frame; `None` (and the queue is gone) once it is empty.
    fn next(&self, key: u64) -> Option<(T, Instant)> {
        let mut queues = self.queues.borrow_mut();
        let queue = queues.get_mut(&key)?;
        let next = queue.pop_front();
        if next.is_none() {
            queues.remove(&key);
        }
        next
    }

    fn release(&self, key: u64, weight: usize) {
        let before = self.bytes.get();
        self.bytes.set(before - weight);
        if let Some(congestion) = &self.congestion {
            congestion.release(key, weight);
        }
        if before >= MAX_PARKED_BYTES && before - weight < MAX_PARKED_BYTES {
            self.room.notify(usize::MAX);
        }
    }

    async fn until_room(&self) {
        while self.bytes.get() >= MAX_PARKED_BYTES {
            listener!(self.room => room);
            if self.bytes.get() < MAX_PARKED_BYTES {
                return;
            }
            room.await;
        }
    }
}

/// The send task: data this node originates, from the send ring.
pub(crate) async fn send_task(shard: Rc<Shard>, send: Consumer<ShardInput>) {
    // Longer than the write deadline plus the heartbeat tick that enforces it: a frame parked
    // behind a peer that stopped reading is freed by that link's closing (and re-routed or
    // reported), not dropped just before it.
    let patience = shard.config.write_timeout + shard.config.heartbeat_interval * 2;
    while let Some(input) = send.pop().await {
        let ShardInput::Send(outgoing) = input else {
            handle_misrouted(&shard, input);
            continue;
        };
        if shard.parked_sends.holds(outgoing.dst) {
            shard.parked_sends.park(outgoing, Instant::now() + patience);
        } else {
            let header = send_header(&shard, &outgoing);
            match shard
                .route(header, outgoing.payload.clone(), 1, Wait::Never)
                .await
            {
                Ok(()) => {}
                Err(RouteError::Congested) => {
                    let dst = outgoing.dst;
                    if shard.parked_sends.park(outgoing, Instant::now() + patience) {
                        glommio::spawn_local(drain_sends(Rc::clone(&shard), dst)).detach();
                    }
                }
                Err(error) => report_send_failure(&shard, &outgoing, &error),
            }
        }
        shard.parked_sends.until_room().await;
    }
}

/// Sends one destination's parked frames in order, each waiting for room until its deadline.
async fn drain_sends(shard: Rc<Shard>, dst: u64) {
    while let Some((mut outgoing, deadline)) = shard.parked_sends.next(dst) {
        let weight = outgoing.payload.len();
        let limit = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1));
        let header = send_header(&shard, &outgoing);
        let payload = std::mem::take(&mut outgoing.payload);
        let result = shard.route(header, payload, 1, Wait::Upto(limit)).await;
        shard.parked_sends.release(dst, weight);
        if let Err(error) = result {
            report_send_failure(&shard, &outgoing, &error);
        }
    }
}

/// The fwd task: frames another shard routed to a next hop of this one. Same parking, keyed by
/// the next hop, each frame waiting at most the relay wait.
pub(crate) async fn fwd_task(shard: Rc<Shard>, fwd: Consumer<ShardInput>) {
    let patience = shard.config.relay_wait();
    while let Some(input) = fwd.pop().await {
        let ShardInput::Forward(forwarded) = input else {
            handle_misrouted(&shard, input);
            continue;
        };
        if shard.parked_forwards.holds(forwarded.next_hop) {
            shard
                .parked_forwards
                .park(forwarded, Instant::now() + patience);
        } else {
            let next_hop = forwarded.next_hop;
            match shard.forward_now(forwarded) {
                Ok(()) => {}
                Err(Some(forwarded)) => {
                    if shard
                        .parked_forwards
                        .park(forwarded, Instant::now() + patience)
                    {
                        glommio::spawn_local(drain_forwards(Rc::clone(&shard), next_hop)).detach();
                    }
                }
                Err(None) => {}
            }
        }
        shard.parked_forwards.until_room().await;
    }
}

async fn drain_forwards(shard: Rc<Shard>, next_hop: u64) {
    while let Some((forwarded, deadline)) = shard.parked_forwards.next(next_hop) {
        let weight = forwarded.payload.len();
        let limit = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1));
        shard.forward(forwarded, limit).await;
        shard.parked_forwards.release(next_hop, weight);
    }
}
