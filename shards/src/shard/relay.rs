//! What a shard does with a frame it could not hand on: count it, and tell its source: this
//! node's api for its own data, the source node for data it relayed (sans-IO notice, thin
//! sending shell).

use bytes::Bytes;

use super::{RouteError, Shard, Wait, report_data_failure};
use crate::frame::{FrameType, Header};

/// The notice a relay sends the source of a data frame it had to drop, so the source's
/// fire-and-forget messages end PENDING_NODE instead of QUEUED for good: a `DeliveryReport`
/// frame from this node to the frame's source whose one run covers the frame's messages,
/// with `relay_for` naming their destination. `None` for anything but relayed `Data` /
/// `DataBatch` (stream frames are sent again by their protocol, control-plane frames
/// tolerate loss), so a dropped notice never begets another.
pub(crate) fn relay_drop_notice(
    local: u64,
    dropped: &Header,
    error: &RouteError,
) -> Option<(Header, Vec<u8>)> {
    use meshd_proto::{
        link::{DeliveryReport, DeliveryReports},
        mesh::MessageStatus,
    };
    use prost::Message;
    let relayed = dropped.src != local && dropped.src != 0 && dropped.dst != 0;
    if !relayed || !matches!(dropped.frame_type, FrameType::Data | FrameType::DataBatch) {
        return None;
    }
    let count = match dropped.frame_type {
        FrameType::DataBatch => u32::from(dropped.chunk_count),
        _ => 1,
    };
    let detail = match error {
        RouteError::Congested => "its next hop stayed congested past the relay wait",
        RouteError::NoRoute | RouteError::LinkClosed => "no route was left",
        RouteError::Unconfirmed => {
            "the link to its next hop broke before that hop confirmed reading it; it may have \
             been lost"
        }
    };
    let notice = DeliveryReports {
        reports: vec![DeliveryReport {
            msg_id: dropped.seq,
            status: MessageStatus::PendingNode as i32,
            detail: detail.to_owned(),
            count,
        }],
        relay_for: dropped.dst,
        ..DeliveryReports::default()
    };
    let header = Header::new(
        FrameType::DeliveryReport,
        dropped.traffic_class,
        local,
        dropped.src,
    );
    Some((header, notice.encode_to_vec()))
}

impl Shard {
    /// A frame that came from another shard or a link and could not be handed on: counted,
    /// and for data, its source is told: this node's api when the frame is its own (it
    /// crossed from the shard of its destination to the shard of its next hop), else the
    /// source node ([`relay_drop_notice`]). The notice never waits: it takes the control
    /// allowance, and is counted lost when even that is full.
    pub(crate) async fn relay_failed(&self, dropped: &Header, error: &RouteError) {
        let local = self.config.local.node_id;
        if dropped.src == local {
            let count = match dropped.frame_type {
                FrameType::DataBatch => dropped.chunk_count,
                _ => 1,
            };
            report_data_failure(
                self,
                dropped.frame_type,
                dropped.dst,
                dropped.seq,
                count,
                error,
            );
            return;
        }
        self.count_drop(error.kind());
        let Some((header, body)) = relay_drop_notice(local, dropped, error) else {
            return;
        };
        let sealed = self
            .keys
            .borrow_mut()
            .get(&self.config.key_book)
            .seal(&header, &body);
        let Some(sealed) = sealed else {
            self.count_drop("relay_drop_notice_unsealed");
            return;
        };
        let routed = Box::pin(self.route(header, Bytes::from(sealed), 1, Wait::Control)).await;
        if routed.is_err() {
            self.count_drop("relay_drop_notice_lost");
        }
    }
}

#[cfg(test)]
mod tests {
    use meshd_proto::{link::DeliveryReports, mesh::MessageStatus};
    use prost::Message;

    use super::*;
    use crate::frame::TrafficClass;

    #[test]
    fn a_relay_tells_the_source_of_a_dropped_data_frame_and_of_nothing_else() {
        let mut batch = Header::new(FrameType::DataBatch, TrafficClass::Client, 1, 2);
        batch.seq = 500;
        batch.chunk_count = 64;
        let (header, body) = relay_drop_notice(3, &batch, &RouteError::Congested).unwrap();
        assert_eq!(
            (header.frame_type, header.src, header.dst),
            (FrameType::DeliveryReport, 3, 1)
        );
        assert_eq!(header.traffic_class, TrafficClass::Client);
        let notice = DeliveryReports::decode(body.as_slice()).unwrap();
        assert_eq!(notice.relay_for, 2);
        let run = &notice.reports[0];
        assert_eq!((run.msg_id, run.count), (500, 64));
        assert_eq!(run.status, MessageStatus::PendingNode as i32);

        let mut data = Header::new(FrameType::Data, TrafficClass::DbUpdate, 1, 2);
        data.seq = 9;
        let (_, body) = relay_drop_notice(3, &data, &RouteError::NoRoute).unwrap();
        let notice = DeliveryReports::decode(body.as_slice()).unwrap();
        assert_eq!((notice.reports[0].msg_id, notice.reports[0].count), (9, 1));

        // Its own frames, stream frames (sent again), control-plane frames (a lost report
        // must not beget another) and broadcasts without a destination: no notice.
        let own = Header::new(FrameType::Data, TrafficClass::Client, 3, 2);
        let stream = Header::new(FrameType::StreamData, TrafficClass::Client, 1, 2);
        let report = Header::new(FrameType::DeliveryReport, TrafficClass::Client, 1, 2);
        let nowhere = Header::new(FrameType::Data, TrafficClass::Client, 1, 0);
        for header in [own, stream, report, nowhere] {
            assert!(relay_drop_notice(3, &header, &RouteError::Congested).is_none());
        }
    }
}
