//! The send task and its per-destination parking: no destination holds up another.
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
    command::{Outgoing, ShardInput},
    congestion::Congestion,
    ring::Consumer,
};

/// Bytes parked on one shard, all destinations together, before the send task waits.
pub(crate) const MAX_PARKED_BYTES: usize = 16 << 20;

/// The parked frames of one shard.
pub(crate) struct Parked {
    queues: RefCell<HashMap<u64, VecDeque<(Outgoing, Instant)>>>,
    bytes: Cell<usize>,
    room: Event,
    congestion: Arc<Congestion>,
}

impl Parked {
    pub(crate) fn new(congestion: Arc<Congestion>) -> Self {
        Self {
            queues: RefCell::new(HashMap::new()),
            bytes: Cell::new(0),
            room: Event::new(),
            congestion,
        }
    }

    /// Whether `dst` has a queue (possibly empty while its drainer sends the last frame).
    fn holds(&self, dst: u64) -> bool {
        self.queues.borrow().contains_key(&dst)
    }

    /// Appends a frame; returns whether the destination's queue is new (needs a drainer).
    fn park(&self, outgoing: Outgoing, deadline: Instant) -> bool {
        let (dst, weight) = (outgoing.dst, outgoing.payload.len());
        self.bytes.set(self.bytes.get() + weight);
        self.congestion.park(dst, weight);
        let mut queues = self.queues.borrow_mut();
        let fresh = !queues.contains_key(&dst);
        queues
            .entry(dst)
            .or_default()
            .push_back((outgoing, deadline));
        fresh
    }

    /// The destination's next frame; `None` (and the queue is gone) once it is empty.
    fn next(&self, dst: u64) -> Option<(Outgoing, Instant)> {
        let mut queues = self.queues.borrow_mut();
        let queue = queues.get_mut(&dst)?;
        let next = queue.pop_front();
        if next.is_none() {
            queues.remove(&dst);
        }
        next
    }

    fn release(&self, dst: u64, weight: usize) {
        let before = self.bytes.get();
        self.bytes.set(before - weight);
        self.congestion.release(dst, weight);
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
        if shard.parked.holds(outgoing.dst) {
            shard.parked.park(outgoing, Instant::now() + patience);
        } else {
            let header = send_header(&shard, &outgoing);
            match shard
                .route(header, outgoing.payload.clone(), 1, Wait::Never)
                .await
            {
                Ok(()) => {}
                Err(RouteError::Congested) => {
                    let dst = outgoing.dst;
                    if shard.parked.park(outgoing, Instant::now() + patience) {
                        glommio::spawn_local(drain(Rc::clone(&shard), dst)).detach();
                    }
                }
                Err(error) => report_send_failure(&shard, &outgoing, &error),
            }
        }
        shard.parked.until_room().await;
    }
}

/// Sends one destination's parked frames in order, each waiting for room until its deadline.
async fn drain(shard: Rc<Shard>, dst: u64) {
    while let Some((mut outgoing, deadline)) = shard.parked.next(dst) {
        let weight = outgoing.payload.len();
        let limit = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1));
        let header = send_header(&shard, &outgoing);
        let payload = std::mem::take(&mut outgoing.payload);
        let result = shard.route(header, payload, 1, Wait::Upto(limit)).await;
        shard.parked.release(dst, weight);
        if let Err(error) = result {
            report_send_failure(&shard, &outgoing, &error);
        }
    }
}
