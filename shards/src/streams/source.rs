//! The source side of a stream: sequencing, credits, retransmission, ack and release points.
//!
//! Drain order for a caller's turn: feed inputs (`publish`, `on_report`, `on_durable`), then
//! `handle_timeout(now)`, then `poll_open` until `None`, then `poll_transmit` until `None`,
//! then read `acked()` / `committed()` / `releasable()`.
#![forbid(unsafe_code)]

use super::{Completion, Report, Seq};

/// When the producer hears that a message is safe.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AckPolicy {
    /// Once the source's outbox holds it durably.
    Source,
    /// Once the source's outbox and the inboxes of the targets the completion policy needs
    /// hold it durably (like a replicated stream's acknowledgement).
    Targets,
}

/// Limits of one source stream.
#[derive(Clone, Copy, Debug)]
pub struct SourceConfig {
    /// Most messages published but not yet released (processed by every target).
    pub max_outstanding: u64,
    /// A target whose `received` has not moved for this long while messages are in flight is
    /// sent them again, from its `received + 1` (go-back-N).
    pub retransmit_ms: u64,
    /// How often a target that has not answered is told about the stream again.
    pub open_retry_ms: u64,
}

impl Default for SourceConfig {
    fn default() -> Self {
        Self {
            max_outstanding: 65_536,
            retransmit_ms: 400,
            open_retry_ms: 250,
        }
    }
}

/// What a publish became.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Publish {
    /// A new message with this seq: store it, then call [`Source::on_durable`].
    New(Seq),
    /// The producer sent this seq before (a retry): nothing to store, answer as for the first.
    Duplicate(Seq),
}

/// Why a publish was refused; nothing changed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PublishError {
    /// Too many messages wait for their targets.
    #[error("{outstanding} messages are outstanding (the limit); wait for the targets")]
    Full {
        /// Messages published and not yet released.
        outstanding: u64,
    },
    /// The producer claimed a seq past the next one.
    #[error("seq {claimed} claimed but the next seq is {expected}")]
    Gap {
        /// What was claimed.
        claimed: Seq,
        /// The next seq of the stream.
        expected: Seq,
    },
    /// Seq 0 is never a message.
    #[error("seq 0 is not a message")]
    Zero,
    /// The stream was closed.
    #[error("the stream is closed")]
    Closed,
}

/// Why a report was ignored; nothing changed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ReportError {
    /// The node is not a target of this stream.
    #[error("node {0} is not a target of this stream")]
    NotATarget(u64),
    /// The report claims what cannot be true.
    #[error("bogus report from node {node}: {why}")]
    Bogus {
        /// Who sent it.
        node: u64,
        /// What is wrong.
        why: &'static str,
    },
}

#[derive(Clone, Debug)]
struct Peer {
    node: u64,
    report: Report,
    /// Has answered since this source (re)started: it knows the stream.
    heard: bool,
    /// The next seq to send it.
    next_send: Seq,
    /// When its `received` last moved or sending to it last started from idle.
    progress_at: u64,
    /// When it was last told about the stream.
    opened_at: Option<u64>,
}

/// One stream at its source.
#[derive(Clone, Debug)]
pub struct Source {
    completion: Completion,
    ack: AckPolicy,
    config: SourceConfig,
    peers: Vec<Peer>,
    /// The highest seq given out.
    last: Seq,
    /// Every seq up to here is durable in the outbox.
    durable: Seq,
    /// Every seq up to here is gone from the outbox.
    released: Seq,
    closed: bool,
    /// Round-robin start of `poll_transmit`.
    turn: usize,
}

impl Source {
    /// A new stream (targets already checked: distinct, 1..=`MAX_TARGETS`).
    pub fn new(
        targets: &[u64],
        completion: Completion,
        ack: AckPolicy,
        config: SourceConfig,
    ) -> Self {
        Self::restore(targets, completion, ack, config, 0, 0, false)
    }

    /// A stream as its outbox held it after a restart: every seq in `released+1..=last` is
    /// durable and unreleased.
    pub fn restore(
        targets: &[u64],
        completion: Completion,
        ack: AckPolicy,
        config: SourceConfig,
        last: Seq,
        released: Seq,
        closed: bool,
    ) -> Self {
        assert!(released <= last, "released {released} past last {last}");
        let peers = targets
            .iter()
            .map(|&node| Peer {
                node,
                report: Report {
                    received: released,
                    processed: released,
                    window: 0,
                },
                heard: false,
                next_send: released + 1,
                progress_at: 0,
                opened_at: None,
            })
            .collect();
        Self {
            completion,
            ack,
            config,
            peers,
            last,
            durable: last,
            released,
            closed,
            turn: 0,
        }
    }

    /// The stream's targets.
    pub fn targets(&self) -> impl Iterator<Item = u64> + '_ {
        self.peers.iter().map(|p| p.node)
    }

    /// The completion policy.
    pub const fn completion(&self) -> Completion {
        self.completion
    }

    /// The highest seq given out.
    pub const fn last(&self) -> Seq {
        self.last
    }

    /// Every seq up to here is gone from the outbox.
    pub const fn released(&self) -> Seq {
        self.released
    }

    /// Whether the stream was closed.
    pub const fn is_closed(&self) -> bool {
        self.closed
    }

    /// How many more messages may be published now.
    pub fn room(&self) -> u64 {
        self.config
            .max_outstanding
            .saturating_sub(self.last - self.released)
    }

    /// Takes the next message; `claimed` is the seq the producer says it is (its retry key),
    /// `None` for "the next one".
    pub fn publish(&mut self, claimed: Option<Seq>) -> Result<Publish, PublishError> {
        if let Some(seq) = claimed {
            if seq == 0 {
                return Err(PublishError::Zero);
            }
            if seq <= self.last {
                return Ok(Publish::Duplicate(seq));
            }
            if seq > self.last + 1 {
                return Err(PublishError::Gap {
                    claimed: seq,
                    expected: self.last + 1,
                });
            }
        }
        if self.closed {
            return Err(PublishError::Closed);
        }
        if self.room() == 0 {
            return Err(PublishError::Full {
                outstanding: self.last - self.released,
            });
        }
        self.last += 1;
        Ok(Publish::New(self.last))
    }

    /// Every seq up to `seq` is durable in the outbox.
    pub fn on_durable(&mut self, seq: Seq) {
        assert!(seq <= self.last, "durable {seq} past last {}", self.last);
        self.durable = self.durable.max(seq);
    }

    /// No more publishes; the stream ends once every target processed everything.
    pub fn close(&mut self) {
        self.closed = true;
    }

    /// Whether the stream is closed and fully released.
    pub fn is_finished(&self) -> bool {
        self.closed && self.released == self.last
    }

    /// A target's report. Marks only move forward (reports may arrive out of order).
    pub fn on_report(&mut self, from: u64, report: Report, now: u64) -> Result<(), ReportError> {
        let last = self.last;
        let peer = self
            .peers
            .iter_mut()
            .find(|p| p.node == from)
            .ok_or(ReportError::NotATarget(from))?;
        let bogus = |why| ReportError::Bogus { node: from, why };
        if report.processed > report.received {
            return Err(bogus("processed past received"));
        }
        if report.received > last {
            return Err(bogus("received a seq never published"));
        }
        if report.window as u64 > self.config.max_outstanding {
            return Err(bogus("window larger than any stream holds"));
        }
        if report.received > peer.report.received {
            peer.progress_at = now;
        }
        peer.report.received = peer.report.received.max(report.received);
        peer.report.processed = peer.report.processed.max(report.processed);
        peer.report.window = report.window;
        if !peer.heard {
            peer.heard = true;
            peer.progress_at = now;
            // It keeps what it stored: send from there.
            peer.next_send = peer.report.received + 1;
        }
        peer.next_send = peer.next_send.max(peer.report.received + 1);
        Ok(())
    }

    /// Go-back-N for targets whose `received` stalled while messages were in flight.
    pub fn handle_timeout(&mut self, now: u64) {
        for peer in &mut self.peers {
            let in_flight = peer.next_send > peer.report.received + 1;
            if in_flight && now.saturating_sub(peer.progress_at) >= self.config.retransmit_ms {
                peer.next_send = peer.report.received + 1;
                peer.progress_at = now;
            }
        }
    }

    /// The next target to tell about the stream (it has not answered yet).
    pub fn poll_open(&mut self, now: u64) -> Option<u64> {
        let retry = self.config.open_retry_ms;
        let peer = self
            .peers
            .iter_mut()
            .find(|p| !p.heard && p.opened_at.is_none_or(|at| now.saturating_sub(at) >= retry))?;
        peer.opened_at = Some(now);
        Some(peer.node)
    }

    /// Every target that has not answered is told again at the next `poll_open` (it lost
    /// the stream, or the source restarted).
    pub fn reopen(&mut self) {
        for peer in &mut self.peers {
            peer.opened_at = None;
        }
    }

    /// The next (target, seq) to send: durable, within the target's credit. Targets take
    /// turns, so one with a large window does not starve the others.
    pub fn poll_transmit(&mut self, now: u64) -> Option<(u64, Seq)> {
        let n = self.peers.len();
        for i in 0..n {
            let index = (self.turn + i) % n;
            let peer = &mut self.peers[index];
            let seq = peer.next_send;
            if peer.heard && seq <= self.durable && seq <= peer.report.limit() {
                if seq == peer.report.received + 1 {
                    // From idle: the retransmission clock starts now.
                    peer.progress_at = now;
                }
                peer.next_send += 1;
                self.turn = (index + 1) % n;
                debug_assert!(seq > self.released, "sending released seq {seq}");
                return Some((peer.node, seq));
            }
        }
        None
    }

    /// `seq` (given by `poll_transmit` for `node`) could not be sent now: it and what followed
    /// it for `node` are sent again by later `poll_transmit`s.
    pub fn resend_from(&mut self, node: u64, seq: Seq) {
        if let Some(peer) = self.peers.iter_mut().find(|p| p.node == node) {
            peer.next_send = peer.next_send.min(seq).max(peer.report.received + 1);
        }
    }

    /// The earliest time `handle_timeout` or `poll_open` has something to do.
    pub fn next_timeout(&self) -> Option<u64> {
        self.peers
            .iter()
            .filter_map(|p| {
                if !p.heard {
                    Some(p.opened_at.map_or(0, |at| at + self.config.open_retry_ms))
                } else if p.next_send > p.report.received + 1 {
                    Some(p.progress_at + self.config.retransmit_ms)
                } else {
                    None
                }
            })
            .min()
    }

    /// Every seq up to here may be acknowledged to the producer.
    pub fn acked(&self) -> Seq {
        match self.ack {
            AckPolicy::Source => self.durable,
            AckPolicy::Targets => self.durable.min(
                self.completion
                    .reached(self.peers.iter().map(|p| p.report.received)),
            ),
        }
    }

    /// Every seq up to here is committed: processed by the targets the policy needs.
    pub fn committed(&self) -> Seq {
        self.completion
            .reached(self.peers.iter().map(|p| p.report.processed))
    }

    /// Every seq up to here was processed by every target: the outbox may let it go.
    pub fn releasable(&self) -> Seq {
        self.peers
            .iter()
            .map(|p| p.report.processed)
            .min()
            .unwrap_or(self.released)
            .max(self.released)
    }

    /// The outbox deleted every seq up to `seq`.
    pub fn on_released(&mut self, seq: Seq) {
        assert!(
            seq <= self.releasable(),
            "released {seq} before every target processed it"
        );
        self.released = self.released.max(seq);
    }

    /// Invariants, for tests and the simulator.
    pub fn check_invariants(&self) {
        assert!(self.released <= self.durable && self.durable <= self.last);
        for p in &self.peers {
            assert!(p.report.processed <= p.report.received);
            assert!(p.report.received <= self.last);
            assert!(p.next_send > p.report.received);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source(targets: &[u64], completion: Completion, ack: AckPolicy) -> Source {
        Source::new(targets, completion, ack, SourceConfig::default())
    }

    fn report(received: Seq, processed: Seq, window: u32) -> Report {
        Report {
            received,
            processed,
            window,
        }
    }

    fn drain(s: &mut Source, now: u64) -> Vec<(u64, Seq)> {
        std::iter::from_fn(|| s.poll_transmit(now)).collect()
    }

    #[test]
    fn a_retried_publish_is_a_duplicate_and_a_gap_is_refused() {
        let mut s = source(&[2], Completion::All, AckPolicy::Source);
        assert_eq!(s.publish(None), Ok(Publish::New(1)));
        assert_eq!(s.publish(Some(2)), Ok(Publish::New(2)));
        assert_eq!(s.publish(Some(1)), Ok(Publish::Duplicate(1)));
        assert_eq!(
            s.publish(Some(5)),
            Err(PublishError::Gap {
                claimed: 5,
                expected: 3
            })
        );
        assert_eq!(s.publish(Some(0)), Err(PublishError::Zero));
        s.close();
        assert_eq!(s.publish(None), Err(PublishError::Closed));
        assert_eq!(s.publish(Some(2)), Ok(Publish::Duplicate(2)));
        s.check_invariants();
    }

    #[test]
    fn nothing_is_sent_before_it_is_durable_and_the_target_has_answered() {
        let mut s = source(&[2], Completion::All, AckPolicy::Source);
        s.publish(None).unwrap();
        s.publish(None).unwrap();
        assert_eq!(s.poll_open(0), Some(2));
        assert_eq!(s.poll_open(1), None, "told once per retry period");
        assert_eq!(drain(&mut s, 0), vec![]);
        s.on_report(2, report(0, 0, 10), 5).unwrap();
        assert_eq!(drain(&mut s, 5), vec![], "not durable yet");
        s.on_durable(2);
        assert_eq!(drain(&mut s, 5), vec![(2, 1), (2, 2)]);
        assert_eq!(s.acked(), 2, "AckPolicy::Source acks on the outbox's fsync");
        s.check_invariants();
    }

    #[test]
    fn credit_limits_what_is_in_flight_and_stalls_resend_from_received() {
        let mut s = source(&[2], Completion::All, AckPolicy::Targets);
        for _ in 0..10 {
            s.publish(None).unwrap();
        }
        s.on_durable(10);
        s.on_report(2, report(0, 0, 3), 0).unwrap();
        assert_eq!(drain(&mut s, 0), vec![(2, 1), (2, 2), (2, 3)]);
        assert_eq!(s.acked(), 0, "no target holds anything yet");
        s.on_report(2, report(2, 1, 3), 10).unwrap();
        assert_eq!(s.acked(), 2);
        assert_eq!(
            drain(&mut s, 10),
            vec![(2, 4)],
            "limit is processed 1 + window 3"
        );
        s.handle_timeout(10 + 399);
        assert_eq!(drain(&mut s, 409), vec![]);
        s.handle_timeout(10 + 400);
        assert_eq!(
            drain(&mut s, 410),
            vec![(2, 3), (2, 4)],
            "go back to received + 1"
        );
        s.check_invariants();
    }

    #[test]
    fn what_could_not_be_sent_is_sent_again_in_order() {
        let mut s = source(&[2], Completion::All, AckPolicy::Source);
        for _ in 0..4 {
            s.publish(None).unwrap();
        }
        s.on_durable(4);
        s.on_report(2, report(0, 0, 10), 0).unwrap();
        assert_eq!(drain(&mut s, 0).len(), 4);
        s.resend_from(2, 3);
        assert_eq!(drain(&mut s, 0), vec![(2, 3), (2, 4)]);
        s.resend_from(9, 1);
        s.check_invariants();
    }

    #[test]
    fn release_waits_for_every_target_while_commit_follows_the_quorum() {
        let mut s = source(&[2, 3, 4], Completion::Quorum(2), AckPolicy::Targets);
        for _ in 0..5 {
            s.publish(None).unwrap();
        }
        s.on_durable(5);
        s.on_report(2, report(5, 5, 8), 0).unwrap();
        s.on_report(3, report(4, 3, 8), 0).unwrap();
        s.on_report(4, report(1, 0, 8), 0).unwrap();
        assert_eq!(s.acked(), 4);
        assert_eq!(s.committed(), 3);
        assert_eq!(s.releasable(), 0);
        s.on_report(4, report(5, 2, 8), 1).unwrap();
        assert_eq!(s.releasable(), 2);
        s.on_released(2);
        assert_eq!(s.room(), SourceConfig::default().max_outstanding - 3);
        s.check_invariants();
    }

    #[test]
    fn bogus_and_stale_reports_change_nothing() {
        let mut s = source(&[2], Completion::All, AckPolicy::Targets);
        s.publish(None).unwrap();
        s.on_durable(1);
        assert_eq!(
            s.on_report(9, report(0, 0, 1), 0),
            Err(ReportError::NotATarget(9))
        );
        assert!(
            s.on_report(2, report(7, 0, 1), 0).is_err(),
            "never published"
        );
        assert!(
            s.on_report(2, report(0, 1, 1), 0).is_err(),
            "processed > received"
        );
        assert!(s.on_report(2, report(0, 0, u32::MAX), 0).is_err());
        s.on_report(2, report(1, 1, 4), 0).unwrap();
        s.on_report(2, report(0, 0, 4), 1).unwrap();
        assert_eq!(
            (s.acked(), s.committed()),
            (1, 1),
            "an old report moves nothing back"
        );
        s.check_invariants();
    }

    #[test]
    fn a_restored_source_resends_what_each_target_lacks() {
        let mut s = Source::restore(
            &[2, 3],
            Completion::All,
            AckPolicy::Targets,
            SourceConfig::default(),
            6,
            2,
            false,
        );
        assert_eq!(s.poll_open(0), Some(2));
        assert_eq!(s.poll_open(0), Some(3));
        s.on_report(2, report(6, 4, 10), 0).unwrap();
        s.on_report(3, report(3, 3, 10), 0).unwrap();
        assert_eq!(drain(&mut s, 0), vec![(3, 4), (3, 5), (3, 6)]);
        assert_eq!(s.releasable(), 3);
        s.check_invariants();
    }
}
