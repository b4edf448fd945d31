//! Delivery reports on their way back to the sources, batched (a peer's reports arriving
//! here are `peer_reports`).
//!
//! A destination answers every Data frame with its verdict. One frame back per message would
//! double the frames a relay carries, so the api thread collects verdicts while it drains its
//! ring and sends each source one `DeliveryReports` frame per drain, in which consecutive
//! message ids with the same verdict collapse into one run. Nothing waits on a timer: a lone
//! message is reported as soon as the ring is empty. A frame the source's shard has no room
//! for stays here, still coalescing, and is offered again shortly: the api thread never waits
//! on a shard (that shard may itself be waiting for room in the api ring). Pure: the pump
//! feeds it and hands [`ReportBatch::flush`] a [`ReportSink`].
#![forbid(unsafe_code)]

use std::collections::{BTreeMap, BTreeSet};

use meshd_proto::link::{DeliveryReport, DeliveryReports};
use meshd_shards::frame::TrafficClass;
use prost::Message;

use super::recent::Verdict;

/// `count` messages from `first` on, all with `verdict`.
struct Run {
    first: u64,
    count: u32,
    verdict: Verdict,
    /// When the run started, in runs started by this batch: under overload the oldest go.
    seq: u64,
}

impl Run {
    fn report(&self) -> DeliveryReport {
        DeliveryReport {
            msg_id: self.first,
            status: self.verdict.status() as i32,
            detail: self.verdict.detail().to_owned(),
            count: self.count,
        }
    }
}

/// Runs that may wait for room in the shards' rings. A run costs ~40 bytes however many
/// messages it covers, so this bounds the batch's memory whatever the senders do.
pub(crate) const MAX_PENDING_RUNS: usize = 1 << 16;

/// Verdicts waiting to go back, by (source, traffic class).
pub(crate) struct ReportBatch {
    by_source: BTreeMap<(u64, TrafficClass), Vec<Run>>,
    verdicts: usize,
    runs: usize,
    max_runs: usize,
    next_seq: u64,
    dropped: u64,
    /// This node's generation, said in every frame (see `DeliveryReports.generation`).
    pub(crate) generation: u32,
    /// Sources whose next frame says `saturated` (a subset of `by_source`'s sources).
    saturated: BTreeSet<u64>,
}

impl Default for ReportBatch {
    fn default() -> Self {
        Self::with_bound(MAX_PENDING_RUNS)
    }
}

/// Where [`ReportBatch::flush`] sends frames: the shards' rings, without waiting.
pub(crate) trait ReportSink {
    /// Whether a frame to `source` may be taken now; false skips encoding one in vain.
    fn ready(&mut self, source: u64) -> bool;
    /// Takes a frame for `source`, or refuses it (no room): then it is offered again later.
    fn send(&mut self, source: u64, class: TrafficClass, payload: Vec<u8>) -> bool;
}

/// Room for a report's framing in the payload estimate (field tag and length).
const REPORT_OVERHEAD: usize = 3;

impl ReportBatch {
    /// A batch holding at most `max_runs` runs (at least one).
    pub(crate) fn with_bound(max_runs: usize) -> Self {
        Self {
            by_source: BTreeMap::new(),
            verdicts: 0,
            runs: 0,
            max_runs: max_runs.max(1),
            next_seq: 0,
            dropped: 0,
            generation: 0,
            saturated: BTreeSet::new(),
        }
    }

    /// Verdicts waiting to be sent.
    pub(crate) fn len(&self) -> usize {
        self.verdicts
    }

    /// Whether nothing waits.
    pub(crate) fn is_empty(&self) -> bool {
        self.runs == 0
    }

    /// Verdicts dropped to keep the bound since the last call; their senders see QUEUED, and
    /// waiting ones retransmit and get the remembered verdict.
    pub(crate) fn take_dropped(&mut self) -> u64 {
        std::mem::take(&mut self.dropped)
    }

    /// Records the verdict on `msg_id` from `source`; extends the last run when it continues it.
    pub(crate) fn push(&mut self, source: u64, class: TrafficClass, msg_id: u64, verdict: Verdict) {
        self.verdicts += 1;
        let runs = self.by_source.entry((source, class)).or_default();
        if let Some(last) = runs.last_mut() {
            let continues = last.first.checked_add(u64::from(last.count)) == Some(msg_id);
            if continues && last.verdict == verdict && last.count < u32::MAX {
                last.count += 1;
                return;
            }
        }
        runs.push(Run {
            first: msg_id,
            count: 1,
            verdict,
            seq: self.next_seq,
        });
        self.next_seq += 1;
        self.runs += 1;
        if self.runs > self.max_runs {
            self.shed();
        }
    }

    /// The next frame to `source` says its subscribers are near full. Only for a source with
    /// a run waiting (call after [`Self::push`]), so the set never outgrows the batch.
    pub(crate) fn mark_saturated(&mut self, source: u64) {
        self.saturated.insert(source);
    }

    /// Drops the oldest runs down to three quarters of the bound, so the O(runs) pass runs
    /// once per quarter bound of pushes rather than on every push of an overloaded batch.
    fn shed(&mut self) {
        let keep = self.max_runs - self.max_runs / 4;
        let excess = self.runs.saturating_sub(keep);
        if excess == 0 {
            return;
        }
        let mut seqs: Vec<u64> = self.by_source.values().flatten().map(|r| r.seq).collect();
        let (_, &mut cutoff, _) = seqs.select_nth_unstable(excess - 1);
        let (mut runs, mut verdicts) = (0, 0);
        self.by_source.retain(|_, list| {
            list.retain(|r| {
                let old = r.seq <= cutoff;
                if old {
                    runs += 1;
                    verdicts += r.count as usize;
                }
                !old
            });
            !list.is_empty()
        });
        self.runs -= runs;
        self.verdicts = self.verdicts.saturating_sub(verdicts);
        self.dropped += verdicts as u64;
    }

    /// Offers every waiting report to `sink` as frames of at most `max_payload` bytes. A
    /// source whose frame is refused keeps it and its later runs, in order, for the next
    /// call; other sources go on.
    pub(crate) fn flush(&mut self, max_payload: usize, sink: &mut impl ReportSink) {
        let (mut runs_sent, mut verdicts_sent) = (0, 0);
        let generation = self.generation;
        let saturated = &self.saturated;
        self.by_source.retain(|&(source, class), runs| {
            let mut done = 0;
            let flag = saturated.contains(&source);
            while done < runs.len() && sink.ready(source) {
                let (n, payload) = encode_chunk(&runs[done..], max_payload, generation, flag);
                if !sink.send(source, class, payload) {
                    break;
                }
                done += n;
            }
            for run in runs.drain(..done) {
                runs_sent += 1;
                verdicts_sent += run.count as usize;
            }
            !runs.is_empty()
        });
        self.runs -= runs_sent;
        self.verdicts = self.verdicts.saturating_sub(verdicts_sent);
        if !self.saturated.is_empty() {
            let waiting: BTreeSet<u64> = self.by_source.keys().map(|(source, _)| *source).collect();
            self.saturated.retain(|source| waiting.contains(source));
        }
    }

    /// Every waiting report as frames: (source, class, payload). Leaves the batch empty.
    #[cfg(test)]
    pub(crate) fn drain(&mut self, max_payload: usize) -> Vec<(u64, TrafficClass, Vec<u8>)> {
        struct Collect(Vec<(u64, TrafficClass, Vec<u8>)>);
        impl ReportSink for Collect {
            fn ready(&mut self, _: u64) -> bool {
                true
            }
            fn send(&mut self, source: u64, class: TrafficClass, payload: Vec<u8>) -> bool {
                self.0.push((source, class, payload));
                true
            }
        }
        let mut frames = Collect(Vec::new());
        self.flush(max_payload, &mut frames);
        frames.0
    }
}

/// The first runs of `runs` (at least one) that fit in `max_payload` bytes, encoded; and how
/// many they are.
fn encode_chunk(
    runs: &[Run],
    max_payload: usize,
    generation: u32,
    saturated: bool,
) -> (usize, Vec<u8>) {
    let mut chunk = DeliveryReports {
        generation,
        saturated,
        ..DeliveryReports::default()
    };
    let mut size = 0;
    for run in runs {
        let report = run.report();
        let len = report.encoded_len() + REPORT_OVERHEAD;
        if size + len > max_payload && !chunk.reports.is_empty() {
            break;
        }
        size += len;
        chunk.reports.push(report);
    }
    (chunk.reports.len(), chunk.encode_to_vec())
}

/// The message ids a run covers, `count` 0 meaning 1; `None` when they would overflow.
#[cfg(test)]
mod tests {
    use super::*;

    const DELIVERED: i32 = 5;
    const PENDING_CLIENT: i32 = 4;
    use Verdict::{Delivered, NoSubscriber};

    fn decode(payload: &[u8]) -> Vec<(u64, u32, i32)> {
        DeliveryReports::decode(payload)
            .unwrap()
            .reports
            .into_iter()
            .map(|r| (r.msg_id, r.count, r.status))
            .collect()
    }

    #[test]
    fn consecutive_ids_with_one_verdict_collapse_into_one_run() {
        let mut batch = ReportBatch::default();
        for id in 100..1100 {
            batch.push(7, TrafficClass::Client, id, Delivered);
        }
        assert_eq!(batch.len(), 1000);
        let frames = batch.drain(1 << 20);
        assert_eq!(frames.len(), 1);
        assert_eq!(decode(&frames[0].2), vec![(100, 1000, DELIVERED)]);
        assert_eq!(batch.len(), 0);
        assert!(batch.drain(1 << 20).is_empty());
    }

    #[test]
    fn a_gap_or_another_verdict_starts_a_new_run() {
        let mut batch = ReportBatch::default();
        batch.push(7, TrafficClass::Client, 1, Delivered);
        batch.push(7, TrafficClass::Client, 2, Delivered);
        batch.push(7, TrafficClass::Client, 3, NoSubscriber);
        batch.push(7, TrafficClass::Client, 5, Delivered);
        batch.push(7, TrafficClass::Client, 4, Delivered);
        let frames = batch.drain(1 << 20);
        assert_eq!(
            decode(&frames[0].2),
            vec![
                (1, 2, DELIVERED),
                (3, 1, PENDING_CLIENT),
                (5, 1, DELIVERED),
                (4, 1, DELIVERED)
            ]
        );
    }

    #[test]
    fn each_source_and_class_gets_its_own_frames() {
        let mut batch = ReportBatch::default();
        batch.push(7, TrafficClass::Client, 1, Delivered);
        batch.push(8, TrafficClass::Client, 1, Delivered);
        batch.push(7, TrafficClass::System, 2, Delivered);
        let mut frames: Vec<_> = batch
            .drain(1 << 20)
            .into_iter()
            .map(|(src, class, p)| (src, class, decode(&p)))
            .collect();
        frames.sort_by_key(|(src, class, _)| (*src, *class as u8));
        assert_eq!(frames.len(), 3);
        assert_eq!(frames[0].0, 7);
        assert_eq!(frames[2].0, 8);
    }

    #[test]
    fn frames_stay_under_the_payload_limit() {
        let mut batch = ReportBatch::default();
        // Every other id: no runs, 500 separate reports.
        for id in 0..500u64 {
            batch.push(7, TrafficClass::Client, id * 2, Delivered);
        }
        let frames = batch.drain(256);
        assert!(frames.len() > 1);
        let mut seen = 0;
        for (_, _, payload) in &frames {
            assert!(payload.len() <= 256, "{} bytes", payload.len());
            seen += decode(payload).len();
        }
        assert_eq!(seen, 500);
    }

    /// A sink with room for `room` frames.
    struct Room {
        room: usize,
        frames: Vec<(u64, Vec<(u64, u32, i32)>)>,
        asked: usize,
    }

    impl ReportSink for Room {
        fn ready(&mut self, _: u64) -> bool {
            self.room > 0
        }
        fn send(&mut self, source: u64, _: TrafficClass, payload: Vec<u8>) -> bool {
            self.asked += 1;
            if self.room == 0 {
                return false;
            }
            self.room -= 1;
            self.frames.push((source, decode(&payload)));
            true
        }
    }

    #[test]
    fn reports_without_room_stay_and_keep_coalescing_until_there_is_room() {
        let mut batch = ReportBatch::default();
        for id in 1..=3 {
            batch.push(7, TrafficClass::Client, id, Delivered);
        }
        let mut full = Room {
            room: 0,
            frames: Vec::new(),
            asked: 0,
        };
        batch.flush(1 << 20, &mut full);
        assert_eq!(
            full.asked, 0,
            "a sink that is not ready is not handed a frame"
        );
        assert_eq!(batch.len(), 3);
        assert!(!batch.is_empty());
        // Later verdicts extend the run that waits.
        batch.push(7, TrafficClass::Client, 4, Delivered);
        let mut room = Room {
            room: 1,
            frames: Vec::new(),
            asked: 0,
        };
        batch.flush(1 << 20, &mut room);
        assert_eq!(room.frames, vec![(7, vec![(1, 4, DELIVERED)])]);
        assert!(batch.is_empty());
        assert_eq!(batch.len(), 0);
    }

    #[test]
    fn a_refused_frame_keeps_its_runs_and_later_ones_in_order() {
        let mut batch = ReportBatch::default();
        // Every other id: separate runs, several frames at this payload limit.
        for id in 0..40u64 {
            batch.push(7, TrafficClass::Client, id * 2, Delivered);
        }
        let mut room = Room {
            room: 1,
            frames: Vec::new(),
            asked: 0,
        };
        batch.flush(64, &mut room);
        let first = room.frames[0].1.len();
        assert!(first < 40);
        assert_eq!(batch.len(), 40 - first);
        let rest = batch.drain(1 << 20);
        let rest = decode(&rest[0].2);
        assert_eq!(rest[0].0, (first as u64) * 2, "the next id in order");
        assert_eq!(rest.len(), 40 - first);
    }

    #[test]
    fn past_the_bound_the_oldest_runs_are_dropped_and_counted() {
        let mut batch = ReportBatch::with_bound(8);
        // Every other id: one run each.
        for id in 0..9u64 {
            batch.push(7, TrafficClass::Client, id * 2, Delivered);
        }
        // 9 runs > 8: shed to 6, the three oldest go.
        assert_eq!(batch.take_dropped(), 3);
        assert_eq!(batch.take_dropped(), 0);
        assert_eq!(batch.len(), 6);
        let frames = batch.drain(1 << 20);
        let ids: Vec<u64> = decode(&frames[0].2).iter().map(|r| r.0).collect();
        assert_eq!(ids, vec![6, 8, 10, 12, 14, 16]);
        // A source that keeps coalescing costs no room.
        for id in 0..100_000u64 {
            batch.push(8, TrafficClass::Client, id, Delivered);
        }
        assert_eq!(batch.take_dropped(), 0);
        assert_eq!(batch.len(), 100_000);
    }
}
