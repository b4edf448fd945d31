//! Delivery reports on their way back to the sources, batched.
//!
//! A destination answers every Data frame with its verdict. One frame back per message would
//! double the frames a relay carries, so the api thread collects verdicts while it drains its
//! ring and sends each source one `DeliveryReports` frame per drain, in which consecutive
//! message ids with the same verdict collapse into one run. Nothing waits on a timer: a lone
//! message is reported as soon as the ring is empty. Pure: the pump feeds it and sends what
//! [`ReportBatch::drain`] hands back.
#![forbid(unsafe_code)]

use std::collections::BTreeMap;

use meshd_proto::link::{DeliveryReport, DeliveryReports};
use meshd_shards::frame::TrafficClass;
use prost::Message;

use super::recent::Verdict;

/// `count` messages from `first` on, all with `verdict`.
struct Run {
    first: u64,
    count: u32,
    verdict: Verdict,
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

/// Verdicts waiting to go back, by (source, traffic class).
#[derive(Default)]
pub(crate) struct ReportBatch {
    by_source: BTreeMap<(u64, TrafficClass), Vec<Run>>,
    verdicts: usize,
}

/// Room for a report's framing in the payload estimate (field tag and length).
const REPORT_OVERHEAD: usize = 3;

impl ReportBatch {
    /// Verdicts collected since the last drain.
    pub(crate) fn len(&self) -> usize {
        self.verdicts
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
        });
    }

    /// Every collected report as frames payloads of at most `max_payload` bytes each:
    /// (source, class, payload). Leaves the batch empty.
    pub(crate) fn drain(&mut self, max_payload: usize) -> Vec<(u64, TrafficClass, Vec<u8>)> {
        self.verdicts = 0;
        let mut frames = Vec::new();
        for ((source, class), runs) in std::mem::take(&mut self.by_source) {
            let mut chunk = DeliveryReports::default();
            let mut size = 0;
            for run in runs {
                let run = run.report();
                let len = run.encoded_len() + REPORT_OVERHEAD;
                if size + len > max_payload && !chunk.reports.is_empty() {
                    frames.push((source, class, std::mem::take(&mut chunk).encode_to_vec()));
                    size = 0;
                }
                size += len;
                chunk.reports.push(run);
            }
            if !chunk.reports.is_empty() {
                frames.push((source, class, chunk.encode_to_vec()));
            }
        }
        frames
    }
}

/// The message ids a run covers, `count` 0 meaning 1; `None` when they would overflow.
pub(crate) fn run_ids(report: &DeliveryReport) -> Option<std::ops::Range<u64>> {
    let end = report.msg_id.checked_add(u64::from(report.count.max(1)))?;
    Some(report.msg_id..end)
}

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
