//! The way into one shard: three rings, so that no kind of input waits behind another.
//!
//! ```text
//!   control inputs (dial, adopt, FIB, mesh, drop, sessions, pin, shutdown,
//!                   and control-plane frames: routing, gossip, join) ──► ctl ring  ──► ctl task
//!   data this node originates (Data, DeliveryReport, AppAck)        ──► send ring ──► send task
//!   frames routed on another shard whose next hop is here            ──► fwd ring  ──► fwd task
//! ```
//!
//! **Invariant (the wait-for graph has no cycle):** the ctl task never awaits anything but its
//! ring; the send and fwd tasks never await one destination: a frame whose next hop has no room
//! is parked per destination (per next hop for fwd) and drained by a task of its own
//! (`shard::parked`), and they wait only when everything their shard parked passes a bound. A
//! drainer awaits its own shard's outboxes or another shard's fwd ring, each frame until its
//! deadline. An outbox waits only on its writer, and a writer's wait on the socket has a
//! deadline (`network.write_timeout_ms`) after which the link is closed. So every chain of
//! waits ends at a socket with a deadline, and a peer that stops reading delays only the frames
//! for it; it never stops control inputs, heartbeats or traffic to other peers.

use std::sync::Arc;

use crate::{
    command::ShardInput,
    congestion::Congestion,
    frame::FrameType,
    ring::{Consumer, Producer, PushError, weighed_ring},
};

/// Payload bytes each of a shard's rings may hold, whatever its item capacity: 4096 items of
/// 64 KiB would be 256 MiB and a second of queueing at link speed; this is a few milliseconds.
pub const DATA_LANE_BYTES: usize = 4 << 20;

/// The payload bytes an input weighs on its ring.
fn weight(input: &ShardInput) -> usize {
    match input {
        ShardInput::Send(outgoing) => outgoing.payload.len(),
        ShardInput::Forward(forwarded) => forwarded.payload.len(),
        _ => 0,
    }
}

/// Which of a shard's rings an input travels on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Lane {
    Ctl,
    Send,
    Fwd,
}

/// The lane of an input: data frames this node originates go to the send ring, frames handed
/// over by another shard to the fwd ring, and everything else (including control-plane frames,
/// which must not queue behind data) to the ctl ring.
pub(crate) fn lane_of(input: &ShardInput) -> Lane {
    match input {
        ShardInput::Send(outgoing) => match outgoing.frame_type {
            FrameType::Data
            | FrameType::DataBatch
            | FrameType::DeliveryReport
            | FrameType::AppAck
            | FrameType::StreamData
            | FrameType::StreamReport
            | FrameType::StreamOpen => Lane::Send,
            _ => Lane::Ctl,
        },
        ShardInput::Forward(_) => Lane::Fwd,
        _ => Lane::Ctl,
    }
}

/// Gives counted bytes back unless disarmed (see [`ShardHandle::push`]).
struct Uncount<'a>(Option<(&'a Congestion, u64, usize)>);

impl Drop for Uncount<'_> {
    fn drop(&mut self) {
        ShardHandle::uncount(self.0.take());
    }
}

/// The producing side of one shard's rings. Cheap to clone; every thread holds one per shard.
#[derive(Clone)]
pub struct ShardHandle {
    ctl: Producer<ShardInput>,
    send: Producer<ShardInput>,
    fwd: Producer<ShardInput>,
    /// Bytes of the send lane per destination, until the send task is done with them.
    sends: Arc<Congestion>,
    /// Bytes of the fwd lane per next hop, until the fwd task is done with them.
    forwards: Arc<Congestion>,
}

/// The consuming side, owned by the shard thread.
pub(crate) struct ShardRings {
    pub(crate) ctl: Consumer<ShardInput>,
    pub(crate) send: Consumer<ShardInput>,
    pub(crate) fwd: Consumer<ShardInput>,
}

/// Creates the rings of one shard, each holding at most `capacity` inputs and
/// [`DATA_LANE_BYTES`] of payload; the send lane's bytes are counted per destination in `sends`,
/// the fwd lane's per next hop in `forwards`.
pub(crate) fn shard_rings(
    capacity: usize,
    sends: Arc<Congestion>,
    forwards: Arc<Congestion>,
) -> (ShardHandle, ShardRings) {
    let (ctl, ctl_rx) = weighed_ring(capacity, DATA_LANE_BYTES, weight);
    let (send, send_rx) = weighed_ring(capacity, DATA_LANE_BYTES, weight);
    let (fwd, fwd_rx) = weighed_ring(capacity, DATA_LANE_BYTES, weight);
    (
        ShardHandle {
            ctl,
            send,
            fwd,
            sends,
            forwards,
        },
        ShardRings {
            ctl: ctl_rx,
            send: send_rx,
            fwd: fwd_rx,
        },
    )
}

impl ShardHandle {
    /// Each ring's depth now, `(ring, items, bytes)`: what waits for the shard (metrics).
    pub fn depths(&self) -> [(&'static str, usize, usize); 3] {
        [
            ("ctl", self.ctl.len(), self.ctl.queued_bytes()),
            ("send", self.send.len(), self.send.queued_bytes()),
            ("fwd", self.fwd.len(), self.fwd.queued_bytes()),
        ]
    }

    fn lane(&self, lane: Lane) -> &Producer<ShardInput> {
        match lane {
            Lane::Ctl => &self.ctl,
            Lane::Send => &self.send,
            Lane::Fwd => &self.fwd,
        }
    }

    /// Pushes without waiting; hands the input back when its ring (items or bytes) is full or
    /// the shard stopped.
    pub fn try_push(&self, input: ShardInput) -> Result<(), PushError<ShardInput>> {
        let lane = lane_of(&input);
        let counted = self.count(lane, &input);
        self.lane(lane)
            .try_push(input)
            .inspect_err(|_| Self::uncount(counted))
    }

    /// Pushes a control-plane frame another shard routed (`ShardInput::Forward`) onto the ctl
    /// ring without waiting: it never queues behind, nor is refused because of, the data
    /// forwards of the fwd ring.
    pub fn try_push_ctl(&self, input: ShardInput) -> Result<(), PushError<ShardInput>> {
        self.ctl.try_push(input)
    }

    /// Adds a data input's bytes to its gauge (released by the shard's send or fwd task);
    /// returns what to take back if the push fails.
    fn count(&self, lane: Lane, input: &ShardInput) -> Option<(&Congestion, u64, usize)> {
        let counted = match (lane, input) {
            (Lane::Send, ShardInput::Send(outgoing)) => {
                (&*self.sends, outgoing.dst, outgoing.payload.len())
            }
            (Lane::Fwd, ShardInput::Forward(forwarded)) => (
                &*self.forwards,
                forwarded.gauge_key(),
                forwarded.payload.len(),
            ),
            _ => return None,
        };
        counted.0.add(counted.1, counted.2);
        Some(counted)
    }

    fn uncount(counted: Option<(&Congestion, u64, usize)>) {
        if let Some((gauge, key, bytes)) = counted {
            gauge.release(key, bytes);
        }
    }

    /// Pushes, waiting while the input's ring is full (items or bytes). Returns the input only
    /// if the shard has stopped.
    ///
    /// Callers on the api and control threads may wait here: the ctl ring's consumer never
    /// blocks, and the send and fwd tasks drain their rings without waiting on any one
    /// destination (see the module docs).
    ///
    /// Cancel-safe for the gauges: a caller that gives up (a timeout, a cancelled gRPC call)
    /// drops this future, and the bytes it counted are given back, or the destination would
    /// look congested for ever.
    pub async fn push(&self, input: ShardInput) -> Result<(), ShardInput> {
        let lane = lane_of(&input);
        let mut guard = Uncount(self.count(lane, &input));
        let pushed = self.lane(lane).push(input).await;
        if pushed.is_ok() {
            // Now in the ring: the consuming task releases it.
            guard.0 = None;
        }
        pushed
    }

    /// Inputs waiting in the send ring (data this node originates): a congestion signal.
    pub fn send_backlog(&self) -> usize {
        self.send.len()
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::{
        command::{Forwarded, Outgoing},
        frame::{Header, TrafficClass},
    };

    fn outgoing(frame_type: FrameType) -> ShardInput {
        ShardInput::Send(Outgoing {
            chunk: (0, 0),
            dst: 2,
            frame_type,
            traffic_class: TrafficClass::Client,
            msg_id: 1,
            flow: 0,
            payload: Bytes::new(),
        })
    }

    #[test]
    fn control_plane_frames_never_share_a_ring_with_data() {
        assert_eq!(lane_of(&outgoing(FrameType::Data)), Lane::Send);
        assert_eq!(lane_of(&outgoing(FrameType::DeliveryReport)), Lane::Send);
        assert_eq!(lane_of(&outgoing(FrameType::AppAck)), Lane::Send);
        assert_eq!(lane_of(&outgoing(FrameType::Routing)), Lane::Ctl);
        assert_eq!(lane_of(&outgoing(FrameType::Gossip)), Lane::Ctl);
        assert_eq!(lane_of(&outgoing(FrameType::Join)), Lane::Ctl);
        assert_eq!(lane_of(&ShardInput::Shutdown), Lane::Ctl);
        let forwarded = ShardInput::Forward(Forwarded {
            next_hop: 3,
            header: Header::new(FrameType::Data, TrafficClass::Client, 1, 4),
            payload: Bytes::new(),
            reroutes_left: 1,
        });
        assert_eq!(lane_of(&forwarded), Lane::Fwd);
    }

    #[test]
    fn a_full_send_ring_does_not_block_control_inputs() {
        let (handle, rings) = shard_rings(1, Arc::default(), Arc::default());
        handle.try_push(outgoing(FrameType::Data)).unwrap();
        assert!(matches!(
            handle.try_push(outgoing(FrameType::Data)),
            Err(PushError::Full(_))
        ));
        handle.try_push(ShardInput::Shutdown).unwrap();
        assert!(matches!(rings.ctl.try_pop(), Some(ShardInput::Shutdown)));
        assert_eq!(handle.send_backlog(), 1);
    }

    fn big(bytes: usize) -> ShardInput {
        ShardInput::Send(Outgoing {
            chunk: (0, 0),
            dst: 2,
            frame_type: FrameType::Data,
            traffic_class: TrafficClass::Client,
            msg_id: 1,
            flow: 0,
            payload: Bytes::from(vec![0u8; bytes]),
        })
    }

    #[test]
    fn a_push_given_up_on_gives_its_bytes_back_to_the_gauge() {
        let sends = Arc::new(Congestion::default());
        let (handle, rings) = shard_rings(1, Arc::clone(&sends), Arc::default());
        handle.try_push(big(10)).unwrap();
        assert_eq!(sends.in_flight(2), 10);
        // The ring is full: the push waits, and its caller gives up (a timeout, a cancelled
        // call) by dropping it.
        let waiting = futures_lite::future::poll_once(handle.push(big(100)));
        assert!(futures_lite::future::block_on(waiting).is_none());
        assert_eq!(
            sends.in_flight(2),
            10,
            "the abandoned push's bytes are given back"
        );
        drop(rings);
    }

    #[test]
    fn a_data_lane_is_bounded_in_bytes_and_pops_give_them_back() {
        let (handle, rings) = shard_rings(4096, Arc::default(), Arc::default());
        // One input may take the gauge past the bound; after it the lane is full.
        handle.try_push(big(DATA_LANE_BYTES - 1)).unwrap();
        handle.try_push(big(64 << 10)).unwrap();
        assert!(matches!(handle.try_push(big(1)), Err(PushError::Full(_))));
        // Items of no weight travel on the ctl lane, unaffected.
        handle.try_push(ShardInput::Shutdown).unwrap();
        let popped = rings.send.try_pop();
        assert!(popped.is_some());
        handle.try_push(big(1)).unwrap();
        drop(rings);
        assert!(matches!(
            futures_lite::future::block_on(handle.push(big(1))),
            Err(ShardInput::Send(_))
        ));
    }
}
