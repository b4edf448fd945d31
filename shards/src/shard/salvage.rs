//! What a link's connection leaves behind when it ends: frames it never wrote go another way
//! (fast reroute of queued traffic) or are reported; data it wrote that the peer never
//! confirmed reading is reported "may have been lost". Either way a fire-and-forget message
//! on a broken link ends with a status at its source instead of QUEUED for good (issue 23).

use std::{rc::Rc, time::Duration};

use bytes::Bytes;

use super::{RouteError, Shard, Wait};
use crate::frame::{FrameReader, FrameType, Header};

/// How long reports and acks that found no route are tried again: a link that broke is
/// usually re-made within a few reconnect attempts, and a report lost here would leave its
/// source's messages QUEUED for good.
const REPORT_PATIENCE: Duration = Duration::from_secs(5);

/// What to do with one frame a connection left behind.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Leftover {
    /// Route it again (it goes another way or its source is told it could not).
    Reroute,
    /// Tell its source it may have been lost: it may also have arrived, and a
    /// fire-and-forget message must never be delivered twice.
    Report,
    /// Nothing to do: its protocol sends it again (LSAs, Raft, stream frames), tolerates its
    /// loss (gossip) or it meant only this connection (heartbeats, goodbyes, joins).
    Drop,
}

/// `written`: the frame went to the socket (unconfirmed), else it never left the outbox.
pub(crate) fn leftover(frame_type: FrameType, written: bool) -> Leftover {
    match frame_type {
        FrameType::Data | FrameType::DataBatch if written => Leftover::Report,
        FrameType::Data | FrameType::DataBatch => Leftover::Reroute,
        // Applying a report or an ack twice changes nothing at its source: always worth
        // sending again, or the source's messages would stay QUEUED.
        FrameType::DeliveryReport | FrameType::AppAck => Leftover::Reroute,
        _ => Leftover::Drop,
    }
}

impl Shard {
    /// Handles what an ended connection towards `peer` left: `unsent` batches drained from
    /// the link's outbox (never written), `unconfirmed` messages written but not confirmed.
    /// Call once the link is closed or gone here, so nothing is routed back onto it. Never
    /// waits on a queue: re-routes take [`Wait::Never`].
    pub(crate) async fn salvage(
        self: &Rc<Self>,
        peer: u64,
        unsent: Vec<Vec<u8>>,
        unconfirmed: Vec<Bytes>,
    ) {
        let max_payload = self.config.max_payload_bytes;
        let mut counts = [0u64; 3];
        let mut later = Vec::new();
        let batches = unsent
            .iter()
            .map(|batch| (&batch[..], false))
            .chain(unconfirmed.iter().map(|message| (&message[..], true)));
        for (batch, written) in batches {
            for frame in FrameReader::new(batch, max_payload).flatten() {
                let header: Header = frame.header;
                let what = leftover(header.frame_type, written);
                counts[what as usize] += 1;
                match what {
                    Leftover::Reroute => {
                        self.reroutes.set(self.reroutes.get() + 1);
                        let payload = Bytes::copy_from_slice(frame.payload);
                        let routed = self.route(header, payload.clone(), 0, Wait::Never).await;
                        match routed {
                            Err(RouteError::NoRoute | RouteError::LinkClosed)
                                if is_report(header.frame_type) =>
                            {
                                later.push((header, payload));
                            }
                            Err(error) => self.relay_failed(&header, &error).await,
                            Ok(()) => {}
                        }
                    }
                    Leftover::Report => self.relay_failed(&header, &RouteError::Unconfirmed).await,
                    Leftover::Drop => self.count_drop("left_on_broken_link"),
                }
            }
        }
        if !later.is_empty() {
            glommio::spawn_local(Rc::clone(self).retry_reports(later)).detach();
        }
        if counts.iter().any(|&n| n > 0) {
            tracing::debug!(
                peer,
                rerouted = counts[Leftover::Reroute as usize],
                reported = counts[Leftover::Report as usize],
                dropped = counts[Leftover::Drop as usize],
                "frames left on a broken connection"
            );
        }
    }
}

fn is_report(frame_type: FrameType) -> bool {
    matches!(frame_type, FrameType::DeliveryReport | FrameType::AppAck)
}

impl Shard {
    /// Routes reports and acks that found no route again every heartbeat interval, for at
    /// most [`REPORT_PATIENCE`]; then they are dropped and counted. Bounded: they come from
    /// one link's outbox and window.
    async fn retry_reports(self: Rc<Self>, mut frames: Vec<(Header, Bytes)>) {
        let started = std::time::Instant::now();
        while !frames.is_empty() && started.elapsed() < REPORT_PATIENCE {
            glommio::timer::sleep(self.config.heartbeat_interval).await;
            let mut left = Vec::new();
            for (header, payload) in frames {
                let routed = self.route(header, payload.clone(), 0, Wait::Never).await;
                match routed {
                    Err(RouteError::NoRoute | RouteError::LinkClosed) => {
                        left.push((header, payload))
                    }
                    Err(error) => self.count_drop(error.kind()),
                    Ok(()) => {}
                }
            }
            frames = left;
        }
        for _ in frames {
            self.count_drop("report_without_route");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_never_written_goes_another_way_written_data_is_only_reported_reports_always_go() {
        use FrameType::*;
        assert_eq!(leftover(Data, false), Leftover::Reroute);
        assert_eq!(leftover(DataBatch, false), Leftover::Reroute);
        // Possibly arrived: sending it again could deliver a fire-and-forget message twice.
        assert_eq!(leftover(Data, true), Leftover::Report);
        assert_eq!(leftover(DataBatch, true), Leftover::Report);
        for written in [false, true] {
            assert_eq!(leftover(DeliveryReport, written), Leftover::Reroute);
            assert_eq!(leftover(AppAck, written), Leftover::Reroute);
            for own_protocol in [
                Heartbeat,
                HeartbeatAck,
                LaneAck,
                Goodbye,
                Routing,
                Gossip,
                Raft,
                StreamData,
                StreamReport,
                StreamOpen,
                Join,
            ] {
                assert_eq!(leftover(own_protocol, written), Leftover::Drop);
            }
        }
    }
}
