//! The send path of the api: a message's wire payload and origin tag, the holds a send waits
//! out (a saturated destination, a congested one), and the hand-over to the owning shard.

use bytes::{Bytes, BytesMut};
use meshd_shards::{
    command::{Outgoing, ShardInput},
    frame::{FrameType, TrafficClass},
    origin,
};
use tonic::Status;

use super::{ApiState, saturation, tracker};
use crate::storage::now_ms;

/// A message encoded for a routed frame, with room for its origin tag (sealed in place by
/// [`ApiState::seal`]).
pub(crate) fn wire_payload(message: &impl prost::Message) -> Bytes {
    let mut buf = Vec::with_capacity(message.encoded_len() + origin::TAG_LEN);
    message
        .encode(&mut buf)
        .expect("a Vec with room for the message");
    buf.into()
}

/// Appends to `outgoing` the origin tag its destination checks (`meshd_shards::origin`), as
/// sent by `local`; false when `keys` holds no pair key with the destination. In place when
/// the payload is the frame's own buffer with room for the tag (what [`wire_payload`] makes);
/// a shared buffer (a broadcast's copies) is copied, each copy with its own tag.
pub(crate) fn append_tag(keys: &origin::PairKeys, local: u64, outgoing: &mut Outgoing) -> bool {
    let header = outgoing.header(local);
    let Some(key) = keys.get(header.dst) else {
        return false;
    };
    let tag = origin::tag(key, &header, &outgoing.payload);
    let mut sealed = std::mem::take(&mut outgoing.payload)
        .try_into_mut()
        .unwrap_or_else(|shared| BytesMut::from(shared.as_ref()));
    sealed.extend_from_slice(&tag);
    outgoing.payload = sealed.freeze();
    true
}

impl ApiState {
    /// Holds a new message of `class` to `dst` while `dst` says its subscribers of that class
    /// are near full (see [`saturation`]), at most `congestion_wait`; past it the send is
    /// refused, so a message a saturated destination would turn away is never accepted.
    pub(crate) async fn hold_if_saturated(
        &self,
        dst: u64,
        class: TrafficClass,
    ) -> Result<(), Status> {
        let deadline = tokio::time::Instant::now() + self.congestion_wait;
        loop {
            let now = std::time::Instant::now();
            let held = saturation::held(dst, class);
            let Some(until) = self.saturation().held_until(held, now) else {
                return Ok(());
            };
            let wake = tokio::time::Instant::now() + (until - now);
            if wake > deadline {
                return Err(Status::resource_exhausted(format!(
                    "destination {dst} saturated: its subscribers' queues stayed near full for \
                     {} ms; nothing was sent, try again later",
                    self.congestion_wait.as_millis()
                )));
            }
            tokio::time::sleep_until(wake).await;
        }
    }

    /// Hands a frame to the shard that owns the link to `dst`, waiting while `dst` is congested
    /// (at most `congestion_wait`: only this destination's callers wait) and while the
    /// shard's ring is full.
    pub(crate) async fn send_frame(
        &self,
        dst: u64,
        frame_type: FrameType,
        traffic_class: TrafficClass,
        msg_id: u64,
        flow: u128,
        payload: Bytes,
    ) -> Result<(), Status> {
        self.send_frame_of(dst, frame_type, traffic_class, (msg_id, 0), flow, payload)
            .await
    }

    /// [`Self::send_frame`] for a `DataBatch` frame of `count` messages from `first` on.
    pub(crate) async fn send_batch_frame(
        &self,
        dst: u64,
        traffic_class: TrafficClass,
        (first, count): (u64, u16),
        flow: u128,
        payload: Bytes,
    ) -> Result<(), Status> {
        let frame_type = FrameType::DataBatch;
        self.send_frame_of(
            dst,
            frame_type,
            traffic_class,
            (first, count),
            flow,
            payload,
        )
        .await
    }

    async fn send_frame_of(
        &self,
        dst: u64,
        frame_type: FrameType,
        traffic_class: TrafficClass,
        (msg_id, batch): (u64, u16),
        flow: u128,
        payload: Bytes,
    ) -> Result<(), Status> {
        // The congestion gauge counts what the shards park for `dst`, client data above all;
        // system and DB traffic has its own lane and queue bound, and never waits on it.
        if traffic_class == TrafficClass::Client && self.congestion.is_congested(dst) {
            let _ =
                tokio::time::timeout(self.congestion_wait, self.congestion.until_clear(dst)).await;
        }
        self.hand_over(Outgoing {
            chunk: (0, batch),
            dst,
            frame_type,
            traffic_class,
            msg_id,
            flow,
            payload,
        })
        .await
    }

    /// Hands a frame to the shard that owns the link to its destination, waiting only while
    /// that shard's ring is full: a broadcast's copy for a congested node is parked there, not
    /// waited for.
    pub(crate) async fn hand_over(&self, mut outgoing: Outgoing) -> Result<(), Status> {
        if !self.seal(&mut outgoing) {
            // Without the destination's certified key no tag can be made, and it would
            // refuse the frame: like a node not reachable yet.
            let count = match outgoing.frame_type {
                FrameType::Data => 1,
                FrameType::DataBatch => u64::from(outgoing.chunk.1),
                _ => 0,
            };
            let update = tracker::StatusUpdate {
                status: meshd_proto::mesh::MessageStatus::PendingNode,
                detail: format!(
                    "no certified key of node {} yet: the frame could not be signed",
                    outgoing.dst
                )
                .into(),
                timestamp_ms: now_ms(),
            };
            let mut tracker = self.tracker();
            for id in outgoing.msg_id..outgoing.msg_id.saturating_add(count) {
                if !tracker.note_failure(id) {
                    tracker.update(id, None, update.clone());
                }
            }
            return Ok(());
        }
        self.shard_of(outgoing.dst)
            .push(ShardInput::Send(outgoing))
            .await
            .map_err(|_| Status::unavailable("the node is shutting down"))
    }

    /// Appends the origin tag its destination checks (`meshd_shards::origin`); false when no
    /// pair key with the destination is held.
    /// In place when the payload is this frame's own buffer with room for the tag (what
    /// [`wire_payload`] makes): no copy of the message on the way out.
    pub(crate) fn seal(&self, outgoing: &mut Outgoing) -> bool {
        let mut cache = self
            .key_cache
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        append_tag(cache.get(&self.key_book), self.node_id, outgoing)
    }
}

#[cfg(test)]
mod tests {
    use meshd_proto::link::Data;

    use super::*;

    #[test]
    fn a_wire_payload_takes_its_tag_without_a_copy() {
        let data = Data {
            payload: vec![7u8; 300].into(),
            ..Data::default()
        };
        let payload = wire_payload(&data);
        let at = payload.as_ptr();
        let mut sealed = payload.try_into_mut().expect("the frame's own buffer");
        sealed.extend_from_slice(&[0u8; origin::TAG_LEN]);
        assert_eq!(sealed.as_ptr(), at, "the tag went into the same allocation");
    }
}
