//! A peer's delivery reports arriving here, applied to the tracker with hostile input bounded:
//! the destination's verdicts ([`apply_reports`]) and a relay's drop notices
//! ([`apply_relay_drops`]). Pure.
#![forbid(unsafe_code)]

use std::{ops::Range, sync::Arc};

use meshd_proto::{
    link::{DeliveryReport, DeliveryReports},
    mesh::MessageStatus,
};

use super::tracker::{MessageTracker, StatusUpdate};

pub(crate) fn run_ids(report: &DeliveryReport) -> Option<Range<u64>> {
    let end = report.msg_id.checked_add(u64::from(report.count.max(1)))?;
    Some(report.msg_id..end)
}

/// Longest detail kept from a peer's report or ack; the rest is cut (at a char boundary).
/// A detail explains a status to an operator; a peer must not make it a way to fill memory.
pub(crate) const MAX_DETAIL_BYTES: usize = 256;

/// A peer-supplied detail, cut to [`MAX_DETAIL_BYTES`], ready to be shared by every message
/// it applies to.
pub(crate) fn cap_detail(mut detail: String) -> Arc<str> {
    if detail.len() > MAX_DETAIL_BYTES {
        // A char is at most 4 bytes, so a boundary is at most 3 steps back.
        let end = (0..=MAX_DETAIL_BYTES)
            .rev()
            .find(|&i| detail.is_char_boundary(i))
            .unwrap_or(0);
        detail.truncate(end);
    }
    detail.into()
}

/// What applying a peer's reports came to.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Applied {
    /// Messages whose status changed.
    pub(crate) changed: usize,
    /// Tracked ids visited: never more than the tracker holds, whatever the frame says.
    pub(crate) walked: u64,
    /// Runs skipped: outside the tracked ids, overflowing, or past the frame's budget.
    pub(crate) skipped: usize,
}

impl Applied {
    /// The part of a run (`None`: its ids overflow) inside the `tracked` ids, if the frame's
    /// `budget` still covers it (taken off it); else the run is counted skipped.
    fn walk(
        &mut self,
        run: Option<Range<u64>>,
        tracked: &Range<u64>,
        budget: &mut u64,
    ) -> Option<Range<u64>> {
        let ids = run
            .map(|ids| ids.start.max(tracked.start)..ids.end.min(tracked.end))
            .filter(|ids| !ids.is_empty() && ids.end - ids.start <= *budget);
        match &ids {
            Some(ids) => {
                *budget -= ids.end - ids.start;
                self.walked += ids.end - ids.start;
            }
            None => self.skipped += 1,
        }
        ids
    }
}

/// Applies a `DeliveryReports` frame from `from` to `tracker`.
///
/// The frame is the peer's word and may be hostile: a run is clipped to the tracked ids before
/// anything else is done with it (a run of 2^64 ids costs what the tracker holds, one outside
/// costs nothing), its detail is cut to [`MAX_DETAIL_BYTES`] once and shared by the run's
/// messages, and the frame as a whole may walk each tracked id once: an honest frame's runs
/// cover distinct ids, so only overlapping runs (a frame that repeats one huge run) reach
/// that budget, and their rest is skipped.
pub(crate) fn apply_reports(
    tracker: &mut MessageTracker,
    from: u64,
    frame: DeliveryReports,
    timestamp_ms: u64,
) -> Applied {
    let tracked = tracker.tracked_ids();
    let mut budget = tracked.end - tracked.start;
    let mut applied = Applied::default();
    for report in frame.reports {
        let raw = run_ids(&report);
        if let Some(raw) = raw.clone()
            && raw.start < tracked.start
            && budget > 0
        {
            // Open waiting sends older than the ring are pinned; a run may answer them.
            let update = StatusUpdate {
                status: MessageStatus::try_from(report.status)
                    .unwrap_or(MessageStatus::Unspecified),
                detail: cap_detail(report.detail.clone()),
                timestamp_ms,
            };
            applied.changed += tracker.update_pinned(raw, Some(from), &update, &mut budget);
        }
        let Some(ids) = applied.walk(raw, &tracked, &mut budget) else {
            continue;
        };
        let update = StatusUpdate {
            status: MessageStatus::try_from(report.status).unwrap_or(MessageStatus::Unspecified),
            detail: cap_detail(report.detail),
            timestamp_ms,
        };
        applied.changed += tracker.update_range(ids, Some(from), &update);
    }
    applied
}

/// Applies a relay's `DeliveryReports` frame (`relay_for` set): `relay` dropped these
/// messages on their way to `frame.relay_for`. Whatever status a run claims, it is read as
/// PENDING_NODE with a detail naming the relay (a relay cannot say a message was delivered),
/// and only fire-and-forget messages to that node still QUEUED take it
/// ([`MessageTracker::relay_dropped`]). Bounded like [`apply_reports`]: runs are clipped to
/// the tracked ids and the frame may walk each tracked id once.
pub(crate) fn apply_relay_drops(
    tracker: &mut MessageTracker,
    relay: u64,
    frame: DeliveryReports,
    timestamp_ms: u64,
) -> Applied {
    let tracked = tracker.tracked_ids();
    let mut budget = tracked.end - tracked.start;
    let mut applied = Applied::default();
    for report in frame.reports {
        let Some(ids) = applied.walk(run_ids(&report), &tracked, &mut budget) else {
            continue;
        };
        let reason = cap_detail(report.detail);
        let update = StatusUpdate {
            status: MessageStatus::PendingNode,
            detail: format!("dropped at relay {relay}: {reason}").into(),
            timestamp_ms,
        };
        applied.changed += tracker.relay_dropped(ids, frame.relay_for, &update);
    }
    applied
}

#[cfg(test)]
mod tests {
    use super::*;

    const DELIVERED: i32 = 5;
    const PENDING_CLIENT: i32 = 4;

    fn tracker_for(dst: u64, n: usize) -> MessageTracker {
        let mut tracker = MessageTracker::new(n, 1000);
        for _ in 0..n {
            tracker.insert(
                dst,
                false,
                StatusUpdate {
                    status: MessageStatus::Queued,
                    detail: "".into(),
                    timestamp_ms: 0,
                },
            );
        }
        tracker
    }

    fn peer_report(msg_id: u64, count: u32, detail: String) -> DeliveryReport {
        DeliveryReport {
            msg_id,
            status: PENDING_CLIENT,
            detail,
            count,
        }
    }

    #[test]
    fn a_peers_detail_is_cut_at_a_char_boundary_and_shared_by_the_run() {
        let mut tracker = tracker_for(7, 10);
        // 'é' is two bytes; one ASCII byte first puts byte 256 inside a char.
        let long = format!("x{}", "é".repeat(10_000));
        let frame = DeliveryReports {
            reports: vec![peer_report(1000, 10, long.clone())],
            ..DeliveryReports::default()
        };
        let applied = apply_reports(&mut tracker, 7, frame, 1);
        assert_eq!(applied.changed, 10);
        let (first, _) = tracker.get(1000).unwrap();
        let (last, _) = tracker.get(1009).unwrap();
        assert_eq!(first.detail.len(), MAX_DETAIL_BYTES - 1);
        assert!(long.starts_with(&*first.detail));
        assert!(Arc::ptr_eq(&first.detail, &last.detail), "one copy per run");
        assert_eq!(&*cap_detail("short".into()), "short");
        assert_eq!(cap_detail("y".repeat(300)).len(), MAX_DETAIL_BYTES);
    }

    #[test]
    fn a_hostile_frame_costs_what_the_tracker_holds_not_what_it_claims() {
        let mut tracker = tracker_for(7, 100);
        let huge = "z".repeat(1 << 16);
        let mut reports = vec![
            // Entirely outside the tracked ids, with a huge detail: skipped before any work.
            peer_report(5000, u32::MAX, huge.clone()),
            // Overflowing u64.
            peer_report(u64::MAX - 1, u32::MAX, huge.clone()),
        ];
        // The same run over every tracked id (and 4 billion more), 10 000 times.
        let detail = "z".repeat(300);
        reports.extend((0..10_000).map(|_| peer_report(0, u32::MAX, detail.clone())));
        let started = std::time::Instant::now();
        let applied = apply_reports(
            &mut tracker,
            7,
            DeliveryReports {
                reports,
                ..DeliveryReports::default()
            },
            1,
        );
        assert_eq!(applied.walked, 100, "each tracked id walked once");
        assert_eq!(applied.changed, 100);
        assert_eq!(applied.skipped, 2 + 9_999);
        assert!(started.elapsed() < std::time::Duration::from_secs(2));
        // From a node that is not the messages' destination: walked, nothing changes.
        let mut tracker = tracker_for(7, 100);
        let frame = DeliveryReports {
            reports: vec![peer_report(0, u32::MAX, String::new())],
            ..DeliveryReports::default()
        };
        assert_eq!(apply_reports(&mut tracker, 8, frame, 1).changed, 0);
        assert_eq!(tracker.get(1000).unwrap().0.status, MessageStatus::Queued);
    }

    #[test]
    fn a_relays_drop_notice_ends_queued_fire_and_forget_messages_pending_node_and_no_more() {
        let queued = || StatusUpdate {
            status: MessageStatus::Queued,
            detail: "".into(),
            timestamp_ms: 0,
        };
        // Ten fire-and-forget messages to 7, ids 1000..1010.
        let mut tracker = MessageTracker::new(100, 1000);
        for _ in 0..10 {
            tracker.insert(7, false, queued());
        }
        // A waiting send (sent again on its own) and a message to another node among them.
        let waiting = tracker.insert(7, false, queued());
        tracker.begin_waiting(waiting);
        let elsewhere = tracker.insert(8, false, queued());
        // Message 1001 was already delivered.
        let delivered = DeliveryReports {
            reports: vec![DeliveryReport {
                msg_id: 1001,
                status: DELIVERED,
                detail: String::new(),
                count: 1,
            }],
            ..DeliveryReports::default()
        };
        assert_eq!(apply_reports(&mut tracker, 7, delivered, 1).changed, 1);
        // Relay 3 says it dropped 1000..1012 on their way to 7, and claims "delivered".
        let notice = DeliveryReports {
            reports: vec![DeliveryReport {
                msg_id: 1000,
                status: DELIVERED,
                detail: "its next hop stayed congested".into(),
                count: 12,
            }],
            relay_for: 7,
            ..DeliveryReports::default()
        };
        let applied = apply_relay_drops(&mut tracker, 3, notice, 2);
        assert_eq!(applied.changed, 9, "the ten to 7 but the delivered one");
        let (dropped, _) = tracker.get(1000).unwrap();
        assert_eq!(dropped.status, MessageStatus::PendingNode);
        assert_eq!(
            &*dropped.detail,
            "dropped at relay 3: its next hop stayed congested"
        );
        assert_eq!(
            tracker.get(1001).unwrap().0.status,
            MessageStatus::Delivered
        );
        assert_eq!(
            tracker.get(waiting).unwrap().0.status,
            MessageStatus::Queued
        );
        assert_eq!(
            tracker.get(elsewhere).unwrap().0.status,
            MessageStatus::Queued
        );
        // A relay that lied is overruled by the destination's own word.
        let late = DeliveryReports {
            reports: vec![DeliveryReport {
                msg_id: 1002,
                status: DELIVERED,
                detail: String::new(),
                count: 1,
            }],
            ..DeliveryReports::default()
        };
        assert_eq!(apply_reports(&mut tracker, 7, late, 3).changed, 1);
        assert_eq!(
            tracker.get(1002).unwrap().0.status,
            MessageStatus::Delivered
        );
        // Bounded like the destination's reports: a run of 4 billion ids walks what is held.
        let hostile = DeliveryReports {
            reports: (0..1000)
                .map(|_| peer_report(0, u32::MAX, String::new()))
                .collect(),
            relay_for: 7,
            ..DeliveryReports::default()
        };
        let applied = apply_relay_drops(&mut tracker, 3, hostile, 4);
        assert_eq!(applied.walked, 12);
        assert_eq!(applied.skipped, 999);
    }

    #[test]
    fn run_ids_read_count_zero_as_one_and_refuse_overflow() {
        let report = |msg_id, count| DeliveryReport {
            msg_id,
            status: DELIVERED,
            detail: String::new(),
            count,
        };
        assert_eq!(run_ids(&report(9, 0)), Some(9..10));
        assert_eq!(run_ids(&report(9, 3)), Some(9..12));
        assert_eq!(run_ids(&report(u64::MAX, 2)), None);
    }
}
