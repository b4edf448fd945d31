//! The send and fwd tasks and their parking: no destination (or next hop) holds up another.
//!
//! The send task tries each frame without waiting. A frame whose next hop has no room is
//! parked in its destination's queue, and a drainer task for that destination waits for room
//! (at most until the frame's deadline) while the send task goes on with frames for everyone
//! else. Frames for a destination that has a queue join it, so each destination's frames still
//! leave in the order they came. System and DB traffic parks apart from client data (a lot
//! is a destination and a class group, [`Lot`]): it has a lane and an outbox bound of its own,
//! so it never waits behind client data parked for the same peer. The send task releases each frame's bytes from the node-wide
//! [`Congestion`](crate::congestion::Congestion) gauge once it left (or failed), where the api
//! holds back the callers of a destination with too much in flight; the shard's own bound
//! ([`MAX_PARKED_BYTES`]) makes a task wait only when everything it parked together is that
//! large (overload of the whole shard; the drainers' deadlines end that wait).

use std::{
    cell::{Cell, RefCell},
    collections::{HashMap, VecDeque},
    rc::Rc,
    time::{Duration, Instant},
};

use event_listener::{Event, listener};

use super::{RouteError, Shard, Wait, handle_misrouted, report_send_failure, send_header};
use crate::{
    command::{Forwarded, Outgoing, ShardInput},
    frame::TrafficClass,
    ring::Consumer,
    slice::Slice,
};

/// Bytes parked on one shard, all destinations together, before the send task waits.
pub(crate) const MAX_PARKED_BYTES: usize = 16 << 20;

/// A queue of parked frames: a destination (send task) or a next hop (fwd task), and whether
/// the frames are system or DB traffic (`true`) or client data.
pub(crate) type Lot = (u64, bool);

fn is_priority(class: TrafficClass) -> bool {
    matches!(class, TrafficClass::System | TrafficClass::DbUpdate)
}

/// What a parking lot holds: frames keyed by the queue they wait in.
pub(crate) trait Parkable {
    /// The queue it waits in.
    fn key(&self) -> Lot;
    /// Payload bytes.
    fn weight(&self) -> usize;
}

/// What a parked frame costs besides its payload (the queue entry, the frame's header), so
/// that tiny frames cannot park without limit.
const PARKED_OVERHEAD: usize = 128;

impl Parkable for Outgoing {
    fn key(&self) -> Lot {
        (self.dst, is_priority(self.traffic_class))
    }
    fn weight(&self) -> usize {
        self.payload.len() + PARKED_OVERHEAD
    }
}

impl Parkable for Forwarded {
    fn key(&self) -> Lot {
        (self.next_hop, is_priority(self.header.traffic_class))
    }
    fn weight(&self) -> usize {
        self.payload.len() + PARKED_OVERHEAD
    }
}

/// The parked frames of one of a shard's tasks.
pub(crate) struct Parked<T> {
    queues: RefCell<HashMap<Lot, VecDeque<(T, Instant)>>>,
    bytes: Cell<usize>,
    room: Event,
}

impl<T: Parkable> Parked<T> {
    pub(crate) fn new() -> Self {
        Self {
            queues: RefCell::new(HashMap::new()),
            bytes: Cell::new(0),
            room: Event::new(),
        }
    }

    /// Whether `key` has a queue (possibly empty while its drainer sends the last frame).
    fn holds(&self, key: Lot) -> bool {
        self.queues.borrow().contains_key(&key)
    }

    /// Appends a frame; returns whether its queue is new (needs a drainer).
    fn park(&self, item: T, deadline: Instant) -> bool {
        let (key, weight) = (item.key(), item.weight());
        self.bytes.set(self.bytes.get() + weight);
        let mut queues = self.queues.borrow_mut();
        let fresh = !queues.contains_key(&key);
        queues.entry(key).or_default().push_back((item, deadline));
        fresh
    }

    /// The queue's next frame; `None` (and the queue is gone) once it is empty.
    fn next(&self, key: Lot) -> Option<(T, Instant)> {
        let mut queues = self.queues.borrow_mut();
        let queue = queues.get_mut(&key)?;
        let next = queue.pop_front();
        if next.is_none() {
            queues.remove(&key);
        }
        next
    }

    fn release(&self, weight: usize) {
        let before = self.bytes.get();
        self.bytes.set(before - weight);
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
    let mut slice = Slice::new();
    while let Some(input) = send.pop().await {
        let ShardInput::Send(outgoing) = input else {
            handle_misrouted(&shard, input);
            continue;
        };
        if shard.parked_sends.holds(outgoing.key()) {
            shard.parked_sends.park(outgoing, Instant::now() + patience);
        } else {
            let header = send_header(&shard, &outgoing);
            let (dst, bytes) = (outgoing.dst, outgoing.payload.len());
            match shard
                .route(header, outgoing.payload.clone(), 1, Wait::Never)
                .await
            {
                Ok(()) => shard.congestion.release(dst, bytes),
                Err(RouteError::Congested) => {
                    let lot = outgoing.key();
                    if shard.parked_sends.park(outgoing, Instant::now() + patience) {
                        glommio::spawn_local(drain_sends(Rc::clone(&shard), lot)).detach();
                    }
                }
                Err(error) => {
                    shard.congestion.release(dst, bytes);
                    report_send_failure(&shard, &outgoing, &error);
                }
            }
        }
        shard.parked_sends.until_room().await;
        // A full send ring never makes `pop` wait: let the executor reap the control lanes'
        // I/O now and then.
        slice.check().await;
    }
}

/// Sends one destination's parked frames in order, each waiting for room until its deadline.
async fn drain_sends(shard: Rc<Shard>, lot: Lot) {
    let dst = lot.0;
    while let Some((mut outgoing, deadline)) = shard.parked_sends.next(lot) {
        let weight = outgoing.weight();
        let limit = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1));
        let header = send_header(&shard, &outgoing);
        let payload = std::mem::take(&mut outgoing.payload);
        let bytes = payload.len();
        let result = shard.route(header, payload, 1, Wait::Upto(limit)).await;
        shard.parked_sends.release(weight);
        shard.congestion.release(dst, bytes);
        if let Err(error) = result {
            report_send_failure(&shard, &outgoing, &error);
        }
    }
}

/// The fwd task: frames another shard routed to a next hop of this one. Same parking, keyed by
/// the next hop, each frame waiting at most the relay wait.
pub(crate) async fn fwd_task(shard: Rc<Shard>, fwd: Consumer<ShardInput>) {
    let patience = shard.config.relay_wait();
    let mut slice = Slice::new();
    while let Some(input) = fwd.pop().await {
        let ShardInput::Forward(forwarded) = input else {
            handle_misrouted(&shard, input);
            continue;
        };
        if shard.parked_forwards.holds(forwarded.key()) {
            shard
                .parked_forwards
                .park(forwarded, Instant::now() + patience);
        } else {
            let (lot, bytes) = (forwarded.key(), forwarded.payload.len());
            let gauge = forwarded.gauge_key();
            let header = forwarded.header;
            match shard.forward_now(forwarded) {
                Ok(()) => shard.forwards.release(gauge, bytes),
                Err(Ok(forwarded)) => {
                    if shard
                        .parked_forwards
                        .park(forwarded, Instant::now() + patience)
                    {
                        glommio::spawn_local(drain_forwards(Rc::clone(&shard), lot)).detach();
                    }
                }
                Err(Err(error)) => {
                    shard.forwards.release(gauge, bytes);
                    shard.relay_failed(&header, &error).await;
                }
            }
        }
        shard.parked_forwards.until_room().await;
        slice.check().await;
    }
}

async fn drain_forwards(shard: Rc<Shard>, lot: Lot) {
    while let Some((forwarded, deadline)) = shard.parked_forwards.next(lot) {
        let weight = forwarded.weight();
        let gauge = forwarded.gauge_key();
        let limit = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1));
        let bytes = forwarded.payload.len();
        shard.forward(forwarded, limit).await;
        shard.parked_forwards.release(weight);
        shard.forwards.release(gauge, bytes);
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::frame::FrameType;

    fn frame(dst: u64, msg_id: u64, bytes: usize) -> Outgoing {
        Outgoing {
            chunk: (0, 0),
            dst,
            frame_type: FrameType::Data,
            traffic_class: TrafficClass::Client,
            msg_id,
            flow: 0,
            payload: Bytes::from(vec![0; bytes]),
        }
    }

    #[test]
    fn db_updates_never_park_behind_client_data_for_the_same_destination() {
        let parked = Parked::new();
        let at = Instant::now();
        assert!(parked.park(frame(1, 10, 100), at));
        let db = Outgoing {
            traffic_class: TrafficClass::DbUpdate,
            ..frame(1, 11, 100)
        };
        assert!(
            !parked.holds(db.key()),
            "client data parked; the DB lot is free"
        );
        assert!(parked.park(db, at), "a lot, and a drainer, of its own");
        assert_eq!(parked.next((1, true)).unwrap().0.msg_id, 11);
        assert_eq!(parked.next((1, false)).unwrap().0.msg_id, 10);
    }

    #[test]
    fn each_destination_keeps_its_order_and_its_queue_until_drained() {
        let parked = Parked::new();
        let at = Instant::now();
        assert!(
            parked.park(frame(1, 10, 100), at),
            "first frame needs a drainer"
        );
        assert!(!parked.park(frame(1, 11, 100), at));
        assert!(
            parked.park(frame(2, 20, 100), at),
            "another destination, another drainer"
        );
        assert_eq!(parked.bytes.get(), 3 * (100 + PARKED_OVERHEAD));

        assert_eq!(parked.next((1, false)).unwrap().0.msg_id, 10);
        // While the drainer sends its last frame the queue stays, so newcomers join it.
        assert_eq!(parked.next((1, false)).unwrap().0.msg_id, 11);
        assert!(parked.holds((1, false)));
        assert!(!parked.park(frame(1, 12, 100), at));
        assert_eq!(parked.next((1, false)).unwrap().0.msg_id, 12);
        assert!(parked.next((1, false)).is_none());
        assert!(
            !parked.holds((1, false)),
            "an empty queue is gone once its drainer saw it empty"
        );
        assert!(parked.holds((2, false)));
    }

    #[test]
    fn the_task_waits_only_past_the_shard_bound() {
        let parked = Parked::new();
        let at = Instant::now();
        futures_lite::future::block_on(parked.until_room());
        let big = 1 << 20;
        // With the overhead of each frame, sixteen of 1 MiB pass the 16 MiB bound.
        for i in 0..(MAX_PARKED_BYTES / big) as u64 {
            parked.park(frame(7 + i, 1, big), at);
        }
        let waiting = futures_lite::future::poll_once(parked.until_room());
        assert!(futures_lite::future::block_on(waiting).is_none());
        let (frame, _) = parked.next((7, false)).unwrap();
        parked.release(frame.weight());
        futures_lite::future::block_on(parked.until_room());
    }
}
