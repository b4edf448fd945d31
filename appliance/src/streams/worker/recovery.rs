//! Where a worker's streams come from: the store at start, and again after a commit the
//! store refused (the worker then holds no state, ends its subscriptions and retries every
//! `RELOAD_RETRY` until the store answers).

use super::*;

impl Worker {
    /// (Re)builds every stream from the database. On failure the worker is left with no
    /// streams (never with state the store may not hold).
    pub(super) fn load(&mut self) -> Result<(), BackendError> {
        let records = self.db.load();
        self.sources.clear();
        self.targets.clear();
        self.order_dirty = true;
        self.unsent.clear();
        self.held_bytes = 0;
        for sub in self.subs.values_mut() {
            sub.unacked_bytes = 0;
        }
        self.reassembler = Reassembler::new(reassembly_limits(&self.config));
        for (id, record) in records? {
            match record.role {
                Role::Source => {
                    let group = self.join_group(&record);
                    // This incarnation now produces the stream (a new producer epoch); the
                    // open is written again in case the last incarnation's was lost.
                    self.groups.propose(
                        group,
                        [
                            open_op(id, &record),
                            Op::Epoch {
                                stream: id,
                                incarnation: self.groups.incarnation(),
                            },
                        ],
                    );
                    let core = Source::restore(
                        &record.targets,
                        Completion::from_quorum(record.quorum),
                        ack_policy(record.ack_on_source),
                        self.source_config(),
                        record.high,
                        record.low,
                        record.closed.is_some(),
                    );
                    self.sources.insert(
                        id,
                        SourceStream {
                            core,
                            group,
                            record,
                            waiting: Vec::new(),
                            refused: None,
                            dirty: false,
                        },
                    );
                }
                Role::Target => {
                    let mut inbox = Inbox::restore(self.inbox_config(), record.high, record.low);
                    if let Some(last) = record.closed {
                        inbox.on_closed(last);
                    }
                    let group = self.join_group(&record);
                    self.targets.insert(
                        id,
                        TargetStream {
                            inbox,
                            group,
                            record,
                            sub: None,
                            unacked: VecDeque::new(),
                            dirty: false,
                        },
                    );
                }
            }
        }
        let ids: Vec<u128> = self.targets.keys().copied().collect();
        for id in ids {
            self.attach(id);
        }
        tracing::info!(
            sources = self.sources.len(),
            targets = self.targets.len(),
            "stream worker loaded"
        );
        Ok(())
    }

    /// The group of a stream's participants, started here if needed. A stream whose group
    /// cannot be had (`streams.max_groups`) keeps working on its own reports but never
    /// releases its outbox: refused at open, this only happens to streams of an earlier run
    /// when the limit was lowered.
    pub(super) fn join_group(&self, record: &StreamRecord) -> u64 {
        let mut nodes = record.targets.clone();
        nodes.push(record.source);
        match self.groups.ensure(&nodes) {
            Ok(group) => group,
            Err(e) => {
                tracing::error!(error = %e, "a stream's group could not be started");
                crate::streams::group::group_id(&nodes)
            }
        }
    }

    /// Rebuilds the streams from the store; on failure, tries again `RELOAD_RETRY` later.
    pub(super) fn reload(&mut self) {
        match self.load() {
            Ok(()) => {
                if self.unloaded.take().is_some() {
                    tracing::info!("stream storage answers again; streams reloaded");
                }
            }
            Err(e) => {
                if self.unloaded.is_none() {
                    tracing::error!(error = %e, "reloading the streams failed; retrying");
                }
                self.unloaded = Some((Instant::now() + RELOAD_RETRY, e.to_string()));
            }
        }
    }

    /// Ends the subscriptions in `farewells` (UNAVAILABLE), keeping those whose queue is full.
    pub(super) fn say_farewells(&mut self) {
        self.farewells.retain(|tx| {
            let status = Status::unavailable(
                "stream storage failed: subscribe again (unacknowledged messages come again)",
            );
            matches!(
                tx.try_send(Err(status)),
                Err(mpsc::error::TrySendError::Full(_))
            )
        });
    }
}
