//! Data this node originates that has not left its shard yet, per destination, as every
//! thread sees it: bytes are added when the api hands a frame to a shard's send ring
//! ([`crate::handle::ShardHandle`]) and released when the frame leaves the send task (into an
//! outbox or another shard's fwd ring) or fails.
//!
//! A shard's send task never waits on one destination: a frame whose next hop has no room is
//! parked in that destination's queue on the shard (`shard::parked`), and the frames after it
//! for other destinations go on. The api thread reads this gauge before it hands a shard the
//! next frame for a destination: past [`PER_DESTINATION_BYTES`] in flight, the caller waits
//! (backpressure to `core` for that destination only) until some leave or the wait limit
//! passes. So a peer that stops reading slows the callers sending to it, and nobody else, and
//! no destination has more than about that much queued on its way out of this node.
//!
//! Destinations share [`SLOTS`] counters by hash: two destinations in one slot may hold each
//! other's callers back, never lose anything; the shard's own per-destination queues are exact.

use std::sync::atomic::{AtomicUsize, Ordering};

use event_listener::{Event, listener};

/// Counters, a power of two.
pub const SLOTS: usize = 4096;

/// Bytes in flight to one destination before the api holds back that destination's callers.
pub const PER_DESTINATION_BYTES: usize = 1 << 20;

/// The node-wide gauge of bytes in flight per destination.
pub struct Congestion {
    slots: Box<[AtomicUsize]>,
    drained: Event,
}

impl Default for Congestion {
    fn default() -> Self {
        Self {
            slots: (0..SLOTS).map(|_| AtomicUsize::new(0)).collect(),
            drained: Event::new(),
        }
    }
}

fn slot(dst: u64) -> usize {
    // Node ids are chosen by people and may be small and dense: mix before masking.
    (dst.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 52) as usize & (SLOTS - 1)
}

impl Congestion {
    /// Bytes in flight to `dst` (and any destination sharing its slot).
    pub fn in_flight(&self, dst: u64) -> usize {
        self.slots[slot(dst)].load(Ordering::Acquire)
    }

    /// Whether `dst`'s callers should wait before handing over more.
    pub fn is_congested(&self, dst: u64) -> bool {
        self.in_flight(dst) >= PER_DESTINATION_BYTES
    }

    pub(crate) fn add(&self, dst: u64, bytes: usize) {
        self.slots[slot(dst)].fetch_add(bytes, Ordering::AcqRel);
    }

    pub(crate) fn release(&self, dst: u64, bytes: usize) {
        let before = self.slots[slot(dst)].fetch_sub(bytes, Ordering::AcqRel);
        if before >= PER_DESTINATION_BYTES && before - bytes < PER_DESTINATION_BYTES {
            self.drained.notify(usize::MAX);
        }
    }

    /// Waits until `dst` is no longer congested. Callers bound the wait with their runtime's
    /// timer; after it they go ahead anyway (the shard parks the frame and gives up on it at
    /// its own deadline).
    pub async fn until_clear(&self, dst: u64) {
        while self.is_congested(dst) {
            listener!(self.drained => drained);
            // Re-check after registering, or a release in between would be missed.
            if !self.is_congested(dst) {
                return;
            }
            drained.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{thread, time::Duration};

    use super::*;

    #[test]
    fn a_waiting_caller_is_released_when_its_destination_drains() {
        let congestion = std::sync::Arc::new(Congestion::default());
        congestion.add(7, PER_DESTINATION_BYTES);
        assert!(congestion.is_congested(7));
        assert!(!congestion.is_congested(8) || slot(7) == slot(8));
        let waiter = {
            let congestion = std::sync::Arc::clone(&congestion);
            thread::spawn(move || futures_lite::future::block_on(congestion.until_clear(7)))
        };
        thread::sleep(Duration::from_millis(20));
        assert!(!waiter.is_finished());
        congestion.release(7, 1);
        waiter.join().unwrap();
        assert_eq!(congestion.in_flight(7), PER_DESTINATION_BYTES - 1);
    }

    #[test]
    fn small_dense_ids_spread_over_the_slots() {
        let used: std::collections::HashSet<usize> = (1..=64).map(slot).collect();
        assert!(used.len() > 60, "{}", used.len());
    }
}
